//! Scenario 5, the network layer: one agent per node (the chart's agent identity, one token per
//! node), a policy selecting every node; time from apply to `NODES n/n` (every agent applied and
//! verified), against the limit: the same OVSDB transactions (the agent's own `ensure`, built by its
//! pure plan) sent directly to every node's OVSDB at once, waiting until ovs-vswitchd took them; and,
//! to show what the Kubernetes hops themselves cost, the same NodeTracings written directly by the
//! bench (no controller) until every agent reports the export applied and verified.

use std::time::{Duration, Instant};

use crosstrace::agent::ensure;
use crosstrace::agent::ovsdb;
use crosstrace::api::node_tracing::BridgeExport;
use crosstrace::api::{NodeTracing, SflowSpec, TracingPolicy};
use futures::StreamExt;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::util::{Proc, knob, median, since};
use crate::{Report, mib, secs, support};

const POLICY: &str = "bench-net";
const PATIENCE: Duration = Duration::from_secs(180);

fn policy(nodes: usize) -> serde_json::Value {
    json!({
        "apiVersion": "crosstrace.dev/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": POLICY},
        "spec": {
            "network": {"bridge": "br-int", "sflow": {"targets": ["127.0.0.1:6343"], "sampling": 400, "polling": 30, "header": 128, "agent": "127.0.0.1"}},
            "rollout": {"maxConcurrent": nodes.min(1000), "progressDeadlineSeconds": 300},
        },
    })
}

fn export() -> BridgeExport {
    BridgeExport {
        bridge: "br-int".into(),
        policy: "bench-direct".into(),
        policy_generation: 1,
        sflow: Some(SflowSpec {
            targets: vec!["127.0.0.1:6343".into()],
            sampling: 400,
            polling: 30,
            header: 128,
            agent: "127.0.0.1".into(),
        }),
        ..BridgeExport::default()
    }
}

/// Rows of crosstrace left on node `i`'s OVS.
async fn ours(client: &ovsdb::Client) -> usize {
    let observed = ensure::read(client).await.expect("read OVSDB");
    ensure::Kind::ALL.iter().map(|k| observed.rows(*k).values().filter(|r| ensure::is_ours(r)).count()).sum()
}

async fn nodes_ready(api: &Api<TracingPolicy>, nodes: usize) -> bool {
    let Ok(p) = api.get(POLICY).await else { return false };
    let Some(status) = p.status.as_ref() else { return false };
    let counts = status.nodes.as_ref().is_some_and(|n| n.selected as usize == nodes && n.ready as usize == nodes);
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True" && c.observed_generation == p.metadata.generation);
    counts && ready
}

/// Has every agent reported `policy`'s export on its node as applied and verified?
async fn agents_verified(api: &Api<NodeTracing>, nodes: usize, policy: &str) -> bool {
    let Ok(list) = api.list(&Default::default()).await else { return false };
    let verified = |t: &NodeTracing| {
        t.status.as_ref().is_some_and(|s| s.bridges.iter().any(|b| b.policy == policy && b.applied && b.verified))
    };
    list.items.iter().filter(|t| verified(t)).count() == nodes
}

const API_POLICY: &str = "bench-api";

