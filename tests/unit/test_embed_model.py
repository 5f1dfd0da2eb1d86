"""EmbeddingModel on the real default model files, no sockets."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from ragline.errors import InvalidArgument
from ragline.models import DEFAULT_EMBED_MODEL, resolve_embed_model
from services.embed.model import EmbeddingModel


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory) -> Path:
    return resolve_embed_model(DEFAULT_EMBED_MODEL, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def model(default_dir) -> EmbeddingModel:
    return EmbeddingModel(default_dir)


def test_builtin_assembly_is_idempotent(tmp_path, default_dir) -> None:
    first = resolve_embed_model(DEFAULT_EMBED_MODEL, tmp_path)
    mtime = (first / "ragline.json").stat().st_mtime_ns
    second = resolve_embed_model(DEFAULT_EMBED_MODEL, tmp_path)
    assert first == second and (second / "ragline.json").stat().st_mtime_ns == mtime
    assert (first / "model.onnx").exists() and (first / "tokenizer.json").exists()
    assert resolve_embed_model(str(default_dir), tmp_path) == default_dir  # a dir is used as is


def test_unknown_model_says_what_was_expected(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.onnx, tokenizer.json"):
        resolve_embed_model("BAAI/bge-small-en-v1.5", tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        resolve_embed_model(str(tmp_path / "no-such-dir"), tmp_path)


def _assemble_together(barrier, data: Path, results) -> None:
    barrier.wait()  # line the processes up so they race on the same fresh directory
    try:
        resolve_embed_model(DEFAULT_EMBED_MODEL, data)
        results.put("ok")
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(repr(exc))


def test_replicas_assembling_at_once_all_succeed(tmp_path) -> None:
    # `ragline run --replicas embed=N` starts N processes on one fresh data dir.
    spawn = multiprocessing.get_context("spawn")
    n = 6
    for attempt in range(2):
        data = tmp_path / str(attempt)
        barrier, results = spawn.Barrier(n), spawn.Queue()
        procs = [
            spawn.Process(target=_assemble_together, args=(barrier, data, results))
            for _ in range(n)
        ]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=10)
        assert outcomes == ["ok"] * n
        target = data / "models" / DEFAULT_EMBED_MODEL
        assert sorted(p.name for p in target.iterdir()) == [
            "model.onnx",
            "ragline.json",
            "tokenizer.json",
        ], "no temporary files are left behind"
        assert json.loads((target / "ragline.json").read_text())["dimension"] == 384


def make_variant(tmp_path: Path, default_dir: Path, **overrides) -> Path:
    target = tmp_path / "variant"
    target.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        (target / name).symlink_to((default_dir / name).resolve())
    config = json.loads((default_dir / "ragline.json").read_text()) | overrides
    (target / "ragline.json").write_text(json.dumps(config))
    return target


def test_mean_pooling_normalised(model) -> None:
    vecs, tokens = model.embed(["Expense claims within 30 days.", "Passwords of 14 characters."])
    assert vecs.dtype == np.float32 and vecs.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert all(t > 4 for t in tokens)


def test_bge_style_cls_pooling_and_query_instruction(tmp_path, default_dir, model) -> None:
    instruction = "Represent this sentence for searching relevant passages: "
    bge = EmbeddingModel(
        make_variant(tmp_path, default_dir, pooling="cls", query_instruction=instruction)
    )
    text = "How many days of annual leave do I get?"
    q, q_tokens = bge.embed([text], kind="query")
    p, p_tokens = bge.embed([text], kind="passage")
    assert q_tokens[0] > p_tokens[0], "the instruction is tokenised with the query"
    assert float(q[0] @ p[0]) < 0.999, "QUERY gets the instruction, PASSAGE does not"
    mean, _ = model.embed([text], kind="passage")
    assert float(mean[0] @ p[0]) < 0.999, "CLS pooling differs from mean pooling"


def test_truncation_keeps_limit_or_refuses(model) -> None:
    long_text = "travel " * 600
    vecs, tokens = model.embed([long_text], truncate=True)
    assert tokens == [256] and vecs.shape == (1, 384)
    sep = model.tokenizer.token_to_id("[SEP]")
    assert model.tokenize([long_text])[0][-1] == sep, "truncation keeps the closing [SEP]"
    with pytest.raises(InvalidArgument, match="text 0 is 602 tokens"):
        model.embed([long_text], truncate=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pooling": "max"}, "pooling must be"),
        ({"dimension": 768}, "outputs 384"),
        ({"normalize": "false"}, "normalize must be bool"),
        ({"max_length": 256.0}, "max_length must be int"),
        ({"pool": "cls"}, "unknown keys"),
    ],
)
def test_bad_config_is_refused(tmp_path, default_dir, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddingModel(make_variant(tmp_path, default_dir, **overrides))


def test_unreadable_config_names_the_file(tmp_path, default_dir) -> None:
    variant = make_variant(tmp_path, default_dir)
    (variant / "ragline.json").write_text("{pooling: mean")
    with pytest.raises(ValueError, match="ragline.json is not valid JSON"):
        EmbeddingModel(variant)


def test_no_texts_gives_an_empty_matrix(model) -> None:
    vecs, tokens = model.embed([])
    assert vecs.shape == (0, 384) and tokens == []
