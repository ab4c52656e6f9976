//! End to end, on the local real cluster: the API refuses bad policies, a policy stored while the CRD
//! was looser stops no other, and the edge layer instruments an ingress-nginx-shaped controller, gates
//! an image rollout on health, rolls a broken one back, survives a controller crash, makes no write
//! once converged, and reverts byte for byte.

#[path = "../support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use crosstrace::api::TracingPolicy;
use crosstrace::layers::ingress::{POLICY_LABEL, RECORD_ANNOTATION, ROLLED_BACK_ANNOTATION};
use crosstrace::layers::reasons::INVALID_OBJECT;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use support::*;

const ORIGINAL_IMAGE: &str = "registry.k8s.io/ingress-nginx/controller:v1.12.1";

/// An ingress-nginx-shaped controller: the chart's labels, `--configmap=$(POD_NAMESPACE)/...`, and a
/// ConfigMap with keys of its own, one of them an OTel key the user set.
async fn ingress_nginx(client: &Client, ns: &str) -> (Deployment, ConfigMap) {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), ns);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "ingress-nginx-controller", "namespace": ns},
        "data": {"use-forwarded-headers": "true", "otel-sampler-ratio": "0.5", "proxy-body-size": "8m"},
    }))
    .unwrap();
    let cm = cms.create(&PostParams::default(), &cm).await.expect("create ConfigMap");
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let labels = json!({"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"});
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "ingress-nginx-controller", "namespace": ns, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "controller",
                    "image": ORIGINAL_IMAGE,
                    "args": ["/nginx-ingress-controller", "--configmap=$(POD_NAMESPACE)/ingress-nginx-controller"],
                    "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                }]},
            },
        },
    }))
    .unwrap();
    let d = deployments.create(&PostParams::default(), &d).await.expect("create Deployment");
    eventually("the ingress controller to be available", || async {
        let d = deployments.get(&d.name_any()).await.ok()?;
        (d.status?.available_replicas? >= 1).then_some(())
    })
    .await;
    (deployments.get(&d.name_any()).await.unwrap(), cm)
}

fn edge_policy(name: &str, ns: &str, image: &str, deadline: i32) -> serde_json::Value {
    tracing_policy(
        name,
        json!({
            "collector": {"endpoint": "otel-gateway.observability.svc:4317"},
            "sampling": {"ratio": "0.25", "parentBased": true},
            "ingress": {"namespace": ns, "serviceName": "edge", "image": image},
            "rollout": {"progressDeadlineSeconds": deadline},
        }),
    )
}

fn image_of(d: &Deployment) -> String {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].image.clone().unwrap()
}

/// Nothing of crosstrace is left on the controller and its ConfigMap, and both are as before.
async fn assert_restored(client: &Client, ns: &str, before_cm: &ConfigMap) {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get("ingress-nginx-controller").await.unwrap();
    assert_eq!(cm.data, before_cm.data, "ConfigMap data is byte-equal to before");
    assert!(!cm.labels().contains_key(POLICY_LABEL));
    assert_eq!(cm.metadata.annotations, before_cm.metadata.annotations, "ConfigMap annotations as before");
    let d = Api::<Deployment>::namespaced(client.clone(), ns).get("ingress-nginx-controller").await.unwrap();
    assert_eq!(image_of(&d), ORIGINAL_IMAGE, "the controller image is back");
    for key in [RECORD_ANNOTATION, ROLLED_BACK_ANNOTATION] {
        assert!(!d.annotations().contains_key(key), "{key} is removed");
    }
    assert!(!d.labels().contains_key(POLICY_LABEL));
}

#[tokio::test]
async fn bad_policies_are_refused_naming_the_field() {
    let client = client().await;
    install_crds();
    let dir = repo("config/samples/bad");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expected = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect-error: "))
            .expect("every bad sample says what it expects");
        let (ok, _, err) = kubectl(&["apply", "--dry-run=server", "-f", path.to_str().unwrap()]);
        assert!(!ok, "{} was accepted", path.display());
        assert!(err.contains(expected), "{}: the error should name {expected}, got: {err}", path.display());
        checked += 1;
    }
    assert!(
        checked >= 30,
        "one bad sample per class (selectors, addresses, quantities, OVS names, namespaces, images, bounds...), found {checked}"
    );
    for good in ["edge.yaml", "workloads.yaml", "network.yaml", "storefront.yaml", "flows.yaml", "migration.yaml"] {
        let (ok, _, err) = kubectl(&["apply", "--dry-run=server", "-f", &repo(&format!("config/samples/{good}"))]);
        assert!(ok, "{good} is refused: {err}");
    }
    let policies = Api::<DynamicObject>::all_with(client, &ApiResource::erase::<TracingPolicy>(&()));
    let unusual: DynamicObject = serde_json::from_value(unusual_but_valid_policy()).unwrap();
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    // The API server validates against the CRD before validating admission policies run: a refusal by the
    // chart's admin limits (which allow neither these registries nor public flow targets) means the CRD
    // took every form.
    match policies.create(&dry_run, &unusual).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.message.contains("ValidatingAdmissionPolicy 'crosstrace-admin-limits'") => {}
        Err(e) => panic!("strict input must still take every valid form: {e}"),
    }
}

