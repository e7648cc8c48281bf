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
// at::parallel_for. The inner loops use GCC vector types (-march=native picks the ISA):
// rows padded to whole 16-float vectors, a template per vector count so the dot products
// and the P @ V accumulators unroll into registers, and a polynomial exp over a chunk's
// scores (scalar expf cost more than the dot products).

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

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int kChunk = 32;       // key positions per online-softmax step
constexpr int kTileTokens = 16;  // new tokens per prefill work item

struct Tile {
  int64_t seq;        // sequence index (row of block_tables)
  int64_t q_row;      // first token row in q
  int64_t n_tok;      // tokens in the tile
  int64_t first_pos;  // absolute position of its first token
};

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vf_u __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int L = 16;  // fp32 lanes per vector

inline vf ld(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void st(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline vf splat(float a) { return vf{} + a; }

inline float hsum(vf v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s = 0.f;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
#endif
}

inline float hmax(vf v) {
#ifdef __AVX512F__
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#else
  float s = v[0];
  for (int i = 1; i < L; ++i) s = std::max(s, v[i]);
  return s;
#endif
}

// e^x for x <= 0 (Cephes expf polynomial, relative error ~2e-7); -inf and x < -87 give 0
inline vf vexp(vf x) {
  const vf floor_x = splat(-87.3f);
  const vi tiny = x < floor_x;
  x = tiny ? floor_x : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504f + magic) - magic;
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  p = p * reinterpret_cast<const vf&>(bits);
  return tiny ? splat(0.f) : p;
}

// One K/V row widened into NV fp32 vectors, zeros past D.
template <int NV>
inline void widen(const float* src, float* dst, int64_t D) {
  std::memcpy(dst, src, D * sizeof(float));
  std::fill(dst + D, dst + NV * L, 0.f);
}

template <int NV>
inline void widen(const at::BFloat16* src, float* dst, int64_t D) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
  std::fill(dst + D, dst + NV * L, 0.f);
}

inline void narrow(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void narrow(const float* src, at::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);  // round to nearest even
}

template <int NV>
inline float dot(const float* a, const float* b) {
  vf s = ld(a) * ld(b);
  for (int v = 1; v < NV; ++v) s += ld(a + v * L) * ld(b + v * L);
  return hsum(s);
}

static_assert(kChunk == 2 * L, "a chunk's scores are two vectors");

// Ask for one K/V row's cache lines ahead of use. Decode is bound by memory latency, not
// bandwidth, without it: each work item walks blocks scattered over a pool far larger
// than the caches, and two threads alone keep too few loads in flight.
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, 1);
}

