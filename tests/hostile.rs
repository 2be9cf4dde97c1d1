//! Bad input through the real binary: damaged stores, hostile stores, and
//! symlinks planted in the target. Each gets a clear error naming the cause,
//! and nothing good is overwritten, nothing is written outside the target.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use common::{assert_same_tree, diffkeeper, ok, read_tree, s, Rng};
use diffkeeper::store::schema::{BatchRecord, EntryKind, VersionRecord};
use diffkeeper::store::{sha256, Store};

/// A state with incompressible files, so their bytes sit raw in the store.
fn make_state(dir: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    fs::create_dir_all(dir.join("saves")).expect("mkdir");
    for i in 0..6 {
        fs::write(dir.join(format!("saves/slot{i}.bin")), rng.bytes(200_000)).expect("write");
    }
    fs::write(dir.join("config.txt"), b"level = 7\n").expect("write");
}

fn replay_args(dir: &Path, store: &Path) -> Vec<String> {
    vec![
        "replay".into(),
        "--state-dir".into(),
        format!("data={}", s(dir)),
        "--store".into(),
        s(store).into(),
    ]
}

fn run(args: &[String]) -> std::process::Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    diffkeeper(&refs)
}

/// A good store of `make_state(seed 1)`, and a target holding another good
/// state that replay must not damage.
fn store_and_target(work: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let state = work.join("state");
    let store = work.join("store.dk");
    make_state(&state, 1);
    ok(&[
        "snapshot",
        "--state-dir",
        &format!("data={}", s(&state)),
        "--store",
        s(&store),
    ]);
    let target = work.join("target");
    make_state(&target, 2);
    (store, target)
}

fn assert_refused_untouched(args: &[String], target: &Path, expect_in_error: &[&str]) {
    let before = read_tree(target);
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "must fail cleanly: {stderr}");
    for word in expect_in_error {
        assert!(
            stderr.contains(word),
            "the error must mention {word:?}: {stderr}"
        );
    }
    assert_same_tree(&before, &read_tree(target), "target after a refused replay");
}

#[test]
fn flipped_bytes_in_a_chunk_are_caught_and_nothing_is_overwritten() {
    let work = tempfile::tempdir().expect("tempdir");
    let (store, target) = store_and_target(work.path());
    // Find a stretch of slot3.bin's bytes in the store's payload segments
    // and flip them.
    let needle =
        fs::read(work.path().join("state/saves/slot3.bin")).expect("read")[5000..5064].to_vec();
    let (segment, mut bytes, at) = fs::read_dir(common::segments_of(&store))
        .expect("segments")
        .find_map(|entry| {
            let path = entry.expect("segment").path();
            let bytes = fs::read(&path).expect("read a segment");
            let at = bytes
                .windows(needle.len())
                .position(|w| w == needle.as_slice())?;
            Some((path, bytes, at))
        })
        .expect("raw chunk bytes are in a payload segment");
    for b in &mut bytes[at..at + 16] {
        *b ^= 0xa5;
    }
    fs::write(&segment, &bytes).expect("write the damaged segment");

    assert_refused_untouched(
        &replay_args(&target, &store),
        &target,
        &["slot3.bin", "store"],
    );
    let out = diffkeeper(&["verify", "--store", s(&store)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("slot3.bin") && stderr.contains("SHA-256"),
        "verify must name the damage: {stderr}"
    );
}

#[test]
fn a_truncated_store_is_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    let (store, target) = store_and_target(work.path());
    let len = fs::metadata(&store).expect("stat").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&store)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");
    assert_refused_untouched(&replay_args(&target, &store), &target, &["store"]);
    let out = diffkeeper(&["verify", "--store", s(&store)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("store.dk"));
}

