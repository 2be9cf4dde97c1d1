//! DiffKeeper's eBPF programs, loaded by `diffkeeper::events`.
//!
//! Two sets of programs report "this inode under that watched root is
//! dirty" through the `EVENTS` ring buffer, once per inode until userspace
//! clears its mark in `DIRTY`:
//!
//! - **BTF tracepoints on the kernel's ctime stamping** (`timestamp:
//!   ctime_ns_xchg`, `timestamp:inode_set_ctime_to_ts`, see [`on_ctime`]).
//!   Every change to a file's data, size or mode, and every entry made or
//!   removed in a directory, stamps a new ctime on the inode, whatever made
//!   it (the write family, io_uring inline or from io-wq workers, libaio,
//!   sendfile, splice, copy_file_range, O_DIRECT, fallocate, truncate, a
//!   store through a shared mapping) and from any mount namespace, chroot
//!   or bind mount: the program gets the inode itself and finds its root
//!   by walking up its dentry's parents. They run only when a ctime
//!   changes, so they cost nothing on syscalls that change no file (no
//!   task takes the slow syscall path), and a few ns per write elsewhere
//!   (`cargo xtask bench tracer`: 3-11 ns per 4 KiB pwrite, from the
//!   kernel's `run_time_ns`). On ext4, XFS, Btrfs and tmpfs (multigrain
//!   timestamps, Linux 6.13) a change made after the ctime was read by a
//!   stat always gets a new ctime, and DiffKeeper stats each file before it
//!   reads it, so these alone see every change after a capture.
//! - **Syscall tracepoints** (32 `syscalls:sys_enter_*`/`sys_exit_*`): the
//!   write family, ftruncate, fallocate, copy_file_range, creating opens
//!   and shared writable mmaps by descriptor, and the path-based calls
//!   (unlink, rename, mkdir, chmod...) by path. Userspace attaches them
//!   only for trees on other file systems, which stamp a ctime at most once
//!   per clock tick (a write in the tick of a capture's read would stamp
//!   nothing), on kernels without the ctime tracepoints, or when asked
//!   (`--syscall-hooks`). Any syscall tracepoint puts every syscall of every
//!   task on the node on the slow path, and each builds a perf record
//!   before the program runs: measured 550-730 ns per pwrite, and getpid at
//!   0.72x.
//!
//! Memberships (which root a file inode is under) are cached per inode in
//! `MEMBERSHIP` with the `GENERATION` they were found at and the inode's
//! `i_generation` (a deleted file's number goes to the next file made
//! anywhere in its ext4 group at once). Userspace bumps
//! the generation before it walks a tree whose entries changed, as a
//! rename or link may have moved in a file cached as outside; without the
//! ctime hooks, the syscall programs also bump it on every rename and
//! removal. Directories are never
//! cached (a renamed directory's ctime is stamped before its dentry moves).
//! A file in a tree that also has a name outside every tree (a hard link)
//! walks up to no root from that name: userspace lists such files, which
//! it learns from the link count of every file it stats, in `LINKED`, and
//! a walk that finds no root looks there.
//! So creates and unlinks elsewhere on the node cost a directory walk each
//! and invalidate nothing. Writes anywhere else cost a few map lookups and
//! no ring buffer traffic; a million writes to one file between two
//! captures cost one event.
//!
//! What fires for a change to a clean file, seen on this kernel (6.18) with
//! an ftrace instance filtered on the file's inode (C: `ctime_ns_xchg`, M:
//! `writeback_mark_inode_dirty`, F: `writeback_dirty_folio`):
//!
//! | change | ext4 | tmpfs | in which task |
//! |---|---|---|---|
//! | write, pwrite | C M F | C M | the writer |
//! | store through a shared mapping | C M F | C M | the writer (page fault) |
//! | io_uring write, inline or IOSQE_ASYNC | C M F | C M | `iou-wrk-<pid>`, same tgid |
//! | sendfile, splice, copy_file_range | C M F | C M | the caller |
//! | O_DIRECT write | C M | C M | the caller |
//! | fallocate | C M | C (M not on punch) | the caller |
//! | truncate | C M | C (M not on shrink) | the caller |
//!
//! So the ctime hooks are the ones that see everything. F misses tmpfs,
//! O_DIRECT, fallocate, truncate and a folio that is already dirty. M misses
//! some tmpfs changes, and it also fires on atime updates, so DiffKeeper's
//! own reads would count as writes. The kernel stamps a ctime at most once
//! per tick (4 ms here) unless the time was read by a stat since then. That
//! is enough: the DIRTY mark stays until a capture, and the capture stats
//! what it reads (`tests/ebpf.rs` checks that a write right after a stat is
//! reported, thousands of times in a row, on ext4 and tmpfs). What no hook
//! sees: stores through a mapping whose page is still writable (until
//! writeback makes it read-only again). So userspace writes back a mapped
//! file's dirty pages before each capture of it (after a stat): its next
//! store faults and stamps. On tmpfs, whose pages never turn read-only,
//! mapped files are read every second while their mappers live. On overlayfs
//! the ctime hooks see the upper inode, whose dentries are in the upper
//! layer, not under the watched directory: userspace watches the tree's
//! upper directory too (from the mount's `upperdir`). A tree only in a
//! lower layer, or whose upper layer this mount namespace cannot see, gets
//! the syscall tracepoints.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_probe_read_kernel, bpf_probe_read_user_str_bytes,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use diffkeeper_common::{
    counter, InodeKey, Membership, RootPath, WriteEvent, MAX_COUNTED_ROOTS, MAX_LINKED,
    MAX_PATH_ROOTS, MAX_WALK_DEPTH, MAX_WATCHED_DIRS, PATH_BYTES,
};

