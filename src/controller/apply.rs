//! Apply: every write the controller makes goes through [`Writer`], which uses the `crosstrace` field
//! manager, counts the write in the metrics (so "a converged policy makes zero writes" is checkable),
//! and sends it only while this replica's leader [`Fence`] is open (so a replica that may have lost
//! the lease, e.g. one resumed after being stopped, writes nothing).

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, ObjectReference};
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::limit::{Answer, WriteLimit};
use crate::api::{FIELD_MANAGER, NodeTracing, TracingPolicy, WorkloadKind};
use crate::layers::ingress::{self, CONFIG_ANNOTATION, LEDGER, LEDGER_LABEL, POLICY_LABEL, ROLLED_BACK_ANNOTATION};
use crate::layers::{ObjectKey, gateway, network, workloads};
use crate::leader::{Fence, Fenced};
use crate::lean::Lean;
use crate::metrics::Metrics;

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Not sent: this replica may no longer hold the leader lease.
    #[error("{verb} of {resource} not sent: {source}")]
    Fenced {
        verb: &'static str,
        resource: String,
        #[source]
        source: Fenced,
    },
}

/// How long the API server asked to wait before trying again: the `retryAfterSeconds` of its
/// `Status` (a 429 from the storage layer or an eviction carries it; APF's 429s carry only the header,
/// which kube's own retry honours).
pub fn retry_after(error: &kube::Error) -> Option<Duration> {
    match error {
        kube::Error::Api(status) => {
            let seconds = status.details.as_ref().map_or(0, |d| d.retry_after_seconds);
            (seconds > 0).then(|| Duration::from_secs(u64::from(seconds)))
        }
        _ => None,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Writes to the API server, counted, behind the leader fence.
///
/// The client should not retry by itself beyond what the fence allows: [`Fence::guard`] abandons a
/// write (and kube's retries of it after a 429 `Retry-After`, 503 or 504) the moment the fence closes.
#[derive(Clone)]
pub struct Writer {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub fence: Fence,
}

impl Writer {
    pub fn new(client: Client, metrics: Arc<Metrics>, fence: Fence) -> Self {
        Self { client, metrics, fence }
    }

    /// Sends `request` (a `verb` on `resource`) if, and while, the fence is open; counts and logs it.
    /// The typed methods below use it; a request they do not cover (e.g. on a `DynamicObject`) too.
    pub async fn send<T>(
        &self,
        verb: &'static str,
        resource: &str,
        request: impl Future<Output = kube::Result<T>>,
    ) -> Result<T> {
        let fenced = |source| Error::Fenced { verb, resource: resource.to_string(), source };
        self.fence.check().map_err(fenced)?;
        self.metrics.write(verb, resource);
        Ok(self.fence.guard(request).await.map_err(fenced)??)
    }

    /// Server-side apply, forcing ownership of exactly the fields in `patch`.
    pub async fn apply<K>(&self, api: &Api<K>, name: &str, patch: Value) -> Result<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.send("apply", &K::plural(&()), api.patch(name, &params, &Patch::Apply(&patch))).await
    }

    /// Server-side apply to the status subresource.
    pub async fn apply_status<K>(&self, api: &Api<K>, name: &str, patch: Value) -> Result<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.send("apply_status", &K::plural(&()), api.patch_status(name, &params, &Patch::Apply(&patch))).await
    }

    /// JSON merge patch (RFC 7386): `null` removes a key.
    pub async fn merge<K>(&self, api: &Api<K>, name: &str, patch: Value) -> Result<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        self.send("patch", &K::plural(&()), api.patch(name, &params, &Patch::Merge(&patch))).await
    }

    /// Strategic merge patch (lists merged by their key, e.g. containers by name).
    pub async fn strategic<K>(&self, api: &Api<K>, name: &str, patch: Value) -> Result<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        self.send("patch", &K::plural(&()), api.patch(name, &params, &Patch::Strategic(&patch))).await
    }

    /// Deletes; an object already gone is fine.
    pub async fn delete<K>(&self, api: &Api<K>, name: &str) -> Result<()>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        self.delete_with(api, name, DeleteParams::default()).await
    }

    /// Deletes the object only while it still has `resource_version` (when given); gone is fine.
    pub async fn delete_at_version<K>(&self, api: &Api<K>, name: &str, resource_version: Option<String>) -> Result<()>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let preconditions = Preconditions { resource_version, uid: None };
        self.delete_with(api, name, DeleteParams { preconditions: Some(preconditions), ..Default::default() }).await
    }

    async fn delete_with<K>(&self, api: &Api<K>, name: &str, params: DeleteParams) -> Result<()>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        match self.send("delete", &K::plural(&()), api.delete(name, &params)).await {
            Ok(_) => Ok(()),
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Publishes an Event about `regarding` through `recorder` (which should use this writer's client).
    pub async fn event(&self, recorder: &Recorder, event: &Event, regarding: &ObjectReference) -> Result<()> {
        self.send("create", "events", recorder.publish(event, regarding)).await
    }
}

fn policy_of_marker(marker: &Option<String>) -> Option<String> {
    marker.as_ref().and_then(|m| m.split_once('/')).map(|(policy, _)| policy.to_string())
}

fn record_json(record: &ingress::Record) -> String {
    serde_json::to_string(record).expect("a record always serializes")
}

/// Runs the edge layer's actions in order; the first failure stops the rest (the next reconcile
/// picks up from what is observed then). Records go to the ledger in `operator_namespace`.
pub async fn ingress(writer: &Writer, actions: &[ingress::Action], operator_namespace: &str) -> Result<()> {
    let ledger = Api::<ConfigMap>::namespaced(writer.client.clone(), operator_namespace);
    for action in actions {
        ingress_action(writer, &ledger, action).await?;
    }
    Ok(())
}

/// Writes (`Some`) or removes (`None`) the ledger entry of the Deployment with this UID, in one write:
/// entries of other Deployments are left alone (a merge patch per key), and a missing ledger is created
/// with the entry in it (it is read first, so that every write makes progress: a controller stopped after
/// any write never repeats one that failed).
async fn ledger_entry(
    writer: &Writer,
    ledger: &Api<ConfigMap>,
    uid: &str,
    record: Option<&ingress::Record>,
) -> Result<()> {
    write_ledger(writer, ledger, (LEDGER, LEDGER_LABEL), uid, record.map(record_json)).await
}

/// Writes (`Some`) or removes (`None`) one entry of the ledger ConfigMap `name` (labelled `label`): see
/// [`ledger_entry`].
async fn write_ledger(
    writer: &Writer,
    ledger: &Api<ConfigMap>,
    (name, label): (&str, &str),
    uid: &str,
    value: Option<String>,
) -> Result<()> {
    if ledger.get_opt(name).await?.is_some() {
        return writer.merge(ledger, name, json!({"data": {uid: value}})).await.map(drop);
    }
    let Some(value) = value else {
        return Ok(());
    };
    let created: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {label: "true"}},
        "data": {uid: value},
    }))
    .expect("a ConfigMap");
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match writer.send("create", "configmaps", ledger.create(&params, &created)).await {
        // Another policy created it meanwhile: add the entry to it.
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => {
            writer.merge(ledger, name, json!({"data": {uid: value}})).await.map(drop)
        }
        other => other.map(drop),
    }
}

