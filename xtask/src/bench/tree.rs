//! The tree benchmark: what a batch costs in a large tree when the app
//! writes in place. A tree of [`FILES`] small files in [`DIRS`]
//! directories; `watch` runs with the eBPF tracer, with inotify and with
//! the scan backend (at its default interval), and each time [`WRITES`]
//! files are overwritten in place one at a time, each waiting for its
//! batch. Compared: the batches' own times (from the watch log) and the
//! agent's CPU time per write. eBPF and inotify name the written file, so
//! their batches look at it alone; the scan backend's batches walk the
//! tree, as every batch did before and as a create or rename still makes
//! them.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::measure::{cpu_secs, grouped, output, root_arg, Noise};
use super::{Bench, Outcome};

const FILES: usize = 100_000;
const DIRS: usize = 100;
const WRITES: usize = 9;
const SEED: u64 = 0x7ee5;
const BACKENDS: [&str; 3] = ["ebpf", "inotify", "scan"];

/// One backend's batches.
struct Batches {
    /// Each batch's own time, as the watch log reports it.
    secs: Vec<f64>,
    /// Paths each batch looked at.
    scanned: Vec<u64>,
    /// The agent's CPU time from after its start-up capture to the end of
    /// the last batch.
    cpu_secs: f64,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(bench: &Bench) -> Result<Outcome> {
    println!(
        "\n== tree: one file written in place at a time in a {}-file tree, batch cost with eBPF and inotify vs a walk",
        grouped(FILES as u64)
    );
    let state = bench.work.join("state");
    let started = Instant::now();
    let files = make_tree(&state)?;
    // Older than the racy window, so no capture reads them again.
    std::thread::sleep(Duration::from_millis(2100));
    let store = bench.work.join("store.dk");
    output(
        bench
            .diffkeeper()
            .args(["snapshot", "--state-dir"])
            .arg(root_arg("data", &state))
            .arg("--store")
            .arg(&store),
    )?;
    println!(
        "tree: {} files in {DIRS} directories, made and stored in {:.1} s",
        grouped(FILES as u64),
        started.elapsed().as_secs_f64()
    );
    let mut noise = Noise::new(SEED);
    let mut results = Vec::new();
    for backend in BACKENDS {
        let batches = watch_writes(bench, backend, &state, &store, &files, &mut noise)?;
        println!(
            "{backend:<7}: batch {:.1} ms median ({:.1}-{:.1}), looking at {} paths; agent CPU {:.1} ms per write",
            median(&batches.secs) * 1e3,
            batches.secs.iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
            batches.secs.iter().copied().fold(0.0, f64::max) * 1e3,
            grouped(median(&batches.scanned.iter().map(|&n| n as f64).collect::<Vec<_>>()) as u64),
            batches.cpu_secs / WRITES as f64 * 1e3,
        );
        results.push((backend, batches));
    }
    let walk = &results[2].1;
    let ratio = |b: &Batches| {
        (
            median(&b.secs) / median(&walk.secs),
            b.cpu_secs / walk.cpu_secs,
        )
    };
    let mut summary = Vec::new();
    for (name, batches) in &results[..2] {
        let (batch_ratio, cpu_ratio) = ratio(batches);
        println!("{name} / scan: batch time {batch_ratio:.4}x, agent CPU {cpu_ratio:.4}x");
        summary.push(format!(
            "tree    {} files, one written in place: batch {:.1} ms with {name} vs {:.0} ms walking = {batch_ratio:.4}x; agent CPU {cpu_ratio:.4}x",
            grouped(FILES as u64),
            median(&batches.secs) * 1e3,
            median(&walk.secs) * 1e3,
        ));
    }
    Ok(Outcome {
        json: json!({
            "files": FILES,
            "writes": WRITES,
            "backends": results.iter().map(|(name, b)| json!({
                "backend": name,
                "batch_secs": b.secs,
                "scanned": b.scanned,
                "cpu_secs": b.cpu_secs,
                "batch_ratio_to_scan": ratio(b).0,
                "cpu_ratio_to_scan": ratio(b).1,
            })).collect::<Vec<_>>(),
        }),
        summary,
    })
}

fn make_tree(state: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::with_capacity(FILES);
    for d in 0..DIRS {
        let dir = state.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for f in 0..FILES / DIRS {
            let path = dir.join(format!("f{f:04}.dat"));
            fs::write(&path, format!("record {d}/{f}\n").repeat(8))
                .with_context(|| format!("cannot write {}", path.display()))?;
            files.push(path);
        }
    }
    Ok(files)
}

/// Kills the agent if the benchmark stops early.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn watch_writes(
    bench: &Bench,
    backend: &str,
    state: &Path,
    store: &Path,
    files: &[PathBuf],
    noise: &mut Noise,
) -> Result<Batches> {
    let log = bench.work.join(format!("watch-{backend}.log"));
    let mut agent = Agent(
        bench
            .diffkeeper()
            .args([
                "watch",
                "--backend",
                backend,
                "--debounce",
                "100ms",
                "--state-dir",
            ])
            .arg(root_arg("data", state))
            .arg("--store")
            .arg(store)
            .stderr(
                fs::File::create(&log)
                    .with_context(|| format!("cannot create {}", log.display()))?,
            )
            .spawn()
            .context("cannot start watch")?,
    );
    let read_log = || fs::read_to_string(&log).unwrap_or_default();
    wait_until(&log, "the start-up capture", || {
        read_log().contains("start-up capture")
    })?;
    let pid = agent.0.id();
    let cpu_before = cpu_secs(pid)?;
    let batch_lines = || -> Vec<String> {
        read_log()
            .lines()
            .filter(|l| l.contains(" batch ") && l.contains(" scanned"))
            .map(String::from)
            .collect()
    };
    for i in 0..WRITES {
        let path = &files[noise.below(files.len() as u64) as usize];
        let file = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.write_all_at(format!("write {i:05}").as_bytes(), 0)
            .with_context(|| format!("cannot write {}", path.display()))?;
        drop(file);
        wait_until(&log, "a batch", || batch_lines().len() > i)?;
    }
    let cpu_secs = cpu_secs(pid)? - cpu_before;
    let lines = batch_lines();
    if lines.len() != WRITES {
        bail!(
            "{backend}: {} batches for {WRITES} writes:\n{}",
            lines.len(),
            lines.join("\n")
        );
    }
    crate::checked(Command::new("kill").args(["-TERM", &pid.to_string()]))?;
    let status = agent.0.wait().context("cannot wait for watch")?;
    if !status.success() {
        bail!(
            "watch --backend {backend} failed ({status}):\n{}",
            read_log()
        );
    }
    let mut batches = Batches {
        secs: Vec::new(),
        scanned: Vec::new(),
        cpu_secs,
    };
    for line in &lines {
        let (scanned, secs) =
            parse_batch(line).with_context(|| format!("cannot read the batch line {line:?}"))?;
        batches.scanned.push(scanned);
        batches.secs.push(secs);
    }
    Ok(batches)
}

