"""Benchmark eval formats: MATH-500/AIME, GPQA and code loaders on fixture files, multiple-choice letter
extraction, and one report (JSON + markdown) whose pass@1 / cons@k are checked against hand-computed values
with a scripted engine (the real-engine path is covered by test_evaluate.py's CLI test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1mega.config import BenchmarkConfig, ConfigError, load_config
from r1mega.config.schema import RewardConfig
from r1mega.data import DataError
from r1mega.data.benchmarks import INSTRUCTIONS, load_benchmark, parse_benchmarks
from r1mega.rewards import RewardComputer, RewardInput
from r1mega.rewards.choice import extract_choice
from r1mega.train.bench_eval import (
    load_benchmarks,
    markdown_table,
    render_problems,
    run_benchmarks,
    write_benchmark_report,
)
from r1mega.train.eval_run import EvalRequest, resolve
from r1mega.train.evaluate import judge_config

# --------------------------------------------------------------------------- fixtures (written by the tests)

MATH500 = [
    {"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "... $\\boxed{\\frac{3}{4}}$",
     "answer": "\\frac{3}{4}", "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Solve $x+1=3$.", "solution": "$x=\\boxed{2}$", "answer": "2", "subject": "Algebra", "level": 1,
     "unique_id": "test/algebra/7.json"},
]
AIME = [{"id": 60, "question": "Find the remainder of 1033 divided by 1000.", "answer": 33, "year": 2024},
        {"id": 61, "question": "Compute 12*17.", "answer": 204, "year": 2024}]
GPQA = [
    {"Record ID": "rec1", "Question": "Which particle carries the electromagnetic force?",
     "Correct Answer": " photon\n", "Incorrect Answer 1": "gluon", "Incorrect Answer 2": "W boson",
     "Incorrect Answer 3": "graviton", "Subdomain": "Physics"},
    {"Record ID": "rec2", "Question": "What is the pH of pure water at 25 C?", "Correct Answer": "7",
     "Incorrect Answer 1": "0", "Incorrect Answer 2": "1", "Incorrect Answer 3": "14", "Subdomain": "Chemistry"},
]
CODE = [
    {"task_id": "mbpp/1", "text": "Write a function add(a, b) that returns a + b.",
     "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]},
    {"id": "io/1", "prompt": "Read an integer n from stdin and print 2*n.",
     "tests": [{"input": "2\n", "output": "4\n"}, {"input": "5\n", "output": "10\n"}]},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def bench_files(tmp_path):
    return {"math500": write_jsonl(tmp_path / "math500.jsonl", MATH500),
            "aime": _write_json(tmp_path / "aime.json", AIME),
            "gpqa": write_jsonl(tmp_path / "gpqa.jsonl", GPQA),
            "code": write_jsonl(tmp_path / "code.jsonl", CODE)}


def _write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


# --------------------------------------------------------------------------- letter extraction


@pytest.mark.parametrize("response, letter", [
    ("<think>x</think>\n<answer>C</answer>", "C"),
    ("<think>x</think>\n<answer>(C)</answer>", "C"),
    ("<think>x</think>\n<answer>\\boxed{C}</answer>", "C"),
    ("<think>x</think> Answer: C", "C"),
    ("<think>x</think> the answer is C", "C"),
    ("<think>x</think> The answer is (C).", "C"),
    ("<think>x</think> **Answer: D**", "D"),
    ("<think>x</think> $\\boxed{\\text{B}}$", "B"),
    ("<think>x</think> C) 42 kelvin", "C"),
    ("<think>x</think> B. photon", "B"),
    ("Reasoning over\nseveral lines.\nThe correct option is (B).\nDone.", "B"),  # no tags: last marker
    ("<think>A is tempting</think>\nthe answer is A, no wait:\nAnswer: D", "D"),  # the last marker wins
    # malformed: no letter, so wrong
    ("<think>the answer is C but I keep thinking", None),  # reasoning never closed
    ("<think>x</think> A or B", None),
    ("<think>x</think> the answer is (A) or (B)", None),
    ("<think>x</think> A, C", None),
    ("<think>x</think> Carbon", None),
    ("<think>x</think> E", None),  # not one of A-D
    ("<think>x</think> the answer is a guess", None),  # lower-case prose is not a letter
    ("<think>x</think> <answer></answer>", None),
    ("", None),
])
def test_extract_choice(response, letter):
    assert extract_choice(response) == letter


def test_choice_reward_uses_the_problems_letters():
    five = {"choices": {c: c.lower() for c in "ABCDE"}}
    samples = [RewardInput("<think>x</think> E", "E", "multiple_choice", meta=five),
               RewardInput("<think>x</think> E", "E", "multiple_choice"),  # without choices only A-D are letters
               RewardInput("<think>x</think> D", "E", "multiple_choice", meta=five),
               RewardInput("<think>x</think> A", "photon", "multiple_choice")]
    with RewardComputer(judge_config(RewardConfig(num_workers=0), {"multiple_choice"})) as judge:
        assert judge.terms_for("multiple_choice") == ["choice", "format"]
        results = judge.compute(samples)
    assert [r.terms["choice"] for r in results] == [1.0, 0.0, 0.0, 0.0]
    assert "one letter" in results[3].errors["choice"]


# --------------------------------------------------------------------------- loaders


def test_loaders_read_the_public_layouts(bench_files):
    kind, math = load_benchmark(BenchmarkConfig("math500", str(bench_files["math500"])))
    assert kind == "math" and [e.answer for e in math] == ["\\frac{3}{4}", "2"]
    assert math[0].prompt == MATH500[0]["problem"] + "\n\n" + INSTRUCTIONS["math"]
    assert math[0].data_source == "math" and math[0].id == "test/prealgebra/1.json"
    assert math[0].meta == {"subject": "Prealgebra", "level": 2}
    assert math[1].where == f"{bench_files['math500']}:2"

    kind, aime = load_benchmark(BenchmarkConfig("aime", str(bench_files["aime"]), instruction=""))
    assert kind == "math" and [e.answer for e in aime] == ["33", "204"]  # integers become text
    assert aime[0].prompt == AIME[0]["question"] and aime[1].id == "61"
    assert aime[1].where == f"{bench_files['aime']}#2"

    kind, gpqa = load_benchmark(BenchmarkConfig("gpqa", str(bench_files["gpqa"]), kind="choice"))
    assert kind == "choice" and all(e.data_source == "multiple_choice" for e in gpqa)
    for e, rec in zip(gpqa, GPQA):
        choices = e.meta["choices"]
        assert sorted(choices) == ["A", "B", "C", "D"]
        assert choices[e.answer] == rec["Correct Answer"].strip()  # the recorded letter holds the right answer
        assert sorted(choices.values()) == sorted(v.strip() for k, v in rec.items() if "Answer" in k)
        for letter, text in choices.items():
            assert f"\n{letter}) {text}\n" in e.prompt + "\n"
    # deterministic: same seed, same letters (also for a subset); another seed reorders
    again = load_benchmark(BenchmarkConfig("gpqa", str(bench_files["gpqa"]), max_problems=1))[1]
    assert again[0].meta["choices"] == gpqa[0].meta["choices"] and again[0].prompt == gpqa[0].prompt
    orders = {tuple(load_benchmark(BenchmarkConfig("g", str(bench_files["gpqa"]), seed=s))[1][0].meta["choices"]
                    .values()) for s in range(6)}
    assert len(orders) > 1

    kind, code = load_benchmark(BenchmarkConfig("code", str(bench_files["code"])))
    assert kind == "code" and [e.id for e in code] == ["mbpp/1", "io/1"]
    assert code[0].tests == [{"assert": "assert add(1, 2) == 3"}, {"assert": "assert add(-1, 1) == 0"}]
    assert code[1].tests == CODE[1]["tests"] and code[0].prompt.startswith(CODE[0]["text"])


def test_other_code_and_choice_layouts(tmp_path):
    apps = write_jsonl(tmp_path / "apps.jsonl", [{"question": "echo", "input_output": json.dumps(
        {"inputs": ["a\n", ["b", "c"]], "outputs": ["a\n", ["b", "c"]]})}])
    assert load_benchmark(BenchmarkConfig("apps", str(apps)))[1][0].tests == [
        {"input": "a\n", "output": "a\n"}, {"input": "b\nc", "output": "b\nc"}]
    humaneval = write_jsonl(tmp_path / "he.jsonl", [{"task_id": "HumanEval/0", "prompt": "def f(x):\n",
                                                     "test": "def check(c):\n    assert c(1) == 2",
                                                     "entry_point": "f"}])
    assert load_benchmark(BenchmarkConfig("he", str(humaneval)))[1][0].tests == [
        {"assert": "def check(c):\n    assert c(1) == 2\n\ncheck(f)"}]
    lettered = _write_json(tmp_path / "mc.json", {"data": [
        {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1},
        {"question": "Sky?", "options": {"A": "blue", "B": "green"}, "answer": "a"}]})
    _, mc = load_benchmark(BenchmarkConfig("mc", str(lettered)))
    assert [e.answer for e in mc] == ["B", "A"] and mc[0].meta["choices"] == {"A": "3", "B": "4", "C": "5"}
    assert mc[0].prompt.startswith("2+2?\n\nA) 3\nB) 4\nC) 5\n\n")


@pytest.mark.parametrize("records, kind, match", [
    ([{"problem": "1+1"}], "math", r"math500.jsonl:1: missing field 'answer'.*MATH-500/AIME"),
    ([{"answer": "2"}], "math", r":1: missing the problem: none of the fields \['problem', 'question'"),
    ([{"Question": "q", "Correct Answer": "x", "Incorrect Answer 1": "y", "Incorrect Answer 2": "z"}], "choice",
     r":1: missing field 'Incorrect Answer 3'; a GPQA record looks like"),
    ([{"question": "q", "choices": ["x", "y"], "answer": "C"}], "choice", r"'answer' must be one of the letters"),
    ([{"prompt": "p", "tests": [{"stdin": "1"}]}], "code", r":1: tests\[0\] must have 'input' and 'output'"),
    ([{"prompt": "p", "input_output": {"fn_name": "f", "inputs": [], "outputs": []}}], "code", "not supported"),
    ([{"prompt": "p"}], "code", r"no tests; a code benchmark record looks like"),
    ([{"prompt": "p", "label": 1}], "auto", r":1: benchmark 'b': cannot tell the layout.*b=path:math\|choice\|code"),
])
def test_loader_errors_name_the_file_line_and_layout(tmp_path, records, kind, match):
    path = write_jsonl(tmp_path / "math500.jsonl", records)
    with pytest.raises(DataError, match=match):
        load_benchmark(BenchmarkConfig("b", str(path), kind=kind))


def test_json_errors_name_the_record(tmp_path):
    path = _write_json(tmp_path / "aime.json", [AIME[0], {"question": "q"}])
    with pytest.raises(DataError, match=r"aime.json: record 2: missing field 'answer'"):
        load_benchmark(BenchmarkConfig("aime", str(path)))
    (tmp_path / "bad.json").write_text('[{"a": 1},\n oops]')
    with pytest.raises(DataError, match=r"bad.json:2: invalid JSON"):
        load_benchmark(BenchmarkConfig("b", str(tmp_path / "bad.json")))
    with pytest.raises(DataError, match="does not exist"):
        load_benchmark(BenchmarkConfig("b", str(tmp_path / "missing.json")))


def test_benchmark_specs_and_request_resolution(tmp_path, bench_files):
    specs = parse_benchmarks("aime=data/aime.jsonl:math, gpqa=/x/a:b/gpqa.json ,lcb=c.jsonl:code")
    assert [(b.name, b.path, b.kind) for b in specs] == [("aime", "data/aime.jsonl", "math"),
                                                         ("gpqa", "/x/a:b/gpqa.json", "auto"),
                                                         ("lcb", "c.jsonl", "code")]
    with pytest.raises(ValueError, match="name=path"):
        parse_benchmarks("aime.jsonl")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    cfg = load_config()
    req = resolve(cfg, EvalRequest(hf=str(hf), benchmarks=f"aime={bench_files['aime']}"))
    assert req.data is None and [b.name for b in req.suite] == ["aime"]
    with pytest.raises(ConfigError) as e:
        resolve(cfg, EvalRequest(data="x.jsonl", hf=str(hf), benchmarks="a=x.jsonl,a=y.jsonl"))
    assert "both given" in str(e.value) and "--benchmarks[1].name='a' is used twice" in str(e.value)
    # eval.benchmarks in the config is the default set; --data replaces it
    cfg = load_config(overrides=[f"eval.benchmarks=[{{name: aime, path: {bench_files['aime']}, k: 8}}]"])
    assert resolve(cfg, EvalRequest(hf=str(hf))).suite[0].k == 8
    assert resolve(cfg, EvalRequest(hf=str(hf), data="x.jsonl")).suite == []
    with pytest.raises(ConfigError, match=r"eval.benchmarks\[0\].kind='mcq' is not supported"):
        load_config(overrides=["eval.benchmarks=[{name: g, path: g.json, kind: mcq}]"])


# --------------------------------------------------------------------------- scripted engine and the report


class CharTok:
    """Code points shifted by 3 (0 pad, 1 BOS, 2 EOS): any text round-trips."""

    eos_id = 2

    def encode(self, text, add_bos=False):
        return ([1] if add_bos else []) + [ord(c) + 3 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


class ScriptedEngine:
    """``generate`` returns the responses scripted for the problem whose text is in the prompt."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.tok, self.calls = script, CharTok(), []

    def generate(self, prompts, n, sampling):
        from r1mega.rollout.protocol import Generation

        self.calls.append((len(prompts), n))
        rows = []
        for i, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            (responses,) = [v for key, v in self.script.items() if key in text]
            assert len(responses) == n, f"scripted {len(responses)} responses, asked for {n}"
            rows.append([Generation(i, j, list(ids), self.tok.encode(r) + [2], r, [0.0] * (len(r) + 1), "stop")
                         for j, r in enumerate(responses)])
        return rows


