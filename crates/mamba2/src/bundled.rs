//! Where the bundled model (`mamba2-tiny`) is found at run time, with no path of the build
//! machine baked in, so that a copied or `cargo install`ed binary still has a default model.
//!
//! Lookup order:
//! 1. `$MAMBA2_HOME/mamba2-tiny`, when that folder has a `config.json` (a copy the user put
//!    there, which also serves builds without the embedded model);
//! 2. `mamba2-tiny` beside the executable (a release archive that ships the folder);
//! 3. with the `bundled-model` feature (default): the files compiled into the binary
//!    (`mamba2-tiny-model`), written once to `<cache>/mamba2-tiny-<content hash>/` where
//!    `<cache>` is `$MAMBA2_HOME`, else `$XDG_CACHE_HOME/mamba2`, else `$HOME/.cache/mamba2`,
//!    else the system temp folder. The loader then memory-maps them like any checkpoint.
//!
//! Each file is written to a temporary name and renamed into place, so processes starting at
//! once never read a half-written file; the content hash in the folder name keeps binaries with
//! different embedded models from sharing one.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The bundled model's folder name.
const NAME: &str = "mamba2-tiny";

/// The small Mamba-2 trained for this project (`models/mamba2-tiny`, 3.8M parameters), used
/// when no model is given: the folder to load it from (see the lookup order below).
///
/// 1. `$MAMBA2_HOME/mamba2-tiny` when it holds a `config.json`;
/// 2. `mamba2-tiny` beside the running executable;
/// 3. with the `bundled-model` feature (on by default) the copy compiled into the binary,
///    written on first use to `mamba2-tiny-<hash>` under `$MAMBA2_HOME`, else
///    `$XDG_CACHE_HOME/mamba2`, else `$HOME/.cache/mamba2`, else the temp folder.
///
/// Errors: [`Error::ModelNotFound`] when none applies (a build without the feature and no
/// copy on disk), [`Error::Io`] when the cache folder cannot be written.
///
/// ```
/// let dir = mamba2::pipeline::bundled_model_dir()?;
/// assert!(dir.join("config.json").is_file());
/// assert!(dir.join("model.safetensors").is_file());
/// # Ok::<(), mamba2::Error>(())
/// ```
pub fn bundled_model_dir() -> Result<PathBuf> {
    let home = std::env::var_os("MAMBA2_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from);
    if let Some(dir) = home.as_ref().map(|h| h.join(NAME)) {
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
    }
    if let Some(dir) = beside_executable() {
        return Ok(dir);
    }
    embedded(home)
}

fn beside_executable() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.join(NAME);
    dir.join("config.json").is_file().then_some(dir)
}

/// The folder that cached copies go under.
#[cfg(feature = "bundled-model")]
fn cache_root(home: Option<PathBuf>) -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    home.or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("mamba2")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("mamba2")))
        .unwrap_or_else(|| std::env::temp_dir().join("mamba2"))
}

#[cfg(feature = "bundled-model")]
fn embedded(home: Option<PathBuf>) -> Result<PathBuf> {
    use std::sync::OnceLock;
    // FNV-1a over names and contents: stable across builds and Rust versions (unlike std's
    // hasher), and ~8 MB hash once per process.
    static HASH: OnceLock<u64> = OnceLock::new();
    let hash = *HASH.get_or_init(|| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, bytes) in mamba2_tiny_model::FILES {
            for b in name.as_bytes().iter().chain(bytes) {
                h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    });
    let dir = cache_root(home).join(format!("{NAME}-{hash:016x}"));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    for (name, bytes) in mamba2_tiny_model::FILES {
        write_if_different(&dir.join(name), bytes)?;
    }
    Ok(dir)
}

#[cfg(not(feature = "bundled-model"))]
fn embedded(home: Option<PathBuf>) -> Result<PathBuf> {
    let _ = home;
    Err(Error::ModelNotFound {
        model: NAME.into(),
        message: "this build does not embed the bundled model (feature `bundled-model`); put \
                  the mamba2-tiny folder in $MAMBA2_HOME or beside the executable, or name a \
                  model"
            .into(),
    })
}

/// Writes `bytes` to `path` unless it already holds exactly them: to a unique temporary file of
/// the same folder first, then renamed over `path` (atomic on one file system).
#[cfg_attr(not(feature = "bundled-model"), allow(dead_code))]
fn write_if_different(path: &Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).is_ok_and(|have| have == bytes) {
        return Ok(());
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let file_name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{file_name}.{}.{nanos}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_different_file_is_replaced_and_an_equal_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_if_different(&p, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        std::fs::write(&p, b"abd").unwrap();
        write_if_different(&p, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        let before = std::fs::metadata(&p).unwrap().modified().unwrap();
        write_if_different(&p, b"abc").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), before);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_unwritable_cache_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let err = write_if_different(&file.join("config.json"), b"{}").unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }
}
