// c10d's rendezvous store and Gloo process group behind a C interface for Rust.
// Every entry point catches C++ exceptions and returns their message (malloc'd, freed
// by gk_free_error); none throws across the boundary.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  std::chrono::milliseconds timeout;
};

char* copy_message(const char* what) {
  size_t n = std::strlen(what);
  char* s = static_cast<char*>(std::malloc(n + 1));
  if (s != nullptr) std::memcpy(s, what, n + 1);
  return s;
}

// Runs f, returning 0, or 1 with *err set to the exception's message.
template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    *err = copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = copy_message(e.what());
  } catch (...) {
    *err = copy_message("unknown C++ exception");
  }
  return 1;
}

// Refuses a rank whose launch disagrees with rank 0's on the size of the job, or that
// shares its rank with another process (two nodes given one --node-rank): without the
// check both would wait out the timeout for ranks that never come.
void check_world(c10d::Store& store, int rank, int world) {
  const std::string key = "gpt2kit/world";
  if (rank == 0) {
    std::string w = std::to_string(world);
    store.set(key, std::vector<uint8_t>(w.begin(), w.end()));
  } else {
    std::vector<uint8_t> got = store.get(key);
    std::string theirs(got.begin(), got.end());
    if (theirs != std::to_string(world)) {
      throw std::runtime_error("this rank's WORLD_SIZE is " + std::to_string(world) +
                               " but rank 0's is " + theirs +
                               ": every node needs the same --nnodes and --nproc-per-node");
    }
  }
  if (store.add("gpt2kit/rank/" + std::to_string(rank), 1) > 1) {
    throw std::runtime_error("another process has joined as rank " + std::to_string(rank) +
                             ": every node needs its own --node-rank");
  }
}

void wait(Group* g, c10::intrusive_ptr<c10d::Work> work) {
  if (!work->wait(g->timeout)) {
    throw std::runtime_error("the collective did not complete within the timeout");
  }
}

}  // namespace

extern "C" {

// Joins the group: rank 0 serves the store at host:port. `local_addr` is the address
// this process's Gloo device binds to, or `interface` (GLOO_SOCKET_IFNAME) when not null.
// `run_id`, when not null, is the prefix of the group's keys in the store: a rank of
// another job that reaches this store (the same port) sets and waits for keys of its own.
void* gk_group_new(const char* host, int port, int rank, int world, long timeout_ms,
                   const char* local_addr, const char* interface, const char* run_id,
                   char** err) {
  Group* out = nullptr;
  guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = static_cast<std::size_t>(world);
    so.waitWorkers = true;
    so.timeout = timeout;
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    if (run_id != nullptr) {
      store = c10::make_intrusive<c10d::PrefixStore>(std::string(run_id), store);
    }
    check_world(*store, rank, world);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    opts->threads = 1;
    if (interface != nullptr) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(interface));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(local_addr));
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    out = new Group{store, pg, timeout};
  });
  return out;
}

void gk_group_free(void* group) { delete static_cast<Group*>(group); }

void gk_free_error(char* err) { std::free(err); }

// Sums `tensor` over the group, in place.
int gk_all_reduce_sum(void* group, at::Tensor* tensor, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*tensor};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    wait(g, g->pg->allreduce(ts, o));
  });
}

// Copies `root`'s `tensor` into every rank's, in place.
int gk_broadcast(void* group, at::Tensor* tensor, int root, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*tensor};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    wait(g, g->pg->broadcast(ts, o));
  });
}

// Every rank's `input` (same shape on every rank), stacked in rank order into `output`
// (world, ...input's shape).
int gk_all_gather(void* group, at::Tensor* input, at::Tensor* output, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> in{*input};
    std::vector<at::Tensor> parts;
    for (int64_t r = 0; r < output->size(0); ++r) parts.push_back(output->select(0, r));
    std::vector<std::vector<at::Tensor>> out{parts};
    wait(g, g->pg->allgather(out, in, c10d::AllgatherOptions()));
  });
}

int gk_barrier(void* group, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(group);
    wait(g, g->pg->barrier(c10d::BarrierOptions()));
  });
}

}  // extern "C"
