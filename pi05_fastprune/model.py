"""pi0.5 in one readable module: SigLIP + Gemma-2B prefix + Gemma-300M action expert.

Behaviour follows openpi's PyTorch ``PI0Pytorch`` with ``pi05=True`` (upstream commit
15a9616): the same call sequence, masks, positions, precision rules and flow-matching
sampler, written from scratch in plain PyTorch (no transformers).

    prefix  = [camera 0 patches | camera 1 patches | camera 2 patches | prompt tokens]
              (SigLIP -> linear projector)            (embed_tokens * sqrt(width))
    suffix  = action_in_proj(x_t)                     (one bidirectional block)
    time    = silu(time_mlp_out(silu(time_mlp_in(sincos(t)))))  -> adaRMS condition

Inference runs the prefix once through the Gemma-2B LM to fill a KV cache; each Euler step
runs only the action expert, whose queries attend to the cached prefix keys (valid ones)
and to the whole suffix. Training (``forward``) runs prefix and suffix jointly, layer by
layer, with openpi's block-causal mask (the prefix cannot see the suffix).

Visual-token pruning (LightVLA, ``config.token_pruning_enabled``) happens in
``embed_prefix``: in eval mode the image tokens that no patch query votes for are removed
(the prefix gets shorter), in training mode a straight-through selection keeps the length.
Pruning never moves a token: every kept image token, every prompt token and every action
token keeps the position id it has in the unpruned model.

Precision (openpi's ``to_bfloat16_for_selected_params``): with ``dtype="bfloat16"`` the
big matrices are bfloat16 while the SigLIP patch/position embeddings, every RMSNorm (incl.
the adaRMS ``dense``) and the action/time projections stay float32; norms compute in
float32. With ``dtype="float32"`` everything is float32.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pi05_fastprune.prune import resolve_keep_tokens
from pi05_fastprune.pruner import TELEMETRY_KEYS, ImageTokenPruner

__all__ = [
    "GemmaDims",
    "SiglipDims",
    "Pi05Config",
    "Pi05",
    "make_att_2d_masks",
    "euler_timesteps",
]


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


class GemmaDims(NamedTuple):
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


class SiglipDims(NamedTuple):
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# openpi.models.gemma.get_config numbers.
GEMMA_VARIANTS = {
    "gemma_2b": GemmaDims(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaDims(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "dummy": GemmaDims(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
}
# SigLIP So400m/14 at 224 px (PaliGemma's vision tower, no head).
SO400M = SiglipDims(width=1152, depth=27, num_heads=16, mlp_dim=4304, patch_size=14, image_size=224)
# The tiny SigLIP of the conformance vectors and of Pi05Config.dummy(): still 256 tokens/camera.
TINY_SIGLIP = SiglipDims(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=14, image_size=224)

IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
PALIGEMMA_VOCAB = 257152
MASK_BIAS = -2.3819763e38  # openpi's additive attention bias for a hidden key


@dataclasses.dataclass
class Pi05Config:
    """openpi ``Pi0Config`` names (pi05 is implied) plus overridable dimensions.

    Every ``*_width/depth/...`` override left ``None`` takes its value from the variant
    (``paligemma_variant`` for the LLM, ``action_expert_variant`` for the expert, So400m
    for the vision tower); read the resolved numbers from ``.vision``, ``.llm``, ``.expert``.
    """

    paligemma_variant: str = "gemma_2b"  # "gemma_2b" | "dummy"
    action_expert_variant: str = "gemma_300m"  # "gemma_300m" | "dummy"
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 200
    dtype: str = "bfloat16"  # "bfloat16" | "float32"
    pytorch_compile_mode: Optional[str] = "max-autotune"  # torch.compile mode of sample_actions; None: eager

    # LightVLA pruning (the seed's four fields, then ours).
    token_pruning_enabled: bool = False
    token_prune_noise_scale: Optional[float] = 1.0  # training-mode selection noise
    token_prune_keep_tokens: Optional[int] = None  # eval budget over all cameras
    token_prune_keep_ratio: Optional[float] = None  # eval budget = ceil(ratio * N)
    token_prune_max_tokens: Optional[int] = None  # static cap: the pruned block has exactly this many rows
    token_prune_mask_voters: bool = False  # SPEC option: only valid patches vote

    # Vision tower overrides (None: So400m/14 at 224 px).
    vision_width: Optional[int] = None
    vision_depth: Optional[int] = None
    vision_num_heads: Optional[int] = None
    vision_mlp_dim: Optional[int] = None
    vision_patch_size: Optional[int] = None
    vision_image_size: Optional[int] = None
    # Prefix LLM overrides (None: from paligemma_variant).
    llm_width: Optional[int] = None
    llm_depth: Optional[int] = None
    llm_mlp_dim: Optional[int] = None
    llm_num_heads: Optional[int] = None
    llm_num_kv_heads: Optional[int] = None
    llm_head_dim: Optional[int] = None
    # Action expert overrides (None: from action_expert_variant).
    expert_width: Optional[int] = None
    expert_depth: Optional[int] = None
    expert_mlp_dim: Optional[int] = None
    expert_num_heads: Optional[int] = None
    expert_num_kv_heads: Optional[int] = None
    expert_head_dim: Optional[int] = None

    vocab_size: int = PALIGEMMA_VOCAB
    num_cameras: int = len(IMAGE_KEYS)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-6

    @classmethod
    def dummy(cls, **overrides: Any) -> "Pi05Config":
        """Small float32 config for CPU tests: exactly the conformance model's sizes.

        LLM and expert at openpi's "dummy" Gemma (width 64, depth 4, MLP 128, 8 heads,
        1 KV head, head_dim 16), a tiny SigLIP (width 32, 2 layers, 4 heads, MLP 64,
        patch 14 at 224 px, so still 256 tokens per camera), vocabulary 1024, horizon 10.
        """
        base = dict(
            paligemma_variant="dummy",
            action_expert_variant="dummy",
            action_horizon=10,
            max_token_len=48,
            dtype="float32",
            vocab_size=1024,
            vision_width=TINY_SIGLIP.width,
            vision_depth=TINY_SIGLIP.depth,
            vision_num_heads=TINY_SIGLIP.num_heads,
            vision_mlp_dim=TINY_SIGLIP.mlp_dim,
            vision_patch_size=TINY_SIGLIP.patch_size,
            vision_image_size=TINY_SIGLIP.image_size,
        )
        base.update(overrides)
        return cls(**base)

    def _resolve(self, base: NamedTuple, prefix: str) -> Any:
        """``base`` with every ``<prefix>_<field>`` override that is not None applied."""
        over = {f: getattr(self, f"{prefix}_{f}") for f in base._fields}
        return base._replace(**{k: v for k, v in over.items() if v is not None})

    def _gemma(self, variant: str, prefix: str) -> GemmaDims:
        if variant not in GEMMA_VARIANTS:
            raise ValueError(f"unknown Gemma variant {variant!r}; known: {sorted(GEMMA_VARIANTS)}")
        return self._resolve(GEMMA_VARIANTS[variant], prefix)

    @property
    def llm(self) -> GemmaDims:
        return self._gemma(self.paligemma_variant, "llm")

    @property
    def expert(self) -> GemmaDims:
        return self._gemma(self.action_expert_variant, "expert")

    @property
    def vision(self) -> SiglipDims:
        return self._resolve(SO400M, "vision")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    @property
    def num_image_tokens(self) -> int:
        return self.num_cameras * self.vision.num_patches

    def keep_tokens(self, num_patches: int) -> Optional[int]:
        """The eval budget: ``token_prune_keep_tokens``, else ``ceil(keep_ratio * N)``, else None.
        Where both are set ``keep_tokens`` wins, as in the seed's pruner (its model passed both on)."""
        k, r = self.token_prune_keep_tokens, self.token_prune_keep_ratio
        if r is not None and not 0.0 < r <= 1.0:
            raise ValueError(f"token_prune_keep_ratio must be in (0, 1], got {r}")
        return k if k is not None else resolve_keep_tokens(None, r, num_patches)

    def validate(self) -> None:
        llm, expert, vision = self.llm, self.expert, self.vision
        self.torch_dtype  # noqa: B018  (checks dtype)
        if (llm.num_heads, llm.num_kv_heads, llm.head_dim) != (
            expert.num_heads,
            expert.num_kv_heads,
            expert.head_dim,
        ):
            raise ValueError(
                "the LLM and the action expert share attention, so they need the same heads: "
                f"llm {llm}, expert {expert}"
            )
        for name, dims in (("llm", llm), ("expert", expert)):
            if dims.num_heads % dims.num_kv_heads:
                raise ValueError(f"{name}: num_heads {dims.num_heads} not a multiple of kv heads {dims.num_kv_heads}")
            if dims.head_dim % 2:
                raise ValueError(f"{name}: RoPE needs an even head_dim, got {dims.head_dim}")
        if vision.width % vision.num_heads:
            raise ValueError(f"vision width {vision.width} not divisible by heads {vision.num_heads}")
        if vision.image_size % vision.patch_size:
            raise ValueError(f"image size {vision.image_size} not a multiple of patch {vision.patch_size}")


