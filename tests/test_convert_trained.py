"""What the trainer writes converts, with no extra flags: for each CPU recipe a short run (its stages cut to SFT,
so no rollout engine) -> ``to_hf`` -> transformers loads it with no missing, unexpected or mismatched weight and
gives r1mega's logits (fp32) -> ``from_hf`` -> training continues from exactly the trained weights.

The runs save periodically at the stage's last step, so the stage's final checkpoint is the periodic one's
files under a second name (hard links, not a second copy); a later stage's pruning (``keep_last=1``) keeps
what done.json names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from r1mega.config import load_config
from r1mega.platform.spawn import spawn_ranks

WORKER = str(Path(__file__).with_name("convert_worker.py"))
SHORT = ["data.eval_path=null", "trainer.global_batch_size=16", "parallel.micro_batch_size=8", "trainer.log_interval=1",
         "checkpoint.save_interval=2", "checkpoint.keep_last=1"]
# per recipe: what makes it a short SFT run on this machine (distill's teacher and tokenizer do not exist here)
RECIPES = {
    "demo_cpu": [],
    "r1_tiny_cpu": [],
    "r1_zero_tiny_cpu": [],
    "distill_tiny_cpu": ["data.tokenizer=null", "distill.teacher_checkpoint=null", "distill.teacher_config=null"],
    "parity_tiny": ["data.train_path=synthetic:addition:2", "model.seq_length=64"],
}
TWO_SFT = "stages=[{name: first, kind: sft, steps: 2, lr: 0.002}, {name: second, kind: sft, steps: 2, lr: 0.002}]"
ONE_SFT = "stages=[{name: more, kind: sft, steps: 1, lr: 0.002}]"


def _train(recipe: str, out: Path, *overrides: str, timeout: float = 280) -> dict:
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "train", "--config", f"configs/{recipe}.yaml",
                           f"trainer.output_dir={out}", *SHORT, *RECIPES[recipe], *overrides],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return json.loads((out / "summary.json").read_text())


def _hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers loaded {hf_dir} with {problems}"
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _same_files(a: Path, b: Path) -> None:
    """Every data file of ``a`` is the same inode as ``b``'s (one copy on disk); meta.json is each one's own."""
    names = sorted(p.name for p in a.iterdir() if p.name != "meta.json")
    assert names and names == sorted(p.name for p in b.iterdir() if p.name != "meta.json")
    for name in names:
        assert os.stat(a / name).st_ino == os.stat(b / name).st_ino, name


def _convert(recipe: str, final: Path, tmp_path: Path) -> None:
    """to-hf -> transformers (no loading problem, r1mega's logits) -> from-hf -> the trained weights exactly."""
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    spec = {"mode": "trained", "ckpt": str(final), "hf": str(tmp_path / "hf"), "back": str(tmp_path / "back"),
            "logits": str(tmp_path / "logits.pt"), "tokens": tokens.tolist()}
    spawn_ranks([WORKER, json.dumps(spec)], 1, timeout_s=300, name=f"convert {recipe}")
    ours = torch.load(tmp_path / "logits.pt", weights_only=True)
    theirs = _hf_logits(tmp_path / "hf", tokens)
    assert ours["logits"].shape == theirs.shape and float(theirs.abs().max()) > 0.1
    assert float((ours["logits"] - theirs).abs().max()) <= 1e-5
    assert ours["params"] > 10 and not ours["differ"]


@pytest.mark.timeout(600)
def test_demo_checkpoint_converts_without_flags(tmp_path):
    pytest.importorskip("transformers")
    summary = _train("demo_cpu", tmp_path / "run", "stages=[{name: sft, kind: sft, steps: 2, lr: 0.002}]")
    root = tmp_path / "run" / "checkpoints"
    final = Path(summary["final_checkpoint"])
    assert final == root / "sft" / "step_000002"
    _same_files(root / "step_000002", final)  # the periodic save at step 2 is the stage's final checkpoint
    meta = json.loads((final / "meta.json").read_text())
    assert meta["linked_from"] == str(root / "step_000002")
    # the checkpoint carries the model as the run resolved it (hidden 128, vocab 512: not the preset's tiny)
    assert meta["model"]["config"] == asdict(load_config(str(tmp_path / "run" / "config.yaml")).model)
    assert meta["model"]["config"]["hidden_size"] == 128
    _convert("demo_cpu", final, tmp_path)


@pytest.mark.slow  # the demo's path above (the MoE recipes share its model) plus `r1mega train` from the result
@pytest.mark.timeout(900)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_cpu_recipe_checkpoint_converts_and_training_continues(recipe, tmp_path):
    pytest.importorskip("transformers")
    summary = _train(recipe, tmp_path / "run", TWO_SFT)
    root = tmp_path / "run" / "checkpoints"
    first = Path(summary["stages"]["first"]["checkpoint"])
    assert first == root / "first" / "step_000002"
    # the second stage's saves pruned the periodic step_000002 (keep_last=1); the stage's own name still holds it
    assert not (root / "step_000002").exists() and (first / "meta.json").is_file()
    _same_files(root / "step_000004", root / "second" / "step_000002")
    meta = json.loads((first / "meta.json").read_text())
    assert meta["model"]["config"] == asdict(load_config(str(tmp_path / "run" / "config.yaml")).model)
    _convert(recipe, Path(summary["final_checkpoint"]), tmp_path)
    more = _train(recipe, tmp_path / "more", ONE_SFT, "optimizer.warmup_steps=0",
                  f"checkpoint.load_dir={tmp_path / 'back'}")
    # `r1mega train` starts from exactly the trained weights (same layout: the same sum of squares) and trains
    assert more["stages"]["more"]["fingerprint_start"] == summary["stages"]["second"]["fingerprint_end"]
    assert more["stages"]["more"]["fingerprint_end"] != more["stages"]["more"]["fingerprint_start"]
