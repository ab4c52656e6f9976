//! Objects the controller cannot read ([`crate::lenient`]) are reported on themselves, so that their
//! owners learn what to fix while every other object is reconciled as usual: a Warning Event, and for a
//! TracingPolicy `Ready=False` (with `Progressing`, `Degraded`) by a status apply. Once per generation:
//! relists and the status write itself (which changes the resourceVersion) do not report again.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::warn;

use crate::api::conditions::truncate;
use crate::api::{FIELD_MANAGER, TracingPolicy, TracingPolicyStatus};
use crate::layers::reasons::INVALID_OBJECT;
use crate::lenient::Unreadable;
use crate::metrics::Metrics;

use super::status;

/// Longest Event note kept (the API server refuses more than 1 kB).
const MAX_NOTE: usize = 1024;

/// Reports the unreadable objects its [`Inbox`] receives, one at a time.
pub struct Reporter {
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    received: mpsc::UnboundedReceiver<Box<Unreadable>>,
    /// The generation last reported, per uid.
    reported: HashMap<String, i64>,
}

/// Where lenient watches hand their unreadable objects to the [`Reporter`].
#[derive(Clone)]
pub struct Inbox(mpsc::UnboundedSender<Box<Unreadable>>);

impl Inbox {
    /// The `unreadable` callback of [`crate::lenient::typed`].
    pub fn sink(&self) -> impl FnMut(Box<Unreadable>) + Send + 'static {
        let sender = self.0.clone();
        // Sending fails only once the reporter has stopped, with the controller.
        move |u| drop(sender.send(u))
    }
}

impl Reporter {
    pub fn new(client: Client, recorder: Recorder, metrics: Arc<Metrics>) -> (Self, Inbox) {
        let (sender, received) = mpsc::unbounded_channel();
        (Self { client, recorder, metrics, received, reported: HashMap::new() }, Inbox(sender))
    }

    /// Reports every object received until every [`Inbox`] is gone.
    pub async fn run(mut self) {
        while let Some(u) = self.received.recv().await {
            self.report(&u).await;
        }
    }

    async fn report(&mut self, u: &Unreadable) {
        let uid = u.object.metadata.uid.clone().unwrap_or_default();
        let generation = u.object.metadata.generation.unwrap_or(0);
        if self.reported.get(&uid) == Some(&generation) {
            return;
        }
        warn!(kind = %u.kind, name = %u.name, error = %u.message(), "skipping an object that cannot be read");
        self.publish(u).await;
        if u.kind == TracingPolicy::kind(&())
            && let Err(error) = self.mark_not_ready(u, generation).await
        {
            // Not marked as reported: the next event of this object tries again.
            warn!(name = %u.name, %error, "could not write the status of a policy that cannot be read");
            return;
        }
        self.reported.insert(uid, generation);
    }

    async fn publish(&self, u: &Unreadable) {
        let mut note = format!("{}; crosstrace skips this object until it is fixed", u.message());
        truncate(&mut note, MAX_NOTE);
        let event = Event {
            type_: EventType::Warning,
            reason: INVALID_OBJECT.into(),
            note: Some(note),
            action: "Read".into(),
            secondary: None,
        };
        self.metrics.write("create", "events");
        if let Err(error) = self.recorder.publish(&event, &reference(u)).await {
            warn!(%error, "could not publish an event");
        }
    }

    /// Writes `Ready=False` with [`INVALID_OBJECT`] into the policy's status, on top of the status it
    /// has (when that can be read); nothing when it already says so.
    async fn mark_not_ready(&self, u: &Unreadable, generation: i64) -> kube::Result<()> {
        let previous =
            u.object.data.get("status").and_then(|s| serde_json::from_value::<TracingPolicyStatus>(s.clone()).ok());
        let next = status::unusable(previous.as_ref(), generation, INVALID_OBJECT, &u.message(), Timestamp::now());
        if previous.as_ref() == Some(&next) {
            return Ok(());
        }
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &ApiResource::erase::<TracingPolicy>(&()));
        let patch = json!({"apiVersion": u.api_version, "kind": u.kind, "status": next});
        self.metrics.write("apply_status", &TracingPolicy::plural(&()));
        api.patch_status(&u.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        Ok(())
    }
}

/// A reference to the unreadable object (cluster-scoped, as every crosstrace object).
fn reference(u: &Unreadable) -> ObjectReference {
    ObjectReference {
        api_version: Some(u.api_version.clone()),
        kind: Some(u.kind.clone()),
        name: Some(u.name.clone()),
        uid: u.object.metadata.uid.clone(),
        resource_version: u.object.metadata.resource_version.clone(),
        ..Default::default()
    }
}
