//! Condition types, reasons, and the bookkeeping that keeps `lastTransitionTime` honest.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const INGRESS_READY: &str = "IngressReady";
pub const GATEWAY_READY: &str = "GatewayReady";
pub const WORKLOADS_READY: &str = "WorkloadsReady";
pub const NETWORK_READY: &str = "NetworkReady";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const COLLECTOR_REACHABLE: &str = "CollectorReachable";
pub const TRACES_FLOWING: &str = "TracesFlowing";

/// Condition status values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// A condition before it is stamped with a generation and a transition time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: Status,
    pub reason: &'static str,
    pub message: String,
}

impl Desired {
    pub fn new(type_: &'static str, status: Status, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, status, reason, message: message.into() }
    }
}

/// Longest condition message kept; the API server refuses longer ones (32768) and people cannot read them.
const MAX_MESSAGE: usize = 2048;

/// Cuts a text to at most `max` bytes, on a character boundary.
pub fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// Merges desired conditions into the previous list: a condition keeps its `lastTransitionTime` unless
/// its status changed. Conditions not desired any more (a layer turned off) are dropped.
pub fn merge(previous: &[Condition], desired: &[Desired], generation: i64, now: Timestamp) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let old = previous.iter().find(|c| c.type_ == d.type_);
            let transition = match old {
                Some(c) if c.status == d.status.as_str() => c.last_transition_time.clone(),
                _ => Time(now),
            };
            let mut message = d.message.clone();
            truncate(&mut message, MAX_MESSAGE);
            Condition {
                type_: d.type_.to_string(),
                status: d.status.as_str().to_string(),
                reason: d.reason.to_string(),
                message,
                observed_generation: Some(generation),
                last_transition_time: transition,
            }
        })
        .collect()
}

/// The conditions whose status changed between two lists (new or flipped), for Events.
pub fn transitions<'a>(previous: &[Condition], current: &'a [Condition]) -> Vec<&'a Condition> {
    current
        .iter()
        .filter(|c| {
            previous.iter().find(|p| p.type_ == c.type_).is_none_or(|p| p.status != c.status || p.reason != c.reason)
        })
        .collect()
}

/// Whether a condition in this state reports a failure: `Degraded` when True, `Progressing` never,
/// every other type when False.
pub fn is_bad(c: &Condition) -> bool {
    match c.type_.as_str() {
        DEGRADED => c.status == "True",
        PROGRESSING => false,
        _ => c.status == "False",
    }
}

/// What one status change is worth telling as Events: `(warning, condition)` pairs.
///
/// One failure flips several conditions (a failed workload batch: `WorkloadsReady` False, `Ready`
/// False, `Degraded` True); it gets one Warning, from the most specific condition: each layer that
/// went bad (distinct failures), else `Degraded`, else `Ready`. Likewise a recovery that makes the
/// policy Ready is one Normal Event (`Ready`), not one per layer that got there with it.
pub fn events<'a>(previous: &[Condition], current: &'a [Condition]) -> Vec<(bool, &'a Condition)> {
    let changed = transitions(previous, current);
    let layer =
        |c: &&Condition| [INGRESS_READY, GATEWAY_READY, WORKLOADS_READY, NETWORK_READY].contains(&c.type_.as_str());
    let (bad, good): (Vec<&Condition>, Vec<&Condition>) = changed.into_iter().partition(|c| is_bad(c));
    let mut out: Vec<(bool, &Condition)> = Vec::new();
    let layers_bad: Vec<&Condition> = bad.iter().copied().filter(layer).collect();
    if !layers_bad.is_empty() {
        out.extend(layers_bad.into_iter().map(|c| (true, c)));
    } else if let Some(c) = bad.iter().find(|c| c.type_ == DEGRADED).or_else(|| bad.first()) {
        out.push((true, c));
    }
    match good.iter().find(|c| c.type_ == READY) {
        Some(ready) => out.push((false, ready)),
        None => out.extend(good.into_iter().map(|c| (false, c))),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first = merge(&[], &[Desired::new(READY, Status::Unknown, "RolloutInProgress", "")], 1, at(10));
        let same = merge(&first, &[Desired::new(READY, Status::Unknown, "RolloutInProgress", "x")], 2, at(20));
        assert_eq!(same[0].last_transition_time, Time(at(10)));
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(&same, &[Desired::new(READY, Status::True, "AllLayersReady", "")], 2, at(30));
        assert_eq!(flipped[0].last_transition_time, Time(at(30)));
        assert_eq!(transitions(&same, &flipped).len(), 1);
        assert!(transitions(&flipped, &flipped).is_empty());
    }

    fn stamped(conditions: &[(&'static str, Status, &'static str)]) -> Vec<Condition> {
        let desired: Vec<Desired> = conditions.iter().map(|(t, s, r)| Desired::new(t, *s, r, "")).collect();
        merge(&[], &desired, 1, at(1))
    }

    #[test]
    fn one_failure_is_one_warning_and_one_recovery_one_normal_event() {
        let healthy = stamped(&[
            (READY, Status::True, "AllLayersReady"),
            (WORKLOADS_READY, Status::True, "AllTargetsReady"),
            (NETWORK_READY, Status::True, "AllTargetsReady"),
            (PROGRESSING, Status::False, "RolloutComplete"),
            (DEGRADED, Status::False, "AsExpected"),
        ]);
        let failed = stamped(&[
            (READY, Status::False, "LayersNotReady"),
            (WORKLOADS_READY, Status::False, "RolledBack"),
            (NETWORK_READY, Status::True, "AllTargetsReady"),
            (PROGRESSING, Status::False, "RolloutStopped"),
            (DEGRADED, Status::True, "RolledBack"),
        ]);
        let told: Vec<(bool, &str)> = events(&healthy, &failed).iter().map(|(w, c)| (*w, c.type_.as_str())).collect();
        // The layer's Warning alone; Progressing (a Normal change) is told too.
        assert_eq!(told, vec![(true, WORKLOADS_READY), (false, PROGRESSING)]);
        let told: Vec<(bool, &str)> = events(&failed, &healthy).iter().map(|(w, c)| (*w, c.type_.as_str())).collect();
        assert_eq!(told, vec![(false, READY)]);

        // A failure outside the layers (an admin limit): Degraded is the one Warning.
        let refused = stamped(&[
            (READY, Status::False, "AdminLimit"),
            (WORKLOADS_READY, Status::True, "AllTargetsReady"),
            (NETWORK_READY, Status::True, "AllTargetsReady"),
            (PROGRESSING, Status::False, "RolloutComplete"),
            (DEGRADED, Status::True, "AdminLimit"),
        ]);
        let told: Vec<(bool, &str)> = events(&healthy, &refused).iter().map(|(w, c)| (*w, c.type_.as_str())).collect();
        assert_eq!(told, vec![(true, DEGRADED)]);
        assert!(events(&refused, &refused).is_empty());
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let merged = merge(&[], &[Desired::new(DEGRADED, Status::True, "Conflict", long)], 1, at(1));
        assert!(merged[0].message.len() <= MAX_MESSAGE);
    }
}
