//! `gpt2kit launch`: the environment each rank gets, fail-fast on a failing rank, signal
//! forwarding, and the refused command lines. The ranks are `sh -c` scripts (`--exec`).
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn launch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .arg("launch")
        .args(args)
        .env("GPT2KIT_PACKED_CACHE", "off")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh empty folder under the target folder, for the ranks' files.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("launch-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// Exit `code`, a message containing `needle`, and no panic.
fn assert_failure(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Whether a process with this pid exists (a zombie included).
fn alive(pid: &str) -> bool {
    Path::new("/proc").join(pid).exists()
}

const ENV_LINE: &str =
    "echo $RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT $GROUP_RANK";

#[test]
fn every_rank_gets_torchrun_environment() {
    let dir = scratch("env");
    let script = format!("{ENV_LINE} > {}/$RANK", dir.display());
    let o = launch(&["--nproc-per-node", "3", "--exec", "--", "sh", "-c", &script]);
    assert!(o.status.success(), "{}", stderr(&o));
    for rank in 0..3 {
        assert_eq!(
            read(&dir.join(rank.to_string())),
            format!("{rank} 3 {rank} 3 127.0.0.1 29500 0")
        );
    }
}

#[test]
fn second_node_ranks_follow_the_first_nodes() {
    let dir = scratch("nodes");
    let script = format!("{ENV_LINE} > {}/$RANK", dir.display());
    // The launcher's own RANK and WORLD_SIZE (a launch inside a launched job) are replaced.
    let o = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .args(["launch", "--nnodes", "2", "--node-rank", "1"])
        .args(["--nproc-per-node", "2", "--master-addr", "10.0.0.7"])
        .args(["--master-port", "1234", "--exec", "--", "sh", "-c", &script])
        .env("RANK", "7")
        .env("WORLD_SIZE", "9")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(&dir.join("2")), "2 4 0 2 10.0.0.7 1234 1");
    assert_eq!(read(&dir.join("3")), "3 4 1 2 10.0.0.7 1234 1");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
}

