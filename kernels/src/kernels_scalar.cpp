// Portable scalar kernels: the fallback for any CPU and the reference the SIMD paths are tested
// against. Float only (there is no point in an int8 scalar path). Compiled with the baseline
// flags of the build, so the compiler may still auto-vectorise for SSE2 / base NEON.
#include "qkernels.h"

namespace sk {
namespace {

constexpr int kBlockBytes = 0;
#include "prep.inc"

size_t scratch_bytes(int M, int K, int bits, int gs, int int8) {
  return prep_scratch_bytes(M, K, bits, gs, int8, kBlockBytes);
}

void prepare(const float* x, int M, int K, int bits, int gs, int int8, void* scratch, PreparedX& px) {
  prepare_common(x, M, K, bits, gs, 0, kBlockBytes, scratch, px);
}

void rows_float(const QWeights& q, const PreparedX& px, float* out, int64_t ldo, int n0, int n1) {
  float sbuf[kParamBuf], bbuf[kParamBuf];
  const int K = px.K, gs = q.gs;
  for (int n = n0; n < n1; ++n) {
    params_to_float_generic(param_row(q.scales, q.st, n, q.groups), q.st, q.groups, sbuf);
    params_to_float_generic(param_row(q.biases, q.st, n, q.groups), q.st, q.groups, bbuf);
    const uint8_t* wr = q.w + (int64_t)n * q.row_bytes;
    for (int m = 0; m < px.M; ++m) {
      const float* xr = px.xf + (int64_t)m * K;
      float acc = 0.0f;
      for (int g = 0; g < q.groups; ++g) {
        const float s = sbuf[g], b = bbuf[g];
        const int k0 = g * gs;
        if (q.bits == 4) {
          for (int u = k0; u < k0 + gs; u += 32) {  // one 32-element unit = 16 bytes
            const uint8_t* wu = wr + u / 2;
            for (int i = 0; i < 16; ++i) {
              acc += xr[u + i] * (s * (float)(wu[i] & 15) + b);
              acc += xr[u + 16 + i] * (s * (float)(wu[i] >> 4) + b);
            }
          }
        } else {
          for (int k = k0; k < k0 + gs; ++k) acc += xr[k] * (s * (float)wr[k] + b);
        }
      }
      out[(int64_t)m * ldo + n] = acc;
    }
  }
}

void dequant(const QWeights& q, float* out, int n0, int n1) {
  float sbuf[kParamBuf], bbuf[kParamBuf];
  const int K = q.K;
  for (int n = n0; n < n1; ++n) {
    params_to_float_generic(param_row(q.scales, q.st, n, q.groups), q.st, q.groups, sbuf);
    params_to_float_generic(param_row(q.biases, q.st, n, q.groups), q.st, q.groups, bbuf);
    const uint8_t* wr = q.w + (int64_t)n * q.row_bytes;
    float* o = out + (int64_t)n * K;
    if (q.bits == 4) {
      for (int k = 0; k < K; k += 2) {
        const float s = sbuf[k / q.gs], b = bbuf[k / q.gs];
        o[k] = s * (float)(wr[k / 2] & 15) + b;
        o[k + 1] = s * (float)(wr[k / 2] >> 4) + b;
      }
    } else {
      for (int k = 0; k < K; ++k) o[k] = sbuf[k / q.gs] * (float)wr[k] + bbuf[k / q.gs];
    }
  }
}

const KernelSet kSet = {"scalar", kBlockBytes, scratch_bytes, prepare, rows_float, nullptr, dequant};

}  // namespace

const KernelSet* kernels_scalar() { return &kSet; }

}  // namespace sk