/// Runs the gateway layer's actions in order; the first failure stops the rest (the next reconcile
/// picks up from what is observed then). Records go to the ledger in `operator_namespace`.
pub async fn gateway(writer: &Writer, actions: &[gateway::Action], operator_namespace: &str) -> Result<()> {
    let ledger = Api::<ConfigMap>::namespaced(writer.client.clone(), operator_namespace);
    for action in actions {
        gateway_action(writer, &ledger, action).await?;
    }
    Ok(())
}

async fn gateway_action(writer: &Writer, ledger: &Api<ConfigMap>, action: &gateway::Action) -> Result<()> {
    let api = |target: &gateway::Ref| {
        Api::<DynamicObject>::namespaced_with(writer.client.clone(), &target.namespace, &target.kind.api_resource())
    };
    match action {
        gateway::Action::Record { uid, record } => {
            let value = record.as_ref().map(|r| serde_json::to_string(r).expect("a record always serializes"));
            write_ledger(writer, ledger, (gateway::LEDGER, gateway::LEDGER_LABEL), uid, value).await
        }
        gateway::Action::Apply { target, body } => {
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let api = api(target);
            writer
                .send("apply", target.kind.plural(), api.patch(&target.name, &params, &Patch::Apply(body)))
                .await
                .map(drop)
        }
        gateway::Action::Patch { target, patch, resource_version } => {
            let mut patch = patch.clone();
            if let Some(rv) = resource_version {
                patch["metadata"] = json!({"resourceVersion": rv});
            }
            let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            let api = api(target);
            writer
                .send("patch", target.kind.plural(), api.patch(&target.name, &params, &Patch::Merge(&patch)))
                .await
                .map(drop)
        }
        gateway::Action::Delete { target } => {
            let api = api(target);
            match writer.send("delete", target.kind.plural(), api.delete(&target.name, &DeleteParams::default())).await
            {
                Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(()),
                other => other.map(drop),
            }
        }
    }
}

/// A kind of ingress controller workload, for the writes of the edge layer.
trait ControllerObject:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Debug
{
    fn containers(&self) -> &[Container];
}

impl ControllerObject for Deployment {
    fn containers(&self) -> &[Container] {
        self.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map_or(&[], |p| p.containers.as_slice())
    }
}

impl ControllerObject for DaemonSet {
    fn containers(&self) -> &[Container] {
        self.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map_or(&[], |p| p.containers.as_slice())
    }
}

/// Labels an ingress controller with the policy that changes it (and clears a rollback marker).
async fn label<K: ControllerObject>(writer: &Writer, controller: &ObjectKey, policy: &str) -> Result<()> {
    let api = Api::<K>::namespaced(writer.client.clone(), &controller.namespace);
    let patch = json!({"metadata": {"annotations": {ROLLED_BACK_ANNOTATION: null}, "labels": {POLICY_LABEL: policy}}});
    writer.merge(&api, &controller.name, patch).await.map(drop)
}

