#!/usr/bin/env bash
# Builds (once) every binary the local cluster and its tests need, from the Go module proxy and the crate
# registry, and caches it by version outside the repository. Safe to run again: a cached binary is never rebuilt.
#
#   e2e/build.sh            build what is missing, print the bin directories
#   e2e/build.sh --print    only print the bin directories (exits 1 when something is missing)
#   e2e/build.sh otelcol    only the OpenTelemetry Collector (what `just unit` needs), print its bin directory
#   e2e/build.sh go-containerregistry | actionlint | helm | envoy-gateway   only that one (crane and
#                           registry, actionlint, helm, Envoy Gateway's controller: what `just image`, `just lint`,
#                           the release workflow and the gateway e2e test need), likewise
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=e2e/versions.env
source "$here/versions.env"

cache="${CROSSTRACE_CACHE:-$HOME/.cache/crosstrace}/e2e"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0 GOTOOLCHAIN=local
log() { printf '[build] %s\n' "$*" >&2; }
die() { printf '[build] error: %s\n' "$*" >&2; exit 1; }

etcd_dir="$cache/etcd-$ETCD_VERSION"
kube_dir="$cache/kubernetes-$KUBERNETES_VERSION"
kwok_dir="$cache/kwok-$KWOK_VERSION"
helm_dir="$cache/helm-$HELM_VERSION"
just_dir="$cache/just-$JUST_VERSION"
otelcol_dir="$cache/otelcol-$OTELCOL_VERSION"
ggcr_dir="$cache/go-containerregistry-$GO_CONTAINERREGISTRY_VERSION"
actionlint_dir="$cache/actionlint-$ACTIONLINT_VERSION"
envoy_gateway_dir="$cache/envoy-gateway-$ENVOY_GATEWAY_VERSION"
bin_dirs=("$kube_dir/bin" "$etcd_dir/bin" "$kwok_dir/bin" "$helm_dir/bin" "$just_dir/bin" "$otelcol_dir/bin"
  "$ggcr_dir/bin" "$actionlint_dir/bin" "$envoy_gateway_dir/bin")

have() { [ -x "$1/bin/$2" ]; }

need_go() {
  command -v go >/dev/null || die "go is not installed; this machine kind ships it (see README)"
}

build_etcd() {
  have "$etcd_dir" etcd && return
  need_go
  log "etcd $ETCD_VERSION (wrapper module: etcd's own module has replace directives)"
  local src="$etcd_dir/src"
  rm -rf "$src" && mkdir -p "$src"
  cat >"$src/main.go" <<'GO'
// Command etcd is etcd's own main, built through a wrapper module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$src" && go mod init crosstrace.local/etcd >/dev/null 2>&1 &&
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" &&
    go mod tidy &&
    go build -trimpath -o "$etcd_dir/bin/etcd" .) || die "building etcd $ETCD_VERSION failed"
}

build_kubernetes() {
  have "$kube_dir" kube-apiserver && have "$kube_dir" kube-controller-manager &&
    have "$kube_dir" kube-scheduler && have "$kube_dir" kubectl && return
  need_go
  log "kubernetes $KUBERNETES_VERSION: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl"
  local src="$kube_dir/src" staging="v0${KUBERNETES_VERSION#v1}"
  rm -rf "$src" && mkdir -p "$src"
  # k8s.io/kubernetes points its staging modules at ./staging; the wrapper points each at its published
  # version instead. The list comes from k8s.io/kubernetes's own go.mod, so it follows the version.
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$KUBERNETES_VERSION's go.mod"
  {
    echo "module crosstrace.local/kubernetes"
    echo
    echo "go $(sed -n 's/^go \(.*\)$/\1/p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$gomod" |
      awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } >"$src/go.mod"
  grep -q '^replace k8s.io/api ' "$src/go.mod" || die "no staging replaces found in k8s.io/kubernetes's go.mod"
  local pkgs=(cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubectl)
  local minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  local v=k8s.io/component-base/version cv=k8s.io/client-go/pkg/version
  local ldflags="-s -w"
  for pkg in "$v" "$cv"; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  # Each package is asked for at the pinned version: a bare `go get <package>` would upgrade
  # k8s.io/kubernetes to its newest release, whose staging modules do not match the replaces above.
  local targets=() p
  for p in "${pkgs[@]}"; do targets+=("k8s.io/kubernetes/$p@$KUBERNETES_VERSION"); done
  (cd "$src" &&
    go get "${targets[@]}" &&
    go build -trimpath -ldflags "$ldflags" -o "$kube_dir/bin/" "${pkgs[@]/#/k8s.io/kubernetes/}") ||
    die "building kubernetes $KUBERNETES_VERSION failed"
}

