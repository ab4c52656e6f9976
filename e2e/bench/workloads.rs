//! Scenarios 1-4 on the workload layer: N target Deployments (replicas 1) in 10 namespaces.
//!
//! One controller process (the chart's ServiceAccount, production defaults) serves scenarios 1, 4
//! and 3; scenario 2 reads its memory and restarts it. A metadata watch on the targets (the bench's
//! own, in this process) timestamps when each pod template is patched and when each Deployment has
//! rolled out, so the operator and the baselines are timed by the same observer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crosstrace::api::{TracingPolicy, TracingPolicySpec, WorkloadKind};
use crosstrace::controller::Settings;
use crosstrace::layers::workloads::{self, Action, Observed, RECORD_ANNOTATION, Template, Workload};
use crosstrace::layers::{ObjectKey, PolicyView, health};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::util::{
    self, PATIENCE, Proc, bounded, ensure_namespace, ignore_exists, knob, median, quantile, ready, since, wait_quiet,
    writes,
};
use crate::{Report, mib, secs, support};

const POLICY: &str = "bench";
const TARGET_LABEL: &str = "crosstrace-bench";
const PART_OF: &str = "app.kubernetes.io/part-of";

struct Config {
    runs: usize,
    change_runs: usize,
    /// Target counts of scenario 1, ascending; the later scenarios run at the largest.
    sizes: Vec<usize>,
    /// `spec.replicas` of every target (0: no pods, a rollout is the controller manager's bookkeeping).
    replicas: u32,
    /// Scenario 4's small policy: its targets (replicas 0) and the number of changes timed.
    ready_targets: usize,
    ready_runs: usize,
    namespaces: usize,
    nontargets: usize,
    pods: usize,
    idle: u64,
    kubectl_sample: usize,
    write_concurrency: usize,
    max_concurrent: usize,
    /// The limit client's concurrencies; its best per run is that run's limit.
    limit_sweep: Vec<usize>,
    /// Rollouts and deletes the long-running controller goes through before its steady RSS is read.
    long_rollouts: usize,
}

impl Config {
    fn from_env() -> Self {
        let runs = knob("CROSSTRACE_BENCH_RUNS", 5usize).max(1);
        let mut sizes: Vec<usize> = knob::<String>("CROSSTRACE_BENCH_TARGETS", "1000,10000".into())
            .split(',')
            .filter_map(|n| n.trim().parse::<usize>().ok().filter(|n| *n > 0))
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        assert!(!sizes.is_empty(), "CROSSTRACE_BENCH_TARGETS: no target count");
        let targets = *sizes.last().unwrap();
        Self {
            runs,
            change_runs: knob("CROSSTRACE_BENCH_CHANGE_RUNS", runs).max(1),
            sizes,
            replicas: knob("CROSSTRACE_BENCH_REPLICAS", 1u32),
            ready_targets: knob("CROSSTRACE_BENCH_READY_TARGETS", 100usize).max(1),
            ready_runs: knob("CROSSTRACE_BENCH_READY_RUNS", 20usize).max(1),
            namespaces: knob("CROSSTRACE_BENCH_NAMESPACES", 10usize).clamp(1, targets),
            nontargets: knob("CROSSTRACE_BENCH_NONTARGETS", 100_000usize),
            pods: knob("CROSSTRACE_BENCH_PODS", 20_000usize),
            idle: crate::util::idle_seconds(),
            kubectl_sample: knob("CROSSTRACE_BENCH_KUBECTL_SAMPLE", 100usize).clamp(1, targets),
            write_concurrency: knob(
                "CROSSTRACE_BENCH_WRITE_CONCURRENCY",
                crosstrace::controller::DEFAULT_WRITE_CONCURRENCY,
            )
            .max(1),
            max_concurrent: knob("CROSSTRACE_BENCH_MAX_CONCURRENT", targets.min(1000)).clamp(1, 1000),
            limit_sweep: knob::<String>("CROSSTRACE_BENCH_LIMIT_SWEEP", "1,4,8,16,32".into())
                .split(',')
                .filter_map(|c| c.trim().parse::<usize>().ok().filter(|c| *c > 0))
                .collect(),
            long_rollouts: knob("CROSSTRACE_BENCH_LONG_ROLLOUTS", 10usize),
        }
    }
}

fn namespace(i: usize) -> String {
    format!("ct-bench-{i}")
}

fn target(i: usize, namespaces: usize) -> ObjectKey {
    ObjectKey::new(namespace(i % namespaces), format!("t-{i:05}"))
}

fn template(name: &str) -> Value {
    json!({
        "metadata": {"labels": {"app": name, PART_OF: "bench"}},
        "spec": {"containers": [{"name": "app", "image": "bench/app:1"}]},
    })
}

/// A target Deployment; `role` is its `TARGET_LABEL` value (what a `Tracker` watches).
fn target_deployment(key: &ObjectKey, replicas: u32, role: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": key.name, "namespace": key.namespace, "labels": {TARGET_LABEL: role, PART_OF: "bench"}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": key.name}}, "template": template(&key.name)},
    })
}

fn policy(ratio: &str, max_concurrent: usize) -> Value {
    named_policy(POLICY, "on", ratio, Some(max_concurrent))
}

/// A policy selecting the bench's Deployments in the namespaces labelled `TARGET_LABEL: <namespaces>`;
/// without `max_concurrent`, the API's default rollout (health-gated batches of its default size).
fn named_policy(name: &str, namespaces: &str, ratio: &str, max_concurrent: Option<usize>) -> Value {
    let rollout = match max_concurrent {
        Some(m) => json!({"maxConcurrent": m, "progressDeadlineSeconds": 3600}),
        None => json!({}),
    };
    json!({
        "apiVersion": "crosstrace.dev/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": name},
        "spec": {
            "collector": {"endpoint": "otel-gateway.observability.svc:4317"},
            "sampling": {"ratio": ratio},
            "workloads": {
                "namespaceSelector": {"matchLabels": {TARGET_LABEL: namespaces}},
                "selector": {"matchLabels": {PART_OF: "bench"}},
                "kinds": ["Deployment"],
            },
            "rollout": rollout,
        },
    })
}

/// What the bench's watch knows of one target.
#[derive(Clone, Debug)]
struct Seen {
    /// `hash` of the crosstrace record annotation, if any.
    hash: Option<String>,
    changed_at: Instant,
    rolled_out: bool,
    ready_at: Option<Instant>,
}

