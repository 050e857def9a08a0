"""Real inputs: the pi0.5 prompt tokenizer, norm stats, camera preprocessing, Pi05Policy.

No downloads: a tiny sentencepiece model is trained in-process with PaliGemma's special ids
(pad 0, eos 1, bos 2, unk 3), identity normalization, no dummy prefix and byte fallback,
so that decoding gives back the exact prompt text.
"""

import json
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pi05_fastprune.model import Pi05, Pi05Config
from pi05_fastprune.normalize import (
    NormStats,
    find_norm_stats,
    load_norm_stats,
    normalize,
    pad_to_dim,
    save_norm_stats,
    unnormalize,
)
from pi05_fastprune.policy import Pi05Policy
from pi05_fastprune.preprocess import (
    IMAGE_KEYS,
    preprocess_cameras,
    preprocess_image,
    resize_with_pad,
    resize_with_pad_signed,
)
from pi05_fastprune.tokenizer import PaligemmaTokenizer, clean_prompt, discretize_state, format_prompt

spm = pytest.importorskip("sentencepiece")

@pytest.fixture(scope="module")
def sp(sp_model):
    return spm.SentencePieceProcessor(model_file=str(sp_model))


def openpi_bins(state):
    """openpi's expression, as the reference."""
    return np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------


def test_clean_prompt_keeps_case():
    assert clean_prompt("  Pick_up the\nRed block \n") == "Pick up the Red block"


def test_discretize_known_values():
    x = np.array([-1.5, -1.0, -0.99, -1e-9, 0.0, 0.5, 0.999, 1.0, 2.0])
    expected = [-1, 0, 1, 127, 128, 192, 255, 255, 255]
    assert discretize_state(x).tolist() == expected
    assert discretize_state(x.astype(np.float32)).tolist() == expected


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 40), elements=st.floats(-3, 3, width=32)))
def test_discretize_matches_openpi(state):
    np.testing.assert_array_equal(discretize_state(state), openpi_bins(state))


def test_format_prompt():
    s = format_prompt(" pick_up the\ncube ", np.array([-1.0, 0.0, 0.999, 5.0]))
    assert s == "Task: pick up the cube, State: 0 128 255 255;\nAction: "
    assert format_prompt("a_b\n") == "a b"


def test_tokenize_pi05_format(sp_model, sp):
    tok = PaligemmaTokenizer(sp_model, max_len=64)
    state = np.array([-0.2, 0.7, 1.3, -2.0])
    ids, mask = tok.tokenize("Pick_up the cube", state)
    expected = sp.encode("Task: Pick up the cube, State: 102 217 255 -1;\nAction: ", add_bos=True)
    n = len(expected)
    assert ids.shape == mask.shape == (64,) and ids.dtype == np.int64 and mask.dtype == bool
    assert ids[0] == sp.bos_id() == 2
    assert ids[:n].tolist() == expected
    assert mask.tolist() == [True] * n + [False] * (64 - n)
    assert (ids[n:] == 0).all()
    assert tok.decode(ids[1:n]) == "Task: Pick up the cube, State: 102 217 255 -1;\nAction: "


def test_tokenize_without_state_is_pi0_format(sp_model, sp):
    tok = PaligemmaTokenizer(sp_model, max_len=40)
    ids, mask = tok.tokenize(" open_the drawer\n")
    expected = sp.encode("open the drawer", add_bos=True) + sp.encode("\n")
    assert ids[: len(expected)].tolist() == expected
    assert mask.sum() == len(expected)


def test_tokenize_truncates(sp_model, sp, caplog):
    tok = PaligemmaTokenizer(sp_model, max_len=10)
    full = sp.encode(format_prompt("pick up the black bowl", np.zeros(8)), add_bos=True)
    assert len(full) > 10
    with caplog.at_level(logging.WARNING):
        ids, mask = tok.tokenize("pick up the black bowl", np.zeros(8))
    assert ids.tolist() == full[:10] and mask.all()
    assert "truncating" in caplog.text


def test_tokenize_batch_and_errors(sp_model):
    tok = PaligemmaTokenizer(sp_model, max_len=48)
    ids, mask = tok.tokenize_batch(["a", "b c"], [np.zeros(3), np.ones(3)])
    assert ids.shape == mask.shape == (2, 48)
    assert tok.tokenize(np.asarray("a"), np.zeros(3))[0].tolist() == ids[0].tolist()
    with pytest.raises(ValueError, match="1-D"):
        tok.tokenize("a", np.zeros((2, 3)))
    with pytest.raises(FileNotFoundError):
        PaligemmaTokenizer(sp_model.parent / "missing.model")


