//! A small persistent thread pool for the decode kernels.
//!
//! Why not `std::thread::scope`: a decode step makes ~50 matrix calls of 50–500 µs each,
//! and spawning threads per call costs ~20–35 µs (measured by `kernel_bench`). Here the
//! workers stay alive and, between calls, wait awake for a while (`spin`) before they
//! sleep, so back-to-back calls find them ready (< 1 µs); a call that finds one asleep
//! wakes it but does not wait for it. Waiting awake first busy-spins, then yields the
//! core between looks: libtorch's own threads run the ops between two linear layers,
//! and a worker that only spun would take a core from them.
//!
//! A call never waits for a worker to show up, only for the tasks some thread has
//! claimed: the caller claims tasks too, so a worker the OS has descheduled (other jobs
//! share these machines) costs its share, never a stall. Tasks are claimed with one
//! atomic that holds both the call's generation and the next task index, so a worker
//! still holding an earlier call's job can never claim a task of a later one.
use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker waits awake before it sleeps. Long enough to span the
/// non-matmul work between two linear layers of a decode step; short enough that an
/// idle pool gives its cores back almost at once.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);
/// The first part of that wait busy-spins (the next call of a back-to-back run comes
/// within microseconds); the rest yields to other runnable threads between looks.
const BUSY_SPIN: Duration = Duration::from_micros(20);

type Job = dyn Fn(usize) + Sync;

/// The current call's job, with its borrow's lifetime erased.
#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointee is `Sync` and is only called while its `run` is still waiting (see
// `ThreadPool::run`), so sharing the pointer with the workers is sharing a `&Job`.
unsafe impl Send for JobPtr {}

#[derive(Clone, Copy)]
struct Slot {
    gen: u32,
    n_tasks: usize,
    job: Option<JobPtr>,
}

struct Shared {
    /// (generation << 32) | index of the next unclaimed task.
    claim: AtomicU64,
    slot: Mutex<Slot>,
    /// Tasks of the current generation finished (or panicked).
    done: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    spin: Duration,
}

