//! Observation of the gateway layer (IO only): which kinds the API server serves, the selected
//! Gateways, the objects their plans read, and the ledger entries of the policy.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DynamicObject, ListParams};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

use super::{
    Class, GATEWAY_GROUP, Kind, LEDGER, Observed, POLICY_LABEL, Provider, Record, Ref, Route, at, gateway_selector,
    owned_name, string_at,
};
use crate::layers::{ObjectKey, ObserveError, PolicyView, ledger_entries};

/// Is this kind served by the API server? A missing API group or version is not an error: the
/// layer reports it.
pub async fn served(client: &Client, kind: Kind) -> Result<bool, kube::Error> {
    Ok(served_of(client, &[kind]).await?.contains(&kind))
}

/// Which of `kinds` the API server serves, with one discovery request per group version.
pub async fn served_of(client: &Client, kinds: &[Kind]) -> Result<BTreeSet<Kind>, kube::Error> {
    let mut by_version: BTreeMap<String, Vec<Kind>> = BTreeMap::new();
    for kind in kinds {
        by_version.entry(kind.api_version()).or_default().push(*kind);
    }
    let mut served = BTreeSet::new();
    for (api_version, kinds) in by_version {
        let resources = match client.list_api_group_resources(&api_version).await {
            Ok(list) => list.resources,
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => return Err(e),
        };
        served.extend(kinds.into_iter().filter(|k| resources.iter().any(|r| r.name == k.plural())));
    }
    Ok(served)
}

fn api(client: &Client, kind: Kind, namespace: &str) -> Api<DynamicObject> {
    let resource = kind.api_resource();
    if namespace.is_empty() {
        Api::all_with(client.clone(), &resource)
    } else {
        Api::namespaced_with(client.clone(), namespace, &resource)
    }
}

/// What observation found beyond the Gateways: whether the Gateway API is served at all.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    pub targets: Vec<Observed>,
    /// The Gateway API is not installed (only reported when the policy asks for `spec.gateway`).
    pub not_installed: bool,
}

