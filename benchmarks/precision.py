"""bf16 against float32 on the same protocol: pairs every final run of two suites' results (same task, configuration,
seed and held-out examples), e.g. `svdtune bench --suite llm` and `svdtune bench --suite llm-float32`.

    python benchmarks/precision.py runs/bench/llm/results.json runs/bench/llm-float32/results.json

prints the table and writes benchmarks/results/precision.md (and .json): Δ score bf16 − float32 with its paired 95%
interval and verdict, and the tokens/s ratio of the two runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from svdtune.bench.report import precision_comparison, precision_table

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("low", help="results.json of the bf16 suite")
    parser.add_argument("high", help="results.json of the float32 suite")
    parser.add_argument("--out", default=str(RESULTS / "precision"), help="output stem (.md and .json)")
    args = parser.parse_args()
    low, high = (json.loads(Path(p).read_text()) for p in (args.low, args.high))
    rows = precision_comparison(low, high)
    table = (f"## bf16 base vs float32 base: {low['suite']['name']} against {high['suite']['name']}\n\n"
             + precision_table(rows, "bf16", "float32"))
    print(table)
    Path(f"{args.out}.md").write_text(table)
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
