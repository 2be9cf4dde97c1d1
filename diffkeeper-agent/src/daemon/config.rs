//! The daemon's configuration file: its format, and turning it into
//! targets with their capture options.
//!
//! TOML, read whole at start and at each reload. Unknown keys are errors
//! (a misspelt `debouce` must not silently keep the default), and an
//! error names the file, the line and the key. A reload whose file does
//! not parse or check leaves every running target as it was.
//!
//! ```toml
//! [daemon]                    # optional; these are the defaults
//! backend = "auto"            # auto | ebpf | inotify | scan (read at start only)
//! syscall_hooks = false       # the 32 syscall tracepoints everywhere (start only)
//! reload_interval = "2s"      # how often the file is looked at for changes
//! metrics_addr = "0.0.0.0:9090"   # /metrics, /healthz, /readyz; "none" for none (start only)
//! socket = "/run/diffkeeper/daemon.sock"   # restore-wait's control socket; none unless set (start only)
//!
//! [defaults]                  # optional: every target's settings unless it sets its own
//! debounce = "300ms"
//! max_latency = "3s"
//! consistency = "auto"        # auto | freeze | none
//! max_pause = "200ms"
//! scan_interval = "2s"
//! rescan_interval = "30s"
//! compact_interval = "1h"
//! restore = "if-empty"        # if-empty | never: see below
//! exclude = ["*.tmp", "/cache"]   # globs of paths not kept (see below)
//! include = []                # globs of files kept; empty: every file
//!
//! [[target]]
//! name = "game"               # stable: logs and reloads know the target by it
//! store = "/var/lib/diffkeeper/game.dk"
//! state_dirs = ["world=/srv/game/world", "/srv/game/config"]
//! consistency = "freeze"      # any [defaults] key may be set here too
//! freeze_cgroups = ["/sys/fs/cgroup/unified/game.scope"]
//! retention = { keep_last = 100, keep_within = "7d" }
//!
//! [kubernetes]                # optional: targets from this node's pods (see below)
//! node_name = "node-1"        # default: $NODE_NAME (the DaemonSet sets it)
//! kubelet_root = "/var/lib/kubelet"
//! stores = "/var/lib/diffkeeper/pods"   # a pod's store: STORES/NAMESPACE/KEY.dk
//! kubeconfig = "/etc/kubeconfig"        # default: $KUBECONFIG, ~/.kube/config, in-cluster
//! ```
//!
//! `[kubernetes]` turns on discovery ([`super::kubernetes`]): each pod of
//! the node annotated `diffkeeper.io/volumes` is a target with the
//! `[defaults]` settings, named `NAMESPACE.POD`.
//!
//! `restore = "if-empty"`: a target whose store exists and whose state
//! directories are empty when it starts (a fresh emptyDir or tmpfs after a
//! reboot or a pod re-created) gets its store's latest state replayed into
//! them first, verified, then is captured; `restore-wait` reports it
//! ready only then. Directories that are not empty are reconciled as they
//! are (what changed while the daemon was down is captured). `never`
//! always takes the directories as they are, even empty: their first
//! batch then records every file deleted.
//!
//! `include` and `exclude` ([`crate::scan::filter`]) are globs over paths
//! relative to each state directory: one with a `/` is anchored at its
//! top, one without matches a name at any depth, a directory matched
//! covers what is under it, and excludes win. A path left out is never
//! recorded, nor its removal (no tombstone).
//!
//! Durations are humantime's (`250ms`, `30s`, `1h 30m`, `7d`). A state
//! directory is `NAME=DIR` or `DIR`, as `--state-dir` takes it. Targets are
//! compared by name at a reload: a new name is started, a missing one
//! stopped (after a final capture), one whose settings changed restarted,
//! and the others are not touched.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{AgentError, Result};
use crate::roots::StateDir;
use crate::watch::{Backend, Consistency, WatchOptions};

/// A configuration file, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub backend: Backend,
    pub syscall_hooks: crate::events::SyscallHooks,
    pub reload_interval: Duration,
    /// Where metrics and health checks are served; `None` for nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The control socket `restore-wait` asks, if any.
    pub socket: Option<PathBuf>,
    /// By name.
    pub targets: BTreeMap<String, Target>,
    /// Where pods are discovered, when `[kubernetes]` is there.
    pub kubernetes: Option<Kubernetes>,
}

