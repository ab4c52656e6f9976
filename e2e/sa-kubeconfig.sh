#!/usr/bin/env bash
# Writes a kubeconfig that authenticates as a ServiceAccount of the chart with a fresh token, so that
# host processes (the controller, the agents) run with exactly the permissions the chart grants.
#
#   e2e/sa-kubeconfig.sh NAMESPACE SERVICEACCOUNT OUT [extra `kubectl create token` args]
#   e.g. e2e/sa-kubeconfig.sh crosstrace-system crosstrace-agent agent-0.kubeconfig \
#          --bound-object-kind Pod --bound-object-name crosstrace-agent-x7k2p
#
# Needs `eval "$(e2e/cluster.sh env)"` first (kubectl on PATH, KUBECONFIG, CROSSTRACE_E2E_CA).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 NAMESPACE SERVICEACCOUNT OUT [kubectl create token args]" >&2; exit 2; }
namespace=$1 account=$2 out=$3
shift 3
: "${CROSSTRACE_E2E_CA:?run eval \"\$(e2e/cluster.sh env)\" first}"
token="$(kubectl create token "$account" -n "$namespace" --duration=8h "$@")"
server="$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
rm -f "$out"
kubectl config --kubeconfig="$out" set-cluster local --server="$server" --certificate-authority="$CROSSTRACE_E2E_CA" --embed-certs=true >/dev/null
kubectl config --kubeconfig="$out" set-credentials "$account" --token="$token" >/dev/null
kubectl config --kubeconfig="$out" set-context default --cluster=local --user="$account" >/dev/null
kubectl config --kubeconfig="$out" use-context default >/dev/null
chmod 600 "$out"
