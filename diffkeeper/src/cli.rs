//! The `diffkeeper` command line: argument parsing and output, over the
//! library's stages.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::roots::{parse_state_dirs, StateDir};

#[derive(Debug, Parser)]
#[command(
    name = "diffkeeper",
    version,
    about = "Keeps the file state of a containerized app as a compact history of binary deltas, and rebuilds it on restart.",
    long_about = "Keeps the file state of a containerized app as a compact history of binary deltas \
in one small store file, and rebuilds that state when the container restarts.\n\n\
A state directory is given as --state-dir DIR (kept under the name of its last component) or \
--state-dir NAME=DIR; the name is what ties a directory to its history, so a fresh directory \
replays the history of the same NAME.\n\n\
Exit status: 0 on success, 1 on any error (the message names the cause and the path), \
2 on bad usage.\n\nLogging goes to stderr; set RUST_LOG (e.g. RUST_LOG=diffkeeper=debug) or use -v."
)]
pub struct Cli {
    /// More logging (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// How log lines on stderr are written: human (one readable line
    /// each) or json (one JSON object per line, with every field and the
    /// span's, e.g. the daemon's target, for log collectors).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Args)]
pub struct StoreArg {
    /// The store file (created by the first snapshot). Its payload goes to
    /// segment files in FILE.payload/ beside it: keep the two together.
    #[arg(long, value_name = "FILE")]
    pub store: PathBuf,
}

#[derive(Debug, Args)]
pub struct RootsArgs {
    /// A state directory, as DIR or NAME=DIR. Repeat for several.
    #[arg(long = "state-dir", value_name = "[NAME=]DIR", required = true)]
    pub state_dirs: Vec<String>,
    #[command(flatten)]
    pub store: StoreArg,
}

/// Which moment of the history (default: the latest).
#[derive(Debug, Args, Default)]
#[group(multiple = false)]
pub struct MomentArgs {
    /// The state at this time, RFC 3339 (2026-11-24T10:00:00Z or with an
    /// offset): what the newest batch committed at or before it recorded.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// The state this long ago: 90s, 10m, 2h, 3d.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ago: Option<std::time::Duration>,
    /// The state right after batch N committed (see `log --batches`).
    #[arg(long, value_name = "N")]
    pub batch: Option<u64>,
}

impl MomentArgs {
    fn moment(&self) -> Result<crate::history::Moment> {
        Ok(crate::history::Moment::from_options(
            self.at.as_deref(),
            self.ago,
            self.batch,
        )?)
    }
}

/// A retention policy. A batch kept by any rule is kept; the newest batch
/// always is.
#[derive(Debug, Args, Default, Clone)]
pub struct PolicyArgs {
    /// Keep every batch within this long of the newest one (7d, 12h).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub keep_within: Option<std::time::Duration>,
    /// Keep the N newest batches.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u64>,
    /// Keep the newest batch of each of the N most recent hours with batches.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u64>,
    /// Keep the newest batch of each of the N most recent days (UTC) with batches.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u64>,
    /// Keep the newest batch of each of the N most recent weeks (UTC,
    /// Monday to Sunday) with batches.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u64>,
}

impl PolicyArgs {
    pub fn policy(&self) -> crate::retention::Policy {
        crate::retention::Policy {
            keep_within: self.keep_within,
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
        }
    }
}

/// A time for `--since`/`--until`: RFC 3339, or a duration ago.
fn time_or_ago(text: &str) -> Result<i64, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        // Before 1970: before every batch.
        return Ok(crate::store::now_ms()
            .saturating_sub(i64::try_from(ago.as_millis()).unwrap_or(i64::MAX))
            .max(0));
    }
    crate::history::moment::parse_time(text)
        .map_err(|e| format!("{e:#}; or a duration ago (10m, 2h, 3d)"))
}

/// Parses one of `values` by name; each name's help is shown by `--help`
/// (the agent's enums name and describe their values; the command line
/// only reads them).
fn one_of<T: Copy + Send + Sync + 'static>(
    values: &'static [(T, &'static str, &'static str)],
) -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(
        values
            .iter()
            .map(|(_, name, help)| PossibleValue::new(*name).help(*help)),
    )
    .try_map(move |name| {
        values
            .iter()
            .find(|(_, known, _)| *known == name)
            .map(|(value, _, _)| *value)
            .ok_or_else(|| format!("unknown value {name}"))
    })
}

