//! Reading the few fields of a DER X.509 certificate that Stonelion checks itself: the
//! subject common name, the version, the basic constraints and the validity dates.
//! rustls and webpki verify certificates, but do not expose these fields.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};

/// Returns the first common name (OID 2.5.4.3) of a DER certificate's subject.
pub(crate) fn subject_common_name(certificate: &[u8]) -> Option<String> {
    let (_, certificate) = der_element(certificate, 0x30)?;
    let (_, mut tbs) = der_element(certificate, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs, 0xa0)?.0;
    }
    // serialNumber, signature, issuer and validity come before the subject.
    for tag in [0x02, 0x30, 0x30, 0x30] {
        tbs = der_element(tbs, tag)?.0;
    }
    let (_, mut subject) = der_element(tbs, 0x30)?;
    while !subject.is_empty() {
        let (rest, set) = der_element(subject, 0x31)?;
        subject = rest;
        let (_, attribute) = der_element(set, 0x30)?;
        let (value, oid) = der_element(attribute, 0x06)?;
        if oid == [0x55, 0x04, 0x03] {
            return directory_string(value);
        }
    }
    None
}

/// Tells whether a DER certificate is X.509 version 1: its to-be-signed part has no
/// explicit version field. Returns `false` for bytes that are not a certificate.
pub(crate) fn is_version_1(certificate: &[u8]) -> bool {
    der_element(certificate, 0x30)
        .and_then(|(_, certificate)| der_element(certificate, 0x30))
        .is_some_and(|(_, tbs)| tbs.first() != Some(&0xa0))
}

/// Tells whether a DER certificate is not a CA certificate: a CA certificate is version 3
/// with a basic constraints extension that sets `cA` to true (RFC 5280, section 4.2.1.9).
/// A version 1 or 2 certificate has no extensions, so it cannot mark itself as a CA, and
/// a name check cannot tell an old root from a leaf that copies its issuer's name.
/// Returns `false` for bytes that are not a certificate.
pub(crate) fn is_end_entity(certificate: &[u8]) -> bool {
    const BASIC_CONSTRAINTS: [u8; 3] = [0x55, 0x1d, 0x13];
    let Some((_, certificate)) = der_element(certificate, 0x30) else {
        return false;
    };
    let Some((_, mut tbs)) = der_element(certificate, 0x30) else {
        return false;
    };
    if tbs.first() != Some(&0xa0) {
        return true;
    }
    // version, serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    for tag in [0xa0, 0x02, 0x30, 0x30, 0x30, 0x30, 0x30] {
        match der_element(tbs, tag) {
            Some((rest, _)) => tbs = rest,
            None => return false,
        }
    }
    // issuerUniqueID and subjectUniqueID may come before the extensions.
    for tag in [0x81, 0xa1, 0x82, 0xa2] {
        if let Some((rest, _)) = der_element(tbs, tag) {
            tbs = rest;
        }
    }
    let Some(mut extensions) = der_element(tbs, 0xa3)
        .and_then(|(_, wrapped)| der_element(wrapped, 0x30))
        .map(|(_, extensions)| extensions)
    else {
        return true;
    };
    while let Some((rest, extension)) = der_element(extensions, 0x30) {
        extensions = rest;
        let Some((mut value, oid)) = der_element(extension, 0x06) else {
            return false;
        };
        if oid != BASIC_CONSTRAINTS {
            continue;
        }
        if let Some((rest, _critical)) = der_element(value, 0x01) {
            value = rest;
        }
        return der_element(value, 0x04)
            .and_then(|(_, octets)| der_element(octets, 0x30))
            .and_then(|(_, constraints)| der_element(constraints, 0x01))
            .is_none_or(|(_, ca)| ca.iter().all(|byte| *byte == 0));
    }
    true
}

