//! End to end, on the local real cluster with the chart installed at its defaults (`just e2e` runs
//! e2e/install-chart.sh first): the admin limits hold above policy authors. A policy with a sidecar or
//! ingress image from another repository, a protected namespace, a flow target outside the allowed
//! networks, denser sampling or longer headers than allowed is refused by the API server (the chart's
//! ValidatingAdmissionPolicy crosstrace-admin-limits), the message naming the field; a policy within the
//! limits is accepted. Without the admission policy the controller holds the same line itself.

#[path = "../support/mod.rs"]
mod support;

use crosstrace::api::TracingPolicy;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{PostParams, ResourceExt};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::*;

/// The admission policy and the ConfigMap of limits the chart installs.
const ADMISSION_POLICY: &str = "crosstrace-admin-limits";
const RELEASE_NAMESPACE: &str = "crosstrace-system";

fn policy(name: &str, spec: Value) -> TracingPolicy {
    serde_json::from_value(json!({
        "apiVersion": "crosstrace.dev/v1alpha1",
        "kind": "TracingPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a TracingPolicy")
}

fn collector() -> Value {
    json!({"endpoint": "otel-gateway.observability.svc:4317"})
}

fn sidecar(image: &str) -> Value {
    json!({"collector": collector(), "workloads": {"namespaceSelector": {"matchLabels": {"tracing": "on"}}, "sidecar": {"image": image}}})
}

fn ingress(namespace: &str, image: &str) -> Value {
    json!({"collector": collector(), "ingress": {"namespace": namespace, "image": image}})
}

fn sflow(targets: &[&str], sampling: u32, header: u32) -> Value {
    json!({"network": {"sflow": {"targets": targets, "sampling": sampling, "header": header, "agent": "127.0.0.1"}}})
}

fn ipfix(targets: &[&str]) -> Value {
    json!({"network": {"ipfix": {"targets": targets}}})
}

/// Creates the policy as a server-side dry run (admission runs, nothing is stored): the API error, if any.
async fn create(client: &Client, name: &str, spec: &Value) -> Result<(), kube::core::Status> {
    let api = Api::<TracingPolicy>::all(client.clone());
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    match api.create(&dry_run, &policy(name, spec.clone())).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(*e),
        Err(e) => panic!("creating {name}: {e}"),
    }
}

/// The refusal of a policy by the admin limits (waiting until the chart's admission policy is in force:
/// the API server's policy informer takes a moment after an install).
async fn refusal(client: &Client, name: &str, spec: &Value) -> String {
    eventually(&format!("{name} to be refused by {ADMISSION_POLICY}"), || async {
        match create(client, name, spec).await {
            Err(e) if e.message.contains(ADMISSION_POLICY) => Some(e),
            _ => None,
        }
    })
    .await
    .message
}

#[tokio::test]
async fn policies_beyond_the_admin_limits_are_refused_naming_the_field() {
    let client = client().await;
    install_crds();
    let refused = [
        ("sidecar", sidecar("evil.example/collector:1"), "spec.workloads.sidecar.image: evil.example/collector:1"),
        (
            "sidecar-lookalike",
            sidecar("otel/opentelemetry-collector-k8s-evil:0.165.0"),
            "spec.workloads.sidecar.image: otel/opentelemetry-collector-k8s-evil:0.165.0",
        ),
        ("ingress-image", ingress("ingress-nginx", "x:broken"), "spec.ingress.image: x:broken"),
        ("ingress-kube-system", ingress("kube-system", ""), "spec.ingress.namespace: kube-system is protected"),
        ("ingress-own", ingress(RELEASE_NAMESPACE, ""), "spec.ingress.namespace: crosstrace-system is protected"),
        (
            "gateway-kube-system",
            json!({"collector": collector(), "gateway": {"namespace": "kube-system"}}),
            "spec.gateway.namespace: kube-system is protected",
        ),
        (
            "selector-kube-system",
            json!({"collector": collector(), "workloads": {"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop", "kube-system"]}]}}}),
            "spec.workloads.namespaceSelector: selects the protected namespace kube-system",
        ),
        (
            "sflow-public",
            sflow(&["127.0.0.1:6343", "8.8.8.8:6343"], 400, 128),
            "spec.network.sflow.targets: 8.8.8.8:6343",
        ),
        ("ipfix-public", ipfix(&["[2001:db8::1]:4739"]), "spec.network.ipfix.targets: [2001:db8::1]:4739"),
        ("sflow-header", sflow(&["127.0.0.1:6343"], 400, 512), "spec.network.sflow.header: 512 bytes"),
    ];
    for (case, spec, field) in &refused {
        let message = refusal(&client, &format!("e2e-admin-{case}"), spec).await;
        assert!(message.contains(field), "{case}: the message names the field ({field}): {message}");
        assert!(message.contains("admin limit"), "{case}: the message names the limit: {message}");
    }

    let accepted = [
        ("default-sidecar", sidecar("")),
        ("official-sidecar", sidecar("otel/opentelemetry-collector-k8s:0.165.0")),
        (
            "ghcr-sidecar",
            sidecar("ghcr.io/open-telemetry/opentelemetry-collector-releases/opentelemetry-collector-k8s:0.165.0"),
        ),
        ("official-ingress", ingress("ingress-nginx", "registry.k8s.io/ingress-nginx/controller:v1.12.1")),
        ("gateways", json!({"collector": collector(), "gateway": {"namespace": "infra"}})),
        ("private-flows", sflow(&["127.0.0.1:6343", "10.0.0.5:6343", "[fd00::5]:6343"], 64, 128)),
    ];
    for (case, spec) in &accepted {
        let name = format!("e2e-admin-{case}");
        create(&client, &name, spec).await.unwrap_or_else(|e| panic!("{case} is within the limits: {}", e.message));
    }
}

