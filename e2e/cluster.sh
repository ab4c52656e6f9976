#!/usr/bin/env bash
# A real Kubernetes control plane on this machine, for the e2e tests: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler as host processes on loopback, kwok playing the kubelet of
# N fake nodes (so Deployments and DaemonSets really roll out), and one Open vSwitch per node
# (ovsdb-server + ovs-vswitchd with the dummy datapath: no kernel module, no tun).
#
#   e2e/cluster.sh up       build what is missing (cached by version), start everything, wait until Ready
#   e2e/cluster.sh down     stop exactly what `up` started (by recorded PID), remove the state directory
#   e2e/cluster.sh status   what runs; exit 0 when all of it is up
#   e2e/cluster.sh env      shell exports for tests: eval "$(e2e/cluster.sh env)"
#
# Environment:
#   CROSSTRACE_E2E_STATE   state directory (certs, kubeconfigs, etcd data, logs, PIDs)
#                          default ~/.cache/crosstrace/e2e-state, outside the repository
#   CROSSTRACE_E2E_NODES   number of fake nodes (default 3), read by `up`
#   CROSSTRACE_E2E_PORT_OFFSET  added to every port below (default 0), so that a second cluster (with its
#                          own CROSSTRACE_E2E_STATE) can run beside the first; give both to every command
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=e2e/versions.env
source "$here/versions.env"

state="${CROSSTRACE_E2E_STATE:-$HOME/.cache/crosstrace/e2e-state}"
kwok_config="$here/kwok/kwok.yaml"

# Non-default ports, so a developer's own cluster (or a second tool) on the usual ports is left alone.
offset="${CROSSTRACE_E2E_PORT_OFFSET:-0}"
[[ "$offset" =~ ^[0-9]{1,4}$ ]] && [ "$offset" -le 9000 ] ||
  { printf '[cluster] error: CROSSTRACE_E2E_PORT_OFFSET must be a number from 0 to 9000\n' >&2; exit 2; }
readonly ETCD_CLIENT_PORT=$((12379 + offset)) ETCD_PEER_PORT=$((12380 + offset)) APISERVER_PORT=$((16443 + offset))
readonly KCM_PORT=$((20257 + offset)) SCHEDULER_PORT=$((20259 + offset)) KWOK_PORT=$((20247 + offset))
readonly PORTS=("$ETCD_CLIENT_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$KCM_PORT" "$SCHEDULER_PORT" "$KWOK_PORT")
readonly SERVER="https://127.0.0.1:$APISERVER_PORT"
readonly NODE_ANNOTATION="kwok.x-k8s.io/node"
readonly OVS_SCHEMA=/usr/share/openvswitch/vswitch.ovsschema
# Marks a directory as ours, so `down` never removes a directory that CROSSTRACE_E2E_STATE points at by mistake.
readonly MARKER=.crosstrace-e2e-state

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------------------
# Binaries

# Sets bin_dirs and the paths of the binaries from e2e/build.sh's cache; fails when they are not built.
load_bins() {
  local out
  out="$("$here/build.sh" --print)" || die "binaries are not built yet; run e2e/cluster.sh up (or e2e/build.sh)"
  mapfile -t bin_dirs <<<"$out"
  local d
  for d in "${bin_dirs[@]}"; do
    case "$d" in
    */kubernetes-*) kube_bin="$d" ;;
    */etcd-*) etcd_bin="$d" ;;
    */kwok-*) kwok_bin="$d" ;;
    esac
  done
  if [ -z "${kube_bin:-}" ] || [ -z "${etcd_bin:-}" ] || [ -z "${kwok_bin:-}" ]; then
    die "e2e/build.sh --print did not list the kubernetes, etcd and kwok bin directories"
  fi
}

# Our kubectl (the one in /usr/bin, if any, is not ours), always as cluster admin.
kubectl() { "$kube_bin/kubectl" --kubeconfig="$state/admin.kubeconfig" "$@"; }

# Builds what is missing. A cached build takes well under a second; a cold one prints how long it took.
build() {
  local start=$SECONDS cached=1
  "$here/build.sh" --print >/dev/null 2>&1 || cached=0
  ((cached)) || log "building the cluster binaries (first time only; see e2e/build.sh)"
  "$here/build.sh" >/dev/null || die "e2e/build.sh failed (see its output above)"
  build_cached=$cached
  build_seconds=$((SECONDS - start))
  ((cached)) || log "cold build took ${build_seconds} s"
  load_bins
}

