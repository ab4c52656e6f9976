#!/usr/bin/env bash
# Installs the chart into the local cluster (release crosstrace in crosstrace-system, which enforces Pod
# Security "restricted" as the README's install steps say; the agent in the chart's own namespace
# crosstrace-agent) and writes kubeconfigs for its ServiceAccounts, so that host processes run with the
# chart's own RBAC:
#   $CROSSTRACE_E2E_STATE/controller.kubeconfig         the controller
#   $CROSSTRACE_E2E_STATE/agent-<node>.kubeconfig       each node's agent, its token bound to the
#                                                       chart's agent pod on that node
# The agent is turned on (agent.enabled=true; the chart's default is off): the network suites need it. The
# uninstall hook waits 60 s at most (not 240): a policy a suite left behind fails `--remove` soon, naming it.
# The CRDs come with the chart (templates); --take-ownership adopts CRDs applied before by
# `kubectl apply -f crds/` (the Rust suites do that), which Helm would otherwise refuse to take over.
#
#   e2e/install-chart.sh            install (or upgrade) and write the kubeconfigs
#   e2e/install-chart.sh --remove   helm uninstall, its pre-delete hook run by e2e/run-hook-pod.sh (no
#                                   policy should be left by then; one that is, is deleted and must be
#                                   reverted by a running controller, or the uninstall fails)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${CROSSTRACE_E2E_STATE:?run eval \"\$(e2e/cluster.sh env)\" first}"
release=crosstrace namespace=crosstrace-system agent_namespace=crosstrace-agent

if [ "${1:-}" = "--remove" ]; then
  helm status "$release" -n "$namespace" >/dev/null 2>&1 || exit 0
  "$here/run-hook-pod.sh" "$namespace" uninstall 120 >"$CROSSTRACE_E2E_STATE/uninstall-hook.log" 2>&1 &
  hook=$!
  code=0
  helm uninstall "$release" -n "$namespace" --wait --timeout=150s >/dev/null || code=$?
  wait "$hook" || { echo "the uninstall hook failed:" >&2; cat "$CROSSTRACE_E2E_STATE/uninstall-hook.log" >&2; }
  exit "$code"
fi

# A namespace still terminating (an uninstall or the helm test just deleted it) cannot take the release.
for ns in "$namespace" "$agent_namespace"; do
  if [ "$(kubectl get namespace "$ns" -o jsonpath='{.status.phase}' 2>/dev/null)" = Terminating ]; then
    kubectl wait --for=delete "namespace/$ns" --timeout=180s >/dev/null
  fi
done
kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "$namespace" --overwrite pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/enforce-version=latest >/dev/null
helm upgrade --install "$release" "$here/../helm/crosstrace" -n "$namespace" --take-ownership \
  --set agent.enabled=true --set hooks.uninstall.timeoutSeconds=60 --wait=false >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/tracingpolicies.crosstrace.dev \
  crd/nodetracings.crosstrace.dev >/dev/null
kubectl -n "$namespace" rollout status deployment/crosstrace-controller --timeout=120s >/dev/null
kubectl -n "$agent_namespace" rollout status daemonset/crosstrace-agent --timeout=120s >/dev/null

"$here/sa-kubeconfig.sh" "$namespace" crosstrace-controller "$CROSSTRACE_E2E_STATE/controller.kubeconfig"
# One agent token per node, bound to the chart's agent pod there: the API server puts the node name
# in it, which the chart's ValidatingAdmissionPolicy checks on every status write.
kubectl -n "$agent_namespace" get pods -l app.kubernetes.io/component=agent \
  -o jsonpath='{range .items[*]}{.spec.nodeName} {.metadata.name}{"\n"}{end}' |
  while read -r node pod; do
    [ -n "$node" ] || continue
    "$here/sa-kubeconfig.sh" "$agent_namespace" crosstrace-agent "$CROSSTRACE_E2E_STATE/agent-$node.kubeconfig" \
      --bound-object-kind Pod --bound-object-name "$pod"
  done
echo "chart installed; kubeconfigs in $CROSSTRACE_E2E_STATE (controller.kubeconfig, agent-<node>.kubeconfig)"
