//! What the prompt readers return, checked against facts stated in shared/data/README.md, so a
//! CSV quirk (quoting, no final newline, header, row filter) cannot silently change a prompt.

use crate::common::{shared_data, skip_without_shared};
use sl_catalog::datasets::{self, DataOptions, ResolvedFile};
use sl_catalog::Source;
use std::path::Path;

fn local(data_dir: &Path, cache: &Path) -> DataOptions {
    // Port 9 (discard) on localhost: any attempted download fails fast instead of reaching out.
    DataOptions {
        data_dir: Some(data_dir.to_path_buf()),
        cache_dir: cache.to_path_buf(),
        origin: "http://127.0.0.1:9".into(),
        allow_download: false,
    }
}

fn prompts(name: &str) -> Vec<(String, Option<String>)> {
    let cache = tempfile::tempdir().unwrap();
    let ds = datasets::dataset(name).unwrap();
    let files = datasets::resolve(&ds, &local(&shared_data(), cache.path())).unwrap();
    datasets::read_prompts(&ds, &files).unwrap()
}

fn texts(name: &str) -> Vec<String> {
    prompts(name).into_iter().map(|p| p.0).collect()
}

#[test]
fn paper_advbench_equals_the_advbench_goal_column() {
    if skip_without_shared(&["data"]) {
        return;
    }
    // README: "Its `goal` column equals paper/Malicious_dataset.csv" — one headerless reader, one
    // header+column reader, same texts in the same order.
    assert_eq!(texts("paper-advbench"), texts("advbench"));
}

#[test]
fn cos_malicious_is_advbench_goals_without_26_and_39() {
    if skip_without_shared(&["data"]) {
        return;
    }
    // README: AdvBench goals 0..101 minus 26 and 39.
    let goals = texts("advbench");
    let want: Vec<String> = (0..102)
        .filter(|i| *i != 26 && *i != 39)
        .map(|i| goals[i].clone())
        .collect();
    assert_eq!(texts("paper-malicious"), want);
}

#[test]
fn cos_normal_quoting_and_last_line() {
    if skip_without_shared(&["data"]) {
        return;
    }
    let n = texts("paper-normal");
    // A quoted field with doubled quotes inside unquotes to single quotes.
    assert_eq!(n[41], "What is the contraction of \"they are\"?");
    // Unquoted fields keep their quote characters literally, as Python's csv module does.
    assert_eq!(n[55], "Find a rhyming word for the word \"\"river\"\".");
    // The last line has no trailing newline and is still a full prompt.
    let raw = std::fs::read_to_string(shared_data().join("paper/cos_normal.csv")).unwrap();
    assert!(!raw.ends_with('\n'));
    assert_eq!(n.last().unwrap(), raw.lines().last().unwrap());
    assert!(n.iter().all(|s| !s.is_empty() && !s.ends_with('\r')));
}

#[test]
fn xstest_filters_partition_the_file() {
    if skip_without_shared(&["data"]) {
        return;
    }
    let all = texts("xstest");
    let (safe, unsafe_) = (texts("xstest-safe"), texts("xstest-unsafe"));
    assert_eq!((all.len(), safe.len(), unsafe_.len()), (450, 250, 200));
    let mut both = safe.clone();
    both.extend(unsafe_.iter().cloned());
    both.sort();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(both, sorted);
}

#[test]
fn harmbench_is_test_then_val() {
    if skip_without_shared(&["data"]) {
        return;
    }
    let h = texts("harmbench");
    assert_eq!(h.len(), 159 + 41);
    let val: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared_data().join("refusal_direction/harmbench_val.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(h[159], val[0]["instruction"].as_str().unwrap());
}

#[test]
fn finetune_records_carry_their_input() {
    if skip_without_shared(&["data"]) {
        return;
    }
    let p = prompts("finetune-normal");
    assert_eq!(p.len(), 1000);
    // Alpaca records: some have an input, some do not; empty inputs read as None.
    assert!(p.iter().any(|r| r.1.is_some()));
    assert!(p.iter().any(|r| r.1.is_none()));
    assert!(p.iter().all(|r| r.1.as_deref() != Some("")));
}

#[test]
fn missing_from_data_dir_falls_back_to_cache_and_downloads_can_be_off() {
    if skip_without_shared(&["data"]) {
        return;
    }
    let ds = datasets::dataset("tdc2023").unwrap();
    let empty = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    // Not in the data dir, not cached, downloads off: an error naming the file.
    let e = format!(
        "{:#}",
        datasets::resolve(&ds, &local(empty.path(), cache.path())).unwrap_err()
    );
    assert!(
        e.contains("refusal_direction/tdc2023.json") && e.contains("tdc2023"),
        "{e}"
    );
    // Placed in the cache by hand: found there, verified.
    let at = cache.path().join(ds.files[0].rel);
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::copy(shared_data().join(ds.files[0].rel), &at).unwrap();
    let got: Vec<ResolvedFile> =
        datasets::resolve(&ds, &local(empty.path(), cache.path())).unwrap();
    assert_eq!(got[0].source, Source::Cache);
    assert_eq!(got[0].sha256, ds.files[0].sha256);
    // A corrupted cached copy is refused, not silently replaced.
    std::fs::write(&at, b"[]").unwrap();
    let e = format!(
        "{:#}",
        datasets::resolve(&ds, &local(empty.path(), cache.path())).unwrap_err()
    );
    assert!(
        e.contains("tdc2023.json") && e.contains(ds.files[0].sha256) && e.contains("corrupted"),
        "{e}"
    );
}

#[test]
fn every_entry_names_its_public_origin() {
    if skip_without_shared(&["data"]) {
        return;
    }
    let sums = std::fs::read_to_string(shared_data().join("SHA256SUMS")).unwrap();
    for ds in datasets::datasets() {
        assert!(
            !ds.files.is_empty() && !ds.description.is_empty(),
            "{}",
            ds.name
        );
        for f in &ds.files {
            // The table's hash is the one in SHA256SUMS for the same relative path.
            assert!(
                sums.lines()
                    .any(|l| l == format!("{}  ./{}", f.sha256, f.rel)),
                "{}: {}",
                ds.name,
                f.rel
            );
            assert_eq!(f.origin.commit.len(), 40, "{}", ds.name);
            assert!(!f.origin.licence.is_empty());
            let url = f.url("https://raw.githubusercontent.com");
            assert!(
                url.starts_with(&format!(
                    "https://raw.githubusercontent.com/{}/{}/",
                    f.origin.repo, f.origin.commit
                )),
                "{url}"
            );
        }
    }
}
