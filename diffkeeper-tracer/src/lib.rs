//! Kernel events: the userspace half of the eBPF programs in
//! `diffkeeper-ebpf`, which `build.rs` builds and this crate embeds.
//!
//! This crate owns the [`Tracer`]: loading the embedded object with this
//! kernel's struct offsets ([`btf`]), telling it which directory trees to
//! watch (by ids its caller chooses, added and removed while it runs),
//! attaching its ctime hooks, and its syscall tracepoints only where those
//! alone could miss a change ([`Hooks`]; mounting tracefs first when it is
//! missing), routing the programs' `aya-log` records into `tracing`, and
//! reading and clearing its maps. The `ebpf` backend of `diffkeeper::watch`
//! runs it; [`self_test`] (`diffkeeper doctor`) proves on the running kernel
//! that it filters, resolves and coalesces as it should. It is the only
//! crate whose build needs the eBPF toolchain.

pub mod btf;
mod error;
mod tracefs;

pub use error::TracerError;

pub use diffkeeper_common::mountinfo;

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{unsupported, Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use diffkeeper_common::{
    counter, names, InodeKey, RootPath, WriteEvent, MAX_PATH_ROOTS, PATH_BYTES,
};

/// The eBPF object built by `build.rs` from `diffkeeper-ebpf`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/diffkeeper-ebpf.o"));

/// The loaded and attached tracer, watching some directory trees.
/// Detached and unloaded on drop.
pub struct Tracer {
    ebpf: Ebpf,
    /// Must outlive the programs: dropping it closes the log map.
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    /// Whether tracefs had to be mounted for this.
    pub mounted_tracefs: bool,
    hooks: Hooks,
    /// The watched roots' directories (an overlayfs tree's upper
    /// directory too), by id.
    roots: std::collections::HashMap<u32, Vec<InodeKey>>,
    /// Ring-buffer records that did not decode, not yet taken.
    malformed: usize,
    /// What `LINKED` holds: per root id, its files that also have a name
    /// outside every tree.
    linked: std::collections::HashMap<u32, HashSet<InodeKey>>,
    /// `LINKED` was found full (said once).
    linked_full: bool,
}

/// Capabilities that matter for loading tracing programs.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// What is missing for eBPF, in words, when loading failed for lack of
/// privileges.
fn privileges_hint() -> String {
    let Some(caps) = effective_capabilities() else {
        return "cannot read the process's capabilities from /proc/self/status".into();
    };
    let has = |cap: u32| caps & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() {
        format!(
            "the process has CAP_BPF and CAP_PERFMON (uid {}); the kernel may restrict BPF further (kernel.unprivileged_bpf_disabled, lockdown, seccomp)",
            rustix::process::getuid().as_raw()
        )
    } else {
        format!(
            "the process lacks {} (uid {}); run as root or grant them (in Kubernetes: securityContext.capabilities.add)",
            missing.join(" and "),
            rustix::process::getuid().as_raw()
        )
    }
}

/// The identity the programs compute for a file or directory.
pub fn inode_key(path: &Path) -> Result<InodeKey> {
    let st = rustix::fs::stat(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok(key_of_stat(&st))
}

fn key_of_stat(st: &rustix::fs::Stat) -> InodeKey {
    InodeKey {
        ino: st.st_ino,
        dev: InodeKey::kernel_dev(rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev)),
        pad: 0,
    }
}

/// Loads and attaches the BTF tracepoints on ctime stamping, which see every
/// change to a file's data, mode or entries, whatever made it (the write
/// family, io_uring, sendfile, splice, mapped stores) and from any mount
/// namespace. A kernel without them (before 6.13, or without BTF
/// tracepoints) gets the syscall tracepoints instead: the reason is
/// returned.
fn attach_ctime_hooks(ebpf: &mut aya::Ebpf) -> std::result::Result<(), String> {
    let btf = aya::Btf::from_sys_fs()
        .map_err(|e| format!("cannot read the kernel's BTF for BTF tracepoints ({e})"))?;
    for program in names::BTF_PROGRAMS {
        (|| -> Result<()> {
            let hook: &mut aya::programs::BtfTracePoint = ebpf
                .program_mut(program)
                .with_context(|| format!("the eBPF object has no program {program}"))?
                .try_into()
                .with_context(|| format!("{program} is not a BTF tracepoint program"))?;
            hook.load(program, &btf)
                .with_context(|| format!("the kernel refused BTF tracepoint {program}"))?;
            hook.attach()
                .with_context(|| format!("cannot attach BTF tracepoint {program}"))?;
            Ok(())
        })()
        .map_err(|e| e.chain())?;
    }
    Ok(())
}

/// Whether the syscall tracepoints are attached beside the ctime hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallHooks {
    /// Only where the ctime hooks alone could miss a change: a tree on a
    /// file system without fine-grained ctimes, or a kernel without the
    /// hooks.
    Auto,
    /// Always (to compare their cost, or to distrust the ctime hooks).
    Always,
}

