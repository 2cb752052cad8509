# BizQ fleet image: the three binaries (bizq, bizq-scheduler, bizq-worker) and the default
# config. One image, three entrypoints:
#   docker run --rm -e DATABASE_URL=... bizq bizq migrate
#   docker run -d  -e DATABASE_URL=... bizq bizq-scheduler
#   docker run -d  -e DATABASE_URL=... bizq bizq-worker --types 'content.*'
# Migrations are embedded in the binaries; no SQL files are needed at run time.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/bizq target/release/bizq-scheduler target/release/bizq-worker /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 bizq
COPY --from=build /out/ /usr/local/bin/
COPY config/bizq.toml /etc/bizq/bizq.toml
ENV BIZQ_CONFIG=/etc/bizq/bizq.toml \
    RUST_LOG=info,sqlx=warn
USER bizq
# SIGTERM drains the worker: no new claims, running tasks get worker.shutdown_grace_seconds,
# the rest return to the queue. Give Kubernetes a terminationGracePeriodSeconds above it.
STOPSIGNAL SIGTERM
CMD ["bizq-worker"]
