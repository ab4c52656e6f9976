//! Request sequences against a mocked API server: what the edge and workload layers write, in which
//! order, with which patch type and field manager; and that nothing at all goes out behind a closed
//! leader fence, even a retry after a 429. (Behaviour on a real API server is the e2e suite's job.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crosstrace::api::WorkloadKind;
use crosstrace::controller::apply::{self, Writer};
use crosstrace::layers::ObjectKey;
use crosstrace::layers::ingress::{Action, ContainerImage, Record};
use crosstrace::leader::Fence;
use crosstrace::metrics::Metrics;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mocked() -> (Writer, Handle, Arc<Metrics>) {
    mocked_behind(Fence::open())
}

fn mocked_behind(fence: Fence) -> (Writer, Handle, Arc<Metrics>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let metrics = Arc::new(Metrics::default());
    let writer = Writer::new(Client::new(service, "default"), metrics.clone(), fence);
    (writer, handle, metrics)
}

/// One expected request: method, path, query fragment, content type; answered with `reply`.
struct Expect {
    method: Method,
    path: &'static str,
    query: &'static str,
    content_type: &'static str,
    reply: Value,
}

async fn serve(mut handle: Handle, expected: Vec<Expect>) -> Vec<Value> {
    let mut bodies = Vec::new();
    for e in expected {
        let (request, send) = handle.next_request().await.expect("another request");
        assert_eq!(request.method(), e.method, "{}", request.uri());
        assert_eq!(request.uri().path(), e.path);
        let query = request.uri().query().unwrap_or_default().to_string();
        assert!(query.contains(e.query), "query {query} lacks {}", e.query);
        if !e.content_type.is_empty() {
            assert_eq!(request.headers()["content-type"], e.content_type, "{}", e.path);
        }
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        bodies.push(if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() });
        send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&e.reply).unwrap())).unwrap());
    }
    bodies
}

/// Runs the edge layer's actions against a mocked API server that expects `expected`, in order,
/// each exchange within a second; returns the request bodies.
async fn run(actions: &[Action], expected: Vec<Expect>) -> (Vec<Value>, Arc<Metrics>) {
    let (writer, handle, metrics) = mocked();
    let server = tokio::spawn(serve(handle, expected));
    tokio::time::timeout(Duration::from_secs(1), apply::ingress(&writer, actions, "crosstrace-system"))
        .await
        .expect("in time")
        .expect("written");
    let bodies = tokio::time::timeout(Duration::from_secs(1), server).await.expect("in time");
    (bodies.expect("every request as expected"), metrics)
}

fn record() -> Record {
    Record {
        policy: "storefront".into(),
        kind: WorkloadKind::Deployment,
        deployment: ObjectKey::new("ingress-nginx", "c"),
        config_map: ObjectKey::new("ingress-nginx", "ingress-nginx-controller"),
        config_map_existed: true,
        original_data: BTreeMap::from([
            ("otel-sampler-ratio".to_string(), Some("0.5".to_string())),
            ("enable-opentelemetry".to_string(), None),
        ]),
        original_image: Some(ContainerImage { container: "controller".into(), image: "controller:v1.12.1".into() }),
        rollout_started: Some(1),
        applied_image: Some("controller:v1.12.1-otel".into()),
        applied_at_generation: None,
        image_converged: false,
        yielded_image: None,
    }
}

fn deployment_reply() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "c", "namespace": "ingress-nginx"}})
}

fn config_map_reply(data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ingress-nginx-controller", "namespace": "ingress-nginx"}, "data": data})
}

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/ingress-nginx/deployments/c";
const LEDGER: &str = "/api/v1/namespaces/crosstrace-system/configmaps/crosstrace-ingress-records";
const UID: &str = "uid-of-c";

fn ledger_reply() -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "crosstrace-ingress-records", "namespace": "crosstrace-system"}})
}

/// The read of the ledger that comes before each write of an entry.
fn ledger_get() -> Expect {
    Expect { method: Method::GET, path: LEDGER, query: "", content_type: "", reply: ledger_reply() }
}

/// A merge patch of the ledger entry of Deployment `c`.
fn ledger_merge() -> Expect {
    Expect {
        method: Method::PATCH,
        path: LEDGER,
        query: "fieldManager=crosstrace",
        content_type: "application/merge-patch+json",
        reply: ledger_reply(),
    }
}
const CONFIG_MAP: &str = "/api/v1/namespaces/ingress-nginx/configmaps/ingress-nginx-controller";

