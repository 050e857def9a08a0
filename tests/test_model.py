"""Model properties at dummy size on CPU: the pruning invariant, batch independence,
absent cameras, the training paths.

The pruning invariant: removing image tokens (eval pruning) must give the same actions as the
unpruned model in which exactly those tokens are masked out of attention, every position id
unchanged.
"""

import dataclasses
import math

import pytest
import torch

from conftest import last_kept
from pi05_fastprune.model import Pi05, Pi05Config, euler_timesteps

# Dummy LLM/expert, tiny SigLIP at 112 px: 64 tokens per camera, N = 192 image tokens.
CFG = Pi05Config.dummy(vision_image_size=112, action_horizon=4)
N = CFG.num_image_tokens
P = CFG.vision.num_patches
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def model(request):
    return Pi05(CFG, seed=0).to(request.param).eval()


@pytest.fixture(scope="module")
def model32():
    return Pi05(CFG, seed=0).eval()


def configure(model, **fields):
    model.config = dataclasses.replace(CFG, **fields)
    return model


def make_inputs(batch=2, seed=0, absent=((1, 2),), lang_lens=(5, 11), dtype=torch.float32):
    """Random images in [-1, 1]; ``absent`` lists (sample, camera) pairs that are missing
    (zero image, mask False); prompts of ``lang_lens`` valid tokens padded to 12."""
    g = torch.Generator().manual_seed(seed)
    s = CFG.vision.image_size
    images = [torch.rand(batch, 3, s, s, generator=g, dtype=dtype) * 2 - 1 for _ in range(CFG.num_cameras)]
    masks = [torch.ones(batch, dtype=torch.bool) for _ in range(CFG.num_cameras)]
    for b, c in absent:
        if b < batch:
            images[c][b] = 0
            masks[c][b] = False
    lang = torch.arange(12)[None, :] < torch.tensor(lang_lens[:batch])[:, None]
    tokens = torch.randint(1, CFG.vocab_size, (batch, 12), generator=g).masked_fill(~lang, 0)
    noise = torch.randn(batch, CFG.action_horizon, CFG.action_dim, generator=g, dtype=dtype)
    return (images, masks, tokens, lang), noise


def take(inputs, noise, idx):
    images, masks, tokens, lang = inputs
    return ([im[idx] for im in images], [m[idx] for m in masks], tokens[idx], lang[idx]), noise[idx]


def _inputs_for(model, **kw):
    dtype = next(model.parameters()).dtype
    return make_inputs(dtype=dtype, **kw)


def masked_unpruned_actions(model, inputs, kept, noise, steps=2):
    """Actions of the unpruned model with every image token the pruner dropped masked out."""
    configure(model, token_pruning_enabled=False)
    with torch.no_grad():
        embs, pad, att, pos = model.embed_prefix(*inputs)
    B = embs.shape[0]
    keep = torch.zeros(B, N, dtype=torch.int64).scatter_add(1, kept.kept_idx, kept.kept_mask.long()) > 0
    pad = pad.clone()
    pad[:, :N] &= keep
    return model.sample_actions_from_prefix((embs, pad, att, pos), noise=noise, num_steps=steps)


@pytest.mark.parametrize("budget", [None, 40, 150], ids=["implicit", "keep40", "keep150"])
def test_pruned_equals_masked_unpruned(model, budget):
    inputs, noise = _inputs_for(model)
    configure(model, token_pruning_enabled=True, token_prune_keep_tokens=budget)
    pruned = model.sample_actions(*inputs, noise=noise, num_steps=2)
    kept = last_kept(model)
    assert kept.kept_idx.shape[1] < N
    if budget == 150:  # sample 1 lacks a camera: 128 valid patches, all kept
        assert kept.counts.tolist() == [150, 128]
    expected = masked_unpruned_actions(model, inputs, kept, noise)
    err = (pruned - expected).abs().max().item()
    assert err <= TOL[pruned.dtype], err


