//! Prometheus metrics of the operator itself, served on the admin port at `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub verb: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub policy: String,
    pub layer: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabels {
    pub layer: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub api_writes: Family<WriteLabels, Counter>,
    pub targets: Family<TargetLabels, Gauge>,
    pub drift_corrections: Family<LayerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("crosstrace");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let api_writes = Family::<WriteLabels, Counter>::default();
        let targets = Family::<TargetLabels, Gauge>::default();
        let drift_corrections = Family::<LayerLabels, Counter>::default();
        registry.register("reconciles", "Reconciles of TracingPolicies", reconciles.clone());
        registry.register("reconcile_errors", "Failed reconciles by error kind", reconcile_errors.clone());
        registry.register("reconcile_duration_seconds", "Duration of one reconcile", reconcile_duration.clone());
        registry.register("api_writes", "Writes the operator sent to the API server", api_writes.clone());
        registry.register(
            "targets",
            "Selected targets by policy, layer and state; every target is in one state, so the states add up",
            targets.clone(),
        );
        registry.register(
            "drift_corrections",
            "Changes re-applied after someone removed them",
            drift_corrections.clone(),
        );
        Self { registry, reconciles, reconcile_errors, reconcile_duration, api_writes, targets, drift_corrections }
    }
}

impl Metrics {
    /// Counts an API write (called right before it is sent).
    pub fn write(&self, verb: &str, resource: &str) {
        crate::crashpoint::before_write();
        tracing::debug!(verb, resource, "API write");
        self.api_writes.get_or_create(&WriteLabels { verb: verb.into(), resource: resource.into() }).inc();
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    pub fn failed(&self, kind: &str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { kind: kind.into() }).inc();
    }

    pub fn set_targets(&self, policy: &str, layer: &str, state: &str, count: usize) {
        let labels = TargetLabels { policy: policy.into(), layer: layer.into(), state: state.into() };
        self.targets.get_or_create(&labels).set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Forgets a deleted policy's target gauges so that they do not linger.
    pub fn forget_policy(&self, policy: &str) {
        for layer in ["ingress", "gateway", "workloads", "network"] {
            for (state, _) in crate::layers::LayerReport::default().states() {
                self.targets.remove(&TargetLabels { policy: policy.into(), layer: layer.into(), state: state.into() });
            }
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
