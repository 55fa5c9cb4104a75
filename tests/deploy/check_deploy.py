"""Offline checks of deploy/: every YAML document parsed and checked against the
Kubernetes kind it declares, the objects checked against each other, and the
Dockerfile's stages. Run by tests/deploy.rs in a venv holding requirements.txt.

    check_deploy.py DEPLOY_DIR CARGO_TOML

CARGO_TOML's directory is the Dockerfile's build context.

Kinds with an upstream schema (ConfigMap, DaemonSet, Service, ...) are validated
strictly (unknown fields refused) by kubernetes-validate against the oldest
Kubernetes the kubelet snippet supports (1.27, imageServiceEndpoint in the
KubeletConfiguration) and the newest it bundles. Kinds it has no schema for are
checked here by hand: ServiceMonitor (the required fields and shapes of
prometheus-operator's CRD), KubeletConfiguration and CredentialProviderConfig
(the fields used; cri-imaged check-config loads the latter itself), Kustomization.
A document of any other kind fails. Prints one line per finding; exits 1 if any
check failed.
"""

import re
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml
from dockerfile_parse import DockerfileParser

# kubelet reads imageServiceEndpoint from its config file from 1.27 on.
K8S_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
CRI_IMAGED_SOCKET = "unix:///run/cri-imaged/cri-imaged.sock"
CONTAINERD_SOCKET = "unix:///run/containerd/containerd.sock"
# Host paths the DaemonSet must mount: containerd's socket (its directory) and
# root, kubelet's root dir, /etc/containers, and the directory of our socket.
REQUIRED_HOST_PATHS = {
    "/run/containerd": None,
    "/var/lib/containerd": "/var/lib/containerd",
    "/var/lib/kubelet": "/var/lib/kubelet",
    "/etc/containers": "/etc/containers",
    "/run/cri-imaged": "/run/cri-imaged",
}
BINARY = "/usr/local/bin/cri-imaged"

failures = []
passes = []


def fail(where, what):
    failures.append(f"FAIL {where}: {what}")


def ok(where, what):
    passes.append(f"ok   {where}: {what}")


