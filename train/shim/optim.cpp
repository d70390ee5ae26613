// libtorch's multi-tensor AdamW (`_fused_adamw_`, what `torch.optim.AdamW(fused=True)`
// calls) and its TF32 switches, for train/src/fused.rs; tch binds neither. No C++
// exception crosses into Rust: every entry point returns NULL on success, else a
// message that stays valid until the calling thread's next call here.
#include <ATen/Context.h>
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

// Whether cuBLAS may use TF32 for float32 products: 1 or 0, -1 on error.
int gpt2kit_tf32() {
  try {
    return at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
