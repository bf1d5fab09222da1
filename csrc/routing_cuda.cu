// CUDA routing plan: the same stable counting sort as routing_cpu.cpp, as five launches on one
// stream with no host synchronisation and no allocation (the caller passes a workspace).
//
// The flat slots are cut into chunks of kChunk slots, one warp per chunk:
//   1. chunk_histogram  cnt[c][b] = slots of chunk c in bucket b                O(N)
//   2. column_scan      cnt[c][b] <- exclusive prefix over chunks c; counts[b]  O(N/kChunk * E)
//   3. scan_offsets     offsets and tile_offsets, exclusive scans over E        O(E), one block
//   4. place            row = offsets[b] + cnt[c][b] + rank within the warp step  O(N)
//   5. tile_map         binary search of tile_offsets per tile                  O(max_tiles log E)
// Bucket b is the expert id, or E for an id outside [0, E) (see routing.h). Every step is plain
// sequential or per-warp-ordered integer arithmetic, so the plan is deterministic and stable: a
// slot's row counts exactly the earlier slots of its expert (earlier chunks via the column scan,
// earlier warp steps via the running cursor, earlier lanes via the match mask).
// __match_any_sync needs sm_70 or newer.
#include <cuda_runtime.h>
#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "routing.h"

namespace unimoe {
namespace {

constexpr int kWarp = 32;
// Slots per warp-chunk: 16 warp steps per chunk; workspace is about N / kChunk * (E+1) * 4 bytes
// (1.3 MB for N = 327680, E = 512), small next to the activations it routes.
constexpr int64_t kChunk = 512;
constexpr int kWarpsPerBlock = 4;   // 128-thread blocks: enough warps per SM to hide latency
constexpr int kThreads = 256;       // column_scan / tile_map / scan_offsets block size

__device__ __forceinline__ int bucket_of(int64_t id, int64_t num_experts) {
  return (id >= 0 && id < num_experts) ? static_cast<int>(id) : static_cast<int>(num_experts);
}

template <typename T>
__global__ void chunk_histogram(const T* __restrict__ ids, int64_t n, int64_t num_experts,
                                int64_t num_chunks, int32_t* __restrict__ cnt) {
  const int lane = threadIdx.x % kWarp;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (chunk >= num_chunks) return;  // uniform per warp, so the full-mask syncs below stay valid
  int32_t* row = cnt + chunk * (num_experts + 1);
  for (int64_t s = 0; s < kChunk; s += kWarp) {
    const int64_t i = chunk * kChunk + s + lane;
    const int b = i < n ? bucket_of(static_cast<int64_t>(ids[i]), num_experts) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, b);
    if (b >= 0 && lane == __ffs(peers) - 1) row[b] += __popc(peers);
    __syncwarp();  // next step's leader may be another lane: order its read after this write
  }
}

__global__ void column_scan(int32_t* __restrict__ cnt, int64_t num_chunks, int64_t num_experts,
                            int32_t* __restrict__ counts) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b > num_experts) return;
  int32_t run = 0;
  // Threads of a warp read neighbouring buckets of the same chunk row: coalesced.
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t idx = c * (num_experts + 1) + b;
    const int32_t v = cnt[idx];
    cnt[idx] = run;
    run += v;
  }
  if (b < num_experts) counts[b] = run;
}

__global__ void scan_offsets(const int32_t* __restrict__ counts, int64_t num_experts,
                             int64_t block_m, int32_t* __restrict__ offsets,
                             int32_t* __restrict__ tile_offsets) {
  using Scan = cub::BlockScan<int32_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  // Each thread owns a contiguous run of experts, so E > kThreads is handled without a loop
  // over blocks; sums fit int32 because N and max_tiles were checked to.
  const int64_t per = (num_experts + kThreads - 1) / kThreads;
  const int64_t lo = threadIdx.x * per;
  const int64_t hi = lo + per < num_experts ? lo + per : num_experts;
  int32_t rows = 0, tiles = 0;
  for (int64_t e = lo; e < hi; ++e) {
    rows += counts[e];
    tiles += static_cast<int32_t>((counts[e] + block_m - 1) / block_m);
  }
  int32_t rows_total, tiles_total;
  Scan(tmp).ExclusiveSum(rows, rows, rows_total);
  __syncthreads();  // TempStorage is reused by the second scan
  Scan(tmp).ExclusiveSum(tiles, tiles, tiles_total);
  for (int64_t e = lo; e < hi; ++e) {
    offsets[e] = rows;
    tile_offsets[e] = tiles;
    rows += counts[e];
    tiles += static_cast<int32_t>((counts[e] + block_m - 1) / block_m);
  }
  if (threadIdx.x == 0) {
    offsets[num_experts] = rows_total;
    tile_offsets[num_experts] = tiles_total;
  }
}

