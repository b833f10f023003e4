//! The InfluxDB 2 backend against a real VictoriaMetrics server, which accepts InfluxDB's
//! `/api/v2/write`: every point must arrive with its name, tags, value and timestamp,
//! including points written while the server was stopped, before it first started, and
//! while Stonelion restarted. A local HTTP receiver counts requests for the batching
//! tests and returns 400 or 401 where VictoriaMetrics cannot.
//!
//! Needs the `victoria-metrics` binary (Debian package `victoria-metrics`); without it the
//! tests that start it fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;

use stonelion::metrics::SharedRegistry;
use stonelion::model::{Timestamp, Value};
use stonelion::storage::influxdb2::{InfluxDb2Config, InfluxDb2Store};
use stonelion::storage::{Point, SeriesKey, TimeSeriesStore};

const DEADLINE: Duration = Duration::from_secs(60);

fn victoria_metrics_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("victoria-metrics"))
        .find(|candidate| candidate.is_file())
        .expect("victoria-metrics binary not found: install the Debian package victoria-metrics")
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.local_addr().expect("local address").port()
}

struct Victoria {
    child: tokio::process::Child,
    base: String,
}

async fn start_victoria(port: u16, data: &Path) -> Victoria {
    let child = tokio::process::Command::new(victoria_metrics_binary())
        .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .arg(format!("-storageDataPath={}", data.display()))
        .arg("-retentionPeriod=100y")
        // Queries hide the last 30 s of data by default; the test reads fresh points.
        .arg("-search.latencyOffset=0s")
        .arg("-search.disableCache")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("victoria-metrics starts");
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        let healthy = reqwest::get(format!("{base}/health"))
            .await
            .is_ok_and(|r| r.status().is_success());
        if healthy {
            return Victoria { child, base };
        }
        assert!(
            started.elapsed() < DEADLINE,
            "victoria-metrics did not become healthy on {base}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops the server with SIGTERM, so it writes its buffered samples to disk first; a
/// SIGKILL can lose samples it had accepted.
async fn stop_victoria(victoria: &mut Victoria) {
    let pid = victoria.child.id().expect("victoria-metrics is running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "SIGTERM to victoria-metrics failed");
    let exited = tokio::time::timeout(DEADLINE, victoria.child.wait()).await;
    exited
        .expect("victoria-metrics stops within the deadline")
        .expect("wait for exit");
}

fn config(url: &str, buffer: &Path) -> InfluxDb2Config {
    let text = format!(
        "url = \"{url}\"\norg = \"plant\"\nbucket = \"stonelion\"\nbuffer_dir = \"{}\"\n\
         flush_interval = \"100ms\"\nretry_initial_backoff = \"100ms\"\nretry_max_backoff = \"500ms\"\n\
         request_timeout = \"2s\"\nbatch_size = 7\ntoken = \"test-token\"",
        buffer.display()
    );
    toml::from_str(&text).expect("test config parses")
}

fn gas_point(device: &str, ts: i64, value: f64) -> Point {
    let tags = vec![
        ("site".to_owned(), "plant-a".to_owned()),
        ("device".to_owned(), device.to_owned()),
        ("site_kind".to_owned(), "enterprise".to_owned()),
    ];
    Point {
        series: SeriesKey::new("gas-detector", tags, "gas_lel"),
        ts: Timestamp(ts),
        value: Value::Number(value),
    }
}

/// Exported samples keyed by (device, timestamp), after the checks on name and tags.
async fn exported(base: &str) -> BTreeMap<(String, i64), f64> {
    let client = reqwest::Client::new();
    let _ = client
        .get(format!("{base}/internal/force_flush"))
        .send()
        .await;
    let response = client
        .get(format!("{base}/api/v1/export"))
        .query(&[("match[]", "{__name__=~\"gas-detector_.*\"}")])
        .send()
        .await
        .expect("export request");
    let text = response.text().await.expect("export body");
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let series: serde_json::Value = serde_json::from_str(line).expect("export line is JSON");
        let metric = &series["metric"];
        assert_eq!(
            metric["__name__"], "gas-detector_gas_lel",
            "metric name in {line}"
        );
        assert_eq!(metric["site"], "plant-a", "site tag in {line}");
        assert_eq!(metric["site_kind"], "enterprise", "site_kind tag in {line}");
        let device = metric["device"].as_str().expect("device tag").to_owned();
        let values = series["values"].as_array().expect("values");
        let timestamps = series["timestamps"].as_array().expect("timestamps");
        for (value, ts) in values.iter().zip(timestamps) {
            samples.insert(
                (device.clone(), ts.as_i64().expect("timestamp")),
                value.as_f64().expect("value"),
            );
        }
    }
    samples
}

async fn wait_for_all(base: &str, expected: &BTreeMap<(String, i64), f64>) {
    let started = Instant::now();
    loop {
        let samples = exported(base).await;
        if expected
            .iter()
            .all(|(key, value)| samples.get(key) == Some(value))
        {
            return;
        }
        let missing = expected
            .keys()
            .filter(|k| !samples.contains_key(*k))
            .count();
        assert!(
            started.elapsed() < DEADLINE,
            "{missing} of {} points missing from VictoriaMetrics",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Returns the value of a metric in OpenMetrics text, or `None` when it is missing.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

fn metric(registry: &SharedRegistry, name: &str) -> u64 {
    metric_value(&registry.encode(), name).map_or(0, |v| v as u64)
}

fn failed_requests(registry: &SharedRegistry) -> u64 {
    metric(registry, "stonelion_influxdb2_failed_requests_total")
}

/// Log lines of every test in this binary, captured by a global subscriber so the sender
/// thread's lines are included.
fn logs() -> String {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let buffer = LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buffer);
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .init();
        buffer
    });
    String::from_utf8_lossy(&buffer.lock().expect("log buffer")).into_owned()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A local stand-in for InfluxDB's write endpoint that records every request. It returns
/// 400 to a body with a line that does not parse, and the status in `forced_status`
/// when that is not 0.
#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<String>>>,
    accepted_lines: Arc<Mutex<Vec<String>>>,
    forced_status: Arc<AtomicU16>,
}

impl Receiver {
    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
    fn accepted_lines(&self) -> Vec<String> {
        self.accepted_lines.lock().expect("lines").clone()
    }
}

async fn receive(State(receiver): State<Receiver>, body: String) -> StatusCode {
    receiver
        .requests
        .lock()
        .expect("requests")
        .push(body.clone());
    let forced = receiver.forced_status.load(Ordering::SeqCst);
    if forced != 0 {
        return StatusCode::from_u16(forced).expect("valid status");
    }
    if influxdb_line_protocol::parse_lines(&body).any(|line| line.is_err()) {
        return StatusCode::BAD_REQUEST;
    }
    let lines = body.lines().filter(|l| !l.is_empty()).map(str::to_owned);
    receiver.accepted_lines.lock().expect("lines").extend(lines);
    StatusCode::NO_CONTENT
}

async fn start_receiver() -> (String, Receiver) {
    let receiver = Receiver::default();
    let app = axum::Router::new()
        .route("/api/v2/write", axum::routing::post(receive))
        .route("/health", axum::routing::get(|| async { "ok" }))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://127.0.0.1:{}", addr.port()), receiver)
}

/// Builds a config for the local receiver, with plain bodies and the given batching.
fn receiver_config(
    url: &str,
    buffer: &Path,
    batch_size: usize,
    flush_interval: &str,
) -> InfluxDb2Config {
    let text = format!(
        "url = \"{url}\"\norg = \"plant\"\nbucket = \"stonelion\"\nbuffer_dir = \"{}\"\n\
         flush_interval = \"{flush_interval}\"\nretry_initial_backoff = \"50ms\"\n\
         retry_max_backoff = \"200ms\"\nrequest_timeout = \"2s\"\nbatch_size = {batch_size}\n\
         token = \"{RECEIVER_TOKEN}\"\ngzip = false",
        buffer.display()
    );
    toml::from_str(&text).expect("test config parses")
}

const RECEIVER_TOKEN: &str = "receiver-token-8c1f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_survive_outage_and_restart() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("victoria");
    let buffer = temp.path().join("buffer");
    let port = free_port();
    let mut victoria = start_victoria(port, &data).await;

    let registry = SharedRegistry::new();
    let store =
        InfluxDb2Store::open(config(&victoria.base, &buffer), &registry).expect("backend opens");
    let now = chrono::Utc::now().timestamp_millis();
    let mut expected = BTreeMap::new();
    let online: Vec<Point> = (0..20)
        .map(|i| gas_point("gas-01", now - 60_000 + i * 1_000, 10.0 + i as f64 / 4.0))
        .collect();
    for p in &online {
        expected.insert(("gas-01".to_owned(), p.ts.0), p.value.as_f64());
    }
    store.write(online).expect("write while up");
    wait_for_all(&victoria.base, &expected).await;

    stop_victoria(&mut victoria).await;
    let offline: Vec<Point> = (0..20)
        .map(|i| gas_point("gas-02", now - 30_000 + i * 1_000, 30.0 + i as f64))
        .collect();
    for p in &offline {
        expected.insert(("gas-02".to_owned(), p.ts.0), p.value.as_f64());
    }
    store.write(offline).expect("write while down is buffered");
    let started = Instant::now();
    while failed_requests(&registry) == 0 {
        assert!(
            started.elapsed() < DEADLINE,
            "the backend never tried to send while the server was down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        store.pending_bytes() > 0,
        "points written during the outage are buffered"
    );
    drop(store);

    let victoria = start_victoria(port, &data).await;
    let restarted = InfluxDb2Store::open(config(&victoria.base, &buffer), &SharedRegistry::new())
        .expect("backend reopens");
    wait_for_all(&victoria.base, &expected).await;
    let started = Instant::now();
    while restarted.pending_bytes() > 0 {
        assert!(started.elapsed() < DEADLINE, "the buffer never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a whole server with the given backend and InfluxDB URL, with one gas detector.
async fn start_server(backend: &str, url: &str, data_dir: &Path) -> stonelion::server::Server {
    let text = format!(
        r#"
[storage]
backend = "{backend}"

[storage.influxdb2]
url = "{url}"
org = "plant"
bucket = "stonelion"
token = "test-token"
flush_interval = "100ms"
retry_initial_backoff = "100ms"
retry_max_backoff = "500ms"
request_timeout = "2s"

[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"
"#
    );
    let mut config =
        stonelion::config::parse(&text, stonelion::config::builtin::builtin_profiles())
            .expect("server config parses");
    config.server.data_dir = data_dir.to_path_buf();
    config.server.http_listen = "127.0.0.1:0".parse().expect("address");
    config.server.mqtt_listen = "127.0.0.1:0".parse().expect("address");
    stonelion::server::Server::start(config, std::sync::Arc::new(stonelion::clock::SystemClock))
        .await
        .expect("server starts")
}

async fn server_metrics(http: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("metrics request")
        .text()
        .await
        .expect("metrics body")
}

/// The server starts while VictoriaMetrics is down, reports the outage, and delivers the
/// readings written meanwhile once VictoriaMetrics starts, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_starts_while_victoria_down() {
    logs();
    let temp = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let server = start_server("influxdb2", &url, &temp.path().join("data")).await;
    let http = server.http_addr;

    let now = chrono::Utc::now().timestamp_millis();
    let mut expected = BTreeMap::new();
    let mut body = String::new();
    for i in 0..10 {
        let ts = now - 10_000 + i * 1_000;
        let value = 5.0 + i as f64 / 2.0;
        body.push_str(&format!(
            "gas-detector,site=plant-a,device=gas-01 gas_lel={value} {ts}\n"
        ));
        expected.insert(("gas-01".to_owned(), ts), value);
    }
    let response = reqwest::Client::new()
        .post(format!(
            "http://{http}/api/v2/write?bucket=stonelion&precision=ms"
        ))
        .body(body)
        .send()
        .await
        .expect("write request");
    assert_eq!(response.status(), 204);

    let started = Instant::now();
    loop {
        let text = server_metrics(http).await;
        let up = metric_value(&text, "stonelion_influxdb2_up");
        let buffered = metric_value(&text, "stonelion_influxdb2_buffer_bytes").unwrap_or(0.0);
        let failed =
            metric_value(&text, "stonelion_influxdb2_failed_requests_total").unwrap_or(0.0);
        if up == Some(0.0) && buffered > 0.0 && failed > 0.0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "metrics do not show the outage:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = logs();
    assert!(
        log.contains("InfluxDB is unreachable; points are buffered on disk"),
        "no log line reports the outage:\n{log}"
    );

    let victoria = start_victoria(port, &temp.path().join("victoria")).await;
    wait_for_all(&victoria.base, &expected).await;
    let started = Instant::now();
    loop {
        let text = server_metrics(http).await;
        let up = metric_value(&text, "stonelion_influxdb2_up");
        let buffered = metric_value(&text, "stonelion_influxdb2_buffer_bytes");
        if up == Some(1.0) && buffered == Some(0.0) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the buffer never drained:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

/// A small buffer fills while VictoriaMetrics is down: the oldest points are dropped,
/// counted and logged, and exactly the rest arrive once it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_drops_oldest() {
    logs();
    let temp = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let config = InfluxDb2Config {
        buffer_max_bytes: 64 * 1024,
        ..config(&url, &temp.path().join("buffer"))
    };
    let registry = SharedRegistry::new();
    let store = InfluxDb2Store::open(config, &registry).expect("backend opens");
    let now = chrono::Utc::now().timestamp_millis();
    let total = 3_000;
    let points: Vec<Point> = (0..total)
        .map(|i| gas_point("gas-03", now - 4_000_000 + i * 1_000, i as f64))
        .collect();
    for chunk in points.chunks(100) {
        store
            .write(chunk.to_vec())
            .expect("write while down is buffered");
    }
    let dropped = metric(&registry, "stonelion_influxdb2_dropped_points_total");
    assert!(dropped > 0, "no points were dropped");
    assert!(dropped < total as u64, "every point was dropped");
    assert!(
        store.pending_bytes() <= 64 * 1024,
        "buffer exceeds its limit"
    );
    let log = logs();
    assert!(
        log.contains("influxdb2 buffer is full; dropped its oldest points"),
        "no log line reports the drops:\n{log}"
    );

    let victoria = start_victoria(port, &temp.path().join("victoria")).await;
    let kept = total as u64 - dropped;
    let started = Instant::now();
    let samples = loop {
        let samples = exported(&victoria.base).await;
        if samples.len() as u64 >= kept && store.pending_bytes() == 0 {
            break samples;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{} of {kept} kept points arrived",
            samples.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        samples.len() as u64,
        kept,
        "arrived points != written - dropped"
    );
    let newest = points.last().expect("points");
    assert_eq!(
        samples.get(&("gas-03".to_owned(), newest.ts.0)),
        Some(&newest.value.as_f64()),
        "the newest point arrived"
    );
    assert!(
        !samples.contains_key(&("gas-03".to_owned(), points[0].ts.0)),
        "the oldest point was dropped"
    );
    for point in &points[(total as usize - kept as usize)..] {
        assert_eq!(
            samples.get(&("gas-03".to_owned(), point.ts.0)),
            Some(&point.value.as_f64()),
            "kept point at {} arrived",
            point.ts.0
        );
    }
}

/// With a long flush_interval, a batch is sent as soon as it has batch_size lines, and the
/// rest waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_sent_at_batch_size() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (url, receiver) = start_receiver().await;
    let store = InfluxDb2Store::open(
        receiver_config(&url, temp.path(), 5, "60s"),
        &SharedRegistry::new(),
    )
    .expect("backend opens");
    for i in 0..12 {
        store
            .write(vec![gas_point("gas-04", 1_700_000_000_000 + i, i as f64)])
            .expect("write");
    }
    wait_until("two batches arrive", || receiver.requests().len() >= 2).await;
    // A third request now would be sent before its batch is full or due.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2, "requests: {requests:?}");
    for request in &requests {
        assert_eq!(request.lines().count(), 5, "batch: {request}");
    }
    assert!(
        store.pending_bytes() > 0,
        "two points wait for flush_interval"
    );
}

/// With few points, the writes of one flush_interval share one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn few_points_share_one_request() {
    let temp = tempfile::tempdir().expect("temp dir");
    let (url, receiver) = start_receiver().await;
    let store = InfluxDb2Store::open(
        receiver_config(&url, temp.path(), 1000, "2s"),
        &SharedRegistry::new(),
    )
    .expect("backend opens");
    for i in 0..10 {
        store
            .write(vec![gas_point("gas-04", 1_700_000_000_000 + i, i as f64)])
            .expect("write");
    }
    wait_until("ten lines arrive", || receiver.accepted_lines().len() >= 10).await;
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1, "requests: {requests:?}");
    assert_eq!(receiver.accepted_lines().len(), 10);
    // The receiver records the lines before it responds, so the commit may still follow.
    wait_until("the buffer drains", || store.pending_bytes() == 0).await;
}

/// A buffer left by a crash contains an invalid line and ends in a torn line. The torn line
/// is cut at open, the 400 batch is split until only the invalid line is dropped, and
/// every valid line arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_line_isolated_and_torn_line_cut() {
    logs();
    let temp = tempfile::tempdir().expect("temp dir");
    let good: Vec<String> = (0..7)
        .map(|i| {
            format!(
                "gas-detector,device=gas-05 gas_lel={i} {}",
                1_700_000_000_000_i64 + i
            )
        })
        .collect();
    let mut content = String::new();
    for (index, line) in good.iter().enumerate() {
        if index == 3 {
            content.push_str("not line protocol at all\n");
        }
        content.push_str(line);
        content.push('\n');
    }
    content.push_str("gas-detector,device=gas-05 gas_l");
    std::fs::write(temp.path().join("segment-00000000000000000000.lp"), content)
        .expect("seed buffer");

    let (url, receiver) = start_receiver().await;
    let registry = SharedRegistry::new();
    let store = InfluxDb2Store::open(receiver_config(&url, temp.path(), 100, "100ms"), &registry)
        .expect("backend opens");
    store
        .write(vec![gas_point("gas-05", 1_700_000_001_000, 42.0)])
        .expect("write");

    wait_until("eight lines arrive", || {
        receiver.accepted_lines().len() >= 8
    })
    .await;
    wait_until("the buffer drains", || store.pending_bytes() == 0).await;
    let accepted = receiver.accepted_lines();
    assert_eq!(accepted.len(), 8, "accepted: {accepted:?}");
    assert_eq!(accepted[..7], good[..], "valid lines arrive in order");
    assert!(
        accepted[7].contains("gas_lel=42 1700000001000"),
        "new line: {}",
        accepted[7]
    );
    assert_eq!(
        metric(&registry, "stonelion_influxdb2_dropped_points_total"),
        1
    );
    let log = logs();
    assert!(
        log.contains("InfluxDB rejected a line as invalid; dropped it"),
        "{log}"
    );
    assert!(log.contains("not line protocol at all"), "{log}");
    assert!(log.contains("torn_bytes=32"), "{log}");
}

/// 401 responses keep the points in the buffer, count and log the credential failure with
/// org and bucket but not the token, and the points arrive once InfluxDB accepts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_keep_points() {
    logs();
    let temp = tempfile::tempdir().expect("temp dir");
    let (url, receiver) = start_receiver().await;
    receiver.forced_status.store(401, Ordering::SeqCst);
    let registry = SharedRegistry::new();
    let store = InfluxDb2Store::open(receiver_config(&url, temp.path(), 100, "100ms"), &registry)
        .expect("backend opens");
    let points: Vec<Point> = (0..3)
        .map(|i| gas_point("gas-06", 1_700_000_000_000 + i, i as f64))
        .collect();
    store.write(points).expect("write");
    wait_until("two credential failures", || {
        metric(&registry, "stonelion_influxdb2_rejected_credentials_total") >= 2
    })
    .await;
    assert!(receiver.accepted_lines().is_empty());
    assert!(store.pending_bytes() > 0, "points stay buffered");
    assert_eq!(
        metric(&registry, "stonelion_influxdb2_dropped_points_total"),
        0
    );
    assert_eq!(metric(&registry, "stonelion_influxdb2_up"), 0);
    let log = logs();
    let line = log
        .lines()
        .find(|l| l.contains("InfluxDB rejected the token, org or bucket"))
        .unwrap_or_else(|| panic!("no credential error logged:\n{log}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("org=plant"), "{line}");
    assert!(line.contains("bucket=stonelion"), "{line}");
    assert!(!log.contains(RECEIVER_TOKEN), "the token was logged");

    receiver.forced_status.store(0, Ordering::SeqCst);
    wait_until("the points arrive", || receiver.accepted_lines().len() == 3).await;
    wait_until("the buffer drains", || store.pending_bytes() == 0).await;
}

/// A whole server with `backend = "both"`: a reading written over HTTP raises its alarm,
/// is stored in the embedded engine and reaches VictoriaMetrics with the shared schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_both_backends() {
    let temp = tempfile::tempdir().expect("temp dir");
    let victoria = start_victoria(free_port(), &temp.path().join("victoria")).await;
    let text = format!(
        r#"
[storage]
backend = "both"

[storage.influxdb2]
url = "{}"
org = "plant"
bucket = "stonelion"
token = "test-token"
flush_interval = "100ms"

[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"
"#,
        victoria.base
    );
    let mut config =
        stonelion::config::parse(&text, stonelion::config::builtin::builtin_profiles())
            .expect("config with both backends parses");
    config.server.data_dir = temp.path().join("data");
    config.server.http_listen = "127.0.0.1:0".parse().expect("address");
    config.server.mqtt_listen = "127.0.0.1:0".parse().expect("address");
    let server = stonelion::server::Server::start(
        config,
        std::sync::Arc::new(stonelion::clock::SystemClock),
    )
    .await
    .expect("server starts");
    let http = server.http_addr;

    let ts = chrono::Utc::now().timestamp_millis();
    let response = reqwest::Client::new()
        .post(format!(
            "http://{http}/api/v2/write?bucket=stonelion&precision=ms"
        ))
        .body(format!(
            "gas-detector,site=plant-a,device=gas-01 gas_lel=31.5 {ts}\n"
        ))
        .send()
        .await
        .expect("write request");
    assert_eq!(response.status(), 204);

    let expected = BTreeMap::from([(("gas-01".to_owned(), ts), 31.5)]);
    wait_for_all(&victoria.base, &expected).await;

    let started = Instant::now();
    loop {
        let series: serde_json::Value = reqwest::get(format!(
            "http://{http}/api/v1/devices/gas-01/series?metric=gas_lel&from=now-1h"
        ))
        .await
        .expect("series request")
        .json()
        .await
        .expect("series JSON");
        let alarms: serde_json::Value =
            reqwest::get(format!("http://{http}/api/v1/alarms?device=gas-01"))
                .await
                .expect("alarms request")
                .json()
                .await
                .expect("alarms JSON");
        let stored = series["points"][0]["value"] == 31.5;
        let raised = alarms["alarms"][0]["level"] == 1;
        if stored && raised {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "embedded store or alarm missing: {series} {alarms}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}
