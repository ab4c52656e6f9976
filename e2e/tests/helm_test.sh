#!/usr/bin/env bash
# The Helm chart (helm/crosstrace) on the local e2e cluster: lint, the values schema, what the values render
# (PDB, extra args and env, log level, write pacing, the agent opt-in, PodMonitor, CRD templates, hooks),
# server-side validation of the rendered manifests; an upgrade from the previous chart version (CRDs in
# crds/) that updates the CRDs and keeps a policy; `helm uninstall` with a policy in force, whose pre-delete
# hook reverts everything; `helm install --wait` with the defaults; the agent turned on, in its own
# "privileged" namespace, the controller's enforcing "restricted"; least-privilege RBAC checked both ways;
# the admission policies with the chart's real tokens (the agent's own node; the controller's ConfigMap
# reach; the admin limits); `helm test` (crosstrace check) passing, and failing when the leader is gone; and
# an uninstall that keeps only the CRDs.
#
# Pods are simulated by kwok and run no code. The controller runs as a host process with the chart's
# ServiceAccount token (as in the Rust suites); the hook pods (uninstall Job, helm test) are run by
# e2e/run-hook-pod.sh as host processes with their own ServiceAccount's token, which then writes the pod's
# status, so Helm and the Job controller see what really happened. Needs the crosstrace binary built
# (`cargo build`; $CROSSTRACE_BIN or $CARGO_TARGET_DIR/debug/crosstrace).
#
# Run after `e2e/cluster.sh up` and `eval "$(e2e/cluster.sh env)"` (the env is loaded here when KUBECONFIG
# is unset). Uses `helm` and `kubectl` from PATH. Prints `ok - <check>` / `not ok - <check>` and a final
# `N passed, M failed`; exits non-zero when any check fails. Leaves the CRDs in place (other tests use them).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
chart="$root/helm/crosstrace"
release=crosstrace
ns=crosstrace-system
agent_ns=crosstrace-agent
controller_sa="system:serviceaccount:$ns:crosstrace-controller"
kube_version=--kube-version=1.33.0 # helm template assumes 1.20 otherwise, below the chart's kubeVersion
bin="${CROSSTRACE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/crosstrace/target}/debug/crosstrace}"
export CROSSTRACE_BIN="$bin"
# The host-process controller's admin port, apart from other local clusters' (CROSSTRACE_E2E_PORT_OFFSET).
admin_port=$((18090 + ${CROSSTRACE_E2E_PORT_OFFSET:-0}))
agent_sa="system:serviceaccount:$agent_ns:crosstrace-agent"

# shellcheck source=e2e/tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ----------------------------------------------------------------------------------------------------------
# Offline checks

lint_clean() {
  local out
  out="$(helm lint --strict "$chart" 2>&1)" || { echo "$out"; return 1; }
  # --strict fails on warnings already; errors or warnings printed anyway are a failure too.
  ! grep -E '^\[(WARNING|ERROR)\]' <<<"$out"
}
check "helm lint --strict is clean" lint_clean

# `helm template` of the chart with extra flags.
render() { helm template "$release" "$chart" -n "$ns" "$kube_version" "$@"; }

schema_rejects_bad_values() {
  local bad
  for bad in logFormat=xml controller.replicas=0 agent.securityContext.privileged=true unknown=1 \
    adminLimits.minSampling=8 adminLimits.maxHeaderBytes=4096 'adminLimits.collectorNetworks={anywhere}' \
    'adminLimits.sidecarImages={otel/opentelemetry-collector-k8s:0.165.0}' "agent.enabled=true,agent.namespace=$ns" \
    controller.writeConcurrency=0 controller.writeConcurrency=65 controller.writeBudgetMs=9 \
    controller.writeConcurrencyMax=0 controller.writeConcurrencyMax=257 controller.writeConcurrencyMax=4 \
    controller.writeBudgetMs=60001 controller.workloadWriteBudgetMs=-1 controller.workloadWriteBudgetMs=60001 \
    'logLevel=debug;rm' 'controller.extraEnv[0].value=no-name' \
    'controller.extraEnv[0].name=A,controller.extraEnv[0].values=typo' 'agent.extraArgs[0]=' \
    'controller.topologySpreadConstraints[0].maxSkew=1' hooks.uninstall.timeoutSeconds=5 crds.enable=true \
    agent.podMonitor.interval=often agent.topologySpreadConstraints=x; do
    if render --set "$bad" >/dev/null 2>&1; then
      echo "values.schema.json accepted $bad"
      return 1
    fi
  done
}
check "values.schema.json rejects bad values" schema_rejects_bad_values

# A refused value is named: an unknown key, and a value out of its bounds.
schema_names_the_field() { # <--set value> <expected part of the message>
  local out
  if out="$(render --set "$1" 2>&1)"; then echo "accepted $1"; return 1; fi
  grep -q -- "$2" <<<"$out" || { echo "refusal of $1 does not name $2: $out"; return 1; }
}
check "schema refuses an unknown key naming it (controller.extraArg)" \
  schema_names_the_field controller.extraArg=x "additional properties 'extraArg' not allowed"
check "schema refuses write pacing out of bounds naming the field" \
  schema_names_the_field controller.writeBudgetMs=0 "writeBudgetMs"
check "a write limit ceiling below its start is refused naming both fields" \
  schema_names_the_field controller.writeConcurrencyMax=4 "controller.writeConcurrencyMax (4) must be at least controller.writeConcurrency (8)"

# ----------------------------------------------------------------------------------------------------------
# On the cluster

on_cluster "$root" "$release" "$ns"

