//! The network layer, controller side: one `NodeTracing` per selected node carries the merged OVS
//! export wanted there (one entry per bridge, the oldest policy wins a bridge); the node's agent makes
//! it so and reports back in the status, which is this layer's health signal.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeAddress};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, Client, ResourceExt};

use super::rollout::{self, Health, Step, Written};
use super::{LayerReport, PolicyView, Progress, TargetPlan, reasons, schedule, selector};
use crate::api::node_tracing::{BridgeExport, BridgeStatus};
use crate::api::{NetworkSpec, NodeTracing};
use crate::lean::{Lean, Meta};

/// Annotation on a NodeTracing: `{policy: generation}` of exports rolled back there (not retried).
pub const ROLLED_BACK_ANNOTATION: &str = "crosstrace.dev/network-rolled-back";

/// One node as observed for a policy.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub node: String,
    /// Matches the policy's `spec.network.nodeSelector` now.
    pub selected: bool,
    pub tracing: Option<NodeTracing>,
    /// The node's address (first InternalIP, else ExternalIP); read only for `spec.network.correlate`.
    pub address: Option<String>,
}

/// Sampled header bytes `spec.network.correlate` asks for: a request line and the headers up to a
/// `traceparent` in most requests (the API's most).
pub const CORRELATE_HEADER_BYTES: u32 = 512;

/// What `spec.network.correlate` takes from the controller's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Correlation {
    /// The `crosstrace flows` receiver, `IPv4:port` or `[IPv6]:port` (`--flows-receiver`); `None` when
    /// none is deployed.
    pub receiver: Option<String>,
    /// The admin limit maxHeaderBytes, when limits are configured.
    pub max_header_bytes: Option<u32>,
    /// Why the configured receiver has no address now (it could not be resolved).
    pub unresolved: Option<String>,
}

impl Correlation {
    /// The sampled header bytes of a correlating export: 512, or less when the admin allows less,
    /// never less than the policy asked for (which the admin limits allow, or nothing is written).
    fn header(&self, asked: u32) -> u32 {
        let allowed = self.max_header_bytes.map_or(CORRELATE_HEADER_BYTES, |max| max.min(CORRELATE_HEADER_BYTES));
        asked.max(allowed)
    }
}

/// The rules of `spec.network.correlate` the API server checks, again, for a policy stored while the CRD
/// was looser.
pub fn check_correlate(network: &NetworkSpec) -> Result<(), String> {
    if !network.correlate {
        return Ok(());
    }
    let Some(sflow) = &network.sflow else {
        return Err("spec.network.correlate needs spec.network.sflow".into());
    };
    if !sflow.agent.is_empty() {
        return Err("spec.network.sflow.agent must be empty when spec.network.correlate is true".into());
    }
    if sflow.targets.len() > 7 {
        return Err("spec.network.sflow.targets: at most 7 when spec.network.correlate is true".into());
    }
    Ok(())
}

/// A node's address for its sFlow agent: the first InternalIP, else the first ExternalIP, that is an IP.
pub fn node_address(addresses: &[NodeAddress]) -> Option<String> {
    ["InternalIP", "ExternalIP"].iter().find_map(|type_| {
        addresses
            .iter()
            .filter(|a| a.type_ == *type_)
            .find_map(|a| a.address.parse::<std::net::IpAddr>().ok())
            .map(|ip| ip.to_string())
    })
}

/// One change of the network layer.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Write a node's whole NodeTracing spec (every policy's entries), guarded by the resourceVersion
    /// that was read so that two policies never overwrite each other's entries.
    Put { node: String, bridges: Vec<BridgeExport>, rolled_back: Option<String>, resource_version: Option<String> },
    /// Delete a NodeTracing left with nothing to export (the agent then removes its rows).
    Delete { node: String, resource_version: Option<String> },
}

/// The plan of the network layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub report: LayerReport,
}

fn rolled_back_map(t: Option<&NodeTracing>) -> BTreeMap<String, i64> {
    t.and_then(|t| t.annotations().get(ROLLED_BACK_ANNOTATION))
        .and_then(|raw| serde_json::from_str(raw).ok())
        .unwrap_or_default()
}