def ans(text: str, think: str = "ok") -> str:
    return f"<think>{think}</think>\n<answer>{text}</answer>"


ADD_OK = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_HALF = "```python\ndef add(a, b):\n    return abs(a) + b\n```"  # passes add(1, 2), fails add(-1, 1)


def script_for(gpqa_examples) -> dict[str, list[str]]:
    g1, g2 = (e.answer for e in gpqa_examples)
    t1 = gpqa_examples[0].meta["choices"][g1]
    w1, w2 = ("ABCD"[("ABCD".index(g) + 1) % 4] for g in (g1, g2))
    return {
        # MATH-500, k=4. P1: right (0.75 = 3/4), right, wrong "1", wrong "1" -> pass 2/4; vote: {0.75, 3/4}
        # (equivalent) ties {1, 1} and was formed first -> right. P2: 2 right, "5" x2 wrong, unclosed
        # reasoning (no answer, bad format) -> pass 1/4; vote: "5" -> wrong.
        "frac{1}{2}": [ans("0.75"), ans("3/4"), ans("1"), ans("1")],
        "Solve $x+1=3$": [ans("2"), ans("5"), ans("5"), "<think>x is 2 but"],
        # AIME, k=2 (per-benchmark k). P1: "34" then "33": pass 1/2, 1-1 tie -> first ("34") -> wrong.
        # P2: both right.
        "remainder of 1033": [ans("34"), ans("33")],
        "12*17": [ans("204"), ans("\\boxed{204}")],
        # GPQA, k=3. Q1: wrong and untagged (format 0), right as "(C)", right as "C) photon" -> pass 2/3;
        # the vote is over letters, so the two right ones agree -> right (over raw text all three differ
        # and the first, wrong, would win). Q2: wrong, right, hedge "A or B" (no letter) -> pass 1/3,
        # 1-1 tie -> first (wrong).
        "electromagnetic force": [f"<think>ok</think>\nAnswer: {w1}", ans(f"({g1})"), ans(f"{g1}) {t1}")],
        "pH of pure water": [ans(w2), ans(f"The answer is ({g2})."), ans("A or B")],
        # code, k=2. add: all tests pass / one of two passes (wrong). io: both right.
        "add(a, b)": [ans(ADD_OK), ans(ADD_HALF)],
        "print 2*n": [ans("print(int(input()) * 2)"), ans("```python\nn = int(input())\nprint(n + n)\n```")],
    }


