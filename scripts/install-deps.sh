#!/usr/bin/env bash
# Installs what building, testing and demoing cri-imaged needs on Debian 12:
# system packages (only when one is missing, so re-runs are quick and offline) and
# a Rust toolchain (rustup) when there is no cargo. Run as root.
#
# Never installs pigz: containerd 1.6 switches to unpigz when it is present, which
# skews the benchmark that uses containerd's own pull as the baseline.
set -euo pipefail

packages=(
  containerd runc             # the store and runtime cri-imaged serves
  docker-registry             # distribution 2.8: the registry in tests and the demo
  skopeo umoci                # push test images; build the demo image
  golang-github-containers-common  # real-world registries.conf.d/shortnames.conf, policy.json
  protobuf-compiler           # protoc for containerd-client's build.rs
  apache2-utils               # htpasswd -B for the basic-auth registry
  openssl ca-certificates     # test CAs and certificates
  busybox-static              # the one binary in the test images
  gcc libc6-dev pkg-config    # linker and C compiler for ring
  golang                      # Go 1.19: builds the grpc-go client in tests/clients/go
  golang-google-grpc-dev      # grpc-go 1.33 sources (GOPATH mode): kubelet/crictl 1.26's gRPC
  golang-google-protobuf-dev  # google.golang.org/protobuf 1.28 (dynamicpb, protojson) for it
  python3-venv                # venv (pip from its bundled wheel): grpcio client, deploy/ checks
  systemd                     # systemd-analyze verify/security on deploy/'s units
  prometheus                  # promtool check metrics, and a real Prometheus scraping the daemon in tests
  tmux                        # a real terminal for the `cri-imaged pulls --watch` test
)

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for package in "${packages[@]}"; do
  installed "$package" || missing+=("$package")
done

if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "install-deps: missing ${missing[*]}; run as root: sudo $0" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
fi

if installed pigz; then
  echo "install-deps: warning: pigz is installed; containerd 1.6 then unpacks with" \
    "unpigz, which skews benchmarks against it (apt-get remove pigz)" >&2
fi

# Debian 12's rustc (1.63) is older than the crate's rust-version; use rustup.
if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
  echo "install-deps: no cargo; installing Rust with rustup (stable, minimal + clippy, rustfmt)"
  installed curl || { apt-get update -q && apt-get install -y -q --no-install-recommends curl </dev/null; }
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
    sh -s -- -y --profile minimal --component clippy,rustfmt </dev/null
  export PATH="$HOME/.cargo/bin:$PATH"
fi
cargo --version
