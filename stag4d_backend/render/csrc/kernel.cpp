// Torch-free core of the STAG4D CPU compositing kernel: binning, SIMD dispatch. The per-tile forward and
// backward live in kernel_impl.inc, which this file compiles once per SIMD level. See composite.cpp for the
// contract and the overall design, kernel.h for the interface.
//
// Exactness: compiled without -ffast-math and with -ffp-contract=off, so forward and backward evaluate alpha
// with bit-identical arithmetic (the same skip/stop decisions), and every SIMD level gives the same bits.
//
// SIMD levels (x86-64 with GCC): the code is compiled three times under `#pragma GCC target`: AVX-512
// (F/DQ/BW/VL, 16 lanes), AVX2 (8 lanes) and the baseline x86-64 (SSE2, 4 lanes), and the
// level is chosen at run time from the CPU (cpuid), so no -march flag is needed and a build cache shared between
// different x86 machines never executes an instruction the CPU lacks. Other compilers/architectures get the
// 4-lane version only (which GCC/clang map to SSE2 or NEON).

#include "kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(STAG4D_NO_DISPATCH)
#define STAG4D_X86_DISPATCH 1
#else
#define STAG4D_X86_DISPATCH 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define STAG4D_INLINE inline __attribute__((always_inline))
#else
#define STAG4D_INLINE inline
#endif

