//! Watch-backed stores of the workloads, namespaces, nodes and NodeTracings, shared by every reconcile.
//!
//! The controller's watches of Deployments, StatefulSets and DaemonSets feed reflectors that keep, of
//! the workloads some policy may select (by kind, labels and their namespace's labels) or that carry
//! the workload layer's marks, each pruned ([`Pruned`]): its metadata without managedFields nor the
//! user's annotations, and the [`Shape`] the plan reads. A workload carrying the ingress layer's label
//! is kept as metadata alone; every other workload is not kept at all (its watch events still wake
//! the policies it concerns), so memory grows with the targets, not with the cluster's workloads. The
//! workload layer reads these stores instead of listing the cluster on every reconcile.
//!
//! What a store did not keep, because no policy selected it when it last changed, a policy that
//! selects it now lists (see [`Stores::uncovered`]): the namespaces it selects are listed once for its
//! selection, and again when a namespace changes or a store relists. What such a list read is used
//! until the workload's next watch event (which the store keeps, now that a policy selects it).
//!
//! The network layer reads the nodes (pruned metadata and the address a correlating policy exports
//! from, [`Addressed`]) and the NodeTracings (readable ones only: one that cannot be read is left out,
//! as a list read leniently leaves it out) the same way: with thousands of nodes whose agents each
//! report, listing both on every reconcile made a rollout's work grow as nodes times reconciles.
//!
//! A store lags behind the API server by a watch event. Two things cover the gap, in `Stores::seen`
//! and `Stores::seen_tracings`:
//! - what crosstrace wrote (the object each server-side apply returned, or a NodeTracing's deletion),
//!   used until the store shows a newer version, so a reconcile right after a write plans from it and
//!   not from the object before;
//! - workloads the store did not keep (no policy selected them when they last changed) and a policy
//!   selects now: read once (a list, or a GET of one kept as metadata), used until the store takes in
//!   another version (or the workload is deleted).
//!
//! What crosstrace wrote also tells the trigger filter that a watch event is the echo of the writing
//! policy's own write (see [`Stores::written_by`], [`Stores::tracing_written_by`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::core::Selector;
use kube::runtime::reflector::{ObjectRef, Store};

use super::ObjectKey;
use super::workloads::{Shape, Workload, pruned_metadata};
use crate::api::{NodeTracing, WorkloadKind};
use crate::lean::{Addressed, Meta, Pruned};

/// A version of an object newer than (or missing from) its store's, kept as the store would keep it.
#[derive(Clone, Debug)]
struct Seen<T> {
    /// The store's resourceVersion when this was seen: while the store shows it (or this one's own),
    /// this is the newest known.
    base: Option<String>,
    /// This one's resourceVersion (`None`: deleted).
    version: Option<String>,
    value: T,
    /// The policy whose write this is (`None`: read, not written).
    written_by: Option<String>,
}

impl<T> Seen<T> {
    /// Is this still the newest known, with the store at `stored`?
    fn current(&self, stored: Option<&String>) -> bool {
        stored == self.base.as_ref() || stored == self.version.as_ref()
    }
}

/// What was seen of workloads newer than their stores (see [`Stores::seen`]); a value is `None` once
/// the store shows it.
type SeenWorkloads = HashMap<(WorkloadKind, ObjectKey), Seen<Option<Arc<Kept>>>>;

/// A workload as its store keeps it.
#[derive(Clone, Debug)]
struct Kept {
    metadata: ObjectMeta,
    shape: Shape,
}

/// The policy whose write `version` of the object at `key` is: any version while a write is in flight
/// (see [`Stores::written_by`]), else the version a write returned.
fn echo_of<K: Eq + Hash, T>(
    writing: &Mutex<HashMap<K, Writing>>,
    seen: &Mutex<HashMap<K, Seen<T>>>,
    key: &K,
    version: Option<&String>,
) -> Option<String> {
    if let Some(w) = writing.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
        return Some(w.policy.clone());
    }
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let s = seen.get(key)?;
    (version.is_some() && s.version.as_ref() == version).then(|| s.written_by.clone()).flatten()
}

/// A NodeTracing as the store keeps it: without managedFields nor others' annotations.
pub fn pruned_tracing(t: NodeTracing) -> NodeTracing {
    NodeTracing { metadata: pruned_metadata(&t.metadata), ..t }
}

/// A policy's workload writes, as the stores hear of them; cloned into each write (some outlive their
/// reconcile: see `apply::workloads`).
#[derive(Clone)]
pub struct Writes {
    stores: Arc<Stores>,
    policy: Arc<str>,
    raced: Arc<AtomicBool>,
}

impl crate::controller::apply::WriteNotes for Writes {
    fn writing(&self, kind: WorkloadKind, key: &ObjectKey) {
        let mut writing = self.stores.writing.lock().unwrap_or_else(|e| e.into_inner());
        // A workload write is judged by the versions its store takes in meanwhile, not by the one before.
        writing.insert(
            (kind, key.clone()),
            Writing { policy: self.policy.to_string(), before: None, took_in: Vec::new() },
        );
    }

    fn written(&self, kind: WorkloadKind, key: &ObjectKey, left: Option<&Workload>) {
        let writing = self.stores.writing.lock().unwrap_or_else(|e| e.into_inner()).remove(&(kind, key.clone()));
        if let (Some(w), Some(writing)) = (left, writing)
            && self.stores.saw_written(w, &self.policy, writing)
        {
            self.raced.store(true, Ordering::Relaxed);
        }
    }

    fn writing_node(&self, node: &str) {
        let before = self.stores.tracing_version(node);
        let mut writing = self.stores.writing_tracings.lock().unwrap_or_else(|e| e.into_inner());
        writing.insert(node.to_string(), Writing { policy: self.policy.to_string(), before, took_in: Vec::new() });
    }

