"""Cleaning rules and deduplication for nanozh's text, each rule switchable and counted.

clean_text(text, cfg) applies, in this order, the rules that are switched on:
    whitespace      \\r\\n and \\r -> \\n; \\u3000, \\xa0 and the other Unicode spaces -> " "; zero-width
                    and direction marks (U+200B, U+200E, U+200F, U+2060, BOM, soft hyphen) dropped;
                    spaces and tabs at line ends dropped; 3+ newlines -> one blank line; the ends
                    stripped. \\n and \\t are kept (code and poems need them).
    control_chars   C0/C1 control characters other than \\n and \\t dropped.
    nfkc            Unicode NFKC (off by default: it turns ，！？：；（） into ASCII ,!?:;() and
                    full-width text is what a Chinese reader expects).
    repeated_punct  a run of 3+ of one punctuation mark or symbol (Unicode P*, S*) is cut to 3
                    (！！！！！ -> ！！！, ...... -> ...), and to 2 for … and —, which Chinese writes
                    in pairs (…… ——).
    min_chars       a document left with fewer than min_chars characters (or none) is dropped.
It returns the cleaned text and the names of the rules that changed it; a dropped document comes
back as "" with "min_chars" last. clean_texts does the same for a batch, faster. clean_text(s)
and dedup_keys are pure functions of their arguments, so prepare.py runs them in its workers and
sends the main process only the keys and sketches: 1 + bands 64-bit numbers and num_perm bytes
per document.

Deduplicator (one per corpus, in the main process) drops
    exact  a document whose cleaned text has the same 64-bit blake2b hash as a kept one;
    near   a document whose MinHash signature shares an LSH band with a kept one (the S-curve of
           the band/row split of candidate_bands, centred a little below near_threshold, finds the candidates) and
           whose Jaccard similarity over character 5-grams with it, estimated from the two
           signatures, is at least near_threshold; a text shorter than ngram characters has no
           n-grams and is only deduplicated exactly.
No text is kept: 248 bytes per kept document with the defaults (see Deduplicator), however long
the documents.
"""

import math
import mmap
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from hashlib import blake2b
from typing import Iterator

import numpy as np

from errors import user_error


@dataclass
class CleanConfig:
    whitespace: bool = True       # \u3000, \xa0, zero-width chars, \r\n -> \n, trailing spaces; keep \n and \t
    control_chars: bool = True    # drop C0/C1 control characters except \n \t
    repeated_punct: bool = True   # collapse runs like ！！！！！ or ...... or ～～～～ beyond a few
    nfkc: bool = False            # off: turns ，！？：；（） into ASCII
    min_chars: int = 10           # drop documents shorter than this after cleaning
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.8   # estimated Jaccard over character 5-grams
    ngram: int = 5
    num_perm: int = 128           # MinHash size (a power of 2); bands x rows <= num_perm chosen from the threshold

    def __post_init__(self):
        if not 0.0 < self.near_threshold < 1.0:
            raise user_error("near_threshold", f"{self.near_threshold} is not between 0 and 1", "e.g. 0.8")
        if self.ngram < 1 or self.num_perm < 2 or self.num_perm & (self.num_perm - 1):
            raise user_error("ngram/num_perm", f"{self.ngram}/{self.num_perm}: ngram must be positive and num_perm "
                             "a power of 2 (its bin is the top bits of a hash)", "defaults: 5/128")


# ----------------------------------------------------------------------------- cleaning

SPACES = "\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"  # for a regex character class
# ZWJ/ZWNJ (U+200D, U+200C) stay: they hold emoji sequences and some scripts together
INVISIBLE = "\u00ad\u200b\u200e\u200f\u2060\ufeff"
CONTROL_CHARS = "\x00-\x08\x0b-\x1f\x7f-\x9f"  # C0 and C1 but \t and \n (\r is one of them)
ODD = re.compile(f"[{SPACES}{INVISIBLE}{CONTROL_CHARS}]")
SPACE_OR_INVISIBLE = re.compile(f"[{SPACES}{INVISIBLE}]")
CONTROL = re.compile(f"[{CONTROL_CHARS}]")
TRAILING = re.compile(r"[ \t]+\n")
BLANK_RUNS = re.compile(r"\n\n\n+")  # a literal prefix: re finds it at memchr speed
# Unicode punctuation (P*) and symbols (S*) of the BMP, spelled out: re matches a set of chars
# ~3x faster than [^\w\s]; letters, digits, CJK (哈哈哈哈, 二〇〇〇) and whitespace never match
PUNCT_CHARS = [chr(c) for c in range(0x10000) if unicodedata.category(chr(c))[0] in "PS"]
PUNCT_RUN = re.compile(f"([{''.join(map(re.escape, PUNCT_CHARS))}])\\1\\1+")


