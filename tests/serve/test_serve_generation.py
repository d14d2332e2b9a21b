"""`strop serve` on a generation run (issue 26): OpenAI-compatible routes, checked with the official `openai` client
against a real server on loopback. Expected answers are `Generator.predict`'s, one prompt at a time (greedy), from
the same run folder in this process: the server must give exactly those, alone and under 8 concurrent clients
whose sequences share decode steps (serve/decode.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from strop.serve.decode import DecodeScheduler, Observer, held_back
from strop.tasks import load_predictor

from .serve_helpers import ServerProcess

openai = pytest.importorskip("openai")

KEY = "generation-test-key-0123456789"
CHAT = [[{"role": "user", "content": "name[aromi], food[chinese]"}],
        [{"role": "system", "content": "answer in one sentence"},
         {"role": "user", "content": "name[cotto], food[indian]"}],
        [{"role": "user", "content": "name[loch], food[french]"}, {"role": "assistant", "content": "ok"},
         {"role": "user", "content": "name[strada], food[english]"}]]
PROMPTS = ["name[zizzi], food[italian]", "name[clowns], food[japanese]", "name[giraffe], food[english]",
           "name[bibimbap], food[chinese]", "name[wrestlers], food[french]", "name[alimentum], food[indian]",
           "name[aromi], food[japanese]", "name[strada], food[italian]"]


@pytest.fixture(scope="module")
def server(generation_run, tmp_path_factory):
    """One server for the module: API key, max_concurrency 10 (the 429 test fills it), drain_s 1 (the last test
    sends SIGTERM)."""
    tmp = tmp_path_factory.mktemp("gen-serve")
    (tmp / "key").write_text(KEY + "\n", encoding="utf-8")
    srv = ServerProcess(generation_run, "--api-key-file", str(tmp / "key"), "serve.max_concurrency=10",
                        "serve.drain_s=1", "serve.max_inputs=8", log_path=tmp / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def gen(generation_run):
    return load_predictor(generation_run)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def _want(gen, prompt, **options) -> dict:
    """Generator.predict's answer for one prompt alone (no batch-mates, no padding)."""
    return gen.predict(prompt, batch_size=1, **options)[0]


