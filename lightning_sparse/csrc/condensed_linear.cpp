// lightning_sparse::condensed_linear(x, values, indices, bias, out_features, columns): a constant-fan-in Linear.
//
// Every output row o reads k inputs: y[b, o] = sum_j V[o, j] * x[b, I[o, j]] + bias[o]. The rows come in blocks of
// 16 (the last one padded with zero values at index 0): `values` and `indices` are [blocks, k, 16], entry (o, j)
// at [o / 16, j, o % 16], so the j-th entries of 16 consecutive rows are 64 contiguous bytes (ELLPACK by blocks;
// CondensedLinear packs its [out, k] buffers once). Since every row has the same k, a block is a plain loop over j
// with no ragged rows. Two loop orders, chosen by the batch size:
//
// * small batches (gather): for each block of 16 rows, for each sample, for each j: one vector load of the 16
//   values, one of the 16 indices, one hardware gather of the 16 inputs they point to (AVX-512; two of 8 with
//   AVX2) and one FMA into the 16 rows' sums; two accumulators alternate over j. No horizontal sums, one store of
//   16 outputs. x (one sample) stays in L1; the packed weights stream through once per sample.
// * large batches (axpy): x is transposed to [in, batch] (columns), and for each row, for each of its k inputs,
//   the batch row of that input is multiplied by the value and added to accumulators that stay in registers (128
//   samples at a time with AVX-512, 64 with AVX2): one contiguous load and one FMA per 16 (8) multiply-adds, no
//   gather. A block's 16 rows go to a [16, chunk] tile that is written out transposed into y[batch, out], a
//   whole cache line per sample. The batch is taken in chunks whose inputs, [in, chunk], fit in L2.
//
// `rows` (optional, int64 [held], increasing): only these output rows hold weights (neuron ablation empties the
// others); values and indices then pack the held rows, and every other output is its bias (or 0).
//
// `columns=true` takes x already as [n, in, L] (an NCHW activation, L = H*W) and returns [n, out, L]: the axpy
// order without any transposition (the 1x1 convolution case).
//
// Blocks of rows are split over threads with at::parallel_for; each output is summed by one thread in a fixed
// order, so results do not depend on the number of threads. float32 only; the indices (int32 or int64) are
// trusted to lie in [0, in): the Python side checks them when the module is built or loaded. Each ISA variant is
// compiled with a target attribute and chosen at run time (__builtin_cpu_supports), so one build runs on every
// x86-64 CPU; other architectures get the portable loops (which the compiler may vectorize).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LS_X86 1
#include <immintrin.h>
#else
#define LS_X86 0
#endif

namespace {

constexpr int64_t kBlock = 16;  // rows per block of the packed layout
// Samples below which the gather order is used (measured with AVX-512: the axpy order wins from 5-7 up).
constexpr int64_t kSmallBatch = 6;
#include "cpu_passes.h"  // kWorkPerChunk, kChunk, grain, chunk_width, padded_stride, transpose

// ------------------------------------------------------------------------------------------- portable loops
// s[r] = sum_j v[j * 16 + r] * x[idx[j * 16 + r]] for the 16 rows r of a block
template <typename index_t>
void block_dot_portable(const float* v, const index_t* idx, const float* x, int64_t k, float* s) {
  float acc[kBlock] = {};
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t r = 0; r < kBlock; ++r) acc[r] += v[j * kBlock + r] * x[idx[j * kBlock + r]];
  }
  std::copy(acc, acc + kBlock, s);
}

// acc[0:width] = sum_j v[j * 16] * xt[idx[j * 16] * ld + 0:width] (one row of a block)
template <typename index_t>
void axpy_portable(const float* v, const index_t* idx, const float* xt, int64_t ld, int64_t k, int64_t width,
                   float* acc) {
  std::fill(acc, acc + width, 0.f);
  for (int64_t j = 0; j < k; ++j) {
    const float a = v[j * kBlock];
    const float* row = xt + static_cast<int64_t>(idx[j * kBlock]) * ld;
    for (int64_t c = 0; c < width; ++c) acc[c] += a * row[c];
  }
}

