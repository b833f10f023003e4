//! Entry points for the fuzz targets in `fuzz/` and for `tests/fuzz_corpus.rs`, to
//! hand-written parsers that are private to their modules. Not a stable API.

use std::io;

use tokio::io::AsyncRead;

/// Maximum remaining length of the CONNECT packet that the MQTT over TLS relay reads.
pub const MAX_CONNECT_BYTES: usize = crate::security::mqtt_tls::MAX_CONNECT_BYTES;

/// Reads one MQTT packet as the MQTT over TLS relay reads a client's CONNECT.
pub async fn read_connect_packet<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
    crate::security::mqtt_tls::read_packet(stream).await
}

/// Returns the username of a CONNECT packet as the MQTT over TLS relay reads it.
pub fn connect_username(packet: &[u8]) -> Option<String> {
    crate::security::mqtt_tls::connect_username(packet)
}

/// Returns the subject common name of a DER certificate as the MQTT over TLS relay
/// reads it.
pub fn subject_common_name(certificate: &[u8]) -> Option<String> {
    crate::security::x509::subject_common_name(certificate)
}

/// Returns the QoS and packet id that the MQTT guard reads from the PUBLISH at the start
/// of `stream`, or `None` when it reads no PUBLISH header there.
pub fn publish_header(stream: &[u8]) -> Option<(u8, u16)> {
    crate::ingest::guard::PublishHeader::peek(stream).map(|header| (header.qos, header.pkid))
}
