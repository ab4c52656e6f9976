//! Reconcile: finalizer dispatch, then observe → plan → apply → report for one policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{Span, field, info, instrument, warn};

use super::Context;
use super::apply::{Pace, Written};
use super::parts::{self, micros};
use super::status::{self, Reports};
use crate::api::conditions::Status;
use crate::api::{FINALIZER, TracingPolicy, TracingPolicyStatus};
use crate::layers::{ObjectKey, ObserveError, PolicyView, reasons};
use crate::layers::{debug, gateway, ingress};
use crate::layers::{network, workloads};
use crate::lean::Meta;
use crate::metrics::LayerLabels;
use crate::telemetry;

/// Why a reconcile did not complete.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A read outside the layers' observation.
    #[error("kubernetes API")]
    Kube(#[from] kube::Error),
    /// A layer could not observe what it needs.
    #[error("observing the cluster")]
    Observe(#[from] ObserveError),
    /// A write failed or was refused (fenced).
    #[error("writing")]
    Write(#[from] super::apply::Error),
    #[error("policy has no name")]
    Unnamed,
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        use super::apply::Error::Fenced;
        match self {
            _ if self.is_bad_input() => "invalid",
            Error::Write(Fenced { .. }) => "fenced",
            _ => match self.kube() {
                Some(kube::Error::Api(e)) if e.code == 409 => "conflict",
                Some(kube::Error::Api(_)) => "api",
                _ => "transport",
            },
        }
    }

    /// The policy cannot be used as it is: nothing to retry until it changes.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::Observe(ObserveError::Selector { .. }) | Error::Unnamed)
    }

    /// The Kubernetes API error behind this one, whichever step it came from.
    pub fn kube(&self) -> Option<&kube::Error> {
        match self {
            Error::Kube(e) | Error::Write(super::apply::Error::Kube(e)) | Error::Observe(ObserveError::Kube(e)) => {
                Some(e)
            }
            _ => None,
        }
    }
}

#[instrument(skip(policy, ctx), fields(policy = %policy.name_any(), trace_id = field::Empty))]
pub async fn reconcile(policy: Arc<TracingPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    if let Some(trace_id) = telemetry::trace_id() {
        Span::current().record("trace_id", field::display(trace_id));
    }
    let uid = policy.uid().unwrap_or_default();
    // While the policy's writes go on it is planned at most every REPLAN_EVERY, less for a policy whose
    // plan is quick and whose writes all started, at once after a change of its spec (the rest are
    // deferred, not counted as reconciles: they observe nothing).
    if let Some(wait) = ctx.tails.replan_in(&uid, policy.metadata.generation.unwrap_or(0), REPLAN_EVERY) {
        tracing::debug!(wait_us = micros(wait), "deferred while the policy's writes go on");
        return Ok(Action::requeue(wait));
    }
    let started = Instant::now();
    // Boxed: the reconcile is a large future, and the scope moves it.
    let (result, parts) = parts::scope(Box::pin(dispatch(&policy, &ctx))).await;
    match &result {
        // A reconcile whose writes are still in flight has not succeeded yet: their failure is its own.
        Ok(_) if !ctx.tails.running(&uid) => ctx.retries.succeeded(&uid),
        Ok(_) => {}
        // No writer goes on with a plan older than the one the retry makes.
        Err(_) => ctx.tails.stop(&uid),
    }
    let took = started.elapsed();
    ctx.metrics.reconciled(took);
    // Raw durations for `just bench` (its p99 comes from these, not from histogram buckets), and where
    // they went.
    tracing::debug!(
        took_us = micros(took),
        edge_us = micros(parts.edge),
        labels_us = micros(parts.labels),
        observe_us = micros(parts.observe),
        plan_us = micros(parts.plan),
        write_us = micros(parts.write),
        network_us = micros(parts.network),
        events_us = micros(parts.events),
        canary_us = micros(parts.canary),
        "reconciled"
    );
    result
}