    fn written_node(&self, node: &str, left: Option<Option<&NodeTracing>>) {
        let before = self.stores.writing_tracings.lock().unwrap_or_else(|e| e.into_inner()).remove(node);
        if let Some(left) = left {
            let before = before.and_then(|w| w.before);
            if self.stores.saw_written_tracing(node, left, &self.policy, before) {
                self.raced.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl Writes {
    /// Did the store of a written workload or NodeTracing take in, during its write, a change after
    /// the write? Those events were taken for the write's echo and woke nothing: the policy should look
    /// again at once rather than at its next poll.
    pub fn raced(&self) -> bool {
        self.raced.load(Ordering::Relaxed)
    }
}

/// A write in flight.
struct Writing {
    policy: String,
    /// The store's version when a NodeTracing write started (its writes are guarded by the version they
    /// were planned from; a workload write leaves this empty).
    before: Option<String>,
    /// The versions a workload store took in since (the write's echo can arrive before its response).
    took_in: Vec<String>,
}

/// The stores of the workload kinds, the namespaces, the nodes and the NodeTracings, and what was seen
/// newer than them.
pub struct Stores {
    pub deployments: Store<Pruned<Deployment>>,
    pub statefulsets: Store<Pruned<StatefulSet>>,
    pub daemonsets: Store<Pruned<DaemonSet>>,
    pub namespaces: Store<Meta<Namespace>>,
    pub nodes: Store<Addressed<Node>>,
    /// Readable NodeTracings, pruned ([`pruned_tracing`]).
    pub node_tracings: Store<NodeTracing>,
    /// A workload's value is dropped once its store shows the same version: what is left tells the
    /// write's echo (a big rollout's last writes would otherwise be kept twice, here and in the store).
    seen: Mutex<SeenWorkloads>,
    /// Workload writes in flight.
    writing: Mutex<HashMap<(WorkloadKind, ObjectKey), Writing>>,
    /// NodeTracings crosstrace wrote (`None`: deleted), by node, newer than the store's.
    seen_tracings: Mutex<HashMap<String, Seen<Option<NodeTracing>>>>,
    /// NodeTracing writes in flight.
    writing_tracings: Mutex<HashMap<String, Writing>>,
    /// The ConfigMaps a reconcile reads (`None`: read from the API server, as before the watches).
    config_maps: Option<ConfigMaps>,
    /// Moves on when a workload appears or its labels change, when a namespace appears or changes, and
    /// when a store relists: until then, what a scan of a store found is a superset of what the same
    /// scan would find again (workloads gone are simply not found by their key).
    label_epoch: AtomicU64,
    /// What the scans found, by what they were asked for and the kind scanned.
    scans: Mutex<HashMap<(String, &'static str, WorkloadKind), Scanned>>,
    /// When [`Stores::forget_stale_now_and_then`] last forgot.
    forgot: Mutex<Option<Instant>>,
    /// Moves on when a workload store takes in a relist: what the policies listed before is covered
    /// by the store no more (see [`Stores::uncovered`]).
    relists: AtomicU64,
    /// By policy: the namespaces whose workloads it listed, for which selection.
    coverage: Mutex<HashMap<String, Coverage>>,
    /// Workloads deleted while reads were in flight, and when: a read that started before must not
    /// bring them back. Emptied whenever no read is in flight.
    deleted: Mutex<HashMap<(WorkloadKind, ObjectKey), Instant>>,
    /// Reads of workloads in flight ([`Listing`]).
    reading: AtomicUsize,
}

/// Reads of workloads in flight (lists, or GETs), from `since`: a workload deleted meanwhile is not
/// taken from them ([`Stores::read`]).
pub struct Listing<'a> {
    stores: &'a Stores,
    since: Instant,
}

impl Drop for Listing<'_> {
    fn drop(&mut self) {
        let mut deleted = self.stores.deleted.lock().unwrap_or_else(|e| e.into_inner());
        if self.stores.reading.fetch_sub(1, Ordering::AcqRel) == 1 {
            deleted.clear();
        }
    }
}

/// The namespaces (at their resourceVersion) whose workloads a policy listed for its selection
/// (`fingerprint`), since the workload stores' relist numbered `relists`.
struct Coverage {
    fingerprint: String,
    relists: u64,
    namespaces: HashMap<String, Option<String>>,
}

/// What a policy must list before its plan can trust the stores: the namespaces it selects whose
/// workloads it has not listed for its selection (or that changed since); handed back to
/// [`Stores::covered`] once listed.
pub struct Uncovered<'a> {
    by: String,
    fingerprint: String,
    relists: u64,
    /// Every namespace selected, at its resourceVersion.
    selected: HashMap<String, Option<String>>,
    /// Those to list.
    pub namespaces: BTreeSet<String>,
    /// The lists, for [`Stores::read`].
    pub listing: Listing<'a>,
}

/// The ConfigMaps every reconcile looks at, from watches: the edge layers' ledgers (in the operator's
/// namespace, one each) and the workload layer's collector ConfigMaps (every namespace, by label).
pub struct ConfigMaps {
    pub ingress_ledger: Store<ConfigMap>,
    pub gateway_ledger: Store<ConfigMap>,
    pub collectors: Store<ConfigMap>,
}

/// What the stores show of a policy at the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgeShown {
    /// An entry in the ingress ledger, or a Deployment or DaemonSet carrying the policy's ingress label.
    pub ingress: bool,
    /// An entry in the gateway ledger.
    pub gateway: bool,
}

/// Has this store's reflector taken in its first list?
fn ready<K: kube::Resource<DynamicType = ()> + Clone + 'static>(store: &Store<K>) -> bool {
    store.wait_until_ready().now_or_never().is_some_and(|r| r.is_ok())
}

/// The `stored` workloads, each as the newest version known (see [`Stores::workloads`]); with those
/// seen of `kind` that the store does not hold, and `keep` accepts. `seen` is locked only to look the
/// workloads up (the watches lock it for each event): the workloads are built after.
fn newest<K: kube::Resource<DynamicType = ()> + 'static>(
    stored: Vec<Arc<Pruned<K>>>,
    kind: WorkloadKind,
    seen: &Mutex<SeenWorkloads>,
    unkept: impl Fn(&ObjectKey, &Kept) -> bool,
) -> Vec<Result<Workload, ObjectKey>> {
    let keys: Vec<(WorkloadKind, ObjectKey)> = stored.iter().map(|p| (kind, ObjectKey::of(&p.metadata))).collect();
    let (newer, unkept): (Vec<Option<Arc<Kept>>>, Vec<Arc<Kept>>) = {
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            let newer = stored.iter().zip(&keys).map(|(p, key)| {
                let (version, shape) = (p.metadata.resource_version.as_ref(), p.shape.as_ref());
                let s =
                    seen.get(key).filter(|s| s.current(version) && !(shape.is_some() && version == s.version.as_ref()));
                s.and_then(|s| s.value.clone())
            });
            let newer = newer.collect();
            let candidates = seen.iter().filter(|((k, _), s)| *k == kind && s.base.is_none());
            let candidates = candidates.filter_map(|((_, key), s)| s.value.clone().filter(|v| unkept(key, v)));
            (newer, candidates.collect())
        }
    };
    let newer = newer.into_iter().chain(std::iter::repeat(None));
    let mut found: Vec<_> = stored
        .iter()
        .zip(keys)
        .zip(newer)
        .map(|((p, (_, key)), newer)| match (newer, p.shape.as_ref()) {
            (Some(s), _) => Ok(Workload::from_shape(kind, s.metadata.clone(), &s.shape)),
            (None, Some(shape)) => Ok(Workload::from_shape(kind, p.metadata.clone(), shape)),
            (None, None) => Err(key),
        })
        .collect();
    found.extend(unkept.iter().map(|v| Ok(Workload::from_shape(kind, v.metadata.clone(), &v.shape))));
    found
}

/// What a scan of a workload store is asked for: by whom (a policy) and what for, and a fingerprint
/// of everything its filter reads besides the labels of the workloads and of their namespaces (the
/// policy's selectors, the operator's defaults). The keys a scan found are remembered under it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Asked {
    pub by: String,
    pub what: &'static str,
    pub fingerprint: String,
}

/// The keys a scan found, and the label epoch it started at.
struct Scanned {
    epoch: u64,
    fingerprint: String,
    keys: Vec<ObjectKey>,
}

/// How often [`Stores::forget_stale_now_and_then`] forgets.
const FORGET_EVERY: Duration = Duration::from_secs(5);

/// Does a ledger (the one ConfigMap of `store`) hold an entry of `policy`?
fn ledger_names<R: super::Owned + serde::de::DeserializeOwned>(store: &Store<ConfigMap>, policy: &str) -> bool {
    store.find(|ledger| super::ledger_policies::<R>(ledger).contains(policy)).is_some()
}

fn version_in<K: kube::Resource<DynamicType = ()> + 'static>(
    store: &Store<Pruned<K>>,
    key: &ObjectKey,
) -> Option<String> {
    stored_in(store, key).map(|(version, _)| version)
}

/// The resourceVersion of `key` in `store`, and whether the store keeps its shape.
fn stored_in<K: kube::Resource<DynamicType = ()> + 'static>(
    store: &Store<Pruned<K>>,
    key: &ObjectKey,
) -> Option<(String, bool)> {
    let stored = store.get(&ObjectRef::new(&key.name).within(&key.namespace))?;
    Some((stored.metadata.resource_version.clone()?, stored.shape.is_some()))
}

