//! Freezing the app's writers for the moment a batch's cut is read.
//!
//! A batch is a consistent cut only if the tree stands still while its
//! changes are found and read. Waiting for a quiet moment fails an app that
//! never stops writing (a git commit loop, a database under load), so the
//! capture loop can stop the writers instead: cgroup v2's `cgroup.freeze`
//! stops every task of a cgroup at its next return to user space (a
//! syscall in progress completes first), whatever the task runs, and needs
//! no controller. That makes it work on the pure v2 layout of current nodes
//! (`/sys/fs/cgroup`) and on the hybrid one (cgroup2 beside the v1
//! controllers, usually at `/sys/fs/cgroup/unified`) alike; the hierarchy is
//! found in `/proc/self/mountinfo`, not assumed. The v1 freezer is not used:
//! it is a controller that a hybrid host's runtime may already own.
//!
//! What is frozen is named, never guessed: the cgroup `run` starts the app
//! in ([`AppCgroup`]: every process the app forks stays in it), the cgroups
//! of the processes the eBPF tracer saw writing the trees (`watch`), and
//! cgroups given with `--freeze-cgroup`. A cgroup that holds DiffKeeper
//! itself (its own, or an ancestor of it) and the root cgroup are refused.
//!
//! A freeze is always undone: [`Frozen`] thaws when dropped (every error
//! path, a panic's unwinding), and a watchdog process ([`watchdog`]) that
//! is told of each freeze before it happens thaws whatever is still frozen
//! the moment DiffKeeper dies, even by SIGKILL.
//!
//! Measured here (2-core VM, 6.18): freezing a cgroup of one busy process
//! and seeing `frozen 1` in `cgroup.events` takes 50-300 µs; thawing is one
//! write.

pub mod watchdog;

use std::fs;
use std::io::{Read, Seek};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What can go wrong freezing, named with the cgroup and the cause.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error(
        "no cgroup v2 hierarchy is mounted (no cgroup2 file system in /proc/self/mountinfo); \
         freezing needs one: `mount -t cgroup2 none /sys/fs/cgroup/unified` on a hybrid host"
    )]
    NoHierarchy,
    #[error("{0} has no cgroup v2 line (`0::`): the process is in no cgroup v2")]
    NoV2Line(PathBuf),
    #[error("{path} is not a cgroup v2 directory that can be frozen (no cgroup.freeze: the root cgroup, or not under {mount})")]
    NotFreezable { path: PathBuf, mount: PathBuf },
    #[error(
        "refusing to freeze cgroup {0}: DiffKeeper itself runs in it, and would stop with the app"
    )]
    HoldsSelf(PathBuf),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path} did not freeze within {waited:?} (a task in uninterruptible sleep, such as I/O on a hung network file system, delays it); thawed again")]
    Timeout { path: PathBuf, waited: Duration },
    #[error("the thaw watchdog is not running ({0}); not freezing without it")]
    Watchdog(String),
}

