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

}  // namespace r1mega
