//! The engine end to end, through the real binary: random trees, many rounds
//! of random edits each followed by `snapshot`, and `replay` into fresh,
//! following and stale directories compared byte for byte, with modes,
//! mtimes and symlinks; the history (`log`, `stats`, `verify`) checked
//! against the live tree; idle snapshots, first start, bad and foreign
//! stores.
//!
//! The tests run as root (as CI does): they chmod files to 0444/0000 and
//! directories to 0555 and keep editing inside them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    assert_same_tree, diffkeeper, fresh, json, ok, read_tree, refused, s, Node, Rng, BIN,
};
use diffkeeper::store::{hex, sha256};

use common::edit::{
    build_tree, dirs, expected, files, kept, path_of, set_mtime, shown, Editor, Tree,
};

fn root_arg(dir: &Path) -> String {
    format!("data={}", s(dir))
}

fn snapshot(state: &Path, store: &Path) -> serde_json::Value {
    json(&[
        "snapshot",
        "--state-dir",
        &root_arg(state),
        "--store",
        s(store),
        "--json",
    ])
}

fn replay_into(dir: &Path, store: &Path) -> serde_json::Value {
    json(&[
        "replay",
        "--state-dir",
        &root_arg(dir),
        "--store",
        s(store),
        "--json",
    ])
}

/// Copies a tree (files, dirs, symlinks, modes, mtimes) with `cp -a`,
/// without the symlinks that point out of it: an old state as replay would
/// have left it (the store never holds such links).
fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
    let copied = read_tree(to);
    let keep = kept(copied.clone());
    for path in copied.keys().filter(|p| !keep.contains_key(*p)) {
        fs::remove_file(to.join(path_of(path))).expect("rm link");
    }
}

fn u64_of(value: &serde_json::Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {value}"))
}

