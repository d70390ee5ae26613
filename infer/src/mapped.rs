//! Weight files mapped into memory, owned by libtorch, and what happens when one shrinks
//! under a running model.
//!
//! A file is mapped with libtorch's own `at::from_file` (its `MapAllocator`: `mmap` with
//! `MAP_PRIVATE`, read and write, so an in-place op on a weight copies that page instead
//! of faulting, and the file is never written). The mapping is the storage of one uint8
//! tensor; every weight used in place is a view of it, so libtorch's reference count
//! keeps the mapping alive as long as any tensor over it, wherever the tensor goes, and
//! unmaps it after the last one.
//!
//! A file truncated while mapped makes every access past its new end raise SIGBUS. Each
//! mapping registers its address range with a process-wide SIGBUS handler (installed
//! once, chained to the previous one): a fault inside a registered range replaces the
//! rest of the range with zero pages (`mmap` with `MAP_FIXED`, a plain system call) and
//! flags the file, so the faulting read sees zeros and the run goes on; `check` then
//! reports the file as changed (the engine calls it after loading and after each
//! generation). Faults anywhere else go to the previous handler. A file rewritten in
//! place at the same size changes the bytes of the pages not yet copied or packed; `check`
//! sees its new modification time. A file replaced by rename (how every writer here saves)
//! leaves the old file mapped and whole.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Once;
use std::time::SystemTime;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::files::check_regular_file;

/// One mapped weight file.
pub struct MappedFile {
    path: PathBuf,
    /// The whole file as uint8, over libtorch's mapping; empty for an empty file.
    bytes: Tensor,
    len: usize,
    /// Kept open to see the file's size and modification time now (`check`).
    file: File,
    modified: Option<SystemTime>,
    /// The SIGBUS registry slot (None: no slot was free; a truncation then crashes, as
    /// any reader of a mapped file would).
    slot: Option<usize>,
}

// SAFETY: `bytes` is never mutated through this struct: it is read for its data pointer
// and sliced into new views, both reads of libtorch's tensor metadata, which libtorch
// allows from several threads at once.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `path` (a regular file) read-only for the file, copy-on-write for the process.
    pub fn open(path: &Path) -> Result<Self> {
        check_regular_file(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let len = meta.len() as usize;
        let bytes = if len == 0 {
            Tensor::empty([0], (Kind::Uint8, Device::Cpu))
        } else {
            // The open descriptor, not the path: the file mapped is the one checked above.
            let name = fd_path(&file, path)?;
            Tensor::f_from_file(&name, false, Some(len as i64), (Kind::Uint8, Device::Cpu))
                .map_err(|e| Error::ModelFolder {
                    path: path.into(),
                    reason: format!("cannot map the file: {e}"),
                })?
        };
        let slot = (len > 0)
            .then(|| register(bytes.data_ptr() as usize, len))
            .flatten();
        Ok(Self {
            path: path.into(),
            bytes,
            len,
            file,
            modified: meta.modified().ok(),
            slot,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The open file that is mapped (its metadata, reads beside the map).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `bytes` is a contiguous uint8 CPU tensor of `len` elements whose storage
        // (the mapping) lives as long as `self`. Pages that vanish under a truncation read
        // as zeros (the SIGBUS handler), never fault.
        unsafe { std::slice::from_raw_parts(self.bytes.data_ptr() as *const u8, self.len) }
    }

    /// Bytes [start, end) as a tensor of `kind` and `shape` over the mapping, or None when
    /// the range is not aligned to the element size (then the caller copies).
    pub fn view(&self, start: usize, end: usize, kind: Kind, shape: &[i64]) -> Option<Tensor> {
        let elem = kind.elt_size_in_bytes();
        if start % elem != 0 || (end - start) % elem != 0 || end > self.len {
            return None;
        }
        // inside the mapping: `end > self.len` is refused just above
        let t = self.bytes.narrow(0, start as i64, (end - start) as i64);
        t.f_view_dtype(kind).ok()?.f_view(shape).ok()
    }

    /// Gives back the pages wholly inside bytes [start, end) (`MADV_DONTNEED`): after a
    /// tensor is packed its source pages stop counting in the process's memory; a later
    /// read faults them in again from the file. Only whole pages are dropped, so no
    /// neighbouring tensor loses a page written in place.
    pub fn release(&self, start: usize, end: usize) {
        let page = page_size();
        let base = self.bytes.data_ptr() as usize;
        let (a, b) = (
            (base + start).next_multiple_of(page),
            (base + end) / page * page,
        );
        if self.len == 0 || b <= a {
            return;
        }
        // SAFETY: [a, b) lies inside this mapping (start <= end <= len), page aligned. On
        // a private file mapping DONTNEED drops the process's pages; the next read maps
        // the file's page again. Failure only leaves the pages resident.
        unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
    }

    /// An error when the file shrank, changed, or raised SIGBUS since it was mapped.
    pub fn check(&self) -> Result<()> {
        let changed = |reason: String| Error::ModelFolder {
            path: self.path.clone(),
            reason: format!(
                "{reason} while the model was mapped from it; its results are not the \
                 model's (save models under a new name, or load with --no-mmap)"
            ),
        };
        if self.slot.is_some_and(|s| FAULTED[s].load(SeqCst)) {
            return Err(changed("the file was truncated".into()));
        }
        let meta = self.file.metadata().map_err(|e| Error::io(&self.path, e))?;
        if meta.len() as usize != self.len {
            return Err(changed(format!(
                "the file changed size ({} bytes, then {})",
                self.len,
                meta.len()
            )));
        }
        if meta.modified().ok() != self.modified {
            return Err(changed("the file was rewritten".into()));
        }
        Ok(())
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            unregister(s);
        }
    }
}

/// A name libtorch can open that is the already open `file`.
fn fd_path(file: &File, path: &Path) -> Result<String> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let _ = path;
        Ok(format!("/proc/self/fd/{}", file.as_raw_fd()))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        path.to_str()
            .map(str::to_string)
            .ok_or_else(|| Error::ModelFolder {
                path: path.into(),
                reason: "the path is not UTF-8".into(),
            })
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Mapped ranges the SIGBUS handler answers for: [START, END) per slot, 0 when free.
const SLOTS: usize = 256;
static START: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static END: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static FAULTED: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The handler that was installed before ours (a `libc::sigaction`, leaked).
static PREVIOUS: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();

fn register(start: usize, len: usize) -> Option<usize> {
    INSTALL.call_once(install);
    for s in 0..SLOTS {
        if START[s].compare_exchange(0, start, SeqCst, SeqCst).is_ok() {
            FAULTED[s].store(false, SeqCst);
            END[s].store(start + len, SeqCst);
            return Some(s);
        }
    }
    None
}

fn unregister(s: usize) {
    END[s].store(0, SeqCst);
    START[s].store(0, SeqCst);
}

fn install() {
    PAGE.store(page_size(), SeqCst);
    // SAFETY: plain sigaction calls with zero-initialised structs; the previous action is
    // leaked so the handler can read it for the rest of the process.
    unsafe {
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = on_sigbus as *const () as usize;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut new.sa_mask);
        let old: &'static mut libc::sigaction = Box::leak(Box::new(std::mem::zeroed()));
        if libc::sigaction(libc::SIGBUS, &new, old) == 0 {
            PREVIOUS.store(old as *mut libc::sigaction as usize, SeqCst);
        }
    }
}

