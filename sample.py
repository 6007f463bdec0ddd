"""Generate text from a model directory: one prompt, a file of prompts, or an interactive chat.

    python sample.py --model out/sft/latest --prompt "介绍一下长城"
    python sample.py --model out/pretrain/latest --raw --prompt "从前有座山，" --temperature 0.8
    python sample.py --model out/sft/latest --prompt_file prompts.jsonl --temperature 0
    python sample.py --model out/sft/latest --chat --system "你是一个乐于助人的助手。"
    python sample.py --model out/sft/latest --chat --compile     # faster tokens after a compile

A model directory holds model.safetensors, config.json and tokenizer.model (every checkpoint
does; OUT_DIR/latest is one). Prompts go through the chat template unless --raw, which continues
the text as a pretrained base model would. --prompt_file takes one prompt per line, or JSONL
(.jsonl) with a "prompt" field. In --chat, type a message and press Enter: /reset forgets the
conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply. Text streams as it is generated; a
character that arrives as several byte-fallback tokens is printed once it is whole. A summary
line (tokens, tokens/s) goes to stderr unless --quiet. --compile runs the model through
torch.compile (model.compile_for_generation) before the first prompt: on a 2-core CPU, decoding
is 2.5x (26m) to 3.3x (tiny) faster, after ~10-40 s of compiling (less on later runs, which reuse
inductor's on-disk cache); worth it for a chat or a file of prompts, not for one short reply.
"""

import argparse
import sys
import time

import torch

from errors import NanozhError, exit_on_user_error, user_error
from files import read_prompts
from model import Transformer, autocast, check_fits, compile_for_generation, load, pick_device, pick_dtype
from tokenizer.tokenizer import StreamDecoder, Tokenizer

# -----------------------------------------------------------------------------
# generation


def stream_reply(model: Transformer, tok: Tokenizer, ids: list[int], args: argparse.Namespace,
                 generator: torch.Generator, out=None) -> tuple[str, int]:
    """Generate after `ids`, writing text to `out` as it comes; stops at <|im_end|> or </s> (not
    printed). Returns the text and the number of tokens generated."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    decoder, text, n = StreamDecoder(tok), [], 0
    stop_ids = [tok.im_end_id, tok.eos_id]
    for nxt in model.generate_stream(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                                     top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                     stop_ids=stop_ids, generator=generator):
        token = int(nxt[0])
        n += 1
        if token in stop_ids:
            break
        piece = decoder.push(token)
        text.append(piece)
        if out is not None and piece:
            out.write(piece)
            out.flush()
    tail = decoder.flush()
    if out is not None and tail:
        out.write(tail)
        out.flush()
    return "".join(text) + tail, n


def summary(n_tokens: int, seconds: float, prompt_tokens: int) -> str:
    rate = n_tokens / max(seconds, 1e-9)
    return f"{n_tokens} tokens in {seconds:.2f}s, {rate:.1f} tokens/s (prompt {prompt_tokens} tokens)"


def chat(model: Transformer, tok: Tokenizer, args: argparse.Namespace, generator: torch.Generator) -> None:
    """Interactive multi-turn chat on stdin/stdout. When the conversation no longer fits the
    context (keeping room for a reply), the oldest turns are dropped, with a notice."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    ctx = model.config.block_size
    room = min(args.max_new_tokens, ctx // 2)  # room kept for the reply when trimming
    tty = sys.stdin.isatty()
    if tty:
        print("chat: /reset forgets the conversation, /exit quits, Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        turn = [{"role": "user", "content": line}]
        ids = tok.prompt_ids(system + history + turn)
        dropped = 0
        while len(ids) + room > ctx and history:
            history, dropped = history[2:], dropped + 1  # one user + assistant exchange at a time
            ids = tok.prompt_ids(system + history + turn)
        if dropped:
            print(f"(dropped the {dropped} oldest exchange(s) to fit the context of {ctx} tokens)", file=sys.stderr)
        try:
            check_fits(ids, model, "chat")
        except NanozhError as e:
            print(str(e), file=sys.stderr)
            continue
        t0 = time.perf_counter()
        try:
            reply, n = stream_reply(model, tok, ids, args, generator, out=sys.stdout)
        except KeyboardInterrupt:
            print("\n(reply stopped; this exchange is forgotten)", file=sys.stderr)
            continue
        print(flush=True)
        if not args.quiet:
            print(summary(n, time.perf_counter() - t0, len(ids)), file=sys.stderr, flush=True)
        history += turn + [{"role": "assistant", "content": reply}]


def generate_prompts(model: Transformer, tok: Tokenizer, args: argparse.Namespace,
                     generator: torch.Generator) -> None:
    """--prompt or --prompt_file: every prompt is checked first, then each answer streams in turn."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        prompts = [("--prompt", args.prompt)]
    else:
        prompts = [(f"{args.prompt_file}:{n}", rec["prompt"]) for n, rec in read_prompts(args.prompt_file)]
    jobs = []
    for where, text in prompts:
        ids = tok.prompt_ids(text if args.raw else system + [{"role": "user", "content": text}], args.raw)
        check_fits(ids, model, where)
        jobs.append((text, ids))
    total, t0 = 0, time.perf_counter()
    for i, (text, ids) in enumerate(jobs):
        if len(jobs) > 1:
            print(("\n" if i else "") + f"> {text}", flush=True)
        if args.raw:
            print(text, end="", flush=True)
        total += stream_reply(model, tok, ids, args, generator, out=sys.stdout)[1]
        print(flush=True)
    if not args.quiet:
        print(summary(total, time.perf_counter() - t0, sum(len(ids) for _, ids in jobs)), file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory (e.g. OUT_DIR/latest)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one prompt")
    mode.add_argument("--prompt_file", help="one prompt per line, or JSONL with a \"prompt\" field")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--raw", action="store_true", help="continue the text as is, no chat template (base models)")
    p.add_argument("--system", default="", help="system message for the chat template")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=50, help="sample from the k likeliest tokens; 0 = all")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling; 1.0 = off")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help="> 1 discourages repeats (1.1-1.3 helps small models)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=1337, help="same seed and arguments -> same text")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype under autocast; auto = bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model first (~10-30 s on a CPU): faster decoding after")
    p.add_argument("--quiet", action="store_true", help="no summary line on stderr")
    args = p.parse_args()
    if args.chat and args.raw:
        p.error("--chat uses the chat template; --raw is for --prompt and --prompt_file")
    try:
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        model, tok = load(args.model, device)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        with autocast(device, dtype):  # fp32 weights, matmuls in dtype: model.py's one policy
            if args.compile:
                t0 = time.perf_counter()
                try:
                    compile_for_generation(model)
                except NanozhError:
                    raise
                except Exception as e:  # inductor raises many types: no C++ compiler, an unsupported op, ...
                    raise user_error("--compile", f"torch.compile failed ({type(e).__name__}: {str(e).strip()[:300]})",
                                     "run without --compile; on a CPU, inductor needs a C++ compiler (gcc)") from None
                if not args.quiet:
                    print(f"compiled in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            if args.chat:
                chat(model, tok, args, generator)
            else:
                generate_prompts(model, tok, args, generator)
    except NanozhError as e:
        exit_on_user_error(e)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
