//! GGML tensor types: ids, llama.cpp's names, block layouts, and which ones Candle computes with.
//!
//! The block layouts (elements per block, bytes per block) are those of ggml's type traits
//! (`ggml/src/ggml.c`) and gguf-py's `GGML_QUANT_SIZES`; they are needed for every type, not only
//! the supported ones, so that a file holding IQ*/TQ*/MXFP4 tensors still parses completely.

use candle_core::quantized::GgmlDType;

/// The GGML type of a tensor, by its id in the file. Ids that ggml has removed (4, 5, 31-33,
/// 36-38) or that are newer than this list are [`GgufType::Unknown`].
#[allow(non_camel_case_types)] // llama.cpp's spellings (IQ2_XXS, TQ1_0) read better than IQ2Xxs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    Q2_0,
    /// A type id this reader does not know.
    Unknown(u32),
}

/// Elements per super-block of the k-quants and most i-quants.
const QK_K: usize = 256;

/// Every known type with its id, name, elements per block and bytes per block.
const TABLE: &[(GgufType, u32, &str, usize, usize)] = &[
    (GgufType::F32, 0, "F32", 1, 4),
    (GgufType::F16, 1, "F16", 1, 2),
    (GgufType::Q4_0, 2, "Q4_0", 32, 2 + 16),
    (GgufType::Q4_1, 3, "Q4_1", 32, 2 + 2 + 16),
    (GgufType::Q5_0, 6, "Q5_0", 32, 2 + 4 + 16),
    (GgufType::Q5_1, 7, "Q5_1", 32, 2 + 2 + 4 + 16),
    (GgufType::Q8_0, 8, "Q8_0", 32, 2 + 32),
    (GgufType::Q8_1, 9, "Q8_1", 32, 2 + 2 + 32),
    (
        GgufType::Q2K,
        10,
        "Q2_K",
        QK_K,
        2 + 2 + QK_K / 16 + QK_K / 4,
    ),
    (
        GgufType::Q3K,
        11,
        "Q3_K",
        QK_K,
        2 + QK_K / 4 + QK_K / 8 + 12,
    ),
    (GgufType::Q4K, 12, "Q4_K", QK_K, 2 + 2 + QK_K / 2 + 12),
    (
        GgufType::Q5K,
        13,
        "Q5_K",
        QK_K,
        2 + 2 + QK_K / 2 + QK_K / 8 + 12,
    ),
    (
        GgufType::Q6K,
        14,
        "Q6_K",
        QK_K,
        2 + QK_K / 2 + QK_K / 4 + QK_K / 16,
    ),
    (GgufType::Q8K, 15, "Q8_K", QK_K, 4 + QK_K + QK_K / 8),
    (GgufType::IQ2_XXS, 16, "IQ2_XXS", QK_K, 2 + QK_K / 4),
    (
        GgufType::IQ2_XS,
        17,
        "IQ2_XS",
        QK_K,
        2 + QK_K / 4 + QK_K / 32,
    ),
    (
        GgufType::IQ3_XXS,
        18,
        "IQ3_XXS",
        QK_K,
        2 + QK_K / 4 + QK_K / 8,
    ),
    (GgufType::IQ1_S, 19, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16),
    (GgufType::IQ4_NL, 20, "IQ4_NL", 32, 2 + 16),
    (
        GgufType::IQ3_S,
        21,
        "IQ3_S",
        QK_K,
        2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
    ),
    (GgufType::IQ2_S, 22, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16),
    (
        GgufType::IQ4_XS,
        23,
        "IQ4_XS",
        QK_K,
        2 + 2 + QK_K / 2 + QK_K / 64,
    ),
    (GgufType::I8, 24, "I8", 1, 1),
    (GgufType::I16, 25, "I16", 1, 2),
    (GgufType::I32, 26, "I32", 1, 4),
    (GgufType::I64, 27, "I64", 1, 8),
    (GgufType::F64, 28, "F64", 1, 8),
    (
        GgufType::IQ1_M,
        29,
        "IQ1_M",
        QK_K,
        QK_K / 8 + QK_K / 16 + QK_K / 32,
    ),
    (GgufType::BF16, 30, "BF16", 1, 2),
    (GgufType::TQ1_0, 34, "TQ1_0", QK_K, 2 + 4 * 13),
    (GgufType::TQ2_0, 35, "TQ2_0", QK_K, 2 + 64),
    (GgufType::MXFP4, 39, "MXFP4", 32, 1 + 16),
    (GgufType::NVFP4, 40, "NVFP4", 64, 4 + 32),
    (GgufType::Q1_0, 41, "Q1_0", 128, 2 + 16),
    (GgufType::Q2_0, 42, "Q2_0", 64, 2 + 16),
];

