//! The Gateway API edge layer: the edge after ingress-nginx.
//!
//! Every selected `gateway.networking.k8s.io/v1` Gateway is a target; its provider, the GatewayClass's
//! `spec.controllerName`, decides what tracing is written:
//!
//! - **Envoy Gateway**: `EnvoyProxy.spec.telemetry.tracing` (OpenTelemetry provider, `samplingFraction`
//!   exactly from the ratio). An EnvoyProxy the Gateway already names in `spec.infrastructure.parametersRef`
//!   gets the field merged in (its value before is recorded and restored exactly); otherwise crosstrace
//!   creates its own EnvoyProxy beside the Gateway and points the Gateway at it (with
//!   `mergeType: StrategicMerge`, so that the GatewayClass's own EnvoyProxy settings stay in force).
//! - **NGINX Gateway Fabric**: an `NginxProxy` with the telemetry exporter (the same merge-or-own rule),
//!   and one `ObservabilityPolicy` per HTTPRoute and GRPCRoute attached to the Gateway, since NGF traces
//!   only the routes that have one.
//! - **Istio**: a `Telemetry` beside the Gateway, `targetRefs` to it, with the tracing provider the
//!   operator is configured with (`--istio-tracing-provider`; the MeshConfig is the mesh admin's).
//!
//! The plan is pure and goes through the shared rollout engine ([`rollout::judge`], [`super::follow`],
//! [`super::schedule`], [`super::claim`]). What crosstrace must restore lives in a ledger ConfigMap in
//! the operator's namespace, keyed by the Gateway's UID and written before anything it records; nothing
//! the Gateway's owner can edit chooses which object crosstrace writes or deletes. A Gateway is healthy
//! when its controller reports it `Accepted` and `Programmed` for its current generation, and the policy
//! objects crosstrace wrote are accepted for the generation crosstrace wrote.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::rollout::{self, Health, Written};
use super::{LayerReport, ObjectKey, PolicyView, Progress, reasons};
use crate::api::{GatewaySpec, SamplingSpec};

/// Where the gateway layer keeps its [`Record`]s: a ConfigMap in the operator's namespace, one entry per
/// Gateway, keyed by its UID.
pub const LEDGER: &str = "crosstrace-gateway-records";
/// Label of the ledger ConfigMap.
pub const LEDGER_LABEL: &str = "crosstrace.dev/gateway-ledger";
/// Label on every object the gateway layer created, valued with the policy name.
pub const POLICY_LABEL: &str = "crosstrace.dev/gateway-policy";

/// The `spec.controllerName` of each supported provider's GatewayClass.
pub const ENVOY_GATEWAY: &str = "gateway.envoyproxy.io/gatewayclass-controller";
pub const NGINX_GATEWAY_FABRIC: &str = "gateway.nginx.org/nginx-gateway-controller";
pub const ISTIO: &str = "istio.io/gateway-controller";

/// The Gateway API group.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// A kind of object the layer reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Gateway,
    GatewayClass,
    HTTPRoute,
    GRPCRoute,
    EnvoyProxy,
    NginxProxy,
    ObservabilityPolicy,
    Telemetry,
}

impl Kind {
    /// Group, version, plural of the kind.
    fn gvp(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Kind::Gateway => (GATEWAY_GROUP, "v1", "gateways"),
            Kind::GatewayClass => (GATEWAY_GROUP, "v1", "gatewayclasses"),
            Kind::HTTPRoute => (GATEWAY_GROUP, "v1", "httproutes"),
            Kind::GRPCRoute => (GATEWAY_GROUP, "v1", "grpcroutes"),
            Kind::EnvoyProxy => ("gateway.envoyproxy.io", "v1alpha1", "envoyproxies"),
            Kind::NginxProxy => ("gateway.nginx.org", "v1alpha2", "nginxproxies"),
            Kind::ObservabilityPolicy => ("gateway.nginx.org", "v1alpha2", "observabilitypolicies"),
            Kind::Telemetry => ("telemetry.istio.io", "v1", "telemetries"),
        }
    }

    pub fn group(self) -> &'static str {
        self.gvp().0
    }

    /// `group/version`.
    pub fn api_version(self) -> String {
        let (group, version, _) = self.gvp();
        format!("{group}/{version}")
    }

    pub fn plural(self) -> &'static str {
        self.gvp().2
    }

    /// The kind for the dynamic API.
    pub fn api_resource(self) -> ApiResource {
        let (group, version, plural) = self.gvp();
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: self.api_version(),
            kind: format!("{self:?}"),
            plural: plural.into(),
        }
    }
}

/// One namespaced object of a [`Kind`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ref {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl Ref {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        Self { kind, namespace: namespace.into(), name: name.into() }
    }
}

impl std::fmt::Display for Ref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Which provider runs a Gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Provider {
    EnvoyGateway,
    NginxGatewayFabric,
    Istio,
}

impl Provider {
    pub fn of(controller_name: &str) -> Option<Self> {
        match controller_name {
            ENVOY_GATEWAY => Some(Provider::EnvoyGateway),
            NGINX_GATEWAY_FABRIC => Some(Provider::NginxGatewayFabric),
            ISTIO => Some(Provider::Istio),
            _ => None,
        }
    }

    /// The kinds this provider's tracing needs served by the API server.
    pub fn kinds(self) -> &'static [Kind] {
        match self {
            Provider::EnvoyGateway => &[Kind::EnvoyProxy],
            Provider::NginxGatewayFabric => &[Kind::NginxProxy, Kind::ObservabilityPolicy],
            Provider::Istio => &[Kind::Telemetry],
        }
    }

    /// The parameters kind a Gateway of this provider names in `spec.infrastructure.parametersRef`.
    fn parameters(self) -> Option<Kind> {
        match self {
            Provider::EnvoyGateway => Some(Kind::EnvoyProxy),
            Provider::NginxGatewayFabric => Some(Kind::NginxProxy),
            Provider::Istio => None,
        }
    }
}

/// A field crosstrace set in an object it did not create, and what was there before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Merged {
    pub target: Ref,
    /// Path of the field from the object's root, e.g. `["spec", "telemetry", "tracing"]`.
    pub path: Vec<String>,
    /// Its value before (`None`: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<Value>,
    /// How many of the path's parents (from the deepest) did not exist before, and go again on revert
    /// when nothing else is in them.
    #[serde(default)]
    pub absent_parents: usize,
}

/// What a Gateway's `spec.infrastructure` held before crosstrace pointed it at its own parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OriginalInfrastructure {
    /// `spec.infrastructure` existed.
    pub existed: bool,
    /// Its `parametersRef` (`None`: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters_ref: Option<Value>,
}

/// What the gateway layer did to one Gateway, recorded in the ledger before each change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub policy: String,
    pub gateway: ObjectKey,
    /// Hash of the tracing crosstrace wrote ([`super::hash_of`]); `None`: nothing is written (a
    /// rollback marker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Unix seconds when the revision was written: the start of its progress deadline.
    #[serde(default)]
    pub since: i64,
    /// The revision was seen healthy once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub converged: bool,
    /// Objects crosstrace created: deleted on revert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<Ref>,
    /// Fields crosstrace set in others' objects: restored on revert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<Merged>,
    /// The Gateway's infrastructure before crosstrace pointed it elsewhere: restored on revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infrastructure: Option<OriginalInfrastructure>,
    /// The policy generation whose revision was rolled back: not retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<i64>,
    /// Why it was rolled back, for the condition that reports it while it is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl super::Owned for Record {
    fn policy(&self) -> &str {
        &self.policy
    }
}

impl Record {
    fn new(policy: &str, gateway: ObjectKey) -> Self {
        Self {
            policy: policy.into(),
            gateway,
            revision: None,
            since: 0,
            converged: false,
            created: vec![],
            merged: vec![],
            infrastructure: None,
            rolled_back: None,
            failure: None,
        }
    }
}

/// One change, in the order given.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Write (`Some`) or remove (`None`) the ledger entry of the Gateway with this UID.
    Record { uid: String, record: Option<Record> },
    /// Server-side apply of an object crosstrace owns (the whole object, labelled with the policy).
    Apply { target: Ref, body: Value },
    /// JSON merge patch of an object crosstrace does not own; with `resource_version`, only while the
    /// object is as observed (a conflict retries the reconcile).
    Patch { target: Ref, patch: Value, resource_version: Option<String> },
    /// Delete an object crosstrace created (gone is fine).
    Delete { target: Ref },
}

/// A GatewayClass as far as the layer cares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Class {
    pub controller_name: String,
    /// Its `spec.parametersRef`, if any.
    pub parameters_ref: Option<Value>,
}

/// A route attached to a Gateway (NGF).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub kind: Kind,
    pub key: ObjectKey,
}

/// One Gateway (or one this policy's ledger names) as observed.
#[derive(Clone, Debug)]
pub struct Observed {
    pub key: ObjectKey,
    pub uid: String,
    /// The Gateway; `None` when it is gone (its ledger entry is still reverted).
    pub gateway: Option<DynamicObject>,
    /// Its GatewayClass; `None` when it does not exist.
    pub class: Option<Class>,
    /// Matches `spec.gateway` now.
    pub selected: bool,
    /// An older policy that also selects this Gateway and therefore keeps it.
    pub claimed_by: Option<String>,
    pub record: Result<Option<Record>, String>,
    /// Every object the plan may touch, as it is now (absent: not found).
    pub objects: BTreeMap<Ref, DynamicObject>,
    /// The provider kinds the API server serves.
    pub installed: BTreeSet<Kind>,
    /// NGF: routes attached to the Gateway.
    pub routes: Vec<Route>,
    /// Tracing policies of others on the same targets (GEP-713): reported, never fought.
    pub others: Vec<Ref>,
}

impl Default for Observed {
    fn default() -> Self {
        Self {
            key: ObjectKey::new("", ""),
            uid: String::new(),
            gateway: None,
            class: None,
            selected: false,
            claimed_by: None,
            record: Ok(None),
            objects: BTreeMap::new(),
            installed: BTreeSet::new(),
            routes: vec![],
            others: vec![],
        }
    }
}

/// What the operator's configuration adds to the layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The Istio tracing provider (a MeshConfig `extensionProviders` name) Telemetry objects name.
    pub istio_provider: Option<String>,
}

