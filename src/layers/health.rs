//! Health of workload rollouts, judged the way `kubectl rollout status` does, and the pod states that
//! fail a rollout before its deadline.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;

/// Has the Deployment finished rolling out its current template, with every replica available?
pub fn deployment_rolled_out(d: &Deployment) -> bool {
    let generation = d.metadata.generation.unwrap_or(0);
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = d.status.as_ref() else {
        return false;
    };
    status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas.unwrap_or(0) >= desired
        && status.replicas.unwrap_or(0) <= status.updated_replicas.unwrap_or(0)
        && status.available_replicas.unwrap_or(0) >= desired
}

/// Has the StatefulSet rolled its current template out to every replica, all ready?
pub fn statefulset_rolled_out(s: &StatefulSet) -> bool {
    let generation = s.metadata.generation.unwrap_or(0);
    let desired = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = s.status.as_ref() else {
        return false;
    };
    // With OnDelete the controller never moves currentRevision: every replica updated and ready is done.
    let revision_done = statefulset_on_delete(s)
        || match (&status.current_revision, &status.update_revision) {
            (Some(current), Some(update)) => current == update,
            _ => true,
        };
    status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas.unwrap_or(0) >= desired
        && status.ready_replicas.unwrap_or(0) >= desired
        && status.available_replicas.unwrap_or(desired) >= desired
        && revision_done
}

/// Can pods of the workload's current template exist, to be looked at for failures? Only once its
/// controller has taken in the current generation (before, its status tells of the template before and
/// the pods of this one are at most being created) and counts some pods of it.
fn revision_started(generation: Option<i64>, observed: Option<i64>, updated: Option<i32>) -> bool {
    observed.unwrap_or(0) >= generation.unwrap_or(0) && updated.unwrap_or(0) > 0
}

/// [`revision_started`] for a Deployment.
pub fn deployment_revision_started(d: &Deployment) -> bool {
    let status = d.status.as_ref();
    revision_started(
        d.metadata.generation,
        status.and_then(|s| s.observed_generation),
        status.and_then(|s| s.updated_replicas),
    )
}

/// [`revision_started`] for a StatefulSet.
pub fn statefulset_revision_started(s: &StatefulSet) -> bool {
    let status = s.status.as_ref();
    revision_started(
        s.metadata.generation,
        status.and_then(|s| s.observed_generation),
        status.and_then(|s| s.updated_replicas),
    )
}

/// [`revision_started`] for a DaemonSet.
pub fn daemonset_revision_started(d: &DaemonSet) -> bool {
    let status = d.status.as_ref();
    revision_started(
        d.metadata.generation,
        status.and_then(|s| s.observed_generation),
        status.and_then(|s| s.updated_number_scheduled),
    )
}

/// Does the StatefulSet update its pods only when they are deleted (`updateStrategy: OnDelete`)?
pub fn statefulset_on_delete(s: &StatefulSet) -> bool {
    s.spec.as_ref().and_then(|s| s.update_strategy.as_ref()).and_then(|u| u.type_.as_deref()) == Some("OnDelete")
}

/// Has the DaemonSet rolled its current template out to every node it schedules on, all available?
pub fn daemonset_rolled_out(d: &DaemonSet) -> bool {
    let generation = d.metadata.generation.unwrap_or(0);
    let Some(status) = d.status.as_ref() else {
        return false;
    };
    let desired = status.desired_number_scheduled;
    status.observed_generation.unwrap_or(0) >= generation
        && status.updated_number_scheduled.unwrap_or(0) >= desired
        && status.number_available.unwrap_or(0) >= desired
        && status.number_unavailable.unwrap_or(0) == 0
}

/// The Deployment controller's `Progressing` condition.
fn progressing(d: &Deployment) -> Option<&k8s_openapi::api::apps::v1::DeploymentCondition> {
    d.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == "Progressing")
}

/// Is the Deployment paused by its owner? Also while the Deployment controller has not yet taken in a
/// resume (its `Progressing` condition still says `DeploymentPaused`).
pub fn deployment_paused(d: &Deployment) -> bool {
    d.spec.as_ref().and_then(|s| s.paused).unwrap_or(false)
        || progressing(d).is_some_and(|c| c.reason.as_deref() == Some("DeploymentPaused"))
}

