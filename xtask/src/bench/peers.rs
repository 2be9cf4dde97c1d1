//! The peers benchmark (issue 12): the store against the repositories of
//! backup tools on the same histories, in one run.
//!
//! Method (`../shared/notes/peer-benchmark.md`): one history per tool and
//! workload. Each round's edits are applied once to the live tree, then
//! every tool backs up that same tree, the order rotated by one tool each
//! round. The latest and the oldest state are then restored by each tool,
//! [`RUNS`] times each, rotated, with `cp -a` of the live tree in the
//! rotation; every restore is checked against the tree as it was (SHA-256
//! and mode of every file, every directory). GNU `time` gives wall time and
//! peak RSS.
//!
//! Tools: DiffKeeper (`snapshot`, `replay`), restic 0.14 (repository v2,
//! `--compression auto` and `max`), borg 1.2 (`-e none`, `zstd,3` and
//! `lz4`), casync (`make`, `extract`).
//!
//! Workloads (seeded): `world` (a game world: region files of 1-4 MB of
//! mixed content, 1,920 small JSON-like files, a log; 30 rounds of a few
//! 4 KiB blocks overwritten, the log grown, 5 files created and 2 deleted),
//! `sqlite` (a ~85 MB table with an index; 20 rounds of 0.5% of rows
//! updated and 500 inserted), `checkpoint` (a 200 MB float32 `.npy`, 2% of
//! values perturbed a round, 10 rounds, in place and by rename in turn),
//! `small` (50,000 text files of 100 B-8 KiB in 1,000 directories; 10
//! rounds touching 100 files), `python` (Debian's own
//! `/usr/lib/python3/dist-packages`, 5 rounds of 0.5% of files edited).
//! `BENCH_PEERS=small,python` picks some.
//!
//! Targets (issue 12): the store file's apparent size at most 0.8x the
//! smallest peer repository's and its allocated size at most its apparent
//! size (in whole blocks per file, plus ext2/3's block maps); a round at most the fastest peer's; restores at most the fastest
//! peer's and at most 1.25x `cp -a`; peak RSS at most 64 MiB.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::measure::{
    bytes, fresh_dir, json_of, output, root_arg, timed, verdict, Kind, Measured, Noise, Run,
};
use super::{Bench, Outcome, RUNS};

const MAX_SIZE_OVER_SMALLEST: f64 = 0.8;
const MAX_RESTORE_OVER_CP: f64 = 1.25;
const MAX_RSS_MIB: f64 = 64.0;

