//! Ownership and extended attributes: a restored tree belongs to whom it
//! belonged, with its capabilities, ACLs and user attributes, so an app
//! running as another user (PostgreSQL above all) starts on it as it was.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ok, s};

/// `security.capability` for cap_net_bind_service, permitted and
/// effective (VFS_CAP_REVISION_2).
const NET_BIND_CAP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // magic: revision 2, effective
    0x00, 0x04, 0x00, 0x00, // permitted, low word: bit 10
    0x00, 0x00, 0x00, 0x00, // inheritable, low word
    0x00, 0x00, 0x00, 0x00, // permitted, high word
    0x00, 0x00, 0x00, 0x00, // inheritable, high word
];

/// `system.posix_acl_access` granting user `uid` read, as `setfacl -m
/// u:UID:r` writes it.
fn acl_user_read(uid: u32) -> Vec<u8> {
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX), // owner: rw
        (0x02, 4, uid),            // that user: r
        (0x04, 4, u32::MAX),       // group: r
        (0x10, 4, u32::MAX),       // mask: r
        (0x20, 4, u32::MAX),       // others: r
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    acl
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", path.display()));
}

fn xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(path, &mut names[..]).expect("listxattr");
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 64 * 1024];
        let len =
            rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut value[..]).expect("getxattr");
        value.truncate(len);
        out.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    out.sort();
    out
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("lchown");
}

/// A path's uid, gid, mode and extended attributes.
type Meta = (String, u32, u32, u32, Vec<(String, Vec<u8>)>);

/// Owner, mode (no mode for symlinks) and extended attributes of every
/// path below `root`, and of `root` itself as "".
fn metadata_of(root: &Path) -> Vec<Meta> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).expect("lstat");
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .display()
            .to_string();
        let mode = if meta.file_type().is_symlink() {
            0
        } else {
            meta.permissions().mode() & 0o7777
        };
        let attrs = if meta.file_type().is_symlink() {
            Vec::new()
        } else {
            xattrs(&path)
        };
        out.push((rel, meta.uid(), meta.gid(), mode, attrs));
        if meta.is_dir() {
            for entry in fs::read_dir(&path).expect("read_dir") {
                stack.push(entry.expect("entry").path());
            }
        }
    }
    out.sort();
    out
}

/// A tree with owners, a set-user-ID file, a capability, an ACL and user
/// attributes on files and directories, and an owned symlink.
fn owned_tree(state: &Path) {
    fs::create_dir_all(state.join("d/inner")).expect("mkdir");
    fs::write(state.join("f"), b"owned file").expect("write");
    fs::write(state.join("d/inner/g"), b"deeper").expect("write");
    fs::write(state.join("suid"), b"#!/bin/sh\n").expect("write");
    std::os::unix::fs::symlink("f", state.join("link")).expect("symlink");
    chown(state, 70, 70);
    chown(&state.join("f"), 1234, 5678);
    chown(&state.join("d"), 2000, 2001);
    chown(&state.join("d/inner"), 2000, 2001);
    chown(&state.join("d/inner/g"), 2000, 2001);
    chown(&state.join("suid"), 1234, 5678);
    chown(&state.join("link"), 3000, 3001);
    fs::set_permissions(state, fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::set_permissions(state.join("d"), fs::Permissions::from_mode(0o750)).expect("chmod");
    fs::set_permissions(state.join("suid"), fs::Permissions::from_mode(0o4755)).expect("chmod");
    set_xattr(&state.join("f"), "user.note", b"hello");
    set_xattr(&state.join("f"), "security.capability", &NET_BIND_CAP);
    set_xattr(
        &state.join("f"),
        "system.posix_acl_access",
        &acl_user_read(1234),
    );
    set_xattr(&state.join("d"), "user.dir", b"\x00binary\xff");
}

#[test]
fn owners_modes_and_extended_attributes_come_back() {
    let work = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    owned_tree(&state);
    let want = metadata_of(&state);
    let root = format!("data={}", s(&state));
    ok(&["snapshot", "--state-dir", &root, "--store", s(&store)]);

    // restore into a new directory
    let restored = work.path().join("restored");
    ok(&["restore", "--store", s(&store), "--to", s(&restored)]);
    assert_eq!(metadata_of(&restored), want, "restore");

    // replay into an empty state directory, and over a copy that lost them
    let fresh = work.path().join("fresh");
    ok(&[
        "replay",
        "--state-dir",
        &format!("data={}", s(&fresh)),
        "--store",
        s(&store),
    ]);
    assert_eq!(metadata_of(&fresh), want, "replay into a new directory");
    let lost = work.path().join("lost");
    let cp = Command::new("cp")
        .args(["-r", s(&state), s(&lost)])
        .status()
        .expect("cp");
    assert!(cp.success());
    ok(&[
        "replay",
        "--state-dir",
        &format!("data={}", s(&lost)),
        "--store",
        s(&store),
    ]);
    assert_eq!(metadata_of(&lost), want, "replay over a copy without them");

    // export, extracted by GNU tar
    let tar = work.path().join("state.tar");
    ok(&["export", "--store", s(&store), "-o", s(&tar)]);
    let untarred = work.path().join("untarred");
    fs::create_dir(&untarred).expect("mkdir");
    let status = Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-xpf",
            s(&tar),
            "-C",
            s(&untarred),
        ])
        .status()
        .expect("tar -x");
    assert!(status.success());
    let untarred_f = fs::metadata(untarred.join("f")).expect("stat");
    assert_eq!((untarred_f.uid(), untarred_f.gid()), (1234, 5678));
    assert_eq!(xattrs(&untarred.join("f")), xattrs(&state.join("f")), "tar");
    assert_eq!(
        fs::symlink_metadata(untarred.join("link"))
            .expect("lstat")
            .uid(),
        3000
    );

    // A change of owner alone, and of one attribute alone, is a change.
    chown(&state.join("f"), 4321, 8765);
    let summary = common::snapshot_json(&root, &store);
    assert_eq!(summary["changed"], 1, "{summary}");
    set_xattr(&state.join("d/inner"), "user.late", b"1");
    let summary = common::snapshot_json(&root, &store);
    assert_eq!(summary["changed"], 1, "{summary}");
    ok(&[
        "replay",
        "--state-dir",
        &format!("data={}", s(&restored)),
        "--store",
        s(&store),
    ]);
    assert_eq!(
        metadata_of(&restored),
        metadata_of(&state),
        "replay of both"
    );
}

