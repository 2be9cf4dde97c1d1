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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct StoreArg {
    /// The store file (created by the first snapshot).
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

/// Options of the capture loop (`watch`, `run`).
#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub roots: RootsArgs,
    /// Where write notices come from: auto (eBPF when it loads, else
    /// inotify, else scanning, saying which), ebpf, inotify, or scan.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: crate::watch::Backend,
    /// Quiet time after the last write before a directory is captured.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub debounce: std::time::Duration,
    /// Longest a write waits to be captured, even under continuous writes.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub max_latency: std::time::Duration,
    /// How often the scan backend walks the directories.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub scan_interval: std::time::Duration,
    /// How often the eBPF backend walks them anyway, as a safety net for
    /// changes it cannot attribute in the kernel.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub rescan_interval: std::time::Duration,
}

impl WatchArgs {
    fn options(&self) -> crate::watch::WatchOptions {
        crate::watch::WatchOptions {
            backend: self.backend,
            debounce: self.debounce,
            max_latency: self.max_latency,
            scan_interval: self.scan_interval,
            rescan_interval: self.rescan_interval,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scan the state directories and record every change since the last
    /// capture as one batch (new, changed, deleted files, dirs, symlinks,
    /// mode changes). Files with unchanged size and mtime are not read.
    Snapshot {
        #[command(flatten)]
        roots: RootsArgs,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bring the state directories to the latest captured state. Content is
    /// rebuilt and verified before anything is changed; files are renamed
    /// into place; paths the store never tracked are left alone. With no
    /// store yet (first start) this says so and exits 0.
    Replay {
        #[command(flatten)]
        roots: RootsArgs,
        /// Flush the file system before exiting, so the replayed state is on
        /// disk (by default the store is the durable copy and a crash
        /// mid-replay is followed by another replay).
        #[arg(long)]
        sync: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show each file's versions: time, batch, kind (base, delta, chunks,
    /// same, dir, symlink, deleted), logical size and stored bytes.
    Log {
        #[command(flatten)]
        store: StoreArg,
        /// Only this path or the paths under it (PATH or ROOT:PATH).
        path: Option<String>,
        /// Print the history as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Totals: files, versions, batches, logical bytes, stored bytes, ratio,
    /// and the store file's size on disk.
    Stats {
        #[command(flatten)]
        store: StoreArg,
        /// Print the totals as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild every version of every file and check every hash. Exits 1
    /// naming each damaged version or chunk.
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
    /// Replay the state, start CMD, capture while it runs, capture once more
    /// when it exits, and exit with its exit code (128 + signal if it was
    /// killed; 127 if it cannot be started). SIGTERM, SIGINT and SIGHUP are
    /// forwarded to CMD.
    Run {
        #[command(flatten)]
        watch: WatchArgs,
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

fn state_dirs(args: &RootsArgs) -> Result<Vec<StateDir>> {
    parse_state_dirs(&args.state_dirs)
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
        Command::Snapshot { roots, json } => {
            let dirs = state_dirs(&roots)?;
            let summary =
                crate::capture::snapshot(&roots.store.store, &dirs).with_context(|| {
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
        Command::Replay { roots, sync, json } => {
            let dirs = state_dirs(&roots)?;
            match crate::replay::replay(&roots.store.store, &dirs, sync)? {
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
                Some(summaries) => {
                    if json {
                        print_json(&summaries)?;
                    } else {
                        for s in summaries {
                            println!("{s}");
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Log { store, path, json } => {
            let files = crate::report::log(&store.store, path.as_deref())?;
            if json {
                print_json(&files)?;
            } else {
                print!("{}", crate::report::log_text(&files));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { store, json } => {
            let stats = crate::report::stats(&store.store)?;
            if json {
                print_json(&stats)?;
            } else {
                print!("{}", crate::report::stats_text(&stats));
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
                println!(
                    "{} chunks, {} versions ({}) checked: {}",
                    report.chunks,
                    report.versions,
                    crate::report::bytes(report.bytes),
                    if report.problems.is_empty() {
                        "all hashes match".to_string()
                    } else {
                        format!("{} damaged", report.problems.len())
                    }
                );
            }
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Doctor { json } => {
            let report = crate::events::self_test()?;
            if json {
                print_json(&report)?;
            } else {
                println!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => demo(),
        Command::Watch { watch } => {
            let dirs = state_dirs(&watch.roots)?;
            runtime()?.block_on(crate::supervise::watch(
                &watch.roots.store.store,
                &dirs,
                &watch.options(),
            ))
        }
        Command::Run { watch, command } => {
            let dirs = state_dirs(&watch.roots)?;
            runtime()?.block_on(crate::supervise::run(
                &watch.roots.store.store,
                &dirs,
                &watch.options(),
                &command,
            ))
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
        let watching = crate::watch::CaptureLoop::start(&store_path, &dirs, &options).await?;
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
    for s in crate::replay::replay(&store_path, &dirs, false)?.unwrap_or_default() {
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