/// Valid input in its less common forms, which strict rules must not refuse: IPv6 collectors and
/// targets, an empty label value, prefixed keys, every selector operator, a registry with a port and a
/// digest, quantities written as numbers, a request equal to its limit, an IPv6 sFlow agent.
fn unusual_but_valid_policy() -> serde_json::Value {
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    json!({
        "apiVersion": "crosstrace.dev/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": "unusual-but-valid"},
        "spec": {
            "collector": {"endpoint": "[fd00::5]:4317"},
            "ingress": {
                "namespace": "",
                "serviceName": "Edge_gateway.eu-1",
                "image": format!("registry.example.com:5000/team/ingress-nginx/controller:v1.12.1@{digest}"),
                "selector": {
                    "matchLabels": {"app.kubernetes.io/name": "ingress-nginx", "tier": ""},
                    "matchExpressions": [
                        {"key": "example.com/team", "operator": "NotIn", "values": ["a", "B_c.d-e"]},
                        {"key": "canary", "operator": "DoesNotExist"},
                    ],
                },
            },
            "workloads": {
                "namespaceSelector": {"matchExpressions": [{"key": "tracing", "operator": "Exists"}]},
                "selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["shop"]}]},
                "sidecar": {
                    "image": "localhost:5000/otel/opentelemetry-collector-contrib:0.120.0",
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "64Mi", "ephemeral-storage": 1},
                        "limits": {"cpu": 1, "memory": "64Mi"},
                    },
                },
            },
            "network": {
                "bridge": "br-ex.100",
                "nodeSelector": {"matchLabels": {"kubernetes.io/os": "linux"}},
                "sflow": {"targets": ["[2001:db8::1]:6343", "10.0.0.5:6343"], "agent": "2001:db8::2"},
                "ipfix": {"targets": ["192.168.1.1:4739"]},
            },
        },
    })
}

#[tokio::test]
async fn edge_layer_is_applied_idle_when_converged_and_reverted_exactly() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-edge", json!({})).await;
    let (_, before_cm) = ingress_nginx(&client, &ns.name).await;
    let controller = ControllerProcess::start(18081);

    let name = format!("{}-policy", ns.name);
    apply_policy(&client, &edge_policy(&name, &ns.name, "", 60)).await;
    let p = wait_condition(&client, &name, "Ready", "True").await;
    assert_eq!(p.status.as_ref().unwrap().ingress.as_ref().unwrap().summary, "1/1");

    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name).get("ingress-nginx-controller").await.unwrap();
    let data: BTreeMap<String, String> = cm.data.clone().unwrap();
    for (k, v) in [
        ("enable-opentelemetry", "true"),
        ("otlp-collector-host", "otel-gateway.observability.svc"),
        ("otlp-collector-port", "4317"),
        ("otel-service-name", "edge"),
        ("otel-sampler", "TraceIdRatioBased"),
        ("otel-sampler-ratio", "0.25"),
        ("otel-sampler-parent-based", "true"),
        ("opentelemetry-trust-incoming-span", "true"),
        ("use-forwarded-headers", "true"),
        ("proxy-body-size", "8m"),
    ] {
        assert_eq!(data.get(k).map(String::as_str), Some(v), "ConfigMap key {k}");
    }
    let (ok, table, _) = kubectl(&["get", "tracingpolicies", &name]);
    assert!(ok);
    let columns = printed_columns(&table);
    let names: Vec<&str> = columns.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["NAME", "READY", "INGRESS", "GATEWAYS", "WORKLOADS", "NODES", "SAMPLING", "AGE"]);
    let values: Vec<&str> = columns.iter().map(|(_, value)| value.as_str()).collect();
    assert_eq!(&values[1..7], ["True", "1/1", "", "", "", "0.25"], "{table}");

    // Converged: wake the policy up through a watched object and count writes.
    let writes = controller.counter("crosstrace_api_writes_total").await;
    let reconciles = controller.counter("crosstrace_reconciles_total").await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    for i in 0..3 {
        let touch = json!({"metadata": {"annotations": {"e2e/touch": i.to_string()}}});
        deployments.patch("ingress-nginx-controller", &PatchParams::default(), &Patch::Merge(&touch)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    }
    eventually("reconciles after the touches", || async {
        (controller.counter("crosstrace_reconciles_total").await >= reconciles + 2.0).then_some(())
    })
    .await;
    assert_eq!(controller.counter("crosstrace_api_writes_total").await, writes, "a converged policy makes no write");

    // A tenant changes a tracing key crosstrace applied (another field manager): drift, reported as an
    // Event and a metric of the edge layer, and applied again.
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &ns.name);
    let by_helm = PatchParams { field_manager: Some("helm".into()), ..Default::default() };
    let tamper = json!({"data": {"otel-sampler-ratio": "1"}});
    config_maps.patch("ingress-nginx-controller", &by_helm, &Patch::Merge(&tamper)).await.unwrap();
    eventually("the sampler ratio applied again", || async {
        let cm = config_maps.get("ingress-nginx-controller").await.ok()?;
        (cm.data?.get("otel-sampler-ratio")?.as_str() == "0.25").then_some(())
    })
    .await;
    drift_reported(&client, &controller, "ingress", &name, &["ingress-nginx-controller"]).await;

    delete_policy_and_wait(&client, &name).await;
    assert_restored(&client, &ns.name, &before_cm).await;
}

