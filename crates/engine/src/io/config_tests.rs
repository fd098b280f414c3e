//! What a `config.json` can hold: both rope layouts, and the impossible or missing values that
//! must fail with the file and the field named.

use super::*;
use serde_json::json;

const FILE: &str = "models/x/config.json";

/// A small Llama config every case starts from.
fn base() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 420,
        "max_position_embeddings": 2048
    })
}

fn with(mut v: Value, fields: Value) -> Value {
    for (k, x) in fields.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn parse(v: &Value) -> ModelConfig {
    ModelConfig::from_json(v, FILE).unwrap()
}

fn err(v: &Value) -> String {
    match ModelConfig::from_json(v, FILE) {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => format!("{e:#}"),
    }
}

/// The error names the file and every `needle`.
fn fails_naming(v: &Value, needles: &[&str]) {
    let e = err(v);
    assert!(e.contains(FILE), "{e}");
    for n in needles {
        assert!(e.contains(n), "missing {n:?} in: {e}");
    }
}

#[test]
fn the_base_config_parses() {
    let c = parse(&base());
    assert_eq!(
        (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (4, 4, 2, 16)
    );
    assert_eq!(c.layer_types, vec![AttentionKind::Full; 4]);
    assert_eq!(
        c.rope,
        RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::Default
        }
    );
}

#[test]
fn llama3_rope_reads_the_same_in_both_layouts() {
    let scaling = json!({
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192
    });
    let mut v4_scaling = scaling.clone();
    v4_scaling["rope_type"] = json!("llama3");
    let v4 = parse(&with(
        base(),
        json!({"rope_theta": 500000.0, "rope_scaling": v4_scaling}),
    ));
    let mut v5_params = scaling;
    v5_params["rope_type"] = json!("llama3");
    v5_params["rope_theta"] = json!(500000.0);
    let v5 = parse(&with(base(), json!({"rope_parameters": v5_params})));
    let want = RopeConfig {
        theta: 500_000.0,
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
    };
    assert_eq!(v4.rope, want);
    assert_eq!(v5.rope, want);
    assert_eq!((v4.rope_local, v5.rope_local), (None, None));
}

#[test]
fn transformers4_legacy_type_key_and_v5_theta_at_the_top_level() {
    let v4 = parse(&with(
        base(),
        json!({"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}}),
    ));
    assert_eq!(v4.rope.scaling, RopeScaling::Linear { factor: 2.0 });
    assert_eq!(v4.rope.theta, 1e6);
    // A v5 rope_parameters without its own rope_theta falls back to the top-level one.
    let v5 = parse(&with(
        base(),
        json!({"rope_theta": 1e6, "rope_parameters": {"rope_type": "default"}}),
    ));
    assert_eq!(v5.rope.theta, 1e6);
    assert_eq!(v5.rope.scaling, RopeScaling::Default);
}

fn gemma3() -> Value {
    with(
        base(),
        json!({
            "architectures": ["Gemma3ForCausalLM"],
            "head_dim": 16,
            "sliding_window": 16,
            "sliding_window_pattern": 2
        }),
    )
}

#[test]
fn rope_keyed_by_layer_type_equals_the_transformers4_pair() {
    let v5 = parse(&with(
        gemma3(),
        json!({"rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}
        }}),
    ));
    let v4 = parse(&with(
        gemma3(),
        json!({
            "rope_theta": 1e6,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "rope_local_base_freq": 10000.0
        }),
    ));
    let global = RopeConfig {
        theta: 1e6,
        scaling: RopeScaling::Linear { factor: 8.0 },
    };
    let local = RopeConfig {
        theta: 10_000.0,
        scaling: RopeScaling::Default,
    };
    for c in [&v4, &v5] {
        assert_eq!(c.rope, global);
        assert_eq!(c.rope_local.as_ref(), Some(&local));
        // Pattern 2: every second layer is a full-attention one.
        use AttentionKind::{Full, Sliding};
        assert_eq!(c.layer_types, [Sliding, Full, Sliding, Full]);
    }
    // Keyed by layer type without the full-attention entry: no global rope to use.
    fails_naming(
        &with(
            gemma3(),
            json!({"rope_parameters": {"sliding_attention": {"rope_theta": 10000.0}}}),
        ),
        &["rope_parameters", "full_attention"],
    );
}

#[test]
fn unsupported_rope_scaling_is_named() {
    fails_naming(
        &with(
            base(),
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        ),
        &["\"yarn\"", "not supported"],
    );
    fails_naming(
        &with(base(), json!({"rope_scaling": {"rope_type": "llama3"}})),
        &["llama3", "`factor`"],
    );
}

#[test]
fn missing_required_fields_are_named() {
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    ] {
        let mut v = base();
        v.as_object_mut().unwrap().remove(key);
        fails_naming(&v, &[&format!("missing field `{key}`")]);
        // null counts as missing, as transformers writes unset fields.
        fails_naming(&with(base(), json!({key: null})), &[&format!("`{key}`")]);
    }
    fails_naming(
        &with(base(), json!({"hidden_size": "64"})),
        &["`hidden_size`", "non-negative integer"],
    );
    fails_naming(
        &with(base(), json!({"num_hidden_layers": -1})),
        &["`num_hidden_layers`", "non-negative integer"],
    );
}

#[test]
fn zero_counts_are_refused() {
    for key in ["num_hidden_layers", "hidden_size", "vocab_size", "head_dim"] {
        fails_naming(
            &with(base(), json!({key: 0})),
            &[&format!("`{key}` must be at least 1, got 0")],
        );
    }
    fails_naming(
        &with(base(), json!({"num_attention_heads": 0})),
        &["num_attention_heads (0)"],
    );
    fails_naming(
        &with(base(), json!({"num_key_value_heads": 0})),
        &["num_key_value_heads (0)"],
    );
}

#[test]
fn kv_heads_must_divide_the_heads() {
    fails_naming(
        &with(base(), json!({"num_key_value_heads": 3})),
        &["num_attention_heads (4)", "num_key_value_heads (3)"],
    );
    // Without num_key_value_heads: one kv head per head.
    let mut v = base();
    v.as_object_mut().unwrap().remove("num_key_value_heads");
    assert_eq!(parse(&v).num_kv_heads, 4);
}

#[test]
fn head_dim_is_given_or_divides_the_hidden_size() {
    let odd = with(base(), json!({"hidden_size": 66}));
    fails_naming(
        &odd,
        &["hidden_size 66", "num_attention_heads 4", "head_dim"],
    );
    // An explicit head_dim need not divide hidden_size (Gemma 7B: 16 x 256 over 3072).
    let c = parse(&with(odd, json!({"head_dim": 16})));
    assert_eq!((c.head_dim, c.q_dim(), c.hidden_size), (16, 64, 66));
}

#[test]
fn a_sliding_window_of_zero_is_refused_where_it_is_used() {
    let mistral = with(
        base(),
        json!({"architectures": ["MistralForCausalLM"], "sliding_window": 0}),
    );
    fails_naming(&mistral, &["`sliding_window` must be at least 1, got 0"]);
    let c = parse(&with(mistral, json!({"sliding_window": 16})));
    assert_eq!(c.sliding_window, Some(16));
    assert_eq!(c.layer_types, vec![AttentionKind::Sliding; 4]);
    // Qwen2 ignores sliding_window unless use_sliding_window is set, as transformers does.
    let qwen2 = with(
        base(),
        json!({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 0}),
    );
    assert_eq!(parse(&qwen2).sliding_window, None);
    fails_naming(
        &with(qwen2, json!({"use_sliding_window": true})),
        &["`sliding_window`"],
    );
    // Sliding layers named without a window.
    fails_naming(
        &with(
            base(),
            json!({"layer_types": ["full_attention", "sliding_attention", "full_attention",
                                   "full_attention"]}),
        ),
        &["sliding_attention", "no sliding_window"],
    );
}

#[test]
fn layer_types_must_match_the_layer_count() {
    fails_naming(
        &with(base(), json!({"layer_types": ["full_attention"]})),
        &["layer_types has 1 entries", "num_hidden_layers is 4"],
    );
}

#[test]
fn unknown_architectures_are_named_with_the_supported_list() {
    fails_naming(
        &with(base(), json!({"architectures": ["MambaForCausalLM"]})),
        &["MambaForCausalLM", "LlamaForCausalLM", "Phi3ForCausalLM"],
    );
    // No architectures: model_type decides, and an unknown one is named too.
    let mut v = base();
    v.as_object_mut().unwrap().remove("architectures");
    v["model_type"] = json!("qwen2");
    assert_eq!(parse(&v).family, Family::Qwen2);
    v["model_type"] = json!("mamba");
    fails_naming(&v, &["mamba", "unsupported architecture"]);
    v.as_object_mut().unwrap().remove("model_type");
    fails_naming(&v, &["<none given>"]);
}

#[test]
fn from_file_names_the_path() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("config.json");
    let mut v = base();
    v.as_object_mut().unwrap().remove("vocab_size");
    std::fs::write(&p, v.to_string()).unwrap();
    let e = format!("{:#}", ModelConfig::from_file(&p).unwrap_err());
    assert!(
        e.contains(&p.display().to_string()) && e.contains("`vocab_size`"),
        "{e}"
    );
    std::fs::write(&p, "{").unwrap();
    let e = format!("{:#}", ModelConfig::from_file(&p).unwrap_err());
    assert!(e.contains("not valid JSON"), "{e}");
}
