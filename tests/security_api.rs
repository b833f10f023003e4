//! HTTP API bearer tokens: 401 and 403 with the API's JSON errors, roles per route, the
//! token's name as the actor of alarm actions, and InfluxDB-style credentials.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::{Publisher, Receiver, start_server, wait_for};

const VIEWER: &str = "viewer-token-0123456789abcdef0123456789abcdef";
const OPERATOR: &str = "operator-token-0123456789abcdef0123456789abcdef";
const WRITER: &str = "writer-token-0123456789abcdef0123456789abcdef";

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn config() -> String {
    let tokens = format!(
        r#"
[[api_tokens]]
name = "wall-display"
role = "viewer"
token_sha256 = "{}"

[[api_tokens]]
name = "duty-officer-li"
role = "operator"
token_sha256 = "{}"

[[api_tokens]]
name = "telegraf"
role = "writer"
token_sha256 = "{}"
"#,
        digest(VIEWER),
        digest(OPERATOR),
        digest(WRITER)
    );
    format!("{}\n{tokens}", support::CONFIG)
}

async fn get(http: SocketAddr, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new().get(format!("http://{http}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn post(
    http: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new()
        .post(format!("http://{http}{path}"))
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_need_token_and_role() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(), &receiver.url(), data.path()).await;
    let http = server.http_addr;

    let (status, _) = get(http, "/healthz", None).await;
    assert_eq!(status, 200, "/healthz stays open");

    let response = reqwest::get(format!("http://{http}/api/v1/devices"))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");

    let (status, body) = get(http, "/api/v1/devices", Some("not-a-token")).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["message"], "invalid API token");

    let (status, body) = get(http, "/api/v1/devices", Some(VIEWER)).await;
    assert_eq!(status, 200);
    assert_eq!(body["devices"].as_array().unwrap().len(), 4);

    let (status, _) = get(http, "/metrics", None).await;
    assert_eq!(status, 401, "/metrics needs a token");
    let metrics = reqwest::Client::new()
        .get(format!("http://{http}/metrics"))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status().as_u16(), 200);

    let (status, body) = post(
        http,
        "/api/v1/alarms/1/ack",
        Some(VIEWER),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "forbidden");

    let (status, _) = get(http, "/api/v1/devices", Some(WRITER)).await;
    assert_eq!(status, 403, "a writer token may not read");

    let (status, _) = get(http, "/no/such/route", None).await;
    assert_eq!(
        status, 401,
        "unknown routes do not reveal themselves without a token"
    );

    // A valid token followed by an invalid one: neither header may be picked silently.
    let response = reqwest::Client::new()
        .get(format!("http://{http}/api/v1/devices"))
        .header("authorization", format!("Bearer {VIEWER}"))
        .header("authorization", "Bearer not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("more than one `Authorization` header"),
        "{message}"
    );

    // The same for two `p` parameters, and for a header together with `p`.
    let response = reqwest::Client::new()
        .post(format!("http://{http}/write?db=x&p={WRITER}&p={VIEWER}"))
        .body("m v=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400, "two `p` parameters");
    let response = reqwest::Client::new()
        .post(format!("http://{http}/write?db=x&p={WRITER}"))
        .bearer_auth(VIEWER)
        .body("m v=1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        400,
        "a header and a `p` parameter"
    );

    let metrics = reqwest::Client::new()
        .get(format!("http://{http}/metrics"))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    let metrics = metrics.text().await.unwrap();
    let count = |reason: &str| {
        let sample = format!("stonelion_api_denied_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&sample))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(count("missing_token"), 3.0);
    assert_eq!(count("invalid_token"), 1.0);
    assert_eq!(count("role_not_allowed"), 2.0);
    assert_eq!(count("multiple_credentials"), 3.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_is_token_name() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(), &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    device.reading("plant-a", "gas-01", "gas_lel", 30.0).await;

    let list = |token| async move {
        let (_, body) = get(http, "/api/v1/alarms?device=gas-01", Some(token)).await;
        body["alarms"].as_array().cloned().unwrap_or_default()
    };
    let alarm = wait_for("the gas alarm", Duration::from_secs(15), || async {
        list(VIEWER).await.first().cloned()
    })
    .await;
    let id = alarm["id"].as_i64().unwrap();

    let (status, body) = post(
        http,
        &format!("/api/v1/alarms/{id}/ack"),
        None,
        serde_json::json!({"by": "anyone"}),
    )
    .await;
    assert_eq!(status, 401, "{body}");

    let ack = serde_json::json!({"by": "the chief engineer", "note": "on my way"});
    let (status, body) = post(
        http,
        &format!("/api/v1/alarms/{id}/ack"),
        Some(OPERATOR),
        ack,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["acknowledged"]["by"], "duty-officer-li");
    assert_eq!(
        body["acknowledged"]["note"],
        "by the chief engineer: on my way"
    );
    let history = body["history"].as_array().unwrap();
    let last = history.last().unwrap();
    assert_eq!(last["event"], "alarm.acknowledged");
    assert_eq!(last["actor"], "duty-officer-li");

    device.reading("plant-a", "gas-01", "gas_lel", 1.0).await;
    wait_for("the alarm to clear", Duration::from_secs(15), || async {
        (list(VIEWER).await.first()?["state"] == "cleared").then_some(())
    })
    .await;
    let (status, body) = post(
        http,
        &format!("/api/v1/alarms/{id}/close"),
        Some(OPERATOR),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 400, "a close needs a note: {body}");
    let close = serde_json::json!({"note": "detector recalibrated"});
    let (status, body) = post(
        http,
        &format!("/api/v1/alarms/{id}/close"),
        Some(OPERATOR),
        close,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["closed"]["by"], "duty-officer-li");
    assert_eq!(body["closed"]["note"], "detector recalibrated");
    assert_eq!(alarms_of_with(http, "gas-01").await, 1);
    server.shutdown().await;
}

async fn alarms_of_with(http: SocketAddr, device: &str) -> usize {
    let (_, body) = get(
        http,
        &format!("/api/v1/alarms?device={device}"),
        Some(OPERATOR),
    )
    .await;
    body["alarms"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influxdb_routes_take_token() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config(), &receiver.url(), data.path()).await;
    let http = server.http_addr;
    let client = reqwest::Client::new();
    let line = "gas-detector,site=plant-a,device=gas-01 gas_lel=3.5";

    let write = |auth: Option<String>| {
        let mut request = client
            .post(format!(
                "http://{http}/api/v2/write?bucket=b&org=o&precision=s"
            ))
            .body(line);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(write(None).await, 401);
    assert_eq!(write(Some(format!("Token {VIEWER}"))).await, 403);
    assert_eq!(write(Some(format!("Token {WRITER}"))).await, 204);

    let v1 = client
        .post(format!("http://{http}/write?db=x&u=telegraf&p={WRITER}"))
        .body(line)
        .send()
        .await
        .unwrap();
    assert_eq!(v1.status().as_u16(), 204, "InfluxDB 1 u/p query parameters");

    let query = |request: reqwest::RequestBuilder| async move {
        request.send().await.unwrap().status().as_u16()
    };
    let q = "q=SHOW%20MEASUREMENTS";
    assert_eq!(
        query(client.get(format!("http://{http}/query?{q}"))).await,
        401
    );
    assert_eq!(
        query(client.get(format!("http://{http}/query?{q}&u=grafana&p={VIEWER}"))).await,
        200
    );
    assert_eq!(
        query(
            client
                .get(format!("http://{http}/query?{q}"))
                .basic_auth("grafana", Some(VIEWER))
        )
        .await,
        200
    );
    assert_eq!(
        query(
            client
                .get(format!("http://{http}/query?{q}"))
                .header("authorization", format!("Token {VIEWER}"))
        )
        .await,
        200
    );
    assert_eq!(
        query(client.get(format!("http://{http}/ping"))).await,
        204,
        "/ping stays open"
    );
    // A token in the URL ends up in logs, so the other routes take the header only.
    assert_eq!(
        query(client.get(format!("http://{http}/metrics?p={VIEWER}"))).await,
        401,
        "no query-string token on /metrics"
    );
    assert_eq!(
        query(client.post(format!("http://{http}/api/v1/alarms/1/close?p={OPERATOR}"))).await,
        401,
        "no query-string token on the alarm routes"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_api_beyond_loopback_rejected() {
    let data = tempfile::tempdir().unwrap();
    let text = "[server]\nhttp_listen = \"0.0.0.0:0\"\nmqtt_listen = \"127.0.0.1:0\"\n";
    let mut open =
        stonelion::config::parse(text, stonelion::config::builtin::builtin_profiles()).unwrap();
    open.server.data_dir = data.path().to_owned();
    let error =
        stonelion::server::Server::start(open, std::sync::Arc::new(stonelion::clock::SystemClock))
            .await
            .err()
            .expect("Server::start must reject an open API on 0.0.0.0");
    assert!(
        error
            .to_string()
            .contains("HTTP API would accept anyone on 0.0.0.0:0"),
        "{error}"
    );
}
