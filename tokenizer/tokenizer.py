"""The nanozh tokenizer: sentencepiece encode/decode, the special ids, the one chat template.

    tok = Tokenizer("tokenizer/tokenizer.model")      # or a directory holding tokenizer.model
    ids = tok.encode("你好，世界\n")                    # never contains a special id
    tok.decode(ids) == "你好，世界\n"                   # every string round-trips exactly
    ids, mask = tok.render_chat([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    stream = StreamDecoder(tok)                        # printing ids as they are sampled:
    print(stream.push(id), end="") ... print(stream.flush())   # only ever whole characters

The chat template is ChatML, and render_chat is the only place it is written down; SFT, DPO,
sample.py and eval.py all call it. One turn is

    <|im_start|> role "\\n" content <|im_end|> "\\n"

with the markers inserted by id (so text typed by a user can never forge a turn boundary), and
the mask is 1 on an assistant turn's content and its <|im_end|>: what the model learns to write,
including when to stop.
"""

import codecs
import hashlib
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm

from errors import user_error

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
ROLES = ("system", "user", "assistant")
# sentencepiece writes a space as U+2581 inside pieces and turns it back into a space on decode, so a
# literal U+2581 in the text would come back as a space; we send it through byte fallback instead.
META_SPACE = "\u2581"


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise user_error(str(path), f"cannot read tokenizer ({e.strerror})",
                             "pass a tokenizer.model file or a directory holding one") from None
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load_from_serialized_proto(data)
        except (RuntimeError, OSError):
            raise user_error(str(path), "not a valid sentencepiece model (corrupt or truncated?)",
                             "retrain it with python -m data.train_tokenizer") from None
        pieces = [self.sp.id_to_piece(i) for i in range(min(len(SPECIALS), self.sp.get_piece_size()))]
        if pieces != SPECIALS:
            raise user_error(str(path), f"special tokens are {pieces}, expected {SPECIALS}",
                             "use a tokenizer trained by python -m data.train_tokenizer")
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id, self.bos_id, self.eos_id, self.pad_id, self.im_start_id, self.im_end_id = range(6)
        if self.sp.eos_id() != self.eos_id:  # encode_documents has sentencepiece add it
            raise user_error(str(path), f"sentencepiece's eos id is {self.sp.eos_id()}, expected {self.eos_id}",
                             "use a tokenizer trained by python -m data.train_tokenizer")
        self._meta_space_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode()]
        self._headers = {role: self.encode(role + "\n") for role in ROLES}
        self._newline = self.encode("\n")

    def encode(self, text: str) -> list[int]:
        if META_SPACE in text:
            return self._encode_with_meta_space(text)
        return self.sp.encode(text)

    def encode_documents(self, texts: list[str], num_threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """encode() of every text followed by </s>, back to back in one int32 array (the layout of
        a pretraining shard), and the offsets where each text starts, with the total last: text i
        is tokens[offsets[i]:offsets[i + 1]]. It runs in sentencepiece's C++ thread pool (-1: all
        cores), which writes the ids straight into numpy buffers: ~15% faster than Python lists,
        which cost a Python int per token."""
        docs = self.sp.encode(texts, num_threads=num_threads, return_type="numpy", add_eos=True)
        for i, text in enumerate(texts):
            if META_SPACE in text:
                docs[i] = np.array(self._encode_with_meta_space(text) + [self.eos_id], dtype=np.int32)
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)), out=offsets[1:])
        return np.concatenate(docs) if docs else np.zeros(0, dtype=np.int32), offsets

    def _encode_with_meta_space(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(text.split(META_SPACE)):
            if i:
                ids += self._meta_space_ids
            ids += self.sp.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        # control ids already decode to ""; <unk> would decode to " ⁇ "
        return self.sp.decode([i for i in ids if i != self.unk_id])

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """ChatML ids for a conversation and the assistant mask (1 = tokens the model should learn to
        write). messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], a system
        message only first. With add_generation_prompt, ends with the assistant header to sample from."""
        ids, mask = [], []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise user_error(f"messages[{i}]", f"unknown role {role!r}", "use system, user or assistant")
            if role == "system" and i > 0:
                raise user_error(f"messages[{i}]", "a system message may only come first",
                                 "move it to the start or merge it into a user turn")
            if not isinstance(content, str):
                raise user_error(f"messages[{i}]", f"content must be a string, got {type(content).__name__}",
                                 "give each message a text content")
            head = [self.im_start_id] + self._headers[role]
            body = self.encode(content) + [self.im_end_id]
            learn = int(role == "assistant")
            ids += head + body + self._newline
            mask += [0] * len(head) + [learn] * len(body) + [0] * len(self._newline)
        if add_generation_prompt:
            head = [self.im_start_id] + self._headers["assistant"]
            ids += head
            mask += [0] * len(head)
        return ids, mask

    @cached_property
    def piece_bytes(self) -> list[bytes]:
        """The bytes each id stands for (b"" for control and unknown ids), for StreamDecoder. Built
        once per tokenizer: 16k sentencepiece lookups take ~0.15 s, too long to pay per reply."""
        sp, out = self.sp, []
        for i in range(sp.get_piece_size()):
            if sp.is_byte(i):
                out.append(bytes([int(sp.id_to_piece(i)[1:-1], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                out.append(b"")
            else:
                out.append(sp.id_to_piece(i).replace(META_SPACE, " ").encode())
        return out

    def prompt_ids(self, prompt: list[dict] | str, raw: bool = False) -> list[int]:
        """The ids a model continues: a conversation through the chat template, ending with the
        assistant header; or with raw, eos then the text (pretraining documents each follow an eos,
        so this reads as "a new document starts with...")."""
        if raw:
            return [self.eos_id] + self.encode(prompt)
        return self.render_chat(prompt, add_generation_prompt=True)[0]


class StreamDecoder:
    """Turns ids into text one at a time for streaming output. A character outside the vocabulary
    arrives as several byte pieces (<0xF0> <0x9F> <0x98> <0x80>); push() holds them until they form
    a whole UTF-8 character, so the printed stream never shows a broken one."""

    def __init__(self, tokenizer: Tokenizer):
        self._bytes = tokenizer.piece_bytes
        # bytes that can never become valid UTF-8 come out as U+FFFD, as in Tokenizer.decode
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        return self._utf8.decode(self._bytes[id])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
