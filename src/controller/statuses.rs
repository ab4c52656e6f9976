//! The policies' status writes, off the reconciles' critical path.
//!
//! A reconcile hands the status it built and returns; it does not wait for the write (on a busy API
//! server a status write took 60-190 ms, most of the slowest reconciles' time). Per policy one write is
//! in flight at a time, and the newest status handed is the one written next: those handed while a
//! write was in flight are skipped, as only the newest matters. The Events of the conditions that moved
//! are published once a write is answered, against the conditions last written. A write that fails
//! forgets what was handed (the next reconcile builds the status from the policy as the API server has
//! it), wakes the policy, and fails its next reconcile, which is retried after the usual backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::apply::{Error, Writer};
use super::parts::micros;
use super::status::Reported;
use crate::api::conditions;
use crate::api::{TracingPolicy, TracingPolicyStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// The status writes of every policy (cheap to clone: shared).
#[derive(Clone)]
pub struct Statuses {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Writer,
    recorder: Recorder,
    wake: UnboundedSender<ObjectRef<TracingPolicy>>,
    policies: Mutex<HashMap<String, Slot>>,
    /// How many policies have a status write going on.
    writing: tokio::sync::watch::Sender<usize>,
}

/// One policy's status writes, by its uid.
#[derive(Default)]
struct Slot {
    /// The status last handed (written, or to be), and when.
    last: Option<Reported>,
    /// The status to write next.
    next: Option<Pending>,
    /// A write of this policy's goes on (a task runs for it).
    writing: bool,
    /// A write failed; the next reconcile takes this and fails with it.
    failed: Option<Error>,
    /// The policy is gone: its slot is dropped when its write ends.
    gone: bool,
}

struct Pending {
    name: String,
    status: TracingPolicyStatus,
    /// The conditions last written: the Events tell what moved since.
    since: Vec<Condition>,
    regarding: ObjectReference,
    woken: ObjectRef<TracingPolicy>,
}

impl Statuses {
    /// Status writes through `writer`, their Events through `recorder`; a failed write wakes its policy
    /// through `wake` (the controller's trigger stream).
    pub fn new(writer: Writer, recorder: Recorder, wake: UnboundedSender<ObjectRef<TracingPolicy>>) -> Self {
        let inner =
            Inner { writer, recorder, wake, policies: Mutex::default(), writing: tokio::sync::watch::Sender::new(0) };
        Self { inner: Arc::new(inner) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.inner.policies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The status last handed for the policy (the reflector's copy may not show it yet), and when.
    pub fn last(&self, uid: &str) -> Option<Reported> {
        self.lock().get(uid).and_then(|s| s.last.clone())
    }

    /// Writes `next` as the policy's status, after the reconcile: `previous` is the status it was built
    /// from (its conditions are what the Events compare with, unless a status handed before is still to
    /// be written). A status handed after a write failed, before a reconcile took that failure, is not
    /// written: the retry builds it again from the policy as the API server has it.
    pub fn hand(&self, policy: &TracingPolicy, previous: &TracingPolicyStatus, next: TracingPolicyStatus) {
        let uid = policy.uid().unwrap_or_default();
        let mut policies = self.lock();
        let slot = policies.entry(uid.clone()).or_default();
        if slot.failed.is_some() || slot.gone {
            return;
        }
        slot.last = Some(Reported { status: next.clone(), at: Instant::now() });
        let since = slot.next.take().map_or_else(|| previous.conditions.clone(), |skipped| skipped.since);
        slot.next = Some(Pending {
            name: policy.name_any(),
            status: next,
            since,
            regarding: policy.object_ref(&()),
            woken: ObjectRef::from_obj(policy),
        });
        if !slot.writing {
            slot.writing = true;
            self.inner.writing.send_modify(|n| *n += 1);
            tokio::spawn(self.clone().write(uid));
        }
    }

    /// Writes the policy's statuses, the newest handed each time, until none is left to write.
    async fn write(self, uid: String) {
        loop {
            let pending = {
                let mut policies = self.lock();
                let Some(slot) = policies.get_mut(&uid) else { break };
                match slot.next.take() {
                    Some(pending) => pending,
                    None => {
                        slot.writing = false;
                        if slot.gone {
                            policies.remove(&uid);
                        }
                        break;
                    }
                }
            };
            let started = Instant::now();
            let api = Api::<TracingPolicy>::all(self.inner.writer.client.clone());
            let patch =
                json!({"apiVersion": "crosstrace.dev/v1alpha1", "kind": "TracingPolicy", "status": pending.status});
            match self.inner.writer.apply_status(&api, &pending.name, patch).await {
                Ok(_) => {
                    tracing::debug!(policy = pending.name, took_us = micros(started.elapsed()), "status written");
                    for (warning, c) in conditions::events(&pending.since, &pending.status.conditions) {
                        let kind = if warning { EventType::Warning } else { EventType::Normal };
                        let note = format!("{} is {}: {}", c.type_, c.status, c.message);
                        publish(&self.inner.writer, &self.inner.recorder, &pending.regarding, kind, &c.reason, note)
                            .await;
                    }
                }
                Err(error) => {
                    warn!(policy = pending.name, %error, "could not write the status; the policy's next reconcile fails with it");
                    if let Some(slot) = self.lock().get_mut(&uid) {
                        slot.last = None;
                        slot.next = None;
                        if !slot.gone {
                            slot.failed.get_or_insert(error);
                        }
                    }
                    let _ = self.inner.wake.unbounded_send(pending.woken);
                }
            }
        }
        self.inner.writing.send_modify(|n| *n -= 1);
    }

    /// The failure of a status write of the policy since the last call; it is taken.
    pub fn failure(&self, uid: &str) -> Option<Error> {
        self.lock().get_mut(uid)?.failed.take()
    }

    /// The policy is gone: nothing more of it is written, and what is kept of it is dropped.
    pub fn forget(&self, uid: &str) {
        let mut policies = self.lock();
        match policies.get_mut(uid) {
            Some(slot) if slot.writing => {
                slot.gone = true;
                slot.next = None;
            }
            Some(_) => {
                policies.remove(uid);
            }
            None => {}
        }
    }

    /// Once no status write goes on (for tests: a reconcile returns before its status is written).
    pub async fn settled(&self) {
        let mut writing = self.inner.writing.subscribe();
        let _ = writing.wait_for(|n| *n == 0).await;
    }
}

/// Longest Event note the API server accepts (events.k8s.io/v1 refuses longer ones).
const MAX_NOTE: usize = 1024;

/// Publishes an Event about `regarding`; one that cannot be published is logged, not retried.
pub async fn publish(
    writer: &Writer,
    recorder: &Recorder,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    mut note: String,
) {
    conditions::truncate(&mut note, MAX_NOTE);
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(error) = writer.event(recorder, &event, regarding).await {
        warn!(%error, "could not publish an event");
    }
}
