//! Writes that outlive a reconcile.
//!
//! A reconcile plans every target of a policy and starts the writes its plan schedules as a flight; it
//! waits for them only for the write budget (`--write-budget-ms`). Writes still going then fly on by
//! themselves, with the write concurrency kept full, instead of being cut off and planned again from
//! scratch by the next reconcile; a flight wakes its policy when it lands. A reconcile that comes while
//! flights of the same plan are in the air (the rollout's own watch events) starts a flight of what
//! its plan has beyond theirs (targets a batch admitted since, rollouts seen finished), never a second
//! write of a target in the air. Flights of an older plan (the policy changed, or is being deleted) are
//! called off first: they start no write more, and the reconcile waits for the writes they have in
//! flight, so that the new plan is made from everything the old one wrote (the stores hear of each
//! write's result).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use kube::runtime::reflector::ObjectRef;

use super::apply;
use crate::api::TracingPolicy;

/// What a flight's writes came to.
#[derive(Debug)]
pub struct Landed {
    pub written: apply::Result<apply::Written>,
    /// A written target changed meanwhile (see `Writes::raced`): the policy looks again at once.
    pub raced: bool,
}

struct Flight {
    /// Which plan it writes (a hash of what the plan was made from).
    plan: String,
    /// The targets it writes.
    targets: BTreeSet<String>,
    /// Set to call it off: it starts no write more.
    halt: Arc<AtomicBool>,
    /// Cleared when it is called off: its landing wakes nobody (the reconcile waits for it).
    flies: Arc<AtomicBool>,
    abort: tokio::task::AbortHandle,
    landed: oneshot::Receiver<Landed>,
}

/// How a reconcile finds the flights of a policy's layer.
#[derive(Debug, Default)]
pub struct Found {
    /// The targets that flights of the same plan still write: not written again now.
    pub in_air: BTreeSet<String>,
    /// What the flights that landed since the last look came to, in no order.
    pub landed: Vec<Landed>,
}

/// The flights in the air, by policy UID and layer.
pub struct Flights {
    flying: Mutex<HashMap<(String, &'static str), Vec<Flight>>>,
    wake: mpsc::UnboundedSender<ObjectRef<TracingPolicy>>,
}

impl Default for Flights {
    /// Flights that wake nobody when they land (for tests of single reconciles).
    fn default() -> Self {
        Self::new().0
    }
}

impl Flights {
    /// The flights, and the stream of the policies whose flight landed (for `Controller::reconcile_on`).
    pub fn new() -> (Self, mpsc::UnboundedReceiver<ObjectRef<TracingPolicy>>) {
        let (wake, woken) = mpsc::unbounded();
        (Self { flying: Mutex::default(), wake }, woken)
    }

    /// The flights of `layer` of policy `uid`, for a reconcile of `plan`. Those of another plan are called
    /// off: they start no write more, and this waits until the writes they have in flight ended.
    pub async fn find(&self, uid: &str, layer: &'static str, plan: &str) -> Found {
        let mut found = Found::default();
        let called_off: Vec<Flight> = {
            let mut flying = self.flying.lock().unwrap_or_else(|e| e.into_inner());
            let Some(flights) = flying.remove(&(uid.to_string(), layer)) else { return found };
            let mut called_off = Vec::new();
            let mut still = Vec::new();
            for mut flight in flights {
                match flight.landed.try_recv() {
                    Ok(Some(landed)) => found.landed.push(landed),
                    Ok(None) if flight.plan == plan => {
                        found.in_air.extend(flight.targets.iter().cloned());
                        still.push(flight);
                    }
                    Ok(None) => called_off.push(flight),
                    Err(oneshot::Canceled) => {}
                }
            }
            if !still.is_empty() {
                flying.insert((uid.to_string(), layer), still);
            }
            called_off
        };
        for mut flight in called_off {
            flight.flies.store(false, Ordering::SeqCst);
            flight.halt.store(true, Ordering::SeqCst);
            // What it came to does not matter: the new plan is made from what the cluster shows.
            let _ = (&mut flight.landed).await;
        }
        found
    }

