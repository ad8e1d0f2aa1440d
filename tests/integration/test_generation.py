"""Text generation over real HTTP: the unmodified ``openai`` client streams chat completions from
the generative base and from a LoRA adapter loaded at runtime; greedy text equals
``model.generate`` (through peft for the adapter) also when 16 streams of both share the batch,
each ending with ``data: [DONE]``; a client that disconnects frees its slot; every invalid
parameter answers 400 in the envelope and the next request succeeds."""

import concurrent.futures

import httpx
import openai
import pytest

from tests.conftest import STORYTELLER, greedy_reference
from tests.integration.conftest import REPO
from tests.integration.test_metrics import scrape, series
from tests.waiting import wait_until

PROMPTS = ["Once upon a time", "One day a little dog named Max", "The cat", "Nora had a friend, a"]
CHAT = [{"role": "user", "content": "Write a short story about a fox named Leo."}]
GOOD = {"model": "storyteller", "prompt": "Once upon a time", "max_tokens": 4}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORYTELLER)


@pytest.fixture(scope="module")
def gen_adapter(admin):
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "gen-a", "lora_path": "gen-0",
                                                  "base_model_name": "storyteller"})
    assert r.status_code == 200, r.text
    yield "gen-a"
    admin.post("/v1/unload_lora_adapter", json={"lora_name": "gen-a"})


def expected(tokenizer, adapter_store, prompt, adapter, max_tokens):
    ids = tokenizer(prompt)["input_ids"]
    ref = greedy_reference(ids, max_tokens, adapter_dir=adapter_store / "gen-0" if adapter else None)
    return tokenizer.decode(ref, skip_special_tokens=True)


