//! `diffkeeper run` and `diffkeeper watch` through the real binary, with
//! each notice backend: exit codes, signal forwarding, captures while the
//! app runs and at its exit, and a SIGKILLed app.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{alive, assert_same_tree, ok, read_tree, s, Reaped, BIN};

const BACKENDS: [&str; 3] = ["ebpf", "inotify", "scan"];

/// `diffkeeper run ... --` (the app's command goes after these).
fn run_args(state: &Path, store: &Path, backend: &str) -> Vec<String> {
    let mut args = watch_args(state, store, backend);
    args[0] = "run".into();
    args.push("--".into());
    args
}

fn watch_args(state: &Path, store: &Path, backend: &str) -> Vec<String> {
    [
        "watch",
        "--state-dir",
        &format!("data={}", s(state)),
        "--store",
        s(store),
        "--backend",
        backend,
        "--debounce",
        "100ms",
        "--max-latency",
        "1s",
        "--scan-interval",
        "200ms",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

fn spawn(args: &[String], app: &str) -> Child {
    Command::new(BIN)
        .args(args)
        .args(["sh", "-c", app])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn diffkeeper run")
}

/// Asserts that replaying the store into a fresh directory gives `state`.
fn assert_store_holds(state: &Path, store: &Path, work: &Path, what: &str) {
    assert_same_tree(&read_tree(state), &replayed(store, work, "fresh"), what);
}

fn replayed(
    store: &Path,
    work: &Path,
    name: &str,
) -> std::collections::BTreeMap<Vec<u8>, common::Node> {
    let target = work.join(name);
    ok(&[
        "replay",
        "--state-dir",
        &format!("data={}", s(&target)),
        "--store",
        s(store),
    ]);
    read_tree(&target)
}

#[test]
fn run_returns_the_apps_exit_code() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    let store = work.path().join("store.dk");
    let args = run_args(&state, &store, "inotify");
    for (app, code) in [
        ("exit 0", 0),
        ("exit 3", 3),
        ("kill -9 $$", 137),
        ("kill -15 $$", 143),
    ] {
        let status = spawn(&args, app).wait().expect("wait");
        assert_eq!(status.code(), Some(code), "app `{app}`");
    }
    let out = Command::new(BIN)
        .args(&args)
        .arg("/no/such/program")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(127));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/no/such/program"),
        "{out:?}"
    );
}

#[test]
fn run_captures_while_the_app_runs_and_when_it_exits() {
    for backend in BACKENDS {
        let work = tempfile::tempdir().expect("tempdir");
        let state = work.path().join("state");
        fs::create_dir_all(&state).expect("mkdir");
        fs::write(
            state.join("before-start"),
            b"written while diffkeeper was not running",
        )
        .expect("write");
        let store = work.path().join("store.dk");
        // The app writes, then waits (at most 60 s) for the test to see a
        // batch land while it still runs, then writes again and exits.
        let go = work.path().join("go");
        let app = format!(
            "mkdir -p {d}/deep/er && echo one > {d}/deep/er/a && i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; echo two > {d}/b && exit 0",
            d = s(&state),
            go = s(&go)
        );
        let mut child = spawn(&run_args(&state, &store, backend), &app);
        common::wait_for(
            &format!("{backend}: a batch while the app runs"),
            Duration::from_secs(30),
            || common::batch_count(&store) >= 2,
        );
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "{backend}: the app ended before the test let it"
        );
        fs::write(&go, b"").expect("let the app finish");
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(0), "{backend}");
        // The final capture has everything, including what was there first.
        assert_store_holds(&state, &store, work.path(), backend);
        ok(&["verify", "--store", s(&store)]);
    }
}

#[test]
fn signals_reach_the_app_and_its_last_writes_are_kept() {
    for backend in BACKENDS {
        let work = tempfile::tempdir().expect("tempdir");
        let state = work.path().join("state");
        fs::create_dir_all(&state).expect("mkdir");
        let store = work.path().join("store.dk");
        let app = format!(
            "trap 'echo saved > {d}/on-term; exit 0' TERM; echo up > {d}/started; while true; do sleep 0.05; done",
            d = s(&state)
        );
        let mut child = spawn(&run_args(&state, &store, backend), &app);
        common::wait_for("the app to start", Duration::from_secs(10), || {
            state.join("started").exists()
        });
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .expect("SIGTERM to diffkeeper");
        let status = child.wait().expect("wait");
        assert_eq!(
            status.code(),
            Some(0),
            "{backend}: the app handled SIGTERM and exited 0"
        );
        let tree = replayed(&store, work.path(), "fresh");
        assert!(
            tree.contains_key(b"on-term".as_slice()),
            "{backend}: the app's write on SIGTERM was not captured"
        );
    }
}

