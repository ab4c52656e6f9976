//! How long a policy whose reconcile failed waits before the next try: exponential per policy, with
//! jitter, reset by a success. Fixed pauses either hammer an API server that is struggling (every
//! failing policy retried at the same beat) or leave a passing conflict waiting too long; jitter keeps
//! policies that failed together from coming back together.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The first pause after a failure (before jitter, which adds up to as much again).
pub const FIRST_RETRY: Duration = Duration::from_millis(500);

/// The longest pause before jitter: a failing policy is tried again within twice this (less than the
/// 300 s resync of a converged one).
pub const LONGEST_RETRY: Duration = Duration::from_secs(120);

/// Failure streaks of the policies, by uid.
#[derive(Debug, Default)]
pub struct RetryBackoff {
    streaks: Mutex<HashMap<String, ExponentialBackoff>>,
}

impl RetryBackoff {
    /// One more failure of the policy `uid`: how long to wait before the next try.
    pub fn failed(&self, uid: &str) -> Duration {
        let mut streaks = self.streaks.lock().expect("backoff lock");
        let streak = streaks.entry(uid.to_string()).or_insert_with(|| {
            ExponentialBuilder::new()
                .with_min_delay(FIRST_RETRY)
                .with_max_delay(LONGEST_RETRY)
                .with_jitter()
                .without_max_times()
                .build()
        });
        streak.next().unwrap_or(LONGEST_RETRY)
    }

    /// The policy `uid` reconciled: its next failure starts from the first pause again.
    pub fn succeeded(&self, uid: &str) {
        self.streaks.lock().expect("backoff lock").remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pause without jitter for the `n`th failure (jitter adds between 0 and as much again).
    fn within_jitter(pause: Duration, n: u32) -> bool {
        let base = (FIRST_RETRY * 2u32.pow(n)).min(LONGEST_RETRY);
        pause >= base && pause <= base * 2
    }

    #[test]
    fn pauses_double_with_every_failure_up_to_the_longest() {
        let backoff = RetryBackoff::default();
        for n in 0..12 {
            let pause = backoff.failed("a");
            assert!(within_jitter(pause, n), "failure {n}: {pause:?}");
        }
        assert!(backoff.failed("a") <= LONGEST_RETRY * 2);
    }

    #[test]
    fn a_success_starts_the_next_streak_from_the_first_pause() {
        let backoff = RetryBackoff::default();
        for _ in 0..5 {
            backoff.failed("a");
        }
        backoff.succeeded("a");
        assert!(within_jitter(backoff.failed("a"), 0));
    }

    #[test]
    fn every_policy_has_its_own_streak() {
        let backoff = RetryBackoff::default();
        for _ in 0..5 {
            backoff.failed("a");
        }
        assert!(within_jitter(backoff.failed("b"), 0));
    }

    #[test]
    fn jitter_spreads_policies_that_failed_together() {
        let backoff = RetryBackoff::default();
        let pauses: std::collections::BTreeSet<Duration> =
            (0..20).map(|i| backoff.failed(&format!("policy-{i}"))).collect();
        assert!(pauses.len() > 1, "twenty first pauses are not all equal");
    }
}