#[tokio::test]
async fn apply_records_first_then_applies_config_then_image() {
    let deployment = ObjectKey::new("ingress-nginx", "c");
    let data = BTreeMap::from([("enable-opentelemetry".to_string(), "true".to_string())]);
    let actions = vec![
        Action::Record { controller: deployment.clone(), uid: UID.into(), record: record() },
        Action::Label { kind: WorkloadKind::Deployment, controller: deployment.clone(), policy: "storefront".into() },
        Action::ApplyConfig { config_map: record().config_map, data, policy: "storefront".into() },
        Action::ApplyImage {
            kind: WorkloadKind::Deployment,
            controller: deployment,
            uid: UID.into(),
            image: ContainerImage { container: "controller".into(), image: "controller:otel".into() },
            record: record(),
        },
    ];
    let (bodies, metrics) = run(
        &actions,
        vec![
            ledger_get(),
            ledger_merge(),
            Expect {
                method: Method::PATCH,
                path: DEPLOYMENT,
                query: "fieldManager=crosstrace",
                content_type: "application/merge-patch+json",
                reply: deployment_reply(),
            },
            Expect {
                method: Method::PATCH,
                path: CONFIG_MAP,
                query: "force=true",
                content_type: "application/apply-patch+yaml",
                reply: config_map_reply(json!({})),
            },
            ledger_get(),
            ledger_merge(),
            Expect {
                method: Method::PATCH,
                path: DEPLOYMENT,
                query: "force=true",
                content_type: "application/apply-patch+yaml",
                reply: deployment_reply(),
            },
        ],
    )
    .await;

    let recorded: Record = serde_json::from_str(bodies[1]["data"][UID].as_str().unwrap()).unwrap();
    assert_eq!(recorded, record(), "the originals go to the ledger, keyed by UID, before anything changes");
    assert_eq!(bodies[2]["metadata"]["labels"]["crosstrace.dev/ingress-policy"], "storefront");
    assert_eq!(
        bodies[2]["metadata"]["annotations"],
        json!({"crosstrace.dev/ingress-rolled-back": null}),
        "no record on the Deployment"
    );
    assert_eq!(bodies[3]["data"]["enable-opentelemetry"], "true");
    assert_eq!(bodies[3]["metadata"]["labels"]["crosstrace.dev/ingress-policy"], "storefront");
    assert!(bodies[5]["data"][UID].is_string(), "the updated record before the image");
    assert_eq!(
        bodies[6]["spec"]["template"]["spec"]["containers"],
        json!([{"name": "controller", "image": "controller:otel"}])
    );
    assert!(bodies[6]["metadata"].get("annotations").is_none(), "no record on the Deployment");
    let writes: f64 = metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("crosstrace_api_writes_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(writes, 5.0, "every write is counted");
}

#[tokio::test]
async fn revert_restores_config_map_then_deployment() {
    let r = record();
    let actions = vec![
        Action::RestoreConfig { config_map: r.config_map.clone(), data: r.original_data.clone(), delete: false },
        Action::RestoreController {
            kind: WorkloadKind::Deployment,
            controller: ObjectKey::new("ingress-nginx", "c"),
            uid: UID.into(),
            image: r.original_image.clone(),
            keep: None,
            rolled_back: None,
        },
    ];
    let current =
        json!({"otel-sampler-ratio": "0.25", "enable-opentelemetry": "true", "use-forwarded-headers": "true"});
    let (bodies, _) = run(
        &actions,
        vec![
            Expect {
                method: Method::GET,
                path: CONFIG_MAP,
                query: "",
                content_type: "",
                reply: config_map_reply(current),
            },
            Expect {
                method: Method::PATCH,
                path: CONFIG_MAP,
                query: "fieldManager=crosstrace",
                content_type: "application/merge-patch+json",
                reply: config_map_reply(json!({})),
            },
            Expect { method: Method::GET, path: DEPLOYMENT, query: "", content_type: "", reply: deployment_reply() },
            Expect {
                method: Method::PATCH,
                path: DEPLOYMENT,
                query: "fieldManager=crosstrace",
                content_type: "application/strategic-merge-patch+json",
                reply: deployment_reply(),
            },
            ledger_get(),
            ledger_merge(),
        ],
    )
    .await;
    assert_eq!(
        bodies[1]["data"],
        json!({"otel-sampler-ratio": "0.5", "enable-opentelemetry": null}),
        "user value back, our key removed"
    );
    assert_eq!(bodies[1]["metadata"]["labels"]["crosstrace.dev/ingress-policy"], Value::Null);
    assert_eq!(
        bodies[3]["spec"]["template"]["spec"]["containers"],
        json!([{"name": "controller", "image": "controller:v1.12.1"}])
    );
    assert_eq!(bodies[5]["data"][UID], Value::Null, "the record goes last, from the ledger");
}

#[tokio::test]
async fn a_config_map_the_operator_created_is_deleted_on_revert() {
    let r = record();
    let only_ours = json!({"otel-sampler-ratio": "0.25", "enable-opentelemetry": "true"});
    let actions =
        vec![Action::RestoreConfig { config_map: r.config_map.clone(), data: r.original_data.clone(), delete: true }];
    let status = json!({"apiVersion": "v1", "kind": "Status", "status": "Success"});
    let _ = run(
        &actions,
        vec![
            Expect {
                method: Method::GET,
                path: CONFIG_MAP,
                query: "",
                content_type: "",
                reply: config_map_reply(only_ours),
            },
            Expect { method: Method::DELETE, path: CONFIG_MAP, query: "", content_type: "", reply: status },
        ],
    )
    .await;
}

// ---- the workload layer's paced writes ----

use crosstrace::controller::apply::{Pace, Turn, Written};
use crosstrace::controller::limit::WriteLimit;
use crosstrace::layers::workloads::Action as WorkloadAction;

fn inject(name: &str) -> WorkloadAction {
    WorkloadAction::Inject {
        kind: WorkloadKind::Deployment,
        workload: ObjectKey::new("shop", name),
        patch: json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}}),
    }
}

