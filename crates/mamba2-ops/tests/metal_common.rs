//! Helpers shared by the MSL-harness tests (`metal_harness.rs`, `metal_layer.rs`): host buffers
//! of each dtype, binding, poisoned outputs, random inputs, the tolerance table.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use msl_harness::{Dispatch, Library};
use rand::{rngs::StdRng, Rng};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// `(atol, rtol)` per output dtype: a kernel output passes when
/// `|got - want| <= atol + rtol * |want|` element-wise. Kernels and references both compute in
/// f32 and round once to the output dtype, so the half/bfloat tolerances cover one rounding step
/// of the output (2^-11, 2^-8) plus f32 summation-order differences.
pub fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (2e-5, 2e-4),
        DType::F16 => (2e-3, 2e-3),
        DType::BF16 => (1e-2, 1e-2),
        other => panic!("no tolerance for {other:?}"),
    }
}

pub fn dtype_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => panic!("no kernel variant for {other:?}"),
    }
}

pub fn kernel_name(op: &str, dtype: DType) -> String {
    format!("{op}_{}", dtype_suffix(dtype))
}

/// The compiled `.metal` file (compiled once per test process).
pub fn library(file: &str) -> &'static Library {
    static LIBS: OnceLock<Mutex<HashMap<String, &'static Library>>> = OnceLock::new();
    let mut libs = LIBS.get_or_init(Default::default).lock().unwrap();
    libs.entry(file.to_string()).or_insert_with(|| {
        let path = format!("{}/../../kernels/metal/{file}", env!("CARGO_MANIFEST_DIR"));
        Box::leak(Box::new(
            Library::compile(&[path]).unwrap_or_else(|e| panic!("{file}: {e}")),
        ))
    })
}

/// Random values uniform in `[-scale, scale)`, rounded to `dtype`.
pub fn rand_t(rng: &mut StdRng, dims: &[usize], scale: f32, dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Random values uniform in `[lo, hi)`, f32.
pub fn rand_range(rng: &mut StdRng, dims: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| lo + rng.random::<f32>() * (hi - lo))
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// `(batch, seqlen)` u32 packed-sequence ids: runs of random lengths, ids increasing, with one
/// id repeated after a different one in row 0 (a new run, not a continuation).
pub fn seq_ids(rng: &mut StdRng, batch: usize, seqlen: usize) -> Tensor {
    let mut v = Vec::with_capacity(batch * seqlen);
    for b in 0..batch {
        let mut id = 0u32;
        let mut row = Vec::with_capacity(seqlen);
        while row.len() < seqlen {
            let len = 1 + rng.random_range(0..(seqlen / 2).max(2));
            for _ in 0..len.min(seqlen - row.len()) {
                row.push(id);
            }
            id += 1;
        }
        if b == 0 && seqlen >= 6 {
            // ids [.., 1, 0, ..]: the reference splits on any change, so 0 again is a new run
            let t = seqlen - 3;
            row[t] = 0;
            row[t + 1] = 0;
        }
        v.extend(row);
    }
    Tensor::from_vec(v, (batch, seqlen), &Device::Cpu).unwrap()
}

/// A host buffer of one dtype, bound to a harness dispatch.
pub enum HostBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    U32(Vec<u32>),
}

impl HostBuf {
    pub fn from_tensor(t: &Tensor) -> HostBuf {
        let t = t.flatten_all().unwrap();
        match t.dtype() {
            DType::F32 => HostBuf::F32(t.to_vec1().unwrap()),
            DType::F16 => HostBuf::F16(t.to_vec1().unwrap()),
            DType::BF16 => HostBuf::BF16(t.to_vec1().unwrap()),
            DType::U32 => HostBuf::U32(t.to_vec1().unwrap()),
            other => panic!("unsupported {other:?}"),
        }
    }

    /// The tensor's values, or a 4-element dummy of `dtype` for an absent optional argument
    /// (the kernel never reads it; Metal still wants a buffer bound).
    pub fn opt(t: Option<&Tensor>, dtype: DType) -> HostBuf {
        match t {
            Some(t) => HostBuf::from_tensor(t),
            None => HostBuf::poisoned(dtype, 4),
        }
    }

    /// An output buffer filled with NaN (all-ones for u32), so unwritten elements fail.
    pub fn poisoned(dtype: DType, n: usize) -> HostBuf {
        match dtype {
            DType::F32 => HostBuf::F32(vec![f32::NAN; n]),
            DType::F16 => HostBuf::F16(vec![f16::NAN; n]),
            DType::BF16 => HostBuf::BF16(vec![bf16::NAN; n]),
            DType::U32 => HostBuf::U32(vec![u32::MAX; n]),
            other => panic!("unsupported {other:?}"),
        }
    }

