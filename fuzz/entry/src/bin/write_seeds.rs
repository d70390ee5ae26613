//! `write_seeds DIR`: the seed corpus of every target into `DIR/TARGET/seed-N`
//! (`make fuzz` runs it before the fuzzers).
fn main() {
    let Some(dir) = std::env::args_os().nth(1).map(std::path::PathBuf::from) else {
        eprintln!("usage: write_seeds DIR");
        std::process::exit(2);
    };
    let mut n = std::collections::BTreeMap::<&str, usize>::new();
    for (target, bytes) in fuzz_entry::seeds::seeds() {
        let i = n.entry(target).or_default();
        let sub = dir.join(target);
        if let Err(e) = std::fs::create_dir_all(&sub)
            .and_then(|()| std::fs::write(sub.join(format!("seed-{i}")), &bytes))
        {
            eprintln!("error: {}: {e}", sub.display());
            std::process::exit(1);
        }
        *i += 1;
    }
    for (target, count) in n {
        println!("{target}: {count} seeds");
    }
}
