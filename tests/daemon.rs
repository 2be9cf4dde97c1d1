//! `diffkeeper daemon` through the real binary: several targets on one
//! eBPF tracer, each store holding exactly its own files; targets added,
//! removed and changed while it runs (file change and SIGHUP); a reload
//! with a mistake changing nothing; a failing target (a store that is no
//! store, a full disk) reported and retried while the others keep
//! capturing.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::daemon::*;
use common::{assert_same_tree, ok, read_tree, refused, s, Reaped, BIN};

#[test]
fn each_target_of_one_daemon_keeps_exactly_its_own_files() {
    let work = tempfile::tempdir().expect("tempdir");
    let names = ["alpha", "beta", "gamma"];
    let dirs: Vec<PathBuf> = names.iter().map(|n| work.path().join(n)).collect();
    let stores: Vec<PathBuf> = names
        .iter()
        .map(|n| work.path().join(format!("{n}.dk")))
        .collect();
    for dir in &dirs {
        fs::create_dir_all(dir.join("sub")).expect("mkdir");
        fs::write(dir.join("there-at-start"), b"before the daemon").expect("write");
    }
    let config = work.path().join("daemon.toml");
    let sections: Vec<String> = names
        .iter()
        .zip(&dirs)
        .zip(&stores)
        .map(|((n, d), st)| target(n, d, st, ""))
        .collect();
    write_config(&config, "ebpf", &sections);
    let daemon = Daemon::start(&config, &work.path().join("daemon.log"));
    daemon.wait_log(&["start-up capture"], 3, Duration::from_secs(20));
    // All three write at once: creates, appends, renames, removals.
    let writers: Vec<std::thread::JoinHandle<()>> = dirs
        .iter()
        .zip(names)
        .map(|(dir, name)| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    let file = dir.join(format!("sub/{name}-{i}"));
                    fs::write(&file, format!("{name} {i}").repeat(50)).expect("write");
                    if i % 3 == 0 {
                        fs::rename(&file, dir.join(format!("{name}-moved-{i}"))).expect("rename");
                    }
                    if i % 5 == 4 {
                        let j = i - 1;
                        let victim = if j % 3 == 0 {
                            format!("{name}-moved-{j}")
                        } else {
                            format!("sub/{name}-{j}")
                        };
                        fs::remove_file(dir.join(victim)).expect("rm");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                fs::remove_file(dir.join("there-at-start")).expect("rm");
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
    for ((dir, store), name) in dirs.iter().zip(&stores).zip(names) {
        wait_captured(
            store,
            dir,
            work.path(),
            &format!("{name}'s store to hold its tree"),
        );
    }
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "the daemon stops cleanly: {log}");
    for ((dir, store), name) in dirs.iter().zip(&stores).zip(names) {
        assert_same_tree(&read_tree(dir), &restored(store, work.path(), name), name);
        ok(&["verify", "--store", s(store)]);
    }
    // One tracer for all three, each target's lines marked with its name.
    assert_eq!(
        log.matches("eBPF tracer reports through").count(),
        1,
        "{log}"
    );
    for name in names {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("target=\"{name}\""))
                    || l.contains(&format!("target={name}"))),
            "{name}'s log lines carry its name: {log}"
        );
    }
}

