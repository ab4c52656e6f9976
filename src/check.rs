//! `crosstrace check`: is this installation able to work? The chart's `helm test` runs it. One line per
//! check, `ok: ...` or `FAIL: ... (what to do)`, and a non-zero exit when any check fails:
//!
//! - both CRDs exist and are Established;
//! - the controller's ServiceAccount may do everything the controller does (one SubjectAccessReview
//!   per verb, so a ClusterRole trimmed too far or a missing binding is named);
//! - the controller's leader Lease is held and fresh (some replica runs and acts);
//! - with `--agent-namespace`: every node agent is Ready (an agent is Ready only while its OVSDB socket
//!   answers); with `--ovsdb`: that OVSDB socket answers here (run it inside an agent pod or on a node).
//!
//! It asks the API as its own ServiceAccount, which needs: `get` on the two CRDs, `create`
//! `subjectaccessreviews`, `get` on the Lease, and, for the agents, `get` on their DaemonSet and `list`
//! pods in their namespace. It never holds the controller's token.

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

/// `crosstrace check` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct CheckArgs {
    /// The controller's namespace (its ServiceAccount and Lease live there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "crosstrace-system")]
    pub namespace: String,
    /// The controller's ServiceAccount, and the name of its Lease.
    #[arg(long, default_value = "crosstrace-controller")]
    pub controller: String,
    /// Check the node agents of the DaemonSet `--agent` in this namespace.
    #[arg(long)]
    pub agent_namespace: Option<String>,
    /// The node agents' DaemonSet.
    #[arg(long, default_value = "crosstrace-agent")]
    pub agent: String,
    /// Check that this OVSDB server answers from here, e.g. unix:/var/run/openvswitch/db.sock.
    #[arg(long)]
    pub ovsdb: Option<String>,
}

/// The CRDs crosstrace serves.
pub const CRDS: [&str; 2] = ["tracingpolicies.crosstrace.dev", "nodetracings.crosstrace.dev"];

/// Where a permission of the controller must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// In every namespace (or cluster-scoped).
    Cluster,
    /// In the controller's namespace.
    OwnNamespace,
    /// On the controller's Lease only.
    OwnLease,
}

/// What the controller does with the API: (API group, resource[/subresource], verbs, scope). The chart's
/// ClusterRole and leader-election Role grant exactly this (e2e/tests/helm_test.sh checks both ways).
pub const CONTROLLER_ACCESS: &[(&str, &str, &[&str], Scope)] = &[
    ("crosstrace.dev", "tracingpolicies", &["list", "watch", "patch"], Scope::Cluster),
    ("crosstrace.dev", "tracingpolicies/status", &["patch"], Scope::Cluster),
    ("crosstrace.dev", "nodetracings", &["list", "watch", "create", "patch", "delete"], Scope::Cluster),
    ("apps", "deployments", &["get", "list", "watch", "patch"], Scope::Cluster),
    ("apps", "statefulsets", &["get", "list", "watch", "patch"], Scope::Cluster),
    ("apps", "daemonsets", &["get", "list", "watch", "patch"], Scope::Cluster),
    ("", "configmaps", &["get", "list", "watch", "create", "patch", "delete"], Scope::Cluster),
    ("", "namespaces", &["list", "watch"], Scope::Cluster),
    ("", "nodes", &["list", "watch"], Scope::Cluster),
    ("", "pods", &["list"], Scope::Cluster),
    ("events.k8s.io", "events", &["create", "patch"], Scope::Cluster),
    // The gateway layer (granted whether or not the Gateway API is installed; used only where it is).
    ("gateway.networking.k8s.io", "gateways", &["get", "list", "watch", "patch"], Scope::Cluster),
    ("gateway.networking.k8s.io", "gatewayclasses", &["get"], Scope::Cluster),
    ("gateway.networking.k8s.io", "httproutes", &["list", "watch"], Scope::Cluster),
    ("gateway.networking.k8s.io", "grpcroutes", &["list", "watch"], Scope::Cluster),
    ("gateway.envoyproxy.io", "envoyproxies", &["get", "list", "watch", "create", "patch", "delete"], Scope::Cluster),
    ("gateway.nginx.org", "nginxproxies", &["get", "list", "watch", "create", "patch", "delete"], Scope::Cluster),
    (
        "gateway.nginx.org",
        "observabilitypolicies",
        &["get", "list", "watch", "create", "patch", "delete"],
        Scope::Cluster,
    ),
    ("telemetry.istio.io", "telemetries", &["get", "list", "watch", "create", "patch", "delete"], Scope::Cluster),
    ("coordination.k8s.io", "leases", &["create", "list"], Scope::OwnNamespace),
    ("coordination.k8s.io", "leases", &["get", "update"], Scope::OwnLease),
];