/// Checks the store's history against the live tree: `verify` passes, and
/// `stats`, `log` and `log PATH` agree with each other and with `tree`.
fn check_history(tree: &Tree, store: &Path, batches: u64) {
    let out = diffkeeper(&["verify", "--store", s(store)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify of a good store failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verified = json(&["verify", "--store", s(store), "--json"]);
    assert_eq!(verified["problems"], serde_json::json!([]), "{verified}");

    let stats = json(&["stats", "--store", s(store), "--json"]);
    assert_eq!(u64_of(&stats, "batches"), batches, "{stats}");
    assert_eq!(stats["roots"], serde_json::json!(["data"]), "{stats}");
    assert_eq!(
        u64_of(&stats, "live_paths"),
        tree.len() as u64,
        "live paths in stats vs the tree: {stats}"
    );
    let versions = u64_of(&stats, "versions");
    assert!(
        versions >= batches && versions >= u64_of(&stats, "files"),
        "{stats}"
    );
    assert_eq!(u64_of(&verified, "versions"), versions, "{verified}");
    assert_eq!(
        u64_of(&verified, "chunks"),
        u64_of(&stats, "chunks"),
        "{verified}"
    );
    let live_bytes: u64 = tree
        .values()
        .map(|n| match n {
            Node::File { content, .. } => content.len() as u64,
            _ => 0,
        })
        .sum();
    assert!(u64_of(&stats, "logical_bytes") >= live_bytes, "{stats}");
    assert!(
        u64_of(&stats, "file_bytes") >= u64_of(&stats, "stored_bytes"),
        "{stats}"
    );

    let log = json(&["log", "--store", s(store), "--json"]);
    let log = log.as_array().expect("log is a list");
    assert_eq!(log.len() as u64, u64_of(&stats, "files"));
    assert_eq!(
        log.iter()
            .map(|f| f["versions"].as_array().map_or(0, Vec::len) as u64)
            .sum::<u64>(),
        versions
    );
    let by_path: BTreeMap<String, &serde_json::Value> = log
        .iter()
        .map(|f| (f["path"].as_str().expect("path").to_string(), f))
        .collect();
    for (path, node) in tree {
        let p = shown(path);
        let entry = by_path
            .get(&p)
            .unwrap_or_else(|| panic!("log has no history for live path {p}"));
        assert_eq!(entry["root"], "data");
        let history = entry["versions"].as_array().expect("versions");
        let batch_ids: Vec<u64> = history.iter().map(|v| u64_of(v, "batch")).collect();
        assert!(
            batch_ids.windows(2).all(|w| w[0] < w[1]) && batch_ids.iter().all(|&b| b <= batches),
            "{p}: batches out of order or unknown: {batch_ids:?}"
        );
        let last = history.last().expect("a version");
        let kind = last["kind"].as_str().expect("kind");
        match node {
            Node::File { mode, content, .. } => {
                assert!(
                    ["base", "packed", "delta", "chunks", "same"].contains(&kind),
                    "{p}: latest kind {kind} for a file"
                );
                assert_eq!(u64_of(last, "size"), content.len() as u64, "{p}: size");
                assert_eq!(last["mode"], format!("{mode:04o}"), "{p}: mode");
                assert_eq!(
                    last["sha256"],
                    hex(&sha256(content)),
                    "{p}: sha256 in log vs content"
                );
            }
            Node::Dir { mode } => {
                assert_eq!(kind, "dir", "{p}");
                assert_eq!(last["mode"], format!("{mode:04o}"), "{p}: mode");
            }
            Node::Symlink { target } => {
                assert_eq!(kind, "symlink", "{p}");
                assert_eq!(u64_of(last, "size"), target.len() as u64, "{p}");
            }
        }
    }
    let live: BTreeSet<String> = tree.keys().map(|p| shown(p)).collect();
    for (p, entry) in &by_path {
        let last = entry["versions"]
            .as_array()
            .and_then(|v| v.last())
            .expect("a version");
        // "." is the state directory itself.
        assert!(
            live.contains(p) || last["kind"] == "deleted" || (p == "." && last["kind"] == "dir"),
            "log says {p} is a live {}, but it is not in the tree",
            last["kind"]
        );
    }

    // `log PATH` and `log ROOT:PATH` give exactly that path's subtree.
    let Some(dir) = tree
        .iter()
        .filter(|(p, n)| matches!(n, Node::Dir { .. }) && std::str::from_utf8(p).is_ok())
        .map(|(p, _)| shown(p))
        .next()
    else {
        return;
    };
    let under = |p: &str| p == dir || p.starts_with(&format!("{dir}/"));
    let want: Vec<&String> = by_path.keys().filter(|p| under(p)).collect();
    for filter in [dir.clone(), format!("data:{dir}")] {
        let sub = json(&["log", "--store", s(store), &filter, "--json"]);
        let mut got: Vec<String> = sub
            .as_array()
            .expect("log is a list")
            .iter()
            .map(|f| f["path"].as_str().expect("path").to_string())
            .collect();
        got.sort();
        let got: Vec<&String> = got.iter().collect();
        assert_eq!(got, want, "log {filter}");
    }
}

/// Adds untracked entries to a stale copy: at the top, inside a directory
/// that is tracked both in the copy and in `latest`, and a whole untracked
/// directory. Returns what they are, to be expected after replay.
fn plant_untracked(stale: &Path, latest: &Tree) -> Tree {
    fs::write(stale.join("untracked.log"), b"never captured").expect("write");
    fs::create_dir_all(stale.join("untracked-dir/sub")).expect("mkdir");
    fs::write(stale.join("untracked-dir/sub/u"), b"mine").expect("write");
    let in_both = read_tree(stale).into_iter().find(|(p, n)| {
        matches!(n, Node::Dir { .. }) && matches!(latest.get(p), Some(Node::Dir { .. }))
    });
    if let Some((dir, _)) = in_both {
        fs::write(stale.join(path_of(&dir)).join("untracked-inside"), b"mine").expect("write");
    }
    read_tree(stale)
        .into_iter()
        .filter(|(p, _)| {
            let p = shown(p);
            p.starts_with("untracked") || p.ends_with("/untracked-inside")
        })
        .collect()
}

/// Snapshots `rounds` rounds of random edits of a random tree, replaying
/// into a follower after every round, into fresh directories every few
/// rounds, and at the end over stale copies holding untracked files.
fn random_edit_history(seed: u64, rounds: u64) {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    let follower = work.path().join("follower");
    let mut editor = Editor::new(seed);
    build_tree(&state, &mut editor.rng, 40);
    let first = snapshot(&state, &store);
    assert_eq!(first["batch"], 1, "{first}");
    let initial = work.path().join("stale-0");
    copy_tree(&state, &initial);
    let mut stale = vec![initial];
    for round in 1..=rounds {
        editor.round(&state, 16);
        let context = format!(
            "seed {seed:#x}, round {round} (this round's edits:\n  {}\n)",
            editor.recent()
        );
        let summary = snapshot(&state, &store);
        assert_eq!(
            summary["batch"],
            round + 1,
            "{context}\nthis round changed things, so it must commit the next batch: {summary}"
        );
        assert_eq!(summary["failures"], serde_json::json!([]), "{context}");
        let want = expected(&state);

        // A follower replayed after every round sees every transition
        // between consecutive states.
        replay_into(&follower, &store);
        assert_same_tree(
            &want,
            &read_tree(&follower),
            &format!("follower, {context}"),
        );
        if round % 4 == 0 || round == rounds {
            let target = fresh(work.path(), &format!("fresh-{round}"));
            replay_into(&target, &store);
            assert_same_tree(
                &want,
                &read_tree(&target),
                &format!("fresh replay, {context}"),
            );
            fs::remove_dir_all(&target).expect("rm fresh");
        }
        if round == 3 || round == rounds - 3 {
            let copy = work.path().join(format!("stale-{round}"));
            copy_tree(&state, &copy);
            stale.push(copy);
        }
    }
    let latest = expected(&state);

    // Replay over old states: each becomes the latest state, and what the
    // store never tracked is left alone.
    for copy in &stale {
        let planted = plant_untracked(copy, &latest);
        replay_into(copy, &store);
        let mut want = latest.clone();
        want.extend(planted);
        assert_same_tree(
            &want,
            &read_tree(copy),
            &format!("seed {seed:#x}: replay over {}", copy.display()),
        );
        // Replaying again changes nothing and writes nothing.
        let again = replay_into(copy, &store);
        assert_eq!(
            (u64_of(&again[0], "written"), u64_of(&again[0], "removed")),
            (0, 0),
            "seed {seed:#x}: a second replay over {} rewrote or removed paths: {again}",
            copy.display()
        );
        assert_same_tree(&want, &read_tree(copy), "after a second replay");
    }
    check_history(&latest, &store, rounds + 1);
}

#[test]
fn random_edit_history_replays_exactly_seed_1() {
    random_edit_history(0x5eed_0001, 16);
}

#[test]
fn random_edit_history_replays_exactly_seed_2() {
    random_edit_history(0x5eed_1001, 16);
}

#[test]
fn random_edit_history_replays_exactly_seed_3() {
    random_edit_history(0x5eed_2001, 12);
}

#[test]
fn random_edit_history_replays_exactly_seed_4() {
    random_edit_history(0x5eed_3001, 20);
}

#[test]
fn random_edit_history_replays_exactly_seed_5() {
    random_edit_history(0x5eed_4001, 18);
}

#[test]
fn random_edit_history_replays_exactly_seed_6() {
    random_edit_history(0x5eed_5001, 18);
}

#[test]
fn a_store_inside_the_state_dir_is_not_captured_and_survives_replay() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let tree = state.join("tree");
    let mut editor = Editor::new(0x5eed_0007);
    build_tree(&tree, &mut editor.rng, 20);
    // The same file spelled another way than under the state directory.
    let store = work.path().join("state/../state/./store.dk");
    // The store file and the directory of its payload segments.
    let without_store = |root: &Path| {
        let mut t = expected(root);
        t.retain(|path, _| !path.starts_with(b"store.dk"));
        t
    };
    let follower = work.path().join("follower");
    for round in 1..=5u64 {
        if round > 1 {
            editor.round(&tree, 10);
        }
        let summary = snapshot(&state, &store);
        assert_eq!(summary["batch"], round, "{summary}");
        replay_into(&follower, &store);
        assert_same_tree(
            &without_store(&state),
            &read_tree(&follower),
            &format!("round {round}"),
        );
    }
    let log = json(&["log", "--store", s(&store), "--json"]);
    assert!(
        log.as_array()
            .expect("log is a list")
            .iter()
            .all(|f| !f["path"].as_str().unwrap_or("").starts_with("store.dk")),
        "the store captured itself: {log}"
    );
    // Nothing changed but the store itself. (A batch may still settle files
    // written under 2 s ago, see scan::RACY_WINDOW_NS.)
    let idle = snapshot(&state, &store);
    assert_eq!(
        (
            u64_of(&idle, "new"),
            u64_of(&idle, "changed"),
            u64_of(&idle, "deleted")
        ),
        (0, 0, 0),
        "the store's own writes were seen as changes: {idle}"
    );
    let batches = if idle["batch"].is_null() { 5 } else { 6 };

    // A restart that lost the app's files: replay into the directory that
    // holds the store brings them back and leaves the store alone.
    let want = without_store(&state);
    fs::remove_dir_all(&tree).expect("rm");
    let store_bytes = fs::read(&store).expect("read store");
    replay_into(&state, &store);
    assert!(
        fs::read(&store).expect("read store") == store_bytes,
        "replay changed the store file inside the state directory"
    );
    assert_same_tree(&want, &without_store(&state), "replay next to the store");
    check_history(&want, &store, batches);
}

#[test]
fn a_symlink_planted_in_the_target_cannot_redirect_deletes() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(state.join("sub")).expect("mkdir");
    for name in ["f", "g"] {
        fs::write(state.join("sub").join(name), name).expect("write");
    }
    snapshot(&state, &store);
    fs::remove_file(state.join("sub/f")).expect("rm");
    fs::write(state.join("top"), b"top").expect("write");
    snapshot(&state, &store);

    // The target's `sub` is a symlink to a directory outside holding `f`
    // and `g`; the store says `sub/f` was deleted.
    let outside = work.path().join("outside");
    fs::create_dir_all(&outside).expect("mkdir");
    for name in ["f", "g"] {
        fs::write(outside.join(name), b"outside, must stay").expect("write");
    }
    let before = read_tree(&outside);
    let target = work.path().join("target");
    fs::create_dir_all(&target).expect("mkdir");
    symlink(&outside, target.join("sub")).expect("symlink");
    // The store never had a symlink there: replay refuses to replace it
    // (it could not bring it back), and with --force replaces the link
    // itself, never what it points to.
    let replay = [
        "replay",
        "--state-dir",
        &root_arg(&target),
        "--store",
        s(&store),
    ];
    let why = refused(&replay);
    assert!(why.contains(s(&target.join("sub"))), "{why}");
    assert_same_tree(&before, &read_tree(&outside), "the directory outside");
    ok(&[&replay[..], &["--force"]].concat());
    assert_same_tree(&before, &read_tree(&outside), "the directory outside");
    assert_same_tree(&expected(&state), &read_tree(&target), "the target");
}