installed=0
ns_created=0
tmp="$(mktemp -d)"
psa_ns="helm-test-psa-$$"
agent_check_ns="helm-test-agent-$$"
cm_ns="helm-test-cm-$$"
shop_ns="helm-test-shop-$$"
policy=helm-test-uninstall
stuck=helm-test-stuck
controller_pid=""
stop_controller() {
  [ -n "$controller_pid" ] || return 0
  kill "$controller_pid" 2>/dev/null || true
  wait "$controller_pid" 2>/dev/null || true
  controller_pid=""
}
created_nts=()
cleanup() {
  set +e
  stop_controller
  # Without hooks: nobody would run the uninstall hook's pod now.
  ((installed)) && helm uninstall "$release" -n "$ns" --no-hooks >/dev/null 2>&1
  for left in "$policy" "$stuck"; do
    kubectl get tracingpolicy "$left" >/dev/null 2>&1 &&
      kubectl patch tracingpolicy "$left" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 &&
      kubectl delete tracingpolicy "$left" --wait=false >/dev/null 2>&1
  done
  kubectl delete namespace "$shop_ns" --ignore-not-found --wait=false >/dev/null 2>&1
  ((${#created_nts[@]})) && kubectl delete nodetracing "${created_nts[@]}" --ignore-not-found >/dev/null 2>&1
  kubectl delete namespace "$psa_ns" "$agent_check_ns" "$cm_ns" --ignore-not-found --wait=false >/dev/null 2>&1
  ((ns_created)) && kubectl delete namespace "$ns" --ignore-not-found --wait=false >/dev/null 2>&1
  rm -rf "$tmp"
}
trap cleanup EXIT

# A namespace left terminating by an earlier run cannot take new objects: wait until it is gone.
for terminating in "$ns" "$agent_ns"; do
  if [ "$(kubectl get namespace "$terminating" -o jsonpath='{.status.phase}' 2>/dev/null)" = Terminating ]; then
    kubectl wait --for=delete "namespace/$terminating" --timeout=180s >/dev/null 2>&1 ||
      { not_ok "namespace $terminating from an earlier run still terminating after 180 s"; summary; exit 1; }
  fi
done
# Namespaced objects can only be validated by the server when their namespace exists. The release namespace
# enforces Pod Security "restricted", as the README's install steps say (a chart cannot label the namespace
# it is installed into).
if ! kubectl get namespace "$ns" >/dev/null 2>&1; then
  kubectl create namespace "$ns" >/dev/null && ns_created=1
fi
kubectl label namespace "$ns" --overwrite pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/enforce-version=latest >/dev/null

# ----------------------------------------------------------------------------------------------------------
# What the values render (YAML turned into JSON by kubectl, then asked with jq).

as_json() { kubectl create --dry-run=client -o json -f - | jq -s '[.[] | if .kind == "List" then .items[] else . end]'; }
# rendered_has <jq expression over the list of objects> <helm template flags...>
rendered_has() {
  local expr=$1
  shift
  render "$@" | as_json >"$tmp/objects.json" || return 1
  jq -e "$expr" "$tmp/objects.json" >/dev/null || { echo "not true of the rendered chart ($*): $expr"; return 1; }
}
controller_container='(.[] | select(.kind == "Deployment")).spec.template.spec.containers[0]'
check "a PodDisruptionBudget (maxUnavailable 1) with the default 2 replicas" \
  rendered_has '[.[] | select(.kind == "PodDisruptionBudget")] | length == 1 and .[0].spec.maxUnavailable == 1'
check "no PodDisruptionBudget with 1 replica" \
  rendered_has '[.[] | select(.kind == "PodDisruptionBudget")] | length == 0' --set controller.replicas=1
check "write pacing, extraArgs, extraEnv and logLevel reach the controller container" \
  rendered_has "$controller_container"' | (.args | index("--write-concurrency=16") and index("--write-budget-ms=250")
      and index("--write-concurrency-max=48") and index("--workload-write-budget-ms=35")
      and index("--concurrency=8")) and (.env | any(.name == "RUST_LOG" and .value == "info,crosstrace=debug"))
      and (.env | any(.name == "HTTPS_PROXY" and .value == "http://proxy:3128"))' \
  --set controller.writeConcurrency=16,controller.writeBudgetMs=250,controller.writeConcurrencyMax=48 \
  --set controller.workloadWriteBudgetMs=35 --set 'controller.extraArgs={--concurrency=8}' \
  --set logLevel=info\\,crosstrace=debug --set controller.extraEnv[0].name=HTTPS_PROXY \
  --set controller.extraEnv[0].value=http://proxy:3128
check "the default write pacing is the binary's (8 up to 32, 500 ms, workloads 20 ms) and no RUST_LOG is set" \
  rendered_has "$controller_container"' | (.args | index("--write-concurrency=8") and index("--write-budget-ms=500")
      and index("--write-concurrency-max=32") and index("--workload-write-budget-ms=20"))
      and (.env | all(.name != "RUST_LOG"))'
check "extraArgs, extraEnv and logLevel reach the agent container" \
  rendered_has '(.[] | select(.kind == "DaemonSet")).spec.template.spec.containers[0] | (.args | index("--unixctl=/x.ctl"))
      and (.env | any(.name == "RUST_LOG" and .value == "debug")) and (.env | any(.name == "A" and .value == "b"))' \
  --set agent.enabled=true,logLevel=debug --set 'agent.extraArgs={--unixctl=/x.ctl}' \
  --set agent.extraEnv[0].name=A,agent.extraEnv[0].value=b
check "controller podAnnotations, priorityClassName and topologySpreadConstraints rendered" \
  rendered_has '(.[] | select(.kind == "Deployment")).spec.template | .metadata.annotations.a == "b"
      and .spec.priorityClassName == "high" and (.spec.topologySpreadConstraints | length == 1
      and .[0].topologyKey == "kubernetes.io/hostname" and .[0].whenUnsatisfiable == "DoNotSchedule")' \
  --set controller.podAnnotations.a=b,controller.priorityClassName=high \
  --set controller.topologySpreadConstraints[0].maxSkew=1,controller.topologySpreadConstraints[0].topologyKey=kubernetes.io/hostname \
  --set controller.topologySpreadConstraints[0].whenUnsatisfiable=DoNotSchedule
# The agent is opt-in: by default nothing of it is rendered, so nothing waits for Open vSwitch.
check "defaults: no agent DaemonSet, namespace or PodMonitor" \
  rendered_has '[.[] | select(.kind == "DaemonSet" or .kind == "PodMonitor"
      or (.kind == "Namespace" and .metadata.name == "crosstrace-agent"))] | length == 0'
# kwok does not mount volumes, so a hostPath that would keep a real kubelet in ContainerCreating cannot be
# seen on this cluster: what is checked is the rendered volume. DirectoryOrCreate starts on a node without
# Open vSwitch (an empty directory); `type: Directory` would not.
check "agent on: its OVS hostPath is DirectoryOrCreate (starts on nodes without Open vSwitch)" \
  rendered_has '[.[] | .. | objects | select(has("hostPath")) | .hostPath.type] == ["DirectoryOrCreate"]' \
  --set agent.enabled=true
check "agent.nodeSelector restricts the agents to labelled Open vSwitch nodes" \
  rendered_has '(.[] | select(.kind == "DaemonSet")).spec.template.spec.nodeSelector["crosstrace.dev/ovs"] == "true"' \
  --set agent.enabled=true --set-string 'agent.nodeSelector.crosstrace\.dev/ovs=true'
# (Not through kubectl: it cannot read a PodMonitor without the monitoring.coreos.com CRDs.)
podmonitor_rendered() {
  local out
  out="$(render --set agent.enabled=true,agent.podMonitor.enabled=true,agent.podMonitor.interval=15s \
    -s templates/agent-podmonitor.yaml)" || return 1
  grep -q '^kind: PodMonitor$' <<<"$out" && grep -q '^  namespace: crosstrace-agent$' <<<"$out" &&
    grep -q -- '- port: admin$' <<<"$out" && grep -q 'interval: 15s$' <<<"$out" &&
    grep -q 'app.kubernetes.io/component: agent$' <<<"$out" || { echo "$out"; return 1; }
  ! render --set agent.enabled=true | grep -q '^kind: PodMonitor$' || { echo "rendered by default"; return 1; }
}
check "agent.podMonitor renders a PodMonitor of the agents' admin port (off by default)" podmonitor_rendered
check "the CRDs are templates, kept on uninstall" \
  rendered_has '[.[] | select(.kind == "CustomResourceDefinition")] | length == 2
      and all(.metadata.annotations["helm.sh/resource-policy"] == "keep")'
check "crds.enabled=false renders no CRD; crds.keep=false drops the keep annotation" \
  rendered_has '[.[] | select(.kind == "CustomResourceDefinition")] | length == 0' --set crds.enabled=false &&
  rendered_has '[.[] | select(.kind == "CustomResourceDefinition") | .metadata.annotations] | all(. == null)' \
    --set crds.keep=false
