"""A triton driver for a machine without a GPU: kernels compile for an H100 (sm_90) and their
launches are recorded, not run. Everything on the host side of a launch runs for real
(``JITFunction.run``'s binding, specialisation, cache and compile, ``CompiledKernel[grid]``), so
its host cost and the arguments each launch would get can be measured and compared here.

    from triton_fake_driver import FakeDriver
    with FakeDriver() as drv:    # CPU tensors stand in for device ones
        ...launch...
        drv.launches             # [(compiled kernel's launcher, grid, stream, function, args)]

A launch records each pointer argument as the address triton's C launcher would pass to the
kernel: a tensor's ``data_ptr()``, an int as it is.

Written against triton 3.6 and 3.7 (the GPU machines' and torch 2.13's); only for tests and
bench/host_prune.py --fake-driver.
"""

from __future__ import annotations

import itertools

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime import driver

H100 = GPUTarget("cuda", 90, 32)


class _Utils:
    def __init__(self):
        self.functions = itertools.count(1)

    def load_binary(self, name, kernel, shared, device):
        # module, function (a handle per loaded kernel, as the driver's), n_regs, n_spills, n_max_threads
        return 1, next(self.functions), 32, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}


class FakeDriver(CudaDriver):
    """Active inside ``with``; ``record=False`` keeps no launches (for timing)."""

    def __init__(self, record: bool = True):  # no CudaDriver.__init__: it needs libcuda
        if torch.cuda.is_available():
            # Kernels compiled under it stay in triton's caches for device 0 with a launcher
            # that runs nothing.
            raise RuntimeError("FakeDriver is for machines without a GPU")
        self.utils = _Utils()
        self.launches = []
        self.record = record
        drv = self

        class Launcher:
            def __init__(self, src, metadata):
                self.name = src.fn.__name__ if hasattr(src, "fn") else str(src)
                # Positions of the pointer parameters (signature types "*fp32", ...), and of the
                # parameters that the kernel receives (not constexprs), with their types.
                self.pointers = frozenset(i for i, ty in enumerate(src.signature.values())
                                          if isinstance(ty, str) and ty.startswith("*"))
                self.params = tuple((i, ty) for i, ty in enumerate(src.signature.values()) if ty != "constexpr")

            def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
                         exit_hook, *args):
                if drv.record:
                    args = tuple(a.data_ptr() if i in self.pointers and hasattr(a, "data_ptr") else a
                                 for i, a in enumerate(args))
                    drv.launches.append((self, (gx, gy, gz), stream, function, packed_metadata, args))

        self.launcher_cls = Launcher

    def get_current_target(self):
        return H100

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    @staticmethod
    def is_active():
        return True

    def __enter__(self):
        self._saved = driver._active
        driver.set_active(self)
        return self

    def __exit__(self, *exc):
        driver._active = self._saved
