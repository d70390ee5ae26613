//! `gpt2kit launch`: starts N local ranks of a command with the environment torchrun
//! gives its workers, forwards SIGINT, SIGTERM and SIGHUP to them, and stops every rank
//! as soon as one fails (torchrun's fail-fast). A launcher that dies without the chance
//! to stop its ranks (SIGKILL) takes them with it.
use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;

use crate::Out;

/// How often the launcher looks at its children and at the signals it received.
const POLL: Duration = Duration::from_millis(50);

#[derive(ClapArgs)]
pub struct Args {
    /// Ranks (child processes) to start on this node.
    #[arg(long, value_name = "N")]
    nproc_per_node: usize,
    /// Nodes taking part in the run (WORLD_SIZE is nproc-per-node times this).
    #[arg(long, value_name = "M", default_value_t = 1)]
    nnodes: usize,
    /// This node's index, below nnodes (GROUP_RANK; RANK starts at node-rank × nproc-per-node).
    #[arg(long, value_name = "R", default_value_t = 0)]
    node_rank: usize,
    /// MASTER_ADDR given to every rank: the address rank 0 listens on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    master_addr: String,
    /// MASTER_PORT given to every rank (1 to 65535).
    #[arg(long, value_name = "PORT", default_value_t = 29500)]
    master_port: u32,
    /// Run ARGS as a program and its arguments instead of as a gpt2kit subcommand.
    #[arg(long)]
    exec: bool,
    /// After a rank fails, seconds the other ranks get to exit after SIGTERM before
    /// they are sent SIGKILL.
    #[arg(long, value_name = "S", default_value_t = 5.0)]
    kill_grace_secs: f64,
    /// What each rank runs, after `--`: a gpt2kit subcommand and its flags, or with
    /// --exec a program and its arguments.
    #[arg(
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 0..
    )]
    args: Vec<OsString>,
}

/// The checked command line: what every rank runs, and where in the world it sits.
struct Plan {
    program: OsString,
    args: Vec<OsString>,
    nproc: usize,
    node_rank: usize,
    world_size: usize,
    grace: Duration,
    /// The run's id in the rendezvous, for a job of this node alone (the launchers of a
    /// job over several nodes cannot agree on one; the environment's, if any, stands).
    run_id: Option<String>,
}

fn usage(msg: String) -> anyhow::Error {
    infer::Error::Input(msg).into()
}

fn plan(args: &Args) -> anyhow::Result<Plan> {
    if args.nproc_per_node < 1 {
        return Err(usage("--nproc-per-node must be at least 1".into()));
    }
    if args.nnodes < 1 {
        return Err(usage("--nnodes must be at least 1".into()));
    }
    if args.node_rank >= args.nnodes {
        return Err(usage(format!(
            "--node-rank {} must be below --nnodes {} (node ranks count from 0)",
            args.node_rank, args.nnodes
        )));
    }
    if !(1..=65535).contains(&args.master_port) {
        return Err(usage(format!(
            "--master-port must be 1 to 65535, got {}",
            args.master_port
        )));
    }
    let Ok(grace) = Duration::try_from_secs_f64(args.kill_grace_secs) else {
        return Err(usage(format!(
            "--kill-grace-secs must be a number of seconds, 0 or more, got {}",
            args.kill_grace_secs
        )));
    };
    let world_size = args
        .nproc_per_node
        .checked_mul(args.nnodes)
        .ok_or_else(|| usage("--nproc-per-node times --nnodes is too large".into()))?;
    let Some((first, rest)) = args.args.split_first() else {
        return Err(usage(
            "nothing to launch: ARGS is empty; give the command after `--` (e.g. `-- train ...`, or \
             --exec `-- PROGRAM ARGS...`)"
                .into(),
        ));
    };
    let (program, rest) = if args.exec {
        (first.clone(), rest.to_vec())
    } else {
        if first == "launch" {
            return Err(usage(
                "a launch cannot run `launch` (nested launch): give the subcommand each rank \
                 runs after `--`, or a program with --exec"
                    .into(),
            ));
        }
        // Another subcommand would run once per rank: `quantize` would write its --out
        // from every rank, `eval` print its result once per rank.
        if !matches!(first.to_str(), Some("train" | "infer")) {
            return Err(usage(format!(
                "`{}`: a launch runs `train` (data-parallel) or `infer --tp N` \
                 (tensor-parallel) in every rank; run other subcommands without it, or a \
                 program with --exec",
                first.to_string_lossy()
            )));
        }
        let exe = std::env::current_exe()
            .map_err(|e| anyhow::anyhow!("cannot find the gpt2kit binary to launch: {e}"))?;
        (exe.into_os_string(), args.args.clone())
    };
    Ok(Plan {
        program,
        args: rest,
        nproc: args.nproc_per_node,
        node_rank: args.node_rank,
        world_size,
        grace,
        run_id: (args.nnodes == 1).then(run_id),
    })
}

