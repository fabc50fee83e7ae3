// The fused CPU kernels of the Sinkhorn-Knopp self-labelling solver (selflabel._C).
//
// Every kernel takes a batch of H heads: the kernel matrix is (H, N, K), row
// quantities are (H, N), column quantities are (H, K), all contiguous and of the
// matrix dtype (float32 or float64). Rows are cut into chunks (RowChunks) that
// the calling thread and its helper threads take one at a time; column reductions go to
// one partial buffer per chunk (accumulated in double) that is reduced in chunk
// order after the pass, so each iteration reads the matrix from memory
// exactly once and results do not depend on the number of threads.
//
// The `*_impl<scalar_t>` entry points assume checked operands: bindings.cpp runs
// checks.h on every input, then dispatches on the dtype (AT_DISPATCH_FLOATING_TYPES).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <pthread.h>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace selflabel {

using acc_t = double;
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// ---------------------------------------------------------------------------
// Parallel machinery: denormal flushing, row chunks, per-chunk partials.
// ---------------------------------------------------------------------------
// Denormal floats cost a microcode assist per operation on x86 (measured: a float32
// scaling pass over softmax outputs at lamb 25, where most kernel entries are tiny,
// ran 10x slower). Each worker flushes them to zero (FTZ and DAZ) while it runs a
// chunk and restores its previous mode after. The solver front bounds the plan mass
// that values below the smallest normal number can carry, flushed or not.
class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(__SSE2__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);  // FTZ (bit 15) | DAZ (bit 6)
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    fpcr |= (uint64_t(1) << 24);  // FZ
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
#endif
  }
  ~FlushDenormals() {
#if defined(__SSE2__)
    _mm_setcsr(static_cast<unsigned int>(saved_));
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  uint64_t saved_ = 0;
};

// One pass's chunks, shared by the thread that runs the pass and its helpers. A
// helper that starts after the last chunk was taken returns without touching the
// pass, so the pass may return before every helper it woke has started.
class ChunkQueue {
 public:
  ChunkQueue(int64_t count, const std::function<void(int64_t)>& chunk) : count_(count), chunk_(&chunk) {}
  // Takes chunks until none is left. `chunk_` is called only for a chunk taken
  // here, while the thread that runs the pass still waits for it.
  void work() {
    const FlushDenormals ftz;
    for (int64_t c = next_++; c < count_; c = next_++) {
      try {
        (*chunk_)(c);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
        std::lock_guard<std::mutex> lock(mutex_);
        finished_.notify_all();
      }
    }
  }
  // Returns once every chunk is done (sleeping, not spinning); rethrows a chunk's error.
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [this] { return done_.load(std::memory_order_acquire) == count_; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  const int64_t count_;
  const std::function<void(int64_t)>* chunk_;
  std::atomic<int64_t> next_{0}, done_{0};
  std::mutex mutex_;
  std::condition_variable finished_;
  std::exception_ptr error_;
};

// The process's helper threads. Each sleeps on a condition variable until a pass
// posts work, runs ChunkQueue::work and sleeps again; they are started as passes
// first ask for them and live as long as the process. Not OpenMP's threads: an
// OpenMP region waits for every thread of its team, and its idle threads spin
// (unless OMP_WAIT_POLICY=PASSIVE was set before torch loaded) on the cores that a
// late thread needs. A forked child gets a fresh, empty set (the parent's threads
// do not exist there, and its locks may have been held at the fork).
class Helpers {
 public:
  static Helpers& get() {
    static const bool registered = [] { return pthread_atfork(nullptr, nullptr, [] { instance() = nullptr; }) == 0; }();
    (void)registered;
    Helpers* h = instance().load(std::memory_order_acquire);
    if (h == nullptr) {  // first use in this process (or in this forked child)
      auto fresh = std::make_unique<Helpers>();
      if (instance().compare_exchange_strong(h, fresh.get(), std::memory_order_acq_rel)) h = fresh.release();
    }
    return *h;  // never deleted: its threads outlive every static
  }
  // Wakes up to `n` helpers to work on `queue` (starting threads as needed). May throw
  // std::bad_alloc with some posts made: the caller then withdraws them.
  void post(const std::shared_ptr<ChunkQueue>& queue, int64_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t i = 0; i < n; ++i) posted_.push_back(queue);
    while (threads_ < n) {
      try {
        std::thread([this] { loop(); }).detach();
      } catch (...) {  // std::system_error, std::bad_alloc
        break;  // no more threads: the pass runs on those there are
      }
      ++threads_;
    }
    for (int64_t i = 0; i < n; ++i) wake_.notify_one();
  }
  // How many helper threads have been started.
  int64_t threads() {
    std::lock_guard<std::mutex> lock(mutex_);
    return threads_;
  }
  // Drops the posts of `queue` that no helper has taken yet.
  void withdraw(const std::shared_ptr<ChunkQueue>& queue) {
    std::lock_guard<std::mutex> lock(mutex_);
    posted_.erase(std::remove(posted_.begin(), posted_.end(), queue), posted_.end());
  }

