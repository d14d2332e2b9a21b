"""Generation serving benchmark: tokens/s of `strop serve` on a generation run, 1 client vs 8 concurrent clients,
with decode steps shared (serve.max_batch_size=64, the default) and without (serve.max_batch_size=1: one sequence
at a time, so concurrent requests queue).

Each client sends chat completions one after another (greedy unless --temperature, at most --max-tokens tokens),
prompts cycling through the toy name/food set of the tests; the numbers come from the answers' usage and from the
server's /metrics (decode steps, sequences per step, time to first token). Same run, same machine, one process
tree, servers one at a time. Results: bench/results/serve_generation.json.

    flock /tmp/strop-bench.lock python bench/serve_generation.py --run runs/gen
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import REPO, RESULTS, machine

sys.path.insert(0, str(REPO / "tests" / "serve"))
from serve_helpers import ServerProcess  # noqa: E402

NAMES = ["alimentum", "aromi", "bibimbap", "clowns", "cotto", "giraffe", "loch", "strada", "wrestlers", "zizzi"]
FOODS = ["italian", "chinese", "french", "indian", "japanese", "english"]
PROMPTS = [f"name[{n}], food[{f}]" for n in NAMES for f in FOODS]
METRICS = ("strop_decode_step_sequences_count", "strop_decode_step_sequences_sum",
           "strop_time_to_first_token_seconds_count", "strop_time_to_first_token_seconds_sum")


def drive(url: str, model: str, clients: int, per_client: int, args) -> tuple[int, float]:
    """(completion tokens, seconds) of `clients` closed-loop clients, `per_client` requests each."""
    def client(c: int) -> int:
        tokens = 0
        with httpx.Client(timeout=120) as h:
            for k in range(per_client):
                prompt = PROMPTS[(c * per_client + k) % len(PROMPTS)]
                r = h.post(f"{url}/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": k})
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    return tokens, time.perf_counter() - start


def counters(url: str) -> dict[str, float]:
    found = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in METRICS:
            found[name] = float(value)
    return found


def peak_rss_of(pid: int) -> float | None:
    """The server process's peak resident memory (VmHWM, MiB); None where /proc is not there."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bench(run: Path, max_rows: int, args, log_dir: Path) -> dict:
    srv = ServerProcess(run, f"serve.max_batch_size={max_rows}", f"serve.precision={args.precision}",
                        log_path=log_dir / f"serve-generation-{max_rows}.log")
    out = {}
    try:
        srv.wait_ready()
        model = httpx.get(f"{srv.url}/v1/models").json()["data"][0]["id"]
        drive(srv.url, model, 1, 4, args)  # warm-up
        for clients, per_client in ((1, args.requests), (8, args.requests // 2)):
            before = counters(srv.url)
            tokens, seconds = drive(srv.url, model, clients, per_client, args)
            d = {k: v - before.get(k, 0) for k, v in counters(srv.url).items()}
            steps = d["strop_decode_step_sequences_count"]
            out[f"clients={clients}"] = {
                "requests": clients * per_client, "completion_tokens": tokens, "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1), "decode_steps": int(steps),
                "sequences_per_step": round(d["strop_decode_step_sequences_sum"] / max(steps, 1), 2),
                "mean_ttft_ms": round(1e3 * d["strop_time_to_first_token_seconds_sum"]
                                      / max(d["strop_time_to_first_token_seconds_count"], 1), 2)}
            print(f"max_batch_size={max_rows} clients={clients}: {out[f'clients={clients}']}", flush=True)
        out["server_peak_rss_mb"] = peak_rss_of(srv.pid)
    finally:
        srv.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a generation run folder")
    p.add_argument("--requests", type=int, default=64, help="requests of the lone client (8 clients: half each)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    p.add_argument("--out", type=Path, default=RESULTS / "serve_generation.json")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="strop-bench-"))
    report = {"machine": machine(), "command": " ".join(sys.argv), "run": str(args.run),
              "settings": {"max_tokens": args.max_tokens, "temperature": args.temperature,
                           "precision": args.precision},
              "shared_steps": bench(args.run, 64, args, logs),
              "one_sequence_at_a_time": bench(args.run, 1, args, logs)}
    shared, alone = report["shared_steps"], report["one_sequence_at_a_time"]
    report["ratios"] = {"8_clients_shared_vs_1_client": round(shared["clients=8"]["tokens_per_s"]
                                                               / shared["clients=1"]["tokens_per_s"], 2),
                        "8_clients_shared_vs_not": round(shared["clients=8"]["tokens_per_s"]
                                                         / alone["clients=8"]["tokens_per_s"], 2)}
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report["ratios"]))


if __name__ == "__main__":
    main()
