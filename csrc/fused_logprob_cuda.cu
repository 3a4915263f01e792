// CUDA implementation of the fused log-prob/entropy op and the blockwise FP8 codec. The block
// logits come from cuBLAS (at::mm); the per-row softmax statistics, the in-place dL/dz and the FP8
// block scaling are the custom kernels below. Same schema as the CPU ops (fused_logprob_cpu.cpp).
#include "fused_logprob.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <cfloat>

namespace r1mega {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T block_reduce(T v, bool is_max) {
  __shared__ T shared[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off /= 2) {
    T o = __shfl_xor_sync(0xffffffff, v, off);
    v = is_max ? max(v, o) : v + o;
  }
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? shared[lane] : (is_max ? -INFINITY : T(0));
    for (int off = 16; off > 0; off /= 2) {
      T o = __shfl_xor_sync(0xffffffff, v, off);
      v = is_max ? max(v, o) : v + o;
    }
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  T out = shared[0];
  __syncthreads();
  return out;
}

// One CUDA block per row: fold this block of logits into the running (m, s, u) and pick the target.
template <typename acc_t>
__global__ void update_stats_kernel(const acc_t* __restrict__ z, int64_t cols, const int64_t* __restrict__ tgt,
                                    int64_t col0, acc_t* m, acc_t* s, acc_t* u, acc_t* t) {
  const int64_t i = blockIdx.x;
  const acc_t* row = z + i * cols;
  acc_t bmax = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) bmax = max(bmax, row[j]);
  bmax = block_reduce<acc_t>(bmax, true);
  acc_t se = 0, sz = 0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const acc_t e = exp(row[j] - bmax);
    se += e;
    sz += e * row[j];
  }
  se = block_reduce<acc_t>(se, false);
  sz = block_reduce<acc_t>(sz, false);
  if (threadIdx.x == 0) {
    const acc_t nm = max(m[i], bmax);
    const acc_t a = exp(m[i] - nm), b = exp(bmax - nm);
    s[i] = s[i] * a + se * b;
    u[i] = u[i] * a + sz * b;
    m[i] = nm;
    const int64_t local = tgt[i] - col0;
    if (local >= 0 && local < cols) t[i] = row[local];
  }
}

template <typename acc_t>
__global__ void block_grad_kernel(acc_t* z, int64_t cols, const int64_t* __restrict__ tgt, int64_t col0,
                                  const acc_t* __restrict__ log_z, const acc_t* __restrict__ ent,
                                  const acc_t* __restrict__ g_lp, const acc_t* __restrict__ g_h, acc_t inv_temp) {
  const int64_t i = blockIdx.x;
  acc_t* row = z + i * cols;
  const acc_t lz = log_z[i], h = ent[i], gl = g_lp[i], gh = g_h[i];
  const int64_t local = tgt[i] - col0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const acc_t lp = row[j] - lz;
    acc_t g = -exp(lp) * (gl + gh * (lp + h));
    if (j == local) g += gl;
    row[j] = g * inv_temp;
  }
}

__global__ void fp8_quantize_kernel(const float* __restrict__ x, int64_t R, int64_t C, int64_t block, int64_t bc,
                                    c10::Float8_e4m3fn* q, float* scale_inv) {
  const int64_t b = blockIdx.x;
  const int64_t r0 = (b / bc) * block, c0 = (b % bc) * block;
  const int64_t r1 = min(r0 + block, R), c1 = min(c0 + block, C);
  const int64_t w = c1 - c0, n = (r1 - r0) * w;
  float amax = 0.0f;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) amax = fmaxf(amax, fabsf(x[(r0 + k / w) * C + c0 + k % w]));
  amax = block_reduce<float>(amax, true);
  // times the reciprocal, as torch's CUDA division by a scalar does, so scales match it bit for bit
  const float s = fmaxf(amax, 1e-12f) * (1.0f / 448.0f);
  if (threadIdx.x == 0) scale_inv[b] = s;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    const int64_t idx = (r0 + k / w) * C + c0 + k % w;
    q[idx] = c10::Float8_e4m3fn(fminf(fmaxf(x[idx] / s, -448.0f), 448.0f));
  }
}

