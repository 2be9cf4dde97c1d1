//! DiffKeeper's eBPF programs, loaded by `diffkeeper::events`.
//!
//! Tracepoints on the syscalls that change a file's data through a
//! descriptor (the write family, ftruncate, fallocate, copy_file_range, a
//! shared writable mmap, and opens that create or truncate) resolve the
//! descriptor to its inode in the kernel, decide whether that
//! inode lies under a watched directory (a bounded walk up the dentry
//! parents, cached per inode and invalidated by renames), and report each
//! dirty inode once through the `EVENTS` ring buffer until userspace clears
//! its mark in `DIRTY`. Writes anywhere else cost a few map lookups and no
//! ring buffer traffic; a million writes to one file between two captures
//! cost one event.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel},
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use diffkeeper_common::{counter, InodeKey, Membership, WriteEvent, MAX_WALK_DEPTH};

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

/// Watched directories (the roots) by inode, to their root index.
#[map(name = "WATCHED_DIRS")]
static WATCHED_DIRS: HashMap<InodeKey, u32> = HashMap::with_max_entries(256, 0);

/// Per file inode: which root it is under, as of a rename generation.
#[map(name = "MEMBERSHIP")]
static MEMBERSHIP: LruHashMap<InodeKey, Membership> = LruHashMap::with_max_entries(131_072, 0);

/// Bumped by every rename: cached memberships older than it are re-walked.
#[map(name = "GENERATION")]
static GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// Inodes reported and not yet taken by userspace.
#[map(name = "DIRTY")]
static DIRTY: LruHashMap<InodeKey, u8> = LruHashMap::with_max_entries(65_536, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

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
                mark_fd_dirty(&ctx, ret as u64, 0);
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
        mark_fd_dirty(&ctx, fd as u64, 0);
    }
    0
}

/// Renames move inodes between trees: invalidate every cached membership.
macro_rules! renames {
    ($name:ident) => {
        #[tracepoint]
        pub fn $name(_ctx: TracePointContext) -> u32 {
            if let Some(generation) = GENERATION.get_ptr_mut(0) {
                // SAFETY: a u32 in an array map; a lost increment under a
                // race still leaves the generation changed.
                unsafe { *generation = (*generation).wrapping_add(1) };
            }
            0
        }
    };
}

renames!(sys_enter_rename);
renames!(sys_enter_renameat);
renames!(sys_enter_renameat2);

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
fn root_of(file: u64, key: &InodeKey) -> Option<u32> {
    let generation = GENERATION.get(0).copied().unwrap_or(0);
    // SAFETY: copied out at once.
    if let Some(m) = unsafe { MEMBERSHIP.get(key) } {
        if m.generation == generation {
            return m.root_plus_one.checked_sub(1);
        }
    }
    let mut found = 0u32;
    let mut dentry: u64 = read(file, offset(&OFF_FILE_DENTRY))?;
    for _ in 0..MAX_WALK_DEPTH {
        let inode: u64 = read(dentry, offset(&OFF_DENTRY_INODE))?;
        let here = key_of_inode(inode)?;
        // SAFETY: copied out at once.
        if let Some(root) = unsafe { WATCHED_DIRS.get(&here) } {
            found = *root + 1;
            break;
        }
        let parent: u64 = read(dentry, offset(&OFF_DENTRY_PARENT))?;
        if parent == dentry {
            break; // the file system's root
        }
        dentry = parent;
    }
    let _ = MEMBERSHIP.insert(
        key,
        &Membership {
            root_plus_one: found,
            generation,
        },
        0,
    );
    found.checked_sub(1)
}

fn on_change(ctx: &TracePointContext, fd_arg: usize, bytes: u64) {
    // SAFETY: fd_arg is inside the record (the kernel's `format` file).
    let Some(fd) = (unsafe { ctx.read_at::<u64>(fd_arg) }).ok() else {
        return;
    };
    mark_fd_dirty(ctx, fd, bytes);
}

/// Counts a change to descriptor `fd` and reports its inode once if it is
/// under a watched tree.
fn mark_fd_dirty(ctx: &TracePointContext, fd: u64, bytes: u64) {
    let Some(file) = file_of_fd(fd) else {
        return;
    };
    let Some(key) = read::<u64>(file, offset(&OFF_FILE_INODE)).and_then(key_of_inode) else {
        return;
    };
    let Some(root) = root_of(file, &key) else {
        return;
    };
    bump(counter::WRITES, 1);
    bump(counter::BYTES, bytes);
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
