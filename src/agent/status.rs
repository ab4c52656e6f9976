//! `NodeTracing.status` from a [`Report`]: per-bridge states and the Ready / Degraded conditions (pure).

use k8s_openapi::jiff::Timestamp;

use super::node::{Report, State};
use crate::api::NodeTracingStatus;
use crate::api::conditions::{self, DEGRADED, Desired, READY, Status};

pub const REASON_VERIFIED: &str = "ExportVerified";
pub const REASON_NOTHING: &str = "NothingToExport";
pub const REASON_PENDING: &str = "ExportPending";
pub const REASON_FAILED: &str = "ExportFailed";
pub const REASON_CONFLICT: &str = "Conflict";
pub const REASON_OVS_UNAVAILABLE: &str = "OvsUnavailable";
pub const REASON_AS_EXPECTED: &str = "AsExpected";

/// The status a report implies, merged with the previous one (transition times kept).
pub fn node_status(report: &Report, previous: Option<&NodeTracingStatus>, now: Timestamp) -> NodeTracingStatus {
    let generation = report.generation.unwrap_or_default();
    let listed = |state: State| -> Vec<String> {
        report
            .bridges
            .iter()
            .filter(|b| b.state == state)
            .map(|b| {
                if b.status.message.is_empty() {
                    b.status.bridge.clone()
                } else {
                    format!("{}: {}", b.status.bridge, b.status.message)
                }
            })
            .collect()
    };
    let conflicts = listed(State::Conflict);
    let failed = listed(State::Failed);
    let pending = listed(State::Pending);

    let ready = if !report.problems.is_empty() {
        Desired::new(READY, Status::False, REASON_OVS_UNAVAILABLE, report.problems.join("; "))
    } else if !conflicts.is_empty() {
        Desired::new(READY, Status::False, REASON_CONFLICT, conflicts.join("; "))
    } else if !failed.is_empty() {
        Desired::new(READY, Status::False, REASON_FAILED, failed.join("; "))
    } else if !pending.is_empty() {
        Desired::new(READY, Status::False, REASON_PENDING, pending.join("; "))
    } else if report.bridges.is_empty() {
        Desired::new(READY, Status::True, REASON_NOTHING, "no bridge exports on this node")
    } else {
        let notes: Vec<String> = report
            .bridges
            .iter()
            .filter(|b| !b.status.message.is_empty())
            .map(|b| format!("{}: {}", b.status.bridge, b.status.message))
            .collect();
        let message = if notes.is_empty() {
            format!("{} bridge(s) export, verified with ofproto/trace", report.bridges.len())
        } else {
            notes.join("; ")
        };
        Desired::new(READY, Status::True, REASON_VERIFIED, message)
    };
    let degraded = if !report.problems.is_empty() {
        Desired::new(DEGRADED, Status::True, REASON_OVS_UNAVAILABLE, report.problems.join("; "))
    } else if !conflicts.is_empty() {
        Desired::new(DEGRADED, Status::True, REASON_CONFLICT, conflicts.join("; "))
    } else if !failed.is_empty() {
        Desired::new(DEGRADED, Status::True, REASON_FAILED, failed.join("; "))
    } else {
        Desired::new(DEGRADED, Status::False, REASON_AS_EXPECTED, "")
    };
    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    NodeTracingStatus {
        observed_generation: report.generation,
        conditions: conditions::merge(previous_conditions, &[ready, degraded], generation, now),
        bridges: report.bridges.iter().map(|b| b.status.clone()).collect(),
        ovs_version: report.ovs_version.chars().take(64).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::node::BridgeReport;
    use crate::api::node_tracing::BridgeStatus;

    fn bridge(name: &str, state: State, message: &str) -> BridgeReport {
        BridgeReport {
            status: BridgeStatus {
                bridge: name.into(),
                policy: "p".into(),
                applied_generation: 2,
                applied: state == State::Verified,
                verified: state == State::Verified,
                conflict: state == State::Conflict,
                message: message.into(),
            },
            state,
        }
    }

    fn condition<'a>(s: &'a NodeTracingStatus, type_: &str) -> (&'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn conditions_follow_the_worst_bridge() {
        let now = Timestamp::from_second(100).unwrap();
        let mut report = Report {
            generation: Some(4),
            bridges: vec![bridge("br-int", State::Verified, "")],
            ovs_version: "3.1.0".into(),
            ..Report::default()
        };
        let ok = node_status(&report, None, now);
        assert_eq!(condition(&ok, READY), ("True", REASON_VERIFIED));
        assert_eq!(condition(&ok, DEGRADED), ("False", REASON_AS_EXPECTED));
        assert_eq!(ok.observed_generation, Some(4));
        assert_eq!(ok.ovs_version, "3.1.0");
        // Same report later: identical status (so no write).
        assert_eq!(node_status(&report, Some(&ok), Timestamp::from_second(200).unwrap()), ok);

        report.bridges.push(bridge("br-ex", State::Conflict, "already exports"));
        let s = node_status(&report, Some(&ok), now);
        assert_eq!(condition(&s, READY), ("False", REASON_CONFLICT));
        assert_eq!(condition(&s, DEGRADED), ("True", REASON_CONFLICT));
        assert!(s.bridges[1].conflict);

        report.bridges[1] = bridge("br-ex", State::Pending, "waiting");
        let s = node_status(&report, Some(&ok), now);
        assert_eq!(condition(&s, READY), ("False", REASON_PENDING));
        assert_eq!(condition(&s, DEGRADED), ("False", REASON_AS_EXPECTED));

        report.problems = vec!["OVSDB down".into()];
        let s = node_status(&report, Some(&ok), now);
        assert_eq!(condition(&s, READY), ("False", REASON_OVS_UNAVAILABLE));

        let empty = Report::default();
        let s = node_status(&empty, None, now);
        assert_eq!(condition(&s, READY), ("True", REASON_NOTHING));
    }
}
