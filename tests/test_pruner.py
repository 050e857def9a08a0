"""The seed's drop-in API: ImageTokenPruner, TokenPruner, the model's pruning controls and
telemetry (computed only when read)."""

import math

import pytest
import torch
from safetensors.torch import load_file

from pi05_fastprune import reference as R
from pi05_fastprune.pruner import TELEMETRY_KEYS, ImageTokenPruner, TokenPruner
from pi05_fastprune.structured import structured_inputs

D = 64


def inputs(batch=2, seed=0, absent=((1, 2),)):
    return structured_inputs(
        batch=batch, n_cameras=3, patches_per_camera=32, prompt_len=16, valid_prompt=9, width=D,
        seed=seed, absent_cameras=absent,
    )


def test_eval_prunes_and_returns_mask():
    patches, task, task_mask, patch_mask = inputs()
    pruner = ImageTokenPruner(hidden_size=D).eval()
    pruned, mask = pruner.prune(patches, task, task_token_mask=task_mask, patch_token_mask=patch_mask)
    ref = R.prune_ref(patches, task, task_mask, patch_mask)
    assert torch.equal(pruned, ref.pruned) and torch.equal(mask, ref.kept_mask)
    core = pruner.core
    assert torch.equal(core.last_kept_per_sample, ref.counts)
    assert torch.equal(pruner.last_kept_per_sample(), ref.counts)
    assert torch.equal(core.last_kept_indices_padded, ref.kept_idx)
    assert torch.equal(core.last_kept_indices_mask, ref.kept_mask)
    assert core.last_selected_indices_train is None and core.last_kept_per_sample_noisy is None
    # The absent camera (sample 1, camera 2) contributes nothing.
    assert not (core.last_kept_indices_padded[1][mask[1]] >= 64).any()


@pytest.mark.parametrize("setting", [("tokens", 5), ("ratio", 0.1), ("tokens", 200)])
def test_eval_fixed_budget(setting):
    patches, task, task_mask, patch_mask = inputs()
    pruner = ImageTokenPruner(hidden_size=D).eval()
    kind, value = setting
    (pruner.set_keep_tokens if kind == "tokens" else pruner.set_keep_ratio)(value)
    k = value if kind == "tokens" else math.ceil(value * 96)
    _, mask = pruner.prune(patches, task, task_token_mask=task_mask, patch_token_mask=patch_mask)
    n_valid = patch_mask.sum(-1)
    assert torch.equal(mask.sum(-1), torch.clamp(n_valid, max=k))
    ref = R.prune_ref(patches, task, task_mask, patch_mask, keep_tokens=min(k, 96))
    assert torch.equal(pruner.core.last_kept_indices_padded, ref.kept_idx)


@pytest.mark.parametrize("keep_tokens", [5, 200])
def test_eval_per_call_budget_overrides_the_setting(keep_tokens):
    """prune(keep_tokens=k) (what a compiled caller passes, traced) wins over set_keep_tokens /
    set_keep_ratio for that call, clipped to N as they are; the setting stays."""
    patches, task, task_mask, patch_mask = inputs()
    pruner = ImageTokenPruner(hidden_size=D).eval()
    pruner.set_keep_ratio(0.5)
    _, mask = pruner.prune(patches, task, task_token_mask=task_mask, patch_token_mask=patch_mask,
                           keep_tokens=keep_tokens)
    ref = R.prune_ref(patches, task, task_mask, patch_mask, keep_tokens=min(keep_tokens, 96))
    assert torch.equal(mask, ref.kept_mask) and torch.equal(pruner.core.last_kept_indices_padded, ref.kept_idx)
    _, mask = pruner.prune(patches, task, task_token_mask=task_mask, patch_token_mask=patch_mask)
    assert torch.equal(mask.sum(-1), torch.clamp(patch_mask.sum(-1), max=48))


def test_eval_ignores_masked_task_tokens():
    patches, task, task_mask, patch_mask = inputs()
    pruner = ImageTokenPruner(hidden_size=D).eval()
    a, _ = pruner.prune(patches, task, task_token_mask=task_mask, patch_token_mask=patch_mask)
    junk = task.clone()
    junk[~task_mask] = 1e3 * torch.randn_like(junk[~task_mask])
    b, _ = pruner.prune(patches, junk, task_token_mask=task_mask, patch_token_mask=patch_mask)
    assert torch.equal(a, b)


