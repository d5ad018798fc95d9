// The per-layer work around the matmuls of a transformer decode step: RMS norm, rotary position
// embedding and attention of a few query rows against a (float or affine-quantized) KV cache.
//
// Why these exist: on its CPU backend MLX 0.32 runs mx.fast.rms_norm, mx.fast.rope and
// mx.fast.scaled_dot_product_attention as their fallbacks, graphs of plain ops (a RoPE is ~25 ops,
// an attention ~10, a norm ~6), and a decode step of SmolLM2 becomes ~3,500 graph nodes. Each node
// costs a dispatch on MLX's stream thread whatever its size, which dominates a decode step once the
// matmuls are fast. One primitive per function brings a layer to ~20 nodes.
//
// Plain C++ with no MLX types (the MLX glue is in layers_ext.cpp), so the self-test can hold the
// kernels to a double reference without MLX. Hot loops are compiled once per x86 ISA level
// (target_clones) and picked at load time; everything is float32 inside.
#pragma once

#include <stdint.h>

namespace sk {

// out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w   (rows x D, contiguous float32).
void rms_norm(const float* x, int64_t rows, int D, const float* w, float eps, float* out);

// out[i] = silu(gate[i]) * up[i] = gate[i] * up[i] / (1 + e^-gate[i])   (n contiguous float32).
void swiglu(const float* gate, const float* up, int64_t n, float* out);

// Rotary embedding of x viewed as [B, N, T, D] (row-major, contiguous float32) into out (same
// layout). Position of row t of batch b: (t + offsets[b or 0]) * scale. inv_freqs: dims / 2
// inverse frequencies. traditional: rotate pairs (2i, 2i+1), else (i, i + dims/2). Dimensions at
// and past `dims` are copied.
void rope(const float* x, int B, int N, int T, int D, int dims, bool traditional, const int32_t* offsets,
          bool per_batch_offsets, float scale, const float* inv_freqs, float* out);

// A K or V operand of attention: [B, H, S, D] with arbitrary strides on B, H, S (elements) and
// unit stride on D. Float: `data` is float32. Quantized (bits 4 or 8): `data` is the packed codes
// (uint8 view of MLX's uint32 words, D * bits / 8 bytes a row, strides in bytes), `scales` and
// `biases` float32 [B, H, S, D / group_size] with their own strides (elements).
struct KVOperand {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, ss = 0;  // strides of data (elements for float, bytes for codes)
  int bits = 0;                    // 0 = float32
  int group_size = 0;
  const float* scales = nullptr;
  const float* biases = nullptr;
  int64_t qb = 0, qh = 0, qs = 0;  // strides of scales and biases (elements)
};

// The mask of attention: none, causal (key s of row l allowed iff s <= l + S - L), or an array
// broadcast to [B, Hq, L, S] given by strides (elements; 0 on broadcast axes), boolean (false =
// masked, the score becomes the lowest float, as in MLX) or additive float32.
struct AttnMask {
  int kind = 0;  // 0 none, 1 causal, 2 bool array, 3 float array
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, ss = 0;
};

// out[b, h, l, :] = softmax(scale * q[b, h, l] . K[b, h / rep, s] + mask) @ V[b, h / rep]
// q and out: contiguous float32 [B, Hq, L, D]; Hq = Hkv * rep. Threads over (b, kv head).
void attention(const float* q, int B, int Hq, int Hkv, int L, int S, int D, const KVOperand& k,
               const KVOperand& v, const AttnMask& mask, float scale, float* out);

}  // namespace sk