/// The plan for the gateway layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub report: LayerReport,
    /// Gateways whose tracing someone else changed after crosstrace wrote it; the plan writes it again.
    pub drifted: Vec<ObjectKey>,
}

/// `numerator/denominator` of a decimal ratio string, exactly and in lowest terms: "0.25" → 1/4,
/// "0.333" → 333/1000, "1" → 1/1, "0" → 0/1. The API server has validated the form (at most 6 decimals).
pub fn fraction(ratio: &str) -> (u32, u32) {
    let (int, frac) = ratio.split_once('.').unwrap_or((ratio, ""));
    let denominator = 10u32.pow(u32::try_from(frac.len()).unwrap_or(0).min(6));
    let digits = format!("{}{}", if int.is_empty() { "0" } else { int }, &frac[..frac.len().min(6)]);
    let numerator: u32 = digits.parse().unwrap_or(0);
    let divisor = gcd(numerator, denominator).max(1);
    (numerator / divisor, denominator / divisor)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The ratio as a percentage, exactly as a decimal ("0.333" → 33.3).
pub fn percent(ratio: &str) -> f64 {
    let (numerator, denominator) = fraction(ratio);
    f64::from(numerator) * 100.0 / f64::from(denominator)
}

/// The ratio as an integer percent (NGF), rounded half up, and whether that rounded it.
pub fn integer_percent(ratio: &str) -> (u32, bool) {
    let (numerator, denominator) = fraction(ratio);
    let hundredfold = u64::from(numerator) * 100;
    let rounded = (hundredfold + u64::from(denominator) / 2) / u64::from(denominator);
    (u32::try_from(rounded).unwrap_or(100), hundredfold % u64::from(denominator) != 0)
}

/// The collector endpoint as an Envoy Gateway backendRef when it is a Service's DNS name
/// (`<svc>.<ns>.svc[.cluster.local]:port`), else as host and port.
fn envoy_collector(endpoint: &str) -> Value {
    let (host, port) = endpoint.rsplit_once(':').unwrap_or((endpoint, "4317"));
    let port: u16 = port.parse().unwrap_or(4317);
    let labels: Vec<&str> = host.split('.').collect();
    match labels[..] {
        [svc, ns, "svc"] | [svc, ns, "svc", "cluster", "local"] => {
            json!({"backendRefs": [{"name": svc, "namespace": ns, "port": port}]})
        }
        _ => json!({"host": host.trim_start_matches('[').trim_end_matches(']'), "port": port}),
    }
}

/// `EnvoyProxy.spec.telemetry.tracing` for a policy. Envoy samples with `samplingFraction` only "if no
/// prior sampling decision has been made": an incoming sampled parent is always followed, i.e. Envoy is
/// parent-based whatever `spec.sampling.parentBased` says (reported as a warning when it is false).
pub fn envoy_tracing(endpoint: &str, sampling: &SamplingSpec, gateway: &GatewaySpec) -> Value {
    let (numerator, denominator) = fraction(&sampling.ratio);
    let mut provider = json!({"type": "OpenTelemetry", "serviceName": gateway.service_name});
    if let (Some(p), Value::Object(collector)) = (provider.as_object_mut(), envoy_collector(endpoint)) {
        p.extend(collector);
    }
    json!({
        "provider": provider,
        "samplingFraction": {"numerator": numerator, "denominator": denominator},
    })
}

/// `NginxProxy.spec.telemetry` for a policy: the exporter endpoint and service name.
pub fn nginx_telemetry(endpoint: &str, gateway: &GatewaySpec) -> Value {
    json!({"exporter": {"endpoint": endpoint}, "serviceName": gateway.service_name})
}

/// The ObservabilityPolicy `spec.tracing`: NGF's ratio is an integer percent. A parent-based policy
/// propagates the incoming context (NGF continues the incoming trace, samples by the ratio).
pub fn nginx_tracing(sampling: &SamplingSpec) -> Value {
    let (ratio, _) = integer_percent(&sampling.ratio);
    let context = if sampling.parent_based { "propagate" } else { "inject" };
    json!({"strategy": "ratio", "ratio": ratio, "context": context})
}

/// The Istio `Telemetry` spec for one Gateway.
pub fn istio_telemetry(gateway: &str, provider: &str, sampling: &SamplingSpec) -> Value {
    json!({
        "targetRefs": [{"group": GATEWAY_GROUP, "kind": "Gateway", "name": gateway}],
        "tracing": [{"providers": [{"name": provider}], "randomSamplingPercentage": percent(&sampling.ratio)}],
    })
}

/// Name of an object crosstrace creates for `owner` (a Gateway or a route): `crosstrace-<owner>`, cut
/// with a hash when too long for a name.
pub fn owned_name(owner: &str) -> String {
    let name = format!("crosstrace-{owner}");
    if name.len() <= 253 {
        return name;
    }
    let hash = super::hash_of(&json!(owner));
    format!("{}-{hash}", &name[..253 - hash.len() - 1])
}

/// What one Gateway should carry.
#[derive(Clone, Debug, Default, PartialEq)]
struct Desired {
    /// Objects crosstrace owns, whole.
    owned: Vec<(Ref, Value)>,
    /// Fields set in others' objects: (object, path, value).
    merged: Vec<(Ref, Vec<String>, Value)>,
    /// The Gateway's `spec.infrastructure.parametersRef`, when crosstrace points it at its own object.
    point: Option<Value>,
    warnings: Vec<String>,
}

impl Desired {
    fn revision(&self) -> String {
        let merged: Vec<Value> = self.merged.iter().map(|(r, p, v)| json!([r, p, v])).collect();
        let owned: Vec<Value> = self.owned.iter().map(|(r, v)| json!([r, v])).collect();
        super::hash_of(&json!([owned, merged, self.point]))
    }
}

type TargetPlan = super::TargetPlan<Action>;

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, k| v.get(k))
}

fn string_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path).and_then(Value::as_str)
}

/// The object as one JSON value (metadata and the rest).
fn whole(object: &DynamicObject) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// Does `have` hold everything of `want`? (The API server adds defaults; numbers compare by value.)
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w.iter().all(|(k, v)| h.get(k).is_some_and(|hv| contains(hv, v))),
        (Value::Array(h), Value::Array(w)) => h.len() == w.len() && h.iter().zip(w).all(|(a, b)| contains(a, b)),
        (Value::Number(h), Value::Number(w)) => h.as_f64() == w.as_f64(),
        _ => have == want,
    }
}

