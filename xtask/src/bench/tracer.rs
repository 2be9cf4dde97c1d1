//! The tracer benchmark: what the agent costs apps on the node. An app
//! (`cargo xtask bench-writer`, [`writer`]) runs one of these loops for
//! [`WRITE_SECS`], with no agent and under each agent:
//!
//! - 4 KiB `pwrite` into a watched tree, at full speed and at a fixed 100k
//!   calls/s (no agent, eBPF, eBPF with `--syscall-hooks`, inotify);
//! - the same loop into a directory outside every watched tree;
//! - a `getpid` loop, which touches no file at all;
//! - the watched loop with 200 roots watched while another process creates
//!   and unlinks 10k files/s elsewhere (that process runs in the no-agent
//!   baseline too).
//!
//! How the app's speed is compared, as this machine's virtual CPUs switch
//! between speed levels tens of per cent apart for seconds at a time (two
//! loops pinned to the two CPUs run at uncorrelated levels; the same loop
//! measured twice with no agent differed by 15%):
//!
//! - Loops outside every tree are measured interleaved ([`interleaved`]):
//!   one app process runs throughout while 1 s phases alternate between no
//!   agent and each agent, started and stopped between phases.
//! - Loops in a watched tree are measured in [`rounds`]: each condition in
//!   a run of its own ([`WRITE_SECS`], a fresh tree and store), [`TRACER_RUNS`]
//!   rounds in rotating order.
//!
//! Either way the app reports its calls every 100 ms, and the judged ratio
//! is the 90th percentile of its window rates under the agent against the
//! same under no agent ([`quantile_ratio`]); the median over phases (or
//! rounds) of the rate against the no-agent one beside it is printed too.
//! Also reported: the agent's CPU time and peak RSS. One more eBPF run per
//! loop has `kernel.bpf_stats_enabled` set (it costs two clock reads per
//! program run, so it is kept out of the rates): the kernel's own run time
//! of every loaded program, per call the app made.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::measure::{cpu_secs, fresh_dir, json_of, output, verdict};
use super::{Bench, Outcome};

/// Rounds of every condition: more than the other benchmarks' runs, as a
/// few per cent is what is judged here and this machine drifts by ten.
const TRACER_RUNS: usize = 5;

/// How long the app runs its loop.
const WRITE_SECS: f64 = 2.0;
/// Longest wait for the agent's start-up capture, and the quiet time after
/// it before the app starts (its start-up work is not what is measured).
const AGENT_START: Duration = Duration::from_secs(20);
const AGENT_SETTLE: Duration = Duration::from_millis(700);
/// Interleaved measurements (see [`interleaved`]): the length of a phase,
/// of the app's windows, and the phases per agent.
const PHASE: Duration = Duration::from_millis(1000);
const WINDOW_MS: u64 = 100;
const CYCLES: usize = 16;
/// Roots watched in the many-roots condition.
const MANY_ROOTS: usize = 200;
/// Creates (and as many unlinks) per second of the process elsewhere.
const CHURN_RATE: u64 = 10_000;

/// What the benchmark's app does in its loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// 4 KiB pwrite calls over a few files.
    Pwrite,
    /// getpid calls.
    Getpid,
    /// Create and unlink files.
    Churn,
}

