//! Every batch is a crash-consistent cut while the app never stops writing:
//! real apps (a two-file invariant writer, git, SQLite in rollback-journal
//! and WAL mode) run under `diffkeeper run --backend ebpf`, app and agent
//! are killed with SIGKILL together at seeded random moments, and what the
//! store kept is checked by the apps' own integrity tools. With
//! `--consistency none` the same writer must leave torn batches, each
//! marked as such, which shows these tests can fail. A watchdog thaws the
//! app when the agent is killed mid-freeze.

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ok, s, Reaped, Rng, BIN};
use rustix::process::{Pid, Signal};
use serde_json::Value;

/// Starts `diffkeeper run` on `state` with `mode`, the app `script` run by
/// `sh -c` in `state`, in a process group of its own so app and agent can
/// be killed at once.
fn start(state: &Path, store: &Path, mode: &str, extra: &[&str], script: &str) -> Reaped {
    let mut command = Command::new(BIN);
    command
        .args([
            "run",
            "--backend",
            "ebpf",
            "--consistency",
            mode,
            "--debounce",
            "50ms",
            "--max-latency",
            "400ms",
            "--state-dir",
            &format!("data={}", s(state)),
            "--store",
            s(store),
        ])
        .args(extra)
        .args(["--", "sh", "-c", script])
        .current_dir(state)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.org")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.org")
        .stdout(Stdio::null())
        // A file, not a pipe nobody reads: a full pipe would stall the agent.
        .stderr(log_file(store))
        .process_group(0);
    Reaped(command.spawn().expect("spawn diffkeeper run"))
}

/// The agent's log, beside its store.
fn log_file(store: &Path) -> fs::File {
    fs::File::create(store.with_extension("log")).expect("create the agent's log")
}

/// A node crash: SIGKILL to the agent and every process of the app at
/// once (their process group). The thaw watchdog runs in a session of its
/// own and outlives them.
fn crash(agent: &mut Reaped) {
    let group = pid(agent.0.id());
    rustix::process::kill_process_group(group, Signal::KILL).expect("SIGKILL the process group");
    agent.0.wait().expect("wait for the killed agent");
}

fn pid(id: u32) -> Pid {
    Pid::from_raw(id as i32).expect("a process id")
}

/// The batches of the store's timeline (none before it exists).
fn batches(store: &Path) -> Vec<Value> {
    if !store.exists() {
        return Vec::new();
    }
    let out = ok(&["log", "--batches", "--json", "--store", s(store)]);
    serde_json::from_str::<Vec<Value>>(&out).expect("log --batches --json")
}

/// Restores batch `n` (or the latest) into a fresh directory.
fn restore(store: &Path, batch: Option<u64>, to: &Path) {
    let _ = fs::remove_dir_all(to);
    let mut args = vec!["restore", "--store", s(store), "--to", s(to)];
    let n = batch.map(|b| b.to_string());
    if let Some(n) = &n {
        args.extend(["--batch", n]);
    }
    ok(&args);
}