/// The outcome of one check: `Ok(what was found)` or `Err(what is wrong and what to do)`.
type Outcome = Result<String, String>;

/// Runs every check, printing one line each to `out`; fails when any failed.
pub async fn run(client: Client, args: &CheckArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut outcomes = Vec::new();
    for crd in CRDS {
        outcomes.push(crd_established(&client, crd).await);
    }
    outcomes.extend(controller_access(&client, args).await);
    outcomes.push(lease_held(&client, args).await);
    if let Some(namespace) = &args.agent_namespace {
        outcomes.push(agents_ready(&client, namespace, &args.agent).await);
    }
    if let Some(address) = &args.ovsdb {
        outcomes.push(ovsdb_answers(address).await);
    }
    let mut failed = 0;
    for outcome in &outcomes {
        match outcome {
            Ok(what) => writeln!(out, "ok: {what}")?,
            Err(what) => {
                failed += 1;
                writeln!(out, "FAIL: {what}")?;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} checks failed", outcomes.len());
    }
    Ok(())
}

async fn crd_established(client: &Client, name: &str) -> Outcome {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let install = "install the chart with crds.enabled=true, or kubectl apply -f crds/";
    let crd = match api.get_opt(name).await {
        Ok(Some(crd)) => crd,
        Ok(None) => return Err(format!("CRD {name} is missing: {install}")),
        Err(e) => return Err(format!("CRD {name} cannot be read ({e}): {install}")),
    };
    let established =
        crd.status.and_then(|s| s.conditions).unwrap_or_default().into_iter().find(|c| c.type_ == "Established");
    match established {
        Some(c) if c.status == "True" => Ok(format!("CRD {name} is Established")),
        c => Err(format!(
            "CRD {name} is not Established ({}): kubectl describe crd {name} says why",
            c.map(|c| format!("{}: {}", c.reason.unwrap_or_default(), c.message.unwrap_or_default()))
                .unwrap_or_else(|| "no condition yet".into())
        )),
    }
}

async fn controller_access(client: &Client, args: &CheckArgs) -> Vec<Outcome> {
    let user = format!("system:serviceaccount:{}:{}", args.namespace, args.controller);
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let mut outcomes = Vec::new();
    for (group, resource, verbs, scope) in CONTROLLER_ACCESS {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let namespaced = *scope != Scope::Cluster;
        let name = if *scope == Scope::OwnLease { args.controller.as_str() } else { "" };
        let mut denied = Vec::new();
        for verb in *verbs {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.clone()),
                    groups: Some(vec![
                        "system:serviceaccounts".into(),
                        format!("system:serviceaccounts:{}", args.namespace),
                    ]),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some((*group).into()),
                        resource: Some(resource.into()),
                        subresource: Some(subresource.into()).filter(|s: &String| !s.is_empty()),
                        verb: Some((*verb).into()),
                        namespace: namespaced.then(|| args.namespace.clone()),
                        name: Some(name.into()).filter(|n: &String| !n.is_empty()),
                        ..ResourceAttributes::default()
                    }),
                    ..SubjectAccessReviewSpec::default()
                },
                ..SubjectAccessReview::default()
            };
            match api.create(&PostParams::default(), &review).await {
                Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
                Ok(_) => denied.push((*verb).to_string()),
                Err(e) => denied.push(format!("{verb} (review failed: {e})")),
            }
        }
        let mut what = String::new();
        let _ = write!(what, "{} {resource}", verbs.join(", "));
        if !subresource.is_empty() {
            let _ = write!(what, "/{subresource}");
        }
        if !name.is_empty() {
            let _ = write!(what, " {name}");
        }
        if namespaced {
            let _ = write!(what, " in {}", args.namespace);
        } else {
            what.push_str(" (all namespaces)");
        }
        outcomes.push(if denied.is_empty() {
            Ok(format!("the controller's ServiceAccount may {what}"))
        } else {
            Err(format!(
                "the controller's ServiceAccount {user} may not {} of: {what}; restore the chart's RBAC (helm \
                 upgrade) or check the ClusterRole/Role and bindings named {}",
                denied.join(", "),
                args.controller
            ))
        });
    }
    outcomes
}

