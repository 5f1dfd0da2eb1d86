"""A Hugging Face model directory's chat template, found and rendered the way transformers does.

Used by the exllamav2 backend (llama.cpp reads the template from the GGUF's metadata):
- **Discovery**: ``chat_template.jinja`` (transformers >= 4.43 saves the template there), else
  ``tokenizer_config.json``'s ``chat_template``, a string or a list of named templates (the
  one named ``default``, else the first).
- **Rendering**: a sandboxed Jinja environment with transformers' helpers (``raise_exception``,
  ``strftime_now``), so a template that rejects input says so instead of rendering garbage.
- **System role**: templates that refuse one (Gemma: "System role not supported") get the
  system prompt folded into the first user turn, as transformers' users do by hand.
- **End of turn**: every EOS id the model declares (``generation_config.json`` and
  ``config.json`` may list several: Llama 3 Instruct ends turns with ``<|eot_id|>``, not its
  tokenizer's ``<|end_of_text|>``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from services.generate.backends.base import ChatMessage


def find_template(model_dir: Path) -> str:
    """The chat template's source; ValueError naming where it looked."""
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    cfg_path = model_dir / "tokenizer_config.json"
    template = None
    if cfg_path.is_file():
        template = json.loads(cfg_path.read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not isinstance(template, str) or not template.strip():
        raise ValueError(
            f"{model_dir} has no chat template: looked for chat_template.jinja and "
            "tokenizer_config.json's chat_template"
        )
    return template


def eos_token_ids(model_dir: Path, tokenizer_eos: int | None = None) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS plus generation_config.json's and
    config.json's ``eos_token_id`` (an int or a list)."""
    ids: set[int] = set() if tokenizer_eos is None else {int(tokenizer_eos)}
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text()).get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int):
                ids.add(v)
    return sorted(ids)


def fold_system(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The system message's text put in front of the first user turn."""
    if not messages or messages[0].role != "system":
        return list(messages)
    system, rest = messages[0].content, list(messages[1:])
    for i, m in enumerate(rest):
        if m.role == "user":
            rest[i] = ChatMessage("user", f"{system}\n\n{m.content}")
            return rest
    return [ChatMessage("user", system), *rest]


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        self._error = TemplateError
        self.bos_token, self.eos_token = bos_token, eos_token
        self.folds_system = False  # set once the template refused a system turn

    @classmethod
    def from_dir(cls, model_dir: Path, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        return cls(find_template(model_dir), bos_token, eos_token)

    def _render(self, messages: Sequence[ChatMessage]) -> str:
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text; a template that refuses a system turn gets it folded into the first
        user turn. Other refusals (e.g. roles that do not alternate) raise ValueError."""
        if self.folds_system:
            messages = fold_system(messages)
        try:
            return self._render(messages)
        except self._error as exc:
            if not messages or messages[0].role != "system":
                raise ValueError(f"the model's chat template refused the messages: {exc}") from None
        self.folds_system = True
        try:
            return self._render(fold_system(messages))
        except self._error as exc:
            raise ValueError(f"the model's chat template refused the messages: {exc}") from None
