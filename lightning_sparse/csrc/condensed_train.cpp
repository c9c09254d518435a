// The training half of the condensed (constant fan-in) Linear: the products its backward needs, and the moves
// between the dense weight the optimizer updates and the condensed form the kernels read. The forward product is
// `condensed_linear` of csrc/condensed_linear.cpp (same packed layout).
//
// A layer with `held` computed rows (all `out` rows, or those listed in `rows`: neuron ablation empties others),
// each reading k inputs: row h is output o = rows[h] (or h), its entries are indices[h, j] (int32 or int64,
// increasing) and their values W[o, indices[h, j]].
//
// * condensed_train_values(weight, indices, rows, positions, order) -> (values, transposed values)
//     one pass over the rows of the dense weight: the k values of each row, in the packed [blocks, k, 16] layout
//     of condensed_linear (padding 0), and, with `positions` ([held, k] int64, the place of each entry in the
//     column-major (CSC) order of the layer), the same values in that order, for grad_input. With `order` (the
//     tiled order's place of each entry, see below) the values come out in that order instead of packed.
// * condensed_train_grad_input(dy, ptr, cols, values, in) -> dx
//     dx[b, i] = sum_{p in ptr[i]..ptr[i+1]} values[p] * dy[b, cols[p]]: dy W over the layer's columns (CSC; the
//     fan-out of an input varies, so this is a compressed row product of W^T). Each dx is summed by one thread in
//     a fixed order. Below kSmallBatch samples: a gather per entry; above, dy transposed to [out, batch] and one
//     axpy of a batch slice per entry (accumulators in registers), a tile of 16 inputs written out transposed.
// * condensed_train_grad_values(dy, x, indices, rows) -> dvalues [held, k]
//     dvalues[h, j] = sum_b dy[b, o] * x[b, indices[h, j]]: the weight gradient at the active positions only (a
//     sampled dense-dense product). Above kSmallBatch samples, both transposed, and a dot of two batch slices per
//     entry, the batch taken in chunks whose inputs fit in L2 (summed in chunk order: thread-count independent).
// * condensed_train_dense_grad(dvalues, indices, rows, grad)
//     writes the dense gradient into grad [out, in], zero off the active positions: each row zeroed and its k
//     values written in one pass (into memory the caller reuses: a fresh 36 MiB tensor costs ~7x its page faults;
//     with AVX-512 each row is composed in L1 and streamed out). `order`: dvalues in the tiled order's layout.
// * condensed_train_chunks, condensed_train_forward, condensed_train_tiled_grad_input,
//   condensed_train_tiled_grad_values: the tiled order, from kSmallBatch samples up (section "tiled order").
// * condensed_train_plan(mask): the index tensors of a plan, by counting sorts (section "the plan").
//
// float32 only (the Python side falls back to torch's ops otherwise); indices are trusted (checked in Python
// when the condensed form is built from the masks). AVX-512 variants are chosen at run time; other CPUs run the
// portable loops.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LS_X86 1
#include <immintrin.h>
#else
#define LS_X86 0
#endif

namespace {

constexpr int64_t kBlock = 16;            // rows per block of the packed layout (as condensed_linear)
constexpr int64_t kSmallBatch = 8;        // below this, gathers; from here, transposed operands
#include "cpu_passes.h"  // kWorkPerChunk, kChunk, grain, chunk_width, padded_stride, transpose

bool use_avx512() {
  const char* cap = std::getenv("LIGHTNING_SPARSE_ISA");
  const std::string limit = cap ? cap : "";
  if (limit == "portable" || limit == "avx2") return false;
#if LS_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

const bool kAvx512 = use_avx512();

at::Tensor transposed(const at::Tensor& a, int64_t ld) {  // [batch, n] -> [n, ld] (columns past batch unset)
  at::Tensor t = at::empty({a.size(1), ld}, a.options());
  transpose(a.const_data_ptr<float>(), t.mutable_data_ptr<float>(), a.size(0), a.size(1), ld);
  return t;
}

// ------------------------------------------------------------------------------------------------- inner loops
// acc[0:width] = sum_{p < n} v[p] * src[cols[p] * ld + 0:width]
template <typename index_t>
void axpy_portable(const float* v, const index_t* cols, int64_t n, const float* src, int64_t ld, int64_t width,
                   float* acc) {
  std::fill(acc, acc + width, 0.f);
  for (int64_t p = 0; p < n; ++p) {
    const float a = v[p];
    const float* row = src + static_cast<int64_t>(cols[p]) * ld;
    for (int64_t c = 0; c < width; ++c) acc[c] += a * row[c];
  }
}

float dot_portable(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

#if LS_X86
template <int NV, typename index_t>
__attribute__((target("avx512f"))) inline void axpy_avx512_block(const float* v, const index_t* cols, int64_t n,
                                                                 const float* src, int64_t ld, float* acc) {
  __m512 a[NV];
  for (int i = 0; i < NV; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; ++p) {
    const __m512 s = _mm512_set1_ps(v[p]);
    const float* row = src + static_cast<int64_t>(cols[p]) * ld;
    for (int i = 0; i < NV; ++i) a[i] = _mm512_fmadd_ps(s, _mm512_loadu_ps(row + 16 * i), a[i]);
  }
  for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
}

template <typename index_t>
__attribute__((target("avx512f"))) void axpy_avx512(const float* v, const index_t* cols, int64_t n, const float* src,
                                                     int64_t ld, int64_t width, float* acc) {
  int64_t c0 = 0;
  for (; c0 + 128 <= width; c0 += 128) axpy_avx512_block<8>(v, cols, n, src + c0, ld, acc + c0);
  if (c0 + 64 <= width) {
    axpy_avx512_block<4>(v, cols, n, src + c0, ld, acc + c0);
    c0 += 64;
  }
  if (c0 + 32 <= width) {
    axpy_avx512_block<2>(v, cols, n, src + c0, ld, acc + c0);
    c0 += 32;
  }
  if (c0 < width) {
    const int64_t r = width - c0;
    const __mmask16 m0 = static_cast<__mmask16>(r >= 16 ? 0xFFFFu : (1u << r) - 1u);
    const __mmask16 m1 = static_cast<__mmask16>(r <= 16 ? 0u : (1u << (r - 16)) - 1u);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t p = 0; p < n; ++p) {
      const __m512 s = _mm512_set1_ps(v[p]);
      const float* row = src + static_cast<int64_t>(cols[p]) * ld + c0;
      a0 = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(m0, row), a0);
      a1 = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(m1, row + 16), a1);
    }
    _mm512_mask_storeu_ps(acc + c0, m0, a0);
    _mm512_mask_storeu_ps(acc + c0 + 16, m1, a1);
  }
}

