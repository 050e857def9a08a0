"""openpi normalization statistics: ``norm_stats.json``, state normalization, action un-normalization.

Behaviour follows openpi (``openpi.shared.normalize`` and ``openpi.transforms``, upstream
commit 15a9616), written from scratch in numpy:

* ``norm_stats.json`` is ``{"norm_stats": {key: {"mean": [...], "std": [...], "q01": [...],
  "q99": [...]}}}`` (``q01``/``q99`` may be absent or null). A trained openpi checkpoint keeps
  it at ``<checkpoint>/assets/<asset_id>/norm_stats.json``. Values load as float64 (as
  openpi's pydantic model does), so the arithmetic below runs in float64.
* pi0.5 (and pi0-FAST) use the quantile form, pi0 the z-score form:

  ======================  ==============================================================
  normalize, quantile     ``(x - q01) / (q99 - q01 + 1e-6) * 2 - 1``  (no clipping)
  unnormalize, quantile   ``(x + 1) / 2 * (q99 - q01 + 1e-6) + q01``  (no clipping)
  normalize, z-score      ``(x - mean) / (std + 1e-6)``
  unnormalize, z-score    ``x * (std + 1e-6) + mean``
  ======================  ==============================================================

* Dimensions: ``normalize`` uses the first ``x.shape[-1]`` entries of the statistics (the
  statistics may be longer than ``x``, never shorter). ``unnormalize`` of an ``x`` wider
  than the statistics (the model's padded ``action_dim``) transforms the first ``len(stats)``
  dimensions and passes the rest through unchanged (quantile form) or treats them as
  mean 0 / std 1 (z-score form) -- both leave the padding as it is.
* ``pad_to_dim`` zero-pads the last axis up to the model's ``action_dim`` (openpi's
  ``PadStatesAndActions``); it never truncates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Mapping, Optional, Union

import numpy as np

__all__ = [
    "EPS",
    "NormStats",
    "load_norm_stats",
    "save_norm_stats",
    "find_norm_stats",
    "normalize",
    "unnormalize",
    "pad_to_dim",
]

EPS = 1e-6  # openpi's epsilon in every normalization formula
NORM_STATS_FILE = "norm_stats.json"

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one key ("state", "actions", ...), float64 arrays."""

    mean: np.ndarray
    std: np.ndarray
    q01: Optional[np.ndarray] = None  # 1st percentile
    q99: Optional[np.ndarray] = None  # 99th percentile

    def __post_init__(self):
        for name in ("mean", "std", "q01", "q99"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value, dtype=np.float64))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[-1])

    @property
    def has_quantiles(self) -> bool:
        return self.q01 is not None and self.q99 is not None

    def to_json(self) -> dict:
        out = {"mean": self.mean.tolist(), "std": self.std.tolist()}
        out["q01"] = None if self.q01 is None else self.q01.tolist()
        out["q99"] = None if self.q99 is None else self.q99.tolist()
        return out


def _as_norm_stats(value) -> NormStats:
    if isinstance(value, NormStats):
        return value
    if not isinstance(value, Mapping) or "mean" not in value or "std" not in value:
        raise ValueError(f"norm stats entries need 'mean' and 'std' (and 'q01'/'q99'), got {value!r:.200}")
    return NormStats(mean=value["mean"], std=value["std"], q01=value.get("q01"), q99=value.get("q99"))


def find_norm_stats(path: PathLike, asset_id: Optional[str] = None) -> pathlib.Path:
    """Resolve ``path`` to a ``norm_stats.json`` file.

    ``path`` may be the file itself, a directory holding it, or an openpi checkpoint directory
    (``<path>/assets/<asset_id>/norm_stats.json``; without ``asset_id`` there must be exactly
    one such file).
    """
    p = pathlib.Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"norm stats not found: {p} does not exist")
    if (p / NORM_STATS_FILE).is_file():
        return p / NORM_STATS_FILE
    assets = p / "assets"
    if asset_id is not None:
        candidate = assets / asset_id / NORM_STATS_FILE
        if candidate.is_file():
            return candidate
        raise FileNotFoundError(f"norm stats not found at {candidate}")
    found = sorted(assets.glob(f"**/{NORM_STATS_FILE}")) if assets.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no {NORM_STATS_FILE} in {p} or under {assets}")
    raise ValueError(f"several norm stats under {assets}: {[str(f) for f in found]}; pass asset_id or the file")


