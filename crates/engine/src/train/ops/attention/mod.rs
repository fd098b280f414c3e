//! Causal attention for training as one candle op with its own backward pass.
//!
//! The composed path (scale, matmul, soft-cap, mask add, softmax, matmul, transpose) keeps
//! about eight `[B, H, T, S]` intermediates alive until backward and runs its element-wise
//! steps single-threaded. This op keeps one `[B, H, T, S]` buffer: the probabilities, or with a
//! soft-cap the tanh values (plus each row's softmax max and sum), from which backward rebuilds
//! the exact same probabilities with one exp per element. That is cheaper than keeping both
//! tensors (twice the memory) and than recomputing the scores (a `QKᵀ` product plus a tanh
//! per element); it also gives the tanh derivative `1 - t²` from the very values the forward
//! used, as candle's tanh backward does.
//!
//! Per-head products go through `gemm` (single-threaded inside each task); rayon runs the
//! forward over (batch, head) pairs and the backward over (batch, kv head) groups, so the query
//! heads that share a kv head accumulate into its dK/dV without locks.

use crate::kernels::attention::dot;
use crate::kernels::SharedMut;
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Mutex;

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    s: usize,
    d: usize,
}

/// A strided 4-D f32 tensor `[B, H, R, C]` read in place.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    stride: [usize; 4],
}

impl<'a> View<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Self> {
        let stride = layout.stride();
        if stride.len() != 4 {
            candle_core::bail!(
                "fused attention: expected 4-D inputs, got {:?}",
                layout.dims()
            );
        }
        Ok(View {
            data: storage.as_slice::<f32>()?,
            start: layout.start_offset(),
            stride: [stride[0], stride[1], stride[2], stride[3]],
        })
    }

    /// A view of `data` (already checked to hold every element the shape reaches).
    fn from_parts(data: &'a [f32], start: usize, stride: [usize; 4]) -> Self {
        View {
            data,
            start,
            stride,
        }
    }

    /// Matrix `[R, C]` of (batch, head) from row `r0` on, as gemm reads it.
    fn mat(&self, b: usize, h: usize, r0: usize) -> Mat {
        let off = self.start + b * self.stride[0] + h * self.stride[1] + r0 * self.stride[2];
        Mat {
            // SAFETY: the layout was validated against the storage (by candle, or by the
            // packed op for its own buffers), so every (b, h, r, c) inside the shape is in
            // bounds; `off` is such an element's row r0, column 0.
            ptr: unsafe { self.data.as_ptr().add(off) },
            rs: self.stride[2] as isize,
            cs: self.stride[3] as isize,
        }
    }
}

