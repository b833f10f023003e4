//! Rule timing against a real server: a reading dated in the future does not hold back
//! later readings, an old reading cannot clear an alarm after a restart, a `min_duration`
//! wait confirms without another reading, and a restart keeps each device's latest values
//! and staleness timer.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stonelion::clock::{Clock, ManualClock, SharedClock};
use stonelion::config::builtin::builtin_profiles;
use stonelion::model::Timestamp;
use stonelion::server::Server;
use support::{CONFIG, Publisher, alarms_of, get_json, post_json, unique_millis, wait_for};

const WAIT: Duration = Duration::from_secs(15);

/// Starts a server as `support::start_server` does, with a clock of the test's choice.
async fn start(config: &str, data: &Path, clock: SharedClock) -> Server {
    let text = config.replace("WEBHOOK_URL", "http://127.0.0.1:9/hook");
    let mut config = stonelion::config::parse(&text, builtin_profiles()).unwrap();
    config.server.data_dir = data.to_owned();
    config.server.http_listen = "127.0.0.1:0".parse().unwrap();
    config.server.mqtt_listen = "127.0.0.1:0".parse().unwrap();
    config.storage.commit_interval = Duration::from_millis(50);
    Server::start(config, clock).await.unwrap()
}

fn system_clock() -> SharedClock {
    Arc::new(stonelion::clock::SystemClock)
}

async fn publish(device: &Publisher, payload: serde_json::Value) {
    device
        .publish("telemetry/plant-a/gas-01", payload.to_string())
        .await;
}