def _whitespace(text: str, odd: bool) -> str:
    if odd:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = SPACE_OR_INVISIBLE.sub(lambda m: "" if m.group() in INVISIBLE else " ", text)
    if " \n" in text or "\t\n" in text:  # the check is 5x faster than the regex finding nothing
        text = TRAILING.sub("\n", text)
    return BLANK_RUNS.sub("\n\n", text).strip()


def _punct_run(m: re.Match) -> str:
    return m.group(0)[:2 if m.group(1) in "…—" else 3]


def clean_text(text: str, cfg: CleanConfig) -> tuple[str, list[str]]:
    """Cleaned text and the names of the rules that changed it ("" + "min_chars" when dropped)."""
    # one scan for every character the first two rules replace: most texts have none, and then
    # those rules skip their own scans (this is a third of the time clean_text takes)
    odd = ODD.search(text) is not None
    rules = (
        ("whitespace", lambda t: _whitespace(t, odd)),
        ("control_chars", lambda t: CONTROL.sub("", t) if odd else t),
        ("nfkc", lambda t: unicodedata.normalize("NFKC", t)),
        ("repeated_punct", lambda t: PUNCT_RUN.sub(_punct_run, t)),
    )
    changed = []
    for name, rule in rules:
        if getattr(cfg, name):
            new = rule(text)
            if new != text:
                changed.append(name)
                text = new
    if len(text) < max(cfg.min_chars, 1):
        return "", changed + ["min_chars"]
    return text, changed


ODD_CHAR, RUN3_CHAR, RUN4_CHAR = 1, 2, 4  # bits of _char_flags()


@lru_cache(maxsize=1)
def _char_flags() -> np.ndarray:
    """A uint8 per code point: ODD_CHAR for the characters the whitespace and control_chars rules
    replace; RUN3_CHAR for those whose runs of 3 are shortened (\n by whitespace, … and — by
    repeated_punct); RUN4_CHAR for the other punctuation, whose runs are cut to 3, so only a run
    of 4 changes. Every such character is in the BMP."""
    flags = np.zeros(0x110000, dtype=np.uint8)
    flags[[c for c in range(0x10000) if ODD.match(chr(c))]] |= ODD_CHAR
    flags[[ord(c) for c in PUNCT_CHARS]] |= RUN4_CHAR
    flags[[ord("\n"), ord("…"), ord("—")]] = RUN3_CHAR
    return flags


def clean_texts(texts: list[str], cfg: CleanConfig) -> list[tuple[str, list[str]]]:
    """[clean_text(t, cfg) for t in texts], the same results ~3x faster: most texts need no rule,
    and one numpy scan of the whole batch finds the few that might, so only those pay for the
    regex scans. A text is flagged when it holds a character the whitespace or control_chars
    rules replace, a run of 3 newlines, … or —, a run of 4 of another punctuation mark, a space
    or tab before a newline, or whitespace at either end; a text with none of these is unchanged
    by every rule but NFKC. (Runs of 3, like "..." in code, are common and need no change.)"""
    if cfg.nfkc or not texts:
        return [clean_text(t, cfg) for t in texts]
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    cp = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    flags = np.take(_char_flags(), cp)  # take: a plain gather, cheaper than fancy indexing
    same = cp[1:] == cp[:-1]
    run3 = np.flatnonzero(same[1:] & same[:-1])  # cp[i] == cp[i + 1] == cp[i + 2]
    run4 = np.flatnonzero(same[2:] & same[1:-1] & same[:-2])  # ... == cp[i + 3]
    newline = cp[1:] == ord("\n")
    trailing = newline & ((cp[:-1] == ord(" ")) | (cp[:-1] == ord("\t")))
    # nonzero() of a bool array, not of the uint8 flags: ~10x faster
    hits = np.concatenate([np.flatnonzero((flags & ODD_CHAR) != 0), run3[(flags[run3] & RUN3_CHAR) != 0],
                           run4[(flags[run4] & RUN4_CHAR) != 0], np.flatnonzero(trailing)])
    # a hit at position i belongs to the text whose span holds i (a run across two texts flags both: harmless)
    flagged = set(np.searchsorted(np.cumsum(lengths), hits, side="right").tolist())
    min_chars = max(cfg.min_chars, 1)
    out = []
    for i, t in enumerate(texts):
        if i in flagged or t[:1].isspace() or t[-1:].isspace():
            out.append(clean_text(t, cfg))
        else:
            out.append((t, []) if len(t) >= min_chars else ("", ["min_chars"]))
    return out


