#!/usr/bin/env bash
# The Helm chart (helm/crosstrace) on the local e2e cluster: lint, server-side validation of the rendered
# manifests, install into a namespace enforcing Pod Security "restricted" (the agent in its own "privileged"
# namespace), Ready workloads (kwok simulates the pods), least-privilege RBAC checked both ways, the admission
# policies with the chart's real tokens (the agent's own node; the controller's ConfigMap reach; the admin
# limits), and an uninstall that keeps only the CRDs.
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

crds_match() {
  diff -r "$root/crds" "$chart/crds"
}
check "the chart's CRDs are the generated ones" crds_match

schema_rejects_bad_values() {
  local bad
  for bad in logFormat=xml controller.replicas=0 agent.securityContext.privileged=true unknown=1 \
    adminLimits.minSampling=8 adminLimits.maxHeaderBytes=4096 'adminLimits.collectorNetworks={anywhere}' \
    'adminLimits.sidecarImages={otel/opentelemetry-collector-k8s:0.165.0}' "agent.namespace=$ns"; do
    if helm template "$release" "$chart" -n "$ns" --set "$bad" >/dev/null 2>&1; then
      echo "values.schema.json accepted $bad"
      return 1
    fi
  done
}
check "values.schema.json rejects bad values" schema_rejects_bad_values

# ----------------------------------------------------------------------------------------------------------
# On the cluster

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

installed=0
ns_created=0
tmp="$(mktemp -d)"
psa_ns="helm-test-psa-$$"
agent_check_ns="helm-test-agent-$$"
cm_ns="helm-test-cm-$$"
created_nts=()
cleanup() {
  set +e
  ((installed)) && helm uninstall "$release" -n "$ns" >/dev/null 2>&1
  ((${#created_nts[@]})) && kubectl delete nodetracing "${created_nts[@]}" --ignore-not-found >/dev/null 2>&1
  kubectl delete namespace "$psa_ns" "$agent_check_ns" "$cm_ns" --ignore-not-found --wait=false >/dev/null 2>&1
  ((ns_created)) && kubectl delete namespace "$ns" --ignore-not-found --wait=false >/dev/null 2>&1
  rm -rf "$tmp"
}
trap cleanup EXIT

crds_installed() {
  kubectl apply --server-side --force-conflicts -f "$root/crds/" >/dev/null &&
    kubectl wait --for=condition=Established --timeout=30s \
      crd/tracingpolicies.crosstrace.dev crd/nodetracings.crosstrace.dev >/dev/null
}
check "CRDs applied (server-side) and Established" crds_installed

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

# The agent's namespace is the chart's own (created at install): for the dry run, a stand-in that exists.
template_accepted() {
  kubectl create namespace "$agent_check_ns" >/dev/null &&
    helm template "$release" "$chart" -n "$ns" --set agent.namespace="$agent_check_ns" >"$tmp/rendered.yaml" &&
    kubectl apply --dry-run=server -f "$tmp/rendered.yaml"
}
check "helm template output accepted by the server (apply --dry-run=server)" template_accepted

template_with_options_accepted() {
  helm template "$release" "$chart" -n "$ns" --set agent.enabled=false,logFormat=json \
    --set otel.endpoint=http://otel-collector.observability:4317 | kubectl apply --dry-run=server -f - >/dev/null
}
check "helm template with agent off, json logs and OTLP accepted by the server" template_with_options_accepted

# The controller's pod, created for real (dry run) in a namespace that enforces Pod Security "restricted".
controller_pod_restricted() {
  local out
  local i
  kubectl create namespace "$psa_ns" >/dev/null
  kubectl label namespace "$psa_ns" pod-security.kubernetes.io/enforce=restricted \
    pod-security.kubernetes.io/warn=restricted >/dev/null
  # The pod runs as the namespace's default ServiceAccount, which kube-controller-manager creates shortly.
  for ((i = 0; i < 100; i++)); do
    kubectl -n "$psa_ns" get serviceaccount default >/dev/null 2>&1 && break
    sleep 0.2
  done
  helm template "$release" "$chart" -n "$ns" -s templates/controller-deployment.yaml |
    kubectl create --dry-run=client -o json -f - |
    jq --arg ns "$psa_ns" '{apiVersion: "v1", kind: "Pod", metadata: {name: "psa-check", namespace: $ns},
      spec: (.spec.template.spec | .serviceAccountName = "default")}' >"$tmp/pod.json"
  out="$(kubectl create --dry-run=server -f "$tmp/pod.json" 2>&1)" || { echo "$out"; return 1; }
  ! grep -i warning <<<"$out"
}
check "controller pod admitted under Pod Security restricted" controller_pod_restricted

install() {
  helm install "$release" "$chart" -n "$ns" --create-namespace --wait=false >"$tmp/install.out" 2>&1 ||
    { cat "$tmp/install.out"; return 1; }
  grep -q 'kubectl apply -f config/samples/edge.yaml' "$tmp/install.out" ||
    { echo "NOTES do not say what to apply next"; cat "$tmp/install.out"; return 1; }
}
check "helm install succeeds (and NOTES say what to apply next)" install
# (check runs its command in a subshell, so whether the release exists is asked here.)
helm status "$release" -n "$ns" >/dev/null 2>&1 && installed=1
((installed)) || { summary; exit 1; }

controller_ready() {
  kubectl -n "$ns" rollout status deployment/crosstrace-controller --timeout=120s &&
    kubectl -n "$ns" get deployment crosstrace-controller -o json |
    jq -e '.status.readyReplicas == .spec.replicas and .spec.replicas == 2' >/dev/null
}
check "controller Deployment Ready (2 replicas)" controller_ready

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
  got="$(kubectl auth can-i "$verb" "$resource" --as="$user" "$@" 2>/dev/null || true)"
  [ "$got" = "$want" ] || { echo "can-i $verb $resource as $user $*: $got, want $want"; return 1; }
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
# Uninstall: everything goes but the CRDs.

uninstall() {
  helm uninstall "$release" -n "$ns" --wait --timeout=120s >/dev/null
}
check "helm uninstall succeeds" uninstall
helm status "$release" -n "$ns" >/dev/null 2>&1 || installed=0

all_gone() {
  local left=() kind_name
  for kind_name in deployment/crosstrace-controller daemonset/crosstrace-agent serviceaccount/crosstrace-controller \
    serviceaccount/crosstrace-agent service/crosstrace-metrics role/crosstrace-controller-leader-election \
    rolebinding/crosstrace-controller-leader-election; do
    kubectl -n "$ns" get "$kind_name" >/dev/null 2>&1 && left+=("$kind_name")
  done
  kubectl -n "$ns" get configmap/crosstrace-admin-limits >/dev/null 2>&1 && left+=(configmap/crosstrace-admin-limits)
  for kind_name in clusterrole/crosstrace-controller clusterrole/crosstrace-agent \
    clusterrolebinding/crosstrace-controller clusterrolebinding/crosstrace-agent \
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
check "helm uninstall removes the workloads, RBAC and admission policy" all_gone

crds_remain() {
  kubectl get crd tracingpolicies.crosstrace.dev nodetracings.crosstrace.dev >/dev/null
}
check "helm uninstall keeps the CRDs" crds_remain

summary
