import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragline.config import GrpcServiceSettings, load_settings


class DemoSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGLINE_DEMO_", extra="forbid", frozen=True)
    port: int = Field(50099, ge=0, le=65535, description="port")
    workers: int = Field(1, ge=1, description="worker threads")
    warm: bool = Field(True, description="warm up at start")


def test_flags_override_env_which_overrides_defaults(monkeypatch) -> None:
    assert load_settings(DemoSettings, []).workers == 1
    monkeypatch.setenv("RAGLINE_DEMO_WORKERS", "3")
    monkeypatch.setenv("RAGLINE_DEMO_PORT", "6000")
    s = load_settings(DemoSettings, ["--workers", "5", "--no-warm"])
    assert (s.workers, s.port, s.warm) == (5, 6000, False)


def test_bad_value_exits_with_a_message_naming_the_field(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(DemoSettings, ["--workers", "0"])
    assert exc.value.code == 2
    assert "workers" in capsys.readouterr().err


def test_help_lists_env_names(capsys) -> None:
    with pytest.raises(SystemExit):
        load_settings(DemoSettings, ["--help"])
    assert "RAGLINE_DEMO_WORKERS" in capsys.readouterr().out


def test_generate_backend_choices_are_the_registry() -> None:
    import typing

    from services.generate.backends import BACKENDS, backend_class
    from services.generate.settings import GenerateSettings

    choices = typing.get_args(GenerateSettings.model_fields["backend"].annotation)
    assert set(choices) == set(BACKENDS)
    with pytest.raises(ValueError, match="use one of llamacpp, exllamav2"):
        backend_class("vllm")
    assert backend_class("llamacpp").name == "llamacpp"
