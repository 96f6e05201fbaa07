"""k8s/: every overlay renders, passes kubernetes-validate --strict, its custom resources pass their
schemas, and the properties an operator relies on hold in the rendered output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.ops.conftest import OVERLAYS, REPO, load_script, run, tool

K8S_VERSION = "1.33.0"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
}


def _of(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _engines(docs: list[dict]) -> list[dict]:
    return [d for d in _of(docs, "Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "engine"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_strict(rendered, overlay: str) -> None:
    path, docs = rendered[overlay]
    result = run(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS]
    assert result.stdout.count("passed for resource") == len(builtin)


def test_kubernetes_validate_strict_refuses_an_unknown_field(tmp_path: Path, rendered) -> None:
    _, docs = rendered["cpu-demo"]
    deployment = json.loads(json.dumps(_of(docs, "Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = run(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(bad))
    assert result.returncode != 0 and "imagePullPolicyy" in result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_vendored_schemas(tmp_path: Path, rendered, overlay: str) -> None:
    _, docs = rendered[overlay]
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS]
    assert {d["kind"] for d in custom} >= {"ServiceMonitor", "PrometheusRule"}
    for i, doc in enumerate(custom):
        instance = tmp_path / f"{i}-{doc['kind']}.json"
        instance.write_text(json.dumps(doc))
        schema = REPO / "k8s" / "schemas" / CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
        result = run(tool("check-jsonschema"), "--schemafile", str(schema), str(instance))
        assert result.returncode == 0, result.stdout + result.stderr
        broken = json.loads(json.dumps(doc))
        broken["spec"]["unexpectedField"] = 1  # the schemas are closed: a typo fails
        instance.write_text(json.dumps(broken))
        assert run(tool("check-jsonschema"), "--schemafile", str(schema), str(instance)).returncode != 0


def test_gpu_overlay_has_keda_scaling_on_queue_depth(rendered) -> None:
    _, docs = rendered["gpu"]
    (scaled,) = _of(docs, "ScaledObject")
    targets = {d["metadata"]["name"] for d in _engines(docs)}
    assert scaled["spec"]["scaleTargetRef"]["name"] in targets
    assert "quantgate:engine_requests_waiting:max" in scaled["spec"]["triggers"][0]["metadata"]["query"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engines_are_sized_probed_and_drained(rendered, overlay: str) -> None:
    _, docs = rendered[overlay]
    engines = _engines(docs)
    assert len(engines) >= 2
    for engine in engines:
        pod = engine["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        name = engine["metadata"]["name"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], name  # Guaranteed QoS; GPUs need it anyway
        if overlay == "gpu":
            assert resources["limits"]["nvidia.com/gpu"] == "1", name
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        shm = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
        assert shm["emptyDir"]["medium"] == "Memory", name
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, name  # >= 10 min to load
        assert "ready.py" in " ".join(container["readinessProbe"]["exec"]["command"]), name
        env = {e["name"]: e.get("value") or e["valueFrom"] for e in container["env"]}
        # The engine answers /v1 only with the key the gateway holds (the same Secret's engine-key).
        assert env["VLLM_API_KEY"] == {"secretKeyRef": {"name": "quantgate-keys", "key": "engine-key"}}, name
        served = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--served-model-name="))
        assert env["SERVED_MODEL_NAME"] == served, name  # readiness checks the variant this pod serves
        assert "--scheduling-policy=priority" in container["args"], name
        assert "drain.py" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"]), name
        # The grace period covers the longest answer: max tokens x time per token, plus the drain's edges.
        notes = engine["spec"]["template"]["metadata"]["annotations"]
        longest_s = int(notes["quantgate.io/max-tokens"]) * float(notes["quantgate.io/time-per-token-ms"]) / 1000
        drain_s = float(env["DRAIN_TIMEOUT_S"])
        assert drain_s >= longest_s, name
        assert pod["terminationGracePeriodSeconds"] >= float(env["ENDPOINT_GRACE_S"]) + drain_s + 10, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_routes_across_exactly_the_engines_deployed(rendered, overlay: str) -> None:
    _, docs = rendered[overlay]
    (config,) = [c for c in _of(docs, "ConfigMap") if c["metadata"]["name"].startswith("quantgate-gateway-")]
    remote = json.loads(config["data"]["QUANTGATE_REMOTE_ENGINES"])
    services = {s["metadata"]["name"]: s for s in _of(docs, "Service")}
    served = {}
    for engine in _engines(docs):
        (container,) = engine["spec"]["template"]["spec"]["containers"]
        variant = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--served-model-name="))
        served[variant] = engine
    assert set(remote) == set(served)
    for variant, spec in remote.items():
        host = spec["url"].removeprefix("http://").split(":")[0]
        service = services[host]
        pod_labels = served[variant]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items(), variant
        assert spec["priority_scheduling"] is True
    gateway = next(d for d in _of(docs, "Deployment") if d["metadata"]["name"] == "quantgate-gateway")
    env_from = gateway["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert env_from == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    # The gateway sends the engines' key (their VLLM_API_KEY, same Secret) on every request to them.
    env = {e["name"]: e.get("valueFrom") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QUANTGATE_REMOTE_ENGINE_KEY"] == {"secretKeyRef": {"name": "quantgate-keys", "key": "engine-key"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_engines_take_traffic_from_the_gateway_only(rendered, overlay: str) -> None:
    _, docs = rendered[overlay]
    policies = _of(docs, "NetworkPolicy")
    engine_pods = [e["spec"]["template"]["metadata"]["labels"] for e in _engines(docs)]
    gateway = next(d for d in _of(docs, "Deployment") if d["metadata"]["name"] == "quantgate-gateway")
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    covering = [p for p in policies
                if all(p["spec"]["podSelector"]["matchLabels"].items() <= labels.items() for labels in engine_pods)]
    assert covering, "no NetworkPolicy selects every engine pod"
    for policy in covering:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            sources = rule["from"]
            assert sources and all(set(s) == {"podSelector"} for s in sources), "ingress from beyond the gateway"
            assert all(s["podSelector"]["matchLabels"].items() <= gateway_labels.items() for s in sources)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_has_pdb_hpa_monitoring_and_registry_storage(rendered, overlay: str) -> None:
    _, docs = rendered[overlay]
    gateway = next(d for d in _of(docs, "Deployment") if d["metadata"]["name"] == "quantgate-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    (pdb,) = _of(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = _of(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "quantgate-gateway"
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["minAvailable"]
    (monitor,) = _of(docs, "ServiceMonitor")
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics", "/metrics/engines"}
    (pvc,) = _of(docs, "PersistentVolumeClaim")
    claims = [v["persistentVolumeClaim"]["claimName"] for d in _of(docs, "Deployment") + _of(docs, "Job")
              for v in d["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims and set(claims) == {pvc["metadata"]["name"]}
    (job,) = _of(docs, "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["optimizers", "quantize"]


def test_prometheusrule_is_generated_from_the_rule_files() -> None:
    module = load_script(REPO / "deploy" / "prometheus" / "sync_k8s.py")
    committed = (REPO / "k8s" / "base" / "prometheusrule.yaml").read_text()
    assert committed == module.render(), "run `python deploy/prometheus/sync_k8s.py`"
