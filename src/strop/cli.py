"""`strop train|eval|predict`: one verb = one function. User errors print a message and exit with code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape

from strop.errors import StropError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune pretrained transformers for your task: train, tune, evaluate, predict, explain, "
                       "report, export, serve, bench.")
err = Console(stderr=True, soft_wrap=True)  # error messages stay one line, greppable


def _print_config_help() -> None:
    from strop.config import help_lines
    from strop.tasks import TASKS

    # plain aligned text, not a table: keys must stay whole (greppable, copy-pasteable) at any terminal width
    print("config fields: set them in YAML sections or as key=value overrides\n")
    print("tasks (task=...): auto, " + ", ".join(f"{name} ({t.description})" for name, t in TASKS.items()) + "\n")
    section = None
    for key, default, text in help_lines():
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            print(f"[{head}]" if head else "[run]")
        print(f"  {key:<30} {default or '-':<16} {text}")


@app.command(context_settings={"allow_extra_args": False})
def train(
    args: Optional[List[str]] = typer.Argument(None, metavar="[CONFIG.yaml] [KEY=VALUE]...",
                                               help="a YAML config and/or overrides such as train.lr=3e-4"),
    help_config: bool = typer.Option(False, "--help-config", help="list every config field with its default and doc"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder of the same name"),
    resume: Optional[str] = typer.Option(None, "--resume", help="continue a run folder from its newest complete "
                                         "checkpoint (its config.yaml is used; overrides still apply)"),
):
    """Fine-tune a model; writes runs/<name>/ (config.yaml, metrics.jsonl, model/, results.json, tb/).

    Example: strop train configs/quickstart.yaml train.epochs=1 name=try1
    """
    if help_config:
        _print_config_help()
        return
    from strop.run import train as run_train

    args = list(args or [])
    config = args.pop(0) if args and "=" not in args[0] else None
    if resume:
        run_train(None, args, resume=resume)
        return
    if config is None and not args:
        raise typer.BadParameter("give a config file and/or key=value overrides (at least data.train=FILE)")
    run_train(config, args, overwrite=overwrite)


@app.command(context_settings={"allow_extra_args": False})
def pretrain(
    args: Optional[List[str]] = typer.Argument(None, metavar="[CONFIG.yaml] [KEY=VALUE]...",
                                               help="a YAML config and/or overrides (data.train=...)"),
    help_config: bool = typer.Option(False, "--help-config",
                                     help="list every config field with its default and doc"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder of that name"),
    resume: Optional[str] = typer.Option(None, "--resume", help="continue a run folder from its newest "
                                         "complete checkpoint (its config.yaml is used; overrides apply)"),
):
    """Continue pretraining an encoder on unlabelled text (masked LM on whole words): task=masked_lm.

    Data: a .txt file, one document per line, or the text column of a CSV/JSONL/Parquet file.
    data.text_column names that column; the other columns, a label among them, are ignored.
    Documents are packed into rows of model.max_length tokens.
    Masking: mlm.probability of the words (default 0.15); of their tokens 80% [MASK], 10% random, 10% kept.
    Validation perplexity (fixed masks) picks the best step and drives train.early_stopping_patience.
    Writes runs/<name>/ like strop train; its model/ is an encoder folder to fine-tune:
    strop train model.path=runs/<name>/model data.train=labelled.csv

    Example: strop pretrain data.train=abstracts.txt train.epochs=3 name=abstracts-mlm
    """
    args = list(args or [])
    other = [a for a in args if a.startswith("task=") and a != "task=masked_lm"]
    if other:
        raise StropError(f"strop pretrain trains task=masked_lm, not {other[0]}; use strop train for that")
    config = args[:1] if args and "=" not in args[0] else []
    if not help_config and not resume and not args:
        raise typer.BadParameter("give a config file and/or key=value overrides (at least data.train=FILE)")
    train(config + ["task=masked_lm"] + args[len(config):], help_config, overwrite, resume)


@app.command(context_settings={"allow_extra_args": False})
def tune(
    args: List[str] = typer.Argument(..., metavar="CONFIG.yaml [KEY=VALUE]...",
                                     help="a YAML config with a tune.space section, and/or overrides"),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="trials to finish in total (default: "
                                         "tune.trials); an interrupted search continues where it stopped"),
):
    """Hyperparameter search with Optuna (TPE, median pruning); each trial is a run folder runs/<name>-trial-<k>.

    Writes runs/<name>-tune/ (best.yaml, trials.json, trials.png, report.html); the study is stored in
    runs/<name>-tune.db. Example: strop tune configs/tune-quickstart.yaml --trials 8
    """
    from strop.tune import tune as run_tune

    args = list(args)
    config = args.pop(0) if args and "=" not in args[0] else None
    result = run_tune(config, args, trials)
    print(json.dumps({"best_value": result.best_value, "best_params": result.best_params,
                      "best_config": str(result.tune_dir / "best.yaml") if result.best_run else None,
                      "report": str(result.tune_dir / "report.html")}))


FORMAT_HELP = "input file format: auto (from the extension), csv, tsv, jsonl, parquet or hf"
ENCODING_HELP = "text encoding of the input file, e.g. latin-1 (a Python codec name)"


def _write_out(out: Path, text: str) -> None:
    """Write a result file whole or not at all, creating its folder."""
    from strop.runs import write_atomic

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text)
    except OSError as e:
        raise StropError(f"cannot write --out {out}: {e.strerror or e}; choose a path you can write to") from None
    err.print(f"wrote {escape(str(out))}")


def _stdin_lines() -> list[str]:
    """Non-blank lines of stdin, decoded as UTF-8 whatever the locale says (a byte-order mark is dropped)."""
    texts = []
    binary = getattr(sys.stdin, "buffer", None)  # None where a caller swapped in a text stream
    for number, raw in enumerate(binary if binary is not None else sys.stdin, 1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8") if binary is not None else raw
            line.encode("utf-8")  # a text stream may still hold undecodable bytes, as lone surrogates
        except UnicodeError as e:
            raise StropError(f"stdin line {number} is not valid UTF-8 (at {e.start}); convert the input to UTF-8 "
                             "(e.g. iconv -f latin1 -t utf-8), or give --data FILE --encoding ...") from None
        if line.strip():
            texts.append(line.rstrip("\r\n"))
    return texts


@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="run folder (runs/<name>), its model/ folder, or an export folder"),
    data: Path = typer.Option(..., "--data", help="labelled CSV/TSV/JSONL/Parquet file"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the metrics to this JSON file"),
    batch_size: int = typer.Option(128, min=1, help="examples per forward pass"),
    fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    encoding: str = typer.Option("utf-8", "--encoding", help=ENCODING_HELP),
):
    """Evaluate a finished run on a labelled file; prints the metrics as JSON."""
    from strop.predict import check_output
    from strop.tasks import load_predictor

    if out is not None:
        check_output(out, (".json",), ".json")
    metrics = load_predictor(run).evaluate_file(data, batch_size, fmt=fmt, encoding=encoding)
    text = json.dumps(metrics, indent=2)
    if out is not None:
        _write_out(out, text)
    print(text)


@app.command()
def predict(
    run: Path = typer.Argument(..., help="run folder (runs/<name>), its model/ folder, or an export folder"),
    data: Optional[Path] = typer.Option(None, "--data", help="input file; without it, one text per line from stdin"),
    out: Optional[Path] = typer.Option(None, "--out", help="output .jsonl or .csv; default: JSON lines on stdout"),
    batch_size: int = typer.Option(64, min=1, help="examples per forward pass"),
    fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    encoding: str = typer.Option("utf-8", "--encoding", help=ENCODING_HELP),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="generation runs: most tokens per answer (default: the run's)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0,
                                                help="generation runs: 0 = greedy (default), > 0 samples"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="generation runs: nucleus sampling mass"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="generation runs: a text that ends an answer "
                                                                  "(repeatable)"),
):
    """Predict labels and probabilities, or (generation runs) generate answers to prompts; the output keeps the
    input columns, in input order.

    An output named like an input column (a gold 'label', say) is written as 'pred_label' beside it. Generation
    runs read prompts from stdin (one per line), .txt (one per line) or JSONL/CSV/Parquet (prompt or messages).
    """
    from strop.predict import check_output
    from strop.tasks import load_predictor

    if out is not None:
        check_output(out)
    predictor = load_predictor(run)
    options = _generation_options(predictor, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  stop=stop or None)
    if data is not None and out is not None:
        n = predictor.predict_file(data, out, batch_size, fmt=fmt, encoding=encoding, **options)
        err.print(f"wrote {n} predictions to {escape(str(out))}")
        return
    if data is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "preds.jsonl"
            predictor.predict_file(data, path, batch_size, fmt=fmt, encoding=encoding, **options)
            sys.stdout.write(path.read_text(encoding="utf-8"))
        return
    texts = _stdin_lines()
    if not texts:
        raise StropError("no input: give --data FILE or pipe one text per line on stdin")
    preds = predictor.predict(texts, batch_size=batch_size, **options)
    if out is not None:
        from strop.predict import write_predictions

        write_predictions(out, ["text"], [{"text": t} for t in texts], preds, predictor.flat)
        return
    for text, pred in zip(texts, preds):
        print(json.dumps({"text": text, **pred}, ensure_ascii=False))


def _generation_options(predictor, **given) -> dict:
    """The decoding options the user gave; refused for a model that does not generate."""
    given = {k: v for k, v in given.items() if v is not None}
    if given and not hasattr(predictor, "stream"):
        raise StropError(f"{', '.join('--' + k.replace('_', '-') for k in given)} apply to generation runs; this "
                         f"model is a {predictor.task.name} model")
    return given


@app.command()
def chat(
    run: Path = typer.Argument(..., help="a generation run folder (runs/<name>) or its model/ folder"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="most tokens per answer"),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="0 = greedy, > 0 samples"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="nucleus sampling mass (with --temperature)"),
    system: Optional[str] = typer.Option(None, "--system", help="a system message that opens the conversation"),
):
    """Talk to a generation run: type a message, the answer streams token by token; the conversation is kept
    (/reset clears it, /exit or Ctrl-D leaves)."""
    from strop.tasks import load_predictor

    generator = load_predictor(run)
    options = _generation_options(generator, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if not hasattr(generator, "stream"):
        raise StropError(f"strop chat talks to generation runs; {run} is a {generator.task.name} model "
                         "(use strop predict)")
    opening = [{"role": "system", "content": system}] if system else []
    turns = list(opening)
    err.print("chat: type a message (/reset clears the conversation, /exit leaves)")
    for line in sys.stdin:
        message = line.rstrip("\r\n")
        if message.strip() in ("/exit", "/quit"):
            break
        if message.strip() == "/reset":
            turns = list(opening)
            continue
        if not message.strip():
            continue
        turns.append({"role": "user", "content": message})
        answer = ""
        for piece in generator.stream(turns, **options):
            answer += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        turns.append({"role": "assistant", "content": answer})


@app.command()
def report(
    run: Path = typer.Argument(..., help="a finished run folder (runs/<name>)"),
    explain_k: int = typer.Option(5, "--explain", min=0, help="attribute this many of the most confident errors"),
):
    """(Re)build RUN/report.html: config, data, curves, metrics, confusion matrix, calibration, worst errors."""
    from strop.evaluate.report import build_report
    from strop.runs import open_run

    model_dir = open_run(run)
    out = build_report(model_dir.parent if model_dir.name == "model" else run, explain_k=explain_k)
    err.print(f"wrote {escape(str(out))}")


@app.command()
def explain(
    run: Path = typer.Argument(..., help="run folder (runs/<name>) or its model/ folder"),
    text: Optional[str] = typer.Option(None, "--text", help="the text to explain"),
    pair: Optional[str] = typer.Option(None, "--pair", help="second text, for models of text pairs"),
    data: Optional[Path] = typer.Option(None, "--data", help="explain every row of this file instead"),
    target: Optional[str] = typer.Option(None, "--target", help="label to explain; default: the predicted one"),
    steps: int = typer.Option(50, min=2, help="integration steps to start with (doubled until complete)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write .json (attributions) or .html (coloured "
                                       "tokens); with --image: the overlays' folder (default RUN/explain)"),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="image classifiers: an image file or a "
                                               "folder of them (repeatable)"),
):
    """Token attributions (integrated gradients, with the completeness check) and attention rollout; for
    image classifiers Grad-CAM and integrated gradients, written as PNG heatmaps over each image.

    Example: strop explain runs/sst2 --text "a gripping, beautifully shot film" --out why.html
    Example: strop explain runs/xray --image scans/ --out why/
    """
    from rich.console import Console

    from strop.explain.attribution import explanations_html, require_captum
    from strop.tasks import load_predictor

    require_captum()
    if image:
        if text is not None or data is not None:
            raise StropError("give --image, or --text / --data, not both")
        _explain_images(run, image, target, steps, out)
        return
    if (text is None) == (data is None):
        raise StropError("give either --text \"...\", --data FILE or --image FILE")
    if out is not None:
        from strop.predict import check_output

        check_output(out, (".html", ".json", ".jsonl"), ".html or .json")
    predictor = load_predictor(run)
    inputs = [(text, pair)] if text is not None else predictor.explain_inputs(data)
    console = Console(stderr=out is None)
    results = []
    for t, p in inputs:
        found = predictor.explain(t, p, target=target, steps=steps)  # NER: one per predicted entity
        if not found:
            console.print(f"nothing to explain (no prediction) in: {escape(t)}")
        for ex in found:
            results.append(ex)
            _print_explanation(console, ex)
    if out is not None:
        kind = out.suffix.lower()
        _write_out(out, explanations_html(results) if kind == ".html" else
                   "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in results) if kind == ".jsonl"
                   else json.dumps([e.to_dict() for e in results], indent=2, ensure_ascii=False))
    else:
        print(json.dumps([e.to_dict() for e in results], ensure_ascii=False))


def _explain_images(run: Path, images: list[Path], target: str | None, steps: int, out: Path | None) -> None:
    """Grad-CAM and integrated-gradients overlays of the images into `out` (default RUN/explain/), one JSON
    object per image on stdout; every image is read and explained before anything is written."""
    from strop.explain.image_attribution import write_overlays
    from strop.runs import open_run
    from strop.tasks import load_predictor

    if out is not None and out.exists() and not out.is_dir():
        raise StropError(f"--out {out} is a file; with --image it names the folder the PNG overlays go to")
    predictor = load_predictor(run)
    explain_images = getattr(predictor, "explain_images", None)
    if explain_images is None:
        raise StropError(f"--image explains image classifiers; {run} is a {predictor.task.name} model: give "
                         "--text or --data")
    found = explain_images(images, target=target, steps=steps)
    if out is None:  # the run folder's explain/, also when given its model/ or adapter/ folder
        model_dir = open_run(run)
        out = (model_dir.parent if (model_dir.parent / "config.yaml").is_file() else model_dir) / "explain"
    records = write_overlays(found, out)
    for ex, record in zip(found, records):
        c = record["completeness"]
        err.print(f"{escape(ex.source)}: {escape(record['label'])} ({record['score']:.3f}); Grad-CAM of "
                  f"{escape(ex.target)} at {escape(ex.layer.describe())}; integrated gradients sum "
                  f"{c['sum']:+.4f} vs logit difference {c['logit_diff']:+.4f} ({c['steps']} steps"
                  f"{'' if c['within_tolerance'] else ', NOT within tolerance'})", highlight=False)
    err.print(f"wrote {2 * len(records)} PNG overlays to {escape(str(out))}", highlight=False)
    print(json.dumps(records, ensure_ascii=False))


def _print_explanation(console, ex) -> None:
    from strop.explain.attribution import to_rich_text

    c = ex.completeness
    console.print(f"[bold]{escape(str(ex.target))}[/bold] (completeness: attributions sum {c['sum']:+.4f}, logit difference "
                  f"{c['logit_diff']:+.4f}, {c['steps']} steps{'' if c['within_tolerance'] else ', NOT within tolerance'})")
    console.print(to_rich_text(ex))


@app.command()
def export(
    run: Path = typer.Argument(..., help="finished run folder (runs/<name>); writes RUN/export/"),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="ONNX Runtime and PyTorch dynamic int8 "
                              "(image runs: ONNX static int8, calibrated on training images)"),
    static_int8: bool = typer.Option(False, "--static-int8", help="also ONNX static int8, calibrated on "
                                     "training data (image runs: their int8 is static already)"),
    prune: Optional[str] = typer.Option(None, "--prune", help="magnitude=S (unstructured) and/or heads=F,ffn=F "
                                        "(structured: removes that share of heads / FFN neurons in every layer)"),
    recover_epochs: float = typer.Option(0.0, min=0, help="fine-tune the pruned model this many epochs"),
    distill: int = typer.Option(0, min=0, help="train a student with this many layers (0 = none)"),
    distill_epochs: float = typer.Option(3.0, min=0, help="student training epochs"),
    temperature: float = typer.Option(2.0, help="distillation temperature"),
    alpha: float = typer.Option(0.5, help="weight of the teacher's soft labels (1 - alpha: gold labels)"),
    distill_augment: int = typer.Option(0, min=0, help="perturbed copies of each training example (masked or "
                                        "swapped words, n-grams) that the teacher labels for the student; 0 = none"),
    lr: Optional[float] = typer.Option(None, help="learning rate for recovery/distillation; default: the run's"),
    tolerance: float = typer.Option(1e-3, help="max |logit difference| allowed between ONNX and PyTorch"),
    data: Optional[Path] = typer.Option(None, "--data", help="labelled held-out file for parity and quality; "
                                        "default: the run's validation split"),
    timing: bool = typer.Option(True, "--timing/--no-timing", help="measure latency and throughput per variant"),
    threads: int = typer.Option(0, min=0, help="threads for torch and onnxruntime; 0 = all cores"),
    gguf: str = typer.Option("f16", "--gguf", help="generation runs: GGUF weights, f16 (near-lossless) or q8_0"),
):
    """Export a run to ONNX (+ int8, pruned, distilled), each checked against the original; writes RUN/export/.

    Example: strop export runs/sst2 --prune heads=0.25,ffn=0.5 --recover-epochs 1 --distill 3
    Token-classification (NER) runs export ONNX fp32 + int8 with per-token parity (no --prune / --distill).
    Image-classification runs export model.onnx (input pixel_values: batch x 3 x size x size, normalised;
    dynamic batch) with the same parity check, and model.int8.onnx: static int8 calibrated on 256 of the
    run's training images (normalised, not augmented), so the run's data must be readable (else --no-int8);
    parity.json gives the int8 model's accuracy and AUC change. --data takes labelled images (folder, table,
    .npz).
    Generation runs export RUN/export/model.gguf (llama.cpp / Ollama; chat template inside), its greedy answers
    compared with the run's model on held prompts; RUN/model/ is already the merged Hugging Face model.
    """
    from strop.compress.export import ExportOptions, export_run, print_summary
    from strop.compress.prune import parse_prune

    opts = ExportOptions(int8=int8, static_int8=static_int8, prune=parse_prune(prune) if prune else None,
                         recover_epochs=recover_epochs, distill=distill, distill_epochs=distill_epochs,
                         temperature=temperature, alpha=alpha, distill_augment=distill_augment, lr=lr,
                         tolerance=tolerance,
                         data=str(data) if data else None, timing=timing, threads=threads, gguf=gguf)
    parity = export_run(run, opts, log=err.print)
    if parity.get("format") != "gguf":  # the GGUF export says its result in one line as it finishes
        print_summary(parity)


@app.command()
def bench(
    steps: int = typer.Option(20, min=6, help="training steps of the throughput probe (the first 5 warm up)"),
    threads: int = typer.Option(0, min=0, help="torch threads; 0 = all cores"),
):
    """Measure this machine: peak matmul FLOP/s (fp32, bf16) and training throughput of the default model."""
    import os

    import torch

    from strop.bench import measure_peak_flops, training_probe

    torch.set_num_threads(threads or os.cpu_count() or 1)
    err.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measuring ...")
    peaks = {name: measure_peak_flops(dtype) / 1e9 for name, dtype in (("fp32", torch.float32),
                                                                         ("bf16", torch.bfloat16))}
    probe = training_probe(steps)
    result = {"peak_gflops": {k: round(v, 1) for k, v in peaks.items()}, "training_probe": probe}
    print(f"peak matmul: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(f"training probe (all-MiniLM-L6-v2, batch {probe['batch_size']}, max length 64, {probe['precision']}): "
          f"{probe['samples_per_s']:.1f} samples/s, {probe['tokens_per_s']:.0f} tokens/s")
    print(json.dumps(result))


@app.command(context_settings={"allow_extra_args": False})
def serve(
    target: Optional[Path] = typer.Argument(None, metavar="RUN_OR_EXPORT",
                                            help="run folder (runs/<name>), its model/ folder, or an export folder"),
    overrides: Optional[List[str]] = typer.Argument(None, metavar="[serve.KEY=VALUE]...",
                                                    help="serving settings, e.g. serve.max_wait_ms=2"),
    host: Optional[str] = typer.Option(None, "--host", help="address to bind (default 127.0.0.1; others need a key)"),
    port: Optional[int] = typer.Option(None, "--port", min=0, max=65535, help="TCP port (default 8000)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="server processes on this machine"),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="file holding the API key"),
    backend: Optional[str] = typer.Option(None, "--backend", help="torch (run's model/) or onnx (RUN/export/)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with a `serve:` section"),
    ray: bool = typer.Option(False, "--ray", help="deploy on Ray Serve with autoscaling replicas (needs ray[serve])"),
    help_config: bool = typer.Option(False, "--help-config", help="list every serve.* setting with its default"),
):
    """Serve a trained or exported model over HTTP: POST /v1/predict, GET /v1/model, /health/*, /metrics.

    A generation run answers OpenAI-compatible routes instead of /v1/predict:
    POST /v1/chat/completions, POST /v1/completions (plain, or "stream": true), GET /v1/models.
    Point an OpenAI client at http://HOST:PORT/v1 with the run's name as model.
    Concurrent requests share decode steps (serve.max_batch_size sequences at most).

    An image-classification run takes image files on /v1/predict: multipart uploads
    (curl -F image=@scan.png) or base64 in JSON ({"inputs": [{"image": "..."}]}).

    Example: strop serve runs/try2 --backend onnx serve.max_batch_tokens=4096
    """
    import os

    from strop.serve import require_serve_extra
    from strop.serve.settings import help_lines, load_serve_config

    if help_config:
        print("serve settings: a `serve:` section in --config YAML, or serve.key=value arguments\n")
        for key, default, text in help_lines():
            print(f"  {key:<30} {default or '-':<16} {text}")
        return
    if target is None:
        raise typer.BadParameter("give the run folder (runs/<name>) or export folder to serve")
    require_serve_extra()
    # OpenMP threads that spin between kernels starve the event loop: 429s and health checks then wait for a core
    # (measured: slowest 429 of a burst 0.73-1.2 s spinning vs 0.12-0.21 s passive, load average 7 on 2 cores)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    flags = {"host": host, "port": port, "workers": workers, "backend": backend,
             "api_key_file": str(api_key_file) if api_key_file else None}
    cfg = load_serve_config(config, list(overrides or []) + [f"{k}={v}" for k, v in flags.items() if v is not None])
    if ray:
        from strop.serve.ray_serve import run_ray

        run_ray(target, cfg)
        return
    from strop.serve.server import run_server

    run_server(target, cfg)


def _usage_errors() -> tuple[type, ...]:
    # typer >= 0.29 raises its vendored copy of click's exceptions; older typer raises click's own
    found = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException
        found.append(ClickException)
    except ImportError:
        pass
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except StropError as e:
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False)
        return getattr(e, "exit_code", 2)
    except (click.exceptions.Exit, typer.Exit) as e:
        return e.exit_code
    except _usage_errors() as e:
        hint = " (see --help)" if getattr(e, "ctx", None) else ""
        err.print(f"[bold red]error:[/bold red] {escape(e.format_message())}{hint}", highlight=False)
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort, typer.Abort):
        err.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