/// Offsets of syscall arguments in `syscalls:sys_enter_*` records: 8 bytes
/// of common fields, the syscall number padded to 8, then 8 bytes an
/// argument.
const ARG0: usize = 16;
const ARG2: usize = 32;

// Kernel struct field offsets, set by userspace from the running kernel's
// BTF before loading (no CO-RE for Rust programs). Read with
// `read_volatile` so the compiler cannot fold the zero initialisers.
#[no_mangle]
static OFF_TASK_FILES: u32 = 0;
#[no_mangle]
static OFF_FILES_FDT: u32 = 0;
#[no_mangle]
static OFF_FDT_FD: u32 = 0;
#[no_mangle]
static OFF_FILE_INODE: u32 = 0;
#[no_mangle]
static OFF_FILE_DENTRY: u32 = 0;
#[no_mangle]
static OFF_DENTRY_PARENT: u32 = 0;
#[no_mangle]
static OFF_DENTRY_INODE: u32 = 0;
#[no_mangle]
static OFF_INODE_INO: u32 = 0;
#[no_mangle]
static OFF_INODE_SB: u32 = 0;
#[no_mangle]
static OFF_SB_DEV: u32 = 0;
#[no_mangle]
static OFF_TASK_FS: u32 = 0;
#[no_mangle]
static OFF_FS_PWD_DENTRY: u32 = 0;
#[no_mangle]
static OFF_INODE_DENTRY: u32 = 0;
#[no_mangle]
static OFF_DENTRY_ALIAS: u32 = 0;
#[no_mangle]
static OFF_INODE_MODE: u32 = 0;
#[no_mangle]
static OFF_INODE_GENERATION: u32 = 0;
#[no_mangle]
static OFF_INODE_MAPPING: u32 = 0;
#[no_mangle]
static OFF_MAPPING_WRITABLE: u32 = 0;

/// `S_IFMT` and `S_IFDIR` of `inode.i_mode`.
const S_IFMT: u16 = 0o170_000;
const S_IFDIR: u16 = 0o040_000;

const AT_FDCWD: i64 = -100;

/// Watched roots' absolute paths (index = root), for absolute-path calls.
#[map(name = "ROOT_PATHS")]
static ROOT_PATHS: Array<RootPath> = Array::with_max_entries(MAX_PATH_ROOTS, 0);

/// Per-CPU room to read a path argument into.
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<RootPath> = PerCpuArray::with_max_entries(1, 0);

/// Watched directories (the roots) by inode, to their root index.
#[map(name = "WATCHED_DIRS")]
static WATCHED_DIRS: HashMap<InodeKey, u32> = HashMap::with_max_entries(MAX_WATCHED_DIRS, 0);

/// Per file inode: which root it is under, as of a rename generation.
#[map(name = "MEMBERSHIP")]
static MEMBERSHIP: LruHashMap<InodeKey, Membership> = LruHashMap::with_max_entries(131_072, 0);