__attribute__((target("avx512f"))) float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 64 <= n; c += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 16), _mm512_loadu_ps(b + c + 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 32), _mm512_loadu_ps(b + c + 32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 48), _mm512_loadu_ps(b + c + 48), s3);
  }
  for (; c + 16 <= n; c += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), s0);
  if (c < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - c)) - 1u);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + c), _mm512_maskz_loadu_ps(m, b + c), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

// r[j] = sum of the 16 lanes of v[j]: the 16 horizontal sums at once (4 levels of shuffles and adds)
__attribute__((target("avx512f"))) inline __m512 hsum16(const __m512* v) {
  __m512 s[8], w[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int q = 0; q < 4; ++q)  // per 128-bit lane L: the lane-L sums of v[4q .. 4q+3]
    w[q] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * q], s[2 * q + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * q], s[2 * q + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// dst[j] += dot(g[0:width], xt[idx[j] * ld + 0:width]) for j < 16: 16 accumulators, g read once per 16 dots
template <typename index_t>
__attribute__((target("avx512f"))) void dot16_avx512(const float* g, const float* xt, const index_t* idx, int64_t ld,
                                                      int64_t width, float* dst) {
  __m512 acc[16];
  const float* rows[16];
  for (int j = 0; j < 16; ++j) {
    acc[j] = _mm512_setzero_ps();
    rows[j] = xt + static_cast<int64_t>(idx[j]) * ld;
  }
  int64_t c = 0;
  for (; c + 16 <= width; c += 16) {
    const __m512 d = _mm512_loadu_ps(g + c);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(d, _mm512_loadu_ps(rows[j] + c), acc[j]);
  }
  if (c < width) {
    const __mmask16 m = static_cast<__mmask16>((1u << (width - c)) - 1u);
    const __m512 d = _mm512_maskz_loadu_ps(m, g + c);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, rows[j] + c), acc[j]);
  }
  _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), hsum16(acc)));
}
#endif

#if LS_X86
__attribute__((target("avx512f"))) void stream_row(const float* src, float* dst, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) _mm512_stream_ps(dst + c, _mm512_load_ps(src + c));
}

void fence() { _mm_sfence(); }  // the streamed stores are visible before the op returns
#endif

template <typename index_t>
inline void axpy(const float* v, const index_t* cols, int64_t n, const float* src, int64_t ld, int64_t width,
                 float* acc) {
#if LS_X86
  if (kAvx512) return axpy_avx512(v, cols, n, src, ld, width, acc);
#endif
  axpy_portable(v, cols, n, src, ld, width, acc);
}

inline float dot(const float* a, const float* b, int64_t n) {
#if LS_X86
  if (kAvx512) return dot_avx512(a, b, n);
#endif
  return dot_portable(a, b, n);
}

// ------------------------------------------------------------------------------------------------- checks
const int64_t* rows_map(const std::optional<at::Tensor>& rows, int64_t out, int64_t held, const char* name) {
  if (!rows.has_value() || !rows->defined()) {
    TORCH_CHECK(held == out, name, ": ", held, " condensed rows for ", out, " outputs need `rows`");
    return nullptr;
  }
  TORCH_CHECK(rows->is_cpu() && rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->dim() == 1 &&
                  rows->size(0) == held,
              name, ": rows must be a contiguous 1-D int64 CPU tensor of ", held, " entries");
  return rows->const_data_ptr<int64_t>();
}

void check_float(const at::Tensor& t, const char* what, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name, ": ", what,
              " must be a contiguous float32 CPU tensor, got ", t.scalar_type(), t.is_contiguous() ? "" : " (strided)");
}

void check_indices(const at::Tensor& indices, const char* name) {
  TORCH_CHECK(indices.is_cpu() && indices.dim() == 2 && indices.is_contiguous() &&
                  (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong),
              name, ": indices must be a contiguous [held, k] int32 or int64 CPU tensor");
}

