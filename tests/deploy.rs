//! What `deploy/` ships, checked for real:
//!
//! - the OCI image `cargo xtask image` builds (the command users run, given
//!   this test's binary) holds only the binary, its libraries and their
//!   directories, and runs under crun, a real OCI runtime: `--version`,
//!   then a snapshot of a bind-mounted `/data` into a bind-mounted
//!   `/store`, and a replay of it into another container's empty `/data`,
//!   compared on the host;
//! - every kustomization under `deploy/kubernetes/` renders with `kubectl
//!   kustomize` and every rendered manifest passes `kubernetes-validate`
//!   (Kubernetes 1.32 schemas, strict: an unknown field fails), which is
//!   shown to reject broken manifests; the DaemonSet grants what
//!   `deploy/README.md` says and no more; the daemon accepts the
//!   ConfigMap's `daemon.toml`; and every diffkeeper command line in the
//!   manifests uses only options the binary has.
//!
//! Root is needed (umoci unpacks with owners, crun makes namespaces);
//! `cargo xtask setup` installs umoci, crun and kubernetes-validate.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{assert_same_tree, read_tree, s, Rng, BIN};
use serde_json::{json, Value};

/// Where the image puts the binary (xtask/src/image.rs, deploy/Dockerfile).
const BINARY_IN_IMAGE: &str = "/usr/local/bin/diffkeeper";

/// The Kubernetes version the manifests are checked against: the kubectl
/// installed here.
const KUBERNETES_VERSION: &str = "1.32.0";

/// The kustomizations `deploy/README.md` describes; any other found under
/// `deploy/kubernetes/` is checked too.
const KUSTOMIZATIONS: [&str; 5] = [
    "base",
    "overlays/production",
    "overlays/example-statefulset",
    "examples/sidecar",
    "examples/replay-init",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the diffkeeper crate is in the workspace")
        .to_path_buf()
}

/// `<target>/tools/kubernetes-validate`, where `cargo xtask setup` puts
/// the validator's virtual environment (`<target>/release/diffkeeper` is
/// this test's binary).
fn validator_venv() -> PathBuf {
    let venv = Path::new(BIN)
        .ancestors()
        .nth(2)
        .expect("the binary is in <target>/release")
        .join("tools/kubernetes-validate");
    assert!(
        venv.join("bin/kubernetes-validate").is_file(),
        "kubernetes-validate is not installed in {}: run `cargo xtask setup`",
        venv.display()
    );
    venv
}

/// Runs a command to its end, panicking with its output unless it
/// succeeds.
fn run_ok(command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read_json(path: &Path) -> Value {
    let text = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

// ---------------------------------------------------------------- image

/// The files ldd lists for the binary (libraries and loader), with
/// the binary itself at its place: all the image may hold.
fn expected_image_files() -> BTreeSet<PathBuf> {
    let out = run_ok(Command::new("ldd").arg(BIN));
    let mut files: BTreeSet<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("libc.so.6")),
        "ldd lists no libc for {BIN}: {files:?}"
    );
    files.insert(PathBuf::from(BINARY_IN_IMAGE));
    files
}

/// Every entry under `rootfs` as an absolute path inside the image:
/// regular files with their sizes, and directories. Anything else fails.
fn image_entries(rootfs: &Path) -> (BTreeMap<PathBuf, u64>, BTreeSet<PathBuf>) {
    let (mut files, mut dirs) = (BTreeMap::new(), BTreeSet::new());
    let mut stack = vec![rootfs.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            let inside = Path::new("/").join(path.strip_prefix(rootfs).expect("under rootfs"));
            let meta = fs::symlink_metadata(&path).expect("lstat");
            // Any user may run the image (a pod's runAsUser).
            let mode = meta.permissions().mode() & 0o777;
            if meta.is_dir() {
                assert_eq!(mode, 0o755, "{} mode {mode:o}", inside.display());
                dirs.insert(inside);
                stack.push(path);
            } else if meta.is_file() {
                assert_eq!(mode & 0o444, 0o444, "{} mode {mode:o}", inside.display());
                files.insert(inside, meta.len());
            } else {
                panic!(
                    "the image holds {}, neither file nor directory",
                    inside.display()
                );
            }
        }
    }
    (files, dirs)
}

