//! A run's output folder: one run owns it at a time (a lock file naming the owner),
//! an earlier run's results in it are never replaced silently, and a run deletes only
//! what runs of that folder wrote. As transformers' `run_clm.py`, a folder that is not
//! empty is refused unless the run resumes or is told to overwrite; unlike it, the
//! model, data and checkpoint a run reads are never among what overwriting removes.
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::checkpoint as ckpt;
use crate::folder::TMP_PREFIX;
use crate::options::{input, TrainOptions};
use crate::util::hostname;

/// Where the final model goes inside the output folder.
pub const FINAL_DIR: &str = "final";

/// Before anything is read: leftovers of a killed save removed, the checkpoint to
/// resume from found, and the folder's earlier contents refused, or (overwriting)
/// removed where that spares the run's inputs. Returns the checkpoint to resume from.
pub fn claim(o: &TrainOptions, out: &mut dyn Write) -> Result<Option<PathBuf>> {
    let cleaned = crate::folder::remove_leftovers(&o.output)?;
    if cleaned > 0 {
        let _ = writeln!(
            out,
            "removed {cleaned} unfinished save(s) left in {}",
            o.output.display()
        );
    }
    let resume_dir = crate::resume::resolve(o)?;
    // Data kept inside a checkpoint or final/ would go with rotation or the final save.
    let data: Vec<(&str, &Path)> = o
        .data
        .iter()
        .map(|p| ("--data", p.as_path()))
        .chain(o.eval_data.iter().map(|p| ("--eval-data", p.as_path())))
        .collect();
    let mut replaced = overwritten(&o.output);
    replaced.retain(|d| !d.ends_with("runs"));
    check_inputs_survive(&replaced, &data, "this run may rotate away or replace")?;
    if resume_dir.is_some() {
        return Ok(resume_dir);
    }
    let earlier = earlier_contents(&o.output);
    if !earlier.is_empty() && !o.overwrite_output_dir {
        let shown: Vec<&str> = earlier.iter().take(5).map(String::as_str).collect();
        return Err(input(format!(
            "--output {} is not empty (it holds {}{}); pass --resume to continue from its \
             latest checkpoint, --overwrite-output-dir to replace an earlier run's \
             checkpoints, final/ and runs/, or choose an empty folder",
            o.output.display(),
            shown.join(", "),
            if earlier.len() > 5 { ", ..." } else { "" }
        )));
    }
    if o.overwrite_output_dir {
        // Starting over: the earlier run's checkpoints would otherwise be rotated in
        // with the new ones (and deleted the new ones as "older") or picked by --resume.
        let doomed = overwritten(&o.output);
        let mut inputs = data.clone();
        inputs.push(("--model", o.model.as_path()));
        check_inputs_survive(&doomed, &inputs, "--overwrite-output-dir would remove")?;
        remove_all(&doomed)?;
    }
    Ok(None)
}

/// The lock file inside an output folder.
pub const LOCK_FILE: &str = ".gpt2kit-train.lock";

/// An output folder held by this process until dropped. The lock is an advisory
/// `flock` on `LOCK_FILE`: the kernel releases it when its owner exits, however it
/// exits, so a lock file left by a killed run is recognised as stale and taken over.
/// The file's text names the owner (process, host, start time) for the message a
/// second run gets.
pub struct OutputLock {
    path: PathBuf,
    _file: File,
}

impl OutputLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        // A releasing owner removes the file while still holding it: a file locked
        // after that removal is no longer the one at `path`, so try again.
        for _ in 0..16 {
            // Never through a link: a lock file that is a symbolic link (or a second
            // name of another file) would have its target overwritten below.
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    return Err(not_a_lock_file(&path, "a symbolic link"))
                }
                Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
                    return Err(not_a_lock_file(&path, "a folder"))
                }
                Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
            };
            let meta = file.metadata()?;
            if !meta.is_file() {
                return Err(not_a_lock_file(
                    &path,
                    "something other than a regular file",
                ));
            }
            if meta.nlink() > 1 {
                return Err(not_a_lock_file(&path, "a hard link to another file"));
            }
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let owner = fs::read_to_string(&path).unwrap_or_default();
                    let owner = owner.trim();
                    return Err(input(format!(
                        "--output {} is in use by another training run ({}); wait for it to \
                         finish or choose another --output (lock: {})",
                        dir.display(),
                        if owner.is_empty() {
                            "owner unknown"
                        } else {
                            owner
                        },
                        path.display()
                    )));
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()))
                }
            }
            let held = file.metadata()?;
            let current = fs::metadata(&path).ok();
            if current.is_none_or(|m| (m.dev(), m.ino()) != (held.dev(), held.ino())) {
                continue;
            }
            let owner = format!(
                "process {} on host {}, started at unix time {}",
                std::process::id(),
                hostname(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            );
            (&file)
                .set_len(0)
                .and_then(|()| (&file).write_all(owner.as_bytes()))
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            return Ok(Self { path, _file: file });
        }
        anyhow::bail!("could not take the lock {}", path.display())
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while held; the lock itself goes when the file closes, just after.
        let _ = fs::remove_file(&self.path);
    }
}

