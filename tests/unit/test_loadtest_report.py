"""loadtest.report (machine header with ISA flags, medians and spreads, results files without
absolute paths), loadtest.ports and the config patcher of loadtest.service; no service started."""

from __future__ import annotations

import json
import socket
import tempfile

import pytest

from loadtest import ports, report
from loadtest.report import Stat
from loadtest.service import bench_config, merge
from loadtest.variant_build import step_name

CPUINFO_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
CPUINFO_SPR = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: avx avx2 avx512f avx512bw avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8
"""


def test_isa_flags_from_cpuinfo():
    epyc = report.cpu_facts(CPUINFO_EPYC)
    assert epyc["model"] == "AMD EPYC 7B13"
    assert epyc["isa"] == "ISA: AVX2 (no AVX-512, no VNNI, no AMX)"
    assert epyc["flags"] == {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx512vnni": False,
                             "avx_vnni": False, "amx_tile": False}
    spr = report.cpu_facts(CPUINFO_SPR)
    assert spr["isa"] == "ISA: AVX2, AVX-512, AVX-512 VNNI, AVX-VNNI, AMX"
    assert report.isa_line({"avx2": True, "avx512f": True, "avx512vnni": True}) == \
        "ISA: AVX2, AVX-512, AVX-512 VNNI (no AVX-VNNI, no AMX)"
    assert report.isa_line({"avx2": True, "avx_vnni": True}) == \
        "ISA: AVX2, AVX-VNNI (no AVX-512, no AVX-512 VNNI, no AMX)"


def test_machine_header_names_commit_command_isa_cores_and_versions():
    facts = report.machine(["--quick"], "loadtest.bench_embeddings", reps=3, extra_versions={"wrk": "wrk 4.1.0"})
    assert facts["commit"] != "" and " " not in facts["commit"]
    assert facts["command"].endswith("-m loadtest.bench_embeddings --quick")
    text = report.header("T", facts, ["a note"], quick=True)
    assert text.startswith("# T\n")
    for needle in (f"commit: {facts['commit']}", f"`{facts['command']}`", facts["isa"], facts["cores"],
                   "wrk wrk 4.1.0", "torch ", "median of 3 repetitions", "- a note", "Smoke run"):
        assert needle in text
    assert "ISA: " in facts["isa"] and "cores" in facts["cores"]


def test_stat_median_and_spread():
    s = Stat.of([3.0, 1.0, 2.0, None])
    assert (s.median, s.low, s.high, s.n) == (2.0, 1.0, 3.0, 3)
    assert s.fmt(1) == "2.0 (1.0-3.0)" and s.fmt(0, " ms") == "2 ms (1-3)"
    assert Stat.of([1234.5]).fmt(1) == "1,234.5"  # one repetition: no spread shown
    assert Stat.of([]) is None and report.fmt(None) == "n/a"
    assert Stat.of([1.0, 2.0, 3.0, 4.0]).median == 2.5


def test_ratios_per_round_and_of_medians():
    r = report.ratios([200.0, 300.0, 400.0], [100.0, 100.0, 200.0])
    assert (r.median, r.low, r.high) == (2.0, 2.0, 3.0)
    q = report.ratio(Stat.of([10, 20, 30]), Stat.of([5, 10, 20]))
    assert q.median == pytest.approx(2.0) and q.low == pytest.approx(0.5) and q.high == pytest.approx(6.0)
    assert report.ratio(None, Stat.of([1.0])) is None


def test_results_files_hold_no_absolute_machine_paths(tmp_path):
    tmp = tempfile.gettempdir()
    body = (f"log {tmp}/loadtest-x/service.log, config {report.REPO}/deploy/local.yaml, "
            "other /home/someone/file")
    md, js = report.write("t", "Title", {**report.machine([], "loadtest.x", 3)}, [f"cache {report.REPO}/.loraserve"],
                          body, {"path": report.REPO / "adapters", "nested": [{"p": f"{tmp}/a"}],
                          "stat": Stat.of([1, 2, 3])}, output=str(tmp_path / "t.md"))
    text, raw = md.read_text(), js.read_text()
    for content in (text, raw):
        assert str(report.REPO) not in content and f"{tmp}/" not in content and "/home/" not in content
    assert "deploy/local.yaml" in text and "<tmp>/loadtest-x/service.log" in text and "<abs>" in text
    data = json.loads(raw)
    assert data["path"] == "adapters" and data["nested"][0]["p"] == "<tmp>/a"
    assert data["stat"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert data["machine"]["isa"].startswith("ISA: ") and data["smoke_run"] is False


def test_quick_runs_write_elsewhere():
    md, js = report.output_paths("embeddings", quick=True)
    assert md == report.RESULTS / "quick" / "embeddings.md" and js.suffix == ".json"
    assert report.output_paths("embeddings", quick=False)[0] == report.RESULTS / "embeddings.md"


def test_port_helpers_see_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert not ports.port_free(busy) and ports.accepting(busy)
        picked = ports.pick_ports(3, taken={busy})
        assert len(set(picked)) == 3 and busy not in picked
        assert all(ports.SINGLE_BAND[0] <= p <= ports.SINGLE_BAND[1] and ports.port_free(p) for p in picked)
    low, high = ports.pick_block(10)
    assert high - low == 9 and ports.BLOCK_BAND[0] <= low


def test_merge_is_deep_and_copies():
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    patch = {"a": {"c": [2], "e": {"f": 3}}, "d": 2}
    merged = merge(base, patch)
    assert merged == {"a": {"b": 1, "c": [2], "e": {"f": 3}}, "d": 2}
    patch["a"]["e"]["f"] = 99
    assert merged["a"]["e"]["f"] == 3


def test_bench_config_patches_ports_state_and_replicas(tmp_path):
    launch = bench_config("deploy/local.yaml", tmp_path / "state", replicas=1,
                          model={"torch_threads": 2, "batching": {"max_wait_ms": 2}}, model_id="minilm",
                          ray_env={"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_LOG_TO_STDERR": None})
    cfg, args, env = launch.config, launch.args, launch.ray_env
    router = cfg["applications"][0]["deployments"][0]
    assert router["name"] == "Router"
    assert router["autoscaling_config"]["min_replicas"] == router["autoscaling_config"]["max_replicas"] == 1
    assert router["max_ongoing_requests"] == 256  # the rest of Ray's entry is kept
    assert args["adapters"]["state_dir"] == str(tmp_path / "state")
    assert args["adapters"]["preload"]  # the rest of the config is kept
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and "RAY_SERVE_LOG_TO_STDERR" not in env
    assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"  # the rest of deploy/ray.env is kept
    minilm = args["models"][0]
    assert minilm["torch_threads"] == 2 and minilm["batching"] == {"max_batch_size": 32, "max_wait_ms": 2}
    used = [cfg["http_options"]["port"], launch.metrics_port, *(int(env[k]) for k in (
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"))]
    assert len(set(used)) == 5 and 8000 not in used and 8080 not in used
    d = [int(env[f"RAY_SERVE_DIRECT_INGRESS_{m}_HTTP_PORT"]) for m in ("MIN", "MAX")]
    g = [int(env[f"RAY_SERVE_DIRECT_INGRESS_{m}_GRPC_PORT"]) for m in ("MIN", "MAX")]
    assert d[1] < g[0] or g[1] < d[0]
    assert max(d[1], g[1]) < 32768  # below the kernel's ephemeral ports


def test_build_steps_are_named_alike_in_every_build():
    assert step_name("minilm: exported in 7.6 s") == step_name("minilm: exported in 0.8 s") == "exported"
    assert step_name("minilm@onnx-int8: parity passed (max abs diff 0.045, mean cosine 0.99)") == \
        step_name("minilm@onnx-int8: parity FAILED (max abs diff 0.087, mean cosine 0.95)") == "onnx-int8: parity check"
    assert step_name("minilm: exporting /x/y/model to ONNX with optimum ...") == "exporting to ONNX with optimum"
    assert step_name("minilm: onnx-int8 built in 3.7 s") == "onnx-int8 built"
    assert step_name("minilm: torch references on 64 probe sentences (bare, and with ...) in 2.4 s") == \
        "torch references on probe sentences"


def test_generation_bars_pair_repetitions_and_count_those_that_hold():
    from loadtest.bench_generation import bars

    pt = lambda tps, p50, p99: {"tokens_per_s": tps, "ttft_p50_ms": p50, "ttft_p99_ms": p99}  # noqa: E731
    results = {f"{k}/{m}": {"1": [pt(100, 10, 12), pt(100, 8, 9)], "16": [pt(t, 20, 30), pt(t, 20, 30)],
                            "32": [pt(900, 30, 45), pt(900, 30, 52)]}
               for k, t in (("continuous", 900), ("per_request", 100)) for m in ("1", "8")}
    out = "\n".join(bars(results, [1, 16, 32]))
    assert "one generate per request, 1 adapter(s) >= 4x: 9.0x" in out
    assert "<= 5x, 1 adapter(s): 5.5x (4.5-6.5), 1 of 2 repetitions <= 5x -> MISSED" in out