/// Returns the validity period of a DER certificate, `notBefore` and `notAfter`. Returns
/// `None` for bytes that are not a certificate.
pub(crate) fn validity(certificate: &[u8]) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (_, certificate) = der_element(certificate, 0x30)?;
    let (_, mut tbs) = der_element(certificate, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs, 0xa0)?.0;
    }
    // serialNumber, signature and issuer come before the validity.
    for tag in [0x02, 0x30, 0x30] {
        tbs = der_element(tbs, tag)?.0;
    }
    let (_, validity) = der_element(tbs, 0x30)?;
    let (rest, not_before) = time(validity)?;
    let (_, not_after) = time(rest)?;
    Some((not_before, not_after))
}

/// Reads an X.509 Time (RFC 5280, section 4.1.2.5): a UTCTime `YYMMDDHHMMSSZ`, whose
/// years 50 to 99 are in the 1900s, or a GeneralizedTime `YYYYMMDDHHMMSSZ`. Nothing else
/// is accepted: no fractions, offsets, spaces or leap seconds, as in webpki.
fn time(input: &[u8]) -> Option<(&[u8], DateTime<Utc>)> {
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;

    let tag = *input.first()?;
    let (rest, value) = der_element(input, tag)?;
    let (zone, digits) = value.split_last()?;
    if *zone != b'Z' || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let number = |range: std::ops::Range<usize>| {
        digits[range]
            .iter()
            .fold(0u32, |n, digit| n * 10 + u32::from(digit - b'0'))
    };
    let (year, fields) = match (tag, digits.len()) {
        (UTC_TIME, 12) => {
            let year = number(0..2);
            (if year >= 50 { 1900 + year } else { 2000 + year }, 2)
        }
        (GENERALIZED_TIME, 14) => (number(0..4), 4),
        _ => return None,
    };
    let field = |n: usize| number(fields + 2 * n..fields + 2 * n + 2);
    let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, field(0), field(1))?;
    let time = NaiveTime::from_hms_opt(field(2), field(3), field(4))?;
    Some((rest, NaiveDateTime::new(date, time).and_utc()))
}

