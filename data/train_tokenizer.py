"""Train nanozh's sentencepiece BPE tokenizer on pretraining text.

    python -m data.train_tokenizer --input data/corpus/pretrain --vocab_size 16000 --out tokenizer
    python -m data.train_tokenizer --input /path/to/full/pretrain --vocab_size 16000 --out tokenizer

Run from the repository root (the project's modules import each other as packages, so `python -m`,
not a path). It lives in data/ beside the other readers of corpora: tokenizer/ is the tokenizer
itself (encode, decode, the chat template) and imports nothing from data/, so the dependencies go
one way only.

--input takes files or directories in any format data/sources.py reads (.txt, .jsonl, .json,
.parquet). Writes OUT/tokenizer.model and OUT/tokenizer.vocab (one "piece<TAB>score" per line, for
reading). Documents are fed to sentencepiece one paragraph (line) at a time.

The shipped tokenizer/tokenizer.model is 16,000 pieces, trained by the second command above on the
full pretraining collection that the bundled corpus in data/ was drawn from (not part of the
repository; its sources are listed in data/SOURCES.md: 67,129 documents, 889,832 paragraphs, all
of them used).
The size was chosen by measurement (python -m bench.tokenizer, 2% of documents held out):

    vocab   chars/token pretrain   chars/token SFT   embedding share of the 26m / 100m preset
    8000    1.260                  1.170             14% / 7%
    16000   1.528                  1.361             25% / 12%
    32000   1.685                  1.479             39% / 22%

About 6,500 pieces are single characters at this coverage whatever the size, so 8k leaves room for
only ~1,300 multi-character pieces; 16k reads 21% more text per token than 8k, while 32k adds only
10% more and doubles an embedding that is already a quarter of the 26m model.

Why these settings:
- BPE with byte_fallback: a character outside the vocabulary becomes its UTF-8 bytes (<0xE6>...),
  never <unk>, so every string round-trips exactly (tokenizer.py also covers the one exception,
  a literal U+2581).
- identity normalisation, no dummy prefix, no whitespace collapsing: the text the model sees is
  the text the user wrote (NFKC would turn ，！？ into ASCII; collapsing would break code).
- split_digits: numbers are read digit by digit, which helps small models with arithmetic.
- allow_whitespace_only_pieces: runs of spaces (code indentation) become one piece.
- character_coverage 0.9995: Chinese has thousands of characters with a long tail. Full coverage
  would spend vocabulary slots on characters seen a handful of times; 0.9995 keeps those that cover
  all but 0.05% of running text and leaves the rest to byte fallback (3 tokens each), which is what
  sentencepiece recommends for CJK. Measured at 16k (bytes = share of tokens that are fallback
  bytes other than "\\n"): 0.999 gives 1.541 chars/token and 0.38% bytes, 0.9995 1.528 and 0.18%,
  0.9999 1.482 and 0.05%; a rare character as one token is easier to learn than as three bytes.
- "\\n" needs no special piece: paragraphs are split on it, so it never enters a piece, and byte
  fallback encodes it as the single token <0x0A> (a user-defined "\\n" symbol would also cost one
  token per newline, so it would buy nothing).
- Special tokens have fixed ids: <unk>=0 <s>=1 </s>=2 <pad>=3 <|im_start|>=4 <|im_end|>=5. The
  chat markers are CONTROL symbols: only the chat template inserts them, by id; a user who types
  "<|im_end|>" gets ordinary pieces.
"""

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

if not __package__:  # run by its path: Python put data/ on sys.path, not the root the imports below need
    sys.exit("nanozh: run it from the repository root as: python -m data.train_tokenizer ...")

import sentencepiece as spm
from tqdm import tqdm

from data.sources import iter_pretrain
from errors import NanozhError, exit_on_user_error, user_error
from files import atomic_path
from tokenizer.tokenizer import SPECIALS


