//! Real OCI containers under one `diffkeeper daemon`: three containers run
//! by the real crun, each in its own mount and pid namespace with its state
//! directory bind-mounted at `/data` and its processes in a cgroup named as
//! containerd names it, all writing at once (creates, appends, renames,
//! removals, and io_uring writes, renames and removals). One daemon with
//! the eBPF tracer has one target per container. Each store must hold
//! exactly its own container's files with their content, each target's log
//! must name its own container and no other, and after `kill -9` of every
//! container's app in the middle of a two-file invariant every batch must
//! be a consistent cut, with no container's cgroup left frozen.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::container::{host_program, Container, Rootfs, Spec};
use common::daemon::{get, metrics_addr, Daemon};
use common::{ok, read_tree, s, Node, Rng};
use serde_json::Value;

/// Set in a container to make [`in_container_io_uring_writer`] write; its
/// value names the container.
const RING_ENV: &str = "DK_TEST_IO_URING_WRITER";

/// Not a test by itself: the io_uring writer run inside the containers (the
/// test binary is copied into their root file system and started as
/// `/writer --exact in_container_io_uring_writer`). Without its variable it
/// does nothing.
#[test]
fn in_container_io_uring_writer() {
    if let Some(name) = std::env::var_os(RING_ENV) {
        ring_writes(Path::new("/data"), &name.to_string_lossy());
    }
}

/// Files `ring-NAME-I` written through io_uring (a write inline, an
/// appended one forced onto an io-wq worker), some renamed and some
/// removed through io_uring too, so no write-family syscall names them.
fn ring_writes(dir: &Path, name: &str) {
    use io_uring::{opcode, squeue::Flags, types::Fd};
    use std::os::fd::AsRawFd;
    let mut ring = io_uring::IoUring::new(8).expect("an io_uring");
    let path = |file: String| CString::new(dir.join(file).as_os_str().as_bytes()).expect("a path");
    for i in 0..24 {
        let file = path(format!("ring-{name}-{i}"));
        let f = fs::File::create(dir.join(format!("ring-{name}-{i}"))).expect("create");
        let first = format!("{name} ring {i} ").repeat(30).into_bytes();
        let second = format!("{name} appended {i}\n").into_bytes();
        for (bytes, offset, flags) in [
            (&first, 0, Flags::empty()),
            (&second, first.len() as u64, Flags::ASYNC),
        ] {
            let sqe = opcode::Write::new(Fd(f.as_raw_fd()), bytes.as_ptr(), bytes.len() as u32)
                .offset(offset)
                .build()
                .flags(flags);
            // SAFETY: the buffer and the file outlive the call, which waits
            // for the completion.
            let done = unsafe { common::uring_complete(&mut ring, &sqe) };
            assert_eq!(
                done,
                bytes.len() as i32,
                "io_uring write to ring-{name}-{i}"
            );
        }
        drop(f);
        if i % 4 == 3 {
            let to = path(format!("ring-moved-{name}-{i}"));
            let sqe = opcode::RenameAt::new(
                Fd(libc::AT_FDCWD),
                file.as_ptr(),
                Fd(libc::AT_FDCWD),
                to.as_ptr(),
            )
            .build();
            // SAFETY: both paths outlive the call, which waits for it.
            let done = unsafe { common::uring_complete(&mut ring, &sqe) };
            assert_eq!(done, 0, "io_uring rename of ring-{name}-{i}");
        }
        if i % 6 == 5 {
            let victim = path(format!("ring-{name}-{}", i - 1));
            let sqe = opcode::UnlinkAt::new(Fd(libc::AT_FDCWD), victim.as_ptr()).build();
            // SAFETY: the path outlives the call, which waits for it.
            let done = unsafe { common::uring_complete(&mut ring, &sqe) };
            assert_eq!(done, 0, "io_uring unlink of ring-{name}-{}", i - 1);
        }
        std::thread::sleep(Duration::from_millis(15));
    }
}

