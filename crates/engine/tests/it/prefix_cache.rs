//! Generation that starts from a cached lower-layer prefix equals generation from scratch, for
//! every range with that lower bound (the localisation sweep's speed-up must change nothing).

use crate::common::fixture;
use sl_engine::infer::extract::hidden_last;
use sl_engine::infer::generate::{
    greedy_from_prefix, greedy_with, shared_prefix_len, GenerateOptions, PrefixCache, StopReason,
};
use sl_engine::{LayerRange, Model};

fn prompts(m: &Model) -> Vec<Vec<u32>> {
    [
        "How to kill time?",
        "How to kill the lights in the kitchen before bed?",
        "Give three tips for staying healthy.",
        "Name a colour.",
    ]
    .iter()
    .map(|t| {
        m.tokenizer
            .encode(
                &sl_engine::text::prompts::ALPACA.replace("{instruction}", t),
                true,
            )
            .unwrap()
    })
    .collect()
}

#[test]
fn prefix_cache_equals_naive_generation() {
    for family in ["llama3", "gemma3", "phi3"] {
        let dir = fixture(family);
        let mut m = Model::load(&dir).unwrap();
        let p = prompts(&m);
        let opts = GenerateOptions {
            max_new_tokens: 8,
            batch_size: 3,
            ..Default::default()
        };
        for start in [0, 1] {
            let prefix = PrefixCache::build(&m.decoder, &p, opts.batch_size, start).unwrap();
            for last in start..m.decoder.num_layers() {
                m.decoder
                    .scale_layers(
                        LayerRange::new(start, last, m.decoder.num_layers()).unwrap(),
                        1.5,
                    )
                    .unwrap();
                let naive = greedy_with(&m.decoder, &p, &m.eos_token_ids, &opts, None, &mut |_| {})
                    .unwrap();
                let cached = greedy_from_prefix(
                    &m.decoder,
                    &prefix,
                    &m.eos_token_ids,
                    &opts,
                    None,
                    &mut |_| {},
                )
                .unwrap();
                assert_eq!(naive, cached, "{family}: range {start}-{last}");
                // Nor does the shared template head (the path without any cache recomputes it
                // per row).
                let nc = GenerateOptions {
                    no_cache: true,
                    ..opts.clone()
                };
                let plain =
                    greedy_with(&m.decoder, &p, &m.eos_token_ids, &nc, None, &mut |_| {}).unwrap();
                let ids = |g: &[sl_engine::infer::generate::Generation]| {
                    g.iter().map(|x| x.ids.clone()).collect::<Vec<_>>()
                };
                assert_eq!(
                    ids(&plain),
                    ids(&cached),
                    "{family}: range {start}-{last}, no cache at all"
                );
                m.decoder.restore_scaling();
            }
        }
    }
}

