//! The eBPF programs on the real kernel: `diffkeeper doctor` loads and
//! attaches them, writes, and reports what the kernel side counted. CI runs
//! as root on a kernel with syscall tracepoints, so this never skips.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_diffkeeper");

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
    let (namespace, files): (Vec<&diffkeeper_common::WriteEvent>, Vec<_>) =
        events.iter().partition(|e| e.is_namespace());
    assert_eq!(files.len(), 3, "one event per dirty file: {events:?}");
    // Creating the three files changed the directory: one event for it.
    assert_eq!(
        namespace.len(),
        1,
        "one event for the directory: {events:?}"
    );
    assert_eq!(
        counters[diffkeeper_common::counter::RINGBUF_FULL as usize],
        0
    );
}
