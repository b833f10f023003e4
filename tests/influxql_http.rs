//! `/query` over a real HTTP server: InfluxDB 1.x response shape, parameters, SHOW
//! statements and SELECT evaluation, with exact expected values.

#[path = "influxql_support.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value as Json, json};
use stonelion::api::influxql::QueryLimits;
use stonelion::model::{Timestamp, Value};
use stonelion::storage::engine::{Engine, EngineOptions, RollupTier};
use stonelion::storage::{
    Point, Query, Selector, SeriesData, SeriesKey, StorageError, TimeSeriesStore,
};
use support::{MemStore, get_query, point, serve_influxql, serve_influxql_with_limits};

/// A minute boundary: 2023-11-14T22:14:00Z.
const T0: i64 = 1_700_000_040_000;
const MINUTE: i64 = 60_000;

/// gas-01 at plant-a: 10, 20, 30, 40 at T0 + 0, 1, 2, 3 minutes, then nothing until 40 at
/// T0 + 5 minutes. gas-02 at plant-b: 5 at T0 + 30 s. A boolean smoke series.
async fn fixture() -> String {
    let store = MemStore::new();
    let a = [
        ("site", "plant-a"),
        ("device", "gas-01"),
        ("site_kind", "enterprise"),
    ];
    let b = [
        ("site", "plant-b"),
        ("device", "gas-02"),
        ("site_kind", "enterprise"),
    ];
    let mut points = Vec::new();
    for (i, v) in [(0, 10.0), (1, 20.0), (2, 30.0), (3, 40.0)] {
        points.push(point(
            "gas-detector",
            &a,
            "gas_lel",
            T0 + i * MINUTE,
            Value::Number(v),
        ));
    }
    points.push(point(
        "gas-detector",
        &a,
        "gas_lel",
        T0 + 5 * MINUTE,
        Value::Number(40.0),
    ));
    points.push(point(
        "gas-detector",
        &b,
        "gas_lel",
        T0 + 30_000,
        Value::Number(5.0),
    ));
    let smoke = [
        ("site", "park b"),
        ("device", "smoke \"01\""),
        ("site_kind", "park_building"),
    ];
    points.push(point(
        "smoke-detector",
        &smoke,
        "smoke",
        T0,
        Value::Bool(false),
    ));
    points.push(point(
        "smoke-detector",
        &smoke,
        "smoke",
        T0 + MINUTE,
        Value::Bool(true),
    ));
    store.write(points).expect("write fixture");
    serve_influxql(store as Arc<dyn TimeSeriesStore>).await
}

/// Runs one statement with `epoch=ms` and returns its result object.
async fn run(base: &str, q: &str) -> Json {
    let (status, body) = get_query(base, &[("q", q), ("db", "stonelion"), ("epoch", "ms")]).await;
    assert_eq!(status, 200, "status for {q}: {body}");
    body["results"][0].clone()
}

/// The `values` of the only series of a result.
fn values(result: &Json) -> Json {
    assert_eq!(
        result["series"].as_array().map(Vec::len),
        Some(1),
        "one series expected: {result}"
    );
    result["series"][0]["values"].clone()
}

const RANGE: &str = "time >= 1700000040000ms AND time < 1700000400000ms";

#[tokio::test]
async fn show_databases_exact_shape() {
    let base = fixture().await;
    let (status, body) = get_query(&base, &[("q", "SHOW DATABASES")]).await;
    assert_eq!(status, 200);
    let expected = json!({"results": [{"statement_id": 0, "series": [
        {"name": "databases", "columns": ["name"], "values": [["stonelion"]]}
    ]}]});
    assert_eq!(body, expected);
}

#[tokio::test]
async fn missing_q_is_bad_request() {
    let base = fixture().await;
    let (status, body) = get_query(&base, &[("db", "stonelion")]).await;
    assert_eq!(status, 400);
    assert_eq!(body, json!({"error": "missing required parameter \"q\""}));
}

#[tokio::test]
async fn parse_error_points_at_position() {
    let base = fixture().await;
    let (status, body) = get_query(&base, &[("q", "SELECT mean(gas_lel) FORM m")]).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        "error parsing query: found FORM, expected FROM at line 1, char 22"
    );
}

#[tokio::test]
async fn form_post_like_grafana() {
    let base = fixture().await;
    let q = format!("SELECT last(\"gas_lel\") FROM \"gas-detector\" WHERE {RANGE}");
    let response = reqwest::Client::new()
        .post(format!("{base}/query"))
        .form(&[("q", q.as_str()), ("db", "stonelion"), ("epoch", "ms")])
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    let body: Json = response.json().await.expect("json");
    assert_eq!(
        body["results"][0]["series"][0]["values"],
        json!([[T0 + 5 * MINUTE, 40]])
    );
}

