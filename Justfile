# crosstrace tasks. Start here: `e2e/just --list` (e2e/just builds `just` itself on a fresh machine).

set shell := ["bash", "-euo", "pipefail", "-c"]

# Builds are cached outside the repository.
export CARGO_TARGET_DIR := env("CARGO_TARGET_DIR", home_directory() / ".cache/crosstrace/target")
export CARGO_BUILD_JOBS := env("CARGO_BUILD_JOBS", "2")

cluster := justfile_directory() / "e2e/cluster.sh"

# List the recipes.
default:
    @just --list

# Build the crosstrace binary.
build:
    cargo build --locked

# Regenerate crds/ (plain manifests) and the chart's CRD templates from the Rust types (commit the result).
crds:
    cargo run --locked --quiet -- crds --out-dir crds --chart-dir helm/crosstrace/templates/crds

# Formatting and lints, warnings are errors; actionlint for .github/workflows (pinned, built once).
lint:
    cargo fmt --all -- --check
    cargo clippy --locked --all-targets --features e2e -- -D warnings
    "$(e2e/build.sh actionlint)/actionlint"

# e2e/image.sh: a static release binary, non-root, as an OCI layout under $CARGO_TARGET_DIR/image; prints
# its digest (the same commit gives the same digest). `just image push=REGISTRY/crosstrace[:TAG]` pushes it
# too (TAG defaults to the version).
# Build the container image without a container engine (push=REGISTRY/crosstrace[:TAG] to push it).
image push=env("CROSSTRACE_IMAGE_PUSH", ""):
    #!/usr/bin/env bash
    set -euo pipefail
    push={{ quote(push) }}
    push="${push#push=}"
    exec e2e/image.sh ${push:+--push "$push"}

# Pure and mocked-API tests, the CRD drift check, and every sidecar configuration checked by the real
# collector of the default sidecar's release (built once by e2e/build.sh, cached).
unit:
    #!/usr/bin/env bash
    set -euo pipefail
    otelcol_bin="$(e2e/build.sh otelcol)"
    CROSSTRACE_OTELCOL="$otelcol_bin/otelcol-k8s" cargo test --locked

# Start the local real cluster (cached binaries; the first run builds them, see README).
up:
    {{cluster}} up

# Stop the local cluster and remove its state.
down:
    {{cluster}} down

# End-to-end tests on the local cluster; starts it if needed and, then, stops it again (proving
# `down` leaves nothing behind). Installs the chart: the controller and agents run as its ServiceAccounts.
e2e:
    #!/usr/bin/env bash
    set -euo pipefail
    started=0
    if ! {{cluster}} status >/dev/null 2>&1; then {{cluster}} up; started=1; fi
    eval "$({{cluster}} env)"
    finish() {
        e2e/install-chart.sh --remove || echo "e2e/install-chart.sh --remove failed (see above)" >&2
        if [ "$started" = 1 ]; then bash e2e/tests/down_test.sh || exit 1; fi
    }
    trap finish EXIT
    cargo build --locked --features e2e --tests
    bash e2e/tests/cluster_test.sh
    e2e/install-chart.sh --remove
    bash e2e/tests/helm_test.sh
    bash e2e/tests/registry_test.sh
    e2e/install-chart.sh
    export CROSSTRACE_E2E_CONTROLLER_KUBECONFIG="$CROSSTRACE_E2E_STATE/controller.kubeconfig"
    cargo test --locked --features e2e --test 'e2e_*' -- --test-threads=1

# The demo: local cluster, chart, controller and agents, sample objects, storefront policy.
demo:
    e2e/demo.sh up

# Stop everything the demo started.
demo-down:
    e2e/demo.sh down

# Everything CI runs: lint, unit, e2e.
test: lint unit e2e

# Benchmarks (issue 7) on the local cluster with 20 nodes: starts it if needed (restarts it with 20
# nodes if it has fewer), installs the chart, runs every scenario and prints the table; JSON goes to
# target/bench/ of the repository. Knobs: CROSSTRACE_BENCH_* (see e2e/bench/main.rs and RESULTS.md).
bench:
    #!/usr/bin/env bash
    set -euo pipefail
    nodes="${CROSSTRACE_BENCH_NODES:-20}"
    if {{cluster}} status >/dev/null 2>&1; then
        eval "$({{cluster}} env)"
        if [ "$CROSSTRACE_E2E_NODES" != "$nodes" ]; then {{cluster}} down; fi
    fi
    if ! {{cluster}} status >/dev/null 2>&1; then CROSSTRACE_E2E_NODES="$nodes" {{cluster}} up; fi
    eval "$({{cluster}} env)"
    e2e/install-chart.sh
    cargo bench --locked --features e2e --bench bench
