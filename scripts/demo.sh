#!/usr/bin/env bash
# scripts/demo.sh — the local demo: a private PostgreSQL (unless $DATABASE_URL is set), the
# migrations, the demo workspace, a batch of tasks, one scheduler and two workers, a summary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATABASE_URL="$(scripts/db.sh url)"
export DATABASE_URL
cargo build --release --bins --locked
exec target/release/bizq demo "$@"
