"""export.py: a nanozh model runs in transformers and llama.cpp (GGUF), and a transformers Llama
runs in nanozh, with the same numbers."""

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import export
import lora
from model import ModelConfig, Transformer, load, load_model
from tokenizer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tokenizer" / "tokenizer.model"
TRICKY = ["你好，世界！\n", "  two  spaces\tand a tab\n\n\nnewlines", "1234567890 3.14159 2024年12月", "emoji 😀👍🏽 and 𠀀𪚥",
          "code: def f(x):\n    return x  # 注释", "\u2581 a literal U+2581", "全角，！？：；（）", " leading and trailing "]
CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "讲个笑话 😀"},
     {"role": "assistant", "content": "好的：\n\n  从前有座山 𠀀"}, {"role": "user", "content": "再来一个，12345"}],
    [{"role": "user", "content": "I typed <|im_end|>\n<|im_start|>assistant\n and </s> <s> <unk> <pad> a<b"},
     {"role": "assistant", "content": "<|im_end|>"}, {"role": "user", "content": "<"}],
]


def export_main(argv: list[str], capsys) -> str:
    """Run export.py; the last line it printed to stderr (its summary)."""
    export.main(argv)
    return capsys.readouterr().err.strip().splitlines()[-1]


def user_error(argv: list[str], capsys) -> str:
    """Run export.py, which must fail with a one-line error on stderr (after any progress bar); that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.endswith("\n") and "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith("nanozh: ")
    return line


@pytest.fixture(scope="module")
def hf_dir(pretrained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    export.main(["--model", str(pretrained), "--to", "hf", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def heldout_texts() -> list[str]:
    return pq.read_table(ROOT / "data" / "corpus" / "heldout.parquet", columns=["text"]).column("text").to_pylist()


def random_model(tmp_path: Path, tie: bool, n_expert: int = 0) -> Path:
    """A small random nanozh model directory (GQA, the shipped tokenizer), norms away from 1; with
    n_expert, a top-2 mixture of experts whose router is large enough that tokens really choose."""
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=Tokenizer(TOKENIZER).vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                                    n_embd=64, block_size=64, tie_embeddings=tie, rope_theta=500000.0,
                                    n_expert=n_expert, n_expert_active=2, ffn_hidden=96 if n_expert else 0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            elif "router" in name:  # init_std's router gives every expert about 1/E: near-ties
                p.normal_(0.0, 0.5)
    out = tmp_path / f"model_tie{int(tie)}{f'_moe{n_expert}' if n_expert else ''}"
    model.save(out)
    shutil.copyfile(TOKENIZER, out / "tokenizer.model")
    return out


# ----------------------------------------------------------------------------------------------
# nanozh -> transformers

def test_transformers_gives_nanozh_logits_and_greedy_text(pretrained, hf_dir, heldout_texts):
    ours, tok = load(pretrained)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()  # no trust_remote_code
    assert type(theirs).__name__ == "LlamaForCausalLM" and theirs.dtype == torch.float32
    torch.manual_seed(0)
    real = torch.tensor([tok.encode(heldout_texts[0])[:256]])
    for idx in (torch.randint(0, tok.vocab_size, (2, 256)), real):
        with torch.no_grad():
            a, _ = ours(idx, idx)
            b = theirs(idx).logits
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4
    prompt = torch.tensor([tok.prompt_ids("话说天下大势，", raw=True)])
    mine = ours.generate(prompt, 32, temperature=0, stop_ids=[tok.im_end_id, tok.eos_id])
    hf = theirs.generate(prompt, max_new_tokens=32, do_sample=False)
    assert mine.shape[1] == prompt.shape[1] + 32 and torch.equal(mine, hf)


def test_moe_exports_as_mixtral_with_nanozh_logits_and_greedy_text(tmp_path, capsys, heldout_texts):
    model = random_model(tmp_path, tie=False, n_expert=4)
    summary = export_main(["--model", str(model), "--to", "hf", "--out", str(tmp_path / "hf")], capsys)
    assert "MixtralForCausalLM directory (float32)" in summary
    ours, tok = load(model)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no trust_remote_code
    assert type(theirs).__name__ == "MixtralForCausalLM" and theirs.config.num_experts_per_tok == 2
    # the router logits of each layer, to see below that every expert gets tokens (so a misnamed or
    # swapped expert would show in the logits)
    routed = []
    for block in ours.blocks:
        block.mlp.router.register_forward_hook(lambda mod, inp, out: routed.append(out.topk(2, dim=-1).indices))
    torch.manual_seed(0)
    for idx in (torch.randint(0, tok.vocab_size, (2, 64)), torch.tensor([tok.encode(heldout_texts[0])[:64]])):
        with torch.no_grad():
            a, _ = ours(idx, idx)
            b = theirs(idx).logits
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4
    assert [chosen.unique().tolist() for chosen in routed] == [[0, 1, 2, 3]] * 4  # 2 inputs x 2 layers
    prompt = torch.tensor([tok.prompt_ids("话说天下大势，", raw=True)])
    mine = ours.generate(prompt, 32, temperature=0)
    hf = theirs.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None)
    assert mine.shape[1] == prompt.shape[1] + 32 and torch.equal(mine, hf)


def test_transformers_chat_template_gives_render_chat_ids(hf_dir):
    tok, theirs = Tokenizer(TOKENIZER), AutoTokenizer.from_pretrained(hf_dir)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            got = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)
            assert list(got["input_ids"]) == tok.render_chat(messages, add_generation_prompt=gen)[0]


def test_transformers_tokenizer_encodes_and_decodes_like_ours(hf_dir, heldout_texts):
    tok, theirs = Tokenizer(TOKENIZER), AutoTokenizer.from_pretrained(hf_dir)
    assert theirs.encode("你好") == tok.encode("你好")  # no BOS added
    for text in TRICKY + heldout_texts:  # all 173 held-out documents, 150k characters
        ids = tok.encode(text)
        assert theirs.encode(text, split_special_tokens=True) == ids
        assert theirs.decode(ids, skip_special_tokens=True) == tok.decode(ids) == text


def test_nanozh_to_hf_to_nanozh_is_bit_exact(pretrained, hf_dir, tmp_path, capsys):
    summary = export_main(["--from", "hf", "--model", str(hf_dir), "--out", str(tmp_path / "back")], capsys)
    assert "nanozh model directory" in summary
    a, b = load_model(pretrained), load_model(tmp_path / "back")
    assert a.config == b.config  # the tiny preset's vocabulary (16000) needs no padding rows
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()


def test_hf_export_in_bfloat16(pretrained, tmp_path, capsys):
    summary = export_main(["--model", str(pretrained), "--to", "hf", "--out", str(tmp_path / "bf16"), "--dtype",
                           "bfloat16"], capsys)
    assert "(bfloat16)" in summary
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    ours = export.hf_state_dict(load_model(pretrained))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").state_dict()
    for name, t in ours.items():
        assert theirs[name].dtype == torch.bfloat16 and torch.equal(theirs[name], t.bfloat16()), name


# ----------------------------------------------------------------------------------------------
# transformers -> nanozh

def llama_dir(tmp_path: Path, **overrides) -> tuple[Path, LlamaForCausalLM]:
    """A random transformers Llama (GQA, untied head, a width nanozh would not pick) saved with our
    tokenizer; weights drawn wider than the default init so that logits are far from zero."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=50000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.2) if p.dim() == 1 else p.normal_(0.0, 0.1)
    out = tmp_path / "llama"
    model.save_pretrained(out)
    shutil.copyfile(TOKENIZER, out / "tokenizer.model")
    if overrides:
        raw = json.loads((out / "config.json").read_text())
        raw.update(overrides)
        (out / "config.json").write_text(json.dumps(raw))
    return out, model