fn collector_config(namespace: &str) -> WorkloadAction {
    WorkloadAction::ApplyCollectorConfig {
        namespace: namespace.into(),
        name: "crosstrace-otel-storefront".into(),
        data: BTreeMap::from([("collector.yaml".to_string(), "receivers: {}".to_string())]),
        policy: "storefront".into(),
        policy_uid: "uid-1".into(),
    }
}

/// The next request, or `None` when none arrives within 200 ms.
async fn next_within(handle: &mut Handle) -> Option<(Request<Body>, tower_test::mock::SendResponse<Response<Body>>)> {
    tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await.ok().flatten()
}

fn ok(send: tower_test::mock::SendResponse<Response<Body>>, reply: &Value) {
    send.send_response(Response::builder().body(Body::from(serde_json::to_vec(reply).unwrap())).unwrap());
}

/// [`apply::workloads`], then the writes it left in flight (as a reconcile's tails run on).
async fn all_written(writer: &Writer, actions: &[WorkloadAction], pace: Pace) -> Written {
    let (written, tail) = apply::workloads(writer, actions.to_vec(), pace, &(), &Turn::alone()).await.expect("written");
    if let Some(tail) = tail {
        tail.await.expect("the writes left in flight made");
    }
    written
}

#[tokio::test]
async fn injections_are_written_with_at_most_the_write_concurrency_in_flight() {
    let (writer, mut handle, metrics) = mocked();
    let actions: Vec<_> = ["a", "b", "c", "d", "e"].into_iter().map(inject).collect();
    let task = tokio::spawn(async move { all_written(&writer, &actions, Pace::new(2, Duration::from_secs(60))).await });
    let reply = deployment_reply();
    let first = next_within(&mut handle).await.expect("a first write");
    let second = next_within(&mut handle).await.expect("a second write at the same time");
    assert_eq!(first.0.uri().path(), "/apis/apps/v1/namespaces/shop/deployments/a");
    assert_eq!(second.0.uri().path(), "/apis/apps/v1/namespaces/shop/deployments/b");
    assert!(second.0.uri().query().unwrap_or_default().contains("fieldManager=crosstrace"));
    assert!(next_within(&mut handle).await.is_none(), "a third write while two are in flight");
    ok(first.1, &reply);
    let mut paths = vec![];
    let third = next_within(&mut handle).await.expect("the third write once one is answered");
    paths.push(third.0.uri().path().to_string());
    ok(second.1, &reply);
    ok(third.1, &reply);
    while let Some((request, send)) = next_within(&mut handle).await {
        paths.push(request.uri().path().to_string());
        ok(send, &reply);
    }
    assert_eq!(
        paths,
        ["c", "d", "e"].map(|n| format!("/apis/apps/v1/namespaces/shop/deployments/{n}")),
        "the rest in plan order"
    );
    let written = tokio::time::timeout(Duration::from_secs(1), task).await.expect("in time").expect("no panic");
    assert_eq!(written, Written { done: 5, of: 5 });
    assert!(written.complete());
    let text = metrics.encode();
    assert!(text.contains("crosstrace_api_writes_total{verb=\"apply\",resource=\"deployments\"} 5"), "{text}");
}