// ------------------------------------------------------------------------------------------------- the ops
std::tuple<at::Tensor, at::Tensor> condensed_train_values(const at::Tensor& weight, const at::Tensor& indices,
                                                          const std::optional<at::Tensor>& rows,
                                                          const std::optional<at::Tensor>& positions,
                                                          const std::optional<at::Tensor>& order) {
  static constexpr const char* name = "condensed_train_values";
  check_float(weight, "weight", name);
  check_indices(indices, name);
  TORCH_CHECK(weight.dim() == 2, name, ": weight must be [out, in]");
  const int64_t out = weight.size(0), in = weight.size(1), held = indices.size(0), k = indices.size(1);
  const int64_t* map = rows_map(rows, out, held, name);
  const int64_t blocks = (held + kBlock - 1) / kBlock;
  const bool packed = !(order.has_value() && order->defined());
  const int64_t* ord = nullptr;
  if (!packed) {
    TORCH_CHECK(order->is_cpu() && order->scalar_type() == at::kLong && order->is_contiguous() &&
                    order->numel() == held * k,
                name, ": order must be a contiguous int64 CPU tensor of ", held * k, " entries");
    ord = order->const_data_ptr<int64_t>();
  }
  at::Tensor out_values = packed ? at::empty({blocks, k, kBlock}, weight.options()) : at::empty({held * k}, weight.options());
  const bool transpose_too = positions.has_value() && positions->defined();
  const int64_t* pos = nullptr;
  at::Tensor vt = at::empty({transpose_too ? held * k : 0}, weight.options());
  if (transpose_too) {
    TORCH_CHECK(positions->is_cpu() && positions->scalar_type() == at::kLong && positions->is_contiguous() &&
                    positions->numel() == held * k,
                name, ": positions must be a contiguous int64 CPU tensor of ", held * k, " entries");
    pos = positions->const_data_ptr<int64_t>();
  }
  const float* w = weight.const_data_ptr<float>();
  float* pv = out_values.mutable_data_ptr<float>();
  float* t = vt.mutable_data_ptr<float>();
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), name, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    if (!packed) {
      at::parallel_for(0, held, grain(k), [&](int64_t begin, int64_t end) {
        for (int64_t h = begin; h < end; ++h) {
          const float* row = w + (map ? map[h] : h) * in;
          const index_t* ih = idx + h * k;
          const int64_t* oh = ord + h * k;
          for (int64_t j = 0; j < k; ++j) pv[oh[j]] = row[ih[j]];
          if (pos)
            for (int64_t j = 0; j < k; ++j) t[pos[h * k + j]] = row[ih[j]];
        }
      });
      return;
    }
    at::parallel_for(0, blocks, grain(kBlock * k), [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        float* dst = pv + blk * k * kBlock;
        for (int64_t r = 0; r < kBlock; ++r) {
          const int64_t h = blk * kBlock + r;
          if (h >= held) {
            for (int64_t j = 0; j < k; ++j) dst[j * kBlock + r] = 0.f;
            continue;
          }
          const float* row = w + (map ? map[h] : h) * in;
          const index_t* ih = idx + h * k;
          for (int64_t j = 0; j < k; ++j) dst[j * kBlock + r] = row[ih[j]];
          if (pos)
            for (int64_t j = 0; j < k; ++j) t[pos[h * k + j]] = row[ih[j]];
        }
      }
    });
  });
  return {out_values, vt};
}

at::Tensor condensed_train_grad_input(const at::Tensor& dy, const at::Tensor& ptr, const at::Tensor& cols,
                                      const at::Tensor& values, int64_t in) {
  static constexpr const char* name = "condensed_train_grad_input";
  check_float(dy, "dy", name);
  check_float(values, "values", name);
  TORCH_CHECK(dy.dim() == 2, name, ": dy must be [batch, out]");
  TORCH_CHECK(ptr.is_cpu() && ptr.scalar_type() == at::kLong && ptr.is_contiguous() && ptr.numel() == in + 1, name,
              ": ptr must be a contiguous int64 CPU tensor of in + 1 = ", in + 1, " entries");
  TORCH_CHECK(cols.is_cpu() && cols.is_contiguous() && cols.dim() == 1 && cols.numel() == values.numel() &&
                  (cols.scalar_type() == at::kInt || cols.scalar_type() == at::kLong),
              name, ": cols must be a contiguous 1-D int32 or int64 CPU tensor, one per value");
  const int64_t batch = dy.size(0), out = dy.size(1);
  const int64_t* pp = ptr.const_data_ptr<int64_t>();
  TORCH_CHECK(pp[in] == values.numel(), name, ": ptr[in] must be the number of values");
  at::Tensor dx = at::empty({batch, in}, dy.options());
  if (dx.numel() == 0) return dx;
  const float* v = values.const_data_ptr<float>();
  float* d = dx.mutable_data_ptr<float>();
  const int64_t nnz_per_input = std::max<int64_t>(1, values.numel() / std::max<int64_t>(in, 1));
  if (batch < kSmallBatch) {
    const float* g = dy.const_data_ptr<float>();
    AT_DISPATCH_INDEX_TYPES(cols.scalar_type(), name, [&] {
      const index_t* c = cols.const_data_ptr<index_t>();
      at::parallel_for(0, in, grain(nnz_per_input * batch), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          float acc[kSmallBatch] = {};
          for (int64_t p = pp[i]; p < pp[i + 1]; ++p) {
            const float a = v[p];
            const float* col = g + static_cast<int64_t>(c[p]);
            for (int64_t b = 0; b < batch; ++b) acc[b] += a * col[b * out];
          }
          for (int64_t b = 0; b < batch; ++b) d[b * in + i] = acc[b];
        }
      });
    });
    return dx;
  }
  const int64_t chunk = chunk_width(out);
  const int64_t ld = batch > chunk ? padded_stride(batch) : batch;
  at::Tensor dyt = transposed(dy, ld);
  const float* g = dyt.const_data_ptr<float>();
  const int64_t tiles = (in + kBlock - 1) / kBlock;
  AT_DISPATCH_INDEX_TYPES(cols.scalar_type(), name, [&] {
    const index_t* c = cols.const_data_ptr<index_t>();
    at::parallel_for(0, tiles, grain(kBlock * nnz_per_input * batch), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(kBlock * chunk);
      float* tile = buffer.data();
      for (int64_t c0 = 0; c0 < batch; c0 += chunk) {
        const int64_t width = std::min(chunk, batch - c0);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t i0 = t * kBlock, n = std::min(kBlock, in - i0);
          for (int64_t r = 0; r < n; ++r) {
            const int64_t i = i0 + r;
            axpy(v + pp[i], c + pp[i], pp[i + 1] - pp[i], g + c0, ld, width, tile + r * chunk);
          }
          for (int64_t s = 0; s < width; ++s) {
            float* dst = d + (c0 + s) * in + i0;
            for (int64_t r = 0; r < n; ++r) dst[r] = tile[r * chunk + s];
          }
        }
      }
    });
  });
  return dx;
}