# ----------------------------------------------------------------------------------------
# Norm stats
# ----------------------------------------------------------------------------------------

STATE_STATS = dict(
    mean=[0.1, -0.2, 0.3, 0.0, 1.0, 2.0, -1.0, 0.5],
    std=[1.0, 0.5, 2.0, 1.0, 0.1, 3.0, 1.0, 0.2],
    q01=[-1.0, -0.9, -3.0, -0.5, 0.8, -4.0, -2.0, 0.1],
    q99=[1.2, 0.5, 3.5, 0.5, 1.2, 8.0, 0.0, 0.9],
)
ACTION_STATS = dict(
    mean=[0.0] * 7,
    std=[1.0, 2.0, 0.5, 1.0, 1.0, 1.0, 0.3],
    q01=[-0.5, -1.0, -0.2, -2.0, -0.1, -0.3, 0.0],
    q99=[0.5, 1.0, 0.4, 2.0, 0.1, 0.3, 1.0],
)


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    """An openpi checkpoint layout: <ckpt>/assets/<asset_id>/norm_stats.json."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    path = ckpt / "assets" / "my_robot" / "norm_stats.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"norm_stats": {"state": STATE_STATS, "actions": ACTION_STATS}}, indent=2))
    return ckpt


def test_load_norm_stats_layouts(stats_dir, tmp_path):
    file = stats_dir / "assets" / "my_robot" / "norm_stats.json"
    for where in (file, file.parent, stats_dir):
        stats = load_norm_stats(where)
        assert set(stats) == {"state", "actions"}
        assert stats["state"].q99.dtype == np.float64 and stats["state"].dim == 8
    assert find_norm_stats(stats_dir, asset_id="my_robot") == file
    with pytest.raises(FileNotFoundError):
        find_norm_stats(stats_dir, asset_id="other")
    saved = save_norm_stats(tmp_path, load_norm_stats(file))
    again = load_norm_stats(saved)
    np.testing.assert_array_equal(again["actions"].q01, ACTION_STATS["q01"])
    (tmp_path / "bare.json").write_text(json.dumps({"state": {"mean": [0], "std": [1]}}))
    assert load_norm_stats(tmp_path / "bare.json")["state"].q01 is None


def test_quantile_formula_and_round_trip():
    s = NormStats(**STATE_STATS)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    q01, q99 = np.array(STATE_STATS["q01"]), np.array(STATE_STATS["q99"])
    y = normalize(x, s)
    np.testing.assert_array_equal(y, (x - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0)
    assert y.dtype == np.float64
    np.testing.assert_allclose(normalize(q01, s), -1.0, atol=1e-12)
    np.testing.assert_allclose(normalize(q99, s), 1.0, atol=1e-5)
    assert (np.abs(normalize(q99 + 10, s)) > 1).all()  # no clipping
    np.testing.assert_allclose(unnormalize(y, s), x, rtol=0, atol=1e-12)
    # Stats longer than x: the first dims are used.
    np.testing.assert_array_equal(normalize(x[:, :3], s), y[:, :3])


def test_unnormalize_passes_padding_through():
    a = NormStats(**ACTION_STATS)
    rng = np.random.default_rng(1)
    out = rng.uniform(-1, 1, size=(4, 32)).astype(np.float32)
    un = unnormalize(out, a)
    q01, q99 = np.array(ACTION_STATS["q01"]), np.array(ACTION_STATS["q99"])
    np.testing.assert_array_equal(un[:, :7], (out[:, :7] + 1.0) / 2.0 * (q99 - q01 + 1e-6) + q01)
    np.testing.assert_array_equal(un[:, 7:], out[:, 7:])
    # z-score: mean 0 / std 1 on the padding, i.e. x * (1 + 1e-6).
    z = unnormalize(out, a, use_quantiles=False)
    np.testing.assert_allclose(z[:, 7:], out[:, 7:].astype(np.float64) * (1 + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(normalize(z[:, :7], a, use_quantiles=False), out[:, :7], atol=1e-6)


def test_normalize_errors_and_pad():
    s = NormStats(mean=[0, 0], std=[1, 1])
    with pytest.raises(ValueError, match="q01"):
        normalize(np.zeros(2), s)
    with pytest.raises(ValueError, match="3 dimensions"):
        normalize(np.zeros(3), s, use_quantiles=False)
    assert pad_to_dim(np.ones(3), 5).tolist() == [1, 1, 1, 0, 0]
    assert pad_to_dim(np.ones((2, 6)), 5).shape == (2, 6)


# ----------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------


def test_resize_with_pad_geometry():
    img = np.full((37, 100, 3), 200, dtype=np.uint8)
    out = resize_with_pad(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # 37x100 -> 82x224 (int(37 / (100/224)) = 82), centred: rows 71..152.
    rows = np.where(out[:, :, 0].any(axis=1))[0]
    assert (rows[0], rows[-1]) == (71, 152)
    assert (out[71:153] == 200).all() and (out[:71] == 0).all() and (out[153:] == 0).all()
    tall = resize_with_pad(np.full((301, 50, 3), 9, np.uint8))
    cols = np.where(tall[:, :, 0].any(axis=0))[0]
    assert (cols[0], cols[-1]) == ((224 - 37) // 2, (224 - 37) // 2 + 36)
    same = np.zeros((224, 224, 3), np.uint8)
    assert resize_with_pad(same) is same
    batch = resize_with_pad(np.zeros((2, 3, 50, 60, 3), np.uint8))
    assert batch.shape == (2, 3, 224, 224, 3)


@pytest.mark.parametrize("shape", [(480, 640), (37, 100), (500, 224), (300, 301), (13, 7), (100, 350)])
def test_resize_matches_pillow(shape):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
    h, w = shape
    r = max(w / 224, h / 224)
    nh, nw = int(h / r), int(w / r)
    # PIL's two passes, horizontal then vertical (Pillow <= 12 always resamples in this
    # order; openpi locks 11.2.1). Pillow 13 may go vertical-first on some shapes.
    im = Image.fromarray(img)
    if nw != w:
        im = im.resize((nw, h), resample=Image.BILINEAR)
    if nh != h:
        im = im.resize((nw, nh), resample=Image.BILINEAR)
    ref = Image.new("RGB", (224, 224), 0)
    ref.paste(im, (int((224 - nw) / 2), int((224 - nh) / 2)))
    np.testing.assert_array_equal(resize_with_pad(img), np.asarray(ref))
    import PIL

    if int(PIL.__version__.split(".")[0]) <= 12:
        one_shot = np.asarray(Image.fromarray(img).resize((nw, nh), resample=Image.BILINEAR))
        np.testing.assert_array_equal(resize_with_pad(img)[(224 - nh) // 2 :][:nh, (224 - nw) // 2 :][:, :nw], one_shot)


def test_preprocess_image_formats():
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    out = preprocess_image(u8)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = resize_with_pad(u8).astype(np.float32) / 255.0 * 2.0 - 1.0
    np.testing.assert_array_equal(out.numpy(), expected.transpose(2, 0, 1))
    assert out.min() >= -1 and out.max() <= 1
    # CHW and torch inputs give the same result.
    torch.testing.assert_close(preprocess_image(np.ascontiguousarray(u8.transpose(2, 0, 1))), out, rtol=0, atol=0)
    torch.testing.assert_close(preprocess_image(torch.from_numpy(u8)), out, rtol=0, atol=0)
    # Float in [0, 1]: openpi's (255 * x).astype(uint8) first.
    f = rng.uniform(0, 1, size=(90, 120, 3)).astype(np.float32)
    torch.testing.assert_close(preprocess_image(f), preprocess_image((255 * f).astype(np.uint8)), rtol=0, atol=0)
    # Extremes map to -1 and 1 exactly.
    assert preprocess_image(np.zeros((224, 224, 3), np.uint8)).eq(-1).all()
    assert preprocess_image(np.full((224, 224, 3), 255, np.uint8)).eq(1).all()
    with pytest.raises(ValueError):
        preprocess_image(np.zeros((224, 224), np.uint8))


def test_preprocess_signed_float():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.uniform(-1, 1, size=(3, 224, 224)).astype(np.float32))
    assert torch.equal(preprocess_image(x, float_range="signed"), x)
    odd = torch.from_numpy(rng.uniform(-1, 1, size=(60, 100, 3)).astype(np.float32))
    out = preprocess_image(odd, float_range="signed")
    nh = int(60 / (100 / 224))  # 134
    top, rem = divmod(224 - nh, 2)
    assert out.shape == (3, 224, 224)
    assert out[:, :top].eq(-1).all() and out[:, top + nh :].eq(-1).all()
    assert out.min() >= -1 and out.max() <= 1
    assert resize_with_pad_signed(odd.permute(2, 0, 1)[None]).shape == (1, 3, 224, 224)


def test_preprocess_cameras_absent_and_masks():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    samples = [{"base_0_rgb": img, "left_wrist_0_rgb": img}, {"base_0_rgb": img}]
    masks = [None, {"base_0_rgb": False}]
    images, img_masks = preprocess_cameras(samples, masks, resolution=112)
    assert len(images) == len(img_masks) == 3
    assert all(t.shape == (2, 3, 112, 112) for t in images)
    assert [m.tolist() for m in img_masks] == [[True, False], [True, False], [False, False]]
    assert images[2].eq(-1).all() and images[1][1].eq(-1).all()  # absent: zero uint8 image
    assert torch.equal(images[0][0], images[0][1])  # a False mask keeps the image
    with pytest.raises(ValueError, match="unknown camera"):
        preprocess_cameras([{"wrist": img}])


# ----------------------------------------------------------------------------------------
# Pi05Policy
# ----------------------------------------------------------------------------------------

# Dummy LLM/expert, tiny SigLIP at 56 px: 16 tokens per camera, N = 48. Two Euler steps.
CFG = Pi05Config.dummy(vision_image_size=56, action_horizon=4, max_token_len=80)
STEPS = 2


@pytest.fixture(scope="module")
def model():
    return Pi05(CFG, seed=0).eval()


def make_obs(seed=0, wrist=True, prompt="pick up the red block"):
    rng = np.random.default_rng(seed)
    obs = {
        "base_0_rgb": rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8),
        "state": rng.uniform(-1, 1, size=8),
        "prompt": prompt,
    }
    if wrist:
        obs["left_wrist_0_rgb"] = rng.uniform(0, 1, size=(3, 112, 112)).astype(np.float32)
    return obs


def make_policy(model, sp_model, stats_dir, **kw):
    model.config = CFG
    kw.setdefault("num_steps", STEPS)
    return Pi05Policy(model, sp_model, load_norm_stats(stats_dir), **kw)


def noise_for(seed=0):
    return np.random.default_rng(seed).standard_normal((CFG.action_horizon, CFG.action_dim)).astype(np.float32)


def test_policy_end_to_end(model, sp_model, stats_dir):
    policy = make_policy(model, sp_model, stats_dir)
    obs = make_obs()
    out = policy.infer(obs, noise=noise_for())
    assert out["actions"].shape == (4, 7) and np.isfinite(out["actions"]).all()
    assert out["kept_tokens"] is None and out["policy_timing"]["infer_ms"] > 0

    # The same pipeline by hand: normalize, tokenize, preprocess, sample, unnormalize, cut.
    stats = load_norm_stats(stats_dir)
    tok = PaligemmaTokenizer(sp_model, max_len=CFG.max_token_len)
    ids, mask = tok.tokenize(obs["prompt"], normalize(obs["state"], stats["state"]))
    images, img_masks = preprocess_cameras([obs_cams(obs)], resolution=56)
    assert img_masks[2].tolist() == [False]
    with torch.no_grad():
        raw = model.sample_actions(images, img_masks, torch.from_numpy(ids)[None], torch.from_numpy(mask)[None],
                                   noise=torch.from_numpy(noise_for())[None], num_steps=STEPS)
    manual = unnormalize(raw[0].numpy(), stats["actions"])[:, :7]
    np.testing.assert_array_equal(out["actions"], manual)

    # Deterministic: fixed noise, or the same seed.
    np.testing.assert_array_equal(policy.infer(obs, noise=noise_for())["actions"], out["actions"])
    a = make_policy(model, sp_model, stats_dir, seed=7).infer(obs)["actions"]
    b = make_policy(model, sp_model, stats_dir, seed=7).infer(obs)["actions"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(policy.infer(obs, noise=noise_for(1))["actions"], out["actions"])
    # The prompt matters.
    assert not np.array_equal(policy.infer(make_obs(prompt="open the drawer"), noise=noise_for())["actions"],
                              out["actions"])


def obs_cams(obs):
    return {k: obs[k] for k in IMAGE_KEYS if k in obs}


def test_policy_batch_matches_single(model, sp_model, stats_dir):
    policy = make_policy(model, sp_model, stats_dir)
    obs = [make_obs(0), make_obs(1, wrist=False, prompt="put the bowl on the plate")]
    noise = np.stack([noise_for(0), noise_for(1)])
    batch = policy.infer_batch(obs, noise=noise)
    assert batch["actions"].shape == (2, 4, 7)
    for i in range(2):
        single = policy.infer(obs[i], noise=noise[i])["actions"]
        np.testing.assert_allclose(batch["actions"][i], single, rtol=1e-5, atol=1e-5)
    # openpi's model-side layout: "image" + "image_mask".
    nested = {"image": obs_cams(obs[0]), "image_mask": {"left_wrist_0_rgb": False},
              "state": obs[0]["state"], "prompt": obs[0]["prompt"]}
    _, img_masks, _, _ = policy.prepare([nested])
    assert [m.item() for m in img_masks] == [True, False, False]


def test_policy_pruning_settings(model, sp_model, stats_dir):
    policy = make_policy(model, sp_model, stats_dir)
    obs, noise = make_obs(), noise_for()
    full = policy.infer(obs, noise=noise)["actions"]
    assert policy.pruning["enabled"] is False

    policy.set_keep_tokens(5)
    assert policy.pruning == dict(enabled=True, keep_tokens=5, keep_ratio=None, max_tokens=None,
                                  noise_scale=CFG.token_prune_noise_scale, mask_voters=False)
    out5 = policy.infer(obs, noise=noise)
    assert out5["kept_tokens"] == 5
    assert not np.allclose(out5["actions"], full)

    policy.set_keep_tokens(20)
    assert policy.infer(obs, noise=noise)["kept_tokens"] == 20
    policy.set_keep_ratio(0.25)
    assert policy.pruning["keep_tokens"] is None
    assert policy.infer(obs, noise=noise)["kept_tokens"] == math.ceil(0.25 * CFG.num_image_tokens)
    # Budgets count present cameras only (the right wrist is absent: 32 valid tokens).
    policy.set_keep_tokens(40)
    assert policy.infer(obs, noise=noise)["kept_tokens"] == 32

    policy.set_keep_tokens(None)  # implicit mode: LightVLA's own count
    implicit = policy.infer(obs, noise=noise)["kept_tokens"]
    assert 0 < implicit <= 32
    policy.set_max_tokens(3)
    assert policy.infer(obs, noise=noise)["kept_tokens"] <= 3

    with pytest.raises(ValueError):
        policy.set_pruning(keep_tokens=0)
    with pytest.raises(ValueError):
        policy.set_keep_ratio(1.5)
    assert policy.pruning["max_tokens"] == 3  # a failed change leaves the settings alone
    policy.set_pruning(max_tokens=None, keep_tokens=10, keep_ratio=0.5)  # keep_tokens wins, as in the seed
    assert policy.infer(obs, noise=noise)["kept_tokens"] == 10

    policy.enable_pruning(False)
    out = policy.infer(obs, noise=noise)
    assert out["kept_tokens"] is None
    np.testing.assert_array_equal(out["actions"], full)


def test_policy_from_paths(model, sp_model, stats_dir, tmp_path):
    model.config = CFG
    ckpt = tmp_path / "ckpt"
    (ckpt / "assets" / "my_robot").mkdir(parents=True)
    (ckpt / "assets" / "my_robot" / "norm_stats.json").write_text(
        (stats_dir / "assets" / "my_robot" / "norm_stats.json").read_text())
    model.save_openpi(str(ckpt / "model.safetensors"))
    loaded = Pi05Policy.from_paths(ckpt, sp_model, action_horizon=CFG.action_horizon, num_steps=STEPS)
    assert loaded.action_dims == 7 and loaded.tokenizer.max_len == CFG.max_token_len
    ref = make_policy(model, sp_model, stats_dir)
    obs = make_obs()
    # Same weights; the memory-mapped tensors may take other BLAS paths (float32 rounding).
    np.testing.assert_allclose(loaded.infer(obs, noise=noise_for())["actions"],
                               ref.infer(obs, noise=noise_for())["actions"], rtol=1e-5, atol=1e-5)
    # Without norm stats in the directory it refuses (pass {} to run unnormalized).
    bare = tmp_path / "bare"
    bare.mkdir()
    model.save_openpi(str(bare / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no norm_stats.json in .*bare.*norm_stats=\{\}.*--no-norm-stats"):
        Pi05Policy.from_paths(bare, sp_model)
    raw = Pi05Policy.from_paths(bare / "model.safetensors", sp_model, norm_stats={}, action_dims=32, num_steps=1)
    assert raw.infer(obs, noise=noise_for())["actions"].shape == (CFG.action_horizon, 32)


def test_robot_observation_layouts(model, sp_model, stats_dir):
    """Observations keyed as openpi's LIBERO and DROID clients send them act as the same
    observation keyed by the model's cameras (openpi's LiberoInputs / DroidInputs: no right
    wrist camera; DROID's state = joints then gripper), with openpi's pi05_libero / pi05_droid
    settings: 7 / 8 action dimensions, the state in the prompt for DROID only."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    wrist = rng.uniform(0, 1, size=(3, 64, 64)).astype(np.float32)
    state = rng.uniform(-1, 1, size=8)
    plain_obs = {"image": {"base_0_rgb": base, "left_wrist_0_rgb": wrist}, "state": state, "prompt": "go"}

    def plain(discrete_state_input):
        policy = make_policy(model, sp_model, stats_dir, action_dims=8, discrete_state_input=discrete_state_input)
        return policy.infer(plain_obs, noise=noise_for())["actions"]

    libero = make_policy(model, sp_model, stats_dir, robot="libero")
    assert not libero.discrete_state_input and libero.action_dims == 7
    got = libero.infer({"observation/image": base, "observation/wrist_image": wrist, "observation/state": state,
                        "prompt": "go"}, noise=noise_for())["actions"]
    np.testing.assert_array_equal(got, plain(False)[:, :7])
    droid = make_policy(model, sp_model, stats_dir, robot="droid")
    assert droid.discrete_state_input and droid.action_dims == 8
    got = droid.infer({"observation/exterior_image_1_left": base, "observation/wrist_image_left": wrist,
                       "observation/joint_position": state[:7], "observation/gripper_position": state[7],
                       "prompt": "go"}, noise=noise_for())["actions"]
    np.testing.assert_array_equal(got, plain(True))
    assert not np.array_equal(plain(True), plain(False))  # the state in the prompt does matter
    with pytest.raises(ValueError, match=r"libero observation lacks \['observation/wrist_image'\]"):
        libero.infer({"observation/image": base, "observation/state": state, "prompt": "go"})
    with pytest.raises(ValueError, match="robot must be one of"):
        make_policy(model, sp_model, stats_dir, robot="aloha")


