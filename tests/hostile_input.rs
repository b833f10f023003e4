//! Malformed and hostile MQTT input is rejected and counted by reason, while valid traffic
//! from other devices keeps flowing.

mod support;

use std::time::Duration;

use support::{
    CONFIG, Publisher, Receiver, get_json, metric, start_server, unique_millis, wait_for,
};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_rejected_and_counted() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let attacker = Publisher::connect(server.mqtt_addr, "attacker").await;
    let good = Publisher::connect(server.mqtt_addr, "gas-02").await;

    let now = chrono::Utc::now().timestamp_millis();
    let big = format!(
        r#"{{"values": {{"gas_lel": 1}}, "pad": "{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let many: String = (0..300)
        .map(|i| format!(r#""m{i}": 1"#))
        .collect::<Vec<_>>()
        .join(",");
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        (
            "malformed_json",
            "telemetry/plant-a/gas-01".into(),
            b"{\"values\": {".to_vec(),
        ),
        (
            "not_an_object",
            "telemetry/plant-a/gas-01".into(),
            b"[1, 2, 3]".to_vec(),
        ),
        (
            "not_utf8",
            "telemetry/plant-a/gas-01".into(),
            vec![0xff, 0xfe, 0x00],
        ),
        (
            "values_missing",
            "telemetry/plant-a/gas-01".into(),
            br#"{"gas_lel": 10}"#.to_vec(),
        ),
        (
            "non_finite",
            "telemetry/plant-a/gas-01/gas_lel".into(),
            b"NaN".to_vec(),
        ),
        (
            "value_invalid",
            "telemetry/plant-a/gas-01".into(),
            br#"{"values": {"gas_lel": "high"}}"#.to_vec(),
        ),
        (
            "timestamp_too_old",
            "telemetry/plant-a/gas-01".into(),
            br#"{"ts": 0, "values": {"gas_lel": 99}}"#.to_vec(),
        ),
        (
            "timestamp_in_future",
            "telemetry/plant-a/gas-01".into(),
            format!(
                r#"{{"ts": {}, "values": {{"gas_lel": 99}}}}"#,
                now + 86_400_000
            )
            .into_bytes(),
        ),
        (
            "timestamp_invalid",
            "telemetry/plant-a/gas-01".into(),
            br#"{"ts": "soon", "values": {"gas_lel": 1}}"#.to_vec(),
        ),
        (
            "timestamp_too_old",
            "telemetry/plant-a/gas-01".into(),
            br#"{"ts": -9223372036854775808, "values": {"gas_lel": 1}}"#.to_vec(),
        ),
        (
            "unknown_device",
            "telemetry/plant-a/gas-99".into(),
            br#"{"values": {"gas_lel": 99}}"#.to_vec(),
        ),
        (
            "unknown_site",
            "telemetry/plant-z/gas-99".into(),
            br#"{"values": {"gas_lel": 99}}"#.to_vec(),
        ),
        (
            "site_mismatch",
            "telemetry/park-b3/gas-01".into(),
            br#"{"values": {"gas_lel": 99}}"#.to_vec(),
        ),
        (
            "unknown_metric",
            "telemetry/plant-a/gas-01".into(),
            br#"{"values": {"voltage": 3}}"#.to_vec(),
        ),
        (
            "wrong_type",
            "telemetry/plant-a/gas-01".into(),
            br#"{"values": {"gas_lel": true}}"#.to_vec(),
        ),
        (
            "topic_invalid",
            "telemetry/plant-a".into(),
            br#"{"values": {"gas_lel": 99}}"#.to_vec(),
        ),
        (
            "payload_too_large",
            "telemetry/plant-a/gas-01".into(),
            big.into_bytes(),
        ),
        (
            "too_many_values",
            "telemetry/plant-a/gas-01".into(),
            format!(r#"{{"values": {{{many}}}}}"#).into_bytes(),
        ),
        (
            "status_invalid",
            "status/plant-a/gas-01".into(),
            b"sleeping".to_vec(),
        ),
    ];
    for (index, (_, topic, payload)) in cases.iter().enumerate() {
        attacker.publish(topic, payload.clone()).await;
        // Valid traffic from another device interleaves with the attack.
        good.reading("plant-a", "gas-02", "gas_lel", index as f64)
            .await;
    }

    for (reason, topic, _) in &cases {
        let sample = format!("stonelion_ingest_rejected_total{{reason=\"{reason}\"}}");
        wait_for(
            &format!("a rejection counted as {reason} (topic {topic})"),
            WAIT,
            || async { (metric(http, &sample).await >= 1.0).then_some(()) },
        )
        .await;
    }

    // Nothing hostile reached storage or the rules: gas-01 has no reading and no alarm.
    let gas01 = get_json(http, "/api/v1/devices/gas-01").await;
    assert_eq!(gas01["latest"], serde_json::json!({}), "{gas01}");
    assert!(support::alarms_of(http, "gas-01").await.is_empty());

    // Every valid reading of gas-02 was stored.
    wait_for("all valid readings of gas-02", WAIT, || async {
        let s = get_json(
            http,
            "/api/v1/devices/gas-02/series?metric=gas_lel&from=now-1h",
        )
        .await;
        (s["points"].as_array().unwrap().len() == cases.len()).then_some(())
    })
    .await;

    // The connection that sent all of it is still usable, and so is ingestion.
    let ts = unique_millis();
    attacker
        .publish(
            "telemetry/plant-a/gas-01",
            format!(r#"{{"ts": {ts}, "values": {{"gas_lel": 3.5}}}}"#),
        )
        .await;
    wait_for("a valid reading after the attack", WAIT, || async {
        let d = get_json(http, "/api/v1/devices/gas-01").await;
        (d["latest"]["gas_lel"]["value"] == 3.5).then_some(())
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partly_valid_message_keeps_good_values() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "temp-01").await;
    let ts = unique_millis();
    device
        .publish(
            "telemetry/park-b3/temp-01",
            format!(r#"{{"ts": {ts}, "values": {{"temperature_c": 21.5, "humidity": 40, "bogus": null}}}}"#),
        )
        .await;
    wait_for("the good value", WAIT, || async {
        let d = get_json(http, "/api/v1/devices/temp-01").await;
        (d["latest"]["temperature_c"]["value"] == 21.5).then_some(())
    })
    .await;
    assert!(
        metric(
            http,
            "stonelion_ingest_rejected_total{reason=\"unknown_metric\"}"
        )
        .await
            >= 1.0
    );
    assert!(
        metric(
            http,
            "stonelion_ingest_rejected_total{reason=\"value_invalid\"}"
        )
        .await
            >= 1.0
    );
    server.shutdown().await;
}
