"""Specification of the mixture-of-experts variant (model.MoE): routing, the router losses and how
they reach the gradients, sizes, generation, and a real training run that resumes bit for bit."""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import train_pretrain
import trainer
from conftest import assert_same_state
from errors import NanozhError
from model import MLP, ModelConfig, MoE, Transformer

ROOT = Path(__file__).resolve().parent.parent


def moe_config(**overrides) -> ModelConfig:
    settings = dict(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=32, block_size=64,
                    n_expert=4, n_expert_active=2)
    return ModelConfig(**{**settings, **overrides})


def moe_layer(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(moe_config(**overrides))
    for p in layer.parameters():  # larger than init so that experts and routes clearly differ
        torch.nn.init.normal_(p, 0.0, 0.5)
    return layer


def test_one_expert_with_top_1_equals_the_dense_mlp_with_the_same_weights():
    torch.manual_seed(0)
    dense = MLP(moe_config())
    moe = MoE(moe_config(n_expert=1, n_expert_active=1))
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 5, 32)
    assert torch.equal(moe.eval()(x), dense(x))
    assert torch.equal(moe.train()(x), dense(x))  # the router losses change no value


def test_output_is_the_weighted_sum_of_each_tokens_k_experts_with_weights_summing_to_1():
    moe = moe_layer(n_expert=6, n_expert_active=3, n_shared_expert=1).eval()
    x = torch.randn(2, 7, 32)
    _, chosen, weights = moe.route(x.view(-1, 32))
    assert chosen.shape == (14, 3) and all(len(set(row)) == 3 for row in chosen.tolist())  # k distinct experts
    torch.testing.assert_close(weights.sum(-1), torch.ones(14))
    assert (weights > 0).all()
    expected = torch.stack([moe.shared(t) + sum(w * moe.experts[e](t) for e, w in zip(es, ws))
                            for t, es, ws in zip(x.view(-1, 32), chosen.tolist(), weights)])
    torch.testing.assert_close(moe(x).view(-1, 32), expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_chosen_experts_and_unchosen_ones_get_zeros():
    moe = moe_layer(n_expert=8, n_expert_active=2).train()
    x = torch.randn(1, 2, 32)
    _, chosen, _ = moe.route(x.view(-1, 32))
    used = set(chosen.flatten().tolist())
    assert len(used) < 8
    moe(x).sum().backward()
    for e, expert in enumerate(moe.experts):
        for p in expert.parameters():
            assert p.grad is not None  # zeros, not missing: DDP expects a gradient for every parameter
            assert (p.grad.abs().sum() > 0) == (e in used), e


def aux_by_hand(x: torch.Tensor, router: torch.Tensor, E: int, k: int) -> torch.Tensor:
    """Switch's E * sum_e f_e * P_e, one token at a time."""
    probs = [torch.softmax(router @ t, dim=0) for t in x]
    f = torch.zeros(E)
    for p in probs:
        for e in sorted(range(E), key=lambda e: -p[e])[:k]:
            f[e] += 1 / (len(x) * k)
    return E * sum(f[e] * sum(p[e] for p in probs) / len(x) for e in range(E))


def moe_input_of(model: Transformer) -> list[torch.Tensor]:
    """The input rows of each forward of the first block's MoE, kept as they are (with their graph)."""
    seen = []
    model.blocks[0].mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].reshape(-1, 32)))
    return seen


