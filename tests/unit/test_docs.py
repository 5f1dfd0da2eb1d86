"""README and CI stay true: every setting documented, the CI entry point is `make test`."""

from pathlib import Path

import pytest

from services.api.settings import ApiSettings
from services.embed.settings import EmbedSettings
from services.generate.settings import GenerateSettings
from services.retrieve.settings import RetrieveSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cls", [ApiSettings, EmbedSettings, RetrieveSettings, GenerateSettings])
def test_every_setting_is_in_the_readme(cls) -> None:
    readme = (ROOT / "README.md").read_text()
    prefix = cls.model_config["env_prefix"]
    missing = [
        f"{prefix}{name.upper()}"
        for name in cls.model_fields
        if f"`{prefix}{name.upper()}`" not in readme
    ]
    assert not missing, f"README.md does not document {missing}: regenerate the table"


def test_ci_runs_exactly_make_test() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[-1] == "exec make test"


def test_readme_settings_tables_are_current() -> None:
    from cli.main import settings_markdown

    assert settings_markdown() in (ROOT / "README.md").read_text(), (
        "README.md's settings tables are stale: paste the output of `ragline settings`"
    )