/// An id for this launch, distinct from any other launch's running at the same time:
/// two jobs started together on one --master-port then do not take each other's ranks
/// (the loser's ranks connect to the winner's store, but under their own keys).
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("gpt2kit-{}-{nanos:x}/", std::process::id())
}

/// A launch that stopped because of a signal it received and forwarded: it exits
/// 128 + the signal's number, as a shell reports a command the signal ended.
#[derive(Debug)]
pub(crate) struct Interrupted {
    pub(crate) sig: i32,
    /// What failed, the signal named.
    message: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Interrupted {}

/// The last SIGINT, SIGTERM or SIGHUP the launcher received and has not forwarded yet
/// (0: none).
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The last signal forwarded to the ranks (0: none): a rank that then fails was stopped
/// by it rather than failing by itself.
static FORWARDED_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    PENDING_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Records SIGINT, SIGTERM and SIGHUP for the polling loop to forward, instead of dying
/// of them (and leaving the ranks running).
fn install_signal_handlers() -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic (async-signal-safe); the
        // sigaction struct is zeroed and then filled as sigaction(2) describes.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            anyhow::bail!(
                "cannot install the handler of signal {sig}: {}",
                io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// One started rank; `status` once it has exited and been reaped.
struct Rank {
    rank: usize,
    local_rank: usize,
    child: Child,
    status: Option<ExitStatus>,
}

impl Rank {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to a rank still running (never to a reaped pid, which may be reused).
    fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: kill(2) on the pid of our own unreaped child.
            unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        }
    }

    /// Reaps the rank if it has exited; its status when it did just now.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return None;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.status = Some(status);
                Some(status)
            }
            Ok(None) => None,
            Err(e) => {
                // Not ours to wait for any more (cannot happen for a child we spawned):
                // counted as a failure rather than waited on forever.
                let _ = writeln!(
                    io::stderr(),
                    "gpt2kit launch: cannot wait for rank {} (pid {}): {e}",
                    self.rank,
                    self.pid()
                );
                let status = ExitStatus::from_raw(1 << 8);
                self.status = Some(status);
                Some(status)
            }
        }
    }

    fn describe(&self, status: ExitStatus) -> String {
        let who = format!(
            "rank {} (local rank {}, pid {})",
            self.rank,
            self.local_rank,
            self.pid()
        );
        match (status.code(), status.signal()) {
            (Some(code), _) => format!("{who} exited with status {code}"),
            (None, Some(sig)) => format!(
                "{who} was killed by signal {sig}{}",
                signal_name(sig).map_or(String::new(), |n| format!(" ({n})"))
            ),
            (None, None) => format!("{who} ended with {status}"),
        }
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return None,
    })
}

/// Forwards a SIGINT, SIGTERM or SIGHUP the launcher received since the last look to
/// every running rank.
fn forward_pending(ranks: &[Rank]) {
    let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
    if sig != 0 {
        FORWARDED_SIGNAL.store(sig, Ordering::SeqCst);
        for r in ranks {
            r.signal(sig);
        }
    }
}

