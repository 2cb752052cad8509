#!/usr/bin/env bash
# scripts/lint-deploy.sh — checks the deployment files; scripts/test.sh runs it.
#   1. hadolint on the Dockerfile;
#   2. docker-compose.yml against the compose-spec JSON schema (check-jsonschema's copy);
#   3. deploy/kubernetes/* against the Kubernetes schemas (kubernetes-validate, strict, two
#      versions), the KEDA objects against deploy/lint/keda-*.schema.json, and the files
#      against each other (deploy/lint/check_deploy.py: probes, grace, secrets, order);
#   4. the image: built with podman from the real Dockerfile on a locally made Debian base,
#      with the binaries of this checkout (--target runtime-prebuilt: no registry is reachable here
#      to pull the Rust image), inspected, and run as containers (podman + runc): `bizq migrate`,
#      a scheduler and a worker, each probed with the image's HEALTHCHECK command inside its
#      container and /readyz, a task that flows through them, then `podman stop` (SIGTERM).
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
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v psql >/dev/null; then
    command -v apt-get >/dev/null || die "podman, runc, mmdebstrap and psql are needed and there is no apt-get"
    say "installing podman, runc, mmdebstrap and the PostgreSQL client (once)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap postgresql-client >&2 ||
        die "apt-get install podman runc mmdebstrap postgresql-client failed"
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
CONTAINERS=()
DB=""
cleanup() {
    for c in "${CONTAINERS[@]}"; do podman rm --force --time 0 "$c" >/dev/null 2>&1 || true; done
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

# Run it, as containers: podman with runc (Debian's default crun refuses this machine's hybrid
# cgroups: "cgroups in hybrid mode not supported"), with podman's default nofile ulimit dropped
# (raising RLIMIT_NOFILE is not permitted here). Each container has a network namespace of
# its own (slirp4netns), so the image's own port 9464 and its HEALTHCHECK are used as they
# are; the host's loopback, where the private PostgreSQL listens, is 10.0.2.2 from inside.
export CONTAINERS_CONF="$WORK/containers.conf"
printf '[containers]\ndefault_ulimits = []\n' >"$CONTAINERS_CONF"
PODMAN=(podman --runtime runc)
NET=(--network slirp4netns:allow_host_loopback=true)
"${PODMAN[@]}" run --rm "${NET[@]}" "$IMAGE" bizq --help >"$WORK/run.log" 2>&1 ||
    { cat "$WORK/run.log" >&2; die "podman cannot run the image here (runc installed? apt-get install runc)"; }
DB="bizq_lint_deploy_$$"
psql "$DATABASE_URL" -qAtc "CREATE DATABASE $DB" >/dev/null || die "cannot create database $DB"
DB_URL="$("$VENV/bin/python" -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$DATABASE_URL" "$DB")"
# The same database as the containers reach it (the host's loopback is 10.0.2.2 there).
CT_DB_URL="$("$VENV/bin/python" -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); h = p.hostname; assert h in ("127.0.0.1", "localhost"), "the image check needs a PostgreSQL on the host loopback, not " + h; print(u.urlunsplit(p._replace(netloc=p.netloc.replace(h, "10.0.2.2", 1))))' "$DB_URL")" ||
    die "the image check runs against the private PostgreSQL on 127.0.0.1 (scripts/db.sh url)"
run_image() { "${PODMAN[@]}" run --rm "${NET[@]}" -e DATABASE_URL="$CT_DB_URL" -e RUST_LOG=info,sqlx=warn "$IMAGE" "$@"; }
run_image bizq migrate >"$WORK/migrate.log" 2>&1 || { cat "$WORK/migrate.log" >&2; die "bizq migrate failed in a container of the image"; }

