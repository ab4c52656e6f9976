//! `TracingPolicy`: one object that turns tracing on at the edge, in the workloads and in the network.
//!
//! Everything the API server can check is checked there: bounds on every string and list, enums, and
//! CEL rules whose messages name the field, so that bad input never reaches the controller.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::rules;

/// The lowest sampling rate (1 packet in N) the network layer accepts: denser sampling can flood a
/// flow collector and costs the datapath real CPU.
pub const SAMPLING_FLOOR: u32 = 64;

/// Desired cross-layer tracing for a cluster.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "crosstrace.dev",
    version = "v1alpha1",
    kind = "TracingPolicy",
    plural = "tracingpolicies",
    shortname = "tp",
    category = "crosstrace",
    status = "TracingPolicyStatus",
    doc = "TracingPolicy turns on tracing at the edge (ingress-nginx and Gateway API gateways), in workloads (OpenTelemetry sidecars) and in the network (Open vSwitch sFlow/IPFIX), rolled out in health-gated batches and reverted exactly on delete.",
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Ingress", type_ = "string", json_path = ".status.ingress.summary"),
    printcolumn(name = "Gateways", type_ = "string", json_path = ".status.gateway.summary"),
    printcolumn(name = "Workloads", type_ = "string", json_path = ".status.workloads.summary"),
    printcolumn(name = "Nodes", type_ = "string", json_path = ".status.nodes.summary"),
    printcolumn(name = "Sampling", type_ = "string", json_path = ".spec.sampling.ratio"),
    printcolumn(name = "Reason", type_ = "string", priority = 1, json_path = r#".status.conditions[?(@.type=="Ready")].reason"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63").message("metadata.name must be at most 63 characters (it is used as a label value)")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.ingress) || has(self.workloads) || has(self.network) || has(self.gateway)").message("at least one of spec.ingress, spec.workloads, spec.network, spec.gateway must be set"),
    validation = Rule::new("!(has(self.ingress) || has(self.workloads) || has(self.gateway)) || (has(self.collector) && size(self.collector.endpoint) > 0)").message("spec.collector.endpoint is required when spec.ingress, spec.workloads or spec.gateway is set"),
    validation = Rule::new("!has(self.ingress) || !has(self.collector) || self.collector.protocol == 'grpc'").message("spec.collector.protocol must be grpc when spec.ingress is set: ingress-nginx exports OTLP over gRPC only"),
    validation = Rule::new("!has(self.gateway) || !has(self.collector) || self.collector.protocol == 'grpc'").message("spec.collector.protocol must be grpc when spec.gateway is set: Envoy Gateway, NGINX Gateway Fabric and Istio export OTLP over gRPC")
)]
pub struct TracingPolicySpec {
    /// Where the edge and workload layers send OTLP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<CollectorSpec>,
    /// Head sampling for the edge and workload layers.
    #[serde(default)]
    pub sampling: SamplingSpec,
    /// Edge layer (ingress-nginx); absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,
    /// Gateway API edge layer (Envoy Gateway, NGINX Gateway Fabric, Istio gateways); absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,
    /// Workload layer (collector sidecars and OTEL_* env); absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<WorkloadsSpec>,
    /// Network layer (Open vSwitch sFlow/IPFIX on nodes); absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
    /// How changes are rolled out.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// A time-boxed debug session; absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<DebugSpec>,
}

/// A time-boxed debug session: until it ends, the edge and workload layers sample at `ratio` and the
/// network layer at the admin's floor (`adminLimits.minSampling`); then the policy's own values come
/// back exactly. It is rolled out and reverted like any other change (batches, health gates).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.until) != has(self.durationSeconds)").message("spec.debug needs exactly one of until and durationSeconds")
)]
pub struct DebugSpec {
    /// Sampling ratio of the edge and workload layers during the session, e.g. "1".
    #[serde(default = "default_ratio")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = rules::ratio())]
    pub ratio: String,
    /// When the session ends (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// How long the session lasts, counted from when the controller first saw it (kept in
    /// `status.debug.expiresAt`, so a restart does not extend it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 604800))]
    pub duration_seconds: Option<i32>,
}

