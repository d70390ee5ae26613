//! PyTorch's own distributed engine (c10d) for gpt2kit: a process reads the variables
//! torchrun (or `gpt2kit launch`) sets, joins a Gloo process group through c10d's
//! `TCPStore` rendezvous, and sums or broadcasts tensors with the other ranks. The C++
//! side is `shim/c10d.cpp`; gloo and c10d themselves live in `libtorch_cpu.so`.
use std::ffi::{c_char, c_void, CStr, CString};
use std::net::{IpAddr, ToSocketAddrs, UdpSocket};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

pub mod tp;

mod ffi {
    use super::*;
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn gk_group_new(
            host: *const c_char,
            port: i32,
            rank: i32,
            world: i32,
            timeout_ms: i64,
            local_addr: *const c_char,
            interface: *const c_char,
            run_id: *const c_char,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn gk_group_free(group: *mut c_void);
        pub fn gk_free_error(err: *mut c_char);
        pub fn gk_all_reduce_sum(
            group: *mut c_void,
            tensor: *mut c_void,
            err: *mut *mut c_char,
        ) -> i32;
        pub fn gk_broadcast(
            group: *mut c_void,
            tensor: *mut c_void,
            root: i32,
            err: *mut *mut c_char,
        ) -> i32;
        pub fn gk_barrier(group: *mut c_void, err: *mut *mut c_char) -> i32;
        pub fn gk_all_gather(
            group: *mut c_void,
            input: *mut c_void,
            output: *mut c_void,
            err: *mut *mut c_char,
        ) -> i32;
    }
}

/// The variable naming a launched job's run: its group's keys in the rendezvous store
/// are kept apart from those of any other job that reaches the same store. `gpt2kit
/// launch` sets it for a one-node job; a job spread over several nodes (whose launchers
/// cannot agree on one) takes it from the environment, the same on every node, or goes
/// without, as torchrun's ranks do.
pub const RUN_ID_VAR: &str = "GPT2KIT_RUN_ID";

/// The process's place in a launched job: the variables torchrun sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Launch {
    /// The job this process belongs to, from `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR` and `MASTER_PORT`; None when `WORLD_SIZE` is not set (a plain run).
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |name: &str, text: &str| -> Result<usize> {
            text.trim()
                .parse::<usize>()
                .map_err(|_| anyhow!("environment variable {name}={text:?} is not a number"))
        };
        let world_size = number("WORLD_SIZE", &world)?;
        if world_size == 0 {
            bail!("environment variable WORLD_SIZE=0: a job has at least one process");
        }
        let required = |name: &str| {
            var(name).ok_or_else(|| {
                anyhow!("WORLD_SIZE is set but {name} is not: start the processes with `gpt2kit launch` or torchrun")
            })
        };
        let rank = number("RANK", &required("RANK")?)?;
        if rank >= world_size {
            bail!("environment variable RANK={rank} is not below WORLD_SIZE={world_size}");
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", &v)?,
            None => rank,
        };
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = var("MASTER_PORT").unwrap_or_else(|| "29500".into());
        let master_port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| {
                anyhow!("environment variable MASTER_PORT={port:?} is not a port number")
            })?;
        Ok(Some(Launch {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        }))
    }
}

impl Launch {
    /// The device this rank runs on: `cuda` (no index given) is the GPU of its
    /// LOCAL_RANK, as torchrun scripts pick it; any other `--device` as parsed.
    pub fn device(&self, flag: &str, parsed: Device) -> Device {
        match (flag, parsed) {
            ("cuda", Device::Cuda(_)) => Device::Cuda(self.local_rank),
            (_, d) => d,
        }
    }
}

/// c10d's backends. NCCL lives in libtorch's CUDA library, which this build does not
/// bind yet; Gloo runs on CPU tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// A joined process group. Collectives are called from one thread at a time.
pub struct Group {
    raw: NonNull<c_void>,
    rank: usize,
    world_size: usize,
}

// SAFETY: c10d's process groups are thread-safe (each collective is queued to the
// group's worker threads in the order it was issued); Python shares them across threads.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {})", self.rank, self.world_size)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: `raw` came from gk_group_new and is freed once.
        unsafe { ffi::gk_group_free(self.raw.as_ptr()) }
    }
}

/// Takes the shim's error message, if any.
fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error".into();
    }
    // SAFETY: a NUL-terminated string the shim malloc'd; freed once, here.
    let text = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::gk_free_error(err) };
    text
}