def test_openai_client_streams_chat_from_the_base_and_its_adapter(service):
    """The shipped demo adapter ``ending`` (preloaded) answers how a held-out story ends in its
    trained form; the bare base, asked the same, does not."""
    import json

    row = json.loads((REPO / "models/data/endings/test.jsonl").read_text().splitlines()[0])
    ask = row["messages"][:1]
    client = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="unused", max_retries=0)
    texts = {}
    for model in ("storyteller", "ending"):
        chunks = list(client.chat.completions.create(
            model=model, messages=ask, max_tokens=40, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert content.strip() and reasons in (["stop"], ["length"]), (content, reasons)
        use = chunks[-1].usage
        assert use.prompt_tokens > 50 and 0 < use.completion_tokens <= 40
        assert use.total_tokens == use.prompt_tokens + use.completion_tokens
        texts[model] = content
    name = row["messages"][1]["content"].split()[0]
    assert texts["ending"].startswith(f"{name} felt ") and texts["ending"].count(".") == 1, texts
    assert " felt " not in texts["storyteller"][:len(name) + 8], texts
    whole = client.chat.completions.create(model="ending", messages=ask, max_tokens=40, temperature=0)
    assert whole.choices[0].message.content == texts["ending"]  # streamed = not streamed
    # the same prompt again: its KV came from the prefix cache (all but the last partial block)
    assert whole.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens - 8


def test_greedy_completions_equal_generate_for_the_base_and_the_adapter(client, gen_adapter, tokenizer, adapter_store):
    for model, adapter in (("storyteller", None), (f"storyteller:{gen_adapter}", gen_adapter)):
        r = client.post("/v1/completions", json={"model": model, "prompt": PROMPTS[1], "max_tokens": 30,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["choices"][0]["text"] == expected(tokenizer, adapter_store, PROMPTS[1], adapter, 30)


def stream_raw(base_url, body):
    """One streamed request read line by line: (data lines, status)."""
    with httpx.Client(base_url=base_url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as r:
        return [line for line in r.iter_lines() if line.startswith("data: ")], r.status_code


def test_sixteen_concurrent_mixed_adapter_streams_all_end_with_done(service, gen_adapter, tokenizer, adapter_store):
    import json

    jobs = [(PROMPTS[i % 4], gen_adapter if i % 2 else None) for i in range(16)]
    bodies = [{"model": a or "storyteller", "prompt": p, "max_tokens": 32, "temperature": 0, "stream": True}
              for p, a in jobs]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda b: stream_raw(service.base_url, b), bodies))
    for (prompt, adapter), (lines, status) in zip(jobs, results):
        assert status == 200 and lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert text == expected(tokenizer, adapter_store, prompt, adapter, 32), (prompt, adapter)


def test_n_choices_with_a_seed_are_reproducible(client):
    body = {"model": "storyteller", "prompt": PROMPTS[0], "max_tokens": 16, "n": 3, "seed": 5, "temperature": 1.0}
    a, b = (client.post("/v1/completions", json=body).json() for _ in range(2))
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len({c["text"] for c in a["choices"]}) > 1  # each choice its own random stream
    assert a["usage"]["prompt_tokens"] == 5 and a["usage"]["completion_tokens"] <= 48


def test_stop_strings_end_the_text(client):
    full = client.post("/v1/completions", json={**GOOD, "max_tokens": 24, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    stop = text.split()[3]
    cut = client.post("/v1/completions", json={**GOOD, "max_tokens": 24, "temperature": 0, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_a_disconnected_stream_frees_its_slot(service, client):
    """``tale1`` has one slot and no waiting room: while a stream holds the slot another request
    gets 503; once the client goes away mid-stream, the slot serves the next request, and the
    sequence is counted as aborted (it would have run 500 tokens)."""
    before = series(scrape(service), "ray_loraserve_sequences_finished_total", model="tale1", finished_reason="abort")
    long = {"model": "tale1", "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
    small = {"model": "tale1", "prompt": "The dog", "max_tokens": 2}
    with httpx.Client(base_url=service.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=long) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for line, _ in zip((x for x in lines if x.startswith("data: ")), range(3))]
            assert len(got) == 3
            busy = client.post("/v1/completions", json=small)
            assert busy.status_code == 503, busy.text
            assert busy.json()["error"]["code"] == "overloaded" and busy.headers["retry-after"]
        # leaving the block closed the connection in the middle of the stream

    def served():
        r = client.post("/v1/completions", json=small)
        return r if r.status_code == 200 else None

    assert wait_until(served, "the freed slot to serve a new request", timeout_s=20, every_s=0.2)
    aborted = wait_until(lambda: series(scrape(service), "ray_loraserve_sequences_finished_total", model="tale1",
                                        finished_reason="abort") - before >= 1 or None,
                         "the aborted sequence in the metrics", every_s=1)
    assert aborted


def test_generation_metrics_are_exported(service, client):
    long = {**GOOD, "prompt": "Once upon a time there was a little fox who lived by the river and", "max_tokens": 8}
    for _ in range(2):  # the second one's prompt start comes from the prefix cache
        r = client.post("/v1/completions", json=long)
        assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 8

    def exported():
        text = scrape(service)
        names = ("ray_loraserve_time_to_first_token_seconds_count", "ray_loraserve_time_per_output_token_seconds_count",
                 "ray_loraserve_prompt_tokens_total", "ray_loraserve_generation_tokens_total",
                 "ray_loraserve_decode_step_seconds_count", "ray_loraserve_prefix_cache_hits_total")
        return text if all(series(text, n, model="storyteller") > 0 for n in names) else None

    text = wait_until(exported, "generation metrics", every_s=1)
    assert series(text, "ray_loraserve_sequences_finished_total", model="storyteller", finished_reason="length") >= 1
    for gauge in ("ray_loraserve_num_sequences_running", "ray_loraserve_num_sequences_waiting",
                  "ray_loraserve_kv_cache_usage_ratio"):
        assert f"{gauge}{{" in text, gauge


def raw(body: str) -> dict:
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


C, CH = "/v1/completions", "/v1/chat/completions"
MSG = {"model": "storyteller", "messages": CHAT, "max_tokens": 4}
BAD = [
    ("negative max_tokens", C, {"json": {**GOOD, "max_tokens": -1}}, "invalid_request"),
    ("zero max_tokens", C, {"json": {**GOOD, "max_tokens": 0}}, "invalid_request"),
    ("huge max_tokens", C, {"json": {**GOOD, "max_tokens": 10**9}}, "invalid_request"),
    ("max_tokens a string", C, {"json": {**GOOD, "max_tokens": "4"}}, "invalid_request"),
    ("n over the limit", C, {"json": {**GOOD, "n": 5}}, "invalid_request"),
    ("n zero", C, {"json": {**GOOD, "n": 0}}, "invalid_request"),
    ("prompts x n over the running limit", C, {"json": {**GOOD, "prompt": ["a", "b", "c"], "n": 4}}, "invalid_request"),
    ("NaN temperature", C, raw('{"model":"storyteller","prompt":"hi","temperature":NaN}'), "invalid_json"),
    ("negative temperature", C, {"json": {**GOOD, "temperature": -0.5}}, "invalid_request"),
    ("temperature over 2", C, {"json": {**GOOD, "temperature": 2.5}}, "invalid_request"),
    ("top_p zero", C, {"json": {**GOOD, "top_p": 0}}, "invalid_request"),
    ("top_p over 1", C, {"json": {**GOOD, "top_p": 1.5}}, "invalid_request"),
    ("top_p negative", CH, {"json": {**MSG, "top_p": -0.1}}, "invalid_request"),
    ("prompt over the context", C, {"json": {**GOOD, "prompt": "word " * 600}}, "context_length_exceeded"),
    ("prompt plus max_tokens over the context", C, {"json": {**GOOD, "max_tokens": 510}}, "context_length_exceeded"),
    ("thousands of stop strings", C, {"json": {**GOOD, "stop": [f"s{i}" for i in range(5000)]}}, "invalid_request"),
    ("a stop string too long", C, {"json": {**GOOD, "stop": "x" * 1000}}, "invalid_request"),
    ("an empty stop string", C, {"json": {**GOOD, "stop": [""]}}, "invalid_request"),
    ("stop a number", C, {"json": {**GOOD, "stop": 5}}, "invalid_request"),
    ("seed a string", C, {"json": {**GOOD, "seed": "abc"}}, "invalid_request"),
    ("stream not a bool", C, {"json": {**GOOD, "stream": "yes"}}, "invalid_request"),
    ("stream_options without stream", C, {"json": {**GOOD, "stream_options": {"include_usage": True}}}, "invalid_request"),
    ("logprobs (not supported)", C, {"json": {**GOOD, "logprobs": 5}}, "invalid_request"),
    ("missing prompt", C, {"json": {"model": "storyteller"}}, "invalid_request"),
    ("empty prompt list", C, {"json": {**GOOD, "prompt": []}}, "invalid_request"),
    ("token id past the vocabulary", C, {"json": {**GOOD, "prompt": [99999]}}, "invalid_request"),
    ("empty messages", CH, {"json": {**MSG, "messages": []}}, "invalid_request"),
    ("unknown role", CH, {"json": {**MSG, "messages": [{"role": "wizard", "content": "hi"}]}}, "invalid_request"),
    ("message without content", CH, {"json": {**MSG, "messages": [{"role": "user"}]}}, "invalid_request"),
    ("image content", CH, {"json": {**MSG, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}}, "invalid_request"),
    ("messages not a list", CH, {"json": {**MSG, "messages": "hi"}}, "invalid_request"),
    ("last message the assistant's", CH, {"json": {**MSG, "messages": [{"role": "assistant", "content": "hi"}]}},
     "invalid_request"),
    ("an embedding model asked to complete", C, {"json": {**GOOD, "model": "minilm"}}, "task_not_supported"),
    ("an embedding model asked to chat", CH, {"json": {**MSG, "model": "tiny"}}, "task_not_supported"),
    ("a generative model asked to embed", "/v1/embeddings", {"json": {"model": "storyteller", "input": "x"}},
     "task_not_supported"),
]


@pytest.mark.parametrize("name, route, kwargs, code", BAD, ids=[c[0] for c in BAD])
def test_invalid_generation_parameters_answer_400_and_the_next_request_succeeds(client, name, route, kwargs, code):
    r = client.post(route, **kwargs)
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"error", "request_id"} and body["error"]["code"] == code
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    after = client.post(C, json=GOOD)
    assert after.status_code == 200 and after.json()["choices"][0]["text"]


def test_locust_chat_user_streams_and_reports_time_to_first_token(service, gen_adapter, tmp_path):
    import csv

    from tests.integration.test_adapters import _locust

    env = {"LORASERVE_USERS": "chat:1", "LORASERVE_GEN_ADAPTERS": gen_adapter, "LORASERVE_GEN_MAX_TOKENS": "16"}
    done = _locust(service, tmp_path, env)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "run_stats.csv"))}
    assert int(rows["Aggregated"]["Failure Count"]) == 0, open(tmp_path / "run_failures.csv").read()
    for name in ("chat:stream", "chat:ttft"):
        assert int(rows[name]["Request Count"]) > 0, (name, sorted(rows))
    assert float(rows["chat:ttft"]["Median Response Time"]) <= float(rows["chat:stream"]["Median Response Time"])
