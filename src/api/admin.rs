//! Handlers of the admin endpoints (config reload, device management) and of the manual
//! alarm reset.

use crate::ingest::unique_json::UniqueKeys;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Value as Json_, json};

use super::auth::Principal;
use super::handlers::{ActionBody, NoteRule, check_action, parse_alarm_id};
use super::{ApiError, AppState};
use crate::alarms::manager::ResetRequest;
use crate::reload::AdminError;

/// Renders an admin error. An invalid config is a 400 that lists every problem with its
/// file, line, key and fix.
fn admin_error(error: AdminError) -> Response {
    match error {
        AdminError::Invalid(problems) => {
            let listed: Vec<Json_> = problems
                .iter()
                .map(|p| json!({ "file": p.file, "line": p.problem.line, "key": p.problem.key, "message": p.problem.message }))
                .collect();
            let body = json!({
                "error": {
                    "code": "invalid_config",
                    "message": format!("the config has {} problem(s); nothing was changed", problems.len()),
                    "problems": listed,
                }
            });
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
        AdminError::Conflict(message) => ApiError::conflict(message).into_response(),
        AdminError::NotFound(message) => ApiError::not_found(message).into_response(),
        AdminError::Failed(message) => {
            ApiError::internal("the change failed", &message).into_response()
        }
    }
}

/// `POST /api/v1/admin/reload`.
pub async fn reload(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
) -> Response {
    let by = principal.map_or_else(|| "open API".to_owned(), |p| p.name.clone());
    tracing::info!(by = %by, "config reload requested over HTTP");
    match state.reloader.reload().await {
        Ok(report) => {
            let config = state.reloader.config();
            (StatusCode::OK, Json(report.to_json(&config))).into_response()
        }
        Err(error) => admin_error(error),
    }
}

/// `PUT /api/v1/devices/{id}`: the body has the fields of a `[[devices]]` entry as JSON.
pub async fn put_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<UniqueKeys>, JsonRejection>,
) -> Response {
    // Duplicate keys are rejected: with `"site"` twice, the value that counts would depend
    // on the parser.
    let Json(UniqueKeys(body)) = match body {
        Ok(body) => body,
        Err(e) => {
            return ApiError::bad_request(format!(
                "{}; send the fields of a [[devices]] entry as JSON, such as \
                 {{\"site\": \"plant-a\", \"profile\": \"gas-detector\"}}",
                e.body_text()
            ))
            .into_response();
        }
    };
    let device = match device_table(&id, body) {
        Ok(device) => device,
        Err(message) => return ApiError::bad_request(message).into_response(),
    };
    match state.reloader.put_device(&id, device).await {
        Ok((created, _report)) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let config = state.reloader.config();
            let device = config.device(&crate::model::DeviceId::from(id.as_str())).map(|d| {
                json!({ "id": d.id, "name": d.name, "site": d.site, "profile": d.profile, "modbus": d.modbus.is_some() })
            });
            (
                status,
                Json(json!({ "created": created, "device": device })),
            )
                .into_response()
        }
        Err(error) => admin_error(error),
    }
}

/// `DELETE /api/v1/devices/{id}`.
pub async fn delete_device(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.reloader.delete_device(&id).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => admin_error(error),
    }
}

/// Converts a JSON device into a `[[devices]]` table. Nulls mean "not set", because TOML
/// has no null; an `id` in the body must match the path.
fn device_table(id: &str, body: Json_) -> Result<toml::Table, String> {
    crate::config::check_id(id)?;
    let Json_::Object(mut fields) = body else {
        return Err(
            "the body must be a JSON object with the fields of a [[devices]] entry".to_owned(),
        );
    };
    match fields.remove("id") {
        None | Some(Json_::Null) => {}
        Some(Json_::String(body_id)) if body_id == id => {}
        Some(other) => {
            return Err(format!(
                "`id` in the body is {other}, but the path names `{id}`; send the same id or leave it out"
            ));
        }
    }
    let value = toml::Value::try_from(strip_nulls(Json_::Object(fields)))
        .map_err(|e| format!("the body cannot be written as TOML: {e}"))?;
    match value {
        toml::Value::Table(table) => Ok(table),
        _ => Err("the body must be a JSON object".to_owned()),
    }
}

/// Removes null members of nested objects and arrays, because TOML has no null.
fn strip_nulls(value: Json_) -> Json_ {
    match value {
        Json_::Object(fields) => Json_::Object(
            fields
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Json_::Array(items) => Json_::Array(items.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

/// `POST /api/v1/alarms/{id}/reset`.
pub async fn reset(
    State(state): State<AppState>,
    Path(id): Path<String>,
    principal: Option<Extension<Principal>>,
    body: Result<Json<ActionBody>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_alarm_id(&id)?;
    // A reset clears a safety alarm by hand, so, like a close, it needs a note with the reason.
    let action = check_action(body, principal.as_deref(), NoteRule::Required)?;
    let request = ResetRequest {
        id,
        by: action.actor,
        note: action.note,
        states: state.states.clone(),
    };
    let alarm = state.alarms.reset(request).await?;
    Ok((StatusCode::OK, Json(alarm.to_json())))
}
