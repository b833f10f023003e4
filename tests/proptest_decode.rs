//! Property tests of value decoding: Modbus registers encode and decode back to the same
//! value for every data type and byte order, and MQTT telemetry serialized from random
//! valid values decodes to those values.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use stonelion::ingest::payload::{self, TopicKind};
use stonelion::modbus::decode::{self, Decoded};
use stonelion::model::{MetricName, Timestamp, Value};
use stonelion::profile::{ByteOrder, DataType, Function, Register, RegisterSpec};

const ORDERS: [ByteOrder; 4] = [
    ByteOrder::ABCD,
    ByteOrder::CDAB,
    ByteOrder::BADC,
    ByteOrder::DCBA,
];

fn any_order() -> impl Strategy<Value = ByteOrder> {
    prop::sample::select(ORDERS.to_vec())
}

/// A holding register of `data_type`, checked as a profile's would be.
fn register(
    data_type: DataType,
    order: ByteOrder,
    count: Option<u16>,
    scale: f64,
    offset: f64,
) -> Register {
    let spec = RegisterSpec {
        function: Some(Function::HoldingRegister),
        address: Some(100),
        register: None,
        data_type: Some(data_type),
        count,
        bit: None,
        bits: None,
        order,
        scale,
        offset,
        valid_min: None,
        valid_max: None,
        no_value: Vec::new(),
        codes: BTreeMap::new(),
    };
    spec.check().unwrap()
}

