"""strop export on a tiny random BERT: ONNX parity per task, int8, pruning, distillation, the CLI and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_overrides, toy_rows, write_csv

from strop.cli import main
from strop.compress.distill import distillation_loss, kept_layers, make_student
from strop.compress.export import ExportOptions, export_run, logits_of
from strop.compress.onnx import OnnxModel, export_graph, export_onnx
from strop.compress.prune import (encoder_layers, magnitude_prune, parse_prune, prune_ffn, prune_heads,
                                  sparsity_of)
from strop.config import Config, ModelConfig
from strop.data.batching import collate_inputs, encode
from strop.data.examples import Examples
from strop.errors import ExportError, RunError
from strop.models.backbone import load_tokenizer
from strop.models.classifier import save_model
from strop.tasks import build_model, get_task, load_trained

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _examples(n: int, pairs: bool = False) -> Examples:
    rows = toy_rows(n, seed=5, pairs=pairs)
    texts = [r["sentence1" if pairs else "text"] for r in rows]
    return Examples(texts, [r["sentence2"] for r in rows] if pairs else None, None, list(range(n)))


def _model(tiny_model, task: str, pooling: str = "cls"):
    torch.manual_seed(3)
    labels = {"single_label": ["a", "b", "c"], "multi_label": ["x", "y", "z", "w"], "regression": ["score"]}[task]
    return build_model(get_task(task), Config(model=ModelConfig(path=str(tiny_model), pooling=pooling)), labels).eval()


@pytest.mark.parametrize("task,pooling,pairs", [("single_label", "cls", False), ("multi_label", "cls", False),
                                                ("regression", "cls", False), ("single_label", "cls", True),
                                                ("single_label", "mean", False)])
def test_onnx_matches_pytorch_per_task(tiny_model, tmp_path, task, pooling, pairs):
    model, tok = _model(tiny_model, task, pooling), load_tokenizer(tiny_model)
    names = export_onnx(model, tok, tmp_path / "model.onnx", max_length=64)
    assert names == ("input_ids", "attention_mask", "token_type_ids")  # BERT's tokenizer makes segment ids
    onnx_model = OnnxModel(tmp_path / "model.onnx", threads=1)
    session_inputs = {i.name: i for i in onnx_model.session.get_inputs()}
    assert list(session_inputs) == list(names) and onnx_model.session.get_outputs()[0].name == "logits"
    assert all(i.type == "tensor(int64)" and i.shape == ["batch", "sequence"] for i in session_inputs.values())
    # different batch sizes and padded lengths than the export example: the axes really are dynamic
    enc = encode(tok, _examples(37, pairs), 64)
    ours, theirs = logits_of(model, enc, batch_size=16), logits_of(onnx_model, enc, batch_size=16)
    assert ours.shape == (37, {"single_label": 3, "multi_label": 4, "regression": 1}[task])
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """A trained tiny run exported once with every option: static int8, heads+FFN pruning with recovery, a 1-layer
    student distilled on the training set plus one augmented copy of each example."""
    tmp = tmp_path_factory.mktemp("export")
    splits = {s: write_csv(tmp / f"{s}.csv", toy_rows(n, seed)) for s, n, seed in
              (("train", 90, 1), ("validation", 30, 2), ("test", 30, 3))}
    args = tiny_overrides(tiny_model, tmp / "runs", **{"data.train": splits["train"],
                                                        "data.validation": splits["validation"],
                                                        "data.test": splits["test"]})
    assert main(["train", *args]) == 0
    run = tmp / "runs" / "run"
    assert main(["export", str(run), "--static-int8", "--prune", "heads=0.5,ffn=0.5", "--recover-epochs", "1",
                 "--distill", "1", "--distill-epochs", "2", "--distill-augment", "1", "--lr", "1e-2",
                 "--threads", "2"]) == 0
    return run, splits


def test_export_cli_writes_the_contracted_folder(exported):
    run, _ = exported
    out = run / "export"
    for name in ("model.onnx", "model.int8.onnx", "model.static-int8.onnx", "strop.json", "parity.json",
                 "tokenizer.json", "tokenizer_config.json", "pruned/model.safetensors", "student/config.json"):
        assert (out / name).is_file(), name
    assert not (run / "export.tmp").exists() and not (run / "export.failed").exists()
    meta = json.loads((out / "strop.json").read_text())
    run_meta = json.loads((run / "model" / "strop.json").read_text())
    assert {k: meta[k] for k in run_meta} == run_meta  # the run's meta, copied
    assert meta["onnx"]["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx",
                                     "static_int8": "model.static-int8.onnx"}
    assert meta["onnx"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["onnx"]["output"] == "logits" and meta["adapter_merged"] is False

    parity = json.loads((out / "parity.json").read_text())
    assert parity["held_data"]["examples"] == 30 and "validation" in parity["held_data"]["source"]
    assert parity["onnx"]["passed"] and parity["onnx"]["max_abs_logit_diff"] <= 1e-5
    assert parity["onnx"]["prediction_agreement"] == 1.0
    assert parity["adapter"] == {"present": False, "merged": False, "note": parity["adapter"]["note"]}
    v = parity["variants"]
    assert set(v) == {"torch_fp32", "onnx_fp32", "onnx_int8", "onnx_static_int8", "torch_int8", "pruned", "student"}
    results = json.loads((run / "results.json").read_text())
    # the original's accuracy on the held split is the one training reported for its validation split
    assert v["torch_fp32"]["accuracy"] == pytest.approx(results["validation"]["accuracy"])
    assert v["onnx_fp32"]["accuracy"] == v["torch_fp32"]["accuracy"] and v["onnx_fp32"]["agreement"] == 1.0
    for name, entry in v.items():
        assert 0 <= entry["accuracy"] <= 1 and entry["size_mb"] > 0, name
        assert entry["latency_ms_p50"] > 0 and entry["latency_ms_p95"] >= entry["latency_ms_p50"], name
        assert entry["throughput_bs32"] > 0, name
        assert entry["accuracy_change"] == pytest.approx(entry["accuracy"] - v["torch_fp32"]["accuracy"])
    assert v["torch_fp32"]["latency_p50_ratio"] == 1.0


def test_int8_models_load_and_mostly_agree(exported):
    run, splits = exported
    v = json.loads((run / "export" / "parity.json").read_text())["variants"]
    for name in ("onnx_int8", "onnx_static_int8", "torch_int8"):
        assert v[name]["agreement"] >= 0.8, (name, v[name]["agreement"])
        assert v[name]["max_abs_logit_diff"] > 0  # int8 really changed the arithmetic
    # int8 weights: the dynamic int8 graph is smaller than the fp32 one (embeddings stay fp32 in both)
    assert (run / "export" / "model.int8.onnx").stat().st_size < (run / "export" / "model.onnx").stat().st_size
    import strop

    int8 = strop.load(run / "export" / "model.int8.onnx").predict(["refund card please", "parcel courier"])
    fp32 = strop.load(run / "export").predict(["refund card please", "parcel courier"])
    assert [p["label"] for p in int8] == [p["label"] for p in fp32]


def test_int8_graph_quantises_weight_matmuls_per_channel_and_keeps_embeddings_fp32(exported):
    """The chosen dynamic int8 settings (quantize.DYNAMIC_INT8) are the ones in the written graph."""
    import onnx
    from onnx import numpy_helper

    run, _ = exported
    fp32 = onnx.load(str(run / "export" / "model.onnx"))
    int8 = onnx.load(str(run / "export" / "model.int8.onnx"))
    fp32_inits = {i.name for i in fp32.graph.initializer}
    weight_matmuls = [n for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in fp32_inits]
    gemms = [n for n in fp32.graph.node if n.op_type == "Gemm"]
    assert len(weight_matmuls) == 2 * 6 and len(gemms) == 2  # 2 layers x (q, k, v, out, ffn up, ffn down); pooler, head
    ops = [n.op_type for n in int8.graph.node]
    # every weight MatMul and the pooler/classifier Gemms (ORT rewrites them to MatMul + Add) became integer MatMuls;
    # only the activation x activation MatMuls of attention stay float
    assert ops.count("MatMulInteger") == len(weight_matmuls) + len(gemms) and "Gemm" not in ops
    assert ops.count("MatMul") == 2 * 2
    inits = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    for n in int8.graph.node:
        if n.op_type == "MatMulInteger":
            weight, w_zero = inits[n.input[1]], inits[n.input[3]]
            assert weight.dtype == np.int8  # QInt8 weights (u8s8 with uint8 activations: the VNNI kernels)
            assert w_zero.shape == (weight.shape[1],)  # per channel: one zero point (and scale) per output column
    # the embedding tables (word, position, token type) keep float weights
    gathers = [n for n in int8.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    assert len(gathers) == 3 and all(inits[n.input[0]].dtype == np.float32 for n in gathers)
    settings = json.loads((run / "export" / "parity.json").read_text())["variants"]["onnx_int8"]["quantization"]
    assert settings["per_channel"] is True and settings["op_types_to_quantize"] == ["MatMul"]


def test_predict_and_eval_accept_an_export_folder(exported, tmp_path, capsys):
    run, splits = exported
    assert main(["eval", str(run / "export"), "--data", str(splits["test"]), "--out", str(tmp_path / "m.json")]) == 0
    onnx_metrics = json.loads((tmp_path / "m.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert onnx_metrics["n"] == 30 and onnx_metrics["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert onnx_metrics["loss"] == pytest.approx(results["test"]["loss"], abs=1e-5)

    out = tmp_path / "preds.csv"
    assert main(["predict", str(run / "export"), "--data", str(splits["test"]), "--out", str(out)]) == 0
    assert main(["predict", str(run), "--data", str(splits["test"]), "--out", str(tmp_path / "torch.csv")]) == 0
    import csv

    onnx_rows = list(csv.DictReader(out.open()))
    torch_rows = list(csv.DictReader((tmp_path / "torch.csv").open()))
    assert [r["prediction"] for r in onnx_rows] == [r["prediction"] for r in torch_rows]
    assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(onnx_rows, torch_rows)) < 1e-5


def test_pruned_model_is_smaller_and_loads(exported, tmp_path):
    run, _ = exported
    parity = json.loads((run / "export" / "parity.json").read_text())
    info = parity["variants"]["pruned"]["pruning"]
    assert info["attention_heads_kept"] == 1 and info["ffn_neurons_kept"] == 32  # of 2 heads, 64 neurons
    assert info["parameters_after"] < info["parameters_before"] and info["recovery"]["steps"] == 12
    model, _, meta, _ = load_trained(run / "export" / "pruned")
    for layer in encoder_layers(model):
        assert layer.attention.self.query.weight.shape == (16, 32)  # 1 head x 16 dims
        assert layer.attention.output.dense.weight.shape == (32, 16)
        assert layer.intermediate.dense.weight.shape == (32, 32) and layer.output.dense.weight.shape == (32, 32)
    assert meta["attention_heads_kept"] == 1 and meta["pruning"] == {"heads": 0.5, "ffn": 0.5}


def test_structured_pruning_shrinks_matrices_and_plain_transformers_loads_ffn_pruning(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tok = _model(tiny_model, "single_label"), load_tokenizer(tiny_model)
    enc = encode(tok, _examples(20), 64)
    before = logits_of(model, enc)
    assert prune_ffn(model, 0.25) == 48
    assert [tuple(layer.intermediate.dense.weight.shape) for layer in encoder_layers(model)] == [(48, 32)] * 2
    assert model.config.intermediate_size == 48
    after = logits_of(model, enc)
    assert not np.allclose(before, after)  # neurons really went
    save_model(model, tok, tmp_path / "m", {"task": "single_label", "labels": ["a", "b", "c"], "pooling": "cls",
                                            "max_length": 64})
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m")).eval()
    np.testing.assert_allclose(logits_of(plain, enc), after, atol=1e-6)

    # heads: weights leave the matrices, and strop's loader restores the same model
    assert prune_heads(model, 0.5) == 1
    assert model.base_model.encoder.layer[0].attention.self.key.weight.shape == (16, 32)
    pruned = logits_of(model, enc)
    save_model(model, tok, tmp_path / "h", {"task": "single_label", "labels": ["a", "b", "c"], "pooling": "cls",
                                            "max_length": 64, "attention_heads_kept": 1})
    np.testing.assert_allclose(logits_of(load_trained(tmp_path / "h")[0], enc), pruned, atol=1e-6)
    # and the shrunk model still exports to ONNX with exact parity
    export_onnx(model, tok, tmp_path / "p.onnx", 64)
    np.testing.assert_allclose(logits_of(OnnxModel(tmp_path / "p.onnx", 1), enc), pruned, atol=1e-5)


def test_magnitude_pruning_reaches_the_target_sparsity(tiny_model):
    model = _model(tiny_model, "single_label")
    assert sparsity_of(model) == 0.0
    achieved = magnitude_prune(model, 0.6)
    assert achieved == pytest.approx(0.6, abs=0.01) and sparsity_of(model) == pytest.approx(achieved)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [tuple(p.shape) for p in _model(tiny_model, "single_label").parameters()]  # dense: no shrink


def test_student_keeps_every_other_layer_and_trains(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    assert kept_layers(6, 3) == [1, 3, 5] and kept_layers(12, 4) == [2, 5, 8, 11] and kept_layers(2, 1) == [1]
    teacher = _model(tiny_model, "single_label")
    student = make_student(teacher, 1)
    assert len(encoder_layers(student)) == 1 and student.config.num_hidden_layers == 1
    assert len(encoder_layers(teacher)) == 2  # the teacher is untouched
    torch.testing.assert_close(encoder_layers(student)[0].state_dict(), encoder_layers(teacher)[1].state_dict())
    tok = load_tokenizer(tiny_model)
    save_model(student, tok, tmp_path / "s", {"task": "single_label", "labels": ["a", "b", "c"]})
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "s"))
    assert plain.config.num_hidden_layers == 1

    # the distillation loss moves the student towards the teacher: KL falls over a few steps (the teacher made
    # confident and the student's head scrambled, so they start far apart)
    with torch.no_grad():
        teacher.classifier.weight.normal_(0, 2.0)
        student.classifier.weight.normal_(0, 2.0)
    enc = encode(tok, _examples(24), 64)
    batch = collate_inputs(enc, np.arange(24))
    batch["labels"] = torch.tensor([i % 3 for i in range(24)])
    loss_fn = distillation_loss(teacher, get_task("single_label"), 2.0, 1.0, torch.device("cpu"), "fp32")
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.eval()  # no dropout: the loss curve is then a clean signal
    losses = []
    for _ in range(20):
        loss = loss_fn(student(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.5


def test_exported_student_is_shallower(exported):
    run, _ = exported
    v = json.loads((run / "export" / "parity.json").read_text())["variants"]["student"]
    d = v["distillation"]
    assert d["layers"] == 1 and d["teacher_layers"] == 2 and d["kept"] == [1]
    assert d["parameters"] < d["teacher_parameters"]
    assert d["augment_copies"] == 1 and d["train_rows"] == 180 and d["steps"] == 46  # 180 / 8 -> 23 steps x 2 epochs
    config = json.loads((run / "export" / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    records = [json.loads(x) for x in (run / "export" / "student-train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "validation"] == [23, 46]


def test_tolerance_breach_fails_loudly_and_exports_nothing(exported, monkeypatch):
    import strop.compress.export as export_module

    run, _ = exported

    def export_off_by_a_bit(model, inputs, path):
        # an exporter that silently changes the model: the classifier's bias shifted by 0.01
        shifted = __import__("copy").deepcopy(model)
        with torch.no_grad():
            shifted.classifier.bias += 0.01
        return export_graph(shifted, inputs, path)

    monkeypatch.setattr(export_module, "export_graph", export_off_by_a_bit)
    before = (run / "export" / "model.onnx").stat().st_mtime_ns
    with pytest.raises(ExportError, match=r"max \|logit difference\| 0.01 > tolerance 0.001"):
        export_run(run, ExportOptions(int8=False, timing=False), log=lambda m: None)
    failed = json.loads((run / "export.failed" / "parity.json").read_text())
    assert failed["onnx"]["passed"] is False and failed["onnx"]["max_abs_logit_diff"] == pytest.approx(0.01, 1e-3)
    assert (run / "export" / "model.onnx").stat().st_mtime_ns == before  # the good export is left alone


def test_export_errors_name_the_problem(tmp_path, tiny_model, capsys):
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text("name: half\n")
    with pytest.raises(RunError, match="training did not finish.*--resume"):
        export_run(half)
    (half / "model").mkdir()
    (half / "model" / "strop.json").write_text("{}")
    with pytest.raises(RunError, match="model/ is incomplete"):
        export_run(half)
    with pytest.raises(ExportError, match="tolerance"):
        export_run(tmp_path, ExportOptions(tolerance=-1))
    with pytest.raises(ExportError, match="--distill-augment 2 needs a student.*--distill N"):
        export_run(tmp_path, ExportOptions(distill_augment=2))
    for spec, msg in (("heads=1.5", "fraction"), ("layers=0.5", "heads=F"), ("ffn=x", "not a number"), ("", "value")):
        with pytest.raises(ExportError, match=msg):
            parse_prune(spec)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2,
                                                                 hidden_dim=64, max_position_embeddings=64))
    with pytest.raises(ExportError, match="BERT-style.*architecture 'distilbert'"):
        prune_heads(model, 0.5)
    with pytest.raises(ExportError, match="BERT-style"):
        make_student(model, 1)


@pytest.mark.slow
def test_default_model_exports_with_parity(tmp_path):
    """The real all-MiniLM-L6-v2 (6 layers, 384 wide) exports and quantises; fp32 matches PyTorch closely."""
    from strop.compress.quantize import quantize_onnx_dynamic

    torch.manual_seed(0)
    model = build_model(get_task("single_label"), Config(model=ModelConfig(path="default")), ["neg", "pos"])
    model.eval()
    from strop.models.backbone import default_model_path

    tok = load_tokenizer(default_model_path())
    export_onnx(model, tok, tmp_path / "model.onnx", 128)
    enc = encode(tok, _examples(64), 128)
    ours = logits_of(model, enc)
    np.testing.assert_allclose(logits_of(OnnxModel(tmp_path / "model.onnx", 2), enc), ours, atol=1e-4)
    quantize_onnx_dynamic(tmp_path / "model.onnx", tmp_path / "model.int8.onnx")
    int8 = logits_of(OnnxModel(tmp_path / "model.int8.onnx", 2), enc)
    assert (int8.argmax(1) == ours.argmax(1)).mean() >= 0.9


def test_augmented_copies_are_unlabelled_perturbations():
    from strop.compress.distill import augment, concat

    ex = Examples(["the film is a joy to watch", "dull and far too long", "fine"], None,
                  np.array([1, 0, 1]), [0, 1, 2])
    aug = augment(ex, 4, seed=0, mask_token="[MASK]")
    assert len(aug) == 12 and aug.rows == [0] * 4 + [1] * 4 + [2] * 4
    assert (aug.labels == -1).all() and aug.labels.dtype == ex.labels.dtype
    assert aug.texts == augment(ex, 4, seed=0, mask_token="[MASK]").texts  # deterministic
    assert aug.texts != augment(ex, 4, seed=1, mask_token="[MASK]").texts
    assert sum(t != ex.texts[r] for t, r in zip(aug.texts, aug.rows)) >= 10  # perturbed (one-word texts may not be)
    vocab = {w for t in ex.texts for w in t.split()} | {"[MASK]"}
    assert all(set(t.split()) <= vocab for t in aug.texts)
    both = concat(ex, aug)
    assert len(both) == 15 and both.labels.tolist() == [1, 0, 1] + [-1] * 12
    # text pairs: both sides kept whole (no n-grams); float labels (regression / multi-label) become NaN
    pairs = Examples(["a b c d e f"] * 2, ["g h i j k l"] * 2, np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), [0, 1])
    aug = augment(pairs, 3, seed=0, mask_token=None)
    assert all(len(t.split()) <= 6 for t in aug.texts) and len(aug.pairs) == 6
    assert np.isnan(aug.labels).all() and aug.labels.shape == (6, 2)
    with pytest.raises(ExportError, match="at least 1 copy"):
        augment(ex, 0, seed=0, mask_token=None)


@pytest.mark.parametrize("task", ["single_label", "regression"])
def test_distillation_loss_uses_gold_labels_only_where_they_exist(tiny_model, task):
    from strop.compress.distill import distillation_loss

    teacher, tok = _model(tiny_model, task), load_tokenizer(tiny_model)
    enc = encode(tok, _examples(6), 64)
    batch = collate_inputs(enc, np.arange(6))
    gold = torch.tensor([2, 0, 1, 1, 0, 2]) if task == "single_label" else torch.rand(6)
    missing = torch.tensor([-1] * 6) if task == "single_label" else torch.full((6,), float("nan"))
    logits = torch.randn(6, 3 if task == "single_label" else 1)
    fn = distillation_loss(teacher, get_task(task), 2.0, 0.3, torch.device("cpu"), "fp32")
    soft_only = distillation_loss(teacher, get_task(task), 2.0, 1.0, torch.device("cpu"), "fp32")
    full = fn(logits, {**batch, "labels": gold})
    none = fn(logits, {**batch, "labels": missing})
    torch.testing.assert_close(none, 0.7 * 0 + 0.3 * soft_only(logits, {**batch, "labels": missing}))
    half = torch.cat([gold[:3], missing[3:]])
    # the hard loss of the gold rows, averaged over the whole batch (rows without gold count 0)
    expected_hard = get_task(task).loss(logits[:3], {"labels": gold[:3]}) * 0.5
    torch.testing.assert_close(fn(logits, {**batch, "labels": half}), none + 0.7 * expected_hard)
    assert torch.isfinite(full) and torch.isfinite(none)
