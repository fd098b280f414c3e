//! A misspelled dataset or model name is answered with the catalog name meant.

use sl_catalog::datasets;
use sl_catalog::models::{resolve_model, ModelOptions};

#[test]
fn misspelled_dataset_names_suggest_the_closest() {
    for (typo, meant) in [
        ("advbnch", "advbench"),
        ("finetun-implicit", "finetune-implicit"),
        ("Harmbench", "harmbench"),
        ("strongrejcet", "strongreject"),
    ] {
        assert!(datasets::dataset(typo).is_none(), "{typo} is a real name");
        let msg = datasets::unknown(typo);
        assert!(
            msg.starts_with(&format!(
                "unknown dataset `{typo}`; did you mean `{meant}`?"
            )),
            "{msg}"
        );
        assert!(
            msg.contains("(datasets: "),
            "the list is still given: {msg}"
        );
    }
    assert!(!datasets::unknown("completely-different").contains("did you mean"));
}

#[test]
fn misspelled_model_names_suggest_the_closest() {
    let cache = tempfile::tempdir().unwrap();
    let opts = ModelOptions {
        models_dir: None,
        cache_dir: cache.path().to_path_buf(),
        pip: vec!["false".into()],
    };
    let e = resolve_model("smollm2-135m-instrct", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a catalog name; did you mean `smollm2-135m-instruct`?"),
        "{e}"
    );
    let e = resolve_model("llama-70b", &opts).unwrap_err().to_string();
    assert!(
        !e.contains("did you mean") && e.contains("catalog: "),
        "{e}"
    );
}
