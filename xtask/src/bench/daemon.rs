//! The daemon benchmark: many targets on one `diffkeeper daemon` against
//! one `watch` process per target, and whether one target's big batches
//! hold up the others'.
//!
//! - isolation: [`SMALL`] targets each appended to every [`PACE`], first
//!   alone, then beside a target whose 500 MB file is rewritten whole the
//!   whole time: the small targets' capture latency (from a batch's first
//!   unsaved write to its commit, the daemon's own histogram) p50/p99 in
//!   both, and their ratio.
//! - scale: [`MANY`] targets, each appended to every [`PACE`], plus one
//!   heavy writer (a 64 MB file rewritten in place): per-target capture
//!   latency p50/p99, CPU and peak RSS, for one daemon and for [`MANY`]
//!   `watch --backend ebpf` processes doing the same job. Target: the
//!   daemon's RSS at most 50 MiB + 1 MiB per target.
//!
//! Latencies come from the `diffkeeper_capture_latency_seconds` histograms
//! at `/metrics` (each process's, summed): quantiles are interpolated
//! within a bucket, whose bounds grow by half each step.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::measure::{cpu_secs, root_arg, verdict};
use super::{Bench, Outcome};

/// Small targets in the isolation part.
const SMALL: usize = 9;
/// Targets in the scale part.
const MANY: usize = 50;
/// How often each small target's file is appended to.
const PACE: Duration = Duration::from_millis(500);
/// How long each phase writes.
const PHASE: Duration = Duration::from_secs(15);
/// The isolation part's big file.
const BIG: usize = 500 << 20;
/// The scale part's heavy writer's file.
const HEAVY: usize = 64 << 20;

pub fn run(bench: &Bench) -> Result<Outcome> {
    println!(
        "\n== daemon: {SMALL} small targets alone and beside a 500 MB rewrite; {MANY} targets on one daemon vs {MANY} watch processes"
    );
    let mut summary = Vec::new();

    // Isolation: the same small targets, without and with the big one.
    let alone = phase(bench, "alone", SMALL, None)?;
    let beside = phase(bench, "beside", SMALL, Some(BIG))?;
    let ratio = beside.p99 / alone.p99;
    println!(
        "isolation: small targets' capture latency p50 {:.0} ms / p99 {:.0} ms alone, {:.0} / {:.0} ms beside a 500 MB rewrite (p99 {ratio:.2}x; {} big batches meanwhile)",
        alone.p50 * 1e3,
        alone.p99 * 1e3,
        beside.p50 * 1e3,
        beside.p99 * 1e3,
        beside.big_batches
    );
    summary.push(format!(
        "daemon isolation: p99 capture latency of {SMALL} small targets {:.0} ms alone, {:.0} ms beside a target rewriting 500 MB ({ratio:.2}x)",
        alone.p99 * 1e3,
        beside.p99 * 1e3
    ));

    // Scale: one daemon against one watch per target.
    let daemon = phase(bench, "daemon", MANY, Some(HEAVY))?;
    let watches = separate(bench, MANY, HEAVY)?;
    let limit = 50.0 + MANY as f64;
    println!(
        "scale: {MANY} targets + 1 heavy: one daemon p50 {:.0} ms p99 {:.0} ms, CPU {:.2} s, RSS {:.1} MiB (target <= {limit:.0} MiB: {}); {MANY} watch processes p50 {:.0} ms p99 {:.0} ms, CPU {:.2} s, RSS {:.1} MiB together",
        daemon.p50 * 1e3,
        daemon.p99 * 1e3,
        daemon.cpu_secs,
        daemon.rss_mib,
        verdict(daemon.rss_mib <= limit),
        watches.p50 * 1e3,
        watches.p99 * 1e3,
        watches.cpu_secs,
        watches.rss_mib
    );
    summary.push(format!(
        "daemon scale: {MANY} targets on one daemon: RSS {:.1} MiB (target <= {limit:.0}: {}), CPU {:.2} s, p99 latency {:.0} ms; {MANY} watch processes: RSS {:.1} MiB ({:.1}x), CPU {:.2} s ({:.2}x), p99 {:.0} ms",
        daemon.rss_mib,
        verdict(daemon.rss_mib <= limit),
        daemon.cpu_secs,
        daemon.p99 * 1e3,
        watches.rss_mib,
        watches.rss_mib / daemon.rss_mib,
        watches.cpu_secs,
        watches.cpu_secs / daemon.cpu_secs,
        watches.p99 * 1e3
    ));
    Ok(Outcome {
        json: json!({
            "isolation": {
                "small_targets": SMALL,
                "big_bytes": BIG,
                "alone": alone.to_json(),
                "beside_big": beside.to_json(),
                "p99_ratio": ratio,
            },
            "scale": {
                "targets": MANY,
                "heavy_bytes": HEAVY,
                "daemon": daemon.to_json(),
                "watch_processes": watches.to_json(),
                "rss_limit_mib": limit,
                "rss_ok": daemon.rss_mib <= limit,
            },
        }),
        summary,
    })
}

/// What one phase measured.
struct Measured {
    p50: f64,
    p99: f64,
    batches: f64,
    big_batches: f64,
    cpu_secs: f64,
    rss_mib: f64,
}

