//! One function per fuzz target. Each takes arbitrary bytes, feeds them to a decoder or
//! parser, and panics when the code under test panics or breaks an invariant that holds
//! for every input.
//!
//! `tests/fuzz_corpus.rs` includes this file too, so keep it to dependencies that both
//! the fuzz crate and the main package's tests have.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use stonelion::ingest::auth::{
    LoginPolicy, MqttAccounts, MqttDenials, MqttIdentity, SharedAccounts,
};
use stonelion::ingest::guard::{GuardPolicy, GuardedV4};
use stonelion::ingest::line_protocol::{self, Precision};
use stonelion::ingest::login::FailureLimits;
use stonelion::ingest::payload::{self, TopicKind};
use stonelion::ingest::takeover::{ClientIds, TakeoverLimits};
use stonelion::modbus::decode::{self, Decoded};
use stonelion::model::{MetricName, Timestamp, Value};
use stonelion::profile::{ByteOrder, DataType, Function, ProfileSet, RegisterSpec};
use stonelion::storage::sqlite::SqliteStore;
use stonelion::storage::{Point, SeriesKey, TimeSeriesStore};

/// A fixed "now" for inputs without timestamps, so a run does not depend on the clock.
const NOW: Timestamp = Timestamp(1_767_225_600_000);

/// MQTT topic and payload: the first line is the topic, the rest is the payload.
pub fn mqtt_payload(data: &[u8]) {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (topic, body) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let topic = String::from_utf8_lossy(topic);
    if let Ok(kind) = payload::parse_topic(&topic) {
        assert_eq!(
            topic_string(&kind),
            topic,
            "a parsed topic must print back as itself"
        );
    }

    // Every decoder runs on every payload, whatever the topic, for coverage.
    if let Ok(telemetry) = payload::decode_telemetry(body) {
        let total = telemetry.values.len() + telemetry.rejected.len();
        assert!(total >= 1, "an accepted message has at least one value");
        assert!(
            total <= payload::MAX_VALUES_PER_MESSAGE,
            "{total} values accepted"
        );
        for (name, value) in &telemetry.values {
            assert_finite(*value, name.as_str());
        }
    }
    let metric = MetricName::from("gas_lel");
    if let Ok(value) = payload::decode_bare_value(&metric, body) {
        assert_finite(value, "bare value");
    }
    let _ = payload::decode_status(body);
}

fn topic_string(kind: &TopicKind) -> String {
    match kind {
        TopicKind::Telemetry {
            site,
            device,
            metric: None,
        } => format!("telemetry/{site}/{device}"),
        TopicKind::Telemetry {
            site,
            device,
            metric: Some(metric),
        } => {
            format!("telemetry/{site}/{device}/{metric}")
        }
        TopicKind::Status { site, device } => format!("status/{site}/{device}"),
    }
}

fn assert_finite(value: Value, what: &str) {
    if let Value::Number(n) = value {
        assert!(n.is_finite(), "{what} decoded to the non-finite number {n}");
    }
}

/// Line-protocol body: the first byte picks the precision, the rest is the body.
pub fn line_protocol(data: &[u8]) {
    let Some((first, rest)) = data.split_first() else {
        return;
    };
    let precisions = [
        Precision::Nanoseconds,
        Precision::Microseconds,
        Precision::Milliseconds,
        Precision::Seconds,
        Precision::Minutes,
        Precision::Hours,
    ];
    let precision = precisions[usize::from(*first) % precisions.len()];
    let Ok(body) = std::str::from_utf8(rest) else {
        return;
    };

    let parsed = line_protocol::parse_body(body, precision, NOW);
    let lines = u64::try_from(body.split('\n').count()).unwrap_or(u64::MAX);
    assert!(
        parsed.lines_accepted + parsed.lines_rejected <= lines,
        "{} accepted and {} rejected lines from {lines} lines",
        parsed.lines_accepted,
        parsed.lines_rejected
    );
    assert!(
        parsed.points.len() as u64 >= parsed.lines_accepted,
        "an accepted line yields a point"
    );
    let rejected_anything = parsed.lines_rejected > 0 || parsed.string_fields_skipped > 0;
    assert_eq!(
        parsed.first_error.is_some(),
        rejected_anything,
        "first_error is set exactly when something was rejected"
    );
}

