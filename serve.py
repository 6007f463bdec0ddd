"""An OpenAI-compatible HTTP server for a model directory, with continuous batching, and a web chat page.

    python serve.py --model out/sft/latest                         # http://127.0.0.1:8000/ (the page)
    python serve.py --model out/sft/latest --host 0.0.0.0 --port 8080 --api_key "$KEY" --max_batch 16
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"model": "nanozh", "messages": [{"role": "user", "content": "你好"}], "stream": true}'

Endpoints, in OpenAI's wire format: POST /v1/chat/completions, POST /v1/completions (raw text, for
base models), GET /v1/models, GET /health, and GET / for chat.html. Any OpenAI client works with
base_url http://HOST:PORT/v1; streaming is server-sent events.

How a request runs: an HTTP thread (one per connection) checks the body and queues a Request; one
scheduler thread owns the model. Each turn of its loop it admits queued requests into free rows of
one KV cache, prefills one chunk of one new prompt (so a long prompt never stalls the running
streams for more than a chunk), then runs one decode step for every running request together:
continuous batching, where a request joins the batch at the next step, leaves it when it stops,
and has its own cache row and position. Each request samples from its own generator, so greedy
output and seeded samples do not depend on what else is running. New text goes back to the HTTP
thread through the request's own queue.
"""

import argparse
import hmac
import json
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from errors import NanozhError, exit_on_user_error, user_error
from model import KVCache, Transformer, apply_repetition_penalty, autocast, load, pick_device, pick_dtype, sample_next
from tokenizer.tokenizer import StreamDecoder, Tokenizer

PAGE = Path(__file__).resolve().parent / "chat.html"
MAX_BODY = 1 << 20  # bytes: a request body past this is a 413, never read into memory
MAX_STOPS = 4       # as OpenAI
# OpenAI options nanozh does not implement: a request that sets one to anything but its no-op
# value gets a 400 naming it, rather than an answer that silently ignores it
UNSUPPORTED = {"n": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,),
               "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
               "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
               "response_format": ({"type": "text"},)}


