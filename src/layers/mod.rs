//! One module per layer. Each selects its targets, plans (purely) what must change on them, and judges
//! their health; the controller runs the plan and turns the layer's [`LayerReport`] into status.

pub mod health;
pub mod ingress;

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Expression, Selector, SelectorExt};
use serde::{Deserialize, Serialize};

/// Namespace and name of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a namespaced object from its metadata.
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A problem a layer reports on one target; it becomes part of a condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason.
    pub reason: &'static str,
    pub message: String,
    /// Counts toward `Degraded` (a rollback, a conflict, a broken target), not only toward not-ready.
    pub degraded: bool,
}

/// What a layer's plan says about its targets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerReport {
    pub selected: usize,
    pub ready: usize,
    pub rolled_back: usize,
    /// Targets changed and not yet healthy.
    pub in_flight: usize,
    /// Targets that still need a change the rollout has not started (batch full, paused or stopped).
    pub pending: usize,
    /// A failed batch stopped the rollout for this generation.
    pub stopped: bool,
    pub problems: Vec<Problem>,
    /// Notes for the layer's Ready condition that are not problems (e.g. a vulnerable controller version).
    pub warnings: Vec<String>,
}

/// Where a target stands, as far as rollout batching is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Needs no change and is healthy.
    Ready,
    /// Changed, not healthy yet.
    InFlight,
    /// Needs a change that has not started.
    Pending,
    /// Rolled back, conflicting or broken: nothing to do until something changes.
    Held,
}

/// The rollout gate shared by every layer: how many new targets may start changing now.
#[derive(Clone, Copy, Debug)]
pub struct Gate {
    free: usize,
    open: bool,
}

impl Gate {
    /// `in_flight` targets already use slots; a paused or stopped rollout starts nothing new.
    pub fn new(max_concurrent: i32, in_flight: usize, paused: bool, stopped: bool) -> Self {
        let max = usize::try_from(max_concurrent.max(1)).unwrap_or(1);
        Self {
            free: max.saturating_sub(in_flight),
            open: !paused && !stopped,
        }
    }

    /// Takes a slot for one more target, if there is one.
    pub fn admit(&mut self) -> bool {
        if self.open && self.free > 0 {
            self.free -= 1;
            true
        } else {
            false
        }
    }
}

/// A LabelSelector as a kube [`Selector`], or an error naming what is wrong with it.
pub fn selector(label_selector: &LabelSelector) -> Result<Selector, String> {
    Selector::try_from(label_selector.clone()).map_err(|e| e.to_string())
}

/// Does a label set match a selector? An empty selector matches everything.
pub fn matches(
    selector: &Selector,
    labels: Option<&std::collections::BTreeMap<String, String>>,
) -> bool {
    let empty = Default::default();
    selector.matches(labels.unwrap_or(&empty))
}

/// A selector for objects carrying `key=value`.
pub fn label_equals(key: &str, value: &str) -> Selector {
    Selector::from_iter([Expression::Equal(key.into(), value.into())])
}
