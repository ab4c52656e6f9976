//! End to end, on the local real cluster with a real OpenTelemetry Collector on loopback: the
//! operator's canary span reaches the policy's collector over OTLP/gRPC and OTLP/HTTP
//! (`CollectorReachable=True`, naming the canary's trace id, which the collector really stored), and a
//! collector that goes away turns the condition False with a reason, without touching the rollout.

#[path = "../support/mod.rs"]
mod support;

use serde_json::json;
use support::otelcol::Otelcol;
use support::*;

#[tokio::test]
async fn the_canary_reaches_a_real_collector_and_a_stopped_collector_is_reported() {
    let client = client().await;
    install_crds();
    ensure_namespace(&client, "crosstrace-system").await;
    let ns = TestNamespace::create(&client, "e2e-canary", json!({})).await;
    let collector = Otelcol::start().await;
    let controller =
        ControllerProcess::start_with_args(18099, &controller_kubeconfig(), &[], &["--canary-interval-seconds", "2"]);

    let mut names = Vec::new();
    for (protocol, port) in [("grpc", collector.grpc_port), ("http", collector.http_port)] {
        let name = format!("{}-{protocol}", ns.name);
        create_app(&client, &ns.name, &format!("app-{protocol}"), protocol, json!([])).await;
        let spec = json!({
            "collector": {"endpoint": format!("127.0.0.1:{port}"), "protocol": protocol},
            "workloads": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
                "selector": {"matchLabels": {"app.kubernetes.io/part-of": protocol}},
            },
        });
        apply_policy(&client, &tracing_policy(&name, spec)).await;
        let p = wait_condition(&client, &name, "CollectorReachable", "True").await;
        let c = condition(&p, "CollectorReachable").unwrap();
        assert_eq!(c.reason, "CanaryAccepted");
        let trace_id = c.message.split_whitespace().nth(4).unwrap().to_string();
        assert_eq!(trace_id.len(), 32, "{}", c.message);
        eventually_with(
            &format!("the collector ({protocol}) to hold the canary's trace {trace_id}"),
            || collector.log(),
            || async { collector.spans().iter().any(|s| s["traceId"] == trace_id.as_str()).then_some(()) },
        )
        .await;
        names.push(name);
    }

    // The collector goes away: the condition says so with a reason; the rollout's state is untouched.
    collector.stop();
    for name in &names {
        let p = wait_condition(&client, name, "CollectorReachable", "False").await;
        let c = condition(&p, "CollectorReachable").unwrap();
        assert_eq!(c.reason, "CanaryNotAccepted");
        assert!(c.message.contains("not accepted by 127.0.0.1:"), "{}", c.message);
        assert_eq!(condition(&p, "WorkloadsReady").unwrap().status, "True", "the rollout is not the collector's");
    }
    for name in &names {
        delete_policy_and_wait(&client, name).await;
    }
    drop(controller);
}