/// The tracer benchmark's app: see `cargo xtask bench-writer`. Prints the
/// calls it made and their rate as JSON.
pub fn writer(
    dir: &Path,
    mode: Mode,
    files: usize,
    rate: u64,
    seconds: f64,
    window: Duration,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let handles: Vec<fs::File> = match mode {
        Mode::Pwrite => (0..files.max(1))
            .map(|i| {
                let path = dir.join(format!("data-{i}.bin"));
                fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(false)
                    .open(&path)
                    .with_context(|| format!("cannot open {}", path.display()))
            })
            .collect::<Result<_>>()?,
        Mode::Getpid | Mode::Churn => Vec::new(),
    };
    let block = [0x42u8; 4096];
    let started = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut calls: u64 = 0;
    let mut sink = 0u64;
    let mut window_start = (started, 0u64);
    while started.elapsed() < limit {
        // 256 calls between clock reads keeps the clock off the profile.
        for _ in 0..256 {
            match mode {
                Mode::Pwrite => {
                    let file = &handles[(calls % handles.len() as u64) as usize];
                    file.write_all_at(&block, (calls % 1024) * 4096)
                        .context("pwrite failed")?;
                }
                Mode::Getpid => {
                    sink =
                        sink.wrapping_add(rustix::process::getpid().as_raw_nonzero().get() as u64);
                }
                Mode::Churn => {
                    let path = dir.join(format!("churn-{}", calls % 64));
                    fs::File::create(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    fs::remove_file(&path)
                        .with_context(|| format!("cannot remove {}", path.display()))?;
                }
            }
            calls += 1;
        }
        if !window.is_zero() && window_start.0.elapsed() >= window {
            let now = Instant::now();
            println!(
                "{}",
                json!({
                    "at": now.duration_since(started).as_secs_f64(),
                    "window_calls": calls - window_start.1,
                    "window_secs": now.duration_since(window_start.0).as_secs_f64(),
                })
            );
            window_start = (now, calls);
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
        json!({ "calls": calls, "secs": secs, "rate": calls as f64 / secs, "sink": sink % 2 })
    );
    Ok(())
}

/// One of the app's loops, with where it runs.
#[derive(Clone, Copy, Debug)]
struct Load {
    label: &'static str,
    mode: Mode,
    /// Inside the watched tree (else in a directory beside it).
    watched: bool,
    /// Calls per second, 0 for full speed.
    rate: u64,
    /// 200 roots watched and a churning process elsewhere.
    crowded: bool,
    /// The least share of its no-agent rate the app must keep under the
    /// eBPF agent (the targets).
    target: f64,
    agents: &'static [Agent],
}

/// Who watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Agent {
    None,
    Ebpf,
    EbpfSyscalls,
    Inotify,
}

impl Agent {
    fn name(self) -> &'static str {
        match self {
            Agent::None => "none",
            Agent::Ebpf => "ebpf",
            Agent::EbpfSyscalls => "ebpf+syscalls",
            Agent::Inotify => "inotify",
        }
    }
}

const ALL_AGENTS: &[Agent] = &[
    Agent::None,
    Agent::Ebpf,
    Agent::EbpfSyscalls,
    Agent::Inotify,
];
const EBPF_AGENTS: &[Agent] = &[Agent::None, Agent::Ebpf, Agent::EbpfSyscalls];

const LOADS: [Load; 5] = [
    Load {
        label: "pwrite watched, full speed",
        mode: Mode::Pwrite,
        watched: true,
        rate: 0,
        crowded: false,
        target: 0.90,
        agents: ALL_AGENTS,
    },
    Load {
        label: "pwrite watched, 100k/s",
        mode: Mode::Pwrite,
        watched: true,
        rate: 100_000,
        crowded: false,
        target: 0.97,
        agents: &[Agent::None, Agent::Ebpf, Agent::Inotify],
    },
    Load {
        label: "pwrite outside the trees",
        mode: Mode::Pwrite,
        watched: false,
        rate: 0,
        crowded: false,
        target: 0.97,
        agents: EBPF_AGENTS,
    },
    Load {
        label: "getpid",
        mode: Mode::Getpid,
        watched: false,
        rate: 0,
        crowded: false,
        target: 0.98,
        agents: EBPF_AGENTS,
    },
    Load {
        label: "pwrite watched, 200 roots, 10k creates+unlinks/s elsewhere",
        mode: Mode::Pwrite,
        watched: true,
        rate: 0,
        crowded: true,
        target: 0.90,
        agents: &[Agent::None, Agent::Ebpf],
    },
];

