//! The history benchmark: a week of captures under a daily retention policy.
//!
//! A ~100 MB state ([`FILES`] files of 64-512 KiB, text-like and binary,
//! and a log), then a week of batches, one every [`BATCH_MINUTES`] minutes
//! ([`BATCHES`] in all). Each batch overwrites a few 4 KiB spots in one or
//! two files and appends to the log; every six hours a new file appears and
//! an old one is deleted: ~4% of the tree changes per day. Batches are
//! recorded with `snapshot --time` (and files get the simulated time as
//! their mtime), so a week passes in a minute or two.
//!
//! Measured: the store after the week; `compact` to [`POLICY`] (on copies
//! of that store, [`RUNS`] times, median): its time, the batches and bytes
//! it drops, the file's size after; then `restore` of the oldest kept
//! moment against `restore` of the newest, alternating, [`RUNS`] times each
//! into fresh directories, the newest compared with the live tree, the
//! oldest with a copy of the tree taken when that batch was recorded; and
//! `verify` of the compacted store.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::measure::{
    bytes, field, fresh_dir, grouped, json_of, output, remove_dir, root_arg, settle, store_stats,
    timed, Kind, Measured, Noise, Run,
};
use super::replay::compare_trees;
use super::{Bench, Outcome, RUNS};

const ROOT: &str = "app";
const SEED: u64 = 0x5eed_4157;
const FILES: usize = 350;
const FILE_MIN: u64 = 64 << 10;
const FILE_MAX: u64 = 512 << 10;
const BATCH_MINUTES: i64 = 5;
const BATCHES: usize = 7 * 24 * 60 / BATCH_MINUTES as usize;
/// Every this many batches a file is created and an old one deleted.
const TURNOVER_EVERY: usize = 6 * 60 / BATCH_MINUTES as usize;
const POLICY: [&str; 4] = ["--keep-within", "1d", "--keep-daily", "7"];
/// 2026-11-01T00:00:00Z: the simulated week starts here.
const START_MS: i64 = 1_793_491_200_000;

struct State {
    dir: PathBuf,
    noise: Noise,
    files: Vec<PathBuf>,
    next_id: usize,
    buf: Vec<u8>,
}

impl State {
    fn new_file(&mut self, time: SystemTime) -> Result<()> {
        let len = self.noise.between(FILE_MIN, FILE_MAX) as usize;
        let kind = if self.next_id.is_multiple_of(2) {
            Kind::Text
        } else {
            Kind::Binary
        };
        self.noise.fill(&mut self.buf, len, kind);
        let rel = PathBuf::from(format!(
            "d{:02}/f{:05}.dat",
            self.next_id % 16,
            self.next_id
        ));
        self.next_id += 1;
        let path = self.dir.join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        fs::write(&path, &self.buf).with_context(|| format!("cannot write {}", path.display()))?;
        touch(&path, time)?;
        self.files.push(rel);
        Ok(())
    }

    fn build(&mut self, time: SystemTime) -> Result<()> {
        fresh_dir(&self.dir)?;
        for _ in 0..FILES {
            self.new_file(time)?;
        }
        fs::write(self.dir.join("events.log"), b"")?;
        touch(&self.dir.join("events.log"), time)
    }

    /// One batch's worth of writes, at simulated time `time`.
    fn edit(&mut self, batch: usize, time: SystemTime) -> Result<()> {
        let edited = 1 + self.noise.below(2) as usize;
        for _ in 0..edited {
            let i = self.noise.below(self.files.len() as u64) as usize;
            let path = self.dir.join(&self.files[i]);
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let len = file.metadata()?.len();
            for _ in 0..2 {
                self.noise.fill(&mut self.buf, 4096, Kind::Binary);
                let at = self.noise.below(len.saturating_sub(4096));
                file.write_at(&self.buf, at)?;
            }
            drop(file);
            touch(&path, time)?;
        }
        let log = self.dir.join("events.log");
        self.noise.fill(&mut self.buf, 2048, Kind::Text);
        let mut file = fs::OpenOptions::new().append(true).open(&log)?;
        std::io::Write::write_all(&mut file, &self.buf)?;
        drop(file);
        touch(&log, time)?;
        if batch.is_multiple_of(TURNOVER_EVERY) {
            let old = self
                .files
                .remove(self.noise.below(self.files.len() as u64) as usize);
            fs::remove_file(self.dir.join(&old))?;
            self.new_file(time)?;
        }
        Ok(())
    }
}

