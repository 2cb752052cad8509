//! `bizq bench`: throughput and latency figures (see README).
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {}

pub async fn run(_url: &str, _args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
