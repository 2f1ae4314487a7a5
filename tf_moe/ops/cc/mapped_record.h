// Per-device records in mapped host memory: an error that a kernel finds is
// written there (plain stores through the device pointer, the flag last),
// and a later call reads it on the host without synchronizing the stream.
// Used by the deferred bounds checks of the CUDA dispatch/combine kernels
// (dispatch_kernels.cu.cc) and of the grouped GEMM (cc_dropless). CUDA only.

#ifndef TF_MOE_OPS_CC_MAPPED_RECORD_H_
#define TF_MOE_OPS_CC_MAPPED_RECORD_H_

#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace tf_moe {

// The current device's Record (zeroed when first made, kept for the
// process): *host for the host, *device for kernels.
template <typename Record>
xla::ffi::Error MappedRecordFor(Record** host, Record** device) {
  int ordinal = 0;
  if (cudaGetDevice(&ordinal) != cudaSuccess) {
    return xla::ffi::Error::Internal("tf_moe: cudaGetDevice failed");
  }
  static std::mutex mutex;
  static std::unordered_map<int, std::pair<Record*, Record*>> records;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = records.find(ordinal);
  if (it == records.end()) {
    Record* h = nullptr;
    Record* d = nullptr;
    if (cudaHostAlloc(&h, sizeof(Record), cudaHostAllocMapped) != cudaSuccess ||
        cudaHostGetDevicePointer(&d, h, 0) != cudaSuccess) {
      return xla::ffi::Error::Internal(
          "tf_moe: allocating an error record in mapped host memory failed");
    }
    std::memset(static_cast<void*>(h), 0, sizeof(Record));
    it = records.emplace(ordinal, std::make_pair(h, d)).first;
  }
  *host = it->second.first;
  *device = it->second.second;
  return xla::ffi::Error::Success();
}

}  // namespace tf_moe

#endif  // TF_MOE_OPS_CC_MAPPED_RECORD_H_
