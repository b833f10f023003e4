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
use std::net::{IpAddr, SocketAddr};

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

/// A listener setting that `run` rejects: an open listener on an address that other hosts
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
    #[error(transparent)]
    SharedPort(Box<SharedPort>),
}

impl From<SharedPort> for ListenerError {
    fn from(shared: SharedPort) -> Self {
        Self::SharedPort(Box::new(shared))
    }
}

/// A listener as named in errors: what it is, its address, the settings that choose the
/// address, and the config key to report a problem on.
#[derive(Clone, Copy, Debug)]
pub struct NamedListener {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub setting: &'static str,
    pub key: &'static str,
}

/// Two listeners that cannot both be bound.
#[derive(Debug, thiserror::Error)]
#[error(
    "the {} on {} ({}) and the {} on {} ({}) cannot share port {port}; give each listener its \
     own port",
    first.name, first.addr, first.setting, second.name, second.addr, second.setting
)]
pub struct SharedPort {
    pub first: NamedListener,
    pub second: NamedListener,
    pub port: u16,
}

/// Returns each pair of `listeners` that cannot both be bound: the same port,
/// on the same address or with one on every address of the other's family. With port 0
/// the system picks a free port, so port 0 never collides. `ipv6_only` is true when a
/// listener on `[::]` accepts IPv6 only (see [`ipv6_only`]).
pub fn shared_ports(listeners: &[NamedListener], ipv6_only: bool) -> Vec<SharedPort> {
    let mut errors = Vec::new();
    for (i, &first) in listeners.iter().enumerate() {
        for &second in &listeners[i + 1..] {
            // An IPv4-mapped address such as `[::ffff:127.0.0.1]` binds its IPv4 address.
            let (a, b) = (
                first.addr.ip().to_canonical(),
                second.addr.ip().to_canonical(),
            );
            let port = first.addr.port();
            if port != 0
                && port == second.addr.port()
                && (a == b || covers(a, b, ipv6_only) || covers(b, a, ipv6_only))
            {
                errors.push(SharedPort {
                    first,
                    second,
                    port,
                });
            }
        }
    }
    errors
}

/// Returns whether a listener on `wildcard` takes the port of `addr` too: `0.0.0.0` takes it on
/// every IPv4 address, and `[::]` on every IPv6 address and, unless the system makes
/// IPv6 sockets accept IPv6 only, every IPv4 address too.
fn covers(wildcard: IpAddr, addr: IpAddr, ipv6_only: bool) -> bool {
    wildcard.is_unspecified()
        && (wildcard.is_ipv6() == addr.is_ipv6() || (wildcard.is_ipv6() && !ipv6_only))
}

/// Returns whether new IPv6 sockets on this system accept IPv6 only (Linux's
/// `net.ipv6.bindv6only`, off by default), so that `[::]` leaves IPv4 ports free.
pub fn ipv6_only() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|value| value.trim() == "1")
}

/// The settings that choose the HTTP listener's address.
pub const HTTP_LISTEN_SETTING: &str =
    "[server] http_listen, --http-listen or STONELION_HTTP_LISTEN";
/// The settings that choose the MQTT listener's address.
pub const MQTT_LISTEN_SETTING: &str =
    "[server] mqtt_listen, --mqtt-listen or STONELION_MQTT_LISTEN";
/// The setting that chooses the MQTT over TLS listener's address.
pub const MQTT_TLS_LISTEN_SETTING: &str = "[mqtt] tls_listen";

