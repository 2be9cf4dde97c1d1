//! Kubernetes discovery: the daemon's targets from the pods of its own
//! node.
//!
//! The daemon lists and watches the pods whose `spec.nodeName` is its node
//! (kube-rs's watcher: one list, then a watch from its resource version,
//! with bookmarks; a dropped connection is watched again from the last
//! version seen, a `410 Gone` relists, and failures back off). A pod opts in
//! by annotation:
//!
//! | annotation | meaning |
//! |---|---|
//! | `diffkeeper.io/volumes: data,cache` | the pod's `emptyDir` volumes to capture |
//! | `diffkeeper.io/key: db` | the store's name within the namespace; default the pod's name, stable for a StatefulSet's pods |
//!
//! Each opted-in pod is one target, named `NAMESPACE.POD` (what an init
//! container passes to `restore-wait --target`), with the `[defaults]`
//! settings. Its store is `STORES/NAMESPACE/KEY.dk`: the key is scoped to
//! the pod's namespace, so no pod can name another namespace's store. A
//! volume's directory is the kubelet's
//! `KUBELET_ROOT/pods/UID/volumes/kubernetes.io~empty-dir/NAME`.
//!
//! A pod re-created with the same key (a StatefulSet's pod after a node
//! drain or a delete) gets a new uid and so new, empty volumes: the target
//! restarts on them, and `restore = "if-empty"` replays the store into
//! them before capture, which `restore-wait` in its init container waits
//! for, so its app starts on its state.
//!
//! The end of a pod is where the danger is: the kubelet tears its
//! `emptyDir` volumes down by deleting every file in them, and a capture
//! then would record the whole state deleted. So a pod that is ending
//! (deleted, or its phase `Succeeded` or `Failed`) is marked so, and its
//! capture loop stops without capturing once a process outside the pod's
//! cgroups writes the volumes (the kubelet); a pod gone from the API is
//! stopped without a final capture. The pod's own writes until then
//! (a database's shutdown checkpoint) are captured as always. The writer's
//! cgroup comes from the eBPF tracer; the inotify and scan backends do not
//! say who wrote.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt};

use super::config::{Kubernetes, Target};
use crate::error::{Context, Result};
use crate::roots::StateDir;

/// The annotation naming the volumes to capture.
pub const VOLUMES: &str = "diffkeeper.io/volumes";
/// The annotation naming the store within the namespace.
pub const KEY: &str = "diffkeeper.io/key";

/// The pod a discovered target is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What discovery knows of the node's opted-in pods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Discovered {
    /// Whether the first list has been read (until then no pod target is
    /// known, and none is stopped for being missing).
    pub listed: bool,
    /// The targets, by name.
    pub targets: BTreeMap<String, Target>,
    /// The names of the targets whose pod is ending.
    pub ending: BTreeSet<String>,
}

/// A Kubernetes name as a path component may hold it: lowercase letters,
/// digits, `-` and `.`, not starting with `.`, at most `max`.
fn is_dns_name(text: &str, max: usize) -> bool {
    !text.is_empty()
        && text.len() <= max
        && !text.starts_with('.')
        && !text.contains("..")
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
}