# The long-running programs, each in a container of the image started as its CMD would be,
# with the image's own config plus the mock provider (mounted read-only at the image's
# BIZQ_CONFIG path, as compose and the Kubernetes ConfigMap do). The image's HEALTHCHECK must
# pass (`podman healthcheck run`: the image's own command, in the container), /readyz must
# answer 200, the logs must be JSON (the image config), and `podman stop` (SIGTERM) must end
# it with exit status 0.
cp deploy/container/bizq.toml "$WORK/bizq.toml"
printf '\n[providers.mock]\nenabled = true\nlatency_ms = 20\n' >>"$WORK/bizq.toml"
start_program() {
    local prog="$1" name="bizq-lint-$1-$$" healthy="" ready="" logs
    # No systemd here to run the HEALTHCHECK on a timer; it is run below, by hand.
    "${PODMAN[@]}" run -d --name "$name" "${NET[@]}" --read-only \
        -v "$WORK/bizq.toml:/etc/bizq/bizq.toml:ro" \
        -e DATABASE_URL="$CT_DB_URL" -e RUST_LOG=info,sqlx=warn \
        "$IMAGE" "$prog" >/dev/null 2>"$WORK/$prog.run.log" ||
        { cat "$WORK/$prog.run.log" >&2; die "podman run of $prog failed"; }
    CONTAINERS+=("$name")
    for _ in $(seq 1 60); do
        if podman healthcheck run "$name" >/dev/null 2>&1; then
            healthy=1
            break
        fi
        sleep 0.5
    done
    [ -n "$healthy" ] || { podman logs "$name" >&2; die "the image's HEALTHCHECK never passed for the $prog container"; }
    for _ in $(seq 1 20); do
        ready="$("${PODMAN[@]}" exec "$name" curl --silent --max-time 2 --output /dev/null --write-out '%{http_code}' "http://127.0.0.1:9464/readyz" || true)"
        [ "$ready" = "200" ] && break
        sleep 0.5
    done
    [ "$ready" = "200" ] || { podman logs "$name" >&2; die "/readyz answered $ready, not 200, in the $prog container"; }
    logs="$(podman logs "$name" 2>&1)"
    case "$logs" in "{"*) ;; *) printf '%s\n' "$logs" >&2; die "$prog in the container did not log JSON (the image config sets log_format = json)" ;; esac
}
stop_program() {
    local name="$1" rc
    podman stop --time 30 "$name" >/dev/null 2>>"$WORK/podman.log" || die "podman stop $name failed"
    rc="$(podman inspect --format '{{.State.ExitCode}}' "$name")"
    [ "$rc" = "0" ] || { podman logs "$name" >&2; die "$name exited $rc after SIGTERM, not 0"; }
}
start_program bizq-scheduler
start_program bizq-worker

# Work flows through the containers: a task enqueued by `bizq` from the image is promoted by
# the scheduler's container and completed by the worker's, and charged.
psql "$DB_URL" -qAtc "INSERT INTO workspaces (name, slug) VALUES ('lint', 'lint-deploy')" >/dev/null ||
    die "cannot create the workspace lint-deploy"
TASK="$(run_image bizq enqueue -w lint-deploy -i '{"prompt": "from a container"}' 2>"$WORK/enqueue.log" | grep -Eo '[0-9a-f-]{36}' | head -1 || true)"
[ -n "$TASK" ] || { cat "$WORK/enqueue.log" >&2; die "bizq enqueue failed in a container of the image"; }
status=""
for _ in $(seq 1 60); do
    status="$(psql "$DB_URL" -qAtc "SELECT status || ' ' || COALESCE(actual_cost, 0) FROM tasks WHERE id = '$TASK'")"
    case "$status" in completed*) break ;; esac
    sleep 0.5
done
case "$status" in
    "completed "[1-9]*) ;;
    *) podman logs "bizq-lint-bizq-worker-$$" >&2; die "task $TASK is '$status', not completed and charged, with the fleet in containers" ;;
esac
for c in "${CONTAINERS[@]}"; do stop_program "$c"; done
say "image OK: built, uid 10001; run as containers (podman + runc, read-only root): migrate ran, scheduler and worker passed the image's HEALTHCHECK inside their containers, /readyz 200, a task enqueued from the image completed and was charged, exit 0 on SIGTERM"
