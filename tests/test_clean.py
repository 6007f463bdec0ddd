"""data/clean.py: each cleaning rule does its job and can be switched off; exact and near duplicates
go while distinct documents stay; the counts add up."""

import mmap
import random

import numpy as np
import pytest

from data import clean
from data.clean import (EMPTY, MINHASH_GROUP, VALUE_MIX, VERDICTS, CleanConfig, CleanStats, Deduplicator, _gram_hashes,
                        _KeySet, _probe_bins, _Rows, clean_text, clean_texts, dedup_keys, lsh_bands, minhash_signature,
                        minhash_signatures, sketches)
from errors import NanozhError

OFF = dict(whitespace=False, control_chars=False, repeated_punct=False, nfkc=False, min_chars=0)


def only(rule: str, **extra) -> CleanConfig:
    """A config with every cleaning rule off but `rule`."""
    return CleanConfig(**{**OFF, rule: True, **extra})


def test_whitespace_rule():
    text = "\ufeff 第一回\xa0开头\u200b \r\n　　第二行\t \r\n\n\n\n第三行\t中间\n"
    assert clean_text(text, only("whitespace")) == ("第一回 开头\n  第二行\n\n第三行\t中间", ["whitespace"])
    assert clean_text(text, CleanConfig(**OFF)) == (text, [])


def test_whitespace_keeps_tabs_newlines_and_emoji_joiners():
    text = "def f():\n\treturn 1\n家庭：👨\u200d👩\u200d👧"
    assert clean_text(text, only("whitespace")) == (text, [])


def test_control_chars_rule():
    text = "正文\x00\x07有\x1b[0m控制\x85字符\n\t保留"
    assert clean_text(text, only("control_chars")) == ("正文有[0m控制字符\n\t保留", ["control_chars"])
    assert clean_text(text, CleanConfig(**OFF))[0] == text


def test_repeated_punct_rule():
    text = "太好了！！！！！真的吗？？？？等等......然后……………～～～～——————结束。。。。哈哈哈哈二〇〇〇〇年"
    want = "太好了！！！真的吗？？？等等...然后……～～～——结束。。。哈哈哈哈二〇〇〇〇年"
    assert clean_text(text, only("repeated_punct")) == (want, ["repeated_punct"])
    assert clean_text("好！！！……——", only("repeated_punct")) == ("好！！！……——", [])
    assert clean_text(text, CleanConfig(**OFF))[0] == text


def test_nfkc_is_off_by_default_and_keeps_fullwidth_punctuation():
    text = "你好，世界！为什么？注意：分号；（括号）ＡＢＣ１２３"
    assert clean_text(text, CleanConfig()) == (text, [])
    assert clean_text(text, only("nfkc")) == ("你好,世界!为什么?注意:分号;(括号)ABC123", ["nfkc"])


def test_min_chars_drops_short_documents_after_cleaning():
    assert clean_text("短文本。" + " " * 20, CleanConfig(min_chars=5)) == ("", ["whitespace", "min_chars"])
    assert clean_text("足够长的文本", CleanConfig(min_chars=5)) == ("足够长的文本", [])
    assert clean_text("短", CleanConfig(min_chars=0)) == ("短", [])
    assert clean_text("  ", CleanConfig(min_chars=0)) == ("", ["whitespace", "min_chars"])


def test_invalid_config_is_a_user_error():
    with pytest.raises(NanozhError, match="near_threshold"):
        CleanConfig(near_threshold=1.5)



