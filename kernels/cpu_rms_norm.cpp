// CPU RMSNorm in one pass over each row (built and dispatched by cpu_rms_norm.py).
//
// Semantics (the torch reference in cpu_rms_norm.py, HF's Llama and Gemma norms):
//   n = x * rsqrt(mean(x^2) + eps), in fp32;
//   Llama:  out = w * dtype(n)        (the product rounded to x's dtype, as torch's mul)
//   Gemma:  out = dtype(n * (1 + w))  (unit_offset: checkpoints store w - 1)
// torch runs this as five ops, two of them dtype copies of the whole activation; here each
// row is read once for its sum of squares and once for the output, rows split over the
// threads. The sum's order differs from torch's, so fp32 results agree to rounding.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cmath>

#include "cpu_bf16.h"
#include <cstring>
#include <vector>

namespace {

using namespace loraserve_cpu;

template <typename T>
void norm_rows(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, double eps, bool unit_offset) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float feps = static_cast<float>(eps);
  std::vector<float> wf(n);                 // the weight as the product reads it
  for (int64_t i = 0; i < n; ++i) wf[i] = to_float(wp[i]) + (unit_offset ? 1.f : 0.f);
  const float* wfp = wf.data();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * n;
      T* orow = op + r * n;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += to_float(xr[i]) * to_float(xr[i]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + feps);
      if (unit_offset) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) store(orow + i, to_float(xr[i]) * inv * wfp[i]);
      } else {  // Llama: the norm is rounded to T before w multiplies
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) store(orow + i, round_as(to_float(xr[i]) * inv, T{}) * wfp[i]);
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool unit_offset) {
  RECORD_FUNCTION("loraserve::rms_norm_cpu", std::vector<c10::IValue>{});
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight share a dtype");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "weight is [hidden]");
  at::Tensor rows = x.reshape({-1, n}).contiguous();
  at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(rows);
  if (x.scalar_type() == at::kFloat) {
    norm_rows<float>(rows, w, out, eps, unit_offset);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "fp32 or bf16");
    norm_rows<at::BFloat16>(rows, w, out, eps, unit_offset);
  }
  return out.view(x.sizes());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (CPU)"); }
