// Fused output layer -> log-softmax gather -> entropy, chunked over tokens and vocabulary.
//
// Forward returns per-token partial softmax statistics over this rank's vocabulary shard, so the
// caller can combine shards of a tensor-parallel vocabulary (max / sum all-reduces) before the
// final log p(target) and entropy:
//   m   = max_j z_j                     s = sum_j exp(z_j - m)
//   u   = sum_j exp(z_j - m) * z_j      t = z_target if the target is in this shard else 0
// with z = (hidden @ weight^T) / temperature. Backward recomputes each [token_chunk, vocab_chunk]
// block of logits and turns it into dL/dz in place:
//   dL/dz = g_lp * (onehot_t - p) - g_H * p * (log p + H)
// so no [tokens, vocab] tensor ever exists.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace r1mega {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_logprob_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, int64_t vocab_start,
    double temperature, int64_t token_chunk, int64_t vocab_chunk);

std::tuple<at::Tensor, at::Tensor> fused_logprob_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, int64_t vocab_start,
    const at::Tensor& log_z, const at::Tensor& entropy, const at::Tensor& grad_logp,
    const at::Tensor& grad_entropy, double temperature, int64_t token_chunk, int64_t vocab_chunk);

std::tuple<at::Tensor, at::Tensor> fp8_blockwise_quantize_cpu(const at::Tensor& x, int64_t block);
at::Tensor fp8_blockwise_dequantize_cpu(const at::Tensor& q, const at::Tensor& scale_inv, int64_t block,
                                        at::ScalarType out_dtype);

// Shared argument checks (both devices), so errors read the same everywhere.
void check_logprob_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                        double temperature, int64_t token_chunk, int64_t vocab_chunk);

// The dtype the softmax statistics use: double for double inputs, float otherwise.
inline at::ScalarType stats_dtype(const at::Tensor& weight) {
  return weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checked, contiguous inputs of one call (hidden cast to the weight's dtype, as megatron's output
// layer computes), shared by the CPU and CUDA drivers.
struct LogprobInputs {
  at::Tensor hidden, weight, target;
  at::ScalarType acc;
  int64_t tokens, vocab;
};

inline LogprobInputs prepare_logprob_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                            const at::Tensor& target, double temperature, int64_t token_chunk,
                                            int64_t vocab_chunk) {
  check_logprob_args(hidden, weight, target, temperature, token_chunk, vocab_chunk);
  at::Tensor w = weight.contiguous();
  at::Tensor h = hidden.to(w.scalar_type()).contiguous();
  return {h, w, target.contiguous(), stats_dtype(weight), h.size(0), w.size(0)};
}

// Per-token running statistics (m = -inf, s = u = t = 0) that the forward folds every block into.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_stats(const LogprobInputs& in) {
  auto opts = in.hidden.options().dtype(in.acc);
  return {at::full({in.tokens}, -std::numeric_limits<double>::infinity(), opts), at::zeros({in.tokens}, opts),
          at::zeros({in.tokens}, opts), at::zeros({in.tokens}, opts)};
}

// Calls fn(z, t0, rows, v0, w_block, h_chunk) for each [token_chunk, vocab_chunk] block of logits
// z = (h_chunk @ w_block^T) / temperature in the statistics dtype; the matmul runs in the weight's
// dtype (ATen: MKL / cuBLAS). Only one block exists at a time.
template <typename Fn>
void for_each_logit_block(const LogprobInputs& in, double temperature, int64_t token_chunk, int64_t vocab_chunk,
                          Fn&& fn) {
  for (int64_t t0 = 0; t0 < in.tokens; t0 += token_chunk) {
    const int64_t rows = std::min(token_chunk, in.tokens - t0);
    const at::Tensor h = in.hidden.narrow(0, t0, rows);
    for (int64_t v0 = 0; v0 < in.vocab; v0 += vocab_chunk) {
      const at::Tensor w = in.weight.narrow(0, v0, std::min(vocab_chunk, in.vocab - v0));
      at::Tensor z = at::mm(h, w.t());
      if (z.scalar_type() != in.acc) z = z.to(in.acc);
      if (temperature != 1.0) z.div_(temperature);
      fn(z, t0, rows, v0, w, h);
    }
  }
}

// Backward driver: for each block, grad_block(z, t0, rows, v0) turns z into dL/dz in place, then the
// two GEMMs accumulate dL/dhidden and dL/dweight in the statistics dtype. ``kept``: the whole call's one
// block of logits, kept by the forward (CPU), used instead of recomputing it.
template <typename GradBlock>
std::tuple<at::Tensor, at::Tensor> logprob_backward_driver(const LogprobInputs& in, double temperature,
                                                           int64_t token_chunk, int64_t vocab_chunk,
                                                           GradBlock&& grad_block, at::Tensor* kept = nullptr) {
  at::Tensor grad_hidden = at::zeros({in.tokens, in.hidden.size(1)}, in.hidden.options().dtype(in.acc));
  at::Tensor grad_weight = at::zeros({in.vocab, in.weight.size(1)}, in.weight.options().dtype(in.acc));
  auto one_block = [&](at::Tensor& z, int64_t t0, int64_t rows, int64_t v0, const at::Tensor& w,
                       const at::Tensor& h) {
    grad_block(z, t0, rows, v0);
    grad_hidden.narrow(0, t0, rows).addmm_(z, w.to(in.acc));
    grad_weight.narrow(0, v0, w.size(0)).addmm_(z.t(), h.to(in.acc));
  };
  if (kept != nullptr) {
    one_block(*kept, 0, in.tokens, 0, in.weight, in.hidden);
  } else {
    for_each_logit_block(in, temperature, token_chunk, vocab_chunk, one_block);
  }
  return {grad_hidden, grad_weight};
}

}  // namespace r1mega