# Debian's openvswitch-switch gives ovsdb-server, ovs-vswitchd and the tools (its own service is never
# used); the scripts and tests also use openssl, jq, curl, ss (iproute2) and flock (util-linux).
debian_packages=(openvswitch-switch openssl jq curl iproute2 util-linux)
ensure_ovs() {
  local missing=() pkg
  for pkg in "${debian_packages[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"; } >&2 ||
      die "cannot install ${missing[*]} with apt-get (root and the package registry are needed)"
  fi
  local tool
  for tool in ovsdb-tool ovsdb-server ovs-vswitchd ovs-vsctl ovs-appctl; do
    command -v "$tool" >/dev/null || die "$tool not found although openvswitch-switch is installed"
  done
  [ -f "$OVS_SCHEMA" ] || die "$OVS_SCHEMA is missing (openvswitch-switch installation is broken?)"
}

require_tools() {
  local tool
  for tool in openssl curl ss setsid base64; do
    command -v "$tool" >/dev/null || die "$tool is needed but not installed"
  done
}

# ---------------------------------------------------------------------------------------------------------
# Processes: every long-running process is recorded in $state/pids/<name>.pid, in start order in
# $state/pids/order, so that `down` stops exactly those and nothing else.

record_pid() {
  local name=$1 pid=$2
  echo "$pid" >"$state/pids/$name.pid"
  echo "$name" >>"$state/pids/order"
}

pid_of() { cat "$state/pids/$1.pid" 2>/dev/null || true; }

# shellcheck source=e2e/processes.sh
source "$here/processes.sh"

# True when the PID runs and is one of ours: every command line we start names a path in $state, so a
# PID reused by an unrelated process after a crash is never mistaken for ours.
ours() {
  local pid=$1
  alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$state"
}

# Starts "$@" in its own session (so it outlives this script and its terminal), logging to logs/<name>.log.
start_bg() {
  local name=$1
  shift
  # 9>&-: the lock of `up` must not be inherited, or the cluster itself would hold it until `down`.
  setsid "$@" </dev/null >>"$state/logs/$name.log" 2>&1 9>&- &
  record_pid "$name" $!
}

stop_pid() {
  local name=$1 pid
  pid="$(pid_of "$name")"
  [ -n "$pid" ] || return 0
  alive "$pid" || return 0
  if ! ours "$pid"; then
    log "not stopping PID $pid ($name): it is no longer the process we started"
    return 0
  fi
  terminate "$name" "$pid"
}

# Every recorded process, newest first.
stop_all() {
  [ -f "$state/pids/order" ] || return 0
  local name
  while read -r name; do
    [ -n "$name" ] && stop_pid "$name"
  done < <(tac "$state/pids/order")
}

listening() { ss -ltnH "sport = :$1" 2>/dev/null | grep -q .; }

ports_in_use() {
  local port busy=()
  for port in "${PORTS[@]}"; do listening "$port" && busy+=("$port"); done
  echo "${busy[*]}"
}

# Polls "$@" every 0.2 s for up to $1 seconds.
wait_for() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
  log "$what ready"
}

# Shows the end of a component's log and fails.
fail_with_log() {
  local name=$1 msg=$2
  if [ -f "$state/logs/$name.log" ]; then
    log "last lines of $state/logs/$name.log:"
    tail -n 20 "$state/logs/$name.log" >&2
  fi
  die "$msg (the partial cluster is still up for inspection; e2e/cluster.sh down cleans it)"
}

# ---------------------------------------------------------------------------------------------------------
# Certificates and kubeconfigs

# new_cert <name> <subject> <extendedKeyUsage> [subjectAltName]: a key pair signed by the cluster CA.
new_cert() {
  local name=$1 subject=$2 eku=$3 san=${4:-}
  local dir="$state/pki"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$dir/$name.key" -subj "$subject" \
    -out "$dir/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    echo "subjectKeyIdentifier=hash"
    echo "authorityKeyIdentifier=keyid"
    [ -z "$san" ] || echo "subjectAltName=$san"
  } >"$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 3650 -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
}

