#!/usr/bin/env bash
# Plays the kubelet for one pod of the chart's hooks on the local e2e cluster, where kwok simulates pods and
# runs no code. kwok leaves pods labelled crosstrace.dev/hook Pending (e2e/kwok/kwok.yaml); this waits for
# one, runs its container's arguments with the built crosstrace binary as a host process, authenticated with
# a token of the pod's own ServiceAccount bound to the pod (as the kubelet's projected token is), with the
# pod's environment, and then writes the pod's status from the exit code (Succeeded or Failed, the
# container terminated with that code). The Job controller then completes or fails the Job, and
# `helm uninstall` / `helm test` go on exactly as they would on a real cluster. Simulated: the image is not
# pulled, the command runs on this machine, not in a container; everything the API server sees is real.
#
#   e2e/run-hook-pod.sh NAMESPACE HOOK [TIMEOUT_SECONDS]
#     HOOK: the label value, `uninstall` (the pre-delete Job's pod) or `test` (the `helm test` pod)
#     Waits up to TIMEOUT_SECONDS (default 120) for the pod; prints the command's output; exits with its
#     exit code (or 124 when no pod came). The binary: $CROSSTRACE_BIN, else
#     $CARGO_TARGET_DIR/debug/crosstrace (default target directory as in the Justfile).
#
# Needs `eval "$(e2e/cluster.sh env)"` first.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -ge 2 ] || { echo "usage: $0 NAMESPACE HOOK [TIMEOUT_SECONDS]" >&2; exit 2; }
namespace=$1 hook=$2 timeout=${3:-120}
: "${CROSSTRACE_E2E_STATE:?run eval \"\$(e2e/cluster.sh env)\" first}"
bin="${CROSSTRACE_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/crosstrace/target}/debug/crosstrace}"
[ -x "$bin" ] || { echo "run-hook-pod: no crosstrace binary at $bin (cargo build first)" >&2; exit 2; }
say() { printf '[hook %s] %s\n' "$hook" "$*" >&2; }

# The first scheduled pod of the hook that has not run yet (no terminal phase, not being deleted).
pod=""
deadline=$((SECONDS + timeout))
while [ -z "$pod" ]; do
  pod="$(kubectl -n "$namespace" get pods -l "crosstrace.dev/hook=$hook" -o json 2>/dev/null | jq -r '
    [.items[] | select(.metadata.deletionTimestamp == null and (.spec.nodeName // "") != ""
      and ((.status.phase // "Pending") | IN("Succeeded", "Failed") | not))][0].metadata.name // ""')"
  [ -n "$pod" ] && break
  ((SECONDS < deadline)) || { say "no pod labelled crosstrace.dev/hook=$hook in $namespace within ${timeout}s"; exit 124; }
  sleep 0.5
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
kubectl -n "$namespace" get pod "$pod" -o json >"$tmp/pod.json"

# What the kubelet would run: the image's entrypoint (crosstrace) with the container's args. A `command`
# would replace the entrypoint, which this stand-in cannot honour: refused rather than run differently.
jq -e '.spec.containers | length == 1' "$tmp/pod.json" >/dev/null || { say "pod $pod has more than one container"; exit 2; }
jq -e '.spec.containers[0].command == null' "$tmp/pod.json" >/dev/null ||
  { say "pod $pod sets a command; only the image's entrypoint (crosstrace) can be run here"; exit 2; }
mapfile -t args < <(jq -r '.spec.containers[0].args // [] | .[]' "$tmp/pod.json")
account="$(jq -r '.spec.serviceAccountName // "default"' "$tmp/pod.json")"
container="$(jq -r '.spec.containers[0].name' "$tmp/pod.json")"
# The pod's environment: literal values and the downward API fields a kubelet would resolve.
envs=()
while IFS=$'\t' read -r name value field; do
  if [ -n "$field" ]; then
    value="$(jq -r --arg f "$field" 'getpath($f | split(".")) // ""' "$tmp/pod.json")"
  fi
  envs+=("$name=$value")
done < <(jq -r '.spec.containers[0].env // [] | .[] |
  if .valueFrom == null then [.name, (.value // ""), ""]
  elif .valueFrom.fieldRef != null then [.name, "", .valueFrom.fieldRef.fieldPath]
  else error("env \(.name): only values and fieldRef are supported here") end | @tsv' "$tmp/pod.json")

"$here/sa-kubeconfig.sh" "$namespace" "$account" "$tmp/kubeconfig" --bound-object-kind Pod --bound-object-name "$pod"

status() { # <phase> <container state json>
  kubectl -n "$namespace" patch pod "$pod" --subresource=status --type=merge -p "$(jq -cn \
    --arg phase "$1" --argjson state "$2" --arg name "$container" --arg image "$(jq -r '.spec.containers[0].image' "$tmp/pod.json")" \
    --arg now "$(date -u +%Y-%m-%dT%H:%M:%SZ)" '{status: {phase: $phase, startTime: $now,
      conditions: [{type: "Ready", status: (if $phase == "Running" then "True" else "False" end), lastTransitionTime: $now}],
      containerStatuses: [{name: $name, image: $image, imageID: "", ready: ($phase == "Running"), restartCount: 0,
        started: ($phase == "Running"), state: $state}]}}')" >/dev/null
}
started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
status Running "{\"running\": {\"startedAt\": \"$started\"}}"
say "running pod $namespace/$pod as serviceaccount $account: crosstrace ${args[*]}"
code=0
env "${envs[@]}" KUBECONFIG="$tmp/kubeconfig" "$bin" "${args[@]}" || code=$?
finished="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
if [ "$code" = 0 ]; then phase=Succeeded reason=Completed; else phase=Failed reason=Error; fi
status "$phase" "{\"terminated\": {\"exitCode\": $code, \"reason\": \"$reason\", \"startedAt\": \"$started\", \"finishedAt\": \"$finished\"}}"
say "pod $namespace/$pod: exit code $code, phase $phase"
exit "$code"
