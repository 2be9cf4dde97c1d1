//! Time travel and retention end to end, through the real binary: a long
//! random history restored at every batch (by id, by time, by duration
//! ago) against the trees kept when each batch was captured; the live
//! directory rolled back and forward; `diff`, `export` (read back by GNU
//! tar), `log --batches`; compaction to a policy checked moment by moment,
//! with dropped moments refused, `verify` clean and the file shrunk; and
//! `kill -9` in the middle of a compaction.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::edit::{build_tree, expected, Editor, Tree};
use common::{
    assert_same_tree, copy_store, diffkeeper, json, ok, read_tree, refused, s, segments_of, Node,
    Rng, BIN,
};

/// 2026-11-01T00:00:00Z in ms: the recorded histories start there.
const START_MS: i64 = 1_793_491_200_000;
const HOUR_MS: i64 = 3_600_000;

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn root_arg(dir: &Path) -> String {
    format!("data={}", s(dir))
}

/// Captures `state` as a batch recorded at `time_ms`; returns its id.
fn snapshot_at(state: &Path, store: &Path, time_ms: i64) -> u64 {
    let summary = json(&[
        "snapshot",
        "--state-dir",
        &root_arg(state),
        "--store",
        s(store),
        "--time",
        &rfc3339(time_ms),
        "--json",
    ]);
    summary["batch"]
        .as_u64()
        .unwrap_or_else(|| panic!("no batch committed: {summary}"))
}

/// `restore` with extra selector arguments into a fresh `to`.
fn restore(store: &Path, to: &Path, selector: &[&str]) -> Tree {
    let mut args = vec!["restore", "--store", s(store), "--to", s(to)];
    args.extend_from_slice(selector);
    ok(&args);
    let tree = read_tree(to);
    fs::remove_dir_all(to).expect("rm restore");
    tree
}

/// `restore` that must be refused; returns stderr.
fn refused_restore(store: &Path, to: &Path, selector: &[&str]) -> String {
    let mut args = vec!["restore", "--store", s(store), "--to", s(to)];
    args.extend_from_slice(selector);
    refused(&args)
}

fn batch_ids(store: &Path) -> Vec<u64> {
    let lines = json(&["log", "--store", s(store), "--batches", "--json"]);
    lines
        .as_array()
        .expect("array")
        .iter()
        .map(|l| l["batch"].as_u64().expect("batch id"))
        .collect()
}

/// A random history of `rounds` batches, `spacing_ms` apart from
/// [`START_MS`]; returns the tree and time of every batch, by id.
fn record_history(
    state: &Path,
    store: &Path,
    seed: u64,
    rounds: u64,
    spacing_ms: i64,
) -> BTreeMap<u64, (Tree, i64)> {
    let mut editor = Editor::new(seed);
    build_tree(state, &mut editor.rng, 30);
    let mut trees = BTreeMap::new();
    for round in 0..rounds {
        if round > 0 {
            editor.round(state, 10);
        }
        let time = START_MS + round as i64 * spacing_ms;
        let batch = snapshot_at(state, store, time);
        assert_eq!(batch, round + 1, "seed {seed:#x}: round {round}");
        trees.insert(batch, (expected(state), time));
    }
    trees
}

