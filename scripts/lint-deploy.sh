#!/usr/bin/env bash
# scripts/lint-deploy.sh — checks the deployment files; scripts/test.sh runs it.
#   1. hadolint on the Dockerfile;
#   2. docker-compose.yml against the compose-spec JSON schema (check-jsonschema's copy);
#   3. deploy/kubernetes/* against the Kubernetes schemas (kubernetes-validate, strict, two
#      versions), the KEDA objects against deploy/lint/keda-*.schema.json, and the files
#      against each other (deploy/lint/check_deploy.py: probes, grace, secrets, order);
#   4. the image: built with podman from the real Dockerfile on a locally made Debian base,
#      with the binaries of this checkout (--target runtime-prebuilt: no registry is reachable here
#      to pull the Rust image), inspected, and run in a chroot of its filesystem (this machine
#      cannot run containers): `bizq migrate`, then a worker and a scheduler, each probed with
#      the image's HEALTHCHECK command and /readyz, then stopped with SIGTERM.
# The KEDA query itself is run and EXPLAINed by tests/tests/deploy_keda.rs.
#
# The linters go into a venv under .bizq/deploy-venv (PyPI), reused while
# deploy/lint/requirements.txt is unchanged. Step 4 needs root, apt (podman, mmdebstrap), a
# Debian mirror, $DATABASE_URL and the debug binaries (cargo build --workspace --bins); set
# BIZQ_SKIP_IMAGE_CHECK=1 to skip it where those are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

say() { echo "lint-deploy: $*" >&2; }
die() {
    say "FAILED: $*"
    exit 1
}

# ---- the venv ---------------------------------------------------------------------------------
VENV="$ROOT/.bizq/deploy-venv"
REQS="$ROOT/deploy/lint/requirements.txt"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    command -v python3 >/dev/null || die "python3 (3.11 or newer) is required: apt-get install python3 python3-venv"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "python3 is $(python3 -V 2>&1); 3.11 or newer is required (tomllib)"
    say "installing the linters into .bizq/deploy-venv (once)"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed: apt-get install python3-venv"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQS" ||
        die "pip install -r deploy/lint/requirements.txt failed (PyPI reachable?)"
    echo "$want" >"$STAMP"
fi

# ---- 1-3: static checks -----------------------------------------------------------------------
"$VENV/bin/hadolint" --no-color Dockerfile || die "hadolint found problems in the Dockerfile (above)"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml ||
    die "docker-compose.yml does not match the compose-spec schema (above)"
"$VENV/bin/python" deploy/lint/check_deploy.py || die "deployment files are inconsistent (above)"

# ---- 4: the image -----------------------------------------------------------------------------
if [ "${BIZQ_SKIP_IMAGE_CHECK:-0}" = "1" ]; then
    say "image check SKIPPED (BIZQ_SKIP_IMAGE_CHECK=1)"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "the image check needs root (podman build, chroot); BIZQ_SKIP_IMAGE_CHECK=1 skips it"
: "${DATABASE_URL:?the image check needs DATABASE_URL (scripts/db.sh url)}"
BIN="$ROOT/target/debug"
for b in bizq bizq-scheduler bizq-worker; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing: run cargo build --workspace --bins first"
done
if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v psql >/dev/null; then
    command -v apt-get >/dev/null || die "podman, mmdebstrap and psql are needed and there is no apt-get"
    say "installing podman, mmdebstrap and the PostgreSQL client (once)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman mmdebstrap postgresql-client >&2 ||
        die "apt-get install podman mmdebstrap postgresql-client failed"
fi

# The runtime base: Debian trixie made from Debian's packages, standing in for the
# docker.io/library/debian:trixie-slim the Dockerfile names (no image registry is reachable).
BASE=localhost/bizq-base:trixie-slim
WORK="$ROOT/.bizq/deploy-image"
mkdir -p "$WORK"
if ! podman image exists "$BASE"; then
    if [ ! -s "$WORK/trixie-rootfs.tar" ]; then
        say "making a Debian trixie base with mmdebstrap (once, about a minute)"
        mmdebstrap --quiet --variant=minbase --format=tar trixie "$WORK/trixie-rootfs.tar.part" >&2 ||
            die "mmdebstrap trixie failed (Debian mirror reachable?)"
        mv "$WORK/trixie-rootfs.tar.part" "$WORK/trixie-rootfs.tar"
    fi
    podman import --quiet "$WORK/trixie-rootfs.tar" "$BASE" >/dev/null || die "podman import of the base failed"
fi

# A build context with what the Dockerfile's prebuilt path reads, and nothing else.
CTX="$(mktemp -d)"
IMAGE=""
MNT=""
SVC_PID=""
DB=""
cleanup() {
    if [ -n "$SVC_PID" ]; then kill -KILL "$SVC_PID" 2>/dev/null || true; fi
    if [ -n "$MNT" ]; then podman image unmount "$IMAGE" >/dev/null 2>&1 || true; fi
    if [ -n "$IMAGE" ]; then podman rmi "$IMAGE" >/dev/null 2>&1 || true; fi
    if [ -n "$DB" ]; then psql "$DATABASE_URL" -qAtc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; fi
    rm -rf "$CTX"
}
trap cleanup EXIT
mkdir -p "$CTX/dist/bin" "$CTX/deploy/container"
cp Dockerfile .dockerignore "$CTX/"
cp deploy/container/bizq.toml "$CTX/deploy/container/"
for b in bizq bizq-scheduler bizq-worker; do
    strip -o "$CTX/dist/bin/$b" "$BIN/$b" 2>/dev/null || cp "$BIN/$b" "$CTX/dist/bin/$b"
