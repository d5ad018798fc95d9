"""Tiny GGUF files written from the tiny mlx-lm models, the way llama.cpp's converter lays them out:
GGUF tensor names, llama's Q/K rows permuted for its RoPE, Gemma's norm weights with 1 added, the
tokenizer as GGUF metadata (byte-level BPE tokens and merges), and chosen matrices quantized with
the `gguf` package (Q8_0, Q5_0, Q4_0...). Importing one back must give the model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
_LAYER_NORMS = {
    "llama": {"post_attention_layernorm": "ffn_norm"},
    "qwen2": {"post_attention_layernorm": "ffn_norm"},
    "gemma3": {
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    },
}


def gguf_name(arch: str, hf: str) -> str:
    if hf.startswith("model.embed_tokens."):
        return "token_embd." + hf.rsplit(".", 1)[1]
    if hf.startswith("model.norm."):
        return "output_norm." + hf.rsplit(".", 1)[1]
    if hf.startswith("lm_head."):
        return "output." + hf.rsplit(".", 1)[1]
    parts = hf.split(".")
    layer, rest, suffix = parts[2], ".".join(parts[3:-1]), parts[-1]
    table = {**_LAYER, **_LAYER_NORMS[arch]}
    return f"blk.{layer}.{table[rest]}.{suffix}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's RoPE permutation of Q/K rows (what the importer undoes)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, out: Path, arch: str, quantize: dict[str, str] | None = None) -> Path:
    """`quantize`: GGUF tensor-name suffix -> GGML type name (e.g. {"ffn_up.weight": "Q8_0"})."""
    import gguf
    import mlx.core as mx

    config = json.loads((model_dir / "config.json").read_text())
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    writer = gguf.GGUFWriter(str(out), arch)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(config["head_dim"])
    if arch == "gemma3":
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
        writer.add_sliding_window(config["sliding_window"])
        writer.add_uint32("gemma3.attention.sliding_window_pattern", config["sliding_window_pattern"])
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [""] * (max([*vocab.values(), *added.values()]) + 1)
    for t, i in {**vocab, **added}.items():
        tokens[i] = t
    types = [3 if t in added else 1 for t in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    writer.add_chat_template(tok_config["chat_template"])
    quantize = quantize or {}
    for hf, value in sorted(weights.items()):
        name = gguf_name(arch, hf)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            value = _permute(value, heads if "attn_q" in name else kv_heads)
        if arch == "gemma3" and "norm" in name:
            value = value + np.float32(1.0)
        kind = next((t for suffix, t in quantize.items() if name.endswith(suffix)), None)
        if kind is not None:
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