/// The manifest and config of the image tagged `tag` in `layout`, and the
/// total size of its blobs (manifest, config, layers) as a registry would
/// store them.
fn image_blobs(layout: &Path, tag: &str) -> (Value, Value, u64) {
    let blob = |digest: &str| {
        let (algorithm, hex) = digest.split_once(':').expect("algorithm:hex");
        layout.join("blobs").join(algorithm).join(hex)
    };
    let index = read_json(&layout.join("index.json"));
    let digest = index["manifests"]
        .as_array()
        .expect("index.json lists manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .and_then(|m| m["digest"].as_str())
        .unwrap_or_else(|| panic!("no image tagged {tag} in {}", layout.display()))
        .to_string();
    let manifest_path = blob(&digest);
    let manifest = read_json(&manifest_path);
    let config = read_json(&blob(
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    ));
    let layers = manifest["layers"].as_array().expect("layers");
    let mut bytes = fs::metadata(&manifest_path).expect("manifest").len();
    for descriptor in layers.iter().chain([&manifest["config"]]) {
        let path = blob(descriptor["digest"].as_str().expect("digest"));
        let size = fs::metadata(&path).expect("blob").len();
        assert_eq!(
            Some(size),
            descriptor["size"].as_u64(),
            "{} size",
            path.display()
        );
        bytes += size;
    }
    (manifest, config, bytes)
}

/// Whether `/sys/fs/cgroup/unified` is a cgroup2 mount (the hybrid layout).
fn hybrid_cgroups() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|line| {
            let mount_point = line.split_whitespace().nth(4);
            let fs_type = line
                .split_once(" - ")
                .and_then(|(_, rest)| rest.split_whitespace().next());
            mount_point == Some("/sys/fs/cgroup/unified") && fs_type == Some("cgroup2")
        })
}

/// An unpacked image and what runs containers from it.
struct Bundle {
    dir: PathBuf,
    /// `config.json` as umoci made it from the image's config.
    config: Value,
    /// crun's state directory (`--root`), private to this test.
    state: PathBuf,
    runs: usize,
}

impl Bundle {
    /// Runs one container: the image's entry point with `args`, the root
    /// file system read-only, host directories bind-mounted (inside path,
    /// host path); returns its output once it exits.
    fn run(&mut self, args: &[&str], mounts: &[(&str, &Path)]) -> Output {
        self.run_as(0, args, mounts)
    }

    /// [`Bundle::run`] as user (and group) `uid`.
    fn run_as(&mut self, uid: u32, args: &[&str], mounts: &[(&str, &Path)]) -> Output {
        let mut config = self.config.clone();
        let process = &mut config["process"];
        process["user"] = json!({"uid": uid, "gid": uid});
        let mut argv = process["args"].as_array().expect("process.args").clone();
        argv.extend(args.iter().map(|a| json!(a)));
        process["args"] = Value::Array(argv);
        process["terminal"] = json!(false);
        config["root"]["readonly"] = json!(true);
        let linux = &mut config["linux"];
        // The host's network: the container needs none, and a network
        // namespace of its own would only bring a loopback interface.
        let namespaces = linux["namespaces"].as_array_mut().expect("namespaces");
        namespaces.retain(|ns| ns["type"] != "network");
        // No cgroup of its own (crun runs with --cgroup-manager=disabled,
        // below): so no cgroup file system in it either.
        let list = config["mounts"].as_array_mut().expect("mounts");
        list.retain(|m| m["destination"] != "/sys/fs/cgroup");
        for (inside, host) in mounts {
            list.push(json!({
                "destination": inside,
                "type": "bind",
                "source": s(host),
                "options": ["rbind", "rw"],
            }));
        }
        let path = self.dir.join("config.json");
        fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("config.json");

        self.runs += 1;
        let name = format!("diffkeeper-deploy-{}-{}", std::process::id(), self.runs);
        let crun: Vec<String> = [
            "crun",
            "--cgroup-manager=disabled",
            "--root",
            s(&self.state),
            "run",
            "--bundle",
            s(&self.dir),
            &name,
        ]
        .map(String::from)
        .to_vec();
        // crun 1.8 refuses to start anything on a hybrid cgroup layout whose
        // cgroup2 hierarchy has controllers (this machine's has hugetlb),
        // cgroup manager or not. These containers need no cgroup: crun runs
        // in a mount namespace of its own where that mount is gone (the
        // host keeps it).
        let command = if hybrid_cgroups() {
            let mut command = Command::new("unshare");
            command.args(["--mount", "--propagation", "private", "sh", "-c"]);
            command.arg("umount -l /sys/fs/cgroup/unified && exec \"$@\"");
            command.arg("sh");
            command
        } else {
            Command::new("env")
        };
        // Bounded: a container that hangs fails the test instead.
        let out = Command::new("timeout")
            .args(["--kill-after=5", "30"])
            .arg(command.get_program())
            .args(command.get_args())
            .args(&crun)
            .stdin(Stdio::null())
            .output()
            .expect("run crun");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked"),
            "diffkeeper {args:?} panicked in the container: {stderr}"
        );
        out
    }
}

