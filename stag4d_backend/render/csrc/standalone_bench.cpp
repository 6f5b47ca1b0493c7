// Developer tool, not part of the extension: times the torch-free kernel on one thread, per SIMD level, on a
// synthetic scene, in a second's build (no torch headers). From the repository root:
//
//   cd stag4d_backend/render/csrc
//   g++ -std=c++17 -O3 -ffp-contract=off -Wno-psabi kernel.cpp standalone_bench.cpp -o /tmp/kbench
//   /tmp/kbench [N=20000] [size=256] [reps=5]
//
// Prints bin / forward / backward milliseconds and checksums (equal checksums across levels are expected: all
// levels compute the same bits).

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernel.h"

using namespace stag4d;

namespace {

struct Rng {  // xorshift64*, deterministic
  uint64_t s;
  float uniform() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return static_cast<float>((s * 2685821657736338717ull) >> 40) / static_cast<float>(1 << 24);
  }
};

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 20000;
  const int size = argc > 2 ? std::atoi(argv[2]) : 256;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 5;
  const int C = 4;
  Rng rng{0x9E3779B97F4A7C15ull};
  std::vector<float> m(2 * n), cn(3 * n), f(C * n), o(n), d(n);
  std::vector<int32_t> r(2 * n);
  for (int i = 0; i < n; ++i) {  // same distribution as benchmarks/composite_kernel.py
    m[2 * i] = (rng.uniform() * 1.1f - 0.05f) * size;
    m[2 * i + 1] = (rng.uniform() * 1.1f - 0.05f) * size;
    const float th = rng.uniform() * 3.14159265f, s0 = 0.6f + 3.9f * rng.uniform(), s1 = 0.6f + 3.9f * rng.uniform();
    const float c = std::cos(th), s = std::sin(th);
    const float xx = c * c * s0 * s0 + s * s * s1 * s1, yy = s * s * s0 * s0 + c * c * s1 * s1;
    const float xy = c * s * (s0 * s0 - s1 * s1), det = xx * yy - xy * xy;
    cn[3 * i] = yy / det;
    cn[3 * i + 1] = -xy / det;
    cn[3 * i + 2] = xx / det;
    r[2 * i] = static_cast<int32_t>(std::ceil(3.33f * std::sqrt(xx)));
    r[2 * i + 1] = static_cast<int32_t>(std::ceil(3.33f * std::sqrt(yy)));
    o[i] = 0.1f + 0.8f * rng.uniform();
    for (int k = 0; k < C; ++k) f[C * i + k] = rng.uniform();
    d[i] = 1.0f + 10.0f * rng.uniform();
  }
  const Geometry geo = make_geometry(size, size, 16);
  std::vector<int32_t> off(geo.n_tiles + 1);
  std::vector<float> img(static_cast<size_t>(size) * size * C), al(size * size), tf(size * size);
  std::vector<int32_t> ls(size * size);
  std::vector<float> gi(img.size(), 0.5f), ga(al.size(), 0.25f);
  float* scratch = static_cast<float*>(std::aligned_alloc(64, (backward_scratch_floats(geo, C) * 4 + 127) / 64 * 64));
  int32_t* lscr = static_cast<int32_t*>(std::aligned_alloc(64, (geo.npix_pad * 4 + 63) / 64 * 64));
  const GaussianView gv{m.data(), cn.data(), f.data(), o.data(), r.data(), C};
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kBase}) {
    if (static_cast<int>(isa) > static_cast<int>(cpu_isa())) continue;
    std::vector<int32_t> ids;
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < reps; ++it) ids = bin_gaussians(m.data(), d.data(), r.data(), n, geo, off.data());
    const double t_bin = ms_since(t0) / reps;
    t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < reps; ++it)
      for (int t = 0; t < geo.n_tiles; ++t)
        forward_tile(isa, gv, geo, ids.data() + off[t], off[t + 1] - off[t], t, scratch, lscr, img.data(), al.data(),
                     tf.data(), ls.data());
    const double t_fwd = ms_since(t0) / reps;
    std::vector<float> pg(ids.size() * (6 + C));
    t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < reps; ++it) {
      std::fill(pg.begin(), pg.end(), 0.0f);
      for (int t = 0; t < geo.n_tiles; ++t)
        if (off[t + 1] > off[t])
          backward_tile(isa, gv, geo, ids.data() + off[t], t, tf.data(), ls.data(), gi.data(), ga.data(), scratch,
                        lscr, pg.data() + static_cast<size_t>(off[t]) * (6 + C), true, false);
    }
    const double t_bwd = ms_since(t0) / reps;
    double cs = 0, gs = 0;
    for (float v : img) cs += v;
    for (float v : pg) gs += std::fabs(v);
    std::printf("%-12s N=%d %dx%d: bin %6.2f ms  fwd %7.2f ms  bwd %7.2f ms  (1 thread)  pairs %zu  checksums %.6f %.6f\n",
                isa_name(isa), n, size, size, t_bin, t_fwd, t_bwd, ids.size(), cs, gs);
  }
  std::free(scratch);
  std::free(lscr);
  return 0;
}
