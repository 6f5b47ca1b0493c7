// EWA projection of 3D Gaussians on the CPU: forward and hand-written backward, registered as torch operators
// torch.ops.stag4d_projection.{forward, backward} (the Python side is projection_cpp.py). It is linked into the
// same shared library as the compositor (composite.cpp, kernel.cpp); see docs/cpu_kernel.md.
//
// Semantics: exactly stag4d_backend/render/projection.py::project_gaussians (gsplat 1.5 fully_fused_projection,
// pinhole, classic, opacity-aware radii), one camera:
//   p = R_v mean + t_v;  valid iff near <= z <= far (else z is replaced by 1 and the outputs are zeroed)
//   Sigma = M M^T, M = R(q/|q|) diag(s);  Sigma_c = R_v Sigma R_v^T
//   tx = z clamp(x/z, -lim_x_neg, lim_x_pos) (same for y);  J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]
//   cov2d = J Sigma_c J^T + eps2d I;  valid iff det > 0;  conic = cov2d^-1;  mean2d = (fx x/z + cx, fy y/z + cy)
//   valid iff opacity >= 1/255;  extend = min(3.33, sqrt(2 ln(opacity / (1/255))));
//   radius = ceil(extend sqrt(cov2d_diag));  culled if both radii <= 0, if the box misses the image, or if a
//   radius is not finite.
// Culled Gaussians get radii (0, 0) and zero means2d / conics / depths, and no gradient; cov2d is returned for
// every Gaussian (computed with z = 1 for the depth-culled ones), like project_gaussians.
//
// Arithmetic: the dtype of the inputs (float32 in rasterize; float64 runs too, for the tests), each expression
// evaluated in the order PyTorch evaluates the corresponding tensor expression of projection.py (Python scalars
// such as near, eps2d, fx and the clamp limits rounded to the tensor dtype first, as PyTorch does; the 3x3
// products summed left to right like ATen's small batched matmul), no FMA contraction (-ffp-contract=off). On the
// development machine (torch 2.13, MKL) the float32 and float64 outputs are bit-identical to project_gaussians';
// where another BLAS sums means @ R^T differently the last bits may differ (the tests allow 1e-5, radii equal).
//
// Backward: the chain rule of every step above written out (no symmetry assumed, like autograd), recomputing
// the forward intermediates from the inputs (nothing but the radii is saved). Gradients go to means, quats and
// scales; viewmat and K are constants (rasterize uses the PyTorch projection when they require grad).
//
// Work layout: the per-Gaussian arithmetic (projection_impl.inc) is written once as templates over the value
// type. float32 runs it on L Gaussians at a time with GCC vector types, compiled per SIMD level like the
// compositor (AVX-512 16 lanes, AVX2 8, SSE2 4; chosen by stag4d::select_isa(), so $STAG4D_KERNEL_ISA applies
// here too, plus "scalar" for one Gaussian at a time); all paths give the same bits. The culling / radius tail
// (logf, ceil) is scalar per Gaussian. Ranges of Gaussians go to torch's intra-op threads (at::parallel_for);
// Gaussians are independent, so the results do not depend on the thread count.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernel.h"  // stag4d::select_isa (the SIMD level, shared with the compositor)

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
namespace projdetail {

template <typename T>
struct Camera {
  T W[9], t[3];                // world -> camera rotation (row major) and translation
  T fx, fy, cx, cy, nfx, nfy;  // nfx = -fx, as PyTorch rounds the Python scalar -fx
  T lxp, lxn, lyp, lyn;        // clamp limits of x/z and y/z (lxn, lyn > 0: the lower limits are -lxn, -lyn)
  T near_, far_, eps2d, width, height, thr;
};

template <typename T>
Camera<T> make_camera(const at::Tensor& viewmat, double fx, double fy, double cx, double cy, int64_t width,
                      int64_t height, double near_, double far_, double eps2d) {
  Camera<T> c;
  const at::Tensor v = viewmat.contiguous();
  const T* vm = v.data_ptr<T>();
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) c.W[3 * i + j] = vm[4 * i + j];
    c.t[i] = vm[4 * i + 3];
  }
  c.fx = static_cast<T>(fx);
  c.fy = static_cast<T>(fy);
  c.cx = static_cast<T>(cx);
  c.cy = static_cast<T>(cy);
  c.nfx = static_cast<T>(-fx);
  c.nfy = static_cast<T>(-fy);
  // in double, as projection.py computes them with Python floats
  const double w = static_cast<double>(width), h = static_cast<double>(height);
  const double tan_fovx = 0.5 * w / fx, tan_fovy = 0.5 * h / fy;
  c.lxp = static_cast<T>((w - cx) / fx + 0.3 * tan_fovx);
  c.lxn = static_cast<T>(cx / fx + 0.3 * tan_fovx);
  c.lyp = static_cast<T>((h - cy) / fy + 0.3 * tan_fovy);
  c.lyn = static_cast<T>(cy / fy + 0.3 * tan_fovy);
  c.near_ = static_cast<T>(near_);
  c.far_ = static_cast<T>(far_);
  c.eps2d = static_cast<T>(eps2d);
  c.width = static_cast<T>(width);
  c.height = static_cast<T>(height);
  c.thr = static_cast<T>(1.0 / 255.0);
  return c;
}