 private:
  static std::atomic<Helpers*>& instance() {
    static std::atomic<Helpers*> h{nullptr};
    return h;
  }
  void loop() {
    for (;;) {
      std::shared_ptr<ChunkQueue> queue;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return !posted_.empty(); });
        queue = std::move(posted_.front());
        posted_.pop_front();
      }
      queue->work();
    }
  }
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<ChunkQueue>> posted_;
  int64_t threads_ = 0;
};

// Rows [0, N) cut into at most kMaxChunks chunks of at least kMinChunkRows rows,
// a split that depends on N only. The calling thread and up to `threads - 1`
// helpers (Helpers) take chunks from an atomic counter (ChunkQueue), and the
// caller waits only for chunks a helper has already taken, never for a helper
// that has not started: on a busy machine (DataLoader workers, other jobs) a
// helper the scheduler has not run yet costs nothing. `threads` (> 0) caps the
// workers below at::get_num_threads(): the chunked solver leaves a core to its
// file reader. A pass gets one worker per kGrainEntries entries at most: below
// that, waking a second thread costs more than the work (measured: 500 x 10 took
// longer on 2 threads than on 1).
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kGrainEntries = int64_t(1) << 16;

class RowChunks {
 public:
  RowChunks(int64_t N, int64_t K, int64_t threads)
      : N_(N),
        rows_(std::max(kMinChunkRows, (N + kMaxChunks - 1) / kMaxChunks)),
        count_((N + rows_ - 1) / rows_),
        threads_(std::min<int64_t>(threads > 0 ? std::min<int64_t>(threads, at::get_num_threads())
                                               : at::get_num_threads(),
                                   std::max<int64_t>(1, N * K / kGrainEntries))) {}
  int64_t count() const { return count_; }
  // f(chunk, begin, end) once per chunk, on the caller and its helpers.
  template <typename F>
  void run(const F& f) const {
    const int64_t workers = std::min(threads_, count_);
    if (workers <= 1) {
      const FlushDenormals ftz;
      for (int64_t c = 0; c < count_; ++c) f(c, c * rows_, std::min(N_, (c + 1) * rows_));
      return;
    }
    const std::function<void(int64_t)> chunk = [&](int64_t c) { f(c, c * rows_, std::min(N_, (c + 1) * rows_)); };
    auto queue = std::make_shared<ChunkQueue>(count_, chunk);
    Helpers& helpers = Helpers::get();
    try {
      helpers.post(queue, workers - 1);
    } catch (...) {  // out of memory while posting: no helper may keep a post to `chunk`
      helpers.withdraw(queue);
    }
    queue->work();
    helpers.withdraw(queue);
    queue->wait();
  }

 private:
  int64_t N_, rows_, count_, threads_;
};

// One K-long partial per chunk, reduced in chunk order after the pass.
class ColumnPartials {
 public:
  ColumnPartials(const RowChunks& chunks, int64_t K, acc_t init)
      : K_(K), data_(static_cast<size_t>(chunks.count()) * K, init) {}
  acc_t* slot(int64_t chunk) { return data_.data() + static_cast<size_t>(chunk) * K_; }
  template <typename Op>
  std::vector<acc_t> reduce(acc_t init, Op op) const {
    std::vector<acc_t> out(K_, init);
    for (size_t t = 0; t < data_.size() / K_; ++t)
      for (int64_t j = 0; j < K_; ++j) out[j] = op(out[j], data_[t * K_ + j]);
    return out;
  }

