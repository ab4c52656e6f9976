//! Shared helpers of the end-to-end tests. They run against the local real cluster started by
//! `e2e/cluster.sh up` (its `env` verb gives KUBECONFIG and PATH); without it they fail, loudly.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crosstrace::api::TracingPolicy;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any wait in these tests may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// A client for the local cluster; panics with instructions when there is none.
pub async fn client() -> Client {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: start the local cluster with `e2e/cluster.sh up` and `eval \"$(e2e/cluster.sh env)\"`, or run `just e2e`"
    );
    let client = Client::try_default().await.expect("a kube client from KUBECONFIG");
    client.apiserver_version().await.expect("the local cluster's API server answers (is `e2e/cluster.sh up` running?)");
    client
}

/// The kubeconfig of the chart's controller ServiceAccount, written by `just e2e`.
pub fn controller_kubeconfig() -> String {
    std::env::var("CROSSTRACE_E2E_CONTROLLER_KUBECONFIG").expect(
        "CROSSTRACE_E2E_CONTROLLER_KUBECONFIG is not set: `just e2e` installs the chart and writes a kubeconfig \
         for its controller ServiceAccount (e2e/sa-kubeconfig.sh crosstrace-system crosstrace-controller FILE)",
    )
}

/// Runs kubectl (the cluster's own, first on PATH from `cluster.sh env`) and returns (success, stdout, stderr).
pub fn kubectl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("kubectl").args(args).output().expect("kubectl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Path of a file in the repository.
pub fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// Installs the CRDs from `crds/` (as a user would) and waits until they are served.
pub fn install_crds() {
    let (ok, _, err) = kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &repo("crds")]);
    assert!(ok, "applying crds/: {err}");
    let (ok, _, err) = kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/tracingpolicies.crosstrace.dev",
        "crd/nodetracings.crosstrace.dev",
    ]);
    assert!(ok, "CRDs not established: {err}");
}

/// A namespace that is deleted when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str, labels: serde_json::Value) -> Self {
        let name = format!("{prefix}-{}", std::process::id() % 100_000);
        let api = Api::<Namespace>::all(client.clone());
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
        api.patch(&name, &PatchParams::apply("crosstrace-e2e").force(), &Patch::Apply(&ns))
            .await
            .expect("create namespace");
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .args(["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"])
            .output();
    }
}

/// Ensures a namespace exists (for the controller's Lease).
pub async fn ensure_namespace(client: &Client, name: &str) {
    let api = Api::<Namespace>::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    api.patch(name, &PatchParams::apply("crosstrace-e2e").force(), &Patch::Apply(&ns)).await.expect("namespace");
}

/// A `crosstrace controller` host process, killed (by its PID) when dropped.
pub struct ControllerProcess {
    child: Child,
    pub admin_port: u16,
}

impl ControllerProcess {
    /// Starts the controller authenticated as the chart's `crosstrace-controller` ServiceAccount (the
    /// kubeconfig `just e2e` writes), so that every suite also proves the chart's RBAC is enough.
    pub fn start(admin_port: u16) -> Self {
        Self::start_with(admin_port, &controller_kubeconfig())
    }

    /// Starts the controller with the given kubeconfig.
    pub fn start_with(admin_port: u16, kubeconfig: &str) -> Self {
        Self::start_with_env(admin_port, kubeconfig, &[])
    }

    /// Starts the controller with the given kubeconfig and extra environment.
    pub fn start_with_env(admin_port: u16, kubeconfig: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with_args(admin_port, kubeconfig, env, &[])
    }

    /// Starts the controller with the given kubeconfig, extra environment and extra arguments.
    pub fn start_with_args(admin_port: u16, kubeconfig: &str, env: &[(&str, &str)], args: &[&str]) -> Self {
        let admin_port = offset_port(admin_port);
        let log = std::fs::File::create(format!("{}/controller-{admin_port}.log", std::env::temp_dir().display()))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crosstrace"));
        cmd.args([
            "controller",
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
            "--namespace",
            "crosstrace-system",
        ])
        .args(["--lease-duration", "6"])
        .args(args)
        .env("RUST_LOG", log_filter())
        .stdout(Stdio::null())
        .stderr(log);
        cmd.env("KUBECONFIG", kubeconfig).envs(env.iter().copied());
        Self { child: cmd.spawn().expect("start crosstrace controller"), admin_port }
    }

    /// The controller's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(format!("{}/controller-{}.log", std::env::temp_dir().display(), self.admin_port))
            .unwrap_or_default()
    }

    /// The process id (in the Lease, a replica's identity ends with it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. `STOP`, `CONT`) to this process, and to no other.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {}", self.child.id());
    }

    /// How the process ended, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Whether the process has ended (by itself).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fetches `/metrics` from the admin port.
    pub async fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics").await
    }

    /// Sum of every sample of a counter family in `/metrics`.
    pub async fn counter(&self, family: &str) -> f64 {
        sum_samples(&self.metrics().await, family)
    }
}

