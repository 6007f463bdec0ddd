"""Use a nanozh model elsewhere, and bring a Llama model into nanozh.

    python export.py --model out/sft/latest --to hf --out out/hf                 # transformers, vLLM
    python export.py --model out/sft/latest --to hf --out out/hf16 --dtype bfloat16
    python export.py --model out/sft/latest --to gguf --out out/m.gguf           # llama.cpp, ollama
    python export.py --model out/sft/latest --to gguf --out out/m-q8.gguf --dtype q8_0
    python export.py --from hf --model path/to/llama --out out/imported           # then --init_from it
    python export.py --merge --model out/sft_lora/latest --out out/sft_merged     # LoRA adapters folded in (lora.py)

nanozh's model is a Llama, so nothing is approximated: weights are renamed and split (our fused
qkv and gate_up matrices become q/k/v_proj and gate/up_proj), and the rows that pad the vocabulary
to a multiple of 64 are dropped. Those rows never reach an output (nanozh's logits stop at the
tokenizer's vocab_size; no id ever looks them up), and Hugging Face and llama.cpp both need the
config's vocab_size to match the tokenizer and the weights; an import pads them back with zeros.
A mixture of experts (n_expert > 0) is a Mixtral, whose router is ours (softmax over all experts,
top-k, weights renormalised over the chosen k): --to hf writes it as MixtralForCausalLM, each
expert under Mixtral's checkpoint names (w1, w3, w2 = gate, up, down). Shared experts
(n_shared_expert > 0), which Mixtral lacks, and a mixture of experts in GGUF are refused.

--to hf writes what AutoModelForCausalLM and AutoTokenizer load without custom code: config.json
(LlamaForCausalLM), model.safetensors, generation_config.json (stops at <|im_end|> and </s>), our
tokenizer.model, and tokenizer.json + tokenizer_config.json with a chat template that gives the
ids of Tokenizer.render_chat. tokenizer.json is sentencepiece's BPE spelled out for the tokenizers
library: the same pieces with real spaces for U+2581, merges ranked by piece score, byte fallback,
no normaliser or pre-splitting (ours has none), no BOS. Two things make its chat template exact:
HF tokenizes the rendered string and would read a `<|im_end|>` typed by a user as the marker (ours
never does), so the template writes every `<` of a message as `<` + U+FDD0, a Unicode
noncharacter, which no special token starts with, and the tokenizer's normaliser removes it again
after the special tokens have been found. (So tokenizer.json's own encode deletes a U+FDD0 that
follows a `<`: the one string whose ids differ from ours.) The template's header and the content
are tokenized as one string where ours encodes them separately; that is the same ids because no
piece holds a "\\n" (checked on export).

--to gguf writes one file for llama.cpp (and so ollama, LM Studio) with llama.cpp's own writer,
the `gguf` package: architecture "llama", the hyperparameters, the sentencepiece vocabulary with
scores and types, the ChatML template (plain: llama.cpp parses markers out of the rendered text
itself), and the weights in f32, f16 or q8_0 (norms stay f32). Our RoPE rotates the pairs
(x[i], x[i + D/2]) like transformers' Llama; llama.cpp's "llama" rotates (x[2i], x[2i+1]), so the
rows of the query and key projections are permuted per head exactly as llama.cpp's
convert_hf_to_gguf.py does.

--from hf reads a transformers Llama directory (config.json, safetensors, a sentencepiece
tokenizer.model with nanozh's special tokens at ids 0..5) into a nanozh model directory. What
nanozh cannot represent exactly (rope scaling, biases, another activation, head_dim other than
hidden/heads, a vocabulary that does not match the tokenizer, ...) is a one-line error naming the
config key, never a silently different model.

Every output is written aside and renamed into place: it is whole or absent, and an existing one
is never replaced.
"""

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import lora
from errors import NanozhError, exit_on_user_error, user_error
from model import DTYPES, ModelConfig, Transformer, load
from tokenizer.tokenizer import META_SPACE, SPECIALS, Tokenizer

