"""PII masking: recall on 200 seeded records, and no seeded value in the server log even with input logging on."""

from __future__ import annotations

import random

import httpx
import pytest

import strop
from strop.serve.guard import iban_ok, luhn_ok, mask_pii

from .serve_helpers import ServerProcess, ThreadServer

FIRST = ["anna", "li", "omar", "zoe", "jan", "maria", "kofi", "yuki", "pierre", "sven"]
DOMAINS = ["example.com", "mail.example.org", "corp.example.co.uk", "uni-example.edu", "ex4mple.io"]
IBAN_LAYOUT = {"DE": 18, "GB": 18, "FR": 23, "NL": 14, "ES": 20, "IT": 23}  # characters after the check digits


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    for d in "0123456789":
        if luhn_ok(body + d):
            return body + d
    raise AssertionError


def _iban(country: str, rng: random.Random) -> str:
    n = IBAN_LAYOUT[country]
    if country in ("GB", "NL"):
        bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + \
            "".join(rng.choice("0123456789") for _ in range(n - 4))
    else:
        bban = "".join(rng.choice("0123456789") for _ in range(n))
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(digits) % 97
    iban = f"{country}{check:02d}{bban}"
    assert iban_ok(iban)
    return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 else iban


def _phone(rng: random.Random) -> str:
    d = lambda k: "".join(rng.choice("0123456789") for _ in range(k))  # noqa: E731
    return rng.choice([f"+1 {d(3)} {d(3)} {d(4)}", f"({d(3)}) {d(3)}-{d(4)}", f"+44 20 {d(4)} {d(4)}",
                       f"+49 30 {d(7)}", f"0{d(3)} {d(3)} {d(4)}", f"{d(3)}-{d(3)}-{d(4)}", f"+33 6 {d(2)} {d(2)} "
                       f"{d(2)} {d(2)}", f"+91-{d(5)}-{d(5)}"])


def _card(rng: random.Random) -> str:
    number = rng.choice([_luhn_complete("4", 16, rng), _luhn_complete("51", 16, rng), _luhn_complete("37", 15, rng),
                         _luhn_complete("6011", 16, rng)])
    style = rng.randrange(3)
    if style == 0:
        return number
    sep = " " if style == 1 else "-"
    return sep.join(number[i:i + 4] for i in range(0, len(number), 4))


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return ".".join(str(rng.randrange(1, 255)) for _ in range(4))
    return ":".join(f"{rng.randrange(0, 65535):x}" for _ in range(8))


def seeded_records(n: int = 200, seed: int = 7) -> list[tuple[str, list[str]]]:
    """(text, the PII values in it): every record holds 2-4 values of the five kinds in varied sentences."""
    rng = random.Random(seed)
    makers = {"email": lambda: f"{rng.choice(FIRST)}.{rng.choice(FIRST)}{rng.randrange(99)}@{rng.choice(DOMAINS)}",
              "phone": lambda: _phone(rng), "card": lambda: _card(rng),
              "iban": lambda: _iban(rng.choice(list(IBAN_LAYOUT)), rng), "ip": lambda: _ip(rng)}
    templates = {"email": "write to {} please", "phone": "call me on {} after 5pm", "card": "my card {} was charged",
                 "iban": "refund to IBAN {} today", "ip": "login from {} failed"}
    records = []
    for _ in range(n):
        kinds = rng.sample(list(makers), rng.randint(2, 4))
        values = [makers[k]() for k in kinds]
        text = " and ".join(templates[k].format(v) for k, v in zip(kinds, values)) + f" (order 2024-{rng.randrange(1, 12)})"
        records.append((text, values))
    return records


def test_masking_recall_on_200_seeded_records():
    records = seeded_records()
    values = [v for _, vs in records for v in vs]
    masked = [mask_pii(text) for text, _ in records]
    found = sum(v not in m for (_, vs), m in zip(records, masked) for v in vs)
    assert len(values) >= 500
    assert found / len(values) >= 0.99, [(t, m) for (t, vs), m in zip(records, masked) if any(v in m for v in vs)][:5]
    # the text around the values survives
    assert all("please" in m or "after 5pm" in m or "charged" in m or "today" in m or "failed" in m for m in masked)


def test_checked_patterns_leave_look_alikes_alone():
    keep = ["order 4111 1111 1111 1112 shipped",  # fails the Luhn check: not a card
            "IBAN DE00 1234 5678 9012 3456 78 is wrong",  # fails mod-97
            "version 1.2.3 of 999.1.1.1 released",  # not (valid) IP addresses
            "we sold 1500 units in 2024", "ticket 12345"]
    for text in keep:
        assert mask_pii(text) == text
    assert mask_pii("card 4111 1111 1111 1111 ok") == "card <CREDIT_CARD> ok"
    assert mask_pii("GB82 WEST 1234 5698 7654 32") == "<IBAN>"
    assert mask_pii("from 192.168.0.1 and 2001:db8::1") == "from <IP_ADDRESS> and <IP_ADDRESS>"
    assert mask_pii("mail a.b@c.example.com or +1 415 555 0134") == "mail <EMAIL> or <PHONE>"


@pytest.mark.parametrize("mask_inputs", [pytest.param(False, marks=pytest.mark.slow), True])
def test_no_seeded_value_reaches_the_server_log(single_run, tmp_path, mask_inputs):
    records = seeded_records()
    log_path = tmp_path / "server.log"
    srv = ServerProcess(single_run, "serve.log_inputs=true", f"serve.mask_pii={str(mask_inputs).lower()}",
                        log_path=log_path)
    try:
        srv.wait_ready()
        with httpx.Client(timeout=60) as client:
            for start in range(0, len(records), 20):
                texts = [t for t, _ in records[start:start + 20]]
                r = client.post(f"{srv.url}/v1/predict", json={"inputs": texts, "truncate": True})
                assert r.status_code == 200
                # error paths log too: an over-long input gets 422
                client.post(f"{srv.url}/v1/predict", json={"inputs": [texts[0] * 30]})
    finally:
        srv.stop()
    log = log_path.read_text()
    assert log.count("<EMAIL>") >= 100 and "input 0:" in log  # the inputs were logged, masked
    leaked = [v for _, vs in records for v in vs if v in log]
    assert leaked == []


def test_mask_pii_setting_changes_what_the_model_sees(single_run):
    text = "refund to GB82 WEST 1234 5698 7654 32 or card 4111 1111 1111 1111, mail anna@example.com"
    want = strop.load(single_run).predict([mask_pii(text)])[0]
    with ThreadServer(single_run, mask_pii=True) as srv:
        got = httpx.post(f"{srv.url}/v1/predict", json={"inputs": [text]}).json()["predictions"][0]
    assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)