/// A JSON merge patch (RFC 7386) that turns `from` into exactly `to` (`None`: absent).
pub fn merge_patch(from: Option<&Value>, to: Option<&Value>) -> Value {
    match (from, to) {
        (_, None) => Value::Null,
        (Some(Value::Object(f)), Some(Value::Object(t))) => {
            let mut patch = Map::new();
            for (k, v) in t {
                if f.get(k) != Some(v) {
                    patch.insert(k.clone(), merge_patch(f.get(k), Some(v)));
                }
            }
            for k in f.keys().filter(|k| !t.contains_key(*k)) {
                patch.insert(k.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        (_, Some(Value::Object(t))) => {
            // Nulls inside a new object would be dropped by the merge, so only the object's own values.
            merge_patch(Some(&Value::Object(Map::new())), Some(&Value::Object(t.clone())))
        }
        (_, Some(v)) => v.clone(),
    }
}

/// `patch` nested under `path`.
fn nest(path: &[String], patch: Value) -> Value {
    path.iter().rev().fold(patch, |inner, key| json!({ key: inner }))
}

/// The Gateway's health for the generation it has now (what crosstrace's write made it): `Accepted`
/// and `Programmed` reported by its controller for that generation.
pub fn gateway_health(gateway: &DynamicObject) -> Health {
    let generation = gateway.metadata.generation.unwrap_or(0);
    let conditions = at(&gateway.data, &["status", "conditions"]).and_then(Value::as_array);
    let current = |type_: &str| {
        conditions.into_iter().flatten().find(|c| {
            c.get("type").and_then(Value::as_str) == Some(type_)
                && c.get("observedGeneration").and_then(Value::as_i64) == Some(generation)
        })
    };
    let status = |c: Option<&Value>| c.and_then(|c| c.get("status")).and_then(Value::as_str).map(str::to_string);
    let why = |c: &Value| {
        format!(
            "{}: {}",
            c.get("reason").and_then(Value::as_str).unwrap_or_default(),
            c.get("message").and_then(Value::as_str).unwrap_or_default()
        )
    };
    let accepted = current("Accepted");
    if status(accepted).as_deref() == Some("False") {
        return Health::Failing(format!("is not Accepted by its controller ({})", why(accepted.expect("seen"))));
    }
    let programmed = current("Programmed");
    match (status(accepted).as_deref(), status(programmed).as_deref()) {
        (Some("True"), Some("True")) => Health::Healthy,
        (_, Some("False"))
            if programmed.is_some_and(|c| c.get("reason").and_then(Value::as_str) == Some("Invalid")) =>
        {
            Health::Failing(format!("is not Programmed ({})", why(programmed.expect("seen"))))
        }
        _ => Health::Progressing { resumed_at: None },
    }
}

/// The health of a policy object crosstrace wrote (an ObservabilityPolicy), from the `Accepted`
/// condition its controller put under `status.ancestors` for the Gateway, for the object's current
/// generation (the one crosstrace wrote). A GEP-713 conflict with another policy waits, reported.
fn policy_object_health(object: &DynamicObject, gateway: &ObjectKey) -> Health {
    let generation = object.metadata.generation.unwrap_or(0);
    let ancestors = at(&object.data, &["status", "ancestors"]).and_then(Value::as_array);
    let ours = ancestors.into_iter().flatten().find(|a| {
        string_at(a, &["ancestorRef", "name"]) == Some(gateway.name.as_str())
            && string_at(a, &["ancestorRef", "namespace"]).is_none_or(|n| n == gateway.namespace)
    });
    let accepted = ours.and_then(|a| a.get("conditions")).and_then(Value::as_array).and_then(|cs| {
        cs.iter().find(|c| {
            c.get("type").and_then(Value::as_str) == Some("Accepted")
                && c.get("observedGeneration").and_then(Value::as_i64) == Some(generation)
        })
    });
    let Some(accepted) = accepted else {
        return Health::Progressing { resumed_at: None };
    };
    let reason = accepted.get("reason").and_then(Value::as_str).unwrap_or_default();
    let message = accepted.get("message").and_then(Value::as_str).unwrap_or_default();
    let name = object.name_any();
    match accepted.get("status").and_then(Value::as_str) {
        Some("True") => Health::Healthy,
        _ if reason == "Conflicted" => Health::Waiting {
            reason: reasons::POLICY_CONFLICT,
            message: format!(
                "its controller reports ObservabilityPolicy {name} in conflict with another policy ({message}); reported, not fought"
            ),
        },
        _ => Health::Failing(format!("has ObservabilityPolicy {name} not accepted ({reason}: {message})")),
    }
}

/// Plans the gateway layer: pure, from the policy, the operator's config, what was observed and the time.
pub fn plan(policy: PolicyView<'_>, config: &Config, observed: &[Observed], now: i64) -> Plan {
    let active = !policy.deleting && policy.spec.gateway.is_some();
    let mut plan = Plan::default();
    let mut targets: Vec<&Observed> = observed.iter().collect();
    targets.sort_by(|a, b| a.key.cmp(&b.key));
    let mut per_target = Vec::new();
    for t in targets {
        let record = t.record.clone();
        let ours = matches!(&record, Ok(Some(r)) if r.policy == policy.name);
        if !(active && t.selected && t.gateway.is_some()) {
            if ours {
                let record = record.ok().flatten().expect("ours");
                plan.actions.extend(revert(t, &record, None));
            }
            continue;
        }
        plan.report.selected += 1;
        per_target.push(forward(policy, config, t, record, now, &mut plan));
    }
    plan.actions.extend(super::schedule(per_target, &policy.spec.rollout, &mut plan.report));
    plan
}

/// The forward plan of one selected Gateway.
fn forward(
    policy: PolicyView<'_>,
    config: &Config,
    t: &Observed,
    record: Result<Option<Record>, String>,
    now: i64,
    plan: &mut Plan,
) -> TargetPlan {
    let what = format!("Gateway {}", t.key);
    let record = match super::claim(record, &what, policy, t.claimed_by.as_deref()) {
        Ok(super::Claim::Free) => None,
        Ok(super::Claim::Ours(r)) => Some(r),
        Ok(super::Claim::Inherited(r)) => Some(Record { policy: policy.name.to_string(), ..r }),
        Err(held) => return held,
    };
    if let Some(r) = record.as_ref().filter(|r| r.revision.is_none() && r.rolled_back == Some(policy.generation)) {
        let mut held = super::held_rolled_back(&what);
        if let (Some(problem), Some(failure)) = (held.problem.as_mut(), &r.failure) {
            problem.message = format!("{failure}; change the policy to retry");
        }
        return held;
    }
    let gateway = t.gateway.as_ref().expect("a selected target has its Gateway");
    let Some(class) = &t.class else {
        let class = string_at(&gateway.data, &["spec", "gatewayClassName"]).unwrap_or_default();
        return TargetPlan::problem(
            Progress::Held,
            reasons::TARGET_NOT_AVAILABLE,
            format!("{what}: its GatewayClass {class} does not exist"),
            false,
        );
    };
    let Some(provider) = Provider::of(&class.controller_name) else {
        return TargetPlan::problem(
            Progress::Held,
            reasons::UNSUPPORTED_PROVIDER,
            format!(
                "{what}: its GatewayClass's controllerName {} is not one crosstrace traces (Envoy Gateway, NGINX Gateway Fabric, Istio); nothing is written",
                class.controller_name
            ),
            false,
        );
    };
    if let Some(kind) = provider.kinds().iter().find(|k| !t.installed.contains(k)) {
        return TargetPlan::problem(
            Progress::Held,
            reasons::PROVIDER_NOT_INSTALLED,
            format!("{what}: {provider:?} needs {kind:?} ({}), which this cluster does not serve", kind.api_version()),
            false,
        );
    }
    let desired = match desire(policy, config, t, provider, class) {
        Ok(d) => d,
        Err((reason, message)) => {
            return TargetPlan::problem(Progress::Held, reason, format!("{what}: {message}"), false);
        }
    };
    for warning in &desired.warnings {
        plan.report.warnings.push(format!("{}: {warning}", t.key));
    }
    for other in &t.others {
        plan.report.warnings.push(format!(
            "{}: {other} also configures tracing for it (GEP-713 policy attachment); reported, not fought",
            t.key
        ));
    }
    // Objects crosstrace would create must not be someone else's already.
    for (target, _) in &desired.owned {
        let created = record.as_ref().is_some_and(|r| r.created.contains(target));
        let labelled = t.objects.get(target).map(|o| o.labels().get(POLICY_LABEL).cloned());
        if let Some(label) = labelled
            && !created
            && label.as_deref() != Some(policy.name)
        {
            return TargetPlan::problem(
                Progress::Held,
                reasons::NAME_TAKEN,
                format!("{what}: {target} exists and crosstrace did not create it; nothing is written"),
                true,
            );
        }
    }

    let revision = desired.revision();
    let intact = intact(t, &desired);
    let written = record.as_ref().and_then(|r| r.revision.as_ref().map(|rev| (r, rev))).map(|(r, rev)| Written {
        current: *rev == revision,
        intact,
        converged: r.converged,
        since: r.since,
    });
    let health = health(t, &desired, gateway);
    let step = rollout::judge(written, &health, now, i64::from(policy.spec.rollout.progress_deadline_seconds));
    if step == rollout::Step::Reapply {
        plan.drifted.push(t.key.clone());
    }
    let base = record.clone().unwrap_or_else(|| Record::new(policy.name, t.key.clone()));
    let inherited = record
        .as_ref()
        .is_some_and(|r| t.record.as_ref().ok().and_then(Option::as_ref).is_some_and(|o| o.policy != r.policy));
    let mut target_plan = super::follow(
        step,
        &what,
        &policy.spec.rollout,
        |converged, _| {
            if converged {
                let next = Record { converged: true, ..base.clone() };
                return vec![Action::Record { uid: t.uid.clone(), record: Some(next) }];
            }
            write(t, &base, &desired, revision.clone(), now)
        },
        || revert(t, &base, Some(policy.generation)),
    );
    if target_plan.rolled_back {
        // The marker keeps why, for the condition while the rollback holds.
        let why = target_plan.problem.as_ref().map(|p| p.message.clone());
        for action in &mut target_plan.actions {
            if let Action::Record { record: Some(marker), .. } = action {
                marker.failure = why.clone();
            }
        }
    }
    if inherited && target_plan.actions.is_empty() {
        target_plan.actions.push(Action::Record { uid: t.uid.clone(), record: Some(base) });
    }
    target_plan
}

/// What the provider's tracing for this Gateway is, or why there is none (reason, message).
fn desire(
    policy: PolicyView<'_>,
    config: &Config,
    t: &Observed,
    provider: Provider,
    class: &Class,
) -> Result<Desired, (&'static str, String)> {
    let spec = policy.spec;
    let gateway_spec = spec.gateway.as_ref().expect("forward is only planned with spec.gateway");
    let endpoint = spec.collector.as_ref().map(|c| c.endpoint.as_str()).unwrap_or_default();
    let namespace = t.key.namespace.as_str();
    let labels = json!({POLICY_LABEL: policy.name});
    let mut desired = Desired::default();
    match provider {
        Provider::EnvoyGateway => {
            // Without mergeType a Gateway's EnvoyProxy replaces the GatewayClass's; StrategicMerge keeps
            // the class's settings and adds the tracing.
            let merge_type =
                if class.parameters_ref.is_some() { json!({"mergeType": "StrategicMerge"}) } else { json!({}) };
            let tracing = envoy_tracing(endpoint, &spec.sampling, gateway_spec);
            parameters(
                t,
                &labels,
                Kind::EnvoyProxy,
                &["spec", "telemetry", "tracing"],
                tracing,
                merge_type,
                &mut desired,
            )?;
            if !spec.sampling.parent_based {
                desired.warnings.push(
                    "Envoy Gateway samples only requests without an incoming sampling decision (parent-based); spec.sampling.parentBased: false cannot be honoured".into(),
                );
            }
        }
        Provider::NginxGatewayFabric => {
            let (host, port) = endpoint.rsplit_once(':').unwrap_or((endpoint, ""));
            if host.starts_with('[') {
                return Err((
                    reasons::PROVIDER_CANNOT_EXPRESS,
                    format!(
                        "NGINX Gateway Fabric's exporter endpoint takes a DNS name or IPv4 address, not {host}:{port}"
                    ),
                ));
            }
            if gateway_spec.service_name.contains('.') || gateway_spec.service_name.len() > 127 {
                return Err((
                    reasons::PROVIDER_CANNOT_EXPRESS,
                    "NGINX Gateway Fabric's serviceName takes letters, digits, '_' and '-' only (at most 127): change spec.gateway.serviceName".into(),
                ));
            }
            let telemetry = nginx_telemetry(endpoint, gateway_spec);
            parameters(t, &labels, Kind::NginxProxy, &["spec", "telemetry"], telemetry, json!({}), &mut desired)?;
            let tracing = nginx_tracing(&spec.sampling);
            let (ratio, rounded) = integer_percent(&spec.sampling.ratio);
            if rounded {
                desired.warnings.push(format!(
                    "NGINX Gateway Fabric samples an integer percent: ratio {} is rounded to {ratio}%",
                    spec.sampling.ratio
                ));
            }
            for route in &t.routes {
                let target = Ref::new(Kind::ObservabilityPolicy, &route.key.namespace, &owned_name(&route.key.name));
                let body = json!({
                    "apiVersion": Kind::ObservabilityPolicy.api_version(),
                    "kind": "ObservabilityPolicy",
                    "metadata": {"name": target.name, "namespace": target.namespace, "labels": labels},
                    "spec": {
                        "targetRefs": [{"group": GATEWAY_GROUP, "kind": format!("{:?}", route.kind), "name": route.key.name}],
                        "tracing": tracing,
                    },
                });
                desired.owned.push((target, body));
            }
        }
        Provider::Istio => {
            let Some(provider_name) = config.istio_provider.as_deref() else {
                return Err((
                    reasons::ISTIO_PROVIDER_MISSING,
                    "the operator has no Istio tracing provider (--istio-tracing-provider, the chart's gateway.istioTracingProvider: a MeshConfig extensionProviders name the mesh admin defines); nothing is written".into(),
                ));
            };
            let target = Ref::new(Kind::Telemetry, namespace, &owned_name(&t.key.name));
            let body = json!({
                "apiVersion": Kind::Telemetry.api_version(),
                "kind": "Telemetry",
                "metadata": {"name": target.name, "namespace": namespace, "labels": labels},
                "spec": istio_telemetry(&t.key.name, provider_name, &spec.sampling),
            });
            desired.owned.push((target, body));
            if !spec.sampling.parent_based {
                desired.warnings.push(
                    "Istio follows an incoming sampling decision (parent-based); spec.sampling.parentBased: false cannot be honoured".into(),
                );
            }
        }
    }
    Ok(desired)
}

/// The provider's parameters object for a Gateway: the one its `spec.infrastructure.parametersRef`
/// already names (not crosstrace's) gets `field` merged in; otherwise crosstrace owns one, `spec` plus
/// the field, and points the Gateway at it.
fn parameters(
    t: &Observed,
    labels: &Value,
    kind: Kind,
    field: &[&str],
    value: Value,
    mut spec: Value,
    desired: &mut Desired,
) -> Result<(), (&'static str, String)> {
    let namespace = t.key.namespace.as_str();
    let own = Ref::new(kind, namespace, &owned_name(&t.key.name));
    let gateway = t.gateway.as_ref().map(|g| &g.data);
    let named = gateway.and_then(|g| at(g, &["spec", "infrastructure", "parametersRef"]));
    // crosstrace's own object, named by the Gateway since crosstrace pointed it there, is not the owner's.
    let named = named.filter(|r| {
        let ours = t.record.as_ref().ok().and_then(Option::as_ref).is_some_and(|rec| rec.created.contains(&own));
        !(ours && r.get("name").and_then(Value::as_str) == Some(own.name.as_str()))
    });
    if let Some(r) = named {
        let text = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default();
        let (group, ref_kind, name) = (text("group"), text("kind"), text("name"));
        if group != kind.group() || ref_kind != format!("{kind:?}") {
            return Err((
                reasons::PARAMETERS_UNSUPPORTED,
                format!("its spec.infrastructure.parametersRef names {group}/{ref_kind} {name}, not a {kind:?}"),
            ));
        }
        let target = Ref::new(kind, namespace, name);
        if !t.objects.contains_key(&target) {
            return Err((
                reasons::PARAMETERS_MISSING,
                format!("its spec.infrastructure.parametersRef names {target}, which does not exist"),
            ));
        }
        desired.merged.push((target, field.iter().map(|s| s.to_string()).collect(), value));
        return Ok(());
    }
    let nested = field[1..].iter().rev().fold(value, |inner, key| json!({ *key: inner }));
    if let (Some(s), Value::Object(n)) = (spec.as_object_mut(), nested) {
        s.extend(n);
    }
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{kind:?}"),
        "metadata": {"name": own.name, "namespace": namespace, "labels": labels},
        "spec": spec,
    });
    desired.point = Some(json!({"group": kind.group(), "kind": format!("{kind:?}"), "name": own.name}));
    desired.owned.push((own, body));
    Ok(())
}

/// Is every part of the desired tracing in place?
fn intact(t: &Observed, desired: &Desired) -> bool {
    let owned = desired
        .owned
        .iter()
        .all(|(target, body)| t.objects.get(target).is_some_and(|o| contains(&o.data, &json!({"spec": body["spec"]}))));
    let merged = desired.merged.iter().all(|(target, path, value)| {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        t.objects.get(target).is_some_and(|o| at(&whole(o), &path).is_some_and(|v| contains(v, value)))
    });
    let pointed = desired.point.as_ref().is_none_or(|want| {
        let gateway = t.gateway.as_ref().map(|g| &g.data);
        gateway.and_then(|g| at(g, &["spec", "infrastructure", "parametersRef"])).is_some_and(|r| contains(r, want))
    });
    owned && merged && pointed
}

/// The Gateway's health, then that of the policy objects crosstrace wrote that report one.
fn health(t: &Observed, desired: &Desired, gateway: &DynamicObject) -> Health {
    let gateway_health = gateway_health(gateway);
    if gateway_health != Health::Healthy {
        return gateway_health;
    }
    for (target, _) in desired.owned.iter().filter(|(r, _)| r.kind == Kind::ObservabilityPolicy) {
        let Some(object) = t.objects.get(target) else {
            return Health::Progressing { resumed_at: None };
        };
        let h = policy_object_health(object, &t.key);
        if h != Health::Healthy {
            return h;
        }
    }
    Health::Healthy
}

/// The writes of a (new) revision: the record first (with everything to restore), then the owned
/// objects, the merged fields, and the Gateway's parametersRef last (it then names what exists);
/// objects crosstrace created before and wants no more go after.
fn write(t: &Observed, base: &Record, desired: &Desired, revision: String, now: i64) -> Vec<Action> {
    let mut record =
        Record { revision: Some(revision), since: now, converged: false, rolled_back: None, ..base.clone() };
    for (target, _) in &desired.owned {
        if !record.created.contains(target) {
            record.created.push(target.clone());
        }
    }
    for (target, path, _) in &desired.merged {
        if record.merged.iter().any(|m| m.target == *target && m.path == *path) {
            continue;
        }
        let object = t.objects.get(target).map(whole).unwrap_or(Value::Null);
        let keys: Vec<&str> = path.iter().map(String::as_str).collect();
        let absent_parents = (1..keys.len()).rev().take_while(|n| at(&object, &keys[..*n]).is_none()).count();
        record.merged.push(Merged {
            target: target.clone(),
            path: path.clone(),
            original: at(&object, &keys).cloned(),
            absent_parents,
        });
    }
    let gateway = t.gateway.as_ref().map(|g| &g.data);
    if desired.point.is_none() {
        // crosstrace no longer points the Gateway anywhere (its owner named parameters of their own):
        // nothing of the Gateway is crosstrace's to restore.
        record.infrastructure = None;
    }
    if desired.point.is_some() && record.infrastructure.is_none() {
        let infrastructure = gateway.and_then(|g| at(g, &["spec", "infrastructure"]));
        record.infrastructure = Some(OriginalInfrastructure {
            existed: infrastructure.is_some(),
            parameters_ref: infrastructure.and_then(|i| i.get("parametersRef")).cloned(),
        });
    }
    let stale: Vec<Ref> =
        record.created.iter().filter(|c| !desired.owned.iter().any(|(o, _)| o == *c)).cloned().collect();
    let mut actions = vec![Action::Record { uid: t.uid.clone(), record: Some(record.clone()) }];
    for (target, body) in &desired.owned {
        actions.push(Action::Apply { target: target.clone(), body: body.clone() });
    }
    for (target, path, value) in &desired.merged {
        let keys: Vec<&str> = path.iter().map(String::as_str).collect();
        let object = t.objects.get(target);
        let current = object.map(whole);
        let patch = merge_patch(current.as_ref().and_then(|o| at(o, &keys)), Some(value));
        actions.push(Action::Patch {
            target: target.clone(),
            patch: nest(path, patch),
            resource_version: object.and_then(|o| o.metadata.resource_version.clone()),
        });
    }
    if let Some(point) = &desired.point {
        let current = gateway.and_then(|g| at(g, &["spec", "infrastructure", "parametersRef"]));
        if current != Some(point) {
            actions.push(Action::Patch {
                target: Ref::new(Kind::Gateway, &t.key.namespace, &t.key.name),
                patch: json!({"spec": {"infrastructure": {"parametersRef": merge_patch(current, Some(point))}}}),
                resource_version: None,
            });
        }
    }
    if !stale.is_empty() {
        for target in &stale {
            actions.push(Action::Delete { target: target.clone() });
        }
        record.created.retain(|c| !stale.contains(c));
        actions.push(Action::Record { uid: t.uid.clone(), record: Some(record) });
    }
    actions
}

/// Everything that puts one Gateway back as recorded: its parametersRef first (so that it names
/// nothing crosstrace deletes), then the objects crosstrace created, then the merged fields, and the
/// ledger entry last (a rollback leaves a marker entry instead), so that a crash halfway leaves enough
/// to finish the job.
fn revert(t: &Observed, record: &Record, rolled_back: Option<i64>) -> Vec<Action> {
    let mut actions = Vec::new();
    let gateway = t.gateway.as_ref().map(|g| &g.data);
    if let (Some(original), Some(g)) = (&record.infrastructure, gateway) {
        let infrastructure = at(g, &["spec", "infrastructure"]);
        let current = infrastructure.and_then(|i| i.get("parametersRef"));
        // Only while the Gateway still names crosstrace's object: a parametersRef its owner set since is theirs.
        let names_ours = current.and_then(|r| r.get("name")).and_then(Value::as_str).is_some_and(|name| {
            record
                .created
                .iter()
                .any(|c| c.name == name && c.namespace == t.key.namespace && c.kind != Kind::ObservabilityPolicy)
        });
        let only_ref =
            infrastructure.and_then(Value::as_object).is_some_and(|i| i.keys().all(|k| k == "parametersRef"));
        let patch = if !names_ours {
            None
        } else if !original.existed && only_ref {
            Some(json!({"spec": {"infrastructure": null}}))
        } else if current != original.parameters_ref.as_ref() {
            let patch = merge_patch(current, original.parameters_ref.as_ref());
            Some(json!({"spec": {"infrastructure": {"parametersRef": patch}}}))
        } else {
            None
        };
        if let Some(patch) = patch {
            let target = Ref::new(Kind::Gateway, &t.key.namespace, &t.key.name);
            actions.push(Action::Patch { target, patch, resource_version: None });
        }
    }
    for target in &record.created {
        if t.objects.contains_key(target) {
            actions.push(Action::Delete { target: target.clone() });
        }
    }
    for merged in &record.merged {
        let Some(object) = t.objects.get(&merged.target) else { continue };
        let object_json = whole(object);
        let keys: Vec<&str> = merged.path.iter().map(String::as_str).collect();
        let current = at(&object_json, &keys);
        if current == merged.original.as_ref() {
            continue;
        }
        // The deepest parent that did not exist before and holds nothing else now goes as a whole.
        let mut cut = keys.len();
        for depth in (keys.len() - merged.absent_parents..keys.len()).rev() {
            let parent = at(&object_json, &keys[..depth]).and_then(Value::as_object);
            if merged.original.is_none() && parent.is_some_and(|p| p.len() == 1 && p.contains_key(keys[depth])) {
                cut = depth;
            } else {
                break;
            }
        }
        let patch = if cut < keys.len() {
            nest(&merged.path[..cut], Value::Null)
        } else {
            nest(&merged.path, merge_patch(current, merged.original.as_ref()))
        };
        actions.push(Action::Patch {
            target: merged.target.clone(),
            patch,
            resource_version: object.metadata.resource_version.clone(),
        });
    }
    let keep = rolled_back.map(|generation| Record {
        revision: None,
        since: 0,
        converged: false,
        created: vec![],
        merged: vec![],
        infrastructure: None,
        rolled_back: Some(generation),
        failure: None,
        ..record.clone()
    });
    if keep.is_some() || t.record.as_ref().is_ok_and(Option::is_some) {
        actions.push(Action::Record { uid: t.uid.clone(), record: keep });
    }
    actions
}

/// The selector of `spec.gateway` (absent = everything).
pub fn gateway_selector(spec: &GatewaySpec) -> Result<kube::core::Selector, String> {
    spec.selector.as_ref().map_or_else(|| Ok(kube::core::Selector::default()), super::selector)
}

/// Does `spec.gateway` of a policy select this Gateway?
pub fn selects(spec: &GatewaySpec, gateway: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    (spec.namespace.is_empty() || gateway.namespace.as_deref() == Some(spec.namespace.as_str()))
        && gateway_selector(spec).is_ok_and(|s| super::matches(&s, gateway.labels.as_ref()))
}

/// The ledger's entries by Gateway UID (an entry that cannot be read is kept as its error).
pub fn ledger_entries(ledger: Option<&ConfigMap>) -> BTreeMap<String, Result<Record, String>> {
    let data = ledger.and_then(|cm| cm.data.as_ref());
    data.into_iter()
        .flatten()
        .map(|(uid, raw)| {
            (uid.clone(), serde_json::from_str(raw).map_err(|e| format!("its ledger entry is unreadable: {e}")))
        })
        .collect()
}

/// Is this kind served by the API server? A missing API group or version is not an error: the
/// layer reports it.
pub async fn served(client: &Client, kind: Kind) -> Result<bool, kube::Error> {
    Ok(served_of(client, &[kind]).await?.contains(&kind))
}

/// Which of `kinds` the API server serves, with one discovery request per group version.
pub async fn served_of(client: &Client, kinds: &[Kind]) -> Result<BTreeSet<Kind>, kube::Error> {
    let mut by_version: BTreeMap<String, Vec<Kind>> = BTreeMap::new();
    for kind in kinds {
        by_version.entry(kind.api_version()).or_default().push(*kind);
    }
    let mut served = BTreeSet::new();
    for (api_version, kinds) in by_version {
        let resources = match client.list_api_group_resources(&api_version).await {
            Ok(list) => list.resources,
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => return Err(e),
        };
        served.extend(kinds.into_iter().filter(|k| resources.iter().any(|r| r.name == k.plural())));
    }
    Ok(served)
}

fn api(client: &Client, kind: Kind, namespace: &str) -> Api<DynamicObject> {
    let resource = kind.api_resource();
    if namespace.is_empty() {
        Api::all_with(client.clone(), &resource)
    } else {
        Api::namespaced_with(client.clone(), namespace, &resource)
    }
}

/// What observation found beyond the Gateways: whether the Gateway API is served at all.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    pub targets: Vec<Observed>,
    /// The Gateway API is not installed (only reported when the policy asks for `spec.gateway`).
    pub not_installed: bool,
}

