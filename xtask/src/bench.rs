//! `cargo xtask bench [delta|replay]`: DiffKeeper against its peers, each
//! measured in the same run on the same input, reported as ratios (these
//! machines are noisy; only ratios within one run mean much).
//!
//! - delta: a ~50 MB SQLite database before and after updating ~1% of its
//!   rows, scattered: stored bytes, wall time and peak RSS of a `snapshot`
//!   of the new version against `bsdiff`, `xdelta3 -e -s` and
//!   `zstd --patch-from` on the same pair.
//! - tracer: an app doing 4 KiB pwrite calls into a watched tree, at full
//!   speed and at a fixed 100k calls/s, with no agent, with `watch --backend
//!   ebpf` and with `watch --backend inotify`: the app's throughput ratio,
//!   events per write, the agent's CPU time and peak RSS.
//! - replay: a ~1 GiB state (large files, thousands of small ones, 20
//!   batches of edits making delta chains) rebuilt into an empty directory,
//!   against `cp -a` of the same tree; plus the store ratio.
//!
//! Work files live under `target/bench/` (on the same file system as the
//! sources, unlike a tmpfs `/tmp`); results go to `target/bench/results.json`.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{checked, diffkeeper_binary};

/// Timed runs per measurement; the median is reported.
const RUNS: usize = 3;
/// Timed replay and copy runs per condition (they vary more than the rest).
const REPLAY_RUNS: usize = 5;

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    const ALL: [&str; 3] = ["delta", "replay", "tracer"];
    let which: Vec<&str> = if args.is_empty() {
        ALL.to_vec()
    } else {
        args.iter().map(String::as_str).collect()
    };
    for name in &which {
        if !ALL.contains(name) {
            bail!("unknown benchmark {name:?}: choose among {ALL:?}");
        }
    }
    install_peers()?;
    let work = root.join("target/bench");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let mut results = serde_json::Map::new();
    if which.contains(&"delta") {
        results.insert("delta".into(), delta(&work.join("delta"))?);
    }
    if which.contains(&"replay") {
        results.insert("replay".into(), replay(&work.join("replay"))?);
    }
    if which.contains(&"tracer") {
        results.insert("tracer".into(), tracer(&work.join("tracer"))?);
    }
    let out = work.join("results.json");
    fs::write(&out, serde_json::to_string_pretty(&Value::Object(results))?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("\nresults written to {}", out.display());
    Ok(())
}

/// Debian packages of the peers and of `/usr/bin/time`.
fn install_peers() -> Result<()> {
    let needed = [
        ("sqlite3", "sqlite3"),
        ("bsdiff", "bsdiff"),
        ("xdelta3", "xdelta3"),
        ("zstd", "zstd"),
        ("/usr/bin/time", "time"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(cmd, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {cmd}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("bench: installing {}", missing.join(" "));
    checked(Command::new("apt-get").args(["update", "-qq"]))?;
    checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(&missing),
    )
}

/// One timed run: wall seconds and peak RSS in KiB.
#[derive(Clone, Copy, Debug)]
struct Run {
    secs: f64,
    rss_kib: u64,
}

/// Runs `argv` under `/usr/bin/time`, returning its stdout and measures.
fn timed(argv: &[&str]) -> Result<(String, Run)> {
    let rss_file = tempfile::NamedTempFile::new()?;
    let started = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(rss_file.path())
        .args(argv)
        .output()
        .with_context(|| format!("cannot run {argv:?}"))?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{argv:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rss_kib = fs::read_to_string(rss_file.path())?
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        Run { secs, rss_kib },
    ))
}

fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let mid = runs[runs.len() / 2];
    Run {
        secs: mid.secs,
        rss_kib: runs.iter().map(|r| r.rss_kib).max().unwrap_or(0),
    }
}

fn fresh_dir(path: &Path) -> Result<()> {
    if path.exists() {
        fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap_or("")
}

fn sqlite(db: &Path, sql: &str) -> Result<()> {
    checked(Command::new("sqlite3").arg(db).arg(sql))
}

fn json_of(text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("not JSON: {text}"))
}

fn stat_field(store: &Path, field: &str) -> Result<u64> {
    let out = Command::new(diffkeeper_binary())
        .args(["stats", "--json", "--store", s(store)])
        .output()?;
    json_of(&String::from_utf8_lossy(&out.stdout))?[field]
        .as_u64()
        .with_context(|| format!("stats has no {field}"))
}