# ----------------------------------------------------------------------------- MinHash
# One-permutation hashing (Li, Owen & Zhang 2012): each n-gram is hashed once; the hash picks one of
# num_perm bins and gives a 32-bit value; a bin's minimum is a MinHash of the n-grams that fell into
# it, so two documents agree on a bin with probability ~ their Jaccard similarity, as with num_perm
# separate hash functions, for O(n-grams) work instead of O(n-grams x num_perm). A short document
# leaves bins empty; each empty bin copies the value of the first filled bin along a pseudo-random
# probe sequence of its own ("optimal densification", Shrivastava 2017), which keeps agreement ~
# Jaccard. Copying from the next bin to the right instead ("rotation") is simpler but makes the
# neighbouring bins of an LSH band agree together: it let short poems that share only a title line
# through as near duplicates.

U32, U64 = np.uint32, np.uint64
EMPTY = np.iinfo(np.uint32).max  # a bin no n-gram fell into
GRAM_MIX, VALUE_MIX = U32(0x9E3779B1), U32(0x85EBCA77)  # odd: multiplying by them mod 2^32 is a bijection
PROBE_MIX = U64(0x9E3779B97F4A7C15)
# picks made for every bin, empty or not, before the empty ones are listed: a whole column per pick
# is cheap, and listing 70 empty bins of each of a block's 3,700 short poems is not (a block of
# them took 27 ms/MB to densify with 0 such picks, 8.7 with 6)
FULL_PROBES = 6


def _gram_hashes(cp: np.ndarray, n: int) -> np.ndarray:
    """A 32-bit polynomial hash of every n-gram cp[i : i + n] of a uint32 array of code points, mod
    2^32 with an odd multiplier. Its high bits mix every character of the gram (the low bits do
    not: only high bits are used). 32 bits, not 64: numpy multiplies twice as many per instruction,
    and two distinct grams of a pair of 1,000-character documents collide with p ~ 1e-4, which
    moves their estimated similarity by one gram's worth."""
    length = len(cp) - n + 1
    h = cp[:length].copy()
    for k in range(1, n):
        h *= GRAM_MIX
        h += cp[k:k + length]
    h *= GRAM_MIX  # carries the last character into the high bits too
    return h