class ApiError(Exception):
    """A 4xx/5xx answer in OpenAI's error format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------
# one request: what to generate, and how its text comes back


@dataclass
class Request:
    ids: list[int]                   # the prompt
    max_tokens: int                  # already clamped to the context left after the prompt
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stops: list[str] = field(default_factory=list)
    generator: torch.Generator | None = None
    events: queue.Queue = field(default_factory=queue.Queue)  # ("text", str) ... then ("done", reason) or ("error", ApiError)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    row: int = -1                    # its KV-cache row while admitted
    prefilled: int = 0               # prompt tokens in the cache so far
    generated: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None  # tokens so far, for the repetition penalty
    text: "TextStream | None" = None


class TextStream:
    """Generated ids in, text out: only whole UTF-8 characters (StreamDecoder), held back while they
    could still be the start of a stop string, and cut before the first stop string."""

    def __init__(self, tok: Tokenizer, stops: list[str]):
        self.decoder, self.stops, self.text, self.sent = StreamDecoder(tok), stops, "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """The text that is now safe to send, and whether a stop string was hit."""
        self.text += self.decoder.push(token)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return self._release(min(hits)), True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - hold), False

    def flush(self) -> str:
        """What is left at the end (an unfinished character becomes U+FFFD, a held-back prefix is sent)."""
        self.text += self.decoder.flush()
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        delta, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return delta


# ----------------------------------------------------------------------------------------------
# the scheduler: one thread, one model, one KV cache with a row per running request


class Scheduler:
    def __init__(self, model: Transformer, tok: Tokenizer, device: torch.device, dtype: torch.dtype,
                 max_batch: int, max_queue: int, prefill_chunk: int):
        self.model, self.tok, self.device, self.dtype = model, tok, device, dtype
        self.prefill_chunk = prefill_chunk
        self.queue: queue.Queue[Request] = queue.Queue(max_queue)
        self.cache = KVCache(model.config, max_batch, model.config.block_size)
        self.free = list(range(max_batch))[::-1]
        self.prefilling: list[Request] = []  # admitted, prompt not yet all in the cache (oldest first)
        self.running: list[Request] = []     # decoding, one token per step
        self.stop_ids = [tok.im_end_id, tok.eos_id]
        self.served = self.tokens = self.peak_batch = 0  # peak_batch: most requests decoded in one step
        self.draining = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="scheduler", daemon=True)

    def submit(self, req: Request) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise ApiError(429, f"the server is busy: {self.queue.maxsize} requests are already waiting",
                           code="rate_limit_exceeded", kind="rate_limit_error", headers={"Retry-After": "1"}) from None

    def load(self) -> dict:
        return {"running": len(self.running) + len(self.prefilling), "queued": self.queue.qsize(),
                "max_batch": len(self.cache.lengths), "peak_batch": self.peak_batch}

    def loop(self) -> None:
        # autocast is per thread, so the thread that runs the model enters it (model.py's policy)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            while not (self.draining.is_set() and not self.running and not self.prefilling and self.queue.empty()):
                try:
                    self.step()
                except Exception as e:  # a bug in nanozh: fail what is in flight, keep serving
                    traceback.print_exc()
                    for req in self.prefilling + self.running:
                        self.finish(req, ApiError(500, f"internal error: {e!r}", kind="server_error"))

    def step(self) -> None:
        self.admit()
        for req in [r for r in self.prefilling + self.running if r.cancelled.is_set()]:
            self.finish(req, None)  # the client disconnected: its row is free for the next request now
        if self.prefilling:
            self.prefill(self.prefilling[0])
        if self.running:
            self.decode()

    def admit(self) -> None:
        while self.free:
            idle = not (self.running or self.prefilling)
            try:  # wait for work only when there is nothing else to do
                req = self.queue.get(block=idle, timeout=0.05)
            except queue.Empty:
                return
            if req.cancelled.is_set():
                continue
            req.row = self.free.pop()
            self.cache.lengths[req.row] = 0
            req.text = TextStream(self.tok, req.stops)
            if req.repetition_penalty != 1.0:
                req.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
                req.seen[0, req.ids] = True
            self.prefilling.append(req)

    def prefill(self, req: Request) -> None:
        chunk = req.ids[req.prefilled:req.prefilled + self.prefill_chunk]
        logits, _ = self.model(torch.tensor([chunk], device=self.device), cache=self.cache, rows=[req.row])
        req.prefilled += len(chunk)
        if req.prefilled == len(req.ids):
            self.prefilling.remove(req)
            self.running.append(req)
            self.emit(req, logits[:, -1].float())

    def decode(self) -> None:
        batch = list(self.running)
        self.peak_batch = max(self.peak_batch, len(batch))
        idx = torch.tensor([[r.generated[-1]] for r in batch], device=self.device)
        logits, _ = self.model(idx, cache=self.cache, rows=[r.row for r in batch])
        logits = logits[:, -1].float()
        for i, req in enumerate(batch):
            self.emit(req, logits[i:i + 1])

    def emit(self, req: Request, logits: torch.Tensor) -> None:
        """Sample req's next token from its logits (1, V) and send the text it completes."""
        if req.seen is not None:
            logits = apply_repetition_penalty(logits, req.seen, req.repetition_penalty)
        token = int(sample_next(logits, req.temperature, req.top_k, req.top_p, req.generator)[0])
        req.generated.append(token)
        self.tokens += 1
        if req.seen is not None:
            req.seen[0, token] = True
        if token in self.stop_ids:
            return self.finish(req, "stop")
        delta, hit_stop = req.text.push(token)
        if delta:
            req.events.put(("text", delta))
        if hit_stop:
            self.finish(req, "stop", flush=False)
        elif len(req.generated) >= req.max_tokens:
            self.finish(req, "length")

    def finish(self, req: Request, reason: "str | ApiError | None", flush: bool = True) -> None:
        """Take req out of the batch and free its row; reason None = cancelled (no one is listening)."""
        for group in (self.prefilling, self.running):
            if req in group:
                group.remove(req)
                self.free.append(req.row)
        if isinstance(reason, str):
            tail = req.text.flush() if flush else ""
            if tail:
                req.events.put(("text", tail))
            self.served += 1
            req.events.put(("done", reason))
        elif reason is not None:
            req.events.put(("error", reason))

    def drain(self, grace: float) -> None:
        """Stop: let what is in flight finish for up to `grace` seconds, then cancel the rest."""
        self.draining.set()
        self.thread.join(grace)
        if self.thread.is_alive():
            for req in list(self.queue.queue) + self.prefilling + self.running:
                req.cancelled.set()
                req.events.put(("error", ApiError(503, "the server is shutting down", kind="server_error")))
            self.thread.join(5)


