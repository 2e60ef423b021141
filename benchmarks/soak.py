"""A soak of the default model with `nibble bench serve --profile soak`: closed-loop chat users
with mixed prompt lengths (short, medium, long) for --seconds; reports the server's resident
memory over the run (growth and slope) and the KV-cache blocks not returned once it is idle.
Writes benchmarks/results/soak-DATE.json (the report without per-request records) and its PNG.

    python benchmarks/soak.py                     # int4, 4 users, 600 s
    python benchmarks/soak.py --quant bf16 --seconds 300
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    from loadtests import bench
    from loadtests.report import SLO, table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="int4")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slo", default="slo-cpu")
    args = p.parse_args()

    opts = bench.Options(profile="soak", users=args.users, duration=args.seconds,
                         workload=bench.Workload("mixed", "mixed", args.max_tokens),
                         slo=SLO.load(args.slo))
    date = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory(prefix="nibble-soak-") as tmp:
        doc = bench.run([(args.quant, ["--model", args.model, "--quant", args.quant])], opts, Path(tmp))
        shutil.copy(Path(tmp) / "report.png", RESULTS / f"soak-{date}.png")
    print(table(doc["targets"]))
    out = RESULTS / f"soak-{date}.json"
    out.write_text(json.dumps({"benchmark": "soak", "date": date, **doc}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
