// Fused element-wise kernels for training BERT-family encoders on CPU (strop/training/fused_layer.py).
//
// Dropout masks come from a counter-based hash of the element's flat index and two 32-bit seeds (murmur3's
// finaliser, twice), so the backward pass recomputes them instead of storing them, and drawing one costs a few
// vector instructions instead of a Mersenne-Twister step. keep = hash(i) >= threshold, threshold = p * 2^32.
// Everything is computed in fp32; inputs and outputs may be fp32 or bf16 (the matmuls' dtype under autocast).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

inline uint32_t mask_hash(uint32_t i, uint32_t s0, uint32_t s1) { return fmix32(fmix32(i * 0x9E3779B1u + s0) ^ s1); }

struct Drop {
  uint32_t s0, s1, threshold;
  float scale;
  bool on;
  Drop(int64_t seed0, int64_t seed1, double p)
      : s0(static_cast<uint32_t>(seed0)), s1(static_cast<uint32_t>(seed1)),
        threshold(static_cast<uint32_t>(std::min(std::llround(p * 4294967296.0), 4294967295LL))),
        scale(p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.f), on(p > 0.0) {}
  // the factor element i is multiplied by: 0 (dropped) or 1 / (1 - p)
  inline float factor(uint32_t i) const { return mask_hash(i, s0, s1) >= threshold ? scale : 0.f; }
};

