"""The on-disk format of a saved agent: one safetensors file per agent.

`<SEMANTIC_AGENT_CACHE_DIR>/agents/<agent id>.safetensors` holds the arrays of every layer's KV cache,
cut to what is valid (`layers.007.keys`, `layers.007.values`; a quantized layer has `keys.q`,
`keys.scales`, `keys.biases` ...), as the KV adapter (`semantic_core.model.kv`) lays them out, and, in
the safetensors header's metadata, everything else:

- `semantic.format`: format version ("3"; files of format "2", which do not name their KV format,
  and "1", plain KV caches of float tensors only, are still read);
- `semantic.kv_format`: how the KV is held ("none": the model's dtype; "q8g64": 8-bit codes with a
  scale and bias per 64 values, ...), also part of the fingerprint, so a server keeping another KV
  format refuses the file with a message that says so;
- `semantic.layers`: per layer, its cache class and the scalars of its state (offset, window, ring
  index, quantization), as JSON;
- `semantic.fingerprint` / `semantic.model_id`: the model the cache belongs to (weights, tokenizer,
  config and numerics, KV format included); a file of another model is refused with ModelMismatch,
  never used;
- `semantic.tokens`: the token ids the cache holds, as JSON;
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
point anywhere), format version, fingerprint, checksum, and the layers' kinds, scalars, shapes and
dtypes against the loaded model (from the header, before any tensor is read), and token ids against
its vocabulary. A file that fails is quarantined.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semantic_core.agents.record import AgentRecord, validate_agent_id
from semantic_core.errors import ModelMismatch, StorageError
from semantic_core.model import kv

FORMAT_VERSION = "3"
READABLE_FORMATS = ("1", "2", "3")
SUFFIX = ".safetensors"
JOURNAL_SUFFIX = ".turn.json"
JOURNAL_FORMAT = 1


class CorruptAgentFile(Exception):
    """A file that fails verification. The store quarantines it."""


@dataclass(frozen=True)
class Expectations:
    """What a file must hold to be loaded into the loaded model: its cache layout and vocabulary."""

    spec: kv.CacheSpec
    vocab_size: int = 0  # 0: token ids are not checked

    def check(self, header: AgentHeader) -> None:
        tokens = header.tokens
        if self.vocab_size and tokens and (min(tokens) < 0 or max(tokens) >= self.vocab_size):
            raise CorruptAgentFile(f"token ids outside the model's vocabulary (0..{self.vocab_size - 1})")
        try:
            kv.validate(
                [layer["kind"] for layer in header.layers],
                [layer["meta"] for layer in header.layers],
                header.layer_shapes(),
                self.spec,
                len(tokens),
            )
        except kv.CacheMismatch as exc:
            raise CorruptAgentFile(f"the cache does not fit the loaded model: {exc}") from exc
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CorruptAgentFile(f"malformed layer metadata: {exc!r}") from exc


_SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "I8": "int8",
    "U32": "uint32",
}


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
    format: str = FORMAT_VERSION
    kv_format: str = "none"
    layers: list[dict[str, Any]] = field(default_factory=list)  # per layer: {"kind", "meta"}
    shapes: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # tensor -> (shape, dtype)

    def layer_shapes(self) -> list[dict[str, tuple[tuple[int, ...], str]]]:
        """The tensors of each layer, by their name within the layer."""
        out: list[dict[str, tuple[tuple[int, ...], str]]] = [{} for _ in self.layers]
        for name, shape in self.shapes.items():
            parts = name.split(".", 2)
            if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) < len(out):
                out[int(parts[1])][parts[2]] = shape
            else:
                out.append({name: shape})  # a stray tensor: the layer count then disagrees
        return out


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
        h.update(arr.data.cast("B"))
    return "sha256:" + h.hexdigest()


def _tensor_dict(states: list[kv.LayerState]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i, state in enumerate(states):
        for name, arr in state.arrays.items():
            out[f"layers.{i:03d}.{name}"] = np.ascontiguousarray(arr)
    return out


def write_agent_file(
    path: Path,
    record: AgentRecord,
    tokens: list[int],
    states: list[kv.LayerState],
    *,
    fingerprint: str,
    model_id: str,
) -> int:
    """Write atomically; return the file size. On failure the previous file is untouched."""
    from safetensors.numpy import save_file

    tensors = _tensor_dict(states)
    for state in states:
        if state.meta.get("offset", len(tokens)) != len(tokens):
            raise ValueError(f"a {state.kind} layer holds {state.meta.get('offset')} tokens, not {len(tokens)}")
    metadata = {
        "semantic.format": FORMAT_VERSION,
        "semantic.kv_format": kv.format_tag([st.kind for st in states], [st.meta for st in states]),
        "semantic.layers": json.dumps([{"kind": st.kind, "meta": st.meta} for st in states], separators=(",", ":")),
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
    body = json.dumps(
        {
            "format": JOURNAL_FORMAT,
            "fingerprint": fingerprint,
            "model_id": model_id,
            "saved_at": time.time(),
            "record": record.to_json(),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
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
    if not path.exists():
        return
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
                shapes[name] = (
                    tuple(int(d) for d in sl.get_shape()),
                    _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()),
                )
        size = path.stat().st_size
    except Exception as exc:
        raise CorruptAgentFile(f"unreadable safetensors header: {exc}") from exc
    version = meta.get("semantic.format")
    if version not in READABLE_FORMATS:
        raise CorruptAgentFile(f"format version {version!r}, expected one of {', '.join(READABLE_FORMATS)}")
    try:
        tokens = json.loads(meta["semantic.tokens"])
        record = AgentRecord.from_json(json.loads(meta["semantic.record"]))
        if version == "1":
            # Format 1: plain KV caches, `layers.NNN.keys|values`, every layer holding every token.
            n_layers = len({name.split(".")[1] for name in shapes if name.startswith("layers.")})
            layers = [{"kind": kv.PLAIN, "meta": {"offset": len(tokens)}} for _ in range(n_layers)]
        else:
            layers = json.loads(meta["semantic.layers"])
            if not isinstance(layers, list) or not all(
                isinstance(x, dict) and "kind" in x and "meta" in x for x in layers
            ):
                raise ValueError("semantic.layers is not a list of layers")
        header = AgentHeader(
            path=path,
            record=record,
            tokens=[int(t) for t in tokens],
            fingerprint=meta["semantic.fingerprint"],
            model_id=meta.get("semantic.model_id", "?"),
            checksum=meta["semantic.checksum"],
            saved_at=float(meta.get("semantic.saved_at", "0")),
            size_bytes=size,
            format=version,
            kv_format=str(meta.get("semantic.kv_format", "none")),
            layers=layers,
            shapes=shapes,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise CorruptAgentFile(f"bad metadata: {exc!r}") from exc
    if path.stem != record.id:
        raise CorruptAgentFile(f"file name {path.name!r} does not match agent id {record.id!r}")
    return header


def kv_format_mismatch(header: AgentHeader, expect: Expectations, model_id: str) -> str | None:
    """Why a file of this model (`model_id`) cannot be used, when the reason is its KV format (else None)."""
    want = kv.spec_format_tag(expect.spec)
    if header.model_id != model_id or header.kv_format == want:
        return None
    return (
        f"agent {header.record.id!r} was saved with KV format {header.kv_format!r}, and this server keeps "
        f"{want!r} (SEMANTIC_MLX_KV_BITS, SEMANTIC_MLX_KV_GROUP_SIZE): restart with that format to use its "
        f"cache, or rehome the agent (POST /v1/agents/{header.record.id}/rehome: its conversation is kept, "
        "its cache recomputed on the next turn)"
    )


def read_agent_file(
    path: Path, fingerprint: str, expect: Expectations | None = None
) -> tuple[AgentHeader, list[kv.LayerState]]:
    """Read and verify everything. Raises ModelMismatch (valid file, other model) or CorruptAgentFile."""
    from safetensors.numpy import load_file

    header = read_header(path)
    if header.fingerprint != fingerprint:
        raise ModelMismatch(
            f"agent {header.record.id!r} was saved with model {header.model_id!r} "
            f"(fingerprint {header.fingerprint[:12]}), not the loaded model (fingerprint {fingerprint[:12]}); "
            "load that model to use it, or delete the agent"
        )
    if expect is not None:
        # Before reading the tensors: a file that claims this model but does not fit it would
        # otherwise fail deep inside a forward pass.
        expect.check(header)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CorruptAgentFile(f"unreadable tensors: {type(exc).__name__}") from exc
    if checksum(tensors) != header.checksum:
        raise CorruptAgentFile("checksum mismatch: the tensor bytes changed after they were written")
    states = [kv.LayerState(layer["kind"], {}, dict(layer["meta"])) for layer in header.layers]
    for name, arr in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(states):
            raise CorruptAgentFile(f"unexpected tensor {name!r}")
        states[int(parts[1])].arrays[parts[2]] = arr
    for i, state in enumerate(states):
        if header.tokens and not state.arrays:
            raise CorruptAgentFile(f"layer {i} has no tensors")
    return header, states


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