async fn lease_held(client: &Client, args: &CheckArgs) -> Outcome {
    let api: Api<Lease> = Api::namespaced(client.clone(), &args.namespace);
    let name = &args.controller;
    let logs = format!("kubectl -n {} logs deployment/{name}", args.namespace);
    let lease = match api.get_opt(name).await {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            return Err(format!(
                "no Lease {name} in {}: no controller has ever started; see kubectl -n {} get pods and {logs}",
                args.namespace, args.namespace
            ));
        }
        Err(e) => return Err(format!("Lease {name} in {} cannot be read: {e}", args.namespace)),
    };
    let spec = lease.spec.unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(0).into());
    let age = spec.renew_time.map(|t| Timestamp::now().duration_since(t.0));
    match age {
        _ if holder.is_empty() => {
            Err(format!("Lease {name} is held by nobody: no controller replica leads; see {logs}"))
        }
        Some(age) if age <= duration => {
            Ok(format!("Lease {name} is held by {holder}, renewed {}s ago", age.as_secs().max(0)))
        }
        age => Err(format!(
            "Lease {name} held by {holder} is stale (renewed {} ago, valid {}s): the leader stopped; see {logs}",
            age.map_or("never".into(), |a| format!("{}s", a.as_secs())),
            duration.as_secs()
        )),
    }
}

async fn agents_ready(client: &Client, namespace: &str, name: &str) -> Outcome {
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let status = match daemonsets.get_opt(name).await {
        Ok(Some(ds)) => ds.status.unwrap_or_default(),
        Ok(None) => {
            return Err(format!("no DaemonSet {name} in {namespace}: install the chart with agent.enabled=true"));
        }
        Err(e) => return Err(format!("DaemonSet {name} in {namespace} cannot be read: {e}")),
    };
    if status.desired_number_scheduled > 0 && status.number_ready == status.desired_number_scheduled {
        return Ok(format!("{} node agents of DaemonSet {name} are Ready (OVSDB reachable)", status.number_ready));
    }
    if status.desired_number_scheduled == 0 {
        return Err(format!(
            "DaemonSet {name} in {namespace} runs on no node: check agent.nodeSelector (label your Open vSwitch \
             nodes, e.g. crosstrace.dev/ovs=true) and agent.tolerations"
        ));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = "app.kubernetes.io/component=agent";
    let not_ready: Vec<String> = match pods.list(&ListParams::default().labels(selector)).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter(|p| {
                !p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .map(|p| format!("{} on {}", p.name_any(), p.spec.and_then(|s| s.node_name).unwrap_or_default()))
            .collect(),
        Err(e) => vec![format!("(pods cannot be listed: {e})")],
    };
    Err(format!(
        "{} of {} node agents Ready; not Ready: {}. An agent is Ready once its node's OVSDB socket answers: run \
         Open vSwitch there, or keep agents off nodes without it (agent.nodeSelector, e.g. crosstrace.dev/ovs=true)",
        status.number_ready,
        status.desired_number_scheduled,
        not_ready.join(", ")
    ))
}

async fn ovsdb_answers(address: &str) -> Outcome {
    let connect = crate::agent::ovsdb::Client::connect(address);
    let client = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return Err(format!("OVSDB at {address} is not reachable ({e}): is Open vSwitch running here?")),
        Err(_) => return Err(format!("OVSDB at {address} did not answer in 5 s: is Open vSwitch running here?")),
    };
    match tokio::time::timeout(Duration::from_secs(5), client.list_dbs()).await {
        Ok(Ok(dbs)) if dbs.iter().any(|d| d == "Open_vSwitch") => Ok(format!("OVSDB at {address} serves Open_vSwitch")),
        Ok(Ok(dbs)) => Err(format!("OVSDB at {address} serves no Open_vSwitch database (only {dbs:?})")),
        Ok(Err(e)) => Err(format!("OVSDB at {address} failed list_dbs: {e}")),
        Err(_) => Err(format!("OVSDB at {address} did not answer list_dbs in 5 s")),
    }
}