#[tokio::test]
async fn reconciles_share_one_write_limit_and_a_waiting_one_starts_as_soon_as_a_write_ends() {
    let (writer, mut handle, _) = mocked();
    let limit = Arc::new(WriteLimit::fixed(2));
    let pace = Pace::within(&limit, Duration::from_secs(60));
    let spawn = |names: [&'static str; 2]| {
        let (writer, pace) = (writer.clone(), pace.clone());
        let actions: Vec<_> = names.into_iter().map(inject).collect();
        tokio::spawn(async move { all_written(&writer, &actions, pace).await })
    };
    let one = spawn(["a", "b"]);
    let first = next_within(&mut handle).await.expect("a first write");
    let second = next_within(&mut handle).await.expect("a second write");
    let other = spawn(["c", "d"]);
    assert!(next_within(&mut handle).await.is_none(), "another reconcile's write while the limit is full");
    let reply = deployment_reply();
    ok(first.1, &reply);
    let (third, send) = next_within(&mut handle).await.expect("a write once one ended");
    assert!(next_within(&mut handle).await.is_none(), "still two in flight at most");
    ok(second.1, &reply);
    ok(send, &reply);
    let (fourth, send) = next_within(&mut handle).await.expect("the last write");
    ok(send, &reply);
    let mut paths = [first.0, second.0, third, fourth].map(|r| r.uri().path().rsplit('/').next().unwrap().to_string());
    paths.sort();
    assert_eq!(paths, ["a", "b", "c", "d"]);
    for task in [one, other] {
        let written = tokio::time::timeout(Duration::from_secs(1), task).await.expect("in time").expect("no panic");
        assert_eq!(written, Written { done: 2, of: 2 });
    }
    assert_eq!(limit.limit(), 2);
    assert!(limit.try_start().is_some(), "every place given back");
}

#[tokio::test]
async fn every_collector_config_is_written_before_the_first_injection() {
    let (writer, mut handle, _) = mocked();
    let actions = vec![collector_config("shop"), collector_config("web"), inject("a")];
    let task = tokio::spawn(async move { all_written(&writer, &actions, Pace::new(8, Duration::from_secs(60))).await });
    let one = next_within(&mut handle).await.expect("a ConfigMap");
    let two = next_within(&mut handle).await.expect("the other ConfigMap at the same time");
    for (request, _) in [&one, &two] {
        assert!(request.uri().path().starts_with("/api/v1/namespaces/"), "{}", request.uri());
        assert!(request.uri().path().ends_with("/configmaps/crosstrace-otel-storefront"), "{}", request.uri());
    }
    assert!(next_within(&mut handle).await.is_none(), "an injection before its ConfigMap is written");
    ok(one.1, &config_map_reply(json!({})));
    assert!(next_within(&mut handle).await.is_none(), "an injection before every ConfigMap is written");
    ok(two.1, &config_map_reply(json!({})));
    let (request, send) = next_within(&mut handle).await.expect("the injection");
    assert_eq!(request.uri().path(), "/apis/apps/v1/namespaces/shop/deployments/a");
    ok(send, &deployment_reply());
    let written = tokio::time::timeout(Duration::from_secs(1), task).await.expect("in time").expect("no panic");
    assert_eq!(written, Written { done: 3, of: 3 });
}

#[tokio::test]
async fn a_used_up_write_budget_still_makes_one_write_and_hands_the_rest_to_the_writer() {
    let (writer, mut handle, metrics) = mocked();
    let actions: Vec<_> = ["a", "b", "c"].into_iter().map(inject).collect();
    let limit = Arc::new(WriteLimit::fixed(1));
    let task = tokio::spawn(async move {
        apply::workloads(&writer, actions, Pace::within(&limit, Duration::ZERO), &(), &Turn::alone()).await
    });
    let result = tokio::time::timeout(Duration::from_secs(1), task).await.expect("in time").expect("no panic");
    let (written, tail) = result.expect("nothing failed");
    assert_eq!(written, Written { done: 3, of: 3 }, "returned before its write is answered, the rest handed on");
    let tail = tokio::spawn(tail.expect("the writer"));
    for name in ["a", "b", "c"] {
        let (request, send) = next_within(&mut handle).await.expect("every write, one after the other");
        assert_eq!(request.uri().path(), format!("/apis/apps/v1/namespaces/shop/deployments/{name}"));
        assert!(next_within(&mut handle).await.is_none(), "one in flight at once");
        ok(send, &deployment_reply());
    }
    tokio::time::timeout(Duration::from_secs(1), tail)
        .await
        .expect("the writer ends once everything is answered")
        .expect("no panic")
        .expect("the writes made");
    assert!(metrics.encode().contains("crosstrace_api_writes_total{verb=\"apply\",resource=\"deployments\"} 3"));
}

