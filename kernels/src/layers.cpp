// RMS norm, RoPE and decode attention for MLX's CPU backend (see layers.h for why).
//
// Compiled with the baseline flags like dispatch.cpp; on x86-64 Linux the hot loops are cloned
// for AVX-512 and AVX2 by the compiler (target_clones: one resolver call at load time picks the
// clone), which is enough here: these loops are short and memory bound, unlike the matmul tiles
// that get hand-written intrinsics.
#include "layers.h"

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "dispatch.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define SK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SK_CLONES
#endif
#define SK_INLINE static inline __attribute__((always_inline))

namespace sk {

namespace {

// e^x in float32 to ~2 ulp (Cephes' expf polynomial), written so that loops over it vectorise
// (no calls, no branches). Below -87.3 the result is 0, as the true value underflows anyway.
SK_INLINE float exp_approx(float x) {
  const bool under = x < -87.3f;
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |n| < 2^22, and vectorises on SSE2).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return under ? 0.0f : y * two_n;
}

SK_CLONES void swiglu_range(const float* gate, const float* up, int64_t i0, int64_t i1, float* out) {
  for (int64_t i = i0; i < i1; ++i) out[i] = gate[i] * up[i] / (1.0f + exp_approx(-gate[i]));
}

SK_CLONES void rope_rows(const float* x, int64_t rows, int D, int dims, bool traditional, const float* cosv,
                         const float* sinv, float* out) {
  const int half = dims / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    float* o = out + r * D;
    if (traditional) {
      for (int i = 0; i < half; ++i) {
        const float a = xr[2 * i], b = xr[2 * i + 1];
        o[2 * i] = a * cosv[i] - b * sinv[i];
        o[2 * i + 1] = a * sinv[i] + b * cosv[i];
      }
    } else {
      for (int i = 0; i < half; ++i) {
        const float a = xr[i], b = xr[i + half];
        o[i] = a * cosv[i] - b * sinv[i];
        o[i + half] = a * sinv[i] + b * cosv[i];
      }
    }
    for (int i = dims; i < D; ++i) o[i] = xr[i];
  }
}

// Float sums are not reassociated without -ffast-math, so a plain `s += a[i] * b[i]` adds one
// product at a time. Sums here keep kLanes partial sums (one vector register's worth on AVX-512)
// that the compiler maps onto vector lanes, and add them up at the end.
constexpr int kLanes = 16;

SK_INLINE float hsum(const float* acc) {
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

SK_INLINE float dot(const float* a, const float* b, int n) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

SK_CLONES void rms_norm_rows(const float* x, int64_t r0, int64_t r1, int D, const float* w, float eps, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    float* o = out + r * D;
    const float ss = dot(xr, xr, D);
    const float inv = 1.0f / std::sqrt(ss / (float)D + eps);
    for (int i = 0; i < D; ++i) o[i] = (xr[i] * inv) * w[i];
  }
}

// A row of an affine-quantized cache as float32: element i = scale[i / gs] * code_i + bias[i / gs].
// 8-bit: byte i is code i; 4-bit: byte i holds codes 2i (low nibble) and 2i + 1 (high nibble).
SK_INLINE void dequant_row(const uint8_t* codes, const float* sc, const float* bi, int D, int gs, int bits,
                           float* out) {
  for (int g = 0; g < D / gs; ++g) {
    const float a = sc[g], c = bi[g];
    float* o = out + g * gs;
    if (bits == 8) {
      const uint8_t* cg = codes + g * gs;
      for (int i = 0; i < gs; ++i) o[i] = a * (float)cg[i] + c;
    } else {
      const uint8_t* cg = codes + g * (gs / 2);
      for (int i = 0; i < gs / 2; ++i) {
        o[2 * i] = a * (float)(cg[i] & 15) + c;
        o[2 * i + 1] = a * (float)(cg[i] >> 4) + c;
      }
    }
  }
}

