"""Tiny random-weight models (llama, qwen2, gemma3) in standard mlx-lm directories, built in seconds.

Its logits are spread wide (large embeddings) so greedy decoding does not hinge on float noise: the
same prompt gives the same tokens whether it runs alone or in a padded batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same conversation format, taking tools (as Qwen2.5's does: JSON calls between <tool_call> tags,
# tool results in a user turn), so mlx-lm sees a JSON tool-call format.
CHATML_TOOLS = (
    "{%- if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{%- else %}{% set sys = 'You are a tiny test model.' %}{% set rest = messages %}{% endif %}"
    "{{- '<|im_start|>system\n' + sys }}"
    "{%- if tools %}{{- '\n\nTools:\n<tools>' }}{% for tool in tools %}{{- '\n' + (tool | tojson) }}{% endfor %}"
    '{{- \'\n</tools>\nCall a tool as <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>\' }}'
    "{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- for message in rest %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}{% if message.content %}{{- '\n' + message.content }}{% endif %}"
    "{%- for tool_call in message.tool_calls %}{% if tool_call.function is defined %}"
    "{% set tool_call = tool_call.function %}{% endif %}"
    '{{- \'\n<tool_call>\n{"name": "\' + tool_call.name + \'", "arguments": \' + (tool_call.arguments | tojson)'
    " + '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or rest[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{% endif %}"
    "{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or rest[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{% endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{% if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Agents keep their context in a KV cache; the cache is saved to disk and loaded again.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Hello, world! Bonjour le monde! ¡Hola, mundo! 你好，世界 🌍",
    "Observation: the stop sequence may span tokens. Thought: keep going.",
]


def build_tokenizer(out: Path, vocab_size: int = 384, *, tools: bool = False) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if tools:  # single added tokens, not special (decoded into the text), as in Qwen2.5
        tok.add_tokens([AddedToken("<tool_call>", normalized=False), AddedToken("</tool_call>", normalized=False)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 8192,
                "chat_template": CHATML_TOOLS if tools else CHATML,
            }
        )
    )


ARCHITECTURES = ("llama", "qwen2", "gemma3")


def _config(arch: str, vocab_size: int, layers: int, hidden: int, context: int) -> dict:
    heads, kv_heads, head_dim, inter = 4, 2, hidden // 4, hidden * 2
    common = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": context,
        "eos_token_id": 2,
    }
    if arch == "llama":
        return {
            **common,
            "model_type": "llama",
            "head_dim": head_dim,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
        }
    if arch == "qwen2":
        # q/k/v projections with biases, an untied output layer, a large RoPE base: as Qwen2.5.
        return {
            **common,
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "tie_word_embeddings": False,
        }
    if arch == "gemma3":
        # Sliding-window layers (RotatingKVCache) alternating with global ones; a window small enough
        # that test prompts wrap it.
        return {
            **common,
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "head_dim": head_dim,
            "rms_norm_eps": 1e-6,
            "query_pre_attn_scalar": head_dim,
            "sliding_window": SLIDING_WINDOW,
            "sliding_window_pattern": 2,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
        }
    raise ValueError(f"unknown architecture {arch!r}")


SLIDING_WINDOW = 32


def build_tiny_model(
    out: Path,
    *,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 64,
    context: int = 8192,
    arch: str = "llama",
    tools: bool = False,
) -> Path:
    """A random-weight model of `arch` (llama, qwen2, gemma3) as an mlx-lm directory.

    The parameters come from mlx-lm's own model class (so every architecture gets exactly the names
    and shapes it loads), then are redrawn from a seeded normal distribution with wide embeddings:
    matrices N(0, 0.2), embeddings N(0, 1), biases N(0, 0.1), norms at their identity (1 for llama
    and qwen2, 0 for Gemma's 1 + weight form)."""
    if arch == "llama":
        assert not tools, "the tool-calling tiny model is a qwen2"
        return _build_llama(out, seed=seed, layers=layers, hidden=hidden, context=context)
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, tools=tools)
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    config = _config(arch, vocab_size, layers, hidden, context)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        shape = tuple(value.shape)
        if "norm" in name:
            fill = 0.0 if arch == "gemma3" else 1.0
            weights[name] = mx.full(shape, fill, dtype=mx.float32)
        elif name.endswith(".bias"):
            weights[name] = mx.array(rng.normal(0.0, 0.1, size=shape).astype(np.float32))
        else:
            scale = 1.0 if "embed_tokens" in name else 0.2
            weights[name] = mx.array(rng.normal(0.0, scale, size=shape).astype(np.float32))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def _build_llama(out: Path, *, seed: int, layers: int, hidden: int, context: int) -> Path:
    """The llama fixture, drawn weight by weight in a fixed order (the suite's expectations rest on it)."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    heads, kv_heads, head_dim, inter = 4, 2, hidden // 4, hidden * 2
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float) -> mx.array:
        return mx.array(rng.normal(0.0, scale, size=shape).astype(np.float32))

    weights = {"model.embed_tokens.weight": w(vocab_size, hidden, scale=1.0), "model.norm.weight": mx.ones((hidden,))}
    for i in range(layers):
        p = f"model.layers.{i}"
        weights.update(
            {
                f"{p}.self_attn.q_proj.weight": w(heads * head_dim, hidden, scale=0.2),
                f"{p}.self_attn.k_proj.weight": w(kv_heads * head_dim, hidden, scale=0.2),
                f"{p}.self_attn.v_proj.weight": w(kv_heads * head_dim, hidden, scale=0.2),
                f"{p}.self_attn.o_proj.weight": w(hidden, heads * head_dim, scale=0.2),
                f"{p}.mlp.gate_proj.weight": w(inter, hidden, scale=0.2),
                f"{p}.mlp.up_proj.weight": w(inter, hidden, scale=0.2),
                f"{p}.mlp.down_proj.weight": w(hidden, inter, scale=0.2),
                f"{p}.input_layernorm.weight": mx.ones((hidden,)),
                f"{p}.post_attention_layernorm.weight": mx.ones((hidden,)),
            }
        )
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": hidden,
                "num_hidden_layers": layers,
                "intermediate_size": inter,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "head_dim": head_dim,
                "rms_norm_eps": 1e-5,
                "vocab_size": vocab_size,
                "rope_theta": 10000.0,
                "max_position_embeddings": context,
                "tie_word_embeddings": True,
                "eos_token_id": 2,
            }
        )
    )
    return out
