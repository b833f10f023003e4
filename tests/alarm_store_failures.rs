//! The alarm stage when the state database rejects writes, over a real server. A second
//! SQLite connection to `state.sqlite` makes the failure: either a trigger that aborts the
//! stage's inserts, or a write lock held for longer than the stage's busy timeout (5 s).

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use serde_json::json;
use support::{
    CONFIG, Publisher, Receiver, alarms_of, get_json, metric, post_json, start_server, wait_for,
};

const WAIT: Duration = Duration::from_secs(15);
const FAILURES: &str = "stonelion_alarm_store_failures_total";

/// Makes every alarm transition fail: its insert into `alarm_transitions` aborts, so the
/// stage's transaction rolls back.
fn break_store(data: &Path) -> Connection {
    let conn = stonelion::alarms::store::open_connection(&data.join("state.sqlite")).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER fail_transitions BEFORE INSERT ON alarm_transitions
         BEGIN SELECT RAISE(ABORT, 'disk I/O error (test)'); END",
    )
    .unwrap();
    conn
}

fn repair_store(conn: &Connection) {
    conn.execute_batch("DROP TRIGGER fail_transitions").unwrap();
}

/// Waits until the failure counter exceeds `before`, so the stage has tried the write.
async fn wait_for_failure(http: std::net::SocketAddr, before: f64) -> f64 {
    wait_for("a counted store failure", WAIT, || async {
        let now = metric(http, FAILURES).await;
        (now > before).then_some(now)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_transitions_repeat_after_store_failure() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;

    // A raise that cannot be stored leaves no alarm behind.
    let broken = break_store(data.path());
    device.reading("plant-a", "gas-01", "gas_lel", 27.0).await;
    let failures = wait_for_failure(http, 0.0).await;
    assert!(
        alarms_of(http, "gas-01").await.is_empty(),
        "a failed raise must not leave an alarm"
    );

    // The next reading after the store recovers raises the alarm.
    repair_store(&broken);
    device.reading("plant-a", "gas-01", "gas_lel", 28.0).await;
    let raised = wait_for("alarm.raised", WAIT, || async {
        receiver.events("alarm.raised").pop()
    })
    .await;
    assert_eq!(
        raised.body["alarm"]["value"], 28.0,
        "the raise comes from the reading after recovery"
    );
    let id = raised.body["alarm"]["id"].as_i64().unwrap();

    // A clear that cannot be stored leaves the alarm active.
    let broken = break_store(data.path());
    device.reading("plant-a", "gas-01", "gas_lel", 10.0).await;
    wait_for_failure(http, failures).await;
    let alarms = alarms_of(http, "gas-01").await;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(
        alarms[0]["state"], "active",
        "a failed clear must leave the alarm active"
    );

    // The next reading below the deadband clears it.
    repair_store(&broken);
    device.reading("plant-a", "gas-01", "gas_lel", 11.0).await;
    let cleared = wait_for("alarm.cleared", WAIT, || async {
        receiver.events("alarm.cleared").pop()
    })
    .await;
    assert_eq!(cleared.body["alarm"]["id"], id);
    assert_eq!(cleared.body["alarm"]["value"], 11.0);

    let alarm = get_json(http, &format!("/api/v1/alarms/{id}")).await;
    let events: Vec<&str> = alarm["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["alarm.raised", "alarm.cleared"]);
    let delivered: Vec<String> = receiver
        .deliveries()
        .iter()
        .map(|d| d.event.clone())
        .collect();
    assert_eq!(
        delivered,
        ["alarm.raised", "alarm.cleared"],
        "only stored transitions are delivered"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_alarm_retried_after_store_failure() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let addr = server.mqtt_addr;

    let broken = break_store(data.path());
    let smoke = Publisher::connect(addr, "smoke-01").await;
    smoke.publish("status/park-b3/smoke-01", "offline").await;
    wait_for_failure(http, 0.0).await;
    assert!(alarms_of(http, "smoke-01").await.is_empty());

    // No further message arrives for the device: the stage retries on its own.
    repair_store(&broken);
    let offline = wait_for("device.offline", WAIT, || async {
        receiver.events("device.offline").pop()
    })
    .await;
    assert_eq!(offline.body["alarm"]["device"], "smoke-01");
    assert_eq!(offline.body["alarm"]["state"], "active");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_fail_with_503() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    device.reading("plant-a", "gas-01", "gas_lel", 30.0).await;
    device.reading("plant-a", "gas-01", "gas_lel", 5.0).await;
    let cleared = wait_for("alarm.cleared", WAIT, || async {
        receiver.events("alarm.cleared").pop()
    })
    .await;
    let id = cleared.body["alarm"]["id"].as_i64().unwrap();

    // Acknowledging while every transition insert aborts.
    let broken = break_store(data.path());
    let (status, body) = post_json(
        http,
        &format!("/api/v1/alarms/{id}/ack"),
        json!({"by": "Li"}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unchanged"),
        "{body}"
    );
    repair_store(&broken);
    let alarm = get_json(http, &format!("/api/v1/alarms/{id}")).await;
    assert_eq!(
        alarm["acknowledged"],
        json!(null),
        "a failed acknowledgement must not be kept"
    );

    // Closing while another connection holds the write lock for longer than the busy timeout.
    let locker =
        stonelion::alarms::store::open_connection(&data.path().join("state.sqlite")).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let close = json!({"by": "Li", "note": "sensor cleaned"});
    let (status, body) =
        post_json(http, &format!("/api/v1/alarms/{id}/close"), close.clone()).await;
    assert_eq!(status, 503, "{body}");
    let alarm = get_json(http, &format!("/api/v1/alarms/{id}")).await;
    assert_eq!(
        alarm["state"], "cleared",
        "a failed close must leave the alarm open"
    );
    locker.execute_batch("ROLLBACK").unwrap();

    // The alarm is still open, so a new rise raises the same alarm, not a second one.
    device.reading("plant-a", "gas-01", "gas_lel", 31.0).await;
    wait_for("the alarm raised again", WAIT, || async {
        (receiver.events("alarm.raised").len() == 2).then_some(())
    })
    .await;
    let alarms = alarms_of(http, "gas-01").await;
    assert_eq!(
        alarms.len(),
        1,
        "one open alarm per device and rule: {alarms:?}"
    );
    assert_eq!(alarms[0]["id"], id);

    // The retried close succeeds once the alarm cleared again.
    device.reading("plant-a", "gas-01", "gas_lel", 4.0).await;
    wait_for("the alarm cleared again", WAIT, || async {
        (receiver.events("alarm.cleared").len() == 2).then_some(())
    })
    .await;
    let (status, body) = post_json(http, &format!("/api/v1/alarms/{id}/close"), close).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "closed");
    let closes = body["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["event"] == "alarm.closed")
        .count();
    assert_eq!(closes, 1, "only the stored close is in the history");
    assert!(
        metric(http, FAILURES).await >= 2.0,
        "both failed actions are counted"
    );
    server.shutdown().await;
}
