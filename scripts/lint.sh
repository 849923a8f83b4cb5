#!/usr/bin/env bash
# The lint gate CI runs (.ci/run): formatting, clippy on every target with warnings as errors,
# and the docs without warnings. Exits non-zero if any of the three fails, after running all.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
status=0
cargo fmt --all -- --check || { echo "lint: cargo fmt --check found a diff (run cargo fmt --all)"; status=1; }
cargo clippy --workspace --all-targets --quiet -- -D warnings || { echo "lint: clippy failed"; status=1; }
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet || { echo "lint: cargo doc warned"; status=1; }
exit "$status"
