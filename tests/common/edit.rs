//! A seeded random editor of state trees, shared by the engine and history
//! tests: files of many sizes and names, edits in place, appends,
//! truncations, atomic saves, renames, deletes, dirs, symlinks and modes.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{read_tree, Node, Rng};

pub type Tree = BTreeMap<Vec<u8>, Node>;

pub const NAMES: [&str; 8] = [
    "data.bin",
    "notes.txt",
    "ünïcödé ファイル.txt",
    "empty",
    "save-01.dat",
    "with space",
    "a.b.c",
    "UPPER",
];

pub fn path_of(rel: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(rel))
}

pub fn shown(rel: &[u8]) -> String {
    String::from_utf8_lossy(rel).into_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Link,
}

/// Every path under `root` (relative, sorted) and its kind, without reading
/// any content.
pub fn list(root: &Path) -> Vec<(PathBuf, Kind)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(root.join(&dir))
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", root.join(&dir).display()));
        for entry in entries {
            let rel = dir.join(entry.expect("dir entry").file_name());
            let ft = fs::symlink_metadata(root.join(&rel))
                .expect("lstat")
                .file_type();
            let kind = if ft.is_symlink() {
                Kind::Link
            } else if ft.is_dir() {
                stack.push(rel.clone());
                Kind::Dir
            } else {
                Kind::File
            };
            out.push((rel, kind));
        }
    }
    out.sort();
    out
}

pub fn select(root: &Path, kind: Kind) -> Vec<PathBuf> {
    list(root)
        .into_iter()
        .filter(|(_, k)| *k == kind)
        .map(|(p, _)| p)
        .collect()
}

/// Every real directory under `root`, relative, the root itself (empty path)
/// first.
pub fn dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::new()];
    out.extend(select(root, Kind::Dir));
    out
}

pub fn files(root: &Path) -> Vec<PathBuf> {
    select(root, Kind::File)
}

pub fn links(root: &Path) -> Vec<PathBuf> {
    select(root, Kind::Link)
}

/// Longest relative path the random edits may make, so the tests' own file
/// operations stay well within PATH_MAX.
pub const MAX_REL_LEN: usize = 3000;

pub fn len_of(rel: &Path) -> usize {
    rel.as_os_str().len()
}

/// Whether a symlink at `link` (relative to the root) pointing at `target`
/// leaves the root, judged lexically. The product does not keep such links
/// (replay would refuse them); this is an independent statement of that rule.
pub fn escapes(link: &[u8], target: &[u8]) -> bool {
    if target.starts_with(b"/") {
        return true;
    }
    let mut depth = link.split(|&b| b == b'/').count() as i64 - 1;
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

/// Where following `target` from directory `at` (components below the
/// root) ends, following the tree's other symlinks (`links`) as the kernel
/// does; `None` once it climbs above the root. Components that are not
/// links count as directories; 40 hops end the lookup where it is (ELOOP).
fn follow(
    links: &std::collections::HashMap<Vec<u8>, Vec<u8>>,
    mut at: Vec<Vec<u8>>,
    target: &[u8],
    hops: &mut usize,
) -> Option<Vec<Vec<u8>>> {
    if target.starts_with(b"/") {
        return None;
    }
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                at.pop()?;
            }
            name => {
                at.push(name.to_vec());
                if let Some(next) = links.get(&at.join(&b'/')) {
                    *hops += 1;
                    if *hops > 40 {
                        return Some(at);
                    }
                    at.pop();
                    at = follow(links, at, next, hops)?;
                }
            }
        }
    }
    Some(at)
}

/// Whether the symlink at `link` in `tree`, pointing at `target`, leaves
/// the root alone or through the tree's other symlinks.
fn leaves(tree: &Tree, link: &[u8], target: &[u8]) -> bool {
    if escapes(link, target) {
        return true;
    }
    let links: std::collections::HashMap<Vec<u8>, Vec<u8>> = tree
        .iter()
        .filter_map(|(p, n)| match n {
            Node::Symlink { target } => Some((p.clone(), target.clone())),
            _ => None,
        })
        .collect();
    let mut dir: Vec<Vec<u8>> = link.split(|&b| b == b'/').map(<[u8]>::to_vec).collect();
    dir.pop();
    follow(&links, dir, target, &mut 0).is_none()
}

