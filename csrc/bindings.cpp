// selflabel._C: the Python bindings of the fused CPU kernels. Each wrapper checks its
// inputs (checks.h), allocates the outputs, dispatches on the dtype and calls the
// kernel (kernels.h). The extension's only translation unit.
#include <torch/extension.h>

#include <vector>

#include "checks.h"
#include "kernels.h"

namespace selflabel {
namespace {

// x = log(S) for probabilities, S otherwise; m_i = max_j x_ij;
// out_ij = lamb * (x_ij - m_i) (log kernel) or exp of it (exponentiate: scaling kernel).
// With `col_pot` (H, K), absorbed column potentials g: out_ij = lamb * (x_ij - m_i) + g_j + f_i
// (or its exp) with f_i = -max_j (lamb * (x_ij - m_i) + g_j), so every row's maximum is 0 (1),
// and f is returned as the row potentials (zeros without col_pot).
// Returns {out (H,N,K), m (H,N), column max of lamb*(x - m) (H,K),
//          raw row sum (H,N) double, raw row min (H,N) double, f (H,N)}.
std::vector<at::Tensor> prepare(const at::Tensor& scores_in, double lamb, bool probs, bool exponentiate,
                                int64_t threads, const c10::optional<at::Tensor>& col_pot) {
  check_matrix(scores_in, "scores");
  check_lamb(lamb);
  check_threads(threads);
  const at::Tensor scores = scores_in.contiguous();
  check_col_pot(col_pot, scores);
  const int64_t H = scores.size(0), N = scores.size(1), K = scores.size(2);
  at::Tensor out = at::empty_like(scores);
  at::Tensor rowmax = at::empty({H, N}, scores.options());
  at::Tensor colmax = at::empty({H, K}, scores.options());
  at::Tensor row_pot = at::zeros({H, N}, scores.options());
  const auto dopt = scores.options().dtype(at::kDouble);
  at::Tensor rowsum = at::empty({H, N}, dopt);
  at::Tensor rowmin = at::empty({H, N}, dopt);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "selflabel_prepare", [&] {
    prepare_impl<scalar_t>(scores, lamb, probs, exponentiate, out, rowmax, colmax, rowsum, rowmin, col_pot, row_pot,
                           threads);
  });
  return {out, rowmax, colmax, rowsum, rowmin, row_pot};
}

// The passes below take either a kernel matrix or, with `shift` (score mode, see
// check_shift), the raw scores whose kernel rows they recompute.

// Scaling form: per row t_i = sum_j M_ij v_j, u_i <- a_i / t_i; per column
// w_j = sum_i M_ij u_i with the new u, from the same cache-resident row.
// Updates u in place; returns {w (H,K), sum_i |u_old/u_new - 1| (H,) double}.
std::vector<at::Tensor> scaling_pass(const at::Tensor& M, const at::Tensor& a, at::Tensor& u,
                                     const at::Tensor& v, const c10::optional<at::Tensor>& shift, double lamb,
                                     bool probs, int64_t threads, double omega) {
  check_pass(M, "M", a, "a", u, "u", v, "v", shift, lamb, threads, omega);
  at::Tensor w = at::empty({M.size(0), M.size(2)}, M.options());
  at::Tensor change = at::empty({M.size(0)}, M.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "selflabel_scaling_pass", [&] {
    with_rows<scalar_t>(M, shift, lamb, probs, /*expo=*/true,
                        [&](auto rows_of) { scaling_pass_impl<scalar_t>(M, rows_of, a, u, v, w, change, threads, omega); });
  });
  return {w, change};
}

// Log domain: per row z_ij = L_ij + g_j, r_i = max_j z_ij, s_i = sum_j exp(z_ij - r_i),
// f_i <- log a_i - r_i - log s_i; per column log W_j = log sum_i exp(L_ij + f_i + g_j),
// the column mass of (f, g). The column sum reuses e_ij = exp(z_ij - r_i) <= 1 from
// the row step weighted by alpha_i = a_i / s_i <= a_i: one exp per entry, no
// overflow. Where a column's mass underflows (a transient state far from the
// optimum) log W_j falls back to max_i log(e_ij alpha_i), a lower bound within
// log N of the true value; the next iteration corrects it.
// Updates f in place; returns {log W (H,K), sum_i |exp(f_old - f_new) - 1| (H,) double}.
std::vector<at::Tensor> log_pass(const at::Tensor& L, const at::Tensor& log_a, at::Tensor& f,
                                 const at::Tensor& g, const c10::optional<at::Tensor>& shift, double lamb,
                                 bool probs, int64_t threads, double omega) {
  check_pass(L, "L", log_a, "log_a", f, "f", g, "g", shift, lamb, threads, omega);
  at::Tensor logw = at::empty({L.size(0), L.size(2)}, L.options());
  at::Tensor change = at::empty({L.size(0)}, L.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "selflabel_log_pass", [&] {
    with_rows<scalar_t>(L, shift, lamb, probs, /*expo=*/false,
                        [&](auto rows_of) { log_pass_impl<scalar_t>(L, rows_of, log_a, f, g, logw, change, threads, omega); });
  });
  return {logw, change};
}

// In score mode `linear` also selects the kernel: exp(lamb (x - m)) when true, lamb (x - m) otherwise.
// `row_offset`: the global index of the first row (ties are broken by global row index).
at::Tensor labels(const at::Tensor& mat, const at::Tensor& log_v, bool linear,
                  const c10::optional<at::Tensor>& shift, double lamb, bool probs, int64_t threads,
                  int64_t row_offset) {
  check_contiguous_matrix(mat, "mat");
  check_vector(log_v, mat, mat.size(2), "log_v");
  check_shift(shift, mat, lamb);
  check_threads(threads);
  check_row_offset(row_offset);
  at::Tensor out = at::empty({mat.size(0), mat.size(1)}, mat.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(mat.scalar_type(), "selflabel_labels", [&] {
    with_rows<scalar_t>(mat, shift, lamb, probs, /*expo=*/linear,
                        [&](auto rows_of) { labels_impl<scalar_t>(mat, rows_of, log_v, linear, out, threads, row_offset);
                        });
  });
  return out;
}

// Returns w (H, K) in M's dtype.
at::Tensor column_sums(const at::Tensor& M, const at::Tensor& u, int64_t threads) {
  check_contiguous_matrix(M, "M");
  check_vector(u, M, M.size(1), "u");
  check_threads(threads);
  at::Tensor w = at::empty({M.size(0), M.size(2)}, M.options());
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "selflabel_column_sums",
                             [&] { column_sums_impl<scalar_t>(M, u, w, threads); });
  return w;
}

// Returns Q (H, N, K) in M's dtype.
at::Tensor normalised_rows(const at::Tensor& M, const at::Tensor& v, int64_t threads) {
  check_contiguous_matrix(M, "M");
  check_vector(v, M, M.size(2), "v");
  check_threads(threads);
  at::Tensor q = at::empty_like(M);
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "selflabel_normalised_rows",
                             [&] { normalised_rows_impl<scalar_t>(M, v, q, threads); });
  return q;
}

}  // namespace
}  // namespace selflabel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "selflabel fused CPU kernels (see csrc/kernels.h)";
  // the passes run without the GIL: other Python threads (data loading, a second solve) go on meanwhile
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("prepare", &selflabel::prepare, nogil,
        "scores -> kernel matrix, row max, column max, row sum, row min, row potentials", py::arg("scores"),
        py::arg("lamb"), py::arg("probs"), py::arg("exponentiate"), py::arg("threads") = 0,
        py::arg("col_pot") = py::none());
  m.def("scaling_pass", &selflabel::scaling_pass, nogil, "one fused scaling-form iteration", py::arg("M"),
        py::arg("a"), py::arg("u"), py::arg("v"), py::arg("shift") = py::none(), py::arg("lamb") = 0.0,
        py::arg("probs") = false, py::arg("threads") = 0, py::arg("omega") = 1.0);
  m.def("log_pass", &selflabel::log_pass, nogil, "one fused log-domain iteration", py::arg("L"), py::arg("log_a"),
        py::arg("f"), py::arg("g"), py::arg("shift") = py::none(), py::arg("lamb") = 0.0,
        py::arg("probs") = false, py::arg("threads") = 0, py::arg("omega") = 1.0);
  m.def("labels", &selflabel::labels, nogil, "hard labels from the kernel matrix and column duals", py::arg("mat"),
        py::arg("log_v"), py::arg("linear"), py::arg("shift") = py::none(), py::arg("lamb") = 0.0,
        py::arg("probs") = false, py::arg("threads") = 0, py::arg("row_offset") = 0);
  m.def("column_sums", &selflabel::column_sums, nogil, "w = M^T u per head, one read of M", py::arg("M"), py::arg("u"),
        py::arg("threads") = 0);
  m.def("normalised_rows", &selflabel::normalised_rows, nogil, "rows of M diag(v), each normalised to sum 1",
        py::arg("M"), py::arg("v"), py::arg("threads") = 0);
}