/// One run: the app's reach, and the agent's cost.
#[derive(Clone, Debug, Default)]
struct TracerRun {
    rate: f64,
    /// The app's rate in each of its windows ([`rounds`] only).
    windows: Vec<f64>,
    calls: u64,
    agent_cpu_secs: f64,
    agent_rss_kib: u64,
    notices: u64,
    /// The agent's CPU time while the app ran its loop.
    agent_loop_cpu_secs: f64,
    /// Run time and runs of every program the agent loaded (with
    /// `kernel.bpf_stats_enabled` only).
    bpf_run_ns: u64,
    bpf_runs: u64,
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

/// The summed `run_time_ns` and `run_cnt` of the BPF programs process
/// `pid` holds, from their descriptors' fdinfo.
fn bpf_run_stats(pid: u32) -> Result<(u64, u64)> {
    let fds = format!("/proc/{pid}/fd");
    let mut total = (0u64, 0u64);
    for entry in fs::read_dir(&fds).with_context(|| format!("cannot list {fds}"))? {
        let entry = entry.with_context(|| format!("cannot list {fds}"))?;
        let is_prog = fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(text) = fs::read_to_string(&info) else {
            continue;
        };
        let value = |key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        total.0 += value("run_time_ns:");
        total.1 += value("run_cnt:");
    }
    Ok(total)
}

/// Sets `kernel.bpf_stats_enabled`, and puts back what it was on drop.
struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let before =
            fs::read_to_string(BPF_STATS).with_context(|| format!("cannot read {BPF_STATS}"))?;
        fs::write(BPF_STATS, "1").with_context(|| format!("cannot write {BPF_STATS}"))?;
        Ok(BpfStats { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, self.before.trim());
    }
}

/// A process running until dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The directories of one run: the watched roots (the app's is the first)
/// and the one beside them.
fn run_dirs(work: &Path, crowded: bool) -> Result<(Vec<PathBuf>, PathBuf)> {
    let roots: Vec<PathBuf> = (0..if crowded { MANY_ROOTS } else { 1 })
        .map(|i| work.join("roots").join(format!("r{i}")))
        .collect();
    fresh_dir(&work.join("roots"))?;
    for root in &roots {
        fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    }
    let outside = work.join("outside");
    fresh_dir(&outside)?;
    Ok((roots, outside))
}

