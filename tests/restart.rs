//! A restart on the same data directory keeps readings, alarm states and undelivered
//! webhook events; a receiver that was down gets every event afterwards, in order.

mod support;

use std::time::Duration;

use support::{CONFIG, Publisher, Receiver, alarms_of, get_json, start_server, wait_for};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_readings_alarms_and_queued_events() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    receiver.set_up(false);

    // First run: the receiver is down while an alarm is raised and escalated.
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    for value in [10.0, 30.0, 60.0] {
        device.reading("plant-a", "gas-01", "gas_lel", value).await;
    }
    let http = server.http_addr;
    let alarm = wait_for("an escalated alarm", WAIT, || async {
        alarms_of(http, "gas-01")
            .await
            .into_iter()
            .find(|a| a["level"] == 2)
    })
    .await;
    let id = alarm["id"].as_i64().unwrap();
    wait_for("a failed delivery attempt", WAIT, || async {
        (!receiver.attempts().is_empty()).then_some(())
    })
    .await;
    wait_for("three stored readings", WAIT, || async {
        let s = get_json(
            http,
            "/api/v1/devices/gas-01/series?metric=gas_lel&from=now-1h",
        )
        .await;
        (s["points"].as_array().unwrap().len() == 3).then_some(())
    })
    .await;
    drop(device);
    server.shutdown().await;
    assert!(
        receiver.deliveries().is_empty(),
        "nothing was accepted while the receiver was down"
    );
    let first_ids: Vec<String> = receiver
        .attempts()
        .iter()
        .map(|a| a.delivery_id.clone())
        .collect();

    // Second run on the same directory with the receiver up.
    receiver.set_up(true);
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;

    let series = get_json(
        http,
        "/api/v1/devices/gas-01/series?metric=gas_lel&from=now-1h",
    )
    .await;
    let values: Vec<f64> = series["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    assert_eq!(values, [10.0, 30.0, 60.0], "readings survive the restart");

    let restored = get_json(http, &format!("/api/v1/alarms/{id}")).await;
    assert_eq!(restored["state"], "active");
    assert_eq!(restored["level"], 2);
    assert_eq!(restored["history"].as_array().unwrap().len(), 2);

    let delivered = wait_for("both queued events delivered", WAIT, || async {
        let d = receiver.deliveries();
        (d.len() >= 2).then_some(d)
    })
    .await;
    let events: Vec<&str> = delivered.iter().map(|d| d.event.as_str()).collect();
    assert_eq!(
        events,
        ["alarm.raised", "alarm.escalated"],
        "in order per alarm"
    );
    assert!(delivered.iter().all(|d| d.signature_valid));
    // Before the restart only the first event was tried: the second waits behind it.
    assert!(
        first_ids.iter().all(|id| *id == delivered[0].delivery_id),
        "{first_ids:?}"
    );
    assert_ne!(delivered[0].delivery_id, delivered[1].delivery_id);

    // The restored alarm is the open one: no second alarm, and it clears on a low reading.
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    device.reading("plant-a", "gas-01", "gas_lel", 61.0).await;
    device.reading("plant-a", "gas-01", "gas_lel", 5.0).await;
    wait_for("the restored alarm cleared", WAIT, || async {
        receiver.events("alarm.cleared").pop()
    })
    .await;
    let alarms = alarms_of(http, "gas-01").await;
    assert_eq!(
        alarms.len(),
        1,
        "still one alarm for the rule and device: {alarms:?}"
    );
    assert_eq!(alarms[0]["id"], id);
    server.shutdown().await;
}
