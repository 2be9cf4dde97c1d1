//! File metadata kept beside the content: numeric owner and extended
//! attributes. Capture reads them through the descriptor it reads the file
//! with ([`read_xattrs`]); replay applies them, with mode and mtime, through
//! the descriptor of the file it is about to move into place ([`apply`]).
//!
//! Extended attributes are kept whole and by raw name, as `tar --xattrs`
//! and restic keep them: `user.*`, `security.*` (`security.capability`
//! included), `trusted.*` when DiffKeeper runs as root, and POSIX ACLs,
//! which the kernel exposes as `system.posix_acl_access` and
//! `system.posix_acl_default`. Symlinks keep their owner but not extended
//! attributes (Linux allows only `security.*` and `trusted.*` ones on them,
//! and reading those needs a path, not a descriptor).
//!
//! Order matters on replay: `chown` clears the set-user-ID and set-group-ID
//! bits and `security.capability`, so the owner is set first, then the
//! attributes, then the mode, then the times. What the process may not set
//! (another owner without `CAP_CHOWN`, a `trusted.*` or `security.*`
//! attribute without `CAP_SYS_ADMIN`, any attribute on a file system without
//! them) is skipped and reported, never fatal: a restore by an unprivileged
//! user keeps what it can and says what it could not.

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{Gid, Mode, Uid, XattrFlags};
use rustix::io::Errno;

use crate::store::schema::{Owner, VersionRecord, Xattr};

/// Largest list of names and largest value the kernel allows (64 KiB each).
const XATTR_MAX: usize = 64 * 1024;

/// The extended attributes of the open file `fd`, sorted by name. A file
/// system without them gives none.
pub fn read_xattrs(fd: impl AsFd) -> io::Result<Vec<Xattr>> {
    let names = match list(&fd) {
        Ok(names) => names,
        Err(e) if unsupported(e) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let value = match get(&fd, OsStr::from_bytes(name)) {
            Ok(v) => v,
            // Removed between the list and the read.
            Err(Errno::NODATA) => continue,
            Err(e) => return Err(e.into()),
        };
        out.push(Xattr {
            name: name.to_vec(),
            value,
        });
    }
    out.sort();
    Ok(out)
}

fn list(fd: &impl AsFd) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; 1024];
    loop {
        match rustix::fs::flistxattr(fd, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) if buf.len() < XATTR_MAX => buf.resize(XATTR_MAX, 0),
            Err(e) => return Err(e),
        }
    }
}

fn get(fd: &impl AsFd, name: &OsStr) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; 256];
    loop {
        match rustix::fs::fgetxattr(fd, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) if buf.len() < XATTR_MAX => buf.resize(XATTR_MAX, 0),
            Err(e) => return Err(e),
        }
    }
}

/// Whether an error means the file system or the caller cannot have this
/// attribute or owner, rather than that something broke.
fn unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::OPNOTSUPP | Errno::PERM | Errno::ACCESS | Errno::INVAL
    )
}

/// Gives the open file `fd` the owner, extended attributes, mode and (with
/// `with_mtime`) mtime of `version`. Returns what could not be kept, each
/// as a short description; other failures are errors.
pub fn apply(fd: impl AsFd, version: &VersionRecord, with_mtime: bool) -> io::Result<Vec<String>> {
    let mut not_kept = Vec::new();
    if let Some(owner) = version.owner {
        if let Err(e) = set_owner(&fd, owner) {
            if !unsupported(e) {
                return Err(e.into());
            }
            not_kept.push(format!("owner {}:{} ({e})", owner.uid, owner.gid));
        }
    }
    // Schema-1 versions know no attributes: leave the file's as they are.
    if version.owner.is_some() {
        set_xattrs(&fd, &version.xattrs, &mut not_kept)?;
    }
    // Only what differs: a chmod or utimens that changes nothing would
    // still move the ctime, and with it the stamp that proves the file
    // unchanged.
    let st = rustix::fs::fstat(&fd)?;
    if st.st_mode & 0o7777 != version.mode & 0o7777 {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(version.mode & 0o7777))?;
    }
    let mtime_now = crate::scan::nanos(st.st_mtime, st.st_mtime_nsec as i64);
    if with_mtime && mtime_now != version.mtime_ns {
        let ns = version.mtime_ns;
        let t = rustix::fs::Timespec {
            tv_sec: ns.div_euclid(1_000_000_000),
            tv_nsec: ns.rem_euclid(1_000_000_000) as _,
        };
        rustix::fs::futimens(
            &fd,
            &rustix::fs::Timestamps {
                last_access: t,
                last_modification: t,
            },
        )?;
    }
    Ok(not_kept)
}

fn set_owner(fd: &impl AsFd, owner: Owner) -> Result<(), Errno> {
    let st = rustix::fs::fstat(fd)?;
    if (st.st_uid, st.st_gid) == (owner.uid, owner.gid) {
        return Ok(());
    }
    let (uid, gid) = ids(owner)?;
    rustix::fs::fchown(fd, Some(uid), Some(gid))
}

/// The ids to pass to `chown`: -1 means "leave as is" there, and is no
/// owner any file can have.
fn ids(owner: Owner) -> Result<(Uid, Gid), Errno> {
    if owner.uid == u32::MAX || owner.gid == u32::MAX {
        return Err(Errno::INVAL);
    }
    Ok((Uid::from_raw(owner.uid), Gid::from_raw(owner.gid)))
}

/// Makes the attributes of `fd` exactly `wanted`: others removed, the
/// missing and different ones set.
fn set_xattrs(fd: &impl AsFd, wanted: &[Xattr], not_kept: &mut Vec<String>) -> io::Result<()> {
    let have = read_xattrs(fd)?;
    for old in &have {
        if !wanted.iter().any(|w| w.name == old.name) {
            match rustix::fs::fremovexattr(fd, OsStr::from_bytes(&old.name)) {
                Ok(()) | Err(Errno::NODATA) => {}
                Err(e) if unsupported(e) => not_kept.push(format!(
                    "removing attribute {} ({e})",
                    String::from_utf8_lossy(&old.name)
                )),
                Err(e) => return Err(e.into()),
            }
        }
    }
    for x in wanted {
        if have.contains(x) {
            continue;
        }
        match rustix::fs::fsetxattr(
            fd,
            OsStr::from_bytes(&x.name),
            &x.value,
            XattrFlags::empty(),
        ) {
            Ok(()) => {}
            Err(e) if unsupported(e) => not_kept.push(format!(
                "attribute {} ({e})",
                String::from_utf8_lossy(&x.name)
            )),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Gives the symlink `name` in `dir` the owner of `version` (symlinks have
/// no mode, and their times are not kept). Returns what could not be kept.
pub fn apply_to_symlink(
    dir: impl AsFd,
    name: &str,
    version: &VersionRecord,
) -> io::Result<Vec<String>> {
    let Some(owner) = version.owner else {
        return Ok(Vec::new());
    };
    let chown = ids(owner).and_then(|(uid, gid)| {
        rustix::fs::chownat(
            dir,
            name,
            Some(uid),
            Some(gid),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
    });
    match chown {
        Ok(()) => Ok(Vec::new()),
        Err(e) if unsupported(e) => Ok(vec![format!("owner {}:{} ({e})", owner.uid, owner.gid)]),
        Err(e) => Err(e.into()),
    }
}
