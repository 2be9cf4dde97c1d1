//! The delta benchmark: a ~50 MB SQLite database before and after an
//! `UPDATE` of ~1% of its rows, scattered over the file. DiffKeeper stores
//! the old version (untimed), then the timed `snapshot` stores the new one;
//! its stored bytes (and the store file's growth on disk), wall time and
//! peak RSS are set against `bsdiff`, `xdelta3 -9 -e -s` and
//! `zstd --patch-from` making a patch from the same pair. The issue's
//! targets: at most xdelta3 -9's bytes and 1.25x bsdiff's, in at most the
//! time of the faster of the two; zstd --patch-from is shown beside them.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::measure::{
    bytes, check_snapshot, field, fresh_dir, grouped, json_of, output, root_arg, store_stats,
    timed, verdict, Measured,
};
use super::{Bench, Outcome, RUNS};

/// Rows in the table: about 50 MB with 4 KiB pages.
const ROWS: u64 = 470_000;
/// The page size of the database.
const PAGE: usize = 4096;
/// Seeds of SQLite's PRNG for the initial data and for the update.
const CREATE_SEED: u32 = 20_241_124;
const UPDATE_SEED: u32 = 4_242;
/// The targets: stored bytes over bsdiff's and over xdelta3
/// -9's, time over the faster of the two.
const MAX_STORED_OVER_BSDIFF: f64 = 1.25;
const MAX_STORED_OVER_XDELTA3: f64 = 1.0;
const MAX_TIME_OVER_FASTEST: f64 = 1.0;
/// The peers the targets name, as the table names them.
const BSDIFF: &str = "bsdiff";
const XDELTA3: &str = "xdelta3 -9 -e -s";
const MAX_RSS_MIB: f64 = 64.0;

/// The name under which the state directory is kept.
const ROOT: &str = "db";

