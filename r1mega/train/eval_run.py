"""``r1mega eval``: pass@1 / cons@k / format / response length of a model on a JSONL set, as one JSON report,
or on several benchmarks (``--benchmarks`` / ``eval.benchmarks``: ``train/bench_eval.py``) as one JSON
report plus a markdown table.

The model is an HF directory (``--hf``: straight into the engine, no megatron) or an r1mega
checkpoint (``--checkpoint``, default ``checkpoint.load_dir``: loaded into the megatron policy in
the config's layout, exported once through the bridge, then served by the engine). Rank 0 owns
the engine; under torchrun the other ranks only take part in loading and exporting.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from r1mega.config.errors import ConfigError
from r1mega.config.schema import BenchmarkConfig, R1Config

log = logging.getLogger(__name__)


@dataclass
class EvalRequest:
    data: Optional[str] = None  # JSONL or synthetic:<task>; None = data.eval_path
    k: Optional[int] = None  # None = eval.k
    checkpoint: Optional[str] = None  # r1mega checkpoint root or step dir; None = checkpoint.load_dir
    hf: Optional[str] = None  # HF model directory
    out: Optional[str] = None  # report path; None = <trainer.output_dir>/eval.json
    benchmarks: Optional[str] = None  # "name=path[:kind],..."; None = eval.benchmarks when --data is not given
    suite: list[BenchmarkConfig] = field(default_factory=list)  # resolved benchmarks (empty: one --data set)


def _suite(cfg: R1Config, req: EvalRequest, problems: list[str]) -> list[BenchmarkConfig]:
    """The benchmarks to run: ``--benchmarks``, else ``eval.benchmarks`` unless ``--data`` was given."""
    from r1mega.config.validate import check_benchmarks
    from r1mega.data.benchmarks import parse_benchmarks

    if req.benchmarks is None:
        return [] if req.data else list(cfg.eval.benchmarks)
    if req.data:
        problems.append("--data and --benchmarks both given: pass one (a --data set can be a benchmark: "
                        "name=path.jsonl)")
    try:
        suite = parse_benchmarks(req.benchmarks)
    except ValueError as e:
        problems.append(str(e))
        return []
    problems += check_benchmarks(suite, "--benchmarks")
    return suite


def resolve(cfg: R1Config, req: EvalRequest) -> EvalRequest:
    """Fill defaults from the config; raise ``ConfigError`` naming the missing input and the flag that sets it."""
    problems: list[str] = []
    suite = _suite(cfg, req, problems)
    data = None if suite else req.data or cfg.data.eval_path
    if not data and not suite and not problems:
        problems.append("no eval set: pass --data path.jsonl (or synthetic:addition) or --benchmarks "
                        "name=path[:kind],... or set data.eval_path / eval.benchmarks")
    checkpoint = req.checkpoint if req.hf is None else None
    checkpoint = checkpoint or (cfg.checkpoint.load_dir if req.hf is None else None)
    if req.hf is not None and req.checkpoint is not None:
        problems.append("--hf and --checkpoint both given: evaluate one model at a time")
    elif req.hf is None and not checkpoint:
        problems.append("no model: pass --hf <HF dir> or --checkpoint <r1mega checkpoint> "
                        "(or set checkpoint.load_dir)")
    if req.hf is not None and not (Path(req.hf) / "config.json").is_file():
        problems.append(f"--hf {req.hf}: no config.json there; give a Hugging Face model directory")
    k = req.k if req.k is not None else cfg.eval.k
    if k < 1:
        problems.append(f"--k {k}: pass@1 needs at least one sample per problem")
    if problems:
        raise ConfigError(problems)
    out = req.out or str(Path(cfg.trainer.output_dir) / "eval.json")
    return EvalRequest(data, k, checkpoint, req.hf, out, req.benchmarks, suite)


def _tokenizer(cfg: R1Config, model_dir: Optional[Path]):
    from r1mega.data.tokenizer import load_tokenizer

    if model_dir is not None and (model_dir / "tokenizer.json").is_file():
        return load_tokenizer(model_dir), model_dir
    if not cfg.data.tokenizer:
        where = f"{model_dir} has no tokenizer.json and " if model_dir is not None else ""
        raise ConfigError(f"{where}data.tokenizer is not set: point it at the model's tokenizer "
                          f"(a tokenizer.json, its directory, or a sentencepiece .model)")
    return load_tokenizer(cfg.data.tokenizer), Path(cfg.data.tokenizer)


def _checkpoint_engine(cfg: R1Config, checkpoint: str, out_dir: Path, tokenizer_dir: Path):
    """Load an r1mega checkpoint into the policy (every rank, the config's layout) and start the engine on its
    HF export through the trainer's ``WeightSync`` (rank 0 holds the engine; ``None`` elsewhere)."""
    import torch.distributed as dist

    from r1mega.models.policy import padded_vocab_size  # noqa: F401  (readies megatron)
    from r1mega.platform.distributed import init_model_parallel, init_process_group

    init_process_group(timeout_minutes=cfg.parallel.timeout_minutes)
    if cfg.rollout.engine == "megatron" and dist.get_world_size() > 1:
        raise ValueError("r1mega eval with rollout.engine=megatron runs in one process (its generation is "
                         "collective, the report is written by rank 0 alone): use --nproc 1 (a checkpoint loads "
                         "into any layout) or rollout.engine=vllm")
    init_model_parallel(cfg.parallel, seed=cfg.model.seed)
    from r1mega.train.model_setup import build_training_model
    from r1mega.train.stages import load_weights
    from r1mega.train.weight_sync import WeightSync

    tm = build_training_model(cfg.model, cfg.parallel, cfg.optimizer, total_steps=1)
    load_weights(tm, checkpoint, cfg.model)
    sync = WeightSync(cfg, out_dir, tokenizer_dir if tokenizer_dir.is_dir() else tokenizer_dir.parent, one_engine=True)
    sync.start(tm)
    return sync.engine


def run_eval(cfg: R1Config, req: EvalRequest) -> Optional[dict]:
    """Evaluate and write the report (rank 0); returns the report on rank 0, ``None`` elsewhere."""
    import torch.distributed as dist

    from r1mega.train.bench_eval import load_benchmarks, render_problems
    from r1mega.train.evaluate import load_eval_examples, make_problems

    req = resolve(cfg, req)
    t0 = time.monotonic()
    if req.suite:  # read every file before loading a model: a bad file fails in a second, not minutes
        loaded = load_benchmarks(req.suite, cfg.eval.max_prompts)
        sources = {e.data_source for b in loaded for e in b.examples}
    else:
        examples = load_eval_examples(req.data, seed=cfg.data.seed, max_prompts=cfg.eval.max_prompts)
        sources = {e.data_source for e in examples}
    def render():  # prompts are rendered before the engine starts: a too-long one fails early
        if req.suite:
            render_problems(loaded, tokenizer, cfg.data.chat_template, cfg.data.max_prompt_length)
            return loaded
        return make_problems(examples, tokenizer, cfg.data.chat_template, cfg.data.max_prompt_length)

    if req.hf is not None:  # straight into an in-process engine, no megatron
        from r1mega.rollout import build_engine

        tokenizer, _ = _tokenizer(cfg, Path(req.hf))
        problems = render()
        engine = build_engine(Path(req.hf), cfg.rollout, in_process=True)
    else:
        tokenizer, tok_dir = _tokenizer(cfg, None)
        problems = render()
        engine = _checkpoint_engine(cfg, req.checkpoint, Path(req.out).parent, tok_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    report = None
    if rank == 0:
        try:
            run = _run_suite if req.suite else _run_set
            report = run(cfg, req, engine, tokenizer, problems, sources, t0)
        finally:
            # an engine process closes; an in-process vLLM engine shuts its core down now, while the process
            # group vLLM made for it still exists (at interpreter exit it would find it gone: a traceback)
            stop = getattr(engine, "close", None) or getattr(engine, "shutdown", None)
            if stop is not None:
                stop()
    if req.hf is None and dist.is_initialized():  # megatron's groups (--hf: vLLM's own, shut down above)
        from r1mega.platform.distributed import shutdown

        dist.barrier()
        shutdown()
    return report


def _meta(cfg: R1Config, req: EvalRequest, tokenizer, t0: float) -> dict:
    from r1mega.train.evaluate import eval_sampling

    sampling = eval_sampling(cfg, tokenizer)
    return {"model": str(req.hf or req.checkpoint), "k": req.k, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed,
            "chat_template": cfg.data.chat_template, "seconds": time.monotonic() - t0}


def _run_set(cfg: R1Config, req: EvalRequest, engine, tokenizer, problems, sources, t0: float) -> dict:
    """One eval set -> the report file (metrics under ``eval/``) and its samples file."""
    from r1mega.rewards import RewardComputer
    from r1mega.train.evaluate import eval_sampling, generate_and_score, judge_config, write_report

    with RewardComputer(judge_config(cfg.reward, sources)) as judge:
        metrics, groups, texts = generate_and_score(engine, judge, problems, req.k, eval_sampling(cfg, tokenizer),
                                                    tokenizer, cfg.reward.math_timeout_s)
    meta = {"data": req.data, **_meta(cfg, req, tokenizer, t0), "problems": len(problems)}
    write_report(Path(req.out), metrics, problems, groups, texts, meta)
    return {**meta, **metrics, "report": req.out}


def _run_suite(cfg: R1Config, req: EvalRequest, engine, tokenizer, loaded, sources, t0: float) -> dict:
    """Several benchmarks -> one JSON report, a markdown table next to it, one samples file each."""
    from r1mega.rewards import RewardComputer
    from r1mega.train.bench_eval import run_benchmarks, write_benchmark_report
    from r1mega.train.evaluate import eval_sampling, judge_config

    with RewardComputer(judge_config(cfg.reward, sources)) as judge:
        results = run_benchmarks(engine, judge, loaded, req.k, eval_sampling(cfg, tokenizer), tokenizer,
                                 cfg.reward.math_timeout_s)
    report = write_benchmark_report(Path(req.out), results, _meta(cfg, req, tokenizer, t0))
    return {**report, "report": req.out}