fn put(t: Option<&NodeTracing>, node: &str, bridges: Vec<BridgeExport>, rolled_back: &BTreeMap<String, i64>) -> Action {
    let resource_version = t.and_then(|t| t.metadata.resource_version.clone());
    if bridges.is_empty() && rolled_back.is_empty() {
        return Action::Delete { node: node.to_string(), resource_version };
    }
    let rolled_back = (!rolled_back.is_empty()).then(|| serde_json::to_string(rolled_back).expect("a map serializes"));
    Action::Put { node: node.to_string(), bridges, rolled_back, resource_version }
}

/// The export a policy wants on a node (without the request time, which is set when it is written).
/// With `correlate`, the sFlow export also goes to the flows receiver, with the header bytes a request
/// needs and the node's own address as its agent address.
fn desired(policy: PolicyView<'_>, network: &NetworkSpec, address: Option<&str>, c: &Correlation) -> BridgeExport {
    let mut sflow = network.sflow.clone();
    if let Some(s) = sflow.as_mut().filter(|_| network.correlate) {
        if let Some(receiver) = &c.receiver
            && !s.targets.contains(receiver)
        {
            s.targets.push(receiver.clone());
        }
        s.header = c.header(s.header);
        s.agent = address.unwrap_or_default().to_string();
    }
    BridgeExport {
        bridge: network.bridge.clone(),
        policy: policy.name.to_string(),
        policy_generation: policy.generation,
        sflow,
        ipfix: network.ipfix.clone(),
        conflict_policy: network.conflict_policy,
        requested_at: None,
        converged: false,
    }
}

fn same_export(a: &BridgeExport, b: &BridgeExport) -> bool {
    let bare = |e: &BridgeExport| BridgeExport { requested_at: None, converged: false, ..e.clone() };
    bare(a) == bare(b)
}

/// What a correlating policy's Ready condition should say about the correlation it gets.
fn correlation_warnings(network: &NetworkSpec, observed: &[Observed], c: &Correlation) -> Vec<String> {
    let Some(sflow) = network.sflow.as_ref().filter(|_| network.correlate) else {
        return Vec::new();
    };
    let mut warnings = Vec::new();
    if let Some(why) = c.receiver.is_none().then_some(c.unresolved.as_ref()).flatten() {
        warnings.push(format!(
            "spec.network.correlate: the flows receiver {why} has no address now, so samples go only to the \
             listed targets"
        ));
    } else if c.receiver.is_none() {
        warnings.push(
            "spec.network.correlate: the controller has no flows receiver (--flows-receiver, the chart's \
             flows.enabled), so samples go only to the listed targets"
                .to_string(),
        );
    }
    let header = c.header(sflow.header);
    if header < CORRELATE_HEADER_BYTES {
        warnings.push(format!(
            "spec.network.correlate: sampled headers are {header} bytes (admin limit maxHeaderBytes), so a \
             traceparent beyond byte {header} of a packet is missed"
        ));
    }
    let mut unaddressed: Vec<&str> =
        observed.iter().filter(|o| o.selected && o.address.is_none()).map(|o| o.node.as_str()).collect();
    if !unaddressed.is_empty() {
        let more = unaddressed.len().saturating_sub(3);
        unaddressed.truncate(3);
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        warnings.push(format!(
            "spec.network.correlate: node {}{more} has no InternalIP or ExternalIP, so its samples cannot be \
             attributed to it",
            unaddressed.join(", ")
        ));
    }
    warnings
}