#[test]
fn damage_anywhere_never_panics_or_damages_the_target() {
    let work = tempfile::tempdir().expect("tempdir");
    let (store, target) = store_and_target(work.path());
    let good = fs::read(&store).expect("read store");
    let mut rng = Rng::new(99);
    for round in 0..40 {
        let before = read_tree(&target);
        let mut bytes = good.clone();
        let at = rng.below(bytes.len() as u64) as usize;
        let end = (at + 1 + rng.below(64) as usize).min(bytes.len());
        for b in &mut bytes[at..end] {
            *b = rng.next() as u8;
        }
        fs::write(&store, &bytes).expect("write");
        // Either the damage lands where nothing reads it and replay gives the
        // stored state, or replay fails and the target is as it was.
        let out = run(&replay_args(&target, &store));
        if out.status.success() {
            assert_same_tree(
                &read_tree(&work.path().join("state")),
                &read_tree(&target),
                "replay of a store damaged where nothing reads",
            );
            // Put the other good state back for the next round.
            fs::remove_dir_all(&target).expect("rm");
            make_state(&target, 2);
        } else {
            assert_eq!(out.status.code(), Some(1), "round {round}: {out:?}");
            assert_same_tree(
                &before,
                &read_tree(&target),
                &format!("round {round}: target after a failed replay"),
            );
        }
        let verify = diffkeeper(&["verify", "--store", s(&store)]);
        assert!(
            verify.status.code() == Some(0) || verify.status.code() == Some(1),
            "{verify:?}"
        );
    }
}

/// Writes a store holding one batch of the given versions of root `data`.
fn craft_store(path: &Path, versions: &[(&[u8], VersionRecord)]) {
    let store = Store::create_or_open(path).expect("create store");
    let mut batch = store.begin_batch().expect("batch");
    for (p, record) in versions {
        batch.put_version("data", p, record).expect("put version");
    }
    batch
        .commit(&BatchRecord {
            time_ms: 0,
            started_ms: 0,
            roots: vec!["data".into()],
            files_changed: versions.len() as u64,
            logical_bytes: 0,
            stored_bytes: 0,
        })
        .expect("commit");
}

fn entry(kind: EntryKind, target: &[u8]) -> VersionRecord {
    VersionRecord {
        kind,
        mode: 0o755,
        mtime_ns: 0,
        size: target.len() as u64,
        hash: sha256(target),
        chunks: Vec::new(),
        target: target.to_vec(),
        stored_bytes: 0,
        owner: None,
        xattrs: Vec::new(),
        stamp: None,
    }
}

#[test]
fn stores_that_point_outside_the_target_are_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    // (case name, versions in the store, what the error must name)
    type Case<'a> = (&'a str, Vec<(&'a [u8], VersionRecord)>, &'a str);
    let cases: [Case; 6] = [
        (
            "dotdot",
            vec![(b"../escaped", entry(EntryKind::File, b""))],
            "../escaped",
        ),
        (
            "dotdot-dir",
            vec![(b"ok/../../escaped", entry(EntryKind::Dir, b""))],
            "escaped",
        ),
        (
            "absolute",
            vec![(b"/tmp/dk-absolute-escape", entry(EntryKind::File, b""))],
            "/tmp/dk-absolute-escape",
        ),
        (
            "symlink-up",
            vec![(b"link", entry(EntryKind::Symlink, b"../../etc"))],
            "link",
        ),
        (
            "symlink-abs",
            vec![(b"a/link", entry(EntryKind::Symlink, b"/etc/passwd"))],
            "/etc/passwd",
        ),
        // Each inside alone; together `d/x` reaches the target's parent.
        (
            "symlink-chain",
            vec![
                (b"d", entry(EntryKind::Dir, b"")),
                (b"d/up", entry(EntryKind::Symlink, b"..")),
                (b"d/x", entry(EntryKind::Symlink, b"up/..")),
            ],
            "through symlink \"d/up\"",
        ),
    ];
    for (name, versions, named) in cases {
        let store = work.path().join(format!("{name}.dk"));
        craft_store(&store, &versions);
        let target = work.path().join(format!("target-{name}"));
        make_state(&target, 3);
        assert_refused_untouched(&replay_args(&target, &store), &target, &[named]);
        // export refuses it too
        let tar = work.path().join(format!("{name}.tar"));
        let out = diffkeeper(&["export", "--store", s(&store), "-o", s(&tar)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: export {stderr}");
        assert!(stderr.contains(named), "{name}: export {stderr}");
        assert!(
            !work.path().join("escaped").exists(),
            "{name}: wrote outside the target"
        );
        assert!(
            !Path::new("/tmp/dk-absolute-escape").exists(),
            "{name}: wrote an absolute path"
        );
    }
}

#[test]
fn a_symlink_planted_in_the_target_cannot_redirect_writes() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(state.join("sub")).expect("mkdir");
    fs::write(state.join("sub/f"), b"inside").expect("write");
    fs::write(state.join("top"), b"top file").expect("write");
    ok(&[
        "snapshot",
        "--state-dir",
        &format!("data={}", s(&state)),
        "--store",
        s(&store),
    ]);

    // The live target has `sub` and `top` as symlinks to a directory and a
    // file outside it.
    let outside = work.path().join("outside");
    fs::create_dir_all(&outside).expect("mkdir");
    fs::write(outside.join("f"), b"outside, must stay").expect("write");
    fs::write(outside.join("precious"), b"must stay").expect("write");
    let target = work.path().join("target");
    fs::create_dir_all(&target).expect("mkdir");
    symlink(&outside, target.join("sub")).expect("symlink");
    symlink(outside.join("precious"), target.join("top")).expect("symlink");
    let outside_before = read_tree(&outside);

    // Symlinks the store never had: refused by name, nothing followed.
    let out = run(&replay_args(&target, &store));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the store never had"), "{stderr}");
    assert_same_tree(
        &outside_before,
        &read_tree(&outside),
        "the directory outside the target",
    );
    // With --force the links themselves are replaced.
    let mut forced = replay_args(&target, &store);
    forced.push("--force".into());
    let out = run(&forced);
    assert!(out.status.success(), "{out:?}");
    assert_same_tree(
        &read_tree(&state),
        &read_tree(&target),
        "target after replay over planted symlinks",
    );
    assert_same_tree(
        &outside_before,
        &read_tree(&outside),
        "the directory outside the target",
    );
}