/// The kernel hooks a started [`Tracer`] reports through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hooks {
    /// The ctime stamping alone: no syscall of any task takes a slower path.
    Ctime,
    /// The ctime stamping and 32 syscall tracepoints.
    CtimeAndSyscalls,
    /// The syscall tracepoints alone (the kernel has no ctime hooks): what
    /// no syscall names (io_uring, sendfile, splice, other mount
    /// namespaces) is left to the rescan.
    Syscalls,
}

impl fmt::Display for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hooks::Ctime => "ctime stamping",
            Hooks::CtimeAndSyscalls => "ctime stamping and syscall tracepoints",
            Hooks::Syscalls => "syscall tracepoints",
        })
    }
}

/// A file system that gives an inode a fresh ctime for every change made
/// after its ctime was read (multigrain timestamps, Linux 6.13). Elsewhere
/// the kernel stamps at most once per clock tick, so a change in the tick
/// of a capture's read would stamp nothing and no ctime hook would fire.
/// DiffKeeper stats every file before it reads it.
struct FineCtime {
    /// Its `statfs` type.
    magic: i64,
    /// Whether its writeback makes a shared mapping's pages read-only
    /// again, so that the next store to each faults and stamps the file
    /// (tmpfs has no writeback).
    writeback_protects: bool,
}

const FINE_CTIME_FILE_SYSTEMS: [FineCtime; 4] = [
    // ext4 (and ext2/ext3 through the ext4 driver)
    FineCtime {
        magic: 0xEF53,
        writeback_protects: true,
    },
    // XFS
    FineCtime {
        magic: 0x5846_5342,
        writeback_protects: true,
    },
    // Btrfs
    FineCtime {
        magic: 0x9123_683E,
        writeback_protects: true,
    },
    // tmpfs
    FineCtime {
        magic: 0x0102_1994,
        writeback_protects: false,
    },
];

fn fine_ctime(kind: i64) -> Option<&'static FineCtime> {
    FINE_CTIME_FILE_SYSTEMS.iter().find(|fs| fs.magic == kind)
}

/// Whether writeback of the file system at `root` makes a shared mapping's
/// pages read-only again (see [`FineCtime::writeback_protects`]).
pub fn writeback_protects(root: &Path) -> bool {
    fs_type(root).is_ok_and(|kind| fine_ctime(kind).is_some_and(|fs| fs.writeback_protects))
}

/// `statfs` type of overlayfs.
const OVERLAYFS_MAGIC: i64 = 0x794c_7630;

/// Why the ctime hooks alone may miss changes under `root`, on a file
/// system of type `kind`, if they may.
fn coarse_ctime(root: &Path, kind: i64) -> Option<String> {
    fine_ctime(kind).is_none().then(|| {
        format!(
            "{} is on a file system (type {kind:#x}) without fine-grained ctimes",
            root.display()
        )
    })
}

fn fs_type(path: &Path) -> Result<i64> {
    let fs =
        rustix::fs::statfs(path).with_context(|| format!("cannot statfs {}", path.display()))?;
    Ok(fs.f_type as i64)
}

