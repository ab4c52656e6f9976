//! The operator: wiring of watches, the shared [`Context`], and the run loop.

pub mod apply;
pub mod backoff;
pub mod invalid;
pub mod limit;
pub mod parts;
pub mod reconcile;
pub mod status;
pub mod statuses;
pub mod triggers;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use std::collections::BTreeMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DynamicObject, PartialObjectMeta};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::api::TracingPolicy;
use crate::api::{NodeTracing, WorkloadKind};
use crate::clients::Clients;
use crate::layers::stores::{ConfigMaps, Stores};
use crate::layers::workloads::Workload;
use crate::layers::{gateway, ingress, network, workloads};
use crate::leader::Fence;
use crate::lean::{Addressed, Lean, Meta, Parts, Pruned};
use crate::lenient;
use crate::metrics::Metrics;
use apply::Writer;

/// Settings of the controller role.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Reconciles running at once.
    pub concurrency: u16,
    /// The namespace the operator runs in (never instrumented).
    pub namespace: String,
    /// How often a converged policy is looked at again (it makes no write then).
    pub resync: Duration,
    /// How often a policy with a rollout in flight is looked at.
    pub poll: Duration,
    /// What the workload layer injects when a policy leaves it open.
    pub workloads: workloads::Defaults,
    /// Writes of a layer in flight at once, across reconciles (workload injections, NodeTracings), when
    /// the controller starts: the limit adapts from there ([`limit::WriteLimit`]).
    pub write_concurrency: usize,
    /// The most the write limit goes up to (equal to `write_concurrency`: fixed).
    pub write_concurrency_max: usize,
    /// How long after the network layer's first write in a reconcile new ones start; a bigger batch goes
    /// on in the next reconcile at once (`--write-budget-ms`).
    pub write_budget: Duration,
    /// How long a reconcile starts workload writes and waits for their answers before it hands the rest
    /// of its plan to the policy's writer (`--workload-write-budget-ms`).
    pub workload_write_budget: Duration,
    /// Where the chart mounts its admin limits (`--admin-limits`): read on every reconcile, so that a
    /// changed limit applies without a restart. `None`: no limits beyond the built-in ones.
    pub admin_limits: Option<std::path::PathBuf>,
    /// How often a canary span asks each policy's collector whether it accepts spans
    /// (`CollectorReachable`); `None`: never (the condition is left out).
    pub canary_every: Option<Duration>,
    /// The `crosstrace flows` receiver that policies with `spec.network.correlate` export sFlow to
    /// (`--flows-receiver`); `None`: none is deployed.
    pub flows_receiver: Option<FlowsReceiver>,
    /// What the gateway layer takes from the operator's configuration (the Istio tracing provider).
    pub gateway: gateway::Config,
}

/// The `crosstrace flows` receiver (`--flows-receiver`, `host:port`) and the address it last resolved to.
#[derive(Clone, Debug)]
pub struct FlowsReceiver {
    pub name: String,
    last: Arc<Mutex<Option<std::net::SocketAddr>>>,
}

impl FlowsReceiver {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), last: Arc::default() }
    }

    /// The address to export to: resolved now, or, when that fails, the address it resolved to last
    /// (a DNS hiccup must not take the receiver out of every correlating export, and put it back).
    pub async fn address(&self) -> Result<std::net::SocketAddr, String> {
        match resolve_flows_receiver(&self.name).await {
            Ok(address) => {
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(address);
                Ok(address)
            }
            Err(e) => (*self.last.lock().unwrap_or_else(|e| e.into_inner())).ok_or(e),
        }
    }
}

/// Checks a `--flows-receiver`: `host:port`, the host an IP address (IPv6 in brackets) or a DNS name.
pub fn parse_flows_receiver(value: &str) -> Result<String, String> {
    if value.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(value.to_string());
    }
    let (host, port) = value.rsplit_once(':').ok_or("must be host:port")?;
    port.parse::<u16>().ok().filter(|p| *p > 0).ok_or("the port must be 1-65535")?;
    let name =
        regex::Regex::new("^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$").expect("a pattern");
    if host.len() > 253 || !name.is_match(host) {
        return Err("the host must be an IP address (IPv6 in brackets) or a lowercase DNS name".into());
    }
    Ok(value.to_string())
}

/// The address sFlow can be sent to (Open vSwitch takes addresses, never names): `--flows-receiver` as
/// it is when it is one, else resolved now (a Service's ClusterIP changes only with the Service).
pub async fn resolve_flows_receiver(receiver: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(address) = receiver.parse() {
        return Ok(address);
    }
    let lookup = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(receiver)).await;
    let mut addresses = match lookup {
        Ok(Ok(addresses)) => addresses.collect::<Vec<_>>(),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no answer within 2 s".into()),
    };
    addresses.sort_by_key(|a| !a.is_ipv4());
    addresses.into_iter().next().ok_or_else(|| "no address".into())
}

/// How long a canary waits for the collector's answer.
pub const CANARY_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes of a layer in flight at once when the controller starts, unless `--write-concurrency` says
/// otherwise.
pub const DEFAULT_WRITE_CONCURRENCY: usize = 8;

/// The most writes of a layer in flight at once, unless `--write-concurrency-max` says otherwise.
pub const DEFAULT_WRITE_CONCURRENCY_MAX: usize = 32;