def test_kept_counts_differ_within_batch(model32):
    inputs, _ = make_inputs()
    configure(model32, token_pruning_enabled=True)
    with torch.no_grad():
        embs, pad, _, _ = model32.embed_prefix(*inputs)
    kept = last_kept(model32)
    counts = kept.counts.tolist()
    assert counts[0] != counts[1], counts
    K = max(counts)
    assert embs.shape[1] == K + 12
    assert pad[:, :K].sum(1).tolist() == counts
    assert torch.equal(pad[:, :K], kept.kept_mask)


def test_full_budget_is_the_unpruned_model(model):
    """keep_tokens = N keeps every valid patch in its original order: same actions."""
    for absent in ((), ((1, 2),)):
        inputs, noise = _inputs_for(model, absent=absent)
        configure(model, token_pruning_enabled=False)
        ref = model.sample_actions(*inputs, noise=noise, num_steps=2)
        configure(model, token_pruning_enabled=True, token_prune_keep_tokens=N)
        out = model.sample_actions(*inputs, noise=noise, num_steps=2)
        assert torch.equal(out, ref), (out - ref).abs().max()


def test_prune_positions_unchanged(model32):
    inputs, _ = make_inputs()
    configure(model32, token_pruning_enabled=False)
    with torch.no_grad():
        _, pad_u, _, pos_u = model32.embed_prefix(*inputs)
        configure(model32, token_pruning_enabled=True, token_prune_keep_tokens=30)
        _, pad, _, pos = model32.embed_prefix(*inputs)
    kept = last_kept(model32)
    assert torch.equal(pos_u, torch.cumsum(pad_u, 1) - 1)
    K = kept.kept_idx.shape[1]
    assert torch.equal(pos[:, :K][kept.kept_mask], torch.gather(pos_u[:, :N], 1, kept.kept_idx)[kept.kept_mask])
    assert torch.equal(pos[:, K:], pos_u[:, N:])  # the prompt keeps its positions
    assert torch.equal(pad[:, K:], pad_u[:, N:])


@pytest.mark.parametrize("pruning", [False, True], ids=["unpruned", "pruned"])
def test_batch_independence(model, pruning):
    """Sample 0 alone gives the actions it gets next to sample 1 (which keeps a different
    number of tokens and lacks a camera)."""
    inputs, noise = _inputs_for(model)
    configure(model, token_pruning_enabled=pruning)
    both = model.sample_actions(*inputs, noise=noise, num_steps=2)
    one_inputs, one_noise = take(inputs, noise, slice(0, 1))
    alone = model.sample_actions(*one_inputs, noise=one_noise, num_steps=2)
    err = (both[:1] - alone).abs().max().item()
    assert err <= TOL[both.dtype], err
    one_inputs, one_noise = take(inputs, noise, slice(1, 2))
    alone = model.sample_actions(*one_inputs, noise=one_noise, num_steps=2)
    err = (both[1:] - alone).abs().max().item()
    assert err <= TOL[both.dtype], err


@pytest.mark.parametrize(
    "fields",
    [dict(token_pruning_enabled=False), dict(token_pruning_enabled=True, token_prune_mask_voters=True)],
    ids=["unpruned", "pruned-mask-voters"],
)
def test_absent_camera_content_is_ignored(model32, fields):
    """A camera with mask False contributes nothing: its image content cannot change the
    actions (pruned: when only valid patches vote, the SPEC's ``mask_voters`` option)."""
    inputs, noise = make_inputs()
    configure(model32, **fields)
    ref = model32.sample_actions(*inputs, noise=noise, num_steps=2)
    images, masks, tokens, lang = inputs
    images = [im.clone() for im in images]
    images[2][1] = torch.rand_like(images[2][1]) * 2 - 1
    out = model32.sample_actions(images, masks, tokens, lang, noise=noise, num_steps=2)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("budget", [None, 150])
def test_absent_camera_never_kept(model32, budget):
    inputs, _ = make_inputs()
    configure(model32, token_pruning_enabled=True, token_prune_keep_tokens=budget)
    with torch.no_grad():
        model32.embed_prefix(*inputs)
    kept = last_kept(model32)
    assert (kept.kept_idx[1][kept.kept_mask[1]] < 2 * P).all()


