#!/usr/bin/env bash
# Benchmarks cri-imaged's PullImage against containerd's own CRI PullImage on the
# same registry in one run and prints the ratio (benches/pull.rs, benches/concurrent.rs). Run as root.
# Knobs: BENCH_ROUNDS (default 3), BENCH_MB (default 200), BENCH_LAYERS (default 8),
# BENCH_UNPACK (auto|containerd), BENCH_BUSYBOX=0, BENCH_ONLY=reads, BENCH_LOG_DIR (debug logs).
# The issue 8 rows: BENCH_MB=210 BENCH_LAYERS=10, and BENCH_MB=1024 BENCH_LAYERS=5.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) != 0 ]]; then
  echo "bench.sh: the benchmark runs containerd; run as root: sudo $0" >&2
  exit 1
fi

scripts/install-deps.sh
[[ -x $HOME/.cargo/bin/cargo ]] && export PATH="$HOME/.cargo/bin:$PATH"

# The bench profile is the release profile; the first build takes a few minutes.
cargo bench --bench pull
# 20 pulls of one image at once against one pull, for both.
cargo bench --bench concurrent
# What the HTTP/2 edge costs (cri-imaged with and without it).
cargo bench --bench edge
