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

/// An open listener on an address that other hosts can reach.
#[derive(Debug, thiserror::Error)]
pub enum ExposureError {
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
}

/// Rejects open listeners beyond loopback, and logs a WARN for each open loopback one.
///
/// `mqtt_open` is true when no MQTT account is configured.
pub fn check_exposure(config: &Config, mqtt_open: bool) -> Result<(), ExposureError> {
    let listeners = Listeners::of(config, mqtt_open);
    if let Some((_, error)) = listeners.exposure_problems().into_iter().next() {
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

    /// Returns every open listener beyond loopback, with the config key of its address,
    /// such as `server.http_listen`.
    pub fn exposure_problems(&self) -> Vec<(&'static str, ExposureError)> {
        let mut problems = Vec::new();
        if self.mqtt_open {
            let listeners = std::iter::once(("server.mqtt_listen", self.mqtt_listen))
                .chain(self.mqtt_tls_listen.map(|addr| ("mqtt.tls_listen", addr)));
            for (key, addr) in listeners {
                if !addr.ip().is_loopback() {
                    problems.push((key, ExposureError::OpenMqtt { addr }));
                }
            }
        }
        if self.api_open && !self.http_listen.ip().is_loopback() {
            problems.push((
                "server.http_listen",
                ExposureError::OpenApi {
                    addr: self.http_listen,
                },
            ));
        }
        problems
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

    #[test]
    fn rejects_other_hash_formats() {
        assert!(check_password_hash("plain-text").is_err());
        assert!(check_password_hash("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA").is_err());
    }
}