# ----------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------


def make_att_2d_masks(pad_masks: torch.Tensor, att_masks: torch.Tensor) -> torch.Tensor:
    """big_vision / openpi block-causal mask ``[B, L, L]``: query i sees key j iff both are
    valid and ``cumsum(att)[j] <= cumsum(att)[i]``."""
    cum = torch.cumsum(att_masks.to(torch.int64), dim=1)
    allowed = cum[:, None, :] <= cum[:, :, None]
    valid = pad_masks[:, None, :] & pad_masks[:, :, None]
    return allowed & valid


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA on ``q [B,H,Lq,hd]``, ``k, v [B,KV,Lk,hd]`` with a bool ``mask [B,Lq,Lk]``.

    The mask becomes openpi's additive bias (0 / -2.3819763e38, finite): a query row that
    sees no key (a padding token) then averages all values uniformly instead of making NaNs,
    exactly like openpi, and every other row is unaffected.
    """
    bias = None
    if mask is not None:
        bias = torch.where(mask[:, None], 0.0, MASK_BIAS).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=q.shape[1] != k.shape[1])


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """HF-style RoPE tables ``[B, L, head_dim]`` (halves duplicated), float32 math."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, L, hd]`` (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


def sincos_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0):
    """openpi's ``create_sinusoidal_pos_embedding`` ``[B, dim]``, in float64."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    scaling = 1.0 / period * 2 * math.pi
    angle = scaling[None, :] * t[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


@torch.compiler.assume_constant_result  # host arithmetic: torch.compile sees constants
def euler_timesteps(num_steps: int) -> tuple[float, tuple[float, ...]]:
    """``(dt, [t_0, t_1, ...])`` exactly as openpi's loop makes them: float32 ``dt = -1/n``,
    ``t`` from 1 accumulated in float32 while ``t >= -dt/2``. Host-side, no tensors."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dt = np.float32(-1.0 / num_steps)
    t = np.float32(1.0)
    times = []
    while t >= -dt / np.float32(2):
        times.append(float(t))
        t = np.float32(t + dt)
    return float(dt), tuple(times)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