def minhash_signatures(texts: list[str], cfg: CleanConfig) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures of the texts' character n-grams; a text
    shorter than n has no n-grams and gets EMPTY everywhere. One pass over all the texts, so that
    short documents do not each pay numpy's per-call overhead: prepare.py calls this per chunk."""
    k, n = cfg.num_perm, cfg.ngram
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    grams = np.maximum(lengths - n + 1, 0)
    sig = np.full((len(texts), k), EMPTY, dtype=np.uint32)
    cp = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    if len(cp) < n:
        return sig
    h = _gram_hashes(cp, n)
    # bin: the top log2(k) bits of h, plus the text's row offset; value: h times another odd
    # constant, whose high bits are a different function of the gram
    where = (h >> U32(32 - k.bit_length() + 1)).astype(np.intp)
    where += np.repeat(np.arange(len(texts)) * k, lengths)[:len(h)]
    value = h
    value *= VALUE_MIX
    # the n - 1 positions before each text's end start grams that run into the next text
    crossing = np.cumsum(lengths)[:, None] - np.arange(1, n)
    value[crossing[(crossing >= 0) & (crossing < len(h))]] = EMPTY
    np.minimum.at(sig.reshape(-1), where, value)

    # densify: first FULL_PROBES picks for every bin of every text, a whole column of sig
    # per pick, which fills most empty bins; a pick counts only where the bin is still empty.
    # EMPTY is all ones, so dense & pick is the pick there; where the bin is already filled, the
    # pick is first made all ones, so that dense & pick is dense
    dense = sig.copy()
    for probe in range(FULL_PROBES):
        pick = np.take(sig, _probe_bins(k, probe, 1)[:, 0], axis=1)
        pick |= (dense != EMPTY) * U32(EMPTY)
        dense &= pick
    # then only the bins still empty, each as a flat index into sig and its row's first index
    empty = np.flatnonzero((dense == EMPTY) & (grams > 0)[:, None])
    bins = empty & (k - 1)
    row_start = empty - bins
    flat, probe, probes = sig.reshape(-1), FULL_PROBES, 2
    while len(empty):  # a text with f filled bins needs ~num_perm / f probes per empty bin
        # the next `probes` picks of every empty bin at once, twice as many each round: short
        # texts need hundreds of probes for their last empty bin, most bins only one or two
        value = flat[_probe_bins(k, probe, probes)[bins] + row_start[:, None]]
        value = value[np.arange(len(empty)), (value != EMPTY).argmax(axis=1)]
        found = value != EMPTY
        dense.reshape(-1)[empty[found]] = value[found]
        keep = ~found
        empty, bins, row_start = empty[keep], bins[keep], row_start[keep]
        probe, probes = probe + probes, 2 * probes
    return dense


@lru_cache(maxsize=32)
def _probe_bins(k: int, probe: int, probes: int) -> np.ndarray:
    """(k, probes) intp: the picks probe + 1 ... probe + probes of each bin's pseudo-random probe
    sequence, a hash of (bin, pick) scaled to [0, k). The same in every call: minhash_signatures
    asks for the same few rounds each time, so they are computed once."""
    picks = np.arange(probe + 1, probe + 1 + probes, dtype=np.uint64) << U64(32)
    src = (np.arange(k, dtype=np.uint64)[:, None] + picks) * PROBE_MIX
    return ((src >> U64(32)) * U64(k) >> U64(32)).astype(np.intp)


def minhash_signature(text: str, cfg: CleanConfig) -> np.ndarray:
    """(num_perm,) uint32 MinHash signature of one text's character n-grams."""
    return minhash_signatures([text], cfg)[0]


@lru_cache(maxsize=None)
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm whose S-curve P(s) = 1 - (1 - s^rows)^bands
    best separates similarity s above threshold from below: it minimises the area of false
    positives (P over [0, threshold]) plus false negatives (1 - P over [threshold, 1]). For 0.8
    and 128 that is 9 bands x 13 rows: P(0.7) = 0.08, P(0.8) = 0.40, P(0.9) = 0.93."""
    s = np.linspace(0.0, 1.0, 1001)
    best = (np.inf, 1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s ** r) ** b
            err = np.trapezoid(np.where(s < threshold, p, 1.0 - p), s)
            best = min(best, (err, b, r))
    return best[1], best[2]


# Every LSH candidate is checked against its estimated Jaccard, so a false candidate costs one
# comparison while a missed one is a duplicate kept. The S-curve is therefore centred below the
# threshold: measured on planted pairs (python -m bench.prepare --only_dedup), centring it at t - 0.1
# instead of t raised recall at 0.8 from 0.59 to 0.83 for 5 more band keys (40 bytes) per document.
CANDIDATE_MARGIN = 0.1


def candidate_bands(cfg: CleanConfig) -> tuple[int, int]:
    """(bands, rows) of the LSH that finds near-duplicate candidates for cfg.near_threshold."""
    return lsh_bands(max(0.05, cfg.near_threshold - CANDIDATE_MARGIN), cfg.num_perm)


@lru_cache(maxsize=None)
def _band_multipliers(bands: int, rows: int) -> np.ndarray:
    """(bands, rows) odd uint64 multipliers: a band's key is sum(row value x multiplier) mod 2^64,
    so equal values in different bands give different keys. The fixed seed makes keys the same in
    every run and every process (drawn below 2^63 because numpy's integers() stops at int64)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 2**63, size=(bands, rows), dtype=np.uint64) * U64(2) + U64(1)


def exact_keys(texts: list[str]) -> np.ndarray:
    """(len(texts),) uint64: the 64-bit blake2b of each text's UTF-8, its exact-duplicate key,
    with the lowest bit set (so that no key is 0, which dedup_keys uses for "none").
    prepare.py also splits train/val by it, so the same text always lands in the same split."""
    digests = b"".join(blake2b(t.encode(), digest_size=8).digest() for t in texts)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64) | U64(1)


