"""Specification of model.py: the decoder's maths, generation with and without the KV cache, sizes,
and model directories (save/load and the errors a broken one gives)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from errors import NanozhError
from model import ModelConfig, RMSNorm, Transformer, apply_rope, load_model, rope_tables


def small_config(**overrides) -> ModelConfig:
    settings = dict(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128)
    return ModelConfig(**{**settings, **overrides})


def small_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config(**overrides)).to(dtype).eval()


def sharp_model(**overrides) -> Transformer:
    """Generation tests need a model whose choices depend on the whole context: at the usual
    init_std a random model repeats one token forever whatever its positions or cache do."""
    return small_model(init_std=0.5, **overrides)


def tokens(B: int, T: int, seed: int = 1, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def full_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    logits, _ = model(idx, torch.zeros_like(idx))
    return logits


# ---------------------------------------------------------------------------------------------
# the decoder's maths

def test_changing_a_later_token_leaves_earlier_logits_unchanged():
    model = small_model()
    idx = tokens(2, 16)
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 100
    a, b = full_logits(model, idx), full_logits(model, changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = small_model(dtype=torch.float64, n_head=4, n_kv_head=2)
    mha = small_model(dtype=torch.float64, n_head=4, n_kv_head=4)
    state = gqa.state_dict()
    H, Hkv, D, C = 4, 2, 16, 64
    for i in range(2):
        w = state[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([H * D, Hkv * D, Hkv * D])
        # query head h reads kv head h // (H // Hkv): repeat each kv head's rows for its group
        repeat = lambda m: m.view(Hkv, D, C).repeat_interleave(H // Hkv, dim=0).reshape(H * D, C)
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, repeat(k), repeat(v)])
    mha.load_state_dict(state)
    idx = tokens(2, 20)
    torch.testing.assert_close(full_logits(gqa, idx), full_logits(mha, idx), rtol=1e-10, atol=1e-10)


def test_sdpa_and_naive_agree_in_forward_and_gradients():
    results = []
    for impl in ("sdpa", "naive"):
        model = small_model(dtype=torch.float64, attn_impl=impl).train()
        idx = tokens(2, 24)
        logits, loss = model(idx, tokens(2, 24, seed=2))
        loss.backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (logits_a, grads_a), (logits_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-10, atol=1e-10)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-12)


def test_rope_scores_depend_only_on_the_relative_offset():
    cos, sin = rope_tables(head_dim=16, length=64, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])

    for shift in (1, 7, 40):
        torch.testing.assert_close(score(10 + shift, 3 + shift), score(10, 3), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(10, 3), score(10, 4))


def test_logits_cover_only_the_real_vocab_and_equal_logits_are_uniform_over_it():
    model = small_model(vocab_size=100)  # 128 embedding rows
    assert model.tok_emb.weight.shape[0] == 128
    torch.nn.init.zeros_(model.tok_emb.weight)  # tied: every logit is 0
    idx = tokens(2, 8)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 100)
    torch.testing.assert_close(loss, torch.tensor(math.log(100)))


def test_without_targets_only_the_last_position_is_computed():
    model = small_model()
    idx = tokens(2, 12)
    last, loss = model(idx)
    assert last.shape == (2, 1, 100) and loss is None
    torch.testing.assert_close(last[:, 0], full_logits(model, idx)[:, -1])


def test_per_token_loss_is_zero_where_ignored_and_averages_to_the_mean_loss():
    model = small_model()
    idx, targets = tokens(2, 10), tokens(2, 10, seed=3)
    targets[0, :4] = -1
    _, mean = model(idx, targets)
    _, per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 10)
    assert torch.all(per_token[0, :4] == 0) and torch.all(per_token[targets != -1] > 0)
    torch.testing.assert_close(per_token.sum() / (targets != -1).sum(), mean)


def test_rmsnorm_matches_torchs_rms_norm():
    norm = RMSNorm(64, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, eps=1e-5))


def test_rope_tables_stay_fp32_when_the_weights_are_cast():
    model = small_model().to(torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert model.rope_cos.dtype == torch.float32
    cos, _ = rope_tables(model.config.head_dim, model.config.block_size, model.config.rope_theta)
    assert torch.equal(model.rope_cos, cos)
    assert "rope_cos" not in model.state_dict()


# ---------------------------------------------------------------------------------------------
# generation

def test_greedy_with_kv_cache_equals_greedy_without_for_64_tokens():
    model = sharp_model()
    prompt = tokens(1, 7)
    cached = model.generate(prompt, 64, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 64, temperature=0, use_cache=False)
    assert cached.shape == (1, 71)
    assert cached.tolist() == uncached.tolist()


def test_batched_equal_length_prompts_match_one_at_a_time():
    model = sharp_model()
    prompts = tokens(3, 5)
    batched = model.generate(prompts, 20, temperature=0)
    for row in range(3):
        assert batched[row].tolist() == model.generate(prompts[row:row + 1], 20, temperature=0)[0].tolist()


def test_sampling_with_the_same_seed_is_reproducible():
    model = sharp_model()
    prompt = tokens(2, 4)
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2)
    a = model.generate(prompt, 30, seed=5, **kwargs)
    b = model.generate(prompt, 30, seed=5, **kwargs)
    c = model.generate(prompt, 30, seed=6, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generation_stops_once_every_row_has_produced_a_stop_id():
    model = sharp_model()
    prompts = tokens(2, 4)
    free = model.generate(prompts, 30, temperature=0)[:, 4:].tolist()
    stop_ids = [free[0][3], free[1][8]]  # each row produces one of them, at step 3 / 8 or earlier
    stops_at = [min(row.index(s) for s in stop_ids if s in row) for row in free]
    out = model.generate(prompts, 30, temperature=0, stop_ids=stop_ids)[:, 4:]
    assert out.shape[1] == max(stops_at) + 1
    for row, at in enumerate(stops_at):
        assert out[row, :at + 1].tolist() == free[row][:at + 1]
        assert torch.all(out[row, at:] == free[row][at])  # a finished row repeats its stop id


def test_generation_stops_when_the_context_is_full():
    model = sharp_model(block_size=16)
    out = model.generate(tokens(1, 10), 50, temperature=0)
    assert out.shape == (1, 16)


def test_a_prompt_longer_than_the_context_is_a_one_line_error():
    model = sharp_model(block_size=16)
    with pytest.raises(NanozhError, match="prompt is 17 tokens but the model's context is 16") as e:
        model.generate(tokens(1, 17), 5)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# sizes

@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_the_analytic_formula(tied):
    cfg = small_config(vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=0, tie_embeddings=tied)
    model = Transformer(cfg)
    V, C, L, D = 128, 64, 3, 16  # padded vocab
    ffn = 192  # 8/3 * 64 = 170.7, rounded up to a multiple of 64
    attention = C * (4 + 2 * 2) * D + 4 * D * C
    mlp = 3 * C * ffn
    norms = 2 * C * L + C
    expected = V * C * (1 if tied else 2) + L * (attention + mlp) + norms
    assert model.num_params() == expected
    counts = model.param_counts()
    assert counts["total"] == expected
    assert counts["attention"] == L * attention and counts["mlp"] == L * mlp and counts["norms"] == norms
    assert counts["head"] == (0 if tied else V * C)


def test_flops_per_token_counts_matmuls_including_the_head_and_the_attention_term():
    model = small_model(tie_embeddings=True)
    c = model.param_counts()
    matmul_params = c["attention"] + c["mlp"] + 128 * 64
    assert model.flops_per_token(100) == 6 * matmul_params + 12 * 2 * 64 * 100


# ---------------------------------------------------------------------------------------------
# model directories

def test_tied_embeddings_share_one_tensor_and_stay_tied_after_load(tmp_path):
    model = small_model(tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    model.save(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    assert loaded.num_params() == model.num_params()


@pytest.mark.parametrize("tied", [True, False])
def test_save_then_load_is_bit_exact(tmp_path, tied):
    model = small_model(tie_embeddings=tied)
    model.save(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    idx = tokens(2, 10)
    assert torch.equal(full_logits(model, idx), full_logits(loaded.eval(), idx))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(small_config(vocab_size=64, n_layer=2, n_embd=64, block_size=32))
    idx = tokens(4, 33, vocab=64)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1


def assert_one_line_error(model_dir, *fragments):
    with pytest.raises(NanozhError) as e:
        load_model(model_dir)
    message = str(e.value)
    assert message.startswith("nanozh: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_missing_directory_or_file_is_a_one_line_error(tmp_path):
    assert_one_line_error(tmp_path / "nope", "nope", "not found")
    small_model().save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    assert_one_line_error(tmp_path, "model.safetensors", "missing")
    (tmp_path / "config.json").unlink()
    assert_one_line_error(tmp_path, "config.json", "missing")


def test_a_config_that_does_not_match_the_weights_is_a_one_line_error(tmp_path):
    small_model().save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 128}))
    assert_one_line_error(tmp_path, "model.safetensors", "shape")
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    assert_one_line_error(tmp_path, "model.safetensors", "missing", "blocks.2")


def test_an_unknown_key_or_mistyped_config_is_a_one_line_error_naming_it(tmp_path):
    small_model().save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    assert_one_line_error(tmp_path, "config.json", "'n_layers'")
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": "2"}))
    assert_one_line_error(tmp_path, "config.json", "'n_layer' should be int")
    (tmp_path / "config.json").write_text("{not json")
    assert_one_line_error(tmp_path, "config.json", "not valid JSON")


def test_a_truncated_or_corrupted_weights_file_is_a_one_line_error(tmp_path):
    small_model().save(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(tmp_path, "model.safetensors", "truncated or corrupted")
    weights.write_bytes(b"\xff" * 64)
    assert_one_line_error(tmp_path, "model.safetensors", "truncated or corrupted")
