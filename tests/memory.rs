//! Memory stays bounded whatever the file size: capturing and rebuilding a
//! file of several hundred MiB must not hold it in memory. Peak RSS is read
//! from `/proc/PID/status` (VmHWM) while the real binary runs.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::process::Command;
use std::time::Duration;

use common::{s, Rng, BIN};

/// Runs diffkeeper and returns its peak resident set in KiB.
fn peak_rss_kib(args: &[&str]) -> u64 {
    let mut child = Command::new(BIN)
        .args(args)
        .spawn()
        .expect("spawn diffkeeper");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        // VmHWM is the high-water mark so far; the last reading before exit
        // is at most a few milliseconds short of the final one.
        if let Ok(status) = fs::read_to_string(&status_path) {
            if let Some(kib) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
            {
                peak = peak.max(kib);
            }
        }
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "diffkeeper {args:?} failed");
            return peak;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn capture_and_replay_of_a_large_file_use_bounded_memory() {
    const FILE_MIB: usize = 384;
    const LIMIT_MIB: u64 = 64;
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    fs::create_dir_all(&state).expect("mkdir");
    let store = work.path().join("store.dk");
    let big = state.join("disk.img");
    let mut rng = Rng::new(42);
    let mut file = fs::File::create(&big).expect("create");
    for _ in 0..FILE_MIB {
        file.write_all(&rng.bytes(1 << 20)).expect("write");
    }
    drop(file);
    let state_arg = format!("data={}", s(&state));

    let first = peak_rss_kib(&["snapshot", "--state-dir", &state_arg, "--store", s(&store)]);
    let mut file = fs::OpenOptions::new().write(true).open(&big).expect("open");
    file.seek(SeekFrom::Start(((FILE_MIB as u64) << 20) / 2))
        .expect("seek");
    file.write_all(&rng.bytes(1 << 20)).expect("edit");
    drop(file);
    let second = peak_rss_kib(&["snapshot", "--state-dir", &state_arg, "--store", s(&store)]);
    let target = work.path().join("fresh");
    let replay = peak_rss_kib(&[
        "replay",
        "--state-dir",
        &format!("data={}", s(&target)),
        "--store",
        s(&store),
    ]);
    assert!(
        fs::read(&big).expect("read") == fs::read(target.join("disk.img")).expect("read"),
        "replayed content differs"
    );

    for (what, kib) in [
        ("first snapshot", first),
        ("delta snapshot", second),
        ("replay", replay),
    ] {
        eprintln!(
            "{what} of a {FILE_MIB} MiB file: peak RSS {} MiB",
            kib >> 10
        );
        assert!(kib > 0, "{what}: no VmHWM reading");
        assert!(
            kib < LIMIT_MIB << 10,
            "{what} of a {FILE_MIB} MiB file peaked at {} MiB (limit {LIMIT_MIB} MiB)",
            kib >> 10
        );
    }
}
