"""Multi-stage recipes (`r1mega train`): stage list validation, and a tiny SFT -> GRPO recipe on CPU whose
second stage starts from the first stage's final weights; a rerun skips finished stages; `r1mega eval
--checkpoint` evaluates the result."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from r1mega.config import ConfigError, check_stage_list, load_config, stage_config

TINY = "configs/r1_tiny_cpu.yaml"
TWO_STAGES = "stages=[{name: cold_start_sft, kind: sft, steps: 3, lr: 0.002}, {name: rl, kind: grpo, steps: 2}]"
SMALL = ["eval.max_prompts=4", "eval.k=2", "trainer.global_batch_size=16", "rollout.n=4", "rollout.max_new_tokens=16",
         "parallel.micro_batch_size=8", "trainer.eval_interval=1"]


def _problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, list(overrides), world_size=1)
    return str(e.value)


def test_recipes_load_and_stage_configs_apply_their_settings():
    cfg = load_config(TINY, world_size=1)
    assert [(s.name, s.kind) for s in cfg.stages] == [
        ("cold_start_sft", "sft"), ("reasoning_rl", "grpo"), ("rejection_sampling", "rejection_sampling"),
        ("sft", "sft"), ("all_scenario_rl", "grpo")]
    sft = stage_config(cfg, cfg.stages[0], 1)
    assert sft.trainer.steps == 150 and sft.optimizer.lr == pytest.approx(2e-3) and sft.stages == []
    assert stage_config(cfg, cfg.stages[1]).optimizer.lr == pytest.approx(1e-4)  # default: optimizer.lr
    cfg = load_config(TINY, ["stages=[{name: rl, kind: grpo, overrides: ['rollout.n=2', 'rl.kl_coef=0.001']}]"])
    rl = stage_config(cfg, cfg.stages[0])
    assert rl.rollout.n == 2 and rl.rl.kl_coef == pytest.approx(0.001) and cfg.rollout.n == 8
    zero = load_config("configs/r1_zero_qwen3_30b_a3b.yaml", world_size=32)
    assert [s.kind for s in zero.stages] == ["grpo"] and zero.data.chat_template == "r1_zero"


def test_bad_stage_lists_are_refused_with_the_fix():
    msg = _problems("stages=[{name: a, kind: dpo}, {name: a, kind: sft, steps: 0}]")
    kinds = "['sft', 'grpo', 'rejection_sampling', 'distill']"
    assert f"stages[0].kind='dpo' is not supported: choose one of {kinds}" in msg
    assert "stages[1].name='a' is used twice" in msg and "stages[1].steps=0 must be >= 1" in msg
    msg = _problems("stages=[{name: x, kind: grpo, overrides: ['model.num_layers=3']}]")
    assert "changes 'model', which all stages share" in msg
    assert "did you mean 'rollout.n'" in _problems("stages=[{name: x, kind: grpo, overrides: ['rollout.nn=2']}]")
    assert "unknown key 'stepz'" in _problems("stages=[{name: x, kind: grpo, stepz: 2}]")
    msg = _problems("data.train_path=null", "stages=[{name: x, kind: sft}, {name: y, kind: rejection_sampling, "
                    "data: a.jsonl}, {name: z, kind: sft}]")
    assert "stages[0] (sft) has no data" in msg and "stages[2]" not in msg  # z trains on y's output
    with pytest.raises(ConfigError, match="the config has no stages"):
        check_stage_list(load_config(TINY, ["stages=[]"]))


def _train(out, *extra: str, timeout: float = 280) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1mega.cli", "train", "--config", TINY, f"trainer.output_dir={out}",
                           TWO_STAGES, *SMALL, *extra], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    pytest.importorskip("vllm")
    out = tmp_path_factory.mktemp("recipe") / "run"
    proc = _train(out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return out, proc


@pytest.mark.timeout(300)
def test_two_stage_recipe_second_stage_starts_from_the_first(two_stage_run):
    out, proc = two_stage_run
    summary = json.loads((out / "summary.json").read_text())
    sft, rl = summary["stages"]["cold_start_sft"], summary["stages"]["rl"]
    assert sft["from"] is None and rl["from"] == sft["checkpoint"] and sft["checkpoint"].endswith("step_000003")
    assert rl["fingerprint_start"] == sft["fingerprint_end"]  # stage 2 loaded stage 1's final weights ...
    assert rl["fingerprint_start"] != sft["fingerprint_start"]  # ... not a fresh init (same seed)
    assert rl["fingerprint_end"] != rl["fingerprint_start"]  # and trained
    assert summary["final_checkpoint"] == rl["checkpoint"] and summary["steps"] == {"cold_start_sft": 3, "rl": 2}
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    sft_loss = [r["loss"] for r in recs if r["stage"] == "sft"]
    assert len(sft_loss) == 3 and all(r["stage_name"] == "cold_start_sft" for r in recs if r["stage"] == "sft")
    grpo = [r for r in recs if r["stage"] == "grpo"]
    assert [r["global_step"] for r in grpo] == [4, 5] and all(r["logprob_mismatch"] < 1e-3 for r in grpo)
    evals = [r["when"] for r in recs if r["stage"] == "eval"]
    assert evals == ["before_cold_start_sft", "after_cold_start_sft", "rl", "rl", "after_rl"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG" and summary["plot"] == str(out / "curves.png")
    assert (out / "config.yaml").is_file() and list((out / "tensorboard").iterdir())
    assert "train: stages cold_start_sft (3 steps), rl (2 steps)" in proc.stdout


@pytest.mark.timeout(300)
def test_rerun_skips_finished_stages(two_stage_run):
    out, _ = two_stage_run
    before = (out / "metrics.jsonl").read_text()
    proc = _train(out, timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stage cold_start_sft already done" in proc.stderr and "stage rl already done" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == {"cold_start_sft": 3, "rl": 2}  # from the earlier records


@pytest.mark.slow  # the eval CLI itself runs in CI (test_evaluate); this adds reading a recipe's checkpoint
@pytest.mark.timeout(300)
def test_eval_a_recipe_checkpoint(two_stage_run):
    out, _ = two_stage_run
    report_path = out / "eval_final.json"
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "eval", "--config", TINY, "--checkpoint",
                           str(out / "checkpoints" / "rl"), "--k", "2", "--out", str(report_path),
                           f"data.tokenizer={out / 'tokenizer'}", "eval.max_prompts=4", "rollout.max_new_tokens=16"],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    report = json.loads(report_path.read_text())
    assert report["problems"] == 4 and report["k"] == 2 and report["data"] == "synthetic:addition:2"
    # same weights, data, sampling and seed as the recipe's last eval -> the same numbers
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["when"] == "after_rl"
    for key in ("eval/pass@1", "eval/format", "eval/response_len"):
        assert report[key] == pytest.approx(last[key]), key


class _Tok:
    """Token ids are indices into a table of texts (what the fake engine 'generates')."""

    eos_id, pad_id, bos_id = 0, 0, 1

    def __init__(self):
        self.texts: list[str] = ["<eos>"]

    def encode(self, text, add_bos=False):
        return [1, 2, 3]

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def test_rejection_sampling_stage_writes_the_next_sft_stage_data(tmp_path):
    from r1mega.config import LoggingConfig, StageConfig
    from r1mega.rollout import Generation
    from r1mega.train.metrics import MetricsLogger
    from r1mega.train.run_data import stage_examples
    from r1mega.train.sft import chat_pair, r1_completion, render
    from r1mega.train.stages import rejection_stage

    examples = stage_examples("synthetic:addition:2", 0)[:3]
    tok = _Tok()
    # prompt 0: the same correct reply twice (a duplicate); prompt 1: one correct; prompt 2: wrong and unformatted
    replies = [[r1_completion(examples[0].prompt, examples[0].answer)] * 2,
               ["bad", r1_completion(examples[1].prompt, examples[1].answer)],
               ["x</think>\n<answer>0</answer>", "no think"]]

    class Engine:
        def generate(self, prompts, n, sampling):
            assert n == 2 and sampling.stop_token_ids == [0]
            out = []
            for i, row in enumerate(replies):
                gens = []
                for j, text in enumerate(row):
                    tok.texts.append(text)
                    gens.append(Generation(i, j, [1], [len(tok.texts) - 1, 0], text, [0.0, 0.0]))
                out.append(gens)
            return out

    cfg = load_config(TINY)
    metrics = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), progress=False)
    class Sync:  # an engine that already holds the policy's weights (rank 0's: the first)
        first = Engine()

        def ensure(self, tm, what):
            pass

    r = SimpleNamespace(sync=Sync(), tokenizer=tok, out=tmp_path, rank=0, metrics=metrics, rejection_output=None,
                        tm=None)
    stage = StageConfig("rs", "rejection_sampling", samples_per_prompt=2, max_per_prompt=1, max_prompts=3,
                        min_language=0.0)
    info = rejection_stage(r, stage, cfg, None)
    assert info["report"]["kept"] == 2 and info["report"]["prompts_without_kept"] == 1
    assert info["report"]["dropped"]["duplicate"] == 1 and info["report"]["dropped"]["incorrect"] == 3
    assert r.rejection_output == info["sft_data"] == str(tmp_path / "rs" / "sft.jsonl")
    # the next sft stage (no data of its own) trains on exactly the demo's prompt -> worked-solution pairs
    from r1mega.data import load_examples

    pairs = [chat_pair(e.chat(), "r1") for e in load_examples(r.rejection_output)]
    assert pairs == [(render(e.prompt), r1_completion(e.prompt, e.answer)) for e in examples[:2]]
    logged = [x for x in metrics.records if x["stage"] == "rejection_sampling"]
    assert logged[0]["kept"] == 2 and logged[0]["dropped/bad_format"] == 0
    replies[0] = replies[1] = ["wrong"] * 2
    with pytest.raises(RuntimeError, match="kept 0 of 6 generations"):
        rejection_stage(r, StageConfig("rs2", "rejection_sampling", samples_per_prompt=2, max_prompts=3), cfg, None)
