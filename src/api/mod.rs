//! The `crosstrace.dev/v1alpha1` API: `TracingPolicy` (what the user wants) and `NodeTracing` (what one
//! node's agent must do), their conditions, and the CRD documents generated from these types.

pub mod conditions;
pub mod node_tracing;
pub mod policy;
pub mod rules;
pub mod validate;

pub use node_tracing::{NodeTracing, NodeTracingSpec, NodeTracingStatus};
pub use policy::*;

use kube::CustomResourceExt;

/// API group of every crosstrace resource.
pub const GROUP: &str = "crosstrace.dev";
/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "crosstrace";
/// Finalizer that holds a policy until everything it changed is reverted.
pub const FINALIZER: &str = "crosstrace.dev/cleanup";

/// The largest generation the schemas accept (2^53 - 1). A CRD holds its bounds as float64 and the API
/// server turns them back into int64: `i64::MAX` rounds up to 2^63 and overflows. 2^53 - 1 is the
/// largest integer every JSON reader keeps exactly, and no object ever gets that many changes.
pub const MAX_GENERATION: i64 = (1 << 53) - 1;

/// Every CRD of the API, as one multi-document YAML stream (what `crosstrace crds` prints).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let docs = [serde_yaml::to_string(&TracingPolicy::crd())?, serde_yaml::to_string(&NodeTracing::crd())?];
    Ok(docs.map(|doc| format!("---\n{doc}")).concat())
}

/// The CRD documents one per file, as committed under `crds/`: `(file name, YAML)`.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    let tp = TracingPolicy::crd();
    let nt = NodeTracing::crd();
    Ok(vec![
        (format!("{}.yaml", tp.metadata.name.clone().unwrap_or_default()), serde_yaml::to_string(&tp)?),
        (format!("{}.yaml", nt.metadata.name.clone().unwrap_or_default()), serde_yaml::to_string(&nt)?),
    ])
}
