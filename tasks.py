"""Task metrics: a model's answers against gold answers, by exact match or by triples F1.

    python eval.py --model out/triples/latest --task data/tasks/kdconv_triples/test.jsonl --metric triples_f1 --out answers.jsonl
    python eval.py --model out/sft/latest --task qa.jsonl --metric exact_match

A task file is JSONL with a "prompt" and a gold "response" on each line (the triple-extraction task,
data/tasks/kdconv_triples/, also has the gold "triples"). eval.py answers every prompt greedily with
the chat template, then score() compares each answer with its gold:

- exact_match: the share of answers equal to their gold response after NFKC (full-width -> half-width)
  and whitespace normalisation.
- triples_f1: answers in the form "[(实体,属性,值),(…)]" parsed leniently (full- or half-width
  brackets, parentheses and commas, spaces anywhere; a group splits at its first two commas, so a
  value may hold commas; malformed groups are skipped), compared as sets per example after the same
  normalisation; precision, recall and F1 micro-averaged over all examples, and the same over
  (attribute, value) pairs (av_*, ignoring the entity). This is the rule of the task's own
  data/tasks/kdconv_triples/score.py, and the numbers are equal to its (rounded to 4 places as it does).
"""

import re
import unicodedata

from errors import user_error
from files import read_jsonl

METRICS = ("exact_match", "triples_f1")
_BETWEEN = re.compile(r"[)）]\s*[,，]\s*[(（]")  # "),(" between two triples
_COMMA = re.compile(r"\s*[,，]\s*")

Triple = tuple[str, str, str]


def canon(text: str) -> str:
    """NFKC, whitespace runs as one space, none around , ( and )."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()
    return re.sub(r"\s*([,()])\s*", r"\1", text)


def parse_triples(text: str) -> list[Triple]:
    """'[(a,b,c),(d,e,f)]' -> [('a', 'b', 'c'), ('d', 'e', 'f')]; anything unparsable is skipped."""
    s = text.strip()
    s = s[1:] if s[:1] in "[【" else s
    s = s[:-1] if s[-1:] in "]】" else s
    s = s.strip()
    s = s[1:] if s[:1] in "(（" else s
    s = s[:-1] if s[-1:] in ")）" else s
    triples = []
    for group in _BETWEEN.split(s):
        parts = [p.strip() for p in _COMMA.split(group.strip(), maxsplit=2)]
        if len(parts) == 3 and all(parts):
            triples.append(tuple(parts))
    return triples


def read_task(path: str, metric: str) -> list[tuple[str, dict]]:
    """(where, record) per line of a task file, each with a string "prompt" and its gold: "response",
    or for triples_f1 "triples" (a list of [entity, attribute, value]) when present."""
    records = []
    for n, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise user_error(path, "needs a non-empty string \"prompt\"", line=n)
        triples = rec.get("triples")
        if metric == "triples_f1" and triples is not None:
            if not isinstance(triples, list) or not all(
                    isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t) for t in triples):
                raise user_error(path, "\"triples\" must be a list of [entity, attribute, value] strings", line=n)
        elif not isinstance(rec.get("response"), str):
            raise user_error(path, "needs the gold answer as a string \"response\"", line=n)
        records.append((f"{path}:{n}", rec))
    if not records:
        raise user_error(path, "no examples in file", "one JSON object per line with prompt and response")
    return records


def _prf(tp: int, gold: int, pred: int) -> tuple[float, float, float]:
    p, r = tp / pred if pred else 0.0, tp / gold if gold else 0.0
    return p, r, 2 * p * r / (p + r) if p + r else 0.0


def score(metric: str, gold: list[dict], answers: list[str]) -> tuple[dict, list[dict]]:
    """(the metrics over all examples, one dict of per-example counts for each) for answers[i] to the
    task record gold[i]."""
    if metric == "exact_match":
        per = [{"correct": canon(a) == canon(g["response"])} for g, a in zip(gold, answers, strict=True)]
        return {"exact_match": round(sum(e["correct"] for e in per) / len(per), 4), "examples": len(per)}, per
    per, n = [], {"tp": 0, "gold": 0, "pred": 0, "av_tp": 0, "av_gold": 0, "av_pred": 0}
    for g, a in zip(gold, answers, strict=True):
        gs = {tuple(map(canon, t)) for t in (g["triples"] if "triples" in g else parse_triples(g["response"]))}
        ps = {tuple(map(canon, t)) for t in parse_triples(a)}
        ga, pa = {t[1:] for t in gs}, {t[1:] for t in ps}
        counts = {"tp": len(gs & ps), "gold": len(gs), "pred": len(ps),
                  "av_tp": len(ga & pa), "av_gold": len(ga), "av_pred": len(pa)}
        for k, v in counts.items():
            n[k] += v
        per.append({**counts, "f1": round(_prf(counts["tp"], counts["gold"], counts["pred"])[2], 4)})
    p, r, f = _prf(n["tp"], n["gold"], n["pred"])
    ap, ar, af = _prf(n["av_tp"], n["av_gold"], n["av_pred"])
    summary = {"precision": p, "recall": r, "f1": f, "examples": len(per), "gold_triples": n["gold"],
               "pred_triples": n["pred"], "av_precision": ap, "av_recall": ar, "av_f1": af}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}, per
