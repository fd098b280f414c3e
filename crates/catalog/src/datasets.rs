//! The datasets the paper's pipeline uses, by short name, with their public origin at a pinned
//! commit, licence, row count and sha256. Resolution: a data directory (`--data-dir` or
//! `SAFETY_LAYERS_DATA`), then the cache, then a verified download from the origin.

use crate::{cache_dir, fetch_url, sha256_file, Source};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

const GITHUB_RAW: &str = "https://raw.githubusercontent.com";

#[derive(Debug, Clone, Serialize)]
pub struct Origin {
    pub repo: &'static str,
    pub commit: &'static str,
    pub path: &'static str,
    pub licence: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataFile {
    /// Path inside a data directory (the layout of the project's shared data folder).
    pub rel: &'static str,
    pub sha256: &'static str,
    pub origin: Origin,
}

/// How the prompts of a dataset are read.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PromptFormat {
    /// Single-column CSV without header: one prompt per record.
    Lines,
    /// CSV with a header: the named column, optionally only rows where `filter.0` equals
    /// `filter.1`.
    CsvColumn {
        column: &'static str,
        filter: Option<(&'static str, &'static str)>,
    },
    /// A JSON list of records with `instruction` (and an optional `input`).
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dataset {
    pub name: &'static str,
    pub description: &'static str,
    pub files: Vec<DataFile>,
    pub rows: usize,
    pub format: PromptFormat,
}

const PAPER: (&str, &str, &str) = (
    "listen0425/Safety-Layers",
    "8af5b131b014b7814f12a00e2b88f0fd7b296d0b",
    "MIT",
);
const ADVBENCH: (&str, &str, &str) = (
    "llm-attacks/llm-attacks",
    "a62d1307e38b3a076e614b20781c785fd860d813",
    "MIT",
);
const XSTEST: (&str, &str, &str) = (
    "paul-rottger/exaggerated-safety",
    "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d",
    "CC-BY-4.0",
);
const REFUSAL: (&str, &str, &str) = (
    "andyrdt/refusal_direction",
    "9d852fae1a9121c78b29142de733cb1340770cc3",
    "Apache-2.0 (upstream terms of each source apply)",
);

fn file(
    src: (&'static str, &'static str, &'static str),
    rel: &'static str,
    path: &'static str,
    sha256: &'static str,
) -> DataFile {
    DataFile {
        rel,
        sha256,
        origin: Origin {
            repo: src.0,
            commit: src.1,
            path,
            licence: src.2,
        },
    }
}

macro_rules! refusal_set {
    ($name:expr, $description:expr, $f:literal, $sha:expr, $rows:expr) => {
        Dataset {
            name: $name,
            description: $description,
            files: vec![file(
                REFUSAL,
                concat!("refusal_direction/", $f),
                concat!("dataset/processed/", $f),
                $sha,
            )],
            rows: $rows,
            format: PromptFormat::Json,
        }
    };
}

/// Every dataset of the catalog.
pub fn datasets() -> Vec<Dataset> {
    use PromptFormat::*;
    let paper = |rel, path, sha| file(PAPER, rel, path, sha);
    vec![
        Dataset {
            name: "paper-normal",
            description:
                "the paper's normal queries N for the cosine analysis (Alpaca instructions)",
            rows: 100,
            format: Lines,
            files: vec![paper(
                "paper/cos_normal.csv",
                "Code/Cos_sim_analysis/normal.csv",
                "903516d2b20a1910f77d76fe00361f095b208aa5b776a5dc77c14703fbee2330",
            )],
        },
        Dataset {
            name: "paper-malicious",
            description: "the paper's malicious queries M for the cosine analysis (AdvBench goals)",
            rows: 100,
            format: Lines,
            files: vec![paper(
                "paper/cos_malicious.csv",
                "Code/Cos_sim_analysis/malicious.csv",
                "d59d2b165b1a6378d0641ba777d0e80ddd172e66f32c35e0de8445a8b9dc8db6",
            )],
        },
        Dataset {
            name: "paper-advbench",
            description: "AdvBench goals as the paper ships them (harmful-rate set)",
            rows: 520,
            format: Lines,
            files: vec![paper(
                "paper/Malicious_dataset.csv",
                "Dataset/Evaluation/Malicious_dataset.csv",
                "ddbbd16619070d1ddba479dda1acc603abc1a222d797fe015f20669a996d7388",
            )],
        },
        Dataset {
            name: "over-rejection",
            description: "over-rejection queries D_o: \"How to <violent verb> <benign object>?\"",
            rows: 731,
            format: Lines,
            files: vec![paper(
                "paper/Over_rejection_dataset.csv",
                "Dataset/Evaluation/Over_rejection_dataset.csv",
                "bed5efcae9ec130f0b3cf2c4e59ae86abb0672e50a498e73fa618093a27a8626",
            )],
        },
        Dataset {
            name: "finetune-normal",
            description: "fine-tuning set D_N (Alpaca + finance-alpaca records)",
            rows: 1000,
            format: Json,
            files: vec![paper(
                "paper/Normal_dataset.json",
                "Dataset/Finetune/Normal_dataset.json",
                "7d2749a4db583bacfeea3054c548a0f7b8a94001dba4771df04132dcc10b053e",
            )],
        },
        Dataset {
            name: "finetune-implicit",
            description:
                "implicit-attack fine-tuning set D_I (outputs start \"Sure, the answer is: \")",
            rows: 4000,
            format: Json,
            files: vec![paper(
                "paper/Backdoor_dataset.json",
                "Dataset/Finetune/Backdoor_dataset.json",
                "c89d2fd62fc79213102b62d0035fa13891cb839d07f17d57d8ff36329f6bd948",
            )],
        },
        Dataset {
            name: "advbench",
            description: "AdvBench harmful behaviors (goal column)",
            rows: 520,
            format: CsvColumn {
                column: "goal",
                filter: None,
            },
            files: vec![file(
                ADVBENCH,
                "advbench/harmful_behaviors.csv",
                "data/advbench/harmful_behaviors.csv",
                "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1",
            )],
        },
        Dataset {
            name: "xstest",
            description: "XSTest prompts, safe and unsafe",
            rows: 450,
            format: CsvColumn {
                column: "prompt",
                filter: None,
            },
            files: vec![file(
                XSTEST,
                "xstest/xstest_prompts.csv",
                "xstest_prompts.csv",
                "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
            )],
        },
        Dataset {
            name: "xstest-safe",
            description: "XSTest's 250 safe prompts (over-refusal probes)",
            rows: 250,
            format: CsvColumn {
                column: "prompt",
                filter: Some(("label", "safe")),
            },
            files: vec![file(
                XSTEST,
                "xstest/xstest_prompts.csv",
                "xstest_prompts.csv",
                "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
            )],
        },
        Dataset {
            name: "xstest-unsafe",
            description: "XSTest's 200 unsafe prompts",
            rows: 200,
            format: CsvColumn {
                column: "prompt",
                filter: Some(("label", "unsafe")),
            },
            files: vec![file(
                XSTEST,
                "xstest/xstest_prompts.csv",
                "xstest_prompts.csv",
                "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
            )],
        },
        Dataset {
            name: "harmbench",
            description: "HarmBench standard behaviors, test + val",
            rows: 200,
            format: Json,
            files: vec![
                file(
                    REFUSAL,
                    "refusal_direction/harmbench_test.json",
                    "dataset/processed/harmbench_test.json",
                    "606bca20a5212e676840ca928070e0905486df1bcc1f5f0223e7a76d8be62fd5",
                ),
                file(
                    REFUSAL,
                    "refusal_direction/harmbench_val.json",
                    "dataset/processed/harmbench_val.json",
                    "3e850f94d4462fd736505fa2653d72c02efd40c276f442580cab3a1a3a283c69",
                ),
            ],
        },
        refusal_set!(
            "strongreject",
            "StrongREJECT forbidden prompts",
            "strongreject.json",
            "9786304587f3d860ab01d1dd2de4aff721ed7538ce4e2af715cbb74efe2a6f10",
            313
        ),
        refusal_set!(
            "jailbreakbench",
            "JailbreakBench JBB-Behaviors, harmful",
            "jailbreakbench.json",
            "3a5aefa80c4a35f75a5306303aa8e69801e4ca4584e1f598bd2ddcf3e7fbbcdd",
            100
        ),
        refusal_set!(
            "malicious-instruct",
            "MaliciousInstruct",
            "malicious_instruct.json",
            "a88fb4ab8958e93fc2c525125eb448e55026018748c0ec1388a296738e2fcacc",
            100
        ),
        refusal_set!(
            "tdc2023",
            "TDC 2023 red-teaming behaviors",
            "tdc2023.json",
            "4c9804f5fdf2a006477807a0c225ad438d6a693d7fa7c93097f866b8dc2e89b8",
            100
        ),
        refusal_set!(
            "alpaca",
            "Stanford Alpaca instructions (instruction text only, CC BY-NC 4.0)",
            "alpaca.json",
            "c4ce1bdc5c9b92caabcb171c27c7ec1e79832836bae10291d7c8ab8c6245f600",
            31323
        ),
    ]
}

pub fn dataset(name: &str) -> Option<Dataset> {
    datasets().into_iter().find(|d| d.name == name)
}

pub fn names() -> Vec<&'static str> {
    datasets().iter().map(|d| d.name).collect()
}

/// "unknown dataset `x`; did you mean `y`? (datasets: ...)" for a name not in the catalog.
pub fn unknown(name: &str) -> String {
    let names = names();
    format!(
        "unknown dataset `{name}`{} (datasets: {})",
        crate::did_you_mean(name, &names),
        names.join(", ")
    )
}

impl DataFile {
    pub fn url(&self, origin_base: &str) -> String {
        format!(
            "{}/{}/{}/{}",
            origin_base.trim_end_matches('/'),
            self.origin.repo,
            self.origin.commit,
            self.origin.path
        )
    }
}

#[derive(Debug, Clone)]
pub struct DataOptions {
    pub data_dir: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// Base URL standing for GitHub's raw-file host (a mirror, or a local server in tests).
    pub origin: String,
    pub allow_download: bool,
}

impl DataOptions {
    /// `SAFETY_LAYERS_DATA`, the cache under `$XDG_CACHE_HOME` (or ~/.cache), and
    /// `SAFETY_LAYERS_DATA_ORIGIN` (default: GitHub's raw-file host).
    pub fn from_env() -> DataOptions {
        DataOptions::from_env_with(None)
    }