template <typename T, int NV>
void attend(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const std::vector<Tile>& tiles, const std::vector<int64_t>& ctx_lens,
            double scale, int64_t window, double softcap) {
  constexpr int64_t Dp = NV * L;  // head_dim padded to whole vectors
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
  vi iota;
  for (int i = 0; i < L; ++i) iota[i] = i;

  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(max_rows * Dp), acc(max_rows * Dp), kf(kChunk * Dp), vf_(kChunk * Dp);
    std::vector<float> s(max_rows * kChunk), m(max_rows), l(max_rows);
    std::vector<const T*> vrow(kChunk);
    for (int64_t item = begin; item < end; ++item) {
      const Tile& tile = tiles[item / H_kv];
      const int64_t h_kv = item % H_kv, rows = tile.n_tok * G;
      const int64_t ctx = ctx_lens[tile.seq];
      const int64_t* table = btp + tile.seq * bt_st;
      for (int64_t r = 0; r < rows; ++r) {  // row r = token r / G, head h_kv * G + r % G
        const T* src = qp + (tile.q_row + r / G) * q_st + (h_kv * G + r % G) * q_sh;
        widen<NV>(src, &qf[r * Dp], D);
        for (int64_t d = 0; d < D; ++d) qf[r * Dp + d] *= fscale;
        std::fill(&acc[r * Dp], &acc[r * Dp] + Dp, 0.f);
        m[r] = neg_inf;
        l[r] = 0.f;
      }
      // keys any row of the tile may see: [lo, hi)
      const int64_t last_pos = tile.first_pos + tile.n_tok - 1;
      const int64_t hi = std::min(last_pos + 1, ctx);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, tile.first_pos - window + 1) : 0;
      for (int64_t c0 = lo; c0 < hi; c0 += kChunk) {
        const int64_t n = std::min<int64_t>(kChunk, hi - c0);
        if (c0 + kChunk < hi) {  // the next chunk's rows: blocks are scattered, so start their loads now
          const int64_t n_next = std::min<int64_t>(kChunk, hi - c0 - kChunk);
          for (int64_t j = 0; j < n_next; ++j) {
            const int64_t pos = c0 + kChunk + j, block = table[pos / bs], off = pos % bs;
            prefetch_row(kp + block * kb + off * kt + h_kv * kh, D);
            prefetch_row(vp + block * vb + off * vt + h_kv * vh, D);
          }
        } else if (item + 1 < end) {  // the last chunk: the next item's first rows
          const Tile& next = tiles[(item + 1) / H_kv];
          const int64_t nh = (item + 1) % H_kv, n_hi = std::min(next.first_pos + next.n_tok, ctx_lens[next.seq]);
          const int64_t n_lo = window > 0 ? std::max<int64_t>(0, next.first_pos - window + 1) : 0;
          const int64_t* n_table = btp + next.seq * bt_st;
          for (int64_t pos = n_lo; pos < std::min(n_lo + kChunk, n_hi); ++pos) {
            const int64_t block = n_table[pos / bs], off = pos % bs;
            prefetch_row(kp + block * kb + off * kt + nh * kh, D);
            prefetch_row(vp + block * vb + off * vt + nh * vh, D);
          }
        }
        for (int64_t j = 0; j < n; ++j) {
          const int64_t pos = c0 + j, block = table[pos / bs], off = pos % bs;
          widen<NV>(kp + block * kb + off * kt + h_kv * kh, &kf[j * Dp], D);
          vrow[j] = vp + block * vb + off * vt + h_kv * vh;
        }
        // scores, masks and the online-softmax step, row by row
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t p = tile.first_pos + r / G;
          float* sr = &s[r * kChunk];
          for (int64_t j = 0; j < n; ++j) sr[j] = dot<NV>(&qf[r * Dp], &kf[j * Dp]);
          for (int64_t j = n; j < kChunk; ++j) sr[j] = neg_inf;
          if (cap > 0)
            for (int64_t j = 0; j < n; ++j) sr[j] = cap * std::tanh(sr[j] * inv_cap);
          vf s0 = ld(sr), s1 = ld(sr + L);
          if (c0 + n - 1 > p || (window > 0 && c0 <= p - window)) {  // the chunk crosses a mask edge
            const vi pos0 = iota + static_cast<int32_t>(c0), pos1 = pos0 + L;
            const int32_t p32 = static_cast<int32_t>(p);
            const int32_t first = window > 0 ? static_cast<int32_t>(p - window + 1) : INT32_MIN;
            const vf ninf = splat(neg_inf);
            s0 = (pos0 > p32) | (pos0 < first) ? ninf : s0;
            s1 = (pos1 > p32) | (pos1 < first) ? ninf : s1;
          }
          const float m_chunk = hmax(s0 > s1 ? s0 : s1);
          if (m_chunk == neg_inf) {  // nothing visible in this chunk for this row
            st(sr, splat(0.f));
            st(sr + L, splat(0.f));
            continue;
          }
          const float m_new = std::max(m[r], m_chunk);
          const float alpha = std::exp(m[r] - m_new);  // 0 on the first visible chunk
          const vf p0 = vexp(s0 - m_new), p1 = vexp(s1 - m_new);
          st(sr, p0);
          st(sr + L, p1);
          l[r] = l[r] * alpha + hsum(p0 + p1);
          m[r] = m_new;
          if (alpha != 1.f) {
            float* a = &acc[r * Dp];
            for (int v = 0; v < NV; ++v) st(a + v * L, ld(a + v * L) * alpha);
          }
        }
        for (int64_t j = 0; j < n; ++j) widen<NV>(vrow[j], &vf_[j * Dp], D);
        for (int64_t r = 0; r < rows; ++r) {
          const float* sr = &s[r * kChunk];
          float* a = &acc[r * Dp];
          vf reg[NV];
          for (int v = 0; v < NV; ++v) reg[v] = ld(a + v * L);
          for (int64_t j = 0; j < n; ++j) {
            const float pj = sr[j];
            const float* vj = &vf_[j * Dp];
            for (int v = 0; v < NV; ++v) reg[v] += pj * ld(vj + v * L);
          }
          for (int v = 0; v < NV; ++v) st(a + v * L, reg[v]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = l[r] > 0 ? 1.f / l[r] : 0.f;  // no visible key (context 0): zeros
        float* a = &acc[r * Dp];
        for (int64_t d = 0; d < D; ++d) a[d] *= inv;
        narrow(a, op + (tile.q_row + r / G) * o_st + (h_kv * G + r % G) * o_sh, D);
      }
    }
  });
}