// float -> int32 as PyTorch's .to(torch.int32) does on x86 for out-of-range values (INT_MIN)
template <typename T>
inline int32_t to_i32(T r) {
  if (!(r < T(2147483648.0) && r >= T(-2147483648.0))) return std::numeric_limits<int32_t>::min();
  return static_cast<int32_t>(r);
}

// Culling, radii and the outputs of Gaussian i, from its cov2d, det, mean2d and camera z (scalar: logf, ceil).
template <typename T>
inline void finish_forward(const Camera<T>& c, int64_t i, T op, T cxx, T cxy, T cyy, T det, T mx, T my, T z,
                           bool depth_ok, T* out_m2, T* out_con, T* out_depth, int32_t* out_radii, T* out_cov) {
  out_cov[3 * i] = cxx;
  out_cov[3 * i + 1] = cxy;
  out_cov[3 * i + 2] = cyy;
  bool valid = depth_ok && (det > T(0)) && (op >= c.thr);
  // extend = sqrt(2 log(max(op, thr) / thr)).clamp_max(3.33); clamps keep NaN, as torch's do
  const T opc = std::isnan(op) ? op : (op < c.thr ? c.thr : op);
  T extend = std::sqrt(T(2) * std::log(opc / c.thr));
  if (extend > T(3.33)) extend = T(3.33);
  const T sxx = std::isnan(cxx) ? cxx : (cxx < T(0) ? T(0) : cxx);
  const T syy = std::isnan(cyy) ? cyy : (cyy < T(0) ? T(0) : cyy);
  const T rx = std::ceil(extend * std::sqrt(sxx));
  const T ry = std::ceil(extend * std::sqrt(syy));
  valid = valid && !((rx <= T(0)) && (ry <= T(0)));
  valid = valid && !((mx + rx <= T(0)) || (mx - rx >= c.width) || (my + ry <= T(0)) || (my - ry >= c.height));
  valid = valid && std::isfinite(rx) && std::isfinite(ry);
  if (valid) {
    const T inv_det = T(1) / det;
    out_m2[2 * i] = mx;
    out_m2[2 * i + 1] = my;
    out_con[3 * i] = cyy * inv_det;
    out_con[3 * i + 1] = (-cxy) * inv_det;
    out_con[3 * i + 2] = cxx * inv_det;
    out_depth[i] = z;
    out_radii[2 * i] = to_i32(rx);
    out_radii[2 * i + 1] = to_i32(ry);
  } else {
    out_m2[2 * i] = out_m2[2 * i + 1] = T(0);
    out_con[3 * i] = out_con[3 * i + 1] = out_con[3 * i + 2] = T(0);
    out_depth[i] = T(0);
    out_radii[2 * i] = out_radii[2 * i + 1] = 0;
  }
}

}  // namespace projdetail
}  // namespace stag4d

// ------------------------------------------------------------------------------------ per-SIMD-level copies
#define STAG4D_IMPL_FILE "projection_impl.inc"
#include "simd_instances.inc"

namespace {

using stag4d::projdetail::Camera;
using stag4d::projdetail::make_camera;

// Gaussians per task: ~0.2 ms of SIMD work; smaller scenes run on the calling thread (a fork-join costs more than it
// saves there, and much more when other processes keep the cores busy: docs/cpu_kernel.md, Threading)
constexpr int64_t kGrain = 8192;

// Which float32 code runs: the SIMD level of the compositor (stag4d::select_isa, $STAG4D_KERNEL_ISA =
// avx2 | base forces a lower one), or one Gaussian at a time with $STAG4D_KERNEL_ISA=scalar (tests: all give
// the same bits).
enum class Path { kScalar, kBase, kAvx2, kAvx512 };

Path select_path() {
  const char* env = std::getenv("STAG4D_KERNEL_ISA");
  if (env != nullptr && std::string(env) == "scalar") return Path::kScalar;
  switch (stag4d::select_isa()) {
    case stag4d::Isa::kAvx512:
      return Path::kAvx512;
    case stag4d::Isa::kAvx2:
      return Path::kAvx2;
    default:
      return Path::kBase;
  }
}

void forward_f32(const Camera<float>& c, int64_t N, const float* means, const float* quats, const float* scales,
                 const float* opac, float* m2, float* con, float* depth, int32_t* radii, float* cov) {
  const Path path = select_path();
  at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
    switch (path) {
#if STAG4D_X86_DISPATCH
      case Path::kAvx512:
        return stag4d::v4::proj::forward_range(c, b, e, means, quats, scales, opac, m2, con, depth, radii, cov);
      case Path::kAvx2:
        return stag4d::v3::proj::forward_range(c, b, e, means, quats, scales, opac, m2, con, depth, radii, cov);
#endif
      case Path::kScalar:
        return stag4d::base::proj::forward_range_scalar<float>(c, b, e, means, quats, scales, opac, m2, con, depth,
                                                               radii, cov);
      default:
        return stag4d::base::proj::forward_range(c, b, e, means, quats, scales, opac, m2, con, depth, radii, cov);
    }
  });
}