/// The Gateways the layer must look at for a policy: those `spec.gateway` selects, and those its ledger
/// entries name (which may have left the selection, or be gone); with everything their plans read.
pub async fn observe(
    client: &Client,
    policy: PolicyView<'_>,
    operator_namespace: &str,
    protected: impl Fn(&str) -> bool,
    claimant: impl Fn(&DynamicObject) -> Option<String>,
) -> Result<Observation, super::ObserveError> {
    let ledger = Api::<ConfigMap>::namespaced(client.clone(), operator_namespace).get_opt(LEDGER).await?;
    let entries = ledger_entries(ledger.as_ref());
    let mine: Vec<(&String, &Record)> = entries
        .iter()
        .filter_map(|(uid, r)| r.as_ref().ok().map(|r| (uid, r)))
        .filter(|(_, r)| r.policy == policy.name)
        .collect();
    let wanted = policy.spec.gateway.as_ref().filter(|_| !policy.deleting);
    if wanted.is_none() && mine.is_empty() {
        return Ok(Observation::default());
    }
    use Kind::*;
    let installed =
        served_of(client, &[Gateway, HTTPRoute, GRPCRoute, EnvoyProxy, NginxProxy, ObservabilityPolicy, Telemetry])
            .await?;
    if !installed.contains(&Gateway) {
        // No Gateway API: nothing can be selected, and nothing recorded can be reverted but the ledger.
        let targets = mine
            .iter()
            .map(|(uid, r)| Observed {
                key: r.gateway.clone(),
                uid: (*uid).clone(),
                record: Ok(Some((*r).clone())),
                ..Default::default()
            })
            .collect();
        return Ok(Observation { targets, not_installed: wanted.is_some() });
    }
    let mut found: BTreeMap<String, Observed> = BTreeMap::new();
    if let Some(spec) = wanted {
        let selector = gateway_selector(spec).map_err(super::ObserveError::selector("spec.gateway.selector"))?;
        let params = ListParams::default().labels_from(&selector);
        for g in api(client, Kind::Gateway, &spec.namespace).list(&params).await?.items {
            if protected(g.metadata.namespace.as_deref().unwrap_or_default()) {
                continue;
            }
            let uid = g.uid().unwrap_or_default();
            let claimed_by = claimant(&g);
            let key = ObjectKey::of(&g.metadata);
            found.insert(
                uid.clone(),
                Observed { key, uid, gateway: Some(g), selected: true, claimed_by, ..Default::default() },
            );
        }
    }
    for (uid, record) in &mine {
        if found.contains_key(*uid) {
            continue;
        }
        let gateway = api(client, Kind::Gateway, &record.gateway.namespace)
            .get_opt(&record.gateway.name)
            .await?
            .filter(|g| g.uid().as_deref() == Some(uid.as_str()));
        let key = record.gateway.clone();
        found.insert((*uid).clone(), Observed { key, uid: (*uid).clone(), gateway, ..Default::default() });
    }
    let mut classes: BTreeMap<String, Option<Class>> = BTreeMap::new();
    let mut routes: Option<Vec<(Kind, DynamicObject)>> = None;
    for (uid, target) in found.iter_mut() {
        target.installed = installed.clone();
        target.record = match entries.get(uid) {
            Some(Ok(r)) if r.gateway == target.key => Ok(Some(r.clone())),
            Some(Ok(_)) | None => Ok(None),
            Some(Err(e)) => Err(e.clone()),
        };
        let recorded: Vec<Ref> = target
            .record
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .map(|r| r.created.iter().cloned().chain(r.merged.iter().map(|m| m.target.clone())).collect())
            .unwrap_or_default();
        let mut refs: BTreeSet<Ref> = recorded.into_iter().collect();
        if let Some(g) = &target.gateway {
            let class_name = string_at(&g.data, &["spec", "gatewayClassName"]).unwrap_or_default().to_string();
            if !classes.contains_key(&class_name) {
                let class = api(client, Kind::GatewayClass, "").get_opt(&class_name).await?.map(|c| Class {
                    controller_name: string_at(&c.data, &["spec", "controllerName"]).unwrap_or_default().into(),
                    parameters_ref: at(&c.data, &["spec", "parametersRef"]).cloned(),
                });
                classes.insert(class_name.clone(), class);
            }
            target.class = classes[&class_name].clone();
            let provider = target.class.as_ref().and_then(|c| Provider::of(&c.controller_name));
            if let Some(kind) = provider.and_then(Provider::parameters) {
                if let Some(name) = string_at(&g.data, &["spec", "infrastructure", "parametersRef", "name"]) {
                    refs.insert(Ref::new(kind, &target.key.namespace, name));
                }
                refs.insert(Ref::new(kind, &target.key.namespace, &owned_name(&target.key.name)));
            }
            if provider == Some(Provider::Istio) {
                refs.insert(Ref::new(Kind::Telemetry, &target.key.namespace, &owned_name(&target.key.name)));
            }
            if provider == Some(Provider::NginxGatewayFabric) && target.selected {
                if routes.is_none() {
                    let mut all = Vec::new();
                    for kind in [Kind::HTTPRoute, Kind::GRPCRoute] {
                        if installed.contains(&kind) {
                            let items = api(client, kind, "").list(&ListParams::default()).await?.items;
                            all.extend(items.into_iter().map(|r| (kind, r)));
                        }
                    }
                    routes = Some(all);
                }
                target.routes = routes
                    .iter()
                    .flatten()
                    .filter(|(_, r)| {
                        attached(r, &target.key) && !protected(r.metadata.namespace.as_deref().unwrap_or_default())
                    })
                    .map(|(kind, r)| Route { kind: *kind, key: ObjectKey::of(&r.metadata) })
                    .collect();
                target.routes.sort();
                for route in &target.routes {
                    refs.insert(Ref::new(
                        Kind::ObservabilityPolicy,
                        &route.key.namespace,
                        &owned_name(&route.key.name),
                    ));
                }
            }
            if provider == Some(Provider::Istio) && installed.contains(&Kind::Telemetry) {
                target.others = others(client, Kind::Telemetry, &target.key.namespace, |t| {
                    at(&t.data, &["spec", "targetRefs"]).and_then(Value::as_array).is_some_and(|refs| {
                        refs.iter().any(|r| {
                            string_at(r, &["kind"]) == Some("Gateway")
                                && string_at(r, &["name"]) == Some(&target.key.name)
                        })
                    })
                })
                .await?;
            }
        }
        for r in refs {
            if !installed.contains(&r.kind) {
                continue;
            }
            if let Some(object) = api(client, r.kind, &r.namespace).get_opt(&r.name).await? {
                target.objects.insert(r, object);
            }
        }
    }
    Ok(Observation { targets: found.into_values().collect(), not_installed: false })
}

