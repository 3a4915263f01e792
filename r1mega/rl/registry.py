"""A tiny named-function registry shared by the RL extension points (advantages, policy losses).

Why: a new estimator or loss is one decorated function chosen by name from the config
(verl's ``register_adv_est`` / ``register_policy_loss`` pattern, without the rest of verl).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Name -> function map; ``kind`` only appears in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, *names: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under every name in ``names`` (aliases share one function)."""

        def wrap(fn: F) -> F:
            for name in names:
                old = self._fns.get(name)
                if old is not None and old is not fn:
                    raise ValueError(f"{self.kind} {name!r} is already registered by {old.__module__}.{old.__name__}")
                self._fns[name] = fn
            return fn

        return wrap

    def get(self, name: str) -> F:
        try:
            return self._fns[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}: registered are {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: str) -> bool:
        return name in self._fns
