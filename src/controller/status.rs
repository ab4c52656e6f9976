//! Report: turns the layers' reports into `TracingPolicy.status` (pure), and decides whether a write is
//! needed at all (never for a timestamp alone).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;

use crate::api::conditions::{
    self, COLLECTOR_REACHABLE, DEGRADED, Desired, GATEWAY_READY, INGRESS_READY, NETWORK_READY, PROGRESSING, READY,
    Status, TRACES_FLOWING, WORKLOADS_READY,
};
use crate::api::{LayerStatus, TracingPolicySpec, TracingPolicyStatus};
use crate::layers::{LayerReport, reasons};

/// The reports of the enabled layers (`None` = layer off).
#[derive(Clone, Debug, Default)]
pub struct Reports {
    pub ingress: Option<LayerReport>,
    pub gateway: Option<LayerReport>,
    pub workloads: Option<LayerReport>,
    pub network: Option<LayerReport>,
}

impl Reports {
    fn layers(&self) -> impl Iterator<Item = (&'static str, &'static str, &LayerReport)> {
        [
            (INGRESS_READY, "spec.ingress", self.ingress.as_ref()),
            (GATEWAY_READY, "spec.gateway", self.gateway.as_ref()),
            (WORKLOADS_READY, "spec.workloads", self.workloads.as_ref()),
            (NETWORK_READY, "spec.network", self.network.as_ref()),
        ]
        .into_iter()
        .filter_map(|(t, f, r)| r.map(|r| (t, f, r)))
    }
}

fn layer_condition(type_: &'static str, field: &str, r: &LayerReport) -> Desired {
    let counts = format!("{}/{} ready", r.ready, r.selected);
    let with_warnings = |m: String| {
        if r.warnings.is_empty() { m } else { format!("{m}; warning: {}", r.warnings.join("; ")) }
    };
    if let Some(first) = r.problems.first() {
        let all: Vec<&str> = r.problems.iter().map(|p| p.message.as_str()).collect();
        return Desired::new(
            type_,
            Status::False,
            first.reason,
            with_warnings(format!("{counts}: {}", all.join("; "))),
        );
    }
    if r.in_flight > 0 || r.pending > 0 || r.writing {
        let writing = if r.writing { ", crosstrace's writes in flight" } else { "" };
        return Desired::new(
            type_,
            Status::Unknown,
            reasons::ROLLOUT_IN_PROGRESS,
            with_warnings(format!("{counts}, {} changing, {} waiting{writing}", r.in_flight, r.pending)),
        );
    }
    if r.selected == 0 {
        return Desired::new(type_, Status::False, reasons::NO_TARGETS, format!("nothing matches {field}"));
    }
    if r.ready == r.selected {
        Desired::new(type_, Status::True, reasons::ALL_TARGETS_READY, with_warnings(counts))
    } else {
        Desired::new(type_, Status::False, reasons::TARGETS_NOT_READY, with_warnings(counts))
    }
}

