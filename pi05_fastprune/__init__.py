"""pi05_fastprune: fused LightVLA visual-token pruning for pi0.5 (torch.ops.fastprune).

Ops: `prune_tokens` / `select_tokens` (eval), `select_soft` (training, straight-through).
Modules: `ImageTokenPruner` / `TokenPruner` (the seed integration's API) and the pi0.5
model `Pi05` / `Pi05Config`. `structured_inputs` makes pi0.5-like prefix embeddings.
"""

from pi05_fastprune import triton_ops  # noqa: F401  (registers fastprune::triton_* when triton is installed)
from pi05_fastprune.model import Pi05, Pi05Config
from pi05_fastprune.prune import PruneResult, prune_tokens, select_tokens
from pi05_fastprune.pruner import ImageTokenPruner, TokenPruner
from pi05_fastprune.select_soft import select_soft
from pi05_fastprune.structured import structured_inputs

__all__ = [
    "ImageTokenPruner",
    "Pi05",
    "Pi05Config",
    "PruneResult",
    "TokenPruner",
    "prune_tokens",
    "select_soft",
    "select_tokens",
    "structured_inputs",
]
