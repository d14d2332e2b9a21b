"""`strop export` for a generation run: a GGUF file (f16 or q8_0, chat template inside) for llama.cpp / Ollama,
checked by loading it back and comparing greedy answers with the run's model on held prompts.

The run's model/ folder is already the deployable Hugging Face model (LoRA merged when the run saved it, checked
then), so the export adds RUN/export/model.gguf and parity.json, written in RUN/export.tmp/ and swapped in whole.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from strop.compress.folders import replace_folder, tidy_leftovers
from strop.compress.gguf_export import DTYPES, check_gguf, export_gguf
from strop.errors import ExportError

HELD_PROMPTS = 8  # prompts the check generates for: enough to catch a broken tensor, quick on a CPU
FALLBACK_PROMPTS = ["Hello! Who are you?", "Write one sentence about the sea.", "What is 12 plus 30?"]


def held_prompts(examples, k: int = HELD_PROMPTS) -> list[str]:
    """The last user turn of the first `k` prompts of a held split (the generic ones when the data are gone)."""
    if examples is None:
        return FALLBACK_PROMPTS
    return [turns[-1]["content"] for turns in examples.prompts()[:k]]


def export_generation(run_dir: Path, model_dir: Path, examples, dtype: str, log=print) -> dict:
    """Write RUN/export/model.gguf + parity.json; f16 must give the same greedy answers on every held prompt
    (else ExportError, the files kept in RUN/export.failed/); q8_0 reports how many agree."""
    if dtype not in DTYPES:
        raise ExportError(f"--gguf {dtype}: choose one of {list(DTYPES)}")
    tidy_leftovers(run_dir, log)
    prompts = held_prompts(examples)
    tmp, final = run_dir / "export.tmp", run_dir / "export"
    shutil.rmtree(run_dir / "export.failed", ignore_errors=True)
    tmp.mkdir()
    try:
        started = time.perf_counter()
        out = export_gguf(model_dir, tmp / "model.gguf", dtype)
        log(f"wrote {out.name} ({out.stat().st_size / 2**20:.1f} MiB, {dtype}); checking greedy answers on "
            f"{len(prompts)} held prompts")
        check = check_gguf(out, model_dir, prompts, max_new_tokens=32)
        parity = {"run": run_dir.name, "format": "gguf", "dtype": dtype, "file": "model.gguf",
                  "size_mb": out.stat().st_size / 2**20, "check": check, "seconds": time.perf_counter() - started,
                  "passed": dtype != "f16" or check["identical"] == check["prompts"]}
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2), encoding="utf-8")
        if not parity["passed"]:
            replace_folder(tmp, run_dir / "export.failed")
            raise ExportError(f"the f16 GGUF answers {check['prompts'] - check['identical']} of "
                              f"{check['prompts']} held prompts differently from the run's model (max logit "
                              f"difference {check['max_abs_logit_diff']:.3g}); see {run_dir / 'export.failed'}")
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {final}: {check['identical']}/{check['prompts']} greedy answers identical, argmax agreement "
        f"{check['argmax_agreement']:.3f}")
    return parity
