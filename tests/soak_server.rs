//! Soak test of the built binary. Many simulated devices, each on its own MQTT connection
//! and logged in with its own password, publish QoS 1 readings for a bounded time. The
//! test samples the server's resident memory (`VmRSS` in `/proc/PID/status`) and open
//! file descriptors (`/proc/PID/fd`).
//!
//! One device in `RECONNECTING_EVERY` disconnects and logs in again every
//! `RECONNECT_INTERVAL`, and `BAD_LOGIN_CLIENTS` clients keep guessing the passwords of
//! some of those devices and of an unknown username, so the verified-login cache and the
//! failed-login backoff run throughout.
//!
//! Flat means the maximum over the second half of the samples is within `GROWTH_LIMIT` of
//! the maximum over the first half, for both, with samples taken after `WARM_UP`. For
//! memory, the bound of the broker's message log is allowed on top. The
//! test also checks that the server logged no ERROR line, that every reading sent was
//! acknowledged and stored, and that the guessing clients were denied.
//!
//! `STONELION_SOAK_DEVICES` (default `DEFAULT_DEVICES`) and `STONELION_SOAK_SECS`
//! (default `DEFAULT_SECS`, at most `MAX_SECS`) scale it; see docs/testing.md for the
//! figures measured.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use stonelion::ingest::mqtt::{MESSAGE_LOG_SEGMENT_BYTES, MESSAGE_LOG_SEGMENTS};
use support::{Receiver, metric, unique_millis, wait_for};

const DEFAULT_DEVICES: usize = 1_000;
const DEFAULT_SECS: u64 = 300;
/// Maximum soak that `STONELION_SOAK_SECS` may set, so a typo cannot hang CI.
const MAX_SECS: u64 = 3_600;
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
/// One device in this many disconnects and logs in again every `RECONNECT_INTERVAL`.
const RECONNECTING_EVERY: usize = 20;
const RECONNECT_INTERVAL: Duration = Duration::from_secs(30);
/// Clients that guess passwords, each one attempt per `BAD_LOGIN_INTERVAL`.
const BAD_LOGIN_CLIENTS: usize = 4;
const BAD_LOGIN_INTERVAL: Duration = Duration::from_millis(500);
/// Maximum time a device waits for the PUBACKs of its readings before it disconnects.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn device_id(n: usize) -> String {
    format!("gas-{n:04}")
}

fn password(n: usize) -> String {
    format!("soak-password-{n}")
}

