//! The reconcile driver against a mocked API server, as kube-rs/controller-rs tests its reconciler: a
//! fake that answers reads (empty lists, or the objects a scenario puts in) and records every write, so
//! that each scenario asserts which writes a reconcile makes, in which order, and what it asks for next.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crosstrace::api::TracingPolicy;
use crosstrace::controller::apply::{Tails, Wakes, Writer};
use crosstrace::controller::statuses::Statuses;
use crosstrace::controller::{Context, Settings, reconcile};
use crosstrace::layers::stores::Stores;
use crosstrace::layers::workloads::{self, Workload};
use crosstrace::leader::Fence;
use crosstrace::lean::{Addressed, Meta, Pruned};
use crosstrace::metrics::Metrics;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One write the reconcile made: method, path, body.
#[derive(Debug, Clone)]
struct Write {
    method: Method,
    path: String,
    body: Value,
}

/// What the fake API server holds: list answers by path (empty when absent) and single objects by path
/// (404 when absent).
#[derive(Default, Clone)]
struct World {
    lists: BTreeMap<String, Value>,
    objects: BTreeMap<String, Value>,
    /// Every read, path and query.
    reads: Arc<Mutex<Vec<String>>>,
    /// Paths whose writes are refused (403).
    refused: Vec<String>,
    /// Paths whose next write is refused (403), once.
    refused_once: Arc<Mutex<Vec<String>>>,
    /// Writes to paths under this prefix wait this long for their answer.
    slow: Option<(&'static str, Duration)>,
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

/// Answers every request until the client goes away; writes are recorded and answered with `echo`.
async fn serve(mut handle: Handle, world: World, echo: Value, writes: Arc<Mutex<Vec<Write>>>) {
    while let Some((request, send)) = handle.next_request().await {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        if method == Method::GET {
            world.reads.lock().unwrap().push(request.uri().to_string());
        }
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let reply = if method == Method::GET {
            let kind = path.rsplit('/').next().unwrap_or_default();
            match (world.objects.get(&path), world.lists.get(&path)) {
                (Some(object), _) => (200, object.clone()),
                (None, Some(items)) => (200, items.clone()),
                // A collection (plural path segment) is an empty list; anything else is not found.
                (None, None) if kind.ends_with('s') && !path.contains("/configmaps/") => (200, list("List", vec![])),
                _ => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                ),
            }
        } else {
            let body =
                if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
            writes.lock().unwrap().push(Write { method: method.clone(), path: path.clone(), body: body.clone() });
            let once = {
                let mut once = world.refused_once.lock().unwrap();
                let found = once.iter().position(|p| *p == path);
                found.map(|i| once.remove(i)).is_some()
            };
            if once || world.refused.contains(&path) {
                let refused = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403});
                let response = Response::builder().status(403).body(Body::from(serde_json::to_vec(&refused).unwrap()));
                answer(send, response.unwrap(), delay(&world, &method, &path));
                continue;
            }
            // Server-side applies and creates carry the whole object: echo it; a delete succeeds; anything
            // else is a patch of the policy.
            let reply = match () {
                _ if body.get("kind").is_some() && body.get("metadata").is_some() => body,
                _ if method == Method::DELETE => json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                _ => echo.clone(),
            };
            (200, reply)
        };
        let response =
            Response::builder().status(reply.0).body(Body::from(serde_json::to_vec(&reply.1).unwrap())).unwrap();
        answer(send, response, delay(&world, &method, &path));
    }
}

/// How long the answer to a request waits ([`World::slow`]).
fn delay(world: &World, method: &Method, path: &str) -> Duration {
    match world.slow {
        Some((prefix, after)) if method != Method::GET && path.starts_with(prefix) => after,
        _ => Duration::ZERO,
    }
}

/// Sends `response` after `after` (the next requests are taken meanwhile).
fn answer(send: tower_test::mock::SendResponse<Response<Body>>, response: Response<Body>, after: Duration) {
    if after.is_zero() {
        send.send_response(response);
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            send.send_response(response);
        });
    }
}

/// A context on a mocked API server holding `world`, with `policy` in the controller's store.
fn context(policy: &TracingPolicy, world: World, settings: Settings) -> (Arc<Context>, Arc<Mutex<Vec<Write>>>) {
    context_with(policy, world, settings, None)
}

