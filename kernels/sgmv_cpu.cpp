// CPU SGMV: every token gets its own adapter's LoRA delta, one pass over each adapter's
// weights per block of tokens that share it (built and dispatched by sgmv_cpu.py).
//
// Semantics: y[t, off_p : off_p + out_p] += (x[t] @ a_s[:, p::n_proj]) @ B_p[s, :rank]
// with s = slot[t] and a_s its packed A rows (kernels/sgmv.py: row_width(rank, n_proj)
// elements apart, the first rank * n_proj of them the adapter's)
//
// A decode step has a few tokens per adapter, so the work is bound by reading the
// weights: each block of up to kBlockM tokens streams its adapter's A once for the shrink
// (v = x @ A, fp32 accumulators in registers: MT tokens x kChunk columns) and each B_p once
// for the expand (y += v @ B_p, rounded once into y). Blocks are independent (a token is in
// one block), so the threads split them by weight bytes and v never leaves its thread.
// Software prefetches run ahead of both loops. Segments longer than `max_seg_len`
// (prefill chunks) go to ATen's matmul instead, where a blocked GEMM wins.
// Portable C++ with GCC vector types: -march=native picks the vector ISA; on AVX-512 the
// tail of a row (column counts that are not a multiple of the vector) is a masked load.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SGMV_AVX512 1
#endif

