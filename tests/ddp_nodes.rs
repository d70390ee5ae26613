//! A two-node data-parallel job over a real network link: two network namespaces joined
//! by a veth pair, one `gpt2kit launch --nnodes 2` per namespace (one rank each), against
//! one process with the whole global batch. Needs root and `ip` (iproute2); where
//! namespaces cannot be made the test says "skipped: ..." on stderr and passes.
mod common;

use common::TempDir;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Both nodes together must finish within this; then both are killed and the test fails.
const NODE_DEADLINE: Duration = Duration::from_secs(120);

/// Losses: N processes at batch B against one at batch B·N differ only by fp32 gradient
/// sums (and loss means) taken in another order; measured ~1e-7 relative (worst 1.5e-7
/// over 6 steps and 2 evals), so 1e-5 leaves two orders of magnitude.
const LOSS_REL_TOL: f64 = 1e-5;

fn ip(args: &[&str]) -> Result<(), String> {
    match Command::new("ip").args(args).stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("`ip` cannot run: {e}")),
    }
}

/// Two network namespaces joined by a veth pair; both deleted on drop (which also removes
/// the veth pair, whose ends live only inside them), on a panic as well.
struct Netns {
    names: Vec<String>,
}

impl Netns {
    /// Namespaces `gk<pid>a` and `gk<pid>b` holding the veth ends `gk<pid>a0` and
    /// `gk<pid>b0`, addressed `addrs.0/24` and `addrs.1/24`, `lo` and the veth ends up.
    fn new(addrs: (&str, &str)) -> Result<Self, String> {
        let pid = std::process::id();
        let (a, b) = (format!("gk{pid}a"), format!("gk{pid}b"));
        let mut ns = Netns { names: vec![] };
        for n in [&a, &b] {
            ip(&["netns", "add", n])?;
            ns.names.push(n.clone());
        }
        let (va, vb) = (format!("{a}0"), format!("{b}0"));
        ip(&[
            "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ])?;
        for (n, dev, addr) in [(&a, &va, addrs.0), (&b, &vb, addrs.1)] {
            ip(&["-n", n, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            if let Err(e) = ip(&["netns", "del", n]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Child processes killed (and reaped) on drop unless they already exited.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                // SIGTERM first: launch forwards it to its ranks, then SIGKILL.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        let until = Instant::now() + Duration::from_secs(5);
        for c in &mut self.0 {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Why this machine cannot make network namespaces, if it cannot.
fn namespaces_unavailable() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        Ok(_) => Some("`ip -V` failed".into()),
        Err(e) => Some(format!("`ip` (iproute2) not found: {e}")),
    }
}

const COMMON: &[&str] = &[
    "--block-size",
    "32",
    "--max-steps",
    "6",
    "--lr",
    "3e-3",
    "--eval-split",
    "0.2",
    "--eval-steps",
    "3",
    "--logging-steps",
    "1",
    "--save-steps",
    "3",
];

fn log(dir: &TempDir, name: &str) -> File {
    File::create(dir.path(name)).unwrap()
}

fn read_log(dir: &TempDir, name: &str) -> String {
    std::fs::read_to_string(dir.path(name)).unwrap_or_default()
}

/// ("loss" per step, "eval_loss" per evaluation) from OUT/final/trainer_state.json.
fn losses(out: &Path) -> (Vec<(u64, f64)>, Vec<(u64, f64)>) {
    let path = out.join("final/trainer_state.json");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap();
    let (mut train, mut eval) = (vec![], vec![]);
    for e in state["log_history"].as_array().expect("log_history") {
        let step = e["step"].as_u64().unwrap_or(0);
        if let Some(l) = e["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = e["eval_loss"].as_f64() {
            eval.push((step, l));
        }
    }
    (train, eval)
}

fn assert_close(what: &str, one: &[(u64, f64)], two: &[(u64, f64)]) -> f64 {
    assert_eq!(
        one.iter().map(|p| p.0).collect::<Vec<_>>(),
        two.iter().map(|p| p.0).collect::<Vec<_>>(),
        "{what}: logged steps differ"
    );
    assert!(!one.is_empty(), "{what}: none logged");
    let mut worst = 0f64;
    for ((step, a), (_, b)) in one.iter().zip(two) {
        let rel = (a - b).abs() / a.abs().max(1e-12);
        worst = worst.max(rel);
        assert!(
            rel <= LOSS_REL_TOL,
            "{what} at step {step}: one process {a}, two nodes {b} (relative {rel:e})"
        );
    }
    worst
}

#[test]
fn two_nodes_over_veth_match_one_process() {
    if let Some(why) = namespaces_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let x = std::process::id() % 250 + 1;
    let (addr_a, addr_b) = (format!("10.201.{x}.1"), format!("10.201.{x}.2"));
    let _netns = match Netns::new((&addr_a, &addr_b)) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: cannot make network namespaces: {why}");
            return;
        }
    };
    let started = Instant::now();
    let bin = env!("CARGO_BIN_EXE_gpt2kit");
    let dir = TempDir::new("ddp-nodes");

    // A 2-layer model without dropout and 37 text rows, as tests/ddp.rs trains.
    let model = common::data_parallel_model(&dir);
    let model = model.to_str().unwrap();
    let data = dir.s("data.jsonl");
    let train_args = |batch: &str, out: &str| -> Vec<String> {
        let mut v: Vec<String> = ["train", "--model", model, "--data", &data]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(COMMON.iter().map(|s| s.to_string()));
        v.extend([
            "--batch-size".into(),
            batch.into(),
            "--output".into(),
            dir.s(out),
        ]);
        v
    };

    // The reference: one process, the whole global batch, outside the namespaces.
    let o = Command::new(bin)
        .args(train_args("4", "one"))
        .env("GPT2KIT_PACKED_CACHE", "off")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "one process: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Node 0 in namespace A (rank 0 listens on its address), node 1 in B.
    let port = "29531";
    let node = |ns: &str, rank: &str, out: &str, log_name: &str| -> Child {
        Command::new("ip")
            .args(["netns", "exec", ns, bin, "launch", "--nproc-per-node", "1"])
            .args([
                "--nnodes",
                "2",
                "--node-rank",
                rank,
                "--master-addr",
                &addr_a,
            ])
            .args(["--master-port", port, "--"])
            .args(train_args("2", out))
            .env("GPT2KIT_PACKED_CACHE", "off")
            .stdin(Stdio::null())
            .stdout(log(&dir, &format!("{log_name}.out")))
            .stderr(log(&dir, &format!("{log_name}.err")))
            .spawn()
            .unwrap()
    };
    let pid = std::process::id();
    let mut nodes = Children(vec![
        node(&format!("gk{pid}a"), "0", "outa", "a"),
        node(&format!("gk{pid}b"), "1", "outb", "b"),
    ]);
    let logs = || {
        format!(
            "node 0 stderr:\n{}\nnode 1 stderr:\n{}",
            read_log(&dir, "a.err"),
            read_log(&dir, "b.err")
        )
    };
    let deadline = Instant::now() + NODE_DEADLINE;
    let mut status = [None, None];
    while status.iter().any(Option::is_none) {
        for (i, c) in nodes.0.iter_mut().enumerate() {
            if status[i].is_none() {
                status[i] = c.try_wait().unwrap();
            }
        }
        if Instant::now() > deadline {
            drop(nodes); // kills both
            panic!(
                "the two nodes did not finish within {NODE_DEADLINE:?}\n{}",
                logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(nodes);
    for (i, s) in status.iter().enumerate() {
        assert!(
            s.unwrap().success(),
            "node {i} exited {:?}\n{}",
            s.unwrap(),
            logs()
        );
    }

    // Rank 0 (node A) writes the model; rank 1 (node B) writes nothing.
    let (one, outa, outb): (PathBuf, PathBuf, PathBuf) =
        (dir.path("one"), dir.path("outa"), dir.path("outb"));
    assert!(outa.join("final/model.safetensors").exists(), "{}", logs());
    assert!(
        !outb.join("final").exists(),
        "rank 1 wrote {}",
        outb.join("final").display()
    );

    let (train_one, eval_one) = losses(&one);
    let (train_two, eval_two) = losses(&outa);
    assert_eq!(train_one.len(), 6, "{train_one:?}");
    assert_eq!(eval_one.len(), 2, "{eval_one:?}");
    let worst_train = assert_close("loss", &train_one, &train_two);
    let worst_eval = assert_close("eval_loss", &eval_one, &eval_two);

    // The weights' tolerance and why: `common::assert_data_parallel_weights`.
    let (worst_weight, above) = common::assert_data_parallel_weights(
        &one.join("final/model.safetensors"),
        &outa.join("final/model.safetensors"),
    );
    eprintln!(
        "two nodes over veth ({addr_a} <-> {addr_b}) vs one process: loss rel {worst_train:e}, \
         eval_loss rel {worst_eval:e}, weights max |diff| {worst_weight:e}, \
         {above} above 1e-5; {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
