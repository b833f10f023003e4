//! Shared helpers for the integration tests: a server on free ports with a temporary data
//! directory, a recording webhook receiver, an MQTT publisher and polling with deadlines.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use sha2::Sha256;
use stonelion::clock::SystemClock;
use stonelion::config::builtin::builtin_profiles;
use stonelion::server::Server;

pub const SECRET: &str = "test-secret";

/// Sites and devices used by most tests; `WEBHOOK_URL` is replaced by the receiver's URL.
pub const CONFIG: &str = r#"
[ingest]
stale_after = "1h"

[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[sites]]
id = "park-b3"
name = "Building B3"
kind = "park_building"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"

[[devices]]
id = "gas-02"
site = "plant-a"
profile = "gas-detector"

[[devices]]
id = "smoke-01"
site = "park-b3"
profile = "smoke-detector"

[[devices]]
id = "temp-01"
site = "park-b3"
profile = "temperature-sensor"

[[webhooks]]
name = "assistant"
url = "WEBHOOK_URL"
secret = "test-secret"
timeout = "2s"
initial_backoff = "50ms"
max_backoff = "200ms"
"#;

/// Starts a server on free loopback ports with `config` and the data directory `data`.
pub async fn start_server(config: &str, webhook_url: &str, data: &Path) -> Server {
    let text = config.replace("WEBHOOK_URL", webhook_url);
    let mut config = stonelion::config::parse(&text, builtin_profiles()).unwrap();
    config.server.data_dir = data.to_owned();
    config.server.http_listen = "127.0.0.1:0".parse().unwrap();
    config.server.mqtt_listen = "127.0.0.1:0".parse().unwrap();
    config.storage.commit_interval = Duration::from_millis(50);
    Server::start(config, Arc::new(SystemClock)).await.unwrap()
}

/// One delivery as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub event: String,
    pub delivery_id: String,
    pub signature_valid: bool,
    pub body: serde_json::Value,
}

/// A webhook receiver that records deliveries and answers 503 while "down".
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    /// Every delivery attempt, including the rejected ones.
    attempts: Arc<Mutex<Vec<Delivery>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            addr: listener.local_addr().unwrap(),
            deliveries: Arc::default(),
            attempts: Arc::default(),
            status: Arc::new(AtomicU16::new(204)),
        };
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        receiver
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Makes the receiver answer 503 (`false`) or accept deliveries (`true`).
    pub fn set_up(&self, up: bool) {
        self.status
            .store(if up { 204 } else { 503 }, Ordering::SeqCst);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }

    pub fn attempts(&self) -> Vec<Delivery> {
        self.attempts.lock().unwrap().clone()
    }

    /// Accepted deliveries of one event kind.
    pub fn events(&self, kind: &str) -> Vec<Delivery> {
        self.deliveries()
            .into_iter()
            .filter(|d| d.event == kind)
            .collect()
    }
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let delivery = Delivery {
        event: header("x-stonelion-event"),
        delivery_id: header("x-stonelion-delivery"),
        signature_valid: signature_valid(
            SECRET.as_bytes(),
            &body,
            &header("x-stonelion-signature"),
        ),
        body: serde_json::from_slice(&body).unwrap_or_default(),
    };
    receiver.attempts.lock().unwrap().push(delivery.clone());
    let status = StatusCode::from_u16(receiver.status.load(Ordering::SeqCst)).unwrap();
    if status.is_success() {
        receiver.deliveries.lock().unwrap().push(delivery);
    }
    status
}

/// Verifies `sha256=<hex>` as a receiver would.
pub fn signature_valid(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_digest) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connected MQTT client of one simulated device.
pub struct Publisher {
    pub client: AsyncClient,
    acked: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Connects to the broker and waits for CONNACK.
    pub async fn connect(addr: SocketAddr, client_id: &str) -> Publisher {
        Self::connect_with(
            addr,
            MqttOptions::new(client_id, addr.ip().to_string(), addr.port()),
        )
        .await
    }

    pub async fn connect_with(addr: SocketAddr, mut options: MqttOptions) -> Publisher {
        let _ = addr;
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, mut events) = AsyncClient::new(options, 1000);
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
        let acked = Arc::new(tokio::sync::Notify::new());
        let acked_in_loop = acked.clone();
        let task = tokio::spawn(async move {
            let mut connected = Some(connected_tx);
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        acked_in_loop.notify_waiters();
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), connected_rx)
            .await
            .unwrap()
            .unwrap();
        Publisher {
            client,
            acked,
            task,
        }
    }

    /// Publishes with QoS 1.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Publishes `{"ts": ..., "values": {metric: value}}` to `telemetry/{site}/{device}`.
    ///
    /// Each reading gets its own millisecond, because two readings of one series with the
    /// same timestamp are one point, and the later one replaces the earlier.
    pub async fn reading(&self, site: &str, device: &str, metric: &str, value: f64) {
        let ts = unique_millis();
        let payload = serde_json::json!({ "ts": ts, "values": { metric: value } }).to_string();
        self.publish(&format!("telemetry/{site}/{device}"), payload)
            .await;
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Returns the current time in epoch milliseconds, later than any value returned before.
pub fn unique_millis() -> i64 {
    static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let now = chrono::Utc::now().timestamp_millis();
    let previous = LAST.fetch_max(now, Ordering::SeqCst);
    if previous >= now {
        LAST.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        now
    }
}

/// GETs a JSON document from the server.
pub async fn get_json(http: SocketAddr, path: &str) -> serde_json::Value {
    let response = reqwest::get(format!("http://{http}{path}")).await.unwrap();
    assert!(
        response.status().is_success(),
        "GET {path}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

/// POSTs JSON, returning the status and the body.
pub async fn post_json(
    http: SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{http}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// Returns the alarms of a device from the API.
pub async fn alarms_of(http: SocketAddr, device: &str) -> Vec<serde_json::Value> {
    get_json(http, &format!("/api/v1/alarms?device={device}")).await["alarms"]
        .as_array()
        .unwrap()
        .clone()
}

/// Returns the value of one Prometheus sample line, such as
/// `stonelion_ingest_rejected_total{reason="malformed_json"}`.
pub async fn metric(http: SocketAddr, sample: &str) -> f64 {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(sample)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}