class _Paragraphs:
    """The sentence stream handed to sentencepiece: each document split into its lines, lines longer
    than max_bytes cut into pieces (sentencepiece would silently drop them). Counts what it fed, and
    keeps any exception, because sentencepiece reports an exception raised inside the iterator only
    as an opaque RuntimeError."""

    def __init__(self, texts: Iterable[str], max_bytes: int):
        self.texts, self.max_chars = texts, max_bytes // 4  # a character is at most 4 UTF-8 bytes
        self.sentences = self.chars = 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self.texts:
                for line in text.split("\n"):
                    for i in range(0, len(line), self.max_chars):
                        piece = line[i:i + self.max_chars]
                        self.sentences += 1
                        self.chars += len(piece)
                        yield piece
        except BaseException as e:
            self.error = e
            raise


def train(texts: Iterable[str], vocab_size: int, input_sentence_size: int = 2_000_000,
          character_coverage: float = 0.9995, max_sentence_length: int = 16384,
          num_threads: int | None = None) -> tuple[bytes, dict]:
    """Train on `texts` (documents); returns the serialized model and stats for the summary."""
    paragraphs = _Paragraphs(texts, max_sentence_length)
    model = io.BytesIO()
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(paragraphs), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, character_coverage=character_coverage, byte_fallback=True,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            max_sentence_length=max_sentence_length,
            # sentencepiece pulls the whole iterator but keeps a reservoir sample (fixed seed) of
            # input_sentence_size sentences when shuffle_input_sentence is on, so memory is bounded
            # by input_sentence_size * average paragraph length, not by the corpus.
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=SPECIALS[4:],
            # the piece for a space must exist whatever the corpus: without it a space would go
            # through byte fallback as the bytes of U+2581 and decode as "\u2581", not " "
            required_chars="\u2581",
            num_threads=num_threads or min(16, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
        if isinstance(paragraphs.error, NanozhError):
            raise paragraphs.error from None
        if paragraphs.error is not None:
            raise paragraphs.error
        if paragraphs.chars == 0:
            raise user_error("--input", "no text to train on", "check the input files") from None
        msg = str(e).splitlines()[0].split("] ")[-1]  # drop sentencepiece's source location
        raise user_error("--vocab_size", f"sentencepiece could not train: {msg}",
                         "adjust --vocab_size or --character_coverage") from None
    stats = {"sentences": paragraphs.sentences, "chars": paragraphs.chars,
             "sampled": min(paragraphs.sentences, input_sentence_size), "seconds": time.time() - t0}
    return model.getvalue(), stats


def write_tokenizer(model: bytes, out_dir: str) -> Path:
    """Write out_dir/tokenizer.model and tokenizer.vocab, each through a temp file and a rename."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    got = [sp.id_to_piece(i) for i in range(len(SPECIALS))]
    assert got == SPECIALS, f"special tokens came out as {got}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    for name, data in (("tokenizer.vocab", vocab.encode()), ("tokenizer.model", model)):
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    return out / "tokenizer.model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files or directories of pretraining text")
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--out", required=True, help="directory for tokenizer.model and tokenizer.vocab")
    p.add_argument("--input_sentence_size", type=int, default=2_000_000,
                   help="paragraphs sampled (uniformly, reservoir) for training; bounds memory")
    p.add_argument("--character_coverage", type=float, default=0.9995)
    p.add_argument("--max_sentence_length", type=int, default=16384, help="bytes; longer lines are cut")
    p.add_argument("--num_threads", type=int, default=None)
    args = p.parse_args()

    def documents() -> Iterator[str]:
        for _, text in tqdm(iter_pretrain(args.input), desc="reading", unit=" docs"):
            yield text
        # sentencepiece reports nothing while it trains; say what the wait is
        print(f"training BPE, vocab {args.vocab_size} ...", flush=True)

    try:
        if not 0.98 <= args.character_coverage <= 1.0:  # sentencepiece's own limits
            raise user_error("--character_coverage", f"{args.character_coverage} is out of range",
                             "use a value from 0.98 to 1.0")
        model, s = train(documents(), args.vocab_size, args.input_sentence_size,
                         args.character_coverage, args.max_sentence_length, args.num_threads)
        path = write_tokenizer(model, args.out)
    except NanozhError as e:
        exit_on_user_error(e)
    print(f"trained {path}: vocab {args.vocab_size}, {s['sampled']:,} of {s['sentences']:,} paragraphs "
          f"({s['chars'] / 1e6:.1f}M chars read), {s['seconds']:.1f}s")


if __name__ == "__main__":
    main()
