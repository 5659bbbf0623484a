//! A small GGUF writer for the GGUF tests: the layout of the specification, written by hand so
//! that tests can also write what a correct writer never would (bad counts, types, offsets).
#![allow(dead_code)] // each test binary uses a different part

use mamba2::gguf::GgufValue;

/// A GGUF file under construction. `bytes()` lays it out; fields can be edited freely in between.
pub struct Writer {
    pub version: u32,
    pub kv: Vec<(String, GgufValue)>,
    /// Already-encoded metadata entries appended after `kv` (for bad value types).
    pub raw_kv: Vec<Vec<u8>>,
    pub tensors: Vec<TensorEntry>,
    pub data: Vec<u8>,
    /// Padding before the data section (the file's `general.alignment` is set separately).
    pub alignment: usize,
    /// Overrides of the header counts (for counts that lie).
    pub n_tensors_override: Option<u64>,
    pub n_kv_override: Option<u64>,
}

pub struct TensorEntry {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    /// Relative to the data section.
    pub offset: u64,
}

impl Writer {
    pub fn new(version: u32) -> Self {
        Writer {
            version,
            kv: Vec::new(),
            raw_kv: Vec::new(),
            tensors: Vec::new(),
            data: Vec::new(),
            alignment: 32,
            n_tensors_override: None,
            n_kv_override: None,
        }
    }

    pub fn kv(mut self, key: &str, value: GgufValue) -> Self {
        self.kv.push((key.to_string(), value));
        self
    }

    /// Appends a tensor with `bytes` as its data at the next aligned offset.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) -> Self {
        while !self.data.len().is_multiple_of(self.alignment) {
            self.data.push(0);
        }
        self.tensors.push(TensorEntry {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            offset: self.data.len() as u64,
        });
        self.data.extend_from_slice(bytes);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        let n_tensors = self.n_tensors_override.unwrap_or(self.tensors.len() as u64);
        let n_kv = self
            .n_kv_override
            .unwrap_or((self.kv.len() + self.raw_kv.len()) as u64);
        out.extend(n_tensors.to_le_bytes());
        out.extend(n_kv.to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        for raw in &self.raw_kv {
            out.extend(raw);
        }
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend(t.offset.to_le_bytes());
        }
        if !self.tensors.is_empty() {
            while !out.len().is_multiple_of(self.alignment) {
                out.push(0);
            }
        }
        out.extend(&self.data);
        out
    }
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// The encoding of a value without its type id (arrays carry their element type; an empty array
/// is written as an array of u8).
pub fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend(x.to_le_bytes()),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            let elem = items.first().map_or(0, GgufValue::type_id);
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
    }
}

pub fn s(x: &str) -> GgufValue {
    GgufValue::String(x.to_string())
}

pub fn strings(xs: &[&str]) -> GgufValue {
    GgufValue::Array(xs.iter().map(|x| s(x)).collect())
}

pub fn i32s(xs: &[i32]) -> GgufValue {
    GgufValue::Array(xs.iter().map(|&x| GgufValue::I32(x)).collect())
}

pub fn f32s(xs: &[f32]) -> GgufValue {
    GgufValue::Array(xs.iter().map(|&x| GgufValue::F32(x)).collect())
}