// The cached row s of one head as float32: a pointer into a float cache, or `tmp` filled from the
// codes of a quantized one. Each row is read (and converted) once for all query rows of the head.
SK_INLINE const float* cache_row(const KVOperand& op, int b, int h, int s, int D, float* tmp) {
  if (op.bits == 0) return static_cast<const float*>(op.data) + b * op.sb + h * op.sh + s * op.ss;
  const int64_t q = b * op.qb + h * op.qh + s * op.qs;
  dequant_row(static_cast<const uint8_t*>(op.data) + b * op.sb + h * op.sh + s * op.ss, op.scales + q,
              op.biases + q, D, op.group_size, op.bits, tmp);
  return tmp;
}

// scores[r, s] = scale * q_r . k_s for the `rows` query rows of one KV head (q: rows x D, contiguous).
SK_CLONES void head_scores(const float* q, int rows, const KVOperand& k, int b, int h, int S, int D, float scale,
                           float* scores) {
  float tmp[512];
  for (int s = 0; s < S; ++s) {
    const float* kr = cache_row(k, b, h, s, D, tmp);
    for (int r = 0; r < rows; ++r) scores[(int64_t)r * S + s] = dot(q + (int64_t)r * D, kr, D) * scale;
  }
}

// acc[r, :] = sum_s p[r, s] v_s for the rows of one KV head.
SK_CLONES void head_values(const float* p, int rows, const KVOperand& v, int b, int h, int S, int D, float* acc) {
  float tmp[512];
  for (int s = 0; s < S; ++s) {
    bool any = false;
    for (int r = 0; r < rows; ++r) any |= p[(int64_t)r * S + s] != 0.0f;
    if (!any) continue;  // masked for every row (left padding of a batch)
    const float* vr = cache_row(v, b, h, s, D, tmp);
    for (int r = 0; r < rows; ++r) {
      const float w = p[(int64_t)r * S + s];
      float* a = acc + (int64_t)r * D;
      for (int d = 0; d < D; ++d) a[d] += w * vr[d];
    }
  }
}

// Softmax of one row of scores in place; returns 1 / sum of the weights.
SK_CLONES float softmax_row(float* s, int n) {
  float mx[kLanes];
  for (int j = 0; j < kLanes; ++j) mx[j] = -FLT_MAX;
  int k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) mx[j] = s[k + j] > mx[j] ? s[k + j] : mx[j];
  float m = -FLT_MAX;
  for (int j = 0; j < kLanes; ++j) m = mx[j] > m ? mx[j] : m;
  for (; k < n; ++k) m = s[k] > m ? s[k] : m;
  for (int i = 0; i < n; ++i) s[i] = exp_approx(s[i] - m);
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += s[i + j];
  float sum = hsum(acc);
  for (; i < n; ++i) sum += s[i];
  return 1.0f / sum;
}

void attend_kv_head(const float* q, int b, int hkv, int Hq, int rep, int L, int S, int D, const KVOperand& k,
                    const KVOperand& v, const AttnMask& mask, float scale, float* out) {
  const int rows = rep * L;
  thread_local std::vector<float> scores, qrows, acc;
  scores.resize((size_t)rows * S);
  qrows.resize((size_t)rows * D);
  acc.assign((size_t)rows * D, 0.0f);
  // Query rows of this KV head, in order r = (head - hkv * rep) * L + l.
  for (int r = 0; r < rows; ++r)
    std::memcpy(qrows.data() + (int64_t)r * D, q + ((int64_t)(b * Hq + hkv * rep + r / L) * L + r % L) * D,
                sizeof(float) * D);
  head_scores(qrows.data(), rows, k, b, hkv, S, D, scale, scores.data());
  for (int r = 0; r < rows; ++r) {
    const int h = hkv * rep + r / L, l = r % L;
    float* sr = scores.data() + (int64_t)r * S;
    if (mask.kind == 1) {
      for (int s = l + S - L + 1; s < S; ++s) sr[s] = -FLT_MAX;
    } else if (mask.kind == 2) {
      const uint8_t* m = static_cast<const uint8_t*>(mask.data) + b * mask.sb + h * mask.sh + l * mask.sl;
      for (int s = 0; s < S; ++s)
        if (!m[s * mask.ss]) sr[s] = -FLT_MAX;
    } else if (mask.kind == 3) {
      const float* m = static_cast<const float*>(mask.data) + b * mask.sb + h * mask.sh + l * mask.sl;
      for (int s = 0; s < S; ++s) sr[s] += m[s * mask.ss];
    }
  }
  thread_local std::vector<float> inv;
  inv.resize(rows);
  for (int r = 0; r < rows; ++r) inv[r] = softmax_row(scores.data() + (int64_t)r * S, S);
  head_values(scores.data(), rows, v, b, hkv, S, D, acc.data());
  for (int r = 0; r < rows; ++r) {
    float* o = out + ((int64_t)(b * Hq + hkv * rep + r / L) * L + r % L) * D;
    for (int d = 0; d < D; ++d) o[d] = acc[(int64_t)r * D + d] * inv[r];
  }
}

}  // namespace