#[tokio::test]
async fn statements_get_own_ids_and_errors() {
    let base = fixture().await;
    let q = "SHOW MEASUREMENTS; SELECT x FROM \"other\".\"autogen\".\"m\"; SHOW FIELD KEYS FROM nothing";
    let (status, body) = get_query(&base, &[("q", q)]).await;
    assert_eq!(status, 200);
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["statement_id"], 0);
    assert_eq!(
        results[1],
        json!({"statement_id": 1, "error": "database not found: other"})
    );
    assert_eq!(results[2], json!({"statement_id": 2}));
}

#[tokio::test]
async fn unknown_db_parameter_rejected() {
    let base = fixture().await;
    let (_, body) = get_query(&base, &[("q", "SHOW MEASUREMENTS"), ("db", "telegraf")]).await;
    assert_eq!(body["results"][0]["error"], "database not found: telegraf");
}

#[tokio::test]
async fn show_measurements_regex_and_limit() {
    let base = fixture().await;
    assert_eq!(
        values(&run(&base, "SHOW MEASUREMENTS").await),
        json!([["gas-detector"], ["smoke-detector"]])
    );
    assert_eq!(
        values(&run(&base, "SHOW MEASUREMENTS WITH MEASUREMENT =~ /^smoke/").await),
        json!([["smoke-detector"]])
    );
    assert_eq!(
        values(&run(&base, "SHOW MEASUREMENTS LIMIT 1 OFFSET 1").await),
        json!([["smoke-detector"]])
    );
    let filtered = run(&base, "SHOW MEASUREMENTS WHERE \"site\" = 'park b'").await;
    assert_eq!(values(&filtered), json!([["smoke-detector"]]));
}