/// How long after its first write the network layer starts new ones, and waits for their answers, in
/// one reconcile, unless `--write-budget-ms` says otherwise. Its writes carry the versions they were
/// planned from, so they are not handed on: shorter budgets make shorter reconciles and slower rollouts,
/// since every reconcile observes and plans all its nodes again.
pub const DEFAULT_WRITE_BUDGET: Duration = Duration::from_millis(500);

/// How long a reconcile starts workload writes, and waits for their answers, before it hands the rest
/// of its plan to the policy's writer, unless `--workload-write-budget-ms` says otherwise. The writer
/// keeps the write limit full while the next reconcile observes and plans, so a short budget costs the
/// rollout nothing, and a reconcile of 1000 targets on a busy 2-core API server spends 20-60 ms observing
/// and planning besides (`e2e/bench/RESULTS.md`: with 50 the budget was half of the slowest reconciles).
pub const DEFAULT_WORKLOAD_WRITE_BUDGET: Duration = Duration::from_millis(20);

impl Default for Settings {
    fn default() -> Self {
        let namespace = "crosstrace-system".to_string();
        Self {
            concurrency: 4,
            resync: Duration::from_secs(300),
            poll: Duration::from_secs(2),
            workloads: workloads::Defaults {
                sidecar_image: DEFAULT_SIDECAR_IMAGE.into(),
                sidecar_resources: default_sidecar_resources(),
                native_sidecars: true,
                operator_namespace: namespace.clone(),
                protected_namespaces: Vec::new(),
            },
            namespace,
            write_concurrency: DEFAULT_WRITE_CONCURRENCY,
            write_concurrency_max: DEFAULT_WRITE_CONCURRENCY_MAX,
            write_budget: DEFAULT_WRITE_BUDGET,
            workload_write_budget: DEFAULT_WORKLOAD_WRITE_BUDGET,
            admin_limits: None,
            canary_every: None,
            flows_receiver: None,
            gateway: gateway::Config::default(),
        }
    }
}

/// The collector image injected when neither the policy nor the operator's flags name one: the
/// Kubernetes distribution of the OpenTelemetry Collector (OTLP receiver, memory_limiter and resource
/// processors, OTLP exporters, health_check). Its release is `OTELCOL_VERSION` in `e2e/versions.env`,
/// whose build checks the sidecar configuration (`tests/collector_config.rs`); bump both together.
pub const DEFAULT_SIDECAR_IMAGE: &str = "otel/opentelemetry-collector-k8s:0.165.0";

/// Requests and limits of the sidecar when the policy sets none.
pub fn default_sidecar_resources() -> ResourceRequirements {
    let quantities = |cpu: &str, memory: &str| {
        BTreeMap::from([("cpu".to_string(), Quantity(cpu.into())), ("memory".to_string(), Quantity(memory.into()))])
    };
    ResourceRequirements {
        requests: Some(quantities("50m", "64Mi")),
        limits: Some(quantities("500m", "256Mi")),
        ..Default::default()
    }
}

/// What every reconcile shares, built once.
pub struct Context {
    pub client: Client,
    pub writer: Writer,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Every TracingPolicy, from the controller's own reflector (for ownership between policies).
    pub policies: Store<TracingPolicy>,
    pub settings: Settings,
    /// The policies' status writes (after their reconciles), and the status last handed per policy
    /// uid: the reflector's copy may not show it yet.
    pub statuses: statuses::Statuses,
    /// Failure streaks per policy uid: how long a failed reconcile waits.
    pub retries: backoff::RetryBackoff,
    /// The last collector canary per collector.
    pub canaries: crate::canary::Canaries,
    /// The workload layer's injection hashes of each policy's targets (`workloads::plan_with`).
    pub hashes: workloads::Hashes,
    /// The flows receivers' last reports (`TracesFlowing`).
    pub flow_reports: crate::flows::reporter::Reports,
    /// The watch-backed stores of workloads and namespaces (`None`: every reconcile lists them).
    pub stores: Option<Arc<crate::layers::stores::Stores>>,
    /// How many writes of each layer are in flight at once, across reconciles.
    pub write_limits: WriteLimits,
    /// The workload writes reconciles left in flight, running on; their end wakes their policy.
    pub tails: apply::Tails,
}

/// The adaptive write limits ([`limit::WriteLimit`]): one per layer that writes many objects at once,
/// each measuring its own writes (a NodeTracing write costs the API server less than a workload's).
#[derive(Debug)]
pub struct WriteLimits {
    pub workloads: Arc<limit::WriteLimit>,
    pub network: Arc<limit::WriteLimit>,
}

impl WriteLimits {
    /// Both starting at `--write-concurrency`, shown in `metrics` (`crosstrace_write_limit{layer}`).
    pub fn new(settings: &Settings, metrics: &Metrics) -> Self {
        let limit = |layer: &'static str| {
            let gauge = metrics.write_limit.get_or_create(&crate::metrics::LayerLabels { layer: layer.into() }).clone();
            let limit = limit::WriteLimit::new(settings.write_concurrency, settings.write_concurrency_max);
            Arc::new(limit.shown_in(layer, gauge))
        };
        Self { workloads: limit("workloads"), network: limit("network") }
    }
}

/// The policies a changed Deployment or DaemonSet concerns: the one whose edge label it carries, every policy
/// whose `spec.ingress` selects it, and those whose workload layer may.
fn policies_for_controller(keep: &Keep, kind: WorkloadKind, d: &ObjectMeta) -> Vec<ObjectRef<TracingPolicy>> {
    let edge = d.labels.as_ref().and_then(|l| l.get(ingress::POLICY_LABEL)).map(|p| ObjectRef::new(p));
    let selecting = keep
        .policies
        .state()
        .iter()
        .filter(|p| p.spec.ingress.as_ref().is_some_and(|i| ingress::selects(i, d)))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect::<Vec<_>>();
    let mut refs: Vec<_> = edge.into_iter().chain(selecting).collect();
    refs.extend(policies_for_workload(keep, kind, d));
    refs
}