/// Lets the app run for a seeded random time, at least until a batch
/// after the start-up one committed, then crashes app and agent.
fn run_until_crash(agent: &mut Reaped, store: &Path, rng: &mut Rng, min_ms: u64, max_ms: u64) {
    let started = Instant::now();
    let wait = Duration::from_millis(min_ms + rng.below(max_ms - min_ms));
    while started.elapsed() < wait || (batches(store).len() < 2 && started.elapsed().as_secs() < 20)
    {
        if let Some(status) = agent.0.try_wait().expect("try_wait") {
            panic!("diffkeeper run exited early ({status})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    crash(agent);
}

/// Asserts that no batch of the store is torn and that at least one was
/// taken frozen, returning the batch ids.
fn assert_consistent_cuts(store: &Path, what: &str) -> Vec<u64> {
    let timeline = batches(store);
    for b in &timeline {
        assert_ne!(
            b["consistency"], "torn",
            "{what}: batch {} is torn: {}",
            b["batch"], b
        );
    }
    timeline
        .iter()
        .map(|b| b["batch"].as_u64().expect("batch id"))
        .collect()
}

/// A writer that keeps `b <= a <= b + 1` at every instant: counter n into
/// file a, then into file b, each in place, never pausing.
const INVARIANT_WRITER: &str =
    "n=0; while :; do n=$((n+1)); printf '%012d' $n 1<> a; printf '%012d' $n 1<> b; done";

fn counters(dir: &Path) -> (u64, u64) {
    let read = |name: &str| -> u64 {
        let text = fs::read_to_string(dir.join(name)).expect("counter file");
        text.trim().parse().expect("a counter")
    };
    (read("a"), read("b"))
}

fn fresh_invariant_state(work: &Path) -> (PathBuf, PathBuf) {
    let state = work.join("state");
    let _ = fs::remove_dir_all(&state);
    fs::create_dir_all(&state).expect("mkdir");
    fs::write(state.join("a"), format!("{:012}", 0)).expect("a");
    fs::write(state.join("b"), format!("{:012}", 0)).expect("b");
    let store = work.join("store.dk");
    let _ = fs::remove_file(&store);
    (state, store)
}

#[test]
fn an_invariant_across_two_files_holds_in_every_batch_of_every_crash() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng::new(8);
    let mut frozen = 0;
    // Ten crash moments in auto mode, four with every batch frozen.
    for (trial, mode) in std::iter::repeat_n("auto", 10)
        .chain(std::iter::repeat_n("freeze", 4))
        .enumerate()
    {
        let (state, store) = fresh_invariant_state(work.path());
        let mut agent = start(&state, &store, mode, &[], INVARIANT_WRITER);
        run_until_crash(&mut agent, &store, &mut rng, 700, 2000);
        let what = format!("trial {trial} ({mode})");
        for batch in assert_consistent_cuts(&store, &what) {
            let to = work.path().join("restored");
            restore(&store, Some(batch), &to);
            let (a, b) = counters(&to);
            assert!(
                b <= a && a <= b + 1,
                "{what}: batch {batch} is not the tree of one instant: a={a} b={b}"
            );
        }
        frozen += batches(&store)
            .iter()
            .filter(|b| b["consistency"] == "frozen")
            .count();
    }
    assert!(frozen >= 10, "only {frozen} batches were taken frozen");
}

#[test]
fn without_freezing_torn_batches_are_marked_torn() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = fresh_invariant_state(work.path());
    let mut agent = start(&state, &store, "none", &[], INVARIANT_WRITER);
    // Until a batch broke the invariant (the tests above could fail).
    let started = Instant::now();
    let mut violated = 0;
    let mut checked = std::collections::HashSet::new();
    while violated == 0 && started.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(300));
        for b in batches(&store) {
            let id = b["batch"].as_u64().expect("batch id");
            if !checked.insert(id) {
                continue;
            }
            let to = work.path().join("restored");
            restore(&store, Some(id), &to);
            let (a, bb) = counters(&to);
            if !(bb <= a && a <= bb + 1) {
                violated += 1;
                assert_eq!(
                    b["consistency"], "torn",
                    "batch {id} (a={a} b={bb}) breaks the invariant and is not marked torn: {b}"
                );
                assert!(
                    b["torn_why"].as_str().is_some_and(|w| !w.is_empty()),
                    "a torn batch says why: {b}"
                );
            }
        }
    }
    crash(&mut agent);
    assert!(
        violated > 0,
        "with --consistency none no batch was torn in 15 s of continuous writes"
    );
    let text = ok(&["log", "--batches", "--store", s(&store)]);
    assert!(
        text.contains("torn"),
        "log --batches shows torn batches:\n{text}"
    );
}

