//! End to end, on the local real cluster with its per-node Open vSwitch: the network layer writes one
//! `NodeTracing` per selected node, a real `crosstrace agent` per node (the chart's agent identity, one
//! token per node) configures that node's OVS through OVSDB and proves it, and sFlow / IPFIX from
//! injected packets reach a collector on loopback. Node selection follows relabelling, drift is
//! re-applied, a foreign exporter is a conflict until `Override` (then restored on delete), a
//! deleted policy leaves no row of ours in any OVS, even on a node whose agent was down meanwhile, and
//! a bridge deleted and created again on a converged node is re-applied, not rolled back (its agent
//! restarting meanwhile). The controller writes each NodeTracing once: its agent says when the request
//! converged.
//!
//! Every test runs its own controller and agents, uses names unique to this process, and restores the
//! node labels and OVS rows it touched, even when it fails.

#[path = "../support/mod.rs"]
mod support;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crosstrace::agent::ensure::{OWNER, OWNER_KEY, POLICY_KEY, REPLACED_KEY};
use crosstrace::api::{NodeTracing, TracingPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::agents::*;
use support::*;

/// The external_ids key that marks the foreign rows these tests create (value: this process id).
const FOREIGN_KEY: &str = "e2e-net";

fn pid() -> String {
    std::process::id().to_string()
}

/// One test's world: its controller, one agent per node, and what to restore at the end.
struct Suite {
    client: Client,
    /// Policies to delete, node labels to remove, foreign rows to remove (node, bridge column).
    policies: Mutex<Vec<String>>,
    labels: Mutex<Vec<(usize, String)>>,
    foreign: Mutex<Vec<(usize, &'static str)>>,
    logs_shown: Cell<bool>,
    // Dropped after the cleanup in `drop`, agents first, then the controller.
    agents: Agents,
    controller: ControllerProcess,
}

impl Suite {
    async fn start(admin_port: u16) -> Self {
        let client = client().await;
        install_crds();
        ensure_namespace(&client, "crosstrace-system").await;
        assert!(node_count() >= 3, "the network suite needs 3 nodes, the cluster has {}", node_count());
        let controller = ControllerProcess::start(admin_port);
        let agents = Agents::start_all();
        Self {
            client,
            policies: Mutex::default(),
            labels: Mutex::default(),
            foreign: Mutex::default(),
            logs_shown: Cell::new(false),
            agents,
            controller,
        }
    }

    fn logs(&self) -> String {
        format!("--- controller ---\n{}\n{}", tail(&self.controller.log(), 60), self.agents.logs(30))
    }

    /// [`eventually`] that shows the controller's and agents' log tails when it times out.
    async fn until<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let logs = || {
            self.logs_shown.set(true);
            self.logs()
        };
        eventually_with(what, logs, check).await
    }

    fn policies_api(&self) -> Api<TracingPolicy> {
        Api::all(self.client.clone())
    }

    fn node_tracings(&self) -> Api<NodeTracing> {
        Api::all(self.client.clone())
    }

    async fn apply(&self, policy: &Value) {
        let name = policy["metadata"]["name"].as_str().unwrap().to_string();
        {
            let mut p = self.policies.lock().unwrap();
            if !p.contains(&name) {
                p.push(name.clone());
            }
        }
        self.policies_api()
            .patch(&name, &PatchParams::apply("e2e-user").force(), &Patch::Apply(policy))
            .await
            .expect("apply policy");
    }

    /// Waits until the policy's condition has `status` for its current generation and `check` holds.
    async fn wait_policy(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        check: impl Fn(&TracingPolicy, &Condition) -> bool,
    ) -> TracingPolicy {
        let api = self.policies_api();
        let check = &check;
        self.until(&format!("{name}: {type_}={status}"), || {
            let api = api.clone();
            async move {
                let p = api.get(name).await.ok()?;
                let c = condition(&p, type_)?;
                (c.status == status && c.observed_generation == p.metadata.generation && check(&p, c))
                    .then(|| p.clone())
            }
        })
        .await
    }

    /// Waits until the policy is Ready with NODES `summary`, then checks `kubectl get tp` shows it.
    async fn wait_ready(&self, name: &str, summary: &str) -> TracingPolicy {
        let p = self.wait_policy(name, "Ready", "True", |p, _| nodes_summary(p) == summary).await;
        let (ok, table, err) = kubectl(&["get", "tp", name]);
        assert!(ok, "kubectl get tp {name}: {err}");
        let columns: BTreeMap<String, String> = printed_columns(&table).into_iter().collect();
        assert_eq!(columns.get("READY").map(String::as_str), Some("True"), "{table}");
        assert_eq!(columns.get("NODES").map(String::as_str), Some(summary), "{table}");
        p
    }

    async fn delete_policy(&self, name: &str) {
        let api = self.policies_api();
        delete_if_exists(&api, name).await;
        self.until(&format!("{name} to be gone (finalizer removed)"), || {
            let api = api.clone();
            async move { api.get_opt(name).await.ok()?.is_none().then_some(()) }
        })
        .await;
        self.policies.lock().unwrap().retain(|p| p != name);
    }

    async fn node_tracing(&self, i: usize) -> Option<NodeTracing> {
        self.node_tracings().get_opt(&node_name(i)).await.expect("get NodeTracing")
    }

    /// Waits until node `i`'s NodeTracing reports the bridge of `policy` and `check` holds for it.
    async fn wait_bridge_status(
        &self,
        i: usize,
        policy: &str,
        what: &str,
        check: impl Fn(&crosstrace::api::node_tracing::BridgeStatus) -> bool,
    ) -> crosstrace::api::node_tracing::BridgeStatus {
        let check = &check;
        self.until(&format!("NodeTracing {}: {what}", node_name(i)), || async move {
            let t = self.node_tracing(i).await?;
            let b = t.status?.bridges.into_iter().find(|b| b.policy == policy)?;
            check(&b).then_some(b)
        })
        .await
    }

    fn label(&self, i: usize, key: &str) {
        self.labels.lock().unwrap().push((i, key.to_string()));
        let (ok, _, err) = kubectl(&["label", "node", &node_name(i), &format!("{key}=yes"), "--overwrite"]);
        assert!(ok, "labelling {}: {err}", node_name(i));
    }

    fn unlabel(&self, i: usize, key: &str) {
        let (ok, _, err) = kubectl(&["label", "node", &node_name(i), &format!("{key}-")]);
        assert!(ok || err.contains("not found"), "unlabelling {}: {err}", node_name(i));
    }

    /// Creates a foreign exporter (no crosstrace external_ids) on node `i`'s br-int; returns its uuid.
    fn foreign_exporter(&self, i: usize, table: &'static str, columns: &[&str]) -> String {
        let column = if table == "sflow" { "sflow" } else { "ipfix" };
        self.foreign.lock().unwrap().push((i, column));
        let tag = format!("external_ids:{FOREIGN_KEY}={}", pid());
        let set = format!("{column}=@e");
        let mut args = vec!["--", "--id=@e", "create", table];
        args.extend_from_slice(columns);
        args.extend([tag.as_str(), "--", "set", "bridge", "br-int", set.as_str()]);
        ovs_vsctl(i, &args)
    }

    /// Nothing of crosstrace on any node's OVS, no NodeTracing entry of `policy` anywhere.
    async fn wait_clean(&self, policy: &str) {
        for i in 0..node_count() {
            self.until(&format!("no crosstrace row on {}", node_name(i)), || async move {
                (crosstrace_rows(i) == 0).then_some(())
            })
            .await;
            self.until(&format!("no entry of {policy} in NodeTracing {}", node_name(i)), || async move {
                let t = self.node_tracing(i).await;
                (!t.is_some_and(|t| t.spec.bridges.iter().any(|b| b.policy == policy))).then_some(())
            })
            .await;
        }
    }
}

impl Drop for Suite {
    /// Restores what the test touched, whatever happened: deletes its policies (waiting for the
    /// controller and agents, still running, to revert), removes its node labels and foreign rows.
    fn drop(&mut self) {
        if std::thread::panicking() && !self.logs_shown.get() {
            eprintln!("{}", self.logs());
        }
        for name in self.policies.lock().unwrap().drain(..) {
            let (ok, _, err) =
                kubectl(&["delete", "tracingpolicy", &name, "--ignore-not-found", "--wait=true", "--timeout=60s"]);
            if !ok {
                eprintln!("cleanup: deleting TracingPolicy {name}: {err}");
            }
        }
        // Give the agents a moment to remove rows of deleted NodeTracings before foreign rows go.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && (0..node_count()).any(|i| crosstrace_rows(i) > 0) {
            std::thread::sleep(Duration::from_millis(200));
        }
        for (i, key) in self.labels.lock().unwrap().drain(..) {
            let _ = kubectl(&["label", "node", &node_name(i), &format!("{key}-")]);
        }
        for (i, column) in self.foreign.lock().unwrap().drain(..) {
            remove_foreign(i, column);
        }
    }
}

