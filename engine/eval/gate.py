"""Quality gates: conditions on a comparison's teacher-forced numbers, e.g. "kld<0.05" or
"kld<0.05,top1>0.9". A server started with a gate compares each variant against the model's
16-bit weights before it serves and refuses to start when a condition fails.

Metrics: kld (mean KL divergence, nats), kld_p99, top1 (top-1 agreement, 0-1), ppl_ratio
(perplexity B / A), rms_dp (RMS change of the true token's probability, 0-1).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from engine.errors import ConfigError

METRICS = {
    "kld": lambda t: t["kld"]["mean"],
    "kld_p99": lambda t: t["kld"]["p99"],
    "top1": lambda t: t["top1_agreement"]["value"],
    "ppl_ratio": lambda t: t["ppl_ratio"]["value"],
    "rms_dp": lambda t: t["rms_dp"]["value"],
}
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_CONDITION = re.compile(r"\s*([a-z_0-9]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*")


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    limit: float

    def value(self, teacher_forced: dict) -> float:
        return METRICS[self.metric](teacher_forced)

    def holds(self, teacher_forced: dict) -> bool:
        return OPS[self.op](self.value(teacher_forced), self.limit)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.limit:g}"


def parse_gate(text: str) -> list[Condition]:
    """'kld<0.05,top1>=0.9' -> conditions; a typo is a ConfigError that lists the metrics."""
    conditions = []
    for part in text.split(","):
        m = _CONDITION.fullmatch(part)
        if not m or m.group(1) not in METRICS:
            raise ConfigError(f"quality gate {part.strip()!r}: write METRIC<VALUE (or <=, >, >=), "
                              f"conditions separated by commas, e.g. 'kld<0.05,top1>0.9'; "
                              f"metrics: {', '.join(METRICS)}")
        try:
            limit = float(m.group(3))
        except ValueError:
            raise ConfigError(f"quality gate {part.strip()!r}: {m.group(3)!r} is not a number") from None
        conditions.append(Condition(m.group(1), m.group(2), limit))
    return conditions


def failures(conditions: list[Condition], teacher_forced: dict) -> list[str]:
    """One line per failed condition, saying the measured value and its interval."""
    out = []
    for c in conditions:
        if not c.holds(teacher_forced):
            out.append(f"{c.metric} = {c.value(teacher_forced):.5g} does not satisfy {c}")
    return out