namespace {

constexpr int L = 16;        // fp32 lanes per vector
constexpr int MT = 4;        // tokens per register tile
constexpr int kChunk = 64;   // columns per register tile: MT x 64 fp32 accumulators
constexpr int kBlockM = 16;  // tokens per work item
constexpr int64_t kRowAlign = 8;  // packed rows of A: kernels/sgmv.py ROW_ALIGN

int64_t row_width(int64_t rank, int64_t n_proj) { return (rank * n_proj + kRowAlign - 1) / kRowAlign * kRowAlign; }
// Software prefetch distances (best of those tried on a decode step, Zen 5, 2 cores). A's
// rows run into the next adapter's slab, which the hardware prefetcher would not start on;
// a tile's B rows are ldb apart, more streams than the hardware prefetcher follows.
constexpr int64_t kShrinkAheadBytes = 8192;  // A rows this far ahead of the shrink (4-16 KB alike)
constexpr int kExpandAheadChunks = 2;        // each B row 2 column chunks ahead (1-8 tried)

typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef float vf_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint32_t vu_u __attribute__((vector_size(64), aligned(2), may_alias));
typedef uint16_t vh_u __attribute__((vector_size(32), aligned(2), may_alias));

using bf16 = at::BFloat16;

// A unit is one vector load of a weight row, W columns widened to NF fp32 vectors.
// fp32: 16 columns, one vector. bf16: 32 columns as 16 words of (even, odd) column pairs,
// split into a vector of the even and one of the odd columns by a shift and a mask
// (two operations for 32 columns); the accumulators keep that split, and it is undone
// once per tile, when v or y is written.
template <typename T>
struct Unit;

template <>
struct Unit<float> {
  static constexpr int W = 16, NF = 1;
  static inline void load(const float* p, int n, vf* out) {
    if (n == W) {
      out[0] = *(const vf_u*)p;
      return;
    }
#ifdef SGMV_AVX512
    out[0] = (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
#else
    out[0] = vf{};
    for (int i = 0; i < n; ++i) out[0][i] = p[i];
#endif
  }
  static inline void store_v(float* v, const vf* acc) { *(vf_u*)v = acc[0]; }
  static inline void add_to(float* p, const vf* acc, int n) {   // p[:n] += acc[:n]
    vf s;
    load(p, n, &s);
    s += acc[0];
    if (n == W) {
      *(vf_u*)p = s;
    } else {
      for (int i = 0; i < n; ++i) p[i] = s[i];
    }
  }
};

template <>
struct Unit<bf16> {
  static constexpr int W = 32, NF = 2;
  // the first n <= 32 columns as 16 words (zeros past n)
  static inline vu load_words(const bf16* p, int n) {
    if (n == W) return *(const vu_u*)p;
#ifdef SGMV_AVX512
    return (vu)_mm512_maskz_loadu_epi16((__mmask32)((1u << n) - 1), p);
#else
    vu u = {};
    uint16_t* h = (uint16_t*)&u;
    for (int i = 0; i < n; ++i) h[i] = ((const uint16_t*)p)[i];
    return u;
#endif
  }
  static inline void store_words(bf16* p, vu u, int n) {
    if (n == W) {
      *(vu_u*)p = u;
      return;
    }
#ifdef SGMV_AVX512
    _mm512_mask_storeu_epi16(p, (__mmask32)((1u << n) - 1), (__m512i)u);
#else
    for (int i = 0; i < n; ++i) ((uint16_t*)p)[i] = ((const uint16_t*)&u)[i];
#endif
  }
  static inline void load(const bf16* p, int n, vf* out) {
    const vu u = load_words(p, n);
    out[0] = (vf)(u << 16);              // even columns
    out[1] = (vf)(u & 0xFFFF0000u);      // odd columns
  }
  static inline void store_v(float* v, const vf* acc) {   // interleave back to column order
    const vi lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const vi hi = lo + 8;
    *(vf_u*)v = __builtin_shuffle(acc[0], acc[1], lo);
    *(vf_u*)(v + 16) = __builtin_shuffle(acc[0], acc[1], hi);
  }
  // fp32 -> bf16 in the high half of each word, round to nearest even (NaN stays NaN)
  static inline vu round_high(vf f) {
    const vu u = (vu)f;
    const vu r = u + 0x7FFFu + ((u >> 16) & 1u);
    const vu nan = (vu)(f != f);
    return (r & ~nan) | (nan & 0x7FC00000u);
  }
  static inline void add_to(bf16* p, const vf* acc, int n) {    // p[:n] += acc[:n], one rounding
    const vu u = load_words(p, n);
    const vf even = (vf)(u << 16) + acc[0], odd = (vf)(u & 0xFFFF0000u) + acc[1];
    store_words(p, (round_high(even) >> 16) | (round_high(odd) & 0xFFFF0000u), n);
  }
  // A half unit: n <= 16 columns widened in order into one vector (rows of 16 columns,
  // e.g. rank 16 of one projection, would waste half of a full unit's lanes).
  static inline void load_half(const bf16* p, int n, vf* out) {
    vh h;
#ifdef SGMV_AVX512
    h = n == L ? *(const vh_u*)p : (vh)_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
#else
    h = vh{};
    for (int i = 0; i < n; ++i) h[i] = ((const uint16_t*)p)[i];
#endif
    out[0] = (vf)(__builtin_convertvector(h, vu) << 16);
  }
  static inline void add_to_half(bf16* p, const vf* acc, int n) {
    vf s;
    load_half(p, n, &s);
    const vh h = __builtin_convertvector(round_high(s + acc[0]) >> 16, vh);
    if (n == L) {
      *(vh_u*)p = h;
    } else {
      for (int i = 0; i < n; ++i) ((uint16_t*)p)[i] = h[i];
    }
  }
};

// The last unit of a tile: a full unit, or (bf16, HALF) a half unit of <= 16 columns.
template <typename T, bool HALF>
struct Last {
  static constexpr int NF = HALF ? 1 : Unit<T>::NF;
  static inline void load(const T* p, int n, vf* out) {
    if constexpr (HALF) Unit<T>::load_half(p, n, out); else Unit<T>::load(p, n, out);
  }
  static inline void store_v(float* v, const vf* acc) {
    if constexpr (HALF) *(vf_u*)v = acc[0]; else Unit<T>::store_v(v, acc);
  }
  static inline void add_to(T* p, const vf* acc, int n) {
    if constexpr (HALF) Unit<T>::add_to_half(p, acc, n); else Unit<T>::add_to(p, acc, n);
  }
};

// int8 slots: a unit is 16 int8 codes widened in column order to one fp32 vector; the
// scale is applied to v between shrink and expand (slot_pool.LoRAGroup), so the tiles
// below are the fp32/bf16 ones with this load. A y row takes 16 columns at a time.
typedef int8_t vc __attribute__((vector_size(16)));
typedef int8_t vc_u __attribute__((vector_size(16), aligned(1), may_alias));

struct UnitI8 {
  static constexpr int W = 16, NF = 1;
  static inline void load(const int8_t* p, int n, vf* out) {
#ifdef SGMV_AVX512
    const __m128i c = n == W ? _mm_loadu_si128((const __m128i*)p) : _mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), p);
    out[0] = (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
#else
    vc c;
    if (n == W) {
      c = *(const vc_u*)p;
    } else {
      c = vc{};
      for (int i = 0; i < n; ++i) c[i] = p[i];
    }
    out[0] = __builtin_convertvector(c, vf);
#endif
  }
};

template <typename T>
inline void add16(T* p, const vf& acc, int n) {   // p[:n] += acc[:n], n <= 16, column order
  if constexpr (std::is_same_v<T, bf16>) Unit<bf16>::add_to_half(p, &acc, n); else Unit<float>::add_to(p, &acc, n);
}

#define SGMV_UNROLL _Pragma("GCC unroll 16")

// v[m, cols] = sum_k xs[m, k] * a[k, cols] over the tile's NU units (the last one holds
// `last` columns). xs [MT, K] fp32, a rows `lda` apart, v [MT, ldv] fp32. The loops over
// tokens and vectors unroll fully and `acc` is only read by value, so it stays in registers.
template <typename T, int NU, bool HALF>
void shrink_tile(const float* xs, const T* a, int64_t lda, int64_t K, int last, float* v, int64_t ldv) {
  using U = Unit<T>;
  using E = Last<T, HALF>;
  constexpr int NA = (NU - 1) * U::NF + E::NF;   // fp32 accumulators per token
  const int64_t ahead = std::max<int64_t>(1, kShrinkAheadBytes / (lda * (int64_t)sizeof(T))) * lda;
  vf acc[MT][NA] = {};
  for (int64_t k = 0; k < K; ++k) {
    const T* row = a + k * lda;
    const char* pa = (const char*)(row + ahead);
    SGMV_UNROLL for (int i = 0; i < (int)(NU * U::W * sizeof(T)); i += 64) __builtin_prefetch(pa + i);
    vf b[NA];
    SGMV_UNROLL for (int j = 0; j < NU - 1; ++j) U::load(row + j * U::W, U::W, b + j * U::NF);
    E::load(row + (NU - 1) * U::W, last, b + (NU - 1) * U::NF);
    SGMV_UNROLL for (int m = 0; m < MT; ++m) {
      const float xm = xs[m * K + k];
      SGMV_UNROLL for (int j = 0; j < NA; ++j) acc[m][j] += xm * b[j];
    }
  }
  SGMV_UNROLL for (int m = 0; m < MT; ++m) {
    vf out[NA];
    SGMV_UNROLL for (int j = 0; j < NA; ++j) out[j] = acc[m][j];
    SGMV_UNROLL for (int j = 0; j < NU - 1; ++j) U::store_v(v + m * ldv + j * U::W, out + j * U::NF);
    E::store_v(v + m * ldv + (NU - 1) * U::W, out + (NU - 1) * U::NF);
  }
}

// y_m[cols] += sum_{k < rank} v[m, k * n_proj + p] * b[k, cols] for the tile's real tokens
template <typename T, int NU, bool HALF>
void expand_tile(const float* v, int64_t ldv, int n_proj, int p, const T* b, int64_t ldb, int rank,
                 int last, T* const* y_rows, int mt) {
  using U = Unit<T>;
  using E = Last<T, HALF>;
  constexpr int NA = (NU - 1) * U::NF + E::NF;
  vf acc[MT][NA] = {};
  for (int k = 0; k < rank; ++k) {
    const T* row = b + k * ldb;
    const char* pb = (const char*)(row + kExpandAheadChunks * kChunk);
    SGMV_UNROLL for (int i = 0; i < (int)(kChunk * sizeof(T)); i += 64) __builtin_prefetch(pb + i);
    vf w[NA];
    SGMV_UNROLL for (int j = 0; j < NU - 1; ++j) U::load(row + j * U::W, U::W, w + j * U::NF);
    E::load(row + (NU - 1) * U::W, last, w + (NU - 1) * U::NF);
    SGMV_UNROLL for (int m = 0; m < MT; ++m) {
      const float vm = v[m * ldv + k * n_proj + p];
      SGMV_UNROLL for (int j = 0; j < NA; ++j) acc[m][j] += vm * w[j];
    }
  }
  SGMV_UNROLL for (int m = 0; m < MT; ++m) {
    if (m >= mt) break;
    vf out[NA];
    SGMV_UNROLL for (int j = 0; j < NA; ++j) out[j] = acc[m][j];
    SGMV_UNROLL for (int j = 0; j < NU - 1; ++j) U::add_to(y_rows[m] + j * U::W, out + j * U::NF, U::W);
    E::add_to(y_rows[m] + (NU - 1) * U::W, out + (NU - 1) * U::NF, last);
  }
}

// int8 slots: v[m, cols] = sum_k xs[m, k] * a_q[k, cols] (unscaled), NU units of 16 codes,
// for the tile's first MTT tokens only: a decode block often has one or two tokens per
// adapter, and the codes' conversion leaves no cycles for padding rows
template <int NU, int MTT>
void shrink_tile_i8(const float* xs, const int8_t* a, int64_t lda, int64_t K, int last, float* v, int64_t ldv) {
  const int64_t ahead = std::max<int64_t>(1, kShrinkAheadBytes / lda) * lda;
  vf acc[MTT][NU] = {};
  for (int64_t k = 0; k < K; ++k) {
    const int8_t* row = a + k * lda;
    __builtin_prefetch(row + ahead);
    vf b[NU];
    SGMV_UNROLL for (int j = 0; j < NU; ++j) UnitI8::load(row + j * 16, j == NU - 1 ? last : 16, b + j);
    SGMV_UNROLL for (int m = 0; m < MTT; ++m) {
      const float xm = xs[m * K + k];
      SGMV_UNROLL for (int j = 0; j < NU; ++j) acc[m][j] += xm * b[j];
    }
  }
  SGMV_UNROLL for (int m = 0; m < MTT; ++m)
    SGMV_UNROLL for (int j = 0; j < NU; ++j) *(vf_u*)(v + m * ldv + j * 16) = acc[m][j];
}

// int8 slots: y_m[cols] += sum_{k < rank} v[m, k * n_proj + p] * b_q[k, cols], v already scaled
template <typename T, int NU, int MTT>
void expand_tile_i8(const float* v, int64_t ldv, int n_proj, int p, const int8_t* b, int64_t ldb, int rank,
                    int last, T* const* y_rows) {
  vf acc[MTT][NU] = {};
  for (int k = 0; k < rank; ++k) {
    const int8_t* row = b + k * ldb;
    __builtin_prefetch(row + 2 * kExpandAheadChunks * kChunk);   // the bf16 distance in bytes
    vf w[NU];
    SGMV_UNROLL for (int j = 0; j < NU; ++j) UnitI8::load(row + j * 16, j == NU - 1 ? last : 16, w + j);
    SGMV_UNROLL for (int m = 0; m < MTT; ++m) {
      const float vm = v[m * ldv + k * n_proj + p];
      SGMV_UNROLL for (int j = 0; j < NU; ++j) acc[m][j] += vm * w[j];
    }
  }
  SGMV_UNROLL for (int m = 0; m < MTT; ++m) {
    if (y_rows[m] == nullptr) break;             // a 3-token tile runs as 4; its pad row writes nothing
    SGMV_UNROLL for (int j = 0; j < NU; ++j) add16<T>(y_rows[m] + j * 16, acc[m][j], j == NU - 1 ? last : 16);
  }
}

#define SGMV_DISPATCH_NU(nu, ...)                         \
  switch (nu) {                                           \
    case 1: { constexpr int NU = 1; __VA_ARGS__; break; } \
    case 2: { constexpr int NU = 2; __VA_ARGS__; break; } \
    case 3: { constexpr int NU = 3; __VA_ARGS__; break; } \
    default: { constexpr int NU = 4; __VA_ARGS__; break; } \
  }
// calls the body with constants NU = nu and MTT = the tile's tokens rounded up to 1, 2 or 4
#define SGMV_DISPATCH_I8(nu, mt, ...)                                                     \
  if (mt == 1) { constexpr int MTT = 1; SGMV_DISPATCH_NU(nu, __VA_ARGS__) }               \
  else if (mt == 2) { constexpr int MTT = 2; SGMV_DISPATCH_NU(nu, __VA_ARGS__) }          \
  else { constexpr int MTT = MT; SGMV_DISPATCH_NU(nu, __VA_ARGS__) }

// Column chunks of kChunk columns in units of 16 int8 codes
template <typename F>
void for_column_chunks_i8(int64_t cols, F&& tile) {
  for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
    const int w = (int)std::min<int64_t>(kChunk, cols - c0);
    const int nu = (w + 15) / 16;
    tile(c0, nu, w - (nu - 1) * 16);
  }
}

