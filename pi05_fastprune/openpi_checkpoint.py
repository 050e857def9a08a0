"""openpi checkpoint names <-> our module names, and load/save of ``model.safetensors``.

This is the only place that knows openpi's names. openpi's ``PI0Pytorch`` (pi05) writes its
weights with ``safetensors.torch.save_model``: the prompt embedding is stored once, as
``paligemma_with_expert.paligemma.lm_head.weight`` (``embed_tokens`` is tied to it), the
expert's unused ``lm_head`` is stored too, expert norms are adaRMS ``.dense`` layers, and
non-persistent buffers (RoPE ``inv_freq``, SigLIP ``position_ids``) are absent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pi05_fastprune.model import GEMMA_VARIANTS, Pi05, Pi05Config

__all__ = ["CheckpointMismatchError", "openpi_names", "infer_config", "load_openpi", "save_openpi", "weights_file"]

_PG = "paligemma_with_expert.paligemma"
_VIS = f"{_PG}.model.vision_tower.vision_model"
_LM = f"{_PG}.model.language_model"
_EX = "paligemma_with_expert.gemma_expert"
TIED_EMBED = f"{_LM}.embed_tokens.weight"
PROMPT_EMBED = f"{_PG}.lm_head.weight"
CONFIG_METADATA_KEY = "pi05_fastprune.config"

_GEMMA_BLOCK = [
    ("attn_norm", "input_layernorm"),
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.o_proj"),
    ("mlp_norm", "post_attention_layernorm"),
    ("gate", "mlp.gate_proj"),
    ("up", "mlp.up_proj"),
    ("down", "mlp.down_proj"),
]
_VISION_BLOCK = [
    ("norm1", "layer_norm1"),
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.out_proj"),
    ("norm2", "layer_norm2"),
    ("fc1", "mlp.fc1"),
    ("fc2", "mlp.fc2"),
]

# (our module path, openpi module path); "{i}" stands for a layer index. A tensor's name is
# "<module path>.<leaf>" on both sides (leaf: weight, bias, dense.weight, ...), except the
# two whole-name entries at the end.
_MODULES = (
    [
        ("vision.patch_embed", f"{_VIS}.embeddings.patch_embedding"),
        ("vision.pos_embed", f"{_VIS}.embeddings.position_embedding"),
        ("vision.norm", f"{_VIS}.post_layernorm"),
        ("projector", f"{_PG}.model.multi_modal_projector.linear"),
        ("llm.norm", f"{_LM}.norm"),
        ("expert.norm", f"{_EX}.model.norm"),
        ("action_in", "action_in_proj"),
        ("action_out", "action_out_proj"),
        ("time_in", "time_mlp_in"),
        ("time_out", "time_mlp_out"),
    ]
    + [(f"vision.blocks.{{i}}.{a}", f"{_VIS}.encoder.layers.{{i}}.{b}") for a, b in _VISION_BLOCK]
    + [(f"llm.blocks.{{i}}.{a}", f"{_LM}.layers.{{i}}.{b}") for a, b in _GEMMA_BLOCK]
    + [(f"expert.blocks.{{i}}.{a}", f"{_EX}.model.layers.{{i}}.{b}") for a, b in _GEMMA_BLOCK]
)
_WHOLE_NAMES = {
    "llm.embed.weight": PROMPT_EMBED,  # tied embed_tokens, stored under lm_head
    "expert.lm_head": f"{_EX}.lm_head.weight",  # unused by pi0.5, kept for the layout
}


def _compile_rules():
    rules = []
    for ours, theirs in _MODULES:
        pattern = "^" + re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<leaf>.+)$"
        rules.append((re.compile(pattern), theirs))
    return rules


_RULES = _compile_rules()


class CheckpointMismatchError(ValueError):
    """The file's tensors do not match the model: names missing, unexpected, or mis-shaped."""


def openpi_name(ours: str) -> str:
    """Our state_dict key -> openpi's key."""
    if ours in _WHOLE_NAMES:
        return _WHOLE_NAMES[ours]
    for pattern, theirs in _RULES:
        m = pattern.match(ours)
        if m:
            i = m.groupdict().get("i")
            return (theirs.replace("{i}", i) if i is not None else theirs) + "." + m.group("leaf")
    raise KeyError(f"no openpi name for model tensor {ours!r}")