/// [`context`] with the controller's watch-backed stores.
fn context_with(
    policy: &TracingPolicy,
    world: World,
    settings: Settings,
    stores: Option<Stores>,
) -> (Arc<Context>, Arc<Mutex<Vec<Write>>>) {
    let (context, writes, _) = context_waking(policy, world, settings, stores);
    (context, writes)
}

/// [`context_with`], and the policies the end of their writes left in flight wakes.
fn context_waking(
    policy: &TracingPolicy,
    world: World,
    settings: Settings,
    stores: Option<Stores>,
) -> (Arc<Context>, Arc<Mutex<Vec<Write>>>, Wakes) {
    let (tails, wakes) = Tails::new();
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let writes = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(serve(handle, world, serde_json::to_value(policy).unwrap(), writes.clone()));
    let metrics = Arc::new(Metrics::default());
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&Event::Apply(policy.clone()));
    let writer = Writer::new(client.clone(), metrics.clone(), Fence::open());
    let recorder = Recorder::new(client.clone(), Reporter { controller: "crosstrace".into(), instance: None });
    let context = Context {
        write_limits: crosstrace::controller::WriteLimits::new(&settings, &metrics),
        statuses: Statuses::new(writer.clone(), recorder.clone(), tails.waker()),
        writer,
        recorder,
        client,
        metrics,
        policies: reader,
        settings,
        retries: Default::default(),
        canaries: Default::default(),
        hashes: Default::default(),
        flow_reports: Default::default(),
        stores: stores.map(Arc::new),
        tails,
    };
    (Arc::new(context), writes, wakes)
}

fn policy(spec: Value, finalizer: bool, status: Option<Value>) -> TracingPolicy {
    let mut p = json!({
        "apiVersion": "crosstrace.dev/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": "shop", "uid": "uid-shop", "generation": 1, "resourceVersion": "7",
            "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": spec,
    });
    if finalizer {
        p["metadata"]["finalizers"] = json!(["crosstrace.dev/cleanup"]);
    }
    if let Some(status) = status {
        p["status"] = status;
    }
    serde_json::from_value(p).unwrap()
}

fn network_spec() -> Value {
    json!({
        "sampling": {"ratio": "0.5"},
        "network": {"bridge": "br-int", "sflow": {"targets": ["127.0.0.1:6343"], "sampling": 64, "polling": 10, "header": 128}},
    })
}

/// One reconcile, and the status write it handed on.
async fn run(policy: &TracingPolicy, ctx: &Arc<Context>) -> Action {
    let reconciled =
        tokio::time::timeout(Duration::from_secs(5), reconcile::reconcile(Arc::new(policy.clone()), ctx.clone()))
            .await
            .expect("in time")
            .expect("reconciled");
    tokio::time::timeout(Duration::from_secs(5), ctx.statuses.settled()).await.expect("status written in time");
    reconciled
}

const POLICY: &str = "/apis/crosstrace.dev/v1alpha1/tracingpolicies/shop";

