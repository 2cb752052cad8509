"""Checks the deployment files against the schemas and against each other.

Run by scripts/lint-deploy.sh inside its venv (kubernetes-validate, jsonschema, PyYAML).
What a schema cannot see is checked here by name: the probes hit the port the config opens,
the worker's termination grace covers its drain, nothing secret is written down, the compose
services start in the right order. Exits 1 with one line per problem.
"""

import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
LINT = ROOT / "deploy" / "lint"
# Oldest and newest Kubernetes minor versions the manifests are checked against.
K8S_VERSIONS = ["1.31.0", "1.37.0"]
KEDA_SCHEMAS = {
    "ScaledObject": LINT / "keda-scaledobject.schema.json",
    "TriggerAuthentication": LINT / "keda-triggerauthentication.schema.json",
}
SECRET_NAME = re.compile(r"(PASSWORD|TOKEN|SECRET|API_KEY|DATABASE_URL)", re.I)
# Seconds between the end of the worker's shutdown grace and SIGKILL: enough to release the
# unfinished tasks to the queue and close the pool.
DRAIN_MARGIN_SECONDS = 5

problems = []


def problem(where, text):
    problems.append(f"{where}: {text}")


def load_toml(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


DEFAULTS = load_toml(ROOT / "config" / "bizq.toml")


def setting(cfg, section, key):
    """A key of a partial bizq.toml, else its default from config/bizq.toml."""
    return cfg.get(section, {}).get(key, DEFAULTS[section][key])


def port_of(addr, where):
    m = re.fullmatch(r"(?:[\d.]+|\[[0-9a-f:]+\]|[\w.-]+):(\d+)", addr or "")
    if not m:
        problem(where, f"metrics_addr {addr!r} has no port: the health probes need one")
        return None
    return int(m.group(1))


# ---- Kubernetes ------------------------------------------------------------------------------


def k8s_documents():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust.get("resources", []))
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for name in sorted(on_disk - listed):
        problem("kustomization.yaml", f"{name} is not in resources (never applied)")
    for name in sorted(listed - on_disk):
        problem("kustomization.yaml", f"resource {name} does not exist")
    for gen in kust.get("configMapGenerator", []):
        for f in gen.get("files", []):
            if not (K8S / f).is_file():
                problem("kustomization.yaml", f"configMapGenerator file {f} does not exist")
    docs = []
    for name in sorted(listed & on_disk):
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is not None:
                docs.append((name, doc))
    return kust, docs


def validate_schemas(docs):
    for name, doc in docs:
        kind = doc.get("kind")
        where = f"{name} {kind}/{doc.get('metadata', {}).get('name')}"
        if kind in KEDA_SCHEMAS:
            schema = yaml.safe_load(KEDA_SCHEMAS[kind].read_text())
            validator = jsonschema.Draft202012Validator(schema)
            for err in validator.iter_errors(doc):
                path = "/".join(str(p) for p in err.absolute_path)
                problem(where, f"KEDA schema: {path}: {err.message}")
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                problem(where, f"no Kubernetes {version} schema for {doc.get('apiVersion')} {kind}")
            except kubernetes_validate.ValidationError as err:
                path = "/".join(str(p) for p in err.path)
                problem(where, f"Kubernetes {version}: {path}: {err.message}")


def containers(doc):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec, spec.get("containers", [])


def check_pod(where, doc, cfg_map_name):
    pod, ctrs = containers(doc)
    sc = pod.get("securityContext", {})
    if not sc.get("runAsNonRoot"):
        problem(where, "pod securityContext.runAsNonRoot is not true")
    mounts_config = any(
        v.get("configMap", {}).get("name") == cfg_map_name for v in pod.get("volumes", [])
    )
    if not mounts_config:
        problem(where, f"does not mount the ConfigMap {cfg_map_name}")
    for c in ctrs:
        cw = f"{where} container {c.get('name')}"
        res = c.get("resources", {})
        for part, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
            for key in keys:
                if key not in res.get(part, {}):
                    problem(cw, f"no resources.{part}.{key}")
        env = {e["name"]: e for e in c.get("env", [])}
        if env.get("BIZQ_CONFIG", {}).get("value") != "/etc/bizq/bizq.toml":
            problem(cw, "BIZQ_CONFIG is not /etc/bizq/bizq.toml (the ConfigMap's mount)")
        if "secretKeyRef" not in env.get("DATABASE_URL", {}).get("valueFrom", {}):
            problem(cw, "DATABASE_URL does not come from a Secret (secretKeyRef)")
        for name, e in env.items():
            if SECRET_NAME.search(name) and "value" in e:
                problem(cw, f"{name} has a literal value: secrets come from the Secret")