void rms_norm(const float* x, int64_t rows, int D, const float* w, float eps, float* out) {
  const int64_t tasks = rows >= 64 ? 8 : 1;
  if (tasks == 1) {
    rms_norm_rows(x, 0, rows, D, w, eps, out);
    return;
  }
  const int64_t chunk = (rows + tasks - 1) / tasks;
  parallel_for((int)tasks, rows * D * 4, [&](int t) {
    rms_norm_rows(x, t * chunk, std::min(rows, (t + 1) * chunk), D, w, eps, out);
  });
}

void swiglu(const float* gate, const float* up, int64_t n, float* out) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t tasks = (n + kChunk - 1) / kChunk;
  parallel_for((int)tasks, n * 12, [&](int t) {
    swiglu_range(gate, up, t * kChunk, std::min(n, (t + 1) * kChunk), out);
  });
}

void rope(const float* x, int B, int N, int T, int D, int dims, bool traditional, const int32_t* offsets,
          bool per_batch_offsets, float scale, const float* inv_freqs, float* out) {
  const int half = dims / 2;
  thread_local std::vector<float> cosv, sinv;
  cosv.resize((size_t)T * half);
  sinv.resize((size_t)T * half);
  for (int b = 0; b < B; ++b) {
    // The table of one batch row serves all its heads; consecutive rows with the same offset
    // share it.
    if (b == 0 || (per_batch_offsets && offsets[b] != offsets[b - 1])) {
      const int32_t off = offsets[per_batch_offsets ? b : 0];
      for (int t = 0; t < T; ++t) {
        const float pos = (float)(t + off) * scale;
        for (int i = 0; i < half; ++i) {
          const float theta = pos * inv_freqs[i];
          cosv[(size_t)t * half + i] = std::cos(theta);
          sinv[(size_t)t * half + i] = std::sin(theta);
        }
      }
    }
    for (int n = 0; n < N; ++n) {
      const int64_t base = ((int64_t)b * N + n) * T * D;
      for (int t = 0; t < T; ++t)
        rope_rows(x + base + (int64_t)t * D, 1, D, dims, traditional, cosv.data() + (size_t)t * half,
                  sinv.data() + (size_t)t * half, out + base + (int64_t)t * D);
    }
  }
}

void attention(const float* q, int B, int Hq, int Hkv, int L, int S, int D, const KVOperand& k,
               const KVOperand& v, const AttnMask& mask, float scale, float* out) {
  const int rep = Hq / Hkv;
  const int tasks = B * Hkv;
  auto run = [&](int t) { attend_kv_head(q, t / Hkv, t % Hkv, Hq, rep, L, S, D, k, v, mask, scale, out); };
  // Work: the bytes of K and V read (float: 4 per value; codes: bits / 8), times the query rows
  // beyond the first few (each row re-reads the cached rows of its head).
  const int64_t per_value = k.bits ? 1 : 4;
  const int64_t work = (int64_t)tasks * S * D * 2 * per_value * std::max(1, rep * L / 4);
  parallel_for(tasks, work, run);
}

}  // namespace sk
