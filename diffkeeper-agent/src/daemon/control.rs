//! The daemon's control socket, and `restore-wait`, its client: how an
//! init container waits until its pod's state is back in place before the
//! app starts.
//!
//! Only the daemon may open a target's store (redb allows one process per
//! store file), so the init container does not replay: it asks the daemon
//! and waits. The handshake, over a unix stream socket (a hostPath shared
//! with the pods, `/run/diffkeeper/daemon.sock` in deploy/):
//!
//! 1. The client connects and sends one line of JSON:
//!    `{"version":1,"wait_for":"TARGET"}`, or
//!    `{"version":1,"wait_for":"TARGET","pod_uid":"UID"}` from a pod's init
//!    container: then only the target of that very pod will do. Without the
//!    uid, a re-created pod asking before the daemon has seen the old pod
//!    go could be told ready by the old pod's target, and its app would
//!    start on an empty volume.
//! 2. The daemon answers with JSON lines, one each time the target's state
//!    changes: `{"status":"waiting","why":"..."}` while the target is
//!    unknown (its pod not discovered yet), starting, restoring, or failing
//!    and being retried; then, once the target's directories hold its
//!    store's latest state (restored and verified by replay's hashes when
//!    they were empty, or left as they were) and it is capturing, one
//!    `{"status":"ready","restored_files":N}`, and closes.
//! 3. The client exits 0 on `ready`. If the connection cannot be made or
//!    drops before `ready` (the daemon restarting mid-handshake), it
//!    connects again and asks again: asking is idempotent, and a restore
//!    is all-or-nothing (replay stages and swaps), so a daemon killed
//!    mid-restore left the directory empty and its successor restores it
//!    anew. Past `--timeout` the client exits 1, naming the socket, the
//!    target and the last thing the daemon said.
//!
//! A request line that is not this JSON, or of another version, gets
//! `{"status":"refused","why":"..."}` and the connection is closed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::error::{AgentError, Result};

/// The protocol's version, sent by the client in every request.
pub const VERSION: u32 = 1;

/// How often a waiting connection looks at its target's state.
const POLL: Duration = Duration::from_millis(100);

/// Longest request line read.
const MAX_REQUEST: usize = 4096;

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    pub wait_for: String,
    /// The asking pod's uid: ready only once the target is that pod's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Answer {
    Waiting { why: String },
    Ready { restored_files: u64 },
    Refused { why: String },
}

/// Where each target is, as the handshake reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetState {
    Starting,
    Restoring,
    /// Capturing, with the files its start restored (0 when its
    /// directories were not empty).
    Capturing {
        restored_files: u64,
    },
    /// Its last start failed and is retried.
    Failed(String),
}

/// Every target's state, by name, shared by the daemon's tasks and the
/// control socket, with the uid of the pod it is (discovered targets).
#[derive(Clone, Default)]
pub struct States(Arc<Mutex<HashMap<String, Entry>>>);

/// A target's state, and its pod's uid.
type Entry = (TargetState, Option<String>);

impl States {
    /// A target starts, as pod `pod_uid`'s when it is one.
    pub fn start(&self, target: &str, pod_uid: Option<&str>) {
        if let Ok(mut states) = self.0.lock() {
            states.insert(
                target.to_string(),
                (TargetState::Starting, pod_uid.map(str::to_string)),
            );
        }
    }

    pub fn set(&self, target: &str, state: TargetState) {
        if let Ok(mut states) = self.0.lock() {
            let entry = states
                .entry(target.to_string())
                .or_insert((TargetState::Starting, None));
            entry.0 = state;
        }
    }

    pub fn remove(&self, target: &str) {
        if let Ok(mut states) = self.0.lock() {
            states.remove(target);
        }
    }

    fn answer(&self, target: &str, pod_uid: Option<&str>) -> Answer {
        let entry = self.0.lock().ok().and_then(|s| s.get(target).cloned());
        let waiting = |why: String| Answer::Waiting { why };
        let (state, uid) = match entry {
            None => return waiting(format!("no target {target:?} (yet)")),
            Some(entry) => entry,
        };
        if let Some(want) = pod_uid {
            if uid.as_deref() != Some(want) {
                return waiting(format!(
                    "target {target:?} is {} not yet pod {want}'s",
                    uid.map_or("a configured target,".to_string(), |u| format!(
                        "pod {u}'s,"
                    ))
                ));
            }
        }
        match state {
            TargetState::Starting => waiting(format!("target {target:?} is starting")),
            TargetState::Restoring => waiting(format!("target {target:?} is being restored")),
            TargetState::Failed(why) => {
                waiting(format!("target {target:?} cannot start, retrying: {why}"))
            }
            TargetState::Capturing { restored_files } => Answer::Ready { restored_files },
        }
    }
}

