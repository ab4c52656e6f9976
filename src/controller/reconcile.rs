//! Reconcile: finalizer dispatch, then observe → plan → apply → report for one policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{Span, field, info, instrument, warn};

use super::Context;
use super::status::{self, Reports};
use crate::api::conditions::{self, DEGRADED};
use crate::api::{FINALIZER, TracingPolicy, TracingPolicyStatus};
use crate::layers::ingress::{self, PolicyView};
use crate::layers::{LayerReport, Problem};
use crate::telemetry;

/// Why a reconcile did not complete.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("policy has no name")]
    Unnamed,
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Unnamed => "invalid",
        }
    }
}

#[instrument(skip(policy, ctx), fields(policy = %policy.name_any(), trace_id = field::Empty))]
pub async fn reconcile(policy: Arc<TracingPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    if let Some(trace_id) = telemetry::trace_id() {
        Span::current().record("trace_id", field::display(trace_id));
    }
    let started = Instant::now();
    let result = dispatch(&policy, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    result
}

/// Adds the finalizer first, runs cleanup on delete and removes the finalizer only when it is done.
async fn dispatch(policy: &TracingPolicy, ctx: &Context) -> Result<Action, Error> {
    let name = policy.metadata.name.as_deref().ok_or(Error::Unnamed)?;
    let api = Api::<TracingPolicy>::all(ctx.client.clone());
    let has_finalizer = policy.finalizers().iter().any(|f| f == FINALIZER);
    if policy.meta().deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        cleanup(policy, name, ctx).await?;
        let rest: Vec<&String> = policy
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .collect();
        let patch =
            json!({"metadata": {"finalizers": rest, "resourceVersion": policy.resource_version()}});
        ctx.writer.merge(&api, name, patch).await?;
        ctx.metrics.forget_policy(name);
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        let mut finalizers = policy.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": policy.resource_version()}});
        ctx.writer.merge(&api, name, patch).await?;
        // The write wakes this policy again; converge then.
        return Ok(Action::await_change());
    }
    converge(policy, name, ctx).await
}

fn view<'a>(policy: &'a TracingPolicy, name: &'a str, deleting: bool) -> PolicyView<'a> {
    PolicyView {
        name,
        generation: policy.metadata.generation.unwrap_or(0),
        spec: &policy.spec,
        deleting,
    }
}

/// The name of an older policy that also selects this ingress controller (the older keeps it).
fn ingress_claimant(
    ctx: &Context,
    policy: &TracingPolicy,
    deployment: &Deployment,
) -> Option<String> {
    let rank = |p: &TracingPolicy| {
        (
            p.metadata.creation_timestamp.clone().map(|t| t.0),
            p.name_any(),
        )
    };
    let mine = rank(policy);
    ctx.policies
        .state()
        .iter()
        .filter(|p| p.uid() != policy.uid() && p.meta().deletion_timestamp.is_none())
        .filter(|p| {
            p.spec
                .ingress
                .as_ref()
                .is_some_and(|i| ingress::selects(i, deployment))
        })
        .filter(|p| rank(p) < mine)
        .min_by_key(|p| rank(p))
        .map(|p| p.name_any())
}

/// Reverts every layer, edge first. Errors (and not-yet-done work) keep the finalizer in place.
async fn cleanup(policy: &TracingPolicy, name: &str, ctx: &Context) -> Result<(), Error> {
    let view = view(policy, name, true);
    let observed = ingress::observe(&ctx.client, view, |_| None).await?;
    let plan = ingress::plan(view, &observed, Timestamp::now().as_second());
    if !plan.actions.is_empty() {
        info!(actions = plan.actions.len(), "reverting the edge layer");
        super::apply::ingress(&ctx.writer, &plan.actions).await?;
        publish(
            ctx,
            policy,
            EventType::Normal,
            "Reverted",
            format!(
                "reverted {} change(s) of the edge layer",
                plan.actions.len()
            ),
        )
        .await;
    }
    Ok(())
}