def http_probe(where, c, kind, path, port):
    probe = c.get(kind)
    if not probe or "httpGet" not in probe:
        problem(where, f"no {kind} with httpGet")
        return
    got = probe["httpGet"]
    if got.get("path") != path:
        problem(where, f"{kind} path {got.get('path')!r}, expected {path!r}")
    p = got.get("port")
    if isinstance(p, str):
        p = {cp.get("name"): cp.get("containerPort") for cp in c.get("ports", [])}.get(p)
    if p != port:
        problem(where, f"{kind} port {got.get('port')!r} is not the metrics port {port}")


def check_kubernetes():
    kust, docs = k8s_documents()
    validate_schemas(docs)
    cfg = load_toml(K8S / "bizq.toml")
    grace = setting(cfg, "worker", "shutdown_grace_seconds")
    port = port_of(setting(cfg, "ops", "metrics_addr"), "deploy/kubernetes/bizq.toml")
    cfg_maps = [g["name"] for g in kust.get("configMapGenerator", [])]
    cfg_map = cfg_maps[0] if cfg_maps else "bizq-config"
    by_kind = {}
    for name, doc in docs:
        by_kind.setdefault(doc.get("kind"), []).append((name, doc))
    if "Secret" in by_kind:
        problem("deploy/kubernetes", "a Secret is committed; create it in the cluster instead")
    deployments = {d["metadata"]["name"]: (n, d) for n, d in by_kind.get("Deployment", [])}
    for required in ("bizq-scheduler", "bizq-worker", "bizq-dashboard"):
        if required not in deployments:
            problem("deploy/kubernetes", f"no Deployment {required}")
    for dname, (fname, doc) in deployments.items():
        check_pod(f"{fname} {dname}", doc, cfg_map)
    for fname, doc in by_kind.get("Job", []):
        check_pod(f"{fname} {doc['metadata']['name']}", doc, cfg_map)
        cmd = containers(doc)[1][0].get("command") if containers(doc)[1] else None
        if cmd != ["bizq", "migrate"]:
            problem(fname, f"the Job runs {cmd}, not bizq migrate")
    for dname in ("bizq-scheduler", "bizq-worker"):
        if dname not in deployments or port is None:
            continue
        fname, doc = deployments[dname]
        for c in containers(doc)[1]:
            where = f"{fname} {dname}"
            http_probe(where, c, "readinessProbe", "/readyz", port)
            http_probe(where, c, "livenessProbe", "/healthz", port)
    if "bizq-worker" in deployments:
        fname, doc = deployments["bizq-worker"]
        tgps = containers(doc)[0].get("terminationGracePeriodSeconds", 30)
        if tgps < grace + DRAIN_MARGIN_SECONDS:
            problem(
                fname,
                f"terminationGracePeriodSeconds {tgps} is not above worker.shutdown_grace_seconds "
                f"{grace} + {DRAIN_MARGIN_SECONDS}: SIGKILL would cut the drain",
            )
        if "replicas" in doc["spec"] and "ScaledObject" in by_kind:
            problem(fname, "sets replicas while a ScaledObject owns them (they would fight)")
    auths = {d["metadata"]["name"] for _, d in by_kind.get("TriggerAuthentication", [])}
    for fname, doc in by_kind.get("ScaledObject", []):
        target = doc["spec"]["scaleTargetRef"]["name"]
        if target != "bizq-worker":
            problem(fname, f"scales {target!r}, not the worker Deployment")
        for t in doc["spec"]["triggers"]:
            ref = t.get("authenticationRef", {}).get("name")
            if t.get("type") == "postgresql" and ref not in auths:
                problem(fname, f"trigger authenticationRef {ref!r} names no TriggerAuthentication")


