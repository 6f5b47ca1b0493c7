// Gaussian splat compositing on the CPU: forward and hand-written backward, registered as torch operators
// torch.ops.stag4d_composite.{forward, backward, exp_neg, build_info} (the Python side is composite_cpp.py).
//
// The contract is the one of stag4d_backend/render/composite_torch.py (gsplat 1.5 classic rasterize_to_pixels
// without background):
//   sigma = 0.5 (a dx^2 + c dy^2) + b dx dy,  (dx, dy) = mean - (px + 0.5, py + 0.5)
//   alpha = min(0.999, opacity exp(-sigma)); skip if sigma < 0 or alpha < 1/255;
//   next_T = T (1 - alpha); stop the pixel (Gaussian not added) if next_T <= 1e-4; else C += alpha T f, T = next_T
//   alpha_out = 1 - T_final.
// Gaussians are composited front to back in ascending depth (stable: ties by index). Gaussians with a radius
// <= 0 are not drawn; the others are binned to tiles by the box mean +- radii (gsplat isect_tiles formula).
//
// Layout of the work
// ------------------
// * forward (kernel.cpp): tile rectangle per Gaussian -> one global stable depth order (64-bit keys:
//   order-preserving depth bits, index) -> counting sort into per-tile lists, which are therefore already front
//   to back.
// * tiles are handed out dynamically (an atomic counter) to the threads of one at::parallel_for region, so
//   torch.set_num_threads governs the thread count. Inside a tile (kernel_impl.inc) the loop is "for each
//   Gaussian of the tile: for each 16-pixel chunk of the rows its box reaches: SIMD over the pixels"; a chunk
//   where no pixel is affected is skipped after the alpha test, and a tile stops when all its pixels are done.
// * forward saves per pixel the final transmittance and the index (in the tile list) of the last Gaussian
//   added; backward walks each tile list back to front recovering T by division by (1 - alpha) and keeping the
//   running sum of the colour behind, exactly like gsplat's CUDA backward.
// * per-Gaussian gradients: each (tile, Gaussian) pair writes its own row, and the rows are summed in a fixed
//   order afterwards, so results do not depend on the thread count or on scheduling (fallbacks for enormous
//   pair counts: per-thread buffers, then atomics; see choose_grad_mode).
//
// Only light ATen headers and torch/library.h are included (no torch/extension.h, no pybind11): the first build
// takes seconds instead of half a minute.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kernel.h"

using stag4d::Geometry;
using stag4d::GaussianView;