/// The directory of overlayfs tree `root` in its mount's upper layer: the
/// kernel stamps ctimes on upper inodes, whose dentries are there, not
/// under `root`. `Err` says why the ctime hooks cannot watch it there.
fn overlay_upper(root: &Path) -> Result<std::result::Result<PathBuf, String>> {
    let canonical = std::fs::canonicalize(root)
        .with_context(|| format!("cannot resolve {}", root.display()))?;
    let mounts = mountinfo::read().context("cannot read /proc/self/mountinfo")?;
    // The last mount at the deepest point above the tree is the one seen.
    let Some(mount) = mounts
        .iter()
        .filter(|m| canonical.starts_with(&m.point))
        .max_by_key(|m| m.point.components().count())
    else {
        return Ok(Err("its mount is not in /proc/self/mountinfo".into()));
    };
    if mount.fstype != "overlay" {
        return Ok(Err(format!(
            "its mount at {} is {}",
            mount.point.display(),
            mount.fstype
        )));
    }
    let Some(upperdir) = mount.option("upperdir") else {
        return Ok(Err("its overlay has no upper layer".into()));
    };
    let Ok(rel) = canonical.strip_prefix(&mount.point) else {
        return Ok(Err("it is not under its mount point".into()));
    };
    let upper = Path::new(&upperdir).join(rel);
    match std::fs::symlink_metadata(&upper) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) | Err(_) => {
            return Ok(Err(format!(
                "its upper directory {} is not there (the tree is still only in a lower layer, or the upper layer is not visible from this mount namespace)",
                upper.display()
            )))
        }
    }
    if let Some(why) = coarse_ctime(&upper, fs_type(&upper)?) {
        return Ok(Err(why));
    }
    Ok(Ok(upper))
}

/// Mounts tracefs if it is missing and attaches the syscall tracepoints.
/// Returns whether tracefs had to be mounted.
fn attach_syscall_hooks(ebpf: &mut aya::Ebpf) -> Result<bool> {
    let mounted_tracefs = tracefs::ensure_mounted()?;
    for program in names::PROGRAMS {
        let tracepoint: &mut TracePoint = ebpf
            .program_mut(program)
            .with_context(|| format!("the eBPF object has no program {program}"))?
            .try_into()
            .with_context(|| format!("{program} is not a tracepoint program"))?;
        tracepoint.load().with_context(|| {
            format!(
                "the kernel refused program {program}: {}",
                privileges_hint()
            )
        })?;
        tracepoint.attach("syscalls", program).with_context(|| {
            format!(
                "cannot attach to tracepoint syscalls/{program} (is {}/events/syscalls/{program} present?)",
                tracefs::TRACEFS
            )
        })?;
    }
    Ok(mounted_tracefs)
}

