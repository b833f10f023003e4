//! TLS with rustls (ring provider): server configs from PEM files and a listener that
//! yields connections once their handshake has finished.
//!
//! Handshakes run in their own tasks with a deadline, so a client that opens a connection
//! and never finishes its handshake does not delay other clients. Failed handshakes are
//! counted in `stonelion_tls_handshake_failures_total` by listener and reason.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::ClientCertVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;

use crate::metrics::SharedRegistry;

/// Longest time a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once per listener; further connections wait.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// How often one listener logs one kind of handshake failure at WARN. Repeats in between
/// are counted and reported with the next line.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Largest TLS file read: a certificate chain, key or client CA bundle. A system CA
/// bundle such as Debian's `ca-certificates.crt` takes about 220 KB.
pub const MAX_TLS_FILE_BYTES: u64 = 1024 * 1024;

/// Maximum bytes of CA names in one client CA file, each counted with its 2-byte length.
/// The server lists these names in its certificate request. TLS bounds the list at 65,535
/// bytes, and TLS 1.3 puts it in an extension block of at most 65,535 bytes next to the
/// signature algorithms, so this keeps a margin of about 5,000 bytes.
const MAX_CA_NAMES_BYTES: usize = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `reason` ends with the fix.
    #[error("cannot read the TLS file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("the TLS file {0} contains no certificate; write the PEM certificate chain there")]
    NoCertificate(PathBuf),
    #[error(
        "the TLS key file {0} contains no PEM private key; write the key there (a `BEGIN \
         PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY` block)"
    )]
    NoKey(PathBuf),
    #[error(
        "rustls cannot sign with the TLS key {path} ({reason}); use an RSA key of 2048 bits \
         or more, an ECDSA P-256 or P-384 key, or an Ed25519 key"
    )]
    UnsupportedKey { path: PathBuf, reason: String },
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot use the TLS certificate {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error(
        "the TLS key {key} does not belong to the first certificate in {cert}; use the key \
         that the certificate was issued for, and put the server's own certificate first in \
         the chain, before its intermediates"
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "the TLS key {0} is encrypted; write it unencrypted, for example with `openssl pkey \
         -in KEY -out KEY.plain`, and keep the file readable by Stonelion only"
    )]
    EncryptedKey(PathBuf),
    /// `reason` ends with the fix.
    #[error("cannot use the client CA file {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

/// Builds a server config from a PEM certificate chain and key. With `client_ca`, clients
/// must present a certificate signed by one of its certificates. `alpn` lists the
/// application protocols offered, such as `http/1.1`; empty offers none.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates(cert)?;
    let key_path = key;
    let key = read_key(key)?;
    check_key(key.clone_key(), key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| pair_error(e, cert, key_path).1)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The file of a certificate and key pair that [`check_server_files`] found unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairFile {
    Certificate,
    Key,
}

/// Checks that `cert` and `key` make a server config as [`server_config`] builds it: a
/// PEM certificate chain, a PEM private key, and a key that rustls accepts for the chain.
pub fn check_server_files(cert: &Path, key: &Path) -> Result<(), (PairFile, TlsError)> {
    let chain = read_certificates(cert).map_err(|e| (PairFile::Certificate, e))?;
    let key_der = read_key(key).map_err(|e| (PairFile::Key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(chain, key_der)
        })
        .map(drop)
        .map_err(|e| pair_error(e, cert, key))
}

/// Checks a certificate chain file on its own, for a key file that cannot be opened yet.
pub fn check_certificate_file(cert: &Path) -> Result<(), TlsError> {
    read_certificates(cert).map(drop)
}

/// Checks a private key file on its own, for a certificate file that cannot be opened yet:
/// a PEM key of a type that rustls signs with.
pub fn check_key_file(key: &Path) -> Result<(), TlsError> {
    check_key(read_key(key)?, key)
}

