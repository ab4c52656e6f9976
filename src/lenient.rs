//! Lenient watches: one object that cannot be read never stops the others.
//!
//! kube's typed watcher fails a whole list when a single object does not deserialize (an integer wider
//! than its field, stored while the CRD was looser): the watch retries forever and nothing at all is
//! reconciled. Here the raw objects are watched and each is read as its type on its own. The ones that
//! read flow on as ordinary typed watch events (a reflector store, a `Controller`, the agent's loop
//! take them as they are); one that cannot be read is handed on as [`Unreadable`], naming the field,
//! to be reported on itself and skipped.

use std::future;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::api::{NodeTracing, TracingPolicy};

/// An object of a watch that cannot be read as its type.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {name} cannot be read at {field}")]
pub struct Unreadable {
    /// `apiVersion` of the type it should have been.
    pub api_version: String,
    /// `kind` of the type it should have been.
    pub kind: String,
    pub name: String,
    /// Where reading stopped, e.g. `spec.network.ipfix.obsDomainId` (`.` for the object itself).
    pub field: String,
    /// The object as the API server sent it.
    pub object: DynamicObject,
    #[source]
    pub source: serde_json::Error,
}

impl Unreadable {
    /// What is wrong, for people: the field and what the type expected there.
    pub fn message(&self) -> String {
        format!("{}: {}", self.field, self.source)
    }
}

/// Reads a raw object as `K`, or says which field could not be read and why.
pub fn read<K>(object: DynamicObject) -> Result<K, Box<Unreadable>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    let unreadable = |object: DynamicObject, field: String, source| {
        Box::new(Unreadable {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            name: object.name_any(),
            field,
            object,
            source,
        })
    };
    let value = match serde_json::to_value(&object) {
        Ok(value) => value,
        Err(source) => return Err(unreadable(object, ".".into(), source)),
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        unreadable(object, field, e.into_inner())
    })
}

/// A typed object that holds only the metadata of one that could not be read. Stores and watch
/// triggers go by name, so this is enough to let them forget a deleted object whose last state could
/// not be read (while its earlier, readable state may still be held).
pub trait Placeholder {
    fn placeholder(metadata: ObjectMeta) -> Self;
}

impl Placeholder for TracingPolicy {
    fn placeholder(metadata: ObjectMeta) -> Self {
        Self { metadata, spec: Default::default(), status: None }
    }
}

impl Placeholder for NodeTracing {
    fn placeholder(metadata: ObjectMeta) -> Self {
        Self { metadata, spec: Default::default(), status: None }
    }
}

/// A watch event of raw objects, read as `K`.
#[derive(Debug)]
pub enum Seen<K> {
    /// The event, its object (if any) read as `K`; a deleted object that cannot be read comes as its
    /// [`Placeholder`].
    Event(watcher::Event<K>),
    /// An object was listed, added or changed, and cannot be read: it is left out of the typed events.
    Unreadable(Box<Unreadable>),
}

/// Reads the object of one raw watch event.
pub fn seen<K>(event: watcher::Event<DynamicObject>) -> Seen<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Placeholder,
{
    use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
    match event {
        Init => Seen::Event(Init),
        InitDone => Seen::Event(InitDone),
        InitApply(object) => read(object).map_or_else(Seen::Unreadable, |o| Seen::Event(InitApply(o))),
        Apply(object) => read(object).map_or_else(Seen::Unreadable, |o| Seen::Event(Apply(o))),
        Delete(object) => Seen::Event(Delete(read(object).unwrap_or_else(|u| K::placeholder(u.object.metadata)))),
    }
}

/// Watches every `K` (cluster-wide) as raw objects and reads each one on its own.
pub fn watch<K>(client: Client, config: watcher::Config) -> impl Stream<Item = Result<Seen<K>, watcher::Error>> + Send
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Placeholder + Send + 'static,
{
    let api = Api::<DynamicObject>::all_with(client, &ApiResource::erase::<K>(&()));
    watcher(api, config).map_ok(seen::<K>)
}

