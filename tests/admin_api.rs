//! Admin endpoints over real HTTP against a server started from a config file: config
//! reload, device management with `devices.toml`, the manual alarm reset, and CORS.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use stonelion::clock::SystemClock;
use stonelion::config::Overrides;
use stonelion::config::managed::ConfigFile;
use stonelion::server::Server;
use support::{Publisher, Receiver, start_server, wait_for};

const WAIT: Duration = Duration::from_secs(15);
const VIEWER: &str = "viewer-token-0123456789abcdef0123456789abcdef";
const OPERATOR: &str = "operator-token-0123456789abcdef0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789abcdef0123456789abcdef";

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Returns the shared test config with viewer, operator and admin tokens and fast commits.
fn config_text() -> String {
    format!(
        r#"{}
[storage]
commit_interval = "50ms"

[[api_tokens]]
name = "wall-display"
role = "viewer"
token_sha256 = "{}"

[[api_tokens]]
name = "duty-officer-li"
role = "operator"
token_sha256 = "{}"

[[api_tokens]]
name = "ops-admin"
role = "admin"
token_sha256 = "{}"
"#,
        support::CONFIG,
        digest(VIEWER),
        digest(OPERATOR),
        digest(ADMIN)
    )
}

struct Files {
    config: PathBuf,
    data: PathBuf,
}

/// Writes `text` as the config file in `dir`, replacing `WEBHOOK_URL`.
fn write_config(dir: &Path, text: &str, webhook_url: &str) -> Files {
    let files = Files {
        config: dir.join("stonelion.toml"),
        data: dir.join("data"),
    };
    std::fs::write(&files.config, text.replace("WEBHOOK_URL", webhook_url)).unwrap();
    files
}

async fn start_from_file(files: &Files) -> Server {
    let overrides = Overrides {
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        mqtt_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(files.data.clone()),
    };
    let file = ConfigFile {
        path: files.config.clone(),
        overrides,
    };
    Server::start_with_file(file, Arc::new(SystemClock))
        .await
        .unwrap()
}

