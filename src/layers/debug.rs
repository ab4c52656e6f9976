//! The time-boxed debug session (`spec.debug`): which spec the layers roll out now.
//!
//! While a session runs, the layers are given the policy's spec with the sampling raised (edge and
//! workloads to `spec.debug.ratio`, the network to the admin's floor); once it ends, the policy's own
//! spec again. Nothing else changes, so the engine rolls the session out and back like any other change,
//! and the values after it are exactly the ones before it. The end is a point in time kept in the
//! status (`expiresAt`), so a controller restart neither ends nor extends a session.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::{DebugSpec, DebugStatus, TracingPolicySpec};

/// What the session means for this reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    /// The spec the layers roll out now.
    pub effective: TracingPolicySpec,
    /// The session's status (`None`: the policy has no `spec.debug`).
    pub status: Option<DebugStatus>,
    /// When to look again: the end of a running session.
    pub ends_at: Option<Timestamp>,
}

/// The session of `spec` at `now`. `previous` is the last status written: it keeps the end of a
/// `durationSeconds` session from the moment it was first seen. `floor` is the lowest network sampling
/// rate the admin allows.
pub fn session(spec: &TracingPolicySpec, previous: Option<&DebugStatus>, now: Timestamp, floor: u32) -> Session {
    let Some(debug) = spec.debug.as_ref() else {
        return Session { effective: spec.clone(), status: None, ends_at: None };
    };
    let id = session_id(debug);
    let expires_at = match (&debug.until, debug.duration_seconds, previous) {
        (Some(until), _, _) => until.0,
        (None, _, Some(p)) if p.session == id => p.expires_at.0,
        (None, Some(seconds), _) => now.saturating_add(SignedDuration::from_secs(i64::from(seconds))).unwrap_or(now),
        (None, None, _) => now,
    };
    let active = now < expires_at;
    let status = Some(DebugStatus { session: id, expires_at: Time(expires_at), active });
    if !active {
        return Session { effective: spec.clone(), status, ends_at: None };
    }
    let mut effective = spec.clone();
    effective.sampling.ratio = debug.ratio.clone();
    if let Some(network) = effective.network.as_mut() {
        for sampling in
            network.sflow.iter_mut().map(|s| &mut s.sampling).chain(network.ipfix.iter_mut().map(|i| &mut i.sampling))
        {
            *sampling = (*sampling).min(floor);
        }
    }
    Session { effective, status, ends_at: Some(expires_at) }
}

/// A session's identity: its spec, so that an edit of anything else keeps the session's end.
fn session_id(debug: &DebugSpec) -> String {
    let value = serde_json::to_value(debug).expect("a debug spec serializes");
    super::hash_of(&value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NetworkSpec;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn spec(debug: Option<DebugSpec>) -> TracingPolicySpec {
        let network = serde_json::json!({"sflow": {"targets": ["10.0.0.1:6343"], "sampling": 1024}});
        let mut spec = TracingPolicySpec {
            network: Some(serde_json::from_value::<NetworkSpec>(network).unwrap()),
            debug,
            ..Default::default()
        };
        spec.sampling.ratio = "0.1".into();
        spec
    }

    fn for_seconds(seconds: i32) -> Option<DebugSpec> {
        Some(DebugSpec { ratio: "1".into(), until: None, duration_seconds: Some(seconds) })
    }

    #[test]
    fn no_session_is_the_policy_itself() {
        let s = spec(None);
        assert_eq!(session(&s, None, at(100), 64), Session { effective: s, status: None, ends_at: None });
    }

    #[test]
    fn a_session_raises_sampling_until_it_ends_and_then_the_policy_comes_back_exactly() {
        let s = spec(for_seconds(600));
        let first = session(&s, None, at(1000), 64);
        assert_eq!(first.effective.sampling.ratio, "1");
        assert_eq!(first.effective.network.as_ref().unwrap().sflow.as_ref().unwrap().sampling, 64);
        assert_eq!(first.ends_at, Some(at(1600)));
        let status = first.status.clone().unwrap();
        assert!(status.active);

        // A restart in the middle: the end comes from the status, not from the new process's clock.
        let later = session(&s, Some(&status), at(1300), 64);
        assert_eq!(later.ends_at, Some(at(1600)));
        assert_eq!(later.effective, first.effective);

        // Over: the policy's own spec again, the status says it ended.
        let over = session(&s, Some(&status), at(1600), 64);
        assert_eq!(over.effective, s);
        assert_eq!(over.ends_at, None);
        assert!(!over.status.unwrap().active);
    }

    #[test]
    fn editing_the_session_starts_it_anew_and_an_until_in_the_past_is_over() {
        let s = spec(for_seconds(600));
        let status = session(&s, None, at(1000), 64).status.unwrap();
        let longer = spec(for_seconds(1200));
        assert_eq!(session(&longer, Some(&status), at(1100), 64).ends_at, Some(at(2300)));

        let past = spec(Some(DebugSpec { ratio: "1".into(), until: Some(Time(at(500))), duration_seconds: None }));
        let over = session(&past, None, at(1000), 64);
        assert_eq!(over.effective.sampling.ratio, "0.1");
        assert!(!over.status.unwrap().active);
    }

    #[test]
    fn a_network_already_denser_than_the_floor_keeps_its_sampling() {
        let mut s = spec(for_seconds(60));
        s.network.as_mut().unwrap().sflow.as_mut().unwrap().sampling = 100;
        let on = session(&s, None, at(0), 256);
        assert_eq!(on.effective.network.unwrap().sflow.unwrap().sampling, 100);
    }
}
