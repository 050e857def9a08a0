# Which bad-input calls crash this build (each in its own process), then a backtrace of the first crash.
import subprocess, sys
CASES = {
 "cuda_keep0": 'ops.prune(p, t, None, None, 0, False, "cuda")',
 "triton_keep0": 'ops.prune(p, t, None, None, 0, False, "triton")',
 "cuda_keep9": 'ops.prune(p, t, None, None, 9, False, "cuda")',
 "cuda_padded_cap0": 'ops.prune_padded(p, t, None, None, None, 0, False, "cuda")',
 "cuda_task_width": 'ops.prune(p, t[..., :8].contiguous(), None, None, None, False, "cuda")',
 "cpu_keep0": 'ops.prune(p.cpu(), t.cpu(), None, None, 0, False, "cpu")',
 "cpu_task_width": 'ops.prune(p.cpu(), t[..., :8].cpu().contiguous(), None, None, None, False, "cpu")',
 "cuda_backend_cpu": 'ops.prune(p, t, None, None, None, False, "cpu")',
}
PRE = "import faulthandler; faulthandler.enable(); import torch, pi05_fastprune; ops = torch.ops.fastprune\np = torch.randn(1, 8, 16, device='cuda'); t = torch.randn(1, 3, 16, device='cuda')\n"
crash = None
for name, call in CASES.items():
    code = PRE + f"try:\n    {call}\n    print('NO ERROR')\nexcept Exception as e:\n    print(type(e).__name__, str(e).splitlines()[0][:160])\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    print(f"{name}: rc={r.returncode} {r.stdout.strip()[-200:]}", flush=True)
    if r.returncode != 0 and crash is None:
        crash = code
if crash:
    open("/tmp/crash.py", "w").write(crash)
    r = subprocess.run(["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, "/tmp/crash.py"],
                       capture_output=True, text=True, timeout=90)
    print(r.stdout[-7000:], r.stderr[-1500:])
