//! Watch-backed stores of the workloads and namespaces, shared by every reconcile.
//!
//! The controller's watches of Deployments, StatefulSets and DaemonSets feed reflectors that keep each
//! workload pruned ([`Pruned`]): its metadata without managedFields nor the user's annotations, and, for
//! a workload some policy may select (its kind and labels match a policy's `spec.workloads`, whatever
//! the namespace) or that carries the workload layer's marks, the [`Shape`] the plan reads. Every other
//! workload is kept as metadata alone, so memory grows with the targets, not with the cluster's
//! workloads. The workload layer reads these stores instead of listing the cluster on every reconcile.
//!
//! A store lags behind the API server by a watch event. Two things cover the gap, in [`Stores::seen`]:
//! - what crosstrace wrote (the object each server-side apply returned), used until the store shows
//!   a newer version, so a reconcile right after a write plans from it and not from the object before;
//! - workloads the store kept as metadata alone (no policy selected them when they last changed) and
//!   a policy selects now: read once (GET), used while the store shows the same version.
//!
//! What crosstrace wrote also tells the trigger filter that a watch event is the echo of the writing
//! policy's own write (see [`Stores::written_by`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::FutureExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};

use super::ObjectKey;
use super::workloads::{Shape, Workload, pruned_metadata};
use crate::api::WorkloadKind;
use crate::lean::{Meta, Pruned};

/// A version of a workload newer than (or missing from) its store's, pruned as the store would keep it.
#[derive(Clone, Debug)]
struct Seen {
    /// The store's resourceVersion when this was seen: while the store shows it (or this one's own),
    /// this is the newest known.
    base: Option<String>,
    metadata: ObjectMeta,
    shape: Shape,
    /// The policy whose write this is (`None`: read, not written).
    written_by: Option<String>,
}

impl Seen {
    fn version(&self) -> Option<&String> {
        self.metadata.resource_version.as_ref()
    }

    /// Is this still the newest known, with the store at `stored`?
    fn current(&self, stored: Option<&String>) -> bool {
        stored == self.base.as_ref() || stored == self.version()
    }
}

/// A policy's workload writes, as the stores hear of them.
pub struct Writes<'a> {
    stores: &'a Stores,
    policy: &'a str,
    raced: AtomicBool,
}

impl crate::controller::apply::WriteNotes for Writes<'_> {
    fn writing(&self, kind: WorkloadKind, key: &ObjectKey) {
        let mut writing = self.stores.writing.lock().unwrap_or_else(|e| e.into_inner());
        writing.insert((kind, key.clone()), Writing { policy: self.policy.to_string(), took_in: Vec::new() });
    }

    fn written(&self, kind: WorkloadKind, key: &ObjectKey, left: Option<&Workload>) {
        let writing = self.stores.writing.lock().unwrap_or_else(|e| e.into_inner()).remove(&(kind, key.clone()));
        if let (Some(w), Some(writing)) = (left, writing)
            && self.stores.saw_written(w, self.policy, writing)
        {
            self.raced.store(true, Ordering::Relaxed);
        }
    }
}

impl Writes<'_> {
    /// Did the store of a written workload take in, during its write, the write's own echo and a
    /// change after it? Those events were taken for the echo and woke nothing: the policy should look
    /// again at once rather than at its next poll.
    pub fn raced(&self) -> bool {
        self.raced.load(Ordering::Relaxed)
    }
}

/// A workload write in flight.
struct Writing {
    policy: String,
    /// The versions the store took in since (the write's echo can arrive before its response).
    took_in: Vec<String>,
}

/// The stores of the workload kinds and of the namespaces, and what was seen newer than them.
pub struct Stores {
    pub deployments: Store<Pruned<Deployment>>,
    pub statefulsets: Store<Pruned<StatefulSet>>,
    pub daemonsets: Store<Pruned<DaemonSet>>,
    pub namespaces: Store<Meta<Namespace>>,
    seen: Mutex<HashMap<(WorkloadKind, ObjectKey), Seen>>,
    /// Workload writes in flight.
    writing: Mutex<HashMap<(WorkloadKind, ObjectKey), Writing>>,
}

/// Has this store's reflector taken in its first list?
fn ready<K: kube::Resource<DynamicType = ()> + Clone + 'static>(store: &Store<K>) -> bool {
    store.wait_until_ready().now_or_never().is_some_and(|r| r.is_ok())
}

