"""exllamav2 on a (pinned) GPU: EXL2 or FP16 Hugging Face model directories.

Paged attention (and so real batching across jobs) needs flash-attn; without it the dynamic
generator runs with ``paged=False``, its documented fallback, one job at a time. exllamav2 and
torch come from the optional ``gpu`` extra and are imported only here.

The generator is stateful and not thread-safe, so only the engine's scheduler thread drives
it: each concurrent RPC becomes an ``ExLlamaV2DynamicJob`` enqueued on the one generator, and
every engine step is one ``generator.iterate()``, which advances all jobs together (continuous
batching); a cancelled or expired request's job is cancelled at once, freeing its pages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ragline.errors import InvalidArgument, Unavailable
from services.generate.backends.base import (
    BatchingBackend,
    ChatMessage,
    Finished,
    SamplingParams,
)
from services.generate.chat_template import ChatTemplate, eos_token_ids
from services.generate.prefix_cache import PrefixCache

log = logging.getLogger(__name__)


def _import_exllamav2():
    try:
        import torch
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
        from exllamav2.generator import (
            ExLlamaV2DynamicGenerator,
            ExLlamaV2DynamicJob,
            ExLlamaV2Sampler,
        )
    except ImportError as exc:
        raise Unavailable(
            f"the exllamav2 backend needs exllamav2 and torch ({exc}): pip install 'ragline[gpu]'"
        ) from None
    return (
        torch,
        ExLlamaV2,
        ExLlamaV2Cache,
        ExLlamaV2Config,
        ExLlamaV2Tokenizer,
        ExLlamaV2DynamicGenerator,
        ExLlamaV2DynamicJob,
        ExLlamaV2Sampler,
    )


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class _Seq:
    job: object
    prompt_tokens: int
    events: list = field(default_factory=list)
    done: bool = False


class ExLlamaV2Backend(BatchingBackend):
    name = "exllamav2"

    @classmethod
    def from_settings(cls, path: Path, settings) -> ExLlamaV2Backend:
        return cls(path, settings.context_length, settings.kv_cells(), settings.batch_slots())

    def __init__(
        self,
        model_dir: Path,
        max_seq_len: int = 4096,
        cache_tokens: int = 16384,
        max_batch_size: int = 16,
    ) -> None:
        (torch, ExLlamaV2, Cache, Config, Tokenizer, Generator, self._Job, self._Sampler) = (
            _import_exllamav2()
        )
        if not torch.cuda.is_available():
            raise Unavailable(
                "exllamav2 needs a CUDA GPU and none is visible (check --gpu / "
                "CUDA_VISIBLE_DEVICES, or use --backend llamacpp)"
            )
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"{model_dir} is not an EXL2/HF model directory (config.json)")
        config = Config(str(model_dir))
        config.max_seq_len = max_seq_len
        self.model = ExLlamaV2(config)
        self.cache = Cache(self.model, max_seq_len=max(cache_tokens, max_seq_len), lazy=True)
        self.model.load_autosplit(self.cache, progress=False)
        self.tokenizer = Tokenizer(config)
        self.paged = flash_attn_available()
        self.generator = Generator(
            model=self.model,
            cache=self.cache,
            tokenizer=self.tokenizer,
            max_batch_size=max_batch_size if self.paged else 1,
            paged=self.paged,
        )
        self.context_length = max_seq_len
        self.max_slots = max_batch_size if self.paged else 1
        self._running: dict[int, _Seq] = {}
        self.prefix = PrefixCache(0)  # counters only: the generator keeps the pages itself
        self.model_name = model_dir.name
        self.template = ChatTemplate.from_dir(
            model_dir, self.tokenizer.bos_token or "", self.tokenizer.eos_token or ""
        )
        self.eos_ids = eos_token_ids(model_dir, self.tokenizer.eos_token_id)
        log.info("exllamav2 loaded %s (paged=%s)", model_dir, self.paged)
        if not self.paged and max_batch_size > 1:
            log.warning(
                "flash-attn is not installed: exllamav2 decodes one request at a time (asked "
                "for %d slots); install flash-attn (deploy/docker/Dockerfile.gpu does) to batch",
                max_batch_size,
            )

    def render(self, messages: Sequence[ChatMessage]) -> str:
        try:
            return self.template.render(messages)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    # --- continuous batching: requests become concurrent generator jobs ---------------------

    def prepare(self, messages: Sequence[ChatMessage], params: SamplingParams) -> _Seq:
        input_ids = self.tokenizer.encode(
            self.render(messages), add_bos=False, encode_special_tokens=True
        )
        prompt_tokens = input_ids.shape[-1]
        room = self.context_length - prompt_tokens
        if room < 1:
            raise InvalidArgument(
                f"prompt is {prompt_tokens} tokens; the context holds {self.context_length}: "
                "shorten the messages or retrieve fewer passages"
            )
        settings = self._Sampler.Settings()
        settings.temperature = params.temperature
        settings.top_p = params.top_p
        settings.top_k = params.top_k if params.temperature > 0 else 1
        settings.token_repetition_penalty = params.repetition_penalty
        job = self._Job(
            input_ids=input_ids,
            max_new_tokens=min(params.max_tokens, room),
            stop_conditions=[*self.eos_ids, *params.stop],  # every end-of-turn id
            gen_settings=settings,
            seed=params.seed,
        )
        return _Seq(job=job, prompt_tokens=prompt_tokens)

    def can_admit(self, seq: _Seq) -> bool:
        # the generator pages the cache itself and queues what does not fit; bound the jobs
        return len(self._running) < self.max_slots

    def admit(self, seq: _Seq) -> None:
        self.generator.enqueue(seq.job)
        self._running[id(seq.job)] = seq

    def step(self, seqs: Sequence[_Seq]) -> int:
        results = self.generator.iterate()
        tokens = 0
        for result in results:
            seq = self._running.get(id(result.get("job")))
            if seq is None:
                continue
            if result.get("text"):
                seq.events.append(result["text"])
                tokens += 1
            if result.get("eos"):
                reason = "length" if result.get("eos_reason") == "max_new_tokens" else "stop"
                # The paged generator reuses cache pages of identical prompt prefixes across
                # jobs (running or recently finished) by itself; it reports how many it reused.
                cached = int(result.get("cached_tokens", 0))
                self.prefix.record(seq.prompt_tokens, cached)
                seq.events.append(
                    Finished(
                        reason,
                        seq.prompt_tokens,
                        int(result.get("new_tokens", 0)),
                        cached_tokens=cached,
                    )  # fmt: skip
                )
                seq.done = True
        return tokens

    def release(self, seq: _Seq) -> None:
        if self._running.pop(id(seq.job), None) is not None and not seq.done:
            self.generator.cancel(seq.job)  # frees its cache pages now

    def cache_usage(self) -> float:
        return len(self._running) / self.max_slots
