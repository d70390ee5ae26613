// CUDA graphs through libtorch's `at::cuda::CUDAGraph`, for infer/src/cuda_graph.rs (tch
// binds no graphs). Built as a shared object of its own and loaded only after
// libtorch_cuda.so is (which it calls into), so that CPU runs never load CUDA. Capture
// follows `torch.cuda.graph`: the device synchronised, then the work recorded on a side
// stream from libtorch's pool (the caching allocator serves the graph from its private
// pool), the previous stream current again after. No C++ exception crosses into Rust:
// every entry point returns NULL on success, else a message that stays valid until the
// calling thread's next call here.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <exception>
#include <optional>
#include <string>

namespace {

thread_local std::string last_error;

const char* fail(const std::exception& e) {
  last_error = e.what();
  return last_error.c_str();
}

struct Graph {
  at::cuda::CUDAGraph graph;
  c10::DeviceIndex device;
  std::optional<c10::cuda::CUDAStreamGuard> capturing;
};

}  // namespace

extern "C" {

const char* gpt2kit_graph_new(int device, void** out) {
  try {
    auto* g = new Graph{at::cuda::CUDAGraph(), static_cast<c10::DeviceIndex>(device), {}};
    *out = g;
    return nullptr;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

// Starts recording: what the calling thread launches on the device from now on is
// captured, not run.
const char* gpt2kit_graph_begin(void* graph) {
  auto* g = static_cast<Graph*>(graph);
  try {
    c10::cuda::CUDAGuard on(g->device);
    c10::cuda::device_synchronize();
    g->capturing.emplace(c10::cuda::getStreamFromPool(false, g->device));
    g->graph.capture_begin();
    return nullptr;
  } catch (const std::exception& e) {
    g->capturing.reset();
    return fail(e);
  }
}

// Ends recording and instantiates the graph; the stream current before `begin` is
// current again, whatever happened.
const char* gpt2kit_graph_end(void* graph) {
  auto* g = static_cast<Graph*>(graph);
  try {
    g->graph.capture_end();
    g->capturing.reset();
    c10::cuda::device_synchronize();
    return nullptr;
  } catch (const std::exception& e) {
    g->capturing.reset();
    return fail(e);
  }
}

// Launches the recorded work on the current stream.
const char* gpt2kit_graph_replay(void* graph) {
  auto* g = static_cast<Graph*>(graph);
  try {
    c10::cuda::CUDAGuard on(g->device);
    g->graph.replay();
    return nullptr;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

void gpt2kit_graph_free(void* graph) {
  try {
    delete static_cast<Graph*>(graph);
  } catch (...) {
  }
}

}  // extern "C"
