//! One module per layer. Each selects its targets, plans (purely) what must change on them, and judges
//! their health; the controller runs the plan and turns the layer's [`LayerReport`] into status.

pub mod debug;
pub mod gateway;
pub mod health;
pub mod ingress;
pub mod network;
pub mod reasons;
pub mod rollout;
pub mod stores;
pub mod workloads;

use std::fmt;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Expression, Selector, SelectorExt};
use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::{RolloutSpec, TracingPolicySpec};
use rollout::Step;

/// Why a layer could not observe what it needs.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("reading the cluster")]
    Kube(#[from] kube::Error),
    /// A selector of the spec the operator cannot use (the schema accepted it): bad input, waits for a
    /// spec change.
    #[error("{field}: {message}")]
    Selector { field: &'static str, message: String },
}

impl ObserveError {
    fn selector(field: &'static str) -> impl FnOnce(String) -> Self {
        move |message| ObserveError::Selector { field, message }
    }
}

/// Namespace and name of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// The key of a namespaced object from its metadata.
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A policy as every layer's plan sees it.
#[derive(Clone, Copy, Debug)]
pub struct PolicyView<'a> {
    pub name: &'a str,
    /// For owner references of objects the policy creates.
    pub uid: &'a str,
    pub generation: i64,
    pub spec: &'a TracingPolicySpec,
    /// The policy is being deleted: every layer only reverts.
    pub deleting: bool,
    /// Existing policies created before this one: a target they hold stays theirs.
    pub older: &'a BTreeSet<String>,
}

static NO_POLICIES: BTreeSet<String> = BTreeSet::new();

impl<'a> PolicyView<'a> {
    /// A live policy at generation 1 with no older policy around.
    pub fn new(name: &'a str, spec: &'a TracingPolicySpec) -> Self {
        Self { name, uid: "", generation: 1, spec, deleting: false, older: &NO_POLICIES }
    }
}

/// A record a layer keeps in an annotation of a target it changed, naming the owning policy.
pub trait Owned {
    fn policy(&self) -> &str;
}

/// A ledger's entries (the edge layers keep their records in a ConfigMap of the operator's namespace),
/// by target UID; an entry that cannot be read is kept as its error.
pub fn ledger_entries<R: DeserializeOwned>(ledger: Option<&ConfigMap>) -> BTreeMap<String, Result<R, String>> {
    let data = ledger.and_then(|cm| cm.data.as_ref());
    data.into_iter()
        .flatten()
        .map(|(uid, raw)| {
            (uid.clone(), serde_json::from_str(raw).map_err(|e| format!("its ledger entry is unreadable: {e}")))
        })
        .collect()
}

/// The policies a ledger's readable entries name.
pub fn ledger_policies<R: DeserializeOwned + Owned>(ledger: &ConfigMap) -> BTreeSet<String> {
    ledger_entries::<R>(Some(ledger)).values().flatten().map(|r| r.policy().to_string()).collect()
}

/// Reads the JSON record a layer keeps under `key` in a target's annotations.
pub fn read_record<R: DeserializeOwned>(
    annotations: Option<&BTreeMap<String, String>>,
    key: &str,
) -> Result<Option<R>, String> {
    match annotations.and_then(|a| a.get(key)) {
        None => Ok(None),
        Some(raw) => serde_json::from_str(raw).map(Some).map_err(|e| format!("annotation {key} is unreadable: {e}")),
    }
}

/// Whose a target is, as far as this policy is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim<R> {
    /// Nobody changed it yet.
    Free,
    /// This policy changed it; its record.
    Ours(R),
    /// A policy that is not older than this one (a newer one that got there first, e.g. created in the
    /// same second and reconciled before this one was seen, or one that no longer exists) changed it:
    /// this policy takes it over, keeping the record's facts about the target's original state.
    Inherited(R),
}