void backward_f32(const Camera<float>& c, int64_t N, const float* means, const float* quats, const float* scales,
                  const int32_t* radii, const float* gm2, const float* gcon, const float* gd, float* gm, float* gq,
                  float* gs) {
  const Path path = select_path();
  at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
    switch (path) {
#if STAG4D_X86_DISPATCH
      case Path::kAvx512:
        return stag4d::v4::proj::backward_range(c, b, e, means, quats, scales, radii, gm2, gcon, gd, gm, gq, gs);
      case Path::kAvx2:
        return stag4d::v3::proj::backward_range(c, b, e, means, quats, scales, radii, gm2, gcon, gd, gm, gq, gs);
#endif
      case Path::kScalar:
        return stag4d::base::proj::backward_range_scalar<float>(c, b, e, means, quats, scales, radii, gm2, gcon, gd,
                                                                gm, gq, gs);
      default:
        return stag4d::base::proj::backward_range(c, b, e, means, quats, scales, radii, gm2, gcon, gd, gm, gq, gs);
    }
  });
}

void check(const at::Tensor& t, const char* name, at::ScalarType dt, int64_t n, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), "stag4d_projection: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dt, "stag4d_projection: ", name, " must be ", dt, " (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.is_contiguous(), "stag4d_projection: ", name, " must be contiguous");
  if (cols == 0) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "stag4d_projection: ", name, " must have shape [", n, "] (got ",
                t.sizes(), ")");
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == cols, "stag4d_projection: ", name,
                " must have shape [", n, ", ", cols, "] (got ", t.sizes(), ")");
  }
}

void check_camera(const at::Tensor& viewmat, at::ScalarType dt, int64_t width, int64_t height) {
  TORCH_CHECK(viewmat.device().is_cpu() && viewmat.scalar_type() == dt && viewmat.dim() == 2 &&
                  viewmat.size(0) == 4 && viewmat.size(1) == 4,
              "stag4d_projection: viewmat must be a [4, 4] CPU tensor of the inputs' dtype");
  TORCH_CHECK(width >= 0 && height >= 0, "stag4d_projection: bad image size ", width, "x", height);
}

}  // namespace

// Returns means2d [N,2], conics [N,3], depths [N], radii [N,2] int32, cov2d [N,3] (float32 or float64 like means).
std::vector<at::Tensor> projection_forward(at::Tensor means, at::Tensor quats, at::Tensor scales, at::Tensor opacities,
                                           at::Tensor viewmat, double fx, double fy, double cx, double cy,
                                           int64_t width, int64_t height, double near_, double far_, double eps2d) {
  TORCH_CHECK(means.dim() == 2, "stag4d_projection: means must have shape [N, 3]");
  const int64_t N = means.size(0);
  const at::ScalarType dt = means.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "stag4d_projection: float32 or float64 inputs expected");
  check(means, "means", dt, N, 3);
  check(quats, "quats", dt, N, 4);
  check(scales, "scales", dt, N, 3);
  check(opacities, "opacities", dt, N, 0);
  check_camera(viewmat, dt, width, height);
  const auto opt = at::TensorOptions().dtype(dt);
  at::Tensor m2 = at::empty({N, 2}, opt), con = at::empty({N, 3}, opt), depth = at::empty({N}, opt),
             cov = at::empty({N, 3}, opt);
  at::Tensor radii = at::empty({N, 2}, at::TensorOptions().dtype(at::kInt));
  if (dt == at::kFloat) {
    const auto cam = make_camera<float>(viewmat, fx, fy, cx, cy, width, height, near_, far_, eps2d);
    forward_f32(cam, N, means.data_ptr<float>(), quats.data_ptr<float>(), scales.data_ptr<float>(),
                opacities.data_ptr<float>(), m2.data_ptr<float>(), con.data_ptr<float>(), depth.data_ptr<float>(),
                radii.data_ptr<int32_t>(), cov.data_ptr<float>());
  } else {  // float64: one Gaussian at a time (tests)
    const auto cam = make_camera<double>(viewmat, fx, fy, cx, cy, width, height, near_, far_, eps2d);
    at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
      stag4d::base::proj::forward_range_scalar<double>(
          cam, b, e, means.data_ptr<double>(), quats.data_ptr<double>(), scales.data_ptr<double>(),
          opacities.data_ptr<double>(), m2.data_ptr<double>(), con.data_ptr<double>(), depth.data_ptr<double>(),
          radii.data_ptr<int32_t>(), cov.data_ptr<double>());
    });
  }
  return {m2, con, depth, radii, cov};
}

