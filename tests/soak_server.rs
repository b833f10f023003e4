//! Soak test of the built binary: many simulated devices, each on its own MQTT connection,
//! publish QoS 1 readings for a bounded time while the test samples the server's resident
//! memory (`VmRSS` in `/proc/PID/status`) and open file descriptors (`/proc/PID/fd`).
//!
//! Flat means the maximum over the second half of the samples is within `GROWTH_LIMIT` of
//! the maximum over the first half, for both, with samples taken after `WARM_UP`. The
//! test also checks that the server logged no ERROR line and that every acknowledged
//! reading was stored.
//!
//! `STONELION_SOAK_DEVICES` (default `DEFAULT_DEVICES`) and `STONELION_SOAK_SECS`
//! (default `DEFAULT_SECS`) scale it; see docs/testing.md for the figures measured.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::{Receiver, unique_millis, wait_for};

const DEFAULT_DEVICES: usize = 1_000;
const DEFAULT_SECS: u64 = 90;
/// Time between two readings of one device.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(2);
/// Time between two samples of memory and descriptors.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);
/// Time after the last device connects before sampling starts, while buffers fill.
const WARM_UP: Duration = Duration::from_secs(20);
/// Allowed growth of the second half's maximum over the first half's.
const GROWTH_LIMIT: f64 = 1.2;
/// One device in this many moves between 10 and 60 %LEL, so alarms are raised and cleared.
const ALARMING_EVERY: usize = 50;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn device_id(n: usize) -> String {
    format!("gas-{n:04}")
}

fn config(devices: usize, webhook_url: &str) -> String {
    let mut text = String::from(
        "[ingest]\nstale_after = \"1h\"\n\n[storage]\ncommit_interval = \"500ms\"\n\n\
         [[sites]]\nid = \"plant-a\"\nname = \"Plant A\"\nkind = \"enterprise\"\n\n",
    );
    for n in 0..devices {
        text.push_str(&format!(
            "[[devices]]\nid = \"{}\"\nsite = \"plant-a\"\nprofile = \"gas-detector\"\n\n",
            device_id(n)
        ));
    }
    text.push_str(&format!(
        "[[webhooks]]\nname = \"assistant\"\nurl = \"{webhook_url}\"\nsecret = \"test-secret\"\n\
         initial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\n"
    ));
    text
}

struct ServerProcess {
    child: Child,
    http: SocketAddr,
    mqtt: SocketAddr,
}

impl ServerProcess {
    fn start(config: &Path, data: &Path, stderr: &Path) -> ServerProcess {
        let stderr = std::fs::File::create(stderr).unwrap();
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
            .recv_timeout(Duration::from_secs(60))
            .expect("the server printed its addresses within 60 s");
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

    /// Resident memory in kB and open file descriptors.
    fn resources(&self) -> (u64, usize) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        (rss_kb, fds)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects one device and publishes a reading every `PUBLISH_INTERVAL` until `stop`,
/// counting each PUBACK in `acked`.
async fn connect_device(
    mqtt: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let device = device_id(n);
    let mut options =
        MqttOptions::new(format!("soak-{device}"), mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(60));
    let (client, mut events) = AsyncClient::new(options, 10);
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut connected = Some(connected_tx);
        while let Ok(event) = events.poll().await {
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    if let Some(tx) = connected.take() {
                        let _ = tx.send(());
                    }
                }
                Event::Incoming(Packet::PubAck(_)) => {
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), connected_rx)
        .await
        .unwrap_or_else(|_| panic!("device {device} got no CONNACK within 30 s"))
        .unwrap();

    tokio::spawn(async move {
        let topic = format!("telemetry/plant-a/{device}");
        // Spread the devices over the interval so the load is even.
        let phase = PUBLISH_INTERVAL.mul_f64((n % 100) as f64 / 100.0);
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + phase, PUBLISH_INTERVAL);
        let mut count = 0u64;
        while !stop.load(Ordering::SeqCst) {
            ticker.tick().await;
            let alarming = n.is_multiple_of(ALARMING_EVERY) && (count / 5) % 2 == 1;
            let value = if alarming {
                60.0
            } else {
                10.0 + (count % 7) as f64
            };
            let payload =
                serde_json::json!({ "ts": unique_millis(), "values": { "gas_lel": value } })
                    .to_string();
            client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            count += 1;
        }
        let _ = client.disconnect().await;
    })
}

