#!/usr/bin/env bash
# The image and the chart the way a user gets them, on the local e2e cluster: an OCI registry on loopback
# (go-containerregistry's `registry`, a host process), `just image` pushing the image to it (built twice: the
# same digest), the chart packaged and pushed with `helm push`, and installed from oci:// with
# image.repository pointing at the pushed image. The pods must reference that image; its config must run as
# the non-root user 65532 with the OCI labels; the binary pulled back out of it must say the build's
# `--version`; and that pulled binary, run as the controller, must bring a TracingPolicy to Ready=True.
#
# kwok simulates the pods, so the chart's own controller pod never runs the image: the controller runs from
# the pulled binary as a host process instead, with the chart's controller ServiceAccount token (so the
# chart's RBAC holds it), its admin limits and its Lease, as the other e2e suites do.
#
# Run after `e2e/cluster.sh up` and `eval "$(e2e/cluster.sh env)"` (loaded here when KUBECONFIG is unset),
# with no crosstrace release installed. The first run builds the release binary (minutes; cached after).
# Prints `ok - <check>` / `not ok - <check>` and `N passed, M failed`; exits non-zero when any check fails.
# Stops what it started (by PID) and removes what it created, the CRDs apart.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
chart="$root/helm/crosstrace"
release=crosstrace
ns=crosstrace-system

# shellcheck source=e2e/tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

on_cluster "$root" "$release" "$ns"

ggcr="$("$root/e2e/build.sh" go-containerregistry)"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n1)"
app_version="$(sed -n 's/^appVersion: "\(.*\)"$/\1/p' "$chart/Chart.yaml")"
chart_version="$(sed -n 's/^version: \(.*\)$/\1/p' "$chart/Chart.yaml")"
tmp="$(mktemp -d)"
app_ns="registry-test-$$"
policy="registry-test-$$"
registry_pid=""
controller_pid=""
installed=0
ns_created=0

# stop_pid <pid>: SIGTERM, up to 10 s to exit, then SIGKILL; only a process this script started.
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  set +e
  # The policy first, while the controller runs, so that it reverts the Deployment and lets the policy go.
  if kubectl get tracingpolicy "$policy" >/dev/null 2>&1; then
    kubectl delete tracingpolicy "$policy" --wait=false >/dev/null 2>&1
    kubectl wait --for=delete "tracingpolicy/$policy" --timeout=60s >/dev/null 2>&1
  fi
  kubectl delete namespace "$app_ns" --ignore-not-found --wait=false >/dev/null 2>&1
  ((installed)) && helm uninstall "$release" -n "$ns" --wait --timeout=120s >/dev/null 2>&1
  [ -n "$controller_pid" ] && stop_pid "$controller_pid"
  [ -n "$registry_pid" ] && stop_pid "$registry_pid"
  ((ns_created)) && kubectl delete namespace "$ns" --ignore-not-found --wait=false >/dev/null 2>&1
  rm -rf "$tmp"
}
trap cleanup EXIT

# ----------------------------------------------------------------------------------------------------------
# Offline: the chart's image reference

versions_agree() {
  [ "$version" = "$app_version" ] ||
    { echo "Cargo.toml version $version, Chart.yaml appVersion $app_version"; return 1; }
}
check "the crate version is the chart's appVersion ($version)" versions_agree

kube_version=--kube-version=1.33.0 # helm template assumes 1.20 otherwise, below the chart's kubeVersion
rendered_image() { helm template "$release" "$chart" -n "$ns" "$kube_version" "$@" -s templates/controller-deployment.yaml |
  sed -n 's/^ *image: "\(.*\)"$/\1/p'; }
