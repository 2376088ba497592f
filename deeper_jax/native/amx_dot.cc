// x @ c^T in float32 for k-means scores, on Intel AMX tiles (bf16 x 3 split).
//
// Why: XLA:CPU runs float32 GEMMs at ~270 GFLOP/s on a Sapphire Rapids core pair and
// upcasts bf16 dots to float32, so it never uses the AMX units, which multiply bf16
// pairs ~10x faster. Each float32 operand is split into two bf16 numbers,
// v = hi + lo + r with |r| <= 2^-16 |v|, and
//     x.c ~= hi_x.hi_c + lo_x.hi_c + hi_x.lo_c      (the lo_x.lo_c term dropped),
// which is ONE bf16 GEMM over the concatenated depth 3d:
//     x' = [hi_x, lo_x, hi_x],  c' = [hi_c, hi_c, lo_c].
// Error (derived in amx_dot.py, ``relative_error``): <= (3.1 * 2^-16 + (3d + 4) 2^-24)
// ||x|| ||c||, 6x float32's worst case at d = 256 (measured <= 2e-5); the bf16
// products are exact in float32 and accumulate in float32.
//
// Determinism: every output element is accumulated over the same 3d terms in the
// same order whatever the other rows and columns of the call are, so a (row,
// centroid) score is the same bits in any block shape (lloyd.py relies on this).
//
// Layout: A = x' row-major [R32, K] (K = 3 * d32), B = c' packed per 16-column
// tile and 32-deep chunk as [pairs 16][cols 16][2] (AMX's VNNI layout), so each
// tile load is 1 KB contiguous. A 2 x 2 block of 16 x 16 float32 C tiles per step.
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

namespace ffi = xla::ffi;

namespace {

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXFeatureXtileData = 18;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void LoadTileConfig() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {  // all tiles: 16 rows x 64 bytes
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// float32 -> (hi, lo) bf16 bits, round to nearest even; lo carries v - hi, which is
// exact in float32 because v and hi share their leading bits. Inputs are finite
// (checked upstream). Written on integers so the compiler vectorises it.
void SplitRow(const float* v, int64_t n, uint16_t* hi, uint16_t* lo) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, v + j, 4);
    const uint32_t h = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
    float hf;
    std::memcpy(&hf, &h, 4);
    const float rest = v[j] - hf;
    uint32_t rb;
    std::memcpy(&rb, &rest, 4);
    hi[j] = static_cast<uint16_t>(h >> 16);
    lo[j] = static_cast<uint16_t>((rb + 0x7FFF + ((rb >> 16) & 1)) >> 16);
  }
}

// Buffers for tile loads must be 64-byte aligned: a tile row straddling two cache
// lines makes loads ~7x slower (measured).
struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using Bf16Buffer = std::unique_ptr<uint16_t[], AlignedFree>;
Bf16Buffer AllocBf16(int64_t count) {
  const size_t bytes = (static_cast<size_t>(count) * 2 + 63) / 64 * 64;
  return Bf16Buffer(static_cast<uint16_t*>(std::aligned_alloc(64, bytes)));
}

// Per-thread scratch buffers, kept between calls (a fresh allocation per panel
// costs page faults): slot 0 packing lines, 1 the A panel, 2 the accumulators.
uint16_t* Scratch(int slot, int64_t count) {
  thread_local Bf16Buffer buffers[3];
  thread_local int64_t sizes[3] = {0, 0, 0};
  if (sizes[slot] < count) {
    buffers[slot] = AllocBf16(count);
    sizes[slot] = count;
  }
  return buffers[slot].get();
}

struct Shape {
  int64_t rows, n, d;  // x [rows, d], c [n, d]
  int64_t d32, k, chunks, n32;
  explicit Shape(int64_t rows_, int64_t n_, int64_t d_)
      : rows(rows_), n(n_), d(d_), d32((d_ + 31) / 32 * 32), k(3 * d32), chunks(k / 32),
        n32((n_ + 31) / 32 * 32) {}
};