#[test]
fn targets_come_and_go_while_the_daemon_runs_without_disturbing_the_others() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = |n: &str| {
        let d = work.path().join(n);
        fs::create_dir_all(&d).expect("mkdir");
        d
    };
    let (a, b) = (dir("a"), dir("b"));
    let (store_a, store_b) = (work.path().join("a.dk"), work.path().join("b.dk"));
    let config = work.path().join("daemon.toml");
    write_config(&config, "ebpf", &[target("a", &a, &store_a, "")]);
    let daemon = Daemon::start(&config, &work.path().join("daemon.log"));
    daemon.wait_log(&["start-up capture"], 1, Duration::from_secs(20));
    fs::write(a.join("one"), b"a's first file").expect("write");
    wait_captured(&store_a, &a, work.path(), "a captures");

    // Added by a change to the file.
    fs::write(b.join("early"), b"written before b was a target").expect("write");
    write_config(
        &config,
        "ebpf",
        &[target("a", &a, &store_a, ""), target("b", &b, &store_b, "")],
    );
    wait_captured(&store_b, &b, work.path(), "b is started by the file change");
    fs::write(b.join("later"), b"b's write").expect("write");
    wait_captured(&store_b, &b, work.path(), "b captures");
    fs::write(a.join("two"), b"a keeps capturing").expect("write");
    wait_captured(&store_a, &a, work.path(), "a still captures");

    // A mistake changes nothing.
    fs::write(
        &config,
        "[[target]]\nname = \"a\"\nstore = \"/s\"\nstate_dirs = [\"/d\"]\nbogus = 1\n",
    )
    .expect("write");
    daemon.wait_log(&["reload refused", "bogus"], 1, Duration::from_secs(10));
    fs::write(b.join("after-the-mistake"), b"still captured").expect("write");
    wait_captured(
        &store_b,
        &b,
        work.path(),
        "b captures after a refused reload",
    );

    // Removed (SIGHUP): its final capture is its last batch.
    write_config(&config, "ebpf", &[target("b", &b, &store_b, "")]);
    daemon.signal(rustix::process::Signal::HUP);
    daemon.wait_log(&["target a stopped"], 1, Duration::from_secs(10));
    let a_at_removal = read_tree(&a);
    let a_batches = common::batch_count(&store_a);
    fs::write(a.join("after-removal"), b"not a target any more").expect("write");
    fs::write(b.join("while-a-goes"), b"b is not disturbed").expect("write");
    wait_captured(&store_b, &b, work.path(), "b captures after a is removed");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        common::batch_count(&store_a),
        a_batches,
        "nothing captured into a after its removal"
    );
    assert_same_tree(
        &a_at_removal,
        &restored(&store_a, work.path(), "a"),
        "a's store holds a as it was when removed",
    );

    // Changed settings restart that target alone.
    write_config(
        &config,
        "ebpf",
        &[target("b", &b, &store_b, "consistency = \"none\"")],
    );
    daemon.wait_log(
        &["target b: its settings changed"],
        1,
        Duration::from_secs(10),
    );
    daemon.wait_log(&["start-up capture"], 3, Duration::from_secs(10));
    fs::write(b.join("after-the-change"), b"captured").expect("write");
    wait_captured(&store_b, &b, work.path(), "b captures after its restart");

    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    // b ran twice (added, restarted), a once: nothing else was restarted.
    assert_eq!(log.matches("watching data=").count(), 3, "{log}");
    assert_same_tree(
        &read_tree(&b),
        &restored(&store_b, work.path(), "b"),
        "b at the end",
    );
}

#[test]
fn a_failing_target_is_retried_while_the_others_keep_capturing() {
    let work = tempfile::tempdir().expect("tempdir");
    let mk = |n: &str| {
        let d = work.path().join(n);
        fs::create_dir_all(&d).expect("mkdir");
        d
    };
    let (good, bad, full) = (mk("good"), mk("bad"), mk("full"));
    fs::write(bad.join("kept"), b"captured once the store is fixed").expect("write");
    let store_good = work.path().join("good.dk");
    // Not a store: the target cannot start until it is moved away.
    let store_bad = work.path().join("bad.dk");
    fs::write(&store_bad, b"this is not a DiffKeeper store, and never was").expect("write");
    // A store on a 1 MiB file system, soon full.
    let small = mk("small");
    let _tmpfs = common::Mounted::new("tmpfs", Some("size=1m"), "tmpfs", &small);
    let store_full = small.join("full.dk");
    let config = work.path().join("daemon.toml");
    write_config(
        &config,
        "ebpf",
        &[
            target("good", &good, &store_good, ""),
            target("bad", &bad, &store_bad, ""),
            target("full", &full, &store_full, ""),
        ],
    );
    let daemon = Daemon::start(&config, &work.path().join("daemon.log"));
    daemon.wait_log(
        &["target bad failed (try 1)", "bad.dk"],
        1,
        Duration::from_secs(20),
    );
    fs::write(good.join("one"), b"good captures").expect("write");
    wait_captured(
        &store_good,
        &good,
        work.path(),
        "good captures while bad fails",
    );

    // 4 MiB of noise does not fit: full's captures fail and are retried.
    let noise = common::Rng::new(11).bytes(4 << 20);
    fs::write(full.join("too-big"), &noise).expect("write");
    daemon.wait_log(&["full.dk", "retrying in"], 1, Duration::from_secs(20));
    fs::write(good.join("two"), b"good still captures while full fails").expect("write");
    wait_captured(
        &store_good,
        &good,
        work.path(),
        "good captures while full's disk is full",
    );

    // Both mend: bad's store moved away, full's big file removed.
    fs::rename(&store_bad, work.path().join("bad.dk.not-a-store")).expect("move the bad store");
    daemon.wait_log(&["target bad: capturing after"], 1, Duration::from_secs(30));
    wait_captured(&store_bad, &bad, work.path(), "bad captures once fixed");
    fs::remove_file(full.join("too-big")).expect("rm");
    fs::write(full.join("small"), b"fits").expect("write");
    wait_captured(
        &store_full,
        &full,
        work.path(),
        "full captures once there is room",
    );

    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    for (dir, store) in [
        (&good, &store_good),
        (&bad, &store_bad),
        (&full, &store_full),
    ] {
        assert_same_tree(
            &read_tree(dir),
            &restored(store, work.path(), "end"),
            s(dir),
        );
        ok(&["verify", "--store", s(store)]);
    }
}

