//! Logs and traces of the operator itself: `tracing` to stderr (text or JSON), and OTLP export of the
//! reconcile spans through `tracing-opentelemetry` when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Log line format.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Keeps the OTLP pipeline alive; flushes spans on drop.
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("flushing OTLP spans failed: {error}");
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` filters (default `info`).
pub fn init(format: LogFormat, service: &'static str) -> anyhow::Result<Guard> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_runtime=warn,tower=warn,hyper=warn"));
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
        }
        _ => None,
    };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    Registry::default().with(filter).with(fmt).with(otel).try_init()?;
    tracing::info!(version = crate::build::VERSION, revision = crate::build::REVISION, "{service} starting");
    Ok(Guard(provider))
}

/// The trace id of the current span, when spans are exported.
pub fn trace_id() -> Option<TraceId> {
    let id = tracing::Span::current().context().span().span_context().trace_id();
    (id != TraceId::INVALID).then_some(id)
}
