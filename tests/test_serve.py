"""serve.py against live servers on free ports: the official openai client, raw HTTP for bad input,
and a real headless Chromium (Debian's chromium, driven over its DevTools protocol) for the page.

The model is random (2 layers, 64 wide, context 2048) with a wide init (init_std 0.3), so that its
greedy text changes with every prompt and every token: an answer that depended on what else was in
the batch would show. Answers are compared with model.generate in this process."""

import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
import websocket

from model import ModelConfig, Transformer, load

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tokenizer.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("serve") / "model"
    torch.manual_seed(0)
    tok = ROOT / "tokenizer" / "tokenizer.model"
    Transformer(ModelConfig(vocab_size=Tokenizer(tok).vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                            block_size=2048, init_std=0.3)).save(out)
    shutil.copyfile(tok, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def reference(model_dir):
    """(ids, max_tokens) -> (text, finish_reason, n_tokens) from model.generate_stream, greedy."""
    model, tok = load(model_dir)
    stops = [tok.im_end_id, tok.eos_id]

    def run(ids: list[int], max_tokens: int) -> tuple[str, str, int]:
        out = []
        for t in model.generate_stream(torch.tensor([ids]), max_tokens, temperature=0, stop_ids=stops):
            out.append(int(t[0]))
            if out[-1] in stops:
                return tok.decode(out[:-1]), "stop", len(out)
        return tok.decode(out), "length", len(out)

    run.tok = tok
    return run


def start_server(model_dir: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", str(model_dir), "--port", "0", "--device=cpu", *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    line = proc.stdout.readline()  # "nanozh: serving ... at http://127.0.0.1:PORT/ ..."
    match = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
    assert match, f"no URL in {line!r}; log: {log.read_text()}"
    return proc, match.group(1)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The default settings (max_batch 8) behind an API key."""
    proc, url = start_server(model_dir, tmp_path_factory.mktemp("log") / "serve.log", "--api_key", KEY)
    yield url
    assert stop_server(proc) == 0


@pytest.fixture(scope="module")
def small_server(model_dir, tmp_path_factory):
    """One row and one queue place: what a full queue and a disconnect do; the SIGTERM test stops it."""
    proc, url = start_server(model_dir, tmp_path_factory.mktemp("log") / "serve.log", "--max_batch", "1",
                             "--max_queue", "1", "--grace", "0")
    yield proc, url
    if proc.poll() is None:
        assert stop_server(proc) == 0


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat_ids(tok, text: str) -> list[int]:
    return tok.prompt_ids([{"role": "user", "content": text}])


def raw(url: str, method: str, path: str, body: bytes | None = None, key: str | None = KEY):
    """(status, response, parsed JSON or text) of one raw request."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=30)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {key}"} if key else {})
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    is_json = resp.getheader("Content-Type", "").startswith("application/json")
    return resp.status, resp, json.loads(data) if is_json else data


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.load(r)


def test_cache_rows_at_their_own_positions_decode_as_generate(model_dir):
    """model.py's continuous-batching cache: four prompts join one KVCache at different steps, each
    in its own row, and decode together; each gets generate()'s greedy tokens and logits."""
    from model import KVCache

    model, _ = load(model_dir)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 16000, (1, n)).tolist()[0] for n in (5, 9, 17, 3)]
    want = [model.generate(torch.tensor([p]), 12, temperature=0)[0, len(p):].tolist() for p in prompts]
    cache, rows, got = KVCache(model.config, 4, 64), [3, 0, 2, 1], [[] for _ in prompts]
    with torch.no_grad():
        for step in range(24):
            if step % 3 == 0 and step // 3 < 4:  # a prompt joins: prefilled into its row, 4 tokens at a time
                i = step // 3
                for s in range(0, len(prompts[i]), 4):
                    logits, _ = model(torch.tensor([prompts[i][s:s + 4]]), cache=cache, rows=[rows[i]])
                got[i].append(int(logits[0, -1].argmax()))
            live = [i for i in range(4) if 0 < len(got[i]) < 12]
            if live:
                logits, _ = model(torch.tensor([[got[i][-1]] for i in live]), cache=cache, rows=[rows[i] for i in live])
                for j, i in enumerate(live):
                    got[i].append(int(logits[j, -1].argmax()))
    assert got == want