def test_report_pass1_and_consk_against_hand_computed_values(tmp_path, bench_files):
    benches = [BenchmarkConfig("math500", str(bench_files["math500"])),
               BenchmarkConfig("aime", str(bench_files["aime"]), k=2),
               BenchmarkConfig("gpqa", str(bench_files["gpqa"]), k=3),
               BenchmarkConfig("code", str(bench_files["code"]), kind="code", k=2)]
    loaded = load_benchmarks(benches)
    engine = ScriptedEngine(script_for(loaded[2].examples))
    with pytest.raises(ValueError, match="render_problems first"):
        run_benchmarks(engine, None, loaded, k=4, sampling=None, tokenizer=engine.tok)
    render_problems(loaded, engine.tok)
    sources = {e.data_source for b in loaded for e in b.examples}
    with RewardComputer(judge_config(RewardConfig(num_workers=0), sources)) as judge:
        results = run_benchmarks(engine, judge, loaded, k=4, sampling=None, tokenizer=engine.tok)
    assert engine.calls == [(2, 4), (2, 2), (2, 3), (2, 2)]
    report = write_benchmark_report(tmp_path / "bench.json", results, {"model": "scripted"})

    on_disk = json.loads((tmp_path / "bench.json").read_text())
    rows = on_disk["benchmarks"]
    assert list(rows) == ["math500", "aime", "gpqa", "code"] and on_disk["model"] == "scripted"
    expected = {  # name: (kind, k, pass@1, cons@k, format rate)
        "math500": ("math", 4, (2 / 4 + 1 / 4) / 2, 1 / 2, 7 / 8),
        "aime": ("math", 2, (1 / 2 + 1) / 2, 1 / 2, 1.0),
        "gpqa": ("choice", 3, (2 / 3 + 1 / 3) / 2, 1 / 2, 5 / 6),
        "code": ("code", 2, (1 / 2 + 1) / 2, None, 1.0),
    }
    script = script_for(loaded[2].examples)
    for (name, (kind, k, p1, cons, fmt)), bench in zip(expected.items(), loaded):
        row = rows[name]
        assert (row["kind"], row["k"], row["problems"]) == (kind, k, 2), name
        assert row["pass@1"] == pytest.approx(p1), name
        assert row["cons@k"] == (None if cons is None else pytest.approx(cons)), name
        assert row["format_rate"] == pytest.approx(fmt), name
        responses = [r for e in bench.examples for key, rs in script.items() if key in e.prompt for r in rs]
        assert row["response_len"] == pytest.approx(sum(len(r) + 1 for r in responses) / len(responses)), name
        samples = [json.loads(x) for x in open(row["samples_file"])]
        assert [len(s["samples"]) for s in samples] == [k, k]
    gpqa_samples = [json.loads(x) for x in open(rows["gpqa"]["samples_file"])]
    g1 = loaded[2].examples[0].answer
    assert [s["extracted"] for s in gpqa_samples[0]["samples"]][1:] == [g1, g1]
    assert gpqa_samples[1]["samples"][2]["extracted"] is None  # "A or B"

    md = (tmp_path / "bench.md").read_text()
    assert on_disk["markdown"] == str(tmp_path / "bench.md") and report["table"] == md
    lines = md.splitlines()
    assert lines[0].startswith("| benchmark | kind | problems | k | pass@1 | cons@k |")
    assert lines[2].startswith("| math500 | math | 2 | 4 | 0.375 | 0.500 | 0.875 |")
    assert lines[3].startswith("| aime | math | 2 | 2 | 0.750 | 0.500 | 1.000 |")
    assert lines[4].startswith("| gpqa | choice | 2 | 3 | 0.500 | 0.500 | 0.833 |")
    assert lines[5].startswith("| code | code | 2 | 2 | 0.750 | n/a | 1.000 |")
    assert "n/a for code" in md


