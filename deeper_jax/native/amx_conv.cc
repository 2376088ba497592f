// Stride-1 k x k convolutions (NHWC input, HWIO kernel, float32) on Intel AMX tiles,
// with float32 operands split into bf16 hi + lo (amx_common.h): the forward pass, the
// input gradient and the kernel gradient of deeper_jax.models.amx_conv.
//
// Why: XLA:CPU's convolutions run in float32 on AVX-512 at ~250 GFLOP/s on this
// project's 2-core Sapphire Rapids machine (1.4x slower than oneDNN's; its kernel
// gradient 1.2-3.6x slower still) and never reach the AMX units.
//
// The flattened padded grid. Pad the input by p to [B, Hp, Wp, C] and number its
// pixels q = (b Hp + h) Wp + w. Then for every output pixel of q
//     y[q] = sum_{i,j} xp[q + i Wp + j] . K[i, j],
// so 16 consecutive q are ONE strided tile load per tap: no im2col. Grid positions
// with h >= Ho or w >= Wo are computed and dropped ((Hp Wp) / (Ho Wo) extra work:
// 1.04x at 112 x 112, 1.65x at 7 x 7).
//
// Forward and input gradient are the same kernel: dx = conv(pad(dy, k-1-p), K')
// with K'[i, j] = K[k-1-i, k-1-j]^T. Operands: A = activation rows [hi(C32) | lo(C32)]
// per pixel, read as depth [hi, lo, hi]; B = the kernel as [hi; hi; lo] along depth;
// so one bf16 GEMM over depth 3 C32 per tap gives hi.hi + lo.hi + hi.lo.
//
// Kernel gradient: dK[i, j] = sum_q xp[q + i Wp + j]^T dy[q] (dy placed on the grid,
// zero off it): a GEMM whose depth is q. A = dy transposed (rows = output channels,
// 32 q per tile row), B = x in AMX's pair layout (two consecutive q per bf16 pair),
// held twice (pairs starting on even and on odd q) so every tap's shift is a plain
// tile offset. Three products per tile: hi.hi, hi.lo, lo.hi.
//
// Memory: the split operands are built per work item in per-thread buffers sized
// for L2 (a few hundred KB), not as whole-tensor copies: materialising them cost as
// much as the products at 112 x 112 x 64 (13 of 28 ms for the kernel gradient).
//
// Determinism: every output element is summed over the same terms in the same order
// whatever the thread count: work items own disjoint outputs, and the kernel
// gradient's q stripes (a function of the shape only) are added in stripe order.
#include <vector>

#include "amx_common.h"