/// A tool and how it is asked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    DiffKeeper,
    Restic(&'static str),
    Borg(&'static str),
    Casync,
}

const TOOLS: [Tool; 6] = [
    Tool::DiffKeeper,
    Tool::Restic("auto"),
    Tool::Restic("max"),
    Tool::Borg("zstd,3"),
    Tool::Borg("lz4"),
    Tool::Casync,
];

impl Tool {
    fn name(self) -> String {
        match self {
            Tool::DiffKeeper => "diffkeeper".into(),
            Tool::Restic(c) => format!("restic ({c})"),
            Tool::Borg(c) => format!("borg ({c})"),
            Tool::Casync => "casync".into(),
        }
    }

    /// Its repository (a file for DiffKeeper, a directory for the others).
    fn repo(self, work: &Path) -> PathBuf {
        let slug: String = self
            .name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        match self {
            // The store file and its payload segments.
            Tool::DiffKeeper => work.join("diffkeeper"),
            _ => work.join(format!("repo-{slug}")),
        }
    }

    fn env(command: &mut Command) {
        command
            .env("RESTIC_PASSWORD", "bench")
            .env("BORG_PASSPHRASE", "")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
    }

    /// Makes its empty repository.
    fn init(self, work: &Path) -> Result<()> {
        let repo = self.repo(work);
        let mut command = match self {
            Tool::DiffKeeper | Tool::Casync => {
                fs::create_dir_all(&repo)?;
                return Ok(());
            }
            Tool::Restic(_) => {
                let mut c = Command::new("restic");
                c.arg("-r")
                    .arg(&repo)
                    .args(["init", "--repository-version", "2"]);
                c
            }
            Tool::Borg(_) => {
                let mut c = Command::new("borg");
                c.args(["init", "-e", "none"]).arg(&repo);
                c
            }
        };
        Tool::env(&mut command);
        output(&mut command).map(drop)
    }

    /// The command that backs `tree` up as round `round`.
    fn backup(self, work: &Path, tree: &Path, round: usize) -> Command {
        let repo = self.repo(work);
        let mut c = match self {
            Tool::DiffKeeper => {
                let mut c = Command::new(crate::diffkeeper_binary());
                c.args(["snapshot", "--json", "--state-dir"])
                    .arg(root_arg("data", tree))
                    .arg("--store")
                    .arg(repo.join("store.dk"));
                c
            }
            Tool::Restic(compression) => {
                let mut c = Command::new("restic");
                c.arg("-r").arg(&repo).args([
                    "backup",
                    "-q",
                    "--host",
                    "bench",
                    "--compression",
                    compression,
                    ".",
                ]);
                c.current_dir(tree);
                c
            }
            Tool::Borg(compression) => {
                let mut c = Command::new("borg");
                c.args(["create", "--compression", compression])
                    .arg(format!("{}::r{round:04}", repo.display()))
                    .arg(".");
                c.current_dir(tree);
                c
            }
            Tool::Casync => {
                let mut c = Command::new("casync");
                c.arg("make")
                    .arg(format!("--store={}", repo.join("store.castr").display()))
                    .arg(repo.join(format!("r{round:04}.caidx")))
                    .arg(tree);
                c
            }
        };
        Tool::env(&mut c);
        c
    }

    /// The command that restores round `round` (of `rounds`) into `to`,
    /// an empty directory.
    fn restore(self, work: &Path, round: usize, to: &Path) -> Result<Command> {
        let repo = self.repo(work);
        let mut c = match self {
            // `restore` reads the store only, as the peers' restores read
            // their repositories (`replay --batch` would capture the
            // directory first, so that the rollback can be undone).
            Tool::DiffKeeper => {
                let mut c = Command::new(crate::diffkeeper_binary());
                c.arg("restore")
                    .arg("--store")
                    .arg(repo.join("store.dk"))
                    .args(["--batch", &(round + 1).to_string()])
                    .arg("--to")
                    .arg(to);
                c
            }
            Tool::Restic(_) => {
                let mut list = Command::new("restic");
                list.arg("-r").arg(&repo).args(["snapshots", "--json"]);
                Tool::env(&mut list);
                let snapshots = json_of(&output(&mut list)?)?;
                let id = snapshots
                    .as_array()
                    .and_then(|s| s.get(round))
                    .and_then(|s| s["short_id"].as_str())
                    .with_context(|| format!("restic has no snapshot {round}"))?
                    .to_string();
                let mut c = Command::new("restic");
                c.arg("-r")
                    .arg(&repo)
                    .args(["restore", "-q", &id, "--target"])
                    .arg(to);
                c
            }
            Tool::Borg(_) => {
                let mut c = Command::new("borg");
                c.arg("extract")
                    .arg(format!("{}::r{round:04}", repo.display()));
                c.current_dir(to);
                c
            }
            Tool::Casync => {
                let mut c = Command::new("casync");
                c.arg("extract")
                    .arg(format!("--store={}", repo.join("store.castr").display()))
                    .arg(repo.join(format!("r{round:04}.caidx")))
                    .arg(to);
                c
            }
        };
        Tool::env(&mut c);
        Ok(c)
    }
}

/// Bytes under `path` as `ls -l` adds them (apparent), as the disk holds
/// them (allocated), and the apparent sizes rounded up to whole 4 KiB
/// blocks per file (what the disk must hold for them at the least).
fn sizes(path: &Path) -> (u64, u64, u64) {
    let mut apparent = 0;
    let mut allocated = 0;
    let mut whole_blocks = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else {
            apparent += meta.len();
            allocated += meta.blocks() * 512;
            whole_blocks += meta.len().div_ceil(4096) * 4096;
        }
    }
    (apparent, allocated, whole_blocks)
}