#if LS_X86
// ------------------------------------------------------------------------------------------------- AVX2
// 8 indices as a vector of int32: int32 loaded as they are, uint16 widened
__attribute__((target("avx2,fma"))) inline __m256i load_index8(const int32_t* i) {
  return _mm256_loadu_si256((const __m256i*)i);
}
__attribute__((target("avx2,fma"))) inline __m256i load_index8(const uint16_t* i) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)i));
}

template <typename index_t>  // int32_t or uint16_t
__attribute__((target("avx2,fma"))) void block_dot_avx2(const float* v, const index_t* idx, const float* x,
                                                        int64_t k, float* s) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= k; j += 2) {  // rows 0-7 and 8-15 of entries j and j + 1
    const index_t* i = idx + j * kBlock;
    const float* w = v + j * kBlock;
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_i32gather_ps(x, load_index8(i), 4), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), _mm256_i32gather_ps(x, load_index8(i + 8), 4), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16), _mm256_i32gather_ps(x, load_index8(i + 16), 4), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 24), _mm256_i32gather_ps(x, load_index8(i + 24), 4), a3);
  }
  if (j < k) {
    const index_t* i = idx + j * kBlock;
    const float* w = v + j * kBlock;
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_i32gather_ps(x, load_index8(i), 4), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), _mm256_i32gather_ps(x, load_index8(i + 8), 4), a1);
  }
  _mm256_storeu_ps(s, _mm256_add_ps(a0, a2));
  _mm256_storeu_ps(s + 8, _mm256_add_ps(a1, a3));
}

__attribute__((target("avx2,fma"))) inline __m256 gather8_i64(const float* x, const int64_t* i) {
  const __m128 lo = _mm256_i64gather_ps(x, _mm256_loadu_si256((const __m256i*)i), 4);
  const __m128 hi = _mm256_i64gather_ps(x, _mm256_loadu_si256((const __m256i*)(i + 4)), 4);
  return _mm256_set_m128(hi, lo);
}

__attribute__((target("avx2,fma"))) void block_dot_avx2(const float* v, const int64_t* idx, const float* x,
                                                        int64_t k, float* s) {
  // entries j and j + 1 in alternating accumulators: the order of every other variant and strategy
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= k; j += 2) {
    const int64_t* i = idx + j * kBlock;
    const float* w = v + j * kBlock;
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w), gather8_i64(x, i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), gather8_i64(x, i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16), gather8_i64(x, i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 24), gather8_i64(x, i + 24), a3);
  }
  if (j < k) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * kBlock), gather8_i64(x, idx + j * kBlock), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * kBlock + 8), gather8_i64(x, idx + j * kBlock + 8), a1);
  }
  _mm256_storeu_ps(s, _mm256_add_ps(a0, a2));
  _mm256_storeu_ps(s + 8, _mm256_add_ps(a1, a3));
}

template <typename index_t>
__attribute__((target("avx2,fma"))) void axpy_avx2(const float* v, const index_t* idx, const float* xt, int64_t ld,
                                                   int64_t k, int64_t width, float* acc) {
  constexpr int NV = 8;  // 64 samples in 8 ymm accumulators
  int64_t c0 = 0;
  for (; c0 + 8 * NV <= width; c0 += 8 * NV) {
    __m256 a[NV];
    for (int i = 0; i < NV; ++i) a[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      const __m256 s = _mm256_set1_ps(v[j * kBlock]);
      const float* row = xt + static_cast<int64_t>(idx[j * kBlock]) * ld + c0;
      for (int i = 0; i < NV; ++i) a[i] = _mm256_fmadd_ps(s, _mm256_loadu_ps(row + 8 * i), a[i]);
    }
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(acc + c0 + 8 * i, a[i]);
  }
  for (; c0 + 16 <= width; c0 += 16) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      const __m256 s = _mm256_set1_ps(v[j * kBlock]);
      const float* row = xt + static_cast<int64_t>(idx[j * kBlock]) * ld + c0;
      a0 = _mm256_fmadd_ps(s, _mm256_loadu_ps(row), a0);
      a1 = _mm256_fmadd_ps(s, _mm256_loadu_ps(row + 8), a1);
    }
    _mm256_storeu_ps(acc + c0, a0);
    _mm256_storeu_ps(acc + c0 + 8, a1);
  }
  if (c0 < width) axpy_portable(v, idx, xt + c0, ld, k, width - c0, acc + c0);
}