# ----------------------------------------------------------------------------------------------
# the wire format: checking a request body, and the response objects


def option(body: dict, name: str, kinds: tuple, default, ok=lambda v: True, need: str = ""):
    """body[name] (null = unset = default) if it has one of `kinds` and passes ok(), else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds) or not ok(value):
        raise ApiError(400, f"{name} must be {need}, got {json.dumps(value, ensure_ascii=False)[:80]}", param=name)
    return value


def parse_request(body: dict, chat: bool, tok: Tokenizer, model: Transformer, device: torch.device) -> Request:
    """A chat or completions body -> a Request; a 400 naming the field for anything wrong."""
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise ApiError(400, f"{name}={json.dumps(body[name])[:80]} is not supported by nanozh's server", param=name)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
        ids = tok.prompt_ids([chat_message(m, i) for i, m in enumerate(messages)])
        where = "messages"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (one prompt per request)", param="prompt")
        ids, where = tok.prompt_ids(prompt, raw=True), "prompt"
    room = model.config.block_size - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(ids)} tokens but the model's context is {model.config.block_size} "
                       "(at least one token must be left for the answer)", param=where, code="context_length_exceeded")
    positive = lambda v: v >= 1
    max_tokens = option(body, "max_completion_tokens", (int,), None, positive, "an integer >= 1")
    max_tokens = max_tokens or option(body, "max_tokens", (int,), room, positive, "an integer >= 1")
    stops = option(body, "stop", (str, list), [], need=f"a string or a list of up to {MAX_STOPS} strings",
                   ok=lambda v: isinstance(v, str) or len(v) <= MAX_STOPS and all(isinstance(s, str) for s in v))
    seed = option(body, "seed", (int,), None, need="an integer")
    option(body, "stream", (bool,), False, need="true or false")
    option(body, "stream_options", (dict,), {}, need="an object such as {\"include_usage\": true}")
    option(body, "model", (str,), "", need="a string")
    return Request(
        ids=ids, max_tokens=min(max_tokens, room),
        temperature=float(option(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
        top_p=float(option(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        top_k=option(body, "top_k", (int,), 0, lambda v: v >= 0, "an integer >= 0 (0 = off)") or None,
        repetition_penalty=float(option(body, "repetition_penalty", (int, float), 1.0, lambda v: v > 0, "a number > 0")),
        stops=[s for s in ([stops] if isinstance(stops, str) else stops) if s],
        generator=torch.Generator(device=device).manual_seed(seed) if seed is not None else None)


def chat_message(m, i: int) -> dict:
    """One OpenAI message -> {role, content} for the chat template; content may be text parts."""
    if not isinstance(m, dict):
        raise ApiError(400, f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
    role, content = m.get("role"), m.get("content")
    role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
    if role not in ("system", "user", "assistant"):
        raise ApiError(400, f"messages[{i}].role {json.dumps(role)} is not supported (use system, user or assistant)",
                       param=f"messages[{i}].role")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                       param=f"messages[{i}].content")
    if role == "system" and i > 0:
        raise ApiError(400, f"messages[{i}]: a system message may only come first", param=f"messages[{i}].role")
    return {"role": role, "content": content}


def usage(req: Request) -> dict:
    # completion tokens are every token sampled for the request, a final stop token included
    p, c = len(req.ids), len(req.generated)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ----------------------------------------------------------------------------------------------
# HTTP


class Server(ThreadingHTTPServer):
    daemon_threads, block_on_close = True, False  # an idle keep-alive connection does not hold up the exit

    def __init__(self, address, scheduler: Scheduler, model_id: str, api_key: str | None):
        super().__init__(address, Handler)
        self.scheduler, self.model_id, self.api_key = scheduler, model_id, api_key
        self.page = PAGE.read_bytes()
        self.in_flight = 0
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection for many requests
    server_version = "nanozh"
    timeout = 60  # a client that stalls halfway through sending a request does not hold a thread forever
    server: Server

    def do_GET(self) -> None:
        self.route({"/": self.page, "/health": self.health, "/v1/models": self.models})

    def do_POST(self) -> None:
        self.route({"/v1/chat/completions": lambda: self.complete(chat=True),
                    "/v1/completions": lambda: self.complete(chat=False)})

    def route(self, routes: dict) -> None:
        path = self.path.split("?")[0].rstrip("/") or "/"
        try:
            if path not in routes:
                raise ApiError(404, f"no route {self.command} {path}", code="not_found")
            if path.startswith("/v1/"):
                self.authorize()
            routes[path]()
        except ApiError as e:
            if self.command == "POST":  # its body may be unread: it must not be taken for the next request
                self.close_connection = True
            self.send_json(e.status, e.body(), e.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def authorize(self) -> None:
        key = self.server.api_key
        given = self.headers.get("Authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)",
                           code="invalid_api_key", kind="authentication_error")

    def page(self) -> None:
        self.send_bytes(200, self.server.page, "text/html; charset=utf-8")

    def health(self) -> None:
        self.send_json(200, {"status": "ok", **self.server.scheduler.load()})

    def models(self) -> None:
        self.send_json(200, {"object": "list", "data": [
            {"id": self.server.model_id, "object": "model", "created": 0, "owned_by": "nanozh"}]})

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "send the body with a Content-Length header")
        if int(length) > MAX_BODY:
            # read (and drop) a body up to 16x the limit, so that the client, still sending, gets to
            # read the 413 rather than a broken pipe; a larger one is cut off
            left = min(int(length), 16 * MAX_BODY)
            while left > 0 and (got := len(self.rfile.read(min(left, 1 << 16)))):
                left -= got
            raise ApiError(413, f"the body is {length} bytes, over the limit of {MAX_BODY}")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def complete(self, chat: bool) -> None:
        sched = self.server.scheduler
        body = self.read_json()
        req = parse_request(body, chat, sched.tok, sched.model, sched.device)
        sched.submit(req)
        with self.server.lock:
            self.server.in_flight += 1
        try:
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            if body.get("stream"):
                self.stream(req, rid, chat, include_usage)
            else:
                self.respond(req, rid, chat)
        finally:
            req.cancelled.set()  # a no-op once it is done; frees the row if the client vanished
            with self.server.lock:
                self.server.in_flight -= 1

    def events(self, req: Request):
        """req's events as they come; a client that disconnects meanwhile cancels it (checked every
        0.2 s: a streaming client is also noticed when a write fails)."""
        checked = time.monotonic()
        while True:
            try:
                event = req.events.get(timeout=0.2)
            except queue.Empty:
                event = None
            if time.monotonic() - checked > 0.2:
                if self.client_gone():
                    req.cancelled.set()
                    return
                checked = time.monotonic()
            if event is None:
                continue
            yield event
            if event[0] != "text":
                return

    def client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def respond(self, req: Request, rid: str, chat: bool) -> None:
        text, reason = [], None
        for kind, value in self.events(req):
            if kind == "error":
                raise value
            if kind == "text":
                text.append(value)
            else:
                reason = value
        if reason is None:
            return  # the client went away
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None, "finish_reason": reason}
                  if chat else {"index": 0, "text": content, "logprobs": None, "finish_reason": reason})
        self.send_json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.server.model_id, "choices": [choice],
                             "usage": usage(req)})

    def stream(self, req: Request, rid: str, chat: bool, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.server.model_id}

        def chunk(text: str | None, reason: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [choice], **({"usage": None} if include_usage else {})}

        try:
            if chat:
                self.send_event(chunk(None, None, first=True))
            for kind, value in self.events(req):
                if kind == "text":
                    self.send_event(chunk(value, None))
                elif kind == "done":
                    self.send_event(chunk(None, value))
                    if include_usage:
                        self.send_event({**head, "choices": [], "usage": usage(req)})
                else:
                    self.send_event(value.body())
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            req.cancelled.set()

    def send_event(self, obj: dict) -> None:
        # one event per write: JSON of whole characters (never a split UTF-8 sequence)
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self.send_bytes(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json", headers)

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


# ----------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory (e.g. OUT_DIR/latest)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept connections from other machines")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api_key", default=None, help="clients must send Authorization: Bearer KEY")
    p.add_argument("--max_batch", type=int, default=8, help="requests decoded together (KV-cache rows)")
    p.add_argument("--max_queue", type=int, default=64, help="requests waiting for a row; more get 429")
    p.add_argument("--prefill_chunk", type=int, default=128, help="prompt tokens prefilled between decode steps")
    p.add_argument("--grace", type=float, default=3.0, help="seconds in-flight requests get to finish on Ctrl-C/SIGTERM")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype under autocast; auto = bfloat16 on CUDA, float32 elsewhere")
    args = p.parse_args()
    try:
        for name in ("max_batch", "max_queue", "prefill_chunk"):
            if getattr(args, name) < 1:
                raise user_error(f"--{name}", f"{getattr(args, name)} is below 1", "use a positive number")
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        model, tok = load(args.model, device)
        scheduler = Scheduler(model, tok, device, dtype, args.max_batch, args.max_queue, args.prefill_chunk)
        try:
            server = Server((args.host, args.port), scheduler, Path(args.model).resolve().name, args.api_key)
        except OSError as e:
            raise user_error(f"--host {args.host} --port {args.port}", f"cannot listen ({e.strerror})",
                             "pick another --port, or 0 for a free one") from None
    except NanozhError as e:
        exit_on_user_error(e)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"nanozh: warning: listening on {args.host} without --api_key: anyone who can reach this port can use "
              "the model", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    scheduler.thread.start()
    threading.Thread(target=server.serve_forever, args=(0.1,), name="http", daemon=True).start()
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"nanozh: serving {args.model} ({model.num_params() / 1e6:.1f}M parameters, {device}, max_batch "
          f"{args.max_batch}) at http://{host}:{server.server_port}/ (OpenAI base_url http://{host}:"
          f"{server.server_port}/v1)", flush=True)
    t0 = time.time()
    while not stop.wait(0.1):
        pass
    server.shutdown()  # no new connections; then the requests in flight get --grace seconds
    scheduler.drain(args.grace)
    deadline = time.time() + 2
    while server.in_flight and time.time() < deadline:  # let the HTTP threads write their last bytes
        time.sleep(0.02)
    server.server_close()
    print(f"nanozh: stopped after {time.time() - t0:.0f}s: {scheduler.served} requests served, "
          f"{scheduler.tokens} tokens generated", flush=True)


if __name__ == "__main__":
    main()
