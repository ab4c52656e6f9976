//! The operator: wiring of watches, the shared [`Context`], and the run loop.

pub mod apply;
pub mod reconcile;
pub mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use crate::api::TracingPolicy;
use crate::layers::ingress;
use crate::metrics::Metrics;
use apply::Writer;

/// Settings of the controller role.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Reconciles running at once.
    pub concurrency: u16,
    /// The namespace the operator runs in (never instrumented).
    pub namespace: String,
    /// How often a converged policy is looked at again (it makes no write then).
    pub resync: Duration,
    /// How often a policy with a rollout in flight is looked at.
    pub poll: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 4,
            namespace: "crosstrace-system".into(),
            resync: Duration::from_secs(300),
            poll: Duration::from_secs(2),
        }
    }
}

/// What every reconcile shares, built once.
pub struct Context {
    pub client: Client,
    pub writer: Writer,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Every TracingPolicy, from the controller's own reflector (for ownership between policies).
    pub policies: Store<TracingPolicy>,
    pub settings: Settings,
}

/// The policies a changed Deployment concerns: the one whose label it carries, and every policy whose
/// `spec.ingress` selects it.
fn policies_for_deployment(
    store: &Store<TracingPolicy>,
    d: &Deployment,
) -> Vec<ObjectRef<TracingPolicy>> {
    let mut refs: Vec<_> = d
        .labels()
        .get(ingress::POLICY_LABEL)
        .map(|p| ObjectRef::new(p))
        .into_iter()
        .collect();
    refs.extend(
        store
            .state()
            .iter()
            .filter(|p| {
                p.spec
                    .ingress
                    .as_ref()
                    .is_some_and(|i| ingress::selects(i, d))
            })
            .map(|p| ObjectRef::from_obj(p.as_ref())),
    );
    refs
}

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let policies = Api::<TracingPolicy>::all(client.clone());
    let controller = Controller::new(policies, watcher::Config::default().any_semantic())
        .with_config(
            ControllerConfig::default()
                .concurrency(settings.concurrency)
                .debounce(Duration::from_millis(200)),
        );
    let store = controller.store();
    let deployment_store = store.clone();
    let context = Arc::new(Context {
        writer: Writer {
            client: client.clone(),
            metrics: metrics.clone(),
        },
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "crosstrace".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client: client.clone(),
        metrics,
        policies: store,
        settings,
    });
    controller
        .watches(
            Api::<Deployment>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            move |d| policies_for_deployment(&deployment_store, &d),
        )
        .watches(
            Api::<ConfigMap>::all(client.clone()),
            watcher::Config::default()
                .labels(ingress::POLICY_LABEL)
                .any_semantic(),
            |cm| {
                cm.labels()
                    .get(ingress::POLICY_LABEL)
                    .map(|p| ObjectRef::new(p))
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile did not complete");
            }
        })
        .await;
}
