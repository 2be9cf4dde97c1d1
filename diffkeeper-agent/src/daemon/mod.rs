//! `diffkeeper daemon`: one process, one backend (one set of eBPF
//! programs), many targets, each a capture loop of its own on the shared
//! [`Hub`].
//!
//! Targets come from the configuration file ([`config`]) and, with
//! `[kubernetes]`, from the node's pods ([`kubernetes`]); SIGHUP, or a
//! change to the file (looked at every `reload_interval`), reloads it:
//! targets are compared by name, new ones started, missing ones stopped
//! after a final capture, changed ones restarted, the others untouched.
//! A file that does not parse or check changes nothing, and says why.
//! Pods' targets follow their pods: a pod gone is stopped without a final
//! capture (its volumes are being deleted), one re-created is started on
//! its new volumes. A configured target wins over a pod of its name.
//!
//! Each target runs in a task of its own, so one target's big batch or
//! slow store never holds up another's captures (captures run on the
//! blocking pool). A target that cannot start (its directories missing,
//! its store corrupt, unwritable or on a full disk) is reported as failed
//! and tried again, 1 s later and then with doubling waits up to 60 s;
//! a capture that fails once running is retried by its loop the same
//! way. The others keep capturing throughout. Every log line of a target
//! carries `target=NAME`.
//!
//! A `kill -9` of the daemon leaves every store as its last commit left
//! it (a redb commit is atomic), and every cgroup it froze is thawed by
//! the freeze watchdog; at the next start each target's start-up capture
//! takes what changed meanwhile.

pub mod config;
pub mod control;
pub mod kubernetes;

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::Instrument;

use std::sync::Arc;

use crate::error::{Context, Result};
use crate::metrics::Metrics;
use crate::watch::{CaptureLoop, Finish, Hub, PodGuard};
pub use config::{Config, Target};
use control::TargetState;
use kubernetes::Discovered;

/// Longest wait between tries of a target that cannot start.
const MAX_START_WAIT: Duration = Duration::from_secs(60);

/// What every target's task shares.
#[derive(Clone)]
struct Shared {
    hub: Hub,
    metrics: Arc<Metrics>,
    /// Each target's state, for `restore-wait`.
    states: control::States,
}

/// A target's running task.
struct Running {
    target: Target,
    stop: oneshot::Sender<Finish>,
    task: tokio::task::JoinHandle<()>,
    /// Whether its pod is ending (discovered targets).
    ending: Arc<AtomicBool>,
}

/// The discovery task of `[kubernetes]`, and what it found last.
struct Discovery {
    rx: tokio::sync::watch::Receiver<Discovered>,
    task: tokio::task::JoinHandle<()>,
}

impl Discovery {
    /// Starts watching the pods `settings` say, once a client for them can
    /// be made (a kubeconfig that is not there fails here, not later).
    async fn start(settings: &config::Kubernetes) -> Result<Discovery> {
        let client = kubernetes::client(settings).await?;
        let (tx, rx) = tokio::sync::watch::channel(Discovered::default());
        let task = tokio::spawn(kubernetes::discover(settings.clone(), client, tx));
        Ok(Discovery { rx, task })
    }
}

/// The configured targets and the pods' (which a configured target of the
/// same name or store wins over).
fn wanted(
    configured: &BTreeMap<String, Target>,
    pods: &BTreeMap<String, Target>,
) -> BTreeMap<String, Target> {
    let mut all = configured.clone();
    for (name, target) in pods {
        if configured.contains_key(name) {
            tracing::error!("pod target {name} is not captured: a configured target has its name");
        } else if configured.values().any(|t| t.store == target.store) {
            tracing::error!(
                "pod target {name} is not captured: its store {} is a configured target's",
                target.store.display()
            );
        } else {
            all.insert(name.clone(), target.clone());
        }
    }
    all
}

/// What the command line sets over the configuration file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Where to serve metrics (`Some(None)`: nowhere) instead of the
    /// file's `metrics_addr`.
    pub metrics_addr: Option<Option<std::net::SocketAddr>>,
}

