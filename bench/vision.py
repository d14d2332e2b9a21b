"""Medical image classification on MedMNIST (BreastMNIST, RetinaMNIST): strop at its defaults against the MedMNIST
v2 paper and a plain PyTorch training loop, over seeds; then predict and serving throughput of torch and ONNX.

    python bench/vision.py --sets breastmnist,retinamnist --variants strop,plain --seeds 42,1,2
    python bench/vision.py --throughput RUN        # images/s: torch fp32, ONNX fp32, ONNX int8 (one trained run)
    python bench/vision.py --summary               # the tables from bench/results/vision.json, nothing run

Data: ../shared/datasets/medmnist/<set>.npz (28x28, splits as given: the validation split picks the best step, the
test split is scored). Variants, same model (EfficientNet-Lite0, ImageNet weights), data, seed, epochs (10), batch
(32), lr (1e-3), AdamW (weight decay 0.01), linear warmup 6% then linear decay, 224 px:
  strop   `strop train data.train=<set>.npz` with every other setting at its default (augment=light)
  plain   the loop a user copies from the Hugging Face image-classification example / timm's train script: a torch
          Dataset that resizes each image with Pillow (bicubic) and flips it at random, a DataLoader, AdamW, the
          linear schedule, an evaluation on the validation split each epoch, the epoch with the best validation AUC
          scored on test. timm itself cannot be installed here (it imports torchvision, which needs another torch),
          so the network is strop's EfficientNet-Lite0 (its logits equal the original code's) in both.
Both sides use one thread (`train.threads=1`, torch.set_num_threads(1)), as part 1's measurements did, so two runs
can share the 2-core machine without the stalls of two-thread kernels on an oversubscribed CPU. Each (set, variant,
seed) runs in its own child process; CPU seconds are the child's user + system time (on a shared
machine they move far less than wall time); results are added to bench/results/vision.json as they finish, and runs
already there are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, RESULTS, load_runs, machine, run_child, save_runs

sys.path.insert(0, str(REPO / "tests" / "serve"))  # serve_helpers.free_port, as bench/serve.py uses it

MEDMNIST = REPO.parent / "shared" / "datasets" / "medmnist"
OUT = RESULTS / "vision.json"
SETS = ("breastmnist", "retinamnist")
# MedMNIST v2 (Yang et al. 2023), Table 3, test AUC / ACC: ResNet-18 (28) and Google AutoML Vision
PAPER = {"breastmnist": {"ResNet-18 (28)": (0.901, 0.863), "AutoML Vision": (0.919, 0.861)},
         "retinamnist": {"ResNet-18 (28)": (0.717, 0.524), "AutoML Vision": (0.750, 0.531)}}
EPOCHS, BATCH, LR, SIZE, WEIGHT_DECAY, WARMUP = 10, 32, 1e-3, 224, 0.01, 0.06
THREADS = 1


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------------------------
# strop at its defaults


def run_strop(set_name: str, seed: int, work: Path) -> dict:
    import strop

    start = time.perf_counter()
    run = strop.train(None, {"data.train": str(MEDMNIST / f"{set_name}.npz"), "train.seed": seed, "track": "none",
                             "train.threads": THREADS, "eval.report": False, "output_dir": str(work),
                             "name": f"{set_name}-{seed}"})
    r = run.results
    return {"test": r["test"], "validation": r["validation"], "best_step": r["best_step"], "steps": r["steps"],
            "train_seconds": r["train_seconds"], "train_images_per_s": r["train_samples_per_s"],
            "wall_seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds(), "run_dir": str(run.run_dir)}


# ---------------------------------------------------------------------------------------------------------------
# the plain PyTorch loop


class NpzImages:
    """A torch-style Dataset: item i -> (3, SIZE, SIZE) float tensor normalised as the backbone expects, label."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool, seed: int):
        self.images, self.labels, self.train = images, labels.reshape(-1).astype(np.int64), train
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        img = Image.fromarray(self.images[i]).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
        if self.train and self.rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - 0.5) / 0.5, int(self.labels[i])