/// Options of the capture loop (`watch`, `run`).
#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub roots: RootsArgs,
    /// Where write notices come from: auto (eBPF when it loads, else
    /// inotify, else scanning, saying which), ebpf, inotify, or scan.
    #[arg(long, default_value = "auto", value_parser = one_of(&crate::watch::Backend::ALL))]
    pub backend: crate::watch::Backend,
    /// Quiet time after the last write before a directory is captured.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub debounce: std::time::Duration,
    /// Longest a write waits to be captured, even under continuous writes.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub max_latency: std::time::Duration,
    /// How often the scan backend walks the directories (and the inotify
    /// backend, once it cannot add a watch for every directory).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub scan_interval: std::time::Duration,
    /// How often the eBPF backend walks them anyway, as a safety net for
    /// changes it cannot attribute in the kernel.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub rescan_interval: std::time::Duration,
    /// Attach the eBPF backend's 32 syscall tracepoints even where the
    /// kernel's ctime hooks see every change alone (trees on ext4, XFS,
    /// Btrfs or tmpfs, Linux 6.13 or later). Any syscall tracepoint slows
    /// every syscall of every process on the node; without this flag they
    /// are attached only for trees on other file systems.
    #[arg(long)]
    pub syscall_hooks: bool,
    /// Retention applied while running: the store is compacted to these
    /// rules (or, without --keep-* options, to the store's saved policy)
    /// a minute after start and then every --compact-interval.
    #[command(flatten)]
    pub retention: PolicyArgs,
    /// How often the retention policy is applied.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub compact_interval: std::time::Duration,
    /// How each batch is made a crash-consistent cut (the tree at one
    /// instant). auto: read with the app running, and if it was written
    /// meanwhile, take the batch again with the app's writers frozen
    /// (cgroup v2 freezer) while the changed bytes are copied; freeze:
    /// freeze for every batch; none: never pause (a batch written while
    /// read waits for a quiet moment, and past --max-latency is committed
    /// marked torn). `log --batches` shows each batch's cut.
    #[arg(long, default_value = "auto", value_parser = one_of(&crate::watch::Consistency::ALL))]
    pub consistency: crate::watch::Consistency,
    /// Longest the writers stay frozen for one batch: past it they are
    /// thawed, the rest is read live and the batch is marked torn.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub max_pause: std::time::Duration,
    /// A cgroup v2 directory whose processes write the state directories,
    /// to freeze for a consistent cut. `run` freezes the cgroup it starts
    /// its app in; `watch` also finds the cgroups of the processes the eBPF
    /// tracer sees writing the trees. One that holds DiffKeeper itself, and
    /// the root cgroup, are refused. Repeat for several.
    #[arg(long = "freeze-cgroup", value_name = "PATH")]
    pub freeze_cgroups: Vec<PathBuf>,
    /// Keep only the files this glob matches (relative to each state
    /// directory; with a `/` anchored at its top, without matching a name
    /// at any depth; `**` crosses directories). Directories are always
    /// kept. Repeat for several; none keeps every file.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Never keep the paths this glob matches, nor what is under a
    /// directory it matches (`*.tmp`, `/cache`, `logs/**/*.gz`): a change
    /// to them is not recorded, nor their removal. Wins over --include.
    /// Repeat for several.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (batches, bytes,
    /// store size, capture latency, freeze pauses...), with /healthz and
    /// /readyz; off unless given (`daemon` serves them by default).
    #[arg(long, value_name = "ADDR", value_parser = metrics_addr)]
    pub metrics_addr: Option<MetricsAddr>,
}

/// `--metrics-addr`: an address, or none.
#[derive(Debug, Clone, Copy)]
pub struct MetricsAddr(Option<std::net::SocketAddr>);

fn metrics_addr(text: &str) -> std::result::Result<MetricsAddr, String> {
    crate::agent::daemon::config::parse_metrics_addr(text).map(MetricsAddr)
}

