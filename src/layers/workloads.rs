//! The workload layer: an OpenTelemetry Collector sidecar and `OTEL_*` env in selected Deployments,
//! StatefulSets and DaemonSets, rolled out in health-gated batches.
//!
//! Everything is injected with one server-side apply under the `crosstrace` field manager, so the
//! operator owns exactly the fields it added. Reverting is the same apply with those fields left out:
//! the API server removes what only `crosstrace` owned — the user's own containers, sidecars and env
//! stay as they were, byte for byte.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::{StreamExt, TryFutureExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, PodTemplateSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::rollout::{self, Health, Written};
use super::{
    LayerReport, ObjectKey, PolicyView, Progress, TargetPlan, health, label_equals, matches, normalize_ratio, reasons,
    schedule, selector,
};
use crate::api::{OtlpProtocol, TracingPolicySpec, WorkloadKind, WorkloadsSpec};
use crate::lean::{Lean, Meta};

/// Annotation on an instrumented workload: the [`Record`] of what was injected.
pub const RECORD_ANNOTATION: &str = "crosstrace.dev/workloads";
/// Annotation on the injected pod template (and so on every pod of crosstrace's revision): the
/// injection's hash. It tells crosstrace's pods from the owner's, for the health gate.
pub const INJECTION_ANNOTATION: &str = "crosstrace.dev/injection";
/// Annotation left after a rollback, `<policy>/<generation>`: that generation is not retried.
pub const ROLLED_BACK_ANNOTATION: &str = "crosstrace.dev/workloads-rolled-back";
/// Label on an instrumented workload once its injection was seen rolled out and healthy, valued with the
/// injection's hash: from then on the workload's health is its owner's business (reported, never rolled
/// back). A label, not part of the record: a Deployment's annotations bump its generation (they are
/// copied to its ReplicaSets), which would look like a new rollout; its labels do not.
pub const CONVERGED_LABEL: &str = "crosstrace.dev/workloads-converged";
/// Label on every workload and collector ConfigMap of the layer, valued with the policy name.
pub const POLICY_LABEL: &str = "crosstrace.dev/workloads-policy";
/// Name of the injected collector container.
pub const SIDECAR_NAME: &str = "crosstrace-otel-collector";
/// Name of the injected volume holding the collector configuration.
pub const CONFIG_VOLUME: &str = "crosstrace-otel-config";
/// Namespaces never instrumented, whatever the selectors say.
pub const PROTECTED_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// What the operator's configuration provides when the policy leaves it open.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub sidecar_image: String,
    pub sidecar_resources: ResourceRequirements,
    /// The API server runs native sidecars (init containers with `restartPolicy: Always`, 1.29+).
    pub native_sidecars: bool,
    /// The operator's own namespace (never instrumented).
    pub operator_namespace: String,
    /// Namespaces the admin protects beyond the built-in ones (`adminLimits.protectedNamespaces`).
    pub protected_namespaces: Vec<String>,
}

impl Defaults {
    /// No layer touches this namespace: a built-in one, the operator's own, or one the admin protects.
    pub fn protects(&self, namespace: &str) -> bool {
        PROTECTED_NAMESPACES.contains(&namespace)
            || namespace == self.operator_namespace
            || self.protected_namespaces.iter().any(|p| p == namespace)
    }
}

/// What was injected into one workload, recorded with the injection itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub policy: String,
    pub generation: i64,
    /// Hash of the injection: a different one means the policy changed what is injected.
    pub hash: String,
    /// Env names injected per app container (env the user set is never among them).
    pub env: BTreeMap<String, Vec<String>>,
    /// Unix seconds when this injection started rolling out, for the progress deadline.
    pub rollout_started: i64,
}

/// One workload, reduced to what the layer needs (its pod template and how its rollout stands).
#[derive(Clone, Debug, Default)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub metadata: ObjectMeta,
    pub template: Template,
    pub rolled_out: bool,
    /// The pods' selector (to find the pods of crosstrace's revision).
    pub selector: Option<LabelSelector>,
    /// The owner paused the Deployment.
    pub paused: bool,
    /// Unix seconds when the owner resumed the paused Deployment (its Progressing condition says so).
    pub resumed_at: Option<i64>,
    /// `updateStrategy: OnDelete`: a new template reaches the pods only when they are recreated.
    pub on_delete: bool,
    /// Why a pod of crosstrace's revision cannot start (filled in by [`observe`] for rollouts in flight).
    pub failing: Option<String>,
    /// Pods of its current template may exist: its controller took in the current generation and counts
    /// some ([`health::deployment_revision_started`]). Only then are its pods listed for failures.
    pub revision_started: bool,
    /// At least one pod is available (for the edge layer: a controller that serves).
    pub available: bool,
}

/// A workload's pod template: whole, as read from the API server (the edge layer reads its containers'
/// arguments), or the [`Names`] a store keeps, shared with the store (a reconcile of a thousand targets
/// held a rebuilt template of each, most of its memory: issue 13).
#[derive(Clone, Debug)]
pub enum Template {
    /// Boxed: a Workload is moved around in big numbers, and a pod template is most of its size.
    Full(Box<PodTemplateSpec>),
    Names(Arc<Names>),
}

impl Default for Template {
    fn default() -> Self {
        Template::Names(Arc::default())
    }
}

impl Template {
    /// What the workload layer reads of the template.
    pub fn names(&self) -> std::borrow::Cow<'_, Names> {
        match self {
            Template::Full(template) => std::borrow::Cow::Owned(Names::of(template)),
            Template::Names(names) => std::borrow::Cow::Borrowed(names),
        }
    }

    /// The names, shared: those a store keeps are not copied.
    fn shared_names(&self) -> Arc<Names> {
        match self {
            Template::Full(template) => Arc::new(Names::of(template)),
            Template::Names(names) => Arc::clone(names),
        }
    }

    /// The whole template, when it was read whole.
    pub fn full(&self) -> Option<&PodTemplateSpec> {
        match self {
            Template::Full(template) => Some(template),
            Template::Names(_) => None,
        }
    }

    /// The whole template, to change (tests and simulations of an owner's edit).
    pub fn full_mut(&mut self) -> Option<&mut PodTemplateSpec> {
        match self {
            Template::Full(template) => Some(template),
            Template::Names(_) => None,
        }
    }
}

impl Workload {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::of(&self.metadata)
    }

    pub fn from_deployment(d: Deployment) -> Self {
        let rolled_out = health::deployment_rolled_out(&d);
        let resumed_at = health::deployment_resumed_at(&d);
        let paused = health::deployment_paused(&d);
        let revision_started = health::deployment_revision_started(&d);
        let available = d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0) > 0;
        let spec = d.spec.unwrap_or_default();
        Self {
            kind: WorkloadKind::Deployment,
            template: Template::Full(Box::new(spec.template)),
            metadata: d.metadata,
            rolled_out,
            selector: Some(spec.selector),
            paused,
            resumed_at,
            available,
            revision_started,
            ..Default::default()
        }
    }

    pub fn from_statefulset(s: StatefulSet) -> Self {
        let rolled_out = health::statefulset_rolled_out(&s);
        let on_delete = health::statefulset_on_delete(&s);
        let revision_started = health::statefulset_revision_started(&s);
        let available = s.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0) > 0;
        let spec = s.spec.unwrap_or_default();
        Self {
            kind: WorkloadKind::StatefulSet,
            template: Template::Full(Box::new(spec.template)),
            metadata: s.metadata,
            rolled_out,
            selector: Some(spec.selector),
            on_delete,
            available,
            revision_started,
            ..Default::default()
        }
    }

    pub fn from_daemonset(d: DaemonSet) -> Self {
        let rolled_out = health::daemonset_rolled_out(&d);
        let available = d.status.as_ref().and_then(|s| s.number_available).unwrap_or(0) > 0;
        let revision_started = health::daemonset_revision_started(&d);
        let spec = d.spec.unwrap_or_default();
        let on_delete = spec.update_strategy.as_ref().and_then(|u| u.type_.as_deref()) == Some("OnDelete");
        Self {
            kind: WorkloadKind::DaemonSet,
            template: Template::Full(Box::new(spec.template)),
            metadata: d.metadata,
            rolled_out,
            selector: Some(spec.selector),
            on_delete,
            available,
            revision_started,
            ..Default::default()
        }
    }

    /// What the layer needs of this workload beyond its metadata, for a store.
    pub fn shape(&self) -> Shape {
        Shape {
            names: self.template.shared_names(),
            selector: self.selector.clone(),
            rolled_out: self.rolled_out,
            paused: self.paused,
            resumed_at: self.resumed_at,
            on_delete: self.on_delete,
            available: self.available,
            revision_started: self.revision_started,
        }
    }

    /// The workload as a store keeps it: its pruned metadata and its template's [`Names`] (all the
    /// workload layer reads; a listed or read workload is kept so while a reconcile holds it).
    pub fn pruned(self) -> Self {
        Self::from_shape(self.kind, pruned_metadata(&self.metadata), &self.shape())
    }

    /// The workload a store holds: its pruned metadata and [`Shape`], whose template names it shares.
    pub fn from_shape(kind: WorkloadKind, metadata: ObjectMeta, shape: &Shape) -> Self {
        Self {
            kind,
            metadata,
            template: Template::Names(Arc::clone(&shape.names)),
            rolled_out: shape.rolled_out,
            selector: shape.selector.clone(),
            paused: shape.paused,
            resumed_at: shape.resumed_at,
            on_delete: shape.on_delete,
            failing: None,
            available: shape.available,
            revision_started: shape.revision_started,
        }
    }

    /// How the workload's rollout of crosstrace's `change` (e.g. "the collector sidecar") looks to the
    /// engine.
    pub fn health(&self, change: &str) -> Health {
        if self.rolled_out {
            Health::Healthy
        } else if let Some(why) = &self.failing {
            Health::Failing(why.clone())
        } else if self.paused {
            Health::Waiting {
                reason: reasons::DEPLOYMENT_PAUSED,
                message: format!("its owner paused it; {change} rolls out when it is resumed"),
            }
        } else if self.on_delete {
            Health::Waiting {
                reason: reasons::WAITING_FOR_RESTART,
                message: format!("updateStrategy OnDelete: {change} reaches its pods when they are recreated"),
            }
        } else {
            Health::Progressing { resumed_at: self.resumed_at }
        }
    }
}

/// What the workload layer reads of a workload besides its metadata, small enough to keep for every
/// workload a policy may select: the names in its pod template ([`Names`]) and how its rollout stands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shape {
    pub names: Arc<Names>,
    pub selector: Option<LabelSelector>,
    pub rolled_out: bool,
    pub paused: bool,
    pub resumed_at: Option<i64>,
    pub on_delete: bool,
    pub available: bool,
    pub revision_started: bool,
}

/// The names in a pod template the workload layer reads: containers with their env names, init
/// containers, volumes, and the template's injection annotation. Env values, images and everything else
/// are left out (the injection is a server-side apply of crosstrace's own fields: it never needs them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Names {
    pub injection: Option<String>,
    pub containers: Vec<(String, Vec<String>)>,
    pub init_containers: Vec<String>,
    pub volumes: Vec<String>,
}

