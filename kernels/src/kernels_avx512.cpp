// AVX-512 kernels (F + BW + DQ + VL, F16C, FMA). Built twice by CMake:
//   SK_VNNI=0 -> kernels_avx512():     int8 dot products with vpmaddubsw + vpmaddwd (Skylake-X)
//   SK_VNNI=1 -> kernels_avx512vnni(): int8 dot products with vpdpbusd (Ice Lake, Zen 4, ...)
// The float kernels are the same code in both builds; the dispatcher exposes the first as "avx512".
//
// Nothing here may have external linkage except the accessor at the bottom (see qkernels.h).
#include <immintrin.h>

#include "qkernels.h"

#ifndef SK_VNNI
#define SK_VNNI 0
#endif

namespace sk {
namespace {

constexpr int kBlockBytes = 64;  // one zmm of packed weights per int8 block
#include "prep.inc"

// Scales / biases of one row to float (zero-padded past `count`, see params_to_float_generic).
inline void params_to_float(const void* src, int st, int count, float* dst) {
  int i = 0;
  if (st == SCALE_F32) {
    const float* s = (const float*)src;
    for (; i + 16 <= count; i += 16) _mm512_storeu_ps(dst + i, _mm512_loadu_ps(s + i));
    if (i < count)
      _mm512_storeu_ps(dst + i, _mm512_maskz_loadu_ps((__mmask16)((1u << (count - i)) - 1), s + i));
  } else {
    const uint16_t* s = (const uint16_t*)src;
    for (; i < count; i += 16) {
      __mmask16 k = count - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (count - i)) - 1);
      __m256i h = _mm256_maskz_loadu_epi16(k, s + i);
      __m512 f = st == SCALE_F16 ? _mm512_cvtph_ps(h)
                                 : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      _mm512_storeu_ps(dst + i, f);
    }
  }
  _mm512_storeu_ps(dst + round_up(count, 16), _mm512_setzero_ps());
}

// ------------------------------------------------------------------------------------------
// Float path: dequantize 16 bytes of weights to floats (shared by the MT rows of x), then FMA.
// U units are processed per iteration with separate accumulators, because at small MT a single
// accumulator chain would be bound by FMA latency rather than throughput.
// ------------------------------------------------------------------------------------------

template <int MT, int U>
inline void tile_f4(const uint8_t* wr, const float* sbuf, const float* bbuf, const float* xf, int64_t K,
                    int gs, float* out, int64_t ldo) {
  __m512 acc[U][2][MT];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MT; ++m) acc[u][0][m] = acc[u][1][m] = _mm512_setzero_ps();
  const __m512i m15 = _mm512_set1_epi32(15);
  const int units = (int)(K / 32);
  int t = 0;
  for (; t + U <= units; t += U) {
    for (int u = 0; u < U; ++u) {
      const int e = (t + u) * 32;  // first element of the unit
      const __m512 s = _mm512_set1_ps(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = _mm512_set1_ps(bbuf[e >> __builtin_ctz((unsigned)gs)]);
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wr + e / 2)));
      __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, m15)), s, b);
      __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), s, b);
      for (int m = 0; m < MT; ++m) {
        const float* xr = xf + m * K + e;
        acc[u][0][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[u][0][m]);
        acc[u][1][m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[u][1][m]);
      }
    }
  }
  for (; t < units; ++t) {  // leftover units (fewer than U)
    const int e = t * 32;
    const __m512 s = _mm512_set1_ps(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = _mm512_set1_ps(bbuf[e >> __builtin_ctz((unsigned)gs)]);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wr + e / 2)));
    __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, m15)), s, b);
    __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), s, b);
    for (int m = 0; m < MT; ++m) {
      const float* xr = xf + m * K + e;
      acc[0][0][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), acc[0][0][m]);
      acc[0][1][m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), acc[0][1][m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m512 a = _mm512_add_ps(acc[0][0][m], acc[0][1][m]);
    for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, _mm512_add_ps(acc[u][0][m], acc[u][1][m]));
    out[m * ldo] = _mm512_reduce_add_ps(a);
  }
}

