//! The replay benchmark and the store ratio.
//!
//! A ~1 GiB state: three 256 MiB files (incompressible, log-like text, and
//! a mix of both in 64 KiB segments), 6000 files of 1-64 KiB (text-like and
//! binary) in nested directories, a few symlinks (one dangling) and assorted
//! modes. After the first snapshot, [`ROUNDS`] rounds each edit every large
//! file in place at a few random spots and ~100 small files (overwrites,
//! appends, rewrites), create and delete a few files and change a mode, and
//! snapshot, so the large files end with 20-deep delta chains.
//!
//! Then `diffkeeper replay` into an empty directory is timed against
//! `cp -a` of the materialized tree, both warm in the page cache (the tree
//! and the store were just written; nothing is dropped), alternating, after
//! [`WARM_UP_RUNS`] untimed runs of each, [`REPLAY_RUNS`] times each, each
//! into a fresh destination. Before each run, `sync` flushes the previous
//! run's writes (so no run pays for another's write-back), then the
//! previous destination is removed and the run starts at once.
//!
//! That order matters on these VMs: memory freed by the removal is handed
//! back to the host (virtio-balloon free page reporting) within seconds,
//! and a run that must fault 1 GiB of page cache back in from the host is
//! up to 3x slower, `cp -a` more so than replay; DAMON likewise pages out
//! memory idle for about a minute. Starting right after the removal reuses
//! the freed pages, which makes the runs steady. On ext4, creating files
//! soon after deleting a tree is also slowed by the inode allocator
//! skipping recently deleted inodes (`recently_deleted`), by an amount that
//! depends on the block group the new files land in and on whether the
//! removed tree was written a second ago (so the runs strictly alternate):
//! hence more runs than elsewhere, and the best runs' ratio beside the
//! medians'.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::measure::{
    bytes, check_snapshot, field, fresh_dir, grouped, json_of, remove_dir, root_arg, same_content,
    settle, store_stats, timed, verdict, Kind, Measured, Noise, Run,
};
use super::{Bench, Outcome};

/// The large files: path and content.
const BIG_FILES: [(&str, Layout); 3] = [
    ("big/world.dat", Layout::Uniform(Kind::Binary)),
    ("big/events.log", Layout::Uniform(Kind::Text)),
    ("big/db/pages.bin", Layout::Mixed),
];
const BIG_LEN: u64 = 256 << 20;
/// Spots edited in each large file per round, and their largest length.
const BIG_SPOTS: usize = 8;
const BIG_SPOT_MAX: u64 = 64 << 10;
const SMALL_FILES: usize = 6000;
const SMALL_MIN: u64 = 1 << 10;
const SMALL_MAX: u64 = 64 << 10;
/// Small files edited per round.
const SMALL_EDITS: usize = 100;
/// Small files created and deleted per round.
const SMALL_NEW: usize = 3;
const SMALL_DELETED: usize = 2;
const ROUNDS: usize = 20;
const SEED: u64 = 0x00d1_ffce_ef00_0001;
/// Segments of a [`Layout::Mixed`] file.
const SEGMENT: usize = 64 << 10;
/// Timed replay and copy runs (more than [`super::RUNS`]: they vary more).
const REPLAY_RUNS: usize = 7;
/// Untimed runs of each first: the first few runs on a VM are slow.
const WARM_UP_RUNS: usize = 2;
/// The target: replay at most this many times `cp -a`'s time.
const MAX_REPLAY_OVER_CP: f64 = 1.25;

/// The name under which the state directory is kept.
const ROOT: &str = "data";

#[derive(Clone, Copy, Debug)]
enum Layout {
    Uniform(Kind),
    /// 64 KiB segments, each binary or text at random.
    Mixed,
}

/// The state directory being built and edited.
struct State {
    dir: PathBuf,
    noise: Noise,
    /// Live small files: path relative to `dir`, and content kind.
    small: Vec<(String, Kind)>,
    next_id: usize,
    buf: Vec<u8>,
}

