//! Which watch events of a workload wake the policies that concern it.
//!
//! During a rollout the controller manager updates the status of every rolling workload many times a
//! second; each update is a watch event, and reconciling the policy for each would observe every
//! target again and again. A policy only needs to hear of a workload that appeared or was deleted, or
//! whose labels (selection, ownership), annotations (the layers' records) or generation (its spec:
//! an injection made, or removed by someone else) changed. A rollout in flight is polled instead
//! (`Settings::poll`), and a converged policy is looked at again every `Settings::resync`.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::watcher::{self, Event};

/// Hash of what a policy reacts to on an object.
fn fingerprint<K: Resource>(obj: &K) -> u64 {
    let meta = obj.meta();
    let mut hasher = DefaultHasher::new();
    (meta.generation, &meta.labels, &meta.annotations).hash(&mut hasher);
    hasher.finish()
}

type Key = (Option<String>, Option<String>);

fn key<K: Resource>(obj: &K) -> Key {
    (obj.meta().namespace.clone(), obj.meta().name.clone())
}

/// What the filter remembers: the fingerprint of every object seen, and those of a relist in progress.
#[derive(Default)]
struct Seen {
    current: HashMap<Key, u64>,
    relisting: Option<HashMap<Key, u64>>,
}

impl Seen {
    /// The object, if a policy should hear of this event.
    fn relevant<K: Resource>(&mut self, event: Event<K>) -> Option<K> {
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

/// The objects of a watch a policy should hear of (see the module documentation); errors pass through.
pub fn relevant<K: Resource>(
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
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn deployment(name: &str, generation: i64, rv: &str, label: &str) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                generation: Some(generation),
                resource_version: Some(rv.into()),
                labels: Some(BTreeMap::from([("tier".to_string(), label.to_string())])),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn names(events: Vec<Event<Deployment>>) -> Vec<String> {
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
}