/// Puts an ingress controller back: its label (`label`: the one that stays), rollback marker and, if
/// given, the recorded image. Already so (a revert that stopped halfway goes on), or gone: no write.
async fn restore_controller<K: ControllerObject>(
    writer: &Writer,
    controller: &ObjectKey,
    image: Option<&ingress::ContainerImage>,
    label: Option<&String>,
    rolled_back: Option<&String>,
) -> Result<()> {
    let api = Api::<K>::namespaced(writer.client.clone(), &controller.namespace);
    let current = api.get_opt(&controller.name).await?;
    let restored = current.as_ref().is_none_or(|d| {
        let meta = d.meta();
        meta.labels.as_ref().and_then(|l| l.get(POLICY_LABEL)) == label
            && meta.annotations.as_ref().and_then(|a| a.get(ROLLED_BACK_ANNOTATION)) == rolled_back
            && image.is_none_or(|i| {
                d.containers().iter().any(|c| c.name == i.container && c.image.as_deref() == Some(&i.image))
            })
    });
    if !restored {
        let mut annotations = Map::new();
        annotations.insert(ROLLED_BACK_ANNOTATION.into(), rolled_back.cloned().into());
        let mut patch = json!({"metadata": {"annotations": annotations, "labels": {POLICY_LABEL: label}}});
        if let Some(image) = image {
            patch["spec"] =
                json!({"template": {"spec": {"containers": [{"name": image.container, "image": image.image}]}}});
        }
        writer.strategic(&api, &controller.name, patch).await?;
    }
    Ok(())
}

async fn ingress_action(writer: &Writer, ledger: &Api<ConfigMap>, action: &ingress::Action) -> Result<()> {
    use ingress::Action::*;
    let client = &writer.client;
    match action {
        Record { uid, record, .. } => ledger_entry(writer, ledger, uid, Some(record)).await?,
        Label { kind: WorkloadKind::DaemonSet, controller, policy } => {
            label::<DaemonSet>(writer, controller, policy).await?
        }
        Label { controller, policy, .. } => label::<Deployment>(writer, controller, policy).await?,
        ApplyConfig { config_map, data, policy } => {
            let api = Api::<ConfigMap>::namespaced(client.clone(), &config_map.namespace);
            let patch = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": config_map.name,
                    "namespace": config_map.namespace,
                    "labels": {POLICY_LABEL: policy},
                    "annotations": {CONFIG_ANNOTATION: ingress::config_hash(data)},
                },
                "data": data,
            });
            writer.apply(&api, &config_map.name, patch).await?;
        }
        ApplyImage { kind, controller, uid, image, record } => {
            ledger_entry(writer, ledger, uid, Some(record)).await?;
            let patch = json!({
                "apiVersion": "apps/v1",
                "kind": format!("{kind:?}"),
                "metadata": {"name": controller.name, "namespace": controller.namespace},
                "spec": {"template": {"spec": {"containers": [{"name": image.container, "image": image.image}]}}},
            });
            apply_workload(writer, *kind, controller, patch).await?;
        }
        RestoreConfig { config_map, data, delete } => {
            let api = Api::<ConfigMap>::namespaced(client.clone(), &config_map.namespace);
            let Some(current) = api.get_opt(&config_map.name).await? else {
                return Ok(());
            };
            let others = current.data.iter().flatten().any(|(k, _)| !data.contains_key(k));
            let restored = data.iter().all(|(k, v)| current.data.as_ref().and_then(|d| d.get(k)) == v.as_ref())
                && !current.metadata.labels.as_ref().is_some_and(|l| l.contains_key(POLICY_LABEL))
                && !current.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(CONFIG_ANNOTATION));
            if restored && !*delete {
                // Already as recorded (a revert that stopped halfway is going on): no write.
                return Ok(());
            }
            if *delete && !others {
                writer.delete(&api, &config_map.name).await?;
            } else {
                let patch = json!({
                    "metadata": {"labels": {POLICY_LABEL: null}, "annotations": {CONFIG_ANNOTATION: null}},
                    "data": data,
                });
                writer.merge(&api, &config_map.name, patch).await?;
            }
        }
        RestoreController { kind, controller, uid, image, keep, rolled_back } => {
            // A rolled-back controller stays labelled so that delete finds it and clears the marker.
            let label = keep.as_ref().map(|r| r.policy.clone()).or_else(|| policy_of_marker(rolled_back));
            let (image, label, rolled_back) = (image.as_ref(), label.as_ref(), rolled_back.as_ref());
            match kind {
                WorkloadKind::DaemonSet => {
                    restore_controller::<DaemonSet>(writer, controller, image, label, rolled_back).await?
                }
                _ => restore_controller::<Deployment>(writer, controller, image, label, rolled_back).await?,
            }
            // The record goes last: a revert that stops halfway still knows what to restore.
            ledger_entry(writer, ledger, uid, keep.as_ref()).await?;
        }
    }
    Ok(())
}

/// Server-side apply to a workload of any supported kind.
async fn apply_workload(
    writer: &Writer,
    kind: WorkloadKind,
    key: &ObjectKey,
    patch: Value,
) -> Result<workloads::Workload> {
    let client = writer.client.clone();
    let ns = &key.namespace;
    Ok(match kind {
        WorkloadKind::Deployment => workloads::Workload::from_deployment(
            writer.apply(&Api::<Lean<Deployment>>::namespaced(client, ns), &key.name, patch).await?.into_inner(),
        ),
        WorkloadKind::StatefulSet => workloads::Workload::from_statefulset(
            writer.apply(&Api::<Lean<StatefulSet>>::namespaced(client, ns), &key.name, patch).await?.into_inner(),
        ),
        WorkloadKind::DaemonSet => workloads::Workload::from_daemonset(
            writer.apply(&Api::<Lean<DaemonSet>>::namespaced(client, ns), &key.name, patch).await?.into_inner(),
        ),
    })
}

/// A workload write told to the notes as it starts; told as it ends by [`Noted::ended`], or, if it
/// never gets there (its future dropped), as ended without a result.
struct Noted<N: WriteNotes> {
    notes: N,
    kind: WorkloadKind,
    key: ObjectKey,
    ended: bool,
}

