//! Kubernetes discovery through the real binary and the real kube client:
//! `diffkeeper daemon` with `[kubernetes]` talks HTTP to a stand-in API
//! server that answers the list and watch of the node's pods with recorded
//! JSON (`tests/fixtures/kubernetes/pod.json`), and can drop its watch
//! connections, send bookmarks, and answer a stale watch with `410 Gone`.
//! The daemon must: ask for its node's pods alone; take annotated pods'
//! emptyDir volumes as targets (and say why a bad annotation is refused);
//! follow pods added by the watch, across a dropped connection (watched
//! again from the bookmark) and a 410 (listed again, a pod deleted
//! meanwhile stopped); keep a deleted pod's last state when the kubelet
//! deletes its volume; and restore it into the volume of the pod
//! re-created with the same name before `restore-wait` lets its app start.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::daemon::{get, metrics_addr, restore_wait, restored, wait_captured, Daemon};
use common::{read_tree, s};

/// What the stand-in API server holds.
#[derive(Default)]
struct State {
    /// The pods a list returns, by uid.
    pods: BTreeMap<String, serde_json::Value>,
    /// The last resource version given out.
    version: u64,
    /// Watch events as the server sent them: version and line.
    events: Vec<(u64, String)>,
    /// Watches from a version below this are answered `410 Gone`.
    expired_below: u64,
    /// Bumped to close every open watch connection.
    drops: u64,
    /// Every request's path and query, in order.
    requests: Vec<String>,
}

/// A stand-in Kubernetes API server for `/api/v1/pods` list and watch.
struct Stub {
    addr: String,
    state: Arc<Mutex<State>>,
}

/// The recorded pod, made pod `namespace/name` with `uid` and `annotations`.
fn pod(name: &str, uid: &str, annotations: &[(&str, &str)]) -> serde_json::Value {
    let text = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/kubernetes/pod.json"
    ))
    .expect("the recorded pod");
    let mut pod: serde_json::Value = serde_json::from_str(&text).expect("pod JSON");
    pod["metadata"]["name"] = name.into();
    pod["metadata"]["uid"] = uid.into();
    pod["spec"]["hostname"] = name.into();
    for (key, value) in annotations {
        pod["metadata"]["annotations"][*key] = (*value).into();
    }
    pod
}

impl Stub {
    fn start() -> Stub {
        Stub::serving(None)
    }

    /// A stub speaking HTTPS with the certificate and key at these PEM
    /// files.
    fn start_tls(cert: &Path, key: &Path) -> Stub {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .expect("certificate PEM")
            .collect::<Result<Vec<_>, _>>()
            .expect("certificates");
        let key = PrivateKeyDer::from_pem_file(key).expect("key PEM");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
        Stub::serving(Some(Arc::new(config)))
    }

    fn serving(tls: Option<Arc<rustls::ServerConfig>>) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the stub");
        let addr = listener.local_addr().expect("stub address").to_string();
        let state = Arc::new(Mutex::new(State {
            version: 100,
            ..State::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    None => serve(stream, &state),
                    Some(config) => {
                        if let Ok(connection) = rustls::ServerConnection::new(config) {
                            serve(rustls::StreamOwned::new(connection, stream), &state);
                        }
                    }
                });
            }
        });
        Stub { addr, state }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("stub state")
    }

    /// A watch event for `pod` (ADDED, MODIFIED, DELETED), the list
    /// changed to match.
    fn event(&self, kind: &str, mut pod: serde_json::Value) {
        let mut state = self.lock();
        state.version += 1;
        let version = state.version;
        pod["metadata"]["resourceVersion"] = version.to_string().into();
        let uid = pod["metadata"]["uid"].as_str().expect("uid").to_string();
        if kind == "DELETED" {
            state.pods.remove(&uid);
        } else {
            state.pods.insert(uid, pod.clone());
        }
        let line = serde_json::json!({ "type": kind, "object": pod }).to_string();
        state.events.push((version, line));
    }

    /// A bookmark at a new version; returns it.
    fn bookmark(&self) -> u64 {
        let mut state = self.lock();
        state.version += 1;
        let version = state.version;
        let line = serde_json::json!({
            "type": "BOOKMARK",
            "object": {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": { "resourceVersion": version.to_string() }
            }
        })
        .to_string();
        state.events.push((version, line));
        version
    }

    /// Closes every open watch, as a restarted API server or a load
    /// balancer's idle timeout does.
    fn drop_watches(&self) {
        self.lock().drops += 1;
    }

    fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }
}