impl Stores {
    pub fn new(
        deployments: Store<Pruned<Deployment>>,
        statefulsets: Store<Pruned<StatefulSet>>,
        daemonsets: Store<Pruned<DaemonSet>>,
        namespaces: Store<Meta<Namespace>>,
        nodes: Store<Addressed<Node>>,
        node_tracings: Store<NodeTracing>,
    ) -> Self {
        Self {
            deployments,
            statefulsets,
            daemonsets,
            namespaces,
            nodes,
            node_tracings,
            seen: Mutex::default(),
            writing: Mutex::default(),
            seen_tracings: Mutex::default(),
            writing_tracings: Mutex::default(),
            config_maps: None,
            label_epoch: AtomicU64::new(0),
            scans: Mutex::default(),
            forgot: Mutex::default(),
            relists: AtomicU64::new(0),
            coverage: Mutex::default(),
            deleted: Mutex::default(),
            reading: AtomicUsize::new(0),
        }
    }

    /// The stores with the ConfigMaps' too: a reconcile reads them instead of the API server.
    pub fn with_config_maps(self, config_maps: ConfigMaps) -> Self {
        Self { config_maps: Some(config_maps), ..self }
    }

    /// The collector ConfigMaps of `policy` (those carrying its workload label), once their store has
    /// taken in its first list. The store lags behind crosstrace's own writes by a watch event: a plan
    /// made in that instant writes the same ConfigMap again (the API server changes nothing), or deletes
    /// one already gone (which is fine).
    pub fn collector_config_maps(&self, policy: &str) -> Option<Vec<ConfigMap>> {
        let store = &self.config_maps.as_ref()?.collectors;
        let labelled = |cm: &ConfigMap| cm.labels().get(super::workloads::POLICY_LABEL).is_some_and(|p| p == policy);
        ready(store).then(|| store.state_filter(labelled).iter().map(|cm| cm.as_ref().clone()).collect())
    }

    /// What the stores show of `policy` at the edge, once every store involved has taken in its first
    /// list. Nothing shown lets a reconcile skip reading the edge for a policy without `spec.ingress` or
    /// `spec.gateway`: whatever crosstrace changed there carries the policy's name in a ledger entry or a
    /// label, and a change of either wakes the policy once its store has it.
    pub fn edge_shown(&self, policy: &str) -> Option<EdgeShown> {
        let config_maps = self.config_maps.as_ref()?;
        if !(self.ready() && ready(&config_maps.ingress_ledger) && ready(&config_maps.gateway_ledger)) {
            return None;
        }
        let labelled = |meta: &ObjectMeta| {
            meta.labels.as_ref().and_then(|l| l.get(super::ingress::POLICY_LABEL)).is_some_and(|p| p == policy)
        };
        let asked = Asked { by: policy.to_string(), what: "ingress controllers", fingerprint: String::new() };
        let controllers = !self.scan(&self.deployments, WorkloadKind::Deployment, Some(&asked), labelled).is_empty()
            || !self.scan(&self.daemonsets, WorkloadKind::DaemonSet, Some(&asked), labelled).is_empty();
        Some(EdgeShown {
            ingress: controllers || ledger_names::<super::ingress::Record>(&config_maps.ingress_ledger, policy),
            gateway: ledger_names::<super::gateway::Record>(&config_maps.gateway_ledger, policy),
        })
    }

    /// Has every store of the workload layer taken in its first list? Until then a reconcile lists the
    /// cluster as before.
    pub fn ready(&self) -> bool {
        ready(&self.deployments) && ready(&self.statefulsets) && ready(&self.daemonsets) && ready(&self.namespaces)
    }

    /// Have the nodes' and the NodeTracings' stores taken in their first list? Until then the network
    /// layer lists them as before.
    pub fn network_ready(&self) -> bool {
        ready(&self.nodes) && ready(&self.node_tracings)
    }

    /// The name and address of every node `selector` matches (every node without one).
    pub fn nodes(&self, selector: Option<&Selector>) -> Vec<(String, Option<String>)> {
        let selected = |n: &Addressed<Node>| selector.is_none_or(|s| super::matches(s, n.metadata.labels.as_ref()));
        self.nodes.state().iter().filter(|n| selected(n)).map(|n| (n.name_any(), n.address.clone())).collect()
    }

    /// Every readable NodeTracing, each as the newest version known: the store's, or what crosstrace
    /// wrote since (one it deleted is left out, one it created is in).
    pub fn node_tracings(&self) -> Vec<NodeTracing> {
        let seen = self.seen_tracings.lock().unwrap_or_else(|e| e.into_inner());
        let stored = self.node_tracings.state();
        let mut newest: Vec<NodeTracing> = stored
            .iter()
            .filter_map(|t| match seen.get(&t.name_any()).filter(|s| s.current(t.metadata.resource_version.as_ref())) {
                Some(s) => s.value.clone(),
                None => Some(t.as_ref().clone()),
            })
            .collect();
        let created = seen.iter().filter(|(node, s)| s.current(None) && self.tracing_version(node).is_none());
        newest.extend(created.filter_map(|(_, s)| s.value.clone()));
        newest
    }

    fn tracing_version(&self, node: &str) -> Option<String> {
        self.node_tracings.get(&ObjectRef::new(node)).and_then(|t| t.metadata.resource_version.clone())
    }

    /// Remembers what `policy`'s write of a NodeTracing left (`None`: deleted), the store having been
    /// at `before` when the write started; true if the store moved meanwhile to a version not the
    /// write's own. That version is then newer than the write (every write but a creation is guarded
    /// by the version it was planned from, and a creation racing another fails the next write's
    /// guard): the store is read as it is, and nothing is remembered.
    fn saw_written_tracing(
        &self,
        node: &str,
        left: Option<&NodeTracing>,
        policy: &str,
        before: Option<String>,
    ) -> bool {
        let now = self.tracing_version(node);
        let version = left.and_then(|t| t.metadata.resource_version.clone());
        let raced = now != before && now != version;
        let mut seen = self.seen_tracings.lock().unwrap_or_else(|e| e.into_inner());
        if raced {
            seen.remove(node);
        } else {
            let value = left.cloned().map(pruned_tracing);
            let written_by = Some(policy.to_string());
            seen.insert(node.to_string(), Seen { base: now, version, value, written_by });
        }
        raced
    }

    /// The store took in an event of `node`'s NodeTracing: a write it shows now needs no covering (its
    /// version is kept, to tell its echo). Else a NodeTracing crosstrace created, whose store had none
    /// before, would be taken for one the store has yet to see once it is deleted.
    pub fn tracing_event(&self, node: &str) {
        let stored = self.tracing_version(node);
        let mut seen = self.seen_tracings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = seen.get_mut(node).filter(|s| stored.is_some() && s.version == stored) {
            s.base = stored;
        }
    }

    /// The policy whose write this version of a NodeTracing is, as [`Stores::written_by`] tells it of
    /// a workload.
    pub fn tracing_written_by(&self, meta: &ObjectMeta) -> Option<String> {
        let node = meta.name.clone().unwrap_or_default();
        echo_of(&self.writing_tracings, &self.seen_tracings, &node, meta.resource_version.as_ref())
    }

