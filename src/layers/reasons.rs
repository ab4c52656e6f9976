//! Every condition reason the layers and the status report use, in one place: users, alerts and tests
//! match on these strings, so each is spelled exactly once.

/// Another (older) policy holds the target.
pub const CONFLICT: &str = "Conflict";
/// A record crosstrace keeps on the target cannot be read.
pub const TARGET_BROKEN: &str = "TargetBroken";
/// crosstrace's change did not become healthy and was reverted (autoRollback).
pub const ROLLED_BACK: &str = "RolledBack";
/// crosstrace's change did not become healthy; autoRollback is off, so it stays.
pub const ROLLOUT_FAILED: &str = "RolloutFailed";
/// A target crosstrace had converged became unhealthy because of its owner (scale, restart, new image,
/// drain): reported, never rolled back.
pub const TARGET_UNHEALTHY: &str = "TargetUnhealthy";
/// An `OnDelete` StatefulSet or DaemonSet holds crosstrace's change until its owner recreates the pods.
pub const WAITING_FOR_RESTART: &str = "WaitingForRestart";
/// The owner paused the Deployment: crosstrace's change rolls out when it is resumed.
pub const DEPLOYMENT_PAUSED: &str = "DeploymentPaused";
/// The owner changed a value crosstrace also sets (the ingress controller image): the owner's value stays.
pub const CHANGED_BY_OWNER: &str = "ChangedByOwner";
/// The ingress controller names no ConfigMap (`--configmap`).
pub const CONFIG_MAP_ARGUMENT_MISSING: &str = "ConfigMapArgumentMissing";
/// The ingress controller's `--configmap` names a ConfigMap outside its own namespace.
pub const CONFIG_MAP_OUTSIDE_NAMESPACE: &str = "ConfigMapOutsideNamespace";
/// A target carries a crosstrace record crosstrace did not write (a forgery, or a leftover of an older
/// version): reported and ignored.
pub const FORGED_RECORD: &str = "ForgedRecord";
/// The ingress controller has no available replica.
pub const TARGET_NOT_AVAILABLE: &str = "TargetNotAvailable";

/// The policy asks for more than the admin limits allow (an image, a namespace, a flow target, a rate).
pub const ADMIN_LIMIT: &str = "AdminLimit";
/// The admin limits cannot be read: nothing is changed until they can.
pub const ADMIN_LIMITS_UNREADABLE: &str = "AdminLimitsUnreadable";

/// Layer and policy conditions.
pub const ROLLOUT_IN_PROGRESS: &str = "RolloutInProgress";
pub const ROLLOUT_STOPPED: &str = "RolloutStopped";
pub const ROLLOUT_PAUSED: &str = "RolloutPaused";
pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
pub const NO_TARGETS: &str = "NoTargets";
pub const ALL_TARGETS_READY: &str = "AllTargetsReady";
pub const TARGETS_NOT_READY: &str = "TargetsNotReady";
pub const ALL_LAYERS_READY: &str = "AllLayersReady";
pub const AS_EXPECTED: &str = "AsExpected";
pub const INVALID_SPEC: &str = "InvalidSpec";
/// The object cannot be read as its type (a value the schema of its time let through, such as an
/// integer wider than its field): reported on it (Event, condition) and skipped until it is fixed.
pub const INVALID_OBJECT: &str = "InvalidObject";

/// Events.
pub const DRIFT_CORRECTED: &str = "DriftCorrected";
pub const REVERTED: &str = "Reverted";
/// A debug session raised the sampling (Event).
pub const DEBUG_SESSION_STARTED: &str = "DebugSessionStarted";
/// A debug session ended and the policy's own sampling is back (Event).
pub const DEBUG_SESSION_ENDED: &str = "DebugSessionEnded";
/// The collector took the canary span (CollectorReachable=True).
pub const CANARY_ACCEPTED: &str = "CanaryAccepted";
/// The collector did not take the canary span: unreachable, refused or too slow (CollectorReachable=False).
pub const CANARY_NOT_ACCEPTED: &str = "CanaryNotAccepted";
