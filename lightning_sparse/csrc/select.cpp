// lightning_sparse::select_in_mask(values, mask, n, highest, magnitude, inactive, flip) -> Tensor
//
// Exact top-n selection on one CPU tensor in two passes over the values, the same choice as the torch path of
// lightning_sparse/functional/selection.py (select_lowest / select_highest on one process), bit for bit:
//
// * candidates: the positions where `mask` is True (`inactive`: where it is False, as growth chooses among the
//   free positions);
// * order: the 32-bit sortable key of each value converted to float32 (of |value| with `magnitude`): -0.0 is
//   +0.0, every NaN is above +inf; `highest` reverses the keys (key -> 2^32 - 1 - key); the `n` lowest keys are
//   chosen, ties broken by the lowest flat index;
// * result: the chosen positions (a new bool tensor), or with `flip` the mask with the chosen positions flipped:
//   `mask & ~chosen` when choosing among the active positions (a prune), `mask | chosen` among the inactive ones
//   (a growth), without the extra passes of those two ops.
//
// Pass 1 builds a histogram of the keys' high 16 bits over the candidates (one 65536-bin table per chunk of the
// tensor, merged), which gives the high half of the threshold key and how many entries to take in its bin.
// Pass 2 writes the result: keys whose high half is below the threshold's are chosen, above it are not, and the
// entries of the threshold's bin are collected (in index order) and chosen by a histogram of their low 16 bits,
// ties in index order. Memory: the output, the histograms and the threshold bin's entries (8 bytes each).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBins = 1 << 16;
constexpr int64_t kMinChunk = 1 << 18;  // entries per chunk (and per thread) at least

// The sortable key of `value` as float32 (see sortable_key in selection.py): -0.0 -> +0.0, NaN -> 2^32 - 1.
// Branch-free, so that a loop over a block of values vectorizes.
template <typename scalar_t>
inline uint32_t key_of(scalar_t value, bool magnitude) {
  const float x = static_cast<float>(value);
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if (magnitude) u &= 0x7FFFFFFFu;
  const uint32_t sign = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31);  // all ones for negative values
  const uint32_t key = u ^ (sign | 0x80000000u);  // negative: flip every bit; positive: set the sign bit
  const uint32_t magnitude_bits = u & 0x7FFFFFFFu;
  const uint32_t zero_key = magnitude_bits == 0 ? 0x80000000u : key;  // -0.0 -> +0.0
  return magnitude_bits > 0x7F800000u ? 0xFFFFFFFFu : zero_key;  // NaN: above +inf
}

constexpr int64_t kBlock = 256;  // keys computed per block, then used by the scalar loops

// The key of entry `i`, reversed for the highest values: a compile-time variant per (magnitude, highest), so that
// the loops over a block vectorize.
template <typename scalar_t, bool magnitude, bool highest>
inline uint32_t entry_key(const scalar_t* values, int64_t i) {
  return key_of(values[i], magnitude) ^ (highest ? 0xFFFFFFFFu : 0u);
}

// The candidates of a chunk: mask byte ^ flip_candidate. Results: (mask byte & flip_bits) ^ chosen.
struct Chunk {
  int64_t begin;
  int64_t end;
  uint8_t flip_candidate;
  uint8_t flip_bits;
};

using Tied = std::vector<std::pair<uint32_t, int64_t>>;  // (low half of the key, index), in index order

// Pass 1 on a chunk: `hist` (65536 bins) counts the high halves of the candidates' keys. Each block's high halves
// are computed first (a loop that vectorizes), then the candidates' ones packed and counted (no branch per entry).
template <typename scalar_t, bool magnitude, bool highest>
inline __attribute__((always_inline)) void count_body(const scalar_t* __restrict v, const uint8_t* __restrict m,
                                                      Chunk chunk, uint32_t* __restrict hist) {
  uint16_t halves[kBlock];
  uint16_t packed[kBlock];
  for (int64_t start = chunk.begin; start < chunk.end; start += kBlock) {
    const int64_t count = std::min(kBlock, chunk.end - start);
    for (int64_t j = 0; j < count; ++j) {
      halves[j] = static_cast<uint16_t>(entry_key<scalar_t, magnitude, highest>(v + start, j) >> 16);
    }
    int64_t found = 0;
    for (int64_t j = 0; j < count; ++j) {
      packed[found] = halves[j];
      found += m[start + j] ^ chunk.flip_candidate;
    }
    for (int64_t j = 0; j < found; ++j) ++hist[packed[j]];
  }
}

