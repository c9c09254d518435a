// lightning_sparse::masked_zero_(weights, masks): zero every weight whose bool mask is False, in place.
// The other passes over one tensor that a mask update makes (at the memory's speed; torch's ops on the CPU run these
// at 1-3 GB/s per thread): see "passes of a mask update" below.
//
// One pass over each layer: read the mask byte, clear the weight's bits where it is 0. That is one read and
// one write of the weights plus one byte per weight, which is what a multiply by a float mask costs without
// the float mask. torch's own `mul_` with a bool/uint8 mask first converts the whole mask to a float
// temporary on the CPU. The bit clear works for every element size and leaves +0.0 behind (also where the
// weight was NaN or inf); kept weights are untouched, bit for bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGrainSize = 1 << 16;

// f(bits_t{}) with bits_t the unsigned integer of `size` bytes (1, 2, 4 or 8): the passes work on an element's bits
template <typename F>
auto with_bits(int64_t size, const char* name, F&& f) {
  TORCH_CHECK(size == 1 || size == 2 || size == 4 || size == 8, name, ": unsupported element size ", size);
  switch (size) {
    case 1: return f(uint8_t{});
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    default: return f(uint64_t{});
  }
}

template <typename bits_t>
void zero_where_false(const at::Tensor& weight, const at::Tensor& mask) {
  auto* w = static_cast<bits_t*>(weight.mutable_data_ptr());
  const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
  at::parallel_for(0, weight.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      w[i] &= static_cast<bits_t>(0) - static_cast<bits_t>(m[i]);  // all ones where the mask is 1
    }
  });
}

void masked_zero_(at::TensorList weights, at::TensorList masks) {
  TORCH_CHECK(weights.size() == masks.size(), "masked_zero_: got ", weights.size(), " weights and ",
              masks.size(), " masks");
  for (size_t k = 0; k < weights.size(); ++k) {
    const at::Tensor& weight = weights[k];
    const at::Tensor& mask = masks[k];
    TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_zero_: mask ", k, " must be torch.bool, got ",
                mask.scalar_type());
    TORCH_CHECK(weight.is_cpu() && mask.is_cpu(), "masked_zero_: weight and mask ", k, " must be on the CPU");
    TORCH_CHECK(weight.is_contiguous() && mask.is_contiguous(), "masked_zero_: weight and mask ", k,
                " must be contiguous");
    TORCH_CHECK(weight.numel() == mask.numel(), "masked_zero_: weight ", k, " has ", weight.numel(),
                " elements but its mask has ", mask.numel());
    with_bits(weight.element_size(), "masked_zero_",
              [&](auto bits) { zero_where_false<decltype(bits)>(weight, mask); });
  }
}

// ------------------------------------------------------------------------------------------ passes of a mask update
// * nonzero_count(t) -> int64 0-dim: entries that are not zero (bool: True; floating point: not +0.0 or -0.0, NaN
//   counts), as torch.count_nonzero.
// * any_nonfinite(t) -> bool 0-dim: whether a floating point tensor holds NaN or inf (exponent bits all ones).
// * abs_sum_where(t, mask) -> float64 0-dim: the sum of |t| where the bool mask is True (sparse momentum's mean
//   momentum per layer), in float64, summed by blocks of kGrainSize in block order: the same bits at any thread count.
// * zero_where_(tensors, mask): zero each tensor where the bool mask is True (the positions an update grew), in place;
//   64 mask bytes are tested at a time and skipped when all False, so a sparse mask costs a read of the mask.
// Contiguous CPU tensors only (the Python side falls back to torch's ops otherwise). target_clones compiles each loop
// for AVX2 and the x86-64 baseline and picks one at load time (these loops are bound by the memory, not the ISA).
#if defined(__x86_64__) && defined(__GNUC__)
#define LS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LS_CLONES
#endif

template <typename bits_t>
LS_CLONES int64_t count_bits_nonzero(const bits_t* p, int64_t n, bits_t value_bits) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += (p[i] & value_bits) != 0;
  return count;
}

// The number of bytes that are 1 (a bool tensor's bytes are 0 or 1): 8 bytes summed at once as one 64-bit word, up to
// 255 words per run so that no byte lane overflows, then the lanes added up.
LS_CLONES int64_t count_ones(const uint8_t* p, int64_t n) {
  int64_t total = 0;
  const int64_t words = n / 8;
  for (int64_t i = 0; i < words;) {
    const int64_t end = std::min(words, i + 255);
    uint64_t acc = 0;
    for (; i < end; ++i) {
      uint64_t v;
      std::memcpy(&v, p + 8 * i, 8);
      acc += v;
    }
    const uint64_t pairs = (acc & 0x00ff00ff00ff00ffull) + ((acc >> 8) & 0x00ff00ff00ff00ffull);
    total += static_cast<int64_t>((pairs * 0x0001000100010001ull) >> 48);
  }
  for (int64_t j = words * 8; j < n; ++j) total += p[j];
  return total;
}

