//! The network layer, controller side: one `NodeTracing` per selected node carries the merged OVS
//! export wanted there (one entry per bridge, the oldest policy wins a bridge); the node's agent makes
//! it so and reports back in the status, which is this layer's health signal.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, Client, ResourceExt};

use super::rollout::{self, Health, Step, Written};
use super::{LayerReport, PolicyView, Progress, TargetPlan, reasons, schedule, selector};
use crate::api::node_tracing::{BridgeExport, BridgeStatus};
use crate::api::{NetworkSpec, NodeTracing};
use crate::lean::Meta;

/// Annotation on a NodeTracing: `{policy: generation}` of exports rolled back there (not retried).
pub const ROLLED_BACK_ANNOTATION: &str = "crosstrace.dev/network-rolled-back";

/// One node as observed for a policy.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub node: String,
    /// Matches the policy's `spec.network.nodeSelector` now.
    pub selected: bool,
    pub tracing: Option<NodeTracing>,
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
fn desired(policy: PolicyView<'_>, network: &NetworkSpec) -> BridgeExport {
    BridgeExport {
        bridge: network.bridge.clone(),
        policy: policy.name.to_string(),
        policy_generation: policy.generation,
        sflow: network.sflow.clone(),
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

/// Plans the network layer: pure, from the policy, the observed nodes and the time.
pub fn plan(policy: PolicyView<'_>, observed: &[Observed], now: Timestamp) -> Plan {
    let network = policy.spec.network.as_ref().filter(|_| !policy.deleting);
    let mut plan = Plan::default();
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
                per_node.push(forward(policy, network, t, mine, others, rolled_back, now));
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
    network: &NetworkSpec,
    t: &Observed,
    mine: Vec<BridgeExport>,
    others: Vec<BridgeExport>,
    rolled_back: BTreeMap<String, i64>,
    now: Timestamp,
) -> TargetPlan<Action> {
    let node = &t.node;
    let tracing = t.tracing.as_ref();
    let want = desired(policy, network);
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
    let written = current.map(|c| Written {
        current: true,
        intact: true,
        converged: c.converged,
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

/// Nodes the policy selects and nodes whose NodeTracing carries something of it.
pub async fn observe(client: &Client, policy: PolicyView<'_>) -> Result<Vec<Observed>, super::ObserveError> {
    let mut found: BTreeMap<String, Observed> = BTreeMap::new();
    if let Some(network) = policy.spec.network.as_ref().filter(|_| !policy.deleting) {
        let params = match &network.node_selector {
            Some(s) => ListParams::default()
                .labels_from(&selector(s).map_err(super::ObserveError::selector("spec.network.nodeSelector"))?),
            None => ListParams::default(),
        };
        for node in Api::<Meta<Node>>::all(client.clone()).list(&params).await? {
            let name = node.name_any();
            found.insert(name.clone(), Observed { node: name, selected: true, tracing: None });
        }
    }
    // Read one by one: a NodeTracing that cannot be read (written while the CRD was looser) is reported on
    // itself by the controller's watch, and must not stop this policy. Its node is left as it is.
    let raw = Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<NodeTracing>(&()));
    for object in raw.list(&ListParams::default()).await? {
        let Ok(tracing) = crate::lenient::read::<NodeTracing>(object) else {
            continue;
        };
        let name = tracing.name_any();
        let concerns = tracing.spec.bridges.iter().any(|b| b.policy == policy.name)
            || rolled_back_map(Some(&tracing)).contains_key(policy.name);
        if let Some(o) = found.get_mut(&name) {
            o.tracing = Some(tracing);
        } else if concerns {
            found.insert(name.clone(), Observed { node: name, selected: false, tracing: Some(tracing) });
        }
    }
    Ok(found.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::node_tracing::{NodeTracingSpec, NodeTracingStatus};
    use crate::api::{RolloutSpec, SflowSpec, TracingPolicySpec};
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
            }),
            rollout: RolloutSpec { max_concurrent: 2, progress_deadline_seconds: 30, ..Default::default() },
            ..Default::default()
        }
    }

    fn node(name: &str, tracing: Option<NodeTracing>) -> Observed {
        Observed { node: name.into(), selected: true, tracing }
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
        let plan = plan(view, &[node("n0", None), node("n1", None), node("n2", None)], at(0));
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
        let entry = BridgeExport { requested_at: Some(Time(at(0))), ..desired(view, s.network.as_ref().unwrap()) };
        let ok_status = || BridgeStatus {
            bridge: "br-int".into(),
            policy: "fabric".into(),
            applied_generation: 1,
            applied: true,
            verified: true,
            ..Default::default()
        };
        let ok = ok_status();
        let plan = plan(view, &[node("n0", Some(tracing_with("n0", vec![entry.clone()], vec![ok.clone()])))], at(5));
        assert_eq!(plan.report.ready, 1);
        let [Action::Put { bridges, .. }] = &plan.actions[..] else { panic!("{:?}", plan.actions) };
        assert!(bridges[0].converged, "the first healthy report is recorded as converged");
        let converged = BridgeExport { converged: true, ..entry.clone() };
        let idle = super::plan(view, &[node("n0", Some(tracing_with("n0", vec![converged.clone()], vec![ok])))], at(6));
        assert!(idle.actions.is_empty(), "{:?}", idle.actions);

        // Converged, then the bridge goes away long after the deadline: reported, never rolled back.
        let lost = BridgeStatus { applied: false, message: "bridge br-int does not exist".into(), ..ok_status() };
        let gone = super::plan(view, &[node("n0", Some(tracing_with("n0", vec![converged], vec![lost])))], at(500));
        assert!(gone.actions.is_empty(), "{:?}", gone.actions);
        assert_eq!((gone.report.unhealthy, gone.report.rolled_back), (1, 0));
        assert!(gone.report.problems[0].message.contains("does not exist"), "{:?}", gone.report.problems);
        assert!(!gone.report.problems[0].degraded);

        let waiting = super::plan(view, &[node("n0", Some(tracing_with("n0", vec![entry.clone()], vec![])))], at(5));
        assert_eq!(waiting.report.in_flight, 1);
        let failed = super::plan(view, &[node("n0", Some(tracing_with("n0", vec![entry], vec![])))], at(31));
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
    fn the_older_policy_keeps_a_bridge_and_other_entries_are_kept() {
        let s = spec();
        let older = BTreeSet::from(["first".to_string()]);
        let view = PolicyView { deleting: false, older: &older, ..PolicyView::new("second", &s) };
        let theirs = BridgeExport { policy: "first".into(), ..desired(view, s.network.as_ref().unwrap()) };
        let plan = plan(view, &[node("n0", Some(tracing_with("n0", vec![theirs.clone()], vec![])))], at(0));
        assert!(plan.actions.is_empty());
        assert_eq!(plan.report.problems[0].reason, "Conflict");

        // Another bridge of another policy stays when this one adds its entry.
        let other_bridge = BridgeExport { bridge: "br-ex".into(), ..theirs };
        let plan =
            super::plan(view, &[node("n0", Some(tracing_with("n0", vec![other_bridge.clone()], vec![])))], at(0));
        let bridges = applied_from(&plan.actions[0]);
        assert_eq!(bridges.len(), 2);
        assert_eq!(bridges[0], other_bridge);
    }

    #[test]
    fn delete_empties_only_this_policys_part() {
        let s = spec();
        let older = BTreeSet::new();
        let view = PolicyView { deleting: true, older: &older, ..PolicyView::new("fabric", &s) };
        let mine = desired(view, s.network.as_ref().unwrap());
        let theirs = BridgeExport { bridge: "br-ex".into(), policy: "other".into(), ..mine.clone() };
        let plan =
            plan(view, &[node("n0", Some(tracing_with("n0", vec![mine.clone(), theirs.clone()], vec![])))], at(0));
        assert_eq!(applied_from(&plan.actions[0]), vec![theirs]);
        let alone = super::plan(view, &[node("n1", Some(tracing_with("n1", vec![mine], vec![])))], at(0));
        assert!(matches!(alone.actions[..], [Action::Delete { .. }]));
    }
}
