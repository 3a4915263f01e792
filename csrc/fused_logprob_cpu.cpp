// CPU implementation of the fused log-prob/entropy op and the blockwise FP8 codec, plus the op
// schema registration (TORCH_LIBRARY) shared with the CUDA implementation in *_cuda.cu.
#include "fused_logprob.h"

#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace r1mega {

void check_logprob_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                        double temperature, int64_t token_chunk, int64_t vocab_chunk) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && target.dim() == 1,
              "fused_logprob: expected hidden [T, h], weight [V, h], target [T]; got ", hidden.sizes(), ", ",
              weight.sizes(), ", ", target.sizes());
  TORCH_CHECK(hidden.size(0) == target.size(0), "fused_logprob: hidden has ", hidden.size(0),
              " tokens but target has ", target.size(0));
  TORCH_CHECK(hidden.size(1) == weight.size(1), "fused_logprob: hidden size ", hidden.size(1),
              " != weight's ", weight.size(1));
  TORCH_CHECK(target.scalar_type() == at::kLong, "fused_logprob: target must be int64");
  TORCH_CHECK(temperature > 0, "fused_logprob: temperature must be > 0");
  TORCH_CHECK(token_chunk > 0 && vocab_chunk > 0, "fused_logprob: chunk sizes must be > 0");
  TORCH_CHECK(hidden.device() == weight.device() && hidden.device() == target.device(),
              "fused_logprob: hidden, weight and target must be on one device");
}

namespace {

// exp for float that GCC vectorises (std::exp stays a scalar libm call): Cody-Waite range
// reduction x = n ln2 + r and Cephes' degree-6 polynomial for e^r; about 2 ulp, inputs clamped to
// the finite range (the softmax only ever evaluates exp(z - max) <= 1).
inline float vexp(float x) {
  x = std::min(std::max(x, -87.33654f), 88.72283f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double vexp(double x) { return std::exp(x); }

template <typename acc_t>
void update_stats(const at::Tensor& z, const int64_t* tgt, int64_t col0, acc_t* m, acc_t* s, acc_t* u,
                  acc_t* t) {
  const int64_t rows = z.size(0), cols = z.size(1);
  const acc_t* zp = z.data_ptr<acc_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* row = zp + i * cols;
      acc_t bmax = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : bmax)
      for (int64_t j = 0; j < cols; ++j) bmax = std::max(bmax, row[j]);
      acc_t se = 0, sz = 0;
#pragma omp simd reduction(+ : se, sz)
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t e = vexp(row[j] - bmax);
        se += e;
        sz += e * row[j];
      }
      const acc_t nm = std::max(m[i], bmax);
      const acc_t a = std::exp(m[i] - nm), b = std::exp(bmax - nm);  // m[i] = -inf at start: a = 0
      s[i] = s[i] * a + se * b;
      u[i] = u[i] * a + sz * b;
      m[i] = nm;
      const int64_t local = tgt[i] - col0;
      if (local >= 0 && local < cols) t[i] = row[local];
    }
  });
}

// In place: z -> dL/dz for one block (see fused_logprob.h), divided by the temperature.
template <typename acc_t>
void block_grad(at::Tensor& z, const int64_t* tgt, int64_t col0, const acc_t* log_z, const acc_t* ent,
                const acc_t* g_lp, const acc_t* g_h, acc_t inv_temp) {
  const int64_t rows = z.size(0), cols = z.size(1);
  acc_t* zp = z.data_ptr<acc_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* row = zp + i * cols;
      const acc_t lz = log_z[i], h = ent[i], gl = g_lp[i], gh = g_h[i];
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t lp = row[j] - lz;
        row[j] = -vexp(lp) * (gl + gh * (lp + h)) * inv_temp;
      }
      const int64_t local = tgt[i] - col0;
      if (local >= 0 && local < cols) row[local] += gl * inv_temp;
    }
  });
}

// The statistics of every block (forward); ``keep``: receives the last block of logits (the only one when the
// chunks cover the whole call).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprob_stats(const LogprobInputs& in, int64_t vocab_start,
                                                                         double temperature, int64_t token_chunk,
                                                                         int64_t vocab_chunk, at::Tensor* keep) {
  at::Tensor m, s, u, t;  // not a structured binding: lambdas capture those only from C++20
  std::tie(m, s, u, t) = empty_stats(in);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "fused_logprob_forward_cpu", [&] {
    for_each_logit_block(in, temperature, token_chunk, vocab_chunk,
                         [&](at::Tensor& z, int64_t t0, int64_t, int64_t v0, const at::Tensor&, const at::Tensor&) {
                           update_stats<scalar_t>(z, in.target.data_ptr<int64_t>() + t0, vocab_start + v0,
                                                  m.data_ptr<scalar_t>() + t0, s.data_ptr<scalar_t>() + t0,
                                                  u.data_ptr<scalar_t>() + t0, t.data_ptr<scalar_t>() + t0);
                           if (keep != nullptr) *keep = z;
                         });
  });
  return {m, s, u, t};
}