impl Names {
    pub fn of(template: &PodTemplateSpec) -> Self {
        let pod = template.spec.as_ref();
        Names {
            injection: template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(INJECTION_ANNOTATION))
                .cloned(),
            containers: pod
                .into_iter()
                .flat_map(|p| &p.containers)
                .map(|c| (c.name.clone(), c.env.iter().flatten().map(|e| e.name.clone()).collect()))
                .collect(),
            init_containers: pod
                .and_then(|p| p.init_containers.as_ref())
                .into_iter()
                .flatten()
                .map(|c| c.name.clone())
                .collect(),
            volumes: pod.and_then(|p| p.volumes.as_ref()).into_iter().flatten().map(|v| v.name.clone()).collect(),
        }
    }

    /// The env names of container `name`, if the template has it.
    fn env_of(&self, name: &str) -> Option<&[String]> {
        self.containers.iter().find(|(c, _)| c == name).map(|(_, env)| env.as_slice())
    }
}

/// The metadata a store keeps of a workload: identity, generation, labels (selection) and crosstrace's
/// own annotations (records and markers); the user's annotations (often a whole
/// `last-applied-configuration`) are left out.
pub fn pruned_metadata(meta: &ObjectMeta) -> ObjectMeta {
    let ours: BTreeMap<String, String> = meta
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(crate::api::ANNOTATION_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        generation: meta.generation,
        labels: meta.labels.clone(),
        annotations: (!ours.is_empty()).then_some(ours),
        ..Default::default()
    }
}

/// Does this workload carry something of the workload layer (a policy's label, record or marker)? A
/// store keeps the [`Shape`] of those whatever the policies select now.
pub fn carries_layer(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(POLICY_LABEL))
        || meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(RECORD_ANNOTATION) || a.contains_key(ROLLED_BACK_ANNOTATION))
}

/// One workload as observed for a policy.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Shared with the plan's injections, each built from it when its write starts.
    pub workload: Arc<Workload>,
    /// Matches the policy's `spec.workloads` selection now.
    pub selected: bool,
    /// An older policy that also selects this workload and therefore keeps it.
    pub claimed_by: Option<String>,
    /// A write of this policy's to it is in flight, left going by an earlier reconcile whose write
    /// budget ended: what it leaves is not known yet.
    pub writing: bool,
}

/// One change of the workload layer.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Server-side apply the collector configuration ConfigMap of a namespace.
    ApplyCollectorConfig {
        namespace: String,
        name: String,
        data: BTreeMap<String, String>,
        policy: String,
        policy_uid: String,
    },
    /// Server-side apply the whole injection (sidecar, volume, env, record) into a workload.
    Inject { kind: WorkloadKind, workload: ObjectKey, patch: Value },
    /// Server-side apply without the injection: the API server removes exactly what was injected.
    /// `rolled_back` leaves the no-retry marker instead of nothing.
    Remove { kind: WorkloadKind, workload: ObjectKey, rolled_back: Option<String> },
    /// Delete a namespace's collector ConfigMap once nothing uses it.
    DeleteCollectorConfig { namespace: String, name: String },
}

/// The plan of the workload layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub report: LayerReport,
    /// Workloads whose injection had been removed by someone else and is applied again.
    pub drifted: Vec<ObjectKey>,
}

/// Name of the collector ConfigMap a policy puts in each namespace.
pub fn config_map_name(policy: &str) -> String {
    format!("crosstrace-otel-{policy}")
}

fn kind_key(kind: WorkloadKind) -> &'static str {
    match kind {
        WorkloadKind::Deployment => "deployment",
        WorkloadKind::StatefulSet => "statefulset",
        WorkloadKind::DaemonSet => "daemonset",
    }
}

/// The collector configuration, one file per workload kind so that the resource attribute follows
/// the semantic conventions (`k8s.deployment.name`, ...). Pod, namespace and node come from the
/// downward API through the sidecar's env.
///
/// Written for the collector release of [`crate::controller::DEFAULT_SIDECAR_IMAGE`]: the OTLP
/// exporters under their current names (`otlp_grpc`, `otlp_http`), batching in the exporter's sending
/// queue instead of the retired batch processor. `tests/collector_config.rs` runs every variant through
/// that release's `otelcol-k8s validate`.
pub fn collector_config(spec: &TracingPolicySpec) -> BTreeMap<String, String> {
    let collector = spec.collector.clone().unwrap_or_default();
    // The batch processor's former settings (512 spans or 5 s, whichever comes first), now with an upper
    // bound so that a burst leaves as several requests of a sane size.
    let sending_queue = json!({"batch": {"sizer": "items", "min_size": 512, "max_size": 2048, "flush_timeout": "5s"}});
    let (exporter, exporter_config) = match collector.protocol {
        OtlpProtocol::Grpc => (
            "otlp_grpc",
            json!({"endpoint": collector.endpoint, "tls": {"insecure": true}, "sending_queue": sending_queue}),
        ),
        OtlpProtocol::Http => {
            ("otlp_http", json!({"endpoint": format!("http://{}", collector.endpoint), "sending_queue": sending_queue}))
        }
    };
    [WorkloadKind::Deployment, WorkloadKind::StatefulSet, WorkloadKind::DaemonSet]
        .into_iter()
        .map(|kind| {
            let attribute =
                |key: &str, env: &str| json!({"key": key, "value": format!("${{env:{env}}}"), "action": "upsert"});
            let config = json!({
                "extensions": {"health_check": {"endpoint": "0.0.0.0:13133"}},
                "receivers": {"otlp": {"protocols": {
                    "grpc": {"endpoint": "localhost:4317"},
                    "http": {"endpoint": "localhost:4318"},
                }}},
                "processors": {
                    "memory_limiter": {"check_interval": "1s", "limit_percentage": 80, "spike_limit_percentage": 25},
                    "resource": {"attributes": [
                        attribute("k8s.namespace.name", "K8S_NAMESPACE_NAME"),
                        attribute("k8s.pod.name", "K8S_POD_NAME"),
                        attribute("k8s.node.name", "K8S_NODE_NAME"),
                        attribute(&format!("k8s.{}.name", kind_key(kind)), "K8S_WORKLOAD_NAME"),
                    ]},
                },
                "exporters": {exporter: exporter_config},
                "service": {
                    "extensions": ["health_check"],
                    "pipelines": {"traces": {
                        "receivers": ["otlp"],
                        "processors": ["memory_limiter", "resource"],
                        "exporters": [exporter],
                    }},
                },
            });
            (format!("{}.yaml", kind_key(kind)), serde_yaml::to_string(&config).expect("collector config serializes"))
        })
        .collect()
}

/// `OTEL_*` env for an app container of `workload`, in a stable order.
pub fn otel_env(spec: &TracingPolicySpec, kind: WorkloadKind, workload: &ObjectKey) -> Vec<(String, String)> {
    let protocol = spec.collector.as_ref().map(|c| c.protocol).unwrap_or_default();
    let (endpoint, protocol) = match protocol {
        OtlpProtocol::Grpc => ("http://localhost:4317", "grpc"),
        OtlpProtocol::Http => ("http://localhost:4318", "http/protobuf"),
    };
    let ratio = normalize_ratio(&spec.sampling.ratio);
    let parent = if spec.sampling.parent_based { "parentbased_" } else { "" };
    let (sampler, arg) = match ratio.as_str() {
        "1" => (format!("{parent}always_on"), None),
        "0" => (format!("{parent}always_off"), None),
        _ => (format!("{parent}traceidratio"), Some(ratio.clone())),
    };
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), endpoint.to_string()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".to_string(), protocol.to_string()),
        ("OTEL_SERVICE_NAME".to_string(), workload.name.clone()),
        ("OTEL_TRACES_SAMPLER".to_string(), sampler),
    ];
    if let Some(arg) = arg {
        env.push(("OTEL_TRACES_SAMPLER_ARG".to_string(), arg));
    }
    env.push((
        "OTEL_RESOURCE_ATTRIBUTES".to_string(),
        format!("k8s.namespace.name={},k8s.{}.name={}", workload.namespace, kind_key(kind), workload.name),
    ));
    env
}