namespace {

// ------------------------------------------------------------------------------------------------- scheduling
// Runs fn(tile, thread_slot) for every tile; tiles are handed out dynamically. thread_slot < n_slots.
template <typename Fn>
void for_each_tile(int n_tiles, int n_slots, const Fn& fn) {
  std::atomic<int> next{0};
  if (n_slots <= 1 || n_tiles <= 1) {
    for (int t = 0; t < n_tiles; ++t) fn(t, 0);
    return;
  }
  at::parallel_for(0, n_slots, 1, [&](int64_t b, int64_t e) {
    for (int64_t slot = b; slot < e; ++slot) {
      for (int t = next.fetch_add(1, std::memory_order_relaxed); t < n_tiles;
           t = next.fetch_add(1, std::memory_order_relaxed)) {
        fn(t, static_cast<int>(slot));
      }
    }
  });
}

int thread_slots(int n_tiles) { return std::max(1, std::min(at::get_num_threads(), n_tiles)); }

// 64-byte aligned scratch for `slots` threads, `per_slot` elements each (per_slot rounded up to 16)
template <typename T>
struct SlotScratch {
  std::vector<T> storage;
  size_t stride;
  T* base;
  SlotScratch(size_t per_slot, int slots) {
    stride = (per_slot + 15) / 16 * 16;
    storage.assign(stride * slots + 16, T(0));
    const uintptr_t a = reinterpret_cast<uintptr_t>(storage.data());
    base = storage.data() + ((64 - a % 64) % 64) / sizeof(T);
  }
  T* slot(int s) { return base + stride * s; }
};

enum class GradMode { kPairs, kThreads, kAtomics };

// How backward accumulates per-Gaussian gradients:
//  pairs   - each (tile, Gaussian) pair writes its own row, summed afterwards in a fixed order: deterministic
//            (bit-identical for any thread count), memory pairs * (6 + C) floats. The default.
//  threads - one [N, 6 + C] buffer per thread (used when the pairs array would exceed 256 MB).
//  atomics - one shared buffer, atomic adds (when the per-thread buffers would exceed 256 MB too).
// STAG4D_KERNEL_GRAD_MODE=pairs|threads|atomics forces one (tests, benchmarks).
GradMode choose_grad_mode(int64_t pairs, int64_t N, int G, int slots) {
  const char* env = std::getenv("STAG4D_KERNEL_GRAD_MODE");
  if (env != nullptr) {
    const std::string m(env);
    if (m == "pairs") return GradMode::kPairs;
    if (m == "threads") return GradMode::kThreads;
    if (m == "atomics") return GradMode::kAtomics;
  }
  const size_t budget = size_t(256) << 20;
  if (static_cast<size_t>(pairs) * G * sizeof(float) <= budget) return GradMode::kPairs;
  if (static_cast<size_t>(N) * G * sizeof(float) * slots <= budget || slots <= 1) return GradMode::kThreads;
  return GradMode::kAtomics;
}

void check_input(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), "composite_cpp: ", name, " must be a CPU tensor (got ", t.device(), ")");
  TORCH_CHECK(t.scalar_type() == dtype, "composite_cpp: ", name, " must be ",
              dtype == at::kFloat ? "float32" : "int32", " (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.is_contiguous(), "composite_cpp: ", name, " must be contiguous");
  if (cols == 0) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "composite_cpp: ", name, " must have shape [", n, "] (got ",
                t.sizes(), ")");
  } else if (cols > 0) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == cols, "composite_cpp: ", name,
                " must have shape [", n, ", ", cols, "] (got ", t.sizes(), ")");
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) >= 1, "composite_cpp: ", name,
                " must have shape [", n, ", C>=1] (got ", t.sizes(), ")");
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------------------- forward
// Returns image [H,W,C], alpha [H,W], T_final [H,W], last [H,W] int32, tile_offsets [n_tiles+1] int32,
// tile_ids [M] int32 (the last four are for the backward).
std::vector<at::Tensor> composite_forward(at::Tensor means2d, at::Tensor conics, at::Tensor features,
                                             at::Tensor opacities, at::Tensor depths, at::Tensor radii,
                                             int64_t width, int64_t height, int64_t tile_size) {
  TORCH_CHECK(width >= 0 && height >= 0 && width < (1 << 20) && height < (1 << 20),
              "composite_cpp: bad image size ", width, "x", height);
  TORCH_CHECK(tile_size >= 1 && tile_size <= 64, "composite_cpp: tile_size must be in [1, 64] (got ", tile_size,
              ")");
  TORCH_CHECK(means2d.dim() == 2, "composite_cpp: means2d must have shape [N, 2]");
  const int64_t N = means2d.size(0);
  TORCH_CHECK(N < (int64_t(1) << 31), "composite_cpp: too many Gaussians");
  check_input(means2d, "means2d", at::kFloat, N, 2);
  check_input(conics, "conics", at::kFloat, N, 3);
  check_input(features, "features", at::kFloat, N, -1);
  check_input(opacities, "opacities", at::kFloat, N, 0);
  check_input(depths, "depths", at::kFloat, N, 0);
  check_input(radii, "radii", at::kInt, N, 2);
  const int C = static_cast<int>(features.size(1));
  const Geometry geo = stag4d::make_geometry(static_cast<int>(width), static_cast<int>(height),
                                             static_cast<int>(tile_size));
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const auto i32 = at::TensorOptions().dtype(at::kInt);

  at::Tensor image = at::empty({height, width, C}, f32);
  at::Tensor alpha = at::empty({height, width}, f32);
  at::Tensor Tfin = at::empty({height, width}, f32);
  at::Tensor last = at::empty({height, width}, i32);
  at::Tensor offsets = at::zeros({geo.n_tiles + 1}, i32);

  std::vector<int32_t> ids_vec;
  try {
    ids_vec = stag4d::bin_gaussians(means2d.data_ptr<float>(), depths.data_ptr<float>(), radii.data_ptr<int32_t>(),
                                    N, geo, offsets.data_ptr<int32_t>());
  } catch (const std::length_error& e) {
    TORCH_CHECK(false, "composite_cpp: ", e.what());
  }
  at::Tensor tile_ids = at::empty({static_cast<int64_t>(ids_vec.size())}, i32);
  if (!ids_vec.empty()) std::copy(ids_vec.begin(), ids_vec.end(), tile_ids.data_ptr<int32_t>());
  ids_vec = std::vector<int32_t>();

  if (geo.n_tiles > 0) {
    const GaussianView gv{means2d.data_ptr<float>(), conics.data_ptr<float>(), features.data_ptr<float>(),
                          opacities.data_ptr<float>(), radii.data_ptr<int32_t>(), C};
    const int slots = thread_slots(geo.n_tiles);
    const stag4d::Isa isa = stag4d::select_isa();
    SlotScratch<float> scratch(stag4d::forward_scratch_floats(geo, C), slots);
    SlotScratch<int32_t> last_scratch(geo.npix_pad, slots);
    const int32_t* off = offsets.data_ptr<int32_t>();
    const int32_t* ids = tile_ids.data_ptr<int32_t>();
    float* img = image.data_ptr<float>();
    float* al = alpha.data_ptr<float>();
    float* tf = Tfin.data_ptr<float>();
    int32_t* ls = last.data_ptr<int32_t>();
    for_each_tile(geo.n_tiles, slots, [&](int t, int slot) {
      stag4d::forward_tile(isa, gv, geo, ids + off[t], off[t + 1] - off[t], t, scratch.slot(slot), last_scratch.slot(slot),
                           img, al, tf, ls);
    });
  }
  return {image, alpha, Tfin, last, offsets, tile_ids};
}

