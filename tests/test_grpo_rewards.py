"""GRPO rewards see the whole example: a code problem is scored on its tests, a countdown problem on
its numbers, and model rewards get the user's question (``sample_and_score`` with real reward terms)."""

from __future__ import annotations

import pytest

from r1mega.config.schema import RewardConfig, RewardTermConfig
from r1mega.data import Example, load_tokenizer
from r1mega.data.tokenizer_training import demo_corpus, train_hf_bpe
from r1mega.rewards import RewardComputer
from r1mega.rollout import Generation, SamplingSpec
from r1mega.train.evaluate import make_problems
from r1mega.train.grpo import Prompt
from r1mega.train.schedules import sample_and_score

CODE = Example(prompt="Read two integers and print their sum.", tests=[{"input": "1 2", "output": "3"},
                                                                         {"input": "5 7", "output": "12"}],
               data_source="code")
COUNTDOWN = Example(prompt="Use 3, 8 and 2 once each to make 22.", answer="22", data_source="countdown",
                    meta={"numbers": [3, 8, 2]})
RESPONSES = [  # per prompt, n=2: a right and a wrong response (the prompt prefilled "<think>\n")
    ["add</think>\n<answer>```python\nprint(sum(map(int, input().split())))\n```</answer>",
     "multiply</think>\n<answer>```python\na, b = map(int, input().split())\nprint(a * b)\n```</answer>"],
    ["3*8-2</think>\n<answer>3*8-2</answer>", "8*2+3</think>\n<answer>8*2+3</answer>"],
]


class _ScriptedEngine:
    """Answers prompt ``i``'s samples with ``responses[i]`` (encoded, EOS-terminated)."""

    def __init__(self, tokenizer, responses: list[list[str]]):
        self.tokenizer, self.responses = tokenizer, responses

    def generate(self, prompts, n, sampling):
        out = []
        for i, ids in enumerate(prompts):
            row = []
            for j in range(n):
                text = self.responses[i][j]
                tokens = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
                row.append(Generation(i, j, list(ids), tokens, text, [0.0] * len(tokens), "stop"))
            out.append(row)
        return out


class _Recording:
    """A rewarder that keeps what it was asked to score."""

    def __init__(self, inner: RewardComputer):
        self.inner, self.samples = inner, []

    def compute(self, samples):
        self.samples += samples
        return self.inner.compute(samples)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(train_hf_bpe(demo_corpus(200, seed=0), tmp_path_factory.mktemp("tok") / "hf",
                                       vocab_size=400))


def test_rewards_see_tests_meta_and_question(tokenizer):
    prompts = [Prompt.of(p.example, p.text, p.ids) for p in make_problems([CODE, COUNTDOWN], tokenizer, "r1")]
    cfg = RewardConfig(terms=[RewardTermConfig("code", 1.0), RewardTermConfig("countdown", 1.0)], num_workers=0)
    with RewardComputer(cfg) as rc:
        rewarder = _Recording(rc)
        gens, rewards, _, _, errors = sample_and_score(_ScriptedEngine(tokenizer, RESPONSES), rewarder, prompts, 2,
                                                       SamplingSpec(), tokenizer, step=1)
    assert [tokenizer.decode(g.token_ids[:-1]) for g in gens] == [r for row in RESPONSES for r in row]
    assert errors == 0
    assert rewards == [1.0, 0.0, 1.0, 0.0]  # code: passes its tests / fails them; countdown: 3*8-2=22 / 19
    code, _, countdown, _ = rewarder.samples
    assert code.tests == CODE.tests and countdown.meta["numbers"] == [3, 8, 2]
    assert (code.question, countdown.question) == (CODE.prompt, COUNTDOWN.prompt)
    assert countdown.prompt == prompts[1].text and countdown.response_length == len(gens[2].token_ids)


def test_prompt_without_example_keeps_answer_only(tokenizer):
    """A bare prompt scores as before: answer and data source, nothing else (countdown cannot be judged)."""
    prompts = [Prompt(tokenizer.encode("make 22", add_bos=True), "make 22", "22", "countdown")]
    cfg = RewardConfig(terms=[RewardTermConfig("countdown", 1.0)], num_workers=0)
    with RewardComputer(cfg) as rc:
        rewarder = _Recording(rc)
        _, rewards, _, _, errors = sample_and_score(_ScriptedEngine(tokenizer, RESPONSES[1:]), rewarder, prompts, 1,
                                                    SamplingSpec(), tokenizer)
    assert rewards == [0.0] and errors == 1  # no "numbers": the countdown term fails and scores 0
    assert rewarder.samples[0].meta == {} and rewarder.samples[0].question is None