/// The conditions a set of reports implies, in a stable order.
pub fn desired_conditions(spec: &TracingPolicySpec, reports: &Reports) -> Vec<Desired> {
    let layers: Vec<Desired> = reports.layers().map(|(t, f, r)| layer_condition(t, f, r)).collect();
    let all: Vec<&LayerReport> = reports.layers().map(|(_, _, r)| r).collect();
    let paused = spec.rollout.paused;
    let moving = all.iter().any(|r| r.in_flight > 0 || r.writing);
    let waiting = all.iter().any(|r| r.pending > 0);
    let stopped = all.iter().any(|r| r.stopped);

    let progressing = if moving || (waiting && !paused && !stopped) {
        Desired::new(PROGRESSING, Status::True, reasons::ROLLOUT_IN_PROGRESS, "targets are being changed")
    } else if stopped {
        Desired::new(
            PROGRESSING,
            Status::False,
            reasons::ROLLOUT_STOPPED,
            "a failed batch stopped the rollout; change the policy to retry",
        )
    } else if paused && waiting {
        Desired::new(PROGRESSING, Status::False, reasons::ROLLOUT_PAUSED, "spec.rollout.paused is true")
    } else {
        Desired::new(PROGRESSING, Status::False, reasons::ROLLOUT_COMPLETE, "no change pending")
    };

    let degraded: Vec<_> = all.iter().flat_map(|r| r.problems.iter().filter(|p| p.degraded)).collect();
    let degraded_condition = match degraded.first() {
        Some(first) => {
            let messages: Vec<&str> = degraded.iter().map(|p| p.message.as_str()).collect();
            Desired::new(DEGRADED, Status::True, first.reason, messages.join("; "))
        }
        None => Desired::new(DEGRADED, Status::False, reasons::AS_EXPECTED, "no target is failing"),
    };

    let ready = if layers.iter().all(|c| c.status == Status::True) {
        Desired::new(
            READY,
            Status::True,
            reasons::ALL_LAYERS_READY,
            "every selected target of every enabled layer is traced and healthy",
        )
    } else if let Some(first) = degraded.first() {
        Desired::new(READY, Status::False, first.reason, degraded_condition.message.clone())
    } else if moving || (waiting && !paused) {
        Desired::new(READY, Status::Unknown, reasons::ROLLOUT_IN_PROGRESS, "the rollout is in flight")
    } else {
        let first = layers.iter().find(|c| c.status != Status::True).expect("not all layers are ready");
        Desired::new(READY, Status::False, first.reason, format!("{}: {}", first.type_, first.message))
    };

    let mut out = vec![ready];
    out.extend(layers);
    out.push(progressing);
    out.push(degraded_condition);
    out
}

/// Puts the canary's finding into `status` as `CollectorReachable` (left out without a canary). The
/// message names the canary's trace id; while the finding stays the same, the message of the canary
/// that found it stays too, so that a converged policy's status is not rewritten for every canary.
pub fn collector_reachable(
    status: &mut TracingPolicyStatus,
    before: &[Condition],
    canary: Option<(&str, &crate::canary::Probe)>,
    generation: i64,
    now: Timestamp,
) {
    let previous = before.iter().find(|c| c.type_ == COLLECTOR_REACHABLE).cloned();
    status.conditions.retain(|c| c.type_ != COLLECTOR_REACHABLE);
    let Some((endpoint, probe)) = canary else { return };
    let trace = &probe.trace_id;
    let mut desired = match &probe.outcome {
        Ok(()) => Desired::new(
            COLLECTOR_REACHABLE,
            Status::True,
            reasons::CANARY_ACCEPTED,
            format!("canary span of trace {trace} accepted by {endpoint}: look it up in your tracing backend"),
        ),
        Err(error) => Desired::new(
            COLLECTOR_REACHABLE,
            Status::False,
            reasons::CANARY_NOT_ACCEPTED,
            format!("canary span of trace {trace} not accepted by {endpoint}: {error}"),
        ),
    };
    if let Some(p) = &previous
        && p.status == desired.status.as_str()
        && p.reason == desired.reason
        && p.message.contains(endpoint)
    {
        desired.message = p.message.clone();
    }
    put(status, previous, Some(desired), generation, now);
}

