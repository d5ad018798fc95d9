"""The on-disk format of a saved agent: one safetensors file per agent.

`<SEMANTIC_AGENT_CACHE_DIR>/agents/<agent id>.safetensors` holds the KV tensors of every layer,
sliced to the tokens actually cached (`layers.007.keys`, shape 1 x kv_heads x tokens x head_dim),
and, in the safetensors header's metadata, everything else:

- `semantic.format`: format version (this module writes "1");
- `semantic.fingerprint` / `semantic.model_id`: the model the cache belongs to (weights, tokenizer,
  config and numerics); a file of another model is refused with ModelMismatch, never used;
- `semantic.tokens`: the token ids the tensors hold, as JSON;
- `semantic.checksum`: SHA-256 over every tensor's name, dtype, shape and bytes;
- `semantic.record`: the agent record (name, system prompt, message history, times, pin) as JSON.

Why one file with the record in its header, not a record beside it or a catalog: a save is then a
single atomic rename (temp file, fsync, rename, fsync of the folder), so no crash can leave a record
and tensors that disagree, and there is no catalog to rebuild or repair. The header is read alone
(without the tensors) to list agents at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semantic_core.agents.record import AgentRecord, validate_agent_id
from semantic_core.errors import ModelMismatch, StorageError

FORMAT_VERSION = "1"
SUFFIX = ".safetensors"

LayerArrays = list[tuple[np.ndarray, np.ndarray]]


class CorruptAgentFile(Exception):
    """A file that fails verification. The store quarantines it."""


@dataclass
class AgentHeader:
    path: Path
    record: AgentRecord
    tokens: list[int]
    fingerprint: str
    model_id: str
    checksum: str
    saved_at: float
    size_bytes: int


def agent_path(agents_dir: Path, agent_id: str) -> Path:
    validate_agent_id(agent_id)
    path = agents_dir / f"{agent_id}{SUFFIX}"
    if path.parent != agents_dir:  # belt and braces: the id pattern already forbids separators
        raise StorageError(f"agent id {agent_id!r} escapes the agents folder")
    return path


def checksum(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(memoryview(arr).cast("B"))
    return "sha256:" + h.hexdigest()


def _tensor_dict(layers: LayerArrays) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i, (k, v) in enumerate(layers):
        out[f"layers.{i:03d}.keys"] = np.ascontiguousarray(k)
        out[f"layers.{i:03d}.values"] = np.ascontiguousarray(v)
    return out


def write_agent_file(
    path: Path,
    record: AgentRecord,
    tokens: list[int],
    layers: LayerArrays,
    *,
    fingerprint: str,
    model_id: str,
) -> int:
    """Write atomically; return the file size. On failure the previous file is untouched."""
    from safetensors.numpy import save_file

    tensors = _tensor_dict(layers)
    for name, arr in tensors.items():
        if arr.ndim != 4 or arr.shape[2] != len(tokens):
            raise ValueError(f"{name} has shape {arr.shape}, which does not hold {len(tokens)} tokens")
    metadata = {
        "semantic.format": FORMAT_VERSION,
        "semantic.fingerprint": fingerprint,
        "semantic.model_id": model_id,
        "semantic.tokens": json.dumps(tokens, separators=(",", ":")),
        "semantic.checksum": checksum(tensors),
        "semantic.record": json.dumps(record.to_json(), ensure_ascii=False),
        "semantic.saved_at": repr(time.time()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise StorageError(f"could not save agent {record.id!r} to {path.parent}: {exc}") from exc
    return path.stat().st_size


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(path: Path) -> AgentHeader:
    """Parse the header only (no tensor bytes are read). Raises CorruptAgentFile."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta: dict[str, Any] = dict(f.metadata() or {})
        size = path.stat().st_size
    except Exception as exc:
        raise CorruptAgentFile(f"unreadable safetensors header: {exc}") from exc
    version = meta.get("semantic.format")
    if version != FORMAT_VERSION:
        raise CorruptAgentFile(f"format version {version!r}, expected {FORMAT_VERSION!r}")
    try:
        tokens = json.loads(meta["semantic.tokens"])
        record = AgentRecord.from_json(json.loads(meta["semantic.record"]))
        header = AgentHeader(
            path=path,
            record=record,
            tokens=[int(t) for t in tokens],
            fingerprint=meta["semantic.fingerprint"],
            model_id=meta.get("semantic.model_id", "?"),
            checksum=meta["semantic.checksum"],
            saved_at=float(meta.get("semantic.saved_at", "0")),
            size_bytes=size,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptAgentFile(f"bad metadata: {exc!r}") from exc
    if path.stem != record.id:
        raise CorruptAgentFile(f"file name {path.name!r} does not match agent id {record.id!r}")
    return header


def read_agent_file(path: Path, fingerprint: str) -> tuple[AgentHeader, LayerArrays]:
    """Read and verify everything. Raises ModelMismatch (valid file, other model) or CorruptAgentFile."""
    from safetensors.numpy import load_file

    header = read_header(path)
    if header.fingerprint != fingerprint:
        raise ModelMismatch(
            f"agent {header.record.id!r} was saved with model {header.model_id!r} "
            f"(fingerprint {header.fingerprint[:12]}), not the loaded model (fingerprint {fingerprint[:12]}); "
            "load that model to use it, or delete the agent"
        )
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CorruptAgentFile(f"unreadable tensors: {exc}") from exc
    if checksum(tensors) != header.checksum:
        raise CorruptAgentFile("checksum mismatch: the tensor bytes changed after they were written")
    n_layers = len(tensors) // 2
    layers: LayerArrays = []
    for i in range(n_layers):
        try:
            k, v = tensors[f"layers.{i:03d}.keys"], tensors[f"layers.{i:03d}.values"]
        except KeyError as exc:
            raise CorruptAgentFile(f"missing tensor {exc}") from exc
        if k.shape[2] != len(header.tokens) or v.shape[2] != len(header.tokens):
            raise CorruptAgentFile(f"layer {i} holds {k.shape[2]} tokens, the header says {len(header.tokens)}")
        layers.append((k, v))
    if len(tensors) != 2 * n_layers:
        raise CorruptAgentFile("odd number of tensors")
    return header, layers


def quarantine(path: Path, quarantine_dir: Path, reason: str) -> Path:
    """Move a failed file aside (never deleted: a person may want to look at it)."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = quarantine_dir / f"{path.name}.{stamp}-{secrets.token_hex(2)}"
    shutil.move(str(path), target)
    target.with_name(target.name + ".reason.txt").write_text(reason + "\n")
    return target


def stale_temp_files(agents_dir: Path) -> list[Path]:
    """Temp files left by a save that was killed before its rename."""
    return sorted(agents_dir.glob(f".*{SUFFIX}.tmp-*"))