pub fn run(bench: &Bench) -> Result<Outcome> {
    println!("\n== delta: SQLite database, ~1% of rows updated, scattered");
    let work = &bench.work;
    let before = work.join("before.db");
    let after = work.join("after.db");
    let seeded = make_pair(&before, &after)?;
    let old_len = fs::metadata(&before)
        .with_context(|| format!("cannot stat {}", before.display()))?
        .len();
    let new_len = fs::metadata(&after)
        .with_context(|| format!("cannot stat {}", after.display()))?
        .len();
    let (changed_pages, pages) = changed_pages(&before, &after)?;
    println!(
        "pair: {} -> {} bytes ({} rows, {PAGE} B pages); {} of {} pages differ ({:.1}%){}",
        grouped(old_len),
        grouped(new_len),
        grouped(ROWS),
        grouped(changed_pages),
        grouped(pages),
        100.0 * changed_pages as f64 / pages.max(1) as f64,
        if seeded {
            ""
        } else {
            "; this sqlite3 cannot seed its PRNG, so the data differ from run to run"
        }
    );

    let ours = diffkeeper(bench, &before, &after)?;

    let mut peers = Vec::new();
    let patch_from = {
        let mut arg = std::ffi::OsString::from("--patch-from=");
        arg.push(&before);
        arg
    };
    let peer_commands: [(&str, &str, Command); 3] = [
        (BSDIFF, "patch.bsdiff", {
            let mut c = Command::new("bsdiff");
            c.arg(&before).arg(&after).arg(work.join("patch.bsdiff"));
            c
        }),
        (XDELTA3, "patch.xd3", {
            let mut c = Command::new("xdelta3");
            c.args(["-9", "-e", "-f", "-s"])
                .arg(&before)
                .arg(&after)
                .arg(work.join("patch.xd3"));
            c
        }),
        ("zstd --patch-from", "patch.zst", {
            let mut c = Command::new("zstd");
            c.args(["-q", "-f"])
                .arg(&patch_from)
                .arg(&after)
                .arg("-o")
                .arg(work.join("patch.zst"));
            c
        }),
    ];
    for (name, patch, command) in &peer_commands {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(timed(command)?.1);
        }
        let path = work.join(patch);
        let size = fs::metadata(&path)
            .with_context(|| format!("{name} made no {}", path.display()))?
            .len();
        peers.push(Peer {
            name,
            bytes: size,
            measured: Measured::new(runs),
        });
    }

    println!(
        "{:<24} {:>12} {:>8} {:>28} {:>11}",
        "", "bytes", "of file", "wall time: median (range)", "peak RSS"
    );
    let row = |name: &str, size: u64, measured: Option<&Measured>| {
        println!(
            "{:<24} {:>12} {:>7.3}% {:>28} {:>11}",
            name,
            grouped(size),
            100.0 * size as f64 / new_len as f64,
            measured.map(Measured::time_text).unwrap_or_default(),
            measured
                .map(|m| format!("{:.1} MiB", m.rss_mib()))
                .unwrap_or_default(),
        );
    };
    row("diffkeeper snapshot", ours.stored, Some(&ours.measured));
    row("  (store growth on disk)", ours.disk_growth, None);
    for peer in &peers {
        row(peer.name, peer.bytes, Some(&peer.measured));
    }

    let peer = |name: &str| {
        peers
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("{name} was not measured"))
    };
    let (bsdiff, xdelta3) = (peer(BSDIFF)?, peer(XDELTA3)?);
    let fastest = if bsdiff.measured.secs() <= xdelta3.measured.secs() {
        bsdiff
    } else {
        xdelta3
    };
    let over_bsdiff = ours.stored as f64 / bsdiff.bytes as f64;
    let over_xdelta3 = ours.stored as f64 / xdelta3.bytes as f64;
    let disk_ratio = ours.disk_growth as f64 / xdelta3.bytes as f64;
    let time_ratio = ours.measured.secs() / fastest.measured.secs();
    let rss_mib = ours.measured.rss_mib();
    let bsdiff_ok = over_bsdiff <= MAX_STORED_OVER_BSDIFF;
    let xdelta3_ok = over_xdelta3 <= MAX_STORED_OVER_XDELTA3;
    let time_ok = time_ratio <= MAX_TIME_OVER_FASTEST;
    let rss_ok = rss_mib <= MAX_RSS_MIB;
    let lines = [
        format!(
            "stored {} B = {over_xdelta3:.3}x {XDELTA3} (target <= {MAX_STORED_OVER_XDELTA3:.2}x) {}; store growth on disk {disk_ratio:.2}x",
            grouped(ours.stored),
            verdict(xdelta3_ok)
        ),
        format!(
            "stored {} B = {over_bsdiff:.2}x {BSDIFF} (target <= {MAX_STORED_OVER_BSDIFF:.2}x) {}",
            grouped(ours.stored),
            verdict(bsdiff_ok)
        ),
        format!(
            "time {:.3} s = {time_ratio:.2}x {} (the faster of the two; target <= {MAX_TIME_OVER_FASTEST:.2}x) {}",
            ours.measured.secs(),
            fastest.name,
            verdict(time_ok)
        ),
        format!(
            "peak RSS {rss_mib:.1} MiB (target <= {MAX_RSS_MIB:.0} MiB) {}",
            verdict(rss_ok)
        ),
    ];
    for line in &lines {
        println!("{line}");
    }
    println!("replay of the store reproduces after.db byte for byte: yes");
    let summary = lines.iter().map(|line| format!("delta   {line}")).collect();
    Ok(Outcome {
        json: json!({
            "rows": ROWS,
            "seeded": seeded,
            "old_bytes": old_len,
            "new_bytes": new_len,
            "pages": pages,
            "changed_pages": changed_pages,
            "diffkeeper": {
                "stored_bytes": ours.stored,
                "store_disk_growth_bytes": ours.disk_growth,
                "stored_bytes_per_run": ours.stored_per_run,
                "time": ours.measured.to_json(),
                "replay_reproduces_after": true,
            },
            "peers": peers.iter().map(|p| json!({
                "name": p.name,
                "bytes": p.bytes,
                "time": p.measured.to_json(),
            })).collect::<Vec<_>>(),
            "fastest_peer": fastest.name,
            "stored_over_bsdiff": over_bsdiff,
            "stored_over_xdelta3": over_xdelta3,
            "disk_growth_over_xdelta3": disk_ratio,
            "time_over_fastest": time_ratio,
            "peak_rss_mib": rss_mib,
            "targets": {
                "stored_over_bsdiff": { "max": MAX_STORED_OVER_BSDIFF, "pass": bsdiff_ok },
                "stored_over_xdelta3": { "max": MAX_STORED_OVER_XDELTA3, "pass": xdelta3_ok },
                "time_over_fastest": { "max": MAX_TIME_OVER_FASTEST, "pass": time_ok },
                "peak_rss_mib": { "max": MAX_RSS_MIB, "pass": rss_ok },
            },
        }),
        summary,
    })
}

struct Peer {
    name: &'static str,
    bytes: u64,
    measured: Measured,
}

/// DiffKeeper's measures on the pair.
struct Ours {
    /// `stored_bytes` of the timed snapshot (the last run's).
    stored: u64,
    stored_per_run: Vec<u64>,
    /// Growth of the store's disk bytes over the timed snapshot (last run).
    disk_growth: u64,
    measured: Measured,
}

/// Creates the database `before` (seeded) and `after`, a copy with ~1% of
/// its rows updated. Returns whether sqlite3 could seed its PRNG.
fn make_pair(before: &Path, after: &Path) -> Result<bool> {
    let seeded = sqlite_seeds()?;
    let seed = |n: u32| seeded.then(|| format!(".testctrl prng_seed {n}"));
    let mut create = Command::new("sqlite3");
    create.arg(before).args(seed(CREATE_SEED)).arg(format!(
        "PRAGMA page_size={PAGE};
         CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, score INTEGER, payload BLOB);
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<{ROWS})
         INSERT INTO t SELECT x, 'user-'||x, abs(random()%100000), randomblob(80) FROM c;"
    ));
    output(&mut create)?;
    fs::copy(before, after)
        .with_context(|| format!("cannot copy {} to {}", before.display(), after.display()))?;
    let mut update = Command::new("sqlite3");
    update.arg(after).args(seed(UPDATE_SEED)).arg(format!(
        "UPDATE t SET score=abs(random()%100000) WHERE id IN (SELECT abs(random()%{ROWS})+1 FROM t LIMIT {});",
        ROWS / 100
    ));
    output(&mut update)?;
    Ok(seeded)
}