// The scalar-load strategy (any AVX2 CPU): the 16 inputs of entry j are read with scalar loads and put into
// vectors, then one FMA per 8 rows. No gather instruction: on CPUs whose gathers are microcoded or slow (AMD Zen
// 1-5 among them) 16 scalar loads cost less than a 16-lane gather. This loop is bound by the core's load and
// dispatch slots (~0.65 cycles per entry on a Zen 5 EPYC, measured), so every instruction per entry counts: uint16
// indices are read two per 32-bit load (one load, a movzx and a shift for two inputs, where a load per index
// took ~15 % longer), and the 8 inputs of a vector are placed by `vinsertps` (AVX2) or by masked broadcast loads
// (AVX-512VL: one instruction per input, load and merge). Both add the same products in the same order as the
// gather strategy.
// x[i[0..7]] as one vector, AVX2: two quads of vmovss + 3 vinsertps
__attribute__((target("avx2,fma"), always_inline)) inline __m128 quad_avx2(const float* x, uint32_t a, uint32_t b) {
  __m128 r = _mm_load_ss(x + (a & 0xFFFFu));
  r = _mm_insert_ps(r, _mm_load_ss(x + (a >> 16)), 0x10);
  r = _mm_insert_ps(r, _mm_load_ss(x + (b & 0xFFFFu)), 0x20);
  return _mm_insert_ps(r, _mm_load_ss(x + (b >> 16)), 0x30);
}
__attribute__((target("avx2,fma"), always_inline)) inline __m256 inputs8_avx2(const float* x, const uint16_t* i) {
  uint32_t w[4];  // the 8 indices, two per word (little endian: the first in the low half)
  std::memcpy(w, i, sizeof(w));
  return _mm256_set_m128(quad_avx2(x, w[2], w[3]), quad_avx2(x, w[0], w[1]));
}
template <typename index_t>  // int32_t or int64_t: one load per index
__attribute__((target("avx2,fma"), always_inline)) inline __m256 inputs8_avx2(const float* x, const index_t* i) {
  auto at = [x](index_t n) { return x[static_cast<int64_t>(n)]; };
  return _mm256_set_ps(at(i[7]), at(i[6]), at(i[5]), at(i[4]), at(i[3]), at(i[2]), at(i[1]), at(i[0]));
}
// AVX-512VL: lane 0 by vmovss, lanes 1-7 by masked broadcast loads (vbroadcastss ymm{k}, m32)
#define LS_TARGET_VL __attribute__((target("avx512f,avx512vl,fma")))
#define LS_INLINE_VL __attribute__((target("avx512f,avx512vl,fma"), always_inline))  // a call per vector costs ~25 %
LS_INLINE_VL inline __m256 place8(float x0, const float* p1, const float* p2, const float* p3, const float* p4,
                                  const float* p5, const float* p6, const float* p7) {
  __m256 r = _mm256_castps128_ps256(_mm_set_ss(x0));
  r = _mm256_mask_broadcastss_ps(r, 0x02, _mm_load_ss(p1));
  r = _mm256_mask_broadcastss_ps(r, 0x04, _mm_load_ss(p2));
  r = _mm256_mask_broadcastss_ps(r, 0x08, _mm_load_ss(p3));
  r = _mm256_mask_broadcastss_ps(r, 0x10, _mm_load_ss(p4));
  r = _mm256_mask_broadcastss_ps(r, 0x20, _mm_load_ss(p5));
  r = _mm256_mask_broadcastss_ps(r, 0x40, _mm_load_ss(p6));
  return _mm256_mask_broadcastss_ps(r, 0x80, _mm_load_ss(p7));
}
LS_INLINE_VL inline __m256 inputs8_vl(const float* x, const uint16_t* i) {
  uint32_t w[4];
  std::memcpy(w, i, sizeof(w));
  return place8(x[w[0] & 0xFFFFu], x + (w[0] >> 16), x + (w[1] & 0xFFFFu), x + (w[1] >> 16), x + (w[2] & 0xFFFFu),
                x + (w[2] >> 16), x + (w[3] & 0xFFFFu), x + (w[3] >> 16));
}
template <typename index_t>
LS_INLINE_VL inline __m256 inputs8_vl(const float* x, const index_t* i) {
  return place8(x[i[0]], x + i[1], x + i[2], x + i[3], x + i[4], x + i[5], x + i[6], x + i[7]);
}

