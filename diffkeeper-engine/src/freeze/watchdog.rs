//! The thaw watchdog: a small process that thaws what DiffKeeper froze if
//! DiffKeeper dies mid-freeze.
//!
//! It is DiffKeeper's own binary started with [`ARG`] and a pipe on its
//! standard input. Before each freeze DiffKeeper writes `F <cgroup>` lines
//! to the pipe, after each thaw `T <cgroup>` lines. A write to a pipe is in
//! the kernel once `write(2)` returns, so a freeze is announced before it
//! happens, even if DiffKeeper is killed right after. When the pipe closes
//! (DiffKeeper exited, cleanly or by SIGKILL), or DiffKeeper's main thread
//! is seen dead (looked at every 20 ms: a killed process whose other thread
//! waits on the disk closes the pipe only seconds later), the watchdog
//! thaws every cgroup announced frozen and not thawed since, and exits. It runs in a
//! session of its own, so a terminal's Ctrl-C or a signal to DiffKeeper's
//! process group does not take it down with DiffKeeper.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

use super::{Cgroup, FreezeError, Result};

/// The first argument that makes the `diffkeeper` binary a watchdog.
pub const ARG: &str = "__diffkeeper-thaw-watchdog";

/// DiffKeeper's end of a running watchdog.
pub struct Watchdog {
    child: Child,
    /// Taken only when dropped, to close it.
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// Starts a watchdog from this process's own executable.
    pub fn spawn() -> Result<Watchdog> {
        let mut command = Command::new("/proc/self/exe");
        command
            .arg(ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: setsid(2) is async-signal-safe and touches no memory of
        // the parent; it is all that runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                rustix::process::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = command.spawn().map_err(|e| {
            FreezeError::Watchdog(format!("cannot start /proc/self/exe {ARG}: {e}"))
        })?;
        let pipe = child
            .stdin
            .take()
            .ok_or_else(|| FreezeError::Watchdog("it has no input pipe".into()))?;
        Ok(Watchdog {
            child,
            pipe: Some(pipe),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Tells the watchdog that `cgroups` are about to be frozen, or were
    /// thawed. Fails when it is gone (the pipe is closed).
    pub fn announce(&mut self, cgroups: &[Cgroup], frozen: bool) -> Result<()> {
        let mut lines = Vec::new();
        for cgroup in cgroups {
            lines.extend_from_slice(if frozen { b"F " } else { b"T " });
            lines.extend_from_slice(cgroup.path.as_os_str().as_bytes());
            lines.push(b'\n');
        }
        self.pipe
            .as_mut()
            .ok_or_else(|| FreezeError::Watchdog("its pipe is closed".into()))?
            .write_all(&lines)
            .map_err(|e| FreezeError::Watchdog(format!("its pipe: {e}")))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Closing the pipe ends it (after thawing anything left frozen).
        drop(self.pipe.take());
        // `run` reaps every child it has, so it may be gone already.
        let _ = self.child.wait();
    }
}

/// How often the watchdog looks whether DiffKeeper is dying.
const LOOK: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether process `pid` is gone or dying: its main thread has exited (a
/// zombie) though other threads may still be finishing. A process killed
/// while one of its threads waits on the disk (an fsync, or the page cache
/// of a large file being freed) closes its descriptors, and so the pipe,
/// only once that wait is over, which can take seconds; its main thread
/// dies at once.
fn dying(pid: rustix::process::Pid) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())) {
        Ok(stat) => stat,
        Err(_) => return true,
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_ascii_whitespace().next());
    matches!(state, Some("Z" | "X" | "x") | None)
}

/// The watchdog's main loop: reads announcements until the pipe closes or
/// DiffKeeper (its parent) is dying, then thaws what is still frozen.
/// Returns the process's exit code.
pub fn serve() -> std::process::ExitCode {
    use std::os::fd::AsFd;

    let parent = rustix::process::getppid();
    let mut frozen: BTreeSet<PathBuf> = BTreeSet::new();
    // Read unbuffered, so what poll(2) says waits is all there is.
    let stdin = std::io::stdin();
    let input = stdin.as_fd();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let ready = {
            let mut fds = [rustix::event::PollFd::new(
                &input,
                rustix::event::PollFlags::IN | rustix::event::PollFlags::HUP,
            )];
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: LOOK.as_nanos() as i64,
            };
            matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
        };
        if !ready {
            if parent.is_none_or(dying) || rustix::process::getppid() != parent {
                break;
            }
            continue;
        }
        let n = match rustix::io::read(input, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = &line[..line.len() - 1];
            let path = |rest: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(rest));
            match text.split_first() {
                Some((b'F', rest)) => {
                    frozen.insert(path(rest.strip_prefix(b" ").unwrap_or(rest)));
                }
                Some((b'T', rest)) => {
                    frozen.remove(&path(rest.strip_prefix(b" ").unwrap_or(rest)));
                }
                _ => {}
            }
        }
    }
    let mut code = std::process::ExitCode::SUCCESS;
    for cgroup in frozen {
        let file = cgroup.join("cgroup.freeze");
        match std::fs::write(&file, "0") {
            Ok(()) => eprintln!(
                "diffkeeper watchdog: DiffKeeper exited while {} was frozen; thawed it",
                cgroup.display()
            ),
            // Removed meanwhile: nothing left to thaw.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                eprintln!("diffkeeper watchdog: cannot thaw {}: {e}", file.display());
                code = std::process::ExitCode::FAILURE;
            }
        }
    }
    code
}