/// The value of `key` in a query string.
fn query<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    path.split_once('?')?
        .1
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// Answers one connection's requests: a list, or a watch held open.
fn serve(stream: impl std::io::Read + Write, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        // The headers, up to the blank line (a GET has no body).
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        state.lock().expect("state").requests.push(path.clone());
        let stream = reader.get_mut();
        if !path.starts_with("/api/v1/pods") {
            let _ = write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
            );
            let _ = stream.flush();
            continue;
        }
        if query(&path, "watch") == Some("true") || query(&path, "watch") == Some("1") {
            watch(stream, &path, state);
            return;
        }
        let body = {
            let state = state.lock().expect("state");
            serde_json::json!({
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": { "resourceVersion": state.version.to_string() },
                "items": state.pods.values().collect::<Vec<_>>(),
            })
            .to_string()
        };
        if write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .and_then(|_| stream.flush())
        .is_err()
        {
            return;
        }
    }
}

/// Streams the watch events after the request's version, chunked, until
/// the connection is dropped on purpose or by the client.
fn watch(stream: &mut impl Write, path: &str, state: &Mutex<State>) {
    let from: u64 = query(path, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.flush())
        .is_err()
    {
        return;
    }
    let chunk = |stream: &mut dyn Write, line: &str| {
        let data = format!("{line}\n");
        write!(stream, "{:x}\r\n{data}\r\n", data.len()).and_then(|_| stream.flush())
    };
    let (drops, expired) = {
        let state = state.lock().expect("state");
        (state.drops, from < state.expired_below)
    };
    if expired {
        let gone = serde_json::json!({
            "type": "ERROR",
            "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure",
                "message": format!("too old resource version: {from}"),
                "reason": "Expired", "code": 410
            }
        });
        let _ = chunk(stream, &gone.to_string());
        let _ = stream.write_all(b"0\r\n\r\n");
        let _ = stream.flush();
        return;
    }
    let mut sent = from;
    loop {
        let (lines, dropped) = {
            let state = state.lock().expect("state");
            let lines: Vec<(u64, String)> = state
                .events
                .iter()
                .filter(|(v, _)| *v > sent)
                .cloned()
                .collect();
            (lines, state.drops != drops)
        };
        if dropped {
            // Mid-stream, with no last chunk: a connection lost (dropped
            // with the stream when this returns).
            return;
        }
        for (version, line) in lines {
            if chunk(stream, &line).is_err() {
                return;
            }
            sent = version;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A kubeconfig whose one context is the API server at `addr`, over plain
/// HTTP with no credentials.
fn write_kubeconfig(path: &Path, addr: &str) {
    write_kubeconfig_for(path, &format!("server: http://{addr}"));
}

/// A kubeconfig whose one cluster has these settings (`server: ...`,
/// `certificate-authority: ...`), with no credentials.
fn write_kubeconfig_for(path: &Path, cluster: &str) {
    let cluster = cluster.replace('\n', "\n    ");
    fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stub\n  cluster:\n    {cluster}\ncontexts:\n- name: stub\n  context:\n    cluster: stub\n    user: stub\ncurrent-context: stub\nusers:\n- name: stub\n  user: {{}}\n"
        ),
    )
    .expect("kubeconfig");
}

/// A pod's emptyDir volume directory under the kubelet root.
fn volume(kubelet: &Path, uid: &str, name: &str) -> PathBuf {
    kubelet
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(name)
}