#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl Mat {
    fn rows(ptr: *const f32, cols: usize) -> Mat {
        Mat {
            ptr,
            rs: cols as isize,
            cs: 1,
        }
    }

    fn t(self) -> Mat {
        Mat {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m, n] (+)= beta · a[m, k] · b[k, n]` with `dst` row-major (row stride `dst_rs`).
///
/// # Safety
/// `a` and `b` must address `m × k` and `k × n` readable elements, `dst` `m × n` writable ones
/// that nothing else touches during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A per-thread buffer of at least `n` values with stale contents, kept across calls: fresh
/// buffers per (head, step) cost page faults and, freed on rayon's threads, madvise calls.
/// Callers write every value they read. `f` must not reach a rayon join that could run
/// another task needing the scratch on this thread.
fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut v = cell.borrow_mut();
        if v.len() < n {
            v.resize(n, 0.0);
        }
        f(&mut v[..n])
    })
}

/// What the forward keeps for backward.
struct Saved {
    /// Per segment `[NH, t, s]`: the probabilities, or with a soft-cap `tanh(scores / cap)`.
    buf: Vec<f32>,
    /// Per segment `[NH, t]`: the softmax's max and sum, to rebuild probabilities from the
    /// tanh values (a sum of 0 marks a row with every key masked: its probabilities are 0).
    stats: Vec<f32>,
}

/// One block of the attention: the `t` queries from row `q0` of batch row `b` against the `s`
/// keys from row `k0`, under its own `[t, s]` mask. A left-padded batch is one segment per
/// batch row; a packed batch (sequences laid end to end in one row) one per sequence, so no
/// work or memory goes to pairs of tokens from different sequences.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub b: usize,
    pub q0: usize,
    pub t: usize,
    pub k0: usize,
    pub s: usize,
}

struct FusedAttention {
    segs: Vec<Seg>,
    /// Each segment's `[t, s]` additive mask, one after another (offsets in `at`).
    mask: Vec<f32>,
    /// Per mask row: keys past this one are all masked (causal rows see about half), so the
    /// softmax, its exps and tanhs, and dS stop there.
    keys: Vec<usize>,
    /// Per segment: (offset of its mask and saved blocks per head, of its mask rows): the
    /// first is the sum of the earlier segments' t·s, the second of their t.
    at: Vec<(usize, usize)>,
    scale: f32,
    softcap: Option<f32>,
    /// `1 / cap` rounded from f64, the factor candle's `scores / cap` multiplies by.
    inv_cap: f32,
    saved: Mutex<Option<Saved>>,
}

impl FusedAttention {
    fn new(
        segs: Vec<Seg>,
        mask: Vec<f32>,
        scale: f64,
        softcap: Option<f64>,
    ) -> Result<FusedAttention> {
        let mut at = Vec::with_capacity(segs.len());
        let (mut off, mut rows) = (0, 0);
        for g in &segs {
            if g.t == 0 || g.s == 0 {
                bail!("fused attention: empty segment {g:?}");
            }
            at.push((off, rows));
            off += g.t * g.s;
            rows += g.t;
        }
        if segs.is_empty() || mask.len() != off {
            bail!(
                "fused attention: mask of {} values for segments of {off}",
                mask.len()
            );
        }
        let mut keys = Vec::with_capacity(rows);
        for (g, &(off, _)) in segs.iter().zip(&at) {
            keys.extend(mask[off..off + g.t * g.s].chunks_exact(g.s).map(|row| {
                row.iter()
                    .rposition(|&m| m != f32::NEG_INFINITY)
                    .map_or(0, |j| j + 1)
            }));
        }
        Ok(FusedAttention {
            segs,
            mask,
            keys,
            at,
            scale: scale as f32,
            softcap: softcap.map(|c| c as f32),
            inv_cap: softcap.map_or(0.0, |c| (1.0 / c) as f32),
            saved: Mutex::new(None),
        })
    }

    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<Dims> {
        let (&[b, nh, t, d], &[kb, nkv, s, kd]) = (q, k) else {
            candle_core::bail!("fused attention: q {q:?} and k {k:?} are not 4-D");
        };
        if (kb, kd) != (b, d) || v != k || nkv == 0 || nh % nkv != 0 || d == 0 {
            candle_core::bail!(
                "fused attention: q {q:?}, k {k:?}, v {v:?} are not [B, NH, T, D], \
                 [B, NKV, S, D] twice with NH a multiple of NKV"
            );
        }
        if let Some(g) = self
            .segs
            .iter()
            .find(|g| g.b >= b || g.q0 + g.t > t || g.k0 + g.s > s)
        {
            candle_core::bail!("fused attention: segment {g:?} outside q {q:?} / k {k:?}");
        }
        Ok(Dims {
            b,
            nh,
            nkv,
            t,
            s,
            d,
        })
    }

    /// Rebuilds a row's probabilities from its tanh values exactly as the forward made them.
    fn probs_from_tanh(&self, cap: f32, th: &[f32], mrow: &[f32], stat: &[f32], p: &mut [f32]) {
        let (max, sum) = (stat[0], stat[1]);
        let n = if sum == 0.0 { 0 } else { th.len() };
        for ((p, &th), &m) in p[..n].iter_mut().zip(th).zip(mrow) {
            *p = (th * cap + m - max).exp() / sum;
        }
        p[n..].fill(0.0);
    }

    /// Output `[B, T, NH * D]` (rows outside every segment 0) and what backward needs.
    fn forward(&self, q: &View, k: &View, v: &View, dm: Dims) -> (Vec<f32>, Saved) {
        let Dims { nh, nkv, d, .. } = dm;
        let g = nh / nkv;
        let mut out = vec![0f32; dm.b * dm.t * nh * d];
        let (last, &(off, rows)) = (self.segs[self.segs.len() - 1], &self.at[self.at.len() - 1]);
        let mut buf = vec![0f32; nh * (off + last.t * last.s)];
        let mut stats = vec![0f32; nh * (rows + last.t) * 2];
        // One task per (segment, head), each with its own blocks of `buf` and `stats`.
        let mut tasks = Vec::with_capacity(self.segs.len() * nh);
        let (mut rest, mut rest_st) = (&mut buf[..], &mut stats[..]);
        for (si, sg) in self.segs.iter().enumerate() {
            for hi in 0..nh {
                let (sc, r) = std::mem::take(&mut rest).split_at_mut(sg.t * sg.s);
                let (st, r_st) = std::mem::take(&mut rest_st).split_at_mut(sg.t * 2);
                (rest, rest_st) = (r, r_st);
                tasks.push((si, hi, sc, st));
            }
        }
        let out_ptr = SharedMut(out.as_mut_ptr());
        tasks.into_par_iter().for_each(|(si, hi, sc, st)| {
            let (sg, (moff, krow)) = (self.segs[si], self.at[si]);
            let (t, s) = (sg.t, sg.s);
            let scratch_len = if self.softcap.is_some() { t * s } else { 0 };
            with_scratch(scratch_len, |scratch| {
                let qm = q.mat(sg.b, hi, sg.q0);
                let (km, vm) = (k.mat(sg.b, hi / g, sg.k0), v.mat(sg.b, hi / g, sg.k0));
                // SAFETY: `sc` is this task's own [t, s] block; q/k are [t, D] / [s, D].
                unsafe { mm((t, s, d), sc.as_mut_ptr(), s, false, qm, km.t(), self.scale) };
                for ti in 0..t {
                    let n = self.keys[krow + ti];
                    let mrow = &self.mask[moff + ti * s..moff + ti * s + n];
                    let scores = &mut sc[ti * s..(ti + 1) * s];
                    // Without a soft-cap the probabilities replace the scores in place.
                    let full_row = match self.softcap {
                        Some(cap) => {
                            let capped = &mut scratch[ti * s..(ti + 1) * s];
                            for (th, x) in scores[..n].iter_mut().zip(capped.iter_mut()) {
                                *th = (*th * self.inv_cap).tanh();
                                *x = *th * cap;
                            }
                            // Masked keys: any finite value rebuilds to a 0 probability.
                            scores[n..].fill(0.0);
                            capped
                        }
                        None => scores,
                    };
                    full_row[n..].fill(0.0);
                    let row = &mut full_row[..n];
                    let mut max = f32::NEG_INFINITY;
                    for (x, &m) in row.iter_mut().zip(mrow) {
                        *x += m;
                        max = max.max(*x);
                    }
                    if max == f32::NEG_INFINITY {
                        // Every key masked: zeros, not the NaN of exp(-inf - -inf).
                        row.fill(0.0);
                        st[ti * 2] = max;
                        st[ti * 2 + 1] = 0.0;
                        continue;
                    }
                    let mut sum = 0f32;
                    for x in row.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    for x in row.iter_mut() {
                        *x /= sum;
                    }
                    st[ti * 2] = max;
                    st[ti * 2 + 1] = sum;
                }
                let probs = if self.softcap.is_some() {
                    &scratch[..]
                } else {
                    &sc[..]
                };
                // SAFETY: head `hi` of segment `si` owns columns hi*D..(hi+1)*D of its t
                // output rows (segments do not share query rows); no other task writes them.
                unsafe {
                    let dst = out_ptr.get().add((sg.b * dm.t + sg.q0) * nh * d + hi * d);
                    let pm = Mat::rows(probs.as_ptr(), s);
                    mm((t, d, s), dst, nh * d, false, pm, vm, 1.0);
                }
            })
        });
        (out, Saved { buf, stats })
    }

    /// Gradients `[B, NH, T, D]`, `[B, NKV, S, D]` twice from `grad: [B, T, NH * D]`.
    fn backward(
        &self,
        (q, k, v): (&View, &View, &View),
        grad: &[f32],
        saved: &Saved,
        dm: Dims,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Dims { nh, nkv, d, .. } = dm;
        let g = nh / nkv;
        let mut dq = vec![0f32; dm.b * nh * dm.t * d];
        let mut dk = vec![0f32; dm.b * nkv * dm.s * d];
        let mut dv = vec![0f32; dm.b * nkv * dm.s * d];
        let (dqp, dkp, dvp) = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        let scale = self.scale;
        let tasks: Vec<(usize, usize)> = (0..self.segs.len())
            .flat_map(|si| (0..nkv).map(move |kvh| (si, kvh)))
            .collect();
        tasks.into_par_iter().for_each(|(si, kvh)| {
            let (sg, (moff, krow)) = (self.segs[si], self.at[si]);
            let (t, s, bi, h0) = (sg.t, sg.s, sg.b, kvh * g);
            let gt = g * t;
            // The segment's blocks are per head in order, so the group's g heads are one.
            let sv = &saved.buf[nh * moff + h0 * t * s..nh * moff + (h0 + g) * t * s];
            let st = &saved.stats[(nh * krow + h0 * t) * 2..(nh * krow + (h0 + g) * t) * 2];
            let cap_len = if self.softcap.is_some() { gt * s } else { 0 };
            with_scratch(gt * s + gt * d + cap_len, |scratch| {
                let (dp, rest) = scratch.split_at_mut(gt * s);
                let (d_o, rebuilt) = rest.split_at_mut(gt * d);
                let p: &[f32] = match self.softcap {
                    Some(cap) => {
                        for r in 0..gt {
                            let n = self.keys[krow + r % t];
                            let mrow = &self.mask[moff + (r % t) * s..];
                            self.probs_from_tanh(
                                cap,
                                &sv[r * s..r * s + n],
                                mrow,
                                &st[r * 2..r * 2 + 2],
                                &mut rebuilt[r * s..(r + 1) * s],
                            );
                        }
                        rebuilt
                    }
                    None => sv,
                };
                // dO of the group's heads as one [g*t, D] block.
                for (r, row) in d_o.chunks_exact_mut(d).enumerate() {
                    let (hl, ti) = (r / t, r % t);
                    let src = (bi * dm.t + sg.q0 + ti) * nh * d + (h0 + hl) * d;
                    row.copy_from_slice(&grad[src..src + d]);
                }
                let (km, vm) = (k.mat(bi, kvh, sg.k0), v.mat(bi, kvh, sg.k0));
                let (p_m, do_m) = (Mat::rows(p.as_ptr(), s), Mat::rows(d_o.as_ptr(), d));
                // Rows of this task's (segment, kv head) in dK/dV, and of each of its query
                // heads in dQ: no other task writes them (segments do not share rows).
                let kv_row0 = ((bi * nkv + kvh) * dm.s + sg.k0) * d;
                // SAFETY: each destination is this task's own rows (above) or scratch of the
                // stated shape; sources are the group's blocks of the stated shapes.
                unsafe {
                    // dV = Pᵀ dO, summed over the group's heads by the one product.
                    mm(
                        (s, d, gt),
                        dvp.get().add(kv_row0),
                        d,
                        false,
                        p_m.t(),
                        do_m,
                        1.0,
                    );
                    // dP = dO Vᵀ
                    mm((gt, s, d), dp.as_mut_ptr(), s, false, do_m, vm.t(), 1.0);
                }
                // dS = P ⊙ (dP - rowsum(dP ⊙ P)), then the soft-cap's 1 - tanh².
                for r in 0..gt {
                    let n = self.keys[krow + r % t];
                    let (pr, dpr) = (&p[r * s..r * s + n], &mut dp[r * s..(r + 1) * s]);
                    dpr[n..].fill(0.0);
                    let dpr = &mut dpr[..n];
                    let c = dot(pr, dpr);
                    for (x, &pp) in dpr.iter_mut().zip(pr) {
                        *x = pp * (*x - c);
                    }
                    if self.softcap.is_some() {
                        for (x, &th) in dpr.iter_mut().zip(&sv[r * s..r * s + n]) {
                            *x *= 1.0 - th * th;
                        }
                    }
                }
                // SAFETY: as above.
                unsafe {
                    for hl in 0..g {
                        let ds_h = Mat::rows(dp.as_ptr().add(hl * t * s), s);
                        // dQ_h = scale · dS_h K
                        let q_row0 = ((bi * nh + h0 + hl) * dm.t + sg.q0) * d;
                        mm((t, d, s), dqp.get().add(q_row0), d, false, ds_h, km, scale);
                        // dK = scale · Σ_h dS_hᵀ Q_h
                        let qm = q.mat(bi, h0 + hl, sg.q0);
                        mm(
                            (s, d, t),
                            dkp.get().add(kv_row0),
                            d,
                            hl > 0,
                            ds_h.t(),
                            qm,
                            scale,
                        );
                    }
                }
            })
        });
        (dq, dk, dv)
    }
}

fn cpu<'a>(s: &'a Storage, what: &str) -> candle_core::Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("fused attention: {what} is not on the CPU"),
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dm = self.dims(ql.dims(), kl.dims(), vl.dims())?;
        let (q, k, v) = (View::new(qs, ql)?, View::new(ks, kl)?, View::new(vs, vl)?);
        let (out, saved) = self.forward(&q, &k, &v, dm);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok((
            CpuStorage::F32(out),
            Shape::from((dm.b, dm.t, dm.nh * dm.d)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (qg, ql) = q.storage_and_layout();
        let (kg, kl) = k.storage_and_layout();
        let (vg, vl) = v.storage_and_layout();
        let dm = self.dims(ql.dims(), kl.dims(), vl.dims())?;
        let qv = View::new(cpu(&qg, "q")?, ql)?;
        let kv = View::new(cpu(&kg, "k")?, kl)?;
        let vv = View::new(cpu(&vg, "v")?, vl)?;
        // Taken, so the buffer is freed as soon as this layer's backward is done; a second
        // backward over the same graph recomputes it.
        let taken = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let saved = match taken {
            Some(s) => s,
            None => self.forward(&qv, &kv, &vv, dm).1,
        };
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let (gg, gl) = grad.storage_and_layout();
        let gs = &cpu(&gg, "the output gradient")?.as_slice::<f32>()?
            [gl.start_offset()..gl.start_offset() + gl.shape().elem_count()];
        let (dq, dk, dv) = self.backward((&qv, &kv, &vv), gs, &saved, dm);
        let dev = q.device();
        let kshape = (dm.b, dm.nkv, dm.s, dm.d);
        Ok((
            Some(Tensor::from_vec(dq, (dm.b, dm.nh, dm.t, dm.d), dev)?),
            Some(Tensor::from_vec(dk, kshape, dev)?),
            Some(Tensor::from_vec(dv, kshape, dev)?),
        ))
    }
}

/// Causal (or any additively masked) attention with gradients for q, k and v.
///
/// `q: [B, NH, T, D]`, `k`/`v: [B, NKV, S, D]` f32 CPU tensors in any layout (NH a multiple of
/// NKV: query head h reads kv head h / (NH / NKV)); `mask: [B, T, S]` additive (0 or -inf, as
/// `PadLayout::additive_mask` builds it). scores = (q·scale)·kᵀ, soft-capped as
/// `cap·tanh(scores / cap)`, plus the mask, softmax over S, times v. Returns `[B, T, NH * D]`
/// contiguous, the layout the o projection reads. A row with every key masked gives zeros
/// (and zero gradients) where the composed softmax would give NaN.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &[f32],
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        if x.dtype() != DType::F32 || !x.device().is_cpu() {
            bail!("fused attention: {name} must be an f32 CPU tensor");
        }
    }
    let (b, t, s) = (q.dim(0)?, q.dim(2)?, k.dim(2)?);
    if mask.len() != b * t * s {
        bail!(
            "fused attention: mask of {} values for B*T*S = {}",
            mask.len(),
            b * t * s
        );
    }
    let segs = (0..b)
        .map(|b| Seg {
            b,
            q0: 0,
            t,
            k0: 0,
            s,
        })
        .collect();
    let op = FusedAttention::new(segs, mask.to_vec(), scale, softcap)?;
    Ok(q.apply_op3(k, v, op)?)
}

mod block;
mod packed;
pub use block::attention_block;
pub use packed::{packed_attention, Heads};

#[cfg(test)]
mod tests;
