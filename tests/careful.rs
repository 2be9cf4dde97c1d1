//! Regression tests for the ways a careless tool loses data, stores what
//! never existed, or escapes: each case was seen once, adversarially, and
//! stays here so it cannot come back.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::{alive, diffkeeper, json, ok, refused, s};

/// A store with two batches of a small tree.
fn small_history(work: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let state = work.join("state");
    let store = work.join("store.dk");
    fs::create_dir_all(state.join("sub")).expect("mkdir");
    fs::write(state.join("a.txt"), b"first").expect("write");
    fs::write(state.join("sub/b.bin"), vec![7u8; 100_000]).expect("write");
    let root = format!("data={}", s(&state));
    for round in 0..2 {
        fs::write(state.join("a.txt"), format!("round {round}")).expect("write");
        json(&[
            "snapshot",
            "--state-dir",
            &root,
            "--store",
            s(&store),
            "--json",
        ]);
    }
    (state, store)
}

#[test]
fn export_never_replaces_the_store_or_a_device_or_a_link() {
    let work = tempfile::tempdir().expect("tempdir");
    let (_state, store) = small_history(work.path());
    let log_before = ok(&["log", "--store", s(&store)]);
    let size_before = fs::metadata(&store).expect("stat").len();

    // The store itself, by its name and through a symlink to it: refused,
    // and the history is all still there.
    let link_to_store = work.path().join("link-to-store");
    std::os::unix::fs::symlink(&store, &link_to_store).expect("symlink");
    for output in [&store, &link_to_store] {
        let err = refused(&["export", "--store", s(&store), "-o", s(output)]);
        assert!(
            err.contains("is the store") && err.contains(s(&store)),
            "{}: {err}",
            output.display()
        );
        assert_eq!(fs::metadata(&store).expect("stat").len(), size_before);
        assert_eq!(ok(&["log", "--store", s(&store)]), log_before);
    }
    assert!(fs::symlink_metadata(&link_to_store)
        .expect("lstat")
        .file_type()
        .is_symlink());

    // A symlink to a file: the file gets the archive, the link stays a link.
    let real = work.path().join("real.tar");
    fs::write(&real, b"old").expect("write");
    let link = work.path().join("link.tar");
    std::os::unix::fs::symlink("real.tar", &link).expect("symlink");
    ok(&["export", "--store", s(&store), "-o", s(&link)]);
    assert!(fs::symlink_metadata(&link)
        .expect("lstat")
        .file_type()
        .is_symlink());
    let archive = fs::read(&real).expect("read");
    assert!(
        archive.len() > 100_000,
        "archive is {} bytes",
        archive.len()
    );
    let listed = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&real)
        .output()
        .expect("tar");
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains("sub/b.bin"));

    // A dangling symlink: its target is created, the link stays.
    let dangling = work.path().join("dangling.tar");
    std::os::unix::fs::symlink("made-by-export.tar", &dangling).expect("symlink");
    ok(&["export", "--store", s(&store), "-o", s(&dangling)]);
    assert!(work.path().join("made-by-export.tar").is_file());
    assert!(fs::symlink_metadata(&dangling)
        .expect("lstat")
        .file_type()
        .is_symlink());

    // A FIFO is written through (a reader gets the whole archive) and stays
    // a FIFO.
    let fifo = work.path().join("pipe");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read(&fifo).expect("read fifo"))
    };
    ok(&["export", "--store", s(&store), "-o", s(&fifo)]);
    let through = reader.join().expect("reader");
    assert_eq!(through, archive, "the FIFO carried another archive");
    assert!(fs::symlink_metadata(&fifo)
        .expect("lstat")
        .file_type()
        .is_fifo());

    // /dev/null is a device: written to, never replaced.
    let null_before = fs::symlink_metadata("/dev/null").expect("lstat");
    ok(&["export", "--store", s(&store), "-o", "/dev/null"]);
    let null_after = fs::symlink_metadata("/dev/null").expect("lstat");
    assert!(null_after.file_type().is_char_device());
    assert_eq!(null_before.ino(), null_after.ino());

    // A directory is refused by name.
    let err = refused(&["export", "--store", s(&store), "-o", s(work.path())]);
    assert!(err.contains("is a directory"), "{err}");
}

