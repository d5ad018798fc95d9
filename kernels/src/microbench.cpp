// Kernel-only timing (no MLX graph overhead): min and median microseconds per call of
// sk::qmatmul for each path, on random weights. Used to tune the kernels; the user-facing
// benchmark is bench/bench_qmm.py (through MLX).
//
//   sk_microbench K N M bits gs [threads] [reps]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "dispatch.h"

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s K N M bits gs [threads] [reps]\n", argv[0]);
    return 2;
  }
  int K = std::atoi(argv[1]), N = std::atoi(argv[2]), M = std::atoi(argv[3]);
  int bits = std::atoi(argv[4]), gs = std::atoi(argv[5]);
  int threads = argc > 6 ? std::atoi(argv[6]) : 1;
  int reps = argc > 7 ? std::atoi(argv[7]) : 200;
  sk::set_num_threads(threads);
  if (threads > 1) sk::set_min_parallel_bytes(0);  // measure the pool itself, whatever the size
  std::mt19937 rng(1);
  std::vector<uint8_t> w((size_t)N * K * bits / 8);
  for (auto& b : w) b = (uint8_t)rng();
  std::vector<uint16_t> s((size_t)N * (K / gs), 0x2000), b(s.size(), 0xa000);  // f16 scales/biases
  std::vector<float> x((size_t)M * K);
  for (auto& v : x) v = std::normal_distribution<float>()(rng);
  std::vector<float> out((size_t)M * N);
  sk::QWeights q{w.data(), s.data(), b.data(), sk::SCALE_F16, N, K, bits, gs, (int64_t)K * bits / 8, K / gs};
  double bytes = (double)w.size() + 4.0 * s.size();
  for (auto& p : sk::all_paths()) {
    if (!p.supported) continue;
    int id = sk::path_id(p.name);
    for (int i = 0; i < 5; ++i) sk::qmatmul(x.data(), M, q, out.data(), id);
    std::vector<double> t;
    for (int r = 0; r < reps; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      sk::qmatmul(x.data(), M, q, out.data(), id);
      t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    std::printf("%-14s K=%d N=%d M=%d bits=%d gs=%d thr=%d  min %8.1f us (%5.1f GB/s)  median %8.1f us\n",
                p.name.c_str(), K, N, M, bits, gs, threads, t[0], bytes / t[0] / 1e3, t[t.size() / 2]);
  }
  return 0;
}