/// Runs `restore-wait` for `target` and returns its exit code and output.
fn wait_ready(socket: &Path, target: &str) -> (Option<i32>, String) {
    let out = restore_wait(socket, target, "30s")
        .wait_with_output()
        .expect("restore-wait");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn write_files(dir: &Path, prefix: &str, count: usize) {
    fs::create_dir_all(dir.join("sub")).expect("mkdir");
    for i in 0..count {
        fs::write(
            dir.join(if i % 2 == 0 { "sub" } else { "." })
                .join(format!("{prefix}-{i}")),
            format!("{prefix} {i} ").repeat(100 + i),
        )
        .expect("write");
    }
}

const DB: &str = "11111111-1111-4111-8111-111111111111";
const CACHE: &str = "22222222-2222-4222-8222-222222222222";
const WEB: &str = "33333333-3333-4333-8333-333333333333";
const BAD: &str = "44444444-4444-4444-8444-444444444444";
const DB_AGAIN: &str = "55555555-5555-4555-8555-555555555555";

#[test]
fn pods_of_the_node_are_followed_and_a_recreated_pod_gets_its_state_back_before_it_starts() {
    let work = tempfile::tempdir().expect("tempdir");
    let kubelet = work.path().join("kubelet");
    let stores = work.path().join("stores");
    let socket = work.path().join("daemon.sock");
    let stub = Stub::start();
    let kubeconfig = work.path().join("kubeconfig");
    write_kubeconfig(&kubeconfig, &stub.addr);

    // Listed at start: db-0 opted in, web-0 not, bad-0 naming a configMap.
    let db_dir = volume(&kubelet, DB, "data");
    write_files(&db_dir, "db", 20);
    fs::create_dir_all(volume(&kubelet, WEB, "data")).expect("mkdir");
    stub.event(
        "ADDED",
        pod("db-0", DB, &[("diffkeeper.io/volumes", "data")]),
    );
    stub.event("ADDED", pod("web-0", WEB, &[]));
    stub.event(
        "ADDED",
        pod("bad-0", BAD, &[("diffkeeper.io/volumes", "config")]),
    );

    let config = work.path().join("daemon.toml");
    fs::write(
        &config,
        format!(
            "[daemon]\nbackend = \"ebpf\"\nmetrics_addr = \"127.0.0.1:0\"\nsocket = \"{}\"\n\
             [defaults]\ndebounce = \"50ms\"\nmax_latency = \"500ms\"\n\
             [kubernetes]\nnode_name = \"node-1\"\nkubelet_root = \"{}\"\nstores = \"{}\"\nkubeconfig = \"{}\"\n",
            s(&socket),
            s(&kubelet),
            s(&stores),
            s(&kubeconfig)
        ),
    )
    .expect("config");
    let daemon = Daemon::start(&config, &work.path().join("daemon.log"));
    let timeout = Duration::from_secs(30);
    daemon.wait_log(&["discovery: 3 pod(s) on node node-1"], 1, timeout);
    let requests = stub.requests();
    assert!(
        requests
            .iter()
            .all(|r| query(r, "fieldSelector") == Some("spec.nodeName%3Dnode-1")),
        "every request asks for node-1's pods alone: {requests:?}"
    );
    daemon.wait_log(
        &[
            "pod shop/bad-0 is not captured",
            "volume \"config\" is not an emptyDir",
        ],
        1,
        timeout,
    );

    // The opted-in pod is a target named namespace.pod, its store keyed
    // by its name in its namespace.
    let (code, out) = wait_ready(&socket, "shop.db-0");
    assert_eq!(code, Some(0), "{out}");
    let db_store = stores.join("shop/db-0.dk");
    write_files(&db_dir, "db-more", 10);
    wait_captured(&db_store, &db_dir, work.path(), "db-0's writes captured");
    assert!(
        !daemon.log().contains("shop.web-0"),
        "a pod without the annotation is no target"
    );
    let (_, metrics) = get(&metrics_addr(&daemon.log()), "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("diffkeeper_target_pod_info{")
                && l.contains("target=\"shop.db-0\"")
                && l.contains("namespace=\"shop\"")
                && l.contains("pod=\"db-0\"")
                && l.contains(&format!("pod_uid=\"{DB}\""))),
        "{metrics}"
    );

    // A pod added by the watch, then a bookmark.
    let cache_dir = volume(&kubelet, CACHE, "data");
    write_files(&cache_dir, "cache", 5);
    stub.event(
        "ADDED",
        pod("cache-0", CACHE, &[("diffkeeper.io/volumes", "data")]),
    );
    let bookmark = stub.bookmark();
    let (code, out) = wait_ready(&socket, "shop.cache-0");
    assert_eq!(code, Some(0), "{out}");
    let cache_store = stores.join("shop/cache-0.dk");
    wait_captured(&cache_store, &cache_dir, work.path(), "cache-0 captured");
    let cache_tree = read_tree(&cache_dir);

    // A dropped connection: watched again from the bookmark's version.
    std::thread::sleep(Duration::from_millis(300));
    stub.drop_watches();
    common::wait_for("a watch from the bookmark", timeout, || {
        stub.requests().iter().any(|r| {
            query(r, "watch").is_some()
                && query(r, "resourceVersion") == Some(&bookmark.to_string()[..])
        })
    });

    // cache-0 deleted while the watch is down and its events compacted
    // away: the next watch is told 410 Gone, the daemon lists again and
    // stops the target without recording anything deleted.
    let lists_before = stub
        .requests()
        .iter()
        .filter(|r| query(r, "watch").is_none())
        .count();
    {
        let mut state = stub.lock();
        state.pods.remove(CACHE);
        state.version += 10;
        state.expired_below = state.version + 1;
    }
    stub.drop_watches();
    daemon.wait_log(
        &[
            "target shop.cache-0: its pod is gone",
            "without a final capture",
        ],
        1,
        timeout,
    );
    let lists_after = stub
        .requests()
        .iter()
        .filter(|r| query(r, "watch").is_none())
        .count();
    assert!(lists_after > lists_before, "listed again after the 410");
    fs::remove_dir_all(&cache_dir).expect("the kubelet removes the volume");
    assert!(
        restored(&cache_store, work.path(), "cache") == cache_tree,
        "a pod gone keeps its last state"
    );

    // db-0 is deleted: it is ending, then the kubelet deletes its volume's
    // files. The store keeps the tree as the pod left it.
    write_files(&db_dir, "db-last", 4);
    wait_captured(
        &db_store,
        &db_dir,
        work.path(),
        "db-0's last writes captured",
    );
    let mut deleting = stub.lock().pods[DB].clone();
    deleting["metadata"]["deletionTimestamp"] = "2026-12-02T05:00:00Z".into();
    deleting["metadata"]["deletionGracePeriodSeconds"] = 30.into();
    stub.event("MODIFIED", deleting.clone());
    daemon.wait_log(&["target shop.db-0: its pod is ending"], 1, timeout);
    // The pod's own process writes on its way out (a database's shutdown
    // checkpoint), from the pod's cgroup as the kubelet names it: that is
    // captured still.
    let pod_cgroup = common::container::cgroup2_mount().join(format!(
        "kubepods-besteffort-pod{}.slice",
        DB.replace('-', "_")
    ));
    let scope = pod_cgroup.join(format!(
        "cri-containerd-{}.scope",
        common::container::container_id(7)
    ));
    fs::create_dir_all(&scope).expect("the pod's container cgroup");
    let wrote = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && echo saved-at-shutdown > {}/shutdown",
            s(&scope.join("cgroup.procs")),
            s(&db_dir)
        ))
        .status()
        .expect("sh");
    assert!(wrote.success());
    wait_captured(
        &db_store,
        &db_dir,
        work.path(),
        "the pod's shutdown write captured",
    );
    let db_tree = read_tree(&db_dir);
    assert!(
        !daemon.log().contains("is ending and"),
        "the pod's own write does not stop its capture"
    );
    // Its files first, the directory last, as the kubelet's RemoveAll.
    common::daemon::empty(&db_dir);
    daemon.wait_log(
        &["is ending and", "stopped without capturing that"],
        1,
        timeout,
    );
    std::thread::sleep(Duration::from_millis(300));
    fs::remove_dir(&db_dir).expect("the kubelet removes the volume");
    // Its successor's init container may ask before the daemon has seen
    // the old pod go: with its uid it is not told ready by the old target.
    let mut early = common::Reaped(
        std::process::Command::new(common::BIN)
            .args([
                "restore-wait",
                "--socket",
                s(&socket),
                "--target",
                "shop.db-0",
            ])
            .args(["--pod-uid", DB_AGAIN, "--timeout", "30s"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("restore-wait"),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        early.0.try_wait().expect("restore-wait's status").is_none(),
        "restore-wait for the new pod returned while the old pod's target was there"
    );
    stub.event("DELETED", deleting);
    daemon.wait_log(&["target shop.db-0: its pod is gone"], 1, timeout);
    assert!(
        restored(&db_store, work.path(), "db") == db_tree,
        "the kubelet's deletes are not recorded"
    );

    // Re-created by its StatefulSet: a new uid, a new empty volume. The
    // init container's restore-wait returns once the state is back in it.
    let again_dir = volume(&kubelet, DB_AGAIN, "data");
    fs::create_dir_all(&again_dir).expect("the kubelet makes the new volume");
    stub.event(
        "ADDED",
        pod("db-0", DB_AGAIN, &[("diffkeeper.io/volumes", "data")]),
    );
    let status = early.0.wait().expect("restore-wait");
    assert!(status.success(), "restore-wait of the new pod: {status}");
    assert!(
        read_tree(&again_dir) == db_tree,
        "the re-created pod's volume holds its state when its app may start"
    );
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("restored") && log.contains("the directory was empty"),
        "{log}"
    );
}