 private:
  int64_t K_;
  std::vector<acc_t> data_;
};

// One scalar per chunk, summed in chunk order after the pass.
class ChunkSum {
 public:
  explicit ChunkSum(const RowChunks& chunks) : data_(chunks.count(), 0.0) {}
  void set(int64_t chunk, acc_t x) { data_[chunk] = x; }
  acc_t total() const {
    acc_t s = 0;
    for (acc_t x : data_) s += x;
    return s;
  }

 private:
  std::vector<acc_t> data_;
};

inline acc_t max_op(acc_t x, acc_t y) { return std::max(x, y); }
inline acc_t sum_op(acc_t x, acc_t y) { return x + y; }

// ---------------------------------------------------------------------------
// Kernel conventions.
// ---------------------------------------------------------------------------
// Each kernel is a row-range function on plain pointers (what one thread does
// with one chunk of rows), run per head over RowChunks. Plain pointer
// arguments keep GCC's vectoriser from reloading lambda captures per element.
//
// Accumulation: products are summed in scalar_t over short runs (column tiles
// of kTile for a row sum, kFlushRows rows for a column partial) and flushed to
// double, so float32 inner loops run at full SIMD width while long sums stay
// accurate.
constexpr int64_t kRows = 4;  // rows per group in the scaling pass
constexpr int64_t kTile = 512;
constexpr int64_t kFlushRows = 64;

// ---------------------------------------------------------------------------
// Row providers: where a pass finds the rows of its kernel matrix.
// ---------------------------------------------------------------------------
// One row of the log kernel: o = lamb * (x - m), x = log s for probabilities, s otherwise.
// `prepare` and the score mode of the passes share it, so both give the same bits.
template <typename T>
inline void log_kernel_row(const T* __restrict__ s, T* __restrict__ o, int64_t K, T lam, T m, bool probs) {
  if (probs) {
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) o[j] = lam * (vlog(s[j]) - m);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) o[j] = lam * (s[j] - m);
  }
}

// Where a pass finds row i of its kernel matrix. `row(i, scratch)` returns a
// pointer to its K values; `data(i)` is the memory the row is made from (for
// prefetching).
//   StoredRows: a materialised kernel matrix (the in-memory solver).
//   ScoreRows: raw scores; the kernel row lamb * (x_i - m_i) (x = log S for
//     probabilities, m the row shift from `prepare`), exponentiated for the scaling
//     form, is recomputed into a per-thread scratch row right before use, so the
//     chunked solver never writes a kernel matrix: one read of the scores per pass.
template <typename T>
struct StoredRows {
  const T* M;
  int64_t K;
  const T* row(int64_t i, T* /*scratch*/) const { return M + i * K; }
  const T* data(int64_t i) const { return M + i * K; }
};

template <typename T>
struct ScoreRows {
  const T* S;
  const T* shift;
  int64_t K;
  T lam;
  bool probs;
  bool expo;
  const T* row(int64_t i, T* __restrict__ o) const {
    log_kernel_row(S + i * K, o, K, lam, shift[i], probs);
    if (expo) {
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) o[j] = vexp(o[j]);
    }
    return o;
  }
  const T* data(int64_t i) const { return S + i * K; }
};

// Calls fn(rows_of) where rows_of(h) is head h's row provider over `mat` (H, N, K):
// stored kernel rows, or score rows shifted by `shift` (H, N) when it is given.
template <typename T, typename Fn>
void with_rows(const at::Tensor& mat, const c10::optional<at::Tensor>& shift, double lamb, bool probs,
               bool expo, Fn fn) {
  const int64_t N = mat.size(1), K = mat.size(2);
  const T* base = mat.data_ptr<T>();
  if (shift.has_value()) {
    const T* sh = shift->data_ptr<T>();
    const T lam = static_cast<T>(lamb);
    fn([=](int64_t h) { return ScoreRows<T>{base + h * N * K, sh + h * N, K, lam, probs, expo}; });
  } else {
    fn([=](int64_t h) { return StoredRows<T>{base + h * N * K, K}; });
  }
}

