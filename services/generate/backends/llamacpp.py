"""llama.cpp (GGUF) on CPU through llama-cpp-python.

The chat template comes from the model's GGUF metadata. The prompt is templated and tokenised
here, so its length is known before any compute: a prompt that leaves no room for one new
token is refused, and max_tokens is clamped to what the context still holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ragline.errors import InvalidArgument
from services.generate.backends.base import Backend, ChatMessage, Finished, SamplingParams

log = logging.getLogger(__name__)


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self, model_path: Path, context_length: int = 2048, threads: int = 0) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not Path(model_path).is_file():
            raise FileNotFoundError(f"llama.cpp needs a .gguf file; {model_path} is not one")
        self.llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=context_length,
            n_threads=threads or os.cpu_count() or 1,
            verbose=False,
        )
        self.context_length = self.llm.n_ctx()
        self.model_name = self.llm.metadata.get("general.name") or Path(model_path).stem
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{model_path} carries no tokenizer.chat_template in its metadata")
        model = self.llm._model
        self.formatter = Jinja2ChatFormatter(
            template,
            eos_token=model.token_get_text(self.llm.token_eos()),
            bos_token=model.token_get_text(self.llm.token_bos()),
        )

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> tuple[list[int], list[str]]:
        formatted = self.formatter(
            messages=[{"role": m.role, "content": m.content} for m in messages]
        )
        tokens = self.llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=False, special=True)
        stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop or ""]
        return tokens, [s for s in stops if s]

    def generate(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[str | Finished]:
        tokens, template_stops = self.prompt_tokens(messages)
        room = self.context_length - len(tokens)
        if room < 1:
            raise InvalidArgument(
                f"prompt is {len(tokens)} tokens; the context holds {self.context_length}: "
                "shorten the messages or retrieve fewer passages"
            )
        max_tokens = min(params.max_tokens, room)
        stream = self.llm.create_completion(
            prompt=tokens,
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            repeat_penalty=params.repetition_penalty,
            stop=[*template_stops, *params.stop],
            stream=True,
        )
        text: list[str] = []
        finish = "length"
        for chunk in stream:
            if should_stop():
                finish = "cancelled"
                break
            choice = chunk["choices"][0]
            if choice["text"]:
                text.append(choice["text"])
                yield choice["text"]
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        stream.close()
        completion = "".join(text)
        completion_tokens = (
            len(self.llm.tokenize(completion.encode("utf-8"), add_bos=False, special=False))
            if completion
            else 0
        )
        yield Finished(finish, len(tokens), completion_tokens)
