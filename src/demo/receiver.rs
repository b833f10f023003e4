//! The demo's webhook receiver: checks each delivery's signature and prints it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Clone)]
struct Receiver {
    secret: Vec<u8>,
    /// The server's HTTP address, set once the server listens, for the commands printed
    /// with each raised alarm.
    api: Arc<OnceLock<SocketAddr>>,
}

/// Starts the receiver, returning its address and task.
pub async fn start(
    listen: SocketAddr,
    secret: Vec<u8>,
    api: Arc<OnceLock<SocketAddr>>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/stonelion", post(receive))
        .with_state(Receiver { secret, api });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}

/// Returns whether `header` is `sha256=<hex>` of the body's HMAC-SHA256 with `secret`.
pub fn signature_valid(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_digest) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let valid = signature_valid(&receiver.secret, &body, &header("x-stonelion-signature"));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let alarm = &json["alarm"];
    let value = alarm["value"]
        .as_f64()
        .map(|v| format!(" value {v}"))
        .unwrap_or_default();
    let unit = alarm["unit"]
        .as_str()
        .map(|u| format!(" {u}"))
        .unwrap_or_default();
    println!(
        "webhook received: {} alarm {} site {} device {} level {}{value}{unit} (signature {}, delivery {})",
        header("x-stonelion-event"),
        alarm["id"],
        alarm["site"].as_str().unwrap_or("?"),
        alarm["device"].as_str().unwrap_or("?"),
        alarm["level"],
        if valid { "valid" } else { "INVALID" },
        header("x-stonelion-delivery"),
    );
    if let (true, "alarm.raised", Some(api)) = (
        valid,
        header("x-stonelion-event").as_str(),
        receiver.api.get(),
    ) {
        println!(
            "  acknowledge it: curl -X POST http://{api}/api/v1/alarms/{}/ack -H 'content-type: application/json' -d '{{\"by\": \"duty officer\"}}'",
            alarm["id"]
        );
    }
    if valid {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::UNAUTHORIZED
    }
}
