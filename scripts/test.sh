#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests under tests/, which
# start real containerd, docker-registry and cri-imaged processes (root required).
#
# Runner: plain `cargo test`. Every integration test owns its temp dirs, ports and
# processes and cleans them up in Drop, so the default parallel test threads are
# safe; cargo-nextest would add a crates.io build of the tool for no gain here.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) != 0 ]]; then
  echo "test.sh: the integration tests run containerd and runc; run as root: sudo $0" >&2
  exit 1
fi

scripts/install-deps.sh
[[ -x $HOME/.cargo/bin/cargo ]] && export PATH="$HOME/.cargo/bin:$PATH"

cargo build --all-targets
cargo test --all-targets
cargo test --doc
# The tests that unpack layers once more on the fallback path, containerd's
# Diff.Apply (`[pull] unpack = "containerd"`); the whole suite passes there too
# (CRI_IMAGED_TEST_UNPACK=containerd scripts/test.sh runs it all that way).
if [[ ${CRI_IMAGED_TEST_UNPACK:-auto} == auto ]]; then
  CRI_IMAGED_TEST_UNPACK=containerd cargo test --test pull --test faults --test errors --test warm_pull
fi
