//! Benchmarks (`cargo xtask bench`).

use std::path::Path;

use anyhow::Result;

pub fn run(_root: &Path, _args: &[String]) -> Result<()> {
    println!("no benchmarks yet");
    Ok(())
}
