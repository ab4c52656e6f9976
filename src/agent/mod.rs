//! The node agent (`crosstrace agent`): makes its node's Open vSwitch export what its `NodeTracing`
//! asks, proves it, and reports in that object's status.
//!
//! - [`ovsdb`]: an OVSDB client of its own (RFC 7047 JSON-RPC over the unix socket).
//! - [`unixctl`]: the ovs-vswitchd control socket (`ofproto/trace`, `version`).
//! - [`ensure`]: pure planning of the sFlow / IPFIX rows, and applying it.
//! - [`node`]: the Open vSwitch side, free of Kubernetes: passes on every change, drift, restart.
//! - [`status`]: `NodeTracing.status` from what a pass found.
//!
//! The Kubernetes side here watches only this node's `NodeTracing` (field selector `spec.nodeName`),
//! keeps that one object and nothing else, and writes only its status, by server-side apply, only when
//! it changed. It needs `get`/`list`/`watch` on `nodetracings` and `patch` on `nodetracings/status`.

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
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use crate::api::{FIELD_MANAGER, GROUP, NodeTracing};
use crate::lenient::{self, Seen};
use crate::metrics::{LayerLabels, Metrics, WriteLabels};
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
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = crate::http::Admin { metrics: metrics.clone(), ready: ready.clone() };
    let mut server = tokio::spawn(crate::http::serve(args.admin_addr, admin));

    let (want_tx, want_rx) = watch::channel(None::<Want>);
    let (report_tx, mut report_rx) = watch::channel(None::<Report>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let settings = node::Settings::new(args.ovsdb.clone(), args.unixctl.clone());
    let mut ovs = tokio::spawn(node::run(settings, want_rx, report_tx, ready, stop_rx));

    let node = args.node_name.clone();
    let api: Api<NodeTracing> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    // Lenient: an object that cannot be read is set aside (and the node's export left as it is) instead
    // of failing the watch.
    let mut events = lenient::watch::<NodeTracing>(client, config).default_backoff().boxed();
    tracing::info!(%node, ovsdb = %args.ovsdb, "agent started");

    let mut object: Option<NodeTracing> = None;
    let mut listing: Option<Option<NodeTracing>> = None;
    let mut synced = false;
    // This node's object cannot be read: what it wants is unknown, so nothing is asked of the node.
    let mut unreadable = false;
    let mut drift_seen = 0u64;
    let mut write_retry: Option<tokio::time::Instant> = None;
    let mut write_backoff = Duration::from_secs(1);
    tokio::pin!(shutdown);

    let result: anyhow::Result<()> = loop {
        let mut needs_write = false;
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            r = &mut server => break Err(anyhow::anyhow!("admin server stopped: {r:?}")),
            r = &mut ovs => break Err(anyhow::anyhow!("the Open vSwitch loop stopped: {r:?}")),
            event = events.next() => {
                let Some(event) = event else { break Err(anyhow::anyhow!("the NodeTracing watch ended")) };
                match event {
                    Ok(Seen::Event(Event::Init)) => {
                        listing = Some(None);
                        unreadable = false;
                    }
                    Ok(Seen::Event(Event::InitApply(o))) => if mine(&o, &node) {
                        listing = Some(Some(slim(o)));
                    },
                    Ok(Seen::Event(Event::InitDone)) => {
                        object = listing.take().flatten();
                        synced = true;
                    }
                    Ok(Seen::Event(Event::Apply(o))) => if mine(&o, &node) {
                        object = Some(slim(o));
                        unreadable = false;
                    },
                    Ok(Seen::Event(Event::Delete(o))) => if o.name_any() == node {
                        object = None;
                        unreadable = false;
                    },
                    Ok(Seen::Unreadable(u)) => {
                        if u.name == node {
                            tracing::warn!(error = %u.message(), "this node's NodeTracing cannot be read; its export is left as it is");
                            unreadable = true;
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching NodeTracing");
                        continue;
                    }
                }
                if synced && !unreadable {
                    let want = want_of(object.as_ref());
                    want_tx.send_if_modified(|w| {
                        let changed = w.as_ref() != Some(&want);
                        if changed {
                            tracing::info!(generation = ?want.generation, bridges = want.bridges.len(), "desired export changed");
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
        // No status for an object that cannot be read (the answer to the write could not be read either).
        if !needs_write || unreadable {
            continue;
        }
        let report = report_rx.borrow_and_update().clone();
        let (Some(report), Some(current)) = (report, object.as_ref()) else {
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
                object = Some(slim(updated));
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

async fn sleep_until(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Whether an object is this node's (the field selector already says so; the name is the contract).
fn mine(o: &NodeTracing, node: &str) -> bool {
    o.name_any() == node && o.spec.node_name == node
}

/// The object without what the agent never reads (managed fields can be most of it).
fn slim(mut o: NodeTracing) -> NodeTracing {
    o.metadata.managed_fields = None;
    o.metadata.annotations = None;
    o
}

/// What an object (or its absence) asks of the node. An object being deleted asks for nothing.
pub fn want_of(object: Option<&NodeTracing>) -> Want {
    match object {
        Some(o) if o.metadata.deletion_timestamp.is_none() => {
            Want { generation: o.metadata.generation, bridges: o.spec.bridges.clone() }
        }
        _ => Want::default(),
    }
}

/// Server-side applies the status a report implies, unless the object already has it. Returns the
/// updated object when it wrote.
async fn write_status(
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
    use crate::api::NodeTracingSpec;
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

    #[test]
    fn a_deleted_object_wants_nothing() {
        let mut o =
            NodeTracing::new("n1", NodeTracingSpec { node_name: "n1".into(), bridges: vec![Default::default()] });
        o.metadata.generation = Some(3);
        assert_eq!(want_of(Some(&o)).generation, Some(3));
        assert_eq!(want_of(Some(&o)).bridges.len(), 1);
        o.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::from_second(1).unwrap()));
        assert_eq!(want_of(Some(&o)), Want::default());
        assert_eq!(want_of(None), Want::default());
    }
}