// Returns grad_means [N,3], grad_quats [N,4], grad_scales [N,3]. The output gradients may be undefined (None):
// they count as zero.
std::vector<at::Tensor> projection_backward(at::Tensor means, at::Tensor quats, at::Tensor scales, at::Tensor viewmat,
                                            at::Tensor radii, double fx, double fy, double cx, double cy,
                                            int64_t width, int64_t height, double eps2d,
                                            c10::optional<at::Tensor> grad_means2d,
                                            c10::optional<at::Tensor> grad_conics,
                                            c10::optional<at::Tensor> grad_depths) {
  const int64_t N = means.size(0);
  const at::ScalarType dt = means.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "stag4d_projection: float32 or float64 inputs expected");
  check(means, "means", dt, N, 3);
  check(quats, "quats", dt, N, 4);
  check(scales, "scales", dt, N, 3);
  check(radii, "radii", at::kInt, N, 2);
  check_camera(viewmat, dt, width, height);
  const bool has_m2 = grad_means2d.has_value() && grad_means2d->defined();
  const bool has_con = grad_conics.has_value() && grad_conics->defined();
  const bool has_d = grad_depths.has_value() && grad_depths->defined();
  if (has_m2) check(*grad_means2d, "grad_means2d", dt, N, 2);
  if (has_con) check(*grad_conics, "grad_conics", dt, N, 3);
  if (has_d) check(*grad_depths, "grad_depths", dt, N, 0);
  // only drawn Gaussians (radii != 0) are differentiated, and those passed the depth test: no depth culling here
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const auto opt = at::TensorOptions().dtype(dt);
  at::Tensor gm = at::empty({N, 3}, opt), gq = at::empty({N, 4}, opt), gs = at::empty({N, 3}, opt);
  if (dt == at::kFloat) {
    const auto cam = make_camera<float>(viewmat, fx, fy, cx, cy, width, height, -kInf, kInf, eps2d);
    backward_f32(cam, N, means.data_ptr<float>(), quats.data_ptr<float>(), scales.data_ptr<float>(),
                 radii.data_ptr<int32_t>(), has_m2 ? grad_means2d->data_ptr<float>() : nullptr,
                 has_con ? grad_conics->data_ptr<float>() : nullptr, has_d ? grad_depths->data_ptr<float>() : nullptr,
                 gm.data_ptr<float>(), gq.data_ptr<float>(), gs.data_ptr<float>());
  } else {
    const auto cam = make_camera<double>(viewmat, fx, fy, cx, cy, width, height, -kInf, kInf, eps2d);
    at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
      stag4d::base::proj::backward_range_scalar<double>(
          cam, b, e, means.data_ptr<double>(), quats.data_ptr<double>(), scales.data_ptr<double>(),
          radii.data_ptr<int32_t>(), has_m2 ? grad_means2d->data_ptr<double>() : nullptr,
          has_con ? grad_conics->data_ptr<double>() : nullptr, has_d ? grad_depths->data_ptr<double>() : nullptr,
          gm.data_ptr<double>(), gq.data_ptr<double>(), gs.data_ptr<double>());
    });
  }
  return {gm, gq, gs};
}

TORCH_LIBRARY(stag4d_projection, m) {
  m.def("forward(Tensor means, Tensor quats, Tensor scales, Tensor opacities, Tensor viewmat, float fx, float fy, "
        "float cx, float cy, int width, int height, float near, float far, float eps2d) -> Tensor[]",
        &projection_forward);
  m.def("backward(Tensor means, Tensor quats, Tensor scales, Tensor viewmat, Tensor radii, float fx, float fy, "
        "float cx, float cy, int width, int height, float eps2d, Tensor? grad_means2d, Tensor? grad_conics, "
        "Tensor? grad_depths) -> Tensor[]",
        &projection_backward);
}
