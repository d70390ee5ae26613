//! GGUF metadata values (`gguf_metadata_value_type` of ggml's `docs/gguf.md`): the
//! thirteen value types, read from bytes whose lengths are checked before anything is
//! allocated, and written back in the same little-endian layout.

/// The value type ids a GGUF file stores before each value.
pub mod ty {
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

/// Arrays nested deeper than this are refused (GGUF's own keys nest none).
const MAX_DEPTH: usize = 4;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// The element type id, then the elements (all of that type).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => ty::U8,
            Value::I8(_) => ty::I8,
            Value::U16(_) => ty::U16,
            Value::I16(_) => ty::I16,
            Value::U32(_) => ty::U32,
            Value::I32(_) => ty::I32,
            Value::F32(_) => ty::F32,
            Value::Bool(_) => ty::BOOL,
            Value::String(_) => ty::STRING,
            Value::Array(..) => ty::ARRAY,
            Value::U64(_) => ty::U64,
            Value::I64(_) => ty::I64,
            Value::F64(_) => ty::F64,
        }
    }

    /// An integer of any width, if it is one.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// A float or an integer, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// Appends the value's bytes (not its type id) to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend(v.to_le_bytes()),
            Value::U16(v) => out.extend(v.to_le_bytes()),
            Value::I16(v) => out.extend(v.to_le_bytes()),
            Value::U32(v) => out.extend(v.to_le_bytes()),
            Value::I32(v) => out.extend(v.to_le_bytes()),
            Value::F32(v) => out.extend(v.to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::String(s) => write_str(out, s),
            Value::Array(t, items) => {
                out.extend(t.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    item.write(out);
                }
            }
            Value::U64(v) => out.extend(v.to_le_bytes()),
            Value::I64(v) => out.extend(v.to_le_bytes()),
            Value::F64(v) => out.extend(v.to_le_bytes()),
        }
    }
}

/// A GGUF string: u64 length, then UTF-8 bytes.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Reads little-endian fields from a byte slice; every read checks the bytes left first.
pub struct Cursor<'a> {
    bytes: &'a [u8],
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// The next `n` bytes; `what` names them when the file ends first.
    pub fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        if n > self.left() as u64 {
            return Err(format!(
                "{}: needs {n} bytes at offset {} but the file ends {} bytes later \
                 (truncated or corrupt)",
                what(),
                self.pos,
                self.left()
            ));
        }
        // In range: `n ≤ left()` above.
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    pub fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A string whose length is checked against the bytes left before it is read.
    pub fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{}: not valid UTF-8", what()))
    }

    /// A value of type `t`.
    pub fn value(&mut self, t: u32, what: &dyn Fn() -> String) -> Result<Value, String> {
        self.value_at(t, what, 0)
    }

    fn value_at(
        &mut self,
        t: u32,
        what: &dyn Fn() -> String,
        depth: usize,
    ) -> Result<Value, String> {
        Ok(match t {
            ty::U8 => Value::U8(self.array::<1>(what)?[0]),
            ty::I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            ty::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ty::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ty::U32 => Value::U32(self.u32(what)?),
            ty::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ty::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ty::BOOL => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{}: bool byte {b} is neither 0 nor 1", what())),
            },
            ty::STRING => Value::String(self.string(what)?),
            ty::ARRAY => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{}: arrays nested deeper than {MAX_DEPTH}", what()));
                }
                let et = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte (a string or array at least 8):
                // a count the bytes left cannot hold is refused before allocating.
                let min = match et {
                    ty::STRING | ty::ARRAY => 8,
                    _ => 1,
                };
                if n.saturating_mul(min) > self.left() as u64 {
                    return Err(format!(
                        "{}: array of {n} elements is longer than the {} bytes left",
                        what(),
                        self.left()
                    ));
                }
                // room for what the bytes left can hold at one byte a value would be 32
                // times the file for an array of bytes: grow as values are read instead
                let mut items = Vec::with_capacity((n as usize).min(1 << 16));
                for _ in 0..n {
                    items.push(self.value_at(et, what, depth + 1)?);
                }
                Value::Array(et, items)
            }
            ty::U64 => Value::U64(self.u64(what)?),
            ty::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ty::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(format!("{}: unknown value type {t}", what())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_type_reads_back() {
        let values = vec![
            Value::U8(7),
            Value::I8(-7),
            Value::U16(65535),
            Value::I16(-300),
            Value::U32(1 << 31),
            Value::I32(-5),
            Value::F32(1e-5),
            Value::Bool(true),
            Value::String("日本語 🚀".into()),
            Value::Array(ty::STRING, vec![Value::String("a b".into())]),
            Value::Array(ty::ARRAY, vec![Value::Array(ty::I32, vec![Value::I32(3)])]),
            Value::U64(u64::MAX),
            Value::I64(i64::MIN),
            Value::F64(0.1),
        ];
        for v in values {
            let mut b = Vec::new();
            v.write(&mut b);
            let mut c = Cursor::new(&b);
            assert_eq!(c.value(v.type_id(), &|| "k".into()).unwrap(), v);
            assert_eq!(c.left(), 0);
        }
    }

    #[test]
    fn absurd_lengths_are_refused_before_allocating() {
        let mut b = Vec::new();
        b.extend(ty::U32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        let err = Cursor::new(&b)
            .value(ty::ARRAY, &|| "key `x`".into())
            .unwrap_err();
        assert!(err.contains("key `x`") && err.contains("array"), "{err}");
        let mut b = Vec::new();
        b.extend((1u64 << 60).to_le_bytes());
        let err = Cursor::new(&b).string(&|| "key `y`".into()).unwrap_err();
        assert!(
            err.contains("key `y`") && err.contains("truncated"),
            "{err}"
        );
        let err = Cursor::new(&[2])
            .value(ty::BOOL, &|| "b".into())
            .unwrap_err();
        assert!(err.contains("neither"), "{err}");
    }
}
