"""Rejection sampling (R1 stage 3): keep correct, formatted, language-consistent, unique generations."""

from __future__ import annotations

import json

import pytest

from r1mega.config.schema import RewardConfig
from r1mega.data import DataError, Example, load_examples
from r1mega.data.templates import get_template
from r1mega.rewards.rejection import main, read_generations, rejection_sample

MATH = Example(prompt="What is 1/2 + 1/4?", answer="3/4", id="m1")
COUNTDOWN = Example(prompt="Make 24 from 3, 8", answer="24", data_source="countdown", meta={"numbers": [3, 8]})
GENERATIONS = [
    (MATH, [
        "<think>Add the fractions with a common denominator</think><answer>\\frac{3}{4}</answer>",  # kept
        "<think>Add the   fractions with a common denominator</think><answer>\\frac{3}{4}</answer>",  # duplicate
        "<think>Convert to decimals and add</think><answer>0.75</answer>",  # kept
        "<think>Just guess</think><answer>1</answer>",  # incorrect
        "Add them: \\boxed{3/4}",  # bad format (no think block)
        "<think>先通分 then add the fractions</think><answer>3/4</answer>",  # mixed language
        "<think>Common denominator is four</think><answer>3/4</answer>",  # over the cap of 2
    ]),
    (COUNTDOWN, ["<think>Multiply them</think><answer>3*8</answer>", "<think>Add them</think><answer>3+8</answer>"]),
    (Example(prompt="Tell a joke", answer="?", data_source="chat"), ["<think>hmm</think><answer>no</answer>"]),
]


def test_filters_and_report(tmp_path):
    out = tmp_path / "sft.jsonl"
    report = rejection_sample(GENERATIONS, out, max_per_prompt=2, min_language=0.95)
    assert report.as_dict() == {
        "prompts": 3, "generations": 10, "kept": 3,
        "dropped": {"unverifiable": 1, "incorrect": 2, "bad_format": 1, "mixed_language": 1, "too_long": 0,
                    "duplicate": 1, "over_cap": 1},
        "prompts_without_kept": 1,
    }
    sft = load_examples(out)  # the output is a valid dataset: chat records with the reference kept
    assert [e.data_source for e in sft] == ["math", "math", "countdown"]
    assert sft[0].id == "m1" and sft[0].answer == "3/4"
    assert sft[0].chat()[0] == {"role": "user", "content": MATH.prompt}
    assert sft[1].chat()[-1]["content"].endswith("<answer>0.75</answer>")
    assert sft[2].meta["numbers"] == [3, 8]
    prompt, completion = get_template("r1_zero").render_sft(sft[0].chat())
    assert prompt.endswith("Assistant:") and completion.startswith(" <think>")


def test_response_prefix_is_restored(tmp_path):
    out = tmp_path / "sft.jsonl"
    generations = [(MATH, ["Add the fractions</think><answer>3/4</answer>"])]
    assert rejection_sample(generations, out).kept == 0  # without the prefilled tag the format fails
    assert rejection_sample(generations, out, response_prefix="<think>\n").kept == 1
    assert load_examples(out)[0].chat()[-1]["content"].startswith("<think>\nAdd")


@pytest.mark.timeout(120)
def test_jsonl_in_jsonl_out_with_workers(tmp_path, capsys):
    src = tmp_path / "gens.jsonl"
    src.write_text("\n".join(json.dumps({**e.to_record(), "generations": g}) for e, g in GENERATIONS) + "\n")
    assert [len(g) for _, g in read_generations(src)] == [7, 2, 1]
    out = tmp_path / "sft.jsonl"
    main([str(src), str(out), "--max-per-prompt", "2", "--workers", "2"])
    assert json.loads(capsys.readouterr().out)["kept"] == 3
    assert len(load_examples(out)) == 3
    report = rejection_sample(read_generations(src), out, reward_cfg=RewardConfig(num_workers=0), max_per_prompt=1)
    assert report.kept == 2 and report.dropped["over_cap"] == 2


def test_bad_generations_field_names_the_line(tmp_path):
    src = tmp_path / "gens.jsonl"
    src.write_text(json.dumps({"prompt": "q", "answer": "1", "generations": ["a"]}) + "\n"
                   + json.dumps({"prompt": "q", "answer": "1", "generations": "a"}) + "\n")
    with pytest.raises(DataError, match=f"{src}:2: field 'generations'"):
        list(read_generations(src))


def test_dict_generations_keep_their_fields_and_the_length_cap_drops(tmp_path):
    out = tmp_path / "sft.jsonl"
    good = "<think>\nAdd the fractions</think><answer>3/4</answer>"
    generations = [(MATH, [{"text": good, "token_ids": [5] * 9, "teacher_top_ids": [[1, 2]]},
                           {"text": good + " ", "token_ids": [5] * 8, "teacher_top_ids": [[3, 4]]}])]
    report = rejection_sample(generations, out, max_response_tokens=8)
    assert report.kept == 1 and report.dropped["too_long"] == 1
    record = json.loads(out.read_text())
    assert record["token_ids"] == [5] * 8 and record["teacher_top_ids"] == [[3, 4]]  # the short one, its own fields
    with pytest.raises(ValueError, match="needs each generation as a dict with its 'token_ids'"):
        rejection_sample([(MATH, [good])], out, max_response_tokens=8)
