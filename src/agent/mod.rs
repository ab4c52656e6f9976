//! The node agent (`crosstrace agent`): makes its node's Open vSwitch export what its `NodeTracing`
//! asks, proves it, and reports in that object's status.
//!
//! - [`ovsdb`]: an OVSDB client of its own (RFC 7047 JSON-RPC over the unix socket).
//! - [`unixctl`]: the ovs-vswitchd control socket (`ofproto/trace`, `version`).
//! - [`desired`]: what this node's `NodeTracing` asks, from the watch events (pure).
//! - [`ensure`]: pure planning of the sFlow / IPFIX rows, and applying it.
//! - [`node`]: the Open vSwitch side, free of Kubernetes: passes on every change, drift, restart.
//! - [`status`]: `NodeTracing.status` from what a pass found.
//!
//! The Kubernetes side here watches only this node's `NodeTracing` (field selector `spec.nodeName`),
//! keeps that one object and nothing else, and writes only its status, by server-side apply, only when
//! it changed. It needs `get`/`list`/`watch` on `nodetracings` and `patch` on `nodetracings/status`.

pub mod desired;
pub mod ensure;
pub mod node;
pub mod ovsdb;
pub mod status;
pub mod unixctl;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use crate::api::{FIELD_MANAGER, GROUP, NodeTracing};
use crate::lenient::{self, Seen};
use crate::metrics::{LayerLabels, Metrics, WriteLabels};
use desired::Desired;
use node::{Report, Want};

/// `crosstrace agent` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentArgs {
    /// The node this agent runs on: its `NodeTracing` is the one with `spec.nodeName` equal to it.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The OVSDB server of this node's Open vSwitch.
    #[arg(long, default_value = "unix:/var/run/openvswitch/db.sock", env = "CROSSTRACE_OVSDB")]
    pub ovsdb: String,
    /// The ovs-vswitchd control socket; default: `ovs-vswitchd.<pid>.ctl` next to the OVSDB socket, the
    /// pid read from `ovs-vswitchd.pid` there (again after every restart of the daemon).
    #[arg(long, env = "CROSSTRACE_UNIXCTL")]
    pub unixctl: Option<PathBuf>,
    /// Address of /healthz, /readyz (OVSDB reachable) and /metrics.
    #[arg(long, default_value = "0.0.0.0:8081", env = "CROSSTRACE_AGENT_ADMIN_ADDR")]
    pub admin_addr: SocketAddr,
}

/// Runs the agent until `shutdown` resolves. The export stays in place when the agent stops: only a
/// `NodeTracing` that drops a bridge (or goes away) removes it.
pub async fn run(args: AgentArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = Client::try_default().await.context("connecting to the Kubernetes API")?;
    run_with_client(client, args, shutdown).await
}