/// The local address that reaches `host`: what the Gloo device binds to, so that ranks
/// on other hosts can connect back to it (a name that resolves to loopback would not).
fn local_address_towards(host: &str, port: u16) -> Result<IpAddr> {
    let target = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("MASTER_ADDR {host}: cannot resolve it"))?
        .next()
        .ok_or_else(|| anyhow!("MASTER_ADDR {host}: resolves to no address"))?;
    if target.ip().is_loopback() {
        return Ok(target.ip());
    }
    let any = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(any).context("opening a socket to find the local address")?;
    socket
        .connect(target)
        .with_context(|| format!("MASTER_ADDR {host}: no route to it"))?;
    Ok(socket.local_addr()?.ip())
}

impl Group {
    /// Joins the job's group: rank 0 serves the rendezvous store at MASTER_ADDR and
    /// MASTER_PORT, every rank connects, and the Gloo context is made. Waits up to
    /// `timeout` for the others, as every collective later does.
    pub fn join(launch: &Launch, backend: Backend, timeout: Duration) -> Result<Group> {
        if backend == Backend::Nccl {
            bail!(
                "c10d's NCCL backend (--ddp-backend nccl, the default for CUDA devices) is \
                 not bound in this build: pass --ddp-backend gloo (its collectives go \
                 through host memory), or train on the CPU"
            );
        }
        let interface = std::env::var("GLOO_SOCKET_IFNAME").ok();
        let run_id = std::env::var(RUN_ID_VAR).ok();
        let local = local_address_towards(&launch.master_addr, launch.master_port)?;
        let c = |s: &str, what: &str| {
            CString::new(s).map_err(|_| anyhow!("{what} {s:?} holds a NUL byte"))
        };
        let host = c(&launch.master_addr, "MASTER_ADDR")?;
        let local = c(&local.to_string(), "local address")?;
        let interface = interface
            .as_deref()
            .map(|i| c(i, "GLOO_SOCKET_IFNAME"))
            .transpose()?;
        let run_id = run_id.as_deref().map(|r| c(r, RUN_ID_VAR)).transpose()?;
        let mut err = std::ptr::null_mut();
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        // SAFETY: valid C strings for the call's duration; the shim copies them.
        let raw = unsafe {
            ffi::gk_group_new(
                host.as_ptr(),
                i32::from(launch.master_port),
                launch.rank as i32,
                launch.world_size as i32,
                timeout_ms,
                local.as_ptr(),
                interface.as_ref().map_or(std::ptr::null(), |i| i.as_ptr()),
                run_id.as_ref().map_or(std::ptr::null(), |r| r.as_ptr()),
                &mut err,
            )
        };
        let raw = NonNull::new(raw).ok_or_else(|| {
            anyhow!(
                "rank {} of {}: joining the {} process group at {}:{} failed: {}",
                launch.rank,
                launch.world_size,
                backend.name(),
                launch.master_addr,
                launch.master_port,
                take_error(err)
            )
        })?;
        Ok(Group {
            raw,
            rank: launch.rank,
            world_size: launch.world_size,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn check(&self, status: i32, err: *mut c_char, what: &str) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        bail!(
            "rank {} of {}: {what} failed: {}. Another rank has probably stopped; its own \
             error says why",
            self.rank,
            self.world_size,
            take_error(err).trim_end_matches(['.', '!', ' '])
        )
    }

    /// Sums a contiguous CPU tensor over every rank, in place.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        check_tensor(tensor)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: a live tensor; the shim holds its own reference during the call.
        let status = unsafe {
            ffi::gk_all_reduce_sum(self.raw.as_ptr(), tensor.as_mut_ptr().cast(), &mut err)
        };
        self.check(status, err, "all-reduce")
    }

    /// Copies `root`'s tensor into every rank's, in place.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        check_tensor(tensor)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: as in all_reduce_sum.
        let status = unsafe {
            ffi::gk_broadcast(
                self.raw.as_ptr(),
                tensor.as_mut_ptr().cast(),
                root as i32,
                &mut err,
            )
        };
        self.check(status, err, "broadcast")
    }

