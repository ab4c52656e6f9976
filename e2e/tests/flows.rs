//! End to end, the network hop in a trace: a real OpenTelemetry Collector (`otelcol-k8s`, built by
//! `e2e/build.sh otelcol`) runs on loopback as the policy's collector, with an OTLP/gRPC receiver and a
//! `file` exporter; `crosstrace flows` runs as a host process with the token of the chart's
//! `crosstrace-flows` ServiceAccount (the test turns `flows.enabled` on in the installed release and off
//! again); the controller (`--flows-receiver` pointing at it) and node 0's agent run as in the network
//! suite. A policy with `spec.network.correlate` is rolled out to node 0; crafted Ethernet/IPv4/TCP
//! packets carrying `GET / HTTP/1.1` and a `traceparent` are injected into that node's Open vSwitch
//! (`netdev-dummy/receive`, forwarded by the bridge's NORMAL flow, sampled 1 in 64), and the collector's
//! file must hold a span of that trace, parented to that span, naming the node and the bridge.
//! Requests without a traceparent (or with an invalid one) make no span but are counted.
//!
//! Every port is taken free at run time. Every process started here is stopped by its PID, the policy
//! deleted, the release's values restored.

#[path = "../support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crosstrace::api::NodeTracing;
use kube::Api;
use serde_json::{Value, json};
use support::agents::*;
use support::otelcol::Otelcol;
use support::*;

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT: &str = "b7ad6b7169203331";
/// How long the spans may take to reach the collector's file once the packets are in.
const SPAN_PATIENCE: Duration = Duration::from_secs(30);

/// A `crosstrace flows` host process, stopped by its PID when dropped.
struct FlowsProcess {
    child: Child,
    admin_port: u16,
    log: PathBuf,
}

impl FlowsProcess {
    /// As the chart's pod `pod` runs it: with its token, its name, namespace and uid.
    fn start(pod: &FlowsPod, listen: &str, collector: &str) -> Self {
        let admin_port = free_port();
        let log = std::env::temp_dir().join(format!("crosstrace-flows-{}-{admin_port}.log", std::process::id()));
        let child = Command::new(env!("CARGO_BIN_EXE_crosstrace"))
            .args(["flows", "--listen", listen, "--collector", collector, "--export-delay-ms", "200"])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}"), "--report-interval-seconds", "1"])
            .env("KUBECONFIG", &pod.kubeconfig)
            .env("POD_NAME", &pod.name)
            .env("POD_NAMESPACE", "crosstrace-system")
            .env("POD_UID", &pod.uid)
            .env("RUST_LOG", "info,crosstrace=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start crosstrace flows");
        Self { child, admin_port, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics").await
    }
}