#[tokio::test]
async fn a_reconcile_taking_the_turn_over_stops_the_writer_and_learns_what_it_touched_meanwhile() {
    let (writer, mut handle, _) = mocked();
    let tails = apply::Tails::default();
    let first = tails.mark("uid");
    let (turn, touched) = tails.take_over("uid", first, 1, Duration::ZERO);
    assert!(touched.is_empty());
    let actions: Vec<_> = ["a", "b", "c", "d"].into_iter().map(inject).collect();
    let limit = Arc::new(WriteLimit::fixed(1));
    let (written, tail) =
        apply::workloads(&writer, actions, Pace::within(&limit, Duration::ZERO), &(), &turn).await.unwrap();
    assert_eq!(written, Written { done: 4, of: 4 });
    let tail = tokio::spawn(tail.expect("the writer"));
    let (_, send) = next_within(&mut handle).await.expect("a");
    ok(send, &deployment_reply());
    // The next reconcile begins (its mark), while b is written; it takes the turn over once it has planned.
    let (_, send) = next_within(&mut handle).await.expect("b");
    let next = tails.mark("uid");
    let (_, c) = {
        ok(send, &deployment_reply());
        next_within(&mut handle).await.expect("c, started before the turn is taken over")
    };
    let (_, touched) = tails.take_over("uid", next, 1, Duration::ZERO);
    let key = |name: &str| (Some(WorkloadKind::Deployment), ObjectKey::new("shop", name));
    assert_eq!(touched, [key("b"), key("c")].into_iter().collect(), "b answered and c started since the mark");
    ok(c, &deployment_reply());
    assert!(next_within(&mut handle).await.is_none(), "d is the next reconcile's: the writer starts nothing more");
    tokio::time::timeout(Duration::from_secs(1), tail).await.expect("in time").expect("no panic").expect("made");
    // A writer whose reconcile failed before taking the turn over starts nothing more either.
    let (turn, _) = tails.take_over("uid", tails.mark("uid"), 1, Duration::ZERO);
    let actions: Vec<_> = ["e", "f"].into_iter().map(inject).collect();
    let (_, tail) = apply::workloads(&writer, actions, Pace::within(&limit, Duration::ZERO), &(), &turn).await.unwrap();
    let tail = tokio::spawn(tail.expect("the writer"));
    let (_, send) = next_within(&mut handle).await.expect("e");
    tails.stop("uid");
    ok(send, &deployment_reply());
    assert!(next_within(&mut handle).await.is_none(), "f is not written");
    tokio::time::timeout(Duration::from_secs(1), tail).await.expect("in time").expect("no panic").expect("made");
}

#[tokio::test]
async fn writes_unanswered_when_the_budget_ends_run_on_and_the_tail_ends_with_the_first_failure() {
    let (writer, mut handle, _) = mocked();
    let actions = vec![inject("a"), inject("b")];
    let task = tokio::spawn({
        let writer = writer.clone();
        async move {
            apply::workloads(&writer, actions, Pace::new(8, Duration::from_millis(100)), &(), &Turn::alone())
                .await
                .expect("written")
        }
    });
    // Both have started and are not answered when the budget ends: the reconcile goes on without
    // waiting for the API server (each write is noted in the stores as it starts).
    let (written, tail) = tokio::time::timeout(Duration::from_secs(1), task).await.expect("in time").expect("no panic");
    assert_eq!(written, Written { done: 2, of: 2 });
    let tail = tokio::spawn(tail.expect("the injections left in flight"));
    let (first, second) = (next_within(&mut handle).await.expect("a"), next_within(&mut handle).await.expect("b"));
    let refused = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "denied", "reason": "Forbidden", "code": 403});
    first.1.send_response(
        Response::builder().status(403).body(Body::from(serde_json::to_vec(&refused).unwrap())).unwrap(),
    );
    ok(second.1, &deployment_reply());
    let result = tokio::time::timeout(Duration::from_secs(1), tail).await.expect("in time").expect("no panic");
    assert!(matches!(result, Err(apply::Error::Kube(kube::Error::Api(ref e))) if e.code == 403), "{result:?}");
    // Answered within the budget: nothing runs on.
    let actions = vec![inject("c")];
    let task = tokio::spawn(async move {
        apply::workloads(&writer, actions, Pace::new(8, Duration::from_secs(60)), &(), &Turn::alone())
            .await
            .expect("written")
    });
    let (_, send) = next_within(&mut handle).await.expect("c");
    ok(send, &deployment_reply());
    let (written, tail) = tokio::time::timeout(Duration::from_secs(1), task).await.expect("in time").expect("no panic");
    assert_eq!(written, Written { done: 1, of: 1 });
    assert!(tail.is_none(), "nothing left in flight");
}

