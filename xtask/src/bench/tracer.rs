//! The tracer benchmark: an app (`cargo xtask bench-writer`, [`writer`])
//! doing 4 KiB pwrite calls into a watched tree, at full speed and at a fixed
//! 100k calls/s, with no agent, with `watch --backend ebpf` and with `watch
//! --backend inotify`: the app's throughput against no agent, notices per
//! write, the agent's CPU time and peak RSS. Conditions alternate, [`RUNS`]
//! times each; medians are reported.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::measure::{fresh_dir, json_of, output, verdict};
use super::{Bench, Outcome, RUNS};

/// How long the writer writes, and how long the agent gets to start.
const WRITE_SECS: f64 = 3.0;
const AGENT_START: Duration = Duration::from_millis(1500);
/// The target at the fixed rate: the app keeps this share of its
/// rate under the eBPF agent.
const MIN_EBPF_RATIO: f64 = 0.97;

/// The tracer benchmark's writer: see `cargo xtask bench-writer`.
pub fn writer(dir: &Path, files: usize, rate: u64, seconds: f64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let handles: Vec<fs::File> = (0..files.max(1))
        .map(|i| {
            let path = dir.join(format!("data-{i}.bin"));
            fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))
        })
        .collect::<Result<_>>()?;
    let block = [0x42u8; 4096];
    let started = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut calls: u64 = 0;
    while started.elapsed() < limit {
        // 256 calls between clock reads keeps the clock off the profile.
        for _ in 0..256 {
            let file = &handles[(calls % handles.len() as u64) as usize];
            file.write_all_at(&block, (calls % 1024) * 4096)
                .context("pwrite failed")?;
            calls += 1;
        }
        if rate > 0 {
            let due = Duration::from_secs_f64(calls as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({ "calls": calls, "secs": secs, "rate": calls as f64 / secs })
    );
    Ok(())
}

/// One run: the writer's reach, and the agent's cost.
#[derive(Clone, Copy, Debug, Default)]
struct TracerRun {
    rate: f64,
    calls: u64,
    agent_cpu_secs: f64,
    agent_rss_kib: u64,
    notices: u64,
}

/// The median of `values` (the upper one for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The pid of the only child of `pid`.
fn child_of(pid: u32) -> Result<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("process {pid} has no child"))
}

fn tracer_run(bench: &Bench, backend: Option<&str>, rate: u64) -> Result<TracerRun> {
    let work = &bench.work;
    let state = work.join("state");
    fresh_dir(&state)?;
    let store = work.join("store.dk");
    if store.exists() {
        fs::remove_file(&store).with_context(|| format!("cannot remove {}", store.display()))?;
    }
    let stats = work.join("agent.time");
    let log = work.join("agent.log");
    let mut agent = match backend {
        None => None,
        Some(backend) => {
            let mut root = std::ffi::OsString::from("data=");
            root.push(&state);
            let child = Command::new("/usr/bin/time")
                .args(["-f", "%U %S %M", "-o"])
                .arg(&stats)
                .arg(&bench.bin)
                .args(["watch", "--backend", backend, "--state-dir"])
                .arg(root)
                .arg("--store")
                .arg(&store)
                .stderr(
                    fs::File::create(&log)
                        .with_context(|| format!("cannot create {}", log.display()))?,
                )
                .spawn()
                .context("cannot start the agent")?;
            // Let it attach and take its first look.
            std::thread::sleep(AGENT_START);
            Some(child)
        }
    };
    let current_exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let report = output(
        Command::new(current_exe)
            .arg("bench-writer")
            .arg(&state)
            .args(["--rate", &rate.to_string()])
            .args(["--seconds", &WRITE_SECS.to_string()]),
    );
    let mut run = TracerRun::default();
    if let Some(agent) = agent.as_mut() {
        // The agent is GNU time's child: stop it, and time reports.
        let stopped = child_of(agent.id())
            .and_then(|pid| crate::checked(Command::new("kill").args(["-TERM", &pid.to_string()])));
        let status = agent.wait().context("cannot wait for the agent")?;
        stopped?;
        if !status.success() {
            let text = fs::read_to_string(&log).unwrap_or_default();
            bail!("the {backend:?} agent failed ({status}):\n{text}");
        }
        let text = fs::read_to_string(&stats)
            .with_context(|| format!("cannot read {}", stats.display()))?;
        let fields: Vec<f64> = text
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        if let [user, system, kib] = fields[..] {
            run.agent_cpu_secs = user + system;
            run.agent_rss_kib = kib as u64;
        }
        // eBPF: the kernel's event counter; inotify: the notices received.
        let key = if backend == Some("ebpf") {
            "events="
        } else {
            "notices="
        };
        run.notices = fs::read_to_string(&log)
            .with_context(|| format!("cannot read {}", log.display()))?
            .lines()
            .rev()
            .filter_map(|l| l.split(key).nth(1))
            .filter_map(|n| {
                n.split_whitespace()
                    .next()?
                    .trim_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .ok()
            })
            .next()
            .unwrap_or(0);
    }
    let report = json_of(&report?)?;
    run.rate = report["rate"]
        .as_f64()
        .context("the writer reported no rate")?;
    run.calls = report["calls"].as_u64().unwrap_or(0);
    Ok(run)
}