/// `[0]`: cached memberships older than it are re-walked; bumped by
/// userspace, and by renames and removals when `[1]` is set (see
/// [`bump_generation`]).
#[map(name = "GENERATION")]
static GENERATION: Array<u32> = Array::with_max_entries(2, 0);

/// Files in a tree that also have a name outside every tree, to their
/// root. A write through that other name (opened there, or its dentry the
/// first of the inode's) walks up to no root: userspace, which stats
/// every file it reads, lists them here. Allocated as used.
#[map(name = "LINKED")]
static LINKED: HashMap<InodeKey, u32> =
    HashMap::with_max_entries(MAX_LINKED, BPF_F_NO_PREALLOC as u32);

/// Inodes reported and not yet taken by userspace.
#[map(name = "DIRTY")]
static DIRTY: LruHashMap<InodeKey, u8> = LruHashMap::with_max_entries(65_536, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map(name = "ROOT_CHANGES")]
static ROOT_CHANGES: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_COUNTED_ROOTS, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// A write-family call: `fd` at ARG0 and a byte count at ARG2.
macro_rules! counted_write {
    ($name:ident) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            // SAFETY: ARG2 is inside the record (the kernel's `format` file).
            let bytes = unsafe { ctx.read_at::<u64>(ARG2) }.unwrap_or(0);
            on_change(&ctx, ARG0, bytes);
            0
        }
    };
}

/// A call that changes data through the descriptor at `$arg`.
macro_rules! changes_fd {
    ($name:ident, $arg:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            on_change(&ctx, $arg, 0);
            0
        }
    };
}

counted_write!(sys_enter_write);
counted_write!(sys_enter_pwrite64);
changes_fd!(sys_enter_writev, ARG0);
changes_fd!(sys_enter_pwritev, ARG0);
changes_fd!(sys_enter_pwritev2, ARG0);
changes_fd!(sys_enter_ftruncate, ARG0);
changes_fd!(sys_enter_fallocate, ARG0);
changes_fd!(sys_enter_copy_file_range, ARG2);

/// The kernel stamped a new ctime on `inode` (the first argument of both
/// `timestamp:` tracepoints): its data, size, mode or entries changed,
/// whatever made the change: the write family, io_uring (inline or from
/// an io-wq worker), sendfile, splice, copy_file_range, O_DIRECT, a store
/// through a shared mapping after writeback made its page read-only again,
/// fallocate, truncate, in any mount namespace, on ext4 and tmpfs alike.
/// A directory's ctime moves when an entry in it is created, removed or
/// renamed, so these also report namespace changes made from anywhere. The
/// kernel stamps at most once per clock tick unless the time was looked at
/// (a stat) since: enough, as the mark in DIRTY stays until a capture,
/// which stats what it reads. Atime updates do not touch ctime, so
/// DiffKeeper's own reads report nothing.
fn on_ctime(ctx: &BtfTracePointContext) {
    // Argument 0 of both tracepoints is the `struct inode *`.
    let inode: u64 = ctx.arg(0);
    let mode: u16 = read(inode, offset(&OFF_INODE_MODE)).unwrap_or(0);
    if mode & S_IFMT == S_IFDIR {
        // A directory's entries changed: a namespace change of its tree,
        // one mark with those the path-based calls report. Directories are
        // walked each time, never cached: a renamed directory's ctime is
        // stamped before the rename moves its dentry, so a cached place
        // would already be stale.
        let Some(root) = first_dentry(inode).and_then(root_of_dentry) else {
            return;
        };
        bump(counter::NAMESPACE, 1);
        count_change(root);
        report(ctx, InodeKey::namespace(root), root, 0, 0, 0);
        return;
    }
    let Some(key) = key_of_inode(inode) else {
        return;
    };
    let Some(root) = root_of_inode(inode, &key) else {
        return;
    };
    bump(counter::STAMPS, 1);
    count_change(root);
    // A file with shared writable mappings (`i_mapping->i_mmap_writable`)
    // is reported at every stamp, as each page it dirties through them
    // stamps it: userspace must learn of the mapping even when the file is
    // already marked.
    let mapping: u64 = read(inode, offset(&OFF_INODE_MAPPING)).unwrap_or(0);
    let writable_maps: i32 = read(mapping, offset(&OFF_MAPPING_WRITABLE)).unwrap_or(0);
    let flags = if writable_maps > 0 {
        let _ = DIRTY.remove(&key);
        WriteEvent::MAPPED
    } else {
        0
    };
    report(ctx, key, root, 0, 0, flags);
}