template <typename bits_t>
LS_CLONES bool any_exponent_full(const bits_t* p, int64_t n, bits_t exponent) {
  bits_t any = 0;
  for (int64_t i = 0; i < n; ++i) any |= static_cast<bits_t>(((p[i] & exponent) == exponent) ? 1 : 0);
  return any != 0;
}

template <typename bits_t>
void zero_true_run(bits_t* w, const uint8_t* m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) w[i] &= static_cast<bits_t>(static_cast<bits_t>(m[i]) - 1);  // 0 where True
}

LS_CLONES bool all_false_64(const uint8_t* m) {
  uint8_t any = 0;
  for (int i = 0; i < 64; ++i) any |= m[i];
  return any == 0;
}

// (value bits, exponent bits) of a floating point dtype's element, as unsigned integers
template <typename bits_t>
std::pair<bits_t, bits_t> float_bits(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return {static_cast<bits_t>(0x7fffffffu), static_cast<bits_t>(0x7f800000u)};
    case at::kDouble: return {static_cast<bits_t>(0x7fffffffffffffffull), static_cast<bits_t>(0x7ff0000000000000ull)};
    case at::kHalf: return {static_cast<bits_t>(0x7fffu), static_cast<bits_t>(0x7c00u)};
    case at::kBFloat16: return {static_cast<bits_t>(0x7fffu), static_cast<bits_t>(0x7f80u)};
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

void check_pass_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.is_contiguous(), name, ": the tensor must be a contiguous CPU tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kBool || dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              name, ": bool, float32, float64, float16 or bfloat16 tensors only, got ", dtype);
}

template <typename bits_t, typename F>
int64_t sum_over_chunks(const at::Tensor& t, F f) {
  const auto* p = static_cast<const bits_t*>(t.const_data_ptr());
  return at::parallel_reduce(
      0, t.numel(), kGrainSize, int64_t{0},
      [&](int64_t begin, int64_t end, int64_t acc) { return acc + f(p + begin, end - begin); },
      [](int64_t a, int64_t b) { return a + b; });
}

// entries of a floating point tensor whose bits, sign left out, are not zero
template <typename bits_t>
int64_t count_nonzero_bits(const at::Tensor& t) {
  const bits_t value = float_bits<bits_t>(t.scalar_type()).first;
  return sum_over_chunks<bits_t>(t, [&](const bits_t* p, int64_t n) {
    return count_bits_nonzero<bits_t>(p, n, value);
  });
}

// chunks of a floating point tensor that hold NaN or inf
template <typename bits_t>
int64_t count_nonfinite_chunks(const at::Tensor& t) {
  const bits_t e = float_bits<bits_t>(t.scalar_type()).second;
  return sum_over_chunks<bits_t>(t, [&](const bits_t* p, int64_t n) {
    return int64_t{any_exponent_full<bits_t>(p, n, e)};
  });
}

at::Tensor nonzero_count(const at::Tensor& t) {
  check_pass_input(t, "nonzero_count");
  int64_t count = 0;
  if (t.scalar_type() == at::kBool) {
    count = sum_over_chunks<uint8_t>(t, [](const uint8_t* p, int64_t n) { return count_ones(p, n); });
  } else {
    count = with_bits(t.element_size(), "nonzero_count",
                      [&](auto bits) { return count_nonzero_bits<decltype(bits)>(t); });
  }
  return at::scalar_tensor(count, at::TensorOptions().dtype(at::kLong));
}

at::Tensor any_nonfinite(const at::Tensor& t) {
  check_pass_input(t, "any_nonfinite");
  TORCH_CHECK(t.scalar_type() != at::kBool, "any_nonfinite: a floating point tensor, got bool");
  const int64_t found = with_bits(t.element_size(), "any_nonfinite",
                                  [&](auto bits) { return count_nonfinite_chunks<decltype(bits)>(t); });
  return at::scalar_tensor(found > 0, at::TensorOptions().dtype(at::kBool));
}