/// Each container's app, `sh` in the container. With `MIXED` set it first
/// waits for the test's go (so the three write at the same time), starts
/// the io_uring writer, and creates, appends, renames and removes files
/// and a directory, writing `mixed-done` at the end. Then, until killed,
/// it keeps `b <= a <= b + 1` across two files without pause: counter n
/// into a, then into b, both in place. It goes on from b, so an app
/// started again on the same files keeps the invariant too.
const APP: &str = r#"
fail() { echo "$NAME: $*" >&2; exit 3; }
cd /data || fail cd
if [ -n "${MIXED:-}" ]; then
  while [ ! -e /go/go ]; do sleep 0.01; done
  /writer --exact in_container_io_uring_writer --nocapture --test-threads=1 &
  ring=$!
  mkdir sub || fail mkdir
  i=0
  while [ $i -lt 40 ]; do
    i=$((i+1))
    printf '%s file %s\n' "$NAME" $i > sub/$NAME-$i || fail create $i
    printf '%s line %s\n' "$NAME" $i >> journal || fail append $i
    if [ $((i % 3)) -eq 0 ]; then mv sub/$NAME-$i moved-$NAME-$i || fail rename $i; fi
    if [ $((i % 5)) -eq 0 ]; then j=$((i-1)); rm -f sub/$NAME-$j moved-$NAME-$j || fail rm $j; fi
    sleep 0.02
  done
  mv sub renamed-sub || fail rename the directory
  rm there-at-start || fail remove the first file
  wait $ring || fail the io_uring writer
  echo "$NAME" > mixed-done
fi
read n < b || [ -n "$n" ] || fail read b
while :; do n=$((n+1)); printf '%12d' $n 1<> a; printf '%12d' $n 1<> b; done
"#;

/// How many times each app is started in a new container and killed.
const ROUNDS: usize = 3;

type Tree = BTreeMap<Vec<u8>, Node>;

/// The tree batch `batch` (the latest without) of `store` restores into a
/// fresh directory.
fn restored(store: &Path, batch: Option<u64>, to: &Path) -> Tree {
    let _ = fs::remove_dir_all(to);
    let n = batch.map(|b| b.to_string());
    let mut args = vec!["restore", "--store", s(store), "--to", s(to)];
    if let Some(n) = &n {
        args.extend(["--batch", n]);
    }
    ok(&args);
    read_tree(to)
}

/// How `got` differs from `want`, path by path: missing, unexpected (a
/// file of another container would be one), or different.
fn differences(want: &Tree, got: &Tree) -> Vec<String> {
    let show = |path: &[u8]| String::from_utf8_lossy(path).into_owned();
    let describe = |node: &Node| match node {
        Node::File {
            mode,
            mtime_ns,
            content,
        } => format!(
            "file mode {mode:o}, mtime {mtime_ns}, {} bytes: {:?}",
            content.len(),
            String::from_utf8_lossy(&content[..content.len().min(40)])
        ),
        other => format!("{other:?}"),
    };
    let mut out = Vec::new();
    for (path, node) in want {
        match got.get(path) {
            None => out.push(format!("{} is missing", show(path))),
            Some(other) if other != node => out.push(format!(
                "{} differs: want {}, got {}",
                show(path),
                describe(node),
                describe(other)
            )),
            Some(_) => {}
        }
    }
    out.extend(
        got.keys()
            .filter(|path| !want.contains_key(*path))
            .map(|path| format!("{} is unexpected", show(path))),
    );
    out
}

fn batches(store: &Path) -> Vec<Value> {
    let out = ok(&["log", "--batches", "--json", "--store", s(store)]);
    serde_json::from_str(&out).expect("log --batches --json")
}

fn counter(tree: &Tree, name: &str) -> u64 {
    match tree.get(name.as_bytes()) {
        Some(Node::File { content, .. }) => String::from_utf8_lossy(content)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} holds no counter: {content:?}")),
        other => panic!("{name} is not a file: {other:?}"),
    }
}

/// The counter in the live file `path`; `None` when a read caught it
/// half-written.
fn live_counter(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The log lines of target `target`'s span.
fn target_lines<'a>(log: &'a str, target: &str) -> Vec<&'a str> {
    let span = format!("target{{target={target}}}");
    log.lines().filter(|line| line.contains(&span)).collect()
}

/// The container ids target `target`'s log lines name in their
/// `container=` field.
fn containers_named(log: &str, target: &str) -> BTreeSet<String> {
    target_lines(log, target)
        .into_iter()
        .filter_map(|line| {
            let (_, after) = line.split_once(" container=")?;
            Some(
                after
                    .split_whitespace()
                    .next()?
                    .trim_matches('"')
                    .to_string(),
            )
        })
        .collect()
}