/// What a replay of `tree`'s capture must produce: everything but the
/// symlinks that point out of the root, alone or through each other.
pub fn kept(tree: Tree) -> Tree {
    let leaving: Vec<Vec<u8>> = tree
        .iter()
        .filter(
            |(path, node)| matches!(node, Node::Symlink { target } if leaves(&tree, path, target)),
        )
        .map(|(path, _)| path.clone())
        .collect();
    tree.into_iter()
        .filter(|(path, _)| !leaving.contains(path))
        .collect()
}

/// The state replay must produce from the live tree at `root`.
pub fn expected(root: &Path) -> Tree {
    kept(read_tree(root))
}

/// A relative symlink target, for a link in `dir`, that reaches `to`
/// (both relative to the root): up to the root, then down.
pub fn target_from(dir: &Path, to: &Path) -> PathBuf {
    let mut target = PathBuf::new();
    for _ in dir.components() {
        target.push("..");
    }
    target.push(to);
    target
}

pub fn new_file_content(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => 0,
        1..=5 => rng.below(4096) as usize,
        6..=8 => rng.below(200_000) as usize,
        _ => 600_000 + rng.below(1_500_000) as usize,
    };
    if rng.chance(50) {
        rng.text(len)
    } else {
        rng.bytes(len)
    }
}

/// A random time between 1938 and 2096, nanoseconds included.
pub fn random_time(rng: &mut Rng) -> SystemTime {
    let secs = rng.below(5_000_000_000) as i64 - 1_000_000_000;
    let nanos = rng.below(1_000_000_000);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_nanos(nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos)
    }
}

pub fn set_mtime(path: &Path, time: SystemTime) {
    fs::File::open(path)
        .and_then(|f| f.set_modified(time))
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}

/// A random tree: nested directories, empty, text and binary files, unicode
/// and non-UTF-8 names, symlinks pointing inside (to files, to directories,
/// up and across, dangling).
pub fn build_tree(root: &Path, rng: &mut Rng, files: usize) {
    fs::create_dir_all(root).expect("mkdir root");
    for dir in [
        "a",
        "a/b",
        "a/b/c",
        "a/b/c/d",
        "a/b/c/d/e/f",
        "x",
        "x/y",
        "ünï",
        "empty-dir",
    ] {
        fs::create_dir_all(root.join(dir)).expect("mkdir");
    }
    for i in 0..files {
        let dir = rng.pick(&dirs(root)).cloned().unwrap_or_default();
        let name = format!("{}-{i}", rng.pick(&NAMES).copied().unwrap_or("f"));
        fs::write(root.join(&dir).join(name), new_file_content(rng)).expect("write");
    }
    fs::write(root.join("empty"), b"").expect("write");
    for odd in [
        "new\nline",
        "colon:name",
        "back\\slash",
        "-leading-dash",
        " leading and trailing space ",
        "*?[glob]",
        ".hidden",
        "..dots",
        "tab\tname",
    ] {
        let content = new_file_content(rng);
        fs::write(root.join("x").join(odd), content).expect("write");
    }
    // A long chain of long names, and a 255-byte file name at its end.
    let mut chain = PathBuf::from("long");
    for i in 0..20 {
        chain.push(format!("{i:02}-{}", "d".repeat(97)));
    }
    fs::create_dir_all(root.join(&chain)).expect("mkdir long chain");
    fs::write(root.join(&chain).join("n".repeat(255)), b"at the end").expect("write");
    fs::write(
        root.join(OsStr::from_bytes(b"latin1-\xe9t\xe9")),
        b"not utf-8 name",
    )
    .expect("write");
    symlink("a/b/c", root.join("link-to-dir")).expect("symlink");
    symlink("../../empty", root.join("a/b/link-up")).expect("symlink");
    symlink("../x/y", root.join("a/link-across")).expect("symlink");
    symlink("does-not-exist", root.join("x/dangling")).expect("symlink");
}

