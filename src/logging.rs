//! Log setup: the default filter and a layer that drops rumqttd's routine errors.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

/// The default log filter. rumqttd logs every connection at INFO, and its broker module
/// logs routine disconnects and failed logins at ERROR, so that module is silenced. The
/// broker's login and topic checks log and count denials themselves. rustls logs one WARN
/// per connection for client behaviour the TLS listeners cannot change, such as an IP
/// address sent as SNI by `mosquitto_pub -h 127.0.0.1`. So only its errors are kept, and
/// the listeners count failed handshakes and log them at a rate limit.
const DEFAULT_LOG_FILTER: &str = "info,rumqttd=warn,rumqttd::server::broker=off,rustls=error";

/// Messages that rumqttd 0.20's router logs at ERROR when a client has already
/// disconnected, for example every connection at shutdown, and for each client-id
/// takeover, which `ingest::takeover` counts and logs at WARN. No operator action follows
/// from them, so they would break the rule that ERROR means an operator must act.
const ROUTINE_ROUTER_ERRORS: &[&str] = &[
    "no-connection id ",
    "Connection is already disconnected",
    "Duplicate client_id, dropping previous connection",
];

/// Initialises logging to stderr with `STONELION_LOG` or the default filter.
pub fn init() {
    use std::io::IsTerminal as _;

    let filter = tracing_subscriber::EnvFilter::try_from_env("STONELION_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry()
        .with(filter)
        .with(RoutineBrokerErrors)
        .with(output)
        .init();
}

/// Drops rumqttd router errors that only report a client that has already gone.
struct RoutineBrokerErrors;

impl<S: Subscriber> Layer<S> for RoutineBrokerErrors {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let metadata = event.metadata();
        if *metadata.level() != Level::ERROR || !metadata.target().starts_with("rumqttd::router") {
            return true;
        }
        let mut message = MessageText(String::new());
        event.record(&mut message);
        !is_routine_router_error(&message.0)
    }
}

fn is_routine_router_error(message: &str) -> bool {
    ROUTINE_ROUTER_ERRORS
        .iter()
        .any(|routine| message.starts_with(routine))
}

struct MessageText(String);

impl Visit for MessageText {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            value.clone_into(&mut self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routine_router_errors_recognised() {
        assert!(is_routine_router_error(
            "no-connection id 2 is already gone"
        ));
        assert!(is_routine_router_error(
            "Connection is already disconnected"
        ));
        assert!(is_routine_router_error(
            "Duplicate client_id, dropping previous connection with connection_id: 3"
        ));
        assert!(!is_routine_router_error("Router done!"));
        assert!(!is_routine_router_error("no space for new connection"));
    }
}
