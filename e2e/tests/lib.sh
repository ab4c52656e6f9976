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
