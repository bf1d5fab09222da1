// Routing plan of unimoe_kernels.types.RoutingPlan over raw pointers, shared by the CPU and CUDA
// implementations and the pybind11 bindings. No torch and no pybind11 here, so nvcc compiles the
// CUDA file without either; errors are C++ exceptions that pybind11 maps to Python ones
// (std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError).
#pragma once

#include <cstdint>

namespace unimoe {

// Sizes shared by both implementations. All outputs are int32 and preallocated by the caller:
//   counts [E], offsets [E+1], sorted_slots [N], slot_rows [N], tile_expert [max_tiles],
//   tile_row_start [max_tiles], with max_tiles >= ceil(N / block_m) + E.
struct RoutingArgs {
  const void* ids;        // [N] int32 or int64 expert ids, contiguous, flat slot order t*k + j
  bool ids_is_int64;
  int64_t num_slots;      // N = T*k
  int64_t num_experts;    // E
  int64_t block_m;        // tile height of the grouped GEMM
  int64_t max_tiles;      // length of the tile-map buffers
  int32_t* counts;
  int32_t* offsets;
  int32_t* sorted_slots;
  int32_t* slot_rows;
  int32_t* tile_expert;
  int32_t* tile_row_start;
};

// Throws std::invalid_argument when sizes or pointers are unusable.
void check_routing_args(const RoutingArgs& a);

// Stable counting sort, O(N + E) time. Throws std::invalid_argument for an id outside [0, E)
// (checking is free on the host, unlike on the GPU).
void routing_plan_cpu(const RoutingArgs& a);

#ifdef UNIMOE_WITH_CUDA
// Bytes of device workspace routing_plan_cuda needs for N slots and E experts.
int64_t routing_workspace_bytes_cuda(int64_t num_slots, int64_t num_experts);

// Same plan on the GPU, enqueued on `stream` (a cudaStream_t as an integer) without any host
// synchronisation or allocation. `workspace` is device memory of at least
// routing_workspace_bytes_cuda(N, E) bytes. Ids outside [0, E) cannot be checked without a sync:
// they are not counted and are placed, in slot order, after every valid slot (rows
// offsets[E] .. N-1), so memory stays in bounds and the result stays deterministic.
void routing_plan_cuda(const RoutingArgs& a, void* workspace, int64_t workspace_bytes,
                       std::uintptr_t stream);
#endif

}  // namespace unimoe