def openpi_names(model: Pi05) -> dict[str, str]:
    """Every persistent tensor of ``model``: our name -> openpi name (a bijection)."""
    names = {k: openpi_name(k) for k in model.state_dict(keep_vars=True)}
    if len(set(names.values())) != len(names):
        raise AssertionError("the openpi name mapping is not one-to-one")
    return names


# ----------------------------------------------------------------------------------------
# Config inference
# ----------------------------------------------------------------------------------------

# SigLIP heads cannot be read from shapes: known widths (So400m; B/16; the tiny
# conformance tower). Other widths need an explicit config or our saved metadata.
_SIGLIP_HEADS = {1152: 16, 768: 12, 32: 4}
# Every openpi Gemma variant has 8 query heads (so head_dim = q rows / 8).
_GEMMA_HEADS = 8
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _count_layers(shapes: dict, prefix: str) -> int:
    pat = re.compile("^" + re.escape(prefix) + r"\.(\d+)\.")
    idx = {int(m.group(1)) for k in shapes for m in [pat.match(k)] if m}
    return max(idx) + 1 if idx else 0


def _shape(shapes: dict, key: str) -> tuple:
    if key not in shapes:
        raise CheckpointMismatchError(f"cannot infer the config: the file has no tensor {key!r}")
    return shapes[key]


def _gemma_variant(dims, candidates) -> str:
    for name in candidates:
        if GEMMA_VARIANTS[name] == dims:
            return name
    return candidates[0]


def infer_config(shapes: dict[str, tuple], dtypes: Optional[dict[str, str]] = None) -> Pi05Config:
    """A ``Pi05Config`` whose dimensions match an openpi pi0.5 state dict's ``shapes``.

    Not readable from shapes (so the defaults apply): ``action_horizon``, ``max_token_len``,
    the pruning fields, the SigLIP head count (taken from a table of known widths) and the
    Gemma head count (8, as in every openpi variant).
    """
    pw, _, patch, _ = _shape(shapes, f"{_VIS}.embeddings.patch_embedding.weight")
    num_pos = _shape(shapes, f"{_VIS}.embeddings.position_embedding.weight")[0]
    grid = math.isqrt(num_pos)
    if grid * grid != num_pos:
        raise CheckpointMismatchError(f"position_embedding has {num_pos} rows, not a square grid")
    if pw not in _SIGLIP_HEADS:
        raise CheckpointMismatchError(
            f"cannot infer the SigLIP head count for width {pw}: pass an explicit config"
        )
    vocab, llm_w = _shape(shapes, PROMPT_EMBED)
    action_dim = _shape(shapes, "action_in_proj.weight")[1]

    def gemma(prefix):
        q_rows, width = _shape(shapes, f"{prefix}.layers.0.self_attn.q_proj.weight")
        kv_rows = _shape(shapes, f"{prefix}.layers.0.self_attn.k_proj.weight")[0]
        head_dim = q_rows // _GEMMA_HEADS
        return GEMMA_VARIANTS["dummy"]._replace(
            width=width,
            depth=_count_layers(shapes, f"{prefix}.layers"),
            mlp_dim=_shape(shapes, f"{prefix}.layers.0.mlp.gate_proj.weight")[0],
            num_heads=_GEMMA_HEADS,
            num_kv_heads=kv_rows // head_dim,
            head_dim=head_dim,
        )

    llm, expert = gemma(_LM), gemma(f"{_EX}.model")
    dtype = "float32"
    if dtypes is not None:
        dtype = "bfloat16" if dtypes.get(f"{_LM}.layers.0.self_attn.q_proj.weight") == "bfloat16" else "float32"
    return Pi05Config(
        paligemma_variant=_gemma_variant(llm, ["gemma_2b", "dummy"]),
        action_expert_variant=_gemma_variant(expert, ["gemma_300m", "dummy"]),
        action_dim=action_dim,
        dtype=dtype,
        vision_width=pw,
        vision_depth=_count_layers(shapes, f"{_VIS}.encoder.layers"),
        vision_num_heads=_SIGLIP_HEADS[pw],
        vision_mlp_dim=_shape(shapes, f"{_VIS}.encoder.layers.0.mlp.fc1.weight")[0],
        vision_patch_size=patch,
        vision_image_size=grid * patch,
        **{f"llm_{k}": v for k, v in llm._asdict().items()},
        **{f"expert_{k}": v for k, v in expert._asdict().items()},
        vocab_size=vocab,
    )