/// SIGBUS: zero pages over the rest of a registered range, else the previous handler.
/// Only atomics, `mmap` and `sigaction` (system calls) run here.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    // A fault the kernel raised (si_code > 0: BUS_ADRERR, ...), not a SIGBUS sent by
    // `kill` (SI_USER and other codes ≤ 0, whose si_addr is not an address).
    let fault = code > 0;
    for s in (0..SLOTS).filter(|_| fault) {
        let (a, b) = (START[s].load(SeqCst), END[s].load(SeqCst));
        if a <= addr && addr < b {
            let page = addr / PAGE.load(SeqCst) * PAGE.load(SeqCst);
            // SAFETY: [page, b) lies inside a mapping this process made and still holds
            // (a slot is freed before its mapping is dropped); replacing it with private
            // zero pages is what the fault asks for: the file's pages are gone.
            let p = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    b - page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                FAULTED[s].store(true, SeqCst);
                return;
            }
        }
    }
    let prev = PREVIOUS.load(SeqCst) as *const libc::sigaction;
    // SAFETY: `prev` is null or the leaked previous action. For a fault, a default or
    // ignoring action is put back, and returning re-runs the faulting access under it; a
    // handler is called as the kernel would have called it. A signal sent by `kill` is not
    // re-run by returning: when the previous action (or what a previous handler put
    // back, as Rust's own SIGBUS handler puts back the default) is the default, it is
    // raised again under it, ending the process as it would have without this handler.
    unsafe {
        let default = |a: *const libc::sigaction| {
            a.is_null() || matches!((*a).sa_sigaction, libc::SIG_DFL | libc::SIG_IGN)
        };
        if default(prev) {
            if !fault && !prev.is_null() && (*prev).sa_sigaction == libc::SIG_IGN {
                return;
            }
            libc::signal(sig, libc::SIG_DFL);
        } else if (*prev).sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute((*prev).sa_sigaction);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute((*prev).sa_sigaction);
            f(sig);
        }
        if !fault {
            let mut now: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut now) == 0
                && now.sa_sigaction == libc::SIG_DFL
            {
                libc::raise(sig);
            }
        }
    }
}

/// Gives back the pages of `t`'s bytes when they lie in one of `maps` (a view of a mapped
/// file, packed and no longer read by the kernels); owned tensors are left alone.
pub fn release_tensor(maps: &[std::sync::Arc<MappedFile>], t: &Tensor) {
    if !t.defined() || t.device() != Device::Cpu || t.numel() == 0 {
        return;
    }
    let bytes = t.numel() * t.kind().elt_size_in_bytes();
    let at = t.data_ptr() as usize;
    for m in maps {
        let base = m.bytes.data_ptr() as usize;
        if m.len > 0 && base <= at && at + bytes <= base + m.len {
            m.release(at - base, at - base + bytes);
        }
    }
}
