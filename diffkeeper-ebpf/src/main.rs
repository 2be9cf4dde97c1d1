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
    helpers::bpf_get_current_pid_tgid,
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
    match EVENTS.reserve::<WriteEvent>(0) {
        Some(mut entry) => {
            entry.write(WriteEvent {
                tgid,
                fd: fd as u32,
                bytes: count,
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
