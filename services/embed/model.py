"""EmbeddingModel: a sentence-embedding model directory run by ONNX Runtime.

Directory convention (docs/decisions/0002): ``model.onnx``, ``tokenizer.json`` and
``ragline.json`` with name, pooling ("mean" or "cls"), normalize, max_length,
query_instruction (prepended to QUERY inputs only, as BGE v1.5 wants) and dimension.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ragline.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)
Kind = Literal["query", "passage"]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 512
    query_instruction: str = ""
    dimension: int = 0

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} is missing: a model directory needs ragline.json with name, pooling, "
                "normalize, max_length, query_instruction and dimension"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"{path}: unknown keys {sorted(unknown)}; allowed: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        # A string "false" would be truthy and a float max_length would break slicing: check
        # types here rather than fail obscurely at the first request.
        for key, expected in _FIELD_TYPES.items():
            if key not in raw:
                continue
            value = raw[key]
            # bool is an int subclass: `"max_length": true` must not pass as 1.
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(f"{path}: {key} must be {expected.__name__}, got {value!r}")
        config = cls(**{"name": path.parent.name, **raw})
        if config.pooling not in ("mean", "cls"):
            raise ValueError(f"{path}: pooling must be 'mean' or 'cls', got {config.pooling!r}")
        if config.max_length < 8:
            raise ValueError(f"{path}: max_length must be at least 8")
        if config.dimension < 0:
            raise ValueError(f"{path}: dimension must be positive (or 0: take it from the graph)")
        return config


_FIELD_TYPES: dict[str, type] = {
    "name": str,
    "pooling": str,
    "normalize": bool,
    "max_length": int,
    "query_instruction": str,
    "dimension": int,
}
# What infer() can feed; a graph that wants anything else is refused at load time.
_FEEDABLE_INPUTS = {"input_ids", "attention_mask", "token_type_ids"}


class EmbeddingModel:
    """Tokenise, run the ONNX graph, pool, normalise. Thread-safe: ORT sessions are."""

    def __init__(
        self,
        model_dir: Path,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        spinning: bool = False,
        inter_op_threads: int = 0,
    ) -> None:
        self.model_dir = model_dir
        self.config = ModelConfig.load(model_dir / "ragline.json")
        for required in ("model.onnx", "tokenizer.json"):
            if not (model_dir / required).exists():
                raise FileNotFoundError(f"model directory {model_dir} has no {required}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads:
            options.inter_op_num_threads = inter_op_threads
        # ORT's workers spin between runs by default; on a small CPU box that steals the cores
        # the gRPC event loop needs to gather the next batch.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        options.add_session_config_entry(
            "session.inter_op.allow_spinning", "1" if spinning else "0"
        )
        providers = providers or ["CPUExecutionProvider"]
        graph = model_dir / "model.onnx"
        if "CUDAExecutionProvider" in providers and (model_dir / "model_fp16.onnx").exists():
            graph = model_dir / "model_fp16.onnx"  # half precision where the model ships it
        self.session = ort.InferenceSession(str(graph), sess_options=options, providers=providers)
        # ONNX Runtime falls back to the CPU, with only a warning, when a provider it was given
        # cannot load (no onnxruntime-gpu, no CUDA libraries, no GPU): refuse to start instead.
        active = self.session.get_providers()
        missing = [p for p in providers if p != "CPUExecutionProvider" and p not in active]
        if missing:
            from importlib import metadata

            installed = {d.metadata["Name"].lower() for d in metadata.distributions()}
            if {"onnxruntime", "onnxruntime-gpu"} <= installed:
                raise FailedPrecondition(
                    f"{', '.join(missing)} was asked for but ONNX Runtime runs on "
                    f"{', '.join(active)}: onnxruntime and onnxruntime-gpu are both installed "
                    "and the CPU one won; pip uninstall -y onnxruntime onnxruntime-gpu, then pip "
                    "install onnxruntime-gpu (deploy/docker/Dockerfile.gpu does this)"
                )
            raise FailedPrecondition(
                f"{', '.join(missing)} was asked for but ONNX Runtime runs on {', '.join(active)} "
                f"(available here: {', '.join(ort.get_available_providers())}): install "
                "onnxruntime-gpu alone (not beside onnxruntime) with its CUDA and cuDNN "
                "libraries, or set RAGLINE_EMBED_PROVIDERS=CPUExecutionProvider"
            )
        # On a GPU, bind inputs and outputs explicitly so ORT does not stage extra copies.
        self.on_gpu = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.input_names = {i.name for i in self.session.get_inputs()}
        if "input_ids" not in self.input_names or self.input_names - _FEEDABLE_INPUTS:
            raise ValueError(
                f"{graph} takes inputs {sorted(self.input_names)}; ragline feeds input_ids "
                "(required), attention_mask and token_type_ids"
            )
        outputs = {o.name: o for o in self.session.get_outputs()}
        # Exports that carry both prefer the token states; BERT's pooler_output is not the
        # sentence embedding of a sentence-transformers model.
        output = outputs.get("last_hidden_state") or self.session.get_outputs()[0]
        self.output_name = output.name
        self.output_rank = len(output.shape)
        if self.output_rank not in (2, 3):
            raise ValueError(
                f"{graph} output {output.name!r} has shape {output.shape}; expected token states "
                "[batch, seq, dim] or a sentence embedding [batch, dim]"
            )
        graph_dim = output.shape[-1] if isinstance(output.shape[-1], int) else 0
        if self.config.dimension and graph_dim and graph_dim != self.config.dimension:
            raise ValueError(
                f"{model_dir / 'ragline.json'} says dimension {self.config.dimension} but the "
                f"ONNX graph outputs {graph_dim}"
            )
        self.dimension = self.config.dimension or graph_dim
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The file's own padding/truncation (often a fixed 128) would waste compute or cut text:
        # this class pads each batch to its longest input and truncates only when asked.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _encode(self, texts: list[str], kind: Kind) -> list:
        if kind == "query" and self.config.query_instruction:
            texts = [self.config.query_instruction + t for t in texts]
        return self.tokenizer.encode_batch(texts)

    def count_tokens(self, texts: list[str], kind: Kind = "passage") -> list[int]:
        """Tokens per text as the model would see them, special tokens included, never cut."""
        return [len(enc.ids) for enc in self._encode(texts, kind)]

    def tokenize(
        self, texts: list[str], kind: Kind = "passage", truncate: bool = True
    ) -> list[list[int]]:
        """Token ids per text (special tokens included), cut to ``max_length`` when allowed."""
        limit = self.config.max_length
        out: list[list[int]] = []
        for i, enc in enumerate(self._encode(texts, kind)):
            ids = enc.ids
            if len(ids) > limit:
                if not truncate:
                    raise InvalidArgument(
                        f"text {i} is {len(ids)} tokens, over the model's limit of {limit}: "
                        "shorten it or send truncate=true"
                    )
                if enc.special_tokens_mask[-1]:
                    ids = ids[: limit - 1] + ids[-1:]  # keep the closing [SEP]
                else:
                    ids = ids[:limit]
            out.append(ids)
        return out

    def infer(self, batch: list[list[int]]) -> np.ndarray:
        """One ONNX Runtime run over a batch of token id lists, padded to the longest."""
        width = max(len(ids) for ids in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        if self.on_gpu:
            binding = self.session.io_binding()
            for name, value in feed.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output(self.output_name, "cuda")
            self.session.run_with_iobinding(binding)
            hidden = binding.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)
        else:
            hidden = self.session.run([self.output_name], feed)[0]
        if self.output_rank == 2:
            pooled = hidden
        elif self.config.pooling == "cls":
            pooled = hidden[:, 0, :]
        else:
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        pooled = np.asarray(pooled, dtype=np.float32)
        if self.config.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

    def embed(
        self, texts: list[str], kind: Kind = "passage", truncate: bool = True
    ) -> tuple[np.ndarray, list[int]]:
        """Vectors ``(len(texts), dimension)`` in input order and tokens per input."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32), []
        tokens = self.tokenize(texts, kind, truncate)
        return self.infer(tokens), [len(t) for t in tokens]