// s[0:16] = the block's sums, entries j and j + 1 in alternating accumulators (the gather strategy's order)
#define LS_SCALAR_BLOCK_DOT(inputs8)                                                                        \
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),                     \
         a3 = _mm256_setzero_ps();                                                                          \
  int64_t j = 0;                                                                                            \
  for (; j + 2 <= k; j += 2) {                                                                              \
    const index_t* i = idx + j * kBlock;                                                                    \
    const float* w = v + j * kBlock;                                                                        \
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w), inputs8(x, i), a0);                                            \
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), inputs8(x, i + 8), a1);                                    \
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16), inputs8(x, i + 16), a2);                                  \
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 24), inputs8(x, i + 24), a3);                                  \
  }                                                                                                         \
  if (j < k) {                                                                                              \
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * kBlock), inputs8(x, idx + j * kBlock), a0);                \
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j * kBlock + 8), inputs8(x, idx + j * kBlock + 8), a1);       \
  }                                                                                                         \
  _mm256_storeu_ps(s, _mm256_add_ps(a0, a2));                                                               \
  _mm256_storeu_ps(s + 8, _mm256_add_ps(a1, a3));

template <typename index_t>
__attribute__((target("avx2,fma"))) void block_dot_scalar_avx2(const float* v, const index_t* idx, const float* x,
                                                               int64_t k, float* s) {
  LS_SCALAR_BLOCK_DOT(inputs8_avx2)
}
template <typename index_t>
LS_TARGET_VL void block_dot_scalar_vl(const float* v, const index_t* idx, const float* x, int64_t k, float* s) {
  LS_SCALAR_BLOCK_DOT(inputs8_vl)
}
#undef LS_SCALAR_BLOCK_DOT
#undef LS_INLINE_VL
#undef LS_TARGET_VL

// ---------------------------------------------------------------------------------------------- AVX-512
// 16 indices as a vector of int32: int32 loaded as they are, uint16 widened
__attribute__((target("avx512f"))) inline __m512i load_index16(const int32_t* i) { return _mm512_loadu_si512(i); }
__attribute__((target("avx512f"))) inline __m512i load_index16(const uint16_t* i) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)i));
}

template <typename index_t>  // int32_t or uint16_t
__attribute__((target("avx512f"))) void block_dot_avx512(const float* v, const index_t* idx, const float* x,
                                                         int64_t k, float* s) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= k; j += 2) {
    const index_t* i = idx + j * kBlock;
    const float* w = v + j * kBlock;
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_i32gather_ps(load_index16(i), x, 4), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + kBlock), _mm512_i32gather_ps(load_index16(i + kBlock), x, 4), a1);
  }
  if (j < k) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j * kBlock), _mm512_i32gather_ps(load_index16(idx + j * kBlock), x, 4),
                         a0);
  }
  _mm512_storeu_ps(s, _mm512_add_ps(a0, a1));
}

__attribute__((target("avx512f"))) inline __m512 gather16_i64(const float* x, const int64_t* i) {
  const __m256 lo = _mm512_i64gather_ps(_mm512_loadu_si512(i), x, 4);
  const __m256 hi = _mm512_i64gather_ps(_mm512_loadu_si512(i + 8), x, 4);
  // insert the high half (AVX-512F only: _mm512_insertf32x8 would need AVX-512DQ)
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

__attribute__((target("avx512f"))) void block_dot_avx512(const float* v, const int64_t* idx, const float* x,
                                                         int64_t k, float* s) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= k; j += 2) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j * kBlock), gather16_i64(x, idx + j * kBlock), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + (j + 1) * kBlock), gather16_i64(x, idx + (j + 1) * kBlock), a1);
  }
  if (j < k) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j * kBlock), gather16_i64(x, idx + j * kBlock), a0);
  _mm512_storeu_ps(s, _mm512_add_ps(a0, a1));
}