template <typename T>
void attend_dispatch(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const std::vector<Tile>& tiles,
                     const std::vector<int64_t>& ctx_lens, double scale, int64_t window, double softcap) {
  const int64_t nv = (q.size(2) + L - 1) / L;  // vectors per row, rounded up to an instantiated count
  if (nv <= 1) attend<T, 1>(out, q, k_cache, v_cache, block_tables, tiles, ctx_lens, scale, window, softcap);
  else if (nv <= 2) attend<T, 2>(out, q, k_cache, v_cache, block_tables, tiles, ctx_lens, scale, window, softcap);
  else if (nv <= 3) attend<T, 3>(out, q, k_cache, v_cache, block_tables, tiles, ctx_lens, scale, window, softcap);
  else if (nv <= 4) attend<T, 4>(out, q, k_cache, v_cache, block_tables, tiles, ctx_lens, scale, window, softcap);
  else if (nv <= 8) attend<T, 8>(out, q, k_cache, v_cache, block_tables, tiles, ctx_lens, scale, window, softcap);
  else if (nv <= 16) attend<T, 16>(out, q, k_cache, v_cache, block_tables, tiles, ctx_lens, scale, window, softcap);
  else TORCH_CHECK(false, "head_dim up to 256");
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
    attend_dispatch<float>(out, q, k_cache, v_cache, block_tables, tiles, ctx_lens, scale, window, softcap);
  else
    attend_dispatch<at::BFloat16>(out, q, k_cache, v_cache, block_tables, tiles, ctx_lens, scale, window, softcap);
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

// The new tokens' K and V rows into their cache slots (slot = block * block_size + offset),
// one copy per (token, kv head): the write torch does as two index_copy_ calls.
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  RECORD_FUNCTION("loraserve::store_kv_cpu", std::vector<c10::IValue>{});
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "k and v [tokens, H_kv, D] with head_dim contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1 && k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2),
              "caches [num_blocks, block_size, H_kv, D] matching k and v");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k.scalar_type() &&
                  v_cache.scalar_type() == k.scalar_type(), "k, v and caches differ in dtype");
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2), bs = k_cache.size(1);
  at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == T, "one slot per token");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * bs;
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(0 <= sp[t] && sp[t] < num_slots, "slot ", sp[t], " outside the cache");
  const int64_t item = k.element_size();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = sp[t] / bs, off = sp[t] % bs;
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(kc + (block * k_cache.stride(0) + off * k_cache.stride(1) + h * k_cache.stride(2)) * item,
                    kp + (t * k.stride(0) + h * k.stride(1)) * item, D * item);
        std::memcpy(vc + (block * v_cache.stride(0) + off * v_cache.stride(1) + h * v_cache.stride(2)) * item,
                    vp + (t * v.stride(0) + h * v.stride(1)) * item, D * item);
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "paged attention, one query per sequence (CPU)");
  m.def("prefill", &prefill, "paged attention, new tokens over a cached prefix (CPU)");
  m.def("store_kv", &store_kv, "new K/V rows into their cache slots (CPU)");
}