async fn request(
    http: SocketAddr,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, format!("http://{http}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn get(http: SocketAddr, path: &str) -> (u16, Value) {
    request(http, reqwest::Method::GET, path, Some(VIEWER), None).await
}

async fn reload(http: SocketAddr, token: &str) -> (u16, Value) {
    request(
        http,
        reqwest::Method::POST,
        "/api/v1/admin/reload",
        Some(token),
        None,
    )
    .await
}

async fn device_ids(http: SocketAddr) -> Vec<String> {
    let (status, body) = get(http, "/api/v1/devices").await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<String> = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

async fn alarms_of(http: SocketAddr, device: &str) -> Vec<Value> {
    let (status, body) = get(http, &format!("/api/v1/alarms?device={device}")).await;
    assert_eq!(status, 200, "{body}");
    body["alarms"].as_array().unwrap().clone()
}

/// Waits for the alarm of `rule` on `device` to be in `state`, and returns it.
async fn wait_for_alarm(http: SocketAddr, device: &str, rule: &str, state: &str) -> Value {
    wait_for(
        &format!("{rule} alarm of {device} {state}"),
        WAIT,
        || async {
            alarms_of(http, device)
                .await
                .into_iter()
                .find(|a| a["rule"] == rule && a["state"] == state)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_devices_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let files = write_config(dir.path(), &config_text(), &receiver.url());
    let server = start_from_file(&files).await;
    let http = server.http_addr;

    let (status, body) = reload(http, OPERATOR).await;
    assert_eq!(status, 403, "an operator may not reload: {body}");
    let (status, body) = reload(http, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["restart_required"],
        json!([]),
        "an unchanged file needs no restart"
    );
    assert_eq!(body["devices_added"], json!([]));

    // gas-02 has an active alarm when it is removed from the file.
    let gas02 = Publisher::connect(server.mqtt_addr, "gas-02").await;
    gas02.reading("plant-a", "gas-02", "gas_lel", 60.0).await;
    let before = wait_for_alarm(http, "gas-02", "gas-lel", "active").await;

    // The new file drops gas-02, adds gas-03 with its own rule, and changes a setting that
    // needs a restart.
    let text = config_text()
        .replace(
            "[[devices]]\nid = \"gas-02\"\nsite = \"plant-a\"\nprofile = \"gas-detector\"\n",
            "",
        )
        .replace(
            "commit_interval = \"50ms\"",
            "commit_interval = \"50ms\"\nretention = \"30d\"",
        )
        + r#"
[[devices]]
id = "gas-03"
site = "plant-a"
profile = "gas-detector"

[[devices.rules]]
id = "gas-lel"
metric = "gas_lel"
kind = "above"
level1 = 10
deadband = 1
"#;
    assert!(!text.contains("gas-02"));
    write_config(dir.path(), &text, &receiver.url());
    let (status, body) = reload(http, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["devices_added"], json!(["gas-03"]));
    assert_eq!(body["devices_removed"], json!(["gas-02"]));
    assert_eq!(body["restart_required"], json!(["storage.retention"]));
    assert_eq!(
        device_ids(http).await,
        ["gas-01", "gas-03", "smoke-01", "temp-01"]
    );
    // The retention still runs with its start value, so a second reload lists it again.
    let (status, body) = reload(http, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart_required"], json!(["storage.retention"]));
    assert_eq!(body["start_problems"], json!([]));

    // The test's flags set the listen addresses, so changing them in the file needs no
    // restart.
    assert!(text.contains("[storage]"));
    assert!(!text.contains("[server]"));
    write_config(
        dir.path(),
        &text.replace(
            "[storage]",
            "[server]\nmqtt_listen = \"127.0.0.1:1884\"\n\n[storage]",
        ),
        &receiver.url(),
    );
    let (status, body) = reload(http, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart_required"], json!(["storage.retention"]));

    // The removed device's alarm stays in the list, unchanged.
    let after = alarms_of(http, "gas-02").await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["id"], before["id"]);
    assert_eq!(after[0]["state"], "active");

    // The new device is accepted and its own rule applies: 12 %LEL is above its level 1.
    let gas03 = Publisher::connect(server.mqtt_addr, "gas-03").await;
    gas03.reading("plant-a", "gas-03", "gas_lel", 12.0).await;
    let raised = wait_for_alarm(http, "gas-03", "gas-lel", "active").await;
    assert_eq!(raised["threshold"], 10.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_webhook_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let first = Receiver::start().await;
    let second = Receiver::start().await;
    let files = write_config(dir.path(), &config_text(), &first.url());
    let server = start_from_file(&files).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    device.reading("plant-a", "gas-01", "gas_lel", 60.0).await;
    wait_for("alarm.raised at the first receiver", WAIT, || async {
        first.events("alarm.raised").pop()
    })
    .await;

    write_config(dir.path(), &config_text(), &second.url());
    let (status, body) = reload(http, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["webhooks_changed"], true);

    let gas02 = Publisher::connect(server.mqtt_addr, "gas-02").await;
    gas02.reading("plant-a", "gas-02", "gas_lel", 60.0).await;
    let raised = wait_for("alarm.raised at the second receiver", WAIT, || async {
        second.events("alarm.raised").pop()
    })
    .await;
    assert_eq!(raised.body["alarm"]["device"], "gas-02");
    assert!(raised.signature_valid);
    let at_first: Vec<Value> = first
        .events("alarm.raised")
        .iter()
        .map(|d| d.body["alarm"]["device"].clone())
        .collect();
    assert_eq!(
        at_first,
        [json!("gas-01")],
        "the old URL gets nothing after the reload"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reports_start_problems() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let files = write_config(dir.path(), &config_text(), &receiver.url());
    let server = start_from_file(&files).await;
    let http = server.http_addr;

    // A certificate file that is not PEM, which `run` rejects at start.
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, "not a certificate\n").unwrap();
    std::fs::write(&key, "not a key\n").unwrap();
    let text = format!(
        "{}\n[api]\ntls_cert = {:?}\ntls_key = {:?}\n",
        config_text(),
        cert.display().to_string(),
        key.display().to_string()
    );
    write_config(dir.path(), &text, &receiver.url());
    let (status, body) = reload(http, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["restart_required"],
        json!(["api.tls_cert", "api.tls_key"])
    );
    let problems = body["start_problems"].as_array().unwrap();
    let keys: Vec<&str> = problems
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["api.tls_cert", "api.tls_key"], "{body}");
    let message = problems[0]["message"].as_str().unwrap();
    assert!(message.contains("contains no certificate"), "{message}");
    assert!(problems[0]["line"].as_u64().unwrap() > 0, "{body}");

    // A missing file stops the next start too.
    std::fs::remove_file(&key).unwrap();
    let (status, body) = reload(http, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    let problems = body["start_problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p["key"] == "api.tls_key"
            && p["message"]
                .as_str()
                .unwrap()
                .contains("`run` fails to start unless the file exists then")),
        "{body}"
    );

    // The server keeps serving plain HTTP with the running settings.
    assert_eq!(
        device_ids(http).await,
        ["gas-01", "gas-02", "smoke-01", "temp-01"]
    );
    server.shutdown().await;
}

/// Writes a self-signed certificate for 127.0.0.1 and its key.
fn write_certificate(cert: &Path, key: &Path) {
    let pair = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    std::fs::write(cert, params.self_signed(&pair).unwrap().pem()).unwrap();
    std::fs::write(key, pair.serialize_pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_lists_a_replaced_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let (cert, key) = (dir.path().join("mqtt.pem"), dir.path().join("mqtt.key"));
    write_certificate(&cert, &key);
    let text = format!(
        "{}\n[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n",
        config_text(),
        cert.display().to_string(),
        key.display().to_string()
    );
    let files = write_config(dir.path(), &text, &receiver.url());
    let server = start_from_file(&files).await;
    let http = server.http_addr;
    let (status, body) = reload(http, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart_required"], json!([]), "{body}");

    // The listener keeps the certificate it read at start, so the new one needs a restart.
    write_certificate(&cert, &key);
    let (status, body) = reload(http, ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["restart_required"],
        json!(["mqtt.tls_cert", "mqtt.tls_key"]),
        "{body}"
    );
    assert_eq!(body["start_problems"], json!([]), "{body}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_keeps_running_config() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let files = write_config(dir.path(), &config_text(), &receiver.url());
    let server = start_from_file(&files).await;
    let http = server.http_addr;
    let running = device_ids(http).await;

    let broken = config_text()
        .replace(
            "profile = \"smoke-detector\"",
            "profile = \"smoke-detectr\"",
        )
        .replace(
            "id = \"temp-01\"\nsite = \"park-b3\"",
            "id = \"temp-01\"\nsite = \"park-b9\"",
        );
    write_config(dir.path(), &broken, &receiver.url());
    let (status, body) = reload(http, ADMIN).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config");
    let problems = body["error"]["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{problems:?}");
    let keys: Vec<&str> = problems
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["devices[2].profile", "devices[3].site"]);
    for problem in problems {
        assert!(problem["line"].as_u64().unwrap() > 0, "{problem}");
        assert!(
            problem["file"]
                .as_str()
                .unwrap()
                .ends_with("stonelion.toml"),
            "{problem}"
        );
    }
    assert!(
        problems[0]["message"]
            .as_str()
            .unwrap()
            .contains("use one of"),
        "{}",
        problems[0]
    );
    assert_eq!(device_ids(http).await, running, "the running config stays");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_api_creates_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let files = write_config(dir.path(), &config_text(), &receiver.url());
    let server = start_from_file(&files).await;
    let http = server.http_addr;
    let put = reqwest::Method::PUT;
    let delete = reqwest::Method::DELETE;
    let gas09 = json!({
        "site": "plant-a",
        "profile": "gas-detector",
        "name": "Tank farm gas detector",
        "rules": [{ "id": "gas-lel", "metric": "gas_lel", "kind": "above", "level1": 15, "deadband": 1 }],
    });

    let (status, _) = request(
        http,
        put.clone(),
        "/api/v1/devices/gas-09",
        Some(OPERATOR),
        Some(gas09.clone()),
    )
    .await;
    assert_eq!(status, 403, "an operator may not change devices");
    let duplicate = reqwest::Client::new()
        .put(format!("http://{http}/api/v1/devices/gas-09"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(r#"{"site": "nowhere", "site": "plant-a", "profile": "gas-detector"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), 400, "a repeated key is ambiguous");
    let body: Value = duplicate.json().await.unwrap();
    assert!(body.to_string().contains("duplicate key `site`"), "{body}");
    let (status, body) = request(
        http,
        put.clone(),
        "/api/v1/devices/gas-09",
        Some(ADMIN),
        Some(gas09.clone()),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = get(http, "/api/v1/devices/gas-09").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "Tank farm gas detector");

    // Its readings are accepted and its own rule applies.
    let device = Publisher::connect(server.mqtt_addr, "gas-09").await;
    device.reading("plant-a", "gas-09", "gas_lel", 20.0).await;
    let raised = wait_for_alarm(http, "gas-09", "gas-lel", "active").await;
    assert_eq!(raised["threshold"], 15.0);

    // Devices of the config file cannot be changed or deleted through the API.
    let (status, body) = request(
        http,
        put.clone(),
        "/api/v1/devices/gas-01",
        Some(ADMIN),
        Some(gas09.clone()),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stonelion.toml"),
        "{body}"
    );
    let (status, body) = request(
        http,
        delete.clone(),
        "/api/v1/devices/gas-01",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 409, "{body}");

    // An invalid device is rejected with the problem, and nothing is stored.
    let bad = json!({ "site": "plant-a", "profile": "no-such-profile" });
    let (status, body) = request(
        http,
        put.clone(),
        "/api/v1/devices/gas-10",
        Some(ADMIN),
        Some(bad),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let problem = &body["error"]["problems"][0];
    assert!(
        problem["file"].as_str().unwrap().ends_with("devices.toml"),
        "{problem}"
    );
    assert!(
        problem["message"]
            .as_str()
            .unwrap()
            .contains("no-such-profile"),
        "{problem}"
    );
    assert_eq!(get(http, "/api/v1/devices/gas-10").await.0, 404);

    // Replacing keeps the id and changes the fields.
    let renamed = json!({ "site": "plant-a", "profile": "gas-detector", "name": "Renamed" });
    let (status, body) = request(
        http,
        put.clone(),
        "/api/v1/devices/gas-09",
        Some(ADMIN),
        Some(renamed),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let stored = std::fs::read_to_string(files.data.join("devices.toml")).unwrap();
    assert!(stored.contains("Renamed"), "{stored}");
    server.shutdown().await;

    // The managed device is still there after a restart.
    let server = start_from_file(&files).await;
    let http = server.http_addr;
    let (status, body) = get(http, "/api/v1/devices/gas-09").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "Renamed");

    let (status, body) = request(
        http,
        delete.clone(),
        "/api/v1/devices/gas-09",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(get(http, "/api/v1/devices/gas-09").await.0, 404);
    let alarms = alarms_of(http, "gas-09").await;
    assert_eq!(
        alarms.len(),
        1,
        "the deleted device's alarm stays: {alarms:?}"
    );
    let (status, _) = request(http, delete, "/api/v1/devices/gas-09", Some(ADMIN), None).await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_device_put_starts_polling() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let files = write_config(dir.path(), &config_text(), &receiver.url());
    let server = start_from_file(&files).await;
    let http = server.http_addr;

    let units = BTreeMap::from([(1u8, stonelion::modbus::RegisterBank::default())]);
    let (address, simulator) =
        stonelion::modbus::spawn_simulator("127.0.0.1:0".parse().unwrap(), units)
            .await
            .unwrap();
    // 21.5 °C and 40.0 %RH in tenths.
    simulator.set_words(
        1,
        stonelion::profile::register::Function::InputRegister,
        1,
        &[215, 400],
    );
    let device = json!({
        "site": "park-b3",
        "profile": "xy-md02",
        "modbus": { "transport": "tcp", "address": address.to_string(), "unit_id": 1,
                    "poll_interval": "100ms", "timeout": "500ms" },
    });
    let (status, body) = request(
        http,
        reqwest::Method::PUT,
        "/api/v1/devices/md02-01",
        Some(ADMIN),
        Some(device),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let latest = wait_for("a polled reading of md02-01", WAIT, || async {
        let (_, body) = get(http, "/api/v1/devices/md02-01").await;
        body["latest"]["temperature_c"]["value"].as_f64()
    })
    .await;
    assert!((latest - 21.5).abs() < 1e-9, "temperature {latest}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_needs_condition_gone() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let files = write_config(dir.path(), &config_text(), &receiver.url());
    let server = start_from_file(&files).await;
    let http = server.http_addr;
    let device = Publisher::connect(server.mqtt_addr, "gas-01").await;
    device.reading("plant-a", "gas-01", "gas_lel", 60.0).await;
    let alarm = wait_for_alarm(http, "gas-01", "gas-lel", "active").await;
    let reset_path = format!("/api/v1/alarms/{}/reset", alarm["id"]);
    let note = json!({ "note": "sensor replaced" });

    let (status, _) = request(
        http,
        reqwest::Method::POST,
        &reset_path,
        Some(VIEWER),
        Some(note.clone()),
    )
    .await;
    assert_eq!(status, 403, "a viewer may not reset");
    let (status, body) = request(
        http,
        reqwest::Method::POST,
        &reset_path,
        Some(OPERATOR),
        Some(note.clone()),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("is 60"), "names the value: {message}");
    assert!(
        message.contains("threshold 50"),
        "names the threshold: {message}"
    );

    // Once the device is offline its readings no longer show the condition.
    device.publish("status/plant-a/gas-01", "offline").await;
    wait_for_alarm(http, "gas-01", "device-offline", "active").await;
    let (status, body) = request(
        http,
        reqwest::Method::POST,
        &reset_path,
        Some(OPERATOR),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 400, "a reset needs a note: {body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("note"),
        "{body}"
    );
    let (status, body) = request(
        http,
        reqwest::Method::POST,
        &reset_path,
        Some(OPERATOR),
        Some(note.clone()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "cleared");
    let last = body["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["event"], "alarm.reset");
    assert_eq!(last["actor"], "duty-officer-li");
    assert_eq!(last["note"], "sensor replaced");
    assert!(last["at"].as_str().is_some(), "{last}");
    wait_for("alarm.reset delivery", WAIT, || async {
        receiver.events("alarm.reset").pop()
    })
    .await;

    let (status, body) = request(
        http,
        reqwest::Method::POST,
        &reset_path,
        Some(OPERATOR),
        Some(note),
    )
    .await;
    assert_eq!(status, 409, "a cleared alarm cannot be reset: {body}");

    // The rule starts from normal again, so the next high reading raises the alarm again.
    device.reading("plant-a", "gas-01", "gas_lel", 60.0).await;
    let again = wait_for_alarm(http, "gas-01", "gas-lel", "active").await;
    assert_eq!(again["id"], alarm["id"]);
    server.shutdown().await;
}

/// Sends a CORS preflight for `GET /api/v1/alarms` from `origin`.
async fn preflight(http: SocketAddr, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            format!("http://{http}/api/v1/alarms"),
        )
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_configured_origin_only() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let text = format!(
        "[server]\ncors_allowed_origins = [\"https://grafana.example\"]\n{}",
        config_text()
    );
    let server = start_server(&text, &receiver.url(), data.path()).await;
    let http = server.http_addr;

    let allowed = preflight(http, "https://grafana.example").await;
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://grafana.example"
    );
    let headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("authorization"), "{headers}");

    let other = preflight(http, "https://evil.example").await;
    assert!(
        other.headers().get("access-control-allow-origin").is_none(),
        "{:?}",
        other.headers()
    );

    let response = reqwest::Client::new()
        .get(format!("http://{http}/api/v1/alarms"))
        .header("origin", "https://grafana.example")
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://grafana.example"
    );
    server.shutdown().await;

    // Off by default.
    let data = tempfile::tempdir().unwrap();
    let server = start_server(&config_text(), &receiver.url(), data.path()).await;
    let response = preflight(server.http_addr, "https://grafana.example").await;
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "{:?}",
        response.headers()
    );
    server.shutdown().await;
}

#[test]
fn cors_origin_must_be_origin() {
    let text = "[server]\ncors_allowed_origins = [\"https://grafana.example/\", \"*\"]\n";
    let problems =
        stonelion::config::parse(text, stonelion::config::builtin::builtin_profiles()).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "server.cors_allowed_origins[0]",
            "server.cors_allowed_origins[1]"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_file_conflicts() {
    let data = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = start_server(&config_text(), &receiver.url(), data.path()).await;
    let (status, body) = reload(server.http_addr, ADMIN).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--config"),
        "{body}"
    );
    let device = json!({ "site": "plant-a", "profile": "gas-detector" });
    let (status, body) = request(
        server.http_addr,
        reqwest::Method::PUT,
        "/api/v1/devices/gas-09",
        Some(ADMIN),
        Some(device),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    server.shutdown().await;
}
