import torch, pi05_fastprune  # noqa: E401,F401
p = torch.randn(1, 8, 16)
try:
    torch.ops.fastprune.prune(p, p[:, :3], None, None, 0, False, "cpu")
except RuntimeError as e:
    print("raised:", e)
