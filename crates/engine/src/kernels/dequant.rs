//! Quantized weight rows widened to f32 for the batched paths of `quant` (decode steps of more
//! than a few rows, prefills), which widen every weight row once per matmul.
//!
//! candle's `to_float` widens one value at a time; in a batched decode of SmolLM2 Q4_1 on the
//! 2-core Xeon (model 207, 96 prompts at 32 rows) it took 28% of the samples, as much as the
//! products themselves. These give candle's values to the bit. Every type's formula is, per 16
//! values, `q as f32 * a + b`, rounded after the product and after the sum as candle rounds
//! them (Q4_1: `q * d + m`; Q4_K: `d1 * q - m1`, a sum of `-m1`; Q8_0 and Q6_K have no sum, and
//! adding `-0.0` changes no value, not even a zero's sign). So a type only says how its bytes
//! unpack into groups of 16 small integers with their `a` and `b` (plain byte loops, which the
//! compiler vectorizes on the baseline ISA); each SIMD level owns only the widening of a group.
//! Types without a decoder here keep candle's `to_float`.

use crate::kernels::simd::Level;
use candle_core::quantized::GgmlDType;

/// Sixteen values of a block: `q[i] as f32 * a + b`, `q` read as u8 or i8 (the type's `SIGNED`).
#[derive(Clone, Copy, Default)]
struct Group {
    q: [u8; 16],
    a: f32,
    b: f32,
}

/// One block type's layout and unpacking. `decode` fills `GROUPS` groups in output order with
/// whole-array operations (one vector each on the baseline ISA, so the SIMD widening reads them
/// back whole: byte-by-byte stores read as one vector stalled store forwarding).
trait Format {
    /// Bytes of a block.
    const SIZE: usize;
    const GROUPS: usize;
    const SIGNED: bool;
    fn decode(b: &[u8], g: &mut [Group; 16]);
}

