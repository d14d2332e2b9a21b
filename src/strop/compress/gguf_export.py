"""A merged Llama-family causal LM folder -> one GGUF file (what llama.cpp, Ollama and LM Studio run), and a check
that the file generates what the folder generates.

The file follows llama.cpp's convert_hf_to_gguf.py for `LlamaForCausalLM` (SmolLM2, TinyLlama, Llama 2/3 shapes):
  tensors     renamed by gguf-py's own map (token_embd, blk.N.attn_q ... ffn_down, output_norm); a tied lm_head
              is not written, since llama.cpp reuses token_embd when output.weight is absent. Q and K rows are
              permuted per head: HF's rotary embedding pairs dimension i with i + head_dim/2 (rotate_half),
              llama.cpp's pairs i with i + 1, and the permutation makes the two compute the same attention.
              Transformers' GGUF loader applies the inverse permutation when it reads the file back.
  precision   1-D tensors (the RMSNorm weights) stay float32: tiny, and every activation is scaled by them. 2-D
              weights are f16, or q8_0 (blocks of 32 int8 values sharing one f16 scale, 8.5 bits a weight) when the
              row length is a multiple of 32 and f16 otherwise, as llama.cpp falls back.
  metadata    context length, widths, head counts, rope base and dimension, RMSNorm eps, vocab size, file type.
  tokenizer   byte-level BPE as `gpt2` with its tokens, token types, merges, special ids, add_bos/add_eos and the
              chat template; `tokenizer.ggml.pre` names the text split llama.cpp must apply before BPE.
The file is written as OUT.tmp and renamed to OUT when complete, so an interrupted export leaves no partial OUT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from strop.errors import ConfigError, ExportError, ModelError
from strop.models.backbone import read_model_config, resolve_model_path
from strop.models.gguf_import import load_gguf, require_gguf_support

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)  # model_type "llama"
DTYPES = ("f16", "q8_0")
Q8_0_BLOCK = 32  # values per q8_0 block: a row must be a whole number of blocks
# the Split regex of Llama 3's tokenizer.json, which llama.cpp calls `llama-bpe`
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_SPLITS = "ByteLevel (gpt-2), Digits + ByteLevel (smollm), Llama 3's Split + ByteLevel (llama-bpe)"


def export_gguf(model_folder: str | Path, out_file: str | Path, dtype: str = "f16") -> Path:
    """Write `model_folder` (a merged HF causal LM of the Llama family) to the GGUF file `out_file` and return it.

    dtype: "f16" (2 bytes a weight, near-lossless) or "q8_0" (~1.06 bytes a weight).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not a GGUF export type; choose one of {list(DTYPES)}")
    require_gguf_support()
    import gguf

    folder = resolve_model_path(model_folder)
    check_exportable(folder, read_model_config(folder))
    model, tokenizer = load_folder(folder)
    pre = gguf_pre_tokenizer(tokenizer, folder)
    out = Path(out_file).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch="llama")
    try:
        write_model_metadata(writer, model.config, dtype, folder.name)
        write_tokenizer_metadata(writer, tokenizer, folder, pre, model.config.vocab_size)
        for name, data, raw_dtype in gguf_tensors(model, dtype):
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


def check_exportable(folder: Path, config: dict) -> None:
    """Refuse what this writer would get wrong, before any weight is read."""
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" or not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        found = ", ".join(architectures) or "no architectures listed"
        raise ModelError(f"{folder} is a {config.get('model_type')!r} model ({found}); GGUF export supports the "
                         f"Llama family: model_type 'llama' with architectures {list(SUPPORTED_ARCHITECTURES)} "
                         "(SmolLM2, TinyLlama, Llama 2/3 shapes). Export a merged causal-LM folder of that family")
    biases = [key for key in ("attention_bias", "mlp_bias") if config.get(key)]
    if biases:
        raise ModelError(f"{folder}/config.json sets {', '.join(biases)}=true; GGUF export writes bias-free Llama "
                         "layers only, so this model cannot be exported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(f"{folder}/config.json uses rope_type={rope_type!r}; GGUF export writes plain rotary "
                         "embeddings only (rope_type 'default'), and a scaled rope written as plain would change "
                         "every long-context answer")


def load_folder(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def backend_json(tokenizer, folder: Path) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"the tokenizer of {folder} has no tokenizer.json backend; GGUF export needs a fast "
                         "(tokenizers) BPE tokenizer. Save one there with tokenizer.save_pretrained")
    return json.loads(backend.to_str())


def gguf_pre_tokenizer(tokenizer, folder: Path) -> str:
    """llama.cpp's name for the text split this byte-level BPE tokenizer applies before its merges."""
    spec = backend_json(tokenizer, folder)
    model_type, decoder = spec["model"].get("type"), (spec.get("decoder") or {}).get("type")
    if model_type != "BPE" or decoder != "ByteLevel":
        raise ModelError(f"the tokenizer of {folder} is {model_type} with a {decoder} decoder; GGUF export writes "
                         "byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2', as SmolLM2's and Llama 3's)")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise ModelError(f"the tokenizer of {folder} splits text with {kinds}, which has no llama.cpp pre-tokenizer "
                     f"name here; GGUF export knows {SUPPORTED_SPLITS}. A wrong name would make llama.cpp "
                     "tokenize differently from training, so nothing was written")


