// A launch of a kernel that some other compiler loaded (a CUfunction, e.g. one of triton's
// compiled kernels), on raw pointers and a cudaStream_t: no ATen/c10/torch header. The Triton
// backend's launch plans (csrc/triton_plan.h) replay their kernels through it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastprune_cuda {

// cuLaunchKernel(function, grid, (block, 1, 1), shared, stream, params): the driver's status
// (CUresult as an int; 0 is success), or -1 when the driver's entry point is unavailable.
int launch_function(uint64_t function, const uint32_t grid[3], uint32_t block, uint32_t shared,
                    cudaStream_t stream, void** params);

// Makes `device`'s primary context current on this thread where no context is: cuLaunchKernel
// launches into the current context, and a replay may reach it before any runtime call (which
// would make one current) on this thread. cudaSuccess when a context is current afterwards.
cudaError_t make_context_current(int device);

// The driver's name of a launch_function status ("unknown" when it has none).
const char* launch_function_error(int status);

}  // namespace fastprune_cuda
