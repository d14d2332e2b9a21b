"""Dev accuracy with and without the fused CPU kernels (train.fused_kernels), over seeds (issue 6).

    python bench/fused_seeds.py --seeds 1,2            # both settings for each seed
    python bench/fused_seeds.py --seeds 42 --only on

The fused kernels draw dropout masks from a hash instead of torch's generator: the same distribution, another random
stream. This trains SST-2 with bench/train_speed.py's variant C settings (configs/sst2.yaml, batch 32, 3 epochs, no
early stopping, one dev evaluation at the end) with the kernels on and off for each seed, and appends dev accuracy
and training seconds to bench/results/fused_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from common import REPO, RESULTS, machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--only", choices=("on", "off"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import strop

    path = RESULTS / "fused_seeds.json"
    rows = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for setting in ([args.only] if args.only else ["on", "off"]):
            with tempfile.TemporaryDirectory(prefix="strop-fused-seeds-") as tmp:
                over = {"output_dir": tmp, "train.epochs": 3, "train.batch_size": 32, "train.threads": args.threads,
                        "train.early_stopping_patience": 0, "train.save_every": -1, "train.eval_every": 651,
                        "train.seed": seed, "train.fused_kernels": setting == "on", "name": f"seed{seed}-{setting}"}
                start = time.perf_counter()
                r = strop.train(REPO / "configs" / "sst2.yaml", over, overwrite=True).results
                row = {"seed": seed, "fused_kernels": setting == "on", "dev_accuracy": r["validation"]["accuracy"],
                       "train_seconds": r["train_seconds"], "wall_seconds": time.perf_counter() - start,
                       "steps": r["steps"], "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine()}
            print(f"seed {seed} fused {setting}: dev accuracy {row['dev_accuracy']:.4f}, "
                  f"train {row['train_seconds']:.1f} s")
            rows.append(row)
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