/// Clears node `i`'s br-int `column` when it points at a foreign row of this process (the row goes
/// with it: sFlow and IPFIX rows live only while a bridge references them).
fn remove_foreign(i: usize, column: &str) {
    let table = if column == "sflow" { "sflow" } else { "ipfix" };
    let mine = rows_with(i, table, &[(FOREIGN_KEY, &pid())]);
    if bridge_exporter(i, "br-int", column).is_some_and(|id| mine.contains(&id)) {
        let _ = try_ovs_vsctl(i, &["clear", "bridge", "br-int", column]);
    }
}

/// Rows of crosstrace (any policy) in node `i`'s sFlow and IPFIX tables.
fn crosstrace_rows(i: usize) -> usize {
    ["sflow", "ipfix"].iter().map(|t| rows_with(i, t, &[(OWNER_KEY, OWNER)]).len()).sum()
}

/// Rows of `policy` in node `i`'s `table`.
fn ours(i: usize, table: &str, policy: &str) -> Vec<String> {
    rows_with(i, table, &[(OWNER_KEY, OWNER), (POLICY_KEY, policy)])
}

fn nodes_summary(p: &TracingPolicy) -> String {
    p.status.as_ref().and_then(|s| s.nodes.as_ref()).map(|n| n.summary.clone()).unwrap_or_default()
}

