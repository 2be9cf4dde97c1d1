//! `cargo xtask`: DiffKeeper's developer tasks.
//!
//! - `setup`: installs what the eBPF build needs (Debian's Rust 1.96 with its
//!   library source, LLVM 22, `bpf-linker` 0.13 built against it), what the
//!   deployment tests need (umoci, crun, a pinned `kubernetes-validate`) and
//!   mounts tracefs; quick when everything is present.
//! - `build`, `run [-- ARGS]` (no ARGS: the demo), `test`, `bench [NAME]`.
//! - `image`: an OCI image of the release binary, built offline with umoci
//!   (see `image.rs` and `deploy/README.md`).
//!
//! The pins and why: see `../shared/notes/ebpf-toolchain.md`. In short, the
//! eBPF crate needs `-Z build-std=core` and the standard library's source,
//! which the machine's rustup toolchain lacks; Debian's `rust-web-src` has
//! it, and `bpf-linker` must be built against the LLVM Debian ships (22).

mod bench;
mod image;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "DiffKeeper's build, test and benchmark tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build and the tests need (Debian packages,
    /// bpf-linker, kubernetes-validate) and mount tracefs; returns in
    /// seconds when all is present.
    Setup,
    /// Setup, then build diffkeeper in release mode (the eBPF object is
    /// built and embedded by diffkeeper-tracer/build.rs).
    Build,
    /// Build, then run `diffkeeper ARGS` as root; with no ARGS, the demo.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, `cargo fmt --check`, clippy with warnings denied, every test
    /// (the eBPF tests load programs into this kernel, so this runs as root).
    Test,
    /// Build an OCI image (an OCI layout directory) holding only
    /// /usr/local/bin/diffkeeper and the libraries it links, offline with
    /// umoci; prints its size. Builds the release binary first unless
    /// --binary is given.
    Image {
        /// The OCI layout directory (created, or an existing layout given
        /// one more tag) [default: <target>/oci/diffkeeper]
        #[arg(long)]
        out: Option<PathBuf>,
        /// The image's tag in the layout.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
        /// Package this binary instead of building one (the tests pass the
        /// binary cargo built for them).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Benchmarks against peers measured in the same run: `delta`, `replay`,
    /// `history`, `tracer`, `tree`, `consistency`, `daemon`, `peers`, or all
    /// when none is named (`--keep` keeps the work files).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The tracer benchmark's app: 4 KiB pwrite calls to FILES files in
    /// DIR, getpid calls, or creates and unlinks in DIR (--mode), for
    /// SECONDS, as fast as possible or at RATE calls per second; prints the
    /// calls made and the rate reached as JSON.
    #[command(hide = true)]
    BenchWriter {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "pwrite")]
        mode: bench::tracer::Mode,
        #[arg(long, default_value_t = 4)]
        files: usize,
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Also print the calls of every window of this many milliseconds,
        /// one JSON line each, as they end (0: none).
        #[arg(long, default_value_t = 0)]
        window_ms: u64,
    },
}

/// Debian packages the eBPF build needs, the real apps the tests check
/// with their own integrity tools (git, sqlite3, and PostgreSQL, which must
/// start on a data directory DiffKeeper restored), bindfs, a FUSE file
/// system that cannot swap two names in one step (as NFS and CIFS cannot),
/// and what `cargo xtask image` and `tests/deploy.rs` need (below).
const DEBIAN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "git",
    "sqlite3",
    "postgresql",
    "bindfs",
    // `cargo xtask image` builds the OCI image offline with umoci (no
    // daemon, no registry) and strips the binary's line tables with
    // binutils' objcopy; tests/deploy.rs runs the image with crun, a real
    // OCI runtime, as a node would.
    "umoci",
    "binutils",
    "crun",
    // The virtual environment kubernetes-validate is installed in (Debian's
    // python3 has no venv module without it).
    "python3-venv",
    // tests/discovery.rs makes a cluster CA and the stand-in API server's
    // certificate with it.
    "openssl",
];
/// PyPI's kubernetes-validate, which checks the rendered manifests against
/// the Kubernetes API schemas offline (tests/deploy.rs), with its
/// dependencies pinned as well, so a new jsonschema cannot change what
/// passes. 1.37.0 carries the schemas of Kubernetes 1.25 to 1.37; the
/// tests pick 1.32, the kubectl installed here.
const KUBERNETES_VALIDATE: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.4",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const TRACEFS: &str = "/sys/kernel/tracing";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::Build => build(),
        Task::Run { args } => run(&args),
        Task::Test => test(),
        Task::Image { out, tag, binary } => image(out, &tag, binary),
        Task::Bench { args } => build().and_then(|_| bench::run(&workspace_root(), &args)),
        Task::BenchWriter {
            dir,
            mode,
            files,
            rate,
            seconds,
            window_ms,
        } => bench::tracer::writer(
            &dir,
            mode,
            files,
            rate,
            seconds,
            std::time::Duration::from_millis(window_ms),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Runs a command, failing with its name when it fails.
pub fn checked(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    // The effective uid, second of the Uid: line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for &package in DEBIAN_PACKAGES {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .output()
            .context("cannot run dpkg-query (setup needs a Debian-based machine)")?;
        if !String::from_utf8_lossy(&out.stdout).contains("install ok installed") {
            missing.push(package);
        }
    }
    Ok(missing)
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn bpf_linker_ok() -> bool {
    Command::new(cargo_bin_dir().join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn tracefs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(TRACEFS) && l.contains(" tracefs "))
    })
}

