#!/usr/bin/env bash
# Proves the local e2e cluster (e2e/cluster.sh) does what the other e2e tests rely on. Assumes
# `e2e/cluster.sh up` has run. Prints `ok - <check>` / `not ok - <check>` and a final `N passed, M failed`;
# exits non-zero when any check fails.
#
#   CROSSTRACE_E2E_RESTART_CHECK=1   also measure a real warm restart (down + up) and require it under 60 s;
#                                    otherwise the time the last `up` recorded is checked.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="$here/cluster.sh"
env_out="$("$cluster" env)" || { echo "not ok - cluster env (is the cluster up? run e2e/cluster.sh up)"; echo "0 passed, 1 failed"; exit 1; }
eval "$env_out"

# shellcheck source=e2e/tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ns="cluster-test-$$"
cleanup() { kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true; }
trap cleanup EXIT

# Every check waits on its own; a timeout is a failure with the state printed.
deployment_available() {
  kubectl -n "$ns" wait --for=condition=Available "deployment/$1" --timeout="${2:-60s}"
}

deployment() {
  local name=$1 image=$2 replicas=$3
  cat <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: $name, namespace: $ns}
spec:
  replicas: $replicas
  progressDeadlineSeconds: 600
  selector: {matchLabels: {app: $name}}
  template:
    metadata: {labels: {app: $name}}
    spec:
      containers:
      - {name: main, image: "$image"}
EOF
}

# ----------------------------------------------------------------------------------------------------------

server_version() {
  local v
  v="$(kubectl version -o json | jq -r .serverVersion.gitVersion)"
  echo "server $v"
  [[ "$v" == v1.33.* ]]
}
check "kubectl version reports server v1.33.x" server_version

nodes_ready() {
  local ready
  ready="$(kubectl get nodes -l type=kwok -o json |
    jq '[.items[] | select(.status.conditions[] | select(.type == "Ready" and .status == "True"))] | length')"
  echo "$ready of $CROSSTRACE_E2E_NODES kwok nodes Ready"
  [ "$ready" -eq "$CROSSTRACE_E2E_NODES" ]
}
check "all $CROSSTRACE_E2E_NODES kwok nodes Ready" nodes_ready

node_labels() {
  local i node
  for ((i = 0; i < CROSSTRACE_E2E_NODES; i++)); do
    node="CROSSTRACE_NODE_$i"
    node="${!node}"
    kubectl get node "$node" -o json | jq -e --arg n "$node" '
      .metadata.labels["kubernetes.io/hostname"] == $n and .metadata.labels["kubernetes.io/os"] == "linux"
      and ((.spec.taints // []) | length == 0)' >/dev/null || { echo "$node: labels or taints wrong"; return 1; }
  done
}
check "nodes labelled like real ones and untainted" node_labels

kubectl create namespace "$ns" >/dev/null || not_ok "create namespace $ns"

# The healthy and the broken Deployment start together: in the time the healthy one becomes Available,
# the broken one must not, and it must still be unavailable 10 s after creation.
created=$SECONDS
{ deployment web nginx:1.27 3; echo "---"; deployment broken x:broken 1; } | kubectl apply -f - >/dev/null ||
  not_ok "create the test Deployments"
check "3-replica Deployment becomes Available" deployment_available web 60s

broken_stays_unavailable() {
  local wait=$((10 - (SECONDS - created)))
  ((wait <= 0)) || sleep "$wait"
  local d
  d="$(kubectl -n "$ns" get deployment broken -o json)"
  jq -r '"available=\(.status.availableReplicas // 0) ready=\(.status.readyReplicas // 0)"' <<<"$d"
  jq -e '(.status.availableReplicas // 0) == 0 and (.status.readyReplicas // 0) == 0' <<<"$d" >/dev/null || return 1
  # The pod was handled by kwok (it has an IP) and shows why it is not ready.
  kubectl -n "$ns" get pods -l app=broken -o json | jq -e '
    .items | length == 1 and all(.status.podIP != null and
      (.status.conditions[] | select(.type == "Ready") | .status) == "False" and
      .status.containerStatuses[0].state.waiting.reason == "ImagePullBackOff")' >/dev/null
}
check "Deployment with image x:broken stays unavailable after 10 s" broken_stays_unavailable

daemonset_on_every_node() {
  kubectl apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: $ns}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers:
      - {name: agent, image: agent:1}
EOF
  local i ready=0
  for ((i = 0; i < 300; i++)); do
    ready="$(kubectl -n "$ns" get daemonset agent -o jsonpath='{.status.numberReady}')"
    [ "${ready:-0}" -eq "$CROSSTRACE_E2E_NODES" ] && break
    sleep 0.2
  done
  echo "DaemonSet pods Ready: ${ready:-0} of $CROSSTRACE_E2E_NODES"
  [ "${ready:-0}" -eq "$CROSSTRACE_E2E_NODES" ] || return 1
  # One per node, each on a different node.
  kubectl -n "$ns" get pods -l app=agent -o json |
    jq -e --argjson n "$CROSSTRACE_E2E_NODES" '[.items[].spec.nodeName] | unique | length == $n' >/dev/null
}
check "DaemonSet has one Ready pod per node" daemonset_on_every_node

pod() {
  local name=$1 init_image=$2
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: $ns}
spec:
  initContainers:
  - {name: sidecar, image: "$init_image", restartPolicy: Always}
  - {name: setup, image: setup:1}
  containers:
  - {name: main, image: main:1}
EOF
}