namespace deeper_jax {
namespace {

int64_t RoundUp(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
int64_t CeilDiv(int64_t v, int64_t m) { return (v + m - 1) / m; }

struct Grid {
  int64_t b, h, w, c;  // input [b, h, w, c]
  int64_t k, p;        // kernel size, padding (stride 1)
  int64_t hp, wp, ho, wo, plane;
  int64_t q_end;       // 1 + the last output pixel's q
  int64_t max_off;     // the largest tap shift, (k-1) Wp + k-1
  int64_t c32;         // channels rounded up to a tile's 32 bf16
  Grid(int64_t b_, int64_t h_, int64_t w_, int64_t c_, int64_t k_, int64_t p_)
      : b(b_), h(h_), w(w_), c(c_), k(k_), p(p_), hp(h_ + 2 * p_), wp(w_ + 2 * p_),
        ho(h_ + 2 * p_ - k_ + 1), wo(w_ + 2 * p_ - k_ + 1), plane(hp * wp),
        q_end((b_ - 1) * hp * wp + (ho - 1) * wp + wo), max_off((k_ - 1) * (wp + 1)),
        c32(RoundUp(c_, 32)) {}
  int64_t Offset(int64_t tap) const { return (tap / k) * wp + tap % k; }
  // The input pixel at grid position q, or nullptr on the padding.
  const float* Pixel(const float* x, int64_t q) const {
    const int64_t bi = q / plane;
    if (bi >= b) return nullptr;
    const int64_t r = q % plane, hh = r / wp - p, ww = r % wp - p;
    if (hh < 0 || hh >= h || ww < 0 || ww >= w) return nullptr;
    return x + ((bi * h + hh) * w + ww) * c;
  }
  // The output row of grid position q, or -1 if q is not an output pixel.
  int64_t OutRow(int64_t q) const {
    const int64_t bi = q / plane, r = q % plane, hh = r / wp, ww = r % wp;
    if (bi >= b || hh >= ho || ww >= wo) return -1;
    return (bi * ho + hh) * wo + ww;
  }
};

__mmask16 FirstLanes(int64_t count) {
  return static_cast<__mmask16>((1u << std::clamp<int64_t>(count, 0, 16)) - 1);
}

// Per-thread scratch slots of this file (amx_dot.cc uses 0-2).
// kKernel and kPartial are the calling thread's: shared by the call's work items.
enum Slot { kRows = 3, kGradHi, kGradLo, kPairs, kAcc, kKernel, kPartial };

// ---------------------------------------------------------------- forward / input grad

// Grid rows [q0, q0 + rows) of x as bf16 [hi(c32) | lo(c32)]; zero on the padding.
void FillSplitRows(const float* x, const Grid& g, int64_t q0, int64_t rows, uint16_t* out) {
  const int64_t c2 = 2 * g.c32;
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* dst = out + r * c2;
    const float* src = g.Pixel(x, q0 + r);
    for (int64_t c0 = 0; c0 < g.c32; c0 += 16) {
      const __m512 v = src ? _mm512_maskz_loadu_ps(FirstLanes(g.c - c0), src + c0)
                           : _mm512_setzero_ps();
      __m512i hi, lo;
      Split16(v, &hi, &lo);
      StoreBf16x16(dst + c0, hi);
      StoreBf16x16(dst + g.c32 + c0, lo);
    }
  }
}

// The kernel as B tiles [n32 / 16][steps][16 pairs][16 cols][2], depth [hi; hi; lo]
// per tap (steps = k k 3 c32 / 32). Forward: K [k, k, cin, cout], value(tap, ci, o) =
// K[tap][ci][o]. Input gradient (flip): K [k, k, cout, cin], value = K[k k-1-tap][o][ci].
// One tile row (a depth pair, 16 columns) is two 16-lane splits and one 64-byte store.
void PackKernel(ffi::ThreadPool& tp, const float* kernel, int64_t k, int64_t cin, int64_t cout,
                bool flip, int64_t c32, uint16_t* out) {
  const int64_t per_tap = 3 * c32 / 32, steps = k * k * per_tap;
  const int64_t n16 = RoundUp(cout, 32) / 16;
  ParallelFor(tp, n16 * k * k, [&, out](int64_t item) {
    const int64_t nt = item / (k * k), tap = item % (k * k);
    const int64_t o0 = nt * 16;
    const __mmask16 mask = FirstLanes(cout - o0);
    // Columns o0.. of depth ci: contiguous in the forward kernel, strided when flipped.
    const float* base = flip ? kernel + ((k * k - 1 - tap) * cout + o0) * cin
                             : kernel + tap * cin * cout + o0;
    const __m512i gather = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int>(cin)));
    uint16_t* tiles = out + (nt * steps + tap * per_tap) * 512;
    for (int64_t d0 = 0; d0 < 3 * c32; d0 += 2) {
      __m512i half[2];
      for (int e = 0; e < 2; ++e) {
        const int64_t d = d0 + e, part = d / c32, ci = d % c32;
        __m512 v = _mm512_setzero_ps();
        if (ci < cin && mask != 0) {
          v = flip ? _mm512_mask_i32gather_ps(v, mask, gather, base + ci, 4)
                   : _mm512_maskz_loadu_ps(mask, base + ci * cout);
        }
        __m512i hi, lo;
        Split16(v, &hi, &lo);
        half[e] = part == 2 ? lo : hi;
      }
      const __m512i row = _mm512_or_si512(half[1], _mm512_srli_epi32(half[0], 16));
      _mm512_store_si512(tiles + (d0 / 32) * 512 + ((d0 % 32) / 2) * 32, row);
    }
  });
}

