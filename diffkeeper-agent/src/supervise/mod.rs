//! Supervising an app: `diffkeeper run` (replay, start the app, capture
//! while it runs, forward signals, a final capture, its exit code) and
//! `diffkeeper watch` (capture until told to stop).

mod family;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::error::{Context, Result};
use rustix::process::{Pid, Signal};
use tokio::signal::unix::{signal, SignalKind};

use crate::roots::StateDir;
use crate::watch::{CaptureLoop, WatchOptions};

/// Exit code when the app cannot be started (as shells use).
const CANNOT_START: u8 = 127;

/// Serves metrics for `capture` at `addr` (labelled with the store's file
/// name as the target), when given; the server stops when the returned
/// task is dropped... or aborted by the caller.
async fn observe(
    capture: &mut CaptureLoop,
    store: &Path,
    addr: Option<std::net::SocketAddr>,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let metrics = crate::metrics::Metrics::new();
    let hub = capture.hub().clone();
    metrics.set_tracer(Box::new(move || hub.tracer_counters()));
    let name = store
        .file_stem()
        .map_or("store".into(), |n| n.to_string_lossy().into_owned());
    let target = metrics.target(&name);
    target.up(true);
    capture.set_metrics(target);
    let (bound, task) = crate::metrics::serve(addr, metrics).await?;
    tracing::info!("metrics at http://{bound}/metrics, health at /healthz and /readyz");
    Ok(Some(task))
}

/// Captures until SIGTERM or SIGINT, then once more; exit 0. With
/// `metrics_addr`, serves metrics there meanwhile.
pub async fn watch(
    store: &Path,
    roots: &[StateDir],
    options: &WatchOptions,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<ExitCode> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping: capturing what is left");
    };
    let mut capture = CaptureLoop::start(store, roots, options, None).await?;
    let server = observe(&mut capture, store, metrics_addr).await?;
    let summary = capture.run_until(stop).await?;
    if let Some(server) = server {
        server.abort();
    }
    tracing::info!(
        batches = summary.batches,
        dropped = summary.dropped,
        torn = summary.torn,
        unreadable = summary.unreadable,
        notices = summary.notices,
        failures = summary.failures,
        "stopped"
    );
    Ok(ExitCode::SUCCESS)
}

/// How `run` treats the app.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Processes the app leaves running when it exits get SIGTERM, and
    /// SIGKILL once this has passed.
    pub leftover_grace: Duration,
    /// Whether the app keeps running when DiffKeeper dies without ending
    /// it (SIGKILL): by default the kernel kills it then
    /// (`PR_SET_PDEATHSIG`), so it never writes with nothing capturing.
    pub app_survives: bool,
    /// State directories that start now (see `ReplayOptions::new_roots`).
    pub new_roots: Vec<String>,
    /// How long the app has to exit after a stop signal (SIGTERM, SIGINT)
    /// is forwarded, before it and every process it started get SIGKILL.
    pub stop_grace: Duration,
    /// Where to serve metrics while it runs, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Replays, runs `command` while capturing, and returns its exit code.
