"""Loading a model for serving: resolve the id, load weights and tokenizer with mlx-lm, choose dense or
quantized weights for the device, and describe the model (KV geometry, fingerprint) for the rest of
the core.

On CPU, MLX's own quantized matmul is slower than dense float32 with a good BLAS, so `auto` keeps the
quantized weights there only when the CPU kernels (`semantic_kernels`, built by `make setup`) are
present, and dequantizes to float32 otherwise; on Metal and CUDA the quantized weights stay.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semantic_core.config import Settings
from semantic_core.errors import ModelLoadError, UnsupportedModel
from semantic_core.model import kv
from semantic_core.model.blas import blas_info
from semantic_core.model.gguf_import import Progress
from semantic_core.model.kv import CacheSpec
from semantic_core.model.registry import ResolvedModel, resolve
from semantic_core.observability import get_logger

_FULL_HASH_LIMIT = 1 << 30  # hash every byte of weights up to 1 GiB, sample beyond

log = get_logger("semantic.models")


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    path: Path
    source: str
    model_type: str
    parameters: int
    num_layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: str
    kv_itemsize: int
    context_length: int
    weights: str  # "dense float32" or "quantized"
    device: str
    blas: str
    fingerprint: str
    kernels: str = "mlx"
    kv_format: kv.KVFormat = field(default_factory=kv.KVFormat)
    cache_spec: CacheSpec = field(default_factory=lambda: CacheSpec((), 0, 0, "float32"))
    vocab_size: int = 0  # rows of the output layer: token ids are below it, top_k at most it
    max_token_chars: int = 64  # the longest token's text: a prompt of N characters has >= N / this tokens
    # The model's own sampling defaults (its generation_config.json): temperature, top_p, top_k, ...
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # The beginning-of-sequence token's text, when the tokenizer is configured to add it (a base model
    # without a chat template, such as Gemma 3 270M, needs it in front of a plain prompt).
    bos: str | None = None
    chat_template: bool = True
    load_seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token costs across all layers (keys and values, at the KV format's precision)."""
        if not self.cache_spec.layers:
            return 2 * self.num_layers * self.kv_heads * self.head_dim * self.kv_itemsize
        return self.cache_spec.bytes_per_token(self.kv_itemsize)

    @property
    def kv_description(self) -> str:
        return self.kv_format.describe(self.kv_dtype)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "path": str(self.path),
            "source": self.source,
            "model_type": self.model_type,
            "parameters": self.parameters,
            "num_layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "kv_dtype": self.kv_dtype,
            "kv_format": self.kv_description,
            "kv_bytes_per_token": self.bytes_per_token,
            "kv_cache": self.cache_spec.describe(),
            "context_length": self.context_length,
            "weights": self.weights,
            "device": self.device,
            "blas": self.blas,
            "kernels": self.kernels,
            "fingerprint": self.fingerprint,
        }


@dataclass
class LoadedModel:
    model: Any  # mlx.nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    info: ModelInfo


def device_description() -> str:
    import mlx.core as mx

    dev = mx.default_device()
    if dev.type == mx.gpu:
        if mx.metal.is_available():
            return "gpu (Metal)"
        cuda = getattr(mx, "cuda", None)
        if cuda is not None and cuda.is_available():
            return "gpu (CUDA)"
        return "gpu"
    return "cpu"


def load(
    settings: Settings, *, progress: Progress | None = None, quiet: bool = True, pipeline_group: Any = None
) -> LoadedModel:
    """The configured model; with `pipeline_group` (more than one rank), this rank's share of it."""
    resolved = resolve(settings.mlx_model_id, settings.model_dir, quiet=quiet, progress=progress)
    return load_resolved(
        resolved,
        weights_mode=settings.mlx_weights,
        numpy_exp=settings.mlx_numpy_exp,
        layer_kernels=settings.mlx_cpu_layer_kernels,
        pipeline_layers=settings.mlx_cpu_pipeline_layers,
        kv_format=kv_format_for(resolved.model_id, settings.mlx_kv_bits, settings.mlx_kv_group_size),
        pipeline_group=pipeline_group,
    )