/// The f16 at `at`, widened exactly by bit arithmetic (half's `to_f32` is an out-of-line call
/// that checks for F16C each time: 4% of a batched Q4_1 decode).
#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    let h = u16::from_le_bytes([b[at], b[at + 1]]) as u32;
    let sign = (h & 0x8000) << 16;
    let (exp, man) = ((h >> 10) & 0x1F, h & 0x3FF);
    match exp {
        // Zero or subnormal: man * 2^-24, exact in f32.
        0 => f32::from_bits((man as f32 * (1.0 / 16_777_216.0)).to_bits() | sign),
        // Infinity, or NaN made quiet as half makes it.
        0x1F if man == 0 => f32::from_bits(sign | 0x7F80_0000),
        0x1F => f32::from_bits(sign | 0x7FC0_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

fn bytes16(b: &[u8], at: usize) -> [u8; 16] {
    b[at..at + 16].try_into().expect("16 bytes")
}

/// d (f16), m (f16), 16 bytes of nibbles (low: values 0-15, high: 16-31).
struct Q41;
impl Format for Q41 {
    const SIZE: usize = 20;
    const GROUPS: usize = 2;
    const SIGNED: bool = false;
    #[inline(always)]
    fn decode(b: &[u8], g: &mut [Group; 16]) {
        let (a, m) = (f16_at(b, 0), f16_at(b, 2));
        let raw = bytes16(b, 4);
        g[0] = Group {
            q: raw.map(|v| v & 0x0F),
            a,
            b: m,
        };
        g[1] = Group {
            q: raw.map(|v| v >> 4),
            a,
            b: m,
        };
    }
}

/// d (f16), 32 signed bytes.
struct Q80;
impl Format for Q80 {
    const SIZE: usize = 34;
    const GROUPS: usize = 2;
    const SIGNED: bool = true;
    #[inline(always)]
    fn decode(b: &[u8], g: &mut [Group; 16]) {
        let a = f16_at(b, 0);
        g[0] = Group {
            q: bytes16(b, 2),
            a,
            b: -0.0,
        };
        g[1] = Group {
            q: bytes16(b, 18),
            a,
            b: -0.0,
        };
    }
}

/// ggml's packing of Q4_K's eight 6-bit scales and mins (`get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// d (f16), dmin (f16), 12 bytes of scales and mins, 128 bytes of nibbles: four runs of 64
/// values, each 32 bytes whose low nibbles come first (scale 2j) and high nibbles next (2j+1).
struct Q4k;
impl Format for Q4k {
    const SIZE: usize = 144;
    const GROUPS: usize = 16;
    const SIGNED: bool = false;
    #[inline(always)]
    fn decode(b: &[u8], g: &mut [Group; 16]) {
        let (d, min) = (f16_at(b, 0), f16_at(b, 2));
        let scales = &b[4..16];
        for j in 0..4 {
            for (half, shift) in [(0, 0), (1, 4)] {
                let (sc, m) = scale_min_k4(2 * j + half, scales);
                let (a, off) = (d * sc as f32, min * m as f32);
                for h in 0..2 {
                    let raw = bytes16(b, 16 + 32 * j + 16 * h);
                    let q = raw.map(|v| (v >> shift) & 0x0F);
                    g[4 * j + 2 * half + h] = Group { q, a, b: -off };
                }
            }
        }
    }
}

/// 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed scales, d (f16); values are
/// 6-bit, offset by 32, each 16 scaled by `d * scale`.
struct Q6k;
impl Format for Q6k {
    const SIZE: usize = 210;
    const GROUPS: usize = 16;
    const SIGNED: bool = true;
    #[inline(always)]
    fn decode(b: &[u8], g: &mut [Group; 16]) {
        let d = f16_at(b, 208);
        for n in 0..2 {
            // Runs of 32: low nibbles of ql[0..32], of ql[32..64], high nibbles of each.
            for run in 0..4 {
                let (at, shift) = (64 * n + 32 * (run % 2), 4 * (run / 2));
                for h in 0..2 {
                    let ql = bytes16(b, at + 16 * h);
                    let qh = bytes16(b, 128 + 32 * n + 16 * h);
                    let q = std::array::from_fn(|i| {
                        let low = (ql[i] >> shift) & 0x0F;
                        let high = (qh[i] >> (2 * run)) & 3;
                        (low | (high << 4)).wrapping_sub(32)
                    });
                    let a = d * (b[192 + 8 * n + h + 2 * run] as i8) as f32;
                    g[8 * n + 2 * run + h] = Group { q, a, b: -0.0 };
                }
            }
        }
    }
}

/// Widens whole rows of quantized weights on a level the CPU runs: the type's decoder and the
/// level's widening. None for a type without a decoder here.
pub(crate) struct Widen {
    t: GgmlDType,
    level: Level,
}

impl Widen {
    pub(crate) fn new(t: GgmlDType, level: Level) -> Option<Widen> {
        use GgmlDType::*;
        matches!(t, Q4_1 | Q8_0 | Q4K | Q6K).then_some(Widen { t, level })
    }

    /// `blocks`: whole blocks of the type, as many as `out` has values.
    pub(crate) fn run(&self, blocks: &[u8], out: &mut [f32]) {
        use GgmlDType::*;
        match self.t {
            Q4_1 => self.typed::<Q41>(blocks, out),
            Q8_0 => self.typed::<Q80>(blocks, out),
            Q4K => self.typed::<Q4k>(blocks, out),
            Q6K => self.typed::<Q6k>(blocks, out),
            t => unreachable!("no decoder for {t:?} (Widen::new)"),
        }
    }

    fn typed<F: Format>(&self, blocks: &[u8], out: &mut [f32]) {
        let nb = blocks.len() / F::SIZE;
        assert!(blocks.len() == nb * F::SIZE && out.len() == nb * 16 * F::GROUPS);
        // SAFETY: the level is one the CPU runs (the caller's contract); lengths checked above.
        match self.level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Avx512Bf16 => unsafe { x86::run_avx512::<F>(blocks, out) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { x86::run_avx2::<F>(blocks, out) },
            #[cfg(target_arch = "aarch64")]
            Level::Neon => unsafe { arm::run_neon::<F>(blocks, out) },
            _ => run_scalar::<F>(blocks, out),
        }
    }
}

/// The reference: candle's arithmetic, one value at a time.
fn run_scalar<F: Format>(blocks: &[u8], out: &mut [f32]) {
    let mut g = [Group::default(); 16];
    for (b, o) in blocks
        .chunks_exact(F::SIZE)
        .zip(out.chunks_exact_mut(16 * F::GROUPS))
    {
        F::decode(b, &mut g);
        for (gr, o) in g[..F::GROUPS].iter().zip(o.chunks_exact_mut(16)) {
            for (v, &q) in o.iter_mut().zip(&gr.q) {
                let q = if F::SIGNED { q as i8 as f32 } else { q as f32 };
                *v = q * gr.a + gr.b;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Format, Group};
    use std::arch::x86_64::*;

    /// Caller: AVX-512 F/BW; `out` holds `16 * GROUPS` values per block of `blocks`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn run_avx512<F: Format>(blocks: &[u8], out: &mut [f32]) {
        let mut g = [Group::default(); 16];
        let mut o = out.as_mut_ptr();
        for b in blocks.chunks_exact(F::SIZE) {
            F::decode(b, &mut g);
            for gr in &g[..F::GROUPS] {
                let q = _mm_loadu_si128(gr.q.as_ptr() as *const __m128i);
                let q = if F::SIGNED {
                    _mm512_cvtepi8_epi32(q)
                } else {
                    _mm512_cvtepu8_epi32(q)
                };
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(gr.a));
                _mm512_storeu_ps(o, _mm512_add_ps(v, _mm512_set1_ps(gr.b)));
                o = o.add(16);
            }
        }
    }

    /// Caller: AVX2; as `run_avx512`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn run_avx2<F: Format>(blocks: &[u8], out: &mut [f32]) {
        let mut g = [Group::default(); 16];
        let mut o = out.as_mut_ptr();
        for b in blocks.chunks_exact(F::SIZE) {
            F::decode(b, &mut g);
            for gr in &g[..F::GROUPS] {
                let all = _mm_loadu_si128(gr.q.as_ptr() as *const __m128i);
                let (a, c) = (_mm256_set1_ps(gr.a), _mm256_set1_ps(gr.b));
                for q in [all, _mm_srli_si128(all, 8)] {
                    let q = if F::SIGNED {
                        _mm256_cvtepi8_epi32(q)
                    } else {
                        _mm256_cvtepu8_epi32(q)
                    };
                    let v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), a);
                    _mm256_storeu_ps(o, _mm256_add_ps(v, c));
                    o = o.add(8);
                }
            }
        }
    }
}