def test_all_cameras_absent(model32):
    inputs, noise = make_inputs(absent=[(b, c) for b in range(2) for c in range(3)])
    for pruning in (False, True):
        configure(model32, token_pruning_enabled=pruning)
        out = model32.sample_actions(*inputs, noise=noise, num_steps=2)
        assert torch.isfinite(out).all()
    assert last_kept(model32).counts.tolist() == [0, 0]


def test_static_cap_and_ratio(model32):
    inputs, _ = make_inputs()
    configure(model32, token_pruning_enabled=True, token_prune_max_tokens=7)
    with torch.no_grad():
        embs, pad, _, _ = model32.embed_prefix(*inputs)
    assert embs.shape[1] == 7 + 12 and last_kept(model32).counts.tolist() == [7, 7]
    configure(model32, token_pruning_enabled=True, token_prune_keep_ratio=0.25)
    with torch.no_grad():
        embs, _, _, _ = model32.embed_prefix(*inputs)
    assert last_kept(model32).counts.tolist() == [math.ceil(0.25 * N)] * 2
    configure(model32, token_pruning_enabled=True, token_prune_keep_ratio=0.25, token_prune_keep_tokens=3)
    with torch.no_grad():
        model32.embed_prefix(*inputs)
    assert last_kept(model32).counts.tolist() == [3, 3]  # keep_tokens wins, as in the seed
    model32.set_token_pruner_keep_ratio(0.5)  # the seed's setters leave each other alone
    with torch.no_grad():
        model32.embed_prefix(*inputs)
    assert last_kept(model32).counts.tolist() == [3, 3]
    model32.set_token_pruner_keep_tokens(None)
    with torch.no_grad():
        model32.embed_prefix(*inputs)
    assert last_kept(model32).counts.tolist() == [math.ceil(0.5 * N)] * 2


@pytest.mark.parametrize("pruning", [False, True], ids=["unpruned", "pruned"])
def test_training_loss_matches_cached_velocity(pruning):
    """The joint prefix+suffix pass of ``forward`` (training) and the cached expert step of
    inference compute the same velocity: loss == (noise - actions - v_t)^2."""
    model = Pi05(CFG, seed=1).to(torch.float64).eval()
    configure(model, token_pruning_enabled=pruning)
    inputs, noise = make_inputs(dtype=torch.float64)
    actions = torch.randn_like(noise)
    time = torch.tensor([0.3, 0.8], dtype=torch.float32)
    loss = model(*inputs, actions, noise=noise, time=time)
    assert loss.shape == actions.shape
    with torch.no_grad():
        embs, pad, att, pos = model.embed_prefix(*inputs)
        cache = model.prefix_kv_cache(embs, pad, att, pos)
        t = time.double()[:, None, None]
        x_t = t * noise + (1 - t) * actions
        v_t = model.denoise_step(cache, pad, pos, x_t, time)
    assert (loss - (noise - actions - v_t) ** 2).abs().max().item() < 1e-10


def test_training_embed_prefix_keeps_length_and_is_differentiable():
    model = Pi05(CFG, seed=2).train()
    configure(model, token_pruning_enabled=True, token_prune_noise_scale=0.5)
    inputs, noise = make_inputs()
    embs, pad, att, pos = model.embed_prefix(*inputs)
    assert embs.shape == (2, N + 12, CFG.llm.width) and pad.shape == pos.shape == (2, N + 12)
    src = model.token_pruner.core.last_selected_indices_train
    unpruned_pos = torch.cumsum(torch.cat([pad[:, :N], inputs[3]], 1), 1) - 1
    assert torch.equal(pos[:, :N], torch.gather(unpruned_pos[:, :N], 1, src))
    assert torch.equal(pos[:, N:], unpruned_pos[:, N:])
    (embs.square().mean()).backward()
    assert model.vision.patch_embed.weight.grad.abs().sum() > 0
    assert model.llm.embed.weight.grad.abs().sum() > 0  # through the pruner's soft scores too
    model.zero_grad()
    loss = model(*inputs, torch.randn_like(noise), noise=noise)
    assert torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.time_in.weight.grad.abs().sum() > 0


def test_euler_schedule():
    dt, times = euler_timesteps(3)
    assert len(times) == 3 and times[0] == 1.0
    dt, times = euler_timesteps(10)
    assert len(times) == 10 and abs(dt + 0.1) < 1e-7