/// Makes random edits of every kind the engine must follow, and remembers
/// them for failure messages.
pub struct Editor {
    pub rng: Rng,
    serial: u64,
    journal: Vec<String>,
}

impl Editor {
    pub fn new(seed: u64) -> Editor {
        Editor {
            rng: Rng::new(seed),
            serial: 0,
            journal: Vec::new(),
        }
    }

    pub fn name(&mut self, prefix: &str) -> String {
        self.serial += 1;
        format!("{prefix}-{}", self.serial)
    }

    pub fn note(&mut self, what: String) {
        self.journal.push(what);
    }

    /// The edits of the current round, for a failure message.
    pub fn recent(&self) -> String {
        self.journal.join("\n  ")
    }

    /// A non-root directory.
    pub fn some_dir(&mut self, root: &Path) -> Option<PathBuf> {
        let all: Vec<PathBuf> = dirs(root).into_iter().skip(1).collect();
        self.rng.pick(&all).cloned()
    }

    /// A symlink target for a new link in `dir`: mostly inside (to a file,
    /// a directory, a link, by bare name in the same directory, dangling);
    /// rarely outside (absolute, or climbing above the root).
    pub fn link_target(&mut self, root: &Path, dir: &Path) -> PathBuf {
        let candidates: Vec<PathBuf> = list(root).into_iter().map(|(p, _)| p).collect();
        match self.rng.below(20) {
            0 => PathBuf::from("/etc/hostname"),
            1 => {
                let mut t = target_from(dir, Path::new(""));
                t.push("..");
                t.push("outside");
                t
            }
            2 | 3 => PathBuf::from(self.name("dangling")),
            4..=6 => {
                let siblings: Vec<PathBuf> = candidates
                    .iter()
                    .filter(|p| p.parent() == Some(dir))
                    .filter_map(|p| p.file_name().map(PathBuf::from))
                    .collect();
                match self.rng.pick(&siblings) {
                    Some(name) => name.clone(),
                    None => PathBuf::from("."),
                }
            }
            _ => match self.rng.pick(&candidates) {
                Some(to) => target_from(dir, to),
                None => PathBuf::from("nothing"),
            },
        }
    }

    /// One round: `edits` random edits.
    pub fn round(&mut self, root: &Path, edits: usize) {
        self.journal.clear();
        for _ in 0..edits {
            self.edit(root);
        }
    }