fn unique(what: &str) -> String {
    format!("e2e-net-{what}-{}", pid())
}

fn sflow(target: &str) -> Value {
    json!({"targets": [target], "sampling": 64, "polling": 10, "header": 128, "agent": "127.0.0.1"})
}

fn ipfix(target: &str, domain: u32) -> Value {
    json!({"targets": [target], "sampling": 64, "obsDomainId": domain, "cacheActiveTimeout": 0})
}

fn policy(name: &str, network: Value) -> Value {
    json!({
        "apiVersion": "crosstrace.dev/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": name},
        "spec": {
            "network": network,
            "rollout": {"maxConcurrent": 2, "progressDeadlineSeconds": 120},
        },
    })
}

/// Every node has exactly one `table` row of crosstrace, tagged with `policy`, on br-int, and its
/// NodeTracing reports it applied and verified for that policy.
async fn assert_exported_everywhere(s: &Suite, table: &str, policy: &str) {
    for i in 0..node_count() {
        let rows = ours(i, table, policy);
        assert_eq!(rows.len(), 1, "{}: one {table} row of {policy}: {rows:?}", node_name(i));
        assert_eq!(rows_with(i, table, &[(OWNER_KEY, OWNER)]), rows, "{}: no other row of crosstrace", node_name(i));
        assert_eq!(bridge_exporter(i, "br-int", table), Some(rows[0].clone()), "{}: on br-int", node_name(i));
        let b = s.wait_bridge_status(i, policy, "applied and verified", |b| b.applied && b.verified).await;
        assert!(!b.conflict && b.bridge == "br-int", "{b:?}");
    }
}

/// Injects packets on every node until the collector saw traffic of each (`seen` decodes a datagram
/// and returns the node indexes it proves), re-injecting on the nodes not seen yet every few seconds.
async fn inject_until_seen(
    s: &Suite,
    collector: &Collector,
    protocol: &str,
    mut seen: impl FnMut(&[u8], std::net::SocketAddr) -> BTreeSet<usize>,
) -> usize {
    let nodes: BTreeSet<usize> = (0..node_count()).collect();
    let mut found = BTreeSet::new();
    let mut datagrams = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while found != nodes {
        if Instant::now() >= deadline {
            s.logs_shown.set(true);
            panic!(
                "{protocol}: after {datagrams} datagrams, no sampled packet of node(s) {:?} arrived\n{}",
                nodes.difference(&found).map(|i| node_name(*i)).collect::<Vec<_>>(),
                s.logs()
            );
        }
        for i in nodes.difference(&found) {
            inject(*i, 500);
        }
        let round = Instant::now() + Duration::from_secs(5);
        while Instant::now() < round && found != nodes {
            if let Some((d, from)) = collector.recv(Duration::from_millis(500)).await {
                datagrams += 1;
                found.extend(seen(&d, from));
            }
        }
    }
    datagrams
}

