// CPU routing plan: a stable counting sort of the N expert ids plus the GEMM tile map.
//
// Time O(N + E + max_tiles), extra memory O(E). The pybind11 binding releases the GIL around it,
// so other Python threads run while a large plan is built.
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "routing.h"

namespace unimoe {

void check_routing_args(const RoutingArgs& a) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("routing_plan: " + msg); };
  if (a.num_slots < 0) fail("num_slots must be >= 0, got " + std::to_string(a.num_slots));
  if (a.num_experts < 1) fail("num_experts must be >= 1, got " + std::to_string(a.num_experts));
  if (a.block_m < 1) fail("block_m must be >= 1, got " + std::to_string(a.block_m));
  // Outputs are int32 row indices, and offsets[E] / tile counts must fit too.
  const int64_t i32max = std::numeric_limits<int32_t>::max();
  if (a.num_slots > i32max) fail("num_slots must fit in int32, got " + std::to_string(a.num_slots));
  if (a.num_experts > i32max - 1)
    fail("num_experts must be < 2^31 - 1, got " + std::to_string(a.num_experts));
  const int64_t need = (a.num_slots + a.block_m - 1) / a.block_m + a.num_experts;
  if (a.max_tiles < need)
    fail("max_tiles must be >= ceil(num_slots / block_m) + num_experts = " + std::to_string(need) +
         ", got " + std::to_string(a.max_tiles));
  if (a.max_tiles > i32max) fail("max_tiles must fit in int32, got " + std::to_string(a.max_tiles));
  if (!a.counts || !a.offsets || !a.tile_expert || !a.tile_row_start)
    fail("counts, offsets, tile_expert and tile_row_start must be non-null pointers");
  if (a.num_slots > 0 && (!a.ids || !a.sorted_slots || !a.slot_rows))
    fail("ids, sorted_slots and slot_rows must be non-null pointers when num_slots > 0");
}

template <typename T>
static void routing_plan_cpu_typed(const RoutingArgs& a, const T* ids) {
  const int64_t n = a.num_slots, e_count = a.num_experts;

  // Pass 1: histogram, validating ids on the way (cheap here; on the GPU it would need a sync).
  std::vector<int64_t> cursor(static_cast<size_t>(e_count), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    if (e < 0 || e >= e_count)
      throw std::invalid_argument("routing_plan: ids must lie in [0, num_experts=" +
                                  std::to_string(e_count) + "), found " + std::to_string(e) +
                                  " at flat slot " + std::to_string(i));
    ++cursor[e];
  }

  // Exclusive scan; cursor becomes each expert's next free sorted row.
  int64_t run = 0;
  for (int64_t e = 0; e < e_count; ++e) {
    a.counts[e] = static_cast<int32_t>(cursor[e]);
    a.offsets[e] = static_cast<int32_t>(run);
    const int64_t c = cursor[e];
    cursor[e] = run;
    run += c;
  }
  a.offsets[e_count] = static_cast<int32_t>(run);

  // Pass 2: placement in slot order, which is what makes the sort stable.
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = cursor[static_cast<int64_t>(ids[i])]++;
    a.sorted_slots[row] = static_cast<int32_t>(i);
    a.slot_rows[i] = static_cast<int32_t>(row);
  }

  // Tile map: experts in order, block_m rows per tile; experts with no rows get no tile.
  int64_t t = 0;
  for (int64_t e = 0; e < e_count; ++e) {
    for (int64_t start = a.offsets[e]; start < a.offsets[e + 1]; start += a.block_m) {
      a.tile_expert[t] = static_cast<int32_t>(e);
      a.tile_row_start[t] = static_cast<int32_t>(start);
      ++t;
    }
  }
  for (; t < a.max_tiles; ++t) {  // unused tail, as in reference.build_routing
    a.tile_expert[t] = -1;
    a.tile_row_start[t] = static_cast<int32_t>(n);
  }
}

void routing_plan_cpu(const RoutingArgs& a) {
  check_routing_args(a);
  if (a.ids_is_int64)
    routing_plan_cpu_typed(a, static_cast<const int64_t*>(a.ids));
  else
    routing_plan_cpu_typed(a, static_cast<const int32_t*>(a.ids));
}

}  // namespace unimoe
