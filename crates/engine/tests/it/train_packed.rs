//! The training pass packs a batch's rows end to end (no padding). A batch of rows of different
//! lengths must give each row's loss and gradients exactly as the row trained alone, and the
//! same loss as the padded inference pass (the path the transformers parity tests prove).

use crate::common::fixture;
use candle_core::{DType, Device, Tensor};
use sl_engine::model::Logits;
use sl_engine::train::adamw::AdamWConfig;
use sl_engine::train::trainer::{Batch, Trainer};
use sl_engine::Model;

fn rows(vocab: u32) -> Vec<Vec<u32>> {
    // Longer than the gemma2 fixture's sliding window (16), and of different lengths.
    [23usize, 7, 40, 2]
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            (0..n)
                .map(|i| ((i * 31 + r * 17 + 3) as u32) % vocab)
                .collect()
        })
        .collect()
}

/// Summed next-token loss of `rows` through the padded inference pass (`Decoder::logits`).
fn padded_loss(model: &Model, rows: &[Vec<u32>]) -> f64 {
    let t = rows.iter().map(|r| r.len()).max().unwrap();
    let pads: Vec<usize> = rows.iter().map(|r| t - r.len()).collect();
    let ids: Vec<u32> = rows
        .iter()
        .flat_map(|r| std::iter::repeat_n(0, t - r.len()).chain(r.iter().copied()))
        .collect();
    let ids = Tensor::from_vec(ids, (rows.len(), t), &Device::Cpu).unwrap();
    let logits = model
        .decoder
        .logits(&ids, &pads, None, Logits::All)
        .unwrap();
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F64).unwrap(), 2).unwrap();
    let lp: Vec<Vec<Vec<f64>>> = lp.to_vec3().unwrap();
    let mut sum = 0.0;
    for (b, r) in rows.iter().enumerate() {
        for k in 1..r.len() {
            sum -= lp[b][pads[b] + k - 1][r[k] as usize];
        }
    }
    sum
}

fn check(family: &str) {
    let model = Model::load(&fixture(family)).unwrap();
    let rows = rows(model.cfg().vocab_size as u32);
    let want_loss = padded_loss(&model, &rows);
    let mut tr = Trainer::new(model.decoder, |_| false, AdamWConfig::default(), false).unwrap();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let batch = Batch::new(&refs, &vec![1; rows.len()], &Device::Cpu).unwrap();
    let loss = tr.accumulate(&batch, 1.0).unwrap();
    assert!(
        (loss - want_loss).abs() <= 1e-4 * want_loss.abs(),
        "{family}: packed loss {loss} vs padded inference {want_loss}"
    );
    let packed: Vec<Tensor> = tr
        .gradients()
        .unwrap()
        .into_iter()
        .map(|g| g.unwrap())
        .collect();
    tr.apply(0.0, None).unwrap();
    // Each row alone, gradients accumulated: the same sums.
    let mut alone = 0.0;
    for r in &refs {
        alone += tr
            .accumulate(&Batch::new(&[r], &[1], &Device::Cpu).unwrap(), 1.0)
            .unwrap();
    }
    assert!(
        (loss - alone).abs() <= 1e-5 * loss.abs(),
        "{family}: {loss} vs {alone}"
    );
    let alone_grads = tr.gradients().unwrap();
    for ((info, _), (a, b)) in tr.trainable.iter().zip(packed.iter().zip(&alone_grads)) {
        let b = b.as_ref().unwrap();
        let err = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        let (err, scale) = (
            err.to_scalar::<f32>().unwrap(),
            scale.to_scalar::<f32>().unwrap(),
        );
        assert!(
            err <= 1e-4 * scale.max(1e-6),
            "{family} {}: gradient off by {err} (max {scale})",
            info.name
        );
    }
}

#[test]
fn packed_batches_equal_rows_alone_and_the_padded_pass_llama() {
    check("llama");
}

#[test]
fn packed_batches_equal_rows_alone_and_the_padded_pass_gemma2() {
    check("gemma2"); // sliding window, soft-caps, sandwich norms, tied head
}

#[test]
fn packed_batches_equal_rows_alone_and_the_padded_pass_qwen3_and_phi3() {
    check("qwen3"); // q/k norms
    check("phi3"); // fused projections
}