#[tokio::test]
async fn image_rollout_gates_ready_and_a_broken_image_is_rolled_back() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-image", json!({})).await;
    let (_, before_cm) = ingress_nginx(&client, &ns.name).await;
    let _controller = ControllerProcess::start(18082);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns.name);

    let name = format!("{}-policy", ns.name);
    let instrumented = "registry.k8s.io/ingress-nginx/controller:v1.12.1-otel";
    apply_policy(&client, &edge_policy(&name, &ns.name, instrumented, 60)).await;
    wait_condition(&client, &name, "Ready", "True").await;
    let d = deployments.get("ingress-nginx-controller").await.unwrap();
    assert_eq!(image_of(&d), instrumented);
    assert!(crosstrace::layers::health::deployment_rolled_out(&d), "Ready only after the rollout completed");

    // A broken image (an allowed repository, see the chart's adminLimits): never Ready, so it is rolled back to the
    // original image and the policy is Degraded.
    apply_policy(&client, &edge_policy(&name, &ns.name, "registry.k8s.io/ingress-nginx/controller:broken", 10)).await;
    let p = wait_condition(&client, &name, "Degraded", "True").await;
    let degraded = condition(&p, "Degraded").unwrap();
    assert_eq!(degraded.reason, "RolledBack");
    assert!(degraded.message.contains(&format!("{}/ingress-nginx-controller", ns.name)), "{}", degraded.message);
    assert_eq!(condition(&p, "Ready").unwrap().status, "False");
    let d = deployments.get("ingress-nginx-controller").await.unwrap();
    assert_eq!(image_of(&d), ORIGINAL_IMAGE, "rolled back to the image from before the policy");
    eventually("the rolled-back controller to be healthy again", || async {
        crosstrace::layers::health::deployment_rolled_out(&deployments.get("ingress-nginx-controller").await.ok()?)
            .then_some(())
    })
    .await;

    delete_policy_and_wait(&client, &name).await;
    assert_restored(&client, &ns.name, &before_cm).await;
}