/// SIGTERM to every running rank, `grace` for them to exit, then SIGKILL; reaps all.
fn stop_all(ranks: &mut [Rank], grace: Duration) {
    for r in ranks.iter() {
        r.signal(libc::SIGTERM);
    }
    // None: a grace beyond any clock, waited out like one that never ends.
    let deadline = Instant::now().checked_add(grace);
    loop {
        forward_pending(ranks);
        for r in ranks.iter_mut() {
            r.poll();
        }
        if ranks.iter().all(|r| r.status.is_some()) || deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        std::thread::sleep(POLL);
    }
    for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
        r.signal(libc::SIGKILL);
        r.status = Some(
            r.child
                .wait()
                .unwrap_or(ExitStatus::from_raw(libc::SIGKILL)),
        );
    }
}

/// The number of OpenMP threads of each rank when the user set none: the cores shared
/// out between the ranks.
fn omp_threads(nproc: usize) -> Option<usize> {
    if nproc <= 1 || std::env::var_os("OMP_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / nproc).max(1))
}

fn command(plan: &Plan, local_rank: usize, master_addr: &str, master_port: u32) -> Command {
    let mut c = Command::new(&plan.program);
    c.args(&plan.args)
        .env(
            "RANK",
            (plan.node_rank * plan.nproc + local_rank).to_string(),
        )
        .env("WORLD_SIZE", plan.world_size.to_string())
        .env("LOCAL_RANK", local_rank.to_string())
        .env("LOCAL_WORLD_SIZE", plan.nproc.to_string())
        .env("GROUP_RANK", plan.node_rank.to_string())
        .env("MASTER_ADDR", master_addr)
        .env("MASTER_PORT", master_port.to_string());
    if let Some(n) = omp_threads(plan.nproc) {
        c.env("OMP_NUM_THREADS", n.to_string());
    }
    if let Some(id) = &plan.run_id {
        c.env(dist::RUN_ID_VAR, id);
    }
    let launcher = std::process::id();
    // SAFETY: between fork and exec the closure calls only prctl, getppid and kill,
    // which are async-signal-safe, and allocates nothing.
    unsafe {
        c.pre_exec(move || {
            // A launcher killed outright cannot stop its ranks: the kernel does.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The launcher may have died before the prctl took effect.
            if libc::getppid() as u32 != launcher {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            Ok(())
        });
    }
    c
}

pub fn run(args: &Args, _out: &mut Out) -> anyhow::Result<()> {
    let plan = plan(args)?;
    install_signal_handlers()?;
    let mut ranks: Vec<Rank> = Vec::with_capacity(plan.nproc);
    for local_rank in 0..plan.nproc {
        let rank = plan.node_rank * plan.nproc + local_rank;
        match command(&plan, local_rank, &args.master_addr, args.master_port).spawn() {
            Ok(child) => ranks.push(Rank {
                rank,
                local_rank,
                child,
                status: None,
            }),
            Err(e) => {
                stop_all(&mut ranks, plan.grace);
                anyhow::bail!(
                    "rank {rank} (local rank {local_rank}) could not start {}: {e}{}",
                    plan.program.to_string_lossy(),
                    if ranks.is_empty() {
                        String::new()
                    } else {
                        format!("; stopped the {} ranks started", ranks.len())
                    }
                );
            }
        }
    }
    loop {
        forward_pending(&ranks);
        let mut failed = None;
        for (i, r) in ranks.iter_mut().enumerate() {
            if let Some(status) = r.poll() {
                if !status.success() && failed.is_none() {
                    failed = Some((i, status));
                }
            }
        }
        if let Some((i, status)) = failed {
            let mut what = ranks[i].describe(status);
            let sig = FORWARDED_SIGNAL.load(Ordering::SeqCst);
            if sig != 0 {
                let name = signal_name(sig).map_or(format!("signal {sig}"), String::from);
                what = format!("interrupted by {name} (forwarded to every rank): {what}");
            }
            let others = ranks.len() - 1;
            let mut err = io::stderr().lock();
            let _ = writeln!(err, "gpt2kit launch: {what}");
            if others > 0 {
                let plural = if others == 1 { "" } else { "s" };
                let _ = writeln!(
                    err,
                    "gpt2kit launch: stopping the other {others} rank{plural}"
                );
            }
            drop(err);
            stop_all(&mut ranks, plan.grace);
            if sig != 0 {
                let message = format!("launch failed: {what}");
                return Err(Interrupted { sig, message }.into());
            }
            anyhow::bail!("launch failed: {what}");
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}