impl GgufType {
    /// The type of a GGML type id as stored in a tensor info.
    ///
    /// ```
    /// use mamba2::gguf::GgufType;
    /// assert_eq!(GgufType::from_id(12), GgufType::Q4K);
    /// assert_eq!(GgufType::from_id(17).name(), "IQ2_XS");
    /// assert_eq!(GgufType::from_id(99), GgufType::Unknown(99));
    /// assert_eq!(GgufType::from_id(99).name(), "type 99");
    /// ```
    pub fn from_id(id: u32) -> GgufType {
        TABLE
            .iter()
            .find(|row| row.1 == id)
            .map(|row| row.0)
            .unwrap_or(GgufType::Unknown(id))
    }

    /// The GGML type id.
    pub fn id(&self) -> u32 {
        match self {
            GgufType::Unknown(id) => *id,
            // Every named variant has a row (the unit test below checks).
            _ => self.row().map_or(u32::MAX, |r| r.1),
        }
    }

    /// llama.cpp's spelling (`"Q4_K"`, `"IQ2_XS"`, `"MXFP4"`), or `"type N"` for unknown ids.
    pub fn name(&self) -> String {
        match self.row() {
            Some(row) => row.2.to_string(),
            None => format!("type {}", self.id()),
        }
    }

    /// Elements per block (1 for the plain types); `None` for unknown types.
    pub fn block_size(&self) -> Option<usize> {
        self.row().map(|r| r.3)
    }

    /// Bytes per block; `None` for unknown types.
    pub fn type_size(&self) -> Option<usize> {
        self.row().map(|r| r.4)
    }

    /// The Candle type for the ones this engine computes with (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
    /// Q5_1, Q8_0, Q2_K..Q6_K, Q8_K); `None` otherwise.
    ///
    /// ```
    /// use candle_core::quantized::GgmlDType;
    /// use mamba2::gguf::GgufType;
    /// assert_eq!(GgufType::Q6K.to_candle(), Some(GgmlDType::Q6K));
    /// assert_eq!(GgufType::IQ4_XS.to_candle(), None);
    /// ```
    pub fn to_candle(&self) -> Option<GgmlDType> {
        Some(match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::BF16 => GgmlDType::BF16,
            GgufType::Q4_0 => GgmlDType::Q4_0,
            GgufType::Q4_1 => GgmlDType::Q4_1,
            GgufType::Q5_0 => GgmlDType::Q5_0,
            GgufType::Q5_1 => GgmlDType::Q5_1,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q2K => GgmlDType::Q2K,
            GgufType::Q3K => GgmlDType::Q3K,
            GgufType::Q4K => GgmlDType::Q4K,
            GgufType::Q5K => GgmlDType::Q5K,
            GgufType::Q6K => GgmlDType::Q6K,
            GgufType::Q8K => GgmlDType::Q8K,
            // Q8_1 is llama.cpp's intermediate for dot products, never written by its tools.
            _ => return None,
        })
    }

    fn row(&self) -> Option<&'static (GgufType, u32, &'static str, usize, usize)> {
        TABLE.iter().find(|row| row.0 == *self)
    }
}

impl std::fmt::Display for GgufType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_names_are_unique() {
        for row in TABLE {
            assert_eq!(GgufType::from_id(row.1), row.0);
            assert_eq!(row.0.id(), row.1);
            assert_eq!(
                TABLE.iter().filter(|r| r.2 == row.2).count(),
                1,
                "{}",
                row.2
            );
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 43, u32::MAX] {
            assert_eq!(GgufType::from_id(removed), GgufType::Unknown(removed));
            assert_eq!(GgufType::from_id(removed).block_size(), None);
        }
    }

    #[test]
    fn candle_types_agree_on_block_layout() {
        for row in TABLE {
            if let Some(dt) = row.0.to_candle() {
                assert_eq!(dt.block_size(), row.3, "{}", row.2);
                assert_eq!(dt.type_size(), row.4, "{}", row.2);
            }
        }
    }
}
