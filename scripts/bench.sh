#!/usr/bin/env bash
# scripts/bench.sh — the benchmark quoted in docs/benchmark.md (release build, private PostgreSQL
# unless $DATABASE_URL is set). Extra arguments go to `bizq-bench` (see `bizq-bench --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATABASE_URL="$(scripts/db.sh url)"
export DATABASE_URL
cargo build --release --bins --locked
exec target/release/bizq-bench "$@"
