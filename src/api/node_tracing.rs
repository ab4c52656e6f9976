//! `NodeTracing`: the Open vSwitch export one node must have, merged across policies by the controller
//! (spec), and what that node's agent made of it (status).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::policy::{ConflictPolicy, IpfixSpec, SflowSpec};

/// Desired OVS flow export on one node. Named after the node.
// clippy reads the repeated `type_` of the printcolumns as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "crosstrace.dev",
    version = "v1alpha1",
    kind = "NodeTracing",
    plural = "nodetracings",
    shortname = "nt",
    category = "crosstrace",
    status = "NodeTracingStatus",
    selectable = ".spec.nodeName",
    doc = "NodeTracing is the Open vSwitch flow export of one node: spec written by the crosstrace controller, status by that node's agent.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.nodeName == oldSelf.nodeName").message("spec.nodeName is immutable"))]
pub struct NodeTracingSpec {
    /// The node this object configures; equal to metadata.name.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// One export per bridge, already merged across policies (the oldest policy wins a bridge).
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new("self.all(b, self.exists_one(c, c.bridge == b.bridge))").message("spec.bridges must not repeat a bridge"))]
    pub bridges: Vec<BridgeExport>,
}

/// The export wanted on one OVS bridge.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BridgeExport {
    /// OVS bridge name.
    #[schemars(length(min = 1, max = super::rules::MAX_OVS_NAME))]
    #[x_kube(validation = super::rules::ovs_bridge())]
    pub bridge: String,
    /// The TracingPolicy that owns this export.
    #[schemars(length(min = 1, max = 63))]
    pub policy: String,
    /// That policy's generation.
    #[schemars(range(min = 0, max = super::MAX_GENERATION))]
    pub policy_generation: i64,
    /// sFlow export, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sflow: Option<SflowSpec>,
    /// IPFIX export, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipfix: Option<IpfixSpec>,
    /// What to do with an exporter crosstrace does not own.
    #[serde(default)]
    pub conflict_policy: ConflictPolicy,
    /// When the controller asked for this export (the start of the node's progress deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<Time>,
    /// The controller saw the agent apply and verify this export once: from then on a failure on the
    /// node (a bridge removed, vswitchd restarting) is reported, never rolled back. Earlier controllers
    /// wrote it (a second write of the spec); the agent now says so in `status.bridges[].convergedRequest`,
    /// and the controller writes it only for an agent that does not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub converged: bool,
}

impl BridgeExport {
    /// Names this request for an export: its content and when it was asked (not whether it converged).
    /// A request written again (a new `requestedAt`, a new generation, another export) has another id.
    pub fn request_id(&self) -> String {
        let bare = BridgeExport { converged: false, ..self.clone() };
        crate::layers::hash_of(&serde_json::to_value(&bare).expect("an export serializes"))
    }
}

/// What the agent did on its node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeTracingStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = super::MAX_GENERATION))]
    pub observed_generation: Option<i64>,
    /// Ready (every bridge applied and verified), Degraded (conflict or error).
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,
    /// One entry per bridge of the spec.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub bridges: Vec<BridgeStatus>,
    /// Open vSwitch version the agent talks to.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub ovs_version: String,
}

/// The state of one bridge's export.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BridgeStatus {
    /// OVS bridge name.
    #[schemars(length(max = 15))]
    pub bridge: String,
    /// The policy whose export this is.
    #[schemars(length(max = 63))]
    pub policy: String,
    /// The policy generation last applied.
    #[serde(default)]
    #[schemars(range(min = 0, max = super::MAX_GENERATION))]
    pub applied_generation: i64,
    /// The rows are in OVSDB and vswitchd took them.
    pub applied: bool,
    /// `ofproto/trace` shows the sampling actions in the datapath.
    pub verified: bool,
    /// The bridge exports somewhere crosstrace does not own, and conflictPolicy is Skip.
    pub conflict: bool,
    /// Why the export is not applied or verified.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub message: String,
    /// The request (`spec.bridges[]`, named by its id) that this agent found applied and verified at
    /// least once, kept while the spec asks for that same request. The controller takes it as the
    /// export's convergence: from then on a failure on the node is reported, never rolled back.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 16))]
    pub converged_request: String,
}