// Column chunks of kChunk columns, the last one narrower: calls tile(c0, units, last unit's width).
template <typename T, typename F>
void for_column_chunks(int64_t cols, F&& tile) {
  constexpr int W = Unit<T>::W;
  for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
    const int w = (int)std::min<int64_t>(kChunk, cols - c0);
    const int nu = (w + W - 1) / W;
    tile(c0, nu, w - (nu - 1) * W);
  }
}

// calls the body with constants NU = nu and HALF = (a bf16 last unit of <= 16 columns)
#define SGMV_DISPATCH(T, nu, last, ...)                                                      \
  if constexpr (std::is_same_v<T, bf16>) {                                                   \
    const bool half = last <= L;                                                             \
    if (nu == 1 && half) { constexpr int NU = 1; constexpr bool HALF = true; __VA_ARGS__; } \
    else if (nu == 1) { constexpr int NU = 1; constexpr bool HALF = false; __VA_ARGS__; }   \
    else if (half) { constexpr int NU = 2; constexpr bool HALF = true; __VA_ARGS__; }       \
    else { constexpr int NU = 2; constexpr bool HALF = false; __VA_ARGS__; }                \
  } else {                                                                                   \
    constexpr bool HALF = false;                                                             \
    switch (nu) {                                                                            \
      case 1: { constexpr int NU = 1; __VA_ARGS__; break; }                                  \
      case 2: { constexpr int NU = 2; __VA_ARGS__; break; }                                  \
      case 3: { constexpr int NU = 3; __VA_ARGS__; break; }                                  \
      default: { constexpr int NU = 4; __VA_ARGS__; break; }                                 \
    }                                                                                        \
  }