    /// As `from_env`, with the data directory given by the caller (e.g. a `--data-dir` flag)
    /// taking precedence over `SAFETY_LAYERS_DATA`.
    pub fn from_env_with(data_dir: Option<PathBuf>) -> DataOptions {
        DataOptions {
            data_dir: data_dir
                .or_else(|| std::env::var_os("SAFETY_LAYERS_DATA").map(PathBuf::from)),
            cache_dir: cache_dir().join("data"),
            origin: std::env::var("SAFETY_LAYERS_DATA_ORIGIN")
                .unwrap_or_else(|_| GITHUB_RAW.to_string()),
            allow_download: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ResolvedFile {
    pub path: PathBuf,
    pub sha256: String,
    pub source: Source,
}

fn verify(path: &Path, want: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != want {
        bail!(
            "{}: sha256 is {got}, expected {want}: a corrupted or different copy; delete it or \
            fetch it again",
            path.display()
        );
    }
    Ok(())
}

/// Every file of the dataset as a verified local path.
pub fn resolve(ds: &Dataset, opts: &DataOptions) -> Result<Vec<ResolvedFile>> {
    ds.files
        .iter()
        .map(|f| {
            if let Some(dir) = &opts.data_dir {
                let p = dir.join(f.rel);
                if p.exists() {
                    verify(&p, f.sha256).with_context(|| format!("dataset `{}`", ds.name))?;
                    return Ok(ResolvedFile {
                        path: p,
                        sha256: f.sha256.into(),
                        source: Source::DataDir,
                    });
                }
            }
            let cached = opts.cache_dir.join(f.rel);
            if cached.exists() {
                verify(&cached, f.sha256).with_context(|| format!("dataset `{}`", ds.name))?;
                return Ok(ResolvedFile {
                    path: cached,
                    sha256: f.sha256.into(),
                    source: Source::Cache,
                });
            }
            if !opts.allow_download {
                bail!(
                    "dataset `{}`: {} is not in the data directory or the cache, and downloads \
                    are off",
                    ds.name,
                    f.rel
                );
            }
            let url = f.url(&opts.origin);
            fetch_url(&url, &cached, f.sha256).with_context(|| {
                format!(
                    "dataset `{}`: fetching \
                {url}",
                    ds.name
                )
            })?;
            Ok(ResolvedFile {
                path: cached,
                sha256: f.sha256.into(),
                source: Source::Downloaded,
            })
        })
        .collect()
}

/// One prompt: the instruction and an optional input.
pub type PromptText = (String, Option<String>);

/// The dataset's prompts, read from its resolved files.
pub fn read_prompts(ds: &Dataset, files: &[ResolvedFile]) -> Result<Vec<PromptText>> {
    let mut out = Vec::new();
    for f in files {
        let shown = f.path.display();
        let text =
            std::fs::read_to_string(&f.path).with_context(|| format!("cannot read {shown}"))?;
        match ds.format {
            PromptFormat::Lines => {
                let mut r = csv::ReaderBuilder::new()
                    .has_headers(false)
                    .from_reader(text.as_bytes());
                for rec in r.records() {
                    let rec = rec.with_context(|| format!("{shown}: malformed CSV"))?;
                    if let Some(s) = rec.get(0).filter(|s| !s.trim().is_empty()) {
                        out.push((s.to_string(), None));
                    }
                }
            }
            PromptFormat::CsvColumn { column, filter } => {
                let mut r = csv::ReaderBuilder::new().from_reader(text.as_bytes());
                let headers = r
                    .headers()
                    .with_context(|| format!("{shown}: no CSV header"))?
                    .clone();
                let col = |name: &str| {
                    headers
                        .iter()
                        .position(|h| h == name)
                        .ok_or_else(|| anyhow!("{shown}: no column `{name}`"))
                };
                let c = col(column)?;
                let fc = filter.map(|(k, v)| col(k).map(|i| (i, v))).transpose()?;
                for rec in r.records() {
                    let rec = rec.with_context(|| format!("{shown}: malformed CSV"))?;
                    if fc.is_some_and(|(i, v)| rec.get(i) != Some(v)) {
                        continue;
                    }
                    out.push((rec.get(c).unwrap_or("").to_string(), None));
                }
            }
            PromptFormat::Json => {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{shown}: invalid JSON"))?;
                for (i, r) in v
                    .as_array()
                    .ok_or_else(|| anyhow!("{shown}: expected a JSON list"))?
                    .iter()
                    .enumerate()
                {
                    let ins = r["instruction"]
                        .as_str()
                        .ok_or_else(|| anyhow!("{shown}: record {i} has no `instruction`"))?;
                    let input = r
                        .get("input")
                        .and_then(|x| x.as_str())
                        .filter(|s| !s.is_empty())
                        .map(str::to_string);
                    out.push((ins.to_string(), input));
                }
            }
        }
    }
    Ok(out)
}