/// The versions `log` lists for one path.
fn versions_of(store: &Path, path: &str) -> Vec<serde_json::Value> {
    let log = json(&["log", "--store", s(store), path, "--json"]);
    log.as_array()
        .and_then(|files| files.iter().find(|f| f["path"] == path))
        .and_then(|f| f["versions"].as_array())
        .cloned()
        .unwrap_or_else(|| panic!("no history of {path}: {log}"))
}

#[test]
fn a_large_file_in_a_random_tree_stores_only_deltas() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    let follower = work.path().join("follower");
    // The random edits stay in `tree`, the big file beside it.
    let tree = state.join("tree");
    let mut editor = Editor::new(0x5eed_0002);
    build_tree(&tree, &mut editor.rng, 15);
    fs::create_dir_all(state.join("big")).expect("mkdir");
    let big = state.join("big/model.ckpt");
    let size: u64 = 72 << 20; // over 64 MiB
    fs::write(&big, editor.rng.bytes(size as usize)).expect("write big file");
    let first = snapshot(&state, &store);
    assert!(
        u64_of(&first, "stored_bytes") >= size * 9 / 10,
        "random bytes cannot compress: {first}"
    );
    let stale = work.path().join("stale");
    copy_tree(&state, &stale);

    let rounds = 5u64;
    for round in 1..=rounds {
        editor.round(&tree, 6);
        // The big file: every round edited in place in the middle and
        // appended to; round 3 also gets bytes inserted in the middle (the
        // rest of the file shifts), round 4 is cut shorter.
        let len = fs::metadata(&big).expect("stat").len();
        let mut file = OpenOptions::new().write(true).open(&big).expect("open");
        file.seek(SeekFrom::Start(len / 2 + round * 7919))
            .expect("seek");
        file.write_all(&editor.rng.bytes(4096))
            .expect("overwrite in the middle");
        file.seek(SeekFrom::End(0)).expect("seek end");
        file.write_all(&editor.rng.bytes(10_000)).expect("append");
        drop(file);
        if round == 3 {
            let mut content = fs::read(&big).expect("read");
            let at = content.len() / 3;
            content.splice(at..at, editor.rng.bytes(100));
            fs::write(&big, content).expect("insert");
        }
        if round == 4 {
            let len = fs::metadata(&big).expect("stat").len();
            OpenOptions::new()
                .write(true)
                .open(&big)
                .and_then(|f| f.set_len(len - (1 << 20)))
                .expect("truncate");
        }
        let summary = snapshot(&state, &store);
        assert_eq!(summary["batch"], round + 1, "{summary}");
        // An edit costs a few chunks around it, not the file.
        let versions = versions_of(&store, "big/model.ckpt");
        let last = versions.last().expect("a version");
        assert_eq!(u64_of(last, "batch"), round + 1, "{last}");
        let stored = u64_of(last, "stored_bytes");
        assert!(
            stored < 2 << 20,
            "round {round}: {stored} bytes stored for a ~14 KB edit of the large file: {last}"
        );
        replay_into(&follower, &store);
        assert_same_tree(
            &expected(&state),
            &read_tree(&follower),
            &format!(
                "follower after round {round} (this round's edits:\n  {}\n)",
                editor.recent()
            ),
        );
    }
    let latest = expected(&state);
    let target = fresh(work.path(), "fresh");
    replay_into(&target, &store);
    assert_same_tree(&latest, &read_tree(&target), "large file, fresh replay");
    let planted = plant_untracked(&stale, &latest);
    replay_into(&stale, &store);
    let mut want = latest.clone();
    want.extend(planted);
    assert_same_tree(&want, &read_tree(&stale), "large file, replay over round 0");

    check_history(&latest, &store, rounds + 1);
    let stats = json(&["stats", "--store", s(&store), "--json"]);
    let (logical, stored) = (
        u64_of(&stats, "logical_bytes"),
        u64_of(&stats, "stored_bytes"),
    );
    assert!(
        stored < logical && logical > size * rounds,
        "deltas must keep the store far below the history's size: {stats}"
    );
    // (The file's length runs ahead of its data: redb grows it in large
    // sparse steps, so the space it occupies is what is compared.)
    assert!(
        u64_of(&stats, "disk_bytes") < size * 3 / 2,
        "{} versions of a 72 MiB file should take about one copy on disk: {stats}",
        rounds + 1
    );
}

