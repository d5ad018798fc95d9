// Path selection, thread pool and drivers. Compiled with the baseline flags only: everything here
// must run on any CPU of the architecture, including the feature detection itself.
#include "dispatch.h"

#include <algorithm>
#include <chrono>
#include <atomic>
#include <cstring>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#if defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace sk {

// Kernel sets not built for this architecture. (Not weak symbols: with a static library a weak
// definition here would stop the linker from pulling the real one out of the archive.)
#if !SK_HAVE_X86
const KernelSet* kernels_avx2() { return nullptr; }
const KernelSet* kernels_avx2vnni() { return nullptr; }
const KernelSet* kernels_avx512() { return nullptr; }
const KernelSet* kernels_avx512vnni() { return nullptr; }
#endif
#if !SK_HAVE_NEON
const KernelSet* kernels_neon() { return nullptr; }
const KernelSet* kernels_neon_dot() { return nullptr; }
#endif

namespace {

// ----------------------------------------------------------------------------- CPU features

struct Features {
  bool avx2 = false, avx512 = false, avx512vnni = false, avxvnni = false;
  bool neon = false, neon_dot = false;
};

Features detect() {
  Features f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // libgcc's checks also verify that the OS saves the ymm/zmm state (XGETBV), not only CPUID.
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  f.avx512vnni = f.avx512 && __builtin_cpu_supports("avx512vnni");
  f.avxvnni = f.avx2 && __builtin_cpu_supports("avxvnni");
#elif defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is mandatory on AArch64
#if defined(__linux__)
  f.neon_dot = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
  int v = 0;
  size_t len = sizeof(v);
  f.neon_dot = sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, nullptr, 0) == 0 && v != 0;
#endif
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

// ------------------------------------------------------------------------------- path table

struct PathDef {
  const char* name;
  const KernelSet* (*get)();
  bool int8;
  bool (*cpu_ok)();
};

const PathDef kPaths[] = {
    {"scalar", kernels_scalar, false, [] { return true; }},
    {"neon", kernels_neon, false, [] { return features().neon; }},
    {"neon_dot_i8", kernels_neon_dot, true, [] { return features().neon_dot; }},
    {"avx2", kernels_avx2, false, [] { return features().avx2; }},
    {"avx2_i8", kernels_avx2, true, [] { return features().avx2; }},
    {"avxvnni_i8", kernels_avx2vnni, true, [] { return features().avxvnni; }},
    {"avx512", kernels_avx512, false, [] { return features().avx512; }},
    {"avx512_i8", kernels_avx512, true, [] { return features().avx512; }},
    {"avx512vnni_i8", kernels_avx512vnni, true, [] { return features().avx512vnni; }},
};
constexpr int kNumPaths = sizeof(kPaths) / sizeof(kPaths[0]);

bool supported(int id) {
  return id >= 0 && id < kNumPaths && kPaths[id].get() != nullptr && kPaths[id].cpu_ok() &&
         (kPaths[id].int8 ? kPaths[id].get()->rows_int8 != nullptr : kPaths[id].get()->rows_float != nullptr);
}

int find(const char* name) {
  for (int i = 0; i < kNumPaths; ++i)
    if (std::strcmp(kPaths[i].name, name) == 0) return i;
  return -1;
}

int best(bool int8) {
  // Preference orders (fastest first, measured on Zen 4; the maddubs int8 paths are still faster
  // than the float ones because they move 4x fewer x bytes and do 4 MACs per lane per op).
  static const char* const float_order[] = {"avx512", "avx2", "neon", "scalar"};
  static const char* const int8_order[] = {"avx512vnni_i8", "avxvnni_i8", "avx512_i8", "avx2_i8", "neon_dot_i8"};
  if (int8)
    for (const char* n : int8_order)
      if (supported(find(n))) return find(n);
  for (const char* n : float_order)
    if (supported(find(n))) return find(n);
  return 0;
}

std::atomic<int> g_default_path{-1};  // -1 = "auto" (resolved lazily)
// "auto" = exact float kernels: the int8 paths change greedy tokens after a few dozen tokens
// (0.5% output error), so they are opt-in ("auto_int8" or a path name).
std::atomic<bool> g_auto_int8{false};

// ------------------------------------------------------------------------------ thread pool

// A persistent pool. The calling thread always takes part, so n threads = n - 1 workers.
// Jobs are split into tasks claimed through an atomic counter (dynamic balance: this machine runs
// other work, and a static split would wait for the slowest core). One job at a time: a second
// caller (another MLX stream) that finds the pool busy runs its job inline instead of waiting.
class Pool {
 public:
  ~Pool() { resize(1); }

  void resize(int n) {
    std::lock_guard<std::mutex> lk(job_mu_);
    stop_workers();
    n = std::max(1, n);
    stop_.store(false);
    // Each worker starts from the generation current now (under the job lock), so a job posted
    // before the thread first runs is still seen as new.
    const uint64_t start = gen_.load();
    for (int i = 0; i < n - 1; ++i) workers_.emplace_back([this, start] { worker(start); });
    threads_ = n;
  }

