//! Which weight files a checkpoint folder holds: the candidates in the order they are tried and
//! the `*.index.json` shard index of a sharded checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The weight files a folder may hold, in the order [`Weights::from_dir`](super::Weights::from_dir)
/// tries them.
pub const WEIGHT_FILE_CANDIDATES: [&str; 4] = [
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
];

/// The first of [`WEIGHT_FILE_CANDIDATES`] present in `dir`.
pub fn find_weight_file(dir: &Path) -> Result<&'static str> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    WEIGHT_FILE_CANDIDATES
        .into_iter()
        .find(|name| dir.join(name).is_file())
        .ok_or_else(|| Error::WeightFile {
            path: dir.to_path_buf(),
            message: format!(
                "no weights found (looked for {})",
                WEIGHT_FILE_CANDIDATES.join(", ")
            ),
        })
}

/// A `*.index.json` shard index (`{"weight_map": {tensor: shard file}}`).
#[derive(Debug, Clone)]
pub struct ShardIndex {
    /// The index file.
    pub path: PathBuf,
    /// Folder the shard names are relative to.
    pub dir: PathBuf,
    /// Tensor name -> shard file name.
    pub weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Reads and checks an index file: shard names must be plain relative paths.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |message: String| Error::WeightFile {
            path: path.to_path_buf(),
            message,
        };
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("invalid shard index JSON: {e}")))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut weight_map = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(format!("shard of `{tensor}` is not a string")))?;
            let p = Path::new(shard);
            let plain = p
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if shard.is_empty() || !plain {
                return Err(bad(format!(
                    "shard `{shard}` of `{tensor}` is not a file name inside the folder"
                )));
            }
            weight_map.insert(tensor.clone(), shard.to_string());
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(ShardIndex {
            path: path.to_path_buf(),
            dir,
            weight_map,
        })
    }

    /// Distinct shard file names, sorted.
    pub fn shard_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.weight_map.values().cloned().collect();
        names.sort();
        names.dedup();
        names
    }

    /// Shard paths, each checked to exist.
    pub fn shard_paths(&self) -> Result<Vec<PathBuf>> {
        self.shard_names()
            .into_iter()
            .map(|name| {
                let p = self.dir.join(&name);
                if p.is_file() {
                    Ok(p)
                } else {
                    let tensor = self
                        .weight_map
                        .iter()
                        .find(|(_, s)| **s == name)
                        .map(|(t, _)| t.as_str())
                        .unwrap_or("");
                    Err(Error::WeightFile {
                        path: p,
                        message: format!(
                            "missing: {} lists it (tensor `{tensor}`)",
                            self.path.display()
                        ),
                    })
                }
            })
            .collect()
    }
}
