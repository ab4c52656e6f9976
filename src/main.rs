//! `crosstrace`: one binary, every role (controller, node agent, flows receiver). Everything but argument
//! parsing lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use crosstrace::clients::{self, Clients};
use crosstrace::controller::{self, Settings};
use crosstrace::http::{self, Admin};
use crosstrace::leader::{self, Fence, LeaseSettings};
use crosstrace::metrics::Metrics;
use crosstrace::telemetry::{self, LogFormat};
use futures::FutureExt;

/// jemalloc instead of glibc's malloc: a big policy's reconciles allocate and free their targets'
/// objects, and glibc kept those peaks (a long-running controller held 112.6 MiB after four rollouts of
/// 1000 targets; one arena: 71.6 MiB; mimalloc: 62.6 MiB but 12 MiB more in every agent). jemalloc with
/// its background thread (controller only): 36.5 MiB, the agent 2.5 MiB more. Measured with `just bench`
/// (issue 13; e2e/bench/RESULTS.md). Its options are compiled in (`.cargo/config.toml`: one arena,
/// freed pages handed back after 200 ms; why there).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "crosstrace", version = crosstrace::build::VERSION_LINE, about = "Cross-layer tracing for Kubernetes, rolled out by an operator")]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CROSSTRACE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Run the operator.
    Controller(ControllerArgs),
    /// Run the node agent: Open vSwitch flow export for this node's NodeTracing.
    Agent(crosstrace::agent::AgentArgs),
    /// Receive the network layer's sFlow and turn samples carrying a `traceparent` into spans of their traces.
    Flows(crosstrace::flows::FlowsArgs),
    /// Print every CRD as YAML, or write one file per CRD into a directory.
    Crds {
        /// Write `<crd name>.yaml` files into this directory instead of printing (repeatable).
        #[arg(long)]
        out_dir: Vec<PathBuf>,
        /// Write them as the Helm chart's templates (guarded by `crds.enabled`, kept on uninstall by
        /// `crds.keep`) into this directory (repeatable).
        #[arg(long)]
        chart_dir: Vec<PathBuf>,
    },
    /// Delete every TracingPolicy (the controller reverts each) and, with --wait, wait until all are
    /// gone. The chart's pre-delete hook.
    Uninstall(crosstrace::uninstall::UninstallArgs),
    /// Check an installation: CRDs, the controller's RBAC and Lease, the node agents. The chart's `helm test`.
    Check(crosstrace::check::CheckArgs),
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080", env = "CROSSTRACE_ADMIN_ADDR")]
    admin_addr: SocketAddr,
    /// Policies reconciled at once.
    #[arg(long, default_value_t = 4)]
    concurrency: u16,
    /// The namespace the operator runs in; its workloads are never instrumented.
    #[arg(long, env = "POD_NAMESPACE", default_value = "crosstrace-system")]
    namespace: String,
    /// Elect a leader on a Lease so that only one replica acts.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the Lease (in --namespace).
    #[arg(long, default_value = "crosstrace-controller")]
    lease_name: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Collector image of the workload sidecar when a policy names none.
    #[arg(long, default_value = controller::DEFAULT_SIDECAR_IMAGE, env = "CROSSTRACE_SIDECAR_IMAGE")]
    sidecar_image: String,
    /// Seconds a lease stays valid without renewal. The leader stops writing a third of it (at least
    /// 2 s) before another replica could take the lease over.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(leader::MIN_LEASE_DURATION.as_secs()..=3600))]
    lease_duration: u64,
    /// Writes of a layer in flight at once (workload injections, NodeTracings) when the controller starts.
    /// The limit adapts from there: up while the API server answers in time, down when it answers that it
    /// is overloaded (429, 503, 504) or slowly.
    #[arg(long, default_value_t = controller::DEFAULT_WRITE_CONCURRENCY as u16, value_parser = clap::value_parser!(u16).range(1..=64))]
    write_concurrency: u16,
    /// The most writes of a layer in flight at once; at least --write-concurrency (equal: the limit is fixed).
    #[arg(long, default_value_t = controller::DEFAULT_WRITE_CONCURRENCY_MAX as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    write_concurrency_max: u16,
    /// Milliseconds after its first write the network layer starts new ones, and waits for their answers,
    /// in one reconcile; a bigger batch goes on in the next reconcile.
    #[arg(long, default_value_t = controller::DEFAULT_WRITE_BUDGET.as_millis() as u64, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    write_budget_ms: u64,
    /// Milliseconds a reconcile starts workload writes, and waits for their answers, before it hands the
    /// rest of its plan to the policy's writer (which goes on until the policy's next reconcile).
    #[arg(long, default_value_t = controller::DEFAULT_WORKLOAD_WRITE_BUDGET.as_millis() as u64, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    workload_write_budget_ms: u64,
    /// Directory of the admin limits (the chart mounts its ConfigMap `crosstrace-admin-limits` there):
    /// policies beyond them are reported and nothing of them is written.
    #[arg(long, env = "CROSSTRACE_ADMIN_LIMITS")]
    admin_limits: Option<std::path::PathBuf>,
    /// Seconds between canary spans sent to each policy's collector (the CollectorReachable
    /// condition); 0 = none.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86400))]
    canary_interval_seconds: u64,
    /// The `crosstrace flows` receiver, `IP:port` or `name:port` (resolved when a policy with
    /// `spec.network.correlate` is reconciled, e.g. the chart's Service
    /// `crosstrace-flows.crosstrace-system.svc:6343`): such policies add its address to their sFlow targets.
    #[arg(long, env = "CROSSTRACE_FLOWS_RECEIVER", value_parser = controller::parse_flows_receiver)]
    flows_receiver: Option<String>,
    /// The Istio tracing provider (a MeshConfig `extensionProviders` name, the mesh admin's) that the
    /// gateway layer's Telemetry objects name for Istio gateways; unset: Istio gateways are reported,
    /// not traced.
    #[arg(long, env = "CROSSTRACE_ISTIO_TRACING_PROVIDER", value_parser = istio_provider)]
    istio_tracing_provider: Option<String>,
}

