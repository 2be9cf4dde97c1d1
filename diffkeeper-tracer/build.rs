//! Builds the eBPF programs (`diffkeeper-ebpf`) for `bpfel-unknown-none` and
//! leaves the object in `OUT_DIR` for this crate to embed.
//!
//! The eBPF crate needs a nightly feature (`-Z build-std=core`) and the
//! standard library's source, which the machine's rustup toolchain lacks, so
//! it is built with Debian's Rust (`/usr/bin/cargo`, `/usr/bin/rustc`, with
//! `RUSTC_BOOTSTRAP=1`) and linked by `bpf-linker`. `cargo xtask setup`
//! installs all three. Nothing is skipped: without them the build fails and
//! says so.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "bpfel-unknown-none";

fn main() {
    if let Err(message) = build() {
        // A build script reports failure by exiting non-zero; the message is
        // what the user sees.
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn tool(env_name: &str, default: &str) -> Result<PathBuf, String> {
    println!("cargo:rerun-if-env-changed={env_name}");
    let path = env::var_os(env_name)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the eBPF toolchain is missing: {} not found (set {env_name} to override). Run `cargo xtask setup`.",
            path.display()
        ))
    }
}

fn find_bpf_linker() -> Result<PathBuf, String> {
    println!("cargo:rerun-if-env-changed=DIFFKEEPER_BPF_LINKER");
    if let Some(path) = env::var_os("DIFFKEEPER_BPF_LINKER") {
        return Ok(PathBuf::from(path));
    }
    let mut candidates: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin"));
    }
    candidates
        .into_iter()
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
        .ok_or_else(|| "the eBPF toolchain is missing: bpf-linker is not on PATH nor in ~/.cargo/bin. Run `cargo xtask setup`.".to_string())
}

/// Where the eBPF build keeps its own target dir: next to the host's
/// `target/<profile>` so debug, release and clippy builds share it.
fn ebpf_target_dir(out_dir: &Path) -> PathBuf {
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    out_dir
        .ancestors()
        .nth(4)
        .filter(|t| t.join("CACHEDIR.TAG").exists() || t.ends_with("target"))
        .map(|t| t.join("ebpf"))
        .unwrap_or_else(|| out_dir.join("ebpf-target"))
}

fn build() -> Result<(), String> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR not set")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    let root = manifest_dir
        .parent()
        .ok_or("diffkeeper-tracer has no parent directory")?;
    let ebpf_dir = root.join("diffkeeper-ebpf");
    let common_dir = root.join("diffkeeper-common");
    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let cargo = tool("DIFFKEEPER_EBPF_CARGO", "/usr/bin/cargo")?;
    let rustc = tool("DIFFKEEPER_EBPF_RUSTC", "/usr/bin/rustc")?;
    let linker = find_bpf_linker()?;
    let target_dir = ebpf_target_dir(&out_dir);

    let mut command = Command::new(&cargo);
    // The host build's environment (RUSTFLAGS, wrappers, its target dir,
    // profile settings...) must not leak into a build for another target
    // with another compiler.
    command.env_clear();
    for keep in [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "TMPDIR",
        "TERM",
        "http_proxy",
        "https_proxy",
    ] {
        if let Some(value) = env::var_os(keep) {
            command.env(keep, value);
        }
    }
    command
        .current_dir(&ebpf_dir)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    let output = command
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cargo.display()))?;
    if !output.status.success() {
        return Err(format!(
            "building the eBPF programs failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let object = target_dir
        .join(TARGET)
        .join("release")
        .join("diffkeeper-ebpf");
    let embedded = out_dir.join("diffkeeper-ebpf.o");
    std::fs::copy(&object, &embedded).map_err(|e| {
        format!(
            "cannot copy {} to {}: {e}",
            object.display(),
            embedded.display()
        )
    })?;
    Ok(())
}
