//! The consistency benchmark: what consistent cuts cost the app. A mixed
//! workload that never pauses (a SQLite insert loop, one row per
//! transaction, beside a 100 MB file rewritten in 1 MiB pieces) runs for
//! [`SECS`] seconds with no agent, then under `diffkeeper run --backend
//! ebpf` with `--consistency auto`, `freeze` and `none`, in one run.
//! Compared: the app's rows and pieces per second against no agent, and
//! per mode the pauses (p50, p99, max of the frozen batches, from `log
//! --batches --json`) and the batches taken torn. A second workload checks
//! the pause budget: 1,000 files of 8 KiB rewritten in place without
//! pause under `--consistency freeze`, so each batch changes up to 8 MiB
//! across up to 1,000 files (target: p99 pause at most 20 ms); and the
//! mixed workload's pauses are set against reading the changed bytes at
//! page-cache speed, measured in the same run.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::measure::{output, root_arg, verdict, Noise};
use super::{Bench, Outcome};

/// How long each mode runs the mixed workload.
const SECS: u64 = 12;
/// How long the pause-budget workload runs.
const BUDGET_SECS: u64 = 12;
const BIG_MIB: usize = 100;
const SMALL_FILES: usize = 1000;
const SMALL_BYTES: usize = 8192;
const MODES: [&str; 3] = ["auto", "freeze", "none"];
const SEED: u64 = 0xc07;
/// The pause budget for a batch of up to 8 MiB across up to 1,000 files.
const BUDGET_MS: f64 = 20.0;

/// The mixed workload, run by `sh` in the state directory; `$1` is the
/// directory for its counters (outside the tree).
const MIXED: &str = "(yes 'INSERT INTO t(v) VALUES(randomblob(200));' | sqlite3 app.db) & \
     i=0; while :; do i=$(((i + 37) % 100)); \
     dd if=\"$1/piece\" of=big bs=1M count=1 seek=$i conv=notrunc status=none; \
     echo >> \"$1/pieces\"; done";

/// The pause-budget workload: 8 KiB files rewritten in place.
const SMALL: &str = "i=0; while :; do i=$(((i + 7919) % 1000)); \
     dd if=\"$1/piece8k\" of=f$i bs=8k count=1 conv=notrunc status=none; done";

/// Kills a process group if the benchmark stops early.
struct Group(Child);

impl Group {
    fn signal(&self, signal: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, signal);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal(rustix::process::Signal::KILL);
        let _ = self.0.wait();
    }
}