#[test]
fn an_app_killed_mid_write_leaves_a_verified_replayable_state() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    let store = work.path().join("store.dk");
    let app = format!(
        "echo $$ > {d}/pid; i=0; while true; do i=$((i+1)); echo \"line $i\" >> {d}/journal; head -c 4096 /dev/urandom > {d}/blob.$((i % 5)); done",
        d = s(&state)
    );
    let mut child = spawn(&run_args(&state, &store, "inotify"), &app);
    common::wait_for("the app to write", Duration::from_secs(10), || {
        common::batch_count(&store) >= 2
    });
    let pid: i32 = fs::read_to_string(state.join("pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("pid number");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).expect("pid"),
        rustix::process::Signal::KILL,
    )
    .expect("SIGKILL the app");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(137));
    ok(&["verify", "--store", s(&store)]);
    // The final capture ran after the app and the `head` it left running
    // died: the store has the last state.
    assert_store_holds(&state, &store, work.path(), "after SIGKILL");
}

#[test]
fn processes_the_app_leaves_running_are_ended_before_the_final_capture() {
    for backend in BACKENDS {
        let work = tempfile::tempdir().expect("tempdir");
        let state = work.path().join("state");
        fs::create_dir_all(&state).expect("mkdir");
        let store = work.path().join("store.dk");
        let d = s(&state);
        // One leftover cleans up on SIGTERM; one ignores it and keeps
        // writing until SIGKILL. The app exits while both run.
        let app = format!(
            "(trap 'echo bye > {d}/bye; exit 0' TERM; while true; do sleep 0.02; done) & echo $! > {d}/polite.pid; \
             (trap '' TERM; i=0; while true; do i=$((i+1)); echo $i > {d}/counter; done) & echo $! > {d}/stubborn.pid; \
             sleep 0.3; exit 7"
        );
        let mut args = run_args(&state, &store, backend);
        args.splice(
            args.len() - 1..args.len() - 1,
            ["--leftover-grace".to_string(), "700ms".to_string()],
        );
        let started = Instant::now();
        let out = Command::new(BIN)
            .args(&args)
            .args(["sh", "-c", &app])
            .output()
            .expect("run");
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "{backend}: {stderr}");
        assert!(
            took >= Duration::from_millis(900),
            "{backend}: SIGKILL came before the grace: {took:?}"
        );
        for leftover in ["polite.pid", "stubborn.pid"] {
            let pid = fs::read_to_string(state.join(leftover)).expect("pid file");
            assert!(!alive(&pid), "{backend}: {leftover} {pid} outlived `run`");
        }
        assert_eq!(
            fs::read_to_string(state.join("bye")).expect("bye").trim(),
            "bye",
            "{backend}"
        );
        assert!(stderr.contains("SIGKILL"), "{backend}: {stderr}");
        // Nothing wrote after the final capture.
        assert_store_holds(&state, &store, work.path(), backend);
    }
}

#[test]
fn watch_captures_until_sigterm() {
    for backend in BACKENDS {
        let work = tempfile::tempdir().expect("tempdir");
        let state = work.path().join("state");
        fs::create_dir_all(&state).expect("mkdir");
        let store = work.path().join("store.dk");
        let mut child = Command::new(BIN)
            .args(watch_args(&state, &store, backend))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn watch");
        std::thread::sleep(Duration::from_millis(300));
        fs::write(state.join("f"), b"first").expect("write");
        common::wait_for(
            &format!("{backend}: a batch with f"),
            Duration::from_secs(10),
            || common::batch_count(&store) >= 1,
        );
        fs::write(state.join("g"), b"written just before the stop").expect("write");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(0), "{backend}");
        assert_store_holds(&state, &store, work.path(), backend);
    }
}

/// `watch` and a tree of 3,000 files: with eBPF (files named by inode) and
/// inotify (by path), a write to existing files is captured by looking at
/// those files alone, every name of a hard-linked one included; a new file
/// or a rename has the tree walked, as every batch of the scan backend
/// does. Every batch is checked by restoring it.
#[test]
fn writes_to_existing_files_are_captured_without_walking_the_tree() {
    for backend in BACKENDS {
        in_place_writes(backend);
    }
}