# ----------------------------------------------------------------------------------------------
# the OpenAI client


def test_chat_answer_and_usage_equal_generate(server, reference):
    tok = reference.tok
    r = client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "介绍一下长城"}],
                                               temperature=0, max_tokens=30)
    text, reason, n = reference(chat_ids(tok, "介绍一下长城"), 30)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(chat_ids(tok, "介绍一下长城")), n)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_is_the_same_text_in_whole_characters(server, reference):
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "写一首诗"}]
    stream = client(server).chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40,
                                                    stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    ids = reference.tok.prompt_ids(messages)
    text, reason, n = reference(ids, 40)
    assert "".join(deltas) == text and len(deltas) > 5
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert not chunks[-1].choices and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ids), n)


def test_completions_continue_raw_text(server, reference):
    tok = reference.tok
    c = client(server)
    r = c.completions.create(model="m", prompt="从前有座山，", temperature=0, max_tokens=25)
    text, reason, n = reference(tok.prompt_ids("从前有座山，", raw=True), 25)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (text, reason, n)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="m", prompt="从前有座山，", temperature=0,
                                                                         max_tokens=25, stream=True))
    assert streamed == text


def test_models_and_health(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == ["model"]
    assert health(server)["status"] == "ok"  # no key needed for the health check


def test_stop_strings_cut_the_text_streamed_or_not(server):
    c = client(server)
    ask = dict(model="m", messages=[{"role": "user", "content": "讲个故事"}], temperature=1.0, seed=7, max_tokens=40)
    full = c.chat.completions.create(**ask).choices[0].message.content
    stop = full[15:17]  # two characters from the middle: the answer must end right before their first occurrence
    cut = full[:full.index(stop)]
    r = c.chat.completions.create(**ask, stop=[stop, "never-appears"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**ask, stop=stop, stream=True)
                       if ch.choices)
    assert streamed == cut


def test_seed_reproduces_a_sample(server):
    c = client(server)
    ask = dict(model="m", messages=[{"role": "user", "content": "你好"}], temperature=1.0, top_p=0.95, max_tokens=20)
    a, b, other = (c.chat.completions.create(**ask, seed=s).choices[0].message.content for s in (1, 1, 2))
    assert a == b and a != other


def test_eight_concurrent_greedy_requests_answer_as_alone(server, reference):
    c = client(server)
    prompts = ["你好", "介绍一下长城", "1+1等于几？", "写一首关于春天的诗", "什么是机器学习", "北京有哪些好吃的", "讲个笑话", "再见"]
    lengths = [20 + 7 * i for i in range(8)]  # rows leave the batch at different steps

    def ask(i: int) -> str:
        kw = dict(model="m", messages=[{"role": "user", "content": prompts[i]}], temperature=0, max_tokens=lengths[i])
        if i % 2:  # half of them streamed
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kw, stream=True))
        return c.chat.completions.create(**kw).choices[0].message.content

    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone
    assert alone == [reference(chat_ids(reference.tok, p), n)[0] for p, n in zip(prompts, lengths)]
    assert health(server)["peak_batch"] >= 4  # they really shared decode steps


# ----------------------------------------------------------------------------------------------
# bad input, auth, load


LONG = json.dumps({"messages": [{"role": "user", "content": "长城" * 3000}]})
BAD = [  # body, status, param, code
    (b"{not json", 400, None, None),
    (b"[1, 2]", 400, None, None),
    (b'{"messages": []}', 400, "messages", None),
    (b'{"messages": "hi"}', 400, "messages", None),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', 400, "messages[0].role", None),
    (b'{"messages": [{"role": "user", "content": 3}]}', 400, "messages[0].content", None),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]}', 400, "messages[1].role", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', 400, "temperature", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', 400, "stop", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true}', 400, "logprobs", None),
    (LONG.encode(), 400, "messages", "context_length_exceeded"),
    (b"x" * (1 << 20 | 1), 413, None, None),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[f"{s}-{p}-{i}" for i, (_, s, p, _) in enumerate(BAD)])