/// Runs the targets of the configuration file at `path` until SIGTERM or
/// SIGINT, then stops each after a final capture.
pub async fn run(path: &Path, overrides: &Overrides) -> Result<()> {
    // Read once: the text compared at each reload is the one the targets
    // came from, so a change made just after start is not missed.
    let text = Config::read(path)?;
    let mut config = Config::parse(path, &text)?;
    let mut last_text = Some(text);
    let hub = Hub::start(config.backend, config.syscall_hooks)?;
    let metrics = Metrics::new();
    let server = match overrides.metrics_addr.unwrap_or(config.metrics_addr) {
        Some(addr) => {
            let hub = hub.clone();
            metrics.set_tracer(Box::new(move || hub.tracer_counters()));
            let (bound, task) = crate::metrics::serve(addr, metrics.clone()).await?;
            tracing::info!("metrics at http://{bound}/metrics, health at /healthz and /readyz");
            Some(task)
        }
        None => None,
    };
    let states = control::States::default();
    let control = match &config.socket {
        Some(path) => {
            let task = control::serve(path, states.clone())?;
            tracing::info!("restore-wait's control socket at {}", path.display());
            Some(task)
        }
        None => None,
    };
    let shared = Shared {
        hub: hub.clone(),
        metrics,
        states,
    };
    tracing::info!(
        "daemon: {} target(s) from {}, written notices from {}",
        config.targets.len(),
        path.display(),
        hub.describe()
    );
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut discovery = match &config.kubernetes {
        Some(k) => Some(Discovery::start(k).await?),
        None => None,
    };
    // The pods' targets as last listed (kept across a restart of discovery
    // until its first list).
    let mut pods: BTreeMap<String, Target> = BTreeMap::new();
    let mut ending = std::collections::BTreeSet::new();
    apply(
        &shared,
        &mut running,
        &wanted(&config.targets, &pods),
        &ending,
    )
    .await;
    let mut look = tokio::time::interval(config.reload_interval);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let discovered = async {
            match discovery.as_mut() {
                Some(d) => {
                    if d.rx.changed().await.is_err() {
                        // Stopped (and said why): nothing more comes.
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        let forced = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => true,
            _ = look.tick() => false,
            _ = discovered => {
                let Some(d) = discovery.as_ref() else { continue };
                let found = d.rx.borrow().clone();
                if found.listed {
                    // Ending first: a loop told its pod ends before the
                    // pod is gone stops at the kubelet's first delete.
                    for name in found.ending.difference(&ending) {
                        if running.contains_key(name) {
                            tracing::info!(target = %name, "target {name}: its pod is ending; its own writes are still captured, the kubelet's deletes are not");
                        }
                    }
                    ending = found.ending;
                    for (name, r) in &running {
                        r.ending.store(ending.contains(name), Ordering::Relaxed);
                    }
                    pods = found.targets;
                    apply(&shared, &mut running, &wanted(&config.targets, &pods), &ending).await;
                }
                continue;
            }
        };
        let text = std::fs::read(path);
        let text = match text {
            Ok(text) => text,
            Err(e) => {
                if forced || last_text.is_some() {
                    tracing::error!(
                        "cannot read the configuration file {}: {e}; the targets keep running as they are",
                        path.display()
                    );
                }
                last_text = None;
                continue;
            }
        };
        if !forced && last_text.as_deref() == Some(&text[..]) {
            continue;
        }
        last_text = Some(text.clone());
        match Config::parse(path, &text) {
            Ok(new) => {
                if (new.backend, new.syscall_hooks) != (config.backend, config.syscall_hooks) {
                    tracing::warn!(
                        "reload: [daemon] backend and syscall_hooks take effect at the next start"
                    );
                }
                if new.reload_interval != config.reload_interval {
                    look = tokio::time::interval(new.reload_interval);
                    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
                tracing::info!(
                    "reloading {} ({}): {} target(s)",
                    path.display(),
                    if forced { "SIGHUP" } else { "the file changed" },
                    new.targets.len()
                );
                if new.kubernetes != config.kubernetes {
                    let started = match &new.kubernetes {
                        Some(k) => Discovery::start(k).await.map(Some),
                        None => Ok(None),
                    };
                    match started {
                        Ok(started) => {
                            if let Some(d) = std::mem::replace(&mut discovery, started) {
                                d.task.abort();
                            }
                            if discovery.is_none() {
                                pods.clear();
                            }
                            tracing::info!("reload: [kubernetes] changed, discovery restarted");
                        }
                        Err(e) => tracing::error!(
                            "reload: [kubernetes] changed but cannot be used, discovery goes on as it was: {e:#}"
                        ),
                    }
                }
                apply(&shared, &mut running, &wanted(&new.targets, &pods), &ending).await;
                config = new;
            }
            Err(e) => {
                tracing::error!("reload refused, the targets keep running as they are: {e:#}")
            }
        }
    }
    tracing::info!("daemon stopping: a final capture of every target");
    let names: Vec<(String, Finish)> = running
        .keys()
        .map(|name| (name.clone(), Finish::Capture))
        .collect();
    stop_all(&mut running, &names).await;
    if let Some(d) = discovery {
        d.task.abort();
    }
    for task in [server, control].into_iter().flatten() {
        task.abort();
    }
    tracing::info!("daemon stopped");
    Ok(())
}

/// Makes the running targets those of `wanted`: stops the ones gone or
/// changed (each after its final capture; all at once), then starts the
/// new and changed ones, but for pods `ending` (a pod on its way out is
/// not taken on: its volumes may be half deleted already).
async fn apply(
    shared: &Shared,
    running: &mut BTreeMap<String, Running>,
    wanted: &BTreeMap<String, Target>,
    ending: &std::collections::BTreeSet<String>,
) {
    let mut stale: Vec<(String, Finish)> = Vec::new();
    for (name, r) in running.iter() {
        let new = wanted.get(name);
        if new == Some(&r.target) {
            continue;
        }
        // A pod's target whose pod is gone, or is another pod now (one
        // re-created with the same name): its volumes are being deleted,
        // so no final capture.
        let pod_gone = r.target.pod.is_some()
            && new.and_then(|t| t.pod.as_ref()).map(|p| &p.uid)
                != r.target.pod.as_ref().map(|p| &p.uid);
        let (why, finish) = match (new, pod_gone) {
            (_, true) => (
                "its pod is gone: stopping it without a final capture (its last batch stands)",
                Finish::Skip,
            ),
            (Some(_), false) => ("its settings changed: restarting it", Finish::Capture),
            (None, false) => ("no longer configured: stopping it", Finish::Capture),
        };
        tracing::info!(target = %name, "target {name}: {why}");
        stale.push((name.clone(), finish));
    }
    stop_all(running, &stale).await;
    for (name, _) in stale.iter().filter(|(name, _)| !wanted.contains_key(name)) {
        shared.metrics.remove(name);
        shared.states.remove(name);
    }
    let new: Vec<(&String, &Target)> = wanted
        .iter()
        .filter(|(name, _)| !running.contains_key(*name) && !ending.contains(*name))
        .collect();
    shared
        .metrics
        .set_starting(new.iter().map(|(name, _)| (*name).clone()));
    for (name, target) in new {
        let (stop, stopped) = oneshot::channel();
        let span = match &target.pod {
            Some(pod) => {
                tracing::info_span!("target", target = %name, namespace = %pod.namespace, pod = %pod.name)
            }
            None => tracing::info_span!("target", target = %name),
        };
        let ending = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(
            keep_capturing(shared.clone(), target.clone(), stopped, ending.clone())
                .instrument(span),
        );
        running.insert(
            name.clone(),
            Running {
                target: target.clone(),
                stop,
                task,
                ending,
            },
        );
    }
}

/// Stops the targets `names`, all at once, each as its [`Finish`] says,
/// and waits for their final captures.
async fn stop_all(running: &mut BTreeMap<String, Running>, names: &[(String, Finish)]) {
    let mut tasks = Vec::new();
    for (name, finish) in names {
        if let Some(r) = running.remove(name) {
            // Gone already when its task ended on its own.
            let _ = r.stop.send(*finish);
            tasks.push((name.clone(), r.task));
        }
    }
    for (name, task) in tasks {
        if let Err(e) = task.await {
            tracing::error!(target = %name, "target {name}: its task failed: {e}");
        }
    }
}

/// One target: starts its capture loop, trying again with back-off while
/// it cannot start, and captures until told to stop.
async fn keep_capturing(
    shared: Shared,
    target: Target,
    mut stop: oneshot::Receiver<Finish>,
    ending: Arc<AtomicBool>,
) {
    let metrics = shared.metrics.target(&target.name);
    if let Some(pod) = &target.pod {
        metrics.pod(&pod.namespace, &pod.name, &pod.uid);
    }
    let states = &shared.states;
    states.start(&target.name, target.pod.as_ref().map(|p| p.uid.as_str()));
    let mut failures = 0u32;
    loop {
        let started = async {
            if target.pod.is_some() {
                // A pod's namespace gets its directory of stores at its
                // first pod (the configured stores' directories are the
                // operator's to make).
                if let Some(dir) = target.store.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)
                        .with_context(|| {
                            format!("cannot make the directory of stores {}", dir.display())
                        })?;
                }
            }
            let restored = if target.restore_if_empty {
                restore_if_empty(&target, states, &metrics).await?
            } else {
                0
            };
            let capture = CaptureLoop::start_on(
                &shared.hub,
                &target.store,
                &target.roots,
                &target.options,
                None,
            )
            .await?;
            Ok::<_, crate::error::AgentError>((capture, restored))
        };
        let started = tokio::select! {
            _ = &mut stop => return,
            started = started => started,
        };
        match started {
            Ok((mut capture, restored_files)) => {
                capture.set_metrics(metrics.clone());
                if let Some(pod) = &target.pod {
                    capture.guard_pod(PodGuard {
                        uid: pod.uid.clone(),
                        ending: ending.clone(),
                    });
                }
                metrics.up(true);
                states.set(&target.name, TargetState::Capturing { restored_files });
                if failures > 0 {
                    tracing::info!(
                        "target {}: capturing after {failures} failed start(s)",
                        target.name
                    );
                }
                // A dropped sender (the daemon gone) is a stop with a capture.
                let stopping = async { (&mut stop).await.unwrap_or(Finish::Capture) };
                match capture.run_until_finish(stopping).await {
                    Ok(summary) => tracing::info!(
                        batches = summary.batches,
                        dropped = summary.dropped,
                        torn = summary.torn,
                        failures = summary.failures,
                        "target {} stopped",
                        target.name
                    ),
                    Err(e) => tracing::error!("target {} stopped: {e:#}", target.name),
                }
                return;
            }
            Err(e) => {
                metrics.up(false);
                states.set(&target.name, TargetState::Failed(format!("{e:#}")));
                failures += 1;
                let wait = crate::watch::backoff(failures, MAX_START_WAIT);
                tracing::error!(
                    "target {} failed (try {failures}): {e:#}; the other targets keep capturing; trying again in {}",
                    target.name,
                    humantime::format_duration(wait)
                );
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Replays the store's latest state into those of `target`'s directories
/// that are empty, when its store exists; returns the files written. A
/// replay is all-or-nothing and verified against the stored hashes.
async fn restore_if_empty(
    target: &Target,
    states: &control::States,
    metrics: &crate::metrics::TargetMetrics,
) -> Result<u64> {
    let empty: Vec<crate::roots::StateDir> = target
        .roots
        .iter()
        .filter(|root| {
            std::fs::read_dir(&root.path).is_ok_and(|mut entries| entries.next().is_none())
        })
        .cloned()
        .collect();
    if empty.is_empty() || !target.store.exists() {
        return Ok(0);
    }
    states.set(&target.name, TargetState::Restoring);
    let (store, names) = (
        target.store.clone(),
        empty.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
    );
    let options = crate::replay::ReplayOptions {
        // A directory the store has no history for yet is simply new.
        new_roots: names,
        sync: true,
        force: false,
    };
    let span = tracing::Span::current();
    let started = std::time::Instant::now();
    let summaries = tokio::task::spawn_blocking(move || {
        let _span = span.enter();
        crate::replay::replay(&store, &empty, crate::history::Moment::Latest, &options)
    })
    .await
    .context("restore task failed")??;
    metrics.replayed(started.elapsed());
    let mut files = 0;
    for summary in summaries.unwrap_or_default() {
        tracing::info!("restored {summary} (the directory was empty)");
        files += summary.written as u64;
    }
    Ok(files)
}
