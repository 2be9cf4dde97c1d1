//! Measuring and reporting: timed commands (wall time, peak RSS through GNU
//! `time`), medians, seeded data, and number formatting.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// One run of a command: wall seconds and peak RSS.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub secs: f64,
    pub rss_kib: u64,
}

/// The runs of one measurement.
#[derive(Clone, Debug)]
pub struct Measured {
    /// In the order they ran.
    pub runs: Vec<Run>,
}

impl Measured {
    pub fn new(runs: Vec<Run>) -> Self {
        Self { runs }
    }

    fn sorted_secs(&self) -> Vec<f64> {
        let mut secs: Vec<f64> = self.runs.iter().map(|r| r.secs).collect();
        secs.sort_by(f64::total_cmp);
        secs
    }

    /// The median wall time (the upper median for an even count).
    pub fn secs(&self) -> f64 {
        let secs = self.sorted_secs();
        secs.get(secs.len() / 2).copied().unwrap_or(f64::NAN)
    }

    /// The fastest run's wall time.
    pub fn min_secs(&self) -> f64 {
        self.sorted_secs().first().copied().unwrap_or(f64::NAN)
    }

    /// The highest peak RSS of all runs, in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.runs.iter().map(|r| r.rss_kib).max().unwrap_or(0) as f64 / 1024.0
    }

    /// "1.234 s (1.2-1.3)": the median and the spread.
    pub fn time_text(&self) -> String {
        let secs = self.sorted_secs();
        match (secs.first(), secs.last()) {
            (Some(lo), Some(hi)) if secs.len() > 1 => {
                format!("{:.3} s ({:.3}-{:.3})", self.secs(), lo, hi)
            }
            _ => format!("{:.3} s", self.secs()),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "secs": self.secs(),
            "peak_rss_kib": self.runs.iter().map(|r| r.rss_kib).max().unwrap_or(0),
            "runs": self.runs.iter().map(|r| json!({ "secs": r.secs, "rss_kib": r.rss_kib })).collect::<Vec<_>>(),
        })
    }
}

/// A command as a shell would show it.
pub fn shown(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `command` under GNU `time`, returning its stdout and its measures;
/// fails, with its stderr, when it fails.
pub fn timed(command: &Command) -> Result<(String, Run)> {
    let rss_file = tempfile::NamedTempFile::new().context("cannot create a temporary file")?;
    let mut wrapped = Command::new("/usr/bin/time");
    wrapped
        .args(["-f", "%M", "-o"])
        .arg(rss_file.path())
        .arg(command.get_program())
        .args(command.get_args());
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    let started = Instant::now();
    let out = wrapped
        .output()
        .with_context(|| format!("cannot run {}", shown(command)))?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            shown(command),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let report = fs::read_to_string(rss_file.path())
        .with_context(|| format!("cannot read {}", rss_file.path().display()))?;
    let rss_kib = report
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("GNU time reported no peak RSS: {report:?}"))?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        Run { secs, rss_kib },
    ))
}

/// Runs `command` untimed, returning its stdout; fails, with its stderr,
/// when it fails.
pub fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {}", shown(command)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            shown(command),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses a command's JSON output.
pub fn json_of(text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("not JSON: {text}"))
}

/// An unsigned field of a JSON object.
pub fn field(value: &Value, name: &str) -> Result<u64> {
    value[name]
        .as_u64()
        .with_context(|| format!("no number {name:?} in {value}"))
}

