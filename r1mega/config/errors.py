"""The one exception type of ``r1mega.config``.

A bad run configuration should fail before any process group starts, and it should fail once with
every problem listed, so a user fixes the recipe in one edit instead of one relaunch per mistake.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """One or more configuration problems; each names what is wrong and what to change.

    Subclasses ``ValueError`` so callers that already catch bad-value errors keep working.
    """

    def __init__(self, problems: str | Iterable[str], source: str | None = None) -> None:
        items = [problems] if isinstance(problems, str) else list(problems)
        self.problems: list[str] = [p for p in items if p]
        self.source = source
        super().__init__(self._format())

    def _format(self) -> str:
        """Render a header plus one bullet per problem, so long lists stay readable in a log."""
        where = f" in {self.source}" if self.source else ""
        if len(self.problems) == 1:
            return f"invalid configuration{where}: {self.problems[0]}"
        lines = [f"invalid configuration{where}: {len(self.problems)} problems"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