# texts per minhash_signatures() call: its temporaries grow with the empty bins that short texts
# leave (25 MB for a block of 3,700 short poems at once, 7 MB in groups of this size)
MINHASH_GROUP = 1024
# and characters per call: they also take ~30 bytes per character, and a whole block at once (up
# to ~560k characters of man pages) made each worker's heap ~7 MB larger, for ~2% less time
MINHASH_GROUP_CHARS = 1 << 17
SKETCH_MIX = (U32(0x85EBCA6B), U32(0xC2B2AE35))  # murmur3's 32-bit finaliser


def _minhash_groups(texts: list[str]) -> Iterator[tuple[int, int]]:
    """(start, end) of runs of consecutive texts, each of at most MINHASH_GROUP texts and
    MINHASH_GROUP_CHARS characters (or of one longer text)."""
    start = chars = 0
    for i, text in enumerate(texts):
        if i > start and (i - start == MINHASH_GROUP or chars + len(text) > MINHASH_GROUP_CHARS):
            yield start, i
            start, chars = i, 0
        chars += len(text)
    if start < len(texts):
        yield start, len(texts)


def sketches(sig: np.ndarray) -> np.ndarray:
    """uint8, the shape of `sig`: 8 bits of each signature slot, what Deduplicator compares to
    estimate Jaccard (a quarter of the memory of the whole slots). Two slots with the same value
    give the same byte; two different ones give the same byte with p = 1/256, which the estimate
    takes back out. The byte is the top of a hash of the slot, not the slot's own bits: a slot is a
    minimum, so its top bits are mostly 0, and its low bits follow the low bits of the characters."""
    h = sig ^ (sig >> U32(16))
    h *= SKETCH_MIX[0]
    h ^= h >> U32(13)
    h *= SKETCH_MIX[1]
    h ^= h >> U32(16)
    return (h >> U32(24)).astype(np.uint8)


def dedup_keys(texts: list[str], cfg: CleanConfig) -> tuple[np.ndarray, np.ndarray]:
    """All that Deduplicator.check_keys needs of the texts: (keys, sketches), where keys is
    (len(texts), 1 + bands) uint64, each text's exact key then its LSH band keys (the rows of one
    band of its MinHash signature hashed into one number, with the lowest bit set), and sketches is
    (len(texts), num_perm) uint8, sketches() of its signature (0 columns when near_dedup is off).
    A band key is 0 (none) when near_dedup is off or the text is shorter than an n-gram. A pure
    function of the texts: prepare.py runs it in its workers."""
    bands, rows = candidate_bands(cfg)
    keys = np.zeros((len(texts), 1 + bands), dtype=np.uint64)
    keys[:, 0] = exact_keys(texts)
    sketch = np.zeros((len(texts), cfg.num_perm if cfg.near_dedup else 0), dtype=np.uint8)
    for i, end in _minhash_groups(texts) if cfg.near_dedup else ():
        group = texts[i:end]
        sig = minhash_signatures(group, cfg)
        sketch[i:i + len(group)] = sketches(sig)
        banded = sig[:, :bands * rows].reshape(len(group), bands, rows)
        band_keys = keys[i:i + len(group), 1:]
        band_keys[:] = (banded * _band_multipliers(bands, rows)).sum(axis=2) | U64(1)
        band_keys[sig[:, 0] == EMPTY] = 0  # no n-grams: only the exact key
    return keys, sketch


# ----------------------------------------------------------------------------- deduplication

LOW32, HIGH32 = U64(0xFFFFFFFF), U64(0xFFFFFFFF00000000)


