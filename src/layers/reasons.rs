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
/// A Gateway's GatewayClass names a controller crosstrace does not trace: nothing is written.
pub const UNSUPPORTED_PROVIDER: &str = "UnsupportedProvider";
/// The cluster does not serve a kind the Gateway's provider needs (its CRDs are not installed).
pub const PROVIDER_NOT_INSTALLED: &str = "ProviderNotInstalled";
/// `spec.gateway` is set and the cluster does not serve the Gateway API.
pub const GATEWAY_API_NOT_INSTALLED: &str = "GatewayAPINotInstalled";
/// A Gateway's `spec.infrastructure.parametersRef` names something its provider's tracing cannot go into.
pub const PARAMETERS_UNSUPPORTED: &str = "ParametersRefUnsupported";
/// A Gateway's `spec.infrastructure.parametersRef` names an object that does not exist.
pub const PARAMETERS_MISSING: &str = "ParametersRefMissing";
/// An object crosstrace would create exists and is not crosstrace's.
pub const NAME_TAKEN: &str = "NameTaken";
/// The provider cannot express what the policy asks (an address or name form it refuses).
pub const PROVIDER_CANNOT_EXPRESS: &str = "ProviderCannotExpress";
/// Istio gateways need a tracing provider from the operator's configuration, and there is none.
pub const ISTIO_PROVIDER_MISSING: &str = "IstioTracingProviderMissing";
/// The provider reports crosstrace's policy object in conflict with another policy on the same target
/// (GEP-713): reported, not fought.
pub const POLICY_CONFLICT: &str = "PolicyConflict";

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
/// The flows receivers' report Leases cannot be listed (TracesFlowing=Unknown).
pub const FLOW_REPORTS_UNREADABLE: &str = "FlowReportsUnreadable";