// Pass 2 on a chunk: the result byte of every entry (chosen: a candidate whose key's high half is below `limit`),
// and the candidates whose high half is `bin` appended to `tied`. Per block, one loop that vectorizes computes the
// results and whether the block has any such candidate; only then is the block scanned again.
template <typename scalar_t, bool magnitude, bool highest>
inline __attribute__((always_inline)) void mark_body(const scalar_t* __restrict v, const uint8_t* __restrict m,
                                                     uint8_t* __restrict o, Chunk chunk, uint32_t limit, uint32_t bin,
                                                     Tied& tied) {
  uint32_t keys[kBlock];
  alignas(8) uint8_t hits[kBlock];  // 1 where a candidate lies in the threshold's bin
  for (int64_t start = chunk.begin; start < chunk.end; start += kBlock) {
    const int64_t count = std::min(kBlock, chunk.end - start);
    const uint8_t* __restrict mb = m + start;
    uint8_t* __restrict ob = o + start;
    uint32_t in_bin = 0;
    for (int64_t j = 0; j < count; ++j) {
      const uint32_t k = entry_key<scalar_t, magnitude, highest>(v + start, j);
      keys[j] = k;
      const uint32_t candidate = mb[j] ^ chunk.flip_candidate;
      const uint32_t below = (k >> 16) < limit ? 1u : 0u;
      ob[j] = static_cast<uint8_t>((mb[j] & chunk.flip_bits) ^ (candidate & below));
      const uint32_t hit = ((k >> 16) == bin ? 1u : 0u) & candidate;
      hits[j] = static_cast<uint8_t>(hit);
      in_bin |= hit;
    }
    if (in_bin) {  // the hits in index order, 8 flags at a time
      for (int64_t j = count; j < ((count + 7) & ~int64_t{7}); ++j) hits[j] = 0;
      for (int64_t w = 0; w < count; w += 8) {
        uint64_t word;
        std::memcpy(&word, hits + w, sizeof(word));
        while (word) {
          const int64_t j = w + (__builtin_ctzll(word) >> 3);
          tied.emplace_back(keys[j] & 0xFFFFu, start + j);
          word &= word - 1;
        }
      }
    }
  }
}

// One build runs on every x86-64 CPU: the two passes are compiled for AVX-512, AVX2 and the baseline, and chosen
// at run time (the key loops run about 4x faster with AVX-512 than with SSE2).
enum class Isa { kPortable, kAvx2, kAvx512 };

Isa detect_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

const Isa kIsa = detect_isa();

#if defined(__x86_64__) && defined(__GNUC__)
#define LS_TARGET_AVX2 __attribute__((target("avx2")))
#define LS_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#else
#define LS_TARGET_AVX2
#define LS_TARGET_AVX512
#endif