at::Tensor condensed_train_grad_values(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices,
                                       const std::optional<at::Tensor>& rows) {
  static constexpr const char* name = "condensed_train_grad_values";
  check_float(dy, "dy", name);
  check_float(x, "x", name);
  check_indices(indices, name);
  TORCH_CHECK(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0), name,
              ": dy [batch, out] and x [batch, in] must have the same batch");
  const int64_t batch = x.size(0), in = x.size(1), out = dy.size(1), held = indices.size(0), k = indices.size(1);
  const int64_t* map = rows_map(rows, out, held, name);
  at::Tensor dv = at::zeros({held, k}, x.options());
  if (dv.numel() == 0 || batch == 0) return dv;
  float* dvp = dv.mutable_data_ptr<float>();
  if (batch < kSmallBatch) {
    const float* g = dy.const_data_ptr<float>();
    const float* xp = x.const_data_ptr<float>();
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), name, [&] {
      const index_t* idx = indices.const_data_ptr<index_t>();
      at::parallel_for(0, held, grain(k * batch), [&](int64_t begin, int64_t end) {
        for (int64_t h = begin; h < end; ++h) {
          const int64_t o = map ? map[h] : h;
          float* dst = dvp + h * k;
          const index_t* ih = idx + h * k;
          for (int64_t b = 0; b < batch; ++b) {  // in sample order, as the large-batch dots sum
            const float gb = g[b * out + o];
            const float* xb = xp + b * in;
            for (int64_t j = 0; j < k; ++j) dst[j] += gb * xb[ih[j]];
          }
        }
      });
    });
    return dv;
  }
  const int64_t chunk = chunk_width(in);
  const int64_t ldx = batch > chunk ? padded_stride(batch) : batch;
  at::Tensor xt = transposed(x, ldx), dyt = transposed(dy, ldx);
  const float* xp = xt.const_data_ptr<float>();
  const float* g = dyt.const_data_ptr<float>();
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), name, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    at::parallel_for(0, held, grain(k * batch), [&](int64_t begin, int64_t end) {
      for (int64_t c0 = 0; c0 < batch; c0 += chunk) {
        const int64_t width = std::min(chunk, batch - c0);
        for (int64_t h = begin; h < end; ++h) {
          const float* gh = g + (map ? map[h] : h) * ldx + c0;
          float* dst = dvp + h * k;
          const index_t* ih = idx + h * k;
          int64_t j = 0;
#if LS_X86
          if (kAvx512)
            for (; j + 16 <= k; j += 16) dot16_avx512(gh, xp + c0, ih + j, ldx, width, dst + j);
#endif
          for (; j < k; ++j) dst[j] += dot(gh, xp + static_cast<int64_t>(ih[j]) * ldx + c0, width);
        }
      }
    });
  });
  return dv;
}

void condensed_train_dense_grad(const at::Tensor& dvalues, const at::Tensor& indices,
                                const std::optional<at::Tensor>& rows, at::Tensor& grad,
                                const std::optional<at::Tensor>& order) {
  static constexpr const char* name = "condensed_train_dense_grad";
  check_float(dvalues, "dvalues", name);
  check_float(grad, "grad", name);
  check_indices(indices, name);
  TORCH_CHECK(dvalues.numel() == indices.numel(), name, ": dvalues and indices must have as many entries");
  const int64_t* ord = nullptr;  // dvalues in tile-major order: entry (h, j) at ord[h * k + j]
  if (order.has_value() && order->defined()) {
    TORCH_CHECK(order->is_cpu() && order->scalar_type() == at::kLong && order->is_contiguous() &&
                    order->numel() == indices.numel(),
                name, ": order must be a contiguous int64 CPU tensor, one per entry");
    ord = order->const_data_ptr<int64_t>();
  }
  TORCH_CHECK(grad.dim() == 2, name, ": grad must be [out, in]");
  const int64_t held = indices.size(0), k = indices.size(1), out = grad.size(0), in = grad.size(1);
  const int64_t* map = rows_map(rows, out, held, name);
  float* gp = grad.mutable_data_ptr<float>();
  const float* dv = dvalues.const_data_ptr<float>();
  if (map) grad.zero_();  // rows emptied by neuron ablation stay zero
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), name, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    at::parallel_for(0, held, grain(in), [&](int64_t begin, int64_t end) {
#if LS_X86
      if (kAvx512 && !map && in % 16 == 0 && reinterpret_cast<uintptr_t>(gp) % 64 == 0) {
        // each row composed in a buffer and streamed out: no read of the old gradient (half the traffic)
        std::vector<float, std::allocator<float>> buffer(in + 16);
        float* row = buffer.data();
        while (reinterpret_cast<uintptr_t>(row) % 64) ++row;
        for (int64_t h = begin; h < end; ++h) {
          std::fill(row, row + in, 0.f);
          if (ord)
            for (int64_t j = 0; j < k; ++j) row[idx[h * k + j]] = dv[ord[h * k + j]];
          else
            for (int64_t j = 0; j < k; ++j) row[idx[h * k + j]] = dv[h * k + j];
          stream_row(row, gp + h * in, in);
        }
        fence();
        return;
      }
#endif
      for (int64_t h = begin; h < end; ++h) {
        float* row = gp + (map ? map[h] : h) * in;
        if (!map) std::fill(row, row + in, 0.f);
        if (ord)
          for (int64_t j = 0; j < k; ++j) row[idx[h * k + j]] = dv[ord[h * k + j]];
        else
          for (int64_t j = 0; j < k; ++j) row[idx[h * k + j]] = dv[h * k + j];
      }
    });
  });
}

// ------------------------------------------------------------------------------------------------- tiled order
// From kSmallBatch samples up, the training step runs in the *tiled* order. Both operands of a product are held as
// chunks of kW = 64 samples, transposed: [chunks, n, 64] (condensed_train_chunks; the last chunk padded with
// zeros), so that the 64 samples of one input are 256 contiguous bytes. A row's entries are split by the tile of
// kTile = 256 inputs they read, and the entries are stored tile-major (tile, then row, then input: every pass over a
// tile streams its entries; `seg` [tiles * rows + 1] the offsets of the runs, computed once per mask in Python); a
// tile of one chunk, 256 x 64 floats = 64 KiB, stays in L1/L2 while every row reads its entries in that tile, and the
// rows' 64 running sums go to a buffer (L2) between tiles. Without tiles, every multiply-add of 16 samples loads a
// random 64-byte line from L2 or beyond, and the products run ~4x slower. The tile's size trades the run overhead
// (each (tile, row) run loads and stores its 64 sums) against locality: on an Emerald Rapids Xeon (48 KiB L1,
// 2 MiB L2), 3072x3072 at density 0.1, batch 256, 256 inputs ran the three products 5-15 % faster than 128 (a
// tile that fits L1) and than 512; 64 ran 30-50 % slower (measured with interleaved runs of both builds). Chunks
// of 32 or 128 samples (tiles of 512, or of 128 and 256 inputs) ran 10-35 % slower than 64 there.
// Every sum runs in a fixed order (chunks, then tiles, then entries): results do not depend on the threads.
constexpr int64_t kW = 64;
constexpr int64_t kTile = 256;

