//! Objects the controller cannot read ([`crate::lenient`]) are reported on themselves, so that their
//! owners learn what to fix while every other object is reconciled as usual: a Warning Event, and for a
//! TracingPolicy `Ready=False` (with `Progressing`, `Degraded`) by a status apply. Once per generation:
//! relists and the status write itself (which changes the resourceVersion) do not report again.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::warn;

use crate::api::conditions::truncate;
use crate::api::{FIELD_MANAGER, TracingPolicy, TracingPolicyStatus};
use crate::layers::reasons::INVALID_OBJECT;
use crate::lenient::Unreadable;

use super::apply::{self, Writer};
use super::status;

/// Longest Event note kept (the API server refuses more than 1 kB).
const MAX_NOTE: usize = 1024;

/// Reports the unreadable objects its [`Inbox`] receives, one at a time; writes through the [`Writer`]
/// (behind the leader fence) like every other write of the controller.
pub struct Reporter {
    writer: Writer,
    recorder: Recorder,
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
    pub fn new(writer: Writer, recorder: Recorder) -> (Self, Inbox) {
        let (sender, received) = mpsc::unbounded_channel();
        (Self { writer, recorder, received, reported: HashMap::new() }, Inbox(sender))
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
        if let Err(error) = self.writer.event(&self.recorder, &event, &reference(u)).await {
            warn!(%error, "could not publish an event");
        }
    }

    /// Writes `Ready=False` with [`INVALID_OBJECT`] into the policy's status, on top of the status it
    /// has (when that can be read); nothing when it already says so.
    async fn mark_not_ready(&self, u: &Unreadable, generation: i64) -> apply::Result<()> {
        let previous =
            u.object.data.get("status").and_then(|s| serde_json::from_value::<TracingPolicyStatus>(s.clone()).ok());
        let next = status::unusable(previous.as_ref(), generation, INVALID_OBJECT, &u.message(), Timestamp::now());
        if previous.as_ref() == Some(&next) {
            return Ok(());
        }
        let api = Api::<DynamicObject>::all_with(self.writer.client.clone(), &ApiResource::erase::<TracingPolicy>(&()));
        let patch = json!({"apiVersion": u.api_version, "kind": u.kind, "status": next});
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(&patch);
        let request = api.patch_status(&u.name, &params, &patch);
        self.writer.send("apply_status", &TracingPolicy::plural(&()), request).await.map(drop)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;
    use kube::runtime::events::Reporter as EventReporter;
    use serde_json::Value;

    use super::*;
    use crate::leader::Fence;
    use crate::lenient::read;
    use crate::metrics::Metrics;
    use kube::Client;
    use std::sync::Arc;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn unreadable_policy(generation: i64) -> Box<Unreadable> {
        let raw: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "crosstrace.dev/v1alpha1",
            "kind": "TracingPolicy",
            "metadata": {"name": "wide", "uid": "u1", "generation": generation, "resourceVersion": "7"},
            "spec": {"network": {"ipfix": {"targets": ["10.0.0.5:4739"], "obsDomainId": 4_294_967_296u64}}},
        }))
        .unwrap();
        read::<TracingPolicy>(raw).unwrap_err()
    }

    /// Reports `objects` against an API server that echoes every request; returns the requests.
    async fn report_all(objects: impl IntoIterator<Item = Box<Unreadable>>) -> Vec<(String, String, Value)> {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let recorder = Recorder::new(client.clone(), EventReporter { controller: "crosstrace".into(), instance: None });
        let writer = Writer::new(client, Arc::new(Metrics::default()), Fence::open());
        let (reporter, inbox) = Reporter::new(writer, recorder);
        let server = tokio::spawn(echo(handle));
        let mut sink = inbox.sink();
        objects.into_iter().for_each(&mut sink);
        drop((sink, inbox));
        tokio::time::timeout(Duration::from_secs(1), reporter.run()).await.expect("the reporter ends with its inbox");
        tokio::time::timeout(Duration::from_secs(1), server).await.expect("in time").unwrap()
    }

    /// Answers every request by echoing its body; returns (method, path, body) of each.
    async fn echo(mut handle: Handle) -> Vec<(String, String, Value)> {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let (method, path) = (request.method().to_string(), request.uri().path().to_string());
            let bytes = request.into_body().collect().await.unwrap().to_bytes();
            send.send_response(Response::builder().body(Body::from(bytes.clone())).unwrap());
            seen.push((method, path, serde_json::from_slice(&bytes).unwrap()));
        }
        seen
    }

    #[tokio::test]
    async fn an_unreadable_policy_gets_a_warning_and_ready_false_once_per_generation() {
        let requests = report_all([unreadable_policy(2), unreadable_policy(2), unreadable_policy(3)]).await;

        // The second Event, same reason and note, counts on in the first one's series.
        let paths: Vec<String> = requests.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
        let events = "/apis/events.k8s.io/v1/namespaces/default/events";
        let status = "PATCH /apis/crosstrace.dev/v1alpha1/tracingpolicies/wide/status";
        assert_eq!(paths.len(), 4, "generation 2 once, then generation 3: {paths:#?}");
        assert_eq!(paths[0], format!("POST {events}"));
        assert!(paths[2].starts_with(&format!("PATCH {events}/wide.")), "{}", paths[2]);
        assert_eq!([paths[1].as_str(), paths[3].as_str()], [status, status]);
        let (_, _, first_event) = &requests[0];
        assert_eq!(first_event["type"], "Warning");
        assert_eq!(first_event["reason"], INVALID_OBJECT);
        assert_eq!(first_event["regarding"]["name"], "wide");
        assert!(first_event["note"].as_str().unwrap().starts_with("spec.network.ipfix.obsDomainId: invalid value"));
        let (_, _, first_status) = &requests[1];
        let ready = first_status["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready");
        let ready = ready.expect("a Ready condition");
        assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some(INVALID_OBJECT)));
        assert_eq!(ready["observedGeneration"], 2);
        assert_eq!(first_status["status"]["observedGeneration"], 2);
    }

    #[tokio::test]
    async fn a_status_that_already_says_so_is_not_written_again() {
        let mut u = unreadable_policy(2);
        let status = status::unusable(None, 2, INVALID_OBJECT, &u.message(), Timestamp::now());
        u.object.data["status"] = serde_json::to_value(status).unwrap();
        let requests = report_all([u]).await;
        let methods: Vec<&str> = requests.iter().map(|(m, _, _)| m.as_str()).collect();
        assert_eq!(methods, ["POST"], "only the Event: {requests:#?}");
    }
}