template <typename scalar_t, bool magnitude, bool highest>
LS_TARGET_AVX512 void count_avx512(const scalar_t* v, const uint8_t* m, Chunk chunk, uint32_t* hist) {
  count_body<scalar_t, magnitude, highest>(v, m, chunk, hist);
}
template <typename scalar_t, bool magnitude, bool highest>
LS_TARGET_AVX2 void count_avx2(const scalar_t* v, const uint8_t* m, Chunk chunk, uint32_t* hist) {
  count_body<scalar_t, magnitude, highest>(v, m, chunk, hist);
}
template <typename scalar_t, bool magnitude, bool highest>
void count_portable(const scalar_t* v, const uint8_t* m, Chunk chunk, uint32_t* hist) {
  count_body<scalar_t, magnitude, highest>(v, m, chunk, hist);
}
template <typename scalar_t, bool magnitude, bool highest>
LS_TARGET_AVX512 void mark_avx512(const scalar_t* v, const uint8_t* m, uint8_t* o, Chunk chunk, uint32_t limit,
                                  uint32_t bin, Tied& tied) {
  mark_body<scalar_t, magnitude, highest>(v, m, o, chunk, limit, bin, tied);
}
template <typename scalar_t, bool magnitude, bool highest>
LS_TARGET_AVX2 void mark_avx2(const scalar_t* v, const uint8_t* m, uint8_t* o, Chunk chunk, uint32_t limit,
                              uint32_t bin, Tied& tied) {
  mark_body<scalar_t, magnitude, highest>(v, m, o, chunk, limit, bin, tied);
}
template <typename scalar_t, bool magnitude, bool highest>
void mark_portable(const scalar_t* v, const uint8_t* m, uint8_t* o, Chunk chunk, uint32_t limit, uint32_t bin,
                   Tied& tied) {
  mark_body<scalar_t, magnitude, highest>(v, m, o, chunk, limit, bin, tied);
}

template <typename scalar_t, bool magnitude, bool highest>
void count_chunk(const scalar_t* v, const uint8_t* m, Chunk chunk, uint32_t* hist) {
  if (kIsa == Isa::kAvx512) return count_avx512<scalar_t, magnitude, highest>(v, m, chunk, hist);
  if (kIsa == Isa::kAvx2) return count_avx2<scalar_t, magnitude, highest>(v, m, chunk, hist);
  count_portable<scalar_t, magnitude, highest>(v, m, chunk, hist);
}

template <typename scalar_t, bool magnitude, bool highest>
void mark_chunk(const scalar_t* v, const uint8_t* m, uint8_t* o, Chunk chunk, uint32_t limit, uint32_t bin,
                Tied& tied) {
  if (kIsa == Isa::kAvx512) return mark_avx512<scalar_t, magnitude, highest>(v, m, o, chunk, limit, bin, tied);
  if (kIsa == Isa::kAvx2) return mark_avx2<scalar_t, magnitude, highest>(v, m, o, chunk, limit, bin, tied);
  mark_portable<scalar_t, magnitude, highest>(v, m, o, chunk, limit, bin, tied);
}