#[tokio::test]
async fn sflow_is_configured_on_every_node_and_datagrams_reach_the_collector() {
    let s = Suite::start(18131).await;
    let collector = Collector::bind().await;
    let name = unique("sflow");
    s.apply(&policy(&name, json!({"bridge": "br-int", "sflow": sflow(&collector.target())}))).await;
    let p = s.wait_ready(&name, "3/3").await;
    let nodes = p.status.as_ref().unwrap().nodes.as_ref().unwrap();
    assert_eq!((nodes.selected, nodes.ready), (3, 3));
    assert_exported_everywhere(&s, "sflow", &name).await;
    // One write per node: each agent says in its status that the request converged, and the
    // controller writes no mark of its own (the spec was written once).
    for i in 0..node_count() {
        let t = s.node_tracing(i).await.expect("a NodeTracing per node");
        let entry = t.spec.bridges.iter().find(|b| b.policy == name).expect("the policy's entry");
        let status = t.status.as_ref().and_then(|st| st.bridges.iter().find(|b| b.policy == name));
        assert_eq!(status.map(|b| b.converged_request.clone()), Some(entry.request_id()), "{:?}", t.status);
        assert!(!entry.converged, "no mark in the spec: {entry:?}");
        assert_eq!(t.metadata.generation, Some(1), "the spec was written once");
    }
    // Every agent's /metrics (what the chart's PodMonitor scrapes) says it reaches OVSDB and exports.
    for agent in &s.agents.agents {
        let verified = r#"crosstrace_agent_bridges{bridge="br-int",state="verified"}"#;
        eventually("the agent's bridge metric", || async {
            let text = http_get(agent.admin_port, "/metrics").await;
            (sum_samples(&text, "crosstrace_agent_ovsdb_connected") == 1.0 && sum_samples(&text, verified) == 1.0)
                .then_some(())
        })
        .await;
    }
    for i in 0..node_count() {
        let id = ours(i, "sflow", &name).remove(0);
        assert_eq!(ovs_vsctl(i, &["get", "sflow", &id, "sampling"]), "64");
        assert_eq!(ovs_vsctl(i, &["get", "sflow", &id, "targets"]), format!("[\"{}\"]", collector.target()));
    }

    // Sampled packets of every node arrive as sFlow v5 with the agent address 127.0.0.1.
    collector.drain().await;
    let mut flow_samples = 0;
    let datagrams = inject_until_seen(&s, &collector, "sFlow", |d, _| {
        let datagram = decode_sflow(d).unwrap_or_else(|e| panic!("a datagram that is not sFlow v5: {e}: {d:?}"));
        assert_eq!(datagram.version, 5);
        assert_eq!(datagram.address_type, 1, "agent address type IPv4");
        assert_eq!(datagram.agent, Ipv4Addr::LOCALHOST, "the agent address");
        flow_samples += datagram.flow_samples.len();
        datagram
            .flow_samples
            .iter()
            .inspect(|f| assert_eq!(f.sampling_rate, 64, "the sampling rate of the policy"))
            .filter_map(|f| f.source_mac)
            .filter_map(|mac| (0..node_count()).find(|i| source_mac(*i) == mac))
            .collect()
    })
    .await;
    eprintln!("sFlow: {datagrams} datagrams, {flow_samples} flow samples, every node seen");

    s.delete_policy(&name).await;
    s.wait_clean(&name).await;
}

#[tokio::test]
async fn ipfix_is_configured_on_every_node_and_messages_reach_the_collector() {
    let s = Suite::start(18132).await;
    let collector = Collector::bind().await;
    let name = unique("ipfix");
    let domain = 4242;
    s.apply(&policy(&name, json!({"bridge": "br-int", "ipfix": ipfix(&collector.target(), domain)}))).await;
    s.wait_ready(&name, "3/3").await;
    assert_exported_everywhere(&s, "ipfix", &name).await;
    for i in 0..node_count() {
        let id = ours(i, "ipfix", &name).remove(0);
        assert_eq!(ovs_vsctl(i, &["get", "ipfix", &id, "obs_domain_id"]), domain.to_string());
        assert!(rows_with(i, "sflow", &[(OWNER_KEY, OWNER)]).is_empty(), "no sFlow asked, none written");
    }

    // Flow records of every node's packets arrive in IPFIX (v10) messages of our observation domain.
    collector.drain().await;
    let mut templates = IpfixTemplates::default();
    let mut records = 0;
    let messages = inject_until_seen(&s, &collector, "IPFIX", |m, from| {
        let message = decode_ipfix(m).unwrap_or_else(|e| panic!("a message that is not IPFIX: {e}: {m:?}"));
        assert_eq!(message.version, 10);
        assert_eq!(usize::from(message.length), m.len());
        // OVS sends its exporting process statistics in domain 0; the flows are in ours.
        assert!(message.domain == domain || message.domain == 0, "observation domain {}", message.domain);
        let decoded = templates.records(from, &message).unwrap_or_else(|e| panic!("IPFIX sets: {e}"));
        let flows: Vec<_> = decoded.iter().filter(|_| message.domain == domain).collect();
        records += flows.len();
        flows
            .iter()
            .filter_map(|r| {
                (0..node_count()).find(|i| {
                    r.get(&IE_SOURCE_MAC).is_some_and(|v| v[..] == source_mac(*i))
                        || r.get(&IE_SOURCE_IPV4).is_some_and(|v| v[..] == source_ip(*i).octets())
                })
            })
            .collect()
    })
    .await;
    eprintln!("IPFIX: {messages} messages, {records} flow records, every node seen");

    s.delete_policy(&name).await;
    s.wait_clean(&name).await;
}