/// Decodes an X.520 DirectoryString (RFC 5280, section 4.1.2.4). Returns `None` for a
/// TeletexString, whose T.61 character set has no agreed mapping to Unicode, and for
/// bytes that are invalid in their string type.
fn directory_string(value: &[u8]) -> Option<String> {
    const UTF8_STRING: u8 = 0x0c;
    const PRINTABLE_STRING: u8 = 0x13;
    const IA5_STRING: u8 = 0x16;
    const UNIVERSAL_STRING: u8 = 0x1c;
    const BMP_STRING: u8 = 0x1e;

    let tag = *value.first()?;
    let (_, bytes) = der_element(value, tag)?;
    match tag {
        UTF8_STRING => String::from_utf8(bytes.to_vec()).ok(),
        PRINTABLE_STRING | IA5_STRING if bytes.is_ascii() => String::from_utf8(bytes.to_vec()).ok(),
        // UCS-2, read as UTF-16 big-endian.
        BMP_STRING if bytes.len() % 2 == 0 => {
            let units = bytes
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        // UTF-32 big-endian.
        UNIVERSAL_STRING if bytes.len() % 4 == 0 => bytes
            .chunks_exact(4)
            .map(|quad| char::from_u32(u32::from_be_bytes([quad[0], quad[1], quad[2], quad[3]])))
            .collect(),
        _ => None,
    }
}

/// Splits a DER element with tag `tag` off `input`, returning the rest and its content.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let first = *input.get(1)?;
    let (length, header) = if first & 0x80 == 0 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let bytes = input.get(2..2 + count)?;
        (
            bytes
                .iter()
                .fold(0usize, |length, b| (length << 8) | usize::from(*b)),
            2 + count,
        )
    };
    let end = header.checked_add(length)?;
    Some((input.get(end..)?, input.get(header..end)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(is_ca: rcgen::IsCa) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["device".to_owned()]).unwrap();
        params.is_ca = is_ca;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn tells_ca_certificates_from_end_entities() {
        let ca = certificate(rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
        assert!(!is_end_entity(&ca));
        assert!(is_end_entity(&certificate(rcgen::IsCa::NoCa)));
        assert!(is_end_entity(&certificate(rcgen::IsCa::ExplicitNoCa)));
        assert!(!is_end_entity(b"not a certificate"));
        assert!(!is_version_1(&ca));

        // Version 1 certificates made with `openssl x509 -req`: self-signed, and issued by
        // a CA. Neither can be a CA.
        let self_signed = pem_der(VERSION_1_SELF_SIGNED);
        assert!(is_version_1(&self_signed));
        assert!(
            is_end_entity(&self_signed),
            "a version 1 root cannot say it is a CA"
        );
        let issued = pem_der(VERSION_1_ISSUED);
        assert!(is_version_1(&issued));
        assert!(is_end_entity(&issued), "a version 1 leaf is not a CA");
    }

    const VERSION_1_SELF_SIGNED: &str = include_str!("../../tests/data/version-1-self-signed.pem");
    const VERSION_1_ISSUED: &str = include_str!("../../tests/data/version-1-issued.pem");

    fn pem_der(pem: &str) -> Vec<u8> {
        use tokio_rustls::rustls::pki_types::CertificateDer;
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn reads_validity_in_both_time_forms() {
        let key = rcgen::KeyPair::generate().unwrap();
        // rcgen writes UTCTime for years 1950 to 2049 and GeneralizedTime otherwise.
        for (before, after) in [((1999, 12, 31), (2049, 1, 2)), ((2030, 6, 1), (2050, 3, 4))] {
            let mut params = rcgen::CertificateParams::new(vec!["device".to_owned()]).unwrap();
            params.not_before = rcgen::date_time_ymd(before.0, before.1, before.2);
            params.not_after = rcgen::date_time_ymd(after.0, after.1, after.2);
            let der = params.self_signed(&key).unwrap().der().to_vec();
            let generalized = der.windows(2).any(|w| w == [0x18, 15]);
            assert_eq!(generalized, after.0 >= 2050, "time form for {after:?}");
            let (not_before, not_after) = validity(&der).unwrap();
            assert_eq!(
                not_before.format("%Y-%m-%d").to_string(),
                format!("{:04}-{:02}-{:02}", before.0, before.1, before.2)
            );
            assert_eq!(
                not_after.format("%Y-%m-%d").to_string(),
                format!("{:04}-{:02}-{:02}", after.0, after.1, after.2)
            );
        }
        assert!(validity(b"not a certificate").is_none());
    }

    #[test]
    fn reads_only_rfc_5280_times() {
        let read = |tag: u8, text: &str| {
            let mut der = vec![tag, u8::try_from(text.len()).unwrap()];
            der.extend(text.as_bytes());
            time(&der).map(|(_, time)| time.to_rfc3339())
        };
        assert_eq!(
            read(0x17, "491231235959Z").as_deref(),
            Some("2049-12-31T23:59:59+00:00")
        );
        assert_eq!(
            read(0x17, "500101000000Z").as_deref(),
            Some("1950-01-01T00:00:00+00:00")
        );
        assert_eq!(
            read(0x18, "21000101000000Z").as_deref(),
            Some("2100-01-01T00:00:00+00:00")
        );
        for (tag, text) in [
            (0x18, "20301231235960Z"),
            (0x18, "20301231 235959Z"),
            (0x18, " 20301231235959Z"),
            (0x17, "30 1231235959Z"),
            (0x18, "20301231235959.5Z"),
            (0x18, "20301231235959+0000"),
            (0x18, "20301231235959z"),
            (0x18, "20300230000000Z"),
            (0x17, "3012312359Z"),
            (0x17, "20301231235959Z"),
            (0x04, "301231235959Z"),
        ] {
            assert_eq!(read(tag, text), None, "{tag:#x} {text:?}");
        }
    }
}
