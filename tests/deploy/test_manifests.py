"""The Kubernetes manifests, rendered by kustomize and checked for what the
security model relies on."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (with kustomize)")


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    rendered = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(rendered.stdout) if o]


def workloads(objects) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in ("Deployment", "StatefulSet")}


def env_of(workload: dict) -> dict[str, str]:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_every_tier_serves_tls_and_checks_tokens(objects):
    for name, workload in workloads(objects).items():
        prefix = f"TWOSTAGE_{name.upper()}_"
        env = env_of(workload)
        assert env[prefix + "TLS_DIR"] == "/etc/twostage/tls", name
        assert env[prefix + "AUTH_TOKENS"] == "/etc/twostage/auth/tokens", name
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        # Projected (not subPath) so that rotated certificates reach the pod without a restart.
        paths = {item["path"] for source in volumes["tls"]["projected"]["sources"] for item in source["secret"]["items"]}
        assert {"server.pem", "server.key", "ca.pem"} <= paths, name
        if name == "gateway":
            assert {"client.pem", "client.key"} <= paths
            assert env["TWOSTAGE_GATEWAY_STAGE_TOKEN_FILE"].startswith("/etc/twostage/")


def test_probes_use_the_plaintext_health_port(objects):
    for name, workload in workloads(objects).items():
        container = workload["spec"]["template"]["spec"]["containers"][0]
        health = env_of(workload)[f"TWOSTAGE_{name.upper()}_HEALTH_PORT"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                assert str(container[probe]["grpc"]["port"]) == health, (name, probe)


def test_only_the_gateway_and_the_index_build_reach_the_stages(objects):
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    stage_policies = [
        p for p in policies
        if {"twostage-recall", "twostage-rerank"} <= set(
            next((e["values"] for e in p["spec"]["podSelector"].get("matchExpressions", [])), []))
    ]
    assert len(stage_policies) == 1
    grpc_rules = [r for r in stage_policies[0]["spec"]["ingress"] if {"port": "grpc"} in r["ports"]]
    assert [r["from"] for r in grpc_rules] == [[{"podSelector": {"matchLabels": {"app": "twostage-gateway"}}}]]
    recall_extra = [p for p in policies if p["spec"]["podSelector"].get("matchLabels") == {"app": "twostage-recall"}]
    assert recall_extra[0]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {
        "app": "twostage-index-build"
    }