#[tokio::test]
async fn the_node_selector_picks_nodes_and_relabelled_nodes_join_and_leave() {
    let s = Suite::start(18133).await;
    let collector = Collector::bind().await;
    let key = format!("e2e-net-{}", pid());
    s.label(0, &key);
    s.label(1, &key);
    let name = unique("selector");
    let network = json!({
        "nodeSelector": {"matchLabels": {&key: "yes"}},
        "bridge": "br-int",
        "sflow": sflow(&collector.target()),
    });
    s.apply(&policy(&name, network)).await;
    s.wait_ready(&name, "2/2").await;
    for i in [0, 1] {
        assert_eq!(ours(i, "sflow", &name).len(), 1, "{} is selected and configured", node_name(i));
    }
    assert!(ours(2, "sflow", &name).is_empty(), "{} is not selected", node_name(2));
    let third = s.node_tracing(2).await;
    assert!(!third.is_some_and(|t| t.spec.bridges.iter().any(|b| b.policy == name)), "no entry for {}", node_name(2));

    // The third node gets the label: it joins.
    s.label(2, &key);
    s.wait_ready(&name, "3/3").await;
    s.until("the joining node to be configured", || async { (ours(2, "sflow", &name).len() == 1).then_some(()) }).await;
    s.wait_bridge_status(2, &name, "applied and verified", |b| b.applied && b.verified).await;

    // The first node loses it: it leaves, and its row goes.
    s.unlabel(0, &key);
    s.wait_ready(&name, "2/2").await;
    s.until("the leaving node's row to be removed", || async { (crosstrace_rows(0) == 0).then_some(()) }).await;
    s.until("the leaving node's NodeTracing to be deleted", || async {
        s.node_tracing(0).await.is_none().then_some(())
    })
    .await;
    for i in [1, 2] {
        assert_eq!(ours(i, "sflow", &name).len(), 1, "{} stays configured", node_name(i));
    }

    s.delete_policy(&name).await;
    s.wait_clean(&name).await;
    for i in 0..node_count() {
        s.unlabel(i, &key);
    }
}

#[tokio::test]
async fn drift_on_a_node_is_reapplied_within_seconds_and_reported() {
    let s = Suite::start(18134).await;
    let collector = Collector::bind().await;
    let name = unique("drift");
    s.apply(&policy(&name, json!({"bridge": "br-int", "sflow": sflow(&collector.target())}))).await;
    s.wait_ready(&name, "3/3").await;
    assert_exported_everywhere(&s, "sflow", &name).await;

    // Someone clears the bridge's sFlow on one node: the agent puts it back and says so.
    let before = bridge_exporter(1, "br-int", "sflow").unwrap();
    let started = Instant::now();
    ovs_vsctl(1, &["clear", "bridge", "br-int", "sflow"]);
    let after = s
        .until("the sFlow export to be re-applied", || async {
            let rows = ours(1, "sflow", &name);
            (rows.len() == 1 && bridge_exporter(1, "br-int", "sflow").as_ref() == rows.first()).then(|| rows[0].clone())
        })
        .await;
    let took = started.elapsed();
    eprintln!("drift re-applied in {took:?}");
    assert!(took < Duration::from_secs(10), "re-applied within seconds, took {took:?}");
    assert_ne!(after, before, "a new row");
    let b = s
        .wait_bridge_status(1, &name, "drift reported", |b| b.verified && b.message.contains("re-applied after drift"))
        .await;
    assert!(b.message.contains("sFlow: created"), "{}", b.message);
    let t = s.node_tracing(1).await.unwrap();
    let ready = t.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "True");
    assert!(ready.message.contains("drift"), "{}", ready.message);
    // The other nodes saw nothing of it.
    for i in [0, 2] {
        let b = s.wait_bridge_status(i, &name, "verified", |b| b.verified).await;
        assert!(!b.message.contains("drift"), "{}: {}", node_name(i), b.message);
    }
    s.wait_ready(&name, "3/3").await;

    s.delete_policy(&name).await;
    s.wait_clean(&name).await;
}

