//! The IO of the receiver's [`Report`]: the exporter wrapper that tallies what the collector accepted,
//! and the task that renews the receiver's Lease with the report.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use serde_json::json;

use super::report::{REPORT_ANNOTATION, REPORT_LABEL, Report, Tally};

/// What the receiver loop, the exporter and the reporter share.
#[derive(Default)]
pub struct Shared {
    pub tally: Tally,
    /// Per node, the policies whose sFlow export there names the receiver.
    pub policies: BTreeMap<String, BTreeSet<String>>,
}

pub type SharedTally = Arc<Mutex<Shared>>;

pub fn lock(shared: &SharedTally) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The span attribute that names a span's node.
const NODE: &str = "crosstrace.node";

/// An exporter that tallies, per node, the spans its inner exporter got accepted, and the outcome.
pub struct Tallied<E> {
    pub inner: E,
    pub shared: SharedTally,
}

impl<E: std::fmt::Debug> std::fmt::Debug for Tallied<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tallied").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<E: SpanExporter> SpanExporter for Tallied<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut nodes: BTreeMap<String, u64> = BTreeMap::new();
        for span in &batch {
            if let Some(kv) = span.attributes.iter().find(|kv| kv.key.as_str() == NODE) {
                *nodes.entry(kv.value.as_str().into_owned()).or_default() += 1;
            }
        }
        let result = self.inner.export(batch).await;
        let outcome = result.as_ref().map(|_| ()).map_err(ToString::to_string);
        lock(&self.shared).tally.exported(&nodes, outcome, Timestamp::now());
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Where and how often the report goes.
pub struct Reporter {
    pub api: Api<Lease>,
    pub name: String,
    pub pod_uid: Option<String>,
    pub every: Duration,
    pub collector: String,
    pub metrics: Arc<crate::metrics::Metrics>,
}

const MANAGER: &str = "crosstrace-flows";

/// The Lease as the receiver applies it: named after its pod and owned by it.
fn lease(name: &str, pod_uid: Option<&str>, every: Duration, report: &Report, now: Timestamp) -> serde_json::Value {
    let owner =
        pod_uid.map(|uid| json!([{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid, "controller": true}]));
    let duration = i32::try_from(every.as_secs() * 3).unwrap_or(i32::MAX);
    let report = serde_json::to_string(report).expect("a report is JSON");
    let mut metadata = json!({
        "name": name,
        "labels": {REPORT_LABEL: "true", "app.kubernetes.io/name": "crosstrace", "app.kubernetes.io/component": "flows"},
        "annotations": {REPORT_ANNOTATION: report},
    });
    if let Some(owner) = owner {
        metadata["ownerReferences"] = owner;
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {"holderIdentity": name, "leaseDurationSeconds": duration, "renewTime": MicroTime(now)},
    })
}

impl Reporter {
    /// Renews the Lease with the report every `every`, until dropped. A failed write is logged when the
    /// failing starts and when it ends, not on every attempt.
    pub async fn run(self, shared: SharedTally) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let now = Timestamp::now();
            let report = {
                let mut s = lock(&shared);
                let policies = s.policies.clone();
                s.tally.report(&self.collector, &policies, now)
            };
            let params = PatchParams::apply(MANAGER).force();
            self.metrics.write("patch", "leases");
            match self
                .api
                .patch(
                    &self.name,
                    &params,
                    &Patch::Apply(lease(&self.name, self.pod_uid.as_deref(), self.every, &report, now)),
                )
                .await
            {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!(lease = %self.name, "reporting again");
                }
                Ok(_) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(lease = %self.name, %error, "cannot write the report Lease; the operator will see this receiver as silent");
                }
                Err(_) => {}
            }
        }
    }

    /// Deletes the Lease (at shutdown: the operator then knows at once that this replica is gone).
    pub async fn remove(api: &Api<Lease>, name: &str, metrics: &crate::metrics::Metrics) {
        let params = DeleteParams::default();
        metrics.write("delete", "leases");
        match tokio::time::timeout(Duration::from_secs(2), api.delete(name, &params)).await {
            Ok(Ok(_)) => {}
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => {}
            Ok(Err(error)) => tracing::warn!(lease = name, %error, "deleting the report Lease"),
            Err(_) => tracing::warn!(lease = name, "deleting the report Lease: no answer within 2 s"),
        }
    }
}

/// The fresh reports of every receiver replica, as the operator reads them: one list of the Leases
/// labelled [`REPORT_LABEL`] in its namespace, shared by every policy for a few seconds.
#[derive(Default)]
pub struct Reports {
    last: crate::memo::Memo<(), Vec<Report>>,
}

/// How long one listing serves every policy.
const REPORTS_MEMO: Duration = Duration::from_secs(5);

impl Reports {
    /// The reports whose Lease is not stale (renewed within its duration). `Err`: the list failed.
    pub async fn get(&self, api: &Api<Lease>) -> Result<Vec<Report>, String> {
        if let Some(reports) = self.last.fresh(&(), REPORTS_MEMO) {
            return Ok(reports);
        }
        let params = kube::api::ListParams::default().labels(&format!("{REPORT_LABEL}=true"));
        let leases = api.list(&params).await.map_err(|e| e.to_string())?;
        let reports = fresh_reports(&leases.items, Timestamp::now());
        self.last.put((), reports.clone());
        Ok(reports)
    }
}

/// The reports of the Leases renewed within their duration (an unreadable report counts as none).
pub fn fresh_reports(leases: &[Lease], now: Timestamp) -> Vec<Report> {
    leases
        .iter()
        .filter(|l| {
            let spec = l.spec.as_ref();
            let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
            let duration = spec.and_then(|s| s.lease_duration_seconds).unwrap_or(0);
            renewed.is_some_and(|r| now.as_second() - r.as_second() <= i64::from(duration))
        })
        .filter_map(|l| l.metadata.annotations.as_ref()?.get(REPORT_ANNOTATION))
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_owned_by_the_pod_and_holds_the_report() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let report = Report { collector: "c:4317".into(), ..Default::default() };
        let lease = lease("crosstrace-flows-7d9c-x2", Some("u-1"), Duration::from_secs(15), &report, now);
        assert_eq!(lease["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(lease["metadata"]["labels"][REPORT_LABEL], "true");
        assert_eq!(lease["spec"]["leaseDurationSeconds"], 45);
        let report: Report =
            serde_json::from_str(lease["metadata"]["annotations"][REPORT_ANNOTATION].as_str().unwrap()).unwrap();
        assert_eq!(report.collector, "c:4317");

        let parsed: Lease = serde_json::from_value(lease).unwrap();
        let mut broken = parsed.clone();
        broken.metadata.annotations.as_mut().unwrap().insert(REPORT_ANNOTATION.into(), "{".into());
        let at = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        assert_eq!(fresh_reports(&[parsed.clone(), broken], at(45)).len(), 1, "unreadable: none");
        assert!(fresh_reports(&[parsed], at(46)).is_empty(), "three intervals missed: stale");
    }
}
