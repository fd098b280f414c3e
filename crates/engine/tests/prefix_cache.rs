//! Generation that starts from a cached lower-layer prefix equals generation from scratch, for
//! every range with that lower bound (the localisation sweep's speed-up must change nothing).

use sl_engine::generate::{greedy_from_prefix, greedy_with, GenerateOptions, PrefixCache, StopReason};
use sl_engine::{LayerRange, Model};
use std::path::Path;

fn prompts(m: &Model) -> Vec<Vec<u32>> {
    ["How to kill time?", "How to kill the lights in the kitchen before bed?", "Give three tips for staying healthy.", "Name a colour."]
        .iter()
        .map(|t| m.tokenizer.encode(&sl_engine::prompts::ALPACA.replace("{instruction}", t), true).unwrap())
        .collect()
}

#[test]
fn prefix_cache_equals_naive_generation() {
    for family in ["llama3", "gemma3", "phi3"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(family);
        let mut m = Model::load(&dir).unwrap();
        let p = prompts(&m);
        let opts = GenerateOptions { max_new_tokens: 8, batch_size: 3, ..Default::default() };
        let start = 1;
        let prefix = PrefixCache::build(&m.decoder, &p, opts.batch_size, start).unwrap();
        for last in start..m.decoder.num_layers() {
            m.decoder.scale_layers(LayerRange::new(start, last, m.decoder.num_layers()).unwrap(), 1.5).unwrap();
            let naive = greedy_with(&m.decoder, &p, &m.eos_token_ids, &opts, None, &mut |_| {}).unwrap();
            let cached = greedy_from_prefix(&m.decoder, &prefix, &m.eos_token_ids, &opts, None, &mut |_| {}).unwrap();
            assert_eq!(naive, cached, "{family}: range {start}-{last}");
            m.decoder.restore_scaling();
        }
    }
}

#[test]
fn stop_predicate_stops_rows() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let m = Model::load(&dir).unwrap();
    let p = prompts(&m);
    let opts = GenerateOptions { max_new_tokens: 10, batch_size: 4, ignore_eos: true, ..Default::default() };
    let full = greedy_with(&m.decoder, &p, &m.eos_token_ids, &opts, None, &mut |_| {}).unwrap();
    // Stop prompt 1 after 3 tokens and prompt 2 after 5; the others run to the end unchanged.
    let stop = |i: usize, ids: &[u32]| (i == 1 && ids.len() == 3) || (i == 2 && ids.len() == 5);
    let got = greedy_with(&m.decoder, &p, &m.eos_token_ids, &opts, Some(&stop), &mut |_| {}).unwrap();
    assert_eq!(got[0], full[0]);
    assert_eq!(got[3], full[3]);
    assert_eq!(got[1].ids, full[1].ids[..3]);
    assert_eq!(got[2].ids, full[2].ids[..5]);
    assert_eq!((got[1].stop, got[2].stop, got[0].stop), (StopReason::Caller, StopReason::Caller, StopReason::MaxTokens));
}
