//! `[storage] max_series` over the real HTTP write endpoint: points that need a series
//! beyond the limit are rejected with a 400 partial write, points of existing series are
//! stored, and series restored at start count toward the limit.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{CONFIG, Publisher, Receiver, alarms_of, get_json, metric, start_server, wait_for};

const WAIT: Duration = Duration::from_secs(15);
const REJECTED_METRIC: &str = "stonelion_series_limit_rejected_total";

fn config_with_limit(max_series: usize) -> String {
    format!("{CONFIG}\n[storage]\nmax_series = {max_series}\n")
}

/// Posts line protocol to `/api/v2/write` and returns the status and the JSON body (null
/// for a 204).
async fn write(http: SocketAddr, body: String) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!(
            "http://{http}/api/v2/write?bucket=stonelion&precision=ms"
        ))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (status, json)
}

/// Returns the number of points of each `unit` tag value of the measurement `boiler`.
async fn boiler_points(http: SocketAddr) -> Vec<(String, usize)> {
    let query = get_json(
        http,
        "/query?db=stonelion&q=SELECT%20pressure%20FROM%20boiler%20GROUP%20BY%20unit",
    )
    .await;
    let mut units: Vec<(String, usize)> = query["results"][0]["series"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let unit = s["tags"]["unit"].as_str().unwrap().to_owned();
            (unit, s["values"].as_array().unwrap().len())
        })
        .collect();
    units.sort();
    units
}

fn message(body: &serde_json::Value) -> &str {
    body["message"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixth_series_rejected_across_restart() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let config = config_with_limit(5);
    let server = start_server(&config, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let now = chrono::Utc::now().timestamp_millis();

    let five: String = (1..=5)
        .map(|unit| format!("boiler,unit={unit} pressure=1.{unit} {now}\n"))
        .collect();
    let (status, body) = write(http, five).await;
    assert_eq!(status, 204, "{body}");

    // One point of a new series and one of an existing series in the same request.
    let (status, body) = write(
        http,
        format!(
            "boiler,unit=6 pressure=6 {now}\nboiler,unit=1 pressure=2.1 {}\n",
            now + 1
        ),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid", "{body}");
    let text = message(&body);
    assert!(text.starts_with("partial write: "), "{text}");
    assert!(text.contains("max_series limit of 5 series"), "{text}");
    assert!(text.contains("(5 series exist)"), "{text}");
    assert!(text.contains("1 point(s) of new series rejected"), "{text}");
    assert!(text.contains("boiler,unit=6 pressure"), "{text}");
    assert!(
        text.contains("1 point(s) of existing series stored"),
        "{text}"
    );
    assert!(
        text.contains("Raise [storage] max_series or drop a high-cardinality tag"),
        "{text}"
    );
    assert_eq!(metric(http, REJECTED_METRIC).await, 1.0);

    // Existing series still accept points on their own.
    let (status, body) = write(http, format!("boiler,unit=2 pressure=2.2 {}\n", now + 1)).await;
    assert_eq!(status, 204, "{body}");

    let expected: Vec<(String, usize)> = [("1", 2), ("2", 2), ("3", 1), ("4", 1), ("5", 1)]
        .into_iter()
        .map(|(unit, count)| (unit.to_owned(), count))
        .collect();
    assert_eq!(boiler_points(http).await, expected);
    server.shutdown().await;

    // The five series restored at start fill the limit after a restart.
    let server = start_server(&config, &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let (status, body) = write(http, format!("boiler,unit=7 pressure=7 {}\n", now + 2)).await;
    assert_eq!(status, 400, "{body}");
    assert!(message(&body).contains("(5 series exist)"), "{body}");
    assert!(
        message(&body).contains("0 point(s) of existing series stored"),
        "{body}"
    );
    let (status, body) = write(http, format!("boiler,unit=3 pressure=3.3 {}\n", now + 2)).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(metric(http, REJECTED_METRIC).await, 1.0);
    let units: Vec<String> = boiler_points(http)
        .await
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert_eq!(units, ["1", "2", "3", "4", "5"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_reading_beyond_limit_still_alarms() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config_with_limit(2), &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let now = chrono::Utc::now().timestamp_millis();
    let (status, body) = write(
        http,
        format!("boiler,unit=1 pressure=1 {now}\nboiler,unit=2 pressure=2 {now}\n"),
    )
    .await;
    assert_eq!(status, 204, "{body}");

    // The reading needs a third series, so storage rejects it, but its rule still runs.
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    device.reading("plant-a", "gas-01", "gas_lel", 61.5).await;
    let raised = wait_for("an alarm from the unstored reading", WAIT, || async {
        receiver.events("alarm.raised").pop()
    })
    .await;
    assert_eq!(raised.body["alarm"]["device"], "gas-01");
    assert_eq!(alarms_of(http, "gas-01").await[0]["level"], 2);
    let rejected = wait_for("the rejected reading counted", WAIT, || async {
        let value = metric(http, REJECTED_METRIC).await;
        (value >= 1.0).then_some(value)
    })
    .await;
    assert_eq!(rejected, 1.0);

    // The pipeline keeps storing points of existing series.
    let (status, body) = write(http, format!("boiler,unit=1 pressure=1.5 {}\n", now + 1)).await;
    assert_eq!(status, 204, "{body}");
    let points = boiler_points(http).await;
    assert_eq!(points, [("1".to_owned(), 2), ("2".to_owned(), 1)]);
    drop(device);
    server.shutdown().await;
}
