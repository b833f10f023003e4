//! Runs every query of every dashboard under `dashboards/` against `/query` on demo-like
//! data, after the substitutions Grafana's InfluxDB data source makes in InfluxQL mode:
//! `$timeFilter`, `$__interval`, `$interval` and template variables, regex-escaped for
//! multi-value variables.

#[path = "influxql_support.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use support::{MemStore, now_ms, seed_demo, serve_influxql};

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
/// each single value of single-value variables, and "All" for multi-value ones.
async fn selections(
    base: &str,
    variables: &[Variable],
    from_ms: i64,
    to_ms: i64,
) -> Vec<BTreeMap<String, String>> {
    let mut selections = vec![BTreeMap::new()];
    for variable in variables {
        let mut next = Vec::new();
        for selection in &selections {
            let query = substitute(&variable.query, selection, from_ms, to_ms);
            let results = post_query(base, &query).await;
            assert_no_errors(&results, &query);
            let values = tag_values(&results[0]);
            assert!(
                !values.is_empty(),
                "variable {} has no values: {query}",
                variable.name
            );
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
    selections
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
    let store = MemStore::new();
    seed_demo(store.as_ref());
    let base = serve_influxql(store).await;
    let to_ms = now_ms();
    let from_ms = to_ms - 6 * 3_600_000;

    let files = dashboard_files();
    assert!(
        files.len() >= 4,
        "expected four dashboards, found {files:?}"
    );
    for file in files {
        let dashboard = load(&file);
        let variables = query_variables(&dashboard);
        let selections = selections(&base, &variables, from_ms, to_ms).await;
        for (title, targets) in dashboard_queries(&dashboard) {
            let mut answered = vec![false; targets.len()];
            for selection in &selections {
                let joined: Vec<String> = targets
                    .iter()
                    .map(|q| substitute(q, selection, from_ms, to_ms))
                    .collect();
                let query = joined.join(";\n");
                let results = post_query(&base, &query).await;
                assert_eq!(
                    results.len(),
                    targets.len(),
                    "one result per target: {query}"
                );
                assert_no_errors(&results, &query);
                for (index, result) in results.iter().enumerate() {
                    answered[index] |= has_series(result);
                }
            }
            for (index, answered) in answered.iter().enumerate() {
                assert!(
                    answered,
                    "{}: panel {title:?} target {index} returned no series",
                    file.display()
                );
            }
        }
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

#[test]
fn provisioning_points_at_stonelion() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/provisioning/datasources");
    let embedded = std::fs::read_to_string(dir.join("stonelion.yaml")).expect("stonelion.yaml");
    assert!(embedded.contains("type: influxdb"));
    assert!(embedded.contains("url: http://127.0.0.1:8080"));
    assert!(embedded.contains("dbName: stonelion"));
    assert!(embedded.contains("uid: stonelion\n"));
    let influxdb2 = std::fs::read_to_string(dir.join("influxdb2.yaml")).expect("influxdb2.yaml");
    assert!(influxdb2.contains("dbName: stonelion"));
    assert!(influxdb2.contains("httpHeaderValue1: Token ${STONELION_INFLUXDB_TOKEN}"));
}