#[test]
fn a_long_history_of_small_edits_stays_small_and_replayable() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(&state).expect("mkdir");
    let mut rng = Rng::new(0x5eed_0008);
    let db = state.join("app.db");
    let mut content = rng.bytes(3 << 20);
    fs::write(&db, &content).expect("write");
    snapshot(&state, &store);
    let rounds = 60u64;
    let follower = work.path().join("follower");
    for round in 1..=rounds {
        // A few records rewritten in place; every tenth round a record
        // inserted (the rest shifts) or one removed.
        for _ in 0..3 {
            let at = rng.below(content.len() as u64 - 100) as usize;
            let record = rng.bytes(64);
            content[at..at + 64].copy_from_slice(&record);
        }
        match round % 10 {
            0 => {
                let at = rng.below(content.len() as u64) as usize;
                content.splice(at..at, rng.bytes(200));
            }
            5 => {
                let at = rng.below(content.len() as u64 - 300) as usize;
                content.drain(at..at + 150);
            }
            _ => {}
        }
        fs::write(&db, &content).expect("write");
        let summary = snapshot(&state, &store);
        assert_eq!(summary["batch"], round + 1, "{summary}");
        let stored = u64_of(&summary, "stored_bytes");
        assert!(
            stored < 1 << 20,
            "round {round}: {stored} bytes stored for a few small edits: {summary}"
        );
        if round % 20 == 0 {
            replay_into(&follower, &store);
            assert_same_tree(
                &expected(&state),
                &read_tree(&follower),
                &format!("round {round}"),
            );
        }
    }
    let target = fresh(work.path(), "fresh");
    replay_into(&target, &store);
    assert_same_tree(&expected(&state), &read_tree(&target), "after every round");
    check_history(&expected(&state), &store, rounds + 1);
    let stats = json(&["stats", "--store", s(&store), "--json"]);
    assert!(
        stats["ratio"].as_f64().unwrap_or(0.0) > 10.0,
        "{} versions of a 3 MiB file with small edits: {stats}",
        rounds + 1
    );
}

/// A training checkpoint: float32 weights, a share of them nudged every
/// round and the file written again. Every round is stored as deltas of
/// a few bytes per byte changed (each nudged float a literal or two and a
/// copy; against the first version, so they grow as the changes add up),
/// and every version replays exactly.
#[test]
fn a_checkpoint_nudged_every_round_is_stored_as_deltas_of_what_changed() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(&state).expect("mkdir");
    let mut rng = Rng::new(0x5eed_00c4);
    let floats = 4usize << 20; // 16 MiB
    let mut weights: Vec<f32> = (0..floats)
        .map(|_| (rng.below(1 << 24) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2)
        .collect();
    let write = |weights: &[f32]| {
        let bytes: Vec<u8> = weights.iter().flat_map(|w| w.to_le_bytes()).collect();
        fs::write(state.join("model.bin"), bytes).expect("write");
    };
    write(&weights);
    // Random low bits: the first version is stored at about its size.
    let base = u64_of(&snapshot(&state, &store), "stored_bytes");
    assert!(base > (floats as u64) * 3, "{base} bytes stored");
    let mut snapshots = vec![expected(&state)];
    let mut previous = fs::read(state.join("model.bin")).expect("read");
    let original = previous.clone();
    for round in 1..=6u64 {
        for _ in 0..floats / 33 {
            let i = rng.below(floats as u64) as usize;
            weights[i] += (rng.below(1 << 16) as f32 / 65_536.0 - 0.5) * 0.01;
        }
        write(&weights);
        let now = fs::read(state.join("model.bin")).expect("read");
        let changed = now.iter().zip(&original).filter(|(a, b)| a != b).count() as u64;
        let summary = snapshot(&state, &store);
        assert_eq!(summary["batch"], round + 1, "{summary}");
        let stored = u64_of(&summary, "stored_bytes");
        assert!(
            stored < changed * 3 && stored < base / 2,
            "round {round}: {stored} bytes stored for {changed} bytes changed since the first version: {summary}"
        );
        assert!(now != previous);
        previous = now;
        snapshots.push(expected(&state));
    }
    for (n, tree) in snapshots.iter().enumerate() {
        let target = fresh(work.path(), &format!("batch-{}", n + 1));
        let batch = (n + 1).to_string();
        ok(&[
            "restore",
            "--store",
            s(&store),
            "--batch",
            &batch,
            "--to",
            s(&target),
        ]);
        assert_same_tree(tree, &read_tree(&target), &format!("batch {}", n + 1));
    }
    check_history(&expected(&state), &store, 7);
}