/// Checks that rustls can sign with `der`, naming the supported key types when it cannot.
fn check_key(der: PrivateKeyDer<'static>, path: &Path) -> Result<(), TlsError> {
    rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map(drop)
        .map_err(|e| TlsError::UnsupportedKey {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Reads a TLS file whole. Only a regular file of at most [`MAX_TLS_FILE_BYTES`] is read,
/// so that a path naming a FIFO or a device such as `/dev/zero` fails at once instead of
/// blocking the start or filling the memory. UTF-8 byte order marks, which some editors
/// write, are dropped: the PEM reader would otherwise skip the block that follows one.
fn read_tls_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    let mut bytes =
        crate::files::read_limited(path, MAX_TLS_FILE_BYTES).map_err(|e| TlsError::File {
            path: path.to_owned(),
            reason: crate::files::with_fix(&e),
        })?;
    // Files joined with `cat` may have one before each block.
    const BOM: &[u8] = b"\xef\xbb\xbf";
    if bytes.windows(BOM.len()).any(|window| window == BOM) {
        let mut without_marks = Vec::with_capacity(bytes.len());
        let mut rest = &bytes[..];
        while let Some(at) = rest.windows(BOM.len()).position(|window| window == BOM) {
            without_marks.extend_from_slice(&rest[..at]);
            rest = &rest[at + BOM.len()..];
        }
        without_marks.extend_from_slice(rest);
        bytes = without_marks;
    }
    Ok(bytes)
}

/// Reads the first PEM private key of `path`, naming an encrypted key as such: PKCS #8
/// (`ENCRYPTED PRIVATE KEY`) or the traditional format (`Proc-Type: 4,ENCRYPTED`).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_tls_file(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        let encrypted = bytes.windows(b"ENCRYPTED".len()).any(|w| w == b"ENCRYPTED");
        if encrypted {
            TlsError::EncryptedKey(path.to_owned())
        } else if matches!(e, rustls::pki_types::pem::Error::NoItemsFound) {
            TlsError::NoKey(path.to_owned())
        } else {
            TlsError::File {
                path: path.to_owned(),
                reason: format!("{e}; write the key there as PEM"),
            }
        }
    })
}

/// Turns a rustls error about a certificate and key pair into an error that names the
/// file at fault: both files when the key does not fit the certificate, the certificate
/// file when rustls cannot parse the first certificate.
fn pair_error(error: rustls::Error, cert: &Path, key: &Path) -> (PairFile, TlsError) {
    match error {
        rustls::Error::InconsistentKeys(_) => (
            PairFile::Key,
            TlsError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            },
        ),
        rustls::Error::InvalidCertificate(e) => {
            (PairFile::Certificate, certificate_error(cert, &e))
        }
        other => (PairFile::Key, TlsError::Rustls(other)),
    }
}

/// Names a server certificate that webpki cannot parse.
fn certificate_error(path: &Path, error: &rustls::CertificateError) -> TlsError {
    // webpki's reasons, such as `UnsupportedCriticalExtension`, come wrapped in `Other`.
    let reason = match error {
        rustls::CertificateError::Other(other) => other.to_string(),
        error => error.to_string(),
    };
    TlsError::Certificate {
        path: path.to_owned(),
        reason: format!(
            "webpki cannot parse its first certificate ({reason}); use a PEM X.509 version 3 \
             certificate that an ordinary CA or `openssl req -x509` issues, with the server's \
             own certificate first"
        ),
    }
}

/// Checks that `path` is a client CA bundle that [`server_config`] accepts: readable PEM
/// with at least one certificate, each usable as a trust anchor.
pub fn check_client_ca(path: &Path) -> Result<(), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    client_verifier(path, provider).map(drop)
}

