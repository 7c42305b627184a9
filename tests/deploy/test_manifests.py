"""The Kubernetes manifests: each overlay rendered by kustomize, every object validated against the
Kubernetes schemas offline, and checked for what booting and running a cluster relies on."""

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest release the manifests promise to work on
CUSTOM_KINDS = {("cert-manager.io/v1", "Certificate"), ("cert-manager.io/v1", "Issuer")}
OVERLAYS = ["cpu", "gpu"]
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (with kustomize)")


def render(overlay: str) -> list[dict]:
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                              text=True, check=True)
    return [o for o in yaml.safe_load_all(rendered.stdout) if o]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request) -> list[dict]:
    return render(request.param)


def workloads(objects, kinds=("Deployment", "StatefulSet", "Job")) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in kinds}


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict:
    return pod_spec(workload)["containers"][0]


def env_of(workload: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(workload).get("env", [])}


def service_of(workload: dict) -> str:
    """recall, rerank or gateway for a server; index for the build."""
    args = container(workload)["args"]
    return args[1] if args[0] == "serve" else args[0]


def servers(objects) -> dict[str, dict]:
    return workloads(objects, ("Deployment", "StatefulSet"))


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_every_object_validates_against_the_kubernetes_schemas(objects):
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            assert obj["spec"], obj["metadata"]["name"]  # cert-manager's own; its CRDs are not in these schemas
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_workload_runs_unprivileged_with_resources_sized_to_its_threads(objects):
    for name, workload in workloads(objects).items():
        pod, main = pod_spec(workload), container(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert main["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                           "capabilities": {"drop": ["ALL"]}}, name
        mounts = {m["mountPath"] for m in main["volumeMounts"]}
        assert "/tmp" in mounts, name  # the root filesystem is read-only
        claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v and not v["persistentVolumeClaim"].get(
            "readOnly")] + workload["spec"].get("volumeClaimTemplates", [])
        if claims:
            assert pod["securityContext"]["fsGroup"] == 10001, name  # the volume is writable by the user
        resources = main["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], name
        threads = {k: v for k, v in env_of(workload).items() if k.endswith("_INTRA_OP_THREADS")}
        if service_of(workload) in ("recall", "rerank", "index"):
            # onnxruntime would otherwise start a thread per node core and fight over the CPUs requested.
            assert threads and all(v == str(resources["requests"]["cpu"]) for v in threads.values()), name


def test_every_server_has_probes_a_drain_and_spreads_over_nodes(objects):
    for name, workload in servers(objects).items():
        main, pod = container(workload), pod_spec(workload)
        prefix = f"TWOSTAGE_{service_of(workload).upper()}_"
        env = env_of(workload)
        # The gateway is ready by its HTTP face's /health (test_gateway_serves_http_in_the_cluster).
        probes = ("startupProbe", "livenessProbe") if service_of(workload) == "gateway" else (
            "startupProbe", "readinessProbe", "livenessProbe")
        for probe in probes:
            assert str(main[probe]["grpc"]["port"]) == env[prefix + "HEALTH_PORT"], (name, probe)
        # Alive while loading or waiting for a snapshot; SERVING only when it can answer.
        assert main["startupProbe"]["grpc"]["service"] == "liveness", name
        assert main["livenessProbe"]["grpc"]["service"] == "liveness", name
        if "grpc" in main["readinessProbe"]:
            assert "service" not in main["readinessProbe"]["grpc"], name
        pre_stop = main["lifecycle"]["preStop"]["sleep"]["seconds"]
        needed = pre_stop + float(env[prefix + "DRAIN_DELAY_S"]) + float(env[prefix + "GRACE_PERIOD_S"])
        assert pod["terminationGracePeriodSeconds"] > needed, name
        term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname", name
        assert selects(term["podAffinityTerm"]["labelSelector"], workload["spec"]["template"]["metadata"]["labels"])


def test_every_tier_serves_tls_and_checks_tokens(objects):
    for name, workload in servers(objects).items():
        prefix = f"TWOSTAGE_{service_of(workload).upper()}_"
        env = env_of(workload)
        assert env[prefix + "TLS_DIR"] == "/etc/twostage/tls", name
        assert env[prefix + "AUTH_TOKENS"] == "/etc/twostage/auth/tokens", name
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        # Projected (not subPath) so that rotated certificates reach the pod without a restart.
        paths = {item["path"] for source in volumes["tls"]["projected"]["sources"] for item in source["secret"]["items"]}
        assert {"server.pem", "server.key", "ca.pem"} <= paths, name
        if service_of(workload) == "gateway":
            assert {"client.pem", "client.key"} <= paths
            assert env["TWOSTAGE_GATEWAY_STAGE_TOKEN_FILE"].startswith("/etc/twostage/")


def test_recall_replicas_call_each_other_with_their_own_token_not_the_gateways(objects):
    """A compromised recall pod must not hold the gateway's admin token (which may write and delete)."""
    gateway_secrets = set()
    for workload in servers(objects).values():
        if service_of(workload) == "gateway":
            gateway_secrets |= {v["secret"]["secretName"] for v in pod_spec(workload)["volumes"] if "secret" in v}
    recalls = [w for w in servers(objects).values() if service_of(w) == "recall"]
    assert recalls
    for workload in recalls:
        path = env_of(workload)["TWOSTAGE_RECALL_PEER_TOKEN_FILE"]
        mount = next(m for m in container(workload)["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "twostage-replica-token"
        assert volume["secret"]["secretName"] not in gateway_secrets


def test_rerank_and_gateway_autoscale_and_every_tier_has_a_disruption_budget(objects):
    scaled = {o["spec"]["scaleTargetRef"]["name"] for o in objects if o["kind"] == "HorizontalPodAutoscaler"}
    by_service = {}
    for name, workload in servers(objects).items():
        by_service.setdefault(service_of(workload), []).append(name)
    assert set(by_service["rerank"]) | set(by_service["gateway"]) <= scaled
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for name, workload in servers(objects).items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert len(covering) == 1, name  # one budget per workload: a shard's never counts another shard's pods


def test_shards_builds_and_the_gateway_agree(objects):
    shards = {name: w for name, w in servers(objects).items() if service_of(w) == "recall"}
    count = len(shards)
    assert count >= 2
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    targets = env_of(servers(objects)["gateway"])["TWOSTAGE_GATEWAY_RECALL_TARGETS"].split(",")
    assert len(targets) == count
    for i, target in enumerate(targets):
        statefulset = shards[f"recall-shard-{i}"]
        env = env_of(statefulset)
        assert env["TWOSTAGE_RECALL_SHARD"] == str(i)
        assert env["TWOSTAGE_RECALL_SNAPSHOT_DIR"].startswith("/snapshots/")
        assert env["TWOSTAGE_RECALL_PEERS"] == target  # replicas catch up from their own shard's replicas
        assert statefulset["spec"]["replicas"] >= 3  # a majority takes writes while one replica is away
        # Quorums count against the shard's size, not against the replicas that happen to resolve.
        assert env_of(servers(objects)["gateway"])["TWOSTAGE_GATEWAY_SHARD_REPLICAS"] == str(
            statefulset["spec"]["replicas"])
        service = services[statefulset["spec"]["serviceName"]]
        assert service["spec"]["clusterIP"] == "None"
        assert selects({"matchLabels": service["spec"]["selector"]}, statefulset["spec"]["template"]["metadata"]["labels"])
        assert re.fullmatch(rf"dns:///{service['metadata']['name']}\.twostage\.svc\.cluster\.local:50052", target)
    # Another shard's pods never answer for this one.
    selectors = [tuple(sorted(s["spec"]["selector"]["matchLabels"].items())) for s in shards.values()]
    assert len(set(selectors)) == count
    (build,) = [w for w in workloads(objects, ("Job",)).values() if service_of(w) == "index"]
    args = container(build)["args"]
    parts = int(next(a.split("=", 1)[1].split()[0] for a in args if a.startswith("--parts=")))
    assert build["spec"]["completionMode"] == "Indexed" and build["spec"]["completions"] == count * parts
    assert build["spec"]["suspend"] is True  # applied with everything else, it starts only once resumed
    assert f"--shards={count}" in args and "--task-index=$(JOB_COMPLETION_INDEX)" in args
    snapshot_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--snapshot-dir="))
    assert all(env_of(s)["TWOSTAGE_RECALL_SNAPSHOT_DIR"] == snapshot_dir for s in shards.values())


def test_only_the_gateway_reaches_the_stages_and_recall_replicas_each_other(objects):
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
    assert [r["from"] for p in recall_extra for r in p["spec"]["ingress"]] == [
        [{"podSelector": {"matchLabels": {"app": "twostage-recall"}}}]]


def test_the_gpu_overlay_puts_the_model_work_on_gpus():
    cpu, gpu = (workloads(render(o)) for o in OVERLAYS)
    for name in ("rerank", "index-build"):
        main = container(gpu[name])
        assert main["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert main["image"].endswith("-gpu") and not container(cpu[name])["image"].endswith("-gpu"), name
        assert "nvidia.com/gpu" not in container(cpu[name])["resources"]["limits"], name
    assert env_of(gpu["rerank"])["TWOSTAGE_RERANK_PROVIDER"] == "cuda"
    assert int(env_of(gpu["rerank"])["TWOSTAGE_RERANK_MAX_BATCH_SIZE"]) > 32  # the CPU default
    assert not container(gpu["gateway"])["image"].endswith("-gpu")


def test_the_fresh_cluster_steps_create_every_secret_a_pod_mounts(objects):
    """Each Secret a pod mounts is made by cert-manager (a Certificate) or by a step of deploy/README.md."""
    readme = (K8S.parent / "README.md").read_text()
    created = set(re.findall(r"kubectl -n twostage create secret generic (\S+)", readme))
    created |= {o["spec"]["secretName"] for o in objects if o["kind"] == "Certificate"}
    mounted = {v["secret"]["secretName"] for w in workloads(objects).values()
               for v in pod_spec(w).get("volumes", []) if "secret" in v}
    mounted |= {p["secret"]["name"] for w in workloads(objects).values() for v in pod_spec(w).get("volumes", [])
                for p in v.get("projected", {}).get("sources", []) if "secret" in p}
    assert mounted and mounted <= created, mounted - created
    # Recall-to-recall catch-up uses a replica token, not an admin one.
    assert "--role replica" in readme


def test_gateway_serves_http_in_the_cluster(objects):
    """The HTTP face: on the port the setting names, in the Service, ready by /health, let in by the policy."""
    gateway = servers(objects)["gateway"]
    main = container(gateway)
    port = int(env_of(gateway)["TWOSTAGE_GATEWAY_HTTP_PORT"])
    assert {"name": "http", "containerPort": port} in main["ports"]
    probe = main["readinessProbe"]["httpGet"]
    # TLS is on for the gateway (TLS_DIR): the probe speaks it.
    assert (probe["path"], probe["port"], probe["scheme"]) == ("/health", "http", "HTTPS")
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "gateway")
    assert {"name": "http", "port": port, "targetPort": "http"} in service["spec"]["ports"]
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy"
                  and selects(o["spec"]["podSelector"], gateway["spec"]["template"]["metadata"]["labels"]))
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]}
    assert {"grpc", "http"} <= open_ports


MONITORING = K8S.parent / "monitoring"
MONITORING_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> list[dict]:
    """The CPU overlay with the monitoring and tracing components, as an operator's overlay adds them."""
    import os

    overlay = tmp_path_factory.mktemp("monitored")
    relative = [os.path.relpath(path, overlay) for path in (K8S / "overlays" / "cpu", MONITORING, MONITORING / "tracing")]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": relative[:1], "components": relative[1:]}))
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(rendered.stdout) if o]