#[tokio::test]
async fn a_foreign_exporter_is_a_conflict_until_override_and_is_restored_on_delete() {
    let s = Suite::start(18135).await;
    let collector = Collector::bind().await;
    let c = 2;
    let foreign = s.foreign_exporter(
        c,
        "sflow",
        &["agent=127.0.0.1", "targets=\"10.9.9.9:6343\"", "header=64", "sampling=1000", "polling=20"],
    );
    let name = unique("conflict");
    let mut network = json!({"bridge": "br-int", "sflow": sflow(&collector.target())});
    s.apply(&policy(&name, network.clone())).await;

    // Skip (the default): that node reports a conflict, the others export, the foreign row is untouched.
    let p = s.wait_policy(&name, "Degraded", "True", |p, c| c.reason == "Conflict" && nodes_summary(p) == "2/3").await;
    let degraded = condition(&p, "Degraded").unwrap();
    assert!(degraded.message.contains(&node_name(c)), "{}", degraded.message);
    assert_eq!(condition(&p, "Ready").unwrap().status, "False");
    let b = s.wait_bridge_status(c, &name, "conflict", |b| b.conflict).await;
    assert!(!b.applied && !b.verified, "{b:?}");
    assert!(b.message.contains("10.9.9.9:6343"), "{}", b.message);
    let t = s.node_tracing(c).await.unwrap();
    let degraded = t.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "Conflict"));
    assert_eq!(bridge_exporter(c, "br-int", "sflow"), Some(foreign.clone()), "the foreign row stays on br-int");
    assert_eq!(ovs_vsctl(c, &["get", "sflow", &foreign, "sampling"]), "1000");
    assert_eq!(ovs_vsctl(c, &["get", "sflow", &foreign, "targets"]), "[\"10.9.9.9:6343\"]");
    assert_eq!(crosstrace_rows(c), 0, "nothing of ours on the conflicting node");
    for i in [0, 1] {
        assert_eq!(ours(i, "sflow", &name).len(), 1, "{} exports", node_name(i));
        s.wait_bridge_status(i, &name, "verified", |b| b.verified && !b.conflict).await;
    }

    // Override: replaced, the foreign exporter recorded in our row.
    network["conflictPolicy"] = json!("Override");
    s.apply(&policy(&name, network)).await;
    s.wait_ready(&name, "3/3").await;
    let ours_now = ours(c, "sflow", &name);
    assert_eq!(ours_now.len(), 1);
    assert_eq!(bridge_exporter(c, "br-int", "sflow"), Some(ours_now[0].clone()), "our row replaced it");
    let record = ovs_vsctl(c, &["get", "sflow", &ours_now[0], &format!("external_ids:\"{REPLACED_KEY}\"")]);
    assert!(record.contains("10.9.9.9:6343"), "{record}");
    let b = s.wait_bridge_status(c, &name, "verified", |b| b.verified).await;
    assert!(!b.conflict);

    // Delete: the foreign exporter is back as it was, nothing of ours anywhere.
    s.delete_policy(&name).await;
    s.wait_clean(&name).await;
    let restored = s
        .until("the foreign exporter to be restored", || async {
            bridge_exporter(c, "br-int", "sflow")
                .filter(|id| rows_with(c, "sflow", &[(FOREIGN_KEY, &pid())]).contains(id))
        })
        .await;
    for (column, value) in [
        ("targets", "[\"10.9.9.9:6343\"]"),
        ("sampling", "1000"),
        ("polling", "20"),
        ("header", "64"),
        ("agent", "\"127.0.0.1\""),
    ] {
        assert_eq!(ovs_vsctl(c, &["get", "sflow", &restored, column]), value, "{column}");
    }
    assert_eq!(ovs_vsctl(c, &["get", "sflow", &restored, "external_ids"]), format!("{{{FOREIGN_KEY}=\"{}\"}}", pid()));
    remove_foreign(c, "sflow");
    assert_eq!(bridge_exporter(c, "br-int", "sflow"), None);
}