#[btf_tracepoint(function = "ctime_ns_xchg")]
pub fn ctime_ns_xchg(ctx: BtfTracePointContext) -> i32 {
    on_ctime(&ctx);
    0
}

#[btf_tracepoint(function = "inode_set_ctime_to_ts")]
pub fn inode_set_ctime_to_ts(ctx: BtfTracePointContext) -> i32 {
    on_ctime(&ctx);
    0
}

/// Invalidates every cached membership when userspace asked for it
/// (`GENERATION[1]`, set when the ctime hooks are missing): renames move
/// inodes between trees; removals free inode numbers that a new file,
/// anywhere, may get. With the ctime hooks, every way into a tree stamps a
/// directory in it, and userspace forgets the memberships before it walks
/// that tree: an unlink elsewhere on the node invalidates nothing.
fn bump_generation() {
    if GENERATION.get(1).copied().unwrap_or(1) == 0 {
        return;
    }
    if let Some(generation) = GENERATION.get_ptr_mut(0) {
        // SAFETY: a u32 in an array map; a lost increment under a race
        // still leaves the generation changed.
        unsafe { *generation = (*generation).wrapping_add(1) };
    }
}

/// Path-based namespace calls: (dirfd argument or AT_FDCWD, path argument).
macro_rules! namespace {
    ($name:ident, cwd, $path:expr, removes) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            bump_generation();
            // SAFETY: the path argument is inside the record.
            if let Ok(path) = unsafe { ctx.read_at::<u64>($path) } {
                namespace_change(&ctx, AT_FDCWD, path);
            }
            0
        }
    };
    ($name:ident, $dirfd:expr, $path:expr, removes) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            bump_generation();
            // SAFETY: both arguments are inside the record.
            let (dirfd, path) = unsafe { (ctx.read_at::<i64>($dirfd), ctx.read_at::<u64>($path)) };
            if let (Ok(dirfd), Ok(path)) = (dirfd, path) {
                namespace_change(&ctx, dirfd, path);
            }
            0
        }
    };
    ($name:ident, cwd, $path:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            // SAFETY: the path argument is inside the record.
            if let Ok(path) = unsafe { ctx.read_at::<u64>($path) } {
                namespace_change(&ctx, AT_FDCWD, path);
            }
            0
        }
    };
    ($name:ident, $dirfd:expr, $path:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            // SAFETY: both arguments are inside the record.
            let (dirfd, path) = unsafe { (ctx.read_at::<i64>($dirfd), ctx.read_at::<u64>($path)) };
            if let (Ok(dirfd), Ok(path)) = (dirfd, path) {
                namespace_change(&ctx, dirfd, path);
            }
            0
        }
    };
}

namespace!(sys_enter_unlink, cwd, ARG0, removes);
namespace!(sys_enter_unlinkat, ARG0, 24, removes);
namespace!(sys_enter_mkdir, cwd, ARG0);
namespace!(sys_enter_mkdirat, ARG0, 24);
namespace!(sys_enter_rmdir, cwd, ARG0, removes);
namespace!(sys_enter_symlink, cwd, 24);
namespace!(sys_enter_symlinkat, 24, ARG2);
namespace!(sys_enter_link, cwd, 24);
namespace!(sys_enter_linkat, ARG2, 40);
namespace!(sys_enter_chmod, cwd, ARG0);
namespace!(sys_enter_fchmodat, ARG0, 24);
namespace!(sys_enter_fchmodat2, ARG0, 24);
namespace!(sys_enter_truncate, cwd, ARG0);
changes_fd!(sys_enter_fchmod, ARG0);

/// Flags of opens in flight, by thread, from enter to exit (where the new
/// descriptor is known).
#[map(name = "OPENING")]
static OPENING: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16_384, 0);

const O_CREAT: u64 = 0o100;
const O_TRUNC: u64 = 0o1000;
const PROT_WRITE: u64 = 0x2;
const MAP_SHARED: u64 = 0x1;

/// An open that may create or truncate: remember its flags for the exit.
macro_rules! opening {
    ($name:ident, $flags_arg:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            // SAFETY: the flags argument is inside the record.
            let flags = unsafe { ctx.read_at::<u64>($flags_arg) }.unwrap_or(0);
            if flags & (O_CREAT | O_TRUNC) != 0 {
                let tid = bpf_get_current_pid_tgid() as u32;
                let _ = OPENING.insert(&tid, &flags, 0);
            }
            0
        }
    };
}

