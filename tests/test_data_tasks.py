"""Chat templates (R1-Zero verbatim) and the synthetic verifiable tasks with their splits."""

from __future__ import annotations

import pytest

from r1mega.data import load_examples, render_prompt
from r1mega.data.synthetic import (
    addition_problems,
    arithmetic_problems,
    countdown_problems,
    split_train_eval,
)
from r1mega.data.tasks import task_splits, write_task_splits
from r1mega.data.templates import R1_ZERO_TEMPLATE, get_template
from r1mega.rewards import check_countdown, math_equal

USER = [{"role": "user", "content": "What is 2+2?"}]


def test_r1_zero_template_is_the_papers():
    text = render_prompt(USER, "r1_zero")
    assert text.startswith("A conversation between User and Assistant. The user asks a question, and the "
                           "Assistant solves it.")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in text
    assert text.endswith("User: What is 2+2?. Assistant:")
    assert text == R1_ZERO_TEMPLATE.format(prompt="What is 2+2?")


def test_other_templates():
    assert render_prompt(USER, "r1") == "<｜User｜>What is 2+2?<｜Assistant｜><think>\n"
    assert render_prompt(USER, "chatml") == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(USER, "plain") == "What is 2+2?"
    prompt, completion = get_template("r1").render_sft(USER + [{"role": "assistant",
                                                                "content": "<think>\nadd</think><answer>4</answer>"}])
    assert prompt.endswith("<think>\n") and completion == "add</think><answer>4</answer><｜end▁of▁sentence｜>"
    with pytest.raises(ValueError, match="unknown chat template"):
        render_prompt(USER, "llama9")
    with pytest.raises(ValueError, match="end with a user message"):
        render_prompt(USER + [{"role": "assistant", "content": "4"}], "chatml")


def test_addition_keeps_its_behaviour():
    # the synthetic splits depend on these exact values for a seed
    assert addition_problems(3, 2, 0) == addition_problems(3, 2, 0)
    problems = addition_problems(50, 2, 5)
    assert all(int(p.answer) == eval(p.prompt[:-1]) for p in problems)
    train, held = split_train_eval(problems, 0.1)
    assert not {p.prompt for p in train} & {p.prompt for p in held}


def test_arithmetic_answers_are_exact():
    problems = arithmetic_problems(200, 3, seed=1, ops="+-*")
    assert {p.prompt[3] for p in problems} == {"+", "-", "*"}
    assert all(int(p.answer) == eval(p.prompt[:-1]) for p in problems)
    with pytest.raises(ValueError, match="ops"):
        arithmetic_problems(1, 2, 0, ops="/")


def test_countdown_problems_are_solvable_by_their_solution():
    problems = countdown_problems(200, seed=2, num_numbers=4)
    assert all(check_countdown(p.answer, list(p.numbers), p.target) for p in problems)
    assert all(1 <= p.target <= 100 and str(p.target) in p.prompt for p in problems)


@pytest.mark.parametrize("task", ["addition", "arithmetic", "countdown"])
def test_task_splits_round_trip_through_jsonl(tmp_path, task):
    train_path, eval_path = write_task_splits(task, tmp_path, count=120, seed=3, eval_fraction=0.25)
    train, held = load_examples(train_path), load_examples(eval_path)
    assert len(held) >= 20 and len(train) + len(held) <= 120
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    for e in train[:20]:
        if task == "countdown":
            assert check_countdown(e.meta["solution"], e.meta["numbers"], int(e.answer))
        else:
            assert math_equal(e.answer, e.answer)
    assert task_splits(task, 120, seed=3, eval_fraction=0.25)[1][0].prompt == held[0].prompt
