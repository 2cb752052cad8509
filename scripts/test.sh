#!/usr/bin/env bash
# scripts/test.sh — the whole test suite, from a clean clone: formatting, lints, and every
# test against a real PostgreSQL (a private cluster started by scripts/db.sh unless
# $DATABASE_URL is set). CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DATABASE_URL="$(scripts/db.sh url)"
export DATABASE_URL
echo "test.sh: using $(echo "$DATABASE_URL" | sed -E 's#//([^:@/]+):[^@]*@#//\1:***@#')"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fleet tests run the real bizq-worker / bizq-scheduler binaries.
cargo build --workspace --bins --locked
scripts/lint-deploy.sh  # Dockerfile, compose, Kubernetes manifests; the image built from these binaries
scripts/ci-browser-deps.sh  # headless Chromium + chromedriver for the dashboard's browser tests
cargo test --workspace --locked "$@"
