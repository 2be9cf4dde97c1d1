//! The engine end to end, through the real binary: random trees, many rounds
//! of random edits each followed by `snapshot`, and `replay` into fresh and
//! stale directories compared byte for byte, with modes, mtimes and symlinks.

mod common;

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{assert_same_tree, diffkeeper, fresh, json, ok, read_tree, s, Node, Rng};

const NAMES: [&str; 8] = [
    "data.bin",
    "notes.txt",
    "ünïcödé ファイル.txt",
    "empty",
    "save-01.dat",
    "with space",
    "a.b.c",
    "UPPER",
];

/// Every directory under `root` (root included), relative.
fn dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::new()];
    for (path, node) in read_tree(root) {
        if matches!(node, Node::Dir { .. }) {
            out.push(PathBuf::from(OsStr::from_bytes(&path)));
        }
    }
    out
}

fn files(root: &Path) -> Vec<PathBuf> {
    read_tree(root)
        .into_iter()
        .filter(|(_, n)| matches!(n, Node::File { .. }))
        .map(|(p, _)| PathBuf::from(OsStr::from_bytes(&p)))
        .collect()
}

fn new_file_content(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => 0,
        1..=5 => rng.below(4096) as usize,
        6..=8 => rng.below(200_000) as usize,
        _ => 600_000 + rng.below(1_500_000) as usize,
    };
    if rng.chance(50) {
        rng.text(len)
    } else {
        rng.bytes(len)
    }
}

/// A random tree: nested directories, empty, text and binary files, unicode
/// and non-UTF-8 names, symlinks pointing inside.
fn build_tree(root: &Path, rng: &mut Rng) {
    fs::create_dir_all(root).expect("mkdir root");
    for depth_path in ["a", "a/b", "a/b/c", "a/b/c/d", "x", "x/y", "ünï"] {
        fs::create_dir_all(root.join(depth_path)).expect("mkdir");
    }
    for i in 0..40 {
        let dir = rng.pick(&dirs(root)).cloned().unwrap_or_default();
        let name = format!("{}-{i}", rng.pick(&NAMES).copied().unwrap_or("f"));
        fs::write(root.join(&dir).join(name), new_file_content(rng)).expect("write");
    }
    fs::write(
        root.join(OsStr::from_bytes(b"latin1-\xe9t\xe9")),
        b"not utf-8 name",
    )
    .expect("write");
    symlink("a/b/c", root.join("link-to-dir")).expect("symlink");
    symlink("../notes.txt-1", root.join("a/link-up")).expect("symlink");
    symlink("does-not-exist", root.join("x/dangling")).expect("symlink");
}

/// One round of random edits of every kind the engine must follow.
fn edit_round(root: &Path, rng: &mut Rng) {
    for _ in 0..12 {
        let all_files = files(root);
        let all_dirs = dirs(root);
        match rng.below(11) {
            // overwrite in place
            0 | 1 => {
                if let Some(f) = rng.pick(&all_files) {
                    let path = root.join(f);
                    let len = fs::metadata(&path).expect("stat").len();
                    let mut file = OpenOptions::new().write(true).open(&path).expect("open");
                    let at = rng.below(len.max(1));
                    file.seek(SeekFrom::Start(at)).expect("seek");
                    let patch_len = 1 + rng.below(300) as usize;
                    let patch = rng.bytes(patch_len);
                    file.write_all(&patch).expect("write");
                }
            }
            // append
            2 => {
                if let Some(f) = rng.pick(&all_files) {
                    let mut file = OpenOptions::new()
                        .append(true)
                        .open(root.join(f))
                        .expect("open");
                    let tail_len = rng.below(5000) as usize;
                    let tail = rng.text(tail_len);
                    file.write_all(&tail).expect("append");
                }
            }
            // truncate, shorter or to zero
            3 => {
                if let Some(f) = rng.pick(&all_files) {
                    let path = root.join(f);
                    let len = fs::metadata(&path).expect("stat").len();
                    let to = if rng.chance(30) {
                        0
                    } else {
                        rng.below(len.max(1))
                    };
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .expect("open")
                        .set_len(to)
                        .expect("truncate");
                }
            }
            // delete a file
            4 => {
                if let Some(f) = rng.pick(&all_files) {
                    fs::remove_file(root.join(f)).expect("rm");
                }
            }
            // rename a file, maybe across directories
            5 => {
                if let (Some(f), Some(d)) = (rng.pick(&all_files), rng.pick(&all_dirs)) {
                    let to = root.join(d).join(format!("moved-{}", rng.below(1_000_000)));
                    fs::rename(root.join(f), to).expect("rename");
                }
            }
            // rename a directory
            6 => {
                let candidates: Vec<&PathBuf> = all_dirs
                    .iter()
                    .filter(|d| !d.as_os_str().is_empty())
                    .collect();
                if let Some(d) = rng.pick(&candidates) {
                    let to = root.join(format!("renamed-dir-{}", rng.below(1_000_000)));
                    fs::rename(root.join(d), to).expect("rename dir");
                }
            }
            // chmod a file or a directory
            7 => {
                let modes = [0o600, 0o644, 0o755, 0o444, 0o700];
                let mode = *rng.pick(&modes).unwrap_or(&0o644);
                if rng.chance(70) {
                    if let Some(f) = rng.pick(&all_files) {
                        fs::set_permissions(root.join(f), fs::Permissions::from_mode(mode))
                            .expect("chmod");
                    }
                } else {
                    let candidates: Vec<&PathBuf> = all_dirs
                        .iter()
                        .filter(|d| !d.as_os_str().is_empty())
                        .collect();
                    let dir_mode = *rng.pick(&[0o750, 0o555, 0o700]).unwrap_or(&0o755);
                    if let Some(d) = rng.pick(&candidates) {
                        fs::set_permissions(root.join(d), fs::Permissions::from_mode(dir_mode))
                            .expect("chmod dir");
                    }
                }
            }
            // mkdir -p deep, with a file at the bottom
            8 => {
                let deep = root.join(format!("deep-{}/l2/l3/l4/l5", rng.below(1000)));
                fs::create_dir_all(&deep).expect("mkdir -p");
                fs::write(deep.join("leaf.txt"), rng.text(100)).expect("write");
            }
            // a new symlink pointing inside
            9 => {
                if let Some(f) = rng.pick(&all_files) {
                    let link = root.join(format!("link-{}", rng.below(1_000_000)));
                    symlink(f, link).expect("symlink");
                }
            }
            // a new file
            _ => {
                if let Some(d) = rng.pick(&all_dirs) {
                    fs::write(
                        root.join(d).join(format!("new-{}", rng.below(1_000_000))),
                        new_file_content(rng),
                    )
                    .expect("write");
                }
            }
        }
    }
}