/// The typed watch events of a lenient watch; each object that cannot be read goes to `unreadable`
/// instead, and the watch goes on.
pub fn typed<K>(
    seen: impl Stream<Item = Result<Seen<K>, watcher::Error>>,
    mut unreadable: impl FnMut(Box<Unreadable>),
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> {
    seen.filter_map(move |item| {
        future::ready(match item {
            Ok(Seen::Event(event)) => Some(Ok(event)),
            Ok(Seen::Unreadable(u)) => {
                unreadable(u);
                None
            }
            Err(error) => Some(Err(error)),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;
    use serde_json::json;

    fn policy(obs_domain_id: u64) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "crosstrace.dev/v1alpha1",
            "kind": "TracingPolicy",
            "metadata": {"name": format!("p{obs_domain_id}"), "uid": "u1", "generation": 2},
            "spec": {"network": {"ipfix": {"targets": ["10.0.0.5:4739"], "obsDomainId": obs_domain_id}}},
            "status": {"observedGeneration": 1},
        }))
        .unwrap()
    }

    #[test]
    fn a_readable_object_is_read_as_its_type() {
        let p: TracingPolicy = read(policy(u32::MAX.into())).unwrap();
        assert_eq!(p.spec.network.unwrap().ipfix.unwrap().obs_domain_id, u32::MAX);
        assert_eq!(p.status.unwrap().observed_generation, Some(1));
    }

    #[test]
    fn an_integer_wider_than_its_field_names_the_field() {
        let u = read::<TracingPolicy>(policy(4_294_967_296)).unwrap_err();
        assert_eq!(u.field, "spec.network.ipfix.obsDomainId");
        assert_eq!((u.kind.as_str(), u.name.as_str()), ("TracingPolicy", "p4294967296"));
        assert_eq!(u.api_version, "crosstrace.dev/v1alpha1");
        assert!(u.message().starts_with("spec.network.ipfix.obsDomainId: invalid value: integer `4294967296`"));
        assert!(u.message().contains("u32"), "{}", u.message());
        assert_eq!(u.object.metadata.uid.as_deref(), Some("u1"), "the raw object comes along to be reported on");
    }

    #[test]
    fn a_missing_required_field_names_where_it_is_missing() {
        let raw: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "crosstrace.dev/v1alpha1",
            "kind": "NodeTracing",
            "metadata": {"name": "n1"},
            "spec": {"bridges": []},
        }))
        .unwrap();
        let u = read::<NodeTracing>(raw).unwrap_err();
        assert_eq!(u.field, "spec");
        assert!(u.message().contains("nodeName"), "{}", u.message());
    }

    #[test]
    fn a_deleted_unreadable_object_comes_as_a_placeholder_with_its_name() {
        match seen::<TracingPolicy>(watcher::Event::Delete(policy(4_294_967_296))) {
            Seen::Event(watcher::Event::Delete(p)) => {
                assert_eq!(p.name_any(), "p4294967296");
                assert_eq!(p.spec, Default::default());
            }
            other => panic!("expected a typed Delete, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn one_unreadable_object_is_set_aside_and_the_list_goes_on() {
        let raw = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(policy(1))),
            Ok(watcher::Event::InitApply(policy(4_294_967_296))),
            Ok(watcher::Event::InitApply(policy(2))),
            Ok(watcher::Event::InitDone),
        ];
        let mut unreadable = Vec::new();
        let events: Vec<_> =
            typed(stream::iter(raw).map_ok(seen::<TracingPolicy>), |u| unreadable.push(u.name)).collect().await;
        let names: Vec<String> = events
            .into_iter()
            .map(|e| match e.unwrap() {
                watcher::Event::Init => "Init".to_string(),
                watcher::Event::InitApply(p) => p.name_any(),
                watcher::Event::InitDone => "InitDone".to_string(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(names, ["Init", "p1", "p2", "InitDone"]);
        assert_eq!(unreadable, ["p4294967296"]);
    }
}