build_kwok() {
  have "$kwok_dir" kwok && return
  need_go
  log "kwok $KWOK_VERSION"
  GOBIN="$kwok_dir/bin" go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" || die "building kwok $KWOK_VERSION failed"
}

build_helm() {
  have "$helm_dir" helm && return
  need_go
  log "helm $HELM_VERSION"
  GOBIN="$helm_dir/bin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || die "building helm $HELM_VERSION failed"
}

# crane pushes the image and reads it back; registry is a local OCI registry (in memory) for the e2e test.
build_go_containerregistry() {
  have "$ggcr_dir" crane && have "$ggcr_dir" registry && return
  need_go
  log "go-containerregistry $GO_CONTAINERREGISTRY_VERSION: crane, registry"
  local m=github.com/google/go-containerregistry
  GOBIN="$ggcr_dir/bin" go install -trimpath \
    -ldflags "-s -w -X $m/cmd/crane/cmd.Version=$GO_CONTAINERREGISTRY_VERSION" \
    "$m/cmd/crane@$GO_CONTAINERREGISTRY_VERSION" "$m/cmd/registry@$GO_CONTAINERREGISTRY_VERSION" ||
    die "building go-containerregistry $GO_CONTAINERREGISTRY_VERSION failed"
}

build_actionlint() {
  have "$actionlint_dir" actionlint && return
  need_go
  log "actionlint $ACTIONLINT_VERSION"
  GOBIN="$actionlint_dir/bin" go install -trimpath \
    -ldflags "-s -w -X github.com/rhysd/actionlint.version=$ACTIONLINT_VERSION" \
    "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION" || die "building actionlint $ACTIONLINT_VERSION failed"
}

# Envoy Gateway's controller, for the gateway e2e test: the real controller writes the status of Envoy
# Gateway's Gateways (e2e/envoy-gateway.sh runs it against the local cluster). Its module has no replace
# directives, so it installs straight from the module proxy.
build_envoy_gateway() {
  have "$envoy_gateway_dir" envoy-gateway && return
  need_go
  log "envoy-gateway $ENVOY_GATEWAY_VERSION"
  local m=github.com/envoyproxy/gateway
  GOBIN="$envoy_gateway_dir/bin" go install -trimpath \
    -ldflags "-s -w -X $m/internal/cmd/version.envoyGatewayVersion=$ENVOY_GATEWAY_VERSION" \
    "$m/cmd/envoy-gateway@$ENVOY_GATEWAY_VERSION" || die "building envoy-gateway $ENVOY_GATEWAY_VERSION failed"
}

build_just() {
  have "$just_dir" just && return
  command -v cargo >/dev/null || die "cargo is not installed; install Rust with rustup first"
  log "just $JUST_VERSION"
  cargo install --quiet --locked --jobs 2 --root "$just_dir" --version "$JUST_VERSION" just ||
    die "installing just $JUST_VERSION failed"
}

