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

use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

mod observe;
mod render;

pub use observe::{Observation, attached, observe, served, served_of};
#[cfg(test)]
use render::envoy_collector;
pub use render::{
    envoy_tracing, fraction, integer_percent, istio_telemetry, nginx_telemetry, nginx_tracing, owned_name, percent,
};

use super::rollout::{self, Health, Written};
use super::{LayerReport, ObjectKey, PolicyView, Progress, reasons};
use crate::api::GatewaySpec;

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
    // What stays is the rollback marker alone: a fresh record of the same policy and Gateway.
    let keep = rolled_back.map(|generation| Record {
        rolled_back: Some(generation),
        ..Record::new(&record.policy, record.gateway.clone())
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

#[cfg(test)]
mod tests;
