// Autograd of the eval ops prune and prune_padded, for every backend behind them.
//
// Their `pruned` rows are copies of patch rows (kept_idx; padding rows zero), so its gradient
// w.r.t. patches is that gather's, as through the seed's argmax + gather. The selection is
// piecewise constant in patches and task: no other gradient flows, and task gets none.
// A call that needs no gradient costs one boxed redispatch. One that does gathers its rows
// again with differentiable ATen ops (bit-equal to the kernel's rows), so ATen's gather backward
// carries the gradient and torch.compile traces it like any other op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

// Stack on entry: the op's arguments, patches first; on return: pruned, kept_mask, kept_idx, counts.
void prune_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const at::Tensor patches = (*stack)[stack->size() - op.schema().arguments().size()].toTensor();
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
  }
  if (!c10::GradMode::is_enabled() || !patches.requires_grad()) return;
  const size_t first = stack->size() - 4;
  const at::Tensor kept_mask = (*stack)[first + 1].toTensor();
  const at::Tensor kept_idx = (*stack)[first + 2].toTensor();
  const auto index = kept_idx.unsqueeze(-1).expand_symint(
      {kept_idx.sym_size(0), kept_idx.sym_size(1), patches.sym_size(2)});
  (*stack)[first] = at::where(kept_mask.unsqueeze(-1), patches.gather(1, index), 0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, Autograd, m) {
  m.impl("prune", torch::CppFunction::makeFromBoxedFunction<&prune_autograd>());
  m.impl("prune_padded", torch::CppFunction::makeFromBoxedFunction<&prune_autograd>());
}
