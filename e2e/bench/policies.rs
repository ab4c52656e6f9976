//! Scenario 6: many policies side by side (issue 13, "50 policies x 200 targets"). P policies, each
//! selecting exactly its own T Deployments, are applied at once with the default rollout settings
//! (no `maxConcurrent`: the path most users take); then the converged controller is watched over an
//! idle window, where it should write nothing but its Lease and spend under 0.5% of a core.
//!
//! The targets have no replicas: what is measured is the controller's work per policy and per target,
//! not kwok scheduling P x T pods. They keep no old ReplicaSets (revisionHistoryLimit 0), so the
//! injection and its revert leave etcd as small as they found it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crosstrace::api::TracingPolicy;
use crosstrace::layers::health;
use crosstrace::layers::workloads::{POLICY_LABEL as INJECTED_LABEL, RECORD_ANNOTATION};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::util::{
    self, PATIENCE, Proc, bounded, ensure_namespace, ignore_exists, knob, median, since, wait_quiet, writes,
};
use crate::{Report, mib, secs, support};

const SCENARIO: &str = "6 policies";
/// On the scenario's namespaces (what the policies' namespace selector matches) and on its policies
/// (how a rerun finds what an interrupted run left).
const SCOPE_LABEL: &str = "crosstrace-bench-pol";
/// On each target and its pod template: `p-KK`, the policy that selects it.
const POLICY_LABEL: &str = "crosstrace-bench-policy";
const NAMESPACES: usize = 10;

fn namespace(i: usize) -> String {
    format!("ct-bench-pol-{i}")
}

fn policy_name(p: usize) -> String {
    format!("bench-pol-{p:02}")
}

fn selector(p: usize) -> String {
    format!("p-{p:02}")
}

/// Target `t` of policy `p`: (namespace, Deployment). Consecutive targets go to different namespaces,
/// so every policy spans all of them.
fn target(p: usize, t: usize, per_policy: usize) -> (String, Value) {
    let ns = namespace((p * per_policy + t) % NAMESPACES);
    let name = format!("p-{p:02}-t-{t:04}");
    let labels = json!({"app": name, POLICY_LABEL: selector(p)});
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {POLICY_LABEL: selector(p)}},
        "spec": {
            "replicas": 0,
            "revisionHistoryLimit": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "app", "image": "bench/app:1"}]}},
        },
    });
    (ns, deployment)
}

fn policy(p: usize) -> Value {
    json!({
        "apiVersion": "crosstrace.dev/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": policy_name(p), "labels": {SCOPE_LABEL: "on"}},
        "spec": {
            "collector": {"endpoint": "otel-gateway.observability.svc:4317"},
            "sampling": {"ratio": "0.5"},
            "workloads": {
                "namespaceSelector": {"matchLabels": {SCOPE_LABEL: "on"}},
                "selector": {"matchLabels": {POLICY_LABEL: selector(p)}},
                "kinds": ["Deployment"],
            },
        },
    })
}

fn policies_api(client: &Client) -> Api<TracingPolicy> {
    Api::all(client.clone())
}

async fn list_policies(client: &Client) -> Vec<TracingPolicy> {
    policies_api(client)
        .list(&ListParams::default().labels(&format!("{SCOPE_LABEL}=on")))
        .await
        .expect("list policies")
        .items
}

