//! The `pytorch_model.bin` path (Candle's zip + pickle reader behind `Weights::from_files`).
//!
//! First byte even: the rest is the whole file, as downloaded. First byte odd: the rest is split
//! at the first `0xFF 0xFE` pair into a `data.pkl` and one storage blob, wrapped into a valid
//! stored zip laid out like `torch.save`'s, so mutations reach the pickle parser and the tensor
//! reader instead of dying in the zip directory.
//!
//! weights.rs turns panics of the third-party reader into `Error::WeightFile` (`catch_unwind`);
//! libfuzzer-sys's panic hook would abort on them first, so this target installs a hook that
//! reports each new panic location once. A panic that escapes the library still aborts (the
//! fuzz_target wrapper aborts on any unwinding panic).
#![no_main]

use std::collections::HashSet;
use std::sync::{Mutex, Once};

use libfuzzer_sys::fuzz_target;

static HOOK: Once = Once::new();
static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn install_hook() {
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
            if seen.get_or_insert_with(HashSet::new).insert(at.clone()) {
                eprintln!("[pytorch_bin] panic inside the reader at {at}: {info}");
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    install_hook();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let cut = rest.windows(2).position(|w| w == [0xFF, 0xFE]);
        let (pkl, blob) = match cut {
            Some(i) => (&rest[..i], &rest[i + 2..]),
            None => (rest, &[][..]),
        };
        mamba2_fuzz::stored_zip(&[
            ("archive/data.pkl", pkl),
            ("archive/data/0", blob),
            ("archive/version", b"3\n"),
        ])
    };
    let path = mamba2_fuzz::scratch_path("pytorch_model.bin");
    std::fs::write(&path, &bytes).expect("write scratch file");
    mamba2_fuzz::open_and_read_all(&path);
});