#[test]
fn stop_predicate_stops_rows() {
    let dir = fixture("llama");
    let m = Model::load(&dir).unwrap();
    let p = prompts(&m);
    let opts = GenerateOptions {
        max_new_tokens: 10,
        batch_size: 4,
        ignore_eos: true,
        ..Default::default()
    };
    let full = greedy_with(&m.decoder, &p, &m.eos_token_ids, &opts, None, &mut |_| {}).unwrap();
    // Stop prompt 1 after 3 tokens and prompt 2 after 5; the others run to the end unchanged.
    let stop = |i: usize, ids: &[u32]| (i == 1 && ids.len() == 3) || (i == 2 && ids.len() == 5);
    let got = greedy_with(
        &m.decoder,
        &p,
        &m.eos_token_ids,
        &opts,
        Some(&stop),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(got[0], full[0]);
    assert_eq!(got[3], full[3]);
    assert_eq!(got[1].ids, full[1].ids[..3]);
    assert_eq!(got[2].ids, full[2].ids[..5]);
    assert_eq!(
        (got[1].stop, got[2].stop, got[0].stop),
        (
            StopReason::Caller,
            StopReason::Caller,
            StopReason::MaxTokens
        )
    );
}

/// The prompts' shared template head is computed once and copied to every row, with each row's
/// padding after it: hidden states and generations must equal those of each prompt alone and of
/// generation without any cache, sliding-window layers included (window 16 < these prompts).
#[test]
fn shared_prompt_head_changes_nothing() {
    for family in ["llama3", "gemma2", "gemma3", "mistral", "phi3", "qwen3"] {
        let dir = fixture(family);
        let m = Model::load(&dir).unwrap();
        let p = prompts(&m);
        let shared = shared_prefix_len(&p);
        assert!(
            shared > 16,
            "{family}: the Alpaca head is shared ({shared} tokens)"
        );
        let batched = hidden_last(&m.decoder, &p, 3, &mut |_| {}).unwrap();
        for (i, got) in batched.iter().enumerate() {
            let alone = hidden_last(&m.decoder, &p[i..i + 1], 1, &mut |_| {}).unwrap();
            let (a, b) = (
                got.to_vec2::<f32>().unwrap(),
                alone[0].to_vec2::<f32>().unwrap(),
            );
            for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                // Rounding only: the lone prompt's few rows go through the small-row matmul.
                let worst = x
                    .iter()
                    .zip(y)
                    .map(|(u, v)| (u - v).abs() / v.abs().max(1.0))
                    .fold(0f32, f32::max);
                assert!(
                    worst <= 1e-5,
                    "{family}: prompt {i} entry {k} differs by {worst} (relative)"
                );
            }
        }
        let opts = GenerateOptions {
            max_new_tokens: 8,
            batch_size: 3,
            ignore_eos: true,
            ..Default::default()
        };
        let with_head =
            greedy_with(&m.decoder, &p, &m.eos_token_ids, &opts, None, &mut |_| {}).unwrap();
        let plain = greedy_with(
            &m.decoder,
            &p,
            &m.eos_token_ids,
            &GenerateOptions {
                no_cache: true,
                ..opts
            },
            None,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            with_head, plain,
            "{family}: generation with the shared head and without any cache"
        );
    }
}

#[test]
fn shared_prefix_len_leaves_each_prompt_a_token() {
    assert_eq!(shared_prefix_len(&[vec![1, 2, 3], vec![1, 2, 3]]), 2);
    assert_eq!(shared_prefix_len(&[vec![1, 2, 3, 4], vec![1, 2, 5]]), 2);
    assert_eq!(shared_prefix_len(&[vec![1, 2], vec![1]]), 0);
    assert_eq!(shared_prefix_len(&[vec![7, 2], vec![1, 2]]), 0);
    assert_eq!(shared_prefix_len(&[vec![1, 2, 3]]), 0);
    assert_eq!(shared_prefix_len(&[]), 0);
}

/// `first_mass` (the probe judge's score, read off generation's first step) is the softmax mass
/// of the chosen tokens in a separate forward pass's last logits, with the cache and without,
/// and is reported only when asked for.
#[test]
fn first_mass_is_the_mass_of_a_separate_last_position_pass() {
    use sl_engine::infer::generate::{argmax, left_pad, softmax_mass};
    for family in ["llama3", "gemma3"] {
        let m = Model::load(&fixture(family)).unwrap();
        let p = prompts(&m);
        let ids = vec![3u32, 17, 42];
        for no_cache in [false, true] {
            let opts = GenerateOptions {
                max_new_tokens: 3,
                batch_size: 3,
                no_cache,
                first_mass_of: ids.clone(),
                ..Default::default()
            };
            let g =
                greedy_with(&m.decoder, &p, &m.eos_token_ids, &opts, None, &mut |_| {}).unwrap();
            for (i, (prompt, gen)) in p.iter().zip(&g).enumerate() {
                let (t, pads) = left_pad(&[prompt.as_slice()], &m.decoder.device).unwrap();
                let last = m
                    .decoder
                    .logits(&t, &pads, None, sl_engine::Logits::Last)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let want = softmax_mass(&last, &ids);
                let got = gen.first_mass.expect("first_mass_of was given");
                assert!(
                    (got - want).abs() <= 1e-9 + 1e-4 * want,
                    "{family} (no_cache {no_cache}) prompt {i}: {got} vs {want}"
                );
                assert_eq!(gen.ids[0], argmax(&last), "{family}: the first token");
            }
        }
        let plain = greedy_with(
            &m.decoder,
            &p,
            &m.eos_token_ids,
            &GenerateOptions {
                max_new_tokens: 2,
                ..Default::default()
            },
            None,
            &mut |_| {},
        )
        .unwrap();
        assert!(plain.iter().all(|g| g.first_mass.is_none()));
    }
}
