//! `x · wᵀ` with f32 activations and bf16/f16 (or quantized, see `quant`) weights that stay so
//! in memory.
//!
//! candle's CPU bf16 matmul widens both whole operands to f32 on every call: for an 8B model
//! that is a transient f32 copy of each matrix per step. Here a decode step widens four weight
//! rows at a time into an L1-sized buffer (the small-rows kernel; bf16 rows are widened in
//! registers instead where the CPU has AVX2, see `bf16_rows`), and a prefill widens a panel
//! of a few hundred rows (a few MB) and hands it to the same gemm candle uses, writing straight
//! into the output's columns. Accumulation is f32 throughout.

use crate::kernels::bf16_rows::small_rows_bf16;
use crate::kernels::gemm::{xwt_rows, XWT_MAX_ROWS};
use crate::kernels::matmul_small::{max_rows, small_rows, WeightRows, MAX_ROWS};
use crate::kernels::simd;
use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// A narrow float weight, row-major `[N, K]`.
enum Narrow<'a> {
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

struct NarrowRows<'a> {
    w: Narrow<'a>,
    k: usize,
}

impl WeightRows for NarrowRows<'_> {
    const WIDENS: bool = true;
    fn widen(&self, j: usize, out: &mut [f32]) {
        let k = self.k;
        match self.w {
            Narrow::Bf16(v) => v[j * k..(j + 1) * k].convert_to_f32_slice(out),
            Narrow::F16(v) => v[j * k..(j + 1) * k].convert_to_f32_slice(out),
        }
    }
}

/// Panel height for a prefill: about 2 MB of widened weights (at least 64 rows), so the panel
/// stays in cache while gemm sweeps the activations over it.
fn panel_rows(k: usize) -> usize {
    ((512 * 1024) / k.max(1)).clamp(64, 4096)
}

/// `x: [M, K]` f32 (contiguous values), `w: [N, K]` bf16 or f16 CPU tensor: `[M, N]` f32.
pub fn matmul(x: &[f32], m: usize, k: usize, w: &Tensor) -> Result<Vec<f32>> {
    let (n, k2) = w.dims2()?;
    if k != k2 {
        bail!("matmul: inner dimensions {k} and {k2} differ");
    }
    if !w.is_contiguous() {
        bail!("matmul: a narrow weight must be contiguous");
    }
    let (storage, layout) = w.storage_and_layout();
    let start = layout.start_offset();
    let src = match (&*storage, w.dtype()) {
        (Storage::Cpu(CpuStorage::BF16(v)), DType::BF16) => Narrow::Bf16(&v[start..start + n * k]),
        (Storage::Cpu(CpuStorage::F16(v)), DType::F16) => Narrow::F16(&v[start..start + n * k]),
        (_, dt) => bail!("matmul: expected a bf16 or f16 CPU weight, got {dt:?}"),
    };
    if let (Narrow::Bf16(w), true) = (&src, m <= MAX_ROWS) {
        if let Some(out) = small_rows_bf16(simd::level(), x, w, m, n, k) {
            return Ok(out);
        }
    }
    // A prefill with bf16 compute asked for (the `avx512bf16` level) runs on AMX tiles where
    // the CPU has them, else on `vdpbf16ps` (which the level implies): activations rounded to
    // bf16 as the decode steps round them.
    #[cfg(target_arch = "x86_64")]
    if let (Narrow::Bf16(w), simd::Level::Avx512Bf16) = (&src, simd::level()) {
        use crate::kernels::gemm::{matmul_rhs, Mat, Rhs};
        let b = crate::kernels::pack::Src::Bf16Rows { data: w, n, k };
        let rhs = Rhs::packed_bf16(b).expect("the avx512bf16 level implies AVX-512 BF16");
        let mut out = vec![0f32; m * n];
        matmul_rhs(&mut out, n, Mat::new(x, m, k), &rhs, false, true);
        return Ok(out);
    }
    Ok(matmul_rows(x, m, k, n, &NarrowRows { w: src, k }))
}

