//! Real OCI containers for the tests, run by the real `crun`: a root file
//! system made of the host's own programs and the libraries they load, a
//! bundle per container, and a cgroup v2 directory per container named as
//! containerd's systemd driver names it (`cri-containerd-<id>.scope`), so
//! the daemon sees what it would see on a Kubernetes node.
//!
//! Everything made here is undone when dropped, a failing test included:
//! the container is killed and deleted, its cgroup thawed, emptied and
//! removed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{s, Reaped};

/// The crun binary the tests run (Debian's package).
pub const CRUN: &str = "crun";

/// Fails the test unless crun runs: a missing runtime is a broken setup,
/// not a reason to skip.
pub fn require_crun() {
    let out = Command::new(CRUN).arg("--version").output();
    assert!(
        out.as_ref().is_ok_and(|o| o.status.success()),
        "{CRUN} is needed (Debian's package: apt-get install crun): {out:?}"
    );
}

/// A root file system holding the given programs and what they link.
pub struct Rootfs(pub PathBuf);

impl Rootfs {
    /// Builds one at `at` with each `(inside, host)` program copied from
    /// the host path to the path inside, the shared libraries `ldd` lists
    /// for it and the dynamic loader at the paths the host has them (the
    /// loader looks for them there), and empty mount points for `/proc`,
    /// `/dev` and every name in `mount_points`.
    pub fn build(at: &Path, programs: &[(&str, &Path)], mount_points: &[&str]) -> Rootfs {
        for (inside, host) in programs {
            copy_into(at, inside, host);
            for library in linked_libraries(host) {
                copy_into(at, s(&library), &library);
            }
        }
        for dir in ["proc", "dev"].iter().chain(mount_points) {
            fs::create_dir_all(at.join(dir.trim_start_matches('/'))).expect("mount point");
        }
        Rootfs(at.to_path_buf())
    }
}

/// The absolute path of program `name`, found on the host's PATH.
pub fn host_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} is not on the PATH"))
}

/// Copies `host` (a symlink is followed) to `inside` under `root`,
/// executable as it was; a file already there is kept (libraries repeat).
fn copy_into(root: &Path, inside: &str, host: &Path) {
    let to = root.join(inside.trim_start_matches('/'));
    if to.exists() {
        return;
    }
    fs::create_dir_all(to.parent().expect("a file has a parent")).expect("mkdir in the rootfs");
    fs::copy(host, &to).unwrap_or_else(|e| panic!("copy {} into the rootfs: {e}", host.display()));
}

