//! The safetensors loading path: arbitrary bytes written to `model.safetensors`, opened with
//! `Weights::from_files` (mmap, header and tensor table validation), then every listed tensor read
//! with its stored shape and converted to f32 with the finite check on.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = mamba2_fuzz::scratch_path("model.safetensors");
    std::fs::write(&path, data).expect("write scratch file");
    mamba2_fuzz::open_and_read_all(&path);
});
