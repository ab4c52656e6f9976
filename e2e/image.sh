#!/usr/bin/env bash
# Builds the crosstrace image without a container engine: a static release binary from the locked sources,
# written as an OCI image layout by e2e/oci_image.py (deterministic: the same commit gives the same digest),
# and pushed with crane when a registry is given. The one way the image is built, here and in the release
# workflow.
#
#   e2e/image.sh                       build; the layout goes to $CARGO_TARGET_DIR/image/oci (and oci.tar)
#   e2e/image.sh --push REGISTRY/REPO[:TAG]   also push it (TAG defaults to the version); loopback
#                                      registries are spoken to over plain HTTP
#   e2e/image.sh --out DIR             write the layout to DIR (and DIR.tar) instead
#   e2e/image.sh --platforms linux/amd64,linux/arm64   one image per platform, in an image index (a
#                                      platform other than this machine's needs its Rust target and a
#                                      linker, set with CARGO_TARGET_<TRIPLE>_LINKER and CC_<triple>)
#
# Prints `digest: sha256:...` (and `pushed: REPO@sha256:...`) last. The revision (org.opencontainers.image.revision,
# and `crosstrace --version`) is `git rev-parse --short=12 HEAD`, with `-dirty` when tracked files differ
# from it; the creation time is the commit's. CROSSTRACE_REVISION and CROSSTRACE_IMAGE_SOURCE override the
# revision and the source URL.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }

target_dir="${CARGO_TARGET_DIR:-$HOME/.cache/crosstrace/target}"
out="$target_dir/image/oci"
push=""
platforms="linux/amd64"
while [ $# -gt 0 ]; do
  case "$1" in
  --push) push="${2:?--push needs REGISTRY/REPO[:TAG]}"; shift 2 ;;
  --out) out="${2:?--out needs a directory}"; shift 2 ;;
  --platforms) platforms="${2:?--platforms needs a list}"; shift 2 ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument $1 (see --help)" ;;
  esac
done

rust_target() {
  case "$1" in
  linux/amd64) echo x86_64-unknown-linux-gnu ;;
  linux/arm64) echo aarch64-unknown-linux-gnu ;;
  *) die "unknown platform $1 (linux/amd64, linux/arm64)" ;;
  esac
}

cd "$root"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
[ -n "$version" ] || die "no version in Cargo.toml"
if [ -z "${CROSSTRACE_REVISION:-}" ]; then
  CROSSTRACE_REVISION="$(git rev-parse --short=12 HEAD)" || die "not a git checkout: set CROSSTRACE_REVISION"
  if ! git diff --quiet HEAD --; then
    log "tracked files differ from HEAD: the revision is $CROSSTRACE_REVISION-dirty"
    CROSSTRACE_REVISION+="-dirty"
  fi
fi
export CROSSTRACE_REVISION
created_epoch="$(git log -1 --format=%ct HEAD 2>/dev/null || echo 0)"
source_url="${CROSSTRACE_IMAGE_SOURCE:-https://github.com/crosstrace/crosstrace}"

# Static: glibc linked in (crt-static), so the image needs no libc. RUSTFLAGS reach only the --target
# artifacts, never build scripts and proc macros, which stay dynamic host programs. The remaps keep this
# machine's paths (checkout, cargo home, target dir) out of the binary, so it does not depend on them.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
rustflags=(-C target-feature=+crt-static --remap-path-prefix="$root=/crosstrace"
  --remap-path-prefix="$cargo_home=/cargo" --remap-path-prefix="$target_dir=/target")
export RUSTFLAGS="${rustflags[*]}"
binaries=()
IFS=, read -ra platform_list <<<"$platforms"
for platform in "${platform_list[@]}"; do
  triple="$(rust_target "$platform")"
  log "cargo build --release --locked --target $triple (revision $CROSSTRACE_REVISION)"
  start=$SECONDS
  cargo build --release --locked --target "$triple" --bin crosstrace
  ((SECONDS - start > 5)) && log "release build for $triple took $((SECONDS - start)) s"
  bin="$target_dir/$triple/release/crosstrace"
  # `file` says "statically linked" or "static-pie linked"; a dynamic binary names its interpreter.
  file -b "$bin" | grep -Eq 'static(-pie)? linked' || die "$bin is not static: $(file -b "$bin")"
  if [ "$triple" = "$(rustc -vV | sed -n 's/^host: //p')" ]; then
    libs="$(ldd "$bin" 2>&1 || true)"
    grep -Eq 'statically linked|not a dynamic executable' <<<"$libs" || die "$bin has dynamic dependencies: $libs"
    want="crosstrace $version (rev $CROSSTRACE_REVISION)"
    got="$("$bin" --version)" || die "$bin --version failed"
    [ "$got" = "$want" ] || die "$bin --version says '$got', want '$want'"
  fi
  binaries+=(--binary "$platform=$bin")
done

mkdir -p "$(dirname "$out")"
digest="$(python3 "$here/oci_image.py" --out "$out" --tar "$out.tar" "${binaries[@]}" --version "$version" \
  --revision "$CROSSTRACE_REVISION" --created-epoch "$created_epoch" --source "$source_url")"
log "OCI layout in $out (and $out.tar)"
echo "digest: $digest"

if [ -n "$push" ]; then
  # A reference without a tag gets the version (a ':' after the last '/' is a tag, one before is a port).
  last="${push##*/}"
  [[ "$last" == *:* || "$last" == *@* ]] || push="$push:$version"
  crane="$("$here/build.sh" go-containerregistry)/crane" || die "building crane failed"
  pushed="$("$crane" push "$out" "$push")" || die "crane push to $push failed"
  [ "${pushed##*@}" = "$digest" ] || die "the registry reports $pushed, the layout has $digest"
  echo "pushed: $pushed"
fi