# ----------------------------------------------------------------------------------------
# SigLIP vision tower
# ----------------------------------------------------------------------------------------


class VisionBlock(nn.Module):
    def __init__(self, dims: SiglipDims, eps: float, dtype: torch.dtype):
        super().__init__()
        w = dims.width
        self.num_heads = dims.num_heads
        self.norm1 = nn.LayerNorm(w, eps=eps, dtype=dtype)
        self.q = nn.Linear(w, w, dtype=dtype)
        self.k = nn.Linear(w, w, dtype=dtype)
        self.v = nn.Linear(w, w, dtype=dtype)
        self.o = nn.Linear(w, w, dtype=dtype)
        self.norm2 = nn.LayerNorm(w, eps=eps, dtype=dtype)
        self.fc1 = nn.Linear(w, dims.mlp_dim, dtype=dtype)
        self.fc2 = nn.Linear(dims.mlp_dim, w, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(B, L, self.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(B, L, W))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class SigLIP(nn.Module):
    """SigLIP vision transformer without head: ``[N,3,H,W]`` in [-1,1] -> ``[N, P, width]``."""

    def __init__(self, dims: SiglipDims, eps: float, dtype: torch.dtype):
        super().__init__()
        self.dims = dims
        p = dims.patch_size
        # Patch and position embeddings stay float32 (openpi keeps them float32).
        self.patch_embed = nn.Conv2d(3, dims.width, kernel_size=p, stride=p, dtype=torch.float32)
        self.pos_embed = nn.Embedding(dims.num_patches, dims.width, dtype=torch.float32)
        self.blocks = nn.ModuleList(VisionBlock(dims, eps, dtype) for _ in range(dims.depth))
        self.norm = nn.LayerNorm(dims.width, eps=eps, dtype=dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.dims.image_size
        if images.dim() != 4 or images.shape[1:] != (3, s, s):
            raise ValueError(f"images must be [N, 3, {s}, {s}], got {tuple(images.shape)}")
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))
        x = x.flatten(2).transpose(1, 2) + self.pos_embed.weight[None]
        x = x.to(self.norm.weight.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------
# Gemma (prefix LLM and action expert)
# ----------------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """To float32, or keep float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` with the mean square in (at least) float32; the result is float32."""
    return x * torch.rsqrt(_upcast(x).pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Gemma RMSNorm ``x * (1 + w)``, float32 weight and math, output in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None):
        return (_rms(x, self.eps) * (1.0 + _upcast(self.weight))).to(x.dtype), None


class AdaRMSNorm(nn.Module):
    """pi0.5 adaptive RMSNorm: ``dense(cond)`` gives (scale, shift, gate) per sample.

    Returns ``(rms(x) * (1 + scale) + shift, gate)``; the gate multiplies the residual branch.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim, dtype=torch.float32)

    def forward(self, x: torch.Tensor, cond: torch.Tensor):
        mod = self.dense(cond)
        if x.dim() == 3:
            mod = mod[:, None, :]
        scale, shift, gate = mod.chunk(3, dim=-1)
        y = _rms(x, self.eps) * (1 + _upcast(scale)) + _upcast(shift)
        return y.to(x.dtype), gate.to(x.dtype)


class GemmaBlock(nn.Module):
    """One Gemma decoder layer, split in two halves so that two towers can share attention:
    ``qkv`` (norm, projections, RoPE) and ``finish`` (output projection, residual, MLP)."""

    def __init__(self, dims: GemmaDims, cond_dim: Optional[int], eps: float, dtype: torch.dtype):
        super().__init__()
        w, hd = dims.width, dims.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = dims.num_heads, dims.num_kv_heads, hd

        def norm():
            return RMSNorm(w, eps) if cond_dim is None else AdaRMSNorm(w, cond_dim, eps)

        self.attn_norm = norm()
        self.q = nn.Linear(w, dims.num_heads * hd, bias=False, dtype=dtype)
        self.k = nn.Linear(w, dims.num_kv_heads * hd, bias=False, dtype=dtype)
        self.v = nn.Linear(w, dims.num_kv_heads * hd, bias=False, dtype=dtype)
        self.o = nn.Linear(dims.num_heads * hd, w, bias=False, dtype=dtype)
        self.mlp_norm = norm()
        self.gate = nn.Linear(w, dims.mlp_dim, bias=False, dtype=dtype)
        self.up = nn.Linear(w, dims.mlp_dim, bias=False, dtype=dtype)
        self.down = nn.Linear(dims.mlp_dim, w, bias=False, dtype=dtype)

    def qkv(self, x: torch.Tensor, cond: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor):
        """-> ``q [B,H,L,hd]``, ``k, v [B,KV,L,hd]`` (q, k rotated), residual gate."""
        B, L, _ = x.shape
        h, gate = self.attn_norm(x, cond)
        q = self.q(h).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, gate

    def finish(
        self, x: torch.Tensor, attn: torch.Tensor, gate: Optional[torch.Tensor], cond: Optional[torch.Tensor]
    ) -> torch.Tensor:
        B, L, _ = x.shape
        attn = attn.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim).to(self.o.weight.dtype)
        x = gated_residual(x, self.o(attn), gate)
        h, gate = self.mlp_norm(x, cond)
        h = self.down(F.gelu(self.gate(h), approximate="tanh") * self.up(h))
        return gated_residual(x, h, gate)


class Gemma(nn.Module):
    """A stack of Gemma layers and a final norm. The prefix LLM owns the prompt embedding
    (``embed``, tied to PaliGemma's ``lm_head``); the expert has adaptive norms and keeps
    openpi's unused ``lm_head`` as a buffer only so that checkpoints round-trip."""

    def __init__(
        self,
        dims: GemmaDims,
        *,
        vocab_size: int,
        cond_dim: Optional[int],
        eps: float,
        dtype: torch.dtype,
        with_embedding: bool,
    ):
        super().__init__()
        self.dims = dims
        if with_embedding:
            self.embed = nn.Embedding(vocab_size, dims.width, dtype=dtype)
        else:
            self.register_buffer("lm_head", torch.empty(vocab_size, dims.width, dtype=dtype))
        self.blocks = nn.ModuleList(GemmaBlock(dims, cond_dim, eps, dtype) for _ in range(dims.depth))
        self.norm = RMSNorm(dims.width, eps) if cond_dim is None else AdaRMSNorm(dims.width, cond_dim, eps)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.blocks[0].q.weight.dtype


# ----------------------------------------------------------------------------------------
# pi0.5
# ----------------------------------------------------------------------------------------

Prefix = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class Pi05(nn.Module):
    """pi0.5 (openpi ``PI0Pytorch``, pi05=True) with an optional LightVLA visual-token pruner.

    ``Pi05(config, device, seed)`` builds the model directly on ``device`` with a seeded
    random init (see ``reset_parameters``); ``Pi05.from_openpi(path)`` loads openpi's
    ``model.safetensors`` and ``save_openpi(path)`` writes it.

    Inputs: ``images`` a list (one per camera, in ``IMAGE_KEYS`` order) of ``[B,3,S,S]``
    floats in [-1, 1]; ``img_masks`` a list of ``[B]`` bools (absent camera: zero image,
    False); ``lang_tokens [B,L]`` int64; ``lang_masks [B,L]`` bool.
    """

    def __init__(self, config: Pi05Config, device: Optional[torch.device | str] = None, seed: int = 0):
        super().__init__()
        config.validate()
        self.config = config
        dtype = config.torch_dtype
        llm, expert = config.llm, config.expert
        device = torch.device(device) if device is not None else torch.device("cpu")
        with device:
            self.vision = SigLIP(config.vision, config.layer_norm_eps, dtype)
            self.projector = nn.Linear(config.vision.width, llm.width, dtype=dtype)
            self.llm = Gemma(
                llm, vocab_size=config.vocab_size, cond_dim=None, eps=config.rms_norm_eps, dtype=dtype,
                with_embedding=True,
            )
            self.expert = Gemma(
                expert, vocab_size=config.vocab_size, cond_dim=expert.width, eps=config.rms_norm_eps,
                dtype=dtype, with_embedding=False,
            )
            # Action and time projections stay float32 (they are PI0Pytorch's own layers).
            self.action_in = nn.Linear(config.action_dim, expert.width, dtype=torch.float32)
            self.action_out = nn.Linear(expert.width, config.action_dim, dtype=torch.float32)
            self.time_in = nn.Linear(expert.width, expert.width, dtype=torch.float32)
            self.time_out = nn.Linear(expert.width, expert.width, dtype=torch.float32)
        # The LightVLA pruner (parameter-free). The config is the source of truth for its
        # settings; the seed's runtime setters below write the config.
        self.token_pruner = ImageTokenPruner(llm.width)
        self._token_pruner_user_noise_scale: Optional[float] = None
        self.set_compile_mode(config.pytorch_compile_mode)
        if device.type != "meta":
            self.reset_parameters(seed)

    def set_compile_mode(self, mode: Optional[str]) -> None:
        """torch.compile mode of ``sample_actions`` (None: eager). It compiles by default,
        pruning included, as one graph (fullgraph also lets dynamo capture the prune op's
        data-dependent K instead of breaking there; dynamic=True: one graph for every kept
        count). The environment variable FASTPRUNE_TORCH_COMPILE=0 keeps it eager."""
        self.config.pytorch_compile_mode = mode
        self._sample_compiled = self._sample
        if mode is not None and os.environ.get("FASTPRUNE_TORCH_COMPILE", "1") != "0":
            self._sample_compiled = torch.compile(self._sample, mode=mode, dynamic=True, fullgraph=True)

    # ------------------------------------------------------------------ init / checkpoints

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Seeded random init on the model's device (the conformance vectors' scheme).

        Tensors are visited in ``state_dict`` order and drawn from one generator seeded with
        ``seed`` (normal, given as mean/std): embeddings and ``lm_head`` 0/sqrt(1/D); Linear and
        Conv weights 0/sqrt(1/fan_in); RMSNorm weights 0/0.1 (used as ``1 + w``); LayerNorm
        weights 1/0.1 and biases 0/0.1; every other bias (adaRMS ``dense`` too) 0/0.1.
        """
        device = next(self.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        modules = dict(self.named_modules())
        for name, t in self.state_dict(keep_vars=True).items():
            owner_name, _, leaf = name.rpartition(".")
            owner = modules[owner_name]
            if isinstance(owner, (nn.Embedding, Gemma)):  # embeddings, lm_head
                std, mean = t.shape[-1] ** -0.5, 0.0
            elif isinstance(owner, nn.LayerNorm):
                std, mean = 0.1, 1.0 if leaf == "weight" else 0.0
            elif isinstance(owner, RMSNorm) or leaf == "bias":
                std, mean = 0.1, 0.0
            elif isinstance(owner, (nn.Linear, nn.Conv2d)):
                std, mean = (t[0].numel()) ** -0.5, 0.0
            else:
                raise AssertionError(f"no init rule for {name}")
            t.normal_(mean, std, generator=gen)

    @classmethod
    def from_openpi(
        cls,
        path: str,
        config: Optional[Pi05Config] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[str | torch.dtype] = None,
    ) -> "Pi05":
        """Load openpi's ``model.safetensors``, or the directory holding it (strict; see
        ``openpi_checkpoint.load_openpi``)."""
        from pi05_fastprune.openpi_checkpoint import load_openpi

        return load_openpi(path, config=config, device=device, dtype=dtype)

    def save_openpi(self, path: str) -> None:
        """Write openpi's ``model.safetensors`` layout (see ``openpi_checkpoint.save_openpi``)."""
        from pi05_fastprune.openpi_checkpoint import save_openpi

        save_openpi(self, path)

    # ------------------------------------------------------------------ prefix

    def embed_images(self, images: Sequence[torch.Tensor], img_masks: Sequence[torch.Tensor]):
        """All cameras through SigLIP + projector in one batch, concatenated camera-major.

        Returns ``embs [B, C*P, D]`` and ``pad [B, C*P]`` (each camera's mask per patch).
        """
        if len(images) != len(img_masks):
            raise ValueError(f"{len(images)} images but {len(img_masks)} image masks")
        C, B = len(images), images[0].shape[0]
        feats = self.projector(self.vision(torch.cat(list(images), dim=0)))  # [C*B, P, D]
        P, D = feats.shape[1], feats.shape[2]
        embs = feats.view(C, B, P, D).transpose(0, 1).reshape(B, C * P, D)
        pad = torch.stack([m.to(torch.bool) for m in img_masks], dim=1)[:, :, None].expand(B, C, P).reshape(B, C * P)
        return embs, pad

    def embed_prompt(self, lang_tokens: torch.Tensor) -> torch.Tensor:
        """``embed_tokens(tokens) * sqrt(width)`` (PaliGemma's scaling, in the weight dtype)."""
        emb = self.llm.embed(lang_tokens)
        return emb * math.sqrt(emb.shape[-1])

    def embed_prefix(
        self,
        images: Sequence[torch.Tensor],
        img_masks: Sequence[torch.Tensor],
        lang_tokens: torch.Tensor,
        lang_masks: torch.Tensor,
    ) -> Prefix:
        """-> ``(embs [B,Lp,D], pad_masks [B,Lp], att_masks [B,Lp], position_ids [B,Lp])``.

        Unpruned: ``Lp = C*P + L`` and ``position_ids = cumsum(pad_masks) - 1`` (openpi).
        With pruning the image block is replaced by the pruner's rows; each keeps the position
        id of the patch it came from, and the prompt keeps its unpruned positions.
        """
        return self._embed_prefix(images, img_masks, lang_tokens, lang_masks, self._keep_tokens(len(images)))

    def _keep_tokens(self, num_cameras: int) -> Optional[int]:
        """The config's eval budget for ``num_cameras`` cameras' patches, as a Python int,
        computed outside the compiled region (see ``sample_actions``); the pruner clips it to N."""
        if not self.config.token_pruning_enabled:
            return None
        return self.config.keep_tokens(num_cameras * self.config.vision.num_patches)

    def _embed_prefix(self, images, img_masks, lang_tokens, lang_masks, keep_tokens: Optional[int]) -> Prefix:
        lang_masks = lang_masks.to(torch.bool)
        img_embs, img_pad = self.embed_images(images, img_masks)
        lang_embs = self.embed_prompt(lang_tokens)
        N = img_embs.shape[1]
        positions = torch.cumsum(torch.cat([img_pad, lang_masks], dim=1), dim=1) - 1  # unpruned
        img_pos, lang_pos = positions[:, :N], positions[:, N:]
        if self.config.token_pruning_enabled:
            img_embs, img_pad, src = self._prune_images(img_embs, img_pad, lang_embs, lang_masks, keep_tokens)
            img_pos = torch.gather(img_pos, 1, src)
        embs = torch.cat([img_embs, lang_embs.to(img_embs.dtype)], dim=1)
        pad = torch.cat([img_pad, lang_masks], dim=1)
        att = torch.zeros_like(pad)  # the whole prefix is one bidirectional block
        return embs, pad, att, torch.cat([img_pos, lang_pos], dim=1)

    def _prune_images(
        self,
        img_embs: torch.Tensor,
        img_pad: torch.Tensor,
        lang_embs: torch.Tensor,
        lang_masks: torch.Tensor,
        keep_tokens: Optional[int],
    ):
        """LightVLA pruning of the image block -> ``(embs [B,K,D], pad [B,K], src [B,K])``,
        ``src`` being the original image-token index each row comes from.

        Eval: hard selection, ``K`` = kept rows (padding rows: mask False), with the budget
        ``keep_tokens`` (None: the pruner's own setting). Training: the straight-through
        selection, ``K = N``, row i a copy of patch ``src[i]``.
        """
        cfg, pruner = self.config, self.token_pruner
        pruner.core.max_tokens = cfg.token_prune_max_tokens
        pruner.core.mask_voters = cfg.token_prune_mask_voters
        if self.training:
            user = self._token_pruner_user_noise_scale
            pruner.set_noise_scale(cfg.token_prune_noise_scale if user is None else user)
        else:
            pruner.set_noise_scale(None)
        embs, mask = pruner.prune(
            img_embs, lang_embs, task_token_mask=lang_masks, patch_token_mask=img_pad, keep_tokens=keep_tokens
        )
        core = pruner.core
        src = core.last_selected_indices_train if self.training else core.last_kept_indices_padded
        return embs, mask, src

    # ------------------------------------------------------------------ pruning controls (seed API)

    @property
    def token_pruning_enabled(self) -> bool:
        """The seed model's attribute for ``config.token_pruning_enabled`` (its training loop and
        notes read it)."""
        return self.config.token_pruning_enabled

    @token_pruning_enabled.setter
    def token_pruning_enabled(self, enabled: bool) -> None:
        self.config.token_pruning_enabled = bool(enabled)

    def set_token_pruner_noise_scale(self, noise_scale: Optional[float]) -> None:
        """Override the training noise scale (None: back to ``config.token_prune_noise_scale``)."""
        self._token_pruner_user_noise_scale = None if noise_scale is None else float(noise_scale)

    def set_token_pruner_keep_tokens(self, keep_tokens: Optional[int]) -> None:
        """Eval budget over all cameras; it wins over a ratio (None: the ratio if one is set,
        else implicit selection)."""
        if keep_tokens is not None and int(keep_tokens) < 1:
            raise ValueError(f"keep_tokens must be >= 1, got {keep_tokens}")
        self.config.token_prune_keep_tokens = None if keep_tokens is None else int(keep_tokens)

    def set_token_pruner_keep_ratio(self, keep_ratio: Optional[float]) -> None:
        """Eval budget as a ratio in (0, 1] of all cameras' patches, used while no
        ``keep_tokens`` is set (as in the seed)."""
        if keep_ratio is not None and not 0.0 < float(keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.config.token_prune_keep_ratio = None if keep_ratio is None else float(keep_ratio)

    def get_token_pruning_stats(self) -> dict:
        """The seed's telemetry of the last pruning call, as Python numbers. Computed here,
        when asked (it syncs with the device), never during the forward pass."""
        if not self.config.token_pruning_enabled:
            return {"enabled": False}
        core = self.token_pruner.core
        stats: dict = {
            "enabled": True,
            "noise_scale": core.noise_scale,
            "keep_tokens": self.config.token_prune_keep_tokens,
            "keep_ratio": self.config.token_prune_keep_ratio,
        }
        for key in ("last_kept_per_sample", "last_kept_per_sample_noisy") + TELEMETRY_KEYS:
            value = getattr(core, key)
            stats[key] = None if value is None else value.detach().cpu().tolist()
        kept = stats["last_kept_per_sample"]
        if kept:
            before = self.config.num_image_tokens
            mean = sum(kept) / len(kept)
            stats.update(
                last_kept_per_image_mean=[mean],
                last_kept_per_image_min=[min(kept)],
                last_kept_per_image_max=[max(kept)],
                last_before_tokens_per_image=[before],
                last_kept_ratio_per_image_mean=[mean / before],
                last_kept_ratio_overall_mean=mean / before,
                last_kept_overall_mean=float(mean),
                last_kept_overall_min=int(min(kept)),
                last_kept_overall_max=int(max(kept)),
            )
        return stats

    def prefix_kv_cache(self, embs: torch.Tensor, pad: torch.Tensor, att: torch.Tensor, pos: torch.Tensor) -> KVCache:
        """Run the prefix through the LLM once; per layer the post-RoPE ``(k, v) [B,KV,Lp,hd]``.

        The last layer's attention output and MLP feed nothing the expert reads, so they are
        skipped (openpi computes and discards them).
        """
        mask = make_att_2d_masks(pad, att)
        x = embs.to(self.llm.compute_dtype)
        cos, sin = rope_cos_sin(pos, self.llm.dims.head_dim, self.config.rope_theta, x.dtype)
        cache: KVCache = []
        for i, blk in enumerate(self.llm.blocks):
            q, k, v, gate = blk.qkv(x, None, cos, sin)
            cache.append((k, v))
            if i + 1 < len(self.llm.blocks):
                x = blk.finish(x, attention(q, k, v, mask), gate, None)
        return cache

    # ------------------------------------------------------------------ suffix / sampling

    def embed_suffix(self, x_t: torch.Tensor, timestep: torch.Tensor):
        """-> ``(action tokens [B,H,We], adaRMS condition [B,We])`` in the projections' dtype
        (float32; the sincos embedding is computed in float64 and rounded to it, as openpi)."""
        temb = sincos_time_embedding(timestep, self.action_in.out_features).to(self.time_in.weight.dtype)
        cond = F.silu(self.time_out(F.silu(self.time_in(temb))))
        return self.action_in(x_t.to(self.action_in.weight.dtype)), cond

    @staticmethod
    def _suffix_positions(prefix_pos: torch.Tensor, length: int) -> torch.Tensor:
        """``sum(unpruned prefix pad) + arange(length)``. The prompt comes last in the prefix
        and keeps its unpruned positions, so its last position + 1 is that sum (this needs a
        prompt block of length >= 1, which openpi's tokenizer always gives)."""
        return prefix_pos[:, -1:] + 1 + torch.arange(length, device=prefix_pos.device)

    def denoise_step(
        self,
        cache: KVCache,
        prefix_pad: torch.Tensor,
        prefix_pos: torch.Tensor,
        x_t: torch.Tensor,
        timestep: torch.Tensor,
        debug: Optional[dict] = None,
    ) -> torch.Tensor:
        """One velocity ``v_t [B,H,A]``: the expert over the suffix, attending to the cache."""
        suffix, cond = self.embed_suffix(x_t, timestep)
        B, S, _ = suffix.shape
        suffix_pad = torch.ones(B, S, dtype=torch.bool, device=suffix.device)
        suffix_att = torch.zeros(B, S, dtype=torch.bool, device=suffix.device)
        suffix_att[:, 0] = True  # one block that the prefix cannot see
        mask = torch.cat(
            [prefix_pad[:, None, :].expand(B, S, prefix_pad.shape[1]), make_att_2d_masks(suffix_pad, suffix_att)],
            dim=2,
        )
        x = suffix.to(self.expert.compute_dtype)
        cos, sin = rope_cos_sin(self._suffix_positions(prefix_pos, S), self.expert.dims.head_dim,
                                self.config.rope_theta, x.dtype)
        for blk, (k_cache, v_cache) in zip(self.expert.blocks, cache):
            q, k, v, gate = blk.qkv(x, cond, cos, sin)
            a = attention(q, torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2), mask)
            x = blk.finish(x, a, gate, cond)
        x, _ = self.expert.norm(x, cond)
        v_t = self.action_out(x.to(self.action_out.weight.dtype))
        if debug is not None:
            debug.setdefault("steps", []).append(
                dict(x_t=x_t, timestep=timestep, v_t=v_t, adarms_cond=cond, suffix_embs=suffix)
            )
        return v_t

    @torch.no_grad()
    def sample_actions(
        self,
        images: Sequence[torch.Tensor],
        img_masks: Sequence[torch.Tensor],
        lang_tokens: torch.Tensor,
        lang_masks: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        num_steps: int = 10,
        debug: Optional[dict] = None,
    ) -> torch.Tensor:
        """Flow-matching sampler: Euler from t=1 (noise) to t=0 -> actions ``[B,H,A]`` (float32).

        ``noise [B,H,A]`` defaults to N(0,1) with ``H = config.action_horizon``. Runs under
        torch.compile unless compilation is off (``config.pytorch_compile_mode=None`` or
        ``FASTPRUNE_TORCH_COMPILE=0``). Pass a dict as ``debug`` (eager) to receive the prefix
        (``prefix``), the cache (``prefix_kv_cache``) and per step ``x_t, timestep, v_t,
        adarms_cond, suffix_embs`` (``steps``).
        """
        noise = self._default_noise(lang_tokens.shape[0], lang_tokens.device, noise)
        # The schedule and the budget are computed here, outside the compiled region: the
        # schedule's float constants depend only on num_steps, and the budget enters as an
        # argument, which dynamo traces as a symbolic int (read from the config inside, each
        # budget value would be a constant and compile again).
        schedule = euler_timesteps(num_steps)
        keep_tokens = self._keep_tokens(len(images))
        if debug is not None:
            return self._sample(images, img_masks, lang_tokens, lang_masks, noise, schedule, keep_tokens, debug)
        return self._sample_compiled(images, img_masks, lang_tokens, lang_masks, noise, schedule, keep_tokens)

    def _sample(self, images, img_masks, lang_tokens, lang_masks, noise, schedule, keep_tokens, debug=None):
        prefix = self._embed_prefix(images, img_masks, lang_tokens, lang_masks, keep_tokens)
        return self._denoise(prefix, noise, schedule, debug)

    @torch.no_grad()
    def sample_actions_from_prefix(
        self, prefix: Prefix, noise: Optional[torch.Tensor] = None, num_steps: int = 10, debug: Optional[dict] = None
    ) -> torch.Tensor:
        """``sample_actions`` after ``embed_prefix`` (eager): cache the prefix, then the Euler loop."""
        noise = self._default_noise(prefix[0].shape[0], prefix[0].device, noise)
        return self._denoise(prefix, noise, euler_timesteps(num_steps), debug)

    def _default_noise(self, batch: int, device: torch.device, noise: Optional[torch.Tensor]) -> torch.Tensor:
        if noise is not None:
            return noise
        shape = (batch, self.config.action_horizon, self.config.action_dim)
        return torch.randn(shape, dtype=torch.float32, device=device)

    def _denoise(self, prefix: Prefix, noise: torch.Tensor, schedule, debug: Optional[dict]) -> torch.Tensor:
        embs, pad, att, pos = prefix
        B, device = embs.shape[0], embs.device
        cache = self.prefix_kv_cache(embs, pad, att, pos)
        if debug is not None:
            debug["prefix"] = prefix
            debug["prefix_kv_cache"] = cache
        dt, times = schedule
        x_t = noise.to(self.action_in.weight.dtype)
        for t in times:
            timestep = torch.full((B,), t, dtype=torch.float32, device=device)
            v_t = self.denoise_step(cache, pad, pos, x_t, timestep, debug)
            x_t = x_t + dt * v_t
        return x_t

    # ------------------------------------------------------------------ training

    def sample_time(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """pi0.5's ``t ~ Beta(1.5, 1) * 0.999 + 0.001`` (float32)."""
        beta = torch.distributions.Beta(
            torch.tensor(1.5, dtype=torch.float32, device=device), torch.tensor(1.0, dtype=torch.float32, device=device)
        )
        return beta.sample((batch_size,)) * 0.999 + 0.001

    def forward(
        self,
        images: Sequence[torch.Tensor],
        img_masks: Sequence[torch.Tensor],
        lang_tokens: torch.Tensor,
        lang_masks: torch.Tensor,
        actions: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        time: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-element flow-matching loss ``[B,H,A]``: ``x_t = t*noise + (1-t)*actions``,
        target ``u = noise - actions``, ``(u - v_t)^2``; prefix and suffix in one joint pass."""
        actions = actions.to(self.action_in.weight.dtype)
        B, H, _ = actions.shape
        if noise is None:
            noise = torch.randn_like(actions)
        if time is None:
            time = self.sample_time(B, actions.device)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions

        prefix, prefix_pad, prefix_att, prefix_pos = self.embed_prefix(images, img_masks, lang_tokens, lang_masks)
        suffix, cond = self.embed_suffix(x_t, time)
        P, S = prefix.shape[1], suffix.shape[1]
        suffix_pad = torch.ones(B, S, dtype=torch.bool, device=suffix.device)
        suffix_att = torch.zeros(B, S, dtype=torch.bool, device=suffix.device)
        suffix_att[:, 0] = True
        mask = make_att_2d_masks(torch.cat([prefix_pad, suffix_pad], 1), torch.cat([prefix_att, suffix_att], 1))
        pos = torch.cat([prefix_pos, self._suffix_positions(prefix_pos, S)], dim=1)
        dtype = self.llm.compute_dtype
        cos, sin = rope_cos_sin(pos, self.llm.dims.head_dim, self.config.rope_theta, dtype)
        xp, xs = prefix.to(dtype), suffix.to(dtype)
        depth = len(self.llm.blocks)
        for i, (lb, eb) in enumerate(zip(self.llm.blocks, self.expert.blocks)):
            qp, kp, vp, gp = lb.qkv(xp, None, cos[:, :P], sin[:, :P])
            qs, ks, vs, gs = eb.qkv(xs, cond, cos[:, P:], sin[:, P:])
            a = attention(torch.cat([qp, qs], 2), torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), mask)
            if i + 1 < depth:  # the prefix output of the last layer feeds nothing
                xp = lb.finish(xp, a[:, :, :P], gp, None)
            xs = eb.finish(xs, a[:, :, P:], gs, cond)
        xs, _ = self.expert.norm(xs, cond)
        v_t = self.action_out(xs[:, -H:].to(self.action_out.weight.dtype))
        return F.mse_loss(u_t, v_t, reduction="none")
