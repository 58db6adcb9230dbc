"""Markdown table of a `lancet bench --json` file (the tables in docs/results.md).

    python scripts/bench_markdown.py bench.json [--baseline captured]

"x eager" carries "~" where the variant's quartile range of step times overlaps eager's (noise).
`lancet experiment report` renders these tables (and more) for a whole experiment folder.
"""

from __future__ import annotations

import argparse
import json

from lancet.measure.report import bench_table

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench_json")
    parser.add_argument("--baseline", default="captured", help="variant the exposed all-to-all change is measured from")
    args = parser.parse_args()
    with open(args.bench_json) as f:
        print(bench_table(json.load(f)["results"], args.baseline))