// NV vectors of 16 samples, NV independent accumulators (an FMA's latency is hidden from NV = 4 up)
template <int NV, typename index_t>
__attribute__((target("avx512f"))) inline void axpy_avx512_block(const float* v, const index_t* idx, const float* xt,
                                                                 int64_t ld, int64_t k, float* acc) {
  __m512 a[NV];
  for (int i = 0; i < NV; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; ++j) {
    const __m512 s = _mm512_set1_ps(v[j * kBlock]);
    const float* row = xt + static_cast<int64_t>(idx[j * kBlock]) * ld;
    for (int i = 0; i < NV; ++i) a[i] = _mm512_fmadd_ps(s, _mm512_loadu_ps(row + 16 * i), a[i]);
  }
  for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
}

template <typename index_t>
__attribute__((target("avx512f"))) void axpy_avx512(const float* v, const index_t* idx, const float* xt, int64_t ld,
                                                     int64_t k, int64_t width, float* acc) {
  int64_t c0 = 0;
  for (; c0 + 128 <= width; c0 += 128) axpy_avx512_block<8>(v, idx, xt + c0, ld, k, acc + c0);
  if (c0 + 64 <= width) {
    axpy_avx512_block<4>(v, idx, xt + c0, ld, k, acc + c0);
    c0 += 64;
  }
  if (c0 + 32 <= width) {
    axpy_avx512_block<2>(v, idx, xt + c0, ld, k, acc + c0);
    c0 += 32;
  }
  if (c0 < width) {  // 1-31 samples left: two masked vectors
    const int64_t n = width - c0;
    const __mmask16 m0 = static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
    const __mmask16 m1 = static_cast<__mmask16>(n <= 16 ? 0u : (1u << (n - 16)) - 1u);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      const __m512 s = _mm512_set1_ps(v[j * kBlock]);
      const float* row = xt + static_cast<int64_t>(idx[j * kBlock]) * ld + c0;
      a0 = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(m0, row), a0);
      a1 = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(m1, row + 16), a1);
    }
    _mm512_mask_storeu_ps(acc + c0, m0, a0);
    _mm512_mask_storeu_ps(acc + c0 + 16, m1, a1);
  }
}
#endif  // LS_X86

enum class Isa { kPortable, kAvx2, kAvx512 };

