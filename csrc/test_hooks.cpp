// selflabel._C_test: test-only hooks, a separate small extension so that the production
// module selflabel._C carries none of them. It exposes vec_math.h's vectorised exp and log
// (the ones the kernels use) so that tests/test_cpu_kernels.py can measure their accuracy
// against libm. Built with the same flags as selflabel._C; the package never imports it.
#include <torch/extension.h>

#include "checks.h"
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

}  // namespace
}  // namespace selflabel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "selflabel test-only hooks (see csrc/test_hooks.cpp); not part of the package's API";
  m.def("vec_exp", &selflabel::vec_exp, "vectorised exp used by the kernels", py::arg("x"));
  m.def("vec_log", &selflabel::vec_log, "vectorised log used by the kernels", py::arg("x"));
}
