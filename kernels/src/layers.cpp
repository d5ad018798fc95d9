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

SK_CLONES float sum_squares(const float* a, int n) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * a[i + j];
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * a[i];
  return s;
}

SK_CLONES void rms_norm_rows(const float* x, int64_t r0, int64_t r1, int D, const float* w, float eps, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    float* o = out + r * D;
    const float ss = sum_squares(xr, D);
    const float inv = 1.0f / std::sqrt(ss / (float)D + eps);
    for (int i = 0; i < D; ++i) o[i] = (xr[i] * inv) * w[i];
  }
}

// Score of one query row against a quantized key row: sum over groups of
// scale_g * (q_g . codes_g) + bias_g * sum(q_g). qsum: the row's per-group sums.
SK_INLINE float dot_q8(const float* q, const uint8_t* codes, const float* sc, const float* bi, const float* qsum,
                       int D, int gs) {
  float s = 0.0f;
  for (int g = 0; g < D / gs; ++g) {
    float lanes[kLanes] = {};
    const float* qg = q + g * gs;
    const uint8_t* cg = codes + g * gs;
    for (int i = 0; i < gs; i += kLanes)
      for (int j = 0; j < kLanes; ++j) lanes[j] += qg[i + j] * (float)cg[i + j];
    s += sc[g] * hsum(lanes) + bi[g] * qsum[g];
  }
  return s;
}

// 4-bit rows: byte i holds element 2i (low nibble) and 2i+1 (high nibble). `qeo` is the query row
// split into even and odd elements per group ([even gs/2][odd gs/2] for each group).
SK_INLINE float dot_q4(const float* qeo, const uint8_t* codes, const float* sc, const float* bi, const float* qsum,
                       int D, int gs) {
  float s = 0.0f;
  const int h = gs / 2;
  for (int g = 0; g < D / gs; ++g) {
    float lanes[kLanes] = {};
    const float* qe = qeo + g * gs;
    const float* qo = qe + h;
    const uint8_t* cg = codes + g * h;
    for (int i = 0; i < h; i += kLanes)
      for (int j = 0; j < kLanes; ++j)
        lanes[j] += qe[i + j] * (float)(cg[i + j] & 15) + qo[i + j] * (float)(cg[i + j] >> 4);
    s += sc[g] * hsum(lanes) + bi[g] * qsum[g];
  }
  return s;
}

SK_INLINE void axpy(float* acc, float p, const float* v, int n) {
  for (int i = 0; i < n; ++i) acc[i] += p * v[i];
}

SK_INLINE void axpy_q8(float* acc, float p, const uint8_t* codes, const float* sc, const float* bi, int D, int gs) {
  for (int g = 0; g < D / gs; ++g) {
    const float a = p * sc[g], c = p * bi[g];
    float* o = acc + g * gs;
    const uint8_t* cg = codes + g * gs;
    for (int i = 0; i < gs; ++i) o[i] += a * (float)cg[i] + c;
  }
}

// Accumulates into an even/odd split accumulator ([even gs/2][odd gs/2] per group); the caller
// interleaves it back.
SK_INLINE void axpy_q4(float* acc_eo, float p, const uint8_t* codes, const float* sc, const float* bi, int D,
                       int gs) {
  const int h = gs / 2;
  for (int g = 0; g < D / gs; ++g) {
    const float a = p * sc[g], c = p * bi[g];
    float* oe = acc_eo + g * gs;
    float* oo = oe + h;
    const uint8_t* cg = codes + g * h;
    for (int i = 0; i < h; ++i) {
      oe[i] += a * (float)(cg[i] & 15) + c;
      oo[i] += a * (float)(cg[i] >> 4) + c;
    }
  }
}

// Whole rows of the attention, each compiled per ISA with its helpers inlined.
SK_CLONES void scores_f32(const float* q, const float* kb, int64_t ss, int S, int D, float scale, float* out) {
  for (int s = 0; s < S; ++s) out[s] = dot(q, kb + s * ss, D) * scale;
}

SK_CLONES void scores_quant(const float* q, const float* qsum, const uint8_t* kb, int64_t ss, const float* scb,
                            const float* bib, int64_t qs, int S, int D, int gs, int bits, float scale, float* out) {
  if (bits == 8)
    for (int s = 0; s < S; ++s) out[s] = dot_q8(q, kb + s * ss, scb + s * qs, bib + s * qs, qsum, D, gs) * scale;
  else
    for (int s = 0; s < S; ++s) out[s] = dot_q4(q, kb + s * ss, scb + s * qs, bib + s * qs, qsum, D, gs) * scale;
}

