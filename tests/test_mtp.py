"""MTP training: with ``model.mtp_loss_scale > 0`` a next-token step (labels reach megatron) trains the
MTP layer with megatron's MTP loss; with 0 the layer is not run; a forward without labels in training
(the RL/SFT learner) refuses the scale instead of silently ignoring it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1mega.config.errors import ConfigError
from r1mega.config.schema import ModelConfig, R1Config
from r1mega.config.validate import validate_config
from r1mega.platform.spawn import spawn_ranks

WORKER = str(Path(__file__).with_name("mtp_worker.py"))


@pytest.mark.timeout(600)
def test_mtp_loss_trains_the_mtp_layer_only_when_scaled(tmp_path):
    out = tmp_path / "mtp.json"
    spawn_ranks([WORKER, json.dumps({"out": str(out)})], 1, timeout_s=500, name="mtp training")
    r = json.loads(out.read_text())
    off, on = r["0.0"], r["0.3"]
    assert on["mtp_params"] > 10
    assert off["mtp_grad"] == 0.0 and on["mtp_grad"] > 0  # the MTP layer learns only with a scale
    assert off["loss"] == on["loss"]  # the reported loss is the main model's; MTP adds to the gradient
    assert on["embedding_grad"] != off["embedding_grad"]  # through the shared embedding / output head
    assert "set model.mtp_loss_scale=0" in r["no_labels_error"]
    assert r["replay_layers"] == [3, 3]  # routing replay covers the decoder's MoE layers, not the MTP layer


def test_mtp_config_is_validated():
    def problems(**model):
        try:
            validate_config(R1Config(model=ModelConfig(**model)))
        except ConfigError as e:
            return str(e)
        return ""

    assert problems(preset="deepseek_v3", mtp_num_layers=1, mtp_loss_scale=0.3) == ""
    assert "model.mtp_num_layers=1 with preset qwen3_moe" in problems(preset="qwen3_moe", mtp_num_layers=1)
    assert "without MTP layers" in problems(preset="deepseek_v3", mtp_loss_scale=0.1)
    assert "model.mtp_loss_scale=-1" in problems(preset="deepseek_v3", mtp_num_layers=1, mtp_loss_scale=-1)
