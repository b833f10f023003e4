//! Request handlers of the API.

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value as Json_, json};

use super::auth::Principal;
use super::{ApiError, AppState};
use crate::alarms::store::{self, AlarmFilter};
use crate::alarms::{AlarmId, AlarmState};
use crate::config::{Config, Device};
use crate::ingest::directory::Directory;
use crate::model::{DeviceId, MetricName, SiteId, Timestamp};
use crate::pipeline::{DeviceState, series_key};
use crate::storage::{self as storage, Aggregate, Selector};

/// Most points one series request returns.
const MAX_POINTS: usize = 100_000;
/// Points returned when the request sets no `limit`.
const DEFAULT_POINTS: usize = 10_000;
/// Alarms returned when the request sets no `limit`.
const DEFAULT_ALARMS: usize = 500;
/// Maximum number of alarms one list request returns.
const MAX_ALARMS: usize = 10_000;

/// Reads a `limit` parameter: a whole number from 1 to `max`, or `default` when absent.
fn parse_limit(value: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    let Some(value) = value else {
        return Ok(default);
    };
    match value.parse::<usize>() {
        Ok(limit) if (1..=max).contains(&limit) => Ok(limit),
        _ => Err(ApiError::bad_request(format!(
            "`limit` value `{value}` is invalid; use a whole number from 1 to {max}"
        ))),
    }
}

pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see docs/api.md for the routes")
}

/// Returns the JSON 405 error for a known route called with a method it does not take.
/// axum adds the `Allow` header with the methods the route takes.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::method_not_allowed(format!(
        "{method} is not allowed on {}; see the Allow header and docs/api.md for the methods it takes",
        uri.path()
    ))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.registry.encode(),
    )
}

pub async fn sites(State(state): State<AppState>) -> impl IntoResponse {
    let config = state.config.load();
    let sites: Vec<Json_> = config
        .sites
        .iter()
        .map(|site| {
            let devices = config.devices.iter().filter(|d| d.site == site.id).count();
            json!({ "id": site.id, "name": site.name, "kind": site.kind.as_str(), "devices": devices })
        })
        .collect();
    Json(json!({ "sites": sites }))
}

