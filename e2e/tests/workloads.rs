//! End to end, on the local real cluster: the workload layer instruments selected Deployments,
//! StatefulSets and DaemonSets in batches of `maxConcurrent`, leaves everything else alone, rolls a
//! broken batch back to the exact previous pod template, and reverts byte for byte on delete.

#[path = "../support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crosstrace::api::TracingPolicy;
use crosstrace::layers::workloads::{POLICY_LABEL, RECORD_ANNOTATION, SIDECAR_NAME, config_map_name};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::*;

const PART_OF: &str = "app.kubernetes.io/part-of";

fn pod_template(name: &str, image: &str, env: Value) -> Value {
    json!({
        "metadata": {"labels": {"app": name, PART_OF: "shop"}},
        "spec": {"containers": [{"name": "app", "image": image, "env": env}]},
    })
}

async fn create_deployment(client: &Client, ns: &str, name: &str, env: Value) {
    create_app(client, ns, name, "shop", env).await;
}

async fn create_statefulset(client: &Client, ns: &str, name: &str) {
    let s: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {PART_OF: "shop"}},
        "spec": {"replicas": 1, "serviceName": name, "selector": {"matchLabels": {"app": name}}, "template": pod_template(name, "shop/db:1", json!([]))},
    }))
    .unwrap();
    Api::<StatefulSet>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .expect("create StatefulSet");
}

async fn create_daemonset(client: &Client, ns: &str, name: &str) {
    let d: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {PART_OF: "shop"}},
        "spec": {"selector": {"matchLabels": {"app": name}}, "template": pod_template(name, "shop/agent:1", json!([]))},
    }))
    .unwrap();
    Api::<DaemonSet>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .expect("create DaemonSet");
}

/// The pod template of every Deployment, StatefulSet and DaemonSet in a namespace, by "Kind/name".
async fn templates(client: &Client, ns: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for d in Api::<Deployment>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap() {
        out.insert(format!("Deployment/{}", d.name_any()), serde_json::to_value(d.spec.unwrap().template).unwrap());
    }
    for s in Api::<StatefulSet>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap() {
        out.insert(format!("StatefulSet/{}", s.name_any()), serde_json::to_value(s.spec.unwrap().template).unwrap());
    }
    for d in Api::<DaemonSet>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap() {
        out.insert(format!("DaemonSet/{}", d.name_any()), serde_json::to_value(d.spec.unwrap().template).unwrap());
    }
    out
}

async fn all_rolled_out(client: &Client, ns: &str) -> bool {
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
    deployments.iter().all(crosstrace::layers::health::deployment_rolled_out)
        && statefulsets.iter().all(crosstrace::layers::health::statefulset_rolled_out)
        && daemonsets.iter().all(crosstrace::layers::health::daemonset_rolled_out)
}

async fn wait_rolled_out(client: &Client, ns: &str) {
    eventually(&format!("every workload in {ns} to be rolled out"), || async {
        all_rolled_out(client, ns).await.then_some(())
    })
    .await;
}

fn workloads_policy(
    name: &str,
    selector_value: &str,
    max_concurrent: i32,
    sidecar_image: &str,
    kinds: &[&str],
) -> Value {
    tracing_policy(
        name,
        json!({
            "collector": {"endpoint": "otel-gateway.observability.svc:4317"},
            "sampling": {"ratio": "0.5"},
            "workloads": {
                "namespaceSelector": {"matchLabels": {"tracing": selector_value}},
                "selector": {"matchLabels": {PART_OF: "shop"}},
                "kinds": kinds,
                "sidecar": {"image": sidecar_image},
            },
            "rollout": {"maxConcurrent": max_concurrent, "progressDeadlineSeconds": 15},
        }),
    )
}

fn has_sidecar(template: &Value) -> bool {
    template["spec"]["initContainers"].as_array().is_some_and(|c| c.iter().any(|c| c["name"] == SIDECAR_NAME))
}

