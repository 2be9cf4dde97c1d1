//! `cargo xtask image [--out DIR] [--tag TAG] [--binary FILE]`: an OCI image
//! of `diffkeeper`, built offline with umoci (no daemon, no registry, no
//! base image to pull).
//!
//! The image is what `deploy/Dockerfile` makes with a registry at hand: one
//! layer holding `/usr/local/bin/diffkeeper` (the release binary without its
//! debug line tables, a sixth of its size) and the shared libraries `ldd`
//! lists for it, at the paths it lists them (the dynamic loader among them,
//! at the path the binary names as its interpreter), nothing else: no
//! shell, no package manager, no `/etc`. Entry point
//! `/usr/local/bin/diffkeeper`, so a pod gives only `args`.
//!
//! Steps (each a umoci command, so the layout is a plain OCI image layout
//! any tool reads: `skopeo copy oci:DIR:TAG docker://...` pushes it):
//! `umoci init` (a new layout) or reuse of an existing one, `umoci new` (an
//! empty image under TAG, replacing one of that tag), `umoci unpack` into a
//! scratch bundle, the files copied into its rootfs, `umoci repack` (one
//! layer), `umoci config` (entry point, PATH, labels), `umoci gc`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::checked;

/// Where the binary sits inside the image (the Dockerfile puts it there too).
pub const BINARY_IN_IMAGE: &str = "/usr/local/bin/diffkeeper";

/// One file put into the image's rootfs.
struct Placed {
    /// Its path inside the image.
    path: PathBuf,
    bytes: u64,
}

/// Builds the image `tag` of `binary` in the OCI layout `out` (created if
/// missing; an existing layout keeps its other tags).
pub fn build(binary: &Path, out: &Path, tag: &str) -> Result<()> {
    if !binary.is_file() {
        bail!(
            "{} is not a file: nothing to put in the image",
            binary.display()
        );
    }
    // umoci takes an image as `PATH:TAG` and splits at the last colon.
    if out.to_string_lossy().contains(':') {
        bail!(
            "the layout path {} contains ':', which umoci takes as the tag separator; choose another --out",
            out.display()
        );
    }
    for tool in ["umoci", "ldd", "objcopy"] {
        if !on_path(tool) {
            bail!("{tool} is not installed: run `cargo xtask setup`");
        }
    }
    let libraries = linked_libraries(binary)?;
    prepare_layout(out, tag)?;
    let image = format!("{}:{tag}", out.display());
    checked(umoci().args(["new", "--image", &image]))?;

    let scratch = tempfile::Builder::new()
        .prefix("diffkeeper-image-")
        .tempdir()
        .context("cannot create a scratch directory for the image's bundle")?;
    let bundle = scratch.path().join("bundle");
    let mut unpack = umoci();
    unpack.arg("unpack");
    if !crate::is_root() {
        // Files we own are recorded as root's in the layer.
        unpack.arg("--rootless");
    }
    checked(unpack.args(["--image", &image]).arg(&bundle))?;
    let rootfs = bundle.join("rootfs");

    let mut placed = Vec::new();
    let binary_dest = inside(&rootfs, Path::new(BINARY_IN_IMAGE))?;
    // The line tables (profile.release.debug) are five sixths of the
    // binary; symbols stay, so a backtrace still names its functions.
    checked(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(&binary_dest),
    )?;
    placed.push(Placed {
        path: PathBuf::from(BINARY_IN_IMAGE),
        bytes: size_of(&binary_dest)?,
    });
    for library in &libraries {
        let dest = inside(&rootfs, library)?;
        // Follows symlinks: the loader looks a library up by the name ldd
        // gave (its soname), so the file itself goes under that name.
        fs::copy(library, &dest)
            .with_context(|| format!("cannot copy {} to {}", library.display(), dest.display()))?;
        placed.push(Placed {
            path: library.clone(),
            bytes: size_of(&dest)?,
        });
    }

    open_to_all(&rootfs)?;
    checked(
        umoci()
            .args(["repack", "--image", &image])
            .args(["--history.created_by", "cargo xtask image"])
            .arg(&bundle),
    )?;
    let version = env!("CARGO_PKG_VERSION");
    checked(
        umoci()
            .args(["config", "--image", &image])
            .args(["--config.entrypoint", BINARY_IN_IMAGE])
            // Kubernetes `command: [diffkeeper, ...]` is looked up on PATH.
            .args(["--config.env", "PATH=/usr/local/bin"])
            .args(["--config.workingdir", "/"])
            .args([
                "--config.label",
                "org.opencontainers.image.title=diffkeeper",
            ])
            .args([
                "--config.label",
                &format!("org.opencontainers.image.version={version}"),
            ])
            .args([
                "--config.label",
                "org.opencontainers.image.licenses=Apache-2.0",
            ])
            .args(["--history.created_by", "cargo xtask image"]),
    )?;
    checked(umoci().args(["gc", "--layout"]).arg(out))?;

    report(out, tag, binary, &placed)
}

/// The shared libraries `ldd` lists for `binary`, the dynamic loader
/// included, as absolute paths; none for a static binary.
pub fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("cannot run ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if text.contains("not a dynamic executable") || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed ({}): {}",
            binary.display(),
            output.status,
            stderr.trim()
        );
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))
}

