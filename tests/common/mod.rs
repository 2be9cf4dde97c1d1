//! Shared by the end-to-end tests: running the real binary, seeded random
//! data, and reading a whole tree for comparison.
#![allow(dead_code)]

pub mod container;
pub mod daemon;
pub mod edit;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_diffkeeper");

/// A child process killed when dropped, so a failing test leaves none behind.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs diffkeeper; fails the test if it panicked.
pub fn diffkeeper(args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run diffkeeper");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "diffkeeper {args:?} panicked: {stderr}"
    );
    out
}

/// `snapshot --state-dir ROOT --store STORE --json`, required to succeed.
pub fn snapshot_json(root: &str, store: &Path) -> serde_json::Value {
    json(&[
        "snapshot",
        "--state-dir",
        root,
        "--store",
        s(store),
        "--json",
    ])
}

/// A temporary directory with an empty state directory `state` in it, the
/// path of a store beside it, and the `data=STATE` argument naming it.
pub fn workspace() -> (tempfile::TempDir, PathBuf, PathBuf, String) {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    let store = work.path().join("store.dk");
    let root = format!("data={}", s(&state));
    (work, state, store, root)
}

/// Runs diffkeeper and requires success.
pub fn ok(args: &[&str]) -> String {
    let out = diffkeeper(args);
    assert!(
        out.status.success(),
        "diffkeeper {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether process `pid` still exists (as anything but a zombie).
pub fn alive(pid: impl std::fmt::Display) -> bool {
    fs::read_to_string(format!("/proc/{}/stat", pid.to_string().trim()))
        .map(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A file's mtime in nanoseconds, as the store keeps it.
pub fn mtime_ns(meta: &fs::Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// Waits until `done`, failing the test after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The batches a store holds, as `stats` counts them (0 while there is no
/// store, or it is held too long).
pub fn batch_count(store: &Path) -> u64 {
    let out = Command::new(BIN)
        .args(["stats", "--json", "--store", s(store)])
        .output()
        .expect("stats");
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["batches"].as_u64())
        .unwrap_or(0)
}

/// Runs diffkeeper expecting failure; returns stderr.
pub fn refused(args: &[&str]) -> String {
    let out = diffkeeper(args);
    assert!(
        !out.status.success(),
        "diffkeeper {args:?} should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs diffkeeper and parses its JSON output.
pub fn json(args: &[&str]) -> serde_json::Value {
    let stdout = ok(args);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("diffkeeper {args:?} printed no JSON ({e}): {stdout}"))
}

pub fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// The directory of a store's payload segments.
pub fn segments_of(store: &Path) -> std::path::PathBuf {
    let mut name = store.as_os_str().to_os_string();
    name.push(".payload");
    name.into()
}

/// Copies a store, its file and its payload segments, over `to`'s.
#[allow(dead_code)]
pub fn copy_store(from: &Path, to: &Path) {
    fs::copy(from, to).expect("copy the store file");
    let (from_dir, to_dir) = (segments_of(from), segments_of(to));
    let _ = fs::remove_dir_all(&to_dir);
    if from_dir.exists() {
        fs::create_dir(&to_dir).expect("mkdir segments");
        for entry in fs::read_dir(&from_dir).expect("segments") {
            let entry = entry.expect("segment");
            fs::copy(entry.path(), to_dir.join(entry.file_name())).expect("copy a segment");
        }
    }
}

/// A small seeded PRNG (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
    pub fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: [&str; 8] = [
            "alpha ", "beta ", "gamma\n", "delta ", "epsilon ", "zeta\n", "eta ", "theta ",
        ];
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(WORDS[self.below(8) as usize].as_bytes());
        }
        out.truncate(len);
        out
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }
}

/// What one path is, for comparing trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        mode: u32,
        mtime_ns: i64,
        content: Vec<u8>,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: Vec<u8>,
    },
}

/// Every path under `root` (relative, raw bytes) and what it is.
pub fn read_tree(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        {
            let path = entry.expect("dir entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .as_os_str()
                .as_bytes()
                .to_vec();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let node = if meta.file_type().is_symlink() {
                Node::Symlink {
                    target: fs::read_link(&path)
                        .expect("readlink")
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                }
            } else if meta.is_dir() {
                stack.push(path.clone());
                Node::Dir {
                    mode: meta.permissions().mode() & 0o7777,
                }
            } else {
                Node::File {
                    mode: meta.permissions().mode() & 0o7777,
                    mtime_ns: mtime_ns(&meta),
                    content: fs::read(&path).expect("read"),
                }
            };
            out.insert(rel, node);
        }
    }
    out
}

