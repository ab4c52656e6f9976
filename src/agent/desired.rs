//! What this node's `NodeTracing` asks of the node, followed through the events of the agent's watch
//! (field selector `spec.nodeName`), free of IO so that the rule that removes rows can be tested.
//!
//! The rule: nothing is known, and nothing is done, until the first complete listing is in (an API
//! server out of reach must not wipe a node's export), nor while this node's object cannot be read
//! (it exists, but what it asks is unknown). Otherwise the desire is what the object says, and an
//! object that is absent from the listing, deleted, or being deleted asks for nothing: every row
//! crosstrace owns on the node then goes. An agent that was down while its `NodeTracing` was deleted
//! sees no `Delete` event when it comes back, only a listing without the object, which is why the
//! listing and not the events decides.

use kube::ResourceExt;
use kube::runtime::watcher::Event;

use super::node::Want;
use crate::api::NodeTracing;
use crate::lenient::Seen;

/// This node's `NodeTracing` as the watch has shown it.
#[derive(Clone, Debug)]
pub struct Desired {
    node: String,
    /// The object as last seen; `None` when it does not exist.
    object: Option<NodeTracing>,
    /// A listing in progress: `Some(None)` once it started, `Some(Some(o))` once it showed ours.
    listing: Option<Option<NodeTracing>>,
    /// Whether a complete listing was seen.
    synced: bool,
    /// This node's object exists but cannot be read (until it is listed, changed or deleted again).
    unreadable: bool,
}

impl Desired {
    pub fn new(node: impl Into<String>) -> Self {
        Self { node: node.into(), object: None, listing: None, synced: false, unreadable: false }
    }

    /// Takes one watch event. Returns what the node should export, once it is known (after the first
    /// complete listing, while this node's object can be read; on every event then).
    pub fn observe(&mut self, seen: Seen<NodeTracing>) -> Option<Want> {
        let event = match seen {
            Seen::Event(event) => event,
            Seen::Unreadable(u) => {
                if u.name == self.node {
                    self.unreadable = true;
                }
                return None;
            }
        };
        match event {
            Event::Init => {
                self.listing = Some(None);
                self.unreadable = false;
            }
            Event::InitApply(o) => {
                if self.mine(&o) {
                    self.listing = Some(Some(slim(o)));
                }
            }
            Event::InitDone => {
                // Not in the listing: it does not exist (deleted while nobody watched, or never made).
                self.object = self.listing.take().flatten();
                self.synced = true;
            }
            Event::Apply(o) => {
                if self.mine(&o) {
                    self.object = Some(slim(o));
                    self.unreadable = false;
                }
            }
            Event::Delete(o) => {
                // By name: an object deleted while unreadable comes as a placeholder without a spec.
                if o.name_any() == self.node {
                    self.object = None;
                    self.unreadable = false;
                }
            }
        }
        (self.synced && !self.unreadable).then(|| want_of(self.object.as_ref()))
    }

    /// The object whose status the agent writes: `None` when there is none, or while this node's
    /// object cannot be read (the answer to a status write could not be read either).
    pub fn object(&self) -> Option<&NodeTracing> {
        self.object.as_ref().filter(|_| !self.unreadable)
    }

    /// Takes the object a status write returned (newer than the one seen).
    pub fn written(&mut self, updated: NodeTracing) {
        if self.mine(&updated) {
            self.object = Some(slim(updated));
        }
    }