/// The Gateways the layer must look at for a policy: those `spec.gateway` selects, and those its ledger
/// entries name (which may have left the selection, or be gone); with everything their plans read.
pub async fn observe(
    client: &Client,
    policy: PolicyView<'_>,
    operator_namespace: &str,
    protected: impl Fn(&str) -> bool,
    claimant: impl Fn(&DynamicObject) -> Option<String>,
) -> Result<Observation, ObserveError> {
    let ledger = Api::<ConfigMap>::namespaced(client.clone(), operator_namespace).get_opt(LEDGER).await?;
    let entries = ledger_entries::<Record>(ledger.as_ref());
    let mine: Vec<(&String, &Record)> = entries
        .iter()
        .filter_map(|(uid, r)| r.as_ref().ok().map(|r| (uid, r)))
        .filter(|(_, r)| r.policy == policy.name)
        .collect();
    let wanted = policy.spec.gateway.as_ref().filter(|_| !policy.deleting);
    if wanted.is_none() && mine.is_empty() {
        return Ok(Observation::default());
    }
    use Kind::*;
    let installed =
        served_of(client, &[Gateway, HTTPRoute, GRPCRoute, EnvoyProxy, NginxProxy, ObservabilityPolicy, Telemetry])
            .await?;
    if !installed.contains(&Gateway) {
        // No Gateway API: nothing can be selected, and nothing recorded can be reverted but the ledger.
        let targets = mine
            .iter()
            .map(|(uid, r)| Observed {
                key: r.gateway.clone(),
                uid: (*uid).clone(),
                record: Ok(Some((*r).clone())),
                ..Default::default()
            })
            .collect();
        return Ok(Observation { targets, not_installed: wanted.is_some() });
    }
    let mut found: BTreeMap<String, Observed> = BTreeMap::new();
    if let Some(spec) = wanted {
        let selector = gateway_selector(spec).map_err(ObserveError::selector("spec.gateway.selector"))?;
        let params = ListParams::default().labels_from(&selector);
        for g in api(client, Kind::Gateway, &spec.namespace).list(&params).await?.items {
            if protected(g.metadata.namespace.as_deref().unwrap_or_default()) {
                continue;
            }
            let uid = g.uid().unwrap_or_default();
            let claimed_by = claimant(&g);
            let key = ObjectKey::of(&g.metadata);
            found.insert(
                uid.clone(),
                Observed { key, uid, gateway: Some(g), selected: true, claimed_by, ..Default::default() },
            );
        }
    }
    for (uid, record) in &mine {
        if found.contains_key(*uid) {
            continue;
        }
        let gateway = api(client, Kind::Gateway, &record.gateway.namespace)
            .get_opt(&record.gateway.name)
            .await?
            .filter(|g| g.uid().as_deref() == Some(uid.as_str()));
        let key = record.gateway.clone();
        found.insert((*uid).clone(), Observed { key, uid: (*uid).clone(), gateway, ..Default::default() });
    }
    let mut classes: BTreeMap<String, Option<Class>> = BTreeMap::new();
    let mut routes: Option<Vec<(Kind, DynamicObject)>> = None;
    for (uid, target) in found.iter_mut() {
        target.installed = installed.clone();
        target.record = match entries.get(uid) {
            Some(Ok(r)) if r.gateway == target.key => Ok(Some(r.clone())),
            Some(Ok(_)) | None => Ok(None),
            Some(Err(e)) => Err(e.clone()),
        };
        let recorded: Vec<Ref> = target
            .record
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .map(|r| r.created.iter().cloned().chain(r.merged.iter().map(|m| m.target.clone())).collect())
            .unwrap_or_default();
        let mut refs: BTreeSet<Ref> = recorded.into_iter().collect();
        if let Some(g) = &target.gateway {
            let class_name = string_at(&g.data, &["spec", "gatewayClassName"]).unwrap_or_default().to_string();
            if !classes.contains_key(&class_name) {
                let class = api(client, Kind::GatewayClass, "").get_opt(&class_name).await?.map(|c| Class {
                    controller_name: string_at(&c.data, &["spec", "controllerName"]).unwrap_or_default().into(),
                    parameters_ref: at(&c.data, &["spec", "parametersRef"]).cloned(),
                });
                classes.insert(class_name.clone(), class);
            }
            target.class = classes[&class_name].clone();
            let provider = target.class.as_ref().and_then(|c| Provider::of(&c.controller_name));
            if let Some(kind) = provider.and_then(Provider::parameters) {
                if let Some(name) = string_at(&g.data, &["spec", "infrastructure", "parametersRef", "name"]) {
                    refs.insert(Ref::new(kind, &target.key.namespace, name));
                }
                refs.insert(Ref::new(kind, &target.key.namespace, &owned_name(&target.key.name)));
            }
            if provider == Some(Provider::Istio) {
                refs.insert(Ref::new(Kind::Telemetry, &target.key.namespace, &owned_name(&target.key.name)));
            }
            if provider == Some(Provider::NginxGatewayFabric) && target.selected {
                if routes.is_none() {
                    let mut all = Vec::new();
                    for kind in [Kind::HTTPRoute, Kind::GRPCRoute] {
                        if installed.contains(&kind) {
                            let items = api(client, kind, "").list(&ListParams::default()).await?.items;
                            all.extend(items.into_iter().map(|r| (kind, r)));
                        }
                    }
                    routes = Some(all);
                }
                target.routes = routes
                    .iter()
                    .flatten()
                    .filter(|(_, r)| {
                        attached(r, &target.key) && !protected(r.metadata.namespace.as_deref().unwrap_or_default())
                    })
                    .map(|(kind, r)| Route { kind: *kind, key: ObjectKey::of(&r.metadata) })
                    .collect();
                target.routes.sort();
                for route in &target.routes {
                    refs.insert(Ref::new(
                        Kind::ObservabilityPolicy,
                        &route.key.namespace,
                        &owned_name(&route.key.name),
                    ));
                }
                // Others' ObservabilityPolicies on the same routes (GEP-713): reported, never fought.
                let namespaces: BTreeSet<&str> = target.routes.iter().map(|r| r.key.namespace.as_str()).collect();
                for namespace in namespaces {
                    let names: BTreeSet<(String, &str)> = target
                        .routes
                        .iter()
                        .filter(|r| r.key.namespace == namespace)
                        .map(|r| (format!("{:?}", r.kind), r.key.name.as_str()))
                        .collect();
                    let found = others(client, Kind::ObservabilityPolicy, namespace, |p| {
                        at(&p.data, &["spec", "targetRefs"]).and_then(Value::as_array).is_some_and(|refs| {
                            refs.iter().any(|r| {
                                let kind = string_at(r, &["kind"]).unwrap_or_default().to_string();
                                names.contains(&(kind, string_at(r, &["name"]).unwrap_or_default()))
                            })
                        })
                    })
                    .await?;
                    target.others.extend(found);
                }
            }
            if provider == Some(Provider::Istio) && installed.contains(&Kind::Telemetry) {
                target.others = others(client, Kind::Telemetry, &target.key.namespace, |t| {
                    at(&t.data, &["spec", "targetRefs"]).and_then(Value::as_array).is_some_and(|refs| {
                        refs.iter().any(|r| {
                            string_at(r, &["kind"]) == Some("Gateway")
                                && string_at(r, &["name"]) == Some(&target.key.name)
                        })
                    })
                })
                .await?;
            }
        }
        for r in refs {
            if !installed.contains(&r.kind) {
                continue;
            }
            if let Some(object) = api(client, r.kind, &r.namespace).get_opt(&r.name).await? {
                target.objects.insert(r, object);
            }
        }
    }
    Ok(Observation { targets: found.into_values().collect(), not_installed: false })
}

/// Objects of `kind` in `namespace` crosstrace did not create that satisfy `targets`.
async fn others(
    client: &Client,
    kind: Kind,
    namespace: &str,
    targets: impl Fn(&DynamicObject) -> bool,
) -> Result<Vec<Ref>, kube::Error> {
    let items = api(client, kind, namespace).list(&ListParams::default()).await?.items;
    Ok(items
        .iter()
        .filter(|o| !o.labels().contains_key(POLICY_LABEL) && targets(o))
        .map(|o| Ref::new(kind, namespace, &o.name_any()))
        .collect())
}

/// Does a route's `spec.parentRefs` name this Gateway?
pub fn attached(route: &DynamicObject, gateway: &ObjectKey) -> bool {
    let route_namespace = route.metadata.namespace.as_deref().unwrap_or_default();
    let parents = at(&route.data, &["spec", "parentRefs"]).and_then(Value::as_array);
    parents.into_iter().flatten().any(|p| {
        let kind = string_at(p, &["kind"]).unwrap_or("Gateway");
        let group = string_at(p, &["group"]).unwrap_or(GATEWAY_GROUP);
        let namespace = string_at(p, &["namespace"]).unwrap_or(route_namespace);
        kind == "Gateway"
            && group == GATEWAY_GROUP
            && namespace == gateway.namespace
            && string_at(p, &["name"]) == Some(&gateway.name)
    })
}