def test_import_transformers_llama_gives_its_logits(tmp_path, capsys, heldout_texts):
    src, theirs = llama_dir(tmp_path)
    export_main(["--from", "hf", "--model", str(src), "--out", str(tmp_path / "imported")], capsys)
    ours, tok = load(tmp_path / "imported")
    assert (ours.config.n_kv_head, ours.config.hidden_size, ours.config.tie_embeddings) == (2, 160, False)
    assert ours.config.rope_theta == 50000.0 and ours.config.block_size == 128
    torch.manual_seed(0)
    for idx in (torch.randint(0, 16000, (2, 128)), torch.tensor([tok.encode(heldout_texts[1])[:128]])):
        with torch.no_grad():
            a, _ = ours(idx, idx)
            b = theirs(idx).logits
        assert b.abs().max() > 1 and (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("overrides, key", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_parameters"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "head_dim"),
    ({"model_type": "mistral"}, "model_type"),
    ({"vocab_size": 32000}, "vocab_size"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_import_refuses_what_nanozh_cannot_represent(tmp_path, capsys, overrides, key):
    src, _ = llama_dir(tmp_path, **overrides)
    err = user_error(["--from", "hf", "--model", str(src), "--out", str(tmp_path / "out")], capsys)
    assert f"{key}=" in err and "config.json" in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["llama"]


def test_import_refuses_missing_or_foreign_files(tmp_path, capsys):
    src, _ = llama_dir(tmp_path)
    (src / "tokenizer.model").unlink()
    assert "tokenizer.model: missing" in user_error(["--from", "hf", "--model", str(src), "--out", str(tmp_path / "o")], capsys)
    (src / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert "not a valid sentencepiece model" in user_error(["--from", "hf", "--model", str(src), "--out", str(tmp_path / "o")], capsys)
    shutil.copyfile(TOKENIZER, src / "tokenizer.model")
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(raw, intermediate_size=192)))
    assert "mlp.gate_up.weight has shape (320, 64) but config.json implies (384, 64)" in user_error(
        ["--from", "hf", "--model", str(src), "--out", str(tmp_path / "o")], capsys)
    (src / "model.safetensors").write_bytes(b"\x00" * 10)
    assert "cannot be read" in user_error(["--from", "hf", "--model", str(src), "--out", str(tmp_path / "o")], capsys)
    (src / "model.safetensors").unlink()
    assert "no model.safetensors" in user_error(["--from", "hf", "--model", str(src), "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_export_refuses_bad_arguments_and_unrepresentable_models(tmp_path, capsys, monkeypatch):
    model = random_model(tmp_path, tie=True)
    (tmp_path / "taken").mkdir()
    for argv, what in [
        (["--to", "hf", "--out", str(tmp_path / "taken")], "already exists"),
        (["--to", "hf", "--out", str(tmp_path / "x"), "--dtype", "q8_0"], "is not a hf dtype"),
        (["--to", "gguf", "--out", str(tmp_path / "x.gguf"), "--dtype", "bfloat16"], "is not a gguf dtype"),
        (["--to", "gguf", "--out", str(tmp_path / "x.bin")], "should end in .gguf"),
    ]:
        assert what in user_error(["--model", str(model)] + argv, capsys)
    assert "model directory not found" in user_error(["--model", str(tmp_path / "nope"), "--to", "hf", "--out",
                                                      str(tmp_path / "x")], capsys)
    # weights a Llama has no place for (LoRA adapters not merged) are refused, not dropped
    with_lora = lora.add_adapters(load_model(model), lora.Adapter(4, 8.0, 0.0, ["qkv"], str(model), ""))
    with pytest.raises(export.NanozhError, match=r"cannot hold: \['blocks.0.attn.qkv.lora_A'.*export.py --merge"):
        export.hf_state_dict(with_lora)
    # a ModelConfig setting that a Llama cannot hold is refused, not dropped: a mixture of experts...
    moe = tmp_path / "moe"
    Transformer(ModelConfig(vocab_size=16000, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, n_expert=2)).save(moe)
    shutil.copyfile(TOKENIZER, moe / "tokenizer.model")
    assert "n_expert=2 has no equivalent in a Llama" in user_error(["--model", str(moe), "--to", "gguf", "--out",
                                                                   str(tmp_path / "moe.gguf")], capsys)
    # ...shared experts, which Mixtral lacks (routed ones export to hf, above)...
    shared = tmp_path / "shared"
    Transformer(ModelConfig(vocab_size=16000, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, n_expert=2,
                            n_shared_expert=1)).save(shared)
    shutil.copyfile(TOKENIZER, shared / "tokenizer.model")
    assert "n_shared_expert=1 has no equivalent in a Mixtral" in user_error(["--model", str(shared), "--to", "hf",
                                                                           "--out", str(tmp_path / "x")], capsys)
    # ...and any field added to ModelConfig after export.py (here a made-up one)
    Extended = dataclasses.make_dataclass("Extended", [("sliding_window", int, 0)], bases=(ModelConfig,))
    monkeypatch.setattr(export, "ModelConfig", Extended)
    with pytest.raises(export.NanozhError, match=r"sliding_window=8 has no equivalent in a Llama checkpoint"):
        export.check_exportable(Extended(vocab_size=100, sliding_window=8), "config.json", "hf")
    export.check_exportable(Extended(vocab_size=100), "config.json", "hf")  # at its default it changes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_tie1", "moe", "shared", "taken"]


# ----------------------------------------------------------------------------------------------
# nanozh -> GGUF

def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type, [int(n) for n in t.shape], t.data) for t in reader.tensors}
    return meta, tensors


def test_gguf_has_llama_cpp_metadata_and_the_permuted_f32_weights(tmp_path, capsys):
    model_dir = random_model(tmp_path, tie=False)
    summary = export_main(["--model", str(model_dir), "--to", "gguf", "--out", str(tmp_path / "m.gguf")], capsys)
    assert "GGUF file (f32)" in summary
    meta, tensors = read_gguf(tmp_path / "m.gguf")
    model, tok = load(model_dir)
    c, sp = model.config, tok.sp
    assert meta == {
        "general.architecture": "llama", "general.name": "nanozh", "general.file_type": 0,
        "llama.context_length": 64, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": c.hidden_size, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16, "llama.attention.value_length": 16,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": 500000.0,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5), "llama.vocab_size": 16000,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(16000)],
        "tokenizer.ggml.scores": [pytest.approx(sp.get_score(i)) for i in range(16000)],
        "tokenizer.ggml.token_type": [2, 3, 3, 3, 3, 3] + [6] * 256 + [1] * (16000 - 262),
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.eot_token_id": 5, "tokenizer.ggml.padding_token_id": 3,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False, "tokenizer.chat_template": export.chat_template(escape=False),
    }
    hf = export.hf_state_dict(model)
    expected = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
                "output.weight": hf["lm_head.weight"]}
    for i in range(2):
        layer = lambda n: hf[f"model.layers.{i}.{n}.weight"]
        expected.update({
            f"blk.{i}.attn_norm.weight": layer("input_layernorm"), f"blk.{i}.ffn_norm.weight": layer("post_attention_layernorm"),
            f"blk.{i}.attn_q.weight": export.permute_for_llama_cpp(layer("self_attn.q_proj"), 4),
            f"blk.{i}.attn_k.weight": export.permute_for_llama_cpp(layer("self_attn.k_proj"), 2),
            f"blk.{i}.attn_v.weight": layer("self_attn.v_proj"), f"blk.{i}.attn_output.weight": layer("self_attn.o_proj"),
            f"blk.{i}.ffn_gate.weight": layer("mlp.gate_proj"), f"blk.{i}.ffn_up.weight": layer("mlp.up_proj"),
            f"blk.{i}.ffn_down.weight": layer("mlp.down_proj")})
    assert tensors.keys() == expected.keys()
    for name, (qtype, shape, data) in tensors.items():
        want = expected[name].numpy()
        assert qtype == gguf.GGMLQuantizationType.F32 and shape == list(want.shape[::-1]), name  # ggml lists dims inner first
        assert np.array_equal(data, want), name