ESCAPE = "\ufdd0"  # a Unicode noncharacter: reserved for a program's internal use, never typed
GGUF_DTYPES = ("f32", "f16", "q8_0")


def chat_template(escape: bool) -> str:
    """ChatML in Jinja, turn for turn what Tokenizer.render_chat writes (the same roles, a system
    message only first). With escape, every `<` of a message is followed by ESCAPE (see the top)."""
    content = f"message['content'] | replace('<', '<{ESCAPE}')" if escape else "message['content']"
    return (
        "{%- for message in messages %}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
        "{%- elif message['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('a system message may only come first') }}{%- endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + " + content + " + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


# ----------------------------------------------------------------------------------------------
# weights: nanozh names <-> Hugging Face Llama names (<-> GGUF names)

# per block: our tensor and the HF tensors it is the row-wise concatenation of
LAYER_NAMES = [
    ("attn_norm.weight", ["input_layernorm.weight"]),
    ("attn.qkv.weight", ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]),
    ("attn.proj.weight", ["self_attn.o_proj.weight"]),
    ("mlp_norm.weight", ["post_attention_layernorm.weight"]),
    ("mlp.gate_up.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"]),
    ("mlp.down.weight", ["mlp.down_proj.weight"]),
]
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
# ModelConfig fields a Llama checkpoint holds, those a Mixtral checkpoint adds (n_shared_expert
# only at 0: Mixtral has no always-on expert)...
LLAMA_FIELDS = {"vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "block_size", "rope_theta",
                "norm_eps", "tie_embeddings", "init_std"}
MIXTRAL_FIELDS = {"n_expert", "n_expert_active", "n_shared_expert"}
# ...and those that change nothing a model computes (the router's loss weights only train)
INFERENCE_FREE = {"attn_impl", "dropout", "router_aux_coef", "router_z_coef"}


def check_exportable(config: ModelConfig, where: str, to: str) -> None:
    """A ModelConfig setting that the target cannot hold (a field added to nanozh after this file,
    shared experts, any mixture of experts in GGUF) must not be dropped silently: it is an error."""
    if config.n_expert and to == "gguf":
        raise user_error(where, f"n_expert={config.n_expert} has no equivalent in a Llama checkpoint",
                         "--to gguf writes dense models only; --to hf writes a mixture of experts as Mixtral")
    if config.n_shared_expert:
        raise user_error(where, f"n_shared_expert={config.n_shared_expert} has no equivalent in a Mixtral checkpoint",
                         "export.py writes routed experts only")
    for f in fields(ModelConfig):
        value = getattr(config, f.name)
        if f.name not in LLAMA_FIELDS | MIXTRAL_FIELDS | INFERENCE_FREE and value != f.default:
            raise user_error(where, f"{f.name}={value!r} has no equivalent in a Llama checkpoint",
                             "export.py writes Llama and Mixtral models only")


