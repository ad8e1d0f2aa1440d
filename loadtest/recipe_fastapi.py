"""The baseline: the embeddings server a user would write by hand instead of using loraserve.

A plain FastAPI app on one uvicorn worker, loading the same model directory with transformers'
``AutoTokenizer``/``AutoModel``. Each request is tokenized and run through the model on its own
(no batching across requests), then mean-pooled over the attention mask and L2-normalized, which
is what sentence-transformers does for this model. The endpoint is a plain ``def``, as FastAPI
recommends for blocking work, so concurrent requests run in Starlette's thread pool. torch uses
all cores (``os.cpu_count()`` intra-op threads). The response has OpenAI's embeddings shape.

Run: ``python loadtest/recipe_fastapi.py [--model-path DIR] [--port 8100]`` (or
``python -m loadtest.recipe_fastapi`` from the repository root). Without ``--model-path`` it
serves the first model of ``deploy/local.yaml``. ``GET /health`` answers 200 once the model is
loaded (uvicorn does not accept connections before the lifespan startup has finished).
"""

from __future__ import annotations

import argparse
import os
from contextlib import asynccontextmanager
from typing import Union

import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModel, AutoTokenizer

MODEL_PATH_ENV = "RECIPE_MODEL_PATH"
state: dict = {}


def default_model_path(config: str = "deploy/local.yaml") -> str:
    """The local directory of the first model in a loraserve config (no network)."""
    from models.sources import resolve_source
    from serve.launcher import app_args, load_config
    from serve.settings import AppSettings

    settings = AppSettings.model_validate(app_args(load_config(config)))
    return str(resolve_source(settings.models[0].source))


@asynccontextmanager
async def lifespan(app: FastAPI):
    path = os.environ.get(MODEL_PATH_ENV) or default_model_path()
    torch.set_num_threads(os.cpu_count() or 1)
    state["tokenizer"] = AutoTokenizer.from_pretrained(path, local_files_only=True)
    state["model"] = AutoModel.from_pretrained(path, local_files_only=True).eval()
    yield
    state.clear()


app = FastAPI(lifespan=lifespan)


class EmbeddingsRequest(BaseModel):
    model: str
    input: Union[str, list[str]]


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/v1/embeddings")
def embeddings(req: EmbeddingsRequest) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="FastAPI + transformers embeddings baseline")
    p.add_argument("--model-path", help="local model directory (default: deploy/local.yaml's model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    a = p.parse_args(argv)
    if a.model_path:
        os.environ[MODEL_PATH_ENV] = a.model_path
    uvicorn.run(app, host=a.host, port=a.port, workers=1, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