/// Builds a verifier that requires a client certificate issued by a CA in `path`.
fn client_verifier(
    path: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let invalid = |reason: String| TlsError::ClientCa {
        path: path.to_owned(),
        reason,
    };
    let write_ca = "write the PEM certificates of the CA that issues the client certificates \
                    there";
    let bytes = read_tls_file(path).map_err(|e| match e {
        TlsError::File { reason, .. } => invalid(reason),
        other => invalid(format!("{other}; {write_ca}")),
    })?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{e}; {write_ca}")))?;
    if certificates.is_empty() {
        return Err(invalid(format!(
            "it contains no PEM certificate; {write_ca}"
        )));
    }
    let mut roots = RootCertStore::empty();
    for (index, certificate) in certificates.into_iter().enumerate() {
        if crate::security::x509::is_version_1(&certificate) {
            return Err(invalid(format!(
                "certificate {} of the file is X.509 version 1, which cannot mark itself as a \
                 CA, so it is not trusted to issue client certificates; issue the CA again as \
                 version 3 with `CA:TRUE`",
                index + 1
            )));
        }
        if crate::security::x509::is_end_entity(&certificate) {
            return Err(invalid(format!(
                "certificate {} of the file is not a CA certificate (its basic constraints \
                 say `CA:FALSE` or are missing), so anyone holding its key could issue client \
                 certificates; a client CA file holds CA certificates only",
                index + 1
            )));
        }
        roots.add(certificate).map_err(|e| {
            invalid(format!(
                "certificate {} of the file: {e}; {write_ca}",
                index + 1
            ))
        })?;
    }
    // The server sends the CA names in its certificate request, in a list of at most
    // 65,535 bytes with a 2-byte length before each name.
    let names: usize = roots
        .subjects()
        .iter()
        .map(|name| name.as_ref().len() + 2)
        .sum();
    if names > MAX_CA_NAMES_BYTES {
        return Err(invalid(format!(
            "its {} CA certificates have {names} bytes of names, over the limit of \
             {MAX_CA_NAMES_BYTES} that keeps the TLS certificate request, which lists them, \
             within its 65,535 bytes; keep only the CAs that issue client certificates",
            roots.len()
        )));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| invalid(format!("{e}; {write_ca}")))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_tls_file(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            path: path.to_owned(),
            reason: format!("{e}; write the certificate chain there as PEM"),
        })?;
    let Some(first) = chain.first() else {
        return Err(TlsError::NoCertificate(path.to_owned()));
    };
    // rustls parses the server's certificate with webpki, which accepts only version 3,
    // and reports a version 1 certificate as an unnamed "other" error.
    if crate::security::x509::is_version_1(first) {
        return Err(TlsError::Certificate {
            path: path.to_owned(),
            reason: "the first certificate is X.509 version 1, and TLS needs version 3; \
                     issue it again with a subjectAltName extension, which makes it version 3"
                .to_owned(),
        });
    }
    if let Err(e) = rustls::server::ParsedCertificate::try_from(first) {
        return Err(match e {
            rustls::Error::InvalidCertificate(e) => certificate_error(path, &e),
            other => TlsError::Rustls(other),
        });
    }
    // webpki reads the dates only when a client verifies the chain, so a date in another
    // form than RFC 5280's would pass here and fail every handshake.
    if let Some(index) = chain
        .iter()
        .position(|certificate| crate::security::x509::validity(certificate).is_none())
    {
        return Err(TlsError::Certificate {
            path: path.to_owned(),
            reason: format!(
                "the validity dates of certificate {} cannot be read as RFC 5280 requires \
                 (UTCTime or GeneralizedTime, to the second, ending in Z), and clients reject \
                 such a certificate; issue it again",
                index + 1
            ),
        });
    }
    Ok(chain)
}

/// The validity period of one certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

/// The validity periods of the certificates in a chain file, the server's own first.
/// Clients reject the chain when any of them is not valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainValidity {
    certificates: Vec<Validity>,
}

impl ChainValidity {
    /// Time before an expiry from which a certificate is reported as expiring soon.
    pub const RENEWAL_NOTICE: TimeDelta = TimeDelta::days(30);

