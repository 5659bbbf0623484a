//! Helpers shared by the fuzz targets: a scratch file per process, reading every tensor of a
//! `Weights` the way a loader would, and a minimal stored-zip writer so that the pickle target can
//! feed its bytes straight to the pickle parser inside a well-formed torch-style archive.

use std::path::PathBuf;

use candle_core::{DType, Device};
use mamba2::weights::Weights;
use mamba2::Error;

/// A path in a per-process scratch folder with the given file name (the extension decides how
/// `Weights::from_files` reads it).
pub fn scratch_path(file_name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mamba2-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(file_name)
}

/// Opens `path` as a checkpoint and reads every tensor it lists with its stored shape, as f32,
/// with and without the finite check. Every failure must be a typed error; anything else
/// (a panic, an abort, an allocation past the fuzzer's limit) is a finding.
pub fn open_and_read_all(path: &PathBuf) {
    let weights = match Weights::from_files(std::slice::from_ref(path), &Device::Cpu) {
        Ok(w) => w,
        Err(e) => return check_error(&e),
    };
    let weights = weights.with_finite_check(true);
    for name in weights.names() {
        let shape = weights.shape(&name).expect("listed name has a shape");
        let _ = weights.stored_dtype(&name);
        if let Err(e) = weights.tensor(&name, &shape, DType::F32) {
            check_error(&e);
        }
    }
}

/// The message must be printable and the error one of the kinds a file can cause.
fn check_error(e: &Error) {
    let _ = e.to_string();
    assert!(
        matches!(
            e,
            Error::WeightFile { .. }
                | Error::TensorDtype { .. }
                | Error::TensorShape { .. }
                | Error::NonFinite { .. }
                | Error::Io { .. }
        ),
        "unexpected error kind: {e:?}"
    );
}

/// CRC-32 (IEEE), bitwise: the fuzz inputs are small.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zip archive with the given entries, all stored (method 0), as `torch.save` writes them.
pub fn stored_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let header = |sig: u32, central_dir: bool| {
            let mut h = Vec::new();
            h.extend_from_slice(&sig.to_le_bytes());
            if central_dir {
                h.extend_from_slice(&20u16.to_le_bytes()); // version made by
            }
            h.extend_from_slice(&20u16.to_le_bytes()); // version needed
            h.extend_from_slice(&0u16.to_le_bytes()); // flags
            h.extend_from_slice(&0u16.to_le_bytes()); // method: stored
            h.extend_from_slice(&0u32.to_le_bytes()); // time, date
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // extra length
            if central_dir {
                h.extend_from_slice(&0u16.to_le_bytes()); // comment length
                h.extend_from_slice(&0u16.to_le_bytes()); // disk number
                h.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
                h.extend_from_slice(&0u32.to_le_bytes()); // external attributes
                h.extend_from_slice(&offset.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            h
        };
        out.extend_from_slice(&header(0x0403_4b50, false));
        out.extend_from_slice(data);
        central.extend_from_slice(&header(0x0201_4b50, true));
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}
