// CPU SGMV: every token gets its own adapter's LoRA delta, one pass over each adapter's
// weights per block of tokens that share it (built and dispatched by sgmv_cpu.py).
//
// Semantics: y[t, off_p : off_p + out_p] += (x[t] @ A[slot[t], :, :rank, p]) @ B_p[slot[t], :rank]
//
// A decode step has a few tokens per adapter, so the work is bandwidth-bound: each block
// of up to kBlockM tokens streams its adapter's A once for the shrink (v = x @ A, fp32
// accumulation in registers, MT tokens x NV vectors) and each B_p once for the expand
// (y += v @ B_p). Blocks are independent (a token is in one block), so threads split the
// blocks by weight bytes, and v never leaves the thread. Segments longer than
// `max_seg_len` (prefill chunks) go to ATen's matmul instead, where blocked GEMM wins.
// Portable C++ with GCC vector types: -march=native picks the vector ISA; on AVX-512 the
// tail of a row (ranks that are not a multiple of 16 columns) is a masked load.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SGMV_AVX512 1
#endif

namespace {

constexpr int L = 16;        // fp32 lanes per vector
constexpr int MT = 4;        // tokens per register tile
constexpr int kMaxNV = 4;    // vectors per register tile: MT * kMaxNV fp32 accumulators
constexpr int kBlockM = 16;  // tokens per work item

typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef float vf_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint16_t vh_u __attribute__((vector_size(32), aligned(2), may_alias));

using bf16 = at::BFloat16;

inline vf widen(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }

inline vf load(const float* p) { return *(const vf_u*)p; }
inline vf load(const bf16* p) { return widen(*(const vh_u*)p); }

// the first n < L lanes, zeros after
inline vf load_n(const float* p, int n) {
#ifdef SGMV_AVX512
  return (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
#else
  vf v = {};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

inline vf load_n(const bf16* p, int n) {
#ifdef SGMV_AVX512
  return widen((vh)_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
#else
  vh h = {};
  for (int i = 0; i < n; ++i) h[i] = ((const uint16_t*)p)[i];
  return widen(h);
#endif
}

inline vf load_any(const float* p, int n) { return n == L ? load(p) : load_n(p, n); }
inline vf load_any(const bf16* p, int n) { return n == L ? load(p) : load_n(p, n); }

// p[:n] += acc[:n], rounded once to p's dtype (round to nearest even, as c10 does)
inline void add_to(float* p, vf acc, int n) {
  vf s = load_any(p, n) + acc;
  if (n == L) {
    *(vf_u*)p = s;
  } else {
    for (int i = 0; i < n; ++i) p[i] = s[i];
  }
}

inline void add_to(bf16* p, vf acc, int n) {
  vf s = load_any(p, n) + acc;
  vu u = (vu)s;
  vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  vu nan = (vu)(s != s);
  r = (r & ~nan) | (nan & 0x7FC0u);
  vh h = __builtin_convertvector(r, vh);
  if (n == L) {
    *(vh_u*)p = h;
  } else {
    for (int i = 0; i < n; ++i) ((uint16_t*)p)[i] = h[i];
  }
}

// v[m, :NV*L] = sum_k xs[m, k] * a[k, :NV*L]; the last vector holds `last` columns.
// xs [MT, K] fp32, a rows `lda` apart, v [MT, ldv] fp32.
template <typename T, int NV>
void shrink_tile(const float* xs, const T* a, int64_t lda, int64_t K, int last, float* v, int64_t ldv) {
  vf acc[MT][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    const T* row = a + k * lda;
    vf b[NV];
    for (int j = 0; j < NV - 1; ++j) b[j] = load(row + j * L);
    b[NV - 1] = load_any(row + (NV - 1) * L, last);
    for (int m = 0; m < MT; ++m) {
      const float xm = xs[m * K + k];
      for (int j = 0; j < NV; ++j) acc[m][j] += xm * b[j];
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NV; ++j) *(vf_u*)(v + m * ldv + j * L) = acc[m][j];
}

// y_m[:NV*L] += sum_{k < rank} v[m, k * n_proj + p] * b[k, :NV*L] for the tile's real tokens
template <typename T, int NV>
void expand_tile(const float* v, int64_t ldv, int n_proj, int p, const T* b, int64_t ldb, int rank,
                 int last, T* const* y_rows, int mt) {
  vf acc[MT][NV] = {};
  for (int k = 0; k < rank; ++k) {
    const T* row = b + k * ldb;
    // the rows of a chunk are ldb apart, too many streams for the hardware prefetcher:
    // fetch this row's part of the chunk after next (measured best of 1-8 chunks ahead)
    const char* ahead = (const char*)(row + 2 * kMaxNV * L);
    for (int i = 0; i < (int)(kMaxNV * L * sizeof(T)); i += 64) __builtin_prefetch(ahead + i);
    vf w[NV];
    for (int j = 0; j < NV - 1; ++j) w[j] = load(row + j * L);
    w[NV - 1] = load_any(row + (NV - 1) * L, last);
    for (int m = 0; m < MT; ++m) {
      const float vm = v[m * ldv + k * n_proj + p];
      for (int j = 0; j < NV; ++j) acc[m][j] += vm * w[j];
    }
  }
  for (int m = 0; m < mt; ++m)
    for (int j = 0; j < NV; ++j) add_to(y_rows[m] + j * L, acc[m][j], j == NV - 1 ? last : L);
}

// Column chunks of kMaxNV vectors, the last one narrower: calls tile<NV>(c0, nv, last).
template <typename F>
void for_column_chunks(int64_t cols, F&& tile) {
  for (int64_t c0 = 0; c0 < cols; c0 += kMaxNV * L) {
    const int w = (int)std::min<int64_t>(kMaxNV * L, cols - c0);
    const int nv = (w + L - 1) / L;
    tile(c0, nv, w - (nv - 1) * L);
  }
}

#define SGMV_DISPATCH_NV(nv, ...)                 \
  switch (nv) {                                   \
    case 1: { constexpr int NV = 1; __VA_ARGS__; break; } \
    case 2: { constexpr int NV = 2; __VA_ARGS__; break; } \
    case 3: { constexpr int NV = 3; __VA_ARGS__; break; } \
    default: { constexpr int NV = 4; __VA_ARGS__; break; } \
  }

struct Step {
  int64_t K, n_proj, lda, lda_slot, ldx, ldy;
  std::vector<int64_t> offs, outs, ldb_slot;
  const int64_t* tokens;
  const int32_t* slot_ranks;
};

struct Block {
  int64_t slot, rank, p0, p1;  // sorted positions [p0, p1) of one segment
};

template <typename T>
void run_block(const Step& s, const Block& blk, const T* x, const T* A, const std::vector<const T*>& Bs, T* y,
               std::vector<float>& xs, std::vector<float>& v) {
  const int64_t C = blk.rank * s.n_proj;          // this adapter's shrink columns
  const int64_t ldv = (C + L - 1) / L * L;
  xs.resize(MT * s.K);
  v.resize(MT * ldv);
  const T* a = A + blk.slot * s.lda_slot;
  for (int64_t m0 = blk.p0; m0 < blk.p1; m0 += MT) {
    const int mt = (int)std::min<int64_t>(MT, blk.p1 - m0);
    T* y_rows[MT];
    for (int m = 0; m < MT; ++m) {                // the tile's x rows in fp32; pad rows zero
      float* xm = xs.data() + m * s.K;
      if (m < mt) {
        const T* xr = x + s.tokens[m0 + m] * s.ldx;
        int64_t k = 0;
        for (; k + L <= s.K; k += L) *(vf_u*)(xm + k) = load(xr + k);
        for (; k < s.K; ++k) xm[k] = (float)xr[k];
        y_rows[m] = y + s.tokens[m0 + m] * s.ldy;
      } else {
        std::fill(xm, xm + s.K, 0.f);
        y_rows[m] = nullptr;
      }
    }
    for_column_chunks(C, [&](int64_t c0, int nv, int last) {
      SGMV_DISPATCH_NV(nv, shrink_tile<T, NV>(xs.data(), a + c0, s.lda, s.K, last, v.data() + c0, ldv));
    });
    for (int64_t p = 0; p < s.n_proj; ++p) {
      const T* b = Bs[p] + blk.slot * s.ldb_slot[p];
      for_column_chunks(s.outs[p], [&](int64_t c0, int nv, int last) {
        T* rows[MT];
        for (int m = 0; m < MT; ++m) rows[m] = y_rows[m] ? y_rows[m] + s.offs[p] + c0 : nullptr;
        SGMV_DISPATCH_NV(nv, expand_tile<T, NV>(v.data(), ldv, (int)s.n_proj, (int)p, b + c0, s.outs[p],
                                                (int)blk.rank, last, rows, mt));
      });
    }
  }
}

// One long segment through ATen (blocked GEMM): the same math, v rounded to x's dtype.
void run_long_segment(at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                      const std::vector<at::Tensor>& Bs, const Step& s, const at::Tensor& tokens,
                      const Block& blk) {
  const int64_t C = blk.rank * s.n_proj;
  auto idx = tokens.narrow(0, blk.p0, blk.p1 - blk.p0);
  auto a = A[blk.slot].view({s.K, -1}).narrow(1, 0, C);                  // [K, C]
  auto v = at::mm(x.index_select(0, idx), a).view({-1, blk.rank, s.n_proj});  // [M, rank, n_proj]
  for (int64_t p = 0; p < s.n_proj; ++p) {
    auto out = at::mm(v.select(2, p), Bs[p][blk.slot].narrow(0, 0, blk.rank));  // [M, out_p]
    y.narrow(1, s.offs[p], s.outs[p]).index_add_(0, idx, out);
  }
}

}  // namespace

// y [T, N] += LoRA delta, in place. tokens: LoRA tokens sorted by slot; segment i is
// tokens[seg_starts[i]:seg_starts[i+1]] with slot seg_slots[i] of rank slot_ranks[slot].
void add_lora(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const std::vector<at::Tensor>& Bs,
              const std::vector<int64_t>& offs, const at::Tensor& tokens, const at::Tensor& seg_starts,
              const at::Tensor& seg_slots, const at::Tensor& slot_ranks, int64_t max_seg_len) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && A.dim() == 4, "y [T, N], x [T, in], A [L, in, r_max, n_proj]");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1 && A.is_contiguous(), "y and x rows, and A, must be dense");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && A.scalar_type() == y.scalar_type(), "one dtype for y, x, A, Bs");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK((int64_t)Bs.size() == A.size(3) && offs.size() == Bs.size(), "one B and one offset per projection");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && seg_starts.scalar_type() == at::kInt &&
              seg_slots.scalar_type() == at::kInt && slot_ranks.scalar_type() == at::kInt, "index dtypes");
  TORCH_CHECK(tokens.is_contiguous() && seg_starts.is_contiguous() && seg_slots.is_contiguous() &&
              slot_ranks.is_contiguous(), "index tensors must be contiguous");
  Step s;
  s.K = A.size(1);
  s.n_proj = A.size(3);
  s.lda = A.size(2) * s.n_proj;
  s.lda_slot = A.stride(0);
  s.ldx = x.stride(0);
  s.ldy = y.stride(0);
  s.tokens = tokens.data_ptr<int64_t>();
  s.slot_ranks = slot_ranks.data_ptr<int32_t>();
  TORCH_CHECK(x.size(1) == s.K, "x and A disagree on in_features");
  for (size_t p = 0; p < Bs.size(); ++p) {
    const auto& B = Bs[p];
    TORCH_CHECK(B.dim() == 3 && B.is_contiguous() && B.scalar_type() == y.scalar_type() &&
                B.size(0) == A.size(0) && B.size(1) == A.size(2), "B_p [L, r_max, out_p], dense, A's dtype");
    TORCH_CHECK(offs[p] >= 0 && offs[p] + B.size(2) <= y.size(1), "projection columns outside y");
    s.offs.push_back(offs[p]);
    s.outs.push_back(B.size(2));
    s.ldb_slot.push_back(B.stride(0));
  }

  // work: blocks of short segments for the threads, long segments for ATen
  const int32_t* starts = seg_starts.data_ptr<int32_t>();
  const int32_t* slots = seg_slots.data_ptr<int32_t>();
  std::vector<Block> blocks, long_segs;
  std::vector<double> cost{0.0};                  // prefix sums of the blocks' weight bytes
  const int64_t num_segs = seg_slots.numel();
  const int64_t out_total = std::accumulate(s.outs.begin(), s.outs.end(), int64_t{0});
  for (int64_t i = 0; i < num_segs; ++i) {
    const int64_t slot = slots[i], rank = s.slot_ranks[slots[i]];
    TORCH_CHECK(slot >= 0 && slot < A.size(0) && rank <= A.size(2), "segment slot or rank out of range");
    if (rank <= 0) continue;
    if (starts[i + 1] - starts[i] > max_seg_len) {
      long_segs.push_back({slot, rank, starts[i], starts[i + 1]});
      continue;
    }
    for (int64_t p0 = starts[i]; p0 < starts[i + 1]; p0 += kBlockM) {
      const int64_t p1 = std::min<int64_t>(p0 + kBlockM, starts[i + 1]);
      blocks.push_back({slot, rank, p0, p1});
      const double tiles = (double)((p1 - p0 + MT - 1) / MT);
      cost.push_back(cost.back() + (double)rank * (s.K * s.n_proj + out_total) * (1.0 + 0.25 * (tiles - 1)));
    }
  }
  for (const auto& blk : long_segs) run_long_segment(y, x, A, Bs, s, tokens, blk);
  if (blocks.empty()) return;

  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (int64_t)blocks.size());
  const double total = cost.back();
  auto work = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = (const T*)x.data_ptr();
    const T* ap = (const T*)A.data_ptr();
    T* yp = (T*)y.data_ptr();
    std::vector<const T*> bp;
    for (const auto& B : Bs) bp.push_back((const T*)B.data_ptr());
    // worker w takes the blocks whose middle byte falls in its 1/workers of the total
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      std::vector<float> xs, v;
      for (int64_t w = w0; w < w1; ++w)
        for (size_t i = 0; i < blocks.size(); ++i) {
          const double mid = 0.5 * (cost[i] + cost[i + 1]);
          if ((int64_t)(mid * workers / total) == w) run_block<T>(s, blocks[i], xp, ap, bp, yp, xs, v);
        }
    });
  };
  if (y.scalar_type() == at::kFloat) work(float{});
  else work(bf16{});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_lora", &add_lora, "y += LoRA delta over segments of tokens that share an adapter (in place)",
        py::call_guard<py::gil_scoped_release>());
}
