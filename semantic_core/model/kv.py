"""The KV cache adapter: the only code that knows mlx-lm's cache classes.

An agent's cache is a list with one mlx-lm cache object per layer, as `make_prompt_cache(model)`
makes it: `KVCache` for plain attention, `RotatingKVCache` for sliding-window layers (Gemma 3,
many Mistral-family models), `QuantizedKVCache` for quantized KV. Every operation the rest of the
core needs goes through this module, and works through mlx-lm's own cache API (`state` /
`from_state` / `trim` / `is_trimmable` / `merge`), so a cache of any of these kinds is saved,
restored, forked, trimmed and batched correctly:

- `to_states` / `from_states`: a cache as numpy arrays plus scalars (for files), and back. A
  `LayerState` holds a layer's class name, its arrays (keys and values, or the packed words,
  scales and biases of a quantized layer) and the scalar part of mlx-lm's `state` (offset, window,
  ring index, quantization). Arrays are cut to what is valid: a plain layer to its offset; a
  rotating layer that has not wrapped to its write index (a wrapped ring is kept whole, in mlx-lm's
  order, since its order is part of its state).
- `validate`: a saved cache against the loaded model's `CacheSpec` (layer kinds, windows, heads,
  head size, dtype, token count), before it is turned back into MLX arrays.
- `trim_to` / `fork`: keep the first N tokens, in place or as a new cache of views. A plain layer
  always can; a rotating layer only while it has not wrapped (once it has, the tokens it dropped
  are gone), with one exception: dropping exactly the last token of a wrapped ring is exact when the
  next step feeds that token again (the engine's resume and "recompute the last token" paths), since
  the ring slot it vacates is the one the fed token is written to.
- `merge`: caches of several sequences into mlx-lm's batch caches, per layer class (quantized layers
  into `kv_batch.BatchQuantizedKVCache`, which mlx-lm lacks).
- `KVFormat` / `new_cache`: the precision the engine keeps KV in. With 8 or 4 bits every plain layer
  is a `QuantizedKVCache` (MLX's affine quantization along the head dimension, one scale and bias
  per `group_size` values); sliding-window layers keep the model's dtype (mlx-lm has no quantized
  ring). Bytes per token, file contents and the model fingerprint follow the format.

Engine thread only (MLX is not thread-safe); the numpy arrays of `to_states` may then be written
from any thread: they are views of arrays that are never written in place while idle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Cache = list[Any]  # one mlx-lm cache object per layer

PLAIN = "KVCache"
ROTATING = "RotatingKVCache"
QUANTIZED = "QuantizedKVCache"
KINDS = (PLAIN, ROTATING, QUANTIZED)

# numpy has no bfloat16: such arrays are stored as their raw 16-bit words, the dtype kept aside.
_RAW_DTYPES = {"bfloat16": "uint16"}


class CacheMismatch(ValueError):
    """A saved cache that does not fit the loaded model (or is inconsistent in itself)."""


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # PLAIN, ROTATING or QUANTIZED
    window: int | None = None  # max_size of a rotating layer
    bits: int | None = None  # of a quantized layer
    group_size: int | None = None


@dataclass(frozen=True)
class CacheSpec:
    """What the loaded model's cache looks like; every restored cache must match it."""

    layers: tuple[LayerSpec, ...]
    kv_heads: int
    head_dim: int
    dtype: str  # of the keys and values ("float32", "bfloat16", ...)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def bytes_per_token(self, itemsize: int) -> int:
        """KV bytes one token costs across all layers (keys and values; words, scales and biases of a
        quantized layer)."""
        total = 0
        for layer in self.layers:
            if layer.kind == QUANTIZED:
                bits, group = int(layer.bits or 8), int(layer.group_size or 64)
                total += 2 * self.kv_heads * (self.head_dim * bits // 8 + 2 * (self.head_dim // group) * itemsize)
            else:
                total += 2 * self.kv_heads * self.head_dim * itemsize
        return total

    @property
    def kinds(self) -> list[str]:
        return sorted({layer.kind for layer in self.layers})

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for layer in self.layers:
            label = layer.kind if layer.window is None else f"{layer.kind}(window {layer.window})"
            counts[label] = counts.get(label, 0) + 1
        return ", ".join(f"{n} x {label}" for label, n in counts.items())


@dataclass
class LayerState:
    kind: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able scalars, and "dtypes" of raw-stored arrays


@dataclass(frozen=True)
class KVFormat:
    """How KV is held: the model's dtype (bits None) or MLX affine quantization."""

    bits: int | None = None  # 8 or 4; None: unquantized
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in (None, 4, 8):
            raise ValueError(f"KV bits must be 4 or 8 (or none), not {self.bits}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"KV group size must be 32, 64 or 128, not {self.group_size}")

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def tag(self) -> str:
        """Short and stable: part of the model fingerprint and of file headers ("none", "q8g64")."""
        return "none" if self.bits is None else f"q{self.bits}g{self.group_size}"

    def describe(self, dtype: str = "") -> str:
        if self.bits is None:
            return dtype or "unquantized"
        return f"{self.bits}-bit, group {self.group_size}"

    @classmethod
    def parse(cls, bits: str | int | None, group_size: int = 64) -> KVFormat:
        if bits in (None, "none", "", 0):
            return cls(None, group_size)
        return cls(int(bits), group_size)


UNQUANTIZED = KVFormat()


# Making and describing ------------------------------------------------------------------------------


def new_cache(model: Any, fmt: KVFormat = UNQUANTIZED) -> Cache:
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

    cache = list(make_prompt_cache(model))
    if fmt.quantized:
        cache = [
            QuantizedKVCache(group_size=fmt.group_size, bits=int(fmt.bits or 8)) if type(c) is KVCache else c
            for c in cache
        ]
    return cache


def spec_of(cache: Cache) -> CacheSpec:
    """The spec of a cache that holds at least one token (the loader runs one through a fresh one)."""
    layers = []
    heads = dim = 0
    dtype = "float32"
    for layer in cache:
        kind = type(layer).__name__
        if kind not in KINDS:
            raise CacheMismatch(f"cache type {kind} is not supported (supported: {', '.join(KINDS)})")
        if kind == ROTATING:
            layers.append(LayerSpec(kind, window=int(layer.max_size)))
        elif kind == QUANTIZED:
            layers.append(LayerSpec(kind, bits=int(layer.bits), group_size=int(layer.group_size)))
        else:
            layers.append(LayerSpec(kind))
        keys = layer.keys[0] if kind == QUANTIZED else layer.keys
        if keys is not None and not heads:
            heads = int(keys.shape[1])
            dim = int(keys.shape[3]) if kind != QUANTIZED else int(layer.keys[1].shape[3]) * int(layer.group_size)
            dtype = _dtype_name(layer.keys[1].dtype if kind == QUANTIZED else keys.dtype)
    return CacheSpec(tuple(layers), heads, dim, dtype)


def format_tag(kinds: list[str], metas: list[dict[str, Any]]) -> str:
    """The KV format tag ("none", "q8g64") of a saved cache's layers (its first quantized layer)."""
    for kind, meta in zip(kinds, metas, strict=True):
        if kind == QUANTIZED:
            return KVFormat(int(meta["bits"]), int(meta["group_size"])).tag
    return UNQUANTIZED.tag


def spec_format_tag(spec: CacheSpec) -> str:
    for layer in spec.layers:
        if layer.kind == QUANTIZED:
            return KVFormat(layer.bits, int(layer.group_size or 64)).tag
    return UNQUANTIZED.tag


def tokens_held(cache: Cache) -> int:
    """Tokens the cache has seen (its offset)."""
    return int(cache[0].offset) if cache else 0


def nbytes(cache: Cache | None) -> int:
    return sum(int(layer.nbytes) for layer in cache) if cache else 0


# Persisting -------------------------------------------------------------------------------------------


def to_states(cache: Cache) -> list[LayerState]:
    """numpy views of a cache's valid part, with its scalars. Evaluates what is lazy."""
    import mlx.core as mx

    staged: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for layer in cache:
        kind = type(layer).__name__
        if kind == PLAIN:
            n = int(layer.offset)
            arrays = {} if layer.keys is None else {"keys": layer.keys[..., :n, :], "values": layer.values[..., :n, :]}
            meta: dict[str, Any] = {"offset": n}
        elif kind == ROTATING:
            n, idx = int(layer.offset), int(layer._idx)
            meta = {"offset": n, "keep": int(layer.keep), "max_size": int(layer.max_size), "idx": idx}
            if layer.keys is None:
                arrays = {}
            elif n == idx:  # not wrapped: the first idx slots hold every token, in order
                arrays = {"keys": layer.keys[..., :idx, :], "values": layer.values[..., :idx, :]}
            else:  # a wrapped ring: its order is part of its state
                arrays = {"keys": layer.keys, "values": layer.values}
        elif kind == QUANTIZED:
            n = int(layer.offset)
            meta = {"offset": n, "group_size": int(layer.group_size), "bits": int(layer.bits)}
            arrays = {}
            if layer.keys is not None:
                for part, triple in (("keys", layer.keys), ("values", layer.values)):
                    for j, name in enumerate(("q", "scales", "biases")):
                        arrays[f"{part}.{name}"] = triple[j][..., :n, :]
        else:
            raise CacheMismatch(f"cache type {kind} is not supported")
        staged.append((kind, {k: mx.contiguous(v) for k, v in arrays.items()}, meta))
    mx.eval([list(a.values()) for _, a, _ in staged])
    states = []
    for kind, arrays, meta in staged:
        out: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for name, arr in arrays.items():
            dname = _dtype_name(arr.dtype)
            if dname in _RAW_DTYPES:
                dtypes[name] = dname
                arr = arr.view(getattr(mx, _RAW_DTYPES[dname]))
            out[name] = np.asarray(arr)
        if dtypes:
            meta = {**meta, "dtypes": dtypes}
        states.append(LayerState(kind, out, meta))
    return states


def from_states(states: list[LayerState]) -> Cache:
    """MLX caches from saved states (validated first with `validate`)."""
    import mlx.core as mx
    from mlx_lm.models import cache as mlx_cache

    def arr(state: LayerState, name: str) -> Any:
        a = mx.array(state.arrays[name])
        raw = state.meta.get("dtypes", {}).get(name)
        return a.view(getattr(mx, raw)) if raw else a

    caches: Cache = []
    for s in states:
        m = s.meta
        has = bool(s.arrays)
        if s.kind == PLAIN:
            c = mlx_cache.KVCache()
            if has:
                c.keys, c.values = arr(s, "keys"), arr(s, "values")
            c.offset = int(m["offset"])
        elif s.kind == ROTATING:
            c = mlx_cache.RotatingKVCache(max_size=int(m["max_size"]), keep=int(m["keep"]))
            if has:
                c.keys, c.values = arr(s, "keys"), arr(s, "values")
            c.offset, c._idx = int(m["offset"]), int(m["idx"])
        elif s.kind == QUANTIZED:
            c = mlx_cache.QuantizedKVCache(group_size=int(m["group_size"]), bits=int(m["bits"]))
            if has:
                c.keys = tuple(arr(s, f"keys.{n}") for n in ("q", "scales", "biases"))
                c.values = tuple(arr(s, f"values.{n}") for n in ("q", "scales", "biases"))
            c.offset = int(m["offset"])
        else:
            raise CacheMismatch(f"cache type {s.kind} is not supported")
        caches.append(c)
    mx.eval([c.state for c in caches])
    return caches


def validate(
    kinds: list[str],
    metas: list[dict[str, Any]],
    shapes: list[dict[str, tuple[tuple[int, ...], str]]],
    spec: CacheSpec,
    tokens: int,
) -> None:
    """Check a saved cache (per layer: class name, scalars, array shapes and numpy dtypes, as a file's
    header lists them) against the loaded model. Raises CacheMismatch naming the first difference."""
    if tokens == 0 and not kinds:
        return  # an agent that holds nothing yet (created, never prompted)
    if len(kinds) != spec.num_layers:
        raise CacheMismatch(f"{len(kinds)} layers, the loaded model has {spec.num_layers}")
    for i, (kind, meta, arrays, want) in enumerate(zip(kinds, metas, shapes, spec.layers, strict=True)):
        where = f"layer {i}"
        if kind != want.kind:
            raise CacheMismatch(f"{where} is a {kind}, the loaded model makes a {want.kind}")
        offset = meta.get("offset")
        if offset != tokens:
            raise CacheMismatch(f"{where} holds {offset} tokens, the file says {tokens}")
        raw = meta.get("dtypes", {})
        if kind == QUANTIZED:
            if (meta.get("bits"), meta.get("group_size")) != (want.bits, want.group_size):
                raise CacheMismatch(
                    f"{where} is quantized with {meta.get('bits')} bits, group "
                    f"{meta.get('group_size')}; the loaded model uses {want.bits} / {want.group_size}"
                )
            names = {f"{p}.{n}" for p in ("keys", "values") for n in ("q", "scales", "biases")}
        else:
            names = {"keys", "values"}
        if not arrays and tokens == 0:
            continue
        if set(arrays) != names:
            raise CacheMismatch(f"{where} has arrays {sorted(arrays)}, expected {sorted(names)}")
        for name, (shape, dtype) in arrays.items():
            if len(shape) != 4 or shape[0] != 1 or shape[1] != spec.kv_heads:
                raise CacheMismatch(
                    f"{where} {name} has shape {tuple(shape)}: the loaded model has {spec.kv_heads} KV heads"
                )
            if kind == QUANTIZED:
                per_word = 32 // (want.bits or 8)
                last = {"q": spec.head_dim // per_word}.get(name.split(".")[1], spec.head_dim // (want.group_size or 1))
            else:
                last = spec.head_dim
            if shape[3] != last:
                raise CacheMismatch(
                    f"{where} {name} has shape {tuple(shape)}: the loaded model's head size is {spec.head_dim}"
                )
            stored = raw.get(name, dtype)
            expected = "uint32" if name.endswith(".q") else spec.dtype
            if stored != expected:
                raise CacheMismatch(f"{where} {name} is {stored}, the loaded model's cache is {expected}")
            length = shape[2]
            if kind == ROTATING:
                max_size, idx = meta.get("max_size"), meta.get("idx")
                if max_size != want.window:
                    raise CacheMismatch(f"{where} has a window of {max_size}, the loaded model's is {want.window}")
                if not isinstance(idx, int) or not 0 <= idx <= length or length > tokens:
                    raise CacheMismatch(f"{where} has an inconsistent ring (index {idx}, {length} slots)")
            elif length != tokens:
                raise CacheMismatch(f"{where} {name} holds {length} tokens, the file says {tokens}")


# Surgery -------------------------------------------------------------------------------------------


def _wrapped(layer: Any) -> bool:
    return type(layer).__name__ == ROTATING and int(layer.offset) != int(layer._idx)


def can_trim_to(cache: Cache, keep: int) -> bool:
    """Whether `trim_to(cache, keep)` is exact (see the module notes on rotating layers)."""
    for layer in cache:
        drop = int(layer.offset) - keep
        if drop < 0:
            return False
        if drop and type(layer).__name__ == ROTATING and not layer.is_trimmable() and drop != 1:
            return False
    return True


def trim_to(cache: Cache, keep: int) -> None:
    """Forget every token after the first `keep` (check `can_trim_to` first)."""
    if not can_trim_to(cache, keep):
        raise CacheMismatch(f"this cache cannot be cut back to {keep} tokens (a sliding window has moved past them)")
    for layer in cache:
        drop = int(layer.offset) - keep
        if drop:
            layer.trim(drop)


def fork(cache: Cache, length: int) -> Cache | None:
    """A new cache holding the first `length` tokens, sharing the arrays (views; none is written in
    place: the first write of either grows or copies). None when a layer cannot give them."""
    from mlx_lm.models import cache as mlx_cache

    out: Cache = []
    for layer in cache:
        kind = type(layer).__name__
        offset = int(layer.offset)
        if length > offset:
            return None
        if kind == PLAIN:
            c = mlx_cache.KVCache()
            if length and layer.keys is not None:
                c.keys, c.values = layer.keys[..., :length, :], layer.values[..., :length, :]
            c.offset = length
        elif kind == ROTATING:
            c = mlx_cache.RotatingKVCache(max_size=layer.max_size, keep=layer.keep)
            if _wrapped(layer):
                if length != offset:
                    return None
                c.keys, c.values, c.offset, c._idx = layer.keys, layer.values, offset, layer._idx
            else:
                if length and layer.keys is not None:
                    c.keys, c.values = layer.keys[..., :length, :], layer.values[..., :length, :]
                c.offset, c._idx = length, length
        elif kind == QUANTIZED:
            c = mlx_cache.QuantizedKVCache(group_size=layer.group_size, bits=layer.bits)
            if length and layer.keys is not None:
                c.keys = tuple(x[..., :length, :] for x in layer.keys)
                c.values = tuple(x[..., :length, :] for x in layer.values)
            c.offset = length
        else:
            return None
        out.append(c)
    return out


def merge(caches: list[Cache]) -> Cache:
    """The caches of several sequences as one batch cache per layer (mlx-lm's batch classes, and
    ours for quantized layers)."""
    n_layers = len(caches[0])
    out: Cache = []
    for i in range(n_layers):
        layers = [c[i] for c in caches]
        if type(layers[0]).__name__ == QUANTIZED:
            from semantic_core.model.kv_batch import BatchQuantizedKVCache

            out.append(BatchQuantizedKVCache.merge(layers))
        else:
            out.append(type(layers[0]).merge(layers))
    return out


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("mlx.core.")
