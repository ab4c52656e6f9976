//! Scenario 5, the network layer: one agent per node (the chart's agent identity, one token per
//! node), a policy selecting every node; time from apply to `NODES n/n` (every agent applied and
//! verified), against two baselines measured in the same run: the limit, the same OVSDB transactions
//! (the agent's own `ensure`, built by its pure plan) sent directly to every real node's OVSDB at
//! once, waiting until ovs-vswitchd took them; and the Kubernetes hops alone, the same NodeTracings
//! written directly by the bench (no controller) until every agent reports the export applied and
//! verified.
//!
//! Issue 13 asks for 2000 nodes, more than the local cluster can give a real OVS and agent each: the
//! bench adds `CROSSTRACE_BENCH_STUB_NODES` (2000; 0 = none) Node objects that no kubelet plays, and
//! answers their NodeTracings with [`StubAgents`]. The controller cannot tell them from real nodes: it
//! selects nodes by label only and counts a node ready from its NodeTracing's status alone.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crosstrace::agent::node::{BridgeReport, Report, State};
use crosstrace::agent::{ensure, ovsdb, write_status};
use crosstrace::api::node_tracing::{BridgeExport, BridgeStatus};
use crosstrace::api::{NodeTracing, SflowSpec, TracingPolicy};
use crosstrace::metrics::Metrics;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::util::{Proc, knob, median, since};
use crate::{Report as Table, mib, secs, support};

const POLICY: &str = "bench-net";
const PATIENCE: Duration = Duration::from_secs(180);
/// Label (and taint key) of the stub nodes; their names start with [`STUB_PREFIX`].
const STUB_LABEL: &str = "crosstrace.dev/bench-stub";
const STUB_PREFIX: &str = "ct-bench-stub-";

/// `maxConcurrent` is the API's most (1000) or every node: the controller keeps at most that many
/// nodes changing at once and admits the next as agents report verified.
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

/// Waits until every agent reported `policy`'s export on its node as applied and verified. Watched,
/// not polled: listing thousands of NodeTracings every 100 ms would load the API server the
/// operator's run (one policy read per poll) does not have to share.
async fn until_agents_verified(api: &Api<NodeTracing>, nodes: usize, policy: &str) {
    let verified = |t: &NodeTracing| {
        t.status.as_ref().is_some_and(|s| s.bridges.iter().any(|b| b.policy == policy && b.applied && b.verified))
    };
    let mut done = BTreeSet::new();
    let mut events = watcher(api.clone(), watcher::Config::default()).default_backoff().boxed();
    let watch = async {
        while let Some(event) = events.next().await {
            match event.expect("watch NodeTracings") {
                watcher::Event::Apply(t) | watcher::Event::InitApply(t) if verified(&t) => done.insert(t.name_any()),
                watcher::Event::Apply(t) | watcher::Event::InitApply(t) | watcher::Event::Delete(t) => {
                    done.remove(&t.name_any())
                }
                watcher::Event::Init | watcher::Event::InitDone => false,
            };
            if done.len() == nodes {
                return;
            }
        }
    };
    tokio::time::timeout(PATIENCE, watch).await.expect("timed out waiting for every agent verified");
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

/// A Node no kubelet plays (no `kwok.x-k8s.io/node` annotation) and nothing is scheduled on.
fn stub_node(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {STUB_LABEL: "true", "kubernetes.io/hostname": name}},
        "spec": {"taints": [{"key": STUB_LABEL, "value": "true", "effect": "NoSchedule"}]},
    })
}

/// Has the node lifecycle controller done with a stub what it does once to a node whose kubelet
/// never reported (Ready Unknown, tainted unreachable)? Waited for before the runs, so that its
/// thousands of Node writes do not land in one.
fn settled(node: &Node) -> bool {
    let unknown = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "Unknown"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == "node.kubernetes.io/unreachable" && t.effect == "NoSchedule"));
    unknown && tainted
}

fn stub_selector() -> ListParams {
    ListParams::default().labels(&format!("{STUB_LABEL}=true"))
}

/// Agents for the stub nodes, in the bench process, only for scale: one watch on every NodeTracing
/// and, for each stub node's, the status the real agent writes once its node exports what the spec
/// asks (every bridge applied and verified at the spec's policy generation, the spec's generation
/// observed), through the agent's own [`write_status`] (server-side apply of the status subresource,
/// the agent's field manager, no write when nothing changed). What they skip: OVSDB (no rows are
/// written, `ovsVersion` stays empty) and the `ofproto/trace` proof, i.e. everything on the node.
/// `concurrency` workers write, each node always on the same one, so that one node's writes keep
/// their order, as one agent's do.
struct StubAgents {
    task: tokio::task::JoinHandle<()>,
}

