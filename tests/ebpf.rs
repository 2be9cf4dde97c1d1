//! The eBPF programs on the real kernel: `diffkeeper doctor` loads and
//! attaches them, writes, and reports what the kernel side counted. CI runs
//! as root on a kernel with syscall tracepoints, so this never skips.

mod common;

use std::process::Command;

use common::{Reaped, BIN};

/// The tests share the kernel's tracefs mount: one at a time.
static KERNEL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    KERNEL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `diffkeeper doctor --json` and returns its report.
fn doctor() -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["doctor", "--json"])
        .output()
        .expect("run diffkeeper doctor");
    assert!(
        out.status.success(),
        "diffkeeper doctor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("doctor --json prints JSON")
}

fn field(report: &serde_json::Value, name: &str) -> u64 {
    report[name]
        .as_u64()
        .unwrap_or_else(|| panic!("doctor --json has no number {name}: {report}"))
}

#[test]
fn only_watched_trees_count_and_each_dirty_file_is_reported_once() {
    let _kernel = exclusive();
    assert!(
        rustix::process::geteuid().is_root(),
        "the eBPF tests load programs into the kernel and must run as root (cargo xtask test does)"
    );
    let report = doctor();

    // Exactly the writes to files under the watched tree are counted:
    // nothing else on this machine (other tests, the system) and not the
    // file the test writes outside the tree.
    assert_eq!(
        field(&report, "writes_seen"),
        field(&report, "writes_made"),
        "{report}"
    );
    assert_eq!(
        field(&report, "bytes_seen"),
        field(&report, "bytes_made"),
        "{report}"
    );
    assert_eq!(field(&report, "writes_made"), 2502, "{report}");
    // In-kernel coalescing: 500 writes to each of three files (one in a
    // directory made after the watch started, one renamed in from outside)
    // give one event each; after their marks are cleared, two files
    // written again give one event each. Outside: nothing.
    assert_eq!(field(&report, "events_first_round"), 3, "{report}");
    assert_eq!(field(&report, "events_after_clear"), 2, "{report}");
    assert_eq!(field(&report, "events_outside"), 0, "{report}");
    // Two mkdirs and a rename into the tree, reported by one event.
    assert_eq!(field(&report, "namespace_seen"), 3, "{report}");
    assert_eq!(field(&report, "namespace_events"), 1, "{report}");
    assert_eq!(field(&report, "events"), 6, "{report}");
    assert_eq!(field(&report, "ringbuf_full"), 0, "{report}");
    // The programs resolved each file's inode, device and root from its
    // descriptor with offsets read from this kernel's BTF.
    assert_eq!(report["inodes_match"], true, "{report}");
}

#[test]
fn tracefs_is_mounted_when_missing() {
    let _kernel = exclusive();
    // Unmount tracefs if it is there (other tests may have mounted it);
    // doctor must mount it again by itself.
    let _ = Command::new("umount").arg("/sys/kernel/tracing").status();
    let report = doctor();
    assert_eq!(field(&report, "writes_seen"), 2502, "{report}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(" /sys/kernel/tracing tracefs ")),
        "tracefs is not mounted after doctor ran"
    );
}

#[test]
fn without_privileges_doctor_names_what_is_missing() {
    let _kernel = exclusive();
    // setpriv drops to nobody with no capabilities.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            BIN,
            "doctor",
        ])
        .output()
        .expect("run setpriv");
    assert!(!out.status.success(), "doctor must fail without privileges");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CAP_BPF") || stderr.contains("tracefs"),
        "the error must name what is missing: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_million_writes_to_three_files_cost_three_events() {
    let _kernel = exclusive();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tracer = diffkeeper::events::Tracer::start(&[dir.path()]).expect("start the tracer");
    let files: Vec<std::fs::File> = (0..3)
        .map(|i| std::fs::File::create(dir.path().join(format!("hot{i}"))).expect("create"))
        .collect();
    let block = [1u8; 16];
    let rounds = 1_000_000 / files.len();
    let started = std::time::Instant::now();
    for i in 0..rounds {
        for file in &files {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&block, (i % 4096 * 16) as u64)
                .expect("pwrite");
        }
    }
    let elapsed = started.elapsed();
    let events = tracer.drain_events().expect("drain");
    let counters = tracer.counters().expect("counters");
    let writes = (rounds * files.len()) as u64;
    eprintln!(
        "{writes} pwrite calls in {elapsed:.2?} ({:.0}/s): kernel counted {}, {} events",
        writes as f64 / elapsed.as_secs_f64(),
        counters[diffkeeper_common::counter::WRITES as usize],
        events.len()
    );
    // The three creating opens count as changes too.
    assert_eq!(
        counters[diffkeeper_common::counter::WRITES as usize],
        writes + 3
    );
    assert_eq!(events.len(), 3, "one event per dirty file: {events:?}");
    assert_eq!(
        counters[diffkeeper_common::counter::RINGBUF_FULL as usize],
        0
    );
}

