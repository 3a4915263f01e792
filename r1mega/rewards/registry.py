"""Decorator registry of reward functions: a new reward is one function.

A reward function takes ``(sample: RewardInput, cfg: RewardConfig)`` and returns a float. It is
registered under a name that ``reward.terms`` refers to, with the data sources it scores by default
(``None``: every source). Functions must live at module level so worker processes can unpickle them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from r1mega.config.schema import RewardConfig
from r1mega.rewards.sample import RewardInput

RewardFn = Callable[[RewardInput, RewardConfig], float]


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: RewardFn
    data_sources: Optional[tuple[str, ...]]  # None: applies to every data source


_REGISTRY: dict[str, RewardSpec] = {}


def register_reward(name: str, data_sources: Optional[tuple[str, ...]] = None) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn`` as reward ``name``; ``data_sources`` is the default routing."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].fn.__module__}")
        _REGISTRY[name] = RewardSpec(name, fn, tuple(data_sources) if data_sources is not None else None)
        return fn

    return wrap


def get_reward(name: str) -> RewardSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}: registered rewards are {registered_rewards()}; "
                       f"register a new one with @register_reward({name!r})") from None


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)
