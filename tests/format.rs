//! The store format across releases: every build must read the stores
//! that each released schema wrote (`tests/fixtures/store-vN.redb`, made by
//! `tests/fixtures/make-store.sh` with that schema's build) back to the
//! trees they held (`manifest-vN-batchB.txt`), verify them, and go on
//! writing to them after upgrading them in place.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{json, ok, s};
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The lines `make-store.sh` writes for the tree at `root`, sorted.
fn manifest_of(root: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let rel = path.strip_prefix(root).expect("under root");
            let rel = hex(rel.as_os_str().as_bytes());
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("readlink");
                lines.push(format!("l {} {rel}", hex(target.as_os_str().as_bytes())));
            } else if meta.is_dir() {
                lines.push(format!("d {mode:o} {rel}"));
                stack.push(path);
            } else {
                let digest = Sha256::digest(fs::read(&path).expect("read"));
                lines.push(format!(
                    "f {mode:o} {}.{:09} {} {rel}",
                    meta.mtime(),
                    meta.mtime_nsec(),
                    hex(&digest)
                ));
            }
        }
    }
    lines.sort();
    lines
}

/// A released schema's fixture: its number, its store, and each batch
/// with the manifest of the tree it restores to.
type Fixture = (u32, PathBuf, Vec<(u64, Vec<String>)>);

fn released() -> Vec<Fixture> {
    let mut out = Vec::new();
    for schema in 1.. {
        let store = fixtures().join(format!("store-v{schema}.redb"));
        if !store.exists() {
            break;
        }
        let mut batches = Vec::new();
        for entry in fs::read_dir(fixtures()).expect("fixtures") {
            let name = entry.expect("entry").file_name();
            let name = name.to_string_lossy();
            let Some(batch) = name
                .strip_prefix(&format!("manifest-v{schema}-batch"))
                .and_then(|rest| rest.strip_suffix(".txt"))
            else {
                continue;
            };
            let text = fs::read_to_string(fixtures().join(name.as_ref())).expect("manifest");
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            batches.push((batch.parse().expect("batch number"), lines));
        }
        batches.sort();
        assert!(!batches.is_empty(), "no manifests for schema {schema}");
        out.push((schema, store, batches));
    }
    assert!(
        !out.is_empty(),
        "no store fixtures in {}",
        fixtures().display()
    );
    out
}

/// The schema this build writes.
const SCHEMA: u32 = diffkeeper::store::schema::SCHEMA_VERSION;

/// Each payload segment of the store at `store` (schema 3 and later), by
/// name, with its bytes.
fn segment_bytes(store: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let Ok(dir) = fs::read_dir(common::segments_of(store)) else {
        return Vec::new();
    };
    let mut out: Vec<_> = dir
        .map(|entry| {
            let entry = entry.expect("a segment");
            (
                entry.file_name(),
                fs::read(entry.path()).expect("read a segment"),
            )
        })
        .collect();
    out.sort();
    out
}

/// `restore --batch BATCH --to TO`, required to succeed.
fn restore_batch(store: &Path, batch: u64, to: &Path) {
    ok(&[
        "restore",
        "--store",
        s(store),
        "--batch",
        &batch.to_string(),
        "--to",
        s(to),
    ]);
}

/// The schema numbers the store at `path` records.
fn schema_of(path: &Path) -> (u32, Option<u32>) {
    use redb::{ReadableDatabase, TableDefinition};
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
    let db = redb::Database::open(path).expect("open");
    let txn = db.begin_read().expect("read");
    let meta = txn.open_table(META).expect("meta");
    let number = |key: &str| {
        meta.get(key)
            .expect("get")
            .map(|v| u32::from_le_bytes(v.value().try_into().expect("a 4-byte number")))
    };
    (
        number("schema_version").expect("schema_version"),
        number("min_reader_version"),
    )
}

#[test]
fn stores_written_by_every_released_schema_read_back_whole() {
    let work = tempfile::tempdir().expect("tempdir");
    for (schema, fixture, batches) in released() {
        // Read where it lies, never written: a copy, read-only.
        let store = work.path().join(format!("v{schema}.redb"));
        common::copy_store(&fixture, &store);
        fs::set_permissions(&store, fs::Permissions::from_mode(0o444)).expect("chmod");
        let verified = ok(&["verify", "--store", s(&store)]);
        assert!(verified.contains("all hashes match"), "{verified}");
        let timeline = json(&["log", "--store", s(&store), "--batches", "--json"]);
        let listed: Vec<u64> = timeline
            .as_array()
            .expect("batches")
            .iter()
            .map(|b| b["batch"].as_u64().expect("batch id"))
            .collect();
        let expected: Vec<u64> = batches.iter().map(|(b, _)| *b).collect();
        assert_eq!(listed, expected, "schema {schema}: batches listed");
        for (batch, manifest) in &batches {
            let to = work.path().join(format!("v{schema}-b{batch}"));
            restore_batch(&store, *batch, &to);
            assert_eq!(
                &manifest_of(&to),
                manifest,
                "schema {schema}, batch {batch}: the restored tree differs from the manifest"
            );
        }
        assert_eq!(
            fs::read(&store).expect("read"),
            fs::read(&fixture).expect("read"),
            "schema {schema}: reading must not change the store"
        );
        assert_eq!(
            segment_bytes(&store),
            segment_bytes(&fixture),
            "schema {schema}: reading must not change the payload segments"
        );
    }
}

