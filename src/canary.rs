//! The collector canary: one span, in a trace of its own, sent to a policy's collector the way the
//! edge and the sidecars send theirs (OTLP over gRPC or HTTP), to tell whether the collector accepts
//! spans. The trace id goes into the `CollectorReachable` condition, so that a user can open the canary
//! in their tracing backend and see the whole path work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};

use crate::api::{CollectorSpec, OtlpProtocol, TracingPolicySpec};

/// The collector a policy's canary asks: its own, where something sends it spans (the edge or the
/// workloads).
pub fn collector_of(spec: &TracingPolicySpec) -> Option<&CollectorSpec> {
    spec.collector.as_ref().filter(|_| spec.ingress.is_some() || spec.workloads.is_some())
}

/// What one canary found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The canary's trace id (32 hex digits).
    pub trace_id: String,
    /// `Err`: why the collector did not take it.
    pub outcome: Result<(), String>,
}

/// Sends one canary span to `collector`, waiting at most `timeout`.
pub async fn probe(collector: &CollectorSpec, timeout: Duration) -> Probe {
    let (trace_id, span_id) = ids();
    let outcome = match tokio::time::timeout(timeout, send(collector, canary(trace_id, span_id), timeout)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {}s", timeout.as_secs())),
    };
    Probe { trace_id: format!("{trace_id}"), outcome }
}

async fn send(collector: &CollectorSpec, span: SpanData, timeout: Duration) -> Result<(), String> {
    let exporter = match collector.protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(format!("http://{}", collector.endpoint))
            .with_timeout(timeout)
            .build(),
        OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("http://{}/v1/traces", collector.endpoint))
            .with_timeout(timeout)
            .with_headers(HashMap::new())
            .build(),
    }
    .map_err(|e| e.to_string())?;
    exporter.export(vec![span]).await.map_err(|e| e.to_string())
}

/// A fresh trace and span id from the clock and the process (unique enough for a canary, and never
/// the invalid all-zero id).
fn ids() -> (TraceId, SpanId) {
    static COUNTER: Mutex<u64> = Mutex::new(0);
    let n = {
        let mut c = COUNTER.lock().expect("canary counter");
        *c += 1;
        *c
    };
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let mix = u128::from(std::process::id()) << 96 ^ u128::from(n) << 64;
    let trace = (nanos ^ mix) | 1;
    let span = (u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or(1) ^ n.rotate_left(32)) | 1;
    (TraceId::from_bytes(trace.to_be_bytes()), SpanId::from_bytes(span.to_be_bytes()))
}

fn canary(trace_id: TraceId, span_id: SpanId) -> SpanData {
    let now = SystemTime::now();
    SpanData {
        span_context: SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, TraceState::default()),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: "crosstrace canary".into(),
        start_time: now,
        end_time: now,
        attributes: vec![KeyValue::new("crosstrace.canary", true)],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: InstrumentationScope::builder("crosstrace").build(),
    }
}

/// The last canary per collector, so that many policies sending to one collector share it. The
/// controller's canary rounds ([`Canaries::round`]) ask every collector in use on their own timer; a
/// reconcile asks only a collector it has no recent finding of (a new policy, a changed endpoint).
#[derive(Default)]
pub struct Canaries {
    last: crate::memo::Memo<(String, bool), Probe>,
}

fn key(collector: &CollectorSpec) -> (String, bool) {
    (collector.endpoint.clone(), collector.protocol == OtlpProtocol::Grpc)
}

impl Canaries {
    /// The canary for `collector`: the last one if younger than `fresh_for`, else a new one.
    pub async fn get(&self, collector: &CollectorSpec, fresh_for: Duration, timeout: Duration) -> Probe {
        if let Some(probe) = self.last.fresh(&key(collector), fresh_for) {
            return probe;
        }
        let probe = probe(collector, timeout).await;
        self.last.put(key(collector), probe.clone());
        probe
    }

    /// Asks each of `collectors` once (side by side, each at most `timeout`; many policies name the
    /// same one) and remembers what it found. Returns the collectors whose finding turned (accepted, or
    /// not), or that had none: only their policies need to look again, so that a converged policy is
    /// not reconciled for every canary.
    pub async fn round(&self, collectors: Vec<CollectorSpec>, timeout: Duration) -> Vec<CollectorSpec> {
        let distinct: std::collections::BTreeMap<_, _> = collectors.into_iter().map(|c| (key(&c), c)).collect();
        let probes = futures::future::join_all(distinct.into_values().map(|collector| async move {
            let found = probe(&collector, timeout).await;
            (collector, found)
        }))
        .await;
        let mut turned = Vec::new();
        for (collector, found) in probes {
            let key = key(&collector);
            let before = self.last.fresh(&key, Duration::MAX);
            if before.is_none_or(|b| b.outcome.is_ok() != found.outcome.is_ok()) {
                turned.push(collector);
            }
            self.last.put(key, found);
        }
        turned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_ids_are_valid_and_differ() {
        let (a, s) = ids();
        let (b, _) = ids();
        assert_ne!(a, TraceId::INVALID);
        assert_ne!(s, SpanId::INVALID);
        assert_ne!(a, b);
        assert_eq!(format!("{a}").len(), 32);
    }

    #[tokio::test]
    async fn a_collector_that_is_not_there_is_an_error_within_the_timeout() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for protocol in [OtlpProtocol::Grpc, OtlpProtocol::Http] {
            let collector = CollectorSpec { endpoint: format!("127.0.0.1:{port}"), protocol };
            let started = std::time::Instant::now();
            let probe = probe(&collector, Duration::from_secs(3)).await;
            assert!(probe.outcome.is_err(), "{protocol:?}: {probe:?}");
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }

    #[tokio::test]
    async fn a_round_names_only_the_collectors_whose_finding_turned() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let gone = CollectorSpec { endpoint: format!("127.0.0.1:{port}"), protocol: OtlpProtocol::Http };
        let canaries = Canaries::default();
        let timeout = Duration::from_secs(3);
        // Never asked: its finding is news.
        assert_eq!(canaries.round(vec![gone.clone()], timeout).await, vec![gone.clone()]);
        // Still not there: nothing turned, though the canary is a new one.
        let first = canaries.get(&gone, Duration::MAX, timeout).await;
        assert!(canaries.round(vec![gone.clone()], timeout).await.is_empty());
        let second = canaries.get(&gone, Duration::MAX, timeout).await;
        assert_ne!(first.trace_id, second.trace_id, "the round remembers its own canary");
        // A finding that turns is news again (the collector came back, as the memo would see it).
        canaries.last.put(key(&gone), Probe { trace_id: "1".repeat(32), outcome: Ok(()) });
        assert_eq!(canaries.round(vec![gone.clone()], timeout).await, vec![gone]);
    }
}
