//! The edge layer: ingress-nginx controllers.
//!
//! For every selected controller (a Deployment or a DaemonSet, as ingress-nginx's chart offers both) the
//! plan writes every OpenTelemetry key of its ConfigMap
//! (found from the controller's `--configmap` argument) and, when `spec.ingress.image` is set, rolls
//! out that image behind a health gate. Before the first change it records on the Deployment what it
//! will overwrite ([`Record`]); revert puts exactly that back, ConfigMap first, Deployment last.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};

use super::rollout::{self, Written};
use super::workloads::Workload;
use super::{LayerReport, ObjectKey, PolicyView, Progress, normalize_ratio, reasons};
use crate::api::{CollectorSpec, IngressSpec, SamplingSpec, WorkloadKind};

/// Where the edge layer keeps its [`Record`]s (what to restore, what it created): a ConfigMap in the
/// operator's own namespace, one entry per controller Deployment, keyed by its UID. Only crosstrace
/// (and cluster admins) write there: data on an object its owner can edit never chooses which object
/// crosstrace writes or deletes.
pub const LEDGER: &str = "crosstrace-ingress-records";
/// Label of the ledger ConfigMap.
pub const LEDGER_LABEL: &str = "crosstrace.dev/ingress-ledger";
/// Annotation earlier versions kept the record in, on the controller Deployment itself. crosstrace
/// never writes it any more: one found there was put by someone else and is reported and ignored.
pub const RECORD_ANNOTATION: &str = "crosstrace.dev/ingress";
/// Annotation left after a rollback, `<policy>/<generation>`: that generation is not retried.
pub const ROLLED_BACK_ANNOTATION: &str = "crosstrace.dev/ingress-rolled-back";
/// Label on every Deployment and ConfigMap the edge layer changed, valued with the policy name.
pub const POLICY_LABEL: &str = "crosstrace.dev/ingress-policy";
/// On an edge ConfigMap, beside the data crosstrace applied: the hash of that data ([`config_hash`]).
/// Data that differs while this names the current configuration was changed by someone else (drift,
/// reported and applied again). It decides only what is reported, never what is written.
pub const CONFIG_ANNOTATION: &str = "crosstrace.dev/ingress-config";
/// Labels of the ingress-nginx controller Deployments when the policy names none.
pub const DEFAULT_SELECTOR: [(&str, &str); 2] =
    [("app.kubernetes.io/name", "ingress-nginx"), ("app.kubernetes.io/component", "controller")];

/// What the operator overwrote on one ingress-nginx controller, recorded before the first change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub policy: String,
    /// The kind of the controller this record is about (absent in entries written before DaemonSets).
    #[serde(default = "deployment_kind", skip_serializing_if = "is_deployment")]
    pub kind: WorkloadKind,
    /// The controller this record is about (its UID is the ledger key).
    pub deployment: ObjectKey,
    pub config_map: ObjectKey,
    /// Whether the ConfigMap existed; if not, revert deletes it.
    pub config_map_existed: bool,
    /// Every key the policy writes, with its value before (`None`: the key did not exist).
    pub original_data: BTreeMap<String, Option<String>>,
    /// The controller container's image before it was replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_image: Option<ContainerImage>,
    /// Unix seconds when the image rollout started, for the progress deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_started: Option<i64>,
    /// The image crosstrace wrote: a different one running means its owner changed it since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_image: Option<String>,
    /// The controller's `metadata.generation` when this record of `applied_image` was written, right
    /// before the image itself: still that generation means the image write never landed (a controller
    /// stopped between the two writes), not that the owner changed the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at_generation: Option<i64>,
    /// The image crosstrace wrote was seen rolled out and healthy (from then on the controller's health
    /// is its owner's business).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub image_converged: bool,
    /// The owner replaced crosstrace's image with this policy image in force: crosstrace leaves the
    /// owner's image alone until `spec.ingress.image` changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yielded_image: Option<String>,
}

fn deployment_kind() -> WorkloadKind {
    WorkloadKind::Deployment
}

fn is_deployment(kind: &WorkloadKind) -> bool {
    *kind == WorkloadKind::Deployment
}

/// A container and its image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerImage {
    pub container: String,
    pub image: String,
}

/// One change the edge layer makes, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the record into the ledger (before any change it records).
    Record { controller: ObjectKey, uid: String, record: Record },
    /// Put the policy label on the controller (after its record).
    Label { kind: WorkloadKind, controller: ObjectKey, policy: String },
    /// Server-side apply every OTel key (and the policy label) to the ConfigMap.
    ApplyConfig { config_map: ObjectKey, data: BTreeMap<String, String>, policy: String },
    /// Write the updated record into the ledger, then server-side apply the controller image.
    ApplyImage { kind: WorkloadKind, controller: ObjectKey, uid: String, image: ContainerImage, record: Record },
    /// Put the recorded values back (absent keys removed, label removed), or delete a ConfigMap the
    /// operator created.
    RestoreConfig { config_map: ObjectKey, data: BTreeMap<String, Option<String>>, delete: bool },
    /// Put the recorded image back (if any). `keep` is the record that stays (image-only revert);
    /// `None` removes the record and the label; `rolled_back` leaves the no-retry marker.
    RestoreController {
        kind: WorkloadKind,
        controller: ObjectKey,
        uid: String,
        image: Option<ContainerImage>,
        keep: Option<Record>,
        rolled_back: Option<String>,
    },
}

/// One ingress-nginx controller as observed.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The controller: a Deployment or a DaemonSet.
    pub controller: Workload,
    /// Its ConfigMap, when the `--configmap` argument names one that exists.
    pub config_map: Option<ConfigMap>,
    /// Matches the policy's `spec.ingress` selection now.
    pub selected: bool,
    /// An older policy that also selects this controller and therefore keeps it.
    pub claimed_by: Option<String>,
    /// Its record from the ledger (by UID, for this very controller), or why it cannot be read.
    pub record: Result<Option<Record>, String>,
}

impl Default for Observed {
    fn default() -> Self {
        Self { controller: Workload::default(), config_map: None, selected: false, claimed_by: None, record: Ok(None) }
    }
}

/// The plan for the edge layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub report: LayerReport,
    /// Controllers whose tracing configuration someone else changed after crosstrace applied it; the
    /// plan applies it again.
    pub drifted: Vec<ObjectKey>,
}