// The best variant this CPU runs; LIGHTNING_SPARSE_ISA=avx2 or =portable caps it (for tests of the other paths).
Isa detect_isa() {
  const char* cap = std::getenv("LIGHTNING_SPARSE_ISA");
  const std::string limit = cap ? cap : "";
  if (limit == "portable") return Isa::kPortable;
#if LS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && limit != "avx2") return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

const Isa kIsa = detect_isa();

// AVX-512VL (every AVX-512 CPU but Xeon Phi), for the scalar strategy's masked broadcasts
bool detect_vl() {
#if LS_X86
  __builtin_cpu_init();
  return kIsa == Isa::kAvx512 && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

const bool kHasVl = detect_vl();

// How the small-batch (gather) order reads the 16 inputs of one entry of a block:
// * kGather: one hardware gather (AVX-512: one of 16 lanes; AVX2: two of 8), fast on Intel cores;
// * kScalar: 16 scalar loads put into vectors (AVX2 and up), for CPUs whose gathers are slow (AMD).
// Both add the same products in the same order, so their results are equal bit for bit. Without AVX2 both are
// the portable loop.
enum class Strategy { kGather, kScalar };

// The default when the caller names none ("auto"): a CPUID rule. Hardware gathers on Intel cores since Skylake
// run at about one element per cycle or better; on AMD (Zen 1-5) they are microcoded and slower than scalar loads
// (a Zen 5 EPYC, 3072->768 at 90 %, batch 1: 0.080 ms by 16-lane gathers, 0.041 ms by scalar loads).
// CondensedLinear measures both once per shape instead (export/condensed.py) and passes its pick.
Strategy default_strategy() {
#if LS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) return Strategy::kGather;
  return Strategy::kScalar;
#else
  return Strategy::kGather;
#endif
}

const Strategy kDefaultStrategy = default_strategy();

const char* strategy_name(Strategy s) { return s == Strategy::kGather ? "gather" : "scalar"; }

Strategy parse_strategy(c10::string_view name) {
  if (name == "auto") return kDefaultStrategy;
  if (name == "gather") return Strategy::kGather;
  if (name == "scalar") return Strategy::kScalar;
  TORCH_CHECK(false, "condensed_linear: strategy can be 'auto', 'gather' or 'scalar', got '", std::string(name), "'");
}

template <typename index_t>
inline void block_dot(Strategy strategy, const float* v, const index_t* idx, const float* x, int64_t k, float* s) {
#if LS_X86
  if (strategy == Strategy::kScalar && kHasVl) return block_dot_scalar_vl(v, idx, x, k, s);
  if (strategy == Strategy::kScalar && kIsa != Isa::kPortable) return block_dot_scalar_avx2(v, idx, x, k, s);
  if (kIsa == Isa::kAvx512) return block_dot_avx512(v, idx, x, k, s);
  if (kIsa == Isa::kAvx2) return block_dot_avx2(v, idx, x, k, s);
#endif
  block_dot_portable(v, idx, x, k, s);
}

template <typename index_t>
inline void axpy(const float* v, const index_t* idx, const float* xt, int64_t ld, int64_t k, int64_t width,
                 float* acc) {
#if LS_X86
  if (kIsa == Isa::kAvx512) return axpy_avx512(v, idx, xt, ld, k, width, acc);
  if (kIsa == Isa::kAvx2) return axpy_avx2(v, idx, xt, ld, k, width, acc);
#endif
  axpy_portable(v, idx, xt, ld, k, width, acc);
}

// ------------------------------------------------------------------------------------------- the loop orders
// y[b][o] for samples b < batch (small): gather
// `held` rows are computed; `map` (or nullptr: the identity) gives the output row of each, in [0, out).
template <typename index_t>
void gather_rows(const float* x, const float* values, const index_t* indices, const float* bias, float* y,
                 int64_t batch, int64_t in, int64_t held, int64_t k, int64_t out, const int64_t* map,
                 Strategy strategy) {
  const int64_t blocks = (held + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, grain(kBlock * k * batch), [&](int64_t begin, int64_t end) {
    float sums[kBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t o0 = blk * kBlock, rows = std::min(kBlock, held - o0);
      for (int64_t b = 0; b < batch; ++b) {
        block_dot(strategy, values + blk * k * kBlock, indices + blk * k * kBlock, x + b * in, k, sums);
        float* dst = y + b * out;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t o = map ? map[o0 + r] : o0 + r;
          dst[o] = sums[r] + (bias ? bias[o] : 0.f);
        }
      }
    }
  });
}

// y[c][o] = sum_j V[o][j] * xt[I[o][j]][c] (+ bias[o]), xt = x transposed ([in, batch], row stride ld): axpy. The
// 16 rows of a block go to a [16, chunk] tile that is written out transposed, a whole cache line of y per sample:
// writing y[c][o] one row o at a time strides by `out` floats, which for `out` a multiple of 1024 puts every
// store of a row in the same L1 set.
template <typename index_t>
void axpy_rows(const float* xt, const float* values, const index_t* indices, const float* bias, float* y,
               int64_t batch, int64_t ld, int64_t in, int64_t held, int64_t k, int64_t out, const int64_t* map) {
  const int64_t blocks = (held + kBlock - 1) / kBlock, chunk = chunk_width(in);
  at::parallel_for(0, blocks, grain(kBlock * k * batch), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(kBlock * chunk);
    float* tile = buffer.data();
    for (int64_t c0 = 0; c0 < batch; c0 += chunk) {  // one pass over the rows per chunk of samples
      const int64_t width = std::min(chunk, batch - c0);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t o0 = blk * kBlock, rows = std::min(kBlock, held - o0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t at = blk * k * kBlock + r;
          axpy(values + at, indices + at, xt + c0, ld, k, width, tile + r * chunk);
        }
        for (int64_t c = 0; c < width; ++c) {
          float* dst = y + (c0 + c) * out;
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t o = map ? map[o0 + r] : o0 + r;
            dst[o] = tile[r * chunk + c] + (bias ? bias[o] : 0.f);
          }
        }
      }
    }
  });
}