/// Serves the control socket at `path` until the task is aborted. A
/// socket file left by a daemon killed earlier is replaced; any other file
/// there is refused.
pub fn serve(path: &Path, states: States) -> Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| AgentError::Failed {
                what: format!("cannot replace the old control socket {}", path.display()),
                source: Box::new(source),
            })?;
        }
        Ok(_) => {
            return Err(AgentError::Refused(format!(
                "{} exists and is not a socket: refusing to replace it with the control socket",
                path.display()
            )))
        }
        Err(_) => {}
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| AgentError::Failed {
            what: format!("cannot create {} for the control socket", parent.display()),
            source: Box::new(source),
        })?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| AgentError::Failed {
        what: format!("cannot listen on the control socket {}", path.display()),
        source: Box::new(source),
    })?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, states.clone()));
                }
                Err(e) => {
                    tracing::warn!("control socket: cannot accept a connection: {e}");
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }))
}

/// One connection: reads the request, then reports the target's state
/// each time it changes, until it is ready.
async fn answer(stream: tokio::net::UnixStream, states: States) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let request = match reader.read_line(&mut line).await {
        Ok(_) => serde_json::from_str::<Request>(line.trim()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let send = |answer: &Answer| {
        let mut text = serde_json::to_string(answer).unwrap_or_else(|_| "{}".to_string());
        text.push('\n');
        text
    };
    let request = match request {
        Ok(r) if r.version == VERSION => r,
        Ok(r) => {
            let why = format!("protocol version {} is not {VERSION}", r.version);
            let _ = write
                .write_all(send(&Answer::Refused { why }).as_bytes())
                .await;
            return;
        }
        Err(e) => {
            let why = format!(
                "not a request ({e}): send {{\"version\":{VERSION},\"wait_for\":\"TARGET\"}}"
            );
            let _ = write
                .write_all(send(&Answer::Refused { why }).as_bytes())
                .await;
            return;
        }
    };
    tracing::info!(target = %request.wait_for, "control socket: waiting for target {} to be restored and capturing", request.wait_for);
    let mut last: Option<Answer> = None;
    loop {
        let now = states.answer(&request.wait_for, request.pod_uid.as_deref());
        if last.as_ref() != Some(&now) {
            if write.write_all(send(&now).as_bytes()).await.is_err() {
                // The client left (its timeout): nothing to tell.
                return;
            }
            if matches!(now, Answer::Ready { .. }) {
                return;
            }
            last = Some(now);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `restore-wait`: asks the daemon at `socket` for target `target` (pod
/// `pod_uid`'s, when given) until it answers ready (returns the files it
/// restored), reconnecting as needed, for at most `timeout`.
pub async fn wait(
    socket: &Path,
    target: &str,
    pod_uid: Option<&str>,
    timeout: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("nothing yet");
    let request = serde_json::to_string(&Request {
        version: VERSION,
        wait_for: target.to_string(),
        pod_uid: pod_uid.map(str::to_string),
    })
    .map_err(|e| AgentError::Refused(format!("cannot write the request: {e}")))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(socket, target, timeout, &last));
        }
        match tokio::time::timeout(left, ask(socket, &request, &mut last)).await {
            Ok(Ok(Some(files))) => return Ok(files),
            Ok(Ok(None)) => {}
            Ok(Err(refused)) => return Err(refused),
            Err(_) => return Err(timed_out(socket, target, timeout, &last)),
        }
        tokio::time::sleep(Duration::from_millis(200).min(left)).await;
    }
}

fn timed_out(socket: &Path, target: &str, timeout: Duration, last: &str) -> AgentError {
    AgentError::Refused(format!(
        "timed out after {}: the daemon at {} did not report target {target:?} restored; last: {last}",
        humantime::format_duration(timeout),
        socket.display()
    ))
}

/// One connection: `Some(files)` once ready, `None` when it could not be
/// made or dropped (to try again); `last` keeps what was heard.
async fn ask(socket: &Path, request: &str, last: &mut String) -> Result<Option<u64>> {
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(e) => {
            *last = format!(
                "cannot connect to {} ({e}): is the daemon running with this socket?",
                socket.display()
            );
            return Ok(None);
        }
    };
    let (read, mut write) = stream.into_split();
    if let Err(e) = write.write_all(format!("{request}\n").as_bytes()).await {
        *last = format!("the connection dropped ({e})");
        return Ok(None);
    }
    let mut lines = BufReader::new(read).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => {
                *last = format!("the daemon closed the connection after: {last}");
                return Ok(None);
            }
            Err(e) => {
                *last = format!("the connection dropped ({e})");
                return Ok(None);
            }
        };
        match serde_json::from_str::<Answer>(&line) {
            Ok(Answer::Ready { restored_files }) => return Ok(Some(restored_files)),
            Ok(Answer::Waiting { why }) => {
                tracing::info!("{why}");
                *last = why;
            }
            Ok(Answer::Refused { why }) => {
                return Err(AgentError::Refused(format!(
                    "the daemon at {} refused: {why}",
                    socket.display()
                )))
            }
            Err(e) => *last = format!("an answer that is not the protocol's ({e}): {line}"),
        }
    }
}
