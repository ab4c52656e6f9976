//! Where a reconcile's time goes: each part is added up while the reconcile runs and logged with its
//! duration (the debug line `reconciled`), so `just bench` can break its slowest reconciles down and
//! anyone reading a slow rollout's log can see what it waited for.

use std::cell::Cell;
use std::future::Future;
use std::time::{Duration, Instant};

tokio::task_local! {
    static PARTS: Cell<Parts>;
}

/// The parts of one reconcile. Those not listed (the finalizer, the admin limits, the debug session,
/// the status built from the reports) are the rest of its duration. The status write is not one: it
/// goes on after the reconcile ([`super::statuses`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parts {
    /// The edge layers: ingress-nginx and the Gateway API (observe, plan and their writes).
    pub edge: Duration,
    /// The namespaces' labels and the older policies' selections, read for the workload layer.
    pub labels: Duration,
    /// The workload layer: observe, plan, and its writes within the workload write budget.
    pub observe: Duration,
    pub plan: Duration,
    pub write: Duration,
    /// The network layer: observe, plan and its writes.
    pub network: Duration,
    /// Events published (each an API request).
    pub events: Duration,
    /// Waiting, after the layers, for the collector's canary or the flows receivers' reports.
    pub canary: Duration,
}

/// Which part a duration is added to.
pub type Part = fn(&mut Parts) -> &mut Duration;

/// Runs `reconcile`, adding up its parts.
pub async fn scope<F: Future>(reconcile: F) -> (F::Output, Parts) {
    PARTS
        .scope(Cell::new(Parts::default()), async {
            let output = reconcile.await;
            (output, PARTS.with(Cell::get))
        })
        .await
}

/// Adds `took` to `part` of the reconcile running on this task (nothing outside [`scope`]).
pub fn add(part: Part, took: Duration) {
    let _ = PARTS.try_with(|parts| {
        let mut p = parts.get();
        *part(&mut p) += took;
        parts.set(p);
    });
}

/// Runs `f`, adding its time to `part`.
pub async fn timed<T>(part: Part, f: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let output = f.await;
    add(part, started.elapsed());
    output
}

/// Microseconds, as the log carries them.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parts_add_up_within_their_reconcile_and_nothing_is_kept_outside() {
        add(|p| &mut p.network, Duration::from_millis(5));
        let ((), parts) = scope(async {
            add(|p| &mut p.network, Duration::from_millis(2));
            timed(|p| &mut p.events, async { add(|p| &mut p.network, Duration::from_millis(3)) }).await;
        })
        .await;
        assert_eq!(parts.network, Duration::from_millis(5));
        assert!(parts.events < Duration::from_secs(1));
        assert_eq!(parts.edge, Duration::ZERO);
        let ((), again) = scope(async {}).await;
        assert_eq!(again, Parts::default());
    }
}