/// The target's claim if this policy may act on it; otherwise the plan that reports why not (an
/// unreadable record, or an older policy owning or having the first claim on the target). Seniority is
/// the same in every layer: oldest `creationTimestamp`, then name ([`PolicyView::older`]).
pub fn claim<R: Owned, A>(
    record: Result<Option<R>, String>,
    what: &str,
    policy: PolicyView<'_>,
    claimed_by: Option<&str>,
) -> Result<Claim<R>, TargetPlan<A>> {
    let record = record
        .map_err(|m| TargetPlan::problem(Progress::Held, reasons::TARGET_BROKEN, format!("{what}: {m}"), true))?;
    let holder = record.as_ref().map(|r| r.policy().to_string()).filter(|p| p != policy.name);
    if let Some(other) = holder.as_deref().filter(|p| policy.older.contains(*p)).or(claimed_by) {
        return Err(TargetPlan::problem(
            Progress::Held,
            reasons::CONFLICT,
            format!("{what} is already traced by TracingPolicy {other}"),
            true,
        ));
    }
    Ok(match (record, holder) {
        (None, _) => Claim::Free,
        (Some(r), None) => Claim::Ours(r),
        (Some(r), Some(_)) => Claim::Inherited(r),
    })
}

/// A problem a layer reports on one target; it becomes part of a condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason.
    pub reason: &'static str,
    pub message: String,
    /// Counts toward `Degraded` (a rollback, a conflict, a broken target), not only toward not-ready.
    pub degraded: bool,
}

/// What a layer's plan says about its targets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerReport {
    pub selected: usize,
    pub ready: usize,
    pub rolled_back: usize,
    /// Targets changed and not yet healthy.
    pub in_flight: usize,
    /// Targets that still need a change the rollout has not started (batch full, paused or stopped).
    pub pending: usize,
    /// Converged targets that are unhealthy now because of their owner (reported, never rolled back).
    pub unhealthy: usize,
    /// Targets whose owner holds crosstrace's change (OnDelete, a paused Deployment).
    pub waiting: usize,
    /// Targets held by a conflict or a broken object, not rolled back: nothing to do until something changes.
    pub blocked: usize,
    /// A failed batch stopped the rollout for this generation.
    pub stopped: bool,
    /// Writes crosstrace planned for the layer's targets were still in flight, or not started yet, when
    /// its reconcile ended: the layer is not ready until the reconcile their answers wake says so (a
    /// target counted ready because its convergence is being recorded may meet its owner's change first).
    pub writing: bool,
    pub problems: Vec<Problem>,
    /// Notes for the layer's Ready condition that are not problems (e.g. a vulnerable controller version).
    pub warnings: Vec<String>,
}