/// The policies a changed workload concerns: the one whose label it carries (every workload a policy
/// injected carries it, so a workload that left the selection still wakes it), and every policy that
/// selects it by kind, labels and its namespace's labels ([`Keep::selecting`]). A workload whose labels
/// match a policy's selector in a namespace the policy does not select wakes nothing: a busy tenant's
/// rollouts elsewhere do not make a converged policy observe and plan all its targets again.
fn policies_for_workload(keep: &Keep, kind: WorkloadKind, w: &ObjectMeta) -> Vec<ObjectRef<TracingPolicy>> {
    let labelled = w.labels.as_ref().and_then(|l| l.get(workloads::POLICY_LABEL)).map(|p| ObjectRef::new(p));
    let selecting = keep.selecting(kind, w).into_iter().map(|p| ObjectRef::from_obj(p.as_ref()));
    labelled.into_iter().chain(selecting).collect()
}

/// Every policy `has` is true of.
fn policies_where(store: &Store<TracingPolicy>, has: fn(&TracingPolicy) -> bool) -> Vec<ObjectRef<TracingPolicy>> {
    store.state().iter().filter(|p| has(p)).map(|p| ObjectRef::from_obj(p.as_ref())).collect()
}

/// Every policy with a workload layer (a namespace's labels changed).
fn policies_with_workloads(store: &Store<TracingPolicy>) -> Vec<ObjectRef<TracingPolicy>> {
    policies_where(store, |p| p.spec.workloads.is_some())
}

/// The canary rounds: every `canary_every`, one canary to each collector the policies send to (side by
/// side); the policies of a collector whose finding turned are woken, the others are left alone (their
/// `CollectorReachable` stays as it is). Nothing without a canary interval.
fn canary_rounds(ctx: Arc<Context>) -> impl futures::Stream<Item = ObjectRef<TracingPolicy>> + Send + 'static {
    let Some(every) = ctx.settings.canary_every else { return futures::stream::empty().left_stream() };
    futures::stream::unfold(ctx, move |ctx| async move {
        tokio::time::sleep(every).await;
        let collectors: Vec<_> =
            ctx.policies.state().iter().filter_map(|p| crate::canary::collector_of(&p.spec).cloned()).collect();
        let turned = ctx.canaries.round(collectors, CANARY_TIMEOUT).await;
        let woken: Vec<_> = ctx
            .policies
            .state()
            .iter()
            .filter(|p| crate::canary::collector_of(&p.spec).is_some_and(|c| turned.contains(c)))
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect();
        Some((futures::stream::iter(woken), ctx))
    })
    .flatten()
    .right_stream()
}

/// Every policy with a network layer (a node's labels changed).
fn policies_with_network(store: &Store<TracingPolicy>) -> Vec<ObjectRef<TracingPolicy>> {
    policies_where(store, |p| p.spec.network.is_some())
}

/// Every policy with a Gateway API edge layer (a Gateway, a route or a provider's object changed).
fn policies_with_gateway(store: &Store<TracingPolicy>) -> Vec<ObjectRef<TracingPolicy>> {
    policies_where(store, |p| p.spec.gateway.is_some())
}

/// The kinds of the gateway layer this cluster serves now (none without the Gateway API).
async fn served_gateway_kinds(client: &Client) -> Vec<gateway::Kind> {
    use gateway::Kind::*;
    let kinds = [Gateway, HTTPRoute, GRPCRoute, EnvoyProxy, NginxProxy, ObservabilityPolicy, Telemetry];
    match gateway::served_of(client, &kinds).await {
        Ok(served) if served.contains(&Gateway) => served.into_iter().collect(),
        Ok(_) => {
            tracing::info!("the Gateway API is not installed: the gateway layer watches nothing");
            Vec::new()
        }
        Err(error) => {
            tracing::warn!(%error, "cannot tell whether the cluster serves the Gateway API; the gateway layer watches nothing");
            Vec::new()
        }
    }
}

/// The policies a NodeTracing concerns: those with an entry in it or a rollback marker on it.
fn policies_of_node_tracing(t: NodeTracing) -> Vec<ObjectRef<TracingPolicy>> {
    let marked: Vec<String> = t
        .annotations()
        .get(network::ROLLED_BACK_ANNOTATION)
        .and_then(|raw| serde_json::from_str::<BTreeMap<String, i64>>(raw).ok())
        .map(|m| m.into_keys().collect())
        .unwrap_or_default();
    let named = t.spec.bridges.into_iter().map(|b| b.policy).chain(marked);
    named.collect::<std::collections::BTreeSet<_>>().into_iter().map(|p| ObjectRef::new(&p)).collect()
}

/// The policy named by a label of a changed ConfigMap.
fn policy_of_config_map(cm: ConfigMap, label: &str) -> Option<ObjectRef<TracingPolicy>> {
    cm.labels().get(label).map(|p| ObjectRef::new(p))
}