# ---- docker-compose.yml ----------------------------------------------------------------------


def check_compose():
    where = "docker-compose.yml"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose.get("services", {})
    missing = [n for n in ("postgres", "migrate", "scheduler", "worker", "dashboard") if n not in services]
    for name in missing:
        problem(where, f"no service {name}")
    if missing:
        return
    cfg = load_toml(ROOT / "deploy" / "container" / "bizq.toml")
    port = port_of(setting(cfg, "ops", "metrics_addr"), "deploy/container/bizq.toml")
    grace = setting(cfg, "worker", "shutdown_grace_seconds")

    def needs(svc, dep, condition):
        got = services[svc].get("depends_on", {}).get(dep, {}).get("condition")
        if got != condition:
            problem(where, f"{svc} depends_on {dep}: condition {got!r}, expected {condition!r}")

    if "healthcheck" not in services["postgres"]:
        problem(where, "postgres has no healthcheck (migrate waits for service_healthy)")
    needs("migrate", "postgres", "service_healthy")
    for svc in ("scheduler", "worker", "dashboard"):
        needs(svc, "migrate", "service_completed_successfully")
    if services["migrate"].get("command") != ["bizq", "migrate"]:
        problem(where, "migrate does not run bizq migrate")
    if services["worker"].get("deploy", {}).get("replicas") != 2:
        problem(where, "worker does not run two replicas")
    for svc in ("scheduler", "worker"):
        test = " ".join(services[svc].get("healthcheck", {}).get("test", []))
        if f"127.0.0.1:{port}/readyz" not in test:
            problem(where, f"{svc} healthcheck does not probe /readyz on the metrics port {port}")
    cmd = services["dashboard"].get("command", [])
    if "--addr" not in cmd or not cmd[cmd.index("--addr") + 1].startswith("0.0.0.0:"):
        problem(where, "dashboard does not listen beyond loopback inside its container")
    stop = str(services["worker"].get("stop_grace_period", "10s"))
    m = re.fullmatch(r"(\d+)s", stop)
    if not m or int(m.group(1)) < grace + DRAIN_MARGIN_SECONDS:
        problem(where, f"worker stop_grace_period {stop} does not cover shutdown grace {grace}s")
    for svc, spec in services.items():
        env = spec.get("environment", {})
        if svc == "postgres" or not isinstance(env, dict):
            continue
        for name, value in env.items():
            if SECRET_NAME.search(name) and "${" not in str(value):
                problem(where, f"{svc}: {name} is written down; take it from the environment")


# ---- Dockerfile --------------------------------------------------------------------------------


def check_dockerfile():
    where = "Dockerfile"
    text = (ROOT / "Dockerfile").read_text()
    cfg = load_toml(ROOT / "deploy" / "container" / "bizq.toml")
    port = port_of(setting(cfg, "ops", "metrics_addr"), "deploy/container/bizq.toml")
    for arg, image in re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.M):
        if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            problem(where, f"{arg}={image} is not pinned to a tag")
    health = re.search(r"^HEALTHCHECK .*?CMD (.*)$", text, re.M | re.S)
    if not health or f"127.0.0.1:{port}/healthz" not in health.group(1).split("\n")[0]:
        problem(where, f"HEALTHCHECK does not probe /healthz on the metrics port {port}")
    users = re.findall(r"^USER (\S+)$", text, re.M)
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        problem(where, "the final USER is not a numeric non-root uid")


def main():
    check_kubernetes()
    check_compose()
    check_dockerfile()
    for p in problems:
        print(f"lint-deploy: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print("lint-deploy: manifests, compose file and Dockerfile are consistent")


if __name__ == "__main__":
    main()