/// The Deployments of namespace `shop` written so far, by name, sorted (a name twice: written twice).
fn injected(writes: &Arc<Mutex<Vec<Write>>>) -> Vec<String> {
    let writes = writes.lock().unwrap();
    let mut names: Vec<String> = writes
        .iter()
        .filter(|w| w.path.starts_with("/apis/apps/v1/namespaces/shop/deployments/"))
        .map(|w| w.path.rsplit('/').next().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn writes_to(writes: &Arc<Mutex<Vec<Write>>>) -> Vec<(Method, String)> {
    writes
        .lock()
        .unwrap()
        .iter()
        .filter(|w| !w.path.contains("/events"))
        .map(|w| (w.method.clone(), w.path.clone()))
        .collect()
}

#[tokio::test]
async fn a_missing_finalizer_is_added_before_anything_else() {
    let p = policy(network_spec(), false, None);
    let (ctx, writes) = context(&p, World::default(), Settings::default());
    run(&p, &ctx).await;
    let writes = writes.lock().unwrap().clone();
    assert_eq!((writes[0].method.clone(), writes[0].path.as_str()), (Method::PATCH, POLICY));
    assert_eq!(writes[0].body["metadata"]["finalizers"], json!(["crosstrace.dev/cleanup"]));
    assert_eq!(writes[0].body["metadata"]["resourceVersion"], "7", "guarded by the version it was read at");
}

#[tokio::test]
async fn a_converged_policy_makes_no_request_that_writes_and_an_unchanged_status_is_not_patched() {
    // First pass: whatever status a policy with no target implies is written once.
    let p = policy(network_spec(), true, None);
    let (ctx, writes) = context(&p, World::default(), Settings::default());
    run(&p, &ctx).await;
    let status_writes: Vec<Write> =
        writes.lock().unwrap().iter().filter(|w| w.path.ends_with("/status")).cloned().collect();
    assert_eq!(status_writes.len(), 1, "{:?}", writes_to(&writes));
    // The next reconcile of the same policy, with that status cached or not: no write at all.
    let again = run(&p, &ctx).await;
    assert_eq!(status_writes.len(), writes.lock().unwrap().iter().filter(|w| w.path.ends_with("/status")).count());
    let status = status_writes[0].body["status"].clone();
    let converged = policy(network_spec(), true, Some(status));
    let (fresh, fresh_writes) = context(&converged, World::default(), Settings::default());
    run(&converged, &fresh).await;
    assert!(fresh_writes.lock().unwrap().is_empty(), "{:?}", writes_to(&fresh_writes));
    assert_eq!(again, Action::requeue(Settings::default().resync), "looked at again only at the resync");
}

#[tokio::test]
async fn delete_reverts_then_removes_the_finalizer() {
    let mut p = policy(network_spec(), true, None);
    p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap(),
    ));
    // The node still exports for this policy.
    let tracing = json!({
        "apiVersion": "crosstrace.dev/v1alpha1", "kind": "NodeTracing",
        "metadata": {"name": "node-a", "resourceVersion": "3"},
        "spec": {"nodeName": "node-a", "bridges": [{"bridge": "br-int", "policy": "shop", "policyGeneration": 1,
            "sflow": {"targets": ["127.0.0.1:6343"], "sampling": 64, "polling": 10, "header": 128}}]},
    });
    let mut world = World::default();
    world.lists.insert("/apis/crosstrace.dev/v1alpha1/nodetracings".into(), list("NodeTracingList", vec![tracing]));
    let (ctx, writes) = context(&p, world, Settings::default());
    let next = run(&p, &ctx).await;
    let order = writes_to(&writes);
    assert_eq!(
        order,
        vec![
            (Method::DELETE, "/apis/crosstrace.dev/v1alpha1/nodetracings/node-a".to_string()),
            (Method::PATCH, POLICY.to_string()),
        ],
        "the node's export goes first, the finalizer last"
    );
    let last = writes.lock().unwrap().iter().rfind(|w| w.path == POLICY).cloned().unwrap();
    assert_eq!(last.body["metadata"]["finalizers"], json!([]));
    assert_eq!(next, Action::await_change());
}

#[tokio::test]
async fn a_write_budget_cut_requeues_at_once() {
    let p = policy(network_spec(), true, None);
    let nodes: Vec<Value> = (0..4)
        .map(|i| json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": format!("node-{i}")}}))
        .collect();
    let mut world = World::default();
    world.lists.insert(
        "/api/v1/nodes".into(),
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": nodes}),
    );
    let settings = Settings { write_budget: Duration::ZERO, write_concurrency: 1, ..Settings::default() };
    let (ctx, writes) = context(&p, world, settings);
    let next = run(&p, &ctx).await;
    let node_writes = writes_to(&writes).into_iter().filter(|(_, path)| path.contains("/nodetracings/")).count();
    assert_eq!(node_writes, 1, "the first write always starts, then the budget is used up");
    assert_eq!(next, Action::requeue(Duration::ZERO), "the rest goes on in the next reconcile, at once");
}

/// A store that has taken in its first list, of `objects`.
fn sync<K: kube::Resource<DynamicType = ()> + Clone + 'static>(objects: Vec<K>) -> kube::runtime::reflector::Store<K> {
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&Event::Init);
    for o in objects {
        writer.apply_watcher_event(&Event::InitApply(o));
    }
    writer.apply_watcher_event(&Event::InitDone);
    store
}

