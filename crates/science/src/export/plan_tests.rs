//! Name selection of the export plan on configs with the real models' shapes.

use super::*;
use serde_json::json;

fn cfg(v: serde_json::Value) -> ModelConfig {
    ModelConfig::from_json(&v, "test config").unwrap()
}

/// Meta-Llama-3-8B-Instruct's shape.
fn llama3_8b() -> ModelConfig {
    cfg(
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_hidden_layers": 32, "vocab_size": 128256, "rope_theta": 500000.0,
        "tie_word_embeddings": false}),
    )
}

fn phi3_mini() -> ModelConfig {
    cfg(
        json!({"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
        "vocab_size": 32064, "max_position_embeddings": 4096, "tie_word_embeddings": false}),
    )
}

fn plan(c: &ModelConfig, first: usize, last: usize, modules: &[&str]) -> FreezePlan {
    let m = FreezeModule::parse_list(&modules.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .unwrap();
    FreezePlan::new(c, LayerRange::new(first, last, c.num_layers).unwrap(), m).unwrap()
}

#[test]
fn llama3_sppft_freezes_exactly_the_seven_projections_of_layers_6_to_12() {
    let c = llama3_8b();
    let names = hf_parameter_names(&c);
    assert_eq!(
        names.len(),
        1 + 32 * 9 + 2,
        "embed, 9 tensors per layer, final norm, lm_head"
    );
    let p = plan(&c, 6, 12, &["attn", "mlp"]);
    let (frozen, trainable) = p.split();
    assert_eq!(frozen.len(), 7 * 7);
    let mut want = Vec::new();
    for l in 6..=12 {
        for proj in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            want.push(format!("model.layers.{l}.{proj}.weight"));
        }
    }
    assert_eq!(frozen, want);
    for keep in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.6.input_layernorm.weight",
        "model.layers.12.post_attention_layernorm.weight",
        "model.layers.5.self_attn.q_proj.weight",
        "model.layers.13.mlp.down_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ] {
        assert!(
            trainable.iter().any(|n| n == keep),
            "{keep} must stay trainable"
        );
    }
}

#[test]
fn layer_numbers_are_matched_whole() {
    let c = llama3_8b();
    let p = plan(&c, 1, 1, &["attn", "mlp"]);
    assert!(p.is_frozen("model.layers.1.self_attn.q_proj.weight"));
    for n in [
        "model.layers.13.self_attn.q_proj.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.layers.1x.mlp.up_proj.weight",
        "layers.1.mlp.up_proj.weight",
        "model.layers.1.input_layernorm.weight",
    ] {
        assert!(!p.is_frozen(n), "{n}");
    }
}

#[test]
fn phi3_names_are_fused_and_freeze_whole() {
    let c = phi3_mini();
    let p = plan(&c, 11, 15, &["attn", "mlp"]);
    let (frozen, _) = p.split();
    assert_eq!(frozen.len(), 5 * 4);
    assert!(frozen.contains(&"model.layers.11.self_attn.qkv_proj.weight".to_string()));
    assert!(frozen.contains(&"model.layers.15.mlp.gate_up_proj.weight".to_string()));
    assert!(!hf_parameter_names(&c)
        .iter()
        .any(|n| n.contains("q_proj.") && !n.contains("qkv_proj")));
    match p.lora_targets().unwrap() {
        LoraTargets::Layers {
            target_modules,
            layers_to_transform,
        } => {
            assert_eq!(
                target_modules,
                ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
            );
            assert_eq!(
                layers_to_transform,
                (0..11).chain(16..32).collect::<Vec<_>>()
            );
        }
        other => panic!("expected a layer list, got {other:?}"),
    }
}