    pub fn input<'b>(&'b self, k: &mut Dispatch<'_, 'b>, i: usize) {
        match self {
            HostBuf::F32(v) => k.input(i, v),
            HostBuf::F16(v) => k.input(i, v),
            HostBuf::BF16(v) => k.input(i, v),
            HostBuf::U32(v) => k.input(i, v),
        };
    }

    pub fn output<'b>(&'b mut self, k: &mut Dispatch<'_, 'b>, i: usize) {
        match self {
            HostBuf::F32(v) => k.buffer(i, v),
            HostBuf::F16(v) => k.buffer(i, v),
            HostBuf::BF16(v) => k.buffer(i, v),
            HostBuf::U32(v) => k.buffer(i, v),
        };
    }

    pub fn to_tensor(&self, dims: &[usize]) -> Tensor {
        let dev = Device::Cpu;
        match self {
            HostBuf::F32(v) => Tensor::from_slice(v, dims, &dev),
            HostBuf::F16(v) => Tensor::from_slice(v, dims, &dev),
            HostBuf::BF16(v) => Tensor::from_slice(v, dims, &dev),
            HostBuf::U32(v) => Tensor::from_slice(v, dims, &dev),
        }
        .unwrap()
    }
}

/// Element-wise `|got - want| <= atol + rtol * |want|` with the tolerance of `dtype`; NaN
/// anywhere fails. Reports the worst element.
pub fn assert_close(got: &Tensor, want: &Tensor, dtype: DType, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f32> = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (atol, rtol) = tolerance(dtype);
    // false for NaN on either side
    let within = |a: f32, b: f32| (a - b).abs() <= atol + rtol * b.abs();
    let excess = |a: f32, b: f32| {
        let e = (a - b).abs() - (atol + rtol * b.abs());
        if e.is_nan() {
            f32::INFINITY
        } else {
            e
        }
    };
    let mut worst: Option<(usize, f32)> = None;
    let mut bad = 0;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        if !within(a, b) {
            bad += 1;
            let e = excess(a, b);
            if worst.is_none_or(|(_, we)| e > we) {
                worst = Some((i, e));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: {bad}/{} elements out of tolerance ({atol}, {rtol}); worst [{i}] got {} want {}",
            g.len(),
            g[i],
            w[i]
        );
    }
}

/// The two SSD stages in the harness, as the Metal dispatch encodes them: `ssd_chunk_cb_*` into
/// a scratch buffer, then `ssd_chunk_scan_*`. `ins` are the scan's buffers 0..=9
/// (`x, dt, A, B, C, D, z, dt_bias, init, seq_idx`); returns `(y, final_state)`.
pub fn run_ssd_kernels(
    ins: &[HostBuf; 10],
    prm: &mamba2_ops::metal_params::SsdScanParams,
    dtype: DType,
    mode: msl_harness::Mode,
) -> Result<(HostBuf, HostBuf), msl_harness::Error> {
    use mamba2_ops::metal_params::{layout, KernelParams};
    let (bs, l, h, p, g, n) = (
        prm.batch as usize,
        prm.seqlen as usize,
        prm.nheads as usize,
        prm.headdim as usize,
        prm.ngroups as usize,
        prm.d_state as usize,
    );
    let chunk = layout::SSD_CHUNK as usize;
    let nchunks = l.div_ceil(chunk);
    let lib = library("ssd.metal");
    let mut cb = HostBuf::poisoned(DType::F32, bs * g * nchunks * chunk * chunk);
    {
        let mut k = lib.kernel(&kernel_name("ssd_chunk_cb", dtype))?;
        ins[3].input(&mut k, 0);
        ins[4].input(&mut k, 1);
        cb.output(&mut k, 2);
        k.raw_bytes(3, prm.as_bytes())
            .grid([nchunks as u32, g as u32, bs as u32])
            .threadgroup([layout::SSD_THREADS, 1, 1])
            .mode(mode)
            .dispatch()?;
    }
    let mut y = HostBuf::poisoned(dtype, bs * l * h * p);
    let mut s = HostBuf::poisoned(DType::F32, bs * h * p * n);
    {
        let mut k = lib.kernel(&kernel_name("ssd_chunk_scan", dtype))?;
        for (i, buf) in ins.iter().enumerate() {
            buf.input(&mut k, i);
        }
        y.output(&mut k, 10);
        s.output(&mut k, 11);
        cb.input(&mut k, 12);
        k.raw_bytes(13, prm.as_bytes())
            .grid([(p as u32) / layout::SSD_ROWS, h as u32, bs as u32])
            .threadgroup([layout::SSD_THREADS, 1, 1])
            .mode(mode)
            .dispatch()?;
    }
    Ok((y, s))
}