/// `watch` with the eBPF backend: a write to existing files of a large
/// tree is captured by looking at those files alone (the tracer names
/// them by inode); a new file or a rename has the tree walked. Every batch
/// is checked by restoring it.
#[test]
fn writes_to_existing_files_are_captured_without_walking_the_tree() {
    use std::fs;
    use std::io::{Seek, SeekFrom, Write};
    use std::time::{Duration, Instant};

    let _kernel = exclusive();
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    for d in 0..30 {
        fs::create_dir_all(state.join(format!("d{d}"))).expect("mkdir");
        for f in 0..100 {
            fs::write(state.join(format!("d{d}/f{f}")), format!("file {d}/{f}\n")).expect("write");
        }
    }
    fs::hard_link(state.join("d0/f0"), state.join("d1/linked")).expect("hard link");
    let files = 30 * 100 + 1;
    let store = work.path().join("store.dk");
    let root = format!("data={}", state.display());
    let snapshot = Command::new(BIN)
        .args(["snapshot", "--state-dir", &root, "--store"])
        .arg(&store)
        .output()
        .expect("snapshot");
    assert!(snapshot.status.success(), "{snapshot:?}");

    let log = work.path().join("watch.log");
    let mut watch = Reaped(
        Command::new(BIN)
            .args(["watch", "--state-dir", &root, "--store"])
            .arg(&store)
            .args([
                "--backend",
                "ebpf",
                "--debounce",
                "100ms",
                "--max-latency",
                "1s",
            ])
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
    // Let the tracer attach and the start-up capture walk the tree.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("eBPF")
    {
        assert!(Instant::now() < deadline, "the tracer did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));

    let overwrite = |rel: &str, at: u64, bytes: &[u8]| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(state.join(rel))
            .expect("open");
        f.seek(SeekFrom::Start(at)).expect("seek");
        f.write_all(bytes).expect("write");
    };
    let assert_store_has_tree = |what: &str| {
        let back = work
            .path()
            .join(format!("restored-{}", what.replace(' ', "-")));
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
        assert!(
            diff.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&diff.stdout)
        );
    };

    let mut seen = batch_lines().len();
    overwrite("d7/f42", 0, b"FILE");
    let line = next_batch(seen, "one file written in place");
    seen += 1;
    assert_eq!(
        scanned(&line),
        1,
        "only the written file is looked at: {line}"
    );
    assert!(line.contains("1 changed"), "{line}");
    assert_store_has_tree("one file");

    // Both names of a hard-linked inode are looked at and recorded.
    overwrite("d1/linked", 2, b"LINK");
    let line = next_batch(seen, "a hard link written");
    seen += 1;
    assert_eq!(scanned(&line), 2, "{line}");
    assert!(line.contains("2 changed"), "{line}");
    assert_store_has_tree("hard link");

    fs::write(state.join("d3/new"), b"a new file").expect("create");
    let line = next_batch(seen, "a new file");
    seen += 1;
    assert_eq!(
        scanned(&line),
        files + 30 + 1,
        "a new file has the tree walked: {line}"
    );
    assert_store_has_tree("new file");

    fs::rename(state.join("d4/f4"), state.join("d4/renamed")).expect("rename");
    let line = next_batch(seen, "a rename");
    assert!(
        scanned(&line) > files,
        "a rename has the tree walked: {line}"
    );
    assert_store_has_tree("rename");

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(watch.0.id() as i32).expect("pid"),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM");
    assert!(watch.0.wait().expect("wait").success());
    assert_store_has_tree("after stop");
}