/// Processes the app leaves running are ended (SIGTERM, then SIGKILL after
/// `leftover_grace`) before the final capture.
pub async fn run(
    store: &Path,
    roots: &[StateDir],
    options: &WatchOptions,
    command: &[String],
    run_options: &RunOptions,
) -> Result<ExitCode> {
    let Some((program, args)) = command.split_first() else {
        return Err(crate::error::AgentError::Refused(
            "no command to run: give it after `--`".to_string(),
        ));
    };
    let replay_options = crate::replay::ReplayOptions {
        new_roots: run_options.new_roots.clone(),
        ..Default::default()
    };
    match crate::replay::replay(
        store,
        roots,
        crate::history::Moment::Latest,
        &replay_options,
    )? {
        None => tracing::info!("no store at {} yet: first start", store.display()),
        Some(summaries) => {
            for s in summaries {
                tracing::info!("replayed {s}");
            }
        }
    }
    // The app gets a cgroup of its own, so a consistent cut can freeze
    // exactly the app and everything it forks.
    let app_cgroup = match options.consistency {
        crate::watch::Consistency::None => None,
        _ => match crate::freeze::AppCgroup::create() {
            Ok(cgroup) => Some(cgroup),
            Err(e) => {
                tracing::warn!("cannot start the app in a cgroup of its own: {e}");
                None
            }
        },
    };
    // Watching starts before the app, so none of its writes goes unnoticed.
    let mut capture = CaptureLoop::start(
        store,
        roots,
        options,
        app_cgroup.as_ref().map(|c| c.cgroup()),
    )
    .await?;
    let _server = observe(&mut capture, store, run_options.metrics_addr)
        .await?
        .map(AbortOnDrop);
    let spare: Vec<Pid> = capture
        .watchdog_pid()
        .and_then(|pid| Pid::from_raw(pid as i32))
        .into_iter()
        .collect();
    // Signals are taken over before the app starts, so none is lost.
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut child_exited = signal(SignalKind::child()).context("cannot handle SIGCHLD")?;
    family::adopt_orphans();
    // The child is reaped by `family::reap`, never through this handle.
    let mut command = std::process::Command::new(program);
    command.args(args);
    if let Some(cgroup) = &app_cgroup {
        // SAFETY: the function is one write(2) on an open descriptor, which
        // is async-signal-safe, and `app_cgroup` outlives the spawn.
        unsafe { std::os::unix::process::CommandExt::pre_exec(&mut command, cgroup.enter_fn()) };
    }
    if !run_options.app_survives {
        // The kernel sends the signal when the thread that forked exits:
        // this one, which runs `run`'s future (the runtime's `block_on`, on
        // the main thread) for as long as the app lives.
        let parent = rustix::process::getpid();
        // SAFETY: prctl(2), getppid(2) and kill(2) are async-signal-safe
        // system calls that touch no memory of the parent; the only other
        // hook between fork and exec is the cgroup's one write(2).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
                // DiffKeeper died before the signal was asked for.
                if rustix::process::getppid() != Some(parent) {
                    rustix::process::kill_process(rustix::process::getpid(), Signal::KILL)?;
                }
                Ok(())
            })
        };
    }
    let app = match command.spawn() {
        Ok(child) => child.id(),
        Err(e) => {
            match &app_cgroup {
                Some(cgroup) => eprintln!(
                    "error: cannot start {program} in cgroup {}: {e}",
                    cgroup.cgroup().path().display()
                ),
                None => eprintln!("error: cannot start {program}: {e}"),
            }
            return Ok(ExitCode::from(CANNOT_START));
        }
    };
    let app = i32::try_from(app)
        .ok()
        .and_then(Pid::from_raw)
        .context("the app got an invalid process id")?;

    let (exited_tx, exited_rx) = tokio::sync::oneshot::channel::<()>();
    let capture = tokio::spawn(capture.run_until(async {
        let _ = exited_rx.await;
    }));

    // Set by the first stop signal: when the app must be gone. A shell
    // that traps SIGTERM runs its trap only once the command it waits for
    // ends, and a loop in a pipeline or a subshell never does; the stop
    // must stay bounded all the same.
    let mut stop_by: Option<tokio::time::Instant> = None;
    let mut killed = false;
    let status = loop {
        // SIGCHLD may have come before the stream was polled; reaping first
        // never misses an exit.
        if let Some(status) = family::reap(Some(app)) {
            break status;
        }
        let stop_timer = async {
            match stop_by {
                Some(at) if !killed => tokio::time::sleep_until(at).await,
                _ => std::future::pending().await,
            }
        };
        let forward = tokio::select! {
            _ = child_exited.recv() => continue,
            _ = term.recv() => Signal::TERM,
            _ = int.recv() => Signal::INT,
            _ = hup.recv() => Signal::HUP,
            _ = stop_timer => {
                let processes = family::kill_all(&spare);
                tracing::warn!(
                    processes,
                    "the app did not exit within --stop-grace {} of the stop signal: sent SIGKILL to it and every process it started",
                    humantime::format_duration(run_options.stop_grace)
                );
                // What is left is to reap it.
                killed = true;
                continue;
            }
        };
        if matches!(forward, Signal::TERM | Signal::INT) && stop_by.is_none() {
            stop_by = Some(tokio::time::Instant::now() + run_options.stop_grace);
        }
        tracing::info!(signal = ?forward, "forwarding signal to the app");
        if let Err(e) = rustix::process::kill_process(app, forward) {
            tracing::warn!("cannot forward signal {forward:?}: {e}");
        }
    };
    family::end_leftovers(run_options.leftover_grace, &spare).await;
    let _ = exited_tx.send(());
    let captured = match capture.await {
        Ok(Ok(summary)) => {
            tracing::info!(
                batches = summary.batches,
                torn = summary.torn,
                "final capture done"
            );
            true
        }
        Ok(Err(e)) => {
            eprintln!(
                "error: capture failed, the app's last writes may not be in the store: {e:#}"
            );
            false
        }
        Err(e) => {
            eprintln!(
                "error: capture task failed, the app's last writes may not be in the store: {e}"
            );
            false
        }
    };
    let code = match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        (None, None) => 1,
    };
    // An app that succeeded while its state was not kept did not, for
    // whoever restarts it: 1 then; a failing app's own code is kept.
    Ok(ExitCode::from(if code == 0 && !captured {
        1
    } else {
        code
    }))
}

/// Aborts a task when dropped: the metrics server of `run`, on every way
/// out.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