def test_dummy_config_and_validation():
    cfg = Pi05Config.dummy()
    assert cfg.vision.num_patches == 256 and cfg.num_image_tokens == 768
    assert tuple(cfg.llm) == (64, 4, 128, 8, 1, 16) and tuple(cfg.expert) == (64, 4, 128, 8, 1, 16)
    full = Pi05Config()
    assert tuple(full.llm) == (2048, 18, 16384, 8, 1, 256) and tuple(full.expert) == (1024, 18, 4096, 8, 1, 256)
    assert tuple(full.vision) == (1152, 27, 16, 4304, 14, 224)
    with pytest.raises(ValueError, match="same heads"):
        Pi05(Pi05Config.dummy(expert_head_dim=32), device="meta")
    with pytest.raises(ValueError, match="dtype"):
        Pi05(Pi05Config.dummy(dtype="float16"), device="meta")


def test_sample_actions_is_one_graph(model32):
    """No host sync or data-dependent Python branch in the hot path: with the static cap
    (``token_prune_max_tokens``) the whole pruned ``sample_actions`` traces as one graph."""
    inputs, noise = make_inputs()
    for fields in (dict(token_pruning_enabled=False), dict(token_pruning_enabled=True, token_prune_max_tokens=48)):
        configure(model32, **fields)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model32.sample_actions)(*inputs, noise=noise, num_steps=2)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()


def test_seed_pruning_controls_and_stats():
    """The seed's runtime setters and ``get_token_pruning_stats`` (telemetry keys)."""
    model = Pi05(dataclasses.replace(CFG, token_pruning_enabled=True), seed=0).eval()
    assert model.token_pruning_enabled  # the seed model's attribute
    inputs, _ = make_inputs()
    model.set_token_pruner_keep_tokens(9)
    with torch.no_grad():
        model.embed_prefix(*inputs)
    stats = model.get_token_pruning_stats()
    assert stats["enabled"] and stats["keep_tokens"] == 9 and stats["noise_scale"] is None
    assert stats["last_kept_per_sample"] == [9, 9]
    assert stats["last_kept_overall_max"] == 9 and stats["last_before_tokens_per_image"] == [N]
    assert stats["last_kept_ratio_overall_mean"] == pytest.approx(9 / N)
    model.set_token_pruner_keep_ratio(0.75)
    assert model.config.token_prune_keep_tokens == 9  # as the seed's setters: keep_tokens stays, and wins
    model.set_token_pruner_keep_tokens(None)
    with torch.no_grad():
        model.embed_prefix(*inputs)
    assert last_kept(model).counts.tolist() == [math.ceil(0.75 * N), 2 * P]  # sample 1 lacks a camera
    model.set_token_pruner_keep_ratio(None)
    model.train()
    model.set_token_pruner_noise_scale(0.25)
    model.embed_prefix(*inputs)
    stats = model.get_token_pruning_stats()
    assert stats["noise_scale"] == 0.25
    for key in ("last_kept_per_sample_noisy", "last_argmax_union_noisy", "last_queries_after_norm_cosine_sim",
                "last_score_top1_gap_mean_det", "last_task_valid_len"):
        assert stats[key] is not None and len(stats[key]) == 2, key
    assert stats["last_task_valid_len"] == [5, 11]
    model.set_token_pruner_noise_scale(None)
    model.embed_prefix(*inputs)
    assert model.get_token_pruning_stats()["noise_scale"] == CFG.token_prune_noise_scale
    assert Pi05(CFG, seed=0).get_token_pruning_stats() == {"enabled": False}