// y = conv(x, K) with padding p; flip: x is dy and the result the input gradient.
// A work item is a group of 32-row output blocks and a range of 32-column pairs: its
// input rows are split once into a per-thread buffer (<= ~320 KB), then each column
// pair's kernel slice (<= 864 KB) is read from L2 for every block.
ffi::Error ConvImpl(ffi::ThreadPool tp, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                    ffi::ResultBuffer<ffi::F32> y, int64_t padding, int64_t flip) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || kd[0] != kd[1]) {
    return ffi::Error::InvalidArgument("amx_conv: expected x [B,H,W,C], kernel [k,k,I,O]");
  }
  const int64_t k = kd[0];
  const int64_t cin = xd[3], cout = flip ? kd[2] : kd[3];
  if ((flip ? kd[3] : kd[2]) != cin) {
    return ffi::Error::InvalidArgument("amx_conv: kernel channels do not match x");
  }
  const Grid g(xd[0], xd[1], xd[2], cin, k, padding);
  if (padding < 0 || g.ho < 1 || g.wo < 1 || yd[0] != g.b || yd[1] != g.ho || yd[2] != g.wo || yd[3] != cout) {
    return ffi::Error::InvalidArgument("amx_conv: output shape does not match the conv");
  }
  if (g.b == 0 || cout == 0) return ffi::Error::Success();
  if (cin == 0) {
    std::memset(y->typed_data(), 0, g.b * g.ho * g.wo * cout * 4);
    return ffi::Error::Success();
  }
  const int64_t c2 = 2 * g.c32, per_part = g.c32 / 32, per_tap = 3 * per_part;
  const int64_t steps = k * k * per_tap, pairs = RoundUp(cout, 32) / 32;
  uint16_t* wt = ThreadScratch(kKernel, pairs * 2 * steps * 512);
  PackKernel(tp, kernel.typed_data(), k, cin, cout, flip != 0, g.c32, wt);

  // Where each depth step reads its A tile: the tap's row shift, then hi | lo | hi.
  std::vector<int64_t> a_off(steps);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t tap = s / per_tap, part = (s % per_tap) / per_part, kc = s % per_part;
    a_off[s] = g.Offset(tap) * c2 + (part == 1 ? g.c32 : 0) + kc * 32;
  }
  const int64_t blocks = CeilDiv(g.q_end, 32);
  const int64_t per_group = std::clamp<int64_t>((256 << 10) / (32 * c2 * 2), 1, 16);
  const int64_t groups = CeilDiv(blocks, per_group);
  const int64_t ranges = std::min(pairs, CeilDiv(8, groups));
  const int64_t per_range = CeilDiv(pairs, ranges);
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  ParallelFor(tp, groups * ranges, [&](int64_t item) {
    const int64_t group = item / ranges, range = item % ranges;
    const int64_t blk0 = group * per_group, blk1 = std::min(blocks, blk0 + per_group);
    const int64_t q0 = blk0 * 32, rows = (blk1 - blk0) * 32 + g.max_off;
    uint16_t* a = ThreadScratch(kRows, rows * c2);
    FillSplitRows(xs, g, q0, rows, a);
    alignas(64) float acc[4][16][16];
    LoadTileConfig();
    const int64_t np1 = std::min(pairs, (range + 1) * per_range);
    for (int64_t np = range * per_range; np < np1; ++np) {
      const uint16_t* b0 = wt + (2 * np) * steps * 512;
      const uint16_t* b1 = b0 + steps * 512;
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t qb = blk * 32;
        bool any = false;
        for (int64_t q = qb; q < qb + 32 && !any; ++q) any = g.OutRow(q) >= 0;
        if (!any) continue;
        const uint16_t* a0 = a + (qb - q0) * c2;
        const uint16_t* a1 = a0 + 16 * c2;
        ZeroAccumulators();
        // Software-pipelined: each operand tile is reloaded right after its last use
        // (tiles are not renamed, so loads overlap the products).
        _tile_loadd(4, a0 + a_off[0], c2 * 2);
        _tile_loadd(5, a1 + a_off[0], c2 * 2);
        _tile_loadd(6, b0, 64);
        _tile_loadd(7, b1, 64);
        for (int64_t s = 0; s < steps; ++s) {
          const int64_t next = s + 1 < steps ? s + 1 : s;
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_loadd(4, a0 + a_off[next], c2 * 2);
          _tile_dpbf16ps(2, 5, 6);
          _tile_loadd(6, b0 + next * 512, 64);
          _tile_dpbf16ps(3, 5, 7);
          _tile_loadd(5, a1 + a_off[next], c2 * 2);
          _tile_loadd(7, b1 + next * 512, 64);
        }
        StoreAccumulators(&acc[0][0][0]);
        for (int t = 0; t < 4; ++t) {
          const int64_t col0 = np * 32 + (t % 2) * 16;
          const __mmask16 mask = FirstLanes(cout - col0);
          if (mask == 0) continue;
          for (int r = 0; r < 16; ++r) {
            const int64_t row = g.OutRow(qb + (t / 2) * 16 + r);
            if (row >= 0) _mm512_mask_storeu_ps(ys + row * cout + col0, mask, _mm512_load_ps(acc[t][r]));
          }
        }
      }
    }
    _tile_release();
  });
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------- kernel grad

