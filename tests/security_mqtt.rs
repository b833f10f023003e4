//! MQTT authentication, topic isolation and rate limits on the real embedded broker, with
//! rumqttc and mosquitto clients.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, SubscribeReasonCode,
};
use serde_json::json;
use support::{Receiver, alarms_of, get_json, metric, start_server, wait_for};

/// Hashes with a low cost, so that debug builds verify quickly; the server reads the cost
/// from the PHC string.
fn cheap_hash(password: &str) -> String {
    let params = Params::new(1024, 1, 1, None).unwrap();
    let salt = SaltString::encode_b64(b"sixteen byte salt").unwrap();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

fn config(extra: &str) -> String {
    format!(
        r#"
[ingest]
stale_after = "1h"

{extra}

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
mqtt_password_hash = "{gas01}"

[[devices]]
id = "gas-02"
site = "plant-a"
profile = "gas-detector"
mqtt_password_hash = "{gas02}"

[[devices]]
id = "gas-b3"
site = "park-b3"
profile = "gas-detector"
mqtt_password_hash = "{gasb3}"

[[mqtt_users]]
username = "dashboard"
password_hash = "{dashboard}"
sites = ["plant-a"]

[[webhooks]]
name = "assistant"
url = "WEBHOOK_URL"
secret = "test-secret"
timeout = "2s"
initial_backoff = "50ms"
max_backoff = "200ms"
"#,
        gas01 = cheap_hash("pw-gas-01"),
        gas02 = cheap_hash("pw-gas-02"),
        gasb3 = cheap_hash("pw-gas-b3"),
        dashboard = cheap_hash("pw-dashboard"),
    )
}

fn options(
    addr: std::net::SocketAddr,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    if let Some((username, password)) = login {
        options.set_credentials(username, password);
    }
    options
}

/// Polls until CONNACK (`Ok`) or until the connection fails (`Err`).
async fn connack(events: &mut EventLoop) -> Result<(), String> {
    let outcome = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    outcome.unwrap_or_else(|_| Err("no CONNACK and no error within 15 s".to_owned()))
}

/// Connects and returns the client with its event loop after CONNACK.
async fn connect(
    addr: std::net::SocketAddr,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> (AsyncClient, EventLoop) {
    let (client, mut events) = AsyncClient::new(options(addr, client_id, login), 100);
    connack(&mut events).await.unwrap();
    (client, events)
}

/// Polls the event loop until `pick` returns a value.
async fn next_incoming<T>(
    events: &mut EventLoop,
    what: &str,
    mut pick: impl FnMut(Packet) -> Option<T>,
) -> T {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let Event::Incoming(packet) = events.poll().await.unwrap() else {
                continue;
            };
            if let Some(value) = pick(packet) {
                return value;
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Drives the event loop in the background, so that publishes go out.
fn drive(mut events: EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while events.poll().await.is_ok() {} })
}

async fn latest_gas(http: std::net::SocketAddr, device: &str) -> Option<f64> {
    get_json(http, &format!("/api/v1/devices/{device}")).await["latest"]["gas_lel"]["value"]
        .as_f64()
}

fn reading(value: f64) -> String {
    json!({ "ts": support::unique_millis(), "values": { "gas_lel": value } }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_gets_no_connack() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(""), &receiver.url(), data.path()).await;
    let addr = server.mqtt_addr;

    let cases = [
        (
            "wrong password",
            "gas-01",
            Some(("gas-01", "not-the-password")),
        ),
        ("no credentials", "gas-01", None),
        ("unknown user", "intruder", Some(("intruder", "pw-gas-01"))),
        (
            "client id of another device",
            "gas-02",
            Some(("gas-01", "pw-gas-01")),
        ),
    ];
    for (case, client_id, login) in cases {
        let (_client, mut events) = AsyncClient::new(options(addr, client_id, login), 10);
        assert!(
            connack(&mut events).await.is_err(),
            "{case}: the broker sent CONNACK"
        );
    }
    // On a loaded machine a client can give up waiting before the argon2 check ends, so
    // the count is awaited rather than read once.
    let sample = r#"stonelion_mqtt_denied_total{reason="bad_credentials"}"#;
    let http = server.http_addr;
    wait_for(
        "3 bad-credential denials",
        Duration::from_secs(30),
        || async { (metric(http, sample).await >= 3.0).then_some(()) },
    )
    .await;
    let denied = metric(http, sample).await;
    assert_eq!(
        denied, 3.0,
        "the client without credentials is refused by rumqttd before the handler"
    );

    connect(addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_cannot_publish_for_another() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(""), &receiver.url(), data.path()).await;
    let http = server.http_addr;

    let (victim, events) = connect(server.mqtt_addr, "gas-02", Some(("gas-02", "pw-gas-02"))).await;
    let _victim_loop = drive(events);
    victim
        .publish(
            "telemetry/plant-a/gas-02",
            QoS::AtLeastOnce,
            false,
            reading(40.0),
        )
        .await
        .unwrap();
    wait_for("gas-02 at 40", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-02").await == Some(40.0)).then_some(())
    })
    .await;

    // gas-01 tries to report gas-02 safe, over QoS 1 and QoS 0, then reports itself.
    let (attacker, mut events) =
        connect(server.mqtt_addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    attacker
        .publish(
            "telemetry/plant-a/gas-02",
            QoS::AtLeastOnce,
            false,
            reading(0.0),
        )
        .await
        .unwrap();
    let acked = next_incoming(&mut events, "PUBACK of the denied publish", |p| match p {
        Packet::PubAck(ack) => Some(ack.pkid),
        _ => None,
    })
    .await;
    assert_eq!(acked, 1, "the guard acknowledges the denied QoS 1 publish");
    attacker
        .publish(
            "telemetry/plant-a/gas-02/gas_lel",
            QoS::AtMostOnce,
            false,
            "0",
        )
        .await
        .unwrap();
    attacker
        .publish("status/plant-a/gas-02", QoS::AtMostOnce, false, "offline")
        .await
        .unwrap();
    attacker
        .publish(
            "telemetry/plant-a/gas-01",
            QoS::AtLeastOnce,
            false,
            reading(5.0),
        )
        .await
        .unwrap();
    let _attacker_loop = drive(events);

    wait_for("gas-01's own reading", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-01").await == Some(5.0)).then_some(())
    })
    .await;
    assert_eq!(
        latest_gas(http, "gas-02").await,
        Some(40.0),
        "a denied publish reached the pipeline"
    );
    let gas02 = get_json(http, "/api/v1/devices/gas-02").await;
    assert_eq!(
        gas02["online"], true,
        "the denied status message reached the pipeline"
    );
    let alarms = alarms_of(http, "gas-02").await;
    assert_eq!(alarms.len(), 1);
    assert_eq!(
        alarms[0]["state"], "active",
        "the fake reading cleared the alarm"
    );
    let denied = metric(
        http,
        r#"stonelion_mqtt_denied_total{reason="publish_not_allowed"}"#,
    )
    .await;
    assert_eq!(denied, 3.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_subscribes_to_own_site_only() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(""), &receiver.url(), data.path()).await;

    let (viewer, mut events) = connect(
        server.mqtt_addr,
        "dashboard:1",
        Some(("dashboard", "pw-dashboard")),
    )
    .await;
    viewer
        .subscribe_many([
            rumqttc::SubscribeFilter::new("telemetry/plant-a/#".to_owned(), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new("telemetry/park-b3/#".to_owned(), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new("#".to_owned(), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    let codes = next_incoming(&mut events, "SUBACK", |p| match p {
        Packet::SubAck(ack) => Some(ack.return_codes),
        _ => None,
    })
    .await;
    assert_eq!(codes.len(), 3);
    assert_eq!(codes[0], SubscribeReasonCode::Success(QoS::AtMostOnce));
    assert_eq!(codes[1], SubscribeReasonCode::Failure);
    assert_eq!(codes[2], SubscribeReasonCode::Failure);

    viewer
        .subscribe("status/park-b3/#", QoS::AtMostOnce)
        .await
        .unwrap();
    let codes = next_incoming(
        &mut events,
        "SUBACK of a wholly denied SUBSCRIBE",
        |p| match p {
            Packet::SubAck(ack) => Some(ack.return_codes),
            _ => None,
        },
    )
    .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Failure]);

    // The viewer may not publish; a device of each site publishes, and only plant-a's
    // message reaches the viewer.
    viewer
        .publish(
            "telemetry/plant-a/gas-01",
            QoS::AtMostOnce,
            false,
            reading(99.0),
        )
        .await
        .unwrap();
    let (b3, b3_events) = connect(server.mqtt_addr, "gas-b3", Some(("gas-b3", "pw-gas-b3"))).await;
    let _b3_loop = drive(b3_events);
    b3.publish(
        "telemetry/park-b3/gas-b3",
        QoS::AtLeastOnce,
        false,
        reading(1.0),
    )
    .await
    .unwrap();
    let (a, a_events) = connect(server.mqtt_addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    let _a_loop = drive(a_events);
    a.publish(
        "telemetry/plant-a/gas-01",
        QoS::AtLeastOnce,
        false,
        reading(2.0),
    )
    .await
    .unwrap();
    let (topic, payload) = next_incoming(&mut events, "a forwarded publish", |p| match p {
        Packet::Publish(publish) => Some((publish.topic, publish.payload)),
        _ => None,
    })
    .await;
    assert_eq!(topic, "telemetry/plant-a/gas-01");
    let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        payload["values"]["gas_lel"], 2.0,
        "the first message forwarded is not gas-01's own"
    );
    assert_eq!(
        latest_gas(server.http_addr, "gas-01").await,
        Some(2.0),
        "the viewer's publish was stored"
    );
    let denied = metric(
        server.http_addr,
        r#"stonelion_mqtt_denied_total{reason="subscribe_not_allowed"}"#,
    )
    .await;
    assert_eq!(denied, 3.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_subscribe_and_will_denied() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(""), &receiver.url(), data.path()).await;

    let (device, mut events) =
        connect(server.mqtt_addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    device
        .subscribe("telemetry/plant-a/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = next_incoming(&mut events, "SUBACK", |p| match p {
        Packet::SubAck(ack) => Some(ack.return_codes),
        _ => None,
    })
    .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Failure]);

    let mut own_will = options(server.mqtt_addr, "gas-02", Some(("gas-02", "pw-gas-02")));
    own_will.set_last_will(LastWill::new(
        "status/plant-a/gas-02",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let (_client, mut will_events) = AsyncClient::new(own_will, 10);
    connack(&mut will_events).await.unwrap();

    let mut foreign_will = options(server.mqtt_addr, "gas-b3", Some(("gas-b3", "pw-gas-b3")));
    foreign_will.set_last_will(LastWill::new(
        "status/plant-a/gas-01",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let (_client, mut will_events) = AsyncClient::new(foreign_will, 10);
    assert!(
        connack(&mut will_events).await.is_err(),
        "a last will on another device's topic was accepted"
    );
    let denied = metric(
        server.http_addr,
        r#"stonelion_mqtt_denied_total{reason="will_not_allowed"}"#,
    )
    .await;
    assert_eq!(denied, 1.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_spares_other_devices() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let limits = "[mqtt]\nmax_messages_per_second = 0.5\nmax_burst_messages = 3";
    let server = start_server(&config(limits), &receiver.url(), data.path()).await;
    let http = server.http_addr;

    let (flood, flood_events) =
        connect(server.mqtt_addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    let _flood_loop = drive(flood_events);
    for value in 1..=10 {
        flood
            .publish(
                "telemetry/plant-a/gas-01",
                QoS::AtLeastOnce,
                false,
                reading(f64::from(value)),
            )
            .await
            .unwrap();
    }
    wait_for(
        "7 rate-limited publishes",
        Duration::from_secs(10),
        || async {
            (metric(
                http,
                r#"stonelion_mqtt_denied_total{reason="rate_limited"}"#,
            )
            .await
                >= 7.0)
                .then_some(())
        },
    )
    .await;
    // The denials are counted at the broker, before the accepted readings reach the
    // pipeline, so the latest value is awaited rather than read once.
    wait_for(
        "the burst's last reading",
        Duration::from_secs(10),
        || async { (latest_gas(http, "gas-01").await == Some(3.0)).then_some(()) },
    )
    .await;
    let denied = metric(
        http,
        r#"stonelion_mqtt_denied_total{reason="rate_limited"}"#,
    )
    .await;
    assert_eq!(denied, 7.0, "the burst of 3 passes, the rest is dropped");

    let (calm, calm_events) =
        connect(server.mqtt_addr, "gas-02", Some(("gas-02", "pw-gas-02"))).await;
    let _calm_loop = drive(calm_events);
    calm.publish(
        "telemetry/plant-a/gas-02",
        QoS::AtLeastOnce,
        false,
        reading(7.0),
    )
    .await
    .unwrap();
    wait_for("gas-02's reading", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-02").await == Some(7.0)).then_some(())
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_needs_password() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(""), &receiver.url(), data.path()).await;
    let port = server.mqtt_addr.port().to_string();
    let publish = |password: &str, value: &str| {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "1",
                "-i",
                "gas-01",
                "-u",
                "gas-01",
                "-P",
                password,
            ])
            .args(["-t", "telemetry/plant-a/gas-01/gas_lel", "-m", value])
            .output()
            .expect("mosquitto_pub must be installed (Debian package mosquitto-clients)")
    };
    assert!(
        !publish("wrong", "60").status.success(),
        "mosquitto_pub succeeded with a wrong password"
    );
    let accepted = publish("pw-gas-01", "12.5");
    assert!(
        accepted.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    wait_for("the reading", Duration::from_secs(10), || async {
        (latest_gas(server.http_addr, "gas-01").await == Some(12.5)).then_some(())
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_broker_beyond_loopback_rejected() {
    let data = tempfile::tempdir().unwrap();
    let text = "[server]\nmqtt_listen = \"0.0.0.0:0\"\nhttp_listen = \"127.0.0.1:0\"\n";
    let mut open =
        stonelion::config::parse(text, stonelion::config::builtin::builtin_profiles()).unwrap();
    open.server.data_dir = data.path().to_owned();
    let error =
        stonelion::server::Server::start(open, std::sync::Arc::new(stonelion::clock::SystemClock))
            .await
            .err()
            .expect("Server::start must reject an open broker on 0.0.0.0");
    assert!(
        error
            .to_string()
            .contains("MQTT broker would accept anyone on 0.0.0.0:0"),
        "{error}"
    );
}

/// Keeps `clients` rumqttc clients logging in with wrong passwords under fresh unknown
/// usernames until `stop`, each giving up after 1 s, and counts their attempts.
fn spawn_login_flood(
    addr: std::net::SocketAddr,
    clients: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    use std::sync::atomic::Ordering;
    (0..clients)
        .map(|task| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut attempts = 0u64;
                // Bounded so that a broken stop flag cannot keep the test running.
                while !stop.load(Ordering::SeqCst) && attempts < 10_000 {
                    let name = format!("intruder-{task}-{attempts}");
                    let login = Some((name.as_str(), "guessed"));
                    let (_client, mut events) = AsyncClient::new(options(addr, &name, login), 10);
                    let mut network = events.network_options();
                    network.set_connection_timeout(1);
                    events.set_network_options(network);
                    assert!(
                        connack(&mut events).await.is_err(),
                        "a wrong password got CONNACK"
                    );
                    attempts += 1;
                }
                attempts
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_flood_spares_verified_device() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(""), &receiver.url(), data.path()).await;
    let (addr, http) = (server.mqtt_addr, server.http_addr);

    // The first login runs argon2 and puts the credential in the verified-login cache.
    let (first, first_events) = connect(addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    let first_loop = drive(first_events);
    first.disconnect().await.unwrap();
    first_loop.await.unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = spawn_login_flood(addr, 12, &stop);
    let sample = r#"stonelion_mqtt_denied_total{reason="bad_credentials"}"#;
    wait_for(
        "the flood's first denials",
        Duration::from_secs(30),
        || async { (metric(http, sample).await >= 4.0).then_some(()) },
    )
    .await;

    let started = std::time::Instant::now();
    let (cached, cached_events) = connect(addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    let cached_time = started.elapsed();
    let _cached_loop = drive(cached_events);

    // A device without a cached credential waits for a password-check slot.
    let started = std::time::Instant::now();
    let (_uncached, mut uncached_events) =
        AsyncClient::new(options(addr, "gas-b3", Some(("gas-b3", "pw-gas-b3"))), 10);
    let uncached = connack(&mut uncached_events).await;
    let uncached_time = started.elapsed();
    let flood_denials = metric(http, sample).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut attempts = 0;
    for task in flood {
        attempts += task.await.unwrap();
    }
    println!(
        "flood: {attempts} logins by 12 clients; cached login {cached_time:?}, uncached \
         login {uncached_time:?} ({uncached:?}), {flood_denials} bad-credential denials"
    );
    assert!(
        cached_time < Duration::from_secs(3),
        "the cached login took {cached_time:?} during the flood"
    );
    assert!(
        uncached.is_err() || uncached_time > cached_time,
        "the uncached login ({uncached_time:?}) was not slower than the cached one, so the \
         flood did not load the password checks"
    );
    cached
        .publish(
            "telemetry/plant-a/gas-01",
            QoS::AtLeastOnce,
            false,
            reading(21.0),
        )
        .await
        .unwrap();
    wait_for("gas-01's reading", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-01").await == Some(21.0)).then_some(())
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_start_username_backoff() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let limits = "[mqtt]\nmax_failed_logins = 3\nfailed_login_backoff = \"1h\"";
    let server = start_server(&config(limits), &receiver.url(), data.path()).await;
    let (addr, http) = (server.mqtt_addr, server.http_addr);
    let backoff_sample = r#"stonelion_mqtt_denied_total{reason="login_backoff"}"#;
    let bad_sample = r#"stonelion_mqtt_denied_total{reason="bad_credentials"}"#;

    // gas-01's credential is cached, but gas-02's is not.
    let (first, first_events) = connect(addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    let first_loop = drive(first_events);
    first.disconnect().await.unwrap();
    first_loop.await.unwrap();

    for device in ["gas-01", "gas-02"] {
        for attempt in 1..=3 {
            let (_client, mut events) =
                AsyncClient::new(options(addr, device, Some((device, "guessed"))), 10);
            assert!(
                connack(&mut events).await.is_err(),
                "{device}: wrong password {attempt} got CONNACK"
            );
        }
    }
    wait_for(
        "6 bad-credential denials",
        Duration::from_secs(30),
        || async { (metric(http, bad_sample).await >= 6.0).then_some(()) },
    )
    .await;
    assert_eq!(metric(http, backoff_sample).await, 0.0);

    // In backoff, gas-02's correct password is denied without a password check.
    let (_client, mut events) =
        AsyncClient::new(options(addr, "gas-02", Some(("gas-02", "pw-gas-02"))), 10);
    assert!(
        connack(&mut events).await.is_err(),
        "gas-02 logged in during its backoff"
    );
    wait_for(
        "a login_backoff denial",
        Duration::from_secs(10),
        || async { (metric(http, backoff_sample).await >= 1.0).then_some(()) },
    )
    .await;
    assert_eq!(metric(http, bad_sample).await, 6.0);

    // A cached credential still logs in, so guessing at gas-01 cannot lock it out.
    let (device, device_events) = connect(addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    let _device_loop = drive(device_events);
    device
        .publish(
            "telemetry/plant-a/gas-01",
            QoS::AtLeastOnce,
            false,
            reading(22.0),
        )
        .await
        .unwrap();
    wait_for("gas-01's reading", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-01").await == Some(22.0)).then_some(())
    })
    .await;

    // A wrong password for gas-01 in backoff is denied by the backoff, not by argon2.
    let (_client, mut events) =
        AsyncClient::new(options(addr, "gas-01", Some(("gas-01", "guessed"))), 10);
    assert!(connack(&mut events).await.is_err());
    wait_for(
        "a second login_backoff denial",
        Duration::from_secs(10),
        || async { (metric(http, backoff_sample).await >= 2.0).then_some(()) },
    )
    .await;
    assert_eq!(metric(http, bad_sample).await, 6.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_takeovers_counted_and_limited() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let limits = "[mqtt]\nmax_client_takeovers_per_minute = 2\nclient_takeover_backoff = \"1h\"";
    let server = start_server(&config(limits), &receiver.url(), data.path()).await;
    let (addr, http) = (server.mqtt_addr, server.http_addr);
    let takeovers = "stonelion_mqtt_client_takeovers_total";
    let backoff_sample = r#"stonelion_mqtt_denied_total{reason="takeover_backoff"}"#;
    let login = Some(("gas-01", "pw-gas-01"));

    let (mut holder, events) = connect(addr, "gas-01", login).await;
    let mut holder_loop = drive(events);
    assert_eq!(metric(http, takeovers).await, 0.0);
    for expected in 1..=3 {
        let (newer, events) = connect(addr, "gas-01", login).await;
        assert_eq!(
            metric(http, takeovers).await,
            f64::from(expected),
            "takeover {expected} was not counted"
        );
        tokio::time::timeout(Duration::from_secs(10), holder_loop)
            .await
            .expect("the broker closed the older connection within 10 s")
            .unwrap();
        holder = newer;
        holder_loop = drive(events);
    }

    // Takeover 3 was over the limit of 2 per minute, so new connections are denied.
    let (_denied, mut denied_events) = AsyncClient::new(options(addr, "gas-01", login), 10);
    assert!(
        connack(&mut denied_events).await.is_err(),
        "a connection in takeover backoff got CONNACK"
    );
    assert_eq!(metric(http, backoff_sample).await, 1.0);
    assert_eq!(metric(http, takeovers).await, 3.0);

    // The connection that has the client id keeps publishing.
    holder
        .publish(
            "telemetry/plant-a/gas-01",
            QoS::AtLeastOnce,
            false,
            reading(23.0),
        )
        .await
        .unwrap();
    wait_for("the holder's reading", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-01").await == Some(23.0)).then_some(())
    })
    .await;
    assert!(!holder_loop.is_finished(), "the holder was disconnected");

    // Other client ids are not affected.
    connect(addr, "gas-02", Some(("gas-02", "pw-gas-02"))).await;
    server.shutdown().await;
}

/// Sends a request to `path` with an optional JSON body and returns the status and the
/// JSON response.
async fn send_json(
    http: std::net::SocketAddr,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new().request(method, format!("http://{http}{path}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// Returns whether a login gets CONNACK. A successful login is disconnected again.
async fn logs_in(addr: std::net::SocketAddr, username: &str, password: &str) -> bool {
    let login = Some((username, password));
    let (client, mut events) = AsyncClient::new(options(addr, username, login), 10);
    if connack(&mut events).await.is_err() {
        return false;
    }
    client.disconnect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), drive(events))
        .await
        .expect("the connection closed after DISCONNECT")
        .unwrap();
    true
}

/// Writes `text` as the config file `stonelion.toml` in `dir` and starts a server from it,
/// so that `POST /api/v1/admin/reload` reads the file again.
async fn start_from_file(dir: &std::path::Path, text: &str) -> stonelion::server::Server {
    let config_path = dir.join("stonelion.toml");
    std::fs::write(&config_path, text).unwrap();
    let overrides = stonelion::config::Overrides {
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        mqtt_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(dir.join("data")),
    };
    let file = stonelion::config::managed::ConfigFile {
        path: config_path,
        overrides,
    };
    stonelion::server::Server::start_with_file(
        file,
        std::sync::Arc::new(stonelion::clock::SystemClock),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_change_invalidates_cached_login() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let config_path = dir.path().join("stonelion.toml");
    let text = config("").replace("WEBHOOK_URL", &receiver.url());
    let server = start_from_file(dir.path(), &text).await;
    let (addr, http) = (server.mqtt_addr, server.http_addr);

    assert!(logs_in(addr, "gas-01", "pw-gas-01").await, "first login");
    assert!(logs_in(addr, "gas-01", "pw-gas-01").await, "cached login");
    // Ten wrong passwords put gas-01 in backoff, which denies the eleventh login; the
    // password change below ends it.
    for _ in 0..11 {
        assert!(!logs_in(addr, "gas-01", "guess").await);
    }
    let backoff = metric(
        http,
        r#"stonelion_mqtt_denied_total{reason="login_backoff"}"#,
    )
    .await;
    assert_eq!(backoff, 1.0, "the eleventh login is denied by the backoff");

    let changed = text.replace(&cheap_hash("pw-gas-01"), &cheap_hash("pw-gas-01-new"));
    assert_ne!(changed, text);
    std::fs::write(&config_path, changed).unwrap();
    let (status, body) = send_json(http, reqwest::Method::POST, "/api/v1/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["devices_changed"], json!(["gas-01"]), "{body}");
    assert_eq!(body["restart_required"], json!([]), "{body}");
    assert!(
        !logs_in(addr, "gas-01", "pw-gas-01").await,
        "the cached old password logged in after the change"
    );
    assert!(
        logs_in(addr, "gas-01", "pw-gas-01-new").await,
        "new password"
    );

    // A managed device's account exists from its PUT until its DELETE.
    let device = json!({
        "site": "plant-a",
        "profile": "gas-detector",
        "mqtt_password_hash": cheap_hash("pw-gas-09"),
    });
    let path = "/api/v1/devices/gas-09";
    let (status, body) = send_json(http, reqwest::Method::PUT, path, Some(device)).await;
    assert_eq!(status, 201, "{body}");
    assert!(logs_in(addr, "gas-09", "pw-gas-09").await, "managed device");
    let (status, body) = send_json(http, reqwest::Method::DELETE, path, None).await;
    assert_eq!(status, 204, "{body}");
    assert!(
        !logs_in(addr, "gas-09", "pw-gas-09").await,
        "a deleted device's cached password logged in"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_connected_device() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let text = config("").replace("WEBHOOK_URL", &receiver.url());
    let server = start_from_file(dir.path(), &text).await;
    let (addr, http) = (server.mqtt_addr, server.http_addr);
    let (device, events) = connect(addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    let _device_loop = drive(events);

    let entry = "id = \"gas-01\"\nsite = \"plant-a\"";
    assert!(
        text.contains(entry),
        "the test config has gas-01 in plant-a"
    );
    let moved = text.replace(entry, "id = \"gas-01\"\nsite = \"park-b3\"");
    std::fs::write(dir.path().join("stonelion.toml"), moved).unwrap();
    let (status, body) = send_json(http, reqwest::Method::POST, "/api/v1/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["devices_changed"], json!(["gas-01"]), "{body}");

    // The connection logged in while gas-01 was in plant-a, and publishes to its new site.
    device
        .publish(
            "telemetry/park-b3/gas-01",
            QoS::AtLeastOnce,
            false,
            reading(24.0),
        )
        .await
        .unwrap();
    wait_for(
        "the reading at the new site",
        Duration::from_secs(10),
        || async { (latest_gas(http, "gas-01").await == Some(24.0)).then_some(()) },
    )
    .await;
    let denied = metric(
        http,
        r#"stonelion_mqtt_denied_total{reason="publish_not_allowed"}"#,
    )
    .await;
    assert_eq!(denied, 0.0);
    server.shutdown().await;
}

/// Encodes an MQTT 3.1.1 CONNECT with a username and password.
fn raw_connect(client_id: &str, username: &str, password: &str) -> Vec<u8> {
    let string = |s: &str| {
        let mut bytes = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
        bytes.extend(s.as_bytes());
        bytes
    };
    // Protocol name and level 4, flags: username, password, clean session; keep alive 30 s.
    let mut body = string("MQTT");
    body.extend([4, 0xc2, 0, 30]);
    body.extend(string(client_id));
    body.extend(string(username));
    body.extend(string(password));
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend(body);
    packet
}

/// Encodes an MQTT 3.1.1 QoS 1 PUBLISH with packet id 1.
fn raw_publish(topic: &str, payload: &str) -> Vec<u8> {
    let mut body = u16::try_from(topic.len()).unwrap().to_be_bytes().to_vec();
    body.extend(topic.as_bytes());
    body.extend([0, 1]);
    body.extend(payload.as_bytes());
    let mut packet = vec![0x32, u8::try_from(body.len()).unwrap()];
    packet.extend(body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connect_closes_connection() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(""), &receiver.url(), data.path()).await;
    let http = server.http_addr;

    let (victim, events) = connect(server.mqtt_addr, "gas-02", Some(("gas-02", "pw-gas-02"))).await;
    let _victim_loop = drive(events);
    victim
        .publish(
            "telemetry/plant-a/gas-02",
            QoS::AtLeastOnce,
            false,
            reading(40.0),
        )
        .await
        .unwrap();
    wait_for("gas-02 at 40", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-02").await == Some(40.0)).then_some(())
    })
    .await;

    // gas-01 logs in, then sends a second CONNECT as gas-02 with a wrong password, which
    // rumqttd does not authenticate, and a reading for gas-02.
    let mut stream = tokio::net::TcpStream::connect(server.mqtt_addr)
        .await
        .unwrap();
    stream
        .write_all(&raw_connect("gas-01", "gas-01", "pw-gas-01"))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut connack))
        .await
        .expect("CONNACK within 10 s")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "gas-01 is logged in");
    let mut attack = raw_connect("gas-01", "gas-02", "wrong");
    attack.extend(raw_publish("telemetry/plant-a/gas-02", &reading(0.0)));
    stream.write_all(&attack).await.unwrap();

    // MQTT 3.1.1 section 3.1: a second CONNECT is a protocol violation that closes the
    // connection.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "the connection stayed open after a second CONNECT"
    );
    assert!(
        rest.is_empty(),
        "the broker answered the packets after the second CONNECT: {rest:?}"
    );

    let (gas01, events) = connect(server.mqtt_addr, "gas-01", Some(("gas-01", "pw-gas-01"))).await;
    let _gas01_loop = drive(events);
    gas01
        .publish(
            "telemetry/plant-a/gas-01",
            QoS::AtLeastOnce,
            false,
            reading(5.0),
        )
        .await
        .unwrap();
    wait_for("gas-01's own reading", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-01").await == Some(5.0)).then_some(())
    })
    .await;
    assert_eq!(
        latest_gas(http, "gas-02").await,
        Some(40.0),
        "gas-01 published a reading for gas-02"
    );
    let denied = metric(
        http,
        r#"stonelion_mqtt_denied_total{reason="second_connect"}"#,
    )
    .await;
    assert_eq!(denied, 1.0);
    server.shutdown().await;
}

/// Encodes an MQTT 3.1.1 SUBSCRIBE of one filter at QoS 0, with packet id 1.
fn raw_subscribe(filter: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend(u16::try_from(filter.len()).unwrap().to_be_bytes());
    body.extend(filter.as_bytes());
    body.push(0);
    let mut packet = vec![0x82, u8::try_from(body.len()).unwrap()];
    packet.extend(body);
    packet
}

/// Opens a raw connection logged in as `username` and returns it after CONNACK.
async fn raw_login(
    addr: std::net::SocketAddr,
    client_id: &str,
    username: &str,
    password: &str,
) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&raw_connect(client_id, username, password))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut connack))
        .await
        .expect("CONNACK within 10 s")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "{username} is logged in");
    stream
}

/// Reads until the broker closes `stream` and returns what it sent before closing.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, connection: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;

    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("{connection} stayed open"))
        .unwrap();
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_change_closes_live_connections() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let text = config("").replace("WEBHOOK_URL", &receiver.url());
    let server = start_from_file(dir.path(), &text).await;
    let (addr, http) = (server.mqtt_addr, server.http_addr);

    let mut device = raw_login(addr, "gas-01", "gas-01", "pw-gas-01").await;
    device
        .write_all(&raw_publish("telemetry/plant-a/gas-01", &reading(11.0)))
        .await
        .unwrap();
    let mut puback = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), device.read_exact(&mut puback))
        .await
        .expect("PUBACK within 10 s")
        .unwrap();
    assert_eq!(puback, [0x40, 2, 0, 1], "the first reading is acknowledged");
    wait_for("gas-01 at 11", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-01").await == Some(11.0)).then_some(())
    })
    .await;
    let mut viewer = raw_login(addr, "dashboard:raw", "dashboard", "pw-dashboard").await;
    viewer
        .write_all(&raw_subscribe("telemetry/plant-a/#"))
        .await
        .unwrap();
    let mut suback = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), viewer.read_exact(&mut suback))
        .await
        .expect("SUBACK within 10 s")
        .unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 0], "the viewer may read plant-a");
    let (other, events) = connect(addr, "gas-02", Some(("gas-02", "pw-gas-02"))).await;
    let _other_loop = drive(events);

    // gas-01 gets a new password, and the dashboard moves from plant-a to park-b3.
    let mut changed = text.replace(&cheap_hash("pw-gas-01"), &cheap_hash("pw-gas-01-new"));
    let sites = "password_hash = \"{}\"\nsites = [\"plant-a\"]";
    let viewer_entry = sites.replace("{}", &cheap_hash("pw-dashboard"));
    assert!(
        changed.contains(&viewer_entry),
        "the test config has the dashboard"
    );
    changed = changed.replace(&viewer_entry, &viewer_entry.replace("plant-a", "park-b3"));
    std::fs::write(dir.path().join("stonelion.toml"), changed).unwrap();
    let (status, body) = send_json(http, reqwest::Method::POST, "/api/v1/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["devices_changed"], json!(["gas-01"]), "{body}");
    assert_eq!(body["restart_required"], json!([]), "{body}");

    // gas-01's next packet closes its connection, unacknowledged and not stored.
    device
        .write_all(&raw_publish("telemetry/plant-a/gas-01", &reading(99.0)))
        .await
        .unwrap();
    let rest = read_until_closed(&mut device, "the connection with the old password").await;
    assert!(
        rest.is_empty(),
        "the broker answered the old password's publish: {rest:?}"
    );

    // The unchanged device stays connected, and its reading is not delivered to the
    // viewer, whose connection closes instead.
    other
        .publish(
            "telemetry/plant-a/gas-02",
            QoS::AtLeastOnce,
            false,
            reading(22.0),
        )
        .await
        .unwrap();
    wait_for("gas-02 at 22", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-02").await == Some(22.0)).then_some(())
    })
    .await;
    let rest = read_until_closed(&mut viewer, "the viewer moved to another site").await;
    assert!(
        rest.is_empty(),
        "the viewer received plant-a data: {rest:?}"
    );
    assert_eq!(latest_gas(http, "gas-01").await, Some(11.0));

    let closed = metric(
        http,
        r#"stonelion_mqtt_denied_total{reason="account_changed"}"#,
    )
    .await;
    assert_eq!(closed, 2.0);
    assert!(
        logs_in(addr, "gas-01", "pw-gas-01-new").await,
        "new password"
    );
    assert!(
        logs_in(addr, "dashboard", "pw-dashboard").await,
        "unchanged password"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reset_before_connack_keeps_broker_up() {
    use tokio::io::AsyncWriteExt as _;

    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let limits = "[mqtt]\nmax_connections = 8";
    let server = start_server(&config(limits), &receiver.url(), data.path()).await;
    let addr = server.mqtt_addr;

    // The client resets the connection right after CONNECT, before the password check
    // ends, so the broker's CONNACK write fails.
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(&raw_connect("gas-01", "gas-01", "pw-gas-01"))
            .await
            .unwrap();
        stream.set_zero_linger().unwrap();
        drop(stream);
    }

    // Viewers may use a new client id for each connection. Each reset with a fresh
    // client id would keep a connection slot if the broker did not free it, and this
    // broker has only 8 slots.
    for n in 0..40 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let client_id = format!("dashboard:{n}");
        stream
            .write_all(&raw_connect(&client_id, "dashboard", "pw-dashboard"))
            .await
            .unwrap();
        stream.set_zero_linger().unwrap();
        drop(stream);
    }

    let mut same = raw_login(addr, "gas-01", "gas-01", "pw-gas-01").await;
    same.write_all(&raw_publish("telemetry/plant-a/gas-01", &reading(3.0)))
        .await
        .unwrap();
    let http = server.http_addr;
    wait_for("gas-01 at 3", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-01").await == Some(3.0)).then_some(())
    })
    .await;
    raw_login(addr, "gas-02", "gas-02", "pw-gas-02").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_session_does_not_outlive_its_sites() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let text = config("").replace("WEBHOOK_URL", &receiver.url());
    let server = start_from_file(dir.path(), &text).await;
    let (addr, http) = (server.mqtt_addr, server.http_addr);
    let viewer_options = || {
        let mut options = options(addr, "dashboard:kept", Some(("dashboard", "pw-dashboard")));
        options.set_clean_session(false);
        options
    };

    // The viewer asks for a kept session and subscribes to plant-a at QoS 1.
    let (viewer, mut events) = AsyncClient::new(viewer_options(), 10);
    connack(&mut events).await.unwrap();
    viewer
        .subscribe("telemetry/plant-a/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    next_incoming(&mut events, "SUBACK", |p| match p {
        Packet::SubAck(ack) => Some(ack),
        _ => None,
    })
    .await;
    viewer.disconnect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), drive(events))
        .await
        .unwrap()
        .unwrap();

    // While it is away, it loses plant-a, and plant-a publishes.
    let sites = "password_hash = \"{}\"\nsites = [\"plant-a\"]";
    let entry = sites.replace("{}", &cheap_hash("pw-dashboard"));
    assert!(text.contains(&entry), "the test config has the dashboard");
    let changed = text.replace(&entry, &entry.replace("plant-a", "park-b3"));
    std::fs::write(dir.path().join("stonelion.toml"), changed).unwrap();
    let (status, body) = send_json(http, reqwest::Method::POST, "/api/v1/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let (gas02, events) = connect(addr, "gas-02", Some(("gas-02", "pw-gas-02"))).await;
    let _gas02_loop = drive(events);
    gas02
        .publish(
            "telemetry/plant-a/gas-02",
            QoS::AtLeastOnce,
            false,
            reading(7.0),
        )
        .await
        .unwrap();
    wait_for("gas-02 at 7", Duration::from_secs(10), || async {
        (latest_gas(http, "gas-02").await == Some(7.0)).then_some(())
    })
    .await;

    // Back with the same client id and a kept session asked for, it gets a clean one: no
    // plant-a message arrives before the park-b3 one it subscribes to now.
    let (viewer, mut events) = AsyncClient::new(viewer_options(), 10);
    let session_present = next_incoming(&mut events, "CONNACK", |p| match p {
        Packet::ConnAck(ack) => Some(ack.session_present),
        _ => None,
    })
    .await;
    assert!(!session_present, "the broker kept the viewer's old session");
    viewer
        .subscribe("telemetry/park-b3/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    next_incoming(&mut events, "SUBACK", |p| match p {
        Packet::SubAck(ack) => Some(ack),
        _ => None,
    })
    .await;
    let (gasb3, b3_events) = connect(addr, "gas-b3", Some(("gas-b3", "pw-gas-b3"))).await;
    let _gasb3_loop = drive(b3_events);
    gasb3
        .publish(
            "telemetry/park-b3/gas-b3",
            QoS::AtLeastOnce,
            false,
            reading(8.0),
        )
        .await
        .unwrap();
    let topic = next_incoming(&mut events, "a park-b3 message", |p| match p {
        Packet::Publish(publish) => Some(publish.topic),
        _ => None,
    })
    .await;
    assert_eq!(
        topic, "telemetry/park-b3/gas-b3",
        "a plant-a message came first"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_refuses_to_remove_every_account() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let text = config("").replace("WEBHOOK_URL", &receiver.url());
    let server = start_from_file(dir.path(), &text).await;
    let (addr, http) = (server.mqtt_addr, server.http_addr);

    let no_accounts: String = text
        .split("[[mqtt_users]]")
        .next()
        .unwrap()
        .lines()
        .filter(|line| !line.starts_with("mqtt_password_hash"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(!no_accounts.contains("password_hash"));
    std::fs::write(dir.path().join("stonelion.toml"), no_accounts).unwrap();
    let (status, body) = send_json(http, reqwest::Method::POST, "/api/v1/admin/reload", None).await;
    assert_eq!(status, 409, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("no MQTT account"), "{message}");
    assert!(
        logs_in(addr, "gas-01", "pw-gas-01").await,
        "the running accounts were kept"
    );
    server.shutdown().await;
}