#[test]
fn a_missing_kubeconfig_is_refused_and_an_unreachable_api_server_stops_no_target() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("data");
    fs::create_dir_all(&dir).expect("mkdir");
    let store = work.path().join("host.dk");
    let config = work.path().join("daemon.toml");
    let write = |kubeconfig: &Path| {
        fs::write(
            &config,
            format!(
                "[daemon]\nbackend = \"ebpf\"\nmetrics_addr = \"none\"\n\
                 [kubernetes]\nnode_name = \"node-1\"\nkubelet_root = \"{}\"\nstores = \"{}\"\nkubeconfig = \"{}\"\n\
                 [[target]]\nname = \"host\"\nstore = \"{}\"\nstate_dirs = [\"data={}\"]\ndebounce = \"50ms\"\n",
                s(&work.path().join("kubelet")),
                s(&work.path().join("stores")),
                s(kubeconfig),
                s(&store),
                s(&dir)
            ),
        )
        .expect("config");
    };
    let missing = work.path().join("no-such-kubeconfig");
    write(&missing);
    let out = common::diffkeeper(&["daemon", "--config", s(&config)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read the kubeconfig") && stderr.contains(s(&missing)),
        "{stderr}"
    );

    // An API server that is not there: logged and retried, while the
    // configured target captures.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let kubeconfig = work.path().join("kubeconfig");
    write_kubeconfig(&kubeconfig, &format!("127.0.0.1:{port}"));
    write(&kubeconfig);
    let daemon = Daemon::start(&config, &work.path().join("daemon.log"));
    daemon.wait_log(
        &["discovery: watching pods failed"],
        1,
        Duration::from_secs(30),
    );
    fs::write(dir.join("file"), "written while the API server is away").expect("write");
    wait_captured(&store, &dir, work.path(), "the configured target captures");
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn discovery_speaks_https_trusting_the_kubeconfig_ca_only() {
    let work = tempfile::tempdir().expect("tempdir");
    // A cluster CA and the API server's certificate signed by it, as a
    // cluster has them.
    let (ca, cert, key) = (
        work.path().join("ca.pem"),
        work.path().join("api.pem"),
        work.path().join("api-key.pem"),
    );
    let ext = work.path().join("api.ext");
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions");
    let script = format!(
        "set -e; cd {dir}
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=kubernetes-ca -keyout ca-key.pem -out {ca}
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=kube-apiserver -keyout {key} -out api.csr
         openssl x509 -req -in api.csr -CA {ca} -CAkey ca-key.pem -CAcreateserial -days 1 -extfile {ext} -out {cert}",
        dir = s(work.path()),
        ca = s(&ca),
        key = s(&key),
        ext = s(&ext),
        cert = s(&cert)
    );
    let made = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let stub = Stub::start_tls(&cert, &key);
    let dir = volume(&work.path().join("kubelet"), DB, "data");
    write_files(&dir, "tls", 3);
    stub.event(
        "ADDED",
        pod("db-0", DB, &[("diffkeeper.io/volumes", "data")]),
    );
    let config = work.path().join("daemon.toml");
    let kubeconfig = work.path().join("kubeconfig");
    fs::write(
        &config,
        format!(
            "[daemon]\nbackend = \"ebpf\"\nmetrics_addr = \"none\"\n\
             [defaults]\ndebounce = \"50ms\"\n\
             [kubernetes]\nnode_name = \"node-1\"\nkubelet_root = \"{}\"\nstores = \"{}\"\nkubeconfig = \"{}\"\n",
            s(&work.path().join("kubelet")),
            s(&work.path().join("stores")),
            s(&kubeconfig)
        ),
    )
    .expect("config");

    // Without the CA the server is not trusted: said, retried, no target.
    write_kubeconfig_for(&kubeconfig, &format!("server: https://{}", stub.addr));
    let daemon = Daemon::start(&config, &work.path().join("untrusted.log"));
    daemon.wait_log(
        &["discovery: watching pods failed"],
        1,
        Duration::from_secs(30),
    );
    assert!(!daemon.log().contains("pod(s) on node"), "{}", daemon.log());
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");

    // With it (as the service account's ca.crt), the pods are listed.
    write_kubeconfig_for(
        &kubeconfig,
        &format!(
            "server: https://{}\ncertificate-authority: {}",
            stub.addr,
            s(&ca)
        ),
    );
    let daemon = Daemon::start(&config, &work.path().join("daemon.log"));
    daemon.wait_log(
        &["discovery: 1 pod(s) on node node-1"],
        1,
        Duration::from_secs(30),
    );
    let store = work.path().join("stores/shop/db-0.dk");
    wait_captured(&store, &dir, work.path(), "the pod's volume captured");
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
}