def layer_names(c: ModelConfig) -> list[tuple[str, list[str]]]:
    """LAYER_NAMES, for a mixture of experts with Mixtral's MLP names: our router is its gate, and
    each expert's gate, up and down projections are its w1, w3 and w2."""
    if not c.n_expert:
        return LAYER_NAMES
    moe = [("mlp.router.weight", ["block_sparse_moe.gate.weight"])]
    for j in range(c.n_expert):
        e = f"block_sparse_moe.experts.{j}"
        moe += [(f"mlp.experts.{j}.gate_up.weight", [f"{e}.w1.weight", f"{e}.w3.weight"]),
                (f"mlp.experts.{j}.down.weight", [f"{e}.w2.weight"])]
    return LAYER_NAMES[:4] + moe


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under the names of transformers' LlamaForCausalLM (MixtralForCausalLM for
    a mixture of experts: one tensor per expert, as Mixtral checkpoints are saved), vocabulary rows
    cut to the tokenizer's vocab_size; a tied head is left out (transformers ties it from the
    config). Weights a Llama has no place for (an unmerged adapter's, say) are an error."""
    c = model.config
    V, D = c.vocab_size, c.head_dim
    qkv_sizes = [c.n_head * D, c.n_kv_head * D, c.n_kv_head * D]
    ours = dict(model.state_dict())
    if c.tie_embeddings:
        ours.pop("lm_head.weight")

    def take(name: str) -> torch.Tensor:
        if name not in ours:
            raise user_error("--model", f"no tensor {name}: this is not a plain nanozh model",
                             "merge an adapter first (python export.py --merge)")
        return ours.pop(name)

    out = {"model.embed_tokens.weight": take("tok_emb.weight")[:V], "model.norm.weight": take("norm.weight")}
    if not c.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")[:V]
    for i in range(c.n_layer):
        for name, hf_names in layer_names(c):
            t = take(f"blocks.{i}.{name}")
            parts = t.split(qkv_sizes) if name == "attn.qkv.weight" else t.chunk(len(hf_names))  # gate_up: halves
            for hf_name, part in zip(hf_names, parts):
                out[f"model.layers.{i}.{hf_name}"] = part
    if ours:
        raise user_error("--model", f"weights a Llama checkpoint cannot hold: {sorted(ours)[:3]}",
                         "merge an adapter first (python export.py --merge)")
    return {k: v.detach().contiguous() for k, v in out.items()}


def nanozh_state_dict(hf: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """The inverse of hf_state_dict, in fp32: parts concatenated, vocabulary rows padded with zeros.
    A missing or unexpected HF tensor (a bias, say) is an error naming it."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints' RoPE table

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise user_error(where, f"tensor {name} is missing", "export the model with transformers' save_pretrained")
        return hf.pop(name).float()

    def pad_rows(t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 2 or t.shape[0] != config.vocab_size:
            raise user_error(where, f"a vocabulary matrix has shape {tuple(t.shape)}, not ({config.vocab_size}, ...)",
                             "the config and weights come from different models")
        return torch.cat([t, t.new_zeros(config.padded_vocab_size - t.shape[0], t.shape[1])])

    out = {"tok_emb.weight": pad_rows(take("model.embed_tokens.weight")), "norm.weight": take("model.norm.weight")}
    if not config.tie_embeddings:
        out["lm_head.weight"] = pad_rows(take("lm_head.weight"))
    elif "lm_head.weight" in hf:  # some tied checkpoints store the head anyway: it must be the embedding
        if not torch.equal(pad_rows(take("lm_head.weight")), out["tok_emb.weight"]):
            raise user_error(where, "tie_word_embeddings is true but lm_head.weight differs from the embedding",
                             "set tie_word_embeddings to false in config.json")
    for i in range(config.n_layer):
        for name, hf_names in LAYER_NAMES:
            parts = [take(f"model.layers.{i}.{n}") for n in hf_names]
            if len({p.shape[1:] for p in parts}) > 1:
                raise user_error(where, f"layer {i}'s {', '.join(hf_names)} have shapes {[tuple(p.shape) for p in parts]}",
                                 "the weights are damaged")
            out[f"blocks.{i}.{name}"] = torch.cat(parts)
    if hf:
        raise user_error(where, f"tensors nanozh's Llama has no place for: {sorted(hf)[:3]}",
                         "nanozh models have no biases and no extra layers")
    return out


def permute_for_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a query/key projection, per head, from rotate-half order (x[i] pairs x[i + D/2]) to
    llama.cpp's interleaved order (x[2i] pairs x[2i+1]): row i of each half goes to 2i and 2i+1.
    The same reshape as llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of permute_for_llama_cpp."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------
# nanozh -> Hugging Face

def hf_config(c: ModelConfig, tok: Tokenizer, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd, "intermediate_size": c.hidden_size, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
        "hidden_act": "silu", "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
        "torch_dtype": dtype, "use_cache": True,
    } | ({} if not c.n_expert else {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": c.n_expert,
        "num_experts_per_tok": c.n_expert_active, "sliding_window": None, "router_jitter_noise": 0.0,
        # only read when fine-tuning with output_router_logits; transformers pools all layers' tokens
        # into one balance loss where nanozh averages the per-layer ones
        "router_aux_loss_coef": c.router_aux_coef, "output_router_logits": False})


def hf_tokenizer_json(tok: Tokenizer, where: str) -> dict:
    """Our sentencepiece BPE as a tokenizers-library pipeline that gives the same ids (see the top)."""
    sp = tok.sp
    pieces = [sp.id_to_piece(i) for i in range(tok.vocab_size)]
    normal = {i for i in range(tok.vocab_size) if sp.is_unknown(i) + sp.is_control(i) + sp.is_byte(i) == 0}
    for i in normal:
        if "\n" in pieces[i]:
            raise user_error(where, f"piece {i} {pieces[i]!r} holds a newline, so the chat template's header "
                             "could merge with the message", "use a tokenizer trained by python -m data.train_tokenizer")
    # sentencepiece writes a space as U+2581 inside pieces; here pieces hold the real space, so a
    # U+2581 typed in the text matches no piece and goes to byte fallback, as in Tokenizer.encode
    vocab = {(p.replace(META_SPACE, " ") if i in normal else p): i for i, p in enumerate(pieces)}
    # BPE merges: every split of a piece into two pieces, ranked as sentencepiece ranks them, by the
    # score of the piece the merge makes (then by the parts' ids, as transformers' converter does)
    ids = {p: i for p, i in vocab.items() if i in normal}
    merges = sorted((-sp.get_score(i), i, ids[p[:k]], ids[p[k:]], p[:k], p[k:])
                    for p, i in ids.items() for k in range(1, len(p)) if p[:k] in ids and p[k:] in ids)
    special = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, p in enumerate(SPECIALS)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Replace", "pattern": {"String": "<" + ESCAPE}, "content": "<"},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for *_, a, b in merges]},
    }


def write_hf(model: Transformer, tok: Tokenizer, out: Path, dtype: str) -> None:
    c = model.config
    state = {k: v.to(DTYPES[dtype]) for k, v in tqdm(hf_state_dict(model).items(), desc="weights", unit=" tensors")}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    # plain writes: the whole directory is renamed into place once complete
    dump = lambda name, obj: (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    dump("config.json", hf_config(c, tok, dtype))
    dump("generation_config.json", {"bos_token_id": tok.bos_id, "eos_token_id": [tok.im_end_id, tok.eos_id],
                                    "pad_token_id": tok.pad_id})
    shutil.copyfile(tok.path, out / "tokenizer.model")
    dump("tokenizer.json", hf_tokenizer_json(tok, str(tok.path)))
    dump("tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": c.block_size, "chat_template": chat_template(escape=True)})


# ----------------------------------------------------------------------------------------------
# nanozh -> GGUF

def write_gguf(model: Transformer, tok: Tokenizer, path: Path, dtype: str) -> None:
    try:
        import gguf
    except ImportError:
        raise user_error("--to gguf", "the gguf package is not installed", "pip install gguf") from None
    c, sp = model.config, tok.sp
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("nanozh")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.hidden_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    # the tokenizer: sentencepiece ("llama") with its pieces, scores and types, no dummy prefix, no BOS
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    ids = range(tok.vocab_size)
    w.add_token_list([sp.id_to_piece(i) for i in ids])
    w.add_token_scores([sp.get_score(i) for i in ids])
    w.add_token_types([gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                       else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in ids])
    w.add_unk_token_id(tok.unk_id)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_eot_token_id(tok.im_end_id)  # llama.cpp stops at eos and eot
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(chat_template(escape=False))
    for name, t in tqdm(gguf_tensors(model).items(), desc="weights", unit=" tensors"):
        a = t.float().numpy()
        if a.ndim == 1 or dtype == "f32":  # norms stay f32, as llama.cpp's converter keeps them
            w.add_tensor(name, a)
        elif dtype == "q8_0" and a.shape[-1] % 32 == 0:  # q8_0 quantises blocks of 32 along a row
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a.astype("float16"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """hf_state_dict under llama.cpp's names, query and key rows permuted for its RoPE."""
    c, out = model.config, {}
    for name, t in hf_state_dict(model).items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if rest == "self_attn.q_proj.weight":
                t = permute_for_llama_cpp(t, c.n_head)
            elif rest == "self_attn.k_proj.weight":
                t = permute_for_llama_cpp(t, c.n_kv_head)
            name = f"blk.{i}.{GGUF_NAMES[rest]}"
        else:
            name = GGUF_NAMES[name]
        out[name] = t
    return out


# ----------------------------------------------------------------------------------------------
# Hugging Face -> nanozh

def config_from_hf(raw: dict, where: str, tok: Tokenizer) -> ModelConfig:
    """The ModelConfig of a transformers Llama config.json; a setting nanozh cannot represent is an
    error naming its key."""
    def need(key: str, ok, what: str) -> None:
        if not ok:
            raise user_error(where, f"{key}={json.dumps(raw.get(key))}: {what}", "nanozh cannot load this model exactly")

    need("model_type", raw.get("model_type") == "llama", "only Llama models can be imported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        need(key, isinstance(raw.get(key), int) and raw[key] > 0, "a positive integer is required")
    need("hidden_act", raw.get("hidden_act", "silu") == "silu", "nanozh's MLP is SwiGLU (silu)")
    need("attention_bias", not raw.get("attention_bias", False), "nanozh has no biases")
    need("mlp_bias", not raw.get("mlp_bias", False), "nanozh has no biases")
    need("rope_scaling", raw.get("rope_scaling") in (None, {"rope_type": "default"}, {"type": "default"}),
         "nanozh's RoPE has no scaling")
    rope = raw.get("rope_parameters") or {}
    need("rope_parameters", set(rope) <= {"rope_type", "rope_theta"} and rope.get("rope_type", "default") == "default",
         "nanozh's RoPE has no scaling")
    need("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0) == 1.0, "nanozh rotates the whole head")
    need("quantization_config", "quantization_config" not in raw, "import the unquantised model")
    n_embd, n_head = raw["hidden_size"], raw["num_attention_heads"]
    need("head_dim", raw.get("head_dim") in (None, n_embd // n_head), "nanozh's head_dim is hidden_size/heads")
    need("vocab_size", raw["vocab_size"] == tok.vocab_size, f"tokenizer.model has {tok.vocab_size} pieces")
    defaults = ModelConfig(n_embd=n_embd)
    return ModelConfig.from_dict({
        "vocab_size": raw["vocab_size"], "n_layer": raw["num_hidden_layers"], "n_head": n_head,
        "n_kv_head": raw.get("num_key_value_heads") or n_head, "n_embd": n_embd,
        # 0 = nanozh's default width, so a model exported by nanozh comes back with its own config
        "ffn_hidden": 0 if raw["intermediate_size"] == defaults.hidden_size else raw["intermediate_size"],
        "block_size": raw.get("max_position_embeddings", defaults.block_size),
        "rope_theta": float(rope.get("rope_theta", raw.get("rope_theta", defaults.rope_theta))),
        "norm_eps": float(raw.get("rms_norm_eps", 1e-6)), "tie_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "init_std": float(raw.get("initializer_range", defaults.init_std))}, where)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards a model.safetensors.index.json lists."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise user_error(index, f"not a safetensors index ({e})") from None
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise user_error(hf_dir, "no model.safetensors", "save the model with save_pretrained(safe_serialization=True)")
    state = {}
    for name in tqdm(files, desc="reading", unit=" files"):
        try:
            state.update(load_file(hf_dir / name))
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for broken files
            raise user_error(hf_dir / name, f"cannot be read ({str(e).splitlines()[0]})") from None
    return state


def import_hf(hf_dir: Path, out: Path) -> Transformer:
    config_path = hf_dir / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise user_error(config_path, f"cannot read a config ({e})", "pass a transformers model directory") from None
    if not isinstance(raw, dict):
        raise user_error(config_path, "should hold a JSON object")
    if not (hf_dir / "tokenizer.model").is_file():
        raise user_error(hf_dir / "tokenizer.model", "missing", "nanozh needs the sentencepiece tokenizer.model")
    tok = Tokenizer(hf_dir / "tokenizer.model")  # checks nanozh's special tokens at ids 0..5
    config = config_from_hf(raw, str(config_path), tok)
    model = Transformer(config)
    state = nanozh_state_dict(read_hf_weights(hf_dir), config, str(hf_dir))
    for name, t in state.items():
        want = model.state_dict()[name].shape
        if t.shape != want:
            raise user_error(hf_dir, f"{name} has shape {tuple(t.shape)} but config.json implies {tuple(want)}",
                             "the config and weights come from different models")
    model.load_state_dict(state, strict=not config.tie_embeddings)  # a tied head is the embedding
    model.save(out)
    shutil.copyfile(tok.path, out / "tokenizer.model")
    return model


# ----------------------------------------------------------------------------------------------

def written_aside(out: Path, write):
    """write(tmp) into a temp directory beside `out` (tmp is that directory, or for a .gguf file a
    path in it), then renamed to `out` once whole; the temp directory goes in any case. Returns what
    write returns."""
    if out.exists():
        raise user_error(out, "already exists", "remove it or choose another --out")
    tmp_dir = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    tmp = tmp_dir / out.name if out.suffix == ".gguf" else tmp_dir
    try:
        result = write(tmp)
        tmp.rename(out)
        return result
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)  # one mode per run
    mode.add_argument("--to", choices=["hf", "gguf"], help="export a nanozh model directory")
    mode.add_argument("--from", dest="source", choices=["hf"], help="import a transformers Llama directory")
    mode.add_argument("--merge", action="store_true", help="a LoRA adapter directory -> a plain model directory")
    p.add_argument("--model", required=True, help="the model directory to read")
    p.add_argument("--out", required=True, help="the directory (hf, import) or .gguf file to write; must not exist")
    p.add_argument("--dtype", default=None, help=f"hf: {', '.join(DTYPES)} (default float32); "
                                                 f"gguf: {', '.join(GGUF_DTYPES)} (default f32)")
    args = p.parse_args(argv)
    t0, out = time.time(), Path(args.out)
    try:
        if args.merge:
            model = written_aside(out, lambda tmp: lora.merge_dir(args.model, tmp))
            what = "model directory with the LoRA adapters merged"
        elif args.source == "hf":
            if args.dtype:
                raise user_error("--dtype", "an import is always float32", "leave --dtype out")
            model = written_aside(out, lambda tmp: import_hf(Path(args.model), tmp))
            what = "nanozh model directory (float32)"
        else:
            dtype = args.dtype or ("float32" if args.to == "hf" else "f32")
            allowed = tuple(DTYPES) if args.to == "hf" else GGUF_DTYPES
            if dtype not in allowed:
                raise user_error("--dtype", f"{dtype!r} is not a {args.to} dtype", f"use one of {', '.join(allowed)}")
            if args.to == "gguf" and out.suffix != ".gguf":
                raise user_error(out, "a GGUF file's name should end in .gguf", "e.g. --out out/model.gguf")
            model, tok = load(args.model)
            check_exportable(model.config, str(Path(args.model) / "config.json"), args.to)
            write = write_hf if args.to == "hf" else write_gguf
            written_aside(out, lambda tmp: write(model, tok, tmp, dtype))
            arch = "MixtralForCausalLM" if model.config.n_expert else "LlamaForCausalLM"
            what = f"{arch + ' directory' if args.to == 'hf' else 'GGUF file'} ({dtype})"
    except NanozhError as e:
        exit_on_user_error(e)
    n = sum(t.numel() for t in hf_state_dict(model).values())
    print(f"export: wrote {out}: {what}, {n / 1e6:.2f}M parameters, {size_of(out) / 1e6:.1f} MB, "
          f"in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