def test_batched_cleaning_equals_clean_text_on_tricky_texts():
    # texts drawn from the characters every rule acts on, in runs, at the ends and across texts
    alphabet = list("中文字。，！？…—.～-") + [" ", "\t", "\n", "\r", "\u3000", "\xa0", "\u200b", "\ufeff",
                                               "\x00", "\x85", "\x1c", "\u2028", "😀", "𠀀", "\u200d"]
    rng = random.Random(5)
    texts = ["".join(rng.choice(alphabet) * rng.choice((1, 1, 1, 2, 3, 4, 5)) for _ in range(rng.randrange(0, 12)))
             for _ in range(3000)]
    texts += ["一段没有任何需要清洗的正常文字。", "短", "", "好！！！", "好！！", "尾部空格 \n下一行", "a\n\n\nb"]
    for cfg in (CleanConfig(), CleanConfig(min_chars=3), only("whitespace"), only("control_chars"),
                only("repeated_punct"), only("nfkc"), CleanConfig(**OFF)):
        assert clean_texts(texts, cfg) == [clean_text(t, cfg) for t in texts], cfg
    changed = sum(clean_text(t, CleanConfig()) != (t, []) for t in texts)
    assert 0.3 * len(texts) < changed < len(texts)  # the texts exercise both paths

# ----------------------------------------------------------------------------- MinHash and LSH

def random_doc(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(n))