/// An OTLP collector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CollectorSpec {
    /// `host:port` of the collector, e.g. `otel-gateway.observability.svc:4317`.
    #[schemars(length(max = rules::MAX_ENDPOINT))]
    #[x_kube(validation = rules::collector_endpoint())]
    pub endpoint: String,
    /// OTLP transport.
    #[serde(default)]
    pub protocol: OtlpProtocol,
}

/// OTLP transport.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP over gRPC (port 4317 by convention).
    #[default]
    Grpc,
    /// OTLP over HTTP/protobuf (port 4318 by convention).
    Http,
}

/// Head sampling.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SamplingSpec {
    /// Fraction of traces kept, a decimal string in [0, 1] such as "0.25" (Kubernetes APIs avoid floats).
    #[serde(default = "default_ratio")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = rules::ratio())]
    pub ratio: String,
    /// Follow the sampling decision of an incoming parent span.
    #[serde(default = "default_true")]
    pub parent_based: bool,
}

impl Default for SamplingSpec {
    fn default() -> Self {
        Self { ratio: default_ratio(), parent_based: true }
    }
}

fn default_ratio() -> String {
    "1".into()
}
fn default_true() -> bool {
    true
}

/// The edge layer: ingress-nginx controllers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// Namespace of the ingress-nginx controllers; empty = every namespace.
    #[serde(default)]
    #[schemars(length(max = 63))]
    #[x_kube(validation = rules::namespace_or_empty())]
    pub namespace: String,
    /// Labels of the controller Deployments; default
    /// `app.kubernetes.io/name=ingress-nginx,app.kubernetes.io/component=controller`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rules::optional_label_selector")]
    pub selector: Option<LabelSelector>,
    /// An instrumented controller image to roll out; empty = keep the current image.
    #[serde(default)]
    #[schemars(length(max = rules::MAX_IMAGE))]
    #[x_kube(validation = rules::image_reference_or_empty())]
    pub image: String,
    /// `otel-service-name` reported by the controller.
    #[serde(default = "default_ingress_service_name")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::service_name())]
    pub service_name: String,
}

fn default_ingress_service_name() -> String {
    "ingress-nginx".into()
}

/// The Gateway API edge layer: every selected `gateway.networking.k8s.io/v1` Gateway gets its
/// provider's tracing (the provider is its GatewayClass's `spec.controllerName`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Namespace of the Gateways; empty = every namespace.
    #[serde(default)]
    #[schemars(length(max = 63))]
    #[x_kube(validation = rules::namespace_or_empty())]
    pub namespace: String,
    /// Labels of the Gateways; absent = every Gateway in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rules::optional_label_selector")]
    pub selector: Option<LabelSelector>,
    /// The service name the gateways report their spans under.
    #[serde(default = "default_gateway_service_name")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::service_name())]
    pub service_name: String,
}

fn default_gateway_service_name() -> String {
    "gateway".into()
}

/// The workload layer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadsSpec {
    /// Namespaces whose workloads are instrumented (required). kube-system, kube-public,
    /// kube-node-lease and the operator's own namespace never match.
    #[schemars(schema_with = "rules::required_label_selector")]
    pub namespace_selector: LabelSelector,
    /// Workloads instrumented inside those namespaces; absent = all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rules::optional_label_selector")]
    pub selector: Option<LabelSelector>,
    /// Kinds of workload instrumented.
    #[serde(default = "default_kinds")]
    #[schemars(length(min = 1, max = 3))]
    #[x_kube(validation = Rule::new("self.all(k, self.exists_one(j, j == k))").message("must not repeat a kind"))]
    pub kinds: Vec<WorkloadKind>,
    /// The collector sidecar; empty fields take the operator's defaults.
    #[serde(default)]
    pub sidecar: SidecarSpec,
}

