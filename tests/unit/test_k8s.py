"""The Kubernetes manifests (deploy/k8s), checked offline: every object against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors), every Floodwall
config they carry through Floodwall's own validation and `envoy --mode validate`, probes on
every container, and selectors and scale targets that point at real workloads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.cli import validate_envoy
from proxy.config import REPO_ROOT, load_config
from proxy.process import build_chain

K8S = REPO_ROOT / "deploy" / "k8s"
VERSION = "1.30.0"
WORKLOADS = ("Deployment", "StatefulSet")


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


DOCS = _docs()


def test_the_modes_are_all_there() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in DOCS}
    for wanted in [("Deployment", "floodwall-gateway"), ("Deployment", "model-service"),
                   ("Deployment", "triton"), ("StatefulSet", "floodwall-redis"),
                   ("Deployment", "floodwall-worker"), ("PodDisruptionBudget", "floodwall-gateway"),
                   ("HorizontalPodAutoscaler", "floodwall-gateway"),
                   ("HorizontalPodAutoscaler", "floodwall-worker")]:  # fmt: skip
        assert wanted in kinds


@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[w for w, _ in DOCS])
def test_valid_against_the_kubernetes_schema(where: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_probes_on_every_container() -> None:
    for where, doc in DOCS:
        if doc["kind"] not in WORKLOADS:
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{where}: {c['name']}"


def test_selectors_and_targets_point_at_workloads() -> None:
    labels = {
        (d["kind"], d["metadata"]["name"]): d["spec"]["template"]["metadata"]["labels"]
        for _, d in DOCS
        if d["kind"] in WORKLOADS
    }

    def selects(sel: dict[str, str]) -> bool:
        return any(sel.items() <= lab.items() for lab in labels.values())

    for where, d in DOCS:
        if d["kind"] == "Service":
            assert selects(d["spec"]["selector"]), where
        elif d["kind"] == "PodDisruptionBudget":
            assert selects(d["spec"]["selector"]["matchLabels"]), where
        elif d["kind"] == "HorizontalPodAutoscaler":
            ref = d["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) in labels, where


@pytest.mark.parametrize(
    "where", [w for w, d in DOCS if d["kind"] == "ConfigMap" and "floodwall.yaml" in d["data"]]
)
def test_floodwall_configs_load_and_render_a_valid_envoy_config(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = next(d for w, d in DOCS if w == where)
    for i, var in enumerate(("FLOODWALL_APP_KEY_SHA256", "FLOODWALL_WORKER_KEY_SHA256")):
        monkeypatch.setenv(var, str(i) * 64)  # the Secret's digests, distinct
    path = tmp_path / "floodwall.yaml"
    path.write_text(doc["data"]["floodwall.yaml"])
    cfg = load_config(path)
    build_chain(cfg)  # every filter's params validate
    assert cfg.runtime_dir is not None
    os.makedirs(tmp_path / "run", exist_ok=True)
    cfg = cfg.model_copy(update={"runtime_dir": tmp_path / "run"})
    assert validate_envoy(cfg) is None


def _pods() -> list[tuple[str, dict[str, Any]]]:
    return [(w, d["spec"]["template"]["spec"]) for w, d in DOCS if d["kind"] in WORKLOADS]


def _configs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    for i, var in enumerate(("FLOODWALL_APP_KEY_SHA256", "FLOODWALL_WORKER_KEY_SHA256")):
        monkeypatch.setenv(var, str(i) * 64)
    out = {}
    for _, d in DOCS:
        if d["kind"] == "ConfigMap" and "floodwall.yaml" in d["data"]:
            path = tmp_path / f"{d['metadata']['name']}.yaml"
            path.write_text(d["data"]["floodwall.yaml"])
            out[d["metadata"]["name"]] = load_config(path)
    return out


def test_what_pods_mount_and_read_exists() -> None:
    # The Triton pods claimed a volume nothing defined (they stayed Pending).
    defined = {(d["kind"], d["metadata"]["name"]) for _, d in DOCS}
    for where, pod in _pods():
        for v in pod.get("volumes", []):
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in defined, f"{where}: {claim}"
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in defined, where
        for c in [*pod["containers"], *pod.get("initContainers", [])]:
            for ref in c.get("envFrom", []):
                assert ("Secret", ref["secretRef"]["name"]) in defined, where
            if "envoyproxy/envoy" in c["image"]:
                # The Envoy image has neither curl nor wget, and its admin is on loopback.
                for probe in ("readinessProbe", "livenessProbe"):
                    p = c[probe]
                    assert "httpGet" not in p or p["httpGet"]["port"] != 9901, where
                    assert not {"curl", "wget"} & set(str(p.get("exec", "")).split()), where


def test_the_worker_is_reachable_and_reaches_the_gateway(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Its admin server listened on 127.0.0.1 (probes on the pod IP failed: a restart loop),
    # and it called the listener address of its own config (nothing in the worker pod).
    from filters.jobs.worker import jobs_params

    cfg = _configs(monkeypatch, tmp_path)["floodwall-config"]
    p = jobs_params(cfg)
    assert p is not None
    assert p.worker.admin_address == "0.0.0.0"
    assert p.worker.gateway_url == "http://floodwall"  # the gateway Service
    assert cfg.admin.address == "127.0.0.1"  # Envoy's admin: not open to the cluster
    worker = next(pod for w, pod in _pods() if "floodwall-worker" in w)
    assert worker["containers"][0]["readinessProbe"]["httpGet"]["port"] == p.worker.admin_port
    # Only the worker's pods hold its key.
    for where, pod in _pods():
        secrets = {r["secretRef"]["name"] for c in pod["containers"] for r in c.get("envFrom", [])}
        assert ("floodwall-worker-key" in secrets) == ("floodwall-worker" in where), where
