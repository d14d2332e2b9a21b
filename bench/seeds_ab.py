"""Dev accuracy with a training switch on and off, over seeds (issue 6).

    python bench/seeds_ab.py --seeds 1,2                                   # train.fused_kernels, both settings
    python bench/seeds_ab.py --setting model.sparse_embeddings --seeds 1,2 --only on

train.fused_kernels draws dropout masks from a hash instead of torch's generator (the same distribution, another
random stream); model.sparse_embeddings updates only the embedding rows a batch looks up (lazy AdamW). This trains
SST-2 with bench/train_speed.py's variant C settings (configs/sst2.yaml, batch 32, 3 epochs, no early stopping, one
dev evaluation at the end) with the switch on and off for each seed, and appends dev accuracy and training seconds to
bench/results/fused_seeds.json (train.fused_kernels) or bench/results/sparse_seeds.json (model.sparse_embeddings).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from common import REPO, RESULTS, machine

FILES = {"train.fused_kernels": "fused_seeds.json", "model.sparse_embeddings": "sparse_seeds.json"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--setting", default="train.fused_kernels", choices=sorted(FILES))
    p.add_argument("--only", choices=("on", "off"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import strop

    path = RESULTS / FILES[args.setting]
    rows = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for setting in ([args.only] if args.only else ["on", "off"]):
            with tempfile.TemporaryDirectory(prefix="strop-fused-seeds-") as tmp:
                over = {"output_dir": tmp, "train.epochs": 3, "train.batch_size": 32, "train.threads": args.threads,
                        "train.early_stopping_patience": 0, "train.save_every": -1, "train.eval_every": 651,
                        "train.seed": seed, args.setting: setting == "on", "name": f"seed{seed}-{setting}"}
                start = time.perf_counter()
                r = strop.train(REPO / "configs" / "sst2.yaml", over, overwrite=True).results
                row = {"seed": seed, args.setting.split(".")[-1]: setting == "on", "dev_accuracy": r["validation"]["accuracy"],
                       "train_seconds": r["train_seconds"], "wall_seconds": time.perf_counter() - start,
                       "steps": r["steps"], "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine()}
            print(f"seed {seed} {args.setting} {setting}: dev accuracy {row['dev_accuracy']:.4f}, "
                  f"train {row['train_seconds']:.1f} s")
            rows.append(row)
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
