//! Per-sequence random generators that are libtorch's own. A sequence keeps a saved
//! state of its device's default generator and swaps it in around its draws, so a
//! sequence seeded with `s` draws exactly what `torch.manual_seed(s)` and the same calls
//! draw (as Hugging Face transformers samples), while each sequence keeps a stream of its
//! own (as vLLM seeds each request). tch binds no generator state, so it moves through
//! `shim/rng.cpp`, which follows PyTorch's `Generator.get_state` / `set_state`.
//!
//! libtorch's default generators are process-wide: every seeded draw happens under
//! [`lock`]. Unseeded runs take no lock, and their draws can land in a sequence's stream
//! if they run concurrently with its [`SeqRng::with`].
use std::ffi::{c_char, c_int, CStr};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::{Mutex, MutexGuard};

use tch::Device;

use crate::error::{Error, Result};

/// This thread holds the process-wide lock on libtorch's default generators.
pub struct RngLock {
    _guard: MutexGuard<'static, ()>,
}

/// Takes the lock on libtorch's default generators, released when the value drops. Not
/// reentrant: code that holds it passes `&RngLock` down (to [`SeqRng::with`]) instead of
/// locking again, so a step takes it once for all its rows.
pub fn lock() -> RngLock {
    static LOCK: Mutex<()> = Mutex::new(());
    RngLock {
        // A panic while holding it leaves nothing half-done that later draws depend on.
        _guard: LOCK.lock().unwrap_or_else(|p| p.into_inner()),
    }
}

/// One sequence's random generator: a saved state of libtorch's default generator for a
/// device (5056 bytes on the CPU: the Mersenne Twister's state and cached normal samples;
/// 16 on CUDA: the Philox seed and offset).
pub struct SeqRng {
    state: Vec<u8>,
    /// The generator's own state while `with` runs; kept to spare an allocation a call.
    saved: Vec<u8>,
    device: Device,
}

impl SeqRng {
    /// The state `torch.manual_seed(seed)` gives `device`'s default generator. The
    /// generator itself is not touched (the state comes from a seeded clone of it).
    pub fn seeded(seed: u64, device: Device) -> Result<Self> {
        let (kind, index) = c_device(device)?;
        let mut len = 0;
        // SAFETY: a null `out` only asks for the size.
        check(unsafe { gpt2kit_rng_seeded(kind, index, seed, ptr::null_mut(), 0, &mut len) })?;
        let mut state = vec![0; len];
        // SAFETY: `state` holds `len` writable bytes.
        check(unsafe { gpt2kit_rng_seeded(kind, index, seed, state.as_mut_ptr(), len, &mut len) })?;
        Ok(SeqRng {
            saved: vec![0; state.len()],
            state,
            device,
        })
    }

    /// Runs `f` with this state in the default generator of its device, then keeps the
    /// advanced state and puts the generator's previous state back, so draws outside any
    /// `SeqRng` see an uninterrupted stream. `lock` proves the caller holds [`lock`]; `f`
    /// must not take it again. If `f` panics, the generator is restored all the same.
    pub fn with<T>(&mut self, _lock: &RngLock, f: impl FnOnce() -> T) -> Result<T> {
        swap(self.device, &self.state, &mut self.saved)?;
        let out = panic::catch_unwind(AssertUnwindSafe(f));
        let back = swap(self.device, &self.saved, &mut self.state);
        let out = out.unwrap_or_else(|p| panic::resume_unwind(p));
        back.map(|()| out)
    }

    pub fn device(&self) -> Device {
        self.device
    }
}

impl fmt::Debug for SeqRng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeqRng")
            .field("device", &self.device)
            .field("state_bytes", &self.state.len())
            .finish()
    }
}

/// Puts `input` into the device's default generator and its previous state into `out`
/// (of the same size: a generator's state size is fixed), or neither on an error.
fn swap(device: Device, input: &[u8], out: &mut [u8]) -> Result<()> {
    let (kind, index) = c_device(device)?;
    let mut len = 0;
    // SAFETY: the pointers and lengths come from live slices; the shim copies `input`
    // before returning and writes at most `out.len()` bytes.
    check(unsafe {
        gpt2kit_rng_swap(
            kind,
            index,
            input.as_ptr(),
            input.len(),
            out.as_mut_ptr(),
            out.len(),
            &mut len,
        )
    })?;
    debug_assert_eq!(len, out.len());
    Ok(())
}

/// c10's `DeviceType` and index for a device.
fn c_device(device: Device) -> Result<(c_int, c_int)> {
    match device {
        Device::Cpu => Ok((0, -1)),
        // c10's device index is an i8.
        Device::Cuda(i) if i <= i8::MAX as usize => Ok((1, i as c_int)),
        other => Err(Error::Input(format!(
            "no per-sequence random generator for device {other:?} (CPU and CUDA only)"
        ))),
    }
}

/// The shim's result: null, or a message owned by the shim (copied here at once).
fn check(message: *const c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated string the shim keeps until this
    // thread's next call into it.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    Err(Error::Torch(tch::TchError::Torch(text)))
}

// shim/rng.cpp, compiled by build.rs.
extern "C" {
    fn gpt2kit_rng_seeded(
        device_type: c_int,
        device_index: c_int,
        seed: u64,
        out: *mut u8,
        cap: usize,
        len: *mut usize,
    ) -> *const c_char;
    fn gpt2kit_rng_swap(
        device_type: c_int,
        device_index: c_int,
        input: *const u8,
        in_len: usize,
        out: *mut u8,
        cap: usize,
        len: *mut usize,
    ) -> *const c_char;
}