/// `[kubernetes]`: discovery of this node's opted-in pods.
#[derive(Debug, Clone, PartialEq)]
pub struct Kubernetes {
    /// The node whose pods are watched.
    pub node_name: String,
    /// The kubelet's directory (`pods/<uid>/volumes/...` under it).
    pub kubelet_root: PathBuf,
    /// Where pods' stores go: `<stores>/<namespace>/<key>.dk`.
    pub stores: PathBuf,
    /// The kubeconfig file to use; else kube's inference ($KUBECONFIG,
    /// ~/.kube/config, the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// What every pod's target takes: the `[defaults]`.
    pub options: WatchOptions,
    pub restore_if_empty: bool,
}

/// One target: a set of state directories with its own store and
/// capture options.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub store: PathBuf,
    pub roots: Vec<StateDir>,
    pub options: WatchOptions,
    /// Replay the store into its directories first when they are empty.
    pub restore_if_empty: bool,
    /// The pod it is, for a target discovered from one.
    pub pod: Option<super::kubernetes::PodRef>,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    daemon: DaemonSection,
    #[serde(default)]
    defaults: Settings,
    #[serde(default, rename = "target")]
    targets: Vec<TargetSection>,
    kubernetes: Option<KubernetesSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KubernetesSection {
    node_name: Option<String>,
    kubelet_root: Option<PathBuf>,
    stores: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonSection {
    backend: Option<String>,
    syscall_hooks: Option<bool>,
    reload_interval: Option<Span>,
    metrics_addr: Option<String>,
    socket: Option<PathBuf>,
}

/// What a target may set, and `[defaults]` for all of them.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    debounce: Option<Span>,
    max_latency: Option<Span>,
    consistency: Option<String>,
    max_pause: Option<Span>,
    scan_interval: Option<Span>,
    rescan_interval: Option<Span>,
    compact_interval: Option<Span>,
    freeze_cgroups: Option<Vec<PathBuf>>,
    retention: Option<Retention>,
    restore: Option<String>,
    include: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Retention {
    keep_within: Option<Span>,
    keep_last: Option<u64>,
    keep_hourly: Option<u64>,
    keep_daily: Option<u64>,
    keep_weekly: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSection {
    name: String,
    store: PathBuf,
    state_dirs: Vec<String>,
    #[serde(flatten)]
    settings: Settings,
}

/// A duration as humantime writes it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
struct Span(Duration);

impl TryFrom<String> for Span {
    type Error = String;

    fn try_from(text: String) -> std::result::Result<Span, String> {
        humantime::parse_duration(&text).map(Span).map_err(|e| {
            format!("{text:?} is not a duration ({e}; write e.g. \"300ms\", \"30s\", \"1h\")")
        })
    }
}

/// Where `daemon` serves metrics unless told otherwise: every address, as
/// a probe from the kubelet comes to the pod's.
pub const DEFAULT_METRICS_ADDR: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9090);

/// `HOST:PORT`, or `none` (no metrics).
pub fn parse_metrics_addr(text: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if text == "none" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| {
        format!("metrics_addr = {text:?}: not an address ({e}); write IP:PORT (0.0.0.0:9090, 127.0.0.1:0) or \"none\"")
    })
}

/// A TOML error on one line, with its place: `line 3, column 1: unknown
/// field ...` (toml's own text draws the line over several).
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end().replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// The value named `name` among `all` (a `Backend::ALL`-like table).
fn by_name<T: Copy>(all: &[(T, &str, &str)], name: &str, key: &str) -> Result<T, String> {
    all.iter()
        .find(|(_, n, _)| *n == name)
        .map(|(value, _, _)| *value)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|(_, n, _)| *n).collect();
            format!("{key} = {name:?}: not one of {}", names.join(", "))
        })
}