#[test]
fn omp_threads_are_shared_out_unless_set() {
    let dir = scratch("omp");
    let script = format!("echo $OMP_NUM_THREADS > {}/$RANK", dir.display());
    let o = launch(&["--nproc-per-node", "2", "--exec", "--", "sh", "-c", &script]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(read(&dir.join("0")), (cores / 2).max(1).to_string());
    let o = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--exec",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env("OMP_NUM_THREADS", "5")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(&dir.join("1")), "5");
}

#[test]
fn a_killed_rank_stops_the_others() {
    let dir = scratch("killed");
    // Every rank writes its pid; rank 1 then kills itself, the others would sleep 30 s.
    let script = format!(
        "echo $$ > {}/$RANK; if [ $RANK = 1 ]; then sleep 0.5; kill -9 $$; fi; exec sleep 30",
        dir.display()
    );
    let start = Instant::now();
    let o = launch(&["--nproc-per-node", "3", "--exec", "--", "sh", "-c", &script]);
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    assert_failure(&o, 1, "rank 1 (local rank 1");
    let err = stderr(&o);
    assert!(err.contains("signal 9"), "{err}");
    assert!(err.contains("stopping the other 2 ranks"), "{err}");
    for rank in ["0", "2"] {
        let pid = read(&dir.join(rank));
        assert!(!alive(&pid), "rank {rank} (pid {pid}) still runs");
    }
}

#[test]
fn a_failing_rank_is_named_with_its_status() {
    let script = "if [ $RANK = 2 ]; then exit 3; fi; exec sleep 30";
    let start = Instant::now();
    let o = launch(&["--nproc-per-node", "3", "--exec", "--", "sh", "-c", script]);
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_failure(&o, 1, "rank 2 (local rank 2");
    assert!(
        stderr(&o).contains("exited with status 3"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn ranks_ignoring_sigterm_are_killed_after_the_grace() {
    let dir = scratch("grace");
    let script = format!(
        "trap '' TERM; echo $$ > {}/$RANK; if [ $RANK = 0 ]; then sleep 0.5; exit 1; fi; \
         while :; do sleep 0.1; done",
        dir.display()
    );
    let start = Instant::now();
    let o = launch(&[
        "--nproc-per-node",
        "2",
        "--kill-grace-secs",
        "0.5",
        "--exec",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_failure(&o, 1, "rank 0 (local rank 0");
    let pid = read(&dir.join("1"));
    assert!(!alive(&pid), "rank 1 (pid {pid}) still runs");
}

#[test]
fn sigterm_to_the_launcher_reaches_every_rank() {
    let dir = scratch("sigterm");
    // Each rank says it is ready, then waits (interruptibly) until its TERM trap runs.
    let script = format!(
        "d={}; trap 'echo term > $d/term-$RANK; kill $p 2>/dev/null; exit 0' TERM; \
         sleep 30 >/dev/null 2>&1 & p=$!; touch $d/ready-$RANK; wait $p",
        dir.display()
    );
    let launcher = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--exec",
            "--",
            "sh",
            "-c",
        ])
        .arg(&script)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !(dir.join("ready-0").exists() && dir.join("ready-1").exists()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the ranks never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rc = unsafe { libc::kill(launcher.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let o = launcher.wait_with_output().unwrap();
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(o.status.success(), "{}", stderr(&o));
    for rank in 0..2 {
        assert_eq!(read(&dir.join(format!("term-{rank}"))), "term");
    }
}

#[test]
fn bad_command_lines_are_refused_naming_the_flag() {
    let n1 = ["--nproc-per-node", "1"];
    let cases: [(&[&str], &str); 12] = [
        (
            &[
                "--nproc-per-node",
                "2",
                "--",
                "launch",
                "--nproc-per-node",
                "2",
            ],
            "nested launch",
        ),
        (
            &[
                "--nproc-per-node",
                "2",
                "--nnodes",
                "2",
                "--node-rank",
                "2",
                "--exec",
                "--",
                "true",
            ],
            "--node-rank 2 must be below --nnodes 2",
        ),
        (&["--nproc-per-node", "2", "--"], "ARGS is empty"),
        (&["--nproc-per-node", "2"], "ARGS is empty"),
        (
            &["--nproc-per-node", "0", "--exec", "--", "true"],
            "--nproc-per-node",
        ),
        (
            &[&n1[..], &["--nnodes", "0", "--exec", "--", "true"]].concat(),
            "--nnodes",
        ),
        (
            &[&n1[..], &["--master-port", "0", "--", "train"]].concat(),
            "--master-port",
        ),
        (
            &[&n1[..], &["--master-port", "65536", "--", "train"]].concat(),
            "--master-port",
        ),
        (
            &[&n1[..], &["--kill-grace-secs", "-1", "--", "train"]].concat(),
            "--kill-grace-secs",
        ),
        (
            &[&n1[..], &["--kill-grace-secs", "1e30", "--", "train"]].concat(),
            "--kill-grace-secs",
        ),
        (&["--exec", "--", "true"], "--nproc-per-node"),
        (
            &[&n1[..], &["--", "eval", "--help"]].concat(),
            "`eval`: a launch runs `train`",
        ),
    ];
    for (args, needle) in cases {
        assert_failure(&launch(args), 2, needle);
    }
}

#[test]
fn a_program_that_cannot_start_is_named() {
    let o = launch(&[
        "--nproc-per-node",
        "2",
        "--exec",
        "--",
        "/nonexistent/gpt2kit-launch-test",
    ]);
    assert_failure(&o, 1, "/nonexistent/gpt2kit-launch-test");
}

#[test]
fn gpt2kit_subcommands_run_as_ranks() {
    let o = launch(&["--nproc-per-node", "2", "--", "train", "--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.matches("Usage: gpt2kit train").count(), 2, "{out}");
    // What would run once per rank (write one --out twice, print twice) is refused.
    for sub in ["eval", "quantize", "inspect", "serve"] {
        let o = launch(&["--nproc-per-node", "2", "--", sub, "--help"]);
        assert_failure(&o, 2, &format!("`{sub}`: a launch runs `train`"));
    }
}

/// Whether a process with this pid still runs (a zombie, dead but not yet reaped by
/// whoever inherited it, does not).
fn running(pid: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name's closing parenthesis.
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    !(state.starts_with('Z') || state.starts_with('X'))
}

/// Starts `launch --nproc-per-node 2 --exec -- sh -c SCRIPT` and waits until both ranks
/// have written `dir/ready-RANK`.
fn start_two_ranks(dir: &Path, script: &str) -> std::process::Child {
    let launcher = Command::new(env!("CARGO_BIN_EXE_gpt2kit"))
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--exec",
            "--",
            "sh",
            "-c",
        ])
        .arg(script)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !(dir.join("ready-0").exists() && dir.join("ready-1").exists()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the ranks never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    launcher
}

#[test]
fn a_killed_launcher_takes_its_ranks_with_it() {
    let dir = scratch("launcher-killed");
    let script = format!(
        "echo $$ > {0}/$RANK; touch {0}/ready-$RANK; exec sleep 60",
        dir.display()
    );
    let mut launcher = start_two_ranks(&dir, &script);
    // SIGKILL: the launcher gets no chance to stop its ranks itself.
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let pids = [read(&dir.join("0")), read(&dir.join("1"))];
    let start = Instant::now();
    while pids.iter().any(|p| running(p)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "ranks {pids:?} outlived their launcher"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_to_the_launcher_reaches_every_rank() {
    let dir = scratch("sighup");
    let script = format!(
        "d={}; echo $$ > $d/$RANK; trap 'echo hup > $d/hup-$RANK; kill $p 2>/dev/null; \
         exit 0' HUP; sleep 30 >/dev/null 2>&1 & p=$!; touch $d/ready-$RANK; wait $p",
        dir.display()
    );
    let launcher = start_two_ranks(&dir, &script);
    let start = Instant::now();
    let rc = unsafe { libc::kill(launcher.id() as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0);
    let o = launcher.wait_with_output().unwrap();
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(o.status.success(), "{}", stderr(&o));
    for rank in 0..2 {
        assert_eq!(read(&dir.join(format!("hup-{rank}"))), "hup");
    }
}

#[test]
fn ranks_stopped_by_a_forwarded_signal_say_so() {
    let dir = scratch("interrupted");
    // The ranks die of the SIGINT the launcher forwards (sh's default action).
    let script = format!(
        "d={}; echo $$ > $d/$RANK; touch $d/ready-$RANK; exec sleep 30",
        dir.display()
    );
    let launcher = start_two_ranks(&dir, &script);
    let rc = unsafe { libc::kill(launcher.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    let o = launcher.wait_with_output().unwrap();
    // 128 + SIGINT, as a shell reports a command that SIGINT ended.
    assert_failure(&o, 130, "interrupted by SIGINT (forwarded to every rank)");
    for rank in ["0", "1"] {
        assert!(!alive(&read(&dir.join(rank))));
    }
}

#[test]
fn a_grace_beyond_the_clock_still_stops_the_ranks() {
    // 1e19 s is a duration but no deadline: the ranks that exit on SIGTERM are waited for.
    let script = "if [ $RANK = 1 ]; then exit 3; fi; exec sleep 30";
    let start = Instant::now();
    let o = launch(&[
        "--nproc-per-node",
        "2",
        "--kill-grace-secs",
        "1e19",
        "--exec",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_failure(&o, 1, "rank 1 (local rank 1");
}
