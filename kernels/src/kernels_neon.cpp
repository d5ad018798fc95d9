// AArch64 Advanced SIMD kernels. Built twice by CMake:
//   SK_DOT=0 -> kernels_neon():     float path only (any ARMv8-A)
//   SK_DOT=1 -> kernels_neon_dot(): float path + int8 path with SDOT (ARMv8.2-A dotprod: Apple M1+,
//                                   Graviton 2+, Ampere Altra, Cortex-A76+); built with +dotprod
// Same structure as the x86 kernels (see kernels_avx512.cpp and int8_tile.inc), with 16-byte
// int8 blocks. Verified by cross-compiling and running sk_selftest under qemu-aarch64.
#if defined(__aarch64__)
#include <arm_neon.h>

#include "qkernels.h"

#ifndef SK_DOT
#define SK_DOT 0
#endif

namespace sk {
namespace {

constexpr int kBlockBytes = 16;
#include "prep.inc"

inline void params_to_float(const void* src, int st, int count, float* dst) {
  int i = 0;
  if (st == SCALE_F32) {
    const float* s = (const float*)src;
    for (; i + 4 <= count; i += 4) vst1q_f32(dst + i, vld1q_f32(s + i));
  } else if (st == SCALE_F16) {
    const uint16_t* s = (const uint16_t*)src;
    for (; i + 4 <= count; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + i))));
  } else {
    const uint16_t* s = (const uint16_t*)src;
    for (; i + 4 <= count; i += 4) vst1q_f32(dst + i, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(s + i), 16)));
  }
  if (i < count)
    params_to_float_generic((const char*)src + (int64_t)i * (st == SCALE_F32 ? 4 : 2), st, count - i, dst + i);
  else
    for (int j = count; j < count + 32; ++j) dst[j] = 0.0f;
}

// 16 u8 -> 4 float vectors
inline void u8_to_f32x4x4(uint8x16_t v, float32x4_t* f) {
  uint16x8_t a = vmovl_u8(vget_low_u8(v)), b = vmovl_high_u8(v);
  f[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(a)));
  f[1] = vcvtq_f32_u32(vmovl_high_u16(a));
  f[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(b)));
  f[3] = vcvtq_f32_u32(vmovl_high_u16(b));
}

// ---------------------------------------------------------------------------------- float path

template <int MT>
inline void tile_f(const uint8_t* wr, const float* sbuf, const float* bbuf, const float* xf, int64_t K, int gs,
                   int bits, float* out, int64_t ldo) {
  float32x4_t acc[2][MT];
  for (int m = 0; m < MT; ++m) acc[0][m] = acc[1][m] = vdupq_n_f32(0.0f);
  if (bits == 4) {
    const uint8x16_t m15 = vdupq_n_u8(15);
    for (int e = 0; e < K; e += 32) {  // one 32-element unit = 16 bytes: even elements low nibbles
      const float32x4_t s = vdupq_n_f32(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = vdupq_n_f32(bbuf[e >> __builtin_ctz((unsigned)gs)]);
      uint8x16_t v = vld1q_u8(wr + e / 2);
      float32x4_t lo[4], hi[4];
      u8_to_f32x4x4(vandq_u8(v, m15), lo);
      u8_to_f32x4x4(vshrq_n_u8(v, 4), hi);
      for (int j = 0; j < 4; ++j) {
        lo[j] = vfmaq_f32(b, lo[j], s);
        hi[j] = vfmaq_f32(b, hi[j], s);
      }
      for (int m = 0; m < MT; ++m) {
        const float* xr = xf + m * K + e;
        for (int j = 0; j < 4; ++j) {
          acc[0][m] = vfmaq_f32(acc[0][m], lo[j], vld1q_f32(xr + 4 * j));
          acc[1][m] = vfmaq_f32(acc[1][m], hi[j], vld1q_f32(xr + 16 + 4 * j));
        }
      }
    }
  } else {
    for (int e = 0; e < K; e += 16) {
      const float32x4_t s = vdupq_n_f32(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = vdupq_n_f32(bbuf[e >> __builtin_ctz((unsigned)gs)]);
      float32x4_t w[4];
      u8_to_f32x4x4(vld1q_u8(wr + e), w);
      for (int j = 0; j < 4; ++j) w[j] = vfmaq_f32(b, w[j], s);
      for (int m = 0; m < MT; ++m) {
        const float* xr = xf + m * K + e;
        acc[0][m] = vfmaq_f32(acc[0][m], w[0], vld1q_f32(xr));
        acc[1][m] = vfmaq_f32(acc[1][m], w[1], vld1q_f32(xr + 4));
        acc[0][m] = vfmaq_f32(acc[0][m], w[2], vld1q_f32(xr + 8));
        acc[1][m] = vfmaq_f32(acc[1][m], w[3], vld1q_f32(xr + 12));
      }
    }
  }
  for (int m = 0; m < MT; ++m) out[m * ldo] = vaddvq_f32(vaddq_f32(acc[0][m], acc[1][m]));
}

constexpr int kMaxTileF = 4;

void rows_float(const QWeights& q, const PreparedX& px, float* out, int64_t ldo, int n0, int n1) {
  float sbuf[kParamBuf], bbuf[kParamBuf];
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
        switch (mt) {
          case 1: tile_f<1>(wr, sbuf, bbuf, xf, px.K, q.gs, q.bits, o, ldo); break;
          case 2: tile_f<2>(wr, sbuf, bbuf, xf, px.K, q.gs, q.bits, o, ldo); break;
          case 3: tile_f<3>(wr, sbuf, bbuf, xf, px.K, q.gs, q.bits, o, ldo); break;
          default: tile_f<4>(wr, sbuf, bbuf, xf, px.K, q.gs, q.bits, o, ldo); break;
        }
        m += mt;
      }
    }
  }
}

