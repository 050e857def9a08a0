import sys
import torch
torch.ops.load_library(sys.argv[1])
assert torch._C._dispatch_has_kernel_for_dispatch_key("fastprune::prune", "CUDA"), "built without CUDA"
g = torch.Generator().manual_seed(0)
p, t = torch.randn(2, 50, 32, generator=g), torch.randn(2, 7, 32, generator=g)
pm = torch.ones(2, 50, dtype=torch.bool)
pm[1, 25:] = False
cpu = torch.ops.fastprune.prune(p, t, None, pm, 9, False, "cpu")
gpu = torch.ops.fastprune.prune(p.cuda(), t.cuda(), None, pm.cuda(), 9, False, "cuda")
assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu)), "CUDA and CPU kernels differ"
print("cmake CUDA library OK", gpu[3].tolist())