done
# A tag of its own per run: another checkout may run this at the same time on the machine.
IMAGE="localhost/bizq:lint-deploy-$$"
say "building the image (podman, chroot isolation, --target runtime-prebuilt, base $BASE)"
podman build --quiet --isolation chroot --format docker \
    --target runtime-prebuilt --build-arg "RUNTIME_IMAGE=$BASE" \
    --tag "$IMAGE" "$CTX" >"$WORK/build.log" 2>&1 ||
    { cat "$WORK/build.log" >&2; die "podman build of the Dockerfile failed"; }

# What the image declares: read back from the built image, not from the Dockerfile.
INSPECT="$WORK/inspect.json"
podman image inspect "$IMAGE" >"$INSPECT"
HEALTH_CMD="$("$VENV/bin/python" - "$INSPECT" <<'EOF'
import json, sys
image = json.load(open(sys.argv[1]))[0]
cfg = image["Config"]
problems = []
if cfg.get("User") != "10001:10001":
    problems.append(f"User is {cfg.get('User')!r}, not 10001:10001")
if cfg.get("Cmd") != ["bizq-worker"]:
    problems.append(f"Cmd is {cfg.get('Cmd')!r}")
if "BIZQ_CONFIG=/etc/bizq/bizq.toml" not in cfg.get("Env", []):
    problems.append("BIZQ_CONFIG is not set to /etc/bizq/bizq.toml")
if "9464/tcp" not in cfg.get("ExposedPorts", {}):
    problems.append("port 9464 is not exposed")
if cfg.get("StopSignal") != "SIGTERM":
    problems.append(f"StopSignal is {cfg.get('StopSignal')!r}")
# podman reports the HEALTHCHECK beside Config, docker inside it
test = (cfg.get("Healthcheck") or image.get("Healthcheck") or {}).get("Test") or []
if test[:1] != ["CMD"] or not any(a.endswith(":9464/healthz") for a in test):
    problems.append(f"Healthcheck is {test!r}, not a CMD probing :9464/healthz")
if problems:
    sys.exit("image: " + "; ".join(problems))
print("\n".join(test[1:]))
EOF
)" || die "the built image does not declare what the Dockerfile intends (above)"

# Run it. No container can start here (crun: cgroups in hybrid mode), so the image's own
# filesystem is mounted and its programs run in a chroot as the image's user, on the host's
# network: same binaries, same libraries, same config, same curl.
MNT="$(podman image mount "$IMAGE")" || die "podman image mount failed"
DB="bizq_lint_deploy_$$"
psql "$DATABASE_URL" -qAtc "CREATE DATABASE $DB" >/dev/null || die "cannot create database $DB"
DB_URL="$("$VENV/bin/python" -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$DATABASE_URL" "$DB")"
# shellcheck disable=SC2054 # the comma is inside RUST_LOG's value
IN_IMAGE=(env -i PATH=/usr/local/bin:/usr/bin:/bin BIZQ_CONFIG=/etc/bizq/bizq.toml
    RUST_LOG=info,sqlx=warn DATABASE_URL="$DB_URL" "$(command -v chroot)" --userspec=10001:10001 "$MNT")
in_image() { "${IN_IMAGE[@]}" "$@"; }
in_image bizq migrate >"$WORK/migrate.log" 2>&1 || { cat "$WORK/migrate.log" >&2; die "bizq migrate failed inside the image"; }

# Each long-running program of the image, started from it as its CMD would be: the image's
# own HEALTHCHECK command must pass against it (with 9464 replaced by a free port, as this
# machine is shared), /readyz must answer 200, its logs must be JSON (the image config),
# and SIGTERM must end it with exit status 0.
check_program() {
    local prog="$1" log="$WORK/$1.log" port healthy="" ready="" rc=0
    port="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    # Started directly (a function would fork a subshell): $! is the program itself.
    "${IN_IMAGE[@]}" "$prog" --metrics-addr "127.0.0.1:$port" >"$log" 2>&1 &
    SVC_PID=$!
    mapfile -t probe < <(printf '%s\n' "$HEALTH_CMD" | sed "s#:9464/#:$port/#")
    for _ in $(seq 1 60); do
        if in_image "${probe[@]}" 2>/dev/null; then
            healthy=1
            break
        fi
        kill -0 "$SVC_PID" 2>/dev/null || break
        sleep 0.5
    done
    [ -n "$healthy" ] || { cat "$log" >&2; die "the image's HEALTHCHECK never passed against $prog running from the image"; }
    for _ in $(seq 1 20); do
        ready="$(in_image curl --silent --max-time 2 --output /dev/null --write-out '%{http_code}' "http://127.0.0.1:$port/readyz" || true)"
        [ "$ready" = "200" ] && break
        sleep 0.5
    done
    [ "$ready" = "200" ] || { cat "$log" >&2; die "/readyz answered $ready, not 200, from $prog in the image"; }
    grep -q '^{' "$log" || { cat "$log" >&2; die "$prog in the image did not log JSON (the image config sets log_format = json)"; }
    kill -TERM "$SVC_PID"
    wait "$SVC_PID" || rc=$?
    SVC_PID=""
    [ "$rc" -eq 0 ] || { cat "$log" >&2; die "$prog in the image exited $rc after SIGTERM, not 0"; }
}
check_program bizq-worker
check_program bizq-scheduler
say "image OK: built, uid 10001, read-only; migrate ran; worker and scheduler passed the HEALTHCHECK, /readyz 200, exit 0 on SIGTERM"