#[tokio::test]
async fn delete_empties_only_its_part_of_every_node_tracing_and_leaves_no_row() {
    let s = Suite::start(18136).await;
    let collector = Collector::bind().await;
    // A foreign IPFIX exporter on one node: not in the way of an sFlow-only policy, and it must survive.
    let foreign = s.foreign_exporter(0, "ipfix", &["targets=\"10.9.9.9:4739\"", "sampling=500"]);
    // Another policy on a bridge the nodes do not have: its part of each NodeTracing must stay.
    let other = unique("other");
    let mut other_policy = policy(&other, json!({"bridge": "br-e2e", "sflow": sflow(&collector.target())}));
    other_policy["spec"]["rollout"] =
        json!({"maxConcurrent": 10, "progressDeadlineSeconds": 600, "autoRollback": false});
    s.apply(&other_policy).await;
    for i in 0..node_count() {
        s.wait_bridge_status(i, &other, "the missing bridge reported", |b| b.message.contains("does not exist")).await;
    }

    let name = unique("delete");
    s.apply(&policy(&name, json!({"bridge": "br-int", "sflow": sflow(&collector.target())}))).await;
    s.wait_ready(&name, "3/3").await;
    assert_exported_everywhere(&s, "sflow", &name).await;
    for i in 0..node_count() {
        let t = s.node_tracing(i).await.unwrap();
        let policies: BTreeSet<&str> = t.spec.bridges.iter().map(|b| b.policy.as_str()).collect();
        assert_eq!(policies, BTreeSet::from([other.as_str(), name.as_str()]), "merged NodeTracing of {}", node_name(i));
    }

    s.delete_policy(&name).await;
    s.wait_clean(&name).await;
    for i in 0..node_count() {
        let t = s
            .until(&format!("NodeTracing {} to report only {other}", node_name(i)), || async {
                let t = s.node_tracing(i).await?;
                let reported = t.status.as_ref()?.bridges.iter().all(|b| b.policy == other);
                reported.then_some(t)
            })
            .await;
        let bridges: Vec<(&str, &str)> =
            t.spec.bridges.iter().map(|b| (b.bridge.as_str(), b.policy.as_str())).collect();
        assert_eq!(bridges, [("br-e2e", other.as_str())], "only the other policy's part is left");
    }
    assert_eq!(bridge_exporter(0, "br-int", "ipfix"), Some(foreign.clone()), "the foreign IPFIX row is intact");
    assert_eq!(ovs_vsctl(0, &["get", "ipfix", &foreign, "targets"]), "[\"10.9.9.9:4739\"]");

    // The last policy goes: every NodeTracing is empty, so deleted.
    s.delete_policy(&other).await;
    for i in 0..node_count() {
        s.until(&format!("NodeTracing {} to be deleted", node_name(i)), || async {
            s.node_tracing(i).await.is_none().then_some(())
        })
        .await;
        assert_eq!(crosstrace_rows(i), 0, "no row of ours on {}", node_name(i));
    }
    assert_eq!(bridge_exporter(0, "br-int", "ipfix"), Some(foreign), "the foreign IPFIX row is still intact");
    remove_foreign(0, "ipfix");
    assert_eq!(bridge_exporter(0, "br-int", "ipfix"), None);
}

#[tokio::test]
async fn an_agent_down_during_a_policy_delete_removes_the_rows_within_30s_of_its_return() {
    let mut s = Suite::start(18137).await;
    let collector = Collector::bind().await;
    let name = unique("agent-down");
    s.apply(&policy(&name, json!({"bridge": "br-int", "sflow": sflow(&collector.target())}))).await;
    s.wait_ready(&name, "3/3").await;
    let d = 1;
    assert_eq!(ours(d, "sflow", &name).len(), 1, "{} exports", node_name(d));

    // The node's agent goes away; the policy is deleted and the controller finishes without it.
    s.agents.agents[d].stop();
    s.delete_policy(&name).await;
    assert!(s.node_tracing(d).await.is_none(), "the controller deleted the emptied NodeTracing of {}", node_name(d));
    assert_eq!(
        ours(d, "sflow", &name).len(),
        1,
        "nobody removed the rows of {} while its agent was down",
        node_name(d)
    );

    // Back: no Delete event will ever reach it, only a listing without its NodeTracing.
    s.agents.agents[d] = AgentProcess::start(d);
    let back = Instant::now();
    s.until(&format!("no crosstrace row on {}", node_name(d)), || async { (crosstrace_rows(d) == 0).then_some(()) })
        .await;
    let took = back.elapsed();
    eprintln!("rows removed {took:?} after the agent came back");
    assert!(took < Duration::from_secs(30), "removed within 30 s of the agent's return, took {took:?}");
    assert_eq!(bridge_exporter(d, "br-int", "sflow"), None, "the bridge column is cleared too");
    s.wait_clean(&name).await;
}

/// Puts node `i`'s br-int back when dropped, whatever the test did to it.
struct BrIntBack(usize);

impl Drop for BrIntBack {
    fn drop(&mut self) {
        ensure_br_int(self.0);
    }
}

