"""openpi checkpoint layout: names, shapes and dtypes; strict load/save round trips."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pi05_fastprune.model import Pi05, Pi05Config
from pi05_fastprune.openpi_checkpoint import (
    CheckpointMismatchError,
    infer_config,
    openpi_names,
    openpi_state_dict,
)

DATA = Path(__file__).parent / "data" / "openpi"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _inputs(cfg: Pi05Config, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    images = [torch.rand(batch, 3, s, s, generator=g) * 2 - 1 for _ in range(cfg.num_cameras)]
    masks = [torch.ones(batch, dtype=torch.bool) for _ in range(cfg.num_cameras)]
    masks[-1][-1] = False
    images[-1][-1] = 0
    tokens = torch.randint(1, cfg.vocab_size, (batch, 12), generator=g)
    lang = torch.arange(12)[None, :] < torch.tensor([5, 12][:batch])[:, None]
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=g)
    return images, masks, tokens.masked_fill(~lang, 0), lang, noise


def test_full_size_layout_matches_openpi():
    """Full-size pi05 (gemma_2b + gemma_300m, bfloat16) on the meta device: our mapping gives
    exactly openpi's 812 names, shapes and in-memory dtypes."""
    spec = json.loads((DATA / "pi05_state_dict.json").read_text())
    model = Pi05(Pi05Config(), device="meta")
    ours = {name: (list(t.shape), _DTYPES[t.dtype]) for name, t in openpi_state_dict(model).items()}
    theirs = {t["name"]: (t["shape"], t["dtype"]) for t in spec["tensors"]}
    assert set(ours) == set(theirs)
    assert ours == theirs
    assert len(ours) == spec["num_tensors"] == 812
    assert sum(t.numel() for t in model.state_dict().values()) == spec["total_params"]


def test_inferred_full_size_config():
    spec = json.loads((DATA / "pi05_state_dict.json").read_text())
    shapes = {t["name"]: tuple(t["shape"]) for t in spec["tensors"]}
    dtypes = {t["name"]: t["dtype"] for t in spec["tensors"]}
    cfg = infer_config(shapes, dtypes)
    ref = Pi05Config()
    assert (cfg.vision, cfg.llm, cfg.expert, cfg.vocab_size, cfg.dtype) == (
        ref.vision, ref.llm, ref.expert, ref.vocab_size, ref.dtype,
    )
    assert (cfg.paligemma_variant, cfg.action_expert_variant) == ("gemma_2b", "gemma_300m")


def test_dummy_layout_matches_openpi_file():
    """Pi05Config.dummy() is the conformance model: same names, shapes and dtypes as the file
    openpi wrote."""
    model = Pi05(Pi05Config.dummy(), device="meta")
    ours = {k: (tuple(t.shape), t.dtype) for k, t in openpi_state_dict(model).items()}
    theirs = {k: (tuple(t.shape), t.dtype) for k, t in load_file(str(DATA / "model.safetensors")).items()}
    assert ours == theirs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bitwise(tmp_path, dtype):
    cfg = Pi05Config.dummy(dtype=dtype, action_horizon=4)
    model = Pi05(cfg, seed=3).eval()
    path = tmp_path / "model.safetensors"
    model.save_openpi(str(path))
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(openpi_names(model).values())
        assert f.metadata()["paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"] == (
            "paligemma_with_expert.paligemma.lm_head.weight"
        )
    loaded = Pi05.from_openpi(str(path))
    assert loaded.config == cfg
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    images, masks, tokens, lang, noise = _inputs(cfg)
    a = model.sample_actions(images, masks, tokens, lang, noise=noise, num_steps=2)
    b = loaded.sample_actions(images, masks, tokens, lang, noise=noise, num_steps=2)
    assert torch.equal(a, b)


def test_load_casts_to_requested_dtype():
    model = Pi05.from_openpi(str(DATA / "model.safetensors"), dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    assert model.llm.blocks[0].q.weight.dtype == torch.bfloat16
    assert model.llm.blocks[0].attn_norm.weight.dtype == torch.float32
    assert model.expert.blocks[0].attn_norm.dense.weight.dtype == torch.float32
    assert model.vision.patch_embed.weight.dtype == torch.float32
    assert model.vision.blocks[0].norm1.weight.dtype == torch.bfloat16
    assert model.action_in.weight.dtype == torch.float32


def _write_modified(tmp_path, edit):
    tensors = load_file(str(DATA / "model.safetensors"))
    edit(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    return str(path)


def test_wrong_shape_is_named(tmp_path):
    key = "paligemma_with_expert.gemma_expert.model.layers.2.mlp.up_proj.weight"

    def edit(t):
        t[key] = torch.zeros(100, 64)

    path = _write_modified(tmp_path, edit)
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape.*layers\.2\.mlp\.up_proj\.weight.*\[100, 64\]"):
        Pi05.from_openpi(path, config=Pi05Config.dummy())


def test_missing_key_is_named(tmp_path):
    key = "paligemma_with_expert.gemma_expert.model.norm.dense.bias"
    path = _write_modified(tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing from the file: .*gemma_expert\.model\.norm\.dense\.bias"):
        Pi05.from_openpi(path, config=Pi05Config.dummy())
    with pytest.raises(CheckpointMismatchError, match="missing"):  # inferred config, same error
        Pi05.from_openpi(path)


def test_extra_key_is_named(tmp_path):
    def edit(t):
        t["paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"] = torch.zeros(1024, 64)

    path = _write_modified(tmp_path, edit)
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected in the file: .*language_model\.embed_tokens\.weight"):
        Pi05.from_openpi(path)


def test_wrong_config_is_named():
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        Pi05.from_openpi(str(DATA / "model.safetensors"), config=Pi05Config.dummy(vocab_size=2048))