impl StubAgents {
    fn start(client: Client, concurrency: usize) -> Self {
        let api = Api::<NodeTracing>::all(client);
        let task = tokio::spawn(async move {
            let (senders, receivers): (Vec<_>, Vec<_>) = (0..concurrency).map(|_| mpsc::unbounded()).unzip();
            let metrics = Metrics::agent();
            let workers = futures::future::join_all(receivers.into_iter().map(|mut changes| {
                let (api, metrics) = (&api, &metrics);
                async move {
                    while let Some(tracing) = changes.next().await {
                        Self::answer(api, &tracing, metrics).await;
                    }
                }
            }));
            let dispatch = watcher(api.clone(), watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .for_each(|event| {
                    let mut senders = senders.clone();
                    async move {
                        let Ok(tracing) = event else { return };
                        let Some(n) =
                            tracing.name_any().strip_prefix(STUB_PREFIX).and_then(|n| n.parse::<usize>().ok())
                        else {
                            return;
                        };
                        let _ = senders[n % concurrency].send(tracing).await;
                    }
                });
            tokio::join!(dispatch, workers);
        });
        Self { task }
    }

    /// What the agent reports for a node whose OVS took and proved every export of the spec.
    fn report(tracing: &NodeTracing) -> Report {
        let verified = |b: &BridgeExport| BridgeReport {
            status: BridgeStatus {
                bridge: b.bridge.clone(),
                policy: b.policy.clone(),
                applied_generation: b.policy_generation,
                applied: true,
                verified: true,
                ..BridgeStatus::default()
            },
            state: State::Verified,
            request: b.request_id(),
        };
        Report {
            generation: tracing.metadata.generation,
            bridges: tracing.spec.bridges.iter().map(verified).collect(),
            ..Report::default()
        }
    }

    /// One status write, retried every second as long as the object is there.
    async fn answer(api: &Api<NodeTracing>, tracing: &NodeTracing, metrics: &Metrics) {
        loop {
            match write_status(api, tracing, &Self::report(tracing), metrics).await {
                Ok(_) => return,
                Err(kube::Error::Api(s)) if s.code == 404 => return,
                Err(e) => {
                    eprintln!("stub agent {}: {e}", tracing.name_any());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

impl Drop for StubAgents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one run needs: the APIs, the real nodes' OVSDB, every node's name (real, then stubs).
struct Bench {
    policies: Api<TracingPolicy>,
    tracings: Api<NodeTracing>,
    ovs: Vec<ovsdb::Client>,
    names: Vec<String>,
    concurrency: usize,
}

impl Bench {
    /// Apply of the policy until `NODES n/n` and Ready; then the delete until the policy is gone
    /// and the real nodes' OVS hold nothing of ours.
    async fn operator(&self) -> (f64, f64) {
        let nodes = self.names.len();
        let t0 = Instant::now();
        self.policies
            .patch(POLICY, &PatchParams::apply("bench-user").force(), &Patch::Apply(policy(nodes)))
            .await
            .expect("apply network policy");
        until("NODES n/n", || nodes_ready(&self.policies, nodes)).await;
        let apply = since(t0);
        let t0 = Instant::now();
        let _ = self.policies.delete(POLICY, &DeleteParams::default()).await;
        until("policy gone", async || self.policies.get_opt(POLICY).await.ok().flatten().is_none()).await;
        self.real_nodes_clean().await;
        (apply, since(t0))
    }

    /// The limit: the agent's OVSDB transaction on every real node at once; then its removal.
    async fn direct(&self) -> (f64, f64) {
        let desired = [export()];
        let t0 = Instant::now();
        let results =
            futures::future::join_all(self.ovs.iter().map(|c| ensure::ensure(c, &desired, Duration::from_secs(30))))
                .await;
        let apply = since(t0);
        for r in results {
            let (outcomes, caught_up) = r.expect("direct ensure");
            assert!(caught_up && outcomes.iter().all(|o| o.error.is_none()), "direct ensure: {outcomes:?}");
        }
        let t0 = Instant::now();
        futures::future::join_all(self.ovs.iter().map(|c| ensure::ensure(c, &[], Duration::from_secs(30)))).await;
        (apply, since(t0))
    }

    /// The Kubernetes hops alone: the bench writes the NodeTracings (as many in flight as the
    /// controller's write concurrency) and waits for every agent's verified status; then deletes them.
    async fn hops(&self) -> f64 {
        let t0 = Instant::now();
        self.for_each_tracing(async |node| {
            let params = PatchParams::apply("bench-api").force();
            self.tracings.patch(node, &params, &Patch::Apply(node_tracing(node))).await.expect("write NodeTracing");
        })
        .await;
        until_agents_verified(&self.tracings, self.names.len(), API_POLICY).await;
        let took = since(t0);
        self.delete_tracings().await;
        self.real_nodes_clean().await;
        took
    }

    async fn for_each_tracing(&self, write: impl AsyncFn(&str)) {
        let write = &write;
        futures::stream::iter(&self.names)
            .map(|node| async move { write(node).await })
            .buffer_unordered(self.concurrency)
            .collect::<Vec<()>>()
            .await;
    }

    async fn delete_tracings(&self) {
        self.for_each_tracing(async |node| {
            let _ = self.tracings.delete(node, &DeleteParams::default()).await;
        })
        .await;
    }

    async fn real_nodes_clean(&self) {
        for c in &self.ovs {
            until("agent rows removed", async || ours(c).await == 0).await;
        }
    }
}

/// Creates the stub nodes and waits until the node lifecycle controller is done with them.
async fn create_stubs(nodes: &Api<Node>, names: &[String], concurrency: usize) {
    futures::stream::iter(names)
        .map(|name| async move {
            let params = PatchParams::apply("bench-user").force();
            nodes.patch(name, &params, &Patch::Apply(stub_node(name))).await.expect("create stub node")
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    let t0 = Instant::now();
    until("the node lifecycle controller to mark the stub nodes Unknown", async || {
        nodes.list(&stub_selector()).await.is_ok_and(|l| l.items.len() == names.len() && l.items.iter().all(settled))
    })
    .await;
    println!("  {} stub nodes created; the node lifecycle controller settled them in {}", names.len(), secs(since(t0)));
}

pub async fn run(client: &Client, report: &mut Table) {
    let runs = knob("CROSSTRACE_BENCH_RUNS", 5usize).max(1);
    let real = support::agents::node_count();
    let stubs = knob("CROSSTRACE_BENCH_STUB_NODES", 2000usize);
    let concurrency = knob("CROSSTRACE_BENCH_WRITE_CONCURRENCY", crosstrace::controller::DEFAULT_WRITE_CONCURRENCY);
    let stub_concurrency = knob("CROSSTRACE_BENCH_STUB_CONCURRENCY", 64usize).max(1);
    let stub_names: Vec<String> = (0..stubs).map(|i| format!("{STUB_PREFIX}{i:04}")).collect();
    let names: Vec<String> = (0..real).map(support::agents::node_name).chain(stub_names.iter().cloned()).collect();
    let nodes = names.len();
    println!("network: {real} real nodes + {stubs} stub nodes, runs {runs}");
    let policies = Api::<TracingPolicy>::all(client.clone());
    let _ = policies.delete(POLICY, &DeleteParams::default()).await;
    let node_api = Api::<Node>::all(client.clone());
    create_stubs(&node_api, &stub_names, stub_concurrency).await;

    let mut ovs = Vec::new();
    for i in 0..real {
        ovs.push(ovsdb::Client::connect(&support::agents::ovsdb(i)).await.expect("connect to a node's OVSDB"));
    }
    // Nothing of ours on any bridge before we start.
    futures::future::join_all(ovs.iter().map(|c| ensure::ensure(c, &[], Duration::from_secs(10)))).await;

    let agents: Vec<Proc> = (0..real).map(Proc::agent).collect();
    for a in &agents {
        a.wait_up().await;
    }
    let stub_agents = (stubs > 0).then(|| StubAgents::start(client.clone(), stub_concurrency));
    let controller = Proc::controller("net");
    controller.wait_up().await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let bench = Bench { policies, tracings: Api::<NodeTracing>::all(client.clone()), ovs, names, concurrency };
    let (mut operator, mut operator_remove, mut direct, mut direct_remove, mut hops) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        // Paired and interleaved: the operator first in even runs, last in odd ones.
        let operator_first = run % 2 == 0;
        let (op, (d, d_remove), api) = if operator_first {
            let op = bench.operator().await;
            let d = bench.direct().await;
            (op, d, bench.hops().await)
        } else {
            let api = bench.hops().await;
            let d = bench.direct().await;
            (bench.operator().await, d, api)
        };
        operator.push(op.0);
        operator_remove.push(op.1);
        direct.push(d);
        direct_remove.push(d_remove);
        hops.push(api);
        println!(
            "  run {} ({} first): operator apply -> NODES {nodes}/{nodes} {} (revert {}) | direct OVSDB ({real} real nodes) {} (remove {}) | NodeTracings written directly -> {nodes} agents verified {}",
            run + 1,
            if operator_first { "operator" } else { "hops" },
            secs(op.0),
            secs(op.1),
            secs(d),
            secs(d_remove),
            secs(api)
        );
    }
    let ratios = |baseline: &[f64]| -> Vec<f64> { operator.iter().zip(baseline).map(|(o, b)| o / b).collect() };
    let (to_direct, to_hops) = (ratios(&direct), ratios(&hops));
    let (direct_ratio, hops_ratio) = (median(&to_direct), median(&to_hops));
    let stats: Vec<_> = agents.iter().map(Proc::stats).collect();
    let max_rss = stats.iter().map(|s| s.rss_kib).max().unwrap_or(0) as f64;
    let max_hwm = stats.iter().map(|s| s.hwm_kib).max().unwrap_or(0) as f64;
    let mean_rss = stats.iter().map(|s| s.rss_kib as f64).sum::<f64>() / stats.len().max(1) as f64;
    let (op, lim, api) = (median(&operator), median(&direct), median(&hops));
    let label = format!("apply -> NODES {nodes}/{nodes} ({real} real + {stubs} stub; median of {runs})");
    report
        .row("5 network", label.clone(), secs(op))
        .baseline(format!("direct OVSDB writes, {real} real nodes {}", secs(lim)))
        .ratio(direct_ratio)
        .goal("<= 1.5x direct", direct_ratio, 1.5, true);
    report
        .row("5 network", label, secs(op))
        .baseline(format!("NodeTracings written directly -> {nodes} agents verified {}", secs(api)))
        .ratio(hops_ratio)
        .goal("<= 1.2x the Kubernetes hops alone", hops_ratio, 1.2, true);
    report
        .row("5 network", "agent RSS (max of the real agents; peak)", mib(max_rss))
        .baseline(format!("mean {}, peak {}", mib(mean_rss), mib(max_hwm)))
        .goal("<= 20 MiB", max_rss / 1024.0, 20.0, true);
    report.json.insert(
        "network",
        json!({
            "nodes": nodes, "real_nodes": real, "stub_nodes": stubs, "runs": runs,
            "write_concurrency": concurrency, "stub_agent_concurrency": stub_concurrency,
            "max_concurrent": nodes.min(1000),
            "operator_first": (0..runs).map(|r| r % 2 == 0).collect::<Vec<_>>(),
            "operator_apply_to_ready_s": operator, "operator_revert_s": operator_remove,
            "direct_ovsdb_s": direct, "direct_remove_s": direct_remove,
            "node_tracings_direct_to_verified_s": hops,
            "ratios_to_direct": to_direct, "ratio_to_direct": direct_ratio,
            "ratios_to_node_tracings_direct": to_hops, "ratio_to_node_tracings_direct": hops_ratio,
            "median_operator_s": op, "median_direct_s": lim, "median_node_tracings_direct_s": api,
            "agents": stats, "controller": controller.stats(),
            "method": format!("Each run, paired and interleaved (the operator first in even runs, the hops first in odd ones, the direct writes between): operator: apply of a policy selecting every node ({real} real nodes with OVS and a crosstrace agent, {stubs} stub nodes: Node objects no kubelet plays, answered by stub agents in the bench that write through the agent's own status code, applied+verified, without OVSDB or ofproto/trace) until status.nodes is {nodes}/{nodes} and Ready; rollout.maxConcurrent {} (the API's most is 1000): the controller keeps at most that many nodes changing and admits more as agents report verified; then the delete until the policy is gone and the real OVS are clean. direct: crosstrace::agent::ensure::ensure (read, the same transaction, wait for cur_cfg) on the {real} real nodes' OVSDB at once, connections opened beforehand; the agents also prove the export with ofproto/trace and report status, the direct writes do not, and they cover only the real nodes while the operator covers every node. node_tracings_direct (the Kubernetes hops alone): the bench applies every node's NodeTracing itself ({concurrency} in flight, the controller's write concurrency) and watches until every agent, real and stub, reports applied+verified; then deletes them. Ratios: the median of the per-run ratios operator/baseline. Stub nodes are created before the runs and the bench waits until the node lifecycle controller marked them Ready Unknown and unreachable; it then only taints them for eviction at its slow partial-disruption rate.", nodes.min(1000)),
        }),
    );
    drop(controller);
    drop(agents);
    drop(stub_agents);
    cleanup(&bench, &node_api).await;
}

/// Leaves nothing behind: the policy, every NodeTracing of the bench's nodes, the stub nodes.
async fn cleanup(bench: &Bench, nodes: &Api<Node>) {
    let _ = bench.policies.delete(POLICY, &DeleteParams::default()).await;
    bench.delete_tracings().await;
    nodes.delete_collection(&DeleteParams::default(), &stub_selector()).await.expect("delete the stub nodes");
    until("stub nodes gone", async || nodes.list(&stub_selector()).await.is_ok_and(|l| l.items.is_empty())).await;
}