// ---------------------------------------------------------------------------
// prepare: scores -> kernel matrix, one read of S and one write of the output.
// ---------------------------------------------------------------------------
// The row sum is accumulated scaled by 2^-64 (exact), so finite float64 scores never
// overflow it: NaN in the sum then means a NaN (or +inf and -inf) in the row.
constexpr acc_t kSumScale = 0x1p-64;

template <typename T>
void prepare_rows(const T* __restrict__ S, T* __restrict__ O, T* rmax, double* rsum, double* rmin,
                  acc_t* __restrict__ cm, const T* __restrict__ G, T* __restrict__ rpot, int64_t begin,
                  int64_t end, int64_t K, T lam, bool probs, bool exponentiate) {
  for (int64_t i = begin; i < end; ++i) {
    const T* __restrict__ s = S + i * K;
    T* __restrict__ o = O + i * K;
    T mx = s[0], mn = s[0];
    acc_t sum = 0;
#pragma omp simd reduction(max : mx) reduction(min : mn) reduction(+ : sum)
    for (int64_t j = 0; j < K; ++j) {
      mx = vmax(mx, s[j]);
      mn = vmin(mn, s[j]);
      sum += static_cast<acc_t>(s[j]) * kSumScale;
    }
    sum /= kSumScale;
    rsum[i] = sum;
    rmin[i] = mn;
    const T m = probs ? vlog(mx) : mx;
    rmax[i] = m;
    // Invalid rows (NaN, +inf, or no finite entry): the front raises. -inf entries are fine.
    if (std::isnan(sum) || !std::isfinite(m)) {
      std::fill(o, o + K, T(0));
      continue;
    }
    log_kernel_row(s, o, K, lam, m, probs);
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) cm[j] = vmax(cm[j], static_cast<acc_t>(o[j]));
    if (G != nullptr) {  // absorbed column potentials, then the row shifted back to a maximum of 0
      T r = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : r)
      for (int64_t j = 0; j < K; ++j) r = vmax(r, o[j] += G[j]);
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) o[j] -= r;
      rpot[i] = -r;
    }
    if (exponentiate) {
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) o[j] = vexp(o[j]);
    }
  }
}

template <typename scalar_t>
void prepare_impl(const at::Tensor& scores, double lamb, bool probs, bool exponentiate, at::Tensor& out,
                  at::Tensor& rowmax, at::Tensor& colmax, at::Tensor& rowsum, at::Tensor& rowmin,
                  const c10::optional<at::Tensor>& col_pot, at::Tensor& row_pot, int64_t threads) {
  const int64_t H = scores.size(0), N = scores.size(1), K = scores.size(2);
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* S = scores.data_ptr<scalar_t>() + h * N * K;
    scalar_t* O = out.data_ptr<scalar_t>() + h * N * K;
    scalar_t* rmax = rowmax.data_ptr<scalar_t>() + h * N;
    double* rsum = rowsum.data_ptr<double>() + h * N;
    double* rmin = rowmin.data_ptr<double>() + h * N;
    const scalar_t* G = col_pot.has_value() ? col_pot->data_ptr<scalar_t>() + h * K : nullptr;
    scalar_t* rpot = row_pot.data_ptr<scalar_t>() + h * N;
    const RowChunks chunks(N, K, threads);
    ColumnPartials cmax(chunks, K, -kInf);
    chunks.run([&](int64_t c, int64_t begin, int64_t end) {
      prepare_rows<scalar_t>(S, O, rmax, rsum, rmin, cmax.slot(c), G, rpot, begin, end, K,
                             static_cast<scalar_t>(lamb), probs, exponentiate);
    });
    const std::vector<acc_t> c = cmax.reduce(-kInf, max_op);
    std::copy(c.begin(), c.end(), colmax.data_ptr<scalar_t>() + h * K);
  }
}