/// Asserts two trees are equal, naming the first difference.
pub fn assert_same_tree(
    expected: &BTreeMap<Vec<u8>, Node>,
    got: &BTreeMap<Vec<u8>, Node>,
    what: &str,
) {
    for (path, node) in expected {
        let shown = String::from_utf8_lossy(path);
        match got.get(path) {
            None => panic!("{what}: {shown} is missing"),
            Some(other) if other != node => {
                let describe = |n: &Node| match n {
                    Node::File {
                        mode,
                        mtime_ns,
                        content,
                    } => {
                        format!(
                            "file mode {mode:o} mtime {mtime_ns} {} bytes",
                            content.len()
                        )
                    }
                    other => format!("{other:?}"),
                };
                let first_diff = match (node, other) {
                    (Node::File { content: a, .. }, Node::File { content: b, .. }) => a
                        .iter()
                        .zip(b.iter())
                        .position(|(x, y)| x != y)
                        .map(|i| format!(", first differing byte at {i}")),
                    _ => None,
                };
                panic!(
                    "{what}: {shown} differs: expected {}, got {}{}",
                    describe(node),
                    describe(other),
                    first_diff.unwrap_or_default()
                );
            }
            Some(_) => {}
        }
    }
    for path in got.keys() {
        assert!(
            expected.contains_key(path),
            "{what}: unexpected {}",
            String::from_utf8_lossy(path)
        );
    }
}

/// A fresh directory path (not created) under `base`.
pub fn fresh(base: &Path, name: &str) -> PathBuf {
    let path = base.join(name);
    assert!(!path.exists());
    path
}

/// A file system mounted for a test, unmounted when dropped.
pub struct Mounted(pub PathBuf);

impl Mounted {
    /// `mount -t fstype [-o options] source at`.
    pub fn new(fstype: &str, options: Option<&str>, source: &str, at: &Path) -> Mounted {
        let mut mount = Command::new("mount");
        mount.args(["-t", fstype]);
        if let Some(options) = options {
            mount.args(["-o", options]);
        }
        let status = mount.arg(source).arg(at).status().expect("run mount");
        assert!(
            status.success(),
            "cannot mount {fstype} at {}",
            at.display()
        );
        Mounted(at.to_path_buf())
    }

    /// An overlayfs under `base`: `base/lower` and `base/upper` (made here,
    /// for the caller to fill first through `fill`), merged at
    /// `base/merged`, which is returned with the guard.
    pub fn overlay(base: &Path, fill: impl FnOnce(&Path, &Path)) -> Mounted {
        let [lower, upper, work, merged] =
            ["lower", "upper", "work", "merged"].map(|d| base.join(d));
        for dir in [&lower, &upper, &work, &merged] {
            fs::create_dir(dir).expect("mkdir");
        }
        fill(&lower, &upper);
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        Mounted::new("overlay", Some(&options), "overlay", &merged)
    }

    /// A new ext4 of `mib` MiB made in `base/ext4.img` and mounted (loop)
    /// at `base/mnt`, which is returned with the guard. Under 128 MiB it
    /// has one block group, so a new file takes the lowest free inode
    /// number wherever its directory is: on a long-used file system two
    /// directories may sit in groups of their own.
    pub fn ext4(base: &Path, mib: u64) -> Mounted {
        let image = base.join("ext4.img");
        let at = base.join("mnt");
        fs::create_dir(&at).expect("mkdir");
        fs::File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .expect("make the image");
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status()
            .expect("run mkfs.ext4");
        assert!(status.success(), "mkfs.ext4 {} failed", image.display());
        let source = image.to_str().expect("a UTF-8 temporary path");
        Mounted::new("ext4", Some("loop"), source, &at)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Queues `sqe`, waits for its completion and returns its result.
///
/// # Safety
/// Whatever `sqe` points to (buffers, paths, descriptors) must stay valid
/// until this returns.
pub unsafe fn uring_complete(ring: &mut io_uring::IoUring, sqe: &io_uring::squeue::Entry) -> i32 {
    // SAFETY: the caller keeps what the entry points to valid; the
    // completion is waited for below, before anything is freed.
    unsafe { ring.submission().push(sqe) }.expect("queue the entry");
    ring.submit().expect("submit");
    // The wait ends early when the cgroup freezer stops and thaws this
    // task (io_uring_enter returns what it submitted, or EINTR): wait again.
    loop {
        if let Some(done) = ring.completion().next() {
            return done.result();
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => panic!("wait for the completion: {e}"),
        }
    }
}