/// Deployments in these namespaces that carry an injection not yet rolled out, as seen by a watch.
fn track_rolling(client: &Client, namespaces: Vec<String>) -> (Arc<Mutex<usize>>, tokio::task::JoinHandle<()>) {
    let max = Arc::new(Mutex::new(0));
    let seen = max.clone();
    let api = Api::<Deployment>::all(client.clone());
    let task = tokio::spawn(async move {
        let mut rolling: BTreeSet<String> = BTreeSet::new();
        let mut stream = watcher(api, watcher::Config::default()).applied_objects().boxed();
        while let Some(Ok(d)) = stream.next().await {
            if !namespaces.contains(&d.namespace().unwrap_or_default()) {
                continue;
            }
            let key = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
            let injected = d.annotations().contains_key(RECORD_ANNOTATION);
            if injected && !crosstrace::layers::health::deployment_rolled_out(&d) {
                rolling.insert(key);
            } else {
                rolling.remove(&key);
            }
            let mut m = seen.lock().unwrap();
            *m = (*m).max(rolling.len());
        }
    });
    (max, task)
}

#[tokio::test]
async fn workloads_roll_out_in_batches_leave_others_alone_and_revert_exactly() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let tag = format!("e2e-wl-{}", std::process::id() % 100_000);
    let a = TestNamespace::create(&client, "e2e-wla", json!({"tracing": tag})).await;
    let b = TestNamespace::create(&client, "e2e-wlb", json!({"tracing": tag})).await;
    let other = TestNamespace::create(&client, "e2e-wlc", json!({})).await;
    for i in 0..10 {
        let env = if i == 0 { json!([{"name": "OTEL_SERVICE_NAME", "value": "custom-checkout"}]) } else { json!([]) };
        create_deployment(&client, &a.name, &format!("shop-{i}"), env).await;
        create_deployment(&client, &b.name, &format!("shop-{i}"), json!([])).await;
    }
    create_statefulset(&client, &a.name, "db").await;
    create_daemonset(&client, &a.name, "node-agent").await;
    for i in 0..4 {
        create_deployment(&client, &other.name, &format!("shop-{i}"), json!([])).await;
    }
    // kube-system matches the namespace selector too: it must still never be instrumented.
    let namespaces = Api::<Namespace>::all(client.clone());
    let label = |v: Value| json!({"metadata": {"labels": {"tracing": v}}});
    namespaces.patch("kube-system", &PatchParams::default(), &Patch::Merge(&label(json!(tag)))).await.unwrap();
    create_deployment(&client, "kube-system", &format!("{tag}-system"), json!([])).await;
    for ns in [&a.name, &b.name, &other.name] {
        wait_rolled_out(&client, ns).await;
    }
    let before: Vec<BTreeMap<String, Value>> = vec![
        templates(&client, &a.name).await,
        templates(&client, &b.name).await,
        templates(&client, &other.name).await,
    ];
    let system_deployment = format!("{tag}-system");
    let system_api = Api::<Deployment>::namespaced(client.clone(), "kube-system");
    let system_before = system_api.get(&system_deployment).await.unwrap().spec.unwrap().template;

    let controller = ControllerProcess::start(18091);
    let (max_rolling, tracker) = track_rolling(&client, vec![a.name.clone(), b.name.clone()]);
    let name = format!("{tag}-policy");
    apply_policy(&client, &workloads_policy(&name, &tag, 5, "", &["Deployment", "StatefulSet", "DaemonSet"])).await;
    let p = wait_condition(&client, &name, "Ready", "True").await;
    assert_eq!(p.status.as_ref().unwrap().workloads.as_ref().unwrap().summary, "22/22");
    tracker.abort();
    let max_rolling = *max_rolling.lock().unwrap();
    assert!(max_rolling <= 5, "at most maxConcurrent=5 Deployments rolled at once, saw {max_rolling}");
    assert!(max_rolling >= 1, "the watch saw the rollout");

    // Every matching workload's pods carry the sidecar and the env; the user's service name stays.
    for ns in [&a.name, &b.name] {
        let after = templates(&client, ns).await;
        assert_eq!(after.len(), if *ns == a.name { 12 } else { 10 });
        for (workload, template) in &after {
            assert!(has_sidecar(template), "{ns} {workload} has the collector sidecar");
            let env = template["spec"]["containers"][0]["env"].as_array().unwrap();
            assert!(
                env.iter().any(|e| e["name"] == "OTEL_TRACES_SAMPLER_ARG" && e["value"] == "0.5"),
                "{workload}: {env:?}"
            );
        }
        let pods = Api::<Pod>::namespaced(client.clone(), ns);
        eventually(&format!("every pod in {ns} to run the sidecar"), || async {
            let list = pods.list(&ListParams::default()).await.ok()?;
            let live: Vec<&Pod> = list.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
            live.iter()
                .all(|p| {
                    p.spec
                        .as_ref()
                        .and_then(|s| s.init_containers.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.name == SIDECAR_NAME))
                })
                .then_some(())
        })
        .await;
    }
    let custom = &templates(&client, &a.name).await["Deployment/shop-0"];
    let service_names: Vec<&Value> = custom["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "OTEL_SERVICE_NAME")
        .collect();
    assert_eq!(service_names, [&json!({"name": "OTEL_SERVICE_NAME", "value": "custom-checkout"})]);
    assert_eq!(templates(&client, &other.name).await, before[2], "an unselected namespace is untouched");
    assert_eq!(
        system_api.get(&system_deployment).await.unwrap().spec.unwrap().template,
        system_before,
        "kube-system is untouched"
    );
    let config = Api::<ConfigMap>::namespaced(client.clone(), &a.name).get(&config_map_name(&name)).await.unwrap();
    assert!(config.data.unwrap()["deployment.yaml"].contains("otel-gateway.observability.svc:4317"));
    assert!(controller.metrics().await.contains("crosstrace_api_writes_total"));

    delete_policy_and_wait(&client, &name).await;
    for (ns, expected) in [&a.name, &b.name, &other.name].into_iter().zip(&before) {
        assert_eq!(&templates(&client, ns).await, expected, "every pod template in {ns} is exactly as before");
    }
    for ns in [&a.name, &b.name] {
        let deployments = Api::<Deployment>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
        assert!(
            deployments
                .iter()
                .all(|d| !d.labels().contains_key(POLICY_LABEL) && !d.annotations().contains_key(RECORD_ANNOTATION))
        );
        let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt(&config_map_name(&name)).await.unwrap();
        assert!(cm.is_none(), "the collector ConfigMap is gone from {ns}");
    }
    namespaces.patch("kube-system", &PatchParams::default(), &Patch::Merge(&label(Value::Null))).await.unwrap();
    delete_if_exists(&system_api, &system_deployment).await;
}

