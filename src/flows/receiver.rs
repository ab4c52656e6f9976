//! The IO of `crosstrace flows`: sFlow datagrams in on UDP, the `NodeTracing` watch that maps agent
//! addresses to nodes, spans out over OTLP/gRPC, metrics on the admin port.
//!
//! Spans go through the OpenTelemetry SDK (the crates the operator already exports its own spans
//! with): a remote parent `SpanContext` built from the `traceparent`, explicit start and end times,
//! batched by the SDK's batch span processor (a full queue drops spans rather than memory growing).
//! The SDK's default parent-based sampler keeps exactly the spans whose caller records the trace, which
//! is why [`super::correlate`] already leaves the others out.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer, TracerProvider as _,
};
use opentelemetry::{Context, trace::Span as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;

use super::origins::{Origin, origins, policies_by_node};
use super::reporter::{Reporter, SharedTally, Tallied, lock};
use super::{SampleSpan, correlate, sflow};
use crate::api::NodeTracing;
use crate::lenient::{self, Seen};
use crate::metrics::Metrics;

/// `crosstrace flows` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct FlowsArgs {
    /// UDP address the sFlow datagrams arrive at (the controller's `--flows-receiver` points here,
    /// through the chart's Service `crosstrace-flows`).
    #[arg(long, default_value = "0.0.0.0:6343", env = "CROSSTRACE_FLOWS_LISTEN")]
    pub listen: SocketAddr,
    /// Address of /healthz, /readyz (the socket is bound and the NodeTracings are listed) and /metrics.
    #[arg(long, default_value = "0.0.0.0:8082", env = "CROSSTRACE_FLOWS_ADMIN_ADDR")]
    pub admin_addr: SocketAddr,
    /// The OTLP/gRPC collector the spans go to, in plaintext: as a policy's `spec.collector.endpoint`
    /// (`host:port`) or a URL (`http://host:4317`).
    #[arg(long, env = "CROSSTRACE_FLOWS_COLLECTOR")]
    pub collector: String,
    /// Milliseconds the exporter waits to fill a batch of spans.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub export_delay_ms: u64,
    /// The Lease this receiver reports to the operator in (samples, trace-linked spans and export
    /// outcomes per node, for the `TracesFlowing` condition): its pod's name, from the chart. Without
    /// it nothing is reported.
    #[arg(long, env = "POD_NAME")]
    pub report_lease: Option<String>,
    /// The namespace of that Lease: its pod's, where the operator looks.
    #[arg(long, default_value = "crosstrace-system", env = "POD_NAMESPACE")]
    pub report_namespace: String,
    /// The pod's uid: the Lease is owned by the pod, so that it goes with it.
    #[arg(long, env = "POD_UID")]
    pub report_pod_uid: Option<String>,
    /// Seconds between reports (the Lease is renewed with each; it is stale after three missed).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub report_interval_seconds: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The receiver's metrics (`crosstrace_flows_*`), in the registry of the admin port.
#[derive(Clone)]
struct FlowMetrics {
    samples: Family<NodeLabels, Counter>,
    bytes: Family<NodeLabels, Counter>,
    spans: Family<NodeLabels, Counter>,
    dropped: Family<ReasonLabels, Counter>,
}

impl FlowMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            samples: Family::default(),
            bytes: Family::default(),
            spans: Family::default(),
            dropped: Family::default(),
        };
        registry.register("flows_samples", "sFlow flow samples received, by node", m.samples.clone());
        registry.register(
            "flows_bytes",
            "Frame bytes of the sampled packets, by node (not scaled by the sampling rate)",
            m.bytes.clone(),
        );
        registry.register("flows_spans", "Spans emitted for samples carrying a traceparent, by node", m.spans.clone());
        registry.register(
            "flows_dropped",
            "Datagrams (truncated, malformed, unsupported_version, unknown_agent, not_ready) and samples \
             (invalid_traceparent) dropped",
            m.dropped.clone(),
        );
        m
    }

    fn drop(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.dropped.get_or_create(&ReasonLabels { reason }).inc_by(n);
        }
    }
}

/// The OTLP endpoint URL of a `host:port` or an `http://` URL. TLS is refused rather than silently
/// not used: this build's OTLP exporter has no TLS support.
fn endpoint_url(collector: &str) -> anyhow::Result<String> {
    match collector.split_once("://") {
        None => Ok(format!("http://{collector}")),
        Some(("http", _)) => Ok(collector.to_string()),
        Some(_) => anyhow::bail!(
            "--collector {collector}: only plaintext OTLP/gRPC (host:port or http://) is supported; send to a \
             collector in the cluster that forwards over TLS"
        ),
    }
}

