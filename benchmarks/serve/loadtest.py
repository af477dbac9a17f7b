"""A load test of `skiplm serve` on loopback: the same requests against a speculative server and a plain one
(`--no-speculative`), in one run. N concurrent clients, each sending its share of R chat requests (GSM8K questions,
greedy, `max_tokens` new tokens); per server: throughput (completion tokens per second of wall time), request latency
p50 / p95, and whether every reply is the plain server's, token for token. Bounded: R requests per server and a
`--timeout` per request. Writes loadtest.json, loadtest.md and loadtest.png beside this file (or into --out).

    .venv/bin/python benchmarks/serve/loadtest.py --clients 4 --requests 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SKIPLM = ROOT / ".venv" / "bin" / "skiplm"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(port: int, path: str, body: dict | None = None, timeout: float = 600) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST" if body is not None else "GET", path,
                           json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {data}")
        return data
    finally:
        connection.close()


class Server:
    """`skiplm serve` as a child process on a free loopback port, stopped on exit."""

    def __init__(self, extra: list[str], threads: int, max_batch: int, log: Path):
        self.port = free_port()
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [str(SKIPLM), "serve", "--port", str(self.port), "--threads", str(threads), "--max-batch",
             str(max_batch), "--batch-wait", "0.05", "--log-level", "warning", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def __enter__(self) -> Server:
        started = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"skiplm serve exited ({self.process.returncode}); see {self.log.name}")
            try:
                request(self.port, "/health", timeout=2)
                self.ready_s = time.perf_counter() - started
                return self
            except (OSError, RuntimeError):
                if time.perf_counter() - started > 600:
                    raise SystemExit(f"skiplm serve did not answer within 10 minutes; see {self.log.name}")
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def load(port: int, prompts: list[str], clients: int, max_tokens: int, timeout: float) -> dict:
    def one(prompt: str) -> dict:
        started = time.perf_counter()
        reply = request(port, "/v1/chat/completions", {
            "model": "smollm2-135m", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]}, timeout=timeout)
        return {"latency_s": time.perf_counter() - started, "text": reply["choices"][0]["message"]["content"],
                "tokens": reply["usage"]["completion_tokens"]}

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - started
    latencies = sorted(r["latency_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "latency_p50_s": statistics.median(latencies),
            "latency_p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "texts": [r["text"] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="requests per server")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    parser.add_argument("--draft", nargs="*", default=[], help="draft options for the speculative server "
                        "(default: the server's own, an int8 copy with prompt lookup)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from skiplm.models.data import gsm8k_questions

    prompts = gsm8k_questions(args.requests)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, extra in (("plain", ["--no-speculative"]), ("speculative", args.draft)):
        with Server(extra, args.threads, args.max_batch, args.out / f"server-{name}.log") as server:
            load(server.port, prompts[:2], 2, 8, args.timeout)  # warm-up, not measured
            runs[name] = {"ready_s": server.ready_s, **load(server.port, prompts, args.clients, args.max_tokens,
                                                             args.timeout)}
            runs[name]["stats"] = request(server.port, "/v1/skiplm/stats")
        print(f"{name}: {runs[name]['tokens_per_s']:.1f} tok/s, p50 {runs[name]['latency_p50_s']:.2f} s, "
              f"p95 {runs[name]['latency_p95_s']:.2f} s", flush=True)
    same = sum(a == b for a, b in zip(runs["plain"]["texts"], runs["speculative"]["texts"]))
    summary = {"settings": {**vars(args), "out": str(args.out), "date": time.strftime("%Y-%m-%d %H:%M")},
               "identical_replies": f"{same}/{len(prompts)}",
               "throughput_speedup": runs["speculative"]["tokens_per_s"] / runs["plain"]["tokens_per_s"],
               "runs": runs}
    (args.out / "loadtest.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [f"| {name} | {r['tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
            f"{r['wall_s']:.1f} | {r['ready_s']:.1f} |" for name, r in runs.items()]
    (args.out / "loadtest.md").write_text(
        f"# `skiplm serve` on loopback: {args.clients} concurrent clients, {args.requests} chat requests of "
        f"{args.max_tokens} new tokens (greedy), per server\n\n"
        "| server | completion tok/s | p50 latency (s) | p95 latency (s) | wall (s) | ready after (s) |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) +
        f"\n\nSpeculative throughput {summary['throughput_speedup']:.2f}x the plain server's, same run; replies "
        f"identical to the plain server's: {summary['identical_replies']}.\n\n"
        f"`{' '.join(['.venv/bin/python', 'benchmarks/serve/loadtest.py', *sys.argv[1:]])}` regenerates it.\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    names = list(runs)
    axes[0].bar(names, [runs[n]["tokens_per_s"] for n in names], color=["tab:gray", "tab:green"])
    axes[0].set_ylabel("completion tokens / s")
    for i, key in enumerate(("latency_p50_s", "latency_p95_s")):
        axes[1].bar([x + 0.4 * i for x in range(len(names))], [runs[n][key] for n in names], width=0.4,
                    label=key.split("_")[1])
    axes[1].set_xticks([x + 0.2 for x in range(len(names))], names)
    axes[1].set_ylabel("request latency (s)")
    axes[1].legend()
    fig.suptitle(f"{args.clients} clients x {args.requests} requests, {args.max_tokens} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "loadtest.png", dpi=120)
    print(f"wrote {args.out / 'loadtest.md'}")


if __name__ == "__main__":
    main()