#[test]
fn metadata_renames_and_copies_store_no_content() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(state.join("d")).expect("mkdir");
    let mut rng = Rng::new(0x5eed_0005);
    let content = rng.bytes(1_500_000);
    fs::write(state.join("d/blob"), &content).expect("write");
    snapshot(&state, &store);

    type Step = (&'static str, fn(&Path));
    let steps: [Step; 5] = [
        ("chmod", |st| {
            fs::set_permissions(st.join("d/blob"), fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }),
        ("touch", |st| {
            set_mtime(
                &st.join("d/blob"),
                UNIX_EPOCH + Duration::from_secs(1 << 30),
            )
        }),
        ("rename", |st| {
            fs::rename(st.join("d/blob"), st.join("renamed")).expect("mv")
        }),
        ("copy", |st| {
            fs::copy(st.join("renamed"), st.join("d/copy"))
                .map(|_| ())
                .expect("cp")
        }),
        ("dir rename", |st| {
            fs::rename(st.join("d"), st.join("e")).expect("mv dir")
        }),
    ];
    for (batch, (what, step)) in (2u64..).zip(steps) {
        step(&state);
        let summary = snapshot(&state, &store);
        assert_eq!(summary["batch"], batch, "{what}: {summary}");
        assert_eq!(
            u64_of(&summary, "stored_bytes"),
            0,
            "{what} needs no new content in the store: {summary}"
        );
        let target = fresh(work.path(), &format!("after-{batch}"));
        replay_into(&target, &store);
        assert_same_tree(&expected(&state), &read_tree(&target), what);
    }
    assert_eq!(
        fs::read(state.join("e/copy")).expect("read"),
        content,
        "test setup"
    );
}

/// The store's history size: batches and versions.
fn history_size(store: &Path) -> (u64, u64) {
    let stats = json(&["stats", "--store", s(store), "--json"]);
    (u64_of(&stats, "batches"), u64_of(&stats, "versions"))
}

#[test]
fn unchanged_files_cost_no_store_writes() {
    let work = tempfile::tempdir().expect("tempdir");
    let store = work.path().join("store.dk");

    // Files last written an hour ago: the second snapshot has nothing to
    // read, nothing to settle, and writes nothing.
    let old = work.path().join("old");
    build_tree(&old, &mut Rng::new(0x5eed_0003), 40);
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for f in files(&old) {
        set_mtime(&old.join(f), an_hour_ago);
    }
    // Setting the mtime moved the ctime to now: a read this close to it
    // proves nothing (see store::schema, Stamps).
    std::thread::sleep(Duration::from_millis(2200));
    let first = snapshot(&old, &store);
    assert_eq!(first["batch"], 1, "{first}");
    let before = history_size(&store);
    let store_bytes = fs::read(&store).expect("read store");
    let text = ok(&[
        "snapshot",
        "--state-dir",
        &root_arg(&old),
        "--store",
        s(&store),
    ]);
    assert!(text.starts_with("no changes"), "{text}");
    let again = snapshot(&old, &store);
    assert!(
        again["batch"].is_null() && u64_of(&again, "settled") == 0,
        "no change, yet a batch was committed: {again}"
    );
    assert_eq!(before, history_size(&store));
    assert!(
        fs::read(&store).expect("read store") == store_bytes,
        "the store file changed on snapshots without changes"
    );

    // Files written just now: a snapshot right after the first one reads
    // them again (their ctimes are too recent to trust) but finds nothing;
    // once the ctimes settle (see scan::RACY_WINDOW_NS) one commit records
    // the stamps of the files and directories it found unchanged, adding no
    // batch and no version (the history shows only real changes), and after
    // that nothing is read or written.
    let store = work.path().join("store-new.dk");
    let new = work.path().join("new");
    build_tree(&new, &mut Rng::new(0x5eed_0004), 40);
    snapshot(&new, &store);
    let recorded = history_size(&store);
    std::thread::sleep(Duration::from_millis(2200));
    let settling = snapshot(&new, &store);
    assert!(
        settling["batch"].is_null()
            && u64_of(&settling, "settled") == (files(&new).len() + dirs(&new).len()) as u64,
        "every file and directory (the root too) is settled, with no batch: {settling}"
    );
    assert_eq!(
        recorded,
        history_size(&store),
        "settling added to the history"
    );
    let store_bytes = fs::read(&store).expect("read store");
    for _ in 0..2 {
        let summary = snapshot(&new, &store);
        assert!(
            summary["batch"].is_null() && u64_of(&summary, "settled") == 0,
            "no change, yet something was recorded: {summary}"
        );
    }
    assert_eq!(recorded, history_size(&store));
    assert!(
        fs::read(&store).expect("read store") == store_bytes,
        "the store file changed"
    );
}

#[test]
fn a_change_within_the_same_timestamp_tick_is_not_missed() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(&state).expect("mkdir");
    let file = state.join("counter");
    fs::write(&file, b"0001").expect("write");
    snapshot(&state, &store);
    // Same size, and the mtime put back exactly as it was: what a second
    // write in the same clock tick looks like.
    let mtime = fs::metadata(&file)
        .expect("stat")
        .modified()
        .expect("mtime");
    fs::write(&file, b"0002").expect("write");
    set_mtime(&file, mtime);
    snapshot(&state, &store);
    let target = fresh(work.path(), "fresh");
    replay_into(&target, &store);
    assert_eq!(fs::read(target.join("counter")).expect("read"), b"0002");
}

