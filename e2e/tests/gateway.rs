//! End to end, on the local real cluster with the upstream CRDs (Gateway API v1.6.1, Envoy Gateway
//! v1.9.0, NGINX Gateway Fabric v2.6.7, Istio) installed into its API server, so that their OpenAPI
//! schemas and CEL rules validate every object crosstrace writes: one policy traces an Envoy Gateway, an
//! NGINX Gateway Fabric and an Istio Gateway; an EnvoyProxy a Gateway already uses comes back byte for
//! byte; a route added later is traced; a migration in progress traces both edges; the owner acting at
//! the same time is never taken for crosstrace's failure.
//!
//! Envoy Gateway's Gateways get their status from the real controller: [`EnvoyGateway`] runs Envoy
//! Gateway v1.9.0's `envoy-gateway server` (built from its Go module and cached by e2e/build.sh) as a
//! host process against the cluster, with e2e/envoy-gateway.sh, one per test, watching the test's
//! namespace. It accepts the GatewayClass, translates each Gateway with its EnvoyProxy (crosstrace's
//! tracing included: a tracing backend without ready endpoints is refused, `InvalidParameters`), deploys
//! its Envoy proxy as a Deployment and a Service (kwok runs the pods) and sets `Accepted`/`Programmed`
//! from them, as in a real cluster. Its GatewayClasses name an EnvoyProxy with a ClusterIP Service (a
//! cluster without load balancers gives a LoadBalancer Service no address, and Envoy Gateway would never
//! report the Gateway Programmed), and the policy's collector is a Deployment and a Service in the test's
//! namespace, so that the tracing backend has ready endpoints.
//!
//! NGINX Gateway Fabric's and Istio's controllers do not run here: [`Provider`] plays them, as kwok plays
//! the kubelet. It sets `Accepted`/`Programmed` for each Gateway's current generation on the Gateways of
//! their GatewayClasses, and `status.ancestors` (Accepted, for the object's generation) on
//! ObservabilityPolicies. Whether Envoy, NGINX or Istio would really emit spans is not tested.
//!
//! The upstream CRDs are read from `$CROSSTRACE_UPSTREAM` (default `<repo>/../shared/upstream`), never
//! copied into the repository: without them every test here says so and is skipped. Without the
//! envoy-gateway binary (e2e/build.sh) or root (it runs in namespaces of its own), a test that needs it
//! fails, saying so.

#[path = "../support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use crosstrace::layers::gateway::{ENVOY_GATEWAY, ISTIO, Kind, NGINX_GATEWAY_FABRIC};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::*;

/// Where the upstream CRDs are, or `None` (said loudly) when they are not there.
fn upstream() -> Option<PathBuf> {
    let dir = std::env::var_os("CROSSTRACE_UPSTREAM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(repo("../shared/upstream")));
    let crds = dir.join("crds");
    if crds.is_dir() {
        return Some(crds);
    }
    eprintln!(
        "\n*** SKIPPED e2e_gateway: the upstream CRDs (Gateway API, Envoy Gateway, NGINX Gateway Fabric, Istio) are not at {} \
         (set CROSSTRACE_UPSTREAM to the folder holding crds/); the gateway layer is NOT tested end to end ***\n",
        crds.display()
    );
    None
}

/// Installs every upstream CRD and waits until each is served.
fn install_upstream(crds: &PathBuf) {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(crds).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (ok, out, err) =
                kubectl(&["apply", "--server-side", "--force-conflicts", "-o", "name", "-f", path.to_str().unwrap()]);
            assert!(ok, "applying {}: {err}", path.display());
            names.extend(out.lines().map(str::to_string));
        }
    }
    let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
    args.extend(names.iter().map(String::as_str));
    let (ok, _, err) = kubectl(&args);
    assert!(ok, "upstream CRDs not established: {err}");
}

fn api(client: &Client, kind: Kind, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &kind.api_resource())
}

fn suffix() -> u32 {
    std::process::id() % 100_000
}

/// A GatewayClass of a provider; deleted when dropped.
struct GatewayClass {
    name: String,
}

impl GatewayClass {
    async fn create(client: &Client, name: &str, controller: &str, parameters: Option<Value>) -> Self {
        let api = Api::<DynamicObject>::all_with(client.clone(), &Kind::GatewayClass.api_resource());
        let mut spec = json!({"controllerName": controller});
        if let Some(p) = parameters {
            spec["parametersRef"] = p;
        }
        let class = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": name}, "spec": spec});
        api.patch(name, &PatchParams::apply("e2e-owner").force(), &Patch::Apply(&class)).await.expect("GatewayClass");
        Self { name: name.into() }
    }
}

impl Drop for GatewayClass {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "gatewayclass", &self.name, "--wait=false"]);
    }
}

/// Creates a Gateway as its owner would (field manager `e2e-owner`).
async fn gateway(client: &Client, ns: &str, name: &str, class: &str, infrastructure: Option<Value>) -> DynamicObject {
    let mut spec = json!({"gatewayClassName": class, "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]});
    if let Some(i) = infrastructure {
        spec["infrastructure"] = i;
    }
    let body = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns, "labels": {"edge": "public"}, "annotations": {"team": "edge"}},
        "spec": spec,
    });
    api(client, Kind::Gateway, ns)
        .patch(name, &PatchParams::apply("e2e-owner"), &Patch::Apply(&body))
        .await
        .expect("create Gateway")
}