// dst[c][i][s] = src[(c * kW + s) * n + i] (0 past the batch): [batch, n] -> [chunks, n, kW]
at::Tensor chunks_of(const at::Tensor& src) {
  const int64_t batch = src.size(0), n = src.size(1), chunks = (batch + kW - 1) / kW;
  at::Tensor dst = at::empty({chunks, n, kW}, src.options());
  const float* s = src.const_data_ptr<float>();
  float* d = dst.mutable_data_ptr<float>();
  const int64_t tiles = (n + 15) / 16;
  at::parallel_for(0, chunks * tiles, std::max<int64_t>(1, kWorkPerChunk / (16 * kW)), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t c = q / tiles, i0 = (q % tiles) * 16, i1 = std::min(n, i0 + 16);
      float* base = d + c * n * kW;
      for (int64_t x = 0; x < kW; ++x) {
        const int64_t b = c * kW + x;
        if (b < batch) {
          const float* row = s + b * n;
          for (int64_t i = i0; i < i1; ++i) base[i * kW + x] = row[i];
        } else {
          for (int64_t i = i0; i < i1; ++i) base[i * kW + x] = 0.f;
        }
      }
    }
  });
  return dst;
}

// acc[0:64] (+)= sum_{p in [p0, p1)} v[p] * src[idx[p] * kW + 0:64]
template <typename index_t>
inline void seg_axpy_portable(const float* v, const index_t* idx, int64_t p0, int64_t p1, const float* src, bool first,
                              float* acc) {
  if (first) std::fill(acc, acc + kW, 0.f);
  for (int64_t p = p0; p < p1; ++p) {
    const float a = v[p];
    const float* row = src + static_cast<int64_t>(idx[p]) * kW;
    for (int64_t s = 0; s < kW; ++s) acc[s] += a * row[s];
  }
}

// dv[p] += dot(g[0:64], src[idx[p] * kW + 0:64]) for p in [p0, p1)
template <typename index_t>
inline void seg_dot_portable(const float* g, const index_t* idx, int64_t p0, int64_t p1, const float* src, float* dv) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* row = src + static_cast<int64_t>(idx[p]) * kW;
    float s = 0.f;
    for (int64_t x = 0; x < kW; ++x) s += g[x] * row[x];
    dv[p] += s;
  }
}

#if LS_X86
template <typename index_t>
__attribute__((target("avx512f"))) inline void seg_axpy_avx512(const float* v, const index_t* idx, int64_t p0,
                                                               int64_t p1, const float* src, bool first, float* acc) {
  __m512 a0, a1, a2, a3;
  if (first) {
    a0 = a1 = a2 = a3 = _mm512_setzero_ps();
  } else {
    a0 = _mm512_loadu_ps(acc), a1 = _mm512_loadu_ps(acc + 16), a2 = _mm512_loadu_ps(acc + 32);
    a3 = _mm512_loadu_ps(acc + 48);
  }
  for (int64_t p = p0; p < p1; ++p) {
    const __m512 s = _mm512_set1_ps(v[p]);
    const float* row = src + static_cast<int64_t>(idx[p]) * kW;
    a0 = _mm512_fmadd_ps(s, _mm512_loadu_ps(row), a0);
    a1 = _mm512_fmadd_ps(s, _mm512_loadu_ps(row + 16), a1);
    a2 = _mm512_fmadd_ps(s, _mm512_loadu_ps(row + 32), a2);
    a3 = _mm512_fmadd_ps(s, _mm512_loadu_ps(row + 48), a3);
  }
  _mm512_storeu_ps(acc, a0), _mm512_storeu_ps(acc + 16, a1), _mm512_storeu_ps(acc + 32, a2);
  _mm512_storeu_ps(acc + 48, a3);
}

template <typename index_t>
__attribute__((target("avx512f"))) inline void seg_dot_avx512(const float* g, const index_t* idx, int64_t p0,
                                                              int64_t p1, const float* src, float* dv) {
  const __m512 g0 = _mm512_loadu_ps(g), g1 = _mm512_loadu_ps(g + 16), g2 = _mm512_loadu_ps(g + 32),
               g3 = _mm512_loadu_ps(g + 48);
  for (int64_t p = p0; p < p1; p += 16) {
    const int64_t n = std::min<int64_t>(16, p1 - p);
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) {
      if (j < n) {
        const float* row = src + static_cast<int64_t>(idx[p + j]) * kW;
        __m512 a = _mm512_mul_ps(g0, _mm512_loadu_ps(row));
        a = _mm512_fmadd_ps(g1, _mm512_loadu_ps(row + 16), a);
        a = _mm512_fmadd_ps(g2, _mm512_loadu_ps(row + 32), a);
        acc[j] = _mm512_fmadd_ps(g3, _mm512_loadu_ps(row + 48), a);
      } else {
        acc[j] = _mm512_setzero_ps();
      }
    }
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1u);
    _mm512_mask_storeu_ps(dv + p, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dv + p), hsum16(acc)));
  }
}
// dst[j * ld_dst + i] = src[i * ld_src + j] (+ bias[i]) for i, j < 16: a 16 x 16 block transposed in registers (the
// write-out of tiled_rows: one scalar move per output was most of a small layer's product)
__attribute__((target("avx512f"))) void transpose16_avx512(const float* src, int64_t ld_src, float* dst,
                                                            int64_t ld_dst, const float* bias) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], _MM_SHUFFLE(2, 0, 2, 0));
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], _MM_SHUFFLE(3, 1, 3, 1));
    }
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_ps(dst + j * ld_dst, _mm512_add_ps(_mm512_shuffle_f32x4(t[j], t[8 + j], _MM_SHUFFLE(2, 0, 2, 0)), b));
    _mm512_storeu_ps(dst + (8 + j) * ld_dst,
                     _mm512_add_ps(_mm512_shuffle_f32x4(t[j], t[8 + j], _MM_SHUFFLE(3, 1, 3, 1)), b));
  }
}
#endif

