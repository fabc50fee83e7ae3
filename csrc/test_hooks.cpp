// selflabel._C_test: test-only hooks, a separate small extension so that the production
// module selflabel._C carries none of them. It exposes vec_math.h's vectorised exp and log
// (the ones the kernels use) so that tests/test_cpu_kernels.py can measure their accuracy
// against libm, and runs the kernels' row chunks with every helper thread held busy
// (chunks_on_caller), so that tests can show a pass never waits for a helper that has
// not started. Built with the same flags as selflabel._C; the package never imports it.
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "checks.h"
#include "kernels.h"
#include "vec_math.h"

namespace selflabel {
namespace {

template <typename scalar_t, bool kExp>
void elementwise_impl(const at::Tensor& x, at::Tensor& y) {
  const scalar_t* X = x.data_ptr<scalar_t>();
  scalar_t* Y = y.data_ptr<scalar_t>();
  const int64_t n = x.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) Y[i] = kExp ? vexp(X[i]) : vlog(X[i]);
}

at::Tensor vec_exp(const at::Tensor& x_in) {
  check_cpu(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "selflabel_vec_exp", [&] { elementwise_impl<scalar_t, true>(x, y); });
  return y;
}

at::Tensor vec_log(const at::Tensor& x_in) {
  check_cpu(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "selflabel_vec_log", [&] { elementwise_impl<scalar_t, false>(x, y); });
  return y;
}

// Runs RowChunks(N, K, threads), the kernels' parallel machinery (kernels.h), and returns, per
// chunk, whether the calling thread ran it. helpers_busy: every helper thread is first held busy
// by another queue, so the caller must run every chunk (a pass that waited for its helpers would
// never return; the test runs this under a timeout). Otherwise the caller's chunks wait (60 s in
// all at most) until a helper has run one, so a helper that never runs leaves every chunk on the caller.
std::vector<bool> chunks_on_caller(int64_t N, int64_t K, int64_t threads, bool helpers_busy) {
  TORCH_CHECK(threads >= 2, "threads must be >= 2 (one helper at least), got ", threads);
  const RowChunks chunks(N, K, threads);
  TORCH_CHECK(N > 0 && K > 0 && N * K >= threads * kGrainEntries && chunks.count() >= threads &&
                  at::get_num_threads() >= threads,
              "N x K must be large enough, and torch.get_num_threads() >= threads, for helpers to be asked");
  // What the blocking helpers touch. On the failure path it is leaked, not freed: a helper that
  // starts late still reads it.
  struct Hold {
    std::mutex mutex;
    std::condition_variable changed;
    int64_t started = 0;
    bool held = true, helper_ran = false;
    std::function<void(int64_t)> block;
  };
  auto hold = std::make_unique<Hold>();
  Hold* h = hold.get();
  h->block = [h](int64_t) {  // each helper takes one chunk and blocks in it
    std::unique_lock<std::mutex> lock(h->mutex);
    ++h->started;
    h->changed.notify_all();
    h->changed.wait(lock, [h] { return !h->held; });
  };
  // every helper thread there is (at least the pass's threads - 1, started here)
  const int64_t helpers = std::max(threads - 1, Helpers::get().threads());
  auto blocker = std::make_shared<ChunkQueue>(helpers, h->block);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  if (helpers_busy) {
    Helpers::get().post(blocker, helpers);
    std::unique_lock<std::mutex> lock(h->mutex);
    if (!h->changed.wait_until(lock, deadline, [h, helpers] { return h->started == helpers; })) {
      h->held = false;  // let those that did start go
      h->changed.notify_all();
      const int64_t started = h->started;
      lock.unlock();
      hold.release();  // leaked: see Hold
      TORCH_CHECK(false, "chunks_on_caller: only ", started, " of ", helpers, " helpers started within 60 s");
    }
  }
  const auto caller = std::this_thread::get_id();
  std::vector<int> on_caller(chunks.count(), -1);
  chunks.run([&](int64_t c, int64_t, int64_t) {
    const bool mine = std::this_thread::get_id() == caller;
    on_caller[c] = mine;
    std::unique_lock<std::mutex> lock(h->mutex);
    if (!mine) {
      h->helper_ran = true;
      h->changed.notify_all();
    } else if (!helpers_busy) {
      h->changed.wait_until(lock, deadline, [h] { return h->helper_ran; });
    }
  });
  if (helpers_busy) {
    {
      std::lock_guard<std::mutex> lock(h->mutex);
      h->held = false;
      h->changed.notify_all();
    }
    blocker->wait();  // every helper has left `block`
  }
  TORCH_CHECK(std::find(on_caller.begin(), on_caller.end(), -1) == on_caller.end(),
              "chunks_on_caller: a chunk never ran");
  return std::vector<bool>(on_caller.begin(), on_caller.end());
}

}  // namespace
}  // namespace selflabel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "selflabel test-only hooks (see csrc/test_hooks.cpp); not part of the package's API";
  m.def("vec_exp", &selflabel::vec_exp, "vectorised exp used by the kernels", py::arg("x"));
  m.def("vec_log", &selflabel::vec_log, "vectorised log used by the kernels", py::arg("x"));
  m.def("chunks_on_caller", &selflabel::chunks_on_caller,
        "run RowChunks (every helper thread held busy, or not); per chunk, whether the caller ran it",
        py::arg("N"), py::arg("K"), py::arg("threads"), py::arg("helpers_busy"),
        py::call_guard<py::gil_scoped_release>());
}
