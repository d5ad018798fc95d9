"""GGUF import: small GGUF files written the way llama.cpp's converter writes them (Q/K rows permuted
for llama's RoPE, Gemma's norms + 1, mixed quant types), converted and compared with the originals.
The real files (Qwen2.5-Coder, Gemma 3) are tested in test_models_real.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from semantic_core.errors import UnsupportedModel
from semantic_core.model.gguf_import import convert_gguf
from tests.tiny_model import CHATML, build_tokenizer

N_HEAD, N_KV, HIDDEN, INTER, LAYERS = 4, 2, 64, 128, 2


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, tmp: Path, *, arch: str = "llama", qtype: str = "Q8_0") -> dict[str, np.ndarray]:
    import gguf
    from gguf.quants import quantize

    build_tokenizer(tmp)
    tok = json.loads((tmp / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tok["added_tokens"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    rng = np.random.default_rng(3)
    hf: dict[str, np.ndarray] = {}

    def rnd(*shape):
        return rng.normal(0, 0.5, size=shape).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)

    def add(name: str, w: np.ndarray, kind: str) -> None:
        if kind == "F32":
            writer.add_tensor(name, w)
        else:
            t = getattr(gguf.GGMLQuantizationType, kind)
            writer.add_tensor(name, quantize(w, t), raw_dtype=t)

    embed = rnd(len(tokens), HIDDEN)
    hf["model.embed_tokens.weight"] = embed
    add("token_embd.weight", embed, "Q8_0")
    add("output_norm.weight", np.ones(HIDDEN, np.float32), "F32")
    kinds = {
        "attn_q": qtype,
        "attn_k": "Q4_0",
        "attn_v": "Q4_1",
        "attn_output": qtype,
        "ffn_gate": "Q4_0",
        "ffn_up": "Q4_1",
        "ffn_down": qtype,
    }
    for i in range(LAYERS):
        shapes = {
            "attn_q": (HIDDEN, HIDDEN),
            "attn_k": (HIDDEN // 2, HIDDEN),
            "attn_v": (HIDDEN // 2, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN),
            "ffn_gate": (INTER, HIDDEN),
            "ffn_up": (INTER, HIDDEN),
            "ffn_down": (HIDDEN, INTER),
        }
        for kind, shape in shapes.items():
            w = rnd(*shape)
            hf[f"{i}.{kind}"] = w
            stored = w
            if kind == "attn_q":
                stored = permute_like_llama_cpp(w, N_HEAD)
            elif kind == "attn_k":
                stored = permute_like_llama_cpp(w, N_KV)
            add(f"blk.{i}.{kind}.weight", stored, kinds[kind])
        add(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32), "F32")
        add(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32), "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_converted_weights_match_the_originals_with_rope_permutation_undone(tmp_path):
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, load_model

    src = tmp_path / "tiny.gguf"
    original = write_gguf(src, tmp_path / "tok")
    out = convert_gguf(src, tmp_path / "converted")
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == N_HEAD and config["num_key_value_heads"] == N_KV
    assert config["tie_word_embeddings"] is True and "quantization" in config

    model, _ = load_model(out)
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    names = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(LAYERS):
        layer = model.model.layers[i]
        for kind, attr in names.items():
            module = layer
            for part in attr.split("."):
                module = getattr(module, part)
            got = np.array(module.weight)
            want = original[f"{i}.{kind}"]
            # 4-bit quantization error is about a tenth of the spread; a wrong row order is far worse.
            tol = 0.02 if kind in ("attn_q", "attn_output", "ffn_down") else 0.25
            assert np.abs(got - want).mean() < tol, (i, kind)
            assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95, (i, kind)
    embed = np.array(model.model.embed_tokens.weight)
    assert np.abs(embed - original["model.embed_tokens.weight"]).max() < 0.02


def test_converted_tokenizer_and_template_work_with_mlx_lm(tmp_path):
    from mlx_lm.utils import load_tokenizer

    src = tmp_path / "tiny.gguf"
    write_gguf(src, tmp_path / "tok")
    out = convert_gguf(src, tmp_path / "converted")
    tok = load_tokenizer(out)
    text = "The quick brown fox, 123 and 🌍!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids  # special tokens parsed as one token
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_a_file_with_types_mx_load_refuses_converts_exactly(tmp_path):
    """Q5_0 beside Q8_0/Q4_0/Q4_1: mx.load refuses such a file, so every tensor goes through gguf.quants,
    and the affine types are written in MLX's layout exactly (they dequantize to gguf's own values)."""
    import gguf
    import mlx.core as mx
    from gguf import GGUFReader

    src = tmp_path / "q5.gguf"
    write_gguf(src, tmp_path / "tok", qtype="Q5_0")
    out = convert_gguf(src, tmp_path / "converted")
    weights = mx.load(str(out / "model.safetensors"))
    reader = GGUFReader(str(src))
    checked = 0
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in ("Q8_0", "Q5_0", "Q4_0", "Q4_1"):
            continue
        want = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(
            tuple(reversed(tensor.shape.tolist()))
        )
        if tensor.name.split(".")[-2] in ("attn_q", "attn_k"):
            want = None  # rows unpermuted: compared above through the model instead
        hf = {"token_embd": "model.embed_tokens"}.get(tensor.name.split(".")[0])
        if hf is None:
            layer, kind = tensor.name.split(".")[1:3]
            names = {
                "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj",
                "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj",
                "attn_q": "",
                "attn_k": "",
            }
            hf = f"model.layers.{layer}.{names[kind]}"
        if want is None:
            continue
        bits = 4 if tensor.tensor_type.name.startswith("Q4") else 8
        scales, biases = (weights[f"{hf}.{p}"].astype(mx.float32) for p in ("scales", "biases"))
        got = mx.dequantize(weights[f"{hf}.weight"], scales, biases, group_size=32, bits=bits)
        assert np.array_equal(np.asarray(got), want), tensor.name
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_each_architecture_round_trips_through_gguf(tmp_path, arch):
    """A tiny model of each architecture, written as llama.cpp would (permuted llama Q/K, Gemma's
    norms + 1), imported back: same logits as the model it came from (float32 tensors: exactly)."""
    import mlx.core as mx

    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel
    from tests.gguf_fixtures import write_tiny_gguf
    from tests.tiny_model import build_tiny_model

    source_dir = build_tiny_model(tmp_path / "source", arch=arch, seed=5)
    gguf_path = write_tiny_gguf(source_dir, tmp_path / f"{arch}.gguf", arch)
    imported_dir = convert_gguf(gguf_path, tmp_path / "imported")
    config = json.loads((imported_dir / "config.json").read_text())
    assert config["model_type"] == {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}[arch]
    source = load_resolved(ResolvedModel("source", source_dir, "local-dir"), numpy_exp=False)
    imported = load_resolved(ResolvedModel("imported", imported_dir, "local-dir"), numpy_exp=False)
    assert imported.info.cache_spec == source.info.cache_spec
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = source.tokenizer.encode(text, add_special_tokens=False)
    assert imported.tokenizer.encode(text, add_special_tokens=False) == ids
    a = source.model(mx.array([ids]))
    b = imported.model(mx.array([ids]))
    assert float(mx.max(mx.abs(a - b))) < 1e-3


def test_unsupported_architecture_is_refused(tmp_path):
    src = tmp_path / "other.gguf"
    write_gguf(src, tmp_path / "tok", arch="gemma")
    with pytest.raises(
        UnsupportedModel, match="architecture 'gemma' is not supported; supported: llama, qwen2, gemma3"
    ):
        convert_gguf(src, tmp_path / "converted")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not gguf")
    with pytest.raises(UnsupportedModel, match="not a readable GGUF"):
        convert_gguf(bad, tmp_path / "out")