/// Plans the network layer: pure, from the policy, the observed nodes, the time and what correlation
/// the controller offers.
pub fn plan(policy: PolicyView<'_>, observed: &[Observed], now: Timestamp, correlation: &Correlation) -> Plan {
    let network = policy.spec.network.as_ref().filter(|_| !policy.deleting);
    let mut plan = Plan::default();
    if let Some(network) = network {
        plan.report.warnings = correlation_warnings(network, observed, correlation);
    }
    let mut targets: Vec<&Observed> = observed.iter().collect();
    targets.sort_by(|a, b| a.node.cmp(&b.node));
    let mut per_node = Vec::new();
    let mut reverts = Vec::new();
    for t in targets {
        let tracing = t.tracing.as_ref();
        let bridges = tracing.map(|t| t.spec.bridges.clone()).unwrap_or_default();
        let (mine, others): (Vec<_>, Vec<_>) = bridges.into_iter().partition(|b| b.policy == policy.name);
        let mut rolled_back = rolled_back_map(tracing);
        match network {
            Some(network) if t.selected => {
                plan.report.selected += 1;
                let want = desired(policy, network, t.address.as_deref(), correlation);
                per_node.push(forward(policy, want, t, mine, others, rolled_back, now));
            }
            _ => {
                if !mine.is_empty() || rolled_back.remove(policy.name).is_some() {
                    reverts.push(put(tracing, &t.node, others, &rolled_back));
                }
            }
        }
    }
    plan.actions = schedule(per_node, &policy.spec.rollout, &mut plan.report);
    plan.actions.extend(reverts);
    plan
}

fn forward(
    policy: PolicyView<'_>,
    want: BridgeExport,
    t: &Observed,
    mine: Vec<BridgeExport>,
    others: Vec<BridgeExport>,
    rolled_back: BTreeMap<String, i64>,
    now: Timestamp,
) -> TargetPlan<Action> {
    let node = &t.node;
    let tracing = t.tracing.as_ref();
    let deadline = SignedDuration::from_secs(i64::from(policy.spec.rollout.progress_deadline_seconds));
    if let Some(holder) = others.iter().find(|b| b.bridge == want.bridge && policy.older.contains(&b.policy)) {
        return TargetPlan::problem(
            Progress::Held,
            reasons::CONFLICT,
            format!("bridge {} on node {node} already exports for TracingPolicy {}", want.bridge, holder.policy),
            true,
        );
    }
    let what = format!("node {node}");
    if rolled_back.get(policy.name) == Some(&policy.generation) {
        return super::held_rolled_back(&what);
    }
    let current = mine.iter().find(|b| same_export(b, &want));
    let status: Option<&BridgeStatus> = tracing
        .and_then(|t| t.status.as_ref())
        .and_then(|s| s.bridges.iter().find(|b| b.bridge == want.bridge && b.policy == policy.name));
    if let Some(s) = status.filter(|s| s.conflict && current.is_some()) {
        return TargetPlan::problem(
            Progress::Held,
            reasons::CONFLICT,
            format!(
                "bridge {} on node {node} already exports somewhere crosstrace does not own (conflictPolicy Skip): {}",
                want.bridge, s.message
            ),
            true,
        );
    }
    // Converged: the agent says this request was verified once (or an earlier controller marked it so).
    let written = current.map(|c| Written {
        current: true,
        intact: true,
        converged: c.converged || status.is_some_and(|s| s.converged_request == c.request_id()),
        since: c.requested_at.as_ref().map_or(now.as_second(), |t| t.0.as_second()),
    });
    let health = match status {
        Some(s) if s.applied && s.verified && s.applied_generation == policy.generation => Health::Healthy,
        _ => Health::Progressing { resumed_at: None },
    };
    let step = match rollout::judge(written, &health, now.as_second(), deadline.as_secs()) {
        Step::Failed(why) => {
            let agent =
                status.filter(|s| !s.message.is_empty()).map_or("no report from its agent", |s| s.message.as_str());
            Step::Failed(format!("{why} applying and verifying the export on {} ({agent})", want.bridge))
        }
        Step::OwnerUnhealthy(_) => {
            let agent = status.filter(|s| !s.message.is_empty()).map_or("not verified", |s| s.message.as_str());
            Step::OwnerUnhealthy(format!("bridge {}: {agent}", want.bridge))
        }
        step => step,
    };
    let requested_at = current.and_then(|c| c.requested_at.clone());
    let roll_back_to = others.clone();
    super::follow(
        step,
        &what,
        &policy.spec.rollout,
        |converged, restart_clock| {
            // Write (or rewrite) this policy's entry; a newer policy's entry on the same bridge gives way.
            let mut bridges: Vec<BridgeExport> = others.into_iter().filter(|b| b.bridge != want.bridge).collect();
            let requested_at = if restart_clock { Some(Time(now)) } else { requested_at };
            bridges.push(BridgeExport { requested_at, converged, ..want });
            let mut rolled_back = rolled_back.clone();
            rolled_back.remove(policy.name);
            vec![put(tracing, node, bridges, &rolled_back)]
        },
        || {
            let mut rolled_back = rolled_back.clone();
            rolled_back.insert(policy.name.to_string(), policy.generation);
            vec![put(tracing, node, roll_back_to, &rolled_back)]
        },
    )
}

