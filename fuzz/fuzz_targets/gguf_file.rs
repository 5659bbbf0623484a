//! GGUF files: arbitrary bytes to `GgufFile::from_bytes` (header, metadata and tensor table
//! validation), then what a loader does with an accepted file: every tensor's bytes and support
//! check, every typed getter on every key, the special tokens, and the tokenizer the metadata
//! describes, which then encodes and decodes a few texts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba2::gguf::{special_tokens, tokenizer_from_gguf, GgufFile};
use mamba2::Error;

/// Texts that reach the added-token matcher, the byte-level and SentencePiece paths, byte
/// fallback and the pre-tokenizer regexes.
const TEXTS: &[&str] = &[
    "Hello world",
    " ab ab<|endoftext|> <s>x</s>",
    "日本 🦙 café\n\n\t 123456",
    "",
];

fuzz_target!(|data: &[u8]| {
    let file = match GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") {
        Ok(f) => f,
        Err(e) => return check_error(&e),
    };
    for t in file.tensors() {
        // Bounds were checked at open: exactly n_bytes, inside the buffer.
        assert_eq!(file.tensor_bytes(t).len(), t.n_bytes);
        assert_eq!(t.shape().iter().product::<usize>(), t.elem_count());
        let _ = t.ty.name();
        if let Err(e) = file.check_supported(t) {
            check_error(&e);
        }
    }
    assert!(file.alignment().is_power_of_two());
    for key in file.metadata().keys() {
        let results = [
            file.get_u64(key).err(),
            file.get_i64(key).err(),
            file.get_f64(key).err(),
            file.get_bool(key).err(),
            file.get_str(key).err(),
            file.get_array(key).err(),
        ];
        for e in results.iter().flatten() {
            check_error(e);
        }
    }
    if let Err(e) = file.architecture() {
        check_error(&e);
    }
    if let Err(e) = special_tokens(&file) {
        check_error(&e);
    }
    match tokenizer_from_gguf(&file) {
        Ok(tokenizer) => {
            for text in TEXTS {
                for special in [false, true] {
                    if let Ok(enc) = tokenizer.encode(*text, special) {
                        let _ = tokenizer.decode(enc.get_ids(), false);
                        let _ = tokenizer.decode(enc.get_ids(), true);
                    }
                }
            }
        }
        Err(e) => check_error(&e),
    }
});

/// Every failure a file can cause is a GGUF error with a printable message.
fn check_error(e: &Error) {
    let _ = e.to_string();
    assert!(matches!(e, Error::Gguf(_)), "unexpected error kind: {e:?}");
}