// q chunks (of 32) per pass: one pass's split operands stay in L2 while every tap
// and channel block of the work item runs over them.
constexpr int64_t kChunksPerPass = 16;
// 32-channel blocks per work item side (output x input channels): 2 x 2 keeps a
// pass's accumulators (taps x 4 blocks x 4 KB) and operands within L2.
constexpr int64_t kBlocksPerSide = 2;
// The kernel gradient is summed over q in this many stripes at most (then added in
// stripe order), so that small-channel layers still give every thread work.
constexpr int64_t kMaxStripes = 16;

// dy chunks [chunk0, chunk1) for output channels [o0, o0 + 32 nob), transposed into
// A tiles [chunk][2 nob][16 channels][32 q], hi and lo: each tile row is two 16-lane
// gathers down a channel.
void FillGradTiles(const float* dy, const Grid& g, int64_t n, int64_t chunk0, int64_t chunk1,
                   int64_t o0, int64_t nob, uint16_t* hi, uint16_t* lo) {
  const int64_t tiles = 2 * nob;
  for (int64_t qc = chunk0; qc < chunk1; ++qc) {
    int64_t base_row = -1;
    alignas(64) int32_t offsets[32];
    uint32_t valid = 0;
    for (int j = 0; j < 32; ++j) {
      const int64_t r = g.OutRow(qc * 32 + j);
      offsets[j] = 0;
      if (r < 0) continue;
      if (base_row < 0) base_row = r;
      offsets[j] = static_cast<int32_t>((r - base_row) * n);
      valid |= 1u << j;
    }
    const __m512i idx0 = _mm512_load_si512(offsets), idx1 = _mm512_load_si512(offsets + 16);
    const __mmask16 m0 = static_cast<__mmask16>(valid), m1 = static_cast<__mmask16>(valid >> 16);
    const float* src = dy + std::max<int64_t>(base_row, 0) * n;
    for (int64_t t = 0; t < tiles; ++t) {
      uint16_t* th = hi + ((qc - chunk0) * tiles + t) * 512;
      uint16_t* tl = lo + ((qc - chunk0) * tiles + t) * 512;
      for (int r = 0; r < 16; ++r) {
        const int64_t o = o0 + t * 16 + r;
        __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
        if (o < n && valid != 0) {
          v0 = _mm512_mask_i32gather_ps(v0, m0, idx0, src + o, 4);
          v1 = _mm512_mask_i32gather_ps(v1, m1, idx1, src + o, 4);
        }
        __m512i h, l;
        Split16(v0, &h, &l);
        StoreBf16x16(th + r * 32, h);
        StoreBf16x16(tl + r * 32, l);
        Split16(v1, &h, &l);
        StoreBf16x16(th + r * 32 + 16, h);
        StoreBf16x16(tl + r * 32 + 16, l);
      }
    }
  }
}

// x at grid rows q0 + 2 pr + parity + {0, 1} for pr < pairs, input channels
// [c0, c0 + width), in pair layout [parity][hi, lo][pairs][width][2].
void FillPairRows(const float* x, const Grid& g, int64_t q0, int64_t pairs, int64_t c0,
                  int64_t width, uint16_t* out) {
  for (int parity = 0; parity < 2; ++parity) {
    uint16_t* hi = out + (2 * parity) * pairs * width * 2;
    uint16_t* lo = hi + pairs * width * 2;
    for (int64_t pr = 0; pr < pairs; ++pr) {
      const float* src[2] = {g.Pixel(x, q0 + 2 * pr + parity), g.Pixel(x, q0 + 2 * pr + parity + 1)};
      for (int64_t cc = 0; cc < width; cc += 16) {
        const __mmask16 mask = FirstLanes(g.c - c0 - cc);
        __m512i h[2], l[2];
        for (int e = 0; e < 2; ++e) {
          const __m512 v = src[e] ? _mm512_maskz_loadu_ps(mask, src[e] + c0 + cc)
                                  : _mm512_setzero_ps();
          Split16(v, &h[e], &l[e]);
        }
        _mm512_store_si512(hi + (pr * width + cc) * 2,
                           _mm512_or_si512(h[1], _mm512_srli_epi32(h[0], 16)));
        _mm512_store_si512(lo + (pr * width + cc) * 2,
                           _mm512_or_si512(l[1], _mm512_srli_epi32(l[0], 16)));
      }
    }
  }
}