fn wait_until(log: &Path, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for {what}; log:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// "... of N scanned; ... in 4.70ms ...": the paths looked at and the time.
fn parse_batch(line: &str) -> Option<(u64, f64)> {
    let scanned = line
        .split(" scanned")
        .next()?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()?;
    let took = line.split(" stored in ").nth(1)?.split([' ', ';']).next()?;
    let split = took.find(|c: char| c.is_alphabetic() || c == 'µ')?;
    let (number, unit) = took.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "ns" => 1e-9,
        "µs" | "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => return None,
    };
    Some((scanned, number * scale))
}

#[cfg(test)]
mod tests {
    use super::parse_batch;

    #[test]
    fn batch_lines_parse() {
        let line = "2026-11-25T00:30:53.002526Z  INFO batch 2: 0 new, 1 changed, 0 deleted of 1 scanned; 4 B logical, 4 B stored in 4.70ms root=d";
        assert_eq!(parse_batch(line), Some((1, 0.0047)));
        let line = "INFO batch 9: 0 new, 1 changed, 0 deleted of 100100 scanned; 2 B logical, 2 B stored in 1.05s; 3 re-read and unchanged root=data";
        assert_eq!(parse_batch(line), Some((100_100, 1.05)));
        assert_eq!(parse_batch("INFO batch 3: 812.30µs"), None);
    }
}
