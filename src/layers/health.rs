//! Health of workload rollouts, judged the way `kubectl rollout status` does.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};

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
    let revision_done = match (&status.current_revision, &status.update_revision) {
        (Some(current), Some(update)) => current == update,
        _ => true,
    };
    status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas.unwrap_or(0) >= desired
        && status.ready_replicas.unwrap_or(0) >= desired
        && status.available_replicas.unwrap_or(desired) >= desired
        && revision_done
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
}