impl<N: WriteNotes> Noted<N> {
    fn start(notes: N, kind: WorkloadKind, key: &ObjectKey) -> Self {
        notes.writing(kind, key);
        Self { notes, kind, key: key.clone(), ended: false }
    }

    fn ended(mut self, left: Option<&workloads::Workload>) {
        self.ended = true;
        self.notes.written(self.kind, &self.key, left);
    }
}

impl<N: WriteNotes> Drop for Noted<N> {
    fn drop(&mut self) {
        if !self.ended {
            self.notes.written(self.kind, &self.key, None);
        }
    }
}

/// [`apply_workload`], told to `noted` as it ends.
async fn noted_apply<N: WriteNotes>(
    writer: &Writer,
    noted: Noted<N>,
    kind: WorkloadKind,
    key: &ObjectKey,
    patch: Value,
) -> Result<()> {
    let started = Instant::now();
    let result = apply_workload(writer, kind, key, patch).await;
    // Each answer's moment (the line's timestamp) and round trip, at debug level: what lies between a
    // reconcile's first write and its target's change being seen elsewhere (`just bench`'s first write).
    tracing::debug!(
        kind = ?kind,
        workload = %key,
        took_us = super::parts::micros(started.elapsed()),
        ok = result.is_ok(),
        "workload written"
    );
    noted.ended(result.as_ref().ok());
    result.map(drop)
}

/// How the writes of one layer in one reconcile are paced: how many are in flight at once (a limit
/// shared by every reconcile, [`WriteLimit`]), and for how long after the first one new ones may start
/// (a bigger batch stops there and the next reconcile goes on, so that status and spec changes are
/// looked at again within about that long, however many targets a batch has). The first write starts
/// however long it waits for a place, so that every reconcile makes progress, unless the caller's own
/// writes in flight make it ([`Pace::behind_own_writes`]).
#[derive(Clone, Debug)]
pub struct Pace {
    pub limit: Arc<WriteLimit>,
    /// None: no end (a policy's writer).
    pub budget: Option<Duration>,
    /// The first write waits for a place past the budget.
    pub first_waits: bool,
}

impl Pace {
    /// At most `concurrency` in flight, always.
    pub fn new(concurrency: usize, budget: Duration) -> Self {
        Self { limit: Arc::new(WriteLimit::fixed(concurrency)), budget: Some(budget), first_waits: true }
    }

    /// Within `limit`, shared with other reconciles.
    pub fn within(limit: &Arc<WriteLimit>, budget: Duration) -> Self {
        Self { limit: Arc::clone(limit), budget: Some(budget), first_waits: true }
    }

    /// For a caller whose earlier writes are still in flight (they are its progress): no write starts
    /// after the budget, the first one neither (a reconcile does not wait past its budget for a place
    /// its own writes hold).
    pub fn behind_own_writes(self) -> Self {
        Self { first_waits: false, ..self }
    }
}

/// What is told of each workload or NodeTracing write: it starts, and it ended (with the object it
/// left, if it was made).
pub trait WriteNotes: Sync {
    fn writing(&self, _kind: WorkloadKind, _key: &ObjectKey) {}
    fn written(&self, _kind: WorkloadKind, _key: &ObjectKey, _left: Option<&workloads::Workload>) {}
    fn writing_node(&self, _node: &str) {}
    /// `left`: `None` when nothing was written, `Some(None)` when the NodeTracing was deleted.
    fn written_node(&self, _node: &str, _left: Option<Option<&NodeTracing>>) {}
}

/// Nothing is told.
impl WriteNotes for () {}

/// Told when there is someone to tell.
impl<T: WriteNotes> WriteNotes for Option<T> {
    fn writing(&self, kind: WorkloadKind, key: &ObjectKey) {
        if let Some(notes) = self {
            notes.writing(kind, key);
        }
    }

    fn written(&self, kind: WorkloadKind, key: &ObjectKey, left: Option<&workloads::Workload>) {
        if let Some(notes) = self {
            notes.written(kind, key, left);
        }
    }

    fn writing_node(&self, node: &str) {
        if let Some(notes) = self {
            notes.writing_node(node);
        }
    }

    fn written_node(&self, node: &str, left: Option<Option<&NodeTracing>>) {
        if let Some(notes) = self {
            notes.written_node(node, left);
        }
    }
}

/// How many of the actions were written, in plan order: when a reconcile's budget ran out, the plan's
/// prefix `..done` was written and the rest is left to the next reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub done: usize,
    pub of: usize,
}

impl Written {
    pub fn complete(&self) -> bool {
        self.done == self.of
    }
}

/// Writes started and not answered yet.
type InFlight<'f> = FuturesUnordered<futures::future::BoxFuture<'f, Result<()>>>;

/// What a reconcile handed on (see [`workloads`]): the policy's writer, going on with the rest of its
/// plan after it returned, each write told to the limit and to the stores as it ends; the first
/// failure among them is the tail's.
pub type Tail = futures::future::BoxFuture<'static, Result<()>>;

/// A target of the workload layer's writes: a workload, or (no kind) a collector ConfigMap.
pub type Target = (Option<WorkloadKind>, ObjectKey);

