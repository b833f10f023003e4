//! Runs every query of every dashboard under `dashboards/` against `/query` of the running
//! demo (`stonelion demo`: its real config, profiles, MQTT devices and Modbus gateway),
//! after the substitutions Grafana's InfluxDB data source makes in InfluxQL mode:
//! `$timeFilter`, `$__interval`, `$interval` and template variables, regex-escaped for
//! multi-value variables.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use stonelion::clock::SystemClock;
use stonelion::config::Config;
use stonelion::config::builtin::builtin_profiles;
use stonelion::model::ValueKind;

const BIN: &str = env!("CARGO_BIN_EXE_stonelion");

/// Device of the demo whose gas readings come from the simulated Modbus gateway.
const MODBUS_GAS_DEVICE: &str = "gasctl-b3-01";

/// How long the demo may take until every panel has data.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

const INTERVAL: &str = "20s";

fn dashboard_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dashboards folder exists")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
}

fn load(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).expect("dashboard file is readable");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// One template variable: its name, whether Grafana formats it as a regex alternation,
/// and its query.
struct Variable {
    name: String,
    multi: bool,
    query: String,
}

fn query_variables(dashboard: &Json) -> Vec<Variable> {
    let list = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.iter()
        .filter(|v| v["type"] == "query")
        .map(|v| Variable {
            name: v["name"].as_str().expect("variable name").to_owned(),
            multi: v["multi"].as_bool().unwrap_or(false)
                || v["includeAll"].as_bool().unwrap_or(false),
            query: v["query"].as_str().expect("variable query").to_owned(),
        })
        .collect()
}

/// Escapes a value as Grafana does for regex use in InfluxQL queries.
fn escape_regex(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        if "\\^$*+?.()|[]{}/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Formats a selection the way Grafana interpolates a variable into InfluxQL: several
/// values become `(a|b)`, a multi-value variable's single value is regex-escaped, and a
/// single-value variable is inserted as it is.
fn format_selection(variable: &Variable, values: &[String]) -> String {
    if !variable.multi {
        return values[0].clone();
    }
    if values.len() == 1 {
        return escape_regex(&values[0]);
    }
    let escaped: Vec<String> = values.iter().map(|v| escape_regex(v)).collect();
    format!("({})", escaped.join("|"))
}

fn substitute(
    query: &str,
    selection: &BTreeMap<String, String>,
    from_ms: i64,
    to_ms: i64,
) -> String {
    let mut out = query
        .replace(
            "$timeFilter",
            &format!("time >= {from_ms}ms and time <= {to_ms}ms"),
        )
        .replace("$__interval_ms", "20000")
        .replace("$__interval", INTERVAL)
        .replace("$interval", INTERVAL);
    // Longer names first, so `$site` does not replace the start of `$site_kind`.
    let mut names: Vec<&String> = selection.keys().collect();
    names.sort_by_key(|name| std::cmp::Reverse(name.len()));
    for name in names {
        let value = &selection[name];
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("[[{name}]]"), value);
        out = out.replace(&format!("${name}"), value);
    }
    let leftover = out.match_indices('$').any(|(i, _)| {
        out[i + 1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '{')
    });
    assert!(!leftover, "unsubstituted macro left in {out}");
    out
}

/// Posts a query as Grafana does and returns the `results` array.
async fn post_query(base: &str, query: &str) -> Vec<Json> {
    let form = [("q", query), ("db", "stonelion"), ("epoch", "ms")];
    let response = reqwest::Client::new()
        .post(format!("{base}/query"))
        .form(&form)
        .send()
        .await
        .expect("query request");
    let status = response.status();
    let body: Json = response.json().await.expect("JSON body");
    assert_eq!(status, 200, "query failed: {query}\n{body}");
    body["results"].as_array().cloned().expect("results array")
}

fn assert_no_errors(results: &[Json], query: &str) {
    for result in results {
        assert!(
            result.get("error").is_none(),
            "statement failed: {query}\n{result}"
        );
    }
}