/// Synced stores holding namespace `shop` and these Deployments (the network layer's are not synced).
fn synced(deployments: Vec<Workload>) -> Stores {
    let namespace: Meta<k8s_openapi::api::core::v1::Namespace> =
        serde_json::from_value(json!({"metadata": {"name": "shop", "resourceVersion": "1"}})).unwrap();
    let deployments =
        deployments.iter().map(|w| Pruned::new(workloads::pruned_metadata(&w.metadata), Some(w.shape()))).collect();
    let (nodes, tracings) = (reflector::store().0, reflector::store().0);
    Stores::new(sync(deployments), sync(vec![]), sync(vec![]), sync(vec![namespace]), nodes, tracings)
}

#[tokio::test]
async fn from_synced_network_stores_nothing_is_listed_and_a_write_is_not_planned_again_before_its_echo() {
    let p = policy(network_spec(), true, None);
    let node = |name: &str| {
        let metadata = ObjectMeta { name: Some(name.into()), resource_version: Some("1".into()), ..Default::default() };
        Addressed::new(metadata, Some("10.0.0.10".into()))
    };
    let (deployments, statefulsets, daemonsets) = (reflector::store().0, reflector::store().0, reflector::store().0);
    let nodes = sync(vec![node("node-0"), node("node-1")]);
    let stores = Stores::new(deployments, statefulsets, daemonsets, reflector::store().0, nodes, sync(vec![]));
    let world = World::default();
    let settings = Settings { write_budget: Duration::from_secs(5), ..Settings::default() };
    let (ctx, writes) = context_with(&p, world.clone(), settings, Some(stores));
    run(&p, &ctx).await;
    let node_writes = |writes: &Arc<Mutex<Vec<Write>>>| {
        writes_to(writes).into_iter().filter(|(_, path)| path.contains("/nodetracings/")).count()
    };
    assert_eq!(node_writes(&writes), 2, "{:?}", writes_to(&writes));
    let reads = world.reads.lock().unwrap().clone();
    assert!(!reads.iter().any(|r| r.starts_with("/api/v1/nodes") || r.contains("/nodetracings")), "{reads:?}");
    // The store has not seen the writes yet: the next reconcile plans from what they returned.
    run(&p, &ctx).await;
    assert_eq!(node_writes(&writes), 2, "written once: {:?}", writes_to(&writes));
}

fn shop_deployment(i: usize) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": format!("d-{i}"), "namespace": "shop", "resourceVersion": "1", "generation": 1},
        "spec": {"selector": {"matchLabels": {"app": format!("d-{i}")}}, "template": {
            "metadata": {"labels": {"app": format!("d-{i}")}},
            "spec": {"containers": [{"name": "app", "image": "shop/app:1"}]}}},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1},
    }))
    .unwrap()
}

/// The shop Deployments as the injections written to them left them (generation 2), and as the
/// Deployment controller reports them: rolled out (healthy) or not taken in yet.
fn as_written(writes: &Arc<Mutex<Vec<Write>>>, rolled_out: bool) -> Vec<Workload> {
    writes
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.path.starts_with("/apis/apps/v1/namespaces/shop/deployments/"))
        .map(|w| {
            let i: usize = w.path.rsplit("d-").next().unwrap().parse().unwrap();
            let mut d = shop_deployment(i);
            let patch: Deployment = serde_json::from_value(w.body.clone()).unwrap();
            d.metadata.labels = patch.metadata.labels;
            d.metadata.annotations = patch.metadata.annotations;
            d.metadata.resource_version = Some("2".into());
            d.metadata.generation = Some(2);
            d.spec.as_mut().unwrap().template = patch.spec.unwrap().template;
            if rolled_out {
                d.status.as_mut().unwrap().observed_generation = Some(2);
            }
            Workload::from_deployment(d)
        })
        .collect()
}

/// A policy tracing every Deployment, 20 at once.
fn shop_policy() -> TracingPolicy {
    let spec = json!({
        "collector": {"endpoint": "otel-gateway.observability.svc:4317"},
        "sampling": {"ratio": "1"},
        "workloads": {"namespaceSelector": {}, "kinds": ["Deployment"]},
        "rollout": {"maxConcurrent": 20, "progressDeadlineSeconds": 3600},
    });
    policy(spec, true, None)
}