template <typename scalar_t, bool magnitude, bool highest>
at::Tensor select_typed(const at::Tensor& values, const at::Tensor& mask, int64_t n, bool inactive, bool flip) {
  const int64_t numel = values.numel();
  const auto* v = values.const_data_ptr<scalar_t>();
  const auto* m = static_cast<const uint8_t*>(mask.const_data_ptr());
  at::Tensor out = at::empty(mask.sizes(), mask.options());
  auto* o = static_cast<uint8_t*>(out.mutable_data_ptr());
  const uint8_t flip_candidate = inactive ? 1 : 0;
  const uint8_t flip_bits = flip ? 1 : 0;

  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), numel / kMinChunk));
  const int64_t per_chunk = (numel + chunks - 1) / chunks;
  TORCH_CHECK(per_chunk < (int64_t{1} << 32), "select_in_mask: too many entries (", numel, ")");
  auto chunk_of = [&](int64_t c) {
    return Chunk{c * per_chunk, std::min(numel, (c + 1) * per_chunk), flip_candidate, flip_bits};
  };

  // pass 1: histogram of the high 16 bits of the candidates' keys, one per chunk, then summed
  std::vector<uint32_t> hist(static_cast<size_t>(chunks * kBins), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      count_chunk<scalar_t, magnitude, highest>(v, m, chunk_of(c), hist.data() + c * kBins);
    }
  });
  std::vector<int64_t> counts(kBins, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t b = 0; b < kBins; ++b) counts[b] += hist[c * kBins + b];
  }
  int64_t total = 0;
  for (int64_t b = 0; b < kBins; ++b) total += counts[b];
  TORCH_CHECK_VALUE(n <= total, "cannot select ", n, " entries: there are only ", total, " candidates");

  // the high half of the threshold key, and how many to take among the keys whose high half it is
  int64_t high = -1;  // n <= 0: none
  int64_t need = 0;
  if (n > 0) {
    int64_t below = 0;
    for (high = 0; below + counts[high] < n; ++high) below += counts[high];
    need = n - below;
  }
  const uint32_t limit = n > 0 ? static_cast<uint32_t>(high) : 0;  // high halves below it are chosen
  const uint32_t bin = n > 0 ? static_cast<uint32_t>(high) : 0xFFFFFFFFu;  // that bin's candidates are collected

  // pass 2: every entry outside the threshold's bin; that bin's candidates are collected in index order
  std::vector<Tied> tied(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      mark_chunk<scalar_t, magnitude, highest>(v, m, o, chunk_of(c), limit, bin, tied[c]);
    }
  });
  if (need == 0) return out;

  // the threshold's bin: the `need` lowest low halves, ties in index order (the chunks are in index order)
  std::vector<int64_t> low(kBins, 0);
  for (const auto& mine : tied) {
    for (const auto& entry : mine) ++low[entry.first];
  }
  int64_t threshold = 0;
  int64_t below = 0;
  for (; below + low[threshold] < need; ++threshold) below += low[threshold];
  int64_t ties = need - below;  // entries with the threshold's low half still to take, in index order
  for (const auto& mine : tied) {
    for (const auto& entry : mine) {
      bool chosen = static_cast<int64_t>(entry.first) < threshold;
      if (static_cast<int64_t>(entry.first) == threshold && ties > 0) {
        chosen = true;
        --ties;
      }
      if (chosen) o[entry.second] = static_cast<uint8_t>((m[entry.second] & flip_bits) ^ 1);
    }
  }
  return out;
}

template <typename scalar_t>
at::Tensor select_dtype(const at::Tensor& values, const at::Tensor& mask, int64_t n, bool highest, bool magnitude,
                        bool inactive, bool flip) {
  if (magnitude) {
    return highest ? select_typed<scalar_t, true, true>(values, mask, n, inactive, flip)
                   : select_typed<scalar_t, true, false>(values, mask, n, inactive, flip);
  }
  return highest ? select_typed<scalar_t, false, true>(values, mask, n, inactive, flip)
                 : select_typed<scalar_t, false, false>(values, mask, n, inactive, flip);
}

at::Tensor select_in_mask(const at::Tensor& values, const at::Tensor& mask, int64_t n, bool highest, bool magnitude,
                          bool inactive, bool flip) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "select_in_mask: mask must be torch.bool, got ", mask.scalar_type());
  TORCH_CHECK(values.is_cpu() && mask.is_cpu(), "select_in_mask: values and mask must be on the CPU");
  TORCH_CHECK(values.is_contiguous() && mask.is_contiguous(), "select_in_mask: values and mask must be contiguous");
  TORCH_CHECK(values.numel() == mask.numel(), "select_in_mask: values has ", values.numel(),
              " entries but the mask has ", mask.numel());
  switch (values.scalar_type()) {
    case at::kFloat: return select_dtype<float>(values, mask, n, highest, magnitude, inactive, flip);
    case at::kDouble: return select_dtype<double>(values, mask, n, highest, magnitude, inactive, flip);
    case at::kHalf: return select_dtype<c10::Half>(values, mask, n, highest, magnitude, inactive, flip);
    case at::kBFloat16: return select_dtype<c10::BFloat16>(values, mask, n, highest, magnitude, inactive, flip);
    default: TORCH_CHECK(false, "select_in_mask: unsupported dtype ", values.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lightning_sparse, m) {
  m.def("select_in_mask(Tensor values, Tensor mask, int n, bool highest, bool magnitude, bool inactive, bool flip)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(lightning_sparse, CPU, m) {
  m.impl("select_in_mask", &select_in_mask);
}
