//! The MQTT over TLS listener: terminates TLS and relays each connection to the broker's
//! plain listener, which checks credentials and topics as for any other client.
//!
//! The relay reads each client's CONNECT before it relays anything. With client
//! certificates required, the CONNECT username must equal the certificate's subject
//! common name (CN), so a device's certificate works only with that device's account.
//!
//! The relay is the one place that receives a client's source address, so it limits failed
//! logins per source: a login the broker closes without CONNACK is a failure, and after
//! `[mqtt] max_failed_logins` of them in a row the source's logins are denied for
//! `failed_login_backoff`, unless the credential is in the verified-login cache.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::tls::{HandshakeFailures, TlsListener};
use super::x509::subject_common_name;
use crate::ingest::auth::DenyReason;
use crate::ingest::guard::GuardPolicy;
use crate::ingest::login::FailureOutcome;

/// Maximum time between the end of a client's handshake and its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum time the broker may take to reply to a CONNECT. During a login flood a login
/// that is not in the verified-login cache waits for a password-check slot.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Maximum size of a CONNECT packet that the relay reads, in bytes.
pub(crate) const MAX_CONNECT_BYTES: usize = 64 * 1024;

/// Checks that the relay runs before it relays a connection.
pub struct RelayPolicy {
    /// The broker's accounts, verified-login cache, failed-login limits and denials.
    pub guard: Arc<GuardPolicy>,
    /// Requires the CONNECT username to equal the client certificate's CN.
    pub bind_certificates: bool,
}

/// Serves MQTT over TLS on `listener`, relaying to the plain listener at `broker`.
pub fn spawn(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    broker: SocketAddr,
    policy: RelayPolicy,
    failures: Arc<HandshakeFailures>,
    stop: CancellationToken,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let addr = listener.local_addr()?;
    let mut listener = TlsListener::new(listener, config, "mqtt-tls", failures)?;
    let broker = relay_target(broker);
    let policy = Arc::new(policy);
    let task = tokio::spawn(async move {
        loop {
            let (client, peer) = tokio::select! {
                () = stop.cancelled() => break,
                next = listener.next() => match next {
                    Some(connection) => connection,
                    None => break,
                },
            };
            tokio::spawn(relay(client, peer, broker, policy.clone()));
        }
    });
    Ok((addr, task))
}

async fn relay(
    mut client: TlsStream<TcpStream>,
    peer: SocketAddr,
    broker: SocketAddr,
    policy: Arc<RelayPolicy>,
) {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut client)).await;
    let Ok(Ok(connect)) = connect else { return };
    let login = ConnectLogin::parse(&connect);
    let guard = &policy.guard;
    let source = peer.ip();
    let client_id = login.as_ref().map_or("", |l| l.client_id.as_str());
    let username = login.as_ref().and_then(|l| l.username.as_deref());
    // Shown in log lines; "(none)" cannot be confused with a username in quotes.
    let shown_username = username.map_or_else(|| "(none)".to_owned(), |u| format!("{u:?}"));

    if let Some(remaining) = guard
        .login
        .sources
        .backoff_remaining(&source, Instant::now())
        && !login.as_ref().is_some_and(|l| l.is_verified(guard))
    {
        let subject = format!(
            "source {source}, username {shown_username}, {} s of backoff left after repeated \
             failed logins",
            remaining.as_secs().max(1)
        );
        guard
            .denials
            .deny(DenyReason::LoginBackoff, client_id, &subject);
        return;
    }
    if policy.bind_certificates {
        let common_name = client
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| subject_common_name(c));
        if username.is_none() || username != common_name.as_deref() {
            let shown_name = common_name
                .as_deref()
                .map_or_else(|| "(none)".to_owned(), |n| format!("{n:?}"));
            let subject =
                format!("source {peer}, certificate CN {shown_name}, username {shown_username}");
            guard
                .denials
                .deny(DenyReason::CertificateMismatch, client_id, &subject);
            return;
        }
    }

    let mut upstream = match TcpStream::connect(broker).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::warn!(%peer, %broker, error = %e, "cannot relay an MQTT over TLS connection to the broker");
            return;
        }
    };
    if upstream.write_all(&connect).await.is_err() {
        return;
    }
    let connack = tokio::time::timeout(CONNACK_TIMEOUT, read_packet(&mut upstream)).await;
    let Ok(connack) = connack else { return };
    let accepted = connack
        .as_ref()
        .is_ok_and(|packet| packet.first() == Some(&0x20) && packet.get(3) == Some(&0));
    let now = Instant::now();
    if accepted {
        guard.login.sources.record_success(&source, now);
    } else if !guard.accounts.is_open() {
        let outcome = guard.login.sources.record_failure(&source, now);
        if outcome == FailureOutcome::BackoffStarted {
            let backoff = guard.login.sources.limits().backoff;
            let subject = format!(
                "source {source}, username {shown_username}, failed logins reached the limit; \
                 denied for {}",
                humantime::format_duration(backoff)
            );
            guard
                .denials
                .log(DenyReason::LoginBackoff, client_id, &subject);
        }
    }
    let Ok(connack) = connack else { return };
    if client.write_all(&connack).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Reads one whole MQTT packet: the fixed header and its remaining length.
