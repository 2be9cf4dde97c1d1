//! `export`: one moment of the history as a tar archive (zstd-compressed
//! when the name ends in `.zst`), with modes and mtimes as captured. Every
//! file's content is checked against its SHA-256 as it is written, and the
//! archive only appears under its name once it is complete.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use serde::Serialize;

use super::moment::{resolve, Moment};
use crate::store::schema::EntryKind;
use crate::store::{Reader, Store};

/// What went into an archive.
#[derive(Debug, Default, Serialize)]
pub struct ExportSummary {
    pub output: String,
    pub batch: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content archived.
    pub bytes: u64,
}

/// Writes the state at `moment` of one root (`only`), or of every root
/// (each under `NAME/` when there are several), to `output` (`-` for
/// standard output).
pub fn export(
    store_path: &Path,
    moment: Moment,
    only: Option<&str>,
    output: &Path,
) -> Result<ExportSummary> {
    let store = Store::open_existing(store_path)?;
    let reader = store.reader()?;
    let batch = resolve(&reader, moment)?;
    let roots = super::select_roots(&reader, only)?;
    let mut summary = ExportSummary {
        output: output.display().to_string(),
        batch,
        ..ExportSummary::default()
    };
    let zstd = output.as_os_str().as_bytes().ends_with(b".zst");
    let mut write_to = |sink: &mut dyn Write| -> Result<()> {
        // Every layer is finished explicitly, so an error writing the last
        // bytes (a full disk) is an error, not a silently short archive.
        if zstd {
            let mut archive = tar::Builder::new(zstd::Encoder::new(sink, 3)?);
            append_roots(&reader, &roots, batch, &mut archive, &mut summary)?;
            archive.into_inner()?.finish()?.flush()?;
        } else {
            let mut archive = tar::Builder::new(sink);
            append_roots(&reader, &roots, batch, &mut archive, &mut summary)?;
            archive.into_inner()?.flush()?;
        }
        Ok(())
    };
    if output == Path::new("-") {
        write_to(&mut std::io::stdout().lock())?;
        return Ok(summary);
    }
    match Destination::of(output, store_path)? {
        Destination::Stream(path) => {
            // A device, a pipe or a socket: written through, never replaced.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let mut buffered = std::io::BufWriter::with_capacity(1 << 20, &file);
            write_to(&mut buffered)
                .and_then(|_| {
                    buffered
                        .into_inner()
                        .map(|_| ())
                        .map_err(|e| e.into_error().into())
                })
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Destination::File(path) => write_file(&path, &mut write_to)?,
    }
    Ok(summary)
}

/// Where an archive goes.
enum Destination {
    /// A regular file (new, or replaced whole once the archive is
    /// complete), at the end of any symlinks.
    File(PathBuf),
    /// Something that is written to, not replaced: a device, a pipe.
    Stream(PathBuf),
}

impl Destination {
    /// Where `output` leads: symlinks are followed (renaming over one would
    /// replace the link, not what it names), and the store itself is
    /// refused (replacing it with an archive of it would destroy the whole
    /// history).
    fn of(output: &Path, store: &Path) -> Result<Destination> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let target = match std::fs::canonicalize(output) {
            Ok(target) => target,
            // Not there yet: a new file, or a dangling link's target.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::read_link(output) {
                    Ok(link) => match output.parent() {
                        Some(dir) => dir.join(link),
                        None => link,
                    },
                    Err(_) => output.to_path_buf(),
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot resolve {}", output.display()))
            }
        };
        let meta = match std::fs::metadata(&target) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Destination::File(target))
            }
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", target.display())),
        };
        if let Ok(store_meta) = std::fs::metadata(store) {
            if (meta.dev(), meta.ino()) == (store_meta.dev(), store_meta.ino()) {
                crate::error::bail!(
                    "refusing to export to {}: it is the store {} itself, and the archive would replace its whole history",
                    output.display(),
                    store.display()
                );
            }
        }
        let kind = meta.file_type();
        if kind.is_dir() {
            crate::error::bail!("cannot export to {}: it is a directory", output.display());
        }
        if kind.is_char_device() || kind.is_block_device() || kind.is_fifo() || kind.is_socket() {
            return Ok(Destination::Stream(target));
        }
        Ok(Destination::File(target))
    }
}

/// Writes a regular file at `output` through a temporary file beside it,
/// which only takes the name once complete and on disk.
fn write_file(output: &Path, write_to: &mut dyn FnMut(&mut dyn Write) -> Result<()>) -> Result<()> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = tempfile::Builder::new()
        .prefix(".diffkeeper-export.")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let written = (|| -> Result<()> {
        let mut buffered = std::io::BufWriter::with_capacity(1 << 20, temp.as_file());
        write_to(&mut buffered)?;
        buffered.into_inner().map_err(|e| e.into_error())?;
        // As any new file would be: 0666 less the umask (tempfile makes 0600).
        temp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o666 & !umask()))?;
        temp.as_file().sync_all()?;
        Ok(())
    })();
    written.with_context(|| format!("cannot write {}", output.display()))?;
    temp.persist(output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    Ok(())
}

