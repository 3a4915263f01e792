"""Eval metrics (pass@1 over k samples, cons@k majority vote, format, length) against hand-computed values,
and `r1mega eval` end to end on a tiny HF model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from r1mega.config import ConfigError, load_config
from r1mega.config.schema import RewardConfig
from r1mega.data import DataError, Example
from r1mega.rewards import RewardComputer
from r1mega.rewards.accuracy import math_equal
from r1mega.train.eval_run import EvalRequest, resolve
from r1mega.train.evaluate import (
    EvalProblem,
    ScoredSample,
    cons_at_k,
    judge_config,
    load_eval_examples,
    majority_vote,
    pass_at_1,
    score_groups,
    summarize_eval,
)

EQUAL = lambda rep, a: math_equal(a, rep)  # noqa: E731


def S(answer, correct, fmt=1.0, length=10):
    return ScoredSample(float(correct), float(fmt), answer, length)


def test_pass_at_1_is_the_mean_over_problems_of_the_mean_over_samples():
    # problem 1: 3 of 4 right; problem 2: 0 of 4; problem 3: 1 of 2 -> (0.75 + 0 + 0.5) / 3
    assert pass_at_1([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0]]) == pytest.approx(1.25 / 3)
    # not the mean over all samples (4/10) when k differs
    assert pass_at_1([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0]]) != pytest.approx(0.4)
    with pytest.raises(ValueError):
        pass_at_1([[1], []])


def test_majority_vote_counts_equivalent_answers_and_breaks_ties_by_first_occurrence():
    assert majority_vote(["3", "4", "4", "3", "4"]) == 1  # "4" x3 wins; represented by sample 1
    assert majority_vote(["3", "4", "4", "3"]) == 0  # 2-2 tie: the class seen first ("3") wins
    assert majority_vote(["4", "3", "3", "4"]) == 0
    assert majority_vote([None, None, "7"]) == 2  # no answer does not vote
    assert majority_vote([None, " "]) is None
    # normalised text: "The answer is 12." == "12"
    assert majority_vote(["5", "The answer is 12.", "12"]) == 1
    # equivalence: 3/4 and 0.75 and \frac{3}{4} are one class of 3, beating "1" x2
    answers = ["1", "3/4", "1", "0.75", "\\frac{3}{4}"]
    assert majority_vote(answers) == 0  # by text only: "1" x2 beats three singletons
    assert majority_vote(answers, EQUAL) == 1


def test_cons_at_k_uses_the_voted_answer_correctness():
    groups = [
        [S("4", 1), S("5", 0), S("5", 0)],  # majority wrong although one sample is right
        [S("7", 1), S(None, 0), S("8", 0)],  # 1-1 tie: the first ("7") wins -> right
        [S(None, 0), S(None, 0)],  # no answer -> wrong
        [S("2", 1), S("2", 1), S("3", 0)],  # right
    ]
    assert cons_at_k(groups) == pytest.approx(2 / 4)
    assert pass_at_1([[s.correct for s in g] for g in groups]) == pytest.approx((1 / 3 + 1 / 3 + 0 + 2 / 3) / 4)


def test_summary_keys_values_and_per_source_breakdown():
    problems = [EvalProblem(Example(prompt="1+1", answer="2", data_source="arithmetic"), "p", [1]),
                EvalProblem(Example(prompt="x", answer="3/4", data_source="math"), "p", [1]),
                EvalProblem(Example(prompt="code", tests=[{"assert": "True"}], data_source="code"), "p", [1])]
    groups = [[S("2", 1, 1, 4), S("3", 0, 0, 6)],
              [S("0.75", 1, 1, 10), S("3/4", 1, 1, 20)],
              [S(None, 1, 1, 30), S(None, 0, 0, 50)]]
    out = summarize_eval(problems, groups)
    assert out["eval/pass@1"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert out["eval/cons@k"] == pytest.approx(1.0)  # code is not voted on; 1-1 tie -> "2" (right)
    assert out["eval/format"] == pytest.approx(4 / 6)
    assert out["eval/response_len"] == pytest.approx(120 / 6)
    assert out["eval/pass@1/math"] == 1.0 and out["eval/pass@1/code"] == 0.5
    only_code = summarize_eval(problems[2:], groups[2:])
    assert "eval/cons@k" not in only_code


def test_scoring_with_the_reward_judges():
    problems = [EvalProblem(Example(prompt="3/4?", answer="3/4", data_source="math"), "<｜Assistant｜><think>\n", [1])]
    responses = [[("a</think>\n<answer>0.75</answer>", 5), ("b</think> 1", 3), ("<answer>3/4</answer>", 4)]]
    with RewardComputer(judge_config(RewardConfig(num_workers=0), {"math"})) as judge:
        assert judge.terms_for("math") == ["accuracy", "format"]
        (scored,) = score_groups(judge, problems, responses)
    assert [s.correct for s in scored] == [1.0, 0.0, 0.0]  # the last one never closed its (prefilled) think
    assert [s.format for s in scored] == [1.0, 0.0, 0.0]
    assert [s.answer for s in scored] == ["0.75", "1", None]
    assert [s.length for s in scored] == [5, 3, 4]


def test_eval_sets_and_request_errors(tmp_path):
    examples = load_eval_examples("synthetic:addition:2", max_prompts=5)
    assert len(examples) == 5 and examples[0].prompt.count("+") == 1 and not examples[0].prompt.endswith("=")
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "answer": "x", "data_source": "chat"}) + "\n")
    with pytest.raises(DataError, match="no verifiable correctness reward"):
        load_eval_examples(str(bad))
    cfg = load_config()
    with pytest.raises(ConfigError) as e:
        resolve(cfg, EvalRequest())
    assert "--data" in str(e.value) and "--hf" in str(e.value)
    with pytest.raises(ConfigError, match="no config.json"):
        resolve(cfg, EvalRequest(data="x.jsonl", hf=str(tmp_path)))
    with pytest.raises(ConfigError, match="eval.k=0"):
        load_config(overrides=["eval.k=0"])


@pytest.mark.timeout(300)
def test_eval_cli_on_a_tiny_hf_model(tmp_path):
    pytest.importorskip("vllm")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from rollout_common import tiny_hf_dir

    hf = tiny_hf_dir(tmp_path / "hf", seed=0)
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "answer": str(2 * a), "data_source": "arithmetic"})
                            + "\n" for a in range(3)))
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "eval", "--config", "configs/demo_cpu.yaml",
                           "--data", str(data), "--hf", str(hf), "--k", "3", "--out", str(out),
                           "rollout.max_new_tokens=8", "rollout.max_model_len=256"],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]  # the in-process engine shuts down cleanly
    report = json.loads(out.read_text())
    assert report["k"] == 3 and report["problems"] == 3
    for key in ("eval/pass@1", "eval/cons@k", "eval/format", "eval/response_len"):
        assert 0.0 <= report[key] <= (8 if key == "eval/response_len" else 1.0)
    rows = [json.loads(x) for x in open(report["samples_file"])]
    assert [len(r["samples"]) for r in rows] == [3, 3, 3]
    assert report["eval/response_len"] == pytest.approx(sum(s["tokens"] for r in rows for s in r["samples"]) / 9)
    assert report["eval/pass@1"] == pytest.approx(sum(s["correct"] for r in rows for s in r["samples"]) / 9)
    assert "pass@1" in proc.stdout