impl Drop for ControllerProcess {
    /// Stops gracefully (SIGTERM: the lease is released for the next test), then kills.
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Stops a process this test started: SIGTERM, up to 5 s to exit, then SIGKILL.
pub fn stop(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    for _ in 0..50 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A port of the suites' fixed range (18000-18999), moved by `CROSSTRACE_E2E_PORT_OFFSET` as the cluster's
/// ports are, so that suites on two clusters side by side do not collide; any other port (taken free at
/// run time) as it is.
pub fn offset_port(port: u16) -> u16 {
    let offset: u16 = std::env::var("CROSSTRACE_E2E_PORT_OFFSET").ok().and_then(|o| o.parse().ok()).unwrap_or(0);
    if (18_000..19_000).contains(&port) { port.saturating_add(offset) } else { port }
}

/// Sum of the samples of one metric family in Prometheus text.
pub fn sum_samples(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A plain HTTP/1.0 GET on loopback.
pub async fn http_get(port: u16, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("admin port answers");
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// Polls `check` every 250 ms until it returns Some, or panics with `what` after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_with(what, String::new, check).await
}

/// [`eventually`], with `context()` (e.g. process logs) appended to the panic message on timeout.
pub async fn eventually_with<T, F, Fut>(what: &str, context: impl FnOnce() -> String, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {PATIENCE:?} waiting for {what}\n{}", context());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A TracingPolicy named `name` with `spec`, as a user writes one.
pub fn tracing_policy(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "crosstrace.dev/v1alpha1", "kind": "TracingPolicy", "metadata": {"name": name}, "spec": spec})
}

/// Applies a TracingPolicy (server-side, as a user would).
pub async fn apply_policy(client: &Client, policy: &serde_json::Value) {
    let api = Api::<TracingPolicy>::all(client.clone());
    let name = policy["metadata"]["name"].as_str().unwrap();
    api.patch(name, &PatchParams::apply("e2e-user").force(), &Patch::Apply(policy)).await.expect("apply policy");
}

/// A condition of a policy's status.
pub fn condition<'a>(p: &'a TracingPolicy, type_: &str) -> Option<&'a Condition> {
    p.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

/// Waits until a policy has the condition with that status, for its current generation.
pub async fn wait_condition(client: &Client, name: &str, type_: &str, status: &str) -> TracingPolicy {
    wait_condition_where(client, name, type_, &format!("={status}"), |c| c.status == status).await
}

/// Waits until a policy's condition has this reason, for its current generation.
pub async fn wait_reason(client: &Client, name: &str, type_: &str, reason: &str) -> TracingPolicy {
    wait_condition_where(client, name, type_, &format!(" reason {reason}"), |c| c.reason == reason).await
}

async fn wait_condition_where(
    client: &Client,
    name: &str,
    type_: &str,
    what: &str,
    holds: impl Fn(&Condition) -> bool,
) -> TracingPolicy {
    let api = Api::<TracingPolicy>::all(client.clone());
    eventually(&format!("{name}: {type_}{what}"), || async {
        let p = api.get(name).await.ok()?;
        let c = condition(&p, type_)?;
        (holds(c) && c.observed_generation == p.metadata.generation).then_some(p.clone())
    })
    .await
}

/// Creates a one-replica Deployment `name` (pods labelled `app: name`) that is part of `part_of`
/// (`app.kubernetes.io/part-of`), with `env` in its one container.
pub async fn create_app(client: &Client, ns: &str, name: &str, part_of: &str, env: serde_json::Value) {
    let labels = json!({"app": name, "app.kubernetes.io/part-of": part_of});
    let d: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/part-of": part_of}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": {"metadata": {"labels": labels},
            "spec": {"containers": [{"name": "app", "image": "shop/app:1", "env": env}]}}},
    }))
    .unwrap();
    let api = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), ns);
    api.create(&kube::api::PostParams::default(), &d).await.expect("create Deployment");
}

/// Deletes a policy and waits until it is gone (its finalizer removed after the revert).
pub async fn delete_policy_and_wait(client: &Client, name: &str) {
    let api = Api::<TracingPolicy>::all(client.clone());
    delete_if_exists(&api, name).await;
    eventually(&format!("{name} to be gone (finalizer removed)"), || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// The columns of a one-row `kubectl get` table as (header, value), cut at the header's offsets so
/// that empty cells stay empty.
pub fn printed_columns(table: &str) -> Vec<(String, String)> {
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    let row = lines.next().unwrap();
    let starts: Vec<usize> = header
        .match_indices(|c: char| c != ' ')
        .filter(|(i, _)| *i == 0 || header.as_bytes()[i - 1] == b' ')
        .map(|(i, _)| i)
        .collect();
    let cell = |line: &str, i: usize| {
        let end = starts.get(i + 1).copied().unwrap_or(line.len()).min(line.len());
        line.get(starts[i].min(line.len())..end).unwrap_or_default().trim().to_string()
    };
    (0..starts.len()).map(|i| (cell(header, i), cell(row, i))).collect()
}

/// Deletes an object if it exists.
pub async fn delete_if_exists<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let _ = api.delete(name, &DeleteParams::default()).await;
}
/// Waits until `controller` counted a drift correction of `layer` and an Event `DriftCorrected` on
/// `policy` mentions every one of `mentions` (the target it names).
pub async fn drift_reported(
    client: &Client,
    controller: &ControllerProcess,
    layer: &str,
    policy: &str,
    mentions: &[&str],
) {
    let drift = format!("crosstrace_drift_corrections_total{{layer=\"{layer}\"}}");
    eventually(&format!("the {layer} drift metric"), || async {
        (controller.counter(&drift).await >= 1.0).then_some(())
    })
    .await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone());
    eventually(&format!("a DriftCorrected Event on {policy} naming {mentions:?}"), || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("DriftCorrected")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(policy)
                    && e.note.as_deref().is_some_and(|n| mentions.iter().all(|m| n.contains(m)))
            })
            .then_some(())
    })
    .await;
}

pub mod agents;

/// The log filter of the crosstrace processes the tests start: CROSSTRACE_E2E_RUST_LOG when set, to see
/// more of one failing test (e.g. `debug,hyper=info`).
pub fn log_filter() -> String {
    std::env::var("CROSSTRACE_E2E_RUST_LOG").unwrap_or_else(|_| "info,crosstrace=debug".into())
}
pub mod otelcol;