/// ingress-nginx's chart can run the controller as a DaemonSet (`controller.kind: DaemonSet`): the same
/// ConfigMap, the same gated image rollout (on the DaemonSet's own rollout status), the same exact revert.
#[tokio::test]
async fn an_ingress_controller_run_as_a_daemonset_is_traced_gated_rolled_back_and_reverted() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-edge-ds", json!({})).await;
    // The Deployment-shaped fixture gives the ConfigMap; the controller is then a DaemonSet instead.
    let (deployment, before_cm) = ingress_nginx(&client, &ns.name).await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    deployments.delete(&deployment.name_any(), &Default::default()).await.unwrap();
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), &ns.name);
    let spec = serde_json::to_value(deployment.spec.as_ref().unwrap()).unwrap();
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "ingress-nginx-controller", "namespace": ns.name, "labels": deployment.labels()},
        "spec": {"selector": spec["selector"], "template": spec["template"]},
    }))
    .unwrap();
    daemonsets.create(&PostParams::default(), &ds).await.expect("create DaemonSet");
    let rolled_out = || async {
        let ds = daemonsets.get("ingress-nginx-controller").await.ok()?;
        (crosstrace::layers::health::daemonset_rolled_out(&ds) && ds.status?.number_available? >= 1).then_some(())
    };
    eventually("the DaemonSet controller on every node", rolled_out).await;
    let _controller = ControllerProcess::start(18087);

    let name = format!("{}-policy", ns.name);
    let instrumented = "registry.k8s.io/ingress-nginx/controller:v1.12.1-otel";
    apply_policy(&client, &edge_policy(&name, &ns.name, instrumented, 60)).await;
    let p = wait_condition(&client, &name, "Ready", "True").await;
    assert_eq!(p.status.as_ref().unwrap().ingress.as_ref().unwrap().summary, "1/1");
    let ds = daemonsets.get("ingress-nginx-controller").await.unwrap();
    let image = |ds: &DaemonSet| ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].image.clone();
    assert_eq!(image(&ds).as_deref(), Some(instrumented));
    assert!(crosstrace::layers::health::daemonset_rolled_out(&ds), "Ready only after the DaemonSet rolled out");
    assert_eq!(ds.labels().get(POLICY_LABEL), Some(&name));
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name).get("ingress-nginx-controller").await.unwrap();
    assert_eq!(cm.data.as_ref().unwrap().get("otel-sampler-ratio").map(String::as_str), Some("0.25"));

    // A broken image: the DaemonSet never rolls out, so it is rolled back to the original image.
    apply_policy(&client, &edge_policy(&name, &ns.name, "registry.k8s.io/ingress-nginx/controller:broken", 10)).await;
    let p = wait_condition(&client, &name, "Degraded", "True").await;
    assert_eq!(condition(&p, "Degraded").unwrap().reason, "RolledBack");
    let ds = daemonsets.get("ingress-nginx-controller").await.unwrap();
    assert_eq!(image(&ds).as_deref(), Some(ORIGINAL_IMAGE), "rolled back to the image from before the policy");
    eventually("the rolled-back DaemonSet to be healthy again", rolled_out).await;

    delete_policy_and_wait(&client, &name).await;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name).get("ingress-nginx-controller").await.unwrap();
    assert_eq!(cm.data, before_cm.data, "ConfigMap data is byte-equal to before");
    assert_eq!(cm.metadata.annotations, before_cm.metadata.annotations);
    assert!(!cm.labels().contains_key(POLICY_LABEL));
    let ds = daemonsets.get("ingress-nginx-controller").await.unwrap();
    assert_eq!(image(&ds).as_deref(), Some(ORIGINAL_IMAGE));
    assert!(!ds.labels().contains_key(POLICY_LABEL));
    for key in [RECORD_ANNOTATION, ROLLED_BACK_ANNOTATION] {
        assert!(!ds.annotations().contains_key(key), "{key} is removed");
    }
}

#[tokio::test]
async fn the_owners_upgrade_of_an_instrumented_controller_stays_and_survives_the_revert() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-upgrade", json!({})).await;
    ingress_nginx(&client, &ns.name).await;
    let _controller = ControllerProcess::start(18088);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    let name = format!("{}-policy", ns.name);
    let instrumented = "registry.k8s.io/ingress-nginx/controller:v1.12.1-otel";
    apply_policy(&client, &edge_policy(&name, &ns.name, instrumented, 10)).await;
    wait_condition(&client, &name, "Ready", "True").await;

    // The owner upgrades the controller (as `helm upgrade` or `kubectl set image` would), long after the
    // deadline: their image stays, crosstrace reports it and does not fight back.
    let upgraded = "registry.k8s.io/ingress-nginx/controller:v1.15.1";
    let target = "deployment/ingress-nginx-controller";
    let (ok, _, err) = kubectl(&["-n", &ns.name, "set", "image", target, &format!("controller={upgraded}")]);
    assert!(ok, "kubectl set image: {err}");
    let p = wait_condition(&client, &name, "IngressReady", "False").await;
    assert_eq!(condition(&p, "IngressReady").unwrap().reason, "ChangedByOwner");
    assert_eq!(condition(&p, "Degraded").unwrap().status, "False", "an owner's action is not crosstrace's failure");
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    assert_eq!(image_of(&deployments.get("ingress-nginx-controller").await.unwrap()), upgraded, "not overwritten");

    delete_policy_and_wait(&client, &name).await;
    let d = deployments.get("ingress-nginx-controller").await.unwrap();
    assert_eq!(image_of(&d), upgraded, "the revert leaves the owner's new image, not the pre-upgrade one");
    assert!(d.annotations().keys().all(|k| !k.starts_with("crosstrace.dev/")), "{:?}", d.annotations());
}