#[test]
fn several_state_dirs_share_one_store() {
    let work = tempfile::tempdir().expect("tempdir");
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let store = work.path().join("store.dk");
    build_tree(&a, &mut Rng::new(7), 20);
    build_tree(&b, &mut Rng::new(8), 20);
    ok(&[
        "snapshot",
        "--state-dir",
        s(&a),
        "--state-dir",
        s(&b),
        "--store",
        s(&store),
    ]);
    let (ra, rb) = (work.path().join("ra"), work.path().join("rb"));
    ok(&[
        "replay",
        "--state-dir",
        &format!("a={}", s(&ra)),
        "--state-dir",
        &format!("b={}", s(&rb)),
        "--store",
        s(&store),
    ]);
    assert_same_tree(&expected(&a), &read_tree(&ra), "root a");
    assert_same_tree(&expected(&b), &read_tree(&rb), "root b");
    // Two roots with one name are refused before anything is written.
    let out = diffkeeper(&[
        "snapshot",
        "--state-dir",
        s(&a),
        "--state-dir",
        &format!("a={}", s(&b)),
        "--store",
        s(&store),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("both named"),
        "{out:?}"
    );
}

#[test]
fn symlinks_out_of_the_state_dir_and_special_files_are_skipped() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(state.join("sub")).expect("mkdir");
    fs::write(state.join("sub/f"), b"kept").expect("write");
    symlink("/etc/passwd", state.join("abs")).expect("symlink");
    symlink("../../outside", state.join("sub/up")).expect("symlink");
    symlink("../sub/f", state.join("sub/fine")).expect("symlink");
    let fifo = state.join("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    let _socket = std::os::unix::net::UnixListener::bind(state.join("sock")).expect("bind");

    // Reading the FIFO would block forever: the snapshot must not.
    let mut child = Command::new(BIN)
        .args([
            "snapshot",
            "--state-dir",
            &root_arg(&state),
            "--store",
            s(&store),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            child.kill().expect("kill");
            panic!("snapshot of a directory holding a FIFO hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for link in ["abs", "sub/up"] {
        assert!(
            stderr.contains(link) && stderr.contains("not kept"),
            "snapshot must say it does not keep {link}: {stderr}"
        );
    }

    // (Reading the tree would block on the FIFO.)
    fs::remove_file(&fifo).expect("rm fifo");
    fs::remove_file(state.join("sock")).expect("rm socket");
    let target = fresh(work.path(), "target");
    replay_into(&target, &store);
    let want = expected(&state);
    assert_eq!(
        want.keys().map(|p| shown(p)).collect::<Vec<_>>(),
        ["sub", "sub/f", "sub/fine"]
    );
    assert_same_tree(&want, &read_tree(&target), "replay without outside links");

    // A FIFO where the store has a file: the store cannot bring a FIFO
    // back, so replay refuses, naming it, and changes nothing; with
    // --force the file replaces it.
    let status = Command::new("mkfifo")
        .arg(target.join("sub/f.fifo-placeholder"))
        .status()
        .expect("mkfifo");
    assert!(status.success());
    fs::remove_file(target.join("sub/f")).expect("rm");
    fs::rename(target.join("sub/f.fifo-placeholder"), target.join("sub/f")).expect("mv");
    let replay = [
        "replay",
        "--state-dir",
        &root_arg(&target),
        "--store",
        s(&store),
    ];
    let why = refused(&replay);
    assert!(
        why.contains(s(&target.join("sub/f"))) && why.contains("the store never had"),
        "{why}"
    );
    assert!(fs::symlink_metadata(target.join("sub/f"))
        .expect("stat")
        .file_type()
        .is_fifo());
    ok(&[&replay[..], &["--force"]].concat());
    assert!(
        fs::symlink_metadata(target.join("sub/f"))
            .expect("stat")
            .is_file(),
        "replay left the FIFO where the store has a file"
    );
    assert_same_tree(&want, &read_tree(&target), "replay over a FIFO");
}

/// Overwrites `meta.schema_version` and `meta.min_reader_version` in a
/// store file. redb keeps the small `meta` table in one leaf: the keys
/// (`created_ms`, `min_reader_version`, `schema_version`, `segment_end`,
/// in order) one after the other, then the values (8 bytes, then two u32
/// LE, then the segment end). Each batch rewrites the leaf (the segment
/// end moves), so older copies of it lie in freed pages too: every copy is
/// changed, the live one among them.
/// The schema this build writes.
const SCHEMA: u32 = diffkeeper::store::schema::SCHEMA_VERSION;

fn set_schema_version(store: &Path, version: u32) {
    let mut bytes = fs::read(store).expect("read store");
    let keys = b"created_msmin_reader_versionschema_versionsegment_end";
    let found: Vec<usize> = bytes
        .windows(keys.len())
        .enumerate()
        .filter(|(_, w)| *w == keys)
        .map(|(at, _)| at + keys.len() + 8)
        .collect();
    assert!(
        !found.is_empty(),
        "the meta leaf is in the store file (has redb's page layout changed?)"
    );
    for at in found {
        assert_eq!(
            bytes[at..at + 8],
            [SCHEMA.to_le_bytes(), SCHEMA.to_le_bytes()].concat(),
            "schema_version and min_reader_version {SCHEMA} expected at offset {at}"
        );
        bytes[at..at + 4].copy_from_slice(&version.to_le_bytes());
        bytes[at + 4..at + 8].copy_from_slice(&version.to_le_bytes());
    }
    fs::write(store, bytes).expect("write store");
}

#[test]
fn a_store_of_another_schema_version_is_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    build_tree(&state, &mut Rng::new(0x5eed_0006), 10);
    snapshot(&state, &store);
    fs::write(state.join("second"), b"batch 2").expect("write");
    snapshot(&state, &store);
    let good = fs::read(&store).expect("read store");
    for version in [SCHEMA + 1, 0, u32::MAX] {
        fs::write(&store, &good).expect("restore store");
        set_schema_version(&store, version);
        let damaged = fs::read(&store).expect("read store");
        let target = work.path().join("target");
        build_tree(&target, &mut Rng::new(9), 10);
        let before = read_tree(&target);
        for args in [
            vec![
                "replay",
                "--state-dir",
                &root_arg(&target),
                "--store",
                s(&store),
            ],
            vec![
                "snapshot",
                "--state-dir",
                &root_arg(&state),
                "--store",
                s(&store),
            ],
            vec!["stats", "--store", s(&store)],
            vec!["verify", "--store", s(&store)],
            vec!["log", "--store", s(&store)],
        ] {
            let out = diffkeeper(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&format!("schema version {version}")) && stderr.contains(s(&store)),
                "{args:?} must name the store and its schema version: {stderr}"
            );
        }
        assert_same_tree(&before, &read_tree(&target), "target of a refused replay");
        assert!(
            fs::read(&store).expect("read store") == damaged,
            "schema {version}: a refused command changed the store"
        );
        fs::remove_dir_all(&target).expect("rm");
    }
    // The untouched store still works.
    fs::write(&store, &good).expect("restore store");
    let target = fresh(work.path(), "fresh");
    replay_into(&target, &store);
    assert_same_tree(&expected(&state), &read_tree(&target), "good store");
}

#[test]
fn first_start_and_bad_input_get_clear_answers() {
    let work = tempfile::tempdir().expect("tempdir");
    let store = work.path().join("none.dk");
    let target = work.path().join("t");
    let text = ok(&[
        "replay",
        "--state-dir",
        &root_arg(&target),
        "--store",
        s(&store),
    ]);
    assert!(text.contains("first start"), "{text}");
    let first = replay_into(&target, &store);
    assert_eq!(first["first_start"], true, "{first}");
    assert!(!store.exists(), "replay must not create a store");

    let missing = work.path().join("no-such-dir");
    let out = diffkeeper(&["snapshot", "--state-dir", s(&missing), "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(s(&missing)),
        "{out:?}"
    );
    assert!(!store.exists(), "a failed snapshot must not create a store");

    let not_a_store = work.path().join("notes.txt");
    fs::write(&not_a_store, "hello\n".repeat(1000)).expect("write");
    let never = work.path().join("never-written");
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    fs::write(state.join("f"), b"x").expect("write");
    for args in [
        vec!["stats", "--store", s(&not_a_store)],
        vec!["verify", "--store", s(&not_a_store)],
        vec!["log", "--store", s(&not_a_store)],
        vec![
            "replay",
            "--state-dir",
            &format!("d={}", s(&never)),
            "--store",
            s(&not_a_store),
        ],
        vec![
            "snapshot",
            "--state-dir",
            s(&state),
            "--store",
            s(&not_a_store),
        ],
    ] {
        let out = diffkeeper(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("store {}", s(&not_a_store))),
            "{args:?}: the error must name the store: {stderr}"
        );
    }
    assert!(
        !never.exists(),
        "replay from a bad store created its target"
    );
    assert_eq!(
        fs::read_to_string(&not_a_store).expect("read"),
        "hello\n".repeat(1000),
        "a command changed a file that is not a store"
    );

    let out = diffkeeper(&["log", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no store"),
        "{out:?}"
    );
    let out = diffkeeper(&[
        "snapshot",
        "--state-dir",
        s(&state),
        "--store",
        s(&work.path().join("no-such-dir/store.dk")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-dir"),
        "{out:?}"
    );
}

/// JSON-like records, as small config and package files hold: each file
/// alone compresses a little, a dictionary of their shared words much more.
fn json_records(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < len {
        let r = rng.next();
        out.extend_from_slice(
            format!(
                "{{\"id\": {}, \"name\": \"package-{}\", \"version\": \"{}.{}.{}\", \"license\": \"MIT\"}},\n",
                r % 100_000,
                (r >> 17) % 700,
                (r >> 27) % 10,
                (r >> 31) % 30,
                (r >> 36) % 100
            )
            .as_bytes(),
        );
    }
    out.truncate(len);
    out
}

#[test]
fn small_files_are_compressed_with_a_dictionary_trained_once_per_store() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    let mut rng = Rng::new(0x5eed_0d1c);
    for i in 0..400 {
        let dir = state.join(format!("pkg-{:02}", i % 40));
        fs::create_dir_all(&dir).expect("mkdir");
        let len = 300 + rng.below(3000) as usize;
        fs::write(dir.join(format!("f{i}.json")), json_records(&mut rng, len)).expect("write");
    }
    let first = snapshot(&state, &store);
    let logical = u64_of(&first, "logical_bytes");
    let stats = json(&["stats", "--store", s(&store), "--json"]);
    let dictionary = u64_of(&stats, "dictionary_bytes");
    assert!(
        dictionary > 0,
        "400 small files train a dictionary: {stats}"
    );
    // Each file alone, with zstd and no dictionary, comes to about a fifth
    // of its size on these records (5.1x); with the dictionary, 7.7x.
    assert!(
        u64_of(&stats, "stored_bytes") * 13 < logical * 2,
        "{logical} logical bytes stored as {stats}"
    );
    // Later batches use the same dictionary: none is trained again.
    for round in 0..3 {
        for i in (round..400).step_by(37) {
            let path = state.join(format!("pkg-{:02}/f{i}.json", i % 40));
            let len = 300 + rng.below(3000) as usize;
            fs::write(&path, json_records(&mut rng, len)).expect("write");
        }
        snapshot(&state, &store);
    }
    let stats = json(&["stats", "--store", s(&store), "--json"]);
    assert_eq!(u64_of(&stats, "dictionary_bytes"), dictionary, "{stats}");
    // Compaction re-encodes the bases of deltas whose old bases go; every
    // kept moment still restores, verified.
    ok(&["compact", "--store", s(&store), "--keep-last", "2"]);
    ok(&["verify", "--store", s(&store)]);
    let target = fresh(work.path(), "restored");
    replay_into(&target, &store);
    assert_eq!(read_tree(&target), read_tree(&state), "the latest state");
    // A store with only a few small files trains none.
    let few = work.path().join("few");
    fs::create_dir_all(&few).expect("mkdir");
    for i in 0..20 {
        fs::write(few.join(format!("f{i}")), json_records(&mut rng, 2000)).expect("write");
    }
    let few_store = work.path().join("few.dk");
    snapshot(&few, &few_store);
    let stats = json(&["stats", "--store", s(&few_store), "--json"]);
    assert_eq!(u64_of(&stats, "dictionary_bytes"), 0, "{stats}");
}

/// Writes files `0..count` of 60 bytes of text each at `path_of(i)`.
fn write_small_files(rng: &mut Rng, count: u64, path_of: impl Fn(u64) -> PathBuf) {
    for i in 0..count {
        let path = path_of(i);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).expect("mkdir");
        }
        fs::write(&path, rng.text(60)).expect("write");
    }
}

/// Where [`write_small_files`] puts file `i` of a node_modules-like tree
/// under `state`: 200 packages, files spread over them in turn.
fn package_file(state: &Path, i: u64) -> PathBuf {
    state.join(format!("node_modules/pkg-{:03}/lib/f{i:05}.js", i % 200))
}

#[test]
fn a_first_snapshot_of_many_small_files_packs_its_index_pages() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    let mut rng = Rng::new(0x5eed_9ac4);
    let count: u64 = 20_000;
    write_small_files(&mut rng, count, |i| package_file(&state, i));
    snapshot(&state, &store);
    // The payload is in segments: the file is the index, whose rows the
    // capture workers deliver in no order. Written as they came, its pages
    // were about 70% full (399 bytes a file); written in key order, full
    // (308 bytes a file).
    let len = fs::metadata(&store).expect("the store file").len();
    assert!(
        len < count * 340,
        "a store file of {len} bytes for {count} files ({} a file)",
        len / count
    );
    let target = fresh(work.path(), "restored");
    replay_into(&target, &store);
    assert_eq!(read_tree(&target), read_tree(&state), "the state");
}