#[tokio::test]
async fn a_broken_batch_is_rolled_back_to_the_exact_previous_template() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let tag = format!("e2e-wlbroken-{}", std::process::id() % 100_000);
    let ns = TestNamespace::create(&client, "e2e-wlbroken", json!({"tracing": tag})).await;
    for name in ["cart", "payments"] {
        create_deployment(&client, &ns.name, name, json!([{"name": "OTEL_SERVICE_NAME", "value": name}])).await;
    }
    wait_rolled_out(&client, &ns.name).await;
    let before = templates(&client, &ns.name).await;

    let _controller = ControllerProcess::start(18092);
    let name = format!("{tag}-policy");
    // A deadline far beyond this test's patience: the rollback must come from the pods of crosstrace's
    // revision that crash-loop (a kwok Stage: CrashLoopBackOff), not from the deadline. An allowed
    // repository (the chart's adminLimits) with an image kwok crash-loops.
    let mut policy = workloads_policy(&name, &tag, 1, "otel/opentelemetry-collector-k8s:crashloop", &["Deployment"]);
    policy["spec"]["rollout"]["progressDeadlineSeconds"] = json!(3600);
    apply_policy(&client, &policy).await;
    let p = wait_condition(&client, &name, "Degraded", "True").await;
    let degraded = p.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(degraded.reason, "RolledBack");
    assert!(degraded.message.contains(&format!("{}/cart", ns.name)), "names the workload: {}", degraded.message);
    // Rolled back within this test's patience: the deadline (an hour) played no part.
    assert_eq!(p.status.as_ref().unwrap().workloads.as_ref().unwrap().rolled_back, 1);
    eventually("the rolled-back template", || async { (templates(&client, &ns.name).await == before).then_some(()) })
        .await;
    wait_rolled_out(&client, &ns.name).await;
    // The rollout stopped: still the same after a few more reconciles.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(templates(&client, &ns.name).await, before, "payments was never touched, cart is exactly as before");

    delete_policy_and_wait(&client, &name).await;
    assert_eq!(templates(&client, &ns.name).await, before);
    let cart = Api::<Deployment>::namespaced(client.clone(), &ns.name).get("cart").await.unwrap();
    assert!(cart.annotations().keys().all(|k| !k.starts_with("crosstrace.dev/")), "{:?}", cart.annotations());
}