// ---------------------------------------------------------------------------------------------------- backward
// Returns grad_means2d [N,2], grad_conics [N,3], grad_features [N,C], grad_opacities [N].
std::vector<at::Tensor> composite_backward(at::Tensor means2d, at::Tensor conics, at::Tensor features,
                                              at::Tensor opacities, at::Tensor radii, at::Tensor Tfin,
                                              at::Tensor last, at::Tensor offsets, at::Tensor tile_ids,
                                              at::Tensor grad_image, at::Tensor grad_alpha, int64_t width,
                                              int64_t height, int64_t tile_size) {
  const int64_t N = means2d.size(0);
  check_input(means2d, "means2d", at::kFloat, N, 2);
  check_input(conics, "conics", at::kFloat, N, 3);
  check_input(features, "features", at::kFloat, N, -1);
  check_input(opacities, "opacities", at::kFloat, N, 0);
  check_input(radii, "radii", at::kInt, N, 2);
  const int C = static_cast<int>(features.size(1));
  const Geometry geo = stag4d::make_geometry(static_cast<int>(width), static_cast<int>(height),
                                             static_cast<int>(tile_size));
  TORCH_CHECK(grad_image.device().is_cpu() && grad_image.scalar_type() == at::kFloat && grad_image.is_contiguous() &&
                  grad_image.dim() == 3 && grad_image.size(0) == height && grad_image.size(1) == width &&
                  grad_image.size(2) == C,
              "composite_cpp backward: grad_image must be a contiguous float32 CPU tensor [H, W, C]");
  TORCH_CHECK(grad_alpha.device().is_cpu() && grad_alpha.scalar_type() == at::kFloat && grad_alpha.is_contiguous() &&
                  grad_alpha.dim() == 2 && grad_alpha.size(0) == height && grad_alpha.size(1) == width,
              "composite_cpp backward: grad_alpha must be a contiguous float32 CPU tensor [H, W]");
  TORCH_CHECK(offsets.numel() == geo.n_tiles + 1 && Tfin.numel() == height * width && last.numel() == height * width,
              "composite_cpp backward: saved forward state does not match the image");

  const int G = 6 + C;
  const int slots = thread_slots(geo.n_tiles);
  const int64_t M = tile_ids.numel();
  const GradMode mode = choose_grad_mode(M, N, G, slots);
  const size_t per_slot = static_cast<size_t>(N) * G;
  // pairs: [M, G]; threads: [slots, N, G]; atomics: [N, G]
  const size_t buf_size = mode == GradMode::kPairs     ? static_cast<size_t>(M) * G
                          : mode == GradMode::kThreads ? per_slot * slots
                                                       : per_slot;
  std::vector<float> work(buf_size, 0.0f);

  const int32_t* off = offsets.data_ptr<int32_t>();
  const int32_t* ids = tile_ids.data_ptr<int32_t>();
  if (geo.n_tiles > 0 && N > 0) {
    const GaussianView gv{means2d.data_ptr<float>(), conics.data_ptr<float>(), features.data_ptr<float>(),
                          opacities.data_ptr<float>(), radii.data_ptr<int32_t>(), C};
    const stag4d::Isa isa = stag4d::select_isa();
    SlotScratch<float> scratch(stag4d::backward_scratch_floats(geo, C), slots);
    SlotScratch<int32_t> last_scratch(geo.npix_pad, slots);
    const float* tf = Tfin.data_ptr<float>();
    const int32_t* ls = last.data_ptr<int32_t>();
    const float* gi = grad_image.data_ptr<float>();
    const float* ga = grad_alpha.data_ptr<float>();
    for_each_tile(geo.n_tiles, slots, [&](int t, int slot) {
      if (off[t + 1] == off[t]) return;
      float* out = mode == GradMode::kPairs     ? work.data() + static_cast<size_t>(off[t]) * G
                   : mode == GradMode::kThreads ? work.data() + per_slot * slot
                                                : work.data();
      stag4d::backward_tile(isa, gv, geo, ids + off[t], t, tf, ls, gi, ga, scratch.slot(slot), last_scratch.slot(slot),
                            out, mode == GradMode::kPairs, mode == GradMode::kAtomics && slots > 1);
    });
  }

  // reduce to [N, G] in a fixed order
  std::vector<float> pair_sum;
  const float* gsrc = work.data();
  int n_buf = 1;
  if (mode == GradMode::kPairs) {
    pair_sum.assign(per_slot, 0.0f);
    for (int64_t p = 0; p < M; ++p) {
      float* dst = pair_sum.data() + static_cast<size_t>(ids[p]) * G;
      const float* src = work.data() + static_cast<size_t>(p) * G;
      for (int j = 0; j < G; ++j) dst[j] += src[j];
    }
    gsrc = pair_sum.data();
  } else if (mode == GradMode::kThreads) {
    n_buf = slots;
  }

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor gm = at::empty({N, 2}, f32);
  at::Tensor gc = at::empty({N, 3}, f32);
  at::Tensor gf = at::empty({N, C}, f32);
  at::Tensor go = at::empty({N}, f32);
  float* pm = gm.data_ptr<float>();
  float* pc = gc.data_ptr<float>();
  float* pf = gf.data_ptr<float>();
  float* po = go.data_ptr<float>();
  at::parallel_for(0, N, int64_t(1) << 17, [&](int64_t b, int64_t e) {  // cheap: one thread unless N is huge
    std::vector<float> acc(G);
    for (int64_t i = b; i < e; ++i) {
      for (int j = 0; j < G; ++j) acc[j] = gsrc[static_cast<size_t>(i) * G + j];
      for (int s = 1; s < n_buf; ++s)
        for (int j = 0; j < G; ++j) acc[j] += gsrc[per_slot * s + static_cast<size_t>(i) * G + j];
      pm[2 * i] = acc[0];
      pm[2 * i + 1] = acc[1];
      pc[3 * i] = acc[2];
      pc[3 * i + 1] = acc[3];
      pc[3 * i + 2] = acc[4];
      po[i] = acc[5];
      for (int c = 0; c < C; ++c) pf[static_cast<size_t>(i) * C + c] = acc[6 + c];
    }
  });
  return {gm, gc, gf, go};
}

