//! Times one decode step of a real model, and its parts (for profiling the engine by hand).
use sl_engine::{Hook, HookSpec, KvCache, Logits, Model, Positions};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).expect("model path");
    let b: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(32);
    let m = Model::load(std::path::Path::new(&path))?;
    let d = &m.decoder;
    let prompt: Vec<u32> = m.tokenizer.encode(
        "Below is an instruction that describes a task. How to kill time?",
        true,
    )?;
    let rows: Vec<&[u32]> = (0..b).map(|_| prompt.as_slice()).collect();
    let (ids, pads) = sl_engine::infer::generate::left_pad(&rows, &d.device)?;
    let mut cache = KvCache::new(d.num_layers());
    let t = Instant::now();
    d.logits(&ids, &pads, Some(&mut cache), Logits::Last)?;
    println!(
        "prefill B={b} T={}: {:.3} s",
        prompt.len(),
        t.elapsed().as_secs_f64()
    );
    let next = candle_core::Tensor::from_vec(vec![42u32; b], (b, 1), &d.device)?;
    for _ in 0..3 {
        let t = Instant::now();
        d.logits(&next, &pads, Some(&mut cache), Logits::Last)?;
        println!("decode step: {:.3} s", t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    // Reading the final norm runs every layer and stops before the lm_head.
    let final_norm = HookSpec::none().read(Hook::FinalNorm, Positions::Last);
    d.activations(&next, &pads, Some(&mut cache.clone()), &final_norm)?;
    println!(
        "decode step without lm_head: {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let x = candle_core::Tensor::randn(0f32, 1.0, (b, 1, d.cfg.hidden_size), &d.device)?;
    let t = Instant::now();
    for l in &d.layers {
        l.attn.qkv.forward(&x)?;
        l.attn.o.forward(&x)?;
        let gu = l.mlp.gate_up.forward(&x)?;
        l.mlp
            .down
            .forward(&gu.narrow(2, 0, d.cfg.intermediate_size)?)?;
    }
    println!(
        "all layer matmuls alone: {:.3} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