/// A map removal's result, where a key that was not there is no error.
fn unless_absent(
    removed: std::result::Result<(), aya::maps::MapError>,
) -> std::result::Result<(), aya::maps::MapError> {
    match removed {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Trees the programs can watch at once (the size of `WATCHED_DIRS`).
pub const MAX_ROOTS: usize = diffkeeper_common::MAX_WATCHED_DIRS as usize;

impl Tracer {
    /// Loads the programs with this kernel's struct offsets, attaches the
    /// ctime hooks, and the syscall tracepoints where `syscalls` asks for
    /// them, and watches the trees under `roots` (root `i` is `roots[i]`;
    /// more can be added and removed while it runs, see [`Tracer::watch`]).
    pub fn start(roots: &[&Path], syscalls: SyscallHooks) -> Result<Tracer> {
        let offsets = btf::kernel_offsets(&btf::Btf::from_kernel()?)?;
        let mut loader = EbpfLoader::new();
        for (name, value) in &offsets {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| TracerError::Load {
                hint: privileges_hint(),
                source: Box::new(source),
            })?;
        // The programs log only on rare paths; without the log map they still work.
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!("eBPF log messages will not be shown: {e}");
                None
            }
        };
        let hooks = match (attach_ctime_hooks(&mut ebpf), syscalls) {
            (Err(why), _) => {
                tracing::warn!("{why}: attaching syscall tracepoints instead; writes through io_uring, sendfile and splice, and changes made from other mount namespaces, are caught by the rescan only");
                Hooks::Syscalls
            }
            (Ok(()), SyscallHooks::Always) => Hooks::CtimeAndSyscalls,
            (Ok(()), SyscallHooks::Auto) => Hooks::Ctime,
        };
        let mounted_tracefs = if hooks == Hooks::Ctime {
            false
        } else {
            attach_syscall_hooks(&mut ebpf)?
        };
        let mut tracer = Tracer {
            ebpf,
            logger,
            mounted_tracefs,
            hooks,
            roots: std::collections::HashMap::new(),
            malformed: 0,
            linked: std::collections::HashMap::new(),
            linked_full: false,
        };
        if hooks == Hooks::Syscalls {
            // Without the ctime hooks, a create by open() reports no entry
            // change: the kernel side must forget memberships on every
            // removal (which frees inode numbers) and rename.
            tracer
                .generation()?
                .set(1, 1, 0)
                .context("cannot set GENERATION[1]")?;
        }
        for (index, root) in roots.iter().enumerate() {
            tracer.watch(index as u32, root)?;
        }
        Ok(tracer)
    }

    /// The hooks this tracer reports through.
    pub fn hooks(&self) -> Hooks {
        self.hooks
    }

    /// Starts watching the tree at `path` as root `id` (an id of the
    /// caller's choosing, carried by its events), with the programs
    /// running. A tree on a file system with coarse ctimes gets the syscall
    /// tracepoints attached, if they are not yet.
    pub fn watch(&mut self, id: u32, path: &Path) -> Result<()> {
        if self.roots.contains_key(&id) {
            return Err(TracerError::AlreadyWatched(id));
        }
        if self.roots.len() >= MAX_ROOTS {
            return Err(TracerError::TooManyRoots {
                path: path.to_path_buf(),
                max: MAX_ROOTS,
            });
        }
        let mut keys = vec![inode_key(path)?];
        let kind = fs_type(path)?;
        let mut coarse = coarse_ctime(path, kind);
        if coarse.is_some() && kind == OVERLAYFS_MAGIC {
            match overlay_upper(path)? {
                Ok(upper) => {
                    tracing::info!(
                        "{} is on overlayfs: its changes are seen on its upper directory {}",
                        path.display(),
                        upper.display()
                    );
                    keys.push(inode_key(&upper)?);
                    coarse = None;
                }
                Err(why) => coarse = Some(format!("{} is on overlayfs and {why}", path.display())),
            }
        }
        if self.hooks == Hooks::Ctime {
            if let Some(why) = coarse {
                tracing::info!(
                    "{why}: attaching syscall tracepoints too, for writes in the clock tick of a capture"
                );
                self.mounted_tracefs |= attach_syscall_hooks(&mut self.ebpf)?;
                self.hooks = Hooks::CtimeAndSyscalls;
            }
        }
        {
            let mut watched = self.watched_dirs()?;
            for key in &keys {
                watched
                    .insert(key, id, 0)
                    .with_context(|| format!("cannot watch {}", path.display()))?;
            }
        }
        self.roots.insert(id, keys);
        if let Err(e) = self.set_root_path(id, Some(path)) {
            tracing::warn!("{}", e.chain());
        }
        // Files under the new tree may be cached as outside every tree.
        self.forget_memberships()
    }

    /// Stops watching root `id`; its later changes are not reported.
    pub fn unwatch(&mut self, id: u32) -> Result<()> {
        let Some(keys) = self.roots.remove(&id) else {
            return Err(TracerError::NotWatched(id));
        };
        {
            let mut watched = self.watched_dirs()?;
            for key in &keys {
                unless_absent(watched.remove(key))
                    .with_context(|| format!("cannot stop watching root {id}"))?;
            }
        }
        self.set_root_path(id, None)?;
        self.clear(&InodeKey::namespace(id))?;
        self.set_linked(id, &HashSet::new(), true)?;
        self.linked.remove(&id);
        // Files cached as under it are not any more.
        self.forget_memberships()
    }

    /// Lists `files` (of root `id`) as also having a name outside every
    /// tree, so the programs attribute a write through that name to `id`:
    /// as all of them when `complete` (the tree was walked: others are
    /// dropped), else in addition. Returns the files newly listed; a write
    /// through the outside name before this call was not reported, so the
    /// caller looks at them once more. Past [`diffkeeper_common::MAX_LINKED`]
    /// files, the rest are left to the rescan (said once).
    pub fn set_linked(
        &mut self,
        id: u32,
        files: &HashSet<InodeKey>,
        complete: bool,
    ) -> Result<Vec<InodeKey>> {
        let map = self
            .ebpf
            .map_mut(names::LINKED)
            .context("the eBPF object has no LINKED map")?;
        let mut map: HashMap<&mut MapData, InodeKey, u32> = HashMap::try_from(map)?;
        // Kept equal to what the map holds for `id`, key by key, so a
        // failure midway leaves them agreeing.
        let listed = self.linked.entry(id).or_default();
        if complete {
            let gone: Vec<InodeKey> = listed.difference(files).copied().collect();
            for key in gone {
                unless_absent(map.remove(&key)).context("cannot update the LINKED map")?;
                listed.remove(&key);
            }
        }
        let mut added = Vec::new();
        for key in files {
            if listed.contains(key) {
                continue;
            }
            match map.insert(key, id, 0) {
                Ok(()) => {
                    listed.insert(*key);
                    added.push(*key);
                }
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error()
                        == Some(rustix::io::Errno::TOOBIG.raw_os_error()) =>
                {
                    if !self.linked_full {
                        self.linked_full = true;
                        tracing::warn!(
                            "more than {} files in the trees have a hard link outside them: writes through the outside names of the others are seen by the rescan only",
                            diffkeeper_common::MAX_LINKED
                        );
                    }
                    break;
                }
                Err(e) => return Err(e).context("cannot update the LINKED map"),
            }
        }
        if !added.is_empty() {
            // Some may be cached as outside every tree.
            self.forget_memberships()?;
        }
        Ok(added)
    }

    /// The map of watched directories to their root ids.
    fn watched_dirs(&mut self) -> Result<HashMap<&mut MapData, InodeKey, u32>> {
        let map = self
            .ebpf
            .map_mut(names::WATCHED_DIRS)
            .context("the eBPF object has no WATCHED_DIRS map")?;
        Ok(HashMap::try_from(map)?)
    }

    /// Sets (or clears) root `id`'s absolute path for the syscall
    /// tracepoints' path-based calls; only the first [`MAX_PATH_ROOTS`]
    /// ids have one.
    fn set_root_path(&mut self, id: u32, path: Option<&Path>) -> Result<()> {
        if id >= MAX_PATH_ROOTS {
            if self.hooks != Hooks::Ctime && path.is_some() {
                tracing::warn!("the syscall tracepoints compare absolute paths for roots 0 to {} only: absolute-path changes under root {id} are left to the ctime hooks and the rescan", MAX_PATH_ROOTS - 1);
            }
            return Ok(());
        }
        let mut entry = RootPath {
            len: 0,
            pad: 0,
            bytes: [0; PATH_BYTES],
        };
        if let Some(path) = path {
            let canonical = std::fs::canonicalize(path)
                .with_context(|| format!("cannot resolve {}", path.display()))?;
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(canonical.as_os_str());
            if bytes.len() >= PATH_BYTES {
                unsupported!("{}: path longer than {PATH_BYTES} bytes: absolute-path changes under it are left to the ctime hooks and the rescan", canonical.display());
            }
            entry.len = bytes.len() as u32;
            entry.bytes[..bytes.len()].copy_from_slice(bytes);
        }
        let map = self
            .ebpf
            .map_mut(names::ROOT_PATHS)
            .context("the eBPF object has no ROOT_PATHS map")?;
        let mut paths: aya::maps::Array<&mut MapData, RootPath> = aya::maps::Array::try_from(map)?;
        paths.set(id, entry, 0).context("cannot fill ROOT_PATHS")
    }

    /// The generation cached memberships are checked against: it moves
    /// when they are all forgotten.
    pub fn membership_generation(&mut self) -> Result<u32> {
        self.generation()?
            .get(&0, 0)
            .context("cannot read GENERATION")
    }

    /// The `GENERATION` map: `[0]` the generation, `[1]` whether the
    /// syscall programs bump it on removals and renames.
    fn generation(&mut self) -> Result<aya::maps::Array<&mut MapData, u32>> {
        let map = self
            .ebpf
            .map_mut(names::GENERATION)
            .context("the eBPF object has no GENERATION map")?;
        Ok(aya::maps::Array::try_from(map)?)
    }

    /// Makes the programs walk up the dentries again for every file's
    /// membership: called before a tree whose entries changed is walked,
    /// as renames and links may have moved files into it that were cached
    /// as outside every tree (directories are never cached), and when
    /// trees are added or removed.
    pub fn forget_memberships(&mut self) -> Result<()> {
        let mut generation = self.generation()?;
        let now = generation.get(&0, 0).context("cannot read GENERATION")?;
        generation
            .set(0, now.wrapping_add(1), 0)
            .context("cannot bump GENERATION")
    }

    /// Clears an inode's dirty mark, so its next write is reported again.
    pub fn clear(&mut self, key: &InodeKey) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(names::DIRTY)
            .context("the eBPF object has no DIRTY map")?;
        let mut dirty: HashMap<&mut MapData, InodeKey, u8> = HashMap::try_from(map)?;
        // Not marked (never reported, or taken already): nothing to do.
        unless_absent(dirty.remove(key)).context("cannot clear a DIRTY mark")
    }

    /// The kernel counters, summed over CPUs, by [`counter`] slot.
    pub fn counters(&self) -> Result<[u64; counter::COUNT as usize]> {
        let map = self
            .ebpf
            .map(names::COUNTERS)
            .context("the eBPF object has no COUNTERS map")?;
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut out = [0u64; counter::COUNT as usize];
        for (slot, total) in out.iter_mut().enumerate() {
            *total = counters.get(&(slot as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// Changes the kernel counted under each of `roots` (by id), summed
    /// over CPUs and roots: it moves on every write and namespace change
    /// there, dirty mark or not.
    pub fn root_changes(&self, roots: &[u32]) -> Result<u64> {
        let map = self
            .ebpf
            .map(names::ROOT_CHANGES)
            .context("the eBPF object has no ROOT_CHANGES map")?;
        let counts: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut total = 0u64;
        for &root in roots {
            let slot = root.min(diffkeeper_common::MAX_COUNTED_ROOTS - 1);
            total = total.wrapping_add(counts.get(&slot, 0)?.iter().sum());
        }
        Ok(total)
    }

    /// A descriptor that polls readable when events wait in the ring
    /// buffer, to sleep on between drains.
    pub fn events_fd(&self) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        let map = self
            .ebpf
            .map(names::EVENTS)
            .context("the eBPF object has no EVENTS map")?;
        let ring: RingBuf<&MapData> = RingBuf::try_from(map)?;
        ring.as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate the ring buffer descriptor")
    }

    /// Takes every event waiting in the ring buffer. A record that does not
    /// decode is skipped and counted (see [`Tracer::take_malformed`]); the
    /// rest are kept.
    pub fn drain_events(&mut self) -> Result<Vec<WriteEvent>> {
        let map = self
            .ebpf
            .map_mut(names::EVENTS)
            .context("the eBPF object has no EVENTS map")?;
        let mut ring: RingBuf<&mut MapData> = RingBuf::try_from(map)?;
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            match WriteEvent::from_bytes(&item) {
                Some(event) => events.push(event),
                None => self.malformed += 1,
            }
        }
        Ok(events)
    }

    /// How many ring-buffer records did not decode since the last call:
    /// what they named is unknown, so the caller must look at everything.
    pub fn take_malformed(&mut self) -> usize {
        std::mem::take(&mut self.malformed)
    }

    /// Passes the programs' pending log records to `tracing`.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }
}

/// What `diffkeeper doctor` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelfTestReport {
    pub kernel: String,
    /// The hooks the tracer reported through.
    pub hooks: Hooks,
    pub mounted_tracefs: bool,
    /// Data-changing calls the test made on files under the watched tree
    /// (two creating opens and the writes), and the bytes write/pwrite64
    /// asked for.
    pub writes_made: u64,
    pub bytes_made: u64,
    /// What the syscall tracepoints counted on watched files (0 when only
    /// the ctime hooks are attached).
    pub writes_seen: u64,
    pub bytes_seen: u64,
    /// New ctimes stamped on watched files: at least one per file and
    /// round, at most one per write.
    pub stamps_seen: u64,
    pub events: u64,
    pub ringbuf_full: u64,
    /// Events in the first round (three watched files, one of them moved
    /// in from outside by a rename), and after their marks were cleared
    /// (two files written again).
    pub events_first_round: u64,
    pub events_after_clear: u64,
    /// Events about the file written only outside the watched tree.
    pub events_outside: u64,
    /// Path-based changes (two mkdirs, a rename in) the kernel counted
    /// under the tree, and the events reporting them (one until cleared).
    pub namespace_seen: u64,
    pub namespace_events: u64,
    /// Whether every event's inode, device and root match what `stat` says.
    pub inodes_match: bool,
}

