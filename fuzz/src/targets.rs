//! One function per fuzz target. Each takes arbitrary bytes, feeds them to a decoder or
//! parser, and panics when the code under test panics or breaks an invariant that holds
//! for every input.
//!
//! `tests/fuzz_corpus.rs` includes this file too, so keep it to dependencies that both
//! the fuzz crate and the main package's tests have.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use stonelion::ingest::line_protocol::{self, Precision};
use stonelion::ingest::payload::{self, TopicKind};
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
            router: stonelion::api::influxql::router(store),
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
        bits: (head[5] & 0x40 != 0).then_some([head[5] & 0x0f, (head[5] & 0x0f) + (head[6] >> 4)]),
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