async fn http_route(client: &Client, ns: &str, name: &str, gateway: &str) {
    let body = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"parentRefs": [{"name": gateway}], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]},
    });
    api(client, Kind::HTTPRoute, ns)
        .patch(name, &PatchParams::apply("e2e-owner"), &Patch::Apply(&body))
        .await
        .expect("create HTTPRoute");
}

/// Envoy Gateway's real controller (see the module documentation), watching one namespace; stopped when
/// dropped.
struct EnvoyGateway {
    dir: String,
    namespace: String,
}

/// The class-level EnvoyProxy every Envoy Gateway GatewayClass here names (see the module documentation).
const CLUSTER_IP_PROXY: &str = "cluster-ip";
/// The finalizer Envoy Gateway puts on a GatewayClass while Gateways use it.
const GATEWAY_CLASS_FINALIZER: &str = "gateway-exists-finalizer.gateway.networking.k8s.io";

impl EnvoyGateway {
    async fn start(client: &Client, ns: &str) -> Self {
        let proxy = json!({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyProxy",
            "metadata": {"name": CLUSTER_IP_PROXY, "namespace": ns},
            "spec": {"provider": {"type": "Kubernetes", "kubernetes": {"envoyService": {"type": "ClusterIP"}}}},
        });
        api(client, Kind::EnvoyProxy, ns)
            .patch(CLUSTER_IP_PROXY, &PatchParams::apply("e2e-admin"), &Patch::Apply(&proxy))
            .await
            .expect("the GatewayClass's EnvoyProxy");
        let state =
            std::env::var("CROSSTRACE_E2E_STATE").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
        let dir = format!("{state}/envoy-gateway-{ns}");
        let out = Command::new(repo("e2e/envoy-gateway.sh"))
            .args(["start", &dir, ns])
            .output()
            .expect("e2e/envoy-gateway.sh runs");
        // Built first: dropped, it stops whatever a failed start left.
        let started = Self { dir, namespace: ns.into() };
        assert!(
            out.status.success(),
            "Envoy Gateway's controller did not start; the gateway tests need it (e2e/envoy-gateway.sh start):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        started
    }

    /// A GatewayClass's `parametersRef` to the ClusterIP EnvoyProxy.
    fn class_parameters(&self) -> Value {
        json!({"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": CLUSTER_IP_PROXY, "namespace": self.namespace})
    }
}

impl Drop for EnvoyGateway {
    /// Stops it; if it exited during the test, the test fails saying so (its status was not reported).
    fn drop(&mut self) {
        let script = repo("e2e/envoy-gateway.sh");
        let exited = !Command::new(&script).args(["status", &self.dir]).status().is_ok_and(|s| s.success());
        if std::thread::panicking() || exited {
            let log = std::fs::read_to_string(format!("{}/envoy-gateway.log", self.dir)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of Envoy Gateway's log ({}/envoy-gateway.log) ---", self.dir);
            tail.iter().rev().for_each(|l| eprintln!("{l}"));
        }
        let _ = Command::new(&script).args(["stop", &self.dir]).status();
        // Nobody removes its finalizer from its GatewayClasses once it is stopped: they would stay forever.
        let (_, classes, _) = kubectl(&["get", "gatewayclasses", "-o", "json"]);
        let classes: Value = serde_json::from_str(&classes).unwrap_or_default();
        for class in classes["items"].as_array().into_iter().flatten() {
            let finalizers: Vec<&Value> = class["metadata"]["finalizers"].as_array().into_iter().flatten().collect();
            if class["spec"]["controllerName"] == ENVOY_GATEWAY && finalizers.contains(&&json!(GATEWAY_CLASS_FINALIZER))
            {
                let name = class["metadata"]["name"].as_str().unwrap_or_default();
                let remove = r#"[{"op": "remove", "path": "/metadata/finalizers"}]"#;
                let _ = kubectl(&["patch", "gatewayclass", name, "--type=json", "-p", remove]);
            }
        }
        assert!(
            std::thread::panicking() || !exited,
            "Envoy Gateway's controller exited during the test (its log is above)"
        );
    }
}

/// The collector the policies name (`otel-gateway` in the test's namespace, port 4317): a Deployment, whose
/// pod kwok runs, and its Service. Envoy Gateway accepts an EnvoyProxy's tracing backend only when its
/// Service has ready endpoints.
async fn collector(client: &Client, ns: &str) {
    let labels = json!({"app.kubernetes.io/name": "otel-gateway"});
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "otel-gateway", "namespace": ns, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels},
            "spec": {"containers": [{"name": "otelcol", "image": "otel/opentelemetry-collector-k8s:0.165.0",
                "ports": [{"containerPort": 4317, "name": "otlp-grpc"}]}]}}},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), ns).create(&PostParams::default(), &d).await.expect("collector");
    let s: Service = serde_json::from_value(json!({
        "metadata": {"name": "otel-gateway", "namespace": ns},
        "spec": {"selector": labels, "ports": [{"name": "otlp-grpc", "port": 4317, "targetPort": 4317}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns).create(&PostParams::default(), &s).await.expect("collector Service");
}

/// Plays NGINX Gateway Fabric's and Istio's controllers in one namespace (see the module documentation).
struct Provider {
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    fn start(client: &Client, ns: &str) -> Self {
        let (client, ns) = (client.clone(), ns.to_string());
        let task = tokio::spawn(async move {
            loop {
                report_gateways(&client, &ns).await;
                report_policies(&client, &ns).await;
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        });
        Self { task }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn condition(type_: &str, generation: i64) -> Value {
    json!({"type": type_, "status": "True", "reason": type_, "message": "", "observedGeneration": generation,
        "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

async fn report_gateways(client: &Client, ns: &str) {
    let classes = Api::<DynamicObject>::all_with(client.clone(), &Kind::GatewayClass.api_resource());
    let Ok(classes) = classes.list(&ListParams::default()).await else { return };
    let played: BTreeSet<String> = classes
        .items
        .iter()
        .filter(|c| [NGINX_GATEWAY_FABRIC, ISTIO].iter().any(|p| c.data["spec"]["controllerName"] == *p))
        .map(ResourceExt::name_any)
        .collect();
    let gateways = api(client, Kind::Gateway, ns);
    let Ok(list) = gateways.list(&ListParams::default()).await else { return };
    for g in list.items {
        if !g.data["spec"]["gatewayClassName"].as_str().is_some_and(|c| played.contains(c)) {
            continue;
        }
        let generation = g.metadata.generation.unwrap_or(0);
        let reported = g.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Programmed" && c["observedGeneration"] == generation));
        if reported {
            continue;
        }
        let status =
            json!({"status": {"conditions": [condition("Accepted", generation), condition("Programmed", generation)]}});
        let _ = gateways.patch_status(&g.name_any(), &PatchParams::default(), &Patch::Merge(&status)).await;
    }
}

async fn report_policies(client: &Client, ns: &str) {
    let policies = api(client, Kind::ObservabilityPolicy, ns);
    let Ok(list) = policies.list(&ListParams::default()).await else { return };
    for p in list.items {
        let generation = p.metadata.generation.unwrap_or(0);
        let ancestors: Vec<Value> = routes_gateways(client, ns, &p)
            .await
            .into_iter()
            .map(|gw| {
                json!({"ancestorRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gw, "namespace": ns},
                    "controllerName": NGINX_GATEWAY_FABRIC, "conditions": [condition("Accepted", generation)]})
            })
            .collect();
        if p.data["status"]["ancestors"] == json!(ancestors) {
            continue;
        }
        let status = json!({"status": {"ancestors": ancestors}});
        let _ = policies.patch_status(&p.name_any(), &PatchParams::default(), &Patch::Merge(&status)).await;
    }
}

/// The Gateways the routes an ObservabilityPolicy targets attach to.
async fn routes_gateways(client: &Client, ns: &str, policy: &DynamicObject) -> Vec<String> {
    let mut gateways = Vec::new();
    for target in policy.data["spec"]["targetRefs"].as_array().into_iter().flatten() {
        let kind = if target["kind"] == "GRPCRoute" { Kind::GRPCRoute } else { Kind::HTTPRoute };
        let Ok(route) = api(client, kind, ns).get(target["name"].as_str().unwrap_or_default()).await else { continue };
        for parent in route.data["spec"]["parentRefs"].as_array().into_iter().flatten() {
            gateways.push(parent["name"].as_str().unwrap_or_default().to_string());
        }
    }
    gateways
}

/// What an owner sees of an object: spec, labels and annotations.
fn owned_view(o: &DynamicObject) -> Value {
    json!({"spec": o.data["spec"], "labels": o.metadata.labels, "annotations": o.metadata.annotations})
}

fn gateway_policy(name: &str, ns: &str, extra: Value) -> Value {
    let mut spec = json!({
        "collector": {"endpoint": format!("otel-gateway.{ns}.svc:4317")},
        "sampling": {"ratio": "0.25", "parentBased": true},
        "gateway": {"namespace": ns, "selector": {"matchLabels": {"edge": "public"}}, "serviceName": "edge"},
        "rollout": {"progressDeadlineSeconds": 60},
    });
    spec.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    tracing_policy(name, spec)
}

fn controller() -> ControllerProcess {
    ControllerProcess::start_with_args(
        18151,
        &controller_kubeconfig(),
        &[],
        &["--istio-tracing-provider", "otel-tracing"],
    )
}

#[tokio::test]
async fn one_policy_traces_envoy_nginx_and_istio_gateways_and_reverts_them() {
    let Some(crds) = upstream() else { return };
    let client = client().await;
    install_crds();
    install_upstream(&crds);
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-gw", json!({})).await;
    collector(&client, &ns.name).await;
    let envoy_gateway = EnvoyGateway::start(&client, &ns.name).await;
    let n = suffix();
    let _envoy =
        GatewayClass::create(&client, &format!("envoy-{n}"), ENVOY_GATEWAY, Some(envoy_gateway.class_parameters()))
            .await;
    let _nginx = GatewayClass::create(&client, &format!("nginx-{n}"), NGINX_GATEWAY_FABRIC, None).await;
    let _istio = GatewayClass::create(&client, &format!("istio-{n}"), ISTIO, None).await;
    let _other = GatewayClass::create(&client, &format!("other-{n}"), "example.com/gateway-controller", None).await;
    let mut before = BTreeMap::new();
    for (name, class) in [("eg", "envoy"), ("ngf", "nginx"), ("istio", "istio")] {
        let g = gateway(&client, &ns.name, name, &format!("{class}-{n}"), None).await;
        before.insert(name, owned_view(&g));
    }
    http_route(&client, &ns.name, "web", "ngf").await;
    // The mesh team's own Telemetry on the Istio Gateway (GEP-713): reported, never touched.
    let theirs = json!({
        "apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
        "metadata": {"name": "mesh-team", "namespace": ns.name},
        "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "istio"}],
            "accessLogging": [{"providers": [{"name": "envoy"}]}]},
    });
    let telemetries = api(&client, Kind::Telemetry, &ns.name);
    let theirs_before =
        telemetries.patch("mesh-team", &PatchParams::apply("mesh-team"), &Patch::Apply(&theirs)).await.unwrap();
    let their_policy = json!({
        "apiVersion": "gateway.nginx.org/v1alpha2", "kind": "ObservabilityPolicy",
        "metadata": {"name": "mesh-team", "namespace": ns.name},
        "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "web"}],
            "tracing": {"strategy": "parent"}},
    });
    api(&client, Kind::ObservabilityPolicy, &ns.name)
        .patch("mesh-team", &PatchParams::apply("mesh-team"), &Patch::Apply(&their_policy))
        .await
        .unwrap();
    let _provider = Provider::start(&client, &ns.name);
    let controller = controller();

    let name = format!("{}-policy", ns.name);
    apply_policy(&client, &gateway_policy(&name, &ns.name, json!({}))).await;
    let p = wait_condition(&client, &name, "Ready", "True").await;
    assert_eq!(p.status.as_ref().unwrap().gateway.as_ref().unwrap().summary, "3/3");
    let (status, message) = condition_of(&p, "GatewayReady");
    assert_eq!(status, "True");
    assert!(
        message.contains("Telemetry") && message.contains("mesh-team") && message.contains("not fought"),
        "{message}"
    );
    assert!(message.contains("ObservabilityPolicy") && message.contains("/mesh-team"), "{message}");

    // Envoy Gateway: its own EnvoyProxy with the exact fraction, the Gateway pointed at it.
    let envoy = api(&client, Kind::EnvoyProxy, &ns.name).get("crosstrace-eg").await.expect("crosstrace's EnvoyProxy");
    let tracing = &envoy.data["spec"]["telemetry"]["tracing"];
    assert_eq!(tracing["samplingFraction"], json!({"numerator": 1, "denominator": 4}));
    assert_eq!(tracing["provider"]["backendRefs"][0]["name"], "otel-gateway");
    assert_eq!(tracing["provider"]["backendRefs"][0]["namespace"], ns.name.as_str());
    assert_eq!(envoy.data["spec"]["mergeType"], "StrategicMerge", "the class's EnvoyProxy still applies");
    let eg = api(&client, Kind::Gateway, &ns.name).get("eg").await.unwrap();
    assert_eq!(eg.data["spec"]["infrastructure"]["parametersRef"]["name"], "crosstrace-eg");
    // Programmed by Envoy Gateway itself, for the generation crosstrace wrote, from its proxy's Deployment.
    let conditions = eg.data["status"]["conditions"].as_array().expect("the Gateway's conditions");
    let programmed = conditions.iter().find(|c| c["type"] == "Programmed").expect("Programmed");
    assert_eq!(
        (&programmed["status"], &programmed["observedGeneration"]),
        (&json!("True"), &json!(eg.metadata.generation))
    );
    assert!(programmed["message"].as_str().is_some_and(|m| m.contains("envoy replicas available")), "{programmed}");
    // NGF: the NginxProxy and the route's ObservabilityPolicy at 25 percent.
    let nginx = api(&client, Kind::NginxProxy, &ns.name).get("crosstrace-ngf").await.expect("crosstrace's NginxProxy");
    assert_eq!(nginx.data["spec"]["telemetry"]["exporter"]["endpoint"], format!("otel-gateway.{}.svc:4317", ns.name));
    let observability = api(&client, Kind::ObservabilityPolicy, &ns.name);
    let web = observability.get("crosstrace-web").await.expect("the route's ObservabilityPolicy");
    assert_eq!(web.data["spec"]["tracing"]["ratio"], 25);
    // Istio: a Telemetry targeting the Gateway at 25 percent, with the operator's provider.
    let telemetry = api(&client, Kind::Telemetry, &ns.name).get("crosstrace-istio").await.expect("a Telemetry");
    assert_eq!(telemetry.data["spec"]["tracing"][0]["randomSamplingPercentage"], 25);
    assert_eq!(telemetry.data["spec"]["tracing"][0]["providers"][0]["name"], "otel-tracing");
    assert_eq!(telemetry.data["spec"]["targetRefs"][0]["name"], "istio");

    let (ok, table, _) = kubectl(&["get", "tracingpolicies", &name]);
    assert!(ok);
    let columns: BTreeMap<String, String> = printed_columns(&table).into_iter().collect();
    assert_eq!(columns.get("GATEWAYS").map(String::as_str), Some("3/3"), "{table}");
    let targets = controller.metrics().await;
    assert!(
        targets.lines().any(|l| l.starts_with("crosstrace_targets{")
            && l.contains("layer=\"gateway\"")
            && l.contains("state=\"ready\"")
            && l.ends_with(" 3")),
        "crosstrace_targets{{layer=\"gateway\",state=\"ready\"}} 3 in:\n{targets}"
    );

    // A route added later gets its ObservabilityPolicy.
    http_route(&client, &ns.name, "later", "ngf").await;
    eventually("the later route's ObservabilityPolicy", || async { observability.get("crosstrace-later").await.ok() })
        .await;
    wait_condition(&client, &name, "Ready", "True").await;

    // A Gateway of a provider crosstrace does not trace: reported by name, nothing written.
    gateway(&client, &ns.name, "other", &format!("other-{n}"), None).await;
    let p = wait_reason(&client, &name, "GatewayReady", "UnsupportedProvider").await;
    assert!(condition_of(&p, "GatewayReady").1.contains("example.com/gateway-controller"));
    let other = api(&client, Kind::Gateway, &ns.name).get("other").await.unwrap();
    assert!(other.data["spec"].get("infrastructure").is_none());
    api(&client, Kind::Gateway, &ns.name).delete("other", &Default::default()).await.unwrap();

    delete_policy_and_wait(&client, &name).await;
    for (gw, view) in &before {
        let now = api(&client, Kind::Gateway, &ns.name).get(gw).await.unwrap();
        assert_eq!(&owned_view(&now), view, "Gateway {gw} is as before");
    }
    for kind in [Kind::EnvoyProxy, Kind::NginxProxy, Kind::ObservabilityPolicy, Kind::Telemetry] {
        let left = api(&client, kind, &ns.name).list(&ListParams::default()).await.unwrap().items;
        let left: Vec<String> =
            left.iter().map(|o| o.name_any()).filter(|n| n != "mesh-team" && n != CLUSTER_IP_PROXY).collect();
        assert!(left.is_empty(), "{kind:?} left behind: {left:?}");
    }
    let theirs_after = telemetries.get("mesh-team").await.expect("the mesh team's Telemetry stays");
    assert_eq!(owned_view(&theirs_after), owned_view(&theirs_before), "and is untouched");
    assert!(api(&client, Kind::ObservabilityPolicy, &ns.name).get_opt("mesh-team").await.unwrap().is_some());
    drop(controller);
}

fn condition_of(p: &crosstrace::api::TracingPolicy, type_: &str) -> (String, String) {
    let c = support::condition(p, type_).unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.message.clone())
}

/// An EnvoyProxy of the owner's, named by the Gateway, with settings of its own. Without `mergeType` it
/// replaces the GatewayClass's EnvoyProxy, so it says ClusterIP itself, as its owner would on this cluster.
async fn owners_envoy_proxy(client: &Client, ns: &str) -> DynamicObject {
    let body = json!({
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyProxy",
        "metadata": {"name": "custom", "namespace": ns, "labels": {"team": "edge"}, "annotations": {"owner": "edge-team"}},
        "spec": {"logging": {"level": {"default": "warn"}}, "telemetry": {"metrics": {"prometheus": {"disable": true}}},
            "provider": {"type": "Kubernetes", "kubernetes": {"envoyService": {"type": "ClusterIP"}}}},
    });
    api(client, Kind::EnvoyProxy, ns)
        .patch("custom", &PatchParams::apply("e2e-owner"), &Patch::Apply(&body))
        .await
        .expect("create EnvoyProxy")
}

fn custom_ref() -> Value {
    json!({"parametersRef": {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": "custom"}})
}

#[tokio::test]
async fn an_envoy_proxy_the_gateway_already_uses_is_byte_equal_after_delete() {
    let Some(crds) = upstream() else { return };
    let client = client().await;
    install_crds();
    install_upstream(&crds);
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-gw-merge", json!({})).await;
    collector(&client, &ns.name).await;
    let envoy_gateway = EnvoyGateway::start(&client, &ns.name).await;
    let class = format!("envoy-merge-{}", suffix());
    let _class = GatewayClass::create(&client, &class, ENVOY_GATEWAY, Some(envoy_gateway.class_parameters())).await;
    let proxy_before = owned_view(&owners_envoy_proxy(&client, &ns.name).await);
    let gateway_before = owned_view(&gateway(&client, &ns.name, "eg", &class, Some(custom_ref())).await);
    let controller = controller();

    let name = format!("{}-policy", ns.name);
    apply_policy(&client, &gateway_policy(&name, &ns.name, json!({"sampling": {"ratio": "0.333"}}))).await;
    wait_condition(&client, &name, "Ready", "True").await;
    let proxies = api(&client, Kind::EnvoyProxy, &ns.name);
    let proxy = proxies.get("custom").await.unwrap();
    let tracing = &proxy.data["spec"]["telemetry"]["tracing"];
    assert_eq!(tracing["samplingFraction"], json!({"numerator": 333, "denominator": 1000}));
    assert_eq!(
        proxy.data["spec"]["telemetry"]["metrics"],
        json!({"prometheus": {"disable": true}}),
        "the owner's field stays"
    );
    assert_eq!(proxy.data["spec"]["logging"], json!({"level": {"default": "warn"}}));
    assert!(proxies.get_opt("crosstrace-eg").await.unwrap().is_none(), "no EnvoyProxy of crosstrace's own");

    delete_policy_and_wait(&client, &name).await;
    assert_eq!(
        owned_view(&proxies.get("custom").await.unwrap()),
        proxy_before,
        "the EnvoyProxy is byte-equal to before"
    );
    let gateway_after = api(&client, Kind::Gateway, &ns.name).get("eg").await.unwrap();
    assert_eq!(owned_view(&gateway_after), gateway_before, "the Gateway is byte-equal to before");
    drop(controller);
}

#[tokio::test]
async fn the_owner_acting_at_the_same_time_is_never_crosstraces_failure() {
    let Some(crds) = upstream() else { return };
    let client = client().await;
    install_crds();
    install_upstream(&crds);
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-gw-owner", json!({})).await;
    collector(&client, &ns.name).await;
    let envoy_gateway = EnvoyGateway::start(&client, &ns.name).await;
    let class = format!("envoy-owner-{}", suffix());
    let _class = GatewayClass::create(&client, &class, ENVOY_GATEWAY, Some(envoy_gateway.class_parameters())).await;
    owners_envoy_proxy(&client, &ns.name).await;
    gateway(&client, &ns.name, "eg", &class, Some(custom_ref())).await;
    let controller = controller();
    let name = format!("{}-policy", ns.name);
    apply_policy(&client, &gateway_policy(&name, &ns.name, json!({}))).await;
    wait_condition(&client, &name, "Ready", "True").await;
    let writes = tracing_writes(&controller).await;

    // The owner edits the Gateway's listeners (another field manager; a new generation its controller
    // programs) and their own EnvoyProxy fields, several times, while the policy is converged.
    let gateways = api(&client, Kind::Gateway, &ns.name);
    let proxies = api(&client, Kind::EnvoyProxy, &ns.name);
    for i in 0..3 {
        let listeners = json!({"spec": {"listeners": [{"name": "http", "port": 80, "protocol": "HTTP"},
            {"name": format!("alt-{i}"), "port": 8080 + i, "protocol": "HTTP"}]}});
        gateways
            .patch(
                "eg",
                &PatchParams { field_manager: Some("helm".into()), ..Default::default() },
                &Patch::Merge(&listeners),
            )
            .await
            .unwrap();
        let logging = json!({"spec": {"logging": {"level": {"default": if i % 2 == 0 { "debug" } else { "info" }}}}});
        proxies
            .patch(
                "custom",
                &PatchParams { field_manager: Some("helm".into()), ..Default::default() },
                &Patch::Merge(&logging),
            )
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    }
    let p = wait_condition(&client, &name, "Ready", "True").await;
    assert_eq!(condition_of(&p, "Degraded").0, "False", "nothing rolled back");
    assert_eq!(tracing_writes(&controller).await, writes, "the owner's edits make crosstrace write no tracing object");
    let proxy = proxies.get("custom").await.unwrap();
    assert_eq!(proxy.data["spec"]["logging"]["level"]["default"], "debug", "the owner's value stays");

    // Someone else changes the tracing crosstrace wrote: drift, written again, an Event and a metric.
    let tamper = json!({"spec": {"telemetry": {"tracing": {"samplingFraction": {"numerator": 1, "denominator": 1}}}}});
    proxies
        .patch(
            "custom",
            &PatchParams { field_manager: Some("helm".into()), ..Default::default() },
            &Patch::Merge(&tamper),
        )
        .await
        .unwrap();
    eventually("the sampling fraction written again", || async {
        let p = proxies.get("custom").await.ok()?;
        (p.data["spec"]["telemetry"]["tracing"]["samplingFraction"] == json!({"numerator": 1, "denominator": 4}))
            .then_some(())
    })
    .await;
    drift_reported(&client, &controller, "gateway", &name, &["Gateway", "/eg"]).await;

    delete_policy_and_wait(&client, &name).await;
    let proxy = proxies.get("custom").await.unwrap();
    assert!(proxy.data["spec"]["telemetry"].get("tracing").is_none(), "crosstrace's field is gone");
    assert_eq!(proxy.data["spec"]["logging"]["level"]["default"], "debug", "the owner's last value stays");
    let gw = gateways.get("eg").await.unwrap();
    assert_eq!(gw.data["spec"]["listeners"].as_array().unwrap().len(), 2, "the owner's listeners stay");
    assert_eq!(gw.data["spec"]["infrastructure"], custom_ref());
    drop(controller);
}

/// Writes the controller made to Gateways, the providers' objects and its ledger (not its status and
/// Events: a Gateway its owner changed is briefly not programmed, which is reported).
async fn tracing_writes(controller: &ControllerProcess) -> f64 {
    let metrics = controller.metrics().await;
    let resources = ["gateways", "envoyproxies", "nginxproxies", "observabilitypolicies", "telemetries", "configmaps"];
    metrics
        .lines()
        .filter(|l| l.starts_with("crosstrace_api_writes_total{"))
        .filter(|l| resources.iter().any(|r| l.contains(&format!("resource=\"{r}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An ingress-nginx-shaped controller and its ConfigMap (see e2e/tests/edge.rs).
async fn ingress_nginx(client: &Client, ns: &str) -> ConfigMap {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), ns);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "ingress-nginx-controller", "namespace": ns},
        "data": {"use-forwarded-headers": "true"},
    }))
    .unwrap();
    let cm = cms.create(&PostParams::default(), &cm).await.expect("create ConfigMap");
    let labels = json!({"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"});
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "ingress-nginx-controller", "namespace": ns, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels},
            "spec": {"containers": [{"name": "controller", "image": "registry.k8s.io/ingress-nginx/controller:v1.15.1",
                "args": ["/nginx-ingress-controller", "--configmap=$(POD_NAMESPACE)/ingress-nginx-controller"]}]}}},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .expect("create Deployment");
    cm
}

#[tokio::test]
async fn a_migration_in_progress_traces_both_edges() {
    let Some(crds) = upstream() else { return };
    let client = client().await;
    install_crds();
    install_upstream(&crds);
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-gw-migrate", json!({})).await;
    collector(&client, &ns.name).await;
    let envoy_gateway = EnvoyGateway::start(&client, &ns.name).await;
    let class = format!("envoy-migrate-{}", suffix());
    let _class = GatewayClass::create(&client, &class, ENVOY_GATEWAY, Some(envoy_gateway.class_parameters())).await;
    let cm_before = ingress_nginx(&client, &ns.name).await;
    let gateway_before = owned_view(&gateway(&client, &ns.name, "eg", &class, None).await);
    let controller = controller();

    let name = format!("{}-policy", ns.name);
    let ingress = json!({"ingress": {"namespace": ns.name, "serviceName": "edge"}});
    apply_policy(&client, &gateway_policy(&name, &ns.name, ingress)).await;
    let p = wait_condition(&client, &name, "Ready", "True").await;
    assert_eq!(condition_of(&p, "IngressReady").0, "True");
    assert_eq!(condition_of(&p, "GatewayReady").0, "True");
    let status = p.status.as_ref().unwrap();
    assert_eq!(status.ingress.as_ref().unwrap().summary, "1/1");
    assert_eq!(status.gateway.as_ref().unwrap().summary, "1/1");
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns.name);
    let cm = cms.get("ingress-nginx-controller").await.unwrap();
    assert_eq!(cm.data.as_ref().unwrap().get("otel-sampler-ratio").map(String::as_str), Some("0.25"));
    let envoy = api(&client, Kind::EnvoyProxy, &ns.name).get("crosstrace-eg").await.unwrap();
    assert_eq!(envoy.data["spec"]["telemetry"]["tracing"]["samplingFraction"]["denominator"], 4);
    let (ok, table, _) = kubectl(&["get", "tracingpolicies", &name]);
    assert!(ok);
    let columns: BTreeMap<String, String> = printed_columns(&table).into_iter().collect();
    assert_eq!((columns["INGRESS"].as_str(), columns["GATEWAYS"].as_str()), ("1/1", "1/1"), "{table}");

    // The migration ends: spec.ingress goes, the ingress controller is reverted, the Gateway stays traced.
    let remove = r#"[{"op": "remove", "path": "/spec/ingress"}]"#;
    let (ok, _, err) = kubectl(&["patch", "tracingpolicy", &name, "--type=json", "-p", remove]);
    assert!(ok, "removing spec.ingress: {err}");
    let p = wait_condition(&client, &name, "Ready", "True").await;
    assert!(p.status.as_ref().unwrap().ingress.is_none());
    eventually("the ingress ConfigMap as before", || async {
        let cm = cms.get("ingress-nginx-controller").await.ok()?;
        (cm.data == cm_before.data).then_some(())
    })
    .await;
    assert!(api(&client, Kind::EnvoyProxy, &ns.name).get_opt("crosstrace-eg").await.unwrap().is_some());

    delete_policy_and_wait(&client, &name).await;
    let gateway_after = api(&client, Kind::Gateway, &ns.name).get("eg").await.unwrap();
    assert_eq!(owned_view(&gateway_after), gateway_before);
    drop(controller);
}

/// Envoy Gateway refuses an EnvoyProxy whose tracing backend has no Service (`Accepted: False`,
/// `InvalidParameters`): here the policy's collector is not deployed.
#[tokio::test]
async fn a_change_the_gateways_controller_refuses_is_rolled_back_exactly() {
    let Some(crds) = upstream() else { return };
    let client = client().await;
    install_crds();
    install_upstream(&crds);
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-gw-refused", json!({})).await;
    let envoy_gateway = EnvoyGateway::start(&client, &ns.name).await;
    let class = format!("envoy-refused-{}", suffix());
    let _class = GatewayClass::create(&client, &class, ENVOY_GATEWAY, Some(envoy_gateway.class_parameters())).await;
    gateway(&client, &ns.name, "eg", &class, None).await;
    let gateways = api(&client, Kind::Gateway, &ns.name);
    let before = owned_view(&gateways.get("eg").await.unwrap());
    let controller = controller();

    let name = format!("{}-policy", ns.name);
    apply_policy(&client, &gateway_policy(&name, &ns.name, json!({}))).await;
    let p = wait_reason(&client, &name, "Degraded", "RolledBack").await;
    let message = condition_of(&p, "Degraded").1;
    assert!(message.contains("not Accepted") && message.contains("InvalidParameters"), "{message}");
    assert!(message.contains("otel-gateway"), "Envoy Gateway's own reason: {message}");
    assert_eq!(condition_of(&p, "GatewayReady").0, "False");
    assert_eq!(owned_view(&gateways.get("eg").await.unwrap()), before, "the Gateway is as before");
    let proxies = api(&client, Kind::EnvoyProxy, &ns.name);
    assert!(proxies.get_opt("crosstrace-eg").await.unwrap().is_none(), "crosstrace's EnvoyProxy is gone");

    // Not retried for this generation: no new write while the policy stays as it is.
    let writes = tracing_writes(&controller).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(tracing_writes(&controller).await, writes, "a rolled-back generation is not retried");

    delete_policy_and_wait(&client, &name).await;
    assert_eq!(owned_view(&gateways.get("eg").await.unwrap()), before);
    drop(controller);
}

/// Removes the Gateway CRD for a while (every other test installs it again, and so does this one at its end).
#[tokio::test]
async fn a_cluster_without_the_gateway_api_is_told_so_and_the_other_layers_work() {
    let Some(crds) = upstream() else { return };
    let client = client().await;
    install_crds();
    install_upstream(&crds);
    ensure_namespace(&client, "crosstrace-system").await;
    let (ok, _, err) = kubectl(&["delete", "crd", "gateways.gateway.networking.k8s.io", "--wait=true"]);
    assert!(ok, "deleting the Gateway CRD: {err}");
    eventually("the Gateway API to be gone from discovery", || async {
        let served = crosstrace::layers::gateway::served(&client, Kind::Gateway).await.ok()?;
        (!served).then_some(())
    })
    .await;
    let ns = TestNamespace::create(&client, "e2e-gw-none", json!({})).await;
    ingress_nginx(&client, &ns.name).await;
    let controller = controller();

    let name = format!("{}-policy", ns.name);
    let ingress = json!({"ingress": {"namespace": ns.name, "serviceName": "edge"}});
    apply_policy(&client, &gateway_policy(&name, &ns.name, ingress)).await;
    let p = wait_reason(&client, &name, "GatewayReady", "GatewayAPINotInstalled").await;
    assert!(condition_of(&p, "GatewayReady").1.contains("not installed"));
    let p = wait_condition(&client, &name, "IngressReady", "True").await;
    assert_eq!(p.status.as_ref().unwrap().gateway.as_ref().unwrap().summary, "0/0");
    assert!(!controller.log().contains("panicked"));
    delete_policy_and_wait(&client, &name).await;
    drop(controller);
    install_upstream(&crds);
}

#[tokio::test]
async fn a_gateway_an_older_policy_traces_stays_that_policys() {
    let Some(crds) = upstream() else { return };
    let client = client().await;
    install_crds();
    install_upstream(&crds);
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-gw-senior", json!({})).await;
    let class = format!("istio-senior-{}", suffix());
    let _class = GatewayClass::create(&client, &class, ISTIO, None).await;
    gateway(&client, &ns.name, "edge", &class, None).await;
    let _provider = Provider::start(&client, &ns.name);
    let controller = controller();

    // Seniority is creation time, then name: the names agree with the order, whatever the clock's second.
    let older = format!("{}-a-older", ns.name);
    apply_policy(&client, &gateway_policy(&older, &ns.name, json!({}))).await;
    wait_condition(&client, &older, "Ready", "True").await;
    let newer = format!("{}-b-newer", ns.name);
    apply_policy(&client, &gateway_policy(&newer, &ns.name, json!({"sampling": {"ratio": "1"}}))).await;
    let p = wait_reason(&client, &newer, "Degraded", "Conflict").await;
    assert!(condition_of(&p, "Degraded").1.contains(&older), "names the older policy");
    let telemetry = api(&client, Kind::Telemetry, &ns.name).get("crosstrace-edge").await.unwrap();
    assert_eq!(
        telemetry.data["spec"]["tracing"][0]["randomSamplingPercentage"], 25,
        "the older policy's sampling stays"
    );

    // The older one goes: its revert done, the newer takes the Gateway.
    delete_policy_and_wait(&client, &older).await;
    wait_condition(&client, &newer, "Ready", "True").await;
    let telemetry = api(&client, Kind::Telemetry, &ns.name).get("crosstrace-edge").await.unwrap();
    assert_eq!(telemetry.data["spec"]["tracing"][0]["randomSamplingPercentage"], 100);
    delete_policy_and_wait(&client, &newer).await;
    assert!(api(&client, Kind::Telemetry, &ns.name).get_opt("crosstrace-edge").await.unwrap().is_none());
    drop(controller);
}