#[tokio::test]
async fn behind_its_own_writes_a_reconcile_waits_for_a_place_only_within_its_budget() {
    let (writer, mut handle, _) = mocked();
    let limit = Arc::new(WriteLimit::fixed(1));
    let held = limit.try_start().expect("the only place, held by a write in flight");
    let pace = Pace::within(&limit, Duration::from_millis(50));
    let actions: Vec<_> = ["a", "b"].into_iter().map(inject).collect();
    let started = std::time::Instant::now();
    let (written, tail) =
        apply::workloads(&writer, actions.clone(), pace.clone().behind_own_writes(), &(), &Turn::alone())
            .await
            .unwrap();
    assert_eq!(written, Written { done: 2, of: 2 }, "nothing started: all handed to the writer");
    assert!(started.elapsed() < Duration::from_secs(1), "returned at the budget's end: {:?}", started.elapsed());
    // (The writer, left to run, would wait for the place: here it is dropped, its writes unstarted.)
    drop(tail.expect("the writer, which would wait for a place"));
    assert!(next_within(&mut handle).await.is_none(), "no request while the place is held");
    // Without writes of its own in flight, the first write waits for the place past the budget.
    let task =
        tokio::spawn(
            async move { apply::workloads(&writer, actions, pace, &(), &Turn::alone()).await.expect("written") },
        );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!task.is_finished(), "the first write waits for a place");
    drop(held);
    let (written, tail) = tokio::time::timeout(Duration::from_secs(1), task).await.expect("in time").expect("no panic");
    assert_eq!(written, Written { done: 2, of: 2 }, "a started once a place was free; the budget had ended");
    let tail = tokio::spawn(tail.expect("a's write in flight and b, handed to the writer"));
    for name in ["a", "b"] {
        let (request, send) = next_within(&mut handle).await.expect("a's write, then b's");
        assert_eq!(request.uri().path(), format!("/apis/apps/v1/namespaces/shop/deployments/{name}"));
        ok(send, &deployment_reply());
    }
    tokio::time::timeout(Duration::from_secs(1), tail).await.expect("in time").expect("no panic").expect("made");
}

#[tokio::test]
async fn the_first_failed_write_stops_the_rest() {
    let (writer, mut handle, _) = mocked();
    let actions: Vec<_> = ["a", "b", "c"].into_iter().map(inject).collect();
    let task = tokio::spawn(async move {
        apply::workloads(&writer, actions, Pace::new(1, Duration::from_secs(60)), &(), &Turn::alone()).await
    });
    let (_, send) = next_within(&mut handle).await.expect("the first write");
    let refused = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "denied", "reason": "Forbidden", "code": 403});
    send.send_response(
        Response::builder().status(403).body(Body::from(serde_json::to_vec(&refused).unwrap())).unwrap(),
    );
    let result = tokio::time::timeout(Duration::from_secs(1), task).await.expect("in time").expect("no panic");
    let result = result.map(|(written, _)| written);
    assert!(matches!(result, Err(apply::Error::Kube(kube::Error::Api(ref e))) if e.code == 403), "{result:?}");
    assert!(next_within(&mut handle).await.is_none(), "no write after the failure");
}

#[tokio::test]
async fn a_write_dropped_in_flight_is_no_longer_taken_for_one_in_flight() {
    use crosstrace::layers::stores::Stores;
    use kube::runtime::reflector;
    let (writer, mut handle, _) = mocked();
    let stores = Arc::new(Stores::new(
        reflector::store().0,
        reflector::store().0,
        reflector::store().0,
        reflector::store().0,
        reflector::store().0,
        reflector::store().0,
    ));
    let notes = Some(stores.writes_of("storefront"));
    // c waits for a place: the reconcile is still making its writes when a's fails.
    let actions: Vec<_> = ["a", "b", "c"].into_iter().map(inject).collect();
    let task = tokio::spawn(async move {
        apply::workloads(&writer, actions, Pace::new(2, Duration::from_secs(60)), &notes, &Turn::alone())
            .await
            .map(|(w, _)| w)
    });
    let first = next_within(&mut handle).await.expect("a's write");
    let _second = next_within(&mut handle).await.expect("b's write, at the same time");
    let (kind, a, b) = (WorkloadKind::Deployment, ObjectKey::new("shop", "a"), ObjectKey::new("shop", "b"));
    let writing = |policy: &str, key: &ObjectKey| stores.writing_of(policy).contains(&(kind, key.clone()));
    assert!(writing("storefront", &a) && writing("storefront", &b));
    assert!(!writing("other", &a), "in flight for the policy that writes it");
    let refused = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "denied", "reason": "Forbidden", "code": 403});
    first.1.send_response(
        Response::builder().status(403).body(Body::from(serde_json::to_vec(&refused).unwrap())).unwrap(),
    );
    let result = tokio::time::timeout(Duration::from_secs(1), task).await.expect("in time").expect("no panic");
    assert!(result.is_err(), "{result:?}");
    assert!(!writing("storefront", &a), "a's write was answered");
    assert!(!writing("storefront", &b), "b's write was dropped with the reconcile: not in flight");
}

// ---- the leader fence ----

use std::time::Instant;