    /// Labels of every namespace.
    pub fn namespace_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.namespaces
            .state()
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
            .collect()
    }

    fn version(&self, kind: WorkloadKind, key: &ObjectKey) -> Option<String> {
        self.stored(kind, key).map(|(version, _)| version)
    }

    /// The version of a workload its store shows, and whether it keeps its shape.
    fn stored(&self, kind: WorkloadKind, key: &ObjectKey) -> Option<(String, bool)> {
        match kind {
            WorkloadKind::Deployment => stored_in(&self.deployments, key),
            WorkloadKind::StatefulSet => stored_in(&self.statefulsets, key),
            WorkloadKind::DaemonSet => stored_in(&self.daemonsets, key),
        }
    }

    /// Does the store show this version of the workload as the plan reads it (with its shape)?
    fn shows(&self, kind: WorkloadKind, key: &ObjectKey, version: Option<&String>) -> bool {
        self.stored(kind, key).is_some_and(|(v, shaped)| shaped && Some(&v) == version)
    }

    /// The workloads of `kind` whose metadata `keep` accepts, each as the newest version known: the
    /// store's, or what was seen newer. `Err` holds the key of those known by their metadata alone
    /// (to be read). With `asked`, a scan of the store is done only when workloads or namespaces
    /// appeared or were relabelled since the last one asked the same (see [`Stores::relabelled`]); else
    /// the keys it found are looked at again, and `keep` filters them as it would the whole store.
    pub fn workloads(
        &self,
        kind: WorkloadKind,
        asked: Option<&Asked>,
        keep: impl Fn(&ObjectMeta) -> bool,
    ) -> Vec<Result<Workload, ObjectKey>> {
        match kind {
            WorkloadKind::Deployment => self.newest(&self.deployments, kind, asked, &keep),
            WorkloadKind::StatefulSet => self.newest(&self.statefulsets, kind, asked, &keep),
            WorkloadKind::DaemonSet => self.newest(&self.daemonsets, kind, asked, &keep),
        }
    }

    fn newest<K: kube::Resource<DynamicType = ()> + 'static>(
        &self,
        store: &Store<Pruned<K>>,
        kind: WorkloadKind,
        asked: Option<&Asked>,
        keep: &impl Fn(&ObjectMeta) -> bool,
    ) -> Vec<Result<Workload, ObjectKey>> {
        let stored = self.scan(store, kind, asked, keep);
        // And what was read or written of workloads the store does not keep (see `Stores::uncovered`).
        newest(stored, kind, &self.seen, |key, v| keep(&v.metadata) && version_in(store, key).is_none())
    }

    /// The workloads of `store` whose metadata `keep` accepts: from a scan of the store, or from the
    /// keys the last scan asked the same found, while the label epoch has not moved since it started.
    fn scan<K: kube::Resource<DynamicType = ()> + 'static>(
        &self,
        store: &Store<Pruned<K>>,
        kind: WorkloadKind,
        asked: Option<&Asked>,
        keep: impl Fn(&ObjectMeta) -> bool,
    ) -> Vec<Arc<Pruned<K>>> {
        let Some(asked) = asked else {
            return store.state_filter(|p| keep(&p.metadata));
        };
        let epoch = self.label_epoch.load(Ordering::Acquire);
        let memo = (asked.by.clone(), asked.what, kind);
        {
            let scans = self.scans.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(scanned) = scans.get(&memo).filter(|s| s.epoch == epoch && s.fingerprint == asked.fingerprint) {
                let get = |key: &ObjectKey| store.get(&ObjectRef::new(&key.name).within(&key.namespace));
                return scanned.keys.iter().filter_map(get).filter(|p| keep(&p.metadata)).collect();
            }
        }
        // The scan itself runs unlocked: the policies' reconciles scan side by side.
        let found = store.state_filter(|p| keep(&p.metadata));
        let keys = found.iter().map(|p| ObjectKey::of(&p.metadata)).collect();
        let scanned = Scanned { epoch, fingerprint: asked.fingerprint.clone(), keys };
        self.scans.lock().unwrap_or_else(|e| e.into_inner()).insert(memo, scanned);
        found
    }

    /// Tells the stores that a workload appeared or its labels changed, that a namespace appeared or
    /// changed, or that a store took in a relist: the next scans look at the whole store again. Called
    /// once the store shows the change.
    pub fn relabelled(&self) {
        self.label_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets what the scans asked by `policy` found, and what it listed (the policy is gone).
    pub fn forget_policy(&self, policy: &str) {
        self.scans.lock().unwrap_or_else(|e| e.into_inner()).retain(|(by, _, _), _| by != policy);
        self.coverage.lock().unwrap_or_else(|e| e.into_inner()).remove(policy);
    }

    /// The namespaces `asked.by` selects (`selects`, by name and labels) whose workloads it must list
    /// for the selection `asked.fingerprint` before its plan trusts the stores. The workload stores
    /// keep what some policy selects when it changes; a workload that changed last before the policy
    /// selected it (the policy is new, its selection changed, its namespace joined) is not kept. So
    /// every namespace is listed once per selection, again when it changes (its labels may have made
    /// the stores drop its workloads meanwhile), and all are after a workload store relists.
    pub fn uncovered(&self, asked: &Asked, selects: impl Fn(&str, &BTreeMap<String, String>) -> bool) -> Uncovered<'_> {
        let relists = self.relists.load(Ordering::Acquire);
        let no_labels = BTreeMap::new();
        let selected: HashMap<String, Option<String>> = self
            .namespaces
            .state()
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.as_deref()?;
                selects(name, n.metadata.labels.as_ref().unwrap_or(&no_labels))
                    .then(|| (name.to_string(), n.metadata.resource_version.clone()))
            })
            .collect();
        let coverage = self.coverage.lock().unwrap_or_else(|e| e.into_inner());
        let covered = coverage.get(&asked.by).filter(|c| c.fingerprint == asked.fingerprint && c.relists == relists);
        let namespaces = selected
            .iter()
            .filter(|(name, version)| covered.is_none_or(|c| c.namespaces.get(*name) != Some(version)))
            .map(|(name, _)| name.clone())
            .collect();
        Uncovered {
            by: asked.by.clone(),
            fingerprint: asked.fingerprint.clone(),
            relists,
            selected,
            namespaces,
            listing: self.listing(),
        }
    }

    /// Reads of workloads start: what they read is taken in by [`Stores::read`] while this lives.
    pub fn listing(&self) -> Listing<'_> {
        // Counted before the clock is read: a deletion taken in after `since` is kept for the reads.
        self.reading.fetch_add(1, Ordering::AcqRel);
        Listing { stores: self, since: Instant::now() }
    }

    /// Remembers that the namespaces of `uncovered` were listed (and those it did not list, covered
    /// before, still are): unless a workload store relisted meanwhile.
    pub fn covered(&self, uncovered: Uncovered<'_>) {
        if self.relists.load(Ordering::Acquire) != uncovered.relists {
            return;
        }
        let coverage =
            Coverage { fingerprint: uncovered.fingerprint, relists: uncovered.relists, namespaces: uncovered.selected };
        self.coverage.lock().unwrap_or_else(|e| e.into_inner()).insert(uncovered.by, coverage);
    }

    /// Remembers a workload read by `listing`, newer than the store's; unless the store shows that
    /// version, or it was deleted since the read started.
    pub fn read(&self, workload: &Workload, listing: &Listing<'_>) {
        if self.shows(workload.kind, &workload.key(), workload.metadata.resource_version.as_ref()) {
            return;
        }
        let deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
        if deleted.get(&(workload.kind, workload.key())).is_some_and(|at| *at >= listing.since) {
            return;
        }
        drop(deleted);
        self.remember(workload, None);
    }

    /// A workload store took in (`kept`), or passed over, a version of a workload: a read of another
    /// version is the newest no more (an older version's event that comes late drops a newer read too;
    /// the read's own version's event comes next, and the store keeps it); what was seen of this
    /// version, the store now shows.
    pub fn watched(&self, kind: WorkloadKind, meta: &ObjectMeta, kept: bool) {
        let key = (kind, ObjectKey::of(meta));
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = seen.get_mut(&key) else { return };
        if s.version != meta.resource_version {
            if s.written_by.is_none() {
                seen.remove(&key);
            }
        } else if kept && s.base.is_none() {
            s.base = s.version.clone();
        }
    }

    /// A workload was deleted: nothing seen of it is kept, and a list that started before does not
    /// bring it back.
    pub fn gone(&self, kind: WorkloadKind, meta: &ObjectMeta) {
        let key = (kind, ObjectKey::of(meta));
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        let mut deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
        if self.reading.load(Ordering::Acquire) > 0 {
            deleted.insert(key, Instant::now());
        }
    }

    /// A workload store took in a relist: every policy lists what it selects again, and what was read
    /// of workloads of `kind` the store does not keep is forgotten (one deleted while the watch was down
    /// has no event).
    pub fn relisted(&self, kind: WorkloadKind) {
        self.relists.fetch_add(1, Ordering::AcqRel);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|(k, key), s| *k != kind || s.written_by.is_some() || self.version(*k, key).is_some());
    }

    /// Remembers what `policy`'s write returned, unless the store already took in the write's echo
    /// and a version after it (the store is the newest then: the controller manager's rollout often
    /// comes before the write's response). True in that case: the events of those versions were taken
    /// for the echo (see [`Stores::written_by`]) and woke nothing.
    fn saw_written(&self, workload: &Workload, policy: &str, writing: Writing) -> bool {
        let now = self.version(workload.kind, &workload.key());
        let own = workload.metadata.resource_version.as_ref();
        let moved_past = now.as_ref() != own && writing.took_in.iter().any(|v| Some(v) == own);
        if moved_past {
            self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(&(workload.kind, workload.key()));
        } else {
            self.remember(workload, Some(policy));
        }
        moved_past
    }

    fn remember(&self, workload: &Workload, written_by: Option<&str>) {
        let key = workload.key();
        let base = self.version(workload.kind, &key);
        let seen = Seen {
            base,
            version: workload.metadata.resource_version.clone(),
            value: Some(Arc::new(Kept { metadata: pruned_metadata(&workload.metadata), shape: workload.shape() })),
            written_by: written_by.map(str::to_string),
        };
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert((workload.kind, key), seen);
    }

    /// Notes a version a workload store took in (called by its watch for every object it applies).
    pub fn took_in(&self, kind: WorkloadKind, meta: &ObjectMeta) {
        let Some(version) = &meta.resource_version else { return };
        let mut writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if !writing.is_empty()
            && let Some(w) = writing.get_mut(&(kind, ObjectKey::of(meta)))
        {
            w.took_in.push(version.clone());
        }
    }

    /// The policy whose write this version of a workload is, if crosstrace wrote it: the version its
    /// write returned, or any version while the write is in flight (its echo can arrive before its
    /// response; a change by someone else in that instant is seen by the policy's next look, which
    /// comes soon: it has a rollout in flight).
    pub fn written_by(&self, kind: WorkloadKind, meta: &ObjectMeta) -> Option<String> {
        echo_of(&self.writing, &self.seen, &(kind, ObjectKey::of(meta)), meta.resource_version.as_ref())
    }

    /// What `policy`'s workload and NodeTracing writes tell the stores.
    pub fn writes_of(self: &Arc<Self>, policy: &str) -> Writes {
        Writes { stores: Arc::clone(self), policy: policy.into(), raced: Arc::default() }
    }

    /// The workloads `policy` has writes in flight to (between its reconciles: those an ended
    /// reconcile left going).
    pub fn writing_of(&self, policy: &str) -> HashSet<(WorkloadKind, ObjectKey)> {
        let writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        writing.iter().filter(|(_, w)| w.policy == policy).map(|(k, _)| k.clone()).collect()
    }

    /// Forgets the workloads' stale versions ([`Stores::forget_stale`]) at most every few seconds: it
    /// looks at every workload crosstrace wrote, and what it forgets is never used (a version the store
    /// moved past is not current).
    pub fn forget_stale_now_and_then(&self) {
        let mut forgot = self.forgot.lock().unwrap_or_else(|e| e.into_inner());
        if forgot.is_none_or(|at| at.elapsed() >= FORGET_EVERY) {
            *forgot = Some(Instant::now());
            drop(forgot);
            self.forget_stale_workloads();
        }
    }

    /// Forgets what the stores have caught up with (or what is gone): only versions newer than the
    /// store's, and the last write of each workload until it changes again, are kept.
    pub fn forget_stale(&self) {
        self.forget_stale_workloads();
        self.forget_stale_tracings();
    }

    fn forget_stale_workloads(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // What was seen of a workload the store does not keep stays until its next event or deletion
        // (see `Stores::watched`, `Stores::gone`).
        seen.retain(|(kind, key), s| {
            let (stored, shaped) = self.stored(*kind, key).unzip();
            let shown = stored.is_some() && stored == s.version && shaped == Some(true);
            if shown && s.written_by.is_none() {
                // A read of the version the store shows.
                return false;
            }
            if shown {
                // The store shows a write: only its echo is left to tell.
                s.value = None;
            }
            s.current(stored.as_ref()) && (stored.is_some() || s.base.is_none())
        });
    }

    /// [`Stores::forget_stale`] of the NodeTracings (one per node).
    pub fn forget_stale_tracings(&self) {
        let mut seen = self.seen_tracings.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|node, s| {
            let stored = self.tracing_version(node);
            (stored.is_some() || s.value.is_some()) && s.current(stored.as_ref())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use kube::runtime::reflector::{self, store::Writer};
    use kube::runtime::watcher::Event;

    fn meta(name: &str, version: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            resource_version: Some(version.into()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    fn workload(name: &str, version: &str, rolled_out: bool) -> Workload {
        Workload {
            kind: WorkloadKind::Deployment,
            metadata: meta(name, version, &[]),
            rolled_out,
            ..Default::default()
        }
    }

    fn stores() -> (Arc<Stores>, Writer<Pruned<Deployment>>) {
        let (deployments, writer) = reflector::store();
        let stores = Stores::new(
            deployments,
            reflector::store().0,
            reflector::store().0,
            reflector::store().0,
            reflector::store().0,
            reflector::store().0,
        );
        (Arc::new(stores), writer)
    }

    fn network_stores() -> (Arc<Stores>, Writer<Addressed<Node>>, Writer<NodeTracing>) {
        let (nodes, node_writer) = reflector::store();
        let (tracings, tracing_writer) = reflector::store();
        let s = reflector::store().0;
        let stores = Stores::new(s, reflector::store().0, reflector::store().0, reflector::store().0, nodes, tracings);
        (Arc::new(stores), node_writer, tracing_writer)
    }

    /// NodeTracing `n0` at `version`, with an export of each of `policies`.
    fn tracing(version: &str, policies: &[&str]) -> NodeTracing {
        use crate::api::node_tracing::{BridgeExport, NodeTracingSpec};
        let bridges = policies.iter().map(|p| BridgeExport { policy: p.to_string(), ..Default::default() }).collect();
        let mut t = NodeTracing::new("n0", NodeTracingSpec { node_name: "n0".into(), bridges });
        t.metadata.resource_version = Some(version.into());
        t
    }

    /// Each NodeTracing the network layer reads now: its version and its exports' policies.
    fn newest(stores: &Stores) -> Vec<(String, Vec<String>)> {
        let all = stores.node_tracings();
        let policies = |t: &NodeTracing| t.spec.bridges.iter().map(|b| b.policy.clone()).collect();
        all.iter().map(|t| (t.resource_version().unwrap(), policies(t))).collect()
    }

    fn entry(version: &str, policies: &[&str]) -> (String, Vec<String>) {
        (version.to_string(), policies.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn the_edge_is_shown_by_ledger_entries_and_ingress_labels_and_collector_config_maps_by_label() {
        let (deployments, mut deployment_writer) = reflector::store();
        let (daemonsets, mut daemonset_writer) = reflector::store::<Pruned<DaemonSet>>();
        let (ingress_ledger, mut ingress_writer) = reflector::store();
        let (gateway_ledger, mut gateway_writer) = reflector::store();
        let (collectors, mut collector_writer) = reflector::store();
        let (statefulsets, mut statefulset_writer) = reflector::store::<Pruned<StatefulSet>>();
        let (namespaces, mut namespace_writer) = reflector::store::<Meta<Namespace>>();
        let (nodes, tracings) = (reflector::store().0, reflector::store().0);
        let stores = Stores::new(deployments, statefulsets, daemonsets, namespaces, nodes, tracings)
            .with_config_maps(ConfigMaps { ingress_ledger, gateway_ledger, collectors });
        let config_map = |name: &str, labels: &[(&str, &str)], data: &[(&str, serde_json::Value)]| ConfigMap {
            metadata: meta(name, "1", labels),
            data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        };
        assert_eq!(stores.edge_shown("a"), None, "nothing synced: the edge is read");
        assert_eq!(stores.collector_config_maps("a"), None);
        let ingress_entry = serde_json::json!({
            "policy": "a", "deployment": {"namespace": "edge", "name": "nginx"},
            "configMap": {"namespace": "edge", "name": "nginx"}, "configMapExisted": true, "originalData": {},
        });
        let gateway_entry = serde_json::json!({"policy": "b", "gateway": {"namespace": "shop", "name": "gw"}});
        ingress_writer.apply_watcher_event(&Event::Init);
        ingress_writer.apply_watcher_event(&Event::InitApply(config_map("ledger", &[], &[("uid-1", ingress_entry)])));
        ingress_writer.apply_watcher_event(&Event::InitDone);
        gateway_writer.apply_watcher_event(&Event::Init);
        gateway_writer.apply_watcher_event(&Event::InitApply(config_map("ledger", &[], &[("uid-2", gateway_entry)])));
        gateway_writer.apply_watcher_event(&Event::InitDone);
        assert_eq!(stores.edge_shown("a"), None, "the workloads' stores are not synced yet");
        deployment_writer.apply_watcher_event(&Event::Init);
        let labelled = meta("controller", "1", &[(super::super::ingress::POLICY_LABEL, "c")]);
        deployment_writer.apply_watcher_event(&Event::InitApply(Pruned::new(labelled, None)));
        deployment_writer.apply_watcher_event(&Event::InitDone);
        daemonset_writer.apply_watcher_event(&Event::Init);
        daemonset_writer.apply_watcher_event(&Event::InitDone);
        statefulset_writer.apply_watcher_event(&Event::Init);
        statefulset_writer.apply_watcher_event(&Event::InitDone);
        namespace_writer.apply_watcher_event(&Event::Init);
        namespace_writer.apply_watcher_event(&Event::InitDone);
        let shown = |ingress, gateway| Some(EdgeShown { ingress, gateway });
        assert_eq!(stores.edge_shown("a"), shown(true, false), "its ingress ledger entry");
        assert_eq!(stores.edge_shown("b"), shown(false, true), "its gateway ledger entry");
        assert_eq!(stores.edge_shown("c"), shown(true, false), "a controller carrying its ingress label");
        assert_eq!(stores.edge_shown("d"), shown(false, false), "nothing of it at the edge: not read");

        collector_writer.apply_watcher_event(&Event::Init);
        collector_writer.apply_watcher_event(&Event::InitApply(config_map("otel-a", &[(POLICY, "a")], &[])));
        collector_writer.apply_watcher_event(&Event::InitApply(config_map("otel-b", &[(POLICY, "b")], &[])));
        collector_writer.apply_watcher_event(&Event::InitDone);
        let names = |p| stores.collector_config_maps(p).map(|cms| cms.into_iter().map(|cm| cm.name_any()).collect());
        assert_eq!(names("a"), Some(vec!["otel-a".to_string()]));
        assert_eq!(names("d"), Some(vec![]));
    }

    const POLICY: &str = super::super::workloads::POLICY_LABEL;

    #[test]
    fn the_network_stores_are_trusted_after_both_first_lists_and_select_nodes_by_label() {
        let (stores, mut nodes, mut tracings) = network_stores();
        let node = |name: &str, zone: &str, address: Option<&str>| {
            let labels = BTreeMap::from([("zone".to_string(), zone.to_string())]);
            let meta = ObjectMeta { name: Some(name.into()), labels: Some(labels), ..Default::default() };
            Addressed::new(meta, address.map(Into::into))
        };
        nodes.apply_watcher_event(&Event::Init);
        nodes.apply_watcher_event(&Event::InitApply(node("n0", "a", Some("10.0.0.10"))));
        nodes.apply_watcher_event(&Event::InitApply(node("n1", "b", None)));
        nodes.apply_watcher_event(&Event::InitDone);
        assert!(!stores.network_ready(), "the NodeTracings too");
        tracings.apply_watcher_event(&Event::Init);
        tracings.apply_watcher_event(&Event::InitDone);
        assert!(stores.network_ready());
        assert!(!stores.ready(), "the workload layer's stores are apart");
        let zone_a =
            LabelSelector { match_labels: Some(BTreeMap::from([("zone".into(), "a".into())])), ..Default::default() };
        let zone_a = super::super::selector(&zone_a).unwrap();
        assert_eq!(stores.nodes(Some(&zone_a)), [("n0".to_string(), Some("10.0.0.10".to_string()))]);
        let mut every = stores.nodes(None);
        every.sort();
        assert_eq!(every, [("n0".to_string(), Some("10.0.0.10".to_string())), ("n1".to_string(), None)]);
    }

    #[test]
    fn a_node_tracing_write_is_read_until_the_store_shows_a_newer_version_and_marks_its_own_echo() {
        use crate::controller::apply::WriteNotes;
        let (stores, _nodes, mut tracings) = network_stores();
        tracings.apply_watcher_event(&Event::Apply(tracing("1", &[])));
        let notes = stores.writes_of("fabric");
        notes.writing_node("n0");
        let echo = tracing("2", &["fabric"]);
        assert_eq!(stores.tracing_written_by(&echo.metadata).as_deref(), Some("fabric"), "in flight");
        notes.written_node("n0", Some(Some(&echo)));
        assert!(!notes.raced());
        assert_eq!(newest(&stores), [entry("2", &["fabric"])], "the write, not the store's older version");
        tracings.apply_watcher_event(&Event::Apply(echo.clone()));
        stores.forget_stale();
        assert_eq!(stores.tracing_written_by(&echo.metadata).as_deref(), Some("fabric"), "kept for the echo");
        // The agent's report: someone else's version, newer than the write.
        let report = tracing("3", &["fabric"]);
        tracings.apply_watcher_event(&Event::Apply(report.clone()));
        assert_eq!(newest(&stores), [entry("3", &["fabric"])]);
        assert_eq!(stores.tracing_written_by(&report.metadata), None, "the agent's report wakes the policy");
        stores.forget_stale();
        assert!(stores.seen_tracings.lock().unwrap().is_empty());
    }

    #[test]
    fn a_node_tracing_created_or_deleted_by_crosstrace_is_seen_so_before_the_store() {
        use crate::controller::apply::WriteNotes;
        let (stores, _nodes, mut tracings) = network_stores();
        let notes = stores.writes_of("fabric");
        notes.writing_node("n0");
        notes.written_node("n0", Some(Some(&tracing("1", &["fabric"]))));
        assert_eq!(newest(&stores), [entry("1", &["fabric"])], "created");
        tracings.apply_watcher_event(&Event::Apply(tracing("1", &["fabric"])));
        stores.tracing_event("n0");
        tracings.apply_watcher_event(&Event::Delete(tracing("1", &["fabric"])));
        stores.tracing_event("n0");
        assert_eq!(newest(&stores), [], "deleted by someone else after the store showed the creation");
        stores.forget_stale();
        assert!(stores.seen_tracings.lock().unwrap().is_empty());
        tracings.apply_watcher_event(&Event::Apply(tracing("1", &["fabric"])));
        notes.writing_node("n0");
        notes.written_node("n0", Some(None));
        assert_eq!(newest(&stores), [], "deleted, the store still has it");
        stores.forget_stale();
        assert_eq!(newest(&stores), [], "kept until the store has it gone");
        tracings.apply_watcher_event(&Event::Delete(tracing("1", &["fabric"])));
        stores.forget_stale();
        assert!(stores.seen_tracings.lock().unwrap().is_empty());
        // A failed write leaves nothing.
        notes.writing_node("n0");
        notes.written_node("n0", None);
        assert!(stores.seen_tracings.lock().unwrap().is_empty());
        assert_eq!(stores.tracing_written_by(&tracing("1", &[]).metadata), None);
    }

    #[test]
    fn a_node_tracing_the_store_moved_past_during_its_write_is_read_from_the_store() {
        use crate::controller::apply::WriteNotes;
        let (stores, _nodes, mut tracings) = network_stores();
        tracings.apply_watcher_event(&Event::Apply(tracing("1", &[])));
        let notes = stores.writes_of("fabric");
        notes.writing_node("n0");
        // The write's echo, then the agent's report, both before the write's response.
        tracings.apply_watcher_event(&Event::Apply(tracing("2", &["fabric"])));
        tracings.apply_watcher_event(&Event::Apply(tracing("3", &["fabric"])));
        notes.written_node("n0", Some(Some(&tracing("2", &["fabric"]))));
        assert!(notes.raced(), "their events were taken for the echo: look again");
        assert_eq!(newest(&stores), [entry("3", &["fabric"])]);
    }

    fn rolled_out(stores: &Stores) -> Vec<Result<bool, String>> {
        let all = stores.workloads(WorkloadKind::Deployment, None, |_| true);
        all.into_iter().map(|w| w.map(|w| w.rolled_out).map_err(|k| k.name)).collect()
    }

    #[test]
    fn a_scan_is_looked_at_again_until_a_workload_appears_or_is_relabelled() {
        let (stores, mut writer) = stores();
        let apply = |writer: &mut Writer<Pruned<Deployment>>, name: &str, version: &str, app: &str| {
            let shape = Some(Shape::default());
            writer.apply_watcher_event(&Event::Apply(Pruned::new(meta(name, version, &[("app", app)]), shape)));
        };
        apply(&mut writer, "cart", "1", "a");
        apply(&mut writer, "ads", "1", "b");
        let asked = |fingerprint: &str| Asked { by: "shop".into(), what: "workloads", fingerprint: fingerprint.into() };
        let found = |asked: &Asked| {
            let app_a = |m: &ObjectMeta| m.labels.as_ref().and_then(|l| l.get("app")).is_some_and(|a| a == "a");
            let mut names: Vec<String> = stores
                .workloads(WorkloadKind::Deployment, Some(asked), app_a)
                .into_iter()
                .map(|w| w.map_or_else(|k| k.name, |w| w.metadata.name.unwrap()))
                .collect();
            names.sort();
            names
        };
        assert_eq!(found(&asked("1")), ["cart"]);
        apply(&mut writer, "web", "1", "a");
        assert_eq!(found(&asked("1")), ["cart"], "the keys found last, until the stores hear of the new one");
        assert_eq!(found(&asked("2")), ["cart", "web"], "asked otherwise: scanned");
        stores.relabelled();
        assert_eq!(found(&asked("1")), ["cart", "web"]);
        // What was found is filtered again, and what is gone is not found.
        apply(&mut writer, "cart", "2", "b");
        writer.apply_watcher_event(&Event::Delete(Pruned::new(meta("web", "2", &[("app", "a")]), None)));
        assert_eq!(found(&asked("1")), Vec::<String>::new());
        stores.forget_policy("shop");
        assert!(stores.scans.lock().unwrap().is_empty());
    }

    #[test]
    fn a_write_in_flight_owns_every_echo_until_it_ends() {
        use crate::controller::apply::WriteNotes;
        let (stores, _writer) = stores();
        let notes = stores.writes_of("shop");
        let key = ObjectKey::new("shop", "cart");
        let echo = meta("cart", "5", &[]);
        notes.writing(WorkloadKind::Deployment, &key);
        assert_eq!(stores.written_by(WorkloadKind::Deployment, &echo).as_deref(), Some("shop"));
        assert_eq!(stores.written_by(WorkloadKind::StatefulSet, &echo), None, "another kind");
        notes.written(WorkloadKind::Deployment, &key, None);
        assert_eq!(stores.written_by(WorkloadKind::Deployment, &echo), None, "failed: nothing was written");
    }

    #[test]
    fn a_store_is_trusted_only_after_its_first_list() {
        let (stores, mut writer) = stores();
        assert!(!stores.ready());
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitDone);
        assert!(ready(&stores.deployments));
        assert!(!stores.ready(), "every store");
    }

    #[test]
    fn a_workload_kept_as_metadata_is_read_once_and_used_until_it_changes() {
        let (stores, mut writer) = stores();
        writer.apply_watcher_event(&Event::Apply(Pruned::new(meta("cart", "1", &[]), None)));
        assert_eq!(rolled_out(&stores), [Err("cart".to_string())]);
        stores.read(&workload("cart", "1", true), &stores.listing());
        assert_eq!(rolled_out(&stores), [Ok(true)]);
        assert_eq!(stores.written_by(WorkloadKind::Deployment, &meta("cart", "1", &[])), None, "read, not written");
        writer.apply_watcher_event(&Event::Apply(Pruned::new(meta("cart", "2", &[]), None)));
        assert_eq!(rolled_out(&stores), [Err("cart".to_string())], "changed since: read again");
        stores.forget_stale();
        assert!(stores.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn what_the_store_does_not_keep_a_policy_lists_once_per_selection_namespace_change_and_relist() {
        let (namespaces, mut namespace_writer) = reflector::store::<Meta<Namespace>>();
        let stores = Stores::new(
            reflector::store().0,
            reflector::store().0,
            reflector::store().0,
            namespaces,
            reflector::store().0,
            reflector::store().0,
        );
        let namespace = |name: &str, version: &str, team: &str| -> Meta<Namespace> {
            let metadata = serde_json::json!({"name": name, "resourceVersion": version, "labels": {"team": team}});
            serde_json::from_value(serde_json::json!({ "metadata": metadata })).unwrap()
        };
        namespace_writer.apply_watcher_event(&Event::Apply(namespace("shop", "1", "a")));
        namespace_writer.apply_watcher_event(&Event::Apply(namespace("blog", "1", "a")));
        namespace_writer.apply_watcher_event(&Event::Apply(namespace("lab", "1", "b")));
        let asked = |fingerprint: &str| Asked { by: "shop".into(), what: "workloads", fingerprint: fingerprint.into() };
        let team_a = |_: &str, labels: &BTreeMap<String, String>| labels.get("team").is_some_and(|t| t == "a");
        let to_list = |fingerprint: &str| {
            let uncovered = stores.uncovered(&asked(fingerprint), team_a);
            let names: Vec<String> = uncovered.namespaces.iter().cloned().collect();
            (names, uncovered)
        };
        let (names, uncovered) = to_list("1");
        assert_eq!(names, ["blog", "shop"], "a new selection lists every namespace it selects");
        stores.covered(uncovered);
        assert!(to_list("1").0.is_empty(), "listed: the stores keep what it selects from now on");
        namespace_writer.apply_watcher_event(&Event::Apply(namespace("shop", "2", "a")));
        let (names, uncovered) = to_list("1");
        assert_eq!(names, ["shop"], "a namespace that changed is listed again");
        stores.covered(uncovered);
        namespace_writer.apply_watcher_event(&Event::Apply(namespace("lab", "2", "a")));
        assert_eq!(to_list("1").0, ["lab"], "a namespace that joined");
        assert_eq!(to_list("2").0, ["blog", "lab", "shop"], "another selection: every namespace");
        let (_, uncovered) = to_list("1");
        stores.relisted(WorkloadKind::StatefulSet);
        stores.covered(uncovered);
        assert_eq!(to_list("1").0, ["blog", "lab", "shop"], "a store relisted during the lists: not covered");
        stores.covered(to_list("1").1);
        assert!(to_list("1").0.is_empty());
        stores.forget_policy("shop");
        assert_eq!(to_list("1").0.len(), 3, "a policy deleted and created again lists again");
    }

    #[test]
    fn a_workload_read_that_the_store_does_not_keep_is_used_until_its_next_event_or_deletion() {
        let (stores, mut writer) = stores();
        let kind = WorkloadKind::Deployment;
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitDone);
        let before = stores.listing();
        stores.read(&workload("cart", "1", true), &before);
        assert_eq!(rolled_out(&stores), [Ok(true)], "read, not in the store");
        stores.forget_stale();
        assert_eq!(rolled_out(&stores), [Ok(true)], "kept: the store has nothing newer");
        stores.watched(kind, &meta("cart", "1", &[]), false);
        assert_eq!(rolled_out(&stores), [Ok(true)], "its own version's event");
        stores.watched(kind, &meta("cart", "2", &[]), false);
        assert_eq!(rolled_out(&stores), [], "another version: the read is the newest no more");

        stores.read(&workload("cart", "2", true), &before);
        stores.gone(kind, &meta("cart", "2", &[]));
        assert_eq!(rolled_out(&stores), [], "deleted");
        stores.read(&workload("cart", "2", true), &before);
        assert_eq!(rolled_out(&stores), [], "a list that started before the deletion does not bring it back");
        stores.read(&workload("cart", "3", false), &stores.listing());
        assert_eq!(rolled_out(&stores), [Ok(false)], "created again, read after");
        drop(before);
        assert!(stores.deleted.lock().unwrap().is_empty(), "no read in flight: no deletion is kept");
        stores.gone(kind, &meta("cart", "3", &[]));
        assert!(stores.deleted.lock().unwrap().is_empty());
        stores.relisted(kind);
        assert_eq!(rolled_out(&stores), [], "a relist forgets reads the store does not keep");
    }

    #[test]
    fn the_workloads_a_reconcile_reads_share_their_template_names_with_the_store() {
        use crate::layers::workloads::{Names, Template};
        let (stores, mut writer) = stores();
        let names = Names { containers: vec![("app".into(), vec!["LANG".into()])], ..Default::default() };
        let shape = Shape { names: Arc::new(names), ..Default::default() };
        writer.apply_watcher_event(&Event::Apply(Pruned::new(meta("cart", "1", &[]), Some(shape.clone()))));
        // Two reconciles' observations: neither copies the names (a thousand targets' rebuilt templates
        // were most of a reconcile's memory).
        let read = || stores.workloads(WorkloadKind::Deployment, None, |_| true).remove(0).expect("kept");
        let (first, second) = (read(), read());
        let shared = |w: &Workload| match &w.template {
            Template::Names(n) => Arc::ptr_eq(n, &stores_names(&stores)),
            Template::Full(_) => false,
        };
        assert!(shared(&first) && shared(&second));
        assert_eq!(first.template.names().containers, [("app".to_string(), vec!["LANG".to_string()])]);
    }

    /// The names the Deployment store holds for its one workload.
    fn stores_names(stores: &Stores) -> Arc<crate::layers::workloads::Names> {
        let stored = stores.deployments.state();
        Arc::clone(&stored[0].shape.as_ref().expect("a shape").names)
    }

    #[test]
    fn a_write_is_used_until_the_store_shows_it_and_marks_its_own_echo() {
        use crate::controller::apply::WriteNotes;
        let (stores, mut writer) = stores();
        let shape = |rolled_out| Some(Shape { rolled_out, ..Default::default() });
        writer.apply_watcher_event(&Event::Apply(Pruned::new(meta("cart", "1", &[]), shape(true))));
        let notes = stores.writes_of("shop");
        let key = ObjectKey::new("shop", "cart");
        notes.writing(WorkloadKind::Deployment, &key);
        notes.written(WorkloadKind::Deployment, &key, Some(&workload("cart", "2", false)));
        assert!(!notes.raced());
        assert_eq!(rolled_out(&stores), [Ok(false)], "the write, not the store's older version");
        let echo = meta("cart", "2", &[]);
        assert_eq!(stores.written_by(WorkloadKind::Deployment, &echo).as_deref(), Some("shop"));
        writer.apply_watcher_event(&Event::Apply(Pruned::new(echo.clone(), shape(false))));
        stores.forget_stale();
        assert_eq!(stores.written_by(WorkloadKind::Deployment, &echo).as_deref(), Some("shop"), "kept for the echo");
        assert!(stores.seen.lock().unwrap().values().all(|s| s.value.is_none()), "not twice: the store has it");
        assert_eq!(rolled_out(&stores), [Ok(false)], "from the store");
        writer.apply_watcher_event(&Event::Apply(Pruned::new(meta("cart", "3", &[]), shape(true))));
        assert_eq!(rolled_out(&stores), [Ok(true)], "the owner's change after the write");
        assert_eq!(stores.written_by(WorkloadKind::Deployment, &meta("cart", "3", &[])), None);
        stores.forget_stale();
        assert!(stores.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn a_write_the_store_moved_past_meanwhile_gives_way_to_the_store() {
        use crate::controller::apply::WriteNotes;
        let (stores, mut writer) = stores();
        let shape = |rolled_out| Some(Shape { rolled_out, ..Default::default() });
        let mut take = |version: &str, rolled_out: bool| {
            let m = meta("cart", version, &[]);
            writer.apply_watcher_event(&Event::Apply(Pruned::new(m.clone(), shape(rolled_out))));
            stores.took_in(WorkloadKind::Deployment, &m);
        };
        take("1", true);
        let notes = stores.writes_of("shop");
        let key = ObjectKey::new("shop", "cart");
        // The echo, then the controller manager's rollout, both before the write's response.
        notes.writing(WorkloadKind::Deployment, &key);
        take("2", false);
        take("3", true);
        notes.written(WorkloadKind::Deployment, &key, Some(&workload("cart", "2", false)));
        assert!(notes.raced(), "their events were taken for the echo: look again");
        assert_eq!(rolled_out(&stores), [Ok(true)], "the store is past the write");

        // A store behind: it takes in an older change during the write; the write stays the newest.
        let notes = stores.writes_of("shop");
        notes.writing(WorkloadKind::Deployment, &key);
        take("4", true);
        notes.written(WorkloadKind::Deployment, &key, Some(&workload("cart", "5", false)));
        assert!(!notes.raced());
        assert_eq!(rolled_out(&stores), [Ok(false)], "the write, not the older change");
    }
}
