//! JSON decoding that rejects duplicate object keys.
//!
//! `serde_json::Value` keeps the last of two equal keys, so `{"gas_lel": 60, "gas_lel": 1}`
//! would store 1 while a gateway or validator that reads the first key reads 60. Device
//! payloads are decoded with [`UniqueKeys`] instead, which fails on the second key.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A JSON value whose objects, at every depth, have no repeated key.
pub struct UniqueKeys(pub Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(UniqueKeysVisitor)
            .map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("number {value} is not finite")))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        UniqueKeys::deserialize(deserializer).map(|unique| unique.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(de::Error::custom(format!(
                    "duplicate key `{shown}`; send each key once"
                )));
            }
            let UniqueKeys(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> Result<Value, String> {
        serde_json::from_str::<UniqueKeys>(text)
            .map(|unique| unique.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn duplicate_nested_key_rejected() {
        let error = decode(r#"{"values": {"gas_lel": 60, "gas_lel": 1}}"#).unwrap_err();
        assert!(error.contains("duplicate key `gas_lel`"), "{error}");
    }

    #[test]
    fn duplicate_top_level_key_rejected() {
        let error = decode(r#"{"values": {"a": 1}, "values": {"a": 99}}"#).unwrap_err();
        assert!(error.contains("duplicate key `values`"), "{error}");
    }

    #[test]
    fn same_key_in_sibling_objects_accepted() {
        let value = decode(r#"[{"a": 1}, {"a": 2.5, "b": [true, null, "x"]}]"#).unwrap();
        assert_eq!(
            value,
            serde_json::json!([{"a": 1}, {"a": 2.5, "b": [true, null, "x"]}])
        );
    }

    #[test]
    fn numbers_decode_like_serde_json() {
        for text in ["0", "-7", "18446744073709551615", "12.5", "1e-300", "0.1"] {
            let expected: Value = serde_json::from_str(text).unwrap();
            assert_eq!(decode(text).unwrap(), expected, "{text}");
        }
    }
}
