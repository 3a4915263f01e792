"""Distillation: the top-k forward-KL term (hand-computed values, and inside the SFT learner step, packed and
padded), resumable teacher generation (interrupted + rerun == uninterrupted), the tokenizer check, and the
`distill` stage/config plumbing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from r1mega.rl.distill_loss import topk_forward_kl

LN = math.log


def test_topk_forward_kl_matches_a_hand_computed_value():
    # teacher q = [.5, .3, .1, .05, .05] keeps its top-2 ids; the student gives them p = [.4, .2]
    teacher = torch.tensor([[LN(0.5), LN(0.3)]])
    student = torch.tensor([[LN(0.4), LN(0.2)]], requires_grad=True)
    # .5 ln(.5/.4) + .3 ln(.3/.2) + tail .2 ln(.2/.4)
    expected = 0.5 * LN(0.5 / 0.4) + 0.3 * LN(0.3 / 0.2) + 0.2 * LN(0.2 / 0.4)
    assert expected == pytest.approx(0.0945819, abs=1e-6)
    kl = topk_forward_kl(student, teacher)
    assert kl.shape == (1,) and kl.item() == pytest.approx(expected, abs=1e-6)
    # d KL / d log p_i = -q_i + q_tail * p_i / p_tail
    kl.sum().backward()
    want = [-0.5 + 0.2 * 0.4 / 0.4, -0.3 + 0.2 * 0.2 / 0.4]
    assert student.grad[0].tolist() == pytest.approx(want, abs=1e-5)
    # a position with fewer entries pads with -inf: the missing id counts for neither side
    padded = topk_forward_kl(torch.tensor([[LN(0.4), LN(0.2), -3.0]]), torch.tensor([[LN(0.5), LN(0.3), -math.inf]]))
    assert padded.item() == pytest.approx(expected, abs=1e-6)
    # equal coarsened distributions: 0; a student that matches only after renormalising still pays the tail
    assert topk_forward_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert topk_forward_kl(torch.tensor([[LN(0.625), LN(0.375)]]) - 0.0, teacher).item() > 0.1


def _teacher_topk(tokens: torch.Tensor, vocab: int, k: int, seed: int = 0):
    """Teacher top-k ids/log-probs at every label position of ``tokens`` from a random distribution."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens.size(0), tokens.size(1) - 1, vocab, generator=gen) * 2
    logp = logits.log_softmax(-1)
    top = logp.topk(k, dim=-1)
    return top.indices, top.values


@pytest.mark.timeout(120)
def test_sft_step_adds_the_distillation_kl_padded_and_packed(single_process_megatron):
    from r1mega.config.presets import resolve_model
    from r1mega.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from r1mega.rl.learner import LearnerBatch, LearnerSettings, learner_step
    from r1mega.train.model_setup import build_training_model

    model = resolve_model(ModelConfig(preset="qwen3"))
    tm = build_training_model(model, ParallelConfig(), OptimizerConfig(lr=1e-3), total_steps=2)
    vocab = model.vocab_size
    tokens = torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([9, 6])
    mask = torch.zeros(2, 8)
    mask[0, 3:8], mask[1, 2:5] = 1, 1  # response positions (row 1 is 6 tokens long)
    ids, logp = _teacher_topk(tokens, vocab, 3)
    logp[0, 4, 2] = -math.inf  # one position with only 2 stored entries
    batch = LearnerBatch(tokens, mask, lengths=lengths, teacher_ids=ids, teacher_logp=logp)

    # the reference, from full logits: token-mean over response tokens of NLL + coef * KL
    with torch.no_grad():
        positions = torch.arange(8).unsqueeze(0).expand(2, 8)
        full = tm.module(tokens[:, :-1].contiguous(), positions, None)[..., :vocab].float().log_softmax(-1)
    nll = -full.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    kl = topk_forward_kl(full.gather(-1, ids), logp)
    coef = 0.5
    want_nll = float((nll * mask).sum() / mask.sum())
    want = float(((nll + coef * kl) * mask).sum() / mask.sum())
    assert float((kl * mask).sum()) > 0

    for pack in (False, True):
        s = LearnerSettings(micro_batch_size=2, valid_vocab=vocab, pack=pack, distill_coef=coef)
        got = learner_step(tm, batch, s, None, forward_only=True).values
        assert got["loss"] == pytest.approx(want, rel=1e-4), pack
        assert got["nll"] == pytest.approx(want_nll, rel=1e-4)
        assert got["distill_kl"] == pytest.approx(float((kl * mask).sum() / mask.sum()), rel=1e-4)
    plain = learner_step(tm, batch, LearnerSettings(micro_batch_size=2, valid_vocab=vocab), None, forward_only=True)
    assert plain.values["loss"] == pytest.approx(want_nll, rel=1e-4) and "distill_kl" not in plain.values
    with pytest.raises(ValueError, match="needs LearnerBatch.teacher_ids"):
        learner_step(tm, LearnerBatch(tokens, mask), LearnerSettings(2, vocab, distill_coef=1.0), None,
                     forward_only=True)


