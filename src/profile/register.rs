//! Modbus register descriptions in device profiles: where a metric lives on the device and
//! how its registers turn into a value.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The Modbus object table a metric is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    /// Read-write bits, read with function code 01 (vendor notation 0xxxx).
    Coil,
    /// Read-only bits, read with function code 02 (vendor notation 1xxxx).
    DiscreteInput,
    /// Read-only 16-bit registers, read with function code 04 (vendor notation 3xxxx).
    InputRegister,
    /// Read-write 16-bit registers, read with function code 03 (vendor notation 4xxxx).
    HoldingRegister,
}

impl Function {
    /// Whether the table holds single bits rather than 16-bit registers.
    pub fn is_bit(self) -> bool {
        matches!(self, Function::Coil | Function::DiscreteInput)
    }

    /// The Modbus function code that reads this table.
    pub fn code(self) -> u8 {
        match self {
            Function::Coil => 1,
            Function::DiscreteInput => 2,
            Function::HoldingRegister => 3,
            Function::InputRegister => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Function::Coil => "coil",
            Function::DiscreteInput => "discrete_input",
            Function::InputRegister => "input_register",
            Function::HoldingRegister => "holding_register",
        }
    }
}

/// How the registers of a metric encode its raw value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// ASCII text, two characters per register, high byte first; `count` gives its length
    /// in registers.
    String,
}

impl DataType {
    /// Registers the type spans, or `None` for strings, whose length `count` sets.
    pub fn words(self) -> Option<u16> {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => Some(1),
            DataType::U32 | DataType::I32 | DataType::F32 => Some(2),
            DataType::U64 | DataType::I64 | DataType::F64 => Some(4),
            DataType::String => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
            DataType::String => "string",
        }
    }
}

/// Byte and word order of a multi-byte value, named by where the bytes A (most
/// significant) to D land in the registers as they arrive.
///
/// `ABCD` is big-endian (the Modbus default). `CDAB` swaps the 16-bit words, `BADC` swaps
/// the two bytes inside each word, and `DCBA` does both. For 64-bit types the same rule
/// applies to four words: `CDAB` reverses the word order and `BADC` swaps bytes in each word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ByteOrder {
    #[default]
    ABCD,
    CDAB,
    BADC,
    DCBA,
}

impl ByteOrder {
    /// Whether the words arrive least significant first.
    pub fn swaps_words(self) -> bool {
        matches!(self, ByteOrder::CDAB | ByteOrder::DCBA)
    }

    /// Whether the two bytes inside each word arrive low byte first.
    pub fn swaps_bytes(self) -> bool {
        matches!(self, ByteOrder::BADC | ByteOrder::DCBA)
    }
}

/// Where and how a metric is read over Modbus, as written under `[metrics.modbus]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterSpec {
    /// Object table: `coil`, `discrete_input`, `input_register` or `holding_register`.
    /// Optional when `register` is written in the vendor's 0xxxx/1xxxx/3xxxx/4xxxx notation.
    #[serde(default)]
    pub function: Option<Function>,
    /// 0-based protocol address, as sent on the wire. Write either `address` or `register`.
    #[serde(default)]
    pub address: Option<u16>,
    /// The vendor's 1-based reference number: 00001-09999 coils, 10001-19999 discrete
    /// inputs, 30001-39999 input registers, 40001-49999 holding registers, or the six-digit
    /// forms such as 400001-465536. `register = 40001` is holding register address 0.
    #[serde(default)]
    pub register: Option<u32>,
    /// Data type of the raw value: `bool`, `u16`, `i16`, `u32`, `i32`, `u64`, `i64`, `f32`,
    /// `f64` or `string`. Defaults to `bool` for coils and discrete inputs, else `u16`.
    #[serde(default, rename = "type")]
    pub data_type: Option<DataType>,
    /// Registers the vendor's table lists for the value. Required for `string` (its length);
    /// for other types it is checked against the type's width.
    #[serde(default)]
    pub count: Option<u16>,
    /// Bit index 0-15 (0 = least significant) of a packed status word; the metric is then a
    /// boolean. Only for `u16` registers.
    #[serde(default)]
    pub bit: Option<u8>,
    /// First and last bit, inclusive (0 = least significant), of an unsigned field packed
    /// in a `u16` register, such as `[0, 3]` for the low nibble. The metric is the field's
    /// value, which `no_value`, `scale`, `offset`, the valid range and `codes` then apply to.
    #[serde(default)]
    pub bits: Option<Vec<u8>>,
    /// Byte and word order: `ABCD` (default), `CDAB`, `BADC` or `DCBA`.
    #[serde(default)]
    pub order: ByteOrder,
    /// Factor applied to the raw value: value = raw × scale + offset.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Added to the scaled value, in the metric's unit.
    #[serde(default)]
    pub offset: f64,
    /// Lowest plausible value, in the metric's unit after scaling; lower readings are bad.
    #[serde(default)]
    pub valid_min: Option<f64>,
    /// Highest plausible value, in the metric's unit after scaling; higher readings are bad.
    #[serde(default)]
    pub valid_max: Option<f64>,
    /// Raw values the device sends when it has no measurement, such as 65535 or -32768.
    /// A reading equal to one of them is bad and not stored.
    #[serde(default)]
    pub no_value: Vec<f64>,
    /// Meanings of the codes of a status or fault register, keyed by the raw code in
    /// decimal, such as `{ "0" = "normal", "3" = "sensor end of life" }`.
    #[serde(default)]
    pub codes: BTreeMap<String, String>,
}

