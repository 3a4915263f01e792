"""What a reward function sees (``RewardInput``) and what the registry returns (``RewardResult``).

Plain picklable dataclasses, so samples and results cross the worker-pool boundary cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RewardInput:
    """One generated response plus what is needed to judge it."""

    response: str
    reference: Optional[str] = None  # reference answer (math), target (countdown)
    data_source: str = "math"  # routes the sample to its reward terms
    prompt: str = ""  # the rendered prompt; a prompt ending in "<think>" means the tag was prefilled
    tests: Optional[list[dict]] = None  # code: [{"input", "output"}] or [{"assert"}]
    meta: dict[str, Any] = field(default_factory=dict)  # task extras, e.g. countdown "numbers"
    response_length: Optional[int] = None  # tokens; needed by the overlong term
    question: Optional[str] = None  # the user's request without chat template (model rewards; None = prompt)


@dataclass
class RewardResult:
    """The weighted total and each term's unweighted value (for metrics)."""

    total: float
    terms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # term -> why it scored 0 by failing
    data_source: str = "math"


def reward_input_from_example(example: Any, response: str, prompt: str = "",
                              response_length: Optional[int] = None) -> RewardInput:
    """Build a ``RewardInput`` from an ``r1mega.data.Example`` (duck-typed: no import cycle)."""
    return RewardInput(
        response=response,
        reference=example.answer,
        data_source=example.data_source,
        prompt=prompt,
        tests=example.tests,
        meta=dict(example.meta),
        response_length=response_length,
        question=_last_user_message(example),
    )


def _last_user_message(example: Any) -> Optional[str]:
    users = [m.get("content", "") for m in example.chat() if m.get("role") == "user"]
    return users[-1] if users else None