struct Step {
  int64_t K, n_proj, lda_slot, ldx, ldy;
  std::vector<int64_t> offs, outs, ldb_slot;
  const int64_t* tokens;
  const int32_t* slot_ranks;
  const float* scale = nullptr;    // int8 slots: [L, ld_scale] fp32, the shrink columns' scales
  int64_t ld_scale = 0;
};

struct Block {
  int64_t slot, rank, p0, p1;  // sorted positions [p0, p1) of one segment
};

// The tile's x rows widened to fp32 into xs (pad rows zero) and its y rows (pad: nullptr)
template <typename T>
void tile_rows(const Step& s, const T* x, T* y, int64_t m0, int mt, float* xs, T** y_rows) {
  for (int m = 0; m < MT; ++m) {
    float* xm = xs + m * s.K;
    if (m < mt) {
      const T* xr = x + s.tokens[m0 + m] * s.ldx;
      for (int64_t k = 0; k < s.K; ++k) xm[k] = (float)xr[k];
      y_rows[m] = y + s.tokens[m0 + m] * s.ldy;
    } else {
      std::fill(xm, xm + s.K, 0.f);
      y_rows[m] = nullptr;
    }
  }
}

template <typename T>
void run_block(const Step& s, const Block& blk, const T* x, const T* A,
               const std::vector<const T*>& Bs, T* y, std::vector<float>& xs, std::vector<float>& v) {
  const int64_t C = blk.rank * s.n_proj;          // this adapter's shrink columns
  const int64_t ldv = (C + 31) / 32 * 32;         // whole units of either dtype
  xs.resize(MT * s.K);
  v.resize(MT * ldv);
  const T* a = A + blk.slot * s.lda_slot;           // packed rows, lda apart
  const int64_t lda = row_width(blk.rank, s.n_proj);
  for (int64_t m0 = blk.p0; m0 < blk.p1; m0 += MT) {
    const int mt = (int)std::min<int64_t>(MT, blk.p1 - m0);
    T* y_rows[MT];
    tile_rows(s, x, y, m0, mt, xs.data(), y_rows);
    for_column_chunks<T>(C, [&](int64_t c0, int nu, int last) {
      SGMV_DISPATCH(T, nu, last, shrink_tile<T, NU, HALF>(xs.data(), a + c0, lda, s.K, last, v.data() + c0, ldv));
    });
    for (int64_t p = 0; p < s.n_proj; ++p) {
      const T* b = Bs[p] + blk.slot * s.ldb_slot[p];
      for_column_chunks<T>(s.outs[p], [&](int64_t c0, int nu, int last) {
        T* rows[MT];
        for (int m = 0; m < MT; ++m) rows[m] = y_rows[m] ? y_rows[m] + s.offs[p] + c0 : nullptr;
        SGMV_DISPATCH(T, nu, last, expand_tile<T, NU, HALF>(v.data(), ldv, (int)s.n_proj, (int)p, b + c0, s.outs[p],
                                                            (int)blk.rank, last, rows, mt));
      });
    }
  }
}

