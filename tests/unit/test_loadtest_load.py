"""loadtest.load (wrk's Lua script and output), loadtest.metrics (Prometheus text) and
loadtest.zipf: pure functions, no process or service started."""

from __future__ import annotations

import json
import math
import re

import pytest

from loadtest import load, metrics
from loadtest.zipf import zipf_weights

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:18000/v1/embeddings
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    84.05ms   20.11ms 250.00ms   70.00%
    Req/Sec   380.12     40.00   450.00     68.00%
  Latency Distribution
     50%   82.10ms
     75%   95.00ms
     90%  110.30ms
     99%    1.37s
  3801 requests in 10.00s, 12.34MB read
  Non-2xx or 3xx responses: 3
Requests/sec:    380.07
Transfer/sec:      1.23MB
WRK_JSON {"duration_us": 10001234, "requests": 3801, "bytes": 12940000, "errors": {"connect": 0, \
"read": 0, "write": 0, "status": 3, "timeout": 1}, "latency_us": {"min": 5120, "max": 250000, \
"mean": 84050.5, "p50": 82100, "p90": 110300, "p99": 1370000}, "sent_first": 1900, "sent_total": 3833}
"""


def lua_unquote(literal: str) -> bytes:
    """Decode a Lua string literal as ``load.lua_string`` writes it (``\\ddd`` escapes only)."""
    assert literal[0] == literal[-1] == '"'
    body = literal[1:-1]
    assert '"' not in body.replace("\\034", "")
    return re.sub(rb"\\(\d{3})", lambda m: bytes([int(m[1])]), body.encode("latin-1"))


@pytest.mark.parametrize("text", [
    '{"model": "minilm", "input": "The quick brown fox."}',
    'quote " backslash \\ newline \n tab \t end',
    "caf\u00e9 \u2603 \U0001f600",
    "\\0651 digits after an escape",
])
def test_lua_string_round_trips_any_text(text):
    literal = load.lua_string(text)
    assert all(32 <= ord(c) < 127 for c in literal)  # plain ASCII in the script
    assert lua_unquote(literal) == text.encode()


def test_lua_script_holds_every_body_with_normalized_cumulative_weights():
    bodies = [json.dumps({"model": f"zipf-{i:04d}", "input": ["hi \"there\""]}) for i in range(1, 5)]
    script = load.lua_script("/v1/classify", bodies, weights=[4, 3, 2, 1], seed=42)
    found = re.findall(r'^  ("(?:[^"\\]|\\\d{3})*")', script, flags=re.M)
    assert [lua_unquote(x).decode() for x in found] == bodies
    cum = [float(x) for x in re.search(r"local cum = \{ (.*) \}", script)[1].split(", ")]
    assert cum == pytest.approx([0.4, 0.7, 0.9, 1.0]) and cum[-1] == 1.0
    assert 'local path = "/v1/classify"' in script and "local seed = 42" in script
    for fn in ("function setup(thread)", "function init(args)", "function request()",
               "function done(summary, latency, requests)"):
        assert fn in script
    assert load.JSON_MARK in script and "latency:percentile(99)" in script


def test_cumulative_weights_uniform_by_default_and_validated():
    assert load.cumulative(None, 4) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError):
        load.cumulative([1.0, 2.0], 3)
    with pytest.raises(ValueError):
        load.cumulative([0.0, 0.0], 2)
    with pytest.raises(ValueError):
        load.lua_script("/x", [])


@pytest.mark.parametrize("token,seconds", [("530.00us", 530e-6), ("82.10ms", 0.0821), ("1.37s", 1.37),
                                           ("2.00m", 120.0)])
def test_wrk_durations(token, seconds):
    assert load.seconds(token) == pytest.approx(seconds)


def test_parse_wrk_output_json_and_latency_table():
    parsed = load.parse_output(WRK_OUTPUT)
    assert parsed["text_percentiles_ms"] == pytest.approx({50.0: 82.1, 75.0: 95.0, 90.0: 110.3, 99.0: 1370.0})
    assert parsed["text_rps"] == pytest.approx(380.07) and parsed["text_non2xx"] == 3
    r = load.to_result(parsed, concurrency=32, cpu_s=0.25, wall_s=10.5)
    assert (r.requests, r.ok, r.concurrency) == (3801, 3798, 32)
    assert r.duration_s == pytest.approx(10.001234)
    assert r.rps == pytest.approx(3798 / 10.001234)
    assert (r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms) == pytest.approx((82.1, 110.3, 1370.0, 250.0))
    assert r.errors == {"status": 3, "timeout": 1} and r.error_count == 4
    assert r.first_share == pytest.approx(1900 / 3833)
    assert r.client_cpu_share == pytest.approx(0.25 / 10.5)
    # the JSON's p50 and the text table agree
    assert r.p50_ms == pytest.approx(parsed["text_percentiles_ms"][50.0])


def test_parse_wrk_output_falls_back_to_the_text_table():
    text = WRK_OUTPUT.split("WRK_JSON")[0]
    r = load.to_result(load.parse_output(text), concurrency=32, cpu_s=0.1, wall_s=10.0)
    assert r.p50_ms == pytest.approx(82.1) and r.p99_ms == pytest.approx(1370.0)
    assert r.rps == pytest.approx(380.07) and r.errors == {"status": 3}


def test_parse_wrk_output_without_results_raises():
    with pytest.raises(ValueError):
        load.parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")


PROMETHEUS = r"""# HELP ray_loraserve_adapter_loads_total Adapter loads.
# TYPE ray_loraserve_adapter_loads_total counter
ray_loraserve_adapter_loads_total{model="minilm",result="ok",replica="a"} 12.0
ray_loraserve_adapter_loads_total{model="minilm",result="ok",replica="b"} 30
ray_loraserve_adapter_loads_total{model="minilm",result="error",replica="b"} 1
ray_loraserve_adapter_loads_total{model="other",result="ok"} 99
ray_loraserve_requests_total{route="/v1/classify",adapter="a \"quoted\", with comma",status="200"} 7 1700000000000
ray_loraserve_load_ms_bucket{model="minilm",le="10.0"} 2
ray_loraserve_load_ms_bucket{model="minilm",le="20.0"} 6
ray_loraserve_load_ms_bucket{model="minilm",le="+Inf"} 8
ray_loraserve_load_ms_count{model="minilm"} 8
process_up 1
weird_value{a="b"} NaN
broken line without value{
"""


def test_prometheus_parser_labels_escapes_and_values():
    samples = metrics.parse(PROMETHEUS)
    names = [s.name for s in samples]
    assert "process_up" in names and "broken" not in " ".join(names)
    req = next(s for s in samples if s.name == "ray_loraserve_requests_total")
    assert req.labels["adapter"] == 'a "quoted", with comma' and req.labels["status"] == "200"
    assert req.value == 7.0  # the timestamp is not the value
    assert math.isnan(next(s.value for s in samples if s.name == "weird_value"))


def test_prometheus_totals_and_histograms():
    samples = metrics.parse(PROMETHEUS)
    assert metrics.total(samples, "ray_loraserve_adapter_loads_total", model="minilm", result="ok") == 42
    assert metrics.total(samples, "ray_loraserve_adapter_loads_total") == 142
    after = metrics.buckets(samples, "ray_loraserve_load_ms", model="minilm")
    assert after == {10.0: 2, 20.0: 6, math.inf: 8}
    before = {10.0: 2, 20.0: 2, math.inf: 2}
    # between the scrapes: 0 observations <= 10, 4 in (10, 20], 2 above
    assert metrics.bucket_quantile(before, after, 0.5) == 20.0
    assert metrics.bucket_quantile(before, after, 0.9) == math.inf
    assert metrics.bucket_quantile(after, after, 0.5) is None


def test_zipf_weights_are_probabilities_with_one_meaning():
    w = zipf_weights(1000, 1.1)
    assert len(w) == 1000 and sum(w) == pytest.approx(1.0)
    assert all(a > b for a, b in zip(w, w[1:]))  # rank 1 most popular
    assert w[0] / w[1] == pytest.approx(2 ** 1.1)
    assert zipf_weights(4, 0.0) == pytest.approx([0.25] * 4)
    assert zipf_weights(0, 1.1) == []
    with pytest.raises(ValueError):
        zipf_weights(3, -1.0)
