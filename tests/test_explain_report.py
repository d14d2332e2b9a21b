"""Integrated-gradients attributions (completeness, a known keyword task), the run report in a real headless
Chromium (sections rendered, images loaded, no console errors, no horizontal overflow on a phone), and the CLI verbs."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess

import pytest
from conftest import tiny_overrides, toy_rows, write_csv, write_jsonl

import strop
from strop.cli import main
from strop.explain.attribution import explain, top_tokens

FILLER = "the a my this we they it was is day time thing place food service staff room price view".split()


def keyword_rows(n: int, seed: int) -> list[dict]:
    """label 'pos' iff the text contains the word 'excellent'; everything else is random filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLER, rng.randint(3, 8))
        if i % 2 == 0:
            words.insert(rng.randrange(len(words) + 1), "excellent")
        rows.append({"text": " ".join(words), "label": "pos" if i % 2 == 0 else "neg"})
    return rows


@pytest.fixture(scope="module")
def keyword_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keyword")
    rows = keyword_rows(300, seed=0)
    rows[0] = dict(rows[270])  # a test text also in train: the report must warn about leakage
    files = {split: write_csv(tmp / f"{split}.csv", part)
             for split, part in (("train", rows[:240]), ("validation", rows[240:270]), ("test", rows[270:]))}
    return strop.train(None, tiny_overrides(tiny_model, tmp / "runs", **{
        "data.train": files["train"], "data.validation": files["validation"], "data.test": files["test"],
        "train.epochs": 6, "train.lr": 3e-3, "train.threads": 1}))


def test_keyword_is_the_top_attributed_token(keyword_run):
    assert keyword_run.results["test"]["accuracy"] >= 0.95  # the toy task is learnt, so attributions mean something
    predictor = strop.load(keyword_run.run_dir)
    for text in ["the food was excellent this time", "excellent view from the room", "staff day price excellent"]:
        ex = explain(predictor, text)
        assert ex.target == "pos"
        assert top_tokens(ex, 1) == ["excellent"], ex.words()


def test_attributions_add_up_to_the_logit_difference(keyword_run):
    """Completeness of integrated gradients: sum of attributions == logit(x) - logit(baseline), within tolerance."""
    predictor = strop.load(keyword_run.run_dir)
    for text, target in [("the food was excellent this time", None), ("we they staff view", "pos"),
                         ("price view excellent", "neg")]:
        ex = explain(predictor, text, target=target, steps=20)
        c = ex.completeness
        assert c["within_tolerance"], c
        assert c["sum"] == pytest.approx(c["logit_diff"], rel=0.05, abs=1e-3)
        assert len(ex.attributions) == len(ex.tokens) and ex.tokens[0] == "[CLS]"
        assert sum(ex.rollout) == pytest.approx(1.0, abs=1e-4)
        words = ex.words()
        assert [w["word"] for w in words] == text.split()  # subwords merged back into the original words
        assert all(text[w["start"]:w["end"]] == w["word"] for w in words)


def test_unknown_target_is_a_clear_error(keyword_run):
    predictor = strop.load(keyword_run.run_dir)
    with pytest.raises(Exception, match=r"target 'maybe' is not a label of this model; labels are \['neg', 'pos'\]"):
        explain(predictor, "excellent", target="maybe")


