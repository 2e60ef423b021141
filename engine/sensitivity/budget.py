"""A plan for a weight budget: per module the format that minimizes a scan's summed KLD while
the weights fit, written as a config that `nibble serve -c` and `nibble compare --b` load.

The choice is a multiple-choice knapsack: every scanned module takes one option, 16-bit (KLD 0)
or one of the scanned formats (its measured KLD), at that option's bytes. Summing KLDs measured
one module at a time is an estimate of the whole plan's KLD (`nibble compare` measures it).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import QuantPolicy, QuantSpec
from engine.errors import ConfigError
from engine.sensitivity.results import WIDE, Scan

BINS = 1 << 15  # the DP's byte resolution: each option's bytes round up to 1/BINS of the range


@dataclass(frozen=True)
class Plan:
    assignment: dict[str, str]  # module -> format (WIDE where it stays 16-bit), in scan order
    kld: float  # predicted: the summed KLD of the chosen options
    nbytes: int  # fixed + the modules' bytes: every weight byte, as `nibble inspect` counts
    budget: int
    fixed_bytes: int


def plan(scan: Scan, weight_budget: int, fixed_bytes: int | None = None,
         bins: int = BINS) -> Plan:
    """The assignment of least summed KLD whose weights (fixed_bytes, by default the scan's,
    plus every module's option) fit `weight_budget` bytes; never over the budget. The DP
    (knapsack) counts the bytes above each module's cheapest option in at most `bins` units
    of the room the budget leaves: exact where the byte counts' common divisor is that fine,
    else each module may give up a unit (1/`bins` of the room)."""
    fixed = scan.fixed_bytes if fixed_bytes is None else fixed_bytes
    options = [[(WIDE, m.wide_bytes, 0.0)] + [(o.format, o.nbytes, o.kld) for o in m.options
                                               if math.isfinite(o.kld)] for m in scan.modules]
    cheapest = [min(c for _, c, _ in opts) for opts in options]
    floor = fixed + sum(cheapest)
    if floor > weight_budget:
        raise ConfigError(
            f"no plan fits {weight_budget:,} bytes: the smallest, every module at its fewest "
            f"bytes among {WIDE} and {', '.join(scan.formats)}, needs {floor:,} bytes "
            f"({floor / 2**20:.2f} MiB, {fixed:,} of them outside the linear modules); raise "
            "the weight budget to at least that, or scan smaller formats")
    extra = [np.array([c - base for _, c, _ in opts], dtype=np.int64)
             for opts, base in zip(options, cheapest, strict=True)]
    room = min(weight_budget - floor, sum(int(e.max()) for e in extra))
    picks = knapsack(extra, [np.array([v for _, _, v in opts]) for opts in options], room, bins)
    chosen = [opts[j] for opts, j in zip(options, picks, strict=True)]
    return Plan({m.name: fmt for m, (fmt, _, _) in zip(scan.modules, chosen, strict=True)},
                sum(v for _, _, v in chosen), fixed + sum(c for _, c, _ in chosen),
                weight_budget, fixed)


def knapsack(costs: list[np.ndarray], values: list[np.ndarray], capacity: int,
             bins: int = BINS) -> list[int]:
    """Multiple-choice knapsack: one option per item, summed cost (integers >= 0, each item
    with a 0-cost option) at most `capacity`, least summed value; the cheapest of equal
    optima. -> the option index per item. Costs round up to a unit, the costs' greatest common
    divisor or a multiple of it that cuts the capacity into at most `bins` units: exact where
    that leaves the gcd, else each item may give up a unit of room."""
    if sum(int(c.max()) for c in costs) <= capacity:  # everything fits: each item's best
        return [int(np.lexsort((c, v))[0]) for c, v in zip(costs, values, strict=True)]
    gcd = int(np.gcd.reduce(np.concatenate(costs))) or 1
    unit = gcd * max(1, -(-capacity // (bins * gcd)))
    top = capacity // unit
    weights = [-(-c // unit) for c in costs]
    best = np.zeros(top + 1)  # best[b]: least value of the items so far within b units
    choice = np.zeros((len(costs), top + 1), dtype=np.int16)
    for i, (w, v) in enumerate(zip(weights, values, strict=True)):
        new = np.full(top + 1, np.inf)
        for j in range(len(w)):
            if w[j] > top:
                continue
            cand = best[:top + 1 - w[j]] + v[j]
            better = cand < new[w[j]:]
            new[w[j]:][better] = cand[better]
            choice[i, w[j]:][better] = j
        best = new
    b = int(np.argmax(best <= best[-1]))  # the fewest units that reach the optimum
    picks = []
    for i in reversed(range(len(costs))):
        picks.append(int(choice[i, b]))
        b -= int(weights[i][picks[-1]])
    return picks[::-1]


def default_format(assignment: dict[str, str]) -> str:
    """The config's `quant`: the format most modules take (the first such in module order)."""
    return Counter(assignment.values()).most_common(1)[0][0]


def plan_rules(assignment: dict[str, str], default: str) -> list[str]:
    """`--rule` strings REGEX=FORMAT (exact module names) for the modules that the policy of
    quant=`default` alone would not give their planned format (lm_head is 16-bit unless a
    rule names it)."""
    policy = QuantPolicy.build(default)
    return [f"^{re.escape(name)}$={fmt}" for name, fmt in assignment.items()
            if policy.spec_for(name) != QuantSpec.parse(fmt)]


def write_plan(path: str | Path, model: str, result: Plan, notes: list[str] | tuple = ()) -> Path:
    """A TOML config (model, quant, rules) for `result`, with comments that give its budget,
    bytes and predicted KLD, then `notes`."""
    default = default_format(result.assignment)
    rules = plan_rules(result.assignment, default)
    counts = Counter(result.assignment.values())
    head = [f"nibble plan: weights {result.nbytes:,} bytes ({result.nbytes / 2**20:.2f} MiB, as "
            f"`nibble inspect` counts them) for a budget of {result.budget:,} bytes",
            f"predicted KLD {result.kld:.6g}: the sum of each module's KLD measured alone; "
            "`nibble compare --b` this file to measure it",
            "modules: " + ", ".join(f"{n} {fmt}" for fmt, n in counts.most_common()),
            *notes]
    lines = [f"# {_comment(line)}" for note in head for line in str(note).splitlines() or [""]]
    lines += [f"model = {toml_string(model)}", f"quant = {toml_string(default)}", "rules = ["]
    lines += [f"    {toml_string(r)}," for r in rules] + ["]", ""]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def toml_string(text: str) -> str:
    """A TOML string: literal ('...', backslashes as they are) where it can be, else basic."""
    if "'" not in text and not _CONTROL.search(text):
        return f"'{text}'"
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'


def _comment(text: str) -> str:
    return _CONTROL.sub(" ", text)
