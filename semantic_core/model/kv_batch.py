"""A batch cache for quantized KV: what mlx-lm has for plain layers (`BatchKVCache`) but not for
`QuantizedKVCache`, so sequences with quantized caches can decode in one batch.

Part of the KV adapter (`kv.py` imports it when it merges quantized layers). It keeps mlx-lm's batch
conventions exactly, so `GenerationBatch` and the models' attention use it unchanged:

- sequences are left-padded to a common length; `left_padding` and the per-sequence `offset` (an
  array) are those of `BatchKVCache`, and `make_mask` is its causal mask with the padding masked;
- keys and values are (packed words, scales, biases) triples in MLX's affine layout, as in
  `QuantizedKVCache`; `bits` and `group_size` are attributes, which is how mlx-lm's
  `scaled_dot_product_attention` knows to take its quantized path;
- padding slots hold zero words, scales and biases (they dequantize to 0 and are masked anyway).

`extract` gives a sequence back as a `QuantizedKVCache` holding exactly its tokens; `merge` builds the
batch from such caches; `filter` and `extend` follow a batch's membership, as mlx-lm's do.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, QuantizedKVCache, dynamic_roll

Triple = Any  # (packed words, scales, biases)


def _zeros(batch: int, heads: int, length: int, dim: int, dtype: Any, bits: int, group_size: int) -> Triple:
    per_word = 32 // bits
    return (
        mx.zeros((batch, heads, length, dim // per_word), dtype=mx.uint32),
        mx.zeros((batch, heads, length, dim // group_size), dtype=dtype),
        mx.zeros((batch, heads, length, dim // group_size), dtype=dtype),
    )


def _dim(triple: Triple, bits: int) -> int:
    return int(triple[0].shape[-1]) * (32 // bits)


class BatchQuantizedKVCache(BatchKVCache):  # type: ignore[misc]  # mlx-lm is untyped
    step = 256
    # What BatchKVCache sets, typed here: triples (or None), per-sequence arrays, the write index.
    keys: Any
    values: Any
    offset: Any
    left_padding: Any
    _idx: int
    _right_padding: Any

    def __init__(self, left_padding: list[int], group_size: int = 64, bits: int = 8) -> None:
        super().__init__(left_padding)
        self.group_size = group_size
        self.bits = bits

    # Writing ---------------------------------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        prev, n = self._idx, int(keys.shape[2])
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            b, heads, _, dk = keys.shape
            dv = values.shape[3]
            length = (self.step + n - 1) // self.step * self.step
            new_k = _zeros(b, heads, length, dk, keys.dtype, self.bits, self.group_size)
            new_v = _zeros(b, heads, length, dv, values.dtype, self.bits, self.group_size)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                if prev % self.step != 0:
                    self.keys = tuple(x[..., :prev, :] for x in self.keys)
                    self.values = tuple(x[..., :prev, :] for x in self.values)
                self.keys = tuple(mx.concatenate([x, y], axis=2) for x, y in zip(self.keys, new_k, strict=True))
                self.values = tuple(mx.concatenate([x, y], axis=2) for x, y in zip(self.values, new_v, strict=True))
        self.offset = self.offset + n
        self._idx += n
        qk = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        qv = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        for i in range(3):
            self.keys[i][..., prev : self._idx, :] = qk[i]
            self.values[i][..., prev : self._idx, :] = qv[i]
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Triple, Triple]:
        n = self._idx
        return tuple(x[..., :n, :] for x in self.keys), tuple(x[..., :n, :] for x in self.values)

    def finalize(self) -> None:
        """After a right-padded prefill (mlx-lm's `prepare(right_padding=...)`): roll each sequence's
        padding to the left, as `BatchKVCache.finalize` does, for each array of the triples."""
        if self._right_padding is None:
            return
        padding = self._right_padding[:, None]
        if self.keys is not None:
            self.keys = tuple(dynamic_roll(x, padding, axis=2) for x in self.keys)
            self.values = tuple(dynamic_roll(x, padding, axis=2) for x in self.values)
        self.offset = self.offset - self._right_padding
        self.left_padding = self.left_padding + self._right_padding
        self._right_padding = None

    # Membership ------------------------------------------------------------------------------------

    def filter(self, batch_indices: Any) -> None:
        if self.keys is not None:
            self.keys = tuple(x[batch_indices] for x in self.keys)
            self.values = tuple(x[batch_indices] for x in self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())
        if shift > 0:
            if self.keys is not None:
                self.keys = tuple(x[..., shift:, :] for x in self.keys)
                self.values = tuple(x[..., shift:, :] for x in self.values)
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: BatchQuantizedKVCache) -> None:
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        ref = self if self.keys is not None else other
        heads = int(ref.keys[0].shape[1])
        dk, dv = _dim(ref.keys, self.bits), _dim(ref.values, self.bits)
        dtype = ref.keys[1].dtype
        top = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def pad(c: BatchQuantizedKVCache) -> tuple[Triple, Triple, mx.array, mx.array]:
            k, v = c.keys, c.values
            if k is None:
                rows = int(c.offset.shape[0])
                k = _zeros(rows, heads, 0, dk, dtype, self.bits, self.group_size)
                v = _zeros(rows, heads, 0, dv, dtype, self.bits, self.group_size)
            left = top - c._idx
            right = size - int(k[0].shape[2]) - left
            if right < 0:
                k = tuple(x[..., :right, :] for x in k)
                v = tuple(x[..., :right, :] for x in v)
                right = 0
            if left or right:
                widths = [(0, 0), (0, 0), (left, right), (0, 0)]
                k = tuple(mx.pad(x, widths) for x in k)
                v = tuple(mx.pad(x, widths) for x in v)
            return k, v, c.offset, c.left_padding + left

        (ka, va, oa, la), (kb, vb, ob, lb) = pad(self), pad(other)
        self.keys = tuple(mx.concatenate([x, y]) for x, y in zip(ka, kb, strict=True))
        self.values = tuple(mx.concatenate([x, y]) for x, y in zip(va, vb, strict=True))
        self.offset = mx.concatenate([oa, ob])
        self.left_padding = mx.concatenate([la, lb])
        self._idx = top

    def extract(self, idx: int) -> QuantizedKVCache:
        cache = QuantizedKVCache(group_size=self.group_size, bits=self.bits)
        padding = int(self.left_padding.tolist()[idx])
        if self.keys is not None and self._idx > padding:
            cache.keys = tuple(mx.contiguous(x[idx : idx + 1, :, padding : self._idx]) for x in self.keys)
            cache.values = tuple(mx.contiguous(x[idx : idx + 1, :, padding : self._idx]) for x in self.values)
            cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches: list[QuantizedKVCache]) -> BatchQuantizedKVCache:
        group_size, bits = int(caches[0].group_size), int(caches[0].bits)
        if any((int(c.group_size), int(c.bits)) != (group_size, bits) for c in caches):
            raise ValueError("quantized caches of different formats cannot share a batch")
        lengths = [int(c.offset) if c.keys is not None else 0 for c in caches]
        top = max(lengths)
        if top == 0:
            return cls([0] * len(caches), group_size, bits)
        padding = [top - n for n in lengths]
        ref = next(c for c in caches if c.keys is not None)
        heads = int(ref.keys[0].shape[1])
        dk, dv = _dim(ref.keys, bits), _dim(ref.values, bits)
        dtype = ref.keys[1].dtype
        keys = _zeros(len(caches), heads, top, dk, dtype, bits, group_size)
        values = _zeros(len(caches), heads, top, dv, dtype, bits, group_size)
        for i, (p, n, c) in enumerate(zip(padding, lengths, caches, strict=True)):
            if n == 0:
                continue
            for j in range(3):
                keys[j][i : i + 1, :, p : p + n] = c.keys[j][..., :n, :]
                values[j][i : i + 1, :, p : p + n] = c.values[j][..., :n, :]
        batch = cls(padding, group_size, bits)
        batch.keys, batch.values = keys, values
        batch.offset = batch.offset + top
        batch._idx = top
        return batch

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(int(x.nbytes) for x in (*self.keys, *self.values))