#[test]
fn every_batch_of_a_long_random_history_restores_exactly() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = (work.path().join("state"), work.path().join("s.dk"));
    let trees = record_history(&state, &store, 0x71de_0001, 40, HOUR_MS);
    let to = work.path().join("restored");
    for (batch, (tree, time)) in &trees {
        let what = format!("restore --batch {batch}");
        assert_same_tree(
            tree,
            &restore(&store, &to, &["--batch", &batch.to_string()]),
            &what,
        );
        // Any time until the next batch shows the same state.
        let at = rfc3339(time + HOUR_MS / 2);
        assert_same_tree(
            tree,
            &restore(&store, &to, &["--at", &at]),
            &format!("--at {at}"),
        );
    }
    // The same moment by a duration ago, and with an offset.
    let (tree, time) = &trees[&17];
    let ago_ms = common_now_ms() - (time + HOUR_MS / 2);
    let ago = format!("{}s", ago_ms / 1000);
    assert_same_tree(tree, &restore(&store, &to, &["--ago", &ago]), "--ago");
    let t = std::time::UNIX_EPOCH + Duration::from_millis((*time + 90_000) as u64);
    let utc = humantime::format_rfc3339_seconds(t).to_string();
    // Same instant written as +02:00 local time.
    let hh: i64 = utc[11..13].parse().expect("hour");
    let with_offset = format!("{}{:02}{}+02:00", &utc[..11], (hh + 2) % 24, &utc[13..19]);
    if hh + 2 < 24 {
        assert_same_tree(
            tree,
            &restore(&store, &to, &["--at", &with_offset]),
            &with_offset,
        );
    }

    // Before the first capture, a batch that never existed, a bad time.
    let before = rfc3339(START_MS - 1);
    let err = refused_restore(&store, &to, &["--at", &before]);
    assert!(err.contains("before the first capture"), "{err}");
    let err = refused_restore(&store, &to, &["--batch", "41"]);
    assert!(
        err.contains("no batch 41") && err.contains("newest is 40"),
        "{err}"
    );
    let err = refused_restore(&store, &to, &["--at", "yesterday"]);
    assert!(err.contains("RFC 3339"), "{err}");
    // A non-empty target is refused and left alone.
    fs::create_dir_all(&to).expect("mkdir");
    fs::write(to.join("keep.me"), b"mine").expect("write");
    let err = refused_restore(&store, &to, &["--batch", "3"]);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(read_tree(&to).len(), 1);
    // With --force it is replayed into; the untracked file stays.
    ok(&[
        "restore",
        "--store",
        s(&store),
        "--to",
        s(&to),
        "--batch",
        "3",
        "--force",
    ]);
    let mut want = trees[&3].0.clone();
    want.insert(
        b"keep.me".to_vec(),
        read_tree(&to).remove(b"keep.me".as_slice()).expect("kept"),
    );
    assert_same_tree(&want, &read_tree(&to), "restore --force");
    fs::remove_dir_all(&to).expect("rm");

    // The live directory rolled back, forward, and back to the newest.
    let live = work.path().join("live");
    ok(&[
        "replay",
        "--store",
        s(&store),
        "--state-dir",
        &root_arg(&live),
    ]);
    assert_same_tree(&trees[&40].0, &read_tree(&live), "replay");
    // Written after the last capture: a rollback must not lose it.
    fs::write(live.join("uncaptured.txt"), b"written after the last batch").expect("write");
    let before_rollback = read_tree(&live);
    let roll = |batch: u64| {
        let out = diffkeeper(&[
            "replay",
            "--store",
            s(&store),
            "--state-dir",
            &root_arg(&live),
            "--batch",
            &batch.to_string(),
        ]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = roll(5);
    assert!(
        said.contains("recorded the current state as batch 41"),
        "{said}"
    );
    assert_same_tree(&trees[&5].0, &read_tree(&live), "rolled back to batch 5");
    for batch in [31u64, 1, 40] {
        roll(batch);
        assert_same_tree(
            &trees[&batch].0,
            &read_tree(&live),
            &format!("replay --batch {batch} of the live directory"),
        );
    }
    // The rollback is undone from the batch it recorded.
    roll(41);
    assert_same_tree(&before_rollback, &read_tree(&live), "undo of the rollback");
}

fn common_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

#[test]
fn timeline_diff_and_export_show_the_history() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = (work.path().join("state"), work.path().join("s.dk"));
    fs::create_dir_all(state.join("world")).expect("mkdir");
    let mut rng = Rng::new(7);
    let mut region = rng.bytes(3_000_000);
    fs::write(state.join("world/region.dat"), &region).expect("write");
    fs::write(
        state.join("config.toml"),
        "players = 8\nmode = \"easy\"\nseed = 1\n",
    )
    .expect("w");
    snapshot_at(&state, &store, START_MS);
    region[1_500_000..1_500_004].copy_from_slice(b"EDIT");
    region[2_000_000] ^= 1;
    fs::write(state.join("world/region.dat"), &region).expect("write");
    fs::write(
        state.join("config.toml"),
        "players = 8\nmode = \"hard\"\nseed = 1\n",
    )
    .expect("w");
    std::os::unix::fs::symlink("world/region.dat", state.join("current")).expect("symlink");
    snapshot_at(&state, &store, START_MS + HOUR_MS);
    let second = expected(&state);
    fs::remove_file(state.join("config.toml")).expect("rm");
    snapshot_at(&state, &store, START_MS + 2 * HOUR_MS);

    // Timeline.
    let lines = json(&["log", "--store", s(&store), "--batches", "--json"]);
    let lines = lines.as_array().expect("array");
    assert_eq!(lines.len(), 3);
    // the state directory, world/, its file, config
    assert_eq!(lines[0]["files_changed"], 4, "{lines:?}");
    assert_eq!(lines[1]["files_changed"], 3, "{lines:?}");
    assert_eq!(lines[2]["files_changed"], 1, "{lines:?}");
    assert!(
        lines[0]["bytes_changed"].as_u64() >= Some(3_000_000),
        "{lines:?}"
    );
    // Two edits in a 3 MB file touch a few chunks, not the file.
    assert!(
        lines[1]["bytes_changed"].as_u64() < Some(1_500_000),
        "{lines:?}"
    );
    let since = rfc3339(START_MS + HOUR_MS);
    let until = rfc3339(START_MS + HOUR_MS + 1);
    let window = json(&[
        "log",
        "--store",
        s(&store),
        "--batches",
        "--since",
        &since,
        "--until",
        &until,
        "--json",
    ]);
    assert_eq!(window.as_array().map(Vec::len), Some(1), "{window}");
    assert_eq!(window[0]["batch"], 2);
    let text = ok(&["log", "--store", s(&store), "--batches"]);
    assert_eq!(text.lines().count(), 4, "{text}");

    // Diff: the last two versions by default; text is a unified diff.
    let diff = ok(&[
        "diff",
        "--store",
        s(&store),
        "config.toml",
        "--from",
        "1",
        "--to",
        "2",
    ]);
    assert!(
        diff.contains("-mode = \"easy\"")
            && diff.contains("+mode = \"hard\"")
            && diff.contains("@@"),
        "{diff}"
    );
    let last_two = ok(&["diff", "--store", s(&store), "data:config.toml"]);
    assert!(
        last_two.contains("-players = 8")
            && last_two.contains("batch 3 (2026-11-01T02:00:00.000Z) (deleted)"),
        "{last_two}"
    );
    let binary = ok(&["diff", "--store", s(&store), "world/region.dat"]);
    assert!(
        binary.contains("2 changed byte ranges, 5 bytes")
            && binary.contains("1500000..1500004")
            && binary.contains("2000000..2000001"),
        "{binary}"
    );
    for missing in ["no/such/file", "data:no/such/file", "data:"] {
        let err = refused(&["diff", "--store", s(&store), missing]);
        assert!(err.contains("no history of"), "{missing}: {err}");
    }

    // Export of batch 2, read back by GNU tar: same content, modes, mtimes.
    for name in ["state.tar", "state.tar.zst"] {
        let archive = work.path().join(name);
        ok(&[
            "export",
            "--store",
            s(&store),
            "--batch",
            "2",
            "-o",
            s(&archive),
        ]);
        let tar = if name.ends_with(".zst") {
            let plain = work.path().join("unzstd.tar");
            let bytes = zstd::decode_all(fs::File::open(&archive).expect("open")).expect("zstd");
            fs::write(&plain, bytes).expect("write");
            plain
        } else {
            archive
        };
        let out = work.path().join("untarred");
        fs::create_dir_all(&out).expect("mkdir");
        let status = Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&out)
            .status()
            .expect("tar");
        assert!(status.success());
        let got = read_tree(&out);
        let seconds = |t: &Tree| -> Tree {
            t.iter()
                .map(|(p, n)| {
                    let n = match n {
                        Node::File {
                            mode,
                            mtime_ns,
                            content,
                        } => Node::File {
                            mode: *mode,
                            mtime_ns: mtime_ns - mtime_ns.rem_euclid(1_000_000_000),
                            content: content.clone(),
                        },
                        other => other.clone(),
                    };
                    (p.clone(), n)
                })
                .collect()
        };
        assert_same_tree(&seconds(&second), &seconds(&got), name);
        fs::remove_dir_all(&out).expect("rm");
        // Readable as any new file would be (0666 less the umask).
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(work.path().join(name))
                .expect("stat")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o666 & !umask(), "{name}");
    }

    // A file that became a directory says so.
    fs::create_dir(state.join("config.toml")).expect("mkdir");
    snapshot_at(&state, &store, START_MS + 3 * HOUR_MS);
    let diff = ok(&[
        "diff",
        "--store",
        s(&store),
        "config.toml",
        "--from",
        "2",
        "--to",
        "4",
    ]);
    assert!(
        diff.contains("-file, ") && diff.contains("+directory"),
        "{diff}"
    );
    // Times before 1970 are shown as given.
    let err = refused(&[
        "restore",
        "--store",
        s(&store),
        "--to",
        s(&work.path().join("never")),
        "--at",
        "1960-01-01T00:00:00Z",
    ]);
    assert!(err.contains("1960-01-01T00:00:00"), "{err}");
}