def test_settings_validate():
    pruner = ImageTokenPruner(hidden_size=D)
    with pytest.raises(ValueError, match="keep_tokens must be >= 1, got 0"):
        pruner.set_keep_tokens(0)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 1.5"):
        pruner.set_keep_ratio(1.5)
    pruner.set_noise_scale(0.5)
    assert pruner.noise_scale == 0.5


def test_train_keeps_shape_records_indices_and_is_differentiable():
    patches, task, task_mask, patch_mask = inputs()
    patches.requires_grad_(True)
    task.requires_grad_(True)
    pruner = ImageTokenPruner(hidden_size=D).train()
    pruner.set_noise_scale(1.0)
    out, mask = pruner.prune(patches, task, task_token_mask=task_mask, patch_token_mask=patch_mask)
    assert out.shape == patches.shape and torch.equal(mask, patch_mask)
    idx = pruner.core.last_selected_indices_train
    assert idx.shape == patch_mask.shape
    # Forward value: each row is a copy of the selected valid patch.
    assert torch.equal(out.detach(), patches.detach().gather(1, idx[..., None].expand(-1, -1, D)))
    assert patch_mask.gather(1, idx).all()
    out.square().sum().backward()
    assert patches.grad.abs().sum() > 0 and task.grad.abs().sum() > 0
    assert pruner.core.last_kept_indices_padded is None