check "the uninstall hook: a pre-delete Job running crosstrace uninstall --wait, restricted, its own ServiceAccount" \
  rendered_has '(.[] | select(.kind == "Job")) | .metadata.annotations["helm.sh/hook"] == "pre-delete"
      and .spec.template.spec.serviceAccountName == "crosstrace-uninstall"
      and .spec.template.spec.containers[0].args == ["uninstall", "--wait", "--timeout=100s"]
      and .spec.template.spec.securityContext.runAsNonRoot
      and .spec.template.spec.containers[0].securityContext.allowPrivilegeEscalation == false' \
  --set hooks.uninstall.timeoutSeconds=100
check "the uninstall hook's ClusterRole: list and delete tracingpolicies, nothing else" \
  rendered_has '(.[] | select(.kind == "ClusterRole" and .metadata.name == "crosstrace-uninstall")).rules
      == [{"apiGroups": ["crosstrace.dev"], "resources": ["tracingpolicies"], "verbs": ["list", "delete"]}]'
check "hooks.uninstall.enabled=false renders no uninstall hook" \
  rendered_has '[.[] | select(.metadata.name == "crosstrace-uninstall")] | length == 0' --set hooks.uninstall.enabled=false

# The agent's namespace is the chart's own (created at install): for the dry run, a stand-in that exists.
# Without the `helm test` pod: a pod is admitted only once its ServiceAccount exists, which a dry run does
# not create (its Pod Security is checked below).
template_accepted() {
  kubectl create namespace "$agent_check_ns" >/dev/null &&
    render --skip-tests --set agent.enabled=true,agent.namespace="$agent_check_ns" >"$tmp/rendered.yaml" &&
    kubectl apply --dry-run=server -f "$tmp/rendered.yaml"
}
check "helm template output (agent on) accepted by the server (apply --dry-run=server)" template_accepted

template_with_options_accepted() {
  render --skip-tests --set logFormat=json,logLevel=debug,controller.replicas=3 \
    --set otel.endpoint=http://otel-collector.observability:4317 | kubectl apply --dry-run=server -f - >/dev/null
}
check "helm template with defaults, json logs, 3 replicas and OTLP accepted by the server" template_with_options_accepted

# The controller's pod and the hook pods, created for real (dry run) in a namespace that enforces Pod
# Security "restricted".
pods_restricted() {
  local out i kind
  kubectl create namespace "$psa_ns" >/dev/null
  kubectl label namespace "$psa_ns" pod-security.kubernetes.io/enforce=restricted \
    pod-security.kubernetes.io/warn=restricted >/dev/null
  # The pod runs as the namespace's default ServiceAccount, which kube-controller-manager creates shortly.
  for ((i = 0; i < 100; i++)); do
    kubectl -n "$psa_ns" get serviceaccount default >/dev/null 2>&1 && break
    sleep 0.2
  done
  render | as_json >"$tmp/objects.json"
  for kind in Deployment Job Pod; do
    jq --arg ns "$psa_ns" --arg kind "$kind" '.[] | select(.kind == $kind)
      | {apiVersion: "v1", kind: "Pod", metadata: {name: ("psa-check-" + ($kind | ascii_downcase)), namespace: $ns},
         spec: ((if $kind == "Pod" then .spec else .spec.template.spec end) | .serviceAccountName = "default")}' \
      "$tmp/objects.json" >"$tmp/pod.json"
    out="$(kubectl create --dry-run=server -f "$tmp/pod.json" 2>&1)" || { echo "$kind: $out"; return 1; }
    ! grep -i warning <<<"$out" || return 1
  done
}
check "controller, uninstall hook and test pods admitted under Pod Security restricted" pods_restricted

# ----------------------------------------------------------------------------------------------------------
# Upgrade from the previous chart version, then `helm uninstall` with a policy in force.
#
# The previous version is the chart as it was just before its CRDs moved from crds/ to templates/: the parent
# of the commit that deleted helm/crosstrace/crds/ (full history is needed, as a CI clone has).

# spawn_controller: a host process with the chart's controller ServiceAccount token. Run it in the script's
# own shell (not inside `check`, whose subshell would keep its PID from stop_controller).
spawn_controller() {
  "$root/e2e/sa-kubeconfig.sh" "$ns" crosstrace-controller "$tmp/controller.kubeconfig" >/dev/null || return 1
  KUBECONFIG="$tmp/controller.kubeconfig" RUST_LOG=info "$bin" controller --admin-addr "127.0.0.1:$admin_port" \
    --namespace "$ns" --lease-duration 6 >>"$tmp/controller.log" 2>&1 &
  controller_pid=$!
}
# start_controller: spawn_controller and controller_leads, for functions that stop it themselves.
start_controller() { spawn_controller && controller_leads; }
controller_leads() { # waits until the spawned controller holds the Lease
  local i holder
  [ -n "$controller_pid" ] || { echo "no controller was started"; return 1; }
  # Patient (90 s, like the Rust suites): on a busy machine a fresh process takes a while to lead.
  for ((i = 0; i < 450; i++)); do
    holder="$(kubectl -n "$ns" get lease crosstrace-controller -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)"
    [[ "$holder" == *"-$controller_pid" ]] && return 0
    sleep 0.2
  done
  echo "the controller (pid $controller_pid) did not take the Lease in 90 s"
  tail -20 "$tmp/controller.log"
  return 1
}

old_chart() {
  local deleted rev
  deleted="$(git -C "$root" log --no-renames --diff-filter=D --format=%H -1 -- helm/crosstrace/crds/tracingpolicies.crosstrace.dev.yaml)"
  [ -n "$deleted" ] || { echo "no commit deleted helm/crosstrace/crds/ (shallow clone?)"; return 1; }
  rev="$deleted^"
  mkdir -p "$tmp/old"
  git -C "$root" archive "$rev" helm/crosstrace | tar -x -C "$tmp/old"
  [ -d "$tmp/old/helm/crosstrace/crds" ] || { echo "$rev has no helm/crosstrace/crds"; return 1; }
  grep -q '^version: 0.1.0$' "$tmp/old/helm/crosstrace/Chart.yaml" || { echo "$rev: not chart 0.1.0"; return 1; }
}
check "the previous chart version (0.1.0, CRDs in crds/) taken from git history" old_chart

install_old() {
  helm install "$release" "$tmp/old/helm/crosstrace" -n "$ns" --wait=false >/dev/null &&
    kubectl -n "$ns" rollout status deployment/crosstrace-controller --timeout=120s >/dev/null &&
    kubectl wait --for=condition=Established --timeout=30s crd/tracingpolicies.crosstrace.dev crd/nodetracings.crosstrace.dev >/dev/null
}
check "the previous chart version installs" install_old
helm status "$release" -n "$ns" >/dev/null 2>&1 && installed=1

spawn_controller || true
check "the controller runs (host process, the chart's token) and leads" controller_leads