#[test]
fn git_survives_a_crash_in_the_middle_of_a_commit_loop() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng::new(9);
    for trial in 0..10 {
        let state = work.path().join(format!("repo{trial}"));
        fs::create_dir_all(&state).expect("mkdir");
        let git = |dir: &Path, args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run git")
        };
        assert!(git(&state, &["init", "-q"]).status.success());
        // No background gc: only the commit loop writes.
        assert!(git(&state, &["config", "gc.auto", "0"]).status.success());
        let store = work.path().join(format!("repo{trial}.dk"));
        let script = "i=0; while :; do i=$((i+1)); echo $i > f$((i % 7)); \
                      git add -A && git commit -qm c$i; done";
        let mut agent = start(&state, &store, "auto", &[], script);
        run_until_crash(&mut agent, &store, &mut rng, 1000, 3000);
        assert_consistent_cuts(&store, &format!("git trial {trial}"));
        let restored = work.path().join(format!("restored{trial}"));
        restore(&store, None, &restored);
        let fsck = git(&restored, &["fsck", "--full"]);
        assert!(
            fsck.status.success(),
            "git trial {trial}: git fsck --full failed on the restored repository: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        let head = git(&restored, &["cat-file", "-t", "HEAD"]);
        let kind = String::from_utf8_lossy(&head.stdout);
        // A store taken before the first commit has no HEAD commit yet.
        if head.status.success() {
            assert_eq!(kind.trim(), "commit", "git trial {trial}: HEAD is a commit");
        }
        let _ = fs::remove_dir_all(&state);
        let _ = fs::remove_dir_all(&restored);
    }
}

