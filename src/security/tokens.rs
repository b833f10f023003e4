//! HTTP API bearer tokens: each has a name, a role and the SHA-256 of its secret.
//!
//! Tokens are high-entropy random strings (`stonelion generate-token` makes 256-bit ones),
//! so one SHA-256 is enough to store them: unlike passwords they cannot be guessed from a
//! dictionary, and a cheap hash keeps every request fast.

use rand::RngCore as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Role of an API token. Each role allows what the roles before it allow, except `writer`,
/// which may only write points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads devices, series, alarms, metrics and InfluxQL queries.
    Viewer,
    /// A viewer that also acknowledges, closes and resets alarms.
    Operator,
    /// An operator that may also write points, reload the config and create, replace or
    /// delete devices through the API.
    Admin,
    /// Writes line protocol to `/write` and `/api/v2/write` only, for collectors such as
    /// Telegraf.
    Writer,
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    Read,
    AlarmAction,
    Write,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Writer => "writer",
        }
    }

    pub fn allows(self, permission: Permission) -> bool {
        match permission {
            Permission::Read => matches!(self, Role::Viewer | Role::Operator | Role::Admin),
            Permission::AlarmAction => matches!(self, Role::Operator | Role::Admin),
            Permission::Write => matches!(self, Role::Writer | Role::Admin),
            Permission::Admin => self == Role::Admin,
        }
    }
}

/// `[[api_tokens]]` as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenSpec {
    /// Name recorded as the actor of every alarm action taken with the token, such as
    /// `duty-officer-li` or `grafana`.
    pub name: String,
    /// `viewer`, `operator`, `admin` or `writer`.
    pub role: Role,
    /// Hex SHA-256 of the token, as printed by `stonelion generate-token` or
    /// `stonelion hash-token`.
    pub token_sha256: String,
}

impl std::fmt::Debug for ApiTokenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTokenSpec")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// A checked API token.
#[derive(Clone)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl ApiTokenSpec {
    /// Checks the digest, returning the token or a message for `token_sha256`.
    pub fn check(&self) -> Result<ApiToken, String> {
        let invalid = || {
            "`token_sha256` must be 64 hex digits; write what `stonelion hash-token` prints"
                .to_owned()
        };
        let bytes = hex::decode(self.token_sha256.trim()).map_err(|_| invalid())?;
        let digest: [u8; 32] = bytes.try_into().map_err(|_| invalid())?;
        Ok(ApiToken {
            name: self.name.clone(),
            role: self.role,
            digest,
        })
    }
}

/// The configured tokens.
#[derive(Clone, Debug, Default)]
pub struct TokenSet {
    tokens: Vec<ApiToken>,
}

impl TokenSet {
    pub fn new(tokens: Vec<ApiToken>) -> Self {
        Self { tokens }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Returns the token whose digest matches `secret`. Every configured digest is compared
    /// in constant time, so the timing shows neither which token matched nor how much.
    pub fn find(&self, secret: &str) -> Option<&ApiToken> {
        let digest = token_digest(secret);
        let mut found = None;
        for token in &self.tokens {
            if super::constant_time_eq(&token.digest, &digest) {
                found = Some(token);
            }
        }
        found
    }
}

/// Returns the SHA-256 of a token.
pub fn token_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.trim().as_bytes()).into()
}

/// Generates a token of 32 random bytes, written as 64 hex digits.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_token_by_secret() {
        let secret = generate_token();
        let spec = ApiTokenSpec {
            name: "ops".to_owned(),
            role: Role::Operator,
            token_sha256: hex::encode(token_digest(&secret)),
        };
        let set = TokenSet::new(vec![spec.check().expect("valid digest")]);
        assert_eq!(set.find(&secret).map(|t| t.name.as_str()), Some("ops"));
        assert!(set.find("not-the-token").is_none());
    }

    #[test]
    fn role_permissions() {
        assert!(Role::Viewer.allows(Permission::Read));
        assert!(!Role::Viewer.allows(Permission::AlarmAction));
        assert!(Role::Operator.allows(Permission::AlarmAction));
        assert!(!Role::Operator.allows(Permission::Write));
        assert!(!Role::Writer.allows(Permission::Read));
        assert!(Role::Writer.allows(Permission::Write));
        assert!(Role::Admin.allows(Permission::Admin));
    }
}