/// Every OpenTelemetry key of ingress-nginx's ConfigMap, written explicitly so that no default of a
/// particular controller version decides what happens.
pub fn otel_config(
    collector: &CollectorSpec,
    sampling: &SamplingSpec,
    ingress: &IngressSpec,
) -> BTreeMap<String, String> {
    // ingress-nginx joins host and port as text (`host:port`), so an IPv6 host keeps its brackets.
    let (host, port) = collector.endpoint.rsplit_once(':').unwrap_or((&collector.endpoint, ""));
    let ratio = normalize_ratio(&sampling.ratio);
    let sampler = match ratio.as_str() {
        "1" => "AlwaysOn",
        "0" => "AlwaysOff",
        _ => "TraceIdRatioBased",
    };
    [
        ("enable-opentelemetry", "true".to_string()),
        ("opentelemetry-trust-incoming-span", "true".to_string()),
        ("opentelemetry-operation-name", String::new()),
        ("otlp-collector-host", host.to_string()),
        ("otlp-collector-port", port.to_string()),
        ("otel-service-name", ingress.service_name.clone()),
        ("otel-sampler", sampler.to_string()),
        ("otel-sampler-ratio", ratio.clone()),
        ("otel-sampler-parent-based", sampling.parent_based.to_string()),
        ("otel-max-queuesize", "2048".to_string()),
        ("otel-schedule-delay-millis", "5000".to_string()),
        ("otel-max-export-batch-size", "512".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The hash [`CONFIG_ANNOTATION`] holds for ConfigMap data crosstrace applies.
pub fn config_hash(data: &BTreeMap<String, String>) -> String {
    super::hash_of(&serde_json::json!(data))
}

/// `host:port` → (host, port); IPv6 brackets are dropped. The API server has validated the form.
pub fn split_host_port(endpoint: &str) -> (&str, &str) {
    let (host, port) = endpoint.rsplit_once(':').unwrap_or((endpoint, ""));
    (host.trim_start_matches('[').trim_end_matches(']'), port)
}

/// The controller container (the one with `--configmap`) and the ConfigMap it names. A bare name is
/// in the Deployment's namespace; `$(POD_NAMESPACE)` is the Deployment's namespace.
pub fn config_map_ref(controller: &Workload) -> Option<(&Container, ObjectKey)> {
    let namespace = controller.metadata.namespace.clone().unwrap_or_default();
    let containers = &controller.template.full()?.spec.as_ref()?.containers;
    containers.iter().find_map(|c| {
        let args = c.args.iter().flatten();
        let value = args.clone().zip(args.skip(1).map(Some).chain([None])).find_map(|(arg, next)| {
            match arg.strip_prefix("--configmap") {
                Some(rest) if rest.starts_with('=') => Some(rest[1..].to_string()),
                Some("") => next.cloned(),
                _ => None,
            }
        })?;
        let value = value.replace("$(POD_NAMESPACE)", &namespace);
        let key = match value.split_once('/') {
            Some((ns, name)) => ObjectKey::new(ns, name),
            None => ObjectKey::new(namespace.clone(), value),
        };
        Some((c, key))
    })
}

/// The repositories of upstream ingress-nginx's controller images. Upstream is retired: its final
/// release is v1.15.1 (2026-03-19), and every upstream image is exposed to CVE-2026-42945.
const UPSTREAM_REPOSITORIES: [&str; 4] = [
    "registry.k8s.io/ingress-nginx/controller",
    "registry.k8s.io/ingress-nginx/controller-chroot",
    "k8s.gcr.io/ingress-nginx/controller",
    "k8s.gcr.io/ingress-nginx/controller-chroot",
];
/// The last upstream release; a fork's tag above it carries the fork's own fixes.
const LAST_UPSTREAM: (u32, u32, u32) = (1, 15, 1);

/// How an image tag names its version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    /// `v1.15.1`, `1.12.1`, or a fork's `v1.15.5-chainguard` (the suffix names the fork).
    Semver((u32, u32, u32), bool),
    /// A fork's calendar tag (`2026.04.1`, `20260401`): no upstream version to compare.
    Calendar,
    /// Anything else (`latest`, a commit): nothing known.
    Unknown,
}

fn tag_of(tag: &str) -> Tag {
    let (core, suffix) = tag.split_once(['-', '+']).map_or((tag, false), |(c, _)| (c, true));
    let numbers: Vec<Option<u32>> = core.trim_start_matches('v').split('.').map(|p| p.parse().ok()).collect();
    match numbers[..] {
        [Some(year), ..] if (2000..=2999).contains(&year) || year >= 20_000_000 => Tag::Calendar,
        [Some(major), Some(minor), Some(patch)] => Tag::Semver((major, minor, patch), suffix),
        _ => Tag::Unknown,
    }
}

/// A warning about the controller's image, from what is known in 2026: upstream ingress-nginx is
/// retired and every upstream image is exposed to CVE-2026-42945 (and releases before v1.11.5, or
/// v1.12.0, to CVE-2025-1974 as well); a fork's image up to v1.15.1 is built from that code, so whether
/// it is fixed is the fork's to say; a fork's later or calendar tag is its own release.
pub fn version_warning(image: &str) -> Option<String> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let (repository, tag) = match without_digest.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => (repository, tag),
        _ => (without_digest, ""),
    };
    let repository = repository.strip_prefix("docker.io/").unwrap_or(repository);
    let tag = tag_of(tag);
    let older_cve = match tag {
        Tag::Semver(v, _) if v < (1, 11, 5) || v == (1, 12, 0) => " and CVE-2025-1974",
        _ => "",
    };
    if UPSTREAM_REPOSITORIES.contains(&repository) {
        return Some(format!(
            "upstream ingress-nginx is retired (final release v1.15.1, 2026-03-19) and its images are exposed to CVE-2026-42945{older_cve}; move to a maintained fork or to a Gateway API implementation"
        ));
    }
    match tag {
        Tag::Semver(v, _) if v <= LAST_UPSTREAM => Some(format!(
            "this image's version is that of upstream ingress-nginx, which is exposed to CVE-2026-42945{older_cve}; check that its vendor fixed it"
        )),
        _ => None,
    }
}

impl super::Owned for Record {
    fn policy(&self) -> &str {
        &self.policy
    }
}

type TargetPlan = super::TargetPlan<Action>;

