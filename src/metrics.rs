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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub revision: String,
}

/// `crosstrace_build_info{version, revision} 1`: which build a process runs (every role has it).
fn register_build_info(registry: &mut Registry) {
    let info = Family::<BuildLabels, Gauge>::default();
    let labels = BuildLabels { version: crate::build::VERSION.into(), revision: crate::build::REVISION.into() };
    info.get_or_create(&labels).set(1);
    registry.register("build_info", "The version and git revision this process was built from", info);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BridgeLabels {
    pub bridge: String,
    pub state: String,
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
    /// The controller's: how many writes of a layer may be in flight at once (it adapts).
    pub write_limit: Family<LayerLabels, Gauge>,
    /// The agent's: 1 while it is connected to its node's OVSDB.
    pub ovsdb_connected: Gauge,
    /// The agent's: 1 for each bridge of its NodeTracing, labelled with the export's state there.
    pub bridges: Family<BridgeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("crosstrace");
        register_build_info(&mut registry);
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let api_writes = Family::<WriteLabels, Counter>::default();
        let targets = Family::<TargetLabels, Gauge>::default();
        let drift_corrections = Family::<LayerLabels, Counter>::default();
        let write_limit = Family::<LayerLabels, Gauge>::default();
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
        registry.register(
            "write_limit",
            "Writes of a layer the controller lets be in flight at once; it adapts to the API server's answers",
            write_limit.clone(),
        );
        Self {
            registry,
            write_limit,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            api_writes,
            targets,
            drift_corrections,
            ovsdb_connected: Gauge::default(),
            bridges: Family::default(),
        }
    }
}

impl Metrics {
    /// The node agent's metrics: its API writes and drift corrections, whether it reaches OVSDB, and
    /// the state of each bridge's export (what a PodMonitor scrapes to see every node's health).
    pub fn agent() -> Self {
        let mut registry = Registry::with_prefix("crosstrace");
        register_build_info(&mut registry);
        let controller = Self::default();
        let (api_writes, drift_corrections) = (controller.api_writes.clone(), controller.drift_corrections.clone());
        let (ovsdb_connected, bridges) = (Gauge::default(), Family::<BridgeLabels, Gauge>::default());
        registry.register("api_writes", "Writes the agent sent to the API server", api_writes.clone());
        registry.register(
            "drift_corrections",
            "Exports re-applied after someone changed them on the node",
            drift_corrections.clone(),
        );
        registry.register("agent_ovsdb_connected", "1 while the agent is connected to OVSDB", ovsdb_connected.clone());
        registry.register(
            "agent_bridges",
            "Bridges of this node's NodeTracing (1 each), by the state of their export",
            bridges.clone(),
        );
        Self { registry, api_writes, drift_corrections, ovsdb_connected, bridges, ..controller }
    }

    /// The flows receiver's base metrics: its build and its API writes (the report Lease); the receiver
    /// registers its `crosstrace_flows_*` families beside them. None of the controller's.
    pub fn flows() -> Self {
        let mut registry = Registry::with_prefix("crosstrace");
        register_build_info(&mut registry);
        let controller = Self::default();
        let api_writes = controller.api_writes.clone();
        registry.register("api_writes", "Writes the flows receiver sent to the API server", api_writes.clone());
        Self { registry, api_writes, ..controller }
    }

    /// The agent's bridges as a report gives them: exactly one series per bridge, with its state.
    pub fn set_bridges<'a>(&self, bridges: impl IntoIterator<Item = (&'a str, &'a str)>) {
        self.bridges.clear();
        for (bridge, state) in bridges {
            self.bridges.get_or_create(&BridgeLabels { bridge: bridge.into(), state: state.into() }).set(1);
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_exports_its_own_families_and_one_series_per_bridge() {
        let agent = Metrics::agent();
        agent.ovsdb_connected.set(1);
        agent.set_bridges([("br-int", "pending")]);
        agent.set_bridges([("br-int", "verified"), ("br-ex", "conflict")]);
        let text = agent.encode();
        assert!(text.contains("crosstrace_agent_ovsdb_connected 1"), "{text}");
        assert!(text.contains(r#"crosstrace_agent_bridges{bridge="br-int",state="verified"} 1"#), "{text}");
        assert!(text.contains(r#"crosstrace_agent_bridges{bridge="br-ex",state="conflict"} 1"#), "{text}");
        assert!(!text.contains("pending"), "a bridge has one state: {text}");
        assert!(!text.contains("crosstrace_reconciles"), "no controller families on an agent: {text}");
        assert!(!Metrics::default().encode().contains("crosstrace_agent_"), "no agent families on the controller");
        for text in [text, Metrics::default().encode()] {
            let info = format!(
                "crosstrace_build_info{{version=\"{}\",revision=\"{}\"}} 1",
                crate::build::VERSION,
                crate::build::REVISION
            );
            assert!(text.contains(&info), "{text}");
        }
    }
}
