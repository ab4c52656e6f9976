//! Which watch events of a workload wake the policies that concern it.
//!
//! During a rollout the controller manager updates the status of every rolling workload many times a
//! second; each update is a watch event, and reconciling the policy for each would observe every
//! target again and again. A policy only needs to hear of a workload that appeared or was deleted, or
//! whose labels (selection, ownership), annotations (the layers' records) or generation (its spec:
//! an injection made, or removed by someone else) changed, or whose rollout finished or stopped being
//! finished (a health gate waits for exactly that: the next batch starts when the controller manager
//! reports the last one rolled out, not at the next poll). A rollout in flight is also polled
//! (`Settings::poll`, for what no event says: a progress deadline passing), and a converged policy is
//! looked at again every `Settings::resync`.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::api::{DynamicObject, PartialObjectMeta};
use kube::runtime::watcher::{self, Event};

use crate::lean::{Meta, Pruned};

/// What of an object's status a policy waits for, beyond its metadata.
pub trait Progress {
    /// A workload's rollout state as the health gates read it (`None`: nothing beyond the metadata).
    fn progress(&self) -> Option<(bool, bool)> {
        None
    }
}

impl<K> Progress for Pruned<K> {
    fn progress(&self) -> Option<(bool, bool)> {
        self.shape.as_ref().map(|s| (s.rolled_out, s.available))
    }
}

impl<K> Progress for Meta<K> {}

impl Progress for PartialObjectMeta<DynamicObject> {}

/// Hash of what a policy reacts to on an object.
fn fingerprint<K: Resource + Progress>(obj: &K) -> u64 {
    let meta = obj.meta();
    let mut hasher = DefaultHasher::new();
    (meta.generation, &meta.labels, &meta.annotations, obj.progress()).hash(&mut hasher);
    hasher.finish()
}

/// An object's namespace and name, hashed: the filter remembers every object of a watch (a big
/// cluster's non-targets too), so it keeps 8 bytes of each, not two strings. Two objects whose keys
/// collide (a chance of one in 2^64 per pair) would share a fingerprint: an event of one whose
/// fingerprint equals the other's last would not wake its policies (the resync still comes).
type Key = u64;

fn key<K: Resource>(obj: &K) -> Key {
    let mut hasher = DefaultHasher::new();
    (&obj.meta().namespace, &obj.meta().name).hash(&mut hasher);
    hasher.finish()
}

/// What the filter remembers: the fingerprint of every object seen, and those of a relist in progress.
#[derive(Default)]
struct Seen {
    current: HashMap<Key, u64>,
    relisting: Option<HashMap<Key, u64>>,
}

impl Seen {
    /// The object, if a policy should hear of this event.
    fn relevant<K: Resource + Progress>(&mut self, event: Event<K>) -> Option<K> {
        match event {
            Event::Apply(obj) => {
                let print = fingerprint(&obj);
                (self.current.insert(key(&obj), print) != Some(print)).then_some(obj)
            }
            Event::Delete(obj) => {
                self.current.remove(&key(&obj));
                Some(obj)
            }
            Event::Init => {
                self.relisting = Some(HashMap::new());
                None
            }
            Event::InitApply(obj) => {
                let print = fingerprint(&obj);
                let changed = self.current.get(&key(&obj)) != Some(&print);
                self.relisting.get_or_insert_default().insert(key(&obj), print);
                changed.then_some(obj)
            }
            Event::InitDone => {
                // Objects gone while the watch was down are forgotten (their policies' resync sees it).
                if let Some(relisted) = self.relisting.take() {
                    self.current = relisted;
                }
                None
            }
        }
    }
}

