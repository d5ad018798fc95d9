// MLX operations and Python bindings for the quantized kernels.
//
// Each op is a custom mlx::core::Primitive, so it composes with MLX's lazy graph, mx.eval,
// mx.async_eval and mx.compile. The work is handed to the CPU stream's command encoder (like
// MLX's own CPU ops): eval_cpu only allocates the output and enqueues a task, which runs later on
// the stream's thread, in order with the other ops of that stream.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "layers_ext.h"
#include "mlx_view.h"
#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

namespace {

using skx::View;
using skx::gather_float;
using skx::gather_raw;
using skx::store_from_float;

int scale_type(mx::Dtype t) {
  if (t == mx::float32) return sk::SCALE_F32;
  if (t == mx::float16) return sk::SCALE_F16;
  if (t == mx::bfloat16) return sk::SCALE_BF16;
  throw std::invalid_argument("semantic_kernels: scales must be float32, float16 or bfloat16");
}

using skx::is_float;

int resolve_path(const std::optional<std::string>& path) {
  int id = path ? sk::path_id(*path) : sk::default_path_id();
  if (id < 0) throw std::invalid_argument("semantic_kernels: path '" + *path + "' is not available on this CPU");
  return id;
}

// Validates shapes like mx.quantized_matmul does; returns {N, K}.
std::pair<int, int> check_quantized(const char* op, const mx::array& w, const mx::array& scales,
                                    const mx::array& biases, int group_size, int bits) {
  std::ostringstream msg;
  msg << "[" << op << "] ";
  if (bits != 4 && bits != 8) {
    msg << "bits must be 4 or 8, got " << bits << ".";
    throw std::invalid_argument(msg.str());
  }
  if (group_size != 32 && group_size != 64 && group_size != 128 && !(group_size == 16 && bits == 8)) {
    msg << "group_size must be 32, 64 or 128 (or 16 with 8 bits), got " << group_size << ".";
    throw std::invalid_argument(msg.str());
  }
  if (w.dtype() != mx::uint32 || w.ndim() != 2) {
    msg << "w must be a 2-D uint32 array (batched weights are not supported).";
    throw std::invalid_argument(msg.str());
  }
  const int N = w.shape(0);
  const int K = w.shape(1) * 32 / bits;
  if (scales.ndim() != 2 || scales.shape(0) != N || scales.shape(1) != K / group_size) {
    msg << "scales of shape " << scales.shape() << " do not match w of shape " << w.shape() << " with group_size "
        << group_size << " and bits " << bits << ".";
    throw std::invalid_argument(msg.str());
  }
  if (biases.shape() != scales.shape()) {
    msg << "biases must have the shape of scales.";
    throw std::invalid_argument(msg.str());
  }
  scale_type(scales.dtype());
  return {N, K};
}

sk::QWeights make_weights(const uint8_t* w, const void* s, const void* b, int st, int N, int K, int bits, int gs) {
  sk::QWeights q;
  q.w = w;
  q.scales = s;
  q.biases = b;
  q.st = st;
  q.N = N;
  q.K = K;
  q.bits = bits;
  q.gs = gs;
  q.row_bytes = (int64_t)K * bits / 8;
  q.groups = K / gs;
  return q;
}

// ---------------------------------------------------------------------------------- primitives

class QuantizedMatmul : public mx::UnaryPrimitive {
 public:
  QuantizedMatmul(mx::Stream s, int group_size, int bits, int path)
      : mx::UnaryPrimitive(s), group_size_(group_size), bits_(bits), path_(path) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const int N = inputs[1].shape(0);
    const int K = x.shape(-1);
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([xv = View::of(x), wv = View::of(inputs[1]), sv = View::of(inputs[2]), bv = View::of(inputs[3]),
                  out_ptr = out.data<uint8_t>(), out_dtype = out.dtype(), N, K, gs = group_size_, bits = bits_,
                  path = path_]() {
      // thread_local: reused across calls on the stream thread, so steady-state decode allocates nothing.
      thread_local std::vector<float> xbuf, obuf;
      thread_local std::vector<uint8_t> wbuf, sbuf, bbuf;
      const int M = (int)xv.rows();
      const float* xf = gather_float(xv, xbuf);
      sk::QWeights q = make_weights(gather_raw(wv, wbuf), gather_raw(sv, sbuf), gather_raw(bv, bbuf),
                                    scale_type(sv.dtype), N, K, bits, gs);
      float* o = reinterpret_cast<float*>(out_ptr);
      if (out_dtype != mx::float32) {
        obuf.resize((size_t)M * N);
        o = obuf.data();
      }
      sk::qmatmul(xf, M, q, o, path);
      if (out_dtype != mx::float32) store_from_float(o, (int64_t)M * N, out_dtype, out_ptr);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[semantic_kernels.quantized_matmul] has no GPU implementation; run it on the CPU.");
  }

  const char* name() const override { return "SemanticQuantizedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const QuantizedMatmul*>(&other);
    return o && o->group_size_ == group_size_ && o->bits_ == bits_ && o->path_ == path_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto s = inputs[0].shape();
    s.back() = inputs[1].shape(0);
    return {s};
  }

 private:
  int group_size_, bits_, path_;
};

class Dequantize : public mx::UnaryPrimitive {
 public:
  Dequantize(mx::Stream s, int group_size, int bits, int path)
      : mx::UnaryPrimitive(s), group_size_(group_size), bits_(bits), path_(path) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const int N = inputs[0].shape(0);
    const int K = inputs[0].shape(1) * 32 / bits_;
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([wv = View::of(inputs[0]), sv = View::of(inputs[1]), bv = View::of(inputs[2]),
                  out_ptr = out.data<float>(), N, K, gs = group_size_, bits = bits_, path = path_]() {
      thread_local std::vector<uint8_t> wbuf, sbuf, bbuf;
      sk::QWeights q = make_weights(gather_raw(wv, wbuf), gather_raw(sv, sbuf), gather_raw(bv, bbuf),
                                    scale_type(sv.dtype), N, K, bits, gs);
      sk::dequantize(q, out_ptr, path);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[semantic_kernels.dequantize] has no GPU implementation; run it on the CPU.");
  }

  const char* name() const override { return "SemanticDequantize"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Dequantize*>(&other);
    return o && o->group_size_ == group_size_ && o->bits_ == bits_ && o->path_ == path_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[0].shape(1) * 32 / bits_}};
  }