// ---------------------------------------------------------------------------
// scaling pass: one fused iteration of the scaling form, one read of M.
// Rows go kRows at a time so v is loaded once per group and the column partial
// is updated once per group.
// ---------------------------------------------------------------------------
template <typename T>
inline void row_dots(const T* const* rows, int64_t nr, const T* __restrict__ v, int64_t K, acc_t* t) {
  for (int64_t r = 0; r < nr; ++r) t[r] = 0;
  for (int64_t j0 = 0; j0 < K; j0 += kTile) {
    const int64_t j1 = std::min(K, j0 + kTile);
    if (nr == kRows) {
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      const T *__restrict__ r0 = rows[0], *__restrict__ r1 = rows[1], *__restrict__ r2 = rows[2],
              *__restrict__ r3 = rows[3];
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t j = j0; j < j1; ++j) {
        s0 += r0[j] * v[j];
        s1 += r1[j] * v[j];
        s2 += r2[j] * v[j];
        s3 += r3[j] * v[j];
      }
      t[0] += s0;
      t[1] += s1;
      t[2] += s2;
      t[3] += s3;
    } else {
      for (int64_t r = 0; r < nr; ++r) {
        T s0 = 0;
        const T* __restrict__ r0 = rows[r];
#pragma omp simd reduction(+ : s0)
        for (int64_t j = j0; j < j1; ++j) s0 += r0[j] * v[j];
        t[r] += s0;
      }
    }
  }
}

// Over-relaxation (selflabel/accel.py holds the same rule in torch): a dual coordinate whose plain
// update is the log step y takes omega * y instead, where that longer step still raises the dual
// objective <a, f> + <b, g> - sum_ij exp(L_ij + f_i + g_j). A row of mass r_i (y = log(a_i / r_i))
// gains r_i (s e^y - e^s + 1) from a step s: at s = omega y that is >= 0 for every y <= 0 and omega
// in [1, 2], and is tested for y > 0; where it fails the row takes the plain step y (which always gains).
inline acc_t relaxed_step(acc_t y, acc_t omega) {
  if (omega == 1.0 || !(y > 0)) return omega * y;
  const acc_t gain = omega * y * std::exp(y) - std::exp(omega * y) + 1.0;
  return gain >= 0 ? omega * y : y;
}

// Rows [begin, end): u_i <- a_i / (M_i . v) (over-relaxed by omega); wp += sum_i u_i M_i. Returns sum_i |u_old/u_new - 1|.
template <typename T, typename Rows>
acc_t scaling_rows(const Rows& src, const T* __restrict__ A, T* __restrict__ U, const T* __restrict__ V,
                   acc_t* __restrict__ wp, int64_t begin, int64_t end, int64_t K, acc_t omega) {
  std::vector<T> wb_buf(K, T(0));  // short-run column partial
  std::vector<T> scratch(kRows * K);  // recomputed rows (ScoreRows only)
  T* __restrict__ wb = wb_buf.data();
  acc_t change = 0;
  int64_t since_flush = 0;
  for (int64_t i = begin; i < end; i += kRows) {
    const int64_t nr = std::min(kRows, end - i);
    // A ragged last group repeats its last row with weight 0.
    const T* rows[kRows];
    for (int64_t r = 0; r < kRows; ++r) rows[r] = r < nr ? src.row(i + r, scratch.data() + r * K) : rows[nr - 1];
    acc_t t[kRows];
    row_dots<T>(rows, nr, V, K, t);
    T us[kRows] = {0, 0, 0, 0};
    for (int64_t r = 0; r < nr; ++r) {
      const acc_t u_old = static_cast<acc_t>(U[i + r]);
      acc_t ui = static_cast<acc_t>(A[i + r]) / t[r];
      if (omega != 1.0) ui = u_old * std::exp(relaxed_step(std::log(ui / u_old), omega));
      change += std::abs(u_old / ui - 1.0);
      U[i + r] = us[r] = static_cast<T>(ui);
    }
    const T u0 = us[0], u1 = us[1], u2 = us[2], u3 = us[3];
    const T *__restrict__ r0 = rows[0], *__restrict__ r1 = rows[1], *__restrict__ r2 = rows[2],
            *__restrict__ r3 = rows[3];
    // The column update runs from cache; meanwhile prefetch the next group's rows
    // so memory stays busy (one cache line of each next row per chunk).
    const int64_t next_rows = std::min(kRows, end - (i + kRows));
    const T* next = next_rows > 0 ? src.data(i + kRows) : nullptr;
    constexpr int64_t kChunk = 64 / sizeof(T);
    for (int64_t j0 = 0; j0 < K; j0 += kChunk) {
      for (int64_t r = 0; r < next_rows; ++r) __builtin_prefetch(next + r * K + j0, 0, 3);
      const int64_t j1 = std::min(K, j0 + kChunk);
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) wb[j] += u0 * r0[j] + u1 * r1[j] + u2 * r2[j] + u3 * r3[j];
    }
    since_flush += nr;
    if (since_flush >= kFlushRows || i + kRows >= end) {
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) {
        wp[j] += static_cast<acc_t>(wb[j]);
        wb[j] = 0;
      }
      since_flush = 0;
    }
  }
  return change;
}

