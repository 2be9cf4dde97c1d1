//! Types shared by the eBPF programs (`diffkeeper-ebpf`) and their userspace
//! half (`diffkeeper-tracer`): map names, counter slots and the `#[repr(C)]`
//! records that cross between them. Both sides compile this one definition,
//! so their layouts cannot drift apart. With the `std` feature, also the
//! userspace helpers the tracer and the engine share ([`mountinfo`],
//! [`error`]).
#![no_std]

#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "std")]
pub mod error;
#[cfg(feature = "std")]
pub mod mountinfo;

/// An inode's identity: its number and its file system's device, in the
/// kernel's encoding (`major << 20 | minor`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub ino: u64,
    pub dev: u32,
    pub pad: u32,
}

impl InodeKey {
    /// The kernel's encoding of a device number.
    pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
        (major << 20) | (minor & 0xf_ffff)
    }
}

impl InodeKey {
    /// The dirty mark standing for "something was created, deleted, renamed
    /// or chmod-ed under root `root`" (no inode of its own).
    pub const fn namespace(root: u32) -> InodeKey {
        InodeKey {
            ino: 0,
            dev: 0,
            pad: root + 1,
        }
    }
}

/// Longest root path (with its NUL) the kernel side compares against.
pub const PATH_BYTES: usize = 256;
/// Roots whose paths the kernel side compares absolute paths against.
pub const MAX_PATH_ROOTS: u32 = 8;
/// Roots with a change counter of their own in `ROOT_CHANGES` (a root
/// beyond them shares the last slot).
pub const MAX_COUNTED_ROOTS: u32 = 1024;
/// Directories (roots) the programs can watch at once: one per container
/// volume on a busy node, with room to spare.
pub const MAX_WATCHED_DIRS: u32 = 16_384;
/// In-tree files with a name outside every tree that the programs can
/// attribute at once (`LINKED`); allocated as used, not up front.
pub const MAX_LINKED: u32 = 65_536;

/// A watched root's absolute path, or a path argument being read.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RootPath {
    pub len: u32,
    pub pad: u32,
    pub bytes: [u8; PATH_BYTES],
}

/// A file inode's cached place: under root `root_plus_one - 1`, or under no
/// root when 0, as of rename generation `generation`, for the inode whose
/// `i_generation` is `inode_generation`. Inode numbers are reused as soon
/// as a file is deleted (ext4 hands a freed number to the next file made in
/// its group, anywhere on the file system); the file systems give each new
/// inode a fresh `i_generation` (random on ext4, tmpfs and XFS), so a place
/// cached for a deleted file is not taken for the stranger that got its
/// number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    pub root_plus_one: u32,
    pub generation: u32,
    pub inode_generation: u32,
}

/// A watched file became dirty. One event per inode until userspace takes
/// it: the kernel side sets a mark in `DIRTY` and stays silent for that
/// inode until userspace clears the mark.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteEvent {
    pub ino: u64,
    /// Bytes the first write of this burst asked to write (0 for calls that
    /// do not say, like writev or ftruncate).
    pub bytes: u64,
    pub dev: u32,
    /// Index of the watched root the file is under.
    pub root: u32,
    /// The writing process (thread-group id).
    pub tgid: u32,
    pub fd: u32,
    /// [`WriteEvent::MAPPED`] or 0.
    pub flags: u32,
    pub pad: u32,
    /// The writer's cgroup v2 id (the inode number of its directory in the
    /// cgroup2 file system): which container wrote, even once the process
    /// is gone.
    pub cgroup: u64,
}

impl WriteEvent {
    /// The key of this event's dirty mark.
    pub const fn key(&self) -> InodeKey {
        if self.is_namespace() {
            InodeKey::namespace(self.root)
        } else {
            InodeKey {
                ino: self.ino,
                dev: self.dev,
                pad: 0,
            }
        }
    }

    /// A path-based change under the root rather than a file's data.
    pub const fn is_namespace(&self) -> bool {
        self.ino == 0 && self.dev == 0
    }

    /// The file was mapped shared and writable: it may keep changing with
    /// no further syscall while the mapping lives.
    pub const MAPPED: u32 = 1;

    /// Size of the record in the ring buffer.
    pub const SIZE: usize = 48;

    /// Reads a record from its bytes (native endian, `repr(C)` layout).
    pub fn from_bytes(bytes: &[u8]) -> Option<WriteEvent> {
        if bytes.len() < Self::SIZE {
            return None;
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_ne_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_ne_bytes(b)
        };
        Some(WriteEvent {
            ino: u64_at(0),
            bytes: u64_at(8),
            dev: u32_at(16),
            root: u32_at(20),
            tgid: u32_at(24),
            fd: u32_at(28),
            flags: u32_at(32),
            pad: 0,
            cgroup: u64_at(40),
        })
    }
}

/// How many dentry parents the membership walk climbs: deeper files are
/// treated as outside every watched tree.
pub const MAX_WALK_DEPTH: u32 = 32;