fn provider(args: &FlowsArgs, shared: SharedTally) -> anyhow::Result<SdkTracerProvider> {
    let inner = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint_url(&args.collector)?)
        .with_timeout(Duration::from_secs(10))
        .build()
        .with_context(|| format!("an OTLP exporter to {} (--collector)", args.collector))?;
    let exporter = Tallied { inner, shared };
    let config = BatchConfigBuilder::default()
        .with_scheduled_delay(Duration::from_millis(args.export_delay_ms))
        .with_max_queue_size(8192)
        .build();
    let processor = BatchSpanProcessor::builder(exporter).with_batch_config(config).build();
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("crosstrace-flows").build();
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
}

fn emit(tracer: &SdkTracer, span: SampleSpan) {
    let parent = SpanContext::new(
        TraceId::from_bytes(span.trace.trace_id),
        SpanId::from_bytes(span.trace.parent_id),
        TraceFlags::new(span.trace.flags),
        true,
        TraceState::default(),
    );
    let cx = Context::new().with_remote_span_context(parent);
    let mut s = tracer
        .span_builder(span.name)
        .with_kind(SpanKind::Internal)
        .with_start_time(span.time)
        .with_attributes(span.attributes)
        .start_with_context(tracer, &cx);
    s.end_with_timestamp(span.time);
}

/// The `NodeTracing` objects as the watch shows them, and the agent addresses they give.
#[derive(Default)]
struct Known {
    objects: BTreeMap<String, NodeTracing>,
    listing: Option<BTreeMap<String, NodeTracing>>,
    synced: bool,
    origins: HashMap<IpAddr, Origin>,
}

impl Known {
    fn observe(&mut self, seen: Seen<NodeTracing>) {
        let Seen::Event(event) = seen else {
            // Unreadable: what was known of it stays (its agent address rarely changes with it).
            return;
        };
        match event {
            watcher::Event::Init => self.listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                if let Some(listing) = &mut self.listing {
                    listing.insert(o.name_any(), slim(o));
                }
            }
            watcher::Event::InitDone => {
                self.objects = self.listing.take().unwrap_or_default();
                self.synced = true;
            }
            watcher::Event::Apply(o) => {
                self.objects.insert(o.name_any(), slim(o));
            }
            watcher::Event::Delete(o) => {
                self.objects.remove(&o.name_any());
            }
        }
        self.origins = origins(self.objects.values());
    }
}

/// What the receiver reads of a NodeTracing: its spec.
fn slim(mut o: NodeTracing) -> NodeTracing {
    o.metadata.managed_fields = None;
    o.metadata.annotations = None;
    o.status = None;
    o
}