fn ok_in(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} in the container failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A state directory worth keeping: text, pseudo-random binary content
/// larger than a chunk, an empty file, nested directories, a symlink, and
/// modes other than the default.
fn fill(dir: &Path) {
    let mut rng = Rng::new(11);
    fs::create_dir_all(dir.join("region/r.0")).expect("mkdir");
    fs::write(dir.join("level.toml"), rng.text(3000)).expect("write");
    fs::write(dir.join("region/r.0/chunks.bin"), rng.bytes(1_300_000)).expect("write");
    fs::write(dir.join("region/empty"), b"").expect("write");
    fs::write(dir.join("secret.key"), rng.bytes(64)).expect("write");
    fs::set_permissions(dir.join("secret.key"), fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::set_permissions(dir.join("region/r.0"), fs::Permissions::from_mode(0o750)).expect("chmod");
    std::os::unix::fs::symlink("region/r.0/chunks.bin", dir.join("latest")).expect("symlink");
}

#[test]
fn image_holds_only_the_binary_and_runs_under_crun() {
    let work = tempfile::tempdir().expect("tempdir");
    let layout = work.path().join("oci");
    let tag = "deploy-test";

    // What users run, with this test's binary instead of a fresh build.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = run_ok(
        Command::new(cargo)
            .current_dir(workspace_root())
            .args(["xtask", "image", "--binary", BIN, "--tag", tag, "--out"])
            .arg(&layout),
    );
    let report = String::from_utf8_lossy(&built.stdout);
    assert!(
        report.contains("image size: "),
        "`cargo xtask image` did not print the image's size:\n{report}"
    );
    println!("{report}");

    // The image config: diffkeeper is the entry point, nothing else runs.
    let (manifest, config, image_bytes) = image_blobs(&layout, tag);
    assert_eq!(
        config["config"]["Entrypoint"],
        json!([BINARY_IN_IMAGE]),
        "entry point"
    );
    assert!(
        config["config"]["Cmd"].is_null() || config["config"]["Cmd"] == json!([]),
        "no default command: {}",
        config["config"]["Cmd"]
    );
    assert_eq!(
        manifest["layers"].as_array().map(Vec::len),
        Some(1),
        "one layer"
    );

    let bundle_dir = work.path().join("bundle");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{tag}", s(&layout)))
            .arg(&bundle_dir),
    );
    let rootfs = bundle_dir.join("rootfs");

    // Nothing but the binary, what ldd lists for it, and their directories.
    let expected = expected_image_files();
    let (files, dirs) = image_entries(&rootfs);
    assert_eq!(
        files.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "the image's files"
    );
    let expected_dirs: BTreeSet<PathBuf> = expected
        .iter()
        .flat_map(|f| f.ancestors().skip(1).map(Path::to_path_buf))
        .filter(|d| d != Path::new("/"))
        .collect();
    assert_eq!(dirs, expected_dirs, "the image's directories");
    // Small: the libraries add little to the binary, and the layer is
    // compressed (a stray copy of the unstripped binary, 65 MiB, or a base
    // image would fail these).
    let binary_bytes = files[Path::new(BINARY_IN_IMAGE)];
    let rootfs_bytes: u64 = files.values().sum();
    let built_bytes = fs::metadata(BIN).expect("binary").len();
    assert!(
        binary_bytes <= built_bytes,
        "the image's binary ({binary_bytes} bytes) is larger than {BIN} ({built_bytes})"
    );
    assert!(
        rootfs_bytes < 2 * binary_bytes,
        "rootfs {rootfs_bytes} bytes for a binary of {binary_bytes}"
    );
    assert!(
        image_bytes < binary_bytes,
        "image blobs {image_bytes} bytes for a binary of {binary_bytes}"
    );
    println!(
        "image: blobs {image_bytes} bytes, rootfs {rootfs_bytes} bytes, binary in it {binary_bytes} bytes, built binary {built_bytes} bytes"
    );

    let config = read_json(&bundle_dir.join("config.json"));
    assert_eq!(
        config["process"]["args"],
        json!([BINARY_IN_IMAGE]),
        "the runtime config umoci made from the image runs diffkeeper"
    );
    let state = work.path().join("crun");
    fs::create_dir(&state).expect("mkdir");
    let mut bundle = Bundle {
        dir: bundle_dir,
        config,
        state,
        runs: 0,
    };

    let version = bundle.run(&["--version"], &[]);
    assert_eq!(
        ok_in(&version, "diffkeeper --version"),
        format!("diffkeeper {}\n", env!("CARGO_PKG_VERSION"))
    );

    // As a pod with runAsUser: the image is readable and runnable by all.
    let nobody = bundle.run_as(65534, &["--version"], &[]);
    ok_in(&nobody, "diffkeeper --version as uid 65534");

    let data = work.path().join("data");
    let store = work.path().join("store");
    let fresh = work.path().join("fresh");
    for dir in [&data, &store, &fresh] {
        fs::create_dir(dir).expect("mkdir");
    }
    fill(&data);
    let snapshot = bundle.run(
        &[
            "snapshot",
            "--state-dir",
            "data=/data",
            "--store",
            "/store/s.dk",
        ],
        &[("/data", &data), ("/store", &store)],
    );
    let said = ok_in(&snapshot, "snapshot");
    assert!(said.contains("batch 1"), "snapshot said: {said}");
    assert!(store.join("s.dk").is_file(), "no store written on the host");

    // A new pod: the same store, an empty /data.
    let replay = bundle.run(
        &[
            "replay",
            "--state-dir",
            "data=/data",
            "--store",
            "/store/s.dk",
        ],
        &[("/data", &fresh), ("/store", &store)],
    );
    ok_in(&replay, "replay");
    assert_same_tree(&read_tree(&data), &read_tree(&fresh), "replayed in crun");

    let verify = bundle.run(&["verify", "--store", "/store/s.dk"], &[("/store", &store)]);
    ok_in(&verify, "verify");

    // The container's exit status is diffkeeper's: bad usage is 2.
    let refused = bundle.run(&["replay", "--no-such-option"], &[]);
    assert_eq!(refused.status.code(), Some(2), "bad usage in the container");
}