/// One target: a state directory that one container after another writes.
struct Case {
    name: &'static str,
    consistency: &'static str,
    state: PathBuf,
    store: PathBuf,
    /// The ids of the containers that wrote it, and their cgroups' paths.
    ids: BTreeSet<String>,
    scopes: BTreeSet<String>,
}

/// What one round shares: where containers are made, from what.
struct Bench<'a> {
    work: &'a Path,
    rootfs: &'a Rootfs,
    go: &'a Path,
}

/// Starts one new container per case on its state directory (the first
/// round with the mixed writes first), lets the apps keep their invariant
/// for a while, kills each with SIGKILL at its own seeded moment, and
/// waits for the containers to end.
fn round(bench: &Bench, cases: &mut [Case], round: usize, rng: &mut Rng) -> Vec<Container> {
    let mixed = round == 0;
    let mut containers: Vec<Container> = cases
        .iter_mut()
        .enumerate()
        .map(|(n, case)| {
            let id = common::container::container_id((round * 16 + n) as u64);
            case.ids.insert(id.clone());
            let mut env = vec!["PATH=/bin".into(), format!("NAME={}", case.name)];
            if mixed {
                env.extend(["MIXED=1".into(), format!("{RING_ENV}={}", case.name)]);
            }
            let spec = Spec {
                args: vec!["/bin/sh".into(), "-c".into(), APP.into()],
                env,
                binds: vec![
                    (case.state.as_path(), "/data", false),
                    (bench.go, "/go", true),
                ],
            };
            let name = format!("{}-{round}", case.name);
            let container = Container::start(bench.work, bench.rootfs, &name, &id, &spec);
            case.scopes.insert(s(&container.scope.0).to_string());
            container
        })
        .collect();
    let pids: Vec<u32> = containers
        .iter()
        .map(|c| c.pid(Duration::from_secs(20)))
        .collect();
    let before: Vec<u64> = cases
        .iter()
        .map(|c| live_counter(&c.state.join("b")).expect("a counter between rounds"))
        .collect();
    if mixed {
        fs::write(bench.go.join("go"), b"").expect("go");
    }
    for ((case, container), before) in cases.iter().zip(&mut containers).zip(before) {
        common::wait_for(
            &format!("{}'s app to keep its invariant", case.name),
            Duration::from_secs(30),
            || {
                assert!(
                    container.running(),
                    "{}'s container ended early: {}",
                    case.name,
                    container.output()
                );
                (!mixed || case.state.join("mixed-done").exists())
                    && live_counter(&case.state.join("a")).is_some_and(|a| a > before)
            },
        );
    }
    // Long enough for batches to be taken (frozen) under the writers.
    let mut moments: Vec<(Duration, usize)> = (0..cases.len())
        .map(|n| (Duration::from_millis(500 + rng.below(1000)), n))
        .collect();
    moments.sort();
    let loops_run = Instant::now();
    for (moment, n) in moments {
        if let Some(left) = moment.checked_sub(loops_run.elapsed()) {
            std::thread::sleep(left);
        }
        let pid = rustix::process::Pid::from_raw(pids[n] as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill -9");
    }
    for (case, container) in cases.iter().zip(&mut containers) {
        let status = container.wait(Duration::from_secs(10));
        assert!(
            !status.success(),
            "{}'s app was killed, yet crun exited {status}: {}",
            case.name,
            container.output()
        );
    }
    containers
}

#[test]
fn three_containers_each_keep_exactly_their_own_state_in_consistent_cuts() {
    common::container::require_crun();
    let started = Instant::now();
    let work = tempfile::tempdir().expect("tempdir");
    let work = work.path();
    // The host's sh and coreutils the app uses, and this test binary as
    // the io_uring writer.
    let mut programs: Vec<(String, PathBuf)> = ["sh", "mv", "rm", "mkdir", "sleep"]
        .iter()
        .map(|p| (format!("/bin/{p}"), host_program(p)))
        .collect();
    programs.push((
        "/writer".into(),
        std::env::current_exe().expect("the test binary"),
    ));
    let programs: Vec<(&str, &Path)> = programs
        .iter()
        .map(|(inside, host)| (inside.as_str(), host.as_path()))
        .collect();
    let rootfs = Rootfs::build(&work.join("rootfs"), &programs, &["/data", "/go"]);
    let go = work.join("go");
    fs::create_dir(&go).expect("mkdir go");
    let bench = Bench {
        work,
        rootfs: &rootfs,
        go: &go,
    };

    // Two targets freeze for every batch, one only when its tree was
    // written while read.
    let mut cases: Vec<Case> = [("alpha", "freeze"), ("beta", "freeze"), ("gamma", "auto")]
        .into_iter()
        .map(|(name, consistency)| {
            let state = work.join(format!("state-{name}"));
            fs::create_dir(&state).expect("mkdir state");
            fs::write(state.join("there-at-start"), format!("{name} before")).expect("write");
            for counter in ["a", "b"] {
                fs::write(state.join(counter), format!("{:12}", 0)).expect("write");
            }
            Case {
                name,
                consistency,
                store: work.join(format!("{name}.dk")),
                state,
                ids: BTreeSet::new(),
                scopes: BTreeSet::new(),
            }
        })
        .collect();

    // The safety-net rescan is out of reach: only the tracer's events
    // bring the containers' changes in.
    let config = work.join("daemon.toml");
    let mut text = String::from("[daemon]\nbackend = \"ebpf\"\nmetrics_addr = \"127.0.0.1:0\"\n\n");
    for case in &cases {
        text.push_str(&format!(
            "[[target]]\nname = \"{}\"\nstore = \"{}\"\nstate_dirs = [\"data={}\"]\n\
             debounce = \"50ms\"\nmax_latency = \"400ms\"\nrescan_interval = \"1h\"\n\
             consistency = \"{}\"\n\n",
            case.name,
            s(&case.store),
            s(&case.state),
            case.consistency
        ));
    }
    fs::write(&config, text).expect("write the config");
    let daemon = Daemon::start(&config, &work.join("daemon.log"));
    common::wait_for("3 start-up captures", Duration::from_secs(30), || {
        daemon.log().matches("start-up capture").count() >= 3
    });

    let mut rng = Rng::new(29);
    let mut last = Vec::new();
    for n in 0..ROUNDS {
        let containers = round(&bench, &mut cases, n, &mut rng);
        for case in &cases {
            let want = read_tree(&case.state);
            let to = work.join(format!("wait-{}", case.name));
            common::wait_for(
                &format!("{}'s store to hold its tree after round {n}", case.name),
                Duration::from_secs(15),
                || restored(&case.store, None, &to) == want,
            );
        }
        // Gone containers' cgroups are removed, as the runtime's systemd
        // scope would be, once shown not left frozen (a cut in flight may
        // still hold one for a moment).
        for (case, container) in cases.iter().zip(&containers) {
            common::wait_for(
                &format!("{}'s cgroup of round {n} to be thawed", case.name),
                Duration::from_secs(2),
                || !container.scope.frozen(),
            );
        }
        if n + 1 < ROUNDS {
            drop(containers);
        } else {
            last = containers;
        }
    }
    // The metrics name each target's writers by container, and only them.
    let (_, metrics) = get(&metrics_addr(&daemon.log()), "/metrics");
    for case in &cases {
        let named: BTreeSet<String> = metrics
            .lines()
            .filter(|l| {
                l.starts_with("diffkeeper_writer_container_info{")
                    && l.contains(&format!("target=\"{}\"", case.name))
            })
            .filter_map(|l| {
                let (_, after) = l.split_once("container=\"")?;
                Some(after.split('"').next()?.to_string())
            })
            .collect();
        assert_eq!(
            named, case.ids,
            "{}'s writer_container_info:\n{metrics}",
            case.name
        );
    }
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "the daemon stops cleanly: {log}");

    let trees: Vec<Tree> = cases.iter().map(|c| read_tree(&c.state)).collect();
    let mut latest = Vec::new();
    for ((case, tree), container) in cases.iter().zip(&trees).zip(&last) {
        let what = case.name;
        // The app did write all it was meant to: a store matching a tree
        // nobody wrote would prove nothing.
        let journal: String = (1..=40).map(|i| format!("{what} line {i}\n")).collect();
        assert_eq!(
            fs::read_to_string(case.state.join("journal")).unwrap_or_default(),
            journal,
            "{what}'s appends"
        );
        for path in [
            format!("moved-{what}-36"),
            format!("renamed-sub/{what}-38"),
            format!("ring-moved-{what}-23"),
            format!("ring-{what}-21"),
        ] {
            assert!(tree.contains_key(path.as_bytes()), "{what} wrote {path}");
        }
        for gone in [
            "there-at-start".to_string(),
            format!("renamed-sub/{what}-4"),
            format!("moved-{what}-9"),
            format!("ring-{what}-22"),
        ] {
            assert!(!tree.contains_key(gone.as_bytes()), "{what} removed {gone}");
        }
        assert!(
            counter(tree, "a") > 100,
            "{what}'s invariant loops ran before they were killed"
        );

        // Exactly its own tree, nothing of the others'.
        let back = restored(&case.store, None, &work.join(format!("latest-{what}")));
        let wrong = differences(tree, &back);
        assert!(wrong.is_empty(), "{what}'s store: {wrong:#?}");
        ok(&["verify", "--store", s(&case.store)]);
        latest.push(back);

        // Every batch is the tree of one instant, none torn, and the
        // freezing targets froze the containers' cgroups for some.
        let timeline = batches(&case.store);
        for batch in &timeline {
            let id = batch["batch"].as_u64().expect("batch id");
            assert_ne!(batch["consistency"], "torn", "{what}: batch {id}: {batch}");
            let cut = restored(&case.store, Some(id), &work.join("cut"));
            let (a, b) = (counter(&cut, "a"), counter(&cut, "b"));
            assert!(
                b <= a && a <= b + 1,
                "{what}: batch {id} is not the tree of one instant: a={a} b={b}"
            );
        }
        let frozen = timeline
            .iter()
            .filter(|b| b["consistency"] == "frozen")
            .count();
        eprintln!(
            "{what} ({}): {} batches, {frozen} frozen",
            case.consistency,
            timeline.len()
        );
        if case.consistency == "freeze" {
            assert!(
                frozen >= ROUNDS,
                "{what}: only {frozen} batches were frozen: {timeline:?}"
            );
        }

        // The log names its containers, and only them.
        assert_eq!(
            containers_named(&log, what),
            case.ids,
            "{what}'s log lines name its containers only:\n{log}"
        );
        let lines = target_lines(&log, what);
        for id in &case.ids {
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains(&format!("containerd container {id} writes"))),
                "{what}'s log says container {id} writes:\n{log}"
            );
        }
        // Its writers' cgroups, found from the tracer's events, were
        // frozen for its cuts, and no other container's.
        let freezes: BTreeSet<String> = lines
            .iter()
            .filter_map(|l| {
                let (_, after) = l.split_once("its cgroup ")?;
                let (path, _) = after.split_once(" is frozen for consistent cuts")?;
                Some(path.to_string())
            })
            .collect();
        assert_eq!(freezes, case.scopes, "{what} freezes its cgroups only");

        // Nothing is left frozen now the daemon is gone.
        assert!(
            !container.scope.frozen(),
            "{what}'s cgroup is left frozen: {}",
            container.scope.events()
        );
    }

    // The checks above can fail: a store holding another container's file,
    // or a log line naming another container, is caught.
    let mut polluted = latest[0].clone();
    let (foreign, node) = trees[1]
        .iter()
        .find(|(path, _)| path.starts_with(b"moved-beta"))
        .expect("one of beta's files");
    polluted.insert(foreign.clone(), node.clone());
    assert_eq!(
        differences(&trees[0], &polluted),
        [format!(
            "{} is unexpected",
            String::from_utf8_lossy(foreign)
        )],
        "a foreign file in a store is caught"
    );
    assert!(
        !differences(&trees[1], &latest[0]).is_empty(),
        "alpha's store is not beta's tree"
    );
    let stranger = cases[1].ids.first().expect("beta's container");
    let forged = format!(
        "INFO target{{target=alpha}}: containerd container {stranger} writes container={stranger}"
    );
    assert!(
        containers_named(&format!("{log}\n{forged}"), "alpha").contains(stranger),
        "a line naming another container is seen"
    );
    eprintln!(
        "{ROUNDS} rounds of three containers: {:?}",
        started.elapsed()
    );
}
