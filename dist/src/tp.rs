//! Tensor parallelism across processes: the engine's `Communicator` over a process
//! group. Each process holds one shard of every block (`infer`'s `ProcessSplit`); a
//! sublayer's partial outputs are summed over the processes with Gloo, and every rank
//! decides on rank 0's logits.
use std::io::Write;
use std::sync::Arc;

use infer::parallel::{Communicator, ProcessSplit};
use tch::{Device, Tensor};

use crate::Group;

pub struct GlooCommunicator {
    group: Arc<Group>,
}

impl GlooCommunicator {
    /// The split of a model over every rank of `group`, this process's shard its rank's.
    pub fn split(group: Arc<Group>) -> ProcessSplit {
        ProcessSplit {
            rank: group.rank(),
            world: group.world_size(),
            comm: Arc::new(GlooCommunicator { group }),
        }
    }

    /// A collective that failed leaves this rank out of step with the others for good
    /// (the engine's forward has no way back): say why and stop the process, which makes
    /// the launcher stop the job.
    fn fatal(&self, e: anyhow::Error) -> ! {
        let _ = writeln!(std::io::stderr(), "error: tensor-parallel step: {e:#}");
        std::process::exit(1)
    }
}

impl Communicator for GlooCommunicator {
    fn all_reduce(&self, partials: Vec<Tensor>, to: Device) -> Tensor {
        let mut it = partials.into_iter().map(|p| p.to_device(to));
        let first = it.next().expect("at least one shard");
        let local = it.fold(first, |acc, p| acc + p);
        let mut sum = local.to_device(Device::Cpu).contiguous();
        if let Err(e) = self.group.all_reduce_sum(&mut sum) {
            self.fatal(e);
        }
        sum.to_device(to)
    }

    fn agree(&self, logits: Tensor) -> Tensor {
        let device = logits.device();
        let mut l = logits.to_device(Device::Cpu).contiguous();
        if let Err(e) = self.group.broadcast(&mut l, 0) {
            self.fatal(e);
        }
        l.to_device(device)
    }
}