template <int MT, int U>
inline void tile_f8(const uint8_t* wr, const float* sbuf, const float* bbuf, const float* xf, int64_t K,
                    int gs, float* out, int64_t ldo) {
  __m512 acc[U][MT];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MT; ++m) acc[u][m] = _mm512_setzero_ps();
  const int units = (int)(K / 16);
  int t = 0;
  for (; t + U <= units; t += U) {
    for (int u = 0; u < U; ++u) {
      const int e = (t + u) * 16;
      const __m512 s = _mm512_set1_ps(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = _mm512_set1_ps(bbuf[e >> __builtin_ctz((unsigned)gs)]);
      __m512 w = _mm512_fmadd_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wr + e)))), s, b);
      for (int m = 0; m < MT; ++m) acc[u][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xf + m * K + e), acc[u][m]);
    }
  }
  for (; t < units; ++t) {
    const int e = t * 16;
    const __m512 s = _mm512_set1_ps(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = _mm512_set1_ps(bbuf[e >> __builtin_ctz((unsigned)gs)]);
    __m512 w = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wr + e)))), s, b);
    for (int m = 0; m < MT; ++m) acc[0][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xf + m * K + e), acc[0][m]);
  }
  for (int m = 0; m < MT; ++m) {
    __m512 a = acc[0][m];
    for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[u][m]);
    out[m * ldo] = _mm512_reduce_add_ps(a);
  }
}

// ------------------------------------------------------------------------------------------
// Int8 path. Per 64-byte block of a weight row, each 32-bit lane l accumulates the products of
// 4 weight bytes with 4 int8 x values; all 8 (4-bit) or 4 (8-bit) elements of a lane share one
// weight group and one x scale, so the lane sums are scaled by a per-lane vector
// (weight scale x x scale) and accumulated in float; the horizontal sum happens once per row.
// The bias term is sum_g bias[g] * xsum[g], a short dot product over the groups.
// ------------------------------------------------------------------------------------------

struct VT {
  using F = __m512;
  using I = __m512i;
  static constexpr int LANES = 16;
  static constexpr int BB = kBlockBytes;
  static F fzero() { return _mm512_setzero_ps(); }
  static I izero() { return _mm512_setzero_si512(); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static I loadx(const int8_t* p) { return _mm512_loadu_si512((const void*)p); }
  static I load_block(const uint8_t* p, int bytes) {
    // Masked load for the last, partial block of a row: never reads past the row.
    return bytes == 64 ? _mm512_loadu_si512((const void*)p)
                       : _mm512_maskz_loadu_epi8(((__mmask64)1 << bytes) - 1, p);
  }
  static I lo_nib(I w) { return _mm512_and_si512(w, _mm512_set1_epi8(0x0f)); }
  static I hi_nib(I w) { return _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi8(0x0f)); }
  // acc += per 4-byte lane sum of u8(w) * s8(x), w <= 15
  static I dot4(I acc, I w, I x) {
#if SK_VNNI
    return _mm512_dpbusd_epi32(acc, w, x);
#else
    // vpmaddubsw saturates pairs at int16: safe because w <= 15 (2 * 15 * 127 < 32767).
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
#endif
  }
  // Same for full 8-bit weights.
  static I dot4_u8(I acc, I w, I x) {
#if SK_VNNI
    return _mm512_dpbusd_epi32(acc, w, x);
#else
    // Split into nibbles (w = 16 hi + lo) so that vpmaddubsw cannot saturate.
    I pl = _mm512_madd_epi16(_mm512_maddubs_epi16(lo_nib(w), x), _mm512_set1_epi16(1));
    I ph = _mm512_madd_epi16(_mm512_maddubs_epi16(hi_nib(w), x), _mm512_set1_epi16(16));
    return _mm512_add_epi32(acc, _mm512_add_epi32(pl, ph));
#endif
  }
  // Lane -> group offset within a block; all zero when the block lies in one group.
  static I make_idx(int lane_elems, int gs) {
    alignas(64) int idx[16];
    for (int l = 0; l < 16; ++l) idx[l] = (l * lane_elems) / gs;
    return _mm512_load_si512((const void*)idx);
  }
  static F scales(const float* p, I idx) { return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(p)); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  // Four horizontal sums at once (one reduction tree instead of four).
  static void hsum4(F a, F b, F c, F d, float* out) {
    F ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
    F cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee));
    // 128-bit lanes now: [a02 a13 b02 b13], [c02 c13 d02 d13] -> [a b c d] partial sums of 4
    F abcd = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));
    __m512 t = _mm512_add_ps(abcd, _mm512_permute_ps(abcd, 0x4e));  // swap pairs within each 128-bit lane
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xb1));               // swap neighbours
    const __m512i pick = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, t)));
  }
};

#include "int8_tile.inc"

// ------------------------------------------------------------------------------------------
// Row loops
// ------------------------------------------------------------------------------------------

constexpr int kMaxTileF = 8;  // rows of x per register tile, float path

template <int BITS>
inline void float_tile(int mt, const uint8_t* wr, const float* sbuf, const float* bbuf, const float* xf,
                       int64_t K, int gs, float* out, int64_t ldo) {
#define SK_F(MT, U)                                                                     \
  case MT:                                                                              \
    if (BITS == 4)                                                                      \
      tile_f4<MT, U>(wr, sbuf, bbuf, xf, K, gs, out, ldo);                              \
    else                                                                                \
      tile_f8<MT, U * 2>(wr, sbuf, bbuf, xf, K, gs, out, ldo);                          \
    break;
  switch (mt) {
    SK_F(1, 2)
    SK_F(2, 2)
    SK_F(3, 1)
    SK_F(4, 1)
    SK_F(5, 1)
    SK_F(6, 1)
    SK_F(7, 1)
    SK_F(8, 1)
  }
#undef SK_F
}

