//! A `diffkeeper daemon` run by the tests: its configuration, its log, its
//! metrics, its control socket, and what its stores restore.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{ok, read_tree, s, Reaped, BIN};

/// A daemon started on `config`, its log going to `log`.
pub struct Daemon {
    pub child: Reaped,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, log: &Path) -> Daemon {
        Daemon::start_with(config, log, &[])
    }

    pub fn start_with(config: &Path, log: &Path, extra: &[&str]) -> Daemon {
        let err = fs::File::create(log).expect("log file");
        let child = Command::new(BIN)
            .args(["daemon", "--config", s(config)])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn the daemon");
        Daemon {
            child: Reaped(child),
            log: log.to_path_buf(),
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has `count` lines holding every one of `words`.
    pub fn wait_log(&self, words: &[&str], count: usize, timeout: Duration) {
        super::wait_for(
            &format!("{count} log line(s) with {words:?}"),
            timeout,
            || self.lines(words) >= count,
        );
    }

    pub fn lines(&self, words: &[&str]) -> usize {
        self.log()
            .lines()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .count()
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.0.id() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("signal the daemon");
    }

    /// SIGTERM, and its exit code.
    pub fn stop(mut self) -> (Option<i32>, String) {
        self.signal(rustix::process::Signal::TERM);
        let status = self.child.0.wait().expect("wait for the daemon");
        (status.code(), self.log())
    }
}

/// A target's section: `data=DIR` into `STORE`, quick to capture.
pub fn target(name: &str, dir: &Path, store: &Path, extra: &str) -> String {
    format!(
        "[[target]]\nname = \"{name}\"\nstore = \"{}\"\nstate_dirs = [\"data={}\"]\ndebounce = \"50ms\"\nmax_latency = \"500ms\"\n{extra}\n",
        s(store),
        s(dir)
    )
}

/// Writes the configuration atomically (as a ConfigMap update is seen), so
/// the daemon never reads half a file.
pub fn write_config(path: &Path, backend: &str, targets: &[String]) {
    write_config_with(path, backend, "", targets)
}

/// `write_config` with more `[daemon]` keys.
pub fn write_config_with(path: &Path, backend: &str, daemon: &str, targets: &[String]) {
    let text = format!(
        "[daemon]\nbackend = \"{backend}\"\nreload_interval = \"100ms\"\nmetrics_addr = \"127.0.0.1:0\"\n{daemon}\n{}",
        targets.concat()
    );
    let temporary = path.with_extension("new");
    fs::write(&temporary, text).expect("write the config");
    fs::rename(&temporary, path).expect("install the config");
}

/// The tree the store's latest batch restores.
pub fn restored(
    store: &Path,
    work: &Path,
    name: &str,
) -> std::collections::BTreeMap<Vec<u8>, super::Node> {
    let to = work.join(format!("restored-{name}"));
    let _ = fs::remove_dir_all(&to);
    ok(&[
        "replay",
        "--state-dir",
        &format!("data={}", s(&to)),
        "--store",
        s(store),
    ]);
    // A store just created, before its first batch commits, has nothing
    // to replay, and replay leaves no directory.
    if !to.exists() {
        return Default::default();
    }
    read_tree(&to)
}

/// Waits until replaying `store` gives `dir`'s tree.
pub fn wait_captured(store: &Path, dir: &Path, work: &Path, what: &str) {
    let want = read_tree(dir);
    super::wait_for(what, Duration::from_secs(15), || {
        store.exists() && restored(store, work, "wait") == want
    });
}

/// Where a log says metrics are served (`HOST:PORT`).
pub fn metrics_addr(log: &str) -> String {
    log.split("metrics at http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("the metrics address in the log")
        .to_string()
}

/// A GET of `path` from the daemon's metrics server: status and body.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics server");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, body.to_string())
}

/// The value of the series `name{labels}` in a metrics text.
pub fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub fn empty(dir: &Path) {
    for entry in fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            fs::remove_dir_all(&path).expect("rm -r");
        } else {
            fs::remove_file(&path).expect("rm");
        }
    }
}

pub fn restore_wait(socket: &Path, target: &str, timeout: &str) -> std::process::Child {
    Command::new(BIN)
        .args([
            "restore-wait",
            "--socket",
            s(socket),
            "--target",
            target,
            "--timeout",
            timeout,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn restore-wait")
}