/// Every path of a tree with its mode and, for files, content hash.
type Manifest = BTreeMap<PathBuf, (u32, Option<[u8; 32]>)>;

fn manifest(root: &Path) -> Result<Manifest> {
    let mut out = Manifest::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry?.path();
            let meta = fs::symlink_metadata(&path)?;
            let rel = path.strip_prefix(root)?.to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                stack.push(path);
                out.insert(rel, (mode, None));
            } else {
                let content =
                    fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                out.insert(rel, (mode, Some(Sha256::digest(&content).into())));
            }
        }
    }
    Ok(out)
}

/// A workload: how its tree starts, and each round's edits.
struct Workload {
    name: &'static str,
    what: &'static str,
    rounds: usize,
    create: fn(&Path, &mut Noise) -> Result<()>,
    edit: fn(&Path, usize, &mut Noise) -> Result<()>,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "world",
        what: "game world, ~230 MB, 2,000 files, 30 rounds of small edits",
        rounds: 30,
        create: world_create,
        edit: world_edit,
    },
    Workload {
        name: "sqlite",
        what: "SQLite ~85 MB, 20 rounds of 0.5% updates + 500 inserts",
        rounds: 20,
        create: sqlite_create,
        edit: sqlite_edit,
    },
    Workload {
        name: "checkpoint",
        what: "200 MB float32 checkpoint, 2% of values perturbed, 10 rounds",
        rounds: 10,
        create: checkpoint_create,
        edit: checkpoint_edit,
    },
    Workload {
        name: "small",
        what: "50,000 small text files, 10 rounds of 100 files touched",
        rounds: 10,
        create: small_create,
        edit: small_edit,
    },
    Workload {
        name: "python",
        what: "Debian's Python packages (real files), 5 rounds of 0.5% edits",
        rounds: 5,
        create: python_create,
        edit: python_edit,
    },
];

fn write(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))
}

/// Overwrites `blocks` 4 KiB blocks of `path` at random places.
fn overwrite_blocks(path: &Path, blocks: u64, noise: &mut Noise, kind: Kind) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len();
    let mut block = Vec::new();
    for _ in 0..blocks {
        let at = noise.below(len.saturating_sub(4096) / 4096 + 1) * 4096;
        noise.fill(&mut block, 4096.min(len as usize), kind);
        file.write_all_at(&block, at)?;
    }
    Ok(())
}

fn json_like(noise: &mut Noise, len: usize) -> Vec<u8> {
    let mut out = String::from("{");
    while out.len() < len {
        let r = noise.next_u64();
        out.push_str(&format!(
            "\"k{}\": {{\"x\": {}, \"y\": {}, \"name\": \"item-{}\"}}, ",
            r % 997,
            (r >> 10) % 100_000,
            (r >> 30) % 1000,
            (r >> 40) % 5000
        ));
    }
    out.push('}');
    out.into_bytes()
}

fn world_create(tree: &Path, noise: &mut Noise) -> Result<()> {
    let mut data = Vec::new();
    for i in 0..80 {
        let len = noise.between(1 << 20, 4 << 20) as usize;
        match i % 4 {
            0 | 1 => noise.fill(&mut data, len, Kind::Binary),
            2 => data = vec![0; len],
            _ => {
                let mut page = Vec::new();
                noise.fill(&mut page, 4096, Kind::Binary);
                data = page.iter().copied().cycle().take(len).collect();
            }
        }
        write(
            &tree.join(format!("region/r.{}.{}.mca", i / 9, i % 9)),
            &data,
        )?;
    }
    for i in 0..1920 {
        let len = noise.between(200, 6000) as usize;
        write(
            &tree.join(format!("players/{:02}/p{i:04}.json", i % 40)),
            &json_like(noise, len),
        )?;
    }
    noise.fill(&mut data, 1 << 20, Kind::Text);
    write(&tree.join("logs/latest.log"), &data)
}