#[tokio::test]
async fn a_tenants_forged_record_makes_crosstrace_write_and_delete_nothing_and_is_reported() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let edge = TestNamespace::create(&client, "e2e-forge-edge", json!({})).await;
    let (_, before_cm) = ingress_nginx(&client, &edge.name).await;
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &edge.name);
    let victim: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "victim", "namespace": edge.name},
        "data": {"http-snippet": "# the admin's"},
    }))
    .unwrap();
    configmaps.create(&PostParams::default(), &victim).await.unwrap();
    let _controller = ControllerProcess::start(18089);
    let name = format!("{}-policy", edge.name);
    apply_policy(&client, &edge_policy(&name, &edge.name, "", 60)).await;
    wait_condition(&client, &name, "Ready", "True").await;
    let instrumented = configmaps.get("ingress-nginx-controller").await.unwrap().data;

    // A tenant with `edit` in its own namespace only.
    let tenant_ns = TestNamespace::create(&client, "e2e-forge-tenant", json!({})).await;
    let (ok, _, err) = kubectl(&["-n", &tenant_ns.name, "create", "serviceaccount", "tenant"]);
    assert!(ok, "{err}");
    let subject = format!("{}:tenant", tenant_ns.name);
    let (ok, _, err) = kubectl(&[
        "-n",
        &tenant_ns.name,
        "create",
        "rolebinding",
        "tenant-edit",
        "--clusterrole=edit",
        "--serviceaccount",
        &subject,
    ]);
    assert!(ok, "{err}");
    let kubeconfig = format!("{}/tenant-{}.kubeconfig", std::env::temp_dir().display(), tenant_ns.name);
    let status = std::process::Command::new(repo("e2e/sa-kubeconfig.sh"))
        .args([&tenant_ns.name, "tenant", &kubeconfig])
        .status();
    assert!(status.is_ok_and(|s| s.success()), "tenant kubeconfig");
    let tenant = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let forged = json!({
        "policy": name, "deployment": {"namespace": tenant_ns.name, "name": "ingress-nginx-controller"},
        "configMap": {"namespace": edge.name, "name": "victim"}, "configMapExisted": false,
        "originalData": {"http-snippet": "evil", "otel-sampler-ratio": null},
    });
    let labels = json!({"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller", POLICY_LABEL: name});
    let fake: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "ingress-nginx-controller", "labels": labels, "annotations": {RECORD_ANNOTATION: forged.to_string()}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "fake"}}, "template": {"metadata": {"labels": {"app": "fake"}},
            "spec": {"containers": [{"name": "controller", "image": ORIGINAL_IMAGE, "args": [format!("--configmap={}/victim", edge.name)]}]}}},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(tenant, &tenant_ns.name)
        .create(&PostParams::default(), &fake)
        .await
        .expect("the tenant may create it");

    let p = wait_condition(&client, &name, "Degraded", "True").await;
    let degraded = condition(&p, "Degraded").unwrap();
    assert_eq!(degraded.reason, "ForgedRecord");
    assert!(degraded.message.contains(&tenant_ns.name), "names the Deployment: {}", degraded.message);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let victim = configmaps.get_opt("victim").await.unwrap().expect("the victim ConfigMap was not deleted");
    assert_eq!(victim.data.unwrap()["http-snippet"], "# the admin's", "nor written");
    assert_eq!(configmaps.get("ingress-nginx-controller").await.unwrap().data, instrumented, "the real one untouched");

    kubectl(&["-n", &tenant_ns.name, "delete", "deployment", "ingress-nginx-controller"]);
    delete_policy_and_wait(&client, &name).await;
    assert_restored(&client, &edge.name, &before_cm).await;
    assert!(configmaps.get_opt("victim").await.unwrap().is_some(), "still there after the revert");
    let _ = std::fs::remove_file(&kubeconfig);
}

#[tokio::test]
async fn a_controller_killed_mid_rollout_converges_after_restart() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-crash", json!({})).await;
    let (_, before_cm) = ingress_nginx(&client, &ns.name).await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    let mut first = ControllerProcess::start(18083);

    let name = format!("{}-policy", ns.name);
    let instrumented = "registry.k8s.io/ingress-nginx/controller:v1.12.1-otel";
    apply_policy(&client, &edge_policy(&name, &ns.name, instrumented, 60)).await;
    // Kill it the moment it has started changing the controller (record written to the ledger, label set).
    eventually("the controller to start changing the ingress controller", || async {
        deployments.get("ingress-nginx-controller").await.ok()?.labels().contains_key(POLICY_LABEL).then_some(())
    })
    .await;
    first.kill();

    let _second = ControllerProcess::start(18084);
    wait_condition(&client, &name, "Ready", "True").await;
    let d = deployments.get("ingress-nginx-controller").await.unwrap();
    assert_eq!(image_of(&d), instrumented);
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name).get("ingress-nginx-controller").await.unwrap();
    assert_eq!(cm.data.unwrap().get("otel-sampler-ratio").map(String::as_str), Some("0.25"));

    delete_policy_and_wait(&client, &name).await;
    assert_restored(&client, &ns.name, &before_cm).await;
}