class _KeySet:
    """A set of 64-bit keys at 8 bytes each: sorted runs ("levels") whose sizes shrink at least 4x
    from one to the next. Adding a batch of keys makes it a new last level, merged into the one
    before while that is less than 4x its size; a key is copied by ~log4(keys / batch) merges, and
    a lookup is one binary search per level (~10 levels for 10^8 keys).

    Each level is an anonymous memory mapping of its own, not a numpy array on the heap: a merge
    grows the bigger level in place (mremap moves pages, it copies nothing), where concatenating
    would hold that level twice, and a freed level goes back to the OS, where on the heap it would
    leave a hole too small for the next, bigger level (main-process RSS grew by ~2x the key set)."""

    def __init__(self) -> None:
        self.levels: list[mmap.mmap] = []

    def __len__(self) -> int:
        return sum(map(len, self.levels)) // 8

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which of these keys (any shape) are in the set."""
        found = np.zeros(keys.shape, dtype=bool)
        for level in map(_keys, self.levels):
            i = np.searchsorted(level, keys).clip(max=len(level) - 1)
            found |= level[i] == keys
        return found

    def find(self, prefixes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every key in the set whose top 32 bits are one of `prefixes` (uint64 keys with their low
        32 bits 0, sorted: binary searches go ~2x faster): (index into prefixes, the key's low 32
        bits) per match, as two uint64 arrays."""
        which, low = [np.zeros(0, dtype=np.uint64)], [np.zeros(0, dtype=np.uint64)]
        for level in map(_keys, self.levels):
            start = np.searchsorted(level, prefixes)
            count = np.searchsorted(level, prefixes | LOW32, side="right") - start
            # the matches of prefix q are level[start[q] : start[q] + count[q]], mostly none
            q = np.repeat(np.arange(len(prefixes), dtype=np.uint64), count)
            at = np.repeat(start - (np.cumsum(count) - count), count) + np.arange(len(q))
            which.append(q)
            low.append(level[at] & LOW32)
        return np.concatenate(which), np.concatenate(low)

    def add(self, keys: np.ndarray) -> None:
        """Add keys that are not in the set yet."""
        if not keys.size:
            return
        new = _mapping(keys.size * 8)
        _keys(new)[:] = np.sort(keys, axis=None)
        while self.levels and len(self.levels[-1]) < 4 * len(new):
            n = len(self.levels[-1]) // 8
            merged = _grown(self.levels.pop(), len(new))
            run = _keys(merged)
            run[n:] = _keys(new)
            # two sorted runs: the stable sort (timsort for uint64) merges them in linear time, in
            # place, with a buffer the size of the shorter run
            run.sort(kind="stable")
            del run  # a mapping cannot be resized while an array views it
            new = merged
        self.levels.append(new)


class _Rows:
    """A growing table of uint8 rows of one width, appended to and read by row number, in an
    anonymous mapping (for _KeySet's reasons) whose size doubles when it is full: pages of it that
    no row reached yet are never touched, so they cost no memory."""

    def __init__(self, width: int) -> None:
        self.width, self.count = width, 0
        self.table = _mapping(max(width, 1) << 12)

    def append(self, rows: np.ndarray) -> None:
        end = (self.count + len(rows)) * self.width
        if end > len(self.table):
            self.table = _grown(self.table, max(end, 2 * len(self.table)) - len(self.table))
        np.frombuffer(self.table, dtype=np.uint8, count=end)[self.count * self.width:] = rows.reshape(-1)
        self.count += len(rows)

    def take(self, numbers: np.ndarray) -> np.ndarray:
        """The rows with these numbers, copied out (a view would stop the mapping from growing)."""
        view = np.frombuffer(self.table, dtype=np.uint8, count=self.count * self.width)
        return view.reshape(self.count, self.width)[numbers]


def _mapping(size: int) -> mmap.mmap:
    # private: a shared anonymous mapping is backed by a file of its first size, and the pages that
    # mremap adds beyond that fault with SIGBUS
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def _keys(level: mmap.mmap) -> np.ndarray:
    return np.frombuffer(level, dtype=np.uint64)


def _grown(level: mmap.mmap, extra: int) -> mmap.mmap:
    """`level` with `extra` more bytes at its end."""
    try:
        level.resize(len(level) + extra)
        return level
    except SystemError:  # no mremap (macOS): a new mapping, and a copy
        grown = _mapping(len(level) + extra)
        grown.write(level)
        return grown