#[tokio::test]
async fn from_synced_stores_a_policy_lists_its_namespaces_once_and_a_batchs_failing_pods_come_from_one_list() {
    let p = shop_policy();
    let targets: Vec<Workload> = (0..9).map(|i| Workload::from_deployment(shop_deployment(i))).collect();
    let world = World::default();
    let (ctx, writes) = context_with(&p, world.clone(), Settings::default(), Some(synced(targets)));
    run(&p, &ctx).await;
    settle(&ctx).await;
    let reads = world.reads.lock().unwrap().clone();
    let listed = |r: &&String| {
        r.starts_with("/api/v1/namespaces?")
            || *r == "/api/v1/namespaces"
            || (["deployments", "statefulsets", "daemonsets"].iter().any(|k| r.contains(&format!("/{k}")))
                && (r.contains("workloads-policy") || !(r.contains("/namespaces/") || r.contains("ingress-policy"))))
            || r.starts_with("/apis/apps/v1/namespaces/shop/deployments?")
    };
    let lists: Vec<&String> = reads.iter().filter(listed).collect();
    assert_eq!(lists.len(), 1, "the Deployments of the one namespace it selects, once: {reads:?}");
    assert!(lists[0].starts_with("/apis/apps/v1/namespaces/shop/deployments?"), "{reads:?}");
    // From then on the stores keep what it selects: nothing is listed again.
    world.reads.lock().unwrap().clear();
    run(&p, &ctx).await;
    settle(&ctx).await;
    let reads = world.reads.lock().unwrap().clone();
    assert!(!reads.iter().any(|r| listed(&r)), "workloads and namespaces come from the stores: {reads:?}");
    let injected = as_written(&writes, false);
    assert_eq!(injected.len(), 9, "the whole batch is injected at once");
    assert!(injected.iter().all(|w| !w.rolled_out), "rolling out");

    // A pod of d-3's new revision cannot start.
    let hash = |w: &Workload| w.template.names().injection.clone().unwrap();
    let failing = json!({
        "metadata": {"name": "d-3-abc", "namespace": "shop", "labels": {"app": "d-3"},
            "annotations": {workloads::INJECTION_ANNOTATION: hash(&injected[3])}},
        "status": {"containerStatuses": [{"name": "app", "image": "x", "imageID": "", "ready": false,
            "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]},
    });
    let pods = || {
        let mut world = World::default();
        world.lists.insert("/api/v1/namespaces/shop/pods".into(), list("PodList", vec![failing.clone()]));
        world
    };
    // While the Deployment controller has not taken in the new generation, no pod of it is looked for.
    let world = pods();
    let (ctx, _) = context_with(&p, world.clone(), Settings::default(), Some(synced(injected.clone())));
    run(&p, &ctx).await;
    let reads = world.reads.lock().unwrap().clone();
    assert!(!reads.iter().any(|r| r.contains("/pods")), "nothing to list yet: {reads:?}");
    // Once it has, and counts a pod of it (not available):
    let taken_in: Vec<Workload> = injected.iter().map(|w| Workload { revision_started: true, ..w.clone() }).collect();
    let world = pods();
    let (ctx, writes) = context_with(&p, world.clone(), Settings::default(), Some(synced(taken_in)));
    run(&p, &ctx).await;
    let reads = world.reads.lock().unwrap().clone();
    let pod_lists = reads.iter().filter(|r| r.contains("/pods")).count();
    assert_eq!(pod_lists, 1, "one list of the namespace's pods for the batch: {reads:?}");
    let rolled_back: Vec<String> = writes
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.body["metadata"]["annotations"][workloads::ROLLED_BACK_ANNOTATION] == "shop/1")
        .map(|w| w.path.rsplit('/').next().unwrap().to_string())
        .collect();
    assert!(rolled_back.contains(&"d-3".to_string()), "{:?}", writes_to(&writes));
}

/// Waits until the writes the policy's reconciles left in flight have ended.
async fn settle(ctx: &Context) {
    let ended = async {
        while ctx.tails.running("uid-shop") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), ended).await.expect("the writes in flight end");
}

#[tokio::test]
async fn injections_unanswered_when_the_budget_ends_run_on_their_end_wakes_the_policy_and_a_failure_fails_the_next() {
    // Writes answered after the reconcile's budget.
    d_1_refused_after_the_budget(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_writers_failure_stops_the_rest_and_still_waits_for_the_writes_it_had_in_flight() {
    // No budget: the reconcile starts its first write (the collector ConfigMap) and hands the rest on, so
    // the policy's writer starts all three injections; d-1's refusal comes back before d-2's answer, which
    // is still taken in.
    d_1_refused_after_the_budget(Duration::ZERO).await;
}

/// The shop policy's three Deployments, their writes answered after 200 ms and d-1's refused, with
/// `budget` for the reconcile's workload writes: the end of the writes wakes the policy, the reconcile
/// it wakes fails with d-1's refusal, and the next one writes d-1 again, not the others.
async fn d_1_refused_after_the_budget(budget: Duration) {
    use futures::StreamExt;
    let p = shop_policy();
    let targets: Vec<Workload> = (0..3).map(|i| Workload::from_deployment(shop_deployment(i))).collect();
    let refused = vec!["/apis/apps/v1/namespaces/shop/deployments/d-1".into()];
    let slow = Some(("/apis/apps/v1/namespaces/shop/deployments/", Duration::from_millis(200)));
    let world = World { refused, slow, ..World::default() };
    let settings = Settings { workload_write_budget: budget, ..Settings::default() };
    let (ctx, writes, mut wakes) = context_waking(&p, world, settings, Some(synced(targets)));
    let injections = || injected(&writes);
    run(&p, &ctx).await;
    let woken = tokio::time::timeout(Duration::from_secs(5), wakes.next()).await.expect("woken in time");
    assert_eq!(woken.map(|r| r.name), Some("shop".to_string()), "the end of its writes wakes the policy");
    assert!(!ctx.tails.running("uid-shop"));
    assert_eq!(injections(), ["d-0", "d-1", "d-2"]);
    // d-1's write was refused after its reconcile returned: the reconcile it woke fails with it (and is
    // retried after the backoff), writing nothing.
    let failed = reconcile::reconcile(Arc::new(p.clone()), ctx.clone()).await;
    assert!(matches!(&failed, Err(e) if e.kind() == "api"), "{failed:?}");
    assert_eq!(injections().len(), 3, "nothing written by the failed reconcile");
    // The next one writes d-1 again, and not the others, whose writes were made.
    run(&p, &ctx).await;
    settle(&ctx).await;
    assert_eq!(injections(), ["d-0", "d-1", "d-1", "d-2"]);
}

/// The shop policy's four Deployments, their writes answered after 150 ms, one write in flight at once
/// and a 10 ms budget: the first reconcile starts d-0, its writer goes on with the rest.
fn one_write_at_a_time(p: &TracingPolicy) -> (Arc<Context>, Arc<Mutex<Vec<Write>>>, Wakes) {
    let targets: Vec<Workload> = (0..4).map(|i| Workload::from_deployment(shop_deployment(i))).collect();
    let slow = Some(("/apis/apps/v1/namespaces/shop/deployments/", Duration::from_millis(150)));
    let world = World { slow, ..World::default() };
    let settings = Settings {
        workload_write_budget: Duration::from_millis(10),
        write_concurrency: 1,
        write_concurrency_max: 1,
        ..Settings::default()
    };
    context_waking(p, world, settings, Some(synced(targets)))
}

#[tokio::test]
async fn while_the_writer_goes_on_a_reconcile_is_deferred_then_takes_its_turn_over_and_no_target_is_written_twice() {
    let p = shop_policy();
    let (ctx, writes, _wakes) = one_write_at_a_time(&p);
    let injections = || injected(&writes);
    let first = run(&p, &ctx).await;
    assert!(ctx.tails.running("uid-shop"), "the writer goes on after the reconcile: {first:?}");
    // Right after it, while its writes go on, the policy is not planned again: deferred, writing nothing.
    let written = writes.lock().unwrap().len();
    let deferred = reconcile::reconcile(Arc::new(p.clone()), ctx.clone()).await.expect("deferred");
    assert_eq!(writes.lock().unwrap().len(), written, "a deferred reconcile writes nothing (not even a status)");
    assert!(format!("{deferred:?}").contains("requeue_after: Some"), "looked at again soon: {deferred:?}");
    // Reconciles while it writes, once the policy may be planned again (an owner's change of another
    // object, the resync): each takes the turn over and writes what is neither in flight nor touched, as
    // one writer at a time.
    for _ in 0..3 {
        tokio::time::sleep(reconcile::REPLAN_EVERY + Duration::from_millis(20)).await;
        run(&p, &ctx).await;
    }
    settle(&ctx).await;
    assert_eq!(injections(), ["d-0", "d-1", "d-2", "d-3"], "every target written once");
}

/// The conditions of the last status the policy's reconciles wrote, by type: (status, message).
fn last_conditions(writes: &Arc<Mutex<Vec<Write>>>) -> BTreeMap<String, (String, String)> {
    let writes = writes.lock().unwrap();
    let status = writes.iter().rev().find(|w| w.path.ends_with("/status")).expect("a status written");
    let conditions = status.body["status"]["conditions"].as_array().cloned().unwrap_or_default();
    conditions
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap().to_string(),
                (c["status"].as_str().unwrap().into(), c["message"].as_str().unwrap().into()),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_policy_is_not_ready_while_the_writes_recording_its_convergence_are_in_flight() {
    // Three injections written, rolled out and healthy: the next reconcile records their convergence.
    let p = shop_policy();
    let fresh: Vec<Workload> = (0..3).map(|i| Workload::from_deployment(shop_deployment(i))).collect();
    let (ctx, writes) = context_with(&p, World::default(), Settings::default(), Some(synced(fresh)));
    run(&p, &ctx).await;
    settle(&ctx).await;
    let healthy = as_written(&writes, true);
    assert_eq!(healthy.len(), 3);

    // Answered within the reconcile's budget: Ready at once.
    let (ctx, writes) = context_with(&p, World::default(), Settings::default(), Some(synced(healthy.clone())));
    run(&p, &ctx).await;
    settle(&ctx).await;
    assert_eq!(injected(&writes), ["d-0", "d-1", "d-2"], "each convergence recorded");
    assert_eq!(last_conditions(&writes)["Ready"].0, "True");

    // Answered after it: the writes go on in the policy's writer, and an owner reading Ready=True could
    // change a workload under a write of crosstrace's that puts back what the owner took out (the
    // reconcile their answers wake says Ready).
    let slow = Some(("/apis/apps/v1/namespaces/shop/deployments/", Duration::from_millis(200)));
    let world = World { slow, ..World::default() };
    let settings = Settings { workload_write_budget: Duration::from_millis(10), ..Settings::default() };
    let (ctx, writes, _wakes) = context_waking(&p, world, settings, Some(synced(healthy)));
    run(&p, &ctx).await;
    assert!(ctx.tails.running("uid-shop"), "the writes go on after the reconcile");
    let conditions = last_conditions(&writes);
    assert_eq!(conditions["Ready"].0, "Unknown", "{conditions:?}");
    assert_eq!(conditions["Progressing"].0, "True", "{conditions:?}");
    let workloads = &conditions["WorkloadsReady"];
    assert_eq!(workloads.0, "Unknown");
    assert!(workloads.1.ends_with("crosstrace's writes in flight"), "{}", workloads.1);
    settle(&ctx).await;
}

#[tokio::test]
async fn a_converged_policy_with_a_canary_is_looked_at_again_at_the_resync_not_at_every_canary() {
    // A collector that is not there (a port bound, then closed): the canary finds it at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spec = json!({
        "collector": {"endpoint": format!("127.0.0.1:{port}"), "protocol": "http"},
        "workloads": {"namespaceSelector": {"matchLabels": {"team": "shop"}}},
    });
    let p = policy(spec, true, None);
    let settings = Settings { canary_every: Some(Duration::from_secs(1)), ..Settings::default() };
    let (ctx, writes) = context(&p, World::default(), settings);
    let action = run(&p, &ctx).await;
    let conditions = last_conditions(&writes);
    assert_eq!(conditions["CollectorReachable"].0, "False", "{conditions:?}");
    // The canary rounds ask the collector again and wake the policy only when the finding turns.
    assert_eq!(action, Action::requeue(Settings::default().resync));
}

#[tokio::test]
async fn a_reconcile_hands_its_status_on_and_a_failed_status_write_fails_the_next_reconcile_and_is_built_again() {
    use futures::StreamExt;
    let p = policy(network_spec(), true, None);
    let status_path = format!("{POLICY}/status");
    // The status writes are answered after a second, the first one with a refusal.
    let slow = Some((POLICY, Duration::from_secs(1)));
    let world = World { slow, refused_once: Arc::new(Mutex::new(vec![status_path.clone()])), ..World::default() };
    let (ctx, writes, mut wakes) = context_waking(&p, world, Settings::default(), None);
    let status_writes = || writes.lock().unwrap().iter().filter(|w| w.path == status_path).count();
    let events = || writes.lock().unwrap().iter().filter(|w| w.path.contains("/events")).count();
    reconcile::reconcile(Arc::new(p.clone()), ctx.clone()).await.expect("reconciled");
    // The reconcile returned with its status write handed on, not answered.
    let settled = tokio::time::timeout(Duration::from_millis(200), ctx.statuses.settled()).await;
    assert!(settled.is_err(), "the reconcile did not wait for its status write");
    assert_eq!(status_writes(), 1);
    // The write is refused: the policy is woken, and its next reconcile fails with the refusal (retried
    // after the backoff), writing nothing.
    let woken = tokio::time::timeout(Duration::from_secs(5), wakes.next()).await.expect("woken in time");
    assert_eq!(woken.map(|r| r.name), Some("shop".to_string()));
    assert_eq!(events(), 0, "no Event tells of a status that was not written");
    let failed = reconcile::reconcile(Arc::new(p.clone()), ctx.clone()).await;
    assert!(matches!(&failed, Err(e) if e.kind() == "api"), "{failed:?}");
    assert_eq!(status_writes(), 1);
    // The retry builds the status again from the policy as the API server has it (none: the refused
    // one is forgotten), writes it, and then tells of its conditions.
    run(&p, &ctx).await;
    assert_eq!(status_writes(), 2);
    assert!(events() > 0, "the conditions' Events follow the write");
    let conditions = |w: &Write| -> Vec<(Value, Value, Value)> {
        let all = w.body["status"]["conditions"].as_array().cloned().unwrap_or_default();
        all.into_iter().map(|c| (c["type"].clone(), c["status"].clone(), c["reason"].clone())).collect()
    };
    let both: Vec<_> = writes.lock().unwrap().iter().filter(|w| w.path == status_path).map(conditions).collect();
    assert!(!both[0].is_empty());
    assert_eq!(both[0], both[1], "the same status, built again");
}

#[tokio::test]
async fn a_change_of_the_policy_is_planned_at_once_while_its_writer_goes_on() {
    let p = shop_policy();
    let (ctx, writes, _wakes) = one_write_at_a_time(&p);
    run(&p, &ctx).await;
    assert!(ctx.tails.running("uid-shop"), "the writer goes on after the reconcile");
    // Right after it, its owner's changes wait (deferred); a change of the policy itself does not.
    let deferred = reconcile::reconcile(Arc::new(p.clone()), ctx.clone()).await.expect("deferred");
    assert!(format!("{deferred:?}").contains("requeue_after: Some"), "{deferred:?}");
    let mut changed = p.clone();
    changed.metadata.generation = Some(2);
    changed.spec.sampling.ratio = "0.5".into();
    run(&changed, &ctx).await;
    settle(&ctx).await;
    // The one in flight when the change came is planned around; its end wakes the policy, and the
    // reconcile it woke writes it again.
    run(&changed, &ctx).await;
    settle(&ctx).await;
    // Every target is written with the new generation's injection; of the old plan, only the write
    // that was in flight.
    let records: Vec<(String, i64)> = writes
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.path.starts_with("/apis/apps/v1/namespaces/shop/deployments/"))
        .filter_map(|w| {
            let record = w.body["metadata"]["annotations"][workloads::RECORD_ANNOTATION].as_str()?;
            let record: Value = serde_json::from_str(record).ok()?;
            Some((w.path.rsplit('/').next()?.to_string(), record["generation"].as_i64()?))
        })
        .collect();
    let mut new: Vec<&str> = records.iter().filter(|(_, g)| *g == 2).map(|(n, _)| n.as_str()).collect();
    new.sort_unstable();
    assert_eq!(new, ["d-0", "d-1", "d-2", "d-3"], "{records:?}");
    assert_eq!(records.iter().filter(|(_, g)| *g == 1).count(), 1, "{records:?}");
}