  int threads() const { return threads_; }

  void set_spin(int us) { spin_us_.store(std::max(0, us)); }
  int spin() const { return spin_us_.load(); }

  template <class F>
  void run(int ntasks, F& f) {
    std::unique_lock<std::mutex> lk(job_mu_, std::try_to_lock);
    if (!lk.owns_lock() || workers_.empty() || ntasks <= 1) {
      for (int t = 0; t < ntasks; ++t) f(t);
      return;
    }
    // Workers still finishing (or not yet woken for) the previous job must be out of it before
    // its description is overwritten.
    while (busy_.load(std::memory_order_acquire) != 0) cpu_relax();
    fn_ = [](void* ctx, int t) { (*static_cast<F*>(ctx))(t); };
    ctx_ = &f;
    ntasks_ = ntasks;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    busy_.store((int)workers_.size(), std::memory_order_relaxed);
    gen_.fetch_add(1, std::memory_order_release);
    gen_.notify_all();
    work();
    // Only the tasks must be finished; a worker that has not woken up yet finds none left.
    while (done_.load(std::memory_order_acquire) < ntasks) cpu_relax();
  }

 private:
  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  void work() {
    for (;;) {
      int t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks_) break;
      fn_(ctx_, t);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void worker(uint64_t seen) {
    for (;;) {
      uint64_t g = gen_.load(std::memory_order_acquire);
      if (g == seen) {
        // Spin for a bounded time, then sleep on the futex.
        auto t0 = std::chrono::steady_clock::now();
        const auto limit = std::chrono::microseconds(spin_us_.load(std::memory_order_relaxed));
        int i = 0;
        while ((g = gen_.load(std::memory_order_acquire)) == seen) {
          cpu_relax();
          if ((++i & 63) == 0 && std::chrono::steady_clock::now() - t0 > limit) break;
        }
        while ((g = gen_.load(std::memory_order_acquire)) == seen) gen_.wait(seen, std::memory_order_acquire);
      }
      seen = g;
      if (stop_.load(std::memory_order_acquire)) return;
      work();
      busy_.fetch_sub(1, std::memory_order_release);
    }
  }

  void stop_workers() {
    if (workers_.empty()) return;
    while (busy_.load(std::memory_order_acquire) != 0) cpu_relax();
    stop_.store(true, std::memory_order_release);
    gen_.fetch_add(1, std::memory_order_release);
    gen_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    busy_.store(0);
  }

  std::mutex job_mu_;
  std::vector<std::thread> workers_;
  int threads_ = 1;
  std::atomic<uint64_t> gen_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> next_{0}, done_{0}, busy_{0};
  std::atomic<int> spin_us_{50};
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  int ntasks_ = 0;
};

int default_threads() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

Pool& pool() {
  static Pool* p = [] {
    // Leaked on purpose: joining threads from a static destructor at interpreter exit can
    // deadlock (other static state is already gone); the OS reclaims the threads.
    Pool* q = new Pool();
    q->resize(default_threads());
    return q;
  }();
  return *p;
}

// Measured on 2 cores: a second thread pays off in isolation above ~30 us of single-thread work
// (~256 KB of weights), but inside a model the worker competes with MLX's stream thread and
// Python for the same cores, and a descheduled worker holding a task stalls the call for a whole
// timeslice. 2 MB keeps small layers single-threaded and splits big ones (lm_head, large MLPs).
std::atomic<int64_t> g_min_parallel{2 * 1024 * 1024};

// Split [0, N) into tasks of whole multiples of 8 rows, about 4 per thread.
template <class F>
void parallel_rows(int N, int64_t work_bytes, F&& body) {
  Pool& p = pool();
  int nt = p.threads();
  if (nt <= 1 || work_bytes < g_min_parallel.load(std::memory_order_relaxed) || N < 16) {
    body(0, N);
    return;
  }
  int tasks = std::min(nt * 4, N / 8);
  int chunk = (N + tasks - 1) / tasks;
  chunk = (chunk + 7) / 8 * 8;
  tasks = (N + chunk - 1) / chunk;
  auto task = [&](int t) { body(t * chunk, std::min(N, (t + 1) * chunk)); };
  p.run(tasks, task);
}

void check(const QWeights& q) {
  if (q.bits != 4 && q.bits != 8) throw std::invalid_argument("semantic_kernels: bits must be 4 or 8");
  // Group 16 exists for 8 bits only (GGUF Q6_K weights written exactly by the import, see
  // CPU_KERNELS_FILE in semantic_core/model/gguf_import.py);
  // the float paths read 8-bit weights in units of at most 16, one scale each.
  if (q.gs != 32 && q.gs != 64 && q.gs != 128 && !(q.gs == 16 && q.bits == 8))
    throw std::invalid_argument("semantic_kernels: group_size must be 32, 64 or 128 (or 16 with 8 bits)");
  if (q.K % q.gs != 0) throw std::invalid_argument("semantic_kernels: K must be a multiple of group_size");
  if (q.groups > 4096) throw std::invalid_argument("semantic_kernels: K / group_size must be <= 4096");
}

}  // namespace

// ----------------------------------------------------------------------------------- public

std::vector<PathInfo> all_paths() {
  std::vector<PathInfo> v;
  for (int i = 0; i < kNumPaths; ++i)
    if (kPaths[i].get() != nullptr) v.push_back({kPaths[i].name, kPaths[i].int8, supported(i)});
  return v;
}

int path_id(const std::string& name) {
  if (name == "auto") return default_path_id();
  if (name == "auto_float") return best(false);
  if (name == "auto_int8") return best(true);
  int id = find(name.c_str());
  return supported(id) ? id : -1;
}

int dequant_path(int id) {
  if (!supported(id)) return best(false);
  if (!kPaths[id].int8) return id;
  for (int i = 0; i < kNumPaths; ++i)  // the float path of the same kernel set, if it is listed
    if (kPaths[i].get == kPaths[id].get && !kPaths[i].int8 && supported(i)) return i;
  return best(false);  // e.g. avx512vnni: its float kernels are those of "avx512"
}

std::string path_name(int id) { return id >= 0 && id < kNumPaths ? kPaths[id].name : "?"; }
bool path_is_int8(int id) { return id >= 0 && id < kNumPaths && kPaths[id].int8; }

void set_default_path(const std::string& name) {
  if (name == "auto" || name == "auto_int8" || name == "auto_float") {
    g_auto_int8.store(name == "auto_int8");
    g_default_path.store(-1);
    return;
  }
  int id = path_id(name);
  if (id < 0) throw std::invalid_argument("semantic_kernels: path '" + name + "' is not available on this CPU");
  g_default_path.store(id);
}

std::string default_path() { return path_name(default_path_id()); }

int default_path_id() {
  int id = g_default_path.load();
  return id >= 0 ? id : best(g_auto_int8.load());
}

void set_num_threads(int n) { pool().resize(n <= 0 ? default_threads() : n); }
int num_threads() { return pool().threads(); }
void set_spin_us(int us) { pool().set_spin(us); }
int spin_us() { return pool().spin(); }
void set_min_parallel_bytes(int64_t b) { g_min_parallel.store(std::max<int64_t>(0, b)); }
int64_t min_parallel_bytes() { return g_min_parallel.load(); }

std::string cpu_features() {
  const Features& f = features();
  std::ostringstream s;
  s << "avx2=" << f.avx2 << " avx512=" << f.avx512 << " avx512vnni=" << f.avx512vnni << " avxvnni=" << f.avxvnni
    << " neon=" << f.neon << " neon_dot=" << f.neon_dot;
  return s.str();
}

void parallel_for(int ntasks, int64_t work_bytes, const std::function<void(int)>& f) {
  Pool& p = pool();
  if (ntasks <= 1 || p.threads() <= 1 || work_bytes < g_min_parallel.load(std::memory_order_relaxed)) {
    for (int t = 0; t < ntasks; ++t) f(t);
    return;
  }
  auto task = [&f](int t) { f(t); };
  p.run(ntasks, task);
}

void qmatmul(const float* x, int M, const QWeights& q, float* out, int path) {
  check(q);
  if (!supported(path)) throw std::invalid_argument("semantic_kernels: unsupported path");
  // The int8 paths quantize x per 32 elements and need weight groups of at least 32.
  if (q.gs < 32) path = dequant_path(path);
  const PathDef& p = kPaths[path];
  const KernelSet* ks = p.get();
  const int int8 = p.int8 ? 1 : 0;
  if (M <= 0 || q.N <= 0) return;
  // Per calling thread (an MLX stream thread), reused across calls: no allocation per call.
  thread_local std::vector<uint8_t> scratch;
  size_t need = ks->scratch_bytes(M, q.K, q.bits, q.gs, int8);
  if (scratch.size() < need) scratch.resize(need);
  PreparedX px;
  ks->prepare(x, M, q.K, q.bits, q.gs, int8, scratch.data(), px);
  auto rows = int8 ? ks->rows_int8 : ks->rows_float;
  const int64_t work = (int64_t)q.N * q.row_bytes * std::max(1, M / 2);
  parallel_rows(q.N, work, [&](int n0, int n1) { rows(q, px, out, q.N, n0, n1); });
}

void dequantize(const QWeights& q, float* out, int path) {
  check(q);
  if (!supported(path)) throw std::invalid_argument("semantic_kernels: unsupported path");
  const KernelSet* ks = kPaths[path].get();
  parallel_rows(q.N, (int64_t)q.N * q.K * 4, [&](int n0, int n1) { ks->dequant(q, out, n0, n1); });
}

}  // namespace sk