make_certs() {
  local dir="$state/pki"
  mkdir -p "$dir"
  openssl req -x509 -new -nodes -newkey rsa:2048 -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 3650 \
    -subj "/CN=crosstrace-e2e-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null ||
    die "openssl could not create the cluster CA"
  # The apiserver is reached as 127.0.0.1/localhost from the host and, by in-cluster clients, by its
  # service name and the first IP of the service range.
  new_cert apiserver "/CN=kube-apiserver" serverAuth \
    "IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  new_cert admin "/O=system:masters/CN=crosstrace-e2e-admin" clientAuth
  new_cert controller-manager "/CN=system:kube-controller-manager" clientAuth
  new_cert scheduler "/CN=system:kube-scheduler" clientAuth
  new_cert kwok "/O=system:masters/CN=kwok" clientAuth
  # Service-account tokens are signed with this key (apiserver) and verified with its public half.
  openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  chmod 600 "$dir"/*.key
  # Tests reach the CA at a stable, short path.
  cp "$dir/ca.crt" "$state/ca.crt"
}

# write_kubeconfig <file> <cert name>: certificates embedded, so the file can be copied anywhere.
write_kubeconfig() {
  local file=$1 cert=$2 pki="$state/pki"
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: crosstrace-e2e
  cluster:
    server: $SERVER
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $cert
  user:
    client-certificate-data: $(base64 -w0 "$pki/$cert.crt")
    client-key-data: $(base64 -w0 "$pki/$cert.key")
contexts:
- name: crosstrace-e2e
  context:
    cluster: crosstrace-e2e
    user: $cert
current-context: crosstrace-e2e
EOF
  chmod 600 "$file"
}

make_kubeconfigs() {
  local name
  for name in admin controller-manager scheduler kwok; do
    write_kubeconfig "$state/$name.kubeconfig" "$name"
  done
}

# ---------------------------------------------------------------------------------------------------------
# Control plane

start_etcd() {
  start_bg etcd "$etcd_bin/etcd" \
    --name=crosstrace-e2e \
    --data-dir="$state/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --advertise-client-urls="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="crosstrace-e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync \
    --log-level=warn
}

etcd_healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_CLIENT_PORT/health" | grep -q '"health":"true"'; }

start_apiserver() {
  local pki="$state/pki"
  start_bg kube-apiserver "$kube_bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --secure-port="$APISERVER_PORT" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true \
    --client-ca-file="$pki/ca.crt" \
    --tls-cert-file="$pki/apiserver.crt" \
    --tls-private-key-file="$pki/apiserver.key" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --cert-dir="$state/kube-apiserver" \
    --profiling=false \
    --v=1
}

apiserver_ready() { kubectl get --raw=/readyz --request-timeout=2s 2>/dev/null | grep -qx ok; }

start_controller_manager() {
  local pki="$state/pki" kc="$state/controller-manager.kubeconfig"
  # No leader election: there is only one, and a restart after a crash must not wait out an old lease.
  # No node IPAM: there is no pod network, kwok hands out pod IPs itself.
  # A higher client rate than the default 20 QPS, so that a thousand Deployments roll out in minutes.
  start_bg kube-controller-manager "$kube_bin/kube-controller-manager" \
    --kubeconfig="$kc" \
    --authentication-kubeconfig="$kc" \
    --authorization-kubeconfig="$kc" \
    --secure-port="$KCM_PORT" \
    --bind-address=127.0.0.1 \
    --cert-dir="$state/kube-controller-manager" \
    --leader-elect=false \
    --controllers='*,-node-ipam-controller' \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" \
    --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" \
    --cluster-signing-key-file="$pki/ca.key" \
    --profiling=false \
    --kube-api-qps=200 \
    --kube-api-burst=400 \
    --v=1
}

start_scheduler() {
  local kc="$state/scheduler.kubeconfig"
  start_bg kube-scheduler "$kube_bin/kube-scheduler" \
    --kubeconfig="$kc" \
    --authentication-kubeconfig="$kc" \
    --authorization-kubeconfig="$kc" \
    --secure-port="$SCHEDULER_PORT" \
    --bind-address=127.0.0.1 \
    --cert-dir="$state/kube-scheduler" \
    --leader-elect=false \
    --profiling=false \
    --v=1
}

healthz() { curl -ksf --max-time 2 "$1/healthz" | grep -qx ok; }

# kwok plays the kubelet of the nodes annotated kwok.x-k8s.io/node=fake only. HOME points into the state
# directory so that a ~/.kwok/kwok.yaml of the user is not loaded on top of our configuration.
start_kwok() {
  mkdir -p "$state/kwok"
  start_bg kwok env HOME="$state/kwok" "$kwok_bin/kwok" \
    --kubeconfig="$state/kwok.kubeconfig" \
    --config="$kwok_config" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector="$NODE_ANNOTATION=fake" \
    --server-address="127.0.0.1:$KWOK_PORT" \
    --cidr=10.244.0.0/16
}

node_name() { echo "kwok-node-$1"; }
# Each node gets its own loopback address (all of 127.0.0.0/8 reaches this machine, so an agent simulating
# the node can really listen on it) and its own pod range, as node IPAM would give (it is off here).
node_ip() { echo "127.0.1.$(($1 + 1))"; }
node_pod_cidr() { echo "10.244.$1.0/24"; }

create_nodes() {
  ((nodes <= 250)) || die "at most 250 nodes (CROSSTRACE_E2E_NODES=$nodes)"
  local i name
  for ((i = 0; i < nodes; i++)); do
    name="$(node_name "$i")"
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    $NODE_ANNOTATION: fake
  labels:
    kubernetes.io/hostname: $name
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
spec:
  podCIDR: $(node_pod_cidr "$i")
  podCIDRs: [$(node_pod_cidr "$i")]
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "1000"}
  capacity: {cpu: "32", memory: 256Gi, pods: "1000"}
  addresses:
  - {type: InternalIP, address: $(node_ip "$i")}
  - {type: Hostname, address: $name}
EOF
  done | kubectl apply -f - >/dev/null || die "could not create the kwok nodes"
}

# Nodes that are Ready and untainted. Right after creation the node lifecycle controller taints a node
# not-ready until kwok reports it; tests should start only once that taint is gone again.
ready_nodes() {
  kubectl get nodes -l type=kwok \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}|{.spec.taints}{"\n"}{end}' \
    2>/dev/null | grep -cx 'True|' || true
}

all_nodes_ready() { [ "$(ready_nodes)" -ge "$nodes" ]; }

# ---------------------------------------------------------------------------------------------------------
# Open vSwitch: one ovsdb-server + ovs-vswitchd per node, each in $state/ovs/<node>/. OVS_RUNDIR and
# friends point there so that nothing touches the system's /var/run/openvswitch.

ovs_dir() { echo "$state/ovs/$(node_name "$1")"; }

ovs_vsctl() {
  local dir=$1
  shift
  OVS_RUNDIR="$dir" OVS_DBDIR="$dir" OVS_LOGDIR="$dir" ovs-vsctl --db="unix:$dir/db.sock" --timeout=20 "$@"
}

start_ovs() {
  local i=$1 dir node pid
  dir="$(ovs_dir "$i")"
  node="$(node_name "$i")"
  mkdir -p "$dir"
  export OVS_RUNDIR="$dir" OVS_DBDIR="$dir" OVS_LOGDIR="$dir"
  ovsdb-tool create "$dir/conf.db" "$OVS_SCHEMA" || die "ovsdb-tool could not create $dir/conf.db"
  # --detach returns once the daemon serves; its pidfile holds the daemon's PID, which we record.
  ovsdb-server "$dir/conf.db" \
    --remote="punix:$dir/db.sock" \
    --unixctl="$dir/ovsdb-server.ctl" \
    --pidfile="$dir/ovsdb-server.pid" \
    --log-file="$dir/ovsdb-server.log" \
    --detach --no-chdir >>"$state/logs/ovs-$node.log" 2>&1 9>&- ||
    die "ovsdb-server for $node did not start (see $dir/ovsdb-server.log)"
  pid="$(cat "$dir/ovsdb-server.pid")"
  record_pid "ovsdb-server-$node" "$pid"
  ovs_vsctl "$dir" --no-wait init
  ovs-vswitchd "unix:$dir/db.sock" \
    --enable-dummy=override \
    --unixctl="$dir/ovs-vswitchd.ctl" \
    --pidfile="$dir/ovs-vswitchd.pid" \
    --log-file="$dir/ovs-vswitchd.log" \
    --detach --no-chdir >>"$state/logs/ovs-$node.log" 2>&1 9>&- ||
    die "ovs-vswitchd for $node did not start (see $dir/ovs-vswitchd.log)"
  pid="$(cat "$dir/ovs-vswitchd.pid")"
  record_pid "ovs-vswitchd-$node" "$pid"
  # Without --no-wait, ovs-vsctl returns only once ovs-vswitchd has applied the change: proof it works.
  ovs_vsctl "$dir" -- --may-exist add-br br-int \
    -- --may-exist add-port br-int p1 -- set Interface p1 type=dummy \
    -- --may-exist add-port br-int p2 -- set Interface p2 type=dummy \
    -- --may-exist add-port br-int p3 -- set Interface p3 type=dummy ||
    die "could not create br-int on $node's ovs-vswitchd (see $dir/ovs-vswitchd.log)"
  unset OVS_RUNDIR OVS_DBDIR OVS_LOGDIR
}

ovs_healthy() {
  local dir=$1
  ovs_vsctl "$dir" show 2>/dev/null | grep -q 'Bridge br-int' &&
    ovs-appctl -t "$dir/ovs-vswitchd.ctl" version >/dev/null 2>&1
}

# ---------------------------------------------------------------------------------------------------------
# State directory

state_nodes() { cat "$state/nodes" 2>/dev/null || echo 0; }

# Refuses to work on a directory that is not ours (or is something like / or $HOME).
check_state_dir() {
  case "$state" in
  "" | / | "$HOME" | "$HOME/") die "CROSSTRACE_E2E_STATE=$state is not a safe state directory" ;;
  esac
  if [ -d "$state" ] && [ ! -e "$state/$MARKER" ] && [ -n "$(ls -A "$state")" ]; then
    die "$state exists and is not a crosstrace e2e state directory; refusing to use or remove it"
  fi
}

# Healthy: `up` completed, every recorded process is ours and alive, the apiserver is ready and all
# nodes are Ready. Quiet; used by `up` to decide between "nothing to do" and "clean a crashed cluster".
cluster_healthy() {
  [ -f "$state/up-complete" ] && [ -f "$state/pids/order" ] || return 1
  "$here/build.sh" --print >/dev/null 2>&1 || return 1
  load_bins
  local name
  while read -r name; do
    ours "$(pid_of "$name")" || return 1
  done <"$state/pids/order"
  nodes="$(state_nodes)"
  apiserver_ready && all_nodes_ready
}

# ---------------------------------------------------------------------------------------------------------
# Verbs

cmd_up() {
  require_tools
  check_state_dir
  nodes="${CROSSTRACE_E2E_NODES:-3}"
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "CROSSTRACE_E2E_NODES must be a positive integer, not '$nodes'"

  if cluster_healthy; then
    local running
    running="$(state_nodes)"
    [ "$running" = "${CROSSTRACE_E2E_NODES:-$running}" ] ||
      log "warning: the running cluster has $running nodes, not $CROSSTRACE_E2E_NODES; run down first to change it"
    log "cluster already up and healthy ($running nodes); nothing to do"
    return 0
  fi
  if [ -e "$state" ]; then
    log "found state of a cluster that is not healthy (crashed or half started); cleaning it up"
    cmd_down
  fi

  local start=$SECONDS
  ensure_ovs
  build
  local busy
  busy="$(ports_in_use)"
  [ -z "$busy" ] || die "port(s) $busy already in use by another process (ss -ltnp shows which); cannot start"

  local started=$SECONDS
  mkdir -p "$state"/{pids,logs}
  touch "$state/$MARKER"
  echo "$nodes" >"$state/nodes"
  make_certs
  make_kubeconfigs

  start_etcd
  wait_for 30 etcd etcd_healthy || fail_with_log etcd "etcd did not become healthy in 30 s"
  start_apiserver
  # OVS does not need the apiserver: set it up while the apiserver starts.
  local i
  for ((i = 0; i < nodes; i++)); do start_ovs "$i"; done
  log "Open vSwitch up on $nodes node(s)"
  wait_for 60 kube-apiserver apiserver_ready || fail_with_log kube-apiserver "kube-apiserver not ready in 60 s"
  start_controller_manager
  start_scheduler
  start_kwok
  create_nodes
  wait_for 30 kube-controller-manager healthz "https://127.0.0.1:$KCM_PORT" ||
    fail_with_log kube-controller-manager "kube-controller-manager not healthy in 30 s"
  wait_for 30 kube-scheduler healthz "https://127.0.0.1:$SCHEDULER_PORT" ||
    fail_with_log kube-scheduler "kube-scheduler not healthy in 30 s"
  wait_for 30 kwok healthz "http://127.0.0.1:$KWOK_PORT" || fail_with_log kwok "kwok not healthy in 30 s"
  wait_for 60 "all $nodes nodes" all_nodes_ready ||
    fail_with_log kwok "only $(ready_nodes) of $nodes nodes Ready after 60 s"
  for ((i = 0; i < nodes; i++)); do
    ovs_healthy "$(ovs_dir "$i")" || die "Open vSwitch of $(node_name "$i") does not answer (see $(ovs_dir "$i"))"
  done

  # Timings for the tests: warm start (binaries cached) must stay under 60 s.
  echo $((SECONDS - start)) >"$state/up-seconds"
  echo $((SECONDS - started)) >"$state/startup-seconds"
  echo "$build_cached" >"$state/build-cached"
  touch "$state/up-complete"
  log "cluster up in $((SECONDS - start)) s (build step $build_seconds s, startup $((SECONDS - started)) s):" \
    "$nodes kwok nodes Ready, apiserver $SERVER, state in $state"
  log "use it with: eval \"\$($here/cluster.sh env)\""
}

cmd_down() {
  check_state_dir
  stop_all
  # Ports are released right after the processes exit; give the kernel a moment before judging.
  local busy i
  for ((i = 0; i < 25; i++)); do
    busy="$(ports_in_use)"
    [ -n "$busy" ] || break
    sleep 0.2
  done
  rm -rf "$state"
  [ -z "$busy" ] || die "port(s) $busy still listening after down (not ours? ss -ltnp shows the owner)"
  log "cluster down"
}

cmd_status() {
  if [ ! -f "$state/pids/order" ]; then
    echo "not running (no state in $state)"
    return 1
  fi
  local ok=0 name pid
  while read -r name; do
    pid="$(pid_of "$name")"
    if ours "$pid"; then
      printf '%-34s pid %-8s running\n' "$name" "$pid"
    else
      printf '%-34s pid %-8s DEAD\n' "$name" "${pid:-?}"
      ok=1
    fi
  done <"$state/pids/order"
  load_bins
  nodes="$(state_nodes)"
  if apiserver_ready; then
    echo "kube-apiserver $SERVER: ready"
  else
    echo "kube-apiserver $SERVER: NOT ready"
    ok=1
  fi
  local ready
  ready="$(ready_nodes)"
  echo "nodes Ready (and untainted): $ready/$nodes"
  [ "$ready" -ge "$nodes" ] || ok=1
  [ -f "$state/up-complete" ] || { echo "up did not complete"; ok=1; }
  return $ok
}

cmd_env() {
  [ -f "$state/nodes" ] || die "no cluster state in $state; run e2e/cluster.sh up first"
  load_bins
  local path i dir
  path="$(IFS=:; echo "${bin_dirs[*]}")"
  nodes="$(state_nodes)"
  printf 'export KUBECONFIG=%q\n' "$state/admin.kubeconfig"
  # shellcheck disable=SC2016 # $PATH is expanded by the shell that evals this, not here
  printf 'export PATH=%q:"$PATH"\n' "$path"
  printf 'export CROSSTRACE_E2E_STATE=%q\n' "$state"
  printf 'export CROSSTRACE_E2E_CA=%q\n' "$state/ca.crt"
  printf 'export CROSSTRACE_E2E_SERVER=%q\n' "$SERVER"
  printf 'export CROSSTRACE_E2E_PORT_OFFSET=%q\n' "$offset"
  printf 'export CROSSTRACE_E2E_NODES=%q\n' "$nodes"
  for ((i = 0; i < nodes; i++)); do
    dir="$(ovs_dir "$i")"
    printf 'export CROSSTRACE_NODE_%d=%q\n' "$i" "$(node_name "$i")"
    printf 'export CROSSTRACE_NODE_%d_IP=%q\n' "$i" "$(node_ip "$i")"
    printf 'export CROSSTRACE_NODE_%d_OVSDB=%q\n' "$i" "unix:$dir/db.sock"
    printf 'export CROSSTRACE_NODE_%d_UNIXCTL=%q\n' "$i" "$dir/ovs-vswitchd.ctl"
  done
}

# `up` and `down` change the state directory; one at a time. Daemons are started with fd 9 closed.
with_lock() {
  mkdir -p "$(dirname "$state")"
  exec 9>"$state.lock"
  flock -w 300 9 || die "another e2e/cluster.sh up/down holds $state.lock"
  "$@"
}

case "${1:-}" in
up) with_lock cmd_up ;;
down) with_lock cmd_down ;;
status) cmd_status ;;
env) cmd_env ;;
*)
  echo "usage: $0 up|down|status|env" >&2
  exit 2
  ;;
esac