template <typename T>
__global__ void place(const T* __restrict__ ids, int64_t n, int64_t num_experts,
                      int64_t num_chunks, int32_t* __restrict__ cursor,
                      const int32_t* __restrict__ offsets, int32_t* __restrict__ sorted_slots,
                      int32_t* __restrict__ slot_rows) {
  const int lane = threadIdx.x % kWarp;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (chunk >= num_chunks) return;  // uniform per warp
  int32_t* row = cursor + chunk * (num_experts + 1);
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t s = 0; s < kChunk; s += kWarp) {
    const int64_t i = chunk * kChunk + s + lane;
    const int b = i < n ? bucket_of(static_cast<int64_t>(ids[i]), num_experts) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, b);
    const int leader = __ffs(peers) - 1;
    int32_t base = 0;
    if (b >= 0 && lane == leader) {
      base = row[b];
      row[b] = base + __popc(peers);
    }
    base = __shfl_sync(0xffffffffu, base, leader);
    if (b >= 0) {
      const int32_t r = offsets[b] + base + __popc(peers & lanes_below);
      sorted_slots[r] = static_cast<int32_t>(i);
      slot_rows[i] = r;
    }
    __syncwarp();  // as in chunk_histogram
  }
}

__global__ void tile_map(const int32_t* __restrict__ offsets,
                         const int32_t* __restrict__ tile_offsets, int64_t num_experts, int64_t n,
                         int64_t block_m, int64_t max_tiles, int32_t* __restrict__ tile_expert,
                         int32_t* __restrict__ tile_row_start) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= max_tiles) return;
  if (t >= tile_offsets[num_experts]) {  // unused tail
    tile_expert[t] = -1;
    tile_row_start[t] = static_cast<int32_t>(n);
    return;
  }
  // Largest e with tile_offsets[e] <= t < tile_offsets[e+1]; experts without tiles are skipped
  // because their range is empty.
  int64_t lo = 0, hi = num_experts - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (tile_offsets[mid + 1] <= t) lo = mid + 1; else hi = mid;
  }
  tile_expert[t] = static_cast<int32_t>(lo);
  tile_row_start[t] = static_cast<int32_t>(offsets[lo] + (t - tile_offsets[lo]) * block_m);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("routing_plan_cuda: ") + what + " failed: " +
                             cudaGetErrorString(err));
}

// Launches report configuration errors only through cudaGetLastError (no sync involved).
void check_launch(const char* what) { check(cudaGetLastError(), what); }

int64_t num_chunks_of(int64_t n) { return (n + kChunk - 1) / kChunk; }

template <typename T>
void run(const RoutingArgs& a, int32_t* cnt, int32_t* tile_offsets, cudaStream_t stream) {
  const int64_t n = a.num_slots, e = a.num_experts, chunks = num_chunks_of(n);
  const T* ids = static_cast<const T*>(a.ids);
  const auto chunk_blocks = static_cast<unsigned>((chunks + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const int chunk_threads = kWarpsPerBlock * kWarp;
  if (chunks > 0) {
    const size_t bytes = static_cast<size_t>(chunks * (e + 1)) * sizeof(int32_t);
    check(cudaMemsetAsync(cnt, 0, bytes, stream), "cudaMemsetAsync");
    chunk_histogram<T><<<chunk_blocks, chunk_threads, 0, stream>>>(ids, n, e, chunks, cnt);
    check_launch("chunk_histogram");
  }
  column_scan<<<static_cast<unsigned>((e + 1 + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      cnt, chunks, e, a.counts);
  check_launch("column_scan");
  scan_offsets<<<1, kThreads, 0, stream>>>(a.counts, e, a.block_m, a.offsets, tile_offsets);
  check_launch("scan_offsets");
  if (chunks > 0) {
    place<T><<<chunk_blocks, chunk_threads, 0, stream>>>(ids, n, e, chunks, cnt, a.offsets,
                                                         a.sorted_slots, a.slot_rows);
    check_launch("place");
  }
  tile_map<<<static_cast<unsigned>((a.max_tiles + kThreads - 1) / kThreads), kThreads, 0,
             stream>>>(a.offsets, tile_offsets, e, n, a.block_m, a.max_tiles, a.tile_expert,
                       a.tile_row_start);
  check_launch("tile_map");
}

}  // namespace

int64_t routing_workspace_bytes_cuda(int64_t num_slots, int64_t num_experts) {
  if (num_slots < 0 || num_experts < 1)
    throw std::invalid_argument("routing_workspace_bytes: need num_slots >= 0, num_experts >= 1");
  // [chunks, E+1] cursors, then tile_offsets [E+1]; int64 because chunks * E can pass 2^31.
  return (num_chunks_of(num_slots) + 1) * (num_experts + 1) * static_cast<int64_t>(sizeof(int32_t));
}

void routing_plan_cuda(const RoutingArgs& a, void* workspace, int64_t workspace_bytes,
                       std::uintptr_t stream) {
  check_routing_args(a);
  const int64_t need = routing_workspace_bytes_cuda(a.num_slots, a.num_experts);
  if (workspace == nullptr || workspace_bytes < need)
    throw std::invalid_argument("routing_plan_cuda: workspace must hold >= " +
                                std::to_string(need) + " bytes, got " +
                                std::to_string(workspace_bytes));
  int32_t* cnt = static_cast<int32_t*>(workspace);
  int32_t* tile_offsets = cnt + num_chunks_of(a.num_slots) * (a.num_experts + 1);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (a.ids_is_int64) run<int64_t>(a, cnt, tile_offsets, s);
  else run<int32_t>(a, cnt, tile_offsets, s);
}

}  // namespace unimoe