__global__ void fp8_dequantize_kernel(const c10::Float8_e4m3fn* __restrict__ q, const float* __restrict__ scale,
                                      int64_t R, int64_t C, int64_t block, int64_t bc, float* out) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= R * C) return;
  const int64_t r = idx / C, c = idx % C;
  out[idx] = static_cast<float>(q[idx]) * scale[(r / block) * bc + c / block];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_logprob_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, int64_t vocab_start,
    double temperature, int64_t token_chunk, int64_t vocab_chunk) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const LogprobInputs in = prepare_logprob_inputs(hidden, weight, target, temperature, token_chunk, vocab_chunk);
  at::Tensor m, s, u, t;  // not a structured binding: lambdas capture those only from C++20
  std::tie(m, s, u, t) = empty_stats(in);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.acc, "fused_logprob_forward_cuda", [&] {
    for_each_logit_block(in, temperature, token_chunk, vocab_chunk,
                         [&](at::Tensor& z, int64_t t0, int64_t rows, int64_t v0, const at::Tensor&,
                             const at::Tensor&) {
                           update_stats_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
                               z.data_ptr<scalar_t>(), z.size(1), in.target.data_ptr<int64_t>() + t0,
                               vocab_start + v0, m.data_ptr<scalar_t>() + t0, s.data_ptr<scalar_t>() + t0,
                               u.data_ptr<scalar_t>() + t0, t.data_ptr<scalar_t>() + t0);
                           C10_CUDA_KERNEL_LAUNCH_CHECK();
                         });
  });
  return {m, s, u, t};
}

std::tuple<at::Tensor, at::Tensor> fused_logprob_backward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, int64_t vocab_start,
    const at::Tensor& log_z_in, const at::Tensor& entropy_in, const at::Tensor& grad_logp_in,
    const at::Tensor& grad_entropy_in, double temperature, int64_t token_chunk, int64_t vocab_chunk) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const LogprobInputs in = prepare_logprob_inputs(hidden, weight, target, temperature, token_chunk, vocab_chunk);
  const at::Tensor log_z = log_z_in.to(in.acc).contiguous(), ent = entropy_in.to(in.acc).contiguous();
  const at::Tensor g_lp = grad_logp_in.to(in.acc).contiguous(), g_h = grad_entropy_in.to(in.acc).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  std::tuple<at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(in.acc, "fused_logprob_backward_cuda", [&] {
    const scalar_t inv_temp = static_cast<scalar_t>(1.0 / temperature);
    grads = logprob_backward_driver(in, temperature, token_chunk, vocab_chunk,
                                    [&](at::Tensor& z, int64_t t0, int64_t rows, int64_t v0) {
                                      block_grad_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
                                          z.data_ptr<scalar_t>(), z.size(1), in.target.data_ptr<int64_t>() + t0,
                                          vocab_start + v0, log_z.data_ptr<scalar_t>() + t0,
                                          ent.data_ptr<scalar_t>() + t0, g_lp.data_ptr<scalar_t>() + t0,
                                          g_h.data_ptr<scalar_t>() + t0, inv_temp);
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
  });
  return grads;
}

std::tuple<at::Tensor, at::Tensor> fp8_blockwise_quantize_cuda(const at::Tensor& x_in, int64_t block) {
  TORCH_CHECK(x_in.dim() == 2, "fp8_blockwise_quantize: expected a 2-D tensor, got ", x_in.sizes());
  TORCH_CHECK(block > 0, "fp8_blockwise_quantize: block must be > 0");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t R = x.size(0), C = x.size(1);
  const int64_t br = (R + block - 1) / block, bc = (C + block - 1) / block;
  at::Tensor q = at::empty({R, C}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale_inv = at::empty({br, bc}, x.options());
  if (br * bc == 0) return {q, scale_inv};
  fp8_quantize_kernel<<<br * bc, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), R, C, block, bc, q.data_ptr<c10::Float8_e4m3fn>(), scale_inv.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scale_inv};
}

at::Tensor fp8_blockwise_dequantize_cuda(const at::Tensor& q_in, const at::Tensor& scale_in, int64_t block,
                                         at::ScalarType out_dtype) {
  TORCH_CHECK(q_in.dim() == 2 && q_in.scalar_type() == at::kFloat8_e4m3fn,
              "fp8_blockwise_dequantize: expected a 2-D float8_e4m3fn tensor");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), scale = scale_in.to(at::kFloat).contiguous();
  const int64_t R = q.size(0), C = q.size(1);
  const int64_t br = (R + block - 1) / block, bc = (C + block - 1) / block;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == br && scale.size(1) == bc, "fp8_blockwise_dequantize: scale_inv ",
              scale.sizes(), " does not match ", br, "x", bc, " blocks of ", block);
  at::Tensor out = at::empty({R, C}, q.options().dtype(at::kFloat));
  const int64_t n = R * C;
  if (n == 0) return out.to(out_dtype);
  fp8_dequantize_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      q.data_ptr<c10::Float8_e4m3fn>(), scale.data_ptr<float>(), R, C, block, bc, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

}  // namespace r1mega

TORCH_LIBRARY_IMPL(r1mega, CUDA, m) {
  m.impl("fused_logprob_forward", &r1mega::fused_logprob_forward_cuda);
  m.impl("fused_logprob_backward", &r1mega::fused_logprob_backward_cuda);
  m.impl("fp8_blockwise_quantize", &r1mega::fp8_blockwise_quantize_cuda);
  m.impl("fp8_blockwise_dequantize", &r1mega::fp8_blockwise_dequantize_cuda);
}