// One 32 x 32 block of dK[tap] over `chunks` q chunks: C += A_hi B_hi + A_hi B_lo +
// A_lo B_hi, each operand tile reloaded right after its last use.
void GradBlock(const uint16_t* ah, const uint16_t* al, int64_t a_step, const uint16_t* bh,
               const uint16_t* bl, int64_t b_step, int64_t b_stride, int64_t chunks) {
  for (int64_t qc = 0; qc < chunks; ++qc) {
    const uint16_t* xh = bh + qc * b_step;
    const uint16_t* xl = bl + qc * b_step;
    _tile_loadd(4, ah + qc * a_step, 64);
    _tile_loadd(6, xh, b_stride);
    _tile_loadd(5, ah + qc * a_step + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, xh + 32, b_stride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(6, xl, b_stride);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(7, xl + 32, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(4, al + qc * a_step, 64);
    _tile_loadd(6, xh, b_stride);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(5, al + qc * a_step + 512, 64);
    _tile_loadd(7, xh + 32, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// dK [k, k, c, n] of y = conv(x, K) with padding p, from x and dy.
// Work items: (q stripe, group of <= 2 x 2 channel blocks). An item walks its stripe
// in passes of kChunksPerPass chunks; per pass it splits its dy and x slices into
// per-thread buffers, then runs every tap and block over them.
ffi::Error KernelGradImpl(ffi::ThreadPool tp, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dk, int64_t padding) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || kd.size() != 4 || kd[0] != kd[1]) {
    return ffi::Error::InvalidArgument("amx_conv_kernel_grad: expected x, dy, dk 4-D");
  }
  const int64_t k = kd[0], n = yd[3], taps = k * k;
  const Grid g(xd[0], xd[1], xd[2], xd[3], k, padding);
  if (padding < 0 || g.ho < 1 || g.wo < 1 || kd[2] != g.c || kd[3] != n || yd[0] != g.b || yd[1] != g.ho || yd[2] != g.wo) {
    return ffi::Error::InvalidArgument("amx_conv_kernel_grad: shapes do not match the conv");
  }
  if (g.c == 0 || n == 0) return ffi::Error::Success();
  if (g.b == 0) {
    std::memset(dk->typed_data(), 0, taps * g.c * n * 4);
    return ffi::Error::Success();
  }
  const int64_t chunks = CeilDiv(g.q_end, 32), passes = CeilDiv(chunks, kChunksPerPass);
  const int64_t obs = RoundUp(n, 32) / 32, cbs = g.c32 / 32;
  const int64_t ogroups = CeilDiv(obs, kBlocksPerSide), cgroups = CeilDiv(cbs, kBlocksPerSide);
  const int64_t groups = ogroups * cgroups;
  int64_t stripes = std::clamp<int64_t>(CeilDiv(8, groups), 1, std::min(passes, kMaxStripes));
  const int64_t passes_per_stripe = CeilDiv(passes, stripes);
  stripes = CeilDiv(passes, passes_per_stripe);
  const int64_t dk_size = taps * g.c * n;
  // Stripe partials (when there is more than one) are summed into dk in stripe order.
  float* partial = reinterpret_cast<float*>(
      ThreadScratch(kPartial, stripes > 1 ? stripes * dk_size * 2 : 1));
  float* out = dk->typed_data();
  const float* xs = x.typed_data();
  const float* dys = dy.typed_data();
  const int64_t pass_pairs = (kChunksPerPass * 32 + g.max_off) / 2 + 1;
  ParallelFor(tp, stripes * groups, [&](int64_t item) {
    const int64_t stripe = item / groups, group = item % groups;
    const int64_t ob0 = (group / cgroups) * kBlocksPerSide, cb0 = (group % cgroups) * kBlocksPerSide;
    const int64_t nob = std::min(kBlocksPerSide, obs - ob0), ncb = std::min(kBlocksPerSide, cbs - cb0);
    const int64_t width = 32 * ncb, a_step = 2 * nob * 512;
    uint16_t* ah = ThreadScratch(kGradHi, kChunksPerPass * a_step);
    uint16_t* al = ThreadScratch(kGradLo, kChunksPerPass * a_step);
    uint16_t* xp = ThreadScratch(kPairs, 4 * pass_pairs * width * 2);
    float* acc = reinterpret_cast<float*>(ThreadScratch(kAcc, taps * nob * ncb * 1024 * 2));
    const int64_t pass0 = stripe * passes_per_stripe;
    const int64_t pass1 = std::min(passes, pass0 + passes_per_stripe);
    LoadTileConfig();
    for (int64_t pass = pass0; pass < pass1; ++pass) {
      const int64_t chunk0 = pass * kChunksPerPass;
      const int64_t chunk1 = std::min(chunks, chunk0 + kChunksPerPass);
      const int64_t q0 = chunk0 * 32;
      const int64_t pairs = ((chunk1 - chunk0) * 32 + g.max_off) / 2 + 1;
      FillGradTiles(dys, g, n, chunk0, chunk1, ob0 * 32, nob, ah, al);
      FillPairRows(xs, g, q0, pairs, cb0 * 32, width, xp);
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t off = g.Offset(tap), par = off & 1;
        const uint16_t* xh = xp + (2 * par) * pairs * width * 2 + ((off - par) / 2) * width * 2;
        const uint16_t* xl = xh + pairs * width * 2;
        for (int64_t ob = 0; ob < nob; ++ob) {
          for (int64_t cb = 0; cb < ncb; ++cb) {
            float* c = acc + ((tap * nob + ob) * ncb + cb) * 1024;
            if (pass == pass0) {
              ZeroAccumulators();
            } else {
              LoadAccumulators(c);
            }
            GradBlock(ah + ob * 1024, al + ob * 1024, a_step, xh + cb * 64, xl + cb * 64,
                      16 * width * 2, width * 4, chunk1 - chunk0);
            StoreAccumulators(c);
          }
        }
      }
    }
    _tile_release();
    // Tile t of block (ob, cb): output channels (ob0 + ob) 32 + (t / 2) 16 + r, input
    // channels (cb0 + cb) 32 + (t % 2) 16 + col.
    float* dst = stripes > 1 ? partial + stripe * dk_size : out;
    for (int64_t tap = 0; tap < taps; ++tap) {
      for (int64_t ob = 0; ob < nob; ++ob) {
        for (int64_t cb = 0; cb < ncb; ++cb) {
          const float* c = acc + ((tap * nob + ob) * ncb + cb) * 1024;
          for (int t = 0; t < 4; ++t) {
            const int64_t o0 = (ob0 + ob) * 32 + (t / 2) * 16;
            const int64_t ci0 = (cb0 + cb) * 32 + (t % 2) * 16;
            for (int col = 0; col < 16 && ci0 + col < g.c; ++col) {
              float* row = dst + (tap * g.c + ci0 + col) * n;
              for (int r = 0; r < 16 && o0 + r < n; ++r) row[o0 + r] = c[t * 256 + r * 16 + col];
            }
          }
        }
      }
    }
  });
  if (stripes > 1) {
    const int64_t per_item = 4096;
    ParallelFor(tp, CeilDiv(dk_size, per_item), [&](int64_t item) {
      const int64_t i1 = std::min(dk_size, (item + 1) * per_item);
      for (int64_t i = item * per_item; i < i1; ++i) {
        float sum = partial[i];
        for (int64_t s = 1; s < stripes; ++s) sum += partial[s * dk_size + i];
        out[i] = sum;
      }
    });
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace deeper_jax

extern "C" int deeper_jax_amx_enable() { return deeper_jax::EnableAmx(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(deeper_jax_amx_conv, deeper_jax::ConvImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("padding")
                                  .Attr<int64_t>("flip"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(deeper_jax_amx_conv_kernel_grad, deeper_jax::KernelGradImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("padding"));
