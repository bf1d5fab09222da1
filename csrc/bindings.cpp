// pybind11 module unimoe_kernels._C: raw pointers (tensor.data_ptr() as ints), sizes and a stream
// handle, so it needs no torch headers and one build serves every torch version. Python
// (unimoe_kernels/ops/routing.py) allocates every buffer and wraps these as torch custom ops.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "routing.h"

namespace py = pybind11;

namespace {

unimoe::RoutingArgs make_args(std::uintptr_t ids, bool ids_is_int64, int64_t num_slots,
                              int64_t num_experts, int64_t block_m, int64_t max_tiles,
                              std::uintptr_t counts, std::uintptr_t offsets,
                              std::uintptr_t sorted_slots, std::uintptr_t slot_rows,
                              std::uintptr_t tile_expert, std::uintptr_t tile_row_start) {
  auto i32 = [](std::uintptr_t p) { return reinterpret_cast<int32_t*>(p); };
  return unimoe::RoutingArgs{reinterpret_cast<const void*>(ids), ids_is_int64, num_slots,
                             num_experts, block_m, max_tiles, i32(counts), i32(offsets),
                             i32(sorted_slots), i32(slot_rows), i32(tile_expert),
                             i32(tile_row_start)};
}

void plan_cpu(std::uintptr_t ids, bool ids_is_int64, int64_t num_slots, int64_t num_experts,
              int64_t block_m, int64_t max_tiles, std::uintptr_t counts, std::uintptr_t offsets,
              std::uintptr_t sorted_slots, std::uintptr_t slot_rows, std::uintptr_t tile_expert,
              std::uintptr_t tile_row_start) {
  unimoe::routing_plan_cpu(make_args(ids, ids_is_int64, num_slots, num_experts, block_m,
                                     max_tiles, counts, offsets, sorted_slots, slot_rows,
                                     tile_expert, tile_row_start));
}

int64_t workspace_bytes(int64_t num_slots, int64_t num_experts) {
#ifdef UNIMOE_WITH_CUDA
  return unimoe::routing_workspace_bytes_cuda(num_slots, num_experts);
#else
  (void)num_slots, (void)num_experts;
  throw std::runtime_error("unimoe_kernels._C was built without CUDA");
#endif
}

void plan_cuda(std::uintptr_t ids, bool ids_is_int64, int64_t num_slots, int64_t num_experts,
               int64_t block_m, int64_t max_tiles, std::uintptr_t counts, std::uintptr_t offsets,
               std::uintptr_t sorted_slots, std::uintptr_t slot_rows, std::uintptr_t tile_expert,
               std::uintptr_t tile_row_start, std::uintptr_t workspace, int64_t workspace_bytes,
               std::uintptr_t stream) {
#ifdef UNIMOE_WITH_CUDA
  unimoe::routing_plan_cuda(make_args(ids, ids_is_int64, num_slots, num_experts, block_m,
                                      max_tiles, counts, offsets, sorted_slots, slot_rows,
                                      tile_expert, tile_row_start),
                            reinterpret_cast<void*>(workspace), workspace_bytes, stream);
#else
  (void)ids, (void)ids_is_int64, (void)num_slots, (void)num_experts, (void)block_m;
  (void)max_tiles, (void)counts, (void)offsets, (void)sorted_slots, (void)slot_rows;
  (void)tile_expert, (void)tile_row_start, (void)workspace, (void)workspace_bytes, (void)stream;
  throw std::runtime_error("unimoe_kernels._C was built without CUDA");
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "unimoe_kernels C++/CUDA extension: routing plan over raw pointers (no torch headers).";

  m.def("has_cuda",
        []() {
#ifdef UNIMOE_WITH_CUDA
          return true;
#else
          return false;
#endif
        },
        "Whether the module was compiled with its CUDA kernels (never touches the GPU).");

  // Work happens on raw buffers only, so the GIL is released for the whole call; exceptions
  // thrown inside are translated after it is re-acquired.
  m.def("routing_plan_cpu", &plan_cpu, py::call_guard<py::gil_scoped_release>(),
        py::arg("ids_ptr"), py::arg("ids_is_int64"), py::arg("num_slots"),
        py::arg("num_experts"), py::arg("block_m"), py::arg("max_tiles"), py::arg("counts_ptr"),
        py::arg("offsets_ptr"), py::arg("sorted_slots_ptr"), py::arg("slot_rows_ptr"),
        py::arg("tile_expert_ptr"), py::arg("tile_row_start_ptr"),
        "Routing plan of types.RoutingPlan on host buffers: ids [N] int32/int64; int32 outputs "
        "counts [E], offsets [E+1], sorted_slots [N], slot_rows [N], tile_expert [max_tiles], "
        "tile_row_start [max_tiles]. Stable counting sort, O(N + E). ValueError on bad sizes "
        "or ids outside [0, E).");

  m.def("routing_workspace_bytes", &workspace_bytes, py::arg("num_slots"), py::arg("num_experts"),
        "Bytes of device workspace routing_plan_cuda needs.");

  m.def("routing_plan_cuda", &plan_cuda, py::call_guard<py::gil_scoped_release>(),
        py::arg("ids_ptr"), py::arg("ids_is_int64"), py::arg("num_slots"),
        py::arg("num_experts"), py::arg("block_m"), py::arg("max_tiles"), py::arg("counts_ptr"),
        py::arg("offsets_ptr"), py::arg("sorted_slots_ptr"), py::arg("slot_rows_ptr"),
        py::arg("tile_expert_ptr"), py::arg("tile_row_start_ptr"), py::arg("workspace_ptr"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "routing_plan_cpu's plan on device buffers of the current device, enqueued on `stream` "
        "(cudaStream_t as int) with no host sync; workspace_ptr: device memory of "
        "routing_workspace_bytes(N, E) bytes. Ids outside [0, E) are not counted and land after "
        "offsets[E].");
}
