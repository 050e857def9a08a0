// The one schema block of torch.ops.fastprune. Implementations register per dispatch key
// elsewhere: CPU in prune_cpu.cpp / select_soft_cpu.cpp, CUDA in *_cuda.cpp (built only with
// CUDA torch), fakes and Triton launchers in Python (pi05_fastprune/).
//
// `backend` picks the implementation on a device: "auto", "cpu", "triton" or "cuda".
#include <torch/library.h>

TORCH_LIBRARY(fastprune, m) {
  // Row argmax of the LightVLA score: idx[b, i] = argmax_j score[b, i, j] (lowest j on a tie);
  // with mask_voters, rows of invalid patches do not vote and get -1.
  m.def(
      "select(Tensor patches, Tensor task, Tensor? task_mask=None, Tensor? patch_mask=None, "
      "bool mask_voters=False, str backend=\"auto\") -> Tensor");
  // Eval pruning with gather-pad to K = max(1, max counts) rows (data-dependent K). The budgets
  // are SymInt so that torch.compile(dynamic=True) keeps them symbolic: as `int`, every new
  // keep_tokens / max_tokens value (and keep_ratio's k as N varies) compiled the graph again, and
  // under fullgraph=True the 9th one failed (the recompile limit).
  m.def(
      "prune(Tensor patches, Tensor task, Tensor? task_mask=None, Tensor? patch_mask=None, "
      "SymInt? keep_tokens=None, bool mask_voters=False, str backend=\"auto\") "
      "-> (Tensor pruned, Tensor kept_mask, Tensor kept_idx, Tensor counts)");
  // Static-cap variant: exactly max_tokens rows, no host sync (CUDA graphs).
  m.def(
      "prune_padded(Tensor patches, Tensor task, Tensor? task_mask, Tensor? patch_mask, "
      "SymInt? keep_tokens, SymInt max_tokens, bool mask_voters=False, str backend=\"auto\") "
      "-> (Tensor pruned, Tensor kept_mask, Tensor kept_idx, Tensor counts)");
  // Training straight-through selection (SPEC "Training"): rows patches[idx], idx = argmax(score + noise_scale*U), row lse.
  m.def(
      "select_soft(Tensor patches, Tensor task, Tensor? task_mask=None, Tensor? patch_mask=None, "
      "Tensor? noise_scale=None, Tensor? seed=None, Tensor? noise=None, str backend=\"auto\") "
      "-> (Tensor selected, Tensor idx, Tensor lse)");
  // Gradient of select_soft w.r.t. patches and task (softmax(score') @ patches through the scoring chain).
  m.def(
      "select_soft_backward(Tensor grad, Tensor patches, Tensor task, Tensor? task_mask, "
      "Tensor? patch_mask, Tensor? noise_scale, Tensor? seed, Tensor? noise, Tensor idx, Tensor lse, "
      "str backend=\"auto\") -> (Tensor grad_patches, Tensor grad_task)");
  // Launch plans of backend="triton" (triton_plan.h): the Python launch code stores the plan it
  // recorded for a select / prune / prune_padded call's key; eager calls with that key replay it
  // in C++.
  m.def(
      "_triton_plan_put(str op, Tensor patches, Tensor task, Tensor? task_mask, Tensor? patch_mask, "
      "int? keep_tokens, int? max_tokens, bool mask_voters, int[] plan) -> bool");
  m.def("_triton_plans_clear() -> ()");
  // What a replay of the call would allocate and launch (kernel, grid, block, shared bytes and
  // parameter values per launch), without launching, with prune's host-read K taken as `k`: for
  // tests.
  m.def(
      "_triton_plan_launches(str op, Tensor patches, Tensor task, Tensor? task_mask, Tensor? patch_mask, "
      "int? keep_tokens, int? max_tokens, bool mask_voters, int? k=None) -> (Tensor[] buffers, int[] launches)");
}