class _SeededEngine:
    """Samples depend only on each prompt's seed (as vLLM's per-request seeds): a pure function of it."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, sampling):
        from r1mega.rollout import Generation

        self.calls.append((len(prompts), sampling.seed))
        rows = []
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(sampling.seed + i)
            row = []
            for j in range(n):
                ids = torch.randint(3, 50, (4,), generator=g).tolist() + [0]
                top = [[t, 1] for t in ids]
                row.append(Generation(i, j, list(p), ids, "", [0.0] * 5, "stop", top_ids=top,
                                      top_logprobs=[[-0.1, -2.5]] * 5))
            rows.append(row)
        return rows


def _store(root, prompts, chunk=3):
    from r1mega.rollout import SamplingSpec
    from r1mega.train.teacher_gen import GenerationStore, store_settings

    sampling = SamplingSpec(seed=7, top_logprobs=2)
    return GenerationStore(root, store_settings("teacher", 2, sampling, chunk, prompts)), sampling


def test_interrupted_generation_resumes_to_the_same_dataset(tmp_path):
    from r1mega.train.teacher_gen import generate_resumable

    prompts = [[1, 10 + i] for i in range(8)]  # 3 chunks of 3, 3, 2 prompts
    decode = lambda ids: ",".join(map(str, ids))  # noqa: E731

    def run(root, max_chunks, engine):
        store, sampling = _store(root, prompts)
        return generate_resumable(engine, prompts, 2, sampling, store, 3, decode, 0, max_chunks=max_chunks)

    full_engine = _SeededEngine()
    assert run(tmp_path / "full", 0, full_engine)
    assert full_engine.calls == [(3, 7), (3, 10), (2, 13)]  # prompt i samples with seed 7 + i
    engine = _SeededEngine()
    assert not run(tmp_path / "cut", 1, engine)  # stops after one chunk
    shard = tmp_path / "cut" / "generations.jsonl"
    with open(shard, "a") as f:
        f.write('{"index": 3, "partial')  # a kill while the second chunk was being written
    assert not run(tmp_path / "cut", 1, engine)
    assert run(tmp_path / "cut", 0, engine)
    assert engine.calls == [(3, 7), (3, 10), (2, 13)]  # every chunk generated once
    assert run(tmp_path / "cut", 0, engine) and len(engine.calls) == 3  # complete: nothing left to do
    assert shard.read_bytes() == (tmp_path / "full" / "generations.jsonl").read_bytes()
    records = [json.loads(x) for x in shard.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(8))  # no duplicates, in order
    g = records[0]["generations"][0]
    assert g["text"] == decode(g["token_ids"][:-1]) and g["teacher_top_ids"][0] == [g["token_ids"][0], 1]
    # other settings (here: another chunk size) must not resume this shard
    store, _ = _store(tmp_path / "cut", prompts, chunk=4)
    with pytest.raises(ValueError, match=r"other settings \(differing: \['chunk_prompts'\]\).*delete"):
        store.open()


def test_the_teacher_must_share_the_students_tokenizer(tmp_path):
    from r1mega.config import ConfigError
    from r1mega.data.tasks import synthetic_examples
    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.train.distill import check_same_tokenizer
    from r1mega.train.run_data import build_tokenizer
    from r1mega.train.sft import render

    examples = synthetic_examples("synthetic:addition:2", "train", 0)[:200]
    a = HFTokenizer(build_tokenizer(tmp_path / "a", examples, 300))
    same = HFTokenizer(build_tokenizer(tmp_path / "same", examples, 300))
    other = HFTokenizer(build_tokenizer(tmp_path / "b", examples, 280))
    probes = [render(e.prompt) for e in examples[:4]]
    check_same_tokenizer(a, same, probes, 512, "same")
    assert other.vocab_size == 280 and a.vocab_size > 280
    with pytest.raises(ConfigError, match=rf"the teacher's tokenizer \(b\) differs from the student's: vocab_size "
                                          rf"280 \(teacher\) vs {a.vocab_size} \(student\).*set data.tokenizer"):
        check_same_tokenizer(a, other, probes, 512, "b")
    with pytest.raises(ConfigError, match="raise model.vocab_size"):
        check_same_tokenizer(a, same, probes, 256, "same")


def test_distill_config_is_checked():
    from r1mega.config import ConfigError, load_config

    base = "configs/distill_tiny_cpu.yaml"
    cfg = load_config(base, world_size=1)
    assert [s.kind for s in cfg.stages] == ["distill"] and cfg.model.preset == "qwen3"
    with pytest.raises(ConfigError) as e:
        load_config(base, ["distill.teacher_hf=x", "distill.kl_coef=0.5", "distill.top_logprobs=0",
                           "distill.chunk_prompts=0", "rollout.seed=null"], world_size=1)
    msg = str(e.value)
    for phrase in ("needs exactly one teacher", "> 0 needs distill.top_logprobs >= 1", "distill.chunk_prompts=0",
                   "rollout.seed=null"):
        assert phrase in msg, phrase
    with pytest.raises(ConfigError, match="distill.teacher_checkpoint needs data.tokenizer"):
        load_config(base, ["data.tokenizer=null"], world_size=1)


class _ScriptedTeacher:
    """Stands in for the teacher's engine: R1-formatted worked solutions, right or wrong by the prompt's seed."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def generate(self, prompts, n, sampling):
        import re

        from r1mega.rollout import Generation
        from r1mega.train.sft import r1_completion

        self.calls.append(len(prompts))
        assert sampling.logprobs_mode == "raw" and sampling.top_logprobs == 5
        rows = []
        for i, p in enumerate(prompts):
            a, b = map(int, re.search(r"(\d+)\s*\+\s*(\d+)", self.tok.decode(p)).groups())
            g = torch.Generator().manual_seed(sampling.seed + i)
            row = []
            for j in range(n):
                answer = a + b + (0 if torch.rand((), generator=g) < 0.7 else 1)
                ids = self.tok.encode(r1_completion(f"{a}+{b}=", str(answer))) + [self.tok.eos_id]
                top = [[t, *(((t + 1 + k) % 250) for k in range(4))] for t in ids]
                lps = [[-0.1, -3.0, -4.0, -5.0, -6.0]] * len(ids)
                row.append(Generation(i, j, list(p), ids, "", [-0.1] * len(ids), "stop", top_ids=top, top_logprobs=lps))
            rows.append(row)
        return rows

    def close(self):
        pass


