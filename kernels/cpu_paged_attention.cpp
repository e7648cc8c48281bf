// CPU paged attention: decode and prefill over a cached prefix, reading K/V blocks in
// place through the block tables (built and dispatched by cpu_paged_attention.py).
//
// Semantics: out[t, h] = softmax(cap(q[t, h] K^T * scale) + mask) V over t's sequence,
// K, V of kv head h / G, cap(s) = softcap * tanh(s / softcap) (softcap > 0), and key k
// allowed for a query at absolute position p when p - window < k <= p (window <= 0: all).
//
// Work item = (query tile, kv head): up to kTileTokens new tokens of one sequence times the
// G query heads sharing that kv head (rows = tokens x G). Each key/value row is read once
// per item, widened to fp32 once, and used by every row (GQA). Keys go in chunks of kChunk
// positions (any block size: a chunk may span blocks); an online softmax rescales the
// fp32 accumulators once per chunk. Items are split over the threads with
// at::parallel_for. Dot products are plain loops vectorised by -O3 -march=native
// (omp simd reductions).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kChunk = 32;       // key positions per online-softmax step
constexpr int kTileTokens = 16;  // new tokens per prefill work item

struct Tile {
  int64_t seq;        // sequence index (row of block_tables)
  int64_t q_row;      // first token row in q
  int64_t n_tok;      // tokens in the tile
  int64_t first_pos;  // absolute position of its first token
};

inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void widen(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

inline void narrow(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void narrow(const float* src, at::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);  // round to nearest even
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* acc, float p, const float* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += p * v[i];
}

template <typename T>
void attend(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const std::vector<Tile>& tiles, const std::vector<int64_t>& ctx_lens,
            double scale, int64_t window, double softcap) {
  const int64_t H = q.size(1), D = q.size(2), H_kv = k_cache.size(2), G = H / H_kv;
  const int64_t bs = k_cache.size(1);
  const int64_t q_st = q.stride(0), q_sh = q.stride(1), o_st = out.stride(0), o_sh = out.stride(1);
  const int64_t kb = k_cache.stride(0), kt = k_cache.stride(1), kh = k_cache.stride(2);
  const int64_t vb = v_cache.stride(0), vt = v_cache.stride(1), vh = v_cache.stride(2);
  const int64_t bt_st = block_tables.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* btp = block_tables.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const float inv_cap = cap > 0 ? 1.f / cap : 0.f, neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t n_items = static_cast<int64_t>(tiles.size()) * H_kv;
  const int64_t max_rows = kTileTokens * G;

  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(max_rows * D), acc(max_rows * D), kf(kChunk * D), vf(kChunk * D);
    std::vector<float> s(max_rows * kChunk), m(max_rows), l(max_rows);
    std::vector<const T*> krow(kChunk), vrow(kChunk);
    for (int64_t item = begin; item < end; ++item) {
      const Tile& tile = tiles[item / H_kv];
      const int64_t h_kv = item % H_kv, rows = tile.n_tok * G;
      const int64_t ctx = ctx_lens[tile.seq];
      const int64_t* table = btp + tile.seq * bt_st;
      for (int64_t r = 0; r < rows; ++r) {  // row r = token r / G, head h_kv * G + r % G
        const T* src = qp + (tile.q_row + r / G) * q_st + (h_kv * G + r % G) * q_sh;
        widen(src, &qf[r * D], D);
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] *= fscale;
        std::fill(&acc[r * D], &acc[r * D] + D, 0.f);
        m[r] = neg_inf;
        l[r] = 0.f;
      }
      // keys any row of the tile may see: [lo, hi)
      const int64_t last_pos = tile.first_pos + tile.n_tok - 1;
      const int64_t hi = std::min(last_pos + 1, ctx);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, tile.first_pos - window + 1) : 0;
      for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
        const int64_t n = std::min<int64_t>(kChunk, hi - c0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t pos = c0 + j, block = table[pos / bs], off = pos % bs;
          krow[j] = kp + block * kb + off * kt + h_kv * kh;
          vrow[j] = vp + block * vb + off * vt + h_kv * vh;
          widen(krow[j], &kf[j * D], D);
        }
        // scores, masks and the online-softmax step, row by row
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t p = tile.first_pos + r / G;
          float* sr = &s[r * kChunk];
          float m_chunk = neg_inf;
          for (int64_t j = 0; j < n; ++j) {
            const int64_t pos = c0 + j;
            float x = dot(&qf[r * D], &kf[j * D], D);
            if (cap > 0) x = cap * std::tanh(x * inv_cap);
            if (pos > p || (window > 0 && pos <= p - window)) x = neg_inf;
            sr[j] = x;
            m_chunk = std::max(m_chunk, x);
          }
          if (m_chunk == neg_inf) {  // nothing visible in this chunk for this row
            for (int64_t j = 0; j < n; ++j) sr[j] = 0.f;
            continue;
          }
          const float m_new = std::max(m[r], m_chunk);
          const float alpha = std::exp(m[r] - m_new);  // 0 on the first visible chunk
          float sum = 0.f;
          for (int64_t j = 0; j < n; ++j) {
            sr[j] = std::exp(sr[j] - m_new);
            sum += sr[j];
          }
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != 1.f) {
            float* a = &acc[r * D];
            for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          }
        }
        for (int64_t j = 0; j < n; ++j) widen(vrow[j], &vf[j * D], D);
        for (int64_t r = 0; r < rows; ++r) {
          const float* sr = &s[r * kChunk];
          float* a = &acc[r * D];
          for (int64_t j = 0; j < n; ++j)
            if (sr[j] != 0.f) axpy(a, sr[j], &vf[j * D], D);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = l[r] > 0 ? 1.f / l[r] : 0.f;  // no visible key (context 0): zeros
        float* a = &acc[r * D];
        for (int64_t d = 0; d < D; ++d) a[d] *= inv;
        narrow(a, op + (tile.q_row + r / G) * o_st + (h_kv * G + r % G) * o_sh, D);
      }
    }
  });
}

