"""Chat templates of common model families, found and rendered as the exllamav2 backend does.

The template texts are the families' own (SmolLM2's is read from the GGUF ragline ships)."""

from __future__ import annotations

import json

import pytest

from services.generate.backends.base import ChatMessage
from services.generate.chat_template import ChatTemplate, eos_token_ids, find_template
from services.generate.settings import GenerateSettings

GEMMA2 = (  # google/gemma-2-*-it tokenizer_config.json: refuses a system turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
    "not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user')"
    " != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MESSAGES = [ChatMessage("system", "Use the sources."), ChatMessage("user", "How many days?")]


def smollm2_template() -> str:
    from llama_cpp import Llama

    from ragline.models import DEFAULT_GENERATE_MODEL, resolve_generate_model

    path = resolve_generate_model(DEFAULT_GENERATE_MODEL)
    llm = Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    return llm.metadata["tokenizer.chat_template"]


def test_a_template_that_accepts_a_system_turn_renders_it_as_is() -> None:
    chatml = ChatTemplate(smollm2_template())
    assert chatml.render(MESSAGES) == (
        "<|im_start|>system\nUse the sources.<|im_end|>\n<|im_start|>user\nHow many days?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    llama3 = ChatTemplate(LLAMA3, bos_token="<|begin_of_text|>")
    assert llama3.render(MESSAGES).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nUse the sources.<|eot_id|>"
    )
    assert not chatml.folds_system and not llama3.folds_system


def test_a_template_that_refuses_a_system_turn_gets_it_folded_into_the_first_user_turn() -> None:
    gemma = ChatTemplate(GEMMA2, bos_token="<bos>")
    assert gemma.render(MESSAGES) == (
        "<bos><start_of_turn>user\nUse the sources.\n\nHow many days?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert gemma.folds_system  # remembered: the next request folds without a failed render
    history = [*MESSAGES, ChatMessage("assistant", "30."), ChatMessage("user", "And then?")]
    assert gemma.render(history).count("<start_of_turn>user") == 2


def test_other_refusals_are_a_clear_error() -> None:
    gemma = ChatTemplate(GEMMA2)
    with pytest.raises(ValueError, match="roles must alternate"):
        gemma.render([ChatMessage("user", "a"), ChatMessage("user", "b")])


def test_discovery_prefers_chat_template_jinja_then_named_templates(tmp_path) -> None:
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": LLAMA3}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert find_template(tmp_path) == LLAMA3
    (tmp_path / "chat_template.jinja").write_text(GEMMA2)
    assert find_template(tmp_path) == GEMMA2
    with pytest.raises(ValueError, match="chat_template.jinja and tokenizer_config.json"):
        find_template(tmp_path / "missing")


def test_every_end_of_turn_id_stops_generation(tmp_path) -> None:
    # Llama 3 Instruct: the tokenizer's EOS is <|end_of_text|> (128001); turns end with
    # <|eot_id|> (128009), listed in generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 128001}))
    assert eos_token_ids(tmp_path, 128001) == [128001, 128009]
    assert eos_token_ids(tmp_path / "none", 2) == [2]


def test_exllamav2_cache_lengths_must_be_whole_pages() -> None:
    assert GenerateSettings(backend="exllamav2").kv_cells() % 256 == 0
    with pytest.raises(ValueError, match="multiple of 256.*1024"):
        GenerateSettings(backend="exllamav2", context_length=1000, max_batch_size=1)
    GenerateSettings(backend="llamacpp", context_length=1000, max_batch_size=1)  # not paged