def load_norm_stats(path: PathLike, asset_id: Optional[str] = None) -> dict[str, NormStats]:
    """Read openpi's ``norm_stats.json`` (see ``find_norm_stats`` for what ``path`` may be).

    Also accepts the bare ``{key: {...}}`` mapping without the ``"norm_stats"`` wrapper.
    """
    data = json.loads(find_norm_stats(path, asset_id).read_text())
    if isinstance(data, Mapping) and "norm_stats" in data:
        data = data["norm_stats"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object of norm stats")
    return {key: _as_norm_stats(value) for key, value in data.items()}


def save_norm_stats(path: PathLike, norm_stats: Mapping[str, NormStats | Mapping]) -> pathlib.Path:
    """Write ``norm_stats.json`` in openpi's layout; ``path`` is the file or its directory."""
    p = pathlib.Path(path)
    if p.suffix != ".json":
        p = p / NORM_STATS_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    body = {"norm_stats": {k: _as_norm_stats(v).to_json() for k, v in norm_stats.items()}}
    p.write_text(json.dumps(body, indent=2))
    return p


def _quantiles(stats: NormStats) -> tuple[np.ndarray, np.ndarray]:
    if not stats.has_quantiles:
        raise ValueError("quantile normalization needs q01 and q99 in the norm stats")
    return stats.q01, stats.q99


def normalize(x, stats: NormStats | Mapping, use_quantiles: bool = True) -> np.ndarray:
    """openpi's ``Normalize``: map raw values to the model's range (the stats' first
    ``x.shape[-1]`` entries are used). Quantile form by default (pi0.5)."""
    stats = _as_norm_stats(stats)
    x = np.asarray(x)
    d = x.shape[-1]
    if d > stats.dim:
        raise ValueError(f"cannot normalize x of {d} dimensions with stats of {stats.dim}")
    if use_quantiles:
        q01, q99 = (q[..., :d] for q in _quantiles(stats))
        return (x - q01) / (q99 - q01 + EPS) * 2.0 - 1.0
    return (x - stats.mean[..., :d]) / (stats.std[..., :d] + EPS)


def unnormalize(x, stats: NormStats | Mapping, use_quantiles: bool = True) -> np.ndarray:
    """openpi's ``Unnormalize``: the inverse of ``normalize``. Dimensions of ``x`` beyond the
    statistics (the model's padding) pass through unchanged."""
    stats = _as_norm_stats(stats)
    x = np.asarray(x)
    if stats.dim > x.shape[-1]:
        raise ValueError(f"cannot unnormalize x of {x.shape[-1]} dimensions with stats of {stats.dim}")
    if use_quantiles:
        q01, q99 = _quantiles(stats)
        d = q01.shape[-1]
        if d < x.shape[-1]:
            head = (x[..., :d] + 1.0) / 2.0 * (q99 - q01 + EPS) + q01
            return np.concatenate([head, x[..., d:]], axis=-1)
        return (x + 1.0) / 2.0 * (q99 - q01 + EPS) + q01
    mean = pad_to_dim(stats.mean, x.shape[-1], value=0.0)
    std = pad_to_dim(stats.std, x.shape[-1], value=1.0)
    return x * (std + EPS) + mean


def pad_to_dim(x, dim: int, axis: int = -1, value: float = 0.0) -> np.ndarray:
    """Pad ``x`` along ``axis`` with ``value`` up to ``dim`` entries (never truncates)."""
    x = np.asarray(x)
    current = x.shape[axis]
    if current >= dim:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, dim - current)
    return np.pad(x, widths, constant_values=value)