/// The files `ldd` names for `program`: each `=> /path` and the loader's
/// own absolute path; nothing for a static program.
fn linked_libraries(program: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(program).output().expect("run ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, after)) => after.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a pure v2
/// host, `/sys/fs/cgroup/unified` on a hybrid one), from mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            after
                .starts_with("cgroup2 ")
                .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("a cgroup2 mount")
}

/// A container id as containerd makes them: 64 hex digits, here from the
/// time, the process and `seed`, so runs and containers never share one.
pub fn container_id(seed: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = super::Rng::new(nanos ^ (u64::from(std::process::id()) << 32) ^ seed);
    (0..4).map(|_| format!("{:016x}", rng.next())).collect()
}

/// A container's cgroup: `cri-containerd-<id>.scope` at the top of the
/// cgroup v2 hierarchy.
pub struct Scope(pub PathBuf);

impl Scope {
    pub fn new(id: &str) -> Scope {
        let path = cgroup2_mount().join(format!("cri-containerd-{id}.scope"));
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create the cgroup {}: {e}", path.display()));
        Scope(path)
    }

    /// Whether the kernel reports it frozen (`frozen 1` in cgroup.events);
    /// an empty cgroup left with `cgroup.freeze` set says so too.
    pub fn frozen(&self) -> bool {
        fs::read_to_string(self.0.join("cgroup.events"))
            .map(|e| e.lines().any(|l| l == "frozen 1"))
            .unwrap_or(false)
    }

    pub fn events(&self) -> String {
        fs::read_to_string(self.0.join("cgroup.events")).unwrap_or_default()
    }

    /// Whether any process is still in it.
    pub fn populated(&self) -> bool {
        self.events().lines().any(|l| l == "populated 1")
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        // Thawed first: a frozen cgroup's processes die on SIGKILL anyway,
        // but a cgroup left frozen would stop whoever moves into it later.
        let _ = fs::write(self.0.join("cgroup.freeze"), "0");
        let _ = fs::write(self.0.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What runs in a container.
pub struct Spec<'a> {
    /// The process, `args[0]` a path inside the rootfs.
    pub args: Vec<String>,
    /// `NAME=VALUE` each.
    pub env: Vec<String>,
    /// Host directories bind-mounted into it: `(host, inside, read_only)`.
    pub binds: Vec<(&'a Path, &'a str, bool)>,
}

/// A container run in the foreground by `crun run` (so the test holds crun
/// as its child and sees it end), in its own cgroup.
pub struct Container {
    pub id: String,
    pub scope: Scope,
    /// crun's state directory (`crun --root`), the test's own, so other
    /// tests and the host's containers are never touched.
    state: PathBuf,
    /// The container's stdout and stderr.
    pub log: PathBuf,
    crun: Option<Reaped>,
}

impl Container {
    /// Writes a bundle under `work/bundle-<name>` and starts the container
    /// there on `rootfs` (shared, read-only), its processes in a new
    /// `cri-containerd-<id>.scope`.
    pub fn start(work: &Path, rootfs: &Rootfs, name: &str, id: &str, spec: &Spec) -> Container {
        let bundle = work.join(format!("bundle-{name}"));
        fs::create_dir_all(&bundle).expect("bundle dir");
        let mut mounts = vec![
            serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            serde_json::json!({
                "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=1m"]
            }),
        ];
        for (host, inside, read_only) in &spec.binds {
            let mode = if *read_only { "ro" } else { "rw" };
            mounts.push(serde_json::json!({
                "destination": inside, "type": "bind", "source": s(host),
                "options": ["rbind", mode]
            }));
        }
        // Its own pid, mount, IPC and UTS namespaces, as a pod's container
        // has; the network one is left out (nothing here talks).
        let config = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": spec.args,
                "env": spec.env,
                "cwd": "/"
            },
            "root": {"path": s(&rootfs.0), "readonly": true},
            "hostname": name,
            "mounts": mounts,
            "linux": {
                "namespaces": [
                    {"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}
                ]
            }
        });
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config).expect("config.json"),
        )
        .expect("write config.json");
        let state = work.join("crun-state");
        fs::create_dir_all(&state).expect("crun state dir");
        let scope = Scope::new(id);
        let log = work.join(format!("container-{name}.log"));
        let out = fs::File::create(&log).expect("container log");
        let err = out.try_clone().expect("container log");
        // The shell moves itself into the scope, so crun and the container
        // inherit it: `--cgroup-manager=disabled` keeps crun from placing
        // the container anywhere else. It runs in a mount namespace of its
        // own where a tmpfs hides the cgroup2 mount: crun 1.8 refuses to
        // start on a hybrid layout whose cgroup2 has a controller, even
        // when told to leave cgroups alone. Neither changes what the
        // kernel records: the container's processes are in the scope.
        let script = format!(
            "echo $$ > {procs} && mount -t tmpfs dk-test-hide-hybrid {mount} && \
             exec {CRUN} --root {state} --cgroup-manager=disabled run --bundle {bundle} {id}",
            procs = s(&scope.0.join("cgroup.procs")),
            mount = s(&cgroup2_mount()),
            state = s(&state),
            bundle = s(&bundle),
        );
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start crun");
        Container {
            id: id.to_string(),
            scope,
            state,
            log,
            crun: Some(Reaped(child)),
        }
    }

    /// The host pid of the container's first process, once crun reports it
    /// running.
    pub fn pid(&self, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            let out = Command::new(CRUN)
                .args(["--root", s(&self.state), "state", &self.id])
                .output()
                .expect("crun state");
            let state = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok();
            if let Some(state) = state.filter(|v| v["status"] == "running") {
                return state["pid"].as_u64().expect("a pid") as u32;
            }
            assert!(
                Instant::now() < deadline,
                "container {} never ran: {}\n{}",
                self.id,
                String::from_utf8_lossy(&out.stderr),
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the container printed (and crun, when it failed to start).
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether crun still runs (it ends when the container does).
    pub fn running(&mut self) -> bool {
        self.crun
            .as_mut()
            .is_some_and(|c| c.0.try_wait().expect("try_wait").is_none())
    }

    /// Waits for the container to end; crun's exit status.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let crun = self.crun.as_mut().expect("started");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = crun.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "container {} still runs after {timeout:?}",
                self.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let crun = |args: &[&str]| {
            let _ = Command::new(CRUN)
                .args(["--root", s(&self.state)])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        let _ = fs::write(self.scope.0.join("cgroup.freeze"), "0");
        crun(&["kill", &self.id, "KILL"]);
        // crun run ends once its container has; Reaped kills it otherwise.
        if let Some(mut child) = self.crun.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        crun(&["delete", "--force", &self.id]);
        // The scope is removed after this, by its own Drop.
    }
}