#[tokio::test]
async fn a_bridge_deleted_and_created_again_on_a_converged_node_is_re_applied_not_rolled_back() {
    let mut s = Suite::start(18138).await;
    let collector = Collector::bind().await;
    let name = unique("rebridge");
    let deadline = 10;
    let mut p = policy(&name, json!({"bridge": "br-int", "sflow": sflow(&collector.target())}));
    p["spec"]["rollout"]["progressDeadlineSeconds"] = json!(deadline);
    let applied = Instant::now();
    s.apply(&p).await;
    s.wait_ready(&name, "3/3").await;

    // The node's bridge goes away: its agent reports it pending, the policy names the node, and
    // nothing is rolled back, even once the deadline since crosstrace's write has passed.
    let d = 2;
    let _back = BrIntBack(d);
    ovs_vsctl(d, &["del-br", "br-int"]);
    let b = s.wait_bridge_status(d, &name, "the bridge gone", |b| b.message.contains("any more")).await;
    assert!(!b.applied && !b.verified, "{b:?}");
    let p = s.wait_policy(&name, "NetworkReady", "False", |_, c| c.reason == "TargetUnhealthy").await;
    assert!(condition(&p, "NetworkReady").unwrap().message.contains(&node_name(d)), "{:?}", p.status);
    tokio::time::sleep(Duration::from_secs(deadline + 1).saturating_sub(applied.elapsed())).await;
    let t = s.node_tracing(d).await.expect("the NodeTracing stays");
    assert!(t.spec.bridges.iter().any(|b| b.policy == name), "the entry stays: {:?}", t.spec);
    assert!(!t.annotations().contains_key("crosstrace.dev/network-rolled-back"), "not rolled back");

    // Back: re-applied, reported as such, Ready again.
    ensure_br_int(d);
    let b = s.wait_bridge_status(d, &name, "re-applied", |b| b.verified && b.message.contains("created again")).await;
    assert!(b.applied, "{b:?}");
    assert_eq!(ours(d, "sflow", &name).len(), 1);
    let p = s.wait_ready(&name, "3/3").await;
    for c in ["Degraded", "NetworkReady"] {
        assert_ne!(condition(&p, c).unwrap().reason, "RolledBack", "{c}");
    }

    // Gone again, and its agent restarts meanwhile, with nothing in memory: it reports the bridge
    // missing and, from its previous status, that this request had converged; still no rollback.
    let t = s.node_tracing(d).await.expect("the NodeTracing stays");
    let request = t.spec.bridges.iter().find(|b| b.policy == name).unwrap().request_id();
    ovs_vsctl(d, &["del-br", "br-int"]);
    s.wait_bridge_status(d, &name, "the bridge gone again", |b| b.message.contains("any more")).await;
    s.agents.agents[d].stop();
    s.agents.agents[d] = AgentProcess::start(d);
    let b = s
        .wait_bridge_status(d, &name, "the new agent's report", |b| {
            b.message.contains("does not exist in Open vSwitch") && !b.message.contains("any more")
        })
        .await;
    assert_eq!(b.converged_request, request, "{b:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = s.node_tracing(d).await.expect("the NodeTracing stays");
    assert!(!t.annotations().contains_key("crosstrace.dev/network-rolled-back"), "not rolled back: {t:?}");
    let p = s.wait_policy(&name, "NetworkReady", "False", |_, c| c.reason == "TargetUnhealthy").await;
    assert!(condition(&p, "NetworkReady").unwrap().message.contains(&node_name(d)), "{:?}", p.status);
    ensure_br_int(d);
    s.wait_bridge_status(d, &name, "applied and verified again", |b| b.applied && b.verified).await;
    s.wait_ready(&name, "3/3").await;
    s.delete_policy(&name).await;
    s.wait_clean(&name).await;
}

#[test]
fn the_flow_decoders_refuse_malformed_input_without_panicking() {
    assert!(decode_sflow(&[]).is_err());
    assert!(decode_sflow(&[0, 0, 0, 5, 0, 0, 0, 1, 127, 0]).is_err());
    let mut d = vec![0, 0, 0, 5, 0, 0, 0, 1, 127, 0, 0, 1];
    d.extend([0u8; 12]);
    d.extend([0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 200]);
    assert!(decode_sflow(&d).is_err(), "a sample longer than the datagram");
    d.truncate(24);
    d.extend([0, 0, 0, 0]);
    let ok = decode_sflow(&d).unwrap();
    assert_eq!((ok.version, ok.agent, ok.formats.len()), (5, Ipv4Addr::LOCALHOST, 0));
    assert!(decode_ipfix(&[0, 10, 0, 16]).is_err());
    let m = decode_ipfix(&[0, 10, 0, 16, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7]).unwrap();
    assert_eq!((m.version, m.domain, m.sets.len()), (10, 7, 0));
    let bad_set = [0, 10, 0, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7, 1, 0, 0, 2];
    assert!(decode_ipfix(&bad_set).is_err());
}
