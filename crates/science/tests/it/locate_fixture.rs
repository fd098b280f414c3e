//! On a fixture checkpoint, localisation counts equal counts worked out by hand from
//! transformers' own greedy tokens (tests/fixtures/<family>/expected.json, plain and with layers
//! 1-2 scaled by 1.2), judged by a phrase list drawn from those tokens.

use crate::common::fixture;
use sl_engine::{LayerRange, Model, PromptRecord, Template};
use sl_science::judges::{Judge, JudgeKind};
use sl_science::locate::{AlphaMode, LocateConfig, Locator};

#[test]
fn counts_equal_hand_computed_counts_from_transformers_tokens() {
    for family in ["llama", "gemma2", "qwen2"] {
        let dir = fixture(family);
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let mut model = Model::load(&dir).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let decode = |m: &Model, v: &serde_json::Value| m.tokenizer.decode(&ids(v), true).unwrap();
        let plain: Vec<String> = fx["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| decode(&model, g))
            .collect();
        let scaled: Vec<String> = fx["scaled"]["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| decode(&model, g))
            .collect();
        // "Refusal" phrases: a piece of transformers' scaled answer to prompt 0 and its plain
        // answer to prompt 2.
        let pick = |s: &str| s.chars().take(6).collect::<String>();
        let phrases = [pick(&scaled[0]), pick(&plain[2])];
        let d = tempfile::tempdir().unwrap();
        let list = d.path().join("list.txt");
        std::fs::write(&list, phrases.join("\n")).unwrap();
        let judge = Judge::with_list_file(JudgeKind::Gcg, &list).unwrap();
        let by_hand = |answers: &[String]| answers.iter().filter(|a| judge.is_refusal(a)).count();
        let (want_plain, want_scaled) = (by_hand(&plain), by_hand(&scaled));

        let records: Vec<PromptRecord> = fx["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| PromptRecord::new(p.as_str().unwrap()))
            .collect();
        let prompts = model.prompts(&records, Template::Raw).unwrap();
        for (p, want) in prompts.iter().zip(fx["input_ids"].as_array().unwrap()) {
            assert_eq!(p.ids, ids(want));
        }
        for (prefix_cache, early_stop) in [(true, true), (false, false)] {
            let cfg = LocateConfig {
                alpha: AlphaMode::Fixed(1.2),
                span: 1,
                max_new_tokens: 12,
                batch_size: 2,
                prefix_cache,
                early_stop,
                probe: false,
                scale_target: Default::default(),
            };
            let mut loc = Locator::new(&mut model, prompts.clone(), judge.clone(), cfg).unwrap();
            assert_eq!(
                loc.count(None, 1.0, &mut |_| {}).unwrap(),
                want_plain,
                "{family}: baseline"
            );
            let r = LayerRange::new(1, 2, 4).unwrap();
            assert_eq!(
                loc.count(Some(r), 1.2, &mut |_| {}).unwrap(),
                want_scaled,
                "{family}: layers 1-2 scaled by 1.2"
            );
        }
        assert!(
            want_plain + want_scaled > 0,
            "{family}: the phrases match something"
        );
    }
}
