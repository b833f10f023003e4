//! The `X-Stonelion-Signature` value: an HMAC-SHA256 of the raw body.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Computes `sha256=<lowercase hex HMAC-SHA256 of body keyed with secret>`.
pub fn signature_header(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_rfc_4231_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let expected = "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";

        assert_eq!(
            signature_header(b"Jefe", b"what do ya want for nothing?"),
            expected
        );
    }
}