/// Whether `.testctrl prng_seed` makes sqlite3's `random()` reproducible.
fn sqlite_seeds() -> Result<bool> {
    let probe = || {
        Command::new("sqlite3")
            .args([
                ":memory:",
                ".testctrl prng_seed 1",
                "SELECT hex(randomblob(16));",
            ])
            .output()
            .context("cannot run sqlite3")
    };
    let (a, b) = (probe()?, probe()?);
    Ok(a.status.success() && b.status.success() && !a.stdout.is_empty() && a.stdout == b.stdout)
}

/// Pages of `after` that differ from `before` (pages past the end of
/// `before` count as differing), and `after`'s page count.
fn changed_pages(before: &Path, after: &Path) -> Result<(u64, u64)> {
    let old = fs::read(before).with_context(|| format!("cannot read {}", before.display()))?;
    let new = fs::read(after).with_context(|| format!("cannot read {}", after.display()))?;
    let mut changed = 0;
    let mut pages = 0;
    for (i, page) in new.chunks(PAGE).enumerate() {
        pages += 1;
        if old.get(i * PAGE..i * PAGE + page.len()) != Some(page) {
            changed += 1;
        }
    }
    Ok((changed, pages))
}

/// Times the snapshot of `after` over a store holding `before`, [`RUNS`]
/// times from a fresh store, then checks that the store replays `after`.
fn diffkeeper(bench: &Bench, before: &Path, after: &Path) -> Result<Ours> {
    let state = bench.work.join("state");
    let store = bench.work.join("store.dk");
    let file = state.join("data.db");
    let snapshot = |json: bool| {
        let mut c = bench.diffkeeper();
        c.arg("snapshot");
        if json {
            c.arg("--json");
        }
        c.arg("--state-dir")
            .arg(root_arg(ROOT, &state))
            .arg("--store")
            .arg(&store);
        c
    };
    let mut runs = Vec::new();
    let mut stored_per_run = Vec::new();
    let mut disk_growth = 0;
    for _ in 0..RUNS {
        fresh_dir(&state)?;
        if store.exists() {
            fs::remove_file(&store)
                .with_context(|| format!("cannot remove {}", store.display()))?;
        }
        fs::copy(before, &file).with_context(|| format!("cannot write {}", file.display()))?;
        check_snapshot(&json_of(&output(&mut snapshot(true))?)?)?;
        let disk_before = field(&store_stats(&bench.bin, &store)?, "disk_bytes")?;
        // In place: fs::copy truncates and rewrites the same inode.
        fs::copy(after, &file).with_context(|| format!("cannot write {}", file.display()))?;
        let (out, run) = timed(&snapshot(true))?;
        let summary = json_of(&out)?;
        check_snapshot(&summary)?;
        if field(&summary, "changed")? != 1 {
            bail!("the second snapshot should record one changed file: {summary}");
        }
        stored_per_run.push(field(&summary, "stored_bytes")?);
        disk_growth =
            field(&store_stats(&bench.bin, &store)?, "disk_bytes")?.saturating_sub(disk_before);
        runs.push(run);
    }

    // Sanity: the store gives back `after` exactly.
    let replayed = bench.work.join("replayed");
    fresh_dir(&replayed)?;
    output(
        bench
            .diffkeeper()
            .arg("replay")
            .arg("--state-dir")
            .arg(root_arg(ROOT, &replayed))
            .arg("--store")
            .arg(&store),
    )?;
    let got = replayed.join("data.db");
    if !super::measure::same_content(&got, after)? {
        bail!(
            "replay of {} gives a {} that differs from {} ({} vs {} bytes)",
            store.display(),
            got.display(),
            after.display(),
            fs::metadata(&got).map(|m| m.len()).unwrap_or(0),
            fs::metadata(after).map(|m| m.len()).unwrap_or(0),
        );
    }
    let stored = stored_per_run.last().copied().unwrap_or(0);
    if stored_per_run.iter().any(|&s| s != stored) {
        println!("note: stored bytes vary between runs: {stored_per_run:?}");
    }
    let stats = store_stats(&bench.bin, &store)?;
    println!(
        "diffkeeper store holding both versions: {} stored in a {} file ({} on disk)",
        bytes(field(&stats, "stored_bytes")?),
        bytes(field(&stats, "file_bytes")?),
        bytes(field(&stats, "disk_bytes")?),
    );
    Ok(Ours {
        stored,
        stored_per_run,
        disk_growth,
        measured: Measured::new(runs),
    })
}