/// Since when (unix seconds) the Deployment controller has been rolling out without a pause: a pause
/// turns `Progressing` Unknown, a resume turns it `DeploymentResumed` and then True again, so the time
/// it last became True (or was resumed) restarts the deadline of a rollout its owner held.
pub fn deployment_resumed_at(d: &Deployment) -> Option<i64> {
    let c = progressing(d)?;
    let at = match (c.status.as_str(), c.reason.as_deref()) {
        (_, Some("DeploymentResumed")) => c.last_update_time.as_ref().or(c.last_transition_time.as_ref()),
        ("True", _) => c.last_transition_time.as_ref(),
        _ => None,
    };
    at.map(|t| t.0.as_second())
}

/// Container states that do not heal by waiting: a pod in one of them fails its rollout at once.
pub const FAILING_STATES: [&str; 6] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "InvalidImageName",
];

/// Why this pod cannot start, if one of its containers waits in a [`FAILING_STATES`] state.
pub fn pod_failing(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let statuses = status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
    statuses.into_iter().find_map(|c| {
        let reason = c.state.as_ref()?.waiting.as_ref()?.reason.as_deref()?;
        FAILING_STATES.contains(&reason).then(|| {
            format!("pod {} container {} is {reason}", pod.metadata.name.as_deref().unwrap_or_default(), c.name)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};

    fn deployment(
        generation: i64,
        observed: i64,
        replicas: i32,
        updated: i32,
        total: i32,
        available: i32,
    ) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(generation);
        d.spec = Some(DeploymentSpec { replicas: Some(replicas), ..Default::default() });
        d.status = Some(DeploymentStatus {
            observed_generation: Some(observed),
            updated_replicas: Some(updated),
            replicas: Some(total),
            available_replicas: Some(available),
            ..Default::default()
        });
        d
    }

    #[test]
    fn complete_rollout_is_healthy() {
        assert!(deployment_rolled_out(&deployment(2, 2, 3, 3, 3, 3)));
    }

    #[test]
    fn unobserved_generation_old_pods_or_unavailable_replicas_are_not() {
        assert!(!deployment_rolled_out(&deployment(3, 2, 3, 3, 3, 3)), "controller has not seen the change");
        assert!(!deployment_rolled_out(&deployment(2, 2, 3, 3, 4, 3)), "an old pod is still there");
        assert!(!deployment_rolled_out(&deployment(2, 2, 3, 3, 3, 2)), "a replica is unavailable");
        assert!(!deployment_rolled_out(&Deployment::default()), "no status yet");
    }

    #[test]
    fn pods_of_the_current_template_are_looked_for_once_its_controller_counts_some() {
        assert!(deployment_revision_started(&deployment(2, 2, 1, 1, 1, 0)), "a pod of it, not available");
        assert!(!deployment_revision_started(&deployment(3, 2, 1, 1, 1, 1)), "its controller has not seen it yet");
        assert!(!deployment_revision_started(&deployment(2, 2, 0, 0, 0, 0)), "no replica: no pod to fail");
        assert!(!deployment_revision_started(&deployment(2, 2, 3, 0, 3, 3)), "only old pods so far");
    }

    #[test]
    fn pods_that_cannot_start_are_named_with_their_state() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cart-1"},
            "status": {
                "initContainerStatuses": [{"name": "sidecar", "image": "x", "imageID": "", "ready": false, "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}}}],
                "containerStatuses": [{"name": "app", "image": "y", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "PodInitializing"}}}],
            },
        }))
        .unwrap();
        assert_eq!(pod_failing(&pod).as_deref(), Some("pod cart-1 container sidecar is CrashLoopBackOff"));
        let starting: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cart-2"},
            "status": {"containerStatuses": [{"name": "app", "image": "y", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}}]},
        }))
        .unwrap();
        assert_eq!(pod_failing(&starting), None);
    }
}