impl Settings {
    /// These settings over `under`'s: a key set here wins.
    fn over(&self, under: &Settings) -> Settings {
        Settings {
            debounce: self.debounce.or(under.debounce),
            max_latency: self.max_latency.or(under.max_latency),
            consistency: self.consistency.clone().or(under.consistency.clone()),
            max_pause: self.max_pause.or(under.max_pause),
            scan_interval: self.scan_interval.or(under.scan_interval),
            rescan_interval: self.rescan_interval.or(under.rescan_interval),
            compact_interval: self.compact_interval.or(under.compact_interval),
            freeze_cgroups: self.freeze_cgroups.clone().or(under.freeze_cgroups.clone()),
            retention: self.retention.clone().or(under.retention.clone()),
            restore: self.restore.clone().or(under.restore.clone()),
            include: self.include.clone().or(under.include.clone()),
            exclude: self.exclude.clone().or(under.exclude.clone()),
        }
    }

    /// Whether `restore` says to replay into empty directories.
    fn restore_if_empty(&self) -> Result<bool, String> {
        match self.restore.as_deref() {
            None | Some("if-empty") => Ok(true),
            Some("never") => Ok(false),
            Some(other) => Err(format!("restore = {other:?}: not one of if-empty, never")),
        }
    }

    /// The capture options these settings give, over the defaults `watch`
    /// has.
    fn options(
        &self,
        backend: Backend,
        hooks: crate::events::SyscallHooks,
    ) -> Result<WatchOptions, String> {
        let default = WatchOptions::default();
        let pick = |given: Option<Span>, default: Duration| given.map_or(default, |s| s.0);
        let consistency = match &self.consistency {
            Some(name) => by_name(&Consistency::ALL, name, "consistency")?,
            None => default.consistency,
        };
        let retention = match &self.retention {
            Some(r) => crate::retention::Policy {
                keep_within: r.keep_within.map(|s| s.0),
                keep_last: r.keep_last,
                keep_hourly: r.keep_hourly,
                keep_daily: r.keep_daily,
                keep_weekly: r.keep_weekly,
            },
            None => default.retention.clone(),
        };
        let options = WatchOptions {
            backend,
            syscall_hooks: hooks,
            debounce: pick(self.debounce, default.debounce),
            max_latency: pick(self.max_latency, default.max_latency),
            scan_interval: pick(self.scan_interval, default.scan_interval),
            rescan_interval: pick(self.rescan_interval, default.rescan_interval),
            compact_interval: pick(self.compact_interval, default.compact_interval),
            max_pause: pick(self.max_pause, default.max_pause),
            consistency,
            retention,
            freeze_cgroups: self.freeze_cgroups.clone().unwrap_or_default(),
            filter: crate::scan::PathFilter::of_globs(
                self.include.as_deref().unwrap_or_default(),
                self.exclude.as_deref().unwrap_or_default(),
            )?
            .map(std::sync::Arc::new),
        };
        for (key, value) in [
            ("scan_interval", options.scan_interval),
            ("rescan_interval", options.rescan_interval),
            ("compact_interval", options.compact_interval),
        ] {
            if value < Duration::from_millis(10) {
                return Err(format!(
                    "{key} = {value:?}: too short to be an interval (at least 10ms)"
                ));
            }
        }
        Ok(options)
    }
}

