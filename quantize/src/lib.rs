//! Post-training int8 quantization, magnitude pruning and layer dropping: pure
//! transforms over named tensors that produce a format the `infer` engine defines.
//!
//! Not built yet: the crate exists so that the dependency direction
//! `gpt2kit → quantize → infer` is fixed from the start.