fn has_series(result: &Json) -> bool {
    result["series"].as_array().is_some_and(|s| {
        s.iter()
            .any(|s| !s["values"].as_array().is_none_or(Vec::is_empty))
    })
}

/// Resolves the variables in order, as Grafana does, and returns every selection to try:
/// each single value of single-value variables, and "All" for multi-value ones. Fails when
/// a variable has no values yet.
async fn selections(
    base: &str,
    variables: &[Variable],
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<BTreeMap<String, String>>, String> {
    let mut selections = vec![BTreeMap::new()];
    for variable in variables {
        let mut next = Vec::new();
        for selection in &selections {
            let query = substitute(&variable.query, selection, from_ms, to_ms);
            let results = post_query(base, &query).await;
            assert_no_errors(&results, &query);
            let values = tag_values(&results[0]);
            if values.is_empty() {
                return Err(format!("variable {} has no values: {query}", variable.name));
            }
            let choices: Vec<Vec<String>> = if variable.multi {
                vec![values]
            } else {
                values.into_iter().map(|v| vec![v]).collect()
            };
            for choice in choices {
                let mut extended = selection.clone();
                extended.insert(variable.name.clone(), format_selection(variable, &choice));
                next.push(extended);
            }
        }
        selections = next;
    }
    Ok(selections)
}

/// Parses the demo's config as the demo binary does, with placeholder addresses.
fn demo_config() -> Config {
    let text = stonelion::demo::DEMO_CONFIG
        .replace("WEBHOOK_URL", "http://127.0.0.1:9/stonelion")
        .replace("MODBUS_ADDR", "127.0.0.1:502");
    stonelion::config::parse(&text, builtin_profiles()).unwrap()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A running `stonelion demo` on free loopback ports; dropping it kills the process.
struct Demo {
    child: Child,
    base: String,
    _data: tempfile::TempDir,
}

impl Demo {
    fn start() -> Demo {
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(BIN)
            .env_remove("STONELION_HTTP_LISTEN")
            .env_remove("STONELION_MQTT_LISTEN")
            .env_remove("STONELION_DATA_DIR")
            .args([
                "demo",
                "--http-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data.path().join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The demo prints every webhook delivery, so its output is read to the end.
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut demo = Demo {
            child,
            base: String::new(),
            _data: data,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while demo.base.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .expect("the demo prints its listening line within 30 s");
            if let Some(http) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("http="))
            {
                demo.base = format!("http://{http}");
            }
        }
        demo
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until every configured device is online in `/api/v1/devices`.
async fn wait_all_online(base: &str, deadline: Instant) {
    loop {
        let body: Json = reqwest::get(format!("{base}/api/v1/devices"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let offline: Vec<String> = body["devices"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["online"] != true)
            .map(|d| d["id"].to_string())
            .collect();
        if offline.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "devices not online within {READY_TIMEOUT:?}: {offline:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Returns the value of a field that dashboards read, `minute` minutes into the history,
/// or `None` for the other fields. Values stay below every rule's threshold, and
/// the energy counters stay below the demo's own start values, so they only rise.
fn history_value(field: &str, minute: i64) -> Option<String> {
    let minute_f = minute as f64;
    let value = match field {
        "gas_lel" => format!("{}", 3.0 + (minute % 10) as f64 * 0.5),
        "smoke" => "false".to_owned(),
        "power_kw" => format!("{}", 8.0 + (minute % 5) as f64),
        "temperature_c" => format!("{}", 22.0 + (minute % 3) as f64 * 0.5),
        "energy_kwh" => format!("{}", 18_000.0 + minute_f * 2.0),
        "energy_import_kwh" => format!("{}", 52_000.0 + minute_f * 2.0),
        _ => return None,
    };
    Some(value)
}

/// Line protocol with two hours of one-minute history, ending ten minutes ago, of every
/// field that dashboards read, for every device of the demo, as its profile names them.
fn history_lines(config: &Config) -> String {
    let end = now_ms() - 10 * 60_000;
    let mut lines = String::new();
    for device in &config.devices {
        let site = config.sites.iter().find(|s| s.id == device.site).unwrap();
        let profile = config.profiles.get(&device.profile).unwrap();
        for minute in 0..120_i64 {
            let fields: Vec<String> = profile
                .metrics
                .iter()
                .filter_map(|m| history_value(m.name.as_str(), minute).map(|v| (m, v)))
                .map(|(metric, value)| {
                    assert_eq!(
                        metric.kind == ValueKind::Bool,
                        value == "false",
                        "{}",
                        metric.name
                    );
                    format!("{}={value}", metric.name)
                })
                .collect();
            if fields.is_empty() {
                continue;
            }
            lines.push_str(&format!(
                "{},site={},device={},site_kind={} {} {}\n",
                device.profile,
                device.site,
                device.id,
                site.kind.as_str(),
                fields.join(","),
                end - (119 - minute) * 60_000,
            ));
        }
    }
    lines
}

/// Writes line protocol to the demo as a collector would.
async fn write_lines(base: &str, lines: String) {
    let response = reqwest::Client::new()
        .post(format!("{base}/write?db=stonelion&precision=ms"))
        .body(lines)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 204, "write failed: {body}");
}

/// Runs every query of every dashboard and returns what is still missing: targets without
/// series and checks on the values. Query errors fail the test at once.
async fn check_dashboards(base: &str) -> Vec<String> {
    let to_ms = now_ms();
    let from_ms = to_ms - 6 * 3_600_000;
    let mut missing = Vec::new();
    for file in dashboard_files() {
        let dashboard = load(&file);
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let variables = query_variables(&dashboard);
        let selections = match selections(base, &variables, from_ms, to_ms).await {
            Ok(selections) => selections,
            Err(problem) => {
                missing.push(format!("{name}: {problem}"));
                continue;
            }
        };
        for (title, targets) in dashboard_queries(&dashboard) {
            let mut answered = vec![false; targets.len()];
            let mut series = Vec::new();
            for selection in &selections {
                let joined: Vec<String> = targets
                    .iter()
                    .map(|q| substitute(q, selection, from_ms, to_ms))
                    .collect();
                let query = joined.join(";\n");
                let results = post_query(base, &query).await;
                assert_eq!(
                    results.len(),
                    targets.len(),
                    "one result per target: {query}"
                );
                assert_no_errors(&results, &query);
                for (index, result) in results.iter().enumerate() {
                    answered[index] |= has_series(result);
                    series.extend(result["series"].as_array().cloned().unwrap_or_default());
                }
            }
            for (index, answered) in answered.iter().enumerate() {
                if !answered {
                    missing.push(format!(
                        "{name}: panel {title:?} target {index} returned no series"
                    ));
                }
            }
            missing.extend(check_values(&name, &title, &series, to_ms));
        }
    }
    missing
}

/// Checks the values of the panels that operators rely on most.
fn check_values(name: &str, title: &str, series: &[Json], to_ms: i64) -> Vec<String> {
    let mut missing = Vec::new();
    if title.contains("Gas concentration") || title.contains("gas readings") {
        let modbus = series
            .iter()
            .any(|s| s["tags"]["device"] == MODBUS_GAS_DEVICE || s["name"] == "igd-toc-635");
        if !modbus {
            missing.push(format!("{name}: panel {title:?} has no series of the Modbus gas controller {MODBUS_GAS_DEVICE}"));
        }
    }
    if title == "Devices online per site" {
        for s in series {
            let ratio = s["values"][0][1].as_f64();
            if ratio != Some(1.0) {
                missing.push(format!(
                    "{name}: {title:?} site {} shows {ratio:?}, expected 1.0",
                    s["tags"]["site"]
                ));
            }
        }
    }
    if title == "Active alarms by level" {
        let plant = series.iter().find(|s| s["tags"]["site"] == "plant-a");
        let columns = plant.map(|s| s["columns"].clone()).unwrap_or_default();
        let index = columns
            .as_array()
            .and_then(|c| c.iter().position(|c| c == "unacknowledged"));
        let unacknowledged = plant
            .zip(index)
            .and_then(|(s, i)| s["values"][0][i].as_f64());
        if unacknowledged.is_none_or(|n| n < 1.0) {
            missing.push(format!("{name}: {title:?} shows {unacknowledged:?} unacknowledged alarms at plant-a, expected 1 or more"));
        }
    }
    if title == "Latest gas readings" {
        let polled = series
            .iter()
            .filter(|s| s["tags"]["device"] == MODBUS_GAS_DEVICE)
            .filter_map(|s| s["values"][0][0].as_i64())
            .any(|ts| ts > to_ms - 5 * 60_000);
        if !polled {
            missing.push(format!(
                "{name}: {title:?} has no reading of {MODBUS_GAS_DEVICE} from the last five minutes"
            ));
        }
    }
    missing
}

fn tag_values(result: &Json) -> Vec<String> {
    let mut values: Vec<String> = result["series"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|row| row[1].as_str().map(str::to_owned))
        .collect();
    values.sort();
    values.dedup();
    values
}

/// Collects every query of a dashboard: panel targets, joined per panel with `;` as Grafana sends
/// them, and annotation queries.
fn dashboard_queries(dashboard: &Json) -> Vec<(String, Vec<String>)> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("untitled").to_owned();
        let targets: Vec<String> = panel["targets"]
            .as_array()
            .expect("panel targets")
            .iter()
            .map(|t| t["query"].as_str().expect("raw query").to_owned())
            .collect();
        queries.push((title, targets));
    }
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = format!(
            "annotation {}",
            annotation["name"].as_str().unwrap_or("untitled")
        );
        queries.push((
            name,
            vec![
                annotation["query"]
                    .as_str()
                    .expect("annotation query")
                    .to_owned(),
            ],
        ));
    }
    queries
}

#[tokio::test]
async fn every_dashboard_query_returns_series() {
    let config = demo_config();
    let demo = Demo::start();
    let base = demo.base.clone();
    let deadline = Instant::now() + READY_TIMEOUT;

    // Devices come online from the demo's own MQTT devices and Modbus polls, before
    // this test writes anything.
    wait_all_online(&base, deadline).await;
    write_lines(&base, history_lines(&config)).await;
    // A level 2 reading of the MQTT gas detector raises an alarm at once. The detector's
    // next reading clears it, but it stays open and unacknowledged.
    write_lines(
        &base,
        format!(
            "gas-detector,site=plant-a,device=gas-a-01 gas_lel=60 {}\n",
            now_ms()
        ),
    )
    .await;

    // The overview needs a site summary written after every device came online.
    loop {
        let missing = check_dashboards(&base).await;
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboards still incomplete after {READY_TIMEOUT:?}:\n{}",
            missing.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn dashboards_are_well_formed() {
    let mut uids = Vec::new();
    for file in dashboard_files() {
        let dashboard = load(&file);
        let uid = dashboard["uid"].as_str().expect("dashboard uid").to_owned();
        assert!(!uids.contains(&uid), "duplicate uid {uid}");
        uids.push(uid);
        let mut ids = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            let id = panel["id"].as_i64().expect("panel id");
            assert!(
                !ids.contains(&id),
                "{}: duplicate panel id {id}",
                file.display()
            );
            ids.push(id);
            assert_eq!(
                panel["datasource"]["uid"],
                "${datasource}",
                "{}: panel datasource",
                file.display()
            );
            for target in panel["targets"].as_array().expect("targets") {
                assert_eq!(
                    target["rawQuery"],
                    true,
                    "{}: raw InfluxQL target",
                    file.display()
                );
            }
        }
        let variables = dashboard["templating"]["list"]
            .as_array()
            .expect("variables");
        assert!(
            variables.iter().any(|v| v["name"] == "datasource"),
            "{}: datasource variable",
            file.display()
        );
        assert!(
            variables.iter().any(|v| v["name"] == "site"),
            "{}: site variable",
            file.display()
        );
    }
}

#[test]
fn site_dashboard_draws_gas_thresholds() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/site.json");
    let dashboard = load(&path);
    let gas = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .find(|p| p["title"] == "Gas concentration")
        .expect("gas panel");
    let steps = &gas["fieldConfig"]["defaults"]["thresholds"]["steps"];
    assert_eq!(steps[1]["value"], 25);
    assert_eq!(steps[2]["value"], 50);
    assert_eq!(
        gas["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"],
        "line+area"
    );
}

fn datasource_file(name: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/provisioning/datasources");
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Returns the value of `key: value` in a provisioning file.
fn yaml_value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .trim()
}

#[test]
fn provisioning_points_at_stonelion() {
    let embedded = datasource_file("stonelion.yaml");
    assert_eq!(yaml_value(&embedded, "type"), "influxdb");
    assert_eq!(yaml_value(&embedded, "url"), "http://127.0.0.1:8080");
    assert_eq!(yaml_value(&embedded, "dbName"), "stonelion");
    assert_eq!(yaml_value(&embedded, "uid"), "stonelion");
    assert_eq!(yaml_value(&embedded, "httpHeaderName1"), "Authorization");
    assert_eq!(
        yaml_value(&embedded, "httpHeaderValue1"),
        "Bearer ${STONELION_GRAFANA_TOKEN}"
    );
    let influxdb2 = datasource_file("influxdb2.yaml");
    assert_eq!(yaml_value(&influxdb2, "dbName"), "stonelion");
    assert_eq!(yaml_value(&influxdb2, "httpHeaderName1"), "Authorization");
    assert_eq!(
        yaml_value(&influxdb2, "httpHeaderValue1"),
        "Token ${STONELION_INFLUXDB_TOKEN}"
    );
}

/// Sends the provisioned header, with the variable expanded as Grafana expands it, to a
/// server that has API tokens: a viewer token may query, a missing one may not.
#[tokio::test]
async fn provisioned_token_header_queries_stonelion() {
    let token = "grafana-viewer-token-0123456789abcdef0123456789abcdef";
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    let data = tempfile::tempdir().unwrap();
    let text = format!(
        "[[sites]]\nid = \"plant-a\"\nname = \"Plant A\"\nkind = \"enterprise\"\n\n\
         [[api_tokens]]\nname = \"grafana\"\nrole = \"viewer\"\ntoken_sha256 = \"{digest}\"\n"
    );
    let mut config = stonelion::config::parse(&text, builtin_profiles()).unwrap();
    config.server.data_dir = data.path().join("data");
    config.server.http_listen = "127.0.0.1:0".parse().unwrap();
    config.server.mqtt_listen = "127.0.0.1:0".parse().unwrap();
    let server = stonelion::server::Server::start(config, Arc::new(SystemClock))
        .await
        .unwrap();
    let url = format!("http://{}/query", server.http_addr);

    let provisioned = datasource_file("stonelion.yaml");
    let header = yaml_value(&provisioned, "httpHeaderName1");
    let value =
        yaml_value(&provisioned, "httpHeaderValue1").replace("${STONELION_GRAFANA_TOKEN}", token);
    let form = [("q", "SHOW MEASUREMENTS"), ("db", "stonelion")];
    let client = reqwest::Client::new();
    let with_token = client
        .post(&url)
        .header(header, &value)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(
        with_token.status(),
        200,
        "{}",
        with_token.text().await.unwrap()
    );
    let without = client.post(&url).form(&form).send().await.unwrap();
    assert_eq!(without.status(), 401);
    server.shutdown().await;
}
