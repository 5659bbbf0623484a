//! Metadata values: the thirteen GGUF value types, their names in error messages, and the
//! lossless integer conversions the typed getters use.

/// One metadata value. GGUF arrays are homogeneous in the file; here they are a `Vec` of values
/// of that one type (an array of arrays may hold arrays of different element types).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

/// The value type ids of the GGUF specification.
pub(crate) mod type_id {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl GgufValue {
    /// The GGUF value type id of this value (`0` = u8 ... `12` = f64).
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => type_id::U8,
            GgufValue::I8(_) => type_id::I8,
            GgufValue::U16(_) => type_id::U16,
            GgufValue::I16(_) => type_id::I16,
            GgufValue::U32(_) => type_id::U32,
            GgufValue::I32(_) => type_id::I32,
            GgufValue::U64(_) => type_id::U64,
            GgufValue::I64(_) => type_id::I64,
            GgufValue::F32(_) => type_id::F32,
            GgufValue::F64(_) => type_id::F64,
            GgufValue::Bool(_) => type_id::BOOL,
            GgufValue::String(_) => type_id::STRING,
            GgufValue::Array(_) => type_id::ARRAY,
        }
    }

    /// A short description for error messages: `u32 7`, `string "gpt2"`, `array of 3 f32`.
    ///
    /// ```
    /// use mamba2::gguf::GgufValue;
    /// assert_eq!(GgufValue::I32(-1).describe(), "i32 -1");
    /// let a = GgufValue::Array(vec![GgufValue::F32(0.5); 3]);
    /// assert_eq!(a.describe(), "array of 3 f32");
    /// ```
    pub fn describe(&self) -> String {
        match self {
            GgufValue::U8(v) => format!("u8 {v}"),
            GgufValue::I8(v) => format!("i8 {v}"),
            GgufValue::U16(v) => format!("u16 {v}"),
            GgufValue::I16(v) => format!("i16 {v}"),
            GgufValue::U32(v) => format!("u32 {v}"),
            GgufValue::I32(v) => format!("i32 {v}"),
            GgufValue::U64(v) => format!("u64 {v}"),
            GgufValue::I64(v) => format!("i64 {v}"),
            GgufValue::F32(v) => format!("f32 {v}"),
            GgufValue::F64(v) => format!("f64 {v}"),
            GgufValue::Bool(v) => format!("bool {v}"),
            GgufValue::String(s) => {
                // Error messages quote at most a short prefix, cut on a character boundary.
                let cut = s.char_indices().nth(40).map(|(i, _)| i).unwrap_or(s.len());
                let ellipsis = if cut < s.len() { "..." } else { "" };
                format!("string {:?}{ellipsis}", &s[..cut])
            }
            GgufValue::Array(items) => match items.first() {
                None => "an empty array".to_string(),
                Some(first) => format!("array of {} {}", items.len(), first.type_name()),
            },
        }
    }

    /// The GGUF name of this value's type: `u8`, ..., `f64`, `bool`, `string`, `array`.
    pub fn type_name(&self) -> &'static str {
        type_name(self.type_id())
    }

    /// The value as a `u64` if it is an integer of any width and signedness that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `i64` if it is an integer of any width and signedness that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as an `f64` if it is an `f32` or `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is a `bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// The GGUF name of a value type id (`"type 13"` for ids outside the specification).
pub(crate) fn type_name(id: u32) -> &'static str {
    match id {
        type_id::U8 => "u8",
        type_id::I8 => "i8",
        type_id::U16 => "u16",
        type_id::I16 => "i16",
        type_id::U32 => "u32",
        type_id::I32 => "i32",
        type_id::F32 => "f32",
        type_id::BOOL => "bool",
        type_id::STRING => "string",
        type_id::ARRAY => "array",
        type_id::U64 => "u64",
        type_id::I64 => "i64",
        type_id::F64 => "f64",
        _ => "an unknown type",
    }
}

/// The fewest bytes one element of this type takes in the file (strings: the 8-byte length;
/// arrays: element type + count), so that a declared count can be checked against the bytes
/// left before anything is allocated. `None` for unknown types.
pub(crate) fn min_encoded_size(id: u32) -> Option<u64> {
    Some(match id {
        type_id::U8 | type_id::I8 | type_id::BOOL => 1,
        type_id::U16 | type_id::I16 => 2,
        type_id::U32 | type_id::I32 | type_id::F32 => 4,
        type_id::U64 | type_id::I64 | type_id::F64 | type_id::STRING => 8,
        type_id::ARRAY => 12,
        _ => return None,
    })
}