/// The policies a changed ledger concerns: those it names, and `with_layer` (every policy with the
/// layer), which may wait for a target an entry held and no longer does (a newer policy behind an older
/// one that was deleted: the entry's removal is what frees the target).
fn policies_of_ledger<R: crate::layers::Owned + serde::de::DeserializeOwned>(
    ledger: &ConfigMap,
    with_layer: Vec<ObjectRef<TracingPolicy>>,
) -> Vec<ObjectRef<TracingPolicy>> {
    let mut names = crate::layers::ledger_policies::<R>(ledger);
    names.extend(with_layer.into_iter().map(|p| p.name));
    names.iter().map(|p| ObjectRef::new(p)).collect()
}

/// Which workloads a store keeps with their [`workloads::Shape`]: those carrying the workload layer's
/// marks, and those some policy's `spec.workloads` selects (by kind, labels and, once the namespace is
/// known, its namespace's labels). Of every other workload, a store keeps only an ingress controller's
/// metadata (for the edge layer), and nothing of the rest; a policy that selects one later lists it
/// (see `layers::stores`).
#[derive(Clone)]
struct Keep {
    policies: Store<TracingPolicy>,
    namespaces: Store<Meta<Namespace>>,
    defaults: workloads::Defaults,
}

impl Keep {
    fn shape_of(&self, kind: WorkloadKind, meta: &ObjectMeta) -> bool {
        workloads::carries_layer(meta) || self.policies.state().iter().any(self.selects(kind, meta))
    }

    /// The policies whose `spec.workloads` selects this workload.
    fn selecting(&self, kind: WorkloadKind, meta: &ObjectMeta) -> Vec<Arc<TracingPolicy>> {
        let mut policies = self.policies.state();
        policies.retain(self.selects(kind, meta));
        policies
    }

    /// Does a policy's `spec.workloads` select this workload (by kind, labels and, once the namespace is
    /// known, its namespace's labels: a namespace not seen yet may be selected)?
    fn selects<'a>(&'a self, kind: WorkloadKind, meta: &'a ObjectMeta) -> impl Fn(&Arc<TracingPolicy>) -> bool + 'a {
        let namespace = meta.namespace.as_deref().map(ObjectRef::new);
        let namespace = namespace.and_then(|n| self.namespaces.get(&n));
        let labels = namespace.as_ref().map(|n| n.metadata.labels.clone().unwrap_or_default());
        move |p| {
            let selection = p.spec.workloads.as_ref().map(|s| workloads::Selection::new(s, &self.defaults));
            selection.and_then(Result::ok).is_some_and(|s| match &labels {
                Some(labels) => s.selects(kind, meta, || Some(labels)),
                None => s.selects_in_any_namespace(kind, meta),
            })
        }
    }
}

/// Does a workload's store keep it? With its shape (see [`Keep`]), or an ingress controller's
/// metadata (the edge layer's label: `Stores::edge_shown`).
fn kept<K>(workload: &Pruned<K>) -> bool {
    workload.shape.is_some() || workload.metadata.labels.as_ref().is_some_and(|l| l.contains_key(ingress::POLICY_LABEL))
}

/// Takes a workload watch's event into its store, which keeps only what [`kept`] says (an object it
/// no longer keeps leaves it), and tells the stores (`stores`) of it. True if the store shows a
/// workload that appeared or was relabelled.
fn take_in<K>(
    writer: &mut reflector::store::Writer<Pruned<K>>,
    stores: Option<&Stores>,
    kind: WorkloadKind,
    event: &watcher::Event<Pruned<K>>,
) -> bool
where
    K: kube::Resource<DynamicType = ()> + 'static,
{
    let store = writer.as_reader();
    let mut relabelled = false;
    match event {
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) if kept(o) => {
            let before = store.get(&ObjectRef::from_obj(o));
            relabelled = before.is_none_or(|b| b.metadata.labels != o.metadata.labels);
            writer.apply_watcher_event(event);
            if let Some(stores) = stores {
                stores.took_in(kind, &o.metadata);
                stores.watched(kind, &o.metadata, true);
            }
        }
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
            let key = ObjectRef::from_obj(o);
            if matches!(event, watcher::Event::Apply(_)) && store.get(&key).is_some() {
                let name = ObjectMeta {
                    name: o.metadata.name.clone(),
                    namespace: o.metadata.namespace.clone(),
                    ..Default::default()
                };
                writer.apply_watcher_event(&watcher::Event::Delete(Pruned::new(name, None)));
            }
            if let Some(stores) = stores {
                stores.watched(kind, &o.metadata, false);
            }
        }
        watcher::Event::Delete(o) => {
            writer.apply_watcher_event(event);
            if let Some(stores) = stores {
                stores.gone(kind, &o.metadata);
            }
        }
        watcher::Event::Init => writer.apply_watcher_event(event),
        watcher::Event::InitDone => {
            writer.apply_watcher_event(event);
            // The relist's objects are in the store now.
            relabelled = true;
            if let Some(stores) = stores {
                stores.relisted(kind);
            }
        }
    }
    relabelled
}