fn umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).expect("octal"))
        .expect("Umask line")
}

#[test]
fn a_store_naming_a_hostile_state_directory_is_refused() {
    use diffkeeper::store::schema::{
        BatchRecord, ChunkEncoding, ChunkRecord, EntryKind, VersionRecord,
    };
    let work = tempfile::tempdir().expect("tempdir");
    let store = work.path().join("evil.dk");
    {
        let st = diffkeeper::store::Store::create_or_open(&store).expect("create");
        let mut batch = st.begin_batch().expect("batch");
        let content = b"evil";
        let hash = diffkeeper::store::sha256(content);
        let id = batch.next_chunk_id();
        let chunk = ChunkRecord {
            hash,
            len: 4,
            encoding: ChunkEncoding::Raw,
            stored_len: 4,
            at: None,
        };
        batch.put_chunk(id, &chunk, content).expect("chunk");
        let version = VersionRecord {
            kind: EntryKind::File,
            mode: 0o644,
            mtime_ns: 0,
            size: 4,
            hash,
            chunks: vec![id],
            target: Vec::new(),
            stored_bytes: 4,
            owner: None,
            xattrs: Vec::new(),
            stamp: None,
        };
        for root in ["ok", "../../escaped"] {
            batch.put_version(root, b"f", &version).expect("version");
        }
        let record = BatchRecord {
            time_ms: START_MS,
            started_ms: START_MS,
            roots: vec!["ok".into(), "../../escaped".into()],
            files_changed: 2,
            logical_bytes: 8,
            stored_bytes: 4,
        };
        batch.commit(&record).expect("commit");
    }
    let to = work.path().join("a/b/out");
    let before = read_tree(work.path());
    for command in [
        vec!["restore", "--store", s(&store), "--to", s(&to)],
        vec![
            "export",
            "--store",
            s(&store),
            "-o",
            s(&work.path().join("x.tar")),
        ],
    ] {
        let err = refused(&command);
        assert!(
            err.contains("not a valid name") && err.contains("evil.dk"),
            "{err}"
        );
    }
    assert!(!to.exists(), "restore created its target before refusing");
    let after = read_tree(work.path());
    let created: Vec<String> = after
        .keys()
        .filter(|p| !before.contains_key(*p))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(
        created
            .iter()
            .all(|p| !p.contains("escaped") && !p.ends_with("/f")),
        "files appeared outside the target: {created:?}"
    );
}