/// Plans the edge layer: pure, from the policy, what was observed and the current time.
pub fn plan(policy: PolicyView<'_>, observed: &[Observed], now_secs: i64) -> Plan {
    let active = !policy.deleting && policy.spec.ingress.is_some();
    let mut plan = Plan::default();
    let mut targets: Vec<&Observed> = observed.iter().collect();
    targets.sort_by_key(|t| (t.controller.key(), t.controller.kind));

    // First pass: what each selected target needs, and how many are already in flight.
    let mut per_target = Vec::with_capacity(targets.len());
    for t in &targets {
        let key = ObjectKey::of(&t.controller.metadata);
        let record = t.record.clone();
        if annotation(&t.controller.metadata, RECORD_ANNOTATION).is_some() {
            // Someone else's data must never choose what crosstrace writes or deletes: report, ignore.
            plan.report.problems.push(super::Problem {
                reason: reasons::FORGED_RECORD,
                message: format!(
                    "{:?} {key} carries a {RECORD_ANNOTATION} record crosstrace did not write; it is ignored (crosstrace keeps its records in its own namespace, ConfigMap {LEDGER})",
                    t.controller.kind
                ),
                degraded: true,
            });
        }
        let ours = matches!(&record, Ok(Some(r)) if r.policy == policy.name);
        let marked = annotation(&t.controller.metadata, ROLLED_BACK_ANNOTATION)
            .is_some_and(|m| m.split_once('/').is_some_and(|(p, _)| p == policy.name));
        if !(active && t.selected) {
            if ours || marked {
                let uid = t.controller.metadata.uid.clone().unwrap_or_default();
                plan.actions.extend(revert(t.controller.kind, &key, &uid, record.ok().flatten().as_ref(), None));
            }
            continue;
        }
        plan.report.selected += 1;
        per_target.push((key, forward(policy, t, record, now_secs, &mut plan.drifted)));
    }

    plan.actions.extend(super::schedule(
        per_target.into_iter().map(|(_, p)| p).collect(),
        &policy.spec.rollout,
        &mut plan.report,
    ));
    for t in targets.iter().filter(|t| active && t.selected) {
        let Some((container, _)) = config_map_ref(&t.controller) else { continue };
        let key = ObjectKey::of(&t.controller.metadata);
        let image_warning = container.image.as_deref().and_then(version_warning);
        for warning in image_warning.into_iter().chain(env_override(container, &policy.spec.collector)) {
            plan.report.warnings.push(format!("{key}: {warning}"));
        }
    }
    plan
}