    /// Whether an object is this node's (the field selector already says so; the name is the contract).
    fn mine(&self, o: &NodeTracing) -> bool {
        o.name_any() == self.node && o.spec.node_name == self.node
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NodeTracingSpec;
    use crate::api::node_tracing::BridgeExport;
    use crate::lenient::{self, Placeholder};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;
    use kube::api::DynamicObject;

    fn tracing(node: &str, generation: i64, bridges: &[&str]) -> NodeTracing {
        let bridges = bridges.iter().map(|b| BridgeExport { bridge: (*b).into(), ..Default::default() }).collect();
        let mut o = NodeTracing::new(node, NodeTracingSpec { node_name: node.into(), bridges });
        o.metadata.generation = Some(generation);
        o
    }

    fn bridges(want: &Want) -> Vec<&str> {
        want.bridges.iter().map(|b| b.bridge.as_str()).collect()
    }

    #[test]
    fn nothing_is_known_before_the_first_complete_listing() {
        let mut d = Desired::new("n1");
        assert_eq!(d.observe(Seen::Event(Event::Init)), None);
        assert_eq!(d.observe(Seen::Event(Event::InitApply(tracing("n1", 2, &["br-int"])))), None);
        // Events before the listing finished do not decide either.
        assert_eq!(d.observe(Seen::Event(Event::Apply(tracing("n1", 3, &["br-int"])))), None);
        let want = d.observe(Seen::Event(Event::InitDone)).unwrap();
        assert_eq!((want.generation, bridges(&want)), (Some(2), vec!["br-int"]));
    }

    #[test]
    fn a_listing_without_the_object_asks_for_nothing() {
        // The agent starts after its NodeTracing was deleted: no Delete event ever comes, only an
        // empty listing, and that must remove everything of crosstrace on the node.
        let mut d = Desired::new("n1");
        assert_eq!(d.observe(Seen::Event(Event::Init)), None);
        assert_eq!(d.observe(Seen::Event(Event::InitDone)), Some(Want::default()));
        assert!(d.object().is_none());

        // The same after a relist (the watch was broken while the object was deleted).
        let mut d = Desired::new("n1");
        d.observe(Seen::Event(Event::Init));
        d.observe(Seen::Event(Event::InitApply(tracing("n1", 4, &["br-int"]))));
        assert_eq!(d.observe(Seen::Event(Event::InitDone)).unwrap().bridges.len(), 1);
        d.observe(Seen::Event(Event::Init));
        assert_eq!(d.observe(Seen::Event(Event::InitDone)), Some(Want::default()));
    }

    #[test]
    fn an_object_without_a_bridge_asks_only_for_the_others() {
        let mut d = Desired::new("n1");
        d.observe(Seen::Event(Event::Init));
        d.observe(Seen::Event(Event::InitApply(tracing("n1", 1, &["br-int", "br-ex"]))));
        assert_eq!(bridges(&d.observe(Seen::Event(Event::InitDone)).unwrap()), vec!["br-int", "br-ex"]);
        let want = d.observe(Seen::Event(Event::Apply(tracing("n1", 2, &["br-ex"])))).unwrap();
        assert_eq!((want.generation, bridges(&want)), (Some(2), vec!["br-ex"]));
    }

    #[test]
    fn other_nodes_objects_are_ignored_and_deletion_asks_for_nothing() {
        let mut d = Desired::new("n1");
        d.observe(Seen::Event(Event::Init));
        d.observe(Seen::Event(Event::InitApply(tracing("n2", 1, &["br-int"]))));
        assert_eq!(d.observe(Seen::Event(Event::InitDone)), Some(Want::default()));
        assert_eq!(d.observe(Seen::Event(Event::Apply(tracing("n2", 2, &["br-int"])))), Some(Want::default()));
        assert_eq!(d.observe(Seen::Event(Event::Apply(tracing("n1", 3, &["br-int"])))).unwrap().generation, Some(3));
        // Another node's deletion does not touch ours; ours does.
        assert_eq!(d.observe(Seen::Event(Event::Delete(tracing("n2", 2, &[])))).unwrap().generation, Some(3));
        assert_eq!(d.observe(Seen::Event(Event::Delete(tracing("n1", 3, &[])))), Some(Want::default()));

        let mut deleting = tracing("n1", 5, &["br-int"]);
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1).unwrap()));
        assert_eq!(d.observe(Seen::Event(Event::Apply(deleting))), Some(Want::default()));
    }

    #[test]
    fn an_unreadable_object_of_this_node_asks_for_nothing_to_change_until_it_can_be_read() {
        let unreadable = |name: &str| {
            let raw: DynamicObject = serde_json::from_value(serde_json::json!({
                "apiVersion": "crosstrace.dev/v1alpha1", "kind": "NodeTracing",
                "metadata": {"name": name}, "spec": {"nodeName": 7},
            }))
            .unwrap();
            Seen::Unreadable(lenient::read::<NodeTracing>(raw).unwrap_err())
        };
        let mut d = Desired::new("n1");
        d.observe(Seen::Event(Event::Init));
        assert_eq!(d.observe(unreadable("n1")), None);
        // Missing from the typed listing, yet it exists: the export stays as it is (no removal).
        assert_eq!(d.observe(Seen::Event(Event::InitDone)), None);
        assert!(d.object().is_none());
        // Readable again: followed again. Another node's unreadable object changes nothing here.
        assert_eq!(d.observe(Seen::Event(Event::Apply(tracing("n1", 2, &["br-int"])))).unwrap().generation, Some(2));
        assert_eq!(d.observe(unreadable("n2")), None);
        assert_eq!(d.observe(Seen::Event(Event::Apply(tracing("n1", 3, &["br-int"])))).unwrap().generation, Some(3));
        // Unreadable again: no status is written to it; then deleted (a placeholder): nothing asked.
        assert_eq!(d.observe(unreadable("n1")), None);
        assert!(d.object().is_none());
        let gone = NodeTracing::placeholder(ObjectMeta { name: Some("n1".into()), ..ObjectMeta::default() });
        assert_eq!(d.observe(Seen::Event(Event::Delete(gone))), Some(Want::default()));
    }

    #[test]
    fn a_written_status_replaces_the_object_without_its_managed_fields() {
        let mut d = Desired::new("n1");
        d.observe(Seen::Event(Event::Init));
        d.observe(Seen::Event(Event::InitDone));
        let mut updated = tracing("n1", 1, &["br-int"]);
        updated.metadata.managed_fields = Some(vec![Default::default()]);
        d.written(updated);
        let o = d.object().unwrap();
        assert!(o.metadata.managed_fields.is_none());
        d.written(tracing("n2", 1, &[]));
        assert_eq!(d.object().unwrap().name_any(), "n1");
    }
}
