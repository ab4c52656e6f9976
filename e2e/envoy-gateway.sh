#!/usr/bin/env bash
# Envoy Gateway's real controller (envoy-gateway server, built and cached by e2e/build.sh) as a host process
# against the local cluster's kube-apiserver, for the gateway e2e test (e2e/tests/gateway.rs): it accepts
# the GatewayClasses of controllerName gateway.envoyproxy.io/gatewayclass-controller and writes the status of
# their Gateways, as in a real cluster. Its Envoy proxies are Deployments in NAMESPACE, whose pods kwok runs.
#
#   e2e/envoy-gateway.sh start DIR NAMESPACE   start it (state, logs and PIDs in DIR, created), watching only
#                                              NAMESPACE, which must exist; returns once it is ready
#   e2e/envoy-gateway.sh stop DIR              stop exactly what start started (by recorded PID), remove DIR
#   e2e/envoy-gateway.sh status DIR            exit 0 when the controller started in DIR still runs
#
# Needs the local cluster's environment (eval "$(e2e/cluster.sh env)": KUBECONFIG, CROSSTRACE_E2E_SERVER)
# and root (a user with password-less sudo, like a CI runner's, runs this script through sudo): the controller listens on fixed wildcard ports (xDS 0.0.0.0:18000, health probe :8081,
# metrics :19001, ...) and reads its xDS certificate from the fixed path /certs. So it runs in a network
# namespace and a mount namespace of its own (unshare): its ports exist only on that namespace's loopback
# (nothing is exposed on the host, nothing collides with the cluster or the tests), and /certs exists only
# in its view of the filesystem (a tmpfs root into which every top-level directory of the host is
# bind-mounted, plus certs/; nothing is created at the host's /). It reaches the kube-apiserver at the same
# loopback address as on the host through two relays (e2e/relay.py) joined by a unix socket in DIR.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=e2e/versions.env
source "$here/versions.env"

cache="${CROSSTRACE_CACHE:-$HOME/.cache/crosstrace}/e2e"
bin="$cache/envoy-gateway-$ENVOY_GATEWAY_VERSION/bin/envoy-gateway"
readonly CONTROLLER_NAME=gateway.envoyproxy.io/gatewayclass-controller
# Marks a directory as ours, so that stop never removes a directory given by mistake.
readonly MARKER=.crosstrace-envoy-gateway

log() { printf '[envoy-gateway] %s\n' "$*" >&2; }
die() { printf '[envoy-gateway] error: %s\n' "$*" >&2; exit 1; }

# A start that fails, wherever, stops again what it had started.
stop_on_error=0
on_exit() {
  local code=$?
  if ((code != 0 && stop_on_error)); then stop_on_error=0 && cmd_stop; fi
}
trap on_exit EXIT

# shellcheck source=e2e/processes.sh
source "$here/processes.sh"

# A live PID whose command line names DIR: one of ours, not a reused PID.
ours() {
  alive "$1" && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF "$dir"
}

stop_pid() {
  local name=$1 pid
  pid="$(cat "$dir/pids/$name.pid" 2>/dev/null || true)"
  ours "$pid" || return 0
  terminate "$name" "$pid"
}

# Root, or this script again through password-less sudo with the environment it needs (sudo resets it).
as_root() {
  [ "$(id -u)" = 0 ] && return 0
  command -v sudo >/dev/null && sudo -n true 2>/dev/null ||
    die "needs root (unshare of a network and a mount namespace) or password-less sudo"
  exec sudo -n env PATH="$PATH" HOME="$HOME" KUBECONFIG="${KUBECONFIG:-}" \
    CROSSTRACE_E2E_SERVER="${CROSSTRACE_E2E_SERVER:-}" CROSSTRACE_CACHE="${CROSSTRACE_CACHE:-$HOME/.cache/crosstrace}" \
    "$0" "$@"
}

cmd_stop() {
  [ -d "$dir" ] || return 0
  [ -e "$dir/$MARKER" ] || die "$dir is not a directory of e2e/envoy-gateway.sh; refusing to remove it"
  local name
  for name in envoy-gateway relay-inside relay-host; do stop_pid "$name"; done
  rm -rf "$dir"
}

# The xDS server's certificate (the controller does not start without one); nothing connects to it here.
make_certs() {
  local c="$dir/certs"
  mkdir -p "$c"
  openssl req -x509 -new -nodes -newkey rsa:2048 -keyout "$c/ca.key" -out "$c/ca.crt" -days 1 \
    -subj "/CN=envoy-gateway-e2e-ca" 2>/dev/null
  openssl req -new -nodes -newkey rsa:2048 -keyout "$c/tls.key" -subj "/CN=envoy-gateway" -out "$c/tls.csr" 2>/dev/null
  printf 'subjectAltName=DNS:envoy-gateway\nextendedKeyUsage=serverAuth,clientAuth\n' >"$c/tls.ext"
  openssl x509 -req -in "$c/tls.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" -set_serial "0x$(openssl rand -hex 8)" \
    -days 1 -extfile "$c/tls.ext" -out "$c/tls.crt" 2>/dev/null
  rm -f "$c/ca.key" "$c/tls.csr" "$c/tls.ext"
}