#[test]
fn the_store_file_gives_back_the_space_redb_grows_it_by() {
    let file_len = |path: &Path| fs::metadata(path).expect("a store file").len();
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    let mut rng = Rng::new(0x5eed_f11e);
    // Enough files for an index of several MiB.
    let count = 20_000;
    let path_of = |i: u64| state.join(format!("pkg-{:03}/f{i:05}", i % 200));
    write_small_files(&mut rng, count, path_of);
    snapshot(&state, &store);
    for _ in 0..3 {
        // Files all over the tree: they change pages all over the index,
        // which a transaction copies, and redb grows the file by doubling
        // when the copies do not fit.
        for _ in 0..2_000 {
            fs::write(path_of(rng.below(count)), rng.text(60)).expect("write");
        }
        snapshot(&state, &store);
        // What the same history takes in a file shrunk by `compact`
        // (which keeps every batch here).
        let tight = work.path().join("tight.dk");
        common::copy_store(&store, &tight);
        ok(&["compact", "--store", s(&tight), "--keep-last", "100"]);
        let (len, tight_len) = (file_len(&store), file_len(&tight));
        assert!(
            len <= tight_len + tight_len / 10 + (1 << 20),
            "a store file of {len} bytes, {tight_len} once shrunk"
        );
    }
    let target = fresh(work.path(), "restored");
    replay_into(&target, &store);
    assert_eq!(read_tree(&target), read_tree(&state), "the latest state");
}

#[test]
fn edits_scattered_over_the_index_leave_its_pages_full_again_once_shrunk() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    let mut rng = Rng::new(0x5eed_7ac7);
    let count: u64 = 20_000;
    let path_of = |i: u64| package_file(&state, i);
    write_small_files(&mut rng, count, path_of);
    snapshot(&state, &store);
    let first_state = read_tree(&state);
    let index = |store: &Path| {
        let stats = json(&["stats", "--store", s(store), "--json"]);
        let field = |name: &str| stats[name].as_u64().expect(name);
        (
            field("index_bytes"),
            field("index_page_bytes"),
            field("index_record_bytes"),
        )
    };
    // 1,600 edits, a version each, into leaves all over the versions and
    // chunk_index tables: redb splits a full leaf in half to insert into
    // it, and these tables were written full.
    for _ in 0..8 {
        for _ in 0..200 {
            fs::write(path_of(rng.below(count)), rng.text(60)).expect("write");
        }
        snapshot(&state, &store);
        let (file, pages, records) = index(&store);
        // Shrunk after each write that grew it by more than 1 MiB, and
        // repacked there once a table is a fifth empty.
        assert!(
            file <= pages + pages / 10 + (1 << 20),
            "a store file of {file} bytes for {pages} bytes of pages"
        );
        assert!(
            pages <= records + records / 2,
            "{pages} bytes of pages for {records} bytes of records"
        );
    }
    ok(&["compact", "--store", s(&store), "--keep-last", "100"]);
    // Left as split, they would be about 70% full.
    let (file, pages, records) = index(&store);
    assert!(
        pages <= records + records / 7,
        "{pages} bytes of pages for {records} bytes of records once compacted"
    );
    assert!(
        file <= pages + (256 << 10),
        "a store file of {file} bytes for {pages} bytes of pages once compacted"
    );
    let target = fresh(work.path(), "restored");
    replay_into(&target, &store);
    assert_eq!(read_tree(&target), read_tree(&state), "the latest state");
    let oldest = work.path().join("oldest");
    ok(&[
        "restore",
        "--store",
        s(&store),
        "--batch",
        "1",
        "--to",
        s(&oldest),
    ]);
    assert_eq!(read_tree(&oldest), first_state, "the first state");
}