    /// Starts the writes `fly` makes of `targets` (given the flag that calls them off) as a flight of
    /// `layer` of `policy`, and waits for it up to `budget`: its outcome if it landed by then, `None` if
    /// it flies on (it wakes the policy when it lands).
    #[allow(clippy::too_many_arguments)]
    pub async fn start<F: Future<Output = Landed> + Send + 'static>(
        &self,
        policy: ObjectRef<TracingPolicy>,
        uid: &str,
        layer: &'static str,
        plan: String,
        targets: BTreeSet<String>,
        budget: Duration,
        fly: impl FnOnce(Arc<AtomicBool>) -> F,
    ) -> Option<Landed> {
        let halt = Arc::new(AtomicBool::new(false));
        let writes = fly(halt.clone());
        let (tell, mut landed) = oneshot::channel();
        let wake = self.wake.clone();
        let flies = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let flies = flies.clone();
            async move {
                let outcome = writes.await;
                let _ = tell.send(outcome);
                // Woken only when the reconcile that started it stopped waiting.
                if flies.load(Ordering::SeqCst) {
                    let _ = wake.unbounded_send(policy);
                }
            }
        });
        if let Ok(outcome) = tokio::time::timeout(budget, &mut landed).await {
            return outcome.ok();
        }
        flies.store(true, Ordering::SeqCst);
        // Landed in the instant between: taken here (the wake it may send is one look more).
        if let Ok(Some(outcome)) = landed.try_recv() {
            return Some(outcome);
        }
        let flight = Flight { plan, targets, halt, flies, abort: task.abort_handle(), landed };
        let mut flying = self.flying.lock().unwrap_or_else(|e| e.into_inner());
        flying.entry((uid.to_string(), layer)).or_default().push(flight);
        None
    }

    /// Calls off every flight of policy `uid` and waits for the writes they have in flight (nothing of
    /// the policy may be written now: it became invalid, or an admin limit refuses it).
    pub async fn call_off(&self, uid: &str) {
        let called_off: Vec<Flight> = {
            let mut flying = self.flying.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<_> = flying.keys().filter(|(u, _)| u == uid).cloned().collect();
            keys.iter().filter_map(|k| flying.remove(k)).flatten().collect()
        };
        for mut flight in called_off {
            flight.flies.store(false, Ordering::SeqCst);
            flight.halt.store(true, Ordering::SeqCst);
            let _ = (&mut flight.landed).await;
        }
    }

    /// Drops every flight of policy `uid` at once (it is gone; its reverts landed before).
    pub fn forget(&self, uid: &str) {
        self.flying.lock().unwrap_or_else(|e| e.into_inner()).retain(|(u, _), flights| {
            if u == uid {
                flights.iter().for_each(|f| f.abort.abort());
            }
            u != uid
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn landed(done: usize) -> Landed {
        Landed { written: Ok(apply::Written { done, of: 2 }), raced: false }
    }

    fn targets(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// Starts a flight of `plan` writing `names` on layer "workloads" of policy "p" (uid "u").
    async fn start<F: Future<Output = Landed> + Send + 'static>(
        flights: &Flights,
        plan: &str,
        names: &[&str],
        budget: Duration,
        writes: impl FnOnce(Arc<AtomicBool>) -> F,
    ) -> Option<Landed> {
        flights.start(ObjectRef::new("p"), "u", "workloads", plan.into(), targets(names), budget, writes).await
    }

    #[tokio::test]
    async fn a_flight_that_lands_within_the_budget_is_waited_for_and_wakes_nobody() {
        let (flights, mut woken) = Flights::new();
        let outcome = start(&flights, "1", &["a"], Duration::from_secs(5), |_| async { landed(2) }).await;
        assert!(outcome.is_some_and(|l| l.written.is_ok_and(|w| w.complete())));
        let found = flights.find("u", "workloads", "1").await;
        assert!(found.in_air.is_empty() && found.landed.is_empty());
        drop(flights);
        assert_eq!(woken.next().await, None, "nobody was woken");
    }

    #[tokio::test]
    async fn flights_past_the_budget_fly_on_their_targets_are_in_the_air_and_each_wakes_its_policy() {
        let (flights, mut woken) = Flights::new();
        let (release, released) = oneshot::channel::<()>();
        let writes = |_| async move {
            let _ = released.await;
            landed(2)
        };
        assert!(start(&flights, "1", &["a", "b"], Duration::ZERO, writes).await.is_none(), "flies on");
        let pending = |_| async { std::future::pending::<Landed>().await };
        assert!(start(&flights, "1", &["c"], Duration::ZERO, pending).await.is_none(), "a second flight");
        assert_eq!(flights.find("u", "workloads", "1").await.in_air, targets(&["a", "b", "c"]));
        assert!(flights.find("u", "network", "1").await.in_air.is_empty(), "per layer");
        release.send(()).unwrap();
        assert_eq!(woken.next().await, Some(ObjectRef::new("p")));
        let found = flights.find("u", "workloads", "1").await;
        assert_eq!((found.landed.len(), found.in_air), (1, targets(&["c"])));
        assert!(flights.find("u", "workloads", "1").await.landed.is_empty(), "told once");
    }

    /// Two writes, one after the other, each 50 ms; the second starts only if the flight was not halted.
    async fn two_writes(halt: Arc<AtomicBool>, ended: Arc<std::sync::Mutex<Vec<usize>>>) -> Landed {
        let mut done = 0;
        for i in 0..2 {
            if halt.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            ended.lock().unwrap().push(i);
            done += 1;
        }
        landed(done)
    }

    #[tokio::test]
    async fn flights_of_an_older_plan_are_called_off_and_their_write_in_flight_ends_before_the_new_plan() {
        let (flights, mut woken) = Flights::new();
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writes = |halt| two_writes(halt, ended.clone());
        assert!(start(&flights, "1", &["a", "b"], Duration::ZERO, writes).await.is_none());
        let found = flights.find("u", "workloads", "2").await;
        assert!(found.in_air.is_empty() && found.landed.is_empty(), "generation 2 plans anew");
        assert_eq!(*ended.lock().unwrap(), [0], "the write in flight ended first; the next never started");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(*ended.lock().unwrap(), [0]);
        drop(flights);
        assert_eq!(woken.next().await, None, "a flight called off wakes nobody");
    }

    #[tokio::test]
    async fn calling_off_a_policys_flights_waits_for_their_writes_in_flight() {
        let (flights, _woken) = Flights::new();
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writes = |halt| two_writes(halt, ended.clone());
        assert!(start(&flights, "1", &["a", "b"], Duration::ZERO, writes).await.is_none());
        flights.call_off("u").await;
        assert_eq!(*ended.lock().unwrap(), [0]);
        assert!(flights.find("u", "workloads", "1").await.in_air.is_empty());
    }

    #[tokio::test]
    async fn the_flights_of_a_policy_gone_are_dropped() {
        let (flights, _woken) = Flights::new();
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writes = |halt| two_writes(halt, ended.clone());
        assert!(start(&flights, "1", &["a"], Duration::ZERO, writes).await.is_none());
        flights.forget("u");
        assert!(flights.find("u", "workloads", "1").await.in_air.is_empty());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(ended.lock().unwrap().is_empty(), "dropped before its first write ended");
    }
}