fn writes_counted(metrics: &Metrics) -> f64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("crosstrace_api_writes_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// A fence that was renewed long ago and has closed since (a replica resumed after being stopped).
fn lapsed() -> Fence {
    let fence = Fence::closed();
    fence.renewed(Instant::now(), Duration::from_millis(30), Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(30));
    fence
}

#[tokio::test]
async fn a_replica_whose_fence_closed_sends_no_request_of_a_batch() {
    let (writer, mut handle, metrics) = mocked_behind(lapsed());
    let actions = vec![collector_config("shop"), inject("a"), inject("b")];
    let result = apply::workloads(&writer, actions, Pace::new(8, Duration::from_secs(60)), &(), &Turn::alone()).await;
    let result = result.map(|(written, _)| written);
    assert!(matches!(result, Err(apply::Error::Fenced { verb: "apply", .. })), "{result:?}");
    assert!(next_within(&mut handle).await.is_none(), "no request reached the API server");
    assert_eq!(writes_counted(&metrics), 0.0, "nothing counted as written");
}

#[tokio::test]
async fn a_replica_whose_fence_closed_neither_patches_nor_deletes() {
    let (writer, mut handle, _) = mocked_behind(lapsed());
    let r = record();
    // (Record and RestoreController read first, reads the fence does not stop: start with a write.)
    let edge = vec![
        Action::Label {
            kind: WorkloadKind::Deployment,
            controller: ObjectKey::new("ingress-nginx", "c"),
            policy: "storefront".into(),
        },
        Action::Record { controller: ObjectKey::new("ingress-nginx", "c"), uid: UID.into(), record: r.clone() },
    ];
    assert!(matches!(
        apply::ingress(&writer, &edge, "crosstrace-system").await,
        Err(apply::Error::Fenced { verb: "patch", .. })
    ));
    let config_maps = kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(writer.client.clone(), "shop");
    assert!(matches!(writer.delete(&config_maps, "x").await, Err(apply::Error::Fenced { verb: "delete", .. })));
    assert!(next_within(&mut handle).await.is_none(), "no request reached the API server");
}

/// A writer whose client retries as kube's default client does (429, 503, 504; `Retry-After`).
fn mocked_with_kube_retry(fence: Fence) -> (Writer, Handle) {
    use tower::Layer;
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let retrying = tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()).layer(service);
    (Writer::new(Client::new(retrying, "default"), Arc::new(Metrics::default()), fence), handle)
}

fn too_many_requests(retry_after_seconds: u32) -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "Too many requests, please try again later.", "reason": "TooManyRequests", "code": 429});
    Response::builder()
        .status(429)
        .header("Retry-After", retry_after_seconds.to_string())
        .body(Body::from(serde_json::to_vec(&status).unwrap()))
        .unwrap()
}

#[tokio::test]
async fn a_429_is_retried_after_the_api_server_s_retry_after() {
    let (writer, mut handle) = mocked_with_kube_retry(Fence::open());
    let write = tokio::spawn(async move {
        let api = kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(writer.client.clone(), "shop");
        writer.apply(&api, "a", json!({"apiVersion": "apps/v1", "kind": "Deployment"})).await.map(drop)
    });
    let (_, send) = next_within(&mut handle).await.expect("the write");
    let throttled = Instant::now();
    send.send_response(too_many_requests(1));
    let (request, send) =
        tokio::time::timeout(Duration::from_secs(3), handle.next_request()).await.expect("retried").expect("a request");
    assert!(throttled.elapsed() >= Duration::from_millis(950), "retried after {:?}", throttled.elapsed());
    assert_eq!(request.uri().path(), "/apis/apps/v1/namespaces/shop/deployments/a");
    ok(send, &deployment_reply());
    write.await.unwrap().expect("written on the retry");
}

#[tokio::test]
async fn no_retry_goes_out_once_the_fence_has_closed_during_a_retry_after() {
    let fence = Fence::closed();
    // Open for 500 ms: the API server's Retry-After of 1 s ends after the fence.
    fence.renewed(Instant::now(), Duration::from_millis(600), Duration::from_millis(100));
    let (writer, mut handle) = mocked_with_kube_retry(fence);
    let write = tokio::spawn(async move {
        let api = kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(writer.client.clone(), "shop");
        writer.apply(&api, "a", json!({"apiVersion": "apps/v1", "kind": "Deployment"})).await.map(drop)
    });
    let (_, send) = next_within(&mut handle).await.expect("the write, while the fence is open");
    send.send_response(too_many_requests(1));
    let result = tokio::time::timeout(Duration::from_secs(2), write).await.expect("in time").unwrap();
    assert!(matches!(result, Err(apply::Error::Fenced { .. })), "{result:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), handle.next_request()).await.ok().flatten().is_none(),
        "the retry was never sent"
    );
}

mod gateway_layer {
    //! The gateway layer's writes: its record first, crosstrace's own objects applied, others' objects
    //! merge-patched only at the version observed, the Gateway patched in its parametersRef alone.

    use super::*;
    use crosstrace::layers::gateway::{Action, Kind, Ref};

    const GATEWAY_LEDGER: &str = "/api/v1/namespaces/crosstrace-system/configmaps/crosstrace-gateway-records";
    const GATEWAY: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/infra/gateways/public";

    fn object(kind: &str, name: &str) -> Value {
        let api_version = if kind == "ConfigMap" { "v1" } else { "x/v1" };
        json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": "infra"}})
    }

