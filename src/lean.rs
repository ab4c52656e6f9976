//! Objects read without `metadata.managedFields`.
//!
//! The API server sends every object with its field ownership (`managedFields`), and `ObjectMeta`
//! parses it into a tree of JSON values: for a workload the operator injected, that tree is most of
//! what a list allocates (measured with heaptrack: ~60% of the controller's peak heap at 300
//! targets), and nothing here reads it. [`Meta<K>`] (metadata only, like `PartialObjectMeta<K>`) and
//! [`Lean<K>`] (the whole object) skip it while parsing, so it is never allocated; they keep the
//! resource's URL, so `Api<Meta<Deployment>>` and `Api<Lean<Deployment>>` work as `Api<Deployment>`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::marker::PhantomData;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetStatus, Deployment, DeploymentSpec, DeploymentStatus, StatefulSet,
    StatefulSetSpec, StatefulSetStatus,
};
use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// Every field of `ObjectMeta` but `managedFields` (which serde then skips without allocating).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaWithoutManagedFields {
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    deletion_timestamp: Option<Time>,
    finalizers: Option<Vec<String>>,
    generate_name: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    name: Option<String>,
    namespace: Option<String>,
    owner_references: Option<Vec<OwnerReference>>,
    resource_version: Option<String>,
    self_link: Option<String>,
    uid: Option<String>,
}

fn without_managed_fields<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = MetaWithoutManagedFields::deserialize(d)?;
    Ok(ObjectMeta {
        annotations: m.annotations,
        creation_timestamp: m.creation_timestamp,
        deletion_grace_period_seconds: m.deletion_grace_period_seconds,
        deletion_timestamp: m.deletion_timestamp,
        finalizers: m.finalizers,
        generate_name: m.generate_name,
        generation: m.generation,
        labels: m.labels,
        managed_fields: None,
        name: m.name,
        namespace: m.namespace,
        owner_references: m.owner_references,
        resource_version: m.resource_version,
        self_link: m.self_link,
        uid: m.uid,
    })
}

/// The metadata of a `K`, requested metadata-only, without `managedFields`.
#[derive(Deserialize)]
#[serde(bound(deserialize = ""))]
pub struct Meta<K> {
    #[serde(deserialize_with = "without_managed_fields", default)]
    pub metadata: ObjectMeta,
    #[serde(skip)]
    kind: PhantomData<fn() -> K>,
}

// By hand: `K` itself needs to be neither `Clone` nor `Debug`.
impl<K> Clone for Meta<K> {
    fn clone(&self) -> Self {
        Self { metadata: self.metadata.clone(), kind: PhantomData }
    }
}

impl<K> Debug for Meta<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta").field("metadata", &self.metadata).finish()
    }
}

/// Implements `Resource` for a wrapper of `K` by delegating to `K` (same URL, kind, scope).
macro_rules! delegate_resource {
    ($wrapper:ident, $bound:path, metadata_api = $metadata_api:expr) => {
        impl<K: $bound> Resource for $wrapper<K> {
            type DynamicType = ();
            type Scope = K::Scope;

            fn kind(dt: &()) -> Cow<'_, str> {
                K::kind(dt)
            }
            fn group(dt: &()) -> Cow<'_, str> {
                K::group(dt)
            }
            fn version(dt: &()) -> Cow<'_, str> {
                K::version(dt)
            }
            fn plural(dt: &()) -> Cow<'_, str> {
                K::plural(dt)
            }
            fn metadata_api() -> bool {
                $metadata_api
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A kind of object as its three parts, so that [`Lean<K>`] can parse the parts and rebuild a `K`.
pub trait Parts: Resource<DynamicType = ()> + Sized {
    type Spec: DeserializeOwned + Clone + Debug;
    type Status: DeserializeOwned + Clone + Debug;
    fn assemble(metadata: ObjectMeta, spec: Option<Self::Spec>, status: Option<Self::Status>) -> Self;
}

macro_rules! parts {
    ($kind:ty, $spec:ty, $status:ty) => {
        impl Parts for $kind {
            type Spec = $spec;
            type Status = $status;
            fn assemble(metadata: ObjectMeta, spec: Option<$spec>, status: Option<$status>) -> Self {
                Self { metadata, spec, status }
            }
        }
    };
}

parts!(Deployment, DeploymentSpec, DeploymentStatus);
parts!(StatefulSet, StatefulSetSpec, StatefulSetStatus);
parts!(DaemonSet, DaemonSetSpec, DaemonSetStatus);
parts!(Pod, PodSpec, PodStatus);
parts!(Node, NodeSpec, NodeStatus);

/// A whole `K` without `managedFields`.
#[derive(Clone, Debug, Deserialize)]
#[serde(bound(deserialize = ""))]
pub struct Lean<K: Parts> {
    #[serde(deserialize_with = "without_managed_fields", default)]
    pub metadata: ObjectMeta,
    pub spec: Option<K::Spec>,
    pub status: Option<K::Status>,
}

impl<K: Parts> Lean<K> {
    pub fn into_inner(self) -> K {
        K::assemble(self.metadata, self.spec, self.status)
    }
}

/// A workload as a store keeps it: pruned metadata and, for a workload some policy may select (or
/// that carries the workload layer's marks), its [`Shape`](crate::layers::workloads::Shape). Built
/// from the watch's objects (it parses as its metadata alone, for the APIs that ask it to parse).
#[derive(Deserialize)]
#[serde(bound(deserialize = ""))]
pub struct Pruned<K> {
    #[serde(deserialize_with = "without_managed_fields", default)]
    pub metadata: ObjectMeta,
    #[serde(skip)]
    pub shape: Option<crate::layers::workloads::Shape>,
    #[serde(skip)]
    kind: PhantomData<fn() -> K>,
}

impl<K> Pruned<K> {
    pub fn new(metadata: ObjectMeta, shape: Option<crate::layers::workloads::Shape>) -> Self {
        Self { metadata, shape, kind: PhantomData }
    }
}

impl<K> Clone for Pruned<K> {
    fn clone(&self) -> Self {
        Self::new(self.metadata.clone(), self.shape.clone())
    }
}

impl<K> Debug for Pruned<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pruned").field("metadata", &self.metadata).field("shape", &self.shape).finish()
    }
}

