"""``python -m bench`` (or ``./dev bench``): run every benchmark and print ratios.

Each figure is compared with a baseline measured in the same run, because these machines are
noisy; results are also written to bench/results/engine-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from . import engine


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--rounds", type=int, default=10, help="start/boot rounds per side")
    p.add_argument("--fleet", type=int, default=20, help="VMs in the fleet benchmark")
    args = p.parse_args()
    results = asyncio.run(engine.run(args.rounds, args.fleet))
    print(engine.report(results))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
