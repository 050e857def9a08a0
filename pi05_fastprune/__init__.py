"""pi05_fastprune: fused LightVLA visual-token pruning for pi0.5 (torch.ops.fastprune)."""

from pi05_fastprune.prune import PruneResult, prune_tokens, select_tokens

__all__ = ["PruneResult", "prune_tokens", "select_tokens"]