fn in_place_writes(backend: &str) {
    use std::io::{Seek, SeekFrom, Write};

    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    for d in 0..30 {
        fs::create_dir_all(state.join(format!("d{d}"))).expect("mkdir");
        for f in 0..100 {
            fs::write(state.join(format!("d{d}/f{f}")), format!("file {d}/{f}\n")).expect("write");
        }
    }
    fs::hard_link(state.join("d0/f0"), state.join("d1/linked")).expect("hard link");
    // Files and directories the tree holds, and the state directory itself.
    let total = 30 * 100 + 1 + 30 + 1;
    let store = work.path().join("store.dk");
    ok(&[
        "snapshot",
        "--state-dir",
        &format!("data={}", s(&state)),
        "--store",
        s(&store),
    ]);

    let log = work.path().join("watch.log");
    let mut watch = Reaped(
        Command::new(BIN)
            .args(watch_args(&state, &store, backend))
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn watch"),
    );
    let batch_lines = || -> Vec<String> {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" batch ") && l.contains(" scanned"))
            .map(String::from)
            .collect()
    };
    let next_batch = |seen: usize, what: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = batch_lines();
            if lines.len() > seen {
                assert_eq!(
                    lines.len(),
                    seen + 1,
                    "{what}: one batch expected: {lines:#?}"
                );
                return lines[seen].clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: no batch; log: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let scanned = |line: &str| -> usize {
        let before = line.split(" scanned").next().expect("scanned");
        before
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in {line}"))
    };
    // Let the backend start and the start-up capture walk the tree.
    common::wait_for(
        &format!("{backend}: start-up capture"),
        Duration::from_secs(20),
        || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("start-up capture")
        },
    );
    std::thread::sleep(Duration::from_millis(500));

    let overwrite = |rel: &str, at: u64, bytes: &[u8]| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(state.join(rel))
            .expect("open");
        f.seek(SeekFrom::Start(at)).expect("seek");
        f.write_all(bytes).expect("write");
    };
    // What `diff -r` finds between the live tree and a fresh restore of
    // the store's latest state (empty when they are the same).
    let store_differs = |what: &str| -> Option<String> {
        let back = work
            .path()
            .join(format!("restored-{}", what.replace(' ', "-")));
        let _ = fs::remove_dir_all(&back);
        let out = Command::new(BIN)
            .args(["restore", "--store"])
            .arg(&store)
            .arg("--to")
            .arg(&back)
            .output()
            .expect("restore");
        assert!(out.status.success(), "{what}: {out:?}");
        let diff = Command::new("diff")
            .arg("-r")
            .arg(&state)
            .arg(&back)
            .output()
            .expect("diff");
        (!diff.status.success()).then(|| String::from_utf8_lossy(&diff.stdout).into_owned())
    };
    let assert_store_has_tree = |what: &str| {
        if let Some(diff) = store_differs(what) {
            panic!("{what}: {diff}");
        }
    };

    // What a batch looks at for a write to existing files.
    let partial = |files: usize| if backend == "scan" { total } else { files };
    let mut seen = batch_lines().len();
    overwrite("d7/f42", 0, b"FILE");
    let line = next_batch(seen, &format!("{backend}: one file written in place"));
    seen += 1;
    assert_eq!(scanned(&line), partial(1), "{backend}: {line}");
    assert!(line.contains(" 1 changed"), "{backend}: {line}");
    assert_store_has_tree(&format!("{backend} one file"));

    // Both names of a hard-linked inode are looked at and recorded: in
    // one batch, or (a scan that walked past one name before the write
    // and the other after) over that batch and the next. What must hold is
    // the store's tree: both names with the new bytes.
    overwrite("d1/linked", 2, b"LINK");
    let line = next_batch(seen, &format!("{backend}: a hard link written"));
    assert_eq!(scanned(&line), partial(2), "{backend}: {line}");
    assert!(
        line.contains(" 2 changed") || line.contains(" 1 changed"),
        "{backend}: {line}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Some(diff) = store_differs(&format!("{backend} hard link")) {
        assert!(
            Instant::now() < deadline,
            "{backend}: the hard link's names are not both stored: {diff}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let a second batch, if the write was split, land before counting.
    std::thread::sleep(Duration::from_millis(500));
    seen = batch_lines().len();

    fs::write(state.join("d3/new"), b"a new file").expect("create");
    let line = next_batch(seen, &format!("{backend}: a new file"));
    seen += 1;
    assert_eq!(
        scanned(&line),
        total + 1,
        "{backend}: a new file has the tree walked: {line}"
    );
    assert_store_has_tree(&format!("{backend} new file"));

    fs::rename(state.join("d4/f4"), state.join("d4/renamed")).expect("rename");
    let line = next_batch(seen, &format!("{backend}: a rename"));
    assert_eq!(
        scanned(&line),
        total + 1,
        "{backend}: a rename has the tree walked: {line}"
    );
    assert_store_has_tree(&format!("{backend} rename"));

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(watch.0.id() as i32).expect("pid"),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM");
    assert!(watch.0.wait().expect("wait").success());
    assert_store_has_tree(&format!("{backend} after stop"));
}
