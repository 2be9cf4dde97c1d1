//! A snapshot killed with SIGKILL in the middle of a batch loses only that
//! batch: the store still opens, verifies, and replays the last committed
//! state exactly.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{diffkeeper, Rng, BIN};

fn read_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    common::read_tree(root)
        .into_iter()
        .filter_map(|(path, node)| match node {
            common::Node::File { content, .. } => {
                Some((String::from_utf8_lossy(&path).into_owned(), content))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn sigkill_during_a_batch_loses_only_that_batch() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    let store_arg = store.to_str().expect("utf-8");
    let state_arg = format!("data={}", state.display());
    for i in 0..50 {
        let dir = state.join(format!("d{}", i % 5));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(
            dir.join(format!("f{i}")),
            Rng::new(i as u64 + 1).bytes(10_000 + i * 100),
        )
        .expect("write");
    }
    let first = diffkeeper(&["snapshot", "--state-dir", &state_arg, "--store", store_arg]);
    assert!(first.status.success(), "{first:?}");
    let committed = read_tree(&state);

    // A batch big enough to be caught in the middle.
    let mut killed_mid_batch = false;
    for size_mib in [256usize, 768] {
        for i in 0..4 {
            fs::write(
                state.join(format!("big{i}.bin")),
                Rng::new(1000 + i as u64).bytes(size_mib << 18),
            )
            .expect("write big");
        }
        let size_before = fs::metadata(&store).expect("store").len();
        let mut child = Command::new(BIN)
            .args(["snapshot", "--state-dir", &state_arg, "--store", store_arg])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn snapshot");
        // Kill it once it is writing: the store file starts to grow.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && fs::metadata(&store).map(|m| m.len()).unwrap_or(0) <= size_before
            && child.try_wait().expect("try_wait").is_none()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        if child.try_wait().expect("try_wait").is_none() {
            child.kill().expect("SIGKILL");
            child.wait().expect("wait");
            killed_mid_batch = true;
            break;
        }
    }
    assert!(
        killed_mid_batch,
        "the snapshot finished before it could be killed"
    );

    let verify = diffkeeper(&["verify", "--store", store_arg]);
    assert!(verify.status.success(), "verify after SIGKILL: {verify:?}");
    let fresh = work.path().join("fresh");
    let replay = diffkeeper(&[
        "replay",
        "--state-dir",
        &format!("data={}", fresh.display()),
        "--store",
        store_arg,
    ]);
    assert!(replay.status.success(), "replay after SIGKILL: {replay:?}");
    assert!(
        read_tree(&fresh) == committed,
        "replay after SIGKILL must give exactly the last committed batch"
    );

    // And the store keeps working: the next snapshot takes the whole state.
    let again = diffkeeper(&["snapshot", "--state-dir", &state_arg, "--store", store_arg]);
    assert!(again.status.success(), "{again:?}");
    let fresh2 = work.path().join("fresh2");
    let replay = diffkeeper(&[
        "replay",
        "--state-dir",
        &format!("data={}", fresh2.display()),
        "--store",
        store_arg,
    ]);
    assert!(replay.status.success(), "{replay:?}");
    assert!(
        read_tree(&fresh2) == read_tree(&state),
        "full state after the retried snapshot"
    );
}