fn start_agent(
    bench: &Bench,
    agent: Agent,
    roots: &[PathBuf],
    store: &Path,
    stats: &Path,
    log: &Path,
) -> Result<Option<Child>> {
    let backend = match agent {
        Agent::None => return Ok(None),
        Agent::Ebpf | Agent::EbpfSyscalls => "ebpf",
        Agent::Inotify => "inotify",
    };
    let mut command = Command::new("/usr/bin/time");
    command
        .args(["-f", "%U %S %M", "-o"])
        .arg(stats)
        .arg(&bench.bin)
        .args(["watch", "--backend", backend]);
    if agent == Agent::EbpfSyscalls {
        command.arg("--syscall-hooks");
    }
    for (i, root) in roots.iter().enumerate() {
        let mut arg = std::ffi::OsString::from(format!("r{i}="));
        arg.push(root);
        command.arg("--state-dir").arg(arg);
    }
    let child = command
        .arg("--store")
        .arg(store)
        .stderr(fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?)
        .spawn()
        .context("cannot start the agent")?;
    // Let it attach and take its first look.
    let started = Instant::now();
    while !fs::read_to_string(log).is_ok_and(|text| text.contains("start-up capture")) {
        if started.elapsed() > AGENT_START {
            bail!(
                "the agent did not finish its start-up capture in {AGENT_START:?}:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(AGENT_SETTLE);
    Ok(Some(child))
}

/// The command running the benchmark's app (`cargo xtask bench-writer`).
fn app_command(
    exe: &Path,
    mode: Mode,
    dir: &Path,
    rate: u64,
    seconds: f64,
    window_ms: u64,
) -> Command {
    let mut command = Command::new(exe);
    command
        .arg("bench-writer")
        .arg(dir)
        .args(["--mode", &format!("{mode:?}").to_lowercase()])
        .args(["--rate", &rate.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .args(["--window-ms", &window_ms.to_string()]);
    command
}

/// Stops an agent `start_agent` started (its pid under GNU time is
/// `pid`), and adds its CPU time, peak RSS and event count to `run`.
fn stop_agent(
    child: &mut Child,
    pid: Result<u32>,
    agent: Agent,
    stats: &Path,
    log: &Path,
    run: &mut TracerRun,
) -> Result<()> {
    let stopped =
        pid.and_then(|pid| crate::checked(Command::new("kill").args(["-TERM", &pid.to_string()])));
    let status = child.wait().context("cannot wait for the agent")?;
    stopped?;
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        bail!("the {} agent failed ({status}):\n{text}", agent.name());
    }
    let text =
        fs::read_to_string(stats).with_context(|| format!("cannot read {}", stats.display()))?;
    let fields: Vec<f64> = text
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    if let [user, system, kib] = fields[..] {
        run.agent_cpu_secs += user + system;
        run.agent_rss_kib = run.agent_rss_kib.max(kib as u64);
    }
    // eBPF: the kernel's event counter; inotify: the notices received.
    let key = if agent == Agent::Inotify {
        "notices="
    } else {
        "events="
    };
    run.notices += fs::read_to_string(log)
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
    Ok(())
}

/// Calls the app made in a window ending at `end`.
#[derive(Clone, Copy)]
struct Window {
    end: Instant,
    secs: f64,
    calls: u64,
}

/// The windows that lie within `from..to`.
fn windows_within(
    windows: &[Window],
    from: Instant,
    to: Instant,
) -> impl Iterator<Item = &Window> + '_ {
    windows.iter().filter(move |w| {
        w.end <= to && w.end.checked_sub(Duration::from_secs_f64(w.secs)) >= Some(from)
    })
}

/// The app's rate over the windows that lie within `from..to`.
fn rate_within(windows: &[Window], from: Instant, to: Instant) -> Result<(f64, u64)> {
    let (calls, secs) = windows_within(windows, from, to).fold((0u64, 0f64), |(calls, secs), w| {
        (calls + w.calls, secs + w.secs)
    });
    if secs <= 0.0 {
        bail!("the app reported no window within a phase of {PHASE:?}");
    }
    Ok((calls as f64 / secs, calls))
}

/// One interleaved measurement of `load` (outside every tree: the app's
/// loop does not depend on what the agent captured). The app runs once,
/// through all of it, reporting its calls every [`WINDOW_MS`]; meanwhile
/// phases of [`PHASE`] alternate: no agent, the first agent, no agent, the
/// second agent, ..., no agent, [`CYCLES`] times per agent. The agent
/// starts and stops between phases, and its start-up is not counted. Each
/// phase's window rates go to [`quantile_ratio`]; each agent phase is also
/// paired with the mean of the no-agent phases either side of it.
fn interleaved(bench: &Bench, load: &Load) -> Result<Measured> {
    let work = &bench.work;
    let (roots, outside) = run_dirs(work, load.crowded)?;
    let store = work.join("store.dk");
    let stats = work.join("agent.time");
    let log = work.join("agent.log");
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let mut command = app_command(&exe, load.mode, &outside, load.rate, 3600.0, WINDOW_MS);
    command.stdout(std::process::Stdio::piped());
    let mut app = Running(command.spawn().context("cannot start the app")?);
    let stdout = app.0.stdout.take().context("the app has no stdout")?;
    let windows = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Window>::new()));
    let reader = {
        let windows = windows.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let end = Instant::now();
                let Ok(line) = line else { break };
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let (Some(calls), Some(secs)) = (
                    value["window_calls"].as_u64(),
                    value["window_secs"].as_f64(),
                ) {
                    if let Ok(mut windows) = windows.lock() {
                        windows.push(Window { end, secs, calls });
                    }
                }
            }
        })
    };
    let phase = || {
        let from = Instant::now();
        std::thread::sleep(PHASE);
        (from, Instant::now())
    };
    // The no-agent phases, and per agent its phases and runs.
    let mut baselines = vec![phase()];
    let mut phases: Vec<Vec<((Instant, Instant), TracerRun)>> = vec![Vec::new(); load.agents.len()];
    for _ in 0..CYCLES {
        for (i, agent) in load.agents.iter().enumerate().skip(1) {
            if store.exists() {
                fs::remove_file(&store)
                    .with_context(|| format!("cannot remove {}", store.display()))?;
            }
            let mut child = start_agent(bench, *agent, &roots, &store, &stats, &log)?
                .context("no agent to start")?;
            let pid = child_of(child.id());
            let before = pid.as_ref().ok().map(|p| cpu_secs(*p)).transpose()?;
            let span = phase();
            let mut run = TracerRun::default();
            if let (Ok(pid), Some(before)) = (&pid, before) {
                run.agent_loop_cpu_secs = cpu_secs(*pid)? - before;
            }
            stop_agent(&mut child, pid, *agent, &stats, &log, &mut run)?;
            phases[i].push((span, run));
            baselines.push(phase());
        }
    }
    drop(app);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the app's reader panicked"))?;
    let windows = windows
        .lock()
        .map_err(|_| anyhow::anyhow!("the app's windows were poisoned"))?
        .clone();
    let rates = baselines
        .iter()
        .map(|(from, to)| rate_within(&windows, *from, *to).map(|r| r.0))
        .collect::<Result<Vec<f64>>>()?;
    let window_rates = |spans: &mut dyn Iterator<Item = &(Instant, Instant)>| -> Vec<f64> {
        spans
            .flat_map(|(from, to)| windows_within(&windows, *from, *to))
            .map(|w| w.calls as f64 / w.secs)
            .collect()
    };
    let agents = load.agents.len() - 1;
    let mut measured = Measured {
        runs: vec![Vec::new(); load.agents.len()],
        windows: vec![window_rates(&mut baselines.iter())],
    };
    for (i, runs) in phases.into_iter().enumerate().skip(1) {
        measured
            .windows
            .push(window_rates(&mut runs.iter().map(|(span, _)| span)));
        for (cycle, ((from, to), mut run)) in runs.into_iter().enumerate() {
            // Phase k of all agent phases sits between baselines k and k + 1.
            let k = cycle * agents + (i - 1);
            (run.rate, run.calls) = rate_within(&windows, from, to)?;
            measured.runs[i].push((run, (rates[k] + rates[k + 1]) / 2.0));
        }
    }
    Ok(measured)
}

