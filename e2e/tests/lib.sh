# Shared by the shell test scripts (sourced, not run): TAP-like `ok - ...` / `not ok - ...` lines and a
# closing `N passed, M failed` line.
passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
not_ok() {
  echo "not ok - $1"
  failed=$((failed + 1))
  [ -z "${2:-}" ] || printf '  # %s\n' "${2//$'\n'/$'\n'  # }"
}
# check <name> <command...>: ok when the command succeeds, otherwise not ok with its output.
check() {
  local name=$1 out
  shift
  if out="$("$@" 2>&1)"; then ok "$name"; else not_ok "$name" "$out"; fi
}
# summary: the closing line; fails when any check failed.
summary() {
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

# on_cluster <root> <release> <namespace>: points kubectl and helm at the local cluster (unless KUBECONFIG is
# set), and ends the script when the release exists already (the demo's: it is left alone).
on_cluster() {
  local root=$1 release=$2 ns=$3 env_out
  if [ -z "${KUBECONFIG:-}" ]; then
    env_out="$("$root/e2e/cluster.sh" env 2>&1)" || {
      not_ok "cluster env (is the cluster up? run e2e/cluster.sh up)" "$env_out"
      summary
      exit 1
    }
    eval "$env_out"
  fi
  if helm status "$release" -n "$ns" >/dev/null 2>&1; then
    not_ok "no release $release in $ns before the test (is the demo running? leaving it alone)"
    summary
    exit 1
  fi
}
# workloads_policy <name> <namespace selector labels> [<selector labels>] [<more spec lines>]: applies a
# TracingPolicy with a workload layer.
workloads_policy() {
  local name=$1 namespaces=$2 selector=${3:-} more=${4:-}
  {
    printf 'apiVersion: crosstrace.dev/v1alpha1\nkind: TracingPolicy\nmetadata: {name: %s}\nspec:\n' "$name"
    printf '  collector: {endpoint: "otel-gateway.observability.svc:4317"}\n  sampling: {ratio: "0.5"}\n'
    printf '  workloads:\n    namespaceSelector: {matchLabels: {%s}}\n' "$namespaces"
    [ -z "$selector" ] || printf '    selector: {matchLabels: {%s}}\n' "$selector"
    [ -z "$more" ] || printf '%s\n' "$more"
  } | kubectl apply -f - >/dev/null
}