#[tokio::test]
async fn drift_is_reapplied_and_a_second_policy_on_the_same_workload_is_a_conflict() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let tag = format!("e2e-wldrift-{}", std::process::id() % 100_000);
    let ns = TestNamespace::create(&client, "e2e-wldrift", json!({"tracing": tag})).await;
    create_deployment(&client, &ns.name, "cart", json!([])).await;
    wait_rolled_out(&client, &ns.name).await;
    let before = templates(&client, &ns.name).await;
    let controller = ControllerProcess::start(18093);

    let first = format!("{tag}-first");
    apply_policy(&client, &workloads_policy(&first, &tag, 5, "", &["Deployment"])).await;
    wait_condition(&client, &first, "Ready", "True").await;

    // Someone (a helm upgrade, GitOps) takes the sidecar out again: it comes back, and the fight shows.
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    let remove = json!([{"op": "remove", "path": "/spec/template/spec/initContainers"}]);
    let by_helm = PatchParams { field_manager: Some("helm".into()), ..Default::default() };
    deployments.patch("cart", &by_helm, &Patch::<Value>::Json(serde_json::from_value(remove).unwrap())).await.unwrap();
    eventually("the sidecar to be re-applied", || async {
        has_sidecar(&templates(&client, &ns.name).await["Deployment/cart"]).then_some(())
    })
    .await;
    eventually("the drift metric", || async {
        (controller.counter("crosstrace_drift_corrections_total").await >= 1.0).then_some(())
    })
    .await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone());
    eventually("a DriftCorrected event", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("DriftCorrected")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(first.as_str())
            })
            .then_some(())
    })
    .await;
    wait_condition(&client, &first, "Ready", "True").await;

    // A newer policy wanting the same workload: the older keeps it, the newer says why, nothing flaps.
    let second = format!("{tag}-second");
    let mut other = workloads_policy(&second, &tag, 5, "", &["Deployment"]);
    other["spec"]["sampling"]["ratio"] = json!("0.1");
    apply_policy(&client, &other).await;
    let p = wait_condition(&client, &second, "Degraded", "True").await;
    let degraded = condition(&p, "Degraded").unwrap();
    assert_eq!(degraded.reason, "Conflict");
    assert!(
        degraded.message.contains(&format!("{}/cart", ns.name)) && degraded.message.contains(&first),
        "{}",
        degraded.message
    );
    let owner = |d: &Deployment| d.annotations().get(RECORD_ANNOTATION).cloned().unwrap_or_default();
    let recorded = owner(&deployments.get("cart").await.unwrap());
    assert!(recorded.contains(&format!("\"policy\":\"{first}\"")), "{recorded}");
    let generation = deployments.get("cart").await.unwrap().metadata.generation;
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let later = deployments.get("cart").await.unwrap();
    assert_eq!((later.metadata.generation, owner(&later)), (generation, recorded), "no flapping between the policies");

    delete_policy_and_wait(&client, &second).await;
    delete_policy_and_wait(&client, &first).await;
    assert_eq!(templates(&client, &ns.name).await, before);
}