def test_explain_verb_writes_json_and_html(keyword_run, tmp_path, capsys):
    out = tmp_path / "why.json"
    assert main(["explain", str(keyword_run.run_dir), "--text", "service was excellent", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data[0]["target"] == "pos" and data[0]["completeness"]["within_tolerance"]
    assert max(data[0]["words"], key=lambda w: w["attribution"])["word"] == "excellent"
    page = tmp_path / "why.html"
    rows = write_jsonl(tmp_path / "in.jsonl", [{"text": "excellent food"}, {"text": "the staff room"}])
    assert main(["explain", str(keyword_run.run_dir), "--data", str(rows), "--out", str(page)]) == 0
    html = page.read_text()
    assert html.count('class="ex"') == 2 and "rgba(" in html
    assert main(["explain", str(keyword_run.run_dir)]) == 2
    assert "give either --text" in capsys.readouterr().err
    # .jsonl is JSON lines; an --out under a file is refused before the work; markup-like text is text
    lines = tmp_path / "out" / "why.jsonl"
    assert main(["explain", str(keyword_run.run_dir), "--data", str(rows), "--out", str(lines)]) == 0
    assert [json.loads(x)["text"] for x in lines.read_text().splitlines()] == ["excellent food", "the staff room"]
    assert main(["explain", str(keyword_run.run_dir), "--text", "x", "--out", str(rows / "why.html")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["explain", str(keyword_run.run_dir), "--text", "excellent [/b] [bold]", "--target", "[/x]"]) == 2
    assert "target '[/x]' is not a label" in capsys.readouterr().err


def test_report_sections_and_leak_warning(keyword_run):
    page = (keyword_run.run_dir / "report.html").read_text()
    for section in ("summary", "data", "curves", "metrics", "confusion", "calibration", "errors"):
        assert f'<section id="{section}">' in page, section
    assert "leak warning" in page  # the duplicated row landed in two splits
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched
    extra = json.loads((keyword_run.run_dir / "report.json").read_text())
    assert 0 <= extra["calibration"]["ece"] <= 1 and sum(b["n"] for b in extra["calibration"]["bins"]) == 30


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium); .ci/run installs it")
@pytest.mark.parametrize("width,height", [(390, 844), (1280, 800)], ids=["phone", "laptop"])
def test_report_renders_in_a_real_browser(keyword_run, tmp_path, width, height):
    page = keyword_run.run_dir / "report.html"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}",
              f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(common + ["--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stderr[-2000:]
    attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', body.group(1)))
    assert attrs.get("rendered") == "1"  # the page's script ran
    loaded, total = map(int, attrs["images"].split("/"))
    assert total >= 5 and loaded == total  # every inline plot decoded
    assert attrs["overflow"] == "false"  # nothing wider than the screen (tables scroll inside their box)
    assert attrs["sections"].split(",")[:4] == ["summary", "data", "curves", "metrics"]
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "rror" in line]
    assert not console_errors, console_errors
    shot = tmp_path / "shot.png"
    subprocess.run(common + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (width, height)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not a blank page


@pytest.mark.parametrize("task", ["regression", "multi_label"])
def test_report_for_other_tasks(tiny_model, tmp_path, task):
    rows = toy_rows(60, seed=4)
    for i, r in enumerate(rows):
        if task == "regression":
            r["label"] = {"account": 0.5, "billing": 2.25, "shipping": 4.0}[r["label"]]
        else:
            r["label"] = [r["label"]] + (["urgent"] if i % 3 == 0 else [])
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{"data.train": src, "train.epochs": 1}))
    page = (run.run_dir / "report.html").read_text()
    assert ('<section id="regression">' in page) == (task == "regression")
    assert ('<section id="calibration">' in page) == (task == "multi_label")
    sections = re.findall(r'<section id="(\w+)">', page)
    (run.run_dir / "report.html").unlink()
    assert main(["report", str(run.run_dir), "--explain", "0"]) == 0
    # rebuilt from the run folder alone: the same sections in the same order
    assert re.findall(r'<section id="(\w+)">', (run.run_dir / "report.html").read_text()) == sections


def test_explain_text_pairs(tiny_model, tmp_path):
    rows = toy_rows(60, seed=4, pairs=True)
    src = write_csv(tmp_path / "pairs.csv", rows)
    run = strop.train(None, tiny_overrides(tiny_model, tmp_path / "runs", **{
        "data.train": src, "train.epochs": 1, "eval.report_explain": 0}))
    predictor = strop.load(run.run_dir)
    with pytest.raises(Exception, match="text pairs"):
        explain(predictor, "refund my card")
    ex = explain(predictor, "refund my card", "please help today")
    assert ex.completeness["within_tolerance"]
    words = ex.words()
    assert [w["word"] for w in words if w["segment"] == 0] == ["refund", "my", "card"]
    assert [w["word"] for w in words if w["segment"] == 1] == ["please", "help", "today"]
    assert ex.to_dict()["pair"] == "please help today"