# The OpenTelemetry Collector Builder's manifest for otelcol-k8s: a subset of the official otelcol-k8s
# distribution at the same release (its manifest in open-telemetry/opentelemetry-collector-releases,
# distributions/otelcol-k8s), with only the components crosstrace's sidecar configuration uses (otlp
# receiver, memory_limiter and resource processors, otlp_grpc, otlp_http and debug exporters, health_check
# extension) plus its file exporter, for tests that collect spans on the host. Why a subset: build time on
# 2 cores; the whole distribution has some 70 components (Kubernetes clients, Prometheus, ...), this one
# eight (a cold build took 4.5 minutes on a busy 2-core machine). Same component versions, so the same configuration schema: what this binary's `validate` accepts,
# the image of that release accepts.
otelcol_manifest() {
  local core=go.opentelemetry.io/collector contrib=github.com/open-telemetry/opentelemetry-collector-contrib
  cat <<YAML
dist:
  name: otelcol-k8s
  description: crosstrace's test build of otelcol-k8s (a subset of its components)
  version: ${OTELCOL_VERSION#v}
  output_path: $otelcol_dir/src
  build_tags: grpcnotrace
receivers:
  - gomod: $core/receiver/otlpreceiver $OTELCOL_VERSION
processors:
  - gomod: $core/processor/memorylimiterprocessor $OTELCOL_VERSION
  - gomod: $contrib/processor/resourceprocessor $OTELCOL_CONTRIB_VERSION
exporters:
  - gomod: $core/exporter/otlpexporter $OTELCOL_VERSION
  - gomod: $core/exporter/otlphttpexporter $OTELCOL_VERSION
  - gomod: $core/exporter/debugexporter $OTELCOL_VERSION
  - gomod: $contrib/exporter/fileexporter $OTELCOL_CONTRIB_VERSION
extensions:
  - gomod: $contrib/extension/healthcheckextension $OTELCOL_CONTRIB_VERSION
providers:
  - gomod: $core/confmap/provider/envprovider $OTELCOL_STABLE_VERSION
  - gomod: $core/confmap/provider/fileprovider $OTELCOL_STABLE_VERSION
  - gomod: $core/confmap/provider/yamlprovider $OTELCOL_STABLE_VERSION
YAML
}

build_otelcol() {
  # Cached by version; a changed manifest (a component added) rebuilds it too.
  have "$otelcol_dir" otelcol-k8s && [ "$(otelcol_manifest)" = "$(cat "$otelcol_dir/manifest.yaml" 2>/dev/null)" ] &&
    return
  need_go
  log "otelcol-k8s $OTELCOL_VERSION (contrib $OTELCOL_CONTRIB_VERSION) with the OpenTelemetry Collector Builder"
  rm -rf "$otelcol_dir" && mkdir -p "$otelcol_dir"
  GOBIN="$otelcol_dir/builder" go install -trimpath "go.opentelemetry.io/collector/cmd/builder@$OTELCOL_VERSION" ||
    die "installing the collector builder $OTELCOL_VERSION failed"
  otelcol_manifest >"$otelcol_dir/src.yaml"
  # Strict versioning: every core module resolves to the builder's own release, none is pulled ahead.
  # `-e` lets the builder's `go mod tidy` pass over what only the components' own tests import (the file
  # exporter's tests need a contrib encoding extension the module proxy does not serve at this release);
  # anything the binary imports still has to resolve, or `go build` fails.
  GOFLAGS="$GOFLAGS -e" "$otelcol_dir/builder/builder" --config="$otelcol_dir/src.yaml" --skip-strict-versioning=false \
    >"$otelcol_dir/build.log" 2>&1 ||
    die "building otelcol-k8s $OTELCOL_VERSION failed; see $otelcol_dir/build.log"
  mkdir "$otelcol_dir/bin" && mv "$otelcol_dir/src/otelcol-k8s" "$otelcol_dir/bin/otelcol-k8s"
  # Written last: it marks the build complete.
  mv "$otelcol_dir/src.yaml" "$otelcol_dir/manifest.yaml"
}

if [ "${1:-}" = "--print" ]; then
  for d in "${bin_dirs[@]}"; do [ -d "$d" ] || exit 1; echo "$d"; done
  exit 0
fi

steps=(build_just build_helm build_kwok build_go_containerregistry build_actionlint build_etcd build_kubernetes
  build_otelcol build_envoy_gateway)
case "${1:-}" in
"") ;;
otelcol) steps=(build_otelcol) bin_dirs=("$otelcol_dir/bin") ;;
go-containerregistry) steps=(build_go_containerregistry) bin_dirs=("$ggcr_dir/bin") ;;
actionlint) steps=(build_actionlint) bin_dirs=("$actionlint_dir/bin") ;;
helm) steps=(build_helm) bin_dirs=("$helm_dir/bin") ;;
envoy-gateway) steps=(build_envoy_gateway) bin_dirs=("$envoy_gateway_dir/bin") ;;
*) die "unknown argument $1 (see the top of $0)" ;;
esac

# One build at a time: a second caller (e.g. cluster.sh up while a background build runs) waits for the
# first and then finds everything cached.
mkdir -p "$cache"
exec 9>"$cache/.build.lock"
flock 9 || die "could not lock $cache/.build.lock"

start=$SECONDS
built=0
for step in "${steps[@]}"; do
  before=$SECONDS
  $step
  ((SECONDS - before > 1)) && built=1
done
((built)) && log "build finished in $((SECONDS - start)) s (cached under $cache)"
printf '%s\n' "${bin_dirs[@]}"