/// Threads that run the tasks of one call at a time; the calling thread is one of them.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One call at a time; a concurrent caller runs its tasks itself.
    busy: Mutex<()>,
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller and `threads - 1` workers).
    pub fn new(threads: usize) -> Self {
        Self::with_spin(threads, DEFAULT_SPIN)
    }

    /// As `new`, with idle workers waiting awake for `spin` (`DEFAULT_SPIN`) before they
    /// sleep; zero sleeps at once (every call then pays a wake-up, ~10–60 µs).
    pub fn with_spin(threads: usize, spin: Duration) -> Self {
        let shared = Arc::new(Shared {
            claim: AtomicU64::new(0),
            slot: Mutex::new(Slot {
                gen: 0,
                n_tasks: 0,
                job: None,
            }),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            spin,
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let sh = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("gpt2kit-kernel-{i}"))
                    .spawn(move || worker(&sh))
                    .expect("spawning a kernel thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// The process-wide pool, made on first use with one thread per available core.
    pub fn global() -> Arc<ThreadPool> {
        Self::global_with(None)
    }

    /// The process-wide pool, made on first use with `threads` threads (`None`: one per
    /// available core); later calls get the pool as it was first made.
    pub fn global_with(threads: Option<usize>) -> Arc<ThreadPool> {
        static GLOBAL: OnceLock<Arc<ThreadPool>> = OnceLock::new();
        Arc::clone(GLOBAL.get_or_init(|| {
            let threads = threads
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            Arc::new(ThreadPool::new(threads))
        }))
    }

    /// Threads in all, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0..n_tasks)`, each task once, across the pool; returns when all are done.
    /// A panic in a task is re-raised here once every task has finished.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        let _busy = match self.busy.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..n_tasks).for_each(f);
                return;
            }
        };
        if self.workers.is_empty() || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let sh = &*self.shared;
        // SAFETY: only the lifetime is changed. Workers call the job only for a task they
        // claimed in this generation, and this function does not return (nor unwind)
        // before `done` counts every task of it, i.e. before the last such call ended;
        // later generations can no longer be claimed with this pointer (see `claim`).
        let short: *const (dyn Fn(usize) + Sync + '_) = f;
        let job = JobPtr(unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(short)
        });
        let gen = {
            let mut slot = lock(&sh.slot);
            slot.gen = slot.gen.wrapping_add(1);
            slot.n_tasks = n_tasks;
            slot.job = Some(job);
            slot.gen
        };
        sh.done.store(0, Relaxed);
        sh.panicked.store(false, Relaxed);
        sh.claim.store(u64::from(gen) << 32, SeqCst);
        if sh.sleepers.load(SeqCst) > 0 {
            let _g = lock(&sh.sleep);
            sh.wake.notify_all();
        }
        let mut caught: Option<Box<dyn Any + Send>> = None;
        while let Some(t) = claim(sh, gen, n_tasks) {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(t))) {
                caught = Some(p);
            }
            sh.done.fetch_add(1, Release);
        }
        while sh.done.load(Acquire) < n_tasks {
            std::hint::spin_loop();
        }
        lock(&sh.slot).job = None;
        if let Some(p) = caught {
            resume_unwind(p);
        }
        if sh.panicked.load(Relaxed) {
            panic!("a kernel task panicked on a pool thread");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        {
            let _g = lock(&self.shared.sleep);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The next task of generation `gen`, if it is still the current one and has any left.
fn claim(sh: &Shared, gen: u32, n_tasks: usize) -> Option<usize> {
    let mut cur = sh.claim.load(Acquire);
    loop {
        let idx = (cur & 0xffff_ffff) as usize;
        if (cur >> 32) as u32 != gen || idx >= n_tasks {
            return None;
        }
        match sh
            .claim
            .compare_exchange_weak(cur, cur + 1, AcqRel, Acquire)
        {
            Ok(_) => return Some(idx),
            Err(now) => cur = now,
        }
    }
}

fn worker(sh: &Shared) {
    let mut seen = 0u32;
    while let Some(gen) = wait_for_job(sh, seen) {
        seen = gen;
        let slot = *lock(&sh.slot);
        let Some(job) = slot.job.filter(|_| slot.gen == gen) else {
            continue;
        };
        while let Some(t) = claim(sh, gen, slot.n_tasks) {
            // SAFETY: task `t` of generation `gen` was claimed, so that generation's `run`
            // is still waiting for it and the job it borrowed is alive (see `run`).
            let f = unsafe { &*job.0 };
            if catch_unwind(AssertUnwindSafe(|| f(t))).is_err() {
                sh.panicked.store(true, Relaxed);
            }
            sh.done.fetch_add(1, Release);
        }
    }
}

/// Spins, then sleeps, until the generation differs from `seen`; None at shutdown.
fn wait_for_job(sh: &Shared, seen: u32) -> Option<u32> {
    let start = Instant::now();
    let mut spins = 0u32;
    let mut yielding = false;
    loop {
        if sh.shutdown.load(Relaxed) {
            return None;
        }
        let gen = (sh.claim.load(Acquire) >> 32) as u32;
        if gen != seen {
            return Some(gen);
        }
        if yielding {
            std::thread::yield_now();
            if start.elapsed() >= sh.spin {
                break;
            }
            continue;
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins % 64 == 0 {
            let waited = start.elapsed();
            if waited >= sh.spin {
                break;
            }
            yielding = waited >= BUSY_SPIN;
        }
    }
    let mut g = lock(&sh.sleep);
    // Registered before the last look under the lock: `run` stores the generation and
    // then reads `sleepers` (both SeqCst), so it either sees this sleeper and notifies
    // under the lock, or stored the generation early enough for the look to see it.
    sh.sleepers.fetch_add(1, SeqCst);
    let out = loop {
        if sh.shutdown.load(SeqCst) {
            break None;
        }
        let gen = (sh.claim.load(SeqCst) >> 32) as u32;
        if gen != seen {
            break Some(gen);
        }
        g = sh.wake.wait(g).unwrap_or_else(|e| e.into_inner());
    };
    sh.sleepers.fetch_sub(1, SeqCst);
    out
}
