"""Small pruning workload for compute-sanitizer: every op and mode, masks, odd shapes, NaN."""
import sys
import torch
import pi05_fastprune  # noqa: F401
from pi05_fastprune import triton_ops
from pi05_fastprune.structured import structured_inputs

dev = "cuda" if torch.cuda.is_available() and "--cpu" not in sys.argv else "cpu"
backends = ["triton"] if dev == "cuda" and "--cuda-only" not in sys.argv else []
if dev == "cuda":
    try:
        p = torch.zeros(1, 4, 16, device=dev)
        torch.ops.fastprune.select(p, p[:, :2], None, None, False, "cuda")
        backends.append("cuda")
    except Exception as e:
        print("no cuda backend:", str(e).splitlines()[0][:120])
if dev == "cpu":
    backends = ["cpu"]
assert backends, "--cuda-only without the CUDA backend"
assert dev == "cpu" or triton_ops.HAVE_TRITON, "triton ops not registered"
cases = []
for dtype in (torch.bfloat16, torch.float32):
    cases.append(structured_inputs(batch=2, n_cameras=3, patches_per_camera=64, prompt_len=40, valid_prompt=12,
                                   width=256, dtype=dtype, device=dev, seed=1, absent_cameras=((1, 2),)))
# B=1 with a wide D: the Triton scores kernel splits D into slices (ksplit > 1) only here.
cases.append(structured_inputs(batch=1, n_cameras=2, patches_per_camera=48, prompt_len=40, valid_prompt=12,
                               width=1024, dtype=torch.bfloat16, device=dev, seed=2))
# pi0.5's 768 patches at B=8 (narrow D): the CUDA select kernel's blocks take 2 column tiles each
# only here.
cases.append(structured_inputs(batch=8, n_cameras=3, patches_per_camera=256, prompt_len=40, valid_prompt=12,
                               width=64, dtype=torch.bfloat16, device=dev, seed=3))
# CUDA C++ only (the Triton kernels would compile for each): kernel A's D slices past two steps,
# so that step s+2 stores into the buffer step s's product read (v75), with two token tiles (over
# 64 valid prompt tokens), as clusters of two blocks an SM on 132 SMs (6 slices of 3 steps); and
# without a D split (its finishing step in the block, v72; 4 steps).
cuda_cases = [
    structured_inputs(batch=8, n_cameras=3, patches_per_camera=64, prompt_len=160, valid_prompt=100, width=1024,
                      dtype=torch.bfloat16, device=dev, seed=4),
    structured_inputs(batch=16, n_cameras=3, patches_per_camera=256, prompt_len=40, valid_prompt=12, width=256,
                      dtype=torch.bfloat16, device=dev, seed=5),
] if dev == "cuda" else []
g = torch.Generator().manual_seed(0)
odd = [torch.randn(3, 77, 130, generator=g), torch.randn(3, 9, 130, generator=g),
       torch.rand(3, 9, generator=g) > 0.5, torch.rand(3, 77, generator=g) > 0.3]
odd[2][1] = False
odd[3][2] = False
odd[0][0, 5] = float("nan")
cases.append([x.to(dev) for x in odd])
for backend in backends:
    for patches, task, tm, pm in cases + (cuda_cases if backend == "cuda" else []):
        N = patches.shape[1]
        for _ in range(2):  # Triton on CUDA: the first call of a key records its launch plan, the second replays it
            idx = torch.ops.fastprune.select(patches, task, tm, pm, True, backend)
            for keep in (None, max(1, N // 8)):
                r = torch.ops.fastprune.prune(patches, task, tm, pm, keep, False, backend)
                r2 = torch.ops.fastprune.prune_padded(patches, task, tm, pm, keep, max(1, N // 4), True, backend)
        if dev == "cuda":
            torch.cuda.synchronize()
        print(backend, tuple(patches.shape), patches.dtype, "counts", r[3].tolist(), r2[3].tolist(), flush=True)
print("sanitize_prune OK")