def _samples(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", headers=_auth(), timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _shared_steps(samples: dict) -> float:
    """Decode steps that advanced more than one sequence."""
    total = samples[("strop_decode_step_sequences_count", ())]
    return total - samples[("strop_decode_step_sequences_bucket", (("le", "1.0"),))]


# --------------------------------------------------------------------------------------------------------------


def test_chat_completions_equal_predict_with_usage(client, gen):
    answers = []
    for turns in CHAT:
        want = _want(gen, turns)
        answers.append(want["text"])
        r = client.chat.completions.create(model="gen", messages=turns)
        assert r.object == "chat.completion" and r.model == "gen" and r.id.startswith("chatcmpl-")
        (choice,) = r.choices
        assert choice.message.role == "assistant" and choice.message.content == want["text"]
        assert choice.finish_reason == want["finish_reason"] == "stop"  # the trained model ends with EOS
        # the tokenizer's counts: the prompt as the chat template renders it, the answer's generated tokens
        assert r.usage.prompt_tokens == len(gen.encode_prompt(turns)) == want["prompt_tokens"]
        assert r.usage.completion_tokens == want["tokens"] > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert answers[0] == "aromi serves chinese food."  # the toy mapping, learned (training had single turns only)


def test_chat_stream_sends_the_same_answer_token_by_token(client, gen, server):
    turns = CHAT[0]
    want = _want(gen, turns)
    chunks = list(client.chat.completions.create(model="gen", messages=turns, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == "gen" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(pieces) >= 5 and "".join(pieces) == want["text"]  # several pieces: it streamed
    assert chunks[-2].choices[0].finish_reason == "stop" and not chunks[-2].choices[0].delta.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want["tokens"]
    assert chunks[-1].usage.prompt_tokens == want["prompt_tokens"]
    # the wire format: `data: {json}` events and a blank line each, ending with `data: [DONE]`
    body = {"model": "gen", "messages": turns, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=_auth()) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "stop"


def test_completions_plain_and_streamed(client, gen):
    prompts = PROMPTS[:3]
    wants = [_want(gen, p) for p in prompts]
    r = client.completions.create(model="gen", prompt=prompts)
    assert r.object == "text_completion" and r.model == "gen"
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [w["text"] for w in wants]
    assert r.usage.prompt_tokens == sum(len(gen.encode_prompt(p)) for p in prompts)
    assert r.usage.completion_tokens == sum(w["tokens"] for w in wants)
    texts, finished = ["", "", ""], {}
    for chunk in client.completions.create(model="gen", prompt=prompts, stream=True):
        (c,) = chunk.choices
        texts[c.index] += c.text
        if c.finish_reason:
            finished[c.index] = c.finish_reason
    assert texts == [w["text"] for w in wants] and finished == {0: "stop", 1: "stop", 2: "stop"}


def test_stop_strings_and_max_tokens(client, gen):
    turns = CHAT[0]
    for stop in ("serves", [" food", "zzz"]):
        want = _want(gen, turns, stop=stop)
        r = client.chat.completions.create(model="gen", messages=turns, stop=stop)
        assert r.choices[0].message.content == want["text"] and r.choices[0].finish_reason == "stop"
        assert stop[0] not in want["text"] and want["text"]  # cut before the stop string, which is not returned
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="gen", messages=turns, stop=stop, stream=True))
        assert streamed == want["text"]  # held back while it could be the start of the stop string
    want = _want(gen, turns, max_new_tokens=3)
    r = client.chat.completions.create(model="gen", messages=turns, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert r.choices[0].message.content == want["text"]
    r = client.completions.create(model="gen", prompt=PROMPTS[0], max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_sampling_is_seeded(client):
    args = {"model": "gen", "messages": CHAT[0], "temperature": 1.5, "top_p": 0.9, "max_tokens": 12}

    def sample(seed: int) -> str:
        return client.chat.completions.create(seed=seed, **args).choices[0].message.content

    assert sample(7) == sample(7)  # the request's own generator: batch-mates do not move its draws
    assert len({sample(seed) for seed in range(4)}) > 1  # it does sample (at 1.5 the tiny model's answers vary)


def test_auth_and_bad_bodies_get_messages_to_act_on(client, server):
    url = f"{server.url}/v1/chat/completions"
    ok = {"model": "gen", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.post(url, json=ok).status_code == 401
    cases = [  # body changes, status, code, words the message must hold
        ({"messages": []}, 400, "empty_messages", "at least one"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "unknown_role", "messages[0].role='robot'"),
        ({"max_tokens": 0}, 400, "invalid_max_tokens", "at least 1"),
        ({"max_completion_tokens": 0}, 400, "invalid_max_tokens", "at least 1"),
        ({"max_tokens": 5000}, 400, "invalid_max_tokens", "limit of 255"),  # context 256 (tiny Llama)
        ({"n": 2}, 400, "unsupported_n", "send n=1"),
        ({"temperature": 3}, 400, "invalid_temperature", "[0, 2]"),
        ({"top_p": 0}, 400, "invalid_top_p", "(0, 1]"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_stop", "at most 4"),
        ({"model": "gpt-4o"}, 404, "model_not_found", "serves 'gen'"),
        ({"max_tokens": "many"}, 422, "schema_violation", "body.max_tokens"),
        ({"logprobs": True}, 422, "schema_violation", "body.logprobs: Extra inputs are not permitted"),
        ({"messages": [{"role": "user"}]}, 422, "schema_violation", "body.messages.0.content: Field required"),
    ]
    for change, status, code, words in cases:
        r = httpx.post(url, json={**ok, **change}, headers=_auth())
        error = r.json()["error"]
        assert (r.status_code, error["code"]) == (status, code), (change, r.text)
        assert words in error["message"], (change, error["message"])
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "gen", "prompt": " "}, headers=_auth())
    assert r.status_code == 400 and "prompt[0] is empty" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "gen", "prompt": ["a"] * 9}, headers=_auth())
    assert r.status_code == 413 and "serve.max_inputs" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"x" * 1_100_000, headers={**_auth(), "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    with pytest.raises(openai.BadRequestError, match="send n=1"):  # what the official client shows its user
        client.chat.completions.create(model="gen", messages=ok["messages"], n=2)


def test_models_and_the_published_document(client, server):
    (model,) = client.models.list().data
    assert model.id == "gen" and model.owned_by == "strop"
    spec = httpx.get(f"{server.url}/openapi.json", headers=_auth()).json()
    assert "/v1/predict" not in spec["paths"] and "/v1/models" in spec["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        op = spec["paths"][path]["post"]
        assert set(op["responses"]) == {"200", "400", "401", "404", "408", "413", "415", "422", "429", "503"}
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    schemas = spec["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["model"]["const" if "const" in chat["model"] else "enum"] in ("gen", ["gen"])
    assert chat["messages"]["minItems"] == 1
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    assert chat["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 255}
    assert schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"][1]["maxItems"] == 8


def test_eight_concurrent_clients_share_decode_steps_and_get_the_greedy_answers(server, gen, client):
    wants = [_want(gen, p) for p in PROMPTS]
    before = _samples(server.url)
    barrier = threading.Barrier(len(PROMPTS))

    def ask(prompt: str):
        barrier.wait()
        r = client.chat.completions.create(model="gen", messages=[{"role": "user", "content": prompt}])
        return r.choices[0].message.content, r.usage.completion_tokens

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(ask, PROMPTS))
    assert got == [(w["text"], w["tokens"]) for w in wants]
    after = _samples(server.url)
    assert _shared_steps(after) - _shared_steps(before) > 0  # some step advanced several requests at once
    tokens = sum(w["tokens"] for w in wants)
    assert after[("strop_completion_tokens_total", ())] - before[("strop_completion_tokens_total", ())] == tokens
    assert after[("strop_time_to_first_token_seconds_count", ())] - \
        before[("strop_time_to_first_token_seconds_count", ())] == len(PROMPTS)
    key = ("strop_http_requests_total", (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200")))
    assert after[key] - before.get(key, 0) == len(PROMPTS)


def test_text_that_may_start_a_stop_string_is_held_back():
    assert held_back("aromi ser", ("serves",)) == 3 and held_back("aromi food", ("serves",)) == 0
    assert held_back("aromi s", ("serves", " se")) == 2  # the longest possible start
    assert held_back("caf\ufffd", ()) == 1  # half a UTF-8 character: the next token completes it


def test_a_sequence_whose_client_left_stops_taking_decode_steps(gen):
    """In process, no HTTP: two answers start in one batch; the client of the first leaves after three pieces, and
    the next steps advance the second alone (the first's row dropped, the cache cut), which still gets predict's
    answer."""
    steps = []

    class Steps(Observer):
        def decode_step(self, rows, seconds):
            steps.append(rows)

    async def main():
        decoder = DecodeScheduler(gen, 8, 8192, Steps())
        decoder.start()
        try:
            settings = gen.settings()
            left = decoder.stream(gen.encode_prompt(PROMPTS[0]), settings)
            stays = asyncio.create_task(decoder.complete(gen.encode_prompt(PROMPTS[1]), settings))
            pieces = [await anext(left) for _ in range(3)]
            await left.aclose()
            return pieces, await stays
        finally:
            await decoder.stop()

    pieces, result = asyncio.run(main())
    want = _want(gen, PROMPTS[1])
    assert all(isinstance(p, str) for p in pieces) and result == want
    # two rows while both decode, then one from the step after the first left to the end, well before the first's
    # answer would have ended
    last_shared = max(i for i, rows in enumerate(steps) if rows == 2)
    assert set(steps[last_shared + 1:]) == {1} and steps.count(2) < _want(gen, PROMPTS[0])["tokens"] - 1


def test_429_when_every_slot_is_taken(server):
    """Ten uploads that stall mid-body hold serve.max_concurrency=10 slots: the next request gets 429 at once."""
    socks = []
    try:
        for _ in range(10):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
            socks.append(sock)
        deadline = time.monotonic() + 10
        while (r := httpx.post(f"{server.url}/v1/completions", json={"model": "gen", "prompt": "x"},
                               headers=_auth())).status_code != 429:
            assert time.monotonic() < deadline, "the stalled uploads never filled the slots"
            time.sleep(0.05)
        assert r.headers["retry-after"] == "1" and "limit of 10 requests" in r.json()["error"]["message"]
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.post(f"{server.url}/v1/completions", json={"model": "gen", "prompt": "x"},
                     headers=_auth()).status_code != 200:
        assert time.monotonic() < deadline, "the slots were not freed"
        time.sleep(0.05)


def test_help_mentions_the_openai_routes(capsys):
    from strop.cli import main

    assert main(["serve", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "POST /v1/chat/completions, POST /v1/completions" in out and "GET /v1/models" in out


def test_sigterm_lets_streams_in_flight_finish(server):
    """Last in the module: it stops the server. Sixteen sampled answers of up to 200 tokens stream while SIGTERM
    arrives: readiness turns 503 at once (serve.drain_s=1), and every stream still ends with its finish_reason
    and [DONE]."""
    body = {"model": "gen", "prompt": [f"name[x{i}], food[y]" for i in range(8)], "stream": True,
            "temperature": 2.0, "max_tokens": 200, "seed": 1}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=_auth(), timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        server.proc.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{server.url}/health/ready", timeout=5)
        rest = [line for line in lines if line]
    assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"]
    assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
    finished = [json.loads(x[6:])["choices"][0] for x in rest[:-1]]
    assert sorted(c["index"] for c in finished if c["finish_reason"]) == list(range(8))
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    assert "received signal 15" in server.log()