// exp for x <= 0 (softmax after subtracting the row max) in plain arithmetic, so loops over it vectorise: Cephes'
// expf polynomial after reducing by ln 2 (relative error about 2e-7; below -87 it returns 0, like float's exp).
inline float exp_nonpositive(float x) {
  const bool tiny = x < -87.3f;
  x = std::max(x, -87.3f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float e = q * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.f : e * scale;
}

constexpr int64_t kWidth = 16;  // one AVX-512 register of floats: rows are padded to it, so no loop has a scalar tail

inline int64_t padded(int64_t n) { return (n + kWidth - 1) / kWidth * kWidth; }

// factor[j] = drop.factor(base + j) for j < padded(K), in whole vectors.
inline void dropout_factors(const Drop drop, uint32_t base, float* __restrict__ factor, int64_t Kp) {
  for (int64_t c = 0; c < Kp; c += kWidth) {
    _Pragma("omp simd")
    for (int64_t j = 0; j < kWidth; ++j) factor[c + j] = drop.factor(base + static_cast<uint32_t>(c + j));
  }
}

// Sums in an order fixed by n alone (16 lane sums over whole chunks, then the lanes, then the tail), so a result
// never depends on how a compiler peeled a loop for a buffer's alignment: the same inputs give the same bits, which
// a resumed run needs to equal the straight one. f(j) is the j-th term.
template <typename F>
inline float ordered_sum(int64_t n, F f) {
  float acc[kWidth] = {0.f};
  const int64_t whole = n / kWidth * kWidth;
  for (int64_t c = 0; c < whole; c += kWidth) {
    for (int64_t j = 0; j < kWidth; ++j) acc[j] += f(c + j);
  }
  float total = 0.f;
  for (int64_t j = 0; j < kWidth; ++j) total += acc[j];
  for (int64_t j = whole; j < n; ++j) total += f(j);
  return total;
}

// bf16 <-> fp32 as c10::BFloat16 converts (the high half; round to nearest even, NaN -> 0x7FC0), in plain integer
// arithmetic on the bits so loops over them vectorise (c10's constructor does not, here)
inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T> inline T from_f(float v);
template <> inline float from_f<float>(float v) { return v; }
template <> inline c10::BFloat16 from_f<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

// Per-thread scratch rows, 64-byte aligned like torch's own buffers: the vectoriser peels a loop differently for a
// differently aligned buffer, which would change the order of a reduction's sum (and its last bit) from run to run.
template <typename U>
class Buffer {
 public:
  explicit Buffer(int64_t n, U fill = U())
      : p_(static_cast<U*>(std::aligned_alloc(64, ((n * sizeof(U) + 63) / 64) * 64))) {
    TORCH_CHECK(p_ != nullptr, "out of memory");
    std::fill(p_, p_ + n, fill);
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  U* data() { return p_; }

 private:
  U* p_;
};
using Scratch = Buffer<float>;

#define STROP_DISPATCH(dtype, ...)                                               \
  if ((dtype) == torch::kFloat32) {                                              \
    using scalar_t = float;                                                      \
    __VA_ARGS__();                                                               \
  } else if ((dtype) == torch::kBFloat16) {                                      \
    using scalar_t = c10::BFloat16;                                              \
    __VA_ARGS__();                                                               \
  } else {                                                                       \
    TORCH_CHECK(false, "strop fused kernels take float32 or bfloat16, not ", dtype); \
  }

// ---------------------------------------------------------------------------------------------------------------
// out = LayerNorm(dropout(x) + residual) * w + b, rows of length H. Returns out (fp32), out in x's dtype (for the
// next matmul; empty when x is fp32), y = dropout(x) + residual (fp32, kept for backward), mean and rstd per row.
std::vector<torch::Tensor> dropout_add_norm_fwd(torch::Tensor x, torch::Tensor residual, torch::Tensor w,
                                                torch::Tensor b, int64_t seed0, int64_t seed1, double p, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(residual.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32 &&
                  b.scalar_type() == torch::kFloat32, "residual, weight and bias must be float32");
  const int64_t H = x.size(-1), N = x.numel() / H;
  auto out = torch::empty(x.sizes(), residual.options());
  auto y = torch::empty(x.sizes(), residual.options());
  auto mean = torch::empty({N}, residual.options());
  auto rstd = torch::empty({N}, residual.options());
  const bool low = x.scalar_type() != torch::kFloat32;
  auto out_low = low ? torch::empty(x.sizes(), x.options()) : torch::Tensor();
  const Drop drop_(seed0, seed1, p);
  const float* __restrict__ r = residual.data_ptr<float>();
  const float* __restrict__ wp = w.contiguous().data_ptr<float>();
  const float* __restrict__ bp = b.contiguous().data_ptr<float>();
  float* __restrict__ o = out.data_ptr<float>();
  float* __restrict__ yp = y.data_ptr<float>();
  float* __restrict__ mp = mean.data_ptr<float>();
  float* __restrict__ sp = rstd.data_ptr<float>();
  STROP_DISPATCH(x.scalar_type(), [&] {
    const scalar_t* __restrict__ xp = x.data_ptr<scalar_t>();
    scalar_t* __restrict__ lp = low ? out_low.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      const Drop drop = drop_;
      Scratch factor_buf(padded(H), 1.f);
      float* __restrict__ f = factor_buf.data();  // stays 1 without dropout
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * H;
        float* __restrict__ yr = yp + base;
        if (drop.on) dropout_factors(drop, static_cast<uint32_t>(base), f, padded(H));
        for (int64_t j = 0; j < H; ++j) yr[j] = to_f(xp[base + j]) * f[j] + r[base + j];
        const float mu = ordered_sum(H, [&](int64_t j) { return yr[j]; }) / H;
        const float var = ordered_sum(H, [&](int64_t j) { return (yr[j] - mu) * (yr[j] - mu); });
        const float rs = 1.f / std::sqrt(var / H + static_cast<float>(eps));
        mp[row] = mu;
        sp[row] = rs;
        float* __restrict__ orow = o + base;
        for (int64_t j = 0; j < H; ++j) orow[j] = (yr[j] - mu) * rs * wp[j] + bp[j];
        if (low) {
          for (int64_t j = 0; j < H; ++j) lp[base + j] = from_f<scalar_t>(orow[j]);
        }
      }
    });
  });
  return {out, out_low, y, mean, rstd};
}