fn default_scale() -> f64 {
    1.0
}

/// A checked register description, ready for planning reads and decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct Register {
    pub function: Function,
    /// 0-based protocol address of the first register or bit.
    pub address: u16,
    /// Registers (or bits, for bit tables) the value spans.
    pub span: u16,
    pub data_type: DataType,
    pub bit: Option<u8>,
    /// First and last bit of a packed field, checked to be `first <= last <= 15`.
    pub bits: Option<(u8, u8)>,
    pub order: ByteOrder,
    pub scale: f64,
    pub offset: f64,
    pub valid_min: Option<f64>,
    pub valid_max: Option<f64>,
    pub no_value: Vec<f64>,
    pub codes: BTreeMap<i64, String>,
}

impl Register {
    /// Whether the decoded metric is a boolean.
    pub fn is_bool(&self) -> bool {
        self.data_type == DataType::Bool || self.bit.is_some()
    }

    /// The address after the last register or bit of the value.
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.span)
    }

    /// The meaning of a status code, if the profile lists it.
    pub fn code_label(&self, code: i64) -> Option<&str> {
        self.codes.get(&code).map(String::as_str)
    }
}

/// Splits the vendor's 1-based reference number into table and 0-based address.
pub fn split_reference(register: u32) -> Result<(Function, u16), String> {
    let (function, base) = match register {
        1..=9_999 => (Function::Coil, 1),
        10_001..=19_999 => (Function::DiscreteInput, 10_001),
        30_001..=39_999 => (Function::InputRegister, 30_001),
        40_001..=49_999 => (Function::HoldingRegister, 40_001),
        100_001..=165_536 => (Function::DiscreteInput, 100_001),
        300_001..=365_536 => (Function::InputRegister, 300_001),
        400_001..=465_536 => (Function::HoldingRegister, 400_001),
        _ => {
            return Err(format!(
                "register {register} is not in the 0xxxx, 1xxxx, 3xxxx or 4xxxx notation; \
                 write a number such as 40001, or give `function` and a 0-based `address`"
            ));
        }
    };
    let address = u16::try_from(register - base)
        .map_err(|_| format!("register {register} is out of range"))?;
    Ok((function, address))
}

