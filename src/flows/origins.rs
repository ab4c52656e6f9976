//! Which node and bridge an sFlow datagram comes from.
//!
//! A datagram names its sFlow agent by address. With `spec.network.correlate` the controller writes
//! each selected node's own address (its first InternalIP, else ExternalIP) as the `agent` of that
//! node's sFlow export in its `NodeTracing`, and the agent sets it in OVS. The receiver watches the
//! `NodeTracing` objects and maps each agent address to its node, and to the bridge when only one
//! bridge of that node exports sFlow with it. OVS numbers the bridges of one ovs-vswitchd by a
//! sub-agent id that no configuration names, so with two such bridges on a node the bridge is not
//! known (the span says so by leaving `crosstrace.bridge` out). An address that no node claims, or
//! that two nodes claim, maps to nothing: its datagrams are dropped (`reason="unknown_agent"`), so
//! that whoever can send UDP to the receiver cannot add spans for a node that does not exist.
//!
//! The datagram's UDP source address is not used: behind a Service, SNAT or a tunnel it is not the
//! node's, and on the e2e machine every node sends from 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::api::NodeTracing;
use crate::api::node_tracing::BridgeExport;

/// The node (and bridge) a datagram comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub node: String,
    pub bridge: Option<String>,
}

impl Origin {
    /// The span name: "sampled on node N, bridge B".
    pub fn span_name(&self) -> String {
        match &self.bridge {
            Some(bridge) => format!("sampled on node {}, bridge {bridge}", self.node),
            None => format!("sampled on node {}", self.node),
        }
    }
}

/// The sFlow exports that name an agent address (what `spec.network.correlate` writes), of every
/// `NodeTracing` not being deleted: its node, the export, the address.
fn correlating<'a>(
    tracings: impl IntoIterator<Item = &'a NodeTracing>,
) -> impl Iterator<Item = (&'a str, &'a BridgeExport, IpAddr)> {
    tracings.into_iter().filter(|t| t.metadata.deletion_timestamp.is_none()).flat_map(|t| {
        t.spec.bridges.iter().filter_map(move |export| {
            let agent = export.sflow.as_ref()?.agent.parse::<IpAddr>().ok()?;
            Some((t.spec.node_name.as_str(), export, agent))
        })
    })
}

/// Agent address → origin, from every readable `NodeTracing`.
pub fn origins<'a>(tracings: impl IntoIterator<Item = &'a NodeTracing>) -> HashMap<IpAddr, Origin> {
    let mut claims: BTreeMap<IpAddr, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for (node, export, agent) in correlating(tracings) {
        claims.entry(agent).or_default().entry(node).or_default().insert(export.bridge.as_str());
    }
    claims
        .into_iter()
        .filter(|(_, nodes)| nodes.len() == 1)
        .filter_map(|(agent, nodes)| {
            let (node, bridges) = nodes.into_iter().next()?;
            let bridge = (bridges.len() == 1).then(|| bridges.into_iter().next().map(String::from)).flatten();
            Some((agent, Origin { node: node.to_string(), bridge }))
        })
        .collect()
}

/// Per node, the policies whose sFlow export there names an agent address (i.e. correlates).
pub fn policies_by_node<'a>(tracings: impl IntoIterator<Item = &'a NodeTracing>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (node, export, _) in correlating(tracings) {
        out.entry(node.to_string()).or_default().insert(export.policy.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NodeTracingSpec, SflowSpec};

    fn tracing(node: &str, bridges: &[(&str, &str)]) -> NodeTracing {
        let bridges = bridges
            .iter()
            .map(|(bridge, agent)| BridgeExport {
                bridge: (*bridge).into(),
                sflow: Some(SflowSpec {
                    targets: vec!["127.0.0.1:6343".into()],
                    sampling: 64,
                    polling: 0,
                    header: 512,
                    agent: (*agent).into(),
                }),
                ..Default::default()
            })
            .collect();
        NodeTracing::new(node, NodeTracingSpec { node_name: node.into(), bridges })
    }

    #[test]
    fn an_agent_address_names_its_node_and_its_only_bridge() {
        let all = [
            tracing("n0", &[("br-int", "127.0.1.1")]),
            tracing("n1", &[("br-int", "10.0.0.2"), ("br-ex", "10.0.0.2")]),
            tracing("n2", &[("br-int", "")]),
            tracing("n3", &[("br-int", "eth0")]),
        ];
        let map = origins(&all);
        let at = |ip: &str| map.get(&ip.parse::<IpAddr>().unwrap()).cloned();
        assert_eq!(at("127.0.1.1"), Some(Origin { node: "n0".into(), bridge: Some("br-int".into()) }));
        assert_eq!(at("10.0.0.2"), Some(Origin { node: "n1".into(), bridge: None }), "two bridges: not known");
        assert_eq!(map.len(), 2, "no address, or an interface name, names nothing: {map:?}");
    }

    #[test]
    fn a_node_names_the_policies_that_correlate_there() {
        let mut all = vec![tracing("n0", &[("br-int", "127.0.1.1"), ("br-ex", "")]), tracing("n1", &[("br-int", "")])];
        all[0].spec.bridges[0].policy = "p".into();
        all[0].spec.bridges[1].policy = "q".into();
        let by_node = policies_by_node(&all);
        assert_eq!(by_node, BTreeMap::from([("n0".to_string(), BTreeSet::from(["p".to_string()]))]));
    }

    #[test]
    fn an_address_two_nodes_claim_names_neither() {
        let all = [tracing("n0", &[("br-int", "10.0.0.9")]), tracing("n1", &[("br-int", "10.0.0.9")])];
        assert!(origins(&all).is_empty());
    }
}
