// Torch-free core of the STAG4D CPU compositing kernel (see composite.cpp for the contract and the design).
// Kept free of torch headers: it compiles in about a second, and it can be built and timed on its own
// (docs/cpu_kernel.md, "Working on the kernel").
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace stag4d {

constexpr float kAlphaMin = 1.0f / 255.0f;  // == float(1/255), what PyTorch compares against
constexpr float kAlphaMax = 0.999f;
constexpr float kTMin = 1e-4f;

// SIMD level of the per-tile code (all levels give bit-identical results).
enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
Isa cpu_isa();                // the best level this CPU (and build) supports
Isa select_isa();             // cpu_isa(), or a lower level forced by $STAG4D_KERNEL_ISA = avx2 | base
const char* isa_name(Isa isa);

struct Geometry {
  int width, height, ts, tiles_x, tiles_y, n_tiles, npix, npix_pad;
};
Geometry make_geometry(int width, int height, int tile_size);

struct GaussianView {
  const float* means;    // [N,2]
  const float* conics;   // [N,3]
  const float* feats;    // [N,C]
  const float* opac;     // [N]
  const int32_t* radii;  // [N,2]
  int C;
};

// Per-tile lists of drawn Gaussians, each front to back (ascending depth, ties by index).
// offsets: [n_tiles + 1]; returns the concatenated lists.
std::vector<int32_t> bin_gaussians(const float* means, const float* depths, const int32_t* radii, int64_t n,
                                   const Geometry& geo, int32_t* offsets);

// Forward of one tile. scratch: forward_scratch_floats() floats; last_scratch: npix_pad ints; both 64-byte
// aligned.
// Writes the tile's pixels of image [H,W,C], alpha, T_final [H,W] and last [H,W] (index in the tile list of the
// last Gaussian added, -1 if none).
size_t forward_scratch_floats(const Geometry& geo, int C);
void forward_tile(Isa isa, const GaussianView& gv, const Geometry& geo, const int32_t* ids, int count, int tile,
                  float* scratch, int32_t* last_scratch, float* out_img, float* out_alpha, float* out_T,
                  int32_t* out_last);

// Backward of one tile. Gradient rows are (mx, my, a, b, c, opacity, features[C]) = 6 + C floats.
// per_pair: row k of `out` (the tile's slice of a [pairs, 6 + C] array) gets the contribution of the tile's k-th
// Gaussian; else row g of `out` ([N, 6 + C]) is accumulated, atomically when use_atomics.
size_t backward_scratch_floats(const Geometry& geo, int C);
void backward_tile(Isa isa, const GaussianView& gv, const Geometry& geo, const int32_t* ids, int tile, const float* T_final,
                   const int32_t* last, const float* grad_img, const float* grad_alpha, float* scratch,
                   int32_t* last_scratch, float* out, bool per_pair, bool use_atomics);

float exp_neg_scalar(float s);  // the kernel's exp(-s), for tests

}  // namespace stag4d