def test_markdown_table_formats_missing_cons():
    row = {"kind": "code", "problems": 1, "k": 1, "pass@1": 1.0, "cons@k": None, "format_rate": 0.5,
           "response_len": 12.25}
    assert "| x | code | 1 | 1 | 1.000 | n/a | 0.500 | 12.2 |" in markdown_table({"x": row})


def test_eval_cli_with_benchmarks(tmp_path, bench_files, monkeypatch, capsys):
    """``r1mega eval --benchmarks``: flag parsing, one engine for all benchmarks, report + table printed."""
    import r1mega.rollout
    from r1mega import cli
    from r1mega.train import eval_run

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    gpqa = load_benchmark(BenchmarkConfig("gpqa", str(bench_files["gpqa"])))[1]
    engine = ScriptedEngine({k: v[:2] for k, v in script_for(gpqa).items()})
    monkeypatch.setattr(r1mega.rollout, "build_engine", lambda *a, **kw: engine)
    monkeypatch.setattr(eval_run, "_tokenizer", lambda cfg, model_dir: (engine.tok, model_dir))
    out = tmp_path / "report.json"
    spec = f"aime={bench_files['aime']},gpqa={bench_files['gpqa']}:choice,code={bench_files['code']}"
    rc = cli.main(["eval", "--config", "configs/demo_cpu.yaml", "--hf", str(hf), "--benchmarks", spec,
                   "--k", "2", "--out", str(out), "data.chat_template=r1",
                   "data.max_prompt_length=4096"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert report["k"] == 2 and list(report["benchmarks"]) == ["aime", "gpqa", "code"]
    assert report["benchmarks"]["aime"]["pass@1"] == pytest.approx(0.75)
    assert report["benchmarks"]["gpqa"]["pass@1"] == pytest.approx((0.5 + 0.5) / 2)
    assert (tmp_path / "report.md").read_text() in printed and "| code | code | 2 | 2 | 0.750 | n/a |" in printed
    assert engine.calls == [(2, 2), (2, 2), (2, 2)]
    # a too-long prompt fails before the engine starts
    monkeypatch.setattr(r1mega.rollout, "build_engine", lambda *a, **kw: pytest.fail("engine started"))
    rc = cli.main(["eval", "--config", "configs/demo_cpu.yaml", "--hf", str(hf), "--benchmarks", spec,
                   "data.max_prompt_length=64"])
    assert rc == 2 and "more than data.max_prompt_length=64" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"Question": "q"}])
    rc = cli.main(["eval", "--config", "configs/demo_cpu.yaml", "--hf", str(hf), "--benchmarks", f"g={bad}:choice"])
    assert rc == 2 and "bad.jsonl:1: missing field 'Correct Answer'" in capsys.readouterr().err
