//! `cargo xtask bench [delta|replay|history|tracer|tree|consistency|daemon|peers]... [--keep]`: DiffKeeper against
//! its peers, each measured in the same run on the same input and reported as
//! ratios (these machines are noisy; only ratios within one run mean much).
//! Every timed command runs [`RUNS`] times; the median time is reported,
//! with the spread, and the highest peak RSS of the runs.
//!
//! - `delta` ([`delta`]): a ~50 MB SQLite database before and after updating
//!   ~1% of its rows, scattered: stored bytes, wall time and peak RSS of a
//!   `snapshot` of the new version, against `bsdiff`, `xdelta3 -9 -e -s` and
//!   `zstd --patch-from` on the same pair. Targets (the issue's): stored
//!   bytes at most xdelta3 -9's and 1.25x bsdiff's, time at most the faster
//!   of those two's, peak RSS at most 64 MiB.
//! - `replay` ([`replay`]): a ~1 GiB state (three 256 MiB files, 6000 small
//!   ones in nested directories, symlinks, assorted modes) with 20 rounds of
//!   edits making 20-deep delta chains, rebuilt into an empty directory,
//!   against `cp -a` of the same tree, both warm in the page cache. Target:
//!   replay at most 1.25x the time of `cp -a`. Also the store ratio
//!   (`stats`: logical bytes over stored bytes) and the store's disk bytes.
//! - `tracer` ([`tracer`]): an app doing 4 KiB pwrite calls into a watched
//!   tree, at full speed and at 100k calls/s, with no agent, with `watch
//!   --backend ebpf` and with `watch --backend inotify`.
//! - `history` ([`history`]): a week of batches over a ~100 MB tree, then
//!   retention: store size before and after, compaction time, restore of
//!   the oldest kept moment against the newest.
//! - `tree` ([`tree`]): single in-place writes in a 100,000-file tree under
//!   `watch`: the batch time and agent CPU with eBPF and inotify (which name
//!   the written file) against the scan backend (whose batches walk the
//!   tree).
//! - `consistency` ([`consistency`]): a SQLite insert loop beside a 100 MB
//!   file rewritten in 1 MiB pieces, never pausing, with no agent and under
//!   `run --consistency auto|freeze|none`: the app's throughput against no
//!   agent, the pauses (p50/p99/max) and torn batches per mode; and the
//!   pause of batches of up to 8 MiB across up to 1,000 files (target: p99
//!   at most 20 ms).
//! - `daemon` ([`daemon`]): 9 small targets on one daemon alone and beside a
//!   target rewriting a 500 MB file (their capture latency p50/p99, and the
//!   ratio); 50 targets plus a heavy writer on one daemon against 50 `watch`
//!   processes (latency, CPU, peak RSS; target: RSS at most 50 MiB + 1 MiB
//!   per target).
//!
//! - `peers` ([`peers`]): the store against restic, borg and casync
//!   repositories on the same histories (a game world, SQLite, an ML
//!   checkpoint, 50,000 small files, Debian's Python packages): sizes,
//!   round times, restores of the latest and oldest state against `cp -a`
//!   (issue 12's targets). `BENCH_PEERS=small,python` picks workloads.
//!
//! With no name, all run. Missing peers (`sqlite3`, `bsdiff`, `xdelta3`,
//! `zstd`, GNU `time`) are installed with apt-get. Work files live in a
//! temporary directory under `<target>/bench/` (the cargo target directory:
//! a real disk, unlike a tmpfs `/tmp`; sources and destinations share it),
//! removed at the end unless `--keep` is given. Data is seeded
//! pseudo-random, so runs are comparable. A summary block closes the output
//! and every number goes to `<target>/bench/results.json`. A missed target
//! is reported, not an error: the command fails only when something cannot
//! be run or a result is wrong (a replay that does not reproduce its input).

mod consistency;
mod daemon;
mod delta;
mod history;
mod measure;
mod peers;
mod replay;
pub mod tracer;
mod tree;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Timed runs per measurement; the median is reported.
pub(crate) const RUNS: usize = 3;

/// The benchmarks, in the order they run.
const BENCHMARKS: [&str; 8] = [
    "delta",
    "replay",
    "history",
    "tracer",
    "tree",
    "consistency",
    "daemon",
    "peers",
];

/// What every benchmark gets: the binary under test and a work directory.
pub(crate) struct Bench {
    /// The release `diffkeeper` binary.
    pub bin: PathBuf,
    /// This benchmark's own empty directory on a disk file system.
    pub work: PathBuf,
}

impl Bench {
    /// A `diffkeeper` command with these arguments.
    pub fn diffkeeper(&self) -> Command {
        Command::new(&self.bin)
    }
}

/// One benchmark's outcome: its numbers, and its lines for the summary.
pub(crate) struct Outcome {
    pub json: Value,
    pub summary: Vec<String>,
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let started = Instant::now();
    let mut keep = false;
    let mut which: Vec<&str> = Vec::new();
    for arg in args {
        match arg.as_str() {
            "--keep" => keep = true,
            name if BENCHMARKS.contains(&name) => {
                if !which.contains(&name) {
                    which.push(name);
                }
            }
            other => bail!(
                "unknown benchmark {other:?}: choose among {} (or none for all), optionally with --keep",
                BENCHMARKS.join(", ")
            ),
        }
    }
    if which.is_empty() {
        which = BENCHMARKS.to_vec();
    }
    // Run in the fixed order whatever order they were named in.
    which.sort_by_key(|name| BENCHMARKS.iter().position(|b| b == name));