fn device_json(config: &Config, device: &Device, device_state: Option<&DeviceState>) -> Json_ {
    let profile = config.profiles.get(&device.profile);
    let site = config.site(&device.site);
    let latest: serde_json::Map<String, Json_> = device_state
        .map(|s| {
            s.latest
                .iter()
                .map(|(metric, (ts, value))| {
                    let unit = profile
                        .and_then(|p| p.metric(metric))
                        .and_then(|m| m.unit.clone());
                    let mut entry = json!({ "value": value, "ts": ts.to_rfc3339(), "unit": unit });
                    if let Some(label) = profile.and_then(|p| code_label(p, metric, *value)) {
                        entry["label"] = json!(label);
                    }
                    (metric.to_string(), entry)
                })
                .collect()
        })
        .unwrap_or_default();
    let bad: serde_json::Map<String, Json_> = device_state
        .map(|s| {
            s.bad
                .iter()
                .map(|(metric, bad)| {
                    (
                        metric.to_string(),
                        json!({ "reason": bad.reason, "at": bad.at.to_rfc3339() }),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "id": device.id,
        "name": device.name,
        "site": device.site,
        "site_name": site.map(|s| s.name.clone()),
        "site_kind": site.map(|s| s.kind.as_str()),
        "profile": device.profile,
        "online": device_state.and_then(|s| s.online),
        "last_seen": device_state.and_then(|s| s.last_seen).map(Timestamp::to_rfc3339),
        "latest": latest,
        "bad": bad,
    })
}

/// Looks up the profile's label for a status or fault code, for metrics whose register
/// lists `codes`. A code the profile does not list has no label.
fn code_label(
    profile: &crate::profile::Profile,
    metric: &MetricName,
    value: crate::model::Value,
) -> Option<String> {
    let crate::model::Value::Number(number) = value else {
        return None;
    };
    let register = &profile
        .registers
        .iter()
        .find(|entry| entry.metric == *metric)?
        .register;
    if register.codes.is_empty() {
        return None;
    }
    // Codes are keyed by the raw register value, before scale and offset.
    let raw = (number - register.offset) / register.scale;
    if raw.fract() != 0.0 || raw.abs() > 1e15 {
        return None;
    }
    #[allow(clippy::cast_possible_truncation)]
    register.code_label(raw as i64).map(str::to_owned)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesQuery {
    site: Option<SiteId>,
}

pub async fn devices(
    State(state): State<AppState>,
    query: Result<Query<DevicesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let config = state.config.load();
    let states = state
        .states
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let devices: Vec<Json_> = config
        .devices
        .iter()
        .filter(|d| query.site.as_ref().is_none_or(|s| *s == d.site))
        .map(|d| device_json(&config, d, states.get(&d.id)))
        .collect();
    Ok(Json(json!({ "devices": devices })))
}

pub async fn device(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let config = state.config.load();
    let device = find_device(&config, &id)?;
    let states = state
        .states
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(Json(device_json(&config, device, states.get(&device.id))))
}

fn find_device<'a>(config: &'a Config, id: &str) -> Result<&'a Device, ApiError> {
    config.device(&DeviceId::from(id)).ok_or_else(|| {
        ApiError::not_found(format!(
            "device `{id}` not found; GET /api/v1/devices lists the devices"
        ))
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesParams {
    metric: Option<String>,
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
    agg: Option<String>,
    limit: Option<String>,
}

pub async fn series(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<SeriesParams>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let config = state.config.load();
    let device = find_device(&config, &id)?;
    let profile = config.profiles.get(&device.profile);
    let metric_names: Vec<&MetricName> = profile
        .map(|p| p.metrics.iter().map(|m| &m.name).collect())
        .unwrap_or_default();
    let Some(metric) = params.metric.as_deref() else {
        return Err(ApiError::bad_request(format!(
            "missing `metric`; device `{id}` has: {}",
            metric_names
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let metric = MetricName::from(metric);
    if !metric_names.contains(&&metric) {
        return Err(ApiError::bad_request(format!(
            "device `{id}` has no metric `{metric}`; use one of: {}",
            metric_names
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    let now = state.clock.now();
    let to = parse_time("to", params.to.as_deref(), now)?.unwrap_or(Timestamp(now.0 + 1));
    let from =
        parse_time("from", params.from.as_deref(), now)?.unwrap_or(Timestamp(to.0 - 3_600_000));
    if from >= to {
        return Err(ApiError::bad_request(format!(
            "`from` ({from}) must be before `to` ({to})"
        )));
    }
    let aggregation = parse_aggregation(params.step.as_deref(), params.agg.as_deref())?;
    let limit = parse_limit(params.limit.as_deref(), DEFAULT_POINTS, MAX_POINTS)?;

    let directory = Directory::from_config(&config);
    let entry = directory
        .device(&device.id)
        .ok_or_else(|| ApiError::not_found(format!("device `{id}` not found")))?;
    let key = series_key(entry, &metric);
    let query = storage::Query {
        selector: Selector {
            measurement: Some(key.measurement.clone()),
            tags: key.tags.clone(),
            field: Some(key.field.clone()),
        },
        from,
        to,
        aggregation,
        limit: Some(limit + 1),
    };
    let store = state.store.clone();
    let data = tokio::task::spawn_blocking(move || store.query(&query))
        .await
        .map_err(|e| ApiError::internal("the series query failed", &e))?
        .map_err(|e| match e {
            storage::StorageError::InvalidQuery(message) => ApiError::bad_request(message),
            other => ApiError::internal("the series query failed", &other),
        })?;
    let mut points: Vec<Json_> = data
        .into_iter()
        .flat_map(|d| d.points)
        .map(|(ts, value)| json!({ "ts": ts.to_rfc3339(), "value": value }))
        .collect();
    let truncated = points.len() > limit;
    points.truncate(limit);
    let unit = profile
        .and_then(|p| p.metric(&metric))
        .and_then(|m| m.unit.clone());
    Ok(Json(json!({
        "device": device.id,
        "metric": metric,
        "unit": unit,
        "from": from.to_rfc3339(),
        "to": to.to_rfc3339(),
        "step": aggregation.map(|(step, _)| humantime::format_duration(step).to_string()),
        "agg": aggregation.map(|(_, agg)| agg.name()),
        "truncated": truncated,
        "points": points,
    })))
}

/// Parses an RFC 3339 time, epoch milliseconds, or `now`, `now-1h`, `-15m`.
fn parse_time(
    name: &str,
    text: Option<&str>,
    now: Timestamp,
) -> Result<Option<Timestamp>, ApiError> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::bad_request(format!(
            "`{name}` value `{text}` is invalid; use RFC 3339 (2026-01-02T03:04:05Z), epoch \
             milliseconds, or a relative time such as now-1h"
        ))
    };
    let time = if let Ok(ms) = text.parse::<i64>() {
        Timestamp(ms)
    } else if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        Timestamp(t.timestamp_millis())
    } else {
        let relative = text.strip_prefix("now").unwrap_or(text).trim();
        if relative.is_empty() {
            return Ok(Some(now));
        }
        let ago = relative.strip_prefix('-').ok_or_else(invalid)?.trim();
        let duration = humantime::parse_duration(ago).map_err(|_| invalid())?;
        let ms = i64::try_from(duration.as_millis()).map_err(|_| invalid())?;
        Timestamp(now.0.saturating_sub(ms))
    };
    // RFC 3339 has four-digit years, so responses can show only times in years 0 to 9999.
    let in_range = chrono::DateTime::from_timestamp_millis(time.0)
        .is_some_and(|t| (0..=9999).contains(&chrono::Datelike::year(&t)));
    if !in_range {
        return Err(ApiError::bad_request(format!(
            "`{name}` value `{text}` is out of range; use a time in the years 0 to 9999"
        )));
    }
    Ok(Some(time))
}

fn parse_aggregation(
    step: Option<&str>,
    agg: Option<&str>,
) -> Result<Option<(Duration, Aggregate)>, ApiError> {
    let aggregate = agg
        .map(|name| {
            Aggregate::ALL
                .into_iter()
                .find(|a| a.name() == name)
                .ok_or_else(|| {
                    let names: Vec<&str> = Aggregate::ALL.iter().map(|a| a.name()).collect();
                    ApiError::bad_request(format!(
                        "`agg` value `{name}` is unknown; use one of: {}",
                        names.join(", ")
                    ))
                })
        })
        .transpose()?;
    let Some(step) = step else {
        if aggregate.is_some() {
            return Err(ApiError::bad_request(
                "`agg` needs a `step`, such as step=1m",
            ));
        }
        return Ok(None);
    };
    let duration = humantime::parse_duration(step).map_err(|_| {
        ApiError::bad_request(format!(
            "`step` value `{step}` is invalid; write a duration such as 10s, 1m or 1h"
        ))
    })?;
    if duration < Duration::from_millis(1) {
        return Err(ApiError::bad_request("`step` must be at least 1ms"));
    }
    Ok(Some((duration, aggregate.unwrap_or(Aggregate::Mean))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmsParams {
    state: Option<String>,
    site: Option<SiteId>,
    device: Option<DeviceId>,
    limit: Option<String>,
}

pub async fn alarms(
    State(state): State<AppState>,
    params: Result<Query<AlarmsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = parse_limit(params.limit.as_deref(), DEFAULT_ALARMS, MAX_ALARMS)?;
    let alarm_state = params
        .state
        .as_deref()
        .map(|s| {
            AlarmState::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`state` value `{s}` is unknown; use active, cleared or closed"
                ))
            })
        })
        .transpose()?;
    let filter = AlarmFilter {
        state: alarm_state,
        site: params.site,
        device: params.device,
        limit,
    };
    let reader = state.alarm_reader.clone();
    let alarms = tokio::task::spawn_blocking(move || {
        let conn = reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        store::list(&conn, &filter)
    })
    .await
    .map_err(|e| ApiError::internal("listing alarms failed", &e))?
    .map_err(|e| ApiError::internal("listing alarms failed", &e))?;
    let alarms: Vec<Json_> = alarms.iter().map(crate::alarms::Alarm::to_json).collect();
    Ok(Json(json!({ "alarms": alarms })))
}

pub(super) fn parse_alarm_id(id: &str) -> Result<AlarmId, ApiError> {
    id.parse::<i64>().map(AlarmId).map_err(|_| {
        ApiError::bad_request(format!(
            "alarm id `{id}` is invalid; alarm ids are integers"
        ))
    })
}

pub async fn alarm(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_alarm_id(&id)?;
    let reader = state.alarm_reader.clone();
    let alarm = tokio::task::spawn_blocking(move || {
        let conn = reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        store::get(&conn, id)
    })
    .await
    .map_err(|e| ApiError::internal("reading the alarm failed", &e))?
    .map_err(|e| ApiError::internal("reading the alarm failed", &e))?;
    match alarm {
        Some(alarm) => Ok(Json(alarm.to_json())),
        None => Err(ApiError::not_found(format!("alarm {id} not found"))),
    }
}

/// Body of `POST /api/v1/alarms/{id}/ack`, `/close` and `/reset`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// Who acts: an operator's name. Required on an open API; with tokens the token's
    /// name is the actor and `by`, when given, is kept at the start of the note.
    #[serde(default)]
    by: Option<String>,
    /// Free text kept with the transition; required to close an alarm.
    #[serde(default)]
    note: Option<String>,
}

/// The checked actor and note of an alarm action.
pub(super) struct Action {
    pub(super) actor: String,
    pub(super) note: Option<String>,
}

/// Longest accepted `by` and `note`, in characters.
const MAX_ACTOR_CHARS: usize = 128;
const MAX_NOTE_CHARS: usize = 4096;

/// Whether an alarm action needs a note.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum NoteRule {
    Optional,
    /// The body must contain a `note` that is not blank.
    Required,
}

pub(super) fn check_action(
    body: Result<Json<ActionBody>, JsonRejection>,
    principal: Option<&Principal>,
    note_rule: NoteRule,
) -> Result<Action, ApiError> {
    let Json(body) = body.map_err(|e| {
        ApiError::bad_request(format!(
            "{}; send JSON such as {{\"by\": \"duty officer\", \"note\": \"...\"}}",
            e.body_text()
        ))
    })?;
    let by = body.by.as_deref().map(str::trim);
    if by.is_some_and(|by| by.is_empty() || by.chars().count() > MAX_ACTOR_CHARS) {
        return Err(ApiError::bad_request(format!(
            "`by` must name who acts, in 1 to {MAX_ACTOR_CHARS} characters"
        )));
    }
    if body
        .note
        .as_ref()
        .is_some_and(|n| n.chars().count() > MAX_NOTE_CHARS)
    {
        return Err(ApiError::bad_request(format!(
            "`note` is longer than {MAX_NOTE_CHARS} characters"
        )));
    }
    if note_rule == NoteRule::Required && body.note.as_deref().is_none_or(|n| n.trim().is_empty()) {
        return Err(ApiError::bad_request(
            "missing `note`; closing or resetting an alarm requires a note that is not blank and \
             says what was done, such as {\"note\": \"valve replaced\"}",
        ));
    }
    let Some(principal) = principal else {
        let by = by.ok_or_else(|| {
            ApiError::bad_request("missing `by`; name who acts, such as {\"by\": \"duty officer\"}")
        })?;
        return Ok(Action {
            actor: by.to_owned(),
            note: body.note,
        });
    };
    let note = match (by, body.note) {
        (Some(by), Some(note)) => Some(format!("by {by}: {note}")),
        (Some(by), None) => Some(format!("by {by}")),
        (None, note) => note,
    };
    Ok(Action {
        actor: principal.name.clone(),
        note,
    })
}

pub async fn acknowledge(
    State(state): State<AppState>,
    Path(id): Path<String>,
    principal: Option<Extension<Principal>>,
    body: Result<Json<ActionBody>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_alarm_id(&id)?;
    let action = check_action(body, principal.as_deref(), NoteRule::Optional)?;
    let alarm = state
        .alarms
        .acknowledge(id, action.actor, action.note)
        .await?;
    Ok((StatusCode::OK, Json(alarm.to_json())))
}

/// Closes a cleared alarm. A close needs a note that describes what was done, as a work
/// order does.
pub async fn close(
    State(state): State<AppState>,
    Path(id): Path<String>,
    principal: Option<Extension<Principal>>,
    body: Result<Json<ActionBody>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_alarm_id(&id)?;
    let action = check_action(body, principal.as_deref(), NoteRule::Required)?;
    let note = action.note.unwrap_or_default();
    let alarm = state.alarms.close(id, action.actor, note).await?;
    Ok((StatusCode::OK, Json(alarm.to_json())))
}
