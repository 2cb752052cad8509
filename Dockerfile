# syntax=docker/dockerfile:1
# BizQ fleet image: the three binaries (bizq, bizq-scheduler, bizq-worker) and a container
# config. One image, three programs (no ENTRYPOINT, so the command names the program):
#   docker run --rm -e DATABASE_URL=... bizq bizq migrate
#   docker run -d  -e DATABASE_URL=... bizq bizq-scheduler
#   docker run -d  -e DATABASE_URL=... bizq                      # = bizq-worker
#   docker run -d  -e DATABASE_URL=... -e BIZQ_DASHBOARD_TOKEN=... -p 8080:8080 \
#                  bizq bizq dashboard --addr 0.0.0.0:8080
# Migrations are embedded in the binaries; no SQL files are needed at run time.
#
# Build arguments (defaults are what a real build uses; see README "Deployment"):
#   BUILDER_IMAGE  the Rust toolchain image (pinned to the workspace's toolchain line)
#   RUNTIME_IMAGE  the base of the final image (same Debian release as the builder: glibc)
# Targets: the default (last) stage `runtime` compiles the binaries in the `build` stage.
# `--target runtime-prebuilt` instead packages binaries built elsewhere on the same Debian
# release, from dist/bin/ in the build context (CI caches; the image check in
# scripts/lint-deploy.sh, which cannot pull the Rust image); the build stage is then skipped.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-slim-trixie
ARG RUNTIME_IMAGE=docker.io/library/debian:trixie-slim

# ---- build: release binaries, cargo registry and target dir cached between builds --------
FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/bizq target/release/bizq-scheduler target/release/bizq-worker /out/

# ---- runtime-base: everything but the binaries ------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime-base
# ca-certificates: TLS to AI providers. curl: the HEALTHCHECK probe (the image has no other
# HTTP client). Versions come with the pinned Debian release; rebuild to get its fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 bizq \
 && useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin bizq
COPY deploy/container/bizq.toml /etc/bizq/bizq.toml
# The container config turns the metrics/health listener on at 0.0.0.0:9464 and logs JSON;
# every other key keeps its default (config/bizq.toml lists them all).
ENV BIZQ_CONFIG=/etc/bizq/bizq.toml \
    RUST_LOG=info,sqlx=warn
# Numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 9464: /metrics, /healthz, /readyz (worker, scheduler).  8080: `bizq dashboard`.
EXPOSE 9464 8080
# /healthz = the process is alive. Orchestrators that route traffic should use /readyz
# (database reachable, LISTEN connected, not draining); docker-compose.yml and the Kubernetes
# manifests do. The dashboard and `bizq migrate` override or ignore this check.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["curl", "--fail", "--silent", "--show-error", "--max-time", "2", "--output", "/dev/null", "http://127.0.0.1:9464/healthz"]
# SIGTERM drains the worker: no new claims, running tasks get worker.shutdown_grace_seconds,
# the rest return to the queue, exit 0. Give the orchestrator a stop timeout above that grace
# (Kubernetes: terminationGracePeriodSeconds; compose: stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["bizq-worker"]

# ---- runtime-prebuilt: binaries from dist/bin/ (--target runtime-prebuilt) -----------------------
FROM runtime-base AS runtime-prebuilt
COPY dist/bin/bizq dist/bin/bizq-scheduler dist/bin/bizq-worker /usr/local/bin/

# ---- runtime (default): binaries from the build stage ---------------------------------------------
FROM runtime-base AS runtime
COPY --from=build /out/ /usr/local/bin/