template <typename index_t>
inline void seg_axpy(const float* v, const index_t* idx, int64_t p0, int64_t p1, const float* src, bool first,
                     float* acc) {
#if LS_X86
  if (kAvx512) return seg_axpy_avx512(v, idx, p0, p1, src, first, acc);
#endif
  seg_axpy_portable(v, idx, p0, p1, src, first, acc);
}

template <typename index_t>
inline void seg_dot(const float* g, const index_t* idx, int64_t p0, int64_t p1, const float* src, float* dv) {
#if LS_X86
  if (kAvx512) return seg_dot_avx512(g, idx, p0, p1, src, dv);
#endif
  seg_dot_portable(g, idx, p0, p1, src, dv);
}

void check_seg(const at::Tensor& seg, int64_t rows, int64_t n_src, const char* name) {
  const int64_t tiles = (n_src + kTile - 1) / kTile;
  TORCH_CHECK(seg.is_cpu() && seg.scalar_type() == at::kLong && seg.is_contiguous() && seg.dim() == 1 &&
                  seg.numel() == tiles * rows + 1,
              name, ": seg must be a contiguous 1-D int64 CPU tensor of tiles * rows + 1 = ", tiles * rows + 1,
              " entries");
}

// out[b * out_ld + (map ? map[h] : h)] = sum over row h's entries of v[p] * src[b][idx[p]] (+ bias), b < batch
template <typename index_t>
void tiled_rows(const float* src, int64_t n_src, int64_t chunks, int64_t batch, const float* v, const index_t* idx,
                const int64_t* seg, int64_t rows, const float* bias, const int64_t* map, float* out, int64_t out_ld,
                int64_t work_per_row) {
  const int64_t tiles = (n_src + kTile - 1) / kTile, blocks = (rows + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, grain(kBlock * work_per_row), [&](int64_t begin, int64_t end) {
    const int64_t h0 = begin * kBlock, h1 = std::min(rows, end * kBlock);
    std::vector<float> buffer((h1 - h0) * kW);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* chunk = src + c * n_src * kW;
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t h = h0; h < h1; ++h)
          seg_axpy(v, idx, seg[t * rows + h], seg[t * rows + h + 1], chunk, t == 0, buffer.data() + (h - h0) * kW);
      if (tiles == 0) std::fill(buffer.begin(), buffer.end(), 0.f);
      const int64_t width = std::min(kW, batch - c * kW);
      for (int64_t r0 = h0; r0 < h1; r0 += kBlock) {  // 16 rows at a time: one cache line of out per sample
        const int64_t r1 = std::min(h1, r0 + kBlock);
        int64_t s0 = 0;
#if LS_X86
        if (kAvx512 && !map && r1 - r0 == kBlock)  // 16 x 16 blocks transposed in registers
          for (; s0 + 16 <= width; s0 += 16)
            transpose16_avx512(buffer.data() + (r0 - h0) * kW + s0, kW, out + (c * kW + s0) * out_ld + r0, out_ld,
                               bias ? bias + r0 : nullptr);
#endif
        for (int64_t s = s0; s < width; ++s) {
          float* dst = out + (c * kW + s) * out_ld;
          for (int64_t h = r0; h < r1; ++h) {
            const int64_t o = map ? map[h] : h;
            dst[o] = buffer[(h - h0) * kW + s] + (bias ? bias[o] : 0.f);
          }
        }
      }
    }
  });
}

// (y, x in chunks) = condensed_train_forward(x, values, indices, seg, bias, out_features, rows): values and indices
// in tile-major order (tile, row, then increasing input), seg [tiles * held + 1] the offsets of the (tile, row) runs
std::tuple<at::Tensor, at::Tensor> condensed_train_forward(const at::Tensor& x, const at::Tensor& values,
                                                           const at::Tensor& indices, const at::Tensor& seg,
                                                           const std::optional<at::Tensor>& bias, int64_t out,
                                                           const std::optional<at::Tensor>& rows) {
  static constexpr const char* name = "condensed_train_forward";
  check_float(x, "x", name);
  check_float(values, "values", name);
  TORCH_CHECK(x.dim() == 2 && values.numel() == indices.numel() && indices.dim() == 1, name,
              ": x [batch, in], values and indices 1-D, one per entry");
  TORCH_CHECK(indices.is_cpu() && indices.is_contiguous() &&
                  (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong),
              name, ": indices must be a contiguous int32 or int64 CPU tensor");
  const int64_t batch = x.size(0), in = x.size(1);
  TORCH_CHECK(seg.numel() > 0, name, ": seg must not be empty");
  const int64_t tiles_in = (in + kTile - 1) / kTile, held = tiles_in ? (seg.numel() - 1) / tiles_in : 0;
  const int64_t k = held ? indices.numel() / held : 0;
  const int64_t* map = rows_map(rows, out, held, name);
  check_seg(seg, held, in, name);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_float(*bias, "bias", name);
    TORCH_CHECK(bias->numel() == out, name, ": bias must have out_features entries");
    b = bias->const_data_ptr<float>();
  }
  at::Tensor xc = chunks_of(x);
  at::Tensor y = map ? at::empty({batch, out}, x.options()) : at::empty({batch, out}, x.options());
  if (map) {  // rows emptied by neuron ablation: their bias (or 0)
    if (b) y.copy_(bias->view({1, out}).expand({batch, out}));
    else y.zero_();
  }
  if (batch == 0) return {y, xc};
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), name, [&] {
    tiled_rows(xc.const_data_ptr<float>(), in, xc.size(0), batch, values.const_data_ptr<float>(),
               indices.const_data_ptr<index_t>(), seg.const_data_ptr<int64_t>(), held, b, map, y.mutable_data_ptr<float>(),
               out, k * batch);
  });
  return {y, xc};
}