/// A provider name as Istio's MeshConfig takes it: non-empty, short, no whitespace or control characters.
fn istio_provider(value: &str) -> Result<String, String> {
    let ok = !value.is_empty() && value.len() <= 253 && value.chars().all(|c| c.is_ascii_graphic());
    if ok { Ok(value.to_string()) } else { Err("must be 1-253 printable ASCII characters without spaces".into()) }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    if args.write_concurrency_max < args.write_concurrency {
        anyhow::bail!(
            "--write-concurrency-max ({}) must be at least --write-concurrency ({})",
            args.write_concurrency_max,
            args.write_concurrency
        );
    }
    // jemalloc hands freed pages back from a thread of its own (after its decay time), so that what a
    // big rollout's reconciles freed does not stay with the long-running controller while it is idle.
    if let Err(error) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(%error, "jemalloc's background thread could not be started; freed memory is returned as memory is used");
    }
    let clients = Clients::infer().await.context("connecting to the Kubernetes API")?;
    let client = clients.requests.clone();
    let version = client.apiserver_version().await.context("reaching the Kubernetes API server")?;
    // Native sidecars (init containers with restartPolicy Always) are on by default since 1.29.
    let minor: u32 = version.minor.trim_end_matches('+').parse().unwrap_or(0);
    let native_sidecars = version.major == "1" && minor >= 29;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = Admin { metrics: metrics.clone(), ready: ready.clone() };
    let listener = http::listen(args.admin_addr, "--admin-addr / CROSSTRACE_ADMIN_ADDR").await?;
    let server = tokio::spawn(http::serve(listener, admin));
    let shutdown = shutdown_signal().shared();
    ready.store(true, Ordering::Relaxed);

    let leadership = if args.leader_election {
        let identity = args.identity.clone().unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
        let settings = LeaseSettings {
            namespace: args.namespace.clone(),
            name: args.lease_name.clone(),
            identity,
            duration: Duration::from_secs(args.lease_duration),
            renew_every: Duration::from_secs((args.lease_duration / 3).max(1)),
        };
        tokio::select! {
            l = leader::acquire(client.clone(), settings) => Some(l),
            _ = shutdown.clone() => return Ok(()),
        }
    } else {
        None
    };
    let fence = leadership.as_ref().map_or_else(Fence::open, |l| l.fence.clone());

    let mut settings = Settings {
        concurrency: args.concurrency,
        write_concurrency: usize::from(args.write_concurrency),
        write_concurrency_max: usize::from(args.write_concurrency_max),
        write_budget: Duration::from_millis(args.write_budget_ms),
        workload_write_budget: Duration::from_millis(args.workload_write_budget_ms),
        admin_limits: args.admin_limits,
        canary_every: (args.canary_interval_seconds > 0).then(|| Duration::from_secs(args.canary_interval_seconds)),
        flows_receiver: args.flows_receiver.map(controller::FlowsReceiver::new),
        ..Settings::default()
    };
    settings.workloads.sidecar_image = args.sidecar_image;
    settings.gateway.istio_provider = args.istio_tracing_provider;
    settings.workloads.native_sidecars = native_sidecars;
    settings.workloads.operator_namespace = args.namespace.clone();
    settings.namespace = args.namespace;
    let lost = leadership.as_ref().map(|l| l.lost.clone());
    let stop = {
        let shutdown = shutdown.clone();
        async move {
            match lost {
                Some(mut lost) => tokio::select! {
                    _ = shutdown => {}
                    _ = lost.wait_for(|l| *l) => tracing::error!("lost the leader lease; stopping"),
                },
                None => shutdown.await,
            }
        }
    };
    tokio::select! {
        _ = controller::run(clients, settings, metrics, fence, stop) => {}
        result = server => return Err(http::stopped(result)),
    }
    match leadership {
        Some(l) if *l.lost.borrow() => anyhow::bail!("lost the leader lease"),
        Some(l) => {
            l.release();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        None => {}
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "crosstrace".into())
}

