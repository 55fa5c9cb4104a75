#!/usr/bin/env bash
# Demo: a private image on a TLS + basic-auth registry, pulled by cri-imaged over its
# CRI socket with credentials found through a glob key in the node's config.json (as
# kubelet reads it), listed, then run by containerd, which never pulled it.
# Everything lives in a temp dir and is stopped and removed on exit. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) != 0 ]]; then
  echo "demo.sh: containerd and runc need root: sudo $0" >&2
  exit 1
fi

scripts/install-deps.sh
[[ -x $HOME/.cargo/bin/cargo ]] && export PATH="$HOME/.cargo/bin:$PATH"
cargo build --bin cri-imaged
bin=$PWD/target/debug/cri-imaged

tmp=$(mktemp -d /tmp/cri-imaged-demo.XXXXXX)
pids=()

cleanup() {
  local status=$?
  set +e
  # Stop in reverse start order: cri-imaged, containerd, registry.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null
    for _ in $(seq 50); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${pids[i]}" 2>/dev/null
    wait "${pids[i]}" 2>/dev/null
  done
  # Shims of our containerd carry its socket path; a finished `ctr run --rm` leaves none.
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $tmp/" || true); do
    kill -KILL "$pid" 2>/dev/null
  done
  awk -v dir="$tmp/" 'index($5, dir) == 1 { print $5 }' /proc/self/mountinfo |
    sort -r | while read -r mnt; do umount -l "$mnt"; done
  rm -rf "$tmp"
  if ((status != 0)); then
    echo "demo failed (exit $status)" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '+ %s\n' "$*"; "$@"; }