// dx = condensed_train_tiled_grad_input(dy in chunks, batch, ptr, cols, values (CSC order), colseg, in)
at::Tensor condensed_train_tiled_grad_input(const at::Tensor& dyc, int64_t batch, const at::Tensor& cols,
                                            const at::Tensor& values, const at::Tensor& colseg, int64_t in) {
  static constexpr const char* name = "condensed_train_tiled_grad_input";
  check_float(dyc, "dy chunks", name);
  check_float(values, "values", name);
  TORCH_CHECK(dyc.dim() == 3 && dyc.size(2) == kW && dyc.size(0) == (batch + kW - 1) / kW, name,
              ": dy chunks must be [ceil(batch / 64), out, 64]");
  TORCH_CHECK(cols.is_cpu() && cols.is_contiguous() && cols.dim() == 1 && cols.numel() == values.numel() &&
                  (cols.scalar_type() == at::kInt || cols.scalar_type() == at::kLong),
              name, ": cols must be a contiguous 1-D int32 or int64 CPU tensor, one per value");
  const int64_t out = dyc.size(1);
  check_seg(colseg, in, out, name);
  at::Tensor dx = at::empty({batch, in}, dyc.options());
  if (dx.numel() == 0) return dx;
  const int64_t per = std::max<int64_t>(1, values.numel() / std::max<int64_t>(in, 1)) * batch;
  AT_DISPATCH_INDEX_TYPES(cols.scalar_type(), name, [&] {
    tiled_rows(dyc.const_data_ptr<float>(), out, dyc.size(0), batch, values.const_data_ptr<float>(),
               cols.const_data_ptr<index_t>(), colseg.const_data_ptr<int64_t>(), in, static_cast<const float*>(nullptr),
               static_cast<const int64_t*>(nullptr), dx.mutable_data_ptr<float>(), in, per);
  });
  return dx;
}

// dvalues (tile-major, as the forward's values) = condensed_train_tiled_grad_values(dy in chunks, x in chunks, indices,
// seg, rows)
at::Tensor condensed_train_tiled_grad_values(const at::Tensor& dyc, const at::Tensor& xc, const at::Tensor& indices,
                                             const at::Tensor& seg, const std::optional<at::Tensor>& rows) {
  static constexpr const char* name = "condensed_train_tiled_grad_values";
  check_float(dyc, "dy chunks", name);
  check_float(xc, "x chunks", name);
  TORCH_CHECK(indices.is_cpu() && indices.is_contiguous() && indices.dim() == 1 &&
                  (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong),
              name, ": indices must be a contiguous 1-D int32 or int64 CPU tensor");
  TORCH_CHECK(dyc.dim() == 3 && xc.dim() == 3 && dyc.size(0) == xc.size(0) && dyc.size(2) == kW && xc.size(2) == kW,
              name, ": dy and x chunks must be [chunks, n, 64] with the same chunks");
  const int64_t chunks = xc.size(0), in = xc.size(1), out = dyc.size(1);
  const int64_t tiles_in = (in + kTile - 1) / kTile, held = tiles_in ? (seg.numel() - 1) / tiles_in : 0;
  const int64_t k = held ? indices.numel() / held : 0;
  const int64_t* map = rows_map(rows, out, held, name);
  check_seg(seg, held, in, name);
  at::Tensor dv = at::zeros({indices.numel()}, xc.options());
  if (dv.numel() == 0 || chunks == 0) return dv;
  const int64_t tiles = (in + kTile - 1) / kTile, blocks = (held + kBlock - 1) / kBlock;
  float* dvp = dv.mutable_data_ptr<float>();
  const int64_t* sg = seg.const_data_ptr<int64_t>();
  const float* xs = xc.const_data_ptr<float>();
  const float* gs = dyc.const_data_ptr<float>();
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), name, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    at::parallel_for(0, blocks, grain(kBlock * k * chunks * kW), [&](int64_t begin, int64_t end) {
      const int64_t h0 = begin * kBlock, h1 = std::min(held, end * kBlock);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* xchunk = xs + c * in * kW;
        const float* gchunk = gs + c * out * kW;
        for (int64_t t = 0; t < tiles; ++t)
          for (int64_t h = h0; h < h1; ++h)
            seg_dot(gchunk + (map ? map[h] : h) * kW, idx, sg[t * held + h], sg[t * held + h + 1], xchunk, dvp);
      }
    });
  });
  return dv;
}

at::Tensor condensed_train_chunks(const at::Tensor& a) {
  check_float(a, "input", "condensed_train_chunks");
  TORCH_CHECK(a.dim() == 2, "condensed_train_chunks: input must be [batch, n]");
  return chunks_of(a);
}

