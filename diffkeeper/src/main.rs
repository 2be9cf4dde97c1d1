//! The `diffkeeper` binary: a thin shell over the library's [`cli`].

use std::process::ExitCode;

use clap::Parser;
use diffkeeper::cli::{self, Cli};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // DiffKeeper's own helper process, never typed by a user.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(diffkeeper::freeze::watchdog::ARG))
    {
        return diffkeeper::freeze::watchdog::serve();
    }
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "diffkeeper=info",
        1 => "diffkeeper=debug",
        _ => "diffkeeper=trace",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A panic is a bug, but the user still deserves one clear line and a
    // non-zero exit, not a bare backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal failure ({info}); the store may be damaged: run `diffkeeper verify`, and please report this");
    }));
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