#[tokio::test]
async fn the_controller_identity_is_least_privilege() {
    let admin = client().await;
    let ns = TestNamespace::create(&admin, "e2e-rbac", json!({})).await;
    ingress_nginx(&admin, &ns.name).await;
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(controller_kubeconfig()).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let controller = Client::try_from(config).unwrap();
    let deployments = Api::<Deployment>::namespaced(controller.clone(), &ns.name);
    let refused = |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(e)) if e.code == 403);
    assert!(deployments.get("ingress-nginx-controller").await.is_ok(), "it may read Deployments");
    let dry_run = kube::api::DeleteParams { dry_run: true, ..Default::default() };
    assert!(
        refused(deployments.delete("ingress-nginx-controller", &dry_run).await.map(drop)),
        "it may not delete a Deployment"
    );
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(controller.clone(), &ns.name);
    assert!(refused(secrets.list(&Default::default()).await.map(drop)), "it may not read Secrets");
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(controller, &ns.name);
    assert!(pods.list(&Default::default()).await.is_ok(), "it lists Pods (the health gate of a rollout in flight)");
    assert!(refused(pods.get("anything").await.map(drop)), "it may not read a Pod by name");
    assert!(refused(pods.delete("anything", &Default::default()).await.map(drop)), "it may not delete Pods");
}

#[tokio::test]
async fn two_replicas_never_both_act_and_the_standby_takes_over() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-lease", json!({})).await;
    let (_, before_cm) = ingress_nginx(&client, &ns.name).await;
    let first = ControllerProcess::start(18085);
    let second = ControllerProcess::start(18086);
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), "crosstrace-system");
    let holder = eventually("a leader", || async {
        leases.get("crosstrace-controller").await.ok()?.spec?.holder_identity.filter(|h| !h.is_empty())
    })
    .await;

    let name = format!("{}-policy", ns.name);
    apply_policy(&client, &edge_policy(&name, &ns.name, "", 60)).await;
    wait_condition(&client, &name, "Ready", "True").await;
    let counts =
        (first.counter("crosstrace_reconciles_total").await, second.counter("crosstrace_reconciles_total").await);
    assert!(
        (counts.0 > 0.0) != (counts.1 > 0.0),
        "exactly one replica reconciles (leader {holder}), reconciles: {counts:?}"
    );
    let (mut leader, standby) = if counts.0 > 0.0 { (first, second) } else { (second, first) };

    // The leader dies without releasing the lease: the standby takes over once it expires.
    leader.kill();
    let sampling = json!({"spec": {"sampling": {"ratio": "0.5"}}});
    Api::<TracingPolicy>::all(client.clone())
        .patch(&name, &PatchParams::default(), &Patch::Merge(&sampling))
        .await
        .unwrap();
    wait_condition(&client, &name, "Ready", "True").await;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name).get("ingress-nginx-controller").await.unwrap();
    assert_eq!(cm.data.unwrap()["otel-sampler-ratio"], "0.5", "the standby applied the change");
    assert!(standby.counter("crosstrace_reconciles_total").await > 0.0);
    let new_holder =
        leases.get("crosstrace-controller").await.unwrap().spec.unwrap().holder_identity.unwrap_or_default();
    assert_ne!(new_holder, holder, "the lease changed hands");
    assert!(http_get(standby.admin_port, "/healthz").await.contains("ok"));
    assert!(http_get(standby.admin_port, "/readyz").await.contains("ready"));

    delete_policy_and_wait(&client, &name).await;
    assert_restored(&client, &ns.name, &before_cm).await;
}

