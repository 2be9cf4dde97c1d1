//! Which container wrote: the tracer's events carry the writer's cgroup v2
//! id, which is found back as a directory of the cgroup2 hierarchy (the id
//! is that directory's inode number), whose name says the container the
//! way each runtime's systemd driver names it:
//!
//! | runtime | cgroup directory |
//! |---|---|
//! | containerd (CRI) | `cri-containerd-<id>.scope` |
//! | CRI-O | `crio-<id>.scope` (its `crio-conmon-<id>.scope` is the monitor, not the container) |
//! | Docker | `docker-<id>.scope` |
//! | Podman | `libpod-<id>.scope` (`libpod-conmon-<id>.scope` likewise) |
//!
//! and, with the cgroupfs driver, a directory named by the id alone (64 hex
//! digits) under `kubepods`, `docker` or `libpod_parent`. Kubernetes pods
//! are named by the `pod<uid>` directory above (`kubepods-...-pod<uid>.slice`
//! with systemd, underscores for dashes).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A container as its cgroup names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// `containerd`, `cri-o`, `docker`, `podman`, or `cgroupfs` when only
    /// the id says it (the cgroupfs driver).
    pub runtime: &'static str,
    /// The container id, as the runtime shows it.
    pub id: String,
    /// The Kubernetes pod's uid, when the path holds one.
    pub pod_uid: Option<String>,
}

impl std::fmt::Display for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} container {}", self.runtime, self.id)?;
        if let Some(uid) = &self.pod_uid {
            write!(f, " of pod {uid}")?;
        }
        Ok(())
    }
}

/// Runtimes' systemd scope prefixes. Conmon's scopes (`crio-conmon-`,
/// `libpod-conmon-`) fail the id check (their id is after another dash).
const SCOPES: [(&str, &str); 4] = [
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
    ("docker-", "docker"),
    ("libpod-", "podman"),
];

fn is_id(text: &str) -> bool {
    (12..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container a cgroup path names, innermost first; `None` for a cgroup
/// no runtime made (a service, a user session, the test's own).
pub fn of_cgroup(path: &Path) -> Option<Container> {
    let components: Vec<&str> = path.iter().filter_map(|c| c.to_str()).collect();
    let pod_uid = pod_of_cgroup(path);
    for (at, component) in components.iter().enumerate().rev() {
        if let Some(scope) = component.strip_suffix(".scope") {
            for (prefix, runtime) in SCOPES {
                if let Some(id) = scope.strip_prefix(prefix).filter(|id| is_id(id)) {
                    return Some(Container {
                        runtime,
                        id: id.to_string(),
                        pod_uid,
                    });
                }
            }
        }
        let under_runtime = components[..at]
            .iter()
            .any(|c| c.starts_with("kubepods") || *c == "docker" || *c == "libpod_parent");
        if component.len() == 64 && is_id(component) && under_runtime {
            return Some(Container {
                runtime: "cgroupfs",
                id: component.to_string(),
                pod_uid,
            });
        }
    }
    None
}

/// The uid of the Kubernetes pod whose cgroup `path` is in, if any (its
/// `pod<uid>` directory, with either driver).
pub fn pod_of_cgroup(path: &Path) -> Option<String> {
    path.iter()
        .filter_map(|c| c.to_str())
        .rev()
        .find_map(pod_uid)
}

/// A pod's uid from `pod<uid>` or `kubepods-besteffort-pod<uid>.slice`.
fn pod_uid(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let (_, uid) = name.rsplit_once("pod")?;
    let uid = uid.replace('_', "-");
    let hex = uid.bytes().filter(|b| b.is_ascii_hexdigit()).count();
    (uid.len() == 36 && hex == 32 && uid.bytes().filter(|&b| b == b'-').count() == 4).then_some(uid)
}

/// Cgroup directories by id (their inode number in the cgroup2 file
/// system), found by walking the hierarchy when an id is new, remembered
/// after.
#[derive(Default)]
pub struct CgroupNames {
    known: HashMap<u64, PathBuf>,
}

/// Most directories a walk looks at: a node with more cgroups than this
/// has its writers named by their process instead.
const MAX_WALK: usize = 100_000;

impl CgroupNames {
    /// The cgroup v2 directory whose id is `id`, under `hierarchy`.
    pub fn path(&mut self, hierarchy: &Path, id: u64) -> Option<PathBuf> {
        if let Some(path) = self.known.get(&id) {
            if path.exists() {
                return Some(path.clone());
            }
        }
        // A new id (or a cgroup removed and its id reused): walk again,
        // learning every directory on the way.
        self.known.clear();
        let mut stack = vec![hierarchy.to_path_buf()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_WALK {
                break;
            }
            let Ok(meta) = std::fs::symlink_metadata(&dir) else {
                continue;
            };
            self.known.insert(meta.ino(), dir.clone());
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        self.known.get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f2d6a9b1c3e5f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";

    #[test]
    fn each_runtime_is_named_by_its_cgroup() {
        let pod = "kubepods-burstable-pod1a2b3c4d_5e6f_4a1b_8c9d_0e1f2a3b4c5d.slice";
        let cases = [
            (format!("/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/{pod}/cri-containerd-{ID}.scope"), "containerd", true),
            (format!("/sys/fs/cgroup/kubepods.slice/{pod}/crio-{ID}.scope"), "cri-o", true),
            (format!("/sys/fs/cgroup/system.slice/docker-{ID}.scope"), "docker", false),
            (format!("/sys/fs/cgroup/machine.slice/libpod-{ID}.scope/container"), "podman", false),
            (format!("/sys/fs/cgroup/kubepods/burstable/pod1a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c5d/{ID}"), "cgroupfs", true),
        ];
        for (path, runtime, in_pod) in cases {
            let container = of_cgroup(Path::new(&path)).unwrap_or_else(|| panic!("{path}"));
            assert_eq!(container.runtime, runtime, "{path}");
            assert_eq!(container.id, ID, "{path}");
            assert_eq!(
                container.pod_uid.as_deref(),
                in_pod.then_some("1a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c5d"),
                "{path}"
            );
        }
    }

    #[test]
    fn monitors_and_services_are_no_container() {
        for path in [
            format!("/sys/fs/cgroup/machine.slice/libpod-conmon-{ID}.scope"),
            format!("/sys/fs/cgroup/kubepods.slice/crio-conmon-{ID}.scope"),
            "/sys/fs/cgroup/system.slice/sshd.service".to_string(),
            "/sys/fs/cgroup/user.slice/user-0.slice/session-3.scope".to_string(),
            format!("/sys/fs/cgroup/somewhere/{ID}"),
            "/sys/fs/cgroup/system.slice/docker-notanid.scope".to_string(),
        ] {
            assert_eq!(of_cgroup(Path::new(&path)), None, "{path}");
        }
    }

    #[test]
    fn a_cgroup_is_found_by_its_id() {
        let Ok(hierarchy) = crate::freeze::hierarchy() else {
            panic!("this machine has a cgroup2 hierarchy");
        };
        let own = crate::freeze::own_cgroup(&hierarchy).expect("own cgroup");
        let id = std::fs::metadata(&own).expect("stat own cgroup").ino();
        let mut names = CgroupNames::default();
        assert_eq!(names.path(&hierarchy, id), Some(own.clone()));
        assert_eq!(names.path(&hierarchy, id), Some(own), "remembered");
        assert_eq!(names.path(&hierarchy, u64::MAX), None);
    }
}