/// The target `pod` is, if it opts in; an error says why an opted-in pod
/// cannot be one (its annotation names no emptyDir volume, a bad key...).
pub fn pod_target(k: &Kubernetes, pod: &Pod) -> Result<Option<Target>, String> {
    let meta = &pod.metadata;
    let Some(volumes) = meta.annotations.as_ref().and_then(|a| a.get(VOLUMES)) else {
        return Ok(None);
    };
    let (Some(namespace), Some(name), Some(uid)) = (&meta.namespace, &meta.name, &meta.uid) else {
        return Err("the pod has no namespace, name or uid".to_string());
    };
    if !is_dns_name(namespace, 63) || !is_dns_name(name, 253) {
        return Err(format!("{namespace}/{name}: not a Kubernetes name"));
    }
    if !uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') || uid.is_empty() {
        return Err(format!("uid {uid:?}: not a pod uid"));
    }
    let key = match meta.annotations.as_ref().and_then(|a| a.get(KEY)) {
        Some(key) => key.trim(),
        None => name.as_str(),
    };
    if !is_dns_name(key, 253) {
        return Err(format!(
            "{KEY}: {key:?} is not a key (lowercase letters, digits, '-', '.'; a name within the pod's namespace)"
        ));
    }
    let target = format!("{namespace}.{name}");
    if !crate::roots::is_valid_name(&target) {
        return Err(format!(
            "the target name {target:?} is longer than 128 characters"
        ));
    }
    let spec_volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let pod_dir = k.kubelet_root.join("pods").join(uid);
    let mut roots: Vec<StateDir> = Vec::new();
    for volume in volumes.split(',').map(str::trim).filter(|v| !v.is_empty()) {
        if !is_dns_name(volume, 63) {
            return Err(format!("{VOLUMES}: {volume:?} is not a volume name"));
        }
        match spec_volumes.iter().find(|v| v.name == volume) {
            None => return Err(format!("{VOLUMES}: the pod has no volume {volume:?}")),
            Some(v) if v.empty_dir.is_none() => {
                return Err(format!(
                    "{VOLUMES}: volume {volume:?} is not an emptyDir (only emptyDir volumes are captured)"
                ))
            }
            Some(_) => {}
        }
        if roots.iter().any(|r| r.name == volume) {
            continue;
        }
        roots.push(StateDir {
            name: volume.to_string(),
            path: pod_dir
                .join("volumes")
                .join("kubernetes.io~empty-dir")
                .join(volume),
        });
    }
    if roots.is_empty() {
        return Err(format!("{VOLUMES} names no volume"));
    }
    Ok(Some(Target {
        name: target,
        store: k.stores.join(namespace).join(format!("{key}.dk")),
        roots,
        options: k.options.clone(),
        restore_if_empty: k.restore_if_empty,
        pod: Some(PodRef {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: uid.clone(),
        }),
    }))
}

/// Whether `pod` is on its way out: deleted, or done.
fn is_ending(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
        || pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
}

/// The pods seen, by uid, and what is reported of them.
#[derive(Default)]
struct Pods {
    by_uid: BTreeMap<String, Pod>,
    /// The error last logged for each refused pod, so it is said once.
    refused: HashMap<String, String>,
}

impl Pods {
    fn uid(pod: &Pod) -> String {
        pod.metadata.uid.clone().unwrap_or_default()
    }

    /// The targets of the pods, and which of them are ending. Two pods
    /// with one store (two with the same key in a namespace) cannot both
    /// capture into it: the older keeps it.
    fn discovered(&mut self, k: &Kubernetes) -> Discovered {
        let mut found = Discovered {
            listed: true,
            ..Discovered::default()
        };
        let mut pods: Vec<&Pod> = self.by_uid.values().collect();
        pods.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
        let mut stores: HashMap<PathBuf, String> = HashMap::new();
        let mut refused = HashMap::new();
        for pod in pods {
            let uid = Pods::uid(pod);
            let what = format!(
                "pod {}/{}",
                pod.metadata.namespace.as_deref().unwrap_or(""),
                pod.metadata.name.as_deref().unwrap_or("")
            );
            let target = match pod_target(k, pod) {
                Ok(Some(target)) => target,
                Ok(None) => continue,
                Err(why) => {
                    refused.insert(uid, format!("{what} is not captured: {why}"));
                    continue;
                }
            };
            if let Some(other) = stores.get(&target.store) {
                refused.insert(
                    uid,
                    format!(
                        "{what} is not captured: its store {} is target {other}'s (give it its own {KEY})",
                        target.store.display()
                    ),
                );
                continue;
            }
            stores.insert(target.store.clone(), target.name.clone());
            if is_ending(pod) {
                found.ending.insert(target.name.clone());
            }
            found.targets.insert(target.name.clone(), target);
        }
        for (uid, why) in &refused {
            if self.refused.get(uid) != Some(why) {
                tracing::error!("{why}");
            }
        }
        self.refused = refused;
        found
    }
}

