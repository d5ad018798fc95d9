// Generic (baseline-ISA) entry points: path selection by CPU features, the thread pool and the
// drivers that split work over output rows. No MLX types here, so the kernels can be tested and
// benchmarked without MLX (see tests/ and src/standalone_test.cpp).
#pragma once

#include <stdint.h>

#include <functional>
#include <string>
#include <vector>

#include "qkernels.h"

namespace sk {

// A named way of computing the product: a kernel set plus float or int8 arithmetic.
struct PathInfo {
  std::string name;   // e.g. "avx512vnni_i8"
  bool int8;          // activations quantized to int8 per 32 elements
  bool supported;     // this CPU can run it (and it was compiled in)
};

std::vector<PathInfo> all_paths();
// -1 when unknown or unsupported. Special names: "auto" (the current default path),
// "auto_float" (fastest exact path), "auto_int8" (fastest int8-activation path, else auto_float).
int path_id(const std::string& name);
std::string path_name(int id);
// The float path to use for dequantize when an op names an int8 path.
int dequant_path(int id);
bool path_is_int8(int id);

// Process-wide default used when an op is created without an explicit path.
void set_default_path(const std::string& name);  // throws std::invalid_argument if unsupported
std::string default_path();
int default_path_id();

// Threads used for a call (the calling thread included). Default: the CPUs this process may run on.
void set_num_threads(int n);
int num_threads();
// How long idle workers spin before sleeping (microseconds). Spinning hides the wake-up latency of
// a futex (~5-50 us) between back-to-back decode matmuls, but burns a core that MLX's own threads
// might want, so it is bounded.
void set_spin_us(int us);
int spin_us();
// Below this many bytes of weights (scaled by M) a call runs on one thread: waking workers costs more.
void set_min_parallel_bytes(int64_t b);
int64_t min_parallel_bytes();

std::string cpu_features();

// Runs f(0) .. f(ntasks - 1) on the pool (the caller included), or inline when the work is too
// small to pay for waking workers (work_bytes below min_parallel_bytes) or the pool is busy.
void parallel_for(int ntasks, int64_t work_bytes, const std::function<void(int)>& f);

// out[M, N] = x[M, K] @ dequant(q)^T. x contiguous float32. Thread-safe.
void qmatmul(const float* x, int M, const QWeights& q, float* out, int path);
// out[N, K] float32.
void dequantize(const QWeights& q, float* out, int path);

}  // namespace sk