/// Nodes the policy selects and nodes whose NodeTracing carries something of it: from the controller's
/// stores once they are synced, else listed.
pub async fn observe(
    client: &Client,
    stores: Option<&super::stores::Stores>,
    policy: PolicyView<'_>,
) -> Result<Vec<Observed>, super::ObserveError> {
    let network = policy.spec.network.as_ref().filter(|_| !policy.deleting);
    let node_selector = network
        .and_then(|n| n.node_selector.as_ref())
        .map(|s| selector(s).map_err(super::ObserveError::selector("spec.network.nodeSelector")))
        .transpose()?;
    if let Some(stores) = stores.filter(|s| s.network_ready()) {
        stores.forget_stale_tracings();
        let nodes = network.map(|n| {
            let addressed = stores.nodes(node_selector.as_ref());
            // Addresses only for correlating policies, as when they are listed.
            addressed.into_iter().map(|(node, address)| (node, address.filter(|_| n.correlate))).collect()
        });
        return Ok(observed(policy, nodes.unwrap_or_default(), stores.node_tracings()));
    }
    tracing::debug!("the node stores are not synced yet: listing the nodes and NodeTracings");
    listed(client, policy, network, node_selector).await
}

/// What [`observe`] finds from the selected nodes (name, address) and every readable NodeTracing.
fn observed(policy: PolicyView<'_>, nodes: Vec<(String, Option<String>)>, tracings: Vec<NodeTracing>) -> Vec<Observed> {
    let mut found: BTreeMap<String, Observed> = nodes
        .into_iter()
        .map(|(node, address)| (node.clone(), Observed { node, selected: true, tracing: None, address }))
        .collect();
    for tracing in tracings {
        let name = tracing.name_any();
        let concerns = tracing.spec.bridges.iter().any(|b| b.policy == policy.name)
            || rolled_back_map(Some(&tracing)).contains_key(policy.name);
        if let Some(o) = found.get_mut(&name) {
            o.tracing = Some(tracing);
        } else if concerns {
            found.insert(name.clone(), Observed { node: name, selected: false, tracing: Some(tracing), address: None });
        }
    }
    found.into_values().collect()
}