fn world_edit(tree: &Path, round: usize, noise: &mut Noise) -> Result<()> {
    for _ in 0..4 {
        let i = noise.below(80);
        let path = tree.join(format!("region/r.{}.{}.mca", i / 9, i % 9));
        let blocks = noise.between(1, 4);
        overwrite_blocks(&path, blocks, noise, Kind::Binary)?;
    }
    for _ in 0..16 {
        let i = noise.below(1920);
        let path = tree.join(format!("players/{:02}/p{i:04}.json", i % 40));
        if path.exists() {
            let len = noise.between(200, 6000) as usize;
            write(&path, &json_like(noise, len))?;
        }
    }
    let mut line = Vec::new();
    noise.fill(&mut line, 20_000, Kind::Text);
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(tree.join("logs/latest.log"))?;
    std::io::Write::write_all(&mut log, &line)?;
    for n in 0..5 {
        let len = noise.between(200, 6000) as usize;
        write(
            &tree.join(format!("players/new/r{round:02}-{n}.json")),
            &json_like(noise, len),
        )?;
    }
    for _ in 0..2 {
        let i = noise.below(1920);
        let _ = fs::remove_file(tree.join(format!("players/{:02}/p{i:04}.json", i % 40)));
    }
    Ok(())
}

const SQLITE_ROWS: u64 = 400_000;

fn sqlite(db: &Path, sql: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("sqlite3")
        .arg(db)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("cannot run sqlite3")?;
    child
        .stdin
        .take()
        .context("sqlite3's stdin")?
        .write_all(sql.as_bytes())?;
    if !child.wait()?.success() {
        bail!("sqlite3 {} failed", db.display());
    }
    Ok(())
}

fn row(noise: &mut Noise, id: u64) -> String {
    let mut hex = String::new();
    for _ in 0..12 {
        hex.push_str(&format!("{:016x}", noise.next_u64()));
    }
    format!(
        "INSERT OR REPLACE INTO t VALUES({id}, 'user-{}', {}, '{hex}');\n",
        noise.below(1_000_000),
        noise.below(100_000)
    )
}

fn sqlite_create(tree: &Path, noise: &mut Noise) -> Result<()> {
    fs::create_dir_all(tree)?;
    let mut sql = String::from(
        "PRAGMA journal_mode=DELETE; CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, score INTEGER, payload TEXT); BEGIN;\n",
    );
    for id in 1..=SQLITE_ROWS {
        sql.push_str(&row(noise, id));
    }
    sql.push_str("COMMIT; CREATE INDEX t_score ON t(score);\n");
    sqlite(&tree.join("app.db"), &sql)
}

fn sqlite_edit(tree: &Path, round: usize, noise: &mut Noise) -> Result<()> {
    let mut sql = String::from("BEGIN;\n");
    for _ in 0..SQLITE_ROWS / 200 {
        let id = noise.between(1, SQLITE_ROWS);
        sql.push_str(&format!(
            "UPDATE t SET score = {}, name = 'user-{}' WHERE id = {id};\n",
            noise.below(100_000),
            noise.below(1_000_000)
        ));
    }
    for n in 0..500 {
        sql.push_str(&row(noise, SQLITE_ROWS + 1 + (round as u64) * 500 + n));
    }
    sql.push_str("COMMIT;\n");
    sqlite(&tree.join("app.db"), &sql)
}

const CHECKPOINT_FLOATS: usize = 50 * 1024 * 1024;

fn npy_header() -> Vec<u8> {
    let dict =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({CHECKPOINT_FLOATS},), }}");
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    let pad = 64 - (10 + dict.len() + 1) % 64;
    let len = (dict.len() + pad + 1) as u16;
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header.extend(std::iter::repeat_n(b' ', pad));
    header.push(b'\n');
    header
}