VERDICTS = (None, "exact", "near")  # what Deduplicator.check_keys() returns the indices of
EXACT, NEAR = 1, 2


class Deduplicator:
    """Remembers the documents kept so far and flags repeats of them, in input order: a document
    is an exact repeat when its exact key is a kept document's, else a near duplicate when it shares
    an LSH band with a kept document (a candidate) whose Jaccard similarity with it, estimated from
    their signatures, is at least near_threshold; else it is kept.

    Per kept document it stores its exact key, and per band the band key's top 32 bits beside the
    document's number (a 64-bit key: (band key >> 32) << 32 | number), then its sketch (the byte
    of each signature slot that dedup_keys gives): 8 + 8 x bands + num_perm bytes, 248 with the
    defaults (14 bands, 128 slots), 248 MB per million kept documents, however long they are.
    A band key cut to 32 bits meets an unrelated one with p = 2^-32, so a document gets ~bands^2 x kept
    / 2^32 false candidates (0.05 per million kept), each ruled out by one comparison of sketches.
    Documents are numbered in 32 bits: 4 billion kept documents, 900 GB of this state, at most."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.exact = _KeySet()   # the exact keys of the kept documents
        self.bands = _KeySet()   # their band entries, (band key >> 32) << 32 | number
        self.sketches = _Rows(cfg.num_perm)  # row `number`: the sketch of the kept document of that number
        # estimated Jaccard = (equal bytes / num_perm - 1/256) / (1 - 1/256), taking out the chance
        # that two different slots give the same byte; >= threshold when at least this many are equal
        t = cfg.near_threshold
        self.min_equal = math.ceil(cfg.num_perm * (t + (1 - t) / 256) - 1e-9)

    def check(self, text: str) -> str | None:
        """None if the document is new (it is then remembered), else "exact" or "near"."""
        return self.check_many([text])[0]

    def check_many(self, texts: list[str]) -> list[str | None]:
        """check() for a batch, in order (a text may repeat one earlier in the same batch)."""
        return [VERDICTS[v] for v in self.check_keys(*dedup_keys(texts, self.cfg)).tolist()]

    def similar(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per row of two (n, num_perm) arrays of sketches: is their estimated Jaccard >= near_threshold."""
        return np.count_nonzero(a == b, axis=1) >= self.min_equal

    def check_keys(self, keys: np.ndarray, sketch: np.ndarray) -> np.ndarray:
        """check_many() from the texts' dedup_keys(), which prepare.py's workers compute, as a
        uint8 array of indices into VERDICTS (0: new). Most documents share no key with a kept
        document nor with another of the batch, so numpy finds the few that do (the suspects),
        and only those are decided one by one, in order."""
        n = len(keys)
        docs = np.arange(n)
        exact_key = keys[:, 0]
        if self.cfg.exact_dedup:
            unique, first, inverse = np.unique(exact_key, return_index=True, return_inverse=True)
            first = first[inverse]  # each document's first copy in the batch
            exact_stored = self.exact.contains(unique)[inverse]
        else:
            first, exact_stored = docs, np.zeros(n, dtype=bool)
        near_stored, near_batch = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        if self.cfg.near_dedup:
            entries = self._entries(keys[:, 1:], docs)
            entry_doc = (entries & LOW32).astype(np.intp)
            # candidates kept in earlier batches: near when one of them is similar enough
            which, number = self.bands.find(entries & HIGH32)
            pair_doc = entry_doc[which]
            near_stored[pair_doc[self.similar(sketch[pair_doc], self.sketches.take(number))]] = True
            # candidates in this batch: entries of one band key are adjacent, in document order
            prefix = entries >> U64(32)
            new_group = np.ones(len(entries), dtype=bool)
            new_group[1:] = prefix[1:] != prefix[:-1]
            group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(entries)), 0))
            near_batch[entry_doc[~new_group]] = True
        suspects = np.flatnonzero(exact_stored | (first < docs) | near_stored | near_batch)
        verdicts, kept = np.zeros(n, dtype=np.uint8), np.ones(n, dtype=bool)
        if len(suspects) and self.cfg.near_dedup:
            by_doc = np.argsort(entry_doc, kind="stable")  # each document's entries, adjacent
            entry_range = np.searchsorted(entry_doc[by_doc], [suspects, suspects + 1])
        for s, i in enumerate(suspects.tolist()):
            if exact_stored[i] or (first[i] < i and kept[first[i]]):
                verdicts[i] = EXACT
            elif near_stored[i] or (near_batch[i] and self._similar_earlier(
                    i, by_doc[entry_range[0, s]:entry_range[1, s]], group_start, entry_doc, sketch, kept)):
                verdicts[i] = NEAR
            else:
                continue
            kept[i] = False
        self._remember(keys[kept], sketch[kept])
        return verdicts

    @staticmethod
    def _entries(band_keys: np.ndarray, docs: np.ndarray) -> np.ndarray:
        """Sorted uint64 (band key >> 32) << 32 | document, one per band key that is not 0."""
        valid = band_keys != 0
        return np.sort((band_keys[valid] & HIGH32) | np.repeat(docs, valid.sum(axis=1)).astype(np.uint64))

    def _similar_earlier(self, i: int, own: np.ndarray, group_start: np.ndarray, entry_doc: np.ndarray,
                         sketch: np.ndarray, kept: np.ndarray) -> bool:
        """Is document i similar to a kept document earlier in the batch that shares a band key
        with it? `own` are the positions of its entries, each after the earlier documents of its group."""
        earlier = np.concatenate([entry_doc[group_start[e]:e] for e in own.tolist()])
        # below i: in a group of two of its own bands that met in 32 bits, i would meet itself
        earlier = earlier[(earlier < i) & kept[earlier]]
        return bool(self.similar(sketch[earlier], sketch[i][None, :]).any())

    def _remember(self, keys: np.ndarray, sketch: np.ndarray) -> None:
        """Store the keys and sketches of the documents just kept."""
        if self.cfg.exact_dedup:
            self.exact.add(keys[:, 0])
        if self.cfg.near_dedup:
            with_grams = keys[:, 1] != 0  # a text shorter than an n-gram has no band keys
            numbers = self.sketches.count + np.arange(np.count_nonzero(with_grams))
            self.bands.add(self._entries(keys[with_grams, 1:], numbers))
            self.sketches.append(sketch[with_grams])