    /// Reads the validity periods of the certificates in `cert`. Returns `None` when the
    /// file cannot be read or parsed, which the other checks report.
    pub fn of_file(cert: &Path) -> Option<ChainValidity> {
        let chain = read_certificates(cert).ok()?;
        let certificates = chain
            .iter()
            .map(|certificate| {
                let (not_before, not_after) = crate::security::x509::validity(certificate)?;
                Some(Validity {
                    not_before,
                    not_after,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(ChainValidity { certificates })
    }

    /// Returns the earliest expiry of the chain, when the first certificate stops working.
    pub fn earliest_expiry(&self) -> Option<DateTime<Utc>> {
        self.certificates.iter().map(|v| v.not_after).min()
    }

    /// Describes what is wrong at `now` with the chain in `cert`. A certificate that is
    /// not valid yet or has expired, which clients reject now, comes before one that
    /// expires within [`Self::RENEWAL_NOTICE`], and the soonest of those comes first.
    pub fn warning(&self, cert: &Path, now: DateTime<Utc>) -> Option<String> {
        let when = |time: DateTime<Utc>| time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let name = |index: usize| {
            if self.certificates.len() == 1 {
                format!("the certificate in {}", cert.display())
            } else {
                format!(
                    "certificate {} of the chain in {}",
                    index + 1,
                    cert.display()
                )
            }
        };
        let certificates = self.certificates.iter().enumerate();
        for (index, validity) in certificates.clone() {
            if now < validity.not_before {
                return Some(format!(
                    "{} is not valid before {}, and clients reject it until then; check this \
                     machine's clock, or install a certificate valid now",
                    name(index),
                    when(validity.not_before)
                ));
            }
            if now > validity.not_after {
                return Some(format!(
                    "{} expired at {}, and clients reject it; install a renewed certificate \
                     and restart Stonelion",
                    name(index),
                    when(validity.not_after)
                ));
            }
        }
        let (index, soonest) = certificates.min_by_key(|(_, validity)| validity.not_after)?;
        let left = soonest.not_after - now;
        (left < Self::RENEWAL_NOTICE).then(|| {
            format!(
                "{} expires at {}, in {}; install a renewed certificate and restart Stonelion, \
                 which reads certificates only at start",
                name(index),
                when(soonest.not_after),
                duration_words(left)
            )
        })
    }
}

/// Writes a positive time span in its largest whole unit: days, hours or minutes.
fn duration_words(span: TimeDelta) -> String {
    let (count, unit) = if span.num_days() > 0 {
        (span.num_days(), "day")
    } else if span.num_hours() > 0 {
        (span.num_hours(), "hour")
    } else {
        (span.num_minutes(), "minute")
    };
    let plural = if count == 1 { "" } else { "s" };
    format!("{count} {unit}{plural}")
}

/// A listener that yields connections whose TLS handshake has finished.
pub struct TlsListener {
    local_addr: SocketAddr,
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener`, handshaking each connection in its own task. `name`
    /// is the listener's label in logs and in `failures`.
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        name: &'static str,
        failures: Arc<HandshakeFailures>,
    ) -> io::Result<TlsListener> {
        let local_addr = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let acceptor = tokio::spawn(accept_loop(listener, acceptor, tx, name, failures));
        Ok(TlsListener {
            local_addr,
            accepted,
            acceptor,
        })
    }

    /// Waits for the next connection that finished its handshake.
    pub async fn next(&mut self) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
        self.accepted.recv().await
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.next().await {
            Some(connection) => connection,
            // The accept loop ended, which it logs; no connection will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    accepted: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    name: &'static str,
    failures: Arc<HandshakeFailures>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let Ok(permit) = pending.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accepting a TLS connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let accepted = accepted.clone();
        let failures = failures.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = accepted.send((tls, peer)).await;
                }
                Ok(Err(e)) => failures.record(name, peer, HandshakeFailure::of(&e), &e),
                Err(_) => {
                    let error = format!("no handshake within {HANDSHAKE_TIMEOUT:?}");
                    failures.record(name, peer, HandshakeFailure::Timeout, &error);
                }
            }
        });
    }
}

/// Reason for a failed TLS handshake, the `reason` label of its counter.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The listener requires a client certificate and the client sent none.
    NoClientCertificate,
    /// The client's certificate is not issued by a configured client CA, has expired, or
    /// is otherwise invalid.
    InvalidClientCertificate,
    /// Any other TLS error, such as plain HTTP sent to the TLS port or a client that does
    /// not trust the server certificate.
    Protocol,
    /// The client closed or reset the connection before finishing the handshake, as a TCP
    /// health check does.
    ConnectionClosed,
    /// The client did not finish its handshake within the deadline.
    Timeout,
}

impl HandshakeFailure {
    /// Classifies the error of a failed `TlsAcceptor::accept`.
    pub fn of(error: &io::Error) -> HandshakeFailure {
        let rustls_error = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match rustls_error {
            Some(rustls::Error::NoCertificatesPresented) => HandshakeFailure::NoClientCertificate,
            Some(rustls::Error::InvalidCertificate(_)) => {
                HandshakeFailure::InvalidClientCertificate
            }
            Some(_) => HandshakeFailure::Protocol,
            None => HandshakeFailure::ConnectionClosed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::NoClientCertificate => "no_client_certificate",
            HandshakeFailure::InvalidClientCertificate => "invalid_client_certificate",
            HandshakeFailure::Protocol => "protocol_error",
            HandshakeFailure::ConnectionClosed => "connection_closed",
            HandshakeFailure::Timeout => "timeout",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

/// Publishes the earliest expiry of each TLS listener's certificate chain, as
/// `stonelion_tls_certificate_expiry_timestamp_seconds{listener}`, so that an alert rule
/// can warn before clients start to fail their handshakes.
pub struct CertificateExpiry {
    expiry: Family<ListenerLabels, Gauge>,
}

impl CertificateExpiry {
    pub fn new(registry: &SharedRegistry) -> Self {
        let expiry = Family::<ListenerLabels, Gauge>::default();
        registry.register(|r| {
            r.register(
                "tls_certificate_expiry_timestamp_seconds",
                "The earliest expiry of each TLS listener's certificate chain, in Unix seconds",
                expiry.clone(),
            );
        });
        Self { expiry }
    }

    /// Publishes the earliest expiry of the chain in `cert` for `listener`, and logs a
    /// warning when a certificate of it is not valid at `now` or expires soon.
    pub fn record(&self, listener: &'static str, cert: &Path, now: DateTime<Utc>) {
        let Some(validity) = ChainValidity::of_file(cert) else {
            return;
        };
        if let Some(expiry) = validity.earliest_expiry() {
            self.expiry
                .get_or_create(&ListenerLabels {
                    listener: listener.to_owned(),
                })
                .set(expiry.timestamp());
        }
        if let Some(warning) = validity.warning(cert, now) {
            tracing::warn!(listener, "{warning}");
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    listener: String,
    reason: String,
}

/// Counts failed TLS handshakes by listener and reason, and logs each listener and reason
/// at WARN at most once per [`LOG_INTERVAL`]. Closed connections are logged at DEBUG only,
/// because TCP health checks close without a handshake.
pub struct HandshakeFailures {
    failed: Family<HandshakeLabels, Counter>,
    /// For each listener and reason, when it was last logged and how many were not logged
    /// since.
    last_logged: Mutex<HashMap<(&'static str, HandshakeFailure), LastLogged>>,
}

/// When a failure was last logged, and how many of the same were counted but not logged
/// since.
type LastLogged = (Instant, u64);

impl HandshakeFailures {
    pub fn new(registry: &SharedRegistry) -> Self {
        let failed = Family::<HandshakeLabels, Counter>::default();
        registry.register(|r| {
            r.register(
                "tls_handshake_failures",
                "TLS handshakes that failed, by listener and reason",
                failed.clone(),
            );
        });
        Self {
            failed,
            last_logged: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a failed handshake and logs it unless the same listener logged the same
    /// reason recently.
    pub fn record(
        &self,
        listener: &'static str,
        peer: SocketAddr,
        reason: HandshakeFailure,
        error: &dyn std::fmt::Display,
    ) {
        self.failed
            .get_or_create(&HandshakeLabels {
                listener: listener.to_owned(),
                reason: reason.as_str().to_owned(),
            })
            .inc();
        if reason == HandshakeFailure::ConnectionClosed {
            tracing::debug!(listener, %peer, error = %error, "TLS connection closed before its handshake finished");
            return;
        }
        let now = Instant::now();
        let mut last = self
            .last_logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = last
            .entry((listener, reason))
            .or_insert((now.checked_sub(LOG_INTERVAL).unwrap_or(now), 0));
        if now.duration_since(entry.0) < LOG_INTERVAL {
            entry.1 += 1;
            return;
        }
        let suppressed = entry.1;
        *entry = (now, 0);
        drop(last);
        tracing::warn!(
            listener,
            %peer,
            reason = reason.as_str(),
            error = %error,
            suppressed_since_last_log = suppressed,
            "TLS handshake failed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validity(now: DateTime<Utc>, before: i64, after: i64) -> Validity {
        Validity {
            not_before: now + TimeDelta::days(before),
            not_after: now + TimeDelta::days(after),
        }
    }

    #[test]
    fn warning_names_the_worst_certificate() {
        let now = Utc::now();
        let path = Path::new("chain.pem");
        // The server's certificate expires in 20 days, its intermediate expired yesterday.
        let chain = ChainValidity {
            certificates: vec![validity(now, -30, 20), validity(now, -400, -1)],
        };
        let warning = chain.warning(path, now).unwrap();
        assert!(
            warning.starts_with("certificate 2 of the chain in chain.pem expired at"),
            "{warning}"
        );
        assert_eq!(chain.earliest_expiry(), Some(now - TimeDelta::days(1)));

        // Both expire soon: the intermediate first.
        let chain = ChainValidity {
            certificates: vec![validity(now, -30, 20), validity(now, -400, 10)],
        };
        let warning = chain.warning(path, now).unwrap();
        assert!(
            warning.starts_with("certificate 2 of the chain in chain.pem expires at"),
            "{warning}"
        );

        let chain = ChainValidity {
            certificates: vec![validity(now, -30, 400), validity(now, 1, 800)],
        };
        let warning = chain.warning(path, now).unwrap();
        assert!(warning.contains("is not valid before"), "{warning}");

        let chain = ChainValidity {
            certificates: vec![validity(now, -30, 31)],
        };
        assert_eq!(chain.warning(path, now), None);
    }

    #[test]
    fn duration_in_largest_whole_unit() {
        assert_eq!(duration_words(TimeDelta::days(3)), "3 days");
        assert_eq!(duration_words(TimeDelta::hours(36)), "1 day");
        assert_eq!(duration_words(TimeDelta::hours(12)), "12 hours");
        assert_eq!(duration_words(TimeDelta::minutes(90)), "1 hour");
        assert_eq!(duration_words(TimeDelta::minutes(30)), "30 minutes");
        assert_eq!(duration_words(TimeDelta::seconds(61)), "1 minute");
    }
}