fn snapshot(state: &Path, store: &Path) -> serde_json::Value {
    json(&[
        "snapshot",
        "--state-dir",
        &format!("data={}", s(state)),
        "--store",
        s(store),
        "--json",
    ])
}

fn replay_into(dir: &Path, store: &Path) -> String {
    ok(&[
        "replay",
        "--state-dir",
        &format!("data={}", s(dir)),
        "--store",
        s(store),
    ])
}

/// Copies a tree (files, dirs, symlinks, modes, mtimes) with `cp -a`.
fn copy_tree(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success());
}

#[test]
fn random_edit_history_replays_exactly() {
    for seed in [0x5eed_0001, 0x5eed_1001, 0x5eed_2001] {
        random_edit_history(seed);
    }
}

fn random_edit_history(seed: u64) {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    let mut rng = Rng::new(seed);
    build_tree(&state, &mut rng);
    snapshot(&state, &store);
    let mut stale = None;
    for round in 1..=15 {
        edit_round(&state, &mut rng);
        let summary = snapshot(&state, &store);
        assert!(
            summary["batch"].is_u64(),
            "round {round} changed things, so it must commit a batch: {summary}"
        );
        if round == 5 {
            let copy = work.path().join("stale");
            copy_tree(&state, &copy);
            stale = Some(copy);
        }
        if round % 5 == 0 {
            let target = fresh(work.path(), &format!("fresh-{round}"));
            replay_into(&target, &store);
            assert_same_tree(
                &read_tree(&state),
                &read_tree(&target),
                &format!("fresh replay after round {round}"),
            );
        }
    }

    // Replay over an old state: it becomes the latest state, and a file the
    // store never tracked is left alone.
    let stale = stale.expect("copied at round 5");
    fs::write(stale.join("untracked.log"), b"never captured").expect("write");
    replay_into(&stale, &store);
    let mut expected = read_tree(&state);
    expected.insert(
        b"untracked.log".to_vec(),
        read_tree(&stale)
            .remove(b"untracked.log".as_slice())
            .expect("untracked file kept"),
    );
    assert_same_tree(
        &expected,
        &read_tree(&stale),
        "replay over a stale directory",
    );

    // Replaying again changes nothing and writes nothing.
    let again = json(&[
        "replay",
        "--state-dir",
        &format!("data={}", s(&stale)),
        "--store",
        s(&store),
        "--json",
    ]);
    assert_eq!(
        again[0]["written"], 0,
        "a second replay rewrote files: {again}"
    );

    ok(&["verify", "--store", s(&store)]);
    let stats = json(&["stats", "--store", s(&store), "--json"]);
    assert_eq!(stats["batches"], 16, "{stats}");
    assert!(
        stats["versions"].as_u64().unwrap_or(0) > stats["files"].as_u64().unwrap_or(u64::MAX),
        "{stats}"
    );
    let log = json(&["log", "--store", s(&store), "--json"]);
    assert!(
        log.as_array()
            .is_some_and(|files| files.len() as u64 == stats["files"]),
        "{log}"
    );
}

