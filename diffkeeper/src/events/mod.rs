//! Kernel events: the userspace half of the eBPF programs in
//! `diffkeeper-ebpf`.
//!
//! This module owns loading the embedded object, attaching its syscall
//! tracepoints (mounting tracefs first when it is missing), routing the
//! programs' `aya-log` records into `tracing`, and reading their maps. Today
//! it drives `diffkeeper doctor`'s self-test, which proves on the running
//! kernel that the programs load, attach, see writes and coalesce them; the
//! write tracer that feeds capture grows here next.

pub mod btf;
mod tracefs;

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use diffkeeper_common::{counter, names, WriteEvent};

/// The eBPF object built by `build.rs` from `diffkeeper-ebpf`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/diffkeeper-ebpf.o"));

/// Loaded and attached programs. Detached and unloaded on drop.
pub struct Programs {
    ebpf: Ebpf,
    /// Must outlive the programs: dropping it closes the log map.
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    /// Whether tracefs had to be mounted for this.
    pub mounted_tracefs: bool,
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

impl Programs {
    /// Loads the embedded programs and attaches every tracepoint.
    pub fn load() -> Result<Programs> {
        let mounted_tracefs = tracefs::ensure_mounted()?;
        let offsets = btf::kernel_offsets(&btf::Btf::from_kernel()?)?;
        let mut loader = EbpfLoader::new();
        for (name, value) in &offsets {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .with_context(|| format!("cannot load the eBPF object: {}", privileges_hint()))?;
        // The programs log only on rare paths; without the log map they still work.
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!("eBPF log messages will not be shown: {e}");
                None
            }
        };
        for (program, event) in names::PROGRAMS {
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
            tracepoint.attach("syscalls", event).with_context(|| {
                format!(
                    "cannot attach to tracepoint syscalls/{event} (is {}/events/syscalls/{event} present?)",
                    tracefs::TRACEFS
                )
            })?;
        }
        Ok(Programs {
            ebpf,
            logger,
            mounted_tracefs,
        })
    }

    fn watched(&mut self) -> Result<HashMap<&mut MapData, u32, u8>> {
        let map = self
            .ebpf
            .map_mut(names::WATCHED_TGIDS)
            .context("the eBPF object has no WATCHED_TGIDS map")?;
        Ok(HashMap::try_from(map)?)
    }

    /// Starts reporting writes by process `tgid`.
    pub fn watch(&mut self, tgid: u32) -> Result<()> {
        self.watched()?
            .insert(tgid, 1, 0)
            .context("cannot add to WATCHED_TGIDS")
    }

    /// Stops reporting writes by process `tgid`.
    pub fn unwatch(&mut self, tgid: u32) -> Result<()> {
        self.watched()?
            .remove(&tgid)
            .context("cannot remove from WATCHED_TGIDS")
    }

    /// Clears the dirty mark of `(tgid, fd)`, so its next write is reported.
    pub fn clear_dirty(&mut self, event: &WriteEvent) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(names::DIRTY)
            .context("the eBPF object has no DIRTY map")?;
        let mut dirty: HashMap<&mut MapData, u64, u8> = HashMap::try_from(map)?;
        match dirty.remove(&event.dirty_key()) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("cannot clear a DIRTY mark"),
        }
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

    /// Takes every event waiting in the ring buffer.
    pub fn drain_events(&mut self) -> Result<Vec<WriteEvent>> {
        let map = self
            .ebpf
            .map_mut(names::EVENTS)
            .context("the eBPF object has no EVENTS map")?;
        let mut ring: RingBuf<&mut MapData> = RingBuf::try_from(map)?;
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            events.push(parse_event(&item).context("malformed event in the ring buffer")?);
        }
        Ok(events)
    }

    /// Passes the programs' pending log records to `tracing`.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }
}

/// Reads a [`WriteEvent`] from its `repr(C)` bytes (native endian).
fn parse_event(bytes: &[u8]) -> Option<WriteEvent> {
    let tgid = u32::from_ne_bytes(bytes.get(0..4)?.try_into().ok()?);
    let fd = u32::from_ne_bytes(bytes.get(4..8)?.try_into().ok()?);
    let written = u64::from_ne_bytes(bytes.get(8..16)?.try_into().ok()?);
    let ino = u64::from_ne_bytes(bytes.get(16..24)?.try_into().ok()?);
    let dev = u32::from_ne_bytes(bytes.get(24..28)?.try_into().ok()?);
    Some(WriteEvent {
        tgid,
        fd,
        bytes: written,
        ino,
        dev,
        reserved: 0,
    })
}