/// Flushes dirty pages, and with `cold` drops the page cache too.
fn settle(cold: bool) -> Result<()> {
    checked(&mut Command::new("sync"))?;
    if cold {
        fs::write("/proc/sys/vm/drop_caches", "3").context("cannot drop caches (needs root)")?;
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn delta(work: &Path) -> Result<Value> {
    println!("\n== delta: SQLite database, ~1% of rows updated, scattered");
    fresh_dir(work)?;
    let before = work.join("before.db");
    let after = work.join("after.db");
    let rows = 470_000;
    sqlite(
        &before,
        &format!(
            "PRAGMA page_size=4096; CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, score INTEGER, payload BLOB);
             WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<{rows})
             INSERT INTO t SELECT x, 'user-'||x, abs(random()%100000), randomblob(80) FROM c;"
        ),
    )?;
    fs::copy(&before, &after)?;
    sqlite(
        &after,
        &format!(
            "UPDATE t SET score=abs(random()%100000) WHERE id IN (SELECT abs(random()%{rows})+1 FROM t LIMIT {});",
            rows / 100
        ),
    )?;
    let size = fs::metadata(&after)?.len();
    println!("pair: {} -> {} bytes", fs::metadata(&before)?.len(), size);

    // DiffKeeper: store `before`, then time the snapshot of `after`.
    let bin = diffkeeper_binary();
    let mut runs = Vec::new();
    let mut stored = 0;
    let mut disk_growth = 0;
    for _ in 0..RUNS {
        let state = work.join("state");
        let store = work.join("store.dk");
        fresh_dir(&state)?;
        let _ = fs::remove_file(&store);
        fs::copy(&before, state.join("data.db"))?;
        checked(Command::new(&bin).args([
            "snapshot",
            "--state-dir",
            &format!("db={}", s(&state)),
            "--store",
            s(&store),
        ]))?;
        let disk_before = stat_field(&store, "disk_bytes")?;
        fs::copy(&after, state.join("data.db"))?;
        let (out, run) = timed(&[
            s(&bin),
            "snapshot",
            "--json",
            "--state-dir",
            &format!("db={}", s(&state)),
            "--store",
            s(&store),
        ])?;
        stored = json_of(&out)?["stored_bytes"]
            .as_u64()
            .context("stored_bytes")?;
        disk_growth = stat_field(&store, "disk_bytes")?.saturating_sub(disk_before);
        runs.push(run);
    }
    // Sanity: the store gives back `after` exactly.
    let check = work.join("replayed");
    let _ = fs::remove_dir_all(&check);
    checked(Command::new(&bin).args([
        "replay",
        "--state-dir",
        &format!("db={}", s(&check)),
        "--store",
        s(&work.join("store.dk")),
    ]))?;
    if fs::read(check.join("data.db"))? != fs::read(&after)? {
        bail!("replay of the benchmark store does not reproduce after.db");
    }
    let ours = median(runs);

    let patch = work.join("patch");
    let patch_from = format!("--patch-from={}", s(&before));
    let mut peers: Vec<(&str, u64, Run)> = Vec::new();
    let peer_cmds: [(&str, Vec<&str>, usize); 3] = [
        (
            "bsdiff",
            vec!["bsdiff", s(&before), s(&after), s(&patch)],
            1,
        ),
        (
            "xdelta3 -e -s",
            vec![
                "xdelta3",
                "-e",
                "-f",
                "-s",
                s(&before),
                s(&after),
                s(&patch),
            ],
            RUNS,
        ),
        (
            "zstd --patch-from",
            vec!["zstd", "-q", "-f", &patch_from, s(&after), "-o", s(&patch)],
            RUNS,
        ),
    ];
    for (name, argv, runs) in peer_cmds {
        let mut measured = Vec::new();
        for _ in 0..runs {
            measured.push(timed(&argv)?.1);
        }
        peers.push((name, fs::metadata(&patch)?.len(), median(measured)));
    }

    println!(
        "{:<22} {:>12} {:>9} {:>10}",
        "", "bytes", "time s", "peak RSS"
    );
    println!(
        "{:<22} {:>12} {:>9.3} {:>7} MiB   (store file grew {} bytes on disk)",
        "diffkeeper snapshot",
        stored,
        ours.secs,
        ours.rss_kib / 1024,
        disk_growth
    );
    for (name, bytes, run) in &peers {
        println!(
            "{:<22} {:>12} {:>9.3} {:>7} MiB",
            name,
            bytes,
            run.secs,
            run.rss_kib / 1024
        );
    }
    let smallest = peers.iter().min_by_key(|p| p.1).context("no peers")?;
    let fastest = peers
        .iter()
        .min_by(|a, b| a.2.secs.total_cmp(&b.2.secs))
        .context("no peers")?;
    let size_ratio = stored as f64 / smallest.1 as f64;
    let time_ratio = ours.secs / fastest.2.secs;
    let rss_mib = ours.rss_kib as f64 / 1024.0;
    println!(
        "stored / smallest peer ({}): {size_ratio:.2}x (target <= 1.25x) {}",
        smallest.0,
        verdict(size_ratio <= 1.25)
    );
    println!(
        "time / fastest peer ({}): {time_ratio:.2}x (target <= 1.00x) {}",
        fastest.0,
        verdict(time_ratio <= 1.0)
    );
    println!(
        "peak RSS: {rss_mib:.1} MiB (target <= 64 MiB) {}",
        verdict(rss_mib <= 64.0)
    );
    Ok(json!({
        "file_bytes": size,
        "diffkeeper": { "stored_bytes": stored, "disk_growth_bytes": disk_growth, "secs": ours.secs, "rss_kib": ours.rss_kib },
        "peers": peers.iter().map(|(n, b, r)| json!({ "name": n, "bytes": b, "secs": r.secs, "rss_kib": r.rss_kib })).collect::<Vec<_>>(),
        "stored_over_smallest": size_ratio,
        "time_over_fastest": time_ratio,
    }))
}

/// Seeded xorshift bytes: fast and reproducible.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// `len` bytes: random, or text-like (compressible), by `kind`.
    fn fill(&mut self, len: usize, text: bool) -> Vec<u8> {
        const WORDS: [&[u8]; 8] = [
            b"state ", b"player ", b"score\n", b"level ", b"item ", b"42 ", b"tick\n", b"map ",
        ];
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            let r = self.next();
            if text {
                out.extend_from_slice(WORDS[(r % 8) as usize]);
            } else {
                out.extend_from_slice(&r.to_le_bytes());
            }
        }
        out.truncate(len);
        out
    }
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new().write(true).open(path)?;
    file.write_all_at(bytes, offset)?;
    Ok(())
}

