"""Drop-in modules with the seed integration's API, running on torch.ops.fastprune.

`ImageTokenPruner` is what the seed's pi0.5 `embed_prefix` calls on the concatenated camera
patches; `TokenPruner` serves LightVLA's original `[cls, patches, task]` sequences
(OpenVLA-OFT). Both keep the seed's names: `set_noise_scale`, `set_keep_tokens`,
`set_keep_ratio`, `noise_scale`, and the `core.last_*` attributes the seed's model reads.

The seed computed its diagnostics (vote concentration, embedding spread, score gaps) on
every call, with N x N tensors and host syncs. Here a call stores only the outputs it
already has and references to its inputs; the diagnostics are computed from those when an
attribute is read (`core.last_argmax_union_det`, ...), i.e. only when telemetry asks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from pi05_fastprune import reference as R
from pi05_fastprune.prune import prune_tokens, resolve_keep_tokens, select_tokens
from pi05_fastprune.select_soft import select_soft

__all__ = ["ImageTokenPruner", "TokenPruner", "PrunerCore", "TELEMETRY_KEYS"]

# The seed's per-call diagnostics, computed on demand by PrunerCore.
TELEMETRY_KEYS = (
    "last_task_valid_len",
    "last_task_attn_masked_len",
    "last_argmax_union_det",
    "last_argmax_union_noisy",
    "last_argmax_top1_share_det",
    "last_argmax_top1_share_noisy",
    "last_patches_std_mean",
    "last_task_std_mean",
    "last_queries_before_norm_std_mean",
    "last_queries_after_norm_std_mean",
    "last_queries_before_norm_cosine_sim",
    "last_queries_after_norm_cosine_sim",
    "last_score_abs_max_det",
    "last_score_top1_gap_mean_det",
)


class PrunerCore:
    """Settings and last-call state of a pruner (the seed's `_LightVLACore` attributes)."""

    def __init__(self) -> None:
        self.noise_scale: Optional[float] = None
        self.keep_tokens: Optional[int] = None
        self.keep_ratio: Optional[float] = None
        self.max_tokens: Optional[int] = None
        self.mask_voters = False
        self.last_kept_indices_padded: Optional[torch.Tensor] = None  # [B, K] eval
        self.last_kept_indices_mask: Optional[torch.Tensor] = None  # [B, K] eval
        self.last_selected_indices_train: Optional[torch.Tensor] = None  # [B, N] train (noisy)
        self._counts: Optional[torch.Tensor] = None  # eval kept counts, straight from the op
        self._inputs: Optional[tuple] = None  # (patches, task, task_mask, patch_mask), detached
        self._cache: dict = {}

    def set_noise_scale(self, noise_scale: Optional[float]) -> None:
        self.noise_scale = None if noise_scale is None else float(noise_scale)

    def set_keep_tokens(self, keep_tokens: Optional[int]) -> None:
        if keep_tokens is not None and int(keep_tokens) < 1:
            raise ValueError(f"keep_tokens must be >= 1, got {keep_tokens}")
        self.keep_tokens = None if keep_tokens is None else int(keep_tokens)

    def set_keep_ratio(self, keep_ratio: Optional[float]) -> None:
        if keep_ratio is not None and not (0.0 < float(keep_ratio) <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio = None if keep_ratio is None else float(keep_ratio)

    def budget(self, num_patches: int, keep_tokens: Optional[int] = None) -> Optional[int]:
        """The eval budget in patches: ``keep_tokens`` if given, else the core's (keep_tokens
        wins over keep_ratio, as in the seed), clipped to the number of patches."""
        if keep_tokens is None:
            keep_tokens = self.keep_tokens
        if keep_tokens is not None:
            return torch.sym_min(keep_tokens, num_patches)
        return resolve_keep_tokens(None, self.keep_ratio, num_patches)

    def record(self, inputs: tuple, counts=None, kept_idx=None, kept_mask=None, selected=None) -> None:
        self._inputs = tuple(None if t is None else t.detach() for t in inputs)
        self._counts = counts
        self.last_kept_indices_padded = kept_idx
        self.last_kept_indices_mask = kept_mask
        self.last_selected_indices_train = selected
        self._cache = {}

    # -- telemetry, computed on first read after a call ------------------------------------

    @property
    def last_kept_per_sample(self) -> Optional[torch.Tensor]:
        """Kept patches per sample: the eval op's counts; in training what the deterministic
        (noise-free) selection would keep under the core's budget, as the seed reports."""
        if self._counts is not None or self._inputs is None:
            return self._counts
        return self._stat("last_kept_per_sample")

    @property
    def last_kept_per_sample_noisy(self) -> Optional[torch.Tensor]:
        if self.last_selected_indices_train is None:
            return None
        return self._stat("last_kept_per_sample_noisy")

    def __getattr__(self, name: str):
        # Only reached for attributes not set in __init__: the lazily computed diagnostics.
        if name in TELEMETRY_KEYS:
            if self.__dict__.get("_inputs") is None:
                return None
            return self._stat(name)
        raise AttributeError(name)

    def _stat(self, name: str) -> Optional[torch.Tensor]:
        if not self._cache:
            self._cache = self._compute_telemetry()
        return self._cache.get(name)

    @torch.no_grad()
    def _compute_telemetry(self) -> dict:
        patches, task, task_mask, patch_mask = self._inputs
        B, N, _ = patches.shape
        out: dict = {}
        valid = patch_mask if patch_mask is not None else torch.ones(B, N, dtype=torch.bool, device=patches.device)

        det = select_tokens(patches, task, task_mask=task_mask, patch_mask=patch_mask)
        votes = R.votes_from_idx(det)
        out["last_argmax_union_det"] = (votes > 0).sum(-1).to(torch.int32)
        out["last_argmax_top1_share_det"] = votes.max(-1).values.float() / max(1, N)
        budget = self.budget(N)

        def kept(votes: torch.Tensor) -> torch.Tensor:
            # What eval would keep from these votes under the core's budget (SPEC: a budget keeps
            # k of the valid patches, all of them where fewer are valid).
            return ((votes > 0) & valid).sum(-1) if budget is None else valid.sum(-1).clamp(max=budget)

        if self._counts is None:
            out["last_kept_per_sample"] = kept(votes)
        noisy = self.last_selected_indices_train
        if noisy is not None:
            noisy_votes = R.votes_from_idx(noisy)
            out["last_kept_per_sample_noisy"] = kept(noisy_votes)
            out["last_argmax_union_noisy"] = (noisy_votes > 0).sum(-1).to(torch.int32)
            out["last_argmax_top1_share_noisy"] = noisy_votes.max(-1).values.float() / max(1, N)

        if task_mask is not None:
            out["last_task_valid_len"] = task_mask.sum(-1)
            out["last_task_attn_masked_len"] = (~task_mask).sum(-1)
        p = R.rms(patches.float())
        t = R.rms(task.float())
        out["last_patches_std_mean"] = p.std(dim=1).mean(-1)
        t_valid = task_mask if task_mask is not None else torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
        out["last_task_std_mean"] = torch.stack(
            [t[b][t_valid[b]].std(0).mean() if int(t_valid[b].sum()) > 1 else t.new_zeros(()) for b in range(B)]
        ) if B else t.new_zeros(0)
        queries = R.attend(p, t, task_mask)
        out["last_queries_before_norm_std_mean"] = queries.std(dim=1).mean(-1)
        out["last_queries_before_norm_cosine_sim"] = _mean_pairwise_cosine(queries)
        q = R.rms(queries)
        out["last_queries_after_norm_std_mean"] = q.std(dim=1).mean(-1)
        out["last_queries_after_norm_cosine_sim"] = _mean_pairwise_cosine(q)
        score = R.scores(patches, task, task_mask, patch_mask)
        finite = torch.isfinite(score)
        out["last_score_abs_max_det"] = score.masked_fill(~finite, 0).abs().amax(dim=(-2, -1))
        if N > 1:
            top2 = score.topk(2, dim=-1).values
            out["last_score_top1_gap_mean_det"] = (top2[..., 0] - top2[..., 1]).mean(-1)
        return out


def _mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over distinct row pairs, per sample ([B, N, D] -> [B])."""
    n = x.shape[1]
    u = x / (x.norm(dim=-1, keepdim=True) + 1e-8)
    # sum_{i != j} u_i . u_j = |sum_i u_i|^2 - sum_i |u_i|^2, without an N x N matrix.
    total = u.sum(1).pow(2).sum(-1) - u.pow(2).sum((1, 2))
    return total / max(1, n * (n - 1))


class _SeedSettings(nn.Module):
    """The seed's setters, forwarding to ``self.core`` (a PrunerCore)."""

    core: PrunerCore

    @property
    def noise_scale(self) -> Optional[float]:
        return self.core.noise_scale

    def set_noise_scale(self, noise_scale: Optional[float]) -> None:
        self.core.set_noise_scale(noise_scale)

    def set_keep_tokens(self, keep_tokens: Optional[int]) -> None:
        self.core.set_keep_tokens(keep_tokens)

    def set_keep_ratio(self, keep_ratio: Optional[float]) -> None:
        self.core.set_keep_ratio(keep_ratio)


class ImageTokenPruner(_SeedSettings):
    """Prunes the concatenated camera patches against the prompt (seed API).

    eval(): `prune` returns `(pruned [B, K, D], kept_mask [B, K])`, physically shorter;
    the kept original indices are in `core.last_kept_indices_padded`.
    train(): sequence length unchanged, straight-through selection with `noise_scale`.
    """

    def __init__(self, hidden_size: int) -> None:  # hidden_size: the seed's signature; the op reads D
        super().__init__()
        self.core = PrunerCore()

    @torch.no_grad()
    def last_kept_per_sample(self) -> Optional[torch.Tensor]:
        return self.core.last_kept_per_sample

    def prune(
        self,
        image_patches: torch.Tensor,
        task_tokens: torch.Tensor,
        *,
        task_token_mask: Optional[torch.Tensor] = None,
        patch_token_mask: Optional[torch.Tensor] = None,
        keep_tokens: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep_tokens``: this call's eval budget (clipped to N), over the core's setting;
        a caller under torch.compile passes it so that it is traced, not a constant."""
        inputs = (image_patches, task_tokens, task_token_mask, patch_token_mask)
        core = self.core
        if self.training:
            selected, idx = select_soft(
                image_patches, task_tokens, task_mask=task_token_mask, patch_mask=patch_token_mask,
                noise_scale=core.noise_scale,
            )
            core.record(inputs, selected=idx)
            if patch_token_mask is None:
                patch_token_mask = torch.ones(image_patches.shape[:2], dtype=torch.bool, device=image_patches.device)
            return selected, patch_token_mask
        out = prune_tokens(
            image_patches, task_tokens, task_mask=task_token_mask, patch_mask=patch_token_mask,
            keep_tokens=core.budget(image_patches.shape[1], keep_tokens), mask_voters=core.mask_voters,
            max_tokens=core.max_tokens,
        )
        core.record(inputs, counts=out.counts, kept_idx=out.kept_idx, kept_mask=out.kept_mask)
        return out.pruned, out.kept_mask

    def forward(self, image_patches: torch.Tensor, task_tokens: torch.Tensor) -> torch.Tensor:
        return self.prune(image_patches, task_tokens)[0]


class TokenPruner(_SeedSettings):
    """LightVLA's sequence-level pruner for `[cls, patches, task]` sequences (seed API).

    eval(): the patch block shrinks to the kept patches (padded to the batch maximum) and
    their original position ids; the returned mask marks padding rows False (it is
    returned even without an input `attention_mask`, so padding is never attended).
    train(): length unchanged, straight-through selection; positions and mask follow the
    selected patches.
    """

    def __init__(self, hidden_size: int, num_patches: int) -> None:  # hidden_size: as ImageTokenPruner's
        super().__init__()
        self.num_patches = int(num_patches)
        self.core = PrunerCore()

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cls_token_count: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        B, L, _ = tokens.shape
        n_task = L - cls_token_count - self.num_patches
        if n_task < 1 or cls_token_count < 0:
            raise ValueError(
                f"tokens {tuple(tokens.shape)} cannot hold {cls_token_count} cls tokens, "
                f"{self.num_patches} patches and at least one task token"
            )
        split = [cls_token_count, self.num_patches, n_task]
        cls, patches, task = tokens.split(split, dim=1)
        cls_pos, patch_pos, task_pos = position_ids.split(split, dim=1)
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
        cls_m, patch_m, task_m = attention_mask.split(split, dim=1)
        core = self.core
        if self.training:
            selected, idx = select_soft(patches, task, noise_scale=core.noise_scale)
            core.record((patches, task, None, None), selected=idx)  # the telemetry reads the input patches
            patches = selected
            patch_pos = patch_pos.gather(1, idx)
            patch_m = patch_m.gather(1, idx)
        else:
            out = prune_tokens(patches, task, keep_tokens=core.budget(self.num_patches), max_tokens=core.max_tokens)
            core.record((patches, task, None, None), counts=out.counts, kept_idx=out.kept_idx,
                        kept_mask=out.kept_mask)
            patches = out.pruned
            patch_pos = torch.where(out.kept_mask, patch_pos.gather(1, out.kept_idx), 0)
            patch_m = out.kept_mask & patch_m.gather(1, out.kept_idx).bool()
            patch_m = patch_m.to(attention_mask.dtype)
        return (
            torch.cat([cls, patches, task], dim=1),
            torch.cat([cls_pos, patch_pos, task_pos], dim=1),
            torch.cat([cls_m, patch_m, task_m], dim=1),
        )
