//! Fuzzing the store's records and file, on the stable toolchain, for a
//! bounded number of cases (proptest; `PROPTEST_CASES` raises it for a
//! long run). A failing input is shrunk and saved by proptest in
//! `tests/fuzz.proptest-regressions`, which is committed and replayed first
//! by every later run: the crashes found stay as fixtures.
//!
//! What must hold:
//! - every record decoder returns a value or an error for any bytes;
//! - a delta decodes or fails for any reference, payload and length;
//! - a store file damaged anywhere makes DiffKeeper's own code return
//!   errors, never panic. redb meets some damage with a failed internal
//!   check (a panic in redb's code); those are allowed here because the
//!   binary turns them into exit status 1 naming the store
//!   (`tests/hostile.rs` checks that end to end).

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use diffkeeper::store::schema::{
    self, BatchRecord, ChunkRecord, CutRecord, RetentionRecord, SeenRecord, VersionRecord,
};
use diffkeeper::store::Store;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn record_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = VersionRecord::decode(&bytes, "v", |_| Ok([0; 32]));
        let _ = schema::decode::<BatchRecord>(&bytes, "b");
        let _ = ChunkRecord::decode(&bytes, "c");
        let _ = schema::decode::<CutRecord>(&bytes, "cut");
        let _ = schema::decode::<SeenRecord>(&bytes, "seen");
        let _ = schema::decode::<RetentionRecord>(&bytes, "r");
    }

    #[test]
    fn bases_decode_or_fail_for_any_input(
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
        len in 0usize..=schema::CHUNK_MAX,
    ) {
        let mut out = Vec::new();
        let _ = diffkeeper::store::codec::decode_base_into(&payload, len, None, &mut out);
        prop_assert!(out.len() <= len + 1);
    }

    #[test]
    fn deltas_decode_or_fail_for_any_input(
        reference in proptest::collection::vec(any::<u8>(), 0..2048),
        delta in proptest::collection::vec(any::<u8>(), 0..2048),
        len in 0usize..=schema::CHUNK_MAX,
    ) {
        let mut out = Vec::new();
        let _ = diffkeeper::store::codec::apply_delta_into(&reference, &delta, len, &mut out);
        prop_assert!(out.len() <= len + 1);
    }
}

/// A store's file and its payload segments (name, bytes).
type StoreBytes = (Vec<u8>, Vec<(std::ffi::OsString, Vec<u8>)>);

/// Writes a store's file and its segments at `path`.
fn write_store(path: &Path, file: &[u8], segments: &[(std::ffi::OsString, Vec<u8>)]) {
    std::fs::write(path, file).expect("write");
    let dir = diffkeeper::store::segments::dir_of(path);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("mkdir segments");
    for (name, bytes) in segments {
        std::fs::write(dir.join(name), bytes).expect("write a segment");
    }
}

/// A small store with files of every kind, deltas and several batches.
fn good_store() -> &'static (tempfile::TempDir, StoreBytes) {
    static STORE: OnceLock<(tempfile::TempDir, StoreBytes)> = OnceLock::new();
    STORE.get_or_init(|| {
        let work = tempfile::tempdir().expect("tempdir");
        let state = work.path().join("state");
        std::fs::create_dir_all(state.join("d")).expect("mkdir");
        let store = work.path().join("store.dk");
        let mut bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for round in 0..3u8 {
            bytes[1000 + usize::from(round) * 5000] = round;
            std::fs::write(state.join("d/big"), &bytes).expect("write");
            std::fs::write(state.join("small"), [round; 10]).expect("write");
            let _ = std::fs::remove_file(state.join("link"));
            std::os::unix::fs::symlink("small", state.join("link")).expect("symlink");
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_diffkeeper"))
                .args(["snapshot", "--state-dir"])
                .arg(format!("data={}", state.display()))
                .arg("--store")
                .arg(&store)
                .output()
                .expect("snapshot");
            assert!(out.status.success(), "{out:?}");
        }
        let file = std::fs::read(&store).expect("read");
        let segments = std::fs::read_dir(diffkeeper::store::segments::dir_of(&store))
            .expect("segments")
            .map(|e| {
                let e = e.expect("segment");
                (
                    e.file_name(),
                    std::fs::read(e.path()).expect("read a segment"),
                )
            })
            .collect();
        (work, (file, segments))
    })
}

/// Where the last panic came from.
static PANICKED_AT: Mutex<Option<String>> = Mutex::new(None);

/// Reads everything a command can read from the store at `path`.
fn read_everything(path: &Path) -> anyhow::Result<()> {
    let Some(store) = Store::open_read_only(path)? else {
        return Ok(());
    };
    let reader = store.reader()?;
    for root in reader.roots()? {
        for entry in reader.latest(&root)? {
            if entry.version.kind == schema::EntryKind::File {
                let _ = reader.write_content(&entry.version, &mut std::io::sink());
            }
        }
        for (batch, _) in reader.batches()? {
            let _ = reader.state_at(&root, batch);
        }
    }
    let _ = diffkeeper::verify::verify(path);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn a_damaged_store_file_never_makes_diffkeeper_s_own_code_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
    ) {
        let (work, (good, segments)) = good_store();
        let mut bytes = good.clone();
        for (at, xor) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        let path = work.path().join(format!("damaged-{}.dk", std::process::id()));
        write_store(&path, &bytes, segments);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|info| {
            if let Ok(mut at) = PANICKED_AT.lock() {
                *at = Some(format!("{info}"));
            }
        }));
        let result = std::panic::catch_unwind(|| read_everything(&path));
        std::panic::set_hook(previous);
        if result.is_err() {
            let at = PANICKED_AT.lock().ok().and_then(|a| a.clone()).unwrap_or_default();
            prop_assert!(
                at.contains("/redb-"),
                "DiffKeeper's own code panicked on a damaged store: {at}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn a_damaged_payload_segment_is_caught_without_a_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let (work, (good, segments)) = good_store();
        let mut damaged = segments.clone();
        for (at, xor) in &flips {
            let (_, bytes) = &mut damaged[0];
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        if truncate {
            let (_, bytes) = &mut damaged[0];
            bytes.truncate(cut.index(bytes.len()));
        }
        let path = work.path().join(format!("segment-{}.dk", std::process::id()));
        write_store(&path, good, &damaged);
        let result = std::panic::catch_unwind(|| read_everything(&path));
        prop_assert!(result.is_ok(), "a damaged segment made a reader panic");
        // A segment cut short loses payload a chunk needs: verify says so.
        // (A flipped byte may land where a frame's decoding ignores it.)
        if truncate {
            let report = diffkeeper::verify::verify(&path);
            let caught = report.map(|r| !r.problems.is_empty()).unwrap_or(true);
            prop_assert!(caught, "verify found nothing wrong in a truncated segment");
        }
    }
}