image_reference() {
  local d="sha256:$(printf '0%.0s' {1..64})" got
  got="$(rendered_image)"
  [ "$got" = "ghcr.io/crosstrace/crosstrace:$app_version" ] || { echo "default: $got"; return 1; }
  got="$(rendered_image --set image.digest="$d")"
  [ "$got" = "ghcr.io/crosstrace/crosstrace@$d" ] || { echo "digest: $got"; return 1; }
  got="$(rendered_image --set image.tag=1.2.3 --set image.digest="$d")"
  [ "$got" = "ghcr.io/crosstrace/crosstrace:1.2.3@$d" ] || { echo "tag and digest: $got"; return 1; }
  if helm template "$release" "$chart" "$kube_version" --set image.digest=sha256:abc >/dev/null 2>&1; then
    echo "values.schema.json accepted image.digest=sha256:abc"
    return 1
  fi
}
check "image reference: repository:appVersion by default, @digest when pinned, bad digest refused" image_reference

# ----------------------------------------------------------------------------------------------------------
# The registry, the image, the chart

"$ggcr/registry" -port 0 >"$tmp/registry.log" 2>&1 &
registry_pid=$!
port=""
for ((i = 0; i < 100; i++)); do
  port="$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$tmp/registry.log")"
  [ -n "$port" ] && break
  sleep 0.1
done
registry="127.0.0.1:${port:-0}"
registry_up() { curl -fsS "http://$registry/v2/" >/dev/null || { cat "$tmp/registry.log"; return 1; }; }
check "an OCI registry serves on loopback ($registry, PID $registry_pid)" registry_up

# `just image`, as a user runs it (e2e/just: the pinned just), pushing to the loopback registry.
image_pushed() {
  local start=$SECONDS
  "$root/e2e/just" image "push=$registry/crosstrace" >"$tmp/image.out" 2>"$tmp/image.err" ||
    { tail -n 30 "$tmp/image.err"; return 1; }
  cat "$tmp/image.out"
  echo "took $((SECONDS - start)) s"
  grep -qx "pushed: $registry/crosstrace@$(sed -n 's/^digest: //p' "$tmp/image.out")" "$tmp/image.out"
}
check "just image push=$registry/crosstrace builds and pushes the image" image_pushed
digest="$(sed -n 's/^digest: //p' "$tmp/image.out" 2>/dev/null || true)"
ref="$registry/crosstrace:$version"

built_again_same() {
  local again
  again="$("$root/e2e/image.sh" --out "$tmp/again" 2>"$tmp/again.err" | sed -n 's/^digest: //p')" ||
    { tail -n 30 "$tmp/again.err"; return 1; }
  [ -n "$digest" ] && [ "$again" = "$digest" ] || { echo "first $digest, second $again"; return 1; }
  cmp "${CARGO_TARGET_DIR:-$HOME/.cache/crosstrace/target}/image/oci.tar" "$tmp/again.tar"
}
check "a second build gives the same digest and the same layout archive" built_again_same

tag_resolves() {
  local got
  got="$("$ggcr/crane" digest "$ref")"
  [ "$got" = "$digest" ] || { echo "$ref is $got, the build printed $digest"; return 1; }
}
check "$ref is the built digest" tag_resolves

"$ggcr/crane" config "$ref" >"$tmp/config.json" 2>&1 || true
config_is() { # <jq filter> <want>
  local got
  got="$(jq -r "$1" "$tmp/config.json" 2>&1)"
  [ "$got" = "$2" ] || { echo "$1: $got, want $2"; return 1; }
}
revision="$(jq -r '.config.Labels["org.opencontainers.image.revision"]' "$tmp/config.json" 2>/dev/null || true)"
# What e2e/image.sh takes as the revision: CROSSTRACE_REVISION, else HEAD, marked -dirty when it differs.
head_revision="${CROSSTRACE_REVISION:-}"
if [ -z "$head_revision" ]; then
  head_revision="$(git -C "$root" rev-parse --short=12 HEAD)"
  git -C "$root" diff --quiet HEAD -- || head_revision+="-dirty"
