"""The `expect:` block: final metrics checked against the bounds a recipe states."""

from __future__ import annotations

from dataclasses import dataclass

from llmtune.recipe import Bound


@dataclass
class Check:
    """One expected metric and what the run reached."""

    metric: str
    value: float | None
    bound: Bound

    @property
    def ok(self) -> bool:
        """Within the bound (a missing metric never is)."""
        if self.value is None:
            return False
        return (self.bound.min is None or self.value >= self.bound.min) and (
            self.bound.max is None or self.value <= self.bound.max
        )


def check_expectations(metrics: dict[str, float], expect: dict[str, Bound]) -> list[Check]:
    """One `Check` per expected metric, in the recipe's order."""
    return [Check(name, metrics.get(name), bound) for name, bound in expect.items()]


def format_checks(checks: list[Check]) -> str:
    """The comparison as a plain-text table."""
    rows = [("metric", "value", "expected", "result")]
    for c in checks:
        want = " and ".join(
            part
            for part in (
                f">= {c.bound.min:g}" if c.bound.min is not None else "",
                f"<= {c.bound.max:g}" if c.bound.max is not None else "",
            )
            if part
        )
        rows.append((c.metric, "missing" if c.value is None else f"{c.value:.4f}", want, "ok" if c.ok else "MISSED"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