/// SQLite under a continuous insert loop (rows 1, 2, 3... each its own
/// transaction), in `journal` mode; kill -9 at random moments.
fn sqlite_trials(journal: &str, seed: u64) {
    let work = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng::new(seed);
    for trial in 0..10 {
        let state = work.path().join(format!("db{trial}"));
        fs::create_dir_all(&state).expect("mkdir");
        let db = state.join("app.db");
        let init = Command::new("sqlite3")
            .arg(&db)
            .arg(format!(
                "PRAGMA journal_mode={journal}; \
                 CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);"
            ))
            .output()
            .expect("run sqlite3");
        assert!(init.status.success(), "{init:?}");
        let store = work.path().join(format!("db{trial}.dk"));
        let script = "yes 'INSERT INTO t(v) VALUES(randomblob(300));' | sqlite3 app.db";
        let mut agent = start(&state, &store, "auto", &[], script);
        run_until_crash(&mut agent, &store, &mut rng, 800, 2500);
        let what = format!("sqlite {journal} trial {trial}");
        assert_consistent_cuts(&store, &what);
        let restored = work.path().join(format!("restored{trial}"));
        restore(&store, None, &restored);
        let query = |sql: &str| {
            let out = Command::new("sqlite3")
                .arg(restored.join("app.db"))
                .arg(sql)
                .output()
                .expect("run sqlite3");
            assert!(out.status.success(), "{what}: {sql}: {out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(query("PRAGMA integrity_check;"), "ok", "{what}");
        // Rows 1..=n, each committed on its own: any committed state has
        // count = max id.
        let rows = query("SELECT count(*) || ' ' || ifnull(max(id), 0) FROM t;");
        let (count, max) = rows.split_once(' ').expect("count and max");
        assert_eq!(
            count, max,
            "{what}: rows are not a committed prefix: {rows}"
        );
        let _ = fs::remove_dir_all(&state);
        let _ = fs::remove_dir_all(&restored);
    }
}

#[test]
fn sqlite_in_rollback_journal_mode_survives_crashes() {
    sqlite_trials("DELETE", 10);
}

#[test]
fn sqlite_in_wal_mode_survives_crashes() {
    sqlite_trials("WAL", 11);
}

/// `cgroup.events` of the cgroup `run` (process `agent`) put its app in.
fn app_cgroup(agent: u32) -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mount = info
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            after
                .starts_with("cgroup2 ")
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("a cgroup2 mount");
    let own = fs::read_to_string(format!("/proc/{agent}/cgroup")).expect("agent's cgroup");
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    mount
        .join(rel.trim_start_matches('/'))
        .join(format!("diffkeeper-app-{agent}"))
}

fn frozen(cgroup: &Path) -> bool {
    fs::read_to_string(cgroup.join("cgroup.events"))
        .map(|e| e.lines().any(|l| l == "frozen 1"))
        .unwrap_or(false)
}

/// Starts `run --consistency freeze` (with `extra` options) on a 96 MiB
/// file the app rewrites in 1 MiB pieces, with the app's heartbeat file.
fn big_file_app(work: &Path, extra: &[&str]) -> (Reaped, PathBuf) {
    let state = work.join("state");
    fs::create_dir_all(&state).expect("mkdir");
    fs::write(state.join("big"), Rng::new(3).bytes(96 << 20)).expect("big file");
    let beat = work.join("beat");
    let store = work.join("store.dk");
    let script = format!(
        "i=0; while :; do i=$(((i + 37) % 96)); \
         dd if=/dev/urandom of=big bs=1M count=1 seek=$i conv=notrunc status=none; \
         echo x >> {}; done",
        s(&beat)
    );
    (start(&state, &store, "freeze", extra, &script), beat)
}

/// [`big_file_app`] with a long --max-pause (copying the file frozen takes
/// long enough to be caught), returned once the app's cgroup is seen
/// frozen, with that cgroup and the heartbeat file.
fn frozen_app(work: &Path, extra: &[&str]) -> (Reaped, PathBuf, PathBuf) {
    let mut args = vec!["--max-pause", "10s"];
    args.extend_from_slice(extra);
    let (mut agent, beat) = big_file_app(work, &args);
    let cgroup = app_cgroup(agent.0.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    // The start-up capture freezes the app's cgroup before the app is in it.
    while !beat.exists() {
        assert!(Instant::now() < deadline, "the app never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    while !frozen(&cgroup) {
        assert!(
            Instant::now() < deadline,
            "the app's cgroup {} was never seen frozen",
            cgroup.display()
        );
        assert!(
            agent.0.try_wait().expect("try_wait").is_none(),
            "run exited"
        );
    }
    (agent, cgroup, beat)
}

/// Whether `beat` grows within a second.
fn beats(beat: &Path) -> bool {
    let before = fs::metadata(beat).map(|m| m.len()).unwrap_or(0);
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
        if fs::metadata(beat).map(|m| m.len()).unwrap_or(0) > before {
            return true;
        }
    }
    false
}

/// Kills `run` with SIGKILL while its app (started with `extra`) is
/// frozen; requires the app's cgroup thawed within 1 s and the store
/// intact. Returns whether the app ran on afterwards.
fn app_runs_after_the_agent_is_killed_frozen(extra: &[&str]) -> bool {
    let work = tempfile::tempdir().expect("tempdir");
    let (mut agent, cgroup, beat) = frozen_app(work.path(), extra);
    let store = work.path().join("store.dk");
    rustix::process::kill_process(pid(agent.0.id()), Signal::KILL).expect("SIGKILL the agent");
    let killed = Instant::now();
    while frozen(&cgroup) {
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "{extra:?}: the app's cgroup was still frozen 1 s after the agent died"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!(
        "{extra:?}: thawed {:?} after the agent was killed",
        killed.elapsed()
    );
    agent.0.wait().expect("wait");
    // Time for an app killed with the agent to be gone.
    std::thread::sleep(Duration::from_millis(200));
    let runs = beats(&beat);
    // End whatever is left.
    let _ = fs::write(cgroup.join("cgroup.kill"), "1");
    ok(&["verify", "--store", s(&store)]);
    runs
}

#[test]
fn the_app_runs_again_when_the_agent_is_killed_while_it_is_frozen() {
    // --app-survives: the app outlives the killed agent, thawed.
    assert!(
        app_runs_after_the_agent_is_killed_frozen(&["--app-survives"]),
        "the app did not run again after the agent was killed"
    );
    // By default the app dies with the agent, and nothing is left frozen.
    assert!(
        !app_runs_after_the_agent_is_killed_frozen(&[]),
        "the app kept running after the agent was killed"
    );
}

#[test]
fn a_freeze_longer_than_max_pause_is_cut_short_and_marked_torn() {
    let work = tempfile::tempdir().expect("tempdir");
    // Copying 96 MiB takes tens of milliseconds.
    let (mut agent, _) = big_file_app(work.path(), &["--max-pause", "3ms"]);
    let store = work.path().join("store.dk");
    let deadline = Instant::now() + Duration::from_secs(30);
    let over = loop {
        let found = batches(&store).into_iter().find(|b| {
            b["torn_why"]
                .as_str()
                .is_some_and(|w| w.contains("--max-pause"))
        });
        if let Some(batch) = found {
            break batch;
        }
        assert!(
            Instant::now() < deadline,
            "no batch was cut short by --max-pause"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    crash(&mut agent);
    assert_eq!(over["consistency"], "torn", "{over}");
    let pause = over["pause_us"].as_u64().expect("its pause");
    assert!(
        pause < 100_000,
        "the app was thawed soon after --max-pause, not after the whole copy: {pause} µs"
    );
    let log = fs::read_to_string(store.with_extension("log")).expect("the agent's log");
    assert!(
        log.contains("--max-pause") && log.contains(s(&work.path().join("state"))),
        "the warning names the tree: {log}"
    );
    ok(&["verify", "--store", s(&store)]);
}

#[test]
fn sigterm_while_the_app_is_frozen_thaws_it_and_stops_cleanly() {
    let work = tempfile::tempdir().expect("tempdir");
    let (mut agent, cgroup, _) = frozen_app(work.path(), &[]);
    let store = work.path().join("store.dk");
    rustix::process::kill_process(pid(agent.0.id()), Signal::TERM).expect("SIGTERM run");
    // The frozen read ends, the app is thawed and gets the SIGTERM, its
    // leftovers are ended, a final capture is taken and run exits.
    let status = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = agent.0.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "run did not stop within 60 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // sh killed by the forwarded SIGTERM: 128 + 15.
    assert_eq!(status.code(), Some(143), "run's exit status: {status:?}");
    assert!(
        !frozen(&cgroup),
        "run left the app's cgroup {} frozen",
        cgroup.display()
    );
    assert!(
        !cgroup.exists(),
        "run removed the app's cgroup {} at exit",
        cgroup.display()
    );
    ok(&["verify", "--store", s(&store)]);
    assert_consistent_cuts(&store, "sigterm while frozen");
}

/// A cgroup of the test's own (removed when dropped, once empty).
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        // Tests of one binary run in parallel in one process: each cgroup
        // gets a number of its own, or two tests would freeze (and kill)
        // each other's writers.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = app_cgroup(std::process::id())
            .with_file_name(format!("dk-test-{name}-{}-{n}", std::process::id()));
        fs::create_dir_all(&path).expect("create a test cgroup");
        TestCgroup(path)
    }

    /// The invariant writer, in this cgroup, writing `state`.
    fn invariant_writer(&self, work: &Path, state: &Path) -> Reaped {
        let script = work.join("writer.sh");
        fs::write(&script, INVARIANT_WRITER).expect("writer script");
        Reaped(
            self.shell(&format!("sh {}", s(&script)))
                .current_dir(state)
                .spawn()
                .expect("start the writer"),
        )
    }

    /// `sh -c` that moves itself into this cgroup, then runs `script`.
    fn shell(&self, script: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!(
            "echo $$ > {} && exec {script}",
            s(&self.0.join("cgroup.procs"))
        ));
        command
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs the invariant writer in a cgroup of its own under `watch --backend
/// ebpf` (itself in another cgroup) with `freeze_args` for 2.5 s; returns
/// the watcher's log and checks every batch: none torn, at least one
/// frozen, each the tree of one instant.
fn watch_the_writer(freeze_args: impl Fn(&TestCgroup, &TestCgroup) -> String) -> String {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = fresh_invariant_state(work.path());
    let writer_cgroup = TestCgroup::new("writer");
    let agent_cgroup = TestCgroup::new("agent");
    let writer = writer_cgroup.invariant_writer(work.path(), &state);
    let args = format!(
        "{BIN} watch --backend ebpf --debounce 50ms --max-latency 300ms \
         --state-dir data={} --store {} {}",
        s(&state),
        s(&store),
        freeze_args(&writer_cgroup, &agent_cgroup),
    );
    let mut watch = Reaped(
        agent_cgroup
            .shell(&args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start watch"),
    );
    // Loading the tracer takes a while on a busy machine: from the
    // start-up capture on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while batches(&store).is_empty() {
        assert!(Instant::now() < deadline, "watch never captured");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(2500));
    // SIGTERM: a final capture, then exit.
    rustix::process::kill_process(pid(watch.0.id()), Signal::TERM).expect("SIGTERM watch");
    let stderr = String::from_utf8_lossy(&wait_output(&mut watch.0)).into_owned();
    drop(writer);
    let ids = assert_consistent_cuts(&store, &format!("watch (its log: {stderr})"));
    let timeline = batches(&store);
    assert!(
        timeline.iter().any(|b| b["consistency"] == "frozen"),
        "watch froze the writer's cgroup: {timeline:?}\n{stderr}"
    );
    for batch in ids {
        let to = work.path().join("restored");
        restore(&store, Some(batch), &to);
        let (a, b) = counters(&to);
        assert!(b <= a && a <= b + 1, "batch {batch}: a={a} b={b}");
    }
    stderr
}

#[test]
fn watch_freezes_a_named_cgroup_and_refuses_its_own() {
    let root = app_cgroup(std::process::id());
    let hierarchy_root = root
        .ancestors()
        .find(|p| p.join("cgroup.controllers").exists() && !p.join("cgroup.freeze").exists())
        .map(Path::to_path_buf);
    let stderr = watch_the_writer(|writer, agent| {
        let mut args = format!(
            "--freeze-cgroup {} --freeze-cgroup {}",
            s(&writer.0),
            // The watcher runs in it: refused.
            s(&agent.0)
        );
        if let Some(root) = &hierarchy_root {
            // The root cgroup cannot be frozen: refused.
            args.push_str(&format!(" --freeze-cgroup {}", s(root)));
        }
        args
    });
    assert!(
        stderr.contains("DiffKeeper itself runs in it"),
        "freezing the watcher's own cgroup is refused by name: {stderr}"
    );
    if hierarchy_root.is_some() {
        assert!(
            stderr.contains("not a cgroup v2 directory that can be frozen"),
            "freezing the root cgroup is refused: {stderr}"
        );
    }
}

#[test]
fn watch_finds_and_freezes_the_cgroup_of_the_processes_that_write() {
    let stderr = watch_the_writer(|_, _| String::new());
    assert!(
        stderr.contains("is frozen for consistent cuts"),
        "the writer's cgroup was found from the tracer's events: {stderr}"
    );
}

fn wait_output(child: &mut Child) -> Vec<u8> {
    use std::io::Read;
    let mut err = Vec::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_end(&mut err);
    }
    let _ = child.wait();
    err
}

#[test]
fn a_rollback_records_the_live_state_as_a_frozen_cut() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = fresh_invariant_state(work.path());
    let data = format!("data={}", s(&state));
    ok(&["snapshot", "--state-dir", &data, "--store", s(&store)]);
    let writer_cgroup = TestCgroup::new("rollback-writer");
    let writer = writer_cgroup.invariant_writer(work.path(), &state);
    std::thread::sleep(Duration::from_millis(300));
    let roll_back = |cgroup: &Path| {
        common::diffkeeper(&[
            "replay",
            "--state-dir",
            &data,
            "--store",
            s(&store),
            "--batch",
            "1",
            "--freeze-cgroup",
            s(cgroup),
        ])
    };
    let rolled = roll_back(&writer_cgroup.0);
    assert!(rolled.status.success(), "{rolled:?}");
    drop(writer);
    let timeline = batches(&store);
    let recorded = timeline.last().expect("the recorded live state");
    assert_eq!(
        recorded["consistency"], "frozen",
        "the live state recorded before the rollback is a frozen cut: {recorded}"
    );
    let to = work.path().join("restored");
    restore(&store, recorded["batch"].as_u64(), &to);
    let (a, b) = counters(&to);
    assert!(b <= a && a <= b + 1, "the recorded live state: a={a} b={b}");
    assert!(a > 0, "the writer had written before the rollback");
    // A cgroup that cannot be frozen is refused before anything changes.
    let before = batches(&store).len();
    let refused = roll_back(&work.path().join("no-such-cgroup"));
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("no-such-cgroup"),
        "names the path: {stderr}"
    );
    assert_eq!(batches(&store).len(), before, "nothing was recorded");
}

/// A frozen cut stages a sparse file's data only: the app makes a 512 MiB
/// file holding 2 MiB, every frozen batch copies a few MiB at most while
/// the app waits, and the file comes back exactly.
#[test]
fn a_frozen_cut_copies_a_sparse_file_without_its_holes() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    let store = work.path().join("store.dk");
    let done = work.path().join("done");
    let script = format!(
        "truncate -s 512M sparse && \
         dd if=/dev/urandom of=sparse bs=1M count=1 seek=100 conv=notrunc status=none && \
         dd if=/dev/urandom of=sparse bs=1M count=1 seek=300 conv=notrunc status=none && \
         touch {} && exec sleep 600",
        s(&done)
    );
    let mut agent = start(&state, &store, "freeze", &[], &script);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done.exists() {
        assert!(Instant::now() < deadline, "the app never wrote its file");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the last write's batch commit, then stop (a final capture too).
    std::thread::sleep(Duration::from_millis(1500));
    rustix::process::kill_process(pid(agent.0.id()), Signal::TERM).expect("SIGTERM run");
    agent.0.wait().expect("wait for run");
    let frozen: Vec<Value> = batches(&store)
        .into_iter()
        .filter(|b| b["consistency"] == "frozen")
        .collect();
    assert!(!frozen.is_empty(), "no frozen batch: {:?}", batches(&store));
    for batch in &frozen {
        let copied = batch["frozen_bytes"].as_u64().expect("frozen_bytes");
        assert!(
            copied <= 4 << 20,
            "a frozen batch copied {copied} bytes of a file holding 2 MiB: {batch}"
        );
    }
    let to = work.path().join("restored");
    restore(&store, None, &to);
    let back = fs::read(to.join("sparse")).expect("restored file");
    assert!(
        back == fs::read(state.join("sparse")).expect("the app's file"),
        "the restored file differs"
    );
}

/// `diffkeeper daemon` killed with SIGKILL while two targets are written,
/// one of them frozen for every batch: the thaw watchdog leaves no writer
/// frozen, both stores verify and hold only whole cuts, and the restarted
/// daemon's start-up capture takes what was written while it was down.
#[test]
fn a_daemon_killed_mid_write_loses_nothing_and_leaves_nothing_frozen() {
    let work = tempfile::tempdir().expect("tempdir");
    let (state, store) = fresh_invariant_state(work.path());
    let other = work.path().join("other");
    fs::create_dir_all(&other).expect("mkdir");
    let other_store = work.path().join("other.dk");
    let writer_cgroup = TestCgroup::new("daemon-writer");
    let mut writer = writer_cgroup.invariant_writer(work.path(), &state);
    let mut chatter = Reaped(
        Command::new("sh")
            .arg("-c")
            .arg("n=0; while :; do n=$((n+1)); echo $n >> log; sleep 0.01; done")
            .current_dir(&other)
            .spawn()
            .expect("start the second writer"),
    );
    let config = work.path().join("daemon.toml");
    fs::write(
        &config,
        format!(
            "[daemon]\nbackend = \"ebpf\"\nmetrics_addr = \"127.0.0.1:0\"\n\n[defaults]\ndebounce = \"50ms\"\nmax_latency = \"300ms\"\n\n\
             [[target]]\nname = \"invariant\"\nstore = \"{}\"\nstate_dirs = [\"data={}\"]\n\
             consistency = \"freeze\"\nfreeze_cgroups = [\"{}\"]\n\n\
             [[target]]\nname = \"other\"\nstore = \"{}\"\nstate_dirs = [\"data={}\"]\n",
            s(&store),
            s(&state),
            s(&writer_cgroup.0),
            s(&other_store),
            s(&other),
        ),
    )
    .expect("write the config");
    let start_daemon = |log: &str| {
        Reaped(
            Command::new(BIN)
                .args(["daemon", "--config", s(&config)])
                .stdout(Stdio::null())
                .stderr(fs::File::create(work.path().join(log)).expect("log"))
                .spawn()
                .expect("start the daemon"),
        )
    };
    let mut daemon = start_daemon("daemon-1.log");
    let started = Instant::now();
    while batches(&store).len() < 4 || batches(&other_store).len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the daemon captures both targets"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Mid-write, and likely mid-freeze: every batch of the first target is
    // taken frozen.
    rustix::process::kill_process(pid(daemon.0.id()), Signal::KILL).expect("SIGKILL the daemon");
    daemon.0.wait().expect("wait for the killed daemon");
    let thawed = Instant::now();
    while frozen(&writer_cgroup.0) {
        assert!(
            thawed.elapsed() < Duration::from_secs(2),
            "the writer's cgroup is left frozen after the daemon's SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = batches(&store).len();
    // The second writer shares the daemon's cgroup, which is never frozen:
    // its batches may be torn, but the store is whole.
    ok(&["verify", "--store", s(&other_store)]);
    ok(&["verify", "--store", s(&store)]);
    for batch in assert_consistent_cuts(&store, "killed daemon") {
        let to = work.path().join("restored");
        restore(&store, Some(batch), &to);
        let (a, b) = counters(&to);
        assert!(
            b <= a && a <= b + 1,
            "batch {batch} is not the tree of one instant: a={a} b={b}"
        );
    }
    // Written while no daemon ran: the restart's start-up capture takes it.
    std::thread::sleep(Duration::from_millis(300));
    let mut daemon = start_daemon("daemon-2.log");
    let restarted = Instant::now();
    while batches(&store).len() <= before {
        assert!(
            restarted.elapsed() < Duration::from_secs(20),
            "the restarted daemon captures again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The writers stop; what they left is what the stores restore.
    let _ = fs::write(writer_cgroup.0.join("cgroup.kill"), "1");
    let _ = writer.0.wait();
    chatter.0.kill().expect("stop the second writer");
    let _ = chatter.0.wait();
    let quiet = Instant::now();
    loop {
        let to = work.path().join("restored");
        restore(&store, None, &to);
        let other_to = work.path().join("restored-other");
        restore(&other_store, None, &other_to);
        if counters(&to) == counters(&state)
            && fs::read(other_to.join("log")).ok() == fs::read(other.join("log")).ok()
        {
            break;
        }
        assert!(
            quiet.elapsed() < Duration::from_secs(10),
            "the restarted daemon captures the writers' last state"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    rustix::process::kill_process(pid(daemon.0.id()), Signal::TERM).expect("SIGTERM the daemon");
    let status = daemon.0.wait().expect("wait for the daemon");
    assert!(status.success(), "the daemon stops cleanly: {status}");
    assert!(!frozen(&writer_cgroup.0), "nothing is left frozen");
    ok(&["verify", "--store", s(&store)]);
    ok(&["verify", "--store", s(&other_store)]);
}