struct QueryService {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _dir: tempfile::TempDir,
}

/// Limits of the fuzzed `/query` router. The store contains 120 points, so only the bucket
/// limit matters. The router's clock is fixed at [`NOW`], and the points fall in the
/// minute before it. A query may still name a wide time range, and with the default
/// limit of 1,000,000 a `GROUP BY time(1s)` over a year takes seconds in a fuzz build. A
/// low limit keeps each input fast, reaches the same fill and window code, and reaches
/// the limit's error path too.
const FUZZ_QUERY_LIMITS: stonelion::api::influxql::QueryLimits =
    stonelion::api::influxql::QueryLimits {
        max_series: 1_000,
        max_points: 100_000,
        max_buckets: 10_000,
    };

/// Returns a `/query` router over a small store, built once per process.
fn query_service() -> &'static QueryService {
    static SERVICE: OnceLock<QueryService> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = SqliteStore::open(dir.path(), Duration::from_millis(10)).expect("store opens");
        let tags = |device: &str| {
            vec![
                ("site".to_owned(), "plant-a".to_owned()),
                ("device".to_owned(), device.to_owned()),
                ("site_kind".to_owned(), "enterprise".to_owned()),
            ]
        };
        let mut points = Vec::new();
        for i in 0..60i32 {
            let ts = Timestamp(NOW.0 - 60_000 + i64::from(i) * 1_000);
            let value = Value::Number(f64::from(i % 17) * 3.5);
            points.push(Point {
                series: SeriesKey::new("gas-detector", tags("gas-01"), "gas_lel"),
                ts,
                value,
            });
            let value = Value::Bool(i % 5 == 0);
            points.push(Point {
                series: SeriesKey::new("smoke-detector", tags("smoke-01"), "smoke"),
                ts,
                value,
            });
        }
        store.write(points).expect("points write");
        store.flush().expect("points flush");
        let store: Arc<dyn TimeSeriesStore> = Arc::new(store);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime");
        QueryService {
            runtime,
            router: stonelion::api::influxql::router_with_clock(store, FUZZ_QUERY_LIMITS, || {
                NOW.0 * 1_000_000
            }),
            _dir: dir,
        }
    })
}

/// InfluxQL query text, sent to `/query` as the `q` parameter with `db=stonelion`.
pub fn influxql(data: &[u8]) {
    use tower::ServiceExt as _;

    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let service = query_service();
    let params =
        serde_urlencoded::to_string([("db", "stonelion"), ("q", query)]).expect("query encodes");
    let request = axum::http::Request::get(format!("/query?{params}"))
        .body(axum::body::Body::empty())
        .expect("request builds");
    let response = service
        .runtime
        .block_on(service.router.clone().oneshot(request))
        .expect("the router is infallible");
    let status = response.status();
    // A 500 means the evaluation task panicked; every bad query is a 400.
    assert!(
        status == 200 || status == 400,
        "query {query:?} returned {status}"
    );
}

