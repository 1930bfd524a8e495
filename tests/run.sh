#!/usr/bin/env bash
# Runs every test of Lockstep, from a fresh machine: installs what the tests need when it is
# missing (idempotent; a second run installs nothing), then formatting, lints, build and the
# whole test suite. The README's test command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# Reuse one build cache across clones and CI runs.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockstep-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Every phase prints its wall time when the next begins, and the run ends with a table of them,
# so a phase that grows shows in CI's output.
phase_name=""
phase_start=0
run_start=$(date +%s)
phases=()
phase_end() {
  if [ -n "$phase_name" ]; then
    local took=$(( $(date +%s) - phase_start ))
    phases+=("$(printf '%6ss  %s' "$took" "$phase_name")")
    printf '    (%s: %ss)\n' "$phase_name" "$took"
  fi
}
log() {
  phase_end
  phase_name="$*"
  phase_start=$(date +%s)
  printf '\n==> %s\n' "$*"
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- system packages -------------------------------------------------------------------
missing=()
command -v cargo >/dev/null || { echo "cargo is missing: install Rust 1.95 (rustup)" >&2; exit 1; }
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
command -v chromium >/dev/null || missing+=(chromium)
# Tests start private Redis servers and Redis Clusters (Redis 7: sharded pub/sub).
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
# Tests start private PostgreSQL clusters (initdb + pg_ctl from Debian's server package).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v runuser >/dev/null || missing+=(util-linux)
# The browser presign test puts nginx (CORS) in front of the S3-compatible server.
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
# deploy/local-cluster is linted.
command -v shellcheck >/dev/null || missing+=(shellcheck)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -q
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- third-party STOMP clients for the end-to-end tests ----------------------------------
clients="$root/tests/clients"
stamp="$clients/node_modules/.lockstep-installed"
if [ ! -f "$stamp" ] || [ "$clients/package-lock.json" -nt "$stamp" ]; then
  log "installing Node test clients (npm ci)"
  (cd "$clients" && npm ci --no-audit --no-fund --loglevel=error)
  touch "$stamp"
fi
if ! python3 - "$clients/python/requirements.txt" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
then
  log "installing Python test clients (pip)"
  python3 -m pip install -q --disable-pip-version-check -r "$clients/python/requirements.txt"
fi

# --- an S3-compatible server that verifies SigV4 signatures, for the presign tests ----------
# s3s-fs 0.14.1 is the last release that builds with Rust 1.95; it is built once into a cache
# outside the clone (about 4 minutes on 2 cores) and reused.
tools="$HOME/.cache/lockstep-tools"
if [ "$("$tools/bin/s3s-fs" --version 2>/dev/null)" != "s3s-fs 0.14.1" ]; then
  log "installing s3s-fs 0.14.1 into $tools"
  CARGO_TARGET_DIR="$HOME/.cache/lockstep-tools/build" \
    cargo install s3s-fs@0.14.1 --features binary --locked --root "$tools" --quiet
fi
export S3S_FS_BIN="$tools/bin/s3s-fs"

# --- checks and tests --------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# One build of every target, binaries included: the binaries the end-to-end tests run are built
# with the same features as the tests (dev-dependencies enable tokio's test-util), so the test
# step below compiles nothing twice.
log "cargo build (every target: the binaries the end-to-end tests run, and the tests)"
cargo build --workspace --all-targets --locked
log "cargo test"
cargo test --workspace --locked
log "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
log "deploy/k8s manifests against the Kubernetes 1.30 schemas"
# Every manifest but kustomization.yaml, which has no schema there; strict: unknown fields fail.
python3 -m kubernetes_validate -k 1.30.0 --strict --quiet $(ls deploy/k8s/*.yaml | grep -v kustomization.yaml)
log "deploy/: Dockerfile, compose and k8s checks, and proof that each check can fail"
shellcheck deploy/local-cluster
python3 tests/deploy/check_deploy.py "$CARGO_TARGET_DIR/debug/lockstep"
LOCKSTEP_BIN="$CARGO_TARGET_DIR/debug/lockstep" python3 -m unittest discover -s tests/deploy -p 'test_*.py'
phase_end
printf '\n==> phase times\n'
printf '%s\n' "${phases[@]}"
printf '%6ss  total\n' "$(( $(date +%s) - run_start ))"
printf '\n==> all tests passed\n'