/// Starts `run` with an app that records its pid and sleeps; returns the
/// agent and the app's pid.
fn run_sleeper(work: &Path, extra: &[&str]) -> (common::Reaped, i32) {
    let state = work.join("state");
    fs::create_dir_all(&state).expect("mkdir");
    let pid_file = work.join("app.pid");
    let _ = fs::remove_file(&pid_file);
    let script = format!("echo $$ > {}; exec sleep 1000", s(&pid_file));
    let mut args = vec![
        "run".to_string(),
        "--backend".into(),
        "inotify".into(),
        "--state-dir".into(),
        format!("data={}", s(&state)),
        "--store".into(),
        s(&work.join("store.dk")).into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(["--".into(), "sh".into(), "-c".into(), script]);
    let agent = common::Reaped(
        std::process::Command::new(common::BIN)
            .args(&args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start run"),
    );
    let started = std::time::Instant::now();
    let pid = loop {
        if let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            break pid;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the app did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (agent, pid)
}

#[test]
fn run_killed_with_sigkill_takes_the_app_with_it_unless_told_not_to() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mut agent, app) = run_sleeper(work.path(), &[]);
    assert!(alive(app));
    agent.0.kill().expect("kill -9 run");
    agent.0.wait().expect("wait");
    let killed = std::time::Instant::now();
    while alive(app) {
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(5),
            "the app {app} still runs 5 s after run was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    // The old behaviour, asked for: the app outlives it.
    let (mut agent, app) = run_sleeper(work.path(), &["--app-survives"]);
    agent.0.kill().expect("kill -9 run");
    agent.0.wait().expect("wait");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let survived = alive(app);
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(app).expect("pid"),
        rustix::process::Signal::KILL,
    );
    assert!(survived, "--app-survives: the app died with run");
}

#[test]
fn a_state_dir_whose_path_holds_an_equals_sign_is_that_path() {
    let work = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(work.path().join("eq=dir/data")).expect("mkdir");
    fs::write(work.path().join("eq=dir/data/f"), b"x").expect("write");
    let snapshot = |spec: &str| {
        std::process::Command::new(common::BIN)
            .current_dir(work.path())
            .args(["snapshot", "--state-dir", spec, "--store", "s.dk", "--json"])
            .output()
            .expect("run")
    };
    // Only the whole path exists: it is a path, named after its last part.
    let out = snapshot("eq=dir/data");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = ok(&[
        "log",
        "--store",
        s(&work.path().join("s.dk")),
        "--batches",
        "--json",
    ]);
    assert!(log.contains("\"data\""), "{log}");
    assert!(!log.contains("\"eq\""), "{log}");
    // Both readings exist: refused as ambiguous, naming both.
    fs::create_dir_all(work.path().join("dir/data")).expect("mkdir");
    let out = snapshot("eq=dir/data");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ambiguous"), "{err}");
}

/// `restore` of the latest state into a fresh `to`.
fn restored(store: &Path, to: &Path) -> std::collections::BTreeMap<Vec<u8>, common::Node> {
    let _ = fs::remove_dir_all(to);
    ok(&["restore", "--store", s(store), "--to", s(to)]);
    common::read_tree(to)
}

#[test]
fn a_file_rewritten_while_read_is_never_stored_torn() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(&state).expect("mkdir");
    let hot = state.join("hot.bin");
    const SIZE: usize = 32 << 20;
    fs::write(&hot, vec![b'A'; SIZE]).expect("write");
    fs::write(state.join("quiet.txt"), b"one").expect("write");
    let root = format!("data={}", s(&state));
    let snapshot = || diffkeeper(&["snapshot", "--state-dir", &root, "--store", s(&store)]);
    assert!(snapshot().status.success());

    // A writer rewriting the whole file, pass after pass, 1 MiB at a time,
    // each pass with another byte: a read while it runs is a mix of two
    // passes, which never existed as a whole.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let hot = hot.clone();
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let file = fs::OpenOptions::new().write(true).open(&hot).expect("open");
            let mut pass = 0u8;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                pass = pass.wrapping_add(1);
                let block = vec![b'B' + pass % 20; 1 << 20];
                for i in 0..SIZE / block.len() {
                    file.write_all_at(&block, (i * block.len()) as u64)
                        .expect("pwrite");
                }
            }
        })
    };
    fs::write(state.join("quiet.txt"), b"two").expect("write");
    let out = snapshot();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer");
    let err = String::from_utf8_lossy(&out.stderr);
    let tree = restored(&store, &work.path().join("restored"));
    // Whatever was stored of hot.bin is one whole pass.
    let Some(common::Node::File { content, .. }) = tree.get(&b"hot.bin"[..]) else {
        panic!("hot.bin not restored as a file");
    };
    assert_eq!(content.len(), SIZE);
    assert!(
        content.iter().all(|&b| b == content[0]),
        "a torn hot.bin was stored (snapshot said: {err})"
    );
    // It was read while written throughout: the snapshot says so, fails,
    // and keeps the previous version; the rest of the batch is committed.
    assert!(!out.status.success(), "snapshot succeeded: {err}");
    assert!(
        err.contains("hot.bin") && err.contains("kept changing while read"),
        "{err}"
    );
    assert_eq!(content[0], b'A');
    assert!(
        matches!(tree.get(&b"quiet.txt"[..]), Some(common::Node::File { content, .. }) if content == b"two"),
        "quiet.txt was not committed beside the torn file"
    );
}