#[test]
fn a_configuration_with_mistakes_is_refused_with_the_place() {
    let work = tempfile::tempdir().expect("tempdir");
    let config = work.path().join("daemon.toml");
    fs::write(&config, "[defaults]\ndebounce = \"soon\"\n").expect("write");
    let err = refused(&["daemon", "--config", s(&config), "--check"]);
    assert!(
        err.contains(s(&config)) && err.contains("\"soon\" is not a duration"),
        "{err}"
    );
    let err = refused(&["daemon", "--config", s(&work.path().join("missing.toml"))]);
    assert!(
        err.contains("cannot read the configuration file") && err.contains("missing.toml"),
        "{err}"
    );
    // The example in deploy/ checks.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemon.toml");
    let out = ok(&["daemon", "--config", s(&example), "--check"]);
    assert!(
        out.contains("target game: store /var/lib/diffkeeper/stores/game.dk"),
        "{out}"
    );
    assert!(out.contains("target ci-cache"), "{out}");
}

#[test]
fn metrics_health_and_json_logs_are_served() {
    let work = tempfile::tempdir().expect("tempdir");
    let (good, bad) = (work.path().join("good"), work.path().join("bad"));
    fs::create_dir_all(&good).expect("mkdir");
    fs::create_dir_all(&bad).expect("mkdir");
    let store_good = work.path().join("good.dk");
    let store_bad = work.path().join("bad.dk");
    fs::write(&store_bad, b"not a store").expect("write");
    let config = work.path().join("daemon.toml");
    write_config(
        &config,
        "ebpf",
        &[
            target("good", &good, &store_good, ""),
            target("bad", &bad, &store_bad, ""),
        ],
    );
    let daemon = Daemon::start_with(
        &config,
        &work.path().join("daemon.log"),
        &["--log-format", "json"],
    );
    daemon.wait_log(&["metrics at http://"], 1, Duration::from_secs(20));
    let addr = metrics_addr(&daemon.log());
    assert_eq!(get(&addr, "/healthz").0, 200);
    common::wait_for("/readyz to answer 200", Duration::from_secs(20), || {
        get(&addr, "/readyz").0 == 200
    });
    fs::write(good.join("f"), b"counted").expect("write");
    wait_captured(&store_good, &good, work.path(), "good captures");
    let (status, text) = get(&addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    let value = |name: &str| series(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    assert!(
        value("diffkeeper_batches_total{target=\"good\"}") >= 2.0,
        "{text}"
    );
    assert!(
        value("diffkeeper_notices_total{target=\"good\"}") >= 1.0,
        "{text}"
    );
    assert!(
        value("diffkeeper_logical_bytes_total{target=\"good\"}") >= 7.0,
        "{text}"
    );
    assert!(
        value("diffkeeper_store_size_bytes{target=\"good\"}") > 0.0,
        "{text}"
    );
    assert!(
        value("diffkeeper_capture_latency_seconds_count{target=\"good\"}") >= 1.0,
        "{text}"
    );
    assert_eq!(
        value("diffkeeper_target_up{target=\"good\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(value("diffkeeper_target_up{target=\"bad\"}"), 0.0, "{text}");
    assert!(
        value("diffkeeper_start_failures_total{target=\"bad\"}") >= 1.0,
        "{text}"
    );
    assert!(value("diffkeeper_tracer_events") >= 1.0, "{text}");
    assert_eq!(get(&addr, "/nothing").0, 404);
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    // Every line is one JSON object; a target's lines carry its span.
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["span"]["target"] == "good"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("start-up capture"))),
        "{log}"
    );
}

