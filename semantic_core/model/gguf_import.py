"""Import a GGUF file (llama architecture; Q4_0, Q4_1, Q8_0, F16, F32 tensors) as a standard mlx-lm
model directory: config.json, model.safetensors, tokenizer.json, tokenizer_config.json.

- Weights: `mx.load(path, return_metadata=True)` already turns Q4_0/Q4_1/Q8_0 into MLX affine
  quantized triples (weight, scales, biases; group size 32). They are kept quantized in the
  directory; the loader decides per device whether to dequantize (dense float32 is faster on CPU).
- llama.cpp's converter permutes the rows of the Q and K projections so that its interleaved RoPE
  works; the permutation is undone here so the directory is an ordinary Hugging Face layout that
  `mlx_lm.load` serves with its default (non-traditional) RoPE.
- Tokenizer: rebuilt from the GGUF metadata as a byte-level BPE `tokenizers` model with the
  pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`; control tokens (token_type 3)
  become special tokens. `tests/test_gguf_tokenizer.py` checks it against llama.cpp's own ids.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from semantic_core.errors import UnsupportedModel

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp's pre-tokenizers, by `tokenizer.ggml.pre`: all use the GPT-2 byte-level regex, some
# split digits one by one first.
_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    # SmolLM, StarCoder and friends: individual digits, then GPT-2's regex.
    "smollm": {"individual_digits": True},
    "starcoder": {"individual_digits": True},
    "refact": {"individual_digits": True},
    "gpt2": {"individual_digits": False},
    "default": {"individual_digits": False},
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

Progress = Callable[[str, int, int], None]


def inspect_gguf(path: Path) -> dict[str, Any]:
    """Architecture and tensor types of a GGUF file, or UnsupportedModel naming what is wrong."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors on non-GGUF input
        raise UnsupportedModel(f"{path} is not a readable GGUF file: {exc}") from exc
    field = reader.fields.get("general.architecture")
    arch = str(bytes(field.parts[field.data[0]]), "utf-8") if field is not None else "unknown"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"{path.name}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    bad = sorted(
        {(t.tensor_type.name, t.name) for t in reader.tensors if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES}
    )
    if bad:
        kinds = sorted({k for k, _ in bad})
        raise UnsupportedModel(
            f"{path.name}: tensor type(s) {', '.join(kinds)} (e.g. {bad[0][1]}) are not supported; "
            f"supported GGUF tensor types: {', '.join(SUPPORTED_TENSOR_TYPES)}. "
            "Re-quantize with Q4_0, Q4_1 or Q8_0, or use an mlx-lm model directory."
        )
    return {"architecture": arch, "tensors": len(reader.tensors)}


def convert_gguf(src: Path, dest: Path, progress: Progress | None = None) -> Path:
    """Convert `src` into an mlx-lm directory at `dest` (written atomically: a temp dir renamed)."""
    import mlx.core as mx

    src = Path(src)
    inspect_gguf(src)
    loaded: Any = mx.load(str(src), return_metadata=True)
    weights: dict[str, Any] = loaded[0]
    meta: dict[str, Any] = loaded[1]

    def meta_value(key: str, default: Any = None) -> Any:
        if key not in meta:
            if default is None:
                raise UnsupportedModel(f"{src.name}: GGUF metadata lacks {key!r}")
            return default
        value = meta[key]
        return value.item() if isinstance(value, mx.array) else value

    n_head = int(meta_value("llama.attention.head_count"))
    n_kv = int(meta_value("llama.attention.head_count_kv", n_head))
    hidden = int(meta_value("llama.embedding_length"))
    head_dim = int(meta_value("llama.rope.dimension_count", hidden // n_head))

    out: dict[str, mx.array] = {}
    names = sorted(weights)
    for i, name in enumerate(names):
        if progress:
            progress("weights", i + 1, len(names))
        out[_hf_name(name)] = _unpermute_if_qk(name, weights[name], n_head, n_kv)

    tokens: list[str] = list(meta_value("tokenizer.ggml.tokens"))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(meta_value("llama.block_count")),
        "intermediate_size": int(meta_value("llama.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": float(meta_value("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta_value("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta_value("llama.context_length", 2048)),
        "vocab_size": len(tokens),
        "tie_word_embeddings": "lm_head.weight" not in out,
        "bos_token_id": int(meta_value("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(meta_value("tokenizer.ggml.eos_token_id", 2)),
        "source": {"format": "gguf", "file": src.name, "name": str(meta.get("general.name", ""))},
    }
    if any(k.endswith(".scales") for k in out):
        # Bits differ per tensor (an 8-bit embedding beside 4-bit layers): mlx-lm infers each
        # tensor's bits from its shapes, so only the group size matters here.
        config["quantization"] = {"group_size": 32, "bits": 4}

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        if progress:
            progress("saving", 0, 1)
        mx.save_safetensors(str(tmp / "model.safetensors"), out, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _write_tokenizer(tmp, meta, meta_value)
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


def _hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        layer, kind, suffix = parts[1], parts[2], parts[3]
        if kind not in _LAYER_NAMES:
            raise UnsupportedModel(f"unexpected GGUF tensor {name!r} for the llama architecture")
        return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
    if parts[0] == "token_embd":
        return "model.embed_tokens." + parts[1]
    if parts[0] == "output_norm":
        return "model.norm." + parts[1]
    if parts[0] == "output":
        return "lm_head." + parts[1]
    if parts[0] == "rope_freqs":
        raise UnsupportedModel("GGUF files with rope_freqs (llama 3.1 rope scaling) are not supported")
    raise UnsupportedModel(f"unexpected GGUF tensor {name!r} for the llama architecture")


def _unpermute_if_qk(name: str, x: Any, n_head: int, n_kv: int) -> Any:
    """Undo llama.cpp's RoPE row permutation of Q/K. It acts on output rows, and quantization
    groups run along input columns, so weight, scales and biases are unpermuted alike."""
    parts = name.split(".")
    if parts[0] != "blk" or parts[2] not in ("attn_q", "attn_k"):
        return x
    heads = n_head if parts[2] == "attn_q" else n_kv
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _write_tokenizer(out: Path, meta: dict[str, Any], meta_value: Callable[..., Any]) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model_kind = meta_value("tokenizer.ggml.model", "gpt2")
    if model_kind != "gpt2":
        raise UnsupportedModel(
            f"GGUF tokenizer model {model_kind!r} is not supported; supported: 'gpt2' (byte-level BPE)"
        )
    tokens: list[str] = list(meta_value("tokenizer.ggml.tokens"))
    merges: list[str] = list(meta_value("tokenizer.ggml.merges"))
    types = meta["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in meta else []
    pre = str(meta_value("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedModel(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [(a, b) for a, _, b in (m.partition(" ") for m in merges)]
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)
    tok = Tokenizer(bpe)
    steps: list[Any] = []
    if _PRE_TOKENIZERS[pre]["individual_digits"]:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, kind in enumerate(types) if kind == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(out / "tokenizer.json"))

    def token_at(key: str, default: int) -> str:
        idx = int(meta_value(key, default))
        return tokens[idx] if 0 <= idx < len(tokens) else tokens[default]

    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_at("tokenizer.ggml.bos_token_id", 1),
        "eos_token": token_at("tokenizer.ggml.eos_token_id", 2),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id", 0),
        "pad_token": token_at("tokenizer.ggml.padding_token_id", 0),
        "add_bos_token": bool(meta_value("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta_value("llama.context_length", 2048)),
        "additional_special_tokens": special,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = str(template)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
