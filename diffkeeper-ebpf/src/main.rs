//! DiffKeeper's eBPF programs, loaded by `diffkeeper::events`.
//!
//! For now: tracepoints on `write` and `pwrite64` that, for processes listed
//! in `WATCHED_TGIDS`, count calls and bytes in per-CPU counters and report
//! each (process, fd) pair once through the `EVENTS` ring buffer until
//! userspace clears its mark in `DIRTY`. This is the seed of the tracer: the
//! kernel filters and de-duplicates, so a million writes between two
//! captures cost one event.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel},
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use diffkeeper_common::{counter, dirty_key, WriteEvent};

/// Offsets of the arguments in `syscalls:sys_enter_write`/`pwrite64`
/// records (the syscall tracepoint ABI: 8 bytes of common fields, the
/// syscall number padded to 8, then one 8-byte slot per argument).
const ARG_FD: usize = 16;
const ARG_COUNT: usize = 32;

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
static OFF_INODE_INO: u32 = 0;
#[no_mangle]
static OFF_INODE_SB: u32 = 0;
#[no_mangle]
static OFF_SB_DEV: u32 = 0;

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

/// The (inode number, device) of descriptor `fd` of the current task:
/// task->files->fdt->fd[fd]->f_inode->{i_ino, i_sb->s_dev}.
fn inode_of_fd(fd: u64) -> Option<(u64, u32)> {
    // SAFETY: the helper only returns the current task's address.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task, offset(&OFF_TASK_FILES))?;
    let fdt: u64 = read(files, offset(&OFF_FILES_FDT))?;
    let fd_array: u64 = read(fdt, offset(&OFF_FDT_FD))?;
    let file: u64 = read(fd_array, (fd as usize).checked_mul(8)?)?;
    let inode: u64 = read(file, offset(&OFF_FILE_INODE))?;
    let ino: u64 = read(inode, offset(&OFF_INODE_INO))?;
    let sb: u64 = read(inode, offset(&OFF_INODE_SB))?;
    let dev: u32 = read(sb, offset(&OFF_SB_DEV))?;
    Some((ino, dev))
}

#[map(name = "WATCHED_TGIDS")]
static WATCHED_TGIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

#[map(name = "DIRTY")]
static DIRTY: HashMap<u64, u8> = HashMap::with_max_entries(65_536, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[tracepoint]
pub fn sys_enter_write(ctx: TracePointContext) -> u32 {
    on_write(&ctx);
    0
}

#[tracepoint]
pub fn sys_enter_pwrite64(ctx: TracePointContext) -> u32 {
    on_write(&ctx);
    0
}

fn on_write(ctx: &TracePointContext) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is copied out at once; nothing keeps the reference
    // past a point where userspace could delete the entry.
    if unsafe { WATCHED_TGIDS.get(&tgid) }.is_none() {
        return;
    }
    // SAFETY: ARG_FD and ARG_COUNT are inside the tracepoint record whose
    // layout the kernel publishes in the event's `format` file.
    let (fd, count) = unsafe {
        (
            ctx.read_at::<u64>(ARG_FD).unwrap_or(0),
            ctx.read_at::<u64>(ARG_COUNT).unwrap_or(0),
        )
    };
    bump(counter::WRITES, 1);
    bump(counter::BYTES, count);

    let key = dirty_key(tgid, fd as u32);
    // SAFETY: as above, a presence check only.
    if unsafe { DIRTY.get(&key) }.is_some() {
        return;
    }
    // Another CPU may have marked it first: only the one that inserts reports.
    if DIRTY.insert(&key, &1, BPF_NOEXIST as u64).is_err() {
        return;
    }
    let (ino, dev) = inode_of_fd(fd).unwrap_or((0, 0));
    match EVENTS.reserve::<WriteEvent>(0) {
        Some(mut entry) => {
            entry.write(WriteEvent {
                tgid,
                fd: fd as u32,
                bytes: count,
                ino,
                dev,
                reserved: 0,
            });
            entry.submit(0);
            bump(counter::EVENTS, 1);
        }
        None => {
            // Never lose a change: drop the mark so the next write retries,
            // and let userspace see the counter move.
            let _ = DIRTY.remove(&key);
            bump(counter::RINGBUF_FULL, 1);
            warn!(
                ctx,
                "ring buffer full, event for tgid {} fd {} deferred", tgid, fd
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