/// What `diffkeeper doctor` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelfTestReport {
    pub kernel: String,
    pub mounted_tracefs: bool,
    /// Write calls the test made (half `write`, half `pwrite64`), and bytes.
    pub writes_made: u64,
    pub bytes_made: u64,
    /// What the kernel counters saw from this process.
    pub writes_seen: u64,
    pub bytes_seen: u64,
    pub events: u64,
    pub ringbuf_full: u64,
    /// Events per file descriptor before and after clearing dirty marks.
    pub events_first_round: u64,
    pub events_after_clear: u64,
    /// Whether the inode and device the programs resolved from each
    /// descriptor (through BTF offsets) equal what `fstat` says.
    pub inodes_match: bool,
}

impl fmt::Display for SelfTestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kernel {}: eBPF tracepoints load and attach",
            self.kernel
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
            "writes: made {} ({} bytes), kernel saw {} ({} bytes)",
            self.writes_made, self.bytes_made, self.writes_seen, self.bytes_seen
        )?;
        writeln!(
            f,
            "events: {} for 2 files ({} after clearing their marks), ring buffer full {} times",
            self.events_first_round, self.events_after_clear, self.ringbuf_full
        )?;
        write!(
            f,
            "file identity from descriptors (BTF offsets): {}",
            if self.inodes_match {
                "matches fstat"
            } else {
                "DOES NOT match fstat"
            }
        )
    }
}

/// Writes per file in each round of the self-test.
const SELF_TEST_WRITES: u64 = 500;
const SELF_TEST_WRITE_BYTES: usize = 100;

/// Loads the programs, watches this process, writes to two temporary files
/// with `write` and `pwrite64`, and checks what the kernel side counted and
/// reported.
pub fn self_test() -> Result<SelfTestReport> {
    let mut programs = Programs::load()?;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut a = File::create(dir.path().join("a")).context("cannot create a test file")?;
    let b = File::create(dir.path().join("b")).context("cannot create a test file")?;
    let me = std::process::id();
    let block = [0x5au8; SELF_TEST_WRITE_BYTES];

    // Nothing else in this process may write while it is watched: no logging
    // until `unwatch`.
    programs.watch(me)?;
    let round = |a: &mut File, b: &File| -> std::io::Result<()> {
        for i in 0..SELF_TEST_WRITES {
            a.write_all(&block)?;
            b.write_all_at(&block, i * SELF_TEST_WRITE_BYTES as u64)?;
        }
        Ok(())
    };
    let first = round(&mut a, &b);
    programs.unwatch(me)?;
    first.context("test writes failed")?;
    let first_events = programs.drain_events()?;

    for event in &first_events {
        programs.clear_dirty(event)?;
    }
    programs.watch(me)?;
    let second = round(&mut a, &b);
    programs.unwatch(me)?;
    second.context("test writes failed")?;
    let second_events = programs.drain_events()?;
    programs.flush_logs();

    let ours = |events: &[WriteEvent]| {
        events
            .iter()
            .filter(|e| {
                e.tgid == me && (e.fd == a.as_raw_fd() as u32 || e.fd == b.as_raw_fd() as u32)
            })
            .count() as u64
    };
    // The kernel's dev_t is major << 20 | minor; compare by parts.
    let identity = |file: &File| -> Result<(u64, u32, u32)> {
        let st = rustix::fs::fstat(file).context("cannot fstat a test file")?;
        Ok((
            st.st_ino,
            rustix::fs::major(st.st_dev),
            rustix::fs::minor(st.st_dev),
        ))
    };
    let expected = [
        (a.as_raw_fd() as u32, identity(&a)?),
        (b.as_raw_fd() as u32, identity(&b)?),
    ];
    let inodes_match = first_events
        .iter()
        .chain(&second_events)
        .filter(|e| e.tgid == me)
        .all(|e| {
            expected
                .iter()
                .find(|(fd, _)| *fd == e.fd)
                .is_some_and(|(_, (ino, major, minor))| {
                    e.ino == *ino && e.dev >> 20 == *major && e.dev & 0xf_ffff == *minor
                })
        })
        && !first_events.is_empty();
    let counters = programs.counters()?;
    let kernel = rustix::system::uname();
    Ok(SelfTestReport {
        kernel: kernel.release().to_string_lossy().into_owned(),
        mounted_tracefs: programs.mounted_tracefs,
        writes_made: 4 * SELF_TEST_WRITES,
        bytes_made: 4 * SELF_TEST_WRITES * SELF_TEST_WRITE_BYTES as u64,
        writes_seen: counters[counter::WRITES as usize],
        bytes_seen: counters[counter::BYTES as usize],
        events: counters[counter::EVENTS as usize],
        ringbuf_full: counters[counter::RINGBUF_FULL as usize],
        events_first_round: ours(&first_events),
        events_after_clear: ours(&second_events),
        inodes_match,
    })
}