def test_policy_input_errors(model, sp_model, stats_dir):
    policy = make_policy(model, sp_model, stats_dir)
    obs = make_obs()
    with pytest.raises(ValueError, match="prompt"):
        policy.infer({k: v for k, v in obs.items() if k != "prompt"})
    with pytest.raises(ValueError, match="state"):
        policy.infer({k: v for k, v in obs.items() if k != "state"})
    with pytest.raises(ValueError, match="unknown camera"):
        policy.infer({**obs, "wrist_rgb": obs["base_0_rgb"]})
    with pytest.raises(ValueError, match="noise"):
        policy.infer(obs, noise=np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="action_dims"):
        Pi05Policy(model, sp_model, action_dims=33)
    default = make_policy(model, sp_model, stats_dir, default_prompt="pick up the red block")
    np.testing.assert_array_equal(
        default.infer({k: v for k, v in obs.items() if k != "prompt"}, noise=noise_for())["actions"],
        policy.infer(obs, noise=noise_for())["actions"],
    )


@pytest.mark.parametrize("robot", [None, "libero", "droid"])
def test_policy_warmup_compiles_what_requests_reuse(model, sp_model, stats_dir, robot):
    """warmup() compiles sample_actions on an example observation in the robot's layout (as its
    openpi client sends one); later requests of that layout reuse the graph, and answer as a
    policy without the warm-up does (the warm-up's zero noise leaves the generator alone)."""
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    policy = make_policy(model, sp_model, stats_dir, robot=robot, seed=0)
    policy.set_keep_tokens(10)
    model._sample_compiled = torch.compile(model._sample, backend=count_graphs, dynamic=True, fullgraph=True)
    try:
        assert policy.warmup() > 0 and len(graphs) == 1 and policy.last_kept_tokens is None
        request = policy.example_observation(seed=1)
        got = policy.infer(request)
        assert len(graphs) == 1 and got["kept_tokens"] == 10
        fresh = make_policy(model, sp_model, stats_dir, robot=robot, seed=0)
        fresh.set_keep_tokens(10)
        np.testing.assert_array_equal(got["actions"], fresh.infer(request)["actions"])
    finally:
        model.set_compile_mode(model.config.pytorch_compile_mode)