#[tokio::test]
async fn reconcile_spans_are_exported_over_otlp_and_transitions_are_events() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-otel", json!({})).await;
    ingress_nginx(&client, &ns.name).await;
    // A stand-in OTLP/gRPC collector: it only has to see the exporter's HTTP/2 connection preface.
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let _controller = ControllerProcess::start_with_env(
        18087,
        &controller_kubeconfig(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "500")],
    );
    let name = format!("{}-policy", ns.name);
    apply_policy(&client, &edge_policy(&name, &ns.name, "", 60)).await;
    wait_condition(&client, &name, "Ready", "True").await;

    let (mut stream, _) =
        tokio::time::timeout(PATIENCE, collector.accept()).await.expect("spans exported in time").unwrap();
    let mut preface = [0u8; 24];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut preface).await.unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "an OTLP/gRPC (HTTP/2) export");
    drop(stream);

    let events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone());
    let mine = eventually("events about the policy", || async {
        let list = events.list(&Default::default()).await.ok()?;
        let mine: Vec<_> = list
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()))
            .collect();
        mine.iter().any(|e| e.reason.as_deref() == Some("AllLayersReady")).then_some(mine)
    })
    .await;
    assert!(mine.iter().all(|e| e.reporting_controller.as_deref() == Some("crosstrace")), "{mine:?}");
    delete_policy_and_wait(&client, &name).await;
}

/// JSON pointer, in the TracingPolicy CRD, of the bound that makes `obsDomainId` fit 32 bits.
const OBS_DOMAIN_ID_MAXIMUM: &str = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/network/properties/ipfix/properties/obsDomainId/maximum";

/// While alive, the TracingPolicy CRD lacks the `obsDomainId` bound (as CRDs of earlier releases did);
/// dropped, the CRD of `crds/` is back.
struct LooserCrd;

impl LooserCrd {
    fn apply() -> Self {
        let remove = format!(r#"[{{"op": "remove", "path": "{OBS_DOMAIN_ID_MAXIMUM}"}}]"#);
        let (ok, _, err) = kubectl(&["patch", "crd", "tracingpolicies.crosstrace.dev", "--type=json", "-p", &remove]);
        assert!(ok, "loosening the CRD: {err}");
        LooserCrd
    }
}

impl Drop for LooserCrd {
    fn drop(&mut self) {
        // Not `install_crds`: a panic while unwinding would abort the whole suite.
        let _ = kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &repo("crds")]);
    }
}

/// A policy object deleted when dropped (it never gets a finalizer: no controller can read it).
struct UnreadablePolicy {
    api: Api<DynamicObject>,
    name: String,
}

impl Drop for UnreadablePolicy {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "tracingpolicy", &self.name, "--ignore-not-found", "--wait=false"]);
    }
}