/// Modbus register description and reply: the first bytes pick the description, the rest
/// are the register words.
pub fn modbus_decode(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let types = [
        DataType::Bool,
        DataType::U16,
        DataType::I16,
        DataType::U32,
        DataType::I32,
        DataType::U64,
        DataType::I64,
        DataType::F32,
        DataType::F64,
        DataType::String,
    ];
    let functions = [
        Function::Coil,
        Function::DiscreteInput,
        Function::InputRegister,
        Function::HoldingRegister,
    ];
    let orders = [
        ByteOrder::ABCD,
        ByteOrder::CDAB,
        ByteOrder::BADC,
        ByteOrder::DCBA,
    ];
    let spec = RegisterSpec {
        function: Some(functions[usize::from(head[0] & 3)]),
        address: Some(u16::from_be_bytes([head[1], head[2]])),
        register: None,
        data_type: Some(types[usize::from(head[3]) % types.len()]),
        count: (head[4] & 0x80 != 0).then_some(u16::from(head[4] & 0x7f)),
        bit: (head[5] & 0x80 != 0).then_some(head[5] & 0x1f),
        bits: (head[5] & 0x40 != 0)
            .then(|| vec![head[5] & 0x0f, (head[5] & 0x0f) + (head[6] >> 4)]),
        order: orders[usize::from(head[6] & 3)],
        scale: [1.0, 0.1, -0.01, 10.0, 1e-300, 1e300][usize::from(head[7] & 7) % 6],
        offset: [0.0, -40.0, 273.15, 1e308][usize::from(head[7] >> 3 & 3)],
        valid_min: (head[7] & 0x20 != 0).then_some(-1000.0),
        valid_max: (head[7] & 0x40 != 0).then_some(1000.0),
        no_value: if head[7] & 0x80 != 0 {
            vec![65535.0, -32768.0]
        } else {
            Vec::new()
        },
        codes: Default::default(),
    };
    let words: Vec<u16> = rest
        .chunks(2)
        .map(|p| u16::from_be_bytes([p[0], p.get(1).copied().unwrap_or(0)]))
        .collect();
    let bits: Vec<bool> = rest.iter().map(|b| b & 1 == 1).collect();

    for order in orders {
        let bytes = decode::to_big_endian(order, &words);
        assert_eq!(
            decode::from_big_endian(order, &bytes),
            words,
            "byte order {order:?} does not round-trip"
        );
    }
    let Ok(register) = spec.check() else { return };
    if register.function.is_bit() {
        let _ = decode::decode_bit(&bits);
        return;
    }
    match decode::decode_words(&register, &words) {
        Ok(Decoded::Number(n)) => assert!(n.is_finite(), "{register:?} decoded {words:?} to {n}"),
        Ok(Decoded::Bool(_) | Decoded::Text(_)) | Err(_) => {}
    }
}

/// Server config text, checked against the built-in profiles.
pub fn config(data: &[u8]) {
    static BUILTIN: OnceLock<ProfileSet> = OnceLock::new();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let builtin = BUILTIN
        .get_or_init(stonelion::config::builtin::builtin_profiles)
        .clone();
    if let Err(problems) = stonelion::config::parse(text, builtin) {
        assert!(
            !problems.is_empty(),
            "a rejected config names at least one problem"
        );
    }
}

/// Device profile text.
pub fn profile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = stonelion::profile::parse(text, None) {
        assert!(
            !errors.is_empty(),
            "a rejected profile names at least one error"
        );
    }
}

/// Returns a current-thread tokio runtime, built once per process.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

/// Checks the first bytes that a client sends to the MQTT over TLS relay when client
/// certificates are required: the relay reads one packet and takes the CONNECT username
/// from it. Whenever rumqttd's MQTT 3.1.1 decoder reads the same packet as a CONNECT, its
/// username must be the relay's, because the relay checks the relay's username against the
/// certificate and the broker logs in with rumqttd's.
pub fn mqtt_connect(data: &[u8]) {
    use rumqttd::protocol::Protocol as _;
    use stonelion::fuzzing;

    // The relay's parser must not panic on any bytes, read as a whole packet or not.
    let _ = fuzzing::connect_username(data);

    let mut reader = data;
    let Ok(packet) = runtime().block_on(fuzzing::read_connect_packet(&mut reader)) else {
        return;
    };
    assert!(
        data.starts_with(&packet),
        "the packet is a prefix of the input"
    );
    assert!(
        packet.len() <= 5 + fuzzing::MAX_CONNECT_BYTES,
        "a packet of {} bytes was read",
        packet.len()
    );
    if let Ok(header) = rumqttd::protocol::v4::check(data.iter(), usize::MAX) {
        assert_eq!(
            packet.len(),
            header.frame_length(),
            "the relay and rumqttd frame the packet differently"
        );
    }

    // NOTE: rumqttd 0.20's MQTT 5 decoder is no reference: it reads a property past the
    // declared properties length, and panics (`unreachable!`) on a CONNACK. The broker
    // decodes MQTT 3.1.1 only, so a level 5 CONNECT never logs in.
    let username = fuzzing::connect_username(&packet);
    let mut stream = bytes::BytesMut::from(&packet[..]);
    let decoded = rumqttd::protocol::v4::V4.read_mut(&mut stream, usize::MAX);
    if let Ok(rumqttd::protocol::Packet::Connect(_, _, _, _, login)) = decoded {
        let broker_username = login.map(|login| login.username).unwrap_or_default();
        assert_eq!(
            username.unwrap_or_default(),
            broker_username,
            "the relay and rumqttd read different usernames"
        );
    }
}