// ----------------------------------------------------------------------------------- int8 path
#if SK_DOT
struct VT {
  using F = float32x4_t;
  using I = int32x4_t;  // weight and x bytes travel reinterpreted as int32x4_t
  static constexpr int LANES = 4;
  static constexpr int BB = kBlockBytes;
  static F fzero() { return vdupq_n_f32(0.0f); }
  static I izero() { return vdupq_n_s32(0); }
  static F loadf(const float* p) { return vld1q_f32(p); }
  static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static F mul(F a, F b) { return vmulq_f32(a, b); }
  static F cvt(I a) { return vcvtq_f32_s32(a); }
  static I loadx(const int8_t* p) { return vreinterpretq_s32_s8(vld1q_s8(p)); }
  // Rows are a multiple of 16 bytes: every block is whole.
  static I load_block(const uint8_t* p, int) { return vreinterpretq_s32_u8(vld1q_u8(p)); }
  static I lo_nib(I w) { return vreinterpretq_s32_u8(vandq_u8(vreinterpretq_u8_s32(w), vdupq_n_u8(15))); }
  static I hi_nib(I w) { return vreinterpretq_s32_u8(vshrq_n_u8(vreinterpretq_u8_s32(w), 4)); }
  // SDOT is signed x signed: nibbles (0..15) are valid int8 as they are.
  static I dot4(I acc, I w, I x) { return vdotq_s32(acc, vreinterpretq_s8_s32(w), vreinterpretq_s8_s32(x)); }
  // Full bytes (0..255) are not: split into nibbles, w = 16 hi + lo.
  static I dot4_u8(I acc, I w, I x) {
    I l = vdotq_s32(acc, vreinterpretq_s8_s32(lo_nib(w)), vreinterpretq_s8_s32(x));
    I h = vdotq_s32(vdupq_n_s32(0), vreinterpretq_s8_s32(hi_nib(w)), vreinterpretq_s8_s32(x));
    return vaddq_s32(l, vshlq_n_s32(h, 4));
  }
  // A 16-byte block (32 or 16 elements) always lies inside one group (groups are >= 32).
  static I make_idx(int, int) { return vdupq_n_s32(0); }
  static F scales(const float* p, I) { return vdupq_n_f32(p[0]); }
  static float hsum(F v) { return vaddvq_f32(v); }
  static void hsum4(F a, F b, F c, F d, float* out) { vst1q_f32(out, vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d))); }
};

#include "int8_tile.inc"

void rows_int8(const QWeights& q, const PreparedX& px, float* out, int64_t ldo, int n0, int n1) {
  if (q.bits == 4)
    i8_rows<4>(q, px, out, ldo, n0, n1);
  else
    i8_rows<8>(q, px, out, ldo, n0, n1);
}
#endif

void dequant(const QWeights& q, float* out, int n0, int n1) {
  float sbuf[kParamBuf], bbuf[kParamBuf];
  const int K = q.K, gs = q.gs;
  for (int n = n0; n < n1; ++n) {
    params_to_float(param_row(q.scales, q.st, n, q.groups), q.st, q.groups, sbuf);
    params_to_float(param_row(q.biases, q.st, n, q.groups), q.st, q.groups, bbuf);
    const uint8_t* wr = q.w + (int64_t)n * q.row_bytes;
    float* o = out + (int64_t)n * K;
    if (q.bits == 4) {
      for (int e = 0; e < K; e += 32) {
        const float32x4_t s = vdupq_n_f32(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = vdupq_n_f32(bbuf[e >> __builtin_ctz((unsigned)gs)]);
        uint8x16_t v = vld1q_u8(wr + e / 2);
        uint8x16x2_t z = vzipq_u8(vandq_u8(v, vdupq_n_u8(15)), vshrq_n_u8(v, 4));  // natural order
        float32x4_t f[4];
        for (int h = 0; h < 2; ++h) {
          u8_to_f32x4x4(z.val[h], f);
          for (int j = 0; j < 4; ++j) vst1q_f32(o + e + 16 * h + 4 * j, vfmaq_f32(b, f[j], s));
        }
      }
    } else {
      for (int e = 0; e < K; e += 16) {
        const float32x4_t s = vdupq_n_f32(sbuf[e >> __builtin_ctz((unsigned)gs)]), b = vdupq_n_f32(bbuf[e >> __builtin_ctz((unsigned)gs)]);
        float32x4_t f[4];
        u8_to_f32x4x4(vld1q_u8(wr + e), f);
        for (int j = 0; j < 4; ++j) vst1q_f32(o + e + 4 * j, vfmaq_f32(b, f[j], s));
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

#if SK_DOT
const KernelSet kSet = {"neon_dot", kBlockBytes, scratch_bytes, prepare, rows_float, rows_int8, dequant};
#else
const KernelSet kSet = {"neon", kBlockBytes, scratch_bytes, prepare, rows_float, nullptr, dequant};
#endif

}  // namespace

#if SK_DOT
const KernelSet* kernels_neon_dot() { return &kSet; }
#else
const KernelSet* kernels_neon() { return &kSet; }
#endif

}  // namespace sk
#endif  // __aarch64__
