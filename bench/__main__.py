"""``python -m bench`` (or ``./dev bench``): run the benchmarks and print ratios.

Each figure is compared with a baseline measured in the same run, because these machines are
noisy; results are also written to bench/results/<suite>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from . import api, console, dashboard, engine, integrity, network, ssh, storage, terraform

SUITES: dict[str, Any] = {"engine": engine, "integrity": integrity, "storage": storage,
                          "api": api, "console": console, "dashboard": dashboard,
                          "terraform": terraform, "ssh": ssh, "network": network}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("suites", nargs="*", choices=list(SUITES), default=[],
                   help="which suites (default: all)")
    args = p.parse_args()
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    for name in args.suites or list(SUITES):
        mod = SUITES[name]
        print(f"== {name}", flush=True)
        results = asyncio.run(mod.run())
        print(mod.report(results), flush=True)
        path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(results, indent=2))
        print(f"results: {path}", flush=True)


if __name__ == "__main__":
    main()