/// DER certificate bytes for the relay's subject common name (CN) extraction. The same
/// bytes also describe a certificate for rcgen to issue: the first byte picks the CN's
/// ASN.1 string type and the attributes around the CN, the rest is the CN. The issued
/// certificate's CN must read back as itself, and never as the issuer's CN.
pub fn certificate_common_name(data: &[u8]) {
    use rcgen::{
        BmpString, CertificateParams, DistinguishedName, DnType, DnValue, Ia5String,
        PrintableString, UniversalString,
    };
    use stonelion::fuzzing;

    let _ = fuzzing::subject_common_name(data);

    let Some((choice, rest)) = data.split_first() else {
        return;
    };
    let Ok(common_name) = std::str::from_utf8(rest) else {
        return;
    };
    let value = match choice & 0b111 {
        0..=2 => DnValue::Utf8String(common_name.to_owned()),
        // NOTE: rcgen 0.13.2 accepts '?' in a PrintableString, as X.680 allows, but the
        // yasna 0.5.2 writer it calls panics on it, so such names are skipped.
        3 if common_name.contains('?') => return,
        3 => match PrintableString::try_from(common_name) {
            Ok(value) => DnValue::PrintableString(value),
            Err(_) => return,
        },
        4 => match Ia5String::try_from(common_name) {
            Ok(value) => DnValue::Ia5String(value),
            Err(_) => return,
        },
        5 | 6 => match BmpString::try_from(common_name) {
            Ok(value) => DnValue::BmpString(value),
            Err(_) => return,
        },
        _ => match UniversalString::try_from(common_name) {
            Ok(value) => DnValue::UniversalString(value),
            Err(_) => return,
        },
    };
    let mut subject = DistinguishedName::new();
    if choice & 0b1000 != 0 {
        subject.push(DnType::CountryName, "CN");
    }
    if choice & 0b1_0000 != 0 {
        subject.push(DnType::OrganizationName, "Plant A");
    }
    subject.push(DnType::CommonName, value);
    if choice & 0b10_0000 != 0 {
        subject.push(DnType::OrganizationalUnitName, "safety");
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    if choice & 0b100_0000 != 0 {
        params.serial_number = Some(vec![0x80; 20].into());
    }
    let (ca, ca_key) = fuzz_ca();
    let certificate = params
        .signed_by(ca_key, ca, ca_key)
        .expect("rcgen issues the certificate");
    assert_eq!(
        fuzzing::subject_common_name(certificate.der()).as_deref(),
        Some(common_name),
        "the CN does not read back (string type {})",
        choice & 0b111
    );
}

/// Returns a CA certificate and its key pair, generated once per process.
fn fuzz_ca() -> &'static (rcgen::Certificate, rcgen::KeyPair) {
    static CA: OnceLock<(rcgen::Certificate, rcgen::KeyPair)> = OnceLock::new();
    CA.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key pair");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "issuer-ca");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let certificate = params.self_signed(&key).expect("CA certificate");
        (certificate, key)
    })
}