namespace stag4d {
namespace {

constexpr int kChunk = 16;  // logical pixel chunk; pixel arrays are padded to a multiple of it

// Rows of a tile (relative, inclusive) that the box mean.y +- ry can reach, with a pixel of margin.
// Pixels outside the box have alpha < 1/255 by the contract, so skipping them changes nothing.
STAG4D_INLINE bool row_range(float my, int ry, int oy, int rows, int* r0, int* r1) {
  const double lo = std::floor(static_cast<double>(my) - ry - 0.5) - 1.0 - oy;
  const double hi = std::ceil(static_cast<double>(my) + ry - 0.5) + 1.0 - oy;
  if (!(hi >= 0.0) || !(lo <= rows - 1)) return false;
  *r0 = lo < 0.0 ? 0 : static_cast<int>(lo);
  *r1 = hi > rows - 1 ? rows - 1 : static_cast<int>(hi);
  return *r0 <= *r1;
}

// order-preserving key of a float depth (NaN last like torch.sort, -0 == +0), then the index: a stable order
STAG4D_INLINE uint64_t depth_key(float d, uint32_t idx) {
  uint32_t u;
  if (std::isnan(d)) {
    u = 0xFFFFFFFFu;
  } else {
    if (d == 0.0f) d = 0.0f;
    std::memcpy(&u, &d, sizeof(u));
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<uint64_t>(u) << 32) | idx;
}

STAG4D_INLINE void atomic_add(float* dst, float v) {
  if (v == 0.0f) return;
#if defined(__GNUC__) || defined(__clang__)
  float cur;
  __atomic_load(dst, &cur, __ATOMIC_RELAXED);
  float nxt;
  do {
    nxt = cur + v;
  } while (!__atomic_compare_exchange(dst, &cur, &nxt, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
#else
#error "atomic float add needs GCC or clang builtins"
#endif
}

}  // namespace

Geometry make_geometry(int width, int height, int ts) {
  Geometry g;
  g.width = width;
  g.height = height;
  g.ts = ts;
  g.tiles_x = (width + ts - 1) / ts;
  g.tiles_y = (height + ts - 1) / ts;
  g.n_tiles = g.tiles_x * g.tiles_y;
  g.npix = ts * ts;
  g.npix_pad = (g.npix + kChunk - 1) / kChunk * kChunk;
  return g;
}

// -------------------------------------------------------------------------------------------------- binning
std::vector<int32_t> bin_gaussians(const float* means, const float* depths, const int32_t* radii, int64_t n,
                                   const Geometry& geo, int32_t* offsets) {
  // tile rectangles, gsplat isect_tiles: [floor((x - r)/ts), ceil((x + r)/ts)) clipped to the grid
  std::vector<int32_t> rect(static_cast<size_t>(n) * 4, 0);
  std::vector<uint64_t> keys;
  keys.reserve(static_cast<size_t>(n));
  const double ts = geo.ts;
  auto clampd = [](double v, double hi) { return v < 0.0 ? 0.0 : (v > hi ? hi : v); };
  for (int64_t i = 0; i < n; ++i) {
    const int rx = radii[2 * i], ry = radii[2 * i + 1];
    const double mx = means[2 * i], my = means[2 * i + 1];
    if (rx <= 0 || ry <= 0 || !std::isfinite(mx) || !std::isfinite(my)) continue;
    int32_t* r = rect.data() + 4 * i;
    r[0] = static_cast<int32_t>(clampd(std::floor((mx - rx) / ts), geo.tiles_x));
    r[1] = static_cast<int32_t>(clampd(std::ceil((mx + rx) / ts), geo.tiles_x));
    r[2] = static_cast<int32_t>(clampd(std::floor((my - ry) / ts), geo.tiles_y));
    r[3] = static_cast<int32_t>(clampd(std::ceil((my + ry) / ts), geo.tiles_y));
    if (r[1] > r[0] && r[3] > r[2]) keys.push_back(depth_key(depths[i], static_cast<uint32_t>(i)));
  }
  std::sort(keys.begin(), keys.end());
  // counting sort into per-tile runs; visiting Gaussians front to back keeps every run sorted by depth
  std::vector<int64_t> cur(static_cast<size_t>(geo.n_tiles) + 1, 0);
  for (const uint64_t key : keys) {
    const int32_t* r = rect.data() + 4 * static_cast<size_t>(key & 0xFFFFFFFFu);
    for (int y = r[2]; y < r[3]; ++y)
      for (int x = r[0]; x < r[1]; ++x) ++cur[static_cast<size_t>(y) * geo.tiles_x + x];
  }
  int64_t total = 0;
  for (int t = 0; t < geo.n_tiles; ++t) {
    const int64_t c = cur[t];
    cur[t] = total;
    offsets[t] = static_cast<int32_t>(total);
    total += c;
    if (total >= (int64_t(1) << 31)) throw std::length_error("too many (tile, Gaussian) pairs");
  }
  offsets[geo.n_tiles] = static_cast<int32_t>(total);
  std::vector<int32_t> ids(static_cast<size_t>(total));
  for (const uint64_t key : keys) {
    const uint32_t g = static_cast<uint32_t>(key & 0xFFFFFFFFu);
    const int32_t* r = rect.data() + 4 * static_cast<size_t>(g);
    for (int y = r[2]; y < r[3]; ++y)
      for (int x = r[0]; x < r[1]; ++x) ids[cur[static_cast<size_t>(y) * geo.tiles_x + x]++] = static_cast<int32_t>(g);
  }
  return ids;
}

}  // namespace stag4d

// ------------------------------------------------------------------------------------ per-SIMD-level copies
#define STAG4D_IMPL_FILE "kernel_impl.inc"
#include "simd_instances.inc"

// ------------------------------------------------------------------------------------------------ dispatch
namespace stag4d {

size_t forward_scratch_floats(const Geometry& geo, int C) { return static_cast<size_t>(3 + C) * geo.npix_pad; }

size_t backward_scratch_floats(const Geometry& geo, int C) {
  return static_cast<size_t>(5 + 2 * C) * geo.npix_pad + static_cast<size_t>(C) * kChunk;
}

Isa cpu_isa() {
#if STAG4D_X86_DISPATCH
  // (feature names rather than "x86-64-v4"/"x86-64-v3": those need GCC >= 12; libgcc also checks that the OS
  // saves the AVX / AVX-512 registers)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

Isa select_isa() {
  const Isa best = cpu_isa();
  const char* env = std::getenv("STAG4D_KERNEL_ISA");  // tests / benchmarks: force a lower level
  if (env == nullptr) return best;
  const std::string s(env);
  Isa want = best;
  if (s == "avx512") want = Isa::kAvx512;
  if (s == "avx2") want = Isa::kAvx2;
  if (s == "base") want = Isa::kBase;
  return static_cast<int>(want) <= static_cast<int>(best) ? want : best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
#if STAG4D_X86_DISPATCH
      return "base (sse2)";
#else
      return "base (4-lane generic)";
#endif
  }
}

float exp_neg_scalar(float s) { return base::exp_neg_scalar(s); }

void forward_tile(Isa isa, const GaussianView& gv, const Geometry& geo, const int32_t* ids, int count, int tile,
                  float* scratch, int32_t* last_scratch, float* out_img, float* out_alpha, float* out_T,
                  int32_t* out_last) {
#if STAG4D_X86_DISPATCH
  if (isa == Isa::kAvx512)
    return v4::forward_tile(gv, geo, ids, count, tile, scratch, last_scratch, out_img, out_alpha, out_T, out_last);
  if (isa == Isa::kAvx2)
    return v3::forward_tile(gv, geo, ids, count, tile, scratch, last_scratch, out_img, out_alpha, out_T, out_last);
#endif
  (void)isa;
  base::forward_tile(gv, geo, ids, count, tile, scratch, last_scratch, out_img, out_alpha, out_T, out_last);
}

void backward_tile(Isa isa, const GaussianView& gv, const Geometry& geo, const int32_t* ids, int tile,
                   const float* T_final, const int32_t* last, const float* grad_img, const float* grad_alpha,
                   float* scratch, int32_t* last_scratch, float* out, bool per_pair, bool use_atomics) {
#if STAG4D_X86_DISPATCH
  if (isa == Isa::kAvx512)
    return v4::backward_tile(gv, geo, ids, tile, T_final, last, grad_img, grad_alpha, scratch, last_scratch, out,
                             per_pair, use_atomics);
  if (isa == Isa::kAvx2)
    return v3::backward_tile(gv, geo, ids, tile, T_final, last, grad_img, grad_alpha, scratch, last_scratch, out,
                             per_pair, use_atomics);
#endif
  (void)isa;
  base::backward_tile(gv, geo, ids, tile, T_final, last, grad_img, grad_alpha, scratch, last_scratch, out, per_pair,
                      use_atomics);
}

}  // namespace stag4d