# A small Deployment the policy injects; its pod template before is what the uninstall must bring back.
shop_created() {
  kubectl create namespace "$shop_ns" >/dev/null &&
    kubectl label namespace "$shop_ns" tracing=enabled >/dev/null &&
    kubectl -n "$shop_ns" apply -f - >/dev/null <<EOT &&
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app.kubernetes.io/part-of: helm-test}}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: "nginx:1.27"}]}
EOT
    kubectl -n "$shop_ns" rollout status deployment/web --timeout=60s >/dev/null &&
    kubectl -n "$shop_ns" get deployment web -o json | jq -S '.spec.template' >"$tmp/template-before.json"
}
check "a Deployment to instrument" shop_created
policy_injected() {
  local i
  workloads_policy "$policy" "kubernetes.io/metadata.name: $shop_ns" "app.kubernetes.io/part-of: helm-test" || return 1
  for ((i = 0; i < 300; i++)); do
    kubectl get tracingpolicy "$policy" -o json |
      jq -e '.status.conditions[]? | select(.type == "Ready" and .status == "True")' >/dev/null 2>&1 && break
    sleep 0.2
  done
  kubectl -n "$shop_ns" get deployment web -o json |
    jq -e '.spec.template.metadata.annotations["crosstrace.dev/injection"] != null' >/dev/null ||
    { echo "the Deployment is not injected"; kubectl get tracingpolicy "$policy" -o yaml; return 1; }
}
check "a TracingPolicy injects the Deployment (Ready)" policy_injected
policy_uid="$(kubectl get tracingpolicy "$policy" -o jsonpath='{.metadata.uid}' 2>/dev/null || true)"

# CRDs that Helm did not install (the old chart's crds/, or `kubectl apply -f crds/`) carry no release
# metadata, so Helm refuses to take them over unless told to: --take-ownership (Helm >= 3.17), as the
# README's upgrade note says.
upgrade() {
  helm upgrade "$release" "$chart" -n "$ns" --take-ownership --set agent.enabled=true --wait=false \
    >"$tmp/upgrade.out" 2>&1 || { cat "$tmp/upgrade.out"; return 1; }
  kubectl -n "$ns" rollout status deployment/crosstrace-controller --timeout=120s >/dev/null
}
check "helm upgrade from the previous version to this chart (--take-ownership)" upgrade
crds_upgraded() {
  local crd
  for crd in tracingpolicies.crosstrace.dev nodetracings.crosstrace.dev; do
    kubectl get crd "$crd" -o json | jq -e --arg r "$release" '.metadata.annotations["helm.sh/resource-policy"] == "keep"
      and .metadata.annotations["meta.helm.sh/release-name"] == $r
      and .metadata.labels["helm.sh/chart"] == "crosstrace-0.2.0"' >/dev/null ||
      { echo "$crd was not updated by the upgrade:"; kubectl get crd "$crd" -o jsonpath='{.metadata}'; return 1; }
  done
}
check "the upgrade updated the CRDs (this chart's labels, keep annotation, owned by the release)" crds_upgraded
policy_kept() {
  [ -n "$policy_uid" ] &&
    [ "$(kubectl get tracingpolicy "$policy" -o jsonpath='{.metadata.uid}')" = "$policy_uid" ] &&
    kubectl -n "$shop_ns" get deployment web -o json |
    jq -e '.spec.template.metadata.annotations["crosstrace.dev/injection"] != null' >/dev/null
}
check "the upgrade kept the policy (same object) and its injection" policy_kept