 private:
  int group_size_, bits_, path_;
};

// ------------------------------------------------------------------------------------------ ops

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, bool transpose, int group_size, int bits,
                           const std::optional<std::string>& path, mx::StreamOrDevice s) {
  if (!transpose)
    throw std::invalid_argument("[semantic_kernels.quantized_matmul] only transpose=True (x @ w.T) is supported.");
  auto [N, K] = check_quantized("semantic_kernels.quantized_matmul", w, scales, biases, group_size, bits);
  if (x.ndim() < 1 || x.shape(-1) != K) {
    std::ostringstream msg;
    msg << "[semantic_kernels.quantized_matmul] x of shape " << x.shape() << " does not match K = " << K << ".";
    throw std::invalid_argument(msg.str());
  }
  if (!is_float(x.dtype()))
    throw std::invalid_argument("[semantic_kernels.quantized_matmul] x must be float32, float16 or bfloat16.");
  const int id = resolve_path(path);
  auto stream = mx::to_stream(s, mx::Device::cpu);
  // Same result dtype rule as mx.quantized_matmul (affine): promote(x, scales).
  auto out_dtype = mx::promote_types(x.dtype(), scales.dtype());
  auto b = biases.dtype() == scales.dtype() ? biases : mx::astype(biases, scales.dtype(), stream);
  auto shape = x.shape();
  shape.back() = N;
  return mx::array(std::move(shape), out_dtype, std::make_shared<QuantizedMatmul>(stream, group_size, bits, id),
                   {x, w, scales, b});
}

mx::array dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
                     int bits, std::optional<mx::Dtype> dtype, const std::optional<std::string>& path,
                     mx::StreamOrDevice s) {
  auto [N, K] = check_quantized("semantic_kernels.dequantize", w, scales, biases, group_size, bits);
  // Dequantization has no int8 variant: an int8 path name means the float kernels of that ISA.
  const int id = sk::dequant_path(resolve_path(path));
  auto stream = mx::to_stream(s, mx::Device::cpu);
  auto b = biases.dtype() == scales.dtype() ? biases : mx::astype(biases, scales.dtype(), stream);
  auto out = mx::array({N, K}, mx::float32, std::make_shared<Dequantize>(stream, group_size, bits, id),
                       {w, scales, b});
  // Like mx.dequantize, the default result dtype is that of the scales.
  auto want = dtype.value_or(scales.dtype());
  return want == mx::float32 ? out : mx::astype(out, want, stream);
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "Fast quantized matmul / dequantize for MLX's CPU backend (affine layout, 4 and 8 bits).";

  m.def("quantized_matmul", &quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "transpose"_a = true,
        "group_size"_a = 64, "bits"_a = 4, nb::kw_only(), "path"_a = nb::none(), "stream"_a = nb::none(),
        "x @ dequantize(w).T with the semantics of mx.quantized_matmul(..., transpose=True) (affine mode).");
  m.def("dequantize", &dequantize, "w"_a, "scales"_a, "biases"_a, "group_size"_a = 64, "bits"_a = 4,
        "dtype"_a = nb::none(), nb::kw_only(), "path"_a = nb::none(), "stream"_a = nb::none(),
        "Like mx.dequantize (affine mode); dtype defaults to the scales' dtype.");

  m.def("paths", [] {
    std::vector<std::tuple<std::string, bool, bool>> v;
    for (auto& p : sk::all_paths()) v.emplace_back(p.name, p.int8, p.supported);
    return v;
  }, "All compiled paths as (name, int8, supported_on_this_cpu).");
  m.def("set_path", &sk::set_default_path, "name"_a,
        "Default path for ops created afterwards: a name from paths(), 'auto' / 'auto_float' (fastest exact float "
        "path, the initial default) or 'auto_int8' (fastest int8-activation path). The path is fixed when an op "
        "is created, not when it is evaluated.");
  m.def("get_path", &sk::default_path);
  m.def("resolve_path", [](const std::string& n) {
    int id = sk::path_id(n);
    if (id < 0) throw std::invalid_argument("path '" + n + "' is not available on this CPU");
    return sk::path_name(id);
  });
  m.def("set_num_threads", &sk::set_num_threads, "n"_a, "Threads per call, the caller included (<= 0: all CPUs).");
  m.def("get_num_threads", &sk::num_threads);
  m.def("set_spin_us", &sk::set_spin_us, "us"_a);
  m.def("get_spin_us", &sk::spin_us);
  m.def("set_min_parallel_bytes", &sk::set_min_parallel_bytes, "nbytes"_a);
  m.def("get_min_parallel_bytes", &sk::min_parallel_bytes);
  m.def("cpu_features", &sk::cpu_features);
  register_layer_ops(m);
}