#[test]
fn an_unprivileged_restore_keeps_what_it_can_and_says_what_it_could_not() {
    let work = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let state = work.path().join("state");
    let store = work.path().join("store.dk");
    owned_tree(&state);
    common::snapshot_json(&format!("data={}", s(&state)), &store);
    fs::set_permissions(&store, fs::Permissions::from_mode(0o644)).expect("chmod");
    let (uid, gid) = ids_of("nobody");
    let to = work.path().join("mine");
    fs::create_dir(&to).expect("mkdir");
    chown(&to, uid, gid);
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            common::BIN,
            "restore",
            "--store",
            s(&store),
            "--to",
            s(&to),
            "--json",
        ])
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        summary[0]["not_kept"].as_u64().unwrap_or(0) > 0,
        "{summary}"
    );
    assert!(
        stderr.contains("could not be kept") && stderr.contains("owner"),
        "{stderr}"
    );
    // The content and what a user may set are all there.
    assert_eq!(fs::read(to.join("f")).expect("read"), b"owned file");
    assert_eq!(fs::read(to.join("d/inner/g")).expect("read"), b"deeper");
    let f = fs::metadata(to.join("f")).expect("stat");
    assert_eq!(f.uid(), uid);
    assert!(
        xattrs(&to.join("f")).contains(&("user.note".to_string(), b"hello".to_vec())),
        "{:?}",
        xattrs(&to.join("f"))
    );
    assert_eq!(
        fs::metadata(to.join("d"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777,
        0o750
    );
}

/// The newest PostgreSQL server programs Debian installed.
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed by `cargo xtask setup`")
        .map(|e| e.expect("entry").path().join("bin"))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server")
}

/// Runs a command as the `postgres` user; requires success.
fn as_postgres(program: &Path, args: &[&str]) -> String {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .output()
        .expect("runuser");
    assert!(
        out.status.success(),
        "{} {args:?}: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_postgresql_data_directory_restored_by_diffkeeper_starts_as_it_was() {
    let work = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let bin = postgres_bin();
    let socket = work.path().join("sock");
    fs::create_dir(&socket).expect("mkdir");
    let pg_uid = ids_of("postgres");
    chown(&socket, pg_uid.0, pg_uid.1);
    let data = work.path().join("pgdata");
    fs::create_dir(&data).expect("mkdir");
    chown(&data, pg_uid.0, pg_uid.1);
    as_postgres(
        &bin.join("initdb"),
        &["-D", s(&data), "--auth=trust", "--no-sync"],
    );
    let options = format!("-k {} -c listen_addresses= -p 54329", s(&socket));
    let server = |dir: &Path, action: &str| {
        let log = socket.join(format!("{action}.log"));
        as_postgres(
            &bin.join("pg_ctl"),
            &["-D", s(dir), "-o", &options, "-l", s(&log), "-w", action],
        );
    };
    let psql = |sql: &str| {
        as_postgres(
            &bin.join("psql"),
            &[
                "-h",
                s(&socket),
                "-p",
                "54329",
                "-d",
                "postgres",
                "-At",
                "-c",
                sql,
            ],
        )
    };
    server(&data, "start");
    psql("create table kept (id int primary key, note text)");
    psql("insert into kept select g, md5(g::text) from generate_series(1, 1000) g");
    server(&data, "stop");

    let store = work.path().join("store.dk");
    common::snapshot_json(&format!("pgdata={}", s(&data)), &store);
    let restored = work.path().join("restored");
    ok(&["restore", "--store", s(&store), "--to", s(&restored)]);
    // No chown -R, no chmod 700: it starts as it is.
    server(&restored, "start");
    let count = psql("select count(*), sum(id) from kept");
    server(&restored, "stop");
    assert_eq!(count.trim(), "1000|500500");
}

/// The uid and gid of `user`.
fn ids_of(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, user]).output().expect("id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no user {user}"))
    };
    (id("-u"), id("-g"))
}