// dL/dhidden and dL/dweight (backward), from the recomputed blocks or the ``kept`` one.
std::tuple<at::Tensor, at::Tensor> logprob_grads(const LogprobInputs& in, int64_t vocab_start,
                                                 const at::Tensor& log_z_in, const at::Tensor& entropy_in,
                                                 const at::Tensor& grad_logp_in, const at::Tensor& grad_entropy_in,
                                                 double temperature, int64_t token_chunk, int64_t vocab_chunk,
                                                 at::Tensor* kept) {
  const at::Tensor log_z = log_z_in.to(in.acc).contiguous(), ent = entropy_in.to(in.acc).contiguous();
  const at::Tensor g_lp = grad_logp_in.to(in.acc).contiguous(), g_h = grad_entropy_in.to(in.acc).contiguous();
  std::tuple<at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(in.acc, "fused_logprob_backward_cpu", [&] {
    const scalar_t inv_temp = static_cast<scalar_t>(1.0 / temperature);
    grads = logprob_backward_driver(in, temperature, token_chunk, vocab_chunk,
                                    [&](at::Tensor& z, int64_t t0, int64_t, int64_t v0) {
                                      block_grad<scalar_t>(z, in.target.data_ptr<int64_t>() + t0, vocab_start + v0,
                                                           log_z.data_ptr<scalar_t>() + t0,
                                                           ent.data_ptr<scalar_t>() + t0,
                                                           g_lp.data_ptr<scalar_t>() + t0,
                                                           g_h.data_ptr<scalar_t>() + t0, inv_temp);
                                    },
                                    kept);
  });
  return grads;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_logprob_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, int64_t vocab_start,
    double temperature, int64_t token_chunk, int64_t vocab_chunk) {
  const LogprobInputs in = prepare_logprob_inputs(hidden, weight, target, temperature, token_chunk, vocab_chunk);
  return logprob_stats(in, vocab_start, temperature, token_chunk, vocab_chunk, nullptr);
}

std::tuple<at::Tensor, at::Tensor> fused_logprob_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, int64_t vocab_start,
    const at::Tensor& log_z_in, const at::Tensor& entropy_in, const at::Tensor& grad_logp_in,
    const at::Tensor& grad_entropy_in, double temperature, int64_t token_chunk, int64_t vocab_chunk) {
  const LogprobInputs in = prepare_logprob_inputs(hidden, weight, target, temperature, token_chunk, vocab_chunk);
  return logprob_grads(in, vocab_start, log_z_in, entropy_in, grad_logp_in, grad_entropy_in, temperature,
                       token_chunk, vocab_chunk, nullptr);
}

// The two ops above as one block covering the whole call, whose logits the forward returns for the caller to
// keep and hand to the backward instead of recomputing them (CPU; the same code, so the same values).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_logprob_block_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, int64_t vocab_start,
    double temperature) {
  const LogprobInputs in = prepare_logprob_inputs(hidden, weight, target, temperature, 1, 1);
  TORCH_CHECK(in.tokens > 0 && in.vocab > 0, "fused_logprob_block_forward: needs tokens and vocabulary rows, got ",
              in.tokens, " and ", in.vocab);
  at::Tensor block;
  auto stats = logprob_stats(in, vocab_start, temperature, in.tokens, in.vocab, &block);
  return {std::get<0>(stats), std::get<1>(stats), std::get<2>(stats), std::get<3>(stats), block};
}

std::tuple<at::Tensor, at::Tensor> fused_logprob_block_backward_cpu(
    const at::Tensor& block_in, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    int64_t vocab_start, const at::Tensor& log_z, const at::Tensor& entropy, const at::Tensor& grad_logp,
    const at::Tensor& grad_entropy, double temperature) {
  const LogprobInputs in = prepare_logprob_inputs(hidden, weight, target, temperature, 1, 1);
  at::Tensor block = block_in;  // the same tensor: its logits become dL/dz in place
  TORCH_CHECK(block.dim() == 2 && block.size(0) == in.tokens && block.size(1) == in.vocab && block.is_contiguous() &&
                  block.scalar_type() == in.acc,
              "fused_logprob_block_backward: expected the forward's contiguous ", in.acc, " block [", in.tokens, ", ",
              in.vocab, "], got ", block.scalar_type(), " ", block.sizes());
  return logprob_grads(in, vocab_start, log_z, entropy, grad_logp, grad_entropy, temperature, in.tokens, in.vocab,
                       &block);
}

