//! The InfluxDB-compatible write endpoint on a real loopback socket, storing into the
//! embedded engine through a real `IngestHandle`.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::Arc;

use stonelion::clock::ManualClock;
use stonelion::ingest::line_protocol::{Precision, WriteOptions, parse_body, router_with_options};
use stonelion::ingest::{IngestHandle, IngestMessage, WriteFailure};
use stonelion::metrics::SharedRegistry;
use stonelion::model::{Timestamp, Value, ValueKind};
use stonelion::storage::engine::{Engine, EngineOptions};
use stonelion::storage::{Query, Selector, SeriesData, TimeSeriesStore};

struct Server {
    url: String,
    engine: Arc<Engine>,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

const NOW_MS: i64 = 1_700_000_500_000;

/// Starts the router on 127.0.0.1:0 with a task that stores every write in an engine.
async fn start(max_body_bytes: usize) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::open(dir.path(), EngineOptions::default()).unwrap());
    let (ingest, mut rx) = IngestHandle::channel(16);
    let store = Arc::clone(&engine);
    tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if let IngestMessage::Points { points, done } = message {
                let result = store
                    .write(points)
                    .map_err(|e| WriteFailure::Storage(e.to_string()));
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
        }
    });
    let options = WriteOptions {
        max_body_bytes,
        clock: Arc::new(ManualClock::new(Timestamp(NOW_MS))),
    };
    let app = router_with_options(ingest, &SharedRegistry::new(), options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        url,
        engine,
        client: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Server {
    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .body(body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    fn all(&self) -> Vec<SeriesData> {
        let query = Query {
            selector: Selector::default(),
            from: Timestamp(i64::MIN),
            to: Timestamp(i64::MAX),
            aggregation: None,
            limit: None,
        };
        let mut data = self.engine.query(&query).unwrap();
        data.sort_by(|a, b| a.series.cmp(&b.series));
        data
    }

    fn field(&self, field: &str) -> Vec<(Timestamp, Value)> {
        self.all()
            .into_iter()
            .filter(|s| s.series.field == field)
            .flat_map(|s| s.points)
            .collect()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("body {body:?} is not JSON: {e}"))
}

#[tokio::test]
async fn v2_write_stores_points() {
    let server = start(1 << 20).await;
    let body = "gas-detector,site=s1,device=d1,site_kind=plant gas_lel=12.5,battery=87i,alarm=true 1700000000123456789\n\
                gas-detector,site=s1,device=d1,site_kind=plant gas_lel=13 1700000001000000000\n";
    let (status, text) = server.post("/api/v2/write?org=o&bucket=b", body).await;
    assert_eq!(status, 204, "body: {text}");

    assert_eq!(
        server.field("gas_lel"),
        vec![
            (Timestamp(1_700_000_000_123), Value::Number(12.5)),
            (Timestamp(1_700_000_001_000), Value::Number(13.0))
        ]
    );
    assert_eq!(
        server.field("battery"),
        vec![(Timestamp(1_700_000_000_123), Value::Number(87.0))]
    );
    assert_eq!(
        server.field("alarm"),
        vec![(Timestamp(1_700_000_000_123), Value::Bool(true))]
    );

    let series = server.all();
    let alarm = series.iter().find(|s| s.series.field == "alarm").unwrap();
    assert_eq!(alarm.kind, ValueKind::Bool);
    assert_eq!(alarm.series.measurement, "gas-detector");
    assert_eq!(alarm.series.tag("site"), Some("s1"));
    assert_eq!(alarm.series.tag("device"), Some("d1"));
    assert_eq!(alarm.series.tag("site_kind"), Some("plant"));
}

#[tokio::test]
async fn precisions_convert_to_millis() {
    let server = start(1 << 20).await;
    let cases = [
        (
            "/api/v2/write?precision=s",
            "m v=1 1700000000",
            1_700_000_000_000,
        ),
        (
            "/api/v2/write?precision=ms",
            "m v=2 1700000000002",
            1_700_000_000_002,
        ),
        (
            "/api/v2/write?precision=us",
            "m v=3 1700000000003000",
            1_700_000_000_003,
        ),
        (
            "/api/v2/write?precision=ns",
            "m v=4 1700000000004000000",
            1_700_000_000_004,
        ),
        (
            "/write?db=x&precision=n",
            "m v=5 1700000000005000000",
            1_700_000_000_005,
        ),
        (
            "/write?db=x&precision=u",
            "m v=6 1700000000006000",
            1_700_000_000_006,
        ),
        (
            "/write?db=x&precision=m",
            "m v=7 28333333",
            28_333_333 * 60_000,
        ),
        (
            "/write?db=x&precision=h",
            "m v=8 472222",
            472_222 * 3_600_000,
        ),
        ("/write?db=x", "m v=9", NOW_MS),
    ];
    for (path, body, expected_ms) in cases {
        let (status, text) = server.post(path, body).await;
        assert_eq!(status, 204, "{path}: {text}");
        let stored = server.field("v");
        assert!(
            stored.iter().any(|(ts, _)| ts.0 == expected_ms),
            "{path}: {expected_ms} missing from {stored:?}"
        );
    }
    assert_eq!(server.field("v").len(), cases.len());
}

#[tokio::test]
async fn invalid_precision_is_rejected() {
    let server = start(1 << 20).await;
    let (status, text) = server.post("/api/v2/write?precision=h", "m v=1 1").await;
    assert_eq!(status, 400);
    let body = json(&text);
    assert_eq!(body["code"], "invalid");
    assert!(
        body["message"].as_str().unwrap().contains("\"h\""),
        "message: {text}"
    );
    assert!(server.all().is_empty());
}

#[tokio::test]
async fn partial_write_names_first_bad_line() {
    let server = start(1 << 20).await;
    let body = "m v=1 1000000000\n\
                # a comment\n\
                m v=oops 2000000000\n\
                m,broken\n\
                m v=4 4000000000\n";
    let (status, text) = server.post("/api/v2/write", body).await;
    assert_eq!(status, 400);
    let body = json(&text);
    assert_eq!(body["code"], "invalid");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("line 3"), "message: {message}");
    assert!(message.contains("v=oops"), "message: {message}");
    assert!(message.contains("2 lines rejected"), "message: {message}");
    let stored: Vec<i64> = server.field("v").iter().map(|(ts, _)| ts.0).collect();
    assert_eq!(stored, vec![1_000, 4_000]);
}

#[tokio::test]
async fn string_fields_are_skipped_and_named() {
    let server = start(1 << 20).await;
    let (status, text) = server
        .post(
            "/api/v2/write?precision=ms",
            "m,device=d1 status=\"ok\",v=3 5000",
        )
        .await;
    assert_eq!(status, 400);
    let message = json(&text)["message"].as_str().unwrap().to_owned();
    assert!(message.contains("line 1"), "message: {message}");
    assert!(
        message.contains("field \"status\" is a string"),
        "message: {message}"
    );
    assert_eq!(
        server.field("v"),
        vec![(Timestamp(5_000), Value::Number(3.0))]
    );
    assert!(server.field("status").is_empty());
}

#[tokio::test]
async fn gzip_body_is_accepted() {
    let server = start(1 << 20).await;
    let lines: String = (0..1_000)
        .map(|i| format!("m,device=d{} v={i} {}\n", i % 10, i * 1_000))
        .collect();
    let response = server
        .client
        .post(format!("{}/api/v2/write?precision=ms", server.url))
        .header("Content-Encoding", "gzip")
        .body(gzip(lines.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    let total: usize = server.all().iter().map(|s| s.points.len()).sum();
    assert_eq!(total, 1_000);
}

#[tokio::test]
async fn bad_encodings_are_rejected() {
    let server = start(1 << 20).await;
    let url = format!("{}/api/v2/write", server.url);
    let unknown = server
        .client
        .post(&url)
        .header("Content-Encoding", "br")
        .body("m v=1")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 415);
    let message = json(&unknown.text().await.unwrap())["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("\"br\""), "message: {message}");

    let corrupt = server
        .client
        .post(&url)
        .header("Content-Encoding", "gzip")
        .body("not gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(corrupt.status().as_u16(), 400);
    assert_eq!(json(&corrupt.text().await.unwrap())["code"], "invalid");

    let (status, _) = server.post("/api/v2/write", vec![0xff, 0xfe, b'\n']).await;
    assert_eq!(status, 400);
    assert!(server.all().is_empty());
}

#[tokio::test]
async fn oversized_body_is_413() {
    let server = start(1_000).await;
    let big: String = (0..200).map(|i| format!("m v={i} {i}\n")).collect();
    assert!(big.len() > 1_000);
    let (status, text) = server.post("/api/v2/write", big.clone()).await;
    assert_eq!(status, 413, "body: {text}");
    assert!(text.contains("1000 bytes"), "body: {text}");

    // The limit applies after decompression too.
    let padded = format!("m v=1 1\n#{}\n", "x".repeat(50_000));
    let compressed = gzip(padded.as_bytes());
    assert!(compressed.len() < 1_000);
    let response = server
        .client
        .post(format!("{}/api/v2/write", server.url))
        .header("Content-Encoding", "gzip")
        .body(compressed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    assert!(server.all().is_empty());
}

#[tokio::test]
async fn closed_pipeline_returns_503() {
    let (ingest, rx) = IngestHandle::channel(1);
    drop(rx);
    let app = router_with_options(ingest, &SharedRegistry::new(), WriteOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v2/write", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let response = reqwest::Client::new()
        .post(url)
        .body("m v=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
}

#[test]
fn parse_body_handles_escapes_and_types() {
    let body = "my\\ meas,site=a\\,b,device=d\\ 1 value=1.5,count=3u,on=F 1000000\n";
    let parsed = parse_body(body, Precision::Nanoseconds, Timestamp(0));
    assert!(parsed.first_error.is_none(), "{:?}", parsed.first_error);
    assert_eq!(parsed.points.len(), 3);
    let point = &parsed.points[0];
    assert_eq!(point.series.measurement, "my meas");
    assert_eq!(point.series.tag("site"), Some("a,b"));
    assert_eq!(point.series.tag("device"), Some("d 1"));
    assert_eq!(point.ts, Timestamp(1));
    let values: Vec<Value> = parsed.points.iter().map(|p| p.value).collect();
    assert_eq!(
        values,
        vec![Value::Number(1.5), Value::Number(3.0), Value::Bool(false)]
    );
}

#[test]
fn timestamp_overflow_rejects_line() {
    let parsed = parse_body(
        "m v=1 9223372036854775807",
        Precision::Seconds,
        Timestamp(0),
    );
    assert!(parsed.points.is_empty());
    assert_eq!(parsed.lines_rejected, 1);
    assert!(parsed.first_error.unwrap().reason.contains("overflows"));
}

#[test]
fn repeated_tag_rejects_line() {
    let parsed = parse_body(
        "gas-detector,device=gas-a-01,device=gas-a-02 gas_lel=1 1\ngas-detector,device=gas-a-03 gas_lel=2 1",
        Precision::Seconds,
        Timestamp(0),
    );
    assert_eq!(parsed.points.len(), 1, "the second line is stored");
    assert_eq!(parsed.points[0].series.tag("device"), Some("gas-a-03"));
    assert_eq!(parsed.lines_rejected, 1);
    let error = parsed.first_error.unwrap();
    assert_eq!(error.line, 1);
    assert!(
        error
            .reason
            .contains("tag \"device\" appears more than once"),
        "{}",
        error.reason
    );
}

#[test]
fn tag_order_gives_same_series() {
    let body = "m,site=s1,device=d1,site_kind=plant a=1,b=2 1\n\
                m,site_kind=plant,device=d1,site=s1 a=3 2\n\
                m,device=d1,site_kind=plant,site=s1 b=4 3\n";
    let parsed = parse_body(body, Precision::Nanoseconds, Timestamp(0));
    assert!(parsed.first_error.is_none(), "{:?}", parsed.first_error);
    assert_eq!(parsed.lines_accepted, 3);
    assert_eq!(parsed.points.len(), 4);
    let expected_tags = vec![
        ("device".to_owned(), "d1".to_owned()),
        ("site".to_owned(), "s1".to_owned()),
        ("site_kind".to_owned(), "plant".to_owned()),
    ];
    for point in &parsed.points {
        assert_eq!(point.series.measurement, "m");
        assert_eq!(point.series.tags, expected_tags);
    }
    let fields: Vec<&str> = parsed
        .points
        .iter()
        .map(|p| p.series.field.as_str())
        .collect();
    assert_eq!(fields, ["a", "b", "a", "b"]);
    assert_eq!(parsed.points[0].series, parsed.points[2].series);
    assert_eq!(parsed.points[1].series, parsed.points[3].series);
}

#[test]
fn non_finite_field_drops_whole_line() {
    let body = "m,device=d1 a=1,b=1e999,c=2 1\nm,device=d2 a=5 1\n";
    let parsed = parse_body(body, Precision::Nanoseconds, Timestamp(0));
    assert_eq!(parsed.lines_rejected, 1);
    assert_eq!(parsed.lines_accepted, 1);
    assert_eq!(
        parsed.points.len(),
        1,
        "no field of the first line is stored"
    );
    assert_eq!(parsed.points[0].series.tag("device"), Some("d2"));
    let error = parsed.first_error.unwrap();
    assert_eq!(error.line, 1);
    assert!(
        error.reason.contains("not a finite number"),
        "{}",
        error.reason
    );
}

#[test]
fn nan_and_infinity_fields_are_named() {
    for (value, line) in [
        ("NaN", "m,device=d1 a=1,v=NaN 1"),
        ("-inf", "m,device=d1 v=-inf"),
        ("+Infinity", "m v=+Infinity,a=2i"),
    ] {
        let parsed = parse_body(line, Precision::Nanoseconds, Timestamp(0));
        assert_eq!(parsed.lines_rejected, 1, "{line}");
        let reason = parsed.first_error.unwrap().reason;
        assert!(
            reason.contains(&format!("field `v` has the value `{value}`")),
            "{line}: {reason}"
        );
    }
    // Other parse errors keep the parser's message.
    let parsed = parse_body("m v=nope", Precision::Nanoseconds, Timestamp(0));
    let reason = parsed.first_error.unwrap().reason;
    assert!(!reason.contains("has the value"), "{reason}");
}

#[test]
fn line_of_only_string_fields_is_not_accepted() {
    let parsed = parse_body(
        "m,device=d1 note=\"hi\" 1\n",
        Precision::Nanoseconds,
        Timestamp(0),
    );
    assert!(parsed.points.is_empty());
    assert_eq!(parsed.lines_accepted, 0);
    assert_eq!(parsed.string_fields_skipped, 1);
}
