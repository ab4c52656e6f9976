//! Request sequences of the edge layer against a mocked API server: what is written, in which order,
//! with which patch type and field manager. (Behaviour on a real API server is the e2e suite's job.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crosstrace::controller::apply::{self, Writer};
use crosstrace::layers::ObjectKey;
use crosstrace::layers::ingress::{Action, ContainerImage, Record};
use crosstrace::metrics::Metrics;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn mocked() -> (Writer, Handle, Arc<Metrics>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let metrics = Arc::new(Metrics::default());
    let writer = Writer { client: Client::new(service, "default"), metrics: metrics.clone() };
    (writer, handle, metrics)
}

/// One expected request: method, path, query fragment, content type; answered with `reply`.
struct Expect {
    method: Method,
    path: &'static str,
    query: &'static str,
    content_type: &'static str,
    reply: Value,
}

async fn serve(mut handle: Handle, expected: Vec<Expect>) -> Vec<Value> {
    let mut bodies = Vec::new();
    for e in expected {
        let (request, send) = handle.next_request().await.expect("another request");
        assert_eq!(request.method(), e.method, "{}", request.uri());
        assert_eq!(request.uri().path(), e.path);
        let query = request.uri().query().unwrap_or_default().to_string();
        assert!(query.contains(e.query), "query {query} lacks {}", e.query);
        if !e.content_type.is_empty() {
            assert_eq!(request.headers()["content-type"], e.content_type, "{}", e.path);
        }
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        bodies.push(if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() });
        send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&e.reply).unwrap())).unwrap());
    }
    bodies
}

/// Runs the edge layer's actions against a mocked API server that expects `expected`, in order,
/// each exchange within a second; returns the request bodies.
async fn run(actions: &[Action], expected: Vec<Expect>) -> (Vec<Value>, Arc<Metrics>) {
    let (writer, handle, metrics) = mocked();
    let server = tokio::spawn(serve(handle, expected));
    tokio::time::timeout(Duration::from_secs(1), apply::ingress(&writer, actions))
        .await
        .expect("in time")
        .expect("written");
    let bodies = tokio::time::timeout(Duration::from_secs(1), server).await.expect("in time");
    (bodies.expect("every request as expected"), metrics)
}

fn record() -> Record {
    Record {
        policy: "storefront".into(),
        config_map: ObjectKey::new("ingress-nginx", "ingress-nginx-controller"),
        config_map_existed: true,
        original_data: BTreeMap::from([
            ("otel-sampler-ratio".to_string(), Some("0.5".to_string())),
            ("enable-opentelemetry".to_string(), None),
        ]),
        original_image: Some(ContainerImage { container: "controller".into(), image: "controller:v1.12.1".into() }),
        rollout_started: Some(1),
    }
}

fn deployment_reply() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "c", "namespace": "ingress-nginx"}})
}

fn config_map_reply(data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ingress-nginx-controller", "namespace": "ingress-nginx"}, "data": data})
}

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/ingress-nginx/deployments/c";
const CONFIG_MAP: &str = "/api/v1/namespaces/ingress-nginx/configmaps/ingress-nginx-controller";