/// The paths in `ldd`'s output: `name => /path (0x...)` for a library, and
/// `/path (0x...)` for the loader; `linux-vdso.so.1 (0x...)` is the
/// kernel's and has no file.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, resolved)) => {
                let resolved = resolved.trim();
                if resolved.starts_with("not found") {
                    bail!("the library {} is not found", name.trim());
                }
                resolved.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// Makes `out` a layout with no image tagged `tag`: a new one when it does
/// not exist (or is an empty directory), the existing one otherwise.
fn prepare_layout(out: &Path, tag: &str) -> Result<()> {
    if out.join("oci-layout").is_file() {
        let listed = Command::new("umoci")
            .args(["ls", "--layout"])
            .arg(out)
            .output()
            .with_context(|| format!("cannot run umoci ls --layout {}", out.display()))?;
        if !listed.status.success() {
            bail!(
                "{} is not a readable OCI layout: {}",
                out.display(),
                String::from_utf8_lossy(&listed.stderr).trim()
            );
        }
        if String::from_utf8_lossy(&listed.stdout)
            .lines()
            .any(|line| line.trim() == tag)
        {
            checked(
                umoci()
                    .arg("rm")
                    .arg("--image")
                    .arg(format!("{}:{tag}", out.display())),
            )?;
        }
        return Ok(());
    }
    if out.exists() {
        let empty = fs::read_dir(out)
            .with_context(|| format!("cannot list {}", out.display()))?
            .next()
            .is_none();
        if !empty {
            bail!(
                "{} exists and is not an OCI layout (no oci-layout file in it): remove it or choose another --out",
                out.display()
            );
        }
        fs::remove_dir(out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    checked(umoci().args(["init", "--layout"]).arg(out))
}

/// Prints what went in and the image's size: its manifest, config and
/// (compressed) layer, as a registry would store them.
fn report(out: &Path, tag: &str, binary: &Path, placed: &[Placed]) -> Result<()> {
    let (manifest_bytes, manifest) = manifest_of(out, tag)?;
    let mut image_bytes = manifest_bytes;
    let mut layer_bytes = 0;
    for (blob, is_layer) in std::iter::once((&manifest["config"], false)).chain(
        manifest["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| (l, true)),
    ) {
        let size = blob["size"]
            .as_u64()
            .with_context(|| format!("a blob without a size in the manifest of {tag}"))?;
        image_bytes += size;
        if is_layer {
            layer_bytes += size;
        }
    }
    let rootfs_bytes: u64 = placed.iter().map(|p| p.bytes).sum();
    println!("image: {}:{tag} (OCI layout)", out.display());
    for file in placed {
        println!("  {:<44} {:>10}", file.path.display(), mib(file.bytes));
    }
    println!(
        "  the binary is {} without its debug line tables ({})",
        binary.display(),
        mib(size_of(binary)?)
    );
    println!(
        "image size: {} (compressed layer {}, config and manifest); rootfs {} in {} files",
        mib(image_bytes),
        mib(layer_bytes),
        mib(rootfs_bytes),
        placed.len()
    );
    println!(
        "push it: skopeo copy oci:{}:{tag} docker://REGISTRY/diffkeeper:{tag}",
        out.display()
    );
    Ok(())
}

/// The manifest tagged `tag` in the layout `out`: its size and content.
fn manifest_of(out: &Path, tag: &str) -> Result<(u64, Value)> {
    let index_path = out.join("index.json");
    let index = read_json(&index_path)?;
    let digest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .and_then(|m| m["digest"].as_str())
        .with_context(|| format!("{} has no manifest tagged {tag}", index_path.display()))?;
    let path = blob_path(out, digest)?;
    Ok((size_of(&path)?, read_json(&path)?))
}

/// `blobs/ALGORITHM/HEX` for a digest `ALGORITHM:HEX`.
fn blob_path(out: &Path, digest: &str) -> Result<PathBuf> {
    let (algorithm, hex) = digest
        .split_once(':')
        .with_context(|| format!("malformed digest {digest:?} in {}", out.display()))?;
    Ok(out.join("blobs").join(algorithm).join(hex))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// `path` (absolute, inside the image) under `rootfs`, its parent created.
fn inside(rootfs: &Path, path: &Path) -> Result<PathBuf> {
    let relative = path
        .strip_prefix("/")
        .with_context(|| format!("{} is not an absolute path", path.display()))?;
    let dest = rootfs.join(relative);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    Ok(dest)
}

/// Directories 0755, files readable by all (the binary and the loader
/// executable too), whatever this process's umask made them: a pod may
/// run the image as any user.
fn open_to_all(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let set = |path: &Path, mode: u32| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot chmod {}", path.display()))
    };
    set(dir, 0o755)?;
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        let meta = fs::symlink_metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if meta.is_dir() {
            open_to_all(&path)?;
        } else {
            let mode = meta.permissions().mode() & 0o7777;
            let readable = if mode & 0o111 != 0 { 0o555 } else { 0o444 };
            set(&path, mode | readable)?;
        }
    }
    Ok(())
}

fn size_of(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len())
}

fn mib(bytes: u64) -> String {
    if bytes < 1024 * 1024 {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

fn umoci() -> Command {
    Command::new("umoci")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f6e)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f6f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f70)\n";
        let paths = parse_ldd(text).expect("parses");
        assert_eq!(
            paths,
            [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let missing = parse_ldd("\tlibfoo.so.1 => not found\n").expect_err("refused");
        assert!(format!("{missing:#}").contains("libfoo.so.1"));
        assert!(parse_ldd("\tstatically linked\n")
            .expect("parses")
            .is_empty());
    }
}