    /// Every rank's `input` (the same shape on every rank), in rank order: a new
    /// tensor of shape (world, ...input's shape).
    pub fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        let mut input = input.contiguous();
        check_tensor(&input)?;
        let mut shape = vec![self.world_size as i64];
        shape.extend(input.size());
        let mut output = Tensor::empty(&shape, (input.kind(), Device::Cpu));
        let mut err = std::ptr::null_mut();
        // SAFETY: live tensors; the shim holds its own references during the call.
        let status = unsafe {
            ffi::gk_all_gather(
                self.raw.as_ptr(),
                input.as_mut_ptr().cast(),
                output.as_mut_ptr().cast(),
                &mut err,
            )
        };
        self.check(status, err, "all-gather")?;
        Ok(output)
    }

    pub fn barrier(&self) -> Result<()> {
        let mut err = std::ptr::null_mut();
        // SAFETY: a live group.
        let status = unsafe { ffi::gk_barrier(self.raw.as_ptr(), &mut err) };
        self.check(status, err, "barrier")
    }

    /// `root`'s bytes on every rank (`bytes` is read on `root` only).
    pub fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        let mut len = Tensor::from_slice(&[bytes.len() as i64]);
        self.broadcast(&mut len, root)?;
        let n = len.int64_value(&[0]);
        let mut data = if self.rank == root {
            Tensor::from_slice(bytes)
        } else {
            Tensor::zeros([n], (Kind::Uint8, Device::Cpu))
        };
        self.broadcast(&mut data, root)?;
        Ok(Vec::<u8>::try_from(&data)?)
    }

    /// Sums numbers over every rank (in f64).
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let mut t = Tensor::from_slice(values);
        self.all_reduce_sum(&mut t)?;
        let summed = Vec::<f64>::try_from(&t)?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    /// Sums tensors over every rank, in place, in flat buckets of at most `bucket_bytes`
    /// of one dtype (as DDP buckets gradients): a few large collectives, not one per
    /// tensor.
    pub fn all_reduce_tensors(&self, tensors: &[Tensor], bucket_bytes: usize) -> Result<()> {
        self.bucketed(tensors, bucket_bytes, |flat| self.all_reduce_sum(flat))
    }

    /// Copies `root`'s tensors into every rank's, in place, bucketed as above.
    pub fn broadcast_tensors(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        self.bucketed(tensors, 64 << 20, |flat| self.broadcast(flat, root))
    }

    fn bucketed(
        &self,
        tensors: &[Tensor],
        bucket_bytes: usize,
        mut collective: impl FnMut(&mut Tensor) -> Result<()>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut start = 0;
        while start < tensors.len() {
            let kind = tensors[start].kind();
            let mut end = start;
            let mut bytes = 0usize;
            while end < tensors.len()
                && tensors[end].kind() == kind
                && (end == start || bytes + nbytes(&tensors[end]) <= bucket_bytes)
            {
                bytes += nbytes(&tensors[end]);
                end += 1;
            }
            let bucket = &tensors[start..end];
            let flats: Vec<Tensor> = bucket.iter().map(|t| t.reshape([-1])).collect();
            let mut flat = Tensor::cat(&flats, 0).to_device(Device::Cpu);
            collective(&mut flat)?;
            let mut offset = 0;
            for t in bucket {
                let n = t.numel() as i64;
                let part = flat.narrow(0, offset, n).view_as(t);
                t.shallow_clone().copy_(&part);
                offset += n;
            }
            start = end;
        }
        Ok(())
    }
}

/// Keeps `group` joined until the process exits, whenever the rest of the process lets
/// go of it. A rank that stops with an error then prints it before its connections
/// close: the other ranks fail after it, and a launcher sees it exit first and names it.
pub fn keep_until_exit(group: &Arc<Group>) {
    static KEPT: Mutex<Vec<Arc<Group>>> = Mutex::new(Vec::new());
    KEPT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arc::clone(group));
}

fn nbytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

fn check_tensor(t: &Tensor) -> Result<()> {
    if t.device() != Device::Cpu {
        bail!(
            "c10d's Gloo backend here runs on CPU tensors; this one is on {:?}",
            t.device()
        );
    }
    if !t.is_contiguous() {
        bail!("a collective needs a contiguous tensor");
    }
    if matches!(t.kind(), Kind::ComplexFloat | Kind::ComplexDouble) {
        bail!("complex tensors are not summed here");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_world_size_is_a_plain_run() {
        assert_eq!(Launch::from_vars(vars(&[("RANK", "1")])).unwrap(), None);
    }

    #[test]
    fn torchrun_variables_are_read() {
        let l = Launch::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            l,
            Launch {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                master_addr: "10.0.0.2".into(),
                master_port: 1234
            }
        );
    }

    #[test]
    fn bad_variables_are_named() {
        for (pairs, needle) in [
            (&[("WORLD_SIZE", "two"), ("RANK", "0")][..], "WORLD_SIZE"),
            (&[("WORLD_SIZE", "2")][..], "RANK"),
            (&[("WORLD_SIZE", "2"), ("RANK", "2")][..], "RANK=2"),
            (&[("WORLD_SIZE", "0"), ("RANK", "0")][..], "WORLD_SIZE=0"),
            (
                &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")][..],
                "MASTER_PORT",
            ),
        ] {
            let e = Launch::from_vars(vars(pairs)).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