/// The batch ids a policy of `--keep-last last --keep-daily days` keeps,
/// worked out independently of the binary.
fn kept_by(times: &BTreeMap<u64, i64>, last: usize, days: usize) -> BTreeSet<u64> {
    let mut kept: BTreeSet<u64> = times.keys().rev().take(last).copied().collect();
    let mut newest_of_day: BTreeMap<i64, u64> = BTreeMap::new();
    for (id, ms) in times {
        newest_of_day.insert(ms.div_euclid(24 * HOUR_MS), *id);
    }
    kept.extend(newest_of_day.values().rev().take(days));
    kept
}

#[test]
fn compaction_keeps_every_kept_moment_exactly_and_shrinks_the_file() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = (work.path().join("state"), work.path().join("s.dk"));
    // 48 batches 3 h apart: six days.
    let trees = record_history(&state, &store, 0x71de_0002, 48, 3 * HOUR_MS);
    let times: BTreeMap<u64, i64> = trees.iter().map(|(b, (_, t))| (*b, *t)).collect();
    let want_kept = kept_by(&times, 4, 3);
    let policy = ["--keep-last", "4", "--keep-daily", "3"];

    let mut args = vec!["compact", "--store", s(&store), "--dry-run", "--json"];
    args.extend_from_slice(&policy);
    let dry = json(&args);
    let mut args = vec!["stats", "--store", s(&store), "--json"];
    args.extend_from_slice(&policy);
    let stats = json(&args);
    assert_eq!(
        stats["compaction"]["batches_dropped"],
        dry["batches_dropped"]
    );
    assert_eq!(batch_ids(&store).len(), 48, "a dry run changes nothing");

    let mut args = vec!["compact", "--store", s(&store), "--json"];
    args.extend_from_slice(&policy);
    let done = json(&args);
    for key in [
        "batches_dropped",
        "versions_dropped",
        "chunks_released",
        "chunks_rebased",
    ] {
        assert_eq!(done[key], dry[key], "{key}: dry run {dry}\nrun {done}");
    }
    assert_eq!(
        done["batches_dropped"].as_u64(),
        Some(48 - want_kept.len() as u64)
    );
    assert_eq!(
        batch_ids(&store),
        want_kept.iter().copied().collect::<Vec<_>>()
    );
    let freed = done["bytes_freed"].as_u64().expect("freed");
    let (before, after) = (
        done["file_bytes_before"].as_u64().expect("before"),
        done["file_bytes_after"].as_u64().expect("after"),
    );
    assert!(freed > 0, "{done}");
    // This history exercises both ways a chain crossing the cut is cut.
    assert!(done["chunks_rebased"].as_u64() > Some(0), "{done}");
    assert!(done["bases_kept"].as_u64() > Some(0), "{done}");
    // The store is its file and its payload segments.
    assert_eq!(
        after,
        fs::metadata(&store).expect("stat").len() + segment_bytes(&store)
    );
    assert!(
        before - after + 256 * 1024 >= freed,
        "the file must shrink by the bytes freed (less a small constant): {before} -> {after}, freed {freed}"
    );
    let verify = json(&["verify", "--store", s(&store), "--json"]);
    assert_eq!(verify["problems"], serde_json::json!([]), "{verify}");

    let to = work.path().join("restored");
    for (batch, (tree, time)) in &trees {
        let id = batch.to_string();
        if want_kept.contains(batch) {
            let what = format!("kept batch {batch} after compaction");
            assert_same_tree(tree, &restore(&store, &to, &["--batch", &id]), &what);
            let at = rfc3339(time + HOUR_MS);
            assert_same_tree(tree, &restore(&store, &to, &["--at", &at]), &what);
        } else {
            let err = refused_restore(&store, &to, &["--batch", &id]);
            assert!(
                err.contains("dropped by compaction"),
                "batch {batch}: {err}"
            );
            let at = rfc3339(time + HOUR_MS);
            let err = refused_restore(&store, &to, &["--at", &at]);
            assert!(err.contains("dropped by compaction"), "at {at}: {err}");
            let _ = fs::remove_dir_all(&to);
        }
    }

    // History goes on after a compaction, and a second one is consistent.
    let mut editor = Editor::new(0x71de_0003);
    let mut latest = BTreeMap::new();
    for i in 1..=6i64 {
        editor.round(&state, 10);
        let time = START_MS + 48 * 3 * HOUR_MS + i * HOUR_MS;
        let id = snapshot_at(&state, &store, time);
        assert_eq!(id, 48 + i as u64);
        latest.insert(id, expected(&state));
    }
    ok(&["compact", "--store", s(&store), "--keep-last", "3"]);
    assert_eq!(batch_ids(&store), vec![52, 53, 54]);
    for (id, tree) in latest.range(52..) {
        let what = format!("batch {id} after a second compaction");
        assert_same_tree(
            tree,
            &restore(&store, &to, &["--batch", &id.to_string()]),
            &what,
        );
    }
    let verify = json(&["verify", "--store", s(&store), "--json"]);
    assert_eq!(verify["problems"], serde_json::json!([]), "{verify}");
    let err = refused(&["compact", "--store", s(&store)]);
    assert!(
        err.contains("--keep-") && err.contains("no saved policy"),
        "{err}"
    );

    // A policy saved in the store serves `compact` and `stats` without rules.
    ok(&[
        "compact",
        "--store",
        s(&store),
        "--keep-last",
        "2",
        "--save",
    ]);
    assert_eq!(batch_ids(&store), vec![53, 54]);
    for i in 7..=9i64 {
        editor.round(&state, 5);
        snapshot_at(&state, &store, START_MS + 48 * 3 * HOUR_MS + i * HOUR_MS);
    }
    let stats = json(&["stats", "--store", s(&store), "--json"]);
    assert_eq!(stats["compaction"]["batches_dropped"], 3, "{stats}");
    ok(&["compact", "--store", s(&store)]);
    assert_eq!(batch_ids(&store), vec![56, 57]);
    ok(&["compact", "--store", s(&store), "--forget"]);
    let err = refused(&["compact", "--store", s(&store)]);
    assert!(err.contains("no saved policy"), "{err}");
}

