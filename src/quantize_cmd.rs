//! `gpt2kit quantize` and `gpt2kit dequantize`: int8 artifacts and pruning.
use clap::Args as ClapArgs;

use crate::Out;

#[derive(ClapArgs)]
pub struct Args {}

#[derive(ClapArgs)]
pub struct DequantizeArgs {}

pub fn run(_args: &Args, _out: &mut Out) -> anyhow::Result<()> {
    anyhow::bail!("`gpt2kit quantize` is not built yet")
}

pub fn run_dequantize(_args: &DequantizeArgs, _out: &mut Out) -> anyhow::Result<()> {
    anyhow::bail!("`gpt2kit dequantize` is not built yet")
}