def mutate(rng: random.Random, text: str, k: int) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), k):
        chars[i] = "某"
    return "".join(chars)


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = ({t[i:i + n] for i in range(len(t) - n + 1)} for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def test_signature_agreement_estimates_jaccard():
    rng, cfg = random.Random(0), CleanConfig()
    errors = []
    for k in (2, 10, 30, 60, 120):
        for _ in range(10):
            a = random_doc(rng, 600)
            b = mutate(rng, a, k)
            errors.append(np.mean(minhash_signature(a, cfg) == minhash_signature(b, cfg)) - jaccard(a, b))
    assert abs(np.mean(errors)) < 0.02 and np.std(errors) < 0.06  # 128 bins: sd ~ 0.04 at J = 0.5


def test_batched_signatures_equal_one_at_a_time():
    cfg = CleanConfig()
    texts = ["正好五个字", "比五个字多一点的文本", "", "四个字儿", random_doc(random.Random(1), 3000), "六个字的文本"]
    batch = minhash_signatures(texts, cfg)
    assert batch.shape == (len(texts), cfg.num_perm) and batch.dtype == np.uint32
    for text, row in zip(texts, batch):
        assert np.array_equal(row, minhash_signature(text, cfg))
    with_grams = [row for text, row in zip(texts, batch) if len(text) >= cfg.ngram]
    assert len(np.unique(with_grams, axis=0)) == len(with_grams)
    assert (batch[[2, 3]] == EMPTY).all()  # shorter than one n-gram


def test_dedup_keys_do_not_depend_on_how_texts_are_grouped(monkeypatch):
    # dedup_keys hashes MINHASH_GROUP texts (and MINHASH_GROUP_CHARS characters) at a time: keys
    # across a group boundary must be the same as keys computed one text at a time
    rng = random.Random(2)
    texts = [random_doc(rng, rng.randrange(5, 60)) for _ in range(2 * MINHASH_GROUP + 5)]
    cfg = CleanConfig()
    keys, sketch = dedup_keys(texts, cfg)
    for i in (0, MINHASH_GROUP - 1, MINHASH_GROUP, 2 * MINHASH_GROUP + 4):
        one_keys, one_sketch = dedup_keys([texts[i]], cfg)
        assert np.array_equal(keys[i], one_keys[0]) and np.array_equal(sketch[i], one_sketch[0])
    assert (keys[:, 1:] != 0).all()
    monkeypatch.setattr(clean, "MINHASH_GROUP_CHARS", 100)  # a few texts per group
    small_keys, small_sketch = dedup_keys(texts, cfg)
    assert np.array_equal(keys, small_keys) and np.array_equal(sketch, small_sketch)



def test_densification_copies_the_first_filled_bin_of_each_probe_sequence():
    # the definition, one text and one bin at a time: an empty bin takes the value of the first
    # filled bin along its probe sequence (short texts leave most bins empty, some need many picks)
    rng = random.Random(5)
    texts = [random_doc(rng, n) for n in (5, 6, 9, 20, 40, 130, 700)]
    cfg = CleanConfig()
    k = cfg.num_perm
    for text, dense in zip(texts, minhash_signatures(texts, cfg)):
        h = _gram_hashes(np.array([ord(c) for c in text], dtype=np.uint32), cfg.ngram)
        sig = np.full(k, EMPTY, dtype=np.uint32)
        np.minimum.at(sig, (h >> np.uint32(32 - k.bit_length() + 1)).astype(np.intp), h * VALUE_MIX)
        expected = sig.copy()
        for b in np.flatnonzero(sig == EMPTY):
            pick = 0
            while sig[_probe_bins(k, pick, 1)[b, 0]] == EMPTY:
                pick += 1
            expected[b] = sig[_probe_bins(k, pick, 1)[b, 0]]
        assert np.array_equal(dense, expected)

def test_short_texts_sharing_a_title_line_are_not_near_duplicates():
    rng = random.Random(4)
    poems = [f"《失调名》\n作者：无名氏\n{random_doc(rng, rng.randrange(6, 16))}。" for _ in range(200)]
    dedup = Deduplicator(CleanConfig())
    assert dedup.check_many(poems) == [None] * len(poems)


def test_texts_shorter_than_an_ngram_are_only_deduplicated_exactly():
    dedup = Deduplicator(CleanConfig())
    assert [dedup.check(t) for t in ("好的", "是的", "好的", "好的呀")] == [None, None, "exact", None]


def test_lsh_bands_put_the_s_curve_at_the_threshold():
    for threshold in (0.5, 0.8, 0.9):
        b, r = lsh_bands(threshold, 128)
        assert b * r <= 128
        p = lambda s: 1 - (1 - s ** r) ** b  # noqa: E731
        assert p(threshold - 0.15) < 0.25 and p(threshold + 0.1) > 0.75


# ----------------------------------------------------------------------------- deduplication

def test_exact_and_near_duplicates_go_distinct_documents_stay():
    rng, cfg = random.Random(0), CleanConfig()
    header = "《中华人民共和国某某法》（2024年修正）第一章 总则\n"  # shared by distinct documents
    originals = [header + random_doc(rng, 1000) for _ in range(30)]
    exact = originals[:5]
    near = [mutate(rng, d, 3) for d in originals[5:10]]  # 3 characters changed: Jaccard ~ 0.97
    dedup = Deduplicator(cfg)
    verdicts = [dedup.check(d) for d in originals + exact + near]
    assert verdicts == [None] * 30 + ["exact"] * 5 + ["near"] * 5


def test_check_many_equals_check_one_by_one_including_repeats_within_a_batch():
    rng, cfg = random.Random(2), CleanConfig()
    docs = [random_doc(rng, 400) for _ in range(20)]
    docs += [docs[3], mutate(rng, docs[4], 1), "独一无二的新文档" * 10, docs[3]]
    rng.shuffle(docs)
    one = Deduplicator(cfg)
    want = [one.check(d) for d in docs]
    many = Deduplicator(cfg)
    got = many.check_many(docs[:7]) + [VERDICTS[v] for v in many.check_keys(*dedup_keys(docs[7:], cfg))]
    assert got == want and want.count("exact") == 2 and want.count("near") == 1


@pytest.mark.parametrize("exact,near", [(True, True), (True, False), (False, True)])
def test_batches_decide_like_one_document_at_a_time(exact, near):
    # repeats and near copies within a batch and across batches, texts too short for an n-gram,
    # and copies that are both an exact repeat of one kept text and a near copy of another
    rng, cfg = random.Random(7), CleanConfig(exact_dedup=exact, near_dedup=near)
    base = [random_doc(rng, rng.randrange(30, 300)) for _ in range(40)] + ["短文", "短文本", "四个字啊"]
    docs = base + [rng.choice(base) for _ in range(40)] + [mutate(rng, rng.choice(base[:40]), 1) for _ in range(40)]
    rng.shuffle(docs)
    docs += [docs[0], mutate(rng, docs[0], 1)] * 3
    one = Deduplicator(cfg)
    want = [one.check(d) for d in docs]
    many, got, i = Deduplicator(cfg), [], 0
    while i < len(docs):
        n = rng.choice((1, 5, 30, 80))
        got += many.check_many(docs[i:i + n])
        i += n
    assert got == want
    assert (want.count("exact") > 20) == exact and (want.count("near") > 20) == near


def rewrite(rng: random.Random, text: str, k: int) -> str:
    """text with k characters, at random places, replaced by random ones: Jaccard ~ 1 - 10k / len."""
    chars = list(text)
    for i in rng.sample(range(len(chars)), k):
        chars[i] = chr(rng.randrange(0x4E00, 0x9FA5))
    return "".join(chars)


def planted_pairs(seed: int, k: int, n: int = 200) -> tuple[list[str], list[str], list[float]]:
    rng = random.Random(seed)
    firsts = [random_doc(rng, 600) for _ in range(n)]
    seconds = [rewrite(rng, a, k) for a in firsts]
    return firsts, seconds, [jaccard(a, b) for a, b in zip(firsts, seconds)]


def share_a_band(a: str, b: str, cfg: CleanConfig) -> bool:
    keys, _ = dedup_keys([a, b], cfg)
    return bool(np.isin(keys[1, 1:], keys[0, 1:]).any())


def test_lsh_candidates_well_below_the_threshold_are_kept_within_and_across_batches():
    # LSH alone removed every pair that shares a band: ~5% of pairs at Jaccard 0.68 with 0.8
    firsts, seconds, js = planted_pairs(0, 25)
    cfg = CleanConfig(near_threshold=0.8)
    assert max(js) < 0.72 and sum(share_a_band(a, b, cfg) for a, b in zip(firsts, seconds)) >= 5
    across = Deduplicator(cfg)
    assert across.check_many(firsts) + across.check_many(seconds) == [None] * 400
    within = Deduplicator(cfg)
    assert within.check_many([d for pair in zip(firsts, seconds) for d in pair]) == [None] * 400


def test_near_duplicates_above_the_threshold_go_within_and_across_batches():
    firsts, seconds, js = planted_pairs(1, 3)
    cfg = CleanConfig(near_threshold=0.8)
    assert min(js) > 0.94
    across = Deduplicator(cfg)
    assert across.check_many(firsts) + across.check_many(seconds) == [None] * 200 + ["near"] * 200
    within = Deduplicator(cfg)
    assert within.check_many([d for pair in zip(firsts, seconds) for d in pair]) == [None, "near"] * 200


def test_sketch_bytes_agree_like_the_signature_slots_they_stand_for():
    rng, cfg = random.Random(6), CleanConfig()
    for k in (5, 20, 60):
        a = random_doc(rng, 800)
        sig = minhash_signatures([a, rewrite(rng, a, k)], cfg)
        sketch = sketches(sig)
        assert ((sig[0] == sig[1]) <= (sketch[0] == sketch[1])).all()  # equal slots give equal bytes
        assert np.count_nonzero(sketch[0] == sketch[1]) - np.count_nonzero(sig[0] == sig[1]) <= 3  # p = 1/256 else
    assert len(np.unique(sketches(minhash_signature(random_doc(rng, 3000), cfg)))) > 80  # the bytes are spread


def test_dedup_rules_can_be_switched_off():
    rng = random.Random(3)
    a = random_doc(rng, 300)
    b = mutate(rng, a, 2)
    no_near = Deduplicator(CleanConfig(near_dedup=False))
    assert [no_near.check(t) for t in (a, b, a)] == [None, None, "exact"]
    no_exact = Deduplicator(CleanConfig(exact_dedup=False))
    assert [no_exact.check(t) for t in (a, b, a)] == [None, "near", "near"]
    neither = Deduplicator(CleanConfig(exact_dedup=False, near_dedup=False))
    assert [neither.check(t) for t in (a, b, a)] == [None, None, None]


class _MappingWithoutRemap(mmap.mmap):
    def resize(self, size):
        raise SystemError("mmap: resizing not available--no mremap()")  # as CPython says on macOS


@pytest.mark.parametrize("mremap", [True, False])
def test_key_set_answers_like_a_python_set_across_merges_of_its_levels(mremap, monkeypatch):
    if not mremap:
        monkeypatch.setattr(mmap, "mmap", _MappingWithoutRemap)
    rng, keys, reference = np.random.default_rng(0), _KeySet(), set()
    for size in rng.integers(1, 2000, size=60).tolist():
        batch = np.unique(rng.integers(1, 2**64 - 1, size=size, dtype=np.uint64, endpoint=True))
        probe = np.concatenate([batch, rng.choice(np.array(sorted(reference) or [1], dtype=np.uint64), size=50)])
        assert keys.contains(probe).tolist() == [k in reference for k in probe.tolist()]
        new = batch[~keys.contains(batch)]
        keys.add(new)
        reference.update(new.tolist())
    levels = [np.frombuffer(level, dtype=np.uint64) for level in keys.levels]
    sizes = [len(level) for level in levels]
    assert len(keys) == len(reference) and len(sizes) > 2
    assert all(a >= 4 * b for a, b in zip(sizes, sizes[1:]))  # else lookups search too many levels
    assert all((np.diff(level.astype(np.float64)) >= 0).all() for level in levels)
    assert {type(level) for level in keys.levels} == {mmap.mmap if mremap else _MappingWithoutRemap}


def test_key_set_finds_every_key_under_a_32_bit_prefix_across_levels():
    rng, keys, reference = np.random.default_rng(1), _KeySet(), []
    for size in rng.integers(1, 500, size=30).tolist():
        # few distinct prefixes, so that most have several keys, some in different levels
        batch = (rng.integers(0, 40, size=size).astype(np.uint64) << np.uint64(32)) | np.arange(
            len(reference), len(reference) + size, dtype=np.uint64)
        keys.add(batch)
        reference += batch.tolist()
    prefixes = np.arange(45, dtype=np.uint64) << np.uint64(32)
    which, low = keys.find(prefixes)
    got = sorted(zip(which.tolist(), low.tolist()))
    assert got == sorted((k >> 32, k & 0xFFFFFFFF) for k in reference) and len(keys.levels) > 1


def test_rows_grow_and_read_back_by_number():
    rows, reference = _Rows(128), []
    rng = np.random.default_rng(2)
    for size in (0, 1, 31, 100, 3000, 7):
        batch = rng.integers(0, 256, size=(size, 128), dtype=np.uint8)
        rows.append(batch)
        reference += list(batch)
    numbers = rng.integers(0, len(reference), size=500)
    assert rows.count == len(reference) and np.array_equal(rows.take(numbers), np.array(reference)[numbers])


def test_dedup_finds_repeats_of_documents_kept_many_batches_ago():
    dedup = Deduplicator(CleanConfig(near_dedup=False))
    docs = [f"文档编号{i}" for i in range(20_000)]
    for i in range(0, len(docs), 700):
        assert dedup.check_many(docs[i:i + 700]) == [None] * len(docs[i:i + 700])
    assert len(dedup.exact) == len(docs) and len(dedup.exact.levels) > 1
    assert dedup.check_many(docs[::1000] + ["新的文档"]) == ["exact"] * 20 + [None]


# ----------------------------------------------------------------------------- counts

def test_stats_count_changed_and_dropped_per_rule():
    cfg = CleanConfig(min_chars=4)
    dedup, stats = Deduplicator(cfg), CleanStats()
    docs = ["一段正常的文字。", "一段正常的文字。", "太好了！！！！！一段话", "短\r\n", "\x00另一段　文字"]
    for doc in docs:
        text, rules = clean_text(doc, cfg)
        stats.add(rules, dedup.check(text) if text else "min_chars")
    assert (stats.docs_in, stats.docs_out) == (5, 3)
    assert stats.changed == {"whitespace": 2, "control_chars": 1, "repeated_punct": 1}
    assert stats.dropped == {"exact": 1, "min_chars": 1}
    table = stats.summary(CleanConfig(nfkc=False))
    assert "nfkc                     off" in table and table.endswith("documents: 5 in, 3 out (60.0% kept)")
    other = CleanStats()
    other.add([], "bad_record")
    stats.merge(other)
    assert (stats.docs_in, stats.docs_out, stats.dropped["bad_record"]) == (6, 3, 1)