/// Removes everything in `dir`, keeping it: a pod's new, empty volume.
#[test]
fn restore_wait_returns_once_an_emptied_target_is_restored_even_across_a_daemon_restart() {
    let work = tempfile::tempdir().expect("tempdir");
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    for (dir, name) in [(&a, "a"), (&b, "b")] {
        fs::create_dir_all(dir.join("sub")).expect("mkdir");
        fs::write(dir.join("sub/save"), format!("{name}'s save").repeat(1000)).expect("write");
        fs::write(dir.join("config"), format!("{name} config")).expect("write");
    }
    let (tree_a, tree_b) = (read_tree(&a), read_tree(&b));
    let (store_a, store_b) = (work.path().join("a.dk"), work.path().join("b.dk"));
    let socket = work.path().join("run/daemon.sock");
    let config = work.path().join("daemon.toml");
    write_config_with(
        &config,
        "ebpf",
        &format!("socket = \"{}\"\n", s(&socket)),
        &[target("a", &a, &store_a, ""), target("b", &b, &store_b, "")],
    );
    let daemon = Daemon::start(&config, &work.path().join("first.log"));
    wait_captured(&store_a, &a, work.path(), "a captured");
    wait_captured(&store_b, &b, work.path(), "b captured");
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");

    // Both pods are re-created: a's volume is new and empty, b's is not
    // there yet, so b cannot start.
    empty(&a);
    fs::remove_dir_all(&b).expect("rm b");
    // restore-wait runs before the daemon: it waits for it.
    let mut wait_a = restore_wait(&socket, "a", "30s");
    let mut wait_b = restore_wait(&socket, "b", "30s");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        wait_a.try_wait().expect("try_wait").is_none(),
        "restore-wait waits for the daemon"
    );
    let daemon = Daemon::start(&config, &work.path().join("second.log"));
    let status = wait_a.wait().expect("wait for restore-wait");
    assert!(status.success(), "restore-wait for a: {status}");
    // Ready means in place: the files are there when it returns.
    assert_same_tree(
        &tree_a,
        &read_tree(&a),
        "a restored before restore-wait returned",
    );
    // The restore is timed in the metrics.
    let (_, text) = get(&metrics_addr(&daemon.log()), "/metrics");
    assert_eq!(
        series(
            &text,
            "diffkeeper_replay_duration_seconds_count{target=\"a\"}"
        ),
        Some(1.0),
        "{text}"
    );
    daemon.wait_log(&["target b failed"], 1, Duration::from_secs(10));
    assert!(
        wait_b.try_wait().expect("try_wait").is_none(),
        "b is not ready while it cannot start"
    );

    // The daemon dies mid-handshake; b's volume appears, empty; a new
    // daemon restores it, and the same restore-wait sees it ready.
    let mut daemon = daemon;
    daemon.signal(rustix::process::Signal::KILL);
    let _ = daemon.child.0.wait();
    fs::create_dir_all(&b).expect("mkdir b");
    let daemon = Daemon::start(&config, &work.path().join("third.log"));
    let out = wait_b.wait_with_output().expect("wait for restore-wait b");
    assert!(
        out.status.success(),
        "restore-wait for b across a daemon restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(
        &tree_b,
        &read_tree(&b),
        "b restored before restore-wait returned",
    );
    // Restoring recorded no deletion: the stores' latest state is the trees.
    fs::write(a.join("after"), b"captured after the restore").expect("write");
    wait_captured(&store_a, &a, work.path(), "a captures after its restore");
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    assert_same_tree(&tree_b, &restored(&store_b, work.path(), "b"), "b's store");

    // Nobody answers for a target that does not exist: a clear timeout.
    let daemon = Daemon::start(&config, &work.path().join("fourth.log"));
    daemon.wait_log(&["start-up capture"], 2, Duration::from_secs(20));
    let out = restore_wait(&socket, "nobody", "1s")
        .wait_with_output()
        .expect("restore-wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("timed out after 1s")
            && err.contains("no target \"nobody\"")
            && err.contains(s(&socket)),
        "{err}"
    );
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn watch_serves_metrics_only_when_asked() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    fs::write(state.join("f"), b"first").expect("write");
    let store = work.path().join("game.dk");
    let log = work.path().join("watch.log");
    let watch = |extra: &[&str], log: &Path| {
        Reaped(
            Command::new(BIN)
                .args(["watch", "--backend", "ebpf", "--debounce", "50ms"])
                .args([
                    "--state-dir",
                    &format!("data={}", s(&state)),
                    "--store",
                    s(&store),
                ])
                .args(extra)
                .stderr(fs::File::create(log).expect("log"))
                .spawn()
                .expect("spawn watch"),
        )
    };
    let child = watch(&["--metrics-addr", "127.0.0.1:0"], &log);
    common::wait_for("watch's metrics address", Duration::from_secs(20), || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("metrics at http://"))
    });
    let addr = metrics_addr(&fs::read_to_string(&log).expect("log"));
    fs::write(state.join("g"), b"second").expect("write");
    wait_captured(&store, &state, work.path(), "watch captures");
    let (status, metrics) = get(&addr, "/metrics");
    assert_eq!(status, 200);
    // Labelled by the store's name; the start-up batch and the write's.
    let batches = series(&metrics, "diffkeeper_batches_total{target=\"game\"}");
    assert!(batches.is_some_and(|b| b >= 2.0), "{metrics}");
    drop(child);
    // Without the option, nothing is served.
    let quiet_log = work.path().join("quiet.log");
    let quiet = watch(&[], &quiet_log);
    common::wait_for("watch to start", Duration::from_secs(20), || {
        fs::read_to_string(&quiet_log).is_ok_and(|l| l.contains("start-up capture"))
    });
    let text = fs::read_to_string(&quiet_log).expect("log");
    assert!(!text.contains("metrics at"), "{text}");
    drop(quiet);
}