void check(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q [tokens, H, D] with head_dim contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "caches [num_blocks, block_size, H_kv, D] with head_dim contiguous");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache differ in shape");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and caches differ in dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "fp32 or bf16 only");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "head shapes do not match");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong && block_tables.stride(1) == 1,
              "block_tables [N, max_blocks] int64");
}

at::Tensor run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& block_tables, const std::vector<Tile>& tiles, const std::vector<int64_t>& ctx_lens,
               double scale, int64_t window, double softcap) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (tiles.empty()) return out;
  if (q.scalar_type() == at::kFloat)
    attend<float>(out, q, k_cache, v_cache, block_tables, tiles, ctx_lens, scale, window, softcap);
  else
    attend<at::BFloat16>(out, q, k_cache, v_cache, block_tables, tiles, ctx_lens, scale, window, softcap);
  return out;
}

at::Tensor decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, int64_t window,
                  double softcap) {
  RECORD_FUNCTION("loraserve::paged_attention_decode_cpu", std::vector<c10::IValue>{});
  check(q, k_cache, v_cache, block_tables);
  const int64_t B = q.size(0);
  TORCH_CHECK(context_lens.numel() == B && block_tables.size(0) >= B, "one context length and table per query");
  at::Tensor lens = context_lens.to(at::kLong).contiguous();
  std::vector<int64_t> ctx(lens.data_ptr<int64_t>(), lens.data_ptr<int64_t>() + B);
  std::vector<Tile> tiles;
  tiles.reserve(B);
  for (int64_t b = 0; b < B; ++b)
    if (ctx[b] > 0) tiles.push_back({b, b, 1, ctx[b] - 1});
  at::Tensor out = run(q, k_cache, v_cache, block_tables, tiles, ctx, scale, window, softcap);
  for (int64_t b = 0; b < B; ++b)
    if (ctx[b] <= 0) out[b].zero_();
  return out;
}

at::Tensor prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const std::vector<int64_t>& query_lens,
                   const std::vector<int64_t>& context_lens, double scale, int64_t window, double softcap) {
  RECORD_FUNCTION("loraserve::paged_attention_prefill_cpu", std::vector<c10::IValue>{});
  check(q, k_cache, v_cache, block_tables);
  TORCH_CHECK(query_lens.size() == context_lens.size() &&
                  static_cast<int64_t>(query_lens.size()) <= block_tables.size(0),
              "one query length, context length and table per sequence");
  std::vector<Tile> tiles;
  int64_t row = 0;
  for (size_t i = 0; i < query_lens.size(); ++i) {
    const int64_t q_len = query_lens[i], ctx = context_lens[i];
    TORCH_CHECK(0 < q_len && q_len <= ctx, "need 0 < query_len <= context_len");
    for (int64_t t = 0; t < q_len; t += kTileTokens)
      tiles.push_back({static_cast<int64_t>(i), row + t, std::min<int64_t>(kTileTokens, q_len - t), ctx - q_len + t});
    row += q_len;
  }
  TORCH_CHECK(row == q.size(0), "q holds sum(query_lens) tokens");
  return run(q, k_cache, v_cache, block_tables, tiles, context_lens, scale, window, softcap);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "paged attention, one query per sequence (CPU)");
  m.def("prefill", &prefill, "paged attention, new tokens over a cached prefix (CPU)");
}
