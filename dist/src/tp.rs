//! Tensor parallelism across processes: the engine's `Communicator` over a process
//! group. Each process holds one shard of every block (`infer`'s `ProcessSplit`); a
//! sublayer's partial outputs are gathered over the processes with Gloo and added in
//! rank order. A float head runs vocab-parallel (each rank its slice of the logits,
//! gathered into the whole on every rank); any other head runs whole on each rank and
//! every rank takes rank 0's logits, so that all ranks decide alike.
use std::io::Write;
use std::sync::Arc;

use infer::parallel::{sum_in_order, Communicator, ProcessSplit};
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
    /// The ranks' partials gathered and added in rank order on every rank: the same
    /// sum everywhere, in the order the in-process `CopyCommunicator` adds its shards.
    /// (An all-gather of these small activations is ~3x faster than Gloo's ring
    /// all-reduce over loopback: `bench/tp_processes.sh`.)
    fn all_reduce(&self, partials: Vec<Tensor>, to: Device) -> Tensor {
        let all = self.all_gather(sum_in_order(partials, to));
        sum_in_order((0..self.group.world_size() as i64).map(|r| all.get(r)), to)
    }

    fn all_gather(&self, t: Tensor) -> Tensor {
        let device = t.device();
        match self.group.all_gather(&t.to_device(Device::Cpu)) {
            Ok(all) => all.to_device(device),
            Err(e) => self.fatal(e),
        }
    }

    fn vocab_shard(&self) -> Option<(usize, usize)> {
        Some((self.group.rank(), self.group.world_size()))
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