fn touch(path: &Path, time: SystemTime) -> Result<()> {
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(time))
        .with_context(|| format!("cannot set the mtime of {}", path.display()))
}

fn simulated(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms as u64)
}

fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(simulated(ms)).to_string()
}

/// Copies a tree with `cp -a`.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    remove_dir(to)?;
    crate::checked(Command::new("cp").arg("-a").arg(from).arg(to))
}

pub fn run(bench: &Bench) -> Result<Outcome> {
    println!(
        "\n== history: a week of batches every {BATCH_MINUTES} min over a ~100 MB tree, then compact {}",
        POLICY.join(" ")
    );
    let source = bench.work.join("state");
    let store = bench.work.join("store.dk");
    let mut state = State {
        dir: source.clone(),
        noise: Noise::new(SEED),
        files: Vec::new(),
        next_id: 0,
        buf: Vec::new(),
    };
    state.build(simulated(START_MS))?;
    let snapshot = |ms: i64| -> Result<Value> {
        let mut c = bench.diffkeeper();
        c.args(["snapshot", "--json", "--state-dir"])
            .arg(root_arg(ROOT, &source))
            .arg("--store")
            .arg(&store)
            .args(["--time", &rfc3339(ms)]);
        json_of(&output(&mut c)?)
    };
    let started = std::time::Instant::now();
    let mut times = Vec::with_capacity(BATCHES);
    // The tree at each moment the policy will keep as its oldest day-mark
    // is not known before compacting: keep a copy at every day boundary's
    // last batch, which is what --keep-daily keeps.
    let mut day_copies: Vec<(u64, PathBuf)> = Vec::new();
    for batch in 0..BATCHES {
        let ms = START_MS + batch as i64 * BATCH_MINUTES * 60_000;
        if batch > 0 {
            state.edit(batch, simulated(ms))?;
        }
        let summary = snapshot(ms)?;
        let id = field(&summary, "batch")?;
        times.push(ms);
        let next_ms = ms + BATCH_MINUTES * 60_000;
        let last_of_day = next_ms.div_euclid(86_400_000) != ms.div_euclid(86_400_000);
        if last_of_day || batch + 1 == BATCHES {
            let copy = bench.work.join(format!("day-{id}"));
            copy_tree(&source, &copy)?;
            day_copies.push((id, copy));
        }
    }
    let recorded = started.elapsed().as_secs_f64();
    let before = store_stats(&bench.bin, &store)?;
    let tree_bytes = dir_bytes(&source)?;
    println!(
        "history: {} batches over 7 simulated days recorded in {recorded:.0} s ({:.1} ms per snapshot); tree {}",
        grouped(BATCHES as u64),
        recorded * 1000.0 / BATCHES as f64,
        bytes(tree_bytes)
    );
    println!(
        "store before compaction: file {}, payload {} for {} logical ({:.1}x)",
        bytes(field(&before, "file_bytes")?),
        bytes(field(&before, "stored_bytes")?),
        bytes(field(&before, "logical_bytes")?),
        before["ratio"].as_f64().unwrap_or(0.0)
    );

    // Compaction, on copies of the week's store. First a policy that keeps
    // everything: what returning scattered free pages alone gives.
    let pristine = bench.work.join("week.dk");
    fs::copy(&store, &pristine).context("cannot copy the store")?;
    let mut c = bench.diffkeeper();
    c.args(["compact", "--json", "--keep-within", "3650d", "--store"])
        .arg(&store);
    let (out, shrink_run) = timed(&c)?;
    let shrink_only = field(&json_of(&out)?, "file_bytes_after")?;
    println!(
        "compact keeping every batch (free pages returned only): file {} -> {} in {:.2} s",
        bytes(field(&before, "file_bytes")?),
        bytes(shrink_only),
        shrink_run.secs
    );
    let mut runs: Vec<Run> = Vec::new();
    let mut summary = Value::Null;
    for _ in 0..RUNS {
        fs::copy(&pristine, &store).context("cannot copy the store")?;
        settle()?;
        let mut c = bench.diffkeeper();
        c.args(["compact", "--json", "--store"])
            .arg(&store)
            .args(POLICY);
        let (out, run) = timed(&c)?;
        summary = json_of(&out)?;
        runs.push(run);
    }
    let compaction = Measured::new(runs);
    let after = store_stats(&bench.bin, &store)?;
    let (file_before, file_after) = (field(&before, "file_bytes")?, field(&after, "file_bytes")?);
    println!(
        "compact {}: {} (peak RSS {:.1} MiB); kept {} of {} batches, {} chunks released, {} rebased",
        POLICY.join(" "),
        compaction.time_text(),
        compaction.rss_mib(),
        field(&summary, "batches_kept")?,
        field(&summary, "batches_before")?,
        grouped(field(&summary, "chunks_released")?),
        grouped(field(&summary, "chunks_rebased")?),
    );
    println!(
        "store after compaction: file {} ({:.1}% of before), payload {}; {} freed",
        bytes(file_after),
        file_after as f64 * 100.0 / file_before.max(1) as f64,
        bytes(field(&after, "stored_bytes")?),
        bytes(field(&summary, "bytes_freed")?),
    );
    let verify = json_of(&output(
        bench
            .diffkeeper()
            .args(["verify", "--json", "--store"])
            .arg(&store),
    )?)?;
    if verify["problems"].as_array().is_some_and(|p| !p.is_empty()) {
        bail!("verify after compaction found problems: {verify}");
    }

    // Restore of the oldest kept moment against the newest.
    let timeline = json_of(&output(
        bench
            .diffkeeper()
            .args(["log", "--batches", "--json", "--store"])
            .arg(&store),
    )?)?;
    let ids: Vec<u64> = timeline
        .as_array()
        .map(|a| a.iter().filter_map(|l| l["batch"].as_u64()).collect())
        .unwrap_or_default();
    let (Some(&oldest), Some(&newest)) = (ids.first(), ids.last()) else {
        bail!("no batches after compaction: {timeline}");
    };
    let Some((_, oldest_copy)) = day_copies.iter().find(|(id, _)| *id == oldest) else {
        bail!("the oldest kept batch {oldest} is not a day's last batch: the policy kept something unexpected");
    };
    let to = bench.work.join("restored");
    let restore = |batch: u64| -> Result<Run> {
        remove_dir(&to)?;
        settle()?;
        let mut c = bench.diffkeeper();
        c.args(["restore", "--store"])
            .arg(&store)
            .arg("--to")
            .arg(&to)
            .args(["--batch", &batch.to_string()]);
        Ok(timed(&c)?.1)
    };
    let (mut old_runs, mut new_runs) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        old_runs.push(restore(oldest)?);
        compare_trees(oldest_copy, &to).context("restore of the oldest kept moment")?;
        new_runs.push(restore(newest)?);
        compare_trees(&source, &to).context("restore of the newest moment")?;
    }
    remove_dir(&to)?;
    let (old, new) = (Measured::new(old_runs), Measured::new(new_runs));
    let ratio = old.secs() / new.secs();
    println!(
        "restore oldest kept (batch {oldest}): {}; newest (batch {newest}): {}; oldest / newest {ratio:.2}x",
        old.time_text(),
        new.time_text()
    );

    let summary_lines = vec![
        format!(
            "history: {} batches in a simulated week over {}: store {} -> {} after compact {} ({:.1}%), compaction {:.2} s",
            grouped(BATCHES as u64),
            bytes(tree_bytes),
            bytes(file_before),
            bytes(file_after),
            POLICY.join(" "),
            file_after as f64 * 100.0 / file_before.max(1) as f64,
            compaction.secs()
        ),
        format!(
            "history: restore oldest kept {:.3} s vs newest {:.3} s = {ratio:.2}x",
            old.secs(),
            new.secs()
        ),
    ];
    Ok(Outcome {
        json: json!({
            "batches": BATCHES,
            "tree_bytes": tree_bytes,
            "record_secs": recorded,
            "policy": POLICY.join(" "),
            "store_before": before,
            "store_after": after,
            "file_bytes_after_keeping_everything": shrink_only,
            "compaction": compaction.to_json(),
            "compact_summary": summary,
            "restore_oldest": old.to_json(),
            "restore_newest": new.to_json(),
            "oldest_kept": oldest,
            "newest": newest,
            "restore_ratio_oldest_to_newest": ratio,
        }),
        summary: summary_lines,
    })
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total)
}
