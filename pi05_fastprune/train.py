"""Training loop for pi0.5 (``Pi05``) with optional LightVLA visual-token pruning.

    python -m pi05_fastprune.train --preset debug                       # tiny model, CPU, seconds
    python -m pi05_fastprune.train --preset pi05_libero_lightvla --exp_name run1 \\
        --init_weights /models/pi05_base_pytorch/model.safetensors --data my_pkg.libero:make_source
    torchrun --standalone --nproc_per_node=8 -m pi05_fastprune.train --preset pi05_libero_lightvla \\
        --exp_name run1 [--resume]

Overrides: ``--FIELD VALUE`` for a ``TrainConfig`` field, ``--model.FIELD VALUE`` for a
``Pi05Config`` field (``none`` for None, ``true/false`` for booleans, ``1,2`` for tuples).

Behaviour follows openpi's PyTorch trainer (scripts/train_pytorch.py) as the seed integration
uses it (sections 8-9 of its notes), written from scratch:

- loss: ``Pi05.forward(...)`` (per element ``[B, H, A]``) averaged over everything;
- AdamW with openpi's ``AdamW`` defaults (b1 0.9, b2 0.95, eps 1e-8, weight decay 1e-10) on
  every trainable parameter, global-norm gradient clipping at 1.0;
- openpi's ``CosineDecaySchedule``: linear warmup from ``peak/(warmup+1)`` to ``peak`` over
  ``warmup_steps``, then cosine from ``peak`` to ``decay_lr`` over ``decay_steps - warmup_steps``
  (constant after); set on the optimizer before each step (a pure function of the step);
- the seed's pruning noise schedule: ``noise_scale = max(0, 1 - step / num_train_steps)`` set
  every step through ``set_token_pruner_noise_scale``;
- every ``log_freq`` steps one JSON line (rank 0, ``metrics.jsonl`` in the run directory; also
  TensorBoard when ``torch.utils.tensorboard`` imports): loss / grad norm averaged over the
  interval and over ranks, lr, noise scale, and with pruning the seed's ``prune/*`` telemetry
  (``Pi05.get_token_pruning_stats`` of rank 0's last batch: computing it costs a scoring pass,
  which the seed paid every step to average over the interval);
- optional gradient accumulation (``grad_accum_steps`` micro-batches per rank, one all-reduce)
  and activation checkpointing (SigLIP blocks, Gemma layer halves; on in the LIBERO presets);
- DDP under torchrun (NCCL on CUDA, gloo on CPU), ``find_unused_parameters=False``: the
  parameters that cannot reach the loss (see ``dead_parameter_names``) are frozen, the expert's
  ``lm_head`` is a buffer and buffers are not broadcast each step; the global batch is split
  evenly over ranks; with several ranks a parameter digest of every replica is compared at each
  log step (``replica_digests`` in the log);
- checkpoints ``<run>/<step>/``: ``model.safetensors`` (openpi layout, ``Pi05.save_openpi``),
  ``optimizer.safetensors`` (AdamW moments by parameter name) and ``train_state.json`` (step,
  optimizer hyper-parameters, config); written atomically by rank 0; ``--resume`` continues
  from the latest. Randomness is re-seeded every step from ``(seed, step, rank)`` (flow-matching
  noise and time, the pruner's selection noise) and data is indexed by step, so a resumed run
  reproduces the uninterrupted one.

openpi's JAX ``pi05_libero`` also keeps an EMA of the weights (0.999); its PyTorch trainer,
which the seed uses, does not, and neither does this one.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import time
import typing
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from pi05_fastprune.model import Pi05, Pi05Config

__all__ = [
    "TrainConfig",
    "PRESETS",
    "get_preset",
    "lr_at",
    "noise_scale_at",
    "DataSource",
    "MapDataSource",
    "ShardedSampler",
    "SyntheticDataset",
    "make_data_source",
    "collate",
    "dead_parameter_names",
    "freeze_dead_parameters",
    "enable_activation_checkpointing",
    "prune_metrics",
    "PRUNE_METRIC_KEYS",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint_step",
    "train",
    "main",
]

log = logging.getLogger("pi05_fastprune.train")


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    name: str = "debug"  # the preset's name (the run directory is <checkpoint_base_dir>/<name>/<exp_name>)
    exp_name: str = "run"
    model: Pi05Config = dataclasses.field(default_factory=Pi05Config.dummy)

    # Data: "synthetic", or "package.module:factory" with factory(config, rank, world_size) -> DataSource.
    data: str = "synthetic"
    batch_size: int = 256  # global, split evenly over ranks
    num_workers: int = 0  # DataLoader workers of a MapDataSource (0: in the training process)
    grad_accum_steps: int = 1  # each rank's batch in this many micro-batches (DDP syncs on the last)
    num_train_steps: int = 30_000

    # openpi CosineDecaySchedule.
    warmup_steps: int = 10_000
    peak_lr: float = 5e-5
    decay_steps: int = 1_000_000
    decay_lr: float = 5e-5
    # openpi AdamW.
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-10
    clip_gradient_norm: float = 1.0

    # Pruning noise: "linear" = the seed's max(0, 1 - step/num_train_steps); "config" = the
    # model config's constant token_prune_noise_scale.
    prune_noise_schedule: str = "linear"

    seed: int = 42
    log_freq: int = 100
    save_interval: int = 1000
    keep_last_checkpoints: Optional[int] = None  # None: keep all
    checkpoint_base_dir: str = "./checkpoints"
    resume: bool = False
    overwrite: bool = False
    init_weights: Optional[str] = None  # an openpi model.safetensors (or its directory) to start from
    device: str = "auto"  # "auto": cuda:LOCAL_RANK if CUDA is available, else cpu
    activation_checkpointing: bool = False
    tensorboard: bool = True
    check_replicas: bool = True

    # Synthetic data (shaped like openpi's LIBERO/DROID batches).
    synthetic_num_samples: int = 100_000
    synthetic_num_tasks: int = 40
    synthetic_prompt_len: tuple[int, ...] = (8, 24)  # valid prompt tokens, inclusive range
    synthetic_real_action_dim: int = 7  # LIBERO: 7 (DROID: 8); padded with zeros to action_dim
    synthetic_absent_cameras: tuple[int, ...] = (2,)  # LIBERO/DROID have no right wrist camera

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.checkpoint_base_dir) / self.name / self.exp_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _libero_model(pruning: bool) -> Pi05Config:
    # openpi pi05_libero: Pi0Config(pi05=True, action_horizon=10) -> action_dim 32, 200 tokens;
    # openpi's PyTorch trainer trains in bfloat16 (pytorch_training_precision).
    return Pi05Config(
        action_horizon=10, action_dim=32, max_token_len=200, dtype="bfloat16",
        token_pruning_enabled=pruning, token_prune_noise_scale=1.0,
    )


def _libero(name: str, pruning: bool, batch_size: int = 256, save_interval: int = 1000) -> TrainConfig:
    return TrainConfig(
        name=name,
        model=_libero_model(pruning),
        batch_size=batch_size,
        num_train_steps=30_000,
        warmup_steps=10_000,
        peak_lr=5e-5,
        decay_steps=1_000_000,
        decay_lr=5e-5,
        clip_gradient_norm=1.0,
        log_freq=100,
        save_interval=save_interval,
        activation_checkpointing=True,
    )


def _openpi_defaults(name: str, model: Pi05Config, **fields: Any) -> TrainConfig:
    """openpi's TrainConfig defaults where a config sets no schedule of its own: its default
    CosineDecaySchedule (warmup 1k, peak 2.5e-5, cosine to 2.5e-6 over 30k steps)."""
    return TrainConfig(name=name, model=model, warmup_steps=1000, peak_lr=2.5e-5, decay_steps=30_000,
                       decay_lr=2.5e-6, **fields)


def _pick_place(name: str, pruning: bool) -> TrainConfig:
    # The seed's own fine-tuning configs: pi0.5 defaults (action horizon 50), three ALOHA cameras
    # (all present) and 14-dimensional actions; its LeRobot dataset plugs in through --data.
    return _openpi_defaults(
        name, Pi05Config(dtype="bfloat16", token_pruning_enabled=pruning), batch_size=16,
        num_train_steps=30_000, save_interval=5000, activation_checkpointing=True,
        synthetic_real_action_dim=14, synthetic_absent_cameras=(),
    )


def _debug(name: str, pruning: bool) -> TrainConfig:
    return TrainConfig(
        name=name,
        model=Pi05Config.dummy(token_pruning_enabled=pruning, action_horizon=10, max_token_len=48),
        batch_size=2,
        num_train_steps=10,
        warmup_steps=2,
        peak_lr=1e-3,
        decay_steps=10,
        decay_lr=1e-4,
        log_freq=1,
        save_interval=5,
        synthetic_num_samples=64,
        synthetic_num_tasks=4,
        synthetic_prompt_len=(4, 16),
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    # openpi's pi05_libero (batch 256 over all ranks), with and without pruning.
    "pi05_libero": lambda: _libero("pi05_libero", pruning=False),
    "pi05_libero_lightvla": lambda: _libero("pi05_libero_lightvla", pruning=True),
    "debug": lambda: _debug("debug", pruning=True),
    # The seed's configs under its names, with its settings: the LIBERO runs at batch 64 (its
    # single-GPU choice) saving every 5000 steps, its pick-and-place fine-tuning, and openpi's
    # debug_pi05 (pruning off; the seed's command turns it on with --model.token_pruning_enabled True).
    "pi05_libero_pytorch": lambda: _libero("pi05_libero_pytorch", False, batch_size=64, save_interval=5000),
    "pi05_libero_pytorch_lightvla": lambda: _libero("pi05_libero_pytorch_lightvla", True, batch_size=64,
                                                    save_interval=5000),
    "pi05_pick_place_pytorch": lambda: _pick_place("pi05_pick_place_pytorch", pruning=False),
    "pi05_pick_place_pytorch_pruning": lambda: _pick_place("pi05_pick_place_pytorch_pruning", pruning=True),
    # openpi's debug_pi05: the dummy Gemmas at pi0.5's defaults (horizon 50, 200 prompt tokens),
    # here with the tiny SigLIP of Pi05Config.dummy; logged every step and saved twice in its 10.
    "debug_pi05": lambda: _openpi_defaults(
        "debug_pi05", Pi05Config.dummy(token_pruning_enabled=False, action_horizon=50, max_token_len=200),
        exp_name="debug_pi05", batch_size=2, num_train_steps=10, overwrite=True, log_freq=1, save_interval=5,
        synthetic_num_samples=64, synthetic_num_tasks=4),
}


def get_preset(name: str, **overrides: Any) -> TrainConfig:
    """A preset with ``overrides`` (``model`` may be a dict of ``Pi05Config`` field overrides)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    model_over = overrides.pop("model", None)
    if isinstance(model_over, dict):
        cfg.model = dataclasses.replace(cfg.model, **model_over)
    elif model_over is not None:
        cfg.model = model_over
    return dataclasses.replace(cfg, **overrides)


