//! End to end, on the local real cluster: a crash at every step (the Sieve approach). A policy with all
//! three layers is rolled out, then deleted, by a chain of controllers each of which stops right after
//! its first API write (`CROSSTRACE_E2E_CRASH_AFTER_WRITES=1`, a crash point compiled in with the `e2e`
//! feature only): every write of the rollout and of the revert is followed by a crash and a fresh
//! controller that only knows what it reads from the cluster. The result must be converged, and then
//! exactly reverted: ConfigMap, pod templates, annotations and Open vSwitch rows as before.

#[path = "../support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use crosstrace::api::TracingPolicy;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::agents::{Agents, node_count, node_name, ovs_vsctl};
use support::*;

const ADMIN_PORT: u16 = 18097;

/// Everything the policy may touch, as it is now: ConfigMap data, Deployment templates and crosstrace's
/// annotations and labels, and node 0's exporters.
async fn world(client: &Client, ns: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for d in Api::<Deployment>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap() {
        let ours = |m: Option<&BTreeMap<String, String>>| -> BTreeMap<String, String> {
            m.into_iter()
                .flatten()
                .filter(|(k, _)| k.starts_with("crosstrace.dev/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let marks = json!({"annotations": ours(Some(d.annotations())), "labels": ours(Some(d.labels()))});
        out.insert(
            format!("Deployment/{}", d.name_any()),
            json!({"template": d.spec.unwrap().template, "marks": marks}),
        );
    }
    for cm in Api::<ConfigMap>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap() {
        if cm.name_any() != "kube-root-ca.crt" {
            out.insert(format!("ConfigMap/{}", cm.name_any()), json!({"data": cm.data, "labels": cm.metadata.labels}));
        }
    }
    out.insert("ovs/sflow".into(), json!(ovs_vsctl(0, &["--bare", "--columns=_uuid", "list", "sflow"])));
    out.insert("ovs/br-int.sflow".into(), json!(ovs_vsctl(0, &["get", "bridge", "br-int", "sflow"])));
    out
}

async fn create(client: &Client, ns: &str, object: Value) {
    let d: Deployment = serde_json::from_value(object).unwrap();
    Api::<Deployment>::namespaced(client.clone(), ns).create(&PostParams::default(), &d).await.expect("create");
}

/// Runs controllers that each stop right after their first write, one after the other, until one makes
/// no write for a while and `done` holds; returns how many crashed.
async fn crash_after_every_write<F, Fut>(what: &str, done: F) -> usize
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let kubeconfig = controller_kubeconfig();
    let env = [("CROSSTRACE_E2E_CRASH_AFTER_WRITES", "1")];
    // No leader election (a crashed leader's lease would hold the next one back), one write at a time.
    let args = ["--leader-election", "false", "--write-concurrency", "1"];
    for crashes in 0..200 {
        let mut controller = ControllerProcess::start_with_args(ADMIN_PORT, &kubeconfig, &env, &args);
        let started = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if controller.exited() {
                break;
            }
            if started.elapsed() > Duration::from_secs(8) && done().await {
                return crashes;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{what}: no write and not done after {crashes} crashes\n{}",
                controller.log()
            );
        }
    }
    panic!("{what}: still writing after 200 crashes");
}

#[tokio::test]
async fn a_crash_after_every_write_of_a_rollout_and_a_revert_converges_then_reverts_exactly() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    assert!(node_count() >= 1);
    let tag = format!("e2e-sieve-{}", std::process::id() % 100_000);
    let ns = TestNamespace::create(&client, "e2e-sieve", json!({"tracing": tag})).await;
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "ingress-nginx-controller", "namespace": ns.name},
        "data": {"otel-sampler-ratio": "0.5", "proxy-body-size": "8m"},
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &cm).await.unwrap();
    let edge = json!({"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"});
    create(&client, &ns.name, json!({
        "metadata": {"name": "ingress-nginx-controller", "labels": edge},
        "spec": {"replicas": 1, "selector": {"matchLabels": edge}, "template": {"metadata": {"labels": edge}, "spec": {"containers": [{
            "name": "controller", "image": "registry.k8s.io/ingress-nginx/controller:v1.15.1",
            "args": ["/nginx-ingress-controller", "--configmap=$(POD_NAMESPACE)/ingress-nginx-controller"],
        }]}}},
    }))
    .await;
    for app in ["cart", "pay"] {
        create_app(&client, &ns.name, app, "shop", json!([])).await;
    }
    let agents = Agents::start_all();
    eventually("every Deployment to be available", || async {
        let list = Api::<Deployment>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.ok()?;
        list.iter().all(crosstrace::layers::health::deployment_rolled_out).then_some(())
    })
    .await;
    let before = world(&client, &ns.name).await;

    let name = format!("{tag}-policy");
    apply_policy(&client, &json!({
        "apiVersion": "crosstrace.dev/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": name},
        "spec": {
            "collector": {"endpoint": "otel-gateway.observability.svc:4317"},
            "sampling": {"ratio": "0.25"},
            "ingress": {"namespace": ns.name, "serviceName": "edge"},
            "workloads": {
                "namespaceSelector": {"matchLabels": {"tracing": tag}},
                "selector": {"matchLabels": {"app.kubernetes.io/part-of": "shop"}},
            },
            "network": {
                "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node_name(0)}},
                "bridge": "br-int",
                "sflow": {"targets": ["127.0.0.1:6343"], "sampling": 64, "polling": 10, "header": 128, "agent": "127.0.0.1"},
            },
            "rollout": {"maxConcurrent": 5, "progressDeadlineSeconds": 120},
        },
    }))
    .await;
    let policies = Api::<TracingPolicy>::all(client.clone());
    let ready = || async {
        let Ok(p) = policies.get(&name).await else { return false };
        condition(&p, "Ready").is_some_and(|c| c.status == "True" && c.observed_generation == p.metadata.generation)
    };
    let rollout_crashes = crash_after_every_write("rollout", ready).await;
    let p = policies.get(&name).await.unwrap();
    let status = p.status.as_ref().unwrap();
    let counts = |l: &Option<crosstrace::api::LayerStatus>| l.as_ref().map(|l| (l.ready, l.selected));
    assert_eq!(counts(&status.ingress), Some((1, 1)));
    assert_eq!(counts(&status.workloads), Some((2, 2)));
    assert_eq!(counts(&status.nodes), Some((1, 1)));
    assert_ne!(world(&client, &ns.name).await, before, "the rollout changed the cluster");
    eprintln!("rollout: {rollout_crashes} crashes, one after every write");
    assert!(rollout_crashes >= 8, "every layer's writes were crash points ({rollout_crashes})");

    kubectl(&["delete", "tracingpolicy", &name, "--wait=false"]);
    let gone = || async { policies.get_opt(&name).await.ok().is_some_and(|p| p.is_none()) };
    let revert_crashes = crash_after_every_write("revert", gone).await;
    eprintln!("revert: {revert_crashes} crashes, one after every write");
    assert!(revert_crashes >= 4, "the revert's writes were crash points ({revert_crashes})");
    // The node agent removes the rows once its NodeTracing is gone.
    eventually_with(
        "everything exactly as before",
        || agents.logs(20),
        || async { (world(&client, &ns.name).await == before).then_some(()) },
    )
    .await;
}
