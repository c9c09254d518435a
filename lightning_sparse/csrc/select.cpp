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
// With few candidates, std::nth_element over (key, index) pairs instead (select_small).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
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

// Few candidates (a small tensor, or a sparse mask's active entries in a mid-sized one): the candidates' (key, index)
// pairs as one 64-bit number each, unique, and std::nth_element puts the n lowest first: the same choice (lowest
// keys, ties to the lowest index) without the two 65536-bin histograms, whose setup (~0.2 ms) is most of the time
// below ~50k entries. The scan and nth_element cost ~4 ns per entry and ~20 ns per candidate, the histograms
// ~0.2 ms plus ~2.5-3.5 ns per entry (Xeon, one thread): few_candidates() picks the cheaper one.
constexpr int64_t kSmall = 1 << 16;  // past this, the histograms (which also run on several threads)

bool few_candidates(const uint8_t* m, int64_t numel, uint8_t flip_candidate) {
  if (numel > kSmall) return false;
  int64_t active = 0;
  for (int64_t i = 0; i < numel; ++i) active += m[i];
  const int64_t candidates = flip_candidate ? numel - active : active;
  return candidates <= 4096 + numel / 8;
}

template <typename scalar_t, bool magnitude, bool highest>
void select_small(const scalar_t* v, const uint8_t* m, uint8_t* o, int64_t numel, int64_t n, uint8_t flip_candidate,
                  uint8_t flip_bits) {
  std::vector<uint64_t> keys;
  keys.reserve(static_cast<size_t>(numel));
  for (int64_t i = 0; i < numel; ++i) {
    o[i] = static_cast<uint8_t>(m[i] & flip_bits);
    if (m[i] ^ flip_candidate) {
      keys.push_back((static_cast<uint64_t>(entry_key<scalar_t, magnitude, highest>(v, i)) << 32) |
                     static_cast<uint64_t>(i));
    }
  }
  TORCH_CHECK_VALUE(n <= static_cast<int64_t>(keys.size()), "cannot select ", n, " entries: there are only ",
                    keys.size(), " candidates");
  if (n <= 0) return;
  if (n < static_cast<int64_t>(keys.size())) std::nth_element(keys.begin(), keys.begin() + (n - 1), keys.end());
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = static_cast<int64_t>(keys[j] & 0xFFFFFFFFu);
    o[i] = static_cast<uint8_t>((m[i] & flip_bits) ^ 1);
  }
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
  if (few_candidates(m, numel, flip_candidate)) {
    select_small<scalar_t, magnitude, highest>(v, m, o, numel, n, flip_candidate, flip_bits);
    return out;
  }

  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), numel / kMinChunk));
  const int64_t per_chunk = (numel + chunks - 1) / chunks;
  TORCH_CHECK(per_chunk < (int64_t{1} << 32), "select_in_mask: too many entries (", numel, ")");
  auto chunk_of = [&](int64_t c) {
    return Chunk{c * per_chunk, std::min(numel, (c + 1) * per_chunk), flip_candidate, flip_bits};
  };

  // pass 1: histogram of the high 16 bits of the candidates' keys, one per chunk, then summed
  // the tables live from call to call (per calling thread): fresh ones are new pages, and their page faults were
  // most of a call's fixed cost. The worker threads of parallel_for reach them through these references (a
  // thread_local named inside the lambda would be the worker's own, empty one).
  thread_local std::vector<uint32_t> kept_hist;
  thread_local std::vector<int64_t> kept_counts;
  thread_local std::vector<int64_t> kept_low;
  std::vector<uint32_t>& hist = kept_hist;
  std::vector<int64_t>& counts = kept_counts;
  std::vector<int64_t>& low = kept_low;
  hist.assign(static_cast<size_t>(chunks * kBins), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      count_chunk<scalar_t, magnitude, highest>(v, m, chunk_of(c), hist.data() + c * kBins);
    }
  });
  counts.assign(kBins, 0);
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
  low.assign(kBins, 0);
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

// ----------------------------------------------------------------------------------------------------------------
// select_per_unit(values [units, size], mask [units, size] bool, k [units] int64, largest, inactive, mode, flip)
// -> bool [units, size]: in every unit (row), the `want` candidates (the mask's active entries; `inactive`: its
// inactive ones) with the lowest keys (largest: the highest), ties to the lowest index, as topk_per_unit in
// functional/units.py chooses them (its two stable sorts). `want` is k (mode 0), k minus the unit's active count
// (mode 1: fill the unit up to k, fill_units) or its active count minus k (mode 2: trim it down to k,
// trim_units), at least 0. Result: the chosen positions, or with `flip` the mask with them flipped (a fill's
// `mask | chosen`, a trim's `mask & ~chosen`). Floating point values compare as
// float32 (key_of above); integer values exactly, through the same int64 key as _keys (value + 2^62, wrapping as
// torch's int64 arithmetic does; largest: (2^63 - 1) - key), compared signed. Each unit's candidates are gathered
// as (key, index) pairs, unique, and std::nth_element leaves the k smallest first: O(size) per unit, no sort.

// The order key of one value as an unsigned 64-bit number (ascending: chosen first).
template <typename scalar_t>
inline uint64_t unit_key(scalar_t value, bool largest) {
  if constexpr (std::is_floating_point_v<scalar_t> || std::is_same_v<scalar_t, c10::Half> ||
                std::is_same_v<scalar_t, c10::BFloat16>) {
    return key_of(value, false) ^ (largest ? 0xFFFFFFFFu : 0u);
  } else {
    uint64_t key = static_cast<uint64_t>(static_cast<int64_t>(value)) + (uint64_t{1} << 62);  // wraps as int64
    if (largest) key = ((uint64_t{1} << 63) - 1) - key;
    return key ^ (uint64_t{1} << 63);  // signed order as unsigned order
  }
}