def get(obj, *path, default=None):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def matches(selector, labels):
    """A matchLabels selector (the only form used here) against a label map."""
    wanted = (selector or {}).get("matchLabels", selector or {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


# --- kinds without an upstream schema ------------------------------------------

DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
SERVICE_MONITOR_SPEC = {
    "attachMetadata", "bodySizeLimit", "endpoints", "fallbackScrapeProtocol",
    "jobLabel", "keepDroppedTargets", "labelLimit", "labelNameLengthLimit",
    "labelValueLengthLimit", "namespaceSelector", "nativeHistogramBucketLimit",
    "nativeHistogramMinBucketFactor", "podTargetLabels", "sampleLimit",
    "scrapeClass", "scrapeClassicHistograms", "scrapeProtocols", "selector",
    "selectorMechanism", "targetLabels", "targetLimit",
}
SERVICE_MONITOR_ENDPOINT = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret",
    "enableHttp2", "filterRunning", "followRedirects", "honorLabels",
    "honorTimestamps", "interval", "metricRelabelings", "noProxy", "oauth2",
    "params", "path", "port", "proxyConnectHeader", "proxyFromEnvironment",
    "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort",
    "tlsConfig", "trackTimestampsStaleness",
}
RELABEL = {"action", "modulus", "regex", "replacement", "separator", "sourceLabels", "targetLabel"}


def check_service_monitor(where, doc):
    """prometheus-operator's ServiceMonitor CRD (monitoring.coreos.com/v1): spec and
    spec.selector are required; endpoints need a port (name) or targetPort;
    intervals are Prometheus durations; unknown fields are refused, as the CRD's
    structural schema prunes them."""
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return fail(where, "ServiceMonitor: spec is required")
    if unknown := set(spec) - SERVICE_MONITOR_SPEC:
        fail(where, f"ServiceMonitor: unknown spec fields {sorted(unknown)}")
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        fail(where, "ServiceMonitor: spec.selector (matchLabels or matchExpressions) is required")
    names = get(spec, "namespaceSelector", "matchNames", default=[])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        fail(where, "ServiceMonitor: spec.namespaceSelector.matchNames is a list of names")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return fail(where, "ServiceMonitor: spec.endpoints lists at least one endpoint")
    for i, ep in enumerate(endpoints):
        at = f"ServiceMonitor spec.endpoints[{i}]"
        if not isinstance(ep, dict):
            fail(where, f"{at} is not a mapping")
            continue
        if unknown := set(ep) - SERVICE_MONITOR_ENDPOINT:
            fail(where, f"{at}: unknown fields {sorted(unknown)}")
        if not ep.get("port") and not ep.get("targetPort"):
            fail(where, f"{at}: port or targetPort is required")
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not DURATION.match(str(ep[key])):
                fail(where, f"{at}.{key}: {ep[key]!r} is not a Prometheus duration")
        for j, r in enumerate(ep.get("relabelings", [])):
            if not isinstance(r, dict) or set(r) - RELABEL:
                fail(where, f"{at}.relabelings[{j}]: unknown fields")
    ok(where, "ServiceMonitor required fields and shapes (by hand)")


def check_kubelet_configuration(where, doc):
    """The two endpoint fields (KubeletConfiguration v1beta1, Kubernetes 1.27+)."""
    if doc.get("apiVersion") != "kubelet.config.k8s.io/v1beta1":
        fail(where, "KubeletConfiguration: apiVersion must be kubelet.config.k8s.io/v1beta1")
    if unknown := set(doc) - {"apiVersion", "kind", "containerRuntimeEndpoint", "imageServiceEndpoint"}:
        fail(where, f"KubeletConfiguration: fields beyond the snippet's {sorted(unknown)}")
    if doc.get("imageServiceEndpoint") != CRI_IMAGED_SOCKET:
        fail(where, f"imageServiceEndpoint must be {CRI_IMAGED_SOCKET}")
    if doc.get("containerRuntimeEndpoint") != CONTAINERD_SOCKET:
        fail(where, f"containerRuntimeEndpoint must stay on containerd ({CONTAINERD_SOCKET})")
    ok(where, "KubeletConfiguration endpoints (by hand)")


def check_credential_provider_config(where, doc):
    """kubelet's CredentialProviderConfig; cri-imaged check-config loads it fully."""
    if doc.get("apiVersion") not in ("kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1"):
        fail(where, "CredentialProviderConfig: apiVersion must be kubelet.config.k8s.io/v1 (or v1beta1)")
    providers = doc.get("providers")
    if not isinstance(providers, list) or not providers:
        return fail(where, "CredentialProviderConfig: providers is required")
    for i, p in enumerate(providers):
        for key in ("name", "matchImages", "defaultCacheDuration", "apiVersion"):
            if key not in p:
                fail(where, f"providers[{i}].{key} is required")
    ok(where, "CredentialProviderConfig required fields (by hand; check-config loads it)")


def check_kustomization(where, doc, path):
    listed = doc.get("resources", [])
    for name in listed:
        if not (path.parent / name).is_file():
            fail(where, f"Kustomization lists {name}, which does not exist")
    others = {p.name for p in path.parent.glob("*.yaml") if p != path}
    if missing := others - set(listed):
        fail(where, f"Kustomization leaves out {sorted(missing)}")
    ok(where, "Kustomization resources exist and cover the directory (by hand)")


HAND_CHECKED = {
    "ServiceMonitor": check_service_monitor,
    "KubeletConfiguration": check_kubelet_configuration,
    "CredentialProviderConfig": check_credential_provider_config,
}

REGISTRIES_D_ENTRY = {
    "lookaside", "lookaside-staging", "sigstore", "sigstore-staging",
    "use-sigstore-attachments", "use-cosign-attachments",
}


def check_registries_d(where, doc):
    """containers-registries.d(5) (not a Kubernetes object; check-config loads it)."""
    if unknown := set(doc) - {"default-docker", "docker"}:
        fail(where, f"registries.d: unknown top-level keys {sorted(unknown)}")
    entries = [doc.get("default-docker") or {}] + list((doc.get("docker") or {}).values())
    for entry in entries:
        if unknown := set(entry) - REGISTRIES_D_ENTRY:
            fail(where, f"registries.d: unknown keys {sorted(unknown)}")
    ok(where, "registries.d keys (by hand; check-config loads it)")


# --- every YAML file -------------------------------------------------------------

def load_yaml(deploy):
    objects = []
    for path in sorted(list(deploy.rglob("*.yaml")) + list(deploy.rglob("*.yml"))):
        where = str(path.relative_to(deploy))
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            fail(where, f"not YAML: {e}")
            continue
        if not docs:
            fail(where, "no YAML document")
        for doc in docs:
            if not isinstance(doc, dict):
                fail(where, "a document is not a mapping")
                continue
            if path.parent.name == "registries.d":
                check_registries_d(where, doc)
                continue
            kind = doc.get("kind")
            if not kind or not doc.get("apiVersion"):
                fail(where, "a document without apiVersion and kind")
                continue
            if kind == "Kustomization":
                check_kustomization(where, doc, path)
                continue
            if kind in HAND_CHECKED:
                HAND_CHECKED[kind](where, doc)
                objects.append((where, doc))
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                    ok(where, f"{kind} valid against Kubernetes {version} (strict)")
                except kubernetes_validate.SchemaNotFoundError:
                    fail(where, f"no schema for {doc['apiVersion']} {kind} and no hand check")
                    break
                except kubernetes_validate.ValidationError as e:
                    at = ".".join(map(str, e.path)) or "(top)"
                    fail(where, f"{kind} invalid against Kubernetes {version}: {at}: {e.message}")
            objects.append((where, doc))
    return objects


# --- the objects against each other ----------------------------------------------

def check_objects(objects, deploy):
    by_kind = {}
    for where, doc in objects:
        by_kind.setdefault(doc["kind"], []).append((where, doc))
    one = lambda kind: (by_kind.get(kind) or [(None, None)])[0]
    ds_where, ds = one("DaemonSet")
    svc_where, svc = one("Service")
    cm_where, cm = one("ConfigMap")
    if ds is None or svc is None or cm is None:
        return fail("kubernetes/", "needs a DaemonSet, a Service and a ConfigMap")
    pod = get(ds, "spec", "template")
    labels = get(pod, "metadata", "labels", default={})
    spec = pod["spec"]
    containers = spec["containers"]
    container = containers[0]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    if not matches(get(ds, "spec", "selector"), labels):
        fail(ds_where, "spec.selector does not match the pod template's labels")
    # Mounts name volumes (the schema cannot check that) and reach the host paths.
    mounted = {}
    for m in container.get("volumeMounts", []):
        v = volumes.get(m["name"])
        if v is None:
            fail(ds_where, f"volumeMount {m['name']} names no volume")
        elif "hostPath" in v:
            mounted[v["hostPath"]["path"]] = (m["mountPath"], m.get("readOnly", False))
    for host, inside in REQUIRED_HOST_PATHS.items():
        if host not in mounted:
            fail(ds_where, f"no hostPath volume for {host}")
        elif inside and mounted[host][0] != inside:
            fail(ds_where, f"{host} must be mounted at the same path (config.toml names it)")
    for rw in ("/var/lib/containerd", "/run/containerd", "/run/cri-imaged"):
        if rw in mounted and mounted[rw][1]:
            fail(ds_where, f"{rw} must be writable")
    if not get(container, "securityContext", "privileged"):
        fail(ds_where, "the container must be privileged (it writes containerd's root)")
    if not spec.get("hostNetwork"):
        fail(ds_where, "hostNetwork: pulls must work before the pod network does")
    config_volume = next((v for v in volumes.values() if "configMap" in v), None)
    if get(config_volume, "configMap", "name") != get(cm, "metadata", "name"):
        fail(ds_where, "the config volume does not name the ConfigMap")
    ok(ds_where, "selector, volume mounts, host paths, privileges, ConfigMap reference")

    # Metrics: annotations, container port, Service and ServiceMonitor agree.
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    notes = get(pod, "metadata", "annotations", default={})
    if notes.get("prometheus.io/scrape") != "true":
        fail(ds_where, "pod annotation prometheus.io/scrape: \"true\" is missing")
    if str(ports.get("metrics")) != notes.get("prometheus.io/port"):
        fail(ds_where, "prometheus.io/port does not equal the metrics container port")
    if notes.get("prometheus.io/path") != "/metrics":
        fail(ds_where, "prometheus.io/path must be /metrics")
    if get(svc, "spec", "clusterIP") != "None":
        fail(svc_where, "the metrics Service must be headless (clusterIP: None)")
    if not matches(get(svc, "spec", "selector"), labels):
        fail(svc_where, "selector does not match the DaemonSet's pods")
    svc_ports = {p.get("name"): p for p in get(svc, "spec", "ports", default=[])}
    metrics = svc_ports.get("metrics")
    if metrics is None or metrics.get("targetPort") not in ("metrics", ports.get("metrics")):
        fail(svc_where, "port `metrics` must target the container's metrics port")
    for where, sm in by_kind.get("ServiceMonitor", []):
        if not matches(get(sm, "spec", "selector"), get(svc, "metadata", "labels", default={})):
            fail(where, "selector does not match the Service's labels")
        if svc["metadata"]["namespace"] not in get(sm, "spec", "namespaceSelector", "matchNames", default=[svc["metadata"]["namespace"]]):
            fail(where, "namespaceSelector leaves out the Service's namespace")
        for ep in get(sm, "spec", "endpoints", default=[]):
            if ep.get("port") and ep["port"] not in svc_ports:
                fail(where, f"endpoint port {ep['port']} is not a Service port name")
    if "ServiceMonitor" not in by_kind:
        fail("kubernetes/", "no ServiceMonitor")
    ok(svc_where, "metrics annotations, headless Service and ServiceMonitor agree")

    # The config the pod reads: TOML, its socket is kubelet's endpoint and metrics
    # listen on the port the annotations, Service and ServiceMonitor name.
    text = get(cm, "data", "config.toml")
    try:
        config = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as e:
        return fail(cm_where, f"config.toml is not TOML: {e}")
    listen = get(config, "server", "listen", default="/run/cri-imaged/cri-imaged.sock")
    if f"unix://{listen}" != CRI_IMAGED_SOCKET:
        fail(cm_where, f"[server] listen {listen} is not kubelet's endpoint {CRI_IMAGED_SOCKET}")
    metrics_listen = get(config, "metrics", "listen", default="")
    if metrics_listen.rsplit(":", 1)[-1] != str(ports.get("metrics")):
        fail(cm_where, f"[metrics] listen {metrics_listen!r} is not on the container's metrics port {ports.get('metrics')}")
    if container.get("args", [])[-1:] != ["/etc/cri-imaged/config.toml"]:
        fail(ds_where, "args must end with the mounted config path")
    for probe in ("readinessProbe", "livenessProbe"):
        command = get(container, probe, "exec", "command", default=[])
        if command[:1] != [BINARY] or CRI_IMAGED_SOCKET not in command:
            fail(ds_where, f"{probe} must run {BINARY} against {CRI_IMAGED_SOCKET}")
    ok(cm_where, "config.toml parses, serves kubelet's endpoint and metrics on the metrics port")

    # The flags file says what the config snippet says.
    flags = (deploy / "kubelet" / "kubelet-flags.env").read_text()
    for flag in (f"--image-service-endpoint={CRI_IMAGED_SOCKET}",
                 f"--container-runtime-endpoint={CONTAINERD_SOCKET}"):
        if flag not in flags:
            fail("kubelet/kubelet-flags.env", f"missing {flag}")
    ok("kubelet/kubelet-flags.env", "the same endpoints as kubelet-config.yaml")
    return container


# --- the Dockerfile --------------------------------------------------------------

def check_dockerfile(deploy, cargo_toml, container):
    where = "Dockerfile"
    path = deploy / "Dockerfile"
    parser = DockerfileParser(path=str(path))
    stages = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            parts = ins["value"].split()
            name = parts[2] if len(parts) == 3 and parts[1].lower() == "as" else None
            stages.append({"image": parts[0], "name": name, "ins": []})
        elif stages:
            stages[-1]["ins"].append((ins["instruction"], ins["value"]))
    if len(stages) < 2:
        return fail(where, f"{len(stages)} stage(s): must be multi-stage (builder, final)")
    builder, final = stages[0], stages[-1]
    runs = " ".join(v for i, v in builder["ins"] if i == "RUN")
    if not builder["image"].startswith("rust:"):
        fail(where, f"builder stage is {builder['image']}, not a rust image")
    else:
        tag = re.match(r"rust:(\d+)\.(\d+)", builder["image"])
        wanted = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', cargo_toml.read_text(), re.M)
        if tag and wanted and tuple(map(int, tag.groups())) < tuple(map(int, wanted.groups())):
            fail(where, f"{builder['image']} is older than the crate's rust-version")
    if "protobuf-compiler" not in runs:
        fail(where, "builder stage must install protobuf-compiler (protoc for build.rs)")
    if not re.search(r"cargo build [^&]*--release[^&]*--bin cri-imaged", runs):
        fail(where, "builder stage must run `cargo build --release ... --bin cri-imaged`")
    if not (re.match(r"debian:[a-z]+-slim$", final["image"]) or final["image"].startswith("gcr.io/distroless/cc")):
        fail(where, f"final image {final['image']} is not minimal (debian:*-slim or distroless/cc)")
    copies = [v.split() for i, v in final["ins"] if i == "COPY"]
    from_builder = [c for c in copies if c[0] in (f"--from={builder['name']}", "--from=0")]
    if not any(c[-2].endswith("/cri-imaged") and c[-1] == BINARY for c in from_builder):
        fail(where, f"final stage must COPY the binary from the builder stage to {BINARY}")
    # `docker build -f deploy/Dockerfile .` from the repository root.
    context = cargo_toml.parent
    for c in copies:
        if not c[0].startswith("--from") and not (context / c[0]).exists():
            fail(where, f"COPY source {c[0]} does not exist in the build context")
    entry = [v for i, v in final["ins"] if i == "ENTRYPOINT"]
    if not entry or BINARY not in entry[-1]:
        fail(where, f"ENTRYPOINT must run {BINARY}")
    if any(i == "USER" and v.split(":")[0] not in ("root", "0") for i, v in final["ins"]):
        fail(where, "USER: cri-imaged writes containerd's root and must run as root")
    exposed = [v for i, v in final["ins"] if i == "EXPOSE"]
    if container is not None:
        port = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == "metrics"), None)
        if str(port) not in exposed:
            fail(where, f"EXPOSE does not name the DaemonSet's metrics port {port}")
    ok(where, f"{len(stages)} stages: {builder['image']} builds cri-imaged with protoc; "
              f"{final['image']} copies {BINARY} from it")


def main():
    deploy, cargo_toml = Path(sys.argv[1]), Path(sys.argv[2])
    objects = load_yaml(deploy)
    container = check_objects(objects, deploy)
    check_dockerfile(deploy, cargo_toml, container)
    for line in passes + failures:
        print(line)
    print(f"kubernetes-validate {kubernetes_validate.__version__}, schemas for {', '.join(K8S_VERSIONS)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
