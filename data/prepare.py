"""Turn raw text into token shards: read -> clean -> deduplicate -> tokenize -> split -> write.

    python -m data.prepare --kind pretrain --input data/corpus/pretrain --tokenizer tokenizer/tokenizer.model --out out/data/pretrain
    python -m data.prepare --kind sft --input data/corpus/sft.jsonl.gz --tokenizer tokenizer/tokenizer.model --out out/data/sft
    python -m data.prepare --kind dpo --input data/corpus/dpo.jsonl.gz --tokenizer tokenizer/tokenizer.model --out out/data/dpo

Inputs are files or directories of .txt/.jsonl/.json/.parquet (see data/sources.py for the fields
read). The main process reads the input as blocks of raw lines or Arrow batches (~1 MB each) and
hands them to --workers processes, which decode the records, clean each text (data/clean.py),
tokenize it and compute its dedup keys (a hash, the LSH bands of its MinHash signature, and a byte
per signature slot to estimate similarity); the main process takes the results back in input order,
drops exact and near duplicates (that needs every earlier document, so it cannot be split across
workers, and it makes the result the same for any number of them), and appends what survives to
the train or val split, chosen by a hash of the document so that the same text always lands in the
same split. At most a few blocks per worker are in flight, so memory stays flat however large the
corpus.

SFT conversations are rendered with the one chat template (Tokenizer.render_chat); one longer than
--max_len tokens keeps its leading turns up to the last assistant turn that fits, and is dropped
when even its first exchange does not fit. DPO examples store the prompt rendered with the
assistant header, then each answer as its tokens and <|im_end|>. Every record dropped or changed
is counted and printed.

Everything is written into a temporary directory beside --out and renamed into place at the end:
a failed run leaves no output, and an existing --out is replaced only by a complete one.
"""

import argparse
import ctypes
import gc
import glob
import os
import shutil
import sys
import time
import queue
import signal
import threading
import traceback
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from itertools import accumulate
from multiprocessing import Pipe, Process
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Iterable, Iterator

if not __package__:  # run by its path: Python put data/ on sys.path, not the root the imports below need
    sys.exit("nanozh: run it from the repository root as: python -m data.prepare ...")
# Arrow's C++ code, the Parquet reader among it, allocates from mimalloc unless told otherwise
# before pyarrow loads (pa.set_memory_pool reaches only its Python functions). mimalloc keeps
# freed memory in a reserve of its own beside malloc's heap, which numpy cannot reuse: measured,
# 15 MB more main-process peak on the bundled corpus and 20 MB on the full pretraining set.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