fn append_roots(
    reader: &Reader,
    roots: &[String],
    batch: u64,
    archive: &mut tar::Builder<impl Write>,
    summary: &mut ExportSummary,
) -> Result<()> {
    let prefixed = roots.len() > 1;
    for root in roots {
        let prefix = prefixed.then(|| PathBuf::from(root));
        append_root(reader, root, batch, prefix.as_deref(), archive, summary)?;
    }
    Ok(())
}

/// The process's umask, from /proc (reading it with umask(2) would change
/// it for a moment for every thread).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

fn append_root(
    reader: &Reader,
    root: &str,
    batch: u64,
    prefix: Option<&Path>,
    archive: &mut tar::Builder<impl Write>,
    summary: &mut ExportSummary,
) -> Result<()> {
    let batch_time = reader.batch(batch)?.map(|b| b.time_ms / 1000).unwrap_or(0);
    let state = reader.state_at(root, batch)?;
    // Links that leave the directory, alone or through each other, are
    // refused as replay refuses them.
    crate::replay::check_links(reader, &state)?;
    // The state directory itself ("" in the store; stores of schema 1 do
    // not have it): `NAME/` with several roots, `./` with one.
    let top = state
        .iter()
        .find(|e| e.path.is_empty() && e.version.kind == EntryKind::Dir);
    if top.is_some() || prefix.is_some() {
        let mut header = header(
            tar::EntryType::Directory,
            top.map_or(0o755, |e| e.version.mode),
            batch_time,
        );
        if let Some(top) = top {
            owned(&mut header, &top.version);
            if !top.version.xattrs.is_empty() {
                append_xattrs(archive, &top.version.xattrs)
                    .with_context(|| format!("cannot archive the extended attributes of {root}"))?;
            }
        }
        let name = prefix.unwrap_or(Path::new("."));
        archive.append_data(&mut header, name, std::io::empty())?;
    }
    for entry in state.into_iter().filter(|e| !e.path.is_empty()) {
        crate::roots::check_relative(&entry.path)
            .with_context(|| format!("store {}", reader.store_path().display()))?;
        let rel = Path::new(std::ffi::OsStr::from_bytes(&entry.path));
        let name = match prefix {
            Some(prefix) => prefix.join(rel),
            None => rel.to_path_buf(),
        };
        let v = &entry.version;
        let seconds = if v.mtime_ns > 0 {
            v.mtime_ns / 1_000_000_000
        } else {
            batch_time
        };
        let shown = || format!("{root}:{}", rel.display());
        if !v.xattrs.is_empty() && v.kind != EntryKind::Tombstone {
            append_xattrs(archive, &v.xattrs).with_context(|| {
                format!("cannot archive the extended attributes of {}", shown())
            })?;
        }
        match v.kind {
            EntryKind::Tombstone => {}
            EntryKind::Dir => {
                let mut header = header(tar::EntryType::Directory, v.mode, seconds);
                owned(&mut header, v);
                archive.append_data(&mut header, &name, std::io::empty())?;
                summary.dirs += 1;
            }
            EntryKind::Symlink => {
                let mut header = header(tar::EntryType::Symlink, 0o777, seconds);
                owned(&mut header, v);
                let target = Path::new(std::ffi::OsStr::from_bytes(&v.target));
                archive
                    .append_link(&mut header, &name, target)
                    .with_context(|| format!("cannot archive symlink {}", shown()))?;
                summary.symlinks += 1;
            }
            EntryKind::File => {
                let mut header = header(tar::EntryType::Regular, v.mode, seconds);
                owned(&mut header, v);
                header.set_size(v.size);
                archive
                    .append_data(&mut header, &name, reader.content(v))
                    .with_context(|| format!("cannot archive {}", shown()))?;
                summary.files += 1;
                summary.bytes += v.size;
            }
        }
    }
    Ok(())
}

/// The version's numeric owner in `header` (root for versions that know
/// none, schema-1 ones).
fn owned(header: &mut tar::Header, version: &crate::store::schema::VersionRecord) {
    if let Some(owner) = version.owner {
        header.set_uid(owner.uid.into());
        header.set_gid(owner.gid.into());
    }
}

/// Writes a pax extended header holding `xattrs` as `SCHILY.xattr.NAME`
/// records, the form GNU tar (`--xattrs`), bsdtar and restic read; it
/// applies to the entry that follows.
fn append_xattrs(
    archive: &mut tar::Builder<impl Write>,
    xattrs: &[crate::store::schema::Xattr],
) -> std::io::Result<()> {
    let mut records = Vec::new();
    for x in xattrs {
        let mut body = b"SCHILY.xattr.".to_vec();
        body.extend_from_slice(&x.name);
        body.push(b'=');
        body.extend_from_slice(&x.value);
        body.push(b'\n');
        // "LEN BODY": LEN counts itself, the space and the body.
        let mut len = body.len() + 2;
        while (len.to_string().len() + 1 + body.len()) != len {
            len = len.to_string().len() + 1 + body.len();
        }
        records.extend_from_slice(format!("{len} ").as_bytes());
        records.extend_from_slice(&body);
    }
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_path("././@PaxHeader")?;
    header.set_mode(0o644);
    header.set_size(records.len() as u64);
    header.set_cksum();
    archive.append(&header, records.as_slice())
}

fn header(kind: tar::EntryType, mode: u32, mtime_seconds: i64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_mtime(u64::try_from(mtime_seconds).unwrap_or(0));
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(0);
    header
}