def test_eval_pruning_trains_the_vision_tower_through_the_kept_patches():
    """Eval-mode (hard) pruning with gradients on: the kept image rows are the vision tower's
    rows, so a loss on the prefix reaches SigLIP and the projector through them alone (as
    through the seed's gather), equal to gathering the kept rows by hand."""
    model = Pi05(dataclasses.replace(CFG, token_pruning_enabled=True, token_prune_keep_tokens=20), seed=0).eval()
    inputs, _ = make_inputs(batch=2, seed=4)
    params = list(model.vision.parameters()) + list(model.projector.parameters())
    embs, pad, _, _ = model.embed_prefix(*inputs)
    kept = last_kept(model)
    K = kept.kept_idx.shape[1]
    weight = torch.randn(embs[:, :K].shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad((embs[:, :K] * weight).sum(), params)
    img_embs, _ = model.embed_images(inputs[0], inputs[1])
    rows = img_embs.gather(1, kept.kept_idx[..., None].expand(-1, -1, img_embs.shape[-1]))
    expect = torch.autograd.grad((rows * kept.kept_mask[..., None] * weight).sum(), params)
    for got, want in zip(grads, expect):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads)


def test_compiled_sample_actions_one_graph_across_kept_counts():
    """sample_actions with pruning on under torch.compile(fullgraph=True, dynamic=True): no
    graph break from pruning, one compiled entry for every kept count and batch size 2/3.
    (aot_eager keeps this CPU test fast; inductor lowers the same graph.)"""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    model = Pi05(dataclasses.replace(CFG, token_pruning_enabled=True), seed=0).eval()
    torch._dynamo.reset()
    model._sample_compiled = torch.compile(model._sample, backend="aot_eager", fullgraph=True, dynamic=True)
    kept = set()
    for seed in range(5):
        inputs, noise = make_inputs(batch=2 + seed % 2, seed=seed, lang_lens=(5, 11, 7))
        out = model.sample_actions(*inputs, noise=noise, num_steps=2)
        counts = last_kept(model).counts
        kept.add(tuple(counts.tolist()))
        eager = model.sample_actions(*inputs, noise=noise, num_steps=2, debug={})
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert len(kept) == 5
    assert len(_debug_get_cache_entry_list(model._sample.__func__.__code__)) == 1
    torch._dynamo.reset()


def test_compiled_sample_actions_one_graph_across_budgets():
    """A served model's budget changes at run time (set_token_pruner_keep_tokens /
    _keep_ratio): the compiled sample_actions takes it as a traced integer, so every budget
    value runs the one compiled graph (a budget read from the config inside the compiled
    region is a constant to dynamo: one compile per value, and fullgraph fails past its
    recompile limit of 8)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    model = Pi05(dataclasses.replace(CFG, token_pruning_enabled=True), seed=0).eval()
    torch._dynamo.reset()
    model._sample_compiled = torch.compile(model._sample, backend="aot_eager", fullgraph=True, dynamic=True)
    inputs, noise = make_inputs(batch=2, seed=3, absent=(), lang_lens=(5, 11))
    budgets = [("keep_tokens", k) for k in (2, 13, 55, N)] + [("keep_ratio", r) for r in (0.05, 0.3, 0.75)]
    for setting, value in budgets:
        if setting == "keep_ratio":
            model.set_token_pruner_keep_tokens(None)  # else keep_tokens wins, as in the seed
        getattr(model, f"set_token_pruner_{setting}")(value)
        out = model.sample_actions(*inputs, noise=noise, num_steps=2)
        k = value if setting == "keep_tokens" else math.ceil(value * N)
        assert last_kept(model).counts.tolist() == [k, k], (setting, value)
        eager = model.sample_actions(*inputs, noise=noise, num_steps=2, debug={})
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert len(_debug_get_cache_entry_list(model._sample.__func__.__code__)) == 1
    torch._dynamo.reset()


def test_compile_is_on_by_default(monkeypatch):
    monkeypatch.setenv("FASTPRUNE_TORCH_COMPILE", "1")
    compiled = Pi05(CFG, device="meta")
    assert compiled._sample_compiled != compiled._sample  # the torch.compile wrapper
    off = Pi05(dataclasses.replace(CFG, pytorch_compile_mode=None), device="meta")
    assert off._sample_compiled == off._sample
    off.set_compile_mode("default")
    assert off._sample_compiled != off._sample and off.config.pytorch_compile_mode == "default"
    compiled.set_compile_mode(None)
    assert compiled._sample_compiled == compiled._sample
    monkeypatch.setenv("FASTPRUNE_TORCH_COMPILE", "0")
    eager = Pi05(CFG, device="meta")
    assert eager._sample_compiled == eager._sample