def _glibc(name: str):
    """A function of glibc's malloc, or None elsewhere than glibc (malloc is then left as it is)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt's parameters, from glibc's malloc.h
# glibc's malloc gives each new thread an arena (a heap) of its own, up to 8 per core, and memory
# freed in one arena is reused only by the threads that allocate from it. pyarrow starts a thread
# as it loads, a worker takes its tasks in on a thread, and sentencepiece encodes on threads it
# starts for each call: measured at the end of the full pretraining set, each worker held three
# arenas, two of them of 9-11 MB with next to nothing in use. With one arena for every thread:
# 9 MB less per worker, and no slower. Set before pyarrow loads, as an arena once made goes on
# being handed to new threads.
if mallopt := _glibc("mallopt"):
    mallopt(M_ARENA_MAX, 1)

import numpy as np
from tqdm import tqdm

from data.clean import VERDICTS, CleanConfig, CleanStats, Deduplicator, clean_text, clean_texts, dedup_keys
from data.shards import SplitWriter, token_dtype, write_meta
from data.sources import Block, parse_block, read_blocks
from errors import NanozhError, exit_on_user_error, user_error
from tokenizer.tokenizer import Tokenizer

KINDS = ("pretrain", "sft", "dpo")
MAX_SHOWN_ERRORS = 10
ENCODE_GROUP = 256  # the most texts tokenized in one call (see _pretrain)


@dataclass
class Chunk:
    """What a worker learned about a block of records: what cleaning changed and dropped (counted
    here, so that the main process does no per-record work), the messages of malformed records, and
    for the records that survive cleaning, in input order, their dedup keys, split and tokens. The
    main process then dedups those survivors in one batch."""
    n_bytes: int = 0                                     # UTF-8 size of the raw text, for MB/s
    stats: CleanStats = field(default_factory=CleanStats)  # every record but the malformed ones
    errors: list[str] = field(default_factory=list)      # each malformed record's one-line message
    texts: list[str] | None = field(default_factory=list)  # per survivor: the text dedup compares
    truncated: list[bool] = field(default_factory=list)
    items: list[tuple] = field(default_factory=list)     # per survivor: what SplitWriter.add takes
    tokens: np.ndarray | None = None                     # pretrain: all survivors' tokens back to back,
    offsets: np.ndarray | None = None                    # survivor j is tokens[offsets[j]:offsets[j+1]]
    keys: np.ndarray | None = None                       # per survivor, dedup_keys() of its text:
    sketches: np.ndarray | None = None                   # its keys and its sketch
    val: np.ndarray | None = None                        # and whether it goes to the val split

    def malformed(self, err: NanozhError | str) -> None:
        """A record the reader could not parse: the main process reports it (or stops, --strict)."""
        self.errors.append(str(err))

    def drop(self, rules: list[str], reason: str) -> None:
        self.stats.add(rules, reason)

    def keep(self, text: str, rules: list[str], item: tuple = (), truncated: bool = False) -> None:
        self.stats.add(rules)
        self.texts.append(text)
        self.items.append(item)
        self.truncated.append(truncated)

    def write(self, writer: SplitWriter, survivors: np.ndarray) -> None:
        """Append the survivors where the bool array `survivors` is True to a split."""
        if self.tokens is None:
            for j in np.flatnonzero(survivors):
                writer.add(*self.items[j])
        elif survivors.any():  # pretraining documents are only tokens back to back: one write for all
            writer.add(self.tokens[np.repeat(survivors, np.diff(self.offsets))], examples=int(survivors.sum()))


# ----------------------------------------------------------------------------- work on a block
# Each worker process loads the tokenizer once (_init), then turns blocks of records into Chunks.

_W: dict = {}


def _init(tokenizer_path: str, cfg: CleanConfig, kind: str, max_len: int, val_fraction: float) -> None:
    # min_chars is for pretraining documents; a chat turn as short as "好" is fine, an empty one is not
    turn_cfg = replace(cfg, min_chars=1) if kind != "pretrain" else cfg
    keep_freed_memory()
    _W.update(tok=Tokenizer(tokenizer_path), cfg=cfg, turn_cfg=turn_cfg, kind=kind, max_len=max_len,
              val_fraction=val_fraction)


def _clean(text: str, rules: list[str]) -> str:
    """The cleaned text of one document or chat turn ("" when dropped); adds the rules that changed it."""
    cleaned, changed = clean_text(text, _W["turn_cfg"])
    rules += [r for r in changed if r not in rules]
    return cleaned


def _pretrain(block: Block) -> Chunk:
    chunk = Chunk()
    texts = [text for where, text in parse_block(block, "pretrain", chunk.malformed)]
    for cleaned, rules in clean_texts(texts, _W["cfg"]):  # batched: ~3x faster
        if cleaned:
            chunk.keep(cleaned, rules)
        else:
            chunk.drop(rules, "min_chars")
    tok = _W["tok"]
    dtype = token_dtype(tok.vocab_size)  # uint16 for our vocabularies: half the bytes to send back
    tokens, lengths = [np.zeros(0, dtype)], [np.zeros(0, np.int64)]
    # ENCODE_GROUP texts at a time: sentencepiece holds what it makes of every text of a call
    # until it returns, and a block of 4,000 short poems at once made a worker's heap ~3 MB larger
    for start in range(0, len(chunk.texts), ENCODE_GROUP):
        ids, offsets = tok.encode_documents(chunk.texts[start:start + ENCODE_GROUP], num_threads=1)
        tokens.append(ids.astype(dtype))
        lengths.append(np.diff(offsets))
    chunk.tokens = np.concatenate(tokens)
    chunk.offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
    # sentencepiece leaves each str's UTF-8 cached in it (CPython's PyUnicode_AsUTF8), so str.encode
    # after it is a copy, not an encode: this, and dedup_keys() later, are ~15x cheaper here
    chunk.n_bytes = sum(len(text.encode()) for text in texts)
    return chunk


def _fit_turns(messages: list[dict]) -> tuple[list[int], list[int], bool] | None:
    """(ids, mask, truncated) of the conversation cut after its last assistant turn that ends within
    max_len tokens; None when even the first assistant turn does not fit."""
    tok, max_len = _W["tok"], _W["max_len"]
    ids, mask = tok.render_chat(messages)
    if len(ids) <= max_len:
        return ids, mask, False
    ends = list(accumulate(len(tok.render_chat([m])[0]) for m in messages))  # turns render independently
    assert ends[-1] == len(ids), "render_chat is no longer a concatenation of its turns"
    fits = [e for m, e in zip(messages, ends) if m["role"] == "assistant" and e <= max_len]
    return (ids[:fits[-1]], mask[:fits[-1]], True) if fits else None


def _sft(block: Block) -> Chunk:
    chunk = Chunk()
    for where, messages in parse_block(block, "sft", chunk.malformed):
        rules = []
        chunk.n_bytes += sum(len(m["content"].encode()) for m in messages)
        messages = [{"role": m["role"], "content": _clean(m["content"], rules)} for m in messages]
        if not all(m["content"] for m in messages):
            chunk.drop(rules, "empty")
        elif isinstance(fit := _render(where, _fit_turns, messages), str):
            chunk.malformed(fit)
        elif fit is None:
            chunk.drop(rules, "too_long")
        else:
            ids, mask, truncated = fit
            chunk.keep("\n".join(f"{m['role']}: {m['content']}" for m in messages), rules, (ids, mask), truncated)
    return chunk


def _answer_ids(prompt: list[dict], prompt_ids: list[int], answer: str) -> list[int]:
    """The tokens an assistant answer adds after the prompt: its content and <|im_end|>."""
    ids, mask = _W["tok"].render_chat(prompt + [{"role": "assistant", "content": answer}])
    if ids[:len(prompt_ids)] != prompt_ids:
        raise RuntimeError("chat template: the generation prompt is not a prefix of the answered conversation")
    return ids[len(prompt_ids):len(prompt_ids) + sum(mask[len(prompt_ids):])]


def _dpo_arrays(prompt: list[dict], chosen: str, rejected: str) -> tuple | None:
    prompt_ids, _ = _W["tok"].render_chat(prompt, add_generation_prompt=True)
    c, r = _answer_ids(prompt, prompt_ids, chosen), _answer_ids(prompt, prompt_ids, rejected)
    return (prompt_ids, c, r) if len(prompt_ids) + max(len(c), len(r)) <= _W["max_len"] else None


def _dpo(block: Block) -> Chunk:
    chunk = Chunk()
    for where, ex in parse_block(block, "dpo", chunk.malformed):
        rules = []
        chunk.n_bytes += sum(len(m["content"].encode()) for m in ex["prompt"]) + len(ex["chosen"].encode()) + len(ex["rejected"].encode())
        prompt = [{"role": m["role"], "content": _clean(m["content"], rules)} for m in ex["prompt"]]
        chosen, rejected = _clean(ex["chosen"], rules), _clean(ex["rejected"], rules)
        if not all(m["content"] for m in prompt) or not chosen or not rejected:
            chunk.drop(rules, "empty")
        elif chosen == rejected:
            chunk.drop(rules, "identical_answers")
        elif isinstance(arrays := _render(where, _dpo_arrays, prompt, chosen, rejected), str):
            chunk.malformed(arrays)
        elif arrays is None:
            chunk.drop(rules, "too_long")
        else:
            prompt_text = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
            chunk.keep(f"{prompt_text}\nchosen: {chosen}\nrejected: {rejected}", rules, arrays)
    return chunk


def _render(where: str, fn, *args):
    """fn(*args), or the one-line error at the record's file:line when the chat template refuses
    the conversation (say, a system turn after the first)."""
    try:
        return fn(*args)
    except NanozhError as e:
        return f"nanozh: {where}: {str(e).removeprefix('nanozh: ')}"


WORK = {"pretrain": _pretrain, "sft": _sft, "dpo": _dpo}


def _work(block: Block) -> Chunk:
    chunk = WORK[_W["kind"]](block)
    chunk.keys, chunk.sketches = dedup_keys(chunk.texts, _W["cfg"])  # one numpy pass for the whole chunk
    chunk.val = chunk.keys[:, 0] / 2**64 < _W["val_fraction"]  # split by the exact key, a hash of the text
    chunk.texts = None  # the main process needs only keys and sketches: sending the texts back would cost a copy
    return chunk


# ----------------------------------------------------------------------------- worker processes

def _serve(work, init, init_args: tuple, tasks: Connection, results: Connection, not_ours: list[Connection]) -> None:
    """A worker process: init(*init_args), then work(task) for every task that comes through
    `tasks`, each result (or the error it raised) sent back through `results` in the same order,
    until None comes. A thread takes the tasks in as they arrive, so that the main process never
    waits to hand one over: it would deadlock, as it may be sending task i while this worker waits
    for it to take result i - n. If the main process dies (kill -9, the OOM killer), `tasks` ends
    and the worker exits at once."""
    for conn in not_ours:  # the pipe ends fork copied in: while we hold one, `tasks` cannot end
        conn.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    init(*init_args)
    inbox = queue.SimpleQueue()

    def receive() -> None:
        while True:
            try:
                task = tasks.recv()
            except EOFError:  # the main process is gone, and nothing would take our results
                os._exit(1)
            inbox.put(task)
            if task is None:
                return

    threading.Thread(target=receive, daemon=True).start()
    while (task := inbox.get()) is not None:
        try:
            result = work(task)
        except Exception as e:  # a user's error as it is; a bug with its traceback, which may not pickle
            result = e if isinstance(e, NanozhError) else RuntimeError(f"in worker {os.getpid()}:\n{traceback.format_exc()}")
        results.send(result)


class Workers:
    """n worker processes (_serve) that run work(task), fed round robin: task i goes to worker
    i % n, so its result is the next one that worker sends back, and results come back in input
    order by construction.

    Why not multiprocessing.Pool: it needs three threads here, one of which polls while a result
    is being received (measured: 1.2 of the main process's 8 ms of CPU per MB of text), and it
    waits forever for the result of a worker that was killed (by the OOM killer, say). Here a dead
    worker is the end of its pipe, and an error."""

    def __init__(self, n: int, work, init, init_args: tuple):
        # the objects that exist now go to a generation the garbage collector does not visit until
        # __exit__: a full collection would write to every one of them, and each page it writes to
        # stops being shared between the main process and the forked workers (measured on a 200 MB
        # corpus: ~6 MB more private memory in each of the three processes, from late in the run)
        gc.freeze()
        self.procs, self.tasks, self.results = [], [], []
        for _ in range(n):
            task_reader, task_writer = Pipe(duplex=False)
            result_reader, result_writer = Pipe(duplex=False)
            not_ours = self.tasks + self.results + [task_writer, result_reader]  # the main process's ends
            proc = Process(target=_serve, args=(work, init, init_args, task_reader, result_writer, not_ours), daemon=True)
            proc.start()
            result_writer.close()  # the worker's end: once the worker is gone, reading gives EOFError
            task_reader.close()
            self.procs.append(proc)
            self.tasks.append(task_writer)
            self.results.append(result_reader)
        self.ready = [deque() for _ in range(n)]  # results taken in ahead of their turn, per worker

    def map(self, tasks: Iterable, in_flight: int) -> Iterator:
        """work(task) for each task, in order, with at most in_flight tasks handed out and not yet
        taken back: memory stays bounded however long `tasks` is (Pool.imap would read it all ahead)."""
        sent = taken = 0
        for task in tasks:
            w = sent % len(self.procs)
            try:
                self.tasks[w].send(task)
            except BrokenPipeError:
                raise self._died(w) from None
            sent += 1
            if sent - taken == in_flight:
                yield self._take(taken)
                taken += 1
        for i in range(taken, sent):
            yield self._take(i)

    def _take(self, i: int):
        """Result i. Until it is in, take whatever result another worker has ready, so that this
        worker goes on to its next task instead of waiting to hand this one over."""
        w = i % len(self.procs)
        while not self.ready[w]:
            for conn in wait(self.results):
                v = self.results.index(conn)
                try:
                    self.ready[v].append(conn.recv())
                except EOFError:
                    raise self._died(v) from None
        result = self.ready[w].popleft()
        if isinstance(result, BaseException):
            raise result
        return result

    def _died(self, w: int) -> NanozhError:
        proc = self.procs[w]
        proc.join(timeout=5)
        how = f"was killed by signal {-proc.exitcode}" if (proc.exitcode or 0) < 0 else f"exited with code {proc.exitcode}"
        return user_error(f"worker process {proc.pid}", how, "out of memory? retry with fewer --workers")

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, exc_type, *_) -> None:
        """Let the workers finish after a clean run; stop them at once after an error."""
        for proc, conn in zip(self.procs, self.tasks):
            if exc_type is None:
                conn.send(None)  # every result was taken, so every worker is alive and waiting
            else:
                proc.kill()  # SIGKILL: a handler the worker inherited (a trainer's, in tests) cannot catch it
        for proc in self.procs:
            proc.join()
        for conn in self.tasks + self.results:
            conn.close()
        gc.unfreeze()  # a process that goes on (a test, a notebook) collects its garbage again


# ----------------------------------------------------------------------------- main process

def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel, in
    a process that works on blocks (_init). Each block makes ~20 MB of numpy temporaries; by default
    glibc maps every one fresh and unmaps it when freed, and touching the new pages again costs a
    page fault each: measured on the generated corpus, 650k faults and 1.8 s of system time against
    220k and 0.9 s with this (10-18% of prepare's wall time). Memory stays flat: what is kept is
    reused by the next block. Arrow allocates from the same heap (ARROW_DEFAULT_MEMORY_POOL above)."""
    if mallopt := _glibc("mallopt"):
        mallopt(M_MMAP_THRESHOLD, 64 << 20)  # allocate below 64 MB from the heap, not with mmap
        mallopt(M_TRIM_THRESHOLD, 256 << 20)  # and give the heap's free top back only beyond 256 MB


def give_back_large_buffers() -> None:
    """The main process's malloc, when workers do the work on blocks: each allocation from 1 MB up
    is mapped on its own and goes back to the kernel when freed, and the heap's free top beyond
    4 MB. What it allocates that large is Parquet pages, read, decompressed and decoded whole: under
    keep_freed_memory they stayed in its heap for good (measured: 30 MB more main-process memory
    from the full pretraining set's 16 MB page of novels to the end). The pickle of each block it
    sends (~1 MB) is mapped afresh too: ~40k more page faults on the full set, ~0.1 s of system
    time against its ~4 s."""
    if mallopt := _glibc("mallopt"):
        mallopt(M_MMAP_THRESHOLD, 1 << 20)
        mallopt(M_TRIM_THRESHOLD, 4 << 20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--input", required=True, nargs="+", help="files or directories")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model (or a directory holding one)")
    p.add_argument("--out", required=True, help="shard directory to write (replaced if it exists)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes that clean and tokenize (1: none, all in this one)")
    p.add_argument("--val_fraction", type=float, default=0.01, help="share of documents held out, by hash")
    p.add_argument("--max_len", type=int, default=512, help="sft/dpo: most tokens per example")
    p.add_argument("--max_shard_tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed record instead of skipping it")
    c = CleanConfig()
    p.add_argument("--no_whitespace", action="store_true", help="keep \\u3000, \\xa0, zero-width characters, \\r\\n")
    p.add_argument("--no_control_chars", action="store_true", help="keep control characters")
    p.add_argument("--no_repeated_punct", action="store_true", help="keep long runs of punctuation")
    p.add_argument("--nfkc", action="store_true", help="NFKC-normalise (turns ，！？ into ASCII)")
    p.add_argument("--min_chars", type=int, default=c.min_chars, help="pretrain: drop shorter documents")
    p.add_argument("--no_exact_dedup", action="store_true")
    p.add_argument("--no_near_dedup", action="store_true")
    p.add_argument("--near_threshold", type=float, default=c.near_threshold, help="MinHash Jaccard of a near duplicate")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        raise user_error("--val_fraction", f"{args.val_fraction} is not in [0, 1)", "e.g. 0.01")
    if not 0 < args.near_threshold <= 1:
        raise user_error("--near_threshold", f"{args.near_threshold} is not in (0, 1]", "e.g. 0.8")
    for name in ("workers", "max_len", "max_shard_tokens"):
        if getattr(args, name) < 1:
            raise user_error(f"--{name}", f"{getattr(args, name)} is not a positive number", "give 1 or more")
    return args


def clean_config(args: argparse.Namespace) -> CleanConfig:
    return CleanConfig(whitespace=not args.no_whitespace, control_chars=not args.no_control_chars,
                       repeated_punct=not args.no_repeated_punct, nfkc=args.nfkc, min_chars=args.min_chars,
                       exact_dedup=not args.no_exact_dedup, near_dedup=not args.no_near_dedup,
                       near_threshold=args.near_threshold)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished tmp into place as out; an existing out goes only after tmp is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def prepare(args: argparse.Namespace) -> dict:
    t0 = time.time()
    tok = Tokenizer(args.tokenizer)
    out = Path(args.out)
    if out.exists() and not (out / "meta.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise user_error(out, "exists and is not a shard directory", "choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):  # left by kill -9, or a run still going
        print(f"note: {stale} is from another run into {out} that has not finished (remove it if none is running)", file=sys.stderr)
    tmp.mkdir()
    try:
        meta = _write_shards(args, tok, tmp)
        shutil.copyfile(tok.path, tmp / "tokenizer.model")
        write_meta(tmp, meta)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed, mb = time.time() - t0, meta["input_bytes"] / 1e6
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"prepare {args.kind}: {mb:.1f} MB in {elapsed:.1f}s ({mb / elapsed:.2f} MB/s, "
          f"{(train['tokens'] + val['tokens']) / elapsed:,.0f} tokens/s); train {train['tokens']:,} tokens in "
          f"{train['examples']:,} examples, val {val['tokens']:,} tokens in {val['examples']:,} examples -> {out}")
    return meta


