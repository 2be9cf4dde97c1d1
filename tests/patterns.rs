//! Every write pattern an app uses ends up in the store while `watch` runs,
//! with each backend: the store is replayed and compared with the live tree
//! after each pattern, before the watcher stops (so the final capture at
//! exit cannot paper over a missed change).

mod common;

use std::fs::{self, OpenOptions};
use std::io::{IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read_tree, s, Node, BIN};

/// Whether replaying the store gives exactly `state` right now.
fn store_matches(state: &Path, store: &Path, scratch: &Path) -> bool {
    let _ = fs::remove_dir_all(scratch);
    let replayed = Command::new(BIN)
        .args([
            "replay",
            "--state-dir",
            &format!("data={}", s(scratch)),
            "--store",
            s(store),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    // Modes and contents; mtimes of files rewritten in the same tick may
    // legitimately differ from a capture taken just before.
    let strip = |tree: std::collections::BTreeMap<Vec<u8>, Node>| {
        tree.into_iter()
            .map(|(p, n)| match n {
                Node::File { mode, content, .. } => (
                    p,
                    Node::File {
                        mode,
                        mtime_ns: 0,
                        content,
                    },
                ),
                other => (p, other),
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    replayed && scratch.exists() && strip(read_tree(state)) == strip(read_tree(scratch))
}

fn wait_captured(what: &str, backend: &str, state: &Path, store: &Path, scratch: &Path) {
    wait_captured_within(
        Duration::from_secs(15),
        what,
        backend,
        state,
        store,
        scratch,
    )
}

/// [`wait_captured`], failing after `within`.
fn wait_captured_within(
    within: Duration,
    what: &str,
    backend: &str,
    state: &Path,
    store: &Path,
    scratch: &Path,
) {
    let deadline = Instant::now() + within;
    while !store_matches(state, store, scratch) {
        assert!(
            Instant::now() < deadline,
            "{backend}: `{what}` never reached the store"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The tests here change how inotify instances are made (a global
/// setting): one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn every_write_pattern_is_captured_while_watching() {
    let _serial = serial();
    for backend in ["ebpf", "inotify", "scan"] {
        let work = tempfile::tempdir().expect("tempdir");
        let state = work.path().join("state");
        let scratch = work.path().join("scratch");
        let store = work.path().join("store.dk");
        fs::create_dir_all(state.join("dir")).expect("mkdir");
        fs::write(state.join("journal"), b"start\n").expect("write");
        fs::write(
            state.join("dir/inside"),
            b"inside a directory that will move",
        )
        .expect("write");
        let mut watcher = Command::new(BIN)
            .args([
                "watch",
                "--state-dir",
                &format!("data={}", s(&state)),
                "--store",
                s(&store),
            ])
            .args([
                "--backend",
                backend,
                "--debounce",
                "50ms",
                "--max-latency",
                "1s",
            ])
            // The eBPF tracer must see every pattern by itself: its safety
            // net rescan is pushed out of the test's reach.
            .args(["--scan-interval", "300ms", "--rescan-interval", "1h"])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn watch");
        wait_captured("initial state", backend, &state, &store, &scratch);

        let check = |what: &str| wait_captured(what, backend, &state, &store, &scratch);
        let mut journal = OpenOptions::new()
            .append(true)
            .open(state.join("journal"))
            .expect("open");
        journal.write_all(b"appended line\n").expect("append");
        check("append");
        let db = state.join("db.bin");
        fs::write(&db, vec![0u8; 64 * 1024]).expect("write");
        check("new file");
        let file = OpenOptions::new().write(true).open(&db).expect("open");
        file.write_all_at(b"in-place overwrite", 40_000)
            .expect("pwrite");
        file.write_all_at(b"at another offset", 7).expect("pwrite");
        check("pwrite at offsets");
        let mut vectored = OpenOptions::new()
            .append(true)
            .open(state.join("journal"))
            .expect("open");
        let n = vectored
            .write_vectored(&[IoSlice::new(b"writev "), IoSlice::new(b"in two parts\n")])
            .expect("writev");
        assert_eq!(n, 20);
        check("writev");
        file.set_len(30_000).expect("ftruncate");
        check("truncate");
        fs::write(state.join("config.tmp"), b"new config").expect("write");
        fs::rename(state.join("config.tmp"), state.join("config")).expect("rename");
        check("temp file renamed over");
        fs::remove_file(state.join("config")).expect("rm");
        check("delete");
        fs::create_dir_all(state.join("a/b/c/d/e")).expect("mkdir -p");
        fs::write(state.join("a/b/c/d/e/leaf"), b"deep").expect("write");
        check("mkdir -p and a file at the bottom");
        fs::rename(state.join("dir"), state.join("moved-dir")).expect("rename dir");
        fs::write(
            state.join("moved-dir/after-move"),
            b"written after the move",
        )
        .expect("write");
        check("directory rename, then a write inside it");
        let mapped = state.join("mapped.bin");
        fs::write(&mapped, vec![b'.'; 8192]).expect("write");
        check("file to map");
        let status = Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import mmap, os\nf = open({:?}, 'r+b')\nm = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ)\nm[100:112] = b'mmap-written'\nm.flush()\nm.close()\nf.close()",
                s(&mapped)
            ))
            .status()
            .expect("python3 for a shared mapping");
        assert!(status.success());
        check("shared mmap write");

        // A mapping that stays: the second write needs no syscall at all.
        let trigger = work.path().join("go");
        let mut holder = Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import mmap, os, time\nf = open({m:?}, 'r+b')\nm = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ)\nm[200:205] = b'first'\nm.flush()\nwhile not os.path.exists({t:?}): time.sleep(0.02)\nm[300:306] = b'second'\nm.flush()\ntime.sleep(30)",
                m = s(&mapped),
                t = s(&trigger)
            ))
            .spawn()
            .expect("python3 holding a shared mapping");
        check("first write through a lasting mapping");
        fs::write(&trigger, b"").expect("trigger");
        check("a later write through the same mapping, with no syscall");
        holder.kill().expect("kill the mapping holder");
        holder.wait().expect("wait");

        let pid = rustix::process::Pid::from_raw(watcher.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        assert_eq!(watcher.wait().expect("wait").code(), Some(0), "{backend}");
    }
}

/// A kernel setting under /proc/sys, put back as it was when dropped.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: u64) -> Sysctl {
        let old = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        fs::write(path, value.to_string()).unwrap_or_else(|e| panic!("set {path}: {e}"));
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(self.path, self.old.trim());
    }
}

/// Starts `watch --backend inotify` on `state`, logging to `log`, and
/// waits for its start-up capture.
fn watch_with_inotify(state: &Path, store: &Path, log: &Path) -> common::Reaped {
    let watcher = common::Reaped(
        Command::new(BIN)
            .args(["watch", "--state-dir", &format!("data={}", s(state))])
            .args(["--store", s(store), "--backend", "inotify"])
            .args(["--debounce", "50ms", "--max-latency", "1s"])
            .args(["--scan-interval", "300ms"])
            .stderr(fs::File::create(log).expect("log"))
            .spawn()
            .expect("spawn watch"),
    );
    wait_logged(log, "start-up capture");
    watcher
}

fn wait_logged(log: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !fs::read_to_string(log).unwrap_or_default().contains(what) {
        assert!(
            Instant::now() < deadline,
            "`{what}` was never logged: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A state directory (empty), where its store and the watcher's log go,
/// and a scratch directory to replay into; held, no other test here runs.
struct Scene {
    _serial: std::sync::MutexGuard<'static, ()>,
    _work: tempfile::TempDir,
    state: PathBuf,
    scratch: PathBuf,
    store: PathBuf,
    log: PathBuf,
}

fn scene() -> Scene {
    let serial = serial();
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    Scene {
        scratch: work.path().join("scratch"),
        store: work.path().join("store.dk"),
        log: work.path().join("watch.log"),
        state,
        _work: work,
        _serial: serial,
    }
}

/// When inotify's queue overflows, the events it lost named files that
/// were written: the tree must be walked, or those writes never reach the
/// store (the watcher names written files, and captures only those, when
/// no event was lost).
#[test]
fn writes_lost_to_an_inotify_queue_overflow_reach_the_store() {
    let Scene {
        _serial,
        _work,
        state,
        scratch,
        store,
        log,
    } = scene();
    const FILES: usize = 200;
    for i in 0..FILES {
        fs::write(
            state.join(format!("f{i:03}")),
            format!("version 1 of {i:03}"),
        )
        .expect("write");
    }
    let limit = Sysctl::set("/proc/sys/fs/inotify/max_queued_events", 16);
    let watcher = watch_with_inotify(&state, &store, &log);
    drop(limit);
    wait_captured("initial state", "inotify", &state, &store, &scratch);

    // Stopped, the watcher reads no events: the writes' events overflow
    // its queue of 16.
    let pid = rustix::process::Pid::from_raw(watcher.0.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
    for i in 0..FILES {
        let file = OpenOptions::new()
            .write(true)
            .open(state.join(format!("f{i:03}")))
            .expect("open");
        file.write_all_at(b"2", 8).expect("write in place");
    }
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).expect("SIGCONT");
    wait_captured(
        "writes whose events overflowed the queue",
        "inotify",
        &state,
        &store,
        &scratch,
    );
    let said = fs::read_to_string(&log).expect("log");
    assert!(
        said.contains("overflowed"),
        "no overflow was reported: {said}"
    );
}

/// inotify watches each directory; once the per-user limit on watches is
/// reached, new directories get none and report nothing, so the trees must
/// be walked from then on.
#[test]
fn writes_in_directories_inotify_cannot_watch_reach_the_store() {
    let Scene {
        _serial,
        _work,
        state,
        scratch,
        store,
        log,
    } = scene();
    let watcher = watch_with_inotify(&state, &store, &log);
    let limit = Sysctl::set(
        "/proc/sys/fs/inotify/max_user_watches",
        watches_in_use() + 10,
    );
    for d in 0..50 {
        fs::create_dir(state.join(format!("d{d:02}"))).expect("mkdir");
    }
    wait_logged(&log, "cannot watch every directory");
    drop(limit);
    wait_captured("new directories", "inotify", &state, &store, &scratch);
    // The walk the lost watches asked for is done by the time the debounce
    // and the maximum latency have passed twice over.
    std::thread::sleep(Duration::from_secs(2));
    // A new file in the last directory, which got no watch: no event.
    fs::write(state.join("d49/unwatched"), b"written where no watch is").expect("write");
    wait_captured(
        "a file in a directory without a watch",
        "inotify",
        &state,
        &store,
        &scratch,
    );
    drop(watcher);
}

/// inotify watches held now by root's processes (the limit is per user).
fn watches_in_use() -> u64 {
    let mut watches = 0;
    for process in fs::read_dir("/proc").expect("/proc").flatten() {
        let owned_by_root = fs::read_to_string(process.path().join("status"))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .map(|uids| uids.split_whitespace().next() == Some("0"))
            })
            .unwrap_or(false);
        let Ok(fds) = fs::read_dir(process.path().join("fdinfo")) else {
            continue;
        };
        if !owned_by_root {
            continue;
        }
        for fd in fds.flatten() {
            watches += fs::read_to_string(fd.path())
                .map(|info| {
                    info.lines()
                        .filter(|l| l.starts_with("inotify wd:"))
                        .count() as u64
                })
                .unwrap_or(0);
        }
    }
    watches
}

/// Submits the write `sqe` on `ring`, waits for it, and checks it wrote
/// all `len` bytes (into the file `name`).
///
/// # Safety
/// The buffer and the descriptor `sqe` names must stay valid until it
/// returns.
unsafe fn uring_submit(
    ring: &mut io_uring::IoUring,
    sqe: &io_uring::squeue::Entry,
    len: usize,
    name: &str,
) {
    // SAFETY: the caller keeps the buffer and descriptor valid until the
    // completion, which is waited for here.
    let done = unsafe { common::uring_complete(ring, sqe) };
    assert_eq!(done, len as i32, "io_uring write of {name}");
}

/// Starts `watch` with the eBPF backend on `state` (as root `data`), its
/// rescan out of reach, waits for the initial state to be stored, and
/// returns the watcher with a check that fails unless the tree is in the
/// store within the maximum latency (1 s) plus a second and the time to
/// check.
fn watch_tracer_alone<'a>(
    state: &'a Path,
    store: &'a Path,
    scratch: &'a Path,
) -> (common::Reaped, impl Fn(&str) + 'a) {
    let watcher = common::Reaped(
        Command::new(BIN)
            .args([
                "watch",
                "--state-dir",
                &format!("data={}", s(state)),
                "--store",
                s(store),
                "--backend",
                "ebpf",
                "--debounce",
                "50ms",
                "--max-latency",
                "1s",
                "--rescan-interval",
                "1h",
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn watch"),
    );
    wait_captured("initial state", "ebpf", state, store, scratch);
    let check = move |what: &str| {
        wait_captured_within(Duration::from_secs(3), what, "ebpf", state, store, scratch)
    };
    (watcher, check)
}

/// Writes `text` at `offset` of `file` through `ring` (IORING_OP_WRITE with
/// `flags`), waits for it and checks it wrote everything.
fn uring_write(
    ring: &mut io_uring::IoUring,
    file: &fs::File,
    text: &[u8],
    offset: u64,
    flags: io_uring::squeue::Flags,
    name: &str,
) {
    use std::os::fd::AsRawFd;
    let sqe = io_uring::opcode::Write::new(
        io_uring::types::Fd(file.as_raw_fd()),
        text.as_ptr(),
        text.len() as u32,
    )
    .offset(offset)
    .build()
    .flags(flags);
    // SAFETY: `text` and `file` are borrowed for the whole call, which
    // waits for the completion.
    unsafe { uring_submit(ring, &sqe, text.len(), name) };
}

/// Stores to pages of the 64 KiB file `path` through one long-lived
/// shared mapping, each followed by `check`. Pages 0 and 5 are stored to
/// twice: the second store finds its page already writable, and no fault
/// tells the kernel of it.
fn stores_through_one_mapping(path: &Path, check: &impl Fn(&str)) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let len = 64 * 1024;
    // SAFETY: a fresh shared mapping of a 64 KiB file this test owns,
    // unmapped below; nothing else maps it.
    let map = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &file,
            0,
        )
    }
    .expect("mmap");
    for (round, page) in [0usize, 5, 9, 15, 0, 5].into_iter().enumerate() {
        // SAFETY: inside the mapping (16 pages of 4 KiB).
        let bytes = unsafe { std::slice::from_raw_parts_mut(map.cast::<u8>(), len) };
        let text = format!("store {round} through a map");
        bytes[page * 4096..page * 4096 + text.len()].copy_from_slice(text.as_bytes());
        check(&format!(
            "store {round}, to page {page}, of a long-lived shared mapping"
        ));
    }
    // SAFETY: the mapping made above, no longer used.
    unsafe { rustix::mm::munmap(map, len) }.expect("munmap");
}