    fn record() -> crosstrace::layers::gateway::Record {
        serde_json::from_value(json!({"policy": "edge", "gateway": {"namespace": "infra", "name": "public"}, "revision": "r1", "since": 1}))
            .unwrap()
    }

    async fn run(actions: &[Action], expected: Vec<Expect>) -> Vec<Value> {
        let (writer, handle, _) = mocked();
        let server = tokio::spawn(serve(handle, expected));
        tokio::time::timeout(Duration::from_secs(1), apply::gateway(&writer, actions, "crosstrace-system"))
            .await
            .expect("in time")
            .expect("written");
        tokio::time::timeout(Duration::from_secs(1), server).await.expect("in time").expect("as expected")
    }

    #[tokio::test]
    async fn a_revision_is_recorded_then_applied_merged_and_pointed_at() {
        let own = Ref::new(Kind::EnvoyProxy, "infra", "crosstrace-public");
        let owners = Ref::new(Kind::EnvoyProxy, "infra", "custom");
        let actions = vec![
            Action::Record { uid: "uid-public".into(), record: Some(record()) },
            Action::Apply {
                target: own,
                body: json!({"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyProxy", "spec": {}}),
            },
            Action::Patch {
                target: owners,
                patch: json!({"spec": {"telemetry": {"tracing": {"samplingRate": null}}}}),
                resource_version: Some("42".into()),
            },
            Action::Patch {
                target: Ref::new(Kind::Gateway, "infra", "public"),
                patch: json!({"spec": {"infrastructure": {"parametersRef": {"name": "crosstrace-public"}}}}),
                resource_version: None,
            },
        ];
        let merge = "application/merge-patch+json";
        let bodies = run(
            &actions,
            vec![
                Expect {
                    method: Method::GET,
                    path: GATEWAY_LEDGER,
                    query: "",
                    content_type: "",
                    reply: object("ConfigMap", "l"),
                },
                Expect {
                    method: Method::PATCH,
                    path: GATEWAY_LEDGER,
                    query: "fieldManager=crosstrace",
                    content_type: merge,
                    reply: object("ConfigMap", "l"),
                },
                Expect {
                    method: Method::PATCH,
                    path: "/apis/gateway.envoyproxy.io/v1alpha1/namespaces/infra/envoyproxies/crosstrace-public",
                    query: "force=true",
                    content_type: "application/apply-patch+yaml",
                    reply: object("EnvoyProxy", "crosstrace-public"),
                },
                Expect {
                    method: Method::PATCH,
                    path: "/apis/gateway.envoyproxy.io/v1alpha1/namespaces/infra/envoyproxies/custom",
                    query: "fieldManager=crosstrace",
                    content_type: merge,
                    reply: object("EnvoyProxy", "custom"),
                },
                Expect {
                    method: Method::PATCH,
                    path: GATEWAY,
                    query: "fieldManager=crosstrace",
                    content_type: merge,
                    reply: object("Gateway", "public"),
                },
            ],
        )
        .await;
        let recorded: crosstrace::layers::gateway::Record =
            serde_json::from_str(bodies[1]["data"]["uid-public"].as_str().unwrap()).unwrap();
        assert_eq!(recorded, record(), "the record goes to the gateway ledger, keyed by UID, first");
        assert_eq!(bodies[3]["metadata"]["resourceVersion"], "42", "the owner's object only as observed");
        assert_eq!(bodies[3]["spec"]["telemetry"]["tracing"]["samplingRate"], Value::Null);
        assert!(bodies[4].get("metadata").is_none(), "the Gateway's patch carries its parametersRef alone");
        assert_eq!(bodies[4]["spec"]["infrastructure"]["parametersRef"]["name"], "crosstrace-public");
    }

    #[tokio::test]
    async fn a_revert_deletes_what_crosstrace_created_and_removes_the_record_last() {
        let actions = vec![
            Action::Delete { target: Ref::new(Kind::EnvoyProxy, "infra", "crosstrace-public") },
            Action::Record { uid: "uid-public".into(), record: None },
        ];
        let bodies = run(
            &actions,
            vec![
                Expect {
                    method: Method::DELETE,
                    path: "/apis/gateway.envoyproxy.io/v1alpha1/namespaces/infra/envoyproxies/crosstrace-public",
                    query: "",
                    content_type: "",
                    reply: json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                },
                Expect {
                    method: Method::GET,
                    path: GATEWAY_LEDGER,
                    query: "",
                    content_type: "",
                    reply: object("ConfigMap", "l"),
                },
                Expect {
                    method: Method::PATCH,
                    path: GATEWAY_LEDGER,
                    query: "fieldManager=crosstrace",
                    content_type: "application/merge-patch+json",
                    reply: object("ConfigMap", "l"),
                },
            ],
        )
        .await;
        assert_eq!(bodies[2], json!({"data": {"uid-public": null}}));
    }
}