fn not_a_lock_file(path: &Path, what: &str) -> anyhow::Error {
    input(format!(
        "{} is {what}, not a lock file this tool wrote; remove it if no run is using the folder",
        path.display()
    ))
}

/// A failed run leaves `final/` as an earlier run wrote it: the error says which step it
/// holds and where the newest checkpoint is, so that it is not taken for this run's.
pub fn explain_stale_final(e: anyhow::Error, output: &Path) -> anyhow::Error {
    let final_dir = output.join(FINAL_DIR);
    let Ok(state) =
        ckpt::read_json::<crate::checkpoint::TrainerState>(&final_dir.join(ckpt::TRAINER_STATE))
    else {
        return e;
    };
    let newest = ckpt::list_checkpoints(output).pop();
    if newest
        .as_ref()
        .is_some_and(|(step, _)| *step <= state.global_step)
    {
        return e;
    }
    e.context(format!(
        "{} was not updated: it still holds the model of step {} from an earlier run{}",
        final_dir.display(),
        state.global_step,
        newest.map_or(String::new(), |(step, dir)| format!(
            "; the newest checkpoint is {} (step {step})",
            dir.display()
        ))
    ))
}

/// What an earlier run left in `output`: everything but the lock file and
/// temporary folders (which `folder::remove_leftovers` owns).
pub fn earlier_contents(output: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(output)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK_FILE && !n.starts_with(TMP_PREFIX))
        .collect();
    names.sort();
    names
}

/// What `--overwrite-output-dir` removes: the earlier runs' checkpoints, `final/`
/// and `runs/`. Other files in the folder are left alone.
pub fn overwritten(output: &Path) -> Vec<PathBuf> {
    let mut doomed: Vec<PathBuf> = fs::read_dir(output)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(ckpt::PREFIX)
                .is_some_and(|s| s.parse::<i64>().is_ok())
        })
        .map(|e| e.path())
        .collect();
    doomed.extend(["final", "runs"].map(|d| output.join(d)));
    doomed.retain(|d| d.exists());
    doomed.sort();
    doomed
}

/// Creates the output folder (and any missing parents), remembering which folders it
/// made, so that a run that fails before writing anything leaves none of them behind.
pub struct CreatedDirs(Vec<PathBuf>);

impl CreatedDirs {
    pub fn create(output: &Path) -> Result<Self> {
        if output.symlink_metadata().is_ok() && !output.exists() {
            return Err(input(format!(
                "--output {} is a symbolic link to nothing",
                output.display()
            )));
        }
        if output.exists() && !output.is_dir() {
            return Err(input(format!(
                "--output {}: exists and is not a folder",
                output.display()
            )));
        }
        let mut missing = Vec::new();
        let mut p = output;
        while p.symlink_metadata().is_err() {
            missing.push(p.to_path_buf());
            match p.parent() {
                Some(q) if !q.as_os_str().is_empty() => p = q,
                _ => break,
            }
        }
        fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
        Ok(Self(missing))
    }

    /// Removes the folders made, deepest first, as long as they are empty: a failed
    /// run keeps the logs and checkpoints it wrote.
    pub fn remove_if_empty(&self) {
        for d in &self.0 {
            if fs::remove_dir(d).is_err() {
                break;
            }
        }
    }
}

/// Refuses, before anything is touched, a run whose own inputs (`(flag, path)`: the
/// model it starts from, its data) lie inside a folder it may remove: one that
/// `--overwrite-output-dir` clears, or that rotation and the final save replace.
pub fn check_inputs_survive(doomed: &[PathBuf], inputs: &[(&str, &Path)], why: &str) -> Result<()> {
    for (flag, path) in inputs {
        let Ok(real) = path.canonicalize() else {
            continue;
        };
        for d in doomed {
            if d.canonicalize().is_ok_and(|d| real.starts_with(d)) {
                return Err(input(format!(
                    "{flag} {} lies inside {}, which {why}; copy it elsewhere first or \
                     choose another --output",
                    path.display(),
                    d.display()
                )));
            }
        }
    }
    Ok(())
}

/// Removes what `overwritten` listed.
pub fn remove_all(doomed: &[PathBuf]) -> Result<()> {
    for d in doomed {
        if d.is_dir() {
            fs::remove_dir_all(d)
        } else {
            fs::remove_file(d)
        }
        .with_context(|| format!("removing {}", d.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_owner_and_a_released_one_is_taken_again() {
        let dir = std::env::temp_dir().join(format!("gpt2kit-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let first = OutputLock::acquire(&dir).unwrap();
        let err = OutputLock::acquire(&dir).err().unwrap().to_string();
        assert!(
            err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert!(!dir.join(LOCK_FILE).exists());
        // A lock file whose owner is gone (no flock held on it) is stale.
        fs::write(dir.join(LOCK_FILE), "process 1 on host elsewhere").unwrap();
        let again = OutputLock::acquire(&dir).unwrap();
        drop(again);
        fs::remove_dir_all(&dir).unwrap();
    }
}