/// The kube client `k` says: its kubeconfig file, or kube's inference.
/// Nothing is asked of the API server yet.
pub async fn client(k: &Kubernetes) -> Result<kube::Client> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}: no usable context", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes API found ($KUBECONFIG, ~/.kube/config, or the in-cluster service account)",
        )?,
    };
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)
        .with_context(|| format!("cannot make a client for the API server {server}"))?;
    tracing::info!(
        "discovery: watching the pods of node {} at {server}",
        k.node_name
    );
    Ok(client)
}

/// Watches the pods of `k.node_name` through `client` and sends what they
/// are as targets into `tx` after each change, until `tx` has no
/// receiver. Failures to reach the API server are logged and retried with
/// back-off; the targets already known keep capturing meanwhile.
pub async fn discover(
    k: Kubernetes,
    client: kube::Client,
    tx: tokio::sync::watch::Sender<Discovered>,
) {
    let pods: kube::Api<Pod> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", k.node_name));
    let mut events = watcher(pods, config).default_backoff().boxed();
    let mut seen = Pods::default();
    // The pods of a list being read, until its end replaces `seen`'s.
    let mut listing: Option<BTreeMap<String, Pod>> = None;
    let mut failing = false;
    loop {
        let event = tokio::select! {
            _ = tx.closed() => return,
            event = events.next() => event,
        };
        let Some(event) = event else {
            return;
        };
        let event = match event {
            Ok(event) => {
                // Init only says a list starts; the rest are answers.
                if failing && !matches!(event, watcher::Event::Init) {
                    tracing::info!("discovery: the API server answers again");
                    failing = false;
                }
                event
            }
            Err(e) => {
                // The watcher backs off and lists or watches again itself.
                tracing::warn!("discovery: watching pods failed: {e}; trying again (the targets known keep capturing)");
                failing = true;
                continue;
            }
        };
        match event {
            watcher::Event::Init => {
                listing = Some(BTreeMap::new());
                continue;
            }
            watcher::Event::InitApply(pod) => {
                if let Some(listing) = listing.as_mut() {
                    listing.insert(Pods::uid(&pod), pod);
                }
                continue;
            }
            watcher::Event::InitDone => {
                seen.by_uid = listing.take().unwrap_or_default();
                tracing::info!(
                    "discovery: {} pod(s) on node {}",
                    seen.by_uid.len(),
                    k.node_name
                );
            }
            watcher::Event::Apply(pod) => {
                seen.by_uid.insert(Pods::uid(&pod), pod);
            }
            watcher::Event::Delete(pod) => {
                seen.by_uid.remove(&Pods::uid(&pod));
            }
        }
        let found = seen.discovered(&k);
        tx.send_if_modified(|known| {
            let changed = *known != found;
            *known = found;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubernetes() -> Kubernetes {
        Kubernetes {
            node_name: "node-1".to_string(),
            kubelet_root: PathBuf::from("/var/lib/kubelet"),
            stores: PathBuf::from("/var/lib/diffkeeper/pods"),
            kubeconfig: None,
            options: Default::default(),
            restore_if_empty: true,
        }
    }

    fn pod(annotations: &[(&str, &str)], volumes: serde_json::Value) -> Pod {
        let annotations: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "db-0",
                "namespace": "shop",
                "uid": "1a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c5d",
                "annotations": annotations,
            },
            "spec": { "containers": [], "volumes": volumes },
        }))
        .expect("a pod")
    }

    #[test]
    fn an_annotated_pod_is_a_target_of_its_empty_dirs() {
        let volumes = serde_json::json!([
            { "name": "data", "emptyDir": {} },
            { "name": "cache", "emptyDir": { "medium": "Memory" } },
            { "name": "config", "configMap": { "name": "c" } },
        ]);
        let k = kubernetes();
        let target = pod_target(&k, &pod(&[(VOLUMES, "data, cache")], volumes.clone()))
            .expect("accepted")
            .expect("opted in");
        assert_eq!(target.name, "shop.db-0");
        assert_eq!(
            target.store,
            PathBuf::from("/var/lib/diffkeeper/pods/shop/db-0.dk")
        );
        let dirs: Vec<_> = target
            .roots
            .iter()
            .map(|r| (r.name.as_str(), r.path.clone()))
            .collect();
        assert_eq!(
            dirs,
            [
                ("data", PathBuf::from("/var/lib/kubelet/pods/1a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c5d/volumes/kubernetes.io~empty-dir/data")),
                ("cache", PathBuf::from("/var/lib/kubelet/pods/1a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c5d/volumes/kubernetes.io~empty-dir/cache")),
            ]
        );
        let keyed = pod_target(
            &k,
            &pod(&[(VOLUMES, "data"), (KEY, "orders")], volumes.clone()),
        )
        .expect("accepted")
        .expect("opted in");
        assert_eq!(
            keyed.store,
            PathBuf::from("/var/lib/diffkeeper/pods/shop/orders.dk")
        );
        assert_eq!(pod_target(&k, &pod(&[], volumes)), Ok(None), "not opted in");
    }

    #[test]
    fn a_bad_annotation_is_refused_with_its_reason() {
        let volumes = serde_json::json!([
            { "name": "data", "emptyDir": {} },
            { "name": "config", "configMap": { "name": "c" } },
        ]);
        let k = kubernetes();
        let refused =
            |annotations: &[(&str, &str)]| match pod_target(&k, &pod(annotations, volumes.clone()))
            {
                Err(why) => why,
                Ok(t) => panic!("accepted {annotations:?}: {t:?}"),
            };
        assert!(refused(&[(VOLUMES, "config")]).contains("not an emptyDir"));
        assert!(refused(&[(VOLUMES, "nothere")]).contains("no volume \"nothere\""));
        assert!(refused(&[(VOLUMES, "../../etc")]).contains("not a volume name"));
        assert!(refused(&[(VOLUMES, " , ")]).contains("names no volume"));
        // A key is a name within the namespace, never a path out of it.
        for key in ["../other/db", "other/db", "..", ".hidden", "UPPER"] {
            assert!(
                refused(&[(VOLUMES, "data"), (KEY, key)]).contains("is not a key"),
                "{key}"
            );
        }
    }

    #[test]
    fn two_pods_with_one_key_do_not_share_a_store() {
        let k = kubernetes();
        let volumes = serde_json::json!([{ "name": "data", "emptyDir": {} }]);
        let mut seen = Pods::default();
        let mut first = pod(&[(VOLUMES, "data"), (KEY, "db")], volumes.clone());
        first.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().expect("a time"),
            ));
        let mut second = pod(&[(VOLUMES, "data"), (KEY, "db")], volumes);
        second.metadata.name = Some("db-1".to_string());
        second.metadata.uid = Some("2a2b3c4d-5e6f-4a1b-8c9d-0e1f2a3b4c5d".to_string());
        second.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-02T00:00:00Z".parse().expect("a time"),
            ));
        second.metadata.deletion_timestamp = first.metadata.creation_timestamp.clone();
        for p in [&first, &second] {
            seen.by_uid.insert(Pods::uid(p), p.clone());
        }
        let found = seen.discovered(&k);
        assert_eq!(found.targets.keys().collect::<Vec<_>>(), ["shop.db-0"]);
        assert!(found.ending.is_empty());
        assert!(seen
            .refused
            .values()
            .any(|why| why.contains("target shop.db-0's")));
        seen.by_uid.remove(&Pods::uid(&first));
        let found = seen.discovered(&k);
        assert_eq!(found.targets.keys().collect::<Vec<_>>(), ["shop.db-1"]);
        assert!(found.ending.contains("shop.db-1"), "deleted: ending");
    }
}