/// Hashes with the lowest argon2 cost (8 KiB, 1 pass), so that 1,000 logins stay cheap in
/// a debug build. The server reads the cost from the PHC string.
fn cheap_hash(password: &str) -> String {
    let params = Params::new(8, 1, 1, None).unwrap();
    let salt = SaltString::encode_b64(b"sixteen byte salt").unwrap();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

fn config(devices: usize, webhook_url: &str) -> String {
    let mut text = String::from(
        "[ingest]\nstale_after = \"1h\"\n\n[storage]\ncommit_interval = \"500ms\"\n\n\
         [[sites]]\nid = \"plant-a\"\nname = \"Plant A\"\nkind = \"enterprise\"\n\n",
    );
    for n in 0..devices {
        text.push_str(&format!(
            "[[devices]]\nid = \"{}\"\nsite = \"plant-a\"\nprofile = \"gas-detector\"\n\
             mqtt_password_hash = \"{}\"\n\n",
            device_id(n),
            cheap_hash(&password(n))
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

/// Counts of the whole soak: readings sent by the devices and acknowledged with PUBACK,
/// and logins after the first.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    acked: AtomicU64,
    reconnects: AtomicU64,
}

/// Connects device `n` with its password and returns its client, once CONNACK arrived.
/// The event loop runs until the connection ends, counting PUBACKs in `acked` and in
/// `counts`.
async fn connect_device(
    mqtt: SocketAddr,
    n: usize,
    acked: Arc<AtomicU64>,
    counts: Arc<Counts>,
) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let device = device_id(n);
    let mut options = MqttOptions::new(device.as_str(), mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(60));
    options.set_credentials(device.as_str(), password(n));
    let (client, mut events) = AsyncClient::new(options, 10);
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
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
                    counts.acked.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), connected_rx)
        .await
        .unwrap_or_else(|_| panic!("device {device} got no CONNACK within 30 s"))
        .unwrap_or_else(|_| panic!("device {device}'s connection closed before CONNACK"));
    (client, task)
}

/// Waits until every reading the device sent is acknowledged, then disconnects it.
async fn disconnect_device(
    device: &str,
    client: &AsyncClient,
    task: tokio::task::JoinHandle<()>,
    sent: u64,
    acked: &AtomicU64,
) {
    let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
    while acked.load(Ordering::SeqCst) < sent {
        assert!(
            tokio::time::Instant::now() < deadline,
            "device {device}: {} of {sent} readings acknowledged after {ACK_TIMEOUT:?}",
            acked.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.disconnect().await.unwrap();
    tokio::time::timeout(ACK_TIMEOUT, task)
        .await
        .unwrap_or_else(|_| panic!("device {device}'s connection did not close"))
        .unwrap();
}

/// Runs device `n`: connects, then publishes a reading every `PUBLISH_INTERVAL` until
/// `stop`, logging in again every `RECONNECT_INTERVAL` if it is a reconnecting device.
/// Returns the device's task once its first CONNACK arrived.
async fn spawn_device(
    mqtt: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) -> tokio::task::JoinHandle<()> {
    let device = device_id(n);
    let acked = Arc::new(AtomicU64::new(0));
    let (mut client, mut task) = connect_device(mqtt, n, acked.clone(), counts.clone()).await;
    tokio::spawn(async move {
        let topic = format!("telemetry/plant-a/{device}");
        // Spread the devices over the interval so the load is even.
        let phase = PUBLISH_INTERVAL.mul_f64((n % 100) as f64 / 100.0);
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + phase, PUBLISH_INTERVAL);
        let reconnects = n.is_multiple_of(RECONNECTING_EVERY);
        let mut last_login = Instant::now();
        let mut sent = 0u64;
        while !stop.load(Ordering::SeqCst) {
            ticker.tick().await;
            if reconnects && last_login.elapsed() >= RECONNECT_INTERVAL {
                disconnect_device(&device, &client, task, sent, &acked).await;
                (client, task) = connect_device(mqtt, n, acked.clone(), counts.clone()).await;
                last_login = Instant::now();
                counts.reconnects.fetch_add(1, Ordering::SeqCst);
            }
            let alarming = n.is_multiple_of(ALARMING_EVERY) && (sent / 5) % 2 == 1;
            let value = if alarming {
                60.0
            } else {
                10.0 + (sent % 7) as f64
            };
            let payload =
                serde_json::json!({ "ts": unique_millis(), "values": { "gas_lel": value } })
                    .to_string();
            client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            sent += 1;
            counts.sent.fetch_add(1, Ordering::SeqCst);
        }
        disconnect_device(&device, &client, task, sent, &acked).await;
    })
}

/// Polls until CONNACK (`true`) or until the connection fails or times out (`false`).
async fn gets_connack(events: &mut EventLoop) -> bool {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// Runs a client that tries a wrong password every `BAD_LOGIN_INTERVAL` until `stop`,
/// for the usernames of some reconnecting devices and one unknown username in turn.
/// Returns how many attempts it made; it panics if one got CONNACK.
fn spawn_bad_logins(
    mqtt: SocketAddr,
    client: usize,
    devices: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let mut usernames: Vec<String> = (0..devices)
        .step_by(RECONNECTING_EVERY)
        .skip(client)
        .step_by(BAD_LOGIN_CLIENTS)
        .take(3)
        .map(device_id)
        .collect();
    usernames.push(format!("intruder-{client}"));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(BAD_LOGIN_INTERVAL);
        let mut attempts = 0u64;
        while !stop.load(Ordering::SeqCst) {
            ticker.tick().await;
            let username = &usernames[attempts as usize % usernames.len()];
            let mut options = MqttOptions::new(username, mqtt.ip().to_string(), mqtt.port());
            options.set_credentials(username, "guessed-password");
            let (_client, mut events) = AsyncClient::new(options, 10);
            let mut network = events.network_options();
            network.set_connection_timeout(5);
            events.set_network_options(network);
            assert!(
                !gets_connack(&mut events).await,
                "a wrong password for {username} got CONNACK"
            );
            attempts += 1;
        }
        attempts
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
    let secs = env_or("STONELION_SOAK_SECS", DEFAULT_SECS);
    assert!(
        secs <= MAX_SECS,
        "STONELION_SOAK_SECS={secs} is above the maximum of {MAX_SECS}; set a shorter soak"
    );
    let duration = Duration::from_secs(secs);
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let config_path = dir.path().join("stonelion.toml");
    std::fs::write(&config_path, config(devices, &receiver.url())).unwrap();
    let stderr = dir.path().join("stderr.log");
    let server = ServerProcess::start(&config_path, &dir.path().join("data"), &stderr);

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut publishers = Vec::with_capacity(devices);
    for n in 0..devices {
        publishers.push(spawn_device(server.mqtt, n, stop.clone(), counts.clone()).await);
    }
    let guessers: Vec<_> = (0..BAD_LOGIN_CLIENTS)
        .map(|client| spawn_bad_logins(server.mqtt, client, devices, stop.clone()))
        .collect();

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
    let mut bad_logins = 0;
    for guesser in guessers {
        bad_logins += guesser.await.unwrap();
    }
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
    // The broker's message log for `telemetry/#` grows until it reaches its bound, which
    // at this message rate takes longer than a default soak, so the log's configured size
    // is allowed on top of the growth limit.
    let message_log_kb = (MESSAGE_LOG_SEGMENT_BYTES * MESSAGE_LOG_SEGMENTS / 1024) as f64;
    assert!(
        max_of(second, rss) <= max_of(first, rss) * GROWTH_LIMIT + message_log_kb,
        "RSS grew from a maximum of {} kB to {} kB, more than {GROWTH_LIMIT}x plus the \
         broker's message log of {message_log_kb} kB",
        max_of(first, rss),
        max_of(second, rss)
    );
    assert!(
        max_of(second, fds) <= max_of(first, fds) * GROWTH_LIMIT,
        "open descriptors grew from a maximum of {} to {}",
        max_of(first, fds),
        max_of(second, fds)
    );

    let sent = counts.sent.load(Ordering::SeqCst);
    let acked = counts.acked.load(Ordering::SeqCst);
    assert!(
        sent >= devices as u64,
        "only {sent} readings were sent by {devices} devices"
    );
    assert_eq!(acked, sent, "readings acknowledged of those sent");
    let http = server.http;
    wait_for(
        "every reading sent to be stored",
        Duration::from_secs(60),
        || async move { (stored_readings(http).await >= sent).then_some(()) },
    )
    .await;

    let denied = |reason: &str| {
        let sample = format!("stonelion_mqtt_denied_total{{reason=\"{reason}\"}}");
        async move { metric(http, &sample).await }
    };
    let bad_credentials = denied("bad_credentials").await;
    let login_backoff = denied("login_backoff").await;
    println!(
        "{bad_logins} logins with wrong passwords: {bad_credentials} denied by a password \
         check, {login_backoff} by the backoff"
    );
    let reconnects = counts.reconnects.load(Ordering::SeqCst);
    println!("{reconnects} reconnects, each with a new login");
    assert!(reconnects > 0, "no device logged in again");
    assert!(bad_logins > 0, "no wrong password was tried");
    assert!(
        bad_credentials > 0.0,
        "no login was denied by a password check"
    );
    assert!(
        login_backoff > 0.0,
        "no login was denied by the failed-login backoff"
    );
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