// yt[n][o][c] = sum_j V[o][j] * xt[n][I[o][j]][c] (+ bias[o]) for every sample block n (xt[n] is [in, L] with row
// stride ld): axpy
template <typename index_t>
void axpy_columns(const float* xt, const float* values, const index_t* indices, const float* bias, float* yt,
                  int64_t samples, int64_t L, int64_t ld, int64_t in, int64_t held, int64_t k, int64_t out,
                  const int64_t* map) {
  const int64_t blocks = (held + kBlock - 1) / kBlock, chunk = chunk_width(in);
  at::parallel_for(0, samples * blocks, grain(kBlock * k * L), [&](int64_t begin, int64_t end) {
    float acc[kChunk];
    for (int64_t first = begin; first < end;) {  // the blocks of one sample at a time
      const int64_t n = first / blocks, last = std::min(end, (n + 1) * blocks);
      for (int64_t c0 = 0; c0 < L; c0 += chunk) {  // one pass over the rows per chunk of columns
        const int64_t width = std::min(chunk, L - c0);
        for (int64_t blk = first - n * blocks; blk < last - n * blocks; ++blk) {
          const int64_t o0 = blk * kBlock, rows = std::min(kBlock, held - o0);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t at = blk * k * kBlock + r, o = map ? map[o0 + r] : o0 + r;
            axpy(values + at, indices + at, xt + n * in * ld + c0, ld, k, width, acc);
            float* dst = yt + (n * out + o) * L + c0;
            const float b0 = bias ? bias[o] : 0.f;
            for (int64_t c = 0; c < width; ++c) dst[c] = acc[c] + b0;
          }
        }
      }
      first = last;
    }
  });
}

// Every output set to its bias (or 0) first, when only some rows are computed: y is [n, out, L] (L = 1: [n, out]).
void fill_outputs(at::Tensor& y, const float* bias, int64_t out, int64_t L) {
  float* p = y.mutable_data_ptr<float>();
  const int64_t n = y.numel() / (out * L);
  for (int64_t s = 0; s < n; ++s)
    for (int64_t o = 0; o < out; ++o) std::fill_n(p + (s * out + o) * L, L, bias ? bias[o] : 0.f);
}

// f(const index_t* indices) for the index type of `indices`: int32, int64 or uint16 (whose values are < 65536)
template <typename F>
void dispatch_index(const at::Tensor& indices, F&& f) {
  switch (indices.scalar_type()) {
    case at::kInt: return f(indices.const_data_ptr<int32_t>());
    case at::kLong: return f(indices.const_data_ptr<int64_t>());
    default: return f(static_cast<const uint16_t*>(indices.const_data_ptr()));
  }
}