// Gradients of dropout_add_norm_fwd: g = d(out) + d(out in x's dtype) (either may be empty). Returns dx (x's dtype),
// d(residual) (fp32), dw, db.
std::vector<torch::Tensor> dropout_add_norm_bwd(std::optional<torch::Tensor> g_opt,
                                                std::optional<torch::Tensor> g_low_opt, torch::Tensor y,
                                                torch::Tensor mean, torch::Tensor rstd, torch::Tensor w,
                                                int64_t seed0, int64_t seed1, double p, c10::ScalarType x_dtype) {
  check_rows(y, "y");
  const int64_t H = y.size(-1), N = y.numel() / H;
  torch::Tensor g = g_opt.has_value() ? *g_opt : torch::Tensor();
  torch::Tensor g_low = g_low_opt.has_value() ? *g_low_opt : torch::Tensor();
  const bool has_g = g.defined(), has_low = g_low.defined();
  if (has_g) {
    g = g.contiguous();
    TORCH_CHECK(g.scalar_type() == torch::kFloat32, "the gradient of the float32 output must be float32");
  }
  if (has_low) g_low = g_low.contiguous().to(x_dtype);
  auto dres = torch::empty(y.sizes(), y.options());
  auto dx = torch::empty(y.sizes(), y.options().dtype(x_dtype));
  const int threads = at::get_num_threads();
  auto dw_parts = torch::zeros({threads, H}, y.options());
  auto db_parts = torch::zeros({threads, H}, y.options());
  const Drop drop_(seed0, seed1, p);
  const float* __restrict__ yp = y.data_ptr<float>();
  const float* __restrict__ mp = mean.data_ptr<float>();
  const float* __restrict__ sp = rstd.data_ptr<float>();
  const float* __restrict__ wp = w.contiguous().data_ptr<float>();
  const float* __restrict__ gp = has_g ? g.data_ptr<float>() : nullptr;
  float* __restrict__ dr = dres.data_ptr<float>();
  float* __restrict__ dwp = dw_parts.data_ptr<float>();
  float* __restrict__ dbp = db_parts.data_ptr<float>();
  STROP_DISPATCH(x_dtype, [&] {
    const scalar_t* __restrict__ gl = has_low ? g_low.data_ptr<scalar_t>() : nullptr;
    scalar_t* __restrict__ dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      const Drop drop = drop_;
      const int tid = at::get_thread_num();
      float* __restrict__ dw_t = dwp + tid * H;
      float* __restrict__ db_t = dbp + tid * H;
      // every pass below is branch-free over j, so each vectorises (a select inside the loop kept GCC from it)
      Scratch gr_buf(H), xh_buf(H), factor_buf(padded(H), 1.f);
      float* __restrict__ gr = gr_buf.data();
      float* __restrict__ xh = xh_buf.data();
      float* __restrict__ f = factor_buf.data();  // stays 1 without dropout
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * H;
        const float mu = mp[row], rs = sp[row];
        if (has_g && has_low) {
          for (int64_t j = 0; j < H; ++j) gr[j] = gp[base + j] + to_f(gl[base + j]);
        } else if (has_g) {
          for (int64_t j = 0; j < H; ++j) gr[j] = gp[base + j];
        } else if (has_low) {
          for (int64_t j = 0; j < H; ++j) gr[j] = to_f(gl[base + j]);
        } else {
          for (int64_t j = 0; j < H; ++j) gr[j] = 0.f;
        }
        for (int64_t j = 0; j < H; ++j) {
          xh[j] = (yp[base + j] - mu) * rs;
          dw_t[j] += gr[j] * xh[j];
          db_t[j] += gr[j];
        }
        const float sum_gw = ordered_sum(H, [&](int64_t j) { return gr[j] * wp[j]; });
        const float sum_gwx = ordered_sum(H, [&](int64_t j) { return gr[j] * wp[j] * xh[j]; });
        const float a = sum_gw / H, c = sum_gwx / H;
        if (drop.on) dropout_factors(drop, static_cast<uint32_t>(base), f, padded(H));
        for (int64_t j = 0; j < H; ++j) {
          const float dy = rs * (gr[j] * wp[j] - a - xh[j] * c);
          dr[base + j] = dy;
          dxp[base + j] = from_f<scalar_t>(dy * f[j]);
        }
      }
    });
  });
  return {dx, dres, dw_parts.sum(0), db_parts.sum(0)};
}

// Per-thread rows for the attention kernels. Rows (keys) are short and rarely a multiple of 16, so a loop over K
// would run mostly in its scalar tail; instead each row is copied into these padded buffers (memcpy), worked on in
// whole vectors, and copied out.
template <typename T>
struct RowBuffers {
  RowBuffers(int64_t K, int64_t Kp)
      : in(Kp), out(Kp), keep(Kp), v(Kp), factor(Kp, 1.f), prob(Kp), pad(Kp, -std::numeric_limits<float>::infinity()) {
    std::fill(pad.data(), pad.data() + K, 0.f);
  }
  Buffer<T> in, out;
  Buffer<uint8_t> keep;  // the attention mask (1 = attend); 0 in the padding
  Scratch v, factor, prob;  // factor stays 1 without dropout
  Scratch pad;  // 0 for the row's K keys, -inf in the padding (so a fully masked row is uniform over its K keys)
};