// ------------------------------------------------------------------------------------------------- the plan
// condensed_train_plan(mask [out, in] bool) -> (counts, indices, flat, positions, ptr, cols, order, tindices, seg,
// tpositions, tcols, colseg): the index tensors of CondensedPlan (compute/condensed.py, where each is described), in
// one pass over the mask and two over its entries, with counting sorts where the torch path sorts (an argsort of the
// entries was most of a plan's time: 0.4 s for 3072 x 3072 at density 0.1). Entries are visited row-major; within a
// column, a (tile, row) run or a (tile, column) run they then come in increasing order, which is what the sorts
// give. `counts` are the entries per row; the caller refuses masks whose non-empty rows differ (indices are laid
// out row after row regardless). int32 indices and rows: the caller takes the torch path past 2^31.
std::vector<at::Tensor> condensed_train_plan(const at::Tensor& mask) {
  static constexpr const char* name = "condensed_train_plan";
  TORCH_CHECK(mask.is_cpu() && mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 2, name,
              ": mask must be a contiguous 2-D torch.bool CPU tensor");
  const int64_t out = mask.size(0), in = mask.size(1);
  TORCH_CHECK(out < (int64_t{1} << 31) && in < (int64_t{1} << 31), name, ": more than 2^31 rows or inputs");
  const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
  const auto i64 = mask.options().dtype(at::kLong), i32 = mask.options().dtype(at::kInt);
  at::Tensor counts = at::zeros({out}, i64), ptr = at::zeros({in + 1}, i64);
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  int64_t* pp = ptr.mutable_data_ptr<int64_t>();
  // pass 1: the inputs of every row's entries (8 mask bytes at a time, skipping words of zeros), row-major
  std::vector<int32_t> inputs;
  inputs.reserve(static_cast<size_t>(out * in / 8 + 16));
  for (int64_t o = 0; o < out; ++o) {
    const uint8_t* row = m + o * in;
    const size_t before = inputs.size();
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) {
      uint64_t word;
      std::memcpy(&word, row + i, sizeof(word));
      while (word) {
        inputs.push_back(static_cast<int32_t>(i + (__builtin_ctzll(word) >> 3)));
        word &= word - 1;
      }
    }
    for (; i < in; ++i)
      if (row[i]) inputs.push_back(static_cast<int32_t>(i));
    cnt[o] = static_cast<int64_t>(inputs.size() - before);
  }
  const int64_t nnz = static_cast<int64_t>(inputs.size());
  for (const int32_t i : inputs) ++pp[i + 1];
  for (int64_t i = 0; i < in; ++i) pp[i + 1] += pp[i];
  int64_t held = 0;
  for (int64_t o = 0; o < out; ++o) held += cnt[o] > 0;
  const int64_t tiles_in = (in + kTile - 1) / kTile, tiles_out = (out + kTile - 1) / kTile;
  at::Tensor indices = at::empty({nnz}, i32), flat = at::empty({nnz}, i64), positions = at::empty({nnz}, i64);
  at::Tensor cols = at::empty({nnz}, i32), order = at::empty({nnz}, i64), tindices = at::empty({nnz}, i32);
  at::Tensor seg = at::zeros({tiles_in * held + 1}, i64), tpositions = at::empty({nnz}, i64);
  at::Tensor tcols = at::empty({nnz}, i32), colseg = at::zeros({tiles_out * in + 1}, i64);
  int32_t* idx = indices.mutable_data_ptr<int32_t>();
  int64_t* fl = flat.mutable_data_ptr<int64_t>();
  int64_t* pos = positions.mutable_data_ptr<int64_t>();
  int32_t* cl = cols.mutable_data_ptr<int32_t>();
  int64_t* ord = order.mutable_data_ptr<int64_t>();
  int32_t* tidx = tindices.mutable_data_ptr<int32_t>();
  int64_t* sg = seg.mutable_data_ptr<int64_t>();
  int64_t* tpos = tpositions.mutable_data_ptr<int64_t>();
  int32_t* tcl = tcols.mutable_data_ptr<int32_t>();
  int64_t* csg = colseg.mutable_data_ptr<int64_t>();
  std::copy(inputs.begin(), inputs.end(), idx);
  // run sizes: (tile of inputs, computed row) and (tile of rows, column), then their starts (exclusive sums)
  for (int64_t o = 0, e = 0, h = 0; o < out; ++o) {
    if (!cnt[o]) continue;
    for (const int64_t end = e + cnt[o]; e < end; ++e) {
      ++sg[(idx[e] / kTile) * held + h + 1];
      ++csg[(o / kTile) * in + idx[e] + 1];
    }
    ++h;
  }
  for (int64_t r = 0; r < tiles_in * held; ++r) sg[r + 1] += sg[r];
  for (int64_t r = 0; r < tiles_out * in; ++r) csg[r + 1] += csg[r];
  std::vector<int64_t> col_next(pp, pp + in), run_next(sg, sg + tiles_in * held);
  std::vector<int64_t> colrun_next(csg, csg + tiles_out * in);
  for (int64_t o = 0, e = 0, h = 0; o < out; ++o) {  // pass 2: every entry, row-major
    if (!cnt[o]) continue;
    for (const int64_t end = e + cnt[o]; e < end; ++e) {
      const int64_t i = idx[e];
      fl[e] = o * in + i;
      const int64_t p = col_next[i]++;
      pos[e] = p;
      cl[p] = static_cast<int32_t>(o);
      const int64_t f = run_next[(i / kTile) * held + h]++;
      ord[e] = f;
      tidx[f] = static_cast<int32_t>(i);
      const int64_t t = colrun_next[(o / kTile) * in + i]++;
      tpos[e] = t;
      tcl[t] = static_cast<int32_t>(o);
    }
    ++h;
  }
  return {counts, indices, flat, positions, ptr, cols, order, tindices, seg, tpositions, tcols, colseg};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lightning_sparse, m) {
  m.def("condensed_train_values(Tensor weight, Tensor indices, Tensor? rows, Tensor? positions, Tensor? order) -> (Tensor, Tensor)");
  m.def("condensed_train_chunks(Tensor a) -> Tensor");
  m.def("condensed_train_forward(Tensor x, Tensor values, Tensor indices, Tensor seg, Tensor? bias, int out_features, Tensor? rows) -> (Tensor, Tensor)");
  m.def("condensed_train_tiled_grad_input(Tensor dy_chunks, int batch, Tensor cols, Tensor values, Tensor colseg, int in_features) -> Tensor");
  m.def("condensed_train_tiled_grad_values(Tensor dy_chunks, Tensor x_chunks, Tensor indices, Tensor seg, Tensor? rows) -> Tensor");
  m.def("condensed_train_grad_input(Tensor dy, Tensor ptr, Tensor cols, Tensor values, int in_features) -> Tensor");
  m.def("condensed_train_grad_values(Tensor dy, Tensor x, Tensor indices, Tensor? rows) -> Tensor");
  m.def("condensed_train_dense_grad(Tensor dvalues, Tensor indices, Tensor? rows, Tensor(a!) grad, Tensor? order) -> ()");
  m.def("condensed_train_plan(Tensor mask) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(lightning_sparse, CPU, m) {
  m.impl("condensed_train_values", &condensed_train_values);
  m.impl("condensed_train_grad_input", &condensed_train_grad_input);
  m.impl("condensed_train_grad_values", &condensed_train_grad_values);
  m.impl("condensed_train_dense_grad", &condensed_train_dense_grad);
  m.impl("condensed_train_chunks", &condensed_train_chunks);
  m.impl("condensed_train_forward", &condensed_train_forward);
  m.impl("condensed_train_tiled_grad_input", &condensed_train_tiled_grad_input);
  m.impl("condensed_train_tiled_grad_values", &condensed_train_tiled_grad_values);
  m.impl("condensed_train_plan", &condensed_train_plan);
}
