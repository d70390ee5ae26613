//! `infer --tp N` under `gpt2kit launch` (or torchrun): tensor parallelism across the
//! job's processes. Each rank joins the c10d Gloo group, loads only its shard of every
//! block (`Gpt2::load_split`), and runs the same generation as the others, each
//! sublayer's partial sums gathered over the group (`dist::tp`); every rank decides on
//! the same logits with rank 0's sampling seed, and only rank 0 prints.
use std::sync::Arc;
use std::time::Duration;

use infer::parallel::ProcessSplit;
use infer::Error;
use tch::{Device, Kind, Tensor};

use crate::Placement;

/// This process's part of a launched tensor-parallel job.
pub(crate) struct Launched {
    pub(crate) group: Arc<dist::Group>,
    pub(crate) split: ProcessSplit,
    pub(crate) device: Device,
    pub(crate) kind: Option<Kind>,
}

impl Launched {
    /// True on the rank that prints (rank 0).
    pub(crate) fn prints(&self) -> bool {
        self.group.rank() == 0
    }
}

/// Seeds libtorch's default generators on every rank with one seed drawn on rank 0.
/// Sampling without --seed draws from them: with each rank's own random seed the ranks
/// would pick different tokens and run their shards on different sequences.
fn agree_on_seed(group: &dist::Group) -> anyhow::Result<()> {
    let mut seed = Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu));
    group
        .broadcast(&mut seed, 0)
        .map_err(|e| e.context("receiving rank 0's sampling seed"))?;
    tch::manual_seed(seed.int64_value(&[0]));
    Ok(())
}

fn usage(msg: String) -> anyhow::Error {
    Error::Input(msg).into()
}

/// The job this process is a rank of, joined, when torchrun's variables are set; None
/// for a plain run. `unsupported` names a flag given that a split run does not take.
pub(crate) fn join(
    placement: &Placement,
    unsupported: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Option<Launched>> {
    let Some(launch) = dist::Launch::from_env().map_err(|e| usage(e.to_string()))? else {
        return Ok(None);
    };
    let world = launch.world_size;
    match placement.tp {
        Some(n) if n == world => {}
        Some(n) => {
            return Err(usage(format!(
                "--tp {n} under a launch of {world} processes: give --tp {world} (one shard \
                 per process)"
            )))
        }
        None => {
            return Err(usage(format!(
                "a launched infer runs tensor-parallel across its {world} processes: give \
                 --tp {world}"
            )))
        }
    }
    if !placement.devices.is_empty() {
        return Err(usage(
            "--devices: a launched infer runs one shard per process, on --device (cuda: the \
             device of LOCAL_RANK)"
                .into(),
        ));
    }
    if let Some(flag) = unsupported {
        return Err(usage(format!(
            "{flag} is not run tensor-parallel across processes"
        )));
    }
    let (device, kind) = crate::device_and_dtype(&placement.device, placement.dtype)?;
    let device = launch.device(&placement.device, device);
    let group = Arc::new(dist::Group::join(&launch, dist::Backend::Gloo, timeout)?);
    dist::keep_until_exit(&group);
    agree_on_seed(&group)?;
    let split = dist::tp::GlooCommunicator::split(group.clone());
    Ok(Some(Launched {
        group,
        split,
        device,
        kind,
    }))
}