/// Damage where redb keeps its own structures (the file's first pages, a
/// small store's B-trees) meets some checks of redb's with a panic: every
/// command still exits 1 naming the store, and a replay either gives the
/// stored state or leaves the target as it was, with no staging directory
/// behind.
#[test]
fn damage_to_the_store_s_structure_fails_every_command_cleanly() {
    let work = tempfile::tempdir().expect("tempdir");
    let (store, target) = store_and_target(work.path());
    let good = fs::read(&store).expect("read store");
    let mut rng = Rng::new(0x5eed_0013);
    for round in 0..120 {
        let mut bytes = good.clone();
        // Half the rounds in the first 64 KiB, half anywhere.
        let span = if round % 2 == 0 {
            bytes.len().min(64 * 1024)
        } else {
            bytes.len()
        };
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(span as u64) as usize;
            bytes[at] ^= 1 << rng.below(8);
        }
        fs::write(&store, &bytes).expect("write");
        let before = read_tree(&target);
        let restored = work.path().join(format!("restored-{round}"));
        for args in [
            vec!["verify", "--store", s(&store)],
            vec!["log", "--store", s(&store)],
            vec!["stats", "--store", s(&store)],
            vec!["restore", "--store", s(&store), "--to", s(&restored)],
            replay_args(&target, &store)
                .iter()
                .map(String::as_str)
                .collect(),
        ] {
            let out = diffkeeper(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0) => {}
                Some(1) => assert!(
                    stderr.contains(s(&store)),
                    "round {round}, {args:?}: the error must name the store: {stderr}"
                ),
                other => panic!("round {round}, {args:?}: exit {other:?}: {stderr}"),
            }
        }
        let leftovers: Vec<_> = fs::read_dir(&target)
            .expect("read target")
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".diffkeeper-staging")
            })
            .collect();
        assert!(leftovers.is_empty(), "round {round}: staging left behind");
        if read_tree(&target) != before {
            // A replay that succeeded wrote the stored state: put the other
            // good state back.
            assert_same_tree(
                &read_tree(&work.path().join("state")),
                &read_tree(&target),
                &format!("round {round}: a replay that succeeded"),
            );
            fs::remove_dir_all(&target).expect("rm");
            make_state(&target, 2);
        }
        let _ = fs::remove_dir_all(&restored);
    }
}