async fn template_of(client: &Client, ns: &str, kind_name: &str) -> Value {
    templates(client, ns).await.remove(kind_name).unwrap_or_else(|| panic!("{kind_name} exists"))
}

/// The policy is not rolled back, not degraded, and every workload still carries the sidecar.
async fn assert_kept(client: &Client, ns: &str, policy: &str, what: &str) {
    let p = Api::<TracingPolicy>::all(client.clone()).get(policy).await.unwrap();
    let status = p.status.as_ref().unwrap();
    assert_eq!(status.workloads.as_ref().unwrap().rolled_back, 0, "{what}: nothing rolled back");
    let degraded = condition(&p, "Degraded").unwrap();
    assert_eq!(degraded.status, "False", "{what}: not degraded: {}", degraded.message);
    for (kind_name, template) in templates(client, ns).await {
        assert!(has_sidecar(&template), "{what}: {kind_name} keeps the sidecar");
    }
}

#[tokio::test]
async fn owners_scale_restart_upgrade_pause_and_recreate_without_crosstrace_rolling_back() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let tag = format!("e2e-owner-{}", std::process::id() % 100_000);
    let ns = TestNamespace::create(&client, "e2e-owner", json!({"tracing": tag})).await;
    create_deployment(&client, &ns.name, "web", json!([])).await;
    create_deployment(&client, &ns.name, "api", json!([])).await;
    create_statefulset(&client, &ns.name, "db").await;
    create_daemonset(&client, &ns.name, "node-agent").await;
    let on_delete = json!({"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": null}}});
    let statefulsets = Api::<StatefulSet>::namespaced(client.clone(), &ns.name);
    statefulsets.patch("db", &PatchParams::default(), &Patch::Merge(&on_delete)).await.unwrap();
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), &ns.name);
    daemonsets.patch("node-agent", &PatchParams::default(), &Patch::Merge(&on_delete)).await.unwrap();
    wait_rolled_out(&client, &ns.name).await;

    let controller = ControllerProcess::start(18094);
    let name = format!("{tag}-policy");
    let deadline = 15;
    let kinds = ["Deployment", "StatefulSet", "DaemonSet"];
    apply_policy(&client, &workloads_policy(&name, &tag, 5, "", &kinds)).await;

    // The OnDelete StatefulSet and DaemonSet wait for their owner, well past the deadline, and are never
    // rolled back.
    wait_reason(&client, &name, "WorkloadsReady", "WaitingForRestart").await;
    tokio::time::sleep(std::time::Duration::from_secs(deadline + 3)).await;
    let p = wait_reason(&client, &name, "WorkloadsReady", "WaitingForRestart").await;
    let message = &condition(&p, "WorkloadsReady").unwrap().message;
    assert!(message.contains("/db") && message.contains("/node-agent"), "names both: {message}");
    assert_kept(&client, &ns.name, &name, "OnDelete waiting").await;
    // Their owner recreates the pods: the sidecar is in them, and the policy is Ready.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let recreate = || async {
        pods.delete("db-0", &Default::default()).await.unwrap();
        let agents = ListParams::default().labels("app=node-agent");
        pods.delete_collection(&Default::default(), &agents).await.unwrap();
    };
    recreate().await;
    wait_condition(&client, &name, "Ready", "True").await;

    // Owners act on converged Deployments, long after crosstrace's change and its deadline.
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    let scale = json!({"spec": {"replicas": 3}});
    deployments.patch_scale("web", &PatchParams::default(), &Patch::Merge(&scale)).await.expect("scale as an HPA does");
    let (ok, _, err) = kubectl(&["-n", &ns.name, "scale", "deployment/api", "--replicas=2"]);
    assert!(ok, "kubectl scale: {err}");
    let (ok, _, err) = kubectl(&["-n", &ns.name, "rollout", "restart", "deployment/web"]);
    assert!(ok, "kubectl rollout restart: {err}");
    let (ok, _, err) = kubectl(&["-n", &ns.name, "set", "image", "deployment/api", "app=shop/app:2"]);
    assert!(ok, "kubectl set image: {err}");
    wait_rolled_out(&client, &ns.name).await;
    wait_condition(&client, &name, "Ready", "True").await;
    assert_kept(&client, &ns.name, &name, "scale, restart, new image").await;
    let api_template = template_of(&client, &ns.name, "Deployment/api").await;
    assert_eq!(api_template["spec"]["containers"][0]["image"], "shop/app:2", "the owner's image stays");

    // The owner's own broken image: reported, named, never rolled back.
    let (ok, _, err) = kubectl(&["-n", &ns.name, "set", "image", "deployment/web", "app=shop/app:broken"]);
    assert!(ok, "kubectl set image: {err}");
    let p = wait_reason(&client, &name, "WorkloadsReady", "TargetUnhealthy").await;
    assert!(condition(&p, "WorkloadsReady").unwrap().message.contains("/web"), "names web");
    tokio::time::sleep(std::time::Duration::from_secs(deadline + 3)).await;
    assert_kept(&client, &ns.name, &name, "the owner's broken image").await;
    let (ok, _, err) = kubectl(&["-n", &ns.name, "set", "image", "deployment/web", "app=shop/app:3"]);
    assert!(ok, "kubectl set image: {err}");
    wait_condition(&client, &name, "Ready", "True").await;

    // A paused Deployment holds a changed policy's new revision: it waits, past the deadline, no rollback.
    let pause = json!({"spec": {"paused": true}});
    deployments.patch("api", &PatchParams::default(), &Patch::Merge(&pause)).await.unwrap();
    let mut changed = workloads_policy(&name, &tag, 5, "", &kinds);
    changed["spec"]["sampling"]["ratio"] = json!("0.75");
    apply_policy(&client, &changed).await;
    wait_reason(&client, &name, "WorkloadsReady", "DeploymentPaused").await;
    tokio::time::sleep(std::time::Duration::from_secs(deadline + 3)).await;
    wait_reason(&client, &name, "WorkloadsReady", "DeploymentPaused").await;
    assert_kept(&client, &ns.name, &name, "paused").await;
    let resume = json!({"spec": {"paused": false}});
    deployments.patch("api", &PatchParams::default(), &Patch::Merge(&resume)).await.unwrap();
    recreate().await;
    wait_condition(&client, &name, "Ready", "True").await;
    let api_template = template_of(&client, &ns.name, "Deployment/api").await;
    let env = api_template["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e["value"] == "0.75"), "the new revision reached the resumed Deployment");

    delete_policy_and_wait(&client, &name).await;
    for (kind_name, template) in templates(&client, &ns.name).await {
        assert!(!has_sidecar(&template), "{kind_name} is reverted");
    }
    drop(controller);
}

