"""Distillation stage (``kind: distill``, ``r1mega distill``): teacher generations -> filter -> student SFT.

DeepSeek-R1 §2.4 distils the RL-trained model into small dense students by plain SFT on ~800k of its
filtered samples. Here: the teacher (an HF directory, or an r1mega checkpoint of any preset exported
once to ``<out>/<stage>/teacher_hf``) is served by its own rollout engine and samples
``samples_per_prompt`` responses per prompt, resumably (``train/teacher_gen.py``:
``<out>/<stage>/teacher/``); the rejection filter shared with the rejection-sampling stage keeps the
correct, well-formatted, language-consistent, unique ones up to ``distill.max_response_tokens``
(``<out>/<stage>/sft.jsonl``: R1-template chat records that also carry the token ids and the
teacher's top-k log-probs); the student (this recipe's ``model``) trains on exactly those token ids,
packed, with the optional forward KL to the teacher's top-k (``rl/distill_loss.py``). The teacher
engine returns *raw* log-probs (temperature 1): the KL target is the teacher's distribution, not the
sampling temperature's. The student must use the teacher's tokenizer (checked on the prompts).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from r1mega.config import ConfigError, R1Config, StageConfig
from r1mega.train.stages import filter_to_sft, load_weights, stage_problems
from r1mega.train.teacher_gen import GenerationPaused, GenerationStore, generate_resumable, store_settings

log = logging.getLogger(__name__)


def check_same_tokenizer(student, teacher, probes: list[str], student_vocab: int, where: str) -> None:
    """Raise ``ConfigError`` unless ``teacher`` tokenizes like ``student`` (sizes, specials, the probe texts)."""
    problems = []
    for name in ("vocab_size", "bos_id", "eos_id", "pad_id"):
        a, b = getattr(student, name, None), getattr(teacher, name, None)
        if a != b:
            problems.append(f"{name} {b} (teacher) vs {a} (student)")
    for text in probes:
        if not problems and student.encode(text, add_bos=True) != teacher.encode(text, add_bos=True):
            problems.append(f"different ids for {text[-50:]!r}")
    if problems:
        raise ConfigError(f"the teacher's tokenizer ({where}) differs from the student's: {'; '.join(problems)}. "
                          f"Distillation needs one tokenizer: set data.tokenizer to the teacher's (or leave it unset "
                          f"with distill.teacher_hf) and model.vocab_size >= its size")
    if teacher.vocab_size > student_vocab:
        raise ConfigError(f"the teacher's tokenizer has {teacher.vocab_size} tokens but the student's "
                          f"model.vocab_size={student_vocab}: raise model.vocab_size")


def teacher_model_dir(tr, scfg: R1Config, stage_dir: Path) -> Path:
    """The teacher as an HF directory: ``distill.teacher_hf``, or the checkpoint exported once (collective)."""
    d = scfg.distill
    if d.teacher_hf:
        path = Path(d.teacher_hf)
        if not (path / "config.json").is_file():
            raise ConfigError(f"distill.teacher_hf={path}: no config.json there; give a Hugging Face model directory "
                              f"(or use distill.teacher_checkpoint for an r1mega checkpoint)")
        return path
    out = stage_dir / "teacher_hf"
    if (out / "config.json").is_file():  # exported by an earlier (interrupted) run of this stage
        return out
    from r1mega.bridge.convert import checkpoint_model_config
    from r1mega.bridge.hf_dir import save_hf
    from r1mega.config import load_config, resolve_model
    from r1mega.train.model_setup import build_training_model

    model_cfg = resolve_model(load_config(d.teacher_config).model if d.teacher_config
                              else checkpoint_model_config(d.teacher_checkpoint))
    teacher = build_training_model(model_cfg, scfg.parallel, scfg.optimizer, total_steps=1)
    load_weights(teacher, d.teacher_checkpoint, model_cfg)
    tmp = stage_dir / "teacher_hf.tmp"
    if tr.rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    save_hf(teacher.module, teacher.config, model_cfg, tmp, tokenizer_dir=tr.tok_dir)
    if tr.rank == 0:
        os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return out


def teacher_sampling(scfg: R1Config, tok):
    """The rollout section's sampling, raw (temperature-1) log-probs, the teacher's top-k if distilling logits."""
    from r1mega.rollout import SamplingSpec

    return SamplingSpec.from_config(scfg.rollout, stop_token_ids=[tok.eos_id], logprobs_mode="raw",
                                    top_logprobs=scfg.distill.top_logprobs)


def _teacher_generate(tr, stage: StageConfig, scfg: R1Config, teacher_dir: Path, problems, store) -> tuple:
    """Rank 0: start the teacher's engine, evaluate it once, generate the missing chunks. -> (complete, eval)."""
    from r1mega.rollout import build_engine, engine_env
    from r1mega.train.evaluate import eval_sampling, generate_and_score

    d, tok = scfg.distill, tr.tokenizer
    engine = build_engine(teacher_dir, replace(scfg.rollout, logprobs_mode="raw"), in_process=False,
                          env=engine_env(tr.out, scfg.rollout))
    try:
        saved, teacher_eval = store.root / "teacher_eval.json", {}
        if saved.exists():  # evaluated by an earlier (interrupted) run
            teacher_eval = json.loads(saved.read_text())
        elif d.eval_teacher and tr.eval_set is not None:
            sampling = replace(eval_sampling(scfg, tok), logprobs_mode="raw")
            teacher_eval = generate_and_score(engine, tr.judge, tr.eval_set, scfg.eval.k, sampling, tok,
                                              scfg.reward.math_timeout_s)[0]
            store.root.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(teacher_eval, indent=1))
        complete = generate_resumable(engine, [p.ids for p in problems], stage.samples_per_prompt,
                                      teacher_sampling(scfg, tok), store, d.chunk_prompts, tok.decode, tok.eos_id,
                                      max_chunks=d.max_chunks)
    finally:
        engine.close()
    return complete, teacher_eval


