"""The baseline: the embeddings server a user writes by hand instead of using loraserve.

FastAPI on uvicorn, the same model directory loaded with transformers' ``AutoTokenizer`` /
``AutoModel``; each request is tokenized and run through the model on its own (no batching
across requests), mean-pooled over the attention mask and L2-normalized (what
sentence-transformers does for this model); the answer has OpenAI's embeddings shape. Two ways:

- ``--mode tutorial``: as tutorials write it. A plain ``def`` endpoint (FastAPI runs it in its
  thread pool, so at concurrency 32 up to 32 requests run at once), one uvicorn worker, torch's
  default thread count (every core, for each of those requests).
- ``--mode tuned``: as a careful user tunes it. An ``async def`` endpoint that runs the model
  behind an ``asyncio.Lock`` (in a worker thread, so the event loop keeps reading requests):
  one forward pass at a time, on torch's default threads, so no two forward passes fight over
  the cores.

Run from the repository root: ``python -m loadtest.recipe_fastapi [--mode tuned] [--port 8100]
[--model-path DIR]`` (default model: the first of deploy/local.yaml). ``--threads`` and
``--workers`` try other settings: in a smoke run (2 cores, not a result) tuned with 1 torch
thread did 76 req/s at c32, the same with 2 uvicorn workers 75 (a keep-alive client's
connections are spread over the workers only as they happen to accept them), tuned as set up
here 90. ``GET /health`` answers once the model is loaded, with the mode and torch's threads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from contextlib import asynccontextmanager

import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from transformers import AutoModel, AutoTokenizer

MODE = os.environ.get("RECIPE_MODE", "tutorial")
state: dict = {}
lock = asyncio.Lock()


def default_model_path(config: str = "deploy/local.yaml") -> str:
    from models import resolve_source
    from serve.settings import load_settings

    return str(resolve_source(load_settings(config).models[0].source))


@asynccontextmanager
async def lifespan(app: FastAPI):
    path = os.environ.get("RECIPE_MODEL_PATH") or default_model_path()
    if os.environ.get("RECIPE_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["RECIPE_TORCH_THREADS"]))
    state["tokenizer"] = AutoTokenizer.from_pretrained(path, local_files_only=True)
    state["model"] = AutoModel.from_pretrained(path, local_files_only=True).eval()
    yield
    state.clear()


app = FastAPI(lifespan=lifespan)


class EmbeddingsRequest(BaseModel):
    model: str
    input: str | list[str]


@app.get("/health")
def health() -> dict:
    return {"status": "ok", "mode": MODE, "torch_threads": torch.get_num_threads(), "pid": os.getpid()}


def embed(req: EmbeddingsRequest) -> dict:
    texts = [req.input] if isinstance(req.input, str) else req.input
    tokenizer, model = state["tokenizer"], state["model"]
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state  # [batch, seq, hidden]
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [batch, seq, 1]
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [batch, hidden]
    vectors = F.normalize(pooled, p=2, dim=1).tolist()
    tokens = int(enc["attention_mask"].sum())
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


if MODE == "tuned":
    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingsRequest) -> dict:
        async with lock:  # one forward pass at a time, on every core
            return await run_in_threadpool(embed, req)
else:
    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingsRequest) -> dict:
        return embed(req)  # FastAPI's thread pool: as many at once as requests arrive


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="FastAPI + transformers embeddings baseline")
    p.add_argument("--mode", choices=("tutorial", "tuned"), default="tutorial")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--model-path", help="local model directory (default: deploy/local.yaml's model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    a = p.parse_args(argv)
    os.environ["RECIPE_MODE"] = a.mode  # read at import, also by uvicorn's worker processes
    if a.model_path:
        os.environ["RECIPE_MODEL_PATH"] = a.model_path
    if a.threads:
        os.environ["RECIPE_TORCH_THREADS"] = str(a.threads)
    uvicorn.run("loadtest.recipe_fastapi:app", host=a.host, port=a.port, workers=a.workers,
                log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