SK_CLONES void wsum_f32(const float* p, const float* vb, int64_t ss, int S, int D, float* acc) {
  for (int s = 0; s < S; ++s)
    if (p[s] != 0.0f) axpy(acc, p[s], vb + s * ss, D);
}

SK_CLONES void wsum_quant(const float* p, const uint8_t* vb, int64_t ss, const float* scb, const float* bib,
                          int64_t qs, int S, int D, int gs, int bits, float* acc) {
  for (int s = 0; s < S; ++s) {
    if (p[s] == 0.0f) continue;
    if (bits == 8)
      axpy_q8(acc, p[s], vb + s * ss, scb + s * qs, bib + s * qs, D, gs);
    else
      axpy_q4(acc, p[s], vb + s * ss, scb + s * qs, bib + s * qs, D, gs);
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
  thread_local std::vector<float> scores, qprep, qsum, acc;
  scores.resize((size_t)rows * S);
  acc.resize(D);
  const bool kq = k.bits != 0;
  const int kgroups = kq ? D / k.group_size : 0;
  if (kq) {
    // Per query row: per-group sums, and for 4-bit keys the row split into even/odd elements.
    qprep.resize((size_t)rows * D);
    qsum.resize((size_t)rows * kgroups);
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + ((int64_t)(b * Hq + hkv * rep + r / L) * L + r % L) * D;
      float* qp = qprep.data() + (int64_t)r * D;
      const int gs = k.group_size, h = gs / 2;
      for (int g = 0; g < kgroups; ++g) {
        float sg = 0.0f;
        for (int i = 0; i < gs; ++i) sg += qr[g * gs + i];
        qsum[(size_t)r * kgroups + g] = sg;
        if (k.bits == 4)
          for (int i = 0; i < h; ++i) {
            qp[g * gs + i] = qr[g * gs + 2 * i];
            qp[g * gs + h + i] = qr[g * gs + 2 * i + 1];
          }
        else
          std::memcpy(qp + g * gs, qr + g * gs, sizeof(float) * gs);
      }
    }
  }

  // Scores.
  for (int r = 0; r < rows; ++r) {
    const int h = hkv * rep + r / L, l = r % L;
    const float* qr = kq ? qprep.data() + (int64_t)r * D : q + ((int64_t)(b * Hq + h) * L + l) * D;
    float* sr = scores.data() + (int64_t)r * S;
    if (!kq) {
      scores_f32(qr, static_cast<const float*>(k.data) + b * k.sb + hkv * k.sh, k.ss, S, D, scale, sr);
    } else {
      scores_quant(qr, qsum.data() + (size_t)r * kgroups, static_cast<const uint8_t*>(k.data) + b * k.sb + hkv * k.sh,
                   k.ss, k.scales + b * k.qb + hkv * k.qh, k.biases + b * k.qb + hkv * k.qh, k.qs, S, D,
                   k.group_size, k.bits, scale, sr);
    }
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

  // Weights and the weighted sum of values.
  for (int r = 0; r < rows; ++r) {
    const int h = hkv * rep + r / L, l = r % L;
    float* sr = scores.data() + (int64_t)r * S;
    const float inv = softmax_row(sr, S);
    std::fill(acc.begin(), acc.end(), 0.0f);
    if (v.bits == 0)
      wsum_f32(sr, static_cast<const float*>(v.data) + b * v.sb + hkv * v.sh, v.ss, S, D, acc.data());
    else
      wsum_quant(sr, static_cast<const uint8_t*>(v.data) + b * v.sb + hkv * v.sh, v.ss, v.scales + b * v.qb + hkv * v.qh,
                 v.biases + b * v.qb + hkv * v.qh, v.qs, S, D, v.group_size, v.bits, acc.data());
    float* o = out + ((int64_t)(b * Hq + h) * L + l) * D;
    if (v.bits == 4) {
      const int gs = v.group_size, hg = gs / 2;
      for (int g = 0; g < D / gs; ++g)
        for (int i = 0; i < hg; ++i) {
          o[g * gs + 2 * i] = acc[g * gs + i] * inv;
          o[g * gs + 2 * i + 1] = acc[g * gs + hg + i] * inv;
        }
    } else {
      for (int d = 0; d < D; ++d) o[d] = acc[d] * inv;
    }
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