#[test]
fn an_older_store_is_upgraded_when_written_and_keeps_its_history() {
    let work = tempfile::tempdir().expect("tempdir");
    for (schema, fixture, batches) in released() {
        let store = work.path().join(format!("v{schema}.redb"));
        common::copy_store(&fixture, &store);
        let (last, manifest) = batches.last().expect("a batch");
        // The fixture's two roots, as its last batch left them.
        let tree = work.path().join(format!("tree-v{schema}"));
        restore_batch(&store, *last, &tree);
        assert_eq!(&manifest_of(&tree), manifest);
        let (data, cache) = (tree.join("data"), tree.join("cache"));
        fs::write(data.join("new.txt"), b"written after the upgrade").expect("write");
        let roots = [format!("data={}", s(&data)), format!("cache={}", s(&cache))];
        let snap = json(&[
            "snapshot",
            "--store",
            s(&store),
            "--state-dir",
            &roots[0],
            "--state-dir",
            &roots[1],
            "--json",
        ]);
        // The new file, and under schema 1 the two state directories
        // themselves (schema 2 keeps their owner and mode as the path "").
        let new = if schema == 1 { 3 } else { 1 };
        assert_eq!(snap["new"], new, "schema {schema}: {snap}");
        assert_eq!(
            schema_of(&store),
            (SCHEMA, Some(SCHEMA)),
            "schema {schema}: upgraded in place on the first write"
        );
        ok(&["verify", "--store", s(&store)]);
        // Every moment the fixture had still restores as it did.
        for (batch, manifest) in &batches {
            let to = work.path().join(format!("after-v{schema}-b{batch}"));
            restore_batch(&store, *batch, &to);
            assert_eq!(
                &manifest_of(&to),
                manifest,
                "schema {schema}, batch {batch} after the upgrade"
            );
        }
        // The first capture after the upgrade recorded every path's owner
        // and stamp; the next one records nothing new.
        let again = json(&[
            "snapshot",
            "--store",
            s(&store),
            "--state-dir",
            &roots[0],
            "--state-dir",
            &roots[1],
            "--json",
        ]);
        assert!(again["batch"].is_null(), "{again}");
    }
}

/// Schema 4's fixture has what schema 4 brought: small files in a pack,
/// read back above like everything else.
#[test]
fn the_schema_4_fixture_holds_packed_chunks() {
    let work = tempfile::tempdir().expect("tempdir");
    let store = work.path().join("v4.redb");
    common::copy_store(&fixtures().join("store-v4.redb"), &store);
    let opened = diffkeeper::store::Store::open_read_only(&store)
        .expect("open")
        .expect("a store");
    let reader = opened.reader().expect("reader");
    let mut packs = std::collections::BTreeMap::<u64, u32>::new();
    reader
        .for_each_chunk::<diffkeeper::store::StoreError>(|_, record| {
            if let Some(pack) = record.pack() {
                *packs.entry(pack).or_default() += 1;
            }
            Ok(())
        })
        .expect("chunks");
    assert!(
        packs.values().any(|members| *members >= 2),
        "no pack of several members: {packs:?}"
    );
}

/// The names of the tables the store at `path` has.
fn tables_of(path: &Path) -> Vec<String> {
    use redb::{ReadableDatabase, TableHandle};
    let db = redb::ReadOnlyDatabase::open(path).expect("open");
    let txn = db.begin_read().expect("read");
    let tables = txn.list_tables().expect("tables");
    tables.map(|t| t.name().to_string()).collect()
}

/// Every chunk that is not a pack, with its hash.
fn indexed_chunks(reader: &diffkeeper::store::Reader) -> Vec<(u64, [u8; 32])> {
    let mut packs = std::collections::BTreeSet::new();
    let mut chunks = Vec::new();
    reader
        .for_each_chunk::<diffkeeper::store::StoreError>(|id, record| {
            packs.extend(record.pack());
            chunks.push((id, record.hash));
            Ok(())
        })
        .expect("chunks");
    chunks.retain(|(id, _)| !packs.contains(id));
    chunks
}

/// Schema 5 finds chunks by the first 8 bytes of their hash: a schema-4
/// store is read through its whole-hash `chunk_index`, and the first write
/// moves every entry to `chunk_hashes` and drops the old table; every chunk
/// is found by its content before and after, and a hash that shares only
/// the prefix of a stored one finds nothing.
#[test]
fn a_schema_4_chunk_index_moves_to_hash_prefixes_on_upgrade() {
    let work = tempfile::tempdir().expect("tempdir");
    let store = work.path().join("v4.redb");
    common::copy_store(&fixtures().join("store-v4.redb"), &store);
    assert!(tables_of(&store).contains(&"chunk_index".to_string()));
    let found_by_content = |store: &diffkeeper::store::Store| {
        let reader = store.reader().expect("reader");
        let chunks = indexed_chunks(&reader);
        assert!(chunks.len() >= 3, "{chunks:?}");
        for (id, hash) in &chunks {
            assert_eq!(reader.find_chunk(hash).expect("find"), Some(*id));
            let mut alike = *hash;
            alike[31] ^= 1;
            assert_eq!(reader.find_chunk(&alike).expect("find"), None);
        }
    };
    let read_only = diffkeeper::store::Store::open_existing(&store).expect("open");
    found_by_content(&read_only);
    drop(read_only);
    let written = diffkeeper::store::Store::create_or_open(&store).expect("open to write");
    found_by_content(&written);
    drop(written);
    let tables = tables_of(&store);
    assert!(tables.contains(&"chunk_hashes".to_string()), "{tables:?}");
    assert!(!tables.contains(&"chunk_index".to_string()), "{tables:?}");
    ok(&["verify", "--store", s(&store)]);
    let fresh = tables_of(&fixtures().join("store-v5.redb"));
    assert!(fresh.contains(&"chunk_hashes".to_string()), "{fresh:?}");
    assert!(!fresh.contains(&"chunk_index".to_string()), "{fresh:?}");
}