/// The OpenTelemetry SDK in the controller reads `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` before the
/// ConfigMap's `otlp-collector-host`: set on the controller's container, it sends the spans elsewhere.
/// That is the owner's setting; it is reported, never changed.
fn env_override(container: &Container, collector: &Option<CollectorSpec>) -> Option<String> {
    let env = container.env.iter().flatten();
    let set = env
        .filter(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT" || e.name == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .min_by(|a, b| b.name.cmp(&a.name))?;
    let value = match (&set.value, &set.value_from) {
        (Some(v), _) => format!("{v:?}"),
        (None, Some(_)) => "a value from elsewhere (valueFrom)".into(),
        (None, None) => return None,
    };
    let wanted = collector.clone().unwrap_or_default().endpoint;
    Some(format!(
        "its container {} sets {}={value}, which overrides otlp-collector-host: spans go there, not to {wanted}",
        container.name, set.name
    ))
}

/// The forward plan for one selected controller.
fn forward(
    policy: PolicyView<'_>,
    t: &Observed,
    record: Result<Option<Record>, String>,
    now: i64,
    drifted: &mut Vec<ObjectKey>,
) -> TargetPlan {
    let (kind, key) = (t.controller.kind, t.controller.key());
    let uid = t.controller.metadata.uid.clone().unwrap_or_default();
    let spec = policy.spec;
    let ingress = spec.ingress.as_ref().expect("forward is only planned with spec.ingress");
    let (record, inherited) =
        match super::claim(record, &format!("ingress controller {key}"), policy, t.claimed_by.as_deref()) {
            Ok(super::Claim::Free) => (None, false),
            Ok(super::Claim::Ours(record)) => (Some(record), false),
            // The originals the other policy recorded stay the ones to restore; the record becomes ours.
            Ok(super::Claim::Inherited(record)) => (Some(Record { policy: policy.name.to_string(), ..record }), true),
            Err(held) => return held,
        };
    let Some((container, cm_key)) = config_map_ref(&t.controller) else {
        return TargetPlan::problem(
            Progress::Held,
            reasons::CONFIG_MAP_ARGUMENT_MISSING,
            format!("ingress controller {key} has no container with a --configmap argument"),
            true,
        );
    };
    if cm_key.namespace != key.namespace {
        // Only a ConfigMap of the controller's own namespace: whoever may edit this Deployment must not
        // be able to point crosstrace at a ConfigMap elsewhere.
        return TargetPlan::problem(
            Progress::Held,
            reasons::CONFIG_MAP_OUTSIDE_NAMESPACE,
            format!(
                "ingress controller {key} names ConfigMap {cm_key} outside its namespace; crosstrace writes none there"
            ),
            true,
        );
    }
    let marker = format!("{}/{}", policy.name, policy.generation);
    let what = format!("ingress controller {key}");
    if record.is_none() && annotation(&t.controller.metadata, ROLLED_BACK_ANNOTATION) == Some(&marker) {
        return super::held_rolled_back(&what);
    }

    let collector = spec.collector.clone().unwrap_or_default();
    let desired = otel_config(&collector, &spec.sampling, ingress);
    let current_data = t.config_map.as_ref().and_then(|cm| cm.data.clone()).unwrap_or_default();
    let hash = config_hash(&desired);
    let applied = t.config_map.as_ref().is_some_and(|cm| {
        cm.labels().get(POLICY_LABEL).map(String::as_str) == Some(policy.name)
            && cm.annotations().get(CONFIG_ANNOTATION) == Some(&hash)
    });
    let config_converged = applied && desired.iter().all(|(k, v)| current_data.get(k) == Some(v));
    if applied && !config_converged && record.is_some() {
        drifted.push(key.clone());
    }
    let current_image = container.image.clone().unwrap_or_default();
    let want_image = (!ingress.image.is_empty()).then_some(ingress.image.as_str());

    let mut actions = Vec::new();
    let mut record = match record {
        Some(r) => {
            if inherited {
                actions.push(Action::Record { controller: key.clone(), uid: uid.clone(), record: r.clone() });
            }
            r
        }
        None => {
            let record = Record {
                policy: policy.name.to_string(),
                kind,
                deployment: key.clone(),
                config_map: cm_key.clone(),
                config_map_existed: t.config_map.is_some(),
                original_data: desired.keys().map(|k| (k.clone(), current_data.get(k).cloned())).collect(),
                original_image: None,
                rollout_started: None,
                applied_image: None,
                applied_at_generation: None,
                image_converged: false,
                yielded_image: None,
            };
            actions.push(Action::Record { controller: key.clone(), uid: uid.clone(), record: record.clone() });
            record
        }
    };
    // The label comes right after the record: a new or taken-over controller, or one recorded by a run
    // that stopped before labelling it. (Later record updates leave the label as it is.)
    if label(&t.controller.metadata, POLICY_LABEL).map(String::as_str) != Some(policy.name) {
        actions.push(Action::Label { kind, controller: key.clone(), policy: policy.name.to_string() });
    }
    if !config_converged {
        actions.push(Action::ApplyConfig { config_map: cm_key, data: desired, policy: policy.name.to_string() });
    }
    match want_image {
        Some(image) => {
            let image_plan = image_rollout(policy, &t.controller, &what, container, &record, image, marker, now);
            if let Some(mut plan) = image_plan {
                // The ConfigMap goes first whatever the image does (a rollback reverts it too).
                if !plan.rolled_back {
                    plan.actions.splice(0..0, actions);
                }
                return plan;
            }
        }
        None => {
            if let Some(original) = record.original_image.take() {
                record = Record {
                    rollout_started: None,
                    applied_image: None,
                    applied_at_generation: None,
                    image_converged: false,
                    ..record
                };
                actions.push(Action::RestoreController {
                    kind,
                    controller: key.clone(),
                    uid: uid.clone(),
                    image: (original.image != current_image).then_some(original),
                    keep: Some(record),
                    rolled_back: None,
                });
            } else if record.yielded_image.is_some() {
                record.yielded_image = None;
                actions.push(Action::Record { controller: key.clone(), uid: uid.clone(), record });
            }
        }
    }
    if actions.is_empty() {
        if t.controller.available {
            TargetPlan::state(Progress::Ready)
        } else {
            TargetPlan::problem(
                Progress::Held,
                reasons::TARGET_NOT_AVAILABLE,
                format!("ingress controller {key} has no available replica"),
                false,
            )
        }
    } else {
        TargetPlan { actions, ..TargetPlan::state(Progress::Pending) }
    }
}

/// The image part of one controller's plan, through the rollout engine; `None` when the image needs
/// nothing and the controller's plan is decided by the rest. The owner has the last word on the image:
/// once they replaced crosstrace's image, theirs stays, and it is what a revert leaves.
#[allow(clippy::too_many_arguments)]
fn image_rollout(
    policy: PolicyView<'_>,
    controller: &Workload,
    what: &str,
    container: &Container,
    record: &Record,
    image: &str,
    marker: String,
    now: i64,
) -> Option<TargetPlan> {
    let (kind, key) = (controller.kind, controller.key());
    let uid = controller.metadata.uid.clone().unwrap_or_default();
    let current_image = container.image.clone().unwrap_or_default();
    // Records written before `appliedImage` existed: the image crosstrace wrote is the policy's.
    let applied = record.applied_image.clone().or_else(|| record.original_image.as_ref().map(|_| image.to_string()));
    // The record of the image is written before the image: a controller unchanged since then never got it.
    let never_landed =
        record.applied_at_generation.is_some() && record.applied_at_generation == controller.metadata.generation;
    let changed_by_owner = applied.as_deref().is_some_and(|a| a != current_image) && !never_landed;
    if changed_by_owner || record.yielded_image.as_deref() == Some(image) {
        let message = format!(
            "{what}: its owner changed the image to {current_image} after crosstrace set {image}; the owner's image stays (change spec.ingress.image to roll out another)"
        );
        let held = TargetPlan::problem(Progress::Held, reasons::CHANGED_BY_OWNER, message, false);
        if !changed_by_owner {
            return Some(held);
        }
        // Forget the stale original (a revert must not bring back the image from before the owner's change).
        let yielded = Record {
            original_image: None,
            rollout_started: None,
            applied_image: None,
            applied_at_generation: None,
            image_converged: false,
            yielded_image: Some(image.to_string()),
            ..record.clone()
        };
        return Some(held.with_actions(vec![Action::Record { controller: key, uid, record: yielded }]));
    }
    let written = applied.as_ref().map(|a| Written {
        current: a == image,
        intact: applied.as_deref() == Some(current_image.as_str()),
        converged: record.image_converged,
        since: record.rollout_started.unwrap_or(now),
    });
    let step = rollout::judge(
        written,
        &controller.health("the image"),
        now,
        i64::from(policy.spec.rollout.progress_deadline_seconds),
    );
    if step == rollout::Step::Converged {
        return None;
    }
    let original_image = record.original_image.clone();
    let plan = super::follow(
        step,
        what,
        &policy.spec.rollout,
        |converged, _| {
            let mut next = record.clone();
            if converged {
                next.image_converged = true;
                return vec![Action::Record { controller: key.clone(), uid: uid.clone(), record: next }];
            }
            next.original_image
                .get_or_insert(ContainerImage { container: container.name.clone(), image: current_image });
            next.applied_image = Some(image.to_string());
            next.rollout_started = Some(now);
            next.applied_at_generation = controller.metadata.generation;
            next.image_converged = false;
            next.yielded_image = None;
            let image = ContainerImage { container: container.name.clone(), image: image.to_string() };
            vec![Action::ApplyImage { kind, controller: key.clone(), uid: uid.clone(), image, record: next }]
        },
        || revert(kind, &key, &uid, Some(record), Some(marker)),
    );
    let plan = match &plan.problem {
        Some(p) if plan.rolled_back => {
            let back_to = original_image.map_or_else(|| "its previous state".to_string(), |i| i.image);
            let message = format!("{}; its image is {back_to} again", p.message);
            TargetPlan { problem: Some(super::Problem { message, ..p.clone() }), ..plan }
        }
        _ => plan,
    };
    Some(plan)
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.annotations.as_ref()?.get(key)
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.labels.as_ref()?.get(key)
}

/// Everything that puts one controller back as recorded: ConfigMap first, then the controller, whose
/// record goes last so that a crash halfway leaves enough to finish the job.
fn revert(
    kind: WorkloadKind,
    controller: &ObjectKey,
    uid: &str,
    record: Option<&Record>,
    rolled_back: Option<String>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    if let Some(record) = record {
        actions.push(Action::RestoreConfig {
            config_map: record.config_map.clone(),
            data: record.original_data.clone(),
            delete: !record.config_map_existed,
        });
    }
    actions.push(Action::RestoreController {
        kind,
        controller: controller.clone(),
        uid: uid.to_string(),
        image: record.and_then(|r| r.original_image.clone()),
        keep: None,
        rolled_back,
    });
    actions
}

/// The controllers (Deployments and DaemonSets) the edge layer must look at for a policy: those its
/// `spec.ingress` selects, those it changed before (labelled with its name), which may have left the
/// selection, and those its ledger entries name; each with its record from the ledger in
/// `operator_namespace`.
pub async fn observe(
    client: &Client,
    policy: PolicyView<'_>,
    operator_namespace: &str,
    protected: impl Fn(&str) -> bool,
    claimant: impl Fn(&Workload) -> Option<String>,
) -> Result<Vec<Observed>, super::ObserveError> {
    let mut found: BTreeMap<(ObjectKey, WorkloadKind), Observed> = BTreeMap::new();
    let add = |found: &mut BTreeMap<_, Observed>, controller: Workload, selected: bool| {
        let claimed_by = if selected { claimant(&controller) } else { None };
        let target = Observed { controller, selected, claimed_by, ..Default::default() };
        found.entry((target.controller.key(), target.controller.kind)).or_insert(target);
    };
    let wanted = policy.spec.ingress.as_ref().filter(|_| !policy.deleting);
    let selected = wanted
        .map(|ingress| {
            let selector = ingress_selector(ingress).map_err(super::ObserveError::selector("spec.ingress.selector"))?;
            Ok::<_, super::ObserveError>((ingress.namespace.as_str(), ListParams::default().labels_from(&selector)))
        })
        .transpose()?;
    let labelled = ListParams::default().labels_from(&super::label_equals(POLICY_LABEL, policy.name));
    let ledger_api = Api::<ConfigMap>::namespaced(client.clone(), operator_namespace);
    // Every read of the layer side by side: a reconcile waits for one round trip, not five.
    let (selected, labelled_deployments, labelled_daemonsets, ledger) = futures::try_join!(
        async {
            let Some((namespace, params)) = &selected else { return Ok(None) };
            futures::try_join!(
                list::<Deployment>(client, namespace, params),
                list::<DaemonSet>(client, namespace, params)
            )
            .map(Some)
        },
        list::<Deployment>(client, "", &labelled),
        list::<DaemonSet>(client, "", &labelled),
        ledger_api.get_opt(LEDGER),
    )?;
    if let Some((deployments, daemonsets)) = selected {
        // Never a controller in a protected namespace (`spec.ingress.namespace` empty selects everywhere).
        let allowed = |w: &Workload| !protected(w.metadata.namespace.as_deref().unwrap_or_default());
        let controllers = deployments
            .into_iter()
            .map(Workload::from_deployment)
            .chain(daemonsets.into_iter().map(Workload::from_daemonset));
        for w in controllers.filter(|w| allowed(w)) {
            add(&mut found, w, true);
        }
    }
    for d in labelled_deployments {
        add(&mut found, Workload::from_deployment(d), false);
    }
    for d in labelled_daemonsets {
        add(&mut found, Workload::from_daemonset(d), false);
    }
    let mut entries = super::ledger_entries::<Record>(ledger.as_ref());
    // Controllers this policy recorded that carry its label no more (a revert that stopped halfway).
    for record in entries.values().flatten().filter(|r| r.policy == policy.name) {
        if found.contains_key(&(record.deployment.clone(), record.kind)) {
            continue;
        }
        let (namespace, name) = (&record.deployment.namespace, &record.deployment.name);
        let controller = match record.kind {
            WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await?
                .map(Workload::from_daemonset),
            _ => Api::<Deployment>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await?
                .map(Workload::from_deployment),
        };
        if let Some(controller) = controller {
            add(&mut found, controller, false);
        }
    }
    for ((key, kind), target) in found.iter_mut() {
        // The entry of this very controller: same UID, and recorded for the same kind, namespace and name.
        let uid = target.controller.metadata.uid.clone().unwrap_or_default();
        target.record = match entries.remove(&uid) {
            Some(Ok(record)) if record.deployment == *key && record.kind == *kind => Ok(Some(record)),
            Some(Ok(_)) | None => Ok(None),
            Some(Err(e)) => Err(e),
        };
        if let Some((_, cm)) = config_map_ref(&target.controller).filter(|(_, cm)| cm.namespace == key.namespace) {
            target.config_map = Api::<ConfigMap>::namespaced(client.clone(), &cm.namespace).get_opt(&cm.name).await?;
        }
    }
    Ok(found.into_values().collect())
}

/// Lists objects of one kind in `namespace` (empty: every namespace).
async fn list<K>(client: &Client, namespace: &str, params: &ListParams) -> kube::Result<Vec<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> =
        if namespace.is_empty() { Api::all(client.clone()) } else { Api::namespaced(client.clone(), namespace) };
    Ok(api.list(params).await?.items)
}