def test_bad_input_gets_an_openai_error_object(server, body, status, param, code):
    got, _, data = raw(server, "POST", "/v1/chat/completions", body)
    assert got == status and set(data["error"]) == {"message", "type", "param", "code"}
    assert (data["error"]["param"], data["error"]["code"]) == (param, code) and data["error"]["message"]


def test_unknown_fields_are_ignored_and_unknown_paths_are_404(server):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "x", "foo": 1}).encode()
    assert raw(server, "POST", "/v1/chat/completions", body)[0] == 200
    status, _, data = raw(server, "GET", "/v1/nothing")
    assert status == 404 and data["error"]["code"] == "not_found"


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong").models.list()
    for key in (None, "nope"):
        status, _, data = raw(server, "POST", "/v1/chat/completions", b'{"messages": []}', key=key)
        assert status == 401 and data["error"]["code"] == "invalid_api_key"


def open_stream(url: str, max_tokens: int = 2000) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A long streaming request, read up to its first text chunk (so it is running)."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):
        assert resp.readline().startswith(b"data: ") and resp.readline() == b"\n"
    return conn, resp


def wait_for(condition, seconds: float) -> float:
    t0 = time.perf_counter()
    while not condition():
        assert time.perf_counter() - t0 < seconds, "timed out"
        time.sleep(0.01)
    return time.perf_counter() - t0


def test_full_queue_is_429_and_a_disconnect_frees_the_row(small_server):
    small_server = small_server[1]
    conn, resp = open_stream(small_server)  # the one row, for ~3 s of tokens
    c = client(small_server)
    ask = dict(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(c.chat.completions.create, **ask)  # the one queue place
        wait_for(lambda: health(small_server)["queued"] == 1, 5)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(**ask)
        assert e.value.response.headers["Retry-After"] == "1" and e.value.body["code"] == "rate_limit_exceeded"
        resp.close(), conn.close()  # disconnect mid-stream: the queued request gets the row at once
        assert waiting.result(timeout=2).choices[0].finish_reason == "length"
    assert health(small_server) == {**health(small_server), "running": 0, "queued": 0}


def test_sigterm_ends_streams_and_exits_0(small_server):
    proc, url = small_server
    conn, resp = open_stream(url)  # 2000 tokens: far more than the 0.2 s to the cancel (--grace 0)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rest = resp.read().decode()  # the stream is ended properly: an error event, then [DONE]
    assert proc.wait(timeout=10) == 0 and time.perf_counter() - t0 < 5
    assert '"server_error"' in rest and rest.endswith("data: [DONE]\n\n")
    assert "requests served" in proc.stdout.read()


# ----------------------------------------------------------------------------------------------
# the web page in a real browser


class DevTools:
    """Just enough of Chromium's DevTools protocol: send a command, wait for its answer."""

    def __init__(self, ws_url: str):
        self.ws, self.next_id = websocket.create_connection(ws_url, timeout=30, suppress_origin=True), 0

    def __call__(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expression: str):
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)"
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             f"--user-data-dir={tmp_path / 'profile'}", "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if "DevTools listening on" in line:
                break
        port = re.search(r"ws://127\.0\.0\.1:(\d+)/", line).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        yield DevTools(page["webSocketDebuggerUrl"])
    finally:
        proc.kill()
        proc.wait()


def test_web_page_streams_a_chinese_answer_in_chromium(server, browser, reference):
    browser("Page.enable")
    browser("Page.navigate", url=server + "/")
    wait_for(lambda: browser.js("document.readyState") == "complete" and browser.js("!!document.getElementById('send')"), 10)
    question = "你好，请介绍一下长城。"
    browser.js(f"""document.getElementById('api_key').value = {json.dumps(KEY)};
                   document.getElementById('temperature').value = '0';
                   document.getElementById('max_tokens').value = '40';
                   document.getElementById('input').value = {json.dumps(question)};
                   document.getElementById('form').requestSubmit();""")
    wait_for(lambda: browser.js("(document.querySelector('.assistant') || {dataset: {}}).dataset.done") == "1", 20)
    answer = browser.js("document.querySelector('.assistant').textContent")
    assert browser.js("document.querySelector('.user').textContent") == question
    assert answer == reference(chat_ids(reference.tok, question), 40)[0] and answer
    assert int(browser.js("document.querySelector('.assistant').dataset.chunks")) > 5  # it streamed in