def distill_rows(path: Path, pad_id: int, seq_length: int, multiple: int, valid_vocab: int, with_teacher: bool):
    """SFT rows from the kept records' own token ids (prompt as the teacher saw it + its response)."""
    from r1mega.data.jsonl import read_jsonl
    from r1mega.train.sft import rows_from_ids

    seqs, teacher, names = [], [], []
    for line, rec in read_jsonl(path):
        seqs.append((rec["prompt_token_ids"], rec["token_ids"]))
        names.append(f"{path}:{line}")
        if with_teacher:
            teacher.append((rec["teacher_top_ids"], rec["teacher_top_logprobs"]))
            top = max((i for ids in rec["teacher_top_ids"] for i in ids), default=0)
            if top >= valid_vocab:
                raise ConfigError(f"{path}:{line}: teacher token id {top} >= the student's vocabulary "
                                  f"({valid_vocab}): the teacher's vocabulary is larger; raise model.vocab_size")
    return rows_from_ids(seqs, pad_id, seq_length, multiple, names, teacher if with_teacher else None)


def distill_stage(tr, stage: StageConfig, scfg: R1Config, resume) -> dict:
    """Teacher generation (resumable) -> rejection filter -> student SFT on the kept samples. Collective."""
    from r1mega.data.tokenizer import load_tokenizer
    from r1mega.platform.distributed import broadcast_from_rank0
    from r1mega.rl.learner import LearnerSettings
    from r1mega.train.sft import run_sft

    d = scfg.distill
    stage_dir = tr.out / stage.name
    problems = stage_problems(tr, stage, scfg)
    teacher_dir = teacher_model_dir(tr, scfg, stage_dir)
    if not (teacher_dir / "tokenizer.json").is_file():
        raise ConfigError(f"the teacher {teacher_dir} has no tokenizer.json: copy its tokenizer files there")
    check_same_tokenizer(tr.tokenizer, load_tokenizer(teacher_dir), [p.text for p in problems[:16]],
                         scfg.model.vocab_size, str(teacher_dir))
    teacher_name = str(d.teacher_hf or d.teacher_checkpoint)
    t0 = time.monotonic()
    result = store = None
    if tr.rank == 0:
        store = GenerationStore(stage_dir / "teacher", store_settings(
            teacher_name, stage.samples_per_prompt, teacher_sampling(scfg, tr.tokenizer), d.chunk_prompts,
            [p.ids for p in problems]))
        result = _teacher_generate(tr, stage, scfg, teacher_dir, problems, store)
    complete, teacher_eval = broadcast_from_rank0(result)
    if teacher_eval and resume is None:  # a resumed stage logged it before its checkpoint
        tr.metrics.log({"stage": "teacher_eval", "step": 0, **{f"teacher/{k.split('/', 1)[-1]}": v
                                                            for k, v in teacher_eval.items()}})
    if not complete:
        raise GenerationPaused(f"stage {stage.name!r}: teacher generation stopped after distill.max_chunks="
                               f"{d.max_chunks} chunk(s) as asked; what it wrote is kept in {stage_dir / 'teacher'}: "
                               f"rerun the same command to continue")
    gen_seconds = time.monotonic() - t0
    path = stage_dir / "sft.jsonl"

    def groups():  # rank 0
        return ((p.example, [{**g, "prompt_token_ids": rec["prompt_token_ids"]} for g in rec["generations"]])
                for p, rec in zip(problems, store.records()))

    saved = stage_dir / "filter_report.json"
    if resume is not None and saved.is_file():  # filtered (and logged) before the checkpoint this resumes
        report = json.loads(saved.read_text())
    else:
        report = filter_to_sft(tr, stage, scfg, groups, path, who="the teacher",
                               max_response_tokens=d.max_response_tokens)
        if tr.rank == 0:
            saved.write_text(json.dumps(report))
    tr.rejection_output = str(path)
    multiple = scfg.parallel.tp
    rows = distill_rows(path, tr.tokenizer.pad_id, scfg.model.seq_length, multiple, scfg.model.vocab_size,
                        with_teacher=d.kl_coef > 0)
    settings = LearnerSettings(micro_batch_size=scfg.parallel.micro_batch_size, valid_vocab=scfg.model.vocab_size,
                               pack=d.pack, distill_coef=d.kl_coef, skip_nonfinite=scfg.trainer.skip_nonfinite_loss)
    run_sft(tr.tm, rows, steps=scfg.trainer.steps, global_batch_size=scfg.trainer.global_batch_size,
            settings=settings, seed=scfg.data.seed, on_step=tr.metrics.log, ckpt=tr.ckpt, stage=stage.name,
            resume=resume)
    tr.sync.stale = True
    return {"data": stage.data or scfg.data.train_path, "teacher": teacher_name, "sft_data": str(path),
            "report": report, "examples": int(rows.tokens.size(0)), "generation_seconds": gen_seconds,
            **{f"teacher/{k.split('/', 1)[-1]}": v for k, v in teacher_eval.items()}}
