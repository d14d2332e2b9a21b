"""CoNLL-2003 NER: strop against the Hugging Face Trainer's token-classification recipe, same data, epochs and seed.

    python bench/ner.py                                  # HF Trainer, then strop with configs/conll2003.yaml
    python bench/ner.py --variants plain,casing          # strop variants (see VARIANTS), each after the HF side
    python bench/ner.py --skip-hf --variants casing      # strop only
    python bench/ner.py --epochs 0.02                    # smoke check

Both sides: the default model (all-MiniLM-L6-v2), train on train.txt, choose on dev.txt, report test.txt; the same
epochs, batch size, learning rate, schedule, warmup steps, seed, max length, bf16 autocast and length-grouped batches
(all from one resolved strop config). The HF side is the standard recipe (labels on the first subword, -100 elsewhere,
DataCollatorForTokenClassification, seqeval-style entity F1); sentences longer than max_length are truncated there,
and the words cut off count as predicted O against the full gold tags, so both sides are scored on the same words.
Each side runs in its own child process, one after the other. Results: bench/results/ner_conll2003.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import HF_ARGS_SHOWN, REPO, RESULTS, hf_arguments, machine, run_child as _run_child, total_steps

CONFIG = REPO / "configs" / "conll2003.yaml"
# strop variants: overrides of configs/conll2003.yaml (the shipped config is `shipped`)
VARIANTS = {
    "plain": {"ner.casing": False, "ner.decoding": "argmax"},  # the HF recipe's model and decoding, strop's loop
    "constrained": {"ner.casing": False, "ner.decoding": "constrained"},
    "casing": {"ner.casing": True, "ner.decoding": "constrained"},
    "shipped": {},
}
KNOWN_DIFFERENCES = [
    "both sides start from the same weights (torch seeded before from_pretrained), but batch order and dropout "
    "streams differ, so F1 differs by seed-level noise",
    "strop selects the best dev epoch (restore_best) as its shipped config does; the HF side keeps the last weights",
    "strop cuts sentences longer than max_length into overlapping windows; the HF side truncates them (cut words "
    "count as O)",
]


def overrides(args, variant: str) -> dict:
    over = {"name": f"bench-ner-{variant}", "train.precision": "bf16", "track": ["none"], **VARIANTS[variant]}
    if args.epochs is not None:
        over["train.epochs"] = args.epochs
    from strop.config import parse_override

    over.update(dict(map(parse_override, args.set or [])))  # typed as on the command line (1 -> int)
    return over


def run_strop(over: dict) -> dict:
    import torch

    import strop

    start = time.perf_counter()
    run = strop.train(CONFIG, over, overwrite=True)
    r = run.results
    return {"validation": r.get("validation"), "test": r.get("test"), "decoding_ablation": decoding_ablation(run),
            "train_seconds": r["train_seconds"],
            "wall_seconds": time.perf_counter() - start, "steps": r["steps"], "epochs": r["epochs"],
            "best_step": r["best_step"], "precision": r["precision"], "threads": torch.get_num_threads(),
            "run_dir": str(run.run_dir)}


def decoding_ablation(run) -> dict:
    """Test entity F1 of the trained model under each decoding (argmax per word vs constrained Viterbi)."""
    import strop
    from strop.config import load_config
    from strop.evaluate.entities import TagDecoder

    predictor = strop.load(run.run_dir)
    test = load_config(run.run_dir / "config.yaml").data.test
    out = {}
    for decoding in ("argmax", "constrained"):
        predictor.meta["decoding"] = decoding
        predictor.decode = TagDecoder(predictor.labels, decoding)
        m = predictor.evaluate_file(test)
        out[decoding] = {"test_f1": m["f1"], "test_macro_f1": m["macro_f1"],
                         "per_type_f1": {t: v["f1"] for t, v in m["per_type"].items()}}
    return out


def hf_token_data(cfg, tokenizer, labels: list[str]):
    """Tokenized splits for the HF side (first-subword labels) plus the gold word tags of each split."""
    from datasets import Dataset

    from strop.data.ner import prepare_tokens

    ds = prepare_tokens(cfg)
    out, gold = {}, {}
    for split, ex in ds.splits.items():
        enc = tokenizer(ex.tokens, is_split_into_words=True, truncation=True, max_length=cfg.model.max_length)
        rows = []
        for i in range(len(ex)):
            words, prev, lab = enc.word_ids(i), None, []
            for w in words:
                lab.append(-100 if w is None or w == prev else int(ex.tags[i][w]))
                prev = w
            rows.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                         "token_type_ids": enc["token_type_ids"][i], "labels": lab})
        out[split] = Dataset.from_list(rows)
        gold[split] = [[labels[t] for t in tags] for tags in ex.tags]
    return out, gold, ds.labels


def run_hf(over: dict) -> dict:
    import torch
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, set_seed)

    from strop.config import load_config
    from strop.models.backbone import default_model_path

    start = time.perf_counter()
    cfg = load_config(CONFIG, {k: v for k, v in over.items() if not k.startswith("ner.")})
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    folder = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    from strop.data.ner import prepare_tokens

    labels = prepare_tokens(cfg).labels
    data, gold, _ = hf_token_data(cfg, tokenizer, labels)
    steps = total_steps(cfg, len(data["train"]))
    set_seed(cfg.train.seed)
    model = AutoModelForTokenClassification.from_pretrained(
        folder, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        use_safetensors=True, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(model=model, args=hf_arguments(cfg, steps, out_dir), train_dataset=data["train"],
                          processing_class=tokenizer, data_collator=DataCollatorForTokenClassification(tokenizer))
        train = trainer.train().metrics
        scores = {}
        for split in ("validation", "test"):
            t0 = time.perf_counter()
            scores[split] = _hf_scores(model, data[split], gold[split], labels, cfg,
                                       DataCollatorForTokenClassification(tokenizer))
            if split == "validation":
                train["train_runtime"] += time.perf_counter() - t0  # strop's train_seconds holds its dev evals
    return {"validation": scores["validation"], "test": scores["test"], "train_seconds": train["train_runtime"],
            "wall_seconds": time.perf_counter() - start, "steps": trainer.state.global_step,
            "epochs": cfg.train.epochs, "precision": "bf16" if cfg.train.precision == "bf16" else "fp32",
            "threads": torch.get_num_threads(), "train_loss": train.get("train_loss"),
            "args": {k: v for k, v in trainer.args.to_dict().items() if k in HF_ARGS_SHOWN}}


def _hf_scores(model, data, gold, labels, cfg, collator) -> dict:
    """Word-level entity metrics of the trained HF model (argmax per first subword, in dataset order: Trainer's
    predict() reorders rows under group_by_length); words past the truncation count as O."""
    import torch

    from strop.evaluate.entities import EntityMetrics

    metrics = EntityMetrics()
    model.eval()
    bs = cfg.eval.batch_size
    for start in range(0, len(data), bs):
        rows = [data[i] for i in range(start, min(start + bs, len(data)))]
        batch = collator(rows)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                   enabled=cfg.train.precision == "bf16"):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        for j, row in enumerate(rows):
            ref = torch.tensor(row["labels"])
            ids = logits[j, :len(ref)][ref != -100].argmax(-1).tolist()
            words = [labels[x] for x in ids] + ["O"] * (len(gold[start + j]) - len(ids))
            metrics.update(gold[start + j], words)
    return metrics.compute()


def run_child(side: str, over: dict) -> dict:
    return _run_child(__file__, ["--side", side, "--overrides", json.dumps(over)],
                      f"CoNLL-2003: {'Hugging Face Trainer' if side == 'hf' else 'strop ' + over['name']}",
                      f"{side} side")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="shipped", help=f"comma-separated strop variants: {sorted(VARIANTS)}")
    p.add_argument("--epochs", type=float, help="override train.epochs on both sides (smoke checks)")
    p.add_argument("--set", action="append", help="extra key=value override for both sides (e.g. train.lr=1e-4)")
    p.add_argument("--skip-hf", action="store_true", help="run strop only")
    p.add_argument("--out", help="result file (default bench/results/ner_conll2003.json); with --side, internal")
    p.add_argument("--side", choices=("hf", "strop"), help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side:
        over = json.loads(args.overrides)
        result = run_hf(over) if args.side == "hf" else run_strop(over)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
        return
    variants = args.variants.split(",")
    report = {"config": str(CONFIG.relative_to(REPO)), "machine": machine(),
              "command": "python bench/ner.py " + " ".join(sys.argv[1:]), "time": time.strftime("%Y-%m-%d %H:%M %Z"),
              "known_differences": KNOWN_DIFFERENCES, "strop": {}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / "ner_conll2003.json"

    def save():  # after every side, so a long benchmark stopped midway keeps what it measured
        report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")

    # the first strop variant, then the HF side, then the other variants (the headline pair comes first)
    order = variants[:1] + ([] if args.skip_hf else ["hf"]) + variants[1:]
    for side in order:
        if side == "hf":
            report["hf"] = run_child("hf", overrides(args, "plain"))
            _print("HF Trainer", report["hf"])
        else:
            report["strop"][side] = {"overrides": overrides(args, side), **run_child("strop", overrides(args, side))}
            _print(f"strop {side}", report["strop"][side])
        save()
    print(f"load average at start / end: {report['machine']['loadavg_at_start']} / {report['loadavg_at_end']}")
    print(f"wrote {path}")


def _print(name: str, r: dict) -> None:
    dev, test = r["validation"], r["test"]
    per = ", ".join(f"{t} {100 * v['f1']:.2f}" for t, v in test["per_type"].items())
    print(f"{name:22} dev F1 {100 * dev['f1']:.2f}  test F1 {100 * test['f1']:.2f} (macro {100 * test['macro_f1']:.2f};"
          f" {per})  train {r['train_seconds']:.0f} s, {r['steps']} steps", flush=True)


if __name__ == "__main__":
    main()
