//! State directories ("roots") and the paths inside them.
//!
//! A root is a directory whose contents DiffKeeper keeps, under a name that
//! is stable across restarts so its history can be replayed into a fresh
//! directory. This module owns parsing `--state-dir [NAME=]DIR` and the one
//! check every stored path must pass before it touches the file system:
//! relative, no `.`/`..`, no empty component, no NUL.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{bail, Result};

/// Entries at the top of a root that belong to DiffKeeper itself and are
/// never captured: the staging directory replay writes into.
pub const STAGING_PREFIX: &str = ".diffkeeper-staging.";

/// A state directory and the name its history is kept under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    pub name: String,
    pub path: PathBuf,
}

/// Whether `name` may name a state directory (or a daemon's target):
/// letters, digits, `.`, `_`, `-`, at most 128, not `.` or `..`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name != "."
        && name != ".."
}

/// Refuses a state directory name read from a store that could not have
/// been given on the command line (a `/`, `..`): restoring it would place
/// files outside the target.
pub fn check_name(store: &Path, name: &str) -> Result<()> {
    if !is_valid_name(name) {
        bail!(
            "store {} names a state directory {name:?}, which is not a valid name (letters, digits, '.', '_', '-'); refusing a damaged or hostile store",
            store.display()
        );
    }
    Ok(())
}

impl StateDir {
    /// Parses `NAME=DIR` or `DIR` (named after its last component). A
    /// `DIR` whose first component holds a `=` (`eq=dir/data`) could be
    /// either: it is taken as a path when that path exists and the `DIR`
    /// after the `=` does not, and refused as ambiguous when both exist.
    pub fn parse(spec: &str) -> Result<StateDir> {
        if let Some((name, dir)) = spec.split_once('=') {
            if is_valid_name(name) && !dir.is_empty() {
                let whole = Path::new(spec).symlink_metadata().is_ok();
                let named = Path::new(dir).symlink_metadata().is_ok();
                if whole && named {
                    bail!(
                        "--state-dir {spec:?} is ambiguous: both {spec:?} and {dir:?} exist; \
                         write ./{spec} for the first, or {name}={dir} with a path that does not \
                         start with a NAME= (./{dir}) for the second"
                    );
                }
                if !whole || named {
                    return Ok(StateDir {
                        name: name.to_string(),
                        path: PathBuf::from(dir),
                    });
                }
            }
        }
        let path = PathBuf::from(spec);
        if spec.is_empty() {
            bail!("--state-dir needs a directory");
        }
        let name = path
            .components()
            .next_back()
            .and_then(|c| c.as_os_str().to_str())
            .filter(|n| is_valid_name(n))
            .map(str::to_string);
        match name {
            Some(name) => Ok(StateDir { name, path }),
            None => bail!(
                "cannot name state directory {spec:?} after its last component; \
                 give it a name with NAME=DIR (NAME of letters, digits, '.', '_', '-')"
            ),
        }
    }
}

/// Parses every `--state-dir` and rejects two roots with one name.
pub fn parse_state_dirs(specs: &[String]) -> Result<Vec<StateDir>> {
    let mut dirs: Vec<StateDir> = Vec::with_capacity(specs.len());
    for spec in specs {
        let dir = StateDir::parse(spec)?;
        if let Some(other) = dirs.iter().find(|d| d.name == dir.name) {
            bail!(
                "two state directories are both named {:?} ({} and {}); name them apart with NAME=DIR",
                dir.name,
                other.path.display(),
                dir.path.display()
            );
        }
        dirs.push(dir);
    }
    if dirs.is_empty() {
        bail!("give at least one --state-dir");
    }
    check_disjoint(&dirs)?;
    Ok(dirs)
}