/// Bytes at the start of the guard's read buffer. Whenever rumqttd decodes them as a
/// PUBLISH, `PublishHeader::peek` must return that PUBLISH's QoS and packet id, because
/// the guard acknowledges a denied QoS 1 or 2 publish with that packet id.
pub fn publish_header(data: &[u8]) {
    use rumqttd::protocol::{Packet, Protocol as _};
    use stonelion::fuzzing;

    let peeked = fuzzing::publish_header(data);
    let mut stream = bytes::BytesMut::from(data);
    let Ok(Packet::Publish(publish, _)) =
        rumqttd::protocol::v4::V4.read_mut(&mut stream, usize::MAX)
    else {
        return;
    };
    let payload_len = publish.payload.len();
    let mut encoded = bytes::BytesMut::new();
    rumqttd::protocol::v4::V4
        .write(Packet::Publish(publish, None), &mut encoded)
        .expect("rumqttd encodes the PUBLISH it decoded");
    // rumqttd writes the packet id, if any, right before the payload.
    let qos = (encoded[0] >> 1) & 0b11;
    let pkid = if qos == 0 {
        0
    } else {
        let at = encoded.len() - payload_len - 2;
        u16::from_be_bytes([encoded[at], encoded[at + 1]])
    };
    assert_eq!(
        peeked,
        Some((qos, pkid)),
        "peek disagrees with rumqttd's decoder"
    );
}

/// Builds the guard's policy once per process. Its accounts are devices gas-01 and gas-02
/// with passwords and a viewer of plant-a. A device may publish 2 messages and then about one every 11 days, so the rate
/// limit denies the third publish of a run without depending on the clock.
fn guard_policy() -> &'static Arc<GuardPolicy> {
    static POLICY: OnceLock<Arc<GuardPolicy>> = OnceLock::new();
    POLICY.get_or_init(|| {
        let hash = stonelion::security::hash_password("fuzz").expect("argon2 hash");
        let text = format!(
            "[[sites]]\nid = \"plant-a\"\nname = \"Plant A\"\nkind = \"enterprise\"\n\n\
             [[devices]]\nid = \"gas-01\"\nsite = \"plant-a\"\nprofile = \"gas-detector\"\n\
             mqtt_password_hash = \"{hash}\"\n\n\
             [[devices]]\nid = \"gas-02\"\nsite = \"plant-a\"\nprofile = \"gas-detector\"\n\
             mqtt_password_hash = \"{hash}\"\n\n\
             [[mqtt_users]]\nusername = \"viewer\"\npassword_hash = \"{hash}\"\nsites = [\"plant-a\"]\n"
        );
        let builtin = stonelion::config::builtin::builtin_profiles();
        let config = stonelion::config::parse(&text, builtin).expect("the guard's config is valid");
        let registry = stonelion::metrics::SharedRegistry::new();
        // Failed-login and takeover limits are off, so that one input gives the same
        // result whatever inputs ran before it.
        let backoff = Duration::from_secs(60);
        Arc::new(GuardPolicy {
            accounts: SharedAccounts::new(MqttAccounts::from_config(&config)),
            denials: Arc::new(MqttDenials::new(&registry)),
            max_messages_per_second: 1e-6,
            max_burst_messages: 2,
            login: LoginPolicy::new(FailureLimits {
                max_failures: 0,
                backoff,
            }),
            clients: Arc::new(ClientIds::new(
                TakeoverLimits {
                    max_per_minute: 0,
                    backoff,
                },
                &registry,
            )),
        })
    })
}

/// Maximum remaining length of a packet that the guard target decodes, in bytes.
const GUARD_MAX_PACKET: usize = 64 * 1024;