/// [`observe`] from lists of the nodes and NodeTracings.
async fn listed(
    client: &Client,
    policy: PolicyView<'_>,
    network: Option<&NetworkSpec>,
    node_selector: Option<kube::core::Selector>,
) -> Result<Vec<Observed>, super::ObserveError> {
    let mut nodes = Vec::new();
    if let Some(network) = network {
        let params = match node_selector {
            Some(s) => ListParams::default().labels_from(&s),
            None => ListParams::default(),
        };
        if network.correlate {
            // The nodes' addresses too (the whole Node, briefly; only correlating policies read it).
            for node in Api::<Lean<Node>>::all(client.clone()).list(&params).await? {
                let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
                nodes.push((node.name_any(), node_address(addresses)));
            }
        } else {
            for node in Api::<Meta<Node>>::all(client.clone()).list(&params).await? {
                nodes.push((node.name_any(), None));
            }
        }
    }
    // Read one by one: a NodeTracing that cannot be read (written while the CRD was looser) is reported on
    // itself by the controller's watch, and must not stop this policy. Its node is left as it is.
    let raw = Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<NodeTracing>(&()));
    let tracings = raw.list(&ListParams::default()).await?;
    let readable = tracings.into_iter().filter_map(|o| crate::lenient::read::<NodeTracing>(o).ok());
    Ok(observed(policy, nodes, readable.collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status an agent reports for policy `fabric`'s export on br-int, applied and verified at generation 1.
    /// The export the policy wants, as the controller wrote it at 0.
    fn requested(view: PolicyView<'_>) -> BridgeExport {
        let network = view.spec.network.as_ref().unwrap();
        BridgeExport { requested_at: Some(Time(at(0))), ..desired(view, network, None, &Correlation::default()) }
    }

    fn verified_fabric() -> BridgeStatus {
        BridgeStatus {
            bridge: "br-int".into(),
            policy: "fabric".into(),
            applied_generation: 1,
            applied: true,
            verified: true,
            ..Default::default()
        }
    }
    use crate::api::node_tracing::{NodeTracingSpec, NodeTracingStatus};
    use crate::api::{RolloutSpec, SflowSpec, TracingPolicySpec};
    use k8s_openapi::api::core::v1::NodeAddress;
    use std::collections::BTreeSet;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn spec() -> TracingPolicySpec {
        TracingPolicySpec {
            network: Some(NetworkSpec {
                node_selector: None,
                bridge: "br-int".into(),
                sflow: Some(SflowSpec {
                    targets: vec!["127.0.0.1:6343".into()],
                    sampling: 64,
                    polling: 10,
                    header: 128,
                    agent: String::new(),
                }),
                ipfix: None,
                conflict_policy: Default::default(),
                correlate: false,
            }),
            rollout: RolloutSpec { max_concurrent: 2, progress_deadline_seconds: 30, ..Default::default() },
            ..Default::default()
        }
    }

    fn node(name: &str, tracing: Option<NodeTracing>) -> Observed {
        Observed { node: name.into(), selected: true, tracing, address: None }
    }

    fn tracing_with(node: &str, bridges: Vec<BridgeExport>, status: Vec<BridgeStatus>) -> NodeTracing {
        let mut t = NodeTracing::new(node, NodeTracingSpec { node_name: node.into(), bridges });
        t.status = Some(NodeTracingStatus { bridges: status, ..Default::default() });
        t
    }

    fn applied_from(action: &Action) -> Vec<BridgeExport> {
        match action {
            Action::Put { bridges, .. } => bridges.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nodes_are_brought_in_batches() {
        let s = spec();
        let older = BTreeSet::new();
        let view = PolicyView { deleting: false, older: &older, ..PolicyView::new("fabric", &s) };
        let plan = plan(view, &[node("n0", None), node("n1", None), node("n2", None)], at(0), &Correlation::default());
        assert_eq!(plan.actions.len(), 2);
        assert_eq!((plan.report.in_flight, plan.report.pending), (2, 1));
        let bridges = applied_from(&plan.actions[0]);
        assert_eq!(bridges[0].policy, "fabric");
        assert_eq!(bridges[0].requested_at, Some(Time(at(0))));
    }

    #[test]
    fn ready_when_the_agent_reports_applied_and_verified_for_this_generation() {
        let s = spec();
        let older = BTreeSet::new();
        let view = PolicyView { deleting: false, older: &older, ..PolicyView::new("fabric", &s) };
        let entry = requested(view);
        let ok_status = verified_fabric;
        let ok = ok_status();
        let plan = plan(
            view,
            &[node("n0", Some(tracing_with("n0", vec![entry.clone()], vec![ok.clone()])))],
            at(5),
            &Correlation::default(),
        );
        assert_eq!(plan.report.ready, 1);
        let [Action::Put { bridges, .. }] = &plan.actions[..] else { panic!("{:?}", plan.actions) };
        assert!(bridges[0].converged, "the first healthy report is recorded as converged");
        let converged = BridgeExport { converged: true, ..entry.clone() };
        let idle = super::plan(
            view,
            &[node("n0", Some(tracing_with("n0", vec![converged.clone()], vec![ok])))],
            at(6),
            &Correlation::default(),
        );
        assert!(idle.actions.is_empty(), "{:?}", idle.actions);

        // Converged, then the bridge goes away long after the deadline: reported, never rolled back.
        let lost = BridgeStatus { applied: false, message: "bridge br-int does not exist".into(), ..ok_status() };
        let gone = super::plan(
            view,
            &[node("n0", Some(tracing_with("n0", vec![converged], vec![lost])))],
            at(500),
            &Correlation::default(),
        );
        assert!(gone.actions.is_empty(), "{:?}", gone.actions);
        assert_eq!((gone.report.unhealthy, gone.report.rolled_back), (1, 0));
        assert!(gone.report.problems[0].message.contains("does not exist"), "{:?}", gone.report.problems);
        assert!(!gone.report.problems[0].degraded);

        let waiting = super::plan(
            view,
            &[node("n0", Some(tracing_with("n0", vec![entry.clone()], vec![])))],
            at(5),
            &Correlation::default(),
        );
        assert_eq!(waiting.report.in_flight, 1);
        let failed = super::plan(
            view,
            &[node("n0", Some(tracing_with("n0", vec![entry], vec![])))],
            at(31),
            &Correlation::default(),
        );
        assert_eq!(failed.report.problems[0].reason, "RolledBack");
        match &failed.actions[..] {
            [Action::Delete { .. }] | [Action::Put { .. }] => {}
            other => panic!("{other:?}"),
        }
        if let [Action::Put { bridges, rolled_back, .. }] = &failed.actions[..] {
            assert!(bridges.is_empty());
            assert_eq!(rolled_back.as_deref(), Some(r#"{"fabric":1}"#));
        }
    }

    #[test]
    fn an_agent_that_says_the_request_converged_needs_no_second_write() {
        let s = spec();
        let older = BTreeSet::new();
        let view = PolicyView { deleting: false, older: &older, ..PolicyView::new("fabric", &s) };
        let entry = requested(view);
        let said = || BridgeStatus { converged_request: entry.request_id(), ..verified_fabric() };
        let look = |status: BridgeStatus, now| {
            super::plan(
                view,
                &[node("n0", Some(tracing_with("n0", vec![entry.clone()], vec![status])))],
                at(now),
                &Correlation::default(),
            )
        };
        let healthy = look(said(), 5);
        assert!(healthy.actions.is_empty(), "no mark is written: {:?}", healthy.actions);
        assert_eq!(healthy.report.ready, 1);
        // Lost long after the deadline: the agent's word makes it the node's problem, not a rollback.
        let lost = look(BridgeStatus { applied: false, verified: false, message: "gone".into(), ..said() }, 500);
        assert!(lost.actions.is_empty(), "{:?}", lost.actions);
        assert_eq!((lost.report.unhealthy, lost.report.rolled_back), (1, 0));
        // The agent's word for another request (an earlier one) is not this request's convergence.
        let stale = BridgeStatus { converged_request: "0123456789abcdef".into(), applied: false, ..said() };
        assert_eq!(look(stale, 500).report.rolled_back, 1, "past the deadline, never verified: rolled back");
    }

    #[test]
    fn the_older_policy_keeps_a_bridge_and_other_entries_are_kept() {
        let s = spec();
        let older = BTreeSet::from(["first".to_string()]);
        let view = PolicyView { deleting: false, older: &older, ..PolicyView::new("second", &s) };
        let theirs = BridgeExport {
            policy: "first".into(),
            ..desired(view, s.network.as_ref().unwrap(), None, &Correlation::default())
        };
        let plan = plan(
            view,
            &[node("n0", Some(tracing_with("n0", vec![theirs.clone()], vec![])))],
            at(0),
            &Correlation::default(),
        );
        assert!(plan.actions.is_empty());
        assert_eq!(plan.report.problems[0].reason, "Conflict");

        // Another bridge of another policy stays when this one adds its entry.
        let other_bridge = BridgeExport { bridge: "br-ex".into(), ..theirs };
        let plan = super::plan(
            view,
            &[node("n0", Some(tracing_with("n0", vec![other_bridge.clone()], vec![])))],
            at(0),
            &Correlation::default(),
        );
        let bridges = applied_from(&plan.actions[0]);
        assert_eq!(bridges.len(), 2);
        assert_eq!(bridges[0], other_bridge);
    }

    #[test]
    fn delete_empties_only_this_policys_part() {
        let s = spec();
        let older = BTreeSet::new();
        let view = PolicyView { deleting: true, older: &older, ..PolicyView::new("fabric", &s) };
        let mine = desired(view, s.network.as_ref().unwrap(), None, &Correlation::default());
        let theirs = BridgeExport { bridge: "br-ex".into(), policy: "other".into(), ..mine.clone() };
        let plan = plan(
            view,
            &[node("n0", Some(tracing_with("n0", vec![mine.clone(), theirs.clone()], vec![])))],
            at(0),
            &Correlation::default(),
        );
        assert_eq!(applied_from(&plan.actions[0]), vec![theirs]);
        let alone = super::plan(
            view,
            &[node("n1", Some(tracing_with("n1", vec![mine], vec![])))],
            at(0),
            &Correlation::default(),
        );
        assert!(matches!(alone.actions[..], [Action::Delete { .. }]));
    }

    fn correlating(header: u32) -> TracingPolicySpec {
        let mut s = spec();
        let network = s.network.as_mut().unwrap();
        network.correlate = true;
        network.sflow.as_mut().unwrap().header = header;
        s
    }

    fn addressed(name: &str, address: Option<&str>) -> Observed {
        Observed { address: address.map(Into::into), ..node(name, None) }
    }

    fn sflow_of(action: &Action) -> SflowSpec {
        applied_from(action)[0].sflow.clone().unwrap()
    }

    #[test]
    fn correlate_adds_the_receiver_the_header_bytes_and_each_nodes_address() {
        let s = correlating(128);
        let view = PolicyView::new("fabric", &s);
        let c = Correlation { receiver: Some("10.96.0.20:6343".into()), max_header_bytes: Some(512), unresolved: None };
        let plan = plan(view, &[addressed("n0", Some("10.0.0.10")), addressed("n1", Some("fd00::11"))], at(0), &c);
        let [first, second] = &plan.actions[..] else { panic!("{:?}", plan.actions) };
        let sflow = sflow_of(first);
        assert_eq!(sflow.targets, ["127.0.0.1:6343", "10.96.0.20:6343"]);
        assert_eq!((sflow.header, sflow.agent.as_str()), (512, "10.0.0.10"));
        assert_eq!(sflow_of(second).agent, "fd00::11");
        assert!(plan.report.warnings.is_empty(), "{:?}", plan.report.warnings);

        // Without correlate, nothing of it (and the receiver is no target).
        let plain = spec();
        let plan = super::plan(PolicyView::new("fabric", &plain), &[addressed("n0", Some("10.0.0.10"))], at(0), &c);
        let sflow = sflow_of(&plan.actions[0]);
        assert_eq!((sflow.targets.len(), sflow.header, sflow.agent.as_str()), (1, 128, ""));
    }

    #[test]
    fn a_lower_header_limit_is_used_and_said() {
        let s = correlating(128);
        let view = PolicyView::new("fabric", &s);
        let c = Correlation { receiver: Some("10.96.0.20:6343".into()), max_header_bytes: Some(256), unresolved: None };
        let plan = plan(view, &[addressed("n0", Some("10.0.0.10"))], at(0), &c);
        assert_eq!(sflow_of(&plan.actions[0]).header, 256);
        let [warning] = &plan.report.warnings[..] else { panic!("{:?}", plan.report.warnings) };
        assert!(warning.contains("traceparent beyond byte 256") && warning.contains("maxHeaderBytes"), "{warning}");

        // Never below what the policy asked for (which the admin limits already allow).
        let s = correlating(300);
        let c = Correlation { max_header_bytes: Some(300), ..c };
        let plan = super::plan(PolicyView::new("fabric", &s), &[addressed("n0", Some("10.0.0.10"))], at(0), &c);
        assert_eq!(sflow_of(&plan.actions[0]).header, 300);
        // No admin limits: the API's most.
        assert_eq!(Correlation::default().header(128), CORRELATE_HEADER_BYTES);
    }

    #[test]
    fn no_receiver_or_no_address_is_reported_and_the_rest_rolls_out() {
        let s = correlating(128);
        let view = PolicyView::new("fabric", &s);
        let c = Correlation { receiver: None, max_header_bytes: None, unresolved: None };
        let plan = plan(view, &[addressed("n0", None), addressed("n1", Some("10.0.0.11"))], at(0), &c);
        assert_eq!(plan.actions.len(), 2);
        let sflow = sflow_of(&plan.actions[0]);
        assert_eq!((sflow.targets.len(), sflow.header, sflow.agent.as_str()), (1, 512, ""));
        let warnings = plan.report.warnings.join("\n");
        assert!(warnings.contains("no flows receiver"), "{warnings}");
        assert!(warnings.contains("node n0 has no InternalIP"), "{warnings}");
        let c = Correlation { unresolved: Some("crosstrace-flows.x.svc:6343: no address".into()), ..c };
        let plan = super::plan(view, &[addressed("n1", Some("10.0.0.11"))], at(0), &c);
        assert!(
            plan.report.warnings[0].contains("crosstrace-flows.x.svc:6343: no address"),
            "{:?}",
            plan.report.warnings
        );
    }

    #[test]
    fn the_receiver_is_not_added_twice_and_a_converged_export_stays_idle() {
        let mut s = correlating(512);
        s.network.as_mut().unwrap().sflow.as_mut().unwrap().targets.push("10.96.0.20:6343".into());
        let view = PolicyView::new("fabric", &s);
        let c = Correlation { receiver: Some("10.96.0.20:6343".into()), max_header_bytes: Some(512), unresolved: None };
        let want = desired(view, s.network.as_ref().unwrap(), Some("10.0.0.10"), &c);
        assert_eq!(want.sflow.as_ref().unwrap().targets.len(), 2);
        let converged = BridgeExport { requested_at: Some(Time(at(0))), converged: true, ..want };
        let ok = verified_fabric();
        let t = Observed {
            address: Some("10.0.0.10".into()),
            ..node("n0", Some(tracing_with("n0", vec![converged], vec![ok])))
        };
        let plan = super::plan(view, &[t], at(9), &c);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.report.ready, 1);
    }

    #[test]
    fn correlate_rules_are_checked_again() {
        let mut n = correlating(128).network.unwrap();
        assert_eq!(check_correlate(&n), Ok(()));
        n.sflow.as_mut().unwrap().agent = "eth0".into();
        assert!(check_correlate(&n).unwrap_err().contains("agent"));
        n.sflow = None;
        assert!(check_correlate(&n).unwrap_err().contains("needs spec.network.sflow"));
        let mut n = correlating(128).network.unwrap();
        n.sflow.as_mut().unwrap().targets = (0..8).map(|i| format!("10.0.0.{i}:6343")).collect();
        assert!(check_correlate(&n).unwrap_err().contains("at most 7"));
    }

    #[test]
    fn observed_are_the_selected_nodes_and_the_unselected_ones_this_policy_left_something_on() {
        let s = spec();
        let view = PolicyView::new("fabric", &s);
        let mine = BridgeExport { policy: "fabric".into(), ..Default::default() };
        let theirs = BridgeExport { policy: "other".into(), ..Default::default() };
        let mut marked = tracing_with("n3", vec![], vec![]);
        marked.annotations_mut().insert(ROLLED_BACK_ANNOTATION.into(), r#"{"fabric":1}"#.into());
        let tracings = vec![
            tracing_with("n0", vec![theirs.clone()], vec![]),
            tracing_with("n2", vec![mine], vec![]),
            marked,
            tracing_with("n4", vec![theirs], vec![]),
        ];
        let nodes = vec![("n0".to_string(), Some("10.0.0.10".to_string())), ("n1".to_string(), None)];
        let found = observed(view, nodes, tracings);
        let summary: Vec<_> =
            found.iter().map(|o| (o.node.as_str(), o.selected, o.tracing.is_some(), o.address.as_deref())).collect();
        assert_eq!(
            summary,
            [
                ("n0", true, true, Some("10.0.0.10")),
                ("n1", true, false, None),
                ("n2", false, true, None),
                ("n3", false, true, None),
            ]
        );
    }

    #[test]
    fn a_node_address_is_an_internal_ip_first() {
        let a = |type_: &str, address: &str| NodeAddress { type_: type_.into(), address: address.into() };
        let addresses = [a("Hostname", "n0"), a("ExternalIP", "203.0.113.5"), a("InternalIP", "10.0.0.10")];
        assert_eq!(node_address(&addresses).as_deref(), Some("10.0.0.10"));
        assert_eq!(node_address(&addresses[..2]).as_deref(), Some("203.0.113.5"));
        assert_eq!(node_address(&[a("InternalIP", "not-an-ip")]), None);
    }
}