/// The selector of `spec.ingress`, defaulting to the ingress-nginx controller labels.
pub fn ingress_selector(ingress: &IngressSpec) -> Result<kube::core::Selector, String> {
    match &ingress.selector {
        Some(s) => super::selector(s),
        None => Ok(kube::core::Selector::from_iter(
            DEFAULT_SELECTOR.map(|(k, v)| kube::core::Expression::Equal(k.into(), v.into())),
        )),
    }
}

/// Does `spec.ingress` of a policy select this controller?
pub fn selects(ingress: &IngressSpec, controller: &ObjectMeta) -> bool {
    (ingress.namespace.is_empty() || controller.namespace.as_deref() == Some(ingress.namespace.as_str()))
        && ingress_selector(ingress).is_ok_and(|s| super::matches(&s, controller.labels.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CollectorSpec, RolloutSpec, TracingPolicySpec};
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use serde_json::json;

    const NOW: i64 = 1_000_000;

    fn spec(image: &str) -> TracingPolicySpec {
        TracingPolicySpec {
            collector: Some(CollectorSpec { endpoint: "otel.observability.svc:4317".into(), ..Default::default() }),
            sampling: SamplingSpec { ratio: "0.25".into(), parent_based: true },
            ingress: Some(IngressSpec { service_name: "edge".into(), image: image.into(), ..Default::default() }),
            rollout: RolloutSpec { progress_deadline_seconds: 60, ..Default::default() },
            ..Default::default()
        }
    }

    fn view(spec: &TracingPolicySpec) -> PolicyView<'_> {
        PolicyView { generation: 2, ..PolicyView::new("storefront", spec) }
    }

    fn controller(name: &str, image: &str, healthy: bool) -> Deployment {
        let mut d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ingress-nginx", "generation": 1},
            "spec": {
                "selector": {},
                "template": {"spec": {"containers": [{
                    "name": "controller",
                    "image": image,
                    "args": ["/nginx-ingress-controller", "--configmap=$(POD_NAMESPACE)/ingress-nginx-controller"],
                }]}},
            },
        }))
        .unwrap();
        d.spec.get_or_insert_with(DeploymentSpec::default).replicas = Some(1);
        let ready = i32::from(healthy);
        d.status = Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(1),
            updated_replicas: Some(1),
            available_replicas: Some(ready),
            ..Default::default()
        });
        d
    }

    fn config_map(data: &[(&str, &str)]) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("ingress-nginx-controller".into());
        cm.metadata.namespace = Some("ingress-nginx".into());
        cm.data = Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        cm
    }

    fn observed(d: Deployment, cm: Option<ConfigMap>) -> Observed {
        Observed { controller: Workload::from_deployment(d), config_map: cm, selected: true, ..Default::default() }
    }

    /// The state after the plan's actions took effect, as the API server would hold it.
    fn applied(mut t: Observed, actions: &[Action]) -> Observed {
        for action in actions {
            match action {
                Action::Record { record, .. } => t.record = Ok(Some(record.clone())),
                Action::Label { policy, .. } => {
                    t.controller.metadata.labels.get_or_insert_default().insert(POLICY_LABEL.into(), policy.clone());
                }
                Action::ApplyConfig { data, policy, .. } => {
                    let cm = t.config_map.get_or_insert_with(|| config_map(&[]));
                    cm.data.get_or_insert_default().extend(data.clone());
                    cm.labels_mut().insert(POLICY_LABEL.into(), policy.clone());
                    cm.annotations_mut().insert(CONFIG_ANNOTATION.into(), config_hash(data));
                }
                Action::ApplyImage { image, record, .. } => {
                    t.record = Ok(Some(record.clone()));
                    set_image(&mut t.controller, &image.image);
                    // A new template is a new generation.
                    *t.controller.metadata.generation.get_or_insert(0) += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        t
    }

    fn set_image(w: &mut Workload, image: &str) {
        w.template.full_mut().unwrap().spec.as_mut().unwrap().containers[0].image = Some(image.into());
    }

    #[test]
    fn writes_every_otel_key_explicitly() {
        let s = spec("");
        let config = otel_config(s.collector.as_ref().unwrap(), &s.sampling, s.ingress.as_ref().unwrap());
        let expected: BTreeMap<String, String> = [
            ("enable-opentelemetry", "true"),
            ("opentelemetry-trust-incoming-span", "true"),
            ("opentelemetry-operation-name", ""),
            ("otlp-collector-host", "otel.observability.svc"),
            ("otlp-collector-port", "4317"),
            ("otel-service-name", "edge"),
            ("otel-sampler", "TraceIdRatioBased"),
            ("otel-sampler-ratio", "0.25"),
            ("otel-sampler-parent-based", "true"),
            ("otel-max-queuesize", "2048"),
            ("otel-schedule-delay-millis", "5000"),
            ("otel-max-export-batch-size", "512"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(config, expected);
    }

    #[test]
    fn ratios_and_endpoints_are_normalized() {
        assert_eq!(split_host_port("[fd00::1]:4317"), ("fd00::1", "4317"));
        assert_eq!(split_host_port("10.0.0.5:4317"), ("10.0.0.5", "4317"));
    }

    #[test]
    fn finds_the_config_map_from_the_controller_argument() {
        let d = controller("c", "registry.k8s.io/ingress-nginx/controller:v1.12.1", true);
        let w = Workload::from_deployment(d.clone());
        let (container, key) = config_map_ref(&w).unwrap();
        assert_eq!(container.name, "controller");
        assert_eq!(key, ObjectKey::new("ingress-nginx", "ingress-nginx-controller"));

        let mut split = d.clone();
        split.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0].args =
            Some(vec!["--configmap".into(), "edge-config".into()]);
        assert_eq!(
            config_map_ref(&Workload::from_deployment(split)).unwrap().1,
            ObjectKey::new("ingress-nginx", "edge-config")
        );

        let mut none = d;
        none.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0].args = None;
        assert!(config_map_ref(&Workload::from_deployment(none)).is_none());
    }

    #[test]
    fn warns_about_retired_and_vulnerable_versions() {
        let warned = |image: &str| version_warning(image).unwrap_or_default();
        // Upstream: retired, every image exposed, whatever the version; older ones to CVE-2025-1974 too.
        for image in [
            "registry.k8s.io/ingress-nginx/controller:v1.15.1@sha256:abc",
            "registry.k8s.io/ingress-nginx/controller-chroot:v1.14.3",
            "registry.k8s.io/ingress-nginx/controller@sha256:abc",
        ] {
            assert!(warned(image).contains("CVE-2026-42945") && !warned(image).contains("1974"), "{image}");
        }
        for image in ["registry.k8s.io/ingress-nginx/controller:v1.12.0", "k8s.gcr.io/ingress-nginx/controller:v1.9.6"]
        {
            assert!(warned(image).contains("CVE-2026-42945") && warned(image).contains("CVE-2025-1974"), "{image}");
        }
        // Forks: up to the last upstream version it is upstream's code; later and calendar tags are theirs.
        assert!(warned("cgr.example/chainguard/ingress-nginx:v1.15.1-chainguard").contains("its vendor"));
        assert!(warned("localhost:5000/ingress-nginx/controller:v1.11.4").contains("CVE-2025-1974"));
        for image in [
            "cgr.example/chainguard/ingress-nginx:v1.15.5-chainguard",
            "quay.example/fork/ingress-nginx:2026.04.1",
            "quay.example/fork/ingress-nginx:20260401",
            "localhost:5000/controller",
            "localhost:5000/controller:latest",
        ] {
            assert_eq!(version_warning(image), None, "{image}");
        }
        assert_eq!(tag_of("v1.15.5-chainguard"), Tag::Semver((1, 15, 5), true));
        assert_eq!(tag_of("2026.04.1"), Tag::Calendar);
    }

    #[test]
    fn the_collector_host_keeps_ipv6_brackets_because_ingress_nginx_joins_host_and_port_as_text() {
        let s = spec("");
        let collector = CollectorSpec { endpoint: "[fd00::1]:4317".into(), ..Default::default() };
        let config = otel_config(&collector, &s.sampling, s.ingress.as_ref().unwrap());
        assert_eq!(config["otlp-collector-host"], "[fd00::1]");
        assert_eq!(config["otlp-collector-port"], "4317");
    }

    #[test]
    fn an_endpoint_set_on_the_controller_container_is_reported() {
        let s = spec("");
        let mut d = controller("c", "controller:v1.15.5-fork", true);
        let container = &mut d.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0];
        container.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            value: Some("http://elsewhere:4317".into()),
            ..Default::default()
        }]);
        let t = observed(d, Some(config_map(&[])));
        let plan = plan(view(&s), std::slice::from_ref(&t), NOW);
        assert_eq!(plan.report.warnings.len(), 1, "{:?}", plan.report.warnings);
        let warning = &plan.report.warnings[0];
        assert!(
            warning.contains("OTEL_EXPORTER_OTLP_ENDPOINT=\"http://elsewhere:4317\"") && warning.contains("overrides")
        );
    }

    #[test]
    fn tracing_config_changed_by_someone_else_is_drift_and_applied_again() {
        let s = spec("");
        let collector = s.collector.clone().unwrap();
        let desired = otel_config(&collector, &s.sampling, s.ingress.as_ref().unwrap());
        let mut cm = config_map(&desired.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
        cm.metadata.labels = Some([(POLICY_LABEL.to_string(), "storefront".to_string())].into());
        cm.metadata.annotations = Some([(CONFIG_ANNOTATION.to_string(), config_hash(&desired))].into());
        let mut t = observed(controller("c", "controller:v1.15.5-fork", true), Some(cm.clone()));
        t.controller.metadata.labels.get_or_insert_default().insert(POLICY_LABEL.into(), "storefront".into());
        t.record = Ok(Some(Record {
            policy: "storefront".into(),
            kind: WorkloadKind::Deployment,
            deployment: t.controller.key(),
            config_map: ObjectKey::new("ingress-nginx", "ingress-nginx-controller"),
            config_map_existed: true,
            original_data: BTreeMap::new(),
            original_image: None,
            rollout_started: None,
            applied_image: None,
            applied_at_generation: None,
            image_converged: false,
            yielded_image: None,
        }));
        let settled = plan(view(&s), std::slice::from_ref(&t), NOW);
        assert!(settled.actions.is_empty() && settled.drifted.is_empty(), "{settled:?}");

        cm.data.as_mut().unwrap().insert("otel-sampler-ratio".into(), "1".into());
        t.config_map = Some(cm);
        let fix = plan(view(&s), std::slice::from_ref(&t), NOW);
        assert_eq!(fix.drifted, vec![t.controller.key()]);
        assert!(matches!(fix.actions.as_slice(), [Action::ApplyConfig { .. }]), "{:?}", fix.actions);

        // A new spec is not drift, though the data differs too.
        let mut changed = s.clone();
        changed.sampling.ratio = "0.5".into();
        assert!(plan(view(&changed), std::slice::from_ref(&t), NOW).drifted.is_empty());
    }

    #[test]
    fn records_originals_before_the_first_change_then_converges_with_no_action() {
        let s = spec("");
        let cm = config_map(&[("use-forwarded-headers", "true"), ("otel-sampler-ratio", "0.5")]);
        let t = observed(controller("c", "controller:v1.12.1", true), Some(cm));
        let plan = plan(view(&s), std::slice::from_ref(&t), NOW);
        let Action::Record { record, .. } = &plan.actions[0] else {
            panic!("first action must record: {:?}", plan.actions)
        };
        assert!(record.config_map_existed);
        assert_eq!(
            record.original_data["otel-sampler-ratio"],
            Some("0.5".into()),
            "a user's OTel key is kept to restore"
        );
        assert_eq!(record.original_data["enable-opentelemetry"], None, "an absent key is recorded as absent");
        assert!(matches!(&plan.actions[1], Action::Label { policy, .. } if policy == "storefront"), "then the label");
        assert!(matches!(plan.actions[2], Action::ApplyConfig { .. }));
        assert_eq!(plan.actions.len(), 3);
        assert_eq!(plan.report.in_flight, 1);

        let after = applied(t, &plan.actions);
        let again = super::plan(view(&s), &[after], NOW + 1);
        assert!(again.actions.is_empty(), "a converged controller needs no write: {:?}", again.actions);
        assert_eq!((again.report.selected, again.report.ready), (1, 1));
    }

    #[test]
    fn image_rollout_is_health_gated_and_rolled_back_after_the_deadline() {
        let s = spec("controller:v1.12.1-otel");
        let t = observed(controller("c", "controller:v1.12.1", true), Some(config_map(&[])));
        let first = plan(view(&s), std::slice::from_ref(&t), NOW);
        let Some(Action::ApplyImage { record, image, .. }) = first.actions.last() else {
            panic!("{:?}", first.actions)
        };
        assert_eq!(image.image, "controller:v1.12.1-otel");
        assert_eq!(record.original_image.as_ref().unwrap().image, "controller:v1.12.1");
        assert_eq!(record.rollout_started, Some(NOW));

        // The new pods never become available.
        let mut rolling = applied(t, &first.actions);
        // Its new generation is not rolled out.
        rolling.controller.rolled_out = false;
        let waiting = plan(view(&s), std::slice::from_ref(&rolling), NOW + 30);
        assert!(waiting.actions.is_empty());
        assert_eq!(waiting.report.in_flight, 1);

        let failed = plan(view(&s), std::slice::from_ref(&rolling), NOW + 60);
        assert_eq!(failed.report.rolled_back, 1);
        assert!(failed.report.stopped);
        assert_eq!(failed.report.problems[0].reason, "RolledBack");
        match &failed.actions[..] {
            [
                Action::RestoreConfig { delete: false, .. },
                Action::RestoreController { image: Some(image), keep: None, rolled_back: Some(marker), .. },
            ] => {
                assert_eq!(image.image, "controller:v1.12.1");
                assert_eq!(marker, "storefront/2");
            }
            other => panic!("unexpected rollback {other:?}"),
        }
    }

    #[test]
    fn a_rolled_back_generation_is_not_retried() {
        let s = spec("controller:broken");
        let mut d = controller("c", "controller:v1.12.1", true);
        d.annotations_mut().insert(ROLLED_BACK_ANNOTATION.into(), "storefront/2".into());
        let plan = plan(view(&s), &[observed(d, Some(config_map(&[])))], NOW);
        assert!(plan.actions.is_empty());
        assert_eq!(plan.report.rolled_back, 1);
        assert_eq!(plan.report.problems[0].reason, "RolledBack");
    }

    #[test]
    fn delete_restores_everything_config_map_first() {
        let s = spec("controller:otel");
        let t =
            observed(controller("c", "controller:v1.12.1", true), Some(config_map(&[("otel-sampler-ratio", "0.5")])));
        let first = plan(view(&s), std::slice::from_ref(&t), NOW);
        let after = applied(t, &first.actions);
        let deleting = PolicyView { deleting: true, ..view(&s) };
        let revert = plan(deleting, &[after], NOW);
        match &revert.actions[..] {
            [
                Action::RestoreConfig { data, delete: false, .. },
                Action::RestoreController { image: Some(image), keep: None, rolled_back: None, .. },
            ] => {
                assert_eq!(data["otel-sampler-ratio"], Some("0.5".into()));
                assert_eq!(data["enable-opentelemetry"], None);
                assert_eq!(image.image, "controller:v1.12.1");
            }
            other => panic!("unexpected revert {other:?}"),
        }
    }

    #[test]
    fn a_missing_config_map_is_created_and_deleted_again() {
        let s = spec("");
        let t = observed(controller("c", "controller:v1.12.1", true), None);
        let first = plan(view(&s), std::slice::from_ref(&t), NOW);
        let Action::Record { record, .. } = &first.actions[0] else { panic!() };
        assert!(!record.config_map_existed);
        let after = applied(t, &first.actions);
        let revert = plan(PolicyView { deleting: true, ..view(&s) }, &[after], NOW);
        assert!(matches!(revert.actions[0], Action::RestoreConfig { delete: true, .. }));
    }

    #[test]
    fn the_older_policy_keeps_a_controller() {
        let s = spec("");
        let mut t = observed(controller("c", "controller:v1.12.1", true), Some(config_map(&[])));
        t.claimed_by = Some("older".into());
        let plan = plan(view(&s), &[t], NOW);
        assert!(plan.actions.is_empty());
        assert_eq!(plan.report.problems[0].reason, "Conflict");
        assert!(plan.report.problems[0].message.contains("older"));
    }

    #[test]
    fn missing_configmap_argument_is_reported_not_guessed() {
        let s = spec("");
        let mut d = controller("c", "controller:v1.12.1", true);
        d.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0].args = None;
        let plan = plan(view(&s), &[observed(d, None)], NOW);
        assert!(plan.actions.is_empty());
        assert_eq!(plan.report.problems[0].reason, "ConfigMapArgumentMissing");
    }

    #[test]
    fn batches_respect_max_concurrent_and_pause() {
        let mut s = spec("controller:otel");
        s.rollout.max_concurrent = 2;
        let targets: Vec<Observed> = (0..5)
            .map(|i| observed(controller(&format!("c{i}"), "controller:v1.12.1", true), Some(config_map(&[]))))
            .collect();
        let first = plan(view(&s), &targets, NOW);
        assert_eq!(first.report.in_flight, 2);
        assert_eq!(first.report.pending, 3);
        assert_eq!(first.actions.iter().filter(|a| matches!(a, Action::ApplyImage { .. })).count(), 2);

        s.rollout.paused = true;
        let paused = plan(view(&s), &targets, NOW);
        assert!(paused.actions.is_empty());
        assert_eq!(paused.report.pending, 5);
    }

    #[test]
    fn leaving_the_selection_reverts_and_removing_the_image_restores_it() {
        let s = spec("controller:otel");
        let t = observed(controller("c", "controller:v1.12.1", true), Some(config_map(&[])));
        let after = applied(t.clone(), &plan(view(&s), std::slice::from_ref(&t), NOW).actions);

        let without_image = spec("");
        let restore = plan(view(&without_image), std::slice::from_ref(&after), NOW);
        match &restore.actions[..] {
            [Action::RestoreController { image: Some(image), keep: Some(record), .. }] => {
                assert_eq!(image.image, "controller:v1.12.1");
                assert!(record.original_image.is_none(), "the kept record no longer claims the image");
            }
            other => panic!("unexpected {other:?}"),
        }

        let unselected = Observed { selected: false, ..after };
        let revert = plan(view(&s), &[unselected], NOW);
        assert_eq!(revert.report.selected, 0);
        assert!(matches!(
            revert.actions[..],
            [Action::RestoreConfig { .. }, Action::RestoreController { keep: None, .. }]
        ));
    }

    #[test]
    fn an_image_recorded_but_never_written_is_written_again_not_taken_for_the_owners() {
        let s = spec("controller:v1.12.1-otel");
        let t = observed(controller("c", "controller:v1.12.1", true), Some(config_map(&[])));
        let first = plan(view(&s), std::slice::from_ref(&t), NOW);
        let (Some(Action::ApplyImage { record, .. }), rest) =
            first.actions.split_last().map_or((None, &[][..]), |(l, r)| (Some(l), r))
        else {
            panic!("{:?}", first.actions)
        };
        // The controller stopped after the ledger write of the image's record, before the image itself.
        let mut stopped = applied(t, rest);
        stopped.record = Ok(Some(record.clone()));
        let next = plan(view(&s), std::slice::from_ref(&stopped), NOW + 5);
        assert!(next.report.problems.iter().all(|p| p.reason != reasons::CHANGED_BY_OWNER), "{:?}", next.report);
        assert!(
            matches!(next.actions.last(), Some(Action::ApplyImage { image, .. }) if image.image == "controller:v1.12.1-otel"),
            "{:?}",
            next.actions
        );

        // The same record, but the controller changed since (a new generation): that is the owner's doing.
        stopped.controller.metadata.generation = Some(2);
        let owners = plan(view(&s), std::slice::from_ref(&stopped), NOW + 5);
        assert_eq!(owners.report.problems[0].reason, reasons::CHANGED_BY_OWNER);
    }

    /// A controller whose instrumented image rolled out and whose convergence is recorded.
    fn instrumented(s: &TracingPolicySpec) -> Observed {
        let t = observed(controller("c", "controller:v1.12.1", true), Some(config_map(&[])));
        let rolled = applied(t.clone(), &plan(view(s), &[t], NOW).actions);
        let healthy = plan(view(s), std::slice::from_ref(&rolled), NOW + 5);
        assert!(matches!(healthy.actions[..], [Action::Record { .. }]), "{:?}", healthy.actions);
        let done = applied(rolled, &healthy.actions);
        assert!(plan(view(s), std::slice::from_ref(&done), NOW + 6).actions.is_empty());
        done
    }

    #[test]
    fn a_converged_controller_scaled_by_its_owner_is_reported_not_rolled_back() {
        let s = spec("controller:v1.12.1-otel");
        let mut scaled = instrumented(&s);
        (scaled.controller.rolled_out, scaled.controller.available) = (false, false);
        let p = plan(view(&s), &[scaled], NOW + 3600);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!((p.report.unhealthy, p.report.rolled_back), (1, 0));
        assert_eq!(p.report.problems[0].reason, reasons::TARGET_UNHEALTHY);
    }

    #[test]
    fn the_owners_new_image_stays_and_is_what_a_revert_leaves() {
        let s = spec("controller:v1.12.1-otel");
        let mut upgraded = instrumented(&s);
        set_image(&mut upgraded.controller, "controller:v1.13.0");
        let p = plan(view(&s), std::slice::from_ref(&upgraded), NOW + 100);
        assert_eq!(p.report.problems[0].reason, reasons::CHANGED_BY_OWNER);
        let [Action::Record { record, .. }] = &p.actions[..] else { panic!("{:?}", p.actions) };
        assert_eq!(record.original_image, None, "the pre-upgrade image is forgotten");
        let yielded = applied(upgraded, &p.actions);
        let again = plan(view(&s), std::slice::from_ref(&yielded), NOW + 101);
        assert!(again.actions.is_empty(), "the owner's image is not overwritten: {:?}", again.actions);

        let deleting = PolicyView { deleting: true, ..view(&s) };
        let revert = plan(deleting, &[yielded], NOW + 102);
        assert!(
            revert.actions.iter().all(|a| !matches!(a, Action::RestoreController { image: Some(_), .. })),
            "{:?}",
            revert.actions
        );
    }

    #[test]
    fn a_forged_record_on_a_tenants_deployment_is_reported_and_chooses_nothing() {
        let s = spec("");
        let mut fake = controller("fake", "controller:v1.12.1", true);
        fake.metadata.namespace = Some("tenant".into());
        let forged = json!({"policy": "storefront", "deployment": {"namespace": "tenant", "name": "fake"},
            "configMap": {"namespace": "ingress-nginx", "name": "victim"}, "configMapExisted": false,
            "originalData": {"x": "evil"}});
        fake.annotations_mut().insert(RECORD_ANNOTATION.into(), forged.to_string());
        fake.labels_mut().insert(POLICY_LABEL.into(), "storefront".into());
        // Labelled with the policy's name but not selected, and no ledger entry of its own.
        let t = Observed { controller: Workload::from_deployment(fake), ..Default::default() };
        let p = plan(view(&s), &[t], NOW);
        assert!(
            p.actions.iter().all(|a| !matches!(a, Action::RestoreConfig { .. } | Action::ApplyConfig { .. })),
            "{:?}",
            p.actions
        );
        assert_eq!(p.report.problems[0].reason, reasons::FORGED_RECORD);
        assert!(p.report.problems[0].message.contains("tenant/fake"));
    }

    #[test]
    fn a_config_map_outside_the_controllers_namespace_is_never_written() {
        let s = spec("");
        let mut d = controller("c", "controller:v1.12.1", true);
        let args = vec!["/nginx-ingress-controller".to_string(), "--configmap=kube-system/coredns".to_string()];
        d.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0].args = Some(args);
        let p = plan(view(&s), &[observed(d, None)], NOW);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.report.problems[0].reason, reasons::CONFIG_MAP_OUTSIDE_NAMESPACE);
    }
}