// 16 rows of c from col0 -> B tiles [chunk][16 pairs][16 cols][2] of depth [hi, hi, lo].
void PackColumnTile(const float* c, const Shape& s, int64_t col0, uint16_t* tiles,
                    uint16_t* lines) {
  for (int col = 0; col < 16; ++col) {
    uint16_t* line = lines + col * s.k;
    std::memset(line, 0, s.k * 2);
    if (col0 + col >= s.n) continue;
    SplitRow(c + (col0 + col) * s.d, s.d, line, line + 2 * s.d32);
    std::memcpy(line + s.d32, line, s.d * 2);
  }
  // (col, depth pair) -> (pair, col): a 16 x 16 transpose of bf16 pairs per chunk.
  const uint32_t* src = reinterpret_cast<const uint32_t*>(lines);
  uint32_t* dst = reinterpret_cast<uint32_t*>(tiles);
  for (int64_t ch = 0; ch < s.chunks; ++ch) {
    for (int p = 0; p < 16; ++p) {
      for (int col = 0; col < 16; ++col) {
        dst[(ch * 16 + p) * 16 + col] = src[col * (s.k / 2) + ch * 16 + p];
      }
    }
  }
}

// 32 rows of x from row0 -> A tiles [chunk][half][16 rows][32] of depth [hi, lo, hi].
void PackRowPanel(const float* x, const Shape& s, int64_t row0, uint16_t* tiles,
                  uint16_t* lines) {
  for (int r = 0; r < 32; ++r) {
    uint16_t* line = lines + r * s.k;
    std::memset(line, 0, s.k * 2);
    if (row0 + r >= s.rows) continue;
    SplitRow(x + (row0 + r) * s.d, s.d, line, line + s.d32);
    std::memcpy(line + 2 * s.d32, line, s.d * 2);
  }
  for (int64_t ch = 0; ch < s.chunks; ++ch) {
    for (int r = 0; r < 32; ++r) {
      std::memcpy(tiles + ((ch * 2 + r / 16) * 16 + r % 16) * 32, lines + r * s.k + ch * 32, 64);
    }
  }
}

// Chunks of depth per pass over the columns: the A slice (2 KB per chunk) then
// stays in L1 while B streams from L2 (~1.5x faster at d = 256 than one pass).
constexpr int64_t kDepthBlock = 8;
// Row panels per work item. Each depth block's B slice (n32 x 256 bf16, 512 KB at
// n = 1024) is read once for all of them: when the whole of B outgrows L2 (large
// n * d) a panel at a time re-streamed B from DRAM (2048 x 1024 x 4096: 60 ms).
constexpr int64_t kMaxPanelsPerItem = 4;

// `panels` 32-row panels (A tiles back to back) against all columns; accumulators
// go through `acc` [panels][n32 / 32][4 tiles][16][16] between depth blocks.
void MultiplyPanels(const uint16_t* a, int64_t panels, const uint16_t* b, const Shape& s,
                    float* acc) {
  LoadTileConfig();  // tile state is per thread: set it right before use
  for (int64_t kb = 0; kb < s.chunks; kb += kDepthBlock) {
    const int64_t end = std::min(s.chunks, kb + kDepthBlock);
    for (int64_t pi = 0; pi < panels; ++pi) {
      const uint16_t* ap = a + pi * 32 * s.k;
      for (int64_t cp = 0; cp < s.n32 / 32; ++cp) {
        const uint16_t* b0 = b + (2 * cp) * 16 * s.k;
        const uint16_t* b1 = b0 + 16 * s.k;
        float* c = acc + (pi * (s.n32 / 32) + cp) * 4 * 256;
        if (kb == 0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, c, 64);
          _tile_loadd(1, c + 256, 64);
          _tile_loadd(2, c + 512, 64);
          _tile_loadd(3, c + 768, 64);
        }
        // Software-pipelined: each operand tile is reloaded right after its last
        // use in this step, so loads overlap the products (tiles are not renamed).
        _tile_loadd(4, ap + kb * 1024, 64);
        _tile_loadd(5, ap + kb * 1024 + 512, 64);
        _tile_loadd(6, b0 + kb * 512, 64);
        _tile_loadd(7, b1 + kb * 512, 64);
        for (int64_t ch = kb; ch < end; ++ch) {
          const int64_t next = ch + 1 < end ? ch + 1 : ch;
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_loadd(4, ap + next * 1024, 64);
          _tile_dpbf16ps(2, 5, 6);
          _tile_loadd(6, b0 + next * 512, 64);
          _tile_dpbf16ps(3, 5, 7);
          _tile_loadd(5, ap + next * 1024 + 512, 64);
          _tile_loadd(7, b1 + next * 512, 64);
        }
        _tile_stored(0, c, 64);
        _tile_stored(1, c + 256, 64);
        _tile_stored(2, c + 512, 64);
        _tile_stored(3, c + 768, 64);
      }
    }
  }
  _tile_release();
}

