// AVX2 kernels (AVX2, FMA, F16C: Haswell and later, Zen 1 and later). Built twice by CMake:
//   SK_VNNI=0 -> kernels_avx2():     int8 dot products with vpmaddubsw + vpmaddwd
//   SK_VNNI=1 -> kernels_avx2vnni(): int8 dot products with AVX-VNNI vpdpbusd on ymm
//                                    (Alder Lake, Zen 5, Sierra Forest: AVX-VNNI without AVX-512)
// Same structure as kernels_avx512.cpp (see the comments there), with 32-byte int8 blocks.
#include <immintrin.h>

#include "qkernels.h"

#ifndef SK_VNNI
#define SK_VNNI 0
#endif

namespace sk {
namespace {

constexpr int kBlockBytes = 32;
#include "prep.inc"

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void params_to_float(const void* src, int st, int count, float* dst) {
  int i = 0;
  if (st == SCALE_F32) {
    const float* s = (const float*)src;
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(s + i));
  } else if (st == SCALE_F16) {
    const uint16_t* s = (const uint16_t*)src;
    for (; i + 8 <= count; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
  } else {
    const uint16_t* s = (const uint16_t*)src;
    for (; i + 8 <= count; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(s + i))), 16)));
  }
  // Tail (and zero padding) without reading past the row: AVX2 has no byte-masked loads.
  if (i < count) params_to_float_generic((const char*)src + (int64_t)i * (st == SCALE_F32 ? 4 : 2), st,
                                         count - i, dst + i);
  else
    for (int j = count; j < count + 32; ++j) dst[j] = 0.0f;
}

// ---------------------------------------------------------------------------------- float path

template <int MT, int U>
inline void tile_f4(const uint8_t* wr, const float* sbuf, const float* bbuf, const float* xf, int64_t K,
                    int gs, float* out, int64_t ldo) {
  // One 32-element unit = 16 bytes, handled as two halves of 8 bytes (8 int32 lanes each).
  __m256 acc[U][2][MT];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MT; ++m) acc[u][0][m] = acc[u][1][m] = _mm256_setzero_ps();
  const __m256i m15 = _mm256_set1_epi32(15);
  const int halves = (int)(K / 16);
  int t = 0;
  auto step = [&](int h, int u) __attribute__((always_inline)) {
    const int e = (h / 2) * 32;             // unit start
    const int off = (h & 1) * 8;            // 0 or 8 within the even / odd halves of the unit
    const __m256 s = _mm256_set1_ps(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = _mm256_set1_ps(bbuf[e >> __builtin_ctz((unsigned)gs)]);
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wr + h * 8)));
    __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m15)), s, b);
    __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), s, b);
    for (int m = 0; m < MT; ++m) {
      const float* xr = xf + m * K + e + off;
      acc[u][0][m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr), acc[u][0][m]);
      acc[u][1][m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr + 16), acc[u][1][m]);
    }
  };
  for (; t + U <= halves; t += U)
    for (int u = 0; u < U; ++u) step(t + u, u);
  for (; t < halves; ++t) step(t, 0);
  for (int m = 0; m < MT; ++m) {
    __m256 a = _mm256_add_ps(acc[0][0][m], acc[0][1][m]);
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, _mm256_add_ps(acc[u][0][m], acc[u][1][m]));
    out[m * ldo] = hsum8(a);
  }
}

template <int MT, int U>
inline void tile_f8(const uint8_t* wr, const float* sbuf, const float* bbuf, const float* xf, int64_t K,
                    int gs, float* out, int64_t ldo) {
  __m256 acc[U][MT];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MT; ++m) acc[u][m] = _mm256_setzero_ps();
  const int units = (int)(K / 8);
  int t = 0;
  auto step = [&](int t, int u) __attribute__((always_inline)) {
    const int e = t * 8;
    const __m256 s = _mm256_set1_ps(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = _mm256_set1_ps(bbuf[e >> __builtin_ctz((unsigned)gs)]);
    __m256 w = _mm256_fmadd_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wr + e)))), s, b);
    for (int m = 0; m < MT; ++m) acc[u][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xf + m * K + e), acc[u][m]);
  };
  for (; t + U <= units; t += U)
    for (int u = 0; u < U; ++u) step(t + u, u);
  for (; t < units; ++t) step(t, 0);
  for (int m = 0; m < MT; ++m) {
    __m256 a = acc[0][m];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[u][m]);
    out[m * ldo] = hsum8(a);
  }
}

// ----------------------------------------------------------------------------------- int8 path

