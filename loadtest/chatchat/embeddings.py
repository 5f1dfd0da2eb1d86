"""An OpenAI-compatible ``POST /v1/embeddings`` over ragline's embedding model, for Chatchat.

Langchain-Chatchat takes its embeddings from a model platform over HTTP (Xinference, Ollama,
an OpenAI-compatible server). This is that platform for the baseline: the embed stage's default
model (``services/embed/model.py``, resolved as ``services/embed/server.py`` does), so Chatchat
and ragline embed with the same weights. It runs in ragline's venv, not Chatchat's.

Every text is embedded as a passage: Chatchat sends its questions and its chunks through the
same call and knows no query instruction (the default model has none either). Texts past the
model's length are truncated, as TEI and Xinference do. One request is one ONNX run, in a
thread; requests share nothing, as Chatchat's own embedding platforms serve them.

Answers in OpenAI's shape, ``encoding_format`` ``float`` or ``base64`` (little-endian float32:
what the openai client asks for by default), so Chatchat's ``custom openai`` platform type
(``LocalAIEmbeddings``, one text per request) reads it. The ``openai`` type would count tokens
with tiktoken first, which downloads its tables.

    .venv/bin/python loadtest/chatchat/embeddings.py --port 9997
"""

from __future__ import annotations

import argparse
import base64
from typing import Literal

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ragline.models import resolve_embed_model
from services.embed.model import EmbeddingModel
from services.embed.settings import EmbedSettings


class EmbeddingsRequest(BaseModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str = ""
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


def _error(status: int, message: str) -> JSONResponse:
    # OpenAI's error shape: the openai client raises it as an APIStatusError with the message.
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error"}}, status_code=status
    )


def create_app(model: EmbeddingModel) -> FastAPI:
    app = FastAPI(title="ragline embeddings (OpenAI-compatible) for the Chatchat baseline")
    served = {"requests": 0, "texts": 0}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model.name, "dimension": model.dimension, **served}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model.name, "object": "model"}]}

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(body: EmbeddingsRequest) -> dict | JSONResponse:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or not all(isinstance(t, str) for t in texts):
            return _error(400, "input must be a string or a non-empty list of strings (no tokens)")
        vectors, counts = await run_in_threadpool(model.embed, texts, "passage", True)
        served["requests"] += 1
        served["texts"] += len(texts)
        data = []
        for i, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                value = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            else:
                value = vector.astype(np.float32).tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(counts)
        return {
            "object": "list",
            "data": data,
            "model": body.model or model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return app


def load_model(threads: int = 1) -> EmbeddingModel:
    """The embed stage's configured model (``RAGLINE_EMBED_MODEL``, default all-MiniLM int8)."""
    settings = EmbedSettings()
    return EmbeddingModel(
        resolve_embed_model(settings.model, settings.data_dir), intra_op_threads=threads
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9997)
    # One thread per request, as the monolith's instances embed (a question is a few dozen
    # tokens; intra-op threads buy nothing at batch 1).
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = p.parse_args(argv)
    import uvicorn

    app = create_app(load_model(args.threads))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