/// On tmpfs, writeback never makes a mapping's pages read-only again: the
/// mapped file is read every second while its mapper lives.
#[test]
fn stores_through_a_long_lived_mapping_on_tmpfs_reach_the_store() {
    let _serial = serial();
    let work = tempfile::tempdir_in("/dev/shm").expect("tempdir on tmpfs");
    let state = work.path().join("state");
    fs::create_dir(&state).expect("mkdir");
    fs::write(state.join("mapped"), vec![b'.'; 64 * 1024]).expect("write");
    let store = work.path().join("store.dk");
    let scratch = work.path().join("scratch");
    let (_watcher, check) = watch_tracer_alone(&state, &store, &scratch);
    stores_through_one_mapping(&state.join("mapped"), &check);
}

/// Runs shell `script` in a mount namespace of its own (its mounts vanish
/// with it) and checks it succeeded.
fn in_own_mount_namespace(script: &str) {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .output()
        .expect("run unshare");
    assert!(out.status.success(), "{out:?}");
}

/// A `struct iocb` of the kernel's AIO interface (little-endian layout).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// A `struct io_event`.
#[repr(C)]
#[derive(Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// Writes `bytes` at `offset` of the existing file `path` through the
/// kernel's AIO syscalls (what libaio wraps): io_setup, io_submit,
/// io_getevents.
fn libaio_write(path: &Path, bytes: &[u8], offset: i64) {
    use std::os::fd::AsRawFd;
    const IOCB_CMD_PWRITE: u16 = 1;
    let file = OpenOptions::new().write(true).open(path).expect("open");
    let mut context: libc::c_ulong = 0;
    // SAFETY: io_setup writes the new context into `context`.
    let rc = unsafe { libc::syscall(libc::SYS_io_setup, 8, &mut context) };
    assert_eq!(rc, 0, "io_setup: {}", std::io::Error::last_os_error());
    let mut iocb = Iocb {
        aio_lio_opcode: IOCB_CMD_PWRITE,
        aio_fildes: file.as_raw_fd() as u32,
        aio_buf: bytes.as_ptr() as u64,
        aio_nbytes: bytes.len() as u64,
        aio_offset: offset,
        ..Iocb::default()
    };
    let mut list = [&mut iocb as *mut Iocb];
    // SAFETY: one valid iocb whose buffer and descriptor outlive the
    // request, which is waited for below.
    let rc = unsafe { libc::syscall(libc::SYS_io_submit, context, 1, list.as_mut_ptr()) };
    assert_eq!(rc, 1, "io_submit: {}", std::io::Error::last_os_error());
    let mut event = IoEvent::default();
    // SAFETY: room for one event; no timeout.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_getevents,
            context,
            1,
            1,
            &mut event,
            std::ptr::null_mut::<libc::timespec>(),
        )
    };
    assert_eq!(rc, 1, "io_getevents: {}", std::io::Error::last_os_error());
    assert_eq!(event.res, bytes.len() as i64, "the AIO write's result");
    // SAFETY: the context made above, with nothing in flight.
    unsafe { libc::syscall(libc::SYS_io_destroy, context) };
}