#[tokio::test]
async fn apply_records_first_then_applies_config_then_image() {
    let deployment = ObjectKey::new("ingress-nginx", "c");
    let data = BTreeMap::from([("enable-opentelemetry".to_string(), "true".to_string())]);
    let actions = vec![
        Action::Record { deployment: deployment.clone(), record: record() },
        Action::ApplyConfig { config_map: record().config_map, data, policy: "storefront".into() },
        Action::ApplyImage {
            deployment,
            image: ContainerImage { container: "controller".into(), image: "controller:otel".into() },
            record: record(),
        },
    ];
    let (bodies, metrics) = run(
        &actions,
        vec![
            Expect {
                method: Method::PATCH,
                path: DEPLOYMENT,
                query: "fieldManager=crosstrace",
                content_type: "application/merge-patch+json",
                reply: deployment_reply(),
            },
            Expect {
                method: Method::PATCH,
                path: CONFIG_MAP,
                query: "force=true",
                content_type: "application/apply-patch+yaml",
                reply: config_map_reply(json!({})),
            },
            Expect {
                method: Method::PATCH,
                path: DEPLOYMENT,
                query: "force=true",
                content_type: "application/apply-patch+yaml",
                reply: deployment_reply(),
            },
        ],
    )
    .await;

    let recorded: Record =
        serde_json::from_str(bodies[0]["metadata"]["annotations"]["crosstrace.dev/ingress"].as_str().unwrap()).unwrap();
    assert_eq!(recorded, record(), "the originals are written before anything changes");
    assert_eq!(bodies[0]["metadata"]["labels"]["crosstrace.dev/ingress-policy"], "storefront");
    assert_eq!(bodies[1]["data"]["enable-opentelemetry"], "true");
    assert_eq!(bodies[1]["metadata"]["labels"]["crosstrace.dev/ingress-policy"], "storefront");
    assert_eq!(
        bodies[2]["spec"]["template"]["spec"]["containers"],
        json!([{"name": "controller", "image": "controller:otel"}])
    );
    let writes: f64 = metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("crosstrace_api_writes_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(writes, 3.0, "every write is counted");
}

#[tokio::test]
async fn revert_restores_config_map_then_deployment() {
    let r = record();
    let actions = vec![
        Action::RestoreConfig { config_map: r.config_map.clone(), data: r.original_data.clone(), delete: false },
        Action::RestoreDeployment {
            deployment: ObjectKey::new("ingress-nginx", "c"),
            image: r.original_image.clone(),
            keep: None,
            rolled_back: None,
        },
    ];
    let current =
        json!({"otel-sampler-ratio": "0.25", "enable-opentelemetry": "true", "use-forwarded-headers": "true"});
    let (bodies, _) = run(
        &actions,
        vec![
            Expect {
                method: Method::GET,
                path: CONFIG_MAP,
                query: "",
                content_type: "",
                reply: config_map_reply(current),
            },
            Expect {
                method: Method::PATCH,
                path: CONFIG_MAP,
                query: "fieldManager=crosstrace",
                content_type: "application/merge-patch+json",
                reply: config_map_reply(json!({})),
            },
            Expect {
                method: Method::PATCH,
                path: DEPLOYMENT,
                query: "fieldManager=crosstrace",
                content_type: "application/strategic-merge-patch+json",
                reply: deployment_reply(),
            },
        ],
    )
    .await;
    assert_eq!(
        bodies[1]["data"],
        json!({"otel-sampler-ratio": "0.5", "enable-opentelemetry": null}),
        "user value back, our key removed"
    );
    assert_eq!(bodies[1]["metadata"]["labels"]["crosstrace.dev/ingress-policy"], Value::Null);
    assert_eq!(
        bodies[2]["spec"]["template"]["spec"]["containers"],
        json!([{"name": "controller", "image": "controller:v1.12.1"}])
    );
    assert_eq!(bodies[2]["metadata"]["annotations"]["crosstrace.dev/ingress"], Value::Null, "the record goes last");
}

#[tokio::test]
async fn a_config_map_the_operator_created_is_deleted_on_revert() {
    let r = record();
    let only_ours = json!({"otel-sampler-ratio": "0.25", "enable-opentelemetry": "true"});
    let actions =
        vec![Action::RestoreConfig { config_map: r.config_map.clone(), data: r.original_data.clone(), delete: true }];
    let status = json!({"apiVersion": "v1", "kind": "Status", "status": "Success"});
    let _ = run(
        &actions,
        vec![
            Expect {
                method: Method::GET,
                path: CONFIG_MAP,
                query: "",
                content_type: "",
                reply: config_map_reply(only_ours),
            },
            Expect { method: Method::DELETE, path: CONFIG_MAP, query: "", content_type: "", reply: status },
        ],
    )
    .await;
}