fn default_kinds() -> Vec<WorkloadKind> {
    vec![WorkloadKind::Deployment]
}

/// A kind of workload.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub enum WorkloadKind {
    #[default]
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// The OpenTelemetry Collector sidecar.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Collector image; empty = the operator's default.
    #[serde(default)]
    #[schemars(length(max = rules::MAX_IMAGE))]
    #[x_kube(validation = rules::image_reference_or_empty())]
    pub image: String,
    /// Resources of the sidecar; absent = the operator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rules::optional_resource_requirements")]
    pub resources: Option<ResourceRequirements>,
}

/// The network layer: Open vSwitch flow export on nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.sflow) || has(self.ipfix)").message("spec.network needs sflow or ipfix"),
    validation = Rule::new("!has(self.correlate) || !self.correlate || has(self.sflow)").message("spec.network.correlate needs spec.network.sflow: only sFlow carries the packet headers a traceparent is read from"),
    validation = Rule::new("!has(self.correlate) || !self.correlate || !has(self.sflow) || !has(self.sflow.agent) || self.sflow.agent == ''").message("spec.network.sflow.agent must be empty when spec.network.correlate is true: each node's own address becomes its sFlow agent address, which is how crosstrace flows names the node"),
    validation = Rule::new("!has(self.correlate) || !self.correlate || !has(self.sflow) || size(self.sflow.targets) <= 7").message("spec.network.sflow.targets: at most 7 when spec.network.correlate is true (the crosstrace flows receiver is added as the 8th)")
)]
pub struct NetworkSpec {
    /// Nodes whose OVS exports; empty = all nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rules::optional_label_selector")]
    pub node_selector: Option<LabelSelector>,
    /// The OVS bridge that exports.
    #[serde(default = "default_bridge")]
    #[schemars(length(min = 1, max = rules::MAX_OVS_NAME))]
    #[x_kube(validation = rules::ovs_bridge())]
    pub bridge: String,
    /// sFlow export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sflow: Option<SflowSpec>,
    /// IPFIX export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipfix: Option<IpfixSpec>,
    /// What to do when the bridge already exports somewhere else.
    #[serde(default)]
    pub conflict_policy: ConflictPolicy,
    /// Put the network hop into the traces: the controller adds the `crosstrace flows` receiver (its
    /// `--flows-receiver`) to the sFlow targets, raises the sampled header bytes to 512 (at most the
    /// admin limit maxHeaderBytes) so that a request line and its headers fit, and sets each node's own
    /// address as the sFlow agent address; a sampled plaintext HTTP/1.x request carrying a W3C
    /// `traceparent` then becomes a span of that trace. Needs `sflow` with an empty `agent`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub correlate: bool,
}

fn default_bridge() -> String {
    "br-int".into()
}

/// Flow collectors as `IPv4:port` or `[IPv6]:port`, validated by the API server.
pub type Targets = Vec<String>;

/// sFlow export settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SflowSpec {
    /// sFlow collectors, `IPv4:port` or `[IPv6]:port`.
    #[schemars(length(min = 1, max = 8), inner(length(max = rules::MAX_FLOW_TARGET)))]
    #[x_kube(validation = rules::flow_targets("10.0.0.5:6343"))]
    pub targets: Targets,
    /// Sample 1 packet in N (at least 64).
    #[serde(default = "default_sampling")]
    #[schemars(range(min = 64, max = 1_000_000))]
    pub sampling: u32,
    /// Counter polling interval in seconds (0 = off).
    #[serde(default = "default_polling")]
    #[schemars(range(min = 0, max = 3600))]
    pub polling: u32,
    /// Bytes of each sampled packet's header exported.
    #[serde(default = "default_header")]
    #[schemars(range(min = 18, max = 512))]
    pub header: u32,
    /// The sFlow agent address: an interface name or an IP address; empty = OVS's choice.
    #[serde(default)]
    #[schemars(length(max = rules::MAX_AGENT))]
    #[x_kube(validation = rules::sflow_agent())]
    pub agent: String,
}