def write_model_metadata(writer, config, dtype: str, name: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)  # llama.cpp derives head_dim from hidden/heads unless told
        writer.add_value_length(head_dim)


def write_tokenizer_metadata(writer, tokenizer, folder: Path, pre: str, vocab_size: int) -> None:
    """The keys llama.cpp's converter writes for a byte-level BPE (its SpecialVocab's, read here from the tokenizer
    itself so that neither the gguf version nor where transformers saved the chat template matters)."""
    tokens, types = vocab_tokens(tokenizer, vocab_size, folder)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(tokenizer, folder))
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # stated from what the tokenizer does: llama.cpp's per-vocabulary default may differ
    adds = adds_bos_eos(tokenizer)
    writer.add_add_bos_token(adds["bos"])
    writer.add_add_eos_token(adds["eos"])
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: GGUF stores them as a list of {name, template}
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


def bpe_merges(tokenizer, folder: Path) -> list[str]:
    """The merges as "left right" strings, best first. tokenizers writes [left, right] pairs since 0.20; a
    byte-level token never holds a real space (it is spelled Ġ), so joining with one is unambiguous."""
    merges = backend_json(tokenizer, folder)["model"].get("merges") or []
    if not merges:
        raise ModelError(f"the tokenizer of {folder} has no BPE merges in its tokenizer.json; save it again with "
                         "tokenizer.save_pretrained")
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def adds_bos_eos(tokenizer) -> dict[str, bool]:
    """Whether encoding text adds the BOS / EOS token: {"bos": bool, "eos": bool}."""
    ids = tokenizer("a")["input_ids"]
    return {"bos": tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id}


def vocab_tokens(tokenizer, vocab_size: int, folder: Path) -> tuple[list[str], list[int]]:
    """One token string and llama.cpp token type per embedding row: added special tokens are CONTROL, other
    added tokens USER_DEFINED, rows no token uses `[PAD<id>]` UNUSED (an embedding may be padded past the
    vocabulary)."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(f"the tokenizer of {folder} has token id {max(by_id)} but the model has {vocab_size} "
                         "embedding rows; resize the embeddings (model.resize_token_embeddings) before export")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def gguf_tensors(model, dtype: str):
    """(gguf name, numpy data, ggml type) for every weight, in the model's order."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"weight {hf_name} has no GGUF name for the llama architecture; this model has "
                              "layers a Llama does not, so it cannot be exported")
        data = tensor.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, config.num_key_value_heads)
        yield (name, *encode_tensor(data, dtype))


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head reordered from HF's half-split rotary pairs to llama.cpp's adjacent pairs:
    (n_head * head_dim, in) -> same shape (llama.cpp's LlamaModel.permute)."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def encode_tensor(data: np.ndarray, dtype: str):
    """(data to write, its ggml type)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if data.ndim == 1:
        return data.astype(np.float32), GGMLQuantizationType.F32
    if dtype == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
        return quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return data.astype(np.float16), GGMLQuantizationType.F16


def check_gguf(out_file: str | Path, model_folder: str | Path, prompts: list[str],
               max_new_tokens: int = 16) -> dict:
    """Load `out_file` with transformers' GGUF loader and compare it with the folder's model on `prompts`.

    Both models get the same prompt ids (the folder tokenizer's, through its chat template when it has one), so
    the comparison is of the weights; whether the GGUF's own tokenizer encodes the prompts alike is counted apart.
    Returns {"prompts": n, "identical": greedy generations equal token for token, "max_abs_logit_diff": largest
    logit difference over every prompt and generated position (teacher-forced on the folder's generation),
    "argmax_agreement": fraction of those positions whose top token is the same, "tokenization_identical": prompts
    the GGUF's tokenizer encodes to the same ids}.
    """
    import torch

    out = Path(out_file).expanduser()
    if not out.is_file():
        raise ExportError(f"GGUF file {out} not found; write it with export_gguf first")
    model, tokenizer = load_folder(resolve_model_path(model_folder))
    loaded, loaded_tokenizer = load_gguf(out)
    identical = same_tokens = agree = positions = 0
    max_diff = 0.0
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        same_tokens += prompt_ids(loaded_tokenizer, prompt) == ids
        expected = greedy(model, tokenizer, ids, max_new_tokens)
        identical += torch.equal(greedy(loaded, tokenizer, ids, max_new_tokens), expected)
        with torch.no_grad():
            ours, theirs = model(expected).logits[0], loaded(expected).logits[0]
        max_diff = max(max_diff, (ours - theirs).abs().max().item())
        agree += (ours.argmax(-1) == theirs.argmax(-1)).sum().item()
        positions += len(ours)
    return {"prompts": len(prompts), "identical": identical, "max_abs_logit_diff": max_diff,
            "argmax_agreement": agree / max(positions, 1), "tokenization_identical": same_tokens}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_dict=True)
        return list(encoded["input_ids"])
    return tokenizer(prompt)["input_ids"]


def greedy(model, tokenizer, ids: list[int], max_new_tokens: int):
    """The prompt followed by up to `max_new_tokens` greedy tokens: (1, len(ids) + new) LongTensor. The same
    explicit generation settings for both models, so a folder's saved sampling settings cannot differ."""
    import torch
    from transformers import GenerationConfig

    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              generation_config=settings)
