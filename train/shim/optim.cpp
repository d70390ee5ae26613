// libtorch's multi-tensor AdamW (`_fused_adamw_`, what `torch.optim.AdamW(fused=True)`
// calls), its TF32 switches and bf16 autocast for a device type, for train/src/fused.rs;
// tch binds none of them (its `autocast` is CUDA's, in f16). No C++
// exception crosses into Rust: every entry point returns NULL on success, else a
// message that stays valid until the calling thread's next call here.
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstddef>
#include <exception>
#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

const char* fail(const char* what) {
  last_error = what;
  return last_error.c_str();
}

std::vector<at::Tensor> list(at::Tensor* const* tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*tensors[i]);
  return out;
}

}  // namespace

extern "C" {

// One AdamW update of `n` parameters, as PyTorch's fused path makes it: decoupled
// weight decay, `step` (a float tensor on the parameters' device holding the update's
// number, counted from 1, read by every parameter) for the bias corrections.
const char* gpt2kit_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                                at::Tensor* const* exp_avgs,
                                at::Tensor* const* exp_avg_sqs, size_t n,
                                const at::Tensor* step, double lr, double beta1,
                                double beta2, double weight_decay, double eps) {
  try {
    auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n),
         v = list(exp_avg_sqs, n);
    std::vector<at::Tensor> steps(n, *step);
    at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return nullptr;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// TF32 for float32 matrix products and convolutions on CUDA (cuBLAS and cuDNN), as
// `torch.backends.cuda.matmul.allow_tf32` and `torch.backends.cudnn.allow_tf32` set it.
const char* gpt2kit_set_tf32(int on) {
  try {
    at::globalContext().setAllowTF32CuBLAS(on != 0);
    at::globalContext().setAllowTF32CuDNN(on != 0);
    return nullptr;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// Enters an autocast region for `device_type` (c10::DeviceType) in bf16, as
// `torch.autocast(device_type, dtype=torch.bfloat16)` does; `was_enabled` and
// `was_dtype` receive what `gpt2kit_autocast_exit` restores.
const char* gpt2kit_autocast_enter(int device_type, int* was_enabled, int* was_dtype) {
  try {
    auto d = static_cast<c10::DeviceType>(device_type);
    *was_enabled = at::autocast::is_autocast_enabled(d) ? 1 : 0;
    *was_dtype = static_cast<int>(at::autocast::get_autocast_dtype(d));
    at::autocast::set_autocast_enabled(d, true);
    at::autocast::set_autocast_dtype(d, at::kBFloat16);
    at::autocast::increment_nesting();
    return nullptr;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// Leaves it: the weights' casts cached in it are dropped when the outermost region
// ends, and the previous state comes back.
const char* gpt2kit_autocast_exit(int device_type, int was_enabled, int was_dtype) {
  try {
    auto d = static_cast<c10::DeviceType>(device_type);
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(d, was_enabled != 0);
    at::autocast::set_autocast_dtype(d, static_cast<at::ScalarType>(was_dtype));
    return nullptr;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// Whether cuBLAS may use TF32 for float32 products: 1 or 0, -1 on error.
int gpt2kit_tf32() {
  try {
    return at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