/// A watch on the target Deployments (full objects: rollout health needs the status).
struct Tracker {
    state: Arc<Mutex<HashMap<String, Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record_hash(d: &Deployment) -> Option<String> {
    let raw = d.annotations().get(RECORD_ANNOTATION)?;
    let v: Value = serde_json::from_str(raw).ok()?;
    v["hash"].as_str().map(str::to_string)
}

impl Tracker {
    /// Watches the Deployments labelled `TARGET_LABEL: <role>`.
    fn start(client: &Client, role: &str) -> Self {
        let state: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
        let shared = state.clone();
        let api = Api::<Deployment>::all(client.clone());
        let selector = format!("{TARGET_LABEL}={role}");
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default().labels(&selector)).boxed();
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                let Ok(event) = event else { continue };
                let mut map = shared.lock().unwrap();
                match event {
                    watcher::Event::Apply(d) | watcher::Event::InitApply(d) => {
                        let key = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
                        let hash = record_hash(&d);
                        let rolled_out = health::deployment_rolled_out(&d);
                        let e = map.entry(key).or_insert_with(|| Seen {
                            hash: hash.clone(),
                            changed_at: now,
                            rolled_out,
                            ready_at: None,
                        });
                        if e.hash != hash {
                            e.hash = hash;
                            e.changed_at = now;
                            e.ready_at = None;
                        }
                        e.rolled_out = rolled_out;
                        if !rolled_out {
                            e.ready_at = None;
                        } else if e.ready_at.is_none() {
                            e.ready_at = Some(now);
                        }
                    }
                    watcher::Event::Delete(d) => {
                        map.remove(&format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any()));
                    }
                    _ => {}
                }
            }
        });
        Self { state, task }
    }

    fn hashes(&self) -> HashMap<String, Option<String>> {
        self.state.lock().unwrap().iter().map(|(k, s)| (k.clone(), s.hash.clone())).collect()
    }

    /// Waits until `n` targets satisfy `want`; returns them.
    async fn wait(&self, what: &str, n: usize, want: impl Fn(&str, &Seen) -> bool) -> Vec<Seen> {
        let deadline = Instant::now() + PATIENCE;
        let mut last_report = Instant::now();
        loop {
            let (count, seen) = {
                let map = self.state.lock().unwrap();
                let seen: Vec<Seen> = map.iter().filter(|(k, s)| want(k, s)).map(|(_, s)| s.clone()).collect();
                (seen.len(), seen)
            };
            if count >= n {
                return seen;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {count}/{n}");
            if last_report.elapsed() > Duration::from_secs(30) {
                println!("    ... waiting for {what}: {count}/{n}");
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every target is free of any injection and rolled out.
    async fn wait_clean(&self, n: usize) {
        self.wait("targets reverted and rolled out", n, |_, s| s.hash.is_none() && s.rolled_out).await;
    }
}

/// Whether a target carries an injection other than the one `before` recorded for it (`Tracker::hashes`).
fn changed_since(before: &HashMap<String, Option<String>>) -> impl Fn(&str, &Seen) -> bool + '_ {
    |key, s| s.hash.is_some() && before.get(key).is_none_or(|b| *b != s.hash)
}

/// Seconds from `t0` to the latest `changed_at` / `ready_at` of `seen`.
fn last_changed(t0: Instant, seen: &[Seen]) -> f64 {
    seen.iter().map(|s| s.changed_at.saturating_duration_since(t0).as_secs_f64()).fold(0.0, f64::max)
}

fn ready_latencies(t0: Instant, seen: &[Seen]) -> Vec<f64> {
    seen.iter().filter_map(|s| s.ready_at).map(|r| r.saturating_duration_since(t0).as_secs_f64()).collect()
}

/// Applies a policy as its user would (its name from `policy`); returns how long the apply took (one
/// server-side apply round trip).
async fn apply_policy(client: &Client, policy: &Value) -> f64 {
    let name = policy["metadata"]["name"].as_str().expect("a policy name");
    let t0 = Instant::now();
    Api::<TracingPolicy>::all(client.clone())
        .patch(name, &PatchParams::apply("bench-user").force(), &Patch::Apply(policy))
        .await
        .expect("apply policy");
    since(t0)
}

/// Milliseconds since the Unix epoch, as the controller's log timestamps are.
fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// Waits (on a watch: the moment matters) until policy `name` is Ready for its current generation.
async fn wait_policy_ready(client: &Client, name: &str) -> TracingPolicy {
    let api = Api::<TracingPolicy>::all(client.clone());
    let cond = |p: Option<&TracingPolicy>| p.is_some_and(ready);
    let found = tokio::time::timeout(PATIENCE, kube::runtime::wait::await_condition(api, name, cond))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for policy {name} to be Ready"))
        .expect("watch the policy");
    found.expect("the policy exists")
}

async fn delete_policy(client: &Client, name: &str) {
    let api = Api::<TracingPolicy>::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    let deadline = Instant::now() + PATIENCE;
    while api.get_opt(name).await.ok().flatten().is_some() {
        assert!(Instant::now() < deadline, "timed out waiting for policy {name} to be gone");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fresh controller process, once its policy is Ready, `settle` has passed since its own first
/// reconcile and it has made no write for 10 s (what the memory figures are read from).
async fn converged_fresh(client: &Client, tag: &str, settle: Duration) -> Proc {
    let controller = Proc::controller(tag);
    controller.wait_up().await;
    wait_policy_ready(client, POLICY).await;
    // The policy's status says Ready from the process before; `settle` counts from this process's own
    // first reconcile (in a big cluster its stores take seconds to sync before it).
    let deadline = Instant::now() + PATIENCE;
    while support::sum_samples(&controller.metrics().await, "crosstrace_reconciles_total") < 1.0 {
        assert!(Instant::now() < deadline, "timed out waiting for the fresh controller's first reconcile");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(settle).await;
    wait_quiet(&controller, Duration::from_secs(10)).await;
    controller
}

/// The writes the minimal client sends: exactly the operator's apply configurations, built by the
/// operator's own pure plan (`crosstrace::layers::workloads::plan`) from the same policy.
struct Limit {
    config_maps: Vec<(String, Value)>,
    injections: Vec<(ObjectKey, Value)>,
}

fn limit_patches(policy: &Value, keys: &[ObjectKey]) -> Limit {
    let spec: TracingPolicySpec = serde_json::from_value(policy["spec"].clone()).expect("policy spec");
    let older = BTreeSet::new();
    let name = policy["metadata"]["name"].as_str().expect("a policy name");
    let view = PolicyView { uid: "bench-limit", generation: 1, older: &older, ..PolicyView::new(name, &spec) };
    let defaults = Settings::default().workloads;
    let mut config_maps = BTreeMap::new();
    let mut injections = Vec::new();
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    // The plan admits up to maxConcurrent (at most 1000) new targets at once: plan in chunks.
    for chunk in keys.chunks(1000) {
        let observed: Vec<Observed> = chunk
            .iter()
            .map(|k| Observed {
                workload: std::sync::Arc::new(Workload {
                    kind: WorkloadKind::Deployment,
                    metadata: ObjectMeta {
                        name: Some(k.name.clone()),
                        namespace: Some(k.namespace.clone()),
                        labels: Some(BTreeMap::from([(PART_OF.to_string(), "bench".to_string())])),
                        ..Default::default()
                    },
                    template: Template::Full(Box::new(
                        serde_json::from_value::<PodTemplateSpec>(template(&k.name)).unwrap(),
                    )),
                    rolled_out: true,
                    ..Default::default()
                }),
                selected: true,
                ..Default::default()
            })
            .collect();
        let mut chunk_spec = spec.clone();
        chunk_spec.rollout.max_concurrent = 1000;
        let view = PolicyView { spec: &chunk_spec, ..view };
        for action in workloads::plan(view, &defaults, &observed, &[], now).actions {
            match action {
                Action::ApplyCollectorConfig { namespace, name, data, policy, policy_uid: _ } => {
                    // As controller::apply does, minus the owner reference (there is no policy object).
                    let cm = json!({
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": name, "namespace": namespace, "labels": {workloads::POLICY_LABEL: policy}},
                        "data": data,
                    });
                    config_maps.insert(namespace, cm);
                }
                Action::Inject { workload, patch, .. } => injections.push((workload, patch)),
                other => panic!("unexpected action in the limit plan: {other:?}"),
            }
        }
    }
    assert_eq!(injections.len(), keys.len(), "the plan injects every target");
    Limit { config_maps: config_maps.into_iter().collect(), injections }
}

async fn client_from(kubeconfig: &str) -> Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

fn ssa() -> PatchParams {
    PatchParams::apply(crosstrace::api::FIELD_MANAGER).force()
}

/// Sends the limit's writes (config maps first, then the injections, `concurrency` in flight).
async fn send_limit(client: &Client, limit: &Limit, concurrency: usize) {
    bounded(&limit.config_maps, concurrency, |(ns, cm)| async move {
        let name = cm["metadata"]["name"].as_str().unwrap();
        Api::<ConfigMap>::namespaced(client.clone(), ns).patch(name, &ssa(), &Patch::Apply(cm)).await.map(|_| ())
    })
    .await;
    bounded(&limit.injections, concurrency, |(key, patch)| async move {
        Api::<Deployment>::namespaced(client.clone(), &key.namespace)
            .patch(&key.name, &ssa(), &Patch::Apply(patch))
            .await
            .map(|_| ())
    })
    .await;
}

/// Takes the injection out of `keys` with the operator's own `removal_patch`.
async fn remove_injections<'a>(client: &Client, keys: impl IntoIterator<Item = &'a ObjectKey>, concurrency: usize) {
    bounded(keys, concurrency, |key| async move {
        let patch = workloads::removal_patch(WorkloadKind::Deployment, key, None);
        Api::<Deployment>::namespaced(client.clone(), &key.namespace)
            .patch(&key.name, &ssa(), &Patch::Apply(&patch))
            .await
            .map(|_| ())
    })
    .await;
}

/// The removal patches, then the config maps deleted.
async fn revert_limit(client: &Client, limit: &Limit, concurrency: usize) {
    remove_injections(client, limit.injections.iter().map(|(key, _)| key), concurrency).await;
    for (ns, cm) in &limit.config_maps {
        let name = cm["metadata"]["name"].as_str().unwrap();
        let _ = Api::<ConfigMap>::namespaced(client.clone(), ns).delete(name, &DeleteParams::default()).await;
    }
}

/// One operator rollout: the policy applied until every target runs it, then deleted until every
/// target is clean again.
struct OperatorRun {
    patched: f64,
    ready: f64,
    rolled_out: f64,
    writes: f64,
    /// The workload layer's adaptive write limit when every template was patched.
    write_limit: f64,
}

async fn operator_rollout(
    client: &Client,
    tracker: &Tracker,
    controller: &Proc,
    policy: &Value,
    n: usize,
) -> OperatorRun {
    let w0 = writes(&controller.metrics().await);
    let t0 = Instant::now();
    apply_policy(client, policy).await;
    let seen = tracker.wait("operator: pod templates patched", n, |_, s| s.hash.is_some()).await;
    let patched = last_changed(t0, &seen);
    let write_limit = write_limit(&controller.metrics().await);
    wait_policy_ready(client, POLICY).await;
    let ready = since(t0);
    let seen = tracker.wait("operator: rolled out", n, |_, s| s.hash.is_some() && s.rolled_out).await;
    let rolled_out = ready_latencies(t0, &seen).into_iter().fold(0.0, f64::max);
    let writes = writes(&controller.metrics().await) - w0;
    delete_policy(client, POLICY).await;
    tracker.wait_clean(n).await;
    OperatorRun { patched, ready, rolled_out, writes, write_limit }
}

/// The controller's `crosstrace_write_limit{layer="workloads"}`.
fn write_limit(metrics: &str) -> f64 {
    support::sum_samples(metrics, "crosstrace_write_limit{layer=\"workloads\"}")
}

/// The limit client's patch phase at `concurrency` (a fresh client: no caches; the operator's identity
/// and apply configurations), then reverted.
async fn limit_rollout(tracker: &Tracker, limit: &Limit, concurrency: usize, n: usize, kubeconfig: &str) -> f64 {
    let limit_client = client_from(kubeconfig).await;
    let t0 = Instant::now();
    send_limit(&limit_client, limit, concurrency).await;
    let seen = tracker.wait("limit: pod templates patched", n, |_, s| s.hash.is_some()).await;
    let patched = last_changed(t0, &seen);
    revert_limit(&limit_client, limit, concurrency).await;
    tracker.wait_clean(n).await;
    patched
}

/// The same apply configurations sent by one `kubectl apply --server-side` process (a List), then
/// reverted; the time until the last template is patched.
async fn kubectl_apply_rollout(client: &Client, tracker: &Tracker, limit: &Limit, n: usize) -> f64 {
    let items: Vec<Value> = limit
        .config_maps
        .iter()
        .map(|(_, cm)| cm.clone())
        .chain(limit.injections.iter().map(|(key, patch)| {
            let mut item = patch.clone();
            item["apiVersion"] = json!("apps/v1");
            item["kind"] = json!("Deployment");
            item["metadata"]["name"] = json!(key.name);
            item["metadata"]["namespace"] = json!(key.namespace);
            item
        }))
        .collect();
    let file = std::env::temp_dir().join(format!("crosstrace-bench-apply-{}.json", std::process::id()));
    std::fs::write(&file, json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()).unwrap();
    let t0 = Instant::now();
    util::kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        // Partial apply configurations, as the operator sends: kubectl's client-side schema check wants
        // whole objects (the API server still validates what it gets).
        "--validate=false",
        &format!("--field-manager={}", crosstrace::api::FIELD_MANAGER),
        "-f",
        file.to_str().unwrap(),
    ]);
    let seen = tracker.wait("kubectl apply: pod templates patched", n, |_, s| s.hash.is_some()).await;
    let patched = last_changed(t0, &seen);
    let _ = std::fs::remove_file(&file);
    revert_limit(client, limit, 8).await;
    tracker.wait_clean(n).await;
    patched
}

/// Creates the targets `keys` (those that exist stay), takes any injection out (left over from an
/// interrupted run) and waits until every one of them is clean and rolled out.
async fn ensure_targets(client: &Client, tracker: &Tracker, keys: &[ObjectKey], replicas: u32, role: &str) {
    let t0 = Instant::now();
    bounded(keys, 16, |key| async move {
        let api = Api::<Deployment>::namespaced(client.clone(), &key.namespace);
        let d: Deployment = serde_json::from_value(target_deployment(key, replicas, role)).unwrap();
        ignore_exists(api.create(&PostParams::default(), &d).await)
    })
    .await;
    let n = keys.len();
    tracker.wait("targets listed", n, |_, _| true).await;
    let leftovers: Vec<ObjectKey> = tracker
        .hashes()
        .into_iter()
        .filter(|(_, h)| h.is_some())
        .filter_map(|(k, _)| k.split_once('/').map(|(ns, name)| ObjectKey::new(ns, name)))
        .collect();
    remove_injections(client, &leftovers, 8).await;
    tracker.wait_clean(n).await;
    println!("  setup: {n} targets ({role}, replicas {replicas}) rolled out after {}", secs(since(t0)));
}

/// Scenario 1 at one size: per run the operator's patch phase and the best of the limit client's sweep.
struct SizeRuns {
    targets: usize,
    op_patched: Vec<f64>,
    limit_best: Vec<f64>,
    ratios: Vec<f64>,
}

fn list(v: &[f64]) -> String {
    v.iter().map(|r| format!("{r:.2}x")).collect::<Vec<_>>().join(", ")
}

/// Every run pairs the operator with its baselines, interleaved (the order turned around every other
/// run): the limit client at each concurrency of the sweep (its best is that run's limit) and one
/// `kubectl apply --server-side` process. A ratio is the median of the per-run ratios.
async fn rollout_runs(
    client: &Client,
    tracker: &Tracker,
    controller: &Proc,
    cfg: &Config,
    keys: &[ObjectKey],
    report: &mut Report,
) -> (SizeRuns, Value, Limit) {
    let n = keys.len();
    let policy_on = policy("0.5", cfg.max_concurrent);
    let controller_kubeconfig = format!("{}/controller.kubeconfig", std::env::var("CROSSTRACE_E2E_STATE").unwrap());
    let limit = limit_patches(&policy_on, keys);
    let sweep = if cfg.limit_sweep.is_empty() { vec![cfg.write_concurrency] } else { cfg.limit_sweep.clone() };
    let (mut op_patched, mut op_ready, mut op_writes, mut limit_best) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ratios, mut kubectl_ratios, mut runs_json) = (Vec::new(), Vec::new(), Vec::new());
    let mut same_concurrency = Vec::new();
    for run in 0..cfg.runs {
        let operator_first = run % 2 == 0;
        let mut op = None;
        if operator_first {
            op = Some(operator_rollout(client, tracker, controller, &policy_on, n).await);
        }
        let mut limits = Vec::new();
        for &c in &sweep {
            limits.push((c, limit_rollout(tracker, &limit, c, n, &controller_kubeconfig).await));
        }
        let kubectl_s = kubectl_apply_rollout(client, tracker, &limit, n).await;
        if !operator_first {
            op = Some(operator_rollout(client, tracker, controller, &policy_on, n).await);
        }
        let op = op.expect("the operator ran");
        let (best_c, best) = limits.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)).expect("a sweep");
        ratios.push(op.patched / best);
        if let Some((_, t)) = limits.iter().find(|(c, _)| *c == cfg.write_concurrency) {
            same_concurrency.push(op.patched / t);
        }
        kubectl_ratios.push(op.patched / kubectl_s);
        op_patched.push(op.patched);
        op_ready.push(op.ready);
        op_writes.push(op.writes);
        limit_best.push(best);
        println!(
            "  {n} targets, run {}: operator patched {} ready {} | limit best {} (c={best_c}) -> {:.2}x | kubectl apply {}",
            run + 1,
            secs(op.patched),
            secs(op.ready),
            secs(best),
            op.patched / best,
            secs(kubectl_s)
        );
        runs_json.push(json!({
            "order": if operator_first { "operator first" } else { "baselines first" },
            "operator": {"patched_s": op.patched, "ready_s": op.ready, "rolled_out_s": op.rolled_out, "writes": op.writes,
                "write_limit_when_patched": op.write_limit},
            "limit_by_concurrency": limits.iter().map(|(c, t)| json!({"concurrency": c, "patched_s": t})).collect::<Vec<_>>(),
            "limit_best": {"concurrency": best_c, "patched_s": best},
            "kubectl_apply_server_side_s": kubectl_s,
            "ratio_operator_over_limit": op.patched / best,
            "ratio_operator_over_kubectl_apply": op.patched / kubectl_s,
        }));
    }
    let ratio = median(&ratios);
    report
        .row(
            "1 rollout",
            format!("apply -> last of {n} pod templates patched / limit at its best concurrency"),
            format!("{ratio:.2}x"),
        )
        .baseline(format!("median of {} paired runs: {}", cfg.runs, list(&ratios)))
        .ratio(ratio)
        .goal("<= 1.10x limit", ratio, 1.10, true);
    if !same_concurrency.is_empty() {
        let m = median(&same_concurrency);
        report
            .row(
                "1 rollout",
                format!("same ({n}), vs the limit at the operator's write concurrency ({})", cfg.write_concurrency),
                format!("{m:.2}x"),
            )
            .baseline(format!("median of paired runs: {}", list(&same_concurrency)))
            .ratio(m);
    }
    report
        .row(
            "1 rollout",
            format!("same ({n}), vs one `kubectl apply --server-side` process"),
            format!("{:.2}x", median(&kubectl_ratios)),
        )
        .baseline(format!("median of paired runs: {}", list(&kubectl_ratios)))
        .ratio(median(&kubectl_ratios));
    report.row(
        "1 rollout",
        format!("operator ({n}): apply -> last template patched / -> policy Ready (median of {})", cfg.runs),
        format!("{} / {}", secs(median(&op_patched)), secs(median(&op_ready))),
    );
    report.row("1 rollout", format!("operator API writes per rollout ({n})"), format!("{:.0}", median(&op_writes)));
    let json = json!({
        "targets": n, "replicas": cfg.replicas, "namespaces": cfg.namespaces, "runs": cfg.runs,
        "write_concurrency": cfg.write_concurrency, "policy_max_concurrent": cfg.max_concurrent,
        "limit_sweep": sweep,
        "method": "per run: the operator, the limit client at every concurrency of the sweep, one kubectl apply --server-side process, interleaved (operator first in even runs, last in odd ones), each reverted before the next; the ratio of a run is the operator's patch phase over its best limit; a reported ratio is the median of the per-run ratios",
        "runs_raw": runs_json,
        "ratios_operator_over_limit": ratios, "median_ratio_operator_over_limit": ratio,
        "ratios_operator_over_limit_at_write_concurrency": same_concurrency,
        "ratios_operator_over_kubectl_apply": kubectl_ratios, "median_ratio_operator_over_kubectl_apply": median(&kubectl_ratios),
    });
    (SizeRuns { targets: n, op_patched, limit_best, ratios }, json, limit)
}