    pub fn edit(&mut self, root: &Path) {
        let all_files = files(root);
        let all_dirs = dirs(root);
        // Where new entries may go without paths growing too long.
        let roomy: Vec<PathBuf> = all_dirs
            .iter()
            .filter(|d| len_of(d) + 64 <= MAX_REL_LEN)
            .cloned()
            .collect();
        let rng = &mut self.rng;
        let file = rng.pick(&all_files).cloned();
        let dir = rng.pick(&roomy).cloned().unwrap_or_default();
        match rng.below(20) {
            // overwrite in place at a random offset
            0..=2 => {
                let Some(f) = file else { return };
                let path = root.join(&f);
                let len = fs::metadata(&path).expect("stat").len();
                let at = rng.below(len.max(1));
                let patch_len = if rng.chance(20) {
                    1 + rng.below(65_536) as usize
                } else {
                    1 + rng.below(300) as usize
                };
                let patch = rng.bytes(patch_len);
                let mut handle = OpenOptions::new().write(true).open(&path).expect("open");
                handle.seek(SeekFrom::Start(at)).expect("seek");
                handle.write_all(&patch).expect("write");
                self.note(format!("overwrite {} at {at}, {patch_len} B", f.display()));
            }
            // append
            3 => {
                let Some(f) = file else { return };
                let tail_len = rng.below(5000) as usize;
                let tail = rng.text(tail_len);
                OpenOptions::new()
                    .append(true)
                    .open(root.join(&f))
                    .and_then(|mut h| h.write_all(&tail))
                    .expect("append");
                self.note(format!("append {tail_len} B to {}", f.display()));
            }
            // truncate, shorter or to zero
            4 => {
                let Some(f) = file else { return };
                let path = root.join(&f);
                let len = fs::metadata(&path).expect("stat").len();
                let to = if rng.chance(30) {
                    0
                } else {
                    rng.below(len.max(1))
                };
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|h| h.set_len(to))
                    .expect("truncate");
                self.note(format!("truncate {} to {to}", f.display()));
            }
            // delete a file or a symlink
            5 => {
                let mut victims = all_files.clone();
                victims.extend(links(root));
                let Some(v) = rng.pick(&victims).cloned() else {
                    return;
                };
                fs::remove_file(root.join(&v)).expect("rm");
                self.note(format!("rm {}", v.display()));
            }
            // rename a file, maybe across directories
            6 => {
                let Some(f) = file else { return };
                let to = dir.join(self.name("moved"));
                fs::rename(root.join(&f), root.join(&to)).expect("rename");
                self.note(format!("mv {} {}", f.display(), to.display()));
            }
            // rename a directory, maybe into another directory
            7 => {
                let Some(from) = self.some_dir(root) else {
                    return;
                };
                let longest = list(root)
                    .iter()
                    .filter(|(p, _)| p.starts_with(&from))
                    .map(|(p, _)| len_of(p))
                    .max()
                    .unwrap_or(0);
                let parents: Vec<PathBuf> = all_dirs
                    .iter()
                    .filter(|d| !d.starts_with(&from))
                    .filter(|d| longest - len_of(&from) + len_of(d) + 16 <= MAX_REL_LEN)
                    .cloned()
                    .collect();
                let parent = self.rng.pick(&parents).cloned().unwrap_or_default();
                let to = parent.join(self.name("dir"));
                fs::rename(root.join(&from), root.join(&to)).expect("rename dir");
                self.note(format!("mv {}/ {}/", from.display(), to.display()));
            }
            // chmod a file or a directory, special bits included
            8 => {
                if rng.chance(70) {
                    let Some(f) = file else { return };
                    let mode = *rng
                        .pick(&[
                            0o600, 0o644, 0o755, 0o444, 0o700, 0o640, 0o4755, 0o2750, 0o000,
                        ])
                        .expect("modes");
                    fs::set_permissions(root.join(&f), fs::Permissions::from_mode(mode))
                        .expect("chmod");
                    self.note(format!("chmod {mode:o} {}", f.display()));
                } else {
                    let mode = *rng
                        .pick(&[0o750, 0o555, 0o700, 0o711, 0o1777, 0o2775])
                        .expect("modes");
                    let Some(d) = self.some_dir(root) else { return };
                    fs::set_permissions(root.join(&d), fs::Permissions::from_mode(mode))
                        .expect("chmod dir");
                    self.note(format!("chmod {mode:o} {}/", d.display()));
                }
            }
            // mkdir -p deep, with a file at the bottom or empty
            9 => {
                let deep = dir.join(format!("{}/l2/l3/l4/l5", self.name("deep")));
                fs::create_dir_all(root.join(&deep)).expect("mkdir -p");
                if self.rng.chance(70) {
                    let text = self.rng.text(100);
                    fs::write(root.join(&deep).join("leaf.txt"), text).expect("write");
                }
                self.note(format!("mkdir -p {}", deep.display()));
            }
            // a new symlink
            10 => {
                let target = self.link_target(root, &dir);
                let link = dir.join(self.name("link"));
                symlink(&target, root.join(&link)).expect("symlink");
                self.note(format!("ln -s {} {}", target.display(), link.display()));
            }
            // a new file
            11 | 12 => {
                let content = new_file_content(rng);
                let name = NAMES[rng.below(8) as usize];
                let f = dir.join(self.name(name));
                fs::write(root.join(&f), &content).expect("write");
                self.note(format!("new {} ({} B)", f.display(), content.len()));
            }
            // delete a directory tree
            13 => {
                let Some(d) = self.some_dir(root) else { return };
                fs::remove_dir_all(root.join(&d)).expect("rm -r");
                self.note(format!("rm -r {}/", d.display()));
            }
            // a file becomes a directory
            14 => {
                let Some(f) = file else { return };
                let path = root.join(&f);
                fs::remove_file(&path).expect("rm");
                fs::create_dir(&path).expect("mkdir");
                let text = rng.text(50);
                fs::write(path.join("inside"), text).expect("write");
                self.note(format!("file {} becomes a directory", f.display()));
            }
            // a directory becomes a file
            15 => {
                let Some(d) = self.some_dir(root) else { return };
                let path = root.join(&d);
                fs::remove_dir_all(&path).expect("rm -r");
                let content = new_file_content(&mut self.rng);
                fs::write(&path, content).expect("write");
                self.note(format!("directory {} becomes a file", d.display()));
            }
            // a symlink becomes a file or a directory, or a file or a
            // directory becomes a symlink
            16 => {
                let all_links = links(root);
                let link = rng.pick(&all_links).cloned();
                match (rng.below(4), link) {
                    (0, Some(l)) => {
                        fs::remove_file(root.join(&l)).expect("rm");
                        let text = rng.text(300);
                        fs::write(root.join(&l), text).expect("write");
                        self.note(format!("symlink {} becomes a file", l.display()));
                    }
                    (1, Some(l)) => {
                        fs::remove_file(root.join(&l)).expect("rm");
                        fs::create_dir(root.join(&l)).expect("mkdir");
                        fs::write(root.join(&l).join("was-a-link"), b"x").expect("write");
                        self.note(format!("symlink {} becomes a directory", l.display()));
                    }
                    (2, _) => {
                        let Some(d) = self.some_dir(root) else { return };
                        let parent = d.parent().map(Path::to_path_buf).unwrap_or_default();
                        let target = self.link_target(root, &parent);
                        fs::remove_dir_all(root.join(&d)).expect("rm -r");
                        symlink(&target, root.join(&d)).expect("symlink");
                        self.note(format!(
                            "directory {} becomes a symlink to {}",
                            d.display(),
                            target.display()
                        ));
                    }
                    _ => {
                        let Some(f) = file else { return };
                        let parent = f.parent().map(Path::to_path_buf).unwrap_or_default();
                        let target = self.link_target(root, &parent);
                        fs::remove_file(root.join(&f)).expect("rm");
                        symlink(&target, root.join(&f)).expect("symlink");
                        self.note(format!(
                            "file {} becomes a symlink to {}",
                            f.display(),
                            target.display()
                        ));
                    }
                }
            }
            // mtime set explicitly (past, future, before 1970)
            17 => {
                let Some(f) = file else { return };
                let time = random_time(rng);
                set_mtime(&root.join(&f), time);
                self.note(format!("touch -d {time:?} {}", f.display()));
            }
            // a hard link
            18 => {
                let Some(f) = file else { return };
                let to = dir.join(self.name("hardlink"));
                fs::hard_link(root.join(&f), root.join(&to)).expect("ln");
                self.note(format!("ln {} {}", f.display(), to.display()));
            }
            // an atomic save: a small change written to a temporary file
            // renamed over the original
            _ => {
                let Some(f) = file else { return };
                let path = root.join(&f);
                let mut content = fs::read(&path).expect("read");
                if !content.is_empty() {
                    let at = rng.below(content.len() as u64) as usize;
                    content[at] ^= 0x5a;
                }
                let grow = rng.below(64) as usize;
                content.extend_from_slice(&rng.bytes(grow));
                let tmp = path.with_file_name(".save.tmp");
                fs::write(&tmp, &content).expect("write tmp");
                fs::rename(&tmp, &path).expect("rename over");
                self.note(format!("atomic save of {}", f.display()));
            }
        }
    }
}
