# Processes the e2e scripts started, stopped by PID. Sourced by e2e/cluster.sh and e2e/envoy-gateway.sh,
# which define log and `ours PID` (true when PID is one of the processes they started).

# True when PID exists and is not a zombie (an exited child nobody has reaped yet counts as gone).
alive() {
  local pid=$1 st
  [ -n "$pid" ] && st="$(cut -d')' -f2 "/proc/$pid/stat" 2>/dev/null)" || return 1
  [ "${st:1:1}" != Z ]
}

# True once PID is gone, waiting up to N tenths of a second.
gone_within() {
  local pid=$1 n=$2 i
  for ((i = 0; i < n; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  return 1
}

# Stops PID (NAME in the log): SIGTERM and up to 10 s, then SIGKILL and up to 5 s.
terminate() {
  local name=$1 pid=$2
  kill -TERM "$pid" 2>/dev/null || true
  gone_within "$pid" 100 && return 0
  log "$name (PID $pid) ignored SIGTERM for 10 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  gone_within "$pid" 50 && return 0
  log "$name (PID $pid) survived SIGKILL"
}