fn tracer_run(bench: &Bench, load: &Load, agent: Agent, bpf_stats: bool) -> Result<TracerRun> {
    let work = &bench.work;
    let (roots, outside) = run_dirs(work, load.crowded)?;
    let store = work.join("store.dk");
    if store.exists() {
        fs::remove_file(&store).with_context(|| format!("cannot remove {}", store.display()))?;
    }
    let stats = work.join("agent.time");
    let log = work.join("agent.log");
    let current_exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let app = |mode: Mode, dir: &Path, rate: u64, seconds: f64, window_ms: u64| {
        app_command(&current_exe, mode, dir, rate, seconds, window_ms)
    };
    let churn = if load.crowded {
        let dir = outside.join("churn");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Long enough to cover the agent's start and the app's loop.
        let mut command = app(Mode::Churn, &dir, CHURN_RATE, 3600.0, 0);
        command.stdout(std::process::Stdio::null());
        Some(Running(
            command
                .spawn()
                .context("cannot start the churning process")?,
        ))
    } else {
        None
    };
    let _stats_on = if bpf_stats {
        Some(BpfStats::enable()?)
    } else {
        None
    };
    let mut agent_child = start_agent(bench, agent, &roots, &store, &stats, &log)?;
    // The agent is GNU time's child.
    let pid = agent_child.as_ref().map(|child| child_of(child.id()));
    let cpu_before = pid
        .as_ref()
        .and_then(|p| p.as_ref().ok())
        .map(|p| cpu_secs(*p));
    let target = if load.watched { &roots[0] } else { &outside };
    let report = output(&mut app(
        load.mode, target, load.rate, WRITE_SECS, WINDOW_MS,
    ));
    let mut run = TracerRun::default();
    if let (Some(Ok(pid)), Some(Ok(before))) = (&pid, cpu_before) {
        run.agent_loop_cpu_secs = cpu_secs(*pid)? - before;
    }
    if let (Some(child), Some(pid)) = (agent_child.as_mut(), pid) {
        if bpf_stats {
            if let Ok(pid) = &pid {
                (run.bpf_run_ns, run.bpf_runs) = bpf_run_stats(*pid)?;
            }
        }
        stop_agent(child, pid, agent, &stats, &log, &mut run)?;
    }
    drop(churn);
    let report = report?;
    for line in report.lines() {
        let value = json_of(line)?;
        if let (Some(calls), Some(secs)) = (
            value["window_calls"].as_u64(),
            value["window_secs"].as_f64(),
        ) {
            run.windows.push(calls as f64 / secs);
        }
    }
    let report = json_of(report.lines().last().unwrap_or_default())?;
    run.rate = report["rate"]
        .as_f64()
        .context("the app reported no rate")?;
    run.calls = report["calls"].as_u64().unwrap_or(0);
    Ok(run)
}

