"""The documentation site: `mkdocs build --strict` passes (no broken link or anchor, no missing include),
and the generated reference pages list every config field, every serve setting and every CLI verb and option
that the code has, so neither can drift from the code."""

from __future__ import annotations

import dataclasses
import html
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {
        **os.environ,
        "NO_MKDOCS_2_WARNING": "1",
    }  # mkdocs-material's banner about MkDocs 2, not a problem here
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    print(f"mkdocs build: {time.perf_counter() - start:.1f} s")
    return out


def _article(site, page: str) -> str:
    """The page's content (no navigation, whose links name every page)."""
    text = (site / page / "index.html").read_text(encoding="utf-8")
    return text[text.index("<article") : text.index("</article>")]


def test_config_reference_lists_every_field_with_its_doc(site):
    from strop.config import Config, all_keys, help_lines

    page = _article(site, "reference/config")
    rows = dict(re.findall(r'<tr id="([^"]+)">(.*?)</tr>', page, flags=re.S))
    keys = all_keys(Config)
    assert len(keys) > 100 and "train.lr" in keys and "peft.r" in keys
    missing = [k for k in keys if k not in rows]
    assert missing == [], f"config fields missing from the generated reference: {missing}"
    for key, default, doc in help_lines():
        # the doc line as --help-config prints it (choices after it), escaped as the page holds it
        words = re.sub(r"`([^`]+)`", r"\1", doc.split(" [")[0]).split()[:6]
        cell = html.unescape(re.sub(r"<[^>]+>", "", rows[key]))
        assert " ".join(words) in " ".join(cell.split()), (key, words)
    assert "<em>empty</em>" in rows["train.lr"]  # no number: an unset train.lr is chosen per peft.method


def test_config_reference_lists_every_serve_setting_and_task(site):
    from strop.serve.settings import ServeConfig
    from strop.tasks import TASKS

    page = _article(site, "reference/config")
    ids = set(re.findall(r'<tr id="([^"]+)"', page))
    serve_keys = [f"serve.{f.name}" for f in dataclasses.fields(ServeConfig)]
    assert len(serve_keys) > 10 and [k for k in serve_keys if k not in ids] == []
    assert [name for name in TASKS if f"<code>{name}</code>" not in page] == []


def test_cli_reference_lists_every_verb_and_option(site):
    import typer.main

    from strop.cli import app

    page = _article(site, "reference/cli")
    group = typer.main.get_command(app)
    verbs = list(group.commands)
    # the verbs the README and DESIGN.md promise: an app that lost its commands cannot pass by listing none
    assert {
        "train",
        "pretrain",
        "tune",
        "eval",
        "predict",
        "chat",
        "report",
        "explain",
        "export",
        "bench",
        "serve",
    } <= set(verbs)
    headings = re.findall(r'<h2 id="strop-([a-z-]+)"', page)
    assert headings == verbs
    for name, command in group.commands.items():
        section = page[page.index(f'id="strop-{name}"') :]
        section = section[: section.index("</table>")]
        for param in command.params:
            for opt in (o for o in list(param.opts) + list(param.secondary_opts) if o.startswith("-")):
                assert f"<code>{opt}" in section or f", {opt}" in section, (name, opt)


def test_pages_carry_the_moved_readme_sections(site):
    """Each detailed README section now lives on a page; spot-check one sentence from each landing place."""
    expect = {
        "tasks/text-classification": "trains the way SetFit does, faster",
        "tasks/token-classification": "picks the best <em>valid</em> IOB2 tag sequence",
        "tasks/generation": "so the model learns to stop",
        "tasks/image-classification": "Dynamic int8, the text default, runs a CNN",
        "tasks/masked-lm": "so no document is truncated and no compute goes to padding",
        "guides/peft": "AdaLoRA's rank re-allocation runs after every optimizer step",
        "guides/speed-and-memory": "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
        "guides/runs": "identical losses and weights to an uninterrupted one",
        "guides/export": "leaving <code>RUN/export.failed/parity.json</code> to inspect",
        "guides/tracking": "MLflow's usage telemetry is switched off",
        "guides/tune": "Optuna's TPE sampler proposes values",
        "deployment": "StropHighP99Latency",  # the alert rules, included from deploy/prometheus/
        "scaling-out": "per-step losses agree to 3e-7",
        "benchmarks": "Machine for every number here",  # BENCHMARKS.md, included whole
        "decisions": "Our own training loop, not Transformers' Trainer",
        "reference/layout": "one module per task behind one protocol",
        "development": "Benchmarks need the whole machine",
    }
    missing = {page: text for page, text in expect.items() if text not in _article(site, page)}
    assert missing == {}


def test_site_makes_no_network_request(site):
    """No web fonts, no CDN: every script, stylesheet and font the pages load is in the site itself."""
    loaded = set()
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        loaded |= set(re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(https?:[^"]+)"', text))
    assert loaded == set(), loaded