def test_aux_loss_equals_its_hand_computed_value_and_is_1_for_a_uniform_router():
    torch.manual_seed(0)
    model = Transformer(moe_config(n_layer=1)).train()
    router = torch.randn(4, 32)
    model.blocks[0].mlp.router.weight.data.copy_(router)
    seen = moe_input_of(model)
    idx = torch.randint(0, 100, (2, 9))
    model(idx, idx)
    torch.testing.assert_close(model.router_stats()["aux_loss"], aux_by_hand(seen[0].detach(), router, 4, 2))
    model.blocks[0].mlp.router.weight.data.zero_()  # every expert equally likely: the minimum, 1
    model(idx, idx)
    stats = model.router_stats()
    assert stats["aux_loss"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["expert_frac"].sum().item() == pytest.approx(1.0)
    assert model.router_stats() == {}  # read once, then reset
    model.eval()
    model(idx, idx)
    assert model.router_stats() == {}  # evaluation and generation leave no router statistics


def test_router_losses_reach_the_gradients_as_if_added_to_the_loss_times_the_scale():
    """RouterLoss adds coef * aux + z_coef * z (over n_layer) to whatever loss is backpropagated,
    scaled like it: by set_router_loss_scale (the trainer's 1 / grad_accum and fp16 loss scale)."""
    torch.manual_seed(0)
    config = moe_config(n_layer=1, router_aux_coef=0.5, router_z_coef=0.1)
    model = Transformer(config).train()
    idx = torch.randint(0, 100, (2, 9))

    def grads(scale: float) -> list[torch.Tensor]:
        model.zero_grad()
        model.set_router_loss_scale(scale)
        _, loss = model(idx, idx)
        (scale * loss).backward()
        return [p.grad.clone() for p in model.parameters()]

    injected, scaled = grads(1.0), grads(0.25)
    reference = Transformer(moe_config(n_layer=1, router_aux_coef=0.0, router_z_coef=0.0)).train()
    reference.load_state_dict(model.state_dict())
    seen = moe_input_of(reference)
    _, loss = reference(idx, idx)
    logits = reference.blocks[0].mlp.router(seen[0])
    aux = aux_by_hand(seen[0], reference.blocks[0].mlp.router.weight, 4, 2)
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    (loss + 0.5 * aux + 0.1 * z).backward()
    for a, b, p in zip(injected, scaled, reference.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b, 0.25 * p.grad, rtol=1e-5, atol=1e-7)


def test_greedy_generation_with_the_kv_cache_equals_without_and_the_full_forward():
    torch.manual_seed(0)
    model = Transformer(moe_config(init_std=0.5, n_shared_expert=1)).eval()
    idx = torch.randint(0, 100, (1, 5))
    with_cache = model.generate(idx, 40, temperature=0)
    assert torch.equal(with_cache, model.generate(idx, 40, temperature=0, use_cache=False))
    full, _ = model(with_cache, torch.zeros_like(with_cache))
    assert torch.equal(full[0, 4:-1].argmax(-1), with_cache[0, 5:])


def test_sizes_count_active_parameters_and_the_moe_tiny_preset_matches_tiny():
    def preset(name: str) -> Transformer:
        settings = json.loads((ROOT / "configs" / f"{name}.json").read_text())["model"]
        with torch.device("meta"):
            return Transformer(ModelConfig.from_dict({**settings, "vocab_size": 16000}))

    dense, moe = preset("tiny"), preset("moe-tiny")
    router = 4 * 128 * 4  # n_layer x n_embd x n_expert
    assert moe.param_counts()["active"] == dense.param_counts()["total"] + router
    assert moe.param_counts()["total"] == moe.num_params() > moe.param_counts()["active"]
    assert moe.flops_per_token(256) == dense.flops_per_token(256) + 6 * router


@pytest.mark.parametrize("bad", [{"n_expert_active": 5}, {"n_expert_active": 0}, {"n_expert": 0, "n_shared_expert": 1},
                                 {"router_aux_coef": -1.0}])
def test_an_impossible_expert_setting_is_a_one_line_error(bad):
    with pytest.raises(NanozhError, match=r"^nanozh: x: .*(n_expert|router)") as e:
        ModelConfig.from_dict({**moe_config().to_dict(), **bad}, where="x")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# training for real: the tiny MoE learns, logs its routers, and resumes bit for bit

RUN = ["--model.n_layer=2", "--model.n_embd=32", "--model.n_head=2", "--model.n_kv_head=1", "--model.block_size=64",
       "--model.n_expert=4", "--model.n_expert_active=2", "--model.ffn_hidden=32", "--model.router_z_coef=0.001",
       "--batch_size=2", "--grad_accum=2", "--max_steps=8", "--lr=1e-2", "--warmup_steps=2", "--log_every=1",
       "--eval_every=8", "--save_every=4", "--eval_tokens=2048", "--device=cpu", "--dtype=float32"]


def train(shards: Path, out_dir: Path, *flags: str) -> list[dict]:
    saved, threads = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}, torch.get_num_threads()
    torch.set_num_threads(1)  # runs compared bit for bit must split their matmuls the same way
    try:
        train_pretrain.train(trainer.parse_config(train_pretrain.PretrainConfig,
                                                  [*RUN, f"--data={shards}", f"--out_dir={out_dir}", *flags]))
    finally:
        torch.set_num_threads(threads)
        for s, handler in saved.items():
            signal.signal(s, handler)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_tiny_moe_trains_logs_its_routers_and_resumes_bit_exact(pretrain_shards, tmp_path):
    straight = train(pretrain_shards, tmp_path / "straight")
    val = [r["val_loss"] for r in straight if "val_loss" in r]
    assert val[-1] < val[0] - 0.2
    steps = [r for r in straight if "loss" in r]
    assert len(steps) == 8
    for r in steps:
        assert r["aux_loss"] >= 0.99 and r["z_loss"] > 0 and 1.0 <= r["expert_load"] <= 2.0
        assert len(r["expert_frac"]) == 2 and all(sum(layer) == pytest.approx(1.0) for layer in r["expert_frac"])

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed, symlinks=True)
    shutil.rmtree(resumed / "step_0000008")
    os.remove(resumed / "latest")
    os.symlink("step_0000004", resumed / "latest")
    again = train(pretrain_shards, resumed, "--resume")
    timing = ("tok_s", "mfu", "mem_gib", "ms")
    after_4 = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records if r["step"] > 4]
    assert after_4(again) == after_4(straight)  # losses, router losses and tokens per expert, bit for bit
    assert_same_state(resumed / "latest", tmp_path / "straight" / "latest")