/// How often a policy whose writes go on is planned at most.
pub const REPLAN_EVERY: Duration = Duration::from_millis(200);

/// Adds the finalizer first, runs cleanup on delete and removes the finalizer only when it is done.
async fn dispatch(policy: &TracingPolicy, ctx: &Context) -> Result<Action, Error> {
    let name = policy.metadata.name.as_deref().ok_or(Error::Unnamed)?;
    // A status write handed on by an earlier reconcile failed: this one fails with it (retried after
    // the backoff, it builds the status again from the policy as the API server has it).
    if let Some(error) = ctx.statuses.failure(&policy.uid().unwrap_or_default()) {
        return Err(error.into());
    }
    let api = Api::<TracingPolicy>::all(ctx.client.clone());
    let has_finalizer = policy.finalizers().iter().any(|f| f == FINALIZER);
    if policy.meta().deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        match cleanup(policy, name, ctx).await? {
            Left::Nothing => {}
            // More to revert than one reconcile's write budget: the next reconcile goes on at once.
            Left::More => return Ok(Action::requeue(Duration::ZERO)),
            // The end of the reverts in flight wakes the policy (the poll is a fallback).
            Left::InFlight => return Ok(Action::requeue(ctx.settings.poll)),
        }
        let rest: Vec<&String> = policy.finalizers().iter().filter(|f| *f != FINALIZER).collect();
        let patch = json!({"metadata": {"finalizers": rest, "resourceVersion": policy.resource_version()}});
        ctx.writer.merge(&api, name, patch).await?;
        // The Event comes after the finalizer: published before, a crash right after it would publish it
        // again on every retry, and the revert would never end.
        publish(ctx, policy, EventType::Normal, reasons::REVERTED, "every change of this policy is reverted".into())
            .await;
        ctx.metrics.forget_policy(name);
        if let Some(stores) = &ctx.stores {
            stores.forget_policy(name);
        }
        ctx.statuses.forget(&policy.uid().unwrap_or_default());
        ctx.tails.forget(&policy.uid().unwrap_or_default());
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        let mut finalizers = policy.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": policy.resource_version()}});
        ctx.writer.merge(&api, name, patch).await?;
        // Go on at once: the finalizer is in place before anything is changed.
    }
    converge(policy, name, ctx).await
}

/// Seniority between policies: creation time, then name.
fn rank(p: &TracingPolicy) -> (Option<Timestamp>, String) {
    (p.metadata.creation_timestamp.clone().map(|t| t.0), p.name_any())
}

/// The name of an older policy that also wants a target (the older keeps it), by `wants`.
fn older_claimant(ctx: &Context, policy: &TracingPolicy, wants: impl Fn(&TracingPolicy) -> bool) -> Option<String> {
    older_than(ctx, policy).into_iter().find(|p| wants(p)).map(|p| p.name_any())
}

/// The policies older than `policy` and not being deleted, oldest first.
fn older_than(ctx: &Context, policy: &TracingPolicy) -> Vec<Arc<TracingPolicy>> {
    let mine = rank(policy);
    let mut older: Vec<_> = ctx
        .policies
        .state()
        .into_iter()
        .filter(|p| p.uid() != policy.uid() && p.meta().deletion_timestamp.is_none() && rank(p) < mine)
        .collect();
    older.sort_by_cached_key(|p| rank(p));
    older
}