/// Removes the chart's binding of the admin limits policy for as long as it lives; puts it back (as the
/// chart rendered it) when dropped.
struct WithoutAdmissionPolicy {
    binding: String,
}

impl WithoutAdmissionPolicy {
    fn remove() -> Self {
        let (ok, binding, err) = kubectl(&["get", "validatingadmissionpolicybinding", ADMISSION_POLICY, "-o", "json"]);
        assert!(ok, "the chart's binding {ADMISSION_POLICY} (is the chart installed?): {err}");
        let mut binding: Value = serde_json::from_str(&binding).unwrap();
        for volatile in ["resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"] {
            binding["metadata"].as_object_mut().unwrap().remove(volatile);
        }
        let (ok, _, err) = kubectl(&["delete", "validatingadmissionpolicybinding", ADMISSION_POLICY]);
        assert!(ok, "delete the binding: {err}");
        Self { binding: binding.to_string() }
    }
}

impl Drop for WithoutAdmissionPolicy {
    fn drop(&mut self) {
        let path = std::env::temp_dir().join(format!("e2e-admin-binding-{}.json", std::process::id()));
        std::fs::write(&path, &self.binding).expect("write the binding");
        let (ok, _, err) = kubectl(&["create", "-f", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(&path);
        assert!(ok || std::thread::panicking(), "put the binding back: {err}");
    }
}

/// The chart's ConfigMap of limits, written as the files the chart mounts into the controller pod.
async fn mounted_limits(client: &Client) -> std::path::PathBuf {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), RELEASE_NAMESPACE)
        .get(crosstrace::admin::CONFIG_MAP)
        .await
        .expect("the chart's admin limits ConfigMap");
    let dir = std::env::temp_dir().join(format!("e2e-admin-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (key, value) in cm.data.unwrap_or_default() {
        std::fs::write(dir.join(key), value).unwrap();
    }
    dir
}

#[tokio::test]
async fn without_the_admission_policy_the_controller_writes_nothing_and_reports_the_field() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, RELEASE_NAMESPACE).await;
    let tag = format!("e2e-admin-{}", std::process::id() % 100_000);
    let ns = TestNamespace::create(&client, "e2e-admin", json!({"tracing": tag})).await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    let app: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "api", "namespace": ns.name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}}, "template": {
            "metadata": {"labels": {"app": "api"}},
            "spec": {"containers": [{"name": "app", "image": "shop/app:1"}]}}},
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &app).await.expect("create Deployment");
    let before = deployments.get("api").await.unwrap().spec.unwrap().template;

    let without = WithoutAdmissionPolicy::remove();
    let name = format!("{tag}-evil-sidecar");
    let evil = json!({"collector": collector(), "workloads": {
        "namespaceSelector": {"matchLabels": {"tracing": tag}}, "sidecar": {"image": "evil.example/collector:1"}}});
    // Admitted now that the binding is gone (the informer may take a moment to notice).
    eventually("the policy to be admitted without the admission policy", || async {
        apply_policy_result(&client, &name, &evil).await.then_some(())
    })
    .await;

    let limits = mounted_limits(&client).await;
    let controller = ControllerProcess::start_with_args(
        18095,
        &controller_kubeconfig(),
        &[],
        &["--admin-limits", limits.to_str().unwrap()],
    );
    let api = Api::<TracingPolicy>::all(client.clone());
    let reported = eventually_with(
        "the policy to report the admin limit",
        || controller.log(),
        || async {
            let p = api.get(&name).await.ok()?;
            let conditions = &p.status.as_ref()?.conditions;
            conditions
                .iter()
                .find(|c| c.status != "True" && c.message.contains("spec.workloads.sidecar.image"))
                .cloned()
        },
    )
    .await;
    assert!(reported.message.contains("evil.example/collector:1"), "names the value: {}", reported.message);
    assert_eq!(
        condition(&api.get(&name).await.unwrap(), "Ready").map(|c| c.status.as_str()),
        Some("False"),
        "not Ready"
    );
    assert_eq!(deployments.get("api").await.unwrap().spec.unwrap().template, before, "the workload is untouched");
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &ns.name).list(&Default::default()).await.unwrap();
    assert!(
        config_maps.items.iter().all(|cm| !cm.name_any().starts_with("crosstrace-otel-")),
        "no collector ConfigMap was written"
    );
    let metrics = controller.metrics().await;
    let beyond_the_policy: Vec<&str> = metrics
        .lines()
        // The policy's status and the Events of its transitions are the report; nothing else is written.
        .filter(|l| l.starts_with("crosstrace_api_writes_total{") && !l.contains("resource=\"tracingpolicies\""))
        .filter(|l| !l.contains("resource=\"events\""))
        .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0))
        .collect();
    assert!(beyond_the_policy.is_empty(), "only the policy's status and Events were written: {beyond_the_policy:?}");

    delete_policy_and_wait(&client, &name).await;
    drop(controller);
    drop(without);
    let _ = std::fs::remove_dir_all(limits);
}

/// Applies a policy as a user would; whether the API server took it.
async fn apply_policy_result(client: &Client, name: &str, spec: &Value) -> bool {
    let api = Api::<TracingPolicy>::all(client.clone());
    let policy = serde_json::to_value(policy(name, spec.clone())).unwrap();
    api.patch(name, &kube::api::PatchParams::apply("e2e-user").force(), &kube::api::Patch::Apply(&policy)).await.is_ok()
}