fn command_runs(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Installs [`KUBERNETES_VALIDATE`] with pip in its own virtual
/// environment (a Debian python refuses `pip install` outside one, and the
/// machine's python stays as it was), unless that version is there.
fn kubernetes_validate() -> Result<()> {
    let venv = kubernetes_validate_venv();
    // Every pin at its version, asked of the environment's own python
    // (a tenth of a second; running the validator takes half a second).
    const CHECK: &str = "import re, sys, importlib.metadata as m; \
        norm = lambda name: re.sub(r'[-_.]+', '-', name).lower(); \
        have = {norm(d.metadata['Name']): d.version for d in m.distributions()}; \
        pins = (pin.split('==') for pin in sys.argv[1:]); \
        sys.exit(0 if all(have.get(norm(n)) == v for n, v in pins) else 1)";
    let installed = command_runs(
        venv.join("bin").join("python3"),
        &[&["-c", CHECK][..], KUBERNETES_VALIDATE].concat(),
    );
    if installed {
        return Ok(());
    }
    println!(
        "setup: installing {} into {} (from PyPI)",
        KUBERNETES_VALIDATE[0],
        venv.display()
    );
    // --clear: a half-made environment, or one whose python is gone (it
    // links to the python that made it), is made anew.
    checked(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )
    .with_context(|| {
        format!(
            "cannot create a Python virtual environment at {}",
            venv.display()
        )
    })?;
    checked(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(KUBERNETES_VALIDATE),
    )
}

fn setup() -> Result<()> {
    let started = Instant::now();
    let missing = missing_packages()?;
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "Debian packages {} are missing and installing them needs root",
                missing.join(" ")
            );
        }
        println!("setup: installing {}", missing.join(" "));
        let apt = |args: &[&str]| {
            let mut command = Command::new("apt-get");
            command.env("DEBIAN_FRONTEND", "noninteractive").args(args);
            checked(&mut command)
        };
        apt(&["update", "-qq"])?;
        let mut install = vec!["install", "-y", "-qq"];
        install.extend(&missing);
        apt(&install)?;
    }
    if !bpf_linker_ok() {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![PathBuf::from(LLVM_BIN)];
        paths.extend(std::env::split_paths(&path));
        checked(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .env("PATH", std::env::join_paths(paths).context("PATH")?)
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22", "--force"]),
        )?;
    }
    kubernetes_validate()?;
    if !command_runs("kubectl", &["version", "--client"]) {
        // Not a Debian package; the machine image ships kubectl 1.32.
        println!("setup: kubectl is not installed: tests/deploy.rs renders the manifests with `kubectl kustomize` and will fail");
    }
    if !tracefs_mounted() {
        if is_root() {
            println!("setup: mounting tracefs at {TRACEFS}");
            checked(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS]))?;
        } else {
            println!(
                "setup: tracefs is not mounted at {TRACEFS}; diffkeeper mounts it when run as root"
            );
        }
    }
    println!(
        "setup: all present ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build() -> Result<()> {
    setup()?;
    checked(cargo().args(["build", "--release", "-p", "diffkeeper"]))
}

/// The cargo target directory: `CARGO_TARGET_DIR`, else `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The release binary `build` made.
pub fn diffkeeper_binary() -> PathBuf {
    target_dir().join("release").join("diffkeeper")
}

/// The virtual environment kubernetes-validate is installed in: under the
/// target directory, where tests/deploy.rs finds it beside the binary
/// (`<target>/release/diffkeeper`).
fn kubernetes_validate_venv() -> PathBuf {
    target_dir().join("tools").join("kubernetes-validate")
}

fn image(out: Option<PathBuf>, tag: &str, binary: Option<PathBuf>) -> Result<()> {
    let binary = match binary {
        Some(binary) => binary,
        None => {
            build()?;
            diffkeeper_binary()
        }
    };
    let out = out.unwrap_or_else(|| target_dir().join("oci").join("diffkeeper"));
    image::build(&binary, &out, tag)
}

fn run(args: &[String]) -> Result<()> {
    build()?;
    let args: Vec<String> = if args.is_empty() {
        vec!["demo".into()]
    } else {
        args.to_vec()
    };
    let binary = diffkeeper_binary();
    let mut command = if is_root() {
        Command::new(&binary)
    } else {
        println!("run: eBPF needs root (or CAP_BPF and CAP_PERFMON); running through sudo");
        let mut sudo = Command::new("sudo");
        sudo.arg(&binary);
        sudo
    };
    checked(command.args(&args))
}

fn test() -> Result<()> {
    if !is_root() {
        bail!("the tests load eBPF programs into the kernel: run `cargo xtask test` as root");
    }
    setup()?;
    checked(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The eBPF crate is its own workspace.
    checked(cargo().args([
        "fmt",
        "--manifest-path",
        "diffkeeper-ebpf/Cargo.toml",
        "--",
        "--check",
    ]))?;
    checked(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Release: the end-to-end tests push files of tens of MiB through the
    // real binary.
    let (passed, failed) =
        run_tests(cargo().args(["test", "--workspace", "--release", "--no-fail-fast"]))?;
    // One closing line for the whole run (cargo prints one per test binary).
    println!("{passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        bail!("{failed} tests failed, {passed} passed");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and adds up the
/// `test result:` lines of every test binary.
fn run_tests(command: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let shown = format!("{command:?}");
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {shown}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                result
                    .split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {shown}"))?;
    if !status.success() && failed == 0 {
        bail!("{shown} failed ({status})");
    }
    Ok((passed, failed))
}