/// FNV-1a of a value's JSON: stable across builds, so what one version of the operator wrote (a
/// workload's injection hash, an edge ConfigMap's config hash) is understood by the next.
pub fn hash_of(value: &serde_json::Value) -> String {
    let hash = value
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

impl LayerReport {
    /// Every selected target in exactly one state, so that the counts add up to `selected` (the
    /// `crosstrace_targets` gauge can be summed over `state`).
    pub fn states(&self) -> [(&'static str, usize); 7] {
        [
            ("ready", self.ready),
            ("inFlight", self.in_flight),
            ("pending", self.pending),
            ("unhealthy", self.unhealthy),
            ("waiting", self.waiting),
            ("rolledBack", self.rolled_back),
            ("blocked", self.blocked),
        ]
    }
}

/// Where a target stands, as far as rollout batching is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Needs no change and is healthy.
    Ready,
    /// Changed, not healthy yet.
    InFlight,
    /// Needs a change that has not started.
    Pending,
    /// Rolled back, conflicting or broken: nothing to do until something changes.
    Held,
    /// Converged, and unhealthy now because of its owner: watched, takes no rollout slot.
    Unhealthy,
    /// crosstrace's change waits for the target's owner: watched, takes no rollout slot.
    Waiting,
}

/// The rollout gate shared by every layer: how many new targets may start changing now.
#[derive(Clone, Copy, Debug)]
pub struct Gate {
    free: usize,
    open: bool,
}

impl Gate {
    /// `in_flight` targets already use slots; a paused or stopped rollout starts nothing new.
    pub fn new(max_concurrent: i32, in_flight: usize, paused: bool, stopped: bool) -> Self {
        let max = usize::try_from(max_concurrent.max(1)).unwrap_or(1);
        Self { free: max.saturating_sub(in_flight), open: !paused && !stopped }
    }

    /// Takes a slot for one more target, if there is one.
    pub fn admit(&mut self) -> bool {
        if self.open && self.free > 0 {
            self.free -= 1;
            true
        } else {
            false
        }
    }
}

/// What one target needs: where it stands, the changes that move it on (in order), and what to
/// report about it.
#[derive(Clone, Debug)]
pub struct TargetPlan<A> {
    pub progress: Progress,
    pub actions: Vec<A>,
    pub problem: Option<Problem>,
    pub rolled_back: bool,
}

impl<A> TargetPlan<A> {
    pub fn state(progress: Progress) -> Self {
        Self { progress, actions: vec![], problem: None, rolled_back: false }
    }

    pub fn problem(progress: Progress, reason: &'static str, message: String, degraded: bool) -> Self {
        Self { problem: Some(Problem { reason, message, degraded }), ..Self::state(progress) }
    }

    pub fn with_actions(self, actions: Vec<A>) -> Self {
        Self { actions, ..self }
    }

    pub fn rolled_back(self) -> Self {
        Self { rolled_back: true, ..self }
    }
}

/// The rollout shared by every layer: targets already in flight keep their slots, pending targets
/// start in order while slots are free (none while paused, or once a batch failed), and the report
/// counts them. Returns the actions to run, in target order, the convergence marks after the rest.
pub fn schedule<A>(targets: Vec<TargetPlan<A>>, rollout: &RolloutSpec, report: &mut LayerReport) -> Vec<A> {
    let in_flight = targets.iter().filter(|t| t.progress == Progress::InFlight).count();
    let stopped = targets.iter().any(|t| t.rolled_back);
    let mut gate = Gate::new(rollout.max_concurrent, in_flight, rollout.paused, stopped);
    let mut actions = Vec::new();
    // Recording a convergence moves no rollout on: those writes go last, so that a write budget that
    // runs out leaves them, not the next injections, to the next reconcile.
    let mut marks = Vec::new();
    for target in targets {
        match target.progress {
            Progress::Ready => report.ready += 1,
            Progress::InFlight => report.in_flight += 1,
            Progress::Pending if gate.admit() => report.in_flight += 1,
            Progress::Pending => {
                report.pending += 1;
                continue;
            }
            Progress::Held => report.blocked += usize::from(!target.rolled_back),
            Progress::Unhealthy => report.unhealthy += 1,
            Progress::Waiting => report.waiting += 1,
        }
        report.rolled_back += usize::from(target.rolled_back);
        report.problems.extend(target.problem);
        match target.progress {
            Progress::Ready => marks.extend(target.actions),
            _ => actions.extend(target.actions),
        }
    }
    report.stopped = stopped;
    actions.extend(marks);
    actions
}

/// Turns the engine's [`Step`] for one target into that target's plan. `what` names the target in
/// messages; `write(converged, restart_clock)` builds the writes that put crosstrace's revision on it
/// (`converged`: record that it is healthy; `restart_clock`: its deadline starts now); `roll_back`
/// builds the writes that take it off again and leave the no-retry marker.
pub fn follow<A>(
    step: Step,
    what: &str,
    rollout: &RolloutSpec,
    write: impl FnOnce(bool, bool) -> Vec<A>,
    roll_back: impl FnOnce() -> Vec<A>,
) -> TargetPlan<A> {
    match step {
        Step::Write => TargetPlan::state(Progress::Pending).with_actions(write(false, true)),
        Step::Reapply => TargetPlan::state(Progress::InFlight).with_actions(write(false, true)),
        Step::Changing => TargetPlan::state(Progress::InFlight),
        Step::MarkConverged => TargetPlan::state(Progress::Ready).with_actions(write(true, false)),
        Step::Converged => TargetPlan::state(Progress::Ready),
        Step::OwnerUnhealthy(why) => TargetPlan::problem(
            Progress::Unhealthy,
            reasons::TARGET_UNHEALTHY,
            format!(
                "{what} is unhealthy ({why}); its owner changed it after crosstrace's change had converged, which stays in place"
            ),
            false,
        ),
        Step::Waiting { reason, message } => {
            TargetPlan::problem(Progress::Waiting, reason, format!("{what}: {message}"), false)
        }
        Step::Failed(why) if rollout.auto_rollback => TargetPlan::problem(
            Progress::Held,
            reasons::ROLLED_BACK,
            format!("{what} {why} with crosstrace's change; it was rolled back (change the policy to retry)"),
            true,
        )
        .with_actions(roll_back())
        .rolled_back(),
        Step::Failed(why) => TargetPlan::problem(
            Progress::Held,
            reasons::ROLLOUT_FAILED,
            format!("{what} {why} with crosstrace's change (spec.rollout.autoRollback is off)"),
            true,
        ),
    }
}

/// The plan of a target crosstrace rolled back for this generation: held until the policy changes.
pub fn held_rolled_back<A>(what: &str) -> TargetPlan<A> {
    TargetPlan::problem(
        Progress::Held,
        reasons::ROLLED_BACK,
        format!("{what} was rolled back: crosstrace's change did not become healthy; change the policy to retry"),
        true,
    )
    .rolled_back()
}

/// "0.250" → "0.25", ".5" → "0.5", "1.0" → "1", "0.0" → "0".
pub fn normalize_ratio(ratio: &str) -> String {
    let Some((int, frac)) = ratio.split_once('.') else {
        return ratio.to_string();
    };
    let int = if int.is_empty() { "0" } else { int };
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() { int.to_string() } else { format!("{int}.{frac}") }
}

/// Checks what the API server's schema cannot, or could not when the policy was stored: every value
/// that reaches another program is safe, and every label selector is one the operator can use. The
/// error names the field.
pub fn validate(spec: &TracingPolicySpec) -> Result<(), String> {
    // Values rendered into other programs' input, again: a policy stored while the CRD was looser keeps
    // them through updates that leave those fields alone.
    if let Some(bad) = crate::api::validate::unsafe_values(spec).into_iter().next() {
        return Err(format!("{}: {}", bad.field, bad.reason));
    }
    let check = |field: &str, s: &LabelSelector| selector(s).map(drop).map_err(|e| format!("{field}: {e}"));
    if let Some(ingress) = &spec.ingress {
        ingress::ingress_selector(ingress).map_err(|e| format!("spec.ingress.selector: {e}"))?;
    }
    if let Some(g) = &spec.gateway {
        gateway::gateway_selector(g).map(drop).map_err(|e| format!("spec.gateway.selector: {e}"))?;
    }
    if let Some(w) = &spec.workloads {
        check("spec.workloads.namespaceSelector", &w.namespace_selector)?;
        w.selector.as_ref().map_or(Ok(()), |s| check("spec.workloads.selector", s))?;
    }
    if let Some(n) = &spec.network {
        n.node_selector.as_ref().map_or(Ok(()), |s| check("spec.network.nodeSelector", s))?;
        network::check_correlate(n)?;
    }
    Ok(())
}

/// A LabelSelector as a kube [`Selector`], or an error naming what is wrong with it.
pub fn selector(label_selector: &LabelSelector) -> Result<Selector, String> {
    Selector::try_from(label_selector.clone()).map_err(|e| e.to_string())
}

/// Does a label set match a selector? An empty selector matches everything.
pub fn matches(selector: &Selector, labels: Option<&BTreeMap<String, String>>) -> bool {
    let empty = Default::default();
    selector.matches(labels.unwrap_or(&empty))
}

/// A selector for objects carrying `key=value`.
pub fn label_equals(key: &str, value: &str) -> Selector {
    Selector::from_iter([Expression::Equal(key.into(), value.into())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IngressSpec, WorkloadsSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn bad_selector() -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "Near".into(),
                values: Some(vec!["web".into()]),
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn an_unusable_selector_is_reported_with_its_field() {
        let spec = TracingPolicySpec {
            workloads: Some(WorkloadsSpec { selector: Some(bad_selector()), ..Default::default() }),
            ..Default::default()
        };
        let error = validate(&spec).unwrap_err();
        assert!(error.starts_with("spec.workloads.selector: "), "{error}");

        let spec = TracingPolicySpec {
            ingress: Some(IngressSpec {
                selector: Some(bad_selector()),
                service_name: "edge".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(validate(&spec).unwrap_err().starts_with("spec.ingress.selector: "));
        assert!(validate(&TracingPolicySpec::default()).is_ok());
    }

    #[test]
    fn every_selected_target_is_in_exactly_one_reported_state() {
        let held = |rolled_back| TargetPlan::<()> { rolled_back, ..TargetPlan::state(Progress::Held) };
        let targets = vec![
            TargetPlan::state(Progress::Ready),
            TargetPlan::state(Progress::InFlight),
            TargetPlan::state(Progress::Pending),
            TargetPlan::state(Progress::Pending),
            TargetPlan::state(Progress::Unhealthy),
            TargetPlan::state(Progress::Waiting),
            held(true),
            held(false),
        ];
        let selected = targets.len();
        let rollout = RolloutSpec { max_concurrent: 2, ..Default::default() };
        let mut report = LayerReport { selected, ..Default::default() };
        let _ = schedule(targets, &rollout, &mut report);
        let states = report.states();
        assert_eq!(states.iter().map(|(_, n)| n).sum::<usize>(), selected, "{states:?}");
        assert!(states.iter().all(|(_, n)| *n == 1 || *n == 2), "{states:?}");
    }

    #[test]
    fn convergence_marks_are_written_after_the_writes_that_move_the_rollout_on() {
        let target = |progress, action| TargetPlan::state(progress).with_actions(vec![action]);
        let targets = vec![
            target(Progress::Ready, "mark a"),
            target(Progress::Held, "roll back b"),
            target(Progress::Ready, "mark c"),
            target(Progress::InFlight, "reapply d"),
            target(Progress::Pending, "inject e"),
            target(Progress::Pending, "inject f"),
        ];
        let rollout = RolloutSpec { max_concurrent: 2, ..Default::default() };
        let actions = schedule(targets, &rollout, &mut LayerReport::default());
        assert_eq!(actions, ["roll back b", "reapply d", "inject e", "mark a", "mark c"]);
    }

    #[test]
    fn ratios_are_normalized() {
        assert_eq!(normalize_ratio("1.000"), "1");
        assert_eq!(normalize_ratio(".5"), "0.5");
        assert_eq!(normalize_ratio("0.250"), "0.25");
        assert_eq!(normalize_ratio("0"), "0");
    }

    #[test]
    fn a_value_stored_while_the_schema_was_looser_is_refused_naming_its_field() {
        let spec = TracingPolicySpec {
            ingress: Some(IngressSpec { service_name: "x\"\n[exporters.otlp]".into(), ..Default::default() }),
            ..Default::default()
        };
        let error = validate(&spec).unwrap_err();
        assert!(error.starts_with("spec.ingress.serviceName: "), "{error}");
    }
}