fn sidecar(spec: &WorkloadsSpec, defaults: &Defaults, kind: WorkloadKind, workload: &ObjectKey) -> Value {
    let image = if spec.sidecar.image.is_empty() { &defaults.sidecar_image } else { &spec.sidecar.image };
    let resources = spec.sidecar.resources.clone().unwrap_or_else(|| defaults.sidecar_resources.clone());
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let probe = json!({"httpGet": {"path": "/", "port": 13133}, "periodSeconds": 10, "failureThreshold": 3});
    let mut container = json!({
        "name": SIDECAR_NAME,
        "image": image,
        "args": [format!("--config=/etc/crosstrace-otel/{}.yaml", kind_key(kind))],
        "env": [
            {"name": "K8S_POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "K8S_NAMESPACE_NAME", "valueFrom": field("metadata.namespace")},
            {"name": "K8S_NODE_NAME", "valueFrom": field("spec.nodeName")},
            {"name": "K8S_WORKLOAD_NAME", "value": workload.name},
        ],
        "ports": [
            {"name": "otlp-grpc", "containerPort": 4317, "protocol": "TCP"},
            {"name": "otlp-http", "containerPort": 4318, "protocol": "TCP"},
        ],
        "resources": resources,
        "startupProbe": {"httpGet": {"path": "/", "port": 13133}, "periodSeconds": 2, "failureThreshold": 30},
        "livenessProbe": probe,
        "readinessProbe": probe,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 10001,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": "/etc/crosstrace-otel", "readOnly": true}],
    });
    if defaults.native_sidecars {
        container["restartPolicy"] = json!("Always");
    }
    container
}

fn api_version_kind(kind: WorkloadKind) -> (&'static str, &'static str) {
    match kind {
        WorkloadKind::Deployment => ("apps/v1", "Deployment"),
        WorkloadKind::StatefulSet => ("apps/v1", "StatefulSet"),
        WorkloadKind::DaemonSet => ("apps/v1", "DaemonSet"),
    }
}

/// The apply configuration that removes the injection: only what should remain owned by the
/// operator (nothing, or the rollback marker).
pub fn removal_patch(kind: WorkloadKind, workload: &ObjectKey, rolled_back: Option<&str>) -> Value {
    let (api_version, kind) = api_version_kind(kind);
    let mut patch = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": workload.name, "namespace": workload.namespace}});
    if let Some(marker) = rolled_back {
        // The label stays with the marker so that deleting the policy finds the workload and clears it.
        let policy = marker.split_once('/').map_or(marker, |(policy, _)| policy);
        patch["metadata"]["annotations"] = json!({ROLLED_BACK_ANNOTATION: marker});
        patch["metadata"]["labels"] = json!({POLICY_LABEL: policy});
    }
    patch
}

fn record_json(record: &Record) -> String {
    serde_json::to_string(record).expect("a record always serializes")
}

/// Was this injection (the record's) seen rolled out and healthy? Its hash is on the convergence label.
fn converged(meta: &ObjectMeta, record: &Record) -> bool {
    meta.labels.as_ref().and_then(|l| l.get(CONVERGED_LABEL)) == Some(&record.hash)
}

fn record_of(meta: &ObjectMeta) -> Result<Option<Record>, String> {
    super::read_record(meta.annotations.as_ref(), RECORD_ANNOTATION)
}

impl super::Owned for Record {
    fn policy(&self) -> &str {
        &self.policy
    }
}

/// The injection for one workload: the apply configuration and the env names it adds per container.
/// Env a container already has (and that the operator did not inject before) is left alone.
fn injection(
    policy: PolicyView<'_>,
    defaults: &Defaults,
    w: &Workload,
    previous: Option<&Record>,
    since: i64,
) -> (Value, Record) {
    let spec = policy.spec;
    let workloads = spec.workloads.as_ref().expect("injection is only planned with spec.workloads");
    let kind = w.kind;
    let key = w.key();
    let names = w.template.names();
    let desired_env = otel_env(spec, kind, &key);
    let mut injected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let containers: Vec<Value> = names
        .containers
        .iter()
        .filter(|(name, _)| name != SIDECAR_NAME)
        .map(|(name, env)| {
            let ours: BTreeSet<&str> =
                previous.and_then(|r| r.env.get(name)).into_iter().flatten().map(String::as_str).collect();
            let users: BTreeSet<&str> = env.iter().map(String::as_str).filter(|n| !ours.contains(n)).collect();
            let env: Vec<Value> = desired_env
                .iter()
                .filter(|(name, _)| !users.contains(name.as_str()))
                .map(|(name, value)| json!({"name": name, "value": value}))
                .collect();
            injected
                .insert(name.clone(), env.iter().map(|e| e["name"].as_str().unwrap_or_default().to_string()).collect());
            json!({"name": name, "env": env})
        })
        .collect();
    let sidecar = sidecar(workloads, defaults, kind, &key);
    let mut pod_spec = json!({
        "containers": containers,
        "volumes": [{"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(policy.name)}}],
    });
    if defaults.native_sidecars {
        pod_spec["initContainers"] = json!([sidecar]);
    } else {
        pod_spec["containers"].as_array_mut().expect("containers is a list").push(sidecar);
    }
    let hash = super::hash_of(&pod_spec);
    let record = Record {
        policy: policy.name.to_string(),
        generation: policy.generation,
        hash,
        env: injected,
        rollout_started: since,
    };
    let (api_version, kind_name) = api_version_kind(kind);
    let patch = json!({
        "apiVersion": api_version,
        "kind": kind_name,
        "metadata": {
            "name": key.name,
            "namespace": key.namespace,
            "labels": {POLICY_LABEL: policy.name},
            "annotations": {RECORD_ANNOTATION: record_json(&record)},
        },
        "spec": {"template": {
            "metadata": {"annotations": {INJECTION_ANNOTATION: record.hash}},
            "spec": pod_spec,
        }},
    });
    (patch, record)
}

/// Is everything the record says was injected still in the pod template?
fn injection_present(w: &Workload, record: &Record, native: bool) -> bool {
    let pod = w.template.names();
    let has_sidecar = if native {
        pod.init_containers.iter().any(|c| c == SIDECAR_NAME)
    } else {
        pod.containers.iter().any(|(c, _)| c == SIDECAR_NAME)
    };
    let has_volume = pod.volumes.iter().any(|v| v == CONFIG_VOLUME);
    let has_env = record
        .env
        .iter()
        .all(|(container, names)| pod.env_of(container).is_none_or(|env| names.iter().all(|n| env.contains(n))));
    let has_annotation = pod.injection.as_ref() == Some(&record.hash);
    has_sidecar && has_volume && has_env && has_annotation
}

/// The hash of each target's desired injection, as a policy's last plan computed it. It is taken again
/// while neither the workload (its resourceVersion) nor the policy (its name, generation and effective
/// spec) nor the operator's defaults changed: a reconcile builds the injections of the targets it writes and of those that changed,
/// not of every target it looks at (issue 13: a big rollout's reconciles were O(targets) JSON each).
#[derive(Default)]
pub struct Hashes {
    by_policy: std::sync::Mutex<HashMap<String, PolicyHashes>>,
}

#[derive(Default)]
struct PolicyHashes {
    /// What the hashes were computed for: the policy's name, generation and spec, hashed.
    policy: String,
    /// By target: its resourceVersion then, and the hash.
    targets: HashMap<(ObjectKey, WorkloadKind), (String, String)>,
}

impl Hashes {
    /// How many targets' hashes are remembered (all policies).
    pub fn len(&self) -> usize {
        self.lock().values().map(|p| p.targets.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PolicyHashes>> {
        self.by_policy.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Plans the workload layer: pure, from the policy, the observed workloads and the time.
pub fn plan(
    policy: PolicyView<'_>,
    defaults: &Defaults,
    observed: &[Observed],
    config_maps: &[ConfigMap],
    now: i64,
) -> Plan {
    plan_with(policy, defaults, observed, config_maps, now, &Hashes::default())
}

/// [`plan`], taking the injection hashes of unchanged targets from `hashes` (and leaving there those
/// of this plan's targets, only those).
pub fn plan_with(
    policy: PolicyView<'_>,
    defaults: &Defaults,
    observed: &[Observed],
    config_maps: &[ConfigMap],
    now: i64,
    hashes: &Hashes,
) -> Plan {
    plan_lazily(policy, defaults, observed, config_maps, now, hashes).built()
}

/// [`plan_with`], with each injection built only when it is written ([`Lazy::action`]): a write
/// budget that ends a reconcile after a few hundred writes leaves the rest of a big batch unbuilt.
pub fn plan_lazily(
    policy: PolicyView<'_>,
    defaults: &Defaults,
    observed: &[Observed],
    config_maps: &[ConfigMap],
    now: i64,
    hashes: &Hashes,
) -> LazyPlan {
    let fingerprint = super::hash_of(&json!({
        "name": policy.name, "generation": policy.generation, "spec": policy.spec, "defaults": format!("{defaults:?}"),
    }));
    let mut before = hashes.lock().remove(policy.name).filter(|h| h.policy == fingerprint).unwrap_or_default();
    let mut after = PolicyHashes { policy: fingerprint, targets: HashMap::new() };
    let plan = plan_remembering(policy, defaults, observed, config_maps, now, &mut |w, build| {
        let key = (w.key(), w.kind);
        let version = w.metadata.resource_version.clone().unwrap_or_default();
        let hash = match before.targets.remove(&key) {
            Some((v, hash)) if !version.is_empty() && v == version => hash,
            _ => build(),
        };
        if !version.is_empty() {
            after.targets.insert(key, (version, hash.clone()));
        }
        hash
    });
    if !after.targets.is_empty() {
        hashes.lock().insert(policy.name.to_string(), after);
    }
    plan
}

/// The plan of the workload layer, its injections not built yet.
#[derive(Default)]
pub struct LazyPlan {
    pub actions: Vec<Lazy>,
    pub report: LayerReport,
    /// Workloads whose injection had been removed by someone else and is applied again.
    pub drifted: Vec<ObjectKey>,
}

impl LazyPlan {
    /// The plan with every action built.
    pub fn built(self) -> Plan {
        Plan {
            actions: self.actions.into_iter().map(Lazy::into_action).collect(),
            report: self.report,
            drifted: self.drifted,
        }
    }
}

/// The hash of a workload's desired injection: remembered, or computed by the closure.
type HashOf<'a> = dyn FnMut(&Workload, &dyn Fn() -> String) -> String + 'a;

fn plan_remembering(
    policy: PolicyView<'_>,
    defaults: &Defaults,
    observed: &[Observed],
    config_maps: &[ConfigMap],
    now: i64,
    hash_of: &mut HashOf<'_>,
) -> LazyPlan {
    let active = !policy.deleting && policy.spec.workloads.is_some();
    let mut plan = LazyPlan::default();
    let mut targets: Vec<&Observed> = observed.iter().collect();
    targets.sort_by_cached_key(|t| (t.workload.key(), t.workload.kind));
    // What the injections are built from, shared by them (built after this returns, by a writer).
    let recipe = Arc::new(Recipe {
        name: policy.name.to_string(),
        uid: policy.uid.to_string(),
        generation: policy.generation,
        spec: policy.spec.clone(),
        defaults: defaults.clone(),
    });

    let mut reverts = Vec::new();
    let mut per_target = Vec::new();
    let mut namespaces_in_use = BTreeSet::new();
    let mut writing = false;
    for t in targets {
        let w = &t.workload;
        if t.writing {
            // It keeps its slot, its namespace keeps the collector configuration, and nothing more is
            // planned for it until its write is answered.
            writing = true;
            namespaces_in_use.insert(w.key().namespace);
            if active && t.selected {
                plan.report.selected += 1;
                per_target.push(TargetPlan::state(Progress::InFlight));
            }
            continue;
        }
        let record = record_of(&w.metadata);
        let ours = matches!(&record, Ok(Some(r)) if r.policy == policy.name);
        let marker = w.metadata.annotations.as_ref().and_then(|a| a.get(ROLLED_BACK_ANNOTATION));
        let our_marker = marker.is_some_and(|m| m.split_once('/').is_some_and(|(p, _)| p == policy.name));
        if !(active && t.selected) {
            if ours || our_marker {
                reverts.push(Lazy::Now(Action::Remove { kind: w.kind, workload: w.key(), rolled_back: None }));
            }
            continue;
        }
        plan.report.selected += 1;
        let (target, drifted) =
            forward(policy, defaults, (t, &recipe), record, marker.map(String::as_str), now, &mut *hash_of);
        if drifted {
            plan.drifted.push(w.key());
        }
        if !target.actions.is_empty() || ours {
            namespaces_in_use.insert(w.key().namespace);
        }
        per_target.push(target);
    }

    // The collector configuration goes first into every namespace that gets (or keeps) a sidecar.
    let name = config_map_name(policy.name);
    if active {
        let data = collector_config(policy.spec);
        for namespace in &namespaces_in_use {
            let current = config_maps.iter().find(|cm| cm.namespace().as_deref() == Some(namespace.as_str()));
            if current.and_then(|cm| cm.data.as_ref()) != Some(&data) {
                plan.actions.push(Lazy::Now(Action::ApplyCollectorConfig {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    data: data.clone(),
                    policy: policy.name.to_string(),
                    policy_uid: policy.uid.to_string(),
                }));
            }
        }
    }
    plan.actions.extend(schedule(per_target, &policy.spec.rollout, &mut plan.report));
    plan.actions.extend(reverts);
    // A ConfigMap goes last, once no sidecar of this policy is left in its namespace (and no write
    // of this policy's is in flight: a removal in flight may not have landed yet).
    for cm in config_maps.iter().filter(|_| !writing) {
        let namespace = cm.namespace().unwrap_or_default();
        if !active || !namespaces_in_use.contains(&namespace) {
            plan.actions.push(Lazy::Now(Action::DeleteCollectorConfig { namespace, name: name.clone() }));
        }
    }
    plan
}

/// What a plan's injections are built from besides their workload: the policy, owned (a policy's
/// writer builds them after the reconcile that planned them returned). Each injection holds its own
/// workload, not the whole observation: a writer keeps only what it has yet to write.
struct Recipe {
    name: String,
    uid: String,
    generation: i64,
    spec: TracingPolicySpec,
    defaults: Defaults,
}

impl Recipe {
    fn view(&self) -> PolicyView<'_> {
        PolicyView { uid: &self.uid, generation: self.generation, ..PolicyView::new(&self.name, &self.spec) }
    }
}

/// An action of the plan, an injection built only when it is written: a pending target's injection
/// is not built while it waits for a slot, nor while it waits for its turn in the policy's writer.
pub enum Lazy {
    Now(Action),
    /// An [`Action::Inject`] of this workload.
    Later {
        kind: WorkloadKind,
        workload: ObjectKey,
        build: Box<dyn Fn() -> Action + Send + Sync>,
    },
}

impl Lazy {
    /// The action, built now if it is an injection.
    pub fn action(&self) -> std::borrow::Cow<'_, Action> {
        match self {
            Lazy::Now(action) => std::borrow::Cow::Borrowed(action),
            Lazy::Later { build, .. } => std::borrow::Cow::Owned(build()),
        }
    }

    pub fn into_action(self) -> Action {
        match self {
            Lazy::Now(action) => action,
            Lazy::Later { build, .. } => build(),
        }
    }

    /// The workload an injection is for.
    pub fn injected(&self) -> Option<&ObjectKey> {
        match self {
            Lazy::Now(Action::Inject { workload, .. }) | Lazy::Later { workload, .. } => Some(workload),
            Lazy::Now(_) => None,
        }
    }
}

/// The plan of one selected target; its injection is built later from `recipe`.
fn forward(
    policy: PolicyView<'_>,
    defaults: &Defaults,
    (t, recipe): (&Observed, &Arc<Recipe>),
    record: Result<Option<Record>, String>,
    marker: Option<&str>,
    now: i64,
    hash_of: &mut HashOf<'_>,
) -> (TargetPlan<Lazy>, bool) {
    let w = &t.workload;
    let key = w.key();
    let kind = w.kind;
    let what = format!("{kind:?} {key}");
    // An inherited injection is written again under this policy's record (same field manager: the
    // apply takes the fields over as they are).
    let record = match super::claim(record, &what, policy, t.claimed_by.as_deref()) {
        Ok(super::Claim::Ours(record)) => Some(record),
        Ok(super::Claim::Free | super::Claim::Inherited(_)) => None,
        Err(held) => return (held, false),
    };
    let this_generation = format!("{}/{}", policy.name, policy.generation);
    if record.is_none() && marker == Some(this_generation.as_str()) {
        return (super::held_rolled_back(&what), false);
    }
    // The injection as it would be written now: its hash says whether the one on the workload is
    // current (a workload without a record needs none). The injection itself is built only to be
    // written.
    let since = record.as_ref().map_or(now, |r| r.rollout_started);
    let written = record.as_ref().map(|r| Written {
        current: r.hash == hash_of(w, &|| injection(policy, defaults, w, Some(r), since).1.hash),
        intact: injection_present(w, r, defaults.native_sidecars),
        converged: converged(&w.metadata, r),
        since: r.rollout_started,
    });
    let step = rollout::judge(
        written,
        &w.health("the collector sidecar"),
        now,
        i64::from(policy.spec.rollout.progress_deadline_seconds),
    );
    let drifted = step == rollout::Step::Reapply;
    let inject_key = key.clone();
    let target = super::follow(
        step,
        &what,
        &policy.spec.rollout,
        move |converged, restart_clock| {
            let workload = inject_key.clone();
            let recipe = Arc::clone(recipe);
            let observed = Arc::clone(&t.workload);
            vec![Lazy::Later {
                kind,
                workload,
                build: Box::new(move || {
                    let w = &observed;
                    let (mut patch, desired) = injection(recipe.view(), &recipe.defaults, w, record.as_ref(), since);
                    if restart_clock {
                        let record = Record { rollout_started: now, ..desired.clone() };
                        patch["metadata"]["annotations"][RECORD_ANNOTATION] = json!(record_json(&record));
                    }
                    if converged {
                        patch["metadata"]["labels"][CONVERGED_LABEL] = json!(desired.hash);
                    }
                    Action::Inject { kind, workload: inject_key.clone(), patch }
                }),
            }]
        },
        || vec![Lazy::Now(Action::Remove { kind, workload: key, rolled_back: Some(this_generation) })],
    );
    (target, drifted)
}

/// Namespaces `spec.workloads.namespaceSelector` selects, never the protected ones nor the operator's.
pub async fn selected_namespaces(
    client: &Client,
    spec: &WorkloadsSpec,
    defaults: &Defaults,
) -> Result<BTreeSet<String>, super::ObserveError> {
    let selector = selector(&spec.namespace_selector)
        .map_err(super::ObserveError::selector("spec.workloads.namespaceSelector"))?;
    let namespaces =
        Api::<Meta<Namespace>>::all(client.clone()).list(&ListParams::default().labels_from(&selector)).await?;
    Ok(namespaces.into_iter().filter_map(|n| n.metadata.name).filter(|n| !defaults.protects(n)).collect())
}

/// Objects per list request, of a reconcile's lists and of the controller's watches' (metadata, or
/// workloads pruned as they arrive): bounds what one response holds in memory, however big a namespace
/// is. A page of 500 Deployments held about 16 MiB while it was read and decoded (its text, then the
/// whole objects): a fresh controller's first reconciles list while its watches list, and its RSS
/// peaked there.
pub const PAGE: u32 = 100;

/// Up to this many workloads that carry a policy's label but are no longer selected are read one by
/// one; more are listed.
const READ_ONE_BY_ONE: usize = 8;

/// List requests of one observation in flight at once.
const LIST_CONCURRENCY: usize = 4;

/// Lists everything `params` matches, a page at a time, handing each object to `each` (which keeps
/// only what it needs) before the next page is read.
async fn list_paged<K>(api: &Api<K>, params: &ListParams, mut each: impl FnMut(K)) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut params = params.clone().limit(PAGE);
    loop {
        let page = api.list(&params).await?;
        let next = page.metadata.continue_.filter(|c| !c.is_empty());
        page.items.into_iter().for_each(&mut each);
        match next {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(()),
        }
    }
}

fn api<K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>>(
    client: &Client,
    ns: Option<&str>,
) -> Api<K> {
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Lists the workloads of `kind` in `namespace` (or every namespace) matching `params`, a page at a
/// time, each reduced at once to a [`Workload`] as a store keeps it ([`Workload::pruned`]).
async fn list(
    client: &Client,
    kind: WorkloadKind,
    namespace: Option<&str>,
    params: &ListParams,
    mut each: impl FnMut(Workload),
) -> Result<(), kube::Error> {
    match kind {
        WorkloadKind::Deployment => {
            let api = api::<Lean<Deployment>>(client, namespace);
            list_paged(&api, params, |d| each(Workload::from_deployment(d.into_inner()).pruned())).await
        }
        WorkloadKind::StatefulSet => {
            let api = api::<Lean<StatefulSet>>(client, namespace);
            list_paged(&api, params, |s| each(Workload::from_statefulset(s.into_inner()).pruned())).await
        }
        WorkloadKind::DaemonSet => {
            let api = api::<Lean<DaemonSet>>(client, namespace);
            list_paged(&api, params, |d| each(Workload::from_daemonset(d.into_inner()).pruned())).await
        }
    }
}

/// Lists the workloads of `kinds` in `namespaces` matching `params`, handing each to `each` as its
/// page arrives: namespace by namespace (a few lists in flight at once), or, for many namespaces and a
/// label selector (the API server sends what it matches, not the cluster), once across the cluster.
/// Returns how many were handed.
async fn list_in(
    client: &Client,
    kinds: &[WorkloadKind],
    namespaces: &BTreeSet<String>,
    params: &ListParams,
    each: impl Fn(Workload) + Sync,
) -> Result<usize, kube::Error> {
    let across =
        namespaces.len() > LIST_NAMESPACE_BY_NAMESPACE && params.label_selector.as_ref().is_some_and(|s| !s.is_empty());
    let lists: Vec<(WorkloadKind, Option<String>)> = match across {
        true => kinds.iter().map(|kind| (*kind, None)).collect(),
        false => kinds.iter().flat_map(|kind| namespaces.iter().map(|ns| (*kind, Some(ns.clone())))).collect(),
    };
    futures::stream::iter(lists)
        .map(|(kind, namespace)| {
            let each = &each;
            async move {
                let mut handed = 0;
                list(client, kind, namespace.as_deref(), params, |w| {
                    if !across || w.metadata.namespace.as_ref().is_some_and(|ns| namespaces.contains(ns)) {
                        handed += 1;
                        each(w);
                    }
                })
                .await
                .map(|()| handed)
            }
        })
        .buffer_unordered(LIST_CONCURRENCY)
        .try_fold(0, |all, handed| std::future::ready(Ok(all + handed)))
        .await
}

/// Up to this many namespaces are listed one by one; more, across the cluster.
const LIST_NAMESPACE_BY_NAMESPACE: usize = 8;

/// Reads one workload, as a store keeps it ([`Workload::pruned`]); `None` when it is gone.
async fn get(client: &Client, kind: WorkloadKind, key: &ObjectKey) -> Result<Option<Workload>, kube::Error> {
    let ns = Some(key.namespace.as_str());
    let read = match kind {
        WorkloadKind::Deployment => api::<Lean<Deployment>>(client, ns)
            .get_opt(&key.name)
            .await?
            .map(|d| Workload::from_deployment(d.into_inner())),
        WorkloadKind::StatefulSet => api::<Lean<StatefulSet>>(client, ns)
            .get_opt(&key.name)
            .await?
            .map(|s| Workload::from_statefulset(s.into_inner())),
        WorkloadKind::DaemonSet => api::<Lean<DaemonSet>>(client, ns)
            .get_opt(&key.name)
            .await?
            .map(|d| Workload::from_daemonset(d.into_inner())),
    };
    Ok(read.map(Workload::pruned))
}

/// The keys of the workloads of `kind` carrying this policy's label (metadata only, a page at a time).
async fn labelled_keys(
    client: &Client,
    kind: WorkloadKind,
    params: &ListParams,
) -> Result<Vec<ObjectKey>, kube::Error> {
    async fn keys<K>(client: &Client, params: &ListParams) -> Result<Vec<ObjectKey>, kube::Error>
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    {
        let mut keys = Vec::new();
        list_paged(&api::<Meta<K>>(client, None), params, |m| keys.push(ObjectKey::of(&m.metadata))).await?;
        Ok(keys)
    }
    match kind {
        WorkloadKind::Deployment => keys::<Deployment>(client, params).await,
        WorkloadKind::StatefulSet => keys::<StatefulSet>(client, params).await,
        WorkloadKind::DaemonSet => keys::<DaemonSet>(client, params).await,
    }
}

/// Does a workload belong to the edge layer? Those are left to it: one field manager cannot own
/// both injections without one revert undoing the other.
fn is_edge_controller(w: &Workload) -> bool {
    w.metadata.labels.as_ref().is_some_and(|l| l.contains_key(super::ingress::POLICY_LABEL))
}

/// The workloads a policy selects and those it changed before, listed (the stores are not synced yet).
async fn listed(
    client: &Client,
    policy: PolicyView<'_>,
    defaults: &Defaults,
    claimant: impl Fn(&Workload) -> Option<String>,
) -> Result<Found, super::ObserveError> {
    // What the policy selects, namespace by namespace (a few lists in flight at once) ...
    let selected = async {
        let Some(spec) = policy.spec.workloads.as_ref().filter(|_| !policy.deleting) else {
            return Ok(Vec::new());
        };
        let params = match &spec.selector {
            Some(s) => ListParams::default()
                .labels_from(&selector(s).map_err(super::ObserveError::selector("spec.workloads.selector"))?),
            None => ListParams::default(),
        };
        let namespaces = selected_namespaces(client, spec, defaults).await?;
        let workloads = std::sync::Mutex::new(Vec::new());
        let push = |w| workloads.lock().unwrap_or_else(|e| e.into_inner()).push(w);
        list_in(client, &spec.kinds, &namespaces, &params, push).await?;
        Ok::<_, super::ObserveError>(workloads.into_inner().unwrap_or_else(|e| e.into_inner()))
    };
    // ... and, at the same time, what carries its label (it changed them) and its ConfigMaps.
    let labelled = ListParams::default().labels_from(&label_equals(POLICY_LABEL, policy.name));
    let (selected, deployments, statefulsets, daemonsets) = futures::try_join!(
        selected,
        labelled_keys(client, WorkloadKind::Deployment, &labelled).err_into(),
        labelled_keys(client, WorkloadKind::StatefulSet, &labelled).err_into(),
        labelled_keys(client, WorkloadKind::DaemonSet, &labelled).err_into(),
    )?;
    let mut found: BTreeMap<(ObjectKey, WorkloadKind), Observed> = BTreeMap::new();
    for w in selected.into_iter().filter(|w| !is_edge_controller(w)) {
        let claimed_by = claimant(&w);
        found.insert((w.key(), w.kind), Observed { workload: Arc::new(w), selected: true, claimed_by, writing: false });
    }
    // Workloads this policy changed that are no longer selected: the few whole objects not read above.
    let changed = [(WorkloadKind::Deployment, deployments), (WorkloadKind::StatefulSet, statefulsets)]
        .into_iter()
        .chain([(WorkloadKind::DaemonSet, daemonsets)]);
    for (kind, keys) in changed {
        let missing: BTreeSet<ObjectKey> =
            keys.into_iter().filter(|k| !found.contains_key(&(k.clone(), kind))).collect();
        if missing.len() > READ_ONE_BY_ONE {
            // Many (the policy is being deleted, or its selection shrank): one paged list beats a read each.
            list(client, kind, None, &labelled, |w| {
                if missing.contains(&w.key()) {
                    found.insert((w.key(), kind), Observed { workload: Arc::new(w), ..Default::default() });
                }
            })
            .await?;
            continue;
        }
        for key in missing {
            if let Some(w) = get(client, kind, &key).await? {
                found.insert((key, kind), Observed { workload: Arc::new(w), ..Default::default() });
            }
        }
    }
    Ok(found)
}

/// What the layer looks at, by workload.
type Found = BTreeMap<(ObjectKey, WorkloadKind), Observed>;

/// The workloads a policy selects and those it changed before, from the stores: no list of the
/// cluster; a workload the store knows by its metadata alone is read (once: the stores remember it).
async fn stored(
    client: &Client,
    stores: &super::stores::Stores,
    policy: PolicyView<'_>,
    defaults: &Defaults,
    claimant: impl Fn(&Workload) -> Option<String>,
) -> Result<Found, super::ObserveError> {
    let spec = policy.spec.workloads.as_ref().filter(|_| !policy.deleting);
    // Bad selectors fail the observation, as the list path's requests would.
    let selection = spec.map(|spec| Selection::new(spec, defaults)).transpose()?;
    let params = &selection.as_ref().map_or_else(ListParams::default, Selection::list_params);
    let namespaces = spec.map(|_| stores.namespace_labels()).unwrap_or_default();
    let selected = |kind: WorkloadKind, meta: &ObjectMeta| {
        let Some(selection) = &selection else { return false };
        let labels = || meta.namespace.as_ref().and_then(|n| namespaces.get(n));
        let edge = || meta.labels.as_ref().is_some_and(|l| l.contains_key(super::ingress::POLICY_LABEL));
        selection.selects(kind, meta, labels) && labels().is_some() && !edge()
    };
    let labelled =
        |meta: &ObjectMeta| meta.labels.as_ref().and_then(|l| l.get(POLICY_LABEL)).is_some_and(|p| p == policy.name);
    // Everything `selected` reads besides labels: a resync of a policy that nothing relabelled since
    // looks at the workloads its last scan found, not at every workload of the cluster.
    let asked = super::stores::Asked {
        by: policy.name.to_string(),
        what: "workloads",
        fingerprint: super::hash_of(&json!({"spec": spec, "defaults": format!("{defaults:?}")})),
    };
    // What it selects that the stores did not keep (they keep what a policy selected when it changed).
    if let Some(selection) = &selection {
        let uncovered = stores.uncovered(&asked, |name, labels| selection.selects_namespace(name, labels));
        if !uncovered.namespaces.is_empty() {
            let read = |w: Workload| {
                if selected(w.kind, &w.metadata) {
                    stores.read(&w, &uncovered.listing);
                }
            };
            let listed = list_in(client, selection.kinds(), &uncovered.namespaces, params, read).await?;
            tracing::debug!(
                namespaces = uncovered.namespaces.len(),
                listed,
                "the workloads of namespaces not listed for this selection are listed"
            );
        }
        stores.covered(uncovered);
    }
    let mut found = Found::new();
    let mut add = |w: Workload| {
        let selected = selected(w.kind, &w.metadata);
        if selected || labelled(&w.metadata) {
            let claimed_by = if selected { claimant(&w) } else { None };
            found.insert((w.key(), w.kind), Observed { workload: Arc::new(w), selected, claimed_by, writing: false });
        }
    };
    let mut unread = Vec::new();
    for kind in [WorkloadKind::Deployment, WorkloadKind::StatefulSet, WorkloadKind::DaemonSet] {
        for w in stores.workloads(kind, Some(&asked), |m| selected(kind, m) || labelled(m)) {
            match w {
                Ok(w) => add(w),
                Err(key) => unread.push((kind, key)),
            }
        }
    }
    // Those a policy selects that the store kept as metadata (an ingress controller's, which the edge
    // layer leaves to it): a few are read one by one, a namespace's many with one list of what the
    // policy selects.
    let listing = stores.listing();
    if !unread.is_empty() {
        tracing::debug!(unread = unread.len(), "selected workloads the stores hold as metadata alone are read");
    }
    let mut groups: BTreeMap<(WorkloadKind, String), BTreeSet<ObjectKey>> = BTreeMap::new();
    for (kind, key) in unread {
        groups.entry((kind, key.namespace.clone())).or_default().insert(key);
    }
    let reads = futures::stream::iter(groups)
        .map(|((kind, namespace), keys)| async move {
            if keys.len() <= READ_ONE_BY_ONE {
                let reads = futures::future::try_join_all(keys.iter().map(|key| get(client, kind, key))).await?;
                return Ok(reads.into_iter().flatten().collect());
            }
            let mut read = Vec::new();
            list(client, kind, Some(&namespace), params, |w| {
                if keys.contains(&w.key()) {
                    read.push(w);
                }
            })
            .await
            .map(|()| read)
        })
        .buffer_unordered(LIST_CONCURRENCY)
        .try_concat()
        .await?;
    for w in reads {
        stores.read(&w, &listing);
        add(w);
    }
    stores.forget_stale_now_and_then();
    Ok(found)
}

/// The workloads the layer must look at for a policy: those it selects, and those it changed before;
/// and its collector ConfigMaps. From the stores once they are synced; listed before.
pub async fn observe(
    client: &Client,
    stores: Option<&super::stores::Stores>,
    policy: PolicyView<'_>,
    defaults: &Defaults,
    claimant: impl Fn(&Workload) -> Option<String>,
) -> Result<(Vec<Observed>, Vec<ConfigMap>), super::ObserveError> {
    let labelled = ListParams::default().labels_from(&label_equals(POLICY_LABEL, policy.name));
    let config_maps = async {
        match stores.and_then(|s| s.collector_config_maps(policy.name)) {
            Some(stored) => Ok(stored),
            None => Api::<ConfigMap>::all(client.clone()).list(&labelled).await.map(|l| l.items),
        }
    };
    let found = async {
        match stores.filter(|s| s.ready()) {
            Some(stores) => stored(client, stores, policy, defaults, claimant).await,
            None => {
                tracing::debug!("the stores are not synced yet: listing the workloads");
                listed(client, policy, defaults, claimant).await
            }
        }
    };
    let (mut found, config_maps) = futures::try_join!(found, config_maps.err_into())?;
    // Rollouts of this policy in flight: do pods of its revision fail to start? (A batch at most; and
    // only those with pods of their revision: there is nothing to list before the workload's controller
    // created some.)
    let in_flight = found.values_mut().filter(|o| o.selected && !o.workload.rolled_out && o.workload.revision_started);
    let in_flight = in_flight.filter_map(|o| {
        let record = record_of(&o.workload.metadata).ok().flatten()?;
        (record.policy == policy.name && !converged(&o.workload.metadata, &record))
            .then_some((Arc::make_mut(&mut o.workload), record.hash))
    });
    let mut by_namespace: BTreeMap<String, Vec<(&mut Workload, String)>> = BTreeMap::new();
    for (workload, hash) in in_flight {
        by_namespace.entry(workload.metadata.namespace.clone().unwrap_or_default()).or_default().push((workload, hash));
    }
    // The namespaces side by side (a rollout's reconciles each ask again: one round trip, not one per
    // namespace).
    let checks: Vec<_> = by_namespace.into_iter().map(|(ns, rollouts)| failing_in(client, ns, rollouts)).collect();
    futures::stream::iter(checks).buffer_unordered(LIST_CONCURRENCY).try_collect::<Vec<()>>().await?;
    Ok((found.into_values().collect(), config_maps))
}

/// Fills in `failing` for the rollouts in flight of one namespace: a few one by one (side by side),
/// many from one list of the namespace's pods.
async fn failing_in(
    client: &Client,
    namespace: String,
    mut rollouts: Vec<(&mut Workload, String)>,
) -> Result<(), kube::Error> {
    if rollouts.len() > READ_ONE_BY_ONE {
        return failing_pods(client, &namespace, &mut rollouts).await;
    }
    let found = futures::future::try_join_all(rollouts.iter().map(|(w, hash)| failing_pod(client, w, hash))).await?;
    for ((workload, _), failing) in rollouts.into_iter().zip(found) {
        workload.failing = failing;
    }
    Ok(())
}

/// [`failing_pod`] for many rollouts of one namespace, from one list of its pods.
async fn failing_pods(
    client: &Client,
    namespace: &str,
    rollouts: &mut [(&mut Workload, String)],
) -> Result<(), kube::Error> {
    let mut by_hash: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, (_, hash)) in rollouts.iter().enumerate() {
        by_hash.entry(hash.clone()).or_default().push(i);
    }
    let selectors: Vec<_> = rollouts.iter().map(|(w, _)| w.selector.as_ref().and_then(|s| selector(s).ok())).collect();
    list_paged(&Api::<Lean<Pod>>::namespaced(client.clone(), namespace), &ListParams::default(), |p| {
        let pod = p.into_inner();
        let hash = pod.metadata.annotations.as_ref().and_then(|a| a.get(INJECTION_ANNOTATION));
        for &i in hash.and_then(|h| by_hash.get(h)).into_iter().flatten() {
            let workload = &mut rollouts[i].0;
            let selected = selectors[i].as_ref().is_some_and(|s| matches(s, pod.metadata.labels.as_ref()));
            if selected && workload.failing.is_none() {
                workload.failing = health::pod_failing(&pod);
            }
        }
    })
    .await
}

/// Why a pod of crosstrace's revision (its template carries the injection's hash) of `w` cannot start.
async fn failing_pod(client: &Client, w: &Workload, hash: &str) -> Result<Option<String>, kube::Error> {
    let Some(pod_selector) = w.selector.as_ref().and_then(|s| selector(s).ok()) else {
        return Ok(None);
    };
    let namespace = w.metadata.namespace.as_deref().unwrap_or_default();
    let mut failing = None;
    list_paged(
        &Api::<Lean<Pod>>::namespaced(client.clone(), namespace),
        &ListParams::default().labels_from(&pod_selector),
        |p| {
            let pod = p.into_inner();
            let ours =
                pod.metadata.annotations.as_ref().and_then(|a| a.get(INJECTION_ANNOTATION)).is_some_and(|h| h == hash);
            if ours && failing.is_none() {
                failing = health::pod_failing(&pod);
            }
        },
    )
    .await?;
    Ok(failing)
}

/// Does `spec.workloads` select this workload, given the labels of its namespace?
pub fn selects(
    spec: &WorkloadsSpec,
    defaults: &Defaults,
    w: &Workload,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    selects_meta(spec, defaults, w.kind, &w.metadata, namespace_labels)
}

/// [`selects`], by the workload's kind and metadata.
pub fn selects_meta(
    spec: &WorkloadsSpec,
    defaults: &Defaults,
    kind: WorkloadKind,
    meta: &ObjectMeta,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    Selection::new(spec, defaults).is_ok_and(|s| s.selects(kind, meta, || namespace_labels))
}

/// `spec.workloads`'s selection, its selectors parsed once for the many workloads a store holds.
pub struct Selection<'a> {
    spec: &'a WorkloadsSpec,
    defaults: &'a Defaults,
    namespaces: kube::core::Selector,
    workloads: Option<kube::core::Selector>,
}

impl<'a> Selection<'a> {
    /// The selection, or what is wrong with a selector (naming its field).
    pub fn new(spec: &'a WorkloadsSpec, defaults: &'a Defaults) -> Result<Self, super::ObserveError> {
        let namespaces = selector(&spec.namespace_selector)
            .map_err(super::ObserveError::selector("spec.workloads.namespaceSelector"))?;
        let workloads = spec
            .selector
            .as_ref()
            .map(|s| selector(s).map_err(super::ObserveError::selector("spec.workloads.selector")))
            .transpose()?;
        Ok(Self { spec, defaults, namespaces, workloads })
    }

    /// A list of the workloads its selector matches (in every namespace, of any kind).
    pub fn list_params(&self) -> ListParams {
        self.workloads.as_ref().map_or_else(ListParams::default, |s| ListParams::default().labels_from(s))
    }

    /// Does it select this workload, given the labels of its namespace (asked for last: most workloads
    /// of a cluster fail the workload selector first)?
    pub fn selects<'l>(
        &self,
        kind: WorkloadKind,
        meta: &ObjectMeta,
        namespace_labels: impl FnOnce() -> Option<&'l BTreeMap<String, String>>,
    ) -> bool {
        self.selects_in_any_namespace(kind, meta) && matches(&self.namespaces, namespace_labels())
    }

    /// Does it select workloads of this namespace (by its name and labels)?
    pub fn selects_namespace(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        !self.defaults.protects(name) && matches(&self.namespaces, Some(labels))
    }

    /// The kinds it selects.
    pub fn kinds(&self) -> &[WorkloadKind] {
        &self.spec.kinds
    }

    /// [`Selection::selects`], but for the namespace selector (the namespace's labels are unknown).
    pub fn selects_in_any_namespace(&self, kind: WorkloadKind, meta: &ObjectMeta) -> bool {
        self.spec.kinds.contains(&kind)
            && self.workloads.as_ref().is_none_or(|s| matches(s, meta.labels.as_ref()))
            && !self.defaults.protects(meta.namespace.as_deref().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CollectorSpec, RolloutSpec, SamplingSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    const NOW: i64 = 5_000;

    fn spec() -> TracingPolicySpec {
        TracingPolicySpec {
            collector: Some(CollectorSpec {
                endpoint: "otel-gateway.observability.svc:4317".into(),
                ..Default::default()
            }),
            sampling: SamplingSpec { ratio: "0.25".into(), parent_based: true },
            workloads: Some(WorkloadsSpec {
                namespace_selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("tracing".into(), "enabled".into())])),
                    ..Default::default()
                },
                kinds: vec![WorkloadKind::Deployment, WorkloadKind::StatefulSet, WorkloadKind::DaemonSet],
                ..Default::default()
            }),
            rollout: RolloutSpec { max_concurrent: 2, progress_deadline_seconds: 60, ..Default::default() },
            ..Default::default()
        }
    }

    fn defaults() -> Defaults {
        Defaults {
            sidecar_image: crate::controller::DEFAULT_SIDECAR_IMAGE.into(),
            sidecar_resources: crate::controller::default_sidecar_resources(),
            native_sidecars: true,
            operator_namespace: "crosstrace-system".into(),
            protected_namespaces: vec!["vault".into()],
        }
    }

    fn view(spec: &TracingPolicySpec) -> PolicyView<'_> {
        PolicyView { uid: "uid-1", generation: 3, ..PolicyView::new("shop", spec) }
    }

    fn workload(name: &str, env: &[(&str, &str)]) -> Workload {
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{
                "name": "app",
                "image": "shop/app:1",
                "env": env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
            }]},
        }))
        .unwrap();
        let metadata = ObjectMeta { name: Some(name.into()), namespace: Some("shop".into()), ..Default::default() };
        Workload {
            kind: WorkloadKind::Deployment,
            metadata,
            template: Template::Full(Box::new(template)),
            rolled_out: true,
            ..Default::default()
        }
    }

    /// The whole pod template of a target read from the API server, to change.
    fn full(t: &mut Observed) -> &mut PodTemplateSpec {
        Arc::make_mut(&mut t.workload).template.full_mut().expect("read whole")
    }

    fn selected(w: Workload) -> Observed {
        Observed { workload: Arc::new(w), selected: true, ..Default::default() }
    }

    /// The workload as the API server holds it after an Inject (record and injected fields present).
    fn injected(mut t: Observed, actions: &[Action]) -> Observed {
        for action in actions {
            if let Action::Inject { workload, patch, .. } = action
                && *workload == t.workload.key()
            {
                let annotations = Arc::make_mut(&mut t.workload).metadata.annotations.get_or_insert_default();
                let record = patch["metadata"]["annotations"][RECORD_ANNOTATION].as_str().unwrap();
                annotations.insert(RECORD_ANNOTATION.into(), record.into());
                Arc::make_mut(&mut t.workload).metadata.labels =
                    serde_json::from_value(patch["metadata"]["labels"].clone()).unwrap();
                let template_annotations = &patch["spec"]["template"]["metadata"]["annotations"];
                full(&mut t).metadata.get_or_insert_default().annotations =
                    serde_json::from_value(template_annotations.clone()).unwrap();
                let pod = full(&mut t).spec.as_mut().unwrap();
                let injected_pod: k8s_openapi::api::core::v1::PodSpec =
                    serde_json::from_value(patch["spec"]["template"]["spec"].clone()).unwrap();
                pod.init_containers = injected_pod.init_containers;
                pod.volumes = injected_pod.volumes;
                for (c, patch_c) in pod.containers.iter_mut().zip(injected_pod.containers) {
                    c.env.get_or_insert_default().extend(patch_c.env.unwrap_or_default());
                }
            }
        }
        t
    }

    /// Compares with a committed snapshot; `UPDATE_SNAPSHOTS=1` rewrites it.
    fn snapshot(name: &str, actual: &str) {
        let path = format!("{}/src/layers/snapshots/{name}", env!("CARGO_MANIFEST_DIR"));
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(expected == actual, "snapshot {name} differs (UPDATE_SNAPSHOTS=1 to accept):\n{actual}");
    }

    #[test]
    fn injection_snapshot() {
        let s = spec();
        let plan =
            plan(view(&s), &defaults(), &[selected(workload("cart", &[("OTEL_SERVICE_NAME", "checkout")]))], &[], NOW);
        let Some(Action::Inject { patch, .. }) = plan.actions.iter().find(|a| matches!(a, Action::Inject { .. }))
        else {
            panic!("{:?}", plan.actions)
        };
        snapshot("injection.yaml", &serde_yaml::to_string(patch).unwrap());
    }

    #[test]
    fn collector_config_snapshot() {
        let config = collector_config(&spec());
        snapshot("collector-deployment.yaml", &config["deployment.yaml"]);
        assert!(config["statefulset.yaml"].contains("k8s.statefulset.name"));
        assert!(config["daemonset.yaml"].contains("k8s.daemonset.name"));
    }

    /// The collector refuses an empty resource attribute, so every `${env:...}` the configuration reads
    /// must be set on the sidecar container.
    #[test]
    fn every_env_the_collector_config_reads_is_set_on_the_sidecar() {
        let s = spec();
        let workload = ObjectKey { namespace: "shop".into(), name: "cart".into() };
        let reference = regex::Regex::new(r"\$\{env:([A-Z0-9_]+)\}").unwrap();
        for kind in [WorkloadKind::Deployment, WorkloadKind::StatefulSet, WorkloadKind::DaemonSet] {
            let container = sidecar(s.workloads.as_ref().unwrap(), &defaults(), kind, &workload);
            let set: Vec<&str> =
                container["env"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
            let config = &collector_config(&s)[&format!("{}.yaml", kind_key(kind))];
            let read: Vec<&str> = reference.captures_iter(config).map(|c| c.get(1).unwrap().as_str()).collect();
            assert_eq!(read.len(), 4, "{kind:?}: {config}");
            for name in read {
                assert!(set.contains(&name), "{kind:?}: the config reads ${{env:{name}}}, the sidecar sets {set:?}");
            }
        }
    }

    #[test]
    fn user_env_is_never_overwritten() {
        let s = spec();
        let plan =
            plan(view(&s), &defaults(), &[selected(workload("cart", &[("OTEL_SERVICE_NAME", "checkout")]))], &[], NOW);
        let Some(Action::Inject { patch, .. }) = plan.actions.iter().find(|a| matches!(a, Action::Inject { .. }))
        else {
            panic!()
        };
        let env = patch["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap();
        assert!(env.iter().all(|e| e["name"] != "OTEL_SERVICE_NAME"), "the user's OTEL_SERVICE_NAME stays theirs");
        assert!(env.iter().any(|e| e["name"] == "OTEL_TRACES_SAMPLER" && e["value"] == "parentbased_traceidratio"));
        assert!(env.iter().any(|e| e["name"] == "OTEL_TRACES_SAMPLER_ARG" && e["value"] == "0.25"));
    }

    #[test]
    fn collector_config_goes_first_and_batches_respect_max_concurrent() {
        let s = spec();
        let targets: Vec<Observed> = (0..5).map(|i| selected(workload(&format!("w{i}"), &[]))).collect();
        let plan = plan(view(&s), &defaults(), &targets, &[], NOW);
        assert!(matches!(plan.actions[0], Action::ApplyCollectorConfig { .. }));
        assert_eq!(plan.actions.iter().filter(|a| matches!(a, Action::Inject { .. })).count(), 2);
        assert_eq!((plan.report.in_flight, plan.report.pending, plan.report.selected), (2, 3, 5));
    }

    #[test]
    fn a_target_whose_write_is_still_in_flight_keeps_its_slot_and_gets_nothing_more() {
        let s = spec();
        let mut targets: Vec<Observed> = (0..5).map(|i| selected(workload(&format!("w{i}"), &[]))).collect();
        targets[0].writing = true;
        let cm = ConfigMap {
            metadata: ObjectMeta { namespace: Some("shop".into()), ..Default::default() },
            data: Some(collector_config(&s)),
            ..Default::default()
        };
        let plan = plan(view(&s), &defaults(), &targets, std::slice::from_ref(&cm), NOW);
        let injected: Vec<String> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Inject { workload, .. } => Some(workload.name.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(injected, ["w1"], "w0 holds one of the two slots; it is not written again");
        assert_eq!((plan.report.in_flight, plan.report.pending, plan.report.selected), (2, 3, 5));

        // Reverting: a removal in flight is not sent again, and the collector configuration stays until it
        // has landed.
        let reverting = PolicyView { deleting: true, ..view(&s) };
        let mut removing = injected_target(&s, "w0");
        removing.writing = true;
        let plan = super::plan(reverting, &defaults(), &[removing.clone()], std::slice::from_ref(&cm), NOW);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        removing.writing = false;
        let plan = super::plan(reverting, &defaults(), &[removing], std::slice::from_ref(&cm), NOW);
        assert!(matches!(plan.actions[..], [Action::Remove { .. }, Action::DeleteCollectorConfig { .. }]));
    }

    /// A target of `s` with its injection written.
    fn injected_target(s: &TracingPolicySpec, name: &str) -> Observed {
        let t = selected(workload(name, &[]));
        let first = plan(view(s), &defaults(), std::slice::from_ref(&t), &[], NOW);
        injected(t, &first.actions)
    }

    #[test]
    fn converged_needs_nothing_and_drift_is_reapplied() {
        let s = spec();
        let t = selected(workload("cart", &[]));
        let first = plan(view(&s), &defaults(), std::slice::from_ref(&t), &[], NOW);
        let done = injected(t.clone(), &first.actions);
        let cm = {
            let mut cm = ConfigMap::default();
            cm.metadata.namespace = Some("shop".into());
            cm.data = Some(collector_config(&s));
            cm
        };
        let healthy = plan(view(&s), &defaults(), std::slice::from_ref(&done), std::slice::from_ref(&cm), NOW + 5);
        assert_eq!(healthy.report.ready, 1);
        let [Action::Inject { patch: mark, .. }] = &healthy.actions[..] else {
            panic!("the first healthy look records convergence: {:?}", healthy.actions)
        };
        let Some(Action::Inject { patch: first_patch, .. }) =
            first.actions.iter().find(|a| matches!(a, Action::Inject { .. }))
        else {
            panic!()
        };
        assert_eq!(mark["spec"], first_patch["spec"], "recording convergence does not change the pod template");
        let done = injected(done, &healthy.actions);
        let hash = record_of(&done.workload.metadata).unwrap().unwrap().hash;
        assert_eq!(done.workload.metadata.labels.as_ref().unwrap()[CONVERGED_LABEL], hash);
        assert_eq!(mark["metadata"]["annotations"], first_patch["metadata"]["annotations"], "no annotation changes");
        let again = plan(view(&s), &defaults(), std::slice::from_ref(&done), std::slice::from_ref(&cm), NOW + 6);
        assert!(again.actions.is_empty(), "{:?}", again.actions);
        assert_eq!(again.report.ready, 1);

        let mut drifted = done.clone();
        full(&mut drifted).spec.as_mut().unwrap().init_containers = None;
        let fix = plan(view(&s), &defaults(), &[drifted], &[cm], NOW + 10);
        assert_eq!(fix.drifted, vec![t.workload.key()]);
        assert!(matches!(fix.actions[..], [Action::Inject { .. }]));
    }

    #[test]
    fn injections_are_built_when_their_write_starts_and_as_the_whole_plan_builds_them() {
        let s = spec();
        let observed: Vec<Observed> = ["a", "b", "c"].iter().map(|n| selected(workload(n, &[]))).collect();
        let d = defaults();
        let lazy = plan_lazily(view(&s), &d, &observed, &[], NOW, &Hashes::default());
        let injections: Vec<&ObjectKey> = lazy.actions.iter().filter_map(Lazy::injected).collect();
        assert_eq!(injections.len(), 2, "a batch of maxConcurrent 2; the third waits");
        assert!(lazy.actions.iter().any(|a| matches!(a, Lazy::Later { .. })), "nothing built yet");
        let one = lazy.actions.iter().find(|a| matches!(a, Lazy::Later { .. })).unwrap().action().into_owned();
        let built = lazy.built();
        assert!(built.actions.contains(&one), "{one:?}");
        assert_eq!(built, plan(view(&s), &defaults(), &observed, &[], NOW));
    }

    #[test]
    fn remembered_hashes_plan_as_computed_ones_and_a_changed_workload_or_policy_is_hashed_again() {
        let s = spec();
        let at = |t: &Observed, version: &str| {
            let mut t = t.clone();
            Arc::make_mut(&mut t.workload).metadata.resource_version = Some(version.into());
            t
        };
        let hashes = Hashes::default();
        let fresh = at(&selected(workload("cart", &[])), "1");
        let first = plan_with(view(&s), &defaults(), std::slice::from_ref(&fresh), &[], NOW, &hashes);
        assert_eq!(first, plan(view(&s), &defaults(), std::slice::from_ref(&fresh), &[], NOW));
        assert!(hashes.is_empty(), "a workload without a record needs no hash");
        let converged = at(&injected(fresh.clone(), &first.actions), "2");
        let marked = injected(
            converged.clone(),
            &plan(view(&s), &defaults(), std::slice::from_ref(&converged), &[], NOW).actions,
        );
        let marked = at(&marked, "3");
        plan_with(view(&s), &defaults(), std::slice::from_ref(&marked), &[], NOW + 6, &hashes);
        assert_eq!(hashes.len(), 1);
        for round in 0..2 {
            let again = plan_with(view(&s), &defaults(), std::slice::from_ref(&marked), &[], NOW + 6, &hashes);
            assert_eq!(again, plan(view(&s), &defaults(), std::slice::from_ref(&marked), &[], NOW + 6), "{round}");
            assert_eq!(again.report.ready, 1, "{round}: {:?}", again.actions);
        }
        // While the workload's version stays, the remembered hash is what the plan goes by (not rebuilt).
        for (_, hash) in hashes.lock().get_mut("shop").unwrap().targets.values_mut() {
            *hash = "remembered".into();
        }
        let remembered = plan_with(view(&s), &defaults(), std::slice::from_ref(&marked), &[], NOW + 6, &hashes);
        assert_eq!(remembered.report.ready, 0, "the remembered hash differs from the record's: not current");
        // The owner edits the template (a new resourceVersion): its own env var now wins over ours, so
        // the desired injection differs, and the remembered hash must not hide that.
        let mut edited = marked.clone();
        full(&mut edited).spec.as_mut().unwrap().containers[0].env.get_or_insert_default().push(
            k8s_openapi::api::core::v1::EnvVar {
                name: "OTEL_SERVICE_NAME".into(),
                value: Some("mine".into()),
                ..Default::default()
            },
        );
        let edited = at(&edited, "4");
        let replanned = plan_with(view(&s), &defaults(), std::slice::from_ref(&edited), &[], NOW + 7, &hashes);
        assert_eq!(replanned, plan(view(&s), &defaults(), std::slice::from_ref(&edited), &[], NOW + 7));
        // A policy change (a new generation) hashes every target again.
        let mut changed = s.clone();
        changed.sampling.ratio = "0.25".into();
        let view2 = PolicyView { generation: 4, ..view(&changed) };
        let changed_plan = plan_with(view2, &defaults(), std::slice::from_ref(&marked), &[], NOW + 8, &hashes);
        assert_eq!(changed_plan, plan(view2, &defaults(), std::slice::from_ref(&marked), &[], NOW + 8));
        // Only this plan's targets are kept.
        plan_with(view2, &defaults(), &[], &[], NOW + 9, &hashes);
        assert!(hashes.is_empty());
    }

    /// The workload as a store keeps it: pruned metadata and its shape.
    fn stored(t: &Observed) -> Observed {
        Observed { workload: Arc::new(Workload::clone(&t.workload).pruned()), ..t.clone() }
    }

    #[test]
    fn a_stored_workload_plans_as_the_whole_object() {
        let s = spec();
        let mut t = selected(workload("cart", &[("OTEL_SERVICE_NAME", "mine"), ("LANG", "C")]));
        let annotations = Arc::make_mut(&mut t.workload).metadata.annotations.get_or_insert_default();
        annotations.insert("kubectl.kubernetes.io/last-applied-configuration".into(), "{...}".into());
        let same = |t: &Observed, now: i64| {
            let whole = plan(view(&s), &defaults(), std::slice::from_ref(t), &[], now);
            assert_eq!(plan(view(&s), &defaults(), &[stored(t)], &[], now), whole);
            whole
        };
        let first = same(&t, NOW);
        t = injected(t, &first.actions);
        let healthy = same(&t, NOW + 5);
        t = injected(t, &healthy.actions);
        assert!(!same(&t, NOW + 6).actions.iter().any(|a| matches!(a, Action::Inject { .. })), "converged");
        full(&mut t).spec.as_mut().unwrap().init_containers = None;
        assert_eq!(same(&t, NOW + 7).drifted, vec![t.workload.key()]);
        let kept = pruned_metadata(&t.workload.metadata);
        assert!(kept.annotations.unwrap().keys().all(|k| k.starts_with("crosstrace.dev/")), "only crosstrace's");
    }

    #[test]
    fn an_unhealthy_batch_is_rolled_back_and_not_retried() {
        let s = spec();
        let t = selected(workload("cart", &[]));
        let first = plan(view(&s), &defaults(), std::slice::from_ref(&t), &[], NOW);
        let mut stuck = injected(t, &first.actions);
        Arc::make_mut(&mut stuck.workload).rolled_out = false;
        let waiting = plan(view(&s), &defaults(), std::slice::from_ref(&stuck), &[], NOW + 30);
        assert_eq!(waiting.report.in_flight, 1);
        let failed = plan(view(&s), &defaults(), std::slice::from_ref(&stuck), &[], NOW + 60);
        assert!(failed.report.stopped);
        assert_eq!(failed.report.problems[0].reason, "RolledBack");
        assert!(failed.report.problems[0].message.contains("shop/cart"));
        assert!(
            failed.actions.iter().any(|a| matches!(a, Action::Remove { rolled_back: Some(m), .. } if m == "shop/3"))
        );

        // Removed, marker left: the same generation does not try again.
        let mut rolled_back = stuck;
        let annotations = Arc::make_mut(&mut rolled_back.workload).metadata.annotations.get_or_insert_default();
        annotations.remove(RECORD_ANNOTATION);
        annotations.insert(ROLLED_BACK_ANNOTATION.into(), "shop/3".into());
        let held = plan(view(&s), &defaults(), std::slice::from_ref(&rolled_back), &[], NOW + 61);
        assert!(held.actions.iter().all(|a| !matches!(a, Action::Inject { .. })));
        assert_eq!(held.report.rolled_back, 1);

        let changed = PolicyView { generation: 4, ..view(&s) };
        let retry = plan(changed, &defaults(), &[rolled_back], &[], NOW + 62);
        assert!(retry.actions.iter().any(|a| matches!(a, Action::Inject { .. })), "a new generation retries");
    }

    #[test]
    fn delete_removes_injections_then_the_config_map() {
        let s = spec();
        let t = selected(workload("cart", &[]));
        let done = injected(t.clone(), &plan(view(&s), &defaults(), &[t], &[], NOW).actions);
        let mut cm = ConfigMap::default();
        cm.metadata.namespace = Some("shop".into());
        let deleting = PolicyView { deleting: true, ..view(&s) };
        let revert = plan(deleting, &defaults(), &[done], &[cm], NOW);
        assert!(matches!(
            revert.actions[..],
            [Action::Remove { rolled_back: None, .. }, Action::DeleteCollectorConfig { .. }]
        ));
        let removal = removal_patch(WorkloadKind::Deployment, &ObjectKey::new("shop", "cart"), None);
        assert_eq!(
            removal,
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "cart", "namespace": "shop"}})
        );
    }

    #[test]
    fn a_workload_leaving_the_selection_is_reverted_and_the_config_map_goes_with_the_last_one() {
        let s = spec();
        let t = selected(workload("cart", &[]));
        let done = injected(t.clone(), &plan(view(&s), &defaults(), &[t], &[], NOW).actions);
        let left = Observed { selected: false, ..done };
        let mut cm = ConfigMap::default();
        cm.metadata.namespace = Some("shop".into());
        let plan = plan(view(&s), &defaults(), &[left], &[cm], NOW);
        assert_eq!(plan.report.selected, 0);
        assert!(matches!(
            plan.actions[..],
            [Action::Remove { rolled_back: None, .. }, Action::DeleteCollectorConfig { .. }]
        ));
    }

    #[test]
    fn older_policy_keeps_a_workload() {
        let s = spec();
        let mut t = selected(workload("cart", &[]));
        t.claimed_by = Some("first".into());
        let plan = plan(view(&s), &defaults(), &[t], &[], NOW);
        assert_eq!(plan.report.problems[0].reason, "Conflict");
        assert!(plan.report.problems[0].message.contains("first"));
        assert!(plan.actions.iter().all(|a| !matches!(a, Action::Inject { .. })));
    }

    #[test]
    fn protected_and_operator_namespaces_never_match() {
        let s = spec();
        let labels = BTreeMap::from([("tracing".to_string(), "enabled".to_string())]);
        let mut w = workload("dns", &[]);
        for ns in ["kube-system", "crosstrace-system", "vault"] {
            w.metadata.namespace = Some(ns.into());
            assert!(!selects(s.workloads.as_ref().unwrap(), &defaults(), &w, Some(&labels)), "{ns}");
        }
        w.metadata.namespace = Some("shop".into());
        assert!(selects(s.workloads.as_ref().unwrap(), &defaults(), &w, Some(&labels)));
        assert!(!selects(s.workloads.as_ref().unwrap(), &defaults(), &w, None));
    }

    #[test]
    fn without_native_sidecars_the_collector_is_a_plain_container() {
        let s = spec();
        let legacy = Defaults { native_sidecars: false, ..defaults() };
        let plan = plan(view(&s), &legacy, &[selected(workload("cart", &[]))], &[], NOW);
        let Some(Action::Inject { patch, .. }) = plan.actions.iter().find(|a| matches!(a, Action::Inject { .. }))
        else {
            panic!()
        };
        let pod = &patch["spec"]["template"]["spec"];
        assert!(pod.get("initContainers").is_none());
        assert_eq!(pod["containers"][1]["name"], SIDECAR_NAME);
        assert!(pod["containers"][1].get("restartPolicy").is_none());
    }

    /// A workload as the API server holds it once the injection rolled out and convergence is recorded.
    fn converged(s: &TracingPolicySpec) -> Observed {
        let t = selected(workload("cart", &[]));
        let done = injected(t, &plan(view(s), &defaults(), &[selected(workload("cart", &[]))], &[], NOW).actions);
        injected(done.clone(), &plan(view(s), &defaults(), &[done], &[], NOW + 5).actions)
    }

    #[test]
    fn an_owner_scaling_or_restarting_a_converged_workload_is_reported_never_rolled_back() {
        let s = spec();
        let mut scaled = converged(&s);
        Arc::make_mut(&mut scaled.workload).rolled_out = false;
        let long_after = NOW + 10 * 60;
        let p = plan(view(&s), &defaults(), std::slice::from_ref(&scaled), &[], long_after);
        assert!(p.actions.iter().all(|a| !matches!(a, Action::Remove { .. })), "{:?}", p.actions);
        assert_eq!((p.report.unhealthy, p.report.rolled_back, p.report.stopped), (1, 0, false));
        let problem = &p.report.problems[0];
        assert_eq!(problem.reason, reasons::TARGET_UNHEALTHY);
        assert!(!problem.degraded && problem.message.contains("shop/cart"), "{problem:?}");

        // Its owner's new image crash-loops: still the owner's business.
        Arc::make_mut(&mut scaled.workload).failing = Some("pod cart-2 container app is CrashLoopBackOff".into());
        let p = plan(view(&s), &defaults(), &[scaled], &[], long_after);
        assert!(p.actions.iter().all(|a| !matches!(a, Action::Remove { .. })));
        assert!(p.report.problems[0].message.contains("CrashLoopBackOff"));
    }

    #[test]
    fn pods_of_crosstraces_revision_that_cannot_start_fail_the_batch_before_the_deadline() {
        let s = spec();
        let t = selected(workload("cart", &[]));
        let mut stuck = injected(t.clone(), &plan(view(&s), &defaults(), &[t], &[], NOW).actions);
        Arc::make_mut(&mut stuck.workload).rolled_out = false;
        Arc::make_mut(&mut stuck.workload).failing =
            Some("pod cart-1 container crosstrace-otel-collector is CrashLoopBackOff".into());
        let p = plan(view(&s), &defaults(), &[stuck], &[], NOW + 3);
        assert!(p.report.stopped);
        assert_eq!(p.report.problems[0].reason, reasons::ROLLED_BACK);
        assert!(p.report.problems[0].message.contains("CrashLoopBackOff"), "{:?}", p.report.problems);
        assert!(p.actions.iter().any(|a| matches!(a, Action::Remove { rolled_back: Some(_), .. })));
    }

    #[test]
    fn on_delete_and_paused_workloads_wait_for_their_owner_without_a_deadline() {
        let s = spec();
        for (what, on_delete, paused, reason) in [
            ("OnDelete", true, false, reasons::WAITING_FOR_RESTART),
            ("paused", false, true, reasons::DEPLOYMENT_PAUSED),
        ] {
            let t = selected(workload("cart", &[]));
            let mut held = injected(t.clone(), &plan(view(&s), &defaults(), &[t], &[], NOW).actions);
            Arc::make_mut(&mut held.workload).rolled_out = false;
            Arc::make_mut(&mut held.workload).on_delete = on_delete;
            Arc::make_mut(&mut held.workload).paused = paused;
            let p = plan(view(&s), &defaults(), std::slice::from_ref(&held), &[], NOW + 3600);
            let writes: Vec<_> =
                p.actions.iter().filter(|a| !matches!(a, Action::ApplyCollectorConfig { .. })).collect();
            assert!(writes.is_empty(), "{what}: {writes:?}");
            assert_eq!((p.report.waiting, p.report.rolled_back), (1, 0), "{what}");
            assert_eq!(p.report.problems[0].reason, reason, "{what}");

            // The owner recreates the pods (or resumes): healthy, and convergence is recorded.
            Arc::make_mut(&mut held.workload).rolled_out = true;
            let p = plan(view(&s), &defaults(), &[held], &[], NOW + 3601);
            assert_eq!(p.report.ready, 1, "{what}");
            assert!(matches!(p.actions[..], [Action::ApplyCollectorConfig { .. }, Action::Inject { .. }]), "{what}");
        }
    }

    #[test]
    fn a_resumed_deployment_gets_the_whole_deadline_from_its_resumption() {
        let s = spec();
        let t = selected(workload("cart", &[]));
        let mut resumed = injected(t.clone(), &plan(view(&s), &defaults(), &[t], &[], NOW).actions);
        Arc::make_mut(&mut resumed.workload).rolled_out = false;
        Arc::make_mut(&mut resumed.workload).resumed_at = Some(NOW + 3000);
        let p = plan(view(&s), &defaults(), &[resumed], &[], NOW + 3010);
        assert_eq!((p.report.in_flight, p.report.rolled_back), (1, 0));
    }

    #[test]
    fn the_older_policy_takes_over_what_a_newer_one_injected_first_and_the_newer_gives_way() {
        let s = spec();
        // "b" was reconciled first (created in the same second as "a", before "a" was seen) and injected.
        let b = PolicyView { uid: "uid-b", generation: 1, ..PolicyView::new("b", &s) };
        let t = selected(workload("cart", &[]));
        let by_b = injected(t.clone(), &plan(b, &defaults(), &[t], &[], NOW).actions);

        let older_than_a = BTreeSet::new();
        let a = PolicyView { uid: "uid-a", generation: 1, older: &older_than_a, ..PolicyView::new("a", &s) };
        let takeover = plan(a, &defaults(), std::slice::from_ref(&by_b), &[], NOW + 1);
        let Some(Action::Inject { patch, .. }) = takeover.actions.iter().find(|x| matches!(x, Action::Inject { .. }))
        else {
            panic!("{:?}", takeover.actions)
        };
        let record: Record =
            serde_json::from_str(patch["metadata"]["annotations"][RECORD_ANNOTATION].as_str().unwrap()).unwrap();
        assert_eq!(record.policy, "a");
        assert!(takeover.report.problems.is_empty(), "{:?}", takeover.report.problems);

        // "b", now seeing "a" as older and holding the target: Conflict, no write, whoever wrote last.
        let by_a = injected(by_b, &takeover.actions);
        let older_than_b = BTreeSet::from(["a".to_string()]);
        let b = PolicyView { older: &older_than_b, ..b };
        for t in [by_a.clone(), Observed { claimed_by: Some("a".into()), ..by_a }] {
            let p = plan(b, &defaults(), &[t], &[], NOW + 2);
            assert!(p.actions.iter().all(|x| !matches!(x, Action::Inject { .. } | Action::Remove { .. })));
            assert_eq!(p.report.problems[0].reason, reasons::CONFLICT);
        }
    }
}