template <typename scalar_t, typename RowsOf>
void scaling_pass_impl(const at::Tensor& M, RowsOf rows_of, const at::Tensor& a, at::Tensor& u,
                       const at::Tensor& v, at::Tensor& w, at::Tensor& change, int64_t threads, double omega) {
  const int64_t H = M.size(0), N = M.size(1), K = M.size(2);
  const scalar_t* A = a.data_ptr<scalar_t>();
  for (int64_t h = 0; h < H; ++h) {
    const auto rows = rows_of(h);
    scalar_t* U = u.data_ptr<scalar_t>() + h * N;
    const scalar_t* V = v.data_ptr<scalar_t>() + h * K;
    const RowChunks chunks(N, K, threads);
    ColumnPartials wpart(chunks, K, 0.0);
    ChunkSum chg(chunks);
    chunks.run([&](int64_t c, int64_t begin, int64_t end) {
      chg.set(c, scaling_rows<scalar_t>(rows, A, U, V, wpart.slot(c), begin, end, K, omega));
    });
    const std::vector<acc_t> ws = wpart.reduce(0.0, sum_op);
    std::copy(ws.begin(), ws.end(), w.data_ptr<scalar_t>() + h * K);
    change.data_ptr<double>()[h] = chg.total();
  }
}

// ---------------------------------------------------------------------------
// log pass: one fused iteration of the log-domain form, one read of L.
// ---------------------------------------------------------------------------
// Rows [begin, end): f_i <- log a_i - LSE_j(L_ij + g_j); wp += sum_i alpha_i e_ij and
// mp = max(mp, log(alpha_i e_ij)) with e_ij = exp(L_ij + g_j - r_i), alpha_i = a_i / s_i.
// Returns sum_i |exp(f_old - f_new) - 1|.
template <typename T, typename Rows>
acc_t log_rows(const Rows& src, const T* __restrict__ LA, T* __restrict__ F, const T* __restrict__ G,
               acc_t* __restrict__ wp, acc_t* __restrict__ mp, int64_t begin, int64_t end, int64_t K, acc_t omega) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  std::vector<T> e_buf(K), wb_buf(K, T(0)), mb_buf(K, kNegInf), scratch(K);
  T* __restrict__ e = e_buf.data();
  T* __restrict__ wb = wb_buf.data();
  T* __restrict__ mb = mb_buf.data();
  acc_t change = 0;
  int64_t since_flush = 0;
  for (int64_t i = begin; i < end; ++i) {
    const T* __restrict__ row = src.row(i, scratch.data());
    T r = kNegInf;
#pragma omp simd reduction(max : r)
    for (int64_t j = 0; j < K; ++j) r = vmax(r, row[j] + G[j]);
    acc_t s = 0;
    for (int64_t j0 = 0; j0 < K; j0 += kTile) {
      const int64_t j1 = std::min(K, j0 + kTile);
      T st = 0;
#pragma omp simd reduction(+ : st)
      for (int64_t j = j0; j < j1; ++j) {
        e[j] = vexp(row[j] + G[j] - r);
        st += e[j];
      }
      s += st;
    }
    acc_t log_alpha = static_cast<acc_t>(LA[i]) - std::log(s);
    acc_t fi = log_alpha - static_cast<acc_t>(r);
    if (omega != 1.0) {  // the over-relaxed potential; alpha_i = exp(f_i + r_i) weighs the column sums
      fi = static_cast<acc_t>(F[i]) + relaxed_step(fi - static_cast<acc_t>(F[i]), omega);
      log_alpha = fi + static_cast<acc_t>(r);
    }
    change += std::abs(std::exp(static_cast<acc_t>(F[i]) - fi) - 1.0);
    F[i] = static_cast<T>(fi);
    const T alpha = static_cast<T>(std::exp(log_alpha));
    const T shift = static_cast<T>(log_alpha) - r;
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) {
      wb[j] += alpha * e[j];
      mb[j] = vmax(mb[j], row[j] + G[j] + shift);
    }
    if (++since_flush == kFlushRows || i + 1 == end) {
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) {
        wp[j] += static_cast<acc_t>(wb[j]);
        wb[j] = 0;
      }
      since_flush = 0;
    }
  }
  for (int64_t j = 0; j < K; ++j) mp[j] = vmax(mp[j], static_cast<acc_t>(mb[j]));
  return change;
}

