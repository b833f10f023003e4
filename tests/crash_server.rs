//! Crash safety of the whole server: the built binary runs under MQTT and HTTP load while
//! alarms are raised and cleared and webhook deliveries queue up behind a receiver that
//! answers 503; it is killed with SIGKILL, restarted on the same data directory, and
//! then
//! - every HTTP write answered 204 more than `COMMIT_WINDOW` before the kill is stored;
//! - every MQTT reading whose PUBACK arrived more than `COMMIT_WINDOW` before the kill is
//!   stored (the broker sends PUBACK before the reading is committed, so readings acked
//!   within the window may be lost);
//! - every alarm transition that the API had shown is still in the alarm's history;
//! - once the receiver accepts, every queued delivery arrives exactly once by delivery id,
//!   in transition order per alarm.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::{Receiver, metric, unique_millis, wait_for};

/// The store's commit interval, set in the config below.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);
/// How long before the kill an acknowledged write may still be lost: the commit interval
/// plus time for the link, the pipeline channel and the writer thread under load.
const COMMIT_WINDOW: Duration = Duration::from_millis(1_000);
/// How long the load runs before the kill.
const LOAD_TIME: Duration = Duration::from_secs(4);
/// Devices publishing over MQTT, each on its own connection. The last one moves between
/// 0 and 60 %LEL, so its gas-lel alarm is raised and cleared over and over.
const MQTT_DEVICES: [&str; 4] = ["gas-01", "gas-02", "gas-03", "gas-04"];

const CONFIG: &str = r#"
[ingest]
stale_after = "1h"

[storage]
commit_interval = "500ms"

[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"

[[devices]]
id = "gas-02"
site = "plant-a"
profile = "gas-detector"

[[devices]]
id = "gas-03"
site = "plant-a"
profile = "gas-detector"

[[devices]]
id = "gas-04"
site = "plant-a"
profile = "gas-detector"

[[webhooks]]
name = "assistant"
url = "WEBHOOK_URL"
secret = "test-secret"
timeout = "2s"
initial_backoff = "50ms"
max_backoff = "200ms"
"#;

/// Timestamps of acknowledged writes, with the instant each acknowledgement arrived.
type Acked = Arc<Mutex<Vec<(i64, Instant)>>>;

/// The server binary, with its HTTP and MQTT addresses read from its stdout.
struct ServerProcess {
    child: Child,
    http: SocketAddr,
    mqtt: SocketAddr,
}

impl ServerProcess {
    fn start(config: &Path, data: &Path, stderr: &Path) -> ServerProcess {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_stonelion"))
            .args(["run", "--config"])
            .arg(config)
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data)
            .env_remove("STONELION_HTTP_LISTEN")
            .env_remove("STONELION_MQTT_LISTEN")
            .env_remove("STONELION_DATA_DIR")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("stonelion listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server printed its addresses within 30 s");
        let address = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap()
                .parse()
                .unwrap()
        };
        ServerProcess {
            child,
            http: address("http="),
            mqtt: address("mqtt="),
        }
    }

    fn kill(mut self) {
        // `Child::kill` sends SIGKILL, so no destructor or shutdown path runs.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes readings of one device with QoS 1, one in flight at a time, recording each
/// PUBACK, until `stop` is set or the connection fails.
async fn publish_device(
    mqtt: SocketAddr,
    device: &'static str,
    stop: Arc<AtomicBool>,
    acked: Acked,
) {
    let mut options = MqttOptions::new(
        format!("crash-{device}"),
        mqtt.ip().to_string(),
        mqtt.port(),
    );
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 10);
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
    let event_loop = tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if matches!(event, Event::Incoming(Packet::PubAck(_))) && ack_tx.send(()).is_err() {
                break;
            }
        }
    });
    let oscillates = device == "gas-04";
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let ts = unique_millis();
        let value = if oscillates && (n / 20) % 2 == 1 {
            60.0
        } else {
            10.0
        };
        let payload = serde_json::json!({ "ts": ts, "values": { "gas_lel": value } }).to_string();
        let topic = format!("telemetry/plant-a/{device}");
        if client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(5), ack_rx.recv()).await {
            Ok(Some(())) => acked.lock().unwrap().push((ts, Instant::now())),
            _ => break,
        }
        n += 1;
    }
    event_loop.abort();
}