pub(crate) async fn read_packet<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
    let mut packet = vec![stream.read_u8().await?];
    let mut remaining = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = stream.read_u8().await?;
        packet.push(byte);
        remaining |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    if remaining > MAX_CONNECT_BYTES {
        let message = format!(
            "MQTT packet of {remaining} bytes exceeds the relay's maximum of {MAX_CONNECT_BYTES} \
             bytes for CONNECT and CONNACK"
        );
        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
    }
    let header = packet.len();
    packet.resize(header + remaining, 0);
    stream.read_exact(&mut packet[header..]).await?;
    Ok(packet)
}

/// Returns the username of an MQTT 3.1.1 or 5 CONNECT packet, or `None` for another
/// packet, a CONNECT that does not parse, or one without a username.
pub(crate) fn connect_username(packet: &[u8]) -> Option<String> {
    ConnectLogin::parse(packet)?.username
}

/// Client id and credentials of a CONNECT packet.
struct ConnectLogin {
    client_id: String,
    username: Option<String>,
    password: Option<Vec<u8>>,
}

impl ConnectLogin {
    /// Parses an MQTT 3.1.1 or 5 CONNECT packet; `None` for another packet or a CONNECT
    /// that does not parse.
    fn parse(packet: &[u8]) -> Option<ConnectLogin> {
        if packet.first()? >> 4 != 1 {
            return None;
        }
        let mut at = 1;
        while packet.get(at)? & 0x80 != 0 {
            at += 1;
        }
        let mut reader = Reader {
            bytes: packet,
            at: at + 1,
        };
        reader.string()?;
        let level = reader.byte()?;
        let flags = reader.byte()?;
        reader.skip(2)?;
        if level == 5 {
            let length = reader.varint()?;
            reader.skip(length)?;
        }
        let client_id = String::from_utf8(reader.string()?.to_vec()).ok()?;
        if flags & 0x04 != 0 {
            if level == 5 {
                let length = reader.varint()?;
                reader.skip(length)?;
            }
            reader.string()?;
            reader.string()?;
        }
        let username = if flags & 0x80 != 0 {
            Some(String::from_utf8(reader.string()?.to_vec()).ok()?)
        } else {
            None
        };
        let password = if flags & 0x40 != 0 {
            Some(reader.string()?.to_vec())
        } else {
            None
        };
        Some(ConnectLogin {
            client_id,
            username,
            password,
        })
    }

    /// Returns whether these credentials are in the verified-login cache.
    fn is_verified(&self, guard: &GuardPolicy) -> bool {
        let (Some(username), Some(password)) = (&self.username, &self.password) else {
            return false;
        };
        guard
            .accounts
            .load()
            .password_hash(username)
            .is_some_and(|hash| guard.login.verified.contains(username, hash, password))
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn skip(&mut self, count: usize) -> Option<()> {
        self.at = self
            .at
            .checked_add(count)
            .filter(|end| *end <= self.bytes.len())?;
        Some(())
    }

    /// Reads a two-byte length and that many bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let length = usize::from(u16::from_be_bytes([self.byte()?, self.byte()?]));
        let start = self.at;
        self.skip(length)?;
        self.bytes.get(start..self.at)
    }

    fn varint(&mut self) -> Option<usize> {
        let mut value = 0usize;
        for shift in [0, 7, 14, 21] {
            let byte = self.byte()?;
            value |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

/// Returns the address to reach a listener on: its own, or loopback for a wildcard bind.
fn relay_target(broker: SocketAddr) -> SocketAddr {
    match broker.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], broker.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, broker.port()))
        }
        _ => broker,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_connect_login() {
        // MQTT 3.1.1 CONNECT: client id "c", username "gas-01", password "pw".
        let mut packet = vec![0x10, 0];
        packet.extend([0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 60]);
        packet.extend([0, 1, b'c', 0, 6]);
        packet.extend(b"gas-01");
        packet.extend([0, 2, b'p', b'w']);
        packet[1] = u8::try_from(packet.len() - 2).unwrap_or(0);
        let login = ConnectLogin::parse(&packet).unwrap();
        assert_eq!(login.client_id, "c");
        assert_eq!(login.username.as_deref(), Some("gas-01"));
        assert_eq!(login.password.as_deref(), Some(&b"pw"[..]));
        packet[9] = 0x02;
        let login = ConnectLogin::parse(&packet).unwrap();
        assert_eq!(login.username, None, "no username flag");
        assert_eq!(login.password, None, "no password flag");
        assert!(ConnectLogin::parse(&[0x30, 0]).is_none(), "not a CONNECT");
    }
}