/// Deletes the scenario's policies (the controller reverts their targets) and waits until they are gone.
async fn delete_policies(client: &Client) {
    let api = policies_api(client);
    for p in list_policies(client).await {
        let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = list_policies(client).await.len();
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {left} policies to be gone");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Seconds from `t0` until each policy was first seen Ready, by name. A Ready policy must count all its
/// targets selected and ready: otherwise the selection is not what the scenario says it measures.
async fn wait_all_ready(client: &Client, count: usize, per_policy: usize, t0: Instant) -> BTreeMap<String, f64> {
    let mut ready_at = BTreeMap::new();
    let deadline = Instant::now() + PATIENCE;
    let mut last_report = Instant::now();
    while ready_at.len() < count {
        for p in list_policies(client).await.iter().filter(|p| util::ready(p)) {
            let name = p.name_any();
            if ready_at.contains_key(&name) {
                continue;
            }
            let layer = p.status.as_ref().and_then(|s| s.workloads.clone()).unwrap_or_default();
            let want = i32::try_from(per_policy).unwrap_or(i32::MAX);
            assert!(
                layer.selected == want && layer.ready == want,
                "{name} is Ready with {}/{} targets ready, not {per_policy}/{per_policy}",
                layer.ready,
                layer.selected
            );
            ready_at.insert(name, since(t0));
        }
        assert!(Instant::now() < deadline, "timed out waiting for the policies: {}/{count} Ready", ready_at.len());
        if last_report.elapsed() > Duration::from_secs(30) {
            println!("    ... waiting for the policies: {}/{count} Ready", ready_at.len());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ready_at
}

/// Waits until `total` targets exist, none carries an injection (record annotation or policy label) and
/// all are rolled out. Rolled out matters: the Deployment controller catches up with thousands of new
/// Deployments slowly, and its backlog from the setup would otherwise be timed as the operator's rollout.
async fn wait_targets_clean(client: &Client, total: usize) {
    let api = Api::<Deployment>::all(client.clone());
    let deadline = Instant::now() + PATIENCE;
    let mut last_report = Instant::now();
    loop {
        let listed = api.list(&ListParams::default().labels(POLICY_LABEL)).await.expect("list targets").items;
        let clean = listed
            .iter()
            .filter(|d| !d.annotations().contains_key(RECORD_ANNOTATION) && !d.labels().contains_key(INJECTED_LABEL))
            .filter(|d| health::deployment_rolled_out(d))
            .count();
        if clean >= total {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for clean targets: {clean}/{total}");
        if last_report.elapsed() > Duration::from_secs(30) {
            println!("    ... waiting for clean, rolled-out targets: {clean}/{total}");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Deletes the scenario's namespaces and waits until they are gone, so that the next scenario starts in
/// a cluster without them.
async fn delete_namespaces(client: &Client) {
    let api = Api::<Namespace>::all(client.clone());
    for i in 0..NAMESPACES {
        let _ = api.delete(&namespace(i), &DeleteParams::background()).await;
    }
    let deadline = Instant::now() + PATIENCE;
    for i in 0..NAMESPACES {
        while api.get_opt(&namespace(i)).await.ok().flatten().is_some() {
            assert!(Instant::now() < deadline, "timed out waiting for namespace {} to be gone", namespace(i));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

pub async fn run(client: &Client, report: &mut Report) {
    let count = knob("CROSSTRACE_BENCH_POLICIES", 50usize).max(1);
    let per_policy = knob("CROSSTRACE_BENCH_POLICY_TARGETS", 200usize).max(1);
    // The idle window holds one resync of every policy.
    let idle_s = util::idle_seconds();
    let total = count * per_policy;
    println!("policies: {count} policies x {per_policy} targets in {NAMESPACES} namespaces, idle window {idle_s} s");

    // Setup: the controller first (it reverts what an interrupted run left), then the targets, clean.
    let controller = Proc::controller("policies");
    controller.wait_up().await;
    delete_policies(client).await;
    for i in 0..NAMESPACES {
        ensure_namespace(client, &namespace(i), json!({SCOPE_LABEL: "on"})).await;
    }
    let t_setup = Instant::now();
    let targets: Vec<(String, Value)> =
        (0..count).flat_map(|p| (0..per_policy).map(move |t| target(p, t, per_policy))).collect();
    bounded(&targets, 32, |(ns, deployment)| async move {
        let d: Deployment = serde_json::from_value(deployment.clone()).unwrap();
        ignore_exists(Api::<Deployment>::namespaced(client.clone(), ns).create(&PostParams::default(), &d).await)
    })
    .await;
    wait_targets_clean(client, total).await;
    wait_quiet(&controller, Duration::from_secs(10)).await;
    let no_policy = controller.stats();
    println!(
        "  setup: {total} targets after {}, controller RSS {}",
        secs(since(t_setup)),
        mib(no_policy.rss_kib as f64)
    );

    // Every policy applied at once (16 requests in flight), until each is Ready.
    let m0 = controller.metrics().await;
    let t0 = Instant::now();
    bounded(0..count, 16, |p| async move {
        policies_api(client)
            .patch(&policy_name(p), &PatchParams::apply("bench-user").force(), &Patch::Apply(&policy(p)))
            .await
            .map(|_| ())
    })
    .await;
    let applied = since(t0);
    let ready_at = wait_all_ready(client, count, per_policy, t0).await;
    let per_policy_ready: Vec<f64> = ready_at.values().copied().collect();
    let all_ready = per_policy_ready.iter().copied().fold(0.0, f64::max);
    let m1 = controller.metrics().await;
    let writes_to_ready = writes(&m1) - writes(&m0);
    let reconciles = |m: &str| support::sum_samples(m, "crosstrace_reconciles_total");
    let reconciles_to_ready = reconciles(&m1) - reconciles(&m0);
    println!("  {count} policies applied in {}, all Ready after {}", secs(applied), secs(all_ready));

    // Converged: no write for 15 s, then the memory and the idle window.
    wait_quiet(&controller, Duration::from_secs(15)).await;
    let writes_to_quiet = writes(&controller.metrics().await) - writes(&m0);
    let converged = controller.stats();
    let idle = util::Idle::measure(client, &controller, idle_s).await;

    report
        .row(SCENARIO, format!("apply {count} policies x {per_policy} targets -> all Ready"), secs(all_ready))
        .baseline(format!(
            "per policy: median {}, all applied after {}",
            secs(median(&per_policy_ready)),
            secs(applied)
        ));
    report
        .row(SCENARIO, "controller API writes, apply -> all Ready", format!("{writes_to_ready:.0}"))
        .baseline(format!("{:.2} per target; {writes_to_quiet:.0} until quiet", writes_to_ready / total as f64));
    idle.rows(report, SCENARIO, 0.5);
    report
        .row(SCENARIO, "controller RSS, converged", mib(converged.rss_kib as f64))
        .baseline(format!("{} with the targets and no policy", mib(no_policy.rss_kib as f64)));
    report.json.insert(
        "policies",
        json!({
            "policies": count, "targets_per_policy": per_policy, "targets": total, "namespaces": NAMESPACES,
            "rollout": "the policy's defaults (no maxConcurrent)",
            "applied_s": applied, "all_ready_s": all_ready, "ready_s_by_policy": ready_at,
            "writes_apply_to_ready": writes_to_ready, "writes_apply_to_quiet": writes_to_quiet,
            "reconciles_apply_to_ready": reconciles_to_ready,
            "controller_no_policy": no_policy, "controller_converged": converged,
            "idle": idle.json(),
            "method": "one controller host process (the chart's ServiceAccount, production defaults) started before the targets; P x T Deployments with replicas 0 and revisionHistoryLimit 0, policy k selecting exactly its own T by a label, spread over 10 namespaces, all rolled out before the first apply; all P policies applied by server-side apply with 16 in flight; a policy's time is from the first apply until it is seen Ready (polled every 250 ms) with T/T targets ready; writes and reconciles are the controller's own counters between the first apply and the last Ready (and until 15 s without a write); RSS from /proc after that quiet; then the idle window: the controller's crosstrace_api_writes_total, its Lease renewals counted apart, CPU (utime + stime) from /proc, reconciles, the apiserver's write deltas. Afterwards every policy is deleted, the targets checked clean and rolled out, the namespaces deleted and waited for.",
        }),
    );

    // Cleanup: the controller reverts every target before it stops; then the namespaces go.
    delete_policies(client).await;
    wait_targets_clean(client, total).await;
    drop(controller);
    delete_namespaces(client).await;
}