    install_peers(&which)?;
    let target = target_dir(root);
    let bin = target.join("release").join("diffkeeper");
    if !bin.is_file() {
        bail!(
            "{} is missing: `cargo build --release -p diffkeeper` should have made it",
            bin.display()
        );
    }
    let bench_dir = target.join("bench");
    fs::create_dir_all(&bench_dir)
        .with_context(|| format!("cannot create {}", bench_dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix("work-")
        .tempdir_in(&bench_dir)
        .with_context(|| format!("cannot create a work directory in {}", bench_dir.display()))?;
    let fs_type = measure::fs_type(work.path())?;
    let load_before = load_average();
    println!(
        "bench: {} with {}; work files in {} ({fs_type}); {RUNS} runs per timing, median reported; load average {load_before}",
        which.join(", "),
        bin.display(),
        work.path().display()
    );
    if fs_type == "tmpfs" || fs_type == "ramfs" {
        println!(
            "bench: warning: {} is on {fs_type}, not a disk: times will not be representative",
            work.path().display()
        );
    }

    let mut results = serde_json::Map::new();
    let mut summary = Vec::new();
    for name in &which {
        let dir = work.path().join(name);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let bench = Bench {
            bin: bin.clone(),
            work: dir,
        };
        let bench_started = Instant::now();
        let outcome = match *name {
            "delta" => delta::run(&bench),
            "replay" => replay::run(&bench),
            "history" => history::run(&bench),
            "tree" => tree::run(&bench),
            "consistency" => consistency::run(&bench),
            "daemon" => daemon::run(&bench),
            "peers" => peers::run(&bench),
            _ => tracer::run(&bench),
        }
        .with_context(|| format!("benchmark {name} failed"))?;
        let mut json = outcome.json;
        if let Value::Object(map) = &mut json {
            map.insert(
                "bench_secs".into(),
                json!(bench_started.elapsed().as_secs_f64()),
            );
        }
        results.insert((*name).into(), json);
        summary.extend(outcome.summary);
        // Free the space before the next benchmark.
        if !keep {
            let dir = work.path().join(name);
            fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }

    let total = started.elapsed().as_secs_f64();
    let load_after = load_average();
    let mut env = environment(root, &fs_type, total);
    env["load_average_before"] = json!(load_before);
    env["load_average_after"] = json!(load_after);
    results.insert("environment".into(), env);
    let out = bench_dir.join("results.json");
    let text = serde_json::to_string_pretty(&Value::Object(results))?;
    fs::write(&out, text + "\n").with_context(|| format!("cannot write {}", out.display()))?;

    println!("\n==================== summary ====================");
    for line in &summary {
        println!("{line}");
    }
    println!(
        "total {:.0} s ({}); load average (1, 5, 15 min) {load_before} before, {load_after} after (other work on this machine makes times noisy)",
        total,
        measure::minutes(total),
    );
    println!("all numbers in {}", out.display());
    if keep {
        let kept = work.keep();
        println!("work files kept in {}", kept.display());
    }
    Ok(())
}

/// The cargo target directory (`cargo metadata`, so `CARGO_TARGET_DIR` and
/// `build.target-dir` are honoured), else what `crate::diffkeeper_binary`
/// assumes.
fn target_dir(root: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let from_metadata = Command::new(cargo)
        .current_dir(root)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| serde_json::from_slice::<Value>(&out.stdout).ok())
        .and_then(|meta| meta["target_directory"].as_str().map(PathBuf::from));
    from_metadata.unwrap_or_else(|| {
        // `<target>/release/diffkeeper`, three levels up.
        let bin = crate::diffkeeper_binary();
        bin.ancestors()
            .nth(2)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| root.join("target"))
    })
}

/// Installs the Debian packages the chosen benchmarks need and lack; runs
/// `apt-get update` only when installing fails without it.
fn install_peers(which: &[&str]) -> Result<()> {
    let mut needed = vec![("/usr/bin/time", "time")];
    if which.contains(&"consistency") {
        needed.push(("sqlite3", "sqlite3"));
    }
    if which.contains(&"peers") {
        needed.extend([
            ("sqlite3", "sqlite3"),
            ("restic", "restic"),
            ("borg", "borgbackup"),
            ("casync", "casync"),
        ]);
    }
    if which.contains(&"delta") {
        needed.extend([
            ("sqlite3", "sqlite3"),
            ("bsdiff", "bsdiff"),
            ("xdelta3", "xdelta3"),
            ("zstd", "zstd"),
        ]);
    }
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(command, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {command}")])
                .output()
                .is_ok_and(|out| out.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("bench: installing {}", missing.join(" "));
    let install = || {
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .status()
            .context("cannot run apt-get (the bench installs its peers on Debian)")
    };
    if install()?.success() {
        return Ok(());
    }
    println!("bench: apt-get install failed; updating the package lists and retrying");
    crate::checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-qq"]),
    )?;
    if !install()?.success() {
        bail!("cannot install {}", missing.join(" "));
    }
    Ok(())
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Where and on what the numbers were taken.
fn environment(root: &Path, fs_type: &str, total_secs: f64) -> Value {
    let line = |program: &str, args: &[&str]| -> Option<String> {
        Command::new(program)
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .map(|l| l.trim().to_string())
            })
    };
    json!({
        "total_secs": total_secs,
        "runs_per_timing": RUNS,
        "git_commit": line("git", &["rev-parse", "HEAD"]),
        "git_dirty": line("git", &["status", "--porcelain"]).is_some(),
        "kernel": line("uname", &["-r"]),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "work_fs_type": fs_type,
        "sqlite3": line("sqlite3", &["--version"]),
        "xdelta3": line("sh", &["-c", "xdelta3 -V 2>&1"]),
        "zstd": line("zstd", &["--version"]),
        "restic": line("restic", &["version"]),
        "borg": line("borg", &["--version"]),
        "casync": line("casync", &["--version"]),
    })
}