async fn stored_readings(http: SocketAddr) -> u64 {
    let response = reqwest::Client::new()
        .get(format!("http://{http}/query"))
        .query(&[
            ("db", "stonelion"),
            ("q", "SELECT count(gas_lel) FROM \"gas-detector\""),
        ])
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    body["results"][0]["series"][0]["values"][0][1]
        .as_u64()
        .unwrap_or(0)
}

fn max_of(samples: &[(u64, usize)], pick: impl Fn(&(u64, usize)) -> f64) -> f64 {
    samples.iter().map(pick).fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_memory_and_descriptors_flat() {
    let devices: usize = env_or("STONELION_SOAK_DEVICES", DEFAULT_DEVICES);
    let duration = Duration::from_secs(env_or("STONELION_SOAK_SECS", DEFAULT_SECS));
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let config_path = dir.path().join("stonelion.toml");
    std::fs::write(&config_path, config(devices, &receiver.url())).unwrap();
    let stderr = dir.path().join("stderr.log");
    let server = ServerProcess::start(&config_path, &dir.path().join("data"), &stderr);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::with_capacity(devices);
    for n in 0..devices {
        publishers.push(connect_device(server.mqtt, n, stop.clone(), acked.clone()).await);
    }

    // Sampling starts after every device is connected and the warm-up has passed, so
    // connection setup and first allocations do not count as growth.
    let started = Instant::now();
    let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
    let mut samples = Vec::new();
    while started.elapsed() < WARM_UP + duration {
        ticker.tick().await;
        if started.elapsed() >= WARM_UP {
            samples.push(server.resources());
        }
    }
    // NOTE: rumqttd 0.20 logs `router-drop error=Recv(Disconnected)` at ERROR for every
    // client that disconnects, even cleanly, so only the log written while the devices
    // were connected is checked for ERROR lines.
    let soak_log = std::fs::read_to_string(&stderr).unwrap();
    stop.store(true, Ordering::SeqCst);
    for publisher in publishers {
        publisher.await.unwrap();
    }

    let (first, second) = samples.split_at(samples.len() / 2);
    let rss = |s: &(u64, usize)| s.0 as f64;
    let fds = |s: &(u64, usize)| s.1 as f64;
    println!(
        "{devices} devices, sampled for {duration:?} after the warm-up: {} samples (RSS kB, fds): {samples:?}",
        samples.len()
    );
    assert!(
        samples.len() >= 4,
        "only {} samples in {duration:?}",
        samples.len()
    );
    assert!(
        max_of(second, rss) <= max_of(first, rss) * GROWTH_LIMIT,
        "RSS grew from a maximum of {} kB to {} kB",
        max_of(first, rss),
        max_of(second, rss)
    );
    assert!(
        max_of(second, fds) <= max_of(first, fds) * GROWTH_LIMIT,
        "open descriptors grew from a maximum of {} to {}",
        max_of(first, fds),
        max_of(second, fds)
    );

    let published = acked.load(Ordering::SeqCst);
    assert!(
        published >= devices as u64,
        "only {published} readings were acknowledged"
    );
    let http = server.http;
    wait_for(
        "every acknowledged reading to be stored",
        Duration::from_secs(60),
        || async move { (stored_readings(http).await >= published).then_some(()) },
    )
    .await;
    assert!(
        !receiver.events("alarm.raised").is_empty(),
        "no alarm was raised during the soak"
    );

    let errors: Vec<&str> = soak_log
        .lines()
        .filter(|line| line.contains("ERROR"))
        .collect();
    assert!(
        errors.is_empty(),
        "the server logged {} ERROR lines, first: {}",
        errors.len(),
        errors[0]
    );
}
