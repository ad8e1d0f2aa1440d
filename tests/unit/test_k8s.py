"""k8s/ validates offline, and the RayService serves exactly deploy/cluster.yaml's application
with deploy/ray.env's process-level switches."""

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ops import k8s
from serve.node import load_env_file

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.30.0"


def manifests() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {name: yaml.safe_load((K8S / name).read_text()) for name in kustomization["resources"]}


def strict(schema):
    """The CRD schema with unknown fields refused (kubectl's strict field validation)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(x) for x in schema]
    return schema


def rayservice() -> dict:
    return yaml.safe_load((K8S / "rayservice.yaml").read_text())


def test_rayservice_is_generated_from_deploy():
    assert (K8S / "rayservice.yaml").read_text() == k8s.render(), "stale: run python -m ops.k8s"


def test_rayservice_serves_cluster_yaml_application():
    served = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    cluster = yaml.safe_load((ROOT / "deploy" / "cluster.yaml").read_text())
    assert served["applications"] == cluster["applications"]
    assert served["proxy_location"] == cluster["proxy_location"]
    assert served["http_options"] == {"host": "0.0.0.0", "port": cluster["http_options"]["port"]}


def test_every_container_has_the_env_file_probes_limits_and_the_keys():
    ray_env = load_env_file(ROOT / "deploy" / "ray.env")
    spec = rayservice()["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert {k: env.get(k) for k in ray_env} == ray_env
            secret_refs = {e["name"] for e in c["env"] if "valueFrom" in e}
            cluster_args = yaml.safe_load((ROOT / "deploy" / "cluster.yaml").read_text())["applications"][0]["args"]
            assert {cluster_args["auth"]["api_keys_env"], cluster_args["auth"]["admin_keys_env"]} <= secret_refs
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert c["readinessProbe"]["httpGet"]["path"] == "/health"
            assert c["livenessProbe"]["httpGet"]["port"] == 52365
            assert "metrics" in {p["name"] for p in c["ports"]}
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert rayservice()["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    models = json.loads(spec["workerGroupSpecs"][0]["rayStartParams"]["resources"])
    assert models == {"loraserve_model": 1}  # the resource deploy/cluster.yaml places model servers by


def test_rayservice_validates_against_the_kuberay_crd():
    schema = json.loads((ROOT / "tests" / "schemas" / "ray.io_rayservices.v1.json").read_text())
    jsonschema.validate(rayservice(), strict(schema))
    broken = rayservice()
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}  # a typo is caught
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, strict(schema))


@pytest.mark.parametrize("name", ["secret.yaml", "networkpolicy.yaml"])
def test_core_kinds_validate_against_kubernetes_schemas(name):
    kubernetes_validate.validate(manifests()[name], KUBERNETES_VERSION, strict=True)


def test_networkpolicy_admits_only_the_serve_port_from_outside():
    policy = manifests()["networkpolicy.yaml"]["spec"]
    pods = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pods.items()
    open_rules = [r for r in policy["ingress"] if "from" not in r]
    assert [p["port"] for r in open_rules for p in r["ports"]] == [8000]
    for rule in policy["ingress"]:
        if "from" in rule and "ports" not in rule:  # all ports: only the cluster's own pods
            assert all(set(f) == {"podSelector"} and f["podSelector"]["matchLabels"].items() <= pods.items()
                       for f in rule["from"])


def test_podmonitor_scrapes_a_port_the_pods_expose():
    monitor = manifests()["podmonitor.yaml"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    pods = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pods["metadata"]["labels"].items()
    names = {p["name"] for c in pods["spec"]["containers"] for p in c["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= names


def test_secret_template_holds_the_keys_the_containers_read():
    secret = manifests()["secret.yaml"]
    refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in
            rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
            if "valueFrom" in e}
    assert refs == set(secret["stringData"]) and secret["metadata"]["name"] == k8s.SECRET