// run_block with int8 slots: shrink on the codes, v scaled per column, expand on the codes
template <typename T>
void run_block_i8(const Step& s, const Block& blk, const T* x, const int8_t* A,
                  const std::vector<const int8_t*>& Bs, T* y, std::vector<float>& xs, std::vector<float>& v) {
  const int64_t C = blk.rank * s.n_proj;
  const int64_t ldv = (C + 63) / 64 * 64;         // whole 64-column chunks
  xs.resize(MT * s.K);
  v.resize(MT * ldv);
  const int8_t* a = A + blk.slot * s.lda_slot;
  const int64_t lda = row_width(blk.rank, s.n_proj);
  const float* sc = s.scale + blk.slot * s.ld_scale;
  for (int64_t m0 = blk.p0; m0 < blk.p1; m0 += MT) {
    const int mt = (int)std::min<int64_t>(MT, blk.p1 - m0);
    T* y_rows[MT];
    tile_rows(s, x, y, m0, mt, xs.data(), y_rows);
    for_column_chunks_i8(C, [&](int64_t c0, int nu, int last) {
      SGMV_DISPATCH_I8(nu, mt, shrink_tile_i8<NU, MTT>(xs.data(), a + c0, lda, s.K, last, v.data() + c0, ldv));
    });
    for (int m = 0; m < mt; ++m)
      for (int64_t c = 0; c < C; ++c) v[m * ldv + c] *= sc[c];
    for (int64_t p = 0; p < s.n_proj; ++p) {
      const int8_t* b = Bs[p] + blk.slot * s.ldb_slot[p];
      for_column_chunks_i8(s.outs[p], [&](int64_t c0, int nu, int last) {
        T* rows[MT];
        for (int m = 0; m < MT; ++m) rows[m] = y_rows[m] ? y_rows[m] + s.offs[p] + c0 : nullptr;
        SGMV_DISPATCH_I8(nu, mt, expand_tile_i8<T, NU, MTT>(v.data(), ldv, (int)s.n_proj, (int)p, b + c0,
                                                            s.outs[p], (int)blk.rank, last, rows));
      });
    }
  }
}