opening!(sys_enter_openat, ARG2);
opening!(sys_enter_open, 24);

/// `creat` always creates or truncates.
#[tracepoint]
pub fn sys_enter_creat(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = OPENING.insert(&tid, &(O_CREAT | O_TRUNC), 0);
    0
}

/// The exit of a creating open: the new descriptor's file is dirty.
macro_rules! opened {
    ($name:ident) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            let tid = bpf_get_current_pid_tgid() as u32;
            // SAFETY: a presence check only.
            if unsafe { OPENING.get(&tid) }.is_none() {
                return 0;
            }
            let _ = OPENING.remove(&tid);
            // SAFETY: `ret` is the first field after the syscall number.
            let ret = unsafe { ctx.read_at::<i64>(ARG0) }.unwrap_or(-1);
            if ret >= 0 {
                mark_fd_dirty(&ctx, ret as u64, 0, 0);
            }
            0
        }
    };
}

opened!(sys_exit_openat);
opened!(sys_exit_open);
opened!(sys_exit_creat);

/// A shared writable mapping: the file may change with no further syscall,
/// so it is marked dirty when mapped.
#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    // SAFETY: prot, flags and fd are inside the record (offsets 32, 40, 48).
    let (prot, flags, fd) = unsafe {
        (
            ctx.read_at::<u64>(32).unwrap_or(0),
            ctx.read_at::<u64>(40).unwrap_or(0),
            ctx.read_at::<i64>(48).unwrap_or(-1),
        )
    };
    if prot & PROT_WRITE != 0 && flags & MAP_SHARED != 0 && fd >= 0 {
        mark_fd_dirty(&ctx, fd as u64, 0, WriteEvent::MAPPED);
    }
    0
}

/// Renames move inodes between trees: invalidate every cached membership,
/// and report the change at both ends.
macro_rules! renames {
    ($name:ident, $olddfd:expr, $old:expr, $newdfd:expr, $new:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            bump_generation();
            // SAFETY: the arguments are inside the record.
            let (old, new) = unsafe { (ctx.read_at::<u64>($old), ctx.read_at::<u64>($new)) };
            let dirfd = |arg: usize| -> i64 {
                if arg == 0 {
                    AT_FDCWD
                } else {
                    // SAFETY: as above.
                    unsafe { ctx.read_at::<i64>(arg) }.unwrap_or(AT_FDCWD)
                }
            };
            if let Ok(old) = old {
                namespace_change(&ctx, dirfd($olddfd), old);
            }
            if let Ok(new) = new {
                namespace_change(&ctx, dirfd($newdfd), new);
            }
            0
        }
    };
}

renames!(sys_enter_rename, 0, ARG0, 0, 24);
renames!(sys_enter_renameat, ARG0, 24, ARG2, 40);
renames!(sys_enter_renameat2, ARG0, 24, ARG2, 40);

fn offset(global: &u32) -> usize {
    // SAFETY: a plain read of a global the loader initialised.
    unsafe { core::ptr::read_volatile(global) as usize }
}

/// Reads a `T` at `base + off` from kernel memory.
fn read<T>(base: u64, off: usize) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copies through the kernel's fault-safe
    // path; a bad address makes it fail, never fault.
    unsafe { bpf_probe_read_kernel((base as usize + off) as *const T).ok() }
}

/// `task->files->fdt->fd[fd]` of the current task.
fn file_of_fd(fd: u64) -> Option<u64> {
    // SAFETY: the helper only returns the current task's address.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task, offset(&OFF_TASK_FILES))?;
    let fdt: u64 = read(files, offset(&OFF_FILES_FDT))?;
    let fd_array: u64 = read(fdt, offset(&OFF_FDT_FD))?;
    read(fd_array, (fd as usize).checked_mul(8)?)
}

/// The identity of an inode.
fn key_of_inode(inode: u64) -> Option<InodeKey> {
    let ino: u64 = read(inode, offset(&OFF_INODE_INO))?;
    let sb: u64 = read(inode, offset(&OFF_INODE_SB))?;
    let dev: u32 = read(sb, offset(&OFF_SB_DEV))?;
    Some(InodeKey { ino, dev, pad: 0 })
}