fi
created="$(date -u -d "@$(git -C "$root" log -1 --format=%ct HEAD)" +%Y-%m-%dT%H:%M:%SZ)"
check "image runs as the non-root user 65532:65532" config_is .config.User 65532:65532
check "image entrypoint is /crosstrace" config_is '.config.Entrypoint | join(" ")' /crosstrace
check "image is linux/amd64" config_is '.os + "/" + .architecture' linux/amd64
check "label org.opencontainers.image.version is $version" \
  config_is '.config.Labels["org.opencontainers.image.version"]' "$version"
check "label org.opencontainers.image.revision is HEAD ($head_revision)" \
  config_is '.config.Labels["org.opencontainers.image.revision"]' "$head_revision"
check "label org.opencontainers.image.licenses is Apache-2.0" \
  config_is '.config.Labels["org.opencontainers.image.licenses"]' Apache-2.0
check "label org.opencontainers.image.source is set" \
  config_is '.config.Labels["org.opencontainers.image.source"] | startswith("https://")' true
check "label org.opencontainers.image.created is the commit time ($created)" \
  config_is '.config.Labels["org.opencontainers.image.created"]' "$created"

chart_pushed() {
  helm package "$chart" -d "$tmp" >/dev/null &&
    helm push "$tmp/crosstrace-$chart_version.tgz" "oci://$registry/charts" --plain-http
}
check "helm push of the packaged chart to oci://$registry/charts" chart_pushed

# ----------------------------------------------------------------------------------------------------------
# Installed from oci://

for terminating in "$ns" crosstrace-agent; do
  if [ "$(kubectl get namespace "$terminating" -o jsonpath='{.status.phase}' 2>/dev/null)" = Terminating ]; then
    kubectl wait --for=delete "namespace/$terminating" --timeout=180s >/dev/null 2>&1 || true
  fi
done
if ! kubectl get namespace "$ns" >/dev/null 2>&1; then
  kubectl create namespace "$ns" >/dev/null && ns_created=1
fi
kubectl label namespace "$ns" --overwrite pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/enforce-version=latest >/dev/null

install_from_oci() {
  helm install "$release" "oci://$registry/charts/crosstrace" --version "$chart_version" --plain-http \
    -n "$ns" --set image.repository="$registry/crosstrace" --wait=false >/dev/null &&
    kubectl -n "$ns" rollout status deployment/crosstrace-controller --timeout=120s >/dev/null || return 1
  # The agent, when the chart's values enable it.
  if kubectl -n crosstrace-agent get daemonset crosstrace-agent >/dev/null 2>&1; then
    kubectl -n crosstrace-agent rollout status daemonset/crosstrace-agent --timeout=120s >/dev/null
  fi
}
check "helm install from oci://$registry/charts/crosstrace --version $chart_version" install_from_oci
helm status "$release" -n "$ns" >/dev/null 2>&1 && installed=1

pods_use_image() {
  local images
  images="$(kubectl get pods -A -l app.kubernetes.io/name=crosstrace \
    -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name} {.spec.containers[*].image}{"\n"}{end}')"
  echo "$images"
  grep -q "^$ns/crosstrace-controller-" <<<"$images" && ! awk -v ref="$ref" '$2 != ref' <<<"$images" | grep -q .
}
check "the chart's pods (controller, and agents when enabled) run $ref" pods_use_image

# ----------------------------------------------------------------------------------------------------------
# The binary, pulled back out of the pushed image

mkdir -p "$tmp/pulled"
binary_pulled() {
  "$ggcr/crane" export "$ref" - | tar -x -C "$tmp/pulled" crosstrace &&
    [ -x "$tmp/pulled/crosstrace" ] && file -b "$tmp/pulled/crosstrace" | grep -Eq 'static(-pie)? linked'
}
check "crane export: /crosstrace in the image is a static executable" binary_pulled

image_files() {
  local got want="crosstrace etc etc/group etc/nsswitch.conf etc/passwd home home/nonroot tmp"
  got="$("$ggcr/crane" export "$ref" - | tar -t | sed 's#/$##' | sort | tr '\n' ' ')"
  [ "$got" = "$want " ] || { echo "files: $got; want: $want"; return 1; }
}
check "the image holds /crosstrace, /etc/{group,nsswitch.conf,passwd}, /home/nonroot and /tmp, nothing else" image_files

