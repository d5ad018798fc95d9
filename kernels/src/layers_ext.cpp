// MLX operations for layers.h: RMS norm, RoPE and attention as one primitive each (eval_cpu), in
// MLX's lazy graph and its CPU stream like the matmul ops of ext.cpp.
#include "layers_ext.h"

#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

#include "dispatch.h"
#include "layers.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx_view.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;
using skx::View;

namespace {

[[noreturn]] void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("[semantic_kernels.") + op + "] " + what);
}

// What every primitive here does first in eval_cpu: the output's buffer, and the stream's encoder
// told about the arrays (MLX's CPU ops do the same before dispatching their task).
mx::cpu::CommandEncoder& begin(const mx::Stream& stream, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream);
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  return enc;
}

mx::Dtype result_float(mx::Dtype a, mx::Dtype b) { return mx::promote_types(a, b); }

// ------------------------------------------------------------------------------------ RMS norm

class RMSNorm : public mx::UnaryPrimitive {
 public:
  RMSNorm(mx::Stream s, float eps) : mx::UnaryPrimitive(s), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = begin(stream(), inputs, out);
    enc.dispatch([xv = View::of(inputs[0]), wv = View::of(inputs[1]), out_ptr = out.data<uint8_t>(),
                  out_dtype = out.dtype(), eps = eps_]() {
      thread_local std::vector<float> xbuf, wbuf, obuf;
      const int64_t rows = xv.rows();
      const int D = xv.shape.back();
      const float* x = skx::gather_float(xv, xbuf);
      const float* w = skx::gather_float(wv, wbuf);
      float* o = reinterpret_cast<float*>(out_ptr);
      if (out_dtype != mx::float32) {
        obuf.resize((size_t)(rows * D));
        o = obuf.data();
      }
      sk::rms_norm(x, rows, D, w, eps, o);
      if (out_dtype != mx::float32) skx::store_from_float(o, rows * D, out_dtype, out_ptr);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[semantic_kernels.rms_norm] has no GPU implementation; run it on the CPU.");
  }
  const char* name() const override { return "SemanticRMSNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const RMSNorm*>(&other);
    return o && o->eps_ == eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float eps_;
};

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  if (x.ndim() < 1) fail("rms_norm", "x must have at least one dimension.");
  if (weight.ndim() != 1 || weight.shape(0) != x.shape(-1)) fail("rms_norm", "weight must be 1-D of x's last size.");
  if (!skx::is_float(x.dtype()) || !skx::is_float(weight.dtype()))
    fail("rms_norm", "x and weight must be float32, float16 or bfloat16.");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  return mx::array(x.shape(), result_float(x.dtype(), weight.dtype()), std::make_shared<RMSNorm>(stream, eps),
                   {x, weight});
}

// -------------------------------------------------------------------------------------- SwiGLU

class SwiGLU : public mx::UnaryPrimitive {
 public:
  explicit SwiGLU(mx::Stream s) : mx::UnaryPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = begin(stream(), inputs, out);
    enc.dispatch([gv = View::of(inputs[0]), uv = View::of(inputs[1]), out_ptr = out.data<uint8_t>(),
                  out_dtype = out.dtype(), n = (int64_t)out.size()]() {
      thread_local std::vector<float> gbuf, ubuf, obuf;
      const float* g = skx::gather_float(gv, gbuf);
      const float* u = skx::gather_float(uv, ubuf);
      float* o = reinterpret_cast<float*>(out_ptr);
      if (out_dtype != mx::float32) {
        obuf.resize((size_t)n);
        o = obuf.data();
      }
      sk::swiglu(g, u, n, o);
      if (out_dtype != mx::float32) skx::store_from_float(o, n, out_dtype, out_ptr);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[semantic_kernels.swiglu] has no GPU implementation; run it on the CPU.");
  }
  const char* name() const override { return "SemanticSwiGLU"; }
  bool is_equivalent(const mx::Primitive& other) const override { return dynamic_cast<const SwiGLU*>(&other); }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  if (gate.shape() != up.shape()) fail("swiglu", "gate and up must have the same shape.");
  if (!skx::is_float(gate.dtype()) || !skx::is_float(up.dtype()))
    fail("swiglu", "gate and up must be float32, float16 or bfloat16.");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  return mx::array(gate.shape(), result_float(gate.dtype(), up.dtype()), std::make_shared<SwiGLU>(stream),
                   {gate, up});
}

// ---------------------------------------------------------------------------------------- RoPE

class RoPE : public mx::UnaryPrimitive {
 public:
  // offset_input: the offset is inputs[1] (int32, 1 or B values), else `offset` is used.
  RoPE(mx::Stream s, int dims, bool traditional, float base, float scale, bool offset_input, int offset,
       bool freqs_input)
      : mx::UnaryPrimitive(s),
        dims_(dims),
        traditional_(traditional),
        base_(base),
        scale_(scale),
        offset_input_(offset_input),
        offset_(offset),
        freqs_input_(freqs_input) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = begin(stream(), inputs, out);
    const auto& x = inputs[0];
    const int B = x.shape(0), T = x.shape(-2), D = x.shape(-1);
    int N = 1;
    for (int i = 1; i + 2 < (int)x.ndim(); ++i) N *= x.shape(i);
    // The offsets and frequencies are inputs like x: computed by earlier tasks of the stream, so they
    // are read inside the task, not here.
    std::optional<View> offv, freqv;
    if (offset_input_) offv = View::of(inputs[1]);
    if (freqs_input_) freqv = View::of(inputs.back());
    enc.dispatch([xv = View::of(x), offv = std::move(offv), freqv = std::move(freqv), out_ptr = out.data<uint8_t>(),
                  out_dtype = out.dtype(), B, N, T, D, dims = dims_, traditional = traditional_, base = base_,
                  scale = scale_, offset = offset_]() {
      thread_local std::vector<float> xbuf, obuf, inv;
      thread_local std::vector<int32_t> offsets;
      const int half = dims / 2;
      inv.resize(half);
      if (freqv) {
        const float* f = reinterpret_cast<const float*>(freqv->data);
        for (int i = 0; i < half; ++i) inv[i] = 1.0f / f[i * freqv->strides[0]];
      } else {
        // As MLX computes them: exp(-i * log(base) / (dims / 2)).
        const float c = (float)(std::log((double)base) / half);
        for (int i = 0; i < half; ++i) inv[i] = std::exp(-(float)i * c);
      }
      if (offv) {
        const int32_t* p = reinterpret_cast<const int32_t*>(offv->data);
        const int64_t n = offv->shape.empty() ? 1 : offv->shape[0];
        const int64_t st = offv->shape.empty() ? 0 : offv->strides[0];
        offsets.resize(n);
        for (int64_t i = 0; i < n; ++i) offsets[i] = p[i * st];
      } else {
        offsets.assign(1, offset);
      }
      const float* xp = skx::gather_float(xv, xbuf);
      float* o = reinterpret_cast<float*>(out_ptr);
      const int64_t n = (int64_t)B * N * T * D;
      if (out_dtype != mx::float32) {
        obuf.resize((size_t)n);
        o = obuf.data();
      }
      sk::rope(xp, B, N, T, D, dims, traditional, offsets.data(), offsets.size() > 1, scale, inv.data(), o);
      if (out_dtype != mx::float32) skx::store_from_float(o, n, out_dtype, out_ptr);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[semantic_kernels.rope] has no GPU implementation; run it on the CPU.");
  }
  const char* name() const override { return "SemanticRoPE"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const RoPE*>(&other);
    return o && o->dims_ == dims_ && o->traditional_ == traditional_ && o->base_ == base_ && o->scale_ == scale_ &&
           o->offset_input_ == offset_input_ && o->offset_ == offset_ && o->freqs_input_ == freqs_input_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  int dims_;
  bool traditional_;
  float base_, scale_;
  bool offset_input_;
  int offset_;
  bool freqs_input_;
};

mx::array rope(const mx::array& x, int dims, bool traditional, std::optional<float> base, float scale,
               const std::variant<int, mx::array>& offset, const std::optional<mx::array>& freqs,
               mx::StreamOrDevice s) {
  if (x.ndim() < 3) fail("rope", "x must have at least 3 dimensions.");
  if (!skx::is_float(x.dtype())) fail("rope", "x must be float32, float16 or bfloat16.");
  if (dims <= 0 || dims % 2 != 0 || dims > x.shape(-1)) fail("rope", "dims must be even, positive and <= x's last size.");
  if (freqs.has_value() == base.has_value()) fail("rope", "exactly one of base and freqs must be given.");
  if (freqs && (freqs->ndim() != 1 || freqs->shape(0) != dims / 2)) fail("rope", "freqs must be 1-D of dims / 2.");
  auto stream = mx::to_stream(s, mx::Device::cpu);
  std::vector<mx::array> inputs = {x};
  bool offset_input = false;
  int offset_value = 0;
  if (std::holds_alternative<int>(offset)) {
    offset_value = std::get<int>(offset);
  } else {
    auto off = std::get<mx::array>(offset);
    if (off.ndim() > 1 || (off.size() != 1 && (int)off.size() != x.shape(0)))
      fail("rope", "offset must be a scalar or hold one value per batch row.");
    if (!mx::issubdtype(off.dtype(), mx::integer)) fail("rope", "offset must be an integer.");
    if (off.dtype() != mx::int32) off = mx::astype(off, mx::int32, stream);
    inputs.push_back(off);
    offset_input = true;
  }
  if (freqs) inputs.push_back(mx::astype(*freqs, mx::float32, stream));
  return mx::array(x.shape(), x.dtype(),
                   std::make_shared<RoPE>(stream, dims, traditional, base.value_or(1.0f), scale, offset_input,
                                          offset_value, freqs.has_value()),
                   std::move(inputs));
}

// ----------------------------------------------------------------------------------- attention

// Reads the K (or V) operand of a task from its views: float32 [B, H, S, D], or codes + scales +
// biases. Strides of codes become bytes.
sk::KVOperand kv_operand(const View& data, const View* scales, const View* biases, int bits, int group_size) {
  sk::KVOperand o;
  o.data = data.data;
  const int64_t unit = bits ? 4 : 1;  // codes: uint32 words, strides in bytes
  o.sb = data.strides[0] * unit;
  o.sh = data.strides[1] * unit;
  o.ss = data.strides[2] * unit;
  o.bits = bits;
  o.group_size = group_size;
  if (bits) {
    o.scales = reinterpret_cast<const float*>(scales->data);
    o.biases = reinterpret_cast<const float*>(biases->data);
    if (scales->strides != biases->strides)
      throw std::invalid_argument("[semantic_kernels.attention] scales and biases must share strides.");
    o.qb = scales->strides[0];
    o.qh = scales->strides[1];
    o.qs = scales->strides[2];
  }
  return o;
}

class Attention : public mx::UnaryPrimitive {
 public:
  // Inputs: q, then K and V (float: k, v; quantized: kw, ks, kb, vw, vs, vb), then the mask if any.
  Attention(mx::Stream s, float scale, int mask_kind, int bits, int group_size)
      : mx::UnaryPrimitive(s), scale_(scale), mask_kind_(mask_kind), bits_(bits), group_size_(group_size) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& enc = begin(stream(), inputs, out);
    const int nkv = bits_ ? 6 : 2;
    std::vector<View> views;
    for (int i = 0; i < 1 + nkv; ++i) views.push_back(View::of(inputs[i]));
    for (int i = 1; i < 1 + nkv; ++i)
      if (views[i].strides.back() != 1)
        throw std::runtime_error("[semantic_kernels.attention] K and V must have unit stride on their last axis.");
    std::optional<View> mask;
    if (mask_kind_ >= 2) mask = View::of(inputs.back());
    enc.dispatch([views = std::move(views), mask = std::move(mask), out_ptr = out.data<float>(), scale = scale_,
                  mask_kind = mask_kind_, bits = bits_, gs = group_size_]() {
      thread_local std::vector<float> qbuf;
      const View& qv = views[0];
      const int B = qv.shape[0], Hq = qv.shape[1], L = qv.shape[2], D = qv.shape[3];
      const int Hkv = views[1].shape[1], S = views[1].shape[2];
      const float* q = skx::gather_float(qv, qbuf);
      sk::KVOperand k, v;
      if (bits) {
        k = kv_operand(views[1], &views[2], &views[3], bits, gs);
        v = kv_operand(views[4], &views[5], &views[6], bits, gs);
      } else {
        k = kv_operand(views[1], nullptr, nullptr, 0, 0);
        v = kv_operand(views[2], nullptr, nullptr, 0, 0);
      }
      sk::AttnMask m;
      m.kind = mask_kind;
      if (mask) {
        m.data = mask->data;
        m.sb = mask->strides[0];
        m.sh = mask->strides[1];
        m.sl = mask->strides[2];
        m.ss = mask->strides[3];
      }
      sk::attention(q, B, Hq, Hkv, L, S, D, k, v, m, scale, out_ptr);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[semantic_kernels.attention] has no GPU implementation; run it on the CPU.");
  }
  const char* name() const override { return "SemanticAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Attention*>(&other);
    return o && o->scale_ == scale_ && o->mask_kind_ == mask_kind_ && o->bits_ == bits_ &&
           o->group_size_ == group_size_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float scale_;
  int mask_kind_, bits_, group_size_;
};

using Triple = std::tuple<mx::array, mx::array, mx::array>;

mx::array attention_impl(const mx::array& q, std::vector<mx::array> kv, int bits, int group_size, float scale,
                         const std::string& mask_mode, const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
  const char* op = "attention";
  if (q.ndim() != 4 || q.dtype() != mx::float32) fail(op, "queries must be float32 [B, heads, L, D].");
  const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2), D = q.shape(3);
  const auto& k0 = kv[0];
  const auto& v0 = kv[bits ? 3 : 1];
  for (const auto* t : {&k0, &v0}) {
    if (t->ndim() != 4 || t->shape(0) != B) fail(op, "keys and values must be [B, kv_heads, S, .] with q's B.");
  }
  const int Hkv = k0.shape(1), S = k0.shape(2);
  if (D < 1 || D > 512) fail(op, "the head size must be between 1 and 512.");
  if (Hkv < 1 || Hq % Hkv != 0) fail(op, "the query heads must be a multiple of the KV heads.");
  if (v0.shape(1) != Hkv || v0.shape(2) != S) fail(op, "keys and values must have the same heads and length.");
  if (bits) {
    if (bits != 4 && bits != 8) fail(op, "bits must be 4 or 8.");
    if (group_size != 32 && group_size != 64 && group_size != 128) fail(op, "group_size must be 32, 64 or 128.");
    if (D % group_size != 0) fail(op, "the head size must be a multiple of group_size.");
    for (int i : {0, 3}) {
      if (kv[i].dtype() != mx::uint32 || kv[i].shape(3) * 32 / bits != D) fail(op, "codes do not match the head size.");
      for (int j : {1, 2})
        if (kv[i + j].dtype() != mx::float32 || kv[i + j].ndim() != 4 || kv[i + j].shape(3) != D / group_size ||
            kv[i + j].shape(2) != S)
          fail(op, "scales and biases must be float32 [B, kv_heads, S, D / group_size].");
    }
  } else {
    if (k0.dtype() != mx::float32 || v0.dtype() != mx::float32) fail(op, "keys and values must be float32.");
    if (k0.shape(3) != D || v0.shape(3) != D) fail(op, "keys, values and queries must share the head size.");
  }
  auto stream = mx::to_stream(s, mx::Device::cpu);
  int kind = 0;
  std::vector<mx::array> inputs = {q};
  inputs.insert(inputs.end(), kv.begin(), kv.end());
  if (mask_mode == "causal") {
    kind = 1;
  } else if (!mask_mode.empty()) {
    fail(op, "mask_mode must be '' or 'causal'.");
  }
  if (mask) {
    if (kind == 1) fail(op, "a causal mask takes no array.");
    auto m = *mask;
    if (m.ndim() > 4) fail(op, "the mask must have at most 4 dimensions.");
    if (m.dtype() == mx::bool_) {
      kind = 2;
    } else {
      kind = 3;
      if (m.dtype() != mx::float32) m = mx::astype(m, mx::float32, stream);
    }
    inputs.push_back(mx::broadcast_to(m, {B, Hq, L, S}, stream));
  }
  return mx::array(q.shape(), mx::float32, std::make_shared<Attention>(stream, scale, kind, bits, group_size),
                   std::move(inputs));
}

}  // namespace

void register_layer_ops(nb::module_& m) {
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Like mx.fast.rms_norm(x, weight, eps), as one CPU primitive.");
  m.def("swiglu", &swiglu, "gate"_a, "up"_a, nb::kw_only(), "stream"_a = nb::none(),
        "silu(gate) * up, as one CPU primitive with a vectorised exponential.");
  m.def("rope", &rope, "x"_a, "dims"_a, nb::kw_only(), "traditional"_a, "base"_a, "scale"_a, "offset"_a,
        "freqs"_a = nb::none(), "stream"_a = nb::none(), "Like mx.fast.rope, as one CPU primitive.");
  m.def(
      "attention",
      [](const mx::array& q, const mx::array& k, const mx::array& v, float scale, const std::string& mask_mode,
         const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
        return attention_impl(q, {k, v}, 0, 0, scale, mask_mode, mask, s);
      },
      "q"_a, "k"_a, "v"_a, nb::kw_only(), "scale"_a, "mask_mode"_a = "", "mask"_a = nb::none(),
      "stream"_a = nb::none(), "softmax(scale * q k^T + mask) v over float32 [B, heads, S, D] keys and values.");
  m.def(
      "attention_quantized",
      [](const mx::array& q, const Triple& k, const Triple& v, float scale, int group_size, int bits,
         const std::string& mask_mode, const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
        return attention_impl(q, {std::get<0>(k), std::get<1>(k), std::get<2>(k), std::get<0>(v), std::get<1>(v),
                                  std::get<2>(v)},
                              bits, group_size, scale, mask_mode, mask, s);
      },
      "q"_a, "k"_a, "v"_a, nb::kw_only(), "scale"_a, "group_size"_a, "bits"_a, "mask_mode"_a = "",
      "mask"_a = nb::none(), "stream"_a = nb::none(),
      "Attention over affine-quantized keys and values, each (codes, scales, biases) as mlx-lm's "
      "QuantizedKVCache holds them.");
}