fn write_crds(out_dirs: Vec<PathBuf>, chart_dirs: Vec<PathBuf>) -> anyhow::Result<()> {
    if out_dirs.is_empty() && chart_dirs.is_empty() {
        print!("{}", crosstrace::api::crds_yaml()?);
    }
    let plain = out_dirs.into_iter().map(|dir| (dir, crosstrace::api::crd_files()));
    let templates = chart_dirs.into_iter().map(|dir| (dir, crosstrace::api::crd_chart_templates()));
    for (dir, files) in plain.chain(templates) {
        std::fs::create_dir_all(&dir)?;
        for (file, text) in files? {
            std::fs::write(dir.join(file), text)?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line a person can act on (`{:#}`: the error and its causes, no backtrace); logged too,
            // so that a JSON log pipeline sees it.
            tracing::error!(error = format!("{error:#}"), "crosstrace stopped");
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.role {
        Role::Crds { out_dir, chart_dir } => write_crds(out_dir, chart_dir),
        Role::Uninstall(args) => {
            let _telemetry = telemetry::init(cli.log_format, "crosstrace-uninstall")?;
            let client = kube::Client::try_from(clients::request_timeouts(kube::Config::infer().await?))?;
            crosstrace::uninstall::run(client, &args, &mut std::io::stdout()).await
        }
        Role::Check(args) => {
            let _telemetry = telemetry::init(cli.log_format, "crosstrace-check")?;
            let client = kube::Client::try_from(clients::request_timeouts(kube::Config::infer().await?))?;
            crosstrace::check::run(client, &args, &mut std::io::stdout()).await
        }
        Role::Agent(args) => {
            let _telemetry = telemetry::init(cli.log_format, "crosstrace-agent")?;
            let client = clients::agent().await.context("connecting to the Kubernetes API")?;
            crosstrace::agent::run_with_client(client, args, shutdown_signal()).await
        }
        Role::Flows(args) => {
            let _telemetry = telemetry::init(cli.log_format, "crosstrace-flows")?;
            let client = clients::agent().await.context("connecting to the Kubernetes API")?;
            crosstrace::flows::run(client, args, shutdown_signal()).await
        }
        Role::Controller(args) => {
            let _telemetry = telemetry::init(cli.log_format, "crosstrace-controller")?;
            run_controller(args).await
        }
    }
}

#[cfg(test)]
mod tests {
    /// jemalloc was built with the options of `.cargo/config.toml` (`JEMALLOC_SYS_WITH_MALLOC_CONF`),
    /// and took them.
    #[test]
    fn jemalloc_runs_one_arena_and_hands_freed_pages_back_within_200_ms() {
        let built = tikv_jemalloc_ctl::config::malloc_conf::read().unwrap();
        assert!(built.contains("narenas:1") && built.contains("dirty_decay_ms:200"), "{built}");
        if std::env::var_os("_RJEM_MALLOC_CONF").is_none() {
            assert_eq!(tikv_jemalloc_ctl::opt::narenas::read().unwrap(), 1);
        }
    }
}