/// Returns the fix for a listener that could not bind its address, which `setting`
/// chooses.
pub fn bind_fix(error: &std::io::Error, setting: &str) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::AddrInUse => {
            format!("another process holds the port; stop it or change {setting}")
        }
        ErrorKind::AddrNotAvailable => {
            format!("the address is not one of this host's; change {setting}")
        }
        ErrorKind::PermissionDenied => format!(
            "ports below net.ipv4.ip_unprivileged_port_start (1024 by default) need the \
             CAP_NET_BIND_SERVICE capability; grant it or change {setting}"
        ),
        _ => format!("this system cannot listen on the address; change {setting}"),
    }
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
    /// Whether `[::]` leaves IPv4 ports free; see [`ipv6_only`].
    pub ipv6_only: bool,
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
            ipv6_only: ipv6_only(),
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
                if !addr.ip().to_canonical().is_loopback() {
                    problems.push((key, ListenerError::OpenMqtt { addr }));
                }
            }
        }
        if self.api_open && !self.http_listen.ip().to_canonical().is_loopback() {
            problems.push((
                "server.http_listen",
                ListenerError::OpenApi {
                    addr: self.http_listen,
                },
            ));
        }
        problems
    }

    /// Returns a problem for each pair of listeners that cannot both be bound, with the
    /// config key of the second.
    fn shared_ports(&self) -> Vec<(&'static str, ListenerError)> {
        shared_ports(&self.named(), self.ipv6_only)
            .into_iter()
            .map(|shared| (shared.second.key, shared.into()))
            .collect()
    }

    /// Returns the listeners as named in errors.
    pub fn named(&self) -> Vec<NamedListener> {
        let mut named = vec![
            NamedListener {
                name: "HTTP listener",
                addr: self.http_listen,
                setting: HTTP_LISTEN_SETTING,
                key: "server.http_listen",
            },
            NamedListener {
                name: "MQTT listener",
                addr: self.mqtt_listen,
                setting: MQTT_LISTEN_SETTING,
                key: "server.mqtt_listen",
            },
        ];
        if let Some(addr) = self.mqtt_tls_listen {
            named.push(NamedListener {
                name: "MQTT over TLS listener",
                addr,
                setting: MQTT_TLS_LISTEN_SETTING,
                key: "mqtt.tls_listen",
            });
        }
        named
    }
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
            ipv6_only: false,
            api_open: false,
            mqtt_open: false,
        }
    }

    fn named(addr: SocketAddr) -> NamedListener {
        NamedListener {
            name: "listener",
            addr,
            setting: "test",
            key: "test",
        }
    }

    #[test]
    fn listeners_on_one_port_rejected() {
        let problems = listeners("127.0.0.1:8080", "0.0.0.0:1883", Some("0.0.0.0:1883")).problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        let (key, error) = &problems[0];
        assert_eq!(*key, "mqtt.tls_listen");
        assert_eq!(
            error.to_string(),
            "the MQTT listener on 0.0.0.0:1883 ([server] mqtt_listen, --mqtt-listen or \
             STONELION_MQTT_LISTEN) and the MQTT over TLS listener on 0.0.0.0:1883 ([mqtt] \
             tls_listen) cannot share port 1883; give each listener its own port"
        );
        // All three on one port: each pair is named.
        let problems = listeners("0.0.0.0:9000", "0.0.0.0:9000", Some("0.0.0.0:9000")).problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn shared_ports_of_wildcards_and_mapped_addresses() {
        // (first, second, collides with IPv4 accepted on `[::]`, collides when IPv6 only)
        let cases = [
            ("0.0.0.0:1883", "127.0.0.1:1883", true, true),
            ("[::]:1883", "127.0.0.1:1883", true, false),
            ("[::]:1883", "0.0.0.0:1883", true, false),
            ("[::]:1883", "[::1]:1883", true, true),
            ("0.0.0.0:1883", "[::1]:1883", false, false),
            ("[::ffff:127.0.0.1]:1883", "127.0.0.1:1883", true, true),
            ("[::ffff:0.0.0.0]:1883", "127.0.0.1:1883", true, true),
            ("[::ffff:127.0.0.1]:1883", "[::1]:1883", false, false),
            ("127.0.0.1:1883", "127.0.0.2:1883", false, false),
            ("127.0.0.1:0", "127.0.0.1:0", false, false),
        ];
        for (first, second, dual_stack, v6_only) in cases {
            let pair = [
                named(first.parse().unwrap()),
                named(second.parse().unwrap()),
            ];
            assert_eq!(
                !shared_ports(&pair, false).is_empty(),
                dual_stack,
                "{first} {second}"
            );
            assert_eq!(
                !shared_ports(&pair, true).is_empty(),
                v6_only,
                "{first} {second}"
            );
        }
    }

    /// Compares the check with what the system does, on loopback addresses only.
    #[test]
    fn shared_ports_agree_with_binds_on_loopback() {
        let addresses = ["127.0.0.1", "127.0.0.2", "[::1]", "[::ffff:127.0.0.1]"];
        for first in addresses {
            for second in addresses {
                let occupied = std::net::TcpListener::bind(format!("{first}:0"))
                    .unwrap_or_else(|e| panic!("cannot bind {first}: {e}"));
                let port = occupied.local_addr().unwrap().port();
                let a: SocketAddr = format!("{first}:{port}").parse().unwrap();
                let b: SocketAddr = format!("{second}:{port}").parse().unwrap();
                let binds = std::net::TcpListener::bind(b).is_ok();
                let refused = !shared_ports(&[named(a), named(b)], ipv6_only()).is_empty();
                assert_eq!(refused, !binds, "{a} then {b}");
            }
        }
    }

    #[test]
    fn listeners_that_can_share_a_port_are_accepted() {
        for (http, mqtt, tls) in [
            ("127.0.0.1:0", "127.0.0.1:0", Some("127.0.0.1:0")),
            ("127.0.0.1:8080", "127.0.0.2:8080", None),
            ("127.0.0.1:8080", "127.0.0.1:1883", Some("127.0.0.1:8883")),
        ] {
            let problems = listeners(http, mqtt, tls).problems();
            assert!(problems.is_empty(), "{http} {mqtt} {tls:?}: {problems:?}");
        }
    }

    #[test]
    fn bind_fix_follows_the_cause() {
        use std::io::{Error, ErrorKind};
        let fix = |kind| bind_fix(&Error::from(kind), MQTT_TLS_LISTEN_SETTING);
        assert_eq!(
            fix(ErrorKind::AddrInUse),
            "another process holds the port; stop it or change [mqtt] tls_listen"
        );
        assert!(fix(ErrorKind::AddrNotAvailable).starts_with("the address is not one"));
        assert!(fix(ErrorKind::PermissionDenied).contains("CAP_NET_BIND_SERVICE"));
        assert!(fix(ErrorKind::InvalidInput).ends_with("change [mqtt] tls_listen"));
    }

    #[test]
    fn mapped_loopback_counts_as_loopback() {
        let mut open = listeners("[::ffff:127.0.0.1]:8080", "[::ffff:127.0.0.1]:1883", None);
        open.api_open = true;
        open.mqtt_open = true;
        assert!(open.problems().is_empty(), "{:?}", open.problems());
        open.http_listen = "[::ffff:10.0.0.1]:8080".parse().unwrap();
        assert_eq!(open.problems().len(), 1);
    }

    #[test]
    fn rejects_other_hash_formats() {
        assert!(check_password_hash("plain-text").is_err());
        assert!(check_password_hash("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA").is_err());
    }
}