#[tokio::test]
async fn two_policies_created_in_the_same_second_have_exactly_one_owner_stable_for_a_minute() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let tag = format!("e2e-twins-{}", std::process::id() % 100_000);
    let ns = TestNamespace::create(&client, "e2e-twins", json!({"tracing": tag})).await;
    create_deployment(&client, &ns.name, "cart", json!([])).await;
    wait_rolled_out(&client, &ns.name).await;
    let _controller = ControllerProcess::start(18095);
    // Same second, and the younger name is created first: seniority must not depend on who is seen first.
    let (older, younger) = (format!("{tag}-a"), format!("{tag}-b"));
    apply_policy(&client, &workloads_policy(&younger, &tag, 5, "", &["Deployment"])).await;
    apply_policy(&client, &workloads_policy(&older, &tag, 5, "", &["Deployment"])).await;
    let policies = Api::<TracingPolicy>::all(client.clone());
    let created = |p: &TracingPolicy| p.metadata.creation_timestamp.clone().map(|t| t.0.as_second());
    let (a, b) = (policies.get(&older).await.unwrap(), policies.get(&younger).await.unwrap());
    if created(&a) != created(&b) {
        eprintln!("note: the two policies were created in different seconds on this run; seniority is still checked");
    }
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    let owner = || async {
        let d = deployments.get("cart").await.ok()?;
        let record: Value = serde_json::from_str(d.annotations().get(RECORD_ANNOTATION)?).ok()?;
        record["policy"].as_str().map(str::to_string)
    };
    eventually("the older policy to own cart", || async { (owner().await? == older).then_some(()) }).await;
    wait_condition(&client, &older, "Ready", "True").await;
    let conflict = wait_reason(&client, &younger, "Degraded", "Conflict").await;
    assert!(condition(&conflict, "Degraded").unwrap().message.contains(&older), "names the older policy");
    let start = tokio::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(60) {
        assert_eq!(owner().await.as_deref(), Some(older.as_str()), "the owner never changes");
        let a = policies.get(&older).await.unwrap();
        assert_eq!(condition(&a, "Degraded").map(|c| c.status.as_str()), Some("False"), "the older is not in conflict");
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    delete_policy_and_wait(&client, &younger).await;
    delete_policy_and_wait(&client, &older).await;
    let template = template_of(&client, &ns.name, "Deployment/cart").await;
    assert!(!has_sidecar(&template), "reverted");
}