// Accumulator tiles of one panel plus bias[col] -> rows of out [rows, n].
void StorePanel(const float* acc, const float* bias, const Shape& s, int64_t row0,
                float* out) {
  for (int64_t cp = 0; cp < s.n32 / 32; ++cp) {
    for (int t = 0; t < 4; ++t) {
      const int64_t col0 = cp * 32 + (t % 2) * 16;
      if (col0 >= s.n) continue;
      const int64_t width = std::min<int64_t>(16, s.n - col0);
      const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1);
      const __m512 add = _mm512_maskz_loadu_ps(mask, bias + col0);
      for (int r = 0; r < 16; ++r) {
        const int64_t row = row0 + (t / 2) * 16 + r;
        if (row >= s.rows) break;
        const __m512 dot = _mm512_load_ps(acc + (cp * 4 + t) * 256 + r * 16);
        _mm512_mask_storeu_ps(out + row * s.n + col0, mask, _mm512_add_ps(dot, add));
      }
    }
  }
}

// Work items handed out by an atomic counter. The caller takes items too, so it
// never waits on a task still queued behind busy pool threads; it waits only for
// items already running elsewhere. Late tasks find no work and return.
struct Items {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t count = 0;
  std::function<void(int64_t)> run;
};

void Drain(Items& items) {
  for (;;) {
    const int64_t i = items.next.fetch_add(1);
    if (i >= items.count) return;
    items.run(i);
    items.done.fetch_add(1);
  }
}

void ParallelFor(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> run) {
  auto items = std::make_shared<Items>();
  items->count = count;
  items->run = std::move(run);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([items] { Drain(*items); });
  Drain(*items);
  while (items->done.load() < count) _mm_pause();
}

// out = x @ c^T + bias[None, :]
ffi::Error DotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> c,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), cd = c.dimensions(), bd = bias.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || xd[1] != cd[1] || bd.size() != 1 || bd[0] != cd[0]) {
    return ffi::Error::InvalidArgument("amx_dot: expected x [R, d], c [n, d], bias [n]");
  }
  const Shape s(xd[0], cd[0], xd[1]);
  if (s.rows == 0 || s.n == 0) return ffi::Error::Success();
  const float* xs = x.typed_data();
  const float* cs = c.typed_data();
  const float* bs = bias.typed_data();
  float* os = out->typed_data();
  Bf16Buffer b = AllocBf16(s.n32 * s.k);
  uint16_t* bp = b.get();
  ParallelFor(pool, s.n32 / 16, [&s, cs, bp](int64_t tile) {
    PackColumnTile(cs, s, tile * 16, bp + tile * 16 * s.k, Scratch(0, 16 * s.k));
  });
  // Groups of panels, but at least ~4 work items per thread to balance the load.
  const int64_t panels = (s.rows + 31) / 32;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t group = std::clamp<int64_t>(panels / (4 * threads), 1, kMaxPanelsPerItem);
  ParallelFor(pool, (panels + group - 1) / group, [&s, xs, bp, bs, os, panels,
                                                    group](int64_t item) {
    const int64_t first = item * group, count = std::min(group, panels - first);
    uint16_t* a = Scratch(1, group * 32 * s.k);
    float* acc = reinterpret_cast<float*>(Scratch(2, group * s.n32 * 32 * 2));
    for (int64_t i = 0; i < count; ++i) {
      PackRowPanel(xs, s, (first + i) * 32, a + i * 32 * s.k, Scratch(0, 32 * s.k));
    }
    MultiplyPanels(a, count, bp, s, acc);
    for (int64_t i = 0; i < count; ++i) {
      StorePanel(acc + i * s.n32 * 32, bs, s, (first + i) * 32, os);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int deeper_jax_amx_enable() {
  return static_cast<int>(syscall(SYS_arch_prctl, kArchReqXcompPerm, kXFeatureXtileData));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(deeper_jax_amx_dot, DotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