/// A node as the network layer's store keeps it: its pruned metadata and its address for sFlow (all
/// a correlating policy reads of its status), not the whole node (images, conditions, heartbeats).
/// Built from the watch's nodes (it parses as its metadata alone, for the APIs that ask it to parse).
#[derive(Deserialize)]
#[serde(bound(deserialize = ""))]
pub struct Addressed<K> {
    #[serde(deserialize_with = "without_managed_fields", default)]
    pub metadata: ObjectMeta,
    #[serde(skip)]
    pub address: Option<String>,
    #[serde(skip)]
    kind: PhantomData<fn() -> K>,
}

impl<K> Addressed<K> {
    pub fn new(metadata: ObjectMeta, address: Option<String>) -> Self {
        Self { metadata, address, kind: PhantomData }
    }
}

impl<K> Clone for Addressed<K> {
    fn clone(&self) -> Self {
        Self::new(self.metadata.clone(), self.address.clone())
    }
}

impl<K> Debug for Addressed<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Addressed").field("metadata", &self.metadata).field("address", &self.address).finish()
    }
}

delegate_resource!(Meta, Resource<DynamicType = ()>, metadata_api = true);
delegate_resource!(Addressed, Resource<DynamicType = ()>, metadata_api = false);
delegate_resource!(Pruned, Resource<DynamicType = ()>, metadata_api = false);
delegate_resource!(Lean, Parts, metadata_api = false);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment_json() -> serde_json::Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "u1", "resourceVersion": "7", "generation": 3,
                "labels": {"app": "web"}, "annotations": {"a": "b"}, "finalizers": ["f"],
                "creationTimestamp": "2026-11-22T00:00:00Z",
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o", "uid": "u0"}],
                "managedFields": [{"manager": "crosstrace", "operation": "Apply", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}}}}}}}}],
            },
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"spec": {"containers": [{"name": "app", "image": "app:1"}]}}},
            "status": {"observedGeneration": 3, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1},
        })
    }

    #[test]
    fn a_lean_object_is_the_object_without_managed_fields() {
        let mut full: Deployment = serde_json::from_value(deployment_json()).unwrap();
        assert!(full.metadata.managed_fields.is_some());
        let lean: Lean<Deployment> = serde_json::from_value(deployment_json()).unwrap();
        full.metadata.managed_fields = None;
        assert_eq!(lean.into_inner(), full);
    }

    #[test]
    fn meta_is_the_metadata_without_managed_fields() {
        let full: Deployment = serde_json::from_value(deployment_json()).unwrap();
        let meta: Meta<Deployment> = serde_json::from_value(deployment_json()).unwrap();
        assert_eq!(meta.metadata, ObjectMeta { managed_fields: None, ..full.metadata });
    }

    #[test]
    fn wrappers_keep_the_resource_url_and_meta_asks_for_metadata_only() {
        assert_eq!(Meta::<Deployment>::url_path(&(), Some("shop")), Deployment::url_path(&(), Some("shop")));
        assert_eq!(Lean::<Deployment>::url_path(&(), None), Deployment::url_path(&(), None));
        assert_eq!(Meta::<Deployment>::kind(&()), "Deployment");
        assert!(Meta::<Deployment>::metadata_api());
        assert!(!Lean::<StatefulSet>::metadata_api());
    }
}