/// A data type with a raw value that the type holds exactly.
fn typed_raw() -> impl Strategy<Value = (DataType, f64)> {
    const EXACT: i64 = 1 << 53;
    prop_oneof![
        any::<u16>().prop_map(|v| (DataType::U16, f64::from(v))),
        any::<i16>().prop_map(|v| (DataType::I16, f64::from(v))),
        any::<u32>().prop_map(|v| (DataType::U32, f64::from(v))),
        any::<i32>().prop_map(|v| (DataType::I32, f64::from(v))),
        (0..EXACT).prop_map(|v| (DataType::U64, v as f64)),
        (-EXACT..EXACT).prop_map(|v| (DataType::I64, v as f64)),
        any::<f32>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| (DataType::F32, f64::from(v))),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| (DataType::F64, v)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn modbus_number_roundtrip((data_type, raw) in typed_raw(), order in any_order()) {
        let register = register(data_type, order, None, 1.0, 0.0);
        let words = decode::encode_words(&register, &Decoded::Number(raw)).unwrap();
        prop_assert_eq!(words.len(), usize::from(register.span));
        let decoded = decode::decode_words(&register, &words).unwrap();
        prop_assert_eq!(decoded, Decoded::Number(raw), "{:?} {:?} words {:04x?}", data_type, order, words);
    }

    #[test]
    fn modbus_orders_differ_only_in_layout((data_type, raw) in typed_raw(), order in any_order()) {
        // The same value in two byte orders is the same bytes, laid out differently.
        let big_endian = register(data_type, ByteOrder::ABCD, None, 1.0, 0.0);
        let reordered = register(data_type, order, None, 1.0, 0.0);
        let expected = decode::encode_words(&big_endian, &Decoded::Number(raw)).unwrap();
        let words = decode::encode_words(&reordered, &Decoded::Number(raw)).unwrap();
        prop_assert_eq!(decode::to_big_endian(order, &words), decode::to_big_endian(ByteOrder::ABCD, &expected));
    }

    #[test]
    fn modbus_scaled_roundtrip(
        (data_type, raw) in typed_raw().prop_filter("an integer type", |(t, _)| !matches!(t, DataType::F32 | DataType::F64)),
        order in any_order(),
        scale in prop::sample::select(vec![0.1, 0.01, 0.5, 2.0, 10.0, -1.0]),
        offset in prop::sample::select(vec![0.0, -40.0, 273.15, 1000.0]),
    ) {
        // Integer registers hold value = raw × scale + offset; encoding rounds back to raw.
        let register = register(data_type, order, None, scale, offset);
        let value = raw * scale + offset;
        let Ok(words) = decode::encode_words(&register, &Decoded::Number(value)) else {
            // Rounding can push a raw value at the type's edge out of range.
            return Ok(());
        };
        let Decoded::Number(decoded) = decode::decode_words(&register, &words).unwrap() else {
            panic!("a number register decoded to something else");
        };
        let tolerance = (value.abs() * 1e-12).max(scale.abs() * 1e-6);
        prop_assert!((decoded - value).abs() <= tolerance, "{:?} {:?}: {} became {}", data_type, order, value, decoded);
    }

    #[test]
    fn modbus_string_roundtrip(text in "[ -~]{0,20}", count in 1u16..=12, order in any_order()) {
        let register = register(DataType::String, order, Some(count), 1.0, 0.0);
        let fits = text.len() <= usize::from(count) * 2;
        match decode::encode_words(&register, &Decoded::Text(text.clone())) {
            Ok(words) => {
                prop_assert!(fits, "text of {} bytes encoded into {} registers", text.len(), count);
                let expected = text.trim_end_matches([' ', '\0']).to_owned();
                prop_assert_eq!(decode::decode_words(&register, &words).unwrap(), Decoded::Text(expected));
            }
            Err(_) => prop_assert!(!fits, "text of {} bytes did not fit {} registers", text.len(), count),
        }
    }

    #[test]
    fn modbus_byte_order_roundtrip(words in prop::collection::vec(any::<u16>(), 0..9), order in any_order()) {
        let bytes = decode::to_big_endian(order, &words);
        prop_assert_eq!(decode::from_big_endian(order, &bytes), words);
    }

    #[test]
    fn modbus_status_bit_roundtrip(word in any::<u16>(), bit in 0u8..16, on in any::<bool>()) {
        let spec = RegisterSpec {
            function: Some(Function::InputRegister),
            address: Some(0),
            register: None,
            data_type: Some(DataType::U16),
            count: None,
            bit: Some(bit),
            bits: None,
            order: ByteOrder::ABCD,
            scale: 1.0,
            offset: 0.0,
            valid_min: None,
            valid_max: None,
            no_value: Vec::new(),
            codes: BTreeMap::new(),
        };
        let register = spec.check().unwrap();
        let word = decode::set_bit(word, bit, on);
        prop_assert_eq!(decode::decode_words(&register, &[word]).unwrap(), Decoded::Bool(on));
    }

    #[test]
    fn modbus_packed_field_roundtrip(
        word in any::<u16>(),
        first in 0u8..16,
        width in 1u8..=16,
        value in any::<u16>(),
        order in any_order(),
    ) {
        let last = (first + width - 1).min(15);
        let value = value >> (15 - (last - first));
        let spec = RegisterSpec {
            function: Some(Function::InputRegister),
            address: Some(0),
            register: None,
            data_type: Some(DataType::U16),
            count: None,
            bit: None,
            bits: Some(vec![first, last]),
            order,
            scale: 1.0,
            offset: 0.0,
            valid_min: None,
            valid_max: None,
            no_value: Vec::new(),
            codes: BTreeMap::new(),
        };
        let register = spec.check().unwrap();
        let mut bank = stonelion::modbus::simulator::RegisterBank::default();
        let stored = if order.swaps_bytes() { word.swap_bytes() } else { word };
        bank.set_words(Function::InputRegister, 0, &[stored]);
        bank.set_value(&register, &Decoded::Number(f64::from(value))).unwrap();
        let words = vec![bank.input_registers[&0]];
        prop_assert_eq!(
            decode::decode_words(&register, &words).unwrap(),
            Decoded::Number(f64::from(value))
        );
        // The bits outside the field keep their value.
        let logical = if order.swaps_bytes() { words[0].swap_bytes() } else { words[0] };
        let width = u32::from(last - first) + 1;
        let outside = !((u16::MAX >> (16 - width)) << first);
        prop_assert_eq!(logical & outside, word & outside);
    }
}

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.-]{1,64}"
}

fn metric_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(Value::Number),
        (-1_000_000i64..1_000_000).prop_map(|v| Value::Number(v as f64)),
    ]
}

/// Whether two values are equal. Numbers must round-trip exactly, which serde_json's
/// `float_roundtrip` feature guarantees.
fn nearly_equal(a: Value, b: Value) -> bool {
    a == b
}

fn json_value(value: Value) -> serde_json::Value {
    match value {
        Value::Bool(b) => serde_json::Value::Bool(b),
        Value::Number(n) => serde_json::json!(n),
    }
}