# Leader election off (one replica); the topology injector (a webhook nothing registers here) off.
write_config() {
  cat >"$dir/config.yaml" <<EOF
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: EnvoyGateway
gateway:
  controllerName: $CONTROLLER_NAME
provider:
  type: Kubernetes
  kubernetes:
    watch:
      type: Namespaces
      namespaces: [$namespace]
    leaderElection:
      disable: true
    topologyInjector:
      disable: true
logging:
  level:
    default: info
EOF
}

ready() { nsenter --target "$1" --net curl -fsS --max-time 2 http://127.0.0.1:8081/readyz >/dev/null 2>&1; }

cmd_start() {
  local tool
  for tool in unshare nsenter ip ss chroot setsid python3 openssl curl kubectl; do
    command -v "$tool" >/dev/null || die "$tool is needed but not installed"
  done
  [ -x "$bin" ] || die "envoy-gateway $ENVOY_GATEWAY_VERSION is not built at $bin: run e2e/build.sh (or e2e/build.sh envoy-gateway)"
  : "${KUBECONFIG:?run eval \"\$(e2e/cluster.sh env)\" first}" "${CROSSTRACE_E2E_SERVER:?run eval \"\$(e2e/cluster.sh env)\" first}"
  local port="${CROSSTRACE_E2E_SERVER##*:}"
  [[ "$port" =~ ^[0-9]+$ ]] || die "no port in CROSSTRACE_E2E_SERVER=$CROSSTRACE_E2E_SERVER"
  [ ! -e "$dir" ] || cmd_stop
  mkdir -p "$dir/pids" "$dir/root"
  touch "$dir/$MARKER"
  stop_on_error=1
  make_certs
  write_config
  # The Secret a real installation's certgen job makes; without it the controller logs an error at start
  # (its Wasm cache, which nothing here uses, wants it).
  kubectl -n "$namespace" create secret generic envoy-oidc-hmac --from-literal=hmac-secret="$(openssl rand -base64 32)" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null || die "could not create the Secret envoy-oidc-hmac in $namespace"

  setsid python3 "$here/relay.py" --listen-unix "$dir/apiserver.sock" --connect-tcp "127.0.0.1:$port" \
    </dev/null >>"$dir/relay-host.log" 2>&1 &
  echo $! >"$dir/pids/relay-host.pid"
  local i
  for ((i = 0; i < 50; i++)); do [ -S "$dir/apiserver.sock" ] && break; sleep 0.1; done
  [ -S "$dir/apiserver.sock" ] || die "the host relay did not listen (see $dir/relay-host.log)"

  setsid unshare --net --mount -- "$0" inside "$dir" "$port" "$namespace" </dev/null >>"$dir/envoy-gateway.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$dir/pids/envoy-gateway.pid"
  for ((i = 0; i < 300; i++)); do # up to 60 s
    if ready "$pid"; then
      stop_on_error=0
      # Through sudo: DIR goes to the user, so that e2e/cluster.sh down can remove it after a crash.
      [ -z "${SUDO_UID:-}" ] || chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$dir"
      log "ready (PID $pid, log $dir/envoy-gateway.log)"
      return 0
    fi
    alive "$pid" || break
    sleep 0.2
  done
  log "last lines of $dir/envoy-gateway.log:"
  tail -n 30 "$dir/envoy-gateway.log" >&2
  die "envoy-gateway did not become ready (stopped again)"
}

# Runs in the new namespaces (unshare execs this script): loopback up, the relay to the apiserver, then the
# controller in a root of its own, under the same PID.
cmd_inside() {
  local port=$1
  ip link set lo up
  python3 "$here/relay.py" --listen-tcp "127.0.0.1:$port" --connect-unix "$dir/apiserver.sock" </dev/null \
    >>"$dir/relay-inside.log" 2>&1 &
  echo $! >"$dir/pids/relay-inside.pid"
  local i
  for ((i = 0; i < 100; i++)); do
    ss -ltnH "sport = :$port" | grep -q . && break
    sleep 0.05
  done
  local root="$dir/root" entry name
  mount -t tmpfs -o mode=0755 crosstrace-envoy-gateway "$root"
  for entry in /*; do
    name="${entry#/}"
    if [ -L "$entry" ]; then
      cp -P "$entry" "$root/$name"
    elif [ -d "$entry" ]; then
      mkdir "$root/$name"
      mount --rbind "$entry" "$root/$name"
    fi
  done
  mkdir "$root/certs"
  cp "$dir/certs/"* "$root/certs/"
  exec chroot "$root" env ENVOY_GATEWAY_NAMESPACE="$namespace" KUBECONFIG="$KUBECONFIG" \
    "$bin" server --config-path "$dir/config.yaml"
}

case "${1:-}" in
start)
  [ $# = 3 ] || die "usage: $0 start DIR NAMESPACE"
  as_root "$@"
  dir="$(realpath -m "$2")" namespace=$3
  cmd_start
  ;;
stop)
  [ $# = 2 ] || die "usage: $0 stop DIR"
  as_root "$@"
  dir="$(realpath -m "$2")"
  cmd_stop
  ;;
status)
  [ $# = 2 ] || die "usage: $0 status DIR"
  dir="$(realpath -m "$2")"
  ours "$(cat "$dir/pids/envoy-gateway.pid" 2>/dev/null || true)"
  ;;
inside)
  dir=$2 namespace=$4
  cmd_inside "$3"
  ;;
*)
  echo "usage: $0 start DIR NAMESPACE | stop DIR | status DIR" >&2
  exit 2
  ;;
esac