/// Writes batches of line protocol to `/api/v2/write`, recording each batch answered 204.
async fn write_http(http: SocketAddr, stop: Arc<AtomicBool>, acked: Acked) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("http://{http}/api/v2/write?precision=ms");
    while !stop.load(Ordering::SeqCst) {
        let stamps: Vec<i64> = (0..20).map(|_| unique_millis()).collect();
        let body: String = stamps
            .iter()
            .map(|ts| format!("http_load,source=crash v={} {ts}\n", ts % 1000))
            .collect();
        match client.post(&url).body(body).send().await {
            Ok(response) if response.status() == 204 => {
                let now = Instant::now();
                acked
                    .lock()
                    .unwrap()
                    .extend(stamps.iter().map(|ts| (*ts, now)));
            }
            Ok(response) => panic!("a write was answered {}", response.status()),
            Err(_) => break,
        }
    }
}

/// Event kinds of every alarm in the API's list, by alarm id.
async fn alarm_histories(http: SocketAddr) -> Option<BTreeMap<i64, Vec<String>>> {
    let url = format!("http://{http}/api/v1/alarms?limit=10000");
    let list: serde_json::Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    let alarms = list["alarms"].as_array()?;
    assert!(alarms.len() < 10_000, "the alarm list may be cut at 10,000");
    let histories = alarms
        .iter()
        .map(|alarm| {
            let events = alarm["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["event"].as_str().unwrap().to_owned());
            (alarm["id"].as_i64().unwrap(), events.collect())
        })
        .collect();
    Some(histories)
}

/// Polls the alarm list until `stop`, keeping the longest history seen of each alarm.
async fn watch_alarms(
    http: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<i64, Vec<String>>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let Some(histories) = alarm_histories(http).await else {
            break;
        };
        {
            let mut seen = seen.lock().unwrap();
            for (id, history) in histories {
                let entry = seen.entry(id).or_default();
                if history.len() > entry.len() {
                    *entry = history;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Timestamps, in epoch milliseconds, of every stored value of `field` in `measurement`.
async fn stored_times(http: SocketAddr, measurement: &str, field: &str) -> HashSet<i64> {
    let q = format!("SELECT \"{field}\" FROM \"{measurement}\"");
    let url = format!("http://{http}/query");
    let response = reqwest::Client::new()
        .get(url)
        .query(&[("db", "stonelion"), ("epoch", "ms"), ("q", q.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "query {q}");
    let body: serde_json::Value = response.json().await.unwrap();
    let mut times = HashSet::new();
    for series in body["results"][0]["series"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for row in series["values"].as_array().unwrap() {
            times.insert(row[0].as_i64().unwrap());
        }
    }
    times
}

/// Returns the timestamps acknowledged before `cutoff`, failing if any is not stored.
fn check_durable(what: &str, acked: &Acked, cutoff: Instant, stored: &HashSet<i64>) -> usize {
    let durable: Vec<i64> = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, at)| *at < cutoff)
        .map(|(ts, _)| *ts)
        .collect();
    let lost: Vec<&i64> = durable.iter().filter(|ts| !stored.contains(ts)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged {what} were lost, first at {:?}",
        lost.len(),
        durable.len(),
        lost.first()
    );
    durable.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    receiver.set_up(false);
    let config = dir.path().join("stonelion.toml");
    std::fs::write(&config, CONFIG.replace("WEBHOOK_URL", &receiver.url())).unwrap();
    let data = dir.path().join("data");
    let stderr = dir.path().join("stderr.log");
    assert_eq!(
        COMMIT_INTERVAL,
        Duration::from_millis(500),
        "the config sets commit_interval to 500ms"
    );

    let server = ServerProcess::start(&config, &data, &stderr);
    let stop = Arc::new(AtomicBool::new(false));
    let mqtt_acked: Acked = Arc::default();
    let http_acked: Acked = Arc::default();
    let seen_alarms: Arc<Mutex<BTreeMap<i64, Vec<String>>>> = Arc::default();
    let mut load = Vec::new();
    for device in MQTT_DEVICES {
        load.push(tokio::spawn(publish_device(
            server.mqtt,
            device,
            stop.clone(),
            mqtt_acked.clone(),
        )));
    }
    load.push(tokio::spawn(write_http(
        server.http,
        stop.clone(),
        http_acked.clone(),
    )));
    load.push(tokio::spawn(watch_alarms(
        server.http,
        stop.clone(),
        seen_alarms.clone(),
    )));

    tokio::time::sleep(LOAD_TIME).await;
    let seen_transitions = seen_alarms
        .lock()
        .unwrap()
        .values()
        .map(Vec::len)
        .sum::<usize>();
    assert!(
        seen_transitions >= 2,
        "the load raised too few alarm transitions ({seen_transitions}) to test them"
    );
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| server.kill());
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }

    let server = tokio::task::block_in_place(|| ServerProcess::start(&config, &data, &stderr));
    let cutoff = killed_at - COMMIT_WINDOW;
    let http_checked = check_durable(
        "HTTP writes",
        &http_acked,
        cutoff,
        &stored_times(server.http, "http_load", "v").await,
    );
    let mqtt_checked = check_durable(
        "MQTT readings",
        &mqtt_acked,
        cutoff,
        &stored_times(server.http, "gas-detector", "gas_lel").await,
    );
    assert!(
        http_checked >= 100,
        "only {http_checked} HTTP writes were acknowledged before the window"
    );
    assert!(
        mqtt_checked >= 100,
        "only {mqtt_checked} MQTT readings were acknowledged before the window"
    );

    let after = alarm_histories(server.http).await.unwrap();
    for (id, seen) in seen_alarms.lock().unwrap().iter() {
        let history = after
            .get(id)
            .unwrap_or_else(|| panic!("alarm {id} shown before the kill is gone"));
        assert!(
            history.starts_with(seen),
            "alarm {id} showed {seen:?} before the kill, has {history:?} after"
        );
    }

    // Every stored transition has one queued delivery, because the webhook takes all events.
    let expected: usize = after.values().map(Vec::len).sum();
    assert!(
        receiver.deliveries().is_empty(),
        "the receiver accepted a delivery while answering 503"
    );
    receiver.set_up(true);
    let http = server.http;
    wait_for("the queued deliveries", Duration::from_secs(60), || {
        let receiver = receiver.clone();
        async move {
            let depth = metric(http, "stonelion_webhook_queue_depth{webhook=\"assistant\"}").await;
            (receiver.deliveries().len() >= expected && depth == 0.0).then_some(())
        }
    })
    .await;

    let deliveries = receiver.deliveries();
    assert_eq!(
        deliveries.len(),
        expected,
        "one delivery per stored transition"
    );
    let ids: HashSet<&str> = deliveries.iter().map(|d| d.delivery_id.as_str()).collect();
    assert_eq!(ids.len(), deliveries.len(), "a delivery id arrived twice");
    assert!(
        deliveries.iter().all(|d| d.signature_valid),
        "a delivery had an invalid signature"
    );
    let mut per_alarm: HashMap<i64, Vec<&support::Delivery>> = HashMap::new();
    for delivery in &deliveries {
        per_alarm
            .entry(delivery.body["alarm"]["id"].as_i64().unwrap())
            .or_default()
            .push(delivery);
    }
    for (id, history) in &after {
        let delivered = per_alarm.get(id).map_or(&[][..], Vec::as_slice);
        let events: Vec<&str> = delivered.iter().map(|d| d.event.as_str()).collect();
        assert_eq!(
            events,
            history.iter().map(String::as_str).collect::<Vec<_>>(),
            "alarm {id} deliveries out of order"
        );
        for (n, delivery) in delivered.iter().enumerate() {
            let length = delivery.body["alarm"]["history"].as_array().unwrap().len();
            assert_eq!(
                length,
                n + 1,
                "delivery {n} of alarm {id} carries the wrong transition"
            );
        }
    }
}