template <typename scalar_t, typename RowsOf>
void log_pass_impl(const at::Tensor& L, RowsOf rows_of, const at::Tensor& log_a, at::Tensor& f,
                   const at::Tensor& g, at::Tensor& logw, at::Tensor& change, int64_t threads, double omega) {
  const int64_t H = L.size(0), N = L.size(1), K = L.size(2);
  const scalar_t* LA = log_a.data_ptr<scalar_t>();
  // Below this the column sum may be dominated by flushed-to-zero terms: use the max (the rule of
  // kernels/_common.py's log_column_mass, UNDERFLOW_MARGIN = 1e8).
  const acc_t tiny = std::numeric_limits<scalar_t>::min() * acc_t(1e8);
  for (int64_t h = 0; h < H; ++h) {
    const auto rows = rows_of(h);
    scalar_t* F = f.data_ptr<scalar_t>() + h * N;
    const scalar_t* G = g.data_ptr<scalar_t>() + h * K;
    const RowChunks chunks(N, K, threads);
    ColumnPartials wpart(chunks, K, 0.0);
    ColumnPartials mpart(chunks, K, -kInf);
    ChunkSum chg(chunks);
    chunks.run([&](int64_t c, int64_t begin, int64_t end) {
      chg.set(c, log_rows<scalar_t>(rows, LA, F, G, wpart.slot(c), mpart.slot(c), begin, end, K, omega));
    });
    const std::vector<acc_t> ws = wpart.reduce(0.0, sum_op);
    const std::vector<acc_t> ms = mpart.reduce(-kInf, max_op);
    scalar_t* LW = logw.data_ptr<scalar_t>() + h * K;
    for (int64_t j = 0; j < K; ++j) LW[j] = static_cast<scalar_t>(ws[j] > tiny ? std::log(ws[j]) : ms[j]);
    change.data_ptr<double>()[h] = chg.total();
  }
}

// ---------------------------------------------------------------------------
// labels: argmax_j of M_ij * v_j (linear) or L_ij + g_j (log). Ties go round the
// clusters: row i (global index, `row_offset` + local) takes the first maximum at or
// after column i mod K, wrapping around, so rows with equal scores get balanced labels.
// Values within kTieUlps roundings of the maximum count as tied (equal rows then tie
// whatever the summation order that produced v).
// ---------------------------------------------------------------------------
constexpr double kTieUlps = 64;

template <typename T>
inline T tie_floor(T best, bool linear) {
  const T slack = static_cast<T>(kTieUlps) * std::numeric_limits<T>::epsilon();
  return linear ? best - slack * best : best - slack * std::max(T(1), std::abs(best));
}

template <typename T, typename Rows>
void label_rows(const Rows& src, const T* __restrict__ col, bool linear, int64_t* O, int64_t begin,
                int64_t end, int64_t K, int64_t row_offset) {
  std::vector<T> scratch(K), vals(K);
  T* __restrict__ x = vals.data();
  for (int64_t i = begin; i < end; ++i) {
    const T* __restrict__ row = src.row(i, scratch.data());
    T best = -std::numeric_limits<T>::infinity();
    if (linear) {
#pragma omp simd reduction(max : best)
      for (int64_t j = 0; j < K; ++j) best = vmax(best, x[j] = row[j] * col[j]);
    } else {
#pragma omp simd reduction(max : best)
      for (int64_t j = 0; j < K; ++j) best = vmax(best, x[j] = row[j] + col[j]);
    }
    const T floor = tie_floor(best, linear);
    const int64_t start = (row_offset + i) % K;
    int64_t label = start;
    for (int64_t step = 0; step < K; ++step) {
      const int64_t j = start + step < K ? start + step : start + step - K;
      if (x[j] >= floor) {
        label = j;
        break;
      }
    }
    O[i] = label;
  }
}