/// Puts `TracesFlowing` into `status`: what the flows receivers report of the policy's nodes, for a
/// policy with `spec.network.correlate` (left out otherwise, or while the check is off).
pub fn traces_flowing(
    status: &mut TracingPolicyStatus,
    before: &[Condition],
    found: Option<(Status, &'static str, String)>,
    generation: i64,
    now: Timestamp,
) {
    let previous = before.iter().find(|c| c.type_ == TRACES_FLOWING).cloned();
    status.conditions.retain(|c| c.type_ != TRACES_FLOWING);
    let desired = found.map(|(s, reason, message)| Desired::new(TRACES_FLOWING, s, reason, message));
    put(status, previous, desired, generation, now);
}

/// Adds a condition that is not a layer's (kept out when `desired` is `None`), with its transition time
/// carried over from `previous`.
fn put(
    status: &mut TracingPolicyStatus,
    previous: Option<Condition>,
    desired: Option<Desired>,
    generation: i64,
    now: Timestamp,
) {
    let Some(desired) = desired else { return };
    let previous: Vec<_> = previous.into_iter().collect();
    status.conditions.extend(conditions::merge(&previous, &[desired], generation, now));
}

fn counts(r: &Option<LayerReport>) -> Option<LayerStatus> {
    r.as_ref().map(|r| LayerStatus::new(r.selected, r.ready, r.rolled_back))
}

/// The whole status for a generation.
pub fn status(
    previous: Option<&TracingPolicyStatus>,
    generation: i64,
    spec: &TracingPolicySpec,
    reports: &Reports,
    now: Timestamp,
) -> TracingPolicyStatus {
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or_default();
    TracingPolicyStatus {
        observed_generation: Some(generation),
        conditions: conditions::merge(previous_conditions, &desired_conditions(spec, reports), generation, now),
        ingress: counts(&reports.ingress),
        workloads: counts(&reports.workloads),
        nodes: counts(&reports.network),
        gateway: counts(&reports.gateway),
        debug: previous.and_then(|p| p.debug.clone()),
    }
}

/// Does `next` differ from `previous` only in what a rollout moves all the time: its counts and its
/// conditions' messages? (Each condition keeps its status and reason, and the generation is the same.)
pub fn progress_only(previous: &TracingPolicyStatus, next: &TracingPolicyStatus) -> bool {
    let shape = |s: &TracingPolicyStatus| {
        let conditions: Vec<_> = s
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.observed_generation))
            .collect();
        (s.observed_generation, s.debug.clone(), conditions)
    };
    shape(previous) == shape(next)
}

/// The status last written for a policy, and when.
#[derive(Clone, Debug)]
pub struct Reported {
    pub status: TracingPolicyStatus,
    pub at: std::time::Instant,
}

/// The status of a policy whose spec the operator cannot use (the API server accepted it): nothing is
/// changed, and the conditions say why.
pub fn invalid(
    previous: Option<&TracingPolicyStatus>,
    generation: i64,
    message: &str,
    now: Timestamp,
) -> TracingPolicyStatus {
    unusable(previous, generation, reasons::INVALID_SPEC, message, now)
}

