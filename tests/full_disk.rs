//! A full file system under the store or under the state directory, on
//! small tmpfs mounts (the tests run as root): clear errors naming the
//! cause and the path, nothing already stored or replayed damaged, and a
//! watcher that keeps going and catches up once space is freed.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_same_tree, ok, read_tree, refused, s, Reaped, Rng, BIN};

/// A tmpfs of a fixed size, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, mib: u64) -> Tmpfs {
        fs::create_dir_all(&at).expect("mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                s(&at),
            ])
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs (the tests run as root)"
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn root_arg(dir: &Path) -> String {
    format!("data={}", s(dir))
}

#[test]
fn a_full_store_file_system_fails_the_batch_and_keeps_the_history() {
    let work = tempfile::tempdir().expect("tempdir");
    let disk = Tmpfs::mount(work.path().join("disk"), 8);
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    let store = disk.0.join("store.dk");
    let mut rng = Rng::new(7);
    fs::write(state.join("small"), rng.bytes(1 << 20)).expect("write");
    ok(&[
        "snapshot",
        "--state-dir",
        &root_arg(&state),
        "--store",
        s(&store),
    ]);
    let first = read_tree(&state);
    // Random bytes do not compress: this batch cannot fit.
    fs::write(state.join("big"), rng.bytes(12 << 20)).expect("write");
    let err = refused(&[
        "snapshot",
        "--state-dir",
        &root_arg(&state),
        "--store",
        s(&store),
    ]);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(s(&store)), "the error names the store: {err}");
    ok(&["verify", "--store", s(&store)]);
    let back = work.path().join("back");
    ok(&["restore", "--store", s(&store), "--to", s(&back)]);
    assert_same_tree(&first, &read_tree(&back), "after the failed batch");
    // Once space is found, history goes on from the intact store.
    fs::remove_file(state.join("big")).expect("rm");
    fs::write(state.join("small"), b"after the full disk").expect("write");
    ok(&[
        "snapshot",
        "--state-dir",
        &root_arg(&state),
        "--store",
        s(&store),
    ]);
    ok(&["verify", "--store", s(&store)]);
    let back = work.path().join("back2");
    ok(&["restore", "--store", s(&store), "--to", s(&back)]);
    assert_same_tree(
        &read_tree(&state),
        &read_tree(&back),
        "after space was freed",
    );
}

#[test]
fn a_full_target_file_system_leaves_the_state_directory_as_it_was() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    let store = work.path().join("store.dk");
    let mut rng = Rng::new(8);
    fs::write(state.join("a"), rng.bytes(3 << 20)).expect("write");
    fs::write(state.join("b"), rng.bytes(3 << 20)).expect("write");
    ok(&[
        "snapshot",
        "--state-dir",
        &root_arg(&state),
        "--store",
        s(&store),
    ]);

    let disk = Tmpfs::mount(work.path().join("disk"), 4);
    let target = disk.0.join("live");
    fs::create_dir_all(&target).expect("mkdir");
    fs::write(target.join("a"), b"what the app had").expect("write");
    let before = read_tree(&target);
    let err = refused(&[
        "replay",
        "--state-dir",
        &root_arg(&target),
        "--store",
        s(&store),
    ]);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(s(&target)),
        "the error names the state directory: {err}"
    );
    assert_same_tree(&before, &read_tree(&target), "after the failed replay");

    let err = refused(&[
        "restore",
        "--store",
        s(&store),
        "--to",
        s(&disk.0.join("copy")),
    ]);
    assert!(err.contains("No space left on device"), "{err}");
    // Nothing half-written is left to fill the disk.
    let used: u64 = walk_sizes(&disk.0);
    assert!(
        used < 1 << 10,
        "{used} bytes left behind on the full file system"
    );
}

fn walk_sizes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            let e = e.expect("entry");
            let meta = e.metadata().expect("metadata");
            if meta.is_dir() {
                walk_sizes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[test]
fn watch_keeps_going_through_a_full_disk_and_catches_up() {
    let work = tempfile::tempdir().expect("tempdir");
    let disk = Tmpfs::mount(work.path().join("disk"), 16);
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    let store = disk.0.join("store.dk");
    let filler = disk.0.join("filler");
    let mut rng = Rng::new(9);
    fs::write(state.join("early"), b"captured before the disk filled").expect("write");
    ok(&[
        "snapshot",
        "--state-dir",
        &root_arg(&state),
        "--store",
        s(&store),
    ]);
    fs::write(&filler, rng.bytes(10 << 20)).expect("filler");

    let log = work.path().join("watch.log");
    let mut watch = Reaped(
        Command::new(BIN)
            .args([
                "watch",
                "--state-dir",
                &root_arg(&state),
                "--store",
                s(&store),
            ])
            .args([
                "--backend",
                "inotify",
                "--debounce",
                "100ms",
                "--max-latency",
                "1s",
            ])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn watch"),
    );
    let child = &mut watch.0;
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    std::thread::sleep(Duration::from_millis(500));
    fs::write(state.join("big"), rng.bytes(8 << 20)).expect("write");
    wait_for("the capture to fail for want of space", &|| {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("No space left on device"))
    });
    let logged = fs::read_to_string(&log).expect("log");
    assert!(logged.contains("failed (try 1), retrying"), "{logged}");
    assert!(
        logged.contains(s(&store)),
        "the error names the store: {logged}"
    );
    // More writes while the disk is full are not lost either.
    fs::write(state.join("late"), b"written while the disk was full").expect("write");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "watch exited: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );

    fs::remove_file(&filler).expect("free space");
    wait_for("the capture to succeed once space is freed", &|| {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("capturing works again"))
    });
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).expect("pid"),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM watch");
    let status = child.wait().expect("wait");
    assert!(
        status.success(),
        "{status}: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    ok(&["verify", "--store", s(&store)]);
    let back = work.path().join("back");
    ok(&["restore", "--store", s(&store), "--to", s(&back)]);
    assert_same_tree(
        &read_tree(&state),
        &read_tree(&back),
        "after the disk was freed",
    );
}
