//! `crosstrace uninstall` against a mocked API server: which requests it sends, in which order, what it
//! prints, and the one-line error naming the policies left when they outlive the timeout. (On a real
//! cluster, as the chart's pre-delete hook, it is e2e/tests/helm_test.sh's job.)

use std::time::Duration;

use crosstrace::uninstall::{self, UninstallArgs};
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const POLICIES: &str = "/apis/crosstrace.dev/v1alpha1/tracingpolicies";

/// A metadata list of policies: (name, being deleted).
fn list(policies: &[(&str, bool)]) -> Value {
    let items: Vec<Value> = policies
        .iter()
        .map(|(name, deleting)| {
            let mut metadata = json!({"name": name, "finalizers": ["crosstrace.dev/cleanup"]});
            if *deleting {
                metadata["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": metadata})
        })
        .collect();
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": items})
}

fn success() -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {}})
}

/// Answers the expected (method, path, status, reply) exchanges in order; then, if `repeat` is given,
/// answers every further request with it.
async fn serve(mut handle: Handle, expected: Vec<(Method, String, u16, Value)>, repeat: Option<Value>) {
    for (method, path, status, reply) in expected {
        let (request, send) = handle.next_request().await.expect("another request");
        assert_eq!((request.method(), request.uri().path()), (&method, path.as_str()));
        let body = Body::from(serde_json::to_vec(&reply).unwrap());
        send.send_response(Response::builder().status(status).body(body).unwrap());
    }
    if let Some(reply) = repeat {
        while let Some((request, send)) = handle.next_request().await {
            assert_eq!((request.method(), request.uri().path()), (&Method::GET, POLICIES));
            send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap());
        }
    }
}

async fn run(
    args: UninstallArgs,
    expected: Vec<(Method, String, u16, Value)>,
    repeat: Option<Value>,
) -> (anyhow::Result<()>, String) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, expected, repeat));
    let mut out = Vec::new();
    let result = uninstall::run(Client::new(service, "default"), &args, &mut out).await;
    server.abort();
    (result, String::from_utf8(out).unwrap())
}

fn args(wait: bool, timeout: u64) -> UninstallArgs {
    UninstallArgs { wait, timeout: Duration::from_secs(timeout) }
}

#[tokio::test(start_paused = true)]
async fn every_policy_is_deleted_and_waited_for_until_none_is_left() {
    let (result, out) = run(
        args(true, 60),
        vec![
            (Method::GET, POLICIES.into(), 200, list(&[("a", false), ("b", true)])),
            (Method::DELETE, format!("{POLICIES}/a"), 200, success()),
            (Method::GET, POLICIES.into(), 200, list(&[("a", true), ("b", true)])),
            (Method::GET, POLICIES.into(), 200, list(&[("b", true)])),
            (Method::GET, POLICIES.into(), 200, list(&[])),
        ],
        None,
    )
    .await;
    result.expect("done");
    assert_eq!(
        out,
        "deleting TracingPolicy a\n\
         waiting for the controller to revert and release 2: a, b\n\
         waiting for the controller to revert and release 1: b\n\
         no TracingPolicy left: crosstrace's changes are reverted\n"
    );
}

#[tokio::test(start_paused = true)]
async fn policies_left_at_the_deadline_are_named_on_one_line() {
    let (result, out) = run(
        args(true, 5),
        vec![(Method::GET, POLICIES.into(), 200, list(&[("stuck", true)]))],
        Some(list(&[("stuck", true)])),
    )
    .await;
    let error = result.expect_err("timed out").to_string();
    assert!(error.starts_with("timed out after 5s: TracingPolicies still present"), "{error}");
    assert!(error.contains("crosstrace.dev/cleanup): stuck."), "{error}");
    assert!(!error.contains('\n'));
    assert_eq!(out, "waiting for the controller to revert and release 1: stuck\n");
}

#[tokio::test(start_paused = true)]
async fn without_the_crd_there_is_nothing_to_revert() {
    let not_found = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound",
        "code": 404, "message": "the server could not find the requested resource", "metadata": {}});
    let (result, out) = run(args(true, 60), vec![(Method::GET, POLICIES.into(), 404, not_found)], None).await;
    result.expect("nothing to do");
    assert_eq!(out, "no TracingPolicy resource on this cluster: nothing to revert\n");
}

#[tokio::test(start_paused = true)]
async fn without_wait_the_policies_are_deleted_and_left_to_the_controller() {
    let (result, out) = run(
        args(false, 60),
        vec![
            (Method::GET, POLICIES.into(), 200, list(&[("a", false)])),
            (Method::DELETE, format!("{POLICIES}/a"), 200, success()),
        ],
        None,
    )
    .await;
    result.expect("done");
    assert_eq!(
        out,
        "deleting TracingPolicy a\n1 TracingPolicies deleting; the controller reverts them (not waiting)\n"
    );
}