/// kubectl: one process per Deployment, sequential; a sample, extrapolated to N (not paired).
async fn kubectl_patch_loop(
    client: &Client,
    tracker: &Tracker,
    limit: &Limit,
    cfg: &Config,
    op: f64,
    report: &mut Report,
) -> Value {
    let n = limit.injections.len();
    let sample = cfg.kubectl_sample.min(n);
    let dir = std::env::temp_dir().join(format!("crosstrace-bench-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t0 = Instant::now();
    for (ns, cm) in &limit.config_maps {
        let file = dir.join(format!("cm-{ns}.json"));
        std::fs::write(&file, cm.to_string()).unwrap();
        util::kubectl(&["apply", "--server-side", "--field-manager=crosstrace", "-f", file.to_str().unwrap()]);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let t_cms = since(t0);
    let t1 = Instant::now();
    for (key, patch) in limit.injections.iter().take(sample) {
        util::kubectl(&[
            "patch",
            "deployment",
            &key.name,
            "-n",
            &key.namespace,
            "--type=strategic",
            "--field-manager=crosstrace",
            "-p",
            &patch.to_string(),
        ]);
    }
    let t_sample = since(t1);
    let kubectl_total = t_cms + t_sample * n as f64 / sample as f64;
    tracker.wait("kubectl: sample patched", sample, |_, s| s.hash.is_some()).await;
    // Revert the sample: put the original object back (a PUT removes what the patches added).
    for (key, _) in limit.injections.iter().take(sample) {
        let api = Api::<Deployment>::namespaced(client.clone(), &key.namespace);
        // A read-modify-write: the Deployment controller writes the status meanwhile (409: again).
        for attempt in 1.. {
            let mut d = api.get(&key.name).await.expect("get");
            d.metadata.annotations.as_mut().map(|a| a.remove(RECORD_ANNOTATION));
            d.metadata.labels.as_mut().map(|l| l.remove(workloads::POLICY_LABEL));
            d.spec.as_mut().unwrap().template = serde_json::from_value(template(&key.name)).unwrap();
            d.metadata.managed_fields = None;
            match api.replace(&key.name, &PostParams::default(), &d).await {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 409 && attempt < 10 => continue,
                Err(e) => panic!("revert kubectl sample: {e}"),
            }
        }
    }
    for (ns, cm) in &limit.config_maps {
        let name = cm["metadata"]["name"].as_str().unwrap();
        let _ = Api::<ConfigMap>::namespaced(client.clone(), ns).delete(name, &DeleteParams::default()).await;
    }
    tracker.wait_clean(n).await;
    report
        .row("1 rollout", format!("same ({n}), vs a kubectl patch loop (one process per object)"), secs(op))
        .baseline(format!("kubectl {} (sample {sample}, extrapolated)", secs(kubectl_total)))
        .ratio(op / kubectl_total);
    json!({"sample": sample, "config_maps_s": t_cms, "sample_s": t_sample, "extrapolated_s": kubectl_total,
        "method": "one `kubectl patch --type=strategic` process per Deployment, sequential; the sample time scaled to N, plus the config maps; not paired"})
}

/// patch(large)/patch(small) of the operator over the limit's own ratio, paired run by run (run i of
/// one size with run i of the other).
fn linearity(small: &SizeRuns, large: &SizeRuns, report: &mut Report) -> Value {
    let per_run: Vec<f64> = (0..small.op_patched.len().min(large.op_patched.len()))
        .map(|i| (large.op_patched[i] / small.op_patched[i]) / (large.limit_best[i] / small.limit_best[i]))
        .collect();
    let m = median(&per_run);
    report
        .row(
            "1 rollout",
            format!("patch({}) / patch({}), over the limit's own ratio", large.targets, small.targets),
            format!("{m:.2}x"),
        )
        .baseline(format!("median of runs paired by index: {}", list(&per_run)))
        .ratio(m)
        .goal("<= 1.05x (linear)", m, 1.05, true);
    json!({"small": small.targets, "large": large.targets, "per_run": per_run, "median": m,
        "method": "per run index i: (operator patch at the large size / at the small) / (limit best at the large / at the small); the median over i"})
}

const READY_NAMESPACE: &str = "ct-bench-r0";
const READY_POLICY: &str = "bench-r0";
/// The namespace of the hops-alone baseline's Deployments, and the policy name their records carry: no
/// policy selects them, and no policy of that name exists.
const HOPS_NAMESPACE: &str = "ct-bench-h0";
const HOPS_POLICY: &str = "bench-h0";

/// The Kubernetes hops of a change alone, without crosstrace: the apply configurations crosstrace
/// would write for the change to `ratio` (its own pure plan, as the limit client's) sent straight to
/// `keys` (all at once, 16 in flight), then every one of them awaited until the controller manager
/// reports it rolled out. Seconds from the first write to the last target rolled out.
async fn hops_alone(client: &Client, tracker: &Tracker, keys: &[ObjectKey], ratio: &str) -> f64 {
    let limit = limit_patches(&named_policy(HOPS_POLICY, "h0", ratio, Some(keys.len())), keys);
    let before = tracker.hashes();
    let t0 = Instant::now();
    send_limit(client, &limit, 16).await;
    let changed = changed_since(&before);
    let seen =
        tracker.wait("hops alone: changed and rolled out", keys.len(), |k, s| changed(k, s) && s.rolled_out).await;
    ready_latencies(t0, &seen).into_iter().fold(0.0, f64::max)
}

/// Scenario 4 on a small policy: `ready_targets` Deployments with replicas 0 (a rollout is the
/// controller manager's bookkeeping only), `ready_runs` sampling changes each, once with every target
/// in one batch and once with the API's default rollout (health-gated batches). Per change: the apply's
/// own round trip (one SSA), the controller's first write after it (its collector ConfigMap or a
/// target's template, whichever the bench's watches see first), and the policy Ready again.
async fn ready_runs(client: &Client, cfg: &Config, report: &mut Report) -> Value {
    let k = cfg.ready_targets;
    ensure_namespace(client, READY_NAMESPACE, json!({TARGET_LABEL: "r0"})).await;
    let tracker = Tracker::start(client, "r0");
    // When the policy's collector ConfigMap changed, as the bench's watch sees it.
    let config_changes: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let config_watch = {
        let changes = config_changes.clone();
        let api = Api::<ConfigMap>::namespaced(client.clone(), READY_NAMESPACE);
        let selector = format!("{}={READY_POLICY}", workloads::POLICY_LABEL);
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default().labels(&selector)).boxed();
            while let Some(event) = stream.next().await {
                if let Ok(watcher::Event::Apply(_)) = event {
                    changes.lock().unwrap().push(Instant::now());
                }
            }
        })
    };
    let keys: Vec<ObjectKey> = (0..k).map(|i| ObjectKey::new(READY_NAMESPACE, format!("r-{i:04}"))).collect();
    ensure_targets(client, &tracker, &keys, 0, "r0").await;
    // The baseline's own Deployments (the same number, replicas 0), injected once as crosstrace would.
    ensure_namespace(client, HOPS_NAMESPACE, json!({TARGET_LABEL: "h0"})).await;
    let hops_tracker = Tracker::start(client, "h0");
    let hops_keys: Vec<ObjectKey> = (0..k).map(|i| ObjectKey::new(HOPS_NAMESPACE, format!("h-{i:04}"))).collect();
    ensure_targets(client, &hops_tracker, &hops_keys, 0, "h0").await;
    hops_alone(client, &hops_tracker, &hops_keys, "0.25").await;
    let mut out = Vec::new();
    for (label, max_concurrent) in
        [(format!("maxConcurrent {k}"), Some(k.min(1000))), ("default rollout".to_string(), None)]
    {
        apply_policy(client, &named_policy(READY_POLICY, "r0", "0.25", max_concurrent)).await;
        wait_policy_ready(client, READY_POLICY).await;
        tracker.wait("small policy converged", k, |_, s| s.hash.is_some() && s.rolled_out).await;
        let (mut to_ready, mut first, mut rtt, mut ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut applied_at: Vec<u128> = Vec::new();
        // Where each change's time to Ready went: to its last template patched (the controller's writes),
        // to its last target rolled out (the controller manager), then to Ready (the controller again).
        let (mut patched, mut rolled_out) = (Vec::new(), Vec::new());
        // The same change's Kubernetes hops alone, interleaved with crosstrace's, and their paired ratios.
        let (mut hops, mut over_hops) = (Vec::new(), Vec::new());
        for run in 0..cfg.ready_runs {
            let ratio = if run % 2 == 0 { "0.5" } else { "0.25" };
            let before = tracker.hashes();
            let t0 = Instant::now();
            let round_trip = apply_policy(client, &named_policy(READY_POLICY, "r0", ratio, max_concurrent)).await;
            let applied = Instant::now();
            // The wall-clock moment too, to set each change beside the controller's log.
            applied_at.push(unix_ms());
            wait_policy_ready(client, READY_POLICY).await;
            to_ready.push(since(t0));
            let changed = changed_since(&before);
            let seen =
                tracker.wait("small policy changed and rolled out", k, |key, s| changed(key, s) && s.rolled_out).await;
            let first_config = config_changes.lock().unwrap().iter().copied().find(|t| *t >= applied);
            let first_write = seen
                .iter()
                .map(|s| s.changed_at)
                .chain(first_config)
                .map(|t| t.saturating_duration_since(applied).as_secs_f64())
                .fold(f64::INFINITY, f64::min);
            first.push(first_write);
            patched.push(last_changed(t0, &seen));
            rolled_out.push(ready_latencies(t0, &seen).into_iter().fold(0.0, f64::max));
            rtt.push(round_trip);
            ratios.push(first_write / round_trip);
            let alone = hops_alone(client, &hops_tracker, &hops_keys, ratio).await;
            over_hops.push(to_ready[run] / alone);
            hops.push(alone);
        }
        let (p50, p99) = (quantile(&to_ready, 0.5), quantile(&to_ready, 0.99));
        let over_hops_median = median(&over_hops);
        report
            .row(
                "4 latency",
                format!("sampling change -> Ready, {k} targets (replicas 0), {label}: p50 / p99 of {}", cfg.ready_runs),
                format!("{} / {}", secs(p50), secs(p99)),
            )
            .baseline(format!(
                "the Kubernetes hops alone (the same writes sent directly, rollouts awaited): p50 {} / p99 {}",
                secs(quantile(&hops, 0.5)),
                secs(quantile(&hops, 0.99))
            ))
            .ratio(over_hops_median)
            .goal("p99 < 5 s", p99, 5.0, true);
        report.row(
            "4 latency",
            format!("same ({label}): change -> last template patched / -> last target rolled out, p50"),
            format!("{} / {}", secs(median(&patched)), secs(median(&rolled_out))),
        );
        let m = median(&ratios);
        report
            .row(
                "4 latency",
                format!("change -> first write / the change's own SSA round trip ({label})"),
                format!("{m:.2}x"),
            )
            .baseline(format!("median first write {}, round trip {}", secs(median(&first)), secs(median(&rtt))))
            .ratio(m)
            .goal("<= 2x one SSA round trip", m, 2.0, true);
        out.push(json!({
            "rollout": label, "max_concurrent": max_concurrent, "targets": k, "runs": cfg.ready_runs,
            "change_to_ready_s": to_ready, "p50_s": p50, "p99_s": p99,
            "change_to_last_patched_s": patched, "change_to_last_rolled_out_s": rolled_out,
            "first_write_s": first, "ssa_round_trip_s": rtt, "ratios_first_write_over_round_trip": ratios,
            "median_ratio": m, "applied_at_unix_ms": applied_at, "hops_alone_s": hops, "ratios_change_to_ready_over_hops_alone": over_hops,
            "median_ratio_over_hops_alone": over_hops_median,
        }));
        delete_policy(client, READY_POLICY).await;
        tracker.wait_clean(k).await;
    }
    config_watch.abort();
    json!({
        "scenarios": out,
        "method": "per change: t0, then the policy's server-side apply (its duration = one SSA round trip); applied_at_unix_ms = the wall-clock moment that apply returned (to set beside the controller's log); first write = the earliest moment after that apply returned that the bench's watches saw the policy's collector ConfigMap change or a target's template carry the new injection; Ready = a watch on the policy saw Ready for the new generation; p99 nearest rank over the changes; the first-write ratio is the median of the per-change ratios; after each change, the hops alone: the same number of Deployments (replicas 0) in a namespace no policy selects get the apply configurations crosstrace's plan builds for the same change, sent directly (16 in flight), and the time from the first write until the last is rolled out; the ratio over the hops is the median of the per-change (change -> Ready) / (hops alone)",
    })
}

pub async fn run(client: &Client, scenarios: &[u8], report: &mut Report) {
    let cfg = Config::from_env();
    let n = *cfg.sizes.last().unwrap();
    let keys: Vec<ObjectKey> = (0..n).map(|i| target(i, cfg.namespaces)).collect();
    println!(
        "workloads: {:?} targets (replicas {}) in {} namespaces, runs {}, write concurrency {}, policy maxConcurrent {}",
        cfg.sizes, cfg.replicas, cfg.namespaces, cfg.runs, cfg.write_concurrency, cfg.max_concurrent
    );

    // Setup: no policy (one left by an interrupted run is deleted with a controller up to revert it),
    // the targets of the first size exist, nothing injected, everything rolled out.
    let mut controller = Proc::controller("main");
    controller.wait_up().await;
    delete_policy(client, POLICY).await;
    for i in 0..cfg.namespaces {
        ensure_namespace(client, &namespace(i), json!({TARGET_LABEL: "on"})).await;
    }
    let tracker = Tracker::start(client, "target");
    ensure_targets(client, &tracker, &keys[..cfg.sizes[0]], cfg.replicas, "target").await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let empty = controller.stats();
    println!("  controller without policy: RSS {}", mib(empty.rss_kib as f64));
    let metrics_start = controller.metrics().await;

    // ---- Scenario 1: rollout speed, at every size -----------------------------------------------
    let policy_on = policy("0.5", cfg.max_concurrent);
    let mut rollouts_done = 0usize;
    let mut sizes_json = Vec::new();
    let mut size_runs: Vec<SizeRuns> = Vec::new();
    for (i, &size) in cfg.sizes.iter().enumerate() {
        ensure_targets(client, &tracker, &keys[..size], cfg.replicas, "target").await;
        if !scenarios.contains(&1) {
            continue;
        }
        let (runs, mut json, limit) = rollout_runs(client, &tracker, &controller, &cfg, &keys[..size], report).await;
        rollouts_done += cfg.runs;
        if i == 0 {
            json["kubectl_patch_loop"] =
                kubectl_patch_loop(client, &tracker, &limit, &cfg, median(&runs.op_patched), report).await;
        }
        sizes_json.push(json);
        size_runs.push(runs);
    }
    if scenarios.contains(&1) {
        let linear = match (size_runs.first(), size_runs.last()) {
            (Some(small), Some(large)) if size_runs.len() > 1 => linearity(small, large, report),
            _ => Value::Null,
        };
        let ratios: Vec<_> = size_runs.iter().map(|r| json!({"targets": r.targets, "ratios": r.ratios})).collect();
        report.json.insert("rollout", json!({"sizes": sizes_json, "linearity": linear, "summary": ratios}));
    }

    // ---- The long-running controller's steady memory, after rollouts and deletes ---------------
    while rollouts_done < cfg.long_rollouts {
        let op = operator_rollout(client, &tracker, &controller, &policy_on, n).await;
        rollouts_done += 1;
        println!("  rollout {rollouts_done} of {}: ready {}", cfg.long_rollouts, secs(op.ready));
    }
    wait_quiet(&controller, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let long_steady = controller.stats();
    println!(
        "  long-running controller after {rollouts_done} rollouts and deletes: RSS {}",
        mib(long_steady.rss_kib as f64)
    );

    // ---- Scenario 4: policy change -> Ready ------------------------------------------------------
    apply_policy(client, &policy_on).await;
    wait_policy_ready(client, POLICY).await;
    tracker.wait("converged", n, |_, s| s.hash.is_some() && s.rolled_out).await;
    if scenarios.contains(&4) {
        let small = ready_runs(client, &cfg, report).await;
        report.json.insert("ready", small);
        let mut to_ready = Vec::new();
        let mut patched = Vec::new();
        let mut per_target: Vec<f64> = Vec::new();
        let h0 = util::histogram(&controller.metrics().await, "crosstrace_reconcile_duration_seconds");
        for run in 0..cfg.change_runs {
            let ratio = if run % 2 == 0 { "0.25" } else { "0.5" };
            let before = tracker.hashes();
            let t0 = Instant::now();
            apply_policy(client, &policy(ratio, cfg.max_concurrent)).await;
            let changed = changed_since(&before);
            let seen = tracker.wait("sampling change patched", n, &changed).await;
            patched.push(last_changed(t0, &seen));
            wait_policy_ready(client, POLICY).await;
            to_ready.push(since(t0));
            let seen = tracker.wait("sampling change rolled out", n, |k, s| changed(k, s) && s.rolled_out).await;
            per_target.extend(ready_latencies(t0, &seen));
            println!("  change run {}: patched {} Ready {}", run + 1, secs(patched[run]), secs(to_ready[run]));
        }
        let metrics = controller.metrics().await;
        let all = util::histogram_delta(
            &util::histogram(&metrics_start, "crosstrace_reconcile_duration_seconds"),
            &util::histogram(&metrics, "crosstrace_reconcile_duration_seconds"),
        );
        let change = util::histogram_delta(&h0, &util::histogram(&metrics, "crosstrace_reconcile_duration_seconds"));
        // Raw per-reconcile durations from the controller's log (one `reconciled took_us=` line each).
        let raw = controller.reconcile_durations();
        let (p50, p99) = (quantile(&raw, 0.5), quantile(&raw, 0.99));
        let count = raw.len();
        // What the p99 is made of: the parts of the slowest 1% of the reconciles.
        let slowest = controller.slowest_reconciles(0.01);
        println!("  the slowest 1% of the reconciles, medians (ms): {}", serde_json::Value::Object(slowest.clone()));
        report
            .row(
                "4 latency",
                format!("reconcile p50 / p99 ({count} reconciles, scenarios 1+4, raw durations)"),
                format!("{} / {}", secs(p50), secs(p99)),
            )
            .goal("p99 < 100 ms", p99, 0.1, true);
        report
            .row(
                "4 latency",
                format!("sampling change -> policy Ready, {n} targets (median of {})", cfg.change_runs),
                secs(median(&to_ready)),
            )
            .baseline(format!("last template patched {}", secs(median(&patched))));
        report.row(
            "4 latency",
            "sampling change -> each target rolled out, p50 / p99",
            format!("{} / {}", secs(quantile(&per_target, 0.5)), secs(quantile(&per_target, 0.99))),
        );
        report.json.insert(
            "latency",
            json!({
                "targets": n, "runs": cfg.change_runs,
                "reconcile_duration": {
                    "method": "every reconcile's duration as the controller logs it (debug `reconciled took_us`), from its start to the end of scenario 4; nearest-rank quantiles of the raw samples; the histogram's deltas beside them",
                    "count": count, "p50_s": p50, "p99_s": p99, "raw_s": raw,
                    "slowest_1pct_parts_median": slowest,
                    "histogram_buckets": all, "histogram_sampling_change_only": change,
                },
                "change_to_ready_s": to_ready, "change_patched_s": patched,
                "per_target_rolled_out_p50_s": quantile(&per_target, 0.5), "per_target_rolled_out_p99_s": quantile(&per_target, 0.99),
            }),
        );
    }

    // ---- Scenario 3: idle cost -----------------------------------------------------------------
    wait_quiet(&controller, Duration::from_secs(15)).await;
    if scenarios.contains(&3) {
        let idle = util::Idle::measure(client, &controller, cfg.idle).await;
        idle.rows(report, "3 idle", 0.5);
        report.json.insert("idle", idle.json());
    }

    // ---- Scenario 2: memory --------------------------------------------------------------------
    if scenarios.contains(&2) {
        let settle = Duration::from_secs(30);
        let long = controller.stats();
        drop(controller);
        controller = converged_fresh(client, "targets", settle).await;
        let fresh_n = controller.stats();
        println!(
            "  controller with {n} targets: RSS {} peak {}",
            mib(fresh_n.rss_kib as f64),
            mib(fresh_n.hwm_kib as f64)
        );

        let (m, p) = (cfg.nontargets, cfg.pods);
        let extra_ns = 10usize;
        for i in 0..extra_ns {
            ensure_namespace(client, &format!("ct-bench-extra-{i}"), json!({})).await;
        }
        let t0 = Instant::now();
        bounded(0..m, 32, |i| async move {
            let ns = format!("ct-bench-extra-{}", i % extra_ns);
            let name = format!("x-{i:06}");
            let d: Deployment = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns, "labels": {TARGET_LABEL: "extra", PART_OF: "other"}},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}}, "template": {
                    "metadata": {"labels": {"app": name, PART_OF: "other"}},
                    "spec": {"containers": [{"name": "app", "image": "other/app:1"}]},
                }},
            }))
            .unwrap();
            ignore_exists(Api::<Deployment>::namespaced(client.clone(), &ns).create(&PostParams::default(), &d).await)
        })
        .await;
        let nodes = support::agents::node_count();
        bounded(0..p, 32, |i| async move {
            let ns = format!("ct-bench-extra-{}", i % extra_ns);
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("p-{i:06}"), "namespace": ns, "labels": {TARGET_LABEL: "extra-pod"}},
                "spec": {"nodeName": support::agents::node_name(i % nodes), "containers": [{"name": "app", "image": "other/idle:1"}]},
            }))
            .unwrap();
            ignore_exists(Api::<Pod>::namespaced(client.clone(), &ns).create(&PostParams::default(), &pod).await)
        })
        .await;
        println!("  created {m} non-target Deployments and {p} pods in {}", secs(since(t0)));
        // A reconcile in the bigger cluster (an annotation change wakes the policy, nothing to write).
        let poke = json!({"metadata": {"annotations": {"bench.crosstrace.dev/poke": format!("{}", since(t0))}}});
        Api::<TracingPolicy>::all(client.clone())
            .patch(POLICY, &PatchParams::default(), &Patch::Merge(&poke))
            .await
            .expect("poke policy");
        tokio::time::sleep(settle).await;
        let same_process = controller.stats();
        drop(controller);
        controller = converged_fresh(client, "cluster", settle).await;
        let fresh_big = controller.stats();
        let per_target = (fresh_n.rss_kib as f64 - empty.rss_kib as f64) / n as f64;
        let per_object = (fresh_big.rss_kib as f64 - fresh_n.rss_kib as f64) / (m + p).max(1) as f64;
        report
            .row(
                "2 memory",
                format!("RSS steady, {n} targets + {m} non-target Deployments + {p} pods"),
                mib(fresh_big.rss_kib as f64),
            )
            .baseline(format!(
                "{} with {n} targets only, {} with none",
                mib(fresh_n.rss_kib as f64),
                mib(empty.rss_kib as f64)
            ))
            .goal("<= 64 MiB", fresh_big.rss_kib as f64 / 1024.0, 64.0, true);
        report.row("2 memory", "KiB per target", format!("{per_target:.2}"));
        if m + p > 0 {
            report
                .row("2 memory", "KiB per non-target object", format!("{per_object:.3}"))
                .goal("<= 2 KiB", per_object, 2.0, true);
        }
        let peak_ratio = fresh_big.hwm_kib as f64 / fresh_big.rss_kib.max(1) as f64;
        report
            .row("2 memory", "peak (VmHWM) / steady, fresh start in the big cluster", mib(fresh_big.hwm_kib as f64))
            .ratio(peak_ratio)
            .goal("peak <= 1.5x steady", peak_ratio, 1.5, true);
        report
            .row(
                "2 memory",
                format!("RSS steady, the long-running controller after {rollouts_done} rollouts and deletes"),
                mib(long_steady.rss_kib as f64),
            )
            .baseline(format!("a fresh one at {n} targets {}", mib(fresh_n.rss_kib as f64)))
            .goal("<= 64 MiB", long_steady.rss_kib as f64 / 1024.0, 64.0, true);
        let long_ratio = long.hwm_kib as f64 / long_steady.rss_kib.max(1) as f64;
        report
            .row("2 memory", "peak of the long-running controller / its steady RSS", mib(long.hwm_kib as f64))
            .baseline(format!("RSS after the rollouts and changes {}", mib(long.rss_kib as f64)))
            .ratio(long_ratio)
            .goal("peak <= 1.5x steady", long_ratio, 1.5, true);
        report.json.insert(
            "memory",
            json!({
                "targets": n, "nontarget_deployments": m, "pods": p,
                "no_policy": empty, "targets_fresh": fresh_n, "big_cluster_same_process": same_process,
                "big_cluster_fresh": fresh_big, "long_running_after_rollouts": long,
                "long_running_steady": {"rollouts_and_deletes": rollouts_done, "stats": long_steady},
                "kib_per_target": per_target, "kib_per_nontarget_object": per_object,
                "method": "VmRSS / VmHWM from /proc/<pid>/status of the controller host process, each a fresh start that converged and settled 30 s with no write; per-target = (RSS at N - RSS with no policy) / N; per-object = (RSS with the extra objects - RSS at N) / (non-target Deployments + pods)",
            }),
        );
    }

    // ---- Cleanup -------------------------------------------------------------------------------
    delete_policy(client, POLICY).await;
    drop(controller);
    let mut namespaces: Vec<String> = (0..cfg.namespaces).map(namespace).collect();
    namespaces.push(READY_NAMESPACE.to_string());
    namespaces.push(HOPS_NAMESPACE.to_string());
    namespaces.extend((0..10).map(|i| format!("ct-bench-extra-{i}")));
    for ns in namespaces {
        let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &DeleteParams::background()).await;
    }
}