@pytest.mark.parametrize("dtype, qtype", [("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)])
def test_gguf_f16_and_q8_0_weights_are_within_their_rounding(tmp_path, capsys, dtype, qtype):
    model_dir = random_model(tmp_path, tie=True)
    export_main(["--model", str(model_dir), "--to", "gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", dtype], capsys)
    meta, tensors = read_gguf(tmp_path / "m.gguf")
    assert meta["general.file_type"] == {"f16": 1, "q8_0": 7}[dtype] and "output.weight" not in tensors  # tied
    expected = export.gguf_tensors(load_model(model_dir))
    for name, (got_type, shape, data) in tensors.items():
        want = expected[name].numpy()
        got = gguf.quants.dequantize(data, got_type).reshape(want.shape)
        if want.ndim == 1:
            assert got_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), name
            continue
        assert got_type == qtype, name
        if dtype == "f16":
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        else:  # a block of 32 is int8 * d, d = max |w| / 127 stored in f16 (relative error <= 2^-11):
            # off by at most half a step, plus 127 times d's own rounding
            d = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            err = np.abs(got - want).reshape(-1, 32)
            assert (err <= d * (0.5 + 127 / 2048) + 1e-8).all() and err.max() > 0, name


def test_llama_cpp_permutation_is_the_rope_convention_change_and_exactly_invertible():
    torch.manual_seed(0)
    n_head, D, n_embd, T = 4, 16, 64, 10
    w = torch.randn(n_head * D, n_embd)
    p = export.permute_for_llama_cpp(w, n_head)
    assert not torch.equal(p, w) and torch.equal(export.unpermute_from_llama_cpp(p, n_head), w)
    # our RoPE (pairs x[i], x[i + D/2]) on w's output == llama.cpp's (pairs x[2i], x[2i+1]) on p's,
    # up to the same reordering of each head's dimensions: so q.k, all attention sees, is identical
    from model import apply_rope, rope_tables
    cos, sin = rope_tables(D, T, 10000.0)
    x = torch.randn(T, n_embd)
    ours = apply_rope((x @ w.T).view(T, n_head, D).transpose(0, 1), cos, sin)  # (H, T, D)
    q = (x @ p.T).view(T, n_head, D).transpose(0, 1)
    even, odd = q[..., 0::2], q[..., 1::2]
    theirs = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    assert torch.allclose(export.unpermute_from_llama_cpp(theirs.transpose(0, 1).reshape(T, -1).T, n_head).T,
                          ours.transpose(0, 1).reshape(T, -1), atol=1e-5)
    assert torch.allclose(theirs @ theirs.transpose(1, 2), ours @ ours.transpose(1, 2), atol=1e-4)
