"""How fast is data/prepare.py, and does its memory stay flat? Compared with the tokenizer alone.

    python bench/prepare.py                              # bundled corpus + a 200 MB corpus generated from it
    python bench/prepare.py --input /data/big_corpus     # bundled corpus + your own large corpus
    nice python bench/prepare.py --workers 2 --generate_mb 400

For each corpus it measures, in the same run on the same text and the same number of cores:
  encode   the tokenizer's raw throughput with --workers threads over the raw documents (reading
           them is not timed), the ceiling for a pipeline that tokenizes, two ways:
             numpy  Tokenizer.encode_documents: sentencepiece writes the ids into numpy buffers
                    (its fastest output, and what prepare.py uses);
             ints   sentencepiece's default encode(texts), a Python list of Python ints per text:
                    building those holds the GIL, so its threads scale worse;
  prepare  data/prepare.py --kind pretrain run as a subprocess with --workers processes: read,
           clean, MinHash, dedup, tokenize, write shards, all included (wall clock), and the same
           less its fixed startup cost (measured on a one-document corpus), which is a visible
           share of the time on a small corpus but not what a large one is limited by;
and prints MB/s (UTF-8 bytes of raw text), tokens/s, and the peak memory of prepare's whole process
tree, sampled every 50 ms: PSS summed over the tree (shared pages counted once, so forked workers
are not double-counted) and the largest single RSS. Targets: prepare >= 0.8x encode (printed
against both); peak memory on the large corpus <= 1.2x that on the small one. It also prints the
CPU time prepare's main process spends per MB (it reads, dedups and writes for every worker), and
so the throughput beyond which more workers cannot help. Peak memory follows the input's layout
as well as its size: a Parquet page is decompressed whole, and pyarrow writes files of long
documents with a large first page (see data/sources.py). The full pretraining set the bundled
corpus was drawn from peaks at ~1.5x the bundled corpus that way, and three copies of it, 3x the
text, within a few MB of that.

A shared VM's speed drifts by 10-20% from one run to the next, so encode and prepare are each run
--repeat times, alternating, and the fastest run of each is compared (as timeit does), with the
spread of the runs printed beside it.

The generated corpus is built from the bundled one's paragraphs, drawn at random into new documents
of a similar length, so it tokenizes like real text and its documents are not near duplicates.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data.sources import iter_pretrain
from tokenizer.tokenizer import Tokenizer


def generate_corpus(paths: list[str], out_dir: Path, target_mb: float, seed: int = 0) -> list[str]:
    """Parquet files of about target_mb MB of text remixed from the paragraphs of `paths`."""
    paragraphs, lengths = [], []
    for _, text in iter_pretrain(paths):
        parts = [p for p in text.split("\n") if p.strip()]
        paragraphs += parts
        lengths.append(len(parts))
    rng = np.random.default_rng(seed)
    files, written, part = [], 0, 0
    bar = tqdm(total=int(target_mb), desc="generate corpus", unit=" MB")
    while written < target_mb * 1e6:
        docs = ["\n".join(paragraphs[i] for i in rng.integers(0, len(paragraphs), size=int(n)))
                for n in rng.choice(lengths, size=5000)]
        path = out_dir / f"generated_{part:03d}.parquet"
        pq.write_table(pa.table({"text": docs}), path, compression="zstd")
        files.append(str(path))
        mb = sum(len(d.encode()) for d in docs)
        written += mb
        bar.update(int(written / 1e6) - bar.n)
        part += 1
    bar.close()
    return files


def encode_throughput(tok: Tokenizer, paths: list[str], threads: int, ints: bool) -> tuple[int, int, float, float]:
    """(bytes, tokens, wall seconds, CPU seconds) spent encoding every document of `paths`, read
    in batches of ~8 MB: with encode_documents, or (ints) sentencepiece's list-of-ints encode."""
    n_bytes = n_tokens = 0
    wall = cpu = 0.0

    def encode(batch: list[str]) -> None:
        nonlocal n_tokens, wall, cpu
        t0, c0 = time.perf_counter(), time.process_time()  # process time counts all its threads
        if ints:
            n_tokens += sum(map(len, tok.sp.encode(batch, num_threads=threads)))
        else:
            n_tokens += len(tok.encode_documents(batch, num_threads=threads)[0])
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0

    batch, batch_bytes = [], 0
    for _, text in tqdm(iter_pretrain(paths), desc="raw encode", unit=" docs", mininterval=1):
        batch.append(text)
        size = len(text.encode())
        batch_bytes += size
        n_bytes += size
        if batch_bytes >= 8_000_000:
            encode(batch)
            batch, batch_bytes = [], 0
    encode(batch)
    return n_bytes, n_tokens, wall, cpu


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
        except OSError:
            pass  # the process ended between two reads
        i += 1
    return pids