impl State {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// `len` bytes laid out as `layout`, into `self.buf`.
    fn content(&mut self, len: usize, layout: Layout) {
        match layout {
            Layout::Uniform(kind) => self.noise.fill(&mut self.buf, len, kind),
            Layout::Mixed => {
                let mut out = std::mem::take(&mut self.buf);
                out.clear();
                let mut segment = Vec::with_capacity(SEGMENT);
                while out.len() < len {
                    let kind = if self.noise.below(2) == 0 {
                        Kind::Binary
                    } else {
                        Kind::Text
                    };
                    self.noise
                        .fill(&mut segment, SEGMENT.min(len - out.len()), kind);
                    out.extend_from_slice(&segment);
                }
                self.buf = out;
            }
        }
    }

    fn write_new(&mut self, rel: &str, len: usize, kind: Kind, mode: u32) -> Result<()> {
        let path = self.path(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        self.noise.fill(&mut self.buf, len, kind);
        fs::write(&path, &self.buf).with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot chmod {}", path.display()))
    }

    /// A new small file with the next number.
    fn add_small(&mut self) -> Result<()> {
        let i = self.next_id;
        self.next_id += 1;
        let kind = if i.is_multiple_of(2) {
            Kind::Text
        } else {
            Kind::Binary
        };
        let deep = if i.is_multiple_of(7) { "deep/er/" } else { "" };
        let rel = format!(
            "small/g{:02}/h{}/{deep}f{i:05}.{}",
            i % 30,
            (i / 30) % 5,
            if kind == Kind::Text { "txt" } else { "bin" }
        );
        let mode = if i.is_multiple_of(10) {
            0o600
        } else if i.is_multiple_of(23) {
            0o755
        } else {
            0o644
        };
        let len = self.noise.between(SMALL_MIN, SMALL_MAX) as usize;
        self.write_new(&rel, len, kind, mode)?;
        self.small.push((rel, kind));
        Ok(())
    }

    /// The initial tree.
    fn build(&mut self) -> Result<()> {
        for (rel, layout) in BIG_FILES {
            let path = self.path(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            let mut file = fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            for _ in 0..BIG_LEN >> 20 {
                self.content(1 << 20, layout);
                file.write_all(&self.buf)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
        for _ in 0..SMALL_FILES {
            self.add_small()?;
        }
        for (rel, mode) in [("small/g00", 0o750), ("small/g01/h1", 0o700)] {
            let path = self.path(rel);
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot chmod {}", path.display()))?;
        }
        for (link, target) in [
            ("current.log", "big/events.log"),
            ("small/latest", "g02/h1"),
            ("small/dangling", "../nowhere/at/all"),
        ] {
            let path = self.path(link);
            std::os::unix::fs::symlink(target, &path)
                .with_context(|| format!("cannot create the symlink {}", path.display()))?;
        }
        Ok(())
    }

    /// One round of edits.
    fn edit(&mut self) -> Result<()> {
        for (rel, layout) in BIG_FILES {
            let path = self.path(rel);
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            for _ in 0..BIG_SPOTS {
                let len = self.noise.between(512, BIG_SPOT_MAX);
                let at = self.noise.below(BIG_LEN - len);
                self.content(len as usize, layout);
                file.write_all_at(&self.buf, at)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
        for edit in 0..SMALL_EDITS {
            let pick = self.noise.below(self.small.len() as u64) as usize;
            let (rel, kind) = self.small[pick].clone();
            let path = self.path(&rel);
            let len = fs::metadata(&path)
                .with_context(|| format!("cannot stat {}", path.display()))?
                .len();
            // 70% overwrite a range in place, 20% append, 10% rewrite.
            if edit % 10 < 7 {
                let n = self.noise.between(64, 4096).min(len);
                let at = self.noise.below(len - n + 1);
                self.noise.fill(&mut self.buf, n as usize, kind);
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                file.write_all_at(&self.buf, at)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            } else if edit % 10 < 9 {
                let n = self.noise.between(16, 2048) as usize;
                self.noise.fill(&mut self.buf, n, kind);
                fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(&self.buf))
                    .with_context(|| format!("cannot append to {}", path.display()))?;
            } else {
                let n = self.noise.between(SMALL_MIN, SMALL_MAX) as usize;
                self.noise.fill(&mut self.buf, n, kind);
                fs::write(&path, &self.buf)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
        for _ in 0..SMALL_NEW {
            self.add_small()?;
        }
        for _ in 0..SMALL_DELETED {
            let pick = self.noise.below(self.small.len() as u64) as usize;
            let (rel, _) = self.small.swap_remove(pick);
            let path = self.path(&rel);
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        let pick = self.noise.below(self.small.len() as u64) as usize;
        let path = self.path(&self.small[pick].0);
        let mode = fs::metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?
            .mode()
            & 0o7777;
        let mode = if mode == 0o600 { 0o644 } else { 0o600 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot chmod {}", path.display()))
    }
}

pub fn run(bench: &Bench) -> Result<Outcome> {
    println!("\n== replay: ~1 GiB state with delta chains into an empty directory, against cp -a");
    let source = bench.work.join("state");
    let store = bench.work.join("store.dk");
    fresh_dir(&source)?;
    let mut state = State {
        dir: source.clone(),
        noise: Noise::new(SEED),
        small: Vec::new(),
        next_id: 0,
        buf: Vec::new(),
    };
    let started = std::time::Instant::now();
    state.build()?;
    let built = started.elapsed().as_secs_f64();

    let snapshot = || {
        let mut c = bench.diffkeeper();
        c.args(["snapshot", "--json", "--state-dir"])
            .arg(root_arg(ROOT, &source))
            .arg("--store")
            .arg(&store);
        c
    };
    let (out, first) = timed(&snapshot())?;
    check_snapshot(&json_of(&out)?)?;
    let mut rounds = Vec::new();
    let mut round_stored = Vec::new();
    for _ in 0..ROUNDS {
        state.edit()?;
        let (out, run) = timed(&snapshot())?;
        let summary = json_of(&out)?;
        check_snapshot(&summary)?;
        round_stored.push(field(&summary, "stored_bytes")?);
        rounds.push(run);
    }
    let first = Measured::new(vec![first]);
    let rounds = Measured::new(rounds);
    let tree = tree(&source)?;
    println!(
        "state: {} in {} files ({} large), {} dirs, {} symlinks; written in {built:.1} s",
        bytes(tree.file_bytes),
        grouped(tree.files),
        BIG_FILES.len(),
        grouped(tree.dirs),
        tree.symlinks
    );
    println!(
        "history: first snapshot {} (peak RSS {:.1} MiB); {ROUNDS} rounds of edits, each snapshot {} (peak RSS {:.1} MiB), {} stored per round on average",
        first.time_text(),
        first.rss_mib(),
        rounds.time_text(),
        rounds.rss_mib(),
        bytes(round_stored.iter().sum::<u64>() / ROUNDS.max(1) as u64),
    );

    // Replay against cp -a, strictly alternating: a run that directly
    // follows one of its own kind (deleting a tree made a second ago) is
    // much slower on ext4, whichever tool it is.
    let replayed = bench.work.join("replayed");
    let copied = bench.work.join("copied");
    let replay_once = || -> Result<(String, Run)> {
        settle()?;
        fresh_dir(&replayed)?;
        let mut c = bench.diffkeeper();
        c.args(["replay", "--json", "--state-dir"])
            .arg(root_arg(ROOT, &replayed))
            .arg("--store")
            .arg(&store);
        timed(&c)
    };
    let copy_once = || -> Result<Run> {
        settle()?;
        remove_dir(&copied)?;
        let mut c = Command::new("cp");
        c.arg("-a").arg(&source).arg(&copied);
        Ok(timed(&c)?.1)
    };
    // Untimed: settles the page cache and the VM's memory.
    for _ in 0..WARM_UP_RUNS {
        copy_once()?;
        replay_once()?;
    }
    let (mut ours, mut cp) = (Vec::new(), Vec::new());
    let mut replay_summary = Value::Null;
    for _ in 0..REPLAY_RUNS {
        cp.push(copy_once()?);
        let (out, run) = replay_once()?;
        replay_summary = json_of(&out)?;
        ours.push(run);
    }
    let ours = Measured::new(ours);
    let cp = Measured::new(cp);
    compare_trees(&source, &replayed)?;
    remove_dir(&copied)?;

    let ratio = ours.secs() / cp.secs();
    let ok = ratio <= MAX_REPLAY_OVER_CP;
    let best_ratio = ours.min_secs() / cp.min_secs();
    let best_ok = best_ratio <= MAX_REPLAY_OVER_CP;
    println!(
        "{:<20} {:>28} {:>11}",
        "", "wall time: median (range)", "peak RSS"
    );
    for (name, m) in [("diffkeeper replay", &ours), ("cp -a", &cp)] {
        println!("{name:<20} {:>28} {:>7.1} MiB", m.time_text(), m.rss_mib());
    }
    println!(
        "replay / cp -a (medians): {ratio:.2}x (target <= {MAX_REPLAY_OVER_CP:.2}x) {}; best runs: {best_ratio:.2}x {}",
        verdict(ok),
        verdict(best_ok)
    );
    println!(
        "replayed tree equals the source: {} files, {} dirs, {} symlinks; content, types, modes, file mtimes, link targets",
        grouped(tree.files),
        grouped(tree.dirs),
        tree.symlinks
    );

    // The store ratio.
    println!("\n== store ratio: the replay workload's store");
    let stats = store_stats(&bench.bin, &store)?;
    let logical = field(&stats, "logical_bytes")?;
    let stored = field(&stats, "stored_bytes")?;
    let file_bytes = field(&stats, "file_bytes")?;
    let disk = field(&stats, "disk_bytes")?;
    let store_ratio = logical as f64 / stored.max(1) as f64;
    println!(
        "{} versions in {} batches, {} chunks",
        grouped(field(&stats, "versions")?),
        grouped(field(&stats, "batches")?),
        grouped(field(&stats, "chunks")?)
    );
    println!(
        "logical bytes (every version) {} / stored bytes {} = {store_ratio:.1}x",
        bytes(logical),
        bytes(stored)
    );
    println!(
        "store file {} long, {} on disk = {:.2}x the live tree ({})",
        bytes(file_bytes),
        bytes(disk),
        disk as f64 / tree.file_bytes.max(1) as f64,
        bytes(tree.file_bytes)
    );

    let summary = vec![
        format!(
            "replay  {:.3} s vs cp -a {:.3} s = {ratio:.2}x (target <= {MAX_REPLAY_OVER_CP:.2}x) {}; best runs {best_ratio:.2}x {}; peak RSS {:.1} MiB; tree identical",
            ours.secs(),
            cp.secs(),
            verdict(ok),
            verdict(best_ok),
            ours.rss_mib()
        ),
        format!(
            "store   {store_ratio:.1}x logical/stored ({} / {}); store {} on disk for a {} tree",
            bytes(logical),
            bytes(stored),
            bytes(disk),
            bytes(tree.file_bytes)
        ),
    ];
    Ok(Outcome {
        json: json!({
            "tree": {
                "file_bytes": tree.file_bytes,
                "files": tree.files,
                "dirs": tree.dirs,
                "symlinks": tree.symlinks,
            },
            "rounds": ROUNDS,
            "first_snapshot": first.to_json(),
            "round_snapshots": rounds.to_json(),
            "round_stored_bytes": round_stored,
            "replay": ours.to_json(),
            "replay_summary": replay_summary,
            "cp_a": cp.to_json(),
            "replay_over_cp": ratio,
            "replay_over_cp_best_runs": best_ratio,
            "replayed_tree_equal": true,
            "target": { "max": MAX_REPLAY_OVER_CP, "pass": ok, "pass_best_runs": best_ok },
            "store": {
                "logical_bytes": logical,
                "stored_bytes": stored,
                "ratio": store_ratio,
                "file_bytes": file_bytes,
                "disk_bytes": disk,
                "stats": stats,
            },
        }),
        summary,
    })
}

/// One entry of a tree, as compared.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir { mode: u32 },
    File { mode: u32, len: u64, mtime_ns: i128 },
    Symlink { target: PathBuf },
    Other { mode: u32 },
}

/// Every entry under `root` (the root itself as ""), by relative path.
fn walk(root: &Path) -> Result<BTreeMap<PathBuf, Entry>> {
    let mut entries = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?;
        let mode = meta.mode() & 0o7777;
        let kind = meta.file_type();
        let entry = if kind.is_dir() {
            for child in
                fs::read_dir(&path).with_context(|| format!("cannot list {}", path.display()))?
            {
                let child = child.with_context(|| format!("cannot list {}", path.display()))?;
                pending.push(rel.join(child.file_name()));
            }
            Entry::Dir { mode }
        } else if kind.is_file() {
            Entry::File {
                mode,
                len: meta.len(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            }
        } else if kind.is_symlink() {
            Entry::Symlink {
                target: fs::read_link(&path)
                    .with_context(|| format!("cannot read the link {}", path.display()))?,
            }
        } else {
            Entry::Other { mode }
        };
        entries.insert(rel, entry);
    }
    Ok(entries)
}

/// Counts of a tree.
struct Tree {
    files: u64,
    dirs: u64,
    symlinks: u64,
    file_bytes: u64,
}

fn tree(root: &Path) -> Result<Tree> {
    let mut tree = Tree {
        files: 0,
        dirs: 0,
        symlinks: 0,
        file_bytes: 0,
    };
    for entry in walk(root)?.values() {
        match entry {
            Entry::Dir { .. } => tree.dirs += 1,
            Entry::File { len, .. } => {
                tree.files += 1;
                tree.file_bytes += len;
            }
            Entry::Symlink { .. } => tree.symlinks += 1,
            Entry::Other { .. } => {}
        }
    }
    Ok(tree)
}

/// Fails naming the differences (up to 10) unless the trees hold the same
/// paths with the same types, modes, file lengths, mtimes and content, and
/// symlink targets.
pub(super) fn compare_trees(source: &Path, copy: &Path) -> Result<()> {
    let (a, b) = (walk(source)?, walk(copy)?);
    let mut problems = Vec::new();
    for (rel, want) in &a {
        match b.get(rel) {
            None => problems.push(format!("{}: missing", rel.display())),
            Some(got) if got != want => {
                problems.push(format!("{}: {want:?} became {got:?}", rel.display()))
            }
            Some(Entry::File { .. }) => {
                if !same_content(&source.join(rel), &copy.join(rel))? {
                    problems.push(format!("{}: content differs", rel.display()));
                }
            }
            Some(_) => {}
        }
    }
    for rel in b.keys().filter(|rel| !a.contains_key(*rel)) {
        problems.push(format!("{}: not in the source", rel.display()));
    }
    if !problems.is_empty() {
        let shown: Vec<&str> = problems.iter().take(10).map(String::as_str).collect();
        bail!(
            "the replayed tree {} differs from {} in {} paths:\n  {}",
            copy.display(),
            source.display(),
            problems.len(),
            shown.join("\n  ")
        );
    }
    Ok(())
}
