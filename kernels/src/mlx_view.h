// MLX arrays as plain pointers for the kernels' tasks: what a task needs to read an input, and
// conversions between MLX's float dtypes and float32. Shared by the MLX glue of every op family.
#pragma once

#include <cstring>
#include <vector>

#include "mlx/array.h"

namespace skx {

namespace mx = mlx::core;

// ------------------------------------------------------------------------------------- helpers

// What a task needs to read one input: a pointer plus shape and strides (in elements). Captured
// by value, so the task does not touch mx::array (whose buffers MLX keeps alive until the stream
// has run past this op).
struct View {
  const uint8_t* data = nullptr;
  mx::Dtype dtype = mx::float32;
  std::vector<int> shape;
  std::vector<int64_t> strides;
  bool contiguous = true;

  static View of(const mx::array& a) {
    View v;
    v.data = a.data<uint8_t>();
    v.dtype = a.dtype();
    v.shape.assign(a.shape().begin(), a.shape().end());
    v.strides.assign(a.strides().begin(), a.strides().end());
    v.contiguous = a.flags().row_contiguous;
    return v;
  }
  int64_t rows() const {
    int64_t r = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) r *= shape[i];
    return r;
  }
  // Element offset of the first element of flattened row r (all dims but the last).
  int64_t row_offset(int64_t r) const {
    int64_t off = 0;
    for (int i = (int)shape.size() - 2; i >= 0; --i) {
      off += (r % shape[i]) * strides[i];
      r /= shape[i];
    }
    return off;
  }
};

inline float to_float(const uint8_t* p, mx::Dtype t) {
  switch (t) {
    case mx::float32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case mx::float16: return static_cast<float>(*reinterpret_cast<const mx::float16_t*>(p));
    case mx::bfloat16: return static_cast<float>(*reinterpret_cast<const mx::bfloat16_t*>(p));
    default: throw std::invalid_argument("semantic_kernels: unsupported dtype");
  }
}

// Rows of v (any float dtype, any strides) as contiguous float32 [rows, cols].
inline const float* gather_float(const View& v, std::vector<float>& buf) {
  const int64_t R = v.rows(), C = v.shape.back();
  if (v.contiguous && v.dtype == mx::float32) return reinterpret_cast<const float*>(v.data);
  buf.resize((size_t)(R * C));
  const size_t isz = mx::size_of(v.dtype);
  const int64_t cs = v.strides.back();
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* base = v.data + v.row_offset(r) * (int64_t)isz;
    float* o = buf.data() + r * C;
    if (v.dtype == mx::float32 && cs == 1)
      std::memcpy(o, base, C * 4);
    else
      for (int64_t c = 0; c < C; ++c) o[c] = to_float(base + c * cs * (int64_t)isz, v.dtype);
  }
  return buf.data();
}

// A 2-D input as row-major bytes (copied only if it is not already).
inline const uint8_t* gather_raw(const View& v, std::vector<uint8_t>& buf) {
  if (v.contiguous) return v.data;
  const int64_t R = v.rows(), C = v.shape.back();
  const size_t isz = mx::size_of(v.dtype);
  buf.resize((size_t)(R * C) * isz);
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* base = v.data + v.row_offset(r) * (int64_t)isz;
    for (int64_t c = 0; c < C; ++c)
      std::memcpy(buf.data() + (r * C + c) * isz, base + c * v.strides.back() * (int64_t)isz, isz);
  }
  return buf.data();
}

inline void store_from_float(const float* src, int64_t n, mx::Dtype t, void* dst) {
  if (t == mx::float32) {
    std::memcpy(dst, src, n * 4);
  } else if (t == mx::float16) {
    auto* d = static_cast<mx::float16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<mx::float16_t>(src[i]);
  } else {
    auto* d = static_cast<mx::bfloat16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<mx::bfloat16_t>(src[i]);
  }
}

inline bool is_float(mx::Dtype t) { return t == mx::float32 || t == mx::float16 || t == mx::bfloat16; }

}  // namespace skx