// |p[i]| where m[i], else +0.0, without a branch: the sign bit and, where the mask is 0, every bit cleared
template <typename scalar_t>
inline double masked_abs(const scalar_t* p, const uint8_t* m, int64_t i) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  bits_t bits;
  std::memcpy(&bits, p + i, sizeof(bits));
  bits &= (~bits_t{0} >> 1) & (bits_t{0} - static_cast<bits_t>(m[i]));
  scalar_t x;
  std::memcpy(&x, &bits, sizeof(x));
  return static_cast<double>(x);
}

// Eight running sums (entry i goes to sum i % 8), added in a fixed order at the end: the same bits with AVX2 (two
// vectors of four sums) as with the portable loop. GCC does not vectorize the portable loop itself.
template <typename scalar_t>
double abs_sum_portable(const scalar_t* p, const uint8_t* m, int64_t n) {
  double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) acc[i % 8] += masked_abs(p, m, i);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) double abs_sum_avx2(const float* p, const uint8_t* m, int64_t n) {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    int64_t bytes;
    std::memcpy(&bytes, m + i, 8);
    const __m256i keep = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes)));
    const __m256i bits = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)),
                                          _mm256_and_si256(keep, magnitude));
    const __m256 x = _mm256_castsi256_ps(bits);
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
  }
  double acc[8];
  _mm256_storeu_pd(acc, lo);
  _mm256_storeu_pd(acc + 4, hi);
  for (int j = 0; i + j < n; ++j) acc[j] += masked_abs(p, m, i + j);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

const bool kAvx2 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") != 0;
}();
#endif

template <typename scalar_t>
double abs_sum_run(const scalar_t* p, const uint8_t* m, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (kAvx2) return abs_sum_avx2(p, m, n);
  }
#endif
  return abs_sum_portable(p, m, n);
}

at::Tensor abs_sum_where(const at::Tensor& t, const at::Tensor& mask) {
  TORCH_CHECK(t.is_cpu() && t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              "abs_sum_where: the tensor must be a contiguous float32 or float64 CPU tensor, got ", t.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_cpu() && mask.is_contiguous() && mask.numel() == t.numel(),
              "abs_sum_where: the mask must be a contiguous torch.bool CPU tensor with the tensor's ", t.numel(),
              " elements");
  const int64_t n = t.numel(), blocks = (n + kGrainSize - 1) / kGrainSize;
  std::vector<double> partial(blocks, 0.0);
  const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i0 = b * kGrainSize, len = std::min(kGrainSize, n - i0);
      partial[b] = t.scalar_type() == at::kFloat ? abs_sum_run(t.const_data_ptr<float>() + i0, m + i0, len)
                                                 : abs_sum_run(t.const_data_ptr<double>() + i0, m + i0, len);
    }
  });
  double total = 0.0;
  for (double x : partial) total += x;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

template <typename bits_t>
void zero_where_true(const at::Tensor& tensor, const uint8_t* m) {
  auto* w = static_cast<bits_t*>(tensor.mutable_data_ptr());
  at::parallel_for(0, tensor.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + 64 <= end; i += 64)
      if (!all_false_64(m + i)) zero_true_run<bits_t>(w + i, m + i, 64);
    zero_true_run<bits_t>(w + i, m + i, end - i);
  });
}

void zero_where_(at::TensorList tensors, const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_cpu() && mask.is_contiguous(),
              "zero_where_: the mask must be a contiguous torch.bool CPU tensor");
  const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& t = tensors[k];
    TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.numel() == mask.numel(), "zero_where_: tensor ", k,
                " must be a contiguous CPU tensor with the mask's ", mask.numel(), " elements");
    with_bits(t.element_size(), "zero_where_", [&](auto bits) { zero_where_true<decltype(bits)>(t, m); });
  }
}

}  // namespace

TORCH_LIBRARY(lightning_sparse, m) {
  m.def("masked_zero_(Tensor(a!)[] weights, Tensor[] masks) -> ()");
  m.def("nonzero_count(Tensor t) -> Tensor");
  m.def("any_nonfinite(Tensor t) -> Tensor");
  m.def("abs_sum_where(Tensor t, Tensor mask) -> Tensor");
  m.def("zero_where_(Tensor(a!)[] tensors, Tensor mask) -> ()");
}

TORCH_LIBRARY_IMPL(lightning_sparse, CPU, m) {
  m.impl("masked_zero_", &masked_zero_);
  m.impl("nonzero_count", &nonzero_count);
  m.impl("any_nonfinite", &any_nonfinite);
  m.impl("abs_sum_where", &abs_sum_where);
  m.impl("zero_where_", &zero_where_);
}
