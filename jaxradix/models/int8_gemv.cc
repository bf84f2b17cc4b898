// The CPU product of few activation rows with a per-channel int8 weight stored by rows, as an XLA FFI
// custom call (models/cpu_native.py builds and registers it; models/quantization.py calls it).
//
//   y[t, n] = scale[n] * sum_k x[t, k] * w[n, k]      x f32 [T, K], w int8 [N, K], scale f32 [N]
//
// Each weight row is read once from memory and converted to f32 in registers for all T activation
// rows (T small: decode), so the int8 weight streams at memory bandwidth with exact f32 activations.
// The rows are cut into chunks that XLA's intra-op thread pool and the calling thread take from one
// atomic counter: the caller never waits for a chunk nobody has started, so a busy pool cannot
// deadlock it, and a late pool task finds no chunk left and returns.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunkBytes = 64 << 10;  // int8 weight bytes per chunk (at least 16 rows)
// Below this many weight bytes one thread does it all: waking a pool thread costs about what it saves
// (SmolLM2's 120 layer weights on 2 cores: 3.0 ms with this threshold, 3.6 ms at 1 MB, 3.2-3.6 ms at
// 64 KB; chunks of 32 KB 4.4 ms).
constexpr int64_t kThreadedBytes = 256 << 10;

void RowsProduct(const float* x, const int8_t* w, const float* scale, float* y, int64_t T, int64_t K, int64_t N,
                 int64_t lo, int64_t hi) {
  for (int64_t n = lo; n < hi; ++n) {
    const int8_t* wr = w + n * K;
    for (int64_t t = 0; t < T; ++t) {
      const float* xr = x + t * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * static_cast<float>(wr[k]);
      y[t * N + n] = acc * scale[n];
    }
  }
}

struct Job {
  const float* x;
  const int8_t* w;
  const float* scale;
  float* y;
  int64_t T, K, N, rows, chunks;  // rows per chunk
  std::atomic<int64_t> next{0};  // the next chunk to take
  std::atomic<int64_t> done{0};  // chunks finished

  void Work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      int64_t lo = c * rows, hi = lo + rows < N ? lo + rows : N;
      RowsProduct(x, w, scale, y, T, K, N, lo, hi);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Int8RowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || scale.element_count() != static_cast<size_t>(wd[0])) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "int8 rows product: x [T, K], w [N, K], scale [N]");
  }
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->scale = scale.typed_data();
  job->y = y->typed_data();
  job->T = xd[0];
  job->K = xd[1];
  job->N = wd[0];
  job->rows = kChunkBytes / job->K > 16 ? kChunkBytes / job->K : 16;
  job->chunks = (job->N + job->rows - 1) / job->rows;
  int64_t helpers = job->N * job->K >= kThreadedBytes ? pool.num_threads() - 1 : 0;
  if (helpers > job->chunks - 1) helpers = job->chunks - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxradixInt8Rows, Int8RowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