def _memory(pid: int) -> tuple[int, int]:
    """(PSS summed over the tree, largest RSS in it), in bytes."""
    pss = rss = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[-1] == "kB"}
            pss += fields.get("Pss", 0)
            rss = max(rss, fields.get("Rss", 0))
        except OSError:
            pass
    return pss, rss


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (its threads included, its children not)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_prepare(paths: list[str], tokenizer: str, out: Path, workers: int) -> dict:
    """Run prepare.py, sampling its tree's memory and its main process's CPU time; returns wall
    time, CPU, peaks and its meta.json."""
    cmd = [sys.executable, str(ROOT / "data" / "prepare.py"), "--kind", "pretrain", "--input", *paths,
           "--tokenizer", tokenizer, "--out", str(out), "--workers", str(workers)]
    peak, main_cpu = [0, 0], [0.0]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while proc.poll() is None:
            pss, rss = _memory(proc.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            try:
                main_cpu[0] = _cpu_seconds(proc.pid)  # the last sample misses at most 50 ms of it
            except OSError:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # prepare and its workers, all reaped now
    cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    if proc.returncode:
        sys.exit(f"prepare.py failed:\n{stderr[-2000:]}")
    meta = json.loads((out / "meta.json").read_text())
    return {"seconds": seconds, "cpu": cpu, "main_cpu": main_cpu[0], "pss": peak[0], "rss": peak[1], "meta": meta, "summary": stdout.strip().splitlines()[-1]}


def fmt(v) -> str:
    if isinstance(v, str):
        return v
    return f"{v:,.0f}" if v >= 1000 or isinstance(v, int) else f"{v:.3f}" if v < 1 else f"{v:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", nargs="+", default=[str(ROOT / "data" / "corpus" / "pretrain")])
    p.add_argument("--input", nargs="+", help="the large corpus (default: generated from --small)")
    p.add_argument("--generate_mb", type=float, default=200)
    p.add_argument("--tokenizer", default=str(ROOT / "tokenizer" / "tokenizer.model"))
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest counts")
    args = p.parse_args()
    tok = Tokenizer(args.tokenizer)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nanozh-bench-") as tmp:
        tmp = Path(tmp)
        large = args.input or generate_corpus(args.small, tmp, args.generate_mb)
        # the fixed cost of a run (starting Python, imports, loading the tokenizer, forking the
        # workers), measured on a one-document corpus: a visible share of a small corpus's time
        (tmp / "one.jsonl").write_text('{"text": "%s"}\n' % ("一个文档。" * 20), encoding="utf-8")
        startup = min(run_prepare([str(tmp / "one.jsonl")], args.tokenizer, tmp / "out_one", args.workers)["seconds"]
                      for _ in range(3))
        for name, paths in (("small", args.small), ("large", large)):
            encodes, ints, prepares = [], [], []
            for _ in range(args.repeat):
                encodes.append(encode_throughput(tok, paths, args.workers, ints=False))
                ints.append(encode_throughput(tok, paths, args.workers, ints=True))
                prepares.append(run_prepare(paths, args.tokenizer, tmp / f"out_{name}", args.workers))
                print(prepares[-1]["summary"])
            n_bytes, n_tokens, enc_wall, enc_cpu = min(encodes, key=lambda e: e[2])
            ints_wall = min(e[2] for e in ints)
            r = min(prepares, key=lambda r: r["seconds"])
            mb = n_bytes / 1e6
            tokens = sum(s["tokens"] for s in r["meta"]["splits"].values())
            spread = lambda seconds: f"{mb / max(seconds):.1f}-{mb / min(seconds):.1f}"
            rows.append({"corpus": name, "MB": mb, "docs": r["meta"]["clean"]["docs_in"],
                         "encode MB/s": mb / enc_wall, "enc range": spread([e[2] for e in encodes]),
                         "ints MB/s": mb / ints_wall, "ints range": spread([e[2] for e in ints]),
                         "prepare MB/s": mb / r["seconds"], "prep range": spread([p["seconds"] for p in prepares]),
                         "less startup": mb / (r["seconds"] - startup),
                         "encode tok/s": n_tokens / enc_wall, "prepare tok/s": tokens / r["seconds"],
                         "encode cpu s/MB": enc_cpu / mb, "prepare cpu s/MB": r["cpu"] / mb,
                         "main cpu s/MB": r["main_cpu"] / mb,
                         "peak PSS MB": max(p["pss"] for p in prepares) / 2**20,
                         "max RSS MB": max(p["rss"] for p in prepares) / 2**20})
    print(f"\nbench/prepare.py {' '.join(sys.argv[1:])}: {args.workers} workers, tokenizer vocab {tok.vocab_size}, "
          f"fastest of {args.repeat} alternating runs each (range: slowest-fastest MB/s)")
    print("".join(f"{k:>{max(len(k), 8) + 2}}" for k in rows[0]))
    for row in rows:
        print("".join(f"{fmt(v):>{max(len(k), 8) + 2}}" for k, v in row.items()))
    small, big = rows
    for encode in ("encode", "ints"):
        speed = [row["prepare MB/s"] / row[f"{encode} MB/s"] for row in rows]
        steady = [row["less startup"] / row[f"{encode} MB/s"] for row in rows]
        print(f"prepare/{encode} throughput: {speed[0]:.2f}x small, {speed[1]:.2f}x large (target >= 0.8x); "
              f"less the {startup:.2f}s startup: {steady[0]:.2f}x small, {steady[1]:.2f}x large")
    cpu = [row["encode cpu s/MB"] / row["prepare cpu s/MB"] for row in rows]
    print(f"encode/prepare CPU time per MB: {cpu[0]:.2f}x small, {cpu[1]:.2f}x large")
    # the main process reads, dedups and writes for all the workers: its CPU time per MB is the
    # speed at which it alone would keep one core busy, the most that more workers can reach
    print(f"main process CPU: {1000 * big['main cpu s/MB']:.1f} ms per MB on the large corpus, so prepare "
          f"tops out near {1 / big['main cpu s/MB']:.0f} MB/s however many workers it has")
    print(f"peak memory large/small: PSS {big['peak PSS MB'] / small['peak PSS MB']:.2f}x, "
          f"RSS {big['max RSS MB'] / small['max RSS MB']:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
