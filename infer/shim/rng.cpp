// Reads and writes the state of libtorch's default random generator for a device, for
// infer/src/rng.rs. tch binds only `manual_seed`; this follows PyTorch's own
// `Generator.get_state` / `set_state` bindings (torch/csrc/Generator.cpp): the same
// calls, under the generator's mutex. No C++ exception crosses into Rust: every entry
// point returns NULL on success, else a message that stays valid until the calling
// thread's next call here.
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>

namespace {

thread_local std::string last_error;

const char* fail(const char* what) {
  last_error = what;
  return last_error.c_str();
}

at::Generator default_generator(int device_type, int device_index) {
  return at::globalContext().defaultGenerator(
      c10::Device(static_cast<c10::DeviceType>(device_type),
                  static_cast<c10::DeviceIndex>(device_index)));
}

// Copies a state tensor (uint8, on the CPU) to `out` when it fits in `cap` bytes; its
// size goes to `len` either way, so a NULL `out` asks for the size.
const char* copy_out(const at::Tensor& state, uint8_t* out, size_t cap, size_t* len) {
  auto n = static_cast<size_t>(state.numel());
  *len = n;
  if (out == nullptr) return nullptr;
  if (n > cap) return fail("generator state larger than its buffer");
  std::memcpy(out, state.data_ptr<uint8_t>(), n);
  return nullptr;
}

at::Tensor borrow(const uint8_t* bytes, size_t len) {
  // set_state copies out of the tensor; nothing keeps it past the call.
  return at::from_blob(const_cast<uint8_t*>(bytes), {static_cast<int64_t>(len)},
                       at::TensorOptions().dtype(at::kByte));
}

}  // namespace

extern "C" {

// The state `manual_seed(seed)` gives the device's default generator, taken from a
// seeded clone so that the generator itself is not touched.
const char* gpt2kit_rng_seeded(int device_type, int device_index, uint64_t seed,
                               uint8_t* out, size_t cap, size_t* len) {
  try {
    auto gen = default_generator(device_type, device_index);
    auto copy = [&] {
      std::lock_guard<std::mutex> lock(gen.mutex());
      return gen.clone();
    }();
    copy.set_current_seed(seed);
    return copy_out(copy.get_state(), out, cap, len);
  } catch (const std::exception& e) {
    return fail(e.what());
  } catch (...) {
    return fail("unknown C++ exception");
  }
}

// Puts `in` into the device's default generator and its previous state into `out`, as
// one step under the generator's mutex. On an error neither changes.
const char* gpt2kit_rng_swap(int device_type, int device_index, const uint8_t* in,
                             size_t in_len, uint8_t* out, size_t cap, size_t* len) {
  try {
    auto gen = default_generator(device_type, device_index);
    std::lock_guard<std::mutex> lock(gen.mutex());
    auto previous = gen.get_state();
    if (out == nullptr || static_cast<size_t>(previous.numel()) > cap)
      return fail("generator state larger than its buffer");
    gen.set_state(borrow(in, in_len));
    return copy_out(previous, out, cap, len);
  } catch (const std::exception& e) {
    return fail(e.what());
  } catch (...) {
    return fail("unknown C++ exception");
  }
}

}  // extern "C"