impl RegisterSpec {
    /// Checks the description, returning the register or a list of (key, message) problems.
    pub fn check(&self) -> Result<Register, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let (function, address) = self.locate(&mut problems);
        let data_type = self.data_type.unwrap_or(if function.is_bit() {
            DataType::Bool
        } else {
            DataType::U16
        });
        let span = self.check_type(function, data_type, &mut problems);
        if u32::from(address) + u32::from(span) > 65_536 {
            problems.push((
                "address",
                format!(
                    "address {address} plus {span} registers runs past 65535; check the address"
                ),
            ));
        }
        self.check_scaling(&mut problems);
        let codes = self.check_codes(&mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Register {
            function,
            address,
            span,
            data_type,
            bit: self.bit,
            bits: match self.bits.as_deref() {
                Some(&[first, last]) => Some((first, last)),
                _ => None,
            },
            order: self.order,
            scale: self.scale,
            offset: self.offset,
            valid_min: self.valid_min,
            valid_max: self.valid_max,
            no_value: self.no_value.clone(),
            codes,
        })
    }

    fn locate(&self, problems: &mut Vec<(&'static str, String)>) -> (Function, u16) {
        match (self.address, self.register) {
            (Some(_), Some(_)) => {
                problems.push((
                    "register",
                    "write either `address` (0-based) or `register` (vendor notation), not both"
                        .to_owned(),
                ));
                (self.function.unwrap_or(Function::HoldingRegister), 0)
            }
            (Some(address), None) => {
                let Some(function) = self.function else {
                    problems.push((
                        "function",
                        "`address` needs `function` (coil, discrete_input, input_register or holding_register)".to_owned(),
                    ));
                    return (Function::HoldingRegister, address);
                };
                (function, address)
            }
            (None, Some(register)) => match split_reference(register) {
                Ok((implied, address)) => {
                    if let Some(function) = self.function.filter(|f| *f != implied) {
                        problems.push((
                            "function",
                            format!(
                                "register {register} is a {} in vendor notation but `function` says {}; \
                                 remove `function` or fix the register",
                                implied.as_str(),
                                function.as_str()
                            ),
                        ));
                    }
                    (implied, address)
                }
                Err(message) => {
                    problems.push(("register", message));
                    (Function::HoldingRegister, 0)
                }
            },
            (None, None) => {
                problems.push((
                    "address",
                    "missing `address` or `register`; add one".to_owned(),
                ));
                (Function::HoldingRegister, 0)
            }
        }
    }

    fn check_type(
        &self,
        function: Function,
        data_type: DataType,
        problems: &mut Vec<(&'static str, String)>,
    ) -> u16 {
        if function.is_bit() {
            if data_type != DataType::Bool {
                problems.push((
                    "type",
                    format!(
                        "a {} is one bit, so `type` must be bool, not {}",
                        function.as_str(),
                        data_type.as_str()
                    ),
                ));
            }
            if self.bit.is_some() || self.bits.is_some() || self.count.is_some_and(|c| c != 1) {
                problems.push((
                    if self.bits.is_some() { "bits" } else { "bit" },
                    format!(
                        "`bit`, `bits` and `count` do not apply to a {}; remove them",
                        function.as_str()
                    ),
                ));
            }
            return 1;
        }
        if data_type == DataType::Bool && self.bit.is_none() {
            problems.push((
                "type",
                "a register metric of type bool needs `bit`; or use type u16".to_owned(),
            ));
        }
        if let Some(bit) = self.bit {
            if bit > 15 {
                problems.push((
                    "bit",
                    format!("bit {bit} is invalid; a register has bits 0 to 15"),
                ));
            }
            if !matches!(data_type, DataType::U16 | DataType::Bool) {
                problems.push((
                    "bit",
                    format!("`bit` needs type u16, not {}", data_type.as_str()),
                ));
            }
        }
        if let Some(bits) = &self.bits {
            let valid = matches!(bits.as_slice(), &[first, last] if first <= last && last <= 15);
            if !valid {
                problems.push((
                    "bits",
                    format!(
                        "bits {bits:?} are invalid; write two numbers, the first and last bit, \
                         0 to 15, first not above last, such as [0, 3]"
                    ),
                ));
            }
            if self.bit.is_some() {
                problems.push((
                    "bits",
                    "write `bit` for one flag or `bits` for a field, not both".to_owned(),
                ));
            }
            if data_type != DataType::U16 {
                problems.push((
                    "bits",
                    format!("`bits` needs type u16, not {}", data_type.as_str()),
                ));
            }
        }
        let width = match data_type.words() {
            Some(width) => width,
            None => match self.count {
                Some(count) if (1..=125).contains(&count) => count,
                Some(count) => {
                    problems.push((
                        "count",
                        format!("string length {count} is invalid; write 1 to 125 registers"),
                    ));
                    1
                }
                None => {
                    problems.push((
                        "count",
                        "a string needs `count`, its length in registers".to_owned(),
                    ));
                    1
                }
            },
        };
        if let Some(count) = self.count.filter(|c| *c < width) {
            problems.push((
                "count",
                format!(
                    "type {} needs {width} registers but `count` is {count}; fix the type or the count",
                    data_type.as_str()
                ),
            ));
        }
        self.count.unwrap_or(width).max(width)
    }

    fn check_scaling(&self, problems: &mut Vec<(&'static str, String)>) {
        if !self.scale.is_finite() || self.scale == 0.0 {
            problems.push((
                "scale",
                format!(
                    "scale {} is invalid; write a finite, non-zero number",
                    self.scale
                ),
            ));
        }
        if !self.offset.is_finite() {
            problems.push(("offset", "offset must be a finite number".to_owned()));
        }
        if let (Some(min), Some(max)) = (self.valid_min, self.valid_max)
            && min > max
        {
            problems.push((
                "valid_min",
                format!("valid_min {min} is greater than valid_max {max}; swap them"),
            ));
        }
    }

    fn check_codes(&self, problems: &mut Vec<(&'static str, String)>) -> BTreeMap<i64, String> {
        let mut codes = BTreeMap::new();
        for (key, label) in &self.codes {
            match key.trim().parse::<i64>() {
                Ok(code) => {
                    codes.insert(code, label.clone());
                }
                Err(_) => problems.push((
                    "codes",
                    format!("code `{key}` is not a decimal integer; key each code by its raw value, such as \"3\""),
                )),
            }
        }
        codes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_notation_maps_to_zero_based() {
        assert_eq!(split_reference(40001), Ok((Function::HoldingRegister, 0)));
        assert_eq!(split_reference(30343), Ok((Function::InputRegister, 342)));
        assert_eq!(split_reference(10005), Ok((Function::DiscreteInput, 4)));
        assert_eq!(split_reference(1), Ok((Function::Coil, 0)));
        assert_eq!(
            split_reference(465_536),
            Ok((Function::HoldingRegister, 65_535))
        );
        assert!(split_reference(20001).is_err());
        assert!(split_reference(0).is_err());
    }
}