/// Every pack of the store at `store` (see the store's Packs), with the
/// chunks that lie in it; and every file's first chunk by path.
fn packs_of(store: &Path) -> (BTreeMap<u64, BTreeSet<u64>>, BTreeMap<Vec<u8>, u64>) {
    let opened = diffkeeper::store::Store::open_read_only(store)
        .expect("open")
        .expect("a store");
    let reader = opened.reader().expect("reader");
    let mut packs: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    reader
        .for_each_chunk::<diffkeeper::store::StoreError>(|id, record| {
            if let Some(pack) = record.pack() {
                packs.entry(pack).or_default().insert(id);
            }
            Ok(())
        })
        .expect("chunks");
    let files = reader
        .latest("data")
        .expect("latest")
        .into_iter()
        .filter_map(|e| Some((e.path, *e.version.chunks.first()?)))
        .collect();
    (packs, files)
}

#[test]
fn small_files_share_packs_and_compaction_keeps_or_rewrites_them() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    let mut rng = Rng::new(0x9ac5_0001);
    let count: u64 = 1_000;
    for i in 0..count {
        let path = package_file(&state, i);
        fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        fs::write(&path, rng.text(4096)).expect("write");
    }
    let first = snapshot(&state, &store);
    let (packs, files) = packs_of(&store);
    assert!(
        packs.len() >= 3,
        "{} packs for 4 MB of small files",
        packs.len()
    );
    let member_of: BTreeMap<u64, u64> = packs
        .iter()
        .flat_map(|(pack, members)| members.iter().map(move |m| (*m, *pack)))
        .collect();
    assert!(
        files.values().all(|chunk| member_of.contains_key(chunk)),
        "every small file lies in a pack"
    );
    // The batch's stored bytes are the packs' payload (members have none),
    // and `log` says where a file's went.
    let stats = json(&["stats", "--store", s(&store), "--json"]);
    assert_eq!(
        first["stored_bytes"], stats["stored_bytes"],
        "{first} {stats}"
    );
    let logged = json(&["log", "--store", s(&store), "--json"]);
    let kinds: BTreeSet<&str> = logged
        .as_array()
        .expect("files")
        .iter()
        .flat_map(|f| f["versions"].as_array().expect("versions").iter())
        .map(|v| v["kind"].as_str().expect("kind"))
        .filter(|kind| *kind != "dir")
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["packed"]),
        "kinds of the files' versions"
    );
    assert_eq!(
        first["stored_bytes"], stats["stored_bytes"],
        "{first} {stats}"
    );
    let restored = fresh(work.path(), "first");
    replay_into(&restored, &store);
    assert_eq!(read_tree(&restored), read_tree(&state), "the first state");

    // Every file of one pack deleted but one, which goes a batch later;
    // three quarters of another's files rewritten, a quarter of a third's.
    let by_pack = |pack: u64| -> Vec<(PathBuf, u64)> {
        files
            .iter()
            .filter(|(_, chunk)| member_of.get(chunk) == Some(&pack))
            .map(|(path, chunk)| {
                let path = state.join(String::from_utf8_lossy(path).as_ref());
                (path, *chunk)
            })
            .collect()
    };
    let mut ids = packs.keys().copied();
    let mut next_pack = || ids.next().expect("a pack");
    let (doomed, most, few) = (next_pack(), next_pack(), next_pack());
    let (last, others) = by_pack(doomed)
        .split_last()
        .map(|(l, o)| (l.0.clone(), o.to_vec()))
        .expect("members");
    for (path, _) in &others {
        fs::remove_file(path).expect("rm");
    }
    let rewrite = |pack: u64, share: usize, rng: &mut Rng| -> BTreeSet<u64> {
        let members = by_pack(pack);
        let cut = members.len() * share / 4;
        for (path, _) in &members[..cut] {
            fs::write(path, rng.text(4096)).expect("rewrite");
        }
        members[cut..].iter().map(|(_, chunk)| *chunk).collect()
    };
    let most_left = rewrite(most, 3, &mut rng);
    let few_left = rewrite(few, 1, &mut rng);
    snapshot(&state, &store);
    let second = read_tree(&state);
    fs::remove_file(&last).expect("rm");
    snapshot(&state, &store);
    let payload_before = json(&["stats", "--store", s(&store), "--json"])["stored_bytes"]
        .as_u64()
        .expect("stored bytes");

    // Batches 2 and 3 kept: a pack most of whose members go is written
    // again with the others (the doomed one's last member alone, as an
    // ordinary base); one that keeps most of them stays as it is.
    let compacted = json(&[
        "compact",
        "--store",
        s(&store),
        "--keep-last",
        "2",
        "--json",
    ]);
    assert_eq!(compacted["packs_rewritten"], 2, "{compacted}");
    let verified = json(&["verify", "--store", s(&store), "--json"]);
    assert_eq!(verified["problems"], serde_json::json!([]), "{verified}");
    let (kept, _) = packs_of(&store);
    assert!(
        !kept.contains_key(&doomed) && !kept.contains_key(&most),
        "{kept:?}"
    );
    assert_eq!(
        kept.get(&few),
        Some(&few_left),
        "the pack that keeps most members"
    );
    assert!(
        kept.values().any(|members| *members == most_left),
        "the survivors of pack {most} in a pack of their own: {kept:?}"
    );
    let payload_after = json(&["stats", "--store", s(&store), "--json"])["stored_bytes"]
        .as_u64()
        .expect("stored bytes");
    assert!(
        payload_after < payload_before,
        "{payload_after} >= {payload_before}"
    );
    let at_2 = fresh(work.path(), "second");
    ok(&[
        "restore",
        "--store",
        s(&store),
        "--batch",
        "2",
        "--to",
        s(&at_2),
    ]);
    assert_eq!(read_tree(&at_2), second, "batch 2");

    // The doomed pack's last file gone from every kept moment: released.
    ok(&["compact", "--store", s(&store), "--keep-last", "1"]);
    let verified = json(&["verify", "--store", s(&store), "--json"]);
    assert_eq!(verified["problems"], serde_json::json!([]), "{verified}");
    assert_eq!(verified["unreferenced_chunks"], 0, "{verified}");
    let latest = fresh(work.path(), "latest");
    replay_into(&latest, &store);
    assert_eq!(read_tree(&latest), read_tree(&state), "the latest state");
}