/// `vmulq` then `vaddq`, as the x86 paths: the product rounded, then the sum.
#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{Format, Group};
    use std::arch::aarch64::*;

    /// Caller: `out` holds `16 * GROUPS` values per block of `blocks` (NEON is in the aarch64
    /// baseline).
    pub(super) unsafe fn run_neon<F: Format>(blocks: &[u8], out: &mut [f32]) {
        let mut g = [Group::default(); 16];
        let mut o = out.as_mut_ptr();
        for b in blocks.chunks_exact(F::SIZE) {
            F::decode(b, &mut g);
            for gr in &g[..F::GROUPS] {
                let (a, c) = (vdupq_n_f32(gr.a), vdupq_n_f32(gr.b));
                let raw = vld1q_u8(gr.q.as_ptr());
                // Four quads of 32-bit integers, in order.
                let quads: [float32x4_t; 4] = if F::SIGNED {
                    let q = vreinterpretq_s8_u8(raw);
                    let (lo, hi) = (vmovl_s8(vget_low_s8(q)), vmovl_s8(vget_high_s8(q)));
                    [
                        vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
                        vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))),
                        vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
                        vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))),
                    ]
                } else {
                    let (lo, hi) = (vmovl_u8(vget_low_u8(raw)), vmovl_u8(vget_high_u8(raw)));
                    [
                        vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))),
                        vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo))),
                        vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))),
                        vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi))),
                    ]
                };
                for v in quads {
                    vst1q_f32(o, vaddq_f32(vmulq_f32(v, a), c));
                    o = o.add(4);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pseudo;
    use candle_core::quantized::{QStorage, QTensor};
    use candle_core::{Device, Tensor};

    /// Every level this CPU runs (the scalar one included) against candle's `to_float`, to the
    /// bit: on real quantized rows, and on blocks whose bytes run through every value (random
    /// nibbles, highs and scales) with odd f16 scales (subnormal, negative zero, infinite).
    #[test]
    fn levels_equal_candle_to_the_bit() {
        for t in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let (size, groups) = match t {
                GgmlDType::Q4_1 => (Q41::SIZE, Q41::GROUPS),
                GgmlDType::Q8_0 => (Q80::SIZE, Q80::GROUPS),
                GgmlDType::Q4K => (Q4k::SIZE, Q4k::GROUPS),
                _ => (Q6k::SIZE, Q6k::GROUPS),
            };
            let per = 16 * groups;
            let (n, k) = (5, per * 3);
            let w = Tensor::from_vec(pseudo(n * k, 11), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, t).unwrap();
            let mut bytes = q.data().unwrap().to_vec();
            assert_eq!(bytes.len(), n * k / per * size, "{t:?} block size");
            let odd = [0x0001u16, 0x8000, 0x7C00, 0x3555, 0xFBFF, 0x03FF];
            // The f16 fields of each type: Q4_1 d, m; Q8_0 d; Q4_K d, dmin; Q6_K d.
            let fields: &[usize] = match t {
                GgmlDType::Q4_1 | GgmlDType::Q4K => &[0, 2],
                GgmlDType::Q8_0 => &[0],
                _ => &[208],
            };
            let first_row_blocks = k / per;
            let mut x = 0x9E37_79B9u32;
            for blk in 0..first_row_blocks {
                let b = &mut bytes[blk * size..(blk + 1) * size];
                for v in b.iter_mut() {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    *v = (x >> 24) as u8;
                }
                for (i, &at) in fields.iter().enumerate() {
                    let s = odd[(blk + i) % odd.len()];
                    b[at..at + 2].copy_from_slice(&s.to_le_bytes());
                }
            }
            let storage =
                QStorage::from_data(std::borrow::Cow::Borrowed(&bytes), &Device::Cpu, t).unwrap();
            let q = QTensor::new(storage, (n, k)).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
            let want = want.to_vec1::<f32>().unwrap();
            for level in crate::kernels::simd::test_levels("dequant") {
                let wid = Widen::new(t, level).unwrap();
                let mut got = vec![0f32; n * k];
                // Row by row, as the kernels call it.
                for (r, o) in got.chunks_exact_mut(k).enumerate() {
                    let row = k / per * size;
                    wid.run(&bytes[r * row..(r + 1) * row], o);
                }
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
                        "{t:?} {level:?} at {i}: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// The scales' widening, every f16 against half's (F16C where the CPU has it), to the bit.
    #[test]
    fn every_f16_widens_as_half_does() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_at(&h.to_le_bytes(), 0);
            assert_eq!(got.to_bits(), want.to_bits(), "f16 {h:#06x}");
        }
    }

    /// A group-order slip (the high nibbles' group written first) must fail the comparison
    /// above: the same check on a mutated Q4_1 decoder.
    #[test]
    fn a_swapped_group_is_caught() {
        struct Swapped;
        impl Format for Swapped {
            const SIZE: usize = Q41::SIZE;
            const GROUPS: usize = Q41::GROUPS;
            const SIGNED: bool = Q41::SIGNED;
            fn decode(b: &[u8], g: &mut [Group; 16]) {
                Q41::decode(b, g);
                g.swap(0, 1);
            }
        }
        let w = Tensor::from_vec(pseudo(64, 5), (1, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let bytes = q.data().unwrap().to_vec();
        let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let want = want.to_vec1::<f32>().unwrap();
        let mut got = vec![0f32; 64];
        run_scalar::<Swapped>(&bytes, &mut got);
        assert!(got
            .iter()
            .zip(&want)
            .any(|(g, e)| g.to_bits() != e.to_bits()));
        run_scalar::<Q41>(&bytes, &mut got);
        assert!(got
            .iter()
            .zip(&want)
            .all(|(g, e)| g.to_bits() == e.to_bits()));
    }
}