version_matches() {
  local got built
  built="$("${CARGO_TARGET_DIR:-$HOME/.cache/crosstrace/target}/x86_64-unknown-linux-gnu/release/crosstrace" --version)"
  got="$("$tmp/pulled/crosstrace" --version)"
  [ "$got" = "$built" ] && [ "$got" = "crosstrace $version (rev $revision)" ] ||
    { echo "pulled: $got; built: $built; label revision: $revision"; return 1; }
}
check "the pulled binary's --version is the build's and names the label's revision" version_matches

# ----------------------------------------------------------------------------------------------------------
# The pulled binary as the controller: a policy becomes Ready

# The chart's controller ServiceAccount token and admin limits (the ConfigMap the pod would mount).
controller_inputs() {
  local key
  "$root/e2e/sa-kubeconfig.sh" "$ns" crosstrace-controller "$tmp/controller.kubeconfig" &&
    kubectl -n "$ns" get configmap crosstrace-admin-limits -o json >"$tmp/limits.json" &&
    mkdir -p "$tmp/admin-limits" || return 1
  for key in $(jq -r '.data | keys[]' "$tmp/limits.json"); do
    jq -r --arg k "$key" '.data[$k]' "$tmp/limits.json" >"$tmp/admin-limits/$key" || return 1
  done
}
check "the chart's controller token and admin limits, for the host process" controller_inputs
admin_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
KUBECONFIG="$tmp/controller.kubeconfig" RUST_LOG=info "$tmp/pulled/crosstrace" controller \
  --admin-addr "127.0.0.1:$admin_port" --namespace "$ns" --lease-duration 6 --admin-limits "$tmp/admin-limits" \
  >"$tmp/controller.log" 2>&1 &
controller_pid=$!

controller_ready() {
  local i
  for ((i = 0; i < 100; i++)); do
    curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$controller_pid" 2>/dev/null || break
    sleep 0.2
  done
  tail -n 20 "$tmp/controller.log"
  return 1
}
check "the pulled binary runs as the controller (PID $controller_pid, /readyz on $admin_port)" controller_ready

workload_created() {
  kubectl create namespace "$app_ns" >/dev/null &&
    kubectl label namespace "$app_ns" "crosstrace-registry-test=$$" >/dev/null &&
    kubectl apply -f - >/dev/null <<EOF &&
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: $app_ns, labels: {app.kubernetes.io/part-of: registry-test}}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, app.kubernetes.io/part-of: registry-test}}
    spec: {containers: [{name: app, image: "shop/app:1"}]}
EOF
    kubectl -n "$app_ns" rollout status deployment/web --timeout=60s >/dev/null
}
check "a Deployment to instrument, rolled out in $app_ns" workload_created

policy_ready() {
  workloads_policy "$policy" "crosstrace-registry-test: \"$$\"" "app.kubernetes.io/part-of: registry-test" \
    "  rollout: {progressDeadlineSeconds: 60}"
  kubectl wait --for=condition=Ready "tracingpolicy/$policy" --timeout=90s >/dev/null || {
    kubectl get tracingpolicy "$policy" \
      -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}'
    tail -n 20 "$tmp/controller.log"
    return 1
  }
  kubectl -n "$app_ns" get deployment web -o jsonpath='{.spec.template.spec.initContainers[*].name}' | grep -q .
}
check "TracingPolicy $policy is Ready=True with the Deployment instrumented, by the pulled controller" policy_ready

reverted() {
  kubectl delete tracingpolicy "$policy" --wait=false >/dev/null &&
    kubectl wait --for=delete "tracingpolicy/$policy" --timeout=60s >/dev/null &&
    [ -z "$(kubectl -n "$app_ns" get deployment web -o jsonpath='{.spec.template.spec.initContainers}')" ]
}
check "deleting the policy reverts the Deployment, and the policy goes" reverted

summary
