"""Rank program for the conversion tests (run through ``r1mega.platform.spawn.spawn_ranks``).

    python tests/convert_worker.py <json spec>

``mode``:
* ``fp8``: a transformers-made DeepSeek-V3 ``src`` -> ``from_hf`` -> ``to_hf --fp8`` (``fp8``) ->
  ``from_hf`` -> ``to_hf`` (``back``); then ``fp8_rect`` (written by the test with rectangular tiles)
  -> ``from_hf`` -> ``to_hf`` (``back_rect``). The test compares ``back*`` with ``src``.
* ``from_hf``: ``from_hf(hf, out, tp, pp, ep)`` on every rank (the layout's world).
* ``trainer_load``: what the trainer does with ``checkpoint.load_dir``: build the training model
  (DDP + optimizer) in ``layout``, ``train.stages.load_weights`` the checkpoint ``ckpt``, and export
  the loaded weights to the HF directory ``out`` (the test compares it with the source); with
  ``save``, also save a full training checkpoint (optimizer, scheduler, RNG) of that layout there.
* ``to_hf``: ``to_hf(ckpt, out)`` for each ``[ckpt, out]`` of ``jobs``, on one process.
* ``mtp_convert``: for each job ``{name: from_hf kwargs}``: ``from_hf(src, root/<name>_ckpt, **kwargs)``
  (result in ``root/<name>_result.json``) then ``to_hf`` to ``root/<name>_hf``. A job may name its own
  ``src``; one with ``expect_error`` writes the error to ``root/<name>_error.txt`` instead (put it last).
* ``trained``: a checkpoint the trainer wrote (``ckpt``), with the default arguments as
  ``r1mega convert`` passes them: ``to_hf`` to ``hf``; r1mega's logits of ``tokens`` from the checkpoint
  (the model ``checkpoint_model_config`` rebuilds, weights loaded as a stage does) to ``logits``; then
  ``from_hf`` of the export to ``back``, loaded as ``checkpoint.load_dir`` is: the parameters that differ
  from the checkpoint's go to ``logits`` too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fp8(spec: dict) -> None:
    from r1mega.bridge.convert import from_hf, to_hf

    root = Path(spec["root"])
    from_hf(root / "src", root / "ckpt_a")
    to_hf(root / "ckpt_a", root / "fp8", fp8=True, progress=False)
    from_hf(root / "fp8", root / "ckpt_b")
    to_hf(root / "ckpt_b", root / "back", progress=False)
    from_hf(root / "fp8_rect", root / "ckpt_c")
    to_hf(root / "ckpt_c", root / "back_rect", progress=False)


def from_hf(spec: dict) -> None:
    from r1mega.bridge.convert import from_hf as convert

    convert(spec["hf"], spec["out"], tp=spec.get("tp", 1), pp=spec.get("pp", 1), ep=spec.get("ep", 1))


def trainer_load(spec: dict) -> None:
    import r1mega.models  # noqa: F401  (readies megatron)
    from r1mega.bridge.convert import checkpoint_model_config
    from r1mega.bridge.hf_dir import save_hf
    from r1mega.config.schema import OptimizerConfig
    from r1mega.platform.distributed import init_model_parallel, init_process_group, shutdown
    from r1mega.train.model_setup import build_training_model
    from r1mega.train.parallel_check import Layout
    from r1mega.train.stages import load_weights

    init_process_group(timeout_minutes=3)
    parallel = Layout.parse(spec["layout"]).parallel_config(micro_batch_size=1)
    init_model_parallel(parallel, seed=1)
    model_cfg = checkpoint_model_config(spec["ckpt"])
    tm = build_training_model(model_cfg, parallel, OptimizerConfig(), total_steps=1)
    load_weights(tm, spec["ckpt"], model_cfg)
    save_hf(tm.module, tm.config, model_cfg, spec["out"], bucket_bytes=1 << 16)
    if spec.get("save"):
        from r1mega.ckpt import save_checkpoint

        save_checkpoint(tm, spec["save"], 1, model_cfg=model_cfg)
    shutdown()


def to_hf(spec: dict) -> None:
    from r1mega.bridge.convert import to_hf as convert

    for ckpt, out in spec["jobs"]:
        convert(ckpt, out, bucket_mb=0.05, progress=False)


def mtp_convert(spec: dict) -> None:
    from r1mega.bridge.convert import from_hf, to_hf

    root = Path(spec["root"])
    for name, kwargs in spec["jobs"].items():
        kwargs = dict(kwargs)
        src, refused = kwargs.pop("src", spec.get("src")), kwargs.pop("expect_error", False)
        try:
            result = from_hf(src, root / f"{name}_ckpt", **kwargs)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            if not refused:
                raise
            (root / f"{name}_error.txt").write_text(f"{type(e).__name__}: {e}")
            continue
        (root / f"{name}_result.json").write_text(json.dumps(result))
        to_hf(root / f"{name}_ckpt", root / f"{name}_hf", progress=False)


def trained(spec: dict) -> None:
    import torch

    from r1mega.bridge.convert import checkpoint_model_config, from_hf, to_hf
    from r1mega.config.schema import OptimizerConfig, ParallelConfig
    from r1mega.train.model_setup import build_training_model
    from r1mega.train.stages import load_weights

    to_hf(spec["ckpt"], spec["hf"], progress=False)  # sets up the one-process megatron groups
    model_cfg = checkpoint_model_config(spec["ckpt"])
    tm = build_training_model(model_cfg, ParallelConfig(), OptimizerConfig(), total_steps=1)
    load_weights(tm, spec["ckpt"], model_cfg)
    sys.path.insert(0, str(Path(__file__).parent))
    from bridge_worker import pipeline_logits

    tokens = torch.tensor(spec["tokens"])
    logits = pipeline_logits(tm.module, tokens, model_cfg.vocab_size)
    from_hf(spec["hf"], spec["back"])
    back = build_training_model(checkpoint_model_config(spec["back"]), ParallelConfig(), OptimizerConfig(),
                                total_steps=1)
    load_weights(back, spec["back"])  # as the trainer loads checkpoint.load_dir
    theirs = dict(back.module.named_parameters())
    differ = [n for n, p in tm.module.named_parameters() if not torch.equal(p, theirs[n])]
    torch.save({"logits": logits, "differ": differ, "params": len(theirs)}, spec["logits"])


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    {"fp8": fp8, "from_hf": from_hf, "trainer_load": trainer_load, "to_hf": to_hf,
     "mtp_convert": mtp_convert, "trained": trained}[spec["mode"]](spec)