/// [`run`] with a given client.
pub async fn run_with_client(
    client: Client,
    args: AgentArgs,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::agent());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = crate::http::Admin { metrics: metrics.clone(), ready: ready.clone() };
    let listener = crate::http::listen(args.admin_addr, "--admin-addr / CROSSTRACE_AGENT_ADMIN_ADDR").await?;
    let mut server = tokio::spawn(crate::http::serve(listener, admin));

    let (want_tx, want_rx) = watch::channel(None::<Want>);
    let (report_tx, mut report_rx) = watch::channel(None::<Report>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let settings = node::Settings::new(args.ovsdb.clone(), args.unixctl.clone());
    let mut ovs = tokio::spawn(node::run(settings, want_rx, report_tx, ready.clone(), stop_rx));

    let node = args.node_name.clone();
    let api: Api<NodeTracing> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    // Lenient: an object that cannot be read is set aside (and the node's export left as it is) instead
    // of failing the watch.
    let mut events = lenient::watch::<NodeTracing>(client, config).default_backoff().boxed();
    tracing::info!(%node, ovsdb = %args.ovsdb, "agent started");

    let mut desired = Desired::new(node.clone());
    let mut drift_seen = 0u64;
    let mut write_retry: Option<tokio::time::Instant> = None;
    let mut write_backoff = Duration::from_secs(1);
    tokio::pin!(shutdown);

    let result: anyhow::Result<()> = loop {
        let mut needs_write = false;
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            r = &mut server => break Err(crate::http::stopped(r)),
            r = &mut ovs => break Err(anyhow::anyhow!("the Open vSwitch loop stopped: {r:?}")),
            event = events.next() => {
                let Some(event) = event else { break Err(anyhow::anyhow!("the NodeTracing watch ended")) };
                let seen = match event {
                    Ok(seen) => seen,
                    Err(e) => {
                        tracing::warn!(error = %e, "watching NodeTracing");
                        continue;
                    }
                };
                if let Seen::Unreadable(u) = &seen
                    && u.name == node
                {
                    tracing::warn!(error = %u.message(), "this node's NodeTracing cannot be read; its export is left as it is");
                }
                if let Some(want) = desired.observe(seen) {
                    want_tx.send_if_modified(|w| {
                        let changed = w.as_ref() != Some(&want);
                        if changed {
                            let object = desired.object().is_some();
                            tracing::info!(object, generation = ?want.generation, bridges = want.bridges.len(), "desired export changed");
                            *w = Some(want);
                        }
                        changed
                    });
                    needs_write = true;
                }
            }
            changed = report_rx.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("the Open vSwitch loop stopped"));
                }
                needs_write = true;
            }
            _ = sleep_until(write_retry), if write_retry.is_some() => {
                write_retry = None;
                needs_write = true;
            }
        }
        if !needs_write {
            continue;
        }
        let report = report_rx.borrow_and_update().clone();
        metrics.ovsdb_connected.set(i64::from(ready.load(std::sync::atomic::Ordering::Relaxed)));
        if let Some(report) = &report {
            metrics.set_bridges(report.bridges.iter().map(|b| (b.status.bridge.as_str(), state_name(b.state))));
        }
        let (Some(report), Some(current)) = (report, desired.object()) else {
            continue;
        };
        if report.drift_corrections > drift_seen {
            metrics
                .drift_corrections
                .get_or_create(&LayerLabels { layer: "network".into() })
                .inc_by(report.drift_corrections - drift_seen);
            drift_seen = report.drift_corrections;
        }
        match write_status(&api, current, &report, &metrics).await {
            Ok(Some(updated)) => {
                desired.written(updated);
                write_backoff = Duration::from_secs(1);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?write_backoff, "writing NodeTracing status");
                write_retry = Some(tokio::time::Instant::now() + write_backoff);
                write_backoff = (write_backoff * 2).min(Duration::from_secs(60));
            }
        }
    };
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut ovs).await;
    server.abort();
    result
}

/// A bridge export's state as a metric label.
fn state_name(state: node::State) -> &'static str {
    match state {
        node::State::Verified => "verified",
        node::State::Pending => "pending",
        node::State::Failed => "failed",
        node::State::Conflict => "conflict",
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Server-side applies the status a report implies, unless the object already has it. Returns the
/// updated object when it wrote. Public so that the bench's stub agents write exactly what an agent
/// writes.
pub async fn write_status(
    api: &Api<NodeTracing>,
    current: &NodeTracing,
    report: &Report,
    metrics: &Metrics,
) -> kube::Result<Option<NodeTracing>> {
    let status = status::node_status(report, current.status.as_ref(), Timestamp::now());
    if current.status.as_ref() == Some(&status) {
        return Ok(None);
    }
    let name = current.name_any();
    let patch = json!({
        "apiVersion": format!("{GROUP}/v1alpha1"),
        "kind": "NodeTracing",
        "metadata": {"name": name},
        "status": status,
    });
    metrics
        .api_writes
        .get_or_create(&WriteLabels { verb: "apply_status".into(), resource: "nodetracings".into() })
        .inc();
    let updated = api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    tracing::info!(%name, generation = ?report.generation, "status written");
    Ok(Some(updated))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        let cli = Cli::try_parse_from(["agent", "--node-name", "n1"]).unwrap();
        assert_eq!(cli.agent.node_name, "n1");
        assert_eq!(cli.agent.ovsdb, "unix:/var/run/openvswitch/db.sock");
        assert_eq!(cli.agent.unixctl, None);
        assert_eq!(cli.agent.admin_addr.port(), 8081);
    }
}