// ---------------------------------------------------------- manifests

/// Every directory under `deploy/kubernetes` with a kustomization.yaml;
/// fails on a file anywhere else there (it would be neither rendered nor
/// validated).
fn kustomizations(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let is_kustomization = dir.join("kustomization.yaml").is_file();
        if is_kustomization {
            found.push(dir.clone());
        }
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                assert!(
                    is_kustomization,
                    "{} is in no kustomization (no kustomization.yaml beside it)",
                    path.display()
                );
            }
        }
    }
    found.sort();
    found
}

/// YAML documents as JSON, through the validator's own PyYAML.
fn yaml_to_json(venv: &Path, yaml: &[u8]) -> Vec<Value> {
    let mut child = Command::new(venv.join("bin/python3"))
        .args([
            "-c",
            "import json, sys, yaml; \
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), yaml).expect("write yaml");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "not YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("json") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// `kubernetes-validate --strict` for Kubernetes 1.32 over `files`: its
/// exit status and output.
fn validate(venv: &Path, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(venv.join("bin/kubernetes-validate"))
        .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every diffkeeper command line in the rendered documents: containers
/// and init containers of a diffkeeper image (the image's entry point
/// first when only `args` is given) and exec hooks that call diffkeeper.
fn diffkeeper_command_lines(docs: &[Value]) -> Vec<(String, Vec<String>)> {
    let mut lines = Vec::new();
    for doc in docs {
        let Some(spec) = doc["spec"]["template"]["spec"].as_object() else {
            continue;
        };
        let containers = ["initContainers", "containers"]
            .iter()
            .filter_map(|key| spec.get(*key).and_then(Value::as_array))
            .flatten();
        for container in containers {
            let what = format!(
                "{} {} container {}",
                doc["kind"].as_str().unwrap_or("?"),
                doc["metadata"]["name"].as_str().unwrap_or("?"),
                container["name"].as_str().unwrap_or("?")
            );
            let image = container["image"].as_str().unwrap_or_default();
            if image.contains("/diffkeeper") {
                let mut argv = strings(&container["command"]);
                if argv.is_empty() {
                    argv.push(BINARY_IN_IMAGE.to_string());
                }
                argv.extend(strings(&container["args"]));
                lines.push((what.clone(), argv));
            }
            for hook in ["postStart", "preStop"] {
                let argv = strings(&container["lifecycle"][hook]["exec"]["command"]);
                if argv.first().is_some_and(|a| a.ends_with("diffkeeper")) {
                    lines.push((format!("{what} {hook}"), argv));
                }
            }
        }
    }
    lines
}

/// What the manifests already use of what the daemon is being taught
/// (issue 11): commands whose options are accepted until the binary has
/// the command (then they are checked like any other), and options
/// accepted until the command lists them.
const ANTICIPATED_COMMANDS: [&str; 0] = [];
const ANTICIPATED_OPTIONS: [(&str, &str); 0] = [];

/// Checks every option of every diffkeeper command line against
/// `diffkeeper COMMAND --help`.
fn check_options(lines: &[(String, Vec<String>)]) {
    let help = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .output()
            .expect("diffkeeper --help");
        assert!(out.status.success(), "diffkeeper {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let commands = help(&["--help"]);
    for (what, argv) in lines {
        assert!(
            argv[0] == "diffkeeper" || argv[0] == BINARY_IN_IMAGE,
            "{what}: runs {} (the image has {BINARY_IN_IMAGE}, on PATH as diffkeeper)",
            argv[0]
        );
        let command = argv.get(1).unwrap_or_else(|| panic!("{what}: no command"));
        let known = commands
            .lines()
            .any(|l| l.split_whitespace().next() == Some(command.as_str()));
        if !known {
            assert!(
                ANTICIPATED_COMMANDS.contains(&command.as_str()),
                "{what}: diffkeeper has no command {command}"
            );
            println!("{what}: `diffkeeper {command}` is anticipated (being built)");
            continue;
        }
        let text = help(&[command, "--help"]);
        for option in argv[2..].iter().filter(|a| a.starts_with("--")) {
            let option = option.split('=').next().unwrap_or_default();
            let listed = text.lines().any(|line| {
                line.split(|c: char| c.is_whitespace() || c == ',')
                    .any(|word| word == option)
            });
            if !listed {
                assert!(
                    ANTICIPATED_OPTIONS.contains(&(command.as_str(), option)),
                    "{what}: `diffkeeper {command}` has no option {option} (see its --help)"
                );
                println!("{what}: `diffkeeper {command} {option}` is anticipated (being built)");
            }
        }
    }
}

#[test]
fn kustomizations_render_and_validate() {
    let venv = validator_venv();
    let root = workspace_root().join("deploy/kubernetes");
    let work = tempfile::tempdir().expect("tempdir");

    let dirs = kustomizations(&root);
    let names: Vec<String> = dirs
        .iter()
        .map(|d| s(d.strip_prefix(&root).expect("under root")).to_string())
        .collect();
    for expected in KUSTOMIZATIONS {
        assert!(
            names.iter().any(|n| n == expected),
            "no kustomization at deploy/kubernetes/{expected} (found {names:?})"
        );
    }

    let mut rendered_files = Vec::new();
    let mut rendered: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut documents = 0;
    for (dir, name) in dirs.iter().zip(&names) {
        // Every file beside a kustomization.yaml is one of its inputs, so
        // none escapes rendering and validation.
        let kustomization = yaml_to_json(
            &venv,
            &fs::read(dir.join("kustomization.yaml")).expect("read"),
        );
        let listed: Vec<String> = kustomization
            .iter()
            .flat_map(|k| {
                let mut inputs = strings(&k["resources"]);
                inputs.extend(
                    k["patches"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p["path"].as_str().map(String::from)),
                );
                inputs.extend(
                    k["configMapGenerator"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|g| strings(&g["files"])),
                );
                inputs
            })
            .collect();
        for entry in fs::read_dir(dir).expect("list") {
            let path = entry.expect("entry").path();
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default()
                .to_string();
            if path.is_file() && file != "kustomization.yaml" {
                assert!(
                    listed.contains(&file),
                    "deploy/kubernetes/{name}/{file} is not used by its kustomization.yaml"
                );
            }
        }

        let out = run_ok(Command::new("kubectl").arg("kustomize").arg(dir));
        let docs = yaml_to_json(&venv, &out.stdout);
        assert!(!docs.is_empty(), "{name} renders nothing");
        documents += docs.len();
        let file = work.path().join(format!("{}.yaml", name.replace('/', "-")));
        fs::write(&file, &out.stdout).expect("write");
        rendered_files.push(file);
        rendered.insert(name.clone(), docs);
    }

    // Every document of every kustomization passes, each one named.
    let (passed, report) = validate(&venv, &rendered_files);
    assert!(passed, "the rendered manifests do not validate:\n{report}");
    let validated = report
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(
        validated, documents,
        "{documents} documents rendered, {validated} validated:\n{report}"
    );

    // The validator rejects what it should: an unknown field (strict), a
    // wrong type, in the real DaemonSet.
    let base = &rendered["base"];
    let mut typo = find(base, "DaemonSet", "diffkeeper").clone();
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = json!(true);
    let mut wrong_type = find(base, "DaemonSet", "diffkeeper").clone();
    wrong_type["spec"]["template"]["spec"]["hostPID"] = json!("yes");
    for (broken, needle) in [(typo, "privilegd"), (wrong_type, "hostPID")] {
        let file = work.path().join("broken.yaml");
        fs::write(&file, serde_json::to_vec_pretty(&broken).expect("json")).expect("write");
        let (passed, report) = validate(&venv, &[file]);
        assert!(
            !passed,
            "a DaemonSet with a bad {needle} passed validation:\n{report}"
        );
        assert!(
            report.contains(needle),
            "the rejection does not name {needle}:\n{report}"
        );
    }

    check_daemonset(base);

    // The daemon accepts the configuration the ConfigMap ships.
    let config = find(base, "ConfigMap", "diffkeeper-config")["data"]["daemon.toml"]
        .as_str()
        .expect("daemon.toml in the ConfigMap")
        .to_string();
    let config_file = work.path().join("daemon.toml");
    fs::write(&config_file, config).expect("write");
    // NODE_NAME as the DaemonSet's env gives it.
    let checked = run_ok(
        Command::new(BIN)
            .args(["daemon", "--config", s(&config_file), "--check"])
            .env("NODE_NAME", "node-1"),
    );
    let checked = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.contains("kubernetes: the pods of node node-1"),
        "the ConfigMap turns discovery on: {checked}"
    );

    // The opted-in StatefulSet: annotated, its volume an emptyDir, restored
    // before it starts through the daemon's socket.
    let game = find(
        &rendered["overlays/example-statefulset"],
        "StatefulSet",
        "game",
    );
    let template = &game["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"]["diffkeeper.io/volumes"],
        "world"
    );
    let volumes = template["spec"]["volumes"].as_array().expect("volumes");
    assert!(
        volumes
            .iter()
            .any(|v| v["name"] == "world" && v["emptyDir"].is_object()),
        "the world volume is an emptyDir"
    );
    let init = &template["spec"]["initContainers"][0];
    assert_eq!(
        strings(&init["args"])[..3],
        ["restore-wait", "--socket", "/run/diffkeeper/daemon.sock"]
    );
    assert!(volumes
        .iter()
        .any(|v| v["hostPath"]["path"] == "/run/diffkeeper"));

    let mut lines = Vec::new();
    for docs in rendered.values() {
        lines.extend(diffkeeper_command_lines(docs));
    }
    assert!(
        lines.len() >= 6,
        "diffkeeper command lines found: {lines:?}"
    );
    check_options(&lines);
}

/// The DaemonSet grants what deploy/README.md says, and no more.
fn check_daemonset(base: &[Value]) {
    let daemonset = find(base, "DaemonSet", "diffkeeper");
    assert_eq!(daemonset["metadata"]["namespace"], "diffkeeper");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "hostPID");
    assert!(pod["hostNetwork"].is_null(), "no host network");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(
        daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    assert_eq!(
        strings(&container["args"]),
        [
            "daemon",
            "--config",
            "/etc/diffkeeper/daemon.toml",
            "--metrics-addr",
            "0.0.0.0:9090"
        ]
    );
    let security = &container["securityContext"];
    assert_ne!(security["privileged"], true, "not privileged");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    let added: BTreeSet<String> = strings(&security["capabilities"]["add"])
        .into_iter()
        .collect();
    let wanted: BTreeSet<String> = [
        "BPF",
        "PERFMON",
        "SYS_ADMIN",
        "SYS_PTRACE",
        "DAC_READ_SEARCH",
        "DAC_OVERRIDE",
        "FOWNER",
        "CHOWN",
        "FSETID",
        "SETFCAP",
    ]
    .map(String::from)
    .into();
    assert_eq!(added, wanted, "capabilities");
    assert_eq!(container["resources"]["limits"]["memory"], "256Mi");
    assert_eq!(container["ports"][0]["name"], "metrics");
    assert_eq!(container["ports"][0]["containerPort"], 9090);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }

    // Host paths: exactly these, each mounted where the daemon looks.
    let mounts: BTreeMap<String, &Value> = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| (m["name"].as_str().expect("name").to_string(), m))
        .collect();
    let mut host_paths = BTreeMap::new();
    for volume in pod["volumes"].as_array().expect("volumes") {
        if let Some(path) = volume["hostPath"]["path"].as_str() {
            let mount = mounts[volume["name"].as_str().expect("name")];
            assert_eq!(
                mount["mountPath"], path,
                "{path} is mounted at its own path"
            );
            host_paths.insert(path.to_string(), mount);
        }
    }
    assert_eq!(
        host_paths.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "/run/diffkeeper",
            "/sys/fs/cgroup",
            "/sys/kernel/btf",
            "/sys/kernel/tracing",
            "/var/lib/diffkeeper",
            "/var/lib/kubelet/pods",
        ]
    );
    assert_eq!(host_paths["/sys/kernel/btf"]["readOnly"], true);
    assert_eq!(
        host_paths["/var/lib/kubelet/pods"]["mountPropagation"],
        "HostToContainer"
    );

    // RBAC: read pods, nothing else.
    let role = find(base, "ClusterRole", "diffkeeper");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    );
    let binding = find(base, "ClusterRoleBinding", "diffkeeper");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "diffkeeper", "namespace": "diffkeeper"}])
    );
    assert_eq!(pod["serviceAccountName"], "diffkeeper");
}
