"""A pi0.5 policy over ``Pi05``: raw observation in, un-normalized action chunk out.

The pipeline is openpi's ``create_trained_policy`` for a pi0.5 model (upstream commit 15a9616),
written from scratch, for observations already keyed by the model's camera names:

    state  -> Normalize (quantiles, norm_stats["state"])         [normalize.py]
    prompt + normalized state -> "Task: ..., State: ...;\\nAction: " tokens  [tokenizer.py]
    images -> uint8 HWC -> resize_with_pad 224 -> [-1, 1] CHW, absent cameras -1 / mask False
                                                                  [preprocess.py]
    Pi05.sample_actions (flow matching, 10 Euler steps)  -> [B, H, action_dim]
    actions -> Unnormalize (quantiles, norm_stats["actions"]; padding dims pass through)
            -> first ``action_dims`` dimensions (openpi's per-robot ``*Outputs`` cut)

An observation is a dict: camera images either under ``"image"`` (``{name: array}``, openpi's
model-side layout, optionally with ``"image_mask"``) or as top-level keys
(``base_0_rgb``, ``left_wrist_0_rgb``, ``right_wrist_0_rgb``); ``"state"`` (raw, dataset
dimensions); ``"prompt"`` (str). ``robot="libero"`` / ``"droid"`` takes observations keyed as
openpi's LIBERO / DROID clients send them (its ``LiberoInputs`` / ``DroidInputs``); other robots'
key mapping is the caller's job.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from pi05_fastprune.model import IMAGE_KEYS, Pi05, Pi05Config
from pi05_fastprune.normalize import NormStats, load_norm_stats, normalize, unnormalize
from pi05_fastprune.openpi_checkpoint import weights_file
from pi05_fastprune.preprocess import preprocess_cameras
from pi05_fastprune.tokenizer import PaligemmaTokenizer

__all__ = ["Pi05Policy", "ROBOTS", "Robot", "libero_inputs", "droid_inputs", "libero_example", "droid_example"]

PathLike = Union[str, os.PathLike]
_UNSET: Any = object()
_OBS_KEYS = {"state", "prompt", "image", "image_mask", *IMAGE_KEYS}
# Pi05Config pruning fields, by the short names the policy uses.
_PRUNING_FIELDS = {
    "enabled": "token_pruning_enabled",
    "keep_tokens": "token_prune_keep_tokens",
    "keep_ratio": "token_prune_keep_ratio",
    "max_tokens": "token_prune_max_tokens",
    "noise_scale": "token_prune_noise_scale",
    "mask_voters": "token_prune_mask_voters",
}


def _robot_keys(obs: Mapping[str, Any], robot: str, keys: Sequence[str]) -> None:
    if not isinstance(obs, Mapping):
        raise TypeError(f"a {robot} observation must be a dict, got {type(obs).__name__}")
    missing = [k for k in keys if k not in obs]
    if missing:
        raise ValueError(f"{robot} observation lacks {missing} (has {sorted(obs)})")


def _with_prompt(inputs: dict, obs: Mapping[str, Any]) -> dict:
    if "prompt" in obs:
        inputs["prompt"] = obs["prompt"]
    return inputs


def libero_inputs(obs: Mapping[str, Any]) -> dict:
    """openpi's ``LiberoInputs`` for pi0.5: LIBERO's observation keys -> the model's (its third-person
    and wrist cameras; no right wrist camera, so that one is absent)."""
    _robot_keys(obs, "libero", ("observation/image", "observation/wrist_image", "observation/state"))
    return _with_prompt({
        "state": obs["observation/state"],
        "image": {"base_0_rgb": obs["observation/image"], "left_wrist_0_rgb": obs["observation/wrist_image"]},
    }, obs)


def droid_inputs(obs: Mapping[str, Any]) -> dict:
    """openpi's ``DroidInputs`` for pi0.5: state = joint positions then the gripper position (a
    scalar or one value), the left exterior and wrist cameras (no right wrist camera)."""
    _robot_keys(obs, "droid", ("observation/exterior_image_1_left", "observation/wrist_image_left",
                               "observation/joint_position", "observation/gripper_position"))
    gripper = np.asarray(obs["observation/gripper_position"]).reshape(-1)
    return _with_prompt({
        "state": np.concatenate([np.asarray(obs["observation/joint_position"]), gripper]),
        "image": {"base_0_rgb": obs["observation/exterior_image_1_left"],
                  "left_wrist_0_rgb": obs["observation/wrist_image_left"]},
    }, obs)


def _camera_image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)


def libero_example(rng: np.random.Generator) -> dict:
    """A random observation as openpi's LIBERO client sends it (openpi's ``make_libero_example``)."""
    return {"observation/state": rng.random(8), "observation/image": _camera_image(rng),
            "observation/wrist_image": _camera_image(rng), "prompt": "do something"}


def droid_example(rng: np.random.Generator) -> dict:
    """A random observation as openpi's DROID client sends it (openpi's ``make_droid_example``)."""
    return {"observation/exterior_image_1_left": _camera_image(rng), "observation/wrist_image_left": _camera_image(rng),
            "observation/joint_position": rng.random(7), "observation/gripper_position": rng.random(1),
            "prompt": "do something"}


class Robot(NamedTuple):
    """A robot's observation layout as openpi's client sends it (``inputs`` maps it to the model's,
    ``example`` draws one), and what openpi's pi0.5 config for it sets: the action dimensions its
    outputs keep (LiberoOutputs / DroidOutputs) and whether the state goes into the prompt
    (pi05_libero: no; pi05_droid: pi0.5's default, yes)."""

    inputs: Callable[[Mapping[str, Any]], dict]
    example: Callable[[np.random.Generator], dict]
    action_dims: int
    discrete_state_input: bool


ROBOTS = {"libero": Robot(libero_inputs, libero_example, 7, False),
          "droid": Robot(droid_inputs, droid_example, 8, True)}


class Pi05Policy:
    """openpi-style inference for a ``Pi05`` model.

    Args:
        model: a ``Pi05`` (put in eval mode and moved to ``device``).
        tokenizer: a ``PaligemmaTokenizer`` or the path of PaliGemma's sentencepiece model
            (then padded to ``model.config.max_token_len``).
        norm_stats: ``{"state": NormStats, "actions": NormStats}`` (either may be missing:
            that side is then not transformed), or a path for ``load_norm_stats``, or None
            (no normalization: ``state`` must already be normalized and actions come back
            in the model's range).
        device: where the model runs; default: where its parameters already are.
        use_quantiles: the quantile normalization of pi0.5 (True) or pi0's z-score (False).
        discrete_state_input: write the state into the prompt (openpi's default for pi0.5;
            openpi's ``pi05_libero`` config sets it False). Default: the ``robot``'s openpi
            config (``ROBOTS``), else True.
        action_dims: how many action dimensions to return; default: the dimensions of
            ``norm_stats["actions"]``, else the model's ``action_dim``. (If your norm stats
            were computed on padded actions, pass your robot's dimension count here.)
        num_steps: Euler steps of the flow-matching sampler (openpi: 10).
        default_prompt: used when an observation has no ``"prompt"``.
        seed: seeds the policy's own noise generator (CPU) so runs repeat; None draws from
            torch's global RNG.
        float_range: float images are in [0, 1] (``"unit"``, openpi's policy inputs) or
            already in the model's [-1, 1] (``"signed"``).
        robot: ``"libero"`` or ``"droid"``: observations come keyed as that robot's openpi
            client sends them (``ROBOTS``), and ``action_dims`` and ``discrete_state_input``
            default to openpi's config for it (7 and False, 8 and True); None: keyed by the
            model's camera names.
    """

    def __init__(
        self,
        model: Pi05,
        tokenizer: PaligemmaTokenizer | PathLike,
        norm_stats: Optional[Mapping[str, NormStats] | PathLike] = None,
        *,
        device: Optional[torch.device | str] = None,
        use_quantiles: bool = True,
        discrete_state_input: Optional[bool] = None,
        action_dims: Optional[int] = None,
        num_steps: int = 10,
        default_prompt: Optional[str] = None,
        seed: Optional[int] = None,
        float_range: str = "unit",
        robot: Optional[str] = None,
    ):
        if robot is not None and robot not in ROBOTS:
            raise ValueError(f"robot must be one of {sorted(ROBOTS)} or None, got {robot!r}")
        if not isinstance(model, Pi05):
            raise TypeError(f"model must be a Pi05, got {type(model).__name__}")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        if not isinstance(tokenizer, PaligemmaTokenizer):
            tokenizer = PaligemmaTokenizer(tokenizer, max_len=model.config.max_token_len)
        self.tokenizer = tokenizer
        if norm_stats is not None and not isinstance(norm_stats, Mapping):
            norm_stats = load_norm_stats(norm_stats)
        self.norm_stats: dict[str, NormStats] = dict(norm_stats or {})
        self.use_quantiles = use_quantiles
        if discrete_state_input is None:
            discrete_state_input = ROBOTS[robot].discrete_state_input if robot is not None else True
        self.discrete_state_input = bool(discrete_state_input)
        self.robot = robot
        if action_dims is None and robot is not None:
            action_dims = ROBOTS[robot].action_dims
        if action_dims is None:
            stats = self.norm_stats.get("actions")
            action_dims = stats.dim if stats is not None else model.config.action_dim
        if not 1 <= action_dims <= model.config.action_dim:
            raise ValueError(f"action_dims must be in [1, {model.config.action_dim}], got {action_dims}")
        self.action_dims = int(action_dims)
        self.num_steps = int(num_steps)
        self.default_prompt = default_prompt
        self.float_range = float_range
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._last_kept: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_paths(
        cls,
        checkpoint: PathLike,
        tokenizer_model: PathLike,
        norm_stats: Optional[Mapping[str, NormStats] | PathLike] = None,
        config: Optional[Pi05Config] = None,
        *,
        device: Optional[torch.device | str] = None,
        dtype: Optional[str | torch.dtype] = None,
        asset_id: Optional[str] = None,
        action_horizon: Optional[int] = None,
        max_token_len: Optional[int] = None,
        **kwargs: Any,
    ) -> "Pi05Policy":
        """Load an openpi pi0.5 PyTorch checkpoint.

        ``checkpoint``: openpi's ``model.safetensors`` or the directory holding it.
        ``norm_stats``: stats mapping or path; None looks in the checkpoint directory
        (``assets/<asset_id>/norm_stats.json``, as openpi does) and fails if none is there
        (pass ``{}`` to run without normalization). ``action_horizon`` / ``max_token_len``
        override the config (they cannot be read from the weights: openpi's pi05_base uses
        50, pi05_droid 15, pi05_libero 10; max_token_len 200). Other keyword arguments go
        to ``Pi05Policy``.
        """
        weights = weights_file(checkpoint)
        model = Pi05.from_openpi(str(weights), config=config, device=device, dtype=dtype)
        overrides = {k: v for k, v in (("action_horizon", action_horizon), ("max_token_len", max_token_len))
                     if v is not None}
        if overrides:
            model.config = dataclasses.replace(model.config, **overrides)
        if norm_stats is None:
            try:
                norm_stats = load_norm_stats(weights.parent, asset_id=asset_id)
            except FileNotFoundError as e:
                raise FileNotFoundError(
                    f"{e}: pass norm_stats (a norm_stats.json or a mapping), or norm_stats={{}} to run without "
                    "normalization (demo: --norm-stats PATH or --no-norm-stats); the trainer's checkpoints "
                    "hold no norm stats"
                ) from None
        tokenizer = PaligemmaTokenizer(tokenizer_model, max_len=model.config.max_token_len)
        return cls(model, tokenizer, norm_stats, device=device, **kwargs)

    # ------------------------------------------------------------------ pruning settings

    @property
    def pruning(self) -> dict[str, Any]:
        """The model's LightVLA settings: enabled, keep_tokens, keep_ratio, max_tokens,
        noise_scale, mask_voters."""
        cfg = self.model.config
        return {short: getattr(cfg, field) for short, field in _PRUNING_FIELDS.items()}

    def set_pruning(
        self,
        *,
        enabled: Optional[bool] = _UNSET,
        keep_tokens: Optional[int] = _UNSET,
        keep_ratio: Optional[float] = _UNSET,
        max_tokens: Optional[int] = _UNSET,
        noise_scale: Optional[float] = _UNSET,
        mask_voters: Optional[bool] = _UNSET,
    ) -> dict[str, Any]:
        """Change any of the pruning settings (others stay); returns the new ``pruning``.

        ``keep_tokens``/``keep_ratio`` are the eval budget over all cameras (``keep_tokens`` wins
        where both are set; neither: LightVLA's implicit mode); ``max_tokens`` a static cap on
        the pruned block's rows. Invalid values raise here, not at inference.
        """
        given = dict(enabled=enabled, keep_tokens=keep_tokens, keep_ratio=keep_ratio,
                     max_tokens=max_tokens, noise_scale=noise_scale, mask_voters=mask_voters)
        changes = {_PRUNING_FIELDS[k]: v for k, v in given.items() if v is not _UNSET}
        cfg = dataclasses.replace(self.model.config, **changes)
        cfg.keep_tokens(cfg.num_image_tokens)  # raises on a bad ratio
        for name in ("token_prune_keep_tokens", "token_prune_max_tokens"):
            value = getattr(cfg, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self.model.config = cfg
        return self.pruning

    def set_keep_tokens(self, keep_tokens: Optional[int]) -> dict[str, Any]:
        """Keep ``keep_tokens`` image tokens (over all cameras); enables pruning, clears the ratio."""
        if keep_tokens is None:
            return self.set_pruning(keep_tokens=None)
        return self.set_pruning(enabled=True, keep_tokens=int(keep_tokens), keep_ratio=None)

    def set_keep_ratio(self, keep_ratio: Optional[float]) -> dict[str, Any]:
        """Keep ``ceil(ratio * N)`` image tokens; enables pruning, clears ``keep_tokens``."""
        if keep_ratio is None:
            return self.set_pruning(keep_ratio=None)
        return self.set_pruning(enabled=True, keep_ratio=float(keep_ratio), keep_tokens=None)

    def set_max_tokens(self, max_tokens: Optional[int]) -> dict[str, Any]:
        """Static cap on the pruned block (fixed shapes for compiled/graphed inference)."""
        return self.set_pruning(max_tokens=None if max_tokens is None else int(max_tokens))

    def enable_pruning(self, enabled: bool = True) -> dict[str, Any]:
        return self.set_pruning(enabled=bool(enabled))

    @property
    def last_kept_tokens(self) -> Optional[np.ndarray]:
        """Image tokens kept per sample by the last call (None: pruning was off). Read from
        the pruned prefix's mask, so it only counts valid rows of present cameras."""
        return self._last_kept

    # ------------------------------------------------------------------ inputs

    def _split(self, obs: Mapping[str, Any], index: int):
        if self.robot is not None:
            obs = ROBOTS[self.robot].inputs(obs)
        if not isinstance(obs, Mapping):
            raise TypeError(f"observation {index} must be a dict, got {type(obs).__name__}")
        if "image" in obs:
            cameras = dict(obs["image"])
        else:
            cameras = {k: obs[k] for k in IMAGE_KEYS if k in obs}
            stray = [k for k, v in obs.items() if k not in _OBS_KEYS and np.ndim(v) >= 3]
            if stray:  # a misspelt camera would otherwise silently become an absent one
                raise ValueError(f"observation {index}: unknown camera(s) {stray}; expected {list(IMAGE_KEYS)}")
        masks = obs.get("image_mask")
        prompt = obs.get("prompt", self.default_prompt)
        if prompt is None:
            raise ValueError(f"observation {index} has no 'prompt' (and the policy no default_prompt)")
        if not isinstance(prompt, str):
            prompt = np.asarray(prompt).item()
            prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
        state = obs.get("state")
        if state is not None:
            state = np.asarray(state)
            if "state" in self.norm_stats:
                state = normalize(state, self.norm_stats["state"], self.use_quantiles)
        elif self.discrete_state_input:
            raise ValueError(f"observation {index} has no 'state' (needed in the pi0.5 prompt)")
        return cameras, masks, prompt, state

    def prepare(self, observations: Sequence[Mapping[str, Any]]):
        """Observations -> the model's inputs ``(images, img_masks, lang_tokens, lang_masks)``."""
        parts = [self._split(obs, i) for i, obs in enumerate(observations)]
        resolution = self.model.config.vision.image_size
        images, img_masks = preprocess_cameras(
            [p[0] for p in parts], [p[1] for p in parts], image_keys=IMAGE_KEYS[: self.model.config.num_cameras],
            resolution=resolution, float_range=self.float_range, device=self.device,
        )
        states = [p[3] if self.discrete_state_input else None for p in parts]
        tokens, masks = self.tokenizer.tokenize_batch([p[2] for p in parts], states)
        lang_tokens = torch.from_numpy(tokens).to(self.device)
        lang_masks = torch.from_numpy(masks).to(self.device)
        return images, img_masks, lang_tokens, lang_masks

    def _noise(self, batch: int, noise) -> torch.Tensor:
        cfg = self.model.config
        shape = (batch, cfg.action_horizon, cfg.action_dim)
        if noise is None:
            return torch.randn(shape, generator=self._generator, dtype=torch.float32).to(self.device)
        t = torch.as_tensor(np.asarray(noise), dtype=torch.float32)
        if t.ndim == 2:
            t = t[None].expand(batch, *t.shape)
        if tuple(t.shape) != shape:
            raise ValueError(f"noise must have shape {shape[1:]} or {shape}, got {tuple(t.shape)}")
        # A copy, not a view (of the expand or of the caller's array): torch.compile guards on
        # a view's base, so a view would compile sample_actions a second time beside the
        # generator's noise.
        return t.to(self.device, copy=True)

    # ------------------------------------------------------------------ inference

    def infer_batch(self, observations: Sequence[Mapping[str, Any]], *, noise=None) -> dict[str, Any]:
        """A batch of observations in one model call -> ``{"actions": [B, H, action_dims],
        "kept_tokens": [B] or None, "policy_timing": {"infer_ms": ...}}``."""
        if not observations:
            raise ValueError("no observations")
        inputs = self.prepare(observations)
        x = self._noise(len(observations), noise)
        self._last_kept = None
        start = time.monotonic()
        out = self.model.sample_actions(*inputs, noise=x, num_steps=self.num_steps)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        infer_ms = (time.monotonic() - start) * 1e3
        if self.model.config.token_pruning_enabled:
            self._last_kept = self.model.token_pruner.core.last_kept_per_sample.cpu().numpy()
        actions = out.detach().float().cpu().numpy()
        if "actions" in self.norm_stats:
            actions = unnormalize(actions, self.norm_stats["actions"], self.use_quantiles)
        return {
            "actions": np.asarray(actions[..., : self.action_dims]),
            "kept_tokens": self.last_kept_tokens,
            "policy_timing": {"infer_ms": infer_ms},
        }

    def infer(self, obs: Mapping[str, Any], *, noise=None) -> dict[str, Any]:
        """One observation -> ``{"actions": [H, action_dims], "kept_tokens": int or None,
        "policy_timing": {...}}`` (openpi's ``Policy.infer``; ``noise`` ``[H, action_dim]``)."""
        out = self.infer_batch([obs], noise=noise)
        kept = out["kept_tokens"]
        return {
            "actions": out["actions"][0],
            "kept_tokens": None if kept is None else int(kept[0]),
            "policy_timing": out["policy_timing"],
        }

    def example_observation(self, seed: int = 0) -> dict[str, Any]:
        """A random observation in the layout ``infer`` takes: the ``robot``'s (as its openpi
        client sends it), else every camera of the model by name, a state of the norm stats'
        dimensions (else the model's ``action_dim``) and a prompt."""
        rng = np.random.default_rng(seed)
        if self.robot is not None:
            return ROBOTS[self.robot].example(rng)
        stats = self.norm_stats.get("state")
        state_dim = stats.dim if stats is not None else self.model.config.action_dim
        obs: dict[str, Any] = {name: _camera_image(rng) for name in IMAGE_KEYS[: self.model.config.num_cameras]}
        obs.update(state=rng.standard_normal(state_dim).astype(np.float32), prompt="do something")
        return obs

    def warmup(self) -> float:
        """One inference on ``example_observation()`` so that ``torch.compile`` compiles
        ``sample_actions`` now rather than during a robot's first request (the graph is dynamic:
        every later observation of this layout reuses it). Its noise is zeros, so the policy's
        noise generator is untouched and later calls answer as without the warm-up. Returns
        the seconds it took."""
        cfg = self.model.config
        start = time.monotonic()
        self.infer(self.example_observation(), noise=np.zeros((cfg.action_horizon, cfg.action_dim), np.float32))
        self._last_kept = None
        return time.monotonic() - start
