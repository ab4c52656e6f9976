# Processes the e2e scripts started, stopped by PID. Sourced by e2e/cluster.sh and e2e/envoy-gateway.sh,
# which define log and `ours PID` (true when PID is one of the processes they started).

# True when PID exists and is not a zombie (an exited child nobody has reaped yet counts as gone).
alive() {
  local pid=$1 st
  [ -n "$pid" ] && st="$(cut -d')' -f2 "/proc/$pid/stat" 2>/dev/null)" || return 1
  [ "${st:1:1}" != Z ]
}

# Stops PID (NAME in the log): SIGTERM and up to 10 s, then SIGKILL and up to 5 s.
terminate() {
  local name=$1 pid=$2 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  log "$name (PID $pid) ignored SIGTERM for 10 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  log "$name (PID $pid) survived SIGKILL"
}
