//! `/proc/self/mountinfo`, parsed: where each file system is mounted, its
//! type and its options. The freezer finds the cgroup v2 hierarchy here,
//! and the tracer an overlayfs mount's upper directory.

use std::path::PathBuf;
use std::string::{String, ToString};
use std::vec::Vec;

/// One mount, as this process's mount namespace sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub point: PathBuf,
    /// The file system type (`ext4`, `cgroup2`, `overlay`...).
    pub fstype: String,
    /// The per-superblock options, comma-separated (`upperdir=...`).
    pub super_options: String,
}

impl Mount {
    /// The value of option `name` among the superblock options.
    pub fn option(&self, name: &str) -> Option<String> {
        self.super_options.split(',').find_map(|option| {
            let (key, value) = option.split_once('=')?;
            (key == name).then(|| unescape_octal(value))
        })
    }
}

/// The mounts of a mountinfo text, in its order (later mounts over
/// earlier ones).
pub fn parse(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let point = before.split_ascii_whitespace().nth(4)?;
            let mut after = after.split_ascii_whitespace();
            let fstype = after.next()?.to_string();
            let super_options = after.nth(1).unwrap_or_default().to_string();
            Some(Mount {
                point: PathBuf::from(unescape_octal(point)),
                fstype,
                super_options,
            })
        })
        .collect()
}

/// This process's mounts.
pub fn read() -> std::io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Some(value) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
            {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_types_and_options_are_read_and_unescaped() {
        let text = "41 31 0:38 / /mnt/with\\040space rw - cgroup2 none rw\n\
                    90 29 0:52 / /merged rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u\\040p,workdir=/w\n";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].point, PathBuf::from("/mnt/with space"));
        assert_eq!(mounts[0].fstype, "cgroup2");
        assert_eq!(mounts[1].fstype, "overlay");
        assert_eq!(mounts[1].option("upperdir").as_deref(), Some("/u p"));
        assert_eq!(mounts[1].option("lowerdir").as_deref(), Some("/l"));
        assert_eq!(mounts[1].option("nothing"), None);
    }
}