/// What of a policy itself wakes its reconcile: its spec (generation), labels, annotations, finalizers
/// and deletion. Not its status: crosstrace writes that itself (a rollout writes it every few seconds),
/// and a reconcile woken by its own status write observes every target again while a change waits
/// behind it. A status written by someone else does not choose what crosstrace writes either: the next
/// status is built from the last one crosstrace wrote (`reconcile::last_status`).
pub fn policy_changed<K: Resource>(policy: &K) -> Option<u64> {
    let meta = policy.meta();
    let mut hasher = DefaultHasher::new();
    (meta.generation, &meta.labels, &meta.annotations, &meta.finalizers, meta.deletion_timestamp.is_some())
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// The objects of a watch a policy should hear of (see the module documentation); errors pass through.
pub fn relevant<K: Resource + Progress>(
    events: impl Stream<Item = Result<Event<K>, watcher::Error>>,
) -> impl Stream<Item = Result<K, watcher::Error>> {
    let mut seen = Seen::default();
    events.filter_map(move |event| {
        let out = match event {
            Ok(event) => seen.relevant(event).map(Ok),
            Err(error) => Some(Err(error)),
        };
        std::future::ready(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::workloads::Shape;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn deployment(name: &str, generation: i64, rv: &str, label: &str) -> Pruned<Deployment> {
        let metadata = ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            generation: Some(generation),
            resource_version: Some(rv.into()),
            labels: Some(BTreeMap::from([("tier".to_string(), label.to_string())])),
            ..Default::default()
        };
        Pruned::new(metadata, Some(Shape { rolled_out: true, available: true, ..Default::default() }))
    }

    fn rolling(mut d: Pruned<Deployment>) -> Pruned<Deployment> {
        d.shape.as_mut().unwrap().rolled_out = false;
        d
    }

    fn names(events: Vec<Event<Pruned<Deployment>>>) -> Vec<String> {
        let stream = relevant(futures::stream::iter(events.into_iter().map(Ok)));
        futures::executor::block_on(stream.map(|r| r.unwrap().metadata.name.unwrap()).collect())
    }

    #[test]
    fn status_churn_is_dropped_and_spec_label_and_delete_events_pass() {
        let events = vec![
            Event::Init,
            Event::InitApply(deployment("a", 1, "1", "web")),
            Event::InitApply(deployment("b", 1, "2", "web")),
            Event::InitDone,
            Event::Apply(deployment("a", 1, "3", "web")), // status only
            Event::Apply(deployment("a", 2, "4", "web")), // spec changed
            Event::Apply(deployment("b", 1, "5", "api")), // label changed
            Event::Apply(deployment("b", 1, "6", "api")), // status only
            Event::Delete(deployment("a", 2, "7", "web")),
            Event::Apply(deployment("a", 1, "8", "web")), // created again
        ];
        assert_eq!(names(events), ["a", "b", "a", "b", "a", "a"]);
    }

    #[test]
    fn a_relist_passes_only_what_changed_meanwhile() {
        let events = vec![
            Event::Apply(deployment("a", 1, "1", "web")),
            Event::Apply(deployment("b", 1, "2", "web")),
            Event::Init,
            Event::InitApply(deployment("a", 1, "3", "web")),
            Event::InitApply(deployment("b", 2, "4", "web")),
            Event::InitDone,
            Event::Apply(deployment("a", 1, "5", "web")),
        ];
        assert_eq!(names(events), ["a", "b", "b"]);
    }

    #[test]
    fn a_rollout_finishing_passes_and_its_progress_does_not() {
        let events = vec![
            Event::Apply(deployment("a", 1, "1", "web")),
            Event::Apply(rolling(deployment("a", 2, "2", "web"))), // spec changed (an injection)
            Event::Apply(rolling(deployment("a", 2, "3", "web"))), // replicas coming up
            Event::Apply(deployment("a", 2, "4", "web")),          // rolled out: the health gate opens
            Event::Apply(deployment("a", 2, "5", "web")),          // status only
        ];
        assert_eq!(names(events), ["a", "a", "a"]);
    }

    #[test]
    fn a_policys_own_status_writes_do_not_wake_it_and_its_spec_metadata_and_deletion_do() {
        use crate::api::{TracingPolicy, TracingPolicyStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use kube::ResourceExt;
        use kube::runtime::WatchStreamExt;
        let mut policy: TracingPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "crosstrace.dev/v1alpha1", "kind": "TracingPolicy",
            "metadata": {"name": "shop", "namespace": "shop", "uid": "u1", "generation": 1, "resourceVersion": "1"},
            "spec": {}
        }))
        .unwrap();
        let mut versions = vec![];
        let mut next = |policy: &mut TracingPolicy, change: &dyn Fn(&mut TracingPolicy), wakes: bool| {
            change(policy);
            let version = policy.metadata.resource_version.as_ref().unwrap().parse::<u32>().unwrap() + 1;
            policy.metadata.resource_version = Some(version.to_string());
            versions.push((policy.clone(), wakes));
        };
        next(&mut policy, &|_| {}, true); // first seen
        next(
            &mut policy,
            &|p| p.status = Some(TracingPolicyStatus { observed_generation: Some(1), ..Default::default() }),
            false,
        );
        next(&mut policy, &|p| p.metadata.generation = Some(2), true); // spec changed
        next(&mut policy, &|p| p.status.as_mut().unwrap().observed_generation = Some(2), false);
        next(&mut policy, &|p| drop(p.labels_mut().insert("team".into(), "a".into())), true);
        next(&mut policy, &|p| drop(p.annotations_mut().insert("note".into(), "x".into())), true);
        next(&mut policy, &|p| p.finalizers_mut().push("crosstrace.dev/revert".into()), true);
        next(&mut policy, &|p| p.metadata.deletion_timestamp = Some(Time(Default::default())), true);
        let expected: Vec<String> =
            versions.iter().filter(|(_, wakes)| *wakes).map(|(p, _)| p.resource_version().unwrap()).collect();
        let stream = futures::stream::iter(versions.into_iter().map(|(p, _)| Ok(p)))
            .predicate_filter(policy_changed, Default::default());
        let woken: Vec<String> =
            futures::executor::block_on(stream.map(|r| r.unwrap().resource_version().unwrap()).collect());
        assert_eq!(woken, expected);
    }
}