pub fn run(bench: &Bench) -> Result<Outcome> {
    println!("\n== tracer: 4 KiB pwrite into a watched tree, no agent vs eBPF vs inotify");
    const AGENTS: [Option<&str>; 3] = [None, Some("ebpf"), Some("inotify")];
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for (label, rate) in [("full speed", 0u64), ("100k/s", 100_000)] {
        let mut runs: [Vec<TracerRun>; 3] = Default::default();
        for _ in 0..RUNS {
            for (i, agent) in AGENTS.iter().enumerate() {
                runs[i].push(tracer_run(bench, *agent, rate)?);
            }
        }
        let rate_of = |i: usize| median(runs[i].iter().map(|r| r.rate).collect());
        let baseline = rate_of(0);
        println!("{label}: no agent {baseline:.0} calls/s");
        for (i, agent) in AGENTS.iter().enumerate().skip(1) {
            let backend = agent.unwrap_or("none");
            let rate_reached = rate_of(i);
            let ratio = rate_reached / baseline;
            let per_write = median(
                runs[i]
                    .iter()
                    .map(|r| r.notices as f64 / r.calls.max(1) as f64)
                    .collect(),
            );
            let cpu = median(runs[i].iter().map(|r| r.agent_cpu_secs).collect());
            let rss_kib = runs[i].iter().map(|r| r.agent_rss_kib).max().unwrap_or(0);
            let target = (rate > 0 && backend == "ebpf").then_some(ratio >= MIN_EBPF_RATIO);
            println!(
                "{label}: {backend:<7} {rate_reached:.0} calls/s = {ratio:.3}x of no agent; {per_write:.2e} notices/write; agent CPU {cpu:.2} s, peak RSS {:.1} MiB{}",
                rss_kib as f64 / 1024.0,
                target
                    .map(|ok| format!(" (target >= {MIN_EBPF_RATIO:.2}x: {})", verdict(ok)))
                    .unwrap_or_default()
            );
            if let Some(ok) = target {
                summary.push(format!(
                    "tracer  eBPF at {label}: app keeps {ratio:.3}x of its rate (target >= {MIN_EBPF_RATIO:.2}x) {}",
                    verdict(ok)
                ));
            }
            rows.push(json!({
                "load": label, "backend": backend, "rate": rate_reached, "baseline_rate": baseline,
                "ratio": ratio, "notices_per_write": per_write, "agent_cpu_secs": cpu,
                "agent_rss_kib": rss_kib,
                "runs": runs[i].iter().map(|r| json!({
                    "rate": r.rate, "calls": r.calls, "notices": r.notices,
                    "agent_cpu_secs": r.agent_cpu_secs, "agent_rss_kib": r.agent_rss_kib,
                })).collect::<Vec<_>>(),
                "baseline_runs": runs[0].iter().map(|r| r.rate).collect::<Vec<_>>(),
            }));
        }
    }
    Ok(Outcome {
        json: json!({ "rows": Value::Array(rows), "write_secs": WRITE_SECS }),
        summary,
    })
}