// One long segment through ATen (blocked GEMM): the same math, with v rounded to x's dtype,
// accumulated in place into y's rows (a view when the tokens are consecutive, the common
// case: the runner orders tokens by slot; else gathered and scattered back).
void run_long_segment(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const std::vector<at::Tensor>& Bs,
                      const Step& s, const at::Tensor& tokens, const Block& blk) {
  const int64_t M = blk.p1 - blk.p0, t0 = s.tokens[blk.p0];
  bool consecutive = true;
  for (int64_t i = 1; i < M && consecutive; ++i) consecutive = s.tokens[blk.p0 + i] == t0 + i;
  const auto idx = tokens.narrow(0, blk.p0, M);
  const auto xs = consecutive ? x.narrow(0, t0, M) : x.index_select(0, idx);
  auto ys = consecutive ? y.narrow(0, t0, M) : y.index_select(0, idx);
  const int64_t lda = row_width(blk.rank, s.n_proj);                               // packed rows
  const int64_t C = blk.rank * s.n_proj;
  auto a = A[blk.slot].view(-1).narrow(0, 0, s.K * lda).view({s.K, lda}).narrow(1, 0, C);
  const bool int8 = A.scalar_type() == at::kChar;   // this adapter's codes only, converted for the GEMM
  if (int8) a = a.to(x.scalar_type());
  auto v = at::mm(xs, a);
  if (int8) {
    const auto sc = at::from_blob((void*)(s.scale + blk.slot * s.ld_scale), {C}, at::kFloat);
    v = (v.to(at::kFloat) * sc).to(x.scalar_type());
  }
  v = v.view({M, blk.rank, s.n_proj});
  for (int64_t p = 0; p < s.n_proj; ++p) {
    auto b = Bs[p][blk.slot].narrow(0, 0, blk.rank);
    ys.narrow(1, s.offs[p], s.outs[p]).addmm_(v.select(2, p), int8 ? b.to(x.scalar_type()) : b);
  }
  if (!consecutive) y.index_copy_(0, idx, ys);
}

