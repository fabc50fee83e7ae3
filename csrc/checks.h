// Input checks of the selflabel extensions, one definition each. Every failure is a
// TORCH_CHECK, so Python sees a RuntimeError that names the argument and what it
// should have been. bindings.cpp runs them on every input before a kernel touches
// memory (the kernels in kernels.h assume checked operands); test_hooks.cpp uses
// check_cpu.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>

namespace selflabel {

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// A kernel matrix or score batch: (H, N, K), float32 or float64, on the CPU, not empty.
inline void check_matrix(const at::Tensor& m, const char* name) {
  check_cpu(m, name);
  TORCH_CHECK(m.dim() == 3, name, " must have shape (H, N, K), got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", m.scalar_type());
  TORCH_CHECK(m.numel() > 0, name, " must not be empty");
}

// check_matrix, and contiguous: the passes read the matrix in place.
inline void check_contiguous_matrix(const at::Tensor& m, const char* name) {
  check_matrix(m, name);
  TORCH_CHECK(m.is_contiguous(), name, " must be contiguous");
}

// A row or column quantity of matrix `m`: (H, len) per head, or (len) shared by the heads;
// contiguous, on the CPU, of m's dtype.
inline void check_vector(const at::Tensor& t, const at::Tensor& m, int64_t len, const char* name,
                         bool per_head = true) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == m.scalar_type(), name, " must have dtype ", m.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  if (per_head) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == m.size(0) && t.size(1) == len, name,
                " must have shape (", m.size(0), ", ", len, "), got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == len, name, " must have shape (", len, "), got ",
                t.sizes());
  }
}

// Every pass takes `threads`: at most that many worker threads (0: all of torch's).
inline void check_threads(int64_t threads) {
  TORCH_CHECK(threads >= 0, "threads must be >= 0 (0 uses all of torch's intra-op threads), got ", threads);
}

inline void check_omega(double omega) {
  TORCH_CHECK(omega >= 1.0 && omega < 2.0, "omega (the over-relaxation factor) must be in [1, 2), got ", omega);
}

// `when` completes the message: "" for prepare, " when shift is given" for the score mode of the passes.
inline void check_lamb(double lamb, const char* when = "") {
  TORCH_CHECK(std::isfinite(lamb) && lamb > 0, "lamb must be a positive finite number", when, ", got ", lamb);
}

// Score mode of the passes: with `shift` (H, N) (the row max `prepare` returned), the matrix
// argument holds the raw scores and each kernel row is recomputed from them inside the pass
// with the same lamb and probs.
inline void check_shift(const c10::optional<at::Tensor>& shift, const at::Tensor& m, double lamb) {
  if (!shift.has_value()) return;
  check_vector(*shift, m, m.size(1), "shift");
  check_lamb(lamb, " when shift is given");
}

// Absorbed column potentials of `prepare`: (H, K), finite.
inline void check_col_pot(const c10::optional<at::Tensor>& col_pot, const at::Tensor& scores) {
  if (!col_pot.has_value()) return;
  check_vector(*col_pot, scores, scores.size(2), "col_pot");
  TORCH_CHECK(at::isfinite(*col_pot).all().item<bool>(), "col_pot must be finite");
}

// The operands of one fused iteration (scaling_pass: M, a, u, v; log_pass: L, log_a, f, g):
// the matrix (H, N, K), the row marginal (N), the row duals (H, N) it updates in place and
// the column duals (H, K).
inline void check_pass(const at::Tensor& mat, const char* mat_name, const at::Tensor& marginal,
                       const char* marginal_name, const at::Tensor& row_dual, const char* row_name,
                       const at::Tensor& col_dual, const char* col_name, const c10::optional<at::Tensor>& shift,
                       double lamb, int64_t threads, double omega) {
  check_contiguous_matrix(mat, mat_name);
  check_vector(marginal, mat, mat.size(1), marginal_name, /*per_head=*/false);
  check_vector(row_dual, mat, mat.size(1), row_name);
  check_vector(col_dual, mat, mat.size(2), col_name);
  check_shift(shift, mat, lamb);
  check_threads(threads);
  check_omega(omega);
}

inline void check_row_offset(int64_t row_offset) {
  TORCH_CHECK(row_offset >= 0, "row_offset must be >= 0, got ", row_offset);
}

}  // namespace selflabel
