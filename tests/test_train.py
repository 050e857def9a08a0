"""The training loop (pi05_fastprune.train) on CPU with the dummy model: schedules, telemetry,
checkpoint + resume, a fixed-batch overfit, the data source, and 2-process DDP (gloo)."""

import dataclasses
import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pi05_fastprune import train as T
from pi05_fastprune.model import Pi05

# Tiny SigLIP at 56 px: 16 patches per camera, 48 image tokens; short prompts and horizon.
MODEL = dict(vision_image_size=56, action_horizon=4, max_token_len=16)
REPO = pathlib.Path(__file__).resolve().parents[1]


def small(tmp_path, **over):
    base = dict(
        model=dict(MODEL), checkpoint_base_dir=str(tmp_path), batch_size=2, num_train_steps=4, warmup_steps=2,
        decay_steps=4, log_freq=1, save_interval=2, synthetic_prompt_len=(3, 10), tensorboard=False,
    )
    base.update(over)
    return T.get_preset("debug", **base)


def read_metrics(run_dir):
    return [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


SEED_KEYS = [
    "prune/kept_ratio_overall_mean", "prune/kept_tokens_overall_mean", "prune/kept_tokens_overall_min",
    "prune/kept_tokens_overall_max", "prune/kept_tokens_overall_mean_noisy", "prune/task_valid_len_mean",
    "prune/task_attn_masked_len_mean", "prune/argmax_union_mean", "prune/argmax_union_mean_noisy",
    "prune/argmax_top1_share_mean", "prune/argmax_top1_share_mean_noisy", "prune/patches_std_mean",
    "prune/task_std_mean", "prune/queries_before_norm_std_mean", "prune/queries_after_norm_std_mean",
    "prune/queries_before_norm_cosine_mean", "prune/queries_after_norm_cosine_mean",
    "prune/score_abs_max_det_mean", "prune/score_top1_gap_det_mean",
    "prune/img0_kept_mean", "prune/img0_kept_min", "prune/img0_kept_max",  # all cameras as one image
]


# ------------------------------------------------------------------------------ schedules / config


def test_lr_schedule_values():
    cfg = T.TrainConfig(warmup_steps=100, peak_lr=1e-3, decay_steps=1100, decay_lr=1e-4)
    assert T.lr_at(0, cfg) == pytest.approx(1e-3 / 101, rel=1e-12)
    assert T.lr_at(50, cfg) == pytest.approx(1e-3 / 101 + (1e-3 - 1e-3 / 101) * 0.5, rel=1e-12)
    assert T.lr_at(100, cfg) == pytest.approx(1e-3, rel=1e-12)
    assert T.lr_at(600, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4), rel=1e-12)  # cosine half way
    assert T.lr_at(350, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert T.lr_at(1100, cfg) == pytest.approx(1e-4, rel=1e-12)
    assert T.lr_at(5000, cfg) == pytest.approx(1e-4, rel=1e-12)  # constant after decay_steps
    # pi05_libero: 10k warmup to 5e-5, then "cosine" from 5e-5 to 5e-5 (constant).
    lib = T.get_preset("pi05_libero_lightvla")
    assert T.lr_at(0, lib) == pytest.approx(5e-5 / 10_001, rel=1e-12)
    assert T.lr_at(5_000, lib) == pytest.approx(5e-5 / 10_001 + (5e-5 - 5e-5 / 10_001) / 2, rel=1e-12)
    assert [T.lr_at(s, lib) for s in (10_000, 20_000, 29_999)] == [pytest.approx(5e-5, rel=1e-12)] * 3


def test_noise_schedule_values():
    cfg = T.TrainConfig(num_train_steps=30_000)
    assert [T.noise_scale_at(s, cfg) for s in (0, 7_500, 15_000, 30_000, 40_000)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    assert T.noise_scale_at(0, dataclasses.replace(cfg, prune_noise_schedule="config")) is None


def test_presets_and_cli():
    base, prune = T.get_preset("pi05_libero"), T.get_preset("pi05_libero_lightvla")
    for cfg in (base, prune):
        assert (cfg.batch_size, cfg.num_train_steps, cfg.warmup_steps, cfg.peak_lr, cfg.decay_steps,
                cfg.decay_lr) == (256, 30_000, 10_000, 5e-5, 1_000_000, 5e-5)
        assert (cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.clip_gradient_norm) == (0.9, 0.95, 1e-8, 1e-10, 1.0)
        assert (cfg.model.action_horizon, cfg.model.action_dim, cfg.model.max_token_len) == (10, 32, 200)
        assert cfg.model.paligemma_variant == "gemma_2b" and cfg.model.action_expert_variant == "gemma_300m"
    assert not base.model.token_pruning_enabled and prune.model.token_pruning_enabled
    cfg = T.parse_args(["--preset", "pi05_libero_lightvla", "--batch_size", "64", "--init_weights", "none",
                        "--model.token_prune_keep_tokens", "24", "--model.dtype", "float32",
                        "--synthetic_absent_cameras", "1,2", "--resume", "true"])
    assert (cfg.name, cfg.batch_size, cfg.init_weights, cfg.resume) == ("pi05_libero_lightvla", 64, None, True)
    assert cfg.model.token_prune_keep_tokens == 24 and cfg.model.dtype == "float32"
    assert cfg.synthetic_absent_cameras == (1, 2) and cfg.model.token_pruning_enabled
    # A bool option alone is true (openpi's `--resume`), before another option too; a value sets it.
    cfg = T.parse_args(["--resume", "--model.token_pruning_enabled", "--overwrite", "false"])
    assert cfg.resume and cfg.model.token_pruning_enabled and not cfg.overwrite
    assert not T.parse_args(["--preset", "pi05_libero_lightvla", "--model.token_pruning_enabled", "0"]).model.token_pruning_enabled
    # The preset by name, as openpi's `train_pytorch.py NAME`, and the seed's names for them.
    cfg = T.parse_args(["pi05_libero_pytorch_lightvla", "--exp_name", "r1", "--pytorch_weight_path", "/w"])
    assert cfg.name == "pi05_libero_pytorch_lightvla" and cfg.model.token_pruning_enabled
    assert cfg.init_weights == "/w"  # openpi's and the seed's flag for it
    # The seed's LIBERO configs: pi05_libero's schedule and model at batch 64, saved every 5000 steps.
    assert (cfg.batch_size, cfg.save_interval) == (64, 5000)
    assert dataclasses.replace(cfg, name=prune.name, exp_name=prune.exp_name, batch_size=256, save_interval=1000,
                               init_weights=None) == prune
    assert not T.parse_args(["pi05_libero_pytorch"]).model.token_pruning_enabled
    for name, pruning in (("pi05_pick_place_pytorch", False), ("pi05_pick_place_pytorch_pruning", True)):
        cfg = T.get_preset(name)
        assert (cfg.batch_size, cfg.num_train_steps, cfg.save_interval) == (16, 30_000, 5000)
        assert cfg.model.action_horizon == 50
        assert (cfg.warmup_steps, cfg.peak_lr, cfg.decay_steps, cfg.decay_lr) == (1000, 2.5e-5, 30_000, 2.5e-6)
        assert cfg.model.token_pruning_enabled == pruning and cfg.synthetic_absent_cameras == ()
    # openpi's debug_pi05: the dummy model at pi0.5's horizon and prompt length, its default schedule.
    seed = T.parse_args(["debug_pi05", "--model.token_pruning_enabled", "True"])
    assert seed.name == seed.exp_name == "debug_pi05" and seed.model.token_pruning_enabled
    assert (seed.model.action_horizon, seed.model.max_token_len) == (50, 200)
    assert (seed.batch_size, seed.num_train_steps) == (2, 10)
    assert (seed.warmup_steps, seed.peak_lr) == (1000, 2.5e-5)
    assert T.parse_args([]).name == T.parse_args(["--preset", "debug"]).name == "debug"
    with pytest.raises(SystemExit):
        T.parse_args(["debug", "--preset", "pi05_libero"])


# ------------------------------------------------------------------------------ data


def test_sampler_shards_the_global_batch():
    one = T.ShardedSampler(10, 4, rank=0, world_size=1, seed=3)
    two = [T.ShardedSampler(10, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    seen = []
    for step in range(5):  # two epochs
        idx = one.indices(step)
        assert two[0].indices(step) + two[1].indices(step) == idx
        seen += idx
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert T.ShardedSampler(10, 4, 0, 1, seed=3).indices(3) == one.indices(3)  # deterministic
    with pytest.raises(ValueError, match="divisible"):
        T.ShardedSampler(10, 5, 0, 2, seed=0)


def test_synthetic_batches_are_libero_shaped():
    cfg = T.get_preset("debug", batch_size=4, synthetic_prompt_len=(5, 30))  # 224 px, 3 cameras
    src = T.make_data_source(cfg)
    batch = src.batch(0)
    T.check_batch(batch, cfg.model, 4)
    m = cfg.model
    assert len(batch["images"]) == 3 and batch["images"][0].shape == (4, 3, 224, 224)
    assert all(im.min() >= -1 and im.max() <= 1 for im in batch["images"])
    assert batch["img_masks"][0].all() and batch["img_masks"][1].all() and not batch["img_masks"][2].any()
    assert (batch["images"][2] == -1).all()  # absent right wrist camera: openpi's zero uint8 image
    assert batch["lang_tokens"].shape == (4, m.max_token_len) and batch["lang_tokens"].dtype == torch.int64
    lens = batch["lang_masks"].sum(1)
    assert ((lens >= 5) & (lens <= 30)).all()
    assert (batch["lang_tokens"][~batch["lang_masks"]] == 0).all()
    assert batch["actions"].shape == (4, m.action_horizon, m.action_dim)
    assert (batch["actions"][..., 7:] == 0).all() and batch["actions"][..., :7].abs().sum() > 0
    again = T.make_data_source(cfg).batch(0)
    assert torch.equal(again["actions"], batch["actions"]) and torch.equal(again["images"][0], batch["images"][0])
    with pytest.raises(ValueError, match="actions"):
        T.check_batch(dict(batch, actions=batch["actions"][:, :2]), m, 4)


def test_data_loader_workers_give_the_same_batches():
    cfg = T.get_preset("debug", model=dict(MODEL), batch_size=4, num_workers=1)
    src = T.make_data_source(cfg, rank=1, world_size=2)
    it = src.iterate(5)
    for step in (5, 6):
        got, want = next(it), src.batch(step)
        assert torch.equal(got["actions"], want["actions"]) and torch.equal(got["images"][1], want["images"][1])
        assert got["actions"].shape[0] == 2


# ------------------------------------------------------------------------------ model setup


@pytest.mark.parametrize("pruning", [True, False], ids=["pruned", "unpruned"])
def test_dead_parameters_are_exactly_the_unused_ones(pruning):
    cfg = T.get_preset("debug", model=dict(MODEL, token_pruning_enabled=pruning))
    model = Pi05(cfg.model, seed=0).train()
    batch = T.make_data_source(dataclasses.replace(cfg, batch_size=2)).batch(0)
    args, _ = T._step_batch(batch)
    model(*args).mean().backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert no_grad == sorted(T.dead_parameter_names(model)) and no_grad
    assert [n for n, _ in model.named_buffers()] == ["expert.lm_head"]  # not a parameter


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = T.get_preset("debug", model=dict(MODEL), batch_size=2)
    batch = T.make_data_source(cfg).batch(0)
    args, _ = T._step_batch(batch)
    noise = torch.randn_like(batch["actions"])
    time = torch.tensor([0.3, 0.7])
    grads = []
    for ckpt in (False, True):
        model = Pi05(cfg.model, seed=0).train()
        if ckpt:
            T.enable_activation_checkpointing(model)
        model.set_token_pruner_noise_scale(0.5)
        torch.manual_seed(0)
        model(*args, noise=noise, time=time).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------ training runs


def test_debug_run_telemetry_and_resume(tmp_path):
    """4 steps (checkpoints at 2 and 4); then a run resumed from step 2 ends in the same state."""
    cfg = small(tmp_path / "a")
    out = T.train(cfg)
    assert out["step"] == 4
    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["learning_rate"] == pytest.approx(T.lr_at(r["step"], cfg), rel=1e-12)
        assert r["prune/noise_scale"] == pytest.approx(1 - r["step"] / 4)  # the seed's schedule
        missing = [k for k in SEED_KEYS if k not in r or not math.isfinite(r[k])]
        assert not missing, missing
        assert 0 < r["prune/kept_ratio_overall_mean"] <= 1
        assert r["prune/kept_tokens_overall_min"] <= r["prune/kept_tokens_overall_mean"] <= \
            r["prune/kept_tokens_overall_max"] <= 32  # the absent camera is never kept
        assert r["prune/img0_kept_mean"] == r["prune/kept_tokens_overall_mean"]
    assert T.latest_checkpoint_step(cfg.run_dir) == 4
    ckpt = cfg.run_dir / "4"
    loaded = Pi05.from_openpi(str(ckpt / "model.safetensors"))
    assert loaded.config == cfg.model
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 4 and state["param_groups"][0]["betas"] == [0.9, 0.95]

    # Resume: a second run directory holding only the step-2 checkpoint.
    cfg_b = small(tmp_path / "b", resume=True)
    cfg_b.run_dir.mkdir(parents=True)
    shutil.copytree(cfg.run_dir / "2", cfg_b.run_dir / "2")
    out = T.train(cfg_b)
    assert out["step"] == 4
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(cfg.run_dir / "4" / name)), load_file(str(cfg_b.run_dir / "4" / name))
        assert a.keys() == b.keys()
        diff = [k for k in a if not torch.equal(a[k], b[k])]
        assert not diff, (name, diff[:5])
    rows_b = read_metrics(cfg_b.run_dir)
    assert [r["step"] for r in rows_b] == [2, 3]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows[2:]]

    # A process that stopped after logging steps 2-3 past its last checkpoint (2): the resumed
    # run logs them again, once, and init_weights / from_openpi take a checkpoint directory.
    cfg_d = small(tmp_path / "d", resume=True)
    shutil.copytree(cfg.run_dir, cfg_d.run_dir)
    shutil.rmtree(cfg_d.run_dir / "4")
    T.train(cfg_d)
    rows_d = read_metrics(cfg_d.run_dir)
    assert [r["step"] for r in rows_d] == [0, 1, 2, 3]
    assert [r["loss"] for r in rows_d] == [r["loss"] for r in rows]
    loaded = Pi05.from_openpi(str(ckpt))
    model, _, _ = T.build(small(tmp_path / "e", init_weights=str(ckpt)), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    with pytest.raises(FileExistsError):  # neither --resume nor --overwrite
        T.train(small(tmp_path / "a"))
    with pytest.raises(FileNotFoundError):
        T.train(small(tmp_path / "c", resume=True))


def test_checkpoint_keep_last_and_tensorboard(tmp_path, monkeypatch):
    cfg = small(tmp_path)
    model, names, opt = T.build(cfg, torch.device("cpu"))
    for step in (1, 2, 3):
        T.save_checkpoint(cfg.run_dir, step, model, opt, names, cfg, keep_last=2)
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["2", "3"]
    assert T.load_checkpoint(cfg.run_dir / "3", model, opt, names) == 3

    scalars, purged = [], []

    class FakeWriter:  # torch.utils.tensorboard needs the tensorboard package; record the calls
        def __init__(self, logdir, purge_step=None):
            self.logdir = logdir
            purged.append(purge_step)

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            pass

    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    writer = T.MetricsWriter(cfg.run_dir, tensorboard=True)
    writer.write({"step": 7, "loss": 0.5, "prune/kept_ratio_overall_mean": 0.1, "replica_digests": [[1.0]]})
    writer.close()
    assert scalars == [("loss", 0.5, 7), ("prune/kept_ratio_overall_mean", 0.1, 7)]
    assert read_metrics(cfg.run_dir)[-1]["step"] == 7
    # Resumed at step 5: the earlier process's records from step 5 on go, in both logs, and a
    # record it cut short.
    with open(cfg.run_dir / "metrics.jsonl", "r+") as f:
        f.write('{"step": 3, "loss": 0.25}\n' + f.read() + '{"step": 8, "lo')
    T.MetricsWriter(cfg.run_dir, tensorboard=True, start_step=5).close()
    assert purged == [None, 5] and read_metrics(cfg.run_dir) == [{"step": 3, "loss": 0.25}]


class FixedSource(T.DataSource):
    """One batch, with fixed flow-matching noise and time, at every step."""

    def __init__(self, cfg):
        synth = T.make_data_source(dataclasses.replace(cfg, data="synthetic"))
        self.fixed = synth.batch(0)
        g = torch.Generator().manual_seed(0)
        self.fixed["noise"] = torch.randn(self.fixed["actions"].shape, generator=g)
        self.fixed["time"] = torch.rand(cfg.batch_size, generator=g) * 0.8 + 0.1

    def batch(self, step):
        return self.fixed


def make_fixed_source(cfg, rank, world_size):
    return FixedSource(cfg)


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    sys.modules.setdefault("test_train", sys.modules[__name__])
    cfg = small(tmp_path, data="test_train:make_fixed_source", num_train_steps=6, warmup_steps=0,
                peak_lr=2e-3, decay_lr=2e-3, save_interval=100, model=dict(MODEL, token_prune_noise_scale=0.0),
                prune_noise_schedule="config")
    T.train(cfg)
    losses = [r["loss"] for r in read_metrics(cfg.run_dir)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_gradient_accumulation_matches_one_batch(tmp_path):
    """One step on a batch of 4 in 2 micro-batches == one step on the whole batch: the same
    optimizer state, and the same logged loss and gradient norm (taken before clipping, which
    would hide a gradient of the wrong scale from the optimizer state)."""
    sys.modules.setdefault("test_train", sys.modules[__name__])
    states, logged = [], []
    for accum in (1, 2):
        cfg = small(tmp_path / str(accum), data="test_train:make_fixed_source", batch_size=4, num_train_steps=1,
                    save_interval=1, grad_accum_steps=accum, prune_noise_schedule="config",
                    model=dict(MODEL, token_prune_noise_scale=0.0))
        T.train(cfg)
        states.append(load_file(str(cfg.run_dir / "1" / "optimizer.safetensors")))
        (record,) = read_metrics(cfg.run_dir)
        logged.append((record["loss"], record["grad_norm"]))
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-4, atol=1e-9, msg=k)
    assert logged[1] == pytest.approx(logged[0], rel=1e-4)


# ------------------------------------------------------------------------------ DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FACTORY = """
from pi05_fastprune.train import MapDataSource, ShardedSampler, SyntheticDataset

def make_source(cfg, rank, world_size):
    ds = SyntheticDataset(cfg.model, 16, cfg.seed, 2, (3, 10), 7, (2,))
    return MapDataSource(ds, ShardedSampler(len(ds), cfg.batch_size, rank, world_size, cfg.seed))
"""


def test_module_entry_point_with_a_data_factory_and_the_seeds_command(tmp_path):
    """`python -m pi05_fastprune.train` (the README's and the seed's way) with a --data factory
    built from the package's DataSource classes, the seed's preset name given as openpi gives
    its config, and its noise setting, which the seed's linear schedule overrides: said so."""
    (tmp_path / "my_data.py").write_text(FACTORY)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable, "-m", "pi05_fastprune.train", "debug_pi05", "--exp_name", "pruning_train",
        "--model.token_pruning_enabled", "True", "--model.token_prune_noise_scale", "0.5",
        "--data", "my_data:make_source", "--checkpoint_base_dir", str(tmp_path), "--num_train_steps", "1",
        "--tensorboard", "false", *[a for k, v in MODEL.items() for a in (f"--model.{k}", str(v))],
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[W] pruning noise: the seed's linear decay" in proc.stdout
    assert "token_prune_noise_scale=0.5 is not used" in proc.stdout
    assert T.latest_checkpoint_step(tmp_path / "debug_pi05" / "pruning_train") == 1


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun, 2 processes (gloo), find_unused_parameters=False, 2 micro-batches per rank
    (no_sync): finite loss, and the two replicas' parameter digests identical at every step."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "pi05_fastprune.train", "--preset", "debug", "--checkpoint_base_dir", str(tmp_path),
        "--batch_size", "4", "--num_train_steps", "3", "--log_freq", "1", "--save_interval", "3",
        "--tensorboard", "false", "--synthetic_prompt_len", "3,10", "--grad_accum_steps", "2",
        *[a for k, v in MODEL.items() for a in (f"--model.{k}", str(v))],
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert T.latest_checkpoint_step(tmp_path / "debug" / "run") == 3
    # Both ranks resume from the step-3 checkpoint and train on to step 4.
    cmd[cmd.index("--num_train_steps") + 1] = "4"
    cmd[cmd.index(next(a for a in cmd if a.startswith("--master_port")))] = f"--master_port={_free_port()}"
    proc = subprocess.run(cmd + ["--resume", "true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "debug" / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"])
        d = r["replica_digests"]
        assert len(d) == 2 and d[0] == d[1], d
        assert "replica_mismatch" not in r
    assert rows[0]["replica_digests"] != rows[-1]["replica_digests"]  # the parameters did move
    assert T.latest_checkpoint_step(tmp_path / "debug" / "run") == 4
