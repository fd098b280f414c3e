//! Hidden-state extraction: every `output_hidden_states` entry at the last prompt token, batched
//! over prompts of different lengths.

use crate::infer::generate::{batch_cache, left_pad, shared_head_kv, shared_prefix_len};
use crate::model::hooks::{Hook, HookSpec, Positions};
use crate::model::Decoder;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// For each prompt, a `[L+1, H]` tensor: entry 0 = embedding output, entry k = input of layer k,
/// entry L = after the final norm (transformers' convention). Prompts are batched by length.
pub fn hidden_last(
    dec: &Decoder,
    prompts: &[Vec<u32>],
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Tensor>> {
    let n_layers = dec.num_layers();
    let hooks = HookSpec::all_hidden_last(n_layers);
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut out: Vec<Option<Tensor>> = vec![None; prompts.len()];
    // The template head every prompt starts with is computed once, not once per prompt.
    let shared = shared_prefix_len(prompts);
    let head = shared_head_kv(dec, prompts, shared)?;
    for chunk in order.chunks(batch_size.max(1)) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| &prompts[i][shared..]).collect();
        let (ids, pads) = left_pad(&rows, &dec.device)?;
        let mut cache = batch_cache(dec, head.as_ref(), shared);
        // The batch's own keys/values are not needed after each layer.
        cache.append = false;
        // On the pool's workers, as generation runs: each op's split is then a push onto a
        // worker's own queue, not an injection the caller sleeps on.
        let cap =
            crate::kernels::on_workers(|| dec.activations(&ids, &pads, Some(&mut cache), &hooks))?;
        let entries: Vec<Tensor> = (0..=n_layers)
            .map(|k| {
                cap.get(Hook::hidden_entry(k, n_layers), Positions::Last)
                    .cloned()
                    .expect("captured")
            })
            .collect();
        let stacked = Tensor::stack(&entries, 1)?; // [B, L+1, H]
        for (pos, &i) in chunk.iter().enumerate() {
            let t = stacked.get(pos)?;
            check_finite(&t, i)?;
            out[i] = Some(t);
        }
        progress(chunk.len());
    }
    Ok(out
        .into_iter()
        .map(|t| t.expect("every prompt processed"))
        .collect())
}

/// Names the first hidden-state entry holding NaN or infinity.
fn check_finite(t: &Tensor, prompt: usize) -> Result<()> {
    let rows = t.to_vec2::<f32>()?;
    for (k, row) in rows.iter().enumerate() {
        if row.iter().any(|x| !x.is_finite()) {
            bail!("prompt {prompt}: hidden-state entry {k} holds NaN or infinite values");
        }
    }
    Ok(())
}
