//! The order of the training examples: a seeded shuffle per epoch, cut into the
//! micro-batches of each step. The data position in a checkpoint is an index into it.
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::checkpoint::TrainerState;
use crate::options::TrainOptions;

/// The micro-batches of the next step: up to --gradient-accumulation-steps of them, not
/// crossing the epoch's end (the next epoch's order is drawn there).
pub(crate) fn next_batches(
    o: &TrainOptions,
    state: &mut TrainerState,
    order: &mut Vec<usize>,
    batches_per_epoch: i64,
) -> Vec<Vec<usize>> {
    let n = order.len();
    let bs = o.batch_size as usize;
    let mut batches = Vec::new();
    while (batches.len() as i64) < o.gradient_accumulation_steps {
        let b = state.data_batch as usize;
        batches.push(order[b * bs..((b + 1) * bs).min(n)].to_vec());
        state.data_batch += 1;
        if state.data_batch >= batches_per_epoch {
            state.data_epoch += 1;
            state.data_batch = 0;
            *order = epoch_order(n, o.seed, state.data_epoch);
            break;
        }
    }
    batches
}

/// Micro-batches per epoch and the order of examples in `epoch`.
pub(crate) fn epoch_order(n: usize, seed: u64, epoch: i64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mix = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix));
    order
}
