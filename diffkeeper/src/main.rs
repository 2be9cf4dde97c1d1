//! The `diffkeeper` binary: a thin shell over the library's [`cli`].

use std::process::ExitCode;

use clap::Parser;
use diffkeeper::cli::{self, Cli};
use tracing_subscriber::EnvFilter;

/// Set when output stopped because nobody reads it any more.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `e` is a write to standard output after its reader left
/// (`log --json | head`): a broken pipe, and standard output is that pipe.
fn stdout_closed(e: &anyhow::Error) -> bool {
    let broken_pipe = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .or_else(|| {
                c.downcast_ref::<diffkeeper::engine::EngineError>()
                    .and_then(|e| e.io_error())
            })
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .and_then(|j| j.io_error_kind())
                .is_some_and(|k| k == std::io::ErrorKind::BrokenPipe)
    });
    broken_pipe && stdout_gone()
}

/// Whether standard output is a pipe nobody reads any more.
fn stdout_gone() -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let stdout = std::io::stdout();
    let mut fds = [PollFd::new(&stdout, PollFlags::OUT)];
    let now = rustix::fs::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)).is_ok() && fds[0].revents().contains(PollFlags::ERR)
}

/// glibc's malloc gives each thread that allocates under contention an
/// arena of its own, up to 8 per core, and keeps what each frees: a daemon
/// whose targets' captures run on many blocking threads ends up holding
/// memory in every one. Two arenas are plenty for a long-running process
/// (`long_running`) whose heavy work is I/O and hashing (`cargo xtask
/// bench daemon`, 50 targets and a 64 MB rewrite: peak RSS 115 MiB with
/// the default, 79 MiB with two).
///
/// Buffers of 256 KiB and more (packs, chunks of large files, decoded
/// bases) are mapped on their own and given back when freed. glibc's
/// default threshold starts at 128 KiB but rises to the largest block
/// freed, after which such buffers come from the arenas, and a few freed
/// among smaller blocks hold their pages: restoring 50,000 small files
/// (`cargo xtask bench peers`, small) peaked at 66 MiB RSS that way, 53
/// MiB with the threshold fixed, in the same time (1.11 s and 1.14 s to
/// tmpfs); a first snapshot of the same tree 53 and 47 MiB.
/// Called before any thread starts.
fn tune_malloc(long_running: bool) {
    // SAFETY: mallopt only sets tunables of glibc's allocator; it is
    // called before any other thread exists, and a refusal (returns 0) is
    // harmless.
    unsafe {
        if long_running {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

fn main() -> ExitCode {
    // DiffKeeper's own helper process, never typed by a user.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(diffkeeper::freeze::watchdog::ARG))
    {
        return diffkeeper::freeze::watchdog::serve();
    }
    let cli = Cli::parse();
    tune_malloc(matches!(
        cli.command,
        cli::Command::Daemon { .. } | cli::Command::Run { .. } | cli::Command::Watch { .. }
    ));
    diffkeeper::engine::progress::show_with(Box::new(diffkeeper::progress::Bars));
    let default = match cli.verbose {
        0 => "diffkeeper=info",
        1 => "diffkeeper=debug",
        _ => "diffkeeper=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false);
    match cli.log_format {
        cli::LogFormat::Human => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        cli::LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    // redb meets some damage to a store file with a failed internal check
    // (a panic) rather than an error. The user gets one line naming the
    // store and exit status 1, as for any other damage; unwinding runs the
    // clean-ups on the way (replay's staging directory).
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        // `print!` to a pipe whose reader left (`log | head`): the reader
        // has what it wanted.
        if what.starts_with("failed printing to stdout")
            && what.contains("Broken pipe")
            && stdout_gone()
        {
            STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // Only redb's checks meet damage with a panic; one anywhere else is
        // a bug of ours (tests/fuzz.rs holds DiffKeeper's own code to
        // errors), whatever store is open.
        let in_redb = info.location().is_some_and(|l| {
            l.file()
                .split(['/', '\\'])
                .any(|part| part == "redb" || part.starts_with("redb-"))
        });
        match diffkeeper::store::last_opened().filter(|_| in_redb) {
            Some(store) => eprintln!(
                "error: store {} is damaged: its file failed an internal check ({what}{at}); nothing more was changed; `diffkeeper verify --store {}` lists what is damaged",
                store.display(),
                store.display()
            ),
            None => eprintln!("error: internal failure ({what}{at}); please report this"),
        }
    }));
    match std::panic::catch_unwind(|| cli::run(cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) if stdout_closed(&e) => ExitCode::SUCCESS,
        Err(_) if STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            let text = format!("{e:#}");
            // Damage found deep in a record names the record; the user
            // also needs the file.
            let damaged = e.chain().any(|c| {
                let engine = c
                    .downcast_ref::<diffkeeper::engine::EngineError>()
                    .or_else(|| {
                        c.downcast_ref::<diffkeeper::agent::AgentError>()
                            .and_then(|e| e.engine_error())
                    });
                c.downcast_ref::<diffkeeper::store::StoreError>().is_some()
                    || engine.is_some_and(|e| e.store_error().is_some())
            });
            match diffkeeper::store::last_opened() {
                Some(store) if damaged && !text.contains(&*store.to_string_lossy()) => {
                    eprintln!("error: store {}: {text}", store.display())
                }
                _ => eprintln!("error: {text}"),
            }
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}