/// The workload writes of one policy: whose turn it is to start them, and which targets they touched
/// (a write started, or answered) in what order.
#[derive(Debug, Default)]
struct Log {
    seq: u64,
    turn: u64,
    touched: HashMap<Target, u64>,
    /// Writers of the policy with writes still to start (not only answers to wait for).
    starting: usize,
}

/// A writer with writes still to start, counted in its policy's [`Log`] until dropped.
struct Starting(Arc<std::sync::Mutex<Log>>);

impl Starting {
    fn new(turn: &Turn) -> Self {
        turn.lock().starting += 1;
        Self(Arc::clone(&turn.log))
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).starting -= 1;
    }
}

/// Where a reconcile began in its policy's [`Log`] (taken before it observes anything).
#[derive(Clone, Copy, Debug)]
pub struct Mark(u64);

/// The right to start a policy's workload writes, given by [`Tails::take_over`] until the policy's
/// next reconcile takes it over: a writer still going on with an earlier plan then starts nothing more.
#[derive(Clone, Debug)]
pub struct Turn {
    log: Arc<std::sync::Mutex<Log>>,
    turn: u64,
}

impl Turn {
    /// A turn nobody takes over (writes outside a controller, and tests).
    pub fn alone() -> Self {
        Self { log: Arc::default(), turn: 0 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `start` (which tells the stores the write starts) and records `target` touched, if the turn
    /// is still this one's: in one step, so that a reconcile taking the turn over sees either the
    /// write in the stores, or its target touched.
    fn start<T>(&self, target: &Target, start: impl FnOnce() -> T) -> Option<T> {
        let mut log = self.lock();
        if log.turn != self.turn {
            return None;
        }
        log.seq += 1;
        let seq = log.seq;
        log.touched.insert(target.clone(), seq);
        Some(start())
    }

    /// The write to `target` was answered (the stores took in what it left before this is told).
    fn ended(&self, target: Target) {
        let mut log = self.lock();
        log.seq += 1;
        let seq = log.seq;
        log.touched.insert(target, seq);
    }
}

/// The writers the policies' reconciles handed their plans to, running on: when one ends, its policy
/// is woken (its writes' watch events are taken for crosstrace's own echoes and wake nothing), and its
/// first failure is kept for the policy's next reconcile, which fails with it (and is retried after
/// the backoff, as if the write had failed in it). A reconcile takes the turn over from its policy's
/// writer once it has planned ([`Tails::take_over`]): the writer starts nothing more, and the targets
/// it touched while the reconcile observed and planned are not written by the reconcile.
#[derive(Debug, Clone)]
pub struct Tails {
    wake: futures::channel::mpsc::UnboundedSender<kube::runtime::reflector::ObjectRef<TracingPolicy>>,
    /// Per policy uid: how many tails run, the first failure not yet taken, the writes' log.
    policies: Arc<std::sync::Mutex<HashMap<String, Policy>>>,
}

#[derive(Debug, Default)]
struct Policy {
    running: usize,
    failed: Option<Error>,
    log: Arc<std::sync::Mutex<Log>>,
    /// Forgotten while writes ran: dropped when the last ends.
    gone: bool,
    /// When a reconcile last took the turn over (it had planned), for which generation of the policy,
    /// and how long its observe and plan took.
    planned_at: Option<Instant>,
    planned_generation: Option<i64>,
    plan_took: Duration,
}

/// The policies whose tails ended, to reconcile.
pub type Wakes = futures::channel::mpsc::UnboundedReceiver<kube::runtime::reflector::ObjectRef<TracingPolicy>>;

impl Default for Tails {
    /// Tails whose ends wake nobody (a context without a controller).
    fn default() -> Self {
        Self::new().0
    }
}

impl Tails {
    pub fn new() -> (Self, Wakes) {
        let (wake, wakes) = futures::channel::mpsc::unbounded();
        (Self { wake, policies: Arc::default() }, wakes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Policy>> {
        self.policies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What wakes a policy (the controller's trigger stream these tails feed).
    pub fn waker(&self) -> futures::channel::mpsc::UnboundedSender<kube::runtime::reflector::ObjectRef<TracingPolicy>> {
        self.wake.clone()
    }

    /// Lets `tail` of `policy` run on; the policy is woken when it ends.
    pub fn keep(&self, policy: &TracingPolicy, tail: Tail) {
        let uid = policy.uid().unwrap_or_default();
        let woken = kube::runtime::reflector::ObjectRef::from_obj(policy);
        self.lock().entry(uid.clone()).or_default().running += 1;
        let tails = self.clone();
        tokio::spawn(async move {
            let result = tail.await;
            {
                let mut policies = tails.lock();
                let entry = policies.entry(uid.clone()).or_default();
                entry.running -= 1;
                if let Err(error) = result {
                    entry.failed.get_or_insert(error);
                }
                if entry.gone && entry.running == 0 {
                    policies.remove(&uid);
                }
            }
            // Sent whether or not a reconcile is running (kube runs the policy again after it).
            let _ = tails.wake.unbounded_send(woken);
        });
    }

    /// The first failure among the policy's tails since the last call; it is taken.
    pub fn failure(&self, uid: &str) -> Option<Error> {
        self.lock().get_mut(uid)?.failed.take()
    }

    /// Are writes of the policy's reconciles still in flight (or still to start, by its writer)?
    pub fn running(&self, uid: &str) -> bool {
        self.lock().get(uid).is_some_and(|p| p.running > 0)
    }

    /// Where a reconcile of the policy begins: taken before it observes anything.
    pub fn mark(&self, uid: &str) -> Mark {
        let log = Arc::clone(&self.lock().entry(uid.to_string()).or_default().log);
        Mark(log.lock().unwrap_or_else(|e| e.into_inner()).seq)
    }

    /// The turn to write the policy's workload layer, taken over from its writer (which starts nothing
    /// more), and the targets touched since `mark`: what the reconcile observed of those may be stale
    /// (a write of the writer's started or was answered meanwhile), so it writes none of them; the
    /// writer's end wakes the policy, and they are looked at again then. `generation` is the policy's
    /// the reconcile planned from, `took` how long it observed and planned ([`Tails::replan_in`]).
    pub fn take_over(
        &self,
        uid: &str,
        mark: Mark,
        generation: i64,
        took: Duration,
    ) -> (Turn, std::collections::HashSet<Target>) {
        let log = {
            let mut policies = self.lock();
            let policy = policies.entry(uid.to_string()).or_default();
            policy.planned_at = Some(Instant::now());
            policy.planned_generation = Some(generation);
            policy.plan_took = took;
            Arc::clone(&policy.log)
        };
        let mut held = log.lock().unwrap_or_else(|e| e.into_inner());
        held.turn += 1;
        held.touched.retain(|_, seq| *seq > mark.0);
        let touched = held.touched.keys().cloned().collect();
        let turn = held.turn;
        drop(held);
        (Turn { log, turn }, touched)
    }

    /// How long until the policy (at `generation`) is planned again, if its writes go on and it was
    /// planned recently: while they go on, every watch event of its targets' owners (and every end of a
    /// writer) would plan all its targets again. Their progress needs no plan; an owner's change is
    /// looked at within `every` while its writer has writes left to start, and within ten plans' time
    /// (at most `every`) while only answers are waited for: a small policy's next step is not held
    /// back by a big one's bound. A change of the policy itself is planned at once (its take-over stops
    /// the writer's older plan).
    pub fn replan_in(&self, uid: &str, generation: i64, every: Duration) -> Option<Duration> {
        let policies = self.lock();
        let policy = policies.get(uid).filter(|p| p.running > 0)?;
        if policy.planned_generation != Some(generation) {
            return None;
        }
        let starting = policy.log.lock().unwrap_or_else(|e| e.into_inner()).starting > 0;
        let every = if starting { every } else { every.min(policy.plan_took * REPLAN_PLANS) };
        let since = policy.planned_at?.elapsed();
        every.checked_sub(since).filter(|wait| !wait.is_zero())
    }

    /// Stops the policy's writer, if one runs (its writes in flight run on): a reconcile that failed
    /// before it took the turn over leaves no writer going on with an older plan.
    pub fn stop(&self, uid: &str) {
        if let Some(policy) = self.lock().get(uid) {
            policy.log.lock().unwrap_or_else(|e| e.into_inner()).turn += 1;
        }
    }

    /// The policy is gone (its finalizer removed): what was kept of it is dropped.
    pub fn forget(&self, uid: &str) {
        let mut policies = self.lock();
        match policies.get_mut(uid) {
            Some(policy) if policy.running > 0 => policy.gone = true,
            Some(_) => drop(policies.remove(uid)),
            None => {}
        }
    }
}

/// While only answers are waited for, a policy is planned again after at most this many times its last
/// observe and plan took ([`Tails::replan_in`]): planning then takes at most about a tenth of the time.
const REPLAN_PLANS: u32 = 10;

/// Runs `actions[from..]` in plan order, one phase after the other (`phase` of consecutive actions), the
/// actions of a phase started while `pace.limit` has room, after the writes already `in_flight` (of
/// the phase of `actions[from]`). No action but the first starts once `pace.budget` has passed (a
/// later phase never starts while an earlier one is unfinished), nor once `write` gives nothing (its
/// turn is over); the first failure stops the rest, and comes back with the writes still in flight
/// ([`Stopped`]: the caller chooses whether to wait for their answers). Each write's answer is told to
/// the limit.
///
/// When no more may start, the writes in flight are waited for, unless `hand_off`: they are returned
/// unanswered then, and the caller lets them finish while it goes on (a policy's writer with the rest),
/// so that no reconcile waits for the API server's answers past its budget.
async fn paced<'a, 'f, A, F, Fut>(
    actions: &'a [A],
    (from, mut in_flight): (usize, InFlight<'f>),
    pace: &Pace,
    hand_off: bool,
    phase: impl Fn(&A) -> u8,
    write: F,
) -> std::result::Result<(Written, InFlight<'f>), Stopped<'f>>
where
    F: Fn(&'a A) -> Option<Fut>,
    Fut: Future<Output = Result<()>> + Send + 'f,
{
    let of = actions.len();
    let until = pace.budget.map(|budget| Instant::now() + budget);
    let mut stopped = false;
    let open = |next: usize, stopped: bool| {
        !stopped && ((next == 0 && pace.first_waits) || until.is_none_or(|until| Instant::now() < until))
    };
    // Wakes a wait for a place or an answer when the budget ends (the writes are handed off then).
    let deadline = tokio::time::sleep_until(until.unwrap_or_else(Instant::now).into());
    tokio::pin!(deadline);
    let timed = until.is_some();
    let limit = &pace.limit;
    let mut done = from;
    while done < of && open(done, stopped) {
        let current = phase(&actions[done]);
        let end = actions[done..].iter().position(|a| phase(a) != current).map_or(of, |n| done + n);
        let mut next = done;
        loop {
            // Listening before asking for room: a write that ends in between still wakes this.
            let room = limit.room();
            tokio::pin!(room);
            room.as_mut().enable();
            while next < end && open(next, stopped) {
                let Some(permit) = limit.try_start() else { break };
                let Some(written) = write(&actions[next]) else {
                    stopped = true;
                    break;
                };
                in_flight.push(Box::pin(async move {
                    let result = written.await;
                    permit.finish(Answer::of(&result));
                    result
                }));
                next += 1;
            }
            let more = next < end && open(next, stopped);
            // No more may start: what is in flight runs on, the rest is the caller's. (While the budget
            // lasts, the answers are waited for: a reconcile answered within it leaves nothing running.)
            if hand_off && !open(next, stopped) && !in_flight.is_empty() {
                return Ok((Written { done: next, of }, in_flight));
            }
            if in_flight.is_empty() {
                if !more {
                    break;
                }
                tokio::select! {
                    () = &mut room => {}
                    () = &mut deadline, if timed && !deadline.is_elapsed() => {}
                }
                continue;
            }
            tokio::select! {
                Some(result) = in_flight.next() => {
                    if let Err(error) = result {
                        return Err(Stopped { error, in_flight });
                    }
                }
                () = &mut room, if more => {}
                () = &mut deadline, if timed && (more || hand_off) && !deadline.is_elapsed() => {}
            }
        }
        done = next;
        if done < end {
            break;
        }
    }
    Ok((Written { done, of }, in_flight))
}

/// The first failure of [`paced`], and the writes it had in flight then.
struct Stopped<'f> {
    error: Error,
    in_flight: InFlight<'f>,
}

/// Waits for every write in flight; the first failure is what this ends with (each is logged).
async fn answered(in_flight: InFlight<'_>) -> Result<()> {
    in_flight
        .fold(Ok(()), |first, result| async move {
            if let Err(error) = &result {
                tracing::warn!(%error, "a workload write handed on by its reconcile failed");
            }
            first.and(result)
        })
        .await
}

/// An action of the workload layer, as planned: built, or an injection built when its write starts
/// ([`workloads::Lazy`]).
pub trait WorkloadAction: Send + Sync + 'static {
    /// Collector ConfigMaps (0), then injections and removals (1), then ConfigMap deletions (2).
    fn phase(&self) -> u8;
    fn action(&self) -> std::borrow::Cow<'_, workloads::Action>;
}

impl WorkloadAction for workloads::Action {
    fn phase(&self) -> u8 {
        use workloads::Action::*;
        match self {
            ApplyCollectorConfig { .. } => 0,
            Inject { .. } | Remove { .. } => 1,
            DeleteCollectorConfig { .. } => 2,
        }
    }

    fn action(&self) -> std::borrow::Cow<'_, workloads::Action> {
        std::borrow::Cow::Borrowed(self)
    }
}

impl WorkloadAction for workloads::Lazy {
    fn phase(&self) -> u8 {
        match self {
            workloads::Lazy::Now(action) => action.phase(),
            workloads::Lazy::Later { .. } => 1,
        }
    }

    fn action(&self) -> std::borrow::Cow<'_, workloads::Action> {
        workloads::Lazy::action(self)
    }
}

/// The target of a workload action.
pub fn target_of(action: &workloads::Lazy) -> Target {
    match action {
        workloads::Lazy::Later { kind, workload, .. } => (Some(*kind), workload.clone()),
        workloads::Lazy::Now(action) => target(action),
    }
}

/// The target of a built workload action.
fn target(action: &workloads::Action) -> Target {
    use workloads::Action::*;
    match action {
        Inject { kind, workload, .. } | Remove { kind, workload, .. } => (Some(*kind), workload.clone()),
        ApplyCollectorConfig { namespace, name, .. } | DeleteCollectorConfig { namespace, name } => {
            (None, ObjectKey::new(namespace.clone(), name.clone()))
        }
    }
}

/// Runs the workload layer's actions: collector ConfigMaps first, then the injections and removals,
/// then ConfigMap deletions, each phase paced by `pace`, while `turn` is the caller's; the first
/// failure stops the rest. An action is built when its write starts. Each workload write is told to
/// `notes` as it starts and ends (the stores take in what it left before their watch does).
///
/// When the write budget ends with writes in flight or still to start, they are handed to the
/// policy's writer, returned as a [`Tail`] to run on (`Written::done` counts them): it starts the rest
/// of the plan within the limit, in plan order, as long as the turn is its own (until the policy's
/// next reconcile takes it over), and ends when every write it started is answered. Every failure in
/// it is logged, and the first is what it ends with ([`Tails`]).
pub async fn workloads<A, N>(
    writer: &Writer,
    actions: Vec<A>,
    pace: Pace,
    notes: &N,
    turn: &Turn,
) -> Result<(Written, Option<Tail>)>
where
    A: WorkloadAction,
    N: WriteNotes + Clone + Send + 'static,
{
    let (written, in_flight) = {
        // Owned: an injection built now is moved into its request, not copied.
        let write = |planned: &A| workload_write(writer, notes, turn, planned.action().into_owned());
        // A failure ends the reconcile at once (it is retried after the backoff, planned anew): the
        // writes still in flight are not waited for.
        paced(&actions, (0, InFlight::new()), &pace, true, A::phase, write).await.map_err(|s| s.error)?
    };
    if written.complete() && in_flight.is_empty() {
        return Ok((written, None));
    }
    let (writer, notes, turn) = (writer.clone(), notes.clone(), turn.clone());
    let from = written.done;
    let starting = (from < actions.len()).then(|| Starting::new(&turn));
    let tail = async move {
        let mut in_flight = in_flight;
        // The writes of an earlier phase are answered before the next one starts.
        let boundary = from > 0 && from < actions.len() && actions[from - 1].phase() != actions[from].phase();
        if boundary {
            answered(std::mem::take(&mut in_flight)).await?;
        }
        let write = |planned: &A| workload_write(&writer, &notes, &turn, planned.action().into_owned());
        let unbounded = Pace { budget: None, ..pace };
        let result = paced(&actions, (from, in_flight), &unbounded, true, A::phase, write).await;
        // Stopped (its turn taken over, or a failure) or done: what it did not start is dropped now, not
        // when its writes in flight are answered (a stopped writer held its unbuilt injections until then).
        drop((actions, starting));
        match result {
            Ok((_, in_flight)) => answered(in_flight).await,
            // The writes in flight at a failure are still answered (and the stores told), so that the
            // reconcile the failure wakes does not write them again; the failure is what it ends with.
            Err(Stopped { error, in_flight }) => {
                let _ = answered(in_flight).await;
                Err(error)
            }
        }
    };
    Ok((Written { done: written.of, of: written.of }, Some(Box::pin(tail))))
}

/// One write of the workload layer, started now if `turn` is still the caller's: a workload write is
/// told to `notes` before this returns (not when it is first polled: a reconcile right after this one's
/// budget ended finds it in flight), and as it ends.
fn workload_write<N>(
    writer: &Writer,
    notes: &N,
    turn: &Turn,
    action: workloads::Action,
) -> Option<futures::future::BoxFuture<'static, Result<()>>>
where
    N: WriteNotes + Clone + Send + 'static,
{
    use workloads::Action::*;
    let writer = writer.clone();
    let target = target(&action);
    let write: futures::future::BoxFuture<'static, Result<()>> = match action {
        ApplyCollectorConfig { namespace, name, data, policy, policy_uid } => {
            turn.start(&target, || ())?;
            let write = async move {
                let api = Api::<ConfigMap>::namespaced(writer.client.clone(), &namespace);
                let patch = json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "labels": {workloads::POLICY_LABEL: policy},
                        "ownerReferences": [{
                            "apiVersion": "crosstrace.dev/v1alpha1",
                            "kind": "TracingPolicy",
                            "name": policy,
                            "uid": policy_uid,
                        }],
                    },
                    "data": data,
                });
                writer.apply(&api, &name, patch).await.map(drop)
            };
            Box::pin(write)
        }
        DeleteCollectorConfig { namespace, name } => {
            turn.start(&target, || ())?;
            let write = async move {
                writer.delete(&Api::<ConfigMap>::namespaced(writer.client.clone(), &namespace), &name).await
            };
            Box::pin(write)
        }
        Inject { kind, workload, patch } => {
            let noted = turn.start(&target, || Noted::start(notes.clone(), kind, &workload))?;
            Box::pin(async move { noted_apply(&writer, noted, kind, &workload, patch).await })
        }
        Remove { kind, workload, rolled_back } => {
            let patch = workloads::removal_patch(kind, &workload, rolled_back.as_deref());
            let noted = turn.start(&target, || Noted::start(notes.clone(), kind, &workload))?;
            Box::pin(async move { noted_apply(&writer, noted, kind, &workload, patch).await })
        }
    };
    let turn = turn.clone();
    Some(Box::pin(async move {
        let result = write.await;
        turn.ended(target);
        result
    }))
}

/// Runs the network layer's actions (one per node, independent of each other), paced by `pace`. Every
/// write carries the resourceVersion it was planned from: a conflict means another policy changed the
/// node meanwhile, and the reconcile is retried. Every write is told to `notes` as it starts and ends.
pub async fn network(
    writer: &Writer,
    actions: &[network::Action],
    pace: Pace,
    notes: &impl WriteNotes,
) -> Result<Written> {
    let api = &Api::<NodeTracing>::all(writer.client.clone());
    let (written, _) = paced(
        actions,
        (0, InFlight::new()),
        &pace,
        false,
        |_| 0,
        |action| {
            Some(async move {
                let node = match action {
                    network::Action::Put { node, .. } | network::Action::Delete { node, .. } => node,
                };
                notes.writing_node(node);
                let result = match action {
                    network::Action::Put { node, bridges, rolled_back, resource_version } => {
                        let mut metadata = json!({"name": node});
                        if let Some(rv) = resource_version {
                            metadata["resourceVersion"] = json!(rv);
                        }
                        if let Some(marker) = rolled_back {
                            metadata["annotations"] = json!({network::ROLLED_BACK_ANNOTATION: marker});
                        }
                        let patch = json!({
                            "apiVersion": "crosstrace.dev/v1alpha1",
                            "kind": "NodeTracing",
                            "metadata": metadata,
                            "spec": {"nodeName": node, "bridges": bridges},
                        });
                        writer.apply(api, node, patch).await.map(Some)
                    }
                    network::Action::Delete { node, resource_version } => {
                        writer.delete_at_version(api, node, resource_version.clone()).await.map(|()| None)
                    }
                };
                notes.written_node(node, result.as_ref().ok().map(Option::as_ref));
                result.map(drop)
            })
        },
    )
    .await
    .map_err(|s| s.error)?;
    Ok(written)
}
