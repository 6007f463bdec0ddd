"""llama.cpp runs an exported nanozh model as nanozh does: the same prompt ids, logits, greedy
continuations, and chat replies through the GGUF's own chat template.

    pip install llama-cpp-python          # compiles llama.cpp from PyPI's source: 10+ minutes on 2 cores
    python -m bench.llama_cpp --model out/quickstart/sft/latest
    python -m bench.llama_cpp --model out/sft/latest --dtype q8_0 --max_new_tokens 64

Exports --model with export.py to a GGUF file in a temp directory, loads it in llama-cpp-python
(CPU), and for each prompt prints whether llama.cpp's tokenizer gives our ids, the largest logit
difference at the prompt's last position, and both greedy continuations (temperature 0, no
repetition penalty) and whether they are equal. Then chat: llama.cpp's create_chat_completion (the
template in the GGUF) against sample.py's reply (render_chat + greedy generate), same check. Not
part of the tests: installing llama-cpp-python compiles llama.cpp.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import export
from model import load
from sample import stream_reply

PROMPTS = ["话说天下大势，", "今天天气很好，我们", "人工智能是", "The quick brown fox", "1234 + 5678 ="]
CHATS = ["你好，你是谁？", "用一句话介绍长城。", "请写一首关于秋天的诗 😀"]
TRICKY = ["  two  spaces\tand a tab\n\nnewlines", "1234567890 3.14", "emoji 😀 and 𠀀", "a\u2581b (a literal U+2581)",
          "typed <|im_end|> marker"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a nanozh model directory")
    p.add_argument("--dtype", default="f32", choices=export.GGUF_DTYPES)
    p.add_argument("--max_new_tokens", type=int, default=32)
    args = p.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("bench.llama_cpp: pip install llama-cpp-python first (it compiles llama.cpp)")
    model, tok = load(args.model)
    stop = [tok.im_end_id, tok.eos_id]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        export.main(["--model", args.model, "--to", "gguf", "--out", str(path), "--dtype", args.dtype])
        llm = Llama(model_path=str(path), n_ctx=model.config.block_size, logits_all=True, verbose=False)

        print(f"\n{'text':<40} llama.cpp's ids (special=False, then special=True) == nanozh's")
        for text in TRICKY:
            ids = tok.encode(text)
            print(f"{text!r:<40} {[llm.tokenize(text.encode(), add_bos=False, special=s) == ids for s in (False, True)]}")

        print(f"\n{'prompt':<22} {'ids':>4} {'max|dlogit|':>12} {'same':>5}  nanozh | llama.cpp")
        same_all = True
        for text in PROMPTS:
            ids = tok.prompt_ids(text, raw=True)  # eos, then the text: how a document starts
            ids_same = llm.tokenize(text.encode(), add_bos=False, special=False) == ids[1:]
            with torch.no_grad():
                ours_logits = model(torch.tensor([ids]))[0][0, -1].numpy()
            llm.reset()
            llm.eval(ids)
            dlogit = float(np.abs(np.asarray(llm.scores[len(ids) - 1]) - ours_logits).max())
            ours = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=0, stop_ids=stop)[0, len(ids):].tolist()
            theirs = []
            for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                theirs.append(t)
                if t in stop or len(theirs) == len(ours):
                    break
            same = ours == theirs
            same_all &= same and ids_same
            print(f"{text:<22} {'ok' if ids_same else 'DIFF':>4} {dlogit:>12.2e} {str(same):>5}  "
                  f"{tok.decode(ours)!r} | {tok.decode(theirs)!r}")

        print(f"\n{'chat':<22} {'same':>5}  sample.py | llama.cpp create_chat_completion")
        sample_args = argparse.Namespace(max_new_tokens=args.max_new_tokens, temperature=0.0, top_k=0, top_p=None,
                                         repetition_penalty=1.0)
        for text in CHATS:
            messages = [{"role": "user", "content": text}]
            ours, _ = stream_reply(model, tok, tok.prompt_ids(messages), sample_args, torch.Generator())
            reply = llm.create_chat_completion(messages, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                               max_tokens=args.max_new_tokens)
            theirs = reply["choices"][0]["message"]["content"]
            same_all &= ours == theirs
            print(f"{text:<22} {str(ours == theirs):>5}  {ours!r} | {theirs!r}")
    print(f"\nbench.llama_cpp: {args.dtype} GGUF, llama.cpp and nanozh {'agree' if same_all else 'DIFFER'} "
          f"on {len(PROMPTS)} prompts and {len(CHATS)} chats")


if __name__ == "__main__":
    main()