struct VT {
  using F = __m256;
  using I = __m256i;
  static constexpr int LANES = 8;
  static constexpr int BB = kBlockBytes;
  static F fzero() { return _mm256_setzero_ps(); }
  static I izero() { return _mm256_setzero_si256(); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static I loadx(const int8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static I load_block(const uint8_t* p, int bytes) {
    // Rows are a multiple of 16 bytes, so a partial block is exactly 16 bytes (AVX2 has no
    // byte-masked loads; this never reads past the row).
    return bytes == 32 ? _mm256_loadu_si256((const __m256i*)p) : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)p));
  }
  static I lo_nib(I w) { return _mm256_and_si256(w, _mm256_set1_epi8(0x0f)); }
  static I hi_nib(I w) { return _mm256_and_si256(_mm256_srli_epi16(w, 4), _mm256_set1_epi8(0x0f)); }
  static I dot4(I acc, I w, I x) {
#if SK_VNNI
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
    // vpmaddubsw saturates pairs at int16: safe because w <= 15 (2 * 15 * 127 < 32767).
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
  }
  static I dot4_u8(I acc, I w, I x) {
#if SK_VNNI
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
    I pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo_nib(w), x), _mm256_set1_epi16(1));
    I ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi_nib(w), x), _mm256_set1_epi16(16));
    return _mm256_add_epi32(acc, _mm256_add_epi32(pl, ph));
#endif
  }
  static I make_idx(int lane_elems, int gs) {
    alignas(32) int idx[8];
    for (int l = 0; l < 8; ++l) idx[l] = (l * lane_elems) / gs;
    return _mm256_load_si256((const __m256i*)idx);
  }
  static F scales(const float* p, I idx) { return _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx); }
  static float hsum(F v) { return hsum8(v); }
  static void hsum4(F a, F b, F c, F d, float* out) {
    F t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // [a b c d | a b c d] partials
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }
};

#include "int8_tile.inc"

// ----------------------------------------------------------------------------------- row loops

constexpr int kMaxTileF = 4;  // 16 ymm registers: 2 x MT accumulators + temporaries

template <int BITS>
inline void float_tile(int mt, const uint8_t* wr, const float* sbuf, const float* bbuf, const float* xf,
                       int64_t K, int gs, float* out, int64_t ldo) {
  switch (mt) {
    case 1:
      if (BITS == 4) tile_f4<1, 2>(wr, sbuf, bbuf, xf, K, gs, out, ldo);
      else tile_f8<1, 4>(wr, sbuf, bbuf, xf, K, gs, out, ldo);
      break;
    case 2:
      if (BITS == 4) tile_f4<2, 1>(wr, sbuf, bbuf, xf, K, gs, out, ldo);
      else tile_f8<2, 2>(wr, sbuf, bbuf, xf, K, gs, out, ldo);
      break;
    case 3:
      if (BITS == 4) tile_f4<3, 1>(wr, sbuf, bbuf, xf, K, gs, out, ldo);
      else tile_f8<3, 1>(wr, sbuf, bbuf, xf, K, gs, out, ldo);
      break;
    case 4:
      if (BITS == 4) tile_f4<4, 1>(wr, sbuf, bbuf, xf, K, gs, out, ldo);
      else tile_f8<4, 1>(wr, sbuf, bbuf, xf, K, gs, out, ldo);
      break;
  }
}

void rows_float(const QWeights& q, const PreparedX& px, float* out, int64_t ldo, int n0, int n1) {
  alignas(32) float sbuf[kParamBuf];
  alignas(32) float bbuf[kParamBuf];
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

void dequant(const QWeights& q, float* out, int n0, int n1) {
  alignas(32) float sbuf[kParamBuf];
  alignas(32) float bbuf[kParamBuf];
  const int K = q.K, gs = q.gs;
  const __m128i m0f = _mm_set1_epi8(0x0f);
  for (int n = n0; n < n1; ++n) {
    params_to_float(param_row(q.scales, q.st, n, q.groups), q.st, q.groups, sbuf);
    params_to_float(param_row(q.biases, q.st, n, q.groups), q.st, q.groups, bbuf);
    const uint8_t* wr = q.w + (int64_t)n * q.row_bytes;
    float* o = out + (int64_t)n * K;
    if (q.bits == 4) {
      for (int e = 0; e < K; e += 32) {
        const __m256 s = _mm256_set1_ps(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = _mm256_set1_ps(bbuf[e >> __builtin_ctz((unsigned)gs)]);
        __m128i v = _mm_loadu_si128((const __m128i*)(wr + e / 2));
        __m128i lo = _mm_and_si128(v, m0f), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m0f);
        __m128i a = _mm_unpacklo_epi8(lo, hi), c = _mm_unpackhi_epi8(lo, hi);
        _mm256_storeu_ps(o + e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a)), s, b));
        _mm256_storeu_ps(o + e + 8, _mm256_fmadd_ps(
                                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8))), s, b));
        _mm256_storeu_ps(o + e + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), s, b));
        _mm256_storeu_ps(o + e + 24, _mm256_fmadd_ps(
                                         _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))), s, b));
      }
    } else {
      for (int e = 0; e < K; e += 8) {
        const __m256 s = _mm256_set1_ps(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = _mm256_set1_ps(bbuf[e >> __builtin_ctz((unsigned)gs)]);
        __m128i v = _mm_loadl_epi64((const __m128i*)(wr + e));
        _mm256_storeu_ps(o + e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), s, b));
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

const KernelSet kSet = {SK_VNNI ? "avx2vnni" : "avx2", kBlockBytes, scratch_bytes, prepare,
                        rows_float,                    rows_int8,   dequant};

}  // namespace

#if SK_VNNI
const KernelSet* kernels_avx2vnni() { return &kSet; }
#else
const KernelSet* kernels_avx2() { return &kSet; }
#endif

}  // namespace sk