void rows_float(const QWeights& q, const PreparedX& px, float* out, int64_t ldo, int n0, int n1) {
  alignas(64) float sbuf[kParamBuf];
  alignas(64) float bbuf[kParamBuf];
  const int M = px.M;
  const int pass = m_pass_rows((int64_t)px.K * 4);
  for (int mp = 0; mp < M; mp += pass) {
    const int mend = sk_min(M, mp + pass);
    for (int n = n0; n < n1; ++n) {
      params_to_float(param_row(q.scales, q.st, n, q.groups), q.st, q.groups, sbuf);
      params_to_float(param_row(q.biases, q.st, n, q.groups), q.st, q.groups, bbuf);
      const uint8_t* wr = q.w + (int64_t)n * q.row_bytes;
      for (int m = mp; m < mend;) {
        const int mt = sk_min(kMaxTileF, mend - m);
        float* o = out + (int64_t)m * ldo + n;
        const float* xf = px.xf + (int64_t)m * px.K;
        if (q.bits == 4)
          float_tile<4>(mt, wr, sbuf, bbuf, xf, px.K, q.gs, o, ldo);
        else
          float_tile<8>(mt, wr, sbuf, bbuf, xf, px.K, q.gs, o, ldo);
        m += mt;
      }
    }
  }
}

void rows_int8(const QWeights& q, const PreparedX& px, float* out, int64_t ldo, int n0, int n1) {
  if (q.bits == 4)
    i8_rows<4>(q, px, out, ldo, n0, n1);
  else
    i8_rows<8>(q, px, out, ldo, n0, n1);
}

// ------------------------------------------------------------------------------------------
// Dequantize to float32 (for prefill: dequantize just in time, then a BLAS sgemm).
// ------------------------------------------------------------------------------------------

void dequant(const QWeights& q, float* out, int n0, int n1) {
  alignas(64) float sbuf[kParamBuf];
  alignas(64) float bbuf[kParamBuf];
  const int K = q.K, gs = q.gs;
  const __m128i m0f = _mm_set1_epi8(0x0f);
  for (int n = n0; n < n1; ++n) {
    params_to_float(param_row(q.scales, q.st, n, q.groups), q.st, q.groups, sbuf);
    params_to_float(param_row(q.biases, q.st, n, q.groups), q.st, q.groups, bbuf);
    const uint8_t* wr = q.w + (int64_t)n * q.row_bytes;
    float* o = out + (int64_t)n * K;
    if (q.bits == 4) {
      for (int e = 0; e < K; e += 32) {  // 16 bytes -> 32 floats, interleaving nibbles bytewise
        const __m512 s = _mm512_set1_ps(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = _mm512_set1_ps(bbuf[e >> __builtin_ctz((unsigned)gs)]);
        __m128i v = _mm_loadu_si128((const __m128i*)(wr + e / 2));
        __m128i lo = _mm_and_si128(v, m0f), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m0f);
        __m128i a = _mm_unpacklo_epi8(lo, hi), c = _mm_unpackhi_epi8(lo, hi);
        _mm512_storeu_ps(o + e, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(a)), s, b));
        _mm512_storeu_ps(o + e + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c)), s, b));
      }
    } else {
      for (int e = 0; e < K; e += 16) {
        const __m512 s = _mm512_set1_ps(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = _mm512_set1_ps(bbuf[e >> __builtin_ctz((unsigned)gs)]);
        __m128i v = _mm_loadu_si128((const __m128i*)(wr + e));
        _mm512_storeu_ps(o + e, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)), s, b));
      }
    }
  }
}

size_t scratch_bytes(int M, int K, int bits, int gs, int int8) {
  return prep_scratch_bytes(M, K, bits, gs, int8, kBlockBytes);
}

void prepare(const float* x, int M, int K, int bits, int gs, int int8, void* scratch, PreparedX& px) {
  prepare_common(x, M, K, bits, gs, int8, kBlockBytes, scratch, px);
}

const KernelSet kSet = {SK_VNNI ? "avx512vnni" : "avx512", kBlockBytes, scratch_bytes, prepare,
                        rows_float,                        rows_int8,   dequant};

}  // namespace

#if SK_VNNI
const KernelSet* kernels_avx512vnni() { return &kSet; }
#else
const KernelSet* kernels_avx512() { return &kSet; }
#endif

}  // namespace sk