// One row of softmax_dropout_fwd: prob = softmax(x * s, masked) (fp32), out = prob * dropout factor. m: the row's
// bool mask, or null (all attend).
template <typename T>
inline void softmax_row(const T* __restrict__ x, const bool* __restrict__ m, float* __restrict__ prob,
                        T* __restrict__ out, int64_t K, float s, const Drop drop, uint32_t base, RowBuffers<T>& rb) {
  const float lowest = std::numeric_limits<float>::lowest();
  const int64_t Kp = padded(K);
  T* __restrict__ xin = rb.in.data();
  uint8_t* __restrict__ keep = rb.keep.data();
  float* __restrict__ v = rb.v.data();
  float* __restrict__ factor = rb.factor.data();
  float* __restrict__ pr = rb.prob.data();
  const float* __restrict__ pad = rb.pad.data();
  T* __restrict__ o = rb.out.data();
  std::memcpy(xin, x, K * sizeof(T));
  if (m != nullptr) std::memcpy(keep, m, K);  // else keep holds 1s (set once per thread)
  for (int64_t c = 0; c < Kp; c += kWidth) {
    _Pragma("omp simd")
    for (int64_t j = 0; j < kWidth; ++j) v[c + j] = (keep[c + j] ? to_f(xin[c + j]) * s : lowest) + pad[c + j];
  }
  float mx = lowest;
  for (int64_t c = 0; c < Kp; c += kWidth) {
    _Pragma("omp simd reduction(max : mx)")
    for (int64_t j = 0; j < kWidth; ++j) mx = std::max(mx, v[c + j]);
  }
  for (int64_t c = 0; c < Kp; c += kWidth) {
    _Pragma("omp simd")
    for (int64_t j = 0; j < kWidth; ++j) v[c + j] = exp_nonpositive(v[c + j] - mx);
  }
  const float sum = ordered_sum(Kp, [&](int64_t j) { return v[j]; });
  const float inv = 1.f / sum;
  if (drop.on) dropout_factors(drop, base, factor, Kp);
  for (int64_t c = 0; c < Kp; c += kWidth) {
    _Pragma("omp simd")
    for (int64_t j = 0; j < kWidth; ++j) {
      pr[c + j] = v[c + j] * inv;
      o[c + j] = from_f<T>(pr[c + j] * factor[c + j]);
    }
  }
  std::memcpy(prob, pr, K * sizeof(float));
  std::memcpy(out, o, K * sizeof(T));
}

// ---------------------------------------------------------------------------------------------------------------
// probs = dropout(softmax(scores * scaling, masked)) over the last dim. scores: (B, heads, Q, K); mask: bool
// (B, Mq, K) with Mq 1 or Q, True = attend (masked scores become float32's lowest, as transformers' eager path
// does), or empty. Returns the dropped probabilities in scores' dtype and the undropped ones (fp32, for backward).
std::vector<torch::Tensor> softmax_dropout_fwd(torch::Tensor scores, std::optional<torch::Tensor> mask_opt,
                                               int64_t seed0,
                                               int64_t seed1, double scaling, double p) {
  check_rows(scores, "scores");
  TORCH_CHECK(scores.dim() == 4, "scores must be (batch, heads, queries, keys)");
  const int64_t B = scores.size(0), Hd = scores.size(1), Q = scores.size(2), K = scores.size(3);
  torch::Tensor mask = mask_opt.has_value() ? *mask_opt : torch::Tensor();
  const bool has_mask = mask.defined();
  int64_t Mq = 1;
  if (has_mask) {
    mask = mask.contiguous();
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.dim() == 3 && mask.size(0) == B && mask.size(2) == K &&
                    (mask.size(1) == 1 || mask.size(1) == Q), "mask must be bool (batch, 1 or queries, keys)");
    Mq = mask.size(1);
  }
  auto probs = torch::empty(scores.sizes(), scores.options().dtype(torch::kFloat32));
  auto dropped = torch::empty(scores.sizes(), scores.options());
  const Drop drop_(seed0, seed1, p);
  const bool* __restrict__ mk = has_mask ? mask.data_ptr<bool>() : nullptr;
  float* __restrict__ pp = probs.data_ptr<float>();
  const float s = static_cast<float>(scaling);
  STROP_DISPATCH(scores.scalar_type(), [&] {
    const scalar_t* __restrict__ sc = scores.data_ptr<scalar_t>();
    scalar_t* __restrict__ dp = dropped.data_ptr<scalar_t>();
    at::parallel_for(0, B * Hd * Q, 16, [&](int64_t begin, int64_t end) {
      const Drop drop = drop_;
      RowBuffers<scalar_t> rb(K, padded(K));
      std::fill(rb.keep.data(), rb.keep.data() + K, uint8_t{1});
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / (Hd * Q), q = row % Q;
        softmax_row(sc + row * K, has_mask ? mk + (b * Mq + (Mq == 1 ? 0 : q)) * K : nullptr, pp + row * K,
                    dp + row * K, K, s, drop, static_cast<uint32_t>(row * K), rb);
      }
    });
  });
  return {dropped, probs};
}