// exp(-s) as the kernel computes it (for tests)
at::Tensor exp_neg_tensor(at::Tensor s) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.device().is_cpu(), "float32 CPU tensor expected");
  s = s.contiguous();
  at::Tensor out = at::empty(s.sizes(), s.options());
  const float* a = s.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < s.numel(); ++i) o[i] = stag4d::exp_neg_scalar(a[i]);
  return out;
}

std::string build_info() {
  return std::string("simd=") + stag4d::isa_name(stag4d::select_isa()) +
         " threads=" + std::to_string(at::get_num_threads());
}

TORCH_LIBRARY(stag4d_composite, m) {
  m.def("forward(Tensor means2d, Tensor conics, Tensor features, Tensor opacities, Tensor depths, Tensor radii, "
        "int width, int height, int tile_size) -> Tensor[]",
        &composite_forward);
  m.def("backward(Tensor means2d, Tensor conics, Tensor features, Tensor opacities, Tensor radii, Tensor T_final, "
        "Tensor last, Tensor offsets, Tensor tile_ids, Tensor grad_image, Tensor grad_alpha, int width, int height, "
        "int tile_size) -> Tensor[]",
        &composite_backward);
  m.def("exp_neg(Tensor s) -> Tensor", &exp_neg_tensor);
  m.def("build_info() -> str", &build_info);
}
