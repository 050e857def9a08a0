"""pi05_fastprune: fused LightVLA visual-token pruning for pi0.5 (torch.ops.fastprune).

Ops: `prune_tokens` / `select_tokens` (eval), `select_soft` (training, straight-through).
Modules: `ImageTokenPruner` / `TokenPruner` (the seed integration's API), the pi0.5 model
`Pi05` / `Pi05Config` (openpi checkpoints: `Pi05.from_openpi`, `save_openpi`) and
`Pi05Policy` (observation in, action chunk out). `structured_inputs` makes pi0.5-like
prefix embeddings.
"""

from pi05_fastprune import triton_ops  # noqa: F401  (registers fastprune::triton_* when triton is installed)
from pi05_fastprune.model import Pi05, Pi05Config
from pi05_fastprune.openpi_checkpoint import CheckpointMismatchError
from pi05_fastprune.policy import Pi05Policy
from pi05_fastprune.prune import PruneResult, prune_tokens, select_tokens
from pi05_fastprune.pruner import ImageTokenPruner, TokenPruner
from pi05_fastprune.select_soft import select_soft
from pi05_fastprune.structured import structured_inputs

__all__ = [
    "CheckpointMismatchError",
    "ImageTokenPruner",
    "Pi05",
    "Pi05Config",
    "Pi05Policy",
    "PruneResult",
    "TokenPruner",
    "prune_tokens",
    "select_soft",
    "select_tokens",
    "structured_inputs",
]