# ----------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """openpi's CosineDecaySchedule (optax warmup_cosine_decay_schedule) at ``step``."""
    warmup, peak, end = cfg.warmup_steps, cfg.peak_lr, cfg.decay_lr
    if step < warmup:
        init = peak / (warmup + 1)
        return init + (peak - init) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.decay_steps - warmup))
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def noise_scale_at(step: int, cfg: TrainConfig) -> Optional[float]:
    """The pruner's training noise at ``step``: the seed's linear decay, or None (config's)."""
    if cfg.prune_noise_schedule == "linear":
        return max(0.0, 1.0 - float(step / max(1, int(cfg.num_train_steps))))
    if cfg.prune_noise_schedule == "config":
        return None
    raise ValueError(f"prune_noise_schedule must be 'linear' or 'config', got {cfg.prune_noise_schedule!r}")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The per-(step, rank) seed of torch's global generators (flow noise/time, pruner noise)."""
    return (int(seed) * 1_000_003 + int(step) * 1009 + int(rank)) % (2**63 - 1)


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------
#
# A batch is a dict:
#   images      list (one per camera, model.py's IMAGE_KEYS order) of [B, 3, S, S] float32 in [-1, 1]
#   img_masks   list of [B] bool (absent camera: image all -1 (openpi's zero uint8 image), False)
#   lang_tokens [B, L] int64, lang_masks [B, L] bool (L = max_token_len, prompt padded)
#   actions     [B, H, A] float32 (normalized, padded to the model's action_dim)
#   noise [B, H, A], time [B] (optional: fixed flow-matching noise / time, for tests)
# A sample (what a map-style dataset returns) is the same without the batch dimension.


