//! Prometheus metrics, and the HTTP endpoint that serves them with the
//! health checks (`/metrics`, `/healthz`, `/readyz`).
//!
//! Every per-target series is labelled `target`; `target_pod_info` gives
//! a discovered target's `namespace`, `pod` and `pod_uid`, and
//! `writer_container_info` each container seen writing a target's
//! directories (join them `on (target)`). The counters count from
//! the daemon's start (a restarted target keeps counting); the store size
//! is the file's allocated size on disk, read after each batch and each
//! compaction. The tracer's own counters (writes it saw, events, ring
//! buffer overflows) are node-wide, copied in at each scrape.
//!
//! `/healthz` answers 200 while the process serves; `/readyz` answers 200
//! once every configured target has made its first start attempt (so a
//! pod is not marked ready before its start-up reconciliation ran), and
//! 503 naming the targets still starting otherwise.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::{AgentError, Context, Result};

/// A target's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: String,
}

/// The pod a discovered target is.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub target: String,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
}

/// A container seen writing a target's directories.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContainerLabels {
    pub target: String,
    pub container: String,
    pub runtime: String,
    pub pod_uid: String,
}

/// A target's info series: its pod's, and its writers' containers'.
type InfoSeries = (Vec<PodLabels>, Vec<ContainerLabels>);

type PerTarget<M> = Family<TargetLabels, M>;
type Histograms = Family<TargetLabels, Histogram, fn() -> Histogram>;
/// Reads the tracer's writes, events and ring-buffer overflows.
pub type TracerCounters = Box<dyn Fn() -> Option<[u64; 3]> + Send>;

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    notices: PerTarget<Counter>,
    batches: PerTarget<Counter>,
    dropped: PerTarget<Counter>,
    torn: PerTarget<Counter>,
    failures: PerTarget<Counter>,
    start_failures: PerTarget<Counter>,
    unreadable: PerTarget<Counter>,
    walks: PerTarget<Counter>,
    compactions: PerTarget<Counter>,
    logical_bytes: PerTarget<Counter>,
    stored_bytes: PerTarget<Counter>,
    store_size: PerTarget<Gauge>,
    up: PerTarget<Gauge>,
    capture_latency: Histograms,
    freeze_pause: Histograms,
    replay_duration: Histograms,
    pod_info: Family<PodLabels, Gauge>,
    writer_info: Family<ContainerLabels, Gauge>,
    /// Each target's info series, to remove with it.
    info: Mutex<std::collections::HashMap<String, InfoSeries>>,
    tracer_writes: Gauge,
    tracer_events: Gauge,
    ringbuf_full: Gauge,
    /// Reads the tracer's counters at each scrape, when one runs.
    tracer: Mutex<Option<TracerCounters>>,
    /// Targets whose first start attempt has not ended yet.
    starting: Mutex<std::collections::BTreeSet<String>>,
}

fn latency_histogram() -> Histogram {
    // 5 ms to about 25 s, each bound half again the last: a debounce of
    // 300 ms puts most captures near the middle, --max-latency (3 s) under
    // continuous writes above it, a store held by another process at the
    // top.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.005, 1.5, 22,
    ))
}