/// A timestamp and how it is written: epoch milliseconds or an RFC 3339 string.
fn timestamp() -> impl Strategy<Value = Option<(i64, bool)>> {
    // Years 1970 to 2200, within chrono's range for RFC 3339.
    proptest::option::of((0i64..7_258_118_400_000, any::<bool>()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn telemetry_roundtrip(
        ts in timestamp(),
        values in prop::collection::btree_map(id(), metric_value(), 1..40),
    ) {
        let mut object = serde_json::Map::new();
        if let Some((millis, as_text)) = ts {
            let written = if as_text {
                serde_json::Value::String(Timestamp(millis).to_rfc3339())
            } else {
                serde_json::json!(millis)
            };
            object.insert("ts".to_owned(), written);
        }
        let json_values: serde_json::Map<String, serde_json::Value> =
            values.iter().map(|(name, value)| (name.clone(), json_value(*value))).collect();
        object.insert("values".to_owned(), serde_json::Value::Object(json_values));
        let bytes = serde_json::to_vec(&object).unwrap();

        let telemetry = payload::decode_telemetry(&bytes).unwrap();
        prop_assert_eq!(telemetry.ts, ts.map(|(millis, _)| Timestamp(millis)));
        prop_assert!(telemetry.rejected.is_empty(), "valid values rejected: {:?}", telemetry.rejected);
        let decoded: BTreeMap<String, Value> =
            telemetry.values.into_iter().map(|(name, value)| (name.to_string(), value)).collect();
        prop_assert_eq!(decoded.len(), values.len());
        for (name, value) in &values {
            let got = decoded.get(name).copied();
            prop_assert!(got.is_some_and(|got| nearly_equal(got, *value)), "metric {}: sent {:?}, decoded {:?}", name, value, got);
        }
    }

    #[test]
    fn bare_value_roundtrip(value in metric_value()) {
        let text = match value {
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
        };
        let decoded = payload::decode_bare_value(&MetricName::from("gas_lel"), text.as_bytes()).unwrap();
        prop_assert_eq!(decoded, value);
    }

    #[test]
    fn topic_roundtrip(site in id(), device in id(), metric in proptest::option::of(id()), status in any::<bool>()) {
        if status {
            let kind = payload::parse_topic(&format!("status/{site}/{device}")).unwrap();
            prop_assert_eq!(kind, TopicKind::Status { site: site.as_str().into(), device: device.as_str().into() });
        } else {
            let topic = match &metric {
                Some(m) => format!("telemetry/{site}/{device}/{m}"),
                None => format!("telemetry/{site}/{device}"),
            };
            let kind = payload::parse_topic(&topic).unwrap();
            let expected = TopicKind::Telemetry {
                site: site.as_str().into(),
                device: device.as_str().into(),
                metric: metric.as_deref().map(MetricName::from),
            };
            prop_assert_eq!(kind, expected);
        }
    }
}

#[test]
fn telemetry_value_limit() {
    let message = |count: usize| {
        let values: serde_json::Map<String, serde_json::Value> = (0..count)
            .map(|i| (format!("m{i}"), serde_json::json!(i)))
            .collect();
        serde_json::to_vec(&serde_json::json!({ "values": values })).unwrap()
    };
    let accepted = payload::decode_telemetry(&message(payload::MAX_VALUES_PER_MESSAGE)).unwrap();
    assert_eq!(accepted.values.len(), payload::MAX_VALUES_PER_MESSAGE);
    let rejected =
        payload::decode_telemetry(&message(payload::MAX_VALUES_PER_MESSAGE + 1)).unwrap_err();
    assert_eq!(rejected.reason, payload::RejectReason::TooManyValues);
}

#[test]
fn telemetry_float_exact() {
    // Found by `telemetry_roundtrip`: serde_json's default float parser rounds this
    // shortest-form number to its neighbour, 1.141605258645438e-74.
    let sent = 1.141_605_258_645_438_1e-74_f64;
    let payload = format!("{{\"values\": {{\"a\": {sent:?}}}}}");
    let telemetry = payload::decode_telemetry(payload.as_bytes()).unwrap();
    assert_eq!(
        telemetry.values,
        vec![(MetricName::from("a"), Value::Number(sent))]
    );
}
