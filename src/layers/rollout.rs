//! The rollout engine every layer shares: where one target stands, derived from the cluster alone on
//! every reconcile (never from memory), and what crosstrace may do about it.
//!
//! ```text
//! pending ─▶ changing(revision crosstrace wrote, since) ─▶ converged
//!               │ past the deadline / pods of that revision cannot start
//!               ▼
//!             failed ─▶ rolled back (autoRollback; waits for a spec change)
//! waiting: the owner holds the rollout (OnDelete until pods are recreated, a paused Deployment)
//! ```
//!
//! The health gate judges only crosstrace's own revision, and only until it converged. Convergence is
//! recorded on the target with the revision (one write when it is first seen healthy), so that a
//! converged target that later turns unhealthy — its owner scaled it, restarted it, gave it a new
//! image, an HPA or a node drain moved its pods — is reported and never rolled back: an owner's action
//! is never crosstrace's failure.

/// What crosstrace wrote on a target, as read back from the target itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The revision crosstrace wrote is the one the policy wants now.
    pub current: bool,
    /// Everything crosstrace wrote is still in place (nobody removed it).
    pub intact: bool,
    /// crosstrace saw this revision healthy once.
    pub converged: bool,
    /// Unix seconds when crosstrace wrote this revision: the start of its progress deadline.
    pub since: i64,
}

/// How the target's rollout looks now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Every replica of the current revision is available.
    Healthy,
    /// Rolling out; `resumed_at` (unix seconds) restarts the deadline after the owner held the rollout.
    Progressing { resumed_at: Option<i64> },
    /// Pods of crosstrace's revision cannot start (CrashLoopBackOff, ImagePullBackOff, ...): the batch
    /// fails before its deadline.
    Failing(String),
    /// The owner holds the rollout; no deadline runs.
    Waiting { reason: &'static str, message: String },
}

/// What the engine decides for one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write the revision the policy wants (a new target, or the policy changed): takes a rollout slot.
    Write,
    /// Someone removed what crosstrace wrote: write it again (no slot; the target was ours already).
    Reapply,
    /// crosstrace's revision is rolling out, within its deadline.
    Changing,
    /// crosstrace's revision is healthy for the first time: record that it converged.
    MarkConverged,
    /// Converged and healthy: nothing to do.
    Converged,
    /// Converged once, unhealthy now: the owner's doing. Reported, never rolled back.
    OwnerUnhealthy(String),
    /// The owner holds the rollout of crosstrace's revision.
    Waiting { reason: &'static str, message: String },
    /// crosstrace's revision failed: roll it back (autoRollback) or leave it and report.
    Failed(String),
}

/// Decides the step for one target from what crosstrace wrote there and how its rollout looks.
/// `deadline` is `spec.rollout.progressDeadlineSeconds`.
pub fn judge(written: Option<Written>, health: &Health, now: i64, deadline: i64) -> Step {
    let Some(w) = written.filter(|w| w.current) else {
        return Step::Write;
    };
    if !w.intact {
        return Step::Reapply;
    }
    if w.converged {
        return match health {
            Health::Healthy => Step::Converged,
            Health::Progressing { .. } => Step::OwnerUnhealthy("is rolling out or scaling".into()),
            Health::Failing(why) => Step::OwnerUnhealthy(why.clone()),
            Health::Waiting { message, .. } => Step::OwnerUnhealthy(message.clone()),
        };
    }
    match health {
        Health::Healthy => Step::MarkConverged,
        Health::Failing(why) => Step::Failed(why.clone()),
        Health::Waiting { reason, message } => Step::Waiting { reason, message: message.clone() },
        Health::Progressing { resumed_at } => {
            let since = resumed_at.map_or(w.since, |r| r.max(w.since));
            if now >= since + deadline {
                Step::Failed(format!("did not become healthy within {deadline}s"))
            } else {
                Step::Changing
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000;
    const DEADLINE: i64 = 60;

    fn written(converged: bool, since: i64) -> Option<Written> {
        Some(Written { current: true, intact: true, converged, since })
    }

    fn progressing() -> Health {
        Health::Progressing { resumed_at: None }
    }

    fn waiting() -> Health {
        Health::Waiting { reason: super::super::reasons::WAITING_FOR_RESTART, message: "OnDelete".into() }
    }

    /// Every transition of the engine, one row each: (what was written, health, expected step).
    #[test]
    fn every_transition() {
        let failing = Health::Failing("pod p: CrashLoopBackOff".into());
        let stale = Some(Written { current: false, intact: true, converged: true, since: 0 });
        let removed = Some(Written { current: true, intact: false, converged: true, since: 0 });
        let rows: Vec<(&str, Option<Written>, Health, Step)> = vec![
            ("new target", None, Health::Healthy, Step::Write),
            ("policy changed", stale, Health::Healthy, Step::Write),
            ("someone removed it", removed, Health::Healthy, Step::Reapply),
            ("rolling out in time", written(false, NOW - 10), progressing(), Step::Changing),
            (
                "past its deadline",
                written(false, NOW - DEADLINE),
                progressing(),
                Step::Failed(format!("did not become healthy within {DEADLINE}s")),
            ),
            ("healthy first time", written(false, NOW - 10), Health::Healthy, Step::MarkConverged),
            (
                "crash-looping before the deadline",
                written(false, NOW - 1),
                failing.clone(),
                Step::Failed("pod p: CrashLoopBackOff".into()),
            ),
            (
                "owner holds it",
                written(false, NOW - 10 * DEADLINE),
                waiting(),
                Step::Waiting { reason: "WaitingForRestart", message: "OnDelete".into() },
            ),
            ("converged and healthy", written(true, 0), Health::Healthy, Step::Converged),
            (
                "converged, owner scales long after",
                written(true, 0),
                progressing(),
                Step::OwnerUnhealthy("is rolling out or scaling".into()),
            ),
            (
                "converged, owner's pods crash",
                written(true, 0),
                failing,
                Step::OwnerUnhealthy("pod p: CrashLoopBackOff".into()),
            ),
            ("converged, owner waits", written(true, 0), waiting(), Step::OwnerUnhealthy("OnDelete".into())),
        ];
        for (what, w, health, expected) in rows {
            assert_eq!(judge(w, &health, NOW, DEADLINE), expected, "{what}");
        }
    }

    #[test]
    fn a_resumed_rollout_gets_its_whole_deadline_again() {
        let resumed = Health::Progressing { resumed_at: Some(NOW - 5) };
        assert_eq!(judge(written(false, NOW - 10 * DEADLINE), &resumed, NOW, DEADLINE), Step::Changing);
        let long_ago = Health::Progressing { resumed_at: Some(NOW - DEADLINE) };
        assert!(matches!(judge(written(false, NOW - 10 * DEADLINE), &long_ago, NOW, DEADLINE), Step::Failed(_)));
    }
}