#[test]
fn a_path_that_cannot_be_looked_at_does_not_stop_the_rest() {
    use rustix::fs::{mkdirat, openat, Mode, OFlags, CWD};
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(&state).expect("mkdir");
    fs::write(state.join("top.txt"), b"one").expect("write");
    // 18 levels of 250-byte names, made through directory descriptors:
    // 4,500 bytes, more than any path the kernel takes whole (replay could
    // not write it back, so it is not kept).
    let mut dir = openat(
        CWD,
        &state,
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )
    .expect("open state");
    for level in 0..18 {
        let long = format!("{level:02}{}", "x".repeat(248));
        mkdirat(&dir, long.as_str(), Mode::from_raw_mode(0o755)).expect("mkdir");
        dir = openat(
            &dir,
            long.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .expect("open level");
    }
    let root = format!("data={}", s(&state));
    for round in ["one", "two"] {
        fs::write(state.join("top.txt"), round).expect("write");
        let out = diffkeeper(&["snapshot", "--state-dir", &root, "--store", s(&store)]);
        let err = String::from_utf8_lossy(&out.stderr);
        // Said, and failed, but the rest is committed.
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("longer than Linux takes"), "{err}");
        let tree = restored(&store, &work.path().join("restored"));
        assert!(
            matches!(tree.get(&b"top.txt"[..]), Some(common::Node::File { content, mtime_ns: t, .. })
                if content == round.as_bytes() && *t == common::mtime_ns(&fs::metadata(state.join("top.txt")).expect("stat"))),
            "top.txt was not committed: {err}"
        );
    }
}

#[test]
fn a_directory_swapped_for_a_symlink_while_captured_never_lets_outside_files_in() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    let secret = work.path().join("secret");
    fs::create_dir_all(state.join("d")).expect("mkdir");
    fs::create_dir_all(&secret).expect("mkdir");
    for i in 0..50 {
        fs::write(state.join(format!("d/f{i}")), format!("inside {i}")).expect("write");
        fs::write(secret.join(format!("f{i}")), format!("SECRET {i}")).expect("write");
    }
    fs::write(state.join("top.txt"), b"0").expect("write");
    let root = format!("data={}", s(&state));
    ok(&["snapshot", "--state-dir", &root, "--store", s(&store)]);

    // The app swaps its directory for a symlink to the secret one and back,
    // as fast as it can, while snapshots run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let (state, secret) = (state.clone(), secret.clone());
        std::thread::spawn(move || {
            let (d, real) = (state.join("d"), state.join("d.real"));
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                fs::rename(&d, &real).expect("rename away");
                std::os::unix::fs::symlink(&secret, &d).expect("symlink");
                std::thread::yield_now();
                fs::remove_file(&d).expect("unlink");
                fs::rename(&real, &d).expect("rename back");
                swaps += 1;
            }
            swaps
        })
    };
    for round in 0..40 {
        fs::write(state.join("top.txt"), round.to_string()).expect("write");
        // Failing a batch for a path replaced mid-walk is fine; reading
        // the secret is not.
        diffkeeper(&["snapshot", "--state-dir", &root, "--store", s(&store)]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper");
    assert!(swaps > 100, "only {swaps} swaps");
    let log = json(&["log", "--store", s(&store), "--batches", "--json"]);
    let batches: Vec<u64> = log
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|b| b["batch"].as_u64())
        .collect();
    assert!(batches.len() > 10, "{log}");
    for batch in batches {
        let to = work.path().join(format!("r{batch}"));
        ok(&[
            "restore",
            "--store",
            s(&store),
            "--batch",
            &batch.to_string(),
            "--to",
            s(&to),
        ]);
        for (path, node) in common::read_tree(&to) {
            if let common::Node::File { content, .. } = node {
                assert!(
                    !content.starts_with(b"SECRET"),
                    "batch {batch}: {} holds a file from outside the tree",
                    String::from_utf8_lossy(&path)
                );
            }
        }
        fs::remove_dir_all(&to).expect("rm");
    }
}

#[test]
fn a_store_that_is_a_dangling_symlink_is_not_a_first_start() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    fs::write(state.join("f"), b"mine").expect("write");
    let store = work.path().join("store.dk");
    std::os::unix::fs::symlink(work.path().join("unmounted/store.dk"), &store).expect("symlink");
    let root = format!("data={}", s(&state));
    for command in ["replay", "snapshot"] {
        let err = refused(&[command, "--state-dir", &root, "--store", s(&store)]);
        assert!(
            err.contains("symlink") && err.contains("unmounted/store.dk"),
            "{command}: {err}"
        );
    }
    assert!(!work.path().join("unmounted").exists());
    assert_eq!(fs::read(state.join("f")).expect("read"), b"mine");
}

/// Sets `path`'s mtime (and atime) to `ns` nanoseconds since the epoch,
/// as `touch -r`, `tar -x`, `cp -p` and `rsync -t` do.
fn set_mtime_ns(path: &Path, ns: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::empty(),
    )
    .expect("utimensat");
}