fn syscall_hooks(always: bool) -> crate::events::SyscallHooks {
    if always {
        crate::events::SyscallHooks::Always
    } else {
        crate::events::SyscallHooks::Auto
    }
}

impl WatchArgs {
    fn options(&self) -> Result<crate::watch::WatchOptions> {
        let filter = crate::scan::PathFilter::of_globs(&self.include, &self.exclude)
            .map_err(|why| anyhow::anyhow!("--{why}"))?
            .map(std::sync::Arc::new);
        Ok(crate::watch::WatchOptions {
            backend: self.backend,
            debounce: self.debounce,
            max_latency: self.max_latency,
            scan_interval: self.scan_interval,
            rescan_interval: self.rescan_interval,
            syscall_hooks: syscall_hooks(self.syscall_hooks),
            retention: self.retention.policy(),
            compact_interval: self.compact_interval,
            consistency: self.consistency,
            max_pause: self.max_pause,
            freeze_cgroups: self.freeze_cgroups.clone(),
            filter,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scan the state directories and record every change since the last
    /// capture as one batch (new, changed, deleted files, dirs, symlinks,
    /// mode, owner and extended-attribute changes). A file whose size,
    /// mtime, inode and ctime show it unchanged is not read.
    Snapshot {
        #[command(flatten)]
        roots: RootsArgs,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Record the batch as taken at this RFC 3339 time instead of now
        /// (importing a history; must not be older than the newest batch).
        #[arg(long, value_name = "TIME", hide = true)]
        time: Option<String>,
    },
    /// Bring the state directories to the latest captured state, or roll
    /// them back (or forward) to another moment with --at, --ago or --batch.
    /// Content is rebuilt and verified before anything is changed; files
    /// are swapped into place, all or nothing (a failure midway undoes
    /// every change); paths created after that moment are removed; paths
    /// the store never had are left alone, and one in the way of a stored
    /// path stops the replay by name (--force replaces it). Before rolling to
    /// another moment, the directories are captured as they are (one batch),
    /// so the rollback can be undone. With no store yet (first start) this
    /// says so and exits 0.
    Replay {
        #[command(flatten)]
        roots: RootsArgs,
        #[command(flatten)]
        moment: MomentArgs,
        /// Flush the file system before exiting, so the replayed state is on
        /// disk (by default the store is the durable copy and a crash
        /// mid-replay is followed by another replay).
        #[arg(long)]
        sync: bool,
        /// Replace or remove what the store does not track when a stored
        /// path needs its place (a directory holding files never captured
        /// where the store has a file, a FIFO, a file created since the
        /// last capture). Without it replay refuses, naming the path, and
        /// changes nothing.
        #[arg(long)]
        force: bool,
        /// A state directory NAME that starts now: with no history for it
        /// in a store that has others, it starts empty instead of being
        /// refused as a name typed wrong. Repeat for several.
        #[arg(long = "new-root", value_name = "NAME")]
        new_roots: Vec<String>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// With --at/--ago/--batch on a directory an app still writes: the
        /// cgroup v2 directory of that app, frozen while the current state
        /// is recorded, so that record is a consistent cut. Repeat for
        /// several.
        #[arg(long = "freeze-cgroup", value_name = "PATH")]
        freeze_cgroups: Vec<PathBuf>,
        /// Longest the app stays frozen for that record.
        #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
        max_pause: std::time::Duration,
    },
    /// Show each file's versions: time, batch, kind (base, packed, delta,
    /// chunks, same, dir, symlink, deleted), logical size and stored bytes
    /// (a packed version's are its pack's, counted in its batch). With
    /// --batches, the timeline instead: one line per batch with its time,
    /// files changed, content bytes changed and bytes stored.
    Log {
        #[command(flatten)]
        store: StoreArg,
        /// Only this path or the paths under it (PATH or ROOT:PATH; any
        /// bytes, as Linux names may be).
        #[arg(conflicts_with = "batches")]
        path: Option<std::ffi::OsString>,
        /// One line per batch instead of one block per file.
        #[arg(long)]
        batches: bool,
        /// Only batches at or after this time (RFC 3339, or a duration ago: 2h).
        #[arg(long, value_name = "TIME", value_parser = time_or_ago, requires = "batches")]
        since: Option<i64>,
        /// Only batches at or before this time (RFC 3339, or a duration ago).
        #[arg(long, value_name = "TIME", value_parser = time_or_ago, requires = "batches")]
        until: Option<i64>,
        /// Print the history as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Materialize the state of a past moment (default: the latest) into a
    /// new or empty directory, verified. With several state directories in
    /// the store and no --root, each goes into DIR/NAME.
    Restore {
        #[command(flatten)]
        store: StoreArg,
        /// Where to put the state (created if missing).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        #[command(flatten)]
        moment: MomentArgs,
        /// Only this state directory (its NAME).
        #[arg(long, value_name = "NAME")]
        root: Option<String>,
        /// Restore into a non-empty DIR: stored paths are brought to that
        /// moment (replacing whatever is in their place), other paths are
        /// left alone.
        #[arg(long)]
        force: bool,
        /// Flush the file system before exiting.
        #[arg(long)]
        sync: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what changed in one path between two moments: a unified diff
    /// for text, changed byte ranges for binary content. Without --from and
    /// --to, the path's last two versions.
    Diff {
        #[command(flatten)]
        store: StoreArg,
        /// The path, as PATH or ROOT:PATH.
        path: String,
        /// The older moment: a batch number, an RFC 3339 time, or a duration
        /// ago (default: the version before the one shown for --to).
        #[arg(long, value_name = "BATCH|TIME")]
        from: Option<String>,
        /// The newer moment (default: the newest version).
        #[arg(long, value_name = "BATCH|TIME")]
        to: Option<String>,
    },
    /// Write the state of a moment (default: the latest) as a tar archive,
    /// modes, mtimes, numeric owners and extended attributes kept;
    /// zstd-compressed when FILE ends in .zst.
    Export {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        moment: MomentArgs,
        /// Only this state directory; with several and no --root, each is
        /// archived under NAME/.
        #[arg(long, value_name = "NAME")]
        root: Option<String>,
        /// The archive to write (FILE.tar, FILE.tar.zst, or - for stdout).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Drop the batches a retention policy does not keep, releasing what
    /// only they used, and shrink the store file. The newest batch is always
    /// kept; every kept moment restores exactly as before; a crash midway
    /// leaves the old history or the new one. Without --keep-* options the
    /// store's saved policy (--save) applies.
    Compact {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Only report what would be dropped and freed.
        #[arg(long)]
        dry_run: bool,
        /// Save these rules as the store's policy: `compact` without rules,
        /// `stats`, and `run`/`watch` without --keep-* use it from then on.
        #[arg(long)]
        save: bool,
        /// Forget the store's saved policy (and compact nothing).
        #[arg(long, conflicts_with_all = ["save", "dry_run"])]
        forget: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Totals: files, versions, batches, logical bytes, stored bytes, ratio,
    /// and the store file's size on disk. With --keep-* options (or a policy
    /// saved in the store), also what compacting to it would free.
    Stats {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Print the totals as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the store's structure (every latest entry has its version,
    /// every version its batch and chunks, the chunk index agrees with the
    /// chunks), rebuild every version of every file and check every hash.
    /// Exits 1 naming every problem found, not only the first.
    Verify {
        #[command(flatten)]
        store: StoreArg,
        /// Print the report (and every problem) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Capture changes as they happen until SIGTERM or SIGINT, then capture
    /// once more and exit 0. Changes made while DiffKeeper was not running
    /// are captured at start.
    Watch {
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Capture many targets from one process with one set of eBPF programs:
    /// each target is a set of state directories with its own store and
    /// capture settings (debounce, consistency, retention...), read from a
    /// TOML file (a commented example: deploy/daemon.toml). SIGHUP, or a
    /// change to the file, reloads it: new targets start, removed ones stop
    /// after a final capture, changed ones restart, the others are not
    /// touched; a file with a mistake changes nothing and says why. A
    /// target that fails (its store corrupt, full or held, its directories
    /// missing) is reported and retried with back-off while the others keep
    /// capturing. With a [kubernetes] section, the annotated pods of the
    /// node (diffkeeper.io/volumes: NAME,...) are targets too, named
    /// NAMESPACE.POD, restored into their new volumes when re-created.
    /// SIGTERM or SIGINT stops every target after a final capture.
    Daemon {
        /// The configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Check the file, print its targets and exit (0 if it is valid).
        #[arg(long)]
        check: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics, and health
        /// checks at /healthz and /readyz (ready once every target made its
        /// first start); `none` for none. Overrides the file's
        /// `metrics_addr` (default 0.0.0.0:9090).
        #[arg(long, value_name = "ADDR", value_parser = metrics_addr)]
        metrics_addr: Option<MetricsAddr>,
    },
    /// Wait until the daemon has TARGET's state in place (replayed from its
    /// store and verified, when its directories were empty) and is
    /// capturing it; exit 0 then. For an init container, before the app
    /// starts: only the daemon opens the store, so this asks it over its
    /// control socket (`socket` in its configuration). Reconnects while
    /// the daemon is not there or restarts; exits 1 past --timeout, saying
    /// what the daemon said last.
    RestoreWait {
        /// The daemon's control socket.
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/run/diffkeeper/daemon.sock"
        )]
        socket: PathBuf,
        /// The target to wait for (its name in the daemon's configuration;
        /// NAMESPACE.POD for a pod it discovered).
        #[arg(long, value_name = "NAME")]
        target: String,
        /// Ready only once the target is this pod's (its metadata.uid): a
        /// re-created pod is then never told ready by the target of the
        /// pod it replaces.
        #[arg(long, value_name = "UID")]
        pod_uid: Option<String>,
        /// Longest wait.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Replay the state, start CMD, capture while it runs, capture once more
    /// when it exits, and exit with its exit code (128 + signal if it was
    /// killed; 127 if it cannot be started; 1 if it exited 0 but capturing
    /// failed, so its last writes may not be kept). SIGTERM, SIGINT and SIGHUP are
    /// forwarded to CMD. Processes CMD leaves running when it exits are
    /// ended before the final capture, so none writes after it.
    Run {
        #[command(flatten)]
        watch: WatchArgs,
        /// When CMD exits, processes it left running get SIGTERM, and
        /// SIGKILL once this has passed; the final capture waits for them.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
        leftover_grace: std::time::Duration,
        /// Let CMD keep running if DiffKeeper itself is killed (SIGKILL, the
        /// OOM killer). By default CMD gets SIGKILL when DiffKeeper dies, so
        /// no app is left writing with nothing capturing its writes.
        #[arg(long)]
        app_survives: bool,
        /// A state directory NAME that starts now (see `replay --new-root`).
        #[arg(long = "new-root", value_name = "NAME")]
        new_roots: Vec<String>,
        /// After SIGTERM or SIGINT is forwarded to CMD, how long it has to
        /// exit before it and every process it started get SIGKILL (a shell
        /// that traps SIGTERM while it waits on a pipeline never runs its
        /// trap). The final capture follows either way, with nothing left
        /// writing. Keep it below the container's termination grace period
        /// (30 s by default in Kubernetes).
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
        stop_grace: std::time::Duration,
        /// The app and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Check that this kernel and these privileges can run the eBPF tracer:
    /// load and attach the embedded program, write, and count the writes.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Test with the syscall tracepoints attached too (see `watch
        /// --syscall-hooks`).
        #[arg(long)]
        syscall_hooks: bool,
    },
    /// Run a small built-in demo in a temporary directory: watch an app
    /// write (eBPF when it loads), then wipe, replay, show the history and
    /// verify.
    Demo,
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Replay and restore summaries, one line per root or as JSON.
fn print_summaries(summaries: &[crate::replay::ReplaySummary], json: bool) -> Result<()> {
    if json {
        print_json(&summaries)
    } else {
        for s in summaries {
            println!("{s}");
        }
        Ok(())
    }
}

fn state_dirs(args: &RootsArgs) -> Result<Vec<StateDir>> {
    Ok(parse_state_dirs(&args.state_dirs)?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Snapshot { roots, json, time } => {
            let dirs = state_dirs(&roots)?;
            let taken = match time {
                Some(time) => crate::capture::snapshot_at(
                    &roots.store.store,
                    &dirs,
                    crate::history::moment::parse_time(&time)?,
                ),
                None => crate::capture::snapshot(&roots.store.store, &dirs),
            };
            let summary = taken.with_context(|| {
                format!(
                    "snapshot into store {} failed; batches already stored are intact",
                    roots.store.store.display()
                )
            })?;
            if json {
                print_json(&summary)?;
            } else {
                println!("{summary}");
            }
            for (path, why) in &summary.failures {
                eprintln!("error: {}: {why}", path.display());
            }
            Ok(if summary.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Replay {
            roots,
            moment,
            sync,
            force,
            new_roots,
            json,
            freeze_cgroups,
            max_pause,
        } => {
            let dirs = state_dirs(&roots)?;
            let mut moment = moment.moment()?;
            if moment != crate::history::Moment::Latest {
                let freeze = if freeze_cgroups.is_empty() {
                    None
                } else {
                    let cgroups = freeze_cgroups
                        .iter()
                        .map(|path| crate::freeze::Cgroup::open(path))
                        .collect::<Result<Vec<_>, _>>()?;
                    Some(crate::freeze::FreezeSet::new(cgroups)?)
                };
                let kept = crate::replay::keep_current_state(
                    &roots.store.store,
                    &dirs,
                    moment,
                    freeze.as_ref(),
                    max_pause,
                )?;
                if let Some(current) = kept.recorded {
                    eprintln!(
                        "recorded the current state as batch {current} before rolling back to batch {} (undo: replay --batch {current})",
                        kept.target
                    );
                }
                moment = crate::history::Moment::Batch(kept.target);
            }
            let options = crate::replay::ReplayOptions {
                sync,
                force,
                new_roots,
            };
            match crate::replay::replay(&roots.store.store, &dirs, moment, &options)? {
                None => {
                    let msg = format!(
                        "no store at {} yet: nothing to replay (first start)",
                        roots.store.store.display()
                    );
                    if json {
                        print_json(&serde_json::json!({ "first_start": true, "message": msg }))?;
                    } else {
                        println!("{msg}");
                    }
                }
                Some(summaries) => print_summaries(&summaries, json)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Log {
            store,
            batches: true,
            since,
            until,
            json,
            ..
        } => {
            let lines = crate::report::timeline(&store.store, since, until)?;
            if json {
                print_json(&lines)?;
            } else {
                print!("{}", crate::report::timeline_text(&lines));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            store,
            to,
            moment,
            root,
            force,
            sync,
            json,
        } => {
            let summaries = crate::replay::restore(
                &store.store,
                &to,
                root.as_deref(),
                moment.moment()?,
                force,
                sync,
            )?;
            print_summaries(&summaries, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff {
            store,
            path,
            from,
            to,
        } => {
            let parse =
                |m: Option<String>| m.as_deref().map(crate::history::Moment::parse).transpose();
            let text = crate::history::diff::diff(&store.store, &path, parse(from)?, parse(to)?)?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            store,
            moment,
            root,
            output,
        } => {
            let summary = crate::history::export::export(
                &store.store,
                moment.moment()?,
                root.as_deref(),
                &output,
            )?;
            eprintln!(
                "{}: batch {}, {} files ({}), {} dirs, {} symlinks",
                summary.output,
                summary.batch,
                summary.files,
                crate::report::bytes(summary.bytes),
                summary.dirs,
                summary.symlinks
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Compact {
            store,
            policy,
            dry_run,
            save,
            forget,
            json,
        } => {
            let given = policy.policy();
            if forget {
                crate::retention::save(&store.store, &crate::retention::Policy::default())?;
                println!(
                    "{}: saved retention policy forgotten",
                    store.store.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if save {
                given.require_rules()?;
                crate::retention::save(&store.store, &given)?;
                println!("{}: saved policy: {given}", store.store.display());
            }
            let Some(policy) = crate::retention::given_or_saved(&store.store, &given)? else {
                anyhow::bail!(
                    "no retention rule given and store {} has no saved policy: pass at least one of \
                     --keep-within, --keep-last, --keep-hourly, --keep-daily, --keep-weekly \
                     (with --save to keep them as the store's policy)",
                    store.store.display()
                );
            };
            let summary = if dry_run {
                crate::retention::plan(&store.store, &policy)?
            } else {
                crate::retention::compact(&store.store, &policy)?
            };
            if json {
                print_json(&summary)?;
            } else {
                println!("{summary}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Log {
            store, path, json, ..
        } => {
            let files = crate::report::log(
                &store.store,
                path.as_deref().map(std::os::unix::ffi::OsStrExt::as_bytes),
            )?;
            if json {
                print_json(&files)?;
            } else {
                print!("{}", crate::report::log_text(&files));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats {
            store,
            policy,
            json,
        } => {
            let stats = crate::report::stats(&store.store)?;
            let compaction = match crate::retention::given_or_saved(&store.store, &policy.policy())?
            {
                Some(policy) => Some(crate::retention::plan(&store.store, &policy)?),
                None => None,
            };
            if json {
                let mut value = serde_json::to_value(&stats)?;
                if let (Some(plan), Some(map)) = (compaction, value.as_object_mut()) {
                    map.insert("compaction".into(), serde_json::to_value(plan)?);
                }
                print_json(&value)?;
            } else {
                print!("{}", crate::report::stats_text(&stats));
                if let Some(plan) = compaction {
                    println!("{plan}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { store, json } => {
            let report = crate::verify::verify(&store.store)?;
            if json {
                print_json(&report)?;
            } else {
                for p in &report.problems {
                    eprintln!("damaged: {}: {}", p.what, p.why);
                }
                if !report.problems.is_empty() {
                    eprintln!(
                        "store {}: {} problems found",
                        store.store.display(),
                        report.problems.len()
                    );
                }
                println!(
                    "{} chunks, {} versions ({}) checked: {}",
                    report.chunks,
                    report.versions,
                    crate::report::bytes(report.bytes),
                    if report.problems.is_empty() {
                        "structure sound, all hashes match".to_string()
                    } else {
                        format!("{} damaged", report.problems.len())
                    }
                );
                if report.unreferenced_chunks > 0 {
                    println!(
                        "{} chunks no version uses (left by captures of files that never read whole; the next compact releases them)",
                        report.unreferenced_chunks
                    );
                }
            }
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Doctor {
            json,
            syscall_hooks: always,
        } => {
            let report = crate::events::self_test(syscall_hooks(always))?;
            if json {
                print_json(&report)?;
            } else {
                println!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => demo(),
        Command::Daemon {
            config,
            check,
            metrics_addr,
        } => {
            if check {
                let config = crate::agent::daemon::Config::load(&config)?;
                print!("{}", crate::report::daemon_config_text(&config));
                return Ok(ExitCode::SUCCESS);
            }
            let overrides = crate::agent::daemon::Overrides {
                metrics_addr: metrics_addr.map(|MetricsAddr(addr)| addr),
            };
            runtime()?.block_on(crate::agent::daemon::run(&config, &overrides))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::RestoreWait {
            socket,
            target,
            pod_uid,
            timeout,
        } => {
            let files = runtime()?.block_on(crate::agent::daemon::control::wait(
                &socket,
                &target,
                pod_uid.as_deref(),
                timeout,
            ))?;
            println!("target {target} is restored ({files} files written) and captured");
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { watch } => {
            let dirs = state_dirs(&watch.roots)?;
            Ok(runtime()?.block_on(crate::supervise::watch(
                &watch.roots.store.store,
                &dirs,
                &watch.options()?,
                watch.metrics_addr.and_then(|MetricsAddr(addr)| addr),
            ))?)
        }
        Command::Run {
            watch,
            leftover_grace,
            app_survives,
            new_roots,
            stop_grace,
            command,
        } => {
            let dirs = state_dirs(&watch.roots)?;
            Ok(runtime()?.block_on(crate::supervise::run(
                &watch.roots.store.store,
                &dirs,
                &watch.options()?,
                &command,
                &crate::supervise::RunOptions {
                    leftover_grace,
                    app_survives,
                    new_roots,
                    stop_grace,
                    metrics_addr: watch.metrics_addr.and_then(|MetricsAddr(addr)| addr),
                },
            ))?)
        }
    }
}

/// The built-in demo: a newcomer's first look at the whole loop.
fn demo() -> Result<ExitCode> {
    let work = tempfile::Builder::new()
        .prefix("diffkeeper-demo.")
        .tempdir()
        .context("cannot create a temporary directory for the demo")?;
    let state = work.path().join("state");
    let store_path = work.path().join("state.dkstore");
    let dirs = vec![StateDir {
        name: "state".into(),
        path: state.clone(),
    }];
    let step = |what: &str| println!("\n== {what}");

    step(&format!(
        "diffkeeper watches {} while an app writes its state (batches are logged as they commit)",
        state.display()
    ));
    std::fs::create_dir_all(&state)?;
    let save: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut edited = save.clone();
    edited[1_000_000..1_000_016].copy_from_slice(b"player 7 joined!");
    let app = {
        let (state, save, edited) = (state.clone(), save.clone(), edited.clone());
        move || -> Result<u64> {
            let write = |rel: &str, bytes: &[u8]| -> Result<()> {
                let p = state.join(rel);
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))
            };
            write("world/region-0.dat", &save)?;
            write("config.toml", b"difficulty = \"normal\"\nplayers = 8\n")?;
            std::os::unix::fs::symlink("world/region-0.dat", state.join("current"))?;
            std::thread::sleep(std::time::Duration::from_millis(800));
            // A chatty log: 100,000 small appends.
            let mut log = std::fs::File::create(state.join("server.log"))?;
            for i in 0..100_000u64 {
                std::io::Write::write_all(&mut log, format!("tick {i}\n").as_bytes())?;
            }
            std::thread::sleep(std::time::Duration::from_millis(800));
            // 16 bytes edited in the middle of a 2 MB file.
            write("world/region-0.dat", &edited)?;
            Ok(100_000)
        }
    };
    let options = crate::watch::WatchOptions::default();
    let summary = runtime()?.block_on(async {
        let watching = crate::watch::CaptureLoop::start(&store_path, &dirs, &options, None).await?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let capture = tokio::spawn(watching.run_until(async {
            let _ = stop_rx.await;
        }));
        let appends = tokio::task::spawn_blocking(app)
            .await
            .context("the demo app failed")??;
        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
        let _ = stop_tx.send(());
        let summary = capture.await.context("the capture loop failed")??;
        anyhow::Ok((appends, summary))
    })?;
    println!(
        "the app made {} small appends and two saves; {} batches committed from {} change notices",
        summary.0, summary.1.batches, summary.1.notices
    );

    step("the container restarts with an empty state directory");
    std::fs::remove_dir_all(&state)?;
    let options = crate::replay::ReplayOptions::default();
    for s in crate::replay::replay(&store_path, &dirs, crate::history::Moment::Latest, &options)?
        .unwrap_or_default()
    {
        println!("{s}");
    }
    let back = std::fs::read(state.join("world/region-0.dat"))?;
    println!(
        "region-0.dat restored: {}",
        if back == edited {
            "identical to the last capture"
        } else {
            "DIFFERENT (bug!)"
        }
    );

    step("history");
    print!(
        "{}",
        crate::report::log_text(&crate::report::log(&store_path, None)?)
    );
    step("time travel: the timeline, and what the last save changed (diffkeeper log --batches, diff)");
    print!(
        "{}",
        crate::report::timeline_text(&crate::report::timeline(&store_path, None, None)?)
    );
    print!(
        "{}",
        crate::history::diff::diff(&store_path, "state:world/region-0.dat", None, None)?
    );
    step("stats");
    print!(
        "{}",
        crate::report::stats_text(&crate::report::stats(&store_path)?)
    );
    let verified = crate::verify::verify(&store_path)?;
    println!(
        "\nverify: {} versions checked, {} problems",
        verified.versions,
        verified.problems.len()
    );
    Ok(if back == edited && verified.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
