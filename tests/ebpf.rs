//! The eBPF programs on the real kernel: `diffkeeper doctor` loads and
//! attaches them, writes, and reports what the kernel side counted. CI runs
//! as root on a kernel with syscall tracepoints, so this never skips.

use std::process::Command;

mod common;
use common::Mounted;

use diffkeeper::events::{Hooks, SyscallHooks, Tracer};
use diffkeeper_common::{counter, InodeKey, WriteEvent};

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
    doctor_with(&[])
}

fn field(report: &serde_json::Value, name: &str) -> u64 {
    report[name]
        .as_u64()
        .unwrap_or_else(|| panic!("doctor --json has no number {name}: {report}"))
}

/// Runs `diffkeeper doctor --json` with `args` and returns its report.
fn doctor_with(args: &[&str]) -> serde_json::Value {
    assert!(
        rustix::process::geteuid().is_root(),
        "the eBPF tests load programs into the kernel and must run as root (cargo xtask test does)"
    );
    let out = Command::new(BIN)
        .args(["doctor", "--json"])
        .args(args)
        .output()
        .expect("run diffkeeper doctor");
    assert!(
        out.status.success(),
        "diffkeeper doctor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("doctor --json prints JSON")
}

/// What every doctor run must show, whichever hooks report: one event per
/// dirty file and round, none for the file outside, one for the entries.
fn assert_coalesced_and_attributed(report: &serde_json::Value) {
    // 500 writes to each of three files (one in a directory made after the
    // watch started, one renamed in from outside) give one event each;
    // after their marks are cleared, two files written again give one
    // event each. Outside: nothing.
    assert_eq!(field(report, "events_first_round"), 3, "{report}");
    assert_eq!(field(report, "events_after_clear"), 2, "{report}");
    assert_eq!(field(report, "events_outside"), 0, "{report}");
    // Two mkdirs, two creates and a rename into the tree: one event.
    assert!(field(report, "namespace_seen") >= 2, "{report}");
    assert_eq!(field(report, "namespace_events"), 1, "{report}");
    assert_eq!(field(report, "events"), 6, "{report}");
    assert_eq!(field(report, "ringbuf_full"), 0, "{report}");
    // Each file was stamped at least once a round (a, b, d, then a, b),
    // and never more than once a write.
    let stamps = field(report, "stamps_seen");
    assert!(
        (5..=field(report, "writes_made")).contains(&stamps),
        "{report}"
    );
    // The programs resolved each file's inode, device and root with
    // offsets read from this kernel's BTF.
    assert_eq!(report["inodes_match"], true, "{report}");
}

#[test]
fn on_ext4_the_ctime_hooks_alone_see_each_dirty_file_once() {
    let _kernel = exclusive();
    let report = doctor();
    // The doctor's tree is in /tmp, on ext4 here: no syscall tracepoint is
    // attached, so no syscall of any process is slowed.
    assert_eq!(report["hooks"], "ctime", "{report}");
    assert_eq!(field(&report, "writes_seen"), 0, "{report}");
    assert_coalesced_and_attributed(&report);
}

#[test]
fn with_the_syscall_tracepoints_exactly_the_writes_under_the_tree_are_counted() {
    let _kernel = exclusive();
    let report = doctor_with(&["--syscall-hooks"]);
    assert_eq!(report["hooks"], "ctime-and-syscalls", "{report}");
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
    assert_coalesced_and_attributed(&report);
}

#[test]
fn tracefs_is_mounted_when_missing_and_only_for_syscall_tracepoints() {
    let _kernel = exclusive();
    let tracing_mounted = || {
        std::fs::read_to_string("/proc/self/mounts")
            .expect("mounts")
            .lines()
            .any(|l| l.contains(" /sys/kernel/tracing tracefs "))
    };
    // Unmount tracefs if it is there (other tests may have mounted it).
    let _ = Command::new("umount").arg("/sys/kernel/tracing").status();
    let report = doctor();
    assert_eq!(report["mounted_tracefs"], false, "{report}");
    assert!(!tracing_mounted(), "the ctime hooks need no tracefs");
    // The syscall tracepoints do: doctor mounts it by itself.
    let report = doctor_with(&["--syscall-hooks"]);
    assert_eq!(field(&report, "writes_seen"), 2502, "{report}");
    assert!(tracing_mounted(), "tracefs is not mounted after doctor ran");
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

/// A million pwrite calls to three files under a tracer started with
/// `hooks`: what the kernel counted, and the events.
fn million_writes(hooks: SyscallHooks) -> (u64, [u64; counter::COUNT as usize], Vec<WriteEvent>) {
    let _kernel = exclusive();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tracer = Tracer::start(&[dir.path()], hooks).expect("start the tracer");
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
        "{:?}: {writes} pwrite calls in {elapsed:.2?} ({:.0}/s): syscall tracepoints counted {}, {} ctime stamps, {} events",
        tracer.hooks(),
        writes as f64 / elapsed.as_secs_f64(),
        counters[counter::WRITES as usize],
        counters[counter::STAMPS as usize],
        events.len()
    );
    (writes, counters, events)
}

/// One event per dirty file, one for the directory, and no lost event.
fn assert_three_files_one_directory(
    counters: &[u64; counter::COUNT as usize],
    events: &[WriteEvent],
) {
    let (namespace, files): (Vec<&WriteEvent>, Vec<_>) =
        events.iter().partition(|e| e.is_namespace());
    assert_eq!(files.len(), 3, "one event per dirty file: {events:?}");
    // Creating the three files changed the directory: one event for it.
    assert_eq!(
        namespace.len(),
        1,
        "one event for the directory: {events:?}"
    );
    assert_eq!(counters[counter::RINGBUF_FULL as usize], 0);
}

#[test]
fn a_million_writes_to_three_files_cost_three_events() {
    let (writes, counters, events) = million_writes(SyscallHooks::Auto);
    assert_three_files_one_directory(&counters, &events);
    // No syscall tracepoint ran; the kernel stamped a ctime at most once
    // per clock tick, far fewer than the writes.
    assert_eq!(counters[counter::WRITES as usize], 0);
    let stamps = counters[counter::STAMPS as usize];
    assert!((3..writes / 100).contains(&stamps), "{stamps} stamps");
}

#[test]
fn a_million_writes_seen_by_the_syscall_tracepoints_cost_three_events() {
    let (writes, counters, events) = million_writes(SyscallHooks::Always);
    assert_three_files_one_directory(&counters, &events);
    // The three creating opens count as changes too.
    assert_eq!(counters[counter::WRITES as usize], writes + 3);
}

/// Rounds of the clock-tick race test: far more than fit in one tick.
const RACE_ROUNDS: usize = 3000;

#[test]
fn after_a_capture_stats_a_file_its_next_change_is_reported_even_in_the_same_clock_tick() {
    let _kernel = exclusive();
    // ext4 and tmpfs, the file systems state lives on here.
    for parent in ["/var/tmp", "/dev/shm"] {
        let dir = tempfile::tempdir_in(parent).expect("tempdir");
        let mut tracer =
            Tracer::start(&[dir.path()], SyscallHooks::Auto).expect("start the tracer");
        assert_eq!(tracer.hooks(), Hooks::Ctime, "{parent}");
        let path = dir.path().join("file");
        let file = std::fs::File::create(&path).expect("create");
        let key = diffkeeper::events::inode_key(&path).expect("key");
        tracer.drain_events().expect("drain");
        let namespace = diffkeeper_common::InodeKey::namespace(0);
        tracer.clear(&namespace).expect("clear");
        // What a capture does, then a write at once: clear the mark, stat,
        // (read), and the app writes again within microseconds.
        let mut unreported = 0;
        for round in 0..RACE_ROUNDS {
            use std::os::unix::fs::FileExt;
            tracer.clear(&key).expect("clear");
            rustix::fs::fstat(&file).expect("fstat");
            file.write_all_at(&round.to_ne_bytes(), 0).expect("pwrite");
            let events = tracer.drain_events().expect("drain");
            if !events.iter().any(|e| e.key() == key) {
                unreported += 1;
            }
        }
        assert_eq!(
            unreported, 0,
            "{parent}: writes after a stat went unreported"
        );
        // The same for entries: after a stat of the directory (the walk
        // stats each directory before listing it), a create is reported.
        for round in 0..RACE_ROUNDS / 10 {
            tracer.clear(&namespace).expect("clear");
            rustix::fs::stat(dir.path()).expect("stat");
            std::fs::File::create(dir.path().join(format!("new-{round}"))).expect("create");
            let events = tracer.drain_events().expect("drain");
            if !events.iter().any(|e| e.key() == namespace) {
                unreported += 1;
            }
        }
        assert_eq!(
            unreported, 0,
            "{parent}: creates after a stat went unreported"
        );
        // Without the stat, the kernel stamps at most once a tick, so most
        // of these go unreported: why a capture stats before it reads.
        for round in 0..RACE_ROUNDS {
            use std::os::unix::fs::FileExt;
            tracer.clear(&key).expect("clear");
            file.write_all_at(&round.to_ne_bytes(), 0).expect("pwrite");
            if !tracer
                .drain_events()
                .expect("drain")
                .iter()
                .any(|e| e.key() == key)
            {
                unreported += 1;
            }
        }
        assert!(
            unreported > RACE_ROUNDS / 2,
            "{parent}: only {unreported} of {RACE_ROUNDS} unstat-ed writes unreported: the test no longer shows the race"
        );
    }
}

#[test]
fn a_tree_on_a_file_system_with_coarse_ctimes_gets_the_syscall_tracepoints() {
    let _kernel = exclusive();
    // ramfs stamps ctimes once per tick whatever was read.
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = Mounted::new("ramfs", None, "ramfs", dir.path());
    let mut tracer = Tracer::start(&[dir.path()], SyscallHooks::Auto).expect("start the tracer");
    assert_eq!(tracer.hooks(), Hooks::CtimeAndSyscalls);
    let path = dir.path().join("file");
    let file = std::fs::File::create(&path).expect("create");
    let key = diffkeeper::events::inode_key(&path).expect("key");
    tracer.drain_events().expect("drain");
    // Every write right after a clear is reported, stat or no stat.
    for round in 0..RACE_ROUNDS {
        use std::os::unix::fs::FileExt;
        tracer.clear(&key).expect("clear");
        file.write_all_at(&round.to_ne_bytes(), 0).expect("pwrite");
        assert!(
            tracer
                .drain_events()
                .expect("drain")
                .iter()
                .any(|e| e.key() == key),
            "round {round}: a write on ramfs went unreported"
        );
    }
}

#[test]
fn hundreds_of_roots_come_and_go_while_the_programs_stay_loaded() {
    use std::os::unix::fs::FileExt;
    let _kernel = exclusive();
    let parent = tempfile::tempdir().expect("tempdir");
    let mut tracer = Tracer::start(&[], SyscallHooks::Auto).expect("start the tracer");
    // 300 trees, with sparse ids as a node daemon would give them.
    let id = |i: u32| 1000 + 7 * i;
    let files: Vec<(u32, std::fs::File, diffkeeper_common::InodeKey)> = (0..300)
        .map(|i| {
            let root = parent.path().join(format!("volume-{i}"));
            std::fs::create_dir(&root).expect("mkdir");
            let path = root.join("data");
            let file = std::fs::File::create(&path).expect("create");
            tracer.watch(id(i), &root).expect("watch");
            let key = diffkeeper::events::inode_key(&path).expect("key");
            (id(i), file, key)
        })
        .collect();
    assert_eq!(tracer.hooks(), Hooks::Ctime);
    // Each tree's write is reported under its own id (after the stat a
    // capture makes, so a write in this clock tick is stamped too).
    let write_all = |tracer: &mut Tracer, files: &[(u32, std::fs::File, _)]| {
        for (_, file, key) in files {
            tracer.clear(key).expect("clear");
            rustix::fs::fstat(file).expect("fstat");
            file.write_all_at(b"changed", 0).expect("pwrite");
        }
        tracer.drain_events().expect("drain")
    };
    let events = write_all(&mut tracer, &files);
    for (root, _, key) in &files {
        assert!(
            events.iter().any(|e| e.key() == *key && e.root == *root),
            "no event for root {root}: {} events",
            events.len()
        );
    }
    // Half of them go away: their writes are no longer reported, the
    // others' still are.
    for (root, _, _) in files.iter().step_by(2) {
        tracer.unwatch(*root).expect("unwatch");
    }
    let events = write_all(&mut tracer, &files);
    for (i, (root, _, key)) in files.iter().enumerate() {
        let reported = events.iter().any(|e| e.key() == *key);
        assert_eq!(
            reported,
            i % 2 == 1,
            "root {root} after half were unwatched"
        );
    }
    // And one comes back under a new id.
    let again = parent.path().join("volume-0");
    tracer.watch(5, &again).expect("watch again");
    let events = write_all(&mut tracer, &files[..1]);
    assert!(
        events.iter().any(|e| e.key() == files[0].2 && e.root == 5),
        "{events:?}"
    );
    assert!(tracer.unwatch(4242).is_err(), "an unknown root is refused");
    assert!(tracer.watch(5, &again).is_err(), "an id in use is refused");
}

#[test]
fn a_tree_on_overlayfs_is_watched_through_its_upper_directory() {
    use std::os::unix::fs::FileExt;
    let _kernel = exclusive();
    let base = tempfile::tempdir().expect("tempdir");
    // `data` is in both layers (a file only in the lower one); `lowonly`
    // is only in the lower layer.
    let overlay = Mounted::overlay(base.path(), |lower, upper| {
        std::fs::create_dir_all(lower.join("data")).expect("mkdir");
        std::fs::write(lower.join("data/old"), b"from the image").expect("write");
        std::fs::create_dir_all(upper.join("data")).expect("mkdir");
        std::fs::create_dir_all(lower.join("lowonly")).expect("mkdir");
    });
    let merged = overlay.0.clone();
    let upper = base.path().join("upper");
    let mut tracer =
        Tracer::start(&[&merged.join("data")], SyscallHooks::Auto).expect("start the tracer");
    assert_eq!(
        tracer.hooks(),
        Hooks::Ctime,
        "the upper directory is on ext4"
    );
    // Writing the lower file copies it up: an entry appears in the upper
    // directory, reported as a change of the tree (after the stat of the
    // tree a start-up capture makes, even in this clock tick).
    rustix::fs::stat(merged.join("data")).expect("stat");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(merged.join("data/old"))
        .expect("open for writing");
    file.write_all_at(b"changed", 0).expect("pwrite");
    let events = tracer.drain_events().expect("drain");
    assert!(
        events.iter().any(|e| e.key() == InodeKey::namespace(0)),
        "the copy-up was not reported: {events:?}"
    );
    // As a capture does before it walks a tree whose entries changed: the
    // copy-up made the upper file in the work directory, where it was
    // cached as outside every tree, and renamed it in.
    tracer.forget_memberships().expect("forget");
    // Then each write after a stat is reported by its upper inode.
    let key = diffkeeper::events::inode_key(&upper.join("data/old")).expect("key");
    for round in 0..RACE_ROUNDS / 10 {
        tracer.clear(&key).expect("clear");
        rustix::fs::fstat(&file).expect("fstat");
        file.write_all_at(&round.to_ne_bytes(), 0).expect("pwrite");
        let events = tracer.drain_events().expect("drain");
        assert!(
            events.iter().any(|e| e.key() == key && e.root == 0),
            "round {round}: a write through the overlay went unreported: {events:?}"
        );
    }
    drop(tracer);
    // A tree only in the lower layer has no upper directory to watch yet:
    // the syscall tracepoints see its writes.
    let tracer =
        Tracer::start(&[&merged.join("lowonly")], SyscallHooks::Auto).expect("start the tracer");
    assert_eq!(tracer.hooks(), Hooks::CtimeAndSyscalls);
}

#[test]
fn unlinks_and_renames_elsewhere_on_the_node_invalidate_no_cached_membership() {
    let _kernel = exclusive();
    let watched = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    for hooks in [SyscallHooks::Auto, SyscallHooks::Always] {
        let mut tracer = Tracer::start(&[watched.path()], hooks).expect("start the tracer");
        let before = tracer.membership_generation().expect("generation");
        for i in 0..1000 {
            let path = elsewhere.path().join(format!("churn-{i}"));
            std::fs::write(&path, b"x").expect("create");
            std::fs::rename(&path, elsewhere.path().join("renamed")).expect("rename");
            std::fs::remove_file(elsewhere.path().join("renamed")).expect("unlink");
        }
        assert_eq!(
            tracer.membership_generation().expect("generation"),
            before,
            "{:?}: memberships were invalidated by changes outside every tree",
            tracer.hooks()
        );
    }
}

/// ext4 gives a deleted file's inode number to the next file made in its
/// group, anywhere on the file system (here one of a single group, made
/// for the test). The place cached for the deleted
/// file must not be taken for the stranger: its writes are not the tree's
/// changes (they would mark the tree's frozen cuts torn, as written while
/// frozen by a process outside the frozen cgroups).
#[test]
fn a_deleted_files_inode_number_reused_outside_the_tree_is_not_taken_for_the_tree() {
    use std::os::unix::fs::MetadataExt;
    let _kernel = exclusive();
    let base = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let disk = Mounted::ext4(base.path(), 64);
    let watched = disk.0.join("watched");
    let elsewhere = disk.0.join("elsewhere");
    std::fs::create_dir(&watched).expect("mkdir");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    let mut tracer = Tracer::start(&[&watched], SyscallHooks::Auto).expect("start the tracer");
    let mut reused = 0;
    for round in 0..20 {
        let doomed = watched.join(format!("doomed-{round}"));
        std::fs::write(&doomed, b"first").expect("create");
        std::fs::write(&doomed, b"second").expect("write");
        let ino = std::fs::metadata(&doomed).expect("stat").ino();
        std::fs::remove_file(&doomed).expect("unlink");
        tracer.drain_events().expect("drain");
        let before = tracer.root_changes(&[0]).expect("root changes");
        // New files outside the tree until one gets the freed number.
        let mut stranger = None;
        for i in 0..2000 {
            let path = elsewhere.join(format!("r{round}-{i}"));
            std::fs::write(&path, b"").expect("create");
            if std::fs::metadata(&path).expect("stat").ino() == ino {
                stranger = Some(path);
                break;
            }
        }
        let Some(stranger) = stranger else { continue };
        reused += 1;
        for _ in 0..100 {
            std::fs::write(&stranger, b"not the tree's").expect("write");
        }
        let events = tracer.drain_events().expect("drain");
        assert_eq!(
            tracer.root_changes(&[0]).expect("root changes"),
            before,
            "round {round}: writes to inode {ino} outside the tree counted as the tree's changes"
        );
        assert!(
            !events.iter().any(|e| !e.is_namespace() && e.ino == ino),
            "round {round}: a write outside the tree was reported as the tree's: {events:?}"
        );
    }
    assert!(
        reused >= 10,
        "ext4 reused a freed inode number in only {reused} of 20 rounds"
    );
}