impl fmt::Display for SelfTestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kernel {}: eBPF programs load and attach; changes reported through {}",
            self.kernel, self.hooks
        )?;
        if self.mounted_tracefs {
            writeln!(
                f,
                "tracefs was not mounted; mounted it at {}",
                tracefs::TRACEFS
            )?;
        }
        writeln!(
            f,
            "writes under the watched tree: made {} ({} bytes); syscall tracepoints saw {} ({} bytes); the kernel stamped {} new ctimes",
            self.writes_made, self.bytes_made, self.writes_seen, self.bytes_seen, self.stamps_seen
        )?;
        writeln!(
            f,
            "events: {} for 3 dirty files ({} after clearing marks, 2 expected), {} for the file outside, ring buffer full {} times",
            self.events_first_round, self.events_after_clear, self.events_outside, self.ringbuf_full
        )?;
        writeln!(
            f,
            "entry changes under the tree: {} seen (3 made), reported by {} event",
            self.namespace_seen, self.namespace_events
        )?;
        write!(
            f,
            "file identity resolved in the kernel (BTF offsets): {}",
            if self.inodes_match {
                "matches stat"
            } else {
                "DOES NOT match stat"
            }
        )
    }
}

/// Calls per file in each round of the self-test.
const SELF_TEST_WRITES: u64 = 500;
const SELF_TEST_WRITE_BYTES: usize = 100;

