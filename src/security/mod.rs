//! Credentials and transport security shared by the MQTT broker and the HTTP API:
//! argon2 password hashes, SHA-256 hashed API tokens, and rustls server configs.

pub mod config;
pub mod mqtt_tls;
pub mod tls;
pub mod tokens;
pub mod x509;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use std::net::SocketAddr;

use crate::config::Config;

/// Hashes a password with argon2id and the crate's default cost (19 MiB, 2 passes) into a
/// PHC string such as `$argon2id$v=19$m=19456,t=2,p=1$...`.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// An argon2 PHC string from the config. Its `Debug` output is redacted, so printing a
/// config does not print hashes that an attacker could try to crack offline.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct PhcString(String);

impl PhcString {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PhcString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Checks that `phc` is an argon2 PHC string, returning a message for the config on error.
pub fn check_password_hash(phc: &str) -> Result<(), String> {
    let hash = PasswordHash::new(phc).map_err(|e| {
        format!("invalid password hash ({e}); write the PHC string that `stonelion hash-password` prints")
    })?;
    match hash.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Ok(()),
        other => Err(format!(
            "password hash algorithm `{other}` is not supported; use `stonelion hash-password`, \
             which writes argon2id"
        )),
    }
}

/// Verifies a password against a PHC string. The cost comes from the string's own
/// parameters, so this takes tens of milliseconds: call it off the async threads.
pub fn verify_password(password: &[u8], phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default().verify_password(password, &hash).is_ok(),
        Err(_) => false,
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// A listener setting that `run` refuses: an open listener on an address that other hosts
/// can reach, or two listeners on one port.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error(
        "the MQTT broker would accept anyone on {addr}: no device has `mqtt_password_hash` and \
         no [[mqtt_users]] is configured; add credentials (see `stonelion hash-password`) or \
         listen on 127.0.0.1"
    )]
    OpenMqtt { addr: SocketAddr },
    #[error(
        "the HTTP API would accept anyone on {addr}: no [[api_tokens]] is configured; add a \
         token (see `stonelion generate-token`) or listen on 127.0.0.1"
    )]
    OpenApi { addr: SocketAddr },
    #[error(
        "the {} on {} ({}) and the {} on {} ({}) cannot share port {port}; give each listener \
         its own port",
        first.name, first.addr, first.setting, second.name, second.addr, second.setting
    )]
    SharedPort {
        first: NamedListener,
        second: NamedListener,
        port: u16,
    },
}

/// A listener as named in errors: what it is, its address and the settings that choose
/// the address.
#[derive(Clone, Copy, Debug)]
pub struct NamedListener {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub setting: &'static str,
}

/// Rejects open listeners beyond loopback and listeners that share a port, and logs a WARN
/// for each open loopback listener.
///
/// `mqtt_open` is true when no MQTT account is configured.
pub fn check_listeners(config: &Config, mqtt_open: bool) -> Result<(), ListenerError> {
    let listeners = Listeners::of(config, mqtt_open);
    if let Some((_, error)) = listeners.problems().into_iter().next() {
        return Err(error);
    }
    if listeners.mqtt_open {
        tracing::warn!(
            addr = %config.server.mqtt_listen,
            "the MQTT broker is open: any local process can connect and publish to any topic; \
             configure device credentials before listening beyond loopback"
        );
    }
    if listeners.api_open {
        tracing::warn!(
            addr = %config.server.http_listen,
            "the HTTP API is open: any local process can read data and acknowledge alarms; \
             configure [[api_tokens]] before listening beyond loopback"
        );
    }
    Ok(())
}

/// The listen addresses of a config and whether each listener accepts anyone.
#[derive(Clone, Debug)]
pub struct Listeners {
    pub http_listen: SocketAddr,
    pub mqtt_listen: SocketAddr,
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// True when no `[[api_tokens]]` entry is configured.
    pub api_open: bool,
    /// True when no MQTT account (device password or `[[mqtt_users]]`) is configured.
    pub mqtt_open: bool,
}

impl Listeners {
    pub fn of(config: &Config, mqtt_open: bool) -> Self {
        Self {
            http_listen: config.server.http_listen,
            mqtt_listen: config.server.mqtt_listen,
            mqtt_tls_listen: config.mqtt.tls_listen,
            api_open: config.api_tokens.is_empty(),
            mqtt_open,
        }
    }