fn replay(work: &Path) -> Result<Value> {
    println!("\n== replay: ~1 GiB state with delta chains into an empty directory, against cp -a");
    fresh_dir(work)?;
    let state = work.join("state");
    let store = work.join("store.dk");
    let bin = diffkeeper_binary();
    let mut noise = Noise(0x00d1_ffce_ef00_0001);
    let big = [
        ("big/world.dat", false),
        ("big/checkpoint.bin", false),
        ("big/log-archive.txt", true),
    ];
    fs::create_dir_all(state.join("big"))?;
    for (name, text) in big {
        let mut file = fs::File::create(state.join(name))?;
        for _ in 0..16 {
            file.write_all(&noise.fill(16 << 20, text))?;
        }
    }
    let small_count: u64 = 6000;
    for i in 0..small_count {
        let dir = state.join(format!("small/d{:02}/e{}", i % 40, i % 7));
        fs::create_dir_all(&dir)?;
        let len = 1024 + noise.below(80 * 1024) as usize;
        fs::write(
            dir.join(format!("f{i}.dat")),
            noise.fill(len, i.is_multiple_of(2)),
        )?;
    }
    let snap = |bin: &Path| -> Result<()> {
        checked(
            Command::new(bin)
                .args([
                    "snapshot",
                    "--state-dir",
                    &format!("data={}", s(&state)),
                    "--store",
                    s(&store),
                ])
                .stdout(std::process::Stdio::null()),
        )
    };
    let started = Instant::now();
    snap(&bin)?;
    let rounds = 20;
    for _ in 0..rounds {
        for (name, _) in big {
            let path = state.join(name);
            let len = fs::metadata(&path)?.len();
            for _ in 0..5 {
                let at = noise.below(len - 4096);
                write_at(&path, at, &noise.fill(4096, false))?;
            }
        }
        for _ in 0..100 {
            let i = noise.below(small_count);
            let path = state.join(format!("small/d{:02}/e{}/f{i}.dat", i % 40, i % 7));
            let len = fs::metadata(&path)?.len();
            write_at(
                &path,
                noise.below(len / 2),
                &noise.fill(512, i.is_multiple_of(2)),
            )?;
        }
        snap(&bin)?;
    }
    println!(
        "built {rounds} rounds of history in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let logical = stat_field(&store, "logical_bytes")?;
    let stored = stat_field(&store, "stored_bytes")?;
    let disk = stat_field(&store, "disk_bytes")?;
    let tree_bytes: u64 =
        String::from_utf8_lossy(&Command::new("du").args(["-sb", s(&state)]).output()?.stdout)
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);

    let target = work.join("replayed");
    let copy = work.join("copied");
    // Two conditions, each run starting from flushed dirty pages (`sync`)
    // so neither side pays for the other's write-back: warm (sources in the
    // page cache) and cold (caches dropped: a restarted node reads the store,
    // or the tree, from disk).
    let mut measured = Vec::new();
    for cold in [false, true] {
        let (mut ours, mut cp) = (Vec::new(), Vec::new());
        for _ in 0..REPLAY_RUNS {
            let _ = fs::remove_dir_all(&copy);
            settle(cold)?;
            cp.push(timed(&["cp", "-a", s(&state), s(&copy)])?.1);
            let _ = fs::remove_dir_all(&target);
            settle(cold)?;
            let target_arg = format!("data={}", s(&target));
            ours.push(
                timed(&[
                    s(&bin),
                    "replay",
                    "--state-dir",
                    &target_arg,
                    "--store",
                    s(&store),
                ])?
                .1,
            );
        }
        measured.push((if cold { "cold" } else { "warm" }, median(ours), median(cp)));
    }
    // The replayed tree equals the source, content and modes.
    checked(Command::new("diff").args(["-r", "--no-dereference", "-q", s(&state), s(&target)]))?;
    // Modes of everything, mtimes of files (directory mtimes are not kept).
    let modes = |dir: &Path| -> Result<String> {
        let mut lines = Vec::new();
        for (kind, format) in [("d", "%P %m\\n"), ("f", "%P %m %T@\\n")] {
            let out = Command::new("find")
                .arg(dir)
                .args(["-type", kind, "-printf", format])
                .output()?;
            lines.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_string),
            );
        }
        lines.sort();
        Ok(lines.join("\n"))
    };
    if modes(&state)? != modes(&target)? {
        bail!("replayed tree differs from the source in modes or file mtimes");
    }
    println!(
        "state: {:.2} GiB in {} files",
        tree_bytes as f64 / (1u64 << 30) as f64,
        small_count + 3
    );
    let mut timings = Vec::new();
    for (condition, ours, cp) in &measured {
        let ratio = ours.secs / cp.secs;
        println!(
            "{condition}: diffkeeper replay {:.3} s (peak RSS {} MiB), cp -a {:.3} s: {ratio:.2}x (target <= 1.25x) {}",
            ours.secs,
            ours.rss_kib / 1024,
            cp.secs,
            verdict(ratio <= 1.25)
        );
        timings.push(json!({ "condition": condition, "replay_secs": ours.secs, "replay_rss_kib": ours.rss_kib, "cp_a_secs": cp.secs, "replay_over_cp": ratio }));
    }
    println!(
        "store ratio: {:.2} GiB logical over all versions / {:.3} GiB stored = {:.1}x; store file {:.3} GiB on disk",
        logical as f64 / (1u64 << 30) as f64,
        stored as f64 / (1u64 << 30) as f64,
        logical as f64 / stored.max(1) as f64,
        disk as f64 / (1u64 << 30) as f64
    );
    Ok(json!({
        "tree_bytes": tree_bytes,
        "rounds": rounds,
        "timings": timings,
        "logical_bytes": logical,
        "stored_bytes": stored,
        "store_disk_bytes": disk,
        "store_ratio": logical as f64 / stored.max(1) as f64,
    }))
}

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
    let limit = std::time::Duration::from_secs_f64(seconds);
    let mut calls: u64 = 0;
    while started.elapsed() < limit {
        // 256 calls between clock reads keeps the clock off the profile.
        for _ in 0..256 {
            let file = &handles[(calls % handles.len() as u64) as usize];
            file.write_all_at(&block, (calls % 1024) * 4096)?;
            calls += 1;
        }
        if rate > 0 {
            let due = std::time::Duration::from_secs_f64(calls as f64 / rate as f64);
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

/// Per agent: the writer's reach, and the agent's cost.
struct TracerRun {
    rate: f64,
    calls: u64,
    agent_cpu_secs: f64,
    agent_rss_kib: u64,
    notices: u64,
}

fn tracer_run(work: &Path, backend: Option<&str>, rate: u64) -> Result<TracerRun> {
    let state = work.join("state");
    fresh_dir(&state)?;
    let store = work.join("store.dk");
    let _ = fs::remove_file(&store);
    let stats = work.join("agent.time");
    let log = work.join("agent.log");
    let mut agent = match backend {
        None => None,
        Some(backend) => {
            let child = Command::new("/usr/bin/time")
                .args(["-f", "%U %S %M", "-o"])
                .arg(&stats)
                .arg(diffkeeper_binary())
                .args([
                    "watch",
                    "--state-dir",
                    &format!("data={}", s(&state)),
                    "--store",
                    s(&store),
                ])
                .args(["--backend", backend])
                .stderr(fs::File::create(&log)?)
                .spawn()
                .context("cannot start the agent")?;
            // Let it attach and take its first look.
            std::thread::sleep(std::time::Duration::from_millis(1500));
            Some(child)
        }
    };
    let out = Command::new(std::env::current_exe()?)
        .args([
            "bench-writer",
            s(&state),
            "--rate",
            &rate.to_string(),
            "--seconds",
            "4",
        ])
        .output()
        .context("cannot run the writer")?;
    if !out.status.success() {
        bail!("writer failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report = json_of(&String::from_utf8_lossy(&out.stdout))?;
    let (mut cpu, mut rss, mut notices) = (0.0, 0, 0);
    if let Some(agent) = agent.as_mut() {
        // The agent is /usr/bin/time's child: stop it, and time reports.
        let pid = agent.id();
        checked(Command::new("pkill").args(["-TERM", "-P", &pid.to_string()]))?;
        agent.wait()?;
        let text = fs::read_to_string(&stats)?;
        let fields: Vec<f64> = text
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        if let [user, system, kib] = fields[..] {
            cpu = user + system;
            rss = kib as u64;
        }
        // eBPF: the kernel's event counter; inotify: the notices received.
        let key = if backend == Some("ebpf") {
            "events="
        } else {
            "notices="
        };
        notices = fs::read_to_string(&log)?
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
    Ok(TracerRun {
        rate: report["rate"].as_f64().unwrap_or(0.0),
        calls: report["calls"].as_u64().unwrap_or(0),
        agent_cpu_secs: cpu,
        agent_rss_kib: rss,
        notices,
    })
}

fn tracer(work: &Path) -> Result<Value> {
    println!("\n== tracer: 4 KiB pwrite into a watched tree, no agent vs eBPF vs inotify");
    fresh_dir(work)?;
    let mut rows = Vec::new();
    for (label, rate) in [("full speed", 0u64), ("100k/s", 100_000)] {
        let none = tracer_run(work, None, rate)?;
        println!("{label}: no agent {:.0} calls/s", none.rate);
        for backend in ["ebpf", "inotify"] {
            let run = tracer_run(work, Some(backend), rate)?;
            let ratio = run.rate / none.rate;
            let per_write = run.notices as f64 / run.calls.max(1) as f64;
            println!(
                "{label}: {backend:<7} {:.0} calls/s = {:.3}x of no agent; {:.2e} events/write; agent CPU {:.2} s, peak RSS {} MiB{}",
                run.rate,
                ratio,
                per_write,
                run.agent_cpu_secs,
                run.agent_rss_kib / 1024,
                if rate > 0 && backend == "ebpf" {
                    format!(" (target >= 0.97x: {})", verdict(ratio >= 0.97))
                } else {
                    String::new()
                }
            );
            rows.push(json!({
                "load": label, "backend": backend, "rate": run.rate, "baseline_rate": none.rate,
                "ratio": ratio, "events_per_write": per_write, "agent_cpu_secs": run.agent_cpu_secs,
                "agent_rss_kib": run.agent_rss_kib,
            }));
        }
    }
    Ok(Value::Array(rows))
}