/// Slots of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Data-changing calls on files under a watched tree.
    pub const WRITES: u32 = 0;
    /// Bytes those calls asked to write (write and pwrite64 only).
    pub const BYTES: u32 = 1;
    /// Events put into the ring buffer.
    pub const EVENTS: u32 = 2;
    /// Ring buffer reservations that failed (the buffer was full). The dirty
    /// mark is dropped with it, so the next write tries again.
    pub const RINGBUF_FULL: u32 = 3;
    /// Entries changed under a watched tree: path-based calls (create,
    /// delete, rename, link, chmod, truncate) and new ctimes of its
    /// directories.
    pub const NAMESPACE: u32 = 4;
    /// New ctimes the kernel stamped on files under a watched tree (data,
    /// size or mode changed), whatever made the change.
    pub const STAMPS: u32 = 5;
    /// Number of slots.
    pub const COUNT: u32 = 6;
}

/// Map and program names, as both sides spell them.
pub mod names {
    pub const WATCHED_DIRS: &str = "WATCHED_DIRS";
    pub const DIRTY: &str = "DIRTY";
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-CPU count of changes under each root (writes and namespace
    /// changes, each counted even when its inode is already dirty), by root
    /// index: what tells a capture exactly whether its tree was written
    /// while it was read.
    pub const ROOT_CHANGES: &str = "ROOT_CHANGES";
    pub const EVENTS: &str = "EVENTS";
    pub const ROOT_PATHS: &str = "ROOT_PATHS";
    /// Bumped to make every cached membership stale.
    pub const GENERATION: &str = "GENERATION";
    /// Files in a tree that also have a name outside every tree, to their
    /// root: filled by userspace from what it stats.
    pub const LINKED: &str = "LINKED";
    /// BTF tracepoint programs, each attached to the tracepoint of its
    /// name: the kernel stamping a new ctime on an inode.
    pub const BTF_PROGRAMS: [&str; 2] = ["ctime_ns_xchg", "inode_set_ctime_to_ts"];
    /// Tracepoint programs; each attaches to `syscalls/<its name>`.
    pub const PROGRAMS: [&str; 32] = [
        "sys_enter_write",
        "sys_enter_pwrite64",
        "sys_enter_writev",
        "sys_enter_pwritev",
        "sys_enter_pwritev2",
        "sys_enter_ftruncate",
        "sys_enter_fallocate",
        "sys_enter_copy_file_range",
        "sys_enter_rename",
        "sys_enter_renameat",
        "sys_enter_renameat2",
        "sys_enter_openat",
        "sys_enter_open",
        "sys_enter_creat",
        "sys_exit_openat",
        "sys_exit_open",
        "sys_exit_creat",
        "sys_enter_mmap",
        "sys_enter_unlink",
        "sys_enter_unlinkat",
        "sys_enter_mkdir",
        "sys_enter_mkdirat",
        "sys_enter_rmdir",
        "sys_enter_symlink",
        "sys_enter_symlinkat",
        "sys_enter_link",
        "sys_enter_linkat",
        "sys_enter_chmod",
        "sys_enter_fchmodat",
        "sys_enter_fchmodat2",
        "sys_enter_truncate",
        "sys_enter_fchmod",
    ];
}

// What `Pod` requires of each: `repr(C)`, `Copy`, no padding, and every
// bit pattern a valid value.
#[cfg(feature = "user")]
// SAFETY: a u64 then two u32s: no padding, any bits valid.
unsafe impl aya::Pod for InodeKey {}
#[cfg(feature = "user")]
// SAFETY: two u32s: no padding, any bits valid.
unsafe impl aya::Pod for Membership {}
#[cfg(feature = "user")]
// SAFETY: two u64s then six u32s: no padding, any bits valid.
unsafe impl aya::Pod for WriteEvent {}
#[cfg(feature = "user")]
// SAFETY: two u32s then bytes: no padding, any bits valid.
unsafe impl aya::Pod for RootPath {}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// The bytes the kernel side writes for `event`: its `repr(C)` layout.
    fn kernel_bytes(event: &WriteEvent) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [event.ino, event.bytes] {
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        for word in [
            event.dev,
            event.root,
            event.tgid,
            event.fd,
            event.flags,
            event.pad,
        ] {
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        bytes.extend_from_slice(&event.cgroup.to_ne_bytes());
        bytes
    }

    #[test]
    fn a_record_decodes_to_the_event_the_kernel_wrote() {
        assert_eq!(WriteEvent::SIZE, core::mem::size_of::<WriteEvent>());
        let event = WriteEvent {
            ino: 0x1122_3344_5566_7788,
            bytes: 4096,
            dev: InodeKey::kernel_dev(259, 3),
            root: 7,
            tgid: 4242,
            fd: 9,
            flags: WriteEvent::MAPPED,
            pad: 0,
            cgroup: 0x0102_0304_0506_0708,
        };
        let bytes = kernel_bytes(&event);
        assert_eq!(bytes.len(), WriteEvent::SIZE);
        assert_eq!(WriteEvent::from_bytes(&bytes), Some(event));
    }

    /// A record shorter than an event (a ring buffer from another build of
    /// the programs, or damaged) is refused, never read past its end.
    #[test]
    fn a_short_record_is_refused() {
        let bytes = kernel_bytes(&WriteEvent::default());
        for len in 0..WriteEvent::SIZE {
            assert_eq!(WriteEvent::from_bytes(&bytes[..len]), None, "{len} bytes");
        }
    }
}