def kv_format_for(model_id: str, bits: str, group_size: int = 64) -> kv.KVFormat:
    """The KV format a setting asks for; `auto` is the model's measured recommendation (its entry in
    the models carried by PyPI; other models keep their dtype, since small models can lose much to
    KV quantization and nothing was measured for them)."""
    if bits == "auto":
        from semantic_core.model.fetch import WHEEL_MODELS

        spec = WHEEL_MODELS.get(model_id.lower())
        bits = spec.kv_bits if spec is not None else "none"
    return kv.KVFormat.parse(bits, group_size)


def load_resolved(
    resolved: ResolvedModel,
    *,
    weights_mode: str = "auto",
    numpy_exp: bool = True,
    kv_format: kv.KVFormat = kv.UNQUANTIZED,
    layer_kernels: bool = True,
    pipeline_layers: int = 3,
    pipeline_group: Any = None,
) -> LoadedModel:
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, load_model, load_tokenizer

    start = time.perf_counter()
    try:
        # Lazy: weights are read when evaluated below, after the choices that replace some of them
        # (the float32 layers the CPU kernels serve from CPU_KERNELS_FILE are then never read).
        model, config = load_model(resolved.path, lazy=True)
        tokenizer = load_tokenizer(resolved.path, eos_token_ids=config.get("eos_token_id"))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise ModelLoadError(f"mlx-lm could not load {resolved.path}: {exc}") from exc
    if pipeline_group is not None and pipeline_group.size() > 1:
        # mlx-lm's pipeline parallelism: this rank keeps its share of the decoder layers (the others'
        # weights are never read: the model is still lazy), and each forward pass hands the hidden
        # state from rank to rank.
        inner: Any = getattr(model, "model", None)
        if not hasattr(inner, "pipeline"):
            raise UnsupportedModel(
                f"{resolved.model_id}: mlx-lm has no pipeline parallelism for {config.get('model_type', '?')} "
                "(it has for qwen2, qwen3, llama-like DeepSeek and a few others)"
            )
        inner.pipeline(pipeline_group)

    device = device_description()
    quantized = "quantization" in config
    kernels = "mlx"
    # On CPU, MLX's own quantized matmul is a scalar loop: quantized weights are fast there only
    # through semantic_kernels (built at set-up). Without them, float32 with a good BLAS is faster.
    cpu_kernels = _cpu_kernels() if device == "cpu" and quantized and weights_mode != "dense" else None
    if device == "cpu" and quantized and weights_mode == "quantized" and cpu_kernels is None:
        log.warning("SEMANTIC_MLX_WEIGHTS=quantized without the CPU kernels: MLX's slow quantized matmul is used")
    if cpu_kernels is not None:
        patched = cpu_kernels.nn.patch_model(model) + _serve_exact_side(
            model, resolved.path, cpu_kernels, partial=pipeline_group is not None
        )
        # The kernels read float16 scales exactly (and half the bytes): only what MLX's own ops
        # dequantize (embedding lookups, layers the kernels do not serve) is widened.
        _widen_scales(model, skip=cpu_kernels.nn.SKQuantizedLinear)
        weights = _describe_quant(config)
        kernels = f"semantic_kernels ({cpu_kernels.resolved_path()}, {patched} layers)"
    elif weights_mode == "dense" or (weights_mode == "auto" and device == "cpu"):
        if quantized:
            _widen_scales(model)
            model = dequantize_model(model)
        model.set_dtype(mx.float32)
        weights = "dense float32"
    else:
        weights = _describe_quant(config) if quantized else f"dense {_param_dtype(model)}"
    mx.eval(model.parameters())

    if device == "cpu":
        from semantic_core.model import cpu_ops

        # MLX's CPU backend runs its fast norm, RoPE and attention as graphs of small ops, each a
        # dispatch: one primitive each brings a SmolLM2 decode step from ~3,500 graph nodes to ~1,150.
        layer_ops = (cpu_kernels or _cpu_kernels(quiet=True)) if layer_kernels else None
        if layer_ops is not None:
            layer_ops.nn.patch_layers(model)
            kernels = (f"{kernels}, " if kernels != "mlx" else "") + "kernel norm, RoPE, SwiGLU and decode attention"
        replaced = cpu_ops.install(model, numpy_exp=numpy_exp, layer_kernels=layer_ops is not None)
        if cpu_ops.install_decode_pipelining(model, pipeline_layers):
            kernels += f", decode pipelined every {pipeline_layers} layers"
        if replaced:
            kernels = (
                ("mlx" if kernels == "mlx" else kernels)
                + ", with NumPy exponentials in "
                + " and ".join(
                    {"scaled_dot_product_attention": "prompt attention", "swiglu": "SwiGLU"}[n] for n in replaced
                )
            )

    # One token through a fresh cache tells the KV layout whatever the architecture says.
    cache = kv.new_cache(model)
    if kv_format.quantized:
        head_dim = _head_dim(model, cache)
        if head_dim % kv_format.group_size:
            raise ModelLoadError(
                f"{resolved.model_id}: its attention heads have {head_dim} values, not a multiple of the KV "
                f"group size {kv_format.group_size} (SEMANTIC_MLX_KV_GROUP_SIZE)"
            )
        cache = kv.new_cache(model, kv_format)
    kinds = sorted({type(c).__name__ for c in cache})
    if not cache or any(kind not in kv.KINDS for kind in kinds):
        raise UnsupportedModel(
            f"{resolved.model_id}: its cache types {kinds} are not supported; agents need attention KV "
            f"caches ({', '.join(kv.KINDS)}), not recurrent state"
        )
    logits = model(mx.array([[0]]), cache=cache)
    mx.eval(logits, [c.state for c in cache])
    spec = kv.spec_of(cache)
    kv_heads, head_dim = spec.kv_heads, spec.head_dim
    kv_dtype = getattr(mx, spec.dtype)

    context = int(config.get("max_position_embeddings") or tokenizer.model_max_length or 2048)
    params = sum(v.size for _, v in _leaves(model.parameters()))
    info = ModelInfo(
        model_id=resolved.model_id,
        path=resolved.path,
        source=resolved.source,
        model_type=str(config.get("model_type", "?")),
        parameters=int(params),
        num_layers=len(cache),
        kv_heads=kv_heads,
        head_dim=head_dim,
        kv_dtype=str(kv_dtype).removeprefix("mlx.core."),
        kv_itemsize=kv_dtype.size,
        context_length=context,
        weights=weights,
        device=device,
        blas=str(blas_info()) if device == "cpu" else "n/a (GPU)",
        kernels=kernels,
        kv_format=kv_format,
        cache_spec=spec,
        vocab_size=int(logits.shape[-1]),
        max_token_chars=_max_token_chars(tokenizer),
        generation_defaults=generation_defaults(resolved.path),
        bos=_bos(resolved.path, tokenizer),
        chat_template=bool(getattr(tokenizer, "has_chat_template", False)),
        fingerprint=fingerprint(resolved.path, weights, str(kv_dtype), kv_format.tag)
        + (
            f"+pp{pipeline_group.rank()}of{pipeline_group.size()}"
            if pipeline_group is not None and pipeline_group.size() > 1
            else ""
        ),
        load_seconds=time.perf_counter() - start,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def fingerprint(path: Path, weights_mode: str, kv_dtype: str, kv_format: str = "none") -> str:
    """Identity of (weights, tokenizer, config, numerics, KV format): a KV cache is only valid for the
    same one. An unquantized KV format adds nothing, so fingerprints from before KV formats hold."""
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        f = path / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    files = sorted(path.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            if total <= _FULL_HASH_LIMIT:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
            else:
                # Large models: the header plus 256 evenly spread 64 KiB samples per file.
                size = f.stat().st_size
                for i in range(256):
                    fh.seek(size * i // 256)
                    h.update(fh.read(1 << 16))
    h.update(weights_mode.encode())
    h.update(kv_dtype.encode())
    if kv_format != "none":
        h.update(f"kv={kv_format}".encode())
    return h.hexdigest()[:32]


def _head_dim(model: Any, cache: kv.Cache) -> int:
    """Values per attention head, from one token through an unquantized cache."""
    import mlx.core as mx

    model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    return kv.spec_of(cache).head_dim


def _serve_exact_side(model: Any, path: Path, cpu_kernels: Any, partial: bool = False) -> int:
    """Layers the model file holds as float32 but the GGUF import also wrote exactly as 8-bit groups
    of 16 (CPU_KERNELS_FILE, from Q6_K): served by the kernels from those, a quarter of the bytes."""
    import mlx.core as mx

    from semantic_core.model.gguf_import import CPU_KERNELS_FILE

    side = path / CPU_KERNELS_FILE
    if not side.is_file():
        return 0
    arrays: Any = mx.load(str(side))
    modules = dict(model.named_modules())
    n = 0
    for name in sorted(k.removesuffix(".weight") for k in arrays if k.endswith(".weight")):
        module = modules.get(name)
        if module is None and partial:
            continue  # a layer another rank of the pipeline runs
        if module is None:
            raise ModelLoadError(f"{side}: names {name}, which the model does not have")
        cpu_kernels.nn.serve_quantized(
            module, arrays[f"{name}.weight"], arrays[f"{name}.scales"], arrays[f"{name}.biases"], 16, 8
        )
        n += 1
    return n


def _widen_scales(model: Any, skip: type | None = None) -> None:
    """Scales and biases to float32 before dequantizing: MLX dequantizes in the scales' dtype, and
    float16 scales (exact for Q8_0's or Q5_0's block scales) would round the float32 weights.
    Modules of type `skip` keep theirs."""
    import mlx.core as mx

    for _, module in model.named_modules():
        if skip is not None and type(module) is skip:
            continue
        scales = getattr(module, "scales", None)
        if isinstance(scales, mx.array) and scales.dtype != mx.float32:
            module.scales = scales.astype(mx.float32)
            biases = getattr(module, "biases", None)
            if isinstance(biases, mx.array):
                module.biases = biases.astype(mx.float32)


def _bos(path: Path, tokenizer: Any) -> str | None:
    import json

    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    token = getattr(tokenizer, "bos_token", None)
    return str(token) if config.get("add_bos_token") and token else None


def generation_defaults(path: Path) -> dict[str, Any]:
    """Sampling defaults from the model directory's generation_config.json (Hugging Face's format):
    temperature, top_p, top_k, min_p, repetition_penalty; `do_sample: false` means greedy."""
    import json

    f = path / "generation_config.json"
    try:
        config = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for name, kind in (
        ("temperature", float),
        ("top_p", float),
        ("top_k", int),
        ("min_p", float),
        ("repetition_penalty", float),
    ):
        value = config.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = kind(value)
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
    if out.get("top_k", 0) < 0:
        out.pop("top_k")
    return out


def _max_token_chars(tokenizer: Any) -> int:
    """Characters of the longest token (vocabulary strings of byte-level BPE hold one character per
    byte, so this bounds the decoded text too). Used to refuse a prompt too long for the context by
    its length alone, before tokenizing it."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary listing: assume long tokens
        return 256
    return max((len(token) for token in vocab), default=64) or 64


def _describe_quant(config: dict[str, Any]) -> str:
    q = config.get("quantization") or {}
    return f"quantized ({q.get('bits', '?')}-bit, group {q.get('group_size', '?')})"


def _param_dtype(model: Any) -> str:
    for _, v in _leaves(model.parameters()):
        return str(v.dtype).removeprefix("mlx.core.")
    return "?"


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    leaves: Any = tree_flatten(tree)
    return list(leaves)


_KERNELS_WARNED = False


def _cpu_kernels(quiet: bool = False) -> Any:
    """The semantic_kernels package when its extension was built for this mlx (make setup builds
    it), else None, with one warning line saying what runs instead (unless quiet)."""
    global _KERNELS_WARNED
    try:
        import semantic_kernels
        import semantic_kernels.nn
    except ImportError as exc:
        if not _KERNELS_WARNED and not quiet:
            _KERNELS_WARNED = True
            log.warning(
                "the CPU kernels are not built (run `make setup`, which needs cmake and a C++ compiler): "
                "quantized weights are dequantized to float32 instead",
                reason=str(exc)[:200],
            )
        return None
    return semantic_kernels


def cpu_kernels_status() -> str:
    """What quantized matmuls run on the CPU: the kernels' path, or why they do not."""
    try:
        import semantic_kernels
    except ImportError as exc:
        return f"not built ({exc}); quantized weights are dequantized to float32 on CPU"
    paths = ", ".join(semantic_kernels.available_paths())
    return (
        f"semantic_kernels, path {semantic_kernels.resolved_path()} (of {paths}); RMS norm, RoPE, SwiGLU and "
        "decode attention primitives (SEMANTIC_MLX_CPU_LAYER_KERNELS)"
    )