/// Which watched root `file` is under, if any: a walk up its dentry's
/// parents, cached in MEMBERSHIP until the next rename.
fn root_of(file: u64, inode: u64, key: &InodeKey) -> Option<u32> {
    cached_root(inode, key, || read(file, offset(&OFF_FILE_DENTRY)))
}

/// Which watched root `inode` is under, if any, from one of its dentries,
/// cached like [`root_of`]. An inode with no dentry (unlinked, or not yet
/// given its name) is under none, and nothing is cached for it.
fn root_of_inode(inode: u64, key: &InodeKey) -> Option<u32> {
    cached_root(inode, key, || first_dentry(inode))
}

/// One of `inode`'s dentries (`i_dentry`, a list of `dentry.d_u.d_alias`).
fn first_dentry(inode: u64) -> Option<u64> {
    let first: u64 = read(inode, offset(&OFF_INODE_DENTRY))?;
    if first == 0 {
        return None;
    }
    first.checked_sub(offset(&OFF_DENTRY_ALIAS) as u64)
}

/// The cached root of `key` (the number of `inode`), or else the walk from
/// `dentry()`, cached. A cached place counts only for the same inode: one
/// made since under a reused number has another `i_generation`.
#[inline(always)]
fn cached_root(inode: u64, key: &InodeKey, dentry: impl FnOnce() -> Option<u64>) -> Option<u32> {
    let generation = GENERATION.get(0).copied().unwrap_or(0);
    let inode_generation: u32 = read(inode, offset(&OFF_INODE_GENERATION)).unwrap_or(0);
    // SAFETY: copied out at once.
    if let Some(m) = unsafe { MEMBERSHIP.get(key) } {
        if m.generation == generation && m.inode_generation == inode_generation {
            return m.root_plus_one.checked_sub(1);
        }
    }
    let Some(dentry) = dentry() else {
        return linked_root(key);
    };
    let found = root_of_dentry(dentry)
        .or_else(|| linked_root(key))
        .map_or(0, |root| root + 1);
    let _ = MEMBERSHIP.insert(
        key,
        &Membership {
            root_plus_one: found,
            generation,
            inode_generation,
        },
        0,
    );
    found.checked_sub(1)
}

/// The root of a file listed in LINKED.
fn linked_root(key: &InodeKey) -> Option<u32> {
    // SAFETY: copied out at once.
    unsafe { LINKED.get(key) }.copied()
}

/// The watched root `dentry` is at or under: a bounded walk up its parents.
fn root_of_dentry(mut dentry: u64) -> Option<u32> {
    for _ in 0..MAX_WALK_DEPTH {
        let inode: u64 = read(dentry, offset(&OFF_DENTRY_INODE))?;
        let here = key_of_inode(inode)?;
        // SAFETY: copied out at once.
        if let Some(root) = unsafe { WATCHED_DIRS.get(&here) } {
            return Some(*root);
        }
        let parent: u64 = read(dentry, offset(&OFF_DENTRY_PARENT))?;
        if parent == dentry {
            return None; // the file system's root
        }
        dentry = parent;
    }
    None
}

/// The watched root a path names something in: absolute paths by prefix
/// against the roots' paths, relative ones by where their base directory
/// (`dirfd`, or the working directory) is. A relative path that descends
/// into a root from outside it is not recognised; the periodic rescan
/// catches that case.
fn root_of_path(dirfd: i64, path: u64) -> Option<u32> {
    let buf = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU scratch buffer, used by this program only for the
    // duration of this call.
    let buf = unsafe { &mut *buf };
    // SAFETY: reads a NUL-terminated user string into `buf`, bounded by its
    // length; a bad pointer makes the helper fail.
    let len = unsafe { bpf_probe_read_user_str_bytes(path as *const u8, &mut buf.bytes) }
        .ok()?
        .len();
    if buf.bytes[0] == b'/' {
        return root_of_absolute(&buf.bytes, len);
    }
    let base = if dirfd == AT_FDCWD {
        // SAFETY: the helper only returns the current task's address.
        let task = unsafe { bpf_get_current_task() };
        let fs: u64 = read(task, offset(&OFF_TASK_FS))?;
        read(fs, offset(&OFF_FS_PWD_DENTRY))?
    } else {
        read(file_of_fd(dirfd as u64)?, offset(&OFF_FILE_DENTRY))?
    };
    root_of_dentry(base)
}

