"""Reward registry and combiner: routing by data source, weights, failure isolation, the worker pool."""

from __future__ import annotations

import os
import time

import pytest

from r1mega.config import ConfigError, load_config
from r1mega.config.schema import RewardConfig, RewardTermConfig
from r1mega.rewards import RewardComputer, RewardInput, register_reward, registered_rewards, summarize


@register_reward("test_length", data_sources=("chat",))
def length_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    return min(1.0, len(sample.response) / 10)


@register_reward("test_explode")
def explode_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    if "explode" in sample.response:
        raise RuntimeError("bad sample")
    return 1.0


@register_reward("test_kill_worker")
def kill_worker_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    if "die" in sample.response:
        os._exit(3)  # simulates a worker killed by the OOM killer or a native crash
    return 1.0


@register_reward("test_hang")
def hang_reward(sample: RewardInput, cfg: RewardConfig) -> float:
    if "hang" in sample.response:
        time.sleep(60)
    return 1.0


GOOD = "<think>one half</think><answer>\\frac{1}{2}</answer>"
SAMPLES = [
    RewardInput(GOOD, "0.5", "math"),
    RewardInput("<think>x</think><answer>0.4</answer>", "0.5", "math"),
    RewardInput("<think>try</think><answer>3*8</answer>", "24", "countdown", meta={"numbers": [3, 8]}),
    RewardInput("<think>add</think><answer>```python\nprint(sum(map(int, input().split())))\n```</answer>",
                data_source="code", tests=[{"input": "1 2", "output": "3"}]),
    RewardInput("hello there, friend", data_source="chat"),
]
TERMS = [RewardTermConfig("accuracy", 1.0), RewardTermConfig("format", 0.5), RewardTermConfig("countdown", 2.0),
         RewardTermConfig("code", 1.0), RewardTermConfig("test_length", 0.25)]


def test_routing_and_weighted_totals():
    with RewardComputer(RewardConfig(terms=TERMS, num_workers=0)) as rc:
        math_ok, math_bad, countdown, code, chat = rc.compute(SAMPLES)
        assert rc.terms_for("math") == ["accuracy", "format"]
        assert rc.terms_for("code") == ["format", "code"]
        assert rc.terms_for("unknown") == ["format"]
    assert math_ok.terms == {"accuracy": 1.0, "format": 1.0} and math_ok.total == pytest.approx(1.5)
    assert math_bad.terms == {"accuracy": 0.0, "format": 1.0} and math_bad.total == pytest.approx(0.5)
    assert countdown.terms == {"format": 1.0, "countdown": 1.0} and countdown.total == pytest.approx(2.5)
    assert code.terms == {"format": 1.0, "code": 1.0} and code.total == pytest.approx(1.5)
    assert chat.terms == {"format": 0.0, "test_length": 1.0} and chat.total == pytest.approx(0.25)
    assert [r.data_source for r in (math_ok, countdown, code, chat)] == ["math", "countdown", "code", "chat"]


def test_term_data_sources_override_the_default_routing():
    cfg = RewardConfig(terms=[RewardTermConfig("accuracy", 1.0, ["gsm8k"])], num_workers=0)
    with RewardComputer(cfg) as rc:
        assert rc.terms_for("math") == [] and rc.terms_for("gsm8k") == ["accuracy"]
        result = rc.score(RewardInput("\\boxed{3}", "3", "gsm8k"))
    assert result.total == 1.0


def test_failing_term_scores_zero_and_keeps_the_others():
    cfg = RewardConfig(terms=[RewardTermConfig("test_explode", 1.0), RewardTermConfig("format", 1.0)], num_workers=0)
    with RewardComputer(cfg) as rc:
        bad, good = rc.compute([RewardInput("<think>explode</think><answer>1</answer>"), RewardInput(GOOD)])
    assert bad.terms == {"test_explode": 0.0, "format": 1.0} and bad.total == 1.0
    assert "RuntimeError: bad sample" in bad.errors["test_explode"]
    assert good.total == 2.0 and not good.errors


def test_overlong_uses_the_rollout_length_when_unset():
    cfg = RewardConfig(terms=[RewardTermConfig("overlong", 1.0)], overlong_buffer=10, num_workers=0)
    with RewardComputer(cfg, max_response_length=100) as rc:
        assert rc.score(RewardInput("x", response_length=95)).total == pytest.approx(-0.5)


def test_config_errors_list_every_problem():
    cfg = RewardConfig(terms=[RewardTermConfig("acuracy", 1.0)], format_mode="loose", target_language="xx")
    with pytest.raises(ConfigError) as info:
        RewardComputer(cfg)
    message = str(info.value)
    assert "acuracy" in message and "accuracy" in message and "format_mode" in message and "xx" in message


def test_new_reward_fields_load_from_yaml_overrides():
    cfg = load_config(overrides=["reward.format_mode=partial", "reward.sandbox.wall_timeout_s=2.5",
                                 "reward.terms=[{name: code, weight: 1, data_sources: [leetcode]}]"])
    assert cfg.reward.format_mode == "partial" and cfg.reward.sandbox.wall_timeout_s == 2.5
    assert cfg.reward.terms[0].data_sources == ["leetcode"]
    assert "test_length" in registered_rewards()


@pytest.mark.timeout(120)
def test_pool_matches_serial_and_survives_dead_and_hung_workers():
    samples = SAMPLES * 4
    with RewardComputer(RewardConfig(terms=TERMS, num_workers=0)) as rc:
        serial = rc.compute(samples)
    with RewardComputer(RewardConfig(terms=TERMS, num_workers=2)) as rc:
        pooled = rc.compute(samples)
    assert [(r.total, r.terms) for r in pooled] == [(r.total, r.terms) for r in serial]

    terms = [RewardTermConfig("test_kill_worker", 1.0), RewardTermConfig("test_hang", 1.0)]
    with RewardComputer(RewardConfig(terms=terms, num_workers=2, batch_timeout_s=3.0)) as rc:
        died = rc.compute([RewardInput("ok")] * 3 + [RewardInput("die")])
        assert all(r.total == 0.0 and "_batch" in r.errors for r in died[3:])
        assert rc.compute([RewardInput("ok")] * 4)[0].total == 2.0  # a fresh pool after the crash
        t0 = time.monotonic()
        hung = rc.compute([RewardInput("ok"), RewardInput("hang")])
        assert time.monotonic() - t0 < 20
        assert hung[1].total == 0.0 and hung[1].errors["_batch"] == "timeout"
        assert [r.total for r in rc.compute([RewardInput("ok")] * 2)] == [2.0, 2.0]


def test_summarize_metrics():
    with RewardComputer(RewardConfig(terms=TERMS, num_workers=0)) as rc:
        metrics = summarize(rc.compute(SAMPLES))
    assert metrics["reward/accuracy"] == 0.5
    assert metrics["reward/format"] == pytest.approx(0.8)
    assert metrics["reward/source/countdown"] == pytest.approx(2.5)
    assert metrics["reward/errors"] == 0.0
    assert summarize([]) == {}
