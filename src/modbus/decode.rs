//! Pure conversions between Modbus registers and metric values, with no I/O and no server
//! state, so an edge binary can reuse them.

use std::fmt;

use crate::profile::{ByteOrder, DataType, Register};

/// A value decoded from a device.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    Bool(bool),
    Number(f64),
    /// Text such as a serial number or firmware version; it is not a time-series reading.
    Text(String),
}

/// Why registers did not yield a good value. None of these is ever stored as a reading.
#[derive(Clone, Debug, PartialEq)]
pub enum DecodeError {
    /// The reply carried fewer registers or bits than the value spans.
    Short { needed: usize, got: usize },
    /// The raw value is one of the device's "no value" sentinels.
    NoValue { raw: f64 },
    /// The scaled value is outside the profile's valid range.
    OutOfRange {
        value: f64,
        min: Option<f64>,
        max: Option<f64>,
    },
    /// A float register holds NaN or an infinity, or scaling overflowed to one.
    NotFinite,
    /// A string register holds bytes that are not UTF-8.
    InvalidText,
}

impl DecodeError {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Short { .. } => "short_reply",
            DecodeError::NoValue { .. } => "no_value",
            DecodeError::OutOfRange { .. } => "out_of_range",
            DecodeError::NotFinite => "not_finite",
            DecodeError::InvalidText => "invalid_text",
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Short { needed, got } => {
                write!(f, "reply has {got} values where {needed} were requested")
            }
            DecodeError::NoValue { raw } => {
                write!(f, "raw value {raw} is the device's no-value marker")
            }
            DecodeError::OutOfRange { value, min, max } => {
                let bound = |b: &Option<f64>| b.map_or_else(|| "-".to_owned(), |v| v.to_string());
                write!(
                    f,
                    "value {value} is outside the valid range {}..{}",
                    bound(min),
                    bound(max)
                )
            }
            DecodeError::NotFinite => {
                f.write_str("value is NaN or infinite; check the register type and scale")
            }
            DecodeError::InvalidText => f.write_str("string registers are not valid UTF-8"),
        }
    }
}

/// Decodes a coil or discrete input from the bits of a reply, `bits[0]` being the register's
/// own address.
pub fn decode_bit(bits: &[bool]) -> Result<Decoded, DecodeError> {
    bits.first()
        .map(|b| Decoded::Bool(*b))
        .ok_or(DecodeError::Short { needed: 1, got: 0 })
}

/// Decodes a register metric from `words`, which start at the register's address.
pub fn decode_words(register: &Register, words: &[u16]) -> Result<Decoded, DecodeError> {
    let needed = usize::from(register.span);
    let words = words.get(..needed).ok_or(DecodeError::Short {
        needed,
        got: words.len(),
    })?;
    if register.data_type == DataType::String {
        return decode_text(register.order, words);
    }
    let mut raw = raw_value(register.data_type, register.order, words)?;
    if let Some((first, last)) = register.bits {
        // As for `bit`, the field is taken after the byte order is undone, and `bits`
        // needs type u16, so `raw` is a whole number from 0 to 65535.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let word = raw as u16;
        raw = f64::from(field_value(word, first, last));
    }
    if register.no_value.contains(&raw) {
        return Err(DecodeError::NoValue { raw });
    }
    if let Some(bit) = register.bit {
        // Bit N of the register value after the device's byte order is undone, so a BADC or
        // DCBA status word reads the same bits as the ABCD word of the same value.
        // `bit` needs type u16 or bool, so `raw` is a whole number from 0 to 65535.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let word = raw as u16;
        return Ok(Decoded::Bool(word >> bit & 1 == 1));
    }
    let value = raw * register.scale + register.offset;
    // A large scale or offset can overflow a finite raw value to infinity.
    if !value.is_finite() {
        return Err(DecodeError::NotFinite);
    }
    let below = register.valid_min.is_some_and(|min| value < min);
    let above = register.valid_max.is_some_and(|max| value > max);
    if below || above {
        return Err(DecodeError::OutOfRange {
            value,
            min: register.valid_min,
            max: register.valid_max,
        });
    }
    Ok(Decoded::Number(value))
}