template <typename scalar_t, bool wide>
void units_typed(const scalar_t* v, const uint8_t* m, const int64_t* k, uint8_t* o, int64_t units, int64_t size,
                 bool largest, bool inactive, int64_t mode, bool flip, std::atomic<bool>& short_unit) {
  const uint8_t flip_candidate = inactive ? 1 : 0;
  at::parallel_for(0, units, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(size, 1)),
                   [&](int64_t first, int64_t last) {
    std::vector<uint64_t> packed;  // narrow keys: key << 32 | index
    std::vector<std::pair<uint64_t, uint32_t>> pairs;  // wide keys: (key, index)
    for (int64_t u = first; u < last; ++u) {
      const scalar_t* vu = v + u * size;
      const uint8_t* mu = m + u * size;
      uint8_t* ou = o + u * size;
      if (flip) std::memcpy(ou, mu, static_cast<size_t>(size));
      int64_t count = 0;
      if constexpr (wide) {
        pairs.clear();
        for (int64_t j = 0; j < size; ++j) {
          if (mu[j] ^ flip_candidate) pairs.emplace_back(unit_key(vu[j], largest), static_cast<uint32_t>(j));
        }
        count = static_cast<int64_t>(pairs.size());
      } else {
        packed.resize(static_cast<size_t>(size));
        for (int64_t j = 0; j < size; ++j) {  // branch-free compaction of the candidates
          packed[count] = (unit_key(vu[j], largest) << 32) | static_cast<uint64_t>(j);
          count += mu[j] ^ flip_candidate;
        }
      }
      const int64_t active = inactive ? size - count : count;
      const int64_t want = mode == 0 ? k[u] : mode == 1 ? k[u] - active : active - k[u];
      if (want > count) {
        short_unit = true;
        continue;
      }
      if (want <= 0) continue;
      if constexpr (wide) {
        if (want < count) std::nth_element(pairs.begin(), pairs.begin() + (want - 1), pairs.end());
        for (int64_t t = 0; t < want; ++t) ou[pairs[t].second] ^= 1;
      } else {
        if (want < count) std::nth_element(packed.begin(), packed.begin() + (want - 1), packed.begin() + count);
        for (int64_t t = 0; t < want; ++t) ou[packed[t] & 0xFFFFFFFFu] ^= 1;
      }
    }
  });
}

at::Tensor select_per_unit(const at::Tensor& values, const at::Tensor& candidates, const at::Tensor& k, bool largest,
                           bool inactive, int64_t mode, bool flip) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "select_per_unit: mode can be 0 (k), 1 (fill) or 2 (trim), got ", mode);
  TORCH_CHECK(candidates.scalar_type() == at::kBool, "select_per_unit: candidates must be torch.bool, got ",
              candidates.scalar_type());
  TORCH_CHECK(k.scalar_type() == at::kLong, "select_per_unit: k must be int64, got ", k.scalar_type());
  TORCH_CHECK(values.is_cpu() && candidates.is_cpu() && k.is_cpu(), "select_per_unit: tensors must be on the CPU");
  TORCH_CHECK(values.dim() == 2 && candidates.sizes() == values.sizes(),
              "select_per_unit: values and candidates must be 2-D of one shape");
  TORCH_CHECK(values.is_contiguous() && candidates.is_contiguous() && k.is_contiguous(),
              "select_per_unit: tensors must be contiguous");
  const int64_t units = values.size(0), size = values.size(1);
  TORCH_CHECK(k.numel() == units, "select_per_unit: k has ", k.numel(), " entries for ", units, " units");
  TORCH_CHECK(size < (int64_t{1} << 32), "select_per_unit: units of ", size, " entries are too large");
  at::Tensor out = flip ? at::empty(candidates.sizes(), candidates.options())
                        : at::zeros(candidates.sizes(), candidates.options());
  const auto* c = static_cast<const uint8_t*>(candidates.const_data_ptr());
  auto* o = static_cast<uint8_t*>(out.mutable_data_ptr());
  const int64_t* kk = k.const_data_ptr<int64_t>();
  std::atomic<bool> short_unit{false};
  switch (values.scalar_type()) {
#define LS_UNITS(type, scalar, wide)                                                                          \
  case type:                                                                                                 \
    units_typed<scalar, wide>(values.const_data_ptr<scalar>(), c, kk, o, units, size, largest, inactive, mode, flip, \
                              short_unit);                                                                     \
    break;
    LS_UNITS(at::kFloat, float, false)
    LS_UNITS(at::kDouble, double, false)
    LS_UNITS(at::kHalf, c10::Half, false)
    LS_UNITS(at::kBFloat16, c10::BFloat16, false)
    LS_UNITS(at::kLong, int64_t, true)
    LS_UNITS(at::kInt, int32_t, true)
    LS_UNITS(at::kShort, int16_t, true)
    LS_UNITS(at::kChar, int8_t, true)
    LS_UNITS(at::kByte, uint8_t, true)
#undef LS_UNITS
    default: TORCH_CHECK(false, "select_per_unit: unsupported dtype ", values.scalar_type());
  }
  TORCH_CHECK_VALUE(!short_unit, "a unit has fewer candidates than the entries to select in it");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lightning_sparse, m) {
  m.def("select_in_mask(Tensor values, Tensor mask, int n, bool highest, bool magnitude, bool inactive, bool flip)"
        " -> Tensor");
  m.def("select_per_unit(Tensor values, Tensor mask, Tensor k, bool largest, bool inactive, int mode, bool flip)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(lightning_sparse, CPU, m) {
  m.impl("select_in_mask", &select_in_mask);
  m.impl("select_per_unit", &select_per_unit);
}