# ----------------------------------------------------------------------------------------
# Load / save
# ----------------------------------------------------------------------------------------


def _dtype_name(dtype) -> Optional[str]:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, str(dtype))


def _mismatch_message(path, missing, unexpected, mis_shaped, limit: int = 20) -> str:
    lines = [f"{path}: the file does not match the model"]
    for title, items in (("missing from the file", missing), ("unexpected in the file", unexpected)):
        if items:
            shown = ", ".join(sorted(items)[:limit])
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"  {len(items)} {title}: {shown}{more}")
    if mis_shaped:
        shown = "; ".join(f"{k}: file {list(f)} vs model {list(m)}" for k, f, m in sorted(mis_shaped)[:limit])
        lines.append(f"  {len(mis_shaped)} with the wrong shape: {shown}")
    return "\n".join(lines)


def weights_file(path) -> pathlib.Path:
    """openpi's ``model.safetensors``, given as the file or as the directory holding it (the
    seed's ``pytorch_weight_path`` and openpi's checkpoint step directories are directories)."""
    p = pathlib.Path(path)
    weights = p / "model.safetensors" if p.is_dir() else p
    if not weights.is_file():
        raise FileNotFoundError(f"no checkpoint at {weights}")
    return weights


def load_openpi(
    path: str,
    config: Optional[Pi05Config] = None,
    device: Optional[torch.device | str] = None,
    dtype: Optional[str | torch.dtype] = None,
) -> Pi05:
    """Build a ``Pi05`` from openpi's ``model.safetensors``, in eval mode.

    Strict: every file tensor is used and every model tensor filled, with the right shape;
    otherwise ``CheckpointMismatchError`` names the offending keys. The file is memory-mapped
    (``safe_open``) and each tensor goes straight to ``device`` in the model's dtype for it
    (with ``dtype="bfloat16"``, openpi's float32 tensors stay float32). ``config=None``
    infers the dimensions from the file (our own saved config in its metadata if present);
    ``dtype`` overrides ``config.dtype`` (default: the file's precision).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    path = str(weights_file(path))
    with safe_open(path, framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        if config is None:
            meta = f.metadata() or {}
            if CONFIG_METADATA_KEY in meta:
                config = Pi05Config(**json.loads(meta[CONFIG_METADATA_KEY]))
            else:
                file_dtypes = {k: _DTYPE_NAMES.get(f.get_slice(k).get_dtype(), "?") for k in keys}
                config = infer_config(shapes, file_dtypes)
        if dtype is not None:
            config = dataclasses.replace(config, dtype=_dtype_name(dtype))
        model = Pi05(config, device="meta")
        names = openpi_names(model)
        targets = model.state_dict(keep_vars=True)
        expected = {names[k]: tuple(t.shape) for k, t in targets.items()}
        missing = sorted(set(expected) - keys)
        unexpected = sorted(keys - set(expected))
        mis_shaped = [(k, shapes[k], expected[k]) for k in sorted(keys & set(expected)) if shapes[k] != expected[k]]
        if missing or unexpected or mis_shaped:
            raise CheckpointMismatchError(_mismatch_message(path, missing, unexpected, mis_shaped))
        state = {k: f.get_tensor(names[k]).to(device=device, dtype=t.dtype) for k, t in targets.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def openpi_state_dict(model: Pi05) -> dict[str, torch.Tensor]:
    """The model's tensors under openpi's names (same dtypes, same storage)."""
    names = openpi_names(model)
    return {names[k]: t for k, t in model.state_dict().items()}


def save_openpi(model: Pi05, path: str) -> None:
    """Write openpi's ``model.safetensors`` layout (what its ``save_model`` writes).

    Dtypes are the model's: a bfloat16 model writes openpi's trainer layout (SigLIP
    patch/position embeddings, every RMSNorm/adaRMS dense and the action/time projections
    float32, the rest bfloat16); a float32 model writes all float32. Our config goes in the
    metadata so that ``load_openpi`` restores it exactly (openpi ignores it).
    """
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in openpi_state_dict(model).items()}
    metadata = {
        "format": "pt",
        TIED_EMBED: PROMPT_EMBED,
        CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(model.config)),
    }
    save_file(tensors, path, metadata=metadata)