fn checkpoint_create(tree: &Path, noise: &mut Noise) -> Result<()> {
    let mut data = npy_header();
    data.reserve(CHECKPOINT_FLOATS * 4);
    for _ in 0..CHECKPOINT_FLOATS {
        // Weights near zero, as trained ones are.
        let v = ((noise.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
        data.extend_from_slice(&v.to_le_bytes());
    }
    write(&tree.join("model.npy"), &data)
}

fn checkpoint_edit(tree: &Path, round: usize, noise: &mut Noise) -> Result<()> {
    let path = tree.join("model.npy");
    let mut data = fs::read(&path)?;
    let header = npy_header().len();
    for _ in 0..CHECKPOINT_FLOATS / 50 {
        let i = header + 4 * noise.below(CHECKPOINT_FLOATS as u64) as usize;
        let mut v = f32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        v += ((noise.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.01;
        data[i..i + 4].copy_from_slice(&v.to_le_bytes());
    }
    if round.is_multiple_of(2) {
        write(&path, &data)
    } else {
        let temporary = tree.join("model.npy.tmp");
        write(&temporary, &data)?;
        fs::rename(&temporary, &path).context("cannot rename the checkpoint")
    }
}

fn small_path(tree: &Path, i: u64) -> PathBuf {
    tree.join(format!("node_modules/pkg-{:04}/lib/f{i:05}.js", i % 1000))
}

fn small_create(tree: &Path, noise: &mut Noise) -> Result<()> {
    let mut data = Vec::new();
    for i in 0..50_000 {
        let len = noise.between(100, 8192) as usize;
        noise.fill(&mut data, len, Kind::Text);
        write(&small_path(tree, i), &data)?;
    }
    Ok(())
}

fn small_edit(tree: &Path, _round: usize, noise: &mut Noise) -> Result<()> {
    let mut data = Vec::new();
    for n in 0..100 {
        let path = small_path(tree, noise.below(50_000));
        if n % 2 == 0 {
            let mut text = fs::read(&path)?;
            let at = noise.below(text.len() as u64) as usize;
            noise.fill(&mut data, 40, Kind::Text);
            let end = (at + data.len()).min(text.len());
            text.splice(at..end, data.iter().copied());
            write(&path, &text)?;
        } else {
            let len = noise.between(100, 8192) as usize;
            noise.fill(&mut data, len, Kind::Text);
            write(&path, &data)?;
        }
    }
    Ok(())
}

const PYTHON: &str = "/usr/lib/python3/dist-packages";

fn python_create(tree: &Path, _noise: &mut Noise) -> Result<()> {
    fs::create_dir_all(tree)?;
    crate::checked(
        Command::new("cp")
            .args(["-a", "--no-preserve=ownership", "-L"])
            .arg(format!("{PYTHON}/."))
            .arg(tree),
    )
}

fn python_edit(tree: &Path, _round: usize, noise: &mut Noise) -> Result<()> {
    let mut files = Vec::new();
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "py") {
                files.push(path);
            }
        }
    }
    let mut line = Vec::new();
    for _ in 0..(files.len() / 200).max(1) {
        let path = &files[noise.below(files.len() as u64) as usize];
        let mut text = fs::read(path)?;
        noise.fill(&mut line, 60, Kind::Text);
        let at = noise.below(text.len() as u64 + 1) as usize;
        text.splice(at..at, b"\n# ".iter().chain(&line).copied());
        write(path, &text)?;
    }
    Ok(())
}

/// One tool's figures on one workload.
struct Figures {
    tool: Tool,
    rounds: Vec<Run>,
    apparent: u64,
    allocated: u64,
    /// The apparent size in whole 4 KiB blocks per file.
    whole_blocks: u64,
    latest: Measured,
    oldest: Measured,
}

impl Figures {
    fn round_secs(&self) -> f64 {
        // The incremental rounds: all but the first, full backup.
        let later = &self.rounds[1.min(self.rounds.len())..];
        later.iter().map(|r| r.secs).sum::<f64>() / later.len().max(1) as f64
    }

    fn rss_mib(&self) -> f64 {
        let rounds = Measured::new(self.rounds.clone());
        rounds
            .rss_mib()
            .max(self.latest.rss_mib())
            .max(self.oldest.rss_mib())
    }
}

pub fn run(bench: &Bench) -> Result<Outcome> {
    let chosen = std::env::var("BENCH_PEERS").ok();
    let mut json = serde_json::Map::new();
    let mut summary = Vec::new();
    for workload in &WORKLOADS {
        if chosen
            .as_deref()
            .is_some_and(|c| !c.split(',').any(|n| n == workload.name))
        {
            continue;
        }
        let (value, lines) = run_workload(bench, workload)?;
        json.insert(workload.name.into(), value);
        summary.extend(lines);
    }
    Ok(Outcome {
        json: Value::Object(json),
        summary,
    })
}

fn run_workload(bench: &Bench, workload: &Workload) -> Result<(Value, Vec<String>)> {
    println!("\n== peers: {} ({})", workload.name, workload.what);
    let work = bench.work.join(workload.name);
    let tree = work.join("tree");
    fresh_dir(&work)?;
    let mut noise = Noise::new(0x5eed ^ workload.name.len() as u64);
    (workload.create)(&tree, &mut noise)?;
    let (tree_bytes, _, _) = sizes(&tree);
    for tool in TOOLS {
        tool.init(&work)?;
    }
    let mut rounds: Vec<Vec<Run>> = vec![Vec::new(); TOOLS.len()];
    let mut manifests = Vec::new();
    let total = workload.rounds + 1;
    for round in 0..total {
        if round > 0 {
            (workload.edit)(&tree, round, &mut noise)?;
        }
        if round == 0 || round + 1 == total {
            manifests.push(manifest(&tree)?);
        }
        crate::checked(&mut Command::new("sync"))?;
        for k in 0..TOOLS.len() {
            let at = (k + round) % TOOLS.len();
            let (_, run) = timed(&TOOLS[at].backup(&work, &tree, round))?;
            rounds[at].push(run);
        }
        if round.is_multiple_of(5) || round + 1 == total {
            println!("round {round} of {}", total - 1);
        }
    }
    // Repository sizes as the backups left them, before anything restores.
    let repo_sizes: Vec<(u64, u64, u64)> =
        TOOLS.iter().map(|tool| sizes(&tool.repo(&work))).collect();
    // Restores, rotated, with cp -a in the rotation.
    let mut latest: Vec<Vec<Run>> = vec![Vec::new(); TOOLS.len() + 1];
    let mut oldest: Vec<Vec<Run>> = vec![Vec::new(); TOOLS.len()];
    let to = work.join("restored");
    for run_index in 0..RUNS {
        for k in 0..=TOOLS.len() {
            let at = (k + run_index) % (TOOLS.len() + 1);
            fresh_dir(&to)?;
            crate::checked(&mut Command::new("sync"))?;
            if at == TOOLS.len() {
                let mut cp = Command::new("cp");
                cp.arg("-a").arg(format!("{}/.", tree.display())).arg(&to);
                latest[at].push(timed(&cp)?.1);
                continue;
            }
            let tool = TOOLS[at];
            for (moment, want, runs) in [
                (total - 1, &manifests[1], &mut latest[at]),
                (0, &manifests[0], &mut oldest[at]),
            ] {
                fresh_dir(&to)?;
                let (_, run) = timed(&tool.restore(&work, moment, &to)?)?;
                if manifest(&to)? != *want {
                    bail!(
                        "{}'s restore of round {moment} of {} is not the tree as it was",
                        tool.name(),
                        workload.name
                    );
                }
                runs.push(run);
            }
        }
    }
    let figures: Vec<Figures> = TOOLS
        .iter()
        .enumerate()
        .map(|(i, &tool)| {
            let (apparent, allocated, whole_blocks) = repo_sizes[i];
            Figures {
                tool,
                rounds: rounds[i].clone(),
                apparent,
                allocated,
                whole_blocks,
                latest: Measured::new(latest[i].clone()),
                oldest: Measured::new(oldest[i].clone()),
            }
        })
        .collect();
    let cp = Measured::new(latest[TOOLS.len()].clone());
    let ours = &figures[0];
    let peers = &figures[1..];
    let smallest = peers.iter().min_by_key(|f| f.apparent).context("no peer")?;
    let fastest_round = peers
        .iter()
        .map(Figures::round_secs)
        .fold(f64::INFINITY, f64::min);
    let fastest_restore = peers
        .iter()
        .map(|f| f.latest.secs().min(f.oldest.secs()))
        .fold(f64::INFINITY, f64::min);
    println!(
        "{:<16} {:>12} {:>12} {:>9} {:>11} {:>11} {:>9}",
        "tool", "repo", "allocated", "round s", "latest s", "oldest s", "RSS MiB"
    );
    for f in &figures {
        println!(
            "{:<16} {:>12} {:>12} {:>9.3} {:>11.3} {:>11.3} {:>9.1}",
            f.tool.name(),
            bytes(f.apparent),
            bytes(f.allocated),
            f.round_secs(),
            f.latest.secs(),
            f.oldest.secs(),
            f.rss_mib()
        );
    }
    println!(
        "{:<16} {:>12} {:>12} {:>9} {:>11.3}",
        "cp -a",
        bytes(tree_bytes),
        "",
        "",
        cp.secs()
    );
    let size_ratio = ours.apparent as f64 / smallest.apparent.max(1) as f64;
    let checks = [
        (
            size_ratio <= MAX_SIZE_OVER_SMALLEST,
            format!(
                "store {} = {size_ratio:.2}x {}'s {} (target {MAX_SIZE_OVER_SMALLEST})",
                bytes(ours.apparent),
                smallest.tool.name(),
                bytes(smallest.apparent)
            ),
        ),
        (
            // A file takes whole blocks, and ext2/3 count the blocks that
            // map a file's data in it too (4 bytes per 4 KiB block).
            ours.allocated <= ours.whole_blocks + ours.whole_blocks / 256,
            format!(
                "allocated {} vs apparent {} ({} in whole blocks per file)",
                bytes(ours.allocated),
                bytes(ours.apparent),
                bytes(ours.whole_blocks)
            ),
        ),
        (
            ours.round_secs() <= fastest_round,
            format!(
                "round {:.3} s vs fastest peer's {fastest_round:.3} s",
                ours.round_secs()
            ),
        ),
        (
            ours.latest.secs().max(ours.oldest.secs()) <= fastest_restore
                && ours.latest.secs().max(ours.oldest.secs())
                    <= MAX_RESTORE_OVER_CP * cp.secs(),
            format!(
                "restore latest {:.3} s, oldest {:.3} s vs fastest peer's {fastest_restore:.3} s and cp -a {:.3} s",
                ours.latest.secs(),
                ours.oldest.secs(),
                cp.secs()
            ),
        ),
        (
            ours.rss_mib() <= MAX_RSS_MIB,
            format!("peak RSS {:.1} MiB (target {MAX_RSS_MIB})", ours.rss_mib()),
        ),
    ];
    let lines = checks
        .iter()
        .map(|(ok, text)| format!("peers {}: {} {text}", workload.name, verdict(*ok)))
        .collect();
    let value = json!({
        "what": workload.what,
        "rounds": workload.rounds,
        "tree_bytes": tree_bytes,
        "cp_a": cp.to_json(),
        "tools": figures.iter().map(|f| json!({
            "tool": f.tool.name(),
            "repo_apparent_bytes": f.apparent,
            "repo_allocated_bytes": f.allocated,
            "round_secs_mean": f.round_secs(),
            "rounds": f.rounds.iter().map(|r| json!({"secs": r.secs, "rss_kib": r.rss_kib})).collect::<Vec<_>>(),
            "restore_latest": f.latest.to_json(),
            "restore_oldest": f.oldest.to_json(),
        })).collect::<Vec<_>>(),
    });
    Ok((value, lines))
}