// The short segments' blocks on all threads: worker w takes the blocks whose middle byte
// (cost: prefix sums of the blocks' weight bytes) falls in its 1/workers of the total.
template <typename T, typename TW>
void run_blocks(const Step& s, const std::vector<Block>& blocks, const std::vector<double>& cost,
                const at::Tensor& x, const at::Tensor& A, const std::vector<at::Tensor>& Bs, at::Tensor& y) {
  const T* xp = (const T*)x.data_ptr();
  const TW* ap = (const TW*)A.data_ptr();
  T* yp = (T*)y.data_ptr();
  std::vector<const TW*> bp;
  for (const auto& B : Bs) bp.push_back((const TW*)B.data_ptr());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (int64_t)blocks.size());
  const double total = cost.back();
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> xs, v;
    for (int64_t w = w0; w < w1; ++w)
      for (size_t i = 0; i < blocks.size(); ++i)
        if ((int64_t)(0.5 * (cost[i] + cost[i + 1]) * workers / total) == w)
          if constexpr (std::is_same_v<TW, int8_t>) run_block_i8<T>(s, blocks[i], xp, ap, bp, yp, xs, v);
          else run_block<T>(s, blocks[i], xp, ap, bp, yp, xs, v);
  });
}

}  // namespace

// y [T, N] += LoRA delta, in place. tokens: LoRA tokens sorted by slot; segment i is
// tokens[seg_starts[i]:seg_starts[i+1]] with slot seg_slots[i] of rank slot_ranks[slot].
void add_lora(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const std::vector<at::Tensor>& Bs,
              const std::vector<int64_t>& offs, const at::Tensor& tokens, const at::Tensor& seg_starts,
              const at::Tensor& seg_slots, const at::Tensor& slot_ranks, int64_t max_seg_len,
              const at::Tensor& scale) {
  RECORD_FUNCTION("loraserve::sgmv_cpu", std::vector<c10::IValue>());  // a row in torch.profiler's tables
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && A.dim() == 4, "y [T, N], x [T, in], A [L, in, r_max, n_proj]");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1 && A.is_contiguous(), "y and x rows, and A, must be dense");
  const bool int8 = A.scalar_type() == at::kChar;   // int8 slots: A and Bs codes, `scale` [L, r_max * n_proj]
  const auto wtype = int8 ? at::kChar : y.scalar_type();
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && A.scalar_type() == wtype, "one dtype for y, x, A, Bs (or int8 A, Bs)");
  TORCH_CHECK(!int8 || (scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 &&
                        scale.size(0) == A.size(0) && scale.size(1) == A.size(2) * A.size(3)),
              "int8 slots need scale [L, r_max * n_proj] fp32, contiguous");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK((int64_t)Bs.size() == A.size(3) && offs.size() == Bs.size(), "one B and one offset per projection");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && seg_starts.scalar_type() == at::kInt &&
              seg_slots.scalar_type() == at::kInt && slot_ranks.scalar_type() == at::kInt, "index dtypes");
  TORCH_CHECK(tokens.is_contiguous() && seg_starts.is_contiguous() && seg_slots.is_contiguous() &&
              slot_ranks.is_contiguous(), "index tensors must be contiguous");
  Step s;
  s.K = A.size(1);
  s.n_proj = A.size(3);
  s.lda_slot = A.stride(0);
  s.ldx = x.stride(0);
  s.ldy = y.stride(0);
  s.tokens = tokens.data_ptr<int64_t>();
  s.slot_ranks = slot_ranks.data_ptr<int32_t>();
  if (int8) {
    s.scale = scale.data_ptr<float>();
    s.ld_scale = scale.size(1);
  }
  TORCH_CHECK(x.size(1) == s.K, "x and A disagree on in_features");
  TORCH_CHECK(A.size(2) * s.n_proj % kRowAlign == 0, "A's r_max * n_proj must be a multiple of 8 (packed rows)");
  for (size_t p = 0; p < Bs.size(); ++p) {
    const auto& B = Bs[p];
    TORCH_CHECK(B.dim() == 3 && B.is_contiguous() && B.scalar_type() == wtype &&
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
  auto work = [&](auto tag) {
    using T = decltype(tag);
    for (const auto& blk : long_segs) run_long_segment(y, x, A, Bs, s, tokens, blk);
    if (blocks.empty()) return;
    if (int8) run_blocks<T, int8_t>(s, blocks, cost, x, A, Bs, y);
    else run_blocks<T, T>(s, blocks, cost, x, A, Bs, y);
  };
  if (y.scalar_type() == at::kFloat) work(float{});
  else work(bf16{});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_lora", &add_lora, "y += LoRA delta over segments of tokens that share an adapter (in place)",
        py::call_guard<py::gil_scoped_release>());
}
