//! Writes that outlive a reconcile.
//!
//! A reconcile plans every target of a policy and starts the writes its plan schedules; it waits for
//! them only for the write budget (`--write-budget-ms`). Writes still going then fly on by themselves,
//! with the write concurrency kept full, instead of being cut off and planned again from scratch by the
//! next reconcile. A reconcile that comes while a flight of the same plan is in the air (a rollout's
//! watch events) looks and reports, and starts nothing; the flight wakes its policy when it lands. A
//! flight of an older plan (the policy changed, or is being deleted) is called off first: it starts no
//! write more, and the reconcile waits for the writes it has in flight, so that the new plan is made
//! from everything the old one wrote (the stores hear of each write's result).

use std::collections::HashMap;
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
    /// Set to call it off: it starts no write more.
    halt: Arc<AtomicBool>,
    /// Cleared when it is called off: its landing wakes nobody (the reconcile waits for it).
    flies: Arc<AtomicBool>,
    abort: tokio::task::AbortHandle,
    landed: oneshot::Receiver<Landed>,
}

/// How a reconcile finds the flight of a policy's layer.
#[derive(Debug)]
pub enum Found {
    /// None is in the air (or the one there was called off): the reconcile writes its own plan.
    Clear,
    /// One of the same plan is still writing: the reconcile starts nothing.
    Flying,
    /// One landed since the last reconcile: what it came to.
    Landed(Landed),
}

/// The flights in the air, by policy UID and layer.
pub struct Flights {
    flying: Mutex<HashMap<(String, &'static str), Flight>>,
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

    /// The flight of `layer` of policy `uid`, for a reconcile of `plan`. One of another plan is called
    /// off: it starts no write more, and this waits until the writes it has in flight ended.
    pub async fn find(&self, uid: &str, layer: &'static str, plan: &str) -> Found {
        let key = (uid.to_string(), layer);
        let mut called_off = {
            let mut flying = self.flying.lock().unwrap_or_else(|e| e.into_inner());
            let Some(flight) = flying.get_mut(&key) else { return Found::Clear };
            match flight.landed.try_recv() {
                Ok(Some(landed)) => {
                    flying.remove(&key);
                    return Found::Landed(landed);
                }
                Ok(None) if flight.plan == plan => return Found::Flying,
                Ok(None) | Err(oneshot::Canceled) => flying.remove(&key).expect("found above"),
            }
        };
        called_off.flies.store(false, Ordering::SeqCst);
        called_off.halt.store(true, Ordering::SeqCst);
        // What it came to does not matter: the new plan is made from what the cluster shows.
        let _ = (&mut called_off.landed).await;
        Found::Clear
    }

    /// Starts the writes `fly` makes (given the flag that calls them off) as the flight of `layer` of
    /// `policy`, and waits for it up to `budget`: its outcome if it landed by then, `None` if it flies on
    /// (it wakes the policy when it lands).
    pub async fn start<F: Future<Output = Landed> + Send + 'static>(
        &self,
        policy: ObjectRef<TracingPolicy>,
        uid: &str,
        layer: &'static str,
        plan: String,
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
        let flight = Flight { plan, halt, flies, abort: task.abort_handle(), landed };
        self.flying.lock().unwrap_or_else(|e| e.into_inner()).insert((uid.to_string(), layer), flight);
        None
    }

    /// Drops every flight of policy `uid` at once (it is gone; its reverts landed before).
    pub fn forget(&self, uid: &str) {
        self.flying.lock().unwrap_or_else(|e| e.into_inner()).retain(|(u, _), flight| {
            if u == uid {
                flight.abort.abort();
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

    #[tokio::test]
    async fn a_flight_that_lands_within_the_budget_is_waited_for_and_wakes_nobody() {
        let (flights, mut woken) = Flights::new();
        let outcome =
            flights.start(ObjectRef::new("p"), "u", "workloads", "1".into(), Duration::from_secs(5), |_| async {
                landed(2)
            });
        assert!(outcome.await.is_some_and(|l| l.written.is_ok_and(|w| w.complete())));
        assert!(matches!(flights.find("u", "workloads", "1").await, Found::Clear));
        drop(flights);
        assert_eq!(woken.next().await, None, "nobody was woken");
    }

    #[tokio::test]
    async fn a_flight_past_the_budget_flies_on_is_found_flying_and_wakes_its_policy_when_it_lands() {
        let (flights, mut woken) = Flights::new();
        let (release, released) = oneshot::channel::<()>();
        let writes = |_| async move {
            let _ = released.await;
            landed(2)
        };
        let outcome = flights.start(ObjectRef::new("p"), "u", "workloads", "1".into(), Duration::ZERO, writes).await;
        assert!(outcome.is_none(), "flies on");
        assert!(matches!(flights.find("u", "workloads", "1").await, Found::Flying));
        assert!(matches!(flights.find("u", "network", "1").await, Found::Clear), "per layer");
        release.send(()).unwrap();
        assert_eq!(woken.next().await, Some(ObjectRef::new("p")));
        assert!(matches!(flights.find("u", "workloads", "1").await, Found::Landed(_)));
        assert!(matches!(flights.find("u", "workloads", "1").await, Found::Clear), "told once");
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
    async fn a_flight_of_an_older_plan_is_called_off_and_its_write_in_flight_ends_before_the_new_plan() {
        let (flights, mut woken) = Flights::new();
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writes = |halt| two_writes(halt, ended.clone());
        let outcome = flights.start(ObjectRef::new("p"), "u", "workloads", "1".into(), Duration::ZERO, writes).await;
        assert!(outcome.is_none());
        assert!(matches!(flights.find("u", "workloads", "2").await, Found::Clear), "generation 2 plans anew");
        assert_eq!(*ended.lock().unwrap(), [0], "the write in flight ended first; the next never started");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(*ended.lock().unwrap(), [0]);
        drop(flights);
        assert_eq!(woken.next().await, None, "a flight called off wakes nobody");
    }

    #[tokio::test]
    async fn the_flights_of_a_policy_gone_are_dropped() {
        let (flights, _woken) = Flights::new();
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writes = |halt| two_writes(halt, ended.clone());
        assert!(flights.start(ObjectRef::new("p"), "u", "network", "1".into(), Duration::ZERO, writes).await.is_none());
        flights.forget("u");
        assert!(matches!(flights.find("u", "network", "1").await, Found::Clear));
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(ended.lock().unwrap().is_empty(), "dropped before its first write ended");
    }
}
