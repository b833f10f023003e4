//! Bearer-token authorization for every HTTP route, including the InfluxDB-compatible ones.
//!
//! With no `[[api_tokens]]` configured the API is open, which the server allows on
//! loopback only. Otherwise every route except `/healthz` and `/ping` needs a token whose
//! role allows the route ([`required_permission`]). A token is accepted as
//! `Authorization: Bearer X`, `Authorization: Token X` (InfluxDB 2 clients), HTTP Basic
//! auth with the token as password, or the `p` query parameter (InfluxDB 1 clients).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::ApiError;
use crate::metrics::SharedRegistry;
use crate::security::tokens::{Permission, Role, TokenSet};

/// How often one denial reason is logged at WARN; repeats in between are counted.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The token a request was authorized with, stored in the request's extensions.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The token's configured name, recorded as the actor of alarm actions.
    pub name: String,
    pub role: Role,
}

/// State of the authorization middleware.
#[derive(Clone)]
pub struct ApiAuth {
    tokens: Arc<TokenSet>,
    denials: Arc<ApiDenials>,
}

impl ApiAuth {
    pub fn new(tokens: TokenSet, registry: &SharedRegistry) -> Self {
        Self {
            tokens: Arc::new(tokens),
            denials: Arc::new(ApiDenials::new(registry)),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Counts denied requests in `stonelion_api_denied_total{reason}` and logs them at WARN,
/// at most once per reason per interval.
struct ApiDenials {
    denied: Family<ReasonLabel, Counter>,
    last_logged: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl ApiDenials {
    fn new(registry: &SharedRegistry) -> Self {
        let denied = Family::<ReasonLabel, Counter>::default();
        registry.register(|r| {
            r.register(
                "api_denied",
                "HTTP requests denied for their token, by reason",
                denied.clone(),
            );
        });
        Self {
            denied,
            last_logged: Mutex::new(HashMap::new()),
        }
    }

    /// Counts and logs a denial. `token` is the token's configured name, never the token.
    fn deny(&self, reason: &'static str, request: &Request, token: Option<&str>) {
        self.denied.get_or_create(&ReasonLabel { reason }).inc();
        let now = Instant::now();
        let mut last = self
            .last_logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = last
            .entry(reason)
            .or_insert((now.checked_sub(LOG_INTERVAL).unwrap_or(now), 0));
        if now.duration_since(entry.0) < LOG_INTERVAL {
            entry.1 += 1;
            return;
        }
        let suppressed = entry.1;
        *entry = (now, 0);
        drop(last);
        tracing::warn!(
            reason,
            method = %request.method(),
            path = request.uri().path(),
            token,
            suppressed_since_last_log = suppressed,
            "HTTP request denied"
        );
    }
}

/// Returns what a route needs, or `None` for the routes that stay open.
pub fn required_permission(method: &Method, path: &str) -> Option<Permission> {
    let alarm_action = path.starts_with("/api/v1/alarms/")
        && (path.ends_with("/ack") || path.ends_with("/close") || path.ends_with("/reset"));
    let device_change =
        path.starts_with("/api/v1/devices/") && (method == Method::PUT || method == Method::DELETE);
    match path {
        "/healthz" | "/ping" => None,
        "/write" | "/api/v2/write" => Some(Permission::Write),
        _ if path.starts_with("/api/v1/admin/") => Some(Permission::Admin),
        _ if device_change => Some(Permission::Admin),
        _ if alarm_action && method == Method::POST => Some(Permission::AlarmAction),
        _ => Some(Permission::Read),
    }
}

/// Authorizes a request; see the module docs.
pub async fn authorize(State(auth): State<ApiAuth>, mut request: Request, next: Next) -> Response {
    if auth.tokens.is_empty() {
        return next.run(request).await;
    }
    let Some(permission) = required_permission(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    if let Some(problem) = ambiguous_credentials(&request) {
        auth.denials.deny("multiple_credentials", &request, None);
        return ApiError::bad_request(problem).into_response();
    }
    let Some(secret) = presented_token(&request) else {
        auth.denials.deny("missing_token", &request, None);
        return unauthorized("missing API token; send `Authorization: Bearer <token>`");
    };
    let Some(token) = auth.tokens.find(&secret) else {
        auth.denials.deny("invalid_token", &request, None);
        return unauthorized("invalid API token");
    };
    if !token.role.allows(permission) {
        auth.denials
            .deny("role_not_allowed", &request, Some(&token.name));
        return ApiError::forbidden(format!(
            "token `{}` has role `{}`, which may not {}",
            token.name,
            token.role.as_str(),
            describe(permission)
        ))
        .into_response();
    }
    request.extensions_mut().insert(Principal {
        name: token.name.clone(),
        role: token.role,
    });
    next.run(request).await
}

fn describe(permission: Permission) -> &'static str {
    match permission {
        Permission::Read => "read data; use a viewer, operator or admin token",
        Permission::AlarmAction => {
            "acknowledge, close or reset alarms; use an operator or admin token"
        }
        Permission::Write => "write points; use a writer or admin token",
        Permission::Admin => "reload the config or change devices; use an admin token",
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::unauthorized(message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Routes that take the token in the `p` query parameter, as InfluxDB 1.x clients send it.
/// Elsewhere a token in the URL would end up in proxy logs and browser history, so the
/// other routes take the `Authorization` header only.
const QUERY_TOKEN_ROUTES: [&str; 4] = ["/query", "/write", "/api/v2/write", "/ping"];

/// Returns why the request's credentials are ambiguous: more than one `Authorization`
/// header, more than one `p` parameter, or both. A proxy or log that reads another copy
/// than Stonelion would disagree about who sent the request.
fn ambiguous_credentials(request: &Request) -> Option<&'static str> {
    let headers = request
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .count();
    if headers > 1 {
        return Some("the request has more than one `Authorization` header; send exactly one");
    }
    if !QUERY_TOKEN_ROUTES.contains(&request.uri().path()) {
        return None;
    }
    let query = request.uri().query().unwrap_or_default();
    let params: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap_or_default();
    let tokens = params.iter().filter(|(key, _)| key == "p").count();
    if tokens > 1 {
        return Some("the request has more than one `p` parameter; send exactly one");
    }
    if tokens == 1 && headers == 1 {
        return Some(
            "the request has both an `Authorization` header and a `p` parameter; send one",
        );
    }
    None
}

/// Returns the token from the `Authorization` header or, on the InfluxDB-compatible
/// routes, the `p` query parameter.
fn presented_token(request: &Request) -> Option<String> {
    if let Some(value) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, credentials) = value.trim().split_once(' ')?;
        let credentials = credentials.trim();
        return match scheme.to_ascii_lowercase().as_str() {
            "bearer" | "token" => Some(credentials.to_owned()),
            "basic" => basic_password(credentials),
            _ => None,
        };
    }
    if !QUERY_TOKEN_ROUTES.contains(&request.uri().path()) {
        return None;
    }
    let query = request.uri().query()?;
    let params: Vec<(String, String)> = serde_urlencoded::from_str(query).ok()?;
    params
        .into_iter()
        .find(|(key, _)| key == "p")
        .map(|(_, value)| value)
}

/// Decodes HTTP Basic credentials and returns the password.
fn basic_password(credentials: &str) -> Option<String> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    decoded
        .split_once(':')
        .map(|(_, password)| password.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_by_route() {
        assert_eq!(required_permission(&Method::GET, "/healthz"), None);
        assert_eq!(
            required_permission(&Method::GET, "/metrics"),
            Some(Permission::Read)
        );
        assert_eq!(
            required_permission(&Method::GET, "/query"),
            Some(Permission::Read)
        );
        assert_eq!(
            required_permission(&Method::POST, "/api/v2/write"),
            Some(Permission::Write)
        );
        assert_eq!(
            required_permission(&Method::POST, "/api/v1/alarms/3/ack"),
            Some(Permission::AlarmAction)
        );
        assert_eq!(
            required_permission(&Method::POST, "/api/v1/alarms/3/close"),
            Some(Permission::AlarmAction)
        );
        assert_eq!(
            required_permission(&Method::POST, "/api/v1/alarms/3/reset"),
            Some(Permission::AlarmAction)
        );
        assert_eq!(
            required_permission(&Method::GET, "/api/v1/alarms/3"),
            Some(Permission::Read)
        );
        assert_eq!(
            required_permission(&Method::POST, "/api/v1/admin/reload"),
            Some(Permission::Admin)
        );
        assert_eq!(
            required_permission(&Method::PUT, "/api/v1/devices/gas-09"),
            Some(Permission::Admin)
        );
        assert_eq!(
            required_permission(&Method::DELETE, "/api/v1/devices/gas-09"),
            Some(Permission::Admin)
        );
        assert_eq!(
            required_permission(&Method::GET, "/api/v1/devices/gas-09"),
            Some(Permission::Read)
        );
        assert_eq!(
            required_permission(&Method::GET, "/no/such/route"),
            Some(Permission::Read)
        );
    }

    #[test]
    fn basic_auth_password() {
        assert_eq!(
            basic_password("dXNlcjpzZWNyZXQ="),
            Some("secret".to_owned())
        );
        assert_eq!(basic_password("not base64!"), None);
    }
}
