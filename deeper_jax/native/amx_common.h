// Pieces shared by the AMX kernels (k-means scores, convolutions): tile
// configuration, the float32 -> (hi, lo) bf16 split, aligned buffers, and a
// parallel-for over XLA's intra-op thread pool.
//
// Why a split: AMX multiplies bf16 pairs (8-bit significands) ~10x faster than the
// AVX-512 float32 FMAs XLA:CPU uses. v = hi + lo + r with |r| <= 2^-16 |v|, and
// a.b ~= hi_a.hi_b + lo_a.hi_b + hi_a.lo_b keeps ~16 bits of every product (the
// bf16 products are exact in float32 and accumulate in float32).
#ifndef DEEPER_JAX_NATIVE_AMX_COMMON_H_
#define DEEPER_JAX_NATIVE_AMX_COMMON_H_

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace deeper_jax {

namespace ffi = xla::ffi;

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXFeatureXtileData = 18;

// Linux grants AMX tile state per process on request (0 on success).
inline int EnableAmx() {
  return static_cast<int>(syscall(SYS_arch_prctl, kArchReqXcompPerm, kXFeatureXtileData));
}

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// All 8 tiles 16 rows x 64 bytes. Tile state is per thread: call right before use.
inline void LoadTileConfig() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// float32 bits -> bf16 bits, round to nearest even (finite inputs).
inline uint16_t RoundToBf16(uint32_t bits) {
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// v -> (hi, lo) bf16 bits; lo carries v - hi, which is exact in float32 because v
// and hi share their leading bits. Written on integers so the compiler vectorises it.
inline void SplitValue(float v, uint16_t* hi, uint16_t* lo) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint16_t h = RoundToBf16(bits);
  const uint32_t hb = static_cast<uint32_t>(h) << 16;
  float hf;
  std::memcpy(&hf, &hb, 4);
  const float rest = v - hf;
  uint32_t rb;
  std::memcpy(&rb, &rest, 4);
  *hi = h;
  *lo = RoundToBf16(rb);
}

// The same split on 16 lanes; hi and lo come back in the upper 16 bits of each lane
// (lower bits zero), bit-identical to SplitValue.
inline __m512i RoundToBf16x16(__m512i bits) {
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd);
  return _mm512_and_si512(sum, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}
inline void Split16(__m512 v, __m512i* hi, __m512i* lo) {
  *hi = RoundToBf16x16(_mm512_castps_si512(v));
  *lo = RoundToBf16x16(_mm512_castps_si512(_mm512_sub_ps(v, _mm512_castsi512_ps(*hi))));
}
// 16 lanes' upper halves -> 16 contiguous bf16.
inline void StoreBf16x16(uint16_t* dst, __m512i top) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(top, 16)));
}

inline void SplitRow(const float* v, int64_t n, uint16_t* hi, uint16_t* lo) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512i h, l;
    Split16(_mm512_loadu_ps(v + j), &h, &l);
    StoreBf16x16(hi + j, h);
    StoreBf16x16(lo + j, l);
  }
  for (; j < n; ++j) SplitValue(v[j], hi + j, lo + j);
}

// Buffers for tile loads must be 64-byte aligned: a tile row straddling two cache
// lines makes loads ~7x slower (measured).
struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using Bf16Buffer = std::unique_ptr<uint16_t[], AlignedFree>;
inline Bf16Buffer AllocBf16(int64_t count) {
  const size_t bytes = (static_cast<size_t>(count) * 2 + 63) / 64 * 64;
  return Bf16Buffer(static_cast<uint16_t*>(std::aligned_alloc(64, bytes)));
}

// Per-thread scratch kept between calls (fresh allocations cost a page fault per 4 KB,
// hundreds of MB per train step). A slot is used by one work item, or by one call on
// its calling thread, at a time; calls XLA runs side by side are on different threads.
inline uint16_t* ThreadScratch(int slot, int64_t count) {
  constexpr int kSlots = 10;
  thread_local Bf16Buffer buffers[kSlots];
  thread_local int64_t sizes[kSlots] = {};
  if (sizes[slot] < count) {
    buffers[slot] = AllocBf16(count);
    sizes[slot] = count;
  }
  return buffers[slot].get();
}

// The four 16 x 16 float32 accumulator tiles (0-3) of a 32 x 32 block, zeroed or moved
// through `c` [4][16][16] (64-byte aligned).
inline void ZeroAccumulators() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
inline void LoadAccumulators(const float* c) {
  _tile_loadd(0, c, 64);
  _tile_loadd(1, c + 256, 64);
  _tile_loadd(2, c + 512, 64);
  _tile_loadd(3, c + 768, 64);
}
inline void StoreAccumulators(float* c) {
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  _tile_stored(2, c + 512, 64);
  _tile_stored(3, c + 768, 64);
}

// Work items handed out by an atomic counter. The caller takes items too, so it
// never waits on a task still queued behind busy pool threads; it waits only for
// items already running elsewhere. Late tasks find no work and return. Which thread
// runs an item never changes what the item computes.
struct Items {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t count = 0;
  std::function<void(int64_t)> run;
};

inline void Drain(Items& items) {
  for (;;) {
    const int64_t i = items.next.fetch_add(1);
    if (i >= items.count) return;
    items.run(i);
    items.done.fetch_add(1);
  }
}

inline void ParallelFor(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> run) {
  if (count <= 0) return;
  auto items = std::make_shared<Items>();
  items->count = count;
  items->run = std::move(run);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([items] { Drain(*items); });
  Drain(*items);
  while (items->done.load() < count) _mm_pause();
}

}  // namespace deeper_jax

#endif  // DEEPER_JAX_NATIVE_AMX_COMMON_H_