impl Config {
    /// Reads and checks the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        Config::parse(path, &Config::read(path)?)
    }

    /// The configuration file's bytes, as [`Config::parse`] takes them.
    pub fn read(path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|source| AgentError::Failed {
            what: format!("cannot read the configuration file {}", path.display()),
            source: Box::new(source),
        })
    }

    /// Checks the configuration `text`, read from `path` (named in errors).
    pub fn parse(path: &Path, text: &[u8]) -> Result<Config> {
        let refused = |why: String| {
            AgentError::Refused(format!("configuration file {}: {why}", path.display()))
        };
        let text =
            std::str::from_utf8(text).map_err(|e| refused(format!("not UTF-8 text ({e})")))?;
        let file: File = toml::from_str(text).map_err(|e| refused(toml_error(text, &e)))?;
        let backend = match &file.daemon.backend {
            Some(name) => by_name(&Backend::ALL, name, "[daemon] backend").map_err(refused)?,
            None => Backend::Auto,
        };
        let syscall_hooks = if file.daemon.syscall_hooks.unwrap_or(false) {
            crate::events::SyscallHooks::Always
        } else {
            crate::events::SyscallHooks::Auto
        };
        let reload_interval = file
            .daemon
            .reload_interval
            .map_or(Duration::from_secs(2), |s| s.0);
        if reload_interval < Duration::from_millis(10) {
            return Err(refused(format!(
                "[daemon] reload_interval = {reload_interval:?}: too short (at least 10ms)"
            )));
        }
        // Checked even with no target to take them.
        file.defaults
            .options(backend, syscall_hooks)
            .and_then(|_| file.defaults.restore_if_empty())
            .map_err(|why| refused(format!("[defaults] {why}")))?;
        if let Some(socket) = &file.daemon.socket {
            if socket.is_relative() {
                return Err(refused(format!(
                    "[daemon] socket {} is relative: give an absolute path",
                    socket.display()
                )));
            }
        }
        let metrics_addr = match file.daemon.metrics_addr.as_deref() {
            None => Some(DEFAULT_METRICS_ADDR),
            Some(text) => {
                parse_metrics_addr(text).map_err(|why| refused(format!("[daemon] {why}")))?
            }
        };
        let kubernetes = match &file.kubernetes {
            Some(section) => Some(
                section
                    .check(&file.defaults, backend, syscall_hooks)
                    .map_err(|why| refused(format!("[kubernetes] {why}")))?,
            ),
            None => None,
        };
        let mut targets = BTreeMap::new();
        let mut stores = HashSet::new();
        for section in &file.targets {
            let name = &section.name;
            let target_refused = |why: String| refused(format!("target {name:?}: {why}"));
            if !crate::roots::is_valid_name(name) {
                return Err(target_refused(
                    "not a valid target name (letters, digits, '.', '_', '-'; at most 128)"
                        .to_string(),
                ));
            }
            if targets.contains_key(name) {
                return Err(target_refused("defined twice".to_string()));
            }
            if section.state_dirs.is_empty() {
                return Err(target_refused(
                    "state_dirs is empty: it has nothing to capture".to_string(),
                ));
            }
            let roots = section
                .state_dirs
                .iter()
                .map(|spec| StateDir::parse(spec).map_err(|e| target_refused(e.to_string())))
                .collect::<Result<Vec<_>>>()?;
            let mut names = HashSet::new();
            for root in &roots {
                if !names.insert(&root.name) {
                    return Err(target_refused(format!(
                        "two state directories are named {:?}: name them apart with NAME=DIR",
                        root.name
                    )));
                }
                if root.path.is_relative() {
                    return Err(target_refused(format!(
                        "state directory {} is relative: the daemon's working directory is no place to resolve it; give an absolute path",
                        root.path.display()
                    )));
                }
            }
            if section.store.is_relative() {
                return Err(target_refused(format!(
                    "store {} is relative: give an absolute path",
                    section.store.display()
                )));
            }
            if !stores.insert(section.store.clone()) {
                return Err(target_refused(format!(
                    "store {} is another target's too: a store belongs to one target",
                    section.store.display()
                )));
            }
            let settings = section.settings.over(&file.defaults);
            let options = settings
                .options(backend, syscall_hooks)
                .map_err(target_refused)?;
            let restore_if_empty = settings.restore_if_empty().map_err(target_refused)?;
            targets.insert(
                name.clone(),
                Target {
                    name: name.clone(),
                    store: section.store.clone(),
                    roots,
                    options,
                    restore_if_empty,
                    pod: None,
                },
            );
        }
        Ok(Config {
            backend,
            syscall_hooks,
            reload_interval,
            metrics_addr,
            socket: file.daemon.socket.clone(),
            targets,
            kubernetes,
        })
    }
}