#[tokio::test]
async fn a_converged_policy_takes_in_workloads_that_appear_or_are_relabelled_and_namespaces_that_join() {
    // A converged policy looks at the workloads its last scan of the stores found until a workload
    // appears or is relabelled, or a namespace changes (the stores' label epoch): each of those must
    // still reach it.
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let tag = format!("e2e-join-{}", std::process::id() % 100_000);
    let ns = TestNamespace::create(&client, "e2e-join", json!({"tracing": tag})).await;
    let later = TestNamespace::create(&client, "e2e-join-later", json!({"tracing": "not-yet"})).await;
    create_deployment(&client, &ns.name, "cart", json!([])).await;
    create_app(&client, &ns.name, "ads", "marketing", json!([])).await;
    create_deployment(&client, &later.name, "search", json!([])).await;
    wait_rolled_out(&client, &ns.name).await;
    wait_rolled_out(&client, &later.name).await;
    let _controller = ControllerProcess::start(18096);
    apply_policy(&client, &workloads_policy(&tag, &tag, 5, "", &["Deployment"])).await;
    wait_condition(&client, &tag, "Ready", "True").await;
    let injected = |ns: String, name: &'static str| {
        let client = client.clone();
        async move { has_sidecar(&template_of(&client, &ns, &format!("Deployment/{name}")).await) }
    };
    assert!(injected(ns.name.clone(), "cart").await);
    assert!(!injected(ns.name.clone(), "ads").await, "another part-of: not selected");
    assert!(!injected(later.name.clone(), "search").await, "its namespace is not selected");

    create_deployment(&client, &ns.name, "checkout", json!([])).await;
    eventually("the new Deployment to be injected", || async {
        injected(ns.name.clone(), "checkout").await.then_some(())
    })
    .await;
    let relabel = json!({"metadata": {"labels": {PART_OF: "shop"}}});
    Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .patch("ads", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    eventually("the relabelled Deployment to be injected", || async {
        injected(ns.name.clone(), "ads").await.then_some(())
    })
    .await;
    let join = json!({"metadata": {"labels": {"tracing": tag}}});
    Api::<Namespace>::all(client.clone())
        .patch(&later.name, &PatchParams::default(), &Patch::Merge(&join))
        .await
        .unwrap();
    eventually("the Deployment of the namespace that joined to be injected", || async {
        injected(later.name.clone(), "search").await.then_some(())
    })
    .await;
    let policies = Api::<TracingPolicy>::all(client.clone());
    eventually("the policy to count the four and be Ready", || async {
        let p = policies.get(&tag).await.ok()?;
        let w = p.status.as_ref()?.workloads.clone()?;
        (w.selected == 4 && w.ready == 4 && condition(&p, "Ready").is_some_and(|c| c.status == "True")).then_some(())
    })
    .await;
    delete_policy_and_wait(&client, &tag).await;
    for (ns, name) in [(&ns.name, "cart"), (&ns.name, "ads"), (&ns.name, "checkout"), (&later.name, "search")] {
        assert!(!injected(ns.clone(), name).await, "{name} reverted");
    }
}