impl Measured {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "latency_p50_secs": self.p50,
            "latency_p99_secs": self.p99,
            "batches": self.batches,
            "big_batches": self.big_batches,
            "cpu_secs": self.cpu_secs,
            "peak_rss_mib": self.rss_mib,
        })
    }
}

/// `count` small directories (and a big one, with `big` bytes) under
/// `dir`, with their stores' paths.
fn directories(
    dir: &Path,
    count: usize,
    big: Option<usize>,
) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    super::measure::fresh_dir(dir)?;
    let mut dirs = Vec::new();
    for i in 0..count {
        let name = format!("t{i:02}");
        let state = dir.join(&name);
        fs::create_dir_all(&state).with_context(|| format!("cannot create {}", state.display()))?;
        fs::write(state.join("log"), b"start\n")
            .with_context(|| format!("cannot write in {}", state.display()))?;
        dirs.push((name.clone(), state, dir.join(format!("{name}.dk"))));
    }
    if let Some(bytes) = big {
        let state = dir.join("big");
        fs::create_dir_all(&state).with_context(|| format!("cannot create {}", state.display()))?;
        let mut noise = super::measure::Noise::new(0xb16);
        let mut data = Vec::new();
        noise.fill(&mut data, bytes, super::measure::Kind::Binary);
        fs::write(state.join("big.bin"), &data)
            .with_context(|| format!("cannot write in {}", state.display()))?;
        dirs.push(("big".to_string(), state, dir.join("big.dk")));
    }
    Ok(dirs)
}

/// Appends to every small directory each [`PACE`], and rewrites the big
/// file whole (1 MiB at a time) without pause, until `stop`.
fn writers(
    dirs: &[(String, PathBuf, PathBuf)],
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Result<()>>> {
    let mut threads = Vec::new();
    let small: Vec<PathBuf> = dirs
        .iter()
        .filter(|d| d.0 != "big")
        .map(|d| d.1.join("log"))
        .collect();
    {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                for path in &small {
                    let mut file = fs::OpenOptions::new()
                        .append(true)
                        .open(path)
                        .with_context(|| format!("cannot open {}", path.display()))?;
                    writeln!(file, "line {n} written at {:?}", started)
                        .with_context(|| format!("cannot append to {}", path.display()))?;
                }
                n += 1;
                std::thread::sleep(PACE.saturating_sub(started.elapsed()));
            }
            Ok(())
        }));
    }
    if let Some((_, state, _)) = dirs.iter().find(|d| d.0 == "big") {
        let (stop, path) = (stop.clone(), state.join("big.bin"));
        threads.push(std::thread::spawn(move || -> Result<()> {
            use std::os::unix::fs::FileExt;
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let len = file.metadata()?.len() as usize;
            let mut noise = super::measure::Noise::new(0x5eed);
            let mut chunk = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for at in (0..len).step_by(1 << 20) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    chunk.clear();
                    noise.fill(
                        &mut chunk,
                        (1 << 20).min(len - at),
                        super::measure::Kind::Binary,
                    );
                    file.write_all_at(&chunk, at as u64)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
            }
            Ok(())
        }));
    }
    threads
}

fn config(dirs: &[(String, PathBuf, PathBuf)]) -> String {
    let mut text = String::from("[daemon]\nbackend = \"ebpf\"\nmetrics_addr = \"127.0.0.1:0\"\n\n");
    for (name, state, store) in dirs {
        text.push_str(&format!(
            "[[target]]\nname = \"{name}\"\nstore = \"{}\"\nstate_dirs = [\"data={}\"]\n\n",
            store.display(),
            state.display()
        ));
    }
    text
}

/// Runs `count` small targets (and a big one) on one daemon for
/// [`PHASE`].
fn phase(bench: &Bench, what: &str, count: usize, big: Option<usize>) -> Result<Measured> {
    let dir = bench.work.join(what);
    let dirs = directories(&dir, count, big)?;
    let config_path = dir.join("daemon.toml");
    fs::write(&config_path, config(&dirs))
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let log = dir.join("daemon.log");
    let mut daemon = Process::start(
        bench
            .diffkeeper()
            .args(["daemon", "--config"])
            .arg(&config_path),
        &log,
    )?;
    let addr = daemon.metrics_addr(Duration::from_secs(60))?;
    daemon.wait_ready(&addr, Duration::from_secs(120))?;
    let cpu_before = cpu_secs(daemon.pid())?;
    write_phase(&dirs)?;
    let text = get(&addr, "/metrics")?;
    let cpu = cpu_secs(daemon.pid())? - cpu_before;
    let rss = daemon.peak_rss_mib()?;
    daemon.stop()?;
    measured(&text, cpu, rss)
}

