"""exllamav2 on a (pinned) GPU: EXL2 or FP16 Hugging Face model directories.

Paged attention (and so real batching across jobs) needs flash-attn; without it the dynamic
generator runs with ``paged=False``, its documented fallback, one job at a time. exllamav2 and
torch come from the optional ``gpu`` extra and are imported only here.

The generator is stateful and not thread-safe, so only the engine's worker thread drives it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ragline.errors import InvalidArgument, Unavailable
from services.generate.backends.base import Backend, ChatMessage, Finished, SamplingParams

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


class ExLlamaV2Backend(Backend):
    name = "exllamav2"

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
        self.model_name = model_dir.name
        self.template = self._load_template(model_dir)
        log.info("exllamav2 loaded %s (paged=%s)", model_dir, self.paged)

    @staticmethod
    def _load_template(model_dir: Path):
        import jinja2

        cfg_path = model_dir / "tokenizer_config.json"
        template = None
        if cfg_path.exists():
            template = json.loads(cfg_path.read_text()).get("chat_template")
        if not template:
            raise ValueError(f"{model_dir} has no chat_template in tokenizer_config.json")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        return self.template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
        )

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[str | Finished]:
        input_ids = self.tokenizer.encode(
            self.render(messages), add_bos=False, encode_special_tokens=True
        )
        prompt_tokens = input_ids.shape[-1]
        room = self.context_length - prompt_tokens
        if room < 1:
            raise InvalidArgument(
                f"prompt is {prompt_tokens} tokens; the context holds {self.context_length}"
            )
        settings = self._Sampler.Settings()
        settings.temperature = params.temperature
        settings.top_p = params.top_p
        settings.top_k = params.top_k if params.temperature > 0 else 1
        settings.token_repetition_penalty = params.repetition_penalty
        job = self._Job(
            input_ids=input_ids,
            max_new_tokens=min(params.max_tokens, room),
            stop_conditions=[self.tokenizer.eos_token_id, *params.stop],
            gen_settings=settings,
            seed=params.seed,
        )
        self.generator.enqueue(job)
        completion_tokens = 0
        finish = "length"
        done = False
        try:
            while not done:
                if should_stop():
                    finish = "cancelled"
                    break
                for result in self.generator.iterate():
                    if result.get("job") is not job:
                        continue
                    if result.get("text"):
                        yield result["text"]
                    if result.get("eos"):
                        done = True
                        completion_tokens = result.get("new_tokens", 0)
                        if result.get("eos_reason") != "max_new_tokens":
                            finish = "stop"
        finally:
            if not done:  # cancelled, or the consumer went away: free the job's cache pages
                self.generator.cancel(job)
        yield Finished(finish, prompt_tokens, completion_tokens)
