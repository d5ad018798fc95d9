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

The turn journal, `<agent id>.turn.json`: writing the KV tensors of a long conversation takes tens to
hundreds of milliseconds, too long to hold every answer for. So when a turn ends, its record alone
(the conversation with the new answer, a few KB) is written atomically and fsync'd first, and the
response completes only then; the tensors follow on the writer thread. On start-up a journal newer
than its agent's file (by the record's `revision`) supplies the record, and the file the tensors: the
cached tokens are then a prefix of the conversation, and the next turn computes the rest, as it
would after any edit. A journal is removed once a file at least as new is written.

Every file is checked when read: regular files only (a FIFO would block start-up, a symlink could
point anywhere), format version, fingerprint, checksum, and the tensors' number, shapes and dtype
against the loaded model, and token ids against its vocabulary. A file that fails is quarantined.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
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
JOURNAL_SUFFIX = ".turn.json"
JOURNAL_FORMAT = 1

LayerArrays = list[tuple[np.ndarray, np.ndarray]]


class CorruptAgentFile(Exception):
    """A file that fails verification. The store quarantines it."""


@dataclass(frozen=True)
class KVGeometry:
    """What the loaded model's KV cache looks like: every file must match it to be loaded."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # numpy's name: "float32", "float16"
    vocab_size: int = 0  # 0: token ids are not checked

    def check_tokens(self, tokens: list[int]) -> None:
        if self.vocab_size and tokens and (min(tokens) < 0 or max(tokens) >= self.vocab_size):
            raise CorruptAgentFile(f"token ids outside the model's vocabulary (0..{self.vocab_size - 1})")

    def check_shapes(self, shapes: dict[str, tuple[tuple[int, ...], str]], tokens: int) -> None:
        """`shapes`: tensor name -> (shape, numpy dtype name)."""
        expected = {f"layers.{i:03d}.{part}" for i in range(self.num_layers) for part in ("keys", "values")}
        if set(shapes) != expected:
            raise CorruptAgentFile(
                f"{len(shapes)} tensors for {self.num_layers} layers, expected {len(expected)} "
                "(the file does not fit the loaded model)")
        want = (1, self.kv_heads, tokens, self.head_dim)
        for name in sorted(shapes):
            shape, dtype = shapes[name]
            if tuple(shape) != want:
                raise CorruptAgentFile(f"{name} has shape {tuple(shape)}, the loaded model needs {want}")
            if dtype != self.dtype:
                raise CorruptAgentFile(f"{name} is {dtype}, the loaded model's KV cache is {self.dtype}")


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                       "I32": "int32", "I64": "int64", "U8": "uint8", "I8": "int8", "U32": "uint32"}


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
    shapes: dict[str, tuple[tuple[int, ...], str]] | None = None


def agent_path(agents_dir: Path, agent_id: str) -> Path:
    validate_agent_id(agent_id)
    path = agents_dir / f"{agent_id}{SUFFIX}"
    if path.parent != agents_dir:  # belt and braces: the id pattern already forbids separators
        raise StorageError(f"agent id {agent_id!r} escapes the agents folder")
    return path


def journal_path(agents_dir: Path, agent_id: str) -> Path:
    validate_agent_id(agent_id)
    return agents_dir / f"{agent_id}{JOURNAL_SUFFIX}"


_PATH_RE = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s'\"]+")


def _os_reason(exc: BaseException) -> str:
    """Why an I/O operation failed, without the absolute paths it names (paths stay in the logs,
    never in messages that reach a client)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = _PATH_RE.sub("<path>", str(exc))[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_regular_file(path: Path) -> None:
    """Only plain files are read: a FIFO would block the reader forever, a device or a symlink
    could read anything on the machine."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise CorruptAgentFile(f"cannot stat the file: {_os_reason(exc)}") from exc
    if not stat.S_ISREG(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
        raise CorruptAgentFile(f"{path.name} is {kind}")


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
        raise StorageError(f"could not save agent {record.id!r}: {_os_reason(exc)}") from exc
    return path.stat().st_size


def write_journal(path: Path, record: AgentRecord, *, fingerprint: str, model_id: str) -> int:
    """Write the record of a finished turn atomically and durably (fsync of file and folder)."""
    body = json.dumps({
        "format": JOURNAL_FORMAT, "fingerprint": fingerprint, "model_id": model_id,
        "saved_at": time.time(), "record": record.to_json(),
    }, ensure_ascii=False, separators=(",", ":")).encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise StorageError(f"could not save the turn of agent {record.id!r}: {_os_reason(exc)}") from exc
    return len(body)


def read_journal(path: Path) -> tuple[AgentRecord, str]:
    """(record, fingerprint) of a turn journal. Raises CorruptAgentFile."""
    check_regular_file(path)
    try:
        data = json.loads(path.read_bytes())
        if data.get("format") != JOURNAL_FORMAT:
            raise ValueError(f"journal format {data.get('format')!r}")
        record = AgentRecord.from_json(data["record"])
        fingerprint = str(data["fingerprint"])
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CorruptAgentFile(f"bad turn journal: {exc!r}") from exc
    if path.name != f"{record.id}{JOURNAL_SUFFIX}":
        raise CorruptAgentFile(f"journal name {path.name!r} does not match agent id {record.id!r}")
    return record, fingerprint


def remove_journal_if_covered(path: Path, revision: int) -> None:
    """Remove a journal once a file with a record at least this new is on disk."""
    try:
        record, _ = read_journal(path)
    except CorruptAgentFile:
        return
    if record.revision <= revision:
        with contextlib.suppress(OSError):
            path.unlink()
            _fsync_dir(path.parent)


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

    check_regular_file(path)
    try:
        with safe_open(str(path), framework="np") as f:
            meta: dict[str, Any] = dict(f.metadata() or {})
            shapes = {}
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(name)
                shapes[name] = (tuple(int(d) for d in sl.get_shape()),
                                _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
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
            shapes=shapes,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptAgentFile(f"bad metadata: {exc!r}") from exc
    if path.stem != record.id:
        raise CorruptAgentFile(f"file name {path.name!r} does not match agent id {record.id!r}")
    return header


def read_agent_file(
    path: Path, fingerprint: str, geometry: KVGeometry | None = None
) -> tuple[AgentHeader, LayerArrays]:
    """Read and verify everything. Raises ModelMismatch (valid file, other model) or CorruptAgentFile."""
    from safetensors.numpy import load_file

    header = read_header(path)
    if geometry is not None and header.fingerprint == fingerprint:
        # Before reading the tensors: a file that claims this model but does not fit it would
        # otherwise fail deep inside a forward pass.
        geometry.check_tokens(header.tokens)
        if header.shapes:
            geometry.check_shapes(header.shapes, len(header.tokens))
    if header.fingerprint != fingerprint:
        raise ModelMismatch(
            f"agent {header.record.id!r} was saved with model {header.model_id!r} "
            f"(fingerprint {header.fingerprint[:12]}), not the loaded model (fingerprint {fingerprint[:12]}); "
            "load that model to use it, or delete the agent"
        )
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CorruptAgentFile(f"unreadable tensors: {type(exc).__name__}") from exc
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
    """Temp files left by a save (or a turn journal) that was killed before its rename."""
    return sorted([*agents_dir.glob(f".*{SUFFIX}.tmp-*"), *agents_dir.glob(f".*{JOURNAL_SUFFIX}.tmp-*")])