#[test]
fn include_and_exclude_globs_keep_only_their_paths_and_never_record_their_removal() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("app");
    for sub in ["cache", "sub/cache"] {
        fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    let files = [
        ("keep.db", true),
        ("notes.txt", true),
        ("other.bin", false),
        ("a.tmp", false),
        ("cache/blob", false),
        ("sub/cache/x", true),
        ("sub/b.tmp", false),
    ];
    for (path, _) in files {
        fs::write(dir.join(path), format!("{path} v1")).expect("write");
    }
    let store = work.path().join("app.dk");
    let config = work.path().join("daemon.toml");
    write_config(
        &config,
        "ebpf",
        &[target(
            "app",
            &dir,
            &store,
            "include = [\"*.db\", \"*.txt\", \"sub/**\"]\nexclude = [\"*.tmp\", \"/cache\"]",
        )],
    );
    let checked = ok(&["daemon", "--config", s(&config), "--check"]);
    assert!(
        checked
            .contains("include [\"*.db\", \"*.txt\", \"sub/**\"], exclude [\"*.tmp\", \"/cache\"]"),
        "{checked}"
    );
    let daemon = Daemon::start(&config, &work.path().join("daemon.log"));
    let kept = |tree: &std::collections::BTreeMap<Vec<u8>, common::Node>| {
        tree.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    };
    let want: Vec<String> = ["keep.db", "notes.txt", "sub", "sub/cache", "sub/cache/x"]
        .iter()
        .map(|p| p.to_string())
        .collect();
    common::wait_for("the kept paths captured", Duration::from_secs(15), || {
        store.exists() && kept(&restored(&store, work.path(), "globs")) == want
    });

    // The excluded and the not included change and go: nothing recorded.
    let batches = common::batch_count(&store);
    for round in 0..5 {
        fs::write(dir.join("a.tmp"), format!("busy {round}")).expect("write");
        fs::write(dir.join("other.bin"), format!("busy {round}")).expect("write");
        std::thread::sleep(Duration::from_millis(100));
    }
    fs::remove_file(dir.join("a.tmp")).expect("rm");
    fs::remove_dir_all(dir.join("cache")).expect("rm -r");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        common::batch_count(&store),
        batches,
        "changes to paths left out make no batch"
    );

    // A kept file's change is recorded as ever, with nothing of the rest.
    fs::write(dir.join("notes.txt"), "notes v2").expect("write");
    common::wait_for("the kept change captured", Duration::from_secs(15), || {
        let tree = restored(&store, work.path(), "globs");
        tree.get(&b"notes.txt"[..]).is_some_and(
            |n| matches!(n, common::Node::File { content, .. } if content == b"notes v2"),
        )
    });
    let tree = restored(&store, work.path(), "globs");
    assert_eq!(kept(&tree), want);
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");

    // `watch` takes the same globs, and names a bad one.
    let bad = refused(&[
        "watch",
        "--state-dir",
        s(&dir),
        "--store",
        s(&store),
        "--exclude",
        "a[b",
    ]);
    assert!(bad.contains("--exclude pattern \"a[b\""), "{bad}");
}