impl KubernetesSection {
    /// The section with its defaults filled in, checked.
    fn check(
        &self,
        defaults: &Settings,
        backend: Backend,
        hooks: crate::events::SyscallHooks,
    ) -> Result<Kubernetes, String> {
        let node_name = match &self.node_name {
            Some(name) => name.clone(),
            None => std::env::var("NODE_NAME").map_err(|_| {
                "node_name is not set and neither is $NODE_NAME: give the node whose pods to watch (the DaemonSet passes spec.nodeName as NODE_NAME)".to_string()
            })?,
        };
        if node_name.is_empty() || node_name.contains(['=', ',', ' ']) {
            return Err(format!("node_name = {node_name:?}: not a node name"));
        }
        let kubelet_root = self
            .kubelet_root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/kubelet"));
        let stores = self
            .stores
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/diffkeeper/pods"));
        for (key, path) in [("kubelet_root", &kubelet_root), ("stores", &stores)] {
            if path.is_relative() {
                return Err(format!(
                    "{key} {} is relative: give an absolute path",
                    path.display()
                ));
            }
        }
        Ok(Kubernetes {
            node_name,
            kubelet_root,
            stores,
            kubeconfig: self.kubeconfig.clone(),
            options: defaults.options(backend, hooks)?,
            restore_if_empty: defaults.restore_if_empty()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(Path::new("/etc/dk.toml"), text.as_bytes())
    }

    fn refused(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_target_takes_the_defaults_and_its_own_settings() {
        let config = parse(
            r#"
            [defaults]
            debounce = "1s"
            consistency = "freeze"
            [[target]]
            name = "a"
            store = "/s/a.dk"
            state_dirs = ["/data/a", "logs=/data/a-logs"]
            [[target]]
            name = "b"
            store = "/s/b.dk"
            state_dirs = ["/data/b"]
            debounce = "50ms"
            retention = { keep_last = 3 }
            "#,
        )
        .expect("parses");
        assert_eq!(config.backend, Backend::Auto);
        let a = &config.targets["a"];
        assert_eq!(a.options.debounce, Duration::from_secs(1));
        assert_eq!(a.options.consistency, Consistency::Freeze);
        assert_eq!(a.roots[1].name, "logs");
        let b = &config.targets["b"];
        assert_eq!(b.options.debounce, Duration::from_millis(50));
        assert_eq!(b.options.consistency, Consistency::Freeze);
        assert_eq!(b.options.retention.keep_last, Some(3));
        assert_eq!(b.options.max_latency, WatchOptions::default().max_latency);
    }

    #[test]
    fn mistakes_are_named_with_their_place() {
        let typo = refused(
            "[[target]]\nname = \"a\"\nstore = \"/s\"\nstate_dirs = [\"/d\"]\ndebouce = \"1s\"\n",
        );
        assert!(
            typo.contains("/etc/dk.toml") && typo.contains("debouce"),
            "{typo}"
        );
        let duration = refused("[defaults]\ndebounce = \"soon\"\n");
        assert!(
            duration.contains("\"soon\" is not a duration"),
            "{duration}"
        );
        let glob = refused("[defaults]\nexclude = [\"a[b\"]\n");
        assert!(glob.contains("exclude pattern \"a[b\""), "{glob}");
        let mode = refused("[defaults]\nconsistency = \"maybe\"\n");
        assert!(mode.contains("not one of auto, freeze, none"), "{mode}");
        let twice = refused(
            "[[target]]\nname = \"a\"\nstore = \"/s1\"\nstate_dirs = [\"/d1\"]\n[[target]]\nname = \"a\"\nstore = \"/s2\"\nstate_dirs = [\"/d2\"]\n",
        );
        assert!(twice.contains("target \"a\": defined twice"), "{twice}");
        let shared = refused(
            "[[target]]\nname = \"a\"\nstore = \"/s\"\nstate_dirs = [\"/d1\"]\n[[target]]\nname = \"b\"\nstore = \"/s\"\nstate_dirs = [\"/d2\"]\n",
        );
        assert!(shared.contains("another target's too"), "{shared}");
        let relative = refused("[[target]]\nname = \"a\"\nstore = \"/s\"\nstate_dirs = [\"d\"]\n");
        assert!(relative.contains("relative"), "{relative}");
        let name = refused("[[target]]\nname = \"../x\"\nstore = \"/s\"\nstate_dirs = [\"/d\"]\n");
        assert!(name.contains("not a valid target name"), "{name}");
        let empty = refused("[[target]]\nname = \"a\"\nstore = \"/s\"\nstate_dirs = []\n");
        assert!(empty.contains("nothing to capture"), "{empty}");
        let binary = match Config::parse(Path::new("/x"), b"\xff\xfe") {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted bytes"),
        };
        assert!(binary.contains("not UTF-8"), "{binary}");
    }

    #[test]
    fn an_empty_file_is_a_daemon_with_no_targets() {
        let config = parse("").expect("parses");
        assert!(config.targets.is_empty());
        assert_eq!(config.reload_interval, Duration::from_secs(2));
    }
}