# ----------------------------------------------------------------------------- counts

ORDER = ("whitespace", "control_chars", "nfkc", "repeated_punct", "min_chars", "exact", "near")


@dataclass
class CleanStats:
    """Documents in and out, and per rule how many documents it changed and how many it dropped."""
    docs_in: int = 0
    changed: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)

    @property
    def docs_out(self) -> int:
        return self.docs_in - self.dropped.total()

    def add(self, rules: list[str], dropped: str | None = None) -> None:
        """Count one document: the rules that changed it, and the reason it was dropped, if it was
        ("min_chars" from clean_text, "exact"/"near" from Deduplicator.check, or any other)."""
        self.docs_in += 1
        if rules:  # most documents: none, and Counter.update costs even when given nothing
            self.changed.update(r for r in rules if r != dropped)
        if dropped:
            self.dropped[dropped] += 1

    def merge(self, other: "CleanStats") -> None:
        self.docs_in += other.docs_in
        self.changed.update(other.changed)
        self.dropped.update(other.dropped)

    def summary(self, cfg: CleanConfig | None = None) -> str:
        """A table with a row per rule (marked "off" when cfg switches it off), then the totals."""
        switch = {"min_chars": "min_chars", "exact": "exact_dedup", "near": "near_dedup"}
        names = list(ORDER) + sorted((set(self.changed) | set(self.dropped)) - set(ORDER))
        rows = [f"{'rule':<16}{'changed':>12}{'dropped':>12}"]
        for n in names:
            off = cfg is not None and n in ORDER and not getattr(cfg, switch.get(n, n))
            rows.append(f"{n:<16}{'off':>12}" if off else f"{n:<16}{self.changed[n]:>12,}{self.dropped[n]:>12,}")
        kept = 100.0 * self.docs_out / max(self.docs_in, 1)
        rows.append(f"documents: {self.docs_in:,} in, {self.docs_out:,} out ({kept:.1f}% kept)")
        return "\n".join(rows)