// d(scores) from d(dropped probabilities): the mask's factor, then softmax's Jacobian, then the scaling.
torch::Tensor softmax_dropout_bwd(torch::Tensor g, torch::Tensor probs, int64_t seed0, int64_t seed1, double scaling,
                                  double p, c10::ScalarType dtype) {
  g = g.contiguous();
  check_rows(probs, "probs");
  const int64_t K = probs.size(-1), rows = probs.numel() / K;
  auto ds = torch::empty(probs.sizes(), probs.options().dtype(dtype));
  const Drop drop_(seed0, seed1, p);
  const float* __restrict__ pp = probs.data_ptr<float>();
  const float s = static_cast<float>(scaling);
  STROP_DISPATCH(dtype, [&] {
    auto gd = g.to(dtype);
    const scalar_t* __restrict__ gp = gd.data_ptr<scalar_t>();
    scalar_t* __restrict__ dp = ds.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      const Drop drop = drop_;
      const int64_t Kp = padded(K);
      RowBuffers<scalar_t> rb(K, Kp);  // in: the gradient row; prob: the probabilities (0 in the padding)
      scalar_t* __restrict__ gin = rb.in.data();
      scalar_t* __restrict__ o = rb.out.data();
      float* __restrict__ dpr = rb.v.data();
      float* __restrict__ f = rb.factor.data();
      float* __restrict__ pr = rb.prob.data();
      for (int64_t row = begin; row < end; ++row) {
        const int64_t base = row * K;
        std::memcpy(gin, gp + base, K * sizeof(scalar_t));
        std::memcpy(pr, pp + base, K * sizeof(float));
        if (drop.on) dropout_factors(drop, static_cast<uint32_t>(base), f, Kp);
        for (int64_t c = 0; c < Kp; c += kWidth) {
          _Pragma("omp simd")
          for (int64_t j = 0; j < kWidth; ++j) dpr[c + j] = to_f(gin[c + j]) * f[c + j];
        }
        const float dot = ordered_sum(Kp, [&](int64_t j) { return dpr[j] * pr[j]; });
        for (int64_t c = 0; c < Kp; c += kWidth) {
          _Pragma("omp simd")
          for (int64_t j = 0; j < kWidth; ++j) o[c + j] = from_f<scalar_t>(pr[c + j] * (dpr[c + j] - dot) * s);
        }
        std::memcpy(dp + base, o, K * sizeof(scalar_t));
      }
    });
  });
  return ds;
}

// ---------------------------------------------------------------------------------------------------------------
// x * factor(i): dropout with the hashed mask (the same call in forward and backward; forward and backward differ
// only in what is passed as x).
torch::Tensor dropout_apply(torch::Tensor x, int64_t seed0, int64_t seed1, double p) {
  x = x.contiguous();
  auto out = torch::empty_like(x);
  const Drop drop_(seed0, seed1, p);
  const int64_t n = x.numel();
  STROP_DISPATCH(x.scalar_type(), [&] {
    const scalar_t* __restrict__ xp = x.data_ptr<scalar_t>();
    scalar_t* __restrict__ op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      const Drop drop = drop_;
      for (int64_t i = begin; i < end; ++i)
        op[i] = from_f<scalar_t>(to_f(xp[i]) * drop.factor(static_cast<uint32_t>(i)));
    });
  });
  return out;
}

// The keep mask itself (for tests and for checking the hash against its Python reference).
torch::Tensor keep_mask(int64_t n, int64_t seed0, int64_t seed1, double p) {
  auto out = torch::empty({n}, torch::kBool);
  const Drop drop_(seed0, seed1, p);
  bool* __restrict__ op = out.data_ptr<bool>();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      const Drop drop = drop_;
    for (int64_t i = begin; i < end; ++i) op[i] = drop.factor(static_cast<uint32_t>(i)) != 0.f;
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dropout_add_norm_fwd", &dropout_add_norm_fwd);
  m.def("dropout_add_norm_bwd", &dropout_add_norm_bwd);
  m.def("softmax_dropout_fwd", &softmax_dropout_fwd);
  m.def("softmax_dropout_bwd", &softmax_dropout_bwd);
  m.def("dropout_apply", &dropout_apply);
  m.def("keep_mask", &keep_mask);
}
