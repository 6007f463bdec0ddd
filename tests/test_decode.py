"""Specification of model.py's inference weight layout: the column-major Linear weights model.load
gives a model on the CPU (faster one-row matmuls, see inference_layout) hold the same values, keep
the tied head tied, give the plain model's greedy tokens, and save back the same tensors. And of
compile_for_generation: compiled once, the model decodes a prompt of any length (from 2 tokens, as
every prompt sample.py makes) without compiling again, and gives the eager model's greedy tokens
(its one-row products compiled as loops of their own, model.linear); a mixture-of-experts model is
refused in one line."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from errors import NanozhError
from model import ModelConfig, Transformer, compile_for_generation, inference_layout, linear, load, load_model


def sharp_model() -> Transformer:
    """init_std 0.5: at the usual 0.02 a random model repeats one token whatever the numerics do."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128, init_std=0.5)
    return Transformer(config).eval()


def linear_weights(model: Transformer) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_inference_layout_keeps_values_and_ties_and_gives_the_same_greedy_tokens():
    plain = sharp_model()
    fast = inference_layout(copy.deepcopy(plain))
    for w, p in zip(linear_weights(fast), linear_weights(plain)):
        assert w.shape == p.shape and w.stride() == (1, p.shape[0]) and torch.equal(w, p)
    assert fast.lm_head.weight is fast.tok_emb.weight
    prompt = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fast(prompt)[0], plain(prompt)[0], rtol=1e-5, atol=1e-5)
    want = plain.generate(prompt, 48, temperature=0)
    assert fast.generate(prompt, 48, temperature=0).tolist() == want.tolist()
    assert fast.generate(prompt, 48, temperature=0, use_cache=False).tolist() == want.tolist()


def test_load_lays_out_for_inference_and_saves_back_the_same_tensors(init_model, tmp_path):
    model, _ = load(init_model)
    assert all(w.stride() == (1, w.shape[0]) for w in linear_weights(model))
    model.save(tmp_path / "again")
    again = load_model(tmp_path / "again").state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(again[name], tensor), name


def test_compiled_for_generation_decodes_any_prompt_length_without_compiling_again():
    eager = inference_layout(sharp_model())
    compiled = compile_for_generation(copy.deepcopy(eager))  # compiles now, on its own short prompts
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1  # it did compile
    rng = torch.Generator().manual_seed(2)
    for length in (5, 17, 40):  # lengths it was not compiled on: none may stall a chat to compile
        prompt = torch.randint(0, 100, (1, length), generator=rng)
        assert compiled.generate(prompt, 24, temperature=0).tolist() == eager.generate(prompt, 24, temperature=0).tolist()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_a_compiled_one_row_product_is_a_loop_of_its_own_with_the_values_of_f_linear():
    # where compile_for_generation's decode speed on the CPU comes from (model.linear): one row
    # times a weight must compile to inductor's own loop, not to a call of MKL's matrix kernel
    weight = torch.randn(96, 64)
    for rows, extern_mm in ((1, False), (3, True)):
        x = torch.randn(1, rows, 64)
        out, code = run_and_get_code(torch.compile(linear, dynamic=False), x, weight)
        torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
        assert ("extern_kernels.mm(" in "".join(code)) == extern_mm, code


def test_a_mixture_of_experts_model_is_not_compiled_for_generation():
    # its routing gives each expert a data-dependent number of tokens: torch would compile again at
    # almost every step and, past its limit, run eagerly without a word; refused in one line instead
    config = ModelConfig(vocab_size=100, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, block_size=32,
                         n_expert=4, n_expert_active=2, ffn_hidden=48)
    with pytest.raises(NanozhError, match="mixture-of-experts model is not compiled"):
        compile_for_generation(Transformer(config).eval())