impl Drop for FlowsProcess {
    fn drop(&mut self) {
        stop(&mut self.child);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The installed release with `flows.enabled` (collector: `collector`); its values as they were when
/// dropped.
struct FlowsRelease {
    previous: PathBuf,
}

impl FlowsRelease {
    fn enable(collector: &str) -> Self {
        let out = Command::new("helm")
            .args(["get", "values", "crosstrace", "-n", "crosstrace-system", "-o", "yaml"])
            .output()
            .expect("helm runs (PATH from cluster.sh env)");
        assert!(
            out.status.success(),
            "helm get values: {} (run e2e/install-chart.sh)",
            String::from_utf8_lossy(&out.stderr)
        );
        let previous = std::env::temp_dir().join(format!("crosstrace-e2e-flows-values-{}.yaml", std::process::id()));
        std::fs::write(&previous, &out.stdout).unwrap();
        helm_upgrade(&[
            "--reuse-values",
            "--set",
            "flows.enabled=true",
            "--set",
            &format!("flows.collector={collector}"),
        ]);
        Self { previous }
    }
}

impl Drop for FlowsRelease {
    fn drop(&mut self) {
        helm_upgrade(&["--reset-values", "-f", self.previous.to_str().unwrap()]);
        let _ = std::fs::remove_file(&self.previous);
    }
}

fn helm_upgrade(values: &[&str]) {
    let chart = repo("helm/crosstrace");
    let mut args = vec!["upgrade", "crosstrace", chart.as_str(), "-n", "crosstrace-system"];
    args.extend_from_slice(values);
    args.push("--wait=false");
    let out = Command::new("helm").args(&args).output().expect("helm runs (PATH from cluster.sh env)");
    assert!(out.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The chart's `crosstrace-flows` pod (kwok's: it runs nothing) that the host process plays.
struct FlowsPod {
    name: String,
    uid: String,
    /// Its ServiceAccount's token, bound to the pod as the kubelet would mount it.
    kubeconfig: PathBuf,
}

fn sa_kubeconfig(file: &str, extra: &[&str]) -> PathBuf {
    let state = std::env::var("CROSSTRACE_E2E_STATE").expect("CROSSTRACE_E2E_STATE from cluster.sh env");
    let path = Path::new(&state).join(file);
    let out = Command::new(repo("e2e/sa-kubeconfig.sh"))
        .args(["crosstrace-system", "crosstrace-flows", path.to_str().unwrap()])
        .args(extra)
        .output()
        .expect("e2e/sa-kubeconfig.sh runs");
    assert!(out.status.success(), "sa-kubeconfig.sh crosstrace-flows: {}", String::from_utf8_lossy(&out.stderr));
    path
}

fn flows_pod() -> FlowsPod {
    let (ok, out, err) = kubectl(&[
        "-n",
        "crosstrace-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=flows",
        "-o",
        "jsonpath={.items[0].metadata.name} {.items[0].metadata.uid}",
    ]);
    let (name, uid) = out.trim().split_once(' ').filter(|_| ok).unwrap_or_else(|| panic!("the flows pod: {out} {err}"));
    let bound = ["--bound-object-kind", "Pod", "--bound-object-name", name];
    FlowsPod { name: name.into(), uid: uid.into(), kubeconfig: sa_kubeconfig("flows.kubeconfig", &bound) }
}

/// `TracesFlowing` of a policy once it has `status` and `reason`: its message.
async fn traces_flowing(
    client: &kube::Client,
    name: &str,
    status: &str,
    reason: &str,
    logs: impl Fn() -> String,
) -> String {
    let what = format!("TracesFlowing={status} ({reason})");
    eventually_with(&what, logs, || async {
        let p = Api::<crosstrace::api::TracingPolicy>::all(client.clone()).get(name).await.ok()?;
        let c = condition(&p, "TracesFlowing")?;
        (c.status == status && c.reason == reason).then(|| c.message.clone())
    })
    .await
}

/// A free UDP port on loopback (bound, then released).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An Ethernet/IPv4/TCP frame 10.0.0.1:40000 → 10.0.0.2:80 carrying `payload`, as hex.
fn frame_hex(payload: &str) -> String {
    let mut f: Vec<u8> = vec![2, 0, 0, 0, 0xee, 2, 2, 0, 0, 0, 0xee, 1, 0x08, 0x00];
    let total = u16::try_from(40 + payload.len()).unwrap().to_be_bytes();
    f.extend_from_slice(&[0x45, 0, total[0], total[1], 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload.as_bytes());
    f.iter().map(|b| format!("{b:02x}")).collect()
}

/// Injects `n` copies of a frame on node `i`'s port p1.
fn inject_frame(i: usize, hex: &str, n: usize) {
    let mut left = n;
    while left > 0 {
        let batch = left.min(32);
        let mut args = vec!["netdev-dummy/receive", "p1"];
        args.extend(std::iter::repeat_n(hex, batch));
        ovs_appctl(i, &args);
        left -= batch;
    }
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"].as_array()?.iter().find(|a| a["key"] == key).map(|a| &a["value"])
}

#[tokio::test]
async fn a_sampled_request_with_a_traceparent_becomes_a_span_of_its_trace() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let node = node_name(0);
    ensure_br_int(0);

    let collector = Otelcol::start().await;
    let release = FlowsRelease::enable(&collector.endpoint());
    let (ok, _, err) =
        kubectl(&["-n", "crosstrace-system", "rollout", "status", "deployment/crosstrace-flows", "--timeout=90s"]);
    assert!(ok, "the chart's crosstrace-flows Deployment (restricted Pod Security) does not roll out: {err}");
    let receiver = format!("127.0.0.1:{}", free_udp_port());
    let pod = flows_pod();
    let flows = FlowsProcess::start(&pod, &receiver, &collector.endpoint());
    let controller = ControllerProcess::start_with_args(
        free_port(),
        &controller_kubeconfig(),
        &[],
        &["--flows-receiver", &receiver, "--canary-interval-seconds", "2"],
    );
    let agent = AgentProcess::start(0);
    let logs = || {
        format!(
            "--- flows ---\n{}\n--- controller ---\n{}\n--- agent ---\n{}\n--- otelcol ---\n{}",
            tail(&flows.log(), 40),
            tail(&controller.log(), 40),
            tail(&agent.log(), 20),
            tail(&collector.log(), 20)
        )
    };

    // The policy's own flow collector, and crosstrace flows added by correlate.
    let own = Collector::bind().await;
    let name = format!("flows-{}", std::process::id());
    let policy = tracing_policy(
        &name,
        json!({
            "network": {
                "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
                "bridge": "br-int",
                "sflow": {"targets": [own.target()], "sampling": 64, "polling": 0},
                "correlate": true,
            },
            "rollout": {"progressDeadlineSeconds": 60},
        }),
    );
    apply_policy(&client, &policy).await;
    let cleanup = PolicyCleanup { client: client.clone(), name: name.clone() };
    eventually_with("the correlating policy to be Ready", logs, || async {
        let p = Api::<crosstrace::api::TracingPolicy>::all(client.clone()).get(&name).await.ok()?;
        let c = condition(&p, "Ready")?;
        (c.status == "True" && c.observed_generation == p.metadata.generation).then_some(())
    })
    .await;

    // What the controller asked of the node: the receiver added, 512 header bytes, the node's address.
    let tracing = Api::<NodeTracing>::all(client.clone()).get(&node).await.expect("node 0's NodeTracing");
    let export = tracing.spec.bridges.iter().find(|b| b.policy == name).expect("the policy's export");
    let sflow = export.sflow.as_ref().unwrap();
    assert_eq!(sflow.targets, vec![own.target(), receiver.clone()]);
    assert_eq!((sflow.header, sflow.agent.as_str()), (512, "127.0.1.1"), "{sflow:?}");
    let in_ovs = ovs_vsctl(0, &["get", "sflow", bridge_exporter(0, "br-int", "sflow").unwrap().as_str(), "agent"]);
    assert_eq!(in_ovs.trim_matches('"'), "127.0.1.1");

    // Requests carrying the traceparent, injected until a sample of one becomes a span.
    let traced = frame_hex(&format!("GET / HTTP/1.1\r\nHost: x\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\n\r\n"));
    let started = Instant::now();
    let span = loop {
        if let Some(span) = collector.spans().into_iter().find(|s| s["traceId"] == TRACE) {
            break span;
        }
        assert!(
            started.elapsed() < SPAN_PATIENCE,
            "no span of trace {TRACE} within {SPAN_PATIENCE:?}; flows metrics:\n{}\n{}",
            flows.metrics().await,
            logs()
        );
        inject_frame(0, &traced, 64);
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!("the collector's span:\n{span:#}");
    let message = traces_flowing(&client, &name, "True", "TraceLinkedSpansExported", logs).await;
    assert!(message.contains(&node) && message.contains(&collector.endpoint()), "{message}");
    assert_eq!(span["parentSpanId"], PARENT, "{span:#}");
    assert_eq!(span["name"], format!("sampled on node {node}, bridge br-int"), "{span:#}");
    assert_eq!(span["kind"], 1, "internal: {span:#}");
    assert_eq!(attribute(&span, "crosstrace.node"), Some(&json!({"stringValue": node})), "{span:#}");
    assert_eq!(attribute(&span, "crosstrace.bridge"), Some(&json!({"stringValue": "br-int"})), "{span:#}");
    assert_eq!(attribute(&span, "http.request.method"), Some(&json!({"stringValue": "GET"})), "{span:#}");
    assert_eq!(attribute(&span, "url.path"), Some(&json!({"stringValue": "/"})), "{span:#}");
    assert_eq!(attribute(&span, "destination.port"), Some(&json!({"intValue": "80"})), "{span:#}");
    assert_eq!(attribute(&span, "crosstrace.sflow.sampling_rate"), Some(&json!({"intValue": "64"})), "{span:#}");
    assert_eq!(span["startTimeUnixNano"], span["endTimeUnixNano"], "{span:#}");

    // Requests without a traceparent, or with an invalid one: counted, no span.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spans_before = sum_samples(&flows.metrics().await, "crosstrace_flows_spans_total");
    let in_file_before = collector.spans().len();
    let samples_before = sum_samples(&flows.metrics().await, "crosstrace_flows_samples_total");
    let untraced = frame_hex("GET /plain HTTP/1.1\r\nHost: x\r\n\r\n");
    let invalid = frame_hex(&format!("GET / HTTP/1.1\r\ntraceparent: 00-{}-{PARENT}-01\r\n\r\n", "0".repeat(32)));
    let started = Instant::now();
    loop {
        let metrics = flows.metrics().await;
        let samples = sum_samples(&metrics, "crosstrace_flows_samples_total");
        let invalid_seen = metrics.contains("crosstrace_flows_dropped_total{reason=\"invalid_traceparent\"}");
        if samples >= samples_before + 2.0 && invalid_seen {
            break;
        }
        assert!(started.elapsed() < SPAN_PATIENCE, "untraced samples not counted:\n{metrics}\n{}", logs());
        inject_frame(0, &untraced, 64);
        inject_frame(0, &invalid, 64);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Longer than the export delay and the file exporter's flush.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = flows.metrics().await;
    assert_eq!(sum_samples(&metrics, "crosstrace_flows_spans_total"), spans_before, "{metrics}");
    assert_eq!(collector.spans().len(), in_file_before, "no new span without a valid traceparent");
    assert!(metrics.contains(&format!("crosstrace_flows_samples_total{{node=\"{node}\"}}")), "{metrics}");
    assert!(metrics.contains(&format!("crosstrace_flows_bytes_total{{node=\"{node}\"}}")), "{metrics}");

    // Hostile datagrams are counted and dropped; the receiver goes on.
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut unknown_agent = vec![0, 0, 0, 5, 0, 0, 0, 1, 192, 0, 2, 1];
    unknown_agent.extend_from_slice(&[0; 16]);
    let mut overlong = vec![0, 0, 0, 5, 0, 0, 0, 1, 127, 0, 1, 1];
    overlong.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]);
    for datagram in [&b"garbage"[..], &[0, 0, 0, 5], &unknown_agent, &overlong] {
        sender.send_to(datagram, &receiver).unwrap();
    }
    let metrics = eventually_with("the hostile datagrams to be counted", logs, || async {
        let metrics = flows.metrics().await;
        let counted = ["unsupported_version", "truncated", "unknown_agent", "malformed"]
            .iter()
            .all(|r| metrics.contains(&format!("crosstrace_flows_dropped_total{{reason=\"{r}\"}}")));
        counted.then_some(metrics)
    })
    .await;
    assert_eq!(sum_samples(&metrics, "crosstrace_flows_spans_total"), spans_before, "{metrics}");

    // The chart's crosstrace-flows ServiceAccount may list and watch NodeTracings, write Leases in its
    // namespace (narrowed to its own below), and nothing else.
    let account = "system:serviceaccount:crosstrace-system:crosstrace-flows";
    for (verb, resource, allowed) in [
        ("list", "nodetracings.crosstrace.dev", true),
        ("watch", "nodetracings.crosstrace.dev", true),
        ("patch", "nodetracings.crosstrace.dev", false),
        ("patch", "nodetracings.crosstrace.dev/status", false),
        ("get", "leases.coordination.k8s.io", false),
        ("list", "tracingpolicies.crosstrace.dev", false),
        ("list", "nodes", false),
        ("get", "secrets", false),
        ("list", "configmaps", false),
    ] {
        let (_, out, _) = kubectl(&["auth", "can-i", verb, resource, "--as", account, "-A"]);
        assert_eq!(out.trim() == "yes", allowed, "{account} {verb} {resource}: {out}");
    }

    // Its report Lease: only its own. A token bound to the pod cannot write another Lease (the chart's
    // admission policy), a token bound to nothing cannot write even its own.
    let lease = |kubeconfig: &Path, lease: &str| {
        let manifest = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": lease, "namespace": "crosstrace-system"}, "spec": {"holderIdentity": "x"}});
        let path = std::env::temp_dir().join(format!("crosstrace-e2e-lease-{}.json", std::process::id()));
        std::fs::write(&path, manifest.to_string()).unwrap();
        let out = Command::new("kubectl")
            .args(["--kubeconfig", kubeconfig.to_str().unwrap(), "create", "-f", path.to_str().unwrap()])
            .output()
            .expect("kubectl runs");
        let _ = std::fs::remove_file(&path);
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (created, err) = lease(&pod.kubeconfig, "crosstrace-controller-next");
    assert!(!created && err.contains("may only write the Lease"), "another Lease: {err}");
    let unbound = sa_kubeconfig("flows-unbound.kubeconfig", &[]);
    let (created, err) = lease(&unbound, &pod.name);
    assert!(!created && err.contains("bound to its pod"), "an unbound token: {err}");
    let _ = std::fs::remove_file(&unbound);
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), "crosstrace-system");
    let own = leases.get(&pod.name).await.expect("the receiver's report Lease");
    assert_eq!(own.metadata.owner_references.as_ref().map(|o| o[0].uid.clone()), Some(pod.uid.clone()));

    // The collector stops: the next spans cannot go out, and the policy says so.
    collector.stop();
    let started = Instant::now();
    let message = loop {
        let p = Api::<crosstrace::api::TracingPolicy>::all(client.clone()).get(&name).await.unwrap();
        if let Some(c) = condition(&p, "TracesFlowing").filter(|c| c.reason == "SpanExportFailing") {
            assert_eq!(c.status, "False", "{c:?}");
            break c.message.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "TracesFlowing did not turn False:\n{}", logs());
        inject_frame(0, &traced, 64);
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(message.contains(&collector.endpoint()), "{message}");

    cleanup.delete().await;
    drop(agent);
    drop(controller);
    drop(flows);
    // Stopped, the receiver takes its report away.
    eventually("the report Lease to be deleted", || async {
        leases.get_opt(&pod.name).await.ok()?.is_none().then_some(())
    })
    .await;
    drop(release);
    drop(collector);
}

#[tokio::test]
async fn a_lower_header_limit_is_used_and_the_policy_says_what_is_missed() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let node = node_name(0);
    ensure_br_int(0);
    // Admin limits as the chart mounts them (one file per key), with maxHeaderBytes 256.
    let limits = std::env::temp_dir().join(format!("crosstrace-e2e-flows-limits-{}", std::process::id()));
    std::fs::create_dir_all(&limits).unwrap();
    for (key, value) in [
        ("sidecarImages", "otel/opentelemetry-collector-k8s"),
        ("ingressImages", "registry.k8s.io/ingress-nginx/controller"),
        ("protectedNamespaces", ""),
        ("collectorNetworks", "127.0.0.0/8"),
        ("minSampling", "64"),
        ("maxHeaderBytes", "256"),
    ] {
        std::fs::write(limits.join(key), value).unwrap();
    }
    let receiver = format!("127.0.0.1:{}", free_udp_port());
    let controller = ControllerProcess::start_with_args(
        free_port(),
        &controller_kubeconfig(),
        &[],
        &["--flows-receiver", &receiver, "--admin-limits", limits.to_str().unwrap()],
    );
    let agent = AgentProcess::start(0);
    let own = Collector::bind().await;
    let name = format!("flows-limit-{}", std::process::id());
    let policy = tracing_policy(
        &name,
        json!({"network": {
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
            "sflow": {"targets": [own.target()], "sampling": 64, "polling": 0},
            "correlate": true,
        }}),
    );
    apply_policy(&client, &policy).await;
    let cleanup = PolicyCleanup { client: client.clone(), name: name.clone() };
    let logs =
        || format!("--- controller ---\n{}\n--- agent ---\n{}", tail(&controller.log(), 40), tail(&agent.log(), 20));
    let message = eventually_with("NetworkReady=True naming the header limit", logs, || async {
        let p = Api::<crosstrace::api::TracingPolicy>::all(client.clone()).get(&name).await.ok()?;
        let c = condition(&p, "NetworkReady")?;
        (c.status == "True" && c.observed_generation == p.metadata.generation).then(|| c.message.clone())
    })
    .await;
    assert!(message.contains("traceparent beyond byte 256") && message.contains("maxHeaderBytes"), "{message}");
    let tracing = Api::<NodeTracing>::all(client.clone()).get(&node).await.expect("node 0's NodeTracing");
    let sflow = tracing.spec.bridges.iter().find(|b| b.policy == name).and_then(|b| b.sflow.clone()).unwrap();
    assert_eq!((sflow.header, sflow.targets.last()), (256, Some(&receiver)), "{sflow:?}");
    let column = bridge_exporter(0, "br-int", "sflow").unwrap();
    assert_eq!(ovs_vsctl(0, &["get", "sflow", &column, "header"]), "256");

    cleanup.delete().await;
    drop(agent);
    drop(controller);
    let _ = std::fs::remove_dir_all(&limits);
}

/// Deletes the policy (and waits for its revert) even when the test fails.
struct PolicyCleanup {
    client: kube::Client,
    name: String,
}

impl PolicyCleanup {
    async fn delete(self) {
        delete_policy_and_wait(&self.client, &self.name).await;
        std::mem::forget(self);
    }
}

impl Drop for PolicyCleanup {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .args(["delete", "tracingpolicy", &self.name, "--ignore-not-found", "--timeout=60s"])
            .output();
    }
}
