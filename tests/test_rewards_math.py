"""Accuracy reward: math-verify equivalence battery, answer extraction, and never raising on junk."""

from __future__ import annotations

import time

import pytest

from r1mega.config.schema import RewardConfig
from r1mega.rewards import RewardInput, final_answer, get_reward, last_boxed, math_equal, split_think

# (final answer as written by the model, reference answer, equivalent?)
EQUIVALENCE = [
    # fractions, decimals, percentages
    ("\\frac{1}{2}", "0.5", True),
    ("1/2", "\\frac12", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac34", "3/4", True),
    ("\\frac{6}{8}", "\\frac{3}{4}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("3/2", "1.5", True),
    ("0.3333333", "\\frac{1}{3}", True),
    ("50\\%", "\\frac{1}{2}", True),
    ("50%", "0.5", True),
    ("1,000", "1000", True),
    ("10.0", "10", True),
    ("-7", "-7", True),
    # symbolic
    ("x^2+2x+1", "(x+1)^2", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("2^{10}", "1024", True),
    ("\\infty", "\\infty", True),
    # equations vs values
    ("x=3", "3", True),
    ("3", "x = 3", True),
    ("y = 2x + 1", "2x+1", True),
    # sets, intervals, tuples
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{3, 2\\}", "\\{2, 3\\}", True),
    ("3, 4", "4, 3", True),
    ("Answer: 3, 4", "\\{3,4\\}", True),
    ("[1,2)", "[1,2)", True),
    ("x \\in [1, 2)", "[1,2)", True),
    ("(1, 2)", "(1,2)", True),
    ("(-\\infty, 0)", "(-\\infty,0)", True),
    ("\\left(\\frac{1}{2}, 3\\right)", "(1/2, 3)", True),
    # units, text, wrappers
    ("90^\\circ", "90", True),
    ("5 \\text{ cm}", "5", True),
    ("\\$5", "5", True),
    ("\\text{(B)}", "B", True),
    ("\\text{Monday}", "Monday", True),
    ("$\\frac{1}{2}$", "0.5", True),
    ("The answer is 42", "42", True),
    ("7 apples", "7", True),
    ("\\boxed{5}", "5", True),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", True),  # reference given as a boxed solution
    # wrong answers
    ("13", "12", False),
    ("-3", "3", False),
    ("0.51", "0.5", False),
    ("\\frac{1}{3}", "0.333", False),  # beyond the comparison's rounding
    ("1000", "100", False),
    ("x=4", "3", False),
    ("x^2+1", "(x+1)^2", False),
    ("\\sqrt{2}", "2", False),
    ("2\\pi", "\\pi", False),
    ("\\infty", "-\\infty", False),
    ("[1,2)", "(1,2]", False),
    ("(1,2)", "[1,2]", False),
    ("(2, 3)", "(3, 2)", False),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    ("12\\%", "0.13", False),
    ("\\text{Tuesday}", "Monday", False),
    # unparsable or empty: 0, never an exception
    ("five", "5", False),
    ("", "5", False),
    ("None", "5", False),
    ("I don't know", "5", False),
    ("\\frac{", "1", False),
    ("}{", "1", False),
    ("1+" * 1000 + "1", "1001", False),  # longer than any answer: rejected before parsing
]


def test_battery_is_large_and_balanced():
    assert len(EQUIVALENCE) >= 40
    assert sum(ok for *_, ok in EQUIVALENCE) >= 20 and sum(not ok for *_, ok in EQUIVALENCE) >= 20


@pytest.mark.parametrize("answer,reference,expected", EQUIVALENCE, ids=[f"{i}" for i in range(len(EQUIVALENCE))])
def test_math_equivalence(answer, reference, expected):
    assert math_equal(answer, reference) is expected


def test_integer_answers_get_math_verifys_verdict_without_parsing(monkeypatch):
    """Plain integers on both sides are compared as integers, skipping math-verify's parse (about 1 ms a sample):
    the verdicts equal math-verify's own, and anything else (spaces, decimals, LaTeX) still goes through it."""
    import random

    from r1mega.rewards import accuracy

    rng = random.Random(0)
    pairs = [(a, b) for a, b in [("41", "42"), ("042", "42"), ("+7", "7"), ("-0", "0"), ("-5", "5"), ("7", "-7"),
                                 ("123456789012345678", "123456789012345678"), ("10", "1"), ("0", "00")]]
    pairs += [(str(rng.randint(-200, 200)), str(rng.randint(-200, 200))) for _ in range(60)]
    pairs += [(str(v), str(v).zfill(4)) for v in rng.sample(range(100), 5)]

    def verify(answer: str, reference: str) -> bool:  # math-verify's verdict on the same normalised texts
        mv = accuracy._mv()
        gold = accuracy._parse(accuracy._normalise(reference), 5)
        return bool(mv.verify(gold, accuracy._parse(accuracy._normalise(answer), 5)))

    parses = []
    real_parse = accuracy._parse
    monkeypatch.setattr(accuracy, "_parse", lambda answer, t: parses.append(answer) or real_parse(answer, t))
    accuracy._parse_reference.cache_clear()
    for answer, reference in pairs:
        accuracy._parse_reference(reference, 5)  # the reference is parsed once per run (cached)
        parses.clear()
        got = math_equal(answer, reference)
        assert parses == [], f"{answer!r} was parsed"
        assert got is verify(answer, reference), (answer, reference)
    for answer, reference in [("4 2", "8"), ("0.50", "0.5"), ("\\frac{84}{2}", "42")]:  # not plain integers
        parses.clear()
        got = math_equal(answer, reference)
        assert answer in parses
        assert got is verify(answer, reference), (answer, reference)
    accuracy._parse_reference.cache_clear()


ACCURACY = get_reward("accuracy").fn
CFG = RewardConfig()


@pytest.mark.parametrize("response,expected", [
    ("<think>half of one</think><answer>\\frac{1}{2}</answer>", 1.0),
    ("<think>...</think><answer>The result is $\\boxed{0.5}$.</answer>", 1.0),
    ("<think>...</think> So the final answer is \\boxed{\\frac{1}{2}}.", 1.0),
    ("<think>maybe \\boxed{3}</think> no wait, \\boxed{1/2}", 1.0),  # last box after the reasoning
    ("<think>...</think><answer>1/3</answer>", 0.0),
    ("<think>I think it is \\boxed{0.5} but let me keep going", 0.0),  # reasoning never closed
    ("\\boxed{0.5}", 1.0),  # no template at all: the box still counts (format is another term)
    ("0.5", 1.0),  # a bare short reply is an answer
    ("a long reply that rambles on\nover several lines and never gives 0.5 as a final answer", 0.0),
    ("", 0.0),
    ("<answer></answer>", 0.0),
    ("\\boxed{", 0.0),
    ("\x00\x01 ｆｕｌｌｗｉｄｔｈ \udcff", 0.0),
])
def test_accuracy_reward_extracts_the_final_answer(response, expected):
    assert ACCURACY(RewardInput(response, "\\frac{1}{2}"), CFG) == expected


def test_prefilled_think_tag_is_put_back():
    sample = RewardInput("reasoning here</think><answer>4</answer>", "4", prompt="Q<｜Assistant｜><think>\n")
    assert ACCURACY(sample, CFG) == 1.0


def test_missing_reference_raises_for_the_registry_to_record():
    with pytest.raises(ValueError, match="reference"):
        ACCURACY(RewardInput("<answer>1</answer>", None), CFG)


def test_extraction_helpers():
    assert last_boxed("a \\boxed{x} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed{unclosed") is None
    assert split_think("<think>a</think>b") == ("a", "b")
    assert split_think("<think>a") == ("a", None)
    assert split_think("plain") == (None, "plain")
    assert final_answer("<think>x</think><answer>\\boxed{7} or so</answer>") == "7"


@pytest.mark.timeout(30)
def test_pathological_expression_times_out_to_zero():
    t0 = time.monotonic()
    assert math_equal("10^{10^{10}}", "1", timeout_s=1) is False
    assert time.monotonic() - t0 < 10
