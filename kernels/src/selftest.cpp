// Standalone check of every compiled path against a double-precision reference written directly
// from the packing rules (independent of the kernels). No MLX: it also runs on a cross-compiled
// arm64 build under qemu. Exit status 0 = all good.
//
//   sk_selftest [--quick]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dispatch.h"

namespace {

uint16_t float_to_half(float f) {  // round to nearest even, normal range is enough here
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  int exp = (int)((x >> 23) & 0xff) - 127 + 15;
  uint32_t man = x & 0x7fffff;
  if (exp <= 0) return (uint16_t)sign;
  uint32_t h = sign | (uint32_t)exp << 10 | man >> 13;
  uint32_t rest = man & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return (uint16_t)h;
}

float half_to_float_ref(uint16_t h) {
  int exp = (h >> 10) & 0x1f;
  float m = (float)(h & 0x3ff);
  float v = exp == 0 ? std::ldexp(m, -24) : std::ldexp(m + 1024.0f, exp - 25);
  return (h & 0x8000) ? -v : v;
}

struct Case {
  int M, N, K, bits, gs, st;
};

int run_case(const Case& c, std::mt19937& rng, bool verbose) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> qd(0, (1 << c.bits) - 1);
  const int groups = c.K / c.gs;
  std::vector<uint8_t> w((size_t)c.N * c.K * c.bits / 8);
  std::vector<int> qv((size_t)c.N * c.K);
  for (int n = 0; n < c.N; ++n)
    for (int k = 0; k < c.K; ++k) {
      int q = qd(rng);
      qv[(size_t)n * c.K + k] = q;
      size_t bit = ((size_t)n * c.K + k) * c.bits;  // element j of a uint32 at bits [bits*j, ...)
      w[bit / 8] |= (uint8_t)(q << (bit % 8));
    }
  std::vector<float> sf((size_t)c.N * groups), bf(sf.size());
  std::vector<uint16_t> sh(sf.size()), bh(sf.size());
  for (size_t i = 0; i < sf.size(); ++i) {
    float s = 0.02f + 0.01f * std::fabs(nd(rng)), b = -s * (1 << (c.bits - 1)) + 0.01f * nd(rng);
    if (c.st == sk::SCALE_F16) {
      sh[i] = float_to_half(s);
      bh[i] = float_to_half(b);
      s = half_to_float_ref(sh[i]);
      b = half_to_float_ref(bh[i]);
    } else if (c.st == sk::SCALE_BF16) {
      uint32_t u;
      std::memcpy(&u, &s, 4);
      sh[i] = (uint16_t)(u >> 16);
      u &= 0xffff0000u;
      std::memcpy(&s, &u, 4);
      std::memcpy(&u, &b, 4);
      bh[i] = (uint16_t)(u >> 16);
      u &= 0xffff0000u;
      std::memcpy(&b, &u, 4);
    }
    sf[i] = s;
    bf[i] = b;
  }
  std::vector<float> x((size_t)c.M * c.K);
  for (auto& v : x) v = nd(rng);
  std::vector<double> ref((size_t)c.M * c.N);
  double mag2 = 0;
  for (int m = 0; m < c.M; ++m)
    for (int n = 0; n < c.N; ++n) {
      double acc = 0;
      for (int k = 0; k < c.K; ++k) {
        size_t g = (size_t)n * groups + k / c.gs;
        double t = (double)x[(size_t)m * c.K + k] * ((double)sf[g] * qv[(size_t)n * c.K + k] + (double)bf[g]);
        acc += t;
        mag2 += t * t;
      }
      ref[(size_t)m * c.N + n] = acc;
    }
  // Error scale: the RMS size of an output of random-signed terms, sqrt(mean sum_k (x_k w_k)^2).
  // (The RMS of the outputs themselves is noisy when there are only a few of them.)
  double ref_rms = std::sqrt(mag2 / ref.size());

  sk::QWeights q;
  q.w = w.data();
  q.scales = c.st == sk::SCALE_F32 ? (const void*)sf.data() : (const void*)sh.data();
  q.biases = c.st == sk::SCALE_F32 ? (const void*)bf.data() : (const void*)bh.data();
  q.st = c.st;
  q.N = c.N;
  q.K = c.K;
  q.bits = c.bits;
  q.gs = c.gs;
  q.row_bytes = (int64_t)c.K * c.bits / 8;
  q.groups = groups;

  int failures = 0;
  for (auto& p : sk::all_paths()) {
    if (!p.supported) continue;
    std::vector<float> out((size_t)c.M * c.N, NAN);
    sk::qmatmul(x.data(), c.M, q, out.data(), sk::path_id(p.name));
    double err2 = 0, maxerr = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      double e = std::fabs(out[i] - ref[i]);
      if (!(e == e)) e = 1e30;  // NaN
      err2 += e * e;
      maxerr = e > maxerr ? e : maxerr;
    }
    double rel_rms = std::sqrt(err2 / out.size()) / ref_rms;
    // float: summation-order differences only; int8: per-32 activation quantization (~0.3%).
    double tol = p.int8 ? 2e-2 : 1e-5;
    bool ok = rel_rms < tol && maxerr / ref_rms < (p.int8 ? 0.1 : 1e-4);
    if (!ok || verbose)
      std::printf("%-5s %-14s M=%-3d N=%-4d K=%-5d bits=%d gs=%-3d st=%d rel_rms=%.2e max/rms=%.2e\n",
                  ok ? "ok" : "FAIL", p.name.c_str(), c.M, c.N, c.K, c.bits, c.gs, c.st, rel_rms, maxerr / ref_rms);
    failures += !ok;
  }
  // Dequantize against the reference values.
  for (auto& p : sk::all_paths()) {
    if (!p.supported || p.int8) continue;
    std::vector<float> d((size_t)c.N * c.K);
    sk::dequantize(q, d.data(), sk::path_id(p.name));
    double maxerr = 0;
    for (int n = 0; n < c.N; ++n)
      for (int k = 0; k < c.K; ++k) {
        size_t g = (size_t)n * groups + k / c.gs;
        double r = (double)sf[g] * qv[(size_t)n * c.K + k] + (double)bf[g];
        maxerr = std::fmax(maxerr, std::fabs(d[(size_t)n * c.K + k] - r));
      }
    if (maxerr > 1e-5) {
      std::printf("FAIL dequantize %s bits=%d gs=%d st=%d maxerr=%.2e\n", p.name.c_str(), c.bits, c.gs, c.st, maxerr);
      ++failures;
    }
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  bool verbose = argc > 1 && std::string(argv[1]) == "-v";
  std::printf("cpu: %s\npaths:", sk::cpu_features().c_str());
  for (auto& p : sk::all_paths()) std::printf(" %s%s", p.name.c_str(), p.supported ? "" : "(unsupported)");
  std::printf("\n");
  std::mt19937 rng(1234);
  int failures = 0, cases = 0;
  const int Ms[] = {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33};
  const int Ks[] = {32, 96, 128, 160, 192, 576, 640};
  for (int bits : {4, 8})
    for (int gs : {32, 64, 128})
      for (int st : {0, 1, 2})
        for (int K : Ks) {
          if (K % gs) continue;
          for (int M : Ms) {
            if (quick && M != 1 && M != 5 && M != 17) continue;
            int N = 1 + (int)(rng() % 70);
            failures += run_case({M, N, K, bits, gs, st}, rng, verbose);
            ++cases;
          }
        }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}