fn pause_histogram() -> Histogram {
    // 50 µs to about 0.8 s: --max-pause is 200 ms by default.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 15,
    ))
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("diffkeeper");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let family = PerTarget::<Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let notices = counter(
            &mut registry,
            "notices",
            "Write notices the backend reported for the target's directories",
        );
        let batches = counter(&mut registry, "batches", "Batches committed");
        let dropped = counter(
            &mut registry,
            "batches_dropped",
            "Batches dropped because their tree was written while read (taken again later)",
        );
        let torn = counter(
            &mut registry,
            "batches_torn",
            "Batches committed marked torn (not one instant)",
        );
        let failures = counter(
            &mut registry,
            "capture_failures",
            "Captures that failed and were retried",
        );
        let start_failures = counter(
            &mut registry,
            "start_failures",
            "Start attempts of the target that failed and were retried",
        );
        let unreadable = counter(
            &mut registry,
            "unreadable_files",
            "Files left out of a batch because they could not be read whole",
        );
        let walks = counter(
            &mut registry,
            "tree_walks",
            "Captures that walked a whole tree (start-up, rescans, changes to entries)",
        );
        let compactions = counter(
            &mut registry,
            "compactions",
            "Retention compactions applied",
        );
        let logical_bytes = counter(
            &mut registry,
            "logical_bytes",
            "Bytes of file content changed, as the files hold them",
        );
        let stored_bytes = counter(
            &mut registry,
            "stored_bytes",
            "Bytes the store took for them after deltas and compression",
        );
        let store_size = PerTarget::<Gauge>::default();
        registry.register(
            "store_size_bytes",
            "The store file's allocated size on disk",
            store_size.clone(),
        );
        let up = PerTarget::<Gauge>::default();
        registry.register(
            "target_up",
            "1 while the target captures, 0 while it cannot start",
            up.clone(),
        );
        let capture_latency = Histograms::new_with_constructor(latency_histogram);
        registry.register(
            "capture_latency_seconds",
            "From a batch's first unsaved write to its commit",
            capture_latency.clone(),
        );
        let freeze_pause = Histograms::new_with_constructor(pause_histogram);
        registry.register(
            "freeze_pause_seconds",
            "How long the writers were frozen for a batch",
            freeze_pause.clone(),
        );
        let replay_duration = Histograms::new_with_constructor(latency_histogram);
        registry.register(
            "replay_duration_seconds",
            "How long restoring a target's empty directories from its store took",
            replay_duration.clone(),
        );
        let pod_info = Family::<PodLabels, Gauge>::default();
        registry.register(
            "target_pod_info",
            "The pod a target discovered from Kubernetes is (always 1)",
            pod_info.clone(),
        );
        let writer_info = Family::<ContainerLabels, Gauge>::default();
        registry.register(
            "writer_container_info",
            "A container seen writing the target's directories (always 1)",
            writer_info.clone(),
        );
        let tracer_writes = Gauge::default();
        registry.register(
            "tracer_writes",
            "Writes to watched trees the eBPF programs saw (node-wide, since the daemon started)",
            tracer_writes.clone(),
        );
        let tracer_events = Gauge::default();
        registry.register(
            "tracer_events",
            "Events the eBPF programs sent through their ring buffer",
            tracer_events.clone(),
        );
        let ringbuf_full = Gauge::default();
        registry.register(
            "ringbuf_drops",
            "Events the ring buffer had no room for (every tree is walked then)",
            ringbuf_full.clone(),
        );
        Arc::new(Metrics {
            registry,
            notices,
            batches,
            dropped,
            torn,
            failures,
            start_failures,
            unreadable,
            walks,
            compactions,
            logical_bytes,
            stored_bytes,
            store_size,
            up,
            capture_latency,
            freeze_pause,
            replay_duration,
            pod_info,
            writer_info,
            info: Mutex::new(Default::default()),
            tracer_writes,
            tracer_events,
            ringbuf_full,
            tracer: Mutex::new(None),
            starting: Mutex::new(Default::default()),
        })
    }

    /// The metrics of target `name`.
    pub fn target(self: &Arc<Metrics>, name: &str) -> TargetMetrics {
        TargetMetrics {
            metrics: self.clone(),
            labels: TargetLabels {
                target: name.to_string(),
            },
        }
    }

    /// Where the tracer's counters (writes, events, ring-buffer
    /// overflows) are read at each scrape.
    pub fn set_tracer(&self, read: TracerCounters) {
        if let Ok(mut slot) = self.tracer.lock() {
            *slot = Some(read);
        }
    }

    /// Targets not yet through their first start attempt: `/readyz` is 503
    /// until there are none.
    pub fn set_starting(&self, names: impl IntoIterator<Item = String>) {
        if let Ok(mut starting) = self.starting.lock() {
            starting.extend(names);
        }
    }

    /// Forgets a removed target's series.
    pub fn remove(&self, name: &str) {
        let labels = TargetLabels {
            target: name.to_string(),
        };
        for family in [
            &self.notices,
            &self.batches,
            &self.dropped,
            &self.torn,
            &self.failures,
            &self.start_failures,
            &self.unreadable,
            &self.walks,
            &self.compactions,
            &self.logical_bytes,
            &self.stored_bytes,
        ] {
            family.remove(&labels);
        }
        self.store_size.remove(&labels);
        self.up.remove(&labels);
        self.capture_latency.remove(&labels);
        self.freeze_pause.remove(&labels);
        self.replay_duration.remove(&labels);
        if let Some((pods, writers)) = self.info.lock().ok().and_then(|mut i| i.remove(name)) {
            for labels in pods {
                self.pod_info.remove(&labels);
            }
            for labels in writers {
                self.writer_info.remove(&labels);
            }
        }
        if let Ok(mut starting) = self.starting.lock() {
            starting.remove(name);
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        if let Ok(read) = self.tracer.lock() {
            if let Some([writes, events, full]) = read.as_ref().and_then(|read| read()) {
                let set =
                    |gauge: &Gauge, value: u64| gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
                set(&self.tracer_writes, writes);
                set(&self.tracer_events, events);
                set(&self.ringbuf_full, full);
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("cannot encode the metrics: {e}");
        }
        out
    }

    /// `None` when ready, else the targets still starting.
    fn unready(&self) -> Option<String> {
        let starting = self.starting.lock().ok()?;
        (!starting.is_empty()).then(|| starting.iter().cloned().collect::<Vec<_>>().join(", "))
    }
}

/// One target's handle on the metrics.
#[derive(Clone)]
pub struct TargetMetrics {
    metrics: Arc<Metrics>,
    labels: TargetLabels,
}

impl TargetMetrics {
    pub fn notice(&self) {
        self.metrics.notices.get_or_create(&self.labels).inc();
    }

    /// A batch committed, its first unsaved write `latency` ago.
    pub fn batch(&self, summary: &crate::capture::BatchSummary, latency: Option<Duration>) {
        let m = &self.metrics;
        m.batches.get_or_create(&self.labels).inc();
        m.logical_bytes
            .get_or_create(&self.labels)
            .inc_by(summary.logical_bytes);
        m.stored_bytes
            .get_or_create(&self.labels)
            .inc_by(summary.stored_bytes);
        if let Some(latency) = latency {
            m.capture_latency
                .get_or_create(&self.labels)
                .observe(latency.as_secs_f64());
        }
        if let Some(cut) = &summary.cut {
            if cut.pause_us > 0 {
                m.freeze_pause
                    .get_or_create(&self.labels)
                    .observe(cut.pause_us as f64 / 1e6);
            }
            if cut.kind == crate::store::schema::CutKind::Torn {
                m.torn.get_or_create(&self.labels).inc();
            }
        }
        if summary
            .looked
            .values()
            .any(|looked| looked.inodes.is_some())
        {
            m.walks.get_or_create(&self.labels).inc();
        }
    }

    /// Batches committed before these metrics were kept (a start-up
    /// capture).
    pub fn add_batches(&self, batches: u64) {
        self.metrics
            .batches
            .get_or_create(&self.labels)
            .inc_by(batches);
    }

    /// A restore of the target's empty directories took `took`.
    pub fn replayed(&self, took: Duration) {
        self.metrics
            .replay_duration
            .get_or_create(&self.labels)
            .observe(took.as_secs_f64());
    }

    pub fn dropped(&self) {
        self.metrics.dropped.get_or_create(&self.labels).inc();
    }

    pub fn failed(&self) {
        self.metrics.failures.get_or_create(&self.labels).inc();
    }

    pub fn unreadable(&self, files: u64) {
        self.metrics
            .unreadable
            .get_or_create(&self.labels)
            .inc_by(files);
    }

    pub fn compacted(&self) {
        self.metrics.compactions.get_or_create(&self.labels).inc();
    }

    /// The store's allocated size (its file and payload segments), read
    /// now.
    pub fn store_size(&self, store: &std::path::Path) {
        if store.exists() {
            let (_, bytes) = diffkeeper_engine::store::disk_usage(store);
            self.metrics
                .store_size
                .get_or_create(&self.labels)
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// The target is pod `namespace/pod` (uid `pod_uid`).
    pub fn pod(&self, namespace: &str, pod: &str, pod_uid: &str) {
        let labels = PodLabels {
            target: self.labels.target.clone(),
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            pod_uid: pod_uid.to_string(),
        };
        self.metrics.pod_info.get_or_create(&labels).set(1);
        if let Ok(mut info) = self.metrics.info.lock() {
            let (pods, _) = info.entry(self.labels.target.clone()).or_default();
            if !pods.contains(&labels) {
                pods.push(labels);
            }
        }
    }

    /// `container` writes the target's directories.
    pub fn writer(&self, container: &crate::containers::Container) {
        let labels = ContainerLabels {
            target: self.labels.target.clone(),
            container: container.id.clone(),
            runtime: container.runtime.to_string(),
            pod_uid: container.pod_uid.clone().unwrap_or_default(),
        };
        self.metrics.writer_info.get_or_create(&labels).set(1);
        if let Ok(mut info) = self.metrics.info.lock() {
            let (_, writers) = info.entry(self.labels.target.clone()).or_default();
            if !writers.contains(&labels) {
                writers.push(labels);
            }
        }
    }

    /// Whether the target captures (after a start) or cannot start; either
    /// ends its first start attempt.
    pub fn up(&self, up: bool) {
        self.metrics
            .up
            .get_or_create(&self.labels)
            .set(i64::from(up));
        if !up {
            self.metrics
                .start_failures
                .get_or_create(&self.labels)
                .inc();
        }
        if let Ok(mut starting) = self.metrics.starting.lock() {
            starting.remove(&self.labels.target);
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the task is
/// aborted; returns the address bound (a port of 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Failed {
            what: format!("cannot serve metrics on {addr} (--metrics-addr; `none` turns them off)"),
            source: Box::new(source),
        })?;
    let bound = listener
        .local_addr()
        .context("cannot read the metrics address")?;
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&metrics, &request)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!("metrics: a connection ended: {e}");
                }
            });
        }
    });
    Ok((bound, task))
}

fn respond<B>(metrics: &Metrics, request: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (&hyper::Method::GET, "/healthz") => (200, "text/plain", "ok\n".to_string()),
        (&hyper::Method::GET, "/readyz") => match metrics.unready() {
            None => (200, "text/plain", "ready\n".to_string()),
            Some(targets) => (503, "text/plain", format!("starting: {targets}\n")),
        },
        (&hyper::Method::GET, _) => (
            404,
            "text/plain",
            "not found: /metrics, /healthz, /readyz\n".to_string(),
        ),
        _ => (405, "text/plain", "only GET\n".to_string()),
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
