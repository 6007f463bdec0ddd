"""serve.py under load: N concurrent streaming clients against the model presets (random weights:
speed does not depend on what was learned).

    python -m bench.serve                                    # tiny and 26m, 1/4/8/16 clients, CPU
    python -m bench.serve --presets 26m --clients 1,8 --max_tokens 256 --device cuda

For each preset a model directory is written to a temp dir and `python serve.py` started on a free
port (--max_batch 8 unless told otherwise). Each of N clients sends --requests chat requests one
after another (streaming, greedy, --max_tokens each, a different prompt each) and times every
server-sent event. Reported: aggregate completion tokens/s (usage counts over the wall time of the
whole round), time to first token and inter-token latency (p50/p95 over all requests and gaps),
and the speed-up of aggregate tokens/s over one client.
"""

import argparse
import http.client
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from model import ModelConfig, Transformer
from tokenizer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["介绍一下长城", "写一首关于春天的诗", "什么是机器学习？", "北京有哪些好吃的", "讲个笑话", "如何学好数学",
           "推荐几本书", "解释一下光合作用"]


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def one_request(host: str, i: int, max_tokens: int) -> tuple[float, list[float], int]:
    """(seconds to the first text, gaps between text events, completion tokens) of one streamed chat."""
    conn = http.client.HTTPConnection(host, timeout=600)
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f"（第{i}个）"}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body))
    resp = conn.getresponse()
    times, tokens = [], 0
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
    conn.close()
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])], tokens


def round_of(host: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client(c: int) -> list:
        return [one_request(host, c * requests + r, max_tokens) for r in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return {"clients": clients, "tokens_per_s": sum(r[2] for r in results) / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
            "itl_p50": percentile(gaps, 50), "itl_p95": percentile(gaps, 95)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,26m", help="comma-separated names from configs/")
    p.add_argument("--clients", default="1,4,8,16", help="concurrent clients, one round each")
    p.add_argument("--requests", type=int, default=2, help="requests per client per round, one after another")
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--max_batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    tok_path = ROOT / "tokenizer" / "tokenizer.model"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            settings = json.loads((ROOT / "configs" / f"{name}.json").read_text())["model"]
            torch.manual_seed(0)
            model_dir = Path(tmp) / name
            Transformer(ModelConfig.from_dict({**settings, "vocab_size": Tokenizer(tok_path).vocab_size})).save(model_dir)
            shutil.copyfile(tok_path, model_dir / "tokenizer.model")
            server = subprocess.Popen([sys.executable, "serve.py", "--model", str(model_dir), "--port", "0",
                                       f"--device={args.device}", f"--max_batch={args.max_batch}"],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                host = re.search(r"at http://(127\.0\.0\.1:\d+)/", server.stdout.readline()).group(1)
                one_request(host, 0, 8)  # warm-up: allocator, the cache's buffers, threads
                for clients in tqdm([int(c) for c in args.clients.split(",")], desc=name):
                    rows.append({"preset": name, **round_of(host, clients, args.requests, args.max_tokens)})
            finally:
                server.terminate()
                server.wait()

    print(f"\npython -m bench.serve {' '.join(sys.argv[1:])}".rstrip())
    print(f"{args.device}, {torch.get_num_threads()} torch threads here, serve.py --max_batch {args.max_batch}, "
          f"{args.requests} streamed greedy requests of {args.max_tokens} tokens per client")
    print("| preset | clients | tokens/s (all) | vs 1 client | TTFT p50 / p95 ms | inter-token p50 / p95 ms |")
    print("|---|---|---|---|---|---|")
    single = {r["preset"]: r["tokens_per_s"] for r in rows if r["clients"] == 1}
    for r in rows:
        gain = f"{r['tokens_per_s'] / single[r['preset']]:.1f}x" if r["preset"] in single else "-"
        print(f"| {r['preset']} | {r['clients']} | {r['tokens_per_s']:,.0f} | {gain} | {r['ttft_p50'] * 1e3:.0f} / "
              f"{r['ttft_p95'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} / {r['itl_p95'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