    /// Returns every open listener beyond loopback and every pair of listeners that share
    /// a port, with the config key of the address to change, such as
    /// `server.http_listen`.
    pub fn problems(&self) -> Vec<(&'static str, ListenerError)> {
        let mut problems = self.shared_ports();
        if self.mqtt_open {
            let listeners = std::iter::once(("server.mqtt_listen", self.mqtt_listen))
                .chain(self.mqtt_tls_listen.map(|addr| ("mqtt.tls_listen", addr)));
            for (key, addr) in listeners {
                if !addr.ip().is_loopback() {
                    problems.push((key, ListenerError::OpenMqtt { addr }));
                }
            }
        }
        if self.api_open && !self.http_listen.ip().is_loopback() {
            problems.push((
                "server.http_listen",
                ListenerError::OpenApi {
                    addr: self.http_listen,
                },
            ));
        }
        problems
    }

    /// Returns a problem for each pair of listeners whose addresses cannot both be bound:
    /// the same port, on the same address or with either on every address of the other's
    /// family. With port 0 the system picks a free port, so port 0 never collides.
    fn shared_ports(&self) -> Vec<(&'static str, ListenerError)> {
        let mut named = vec![
            (
                "server.http_listen",
                NamedListener {
                    name: "HTTP listener",
                    addr: self.http_listen,
                    setting: "[server] http_listen or --http-listen",
                },
            ),
            (
                "server.mqtt_listen",
                NamedListener {
                    name: "MQTT listener",
                    addr: self.mqtt_listen,
                    setting: "[server] mqtt_listen or --mqtt-listen",
                },
            ),
        ];
        if let Some(addr) = self.mqtt_tls_listen {
            named.push((
                "mqtt.tls_listen",
                NamedListener {
                    name: "MQTT over TLS listener",
                    addr,
                    setting: "[mqtt] tls_listen",
                },
            ));
        }
        let mut problems = Vec::new();
        for (i, &(_, first)) in named.iter().enumerate() {
            for &(key, second) in &named[i + 1..] {
                let (a, b) = (first.addr, second.addr);
                if a.port() != 0
                    && a.port() == b.port()
                    && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
                {
                    problems.push((
                        key,
                        ListenerError::SharedPort {
                            first,
                            second,
                            port: a.port(),
                        },
                    ));
                }
            }
        }
        problems
    }
}

/// Whether a listener on `wildcard` takes the port of `addr` too: `0.0.0.0` takes it on
/// every IPv4 address, and `[::]`, which also accepts IPv4 unless the system is set to
/// IPv6 only, on every address.
fn covers(wildcard: SocketAddr, addr: SocketAddr) -> bool {
    wildcard.ip().is_unspecified() && (wildcard.is_ipv6() || addr.is_ipv4())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip() {
        let hash = hash_password("correct horse").expect("hashing works");
        assert!(hash.starts_with("$argon2id$"));
        assert!(check_password_hash(&hash).is_ok());
        assert!(verify_password(b"correct horse", &hash));
        assert!(!verify_password(b"wrong horse", &hash));
    }

    fn listeners(http: &str, mqtt: &str, tls: Option<&str>) -> Listeners {
        Listeners {
            http_listen: http.parse().unwrap(),
            mqtt_listen: mqtt.parse().unwrap(),
            mqtt_tls_listen: tls.map(|addr| addr.parse().unwrap()),
            api_open: false,
            mqtt_open: false,
        }
    }

    #[test]
    fn listeners_on_one_port_are_refused() {
        let problems = listeners("127.0.0.1:8080", "0.0.0.0:1883", Some("0.0.0.0:1883")).problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        let (key, error) = &problems[0];
        assert_eq!(*key, "mqtt.tls_listen");
        let message = error.to_string();
        assert_eq!(
            message,
            "the MQTT listener on 0.0.0.0:1883 ([server] mqtt_listen or --mqtt-listen) and the \
             MQTT over TLS listener on 0.0.0.0:1883 ([mqtt] tls_listen) cannot share port \
             1883; give each listener its own port"
        );

        // `[::]` takes the port on every address, 127.0.0.1 included.
        let problems = listeners("[::]:1883", "127.0.0.1:1883", None).problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, "server.mqtt_listen");
        // All three on one port: each pair is named.
        let problems = listeners("0.0.0.0:9000", "0.0.0.0:9000", Some("0.0.0.0:9000")).problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn listeners_that_can_share_a_port_are_accepted() {
        for (http, mqtt, tls) in [
            ("127.0.0.1:0", "127.0.0.1:0", Some("127.0.0.1:0")),
            ("127.0.0.1:8080", "127.0.0.2:8080", None),
            ("0.0.0.0:8080", "[::1]:8080", None),
            ("127.0.0.1:8080", "127.0.0.1:1883", Some("127.0.0.1:8883")),
        ] {
            let problems = listeners(http, mqtt, tls).problems();
            assert!(problems.is_empty(), "{http} {mqtt} {tls:?}: {problems:?}");
        }
    }

    #[test]
    fn rejects_other_hash_formats() {
        assert!(check_password_hash("plain-text").is_err());
        assert!(check_password_hash("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA").is_err());
    }
}