/// Watches a temporary tree, writes inside it (in a subdirectory made after
/// the watch started, and to a file renamed in from outside) and outside
/// it, and checks what the kernel side counted and reported. Between rounds
/// it does what a capture does: forgets memberships after entries changed,
/// clears the marks it took, and stats the files before the next writes.
pub fn self_test(syscalls: SyscallHooks) -> Result<SelfTestReport> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let watched = dir.path().join("watched");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&watched).context("cannot create a test directory")?;
    std::fs::create_dir(&outside).context("cannot create a test directory")?;
    let mut tracer = Tracer::start(&[&watched], syscalls)?;

    let create = |path: &Path| {
        File::create(path).with_context(|| format!("cannot create {}", path.display()))
    };
    // Two mkdir calls (create_dir_all would try the deep one first).
    std::fs::create_dir(watched.join("sub")).context("cannot create a test directory")?;
    std::fs::create_dir(watched.join("sub/deeper")).context("cannot create a test directory")?;
    let mut a = create(&watched.join("a"))?;
    let b = create(&watched.join("sub/deeper/b"))?;
    let mut c = create(&outside.join("c"))?;
    let mut d = create(&outside.join("d"))?;
    let block = [0x5au8; SELF_TEST_WRITE_BYTES];
    let writes = |file: &mut File| -> Result<()> {
        for _ in 0..SELF_TEST_WRITES {
            file.write_all(&block).context("test write failed")?;
        }
        Ok(())
    };
    let pwrites = |file: &File| -> Result<()> {
        for i in 0..SELF_TEST_WRITES {
            file.write_all_at(&block, i * SELF_TEST_WRITE_BYTES as u64)
                .context("test write failed")?;
        }
        Ok(())
    };

    // As a capture does: entries changed, so memberships are forgotten,
    // and the walk stats each file before reading it (after which the
    // kernel stamps the next change with a new ctime, even in this tick).
    let mut first = tracer.drain_events()?;
    let settle = |tracer: &mut Tracer, events: &[WriteEvent], files: &[&File]| -> Result<()> {
        if events.iter().any(WriteEvent::is_namespace) {
            tracer.forget_memberships()?;
        }
        for file in files {
            rustix::fs::fstat(file).context("cannot stat a test file")?;
        }
        Ok(())
    };
    settle(&mut tracer, &first, &[&a, &b, &c, &d])?;
    writes(&mut a)?;
    pwrites(&b)?;
    writes(&mut c)?;
    writes(&mut d)?; // outside: not counted
    std::fs::rename(outside.join("d"), watched.join("d")).context("cannot rename a test file")?;
    first.extend(tracer.drain_events()?);
    settle(&mut tracer, &first, &[&d])?;
    writes(&mut d)?; // now inside
    first.extend(tracer.drain_events()?);
    for event in &first {
        tracer.clear(&event.key())?;
    }
    settle(&mut tracer, &[], &[&a, &b])?;
    writes(&mut a)?;
    pwrites(&b)?;
    let second = tracer.drain_events()?;
    tracer.flush_logs();

    let keys = [
        (
            0u32,
            key_of_stat(&rustix::fs::fstat(&a).context("cannot stat a test file")?),
        ),
        (
            0,
            key_of_stat(&rustix::fs::fstat(&b).context("cannot stat a test file")?),
        ),
        (
            0,
            key_of_stat(&rustix::fs::fstat(&d).context("cannot stat a test file")?),
        ),
    ];
    let outside_key = key_of_stat(&rustix::fs::fstat(&c).context("cannot stat a test file")?);
    let (namespace, first): (Vec<WriteEvent>, Vec<WriteEvent>) =
        first.into_iter().partition(|e| e.is_namespace());
    let inodes_match = !first.is_empty()
        && first.iter().chain(&second).all(|e| {
            keys.iter()
                .any(|(root, key)| e.key() == *key && e.root == *root)
        });
    let counters = tracer.counters()?;
    let kernel = rustix::system::uname();
    Ok(SelfTestReport {
        kernel: kernel.release().to_string_lossy().into_owned(),
        hooks: tracer.hooks(),
        mounted_tracefs: tracer.mounted_tracefs,
        // The two creating opens inside the tree count as changes too.
        writes_made: 5 * SELF_TEST_WRITES + 2,
        bytes_made: 5 * SELF_TEST_WRITES * SELF_TEST_WRITE_BYTES as u64,
        writes_seen: counters[counter::WRITES as usize],
        bytes_seen: counters[counter::BYTES as usize],
        stamps_seen: counters[counter::STAMPS as usize],
        events: counters[counter::EVENTS as usize],
        ringbuf_full: counters[counter::RINGBUF_FULL as usize],
        events_first_round: first.len() as u64,
        events_after_clear: second.len() as u64,
        events_outside: first
            .iter()
            .chain(&second)
            .filter(|e| e.key() == outside_key)
            .count() as u64,
        namespace_seen: counters[counter::NAMESPACE as usize],
        namespace_events: namespace.len() as u64,
        inodes_match,
    })
}