/// IPFIX export settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IpfixSpec {
    /// IPFIX collectors, `IPv4:port` or `[IPv6]:port`.
    #[schemars(length(min = 1, max = 8), inner(length(max = rules::MAX_FLOW_TARGET)))]
    #[x_kube(validation = rules::flow_targets("10.0.0.5:4739"))]
    pub targets: Targets,
    /// Sample 1 packet in N (at least 64).
    #[serde(default = "default_sampling")]
    #[schemars(range(min = 64, max = 1_000_000))]
    pub sampling: u32,
    /// IPFIX observation domain id (32 bits on the wire).
    #[serde(default = "default_obs_domain")]
    #[schemars(range(min = 0, max = u32::MAX))]
    pub obs_domain_id: u32,
    /// Seconds a flow may stay in the cache before it is exported.
    #[serde(default = "default_cache_timeout")]
    #[schemars(range(min = 0, max = 4200))]
    pub cache_active_timeout: u32,
}

fn default_sampling() -> u32 {
    400
}
fn default_polling() -> u32 {
    30
}
fn default_header() -> u32 {
    128
}
fn default_obs_domain() -> u32 {
    1
}
fn default_cache_timeout() -> u32 {
    60
}

/// What to do with an exporter on the bridge that crosstrace does not own.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConflictPolicy {
    /// Leave it alone and report a conflict.
    #[default]
    Skip,
    /// Replace it, record it and restore it on revert.
    Override,
}

/// How changes roll out.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Targets (controllers, workloads, nodes) changing at once.
    #[serde(default = "default_max_concurrent")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrent: i32,
    /// Seconds a batch may take to become healthy before it fails.
    #[serde(default = "default_deadline")]
    #[schemars(range(min = 10, max = 86400))]
    pub progress_deadline_seconds: i32,
    /// Revert a failed batch and stop the rollout.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// Hold the rollout where it is.
    #[serde(default)]
    pub paused: bool,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_concurrent: default_max_concurrent(),
            progress_deadline_seconds: default_deadline(),
            auto_rollback: true,
            paused: false,
        }
    }
}

fn default_max_concurrent() -> i32 {
    5
}
fn default_deadline() -> i32 {
    600
}

/// What the operator observed and did.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TracingPolicyStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = super::MAX_GENERATION))]
    pub observed_generation: Option<i64>,
    /// Ready, IngressReady, GatewayReady, WorkloadsReady, NetworkReady, Progressing, Degraded.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,
    /// Edge layer counts; absent when the layer is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<LayerStatus>,
    /// Workload layer counts; absent when the layer is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<LayerStatus>,
    /// Network layer counts; absent when the layer is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LayerStatus>,
    /// Gateway API edge layer counts; absent when the layer is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<LayerStatus>,
    /// The debug session of `spec.debug`; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<DebugStatus>,
}

/// Where the debug session stands.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DebugStatus {
    /// Which `spec.debug` this is about (a hash of it): a changed session starts anew.
    #[schemars(length(max = 32))]
    pub session: String,
    /// When the session ends (or ended).
    pub expires_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// Sampling is raised now.
    pub active: bool,
}

/// Per-layer counts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LayerStatus {
    /// Targets the layer selects.
    #[schemars(range(min = 0, max = i32::MAX))]
    pub selected: i32,
    /// Targets instrumented and healthy.
    #[schemars(range(min = 0, max = i32::MAX))]
    pub ready: i32,
    /// Targets whose change was rolled back.
    #[serde(default)]
    #[schemars(range(min = 0, max = i32::MAX))]
    pub rolled_back: i32,
    /// `ready/selected`, for `kubectl get`.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub summary: String,
}

impl LayerStatus {
    pub fn new(selected: usize, ready: usize, rolled_back: usize) -> Self {
        let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
        Self {
            selected: n(selected),
            ready: n(ready),
            rolled_back: n(rolled_back),
            summary: format!("{ready}/{selected}"),
        }
    }
}