/// Reads the bytes one MQTT client sends through the guard as rumqttd reads them. The
/// first CONNECT is the one rumqttd authenticates, so the target takes its username as
/// logged in. Every PUBLISH and SUBSCRIBE filter that the guard passes on must be allowed
/// for that account, and the guard's own replies must be valid packets that acknowledge
/// packets the client sent.
pub fn mqtt_guard(data: &[u8]) {
    use rumqttd::protocol::{Packet, PingResp, Protocol as _, QoS, SubAck, SubscribeReasonCode};

    let policy = guard_policy();
    let mut guard = GuardedV4::new(policy.clone());
    let mut stream = bytes::BytesMut::from(data);
    let mut logged_in: Option<Option<MqttIdentity>> = None;
    // Packet ids of the PUBLISH packets and the SUBSCRIBE packets read so far, which the
    // guard's replies may acknowledge.
    let mut publish_ids = HashSet::new();
    let mut subscriptions = HashMap::new();

    // Each read consumes at least one packet, so the input bounds the loop too.
    for _ in 0..256 {
        let start = data.len() - stream.len();
        let result = guard.read_mut(&mut stream, GUARD_MAX_PACKET);
        let consumed = &data[start..data.len() - stream.len()];
        let mut raw = bytes::BytesMut::from(consumed);
        while !raw.is_empty() {
            if let Some((_, pkid)) = stonelion::fuzzing::publish_header(&raw) {
                publish_ids.insert(pkid);
            }
            match rumqttd::protocol::v4::V4.read_mut(&mut raw, GUARD_MAX_PACKET) {
                Ok(Packet::Subscribe(subscribe, _)) => {
                    subscriptions.insert(subscribe.pkid, subscribe.filters);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let Ok(packet) = result else {
            return;
        };
        let identity = |logged_in: &Option<Option<MqttIdentity>>| logged_in.clone().flatten();
        match &packet {
            Packet::Connect(_, _, _, _, login) if logged_in.is_none() => {
                let username = login.as_ref().map_or("", |login| login.username.as_str());
                logged_in = Some(policy.accounts.load().identity(username).cloned());
            }
            Packet::Publish(publish, _) => {
                let topic = String::from_utf8_lossy(&publish.topic);
                assert!(
                    identity(&logged_in).is_some_and(|id| id.may_publish(&topic)),
                    "the guard passed a publish to {topic:?} from {logged_in:?}"
                );
            }
            Packet::Subscribe(subscribe, _) => {
                for filter in &subscribe.filters {
                    assert!(
                        identity(&logged_in).is_some_and(|id| id.may_subscribe(&filter.path)),
                        "the guard passed a subscription to {:?} from {logged_in:?}",
                        filter.path
                    );
                }
            }
            _ => {}
        }

        // The broker's response to the packet goes out through the guard, behind the
        // guard's own replies.
        let answer = match packet {
            Packet::Subscribe(subscribe, _) => Packet::SubAck(
                SubAck {
                    pkid: subscribe.pkid,
                    return_codes: vec![
                        SubscribeReasonCode::Success(QoS::AtMostOnce);
                        subscribe.filters.len()
                    ],
                },
                None,
            ),
            _ => Packet::PingResp(PingResp),
        };
        let mut output = bytes::BytesMut::new();
        guard
            .write(answer, &mut output)
            .expect("the guard writes its replies");
        while !output.is_empty() {
            let reply = rumqttd::protocol::v4::V4
                .read_mut(&mut output, usize::MAX)
                .expect("the guard's output decodes");
            match reply {
                Packet::PubAck(ack, _) => assert!(publish_ids.contains(&ack.pkid)),
                Packet::PubRec(rec, _) => assert!(publish_ids.contains(&rec.pkid)),
                Packet::PubComp(_, _) | Packet::PingResp(_) => {}
                Packet::SubAck(ack, _) => {
                    let filters = subscriptions
                        .get(&ack.pkid)
                        .expect("a SUBACK acknowledges a SUBSCRIBE that was read");
                    assert_eq!(
                        ack.return_codes.len(),
                        filters.len(),
                        "a SUBACK has one return code per requested filter"
                    );
                    for (code, filter) in ack.return_codes.iter().zip(filters) {
                        let allowed =
                            identity(&logged_in).is_some_and(|id| id.may_subscribe(&filter.path));
                        assert_eq!(
                            *code != SubscribeReasonCode::Failure,
                            allowed,
                            "return code {code:?} for the filter {:?}",
                            filter.path
                        );
                    }
                }
                other => panic!("the guard wrote an unexpected {other:?}"),
            }
        }
    }
}
