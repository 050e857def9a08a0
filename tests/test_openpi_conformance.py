"""Our Pi05 against the vectors written by openpi's own PI0Pytorch (tests/data/openpi).

The tiny float32 model (config.json) is loaded from openpi's model.safetensors with inferred
dimensions; every stored intermediate of ``sample_actions(num_steps=3)`` must match.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import last_kept
from pi05_fastprune.model import IMAGE_KEYS, Pi05

DATA = Path(__file__).parent / "data" / "openpi"
# config.json's suggested float32 tolerances (our errors here: about 1e-6).
ATOL = 1e-5
KV_ATOL = 5e-5


@pytest.fixture(scope="module")
def io():
    return load_file(str(DATA / "io.safetensors"))


@pytest.fixture(scope="module")
def model():
    return Pi05.from_openpi(str(DATA / "model.safetensors"))


def _inputs(io):
    images = [io[f"in.image.{k}"] for k in IMAGE_KEYS]
    masks = [io[f"in.image_mask.{k}"] for k in IMAGE_KEYS]
    return images, masks, io["in.lang_tokens"], io["in.lang_masks"]


@pytest.fixture(scope="module")
def run(model, io):
    debug = {}
    actions = model.sample_actions(*_inputs(io), noise=io["in.noise"].clone(), num_steps=3, debug=debug)
    return actions, debug


def _close(ours, theirs, atol=ATOL):
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    err = (ours.double() - theirs.double()).abs().max().item()
    assert err <= atol, f"max |diff| {err:.3g} > {atol}"


def test_inferred_config(model):
    cfg = model.config
    assert cfg.dtype == "float32" and cfg.vocab_size == 1024 and cfg.action_dim == 32
    assert tuple(cfg.vision) == (32, 2, 4, 64, 14, 224)
    assert tuple(cfg.llm) == tuple(cfg.expert) == (64, 4, 128, 8, 1, 16)
    assert not model.training


def test_embed_prefix(model, io):
    with torch.no_grad():
        embs, pad, att, pos = model.embed_prefix(*_inputs(io))
    _close(embs, io["upstream.embed_prefix.embs"])
    assert torch.equal(pad, io["upstream.embed_prefix.pad_masks"])
    assert torch.equal(att, io["upstream.embed_prefix.att_masks"])
    assert torch.equal(pos, io["upstream.prefix_position_ids"])


def test_prefix_kv_cache(run, io):
    _, debug = run
    pad = debug["prefix"][1]
    valid = pad[:, None, :, None]  # [B, 1, L, 1]
    cache = debug["prefix_kv_cache"]
    assert len(cache) == 4
    for i, (k, v) in enumerate(cache):
        _close(k * valid, io[f"upstream.debug.prefix_kv_cache.layer{i}.key"] * valid, KV_ATOL)
        _close(v * valid, io[f"upstream.debug.prefix_kv_cache.layer{i}.value"] * valid, KV_ATOL)


@pytest.mark.parametrize("name", ["x_t", "timestep", "v_t", "adarms_cond", "suffix_embs"])
def test_denoise_steps(run, io, name):
    _, debug = run
    steps = debug["steps"]
    assert len(steps) == 3
    for i, step in enumerate(steps):
        _close(step[name], io[f"upstream.debug.step_{name}"][i])
    if name == "timestep":  # float32 accumulation, bitwise
        assert torch.equal(torch.stack([s["timestep"] for s in steps]), io["upstream.debug.step_timestep"])


def test_actions(run, io):
    actions, _ = run
    assert actions.dtype == torch.float32
    _close(actions, io["upstream.actions"])


@pytest.mark.parametrize("variant,keep", [("implicit", None), ("keep12", 12)])
def test_pruning_hook_sees_the_seed_inputs(model, io, variant, keep):
    """With pruning on, the hook hands the pruner exactly the seed's inputs (prefix image
    block, scaled prompt embeddings, prompt and camera masks): its selection equals the
    seed's recorded one (``keep12`` and implicit mode have no ties at the cut)."""
    cfg = model.config
    old = (cfg.token_pruning_enabled, cfg.token_prune_keep_tokens)
    cfg.token_pruning_enabled, cfg.token_prune_keep_tokens = True, keep
    try:
        with torch.no_grad():
            embs, pad, _, pos = model.embed_prefix(*_inputs(io))
    finally:
        cfg.token_pruning_enabled, cfg.token_prune_keep_tokens = old
    kept = last_kept(model)
    assert torch.equal(kept.counts, io[f"lightvla.{variant}.kept_counts"])
    assert torch.equal(kept.kept_mask, io[f"lightvla.{variant}.kept_mask"])
    assert torch.equal(kept.kept_idx, io[f"lightvla.{variant}.kept_indices"])
    K = kept.kept_idx.shape[1]
    # The kept rows are copies of the unpruned prefix's image rows; those match the seed's to
    # the prefix tolerance (SigLIP's fp32 matmuls round differently across CPUs, a few ulps).
    with torch.no_grad():
        full = model.embed_prefix(*_inputs(io))[0]
    rows = torch.gather(full[:, :768], 1, kept.kept_idx[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.equal(embs[:, :K][kept.kept_mask], rows[kept.kept_mask])
    _close(embs[:, :K], io[f"lightvla.{variant}.pruned_patches"])
    assert torch.equal(pad[:, :K], kept.kept_mask)
    full_pos = io["upstream.prefix_position_ids"]
    assert torch.equal(pos[:, :K], torch.gather(full_pos[:, :768], 1, kept.kept_idx))
    assert torch.equal(pos[:, K:], full_pos[:, 768:])
