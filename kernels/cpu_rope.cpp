// CPU rotary embedding in one pass over q and k (built and dispatched by cpu_rope.py,
// beside its torch reference):
//
//   rotate(x, cos, sin) = x * cos + rotate_half(x) * sin on the first R dims (HF's
//   convention), each product and the sum rounded to x's dtype as torch's ops round
//   them, so bit for bit the reference; dims past R pass through.
//
// Built with -ffp-contract=off: a fused multiply-add would round differently from
// torch's separate mul and add. torch runs the rotation as five ops (slices, neg, cat,
// two muls, an add), each writing a whole activation.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <cmath>

#include "cpu_bf16.h"

namespace {

using namespace loraserve_cpu;

template <typename T>
void rotate_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t T_ = x.size(0), H = x.size(1), D = x.size(2), R = cos.size(-1), half = R / 2;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, T_, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cp + t * R;
      const T* s = sp + t * R;
      for (int64_t h = 0; h < H; ++h) {
        const T* xr = xp + t * xs0 + h * xs1;
        T* o = op + (t * H + h) * D;
#pragma omp simd
        for (int64_t d = 0; d < half; ++d)
          store(o + d, round_as(to_float(xr[d]) * to_float(c[d]), T{}) +
                           round_as(-to_float(xr[d + half]) * to_float(s[d]), T{}));
#pragma omp simd
        for (int64_t d = half; d < R; ++d)
          store(o + d, round_as(to_float(xr[d]) * to_float(c[d]), T{}) +
                           round_as(to_float(xr[d - half]) * to_float(s[d]), T{}));
        for (int64_t d = R; d < D; ++d) o[d] = xr[d];
      }
    }
  });
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  RECORD_FUNCTION("loraserve::rotate_cpu", std::vector<c10::IValue>{});
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x is [T, heads, D] with D contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == sin.numel() && cos.size(0) == x.size(0) &&
                  cos.numel() == x.size(0) * cos.size(-1) && cos.size(-1) % 2 == 0 && cos.size(-1) <= x.size(2),
              "cos and sin are [T, 1, R], contiguous, R even and <= D");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && x.scalar_type() == sin.scalar_type(), "one dtype");
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    rotate_rows<float>(x, cos, sin, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "fp32 or bf16");
    rotate_rows<at::BFloat16>(x, cos, sin, out);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotate", &rotate, "rotary embedding, HF's rotate_half convention (CPU)");
}