native_sidecar_ready() {
  pod sidecar sidecar:1 | kubectl apply -f - >/dev/null
  kubectl -n "$ns" wait --for=condition=Ready pod/sidecar --timeout=30s >/dev/null || return 1
  kubectl -n "$ns" get pod sidecar -o json | jq -e '
    (.status.initContainerStatuses[] | select(.name == "sidecar") | .started == true and .state.running != null)
    and (.status.initContainerStatuses[] | select(.name == "setup") | .state.terminated.reason == "Completed")' \
    >/dev/null
}
check "pod with a native sidecar becomes Ready, sidecar running" native_sidecar_ready

broken_init_container_never_ready() {
  pod broken-init sidecar:broken | kubectl apply -f - >/dev/null
  local i ip=""
  for ((i = 0; i < 100; i++)); do
    ip="$(kubectl -n "$ns" get pod broken-init -o jsonpath='{.status.podIP}')"
    [ -z "$ip" ] || break
    sleep 0.2
  done
  [ -n "$ip" ] || { echo "kwok never handled the pod"; return 1; }
  sleep 2
  kubectl -n "$ns" get pod broken-init -o json | jq -e '
    (.status.conditions[] | select(.type == "Ready") | .status) == "False" and .status.phase == "Pending"' >/dev/null
}
check "pod with a :broken init container never becomes Ready" broken_init_container_never_ready

pod_deletion() {
  kubectl -n "$ns" delete pod sidecar --timeout=30s >/dev/null &&
    ! kubectl -n "$ns" get pod sidecar >/dev/null 2>&1
}
check "deleting a pod removes it" pod_deletion

helm_version() {
  local v
  v="$(helm version --template '{{.Version}}')"
  echo "helm $v"
  [[ "$v" == v3.18.* ]]
}
check "helm version reports v3.18.x" helm_version

ovs_bridges() {
  local i db ctl
  for ((i = 0; i < CROSSTRACE_E2E_NODES; i++)); do
    db="CROSSTRACE_NODE_${i}_OVSDB"
    ctl="CROSSTRACE_NODE_${i}_UNIXCTL"
    ovs-vsctl --db="${!db}" --timeout=5 show | grep -q 'Bridge br-int' || { echo "node $i: no br-int"; return 1; }
    ovs-appctl -t "${!ctl}" version >/dev/null || { echo "node $i: ovs-vswitchd does not answer"; return 1; }
  done
}
check "each node's OVS shows br-int and ovs-vswitchd answers" ovs_bridges

# Warm start: binaries cached, everything else from scratch.
warm_start() {
  local s
  if [ "${CROSSTRACE_E2E_RESTART_CHECK:-0}" = 1 ]; then
    cleanup
    trap - EXIT
    "$cluster" down >/dev/null 2>&1 || { echo "down failed"; return 1; }
    "$cluster" up >/dev/null 2>&1 || { echo "up failed"; return 1; }
    s="$(cat "$CROSSTRACE_E2E_STATE/up-seconds")"
    echo "down + up: up took $s s"
  elif [ "$(cat "$CROSSTRACE_E2E_STATE/build-cached")" = 1 ]; then
    s="$(cat "$CROSSTRACE_E2E_STATE/up-seconds")"
    echo "last up (binaries cached) took $s s"
  else
    # The last up built the binaries; its startup alone is what a warm start costs.
    s="$(cat "$CROSSTRACE_E2E_STATE/startup-seconds")"
    echo "last up built the binaries; its startup took $s s"
  fi
  [ "$s" -lt 60 ]
}
check "warm up reaches all nodes Ready in under 60 s" warm_start

summary