/// Where `path` is, with symlinks resolved as far as it exists, and the
/// missing rest joined on lexically.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return rest
                .iter()
                .rev()
                .fold(real, |acc: PathBuf, part| acc.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// Refuses roots that are one directory under two names, or one inside
/// another: each would capture the other's files, and replay would write
/// them twice, with a result that depends on the order of the arguments.
fn check_disjoint(dirs: &[StateDir]) -> Result<()> {
    let real: Vec<PathBuf> = dirs.iter().map(|d| resolved(&d.path)).collect();
    for (i, a) in dirs.iter().enumerate() {
        for (j, b) in dirs.iter().enumerate() {
            if i == j {
                continue;
            }
            if i < j && real[i] == real[j] {
                bail!(
                    "state directories {}={} and {}={} are one directory ({}); give it once",
                    a.name,
                    a.path.display(),
                    b.name,
                    b.path.display(),
                    real[i].display()
                );
            }
            if real[j] != real[i] && real[j].starts_with(&real[i]) {
                bail!(
                    "state directory {}={} is inside state directory {}={}; nested state directories are not supported: give the outer one only, or directories side by side",
                    b.name,
                    b.path.display(),
                    a.name,
                    a.path.display()
                );
            }
        }
    }
    Ok(())
}

/// Checks a stored relative path: non-empty `/`-separated components, none
/// of them `.`, `..` or empty, no NUL, not absolute.
pub fn check_relative(path: &[u8]) -> Result<()> {
    let shown = || String::from_utf8_lossy(path).into_owned();
    if path.is_empty() {
        bail!("empty path in store");
    }
    if path.contains(&0) {
        bail!("path {:?} in store contains a NUL byte", shown());
    }
    if path.starts_with(b"/") {
        bail!(
            "absolute path {:?} in store: refusing to write outside the state directory",
            shown()
        );
    }
    for part in path.split(|&b| b == b'/') {
        if part.is_empty() || part == b"." || part == b".." {
            bail!(
                "path {:?} in store has a '{}' component: refusing to write outside the state directory",
                shown(),
                String::from_utf8_lossy(part)
            );
        }
    }
    Ok(())
}

/// Checks that a symlink at `link` (relative to the root) pointing at
/// `target` resolves inside the root, judged lexically: absolute targets and
/// targets that climb above the root are refused.
pub fn check_symlink_target(link: &[u8], target: &[u8]) -> Result<()> {
    let shown = || {
        (
            String::from_utf8_lossy(link).into_owned(),
            String::from_utf8_lossy(target).into_owned(),
        )
    };
    if target.is_empty() || target.contains(&0) {
        let (l, t) = shown();
        bail!("symlink {l:?} has an invalid target {t:?}");
    }
    if target.starts_with(b"/") {
        let (l, t) = shown();
        bail!("symlink {l:?} points to absolute path {t:?}, outside the state directory");
    }
    // Depth of the directory holding the link.
    let mut depth: i64 = link.split(|&b| b == b'/').count() as i64 - 1;
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    let (l, t) = shown();
                    bail!("symlink {l:?} points to {t:?}, outside the state directory");
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// Most symlinks the kernel follows in one lookup (`MAXSYMLINKS`): a chain
/// longer than this fails with `ELOOP` there, so it reaches nothing.
const MAX_SYMLINK_HOPS: usize = 40;

/// Checks that no symlink of a tree, followed the way the kernel follows it
/// through the tree's other symlinks, climbs out of the root: `d/up -> ..`
/// and `d/x -> up/..` each stay inside when judged alone, but `d/x` reaches
/// the root's parent. `links` maps every symlink's relative path to its
/// target; components that are not symlinks in it are taken as directories.
/// Returns the first escaping link with why.
pub fn check_symlink_chains(links: &std::collections::HashMap<&[u8], &[u8]>) -> Result<()> {
    for (&link, &target) in links {
        check_symlink_chain(links, link, target)?;
    }
    Ok(())
}

/// Checks one symlink (`link` pointing at `target`) the way
/// [`check_symlink_chains`] checks each, followed through `links`.
pub fn check_symlink_chain(
    links: &std::collections::HashMap<&[u8], &[u8]>,
    link: &[u8],
    target: &[u8],
) -> Result<()> {
    let shown = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let components = |b: &'_ [u8]| -> Vec<Vec<u8>> {
        b.split(|&c| c == b'/')
            .filter(|p| !p.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    };
    // Where the lookup is: the directory holding the link.
    let mut at: Vec<Vec<u8>> = components(link);
    at.pop();
    let mut pending: std::collections::VecDeque<Vec<u8>> = components(target).into();
    let mut via: Option<Vec<u8>> = None;
    let mut hops = 0;
    let escape = |via: &Option<Vec<u8>>| {
        let through = via
            .as_ref()
            .map(|v| format!(" through symlink {:?}", shown(v)))
            .unwrap_or_default();
        crate::error::refused!(
            "symlink {:?} points to {:?}, which{through} leads outside the state directory",
            shown(link),
            shown(target)
        )
    };
    if target.starts_with(b"/") {
        return Err(escape(&None));
    }
    while let Some(part) = pending.pop_front() {
        match part.as_slice() {
            b"." => {}
            b".." => {
                if at.pop().is_none() {
                    return Err(escape(&via));
                }
            }
            _ => {
                at.push(part);
                let here = at.join(&b'/');
                if let Some(&next) = links.get(here.as_slice()) {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Ok(());
                    }
                    if next.starts_with(b"/") {
                        return Err(escape(&Some(here)));
                    }
                    at.pop();
                    for part in components(next).into_iter().rev() {
                        pending.push_front(part);
                    }
                    via = Some(here);
                }
            }
        }
    }
    Ok(())
}

/// `root/rel` as a path.
pub fn join(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_parse() {
        let d = StateDir::parse("world=/srv/game/world").expect("named");
        assert_eq!(
            (d.name.as_str(), d.path.as_path()),
            ("world", Path::new("/srv/game/world"))
        );
        let d = StateDir::parse("/var/lib/app/").expect("unnamed");
        assert_eq!(d.name, "app");
        let d = StateDir::parse("./a=b/c").expect("path with =");
        assert_eq!(
            (d.name.as_str(), d.path.as_path()),
            ("c", Path::new("./a=b/c"))
        );
        assert!(StateDir::parse("/").is_err());
        assert!(parse_state_dirs(&["x/a".into(), "y/a".into()]).is_err());
    }

    #[test]
    fn nested_roots_and_one_root_twice_are_refused() {
        let work = tempfile::tempdir().expect("tempdir");
        let a = work.path().join("a");
        std::fs::create_dir_all(a.join("inner")).expect("mkdir");
        let link = work.path().join("link-to-a");
        std::os::unix::fs::symlink(&a, &link).expect("symlink");
        let spec = |name: &str, p: &Path| format!("{name}={}", p.display());
        let err =
            parse_state_dirs(&[spec("x", &a), spec("y", &a.join("inner"))]).expect_err("nested");
        assert!(err.to_string().contains("is inside"), "{err}");
        let err = parse_state_dirs(&[spec("y", &a.join("inner")), spec("x", &a)])
            .expect_err("nested, other order");
        assert!(err.to_string().contains("is inside"), "{err}");
        let err = parse_state_dirs(&[spec("x", &a), spec("y", &link)]).expect_err("twice");
        assert!(err.to_string().contains("one directory"), "{err}");
        // Not there yet, and nested all the same.
        let err = parse_state_dirs(&[spec("x", &a), spec("y", &a.join("new/deeper"))])
            .expect_err("nested, missing");
        assert!(err.to_string().contains("is inside"), "{err}");
        // Side by side, and names sharing a prefix, are fine.
        let ab = work.path().join("ab");
        parse_state_dirs(&[spec("x", &a), spec("y", &ab)]).expect("side by side");
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            &b"../x"[..],
            b"/etc/passwd",
            b"a/../../b",
            b"a//b",
            b"",
            b"a/./b",
            b"a\0b",
        ] {
            assert!(
                check_relative(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(check_relative("dir/ünïcode file".as_bytes()).is_ok());
    }

    #[test]
    fn symlinks_must_stay_inside() {
        assert!(check_symlink_target(b"a/link", b"../b").is_ok());
        assert!(check_symlink_target(b"a/link", b"../../b").is_err());
        assert!(check_symlink_target(b"link", b"/etc/passwd").is_err());
        assert!(check_symlink_target(b"link", b"x/../../y").is_err());
        assert!(check_symlink_target(b"a/b/link", b"../c/./d").is_ok());
    }

    #[test]
    fn symlinks_are_followed_through_each_other_as_the_kernel_does() {
        let check = |links: &[(&str, &str)]| {
            let map: std::collections::HashMap<&[u8], &[u8]> = links
                .iter()
                .map(|(l, t)| (l.as_bytes(), t.as_bytes()))
                .collect();
            check_symlink_chains(&map)
        };
        // Each fine alone, climbing out together.
        let err = check(&[("d/up", ".."), ("d/x", "up/..")]).expect_err("escapes");
        assert!(format!("{err}").contains("d/x"), "{err}");
        assert!(check(&[("a/b", "../c"), ("c", "a/b/..")]).is_ok());
        // Deep chains, and one that loops (ELOOP reaches nothing).
        assert!(check(&[("l1", "l2"), ("l2", "l3"), ("l3", "sub/../..")]).is_err());
        assert!(check(&[("l1", "l2"), ("l2", "l1")]).is_ok());
        assert!(check(&[("a/l", "b"), ("a/b", "c/d"), ("a/c", ".")]).is_ok());
        assert!(check(&[("a/l", "b/../.."), ("a/b", "../..")]).is_err());
    }
}
