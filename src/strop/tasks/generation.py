"""Generation: a decoder LLM learns to answer the user's prompts (supervised fine-tuning), then generates.

Data are prompt -> completion pairs, Alpaca records or chat conversations (data/chat.py), rendered by the model's
own chat template with the answers marked (data/chat_tokens.py). The loss is next-token cross-entropy on the
answers only (`generate.train_on_prompt` adds the prompt), averaged over supervised tokens, also across gradient
accumulation and processes (`batch_weight`). Validation watches loss / perplexity; the final evaluation also
generates answers for the test prompts and scores them (BLEU, ROUGE-L, chrF, exact match; evaluate/
generation_metrics.py). The model is the folder's `AutoModelForCausalLM`; the default is SmolLM2-135M-Instruct
(models/gguf_import.py); LoRA on every linear layer but the output embedding is the default method.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape
from torch.nn import functional as F

from strop.training.progress import console
from strop.data.batching import Encoded, eval_batches
from strop.data.chat import TASK, is_chat_data, prepare_chat
from strop.data.chat_tokens import (ChatEncoded, check_supervised, collate_chat, encode_chat, ensure_template,
                                    marked_example, pack, supervised_count)
from strop.device import autocast
from strop.errors import ConfigError
from strop.evaluate.generation_metrics import score_generations
from strop.evaluate.report_parts import generations_section
from strop.generate import Generator
from strop.models.backbone import load_pretrained
from strop.models.layers import scored_positions
from strop.models.gguf_import import default_decoder_path, gguf_to_folder
from strop.tasks.base import Task

EVAL_ROWS = 8  # examples per forward pass when scoring the loss: a (rows, tokens, vocabulary) logits tensor each


class Generation(Task):
    name = TASK
    description = "a decoder LLM answers prompts: prompt/completion, instruction/output or chat messages files"
    metrics = ("perplexity", "loss")
    model_inputs = ("input_ids", "attention_mask", "position_ids")  # position_ids: packed rows only
    head_names = ()  # nothing new to train in full: the output embedding is pretrained (and often tied)
    default_model = "SmolLM2-135M-Instruct"
    default_peft = "lora"
    generates = True
    export_refusal = ("a generation model is not exported to ONNX; its model/ folder is a plain Hugging Face "
                      "causal LM (AutoModelForCausalLM.from_pretrained)")

    def detects(self, cfg) -> bool:
        return is_chat_data(cfg)

    def prepare(self, cfg, carve: bool = True):
        return prepare_chat(cfg, carve)

    def model_path(self, cfg) -> str | Path:
        """model.path: default (SmolLM2-135M-Instruct), a .gguf file (de-quantised once into a cached folder), or
        a Hugging Face causal-LM folder."""
        path = str(cfg.model.path)
        if path == "default":
            return default_decoder_path()
        return gguf_to_folder(Path(path).expanduser()) if path.lower().endswith(".gguf") else cfg.model.path

    def check_settings(self, cfg, ds, processor) -> None:
        note = ensure_template(processor)
        if note:
            console.print(f"[yellow]{note}[/yellow]")
        if cfg.model.max_length < 16:
            raise ConfigError(f"model.max_length={cfg.model.max_length} leaves no room for a prompt and its answer; "
                              "set model.max_length>=16 (256 or more is usual for generation)")

    def encode(self, processor, examples, meta: dict) -> Encoded:
        ensure_template(processor)
        return encode_chat(processor, examples, meta["max_length"], meta.get("train_on_prompt", False))

    def check_encoded(self, enc: ChatEncoded, examples, split: str, processor=None) -> None:
        """Refuse training rows with nothing to learn; show the first one as the model reads it, the part the
        loss covers in green (printed to the terminal only: no log or tracker gets it)."""
        if split != "train":
            return
        check_supervised(enc, examples.where, "training")
        if processor is not None and len(enc):
            shown = "".join(f"[bold green]{escape(text)}[/bold green]" if supervised else f"[dim]{escape(text)}[/dim]"
                            for text, supervised in marked_example(processor, enc))
            console.print(f"first training example as the model reads it ([bold green]green[/bold green]: the "
                          f"{int(enc.labels[0].sum())} tokens the loss covers):\n{shown}")

    def training_rows(self, enc: ChatEncoded, cfg) -> Encoded:
        """generate.packing: several examples per row of model.max_length tokens, attention kept inside each."""
        if not cfg.generate.packing:
            return enc
        packed = pack(enc, cfg.model.max_length)
        console.print(f"generate.packing: {len(enc)} training examples in {len(packed)} rows of at most "
                      f"{cfg.model.max_length} tokens (train.batch_size counts rows)")
        return packed

    def collate(self, enc: Encoded, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        return collate_chat(enc, idx)

    def batch_weight(self, enc: Encoded, idx: np.ndarray) -> float:
        return float(supervised_count(enc, idx))

    def split_summary(self, ds, split: str, enc: Encoded) -> dict:
        return {"supervised_tokens": supervised_count(enc, np.arange(len(enc))),
                "prompts_truncated": enc.n_prompt_truncated}

    # -- model ----------------------------------------------------------------------------------------------------

    def build_model(self, cfg, labels: list[str]):
        from transformers import AutoModelForCausalLM

        m = cfg.model
        model = load_pretrained(AutoModelForCausalLM, Path(self.model_path(cfg)), m.allow_pickle,
                                m.trust_remote_code, dtype=torch.float32)
        if getattr(model.config, "quantization_config", None) is not None:
            raise ConfigError(f"{m.path} holds a quantised model, which cannot be trained; give a plain float "
                              "safetensors folder (or a .gguf through model.path=default)")
        return model

    def load_model(self, folder, meta: dict, head: bool = True):
        from transformers import AutoModelForCausalLM

        folder = default_decoder_path() if str(folder) == "default" else Path(folder)
        folder = gguf_to_folder(folder) if folder.suffix.lower() == ".gguf" else folder
        return load_pretrained(AutoModelForCausalLM, folder, dtype=torch.float32)

    def num_outputs(self, labels: list[str]) -> int:
        return 0

    def forward(self, model, batch: dict) -> torch.Tensor:
        """Logits at the positions the loss reads only, (supervised tokens, vocabulary): the output layer and the
        softmax are as wide as the vocabulary (49k for SmolLM2, ~20% of its compute), and most positions are
        prompt."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        with scored_positions(model, batch["labels"]):
            return model(**inputs).logits

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch's supervised tokens (labels shifted by one); `logits` are
        the model's (batch, sequence, vocabulary), or those of the scored positions only (`forward`)."""
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        if logits.dim() == 3:
            logits = logits[:, :-1][keep]
        return F.cross_entropy(logits.float(), labels[keep])

    # -- evaluation, metadata, prediction -------------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(self, model, enc: Encoded, labels: list[str], batch_size: int, device: torch.device,
                 precision: str = "fp32", threshold: float = 0.5, keep_outputs: bool = False):
        """{perplexity, loss, tokens}: the token-weighted loss over the split's supervised tokens."""
        was = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for idx in eval_batches(enc.lengths, min(batch_size, EVAL_ROWS)):
                batch = {k: v.to(device) for k, v in collate_chat(enc, idx).items()}
                with autocast(device, precision):
                    logits = self.forward(model, batch)
                n = int((batch["labels"][:, 1:] != -100).sum())
                if n:
                    total += float(self.loss(logits, batch)) * n
                    count += n
        finally:
            model.train(was)
        loss = total / max(count, 1)
        return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss, "tokens": count}, None

    def final_evaluate(self, model, processor, enc: Encoded, labels: list[str], cfg, device, precision: str,
                       threshold: float, generate: bool) -> dict:
        """Loss / perplexity; with `generate`, also answers to the split's prompts scored against references."""
        metrics, _ = self.evaluate(model, enc, labels, cfg.eval.batch_size, device, precision)
        if not generate or enc.references is None:
            return metrics
        g = cfg.generate
        rows = np.arange(len(enc)) if not g.eval_examples else np.arange(min(g.eval_examples, len(enc)))
        # fp32: a bf16 generator casts its model's weights, and this is the run's model, still to be saved
        gen = Generator(model, processor, {"max_length": cfg.model.max_length}, device, "fp32")
        console.print(f"generating answers for {len(rows)} prompts (greedy, at most {g.max_new_tokens} tokens)")
        outs = gen.generate_ids([enc.prompts[i] for i in rows], g.eval_batch_size, max_new_tokens=g.max_new_tokens)
        metrics.update(score_generations([o["text"] for o in outs], [enc.references[i] for i in rows],
                                         [o["finish_reason"] == "stop" for o in outs]))
        metrics["generated_tokens"] = sum(o["tokens"] for o in outs)
        return metrics

    def meta(self, cfg, ds) -> dict:
        g = cfg.generate
        return {"max_length": cfg.model.max_length, "text_column": ds.columns.text, "label_column": ds.columns.label,
                "text_pair_column": None, "train_on_prompt": g.train_on_prompt,
                "generation": {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                               "stop": list(g.stop)}}

    def predictor(self, model, processor, meta: dict, device: torch.device, precision: str = "fp32"):
        ensure_template(processor)
        return Generator(model, processor, meta, device, precision, task=self)

    def agreement(self, a: np.ndarray, b: np.ndarray, threshold: float) -> float | None:
        return None

    def report_sections(self, predictor, examples, results, split, errors_k, explain_k):
        if examples is None or examples.references is None:
            return {}, {}
        return {"generations": generations_section(predictor, examples, split, base=self.base_generator(predictor))}, {}

    def base_generator(self, predictor) -> Generator | None:
        """The model before fine-tuning, to show its answers beside the fine-tuned ones (None if not loadable)."""
        base = predictor.meta.get("base_model")
        try:
            model = self.load_model(base, predictor.meta)
        except Exception:  # noqa: BLE001 - the comparison is optional: the base folder may be gone
            return None
        return Generator(model, predictor.tokenizer, predictor.meta, predictor.device, predictor.precision)


GENERATION = Generation()
