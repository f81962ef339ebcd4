#!/usr/bin/env bash
# The test command: installs what the tests need, builds, and runs every test of the workspace
# (unit tests of the codecs, metadata and state machine; end-to-end tests with real daemons, real
# NBD clients and real filesystems). Run as root: the filesystem tests use losetup and mount.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
echo "test: building (debug)"
cargo build --workspace --all-targets
echo "test: running all tests"
# deps.sh installed every tool the tests use: one missing fails its test instead of skipping it.
export BLOCKREP_E2E_REQUIRE_TOOLS=1
exec cargo test --workspace -- --test-threads="${TEST_THREADS:-4}"