/// Labels of every namespace, read only when another policy has a workload layer (for conflicts).
async fn namespace_labels(
    ctx: &Context,
    policy: &TracingPolicy,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, Error> {
    let others = ctx.policies.state().iter().any(|p| p.uid() != policy.uid() && p.spec.workloads.is_some());
    if !others || policy.spec.workloads.is_none() {
        return Ok(BTreeMap::new());
    }
    if let Some(stores) = ctx.stores.as_ref().filter(|s| s.ready()) {
        return Ok(stores.namespace_labels());
    }
    let namespaces = Api::<Meta<Namespace>>::all(ctx.client.clone()).list(&ListParams::default()).await?;
    Ok(namespaces.into_iter().map(|n| (n.name_any(), n.metadata.labels.unwrap_or_default())).collect())
}

/// Observes, plans and applies every layer in the safe order (edge, then workloads, then network), and
/// returns what each enabled layer reports, and what is left ([`Left`]: a reconcile's write budget can
/// leave the rest of a big batch to the next one, a write that raced with a change of its target asks
/// for the next one too, and the workload writes left in flight wake the policy when they end). With
/// `deleting`, the plans only revert.
async fn run_layers(
    policy: &TracingPolicy,
    name: &str,
    ctx: &Context,
    deleting: bool,
    limits: Option<&crate::admin::AdminLimits>,
) -> Result<(Reports, Left), Error> {
    let now = Timestamp::now().as_second();
    let uid = policy.uid().unwrap_or_default();
    // A write an earlier reconcile left in flight failed: this one fails with it, as the reconcile that
    // made it would have (retried after the backoff; the target is planned again then).
    if let Some(error) = ctx.tails.failure(&uid) {
        return Err(error.into());
    }
    let older: BTreeSet<String> = ctx
        .policies
        .state()
        .iter()
        .filter(|p| p.uid() != policy.uid() && rank(p) < rank(policy))
        .map(|p| p.name_any())
        .collect();
    let view = PolicyView {
        name,
        uid: &uid,
        generation: policy.metadata.generation.unwrap_or(0),
        spec: &policy.spec,
        deleting,
        older: &older,
    };
    let defaults = &workloads::Defaults {
        protected_namespaces: limits.map(|l| l.protected_namespaces.clone()).unwrap_or_default(),
        ..ctx.settings.workloads.clone()
    };
    let protected = |namespace: &str| defaults.protects(namespace);
    // A layer the policy does not ask for (or is reverting), of which the stores show nothing, is not read.
    let shown = ctx.stores.as_ref().and_then(|s| s.edge_shown(name));
    let edge = Instant::now();
    let wants = |layer: bool| layer && !deleting;
    let observed = if wants(policy.spec.ingress.is_some()) || shown.is_none_or(|s| s.ingress) {
        ingress::observe(&ctx.client, view, &ctx.settings.namespace, protected, |d| {
            older_claimant(ctx, policy, |p| p.spec.ingress.as_ref().is_some_and(|i| ingress::selects(i, &d.metadata)))
        })
        .await?
    } else {
        Vec::new()
    };
    let edge_plan = ingress::plan(view, &observed, now);
    if !edge_plan.actions.is_empty() {
        info!(actions = edge_plan.actions.len(), deleting, "changing the edge layer");
        super::apply::ingress(&ctx.writer, &edge_plan.actions, &ctx.settings.namespace).await?;
    }
    // Every edge action was written (an error returned above): each drifted controller's config is back.
    for key in &edge_plan.drifted {
        let note = format!(
            "the tracing configuration of ingress controller {key} was changed by someone else; applied it again"
        );
        drift_corrected(ctx, policy, "ingress", note).await;
    }

    let gateway_report = if wants(policy.spec.gateway.is_some()) || shown.is_none_or(|s| s.gateway) {
        gateway_layer(policy, ctx, view, &protected, now).await?
    } else {
        crate::layers::LayerReport::default()
    };
    parts::add(|p| &mut p.edge, edge.elapsed());

    let labelling = Instant::now();
    let labels = namespace_labels(ctx, policy).await?;
    // The older policies with a workload layer, oldest first, their selectors parsed once.
    let older_policies = older_than(ctx, policy);
    let older_selections: Vec<(String, workloads::Selection<'_>)> = older_policies
        .iter()
        .filter_map(|p| Some((p.name_any(), workloads::Selection::new(p.spec.workloads.as_ref()?, defaults).ok()?)))
        .collect();
    // Before anything is observed: the targets the policy's writer touches from here on are not the
    // observed ones (see `Tails::take_over`).
    let mark = ctx.tails.mark(&uid);
    let observing = Instant::now();
    parts::add(|p| &mut p.labels, observing - labelling);
    let (mut observed, config_maps) = workloads::observe(&ctx.client, ctx.stores.as_deref(), view, defaults, |w| {
        let ns_labels = || w.metadata.namespace.as_ref().and_then(|n| labels.get(n));
        older_selections.iter().find(|(_, s)| s.selects(w.kind, &w.metadata, ns_labels)).map(|(name, _)| name.clone())
    })
    .await?;
    // Writes an earlier reconcile left in flight: planned around until they are answered.
    let in_flight = ctx.stores.as_deref().map(|stores| stores.writing_of(name)).unwrap_or_default();
    if !in_flight.is_empty() {
        for t in &mut observed {
            t.writing = in_flight.contains(&(t.workload.kind, t.workload.key()));
        }
    }
    drop((labels, older_selections));
    drop(older_policies);
    let planning = Instant::now();
    // Each injection is built when its write starts, from what was observed (kept until then: the
    // stores' workloads are pruned, their apply configurations are not).
    let workloads::LazyPlan { mut actions, report: mut workload_report, drifted } =
        workloads::plan_lazily(view, defaults, &observed, &config_maps, now, &ctx.hashes);
    drop((observed, config_maps));
    // The policy's writer (an earlier reconcile's plan) starts nothing more; what it touched since this
    // reconcile began is looked at again when it ends.
    let (turn, touched) = ctx.tails.take_over(&uid, mark, view.generation, observing.elapsed());
    let planned = actions.len();
    if !touched.is_empty() {
        actions.retain(|a| !touched.contains(&super::apply::target_of(a)));
    }
    let writing = Instant::now();
    let mut written = Written { done: 0, of: 0 };
    // A target changed by someone else while crosstrace wrote it (its rollout finishing, most often),
    // or one the writer touched while this reconcile observed it, its writer gone already.
    let writers = ctx.tails.running(&uid);
    let mut raced = actions.len() < planned && !writers;
    // Writes of this policy in flight (or still to start, by its writer) when this reconcile ends:
    // their end wakes it.
    let mut waiting = !in_flight.is_empty() || writers;
    // The injections written again: each drifted target whose injection this reconcile writes.
    let reapplied: BTreeSet<&ObjectKey> = actions.iter().filter_map(workloads::Lazy::injected).collect();
    let drifted: Vec<ObjectKey> = drifted.into_iter().filter(|k| reapplied.contains(k)).collect();
    drop(reapplied);
    if !actions.is_empty() {
        info!(actions = actions.len(), deleting, "changing the workload layer");
        let notes = ctx.stores.as_ref().map(|stores| stores.writes_of(name));
        // The policy's writes in flight make its progress: a reconcile behind them hands its plan to its
        // writer at once (it would only wait for the places they hold, and its writer starts as they free).
        let pace = if waiting {
            Pace::within(&ctx.write_limits.workloads, Duration::ZERO).behind_own_writes()
        } else {
            Pace::within(&ctx.write_limits.workloads, ctx.settings.workload_write_budget)
        };
        let tail;
        (written, tail) = super::apply::workloads(&ctx.writer, actions, pace, &notes, &turn).await?;
        raced |= notes.is_some_and(|n| n.raced());
        if let Some(tail) = tail {
            ctx.tails.keep(policy, tail);
            waiting = true;
        }
    }
    workload_report.writing = waiting || raced || !written.complete();
    // Where a reconcile's time goes, for `just bench` and for anyone reading a slow rollout's log.
    parts::add(|p| &mut p.observe, planning - observing);
    parts::add(|p| &mut p.plan, writing - planning);
    parts::add(|p| &mut p.write, writing.elapsed());
    tracing::debug!(
        observe_us = micros(planning - observing),
        plan_us = micros(writing - planning),
        write_us = micros(writing.elapsed()),
        targets = workload_report.selected,
        planned,
        written = written.done,
        "workload layer"
    );
    // Written, or handed to the policy's writer.
    for key in &drifted {
        let note = format!("the tracing injection of {key} was removed by someone else; applied it again");
        drift_corrected(ctx, policy, "workloads", note).await;
    }
    drop(drifted);

    let network_started = Instant::now();
    let observed = network::observe(&ctx.client, ctx.stores.as_deref(), view).await?;
    let mut correlation =
        network::Correlation { max_header_bytes: limits.map(|l| l.max_header_bytes), ..Default::default() };
    if let Some(receiver) = &ctx.settings.flows_receiver
        && policy.spec.network.as_ref().is_some_and(|n| n.correlate)
        && !deleting
    {
        match receiver.address().await {
            Ok(address) => correlation.receiver = Some(address.to_string()),
            Err(e) => correlation.unresolved = Some(format!("{}: {e}", receiver.name)),
        }
    }
    let mut network_plan = network::plan(view, &observed, Timestamp::now(), &correlation);
    network_plan.report.writing = !network_plan.actions.is_empty();
    if !written.complete() {
        // The budget ran out: the network layer goes after the workloads, in the next reconcile (at once).
        info!(written = written.done, planned = written.of, "write budget used up; continuing in the next reconcile");
    } else if waiting {
        // The network layer goes after the workloads' writes are answered: in the reconcile their end wakes.
    } else if !network_plan.actions.is_empty() {
        info!(actions = network_plan.actions.len(), deleting, "changing the network layer");
        let notes = ctx.stores.as_ref().map(|stores| stores.writes_of(name));
        // Its writes are not left in flight (each is guarded by the version it was planned from): each
        // of its reconciles ends when the last of them is answered.
        let pace = Pace::within(&ctx.write_limits.network, ctx.settings.write_budget);
        written = super::apply::network(&ctx.writer, &network_plan.actions, pace, &notes).await?;
        let network_raced = notes.is_some_and(|n| n.raced());
        network_plan.report.writing = network_raced || !written.complete();
        raced |= network_raced;
    }
    parts::add(|p| &mut p.network, network_started.elapsed());
    let reports = Reports {
        ingress: policy.spec.ingress.as_ref().map(|_| edge_plan.report),
        gateway: policy.spec.gateway.as_ref().map(|_| gateway_report),
        workloads: policy.spec.workloads.as_ref().map(|_| workload_report),
        network: policy.spec.network.as_ref().map(|_| network_plan.report),
    };
    // Raced writes: the events that told of their targets' change were taken for the writes' echoes.
    let left = match () {
        _ if !written.complete() || raced => Left::More,
        _ if waiting => Left::InFlight,
        _ => Left::Nothing,
    };
    Ok((reports, left))
}

/// What a reconcile left to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Left {
    /// Every planned write was made and answered.
    Nothing,
    /// More to write now (the write budget ran out, or a write raced with a change of its target): the
    /// next reconcile goes on at once.
    More,
    /// Writes of the policy are in flight: it is woken when they end ([`super::apply::Tails`]).
    InFlight,
}

/// How often a rolling policy's status is written when only its counts moved (a reconcile every few
/// tens of milliseconds would otherwise write it every time).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The Gateway API edge: observe, plan, apply; its report. A cluster without the Gateway API is no
/// error: the layer reports it when the policy asks for `spec.gateway`, and has nothing to do otherwise.
async fn gateway_layer(
    policy: &TracingPolicy,
    ctx: &Context,
    view: PolicyView<'_>,
    protected: &impl Fn(&str) -> bool,
    now: i64,
) -> Result<crate::layers::LayerReport, Error> {
    let observation = gateway::observe(&ctx.client, view, &ctx.settings.namespace, protected, |g| {
        older_claimant(ctx, policy, |p| p.spec.gateway.as_ref().is_some_and(|s| gateway::selects(s, &g.metadata)))
    })
    .await?;
    let plan = gateway::plan(view, &ctx.settings.gateway, &observation.targets, now);
    if !plan.actions.is_empty() {
        info!(actions = plan.actions.len(), deleting = view.deleting, "changing the gateway layer");
        super::apply::gateway(&ctx.writer, &plan.actions, &ctx.settings.namespace).await?;
    }
    for key in &plan.drifted {
        let note = format!("the tracing of Gateway {key} was changed by someone else; applied it again");
        drift_corrected(ctx, policy, "gateway", note).await;
    }
    let mut report = plan.report;
    if observation.not_installed {
        report.problems.push(crate::layers::Problem {
            reason: reasons::GATEWAY_API_NOT_INSTALLED,
            message: format!(
                "spec.gateway: the Gateway API ({}) is not installed in this cluster; no Gateway is traced",
                gateway::Kind::Gateway.api_version()
            ),
            degraded: false,
        });
    }
    Ok(report)
}

/// Reverts every layer, edge first; what is left to revert. Errors and unfinished reverts keep the
/// finalizer in place.
async fn cleanup(policy: &TracingPolicy, name: &str, ctx: &Context) -> Result<Left, Error> {
    Ok(run_layers(policy, name, ctx, true, None).await?.1)
}

/// Reports why nothing of this policy is changed now, and looks again at the resync (a limit the admin
/// changes reaches the controller without an event).
fn refuse(ctx: &Context, policy: &TracingPolicy, reason: &'static str, message: &str) -> Action {
    let generation = policy.metadata.generation.unwrap_or(0);
    let previous = last_status(ctx, policy);
    let next = status::unusable(Some(&previous), generation, reason, message, Timestamp::now());
    report(ctx, policy, previous, next, false);
    Action::requeue(ctx.settings.resync)
}

async fn converge(policy: &TracingPolicy, name: &str, ctx: &Context) -> Result<Action, Error> {
    let generation = policy.metadata.generation.unwrap_or(0);
    if let Err(message) = crate::layers::validate(&policy.spec) {
        // Bad input waits for a change of the spec: no retry loop, the condition says what to fix.
        let previous = last_status(ctx, policy);
        let next = status::invalid(Some(&previous), generation, &message, Timestamp::now());
        report(ctx, policy, previous, next, false);
        return Ok(Action::await_change());
    }
    // Admin limits above policy authors (the admission policy enforces them too, where it is installed).
    let limits = match ctx.settings.admin_limits.as_deref().map(crate::admin::AdminLimits::from_dir).transpose() {
        Ok(limits) => limits,
        Err(error) => {
            let message = format!("the admin limits cannot be read, so nothing is changed: {}", error_chain(&error));
            return Ok(refuse(ctx, policy, reasons::ADMIN_LIMITS_UNREADABLE, &message));
        }
    };
    if let Some(violation) = limits.as_ref().and_then(|l| crate::admin::check(&policy.spec, l).err()) {
        return Ok(refuse(ctx, policy, reasons::ADMIN_LIMIT, &violation.to_string()));
    }
    // A debug session gives the layers the spec with sampling raised, until it ends (by the clock).
    let previous = last_status(ctx, policy);
    let floor = limits.as_ref().map_or(crate::api::SAMPLING_FLOOR, |l| l.min_sampling);
    let session = debug::session(&policy.spec, previous.debug.as_ref(), Timestamp::now(), floor);
    let effective = TracingPolicy { spec: session.effective, ..policy.clone() };
    // The collector's canary: the last one of the canary rounds (`canary_rounds`, every interval), or
    // one sent now, while the layers are looked at, for a collector without a recent finding.
    let canary = async {
        let every = ctx.settings.canary_every?;
        let collector = crate::canary::collector_of(&policy.spec)?;
        Some((collector.endpoint.clone(), ctx.canaries.get(collector, every * 2, super::CANARY_TIMEOUT).await))
    };
    // Whether the network hop's spans flow, from the flows receivers' reports (`spec.network.correlate`).
    let flowing = async {
        ctx.settings.canary_every?;
        ctx.settings.flows_receiver.as_ref()?;
        policy.spec.network.as_ref().filter(|n| n.correlate)?;
        let leases = Api::<Lease>::namespaced(ctx.client.clone(), &ctx.settings.namespace);
        Some(match ctx.flow_reports.get(&leases).await {
            Ok(reports) => crate::flows::report::traces_flowing(name, &reports),
            Err(error) => (
                Status::Unknown,
                reasons::FLOW_REPORTS_UNREADABLE,
                format!("the flows receivers' reports (Leases in {}) cannot be read: {error}", ctx.settings.namespace),
            ),
        })
    };
    let joined = Instant::now();
    let layers = async {
        let layers = run_layers(&effective, name, ctx, false, limits.as_ref()).await;
        (layers, Instant::now())
    };
    let ((layers, layers_ended), canary, flowing) = tokio::join!(layers, canary, flowing);
    parts::add(|p| &mut p.canary, Instant::now().saturating_duration_since(layers_ended.max(joined)));
    let (reports, left) = layers?;
    drop(effective);
    for (layer, report) in [
        ("ingress", &reports.ingress),
        ("gateway", &reports.gateway),
        ("workloads", &reports.workloads),
        ("network", &reports.network),
    ] {
        if let Some(r) = report {
            for (state, count) in r.states() {
                ctx.metrics.set_targets(name, layer, state, count);
            }
        }
    }
    let mut next = status::status(Some(&previous), generation, &policy.spec, &reports, Timestamp::now());
    let canary_found = canary.as_ref().map(|(e, p)| (e.as_str(), p));
    status::collector_reachable(&mut next, &previous.conditions, canary_found, generation, Timestamp::now());
    let looks_at_flows = flowing.is_some();
    status::traces_flowing(&mut next, &previous.conditions, flowing, generation, Timestamp::now());
    next.debug = session.status;
    let debug_was = previous.debug.as_ref().map(|d| (d.active, d.session.clone()));
    let debug_is = next.debug.as_ref().map(|d| (d.active, d.session.clone()));
    // While its writes go on, a policy's counts are written now and then; the reconcile that ends them
    // writes the last.
    report(ctx, policy, previous, next.clone(), left != Left::Nothing);
    if debug_was != debug_is
        && let Some(d) = &next.debug
    {
        let until = d.expires_at.0;
        let (reason, note) = if d.active {
            (reasons::DEBUG_SESSION_STARTED, format!("sampling raised until {until}"))
        } else {
            (reasons::DEBUG_SESSION_ENDED, format!("the session ended at {until}; the policy's own sampling is back"))
        };
        publish(ctx, policy, EventType::Normal, reason, note).await;
    }

    let busy =
        [&reports.ingress, &reports.gateway, &reports.workloads, &reports.network].into_iter().flatten().any(|r| {
            // Targets whose owner holds or moves them are watched too: their status alone wakes nothing.
            r.in_flight > 0
                || r.waiting > 0
                || r.unhealthy > 0
                || (r.pending > 0 && !policy.spec.rollout.paused && !r.stopped)
        });
    let next_look = match () {
        _ if left == Left::More => Duration::ZERO,
        // The end of the writes in flight wakes the policy too.
        _ if busy || left == Left::InFlight => ctx.settings.poll,
        _ => ctx.settings.resync,
    };
    // The flows reports are read again after the canary interval (a collector's canary turning wakes
    // its policies by itself: `canary_rounds`); a running debug session is looked at again when it ends
    // (a second late rather than early).
    let next_look = match (looks_at_flows, ctx.settings.canary_every) {
        (true, Some(every)) => next_look.min(every),
        _ => next_look,
    };
    let until_end = session.ends_at.map(|end| {
        let left = end.duration_since(Timestamp::now()).as_secs().max(0);
        Duration::from_secs(u64::try_from(left).unwrap_or(0) + 1)
    });
    Ok(Action::requeue(until_end.map_or(next_look, |end| end.min(next_look))))
}

/// The status this policy has now: the one last written, unless the cached object already shows a
/// newer one. The cached object can lag behind the last write (reconciles run back to back), and a
/// status built on a stale one would differ from what is there in its timestamps alone, and be
/// written again.
fn last_status(ctx: &Context, policy: &TracingPolicy) -> TracingPolicyStatus {
    let cached = policy.status.as_ref();
    ctx.statuses
        .last(&policy.uid().unwrap_or_default())
        .map(|w| w.status)
        .filter(|w| w.observed_generation >= cached.and_then(|s| s.observed_generation))
        .unwrap_or_else(|| cached.cloned().unwrap_or_default())
}

/// Hands the status to be written when it differs from `previous` (built from [`last_status`], so a
/// difference is never a timestamp alone); the Events for what transitioned (one per failure or
/// recovery, [`conditions::events`]) are published once it is written ([`super::statuses`]: the
/// reconcile does not wait for the write). With `rolling` (more writes of the policy to come), a status
/// that moved in its counts alone is handed at most every [`PROGRESS_EVERY`].
fn report(
    ctx: &Context,
    policy: &TracingPolicy,
    previous: TracingPolicyStatus,
    next: TracingPolicyStatus,
    rolling: bool,
) {
    if previous == next {
        return;
    }
    let uid = policy.uid().unwrap_or_default();
    let recent = || ctx.statuses.last(&uid).is_some_and(|w| w.at.elapsed() < PROGRESS_EVERY);
    if rolling && status::progress_only(&previous, &next) && recent() {
        return;
    }
    ctx.statuses.hand(policy, &previous, next);
}

/// Counts a drift correction of `layer` and tells it as a Warning Event on the policy.
async fn drift_corrected(ctx: &Context, policy: &TracingPolicy, layer: &str, note: String) {
    ctx.metrics.drift_corrections.get_or_create(&LayerLabels { layer: layer.into() }).inc();
    publish(ctx, policy, EventType::Warning, reasons::DRIFT_CORRECTED, note).await;
}

async fn publish(ctx: &Context, policy: &TracingPolicy, type_: EventType, reason: &str, note: String) {
    let regarding = policy.object_ref(&());
    let published = super::statuses::publish(&ctx.writer, &ctx.recorder, &regarding, type_, reason, note);
    parts::timed(|p| &mut p.events, published).await;
}

/// Failed reconciles are retried after a pause that grows with every failure in a row of the policy
/// (with jitter, see [`super::backoff`]) and is never shorter than an API server's `Retry-After`;
/// never in a hot loop, and a write refused by the leader fence waits like any other failure.
pub fn error_policy(policy: Arc<TracingPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error.kind());
    if error.is_bad_input() {
        // Bad input: nothing to retry until the policy changes (its spec is validated before any
        // observation, so this is a guard, not a path).
        warn!(policy = %policy.name_any(), error = %error_chain(error), "policy cannot be used; waiting for a change");
        return Action::await_change();
    }
    let pause = ctx.retries.failed(&policy.uid().unwrap_or_default());
    let retry_after = error.kube().and_then(super::apply::retry_after);
    let pause = pause.max(retry_after.unwrap_or_default());
    warn!(policy = %policy.name_any(), error = %error_chain(error), ?pause, "reconcile failed; retrying");
    Action::requeue(pause)
}

/// An error with its sources, `a: b: c`, for logs.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
