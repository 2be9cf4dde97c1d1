//! The app's process family as `run` sees it: the app itself and every
//! process it starts, including those that outlive it.
//!
//! `run` makes itself a child subreaper, so processes orphaned by the app
//! become its children rather than init's. It reaps them (as an init does),
//! and when the app exits it ends whatever the app left running before the
//! final capture: a leftover writing after that capture would leave the
//! directory ahead of the store. Like systemd stopping a unit, leftovers get
//! SIGTERM first and SIGKILL after a grace period.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions, WaitStatus};

/// How often leftovers are checked for while they are being ended.
const POLL: Duration = Duration::from_millis(20);

/// How long SIGKILL is given to work. A process in uninterruptible sleep
/// (a hung network filesystem, say) cannot be killed; the final capture
/// must not wait for it forever.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Makes this process the parent of every process the app orphans.
pub fn adopt_orphans() {
    // Any non-zero argument sets the attribute.
    if let Err(e) = rustix::process::set_child_subreaper(Some(Pid::INIT)) {
        tracing::warn!(
            "cannot become the reaper of the app's orphans ({e}): processes it leaves \
             behind may still write after the final capture"
        );
    }
}

/// Reaps every child that has exited; returns the status of `app` if it was
/// among them.
pub fn reap(app: Option<Pid>) -> Option<WaitStatus> {
    let mut app_status = None;
    loop {
        match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) if Some(pid) == app => app_status = Some(status),
            Ok(Some(_)) => {}
            Ok(None) | Err(Errno::CHILD) => return app_status,
            Err(Errno::INTR) => {}
            Err(e) => {
                tracing::warn!("cannot reap child processes: {e}");
                return app_status;
            }
        }
    }
}

/// Ends the processes the app left running: SIGTERM, then SIGKILL once
/// `grace` has passed. Returns when none is left, or when killed ones still
/// have not died after a while. `spare` are DiffKeeper's own helpers (the
/// thaw watchdog), which are children too but not the app's.
pub async fn end_leftovers(grace: Duration, spare: &[Pid]) {
    let descendants = || {
        let mut left = descendants();
        left.retain(|pid| !spare.contains(pid));
        left
    };
    reap(None);
    let left = descendants();
    if left.is_empty() {
        return;
    }
    tracing::info!(
        processes = left.len(),
        "the app left processes running: sending SIGTERM, SIGKILL in {}",
        humantime::format_duration(grace)
    );
    // Each process is sent SIGTERM once, including those started after the
    // first round (a shell's trap may start one).
    let mut termed = HashSet::new();
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        let left = descendants();
        if left.is_empty() {
            return;
        }
        for pid in left {
            if termed.insert(pid) {
                send(pid, Signal::TERM);
            }
        }
        tokio::time::sleep(POLL).await;
        reap(None);
    }
    let deadline = tokio::time::Instant::now() + KILL_WAIT;
    let mut left = descendants();
    tracing::warn!(
        processes = left.len(),
        "processes the app left are still running after SIGTERM: sending SIGKILL"
    );
    while !left.is_empty() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                pids = ?left.iter().map(|p| p.as_raw_nonzero()).collect::<Vec<_>>(),
                "processes did not die after SIGKILL: capturing anyway"
            );
            return;
        }
        for &pid in &left {
            send(pid, Signal::KILL);
        }
        tokio::time::sleep(POLL).await;
        reap(None);
        left = descendants();
    }
}

/// Sends SIGKILL to the app and every process it started (all of this
/// process's descendants but `spare`). Returns how many were sent it.
pub fn kill_all(spare: &[Pid]) -> usize {
    let mut left = descendants();
    left.retain(|pid| !spare.contains(pid));
    for &pid in &left {
        send(pid, Signal::KILL);
    }
    left.len()
}

fn send(pid: Pid, signal: Signal) {
    match rustix::process::kill_process(pid, signal) {
        // It died between the listing and now.
        Ok(()) | Err(Errno::SRCH) => {}
        Err(e) => tracing::warn!("cannot send {signal:?} to process {pid}: {e}"),
    }
}

/// Every live descendant of this process (zombies are reaped, not listed),
/// from the parent links in /proc.
fn descendants() -> Vec<Pid> {
    let me = rustix::process::getpid();
    let mut children: HashMap<i32, Vec<Pid>> = HashMap::new();
    let entries = match std::fs::read_dir("/proc") {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!("cannot list processes in /proc: {e}");
            return Vec::new();
        }
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
            .and_then(Pid::from_raw)
        else {
            continue;
        };
        // A process may exit while it is being read: it is then not listed.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((state, ppid)) = parse_stat(&stat) {
            if state != 'Z' {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut found = Vec::new();
    let mut next = vec![me.as_raw_nonzero().get()];
    while let Some(parent) = next.pop() {
        for &child in children.get(&parent).into_iter().flatten() {
            found.push(child);
            next.push(child.as_raw_nonzero().get());
        }
    }
    found
}

/// The state and parent pid from `/proc/PID/stat`. The command name before
/// them is in parentheses and may itself contain `)` and spaces.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::parse_stat;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        assert_eq!(parse_stat("42 (sh) S 7 42 42 0 -1 4194560"), Some(('S', 7)));
        assert_eq!(parse_stat("43 (a) b) (c) R 1 43 43 0 -1"), Some(('R', 1)));
        assert_eq!(parse_stat("44 (x"), None);
    }
}