/// What one run of the mixed workload did.
struct Mixed {
    rows: u64,
    pieces: u64,
    batches: Vec<Value>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

/// Pauses of the frozen (or over-budget torn) batches, in ms, sorted.
fn pauses(batches: &[Value]) -> Vec<f64> {
    let mut out: Vec<f64> = batches
        .iter()
        .filter_map(|b| b["pause_us"].as_u64())
        .map(|us| us as f64 / 1000.0)
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

fn torn(batches: &[Value]) -> usize {
    batches
        .iter()
        .filter(|b| b["consistency"] == "torn")
        .count()
}

pub fn run(bench: &Bench) -> Result<Outcome> {
    println!(
        "\n== consistency: a SQLite insert loop beside a {BIG_MIB} MB file rewritten in 1 MiB pieces, {SECS} s each with no agent and with --consistency auto, freeze, none"
    );
    let mut noise = Noise::new(SEED);
    let template = bench.work.join("template");
    fs::create_dir_all(&template)?;
    let mut big = Vec::new();
    noise.fill(&mut big, BIG_MIB << 20, super::measure::Kind::Binary);
    fs::write(template.join("big"), &big)?;
    let counters = bench.work.join("counters");
    fs::create_dir_all(&counters)?;
    fs::write(counters.join("piece"), &big[..1 << 20])?;
    fs::write(counters.join("piece8k"), &big[..SMALL_BYTES])?;
    drop(big);
    output(
        Command::new("sqlite3")
            .arg(template.join("app.db"))
            .arg("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);"),
    )?;
    // Reading the big file warm: what the frozen copy is set against.
    let read_started = Instant::now();
    let read = fs::read(template.join("big"))?.len();
    let page_cache_mib_s = read as f64 / (1 << 20) as f64 / read_started.elapsed().as_secs_f64();

    let baseline = mixed(bench, None, &template, &counters)?;
    let base_rows = baseline.rows as f64 / SECS as f64;
    let base_pieces = baseline.pieces as f64 / SECS as f64;
    println!(
        "no agent: {:.0} rows/s, {:.1} MiB/s rewritten",
        base_rows, base_pieces
    );
    let mut modes = Vec::new();
    let mut summary = Vec::new();
    for mode in MODES {
        let m = mixed(bench, Some(mode), &template, &counters)?;
        let rows = m.rows as f64 / SECS as f64 / base_rows;
        let pieces = m.pieces as f64 / SECS as f64 / base_pieces;
        let p = pauses(&m.batches);
        let line = format!(
            "{mode:<6}: app at {rows:.3}x rows/s and {pieces:.3}x MiB/s of no agent; {} batches, {} frozen, {} torn; pause p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            m.batches.len(),
            p.len(),
            torn(&m.batches),
            percentile(&p, 0.5),
            percentile(&p, 0.99),
            p.last().copied().unwrap_or(f64::NAN),
        );
        println!("{line}");
        summary.push(format!("consistency {line}"));
        modes.push(json!({
            "mode": mode,
            "rows_per_sec_ratio": rows,
            "mib_per_sec_ratio": pieces,
            "batches": m.batches.len(),
            "frozen": p.len(),
            "torn": torn(&m.batches),
            "pause_ms_p50": percentile(&p, 0.5),
            "pause_ms_p99": percentile(&p, 0.99),
            "pause_ms_max": p.last(),
        }));
    }
    // The mixed workload's frozen reads copy the whole big file (every
    // piece of it changes between batches): its pause against reading it.
    let big_read_ms = BIG_MIB as f64 / page_cache_mib_s * 1e3;
    println!(
        "reading the {BIG_MIB} MB file warm: {big_read_ms:.1} ms ({page_cache_mib_s:.0} MiB/s)"
    );

    let budget = pause_budget(bench, &counters)?;
    let budget_p99 = percentile(&budget.0, 0.99);
    let line = format!(
        "pause budget, {} batches of up to {} files / {} KiB each (median {} files): p99 {budget_p99:.1} ms, max {:.1} ms (target <= {BUDGET_MS} ms: {})",
        budget.0.len(),
        SMALL_FILES,
        SMALL_FILES * SMALL_BYTES / 1024,
        budget.1,
        budget.0.last().copied().unwrap_or(f64::NAN),
        verdict(budget_p99 <= BUDGET_MS),
    );
    println!("{line}");
    summary.push(format!("consistency {line}"));
    summary.push(format!(
        "consistency mixed workload: frozen copy of ~{BIG_MIB} MB vs reading it warm {big_read_ms:.1} ms"
    ));
    Ok(Outcome {
        json: json!({
            "secs_per_mode": SECS,
            "no_agent_rows_per_sec": base_rows,
            "no_agent_mib_per_sec": base_pieces,
            "modes": modes,
            "page_cache_read_mib_per_sec": page_cache_mib_s,
            "big_file_read_ms": big_read_ms,
            "budget_pause_ms": budget.0,
            "budget_median_files": budget.1,
            "budget_pause_ms_p99": budget_p99,
            "budget_target_ms": BUDGET_MS,
        }),
        summary,
    })
}

/// Runs the mixed workload for [`SECS`], under `diffkeeper run` with
/// `mode` or with no agent, on a fresh copy of `template`.
fn mixed(bench: &Bench, mode: Option<&str>, template: &Path, counters: &Path) -> Result<Mixed> {
    let name = mode.unwrap_or("none-agent");
    let state = bench.work.join(format!("state-{name}"));
    output(Command::new("cp").arg("-a").arg(template).arg(&state))?;
    let _ = fs::remove_file(counters.join("pieces"));
    let store = bench.work.join(format!("{name}.dk"));
    let group = start(bench, mode, &state, &store, MIXED, counters, &[])?;
    std::thread::sleep(Duration::from_secs(SECS));
    stop(group, mode.is_some())?;
    let rows: u64 = output(
        Command::new("sqlite3")
            .arg(state.join("app.db"))
            .arg("SELECT count(*) FROM t;"),
    )?
    .trim()
    .parse()
    .context("row count")?;
    let pieces = fs::read(counters.join("pieces")).map(|p| p.len() as u64)?;
    let batches = match mode {
        Some(_) => timeline(bench, &store)?,
        None => Vec::new(),
    };
    fs::remove_dir_all(&state)?;
    Ok(Mixed {
        rows,
        pieces,
        batches,
    })
}

/// The pause-budget workload under `--consistency freeze`: the pauses of
/// its batches (ms, sorted) and the median files per batch.
fn pause_budget(bench: &Bench, counters: &Path) -> Result<(Vec<f64>, u64)> {
    let state = bench.work.join("small");
    fs::create_dir_all(&state)?;
    let piece = fs::read(counters.join("piece8k"))?;
    for i in 0..SMALL_FILES {
        fs::write(state.join(format!("f{i}")), &piece)?;
    }
    let store = bench.work.join("small.dk");
    let group = start(
        bench,
        Some("freeze"),
        &state,
        &store,
        SMALL,
        counters,
        &["--max-latency", "1s"],
    )?;
    std::thread::sleep(Duration::from_secs(BUDGET_SECS));
    stop(group, true)?;
    // The start-up batch takes every file at once, before the app runs.
    let batches: Vec<Value> = timeline(bench, &store)?.into_iter().skip(1).collect();
    let mut files: Vec<u64> = batches
        .iter()
        .filter_map(|b| b["files_changed"].as_u64())
        .collect();
    files.sort_unstable();
    let median_files = files.get(files.len() / 2).copied().unwrap_or(0);
    if batches.is_empty() {
        bail!("the pause-budget workload committed no batch");
    }
    Ok((pauses(&batches), median_files))
}

fn start(
    bench: &Bench,
    mode: Option<&str>,
    state: &Path,
    store: &Path,
    script: &str,
    counters: &Path,
    extra: &[&str],
) -> Result<Group> {
    use std::os::unix::process::CommandExt;
    let mut command = match mode {
        Some(mode) => {
            let mut c = bench.diffkeeper();
            c.args(["run", "--backend", "ebpf", "--consistency", mode])
                .args(extra)
                .arg("--state-dir")
                .arg(root_arg("data", state))
                .arg("--store")
                .arg(store)
                .arg("--");
            c
        }
        None => Command::new("env"),
    };
    let log = bench.work.join(format!(
        "{}.log",
        store.file_stem().and_then(|s| s.to_str()).unwrap_or("run")
    ));
    command
        .args(["sh", "-c", script, "sh"])
        .arg(counters)
        .current_dir(state)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .process_group(0);
    Ok(Group(command.spawn().context("cannot start the workload")?))
}

/// Ends a run: SIGTERM to `diffkeeper run` (it ends the app and captures
/// once more), or SIGKILL to the bare workload's process group.
fn stop(mut group: Group, agent: bool) -> Result<()> {
    if !agent {
        group.signal(rustix::process::Signal::KILL);
        group.0.wait()?;
        return Ok(());
    }
    if let Some(pid) = rustix::process::Pid::from_raw(group.0.id() as i32) {
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while group.0.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("diffkeeper run did not stop within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn timeline(bench: &Bench, store: &Path) -> Result<Vec<Value>> {
    let text = output(
        bench
            .diffkeeper()
            .args(["log", "--batches", "--json", "--store"])
            .arg(store),
    )?;
    serde_json::from_str(&text).context("log --batches --json")
}