type Result<T> = std::result::Result<T, FreezeError>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FreezeError + 'a {
    move |source| FreezeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`
/// (the first cgroup2 mount; in a container's cgroup namespace its root is
/// the container's cgroup).
pub fn hierarchy() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("read", Path::new("/proc/self/mountinfo")))?;
    mount_point(&info).ok_or(FreezeError::NoHierarchy)
}

/// The mount point of the first cgroup2 line of a mountinfo text.
fn mount_point(mountinfo: &str) -> Option<PathBuf> {
    diffkeeper_common::mountinfo::parse(mountinfo)
        .into_iter()
        .find(|mount| mount.fstype == "cgroup2")
        .map(|mount| mount.point)
}

/// The cgroup v2 directory this process runs in.
pub fn own_cgroup(mount: &Path) -> Result<PathBuf> {
    cgroup_of("self", mount)
}

/// The cgroup v2 directory process `pid` (or `self`) runs in, under the
/// hierarchy mounted at `mount`.
fn cgroup_of(pid: &str, mount: &Path) -> Result<PathBuf> {
    let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&file).map_err(io("read", &file))?;
    let rel = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| FreezeError::NoV2Line(file.clone()))?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// The cgroup v2 directory of process `pid` (a writer the tracer saw).
pub fn cgroup_of_process(pid: u32) -> Result<PathBuf> {
    cgroup_of(&pid.to_string(), &hierarchy()?)
}

/// A cgroup that may be frozen.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Checks that `path` is a freezable cgroup v2 directory that does not
    /// hold DiffKeeper itself.
    pub fn open(path: &Path) -> Result<Cgroup> {
        let mount = hierarchy()?;
        let path = fs::canonicalize(path).map_err(io("open cgroup", path))?;
        // The watchdog's protocol is one path a line.
        if path.as_os_str().as_encoded_bytes().contains(&b'\n')
            || !path.starts_with(&mount)
            || !path.join("cgroup.freeze").exists()
        {
            return Err(FreezeError::NotFreezable { path, mount });
        }
        let own = own_cgroup(&mount)?;
        if own.starts_with(&path) {
            return Err(FreezeError::HoldsSelf(path));
        }
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn set_frozen(&self, frozen: bool) -> Result<()> {
        let file = self.path.join("cgroup.freeze");
        fs::write(&file, if frozen { "1" } else { "0" }).map_err(io("write", &file))
    }

    /// Waits until `cgroup.events` says `frozen 1`, sleeping on the file
    /// (the kernel wakes pollers of it on every change).
    fn wait_frozen(&self, deadline: Instant) -> Result<()> {
        let path = self.path.join("cgroup.events");
        let mut file = fs::File::open(&path).map_err(io("open", &path))?;
        let mut text = String::new();
        loop {
            text.clear();
            file.rewind().map_err(io("read", &path))?;
            file.read_to_string(&mut text).map_err(io("read", &path))?;
            if text.lines().any(|l| l.trim() == "frozen 1") {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FreezeError::Timeout {
                    path: self.path.clone(),
                    waited: Duration::ZERO,
                });
            }
            let left = (deadline - now).min(Duration::from_millis(10));
            let timeout = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: left.as_nanos() as i64,
            };
            let mut fds = [rustix::event::PollFd::new(
                &file,
                rustix::event::PollFlags::PRI | rustix::event::PollFlags::ERR,
            )];
            // An interrupted or timed-out poll just reads the file again.
            let _ = rustix::event::poll(&mut fds, Some(&timeout));
        }
    }
}

/// The cgroups a capture loop freezes, with the watchdog that thaws them
/// if DiffKeeper dies mid-freeze. Cgroups can be added while it is used
/// (`watch` learns of its writers as they write); one whose directory is
/// gone (its container ended) is dropped.
pub struct FreezeSet {
    cgroups: Mutex<Vec<Cgroup>>,
    watchdog: Mutex<Option<watchdog::Watchdog>>,
}

impl std::fmt::Debug for FreezeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl FreezeSet {
    /// A set over `cgroups`, starting its watchdog.
    pub fn new(cgroups: Vec<Cgroup>) -> Result<FreezeSet> {
        let dog = watchdog::Watchdog::spawn()?;
        Ok(FreezeSet {
            cgroups: Mutex::new(cgroups),
            watchdog: Mutex::new(Some(dog)),
        })
    }

    /// Adds `cgroup`; false when it is in the set already.
    pub fn add(&self, cgroup: Cgroup) -> bool {
        let Ok(mut cgroups) = self.cgroups.lock() else {
            return false;
        };
        if cgroups.iter().any(|c| c.path == cgroup.path) {
            return false;
        }
        cgroups.push(cgroup);
        true
    }

    /// The watchdog's process id, so `run` does not end it as a leftover.
    pub fn watchdog_pid(&self) -> Option<u32> {
        self.watchdog.lock().ok()?.as_ref().map(|w| w.pid())
    }

    /// The cgroups' paths, for messages.
    pub fn describe(&self) -> String {
        self.cgroups
            .lock()
            .map(|cgroups| {
                cgroups
                    .iter()
                    .map(|c| c.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    }

    /// Freezes every cgroup of the set and waits until each is frozen, at
    /// most `wait`. The watchdog learns of each freeze first, so it thaws
    /// them should this process die from here on.
    pub fn freeze(&self, wait: Duration) -> Result<Frozen<'_>> {
        let started = Instant::now();
        let cgroups: Vec<Cgroup> = {
            let mut all = self
                .cgroups
                .lock()
                .map_err(|_| FreezeError::Watchdog("the cgroup list's lock is poisoned".into()))?;
            all.retain(|c| {
                let there = c.path.join("cgroup.freeze").exists();
                if !there {
                    tracing::info!("cgroup {} is gone; no longer frozen", c.path.display());
                }
                there
            });
            all.clone()
        };
        {
            let mut slot = self
                .watchdog
                .lock()
                .map_err(|_| FreezeError::Watchdog("its lock is poisoned".into()))?;
            let alive = slot
                .as_mut()
                .map(|dog| dog.announce(&cgroups, true))
                .transpose();
            match alive {
                Ok(Some(())) => {}
                // It died (killed by someone): a new one, once.
                Ok(None) | Err(_) => {
                    let mut dog = watchdog::Watchdog::spawn()?;
                    dog.announce(&cgroups, true)?;
                    *slot = Some(dog);
                }
            }
        }
        let frozen = Frozen {
            set: self,
            cgroups,
            since: started,
        };
        let deadline = started + wait;
        for cgroup in &frozen.cgroups {
            cgroup.set_frozen(true)?;
        }
        for cgroup in &frozen.cgroups {
            cgroup.wait_frozen(deadline).map_err(|e| match e {
                FreezeError::Timeout { path, .. } => FreezeError::Timeout { path, waited: wait },
                other => other,
            })?;
        }
        Ok(frozen)
    }

    fn thaw(&self, cgroups: &[Cgroup]) {
        for cgroup in cgroups {
            if let Err(e) = cgroup.set_frozen(false) {
                tracing::error!("{e}; the watchdog will try again");
            }
        }
        if let Ok(mut slot) = self.watchdog.lock() {
            if let Some(dog) = slot.as_mut() {
                let _ = dog.announce(cgroups, false);
            }
        }
    }
}

/// Frozen cgroups; dropping it thaws them.
pub struct Frozen<'a> {
    set: &'a FreezeSet,
    cgroups: Vec<Cgroup>,
    since: Instant,
}

impl Frozen<'_> {
    /// How long the writers have been stopped so far (from the first write
    /// to `cgroup.freeze`).
    pub fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }

    /// Thaws now; returns how long the writers were stopped.
    pub fn thaw(self) -> Duration {
        let paused = self.since.elapsed();
        drop(self);
        paused
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.set.thaw(&self.cgroups);
    }
}

/// A cgroup of its own for the app `run` starts, under DiffKeeper's own
/// cgroup: every process the app forks stays in it, so freezing it stops
/// exactly the app. Removed when dropped (once empty).
pub struct AppCgroup {
    cgroup: Cgroup,
    procs: OwnedFd,
}

/// Prefix of the cgroups `run` makes; the rest is its process id.
const APP_PREFIX: &str = "diffkeeper-app-";

impl AppCgroup {
    /// Makes `diffkeeper-app-<pid>` under this process's cgroup,
    /// first removing empty ones left by `run`s that were killed.
    pub fn create() -> Result<AppCgroup> {
        let mount = hierarchy()?;
        let own = own_cgroup(&mount)?;
        sweep_stale(&own);
        let path = own.join(format!("{APP_PREFIX}{}", std::process::id()));
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("create cgroup", &path)(e)),
        }
        if !path.join("cgroup.freeze").exists() {
            let _ = fs::remove_dir(&path);
            return Err(FreezeError::NotFreezable { path, mount });
        }
        let procs_path = path.join("cgroup.procs");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(io("open", &procs_path))?
            .into();
        Ok(AppCgroup {
            cgroup: Cgroup { path },
            procs,
        })
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// A function that moves the calling process into the cgroup, for a
    /// child between fork and exec (`CommandExt::pre_exec`): one write(2)
    /// on a descriptor opened beforehand, no allocation. It must not be
    /// called once `self` is dropped.
    pub fn enter_fn(&self) -> impl Fn() -> std::io::Result<()> + Send + Sync + 'static {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.procs);
        move || {
            // SAFETY: `fd` is `self.procs`, open for as long as the
            // AppCgroup lives, which outlives the spawn that calls this.
            let procs = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            rustix::io::write(procs, b"0")
                .map(|_| ())
                .map_err(std::io::Error::from)
        }
    }
}

impl Drop for AppCgroup {
    fn drop(&mut self) {
        // Never leave it frozen, then remove it; it may still hold
        // processes that outlived `run`'s leftover handling.
        let _ = self.cgroup.set_frozen(false);
        if let Err(e) = fs::remove_dir(&self.cgroup.path) {
            tracing::debug!("cannot remove cgroup {}: {e}", self.cgroup.path.display());
        }
    }
}

/// Removes the empty `diffkeeper-app-<pid>` cgroups under `own` whose `run`
/// is gone (killed before it could remove them).
fn sweep_stale(own: &Path) {
    let Ok(entries) = fs::read_dir(own) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(APP_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Thawed first: a frozen, populated cgroup cannot be removed and
        // its processes would stay stopped for good.
        let _ = fs::write(entry.path().join("cgroup.freeze"), "0");
        let _ = fs::remove_dir(entry.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_among_v1_mounts() {
        let info = "\
31 25 0:27 / /sys/fs/cgroup/freezer rw,relatime shared:9 - cgroup cgroup rw,freezer
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            mount_point(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(mount_point(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            mount_point("30 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
        assert_eq!(
            mount_point("41 31 0:38 / /mnt/with\\040space rw - cgroup2 none rw\n"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }
}
