//! Include and exclude globs: which paths of a state directory a target
//! keeps at all.
//!
//! A path left out is invisible to the store, on both sides: a change to it
//! is not recorded, and neither is its removal, so an excluded file never
//! becomes a tombstone (what the store held of it before the pattern was
//! added stays as it was). The filter applies to the changes a batch found,
//! before any file is read, so a busy excluded file (a log, a cache) costs
//! a stat, not a read.
//!
//! Patterns are globs over the path relative to the state directory, `/`
//! between components (globset's syntax: `*`, `?`, `[a-z]`, `{a,b}`, and
//! `**` across directories). One with a `/` is anchored at the directory's
//! top (`cache/**`, `/tmp`); one without matches a name at any depth
//! (`*.tmp`, `node_modules`). A pattern that matches a directory covers
//! everything beneath it. With includes, a file is kept only if it or a
//! directory above it matches one; directories are always kept (so the
//! files included have their parents). Excludes win over includes. The
//! directory itself is always kept.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use crate::scan::{Change, EntryKind};

/// One side's patterns, compiled.
#[derive(Debug, Clone)]
struct Patterns {
    /// Patterns with a `/`: matched against the whole relative path.
    anchored: GlobSet,
    /// Patterns without: matched against each component.
    anywhere: GlobSet,
    empty: bool,
}

impl Patterns {
    fn new(patterns: &[String], key: &str) -> Result<Patterns, String> {
        let mut anchored = GlobSetBuilder::new();
        let mut anywhere = GlobSetBuilder::new();
        for pattern in patterns {
            let trimmed = pattern.trim().trim_end_matches('/');
            let (text, set) = match trimmed.strip_prefix('/') {
                Some(rest) => (rest, &mut anchored),
                None if trimmed.contains('/') => (trimmed, &mut anchored),
                None => (trimmed, &mut anywhere),
            };
            if text.is_empty() || text.split('/').any(|c| c == "..") {
                return Err(format!(
                    "{key} pattern {pattern:?}: not a pattern of paths inside the directory"
                ));
            }
            let glob: Glob = GlobBuilder::new(text)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!("{key} pattern {pattern:?}: {e}"))?;
            set.add(glob);
        }
        let build = |set: GlobSetBuilder| {
            set.build()
                .map_err(|e| format!("{key} patterns {patterns:?}: {e}"))
        };
        Ok(Patterns {
            anchored: build(anchored)?,
            anywhere: build(anywhere)?,
            empty: patterns.is_empty(),
        })
    }

    /// Whether `path` or a directory above it matches.
    fn covers(&self, path: &[u8]) -> bool {
        let mut end = 0;
        let components = path.split(|&b| b == b'/');
        for component in components {
            end += component.len();
            let prefix = &path[..end];
            if self
                .anywhere
                .is_match(Path::new(OsStr::from_bytes(component)))
                || self.anchored.is_match(Path::new(OsStr::from_bytes(prefix)))
            {
                return true;
            }
            end += 1;
        }
        false
    }
}

/// A target's include and exclude globs.
#[derive(Debug, Clone)]
pub struct PathFilter {
    include: Patterns,
    exclude: Patterns,
    /// The patterns as written, to compare and show.
    text: (Vec<String>, Vec<String>),
}

impl PartialEq for PathFilter {
    fn eq(&self, other: &PathFilter) -> bool {
        self.text == other.text
    }
}

impl PathFilter {
    /// The filter of `include` (empty: every path) and `exclude`; an error
    /// names the pattern that is no glob.
    pub fn new(include: &[String], exclude: &[String]) -> Result<PathFilter, String> {
        Ok(PathFilter {
            include: Patterns::new(include, "include")?,
            exclude: Patterns::new(exclude, "exclude")?,
            text: (include.to_vec(), exclude.to_vec()),
        })
    }

    /// The filter of these globs, or `None` when there are none (every
    /// path kept).
    pub fn of_globs(include: &[String], exclude: &[String]) -> Result<Option<PathFilter>, String> {
        if include.is_empty() && exclude.is_empty() {
            return Ok(None);
        }
        PathFilter::new(include, exclude).map(Some)
    }

    /// The include patterns, as given.
    pub fn includes(&self) -> &[String] {
        &self.text.0
    }

    /// The exclude patterns, as given.
    pub fn excludes(&self) -> &[String] {
        &self.text.1
    }

    /// Whether the path `path` (relative, `/`-separated), of kind `dir` or
    /// not, is kept.
    pub fn keeps_path(&self, path: &[u8], dir: bool) -> bool {
        if path.is_empty() {
            return true;
        }
        if self.exclude.covers(path) {
            return false;
        }
        dir || self.include.empty || self.include.covers(path)
    }

    /// Whether `change` is recorded. A removal is recorded unless the path
    /// is excluded: it was stored, so it was kept when stored.
    pub fn keeps(&self, change: &Change) -> bool {
        match change {
            Change::Write { path, entry, .. } => {
                self.keeps_path(path, entry.kind == EntryKind::Dir)
            }
            Change::Delete { path } => path.is_empty() || !self.exclude.covers(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(include: &[&str], exclude: &[&str]) -> PathFilter {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        PathFilter::new(&owned(include), &owned(exclude)).expect("patterns")
    }

    #[test]
    fn excludes_cover_a_name_anywhere_or_a_path_from_the_top() {
        let f = filter(&[], &["*.tmp", "/cache", "/logs/**/*.gz", "node_modules/"]);
        for (path, kept) in [
            ("world/region.dat", true),
            ("world/region.dat.tmp", false),
            ("a.tmp", false),
            ("cache", false),
            ("cache/x/y", false),
            ("sub/cache/x", true),
            ("logs/2026/old.gz", false),
            ("logs/new.gz", false),
            ("logs/new.txt", true),
            ("deep/node_modules/left-pad/index.js", false),
            ("", true),
        ] {
            assert_eq!(f.keeps_path(path.as_bytes(), false), kept, "{path}");
        }
    }

    #[test]
    fn includes_keep_their_files_and_every_directory_and_excludes_win() {
        let f = filter(&["*.db", "world/**"], &["world/tmp"]);
        for (path, dir, kept) in [
            ("game.db", false, true),
            ("sub/other.db", false, true),
            ("notes.txt", false, false),
            ("sub", true, true),
            ("world/r.0.mca", false, true),
            ("world/tmp/x", false, false),
            ("world/tmp", true, false),
        ] {
            assert_eq!(f.keeps_path(path.as_bytes(), dir), kept, "{path}");
        }
        assert!(f.keeps(&Change::Delete {
            path: b"notes.txt".to_vec()
        }));
        assert!(!f.keeps(&Change::Delete {
            path: b"world/tmp/x".to_vec()
        }));
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let refused = |include: &[&str], exclude: &[&str]| {
            let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            match PathFilter::new(&owned(include), &owned(exclude)) {
                Err(why) => why,
                Ok(f) => panic!("accepted {f:?}"),
            }
        };
        assert!(refused(&["a[b"], &[]).contains("include pattern \"a[b\""));
        assert!(refused(&[], &["../x"]).contains("not a pattern of paths inside"));
        assert!(refused(&[], &[" "]).contains("exclude pattern"));
    }
}