#[tokio::test]
async fn show_tag_keys_per_measurement() {
    let base = fixture().await;
    let result = run(&base, "SHOW TAG KEYS FROM \"gas-detector\"").await;
    assert_eq!(result["series"][0]["name"], "gas-detector");
    assert_eq!(result["series"][0]["columns"], json!(["tagKey"]));
    assert_eq!(
        values(&result),
        json!([["device"], ["site"], ["site_kind"]])
    );
    let all = run(&base, "SHOW TAG KEYS").await;
    assert_eq!(all["series"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn show_tag_values_key_forms() {
    let base = fixture().await;
    let eq = run(
        &base,
        "SHOW TAG VALUES FROM \"gas-detector\" WITH KEY = \"site\"",
    )
    .await;
    assert_eq!(eq["series"][0]["columns"], json!(["key", "value"]));
    assert_eq!(
        values(&eq),
        json!([["site", "plant-a"], ["site", "plant-b"]])
    );

    let q = "SHOW TAG VALUES FROM \"gas-detector\" WITH KEY IN (\"device\", \"site\") WHERE \"site\" =~ /^plant-a$/";
    let within = run(&base, q).await;
    assert_eq!(
        values(&within),
        json!([["device", "gas-01"], ["site", "plant-a"]])
    );

    let regex = run(
        &base,
        "SHOW TAG VALUES WITH KEY =~ /^dev/ WHERE site = 'park b'",
    )
    .await;
    assert_eq!(regex["series"][0]["name"], "smoke-detector");
    assert_eq!(values(&regex), json!([["device", "smoke \"01\""]]));
}

#[tokio::test]
async fn show_field_keys_types() {
    let base = fixture().await;
    let result = run(&base, "SHOW FIELD KEYS").await;
    let series = result["series"].as_array().expect("series");
    assert_eq!(series[0]["values"], json!([["gas_lel", "float"]]));
    assert_eq!(series[1]["values"], json!([["smoke", "boolean"]]));
    assert_eq!(series[1]["columns"], json!(["fieldKey", "fieldType"]));
}

#[tokio::test]
async fn show_retention_policies_shape() {
    let base = fixture().await;
    let result = run(&base, "SHOW RETENTION POLICIES ON \"stonelion\"").await;
    assert_eq!(
        result["series"][0]["columns"],
        json!([
            "name",
            "duration",
            "shardGroupDuration",
            "replicaN",
            "default"
        ])
    );
    assert_eq!(
        values(&result),
        json!([["autogen", "0s", "168h0m0s", 1, true]])
    );
}

#[tokio::test]
async fn raw_select_rfc3339_by_default() {
    let base = fixture().await;
    let q = "SELECT \"gas_lel\" FROM \"gas-detector\" WHERE \"device\" = 'gas-02'";
    let (_, body) = get_query(&base, &[("q", q)]).await;
    let expected = json!({"results": [{"statement_id": 0, "series": [{
        "name": "gas-detector", "columns": ["time", "gas_lel"],
        "values": [["2023-11-14T22:14:30Z", 5]],
    }]}]});
    assert_eq!(body, expected);
}

#[tokio::test]
async fn raw_select_merges_series_in_time_order() {
    let base = fixture().await;
    let q = format!(
        "SELECT gas_lel, device FROM \"gas-detector\" WHERE time < {}ms",
        T0 + MINUTE + 1
    );
    let result = run(&base, &q).await;
    let expected = json!([
        [T0, 10, "gas-01"],
        [T0 + 30_000, 5, "gas-02"],
        [T0 + MINUTE, 20, "gas-01"]
    ]);
    assert_eq!(values(&result), expected);
}

#[tokio::test]
async fn wildcard_lists_fields_and_tags_sorted() {
    let base = fixture().await;
    let result = run(&base, "SELECT * FROM \"smoke-detector\"").await;
    assert_eq!(
        result["series"][0]["columns"],
        json!(["time", "device", "site", "site_kind", "smoke"])
    );
    let expected = json!([
        [T0, "smoke \"01\"", "park b", "park_building", false],
        [T0 + MINUTE, "smoke \"01\"", "park b", "park_building", true],
    ]);
    assert_eq!(values(&result), expected);
}

#[tokio::test]
async fn group_by_time_fill_modes() {
    let base = fixture().await;
    let q = |fill: &str| {
        format!(
            "SELECT mean(gas_lel) FROM \"gas-detector\" WHERE device = 'gas-01' AND {RANGE} GROUP BY time(1m) fill({fill})"
        )
    };
    let null = values(&run(&base, &q("null")).await);
    assert_eq!(null.as_array().map(Vec::len), Some(6));
    assert_eq!(null[4], json!([T0 + 4 * MINUTE, null]));
    assert_eq!(
        values(&run(&base, &q("none")).await)
            .as_array()
            .map(Vec::len),
        Some(5)
    );
    assert_eq!(
        values(&run(&base, &q("previous")).await)[4],
        json!([T0 + 4 * MINUTE, 40])
    );
    assert_eq!(
        values(&run(&base, &q("linear")).await)[4],
        json!([T0 + 4 * MINUTE, 40])
    );
    assert_eq!(
        values(&run(&base, &q("-1")).await)[4],
        json!([T0 + 4 * MINUTE, -1])
    );
}

#[tokio::test]
async fn linear_fill_interpolates_gap() {
    let store = MemStore::new();
    let tags = [("site", "s"), ("device", "d")];
    let writes = vec![
        point("m", &tags, "v", T0, Value::Number(0.0)),
        point("m", &tags, "v", T0 + 3 * MINUTE, Value::Number(30.0)),
    ];
    store.write(writes).expect("write");
    let base = serve_influxql(store).await;
    let q = format!(
        "SELECT max(v) FROM m WHERE time >= {T0}ms AND time < {}ms GROUP BY time(1m) fill(linear)",
        T0 + 4 * MINUTE
    );
    let expected = json!([
        [T0, 0],
        [T0 + MINUTE, 10],
        [T0 + 2 * MINUTE, 20],
        [T0 + 3 * MINUTE, 30]
    ]);
    assert_eq!(values(&run(&base, &q).await), expected);
}

#[tokio::test]
async fn group_boundaries_align_to_interval() {
    let base = fixture().await;
    // The range starts 30 s into a 2-minute window; the first window is reported at its
    // aligned start and holds only points inside the range.
    let q = format!(
        "SELECT count(gas_lel), sum(gas_lel) FROM \"gas-detector\" WHERE time >= {}ms AND time <= {}ms GROUP BY time(2m)",
        T0 + 30_000,
        T0 + 3 * MINUTE
    );
    let result = run(&base, &q).await;
    assert_eq!(
        result["series"][0]["columns"],
        json!(["time", "count", "sum"])
    );
    assert_eq!(
        values(&result),
        json!([[T0, 2, 25], [T0 + 2 * MINUTE, 2, 70]])
    );
}

#[tokio::test]
async fn group_by_time_with_offset() {
    let base = fixture().await;
    let q = format!(
        "SELECT count(gas_lel) FROM \"gas-detector\" WHERE device = 'gas-01' AND {RANGE} GROUP BY time(2m, 1m) fill(none)"
    );
    let expected = json!([
        [T0 - MINUTE, 1],
        [T0 + MINUTE, 2],
        [T0 + 3 * MINUTE, 1],
        [T0 + 5 * MINUTE, 1]
    ]);
    assert_eq!(values(&run(&base, &q).await), expected);
}

#[tokio::test]
async fn count_reports_zero_for_empty_windows() {
    let base = fixture().await;
    let q = format!(
        "SELECT count(gas_lel) FROM \"gas-detector\" WHERE device = 'gas-01' AND {RANGE} GROUP BY time(1m)"
    );
    assert_eq!(
        values(&run(&base, &q).await)[4],
        json!([T0 + 4 * MINUTE, 0])
    );
}

#[tokio::test]
async fn group_by_tag_adds_tags_object() {
    let base = fixture().await;
    let result = run(
        &base,
        "SELECT max(gas_lel) FROM \"gas-detector\" GROUP BY \"site\"",
    )
    .await;
    let series = result["series"].as_array().expect("series");
    assert_eq!(series.len(), 2);
    assert_eq!(series[0]["tags"], json!({"site": "plant-a"}));
    assert_eq!(series[0]["values"], json!([[T0 + 3 * MINUTE, 40]]));
    assert_eq!(series[1]["tags"], json!({"site": "plant-b"}));
    let wildcard = run(
        &base,
        "SELECT last(gas_lel) FROM \"gas-detector\" GROUP BY *",
    )
    .await;
    assert_eq!(
        wildcard["series"][0]["tags"],
        json!({"device": "gas-01", "site": "plant-a", "site_kind": "enterprise"})
    );
}

#[tokio::test]
async fn aggregate_without_group_by_uses_range_start() {
    let base = fixture().await;
    let q = format!("SELECT mean(gas_lel), max(gas_lel) FROM \"gas-detector\" WHERE {RANGE}");
    assert_eq!(
        values(&run(&base, &q).await),
        json!([[T0, 24.166666666666668, 40]])
    );
    let unbounded = run(&base, "SELECT sum(gas_lel) FROM \"gas-detector\"").await;
    assert_eq!(values(&unbounded), json!([[0, 145]]));
}

#[tokio::test]
async fn tag_conditions_regex_or_parentheses() {
    let base = fixture().await;
    let q = "SELECT count(gas_lel) FROM \"gas-detector\" WHERE (site =~ /^plant\\-b$/ OR device = 'gas-01') AND site_kind != 'park_building'";
    assert_eq!(values(&run(&base, q).await), json!([[0, 6]]));
    let negated = "SELECT count(gas_lel) FROM \"gas-detector\" WHERE device !~ /gas-0[1]/";
    assert_eq!(values(&run(&base, negated).await), json!([[0, 1]]));
    let escaped = "SELECT count(smoke) FROM \"smoke-detector\" WHERE site =~ /^park\\ b$/ AND device = 'smoke \\'01\\''";
    let escaped_result = run(&base, escaped).await;
    assert_eq!(escaped_result, json!({"statement_id": 0}));
    let quoted = "SELECT count(smoke) FROM \"smoke-detector\" WHERE \"device\" = 'smoke \"01\"'";
    assert_eq!(values(&run(&base, quoted).await), json!([[0, 2]]));
}

#[tokio::test]
async fn time_literal_forms_agree() {
    let base = fixture().await;
    let forms = [
        format!("time >= {}", (T0 + 3 * MINUTE) * 1_000_000),
        format!("time >= {}ms", T0 + 3 * MINUTE),
        format!("time >= {}s", (T0 + 3 * MINUTE) / 1000),
        "time >= '2023-11-14T22:17:00Z'".to_owned(),
        "time >= '2023-11-15T06:17:00+08:00'".to_owned(),
        "time >= '2023-11-14 22:17:00'".to_owned(),
    ];
    for form in forms {
        let q = format!("SELECT count(gas_lel) FROM \"gas-detector\" WHERE {form}");
        assert_eq!(
            values(&run(&base, &q).await),
            json!([[(T0 + 3 * MINUTE), 2]]),
            "{form}"
        );
    }
}

#[tokio::test]
async fn relative_time_against_now() {
    let store = MemStore::new();
    let now = support::now_ms();
    let tags = [("site", "s")];
    let writes = vec![
        point("m", &tags, "v", now - 2 * 3_600_000, Value::Number(1.0)),
        point("m", &tags, "v", now - 60_000, Value::Number(2.0)),
    ];
    store.write(writes).expect("write");
    let base = serve_influxql(store).await;
    let result = run(&base, "SELECT v FROM m WHERE time > now() - 1h").await;
    assert_eq!(values(&result), json!([[now - 60_000, 2]]));
}

#[tokio::test]
async fn order_desc_limit_offset() {
    let base = fixture().await;
    let q = "SELECT gas_lel FROM \"gas-detector\" WHERE device = 'gas-01' ORDER BY time DESC LIMIT 2 OFFSET 1";
    assert_eq!(
        values(&run(&base, q).await),
        json!([[T0 + 3 * MINUTE, 40], [T0 + 2 * MINUTE, 30]])
    );
}

#[tokio::test]
async fn slimit_soffset_pick_series() {
    let base = fixture().await;
    let q = "SELECT last(gas_lel) FROM \"gas-detector\" GROUP BY device SLIMIT 1 SOFFSET 1";
    let result = run(&base, q).await;
    assert_eq!(result["series"][0]["tags"], json!({"device": "gas-02"}));
    assert_eq!(result["series"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn selectors_report_point_time() {
    let base = fixture().await;
    let q = "SELECT first(gas_lel) FROM \"gas-detector\" WHERE device = 'gas-01'";
    assert_eq!(values(&run(&base, q).await), json!([[T0, 10]]));
    let q = "SELECT min(gas_lel) FROM \"gas-detector\"";
    assert_eq!(values(&run(&base, q).await), json!([[T0 + 30_000, 5]]));
}

#[tokio::test]
async fn statistics_functions() {
    let base = fixture().await;
    let q = "SELECT median(gas_lel), spread(gas_lel), percentile(gas_lel, 80) FROM \"gas-detector\" WHERE device = 'gas-01'";
    assert_eq!(values(&run(&base, q).await), json!([[0, 30, 30, 40]]));
}

#[tokio::test]
async fn transforms_over_raw_and_windows() {
    let base = fixture().await;
    let raw = "SELECT difference(gas_lel) FROM \"gas-detector\" WHERE device = 'gas-01'";
    let expected = json!([
        [T0 + MINUTE, 10],
        [T0 + 2 * MINUTE, 10],
        [T0 + 3 * MINUTE, 10],
        [T0 + 5 * MINUTE, 0]
    ]);
    assert_eq!(values(&run(&base, raw).await), expected);

    let rate =
        "SELECT derivative(gas_lel, 1m) FROM \"gas-detector\" WHERE device = 'gas-01' LIMIT 1";
    assert_eq!(values(&run(&base, rate).await), json!([[T0 + MINUTE, 10]]));

    let windowed = format!(
        "SELECT non_negative_derivative(mean(gas_lel)) AS rate FROM \"gas-detector\" WHERE device = 'gas-01' AND {RANGE} GROUP BY time(1m)"
    );
    let result = run(&base, &windowed).await;
    assert_eq!(result["series"][0]["columns"], json!(["time", "rate"]));
    let expected = json!([
        [T0 + MINUTE, 10],
        [T0 + 2 * MINUTE, 10],
        [T0 + 3 * MINUTE, 10],
        [T0 + 5 * MINUTE, 0]
    ]);
    assert_eq!(values(&result), expected);
}

#[tokio::test]
async fn transform_requires_interval() {
    let base = fixture().await;
    let result = run(
        &base,
        "SELECT derivative(mean(gas_lel)) FROM \"gas-detector\"",
    )
    .await;
    assert_eq!(
        result["error"],
        "derivative aggregate requires a GROUP BY interval"
    );
    let mixed = run(&base, "SELECT gas_lel, mean(gas_lel) FROM \"gas-detector\"").await;
    assert_eq!(
        mixed["error"],
        "mixing aggregate and non-aggregate queries is not supported"
    );
}

#[tokio::test]
async fn time_zone_shifts_output_and_windows() {
    let base = fixture().await;
    let q = "SELECT count(gas_lel) FROM \"gas-detector\" WHERE time >= '2023-11-14T00:00:00Z' AND time < '2023-11-16T00:00:00Z' GROUP BY time(1d) fill(none) tz('Asia/Shanghai')";
    let (_, body) = get_query(&base, &[("q", q)]).await;
    // All points fall on 2023-11-15 in Shanghai, whose day starts at 16:00 UTC the day before.
    assert_eq!(
        body["results"][0]["series"][0]["values"],
        json!([["2023-11-15T00:00:00+08:00", 6]])
    );
}

#[tokio::test]
async fn empty_result_has_no_series() {
    let base = fixture().await;
    let result = run(&base, "SELECT mean(gas_lel) FROM \"no-such-measurement\"").await;
    assert_eq!(result, json!({"statement_id": 0}));
    let outside = run(
        &base,
        "SELECT gas_lel FROM \"gas-detector\" WHERE time > now()",
    )
    .await;
    assert_eq!(outside, json!({"statement_id": 0}));
}

#[tokio::test]
async fn regex_source_and_qualified_names() {
    let base = fixture().await;
    let (status, body) = get_query(&base, &[("q", "SELECT last(*) FROM /detector$/")]).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("last(*)")),
        "{body}"
    );
    let q = "SELECT count(gas_lel) FROM \"stonelion\"..\"gas-detector\", \"stonelion\".\"autogen\".\"smoke-detector\"";
    let result = run(&base, q).await;
    assert_eq!(result["series"].as_array().map(Vec::len), Some(1));
    let regex = run(&base, "SELECT count(smoke) FROM /^smoke-/").await;
    assert_eq!(values(&regex), json!([[0, 2]]));
}

#[tokio::test]
async fn field_condition_filters_rows() {
    let base = fixture().await;
    let q = "SELECT gas_lel FROM \"gas-detector\" WHERE gas_lel > 25 AND gas_lel <= 40 AND device = 'gas-01'";
    let expected = json!([
        [T0 + 2 * MINUTE, 30],
        [T0 + 3 * MINUTE, 40],
        [T0 + 5 * MINUTE, 40]
    ]);
    assert_eq!(values(&run(&base, q).await), expected);
    let smoke = "SELECT count(smoke) FROM \"smoke-detector\" WHERE smoke = true";
    assert_eq!(values(&run(&base, smoke).await), json!([[0, 1]]));
}

#[tokio::test]
async fn pretty_and_epoch_parameters() {
    let base = fixture().await;
    let q = "SELECT gas_lel FROM \"gas-detector\" WHERE device = 'gas-02'";
    let response = reqwest::Client::new()
        .get(format!("{base}/query"))
        .query(&[("q", q), ("pretty", "true"), ("epoch", "s")])
        .send()
        .await
        .expect("query");
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.expect("text");
    assert!(text.contains("\n  "), "pretty output is indented: {text}");
    let body: Json = serde_json::from_str(&text).expect("json");
    assert_eq!(
        body["results"][0]["series"][0]["values"],
        json!([[(T0 + 30_000) / 1000, 5]])
    );
    let (status, _) = get_query(&base, &[("q", q), ("epoch", "days")]).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn ping_answers_no_content() {
    let base = fixture().await;
    let response = reqwest::get(format!("{base}/ping")).await.expect("ping");
    assert_eq!(response.status(), 204);
    assert!(response.headers().contains_key("x-influxdb-version"));
}

/// Writes 10 minutes of readings, one every 10 s, for two gas detectors and one smoke
/// detector, ending now, and serves them with the default limits.
async fn recent_fixture() -> (Arc<MemStore>, String) {
    let store = MemStore::new();
    let now = support::now_ms();
    let mut points = Vec::new();
    for device in ["gas-01", "gas-02"] {
        let tags = [("site", "plant-a"), ("device", device)];
        for i in 0..60 {
            let ts = now - 600_000 + i * 10_000;
            for field in ["gas_lel", "temperature_c", "humidity_pct"] {
                points.push(point(
                    "gas-detector",
                    &tags,
                    field,
                    ts,
                    Value::Number(i as f64),
                ));
            }
        }
    }
    let smoke = [("site", "plant-a"), ("device", "smoke-01")];
    for i in 0..60 {
        let ts = now - 600_000 + i * 10_000;
        points.push(point(
            "smoke-detector",
            &smoke,
            "smoke",
            ts,
            Value::Bool(i % 2 == 0),
        ));
    }
    store.write(points).expect("write fixture");
    let base = serve_influxql(store.clone() as Arc<dyn TimeSeriesStore>).await;
    (store, base)
}

#[tokio::test]
async fn millisecond_buckets_over_all_series_rejected() {
    let (_store, base) = recent_fixture().await;
    let q = "SELECT mean(gas_lel),mean(temperature_c),mean(humidity_pct),mean(usage),mean(smoke) \
             FROM /.*/ WHERE time > now()-16m GROUP BY time(1ms),*";
    let result = run(&base, q).await;
    let error = result["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("max-select-buckets limit exceeded"),
        "error names the limit: {result}"
    );
    // 16 minutes hold 960,000 or 960,001 windows of 1 ms, as now() falls.
    assert!(
        error.contains("960000 per series x 2 series")
            || error.contains("960001 per series x 2 series"),
        "error names the value reached: {error}"
    );
    assert!(error.contains("over the limit of 1000000"), "{error}");
    assert!(error.contains("[api] query_max_buckets"), "{error}");
    assert!(
        error.contains("larger GROUP BY time() interval"),
        "error names the fix: {error}"
    );
    assert!(
        result.get("series").is_none(),
        "no partial series: {result}"
    );

    let ok = run(
        &base,
        "SELECT mean(gas_lel) FROM \"gas-detector\" WHERE time > now()-16m GROUP BY time(1m), device",
    )
    .await;
    assert!(ok.get("error").is_none(), "later query succeeds: {ok}");
    assert_eq!(ok["series"].as_array().map(Vec::len), Some(2), "{ok}");
}

/// Serves the `fixture` data with small limits.
async fn limited_fixture(limits: QueryLimits) -> String {
    let store = MemStore::new();
    let a = [("site", "plant-a"), ("device", "gas-01")];
    let b = [("site", "plant-b"), ("device", "gas-02")];
    let mut points = Vec::new();
    for i in 0..6 {
        points.push(point(
            "gas-detector",
            &a,
            "gas_lel",
            T0 + i * MINUTE,
            Value::Number(1.0),
        ));
    }
    points.push(point("gas-detector", &b, "gas_lel", T0, Value::Number(2.0)));
    store.write(points).expect("write fixture");
    serve_influxql_with_limits(store as Arc<dyn TimeSeriesStore>, limits).await
}

#[tokio::test]
async fn series_limit_counts_tag_sets() {
    let limits = QueryLimits {
        max_series: 1,
        ..QueryLimits::default()
    };
    let base = limited_fixture(limits).await;
    let all = run(
        &base,
        &format!("SELECT gas_lel FROM \"gas-detector\" WHERE {RANGE}"),
    )
    .await;
    let error = all["error"].as_str().unwrap_or_default();
    assert!(error.contains("max-select-series limit exceeded"), "{all}");
    assert!(error.contains("selects 2 series"), "{error}");
    assert!(error.contains("tag filter"), "{error}");

    let one = format!("SELECT gas_lel FROM \"gas-detector\" WHERE device = 'gas-01' AND {RANGE}");
    let one = run(&base, &one).await;
    assert_eq!(values(&one).as_array().map(Vec::len), Some(6), "{one}");
}

#[tokio::test]
async fn points_limit_stops_raw_read() {
    let limits = QueryLimits {
        max_points: 6,
        ..QueryLimits::default()
    };
    let base = limited_fixture(limits).await;
    let all = run(
        &base,
        &format!("SELECT gas_lel FROM \"gas-detector\" WHERE {RANGE}"),
    )
    .await;
    let error = all["error"].as_str().unwrap_or_default();
    assert!(error.contains("max-select-point limit exceeded"), "{all}");
    assert!(error.contains("[api] query_max_points"), "{error}");

    let one = format!("SELECT gas_lel FROM \"gas-detector\" WHERE device = 'gas-01' AND {RANGE}");
    let one = run(&base, &one).await;
    assert_eq!(values(&one).as_array().map(Vec::len), Some(6), "{one}");
}

#[tokio::test]
async fn bucket_limit_sums_over_series() {
    let limits = QueryLimits {
        max_buckets: 10,
        ..QueryLimits::default()
    };
    let base = limited_fixture(limits).await;
    let q = |filter: &str| {
        format!(
            "SELECT max(gas_lel) FROM \"gas-detector\" WHERE {filter}{RANGE} GROUP BY time(1m), device"
        )
    };
    let both = run(&base, &q("")).await;
    let error = both["error"].as_str().unwrap_or_default();
    assert!(error.contains("needs 12 GROUP BY time() buckets"), "{both}");
    assert!(error.contains("(6 per series x 2 series)"), "{error}");

    let one = run(&base, &q("device = 'gas-01' AND ")).await;
    assert_eq!(values(&one).as_array().map(Vec::len), Some(6), "{one}");
}

#[tokio::test]
async fn bucket_limit_without_lower_bound() {
    let limits = QueryLimits {
        max_buckets: 10,
        ..QueryLimits::default()
    };
    let base = limited_fixture(limits).await;
    // Without a lower bound, windows run from the first point to now.
    let q = "SELECT max(gas_lel) FROM \"gas-detector\" WHERE device = 'gas-01' GROUP BY time(1m)";
    let result = run(&base, q).await;
    let error = result["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("max-select-buckets limit exceeded"),
        "{result}"
    );
}

/// A store that counts the aggregated queries it passes on.
struct CountingStore {
    inner: Arc<Engine>,
    aggregated: AtomicUsize,
}

impl TimeSeriesStore for CountingStore {
    fn write(&self, points: Vec<Point>) -> Result<(), StorageError> {
        self.inner.write(points)
    }

    fn query(&self, query: &Query) -> Result<Vec<SeriesData>, StorageError> {
        if query.aggregation.is_some() {
            self.aggregated.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.query(query)
    }

    fn series(&self, selector: &Selector) -> Result<Vec<SeriesKey>, StorageError> {
        self.inner.series(selector)
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.inner.flush()
    }

    fn enforce_retention(&self, cutoff: Timestamp) -> Result<u64, StorageError> {
        self.inner.enforce_retention(cutoff)
    }

    fn commit_interval(&self) -> Duration {
        self.inner.commit_interval()
    }
}

/// Serves `engine` through a counting store and returns the store and the base URL.
async fn serve_engine(engine: Arc<Engine>) -> (Arc<CountingStore>, String) {
    let store = Arc::new(CountingStore {
        inner: engine,
        aggregated: AtomicUsize::new(0),
    });
    let base = serve_influxql(store.clone() as Arc<dyn TimeSeriesStore>).await;
    (store, base)
}

/// The series of a result, failing on a statement error.
fn series_of(result: &Json, q: &str) -> Json {
    assert!(result.get("error").is_none(), "error for {q}: {result}");
    result.get("series").cloned().unwrap_or(Json::Null)
}

#[tokio::test]
async fn pushed_aggregates_equal_evaluated() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let engine = Arc::new(Engine::open(dir.path(), EngineOptions::default()).expect("open engine"));
    let mut points = Vec::new();
    for (d, device) in [(0_i64, "gas-01"), (1, "gas-02")] {
        let tags = [("site", "plant-a"), ("device", device)];
        for i in 0..170 {
            let ts = T0 + i * 7_000 + d * 3_000;
            // A gap from minute 5 to minute 9 tests fill. Values that are not exact in
            // binary test that both paths add in the same order.
            if (5 * MINUTE..9 * MINUTE).contains(&(ts - T0)) {
                continue;
            }
            let value = Value::Number(i as f64 * 0.1 + d as f64 * 0.37);
            points.push(point("gas-detector", &tags, "gas_lel", ts, value));
            let alarm = Value::Bool((i + d) % 3 == 0);
            points.push(point("gas-detector", &tags, "alarm", ts, alarm));
        }
    }
    engine.write(points).expect("write points");
    let (store, base) = serve_engine(engine).await;

    let range = format!("time >= {T0}ms AND time < {}ms", T0 + 20 * MINUTE);
    for function in ["mean", "min", "max", "first", "last", "sum", "count"] {
        for fill in ["null", "none", "previous", "linear", "7"] {
            for grouping in ["", ", device", ", *"] {
                let pushed = format!(
                    "SELECT {function}(gas_lel), {function}(alarm) FROM \"gas-detector\" \
                     WHERE {range} GROUP BY time(1m){grouping} fill({fill})"
                );
                // tz('UTC') aligns windows as without it, but keeps the evaluator's path.
                let evaluated = format!("{pushed} tz('UTC')");
                let before = store.aggregated.load(Ordering::SeqCst);
                let expected = series_of(&run(&base, &evaluated).await, &evaluated);
                assert_eq!(
                    store.aggregated.load(Ordering::SeqCst),
                    before,
                    "the evaluator path sends no aggregation: {evaluated}"
                );
                assert!(expected.is_array(), "data for {evaluated}: {expected}");
                let actual = series_of(&run(&base, &pushed).await, &pushed);
                assert_eq!(actual, expected, "{pushed}");
            }
        }
    }
    assert!(
        store.aggregated.load(Ordering::SeqCst) > 0,
        "some statements were pushed down"
    );

    // One tag set per output series: pushed down for every function.
    let before = store.aggregated.load(Ordering::SeqCst);
    let q = format!(
        "SELECT mean(gas_lel) FROM \"gas-detector\" WHERE {range} GROUP BY time(1m), device"
    );
    series_of(&run(&base, &q).await, &q);
    assert_eq!(store.aggregated.load(Ordering::SeqCst), before + 1, "{q}");
}

/// Hour partitions with 2 h of raw data and 1-minute rollups for a day.
fn rollup_options() -> EngineOptions {
    EngineOptions {
        partition_duration: Duration::from_secs(3_600),
        retention: Duration::from_secs(2 * 3_600),
        rollups: vec![RollupTier {
            resolution: Duration::from_secs(60),
            retention: Duration::from_secs(86_400),
        }],
        ..EngineOptions::default()
    }
}

#[tokio::test]
async fn expired_range_answered_from_rollups() {
    /// A day boundary, so hour partitions start here.
    const DAY_T0: i64 = 1_699_920_000_000;
    const HOUR: i64 = 3_600_000;
    let dir = tempfile::tempdir().expect("temporary directory");
    let engine = Arc::new(Engine::open(dir.path(), rollup_options()).expect("open engine"));
    let tags = [("site", "plant-a"), ("device", "gas-01")];
    let mut points = Vec::new();
    for i in 0..(6 * HOUR / 30_000) {
        // Multiples of 0.25, so sums are exact in any order.
        let value = Value::Number((i % 17) as f64 * 0.25);
        points.push(point(
            "gas-detector",
            &tags,
            "gas_lel",
            DAY_T0 + i * 30_000,
            value,
        ));
    }
    engine.write(points).expect("write points");
    let (store, base) = serve_engine(engine.clone()).await;

    let range = format!("time >= {DAY_T0}ms AND time < {}ms", DAY_T0 + 2 * HOUR);
    let pushed = format!(
        "SELECT mean(gas_lel), min(gas_lel), max(gas_lel), first(gas_lel), last(gas_lel), \
         sum(gas_lel), count(gas_lel) FROM \"gas-detector\" WHERE {range} \
         GROUP BY time(10m), device fill(none)"
    );
    let evaluated = format!("{pushed} tz('UTC')");
    let before_retention = series_of(&run(&base, &pushed).await, &pushed);
    assert_eq!(
        before_retention[0]["values"].as_array().map(Vec::len),
        Some(12),
        "{before_retention}"
    );
    assert_eq!(
        series_of(&run(&base, &evaluated).await, &evaluated),
        before_retention,
        "both paths agree on raw data"
    );

    // Deletes the raw partitions of the first four hours after rolling them up.
    engine
        .enforce_retention(Timestamp(DAY_T0 + 4 * HOUR))
        .expect("enforce retention");
    let raw = format!("SELECT gas_lel FROM \"gas-detector\" WHERE {range}");
    assert_eq!(
        series_of(&run(&base, &raw).await, &raw),
        Json::Null,
        "raw points of the range are deleted"
    );
    assert_eq!(
        series_of(&run(&base, &evaluated).await, &evaluated),
        Json::Null,
        "the evaluator path has no raw points left"
    );
    let before = store.aggregated.load(Ordering::SeqCst);
    let from_rollups = series_of(&run(&base, &pushed).await, &pushed);
    assert_eq!(store.aggregated.load(Ordering::SeqCst), before + 7);
    assert_eq!(
        from_rollups, before_retention,
        "rollups equal the raw aggregates"
    );
}