def _write_shards(args: argparse.Namespace, tok: Tokenizer, tmp: Path) -> dict:
    cfg = clean_config(args)
    stats, dedup, counts = CleanStats(), Deduplicator(cfg), Counter()

    def on_error(err: NanozhError) -> None:
        if args.strict:
            raise err
        counts["malformed"] += 1
        if counts["malformed"] <= MAX_SHOWN_ERRORS:
            tqdm.write(f"skipped: {err}", file=sys.stderr)

    writers = {s: SplitWriter(tmp, s, args.kind, tok.vocab_size, args.max_shard_tokens) for s in ("train", "val")}
    blocks = read_blocks(args.input, args.kind)
    init_args = (str(tok.path), cfg, args.kind, args.max_len, args.val_fraction)
    n_bytes = 0
    # the workers are forked before the progress bar starts its monitor thread (forking a process
    # that has threads can deadlock the child); on an exception the half-written shards go with
    # the temporary directory that prepare() removes
    workers = Workers(args.workers, _work, _init, init_args) if args.workers > 1 else None
    if workers is None:
        _init(*init_args)
    else:
        give_back_large_buffers()
    with workers or nullcontext(), tqdm(desc=f"prepare {args.kind}", unit=" docs", smoothing=0.1) as bar:
        for chunk in workers.map(blocks, 3 * args.workers) if workers else map(_work, blocks):
            for error in chunk.errors:
                on_error(NanozhError(error))
            verdicts = dedup.check_keys(chunk.keys, chunk.sketches)
            chunk.stats.dropped.update(VERDICTS[v] for v in verdicts[verdicts != 0].tolist())
            stats.merge(chunk.stats)
            kept = verdicts == 0
            chunk.write(writers["train"], kept & ~chunk.val)
            chunk.write(writers["val"], kept & chunk.val)
            counts["truncated"] += int(np.count_nonzero(np.array(chunk.truncated, dtype=bool) & kept))
            n_bytes += chunk.n_bytes
            bar.update(chunk.stats.docs_in + len(chunk.errors))
            bar.set_postfix_str(f"{n_bytes / 1e6:.1f} MB", refresh=False)
    splits = {s: w.close() for s, w in writers.items()}
    print(stats.summary(cfg))
    if not splits["train"]["examples"] + splits["val"]["examples"]:
        raise user_error(" ".join(args.input), f"no {args.kind} examples survived ({stats.docs_in} read)",
                         "check the input and the cleaning flags")
    for key, n in sorted(counts.items()):
        if n:
            print(f"{key}: {n:,}")
    if args.val_fraction and not splits["val"]["examples"]:
        print(f"note: no example fell in the val split (raise --val_fraction above {args.val_fraction})")
    return {"kind": args.kind, "vocab_size": tok.vocab_size, "tokenizer_sha256": tok.sha256,
            "eos_id": tok.eos_id, "pad_id": tok.pad_id, "im_start_id": tok.im_start_id, "im_end_id": tok.im_end_id,
            "splits": splits, "counts": dict(counts), "input_bytes": n_bytes,
            "clean": {"docs_in": stats.docs_in, "docs_out": stats.docs_out,
                      "changed": dict(stats.changed), "dropped": dict(stats.dropped)},
            "args": vars(args)}


def main(argv: list[str] | None = None) -> None:
    try:
        prepare(parse_args(argv))
    except NanozhError as e:
        exit_on_user_error(e)
    except KeyboardInterrupt:
        sys.exit("prepare: interrupted, nothing written")


if __name__ == "__main__":
    main()