/// Runs the receiver until `shutdown` resolves; spans still queued are flushed then.
pub async fn run(client: Client, args: FlowsArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut metrics = Metrics::flows();
    let flows = FlowMetrics::register(&mut metrics.registry);
    let metrics = Arc::new(metrics);
    let ready = Arc::new(AtomicBool::new(false));
    let admin = crate::http::Admin { metrics: metrics.clone(), ready: ready.clone() };
    let listener = crate::http::listen(args.admin_addr, "--admin-addr / CROSSTRACE_FLOWS_ADMIN_ADDR").await?;
    let socket = UdpSocket::bind(args.listen)
        .await
        .with_context(|| format!("cannot receive sFlow on UDP {} (--listen / CROSSTRACE_FLOWS_LISTEN)", args.listen))?;
    let shared = SharedTally::default();
    let provider = provider(&args, shared.clone())?;
    let tracer = provider.tracer("crosstrace-flows");
    let mut server = tokio::spawn(crate::http::serve(listener, admin));
    let leases = Api::<Lease>::namespaced(client.clone(), &args.report_namespace);
    let reporter = match &args.report_lease {
        Some(name) => {
            let reporter = Reporter {
                api: leases.clone(),
                name: name.clone(),
                pod_uid: args.report_pod_uid.clone(),
                every: Duration::from_secs(args.report_interval_seconds),
                collector: args.collector.clone(),
                metrics: metrics.clone(),
            };
            Some(tokio::spawn(reporter.run(shared.clone())))
        }
        None => {
            tracing::warn!(
                "no --report-lease (POD_NAME): the operator's TracesFlowing will not hear from this receiver"
            );
            None
        }
    };
    let mut events = lenient::watch::<NodeTracing>(client, watcher::Config::default()).default_backoff().boxed();
    let listen = socket.local_addr().map_or_else(|_| args.listen.to_string(), |a| a.to_string());
    tracing::info!(%listen, collector = %args.collector, "flows receiver started");

    let mut known = Known::default();
    let mut buffer = vec![0u8; 65_536];
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            r = &mut server => break Err(crate::http::stopped(r)),
            event = events.next() => match event {
                None => break Err(anyhow::anyhow!("the NodeTracing watch ended")),
                Some(Err(e)) => tracing::warn!(error = %e, "watching NodeTracing"),
                Some(Ok(seen)) => {
                    known.observe(seen);
                    lock(&shared).policies = policies_by_node(known.objects.values());
                    if known.synced && !ready.swap(true, Ordering::Relaxed) {
                        tracing::info!(agents = known.origins.len(), "NodeTracings listed; receiving");
                    }
                }
            },
            received = socket.recv_from(&mut buffer) => match received {
                Ok((n, _from)) => receive(&buffer[..n], &known, &flows, &tracer, &shared),
                Err(e) => {
                    // E.g. an ICMP error surfacing on the socket: go on, without spinning.
                    tracing::debug!(error = %e, "receiving a datagram");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    };
    server.abort();
    // The report goes first: flushing to a collector that is not there can take the exporter's timeout.
    if let (Some(task), Some(name)) = (reporter, &args.report_lease) {
        task.abort();
        Reporter::remove(&leases, name, &metrics).await;
    }
    if let Err(error) = provider.shutdown() {
        tracing::warn!(%error, "flushing the last spans");
    }
    result
}

fn receive(bytes: &[u8], known: &Known, flows: &FlowMetrics, tracer: &SdkTracer, shared: &SharedTally) {
    if !known.synced {
        return flows.drop("not_ready", 1);
    }
    let datagram = match sflow::decode(bytes) {
        Ok(d) => d,
        Err(e) => return flows.drop(e.reason(), 1),
    };
    let Some(origin) = known.origins.get(&datagram.agent) else {
        tracing::debug!(agent = %datagram.agent, "a datagram from an agent address no NodeTracing names");
        return flows.drop("unknown_agent", 1);
    };
    let outcome = correlate(&datagram, origin, SystemTime::now());
    let node = NodeLabels { node: origin.node.clone() };
    flows.samples.get_or_create(&node).inc_by(outcome.samples);
    flows.bytes.get_or_create(&node).inc_by(outcome.bytes);
    flows.drop("invalid_traceparent", outcome.invalid_traceparents);
    if !outcome.spans.is_empty() {
        flows.spans.get_or_create(&node).inc_by(outcome.spans.len() as u64);
    }
    let spans = outcome.spans.len() as u64;
    lock(shared).tally.sampled(&origin.node, outcome.samples, spans, k8s_openapi::jiff::Timestamp::now());
    for span in outcome.spans {
        emit(tracer, span);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_endpoint_becomes_a_plaintext_url() {
        let url = |c: &str| endpoint_url(c).map_err(|e| e.to_string());
        assert_eq!(url("otel-gateway.observability.svc:4317").unwrap(), "http://otel-gateway.observability.svc:4317");
        assert_eq!(url("[fd00::5]:4317").unwrap(), "http://[fd00::5]:4317");
        assert_eq!(url("http://collector:4317").unwrap(), "http://collector:4317");
        assert!(url("https://collector:4317").unwrap_err().contains("only plaintext"));
    }

    #[test]
    fn metric_names_are_the_documented_ones() {
        let mut metrics = Metrics::flows();
        let flows = FlowMetrics::register(&mut metrics.registry);
        let node = NodeLabels { node: "n0".into() };
        flows.samples.get_or_create(&node).inc();
        flows.bytes.get_or_create(&node).inc_by(60);
        flows.spans.get_or_create(&node).inc();
        flows.drop("truncated", 1);
        flows.drop("unknown_agent", 0);
        let text = metrics.encode();
        for line in [
            "crosstrace_flows_samples_total{node=\"n0\"} 1",
            "crosstrace_flows_bytes_total{node=\"n0\"} 60",
            "crosstrace_flows_spans_total{node=\"n0\"} 1",
            "crosstrace_flows_dropped_total{reason=\"truncated\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(!text.contains("reason=\"unknown_agent\""), "a zero count creates no series");
    }

    #[test]
    fn not_ready_until_listed_and_unknown_agents_are_dropped() {
        let mut known = Known::default();
        known.observe(Seen::Event(watcher::Event::Init));
        assert!(!known.synced);
        let tracing = {
            use crate::api::node_tracing::BridgeExport;
            use crate::api::{NodeTracingSpec, SflowSpec};
            let sflow = SflowSpec {
                targets: vec!["127.0.0.1:6343".into()],
                sampling: 64,
                polling: 0,
                header: 512,
                agent: "127.0.1.1".into(),
            };
            let bridges = vec![BridgeExport { bridge: "br-int".into(), sflow: Some(sflow), ..Default::default() }];
            NodeTracing::new("n0", NodeTracingSpec { node_name: "n0".into(), bridges })
        };
        known.observe(Seen::Event(watcher::Event::InitApply(tracing.clone())));
        known.observe(Seen::Event(watcher::Event::InitDone));
        assert!(known.synced);
        assert_eq!(known.origins.len(), 1);
        known.observe(Seen::Event(watcher::Event::Delete(tracing)));
        assert!(known.origins.is_empty());
    }
}
