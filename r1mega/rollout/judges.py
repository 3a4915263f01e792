"""Rollout engines that serve generative judges (``reward.models`` of kind ``judge``).

Rewards never start engines: the trainer starts one per judge here and hands them to
``RewardComputer(engines=...)``, and stops them when the run ends.
"""

from __future__ import annotations

import logging
from typing import Any

from r1mega.config.errors import ConfigError
from r1mega.config.schema import RewardConfig

log = logging.getLogger(__name__)


def judge_engines(reward: RewardConfig) -> dict[str, Any]:
    """A vLLM engine process per judge that a reward term uses, started from its ``path`` (greedy
    verdicts: processed log-probs, seed 0). The caller owns the engines and must ``close()`` them."""
    used = {t.name for t in reward.terms}
    judges = [(i, m) for i, m in enumerate(reward.models) if m.kind == "judge" and m.name in used]
    missing = [f"reward.models[{i}] (judge {m.name!r}) has no path: set it to the HF model directory that "
               f"serves the judge" for i, m in judges if not m.path]
    if missing:
        raise ConfigError(missing)
    from r1mega.rollout.vllm_engine import EngineProcess

    engines: dict[str, Any] = {}
    try:
        for _, m in judges:
            log.info("starting a vLLM engine for judge %r from %s", m.name, m.path)
            engines[m.name] = EngineProcess(m.path, seed=0, max_model_len=None, logprobs_mode="processed")
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    return engines