/// Puts the bytes of `words` in big-endian order, undoing the device's byte and word order.
pub fn to_big_endian(order: ByteOrder, words: &[u16]) -> Vec<u8> {
    let mut ordered: Vec<u16> = words.to_vec();
    if order.swaps_words() {
        ordered.reverse();
    }
    ordered
        .iter()
        .flat_map(|w| {
            if order.swaps_bytes() {
                w.to_le_bytes()
            } else {
                w.to_be_bytes()
            }
        })
        .collect()
}

/// Lays big-endian `bytes` out as registers in the device's byte and word order.
pub fn from_big_endian(order: ByteOrder, bytes: &[u8]) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|pair| {
            let pair = [pair[0], pair.get(1).copied().unwrap_or(0)];
            if order.swaps_bytes() {
                u16::from_le_bytes(pair)
            } else {
                u16::from_be_bytes(pair)
            }
        })
        .collect();
    if order.swaps_words() {
        words.reverse();
    }
    words
}

/// The raw value before scaling. Integers are exact up to 2^53, which covers every counter
/// of the shipped profiles; larger 64-bit integers lose their lowest bits.
fn raw_value(data_type: DataType, order: ByteOrder, words: &[u16]) -> Result<f64, DecodeError> {
    let width = usize::from(data_type.words().unwrap_or(1));
    // A 16-bit value has no word order, so only the byte swap applies to it.
    let bytes = to_big_endian(order, &words[..width]);
    let array = |n: usize| -> [u8; 8] {
        let mut buf = [0u8; 8];
        buf[8 - n..].copy_from_slice(&bytes[..n]);
        buf
    };
    let raw = match data_type {
        DataType::Bool | DataType::U16 => f64::from(u16::from_be_bytes([bytes[0], bytes[1]])),
        DataType::I16 => f64::from(i16::from_be_bytes([bytes[0], bytes[1]])),
        DataType::U32 => f64::from(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        DataType::I32 => f64::from(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        DataType::F32 => f64::from(f32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
        #[allow(clippy::cast_precision_loss)]
        DataType::U64 => u64::from_be_bytes(array(8)) as f64,
        #[allow(clippy::cast_precision_loss)]
        DataType::I64 => i64::from_be_bytes(array(8)) as f64,
        DataType::F64 => f64::from_be_bytes(array(8)),
        DataType::String => unreachable!("strings are decoded as text"),
    };
    if raw.is_finite() {
        Ok(raw)
    } else {
        Err(DecodeError::NotFinite)
    }
}

fn decode_text(order: ByteOrder, words: &[u16]) -> Result<Decoded, DecodeError> {
    // Strings keep their register order; only the byte order inside each register applies.
    let bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| {
            if order.swaps_bytes() {
                w.to_le_bytes()
            } else {
                w.to_be_bytes()
            }
        })
        .collect();
    let text = std::str::from_utf8(&bytes).map_err(|_| DecodeError::InvalidText)?;
    Ok(Decoded::Text(text.trim_end_matches(['\0', ' ']).to_owned()))
}

/// Encodes `value` as the registers a device would hold for it, the inverse of
/// [`decode_words`]. Used by the simulator and tests; bits of status words are set with
/// [`set_bit`] instead.
pub fn encode_words(register: &Register, value: &Decoded) -> Result<Vec<u16>, String> {
    let width = usize::from(register.span);
    let bytes = match (register.data_type, value) {
        (DataType::String, Decoded::Text(text)) => {
            let mut bytes = text.as_bytes().to_vec();
            if bytes.len() > width * 2 {
                return Err(format!("text `{text}` is longer than {width} registers"));
            }
            bytes.resize(width * 2, 0);
            let words = bytes
                .chunks(2)
                .map(|p| {
                    if register.order.swaps_bytes() {
                        u16::from_le_bytes([p[0], p[1]])
                    } else {
                        u16::from_be_bytes([p[0], p[1]])
                    }
                })
                .collect();
            return Ok(words);
        }
        (data_type, Decoded::Number(number)) => {
            let raw = (number - register.offset) / register.scale;
            raw_bytes(data_type, raw)?
        }
        (_, other) => {
            return Err(format!(
                "cannot encode {other:?} as {}",
                register.data_type.as_str()
            ));
        }
    };
    let mut words = from_big_endian(register.order, &bytes);
    words.resize(width, 0);
    Ok(words)
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn raw_bytes(data_type: DataType, raw: f64) -> Result<Vec<u8>, String> {
    let int = raw.round();
    let fits = |min: f64, max: f64| {
        if (min..=max).contains(&int) {
            Ok(())
        } else {
            Err(format!(
                "raw value {raw} does not fit {}",
                data_type.as_str()
            ))
        }
    };
    Ok(match data_type {
        DataType::U16 => {
            fits(0.0, f64::from(u16::MAX))?;
            (int as u16).to_be_bytes().to_vec()
        }
        DataType::I16 => {
            fits(f64::from(i16::MIN), f64::from(i16::MAX))?;
            (int as i16).to_be_bytes().to_vec()
        }
        DataType::U32 => {
            fits(0.0, f64::from(u32::MAX))?;
            (int as u32).to_be_bytes().to_vec()
        }
        DataType::I32 => {
            fits(f64::from(i32::MIN), f64::from(i32::MAX))?;
            (int as i32).to_be_bytes().to_vec()
        }
        DataType::U64 => (int as u64).to_be_bytes().to_vec(),
        DataType::I64 => (int as i64).to_be_bytes().to_vec(),
        DataType::F32 => (raw as f32).to_be_bytes().to_vec(),
        DataType::F64 => raw.to_be_bytes().to_vec(),
        DataType::Bool | DataType::String => {
            return Err(format!("{} is not a number type", data_type.as_str()));
        }
    })
}

/// Returns the unsigned value of bits `first..=last` of `word`.
pub fn field_value(word: u16, first: u8, last: u8) -> u16 {
    let width = u32::from(last - first) + 1;
    let mask = u16::MAX >> (16 - width);
    (word >> first) & mask
}

/// Returns `word` with bits `first..=last` replaced by `value`, which must fit the field.
pub fn set_field(word: u16, first: u8, last: u8, value: u16) -> Result<u16, String> {
    let width = u32::from(last - first) + 1;
    let mask = u16::MAX >> (16 - width);
    if value > mask {
        return Err(format!("value {value} does not fit bits {first} to {last}"));
    }
    Ok((word & !(mask << first)) | (value << first))
}

/// Returns `word` with bit `bit` set to `on`.
pub fn set_bit(word: u16, bit: u8, on: bool) -> u16 {
    if on {
        word | (1 << bit)
    } else {
        word & !(1 << bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Function, RegisterSpec};

    fn register(data_type: &str, order: &str) -> Register {
        let text = format!(
            "function = \"holding_register\"\naddress = 0\ntype = \"{data_type}\"\norder = \"{order}\"\ncount = 4"
        );
        let spec: RegisterSpec = toml::from_str(&text).expect("spec parses");
        let mut register = spec.check().expect("spec is valid");
        register.span = register.data_type.words().unwrap_or(4);
        assert_eq!(register.function, Function::HoldingRegister);
        register
    }

    #[test]
    fn status_bits_follow_byte_order() {
        // The register value 0x0102 has bits 1 and 8 set, whatever order its bytes travel in.
        let cases = [
            ("ABCD", 0x0102),
            ("CDAB", 0x0102),
            ("BADC", 0x0201),
            ("DCBA", 0x0201),
        ];
        for (order, word) in cases {
            for bit in 0..16u8 {
                let mut register = register("u16", order);
                register.bit = Some(bit);
                let decoded = decode_words(&register, &[word]).expect("decodes");
                let expected = bit == 1 || bit == 8;
                assert_eq!(decoded, Decoded::Bool(expected), "{order} bit {bit}");
            }
        }
    }

    #[test]
    fn packed_fields_follow_byte_order() {
        // The register value 0x5A37: low nibble 7, bits 4-5 3, high byte 0x5A.
        let cases = [
            ("ABCD", 0x5A37),
            ("CDAB", 0x5A37),
            ("BADC", 0x375A),
            ("DCBA", 0x375A),
        ];
        let fields = [
            ((0, 3), 7.0),
            ((4, 5), 3.0),
            ((8, 15), 90.0),
            ((0, 15), 23_095.0),
        ];
        for (order, word) in cases {
            for ((first, last), expected) in fields {
                let mut register = register("u16", order);
                register.bits = Some((first, last));
                let decoded = decode_words(&register, &[word]).expect("decodes");
                assert_eq!(
                    decoded,
                    Decoded::Number(expected),
                    "{order} bits {first}-{last}"
                );
            }
        }
    }

    #[test]
    fn packed_field_scaling_and_no_value() {
        let mut register = register("u16", "ABCD");
        register.bits = Some((8, 15));
        register.scale = 0.5;
        register.no_value = vec![255.0];
        assert_eq!(
            decode_words(&register, &[0x1401]).expect("decodes"),
            Decoded::Number(10.0),
            "field 0x14 times 0.5"
        );
        assert!(
            matches!(
                decode_words(&register, &[0xFF00]),
                Err(DecodeError::NoValue { .. })
            ),
            "no_value compares the field, not the whole register"
        );
    }

    #[test]
    fn set_field_keeps_other_bits() {
        assert_eq!(set_field(0xFFFF, 4, 5, 1), Ok(0xFFDF));
        assert_eq!(set_field(0x0000, 0, 15, 0xBEEF), Ok(0xBEEF));
        assert!(set_field(0, 4, 5, 4).is_err(), "4 needs three bits");
    }

    #[test]
    fn f32_in_four_orders() {
        // 123.456 as IEEE 754 single precision is 0x42F6E979.
        let cases = [
            ("ABCD", [0x42F6, 0xE979]),
            ("CDAB", [0xE979, 0x42F6]),
            ("BADC", [0xF642, 0x79E9]),
            ("DCBA", [0x79E9, 0xF642]),
        ];
        for (order, words) in cases {
            let value = decode_words(&register("f32", order), &words).expect("decodes");
            let Decoded::Number(n) = value else {
                panic!("{order}: not a number")
            };
            assert!((n - 123.456).abs() < 1e-4, "{order}: decoded {n}");
        }
    }

    #[test]
    fn signed_and_wide_integers() {
        assert_eq!(
            decode_words(&register("i16", "ABCD"), &[0xFF38]),
            Ok(Decoded::Number(-200.0))
        );
        assert_eq!(
            decode_words(&register("i32", "CDAB"), &[0xFFFE, 0xFFFF]),
            Ok(Decoded::Number(-2.0))
        );
        assert_eq!(
            decode_words(&register("u64", "ABCD"), &[0x0000, 0x0001, 0x0000, 0x0000]),
            Ok(Decoded::Number(4_294_967_296.0))
        );
        assert_eq!(
            decode_words(&register("i64", "DCBA"), &[0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF]),
            Ok(Decoded::Number(-2.0))
        );
    }

    #[test]
    fn short_reply_is_an_error() {
        assert_eq!(
            decode_words(&register("f32", "ABCD"), &[0x42F6]),
            Err(DecodeError::Short { needed: 2, got: 1 })
        );
    }

    #[test]
    fn encode_inverts_decode() {
        for data_type in ["u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64"] {
            for order in ["ABCD", "CDAB", "BADC", "DCBA"] {
                let register = register(data_type, order);
                let words = encode_words(&register, &Decoded::Number(1234.0)).expect("encodes");
                assert_eq!(
                    decode_words(&register, &words),
                    Ok(Decoded::Number(1234.0)),
                    "{data_type} {order}"
                );
            }
        }
    }
}
