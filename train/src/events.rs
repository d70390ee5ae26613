//! TensorBoard event files: TFRecord framing (the record's length, the masked CRC-32C of
//! the length, the record, the masked CRC-32C of the record; tensorflow's
//! `core/lib/io/record_writer.cc`) around `Event` protocol buffers
//! (`core/util/event.proto`) holding one scalar `Summary.Value` each. Written here so
//! that a folder that cannot be written is an error the caller sees, not a panic in a
//! writer thread.
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct EventFile {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventFile {
    /// Creates `dir/events.out.tfevents.SECONDS.HOST.PID.0` (TensorBoard's name) and
    /// writes its version record.
    pub fn create(dir: &Path) -> io::Result<Self> {
        let host = crate::util::hostname();
        let name = format!(
            "events.out.tfevents.{:010}.{host}.{}.0",
            now().trunc() as u64,
            std::process::id()
        );
        let path = dir.join(name);
        let mut file = Self {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        let mut event = event_header(now(), 0);
        field_bytes(&mut event, 3, b"brain.Event:2");
        file.record(&event)?;
        file.flush()?;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar at `step`.
    pub fn scalar(&mut self, tag: &str, value: f32, step: i64) -> io::Result<()> {
        let mut v = Vec::new();
        field_bytes(&mut v, 1, tag.as_bytes());
        v.push(2 << 3 | 5); // simple_value: fixed32
        v.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        field_bytes(&mut summary, 1, &v);
        let mut event = event_header(now(), step);
        field_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn record(&mut self, data: &[u8]) -> io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `Event.wall_time` (field 1, fixed64) and `Event.step` (field 2, varint).
fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut e = vec![1 << 3 | 1];
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(2 << 3);
    varint(&mut e, step as u64);
    e
}

/// A length-delimited field.
fn field_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), masked as TFRecord does.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_varints_match_their_specifications() {
        // The CRC-32C check value (RFC 3720, appendix B.4) and protobuf's 300 example.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }

    #[test]
    fn an_unwritable_folder_is_an_error() {
        let missing = std::env::temp_dir().join(format!("gpt2kit-no-such-{}", std::process::id()));
        assert!(EventFile::create(&missing.join("runs")).is_err());
    }
}