/// A NodeTracing like the one the controller writes for `node`, written by the bench itself.
fn node_tracing(node: &str) -> serde_json::Value {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let bridge = BridgeExport { policy: API_POLICY.into(), requested_at: Some(now), ..export() };
    json!({
        "apiVersion": "crosstrace.dev/v1alpha1",
        "kind": "NodeTracing",
        "metadata": {"name": node},
        "spec": {"nodeName": node, "bridges": [bridge]},
    })
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(client: &Client, report: &mut Report) {
    let runs = knob("CROSSTRACE_BENCH_RUNS", 3usize).max(1);
    let nodes = support::agents::node_count();
    println!("network: {nodes} nodes, runs {runs}");
    let api = Api::<TracingPolicy>::all(client.clone());
    let _ = api.delete(POLICY, &DeleteParams::default()).await;

    let mut ovs = Vec::new();
    for i in 0..nodes {
        ovs.push(ovsdb::Client::connect(&support::agents::ovsdb(i)).await.expect("connect to a node's OVSDB"));
    }
    // Nothing of ours on any bridge before we start.
    futures::future::join_all(ovs.iter().map(|c| ensure::ensure(c, &[], Duration::from_secs(10)))).await;

    let agents: Vec<Proc> = (0..nodes).map(Proc::agent).collect();
    for a in &agents {
        a.wait_up().await;
    }
    let controller = Proc::controller("net");
    controller.wait_up().await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut operator = Vec::new();
    let mut direct = Vec::new();
    let mut direct_remove = Vec::new();
    let mut operator_remove = Vec::new();
    let mut through_api = Vec::new();
    let tracings = Api::<NodeTracing>::all(client.clone());
    let names: Vec<String> = (0..nodes).map(support::agents::node_name).collect();
    let concurrency = knob("CROSSTRACE_BENCH_WRITE_CONCURRENCY", crosstrace::controller::DEFAULT_WRITE_CONCURRENCY);
    for run in 0..runs {
        let t0 = Instant::now();
        api.patch(POLICY, &PatchParams::apply("bench-user").force(), &Patch::Apply(policy(nodes)))
            .await
            .expect("apply network policy");
        until("NODES n/n", || nodes_ready(&api, nodes)).await;
        operator.push(since(t0));
        let t0 = Instant::now();
        let _ = api.delete(POLICY, &DeleteParams::default()).await;
        until("policy gone", async || api.get_opt(POLICY).await.ok().flatten().is_none()).await;
        for c in &ovs {
            until("agent rows removed", async || ours(c).await == 0).await;
        }
        operator_remove.push(since(t0));

        let desired = [export()];
        let t0 = Instant::now();
        let results =
            futures::future::join_all(ovs.iter().map(|c| ensure::ensure(c, &desired, Duration::from_secs(30)))).await;
        direct.push(since(t0));
        for r in results {
            let (outcomes, caught_up) = r.expect("direct ensure");
            assert!(caught_up && outcomes.iter().all(|o| o.error.is_none()), "direct ensure: {outcomes:?}");
        }
        let t0 = Instant::now();
        futures::future::join_all(ovs.iter().map(|c| ensure::ensure(c, &[], Duration::from_secs(30)))).await;
        direct_remove.push(since(t0));

        // The Kubernetes hops alone: the bench writes the NodeTracings (as many in flight as the
        // controller's write concurrency) and waits for every agent's verified status.
        let t0 = Instant::now();
        futures::stream::iter(&names)
            .map(|node| {
                let tracings = &tracings;
                async move {
                    let params = PatchParams::apply("bench-api").force();
                    tracings.patch(node, &params, &Patch::Apply(node_tracing(node))).await.expect("write NodeTracing")
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await;
        until("every agent verified", || agents_verified(&tracings, nodes, API_POLICY)).await;
        through_api.push(since(t0));
        for node in &names {
            let _ = tracings.delete(node, &DeleteParams::default()).await;
        }
        for c in &ovs {
            until("agent rows removed", async || ours(c).await == 0).await;
        }
        println!(
            "  run {}: operator apply -> NODES {nodes}/{nodes} {} (revert {}) | direct OVSDB {} (remove {}) | NodeTracings written directly -> agents verified {}",
            run + 1,
            secs(operator[run]),
            secs(operator_remove[run]),
            secs(direct[run]),
            secs(direct_remove[run]),
            secs(through_api[run])
        );
    }
    let stats: Vec<_> = agents.iter().map(Proc::stats).collect();
    let max_rss = stats.iter().map(|s| s.rss_kib).max().unwrap_or(0) as f64;
    let max_hwm = stats.iter().map(|s| s.hwm_kib).max().unwrap_or(0) as f64;
    let mean_rss = stats.iter().map(|s| s.rss_kib as f64).sum::<f64>() / stats.len().max(1) as f64;
    let (op, lim, hops) = (median(&operator), median(&direct), median(&through_api));
    report
        .row("5 network", format!("apply -> NODES {nodes}/{nodes} (median of {runs})"), secs(op))
        .baseline(format!("direct OVSDB writes {}", secs(lim)))
        .ratio(op / lim)
        .goal("<= 1.5x direct", op / lim, 1.5, true);
    report
        .row("5 network", "same, vs the Kubernetes hops alone (no controller)", secs(op))
        .baseline(format!("NodeTracings written directly -> {nodes} agents verified {}", secs(hops)))
        .ratio(op / hops);
    report
        .row("5 network", "agent RSS (max of the agents; peak)", mib(max_rss))
        .baseline(format!("mean {}, peak {}", mib(mean_rss), mib(max_hwm)))
        .goal("<= 20 MiB", max_rss / 1024.0, 20.0, true);
    report.json.insert(
        "network",
        json!({
            "nodes": nodes, "runs": runs,
            "operator_apply_to_ready_s": operator, "operator_revert_s": operator_remove,
            "direct_ovsdb_s": direct, "direct_remove_s": direct_remove,
            "median_operator_s": op, "median_direct_s": lim, "ratio": op / lim,
            "node_tracings_direct_to_verified_s": through_api, "median_node_tracings_direct_s": hops,
            "ratio_to_node_tracings_direct": op / hops,
            "agents": stats, "controller": controller.stats(),
            "method": "operator: apply of a policy selecting every node until status.nodes is n/n and Ready; direct: crosstrace::agent::ensure::ensure (read, the same transaction, wait for cur_cfg) on every node's OVSDB at once, connections opened beforehand; the agents also prove the export with ofproto/trace and report status, the direct writes do not; node_tracings_direct: the bench applies the NodeTracings itself (write concurrency of the controller) and waits for every agent's applied+verified status",
        }),
    );
    drop(controller);
    drop(agents);
}
