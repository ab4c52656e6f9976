#!/usr/bin/env bash
# Proves `e2e/cluster.sh down` leaves nothing behind: it runs `down`, then checks that no process recorded
# in the state directory's pid files still runs and that none of the cluster's ports still listens.
# Prints `ok - <check>` / `not ok - <check>` and a final `N passed, M failed`; exits non-zero on failure.
# Stops the cluster: run it last, or `e2e/cluster.sh up` again afterwards.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="$here/cluster.sh"
state="${CROSSTRACE_E2E_STATE:-$HOME/.cache/crosstrace/e2e-state}"
# Must match the ports in e2e/cluster.sh: etcd client and peer, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok (each plus CROSSTRACE_E2E_PORT_OFFSET, as there).
offset="${CROSSTRACE_E2E_PORT_OFFSET:-0}"
ports=()
for port in 12379 12380 16443 20257 20259 20247; do ports+=($((port + offset))); done

# shellcheck source=e2e/tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Read the PIDs before `down` removes the state directory: these are what must be gone afterwards.
declare -A pids=() cmdlines=()
for f in "$state"/pids/*.pid; do
  [ -e "$f" ] || continue
  name="$(basename "$f" .pid)"
  pids[$name]="$(cat "$f")"
  # Remember the command line too, so a PID reused by an unrelated process is not blamed on us.
  cmdlines[$name]="$(tr '\0' ' ' <"/proc/${pids[$name]}/cmdline" 2>/dev/null || true)"
done
if [ "${#pids[@]}" -gt 0 ]; then
  ok "found ${#pids[@]} recorded processes before down"
else
  not_ok "found recorded processes before down" "no pid files in $state/pids (was the cluster up?)"
fi

if out="$("$cluster" down 2>&1)"; then ok "cluster.sh down succeeds"; else not_ok "cluster.sh down succeeds" "$out"; fi

left=()
for name in "${!pids[@]}"; do
  pid="${pids[$name]}"
  [ -r "/proc/$pid/cmdline" ] || continue
  stat="$(cut -d')' -f2 "/proc/$pid/stat" 2>/dev/null || true)"
  [ "${stat:1:1}" != Z ] || continue # exited, only not reaped yet
  now="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  [ -n "$now" ] && [ "$now" = "${cmdlines[$name]}" ] && left+=("$name($pid)")
done
if [ "${#left[@]}" -eq 0 ]; then ok "no recorded process survives down"; else not_ok "no recorded process survives down" "${left[*]}"; fi

busy=()
for port in "${ports[@]}"; do
  ss -ltnH "sport = :$port" | grep -q . && busy+=("$port")
done
if [ "${#busy[@]}" -eq 0 ]; then ok "no cluster port listening (${ports[*]})"; else not_ok "no cluster port listening" "still listening: ${busy[*]}"; fi

if [ ! -e "$state" ]; then ok "state directory removed"; else not_ok "state directory removed" "$state still exists"; fi

if out="$("$cluster" down 2>&1)"; then ok "down again (nothing running) succeeds"; else not_ok "down again (nothing running) succeeds" "$out"; fi

if ! "$cluster" status >/dev/null 2>&1; then ok "status exits non-zero when down"; else not_ok "status exits non-zero when down"; fi

summary