/// A watch event with its object pruned for a store: by `kept` while it exists, by `gone` once deleted.
fn pruned_event<A, B>(event: watcher::Event<A>, kept: &impl Fn(A) -> B, gone: &impl Fn(A) -> B) -> watcher::Event<B> {
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(kept(o)),
        watcher::Event::InitApply(o) => watcher::Event::InitApply(kept(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(gone(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// A workload watch (whole objects, without managedFields) whose objects are pruned for a store as
/// they arrive, fed into that store, and passed on when a policy should hear of them (`triggers`).
fn workload_watch<K>(
    ctx: &Arc<Context>,
    client: &Client,
    config: &watcher::Config,
    kind: WorkloadKind,
    keep: Keep,
    workload: fn(K) -> Workload,
    store: reflector::store::Writer<Pruned<K>>,
) -> impl futures::Stream<Item = Result<Pruned<K>, watcher::Error>> + Send + 'static
where
    K: Parts<Scope = kube::core::NamespaceResourceScope> + Clone + Debug + Send + Sync + 'static,
    K::Spec: Send + Sync,
    K::Status: Send + Sync,
{
    let prune = move |lean: Lean<K>| {
        let metadata = workloads::pruned_metadata(&lean.metadata);
        let workload = workload(lean.into_inner());
        let shape = keep.shape_of(workload.kind, &metadata).then(|| workload.shape());
        Pruned::new(metadata, shape)
    };
    let gone = |lean: Lean<K>| Pruned::new(workloads::pruned_metadata(&lean.metadata), None);
    // A workload that appears or is relabelled moves the stores' label epoch once the store shows it
    // (see `Stores::relabelled`); a relist's, once it is done.
    let ctx = ctx.clone();
    let mut store = store;
    let mut relabelled = false;
    let events = watcher(Api::<Lean<K>>::all(client.clone()), config.clone())
        .map_ok(move |event| pruned_event(event, &prune, &gone))
        .inspect_ok(move |event| {
            let stores = ctx.stores.as_deref();
            relabelled |= take_in(&mut store, stores, kind, event);
            if let Some(stores) = stores
                && matches!(event, watcher::Event::Apply(_) | watcher::Event::InitDone)
                && std::mem::take(&mut relabelled)
            {
                stores.relabelled();
            }
        });
    triggers::relevant(events)
}

/// Maps a workload watch's object to the policies it concerns (`concerns`), but the policy whose own
/// write this version is (see [`not_the_writer`]).
fn concerned<K>(
    ctx: &Arc<Context>,
    keep: Keep,
    kind: WorkloadKind,
    concerns: fn(&Keep, WorkloadKind, &ObjectMeta) -> Vec<ObjectRef<TracingPolicy>>,
) -> impl Fn(Pruned<K>) -> Vec<ObjectRef<TracingPolicy>> + Send + Sync + 'static {
    let ctx = ctx.clone();
    move |w| not_the_writer(&ctx, kind, &w.metadata, concerns(&keep, kind, &w.metadata))
}

/// The policies a workload's change concerns, but the policy whose own write this version is: what it
/// wrote wakes it no more (the stores have it already; its rollout is polled).
fn not_the_writer(
    ctx: &Context,
    kind: WorkloadKind,
    meta: &ObjectMeta,
    refs: Vec<ObjectRef<TracingPolicy>>,
) -> Vec<ObjectRef<TracingPolicy>> {
    without(ctx.stores.as_ref().and_then(|s| s.written_by(kind, meta)), refs)
}

/// `refs` without the policy named `writer`.
fn without(writer: Option<String>, mut refs: Vec<ObjectRef<TracingPolicy>>) -> Vec<ObjectRef<TracingPolicy>> {
    if let Some(writer) = writer {
        refs.retain(|r| r.name != writer);
    }
    refs
}

/// The policies a changed NodeTracing concerns ([`policies_of_node_tracing`]), but the policy whose own
/// write this version is (as [`not_the_writer`]): the agent's report, a later version, wakes it. The
/// stores hear that their store took the change in (see `Stores::tracing_event`).
fn not_the_tracing_writer(ctx: &Context, t: NodeTracing) -> Vec<ObjectRef<TracingPolicy>> {
    let Some(stores) = ctx.stores.as_ref() else {
        return policies_of_node_tracing(t);
    };
    stores.tracing_event(&t.name_any());
    let writer = stores.tracing_written_by(&t.metadata);
    without(writer, policies_of_node_tracing(t))
}

/// A node watch (whole nodes, without managedFields) whose nodes are kept pruned, with their address
/// ([`Addressed`]), in the store the network layer reads; passed on when their labels or address
/// changed (status heartbeats would wake every network policy all the time).
fn node_watch(
    client: &Client,
    config: &watcher::Config,
    store: reflector::store::Writer<Addressed<Node>>,
) -> impl futures::Stream<Item = Result<Addressed<Node>, watcher::Error>> + Send + 'static {
    let prune = |node: Lean<Node>| {
        let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
        Addressed::new(workloads::pruned_metadata(&node.metadata), network::node_address(addresses))
    };
    let events = watcher(Api::<Lean<Node>>::all(client.clone()), config.clone())
        .map_ok(move |event| pruned_event(event, &prune, &prune));
    let labels_and_address = |n: &Addressed<Node>| {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut hasher = DefaultHasher::new();
        (&n.metadata.labels, &n.address).hash(&mut hasher);
        Some(hasher.finish())
    };
    events.reflect(store).touched_objects().predicate_filter(labels_and_address, Default::default())
}

/// A lenient NodeTracing watch that keeps the readable ones, pruned, in the store the network layer
/// reads: one that turns unreadable leaves the store (a list read leniently leaves it out too).
fn node_tracing_watch(
    client: &Client,
    mut store: reflector::store::Writer<NodeTracing>,
) -> impl futures::Stream<Item = Result<lenient::Seen<NodeTracing>, watcher::Error>> + Send + 'static {
    let watch = lenient::watch::<NodeTracing>(client.clone(), watcher::Config::default());
    watch.map_ok(move |seen| {
        keep_readable(&mut store, &seen);
        seen
    })
}

/// Takes one event of a lenient NodeTracing watch into the store (see [`node_tracing_watch`]).
fn keep_readable(store: &mut reflector::store::Writer<NodeTracing>, seen: &lenient::Seen<NodeTracing>) {
    use lenient::Placeholder;
    match seen {
        lenient::Seen::Event(event) => store.apply_watcher_event(&event.clone().modify(|t| {
            t.metadata = workloads::pruned_metadata(&t.metadata);
        })),
        lenient::Seen::Unreadable(u) => {
            store.apply_watcher_event(&watcher::Event::Delete(NodeTracing::placeholder(u.object.metadata.clone())))
        }
    }
}

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first. Watches use
/// `clients.watches`, everything else `clients.requests`; every write goes out only while `fence` is
/// open.
pub async fn run(
    clients: Clients,
    settings: Settings,
    metrics: Arc<Metrics>,
    fence: Fence,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let Clients { watches: client, requests } = clients;
    let writer = Writer::new(requests.clone(), metrics.clone(), fence);
    // TracingPolicies and NodeTracings are watched leniently: one that cannot be read (stored while the
    // CRD was looser) is reported on itself and skipped instead of failing every list.
    let recorder = Recorder::new(
        requests.clone(),
        Reporter { controller: "crosstrace".into(), instance: std::env::var("POD_NAME").ok() },
    );
    let (reporter, unreadable) = invalid::Reporter::new(writer.clone(), recorder.clone());
    let (policy_store, policy_writer) = reflector::store();
    let any = watcher::Config::default().any_semantic();
    let policies = lenient::typed(lenient::watch::<TracingPolicy>(client.clone(), any.clone()), unreadable.sink())
        .reflect(policy_writer)
        .applied_objects()
        .predicate_filter(triggers::policy_changed, Default::default());
    // No debounce: kube's resets with every new event, so a steady stream of events (a big rollout's
    // own writes) would hold a policy back for as long as it lasts. Events arriving while a policy is
    // reconciled are merged into one run right after it anyway.
    let controller = Controller::for_stream(policies, policy_store)
        .with_config(ControllerConfig::default().concurrency(settings.concurrency).debounce(Duration::ZERO));
    let store = controller.store();
    let (tracing_store, tracing_writer) = reflector::store();
    let node_tracings =
        lenient::typed(node_tracing_watch(&client, tracing_writer), unreadable.sink()).touched_objects();
    let namespace_store = store.clone();
    // The stores of workloads and namespaces (see `layers::stores`), fed by the watches below.
    let (namespaces, namespace_writer) = reflector::store();
    let (deployments, deployment_writer) = reflector::store();
    let (statefulsets, statefulset_writer) = reflector::store();
    let (daemonsets, daemonset_writer) = reflector::store();
    let keep = Keep { policies: store.clone(), namespaces: namespaces.clone(), defaults: settings.workloads.clone() };
    let node_store = store.clone();
    let (nodes, node_writer) = reflector::store();
    let gateway_store = store.clone();
    let (ingress_ledger_store, gateway_ledger_store) = (store.clone(), store.clone());
    let (ingress_ledger, ingress_ledger_writer) = reflector::store();
    let (gateway_ledger, gateway_ledger_writer) = reflector::store();
    let (collectors, collector_writer) = reflector::store();
    let ledger = |name: &str| {
        let api = Api::<ConfigMap>::namespaced(client.clone(), &settings.namespace);
        watcher(api, any.clone().fields(&format!("metadata.name={name}"))).default_backoff()
    };
    let ingress_ledger_watch = ledger(ingress::LEDGER).reflect(ingress_ledger_writer).touched_objects();
    let gateway_ledger_watch = ledger(gateway::LEDGER).reflect(gateway_ledger_writer).touched_objects();
    let write_limits = WriteLimits::new(&settings, &metrics);
    let (tails, tails_ended) = apply::Tails::new();
    let statuses = statuses::Statuses::new(writer.clone(), recorder.clone(), tails.waker());
    let context = Arc::new(Context {
        writer,
        recorder,
        client: requests,
        metrics,
        policies: store,
        settings,
        statuses,
        retries: backoff::RetryBackoff::default(),
        canaries: Default::default(),
        hashes: Default::default(),
        flow_reports: Default::default(),
        stores: Some(Arc::new(
            Stores::new(deployments, statefulsets, daemonsets, namespaces, nodes, tracing_store)
                .with_config_maps(ConfigMaps { ingress_ledger, gateway_ledger, collectors }),
        )),
        write_limits,
        tails,
    });
    // Workloads: whole objects (without managedFields), each pruned as it arrives and kept pruned in
    // the stores the workload layer reads (`workload_watch`, `layers::stores`). Nodes: whole objects
    // too, for their addresses, kept pruned (`node_watch`). Namespaces: a metadata-only watch (`Meta`:
    // the API server sends metadata, not whole objects), kept in a store too. Status churn is filtered
    // out of the triggers (`triggers`). Their lists are paged and read at the latest version: a list at
    // "any" version comes from the API server's cache in one piece, however big the cluster.
    let meta = watcher::Config::default().page_size(workloads::PAGE);
    // The Gateway API and its providers' kinds are watched only where the cluster serves them (a watch
    // on a resource the API server does not know fails on every retry); a kind installed later is seen
    // by the policies' periodic resync, and watched after a restart.
    let gateway_kinds = served_gateway_kinds(&context.client).await;
    // Workloads: whole objects, each pruned for its store as it arrives (`Keep`); namespaces: metadata.
    let mut controller = controller
        .watches_stream(
            workload_watch(
                &context,
                &client,
                &meta,
                WorkloadKind::Deployment,
                keep.clone(),
                Workload::from_deployment,
                deployment_writer,
            ),
            concerned(&context, keep.clone(), WorkloadKind::Deployment, policies_for_controller),
        )
        .watches_stream(
            workload_watch(
                &context,
                &client,
                &meta,
                WorkloadKind::StatefulSet,
                keep.clone(),
                Workload::from_statefulset,
                statefulset_writer,
            ),
            concerned(&context, keep.clone(), WorkloadKind::StatefulSet, policies_for_workload),
        )
        .watches_stream(
            workload_watch(
                &context,
                &client,
                &meta,
                WorkloadKind::DaemonSet,
                keep.clone(),
                Workload::from_daemonset,
                daemonset_writer,
            ),
            concerned(&context, keep.clone(), WorkloadKind::DaemonSet, policies_for_controller),
        )
        .watches_stream(
            triggers::relevant(
                watcher(Api::<Meta<Namespace>>::all(client.clone()), meta.clone())
                    .reflect(namespace_writer)
                    .inspect_ok({
                        // Every namespace change the store shows moves the label epoch (namespaces change seldom).
                        let ctx = context.clone();
                        move |event| {
                            if let (watcher::Event::Apply(_) | watcher::Event::InitDone, Some(stores)) =
                                (event, &ctx.stores)
                            {
                                stores.relabelled();
                            }
                        }
                    }),
            ),
            move |_| policies_with_workloads(&namespace_store),
        )
        .watches(Api::<ConfigMap>::all(client.clone()), any.clone().labels(ingress::POLICY_LABEL), |cm| {
            policy_of_config_map(cm, ingress::POLICY_LABEL)
        })
        // The collector ConfigMaps and the edge ledgers are kept in stores the reconciles read (see
        // `layers::stores`); a ledger's change wakes every policy it names or that has its layer.
        .watches_stream(
            watcher(Api::<ConfigMap>::all(client.clone()), any.labels(workloads::POLICY_LABEL))
                .default_backoff()
                .reflect(collector_writer)
                .touched_objects(),
            |cm| policy_of_config_map(cm, workloads::POLICY_LABEL),
        )
        .watches_stream(ingress_ledger_watch, move |cm| {
            policies_of_ledger::<ingress::Record>(
                &cm,
                policies_where(&ingress_ledger_store, |p| p.spec.ingress.is_some()),
            )
        })
        .watches_stream(gateway_ledger_watch, move |cm| {
            policies_of_ledger::<gateway::Record>(&cm, policies_with_gateway(&gateway_ledger_store))
        })
        .watches_stream(node_watch(&client, &meta, node_writer), move |_| policies_with_network(&node_store))
        .watches_stream(node_tracings, {
            let ctx = context.clone();
            move |t| not_the_tracing_writer(&ctx, t)
        });
    for kind in gateway_kinds {
        let store = gateway_store.clone();
        let resource = kind.api_resource();
        let api = Api::<PartialObjectMeta<DynamicObject>>::all_with(client.clone(), &resource);
        controller = controller.watches_stream_with(
            triggers::relevant(watcher(api, meta.clone()).default_backoff()),
            move |_| policies_with_gateway(&store),
            resource,
        );
    }
    let reconciling = controller
        .reconcile_on(futures::stream::select(canary_rounds(context.clone()), tails_ended))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile did not complete");
            }
        });
    // The reporter stops with the controller.
    tokio::select! {
        () = reconciling => {}
        () = reporter.run() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flows_receiver_is_an_address_or_a_name_with_a_port() {
        for good in ["10.96.0.20:6343", "[fd00::20]:6343", "crosstrace-flows.crosstrace-system.svc:6343", "localhost:1"]
        {
            assert_eq!(parse_flows_receiver(good).as_deref(), Ok(good));
        }
        for bad in ["10.96.0.20", "flows:0", "flows:70000", "Flows.svc:6343", "a b:1", ":6343", "fd00::20:6343x"] {
            assert!(parse_flows_receiver(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_receiver_address_is_used_as_it_is_and_a_name_is_resolved() {
        assert_eq!(resolve_flows_receiver("10.96.0.20:6343").await.unwrap().to_string(), "10.96.0.20:6343");
        assert_eq!(resolve_flows_receiver("localhost:6343").await.unwrap().port(), 6343);
        assert!(resolve_flows_receiver("does-not-exist.invalid:6343").await.is_err());
    }

    #[test]
    fn a_workload_store_keeps_what_a_policy_may_select_and_an_ingress_controllers_metadata_only() {
        use k8s_openapi::api::apps::v1::Deployment;
        use watcher::Event;
        let (store, mut writer) = reflector::store::<Pruned<Deployment>>();
        let kind = WorkloadKind::Deployment;
        let deployment = |name: &str, version: &str, labels: &[(&str, &str)], shape: bool| {
            let metadata = ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                resource_version: Some(version.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            };
            Pruned::new(metadata, shape.then(workloads::Shape::default))
        };
        let names = || {
            let mut names: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
            names.sort();
            names
        };
        assert!(!take_in(&mut writer, None, kind, &Event::Init));
        assert!(take_in(&mut writer, None, kind, &Event::InitApply(deployment("cart", "1", &[], true))), "new");
        assert!(!take_in(&mut writer, None, kind, &Event::InitApply(deployment("blog", "1", &[], false))));
        let edge = [(ingress::POLICY_LABEL, "edge")];
        take_in(&mut writer, None, kind, &Event::InitApply(deployment("nginx", "1", &edge, false)));
        assert!(take_in(&mut writer, None, kind, &Event::InitDone), "a relist is taken in");
        assert_eq!(names(), ["cart", "nginx"], "nothing of a workload no policy may select");
        assert!(store.get(&ObjectRef::new("nginx").within("shop")).is_some_and(|p| p.shape.is_none()));

        assert!(!take_in(&mut writer, None, kind, &Event::Apply(deployment("cart", "2", &[], true))), "same labels");
        assert!(take_in(&mut writer, None, kind, &Event::Apply(deployment("cart", "3", &[("app", "x")], true))));
        assert!(!take_in(&mut writer, None, kind, &Event::Apply(deployment("cart", "4", &[], false))));
        assert_eq!(names(), ["nginx"], "selected no more: it leaves the store");
        assert!(take_in(&mut writer, None, kind, &Event::Apply(deployment("blog", "2", &[], true))), "appeared");
        take_in(&mut writer, None, kind, &Event::Delete(deployment("blog", "2", &[], false)));
        assert_eq!(names(), ["nginx"]);
    }

    #[test]
    fn a_workloads_change_wakes_the_policies_that_select_it_in_its_namespace_and_the_one_that_injected_it() {
        use serde_json::json;
        let (policies, mut policy_writer) = reflector::store::<TracingPolicy>();
        let policy = |name: &str, team: &str| -> TracingPolicy {
            serde_json::from_value(json!({
                "apiVersion": "crosstrace.dev/v1alpha1", "kind": "TracingPolicy",
                "metadata": {"name": name, "uid": name},
                "spec": {"workloads": {"namespaceSelector": {"matchLabels": {"team": team}},
                    "selector": {"matchLabels": {"app.kubernetes.io/part-of": "shop"}}, "kinds": ["Deployment"]}},
            }))
            .unwrap()
        };
        for p in [policy("a", "a"), policy("b", "b")] {
            policy_writer.apply_watcher_event(&watcher::Event::Apply(p));
        }
        let (namespaces, mut namespace_writer) = reflector::store::<Meta<Namespace>>();
        for (name, team) in [("shop-a", "a"), ("shop-b", "b")] {
            let ns: Meta<Namespace> =
                serde_json::from_value(json!({"metadata": {"name": name, "labels": {"team": team}}})).unwrap();
            namespace_writer.apply_watcher_event(&watcher::Event::Apply(ns));
        }
        let keep = Keep { policies, namespaces, defaults: Settings::default().workloads };
        let woken = |namespace: &str, labels: &[(&str, &str)]| {
            let meta = ObjectMeta {
                name: Some("cart".into()),
                namespace: Some(namespace.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            };
            let mut names: Vec<String> =
                policies_for_workload(&keep, WorkloadKind::Deployment, &meta).into_iter().map(|r| r.name).collect();
            names.sort();
            names
        };
        let shop = ("app.kubernetes.io/part-of", "shop");
        assert_eq!(woken("shop-a", &[shop]), ["a"], "selected by a only: b selects other namespaces");
        assert_eq!(woken("shop-b", &[shop]), ["b"]);
        assert!(woken("shop-a", &[("app.kubernetes.io/part-of", "blog")]).is_empty(), "selected by nobody");
        assert_eq!(woken("shop-b", &[(workloads::POLICY_LABEL, "a")]), ["a"], "injected by a, out of its selection");
        assert_eq!(woken("new", &[shop]), ["a", "b"], "a namespace not seen yet may be selected by either");
        assert!(
            policies_for_workload(&keep, WorkloadKind::StatefulSet, &ObjectMeta::default()).is_empty(),
            "a kind no policy selects"
        );
    }

    #[test]
    fn a_node_tracing_that_turns_unreadable_leaves_the_store_and_a_readable_one_is_kept_pruned() {
        use kube::api::DynamicObject;
        let (store, mut writer) = reflector::store::<NodeTracing>();
        let raw = |bridges: serde_json::Value| -> DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "crosstrace.dev/v1alpha1",
                "kind": "NodeTracing",
                "metadata": {"name": "n0", "resourceVersion": "1", "annotations": {"kubectl": "x"},
                    "managedFields": [{"manager": "crosstrace", "operation": "Apply"}]},
                "spec": {"nodeName": "n0", "bridges": bridges},
            }))
            .unwrap()
        };
        let seen = |o| lenient::seen::<NodeTracing>(watcher::Event::Apply(o));
        keep_readable(&mut writer, &seen(raw(serde_json::json!([]))));
        let kept = store.get(&ObjectRef::new("n0")).expect("readable: kept");
        assert_eq!((kept.metadata.managed_fields.as_ref(), kept.metadata.annotations.as_ref()), (None, None));
        keep_readable(&mut writer, &seen(raw(serde_json::json!([{"bridge": "br-int"}]))));
        assert!(store.get(&ObjectRef::new("n0")).is_none(), "unreadable now: left out, as a lenient list leaves it");
    }

    #[tokio::test]
    async fn a_receiver_that_stops_resolving_keeps_its_last_address() {
        let receiver = FlowsReceiver::new("does-not-exist.invalid:6343");
        assert!(receiver.address().await.is_err());
        let known: std::net::SocketAddr = "10.96.0.20:6343".parse().unwrap();
        *receiver.last.lock().unwrap() = Some(known);
        assert_eq!(receiver.address().await, Ok(known));
    }
}