/// Stand-in report for a layer this build does not carry out yet: honest, never Ready.
fn unavailable_layer(field: &str) -> LayerReport {
    LayerReport {
        problems: vec![Problem {
            reason: "LayerNotAvailable",
            message: format!(
                "{field} is accepted but not carried out by this version of crosstrace"
            ),
            degraded: false,
        }],
        ..Default::default()
    }
}

async fn converge(policy: &TracingPolicy, name: &str, ctx: &Context) -> Result<Action, Error> {
    let view = view(policy, name, false);
    let now = Timestamp::now();
    let observed =
        ingress::observe(&ctx.client, view, |d| ingress_claimant(ctx, policy, d)).await?;
    let plan = ingress::plan(view, &observed, now.as_second());
    if !plan.actions.is_empty() {
        info!(actions = ?plan.actions.len(), "applying the edge layer");
        super::apply::ingress(&ctx.writer, &plan.actions).await?;
    }

    let reports = Reports {
        ingress: policy.spec.ingress.as_ref().map(|_| plan.report.clone()),
        workloads: policy
            .spec
            .workloads
            .as_ref()
            .map(|_| unavailable_layer("spec.workloads")),
        network: policy
            .spec
            .network
            .as_ref()
            .map(|_| unavailable_layer("spec.network")),
    };
    for (layer, report) in [
        ("ingress", &reports.ingress),
        ("workloads", &reports.workloads),
        ("network", &reports.network),
    ] {
        if let Some(r) = report {
            ctx.metrics.set_targets(name, layer, "selected", r.selected);
            ctx.metrics.set_targets(name, layer, "ready", r.ready);
            ctx.metrics
                .set_targets(name, layer, "rolledBack", r.rolled_back);
        }
    }
    let generation = view.generation;
    let next = status::status(
        policy.status.as_ref(),
        generation,
        &policy.spec,
        &reports,
        now,
    );
    report(ctx, policy, name, next).await?;

    let busy = [&reports.ingress, &reports.workloads, &reports.network]
        .into_iter()
        .flatten()
        .any(|r| r.in_flight > 0 || (r.pending > 0 && !policy.spec.rollout.paused && !r.stopped));
    Ok(Action::requeue(if busy {
        ctx.settings.poll
    } else {
        ctx.settings.resync
    }))
}

/// Writes the status only when something other than a timestamp changed, and publishes an Event for
/// every condition that transitioned.
async fn report(
    ctx: &Context,
    policy: &TracingPolicy,
    name: &str,
    next: TracingPolicyStatus,
) -> Result<(), Error> {
    let previous = policy.status.clone().unwrap_or_default();
    if previous == next {
        return Ok(());
    }
    let api = Api::<TracingPolicy>::all(ctx.client.clone());
    let patch =
        json!({"apiVersion": "crosstrace.dev/v1alpha1", "kind": "TracingPolicy", "status": next});
    ctx.writer.apply_status(&api, name, patch).await?;
    for c in conditions::transitions(&previous.conditions, &next.conditions) {
        let bad = if c.type_ == DEGRADED {
            c.status == "True"
        } else {
            c.status == "False"
        };
        let kind = if bad {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(
            ctx,
            policy,
            kind,
            &c.reason,
            format!("{} is {}: {}", c.type_, c.status, c.message),
        )
        .await;
    }
    Ok(())
}

async fn publish(
    ctx: &Context,
    policy: &TracingPolicy,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    ctx.metrics.write("create", "events");
    if let Err(error) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
        warn!(%error, "could not publish an event");
    }
}

/// Failed reconciles are retried after a pause, never in a hot loop.
pub fn error_policy(policy: Arc<TracingPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error.kind());
    warn!(policy = %policy.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(match error.kind() {
        "conflict" => Duration::from_secs(1),
        _ => Duration::from_secs(10),
    })
}