/// The same job as [`phase`] with `count` targets, done by one `watch`
/// process per directory.
fn separate(bench: &Bench, count: usize, heavy: usize) -> Result<Measured> {
    let dir = bench.work.join("separate");
    let dirs = directories(&dir, count, Some(heavy))?;
    let mut processes = Vec::new();
    for (name, state, store) in &dirs {
        let log = dir.join(format!("{name}.log"));
        let process = Process::start(
            bench
                .diffkeeper()
                .args([
                    "watch",
                    "--backend",
                    "ebpf",
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--state-dir",
                ])
                .arg(root_arg("data", state))
                .arg("--store")
                .arg(store),
            &log,
        )?;
        processes.push(process);
    }
    let mut addrs = Vec::new();
    for process in &mut processes {
        let addr = process.metrics_addr(Duration::from_secs(120))?;
        process.wait_ready(&addr, Duration::from_secs(120))?;
        addrs.push(addr);
    }
    let cpu_before: f64 = processes
        .iter()
        .map(|p| cpu_secs(p.pid()))
        .sum::<Result<f64>>()?;
    write_phase(&dirs)?;
    let mut text = String::new();
    for addr in &addrs {
        text.push_str(&get(addr, "/metrics")?);
    }
    let cpu: f64 = processes
        .iter()
        .map(|p| cpu_secs(p.pid()))
        .sum::<Result<f64>>()?
        - cpu_before;
    let rss: f64 = processes
        .iter()
        .map(|p| p.peak_rss_mib())
        .sum::<Result<f64>>()?;
    for process in processes {
        process.stop()?;
    }
    // watch labels its series with the store's name: t00.., big.
    measured(&text, cpu, rss)
}

/// Writes for [`PHASE`] (see [`writers`]), then leaves 4 s for the last
/// writes' batches.
fn write_phase(dirs: &[(String, PathBuf, PathBuf)]) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = writers(dirs, &stop);
    std::thread::sleep(PHASE);
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    std::thread::sleep(Duration::from_secs(4));
    Ok(())
}

/// The small targets' latencies and batches, and the big one's batches,
/// from a metrics text, with the CPU and RSS measured.
fn measured(text: &str, cpu_secs: f64, rss_mib: f64) -> Result<Measured> {
    let small = |name: &str| name != "big";
    let (p50, p99) = quantiles(text, small)?;
    Ok(Measured {
        p50,
        p99,
        batches: counter(text, "diffkeeper_batches_total", small),
        big_batches: counter(text, "diffkeeper_batches_total", |n| n == "big"),
        cpu_secs,
        rss_mib,
    })
}

/// A diffkeeper process with its log in a file, killed if dropped.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(command: &mut Command, log: &Path) -> Result<Process> {
        let file =
            fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        Ok(Process {
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where it serves metrics, from its log.
    fn metrics_addr(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(addr) = text
                .split("metrics at http://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
            {
                return Ok(addr.to_string());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "diffkeeper exited ({status}) before serving metrics: see {}",
                    self.log.display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "diffkeeper did not serve metrics within {timeout:?}: see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(&self, addr: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !get(addr, "/readyz").is_ok_and(|body| body.starts_with("ready")) {
            if Instant::now() >= deadline {
                bail!(
                    "{addr}/readyz did not answer ready within {timeout:?}: see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn peak_rss_mib(&self) -> Result<f64> {
        let path = format!("/proc/{}/status", self.pid());
        let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        let kib: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmHWM in {path}"))?;
        Ok(kib / 1024.0)
    }

    /// SIGTERM, then waits for its final captures.
    fn stop(mut self) -> Result<()> {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).context("a process id")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("cannot stop diffkeeper")?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("diffkeeper exited {status}: see {}", self.log.display());
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of a GET of `path` (HTTP/1.1, the connection closed after).
fn get(addr: &str, path: &str) -> Result<String> {
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string()))
}

/// The value of `label="..."` in a series' label text.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let end = labels[start..].find('"')? + start;
    Some(&labels[start..end])
}

/// Series `name{...target="T"...} value` summed over the targets `wanted`
/// picks.
fn counter(text: &str, name: &str, wanted: impl Fn(&str) -> bool) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            wanted(label(labels, "target")?).then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// p50 and p99 of the capture latency of the targets `wanted` picks, from
/// their summed histogram buckets.
fn quantiles(text: &str, wanted: impl Fn(&str) -> bool) -> Result<(f64, f64)> {
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("diffkeeper_capture_latency_seconds_bucket{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let (Some(target), Some(le)) = (label(labels, "target"), label(labels, "le")) else {
            continue;
        };
        if !wanted(target) {
            continue;
        }
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().context("a bucket bound")?
        };
        let count: f64 = value.trim().parse().context("a bucket count")?;
        let entry = buckets.entry(bound.to_bits()).or_insert((bound, 0.0));
        entry.1 += count;
    }
    let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = sorted.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        bail!("no capture latency recorded: no batch was committed");
    }
    let quantile = |q: f64| {
        let want = q * total;
        let mut previous = (0.0, 0.0);
        for &(bound, cumulative) in &sorted {
            if cumulative >= want {
                if bound.is_infinite() {
                    return previous.0;
                }
                let share = (want - previous.1) / (cumulative - previous.1).max(f64::MIN_POSITIVE);
                return previous.0 + (bound - previous.0) * share;
            }
            previous = (bound, cumulative);
        }
        previous.0
    };
    Ok((quantile(0.5), quantile(0.99)))
}