/// Writes into existing files that no write-family syscall names: through
/// io_uring (inline, from an io-wq worker, from a fixed buffer, and by an
/// SQPOLL thread), libaio, sendfile, splice and
/// copy_file_range; an O_DIRECT write, which bypasses the page cache; a
/// long-lived shared mapping written page by page; and changes made from
/// another mount namespace through a bind mount at another path, from a
/// chroot, through a symlinked path and by a relative path from a working
/// directory outside the tree. The eBPF tracer sees them in the kernel by
/// the ctime the kernel stamps on the inodes (the default hooks on ext4:
/// no syscall tracepoint); its rescan is pushed out of reach. Each must be
/// in the store within the maximum latency (1 s) plus a second and the
/// time to check.
#[test]
fn writes_no_syscall_names_and_changes_from_another_mount_namespace_reach_the_store() {
    use std::os::fd::AsRawFd;

    let _serial = serial();
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let scratch = work.path().join("scratch");
    let store = work.path().join("store.dk");
    fs::create_dir_all(state.join("sub")).expect("mkdir");
    for name in [
        "uring",
        "uring-async",
        "uring-fixed",
        "uring-sqpoll",
        "libaio",
        "sendfile",
        "splice",
        "direct",
        "copied",
        "mapped",
        "gone",
        "moved",
        "mode",
        "jailed",
        "linked",
    ] {
        fs::write(state.join(name), vec![b'.'; 64 * 1024]).expect("write");
    }
    let (_watcher, check) = watch_tracer_alone(&state, &store, &scratch);

    let mut ring = io_uring::IoUring::new(8).expect("io_uring");
    for (name, flags) in [
        ("uring", io_uring::squeue::Flags::empty()),
        ("uring-async", io_uring::squeue::Flags::ASYNC),
    ] {
        let file = OpenOptions::new()
            .write(true)
            .open(state.join(name))
            .expect("open");
        let text = format!("written by io_uring into {name}");
        uring_write(&mut ring, &file, text.as_bytes(), 4096, flags, name);
        check(&format!("io_uring write ({name})"));
    }

    {
        // From a registered (fixed) buffer.
        let file = OpenOptions::new()
            .write(true)
            .open(state.join("uring-fixed"))
            .expect("open");
        let text = b"written by io_uring from a fixed buffer".to_vec();
        let iovec = libc::iovec {
            iov_base: text.as_ptr() as *mut libc::c_void,
            iov_len: text.len(),
        };
        // SAFETY: `text` outlives the registration, which ends with `ring`.
        unsafe { ring.submitter().register_buffers(&[iovec]) }.expect("register buffers");
        let sqe = io_uring::opcode::WriteFixed::new(
            io_uring::types::Fd(file.as_raw_fd()),
            text.as_ptr(),
            text.len() as u32,
            0,
        )
        .offset(4096)
        .build();
        // SAFETY: `text` and `file` outlive the call.
        unsafe { uring_submit(&mut ring, &sqe, text.len(), "uring-fixed") };
        check("io_uring write from a fixed buffer");
    }
    {
        // SQPOLL: a kernel thread polls the queue; no syscall submits.
        let mut polled: io_uring::IoUring = io_uring::IoUring::builder()
            .setup_sqpoll(2000)
            .build(8)
            .expect("io_uring with SQPOLL");
        let file = OpenOptions::new()
            .write(true)
            .open(state.join("uring-sqpoll"))
            .expect("open");
        let text = b"written by io_uring's SQPOLL thread";
        uring_write(
            &mut polled,
            &file,
            text,
            4096,
            io_uring::squeue::Flags::empty(),
            "uring-sqpoll",
        );
        check("io_uring write by the SQPOLL thread");
    }
    libaio_write(
        &state.join("libaio"),
        b"written through libaio's io_submit",
        4096,
    );
    check("libaio (io_submit) write");

    let source = work.path().join("source");
    fs::write(&source, b"sent by sendfile and spliced by splice").expect("source");
    {
        let from = fs::File::open(&source).expect("open source");
        let to = OpenOptions::new()
            .write(true)
            .open(state.join("sendfile"))
            .expect("open");
        let mut at = 0u64;
        rustix::fs::seek(&to, rustix::fs::SeekFrom::Start(1000)).expect("seek");
        let sent = rustix::fs::sendfile(&to, &from, Some(&mut at), 38).expect("sendfile");
        assert_eq!(sent, 38);
    }
    check("sendfile into an existing file");
    {
        let from = fs::File::open(&source).expect("open source");
        let to = OpenOptions::new()
            .write(true)
            .open(state.join("splice"))
            .expect("open");
        let (read_end, write_end) = rustix::pipe::pipe().expect("pipe");
        let mut at_in = 0u64;
        let moved = rustix::pipe::splice(
            &from,
            Some(&mut at_in),
            &write_end,
            None,
            38,
            rustix::pipe::SpliceFlags::empty(),
        )
        .expect("splice into the pipe");
        let mut at_out = 2000u64;
        let landed = rustix::pipe::splice(
            &read_end,
            None,
            &to,
            Some(&mut at_out),
            moved,
            rustix::pipe::SpliceFlags::empty(),
        )
        .expect("splice into the file");
        assert_eq!(landed, 38);
    }
    check("splice into an existing file");
    {
        let from = fs::File::open(&source).expect("open source");
        let to = OpenOptions::new()
            .write(true)
            .open(state.join("copied"))
            .expect("open");
        let (mut at_in, mut at_out) = (0u64, 3000u64);
        let copied =
            rustix::fs::copy_file_range(&from, Some(&mut at_in), &to, Some(&mut at_out), 38)
                .expect("copy_file_range");
        assert_eq!(copied, 38);
    }
    check("copy_file_range into an existing file");
    stores_through_one_mapping(&state.join("mapped"), &check);
    {
        // O_DIRECT: around the page cache; a 4 KiB-aligned buffer and offset.
        let file = rustix::fs::open(
            state.join("direct"),
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::DIRECT,
            rustix::fs::Mode::empty(),
        )
        .expect("open O_DIRECT");
        let mut buffer = vec![0u8; 3 * 4096];
        let start = buffer.as_ptr().align_offset(4096);
        let block = &mut buffer[start..start + 4096];
        block.fill(b'D');
        let wrote = rustix::io::pwrite(&file, block, 8192).expect("O_DIRECT pwrite");
        assert_eq!(wrote, 4096);
    }
    check("O_DIRECT write");

    // Another mount namespace that sees the tree at another path only.
    let elsewhere = work.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("mkdir");
    let script = format!(
        "mount --bind {state} {at} && cd {at} && rm gone && mv moved sub/moved && \
         chmod 600 mode && mkdir -p new/deeper && echo made > new/deeper/file",
        state = s(&state),
        at = s(&elsewhere)
    );
    in_own_mount_namespace(&script);
    assert!(
        !state.join("gone").exists() && state.join("sub/moved").exists(),
        "the other namespace changed the tree"
    );
    check("rm, mv, chmod, mkdir and a new file from another mount namespace");

    // A chroot whose only view of the tree is a bind mount at /data.
    let jail = work.path().join("jail");
    fs::create_dir_all(jail.join("usr")).expect("mkdir");
    fs::create_dir_all(jail.join("data")).expect("mkdir");
    for dir in ["bin", "lib", "lib64", "sbin"] {
        std::os::unix::fs::symlink(format!("usr/{dir}"), jail.join(dir)).expect("symlink");
    }
    let script = format!(
        "mount --bind /usr {jail}/usr && mount --bind {state} {jail}/data && \
         chroot {jail} /bin/sh -c 'echo jailed >> /data/jailed && mkdir /data/from-jail && \
         echo x > /data/from-jail/file && rm /data/sub/moved'",
        jail = s(&jail),
        state = s(&state)
    );
    in_own_mount_namespace(&script);
    assert!(
        state.join("from-jail/file").exists(),
        "the chroot changed the tree"
    );
    check("an append, a mkdir, a new file and a removal from a chroot");

    // Through a symlink to the tree, and by a relative path from outside.
    let link = work.path().join("link");
    std::os::unix::fs::symlink(&state, &link).expect("symlink");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo linked >> {link}/linked && mv {link}/linked {link}/relinked && \
             cd {work} && echo relative > state/relative && chmod 640 state/relative",
            link = s(&link),
            work = s(work.path())
        ))
        .output()
        .expect("run sh");
    assert!(out.status.success(), "{out:?}");
    check("changes through a symlinked path and a relative path from outside the tree");
}