def test_the_monitoring_component_scrapes_every_tier_and_ships_its_rules_and_dashboard(monitored):
    import json

    plain = render("cpu")
    added = [o for o in monitored if (o["kind"], o["metadata"]["name"]) not in {(p["kind"], p["metadata"]["name"])
                                                                              for p in plain}]
    assert sorted(o["kind"] for o in added) == ["ConfigMap", "PodMonitor", "PrometheusRule"]
    for obj in added:
        assert obj["metadata"]["namespace"] == "twostage", obj["kind"]
        if (obj["apiVersion"], obj["kind"]) not in MONITORING_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    (monitor,) = [o for o in added if o["kind"] == "PodMonitor"]
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    endpoints = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for name, workload in servers(monitored).items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert expression["operator"] == "In" and labels[expression["key"]] in expression["values"], name
        assert endpoints <= {p["name"] for p in container(workload)["ports"]}, name
        assert env_of(workload)[f"TWOSTAGE_{service_of(workload).upper()}_METRICS_HOST"] == "0.0.0.0", name
    (rules,) = [o for o in added if o["kind"] == "PrometheusRule"]
    alerts = [r for group in rules["spec"]["groups"] for r in group["rules"]]
    assert all(r["alert"] and r["expr"] and r["labels"]["severity"] in ("page", "ticket") for r in alerts)
    (dashboard,) = [o for o in added if o["kind"] == "ConfigMap"]
    assert dashboard["metadata"]["labels"] == {"grafana_dashboard": "1"}
    panels = json.loads(dashboard["data"]["twostage.json"])["panels"]
    assert {p["title"].split(":")[0] for p in panels if p["type"] == "timeseries"} >= {"Gateway", "Recall", "Rerank"}


def test_the_tracing_component_names_each_tier_and_samples_at_the_gateway(monitored):
    names = set()
    for name, workload in servers(monitored).items():
        env = env_of(workload)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://") and env["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(
            ":4317"), name
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio", name  # the stages follow the gateway
        assert env["OTEL_SERVICE_NAME"] == f"twostage-{service_of(workload)}", name
        names.add(env["OTEL_SERVICE_NAME"])
    assert names == {"twostage-gateway", "twostage-recall", "twostage-rerank"}
    for name, workload in servers(render("cpu")).items():
        assert not any(k.startswith("OTEL_") for k in env_of(workload)), name  # off unless the component is added
