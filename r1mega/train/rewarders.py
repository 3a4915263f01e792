"""The trainer's reward computer: rule terms plus model terms, with a rollout engine started for each
generative judge (rewards are handed their engines; they never start one)."""

from __future__ import annotations

from typing import Optional

from r1mega.config.schema import RewardConfig
from r1mega.rewards import RewardComputer


class TrainingRewarder(RewardComputer):
    """``RewardComputer`` over ``reward`` that owns its judges' engines: ``close()`` stops them too."""

    def __init__(self, reward: RewardConfig, max_response_length: Optional[int] = None):
        from r1mega.rollout.judges import judge_engines

        self.judge_engines = judge_engines(reward)
        try:
            super().__init__(reward, max_response_length, engines=self.judge_engines)
        except BaseException:
            self._stop_engines()
            raise

    def _stop_engines(self) -> None:
        engines, self.judge_engines = self.judge_engines, {}
        for engine in engines.values():
            engine.close()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stop_engines()