template <typename scalar_t, typename RowsOf>
void labels_impl(const at::Tensor& mat, RowsOf rows_of, const at::Tensor& log_v, bool linear, at::Tensor& out,
                 int64_t threads, int64_t row_offset) {
  const int64_t H = mat.size(0), N = mat.size(1), K = mat.size(2);
  for (int64_t h = 0; h < H; ++h) {
    const auto rows = rows_of(h);
    const scalar_t* LV = log_v.data_ptr<scalar_t>() + h * K;
    std::vector<scalar_t> col(K);
    for (int64_t j = 0; j < K; ++j) col[j] = linear ? std::exp(LV[j]) : LV[j];
    int64_t* O = out.data_ptr<int64_t>() + h * N;
    RowChunks(N, K, threads).run([&](int64_t, int64_t begin, int64_t end) {
      label_rows<scalar_t>(rows, col.data(), linear, O, begin, end, K, row_offset);
    });
  }
}

// ---------------------------------------------------------------------------
// column_sums: w_j = sum_i u_i M_ij, one read of M (the first cluster normalisation of the
// fixed-iteration drop-ins).
// ---------------------------------------------------------------------------
template <typename T>
void column_sum_rows(const T* __restrict__ M, const T* __restrict__ U, acc_t* __restrict__ wp, int64_t begin,
                     int64_t end, int64_t K) {
  for (int64_t i = begin; i < end; ++i) {
    const T* __restrict__ row = M + i * K;
    const acc_t ui = U[i];
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) wp[j] += ui * static_cast<acc_t>(row[j]);
  }
}

template <typename scalar_t>
void column_sums_impl(const at::Tensor& M, const at::Tensor& u, at::Tensor& w, int64_t threads) {
  const int64_t H = M.size(0), N = M.size(1), K = M.size(2);
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* Mh = M.data_ptr<scalar_t>() + h * N * K;
    const scalar_t* U = u.data_ptr<scalar_t>() + h * N;
    const RowChunks chunks(N, K, threads);
    ColumnPartials part(chunks, K, 0.0);
    chunks.run([&](int64_t c, int64_t begin, int64_t end) { column_sum_rows(Mh, U, part.slot(c), begin, end, K); });
    const std::vector<acc_t> ws = part.reduce(0.0, sum_op);
    std::copy(ws.begin(), ws.end(), w.data_ptr<scalar_t>() + h * K);
  }
}

// ---------------------------------------------------------------------------
// normalised_rows: Q_ij = M_ij v_j / sum_k M_ik v_k, each row summing to 1; one read of M, one
// write of Q (the drop-ins' output).
// ---------------------------------------------------------------------------
template <typename T>
void normalised_row_range(const T* __restrict__ M, const T* __restrict__ V, T* __restrict__ Q, int64_t begin,
                          int64_t end, int64_t K) {
  for (int64_t i = begin; i < end; ++i) {
    const T* __restrict__ row = M + i * K;
    T* __restrict__ out = Q + i * K;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < K; ++j) {
      out[j] = row[j] * V[j];
      sum += static_cast<acc_t>(out[j]);
    }
    const T inv = static_cast<T>(1.0 / sum);
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) out[j] *= inv;
  }
}

template <typename scalar_t>
void normalised_rows_impl(const at::Tensor& M, const at::Tensor& v, at::Tensor& q, int64_t threads) {
  const int64_t H = M.size(0), N = M.size(1), K = M.size(2);
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* Mh = M.data_ptr<scalar_t>() + h * N * K;
    const scalar_t* V = v.data_ptr<scalar_t>() + h * K;
    scalar_t* Q = q.data_ptr<scalar_t>() + h * N * K;
    RowChunks(N, K, threads).run([&](int64_t, int64_t begin, int64_t end) {
      normalised_row_range(Mh, V, Q, begin, end, K);
    });
  }
}

}  // namespace selflabel