/// Objects of `kind` in `namespace` crosstrace did not create that satisfy `targets`.
async fn others(
    client: &Client,
    kind: Kind,
    namespace: &str,
    targets: impl Fn(&DynamicObject) -> bool,
) -> Result<Vec<Ref>, kube::Error> {
    let items = api(client, kind, namespace).list(&ListParams::default()).await?.items;
    Ok(items
        .iter()
        .filter(|o| !o.labels().contains_key(POLICY_LABEL) && targets(o))
        .map(|o| Ref::new(kind, namespace, &o.name_any()))
        .collect())
}

/// Does a route's `spec.parentRefs` name this Gateway?
pub fn attached(route: &DynamicObject, gateway: &ObjectKey) -> bool {
    let route_namespace = route.metadata.namespace.as_deref().unwrap_or_default();
    let parents = at(&route.data, &["spec", "parentRefs"]).and_then(Value::as_array);
    parents.into_iter().flatten().any(|p| {
        let kind = string_at(p, &["kind"]).unwrap_or("Gateway");
        let group = string_at(p, &["group"]).unwrap_or(GATEWAY_GROUP);
        let namespace = string_at(p, &["namespace"]).unwrap_or(route_namespace);
        kind == "Gateway"
            && group == GATEWAY_GROUP
            && namespace == gateway.namespace
            && string_at(p, &["name"]) == Some(&gateway.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CollectorSpec, RolloutSpec, TracingPolicySpec};

    const NOW: i64 = 1_000_000;

    fn spec(ratio: &str) -> TracingPolicySpec {
        TracingPolicySpec {
            collector: Some(CollectorSpec { endpoint: "otel.observability.svc:4317".into(), ..Default::default() }),
            sampling: SamplingSpec { ratio: ratio.into(), parent_based: true },
            gateway: Some(GatewaySpec { service_name: "edge".into(), ..Default::default() }),
            rollout: RolloutSpec { progress_deadline_seconds: 60, ..Default::default() },
            ..Default::default()
        }
    }

    fn view(spec: &TracingPolicySpec) -> PolicyView<'_> {
        PolicyView { generation: 2, ..PolicyView::new("edge", spec) }
    }

    fn object(kind: Kind, namespace: &str, name: &str, rest: Value) -> DynamicObject {
        let mut value = json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{kind:?}"),
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "generation": 1, "resourceVersion": "1"},
        });
        value.as_object_mut().unwrap().extend(rest.as_object().cloned().unwrap_or_default());
        serde_json::from_value(value).unwrap()
    }

    fn gateway(name: &str, infrastructure: Option<Value>) -> DynamicObject {
        let mut spec =
            json!({"gatewayClassName": "class", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]});
        if let Some(i) = infrastructure {
            spec["infrastructure"] = i;
        }
        object(Kind::Gateway, "infra", name, json!({"spec": spec}))
    }

    /// Sets what the provider's controller reports on a Gateway, for its current generation.
    fn report(g: &mut DynamicObject, accepted: &str, programmed: &str) {
        let generation = g.metadata.generation.unwrap();
        let condition = |type_: &str, status: &str| json!({"type": type_, "status": status, "reason": if status == "True" { type_ } else { "Invalid" }, "message": "", "observedGeneration": generation});
        g.data["status"] =
            json!({"conditions": [condition("Accepted", accepted), condition("Programmed", programmed)]});
    }

    fn target(provider: &str, g: DynamicObject) -> Observed {
        Observed {
            key: ObjectKey::of(&g.metadata),
            uid: g.metadata.uid.clone().unwrap(),
            gateway: Some(g),
            class: Some(Class { controller_name: provider.into(), parameters_ref: None }),
            selected: true,
            installed: [Kind::EnvoyProxy, Kind::NginxProxy, Kind::ObservabilityPolicy, Kind::Telemetry].into(),
            ..Default::default()
        }
    }

    fn with_object(mut t: Observed, o: DynamicObject) -> Observed {
        let kind = match o.types.as_ref().map(|t| t.kind.as_str()) {
            Some("EnvoyProxy") => Kind::EnvoyProxy,
            Some("NginxProxy") => Kind::NginxProxy,
            Some("ObservabilityPolicy") => Kind::ObservabilityPolicy,
            _ => Kind::Telemetry,
        };
        let r = Ref::new(kind, o.metadata.namespace.as_deref().unwrap(), &o.name_any());
        t.objects.insert(r, o);
        t
    }

    /// RFC 7386, as the API server applies a merge patch.
    fn merge(target: &mut Value, patch: &Value) {
        match patch {
            Value::Object(p) => {
                if !target.is_object() {
                    *target = json!({});
                }
                let t = target.as_object_mut().unwrap();
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            other => *target = other.clone(),
        }
    }

    /// What the API server holds after the actions (a spec change bumps a generation).
    fn applied(mut t: Observed, actions: &[Action]) -> Observed {
        for action in actions {
            match action {
                Action::Record { record, .. } => t.record = Ok(record.clone()),
                Action::Apply { target, body } => {
                    let mut o: DynamicObject = serde_json::from_value(body.clone()).unwrap();
                    o.metadata.generation = Some(1);
                    t.objects.insert(target.clone(), o);
                }
                Action::Patch { target, patch, .. } if target.kind == Kind::Gateway => {
                    let g = t.gateway.as_mut().unwrap();
                    merge(&mut g.data, patch);
                    g.metadata.generation = Some(g.metadata.generation.unwrap() + 1);
                }
                Action::Patch { target, patch, .. } => {
                    let o = t.objects.get_mut(target).unwrap();
                    let mut data = o.data.clone();
                    merge(&mut data, patch);
                    o.data = data;
                }
                Action::Delete { target } => {
                    t.objects.remove(target);
                }
            }
        }
        t
    }

    fn healthy(mut t: Observed) -> Observed {
        report(t.gateway.as_mut().unwrap(), "True", "True");
        t
    }

    fn run(s: &TracingPolicySpec, t: &Observed, now: i64) -> Plan {
        plan(view(s), &Config { istio_provider: Some("otel".into()) }, std::slice::from_ref(t), now)
    }

    #[test]
    fn ratios_map_exactly_where_the_provider_can() {
        let rows = [
            ("0.25", (1, 4), 25.0, (25, false)),
            ("0.333", (333, 1000), 33.3, (33, true)),
            ("1", (1, 1), 100.0, (100, false)),
            ("1.0", (1, 1), 100.0, (100, false)),
            ("0", (0, 1), 0.0, (0, false)),
            (".5", (1, 2), 50.0, (50, false)),
            ("0.000001", (1, 1_000_000), 0.0001, (0, true)),
            ("0.125", (1, 8), 12.5, (13, true)),
        ];
        for (ratio, fraction_, percent_, integer) in rows {
            assert_eq!(fraction(ratio), fraction_, "{ratio}");
            assert!((percent(ratio) - percent_).abs() < 1e-9, "{ratio}: {}", percent(ratio));
            assert_eq!(integer_percent(ratio), integer, "{ratio}");
        }
    }

    #[test]
    fn the_collector_is_a_backend_ref_when_it_is_a_service_name() {
        let rows = [
            (
                "otel.observability.svc:4317",
                json!({"backendRefs": [{"name": "otel", "namespace": "observability", "port": 4317}]}),
            ),
            (
                "otel.observability.svc.cluster.local:4317",
                json!({"backendRefs": [{"name": "otel", "namespace": "observability", "port": 4317}]}),
            ),
            ("collector.example.com:4317", json!({"host": "collector.example.com", "port": 4317})),
            ("10.0.0.5:4317", json!({"host": "10.0.0.5", "port": 4317})),
            ("[fd00::5]:4317", json!({"host": "fd00::5", "port": 4317})),
        ];
        for (endpoint, want) in rows {
            assert_eq!(envoy_collector(endpoint), want, "{endpoint}");
        }
    }

    #[test]
    fn merge_patches_turn_one_value_into_exactly_the_other() {
        let rows = [
            (
                Some(json!({"a": 1, "b": {"c": 2, "d": 3}})),
                Some(json!({"a": 1, "b": {"c": 4}})),
                json!({"b": {"c": 4, "d": null}}),
            ),
            (None, Some(json!({"x": 1})), json!({"x": 1})),
            (Some(json!({"x": 1})), None, Value::Null),
            (Some(json!(3)), Some(json!({"y": 2})), json!({"y": 2})),
        ];
        for (from, to, want) in rows {
            let patch = merge_patch(from.as_ref(), to.as_ref());
            assert_eq!(patch, want);
            let mut doc = json!({"v": from});
            merge(&mut doc, &json!({"v": patch}));
            assert_eq!(doc.get("v").filter(|v| !v.is_null()), to.as_ref());
        }
    }

    #[test]
    fn an_envoy_gateway_gets_its_own_envoy_proxy_then_converges_with_no_write() {
        let s = spec("0.25");
        let t = target(ENVOY_GATEWAY, gateway("public", None));
        let first = run(&s, &t, NOW);
        let [
            Action::Record { record: Some(record), .. },
            Action::Apply { target: own, body },
            Action::Patch { target: gw, patch, .. },
        ] = &first.actions[..]
        else {
            panic!("{:#?}", first.actions)
        };
        assert_eq!(record.infrastructure, Some(OriginalInfrastructure { existed: false, parameters_ref: None }));
        assert_eq!(record.created, vec![own.clone()]);
        assert_eq!((own.kind, own.name.as_str()), (Kind::EnvoyProxy, "crosstrace-public"));
        let tracing = &body["spec"]["telemetry"]["tracing"];
        assert_eq!(tracing["samplingFraction"], json!({"numerator": 1, "denominator": 4}));
        assert_eq!(tracing["provider"]["type"], "OpenTelemetry");
        assert_eq!(tracing["provider"]["serviceName"], "edge");
        assert!(body["spec"].get("mergeType").is_none(), "no class-level EnvoyProxy to keep");
        assert_eq!(gw.kind, Kind::Gateway);
        assert_eq!(
            patch["spec"]["infrastructure"]["parametersRef"],
            json!({"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "crosstrace-public"})
        );
        assert_eq!(first.report.in_flight, 1);

        // Written; the Gateway is not programmed yet for its new generation.
        let written = applied(t, &first.actions);
        let waiting = run(&s, &written, NOW + 10);
        assert!(waiting.actions.is_empty(), "{:?}", waiting.actions);
        assert_eq!(waiting.report.in_flight, 1);

        let ready = healthy(written);
        let mark = run(&s, &ready, NOW + 11);
        assert!(matches!(&mark.actions[..], [Action::Record { record: Some(r), .. }] if r.converged));
        let converged = applied(ready, &mark.actions);
        let idle = run(&s, &converged, NOW + 12);
        assert!(idle.actions.is_empty(), "{:?}", idle.actions);
        assert_eq!((idle.report.selected, idle.report.ready), (1, 1));

        // Delete: the Gateway first, then crosstrace's EnvoyProxy, then the ledger entry.
        let deleting = PolicyView { deleting: true, ..view(&s) };
        let revert = plan(deleting, &Config::default(), std::slice::from_ref(&converged), NOW + 13);
        match &revert.actions[..] {
            [
                Action::Patch { target: g, patch, .. },
                Action::Delete { target: d },
                Action::Record { record: None, .. },
            ] => {
                assert_eq!(g.kind, Kind::Gateway);
                assert_eq!(patch, &json!({"spec": {"infrastructure": null}}));
                assert_eq!(d.name, "crosstrace-public");
            }
            other => panic!("{other:#?}"),
        }
        let reverted = applied(converged, &revert.actions);
        assert_eq!(reverted.gateway.unwrap().data["spec"], gateway("public", None).data["spec"]);
    }

    #[test]
    fn an_envoy_proxy_the_gateway_already_uses_is_merged_and_restored_exactly() {
        let s = spec("0.25");
        let reference =
            json!({"parametersRef": {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "custom"}});
        let owners = object(
            Kind::EnvoyProxy,
            "infra",
            "custom",
            json!({"spec": {"logging": {"level": {"default": "warn"}}, "telemetry": {"metrics": {"prometheus": {"disable": true}}}}}),
        );
        let before = owners.data.clone();
        let t = with_object(target(ENVOY_GATEWAY, gateway("public", Some(reference.clone()))), owners);
        let first = run(&s, &t, NOW);
        let [Action::Record { record: Some(record), .. }, Action::Patch { target, patch, resource_version }] =
            &first.actions[..]
        else {
            panic!("{:#?}", first.actions)
        };
        assert_eq!(target.name, "custom");
        assert_eq!(resource_version.as_deref(), Some("1"), "written only over what was observed");
        assert_eq!(record.merged[0].original, None);
        assert_eq!(record.merged[0].absent_parents, 0, "spec.telemetry existed");
        assert!(record.created.is_empty() && record.infrastructure.is_none());
        assert_eq!(patch["spec"]["telemetry"]["tracing"]["samplingFraction"]["denominator"], 4);

        // The owner changes their own fields meanwhile: not crosstrace's business, no write.
        let mut written = healthy(applied(t, &first.actions));
        let owners = written.objects.values_mut().next().unwrap();
        owners.data["spec"]["logging"]["level"]["default"] = json!("debug");
        let converged = applied(written.clone(), &run(&s, &written, NOW + 1).actions);
        assert!(run(&s, &converged, NOW + 2).actions.is_empty());

        let deleting = PolicyView { deleting: true, ..view(&s) };
        let revert = plan(deleting, &Config::default(), std::slice::from_ref(&converged), NOW + 3);
        let reverted = applied(converged, &revert.actions);
        let mut expected = before;
        expected["spec"]["logging"]["level"]["default"] = json!("debug");
        assert_eq!(reverted.objects.values().next().unwrap().data, expected, "only crosstrace's field went back");
        assert_eq!(reverted.gateway.unwrap().data["spec"]["infrastructure"], reference);
        assert!(reverted.record.unwrap().is_none());
    }

    #[test]
    fn a_telemetry_section_crosstrace_added_goes_again_on_revert() {
        let s = spec("0.5");
        let reference =
            json!({"parametersRef": {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "custom"}});
        let owners = object(Kind::EnvoyProxy, "infra", "custom", json!({"spec": {"logging": {}}}));
        let before = owners.data.clone();
        let t = with_object(target(ENVOY_GATEWAY, gateway("public", Some(reference))), owners);
        let written = applied(t.clone(), &run(&s, &t, NOW).actions);
        let Ok(Some(record)) = &written.record else { panic!() };
        assert_eq!(record.merged[0].absent_parents, 1);
        let revert =
            plan(PolicyView { deleting: true, ..view(&s) }, &Config::default(), std::slice::from_ref(&written), NOW);
        let reverted = applied(written, &revert.actions);
        assert_eq!(reverted.objects.values().next().unwrap().data, before);
    }

    #[test]
    fn a_gateway_class_envoy_proxy_is_kept_by_a_strategic_merge() {
        let s = spec("0.25");
        let mut t = target(ENVOY_GATEWAY, gateway("public", None));
        t.class.as_mut().unwrap().parameters_ref = Some(
            json!({"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "class-wide", "namespace": "envoy-gateway-system"}),
        );
        let first = run(&s, &t, NOW);
        let Some(Action::Apply { body, .. }) = first.actions.get(1) else { panic!("{:#?}", first.actions) };
        assert_eq!(body["spec"]["mergeType"], "StrategicMerge");
    }

    #[test]
    fn an_nginx_gateway_fabric_gateway_gets_an_nginx_proxy_and_a_policy_per_route() {
        let s = spec("0.333");
        let mut t = target(NGINX_GATEWAY_FABRIC, gateway("public", None));
        t.routes = vec![
            Route { kind: Kind::HTTPRoute, key: ObjectKey::new("shop", "web") },
            Route { kind: Kind::GRPCRoute, key: ObjectKey::new("shop", "api") },
        ];
        let first = run(&s, &t, NOW);
        let applies: Vec<(&Ref, &Value)> = first
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Apply { target, body } => Some((target, body)),
                _ => None,
            })
            .collect();
        assert_eq!(applies.len(), 3, "{:#?}", first.actions);
        assert_eq!(applies[0].0.kind, Kind::NginxProxy);
        assert_eq!(
            applies[0].1["spec"]["telemetry"],
            json!({"exporter": {"endpoint": "otel.observability.svc:4317"}, "serviceName": "edge"})
        );
        let route_policy = applies[1].1;
        assert_eq!(route_policy["metadata"]["namespace"], "shop");
        assert_eq!(
            route_policy["spec"]["targetRefs"][0],
            json!({"group": GATEWAY_GROUP, "kind": "HTTPRoute", "name": "web"})
        );
        assert_eq!(route_policy["spec"]["tracing"], json!({"strategy": "ratio", "ratio": 33, "context": "propagate"}));
        assert_eq!(applies[2].1["spec"]["targetRefs"][0]["kind"], "GRPCRoute");
        assert!(first.report.warnings[0].contains("rounded to 33%"), "{:?}", first.report.warnings);

        // Ready only once NGF accepted every route's policy for the generation crosstrace wrote.
        let mut written = healthy(applied(t, &first.actions));
        assert!(run(&s, &written, NOW + 1).actions.is_empty());
        for (r, o) in written.objects.iter_mut().filter(|(r, _)| r.kind == Kind::ObservabilityPolicy) {
            o.data["status"] = json!({"ancestors": [{"ancestorRef": {"name": "public", "namespace": "infra"}, "controllerName": NGINX_GATEWAY_FABRIC,
                "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}]});
            assert_eq!(r.namespace, "shop");
        }
        let mark = run(&s, &written, NOW + 2);
        assert!(
            matches!(&mark.actions[..], [Action::Record { record: Some(r), .. }] if r.converged),
            "{:#?}",
            mark.actions
        );
        let converged = applied(written, &mark.actions);

        // A route added later gets its policy.
        let mut more = converged.clone();
        more.routes.push(Route { kind: Kind::HTTPRoute, key: ObjectKey::new("shop", "new") });
        let added = run(&s, &more, NOW + 3);
        assert!(
            added.actions.iter().any(|a| matches!(a, Action::Apply { target, .. } if target.name == "crosstrace-new"))
        );

        // Delete removes every object crosstrace created.
        let grown = applied(more, &added.actions);
        let revert =
            plan(PolicyView { deleting: true, ..view(&s) }, &Config::default(), std::slice::from_ref(&grown), NOW + 4);
        let reverted = applied(grown, &revert.actions);
        assert!(reverted.objects.is_empty(), "{:?}", reverted.objects.keys());
    }

    #[test]
    fn a_conflicted_observability_policy_is_reported_not_fought() {
        let s = spec("0.25");
        let mut t = target(NGINX_GATEWAY_FABRIC, gateway("public", None));
        t.routes = vec![Route { kind: Kind::HTTPRoute, key: ObjectKey::new("shop", "web") }];
        let mut written = healthy(applied(t.clone(), &run(&s, &t, NOW).actions));
        for (_, o) in written.objects.iter_mut().filter(|(r, _)| r.kind == Kind::ObservabilityPolicy) {
            o.data["status"] = json!({"ancestors": [{"ancestorRef": {"name": "public"}, "conditions": [{"type": "Accepted", "status": "False", "reason": "Conflicted", "message": "another policy", "observedGeneration": 1}]}]});
        }
        let p = run(&s, &written, NOW + 3600);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!((p.report.waiting, p.report.rolled_back), (1, 0));
        assert_eq!(p.report.problems[0].reason, reasons::POLICY_CONFLICT);
    }

    #[test]
    fn an_istio_gateway_gets_a_telemetry_with_the_configured_provider() {
        let s = spec("0.25");
        let t = target(ISTIO, gateway("public", None));
        let first = run(&s, &t, NOW);
        let Some(Action::Apply { target, body }) = first.actions.get(1) else { panic!("{:#?}", first.actions) };
        assert_eq!((target.kind, target.namespace.as_str()), (Kind::Telemetry, "infra"));
        assert_eq!(body["spec"]["targetRefs"], json!([{"group": GATEWAY_GROUP, "kind": "Gateway", "name": "public"}]));
        assert_eq!(body["spec"]["tracing"][0]["providers"], json!([{"name": "otel"}]));
        assert_eq!(body["spec"]["tracing"][0]["randomSamplingPercentage"], 25.0);
        assert_eq!(first.actions.len(), 2, "the Gateway itself is not changed: {:#?}", first.actions);

        let unconfigured = plan(view(&s), &Config::default(), std::slice::from_ref(&t), NOW);
        assert!(unconfigured.actions.is_empty());
        assert_eq!(unconfigured.report.problems[0].reason, reasons::ISTIO_PROVIDER_MISSING);
    }

    #[test]
    fn what_crosstrace_cannot_trace_is_reported_and_nothing_is_written() {
        let s = spec("0.25");
        let rows: Vec<(&str, Observed, &str)> = vec![
            (
                "other controller",
                target("example.com/gateway-controller", gateway("g", None)),
                reasons::UNSUPPORTED_PROVIDER,
            ),
            (
                "no class",
                Observed { class: None, ..target(ENVOY_GATEWAY, gateway("g", None)) },
                reasons::TARGET_NOT_AVAILABLE,
            ),
            (
                "provider CRDs missing",
                Observed { installed: BTreeSet::new(), ..target(ENVOY_GATEWAY, gateway("g", None)) },
                reasons::PROVIDER_NOT_INSTALLED,
            ),
            (
                "parametersRef to a ConfigMap",
                target(
                    ENVOY_GATEWAY,
                    gateway("g", Some(json!({"parametersRef": {"group": "", "kind": "ConfigMap", "name": "x"}}))),
                ),
                reasons::PARAMETERS_UNSUPPORTED,
            ),
            (
                "parametersRef to a missing EnvoyProxy",
                target(
                    ENVOY_GATEWAY,
                    gateway(
                        "g",
                        Some(
                            json!({"parametersRef": {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "x"}}),
                        ),
                    ),
                ),
                reasons::PARAMETERS_MISSING,
            ),
            (
                "a name crosstrace would use is someone else's",
                with_object(
                    target(ENVOY_GATEWAY, gateway("g", None)),
                    object(Kind::EnvoyProxy, "infra", "crosstrace-g", json!({"spec": {}})),
                ),
                reasons::NAME_TAKEN,
            ),
            (
                "an older policy holds it",
                Observed { claimed_by: Some("older".into()), ..target(ENVOY_GATEWAY, gateway("g", None)) },
                reasons::CONFLICT,
            ),
        ];
        for (what, t, reason) in rows {
            let p = run(&s, &t, NOW);
            assert!(p.actions.is_empty(), "{what}: {:?}", p.actions);
            assert_eq!(p.report.problems[0].reason, reason, "{what}: {:?}", p.report.problems);
            assert_eq!(p.report.selected, 1, "{what}");
        }
        let s = spec("0.25");
        let t = target("example.com/gateway-controller", gateway("g", None));
        assert!(run(&s, &t, NOW).report.problems[0].message.contains("example.com/gateway-controller"));
    }

    #[test]
    fn a_gateway_not_programmed_by_the_deadline_is_rolled_back_and_not_retried() {
        let s = spec("0.25");
        let t = target(ENVOY_GATEWAY, gateway("public", None));
        let written = applied(t.clone(), &run(&s, &t, NOW).actions);
        let failed = run(&s, &written, NOW + 60);
        assert_eq!(failed.report.rolled_back, 1);
        assert!(failed.report.stopped);
        let [Action::Patch { .. }, Action::Delete { .. }, Action::Record { record: Some(marker), .. }] =
            &failed.actions[..]
        else {
            panic!("{:#?}", failed.actions)
        };
        assert_eq!((marker.rolled_back, marker.revision.as_ref()), (Some(2), None));
        let rolled_back = applied(written, &failed.actions);
        assert_eq!(rolled_back.gateway.as_ref().unwrap().data["spec"], gateway("public", None).data["spec"]);
        let held = run(&s, &rolled_back, NOW + 61);
        assert!(held.actions.is_empty());
        assert_eq!(held.report.problems[0].reason, reasons::ROLLED_BACK);
        let message = &held.report.problems[0].message;
        assert!(message.contains("did not become healthy within 60s") && message.contains("retry"), "{message}");
        // A new generation retries.
        let retry = plan(PolicyView { generation: 3, ..view(&s) }, &Config::default(), &[rolled_back], NOW + 62);
        assert!(!retry.actions.is_empty());
    }

    #[test]
    fn a_gateway_its_controller_refuses_fails_before_the_deadline() {
        let s = spec("0.25");
        let t = target(ENVOY_GATEWAY, gateway("public", None));
        let mut written = applied(t.clone(), &run(&s, &t, NOW).actions);
        report(written.gateway.as_mut().unwrap(), "False", "False");
        let failed = run(&s, &written, NOW + 1);
        assert_eq!(failed.report.problems[0].reason, reasons::ROLLED_BACK);
        assert!(failed.report.problems[0].message.contains("not Accepted"), "{:?}", failed.report.problems);
    }

    #[test]
    fn tracing_changed_by_someone_else_is_drift_and_written_again() {
        let s = spec("0.25");
        let t = target(ENVOY_GATEWAY, gateway("public", None));
        let written = healthy(applied(t.clone(), &run(&s, &t, NOW).actions));
        let mut converged = applied(written.clone(), &run(&s, &written, NOW + 1).actions);
        assert!(run(&s, &converged, NOW + 2).drifted.is_empty());
        let own = converged.objects.values_mut().next().unwrap();
        own.data["spec"]["telemetry"]["tracing"]["samplingFraction"] = json!({"numerator": 1, "denominator": 1});
        let fix = run(&s, &converged, NOW + 3);
        assert_eq!(fix.drifted, vec![converged.key.clone()]);
        assert!(fix.actions.iter().any(|a| matches!(a, Action::Apply { .. })), "{:?}", fix.actions);

        // The owner editing the Gateway's listeners is no drift and no failure: no write at all.
        let mut edited = converged.clone();
        let own = edited.objects.values_mut().next().unwrap();
        own.data["spec"]["telemetry"]["tracing"]["samplingFraction"] = json!({"numerator": 1, "denominator": 4});
        let g = edited.gateway.as_mut().unwrap();
        g.data["spec"]["listeners"] = json!([{"name": "https", "port": 443, "protocol": "HTTPS"}]);
        g.metadata.generation = Some(g.metadata.generation.unwrap() + 1);
        let p = run(&s, &edited, NOW + 4);
        assert!(p.actions.is_empty() && p.drifted.is_empty(), "{:?}", p.actions);
        assert_eq!(p.report.rolled_back, 0);
    }

    #[test]
    fn parameters_the_owner_names_after_crosstrace_pointed_the_gateway_are_theirs() {
        let s = spec("0.25");
        let t = target(ENVOY_GATEWAY, gateway("public", None));
        let written = healthy(applied(t.clone(), &run(&s, &t, NOW).actions));
        let converged = applied(written.clone(), &run(&s, &written, NOW + 1).actions);
        // The owner points the Gateway at an EnvoyProxy of their own.
        let mut repointed = with_object(converged, object(Kind::EnvoyProxy, "infra", "mine", json!({"spec": {}})));
        let g = repointed.gateway.as_mut().unwrap();
        g.data["spec"]["infrastructure"] =
            json!({"parametersRef": {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "mine"}});
        g.metadata.generation = Some(g.metadata.generation.unwrap() + 1);
        let repointed = healthy(repointed);
        let p = run(&s, &repointed, NOW + 2);
        let gateway_patches =
            p.actions.iter().filter(|a| matches!(a, Action::Patch { target, .. } if target.kind == Kind::Gateway));
        assert_eq!(gateway_patches.count(), 0, "the owner's parametersRef stays: {:#?}", p.actions);
        assert!(
            p.actions.iter().any(|a| matches!(a, Action::Patch { target, .. } if target.name == "mine")),
            "merged into theirs"
        );
        assert!(p.actions.iter().any(|a| matches!(a, Action::Delete { target } if target.name == "crosstrace-public")));
        let moved = applied(repointed, &p.actions);
        let Ok(Some(record)) = &moved.record else { panic!() };
        assert!(record.infrastructure.is_none() && record.created.is_empty(), "{record:?}");
        let revert =
            plan(PolicyView { deleting: true, ..view(&s) }, &Config::default(), std::slice::from_ref(&moved), NOW + 3);
        let reverted = applied(moved, &revert.actions);
        assert_eq!(reverted.gateway.unwrap().data["spec"]["infrastructure"]["parametersRef"]["name"], "mine");
        assert!(reverted.objects[&Ref::new(Kind::EnvoyProxy, "infra", "mine")].data["spec"].get("telemetry").is_none());
    }

    #[test]
    fn a_gateway_that_left_the_selection_is_reverted() {
        let s = spec("0.25");
        let t = target(ISTIO, gateway("public", None));
        let written = applied(t.clone(), &run(&s, &t, NOW).actions);
        let gone = Observed { selected: false, ..written };
        let p = run(&s, &gone, NOW);
        assert_eq!(p.report.selected, 0);
        assert!(
            matches!(&p.actions[..], [Action::Delete { .. }, Action::Record { record: None, .. }]),
            "{:#?}",
            p.actions
        );
    }

    #[test]
    fn routes_attach_by_parent_refs() {
        let gw = ObjectKey::new("infra", "public");
        let route = |parents: Value| object(Kind::HTTPRoute, "shop", "r", json!({"spec": {"parentRefs": parents}}));
        assert!(attached(&route(json!([{"name": "public", "namespace": "infra"}])), &gw));
        assert!(!attached(&route(json!([{"name": "public"}])), &gw), "a parentRef without namespace is the route's");
        assert!(!attached(
            &route(json!([{"name": "public", "namespace": "infra", "kind": "Service", "group": ""}])),
            &gw
        ));
    }
}