@pytest.mark.timeout(240)
def test_distill_stage_interrupted_and_rerun_trains_the_student(tmp_path, monkeypatch):
    """The whole stage in-process with a scripted teacher engine: generation stops after one chunk
    (distill.max_chunks=1), the rerun continues it; the data equals an uninterrupted run's; the dense student
    trains on the kept samples with the KL term."""
    import r1mega.rollout
    from r1mega.config import load_config
    from r1mega.data.tasks import synthetic_examples
    from r1mega.data.tokenizer import HFTokenizer
    from r1mega.platform.distributed import shutdown
    from r1mega.train.recipe import run_recipe
    from r1mega.train.run_data import build_tokenizer
    from r1mega.train.teacher_gen import GenerationPaused

    teacher = build_tokenizer(tmp_path / "teacher", synthetic_examples("synthetic:addition:2", "train", 0), 512)
    (teacher / "config.json").write_text("{}")
    tok = HFTokenizer(teacher)
    engines = []
    monkeypatch.setattr(r1mega.rollout, "build_engine",
                        lambda *a, **k: engines.append(_ScriptedTeacher(tok)) or engines[-1])

    def config(out, *extra):
        return load_config("configs/distill_tiny_cpu.yaml", [
            f"distill.teacher_hf={teacher}", "distill.teacher_checkpoint=null", "distill.teacher_config=null",
            "data.tokenizer=null", "data.eval_path=null", f"trainer.output_dir={out}", "trainer.steps=3",
            "trainer.global_batch_size=8", "parallel.micro_batch_size=4", "distill.chunk_prompts=4",
            "model.num_layers=1", "logging.tensorboard=false",
            "stages=[{name: distill, kind: distill, samples_per_prompt: 3, max_per_prompt: 2, max_prompts: 10, "
            "min_language: 0.0}]", *extra], world_size=1)

    out = tmp_path / "cut"
    with pytest.raises(GenerationPaused, match="stopped after distill.max_chunks=1 chunk.*rerun the same command"):
        run_recipe(config(out, "distill.max_chunks=1"))
    shutdown()
    assert json.loads((out / "distill" / "teacher" / "manifest.json").read_text())["chunks_done"] == 1
    summary = run_recipe(config(out, "distill.max_chunks=0"))
    assert [e.calls for e in engines] == [[4], [4, 2]]  # 10 prompts in chunks of 4: each generated once
    full = tmp_path / "full"
    run_recipe(config(full))
    gens = (out / "distill" / "teacher" / "generations.jsonl").read_bytes()
    assert gens == (full / "distill" / "teacher" / "generations.jsonl").read_bytes()
    assert (out / "distill" / "sft.jsonl").read_bytes() == (full / "distill" / "sft.jsonl").read_bytes()

    info = summary["stages"]["distill"]
    assert info["report"]["prompts"] == 10 and info["report"]["generations"] == 30
    assert 0 < info["report"]["kept"] == info["examples"] <= 20
    assert info["report"]["dropped"]["incorrect"] > 0 and info["fingerprint_end"] != info["fingerprint_start"]
    records = [json.loads(x) for x in (out / "distill" / "sft.jsonl").read_text().splitlines()]
    rec = records[0]
    assert rec["messages"][-1]["role"] == "assistant" and rec["messages"][-1]["content"].startswith("<think>\n")
    assert len(rec["teacher_top_ids"]) == len(rec["token_ids"]) and rec["token_ids"][-1] == tok.eos_id
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in steps if r["stage"] == "sft"]
    assert len(sft) == 3 and all(r["distill_kl"] > 0 and r["loss"] > r["nll"] for r in sft)
    assert summary["final_checkpoint"].endswith("step_000003")