#[test]
fn a_large_file_edited_in_place_stores_only_deltas() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(&state).expect("mkdir");
    let mut rng = Rng::new(0x5eed_0002);
    let big = state.join("model.ckpt");
    let size = 72 << 20; // over 64 MiB
    fs::write(&big, rng.bytes(size)).expect("write big file");
    let first = snapshot(&state, &store);
    assert!(
        first["stored_bytes"].as_u64().unwrap_or(0) >= size as u64 * 9 / 10,
        "{first}"
    );

    for round in 0..3u64 {
        let mut file = OpenOptions::new().write(true).open(&big).expect("open");
        file.seek(SeekFrom::Start(size as u64 / 2 + round * 7919))
            .expect("seek");
        file.write_all(&rng.bytes(4096))
            .expect("overwrite in the middle");
        file.seek(SeekFrom::End(0)).expect("seek end");
        file.write_all(&rng.bytes(10_000)).expect("append");
        drop(file);
        let summary = snapshot(&state, &store);
        // An edit in the middle and an append cost a few chunks, not the file.
        let stored = summary["stored_bytes"].as_u64().unwrap_or(u64::MAX);
        assert!(
            stored < 2 << 20,
            "round {round}: {stored} bytes stored for a 14 KB edit: {summary}"
        );
    }
    let target = fresh(work.path(), "fresh");
    replay_into(&target, &store);
    assert_same_tree(&read_tree(&state), &read_tree(&target), "large file replay");
    ok(&["verify", "--store", s(&store)]);
    let stats = json(&["stats", "--store", s(&store), "--json"]);
    assert!(
        stats["ratio"].as_f64().unwrap_or(0.0) > 3.5,
        "4 versions of one file should store about once: {stats}"
    );
}

#[test]
fn unchanged_files_cost_no_store_writes() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    build_tree(&state, &mut Rng::new(0x5eed_0003));
    snapshot(&state, &store);
    // Files written just before a capture are read once more after their
    // mtimes settle (see scan::RACY_WINDOW_NS); after that, nothing.
    std::thread::sleep(std::time::Duration::from_millis(2200));
    snapshot(&state, &store);
    let before = json(&["stats", "--store", s(&store), "--json"]);
    let store_bytes = fs::read(&store).expect("read store");
    let summary = snapshot(&state, &store);
    assert!(
        summary["batch"].is_null(),
        "no change, yet a batch was committed: {summary}"
    );
    let after = json(&["stats", "--store", s(&store), "--json"]);
    assert_eq!(before["batches"], after["batches"]);
    assert_eq!(before["versions"], after["versions"]);
    assert!(
        fs::read(&store).expect("read store") == store_bytes,
        "the store file changed"
    );
    let text = ok(&[
        "snapshot",
        "--state-dir",
        &format!("data={}", s(&state)),
        "--store",
        s(&store),
    ]);
    assert!(text.starts_with("no changes"), "{text}");
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
    fs::File::options()
        .write(true)
        .open(&file)
        .expect("open")
        .set_modified(mtime)
        .expect("set mtime");
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
    build_tree(&a, &mut Rng::new(7));
    build_tree(&b, &mut Rng::new(8));
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
    assert_same_tree(&read_tree(&a), &read_tree(&ra), "root a");
    assert_same_tree(&read_tree(&b), &read_tree(&rb), "root b");
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
fn first_start_and_bad_input_get_clear_answers() {
    let work = tempfile::tempdir().expect("tempdir");
    let store = work.path().join("none.dk");
    let target = work.path().join("t");
    let text = replay_into(&target, &store);
    assert!(text.contains("first start"), "{text}");
    assert!(!store.exists(), "replay must not create a store");

    let missing = work.path().join("no-such-dir");
    let out = diffkeeper(&["snapshot", "--state-dir", s(&missing), "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(s(&missing)),
        "{out:?}"
    );

    let not_a_store = work.path().join("notes.txt");
    fs::write(&not_a_store, "hello\n".repeat(1000)).expect("write");
    for args in [
        vec!["stats", "--store", s(&not_a_store)],
        vec!["verify", "--store", s(&not_a_store)],
        vec![
            "replay",
            "--state-dir",
            "d=/tmp/never-written-by-dk",
            "--store",
            s(&not_a_store),
        ],
    ] {
        let out = diffkeeper(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("notes.txt"),
            "{args:?}: {out:?}"
        );
    }
    assert!(!Path::new("/tmp/never-written-by-dk").exists());
    assert_eq!(
        fs::read_to_string(&not_a_store).expect("read"),
        "hello\n".repeat(1000)
    );

    let out = diffkeeper(&["log", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no store"),
        "{out:?}"
    );
}