# wait_for WHAT SECONDS PID COMMAND...: polls COMMAND until it succeeds; fails if PID
# exits first or SECONDS pass.
wait_for() {
  local what=$1 seconds=$2 pid=$3
  shift 3
  for _ in $(seq $((seconds * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$what exited; its log:" >&2
      cat "$tmp/$what.log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "$what not ready after ${seconds}s; its log:" >&2
  cat "$tmp/$what.log" >&2
  return 1
}

user=demo
pass=demo-$(openssl rand -hex 8)

say "A throwaway CA and a certificate for 127.0.0.1"
cat >"$tmp/openssl.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = cri-imaged demo
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
CNF
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/ca.key" 2>/dev/null
openssl req -new -x509 -days 1 -config "$tmp/openssl.cnf" -extensions ca \
  -subj "/CN=cri-imaged demo CA" -key "$tmp/ca.key" -out "$tmp/ca.crt"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/registry.key" 2>/dev/null
openssl req -new -config "$tmp/openssl.cnf" -subj /CN=127.0.0.1 \
  -key "$tmp/registry.key" -out "$tmp/registry.csr"
openssl x509 -req -days 1 -set_serial 2 -in "$tmp/registry.csr" -CA "$tmp/ca.crt" \
  -CAkey "$tmp/ca.key" -extfile "$tmp/openssl.cnf" -extensions server \
  -out "$tmp/registry.crt" 2>/dev/null
mkdir -p "$tmp/certs" && cp "$tmp/ca.crt" "$tmp/certs/ca.crt"
echo "CA: $tmp/ca.crt"

say "docker-registry with TLS and htpasswd (user $user)"
htpasswd -Bbn "$user" "$pass" >"$tmp/htpasswd"
cat >"$tmp/registry.yml" <<YML
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $tmp/registry-data
http:
  addr: 127.0.0.1:0
  secret: cri-imaged-demo
  tls:
    certificate: $tmp/registry.crt
    key: $tmp/registry.key
auth:
  htpasswd:
    realm: cri-imaged-demo
    path: $tmp/htpasswd
YML
docker-registry serve "$tmp/registry.yml" >"$tmp/registry.log" 2>&1 &
pids+=($!)
# Port 0: the registry picks a free port and logs it.
wait_for registry 30 "${pids[-1]}" grep -q 'listening on 127.0.0.1:' "$tmp/registry.log"
port=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$tmp/registry.log" | head -n1 | cut -d: -f2)
registry=127.0.0.1:$port
image=$registry/demo/private:v1
echo "registry: https://$registry"

say "A private image (busybox-static) built with umoci, pushed with skopeo"
umoci init --layout "$tmp/layout"
umoci new --image "$tmp/layout:v1"
umoci unpack --image "$tmp/layout:v1" "$tmp/bundle" >/dev/null
rootfs=$tmp/bundle/rootfs
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp"
cp /bin/busybox "$rootfs/bin/busybox"
for applet in sh echo cat id true ls; do ln -s busybox "$rootfs/bin/$applet"; done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
  >"$rootfs/etc/passwd"
echo "this file came from a private registry" >"$rootfs/hello.txt"
umoci repack --image "$tmp/layout:v1" "$tmp/bundle"
umoci config --image "$tmp/layout:v1" --config.cmd /bin/sh
echo "+ skopeo --insecure-policy copy --dest-cert-dir $tmp/certs --dest-creds $user:<password> oci:$tmp/layout:v1 docker://$image"
skopeo --insecure-policy copy --quiet --dest-cert-dir "$tmp/certs" \
  --dest-creds "$user:$pass" "oci:$tmp/layout:v1" "docker://$image"
echo "pushed $image"

say "containerd (own root, state and socket; its CRI plugin on)"
mkdir -p "$tmp/containerd/"{root,state,opt,cni/conf,cni/bin,certs.d}
sock=$tmp/containerd/containerd.sock
cat >"$tmp/containerd/config.toml" <<TOML
version = 2
root = "$tmp/containerd/root"
state = "$tmp/containerd/state"
[grpc]
  address = "$sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$tmp/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$tmp/containerd/cni/bin"
    conf_dir = "$tmp/containerd/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$tmp/containerd/certs.d"
TOML
containerd --config "$tmp/containerd/config.toml" >"$tmp/containerd.log" 2>&1 &
pids+=($!)
wait_for containerd 60 "${pids[-1]}" grep -q 'Start streaming server' "$tmp/containerd.log"
ctr() { command ctr --address "$sock" "$@"; }
echo "containerd: $sock"

say "cri-imaged, trusting the registry CA as ca.d/127.0.0.1..$port"
mkdir -p "$tmp/cri-imaged/ca.d" "$tmp/cri-imaged/kubelet"
cp "$tmp/ca.crt" "$tmp/cri-imaged/ca.d/127.0.0.1..$port"
# The node's credentials, where kubelet looks first: {root-dir}/config.json. The key
# is a glob with a path prefix: `*` stands for one host label, `/demo` for every
# repository under demo/.
key="127.0.0.*:$port/demo"
auth=$(printf '%s:%s' "$user" "$pass" | base64 -w0)
printf '{"auths": {"%s": {"auth": "%s"}}}\n' "$key" "$auth" >"$tmp/cri-imaged/kubelet/config.json"
echo "$tmp/cri-imaged/kubelet/config.json: {\"auths\": {\"$key\": {\"auth\": \"<base64 $user:password>\"}}}"
: >"$tmp/cri-imaged/registries.conf"
cri_sock=$tmp/cri-imaged/cri-imaged.sock
cat >"$tmp/cri-imaged/config.toml" <<TOML
[server]
listen = "$cri_sock"

[containerd]
address = "$sock"
namespace = "k8s.io"
snapshotter = "overlayfs"

[registry]
registries_conf = "$tmp/cri-imaged/registries.conf"
ca_dir = "$tmp/cri-imaged/ca.d"

[credentials]
kubelet_root_dir = "$tmp/cri-imaged/kubelet"
TOML
cat "$tmp/cri-imaged/config.toml"
"$bin" --config "$tmp/cri-imaged/config.toml" >"$tmp/cri-imaged.log" 2>&1 &
pids+=($!)
wait_for cri-imaged 30 "${pids[-1]}" test -S "$cri_sock"
endpoint=unix://$cri_sock

say "Which credentials a pull would try, in order (never the secrets)"
show "$bin" explain --config "$tmp/cri-imaged/config.toml" "$image"

say "Pull over the CRI socket; the credentials come from the glob key"
show "$bin" pull --image-endpoint "$endpoint" "$image"
grep -F ' pulled ' "$tmp/cri-imaged.log" | sed 's/^/  log: /' 

say "List images over the CRI socket"
show "$bin" images --image-endpoint "$endpoint"

say "containerd's view (namespace k8s.io): records written by cri-imaged"
show ctr -n k8s.io images ls
show ctr -n k8s.io images check --snapshotter overlayfs

say "Run it with containerd"
# runc's root in our temp dir: its default (/run/containerd/runc) is shared host-wide.
show ctr -n k8s.io run --rm --runc-root "$tmp/containerd/state/runc" "$image" demo /bin/sh -c 'echo "hello from $(cat /hello.txt)"'

if grep -qF -e "$pass" -e "$auth" "$tmp/cri-imaged.log"; then
  echo "the password appears in cri-imaged's log" >&2
  exit 1
fi
say "Done; cleaning up $tmp"
