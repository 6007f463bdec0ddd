"""How fast is data/prepare.py, and does its memory stay flat? Compared with the tokenizer alone.

    python -m bench.prepare                              # bundled corpus + a 200 MB corpus generated from it
    python -m bench.prepare --input /data/big_corpus     # bundled corpus + your own large corpus
    nice python -m bench.prepare --workers 2 --generate_mb 400

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
documents with a large first page (see data/sources.py). With 2 workers at aa4831b, the full
pretraining set the bundled corpus was drawn from (101 MB of text) peaks at 188-192 MB against
127-130 MB for the bundled corpus, ~1.5x, and three copies of it, 3x the text, at 194 MB. Of the
~60 MB between the two, ~32 MB is its 16 MB page of novels, which the main process holds twice
(decoded, and in pyarrow's buffer for decompressed pages) while it reads that file, and ~15 MB
the state dedup keeps (248 bytes per kept document: 67k documents against 7k); the rest is the
workers' heaps, which keep the high-water mark of their blocks' temporaries (blocks of 4,000
short poems make the largest, and only one worker meets one on the bundled corpus).

A shared VM's speed drifts by 10-20% from one run to the next, so encode and prepare are each run
--repeat times, alternating, and the fastest run of each is compared (as timeit does), with the
spread of the runs printed beside it.

The generated corpus is built from the bundled one's paragraphs, drawn at random into new documents
of a similar length, so it tokenizes like real text and its documents are not near duplicates.

Last, near-duplicate removal is scored on planted pairs at --near_threshold 0.7, 0.8 and 0.9
(`--only_dedup` prints only that): for each threshold t, --pairs documents of 1,000 random CJK
characters (so that their character 5-grams are distinct and the edits alone set the similarity),
each followed, in a later batch, by a copy with characters replaced at random places, as many as
put its true 5-gram Jaccard J with the original spread evenly over [t - 0.15, t + 0.1].
precision = removed pairs with J >= t / removed pairs; recall = removed pairs with J >= t / pairs
with J >= t. Beside them, the same for "LSH only": every pair that shares a band, what
Deduplicator removed before it checked each candidate's estimated Jaccard.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data.clean import CleanConfig, Deduplicator, dedup_keys
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
    # run as a module from the repository root (as the README does), with paths made absolute for that
    cmd = [sys.executable, "-m", "data.prepare", "--kind", "pretrain", "--input", *map(os.path.abspath, paths),
           "--tokenizer", os.path.abspath(tokenizer), "--out", os.path.abspath(out), "--workers", str(workers)]
    peak, main_cpu = [0, 0], [0.0]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

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


def planted_pairs(threshold: float, n: int, rng: np.random.Generator, length: int = 1000) -> tuple[list, list, np.ndarray]:
    """n documents, n edited copies of them, and each pair's true Jaccard of character 5-grams,
    spread evenly over [threshold - 0.15, threshold + 0.1]."""
    firsts, seconds, js = [], [], []
    grams = length - 4
    for target in rng.uniform(threshold - 0.15, min(threshold + 0.1, 1.0), size=n):
        chars = rng.integers(0x4E00, 0x9FA5, size=length)
        # one replaced character breaks the 5 grams over it, fewer where they overlap: Jaccard
        # (grams - broken) / (grams + broken) is about the target with this many
        k = max(1, round(grams * (1 - target) / (1 + target) / 5 * 1.1))
        edited = chars.copy()
        edited[rng.choice(length, size=k, replace=False)] = rng.integers(0x4E00, 0x9FA5, size=k)
        a, b = "".join(map(chr, chars)), "".join(map(chr, edited))
        sa, sb = ({t[i:i + 5] for i in range(grams)} for t in (a, b))
        firsts.append(a)
        seconds.append(b)
        js.append(len(sa & sb) / len(sa | sb))
    return firsts, seconds, np.array(js)


def near_dedup_quality(n_pairs: int) -> list[dict]:
    """Precision and recall of near-duplicate removal on planted pairs, per threshold (see the
    module docstring), with and without the check of each LSH candidate's estimated Jaccard."""
    rows, rng = [], np.random.default_rng(0)
    for t in (0.7, 0.8, 0.9):
        firsts, seconds, js = planted_pairs(t, n_pairs, rng)
        cfg = CleanConfig(near_threshold=t)
        dedup = Deduplicator(cfg)
        dedup.check_many(firsts)
        removed = np.array(dedup.check_many(seconds)) == "near"
        keys_a, keys_b = dedup_keys(firsts, cfg)[0][:, 1:], dedup_keys(seconds, cfg)[0][:, 1:]
        lsh = (keys_a == keys_b).any(axis=1)  # a band's key is the same only in the same band
        above = js >= t
        row = {"threshold": t, "pairs": n_pairs, "J >= t": int(above.sum()), "J range": f"{js.min():.2f}-{js.max():.2f}"}
        for name, gone in (("", removed), ("LSH only ", lsh)):
            row[f"{name}removed"] = int(gone.sum())
            row[f"{name}precision"] = (gone & above).sum() / max(gone.sum(), 1)
            row[f"{name}recall"] = (gone & above).sum() / max(above.sum(), 1)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("".join(f"{k:>{max(len(k), 8) + 2}}" for k in rows[0]))
    for row in rows:
        print("".join(f"{fmt(v):>{max(len(k), 8) + 2}}" for k, v in row.items()))


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
    p.add_argument("--pairs", type=int, default=2000, help="planted pairs per threshold for near-duplicate removal")
    p.add_argument("--only_dedup", action="store_true", help="only score near-duplicate removal")
    args = p.parse_args()
    if args.only_dedup:
        print_dedup_quality(args.pairs)
        return
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
    print(f"\npython -m bench.prepare {' '.join(sys.argv[1:])}: {args.workers} workers, tokenizer vocab {tok.vocab_size}, "
          f"fastest of {args.repeat} alternating runs each (range: slowest-fastest MB/s)")
    print_table(rows)
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
    print_dedup_quality(args.pairs)


def print_dedup_quality(n_pairs: int) -> None:
    print(f"\nnear-duplicate removal on planted pairs (python -m bench.prepare --only_dedup --pairs {n_pairs}):")
    print_table(near_dedup_quality(n_pairs))


if __name__ == "__main__":
    main()