def collate(samples: Sequence[dict]) -> dict:
    """Stack samples into a batch (lists are per camera)."""
    out: dict = {}
    for key, first in samples[0].items():
        if isinstance(first, (list, tuple)):
            out[key] = [torch.stack([torch.as_tensor(s[key][c]) for s in samples]) for c in range(len(first))]
        else:
            out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    return out


class DataSource(abc.ABC):
    """This rank's batches, addressed by global step (so resuming at step ``s`` is exact).

    ``batch(step)`` is this rank's share of global batch ``step``; ``iterate(start)`` yields
    ``batch(start), batch(start + 1), ...`` (override it to prefetch).
    """

    @abc.abstractmethod
    def batch(self, step: int) -> dict: ...

    def iterate(self, start_step: int) -> Iterator[dict]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


class ShardedSampler:
    """Sample indices of global batch ``step`` for one rank: an endless stream of seeded
    permutations of ``range(num_samples)`` (a new one each epoch), cut into global batches of
    ``global_batch``; rank ``r`` takes the ``r``-th of ``world_size`` equal slices. The global
    batch does not depend on the number of ranks."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int, shuffle=True):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {world_size} ranks")
        self.num_samples, self.global_batch = int(num_samples), int(global_batch)
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, int(seed), shuffle
        self.local_batch = global_batch // world_size
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            if self.shuffle:
                g = torch.Generator().manual_seed(step_seed(self.seed, epoch, 7919))
                self._perms[epoch] = torch.randperm(self.num_samples, generator=g)
            else:
                self._perms[epoch] = torch.arange(self.num_samples)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        start = step * self.global_batch + self.rank * self.local_batch
        out = []
        for p in range(start, start + self.local_batch):
            epoch, offset = divmod(p, self.num_samples)
            out.append(int(self._perm(epoch)[offset]))
        return out


class _StepBatches(torch.utils.data.Sampler):
    """Index lists of steps start, start+1, ... (a DataLoader batch_sampler)."""

    def __init__(self, sampler: ShardedSampler, start_step: int):
        self.sampler, self.start = sampler, start_step

    def __iter__(self):
        step = self.start
        while True:
            yield self.sampler.indices(step)
            step += 1


class MapDataSource(DataSource):
    """A map-style dataset (``len``, ``__getitem__`` -> sample dict) as a DataSource: how a
    LeRobot dataset plugs in (wrap it with a transform producing the sample dict: images
    resized to the model's resolution and scaled to [-1, 1], tokenized prompt, normalized and
    padded actions of the model's horizon). For example, with ``--data my_pkg.libero:make_source``::

        def make_source(cfg, rank, world_size):
            frames = LeRobotDataset("physical-intelligence/libero", delta_timestamps=...)
            samples = ToPi05Samples(frames, tokenizer, norm_stats, cfg.model)  # -> sample dicts
            sampler = ShardedSampler(len(samples), cfg.batch_size, rank, world_size, cfg.seed)
            return MapDataSource(samples, sampler, num_workers=cfg.num_workers, pin_memory=True)
    """

    def __init__(self, dataset, sampler: ShardedSampler, num_workers: int = 0, collate_fn=collate,
                 pin_memory: bool = False):
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers
        self.collate_fn, self.pin_memory = collate_fn, pin_memory

    def batch(self, step: int) -> dict:
        return self.collate_fn([self.dataset[i] for i in self.sampler.indices(step)])

    def iterate(self, start_step: int) -> Iterator[dict]:
        if self.num_workers == 0:
            yield from super().iterate(start_step)
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_StepBatches(self.sampler, start_step), num_workers=self.num_workers,
            collate_fn=self.collate_fn, pin_memory=self.pin_memory, persistent_workers=False,
        )
        yield from loader


class SyntheticDataset:
    """Deterministic LIBERO/DROID-shaped samples (item ``i`` depends only on ``(seed, i)``).

    Cameras: smooth random images in [-1, 1] at the model's resolution; the cameras listed in
    ``absent_cameras`` are absent (all -1, mask False). Prompt: a task-specific token sequence
    (task ``i % num_tasks``) of a length in ``prompt_len``, padded with 0 to ``max_token_len``.
    Actions: a task-specific smooth trajectory plus a little per-sample noise on the first
    ``real_action_dim`` dims, zero padding after (openpi pads actions to the model's dim).
    """

    def __init__(self, model: Pi05Config, num_samples: int, seed: int, num_tasks: int = 40,
                 prompt_len: Sequence[int] = (8, 24), real_action_dim: int = 7,
                 absent_cameras: Sequence[int] = (2,)):
        self.cfg, self.num_samples, self.seed = model, int(num_samples), int(seed)
        self.num_tasks = max(1, int(num_tasks))
        lo, hi = (int(prompt_len[0]), int(prompt_len[-1]))
        L = model.max_token_len
        if not 1 <= lo <= hi <= L:
            raise ValueError(f"prompt_len {tuple(prompt_len)} must lie in [1, max_token_len={L}]")
        self.prompt_len = (lo, hi)
        self.real_action_dim = min(int(real_action_dim), model.action_dim)
        self.absent = tuple(int(c) for c in absent_cameras)
        if any(not 0 <= c < model.num_cameras for c in self.absent):
            raise ValueError(f"absent cameras {self.absent} out of range for {model.num_cameras} cameras")

    def __len__(self) -> int:
        return self.num_samples

    def _task(self, task: int):
        g = torch.Generator().manual_seed(step_seed(self.seed, task, 104729))
        lo, hi = self.prompt_len
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        tokens = torch.randint(2, self.cfg.vocab_size, (n,), generator=g)
        coef = torch.randn(4, self.real_action_dim, generator=g)
        return tokens, coef

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        cfg = self.cfg
        g = torch.Generator().manual_seed(step_seed(self.seed, i, 15485863))
        S, C, L, H, A = cfg.vision.image_size, cfg.num_cameras, cfg.max_token_len, cfg.action_horizon, cfg.action_dim
        low = torch.rand(C, 3, 8, 8, generator=g) * 2 - 1
        images = F.interpolate(low, size=(S, S), mode="bilinear", align_corners=False).clamp(-1, 1)
        masks = torch.ones(C, dtype=torch.bool)
        for c in self.absent:
            images[c] = -1.0
            masks[c] = False
        tokens, coef = self._task(i % self.num_tasks)
        lang = torch.zeros(L, dtype=torch.int64)
        lang[: len(tokens)] = tokens
        lang_mask = torch.arange(L) < len(tokens)
        t = torch.linspace(0, 1, H)[:, None]
        traj = coef[0] + coef[1] * t + coef[2] * torch.sin(math.pi * t) + 0.5 * coef[3] * t**2
        actions = torch.zeros(H, A)
        actions[:, : self.real_action_dim] = traj + 0.05 * torch.randn(H, self.real_action_dim, generator=g)
        return dict(
            images=list(images.unbind(0)), img_masks=list(masks.unbind(0)), lang_tokens=lang,
            lang_masks=lang_mask, actions=actions,
        )


def _import_factory(spec: str) -> Callable:
    import importlib

    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"data must be 'synthetic' or 'package.module:factory', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def make_data_source(cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> DataSource:
    """The configured data source for one rank."""
    if cfg.data == "synthetic":
        ds = SyntheticDataset(
            cfg.model, cfg.synthetic_num_samples, cfg.seed, cfg.synthetic_num_tasks, cfg.synthetic_prompt_len,
            cfg.synthetic_real_action_dim, cfg.synthetic_absent_cameras,
        )
        sampler = ShardedSampler(len(ds), cfg.batch_size, rank, world_size, cfg.seed)
        return MapDataSource(ds, sampler, num_workers=cfg.num_workers)
    source = _import_factory(cfg.data)(cfg, rank, world_size)
    if not isinstance(source, DataSource):
        raise TypeError(f"{cfg.data} returned {type(source).__name__}, not a DataSource")
    return source


def check_batch(batch: dict, model: Pi05Config, local_batch: int) -> None:
    """Shapes and dtypes of a batch; a clear error instead of one deep in the model."""
    S, C, H, A = model.vision.image_size, model.num_cameras, model.action_horizon, model.action_dim
    images, masks = batch["images"], batch["img_masks"]
    B = local_batch
    problems = []
    if len(images) != C or len(masks) != C:
        problems.append(f"{len(images)} images / {len(masks)} masks for {C} cameras")
    for c, (im, m) in enumerate(zip(images, masks)):
        if tuple(im.shape) != (B, 3, S, S) or not im.is_floating_point():
            problems.append(f"images[{c}] {im.dtype} {tuple(im.shape)}, expected float [{B}, 3, {S}, {S}]")
        if tuple(m.shape) != (B,) or m.dtype != torch.bool:
            problems.append(f"img_masks[{c}] {m.dtype} {tuple(m.shape)}, expected bool [{B}]")
    tok, lm, act = batch["lang_tokens"], batch["lang_masks"], batch["actions"]
    if tok.dim() != 2 or tok.shape[0] != B or tok.dtype != torch.int64:
        problems.append(f"lang_tokens {tok.dtype} {tuple(tok.shape)}, expected int64 [{B}, L]")
    if tuple(lm.shape) != tuple(tok.shape) or lm.dtype != torch.bool:
        problems.append(f"lang_masks {lm.dtype} {tuple(lm.shape)}, expected bool {tuple(tok.shape)}")
    if tuple(act.shape) != (B, H, A) or not act.is_floating_point():
        problems.append(f"actions {act.dtype} {tuple(act.shape)}, expected float [{B}, {H}, {A}]")
    if problems:
        raise ValueError("bad batch: " + "; ".join(problems))


def _to_device(batch: dict, device: torch.device) -> dict:
    def move(x):
        if isinstance(x, (list, tuple)):
            return [move(v) for v in x]
        return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x

    return {k: move(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------
# Model setup
# ----------------------------------------------------------------------------------------


def dead_parameter_names(model: Pi05) -> list[str]:
    """Parameters that no loss gradient reaches: the prefix output of the LLM's last layer
    feeds nothing (the expert reads only its keys/values), so that layer's output projection,
    MLP norm and MLP, and the LLM's final norm, are unused by ``forward`` (and by inference).
    Frozen so that DDP runs with ``find_unused_parameters=False``."""
    last = len(model.llm.blocks) - 1
    prefixes = [f"llm.blocks.{last}.{m}." for m in ("o", "mlp_norm", "gate", "up", "down")] + ["llm.norm."]
    return [n for n, _ in model.named_parameters() if any(n.startswith(p) for p in prefixes)]


def freeze_dead_parameters(model: Pi05) -> list[str]:
    names = set(dead_parameter_names(model))
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)
    return sorted(names)


def _checkpointed(fn, *args):
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def enable_activation_checkpointing(model: Pi05) -> None:
    """Recompute in the backward instead of storing: each SigLIP block, and the second half
    (output projection, residual, MLP) of each Gemma layer of the LLM and the expert. Done
    by wrapping the block instances' methods; the model code is unchanged."""
    for blk in model.vision.blocks:
        blk.forward = functools.partial(_checkpointed, blk.forward)
    for blk in list(model.llm.blocks) + list(model.expert.blocks):
        blk.finish = functools.partial(_checkpointed, blk.finish)


def _load_model_tensors(model: Pi05, path: str | os.PathLike) -> None:
    """Fill ``model`` in place from an openpi ``model.safetensors`` or its directory (strict on
    names/shapes)."""
    from pi05_fastprune.openpi_checkpoint import openpi_names, weights_file

    names = openpi_names(model)
    targets = model.state_dict()
    path = weights_file(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        expected = {names[k] for k in targets}
        if keys != expected:
            missing, unexpected = sorted(expected - keys)[:10], sorted(keys - expected)[:10]
            raise ValueError(f"{path}: tensors do not match the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for k, t in targets.items():
                src = f.get_tensor(names[k])
                if tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"{path}: {names[k]} has shape {tuple(src.shape)}, model {tuple(t.shape)}")
                t.copy_(src)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "train_state.json"


def latest_checkpoint_step(run_dir: str | os.PathLike) -> Optional[int]:
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return None
    steps = [int(d.name) for d in run_dir.iterdir() if d.is_dir() and d.name.isdigit() and (d / STATE_FILE).exists()]
    return max(steps) if steps else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer, param_names: Sequence[str]) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    out = {}
    for idx, per_param in state.items():
        for key, value in per_param.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{param_names[idx]}::{key}"] = t.detach().to("cpu").contiguous()
    return out


def save_checkpoint(run_dir, step: int, model: Pi05, optimizer, param_names: Sequence[str], cfg: TrainConfig,
                    keep_last: Optional[int] = None) -> pathlib.Path:
    """Write ``<run_dir>/<step>/`` atomically (a temporary directory renamed at the end)."""
    run_dir = pathlib.Path(run_dir)
    final, tmp = run_dir / str(step), run_dir / f"tmp_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_openpi(str(tmp / MODEL_FILE))
    save_file(_optimizer_tensors(optimizer, param_names), str(tmp / OPTIM_FILE))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    state = dict(step=step, param_names=list(param_names), param_groups=groups, config=cfg.to_dict(),
                 lr_schedule=dict(warmup_steps=cfg.warmup_steps, peak_lr=cfg.peak_lr,
                                  decay_steps=cfg.decay_steps, decay_lr=cfg.decay_lr),
                 time=time.time())
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last is not None:
        steps = sorted(int(d.name) for d in run_dir.iterdir() if d.is_dir() and d.name.isdigit())
        for s in steps[:-keep_last] if keep_last > 0 else steps:
            if s != step:
                shutil.rmtree(run_dir / str(s), ignore_errors=True)
    return final


def load_checkpoint(ckpt_dir, model: Pi05, optimizer, param_names: Sequence[str]) -> int:
    """Restore model weights and optimizer state from ``ckpt_dir``; returns its step."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    _load_model_tensors(model, ckpt_dir / MODEL_FILE)
    if list(state["param_names"]) != list(param_names):
        raise ValueError(f"{ckpt_dir}: the checkpoint's trainable parameters differ from the model's")
    index = {n: i for i, n in enumerate(param_names)}
    per_param: dict[int, dict] = {}
    with safe_open(str(ckpt_dir / OPTIM_FILE), framework="pt", device="cpu") as f:
        for key in f.keys():
            name, _, field = key.rpartition("::")
            per_param.setdefault(index[name], {})[field] = f.get_tensor(key)
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(state["param_groups"]):
        raise ValueError(f"{ckpt_dir}: {len(state['param_groups'])} param groups saved, optimizer has {len(current)}")
    groups = []
    for cur, saved in zip(current, state["param_groups"]):
        g = dict(cur)
        g.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        groups.append(g)
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    return int(state["step"])


# ----------------------------------------------------------------------------------------
# Telemetry
# ----------------------------------------------------------------------------------------

# The seed's wandb keys (its table in section 8.4) <- get_token_pruning_stats() keys
# (averaged over the batch where the stat is per sample).
PRUNE_METRIC_KEYS = {
    "prune/kept_ratio_overall_mean": "last_kept_ratio_overall_mean",
    "prune/kept_tokens_overall_mean": "last_kept_overall_mean",
    "prune/kept_tokens_overall_min": "last_kept_overall_min",
    "prune/kept_tokens_overall_max": "last_kept_overall_max",
    "prune/kept_tokens_overall_mean_noisy": "last_kept_per_sample_noisy",
    "prune/task_valid_len_mean": "last_task_valid_len",
    "prune/task_attn_masked_len_mean": "last_task_attn_masked_len",
    "prune/argmax_union_mean": "last_argmax_union_det",
    "prune/argmax_union_mean_noisy": "last_argmax_union_noisy",
    "prune/argmax_top1_share_mean": "last_argmax_top1_share_det",
    "prune/argmax_top1_share_mean_noisy": "last_argmax_top1_share_noisy",
    "prune/patches_std_mean": "last_patches_std_mean",
    "prune/task_std_mean": "last_task_std_mean",
    "prune/queries_before_norm_std_mean": "last_queries_before_norm_std_mean",
    "prune/queries_after_norm_std_mean": "last_queries_after_norm_std_mean",
    "prune/queries_before_norm_cosine_mean": "last_queries_before_norm_cosine_sim",
    "prune/queries_after_norm_cosine_mean": "last_queries_after_norm_cosine_sim",
    "prune/score_abs_max_det_mean": "last_score_abs_max_det",
    "prune/score_top1_gap_det_mean": "last_score_top1_gap_mean_det",
}


def prune_metrics(stats: dict) -> dict[str, float]:
    """The seed's ``prune/*`` metrics from ``Pi05.get_token_pruning_stats()`` (missing stats
    are left out; per-sample lists become their mean)."""
    if not stats.get("enabled"):
        return {}
    out: dict[str, float] = {}
    for key, src in PRUNE_METRIC_KEYS.items():
        value = stats.get(src)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            if not value:
                continue
            value = sum(float(v) for v in value) / len(value)
        out[key] = float(value)
    for suffix in ("mean", "min", "max"):  # the seed's per-image keys (one "image": all cameras)
        for i, value in enumerate(stats.get(f"last_kept_per_image_{suffix}") or []):
            out[f"prune/img{i}_kept_{suffix}"] = float(value)
    if stats.get("noise_scale") is not None:
        out["prune/noise_scale"] = float(stats["noise_scale"])
    return out


def _logged_before(line: str, step: int) -> bool:
    try:
        return json.loads(line)["step"] < step
    except (ValueError, KeyError, TypeError):  # a line cut short as the earlier process stopped
        return False


class MetricsWriter:
    """JSON lines (and TensorBoard scalars when available), rank 0 only.

    A run resumed at ``start_step`` first drops what an earlier process logged from that step
    on (it ran past its last checkpoint before it stopped), so every step is logged once."""

    def __init__(self, run_dir: pathlib.Path, tensorboard: bool, start_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        if start_step > 0 and self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = "".join(line for line in lines if _logged_before(line, start_step))
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text(kept)
            os.replace(tmp, self.path)
        self.file = open(self.path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the earlier process's events from start_step on.
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
            except ImportError:  # tensorboard not installed
                self.tb = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _param_digest(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """``[sum p, sum |p|]`` over every parameter, in float64."""
    s = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for p in model.parameters():
            s[0] += torch.sum(p, dtype=torch.float64)
            s[1] += torch.sum(p.abs(), dtype=torch.float64)
    return s


# ----------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------


def _setup_distributed(cfg: TrainConfig):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def _step_batch(batch: dict):
    """``Pi05.forward`` arguments of a batch."""
    args = (batch["images"], batch["img_masks"], batch["lang_tokens"], batch["lang_masks"], batch["actions"])
    return args, dict(noise=batch.get("noise"), time=batch.get("time"))


def _split_batch(batch: dict, n: int) -> list[dict]:
    """``n`` equal micro-batches along the batch dimension."""
    if n == 1:
        return [batch]

    def chunks(x):
        if isinstance(x, (list, tuple)):
            return list(zip(*[chunks(v) for v in x]))
        return x.chunk(n, dim=0) if isinstance(x, torch.Tensor) else [x] * n

    per_key = {k: chunks(v) for k, v in batch.items()}
    return [{k: (list(v[i]) if isinstance(batch[k], (list, tuple)) else v[i]) for k, v in per_key.items()}
            for i in range(n)]


def _forward_backward(net: torch.nn.Module, batch: dict, accum: int, ddp: bool) -> torch.Tensor:
    """Loss (mean over the rank's batch) and its gradient, in ``accum`` micro-batches; under
    DDP the gradients are all-reduced once, in the last micro-batch's backward."""
    micro = _split_batch(batch, accum)
    total = None
    for i, mb in enumerate(micro):
        args, kwargs = _step_batch(mb)
        sync = not ddp or i == len(micro) - 1
        with contextlib.nullcontext() if sync else net.no_sync():
            loss = net(*args, **kwargs).mean() / len(micro)
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def build(cfg: TrainConfig, device: torch.device):
    """Model (train mode, dead parameters frozen), the trainable names and AdamW."""
    model = Pi05(cfg.model, device=device, seed=cfg.seed)
    if cfg.init_weights:
        _load_model_tensors(model, cfg.init_weights)
    freeze_dead_parameters(model)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [p for _, p in named], lr=lr_at(0, cfg), betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=cfg.weight_decay,
    )
    return model, [n for n, _ in named], optimizer


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns ``{"step", "run_dir", "last_metrics"}``."""
    rank, world_size, device = _setup_distributed(cfg)
    is_main = rank == 0
    run_dir = cfg.run_dir
    start_step = 0
    latest = latest_checkpoint_step(run_dir)
    if cfg.resume:
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
    elif latest is not None or (run_dir / "metrics.jsonl").exists():
        if not cfg.overwrite:
            raise FileExistsError(f"{run_dir} already has a run; pass --resume or --overwrite")
        if is_main:
            shutil.rmtree(run_dir)
    if world_size > 1:
        dist.barrier()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))

    local_batch = cfg.batch_size // world_size
    if local_batch * world_size != cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world_size} ranks")
    if cfg.grad_accum_steps < 1 or local_batch % cfg.grad_accum_steps:
        raise ValueError(f"the batch per rank ({local_batch}) is not divisible by grad_accum_steps {cfg.grad_accum_steps}")

    torch.manual_seed(cfg.seed)
    model, param_names, optimizer = build(cfg, device)
    if cfg.resume:
        start_step = load_checkpoint(run_dir / str(latest), model, optimizer, param_names)
    net: torch.nn.Module = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False, gradient_as_bucket_view=True, broadcast_buffers=False,
        )
    params = [p for p in model.parameters() if p.requires_grad]

    if is_main:
        n_train = sum(p.numel() for p in params)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("run %s: %s, %d rank(s) on %s, batch %d (%d per rank), steps %d..%d, %.1fM/%.1fM params trained",
                 run_dir, cfg.name, world_size, device, cfg.batch_size, local_batch, start_step,
                 cfg.num_train_steps, n_train / 1e6, n_all / 1e6)
        if cfg.model.token_pruning_enabled:
            log.info("Enabled LightVLA-style token pruning (hidden_size=%d)", cfg.model.llm.width)
            noise = cfg.model.token_prune_noise_scale
            if cfg.prune_noise_schedule == "linear":
                # The seed's loop overrides the config's noise scale too; say so where it is set.
                level = logging.INFO if noise in (None, 1.0) else logging.WARNING
                log.log(level, "pruning noise: the seed's linear decay from 1 to 0 over %d steps; "
                        "model.token_prune_noise_scale=%s is not used (--prune_noise_schedule config keeps it "
                        "constant)", cfg.num_train_steps, noise)
            else:
                log.info("pruning noise: constant model.token_prune_noise_scale=%s", noise)
    writer = MetricsWriter(run_dir, cfg.tensorboard, start_step) if is_main else None

    source = make_data_source(cfg, rank, world_size)
    batches = source.iterate(start_step)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    gnorm_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_acc, t_last, last_metrics = 0, time.time(), None
    step = start_step
    try:
        while step < cfg.num_train_steps:
            batch = next(batches)
            if step == start_step:
                check_batch(batch, cfg.model, local_batch)
            batch = _to_device(batch, device)
            torch.manual_seed(step_seed(cfg.seed, step, rank))
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.model.token_pruning_enabled:
                model.set_token_pruner_noise_scale(noise_scale_at(step, cfg))

            loss = _forward_backward(net, batch, cfg.grad_accum_steps, world_size > 1)
            if step == start_step:
                missing = [n for n, p in zip(param_names, params) if p.grad is None]
                if missing:
                    raise RuntimeError(f"trainable parameters without a gradient: {missing[:10]}")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=cfg.clip_gradient_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double()
            gnorm_sum += grad_norm.detach().double()
            n_acc += 1

            done = step + 1
            if step % cfg.log_freq == 0 or done == cfg.num_train_steps:
                last_metrics = _log_step(cfg, step, model, loss_sum, gnorm_sum, n_acc, lr, t_last,
                                         world_size, device, writer)
                loss_sum.zero_(), gnorm_sum.zero_()
                n_acc, t_last = 0, time.time()
            if done % cfg.save_interval == 0 or done == cfg.num_train_steps:
                if is_main:
                    path = save_checkpoint(run_dir, done, model, optimizer, param_names, cfg,
                                           cfg.keep_last_checkpoints)
                    log.info("saved checkpoint %s", path)
                if world_size > 1:
                    dist.barrier()
            step = done
    finally:
        if writer is not None:
            writer.close()
    if world_size > 1:
        dist.barrier()
    return dict(step=step, run_dir=str(run_dir), last_metrics=last_metrics, rank=rank, world_size=world_size)


def _log_step(cfg, step, model, loss_sum, gnorm_sum, n_acc, lr, t_last, world_size, device, writer):
    sums = torch.stack([loss_sum, gnorm_sum])
    digests = None
    if world_size > 1:
        dist.all_reduce(sums)
        sums /= world_size
        if cfg.check_replicas:
            mine = _param_digest(model, device)
            gathered = [torch.zeros_like(mine) for _ in range(world_size)]
            dist.all_gather(gathered, mine)
            digests = [g.tolist() for g in gathered]
    loss, gnorm = (sums / n_acc).tolist()
    if writer is None:
        if not math.isfinite(loss):  # every rank stops, not only the one that logs
            raise FloatingPointError(f"step {step}: loss is {loss}")
        return None
    record: dict = dict(step=step, loss=loss, grad_norm=gnorm, learning_rate=lr,
                        time_per_step=(time.time() - t_last) / n_acc)
    if cfg.model.token_pruning_enabled:
        stats = model.get_token_pruning_stats()
        record.update(prune_metrics(stats))
    if digests is not None:
        record["replica_digests"] = digests
        if any(d != digests[0] for d in digests):
            record["replica_mismatch"] = True
            log.warning("step %d: the DDP replicas' parameters differ: %s", step, digests)
    writer.write(record)
    # The seed's log line: step=1000 loss=0.1234 lr=5.00e-05 prune/kept_ratio_overall_mean=...
    line = f"step={step} loss={loss:.4f} lr={lr:.2e} grad_norm={gnorm:.2f}"
    for k in ("prune/kept_ratio_overall_mean", "prune/kept_tokens_overall_mean", "prune/noise_scale"):
        if k in record:
            line += f" {k}={record[k]:.4g}"
    log.info(line)
    if not math.isfinite(loss):
        raise FloatingPointError(f"step {step}: loss is {loss}")
    return record


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _converter(tp) -> Callable[[str], Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        inner = _converter(next(a for a in args if a is not type(None)))
        return lambda s: None if s.lower() in ("none", "null", "") else inner(s)
    if tp is bool:
        def to_bool(s: str) -> bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"not a boolean: {s!r}")
        return to_bool
    if origin is tuple:
        item = _converter(args[0]) if args else str
        return lambda s: tuple(item(v) for v in s.split(",") if v.strip())
    if tp in (int, float, str):
        return tp
    raise TypeError(f"no command-line conversion for {tp}")


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m pi05_fastprune.train", description=__doc__.split("\n\n")[0])
    # The preset by name, as openpi's command line gives its config (`train_pytorch.py NAME`),
    # or with --preset; debug by default.
    parser.add_argument("config_name", nargs="?", choices=sorted(PRESETS), help="the preset (as --preset)")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    # openpi's and the seed's name for --init_weights.
    parser.add_argument("--pytorch_weight_path", dest="init_weights", default=argparse.SUPPRESS)
    def add(flag, tp, **kw):
        # A bool option alone means true (`--resume`, as openpi's command line); a value sets it.
        flag_kw = dict(nargs="?", const=True) if tp is bool else {}
        parser.add_argument(flag, type=_converter(tp), default=argparse.SUPPRESS, **flag_kw, **kw)

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("model", "name"):
            add(f"--{f.name}", hints[f.name])
    model_hints = typing.get_type_hints(Pi05Config)
    for f in dataclasses.fields(Pi05Config):
        add(f"--model.{f.name}", model_hints[f.name], dest=f"model__{f.name}")
    ns = vars(parser.parse_args(argv))
    named, flagged = ns.pop("config_name"), ns.pop("preset")
    if named and flagged and named != flagged:
        parser.error(f"two presets given: {named!r} and --preset {flagged!r}")
    preset = named or flagged or "debug"
    model_over = {k[len("model__"):]: v for k, v in ns.items() if k.startswith("model__")}
    over = {k: v for k, v in ns.items() if not k.startswith("model__")}
    return get_preset(preset, model=model_over, **over)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname).1s] %(message)s", stream=sys.stdout)
    cfg = parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # `python -m pi05_fastprune.train` runs this file as __main__, a second copy of the module:
    # run the package module's main, so that the DataSource classes a --data factory imports
    # are the ones make_data_source checks against.
    from pi05_fastprune.train import main as package_main

    package_main()