/// Returns the device's latest `gas_lel` value from the API, if any.
async fn latest_gas(http: std::net::SocketAddr) -> Option<f64> {
    get_json(http, "/api/v1/devices/gas-01").await["latest"]["gas_lel"]["value"].as_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_reading_does_not_hold_back_alarms() {
    let data = tempfile::tempdir().unwrap();
    let server = start(CONFIG, data.path(), system_clock()).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;

    publish(
        &device,
        serde_json::json!({ "values": { "gas_lel": 10.0 } }),
    )
    .await;
    wait_for("the first reading", WAIT, || async {
        (latest_gas(http).await == Some(10.0)).then_some(())
    })
    .await;
    // Four minutes ahead, inside the allowed clock skew of five minutes.
    let future = unique_millis() + 240_000;
    publish(
        &device,
        serde_json::json!({ "ts": future, "values": { "gas_lel": 5.0 } }),
    )
    .await;
    wait_for("the future reading", WAIT, || async {
        (latest_gas(http).await == Some(5.0)).then_some(())
    })
    .await;

    publish(
        &device,
        serde_json::json!({ "values": { "gas_lel": 80.0 } }),
    )
    .await;
    let alarm = wait_for("an alarm after the future reading", WAIT, || async {
        alarms_of(http, "gas-01")
            .await
            .into_iter()
            .find(|a| a["state"] == "active")
    })
    .await;
    assert_eq!(alarm["level"], 2);
    assert_eq!(alarm["value"], 80.0);
    assert_eq!(
        latest_gas(http).await,
        Some(80.0),
        "latest must show the reading after the future one"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_reading_after_restart_keeps_alarm() {
    let data = tempfile::tempdir().unwrap();
    let server = start(CONFIG, data.path(), system_clock()).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    let raised_ts = unique_millis();
    publish(
        &device,
        serde_json::json!({ "ts": raised_ts, "values": { "gas_lel": 60.0 } }),
    )
    .await;
    let alarm = wait_for("a level 2 alarm", WAIT, || async {
        alarms_of(http, "gas-01")
            .await
            .into_iter()
            .find(|a| a["level"] == 2)
    })
    .await;
    let id = alarm["id"].as_i64().unwrap();
    wait_for("the stored reading", WAIT, || async {
        let s = get_json(
            http,
            "/api/v1/devices/gas-01/series?metric=gas_lel&from=now-1h",
        )
        .await;
        (s["points"].as_array().unwrap().len() == 1).then_some(())
    })
    .await;
    drop(device);
    server.shutdown().await;

    let server = start(CONFIG, data.path(), system_clock()).await;
    let http = server.http_addr;
    let state = get_json(http, "/api/v1/devices/gas-01").await;
    assert_eq!(
        state["latest"]["gas_lel"]["value"], 60.0,
        "latest value restored: {state}"
    );
    assert!(
        state["last_seen"].is_string(),
        "last_seen restored: {state}"
    );

    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    let yesterday = unique_millis() - 24 * 3600 * 1000;
    publish(
        &device,
        serde_json::json!({ "ts": yesterday, "values": { "gas_lel": 0.0 } }),
    )
    .await;
    // A current reading clears the alarm, so its transition shows which reading did it.
    let clear_ts = unique_millis();
    publish(
        &device,
        serde_json::json!({ "ts": clear_ts, "values": { "gas_lel": 1.0 } }),
    )
    .await;
    let cleared = wait_for("the alarm cleared", WAIT, || async {
        let alarm = get_json(http, &format!("/api/v1/alarms/{id}")).await;
        (alarm["state"] == "cleared").then_some(alarm)
    })
    .await;
    let history = cleared["history"].as_array().unwrap();
    let clears: Vec<&serde_json::Value> = history
        .iter()
        .filter(|t| t["event"] == "alarm.cleared")
        .collect();
    assert_eq!(clears.len(), 1, "{history:?}");
    assert_eq!(
        clears[0]["value"], 1.0,
        "the day-old reading must not clear the alarm: {history:?}"
    );
    assert_eq!(cleared["value"], 1.0);
    assert_eq!(
        latest_gas(http).await,
        Some(1.0),
        "latest must not show the day-old reading"
    );
    server.shutdown().await;
}

const MIN_DURATION_CONFIG: &str = r#"
[ingest]
stale_after = "1h"

[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"

[[devices.rules]]
id = "gas-lel"
metric = "gas_lel"
kind = "above"
level1 = 25.0
level2 = 40.0
deadband = 2.0
min_duration = "3s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_duration_raises_without_next_reading() {
    let data = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Timestamp(unique_millis()));
    let server = start(MIN_DURATION_CONFIG, data.path(), Arc::new(clock.clone())).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;

    let reading_ts = clock.now().0;
    publish(
        &device,
        serde_json::json!({ "ts": reading_ts, "values": { "gas_lel": 45.0 } }),
    )
    .await;
    wait_for("the reading", WAIT, || async {
        (latest_gas(http).await == Some(45.0)).then_some(())
    })
    .await;
    clock.advance_millis(2_000);
    // Not a synchronisation: the alarm stage checks a pending level at least every 250 ms,
    // so a raise before `min_duration` would show within this time.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        alarms_of(http, "gas-01").await.is_empty(),
        "raised before min_duration passed"
    );

    clock.advance_millis(1_000);
    let alarm = wait_for("the alarm raised after min_duration", WAIT, || async {
        alarms_of(http, "gas-01").await.into_iter().next()
    })
    .await;
    assert_eq!(alarm["level"], 2);
    assert_eq!(alarm["value"], 45.0);
    let raised_at =
        chrono::DateTime::parse_from_rfc3339(alarm["raised_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        raised_at.timestamp_millis(),
        reading_ts,
        "raised with the reading's timestamp"
    );
    server.shutdown().await;
}

const STALE_CONFIG: &str = r#"
[ingest]
stale_after = "5s"

[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_staleness_timer() {
    let data = tempfile::tempdir().unwrap();
    let start_ms = unique_millis();
    let clock = ManualClock::new(Timestamp(start_ms));
    let server = start(STALE_CONFIG, data.path(), Arc::new(clock.clone())).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    publish(
        &device,
        serde_json::json!({ "ts": start_ms, "values": { "gas_lel": 3.0 } }),
    )
    .await;
    wait_for("the stored reading", WAIT, || async {
        let s = get_json(
            http,
            "/api/v1/devices/gas-01/series?metric=gas_lel&from=now-1h",
        )
        .await;
        (s["points"].as_array().unwrap().len() == 1).then_some(())
    })
    .await;
    drop(device);
    server.shutdown().await;

    // The server was down for 4 s of the device's 5 s staleness timeout.
    clock.set(Timestamp(start_ms + 4_000));
    let server = start(STALE_CONFIG, data.path(), Arc::new(clock.clone())).await;
    let http = server.http_addr;
    let state = get_json(http, "/api/v1/devices/gas-01").await;
    assert_eq!(
        state["latest"]["gas_lel"]["value"], 3.0,
        "latest value restored: {state}"
    );
    let last_seen =
        chrono::DateTime::parse_from_rfc3339(state["last_seen"].as_str().unwrap()).unwrap();
    assert_eq!(
        last_seen.timestamp_millis(),
        start_ms,
        "last_seen restored from the stored reading"
    );
    assert!(alarms_of(http, "gas-01").await.is_empty());

    // 6 s after the last reading, but only 2 s after the restart.
    clock.advance_millis(2_000);
    let alarm = wait_for("the offline alarm", WAIT, || async {
        alarms_of(http, "gas-01")
            .await
            .into_iter()
            .find(|a| a["rule"] == "device-offline")
    })
    .await;
    assert_eq!(alarm["state"], "active");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_future_reading_blocks_reset() {
    let data = tempfile::tempdir().unwrap();
    let server = start(CONFIG, data.path(), system_clock()).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    let future = unique_millis() + 240_000;
    publish(
        &device,
        serde_json::json!({ "ts": future, "values": { "gas_lel": 5.0 } }),
    )
    .await;
    publish(
        &device,
        serde_json::json!({ "values": { "gas_lel": 60.0 } }),
    )
    .await;
    let alarm = wait_for("a level 2 alarm", WAIT, || async {
        alarms_of(http, "gas-01")
            .await
            .into_iter()
            .find(|a| a["level"] == 2)
    })
    .await;
    let id = alarm["id"].as_i64().unwrap();
    wait_for("both readings stored", WAIT, || async {
        let path = format!(
            "/api/v1/devices/gas-01/series?metric=gas_lel&from=now-1h&to={}",
            future + 1
        );
        let s = get_json(http, &path).await;
        (s["points"].as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await;
    drop(device);
    server.shutdown().await;

    // Storage orders by the device's timestamps, so after the restart the newest stored
    // reading is the future-dated 5 %LEL, although 60 %LEL arrived last.
    let server = start(CONFIG, data.path(), system_clock()).await;
    let http = server.http_addr;
    let reset = format!("/api/v1/alarms/{id}/reset");
    let (status, body) =
        post_json(http, &reset, serde_json::json!({ "by": "x", "note": "n" })).await;
    assert_eq!(status, 409, "no reset on a restored value: {body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("since the server started"), "{message}");
    let alarm = get_json(http, &format!("/api/v1/alarms/{id}")).await;
    assert_eq!(alarm["state"], "active", "{alarm}");
    server.shutdown().await;
}
