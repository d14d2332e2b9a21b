"""Shared fixtures: a tiny random BERT (real tokenizer of the default model) and small labelled files."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "src" / "strop" / "demo" / "support_tickets.csv"

TOPICS = {
    "billing": ["refund", "charged", "invoice", "payment", "card"],
    "shipping": ["parcel", "delivery", "courier", "tracking", "package"],
    "account": ["password", "login", "email", "profile", "username"],
}
FILLER = ["please", "help", "my", "the", "today", "again", "with", "order", "i", "need", "about", "this"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT saved as safetensors, with all-MiniLM-L6-v2's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from strop.models.backbone import default_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def toy_rows(n: int, seed: int, pairs: bool = False) -> list[dict]:
    """Texts whose topic is decided by keywords, so even a tiny model learns them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        words = rng.sample(FILLER, rng.randint(2, 8)) + rng.sample(TOPICS[label], 2)
        rng.shuffle(words)
        row = {"text": " ".join(words), "label": label}
        if pairs:
            row = {"sentence1": row["text"], "sentence2": " ".join(rng.sample(FILLER, 3)), "label": label}
        rows.append(row)
    return rows


def toy_documents(n: int, seed: int) -> list[str]:
    """Unlabelled documents (masked-LM pretraining): a few toy texts each, and a word of 6 subwords."""
    rng = random.Random(seed)
    texts = [". ".join(r["text"] for r in toy_rows(rng.randint(2, 4), seed * 1000 + i)) for i in range(n)]
    return [t + " unsubscribed again" for t in texts]


def write_lines(path: Path, texts: list[str]) -> Path:
    """One text per line (a .txt corpus)."""
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def toy_splits(tmp_path) -> dict[str, Path]:
    return {split: write_csv(tmp_path / f"{split}.csv", toy_rows(n, seed))
            for split, n, seed in (("train", 90, 1), ("validation", 30, 2), ("test", 30, 3))}


def tiny_overrides(model: Path, out: Path, **extra) -> list[str]:
    """Overrides for a fast, exact (fp32) run of the tiny model."""
    # a random 32-wide BERT needs a high lr and a few dozen steps before its loss moves
    base = {"model.path": str(model), "output_dir": str(out), "train.precision": "fp32", "train.epochs": 4,
            "train.batch_size": 8, "train.lr": 1e-2, "train.warmup": 0, "train.log_every": 4, "train.threads": 2,
            "name": "run"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FOODS = ["italian", "chinese", "french", "indian", "japanese", "english"]
NAMES = ["alimentum", "aromi", "bibimbap", "clowns", "cotto", "giraffe", "loch", "strada", "wrestlers", "zizzi"]


def toy_generation_rows(n: int, seed: int) -> list[dict]:
    """E2E-like pairs whose answer is a fixed function of the prompt (a tiny model can learn it)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, food = rng.choice(NAMES), rng.choice(FOODS)
        rows.append({"prompt": f"name[{name}], food[{food}]", "completion": f"{name} serves {food} food."})
    return rows


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama with a byte-level BPE tokenizer trained here and a ChatML template (the
    format of SmolLM2-Instruct), saved as safetensors."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [f"{r['prompt']} {r['completion']} user assistant system" for r in toy_generation_rows(300, 0)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


IMAGE_CLASSES = ["horizontal", "spot", "vertical"]


def toy_images(n: int, seed: int, side: int = 20, colour: bool = True):
    """(images (n, side, side, 3) or (n, side, side) uint8, labels (n,) int64): dark noise with, by class, two
    bright horizontal lines, a bright 6x6 square or two vertical lines, anywhere: shapes a tiny CNN tells apart
    (global pooling forgets where they are)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(IMAGE_CLASSES)
    images = rng.integers(0, 60, (n, side, side, 3) if colour else (n, side, side)).astype(np.uint8)
    for i, label in enumerate(labels):
        at = int(rng.integers(0, side - 6))
        if label == 1:
            images[i, at:at + 6, at:at + 6] = 230
        elif label == 0:
            images[i, [at, at + 4]] = 230
        else:
            images[i, :, [at, at + 4]] = 230
    return images, labels.astype(np.int64)


def write_image_folder(folder: Path, n: int, seed: int) -> Path:
    """n toy PNG images in one subfolder per class (folder/<class>/<i>.png)."""
    from PIL import Image

    images, labels = toy_images(n, seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / IMAGE_CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / IMAGE_CLASSES[label] / f"{i:03d}.png")
    return folder


MULTI_IMAGE_LABELS = ["lines", "square"]


def toy_multi(n: int, seed: int, side: int = 20):
    """(images (n, side, side, 3) uint8, labels (n, 2) 0/1): dark noise with two horizontal bright lines
    (label 0), a bright 6x6 square (label 1), both, or neither, anywhere: each combination a quarter."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.array([[i % 2, (i // 2) % 2] for i in range(n)], dtype=np.uint8)
    images = rng.integers(0, 60, (n, side, side, 3)).astype(np.uint8)
    for i, (lines, square) in enumerate(labels):
        if lines:
            at = int(rng.integers(0, side - 5))
            images[i, [at, at + 4]] = 230
        if square:
            at = int(rng.integers(0, side - 6))
            images[i, at:at + 6, at:at + 6] = 230
    return images, labels


def write_multi_image_table(folder: Path, n: int, seed: int) -> Path:
    """n toy PNG images (toy_multi) and a JSONL table naming them, with the list of each image's labels."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = toy_multi(n, seed)
    rows = []
    for i, (image, row) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        names = [name for name, on in zip(MULTI_IMAGE_LABELS, row) if on]
        rows.append({"image": f"{i:03d}.png", "labels": names})
    return write_jsonl(folder / "labels.jsonl", rows)


DICOM_PATIENT = "Doe^Jane"


def write_dicom(path: Path, pixels, photometric: str = "MONOCHROME2", **tags) -> Path:
    """A minimal, valid DICOM file (Secondary Capture) with a patient name and ID, `pixels` stored as given."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = DICOM_PATIENT, "MRN-0042"
    if pixels is not None:
        bits = 8 if pixels.dtype.itemsize == 1 else 16
        ds.set_pixel_data(pixels, photometric, bits)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def tiny_vision_model(tmp_path_factory) -> Path:
    """A 3-block, 8-16 channel random EfficientNet-Lite (5k parameters) in strop's vision folder format."""
    from strop.models.efficientnet_lite import EfficientNetLite, LiteConfig
    from strop.models.vision import ImageProcessor

    folder = tmp_path_factory.mktemp("tiny-efficientnet")
    config = LiteConfig(stem=8, stages=[[1, 3, 1, 1, 8], [2, 3, 2, 4, 16]], features=32, dropout=0.0,
                        drop_path=0.0)
    torch.manual_seed(0)
    EfficientNetLite(config, 10).save_pretrained(folder)
    ImageProcessor().save_pretrained(folder)
    return folder