/// `x: [M, K]` against `N` weight rows widened by `rows`: `[M, N]` f32, by the path an f32
/// weight's `linear` takes at that row count (so a dequantized weight gives its values to the
/// bit): few rows through the small-rows kernel (four weight rows widened at a time), a decode
/// step's many through `gemm::xwt_rows` (widened a block or sub-band at a time), a prefill's
/// through gemm on widened panels.
pub(crate) fn matmul_rows<R: WeightRows>(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    rows: &R,
) -> Vec<f32> {
    if m <= max_rows(simd::level()) {
        return small_rows(x, rows, m, n, k);
    }
    if m <= XWT_MAX_ROWS {
        return xwt_rows(x, m, k, rows, n);
    }
    let mut out = vec![0f32; m * n];
    let p = panel_rows(k);
    let mut panel = vec![0f32; p * k];
    let threads = rayon::current_num_threads();
    for j0 in (0..n).step_by(p) {
        let np = p.min(n - j0);
        panel[..np * k]
            .par_chunks_mut(k)
            .enumerate()
            .for_each(|(r, buf)| rows.widen(j0 + r, buf));
        // SAFETY: out is [m, n] row-major, and columns j0..j0+np of every row are in bounds;
        // x is [m, k] row-major; the panel is [np, k] row-major, read as its transpose [k, np]
        // (column stride k, row stride 1). gemm writes only the dst elements it is given.
        unsafe {
            gemm::gemm(
                m,
                np,
                k,
                out.as_mut_ptr().add(j0),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                panel.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pseudo;
    use candle_core::Device;

    /// Under the `avx512bf16` level a prefill on bf16 weights runs on AMX where the CPU has it,
    /// on `vdpbf16ps` where not; it must equal the level's decode path (`vdpbf16ps` on the same
    /// bf16-rounded activations, 32 rows at a time) up to f32 summation order. Runs in a process started with
    /// SAFETY_LAYERS_SIMD=avx512bf16 (.ci/run does, where the CPU has AVX-512 BF16).
    #[test]
    fn bf16_compute_prefill_equals_the_decode_path() {
        if simd::level() != simd::Level::Avx512Bf16 {
            eprintln!("skipped: kernels run {}", simd::describe());
            return;
        }
        let (m, n, k) = (100, 300, 576);
        let x = pseudo(m * k, 3);
        let w = Tensor::from_vec(pseudo(n * k, 4), (n, k), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let got = matmul(&x, m, k, &w).unwrap();
        for i0 in (0..m).step_by(MAX_ROWS) {
            let rows = MAX_ROWS.min(m - i0);
            let want = matmul(&x[i0 * k..(i0 + rows) * k], rows, k, &w).unwrap();
            for (e, g) in want.iter().zip(&got[i0 * n..(i0 + rows) * n]) {
                assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{g} vs {e}");
            }
        }
        eprintln!("prefill on {} (AMX: {})", simd::describe(), amx_here());
    }

    fn amx_here() -> bool {
        #[cfg(target_arch = "x86_64")]
        return crate::kernels::amx::available();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Both paths (few rows, panels) against candle's f32 matmul on the widened weight, for
    /// bf16 and f16, with row counts and widths that leave tails everywhere.
    #[test]
    fn equals_f32_matmul_on_the_widened_weight() {
        for (m, n, k) in [
            (1, 7, 9),
            (3, 33, 64),
            (32, 100, 576),
            (33, 70, 96),
            (200, 1500, 40),
        ] {
            let x = pseudo(m * k, 1);
            // The avx512bf16 level rounds the activations on bf16 weights (tested above).
            let bf16_exact = simd::level() != simd::Level::Avx512Bf16;
            for dt in [DType::BF16, DType::F16] {
                if dt == DType::BF16 && !bf16_exact {
                    continue;
                }
                let w = Tensor::from_vec(pseudo(n * k, 2), (n, k), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let got = matmul(&x, m, k, &w).unwrap();
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let wf = w.to_dtype(DType::F32).unwrap();
                let want = xt.matmul(&wf.t().unwrap()).unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()) * (k as f32).sqrt(),
                        "{dt:?} {m}x{n}x{k}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
