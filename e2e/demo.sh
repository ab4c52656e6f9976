#!/usr/bin/env bash
# The demo a new user runs (`just demo`): the local real cluster, the chart installed, the controller
# and one agent per node running as host processes with the chart's ServiceAccount tokens, an
# ingress-nginx-shaped controller and a small shop, and config/samples/storefront.yaml applied.
#
#   e2e/demo.sh up      start everything, wait for READY, print the policy and a per-layer summary;
#                       on a terminal, Ctrl-C stops it all again
#   e2e/demo.sh down    stop everything `up` started (the policy is deleted first, so its changes are
#                       reverted while the controller still runs)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cluster="$here/cluster.sh"
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

demo_state() { echo "$CROSSTRACE_E2E_STATE/demo"; }

stop_processes() {
  local dir pid
  dir="$(demo_state)"
  [ -d "$dir/pids" ] || return 0
  for f in "$dir"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

down() {
  if ! "$cluster" status >/dev/null 2>&1; then
    say "the local cluster is not running; nothing to stop"
    return 0
  fi
  eval "$("$cluster" env)"
  local dir
  dir="$(demo_state)"
  say "deleting the policy (the controller reverts every layer)"
  kubectl delete tracingpolicy storefront --ignore-not-found --timeout=120s >/dev/null || true
  stop_processes
  say "removing the sample objects and the chart"
  kubectl delete -f "$here/demo/objects.yaml" --ignore-not-found --wait=false >/dev/null || true
  "$here/install-chart.sh" --remove || say "helm uninstall failed; see $CROSSTRACE_E2E_STATE/uninstall-hook.log"
  if [ -f "$dir/started-cluster" ]; then
    say "stopping the local cluster the demo started"
    "$cluster" down
  else
    rm -rf "$dir"
  fi
}

start() {
  local dir bin nodes i node started=0
  if ! "$cluster" status >/dev/null 2>&1; then
    say "starting the local cluster (the first run builds it; see README)"
    "$cluster" up
    started=1
  fi
  eval "$("$cluster" env)"
  dir="$(demo_state)"
  mkdir -p "$dir/pids" "$dir/logs"
  ((started)) && touch "$dir/started-cluster"
  stop_processes

  say "building crosstrace"
  (cd "$root" && cargo build --locked --quiet)
  bin="${CARGO_TARGET_DIR:-$root/target}/debug/crosstrace"

  say "installing the chart (CRDs, RBAC, admission policy, controller Deployment, agent DaemonSet)"
  "$here/install-chart.sh" >/dev/null

  say "running the controller and one agent per node as host processes, with the chart's tokens"
  KUBECONFIG="$CROSSTRACE_E2E_STATE/controller.kubeconfig" \
    "$bin" controller --admin-addr 127.0.0.1:18080 --namespace crosstrace-system --lease-duration 6 \
    >"$dir/logs/controller.log" 2>&1 &
  echo $! >"$dir/pids/controller.pid"
  nodes="${CROSSTRACE_E2E_NODES:-3}"
  for ((i = 0; i < nodes; i++)); do
    node="CROSSTRACE_NODE_$i" ovsdb="CROSSTRACE_NODE_${i}_OVSDB" unixctl="CROSSTRACE_NODE_${i}_UNIXCTL"
    KUBECONFIG="$CROSSTRACE_E2E_STATE/agent-${!node}.kubeconfig" \
      "$bin" agent --node-name "${!node}" --ovsdb "${!ovsdb}" --unixctl "${!unixctl}" --admin-addr "127.0.0.1:$((18100 + i))" \
      >"$dir/logs/agent-${!node}.log" 2>&1 &
    echo $! >"$dir/pids/agent-$i.pid"
  done

  say "creating an ingress-nginx controller and a small shop"
  kubectl apply -f "$here/demo/objects.yaml" >/dev/null
  kubectl -n ingress-nginx rollout status deployment/ingress-nginx-controller --timeout=120s >/dev/null
  for d in frontend cart payments; do kubectl -n shop rollout status "deployment/$d" --timeout=120s >/dev/null; done

  say "applying config/samples/storefront.yaml"
  kubectl apply -f "$root/config/samples/storefront.yaml"
  if ! kubectl wait --for=condition=Ready tracingpolicy/storefront --timeout=240s >/dev/null; then
    kubectl get tracingpolicies -o wide
    kubectl describe tracingpolicy storefront | sed -n '/Conditions:/,$p'
    echo "the policy did not become Ready; logs are in $dir/logs" >&2
    return 1
  fi

  echo
  kubectl get tracingpolicies
  echo
  say "edge: ingress-nginx ConfigMap"
  kubectl -n ingress-nginx get configmap ingress-nginx-controller -o go-template='{{range $k, $v := .data}}  {{$k}}: {{$v}}{{"\n"}}{{end}}' | grep -E 'otel|opentelemetry|otlp'
  say "workloads: collector sidecars and OTEL env"
  kubectl -n shop get deployments -o go-template='{{range .items}}  {{.metadata.name}}: sidecar={{range .spec.template.spec.initContainers}}{{.name}}{{end}} env={{range (index .spec.template.spec.containers 0).env}}{{.name}}={{.value}} {{end}}{{"\n"}}{{end}}'
  say "network: Open vSwitch sFlow per node"
  kubectl get nodetracings -o go-template='{{range .items}}  {{.metadata.name}}: {{range .status.bridges}}{{.bridge}} applied={{.applied}} verified={{.verified}}{{end}} (OVS {{.status.ovsVersion}}){{"\n"}}{{end}}'
  for ((i = 0; i < nodes; i++)); do
    ovsdb="CROSSTRACE_NODE_${i}_OVSDB" node="CROSSTRACE_NODE_$i"
    printf '  %s br-int sflow: %s\n' "${!node}" "$(ovs-vsctl --db="${!ovsdb}" --columns=targets,sampling,agent list sflow | tr -s ' \n' ' ')"
  done
  echo
  echo "Logs: $dir/logs. Try: kubectl describe tracingpolicy storefront; kubectl delete tracingpolicy storefront"
}

case "${1:-up}" in
  up)
    start
    if [ -t 0 ] && [ -z "${CI:-}" ]; then
      trap 'echo; down; exit 0' INT TERM
      say "running; press Ctrl-C to stop everything (or run: just demo-down)"
      while sleep 3600; do :; done
    else
      say "running in the background; stop it with: just demo-down"
    fi
    ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