def test_telemetry_of_a_prefix_whose_patches_and_tokens_are_all_alike():
    """Known values, independent of the formulas' code: with every patch alike and every prompt
    token alike, every score ties (gap 0, every row votes for patch 0), every spread is 0 and
    every pair of queries points the same way."""
    N, T = 12, 5
    patches = torch.randn(1, 1, D).expand(1, N, D).contiguous()
    task = torch.randn(1, 1, D).expand(1, T, D).contiguous()
    pruner = ImageTokenPruner(hidden_size=D).eval()
    pruner.prune(patches, task)
    core = pruner.core
    assert core.last_argmax_union_det.tolist() == [1] and core.last_argmax_top1_share_det.tolist() == [1.0]
    assert core.last_kept_per_sample.tolist() == [1]
    assert core.last_score_top1_gap_mean_det.tolist() == [0.0]
    for name in ("last_patches_std_mean", "last_task_std_mean", "last_queries_before_norm_std_mean",
                 "last_queries_after_norm_std_mean"):
        assert getattr(core, name).abs().max() < 1e-6, name
    for name in ("last_queries_before_norm_cosine_sim", "last_queries_after_norm_cosine_sim"):
        assert torch.allclose(getattr(core, name), torch.ones(1), atol=1e-5), name
    # The query points along the prompt token, and an RMS-normalised row has norm sqrt(D):
    # |score| = |rms(q) . rms(p)| / sqrt(D) = sqrt(D) |cos(token, patch)|.
    p, t = patches[0, 0], task[0, 0]
    cos = torch.dot(p, t) / (p.norm() * t.norm())
    assert torch.allclose(core.last_score_abs_max_det, (cos.abs() * math.sqrt(D)).reshape(1), rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")  # std() of empty rows says so; the values are right
def test_telemetry_of_an_empty_batch():
    pruner = ImageTokenPruner(hidden_size=D).eval()
    task_mask = torch.ones(0, 5, dtype=torch.bool)
    out, mask = pruner.prune(torch.randn(0, 12, D), torch.randn(0, 5, D), task_token_mask=task_mask)
    assert out.shape == (0, 1, D) and mask.shape == (0, 1)
    for name in TELEMETRY_KEYS:
        value = getattr(pruner.core, name)
        assert value is None or value.shape == (0,), name


def test_telemetry_is_lazy_and_matches_the_seed_formulas():
    patches, task, task_mask, patch_mask = inputs(batch=2)
    pruner = ImageTokenPruner(hidden_size=D).train()
    pruner.set_noise_scale(0.7)
    pruner.prune(patches, task, task_token_mask=task_mask, patch_token_mask=patch_mask)
    core = pruner.core
    assert core._cache == {}  # nothing computed during the call
    # Deterministic selection statistics, from the float32 reference score.
    score = R.scores(patches, task, task_mask, patch_mask)
    det = score.argmax(-1)
    votes = R.votes_from_idx(det)
    assert torch.equal(core.last_argmax_union_det, (votes > 0).sum(-1).int())
    assert torch.allclose(core.last_argmax_top1_share_det, votes.max(-1).values.float() / 96)
    assert torch.equal(core.last_kept_per_sample, ((votes > 0) & patch_mask).sum(-1))
    noisy_votes = R.votes_from_idx(core.last_selected_indices_train)
    assert torch.equal(core.last_argmax_union_noisy, (noisy_votes > 0).sum(-1).int())
    assert torch.equal(core.last_kept_per_sample_noisy, ((noisy_votes > 0) & patch_mask).sum(-1))
    assert torch.equal(core.last_task_valid_len, task_mask.sum(-1))
    assert torch.equal(core.last_task_attn_masked_len, (~task_mask).sum(-1))
    assert torch.allclose(core.last_argmax_top1_share_noisy, noisy_votes.max(-1).values.float() / 96)

    # Embedding spread: per sample, the std over tokens (valid prompt tokens only) of each
    # RMS-normalised feature, averaged over features.
    def spread(x):
        return x.std(0).mean()

    p, t = R.rms(patches), R.rms(task)
    assert torch.allclose(core.last_patches_std_mean, torch.stack([spread(p[b]) for b in range(2)]))
    assert torch.allclose(core.last_task_std_mean, torch.stack([spread(t[b][task_mask[b]]) for b in range(2)]))
    q = R.attend(p, t, task_mask)
    assert torch.allclose(core.last_queries_before_norm_std_mean, torch.stack([spread(q[b]) for b in range(2)]))
    qn = R.rms(q)
    assert torch.allclose(core.last_queries_after_norm_std_mean, torch.stack([spread(qn[b]) for b in range(2)]))

    # Query direction: the pairwise cosine without an N x N matrix equals the explicit one.
    def explicit_cosine(x):
        u = x / (x.norm(dim=-1, keepdim=True) + 1e-8)
        sim = u @ u.transpose(1, 2)
        off = ~torch.eye(96, dtype=torch.bool)
        return torch.stack([sim[b][off].mean() for b in range(2)])

    assert torch.allclose(core.last_queries_before_norm_cosine_sim, explicit_cosine(q), atol=1e-5)
    assert torch.allclose(core.last_queries_after_norm_cosine_sim, explicit_cosine(qn), atol=1e-5)
    finite = torch.stack([score[b][torch.isfinite(score[b])].abs().max() for b in range(2)])
    assert torch.equal(core.last_score_abs_max_det, finite)
    top2 = score.topk(2, dim=-1).values
    assert torch.allclose(core.last_score_top1_gap_mean_det, (top2[..., 0] - top2[..., 1]).mean(-1))
    assert set(TELEMETRY_KEYS) == {
        "last_task_valid_len", "last_task_attn_masked_len", "last_argmax_union_det", "last_argmax_union_noisy",
        "last_argmax_top1_share_det", "last_argmax_top1_share_noisy", "last_patches_std_mean", "last_task_std_mean",
        "last_queries_before_norm_std_mean", "last_queries_after_norm_std_mean",
        "last_queries_before_norm_cosine_sim", "last_queries_after_norm_cosine_sim", "last_score_abs_max_det",
        "last_score_top1_gap_mean_det",
    }  # every key is checked above
    # Under a budget, training reports what eval would keep with it (the seed's hard mask).
    pruner.set_keep_tokens(12)
    pruner.prune(patches, task, task_token_mask=task_mask, patch_token_mask=patch_mask)
    assert pruner.core.last_kept_per_sample.tolist() == pruner.core.last_kept_per_sample_noisy.tolist() == [12, 12]


def test_seed_vectors_through_the_pruner(data_dir):
    io = load_file(str(data_dir / "io.safetensors"))
    pruner = ImageTokenPruner(hidden_size=64).eval()
    for variant, keep in (("implicit", None), ("keep12", 12)):
        pruner.set_keep_tokens(keep)
        pruned, mask = pruner.prune(
            io["lightvla.in.image_patches"], io["lightvla.in.task_tokens"],
            task_token_mask=io["lightvla.in.task_token_mask"], patch_token_mask=io["lightvla.in.patch_token_mask"],
        )
        assert torch.equal(pruned, io[f"lightvla.{variant}.pruned_patches"])
        assert torch.equal(mask, io[f"lightvla.{variant}.kept_mask"])
        assert torch.equal(pruner.core.last_kept_indices_padded, io[f"lightvla.{variant}.kept_indices"])
        assert torch.equal(pruner.core.last_kept_per_sample, io[f"lightvla.{variant}.kept_counts"])


def _sequence(batch=2, n_cls=1, seed=0):
    patches, task, task_mask, _ = inputs(batch=batch, seed=seed, absent=())
    cls = torch.randn(batch, n_cls, D)
    tokens = torch.cat([cls, patches, task], dim=1)
    pos = torch.arange(tokens.shape[1])[None].expand(batch, -1)
    mask = torch.cat([torch.ones(batch, n_cls + 96, dtype=torch.bool), task_mask], dim=1)
    return tokens, pos, mask, patches, task


def test_token_pruner_eval_shortens_sequence():
    tokens, pos, mask, patches, task = _sequence()
    pruner = TokenPruner(hidden_size=D, num_patches=96).eval()
    out, out_pos, out_mask = pruner(tokens, pos, mask, cls_token_count=1)
    ref = R.prune_ref(patches, task)  # LightVLA scores against every task token
    K = ref.pruned.shape[1]
    assert out.shape == (2, 1 + K + 16, D)
    assert torch.equal(out[:, 1 : 1 + K], ref.pruned)
    assert torch.equal(out_pos[:, 1 : 1 + K], torch.where(ref.kept_mask, ref.kept_idx + 1, 0))
    assert torch.equal(out_mask[:, 1 : 1 + K], ref.kept_mask)
    assert torch.equal(out[:, 1 + K :], tokens[:, 1 + 96 :]) and torch.equal(out_pos[:, 1 + K :], pos[:, 1 + 96 :])
    # Without an input mask the padding rows are still marked.
    _, _, implicit_mask = pruner(tokens, pos, None)
    assert torch.equal(implicit_mask[:, 1 : 1 + K], ref.kept_mask)


def test_token_pruner_train_keeps_sequence_length():
    tokens, pos, mask, _, _ = _sequence()
    tokens.requires_grad_(True)
    pruner = TokenPruner(hidden_size=D, num_patches=96).train()
    pruner.set_noise_scale(0.5)
    out, out_pos, out_mask = pruner(tokens, pos, mask)
    assert out.shape == tokens.shape
    idx = pruner.core.last_selected_indices_train
    assert torch.equal(out_pos[:, 1:97], idx + 1)
    out.sum().backward()
    assert tokens.grad is not None


def test_token_pruner_train_telemetry_reads_its_input_patches():
    """Training replaces the patch block by the selected rows; the telemetry describes the
    patches that came in, as in eval."""
    tokens, pos, mask, patches, task = _sequence()
    trained = TokenPruner(hidden_size=D, num_patches=96).train()
    trained.set_noise_scale(0.5)
    trained(tokens, pos, mask)
    evaluated = TokenPruner(hidden_size=D, num_patches=96).eval()
    evaluated(tokens, pos, mask)
    for key in ("last_patches_std_mean", "last_argmax_union_det", "last_score_abs_max_det"):
        assert torch.equal(getattr(trained.core, key), getattr(evaluated.core, key)), key
    det = R.votes_from_idx(R.select_ref(patches, task))
    assert torch.equal(trained.core.last_argmax_union_det, (det > 0).sum(-1).to(torch.int32))


def test_token_pruner_rejects_short_sequences():
    with pytest.raises(ValueError, match="cannot hold 1 cls tokens, 96 patches"):
        TokenPruner(hidden_size=D, num_patches=96)(torch.randn(1, 97, D), torch.arange(97)[None])