/// Checks a `snapshot --json` summary: a batch was committed, nothing failed,
/// nothing disturbed it.
pub fn check_snapshot(summary: &Value) -> Result<()> {
    if summary["batch"].is_null() {
        bail!("snapshot committed no batch: {summary}");
    }
    if summary["failures"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
        || summary["disturbed"] == true
    {
        bail!("snapshot reported failures or a disturbed read: {summary}");
    }
    Ok(())
}

/// `diffkeeper stats --json` of a store.
pub fn store_stats(bin: &Path, store: &Path) -> Result<Value> {
    json_of(&output(
        Command::new(bin)
            .args(["stats", "--json", "--store"])
            .arg(store),
    )?)
}

/// A `--state-dir NAME=DIR` argument.
pub fn root_arg(name: &str, dir: &Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(format!("{name}="));
    arg.push(dir);
    arg
}

/// Flushes dirty pages (drops nothing), so a timed run does not pay for the
/// write-back of the one before.
pub fn settle() -> Result<()> {
    crate::checked(&mut Command::new("sync"))
}

/// The type of the file system holding `path`, as `stat -f` names it.
pub fn fs_type(path: &Path) -> Result<String> {
    Ok(
        output(Command::new("stat").args(["-f", "-c", "%T"]).arg(path))?
            .trim()
            .to_string(),
    )
}

/// Whether two files hold the same bytes (read in 1 MiB blocks).
pub fn same_content(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let open = |p: &Path| fs::File::open(p).with_context(|| format!("cannot open {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let lens = (
        fa.metadata().map(|m| m.len()),
        fb.metadata().map(|m| m.len()),
    );
    if let (Ok(la), Ok(lb)) = lens {
        if la != lb {
            return Ok(false);
        }
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na =
            read_full(&mut fa, &mut ba).with_context(|| format!("cannot read {}", a.display()))?;
        let nb =
            read_full(&mut fb, &mut bb).with_context(|| format!("cannot read {}", b.display()))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }

    /// Reads until `buf` is full or the file ends.
    fn read_full(file: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }
}

/// Removes `path` if it exists and creates it empty.
pub fn fresh_dir(path: &Path) -> Result<()> {
    remove_dir(path)?;
    fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))
}

/// Removes the tree at `path`, if there is one.
pub fn remove_dir(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// `12345678` as "12,345,678".
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in binary units: "1.23 GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Seconds as "4 min 05 s".
pub fn minutes(secs: f64) -> String {
    let whole = secs.round() as u64;
    format!("{} min {:02} s", whole / 60, whole % 60)
}

/// A seeded xorshift64 generator: fast, reproducible data.
pub struct Noise(u64);

/// What generated bytes look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Uniformly random: incompressible.
    Binary,
    /// Log-like lines of words and numbers: compresses several times.
    Text,
}

impl Noise {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at zero.
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// Replaces `out` with `len` bytes of `kind`.
    pub fn fill(&mut self, out: &mut Vec<u8>, len: usize, kind: Kind) {
        const WORDS: [&str; 16] = [
            "INFO", "DEBUG", "player", "score", "level", "item", "tick", "map", "session",
            "commit", "flush", "region", "chunk", "entity", "saved", "loaded",
        ];
        out.clear();
        out.reserve(len + 80);
        match kind {
            Kind::Binary => {
                while out.len() < len {
                    out.extend_from_slice(&self.next_u64().to_le_bytes());
                }
            }
            Kind::Text => {
                use std::io::Write;
                while out.len() < len {
                    let r = self.next_u64();
                    // Infallible: writing into a Vec.
                    let _ = writeln!(
                        out,
                        "2024-11-{:02}T{:02}:{:02}:{:02}.{:03}Z {} {}={} {}={}",
                        1 + r % 28,
                        (r >> 5) % 24,
                        (r >> 10) % 60,
                        (r >> 16) % 60,
                        (r >> 22) % 1000,
                        WORDS[((r >> 32) % 2) as usize],
                        WORDS[((r >> 34) % 16) as usize],
                        (r >> 38) % 100_000,
                        WORDS[((r >> 55) % 16) as usize],
                        (r >> 40) % 1000,
                    );
                }
            }
        }
        out.truncate(len);
    }
}

/// User plus system CPU time of process `pid` so far, from /proc.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command name: state is field 3, utime 14 and stime 15.
    let ticks = |n: usize| -> Result<f64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no field {n} in {path}"))
    };
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    Ok((ticks(14)? + ticks(15)?) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_reproducible() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        Noise::new(7).fill(&mut a, 1000, Kind::Text);
        Noise::new(7).fill(&mut b, 1000, Kind::Text);
        assert_eq!(a, b);
        assert_eq!(a.len(), 1000);
    }

    #[test]
    fn numbers_format() {
        assert_eq!(grouped(1234567), "1,234,567");
        assert_eq!(grouped(123), "123");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(minutes(125.0), "2 min 05 s");
    }
}