at::Tensor condensed_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                            const std::optional<at::Tensor>& bias, int64_t out, bool columns,
                            const std::optional<at::Tensor>& rows, c10::string_view strategy_name) {
  const Strategy strategy = parse_strategy(strategy_name);
  TORCH_CHECK(x.is_cpu() && values.is_cpu() && indices.is_cpu(), "condensed_linear: tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "condensed_linear: x and values must be float32, got ", x.scalar_type(), " and ",
              values.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong ||
                  indices.scalar_type() == at::kUInt16,
              "condensed_linear: indices must be int32, int64 or uint16, got ", indices.scalar_type());
  const int64_t* map = nullptr;  // the output row of each computed row (rows emptied by neuron ablation are not)
  int64_t held = out;
  if (rows.has_value() && rows->defined()) {
    TORCH_CHECK(rows->is_cpu() && rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->dim() == 1 &&
                    rows->size(0) <= out,
                "condensed_linear: rows must be a contiguous 1-D int64 CPU tensor of at most ", out, " entries");
    map = rows->const_data_ptr<int64_t>();
    held = rows->size(0);
  }
  const int64_t blocks = (held + kBlock - 1) / kBlock;
  TORCH_CHECK(out >= 0 && values.dim() == 3 && values.size(0) == blocks && values.size(2) == kBlock &&
                  indices.sizes() == values.sizes(),
              "condensed_linear: values and indices must be packed as [", blocks, ", k, ", kBlock, "] for ", held,
              " rows, got ", values.sizes(), " and ", indices.sizes());
  TORCH_CHECK(x.is_contiguous() && values.is_contiguous() && indices.is_contiguous(),
              "condensed_linear: x, values and indices must be contiguous");
  TORCH_CHECK(x.dim() == (columns ? 3 : 2), "condensed_linear: x must be ", columns ? "[n, in, L]" : "[batch, in]",
              ", got shape ", x.sizes());
  const int64_t k = values.size(1), in = x.size(1);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->dim() == 1 && bias->size(0) == out,
                "condensed_linear: bias must be a contiguous float32 CPU tensor of ", out, " elements");
    b = bias->const_data_ptr<float>();
  }
  const float* v = values.const_data_ptr<float>();
  if (columns) {
    const int64_t samples = x.size(0), L = x.size(2);
    at::Tensor y = at::empty({samples, out, L}, x.options());
    if (y.numel() == 0) return y;
    if (map) fill_outputs(y, b, out, L);
    at::Tensor xt = x;
    if (L > chunk_width(in) && padded_stride(L) != L) {  // read in several passes: copy to a better row stride
      xt = at::empty({samples, in, padded_stride(L)}, x.options());
      xt.narrow(2, 0, L).copy_(x);
    }
    dispatch_index(indices, [&](auto* idx) {
      axpy_columns(xt.const_data_ptr<float>(), v, idx, b, y.mutable_data_ptr<float>(), samples, L, xt.size(2), in,
                   held, k, out, map);
    });
    return y;
  }
  const int64_t batch = x.size(0);
  at::Tensor y = at::empty({batch, out}, x.options());
  if (y.numel() == 0) return y;
  if (map) fill_outputs(y, b, out, 1);
  if (batch < kSmallBatch) {
    dispatch_index(indices, [&](auto* idx) {
      gather_rows(x.const_data_ptr<float>(), v, idx, b, y.mutable_data_ptr<float>(), batch, in, held, k, out, map,
                  strategy);
    });
  } else {
    const int64_t ld = batch > chunk_width(in) ? padded_stride(batch) : batch;
    at::Tensor xt = at::empty({in, ld}, x.options());  // x transposed: [in, batch], row stride ld
    transpose(x.const_data_ptr<float>(), xt.mutable_data_ptr<float>(), batch, in, ld);
    dispatch_index(indices, [&](auto* idx) {
      axpy_rows(xt.const_data_ptr<float>(), v, idx, b, y.mutable_data_ptr<float>(), batch, ld, in, held, k, out,
                map);
    });
  }
  return y;
}

std::string isa_name() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lightning_sparse, m) {
  m.def(
      "condensed_linear(Tensor x, Tensor values, Tensor indices, Tensor? bias, int out_features, bool columns=False,"
      " Tensor? rows=None, str strategy=\"auto\") -> Tensor");
  m.def("condensed_isa() -> str", &isa_name);  // which SIMD variant runs here: "avx512", "avx2" or "portable"
  // the small-batch strategy that strategy="auto" takes on this CPU (the CPUID rule): "gather" or "scalar"
  m.def("condensed_default_strategy() -> str", [] { return std::string(strategy_name(kDefaultStrategy)); });
}

TORCH_LIBRARY_IMPL(lightning_sparse, CPU, m) {
  m.impl("condensed_linear", &condensed_linear);
}
