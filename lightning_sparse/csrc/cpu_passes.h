// Shared by condensed_linear.cpp and condensed_train.cpp (each includes it inside its anonymous namespace): how the
// condensed kernels split work over threads, how many samples one pass over a transposed operand takes, and the
// transpose itself. Needs <ATen/Parallel.h>, <algorithm> and <cstdint> included first.
#pragma once

// Multiply-adds per parallel chunk: below this a chunk is not worth a thread.
constexpr int64_t kWorkPerChunk = 1 << 15;
// Most samples per pass of a transposed operand.
constexpr int64_t kChunk = 256;

inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kWorkPerChunk / std::max<int64_t>(1, work_per_item));
}

// Samples per pass over a transposed operand of `rows` rows: one pass's [rows, width] floats are read by every
// output row, so they should stay in L2 (about 1 MiB here); a multiple of 64, at most kChunk.
inline int64_t chunk_width(int64_t rows) {
  const int64_t fits = (int64_t{1} << 20) / (4 * std::max<int64_t>(rows, 1));
  return std::clamp<int64_t>(fits / 64 * 64, 64, kChunk);
}

// The row stride of a transposed copy of `width` samples that is read in several passes: a multiple of 16 floats
// (64 bytes) that is an odd number of cache lines, so that the rows' slices of one pass spread over all cache sets.
// (With 256 samples, a stride of 1 KiB puts the slices of a pass in one set out of 16 and L2 thrashes.)
inline int64_t padded_stride(int64_t width) {
  const int64_t ld = (width + 15) / 16 * 16;
  return (ld / 16) % 2 ? ld : ld + 16;
}

// dst[i * ld + c] = src[c * n + i]: src [batch, n] transposed to [n, batch] with row stride ld, 16 x 16 tiles
inline void transpose(const float* src, float* dst, int64_t batch, int64_t n, int64_t ld) {
  const int64_t tiles = (n + 15) / 16;
  at::parallel_for(0, tiles, std::max<int64_t>(1, kWorkPerChunk / (16 * batch)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = t * 16, i1 = std::min(n, i0 + 16);
      for (int64_t c0 = 0; c0 < batch; c0 += 16) {
        const int64_t c1 = std::min(batch, c0 + 16);
        for (int64_t i = i0; i < i1; ++i) {
          float* d = dst + i * ld;
          for (int64_t c = c0; c < c1; ++c) d[c] = src[c * n + i];
        }
      }
    }
  });
}
