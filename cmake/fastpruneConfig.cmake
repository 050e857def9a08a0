# find_package(fastprune) for LibTorch users of an installed op library (cmake --install):
# the imported target fastprune::fastprune. Link it beside ${TORCH_LIBRARIES}; its link option
# --no-as-needed keeps libfastprune.so loaded although no symbol of it is called (its static
# initialisers register torch.ops.fastprune with the dispatcher).
include("${CMAKE_CURRENT_LIST_DIR}/fastpruneTargets.cmake")