// ---- blockwise FP8 (e4m3, block x block scales) -------------------------------------------------

std::tuple<at::Tensor, at::Tensor> fp8_blockwise_quantize_cpu(const at::Tensor& x_in, int64_t block) {
  TORCH_CHECK(x_in.dim() == 2, "fp8_blockwise_quantize: expected a 2-D tensor, got ", x_in.sizes());
  TORCH_CHECK(block > 0, "fp8_blockwise_quantize: block must be > 0");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t R = x.size(0), C = x.size(1);
  const int64_t br = (R + block - 1) / block, bc = (C + block - 1) / block;
  at::Tensor q = at::empty({R, C}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale_inv = at::empty({br, bc}, x.options());
  const float* xp = x.data_ptr<float>();
  auto* qp = q.data_ptr<c10::Float8_e4m3fn>();
  float* sp = scale_inv.data_ptr<float>();
  constexpr float kMax = 448.0f;
  at::parallel_for(0, br * bc, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = (b / bc) * block, c0 = (b % bc) * block;
      const int64_t r1 = std::min(r0 + block, R), c1 = std::min(c0 + block, C);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(xp[r * C + c]));
      const float s = std::max(amax, 1e-12f) / kMax;
      sp[b] = s;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          const float v = std::min(std::max(xp[r * C + c] / s, -kMax), kMax);
          qp[r * C + c] = c10::Float8_e4m3fn(v);
        }
    }
  });
  return {q, scale_inv};
}

at::Tensor fp8_blockwise_dequantize_cpu(const at::Tensor& q_in, const at::Tensor& scale_in, int64_t block,
                                        at::ScalarType out_dtype) {
  TORCH_CHECK(q_in.dim() == 2 && q_in.scalar_type() == at::kFloat8_e4m3fn,
              "fp8_blockwise_dequantize: expected a 2-D float8_e4m3fn tensor");
  const at::Tensor q = q_in.contiguous(), scale = scale_in.to(at::kFloat).contiguous();
  const int64_t R = q.size(0), C = q.size(1);
  const int64_t br = (R + block - 1) / block, bc = (C + block - 1) / block;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == br && scale.size(1) == bc, "fp8_blockwise_dequantize: scale_inv ",
              scale.sizes(), " does not match ", br, "x", bc, " blocks of ", block);
  at::Tensor out = at::empty({R, C}, q.options().dtype(at::kFloat));
  const auto* qp = q.data_ptr<c10::Float8_e4m3fn>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t c = 0; c < C; ++c) op[r * C + c] = static_cast<float>(qp[r * C + c]) * sp[(r / block) * bc + c / block];
  });
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

}  // namespace r1mega

TORCH_LIBRARY(r1mega, m) {
  m.def("fused_logprob_forward(Tensor hidden, Tensor weight, Tensor target, int vocab_start, float temperature, "
        "int token_chunk, int vocab_chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_logprob_backward(Tensor hidden, Tensor weight, Tensor target, int vocab_start, Tensor log_z, "
        "Tensor entropy, Tensor grad_logp, Tensor grad_entropy, float temperature, int token_chunk, "
        "int vocab_chunk) -> (Tensor, Tensor)");
  m.def("fused_logprob_block_forward(Tensor hidden, Tensor weight, Tensor target, int vocab_start, float temperature) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_logprob_block_backward(Tensor(a!) block, Tensor hidden, Tensor weight, Tensor target, int vocab_start, "
        "Tensor log_z, Tensor entropy, Tensor grad_logp, Tensor grad_entropy, float temperature) -> (Tensor, Tensor)");
  m.def("fp8_blockwise_quantize(Tensor x, int block) -> (Tensor, Tensor)");
  m.def("fp8_blockwise_dequantize(Tensor q, Tensor scale_inv, int block, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(r1mega, CPU, m) {
  m.impl("fused_logprob_forward", &r1mega::fused_logprob_forward_cpu);
  m.impl("fused_logprob_backward", &r1mega::fused_logprob_backward_cpu);
  m.impl("fused_logprob_block_forward", &r1mega::fused_logprob_block_forward_cpu);
  m.impl("fused_logprob_block_backward", &r1mega::fused_logprob_block_backward_cpu);
  m.impl("fp8_blockwise_quantize", &r1mega::fp8_blockwise_quantize_cpu);
  m.impl("fp8_blockwise_dequantize", &r1mega::fp8_blockwise_dequantize_cpu);
}
