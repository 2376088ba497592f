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
#include "amx_common.h"

namespace deeper_jax {
namespace {

struct Shape {
  int64_t rows, n, d;  // x [rows, d], c [n, d]
  int64_t d32, k, chunks, n32;
  explicit Shape(int64_t rows_, int64_t n_, int64_t d_)
      : rows(rows_), n(n_), d(d_), d32((d_ + 31) / 32 * 32), k(3 * d32), chunks(k / 32),
        n32((n_ + 31) / 32 * 32) {}
};

// One row (or nullptr: zeros) -> a bf16 line of depth 3 d32 whose part `lo_part` (1 or
// 2) holds lo and the other two hi: [hi, lo, hi] for x, [hi, hi, lo] for c.
void SplitLine(const float* row, const Shape& s, int lo_part, uint16_t* line) {
  std::memset(line, 0, s.k * 2);
  if (row == nullptr) return;
  SplitRow(row, s.d, line, line + lo_part * s.d32);
  std::memcpy(line + (3 - lo_part) * s.d32, line, s.d * 2);
}

// 16 rows of c from col0 -> B tiles [chunk][16 pairs][16 cols][2] of depth [hi, hi, lo].
void PackColumnTile(const float* c, const Shape& s, int64_t col0, uint16_t* tiles,
                    uint16_t* lines) {
  for (int col = 0; col < 16; ++col) {
    SplitLine(col0 + col < s.n ? c + (col0 + col) * s.d : nullptr, s, 2, lines + col * s.k);
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
    SplitLine(row0 + r < s.rows ? x + (row0 + r) * s.d : nullptr, s, 1, lines + r * s.k);
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
          ZeroAccumulators();
        } else {
          LoadAccumulators(c);
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
        StoreAccumulators(c);
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
    PackColumnTile(cs, s, tile * 16, bp + tile * 16 * s.k, ThreadScratch(0, 16 * s.k));
  });
  // Groups of panels, but at least ~4 work items per thread to balance the load.
  const int64_t panels = (s.rows + 31) / 32;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t group = std::clamp<int64_t>(panels / (4 * threads), 1, kMaxPanelsPerItem);
  ParallelFor(pool, (panels + group - 1) / group, [&s, xs, bp, bs, os, panels,
                                                    group](int64_t item) {
    const int64_t first = item * group, count = std::min(group, panels - first);
    uint16_t* a = ThreadScratch(1, group * 32 * s.k);
    float* acc = reinterpret_cast<float*>(ThreadScratch(2, group * s.n32 * 32 * 2));
    for (int64_t i = 0; i < count; ++i) {
      PackRowPanel(xs, s, (first + i) * 32, a + i * 32 * s.k, ThreadScratch(0, 32 * s.k));
    }
    MultiplyPanels(a, count, bp, s, acc);
    for (int64_t i = 0; i < count; ++i) {
      StorePanel(acc + i * s.n32 * 32, bs, s, (first + i) * 32, os);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace deeper_jax

extern "C" int deeper_jax_amx_enable() { return deeper_jax::EnableAmx(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(deeper_jax_amx_dot, deeper_jax::DotImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