def auc_acc(probs: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(labels, probs[:, 1]) if probs.shape[1] == 2 else \
        roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    return {"roc_auc": float(auc), "accuracy": float((probs.argmax(1) == labels).mean())}


def predict(model, loader) -> tuple[np.ndarray, np.ndarray]:
    import torch

    model.eval()
    probs, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            probs.append(model(pixel_values=x).logits.float().softmax(-1).numpy())
            labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def run_plain(set_name: str, seed: int) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from strop.models.vision import build_image_classifier, default_vision_path

    start = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    z = np.load(MEDMNIST / f"{set_name}.npz")
    n_classes = int(z["train_labels"].max()) + 1
    loaders = {s: DataLoader(NpzImages(z[f"{s}_images"], z[f"{s}_labels"], s == "train", seed), batch_size=BATCH,
                             shuffle=s == "train") for s in ("train", "val", "test")}
    model = build_image_classifier(default_vision_path(), n_classes, head=False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * len(loaders["train"])
    schedule = get_linear_schedule_with_warmup(opt, round(WARMUP * steps), steps)
    best, best_state, train_seconds, seen = -1.0, None, 0.0, 0
    for _ in range(EPOCHS):
        model.train()
        t0 = time.perf_counter()
        for x, y in loaders["train"]:
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
            loss.backward()
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            seen += len(y)
        train_seconds += time.perf_counter() - t0
        val = auc_acc(*predict(model, loaders["val"]))
        if val["roc_auc"] > best:
            best, best_state = val["roc_auc"], {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"test": auc_acc(*predict(model, loaders["test"])), "validation": {"roc_auc": best}, "steps": steps,
            "train_seconds": train_seconds, "train_images_per_s": seen / train_seconds,
            "wall_seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds()}


# ---------------------------------------------------------------------------------------------------------------
# predict and serving throughput of one trained run: torch fp32, ONNX fp32, ONNX int8

BACKENDS = {"torch-fp32": ("", []),
            "onnx-fp32": ("export/model.onnx", ["--backend", "onnx", "serve.onnx_file=model.onnx"]),
            "onnx-int8": ("export/model.int8.onnx", ["--backend", "onnx", "serve.onnx_file=model.int8.onnx"])}


def test_images(set_name: str) -> list[np.ndarray]:
    with np.load(MEDMNIST / f"{set_name}.npz") as z:
        return list(z["test_images"])


def predict_speed(run: Path, images: list[np.ndarray], repeats: int = 3) -> dict:
    """Images/s of strop.load(...).predict on the test images (decode, resize to the run's size, normalise,
    forward), batch 64, the best of `repeats` passes after one warm-up pass, per backend."""
    import strop

    out = {}
    for name, (rel, _) in BACKENDS.items():
        predictor = strop.load(run / rel if rel else run)
        predictor.predict(images[:64])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            predictor.predict(images, batch_size=64)
            times.append(time.perf_counter() - t0)
        out[name] = {"images_per_s": len(images) / min(times), "seconds": times}
        print(f"predict {name}: {out[name]['images_per_s']:.1f} images/s", flush=True)
    return out


def serve_speed(run: Path, images: list[np.ndarray], clients: int, seconds: float) -> dict:
    """Requests/s (one image per request, base64 JSON) of `strop serve` per backend, `clients` closed-loop clients
    after a warm-up (bench/serve.py's driver)."""
    import asyncio
    import base64
    import io

    from PIL import Image
    from serve import drive, wait_ready
    from serve_helpers import free_port

    bodies = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        bodies.append(base64.b64encode(buf.getvalue()).decode())
    out = {}
    for name, (_, extra) in BACKENDS.items():
        port = free_port()
        cmd = [sys.executable, "-c", "import sys; from strop.cli import main; sys.exit(main())", "serve", str(run),
               "--port", str(port), *extra, "serve.max_concurrency=256"]
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log)
            try:
                wait_ready(f"http://127.0.0.1:{port}", proc, "/health/ready")
                point = asyncio.run(drive(f"http://127.0.0.1:{port}/v1/predict",
                                          lambda b: {"inputs": [{"image": b}]}, bodies, clients, seconds, 3.0))
            finally:
                proc.terminate()
                proc.wait(60)
        out[name] = point
        print(f"serve {name}: {point['throughput_rps']:.1f} images/s, p50 {point['p50_ms']} ms, errors "
              f"{point['errors']}", flush=True)
    return out


def throughput(run: Path, set_name: str, clients: int, seconds: float) -> dict:
    from strop.cli import main as strop_main

    if not (run / "export" / "model.int8.onnx").is_file():
        if strop_main(["export", str(run)]) != 0:
            raise SystemExit(f"strop export {run} failed")
    images = test_images(set_name)
    parity = json.loads((run / "export" / "parity.json").read_text(encoding="utf-8"))
    return {"run": str(run), "set": set_name, "images": len(images), "threads": os.cpu_count(),
            "predict": predict_speed(run, images), "serve": serve_speed(run, images, clients, seconds),
            "int8_metric_changes": parity.get("metric_changes"), "loadavg": [round(x, 2) for x in os.getloadavg()]}


# ---------------------------------------------------------------------------------------------------------------
# the parent: queue, results file, summary


def load_results() -> dict:
    return load_runs(OUT)


def save_results(results: dict) -> None:
    save_runs(OUT, results)


def mean_sd(xs: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def summary(results: dict) -> str:
    """Markdown: test AUC / ACC mean ± std, CPU minutes and training images/s per set and variant; the paper's."""
    cells: dict = {}
    for key, r in results["runs"].items():
        set_name, variant, _ = key.split("/")
        cells.setdefault((set_name, variant), []).append(r)
    lines = ["| set | variant | seeds | test AUC | test ACC | CPU min / run | train images/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (set_name, variant), runs in sorted(cells.items()):
        lines.append(f"| {set_name} | {variant} | {len(runs)} | {mean_sd([r['test']['roc_auc'] for r in runs])} | "
                     f"{mean_sd([r['test']['accuracy'] for r in runs])} | "
                     f"{mean_sd([r['cpu_seconds'] / 60 for r in runs], 1)} | "
                     f"{mean_sd([r['train_images_per_s'] for r in runs], 1)} |")
    for set_name, refs in PAPER.items():
        for name, (auc, acc) in refs.items():
            lines.append(f"| {set_name} | {name} (paper) | | {auc:.3f} | {acc:.3f} | | |")
    for set_name in SETS:
        a, b = cells.get((set_name, "strop")), cells.get((set_name, "plain"))
        if a and b:
            ratio = statistics.mean(r["train_images_per_s"] for r in a) / \
                statistics.mean(r["train_images_per_s"] for r in b)
            lines.append(f"\n{set_name}: strop / plain training images/s = {ratio:.2f}x")
    return "\n".join(lines)


def run_queue(args) -> dict:
    results = load_results()
    results.setdefault("machine", machine())
    results["command"] = "python bench/vision.py " + " ".join(sys.argv[1:])
    for seed in map(int, args.seeds.split(",")):
        for set_name in args.sets.split(","):
            for variant in args.variants.split(","):
                key = f"{set_name}/{variant}/{seed}"
                if key in results["runs"]:
                    continue
                result = run_child(__file__, ["--child", key], key, key)
                result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
                keep = {k: results[k] for k in ("machine", "command")}
                results = load_results()  # another process may have added runs meanwhile
                results.update(keep)
                results["runs"][key] = result
                save_results(results)
                print(f"{key}: test AUC {result['test']['roc_auc']:.3f} ACC {result['test']['accuracy']:.3f}, "
                      f"{result['cpu_seconds'] / 60:.1f} CPU min", flush=True)
    return results


def child(key: str, out: str) -> None:
    set_name, variant, seed = key.split("/")
    work = Path(tempfile.mkdtemp(prefix="vision-run-"))
    try:
        result = run_strop(set_name, int(seed), work) if variant == "strop" else run_plain(set_name, int(seed))
        result.pop("run_dir", None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="breastmnist,retinamnist")
    p.add_argument("--variants", default="strop,plain")
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--summary", action="store_true")
    p.add_argument("--throughput", metavar="RUN", help="a finished image run: predict and serving images/s")
    p.add_argument("--throughput-set", default="breastmnist", help="whose test images --throughput sends")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--child", help=argparse.SUPPRESS)  # set/variant/seed, run in this process
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.out)
        return
    if args.throughput:
        result = throughput(Path(args.throughput).resolve(), args.throughput_set, args.clients, args.seconds)
        results = load_results()
        results["throughput"] = {**result, "machine": machine()}
        save_results(results)
        return
    results = load_results() if args.summary else run_queue(args)
    print(summary(results))


if __name__ == "__main__":
    main()
