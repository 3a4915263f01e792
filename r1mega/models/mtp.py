"""DeepSeek-V3's multi-token prediction (MTP) layers: megatron-core's ``MultiTokenPredictionBlock``.

The block lives on the last pipeline stage. Each MTP layer combines the hidden state at position i
with the embedding of token i+1 (``enorm``/``hnorm``, ``eh_proj``), runs one transformer layer (the
decoder's last layer spec, MoE for DeepSeek-V3) and its shared head's norm; the embedding and output
layer are the model's own. megatron adds the MTP cross-entropy (times ``mtp_loss_scaling_factor``) to
the gradient of a forward that passes ``labels``.

:class:`MTPGPTModel` runs the MTP layers only in such a forward with a positive loss scale. In
megatron-core 0.16.1 ``GPTModel._postprocess`` clones ``labels`` whenever MTP is configured, so a
forward for logits or log-probs (no labels) would fail; the MTP layers cannot change the main
model's output, so skipping them there is exact. With ``model.mtp_loss_scale = 0`` they are carried
(checkpoints, HF export) but never run.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel  # noqa: E402


class MTPLossUnavailable(RuntimeError):
    """MTP training was asked for where no labels reach megatron (the RL / SFT learner)."""


class MTPGPTModel(GPTModel):
    """``GPTModel`` with MTP layers that run only when they are trained (see the module docstring)."""

    def _postprocess(self, *args, **kwargs):
        scale = self.config.mtp_loss_scaling_factor or 0.0
        if kwargs.get("labels") is not None and scale > 0:
            return super()._postprocess(*args, **kwargs)
        if scale > 0 and self.training and self.post_process:
            raise MTPLossUnavailable(
                "model.mtp_loss_scale > 0 trains the MTP layers with megatron's MTP loss, which needs the "
                "labels in the forward (next-token steps, train/lm_step); the RL/SFT learner computes its "
                "losses from hidden states without them: set model.mtp_loss_scale=0")
        # no MTP layers in this forward: exactly the main model's output
        kwargs["mtp_in_postprocess"] = False
        saved = self.config.mtp_num_layers
        self.config.mtp_num_layers = None
        try:
            return super()._postprocess(*args, **kwargs)
        finally:
            self.config.mtp_num_layers = saved