fn root_of_absolute(path: &[u8; PATH_BYTES], len: usize) -> Option<u32> {
    for root in 0..MAX_PATH_ROOTS {
        let Some(prefix) = ROOT_PATHS.get(root) else {
            continue;
        };
        let n = prefix.len as usize;
        if n == 0 || n > len || n >= PATH_BYTES {
            continue;
        }
        let mut same = true;
        for i in 0..PATH_BYTES {
            if i >= n {
                break;
            }
            if path[i] != prefix.bytes[i] {
                same = false;
                break;
            }
        }
        if same && (n == len || path[n] == b'/') {
            return Some(root);
        }
    }
    None
}

/// A namespace change (create, delete, rename, link, chmod, truncate by
/// path) at `path` relative to `dirfd`: reported once per root until
/// userspace takes it.
fn namespace_change(ctx: &TracePointContext, dirfd: i64, path: u64) {
    if let Some(root) = root_of_path(dirfd, path) {
        bump(counter::NAMESPACE, 1);
        count_change(root);
        report(ctx, InodeKey::namespace(root), root, 0, 0, 0);
    }
}

fn on_change(ctx: &TracePointContext, fd_arg: usize, bytes: u64) {
    // SAFETY: fd_arg is inside the record (the kernel's `format` file).
    let Some(fd) = (unsafe { ctx.read_at::<u64>(fd_arg) }).ok() else {
        return;
    };
    mark_fd_dirty(ctx, fd, bytes, 0);
}

/// Counts a change to descriptor `fd` and reports its inode once if it is
/// under a watched tree.
fn mark_fd_dirty(ctx: &TracePointContext, fd: u64, bytes: u64, flags: u32) {
    let Some(file) = file_of_fd(fd) else {
        return;
    };
    let Some(inode) = read::<u64>(file, offset(&OFF_FILE_INODE)) else {
        return;
    };
    let Some(key) = key_of_inode(inode) else {
        return;
    };
    let Some(root) = root_of(file, inode, &key) else {
        return;
    };
    bump(counter::WRITES, 1);
    bump(counter::BYTES, bytes);
    count_change(root);
    if flags & WriteEvent::MAPPED != 0 {
        // Userspace must learn of every writable mapping, even of a file
        // already dirty, to keep watching it while the mapping lives.
        let _ = DIRTY.remove(&key);
    }
    report(ctx, key, root, fd, bytes, flags);
}

/// Reports `key` (dirty under `root`) unless it already is.
fn report<C: EbpfContext>(ctx: &C, key: InodeKey, root: u32, fd: u64, bytes: u64, flags: u32) {
    // SAFETY: a presence check only.
    if unsafe { DIRTY.get(&key) }.is_some() {
        return;
    }
    // Another CPU may have marked it first: only the one that inserts reports.
    if DIRTY.insert(&key, &1, BPF_NOEXIST as u64).is_err() {
        return;
    }
    match EVENTS.reserve::<WriteEvent>(0) {
        Some(mut entry) => {
            entry.write(WriteEvent {
                ino: key.ino,
                bytes,
                dev: key.dev,
                root,
                tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
                fd: fd as u32,
                flags,
                pad: 0,
                // SAFETY: a helper call with no arguments, allowed in every
                // tracing program (Linux 4.18 and later).
                cgroup: unsafe { bpf_get_current_cgroup_id() },
            });
            entry.submit(0);
            bump(counter::EVENTS, 1);
        }
        None => {
            // Never lose a change: drop the mark so the next write retries,
            // and let userspace see the counter move and rescan.
            let _ = DIRTY.remove(&key);
            bump(counter::RINGBUF_FULL, 1);
            warn!(
                ctx,
                "ring buffer full, event for inode {} deferred", key.ino
            );
        }
    }
}

fn bump(slot: u32, n: u64) {
    if let Some(value) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU,
        // and BPF programs are not preempted by one another on one CPU.
        unsafe { *value += n };
    }
}

/// Counts a change under `root`, dirty mark or not.
fn count_change(root: u32) {
    let slot = if root < MAX_COUNTED_ROOTS {
        root
    } else {
        MAX_COUNTED_ROOTS - 1
    };
    if let Some(value) = ROOT_CHANGES.get_ptr_mut(slot) {
        // SAFETY: as in `bump`, a per-CPU slot.
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