/// [`TRACER_RUNS`] rounds of `load`, each condition in its own run and
/// each round in another order (so drift over a round does not favour one
/// agent); every agent's run is paired with the no-agent run of its round.
fn rounds(bench: &Bench, load: &Load) -> Result<Measured> {
    let mut runs: Vec<Vec<TracerRun>> = vec![Vec::new(); load.agents.len()];
    for round in 0..TRACER_RUNS {
        let mut order: Vec<usize> = (0..load.agents.len()).collect();
        order.rotate_left(round % load.agents.len());
        for i in order {
            runs[i].push(tracer_run(bench, load, load.agents[i], false)?);
        }
    }
    let baselines: Vec<f64> = runs[0].iter().map(|r| r.rate).collect();
    let windows = runs
        .iter()
        .map(|agent_runs| agent_runs.iter().flat_map(|r| r.windows.clone()).collect())
        .collect();
    Ok(Measured {
        runs: runs
            .into_iter()
            .map(|agent_runs| {
                agent_runs
                    .into_iter()
                    .zip(baselines.iter().copied())
                    .collect()
            })
            .collect(),
        windows,
    })
}

/// What one load's measurement found.
struct Measured {
    /// Per agent (as in [`Load::agents`]; the first, no agent, has none):
    /// its runs, each with the rate of its no-agent baseline.
    runs: Vec<Vec<(TracerRun, f64)>>,
    /// Per agent (the first: no agent), the app's rate in every window of
    /// its phases or runs.
    windows: Vec<Vec<f64>>,
}

/// The share of the app's windows that the window quantile ratio ignores
/// below: see [`quantile_ratio`].
const WINDOW_QUANTILE: f64 = 0.9;

/// The `q` quantile of `values`.
fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let at = ((values.len() as f64 - 1.0) * q).round() as usize;
    values.get(at).copied().unwrap_or(f64::NAN)
}

/// The app's speed under an agent against no agent, judged by the fast
/// windows of each: the [`WINDOW_QUANTILE`] quantile of its 100 ms window
/// rates over all the agent's phases, against the same over all no-agent
/// phases. This machine's virtual CPUs switch between speed levels tens of
/// per cent apart for seconds at a time (two loops pinned to the two CPUs
/// run at uncorrelated levels), and that noise swamps a paired ratio; an
/// agent's cost per call slows the fast windows as much as the others, and
/// the fast level is reached in the phases of every condition.
fn quantile_ratio(agent: &[f64], none: &[f64]) -> f64 {
    quantile(agent.to_vec(), WINDOW_QUANTILE) / quantile(none.to_vec(), WINDOW_QUANTILE)
}