/// The workloads of a store whose metadata `keep` accepts, each as the newest version known (see
/// [`Stores::workloads`]).
fn newest<K: kube::Resource<DynamicType = ()> + 'static>(
    store: &Store<Pruned<K>>,
    kind: WorkloadKind,
    keep: &impl Fn(&ObjectMeta) -> bool,
    seen: &HashMap<(WorkloadKind, ObjectKey), Seen>,
) -> Vec<Result<Workload, ObjectKey>> {
    let stored = store.state_filter(|p| keep(&p.metadata));
    stored
        .iter()
        .map(|p| {
            let (meta, shape) = (&p.metadata, p.shape.as_ref());
            let key = ObjectKey::of(meta);
            let newer = seen.get(&(kind, key.clone())).filter(|s| {
                s.current(meta.resource_version.as_ref())
                    && !(shape.is_some() && meta.resource_version.as_ref() == s.version())
            });
            match (newer, shape) {
                (Some(s), _) => Ok(Workload::from_shape(kind, s.metadata.clone(), &s.shape)),
                (None, Some(shape)) => Ok(Workload::from_shape(kind, meta.clone(), shape)),
                (None, None) => Err(key),
            }
        })
        .collect()
}

fn version_in<K: kube::Resource<DynamicType = ()> + 'static>(
    store: &Store<Pruned<K>>,
    key: &ObjectKey,
) -> Option<String> {
    store.get(&ObjectRef::new(&key.name).within(&key.namespace)).and_then(|p| p.metadata.resource_version.clone())
}

impl Stores {
    pub fn new(
        deployments: Store<Pruned<Deployment>>,
        statefulsets: Store<Pruned<StatefulSet>>,
        daemonsets: Store<Pruned<DaemonSet>>,
        namespaces: Store<Meta<Namespace>>,
    ) -> Self {
        Self { deployments, statefulsets, daemonsets, namespaces, seen: Mutex::default(), writing: Mutex::default() }
    }

    /// Has every store taken in its first list? Until then a reconcile lists the cluster as before.
    pub fn ready(&self) -> bool {
        ready(&self.deployments) && ready(&self.statefulsets) && ready(&self.daemonsets) && ready(&self.namespaces)
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
        match kind {
            WorkloadKind::Deployment => version_in(&self.deployments, key),
            WorkloadKind::StatefulSet => version_in(&self.statefulsets, key),
            WorkloadKind::DaemonSet => version_in(&self.daemonsets, key),
        }
    }

    /// The workloads of `kind` whose metadata `keep` accepts, each as the newest version known: the
    /// store's, or what was seen newer. `Err` holds the key of those known by their metadata alone
    /// (to be read).
    pub fn workloads(
        &self,
        kind: WorkloadKind,
        keep: impl Fn(&ObjectMeta) -> bool,
    ) -> Vec<Result<Workload, ObjectKey>> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match kind {
            WorkloadKind::Deployment => newest(&self.deployments, kind, &keep, &seen),
            WorkloadKind::StatefulSet => newest(&self.statefulsets, kind, &keep, &seen),
            WorkloadKind::DaemonSet => newest(&self.daemonsets, kind, &keep, &seen),
        }
    }

    /// Remembers a workload read, newer than the store's.
    pub fn saw(&self, workload: &Workload) {
        self.remember(workload, None);
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
            metadata: pruned_metadata(&workload.metadata),
            shape: workload.shape(),
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
        let key = (kind, ObjectKey::of(meta));
        if let Some(w) = self.writing.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Some(w.policy.clone());
        }
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let s = seen.get(&key)?;
        (meta.resource_version.is_some() && s.version() == meta.resource_version.as_ref())
            .then(|| s.written_by.clone())
            .flatten()
    }

    /// What `policy`'s workload writes tell the stores.
    pub fn writes_of<'a>(&'a self, policy: &'a str) -> Writes<'a> {
        Writes { stores: self, policy, raced: AtomicBool::new(false) }
    }

    /// Forgets what the stores have caught up with (or what is gone): only versions newer than the
    /// store's, and the last write of each workload until it changes again, are kept.
    pub fn forget_stale(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|(kind, key), s| {
            let stored = self.version(*kind, key);
            stored.is_some() && s.current(stored.as_ref())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn stores() -> (Stores, Writer<Pruned<Deployment>>) {
        let (deployments, writer) = reflector::store();
        let stores = Stores::new(deployments, reflector::store().0, reflector::store().0, reflector::store().0);
        (stores, writer)
    }

    fn rolled_out(stores: &Stores) -> Vec<Result<bool, String>> {
        let all = stores.workloads(WorkloadKind::Deployment, |_| true);
        all.into_iter().map(|w| w.map(|w| w.rolled_out).map_err(|k| k.name)).collect()
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
        stores.saw(&workload("cart", "1", true));
        assert_eq!(rolled_out(&stores), [Ok(true)]);
        assert_eq!(stores.written_by(WorkloadKind::Deployment, &meta("cart", "1", &[])), None, "read, not written");
        writer.apply_watcher_event(&Event::Apply(Pruned::new(meta("cart", "2", &[]), None)));
        assert_eq!(rolled_out(&stores), [Err("cart".to_string())], "changed since: read again");
        stores.forget_stale();
        assert!(stores.seen.lock().unwrap().is_empty());
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