#[tokio::test]
async fn a_policy_that_cannot_be_read_is_reported_and_stops_no_other() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-lenient", json!({})).await;
    let (_, before_cm) = ingress_nginx(&client, &ns.name).await;

    // Stored while the CRD was looser: an observation domain id one past 32 bits.
    let policies = Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<TracingPolicy>(&()));
    let bad = UnreadablePolicy { api: policies.clone(), name: format!("{}-unreadable", ns.name) };
    let bad_policy = json!({
        "apiVersion": "crosstrace.dev/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": bad.name},
        "spec": {"network": {"ipfix": {"targets": ["10.0.0.5:4739"], "obsDomainId": 4_294_967_296u64}}},
    });
    {
        let _looser = LooserCrd::apply();
        eventually("the looser CRD to take the out-of-range policy", || async {
            let apply = PatchParams::apply("e2e-user").force();
            bad.api.patch(&bad.name, &apply, &Patch::Apply(&bad_policy)).await.ok()
        })
        .await;
    }
    install_crds();
    let (accepted, _, err) =
        kubectl(&["apply", "--dry-run=server", "-f", &repo("config/samples/bad/obs-domain-id-too-big.yaml")]);
    assert!(!accepted, "the real CRD refuses the value again: {err}");

    let controller = ControllerProcess::start(18088);
    let name = format!("{}-policy", ns.name);
    apply_policy(&client, &edge_policy(&name, &ns.name, "", 60)).await;
    wait_condition(&client, &name, "Ready", "True").await;

    let events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone());
    let warning = eventually_with(
        "a Warning Event on the policy that cannot be read",
        || controller.log(),
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(bad.name.as_str())
                    && e.reason.as_deref() == Some(INVALID_OBJECT)
            })
        },
    )
    .await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    let note = warning.note.unwrap_or_default();
    assert!(note.contains("spec.network.ipfix.obsDomainId"), "the Event names the field: {note}");

    let ready = eventually("Ready=False on the policy that cannot be read", || async {
        let status = policies.get(&bad.name).await.ok()?.data.get("status").cloned()?;
        let conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> =
            serde_json::from_value(status.get("conditions")?.clone()).ok()?;
        conditions.into_iter().find(|c| c.type_ == "Ready")
    })
    .await;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", INVALID_OBJECT));
    assert!(ready.message.contains("spec.network.ipfix.obsDomainId"), "{}", ready.message);
    let stored = policies.get(&bad.name).await.unwrap();
    assert!(stored.metadata.finalizers.unwrap_or_default().is_empty(), "nothing acted on the unreadable policy");

    delete_policy_and_wait(&client, &name).await;
    assert_restored(&client, &ns.name, &before_cm).await;
    delete_if_exists(&bad.api, &bad.name).await;
    eventually("the unreadable policy to be gone", || async {
        bad.api.get_opt(&bad.name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// `spec.debug`: a time-boxed session raises the sampling of the edge ConfigMap and of the workload env
/// to 1, and at its end (by the clock, kept in the status, so a controller restart in the middle neither
/// ends nor extends it) every value is exactly what it was before.
#[tokio::test]
async fn a_debug_session_raises_sampling_and_its_end_restores_the_exact_values_across_a_restart() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let tag = format!("debug-{}", std::process::id());
    let ns = TestNamespace::create(&client, "e2e-debug", json!({"tracing": tag})).await;
    ingress_nginx(&client, &ns.name).await;
    create_app(&client, &ns.name, "cart", "shop", json!([])).await;
    let mut controller = ControllerProcess::start(18098);

    let name = format!("{}-policy", ns.name);
    let mut spec = json!({
        "collector": {"endpoint": "otel-gateway.observability.svc:4317"},
        "sampling": {"ratio": "0.25", "parentBased": true},
        "ingress": {"namespace": ns.name, "serviceName": "edge"},
        "workloads": {"namespaceSelector": {"matchLabels": {"tracing": tag}}, "kinds": ["Deployment"]},
        "rollout": {"progressDeadlineSeconds": 60},
    });
    apply_policy(&client, &tracing_policy(&name, spec.clone())).await;
    wait_condition(&client, &name, "Ready", "True").await;
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &ns.name);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    let env_of = |d: &Deployment| -> BTreeMap<String, String> {
        let containers = &d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers;
        let app = containers.iter().find(|c| c.name == "app").unwrap();
        app.env.iter().flatten().filter_map(|e| Some((e.name.clone(), e.value.clone()?))).collect()
    };
    let before_cm = config_maps.get("ingress-nginx-controller").await.unwrap().data;
    let before_env = env_of(&deployments.get("cart").await.unwrap());
    assert_eq!(before_env.get("OTEL_TRACES_SAMPLER_ARG").map(String::as_str), Some("0.25"));

    // A 40-second session.
    spec["debug"] = json!({"ratio": "1", "durationSeconds": 40});
    apply_policy(&client, &tracing_policy(&name, spec.clone())).await;
    let raised = eventually("the session's sampling on both layers", || async {
        let cm = config_maps.get("ingress-nginx-controller").await.ok()?.data?;
        let env = env_of(&deployments.get("cart").await.ok()?);
        (cm.get("otel-sampler")?.as_str() == "AlwaysOn"
            && env.get("OTEL_TRACES_SAMPLER")?.as_str() == "parentbased_always_on")
            .then_some(())
    });
    raised.await;
    let api = Api::<TracingPolicy>::all(client.clone());
    let status = api.get(&name).await.unwrap().status.unwrap().debug.expect("status.debug");
    assert!(status.active);
    let expires_at = status.expires_at.0;

    // The controller restarts in the middle: the session keeps its end.
    drop(controller);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    controller = ControllerProcess::start(18098);
    eventually("the new controller's admin port", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", offset_port(18098))).await.ok().map(drop)
    })
    .await;
    eventually("the new controller to reconcile", || async {
        (controller.counter("crosstrace_reconciles_total").await >= 1.0).then_some(())
    })
    .await;
    let again = api.get(&name).await.unwrap().status.unwrap().debug.unwrap();
    assert_eq!(again.expires_at.0, expires_at, "a restart neither ends nor extends the session");

    // At its end: the exact values from before, and the status says it ended.
    eventually("the policy's own sampling back on both layers", || async {
        let cm = config_maps.get("ingress-nginx-controller").await.ok()?.data;
        let env = env_of(&deployments.get("cart").await.ok()?);
        (cm == before_cm && env == before_env).then_some(())
    })
    .await;
    assert!(k8s_openapi::jiff::Timestamp::now() >= expires_at, "not restored before the session's end");
    // The status is written by the reconcile that started the restoring writes, which can land first.
    eventually("the status to say the session ended", || async {
        let debug = api.get(&name).await.ok()?.status?.debug?;
        (!debug.active && debug.expires_at.0 == expires_at).then_some(())
    })
    .await;
    wait_condition(&client, &name, "Ready", "True").await;
    delete_policy_and_wait(&client, &name).await;
}
