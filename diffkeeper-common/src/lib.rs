//! Types shared by the eBPF programs (`diffkeeper-ebpf`) and their userspace
//! half (`diffkeeper::events`): map names, counter slots and the `#[repr(C)]`
//! records that cross the ring buffer. Both sides compile this one
//! definition, so their layouts cannot drift apart.
#![no_std]

/// One event per (process, file descriptor) that wrote, until userspace
/// takes it: the kernel side sets a dirty mark and stays silent for that key
/// until userspace clears the mark.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteEvent {
    /// Thread-group id (the process id userspace sees).
    pub tgid: u32,
    /// The file descriptor written to.
    pub fd: u32,
    /// Bytes the first write of this burst asked to write.
    pub bytes: u64,
    /// Inode number of the file written, as the kernel resolved it from
    /// the descriptor (0 when it could not).
    pub ino: u64,
    /// Device of that inode, in the kernel's encoding (major << 20 | minor).
    pub dev: u32,
    pub reserved: u32,
}

impl WriteEvent {
    /// The key of this event's dirty mark.
    pub const fn dirty_key(&self) -> u64 {
        dirty_key(self.tgid, self.fd)
    }
}

/// The key of a (process, fd) pair's dirty mark.
pub const fn dirty_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

/// Slots of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Write-family calls seen from watched processes.
    pub const WRITES: u32 = 0;
    /// Bytes those calls asked to write.
    pub const BYTES: u32 = 1;
    /// Events put into the ring buffer.
    pub const EVENTS: u32 = 2;
    /// Ring buffer reservations that failed (the buffer was full). The dirty
    /// mark is dropped with it, so the next write tries again.
    pub const RINGBUF_FULL: u32 = 3;
    /// Number of slots.
    pub const COUNT: u32 = 4;
}

/// Map and program names, as both sides spell them.
pub mod names {
    pub const WATCHED_TGIDS: &str = "WATCHED_TGIDS";
    pub const DIRTY: &str = "DIRTY";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";
    /// Tracepoint programs and the `syscalls` events they attach to.
    pub const PROGRAMS: [(&str, &str); 2] = [
        ("sys_enter_write", "sys_enter_write"),
        ("sys_enter_pwrite64", "sys_enter_pwrite64"),
    ];
}

// SAFETY: `WriteEvent` is `repr(C)`, `Copy`, has no padding (u32, u32, u64, u64, u32, u32)
// and every bit pattern is a valid value, which is what `Pod` requires.
#[cfg(feature = "user")]
unsafe impl aya::Pod for WriteEvent {}