# `helm uninstall` with the policy in force: the pre-delete hook runs (played by run-hook-pod.sh), deletes
# the policy and waits while the controller, still running, reverts the Deployment and lets the policy go.
uninstall_reverts() {
  local hook_pid code=0
  "$root/e2e/run-hook-pod.sh" "$ns" uninstall 120 >"$tmp/uninstall-hook.out" 2>&1 &
  hook_pid=$!
  helm uninstall "$release" -n "$ns" --wait --timeout=150s >"$tmp/uninstall.out" 2>&1 || code=$?
  wait "$hook_pid" || { echo "the uninstall hook failed:"; cat "$tmp/uninstall-hook.out"; return 1; }
  ((code == 0)) || { echo "helm uninstall failed:"; cat "$tmp/uninstall.out"; return 1; }
  grep -q "running pod $ns/crosstrace-uninstall-.*: crosstrace uninstall --wait" "$tmp/uninstall-hook.out" &&
    grep -q "no TracingPolicy left" "$tmp/uninstall-hook.out" ||
    { echo "the hook did not run crosstrace uninstall --wait to the end:"; cat "$tmp/uninstall-hook.out"; return 1; }
}
check "helm uninstall runs the pre-delete hook (crosstrace uninstall --wait) and succeeds" uninstall_reverts
helm status "$release" -n "$ns" >/dev/null 2>&1 || installed=0
stop_controller
target_reverted() {
  kubectl -n "$shop_ns" get deployment web -o json | jq -S '.spec.template' >"$tmp/template-after.json"
  diff "$tmp/template-before.json" "$tmp/template-after.json"
}
check "after uninstall the Deployment's pod template is exactly what it was" target_reverted
no_policy_left() {
  local left
  left="$(kubectl get tracingpolicies -o json | jq -r '[.items[] | .metadata.name + " finalizers=" + (.metadata.finalizers | tostring)] | join(", ")')"
  [ -z "$left" ] || { echo "left: $left"; return 1; }
}
check "after uninstall no TracingPolicy (and so no finalizer) is left" no_policy_left
no_hook_left() {
  local left=()
  kubectl -n "$ns" get job crosstrace-uninstall >/dev/null 2>&1 && left+=(job/crosstrace-uninstall)
  kubectl -n "$ns" get serviceaccount crosstrace-uninstall >/dev/null 2>&1 && left+=(serviceaccount/crosstrace-uninstall)
  kubectl get clusterrole crosstrace-uninstall >/dev/null 2>&1 && left+=(clusterrole/crosstrace-uninstall)
  kubectl get clusterrolebinding crosstrace-uninstall >/dev/null 2>&1 && left+=(clusterrolebinding/crosstrace-uninstall)
  ((${#left[@]} == 0)) || { echo "left: ${left[*]}"; return 1; }
}
check "the succeeded hook leaves nothing behind (Job, ServiceAccount, RBAC)" no_hook_left
kubectl delete namespace "$shop_ns" --wait=false >/dev/null 2>&1 || true
for terminating in "$agent_ns"; do
  kubectl wait --for=delete "namespace/$terminating" --timeout=180s >/dev/null 2>&1 || true
done

# ----------------------------------------------------------------------------------------------------------
# A fresh install with the defaults: nothing waits for Open vSwitch, so `--wait` finishes.

install_defaults() {
  helm install "$release" "$chart" -n "$ns" --wait --timeout=120s >"$tmp/install.out" 2>&1 ||
    { cat "$tmp/install.out"; return 1; }
  grep -q 'kubectl apply -f config/samples/edge.yaml' "$tmp/install.out" ||
    { echo "NOTES do not say what to apply next"; cat "$tmp/install.out"; return 1; }
  grep -q -- '--set agent.enabled=true' "$tmp/install.out" ||
    { echo "NOTES do not say how to turn the agent on"; cat "$tmp/install.out"; return 1; }
}
check "helm install --wait with the defaults finishes (and NOTES say what to apply next, how to enable the agent)" \
  install_defaults
# (check runs its command in a subshell, so whether the release exists is asked here.)
helm status "$release" -n "$ns" >/dev/null 2>&1 && installed=1
((installed)) || { summary; exit 1; }

defaults_every_pod_runs() {
  local out
  out="$(kubectl get pods -A -l app.kubernetes.io/instance="$release" -o json |
    jq -r '.items[] | select(.status.phase != "Running" or ([.status.conditions[]? | select(.type == "Ready")][0].status != "True"))
      | .metadata.namespace + "/" + .metadata.name + " " + .status.phase')"
  [ -z "$out" ] || { echo "pods not Running and Ready: $out"; return 1; }
  ! kubectl get daemonset -A -l app.kubernetes.io/instance="$release" -o name | grep -q . ||
    { echo "a DaemonSet was installed with the defaults"; return 1; }
}
check "defaults: every pod of the release Running and Ready, no agent DaemonSet" defaults_every_pod_runs

controller_ready() {
  kubectl -n "$ns" rollout status deployment/crosstrace-controller --timeout=120s &&
    kubectl -n "$ns" get deployment crosstrace-controller -o json |
    jq -e '.status.readyReplicas == .spec.replicas and .spec.replicas == 2' >/dev/null
}
check "controller Deployment Ready (2 replicas)" controller_ready
pdb_installed() {
  kubectl -n "$ns" get poddisruptionbudget crosstrace-controller -o json | jq -e '.spec.maxUnavailable == 1' >/dev/null
}
check "PodDisruptionBudget crosstrace-controller (maxUnavailable 1) installed" pdb_installed

enable_agent() {
  helm upgrade "$release" "$chart" -n "$ns" --reuse-values --set agent.enabled=true --wait=false >/dev/null
}
check "helm upgrade --set agent.enabled=true" enable_agent

agent_ready() {
  local nodes i ready=0 desired=0
  nodes="$(kubectl get nodes -o name | wc -l)"
  for ((i = 0; i < 600; i++)); do
    read -r desired ready < <(kubectl -n "$agent_ns" get daemonset crosstrace-agent \
      -o jsonpath='{.status.desiredNumberScheduled} {.status.numberReady}' 2>/dev/null)
    [ "${desired:-0}" -eq "$nodes" ] && [ "${ready:-0}" -eq "$nodes" ] && break
    sleep 0.2
  done
  echo "agent pods Ready: ${ready:-0}, scheduled: ${desired:-0}, nodes: $nodes"
  [ "${desired:-0}" -eq "$nodes" ] && [ "${ready:-0}" -eq "$nodes" ] || return 1
  kubectl -n "$agent_ns" get pods -l app.kubernetes.io/component=agent -o json |
    jq -e --argjson n "$nodes" '[.items[].spec.nodeName] | unique | length == $n' >/dev/null
}
check "agent DaemonSet has one Ready pod per node (in namespace $agent_ns)" agent_ready

# Pod Security: the agent's namespace is privileged (hostPath for the OVS sockets, uid 0), the controller's
# enforces restricted, for real: its pods were admitted under it (Ready above), a root pod is not.
namespace_label() { # <namespace> <label> <want>
  local got
  got="$(kubectl get namespace "$1" -o json | jq -r --arg l "$2" '.metadata.labels[$l] // ""')"
  [ "$got" = "$3" ] || { echo "namespace $1: $2=$got, want $3"; return 1; }
}
check "agent namespace $agent_ns is labelled Pod Security privileged" \
  namespace_label "$agent_ns" pod-security.kubernetes.io/enforce privileged
check "controller namespace $ns enforces Pod Security restricted" \
  namespace_label "$ns" pod-security.kubernetes.io/enforce restricted
root_pod_refused() {
  local out
  if out="$(kubectl -n "$ns" run psa-root --image=busybox --restart=Never --dry-run=server \
    --overrides='{"spec":{"securityContext":{"runAsUser":0}}}' 2>&1)"; then
    echo "a root pod was admitted in $ns: $out"
    return 1
  fi
  grep -q 'violates PodSecurity "restricted' <<<"$out" || { echo "$out"; return 1; }
}
check "controller namespace refuses a pod that violates restricted" root_pod_refused
agent_not_in_restricted() {
  ! kubectl -n "$ns" get daemonset crosstrace-agent >/dev/null 2>&1 &&
    kubectl -n "$agent_ns" get daemonset crosstrace-agent >/dev/null
}
check "the agent runs outside the controller's namespace" agent_not_in_restricted

# can <yes|no> <verb> <resource> <user> [flags...]
can() {
  local want=$1 verb=$2 resource=$3 user=$4 got
  shift 4
  if [[ "$resource" == *.* && "$resource" != */* ]]; then
    got="$(review "$verb" "${resource%%.*}" "${resource#*.}" "$user" "$@")"
  else
    got="$(kubectl auth can-i "$verb" "$resource" --as="$user" "$@" 2>/dev/null || true)"
  fi
  [ "$got" = "$want" ] || { echo "can-i $verb $resource as $user $*: $got, want $want"; return 1; }
}
# review <verb> <resource> <group> <user> [-A | -n <namespace>]: yes/no from a SubjectAccessReview. Unlike
# `kubectl auth can-i`, it needs no discovery, so it answers for kinds this cluster does not serve (the
# Gateway API's before its CRDs are installed), which is what RBAC grants regardless.
review() {
  local verb=$1 resource=$2 group=$3 user=$4 namespace=""
  [ "${5:-}" = "-n" ] && namespace=$6
  kubectl create -o jsonpath='{.status.allowed}' -f - <<EOT 2>/dev/null | sed 's/^true$/yes/; s/^false$/no/; s/^$/no/'
{"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {"user": "$user",
 "resourceAttributes": {"verb": "$verb", "group": "$group", "resource": "$resource", "namespace": "$namespace"}}}
EOT
}
check "controller may patch deployments" can yes patch deployments "$controller_sa" -A
check "controller may not delete deployments" can no delete deployments "$controller_sa" -n default
check "controller may not read secrets" can no get secrets "$controller_sa" -A
check "controller may update its Lease" can yes update leases/crosstrace-controller "$controller_sa" -n "$ns"
check "controller may not touch Leases elsewhere" can no create leases "$controller_sa" -n kube-system
check "controller may patch tracingpolicies/status" can yes patch tracingpolicies "$controller_sa" --subresource=status
# Trimmed to the verbs the controller uses.
check "controller may list tracingpolicies" can yes list tracingpolicies "$controller_sa"
check "controller may watch tracingpolicies" can yes watch tracingpolicies "$controller_sa"
check "controller may patch tracingpolicies (finalizer)" can yes patch tracingpolicies "$controller_sa"
check "controller may not update tracingpolicies" can no update tracingpolicies "$controller_sa"
check "controller may not get tracingpolicies one by one" can no get tracingpolicies "$controller_sa"
check "controller may not create tracingpolicies" can no create tracingpolicies "$controller_sa"
check "controller may not delete tracingpolicies" can no delete tracingpolicies "$controller_sa"
check "controller may not get tracingpolicies/status" can no get tracingpolicies "$controller_sa" --subresource=status
check "controller may not update tracingpolicies/status" can no update tracingpolicies "$controller_sa" --subresource=status
check "controller may not create deployments" can no create deployments "$controller_sa" -n default
check "controller may not update (replace) configmaps" can no update configmaps "$controller_sa" -n default
check "controller may delete configmaps (narrowed by admission)" can yes delete configmaps "$controller_sa" -n default
check "controller may list pods" can yes list pods "$controller_sa" -A
check "controller may not get pods" can no get pods "$controller_sa" -n default
check "controller may list namespaces" can yes list namespaces "$controller_sa"
check "controller may not get namespaces" can no get namespaces "$controller_sa"
check "controller may not get nodes" can no get nodes "$controller_sa"
check "controller may not update nodetracings" can no update nodetracings "$controller_sa"
check "controller may patch gateways" can yes patch gateways.gateway.networking.k8s.io "$controller_sa" -A
check "controller may not update (replace) gateways" can no update gateways.gateway.networking.k8s.io "$controller_sa" -n default
check "controller may not create gateways" can no create gateways.gateway.networking.k8s.io "$controller_sa" -n default
check "controller may not delete gateways" can no delete gateways.gateway.networking.k8s.io "$controller_sa" -n default
check "controller may get gatewayclasses" can yes get gatewayclasses.gateway.networking.k8s.io "$controller_sa"
check "controller may not patch gatewayclasses" can no patch gatewayclasses.gateway.networking.k8s.io "$controller_sa"
check "controller may watch httproutes" can yes watch httproutes.gateway.networking.k8s.io "$controller_sa" -A
check "controller may not patch httproutes" can no patch httproutes.gateway.networking.k8s.io "$controller_sa" -n default
check "controller may not patch grpcroutes" can no patch grpcroutes.gateway.networking.k8s.io "$controller_sa" -n default
check "controller may create envoyproxies" can yes create envoyproxies.gateway.envoyproxy.io "$controller_sa" -n default
check "controller may delete observabilitypolicies" can yes delete observabilitypolicies.gateway.nginx.org "$controller_sa" -n default
check "controller may patch nginxproxies" can yes patch nginxproxies.gateway.nginx.org "$controller_sa" -n default
check "controller may create telemetries" can yes create telemetries.telemetry.istio.io "$controller_sa" -n default
check "controller may not update telemetries" can no update telemetries.telemetry.istio.io "$controller_sa" -n default
check "controller may not touch other Envoy Gateway kinds" can no patch backendtrafficpolicies.gateway.envoyproxy.io "$controller_sa" -n default
check "agent may patch nodetracings/status" can yes patch nodetracings "$agent_sa" --subresource=status
check "agent may not delete nodetracings" can no delete nodetracings "$agent_sa"
check "agent may not patch nodetracings (spec)" can no patch nodetracings "$agent_sa"
check "agent may get nodes" can yes get nodes "$agent_sa"
check "agent may not list nodes" can no list nodes "$agent_sa"
# The hooks' ServiceAccounts: the uninstall hook lists and deletes policies; the helm test check reads.
uninstall_sa="system:serviceaccount:$ns:crosstrace-uninstall"
check_sa="system:serviceaccount:$ns:crosstrace-check"
check "uninstall hook may list tracingpolicies" can yes list tracingpolicies "$uninstall_sa"
check "uninstall hook may delete tracingpolicies" can yes delete tracingpolicies "$uninstall_sa"
check "uninstall hook may not patch tracingpolicies (finalizers)" can no patch tracingpolicies "$uninstall_sa"
check "uninstall hook may not watch tracingpolicies" can no watch tracingpolicies "$uninstall_sa"
check "uninstall hook may not delete nodetracings" can no delete nodetracings "$uninstall_sa"
check "uninstall hook may not read secrets" can no get secrets "$uninstall_sa" -n "$ns"
check "helm test check may get the TracingPolicy CRD" can yes get customresourcedefinitions/tracingpolicies.crosstrace.dev "$check_sa"
check "helm test check may not get other CRDs" can no get customresourcedefinitions/foos.example.com "$check_sa"
check "helm test check may create subjectaccessreviews" can yes create subjectaccessreviews.authorization.k8s.io "$check_sa"
check "helm test check may get the controller's Lease" can yes get leases/crosstrace-controller "$check_sa" -n "$ns"
check "helm test check may not update the Lease" can no update leases/crosstrace-controller "$check_sa" -n "$ns"
check "helm test check may get the agents' DaemonSet" can yes get daemonsets/crosstrace-agent "$check_sa" -n "$agent_ns"
check "helm test check may not list tracingpolicies" can no list tracingpolicies "$check_sa"
check "helm test check may not read secrets" can no get secrets "$check_sa" -n "$ns"

# refused_by <policy> <expected message part> <command...>: the command fails with that admission policy's
# message. Retried for a while: a new policy takes effect once the API server's policy informer has seen it.
refused_by() {
  local policy=$1 want=$2 out="" i
  shift 2
  for ((i = 0; i < 40; i++)); do
    if ! out="$("$@" 2>&1)" && grep -q "$policy" <<<"$out"; then
      grep -q "$want" <<<"$out" || { echo "$out"; return 1; }
      return 0
    fi
    sleep 0.5
  done
  echo "not refused by the policy: $out"
  return 1
}
refused() { refused_by crosstrace-agent-own-node "$@"; }

# The admission policy, with real ServiceAccount tokens: an agent pod's token carries its node's name.
# The API server's address and CA, for requests made with a ServiceAccount token alone.
api_server() {
  kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}'
}
api_ca() {
  local ca="$tmp/ca.crt"
  if [ ! -s "$ca" ]; then
    kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' |
      base64 -d >"$ca"
    [ -s "$ca" ] || cp "$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority}')" "$ca"
  fi
  echo "$ca"
}
ensure_nodetracing() { # <name>: creates it (and removes it at exit) unless it exists
  kubectl get nodetracing "$1" >/dev/null 2>&1 && return 0
  kubectl create -f - >/dev/null <<EOF
apiVersion: crosstrace.dev/v1alpha1
kind: NodeTracing
metadata: {name: $1}
spec: {nodeName: $1}
EOF
  created_nts+=("$1")
}
# status_patch <token> <nodetracing>: a merge patch of the status, sent the way the agent sends it (a bare
# PATCH; `kubectl patch` would GET first, which the agent may not). A server-side dry run: admission runs,
# nothing is stored.
status_patch() {
  local out code
  out="$(curl -sS --cacert "$(api_ca)" -H "Authorization: Bearer $1" -X PATCH \
    -H 'Content-Type: application/merge-patch+json' -d '{"status":{"ovsVersion":"helm-test"}}' \
    -w '\n%{http_code}' "$(api_server)/apis/crosstrace.dev/v1alpha1/nodetracings/$2/status?dryRun=All")"
  code="${out##*$'\n'}"
  echo "HTTP $code: ${out%$'\n'*}"
  [ "$code" = 200 ]
}

pod="$(kubectl -n "$agent_ns" get pods -l app.kubernetes.io/component=agent -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)"
node="$(kubectl -n "$agent_ns" get pod "$pod" -o jsonpath='{.spec.nodeName}' 2>/dev/null || true)"
other="helm-test-other-$$"
if [ -n "$pod" ] && [ -n "$node" ] && ensure_nodetracing "$node" && ensure_nodetracing "$other"; then
  bound="$(kubectl -n "$agent_ns" create token crosstrace-agent --bound-object-kind=Pod --bound-object-name="$pod" \
    --duration=10m)"
  unbound="$(kubectl -n "$agent_ns" create token crosstrace-agent --duration=10m)"

  check "agent token of a pod on $node may patch NodeTracing $node status" status_patch "$bound" "$node"
  check "agent token of a pod on $node is refused for another node's NodeTracing status" \
    refused "may only write NodeTracing $node" status_patch "$bound" "$other"
  check "agent token not bound to a pod is refused" \
    refused "bound to a pod on a node" status_patch "$unbound" "$node"
else
  not_ok "set up the admission policy checks (agent pod '$pod' on node '$node')"
fi

# The controller's ConfigMap reach, with its own ServiceAccount token. Every write is a server-side dry run:
# admission runs, nothing is stored.
cm_policy=crosstrace-controller-configmaps
as_controller() { kubectl --kubeconfig="$tmp/controller.kubeconfig" "$@"; }
controller_cm() { # <name> <labels json> <data json>: the controller's own kind of write, a forced apply
  as_controller apply --server-side --force-conflicts --field-manager=crosstrace --dry-run=server -f - <<EOF
{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "$1", "namespace": "$cm_ns", "labels": $2}, "data": $3}
EOF
}
if "$root/e2e/sa-kubeconfig.sh" "$ns" crosstrace-controller "$tmp/controller.kubeconfig" &&
  kubectl create namespace "$cm_ns" >/dev/null &&
  kubectl -n "$cm_ns" create configmap ingress-nginx-controller --from-literal=use-forwarded-headers=true \
    --from-literal=otel-sampler-ratio=0.5 >/dev/null; then
  otel='{"enable-opentelemetry": "true", "otel-sampler-ratio": "0.25"}'
  edge_label='{"crosstrace.dev/ingress-policy": "helm-test"}'
  # The first check waits for the policy to be in force (refused_by retries), the others then hold at once.
  check "controller token: adding http-snippet to an ingress-nginx ConfigMap is refused" \
    refused_by "$cm_policy" "would change http-snippet" \
    controller_cm ingress-nginx-controller "$edge_label" '{"enable-opentelemetry": "true", "http-snippet": "evil"}'
  check "controller token: deleting a ConfigMap it did not create is refused" \
    refused_by "$cm_policy" "may delete only" as_controller -n "$cm_ns" delete configmap ingress-nginx-controller --dry-run=server
  check "controller token: creating an unlabelled ConfigMap is refused" \
    refused_by "$cm_policy" "may create only" controller_cm foreign '{}' '{"a": "b"}'
  check "controller token: writing its own admin limits is refused" \
    refused_by "$cm_policy" "protected namespace $ns" \
    as_controller -n "$ns" patch configmap crosstrace-admin-limits --dry-run=server --type=merge -p '{"data":{"minSampling":"1"}}'
  check "controller token: the OpenTelemetry keys and label of an ingress-nginx ConfigMap are written" \
    controller_cm ingress-nginx-controller "$edge_label" "$otel"
  check "controller token: its collector ConfigMap is written" \
    controller_cm crosstrace-otel-helm-test '{"crosstrace.dev/workloads-policy": "helm-test"}' '{"deployment.yaml": "receivers: {}"}'
  ledger_written() {
    as_controller apply --server-side --force-conflicts --field-manager=crosstrace --dry-run=server -f - <<EOF
{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "crosstrace-ingress-records", "namespace": "$ns",
 "labels": {"crosstrace.dev/ingress-ledger": "true"}}, "data": {"helm-test-uid": "{}"}}
EOF
  }
  check "controller token: its ledger of edge records in its own namespace is written" ledger_written
  # The ledger must exist for its delete to reach admission (a fresh cluster has none yet).
  ledger_created=0
  if ! kubectl -n "$ns" get configmap crosstrace-ingress-records >/dev/null 2>&1; then
    kubectl -n "$ns" create configmap crosstrace-ingress-records >/dev/null && ledger_created=1
  fi
  check "controller token: deleting its ledger is refused" \
    refused_by "$cm_policy" "protected namespace $ns" \
    as_controller -n "$ns" delete configmap crosstrace-ingress-records --dry-run=server
  if [ "$ledger_created" = 1 ]; then kubectl -n "$ns" delete configmap crosstrace-ingress-records >/dev/null; fi
else
  not_ok "set up the controller ConfigMap policy checks"
fi

# The admin limits at admission, with the chart's defaults (e2e_admin has every field).
policy_refused() { # <expected message part> <spec json>
  refused_by crosstrace-admin-limits "$1" kubectl create --dry-run=server -f - <<EOF
{"apiVersion": "crosstrace.dev/v1alpha1", "kind": "TracingPolicy", "metadata": {"name": "helm-test-limits"}, "spec": $2}
EOF
}
check "admin limits: a sidecar image from another repository is refused naming the field" \
  policy_refused "spec.workloads.sidecar.image: evil.example/collector:1 is not from an allowed repository" \
  '{"collector": {"endpoint": "otel:4317"}, "workloads": {"namespaceSelector": {}, "sidecar": {"image": "evil.example/collector:1"}}}'

# ----------------------------------------------------------------------------------------------------------
# helm test: crosstrace check in the test pod (played by run-hook-pod.sh), with its own ServiceAccount.

# helm_test_run <want: pass|fail>: runs `helm test` with the hook runner; the check's output is in
# $tmp/test-hook.out.
helm_test_run() {
  local want=$1 hook_pid code=0 hook_code=0
  "$root/e2e/run-hook-pod.sh" "$ns" test 60 >"$tmp/test-hook.out" 2>&1 &
  hook_pid=$!
  helm test "$release" -n "$ns" --timeout=90s >"$tmp/test.out" 2>&1 || code=$?
  wait "$hook_pid" || hook_code=$?
  if [ "$want" = pass ]; then
    ((code == 0 && hook_code == 0)) || { cat "$tmp/test-hook.out" "$tmp/test.out"; return 1; }
    ! grep -q '^FAIL' "$tmp/test-hook.out" || { cat "$tmp/test-hook.out"; return 1; }
    grep -q '^ok: Lease crosstrace-controller is held by' "$tmp/test-hook.out" &&
      grep -q '^ok: CRD tracingpolicies.crosstrace.dev is Established' "$tmp/test-hook.out" &&
      grep -q "^ok: the controller's ServiceAccount may get, update leases crosstrace-controller" "$tmp/test-hook.out" &&
      grep -q '^ok: 3 node agents of DaemonSet crosstrace-agent are Ready' "$tmp/test-hook.out" ||
      { echo "missing checks:"; cat "$tmp/test-hook.out"; return 1; }
  else
    ((code != 0 && hook_code != 0)) || { echo "helm test passed, want a failure"; cat "$tmp/test-hook.out"; return 1; }
    grep -q '^FAIL: Lease crosstrace-controller .*stale' "$tmp/test-hook.out" ||
      { echo "no FAIL line naming the stale Lease:"; cat "$tmp/test-hook.out"; return 1; }
  fi
}
spawn_controller || true
check "the controller runs (host process, the chart's token) and leads" controller_leads
check "helm test runs crosstrace check and passes (CRDs, controller RBAC, Lease, agents)" helm_test_run pass
# `crosstrace check --ovsdb`, where an agent runs (here: beside node 0's Open vSwitch), with the test's own
# ServiceAccount: the socket answers; a node without Open vSwitch is a FAIL that says so.
ovsdb_checked() {
  local out missing="unix:$tmp/no-ovs/db.sock"
  "$root/e2e/sa-kubeconfig.sh" "$ns" crosstrace-check "$tmp/check.kubeconfig" || return 1
  out="$(KUBECONFIG="$tmp/check.kubeconfig" "$bin" check --namespace "$ns" --ovsdb "$CROSSTRACE_NODE_0_OVSDB" 2>&1)" ||
    { echo "$out"; return 1; }
  grep -q "^ok: OVSDB at $CROSSTRACE_NODE_0_OVSDB serves Open_vSwitch" <<<"$out" || { echo "$out"; return 1; }
  if out="$(KUBECONFIG="$tmp/check.kubeconfig" "$bin" check --namespace "$ns" --ovsdb "$missing" 2>&1)"; then
    echo "passed without Open vSwitch: $out"
    return 1
  fi
  grep -q "^FAIL: OVSDB at $missing is not reachable .*is Open vSwitch running here?" <<<"$out" || { echo "$out"; return 1; }
}
check "crosstrace check --ovsdb: ok beside Open vSwitch, FAIL (exit non-zero) without it" ovsdb_checked
stop_controller
# The Lease is released on a clean stop; a killed leader leaves it held, and stale after its 6 s.
lease_stale() {
  local i
  "$root/e2e/sa-kubeconfig.sh" "$ns" crosstrace-controller "$tmp/controller.kubeconfig" &&
    kubectl -n "$ns" patch lease crosstrace-controller --type=merge \
      -p "{\"spec\":{\"holderIdentity\":\"gone-1\",\"renewTime\":\"$(date -u -d '-60 sec' +%Y-%m-%dT%H:%M:%S.000000Z)\"}}" >/dev/null
}
check "a leader that stopped renewing (Lease 60 s old)" lease_stale
check "helm test fails with a FAIL line naming the stale Lease" helm_test_run fail
# A failed test pod stays for its log until the next `helm test`; removed here, as a user would.
kubectl -n "$ns" delete pod crosstrace-check --ignore-not-found >/dev/null 2>&1 || true

# ----------------------------------------------------------------------------------------------------------
# An uninstall that cannot revert (the controller is down): the hook times out naming the policy, Helm stops
# and the release stays; with the controller back, the uninstall goes through.

stuck_policy() {
  local i
  # `check` runs this in a subshell: the controller it starts must be stopped here on every path.
  start_controller || { stop_controller; return 1; }
  workloads_policy "$stuck" "helm-test: none" || { stop_controller; return 1; }
  for ((i = 0; i < 150; i++)); do
    kubectl get tracingpolicy "$stuck" -o jsonpath='{.metadata.finalizers}' | grep -q crosstrace.dev/cleanup && break
    sleep 0.2
  done
  stop_controller
  kubectl get tracingpolicy "$stuck" -o jsonpath='{.metadata.finalizers}' | grep -q crosstrace.dev/cleanup ||
    { echo "the controller did not take the policy on"; return 1; }
  helm upgrade "$release" "$chart" -n "$ns" --reuse-values --set hooks.uninstall.timeoutSeconds=10 --wait=false >/dev/null
}
check "a policy held by its finalizer, the controller stopped, the hook's timeout 10 s" stuck_policy
uninstall_blocked() {
  local hook_pid hook_code=0
  "$root/e2e/run-hook-pod.sh" "$ns" uninstall 60 >"$tmp/uninstall-hook.out" 2>&1 &
  hook_pid=$!
  if helm uninstall "$release" -n "$ns" --timeout=60s >"$tmp/uninstall.out" 2>&1; then
    echo "helm uninstall succeeded with a policy nobody can revert"
    return 1
  fi
  wait "$hook_pid" || hook_code=$?
  ((hook_code != 0)) || { echo "the hook succeeded"; cat "$tmp/uninstall-hook.out"; return 1; }
  grep -q "timed out after 10s: TracingPolicies still present (finalizer crosstrace.dev/cleanup): $stuck\." \
    "$tmp/uninstall-hook.out" || { echo "no one-line error naming $stuck:"; cat "$tmp/uninstall-hook.out"; return 1; }
  # Helm records the release as "uninstalling" before the hook runs, and deletes nothing when it fails.
  [ "$(helm status "$release" -n "$ns" -o json | jq -r .info.status)" = uninstalling ] ||
    { echo "the release is gone or not uninstalling:"; helm status "$release" -n "$ns" | head -5; return 1; }
  kubectl -n "$ns" get deployment crosstrace-controller >/dev/null &&
    kubectl get clusterrole crosstrace-controller >/dev/null || { echo "the release's objects are gone"; return 1; }
}
check "helm uninstall fails, the hook names the policy left, the release and its objects stay" uninstall_blocked
spawn_controller || true
check "the controller runs again" controller_leads

# ----------------------------------------------------------------------------------------------------------
# Uninstall: everything goes but the CRDs. The hook deletes the policy left above and the controller, running
# again, lets it go.

uninstall() {
  local hook_pid
  "$root/e2e/run-hook-pod.sh" "$ns" uninstall 120 >"$tmp/uninstall-hook.out" 2>&1 &
  hook_pid=$!
  helm uninstall "$release" -n "$ns" --wait --timeout=120s >/dev/null || return 1
  wait "$hook_pid" || { cat "$tmp/uninstall-hook.out"; return 1; }
}
check "helm uninstall succeeds once the controller runs again (the hook's second attempt)" uninstall
helm status "$release" -n "$ns" >/dev/null 2>&1 || installed=0
stop_controller
check "no TracingPolicy left after that uninstall" no_policy_left

all_gone() {
  local left=() kind_name
  for kind_name in deployment/crosstrace-controller daemonset/crosstrace-agent serviceaccount/crosstrace-controller \
    serviceaccount/crosstrace-agent service/crosstrace-metrics role/crosstrace-controller-leader-election \
    rolebinding/crosstrace-controller-leader-election poddisruptionbudget/crosstrace-controller \
    job/crosstrace-uninstall serviceaccount/crosstrace-uninstall pod/crosstrace-check serviceaccount/crosstrace-check \
    role/crosstrace-check rolebinding/crosstrace-check; do
    kubectl -n "$ns" get "$kind_name" >/dev/null 2>&1 && left+=("$kind_name")
  done
  kubectl -n "$ns" get configmap/crosstrace-admin-limits >/dev/null 2>&1 && left+=(configmap/crosstrace-admin-limits)
  for kind_name in clusterrole/crosstrace-controller clusterrole/crosstrace-agent \
    clusterrolebinding/crosstrace-controller clusterrolebinding/crosstrace-agent \
    clusterrole/crosstrace-uninstall clusterrolebinding/crosstrace-uninstall \
    clusterrole/crosstrace-check clusterrolebinding/crosstrace-check \
    validatingadmissionpolicy/crosstrace-agent-own-node validatingadmissionpolicybinding/crosstrace-agent-own-node \
    validatingadmissionpolicy/crosstrace-admin-limits validatingadmissionpolicybinding/crosstrace-admin-limits \
    validatingadmissionpolicy/crosstrace-controller-configmaps \
    validatingadmissionpolicybinding/crosstrace-controller-configmaps; do
    kubectl get "$kind_name" >/dev/null 2>&1 && left+=("$kind_name")
  done
  # The agent's namespace goes too (it may still be terminating: deleted is what counts).
  kubectl get namespace "$agent_ns" -o json 2>/dev/null | jq -e '.metadata.deletionTimestamp == null' >/dev/null &&
    left+=("namespace/$agent_ns")
  ((${#left[@]} == 0)) || { echo "left after uninstall: ${left[*]}"; return 1; }
}
check "helm uninstall removes the workloads, RBAC, hooks and admission policy" all_gone

crds_remain() {
  kubectl get crd tracingpolicies.crosstrace.dev nodetracings.crosstrace.dev >/dev/null
}
check "helm uninstall keeps the CRDs" crds_remain

summary
