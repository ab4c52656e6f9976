//! `NodeTracing.status` from a [`Report`]: per-bridge states and the Ready / Degraded conditions (pure).

use k8s_openapi::jiff::Timestamp;

use super::node::{BridgeReport, Report, State};
use crate::api::NodeTracingStatus;
use crate::api::conditions::{self, DEGRADED, Desired, READY, Status};
use crate::api::node_tracing::BridgeStatus;

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
        bridges: report.bridges.iter().map(|b| with_convergence(b, previous)).collect(),
        ovs_version: report.ovs_version.chars().take(64).collect(),
    }
}

/// A bridge's status, saying which request converged on it: the one it answers, once it is verified;
/// until the spec asks for another request, that stays so whatever happens on the node later (a bridge
/// removed, ovs-vswitchd restarting), also across restarts of the agent (it is read back from the
/// previous status). The controller takes it as the export's convergence, so that it does not write a
/// mark of its own.
fn with_convergence(b: &BridgeReport, previous: Option<&NodeTracingStatus>) -> BridgeStatus {
    let before = previous
        .into_iter()
        .flat_map(|p| &p.bridges)
        .find(|p| p.bridge == b.status.bridge && p.policy == b.status.policy)
        .map(|p| p.converged_request.as_str());
    let converged = b.state == State::Verified || before == Some(b.request.as_str());
    BridgeStatus { converged_request: if converged { b.request.clone() } else { String::new() }, ..b.status.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                ..BridgeStatus::default()
            },
            state,
            request: format!("request-{name}"),
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

    #[test]
    fn a_request_converges_once_verified_and_stays_so_until_the_spec_asks_for_another() {
        let now = Timestamp::from_second(100).unwrap();
        let report =
            |state| Report { generation: Some(4), bridges: vec![bridge("br-int", state, "")], ..Report::default() };
        let pending = node_status(&report(State::Pending), None, now);
        assert_eq!(pending.bridges[0].converged_request, "", "not verified yet");
        let verified = node_status(&report(State::Verified), Some(&pending), now);
        assert_eq!(verified.bridges[0].converged_request, "request-br-int");
        // Later the bridge is lost, or the agent restarted and OVS is down: still converged.
        for state in [State::Pending, State::Failed, State::Conflict] {
            let later = node_status(&report(state), Some(&verified), now);
            assert_eq!(later.bridges[0].converged_request, "request-br-int", "{state:?}");
        }
        // The spec asks for another request (written again): that one has not converged.
        let mut again = report(State::Pending);
        again.bridges[0].request = "request-2".into();
        assert_eq!(node_status(&again, Some(&verified), now).bridges[0].converged_request, "");
        // Another policy's entry on the same bridge is not this one's.
        let mut other = report(State::Pending);
        other.bridges[0].status.policy = "q".into();
        assert_eq!(node_status(&other, Some(&verified), now).bridges[0].converged_request, "");
    }
}