/// A changed file that keeps its size and an old mtime (put back by the
/// tool that wrote it, or arriving by `mv` from elsewhere) is captured, and
/// replay does not call such a live file current.
#[test]
fn a_change_that_keeps_size_and_mtime_is_still_captured_and_replayed() {
    let (work, state, store, root) = common::workspace();
    // An hour-old mtime: size and mtime alone would call these unchanged.
    // Whole seconds, which is what tar keeps.
    let old_ns = (common::mtime_ns(&fs::metadata(work.path()).expect("stat")) / 1_000_000_000
        - 3600)
        * 1_000_000_000;
    let names = ["rewritten", "moved-in", "untarred", "copied"];
    for name in names {
        fs::write(state.join(name), format!("{name}: version one")).expect("write");
        set_mtime_ns(&state.join(name), old_ns);
    }
    // Past the racy window of the ctimes just set.
    std::thread::sleep(std::time::Duration::from_millis(2200));
    assert_eq!(common::snapshot_json(&root, &store)["batch"], 1);

    let elsewhere = work.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("mkdir");
    let second = |name: &str| format!("{name}: version two");
    // Rewritten in place, its mtime put back (touch -r).
    fs::write(state.join("rewritten"), second("rewritten")).expect("write");
    set_mtime_ns(&state.join("rewritten"), old_ns);
    // Another inode of the same size and mtime moved over it (mv).
    fs::write(elsewhere.join("moved-in"), second("moved-in")).expect("write");
    set_mtime_ns(&elsewhere.join("moved-in"), old_ns);
    fs::rename(elsewhere.join("moved-in"), state.join("moved-in")).expect("mv");
    // Extracted from an archive that keeps mtimes (tar -x).
    fs::write(elsewhere.join("untarred"), second("untarred")).expect("write");
    set_mtime_ns(&elsewhere.join("untarred"), old_ns);
    let tar = std::process::Command::new("tar")
        .args(["-C", s(&elsewhere), "-cf", "-", "untarred"])
        .output()
        .expect("tar -c");
    let mut untar = std::process::Command::new("tar")
        .args(["-C", s(&state), "-xf", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("tar -x");
    std::io::Write::write_all(&mut untar.stdin.take().expect("stdin"), &tar.stdout)
        .expect("feed tar");
    assert!(untar.wait().expect("tar -x").success());
    // Copied over it keeping the mtime (cp -p).
    fs::write(elsewhere.join("copied"), second("copied")).expect("write");
    set_mtime_ns(&elsewhere.join("copied"), old_ns);
    let cp = std::process::Command::new("cp")
        .args(["-p", s(&elsewhere.join("copied")), s(&state.join("copied"))])
        .status()
        .expect("cp -p");
    assert!(cp.success());
    for name in names {
        let meta = fs::metadata(state.join(name)).expect("stat");
        assert_eq!(
            (meta.len(), common::mtime_ns(&meta)),
            (format!("{name}: version one").len() as u64, old_ns),
            "{name}: the test needs size and mtime kept"
        );
    }
    let summary = common::snapshot_json(&root, &store);
    assert_eq!(summary["changed"], names.len(), "{summary}");
    let restored_tree = restored(&store, &work.path().join("restored"));
    for name in names {
        match restored_tree.get(name.as_bytes()) {
            Some(common::Node::File { content, .. }) => {
                assert_eq!(content, second(name).as_bytes(), "{name}")
            }
            other => panic!("{name}: {other:?}"),
        }
    }

    // Replay over a live file whose content is wrong but whose size and
    // mtime are the store's: rewritten, not "already current".
    fs::write(state.join("rewritten"), "rewritten: version 333").expect("write");
    set_mtime_ns(&state.join("rewritten"), old_ns);
    let replayed = json(&[
        "replay",
        "--state-dir",
        &root,
        "--store",
        s(&store),
        "--json",
    ]);
    assert_eq!(replayed[0]["written"], 1, "{replayed}");
    assert_eq!(
        fs::read(state.join("rewritten")).expect("read"),
        second("rewritten").as_bytes()
    );
}

/// Replay and rollback leave alone what the store never had; where a
/// stored path needs its place they refuse, naming it, unless --force.
#[test]
fn replay_never_deletes_what_the_store_never_had() {
    let (_work, state, store, root) = common::workspace();
    fs::write(state.join("p"), b"a tracked file").expect("write");
    fs::write(state.join("keep"), b"kept").expect("write");
    assert_eq!(common::snapshot_json(&root, &store)["batch"], 1);
    let replay = |extra: &[&str]| {
        let mut args = vec!["replay", "--state-dir", &root, "--store", s(&store)];
        args.extend_from_slice(extra);
        diffkeeper(&args)
    };

    // The tracked file became a directory holding a file never captured.
    fs::remove_file(state.join("p")).expect("rm");
    fs::create_dir(state.join("p")).expect("mkdir");
    fs::write(state.join("p/uncaptured"), b"only copy").expect("write");
    let out = replay(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is a directory the store never had",
            s(&state.join("p"))
        )) && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        fs::read(state.join("p/uncaptured")).expect("still there"),
        b"only copy"
    );
    let out = replay(&["--force"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read(state.join("p")).expect("read"), b"a tracked file");

    // A rollback to before a directory existed, while that directory holds
    // a FIFO and a link out of the tree (neither of which a store keeps).
    fs::create_dir(state.join("later")).expect("mkdir");
    fs::write(state.join("later/file"), b"captured").expect("write");
    assert_eq!(common::snapshot_json(&root, &store)["batch"], 2);
    let status = std::process::Command::new("mkfifo")
        .arg(state.join("later/fifo"))
        .status()
        .expect("mkfifo");
    assert!(status.success());
    std::os::unix::fs::symlink("/etc/hostname", state.join("later/outside")).expect("symlink");
    let out = replay(&["--batch", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(s(&state.join("later"))) && stderr.contains("the store never had"),
        "{stderr}"
    );
    assert!(fs::symlink_metadata(state.join("later/fifo"))
        .expect("the FIFO is left")
        .file_type()
        .is_fifo());
    assert!(fs::symlink_metadata(state.join("later/outside"))
        .expect("the link is left")
        .file_type()
        .is_symlink());
    assert_eq!(
        fs::read(state.join("later/file")).expect("read"),
        b"captured"
    );
    // Paths the store never had stay, whatever the moment: a FIFO beside.
    fs::remove_file(state.join("later/fifo")).expect("rm");
    fs::remove_file(state.join("later/outside")).expect("rm");
    let status = std::process::Command::new("mkfifo")
        .arg(state.join("fifo-beside"))
        .status()
        .expect("mkfifo");
    assert!(status.success());
    let out = replay(&["--batch", "1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!state.join("later").exists());
    assert!(fs::symlink_metadata(state.join("fifo-beside"))
        .expect("untracked FIFO left alone")
        .file_type()
        .is_fifo());
}

/// `chattr` on `path` (ext4 and tmpfs both take +i).
fn chattr(flag: &str, path: &Path) {
    let status = std::process::Command::new("chattr")
        .args([flag, s(path)])
        .status()
        .expect("chattr");
    assert!(status.success(), "chattr {flag} {}", path.display());
}

/// A file replay cannot replace fails the replay, and every change it had
/// already made is undone: the directory is as it was, whole.
#[test]
fn a_replay_that_fails_midway_leaves_the_directory_as_it_was() {
    replay_fails_midway(false);
}

/// The same through a FUSE file system that cannot swap two names in one
/// step (bindfs refuses RENAME_EXCHANGE and RENAME_NOREPLACE with EINVAL,
/// as NFS and CIFS do): replay sets the old entries aside instead, and
/// still undoes every change when one fails.
#[test]
fn a_replay_where_names_cannot_be_swapped_is_still_all_or_nothing() {
    replay_fails_midway(true);
}

/// A bindfs mount of a directory, unmounted when dropped.
struct Bindfs(std::path::PathBuf);

impl Bindfs {
    fn mount(source: &Path, at: &Path) -> Bindfs {
        fs::create_dir_all(at).expect("mkdir");
        let status = std::process::Command::new("bindfs")
            .args([s(source), s(at)])
            .status()
            .expect("bindfs (cargo xtask setup installs it)");
        assert!(status.success(), "bindfs {}", at.display());
        Bindfs(at.to_path_buf())
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// [`a_replay_that_fails_midway_leaves_the_directory_as_it_was`], with the
/// replayed directory seen through bindfs when `through_fuse`.
fn replay_fails_midway(through_fuse: bool) {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(state.join("sub")).expect("mkdir");
    let root = format!("data={}", s(&state));
    for name in ["a", "b", "c", "sub/d"] {
        fs::write(state.join(name), format!("{name} one")).expect("write");
    }
    fs::write(state.join("gone"), b"removed in two").expect("write");
    let old = work.path().join("old");
    let copy = std::process::Command::new("cp")
        .args(["-a", s(&state), s(&old)])
        .status()
        .expect("cp");
    assert!(copy.success());
    assert_eq!(common::snapshot_json(&root, &store)["batch"], 1);
    for name in ["a", "b", "c", "sub/d"] {
        fs::write(state.join(name), format!("{name} two, longer")).expect("write");
    }
    fs::remove_file(state.join("gone")).expect("rm");
    fs::create_dir(state.join("new-dir")).expect("mkdir");
    fs::write(state.join("new-dir/e"), b"e two").expect("write");
    assert_eq!(common::snapshot_json(&root, &store)["batch"], 2);

    // The old tree, with `c` immutable: `a` and `b` come before it.
    let mount = through_fuse.then(|| Bindfs::mount(&old, &work.path().join("view")));
    let target = mount.as_ref().map_or(old.clone(), |m| m.0.clone());
    let old_root = format!("data={}", s(&target));
    chattr("+i", &old.join("c"));
    let before = common::read_tree(&target);
    let out = diffkeeper(&["replay", "--state-dir", &old_root, "--store", s(&store)]);
    chattr("-i", &old.join("c"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(s(&target.join("c")))
            && stderr.contains("nothing in the state directory was changed"),
        "{stderr}"
    );
    common::assert_same_tree(
        &before,
        &common::read_tree(&target),
        "after a failed replay",
    );
    ok(&["replay", "--state-dir", &old_root, "--store", s(&store)]);
    common::assert_same_tree(
        &common::read_tree(&state),
        &common::read_tree(&target),
        "the replay once c can be replaced",
    );
}

/// Symlinks that stay inside the tree alone but leave it through each
/// other are not kept: a replay of the store never recreates the way out.
#[test]
fn a_chain_of_symlinks_that_climbs_out_is_not_kept() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(state.join("d")).expect("mkdir");
    fs::write(state.join("f"), b"kept").expect("write");
    std::os::unix::fs::symlink("..", state.join("d/up")).expect("symlink");
    std::os::unix::fs::symlink("up/..", state.join("d/x")).expect("symlink");
    std::os::unix::fs::symlink("../f", state.join("d/fine")).expect("symlink");
    let out = diffkeeper(&[
        "snapshot",
        "--state-dir",
        &format!("data={}", s(&state)),
        "--store",
        s(&store),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("d/x") && stderr.contains("not kept") && stderr.contains("d/up"),
        "{stderr}"
    );
    let tree = restored(&store, &work.path().join("restored"));
    let names: Vec<String> = tree
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(names, ["d", "d/fine", "d/up", "f"]);
}

/// A version whose key was damaged (its batch changed) makes `verify` name
/// it, and `restore` and `export` refuse rather than give an older version
/// in its place.
#[test]
fn a_damaged_version_key_is_found_and_never_stood_in_for() {
    use redb::{ReadableTable, TableDefinition};
    const VERSIONS: TableDefinition<(&str, &[u8], u64), &[u8]> = TableDefinition::new("versions");
    let (work, state, store, root) = common::workspace();
    fs::write(state.join("f"), b"old content").expect("write");
    fs::write(state.join("g"), b"unchanged").expect("write");
    common::snapshot_json(&root, &store);
    fs::write(state.join("f"), b"new content!").expect("write");
    assert_eq!(common::snapshot_json(&root, &store)["batch"], 2);
    {
        let db = redb::Database::open(&store).expect("open");
        let txn = db.begin_write().expect("write");
        {
            let mut versions = txn.open_table(VERSIONS).expect("versions");
            let value = versions
                .remove(("data", b"f".as_slice(), 2))
                .expect("remove")
                .expect("f has a version in batch 2")
                .value()
                .to_vec();
            versions
                .insert(("data", b"f".as_slice(), 9), value.as_slice())
                .expect("insert");
            assert!(versions
                .get(("data", b"f".as_slice(), 1))
                .expect("get")
                .is_some());
        }
        txn.commit().expect("commit");
    }
    let out = diffkeeper(&["verify", "--store", s(&store)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("data:f@9") && stderr.contains("batch 9, which does not exist"),
        "{stderr}"
    );
    assert!(
        stderr.contains("data:f@2"),
        "the latest entry too: {stderr}"
    );
    let to = work.path().join("restored");
    for args in [
        vec!["restore", "--store", s(&store), "--to", s(&to)],
        vec![
            "restore",
            "--store",
            s(&store),
            "--to",
            s(&to),
            "--batch",
            "2",
        ],
        vec![
            "export",
            "--store",
            s(&store),
            "-o",
            s(&work.path().join("out.tar")),
        ],
    ] {
        let out = diffkeeper(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("newest version (batch 2) is missing") && stderr.contains(s(&store)),
            "{args:?}: {stderr}"
        );
        assert!(
            fs::read(to.join("f")).map_or(true, |c| c != b"old content"),
            "{args:?}: restored an older version in place of the missing one"
        );
    }
    // The moment before, which never had that version, still restores.
    ok(&[
        "restore",
        "--store",
        s(&store),
        "--to",
        s(&to),
        "--batch",
        "1",
    ]);
    assert_eq!(fs::read(to.join("f")).expect("read"), b"old content");
}

/// The small things a careful user runs into: each gets a clear answer.
#[test]
fn odd_input_gets_clear_answers() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = small_history(work.path());
    let root = format!("data={}", s(&state));

    // The last day RFC 3339 can write is a time (the latest state then);
    // a duration before 1970 is refused as such.
    let to = work.path().join("far");
    ok(&[
        "restore",
        "--store",
        s(&store),
        "--to",
        s(&to),
        "--at",
        "9999-12-31T23:59:59Z",
    ]);
    let why = refused(&[
        "restore",
        "--store",
        s(&store),
        "--to",
        s(&work.path().join("never")),
        "--ago",
        "100000000y",
    ]);
    assert!(why.contains("before 1970") && !why.contains("-3"), "{why}");

    // A name that is not UTF-8: its bytes in the JSON, and `log PATH`
    // takes it.
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9");
    fs::write(state.join(odd), b"latin-1 name").expect("write");
    common::snapshot_json(&root, &store);
    let log = json(&["log", "--store", s(&store), "--json"]);
    let entry = log
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["path_hex"] == "636166e9")
        .unwrap_or_else(|| panic!("no path_hex for the odd name: {log}"));
    assert_eq!(entry["path"], "caf\u{fffd}");
    let out = std::process::Command::new(common::BIN)
        .args([
            std::ffi::OsStr::new("log"),
            "--store".as_ref(),
            store.as_os_str(),
        ])
        .arg(state.join(odd).strip_prefix(&state).expect("rel"))
        .output()
        .expect("log PATH");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("caf"));

    // `log | head`: the reader leaving ends it quietly.
    for i in 0..300 {
        fs::write(state.join(format!("many-{i:03}")), format!("{i}")).expect("write");
    }
    common::snapshot_json(&root, &store);
    for json_flag in [false, true] {
        let mut args = vec!["log", "--store", s(&store)];
        if json_flag {
            args.push("--json");
        }
        let mut child = std::process::Command::new(common::BIN)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("log");
        let mut first = [0u8; 16];
        std::io::Read::read_exact(&mut child.stdout.take().expect("stdout"), &mut first)
            .expect("read");
        // stdout dropped: the pipe has no reader now.
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }

    // A state directory name the store does not have, while it has others:
    // refused with the names it has, unless said to start now.
    let other = work.path().join("other");
    let why = refused(&[
        "replay",
        "--state-dir",
        &format!("dtaa={}", s(&other)),
        "--store",
        s(&store),
    ]);
    assert!(
        why.contains("\"dtaa\"") && why.contains("\"data\""),
        "{why}"
    );
    ok(&[
        "replay",
        "--state-dir",
        &format!("dtaa={}", s(&other)),
        "--store",
        s(&store),
        "--new-root",
        "dtaa",
    ]);

    // A store cut to a few hundred bytes is named as damaged.
    let cut = work.path().join("cut.dk");
    let bytes = fs::read(&store).expect("read");
    fs::write(&cut, &bytes[..300]).expect("write");
    let why = refused(&["log", "--store", s(&cut)]);
    assert!(
        why.contains(s(&cut)) && !why.contains("failed to fill whole buffer"),
        "{why}"
    );
}

/// `run` does not report success when its final capture failed.
#[test]
fn run_exits_non_zero_when_its_final_capture_failed() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(&state).expect("mkdir");
    common::snapshot_json(&format!("data={}", s(&state)), &store);
    // The app makes the store immutable (no write reaches it any more),
    // writes its state, and exits 0.
    let script = format!(
        "chattr +i {store} && echo last > {state}/f",
        store = s(&store),
        state = s(&state)
    );
    let out = diffkeeper(&[
        "run",
        "--state-dir",
        &format!("data={}", s(&state)),
        "--store",
        s(&store),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    chattr("-i", &store);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("may not be in the store"), "{stderr}");
}

/// A shell that traps SIGTERM while it waits on a pipeline never runs its
/// trap: `run`'s stop is bounded by --stop-grace, then everything the app
/// started is killed, and the final capture is the tree as it was left.
#[test]
fn a_stop_is_bounded_even_when_the_app_ignores_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(&state).expect("mkdir");
    let started = work.path().join("started");
    let script = format!(
        "trap 'exit 0' TERM; touch {started}; i=0; while true; do i=$((i+1)); echo $i > {state}/counter; done | cat",
        started = s(&started),
        state = s(&state)
    );
    let mut agent = common::Reaped(
        std::process::Command::new(common::BIN)
            .args([
                "run",
                "--stop-grace",
                "1s",
                "--state-dir",
                &format!("data={}", s(&state)),
                "--store",
                s(&store),
                "--",
                "bash",
                "-c",
                &script,
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start run"),
    );
    let begin = std::time::Instant::now();
    while !started.exists() {
        assert!(begin.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pid = rustix::process::Pid::from_raw(agent.0.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let stopping = std::time::Instant::now();
    let status = loop {
        if let Some(status) = agent.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            stopping.elapsed() < std::time::Duration::from_secs(15),
            "run did not stop within 15 s of SIGTERM with --stop-grace 1s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut agent.0.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    // Killed with SIGKILL: 128 + 9.
    assert_eq!(status.code(), Some(137), "{stderr}");
    assert!(stderr.contains("--stop-grace"), "{stderr}");
    // Nothing writes any more, and the store has the tree as it was left.
    let left = fs::read(state.join("counter")).expect("read");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(fs::read(state.join("counter")).expect("read"), left);
    let tree = restored(&store, &work.path().join("restored"));
    assert_eq!(
        tree.get(b"counter".as_slice()),
        common::read_tree(&state).get(b"counter".as_slice())
    );
}

/// A sparse file comes back sparse: a 1 GiB file holding 4 MiB of data is
/// restored onto a 64 MiB tmpfs, taking about 4 MiB of it.
#[test]
fn a_sparse_file_is_restored_with_its_holes() {
    use std::os::unix::fs::FileExt;
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    fs::create_dir_all(&state).expect("mkdir");
    let image = fs::File::create(state.join("disk.img")).expect("create");
    image.set_len(1 << 30).expect("truncate");
    let mut rng = common::Rng::new(0x5ba5e);
    let data = rng.bytes(1 << 20);
    for at in [0u64, 100 << 20, 700 << 20, (1 << 30) - (1 << 20)] {
        image.write_all_at(&data, at).expect("write");
    }
    drop(image);
    common::snapshot_json(&format!("data={}", s(&state)), &store);
    let small = work.path().join("small");
    fs::create_dir(&small).expect("mkdir");
    let _tmpfs = common::Mounted::new("tmpfs", Some("size=64m"), "tmpfs", &small);
    let to = small.join("restored");
    ok(&["restore", "--store", s(&store), "--to", s(&to)]);
    let restored = fs::metadata(to.join("disk.img")).expect("stat");
    assert_eq!(restored.len(), 1 << 30);
    let allocated = restored.blocks() * 512;
    assert!(
        allocated <= 8 << 20,
        "the restored file takes {allocated} bytes for 4 MiB of data"
    );
    let file = fs::File::open(to.join("disk.img")).expect("open");
    let mut back = vec![0u8; 1 << 20];
    file.read_exact_at(&mut back, 700 << 20).expect("read");
    assert_eq!(back, data);
    file.read_exact_at(&mut back, 300 << 20).expect("read");
    assert!(back.iter().all(|&b| b == 0));
}

/// A file of a tree with a second name outside every tree (a hard link
/// from elsewhere, as pnpm's store makes): a write through the outside name
/// is captured by the eBPF tracer alone (the rescan is an hour away) when
/// the link was there before the agent started, after a rename in the tree
/// made every cached membership stale, and when the link is made while
/// the agent runs and the tree is never walked again.
#[test]
fn a_write_through_a_hard_link_from_outside_the_trees_is_captured() {
    use std::io::Write;
    use std::time::{Duration, Instant};

    let work = tempfile::tempdir().expect("tempdir");
    let (state, other, outside) = (
        work.path().join("state"),
        work.path().join("other"),
        work.path().join("outside"),
    );
    for dir in [&state, &other, &outside] {
        fs::create_dir_all(dir).expect("mkdir");
    }
    fs::write(state.join("a"), b"a0").expect("write");
    fs::write(state.join("b"), b"b0").expect("write");
    fs::hard_link(state.join("a"), outside.join("a")).expect("link");
    let store = work.path().join("store.dk");
    let log = work.path().join("watch.log");
    let _watch = common::Reaped(
        std::process::Command::new(common::BIN)
            .args([
                "watch",
                "--backend",
                "ebpf",
                "--debounce",
                "100ms",
                "--max-latency",
                "1s",
                "--rescan-interval",
                "1h",
                "--state-dir",
                &format!("data={}", s(&state)),
                "--state-dir",
                &format!("other={}", s(&other)),
                "--store",
                s(&store),
            ])
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start watch"),
    );
    let logged = || fs::read_to_string(&log).unwrap_or_default();
    let begin = Instant::now();
    while !logged().contains("start-up capture") {
        assert!(begin.elapsed() < Duration::from_secs(20), "{}", logged());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut round = 0;
    let mut stored = |root: &str, rel: &str, want: &[u8]| {
        let begin = Instant::now();
        loop {
            round += 1;
            let to = work.path().join(format!("restored-{round}"));
            let got = restored(&store, &to);
            let path = format!("{root}/{rel}");
            if matches!(got.get(path.as_bytes()), Some(common::Node::File { content, .. }) if content == want)
            {
                return;
            }
            assert!(
                begin.elapsed() < Duration::from_secs(10),
                "{path} never stored as {:?}: {:?}\n{}",
                String::from_utf8_lossy(want),
                got.get(path.as_bytes()),
                logged()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let write_outside = |name: &str, content: &[u8]| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(outside.join(name))
            .expect("open the outside name");
        file.write_all(content).expect("write");
    };

    write_outside("a", b"a1: linked before the start");
    stored("data", "a", b"a1: linked before the start");

    fs::rename(state.join("b"), state.join("b2")).expect("rename");
    stored("data", "b2", b"b0");
    write_outside("a", b"a2: after a rename in the tree");
    stored("data", "a", b"a2: after a rename in the tree");

    fs::hard_link(state.join("b2"), outside.join("b")).expect("link");
    // Entries change in the other tree only: every cached membership is
    // forgotten, and this tree is not walked.
    fs::write(other.join("x"), b"x").expect("write");
    stored("other", "x", b"x");
    write_outside("b", b"b1: linked while watched");
    stored("data", "b2", b"b1: linked while watched");
}