#[test]
fn kill_9_during_compaction_leaves_the_old_or_the_new_history() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = (work.path().join("state"), work.path().join("s.dk"));
    // Large, incompressible files rewritten in part every batch, so that
    // dropping history releases and rebases tens of MiB.
    fs::create_dir_all(&state).expect("mkdir");
    let mut rng = Rng::new(0x9);
    let mut files: Vec<Vec<u8>> = (0..4).map(|_| rng.bytes(12 << 20)).collect();
    let mut trees = BTreeMap::new();
    for round in 0..10u64 {
        for (i, content) in files.iter_mut().enumerate() {
            if round > 0 {
                for _ in 0..24 {
                    let at = rng.below(content.len() as u64 - 4096) as usize;
                    let patch = rng.bytes(4096);
                    content[at..at + 4096].copy_from_slice(&patch);
                }
            }
            fs::write(state.join(format!("f{i}")), &*content).expect("write");
        }
        let id = snapshot_at(&state, &store, START_MS + round as i64 * HOUR_MS);
        trees.insert(id, expected(&state));
    }
    let all: Vec<u64> = trees.keys().copied().collect();
    let pristine = work.path().join("pristine.dk");
    copy_store(&store, &pristine);

    let compact = |path: &Path| {
        Command::new(BIN)
            .args(["compact", "--store", s(path), "--keep-last", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn compact")
    };
    // How long an undisturbed compaction takes here.
    let started = Instant::now();
    let status = compact(&store).wait().expect("wait");
    assert!(status.success());
    let full = started.elapsed();
    assert_eq!(batch_ids(&store), vec![9, 10]);

    let to = work.path().join("restored");
    let (mut interrupted, mut old_history) = (0, 0);
    for step in 1..=9u32 {
        copy_store(&pristine, &store);
        let mut child = compact(&store);
        std::thread::sleep(full * step / 10);
        if child.try_wait().expect("try_wait").is_none() {
            interrupted += 1;
        }
        child.kill().expect("kill -9");
        child.wait().expect("wait");

        let ids = batch_ids(&store);
        if ids == all {
            old_history += 1;
        }
        assert!(
            ids == all || ids == vec![9, 10],
            "after kill -9 at {step}/10: batches {ids:?} are neither the old history nor the new"
        );
        let verify = json(&["verify", "--store", s(&store), "--json"]);
        assert_eq!(
            verify["problems"],
            serde_json::json!([]),
            "step {step}: {verify}"
        );
        for id in &ids {
            let what = format!("batch {id} after kill -9 at {step}/10");
            assert_same_tree(
                &trees[id],
                &restore(&store, &to, &["--batch", &id.to_string()]),
                &what,
            );
        }
        // And a compaction after the crash completes, with every kept
        // moment whole (the crashed one may have left a segment behind).
        ok(&["compact", "--store", s(&store), "--keep-last", "2"]);
        assert_eq!(batch_ids(&store), vec![9, 10]);
        ok(&["verify", "--store", s(&store)]);
    }
    eprintln!(
        "compaction took {full:?} undisturbed; {interrupted} of 9 kills landed while it ran, {old_history} before its commit"
    );
    // (Kills after its commit are rare: with payload in segments, what
    // follows the commit, deleting rewritten segments and shrinking the
    // file, takes milliseconds.)
    assert!(
        old_history >= 1,
        "the kills must hit the history transaction ({interrupted} landed while it ran)"
    );
    assert!(
        interrupted >= 3,
        "only {interrupted} of 9 kills landed while compaction ran ({full:?} undisturbed)"
    );
}

#[test]
fn watch_applies_the_retention_policy_on_a_schedule() {
    watch_with_retention(&["--keep-last", "2"], false);
}

#[test]
fn watch_applies_the_store_s_saved_policy_on_a_schedule() {
    watch_with_retention(&[], true);
}

/// `watch` writing ten batches with retention from `rules`, or from the
/// store's saved policy (`compact --save`) when `saved`.
fn watch_with_retention(rules: &[&str], saved: bool) {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = (work.path().join("state"), work.path().join("s.dk"));
    fs::create_dir_all(&state).expect("mkdir");
    if saved {
        fs::write(state.join("counter"), "start\n").expect("write");
        snapshot_at(&state, &store, common_now_ms() - 1000);
        ok(&[
            "compact",
            "--store",
            s(&store),
            "--keep-last",
            "2",
            "--save",
        ]);
    }
    let mut args = vec![
        "watch",
        "--backend",
        "inotify",
        "--debounce",
        "50ms",
        "--compact-interval",
        "500ms",
        "--store",
        s(&store),
        "--state-dir",
    ];
    let root = root_arg(&state);
    args.push(&root);
    args.extend_from_slice(rules);
    let child = Command::new(BIN)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    // Ten batches, each a new write after a quiet moment.
    for i in 0..10 {
        fs::write(state.join("counter"), format!("{i}\n")).expect("write");
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_millis(1200));
    send_term(&child);
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ids = batch_ids(&store);
    assert!(
        ids.len() <= 3,
        "retention must have dropped batches: {ids:?}\n{stderr}"
    );
    assert!(*ids.last().expect("a batch") >= 5, "{ids:?}\n{stderr}");
    assert!(stderr.contains("retention:"), "{stderr}");
    let to = work.path().join("restored");
    let tree = restore(&store, &to, &[]);
    assert_same_tree(
        &expected(&state),
        &tree,
        "latest after scheduled compaction",
    );
}

fn send_term(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn watch_waits_while_another_process_holds_the_store() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = (work.path().join("state"), work.path().join("s.dk"));
    fs::create_dir_all(&state).expect("mkdir");
    fs::write(state.join("save"), b"first").expect("write");
    let mut child = Command::new(BIN)
        .args([
            "watch",
            "--backend",
            "inotify",
            "--debounce",
            "50ms",
            "--store",
            s(&store),
            "--state-dir",
            &root_arg(&state),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.exists() || batch_ids(&store).is_empty() {
        assert!(Instant::now() < deadline, "no first batch");
        std::thread::sleep(Duration::from_millis(50));
    }
    // This process takes the store (as a long `compact` would) while the
    // app writes, for longer than opening a store waits by itself.
    let held = diffkeeper::store::Store::create_or_open(&store).expect("hold the store");
    fs::write(state.join("save"), b"second").expect("write");
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "watch exited while the store was held"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    while batch_ids(&store).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the write made while the store was held was not captured"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    send_term(&child);
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("in use by another diffkeeper process"),
        "{stderr}"
    );
    let to = work.path().join("restored");
    let tree = restore(&store, &to, &[]);
    assert_same_tree(
        &expected(&state),
        &tree,
        "latest after the store was released",
    );
}

#[test]
fn a_same_tick_rewrite_is_still_caught_after_compaction() {
    let work = tempfile::tempdir().expect("tempdir");
    let (a, b, store) = (
        work.path().join("a"),
        work.path().join("b"),
        work.path().join("s.dk"),
    );
    fs::create_dir_all(&a).expect("mkdir");
    fs::create_dir_all(&b).expect("mkdir");
    let (root_a, root_b) = (format!("a={}", s(&a)), format!("b={}", s(&b)));
    let both = |store: &Path| {
        json(&[
            "snapshot",
            "--json",
            "--store",
            s(store),
            "--state-dir",
            &root_a,
            "--state-dir",
            &root_b,
        ])
    };
    fs::write(a.join("f"), b"aaaa").expect("write");
    fs::write(b.join("g"), b"x").expect("write");
    both(&store);
    // Batch 2 reads f within the same timestamp tick as its write...
    fs::write(a.join("f"), b"cccc").expect("write");
    let mtime = fs::metadata(a.join("f"))
        .and_then(|m| m.modified())
        .expect("mtime");
    both(&store);
    // ...and f changes again with the same size and mtime: only a re-read
    // can tell. Then a batch of the other root alone, seconds later.
    fs::write(a.join("f"), b"dddd").expect("write");
    let f = fs::File::options()
        .write(true)
        .open(a.join("f"))
        .expect("open");
    f.set_modified(mtime).expect("set mtime");
    drop(f);
    std::thread::sleep(Duration::from_secs(3));
    fs::write(b.join("g"), b"y").expect("write");
    json(&[
        "snapshot",
        "--json",
        "--store",
        s(&store),
        "--state-dir",
        &root_b,
    ]);
    // Compaction moves f's racy version into batch 3, which started later.
    ok(&["compact", "--store", s(&store), "--keep-last", "1"]);
    let summary = both(&store);
    assert_eq!(
        summary["batch"], 4,
        "the rewrite was not noticed: {summary}"
    );
    let to = work.path().join("restored");
    let tree = restore(&store, &to, &["--root", "a"]);
    match tree.get(b"f".as_slice()) {
        Some(Node::File { content, .. }) => assert_eq!(content, b"dddd"),
        other => panic!("f restored as {other:?}"),
    }
}

/// A file read too soon after its write is read again until its mtime can
/// be trusted; that settling adds no batch, and compaction keeps it with
/// the version it names, so the file is not read again afterwards.
#[test]
fn settling_adds_no_history_and_survives_compaction() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = (work.path().join("state"), work.path().join("s.dk"));
    fs::create_dir_all(&state).expect("mkdir");
    let snapshot = || {
        json(&[
            "snapshot",
            "--json",
            "--store",
            s(&store),
            "--state-dir",
            &root_arg(&state),
        ])
    };
    fs::write(state.join("f"), b"written just now").expect("write");
    assert_eq!(snapshot()["batch"], 1);
    std::thread::sleep(Duration::from_millis(2200));
    // f, and the state directory (whose ctime moved when f was created).
    let settling = snapshot();
    assert!(
        settling["batch"].is_null() && settling["settled"] == 2,
        "{settling}"
    );
    assert_eq!(batch_ids(&store), [1]);
    fs::write(state.join("g"), b"1").expect("write");
    assert_eq!(snapshot()["batch"], 2);
    // f's version moves into batch 2, which takes batch 1's scan start.
    ok(&["compact", "--store", s(&store), "--keep-last", "1"]);
    assert_eq!(batch_ids(&store), [2]);
    std::thread::sleep(Duration::from_millis(2200));
    let after = snapshot();
    assert!(
        after["batch"].is_null() && after["settled"] == 2,
        "only g and the state directory, changed just before batch 2, are read again: {after}"
    );
    let again = snapshot();
    assert!(again["batch"].is_null() && again["settled"] == 0, "{again}");
}

/// The apparent bytes of a store's payload segments.
fn segment_bytes(store: &Path) -> u64 {
    fs::read_dir(segments_of(store))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn payload_lives_in_segments_as_long_as_its_bytes_and_compaction_rewrites_dead_ones() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = (work.path().join("state"), work.path().join("s.dk"));
    fs::create_dir_all(&state).expect("mkdir");
    let mut rng = Rng::new(0x5e6);
    // Incompressible files replaced whole every batch: each batch stores
    // them again in full, and compaction kills all but the last copy.
    for round in 0..6u64 {
        for i in 0..20 {
            fs::write(state.join(format!("f{i}")), rng.bytes(200_000)).expect("write");
        }
        snapshot_at(&state, &store, START_MS + round as i64 * HOUR_MS);
    }
    let stats = json(&["stats", "--store", s(&store), "--json"]);
    let stored = stats["stored_bytes"].as_u64().expect("stored");
    assert!(stored >= 6 * 20 * 200_000, "{stats}");
    // Between compactions the segments are exactly the payload, and the
    // store file only indexes it.
    assert_eq!(segment_bytes(&store), stored, "{stats}");
    assert!(
        stats["index_bytes"].as_u64().expect("index") < 2 << 20,
        "{stats}"
    );
    assert_eq!(
        stats["file_bytes"].as_u64(),
        Some(stats["index_bytes"].as_u64().expect("index") + stored),
        "{stats}"
    );
    ok(&["compact", "--store", s(&store), "--keep-last", "1"]);
    let after = json(&["stats", "--store", s(&store), "--json"]);
    let kept = after["stored_bytes"].as_u64().expect("stored");
    assert!(kept <= 20 * 200_000 + 4096, "{after}");
    assert!(
        segment_bytes(&store) * 10 <= kept * 11,
        "the segments hold {} bytes for {kept} of payload after compaction: {after}",
        segment_bytes(&store)
    );
    ok(&["verify", "--store", s(&store)]);
    let to = work.path().join("restored");
    assert_same_tree(
        &expected(&state),
        &restore(&store, &to, &[]),
        "after compaction",
    );
    // Another batch appends after the rewritten segment, and reads back.
    fs::write(state.join("f0"), rng.bytes(200_000)).expect("write");
    snapshot_at(&state, &store, START_MS + 7 * HOUR_MS);
    ok(&["verify", "--store", s(&store)]);
    assert_same_tree(
        &expected(&state),
        &restore(&store, &to, &[]),
        "a batch later",
    );
}
