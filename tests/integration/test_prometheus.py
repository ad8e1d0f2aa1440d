"""A real Prometheus (Debian's package, `make prometheus-deps`) scrapes the running service with
deploy/prometheus.yml; our series pass `promtool check metrics`; every panel query of
deploy/grafana-dashboard.json returns data from that Prometheus after traffic."""

import json
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from tests.integration.conftest import REPO, free_port, tiny_adapters
from tests.waiting import wait_until

# Labels Ray itself adds to every series (its naming, not ours): kept out of promtool's lint.
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId"}
RATE_WINDOW = "30s"  # what $__rate_interval becomes here (Prometheus scrapes every second)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        subprocess.run(["make", "-s", "prometheus-deps"], cwd=REPO, check=False)
        path = shutil.which(name)
    if path is None:
        if shutil.which("apt-get") is None:
            pytest.skip(f"{name} is not installed and there is no apt-get here: install Prometheus to run this test")
        pytest.fail(f"`make prometheus-deps` did not install {name}")
    return path


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    targets = {"loraserve": service.metrics_export_port,
               "loraserve-haproxy": service.node.port("RAY_SERVE_HAPROXY_METRICS_PORT")}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    check = subprocess.run([binary("promtool"), "check", "config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = open(folder / "prometheus.log", "w")
    proc = subprocess.Popen([binary("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={folder / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url, proc), "Prometheus to be ready", timeout_s=60, every_s=0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(url: str, proc) -> bool:
    assert proc.poll() is None, "prometheus exited"
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, f"{expr}: {r.text[:300]}"
    return r.json()["data"]["result"]


def traffic(client, admin) -> None:
    """Every kind of event a panel shows: requests on several routes and adapters, an error,
    adapter loads beyond a replica's capacity (evictions), a variant, an admin call."""
    with tiny_adapters(admin, "prom") as names:
        for _ in range(3):
            for name in names:
                assert client.post("/v1/classify", json={"model": name, "input": "probe"}).status_code == 200
            assert client.post("/v1/embeddings", json={"model": "minilm", "input": ["a", "b"]}).status_code == 200
            assert client.post("/v1/embeddings", json={"model": "minilm@onnx-int8", "input": "c"}).status_code == 200
            assert client.post("/v1/classify", json={"model": "sentiment", "input": "nice"}).status_code == 200
            assert client.post("/v1/embeddings", json={"model": "no-such-model", "input": "x"}).status_code == 404


def test_promtool_accepts_our_series(service, client):
    assert client.post("/v1/embeddings", json={"model": "minilm", "input": "lint"}).status_code == 200

    def ours():
        text = httpx.get(f"http://127.0.0.1:{service.metrics_export_port}/metrics", timeout=10).text
        keep = [line for line in text.splitlines() if "ray_loraserve_" in line]
        return "\n".join(keep) + "\n" if any(line.startswith("ray_loraserve_requests_total") for line in keep) else None

    scrape = wait_until(ours, "our series on the export port", every_s=1)
    labels = set(re.findall(r'[{,]([A-Za-z_][A-Za-z0-9_]*)="', scrape))
    assert {name for name in labels if not re.fullmatch(r"[a-z_][a-z0-9_]*", name)} <= RAY_LABELS, labels
    ray_label = "(" + "|".join(sorted(RAY_LABELS)) + ')="[^"]*",?'
    scrape = re.sub(ray_label, "", scrape).replace(",}", "}")
    lint = subprocess.run([binary("promtool"), "check", "metrics"], input=scrape, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    families = {line.split()[2] for line in scrape.splitlines() if line.startswith("# TYPE")}
    assert len(families) >= 10, families


def test_prometheus_scrapes_and_every_dashboard_panel_returns_data(service, client, admin, prometheus):
    traffic(client, admin)
    def jobs_up() -> set[str]:
        return {r["metric"]["job"] for r in query(prometheus, "up") if r["value"][1] == "1"}

    wait_until(lambda: jobs_up() == {"loraserve", "loraserve-haproxy"}, "both scrape targets up",
               timeout_s=60, every_s=1)

    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    exprs = {f"{p['title']} [{t['refId']}]": t["expr"].replace("$__rate_interval", RATE_WINDOW)
             for p in dashboard["panels"] for t in p["targets"]}
    assert len(dashboard["panels"]) >= 10

    deadline = time.monotonic() + 90  # Ray exports every second; rates need two scrapes
    while True:
        missing = [name for name, expr in exprs.items() if not query(prometheus, expr)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert missing == [], f"panel queries without data: {missing}"
    # a few values that must be right, not just present
    errors = query(prometheus, f'sum by (code) (increase(ray_loraserve_request_errors_total[{RATE_WINDOW}]))')
    assert "model_not_found" in {r["metric"]["code"] for r in errors}
    replicas = {r["metric"]["deployment"]: float(r["value"][1])
                for r in query(prometheus, "sum by (deployment) (ray_serve_deployment_replica_healthy)")}
    assert replicas.get("Router", 0) >= 1
