//! Line protocol written over HTTP flows through the same pipeline as MQTT: points of a
//! known device raise alarms, other points are stored, and `/query` reads both.

mod support;

use std::time::Duration;

use support::{CONFIG, Publisher, Receiver, alarms_of, get_json, metric, start_server, wait_for};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_protocol_raises_alarm_and_stores_other_points() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let body = format!(
        "gas-detector,site=plant-a,device=gas-01 gas_lel=61.5 {now_ns}\n\
         boiler,site=plant-a,unit=2 pressure_mpa=1.2 {now_ns}\n"
    );
    let response = reqwest::Client::new()
        .post(format!(
            "http://{http}/api/v2/write?org=stonelion&bucket=stonelion&precision=ns"
        ))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());

    let raised = wait_for("an alarm from the written point", WAIT, || async {
        receiver.events("alarm.raised").pop()
    })
    .await;
    assert_eq!(raised.body["alarm"]["device"], "gas-01");
    assert_eq!(raised.body["alarm"]["value"], 61.5);
    assert_eq!(alarms_of(http, "gas-01").await[0]["level"], 2);
    let device = get_json(http, "/api/v1/devices/gas-01").await;
    assert_eq!(device["latest"]["gas_lel"]["value"], 61.5);

    let query = wait_for("the other point through /query", WAIT, || async {
        let q = get_json(
            http,
            "/query?db=stonelion&q=SELECT%20pressure_mpa%20FROM%20boiler",
        )
        .await;
        q["results"][0]["series"][0]["values"]
            .as_array()
            .is_some_and(|v| !v.is_empty())
            .then_some(q)
    })
    .await;
    assert_eq!(
        query["results"][0]["series"][0]["values"][0][1], 1.2,
        "{query}"
    );

    let bad = reqwest::Client::new()
        .post(format!("http://{http}/api/v2/write?bucket=stonelion"))
        .body("gas-detector,site=plant-a,device=gas-01 gas_lel=\n")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let error: serde_json::Value = bad.json().await.unwrap();
    assert!(
        error["message"].as_str().unwrap().contains("line 1"),
        "{error}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_conflict_is_422_and_keeps_other_points() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let client = reqwest::Client::new();
    let now = chrono::Utc::now().timestamp_millis();
    let write = |body: String| {
        let client = client.clone();
        async move {
            client
                .post(format!("http://{http}/write?db=stonelion&precision=ms"))
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        write(format!("boiler,unit=1 running=true {now}\n"))
            .await
            .status(),
        204
    );
    server.store.flush().unwrap();
    let later = now + 1;
    let conflict = write(format!(
        "boiler,unit=1 running=5 {later}\nboiler,unit=2 running=false {later}\n"
    ))
    .await;
    assert_eq!(conflict.status(), 422);
    let body: serde_json::Value = conflict.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("conflict"),
        "{body}"
    );

    let query = get_json(
        http,
        "/query?db=stonelion&q=SELECT%20running%20FROM%20boiler%20GROUP%20BY%20unit",
    )
    .await;
    let series = query["results"][0]["series"].as_array().unwrap();
    assert_eq!(
        series.len(),
        2,
        "the point without a conflict was stored: {query}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_points_checked_like_mqtt() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let now = chrono::Utc::now().timestamp_millis();
    let year_ms = 365 * 86_400_000_i64;
    let cases = [
        (
            format!(
                "gas-detector,site=plant-a,device=gas-01 gas_lel=70 {}",
                1_000
            ),
            "older",
        ),
        (
            format!(
                "gas-detector,site=plant-a,device=gas-01 gas_lel=70 {}",
                now + year_ms
            ),
            "future",
        ),
        (
            format!("gas-detector,site=park-b3,device=gas-01 gas_lel=70 {now}"),
            "belongs to site",
        ),
        (
            format!("gas-detector,site=plant-a,device=gas-01 gas_lel=true {now}"),
            "boolean",
        ),
        (
            format!("gas-detector,site=plant-a,device=gas-01 volts=3 {now}"),
            "no metric",
        ),
        (
            format!("smoke-detector,site=plant-a,device=gas-01 smoke=true {now}"),
            "has profile `gas-detector`",
        ),
        (
            format!("alarm_state,site=plant-a,device=gas-01,rule=gas-lel level=0i {now}"),
            "written only by the server",
        ),
        (
            format!("device_status,site=plant-a,device=gas-02 online=true {now}"),
            "written only by the server",
        ),
        (
            format!("site_summary,site=plant-a alarms_active_level2=0i {now}"),
            "written only by the server",
        ),
        (
            format!("gas-detector,site=plant-a,device=gas-99 gas_lel=3 {now}"),
            "is not configured",
        ),
    ];
    for (line, needle) in &cases {
        let response = reqwest::Client::new()
            .post(format!("http://{http}/write?db=stonelion&precision=ms"))
            .body(format!("{line}\n"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{line}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains(needle),
            "{line}: {body}"
        );
    }
    assert!(
        alarms_of(http, "gas-01").await.is_empty(),
        "no rejected point reached the rules"
    );
    let device = get_json(http, "/api/v1/devices/gas-01").await;
    assert_eq!(
        device["latest"],
        serde_json::json!({}),
        "no rejected point became a reading: {device}"
    );
    let measurements = get_json(http, "/query?db=stonelion&q=SHOW%20MEASUREMENTS").await;
    assert!(
        !measurements.to_string().contains("smoke-detector"),
        "no series under another profile: {measurements}"
    );
    assert!(
        !measurements.to_string().contains("alarm_state"),
        "no forged alarm state: {measurements}"
    );
    let q = get_json(http, "/query?db=stonelion&q=SHOW%20TAG%20VALUES%20FROM%20%22gas-detector%22%20WITH%20KEY%20%3D%20site").await;
    assert!(
        !q.to_string().contains("park-b3"),
        "no series under a foreign site: {q}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_field_rejected() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(CONFIG, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let now = chrono::Utc::now().timestamp_millis();
    let body = format!(
        "boiler,unit=1 pressure_mpa=1.5 {now}\nboiler,unit=2 pressure_mpa=1e999,temp_c=80 {now}\n"
    );
    let response = reqwest::Client::new()
        .post(format!("http://{http}/write?db=stonelion&precision=ms"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: serde_json::Value = response.json().await.unwrap();
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("line 2"), "{message}");
    assert!(message.contains("not a finite number"), "{message}");

    let stored = wait_for("the finite line through /query", WAIT, || async {
        let q = get_json(
            http,
            "/query?db=stonelion&q=SELECT%20*%20FROM%20boiler%20GROUP%20BY%20unit",
        )
        .await;
        q["results"][0]["series"]
            .as_array()
            .filter(|s| !s.is_empty())
            .cloned()
    })
    .await;
    assert_eq!(stored.len(), 1, "only unit 1 is stored: {stored:?}");
    assert_eq!(stored[0]["tags"]["unit"], "1");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_counted_not_values() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let config = format!(
        "{CONFIG}\n[[devices]]\nid = \"meter-01\"\nsite = \"plant-a\"\nprofile = \"energy-meter\"\n"
    );
    let server = start_server(&config, &receiver.url(), data.path()).await;
    let http = server.http_addr;

    // One MQTT message with three values, then one with a single value.
    let meter = Publisher::connect(server.mqtt_addr, "meter-01").await;
    let three = r#"{"values": {"energy_kwh": 1520.5, "power_kw": 12.25, "voltage_v": 229.8}}"#;
    meter.publish("telemetry/plant-a/meter-01", three).await;
    meter
        .publish(
            "telemetry/plant-a/meter-01",
            r#"{"values": {"power_kw": 12.5}}"#,
        )
        .await;
    let mqtt_readings = r#"stonelion_readings_received_total{source="mqtt"}"#;
    wait_for("four MQTT readings", WAIT, || async {
        (metric(http, mqtt_readings).await == 4.0).then_some(())
    })
    .await;
    let mqtt_messages = metric(http, r#"stonelion_messages_received_total{source="mqtt"}"#).await;
    assert_eq!(
        mqtt_messages, 2.0,
        "two MQTT messages carried the four readings"
    );

    // One HTTP write request with three points of the meter.
    let now = chrono::Utc::now().timestamp_millis();
    let body = format!(
        "energy-meter,site=plant-a,device=meter-01 energy_kwh=1521.0 {now}\n\
         energy-meter,site=plant-a,device=meter-01 power_kw=12.75 {now}\n\
         energy-meter,site=plant-a,device=meter-01 voltage_v=230.1 {now}\n"
    );
    let response = reqwest::Client::new()
        .post(format!("http://{http}/write?db=stonelion&precision=ms"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let http_readings = metric(
        http,
        r#"stonelion_readings_received_total{source="http_write"}"#,
    )
    .await;
    assert_eq!(http_readings, 3.0);
    let http_messages = metric(
        http,
        r#"stonelion_messages_received_total{source="http_write"}"#,
    )
    .await;
    assert_eq!(
        http_messages, 1.0,
        "one write request carried the three readings"
    );
    server.shutdown().await;
}