#[test]
fn biases_and_qk_norms_go_with_their_module_and_sandwich_norms_stay() {
    let qwen2 = cfg(
        json!({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
        "vocab_size": 100, "tie_word_embeddings": true}),
    );
    let (frozen, trainable) = plan(&qwen2, 1, 2, &["attn", "mlp"]).split();
    assert!(frozen.contains(&"model.layers.1.self_attn.q_proj.bias".to_string()));
    assert!(
        !hf_parameter_names(&qwen2)
            .iter()
            .any(|n| n.contains("o_proj.bias")),
        "Qwen2's o_proj has no bias"
    );
    assert_eq!(frozen.len(), 2 * (7 + 3));
    assert!(
        !trainable.iter().any(|n| n == "lm_head.weight"),
        "a tied head is the embedding"
    );

    let qwen3 = cfg(
        json!({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
        "vocab_size": 100}),
    );
    let (frozen, _) = plan(&qwen3, 0, 0, &["attn"]).split();
    assert_eq!(frozen.len(), 6, "q/k/v/o + q_norm + k_norm");
    assert!(frozen.contains(&"model.layers.0.self_attn.k_norm.weight".to_string()));

    let gemma2 = cfg(
        json!({"architectures": ["Gemma2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
        "vocab_size": 100}),
    );
    let (frozen, trainable) = plan(&gemma2, 2, 3, &["mlp"]).split();
    assert_eq!(frozen.len(), 2 * 3);
    for n in [
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "self_attn.q_proj",
    ] {
        assert!(
            trainable.contains(&format!("model.layers.2.{n}.weight")),
            "{n}"
        );
    }
}

#[test]
fn axolotl_patterns_name_the_top_level_tensors_and_the_layer_sets() {
    let c = llama3_8b();
    let pats: Vec<String> = plan(&c, 6, 12, &["attn", "mlp"])
        .axolotl_unfrozen()
        .into_iter()
        .map(|p| p.pattern)
        .collect();
    let outside = (0..6)
        .chain(13..32)
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("|");
    assert_eq!(
        pats,
        [
            "^model.embed_tokens.weight$".to_string(),
            "^model.norm.weight$".into(),
            "^lm_head.weight$".into(),
            format!("^model.layers.(?:{outside})."),
            "^model.layers.(?:6|7|8|9|10|11|12).(?!self_attn.|mlp.)".into(),
        ]
    );
    // Nothing in a pattern is a dot wildcard, which axolotl would turn into a literal dot.
    assert!(pats.iter().all(|p| !p.contains(".+") && !p.contains(".*")));
    // The whole model frozen in range: no pattern for outside layers.
    let all = plan(&c, 0, 31, &["mlp"]).axolotl_unfrozen();
    assert_eq!(all.len(), 4);
    assert_eq!(
        all[3].pattern,
        format!(
            "^model.layers.(?:{}).(?!mlp.)",
            (0..32).map(|l| l.to_string()).collect::<Vec<_>>().join("|")
        )
    );
}

#[test]
fn lora_for_one_frozen_module_is_a_full_match_regex() {
    let c = llama3_8b();
    let LoraTargets::Regex(r) = plan(&c, 6, 12, &["attn"]).lora_targets().unwrap() else {
        panic!("expected a regex")
    };
    assert!(r.starts_with("model\\.layers\\.(?:(?:0|1|2|3|4|5|13|"));
    assert!(r.ends_with("|(?:6|7|8|9|10|11|12)\\.mlp\\.(?:gate_proj|up_proj|down_proj))"));
    let err = plan(&c, 0, 31, &["attn", "mlp"])
        .lora_targets()
        .unwrap_err()
        .to_string();
    assert!(err.contains("covers every layer"), "{err}");
}

#[test]
fn bad_plans_are_refused_with_a_reason() {
    let c = llama3_8b();
    let e = FreezeModule::parse_list(&["attn".into(), "norm".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown --freeze-modules entry `norm`"), "{e}");
    assert!(FreezeModule::parse_list(&[]).is_err());
    assert_eq!(
        FreezeModule::parse_list(&["mlp".into(), "attn".into(), "mlp".into()]).unwrap(),
        [FreezeModule::Attn, FreezeModule::Mlp]
    );
    let e = FreezePlan::new(
        &c,
        LayerRange {
            first: 30,
            last: 32,
        },
        vec![FreezeModule::Attn],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("outside the model's layers 0-31"), "{e}");
    let e = FreezePlan::new(
        &c,
        LayerRange { first: 9, last: 3 },
        vec![FreezeModule::Attn],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("after the last"), "{e}");
}

#[test]
fn paper_learning_rates_by_model() {
    assert_eq!(paper_lr(&llama3_8b()).0, 1e-4);
    assert_eq!(paper_lr(&phi3_mini()).0, 6e-4);
    let llama2 = cfg(
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
        "vocab_size": 32000}),
    );
    assert_eq!(
        paper_lr(&llama2),
        (3e-4, "paper Table 6 (Llama-2)".to_string())
    );
    let smol = cfg(
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30,
        "vocab_size": 49152}),
    );
    assert!(paper_lr(&smol).1.starts_with("finetune's default"));
}