/// A tree on overlayfs, as in a container's root file system: a file only
/// in the image layer rewritten (copied up), one removed (a whiteout), one
/// written through io_uring, and new entries, all seen by the ctime hooks
/// on the upper layer's inodes, with the rescan out of reach.
#[test]
fn changes_to_a_tree_on_overlayfs_reach_the_store() {
    let _serial = serial();
    let work = tempfile::tempdir().expect("tempdir");
    let overlay = common::Mounted::overlay(work.path(), |lower, upper| {
        fs::create_dir_all(lower.join("data")).expect("mkdir");
        fs::create_dir_all(upper.join("data")).expect("mkdir");
        for name in ["image-file", "image-gone"] {
            fs::write(lower.join("data").join(name), vec![b'i'; 8192]).expect("write");
        }
        fs::write(upper.join("data/upper-file"), vec![b'u'; 8192]).expect("write");
    });
    let merged = overlay.0.clone();
    let state = merged.join("data");
    let store = work.path().join("store.dk");
    let scratch = work.path().join("scratch");
    let (_watcher, check) = watch_tracer_alone(&state, &store, &scratch);

    OpenOptions::new()
        .write(true)
        .open(state.join("image-file"))
        .expect("open")
        .write_all_at(b"rewritten over the image", 100)
        .expect("pwrite");
    check("a file of the image layer rewritten");
    fs::remove_file(state.join("image-gone")).expect("rm");
    check("a file of the image layer removed");
    {
        let file = OpenOptions::new()
            .write(true)
            .open(state.join("upper-file"))
            .expect("open");
        let mut ring = io_uring::IoUring::new(8).expect("io_uring");
        let text = b"written by io_uring through the overlay";
        uring_write(
            &mut ring,
            &file,
            text,
            4096,
            io_uring::squeue::Flags::empty(),
            "upper-file",
        );
    }
    check("an io_uring write through the overlay");
    fs::create_dir(state.join("new")).expect("mkdir");
    fs::write(state.join("new/file"), b"made in the container").expect("write");
    check("a new directory and file");
}
