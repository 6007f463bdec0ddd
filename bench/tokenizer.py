"""Choose the vocabulary size by measurement. For each size: train on the pretraining text minus a
held-out slice of documents (chosen by a hash of the text, so it is the same every run), then report
characters per token on that slice and on SFT conversations (a second domain the tokenizer never
saw), the share of byte-fallback tokens, encode speed, and what share of each model preset's
parameters the (tied) embedding takes.

    python -m bench.tokenizer --pretrain ../shared/data/pretrain --sft ../shared/data/sft
    python -m bench.tokenizer --pretrain data/corpus --sft data/corpus/sft.jsonl.gz --vocab_sizes 8000,16000
"""

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch

from data.sources import iter_pretrain, iter_sft
from errors import NanozhError, exit_on_user_error
from model import ModelConfig, Transformer
from tokenizer.tokenizer import Tokenizer
from data.train_tokenizer import train, write_tokenizer


def held_out(text: str, percent: float) -> bool:
    return zlib.crc32(text.encode()) % 10000 < percent * 100


def embedding_share(vocab_size: int, preset: Path) -> float:
    """Fraction of the preset model's parameters in its embedding (tied with the head)."""
    cfg = json.loads(preset.read_text())["model"]
    with torch.device("meta"):  # shapes only, no memory or init time
        model = Transformer(ModelConfig(vocab_size=vocab_size, **cfg))
    return model.tok_emb.weight.numel() / model.num_params()


def measure(tok: Tokenizer, texts: list[str]) -> tuple[float, float, float]:
    """(characters per token, share of byte-fallback tokens other than "\n", single-thread encode
    MB/s). A newline is always the byte token <0x0A> by design; the other byte tokens are characters
    outside the vocabulary, which is what character_coverage trades against vocabulary slots."""
    seconds = float("inf")
    for _ in range(3):  # best of three: the machine may be shared
        t0 = time.perf_counter()
        ids = [tok.encode(t) for t in texts]
        seconds = min(seconds, time.perf_counter() - t0)
    n_tokens = sum(map(len, ids))
    newline = tok.encode("\n")
    n_bytes = sum(tok.sp.is_byte(i) and [i] != newline for seq in ids for i in seq)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    return sum(map(len, texts)) / n_tokens, n_bytes / n_tokens, mb / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", nargs="+", required=True, help="pretraining text (files or directories)")
    p.add_argument("--sft", nargs="+", required=True, help="SFT conversations, the second domain")
    p.add_argument("--vocab_sizes", default="8000,16000,32000")
    p.add_argument("--held_out", type=float, default=2.0, help="percent of pretraining documents held out")
    p.add_argument("--sft_sample", type=float, default=10.0, help="percent of SFT conversations measured")
    p.add_argument("--input_sentence_size", type=int, default=2_000_000)
    p.add_argument("--character_coverage", type=float, default=0.9995)
    p.add_argument("--presets", default="tiny,26m,100m", help="configs/<name>.json for the embedding share")
    args = p.parse_args()
    try:
        docs = [t for _, t in iter_pretrain(args.pretrain) if held_out(t, args.held_out)]
        convs = ["\n".join(m["content"] for m in msgs) for _, msgs in iter_sft(args.sft)]
        convs = [c for c in convs if held_out(c, args.sft_sample)]
        print(f"held out {len(docs):,} pretraining documents ({sum(map(len, docs)) / 1e6:.2f}M chars), "
              f"{len(convs):,} SFT conversations ({sum(map(len, convs)) / 1e6:.2f}M chars)")
        presets = [ROOT / "configs" / f"{name}.json" for name in args.presets.split(",")]
        rows = []
        for vocab_size in map(int, args.vocab_sizes.split(",")):
            texts = (t for _, t in iter_pretrain(args.pretrain) if not held_out(t, args.held_out))
            model, stats = train(texts, vocab_size, args.input_sentence_size, args.character_coverage)
            with tempfile.TemporaryDirectory() as tmp:
                tok = Tokenizer(write_tokenizer(model, tmp))
            cpt, fallback, mbps = measure(tok, docs)
            sft_cpt, _, _ = measure(tok, convs)
            shares = [embedding_share(vocab_size, preset) for preset in presets]
            sp = tok.sp
            alphabet = sum(len(sp.id_to_piece(i)) == 1 and not sp.is_byte(i) for i in range(6, sp.get_piece_size()))
            rows.append((vocab_size, alphabet, cpt, sft_cpt, fallback, mbps, stats["seconds"], shares))
            print(f"  trained {vocab_size} on {stats['sampled']:,} paragraphs in {stats['seconds']:.0f}s", flush=True)
    except NanozhError as e:
        exit_on_user_error(e)

    names = [p.stem for p in presets]
    print("\n| vocab | single characters | chars/token pretrain (held out) | chars/token SFT | byte-fallback tokens (not \\n) | "
          "encode MB/s (1 thread) | train s | " + " | ".join(f"embedding share {n}" for n in names) + " |")
    print("|---" * (7 + len(names)) + "|")
    for v, alphabet, cpt, sft_cpt, fb, mbps, secs, shares in rows:
        print(f"| {v} | {alphabet} | {cpt:.3f} | {sft_cpt:.3f} | {fb:.2%} | {mbps:.1f} | {secs:.0f} | "
              + " | ".join(f"{s:.0%}" for s in shares) + " |")
    print("\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
