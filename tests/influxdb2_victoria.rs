//! The InfluxDB 2 backend against a real VictoriaMetrics server, which accepts InfluxDB's
//! `/api/v2/write`: every point must arrive with its name, tags, value and timestamp,
//! including points written while the server was stopped and Stonelion restarted.
//!
//! Needs the `victoria-metrics` binary (Debian package `victoria-metrics`); without it the
//! test fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    exited.expect("victoria-metrics stops within the deadline").expect("wait for exit");
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

fn failed_requests(registry: &SharedRegistry) -> u64 {
    let text = registry.encode();
    text.lines()
        .find(|l| l.starts_with("stonelion_influxdb2_failed_requests_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_survive_outage_and_restart() {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("victoria");
    let buffer = temp.path().join("buffer");
    let port = free_port();
    let mut victoria = start_victoria(port, &data).await;

    let registry = SharedRegistry::new();
    let store = InfluxDb2Store::open(config(&victoria.base, &buffer), &registry)
        .await
        .expect("backend opens");
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
        .await
        .expect("backend reopens");
    wait_for_all(&victoria.base, &expected).await;
    let started = Instant::now();
    while restarted.pending_bytes() > 0 {
        assert!(started.elapsed() < DEADLINE, "the buffer never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn unreachable_server_fails_health_check() {
    let temp = tempfile::tempdir().expect("temp dir");
    let url = format!("http://127.0.0.1:{}", free_port());
    let error = InfluxDb2Store::open(config(&url, temp.path()), &SharedRegistry::new())
        .await
        .err()
        .expect("health check fails");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("InfluxDB health check at {url}/health failed")),
        "{message}"
    );
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
    let mut config = stonelion::config::parse(&text, stonelion::config::builtin::builtin_profiles())
        .expect("config with both backends parses");
    config.server.data_dir = temp.path().join("data");
    config.server.http_listen = "127.0.0.1:0".parse().expect("address");
    config.server.mqtt_listen = "127.0.0.1:0".parse().expect("address");
    let server = stonelion::server::Server::start(config, std::sync::Arc::new(stonelion::clock::SystemClock))
        .await
        .expect("server starts");
    let http = server.http_addr;

    let ts = chrono::Utc::now().timestamp_millis();
    let response = reqwest::Client::new()
        .post(format!("http://{http}/api/v2/write?bucket=stonelion&precision=ms"))
        .body(format!("gas-detector,site=plant-a,device=gas-01 gas_lel=31.5 {ts}\n"))
        .send()
        .await
        .expect("write request");
    assert_eq!(response.status(), 204);

    let expected = BTreeMap::from([(("gas-01".to_owned(), ts), 31.5)]);
    wait_for_all(&victoria.base, &expected).await;

    let started = Instant::now();
    loop {
        let series: serde_json::Value =
            reqwest::get(format!("http://{http}/api/v1/devices/gas-01/series?metric=gas_lel&from=now-1h"))
                .await
                .expect("series request")
                .json()
                .await
                .expect("series JSON");
        let alarms: serde_json::Value = reqwest::get(format!("http://{http}/api/v1/alarms?device=gas-01"))
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
        assert!(started.elapsed() < DEADLINE, "embedded store or alarm missing: {series} {alarms}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}