pub fn run(bench: &Bench) -> Result<Outcome> {
    println!("\n== tracer: what the agent costs apps on the node (no agent vs eBPF vs eBPF with syscall tracepoints vs inotify)");
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for load in &LOADS {
        // Per agent (after the first, no agent): its runs, each with the
        // rate of its no-agent baseline.
        let Measured { runs, windows } = if load.watched {
            rounds(bench, load)?
        } else {
            interleaved(bench, load)?
        };
        let baseline = median(runs[1].iter().map(|(_, none)| *none).collect());
        let rate_of = |i: usize| median(runs[i].iter().map(|(r, _)| r.rate).collect());
        let paired_of =
            |i: usize| median(runs[i].iter().map(|(run, none)| run.rate / none).collect());
        println!("{}: no agent {baseline:.0} calls/s", load.label);
        for (i, agent) in load.agents.iter().enumerate().skip(1) {
            let rate_reached = rate_of(i);
            let ratio = quantile_ratio(&windows[i], &windows[0]);
            let paired = paired_of(i);
            let how = format!(
                " by its {:.0}th-percentile windows ({paired:.3}x paired {})",
                WINDOW_QUANTILE * 100.0,
                if load.watched { "rounds" } else { "phases" }
            );
            let per_call = median(
                runs[i]
                    .iter()
                    .map(|(r, _)| r.notices as f64 / r.calls.max(1) as f64)
                    .collect(),
            );
            let cpu = median(runs[i].iter().map(|(r, _)| r.agent_cpu_secs).collect());
            let loop_cpu = median(runs[i].iter().map(|(r, _)| r.agent_loop_cpu_secs).collect());
            let rss_kib = runs[i]
                .iter()
                .map(|(r, _)| r.agent_rss_kib)
                .max()
                .unwrap_or(0);
            // The kernel's own account of the programs' time, per app call.
            let bpf = if *agent == Agent::Inotify {
                None
            } else {
                let stats = tracer_run(bench, load, *agent, true)?;
                Some((
                    stats.bpf_run_ns as f64 / stats.calls.max(1) as f64,
                    stats.bpf_runs as f64 / stats.calls.max(1) as f64,
                ))
            };
            let target = (*agent == Agent::Ebpf).then_some(ratio >= load.target);
            println!(
                "{}: {:<13} {rate_reached:.0} calls/s = {ratio:.3}x of no agent{how}; {per_call:.2e} events/call; {} agent CPU {cpu:.2} s ({loop_cpu:.2} s during the loop), peak RSS {:.1} MiB{}",
                load.label,
                agent.name(),
                bpf.map(|(ns, runs)| format!("BPF {ns:.1} ns and {runs:.3} program runs per call;"))
                    .unwrap_or_default(),
                rss_kib as f64 / 1024.0,
                target
                    .map(|ok| format!(" (target >= {:.2}x: {})", load.target, verdict(ok)))
                    .unwrap_or_default()
            );
            if let Some(ok) = target {
                summary.push(format!(
                    "tracer  eBPF, {}: app keeps {ratio:.3}x of its rate (target >= {:.2}x) {}",
                    load.label,
                    load.target,
                    verdict(ok)
                ));
            }
            rows.push(json!({
                "load": load.label, "agent": agent.name(), "rate": rate_reached,
                "baseline_rate": baseline, "ratio": ratio, "target": load.target,
                "events_per_call": per_call, "agent_cpu_secs": cpu, "agent_loop_cpu_secs": loop_cpu, "agent_rss_kib": rss_kib,
                "bpf_ns_per_call": bpf.map(|b| b.0), "bpf_runs_per_call": bpf.map(|b| b.1),
                "method": if load.watched { "rounds" } else { "interleaved" },
                "paired_ratio": paired,
                "window_rates": &windows[i], "baseline_window_rates": &windows[0],
                "runs": runs[i].iter().map(|(r, none)| json!({
                    "rate": r.rate, "baseline_rate": none, "calls": r.calls, "notices": r.notices,
                    "agent_cpu_secs": r.agent_cpu_secs, "agent_rss_kib": r.agent_rss_kib,
                })).collect::<Vec<_>>(),
            }));
        }
    }
    Ok(Outcome {
        json: json!({ "rows": Value::Array(rows), "write_secs": WRITE_SECS }),
        summary,
    })
}
