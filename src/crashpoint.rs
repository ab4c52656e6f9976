//! Crash points for the end-to-end tests, compiled in only with the `e2e` feature (the binary a user runs
//! has none). `CROSSTRACE_E2E_CRASH_AFTER_WRITES=N` ends the process at once, as a crash would, right
//! before its (N+1)-th API write: a test can stop the controller right after any write of a rollout or a
//! revert and prove that a fresh controller converges from whatever was left (the Sieve approach).

#[cfg(feature = "e2e")]
pub fn before_write() {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static WRITES: AtomicUsize = AtomicUsize::new(0);
    static LIMIT: OnceLock<Option<usize>> = OnceLock::new();
    let limit = LIMIT.get_or_init(|| std::env::var("CROSSTRACE_E2E_CRASH_AFTER_WRITES").ok()?.parse().ok());
    if let Some(limit) = *limit
        && WRITES.fetch_add(1, Ordering::SeqCst) >= limit
    {
        eprintln!("crash point: exiting before API write {} (CROSSTRACE_E2E_CRASH_AFTER_WRITES={limit})", limit + 1);
        std::process::exit(86);
    }
}

#[cfg(not(feature = "e2e"))]
#[inline(always)]
pub fn before_write() {}
