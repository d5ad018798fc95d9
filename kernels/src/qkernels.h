// Quantized matrix-vector / small-matrix kernels for MLX's affine quantization layout.
//
// This header is the boundary between the ISA-specific translation units (each compiled with
// its own -m flags) and the generic code (dispatch, thread pool, MLX glue). It holds only plain
// structs and function-pointer tables: no inline functions and no templates, so that nothing
// compiled with AVX-512 flags can be merged by the linker into code that runs on a CPU without
// AVX-512 (an ODR hazard of per-file target flags).
//
// Layout (verified against mx.quantize / mx.dequantize in MLX 0.32.4):
//   w       uint32 [N, K*bits/32]; element j of a word sits in bits [bits*j, bits*j+bits), so in
//           little-endian memory byte i of a 4-bit row holds element 2i (low nibble) and 2i+1
//           (high nibble), and byte i of an 8-bit row holds element i.
//   scales  [N, K/group_size] (float32, float16 or bfloat16)
//   biases  same shape and dtype as scales
//   w_real[n, k] = scales[n, k/gs] * q[n, k] + biases[n, k/gs];  out = x @ w_real^T
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace sk {

enum ScaleType : int { SCALE_F32 = 0, SCALE_F16 = 1, SCALE_BF16 = 2 };

struct QWeights {
  const uint8_t* w;      // packed rows, row stride = row_bytes
  const void* scales;    // [N, groups]
  const void* biases;    // [N, groups]
  int st;                // ScaleType of scales and biases
  int N, K, bits, gs;
  int64_t row_bytes;     // K * bits / 8
  int groups;            // K / gs
};

// x after preparation (done once per call, by the calling thread, read by all workers).
// Float mode:  xf holds M rows of K floats; for 4-bit weights each 32-element unit is stored as
//              [x0, x2, ..., x30, x1, x3, ..., x31] so that low nibbles meet even elements and high
//              nibbles odd ones without any shuffles in the inner loop. 8-bit: natural order.
// Int8 mode:   x quantized to int8 per 32 elements (symmetric, scale = max|x| / 127), laid out in
//              blocks matching the weight block of the ISA (block_bytes of packed weights):
//              4-bit: [block_bytes of even elements][block_bytes of odd elements]; 8-bit: natural.
//              dxl: one float per 32-bit lane of a block (the x scale of that lane's elements),
//              xsum: per weight group, the sum of the *dequantized* int8 x (see prep.inc for why).
struct PreparedX {
  int M = 0, K = 0;
  int int8 = 0;
  const float* xf = nullptr;   // float mode, M x K
  const int8_t* xq = nullptr;  // int8 mode, M x xq_stride
  const float* dxl = nullptr;  // int8 mode, M x nblocks x lanes
  const float* xsum = nullptr; // int8 mode, M x groups_pad
  int nblocks = 0, lanes = 0, block_bytes = 0;
  int64_t xq_stride = 0;
  int groups_pad = 0;
};

// One implementation of the kernels for one instruction set.
struct KernelSet {
  const char* name;      // e.g. "avx512vnni"
  int block_bytes;       // weight bytes per int8 block (16, 32 or 64); 0 = no int8 kernel
  // Bytes of scratch that prepare() needs (the caller owns the buffer; any alignment).
  size_t (*scratch_bytes)(int M, int K, int bits, int gs, int int8);
  // Fill px from contiguous float32 x [M, K]; px points into scratch afterwards.
  void (*prepare)(const float* x, int M, int K, int bits, int gs, int int8, void* scratch, PreparedX& px);
  // out[m * ldo + n] for n in [n0, n1), all m < px.M.
  void (*rows_float)(const QWeights& q, const PreparedX& px, float* out, int64_t ldo, int n0, int n1);
  void (*rows_int8)(const QWeights& q, const PreparedX& px, float* out, int64_t ldo, int n0, int n1);
  // Dequantize rows [n0, n1) to float32, out row stride = K.
  void (*dequant)(const QWeights& q, float* out, int n0, int n1);
};

// Each returns nullptr when the TU was not built for this architecture.
const KernelSet* kernels_scalar();
const KernelSet* kernels_avx2();
const KernelSet* kernels_avx2vnni();
const KernelSet* kernels_avx512();
const KernelSet* kernels_avx512vnni();
const KernelSet* kernels_neon();
const KernelSet* kernels_neon_dot();

}  // namespace sk
