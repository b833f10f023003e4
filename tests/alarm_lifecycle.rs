//! End to end over real sockets: MQTT in through the embedded broker, stored, alarms out
//! to a real HTTP receiver, operator actions over the API.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{
    CONFIG, Publisher, Receiver, alarms_of, get_json, post_json, start_server, wait_for,
};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gas_alarm_full_lifecycle() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;

    // Below level 1: stored, no alarm.
    device.reading("plant-a", "gas-01", "gas_lel", 12.5).await;
    wait_for("the first reading in the API", WAIT, || async {
        let d = get_json(http, "/api/v1/devices/gas-01").await;
        (d["latest"]["gas_lel"]["value"] == json!(12.5)).then_some(())
    })
    .await;
    assert!(
        alarms_of(http, "gas-01").await.is_empty(),
        "no alarm below level 1"
    );

    // Above level 1: raised, delivered with a valid signature.
    device.reading("plant-a", "gas-01", "gas_lel", 27.0).await;
    let raised = wait_for("alarm.raised", WAIT, || async {
        receiver.events("alarm.raised").pop()
    })
    .await;
    assert!(
        raised.signature_valid,
        "signature must verify with the webhook's secret"
    );
    assert!(!raised.delivery_id.is_empty());
    assert_eq!(raised.body["event"], "alarm.raised");
    assert_eq!(raised.body["alarm"]["device"], "gas-01");
    assert_eq!(raised.body["alarm"]["site"], "plant-a");
    assert_eq!(raised.body["alarm"]["level"], 1);
    assert_eq!(raised.body["alarm"]["value"], 27.0);
    assert_eq!(raised.body["alarm"]["threshold"], 25.0);
    assert_eq!(raised.body["alarm"]["unit"], "%LEL");
    let id = raised.body["alarm"]["id"].as_i64().unwrap();

    // Above level 2: escalated, same alarm.
    device.reading("plant-a", "gas-01", "gas_lel", 55.0).await;
    let escalated = wait_for("alarm.escalated", WAIT, || async {
        receiver.events("alarm.escalated").pop()
    })
    .await;
    assert_eq!(escalated.body["alarm"]["id"], id);
    assert_eq!(escalated.body["alarm"]["level"], 2);
    assert_eq!(escalated.body["alarm"]["threshold"], 50.0);

    // Between the levels: no change. Below level 1 minus the deadband: cleared.
    device.reading("plant-a", "gas-01", "gas_lel", 30.0).await;
    device.reading("plant-a", "gas-01", "gas_lel", 20.0).await;
    let cleared = wait_for("alarm.cleared", WAIT, || async {
        receiver.events("alarm.cleared").pop()
    })
    .await;
    assert_eq!(cleared.body["alarm"]["id"], id);
    assert_eq!(cleared.body["alarm"]["state"], "cleared");
    assert_eq!(
        cleared.body["alarm"]["acknowledged"],
        json!(null),
        "nobody acknowledged it yet"
    );
    assert_eq!(
        cleared.body["alarm"]["level"], 2,
        "the alarm keeps the highest level it reached"
    );

    // Acknowledge and close over HTTP.
    let (status, acked) = post_json(
        http,
        &format!("/api/v1/alarms/{id}/ack"),
        json!({"by": "duty officer Li", "note": "checking"}),
    )
    .await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["acknowledged"]["by"], "duty officer Li");
    let (status, again) = post_json(
        http,
        &format!("/api/v1/alarms/{id}/ack"),
        json!({"by": "someone"}),
    )
    .await;
    assert_eq!(
        status, 409,
        "a second acknowledgement is a conflict: {again}"
    );
    for body in [
        json!({"by": "duty officer Li"}),
        json!({"by": "duty officer Li", "note": "  "}),
    ] {
        let (status, rejected) = post_json(http, &format!("/api/v1/alarms/{id}/close"), body).await;
        assert_eq!(status, 400, "closing needs a note: {rejected}");
        assert!(
            rejected["error"]["message"]
                .as_str()
                .unwrap()
                .contains("`note`"),
            "{rejected}"
        );
    }
    let (status, closed) = post_json(
        http,
        &format!("/api/v1/alarms/{id}/close"),
        json!({"by": "duty officer Li", "note": "valve fixed"}),
    )
    .await;
    assert_eq!(status, 200, "{closed}");
    assert_eq!(closed["state"], "closed");
    assert_eq!(closed["closed"]["note"], "valve fixed");
    wait_for("alarm.closed", WAIT, || async {
        receiver.events("alarm.closed").pop()
    })
    .await;

    // The history shows every step, with actors and values.
    let alarm = get_json(http, &format!("/api/v1/alarms/{id}")).await;
    let events: Vec<&str> = alarm["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "alarm.raised",
            "alarm.escalated",
            "alarm.cleared",
            "alarm.acknowledged",
            "alarm.closed"
        ]
    );
    let history = alarm["history"].as_array().unwrap();
    assert_eq!(history[0]["actor"], "rule:gas-lel");
    assert_eq!(history[0]["value"], 27.0);
    assert_eq!(history[1]["value"], 55.0);
    assert_eq!(history[2]["value"], 20.0);
    assert_eq!(history[3]["actor"], "duty officer Li");
    assert_eq!(history[4]["note"], "valve fixed");
    assert_eq!(history[4]["actor"], "duty officer Li");

    // Deliveries arrived in the order of the transitions.
    let delivered: Vec<String> = receiver
        .deliveries()
        .iter()
        .map(|d| d.event.clone())
        .collect();
    assert_eq!(delivered, events);

    // The series endpoint returns the stored readings, raw and aggregated.
    let series = wait_for("five stored readings", WAIT, || async {
        let s = get_json(
            http,
            "/api/v1/devices/gas-01/series?metric=gas_lel&from=now-1h",
        )
        .await;
        (s["points"].as_array().unwrap().len() == 5).then_some(s)
    })
    .await;
    let values: Vec<f64> = series["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    assert_eq!(values, [12.5, 27.0, 55.0, 30.0, 20.0]);
    let max = get_json(
        http,
        "/api/v1/devices/gas-01/series?metric=gas_lel&from=now-1h&step=1h&agg=max",
    )
    .await;
    let maxima: Vec<f64> = max["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().unwrap())
        .collect();
    assert!(maxima.contains(&55.0), "max over the hour: {max}");

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hovering_inside_deadband_raises_once() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let device = Publisher::connect(server.mqtt_addr, "gas-02").await;

    // 25 %LEL with a deadband of 2: values between 23 and 25.6 hover at the threshold.
    let values = [24.0, 25.0, 24.5, 25.6, 23.5, 25.1, 24.9, 23.1, 25.3, 24.2];
    for value in values {
        device.reading("plant-a", "gas-02", "gas_lel", value).await;
    }
    device
        .reading("plant-a", "gas-02", "temperature_c", 1.0)
        .await; // rejected: not a gas metric
    // The last value was stored once every reading before it went through the rules.
    let http = server.http_addr;
    wait_for("all readings stored", WAIT, || async {
        let s = get_json(
            http,
            "/api/v1/devices/gas-02/series?metric=gas_lel&from=now-1h",
        )
        .await;
        (s["points"].as_array().unwrap().len() == values.len()).then_some(())
    })
    .await;
    wait_for("one raised delivery", WAIT, || async {
        (!receiver.events("alarm.raised").is_empty()).then_some(())
    })
    .await;

    let alarms = alarms_of(http, "gas-02").await;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    let events: Vec<&str> = alarms[0]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["alarm.raised"],
        "hovering must neither clear nor raise again"
    );
    assert_eq!(alarms[0]["state"], "active");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_reading_leaves_alarm_active() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    device.reading("plant-a", "gas-01", "gas_lel", 60.0).await;
    wait_for("alarm.raised", WAIT, || async {
        receiver.events("alarm.raised").pop()
    })
    .await;

    // A reading from an hour ago arrives late: it is stored but does not clear the alarm.
    let hour_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
    device
        .publish(
            "telemetry/plant-a/gas-01",
            format!(r#"{{"ts": {hour_ago}, "values": {{"gas_lel": 0}}}}"#),
        )
        .await;
    wait_for("the late reading stored", WAIT, || async {
        let s = get_json(
            http,
            "/api/v1/devices/gas-01/series?metric=gas_lel&from=now-2h",
        )
        .await;
        (s["points"].as_array().unwrap().len() == 2).then_some(())
    })
    .await;
    let alarm = &alarms_of(http, "gas-01").await[0];
    assert_eq!(alarm["state"], "active", "{alarm}");
    assert_eq!(alarm["history"].as_array().unwrap().len(), 1);
    let latest = get_json(http, "/api/v1/devices/gas-01").await;
    assert_eq!(
        latest["latest"]["gas_lel"]["value"], 60.0,
        "the latest value is the newest reading"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_and_offline_alarms() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let addr = server.mqtt_addr;
    let http = server.http_addr;

    // A device with a last will goes offline when its connection drops.
    let mut options = rumqttc::MqttOptions::new("smoke-01", addr.ip().to_string(), addr.port());
    options.set_last_will(rumqttc::LastWill::new(
        "status/park-b3/smoke-01",
        "offline",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let smoke = Publisher::connect_with(addr, options).await;
    smoke
        .publish("telemetry/park-b3/smoke-01/smoke", "true")
        .await;
    let raised = wait_for("smoke alarm", WAIT, || async {
        receiver.events("alarm.raised").pop()
    })
    .await;
    assert_eq!(raised.body["alarm"]["level"], 2);
    assert_eq!(raised.body["alarm"]["metric"], "smoke");

    drop(smoke); // the socket closes without DISCONNECT, so the broker sends the last will
    let offline = wait_for("device.offline", WAIT, || async {
        receiver.events("device.offline").pop()
    })
    .await;
    assert_eq!(offline.body["alarm"]["device"], "smoke-01");
    assert_eq!(offline.body["alarm"]["rule"], "device-offline");
    let device = get_json(http, "/api/v1/devices/smoke-01").await;
    assert_eq!(device["online"], false);

    let again = Publisher::connect(addr, "smoke-01").await;
    again.publish("status/park-b3/smoke-01", "online").await;
    let online = wait_for("device.online", WAIT, || async {
        receiver.events("device.online").pop()
    })
    .await;
    assert_eq!(online.body["alarm"]["id"], offline.body["alarm"]["id"]);
    assert_eq!(online.body["alarm"]["state"], "cleared");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_device_goes_offline_and_back() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let config = support::CONFIG.replace("stale_after = \"1h\"", "stale_after = \"1s\"");
    let server = start_server(&config, &receiver.url(), data.path()).await;
    let device = Publisher::connect(server.mqtt_addr, "temp-01").await;
    device
        .reading("park-b3", "temp-01", "temperature_c", 21.0)
        .await;

    let offline = wait_for("device.offline of temp-01", WAIT, || async {
        receiver
            .events("device.offline")
            .into_iter()
            .find(|d| d.body["alarm"]["device"] == "temp-01")
    })
    .await;
    assert!(
        offline.body["alarm"]["history"][0]["note"]
            .as_str()
            .unwrap()
            .contains("staleness")
    );

    device
        .reading("park-b3", "temp-01", "temperature_c", 21.5)
        .await;
    wait_for("device.online of temp-01", WAIT, || async {
        receiver
            .events("device.online")
            .into_iter()
            .find(|d| d.body["alarm"]["device"] == "temp-01")
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_without_ack_keeps_acknowledged_null() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-02").await;
    device.reading("plant-a", "gas-02", "gas_lel", 30.0).await;
    device.reading("plant-a", "gas-02", "gas_lel", 5.0).await;
    let cleared = wait_for("alarm.cleared", WAIT, || async {
        receiver.events("alarm.cleared").pop()
    })
    .await;
    let id = cleared.body["alarm"]["id"].as_i64().unwrap();

    let close = json!({"by": "shift lead Wang", "note": "false alarm: calibration gas"});
    let (status, body) = post_json(http, &format!("/api/v1/alarms/{id}/close"), close).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["acknowledged"],
        json!(null),
        "nobody acknowledged the alarm"
    );
    assert_eq!(body["closed"]["by"], "shift lead Wang");

    let closed = wait_for("alarm.closed", WAIT, || async {
        receiver.events("alarm.closed").pop()
    })
    .await;
    let alarm = &closed.body["alarm"];
    assert_eq!(alarm["state"], "closed");
    assert_eq!(
        alarm["acknowledged"],
        json!(null),
        "the webhook must not show an acknowledgement"
    );
    assert_eq!(alarm["closed"]["by"], "shift lead Wang");
    assert_eq!(alarm["closed"]["note"], "false alarm: calibration gas");
    assert_eq!(alarm["closed"]["at"], closed.body["occurred_at"]);
    let last = alarm["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["event"], "alarm.closed");
    assert_eq!(last["actor"], "shift lead Wang");
    assert_eq!(last["note"], "false alarm: calibration gas");
    let events: Vec<&str> = alarm["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["alarm.raised", "alarm.cleared", "alarm.closed"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_name_the_bad_value() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let get = |path: &'static str| async move {
        let r = reqwest::get(format!("http://{http}{path}")).await.unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    };
    let cases = [
        ("/api/v1/devices/nope", 404, "nope"),
        ("/api/v1/devices/gas-01/series?metric=volts", 400, "volts"),
        (
            "/api/v1/devices/gas-01/series?metric=gas_lel&from=yesterday",
            400,
            "yesterday",
        ),
        (
            "/api/v1/devices/gas-01/series?metric=gas_lel&from=now-99999999999d",
            400,
            "now-99999999999d",
        ),
        (
            "/api/v1/devices/gas-01/series?metric=gas_lel&to=9223372036854775807",
            400,
            "out of range",
        ),
        (
            "/api/v1/devices/gas-01/series?metric=gas_lel&to=253402300800000",
            400,
            "253402300800000",
        ),
        (
            "/api/v1/devices/gas-01/series?metric=gas_lel&step=1m&agg=median",
            400,
            "median",
        ),
        (
            "/api/v1/devices/gas-01/series?metric=gas_lel&limit=-1",
            400,
            "`limit` value `-1` is invalid; use a whole number from 1 to 100000",
        ),
        (
            "/api/v1/devices/gas-01/series?metric=gas_lel&limit=0",
            400,
            "`0`",
        ),
        ("/api/v1/alarms?limit=10001", 400, "from 1 to 10000"),
        ("/api/v1/alarms?limit=many", 400, "`many`"),
        ("/api/v1/alarms?state=open", 400, "open"),
        ("/api/v1/alarms/abc", 400, "abc"),
        ("/api/v1/alarms/999", 404, "999"),
    ];
    for (path, status, needle) in cases {
        let (got, body) = get(path).await;
        assert_eq!(got, status, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{path}: message {message:?} should name {needle:?}"
        );
    }
    let (status, body) = post_json(http, "/api/v1/alarms/1/ack", json!({"who": "x"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post_json(http, "/api/v1/alarms/1/ack", json!({"by": ""})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post_json(http, "/api/v1/alarms/1/close", json!({"by": "x"})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing `note`"),
        "{body}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_gets_json_405() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;

    let response = reqwest::get(format!("http://{}/api/v1/alarms/1/close", server.http_addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    let allow = response
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(allow.as_deref(), Some("POST"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("GET is not allowed on /api/v1/alarms/1/close"),
        "{message}"
    );
    server.shutdown().await;
}