/// The status of a policy the operator does not act on, for `reason`: nothing is rolled out, the
/// conditions say why (counts of the last status stay as they were).
pub fn unusable(
    previous: Option<&TracingPolicyStatus>,
    generation: i64,
    reason: &'static str,
    message: &str,
    now: Timestamp,
) -> TracingPolicyStatus {
    let desired = [
        Desired::new(READY, Status::False, reason, message),
        Desired::new(PROGRESSING, Status::False, reason, "nothing is rolled out until the spec is fixed"),
        Desired::new(DEGRADED, Status::True, reason, message),
    ];
    let mut status = previous.cloned().unwrap_or_default();
    status.conditions = conditions::merge(&status.conditions, &desired, generation, now);
    status.observed_generation = Some(generation);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Problem;

    fn ready_of(conditions: &[Desired], type_: &str) -> (Status, &'static str) {
        let c = conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status, c.reason)
    }

    fn report(selected: usize, ready: usize) -> LayerReport {
        LayerReport { selected, ready, ..Default::default() }
    }

    #[test]
    fn all_ready_is_ready() {
        let reports = Reports { ingress: Some(report(1, 1)), ..Default::default() };
        let c = desired_conditions(&TracingPolicySpec::default(), &reports);
        assert_eq!(ready_of(&c, READY), (Status::True, "AllLayersReady"));
        assert_eq!(ready_of(&c, INGRESS_READY), (Status::True, "AllTargetsReady"));
        assert_eq!(ready_of(&c, DEGRADED), (Status::False, "AsExpected"));
        assert_eq!(ready_of(&c, PROGRESSING), (Status::False, "RolloutComplete"));
        assert!(!c.iter().any(|c| c.type_ == WORKLOADS_READY), "a layer that is off has no condition");
    }

    #[test]
    fn in_flight_is_unknown_and_progressing() {
        let reports = Reports {
            ingress: Some(LayerReport { selected: 2, ready: 1, in_flight: 1, ..Default::default() }),
            ..Default::default()
        };
        let c = desired_conditions(&TracingPolicySpec::default(), &reports);
        assert_eq!(ready_of(&c, READY), (Status::Unknown, "RolloutInProgress"));
        assert_eq!(ready_of(&c, PROGRESSING), (Status::True, "RolloutInProgress"));
    }

    #[test]
    fn every_target_ready_with_crosstrace_writes_in_flight_is_not_ready_yet() {
        // The reconcile that marks the last target converged hands that write to the policy's writer:
        // an owner reading Ready=True would otherwise edit the workload under crosstrace's write.
        let reports = Reports { workloads: Some(LayerReport { writing: true, ..report(1, 1) }), ..Default::default() };
        let c = desired_conditions(&TracingPolicySpec::default(), &reports);
        assert_eq!(ready_of(&c, READY), (Status::Unknown, "RolloutInProgress"));
        assert_eq!(ready_of(&c, WORKLOADS_READY), (Status::Unknown, "RolloutInProgress"));
        assert_eq!(ready_of(&c, PROGRESSING), (Status::True, "RolloutInProgress"));
        let workloads = c.iter().find(|c| c.type_ == WORKLOADS_READY).unwrap();
        assert_eq!(workloads.message, "1/1 ready, 0 changing, 0 waiting, crosstrace's writes in flight");
    }

    #[test]
    fn rollback_is_degraded_and_stops_the_rollout() {
        let problem =
            Problem { reason: "RolledBack", message: "ingress-nginx/ctrl was rolled back".into(), degraded: true };
        let reports = Reports {
            ingress: Some(LayerReport {
                selected: 1,
                rolled_back: 1,
                stopped: true,
                problems: vec![problem],
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = desired_conditions(&TracingPolicySpec::default(), &reports);
        assert_eq!(ready_of(&c, READY), (Status::False, "RolledBack"));
        assert_eq!(ready_of(&c, DEGRADED), (Status::True, "RolledBack"));
        assert_eq!(ready_of(&c, PROGRESSING), (Status::False, "RolloutStopped"));
        let d = c.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert!(d.message.contains("ingress-nginx/ctrl"), "{}", d.message);
    }

    #[test]
    fn nothing_selected_is_not_ready() {
        let reports = Reports { ingress: Some(report(0, 0)), ..Default::default() };
        let c = desired_conditions(&TracingPolicySpec::default(), &reports);
        assert_eq!(ready_of(&c, READY), (Status::False, "NoTargets"));
    }

    #[test]
    fn counts_show_ready_of_selected() {
        let reports = Reports { ingress: Some(report(3, 2)), ..Default::default() };
        let now = Timestamp::from_second(100).unwrap();
        let s = status(None, 4, &TracingPolicySpec::default(), &reports, now);
        assert_eq!(s.ingress.as_ref().unwrap().summary, "2/3");
        assert_eq!(s.observed_generation, Some(4));
        assert!(s.workloads.is_none());
    }

    #[test]
    fn a_rollout_moving_its_counts_is_progress_only_and_its_end_is_not() {
        let spec = TracingPolicySpec::default();
        let rolling = |ready| Reports {
            ingress: Some(LayerReport { selected: 3, ready, in_flight: 3 - ready, ..Default::default() }),
            ..Default::default()
        };
        let at = |s| Timestamp::from_second(s).unwrap();
        let one = status(None, 1, &spec, &rolling(1), at(100));
        let two = status(Some(&one), 1, &spec, &rolling(2), at(101));
        assert_ne!(one, two);
        assert!(progress_only(&one, &two), "counts and messages moved, nothing else");
        let done = status(Some(&two), 1, &spec, &rolling(3), at(102));
        assert!(!progress_only(&two, &done), "Ready and Progressing turned");
        let changed = status(Some(&two), 2, &spec, &rolling(2), at(102));
        assert!(!progress_only(&two, &changed), "a new generation");
    }
}
