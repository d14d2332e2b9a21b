"""How long integrated-gradients explanations take on the real model (the report's worst-error section uses them).

    python bench/explain_speed.py RUN [--n 100] [--data ../shared/datasets/sst2/dev.jsonl]

Explains the first n texts of the file with the run's model (50 steps to start, doubled until the attributions add up
to the logit difference within 5%), and writes bench/results/explain_speed.json: total and per-example seconds, the
steps each needed, and how many met the completeness tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from common import REPO, RESULTS, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--data", default="../shared/datasets/sst2/dev.jsonl")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    os.chdir(REPO)
    import torch

    import strop
    from strop.explain.attribution import explain

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    mach = machine()
    predictor = strop.load(args.run)
    texts = [json.loads(line)["text"] for line in Path(args.data).read_text(encoding="utf-8").splitlines()[:args.n]]
    explain(predictor, texts[0])  # warm-up
    seconds, steps, ok = [], [], 0
    start = time.perf_counter()
    for text in texts:
        t0 = time.perf_counter()
        ex = explain(predictor, text, rollout=False)
        seconds.append(time.perf_counter() - t0)
        steps.append(ex.completeness["steps"])
        ok += ex.completeness["within_tolerance"]
    total = time.perf_counter() - start
    result = {"run": args.run, "data": args.data, "n": len(texts), "total_seconds": total,
              "seconds_per_example": {"mean": statistics.mean(seconds), "p50": statistics.median(seconds),
                                      "max": max(seconds)},
              "steps": {"mean": statistics.mean(steps), "max": max(steps)}, "within_tolerance": ok,
              "threads": torch.get_num_threads(), "machine": mach,
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "command": "python bench/explain_speed.py "
              + " ".join(f"{a}" for a in os.sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "explain_speed.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"{len(texts)} explanations in {total:.1f} s ({statistics.mean(seconds):.2f} s each, p50 "
          f"{statistics.median(seconds):.2f} s); mean steps {statistics.mean(steps):.0f}; {ok}/{len(texts)} within "
          f"the completeness tolerance; load average {mach['loadavg_at_start']} -> {result['loadavg_at_end']}")


if __name__ == "__main__":
    main()
