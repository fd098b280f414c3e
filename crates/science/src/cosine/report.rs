//! Running the cosine analysis on one model (and optionally a second one to compare, e.g. the
//! pre-alignment base, the paper's Fig. 3), and writing cosine.json / .csv / .svg files.

use crate::cosine::figure::{angle_gap_svg, cosine_svg, Series};
use crate::cosine::file::CosineFile;
use crate::cosine::{curves, Curves, Pairs, Vectors};
use crate::schema::Precision;
use anyhow::Result;
use serde::Serialize;
use sl_engine::io::atomic::write_atomic;
use sl_engine::{Model, PromptRecord, Template};
use std::path::Path;

/// A prompt set with where it came from, for provenance.
#[derive(Debug, Clone)]
pub struct PromptSet {
    pub name: String,
    pub records: Vec<PromptRecord>,
    /// sha256 of the file the records were read from.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy)]
pub struct CosineConfig {
    pub template: Template,
    pub pairs: Pairs,
    pub seed: u64,
    pub batch_size: usize,
}

/// One model's analysis.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCurves {
    pub model: String,
    pub precision: Precision,
    pub curves: Curves,
    pub prompts: usize,
    pub tokens: usize,
    pub seconds: f64,
}

impl ModelCurves {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Unit last-token vectors of every prompt of a set (one batched pass), and its token count.
/// Prompts longer than the model's context are refused, naming the prompt.
pub fn vectors(
    model: &Model,
    set: &PromptSet,
    cfg: &CosineConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<(Vectors, usize)> {
    if set.records.len() < 2 {
        anyhow::bail!(
            "prompt set `{}` has {} prompt(s); the cosine analysis needs at least 2",
            set.name,
            set.records.len()
        );
    }
    let prompts = model.prompts(&set.records, cfg.template)?;
    let max = model.cfg().max_position_embeddings;
    if let Some(p) = prompts.iter().find(|p| p.ids.len() > max) {
        anyhow::bail!(
            "prompt set `{}`: {:?} is {} tokens, longer than the model's context ({max}); \
             shorten it",
            set.name,
            p.record.instruction,
            p.ids.len()
        );
    }
    let ids: Vec<Vec<u32>> = prompts.into_iter().map(|p| p.ids).collect();
    let tokens = ids.iter().map(|i| i.len()).sum::<usize>();
    let states =
        sl_engine::infer::extract::hidden_last(&model.decoder, &ids, cfg.batch_size, progress)
            .map_err(|e| anyhow::anyhow!("prompt set `{}`: {e:#}", set.name))?;
    Ok((Vectors::from_tensors(&states, &set.name)?, tokens))
}

/// Runs every prompt of both sets through the model once (batched) and forms the pairs.
pub fn analyse(
    model: &Model,
    label: &str,
    normal: &PromptSet,
    malicious: &PromptSet,
    cfg: &CosineConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<ModelCurves> {
    let t0 = std::time::Instant::now();
    let (nv, nt) = vectors(model, normal, cfg, progress)?;
    let (mv, mt) = vectors(model, malicious, cfg, progress)?;
    let seconds = t0.elapsed().as_secs_f64();
    let curves = curves(&nv, &mv, cfg.pairs, cfg.seed)?;
    Ok(ModelCurves {
        model: label.to_string(),
        precision: Precision::of(model),
        curves,
        prompts: normal.records.len() + malicious.records.len(),
        tokens: nt + mt,
        seconds,
    })
}

/// Writes cosine.json, cosine.csv, cosine.svg and angle_gap.svg into `dir`, each atomically.
pub fn write(
    dir: &Path,
    main: &ModelCurves,
    compare: Option<&ModelCurves>,
    normal: &PromptSet,
    malicious: &PromptSet,
    cfg: &CosineConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    CosineFile::new(main, compare, normal, malicious, cfg).write(&dir.join("cosine.json"))?;

    let mut csv = String::from(
        "model,entry,layer,nn_mean,nn_std,mm_mean,mm_std,nm_mean,nm_std,gap_code_deg,\
         gap_paper_deg\n",
    );
    for r in std::iter::once(main).chain(compare) {
        for e in &r.curves.entries {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{}\n",
                csv_field(&r.model),
                e.entry,
                e.entry as i64 - 1,
                e.nn_mean,
                e.nn_std,
                e.mm_mean,
                e.mm_std,
                e.nm_mean,
                e.nm_std,
                e.gap_code_deg,
                e.gap_paper_deg
            ));
        }
    }
    write_atomic(&dir.join("cosine.csv"), csv.as_bytes())?;

    // Figures name models by short labels (a path's last part), which fit titles and legends.
    let (main_label, compare_label) = (
        short_label(&main.model),
        compare.map(|c| short_label(&c.model)),
    );
    let mut series = vec![Series {
        label: &main_label,
        curves: &main.curves,
    }];
    if let (Some(c), Some(label)) = (compare, &compare_label) {
        series.push(Series {
            label,
            curves: &c.curves,
        });
    }
    let title = match &compare_label {
        Some(c) => format!("Last-token cosine similarity: {main_label} vs {c} (dashed)"),
        None => format!("Last-token cosine similarity: {main_label}"),
    };
    write_atomic(
        &dir.join("cosine.svg"),
        cosine_svg(&series, &title)?.as_bytes(),
    )?;
    write_atomic(
        &dir.join("angle_gap.svg"),
        angle_gap_svg(&series, "Angle gap between N-M and N-N pairs")?.as_bytes(),
    )?;
    Ok(())
}

/// A model named for a figure: the last part of a path without a `.gguf` ending, cut to 28
/// characters (catalog names and labels pass through).
pub fn short_label(model: &str) -> String {
    let last = model
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(model);
    let stem = last
        .strip_suffix(".gguf")
        .or_else(|| last.strip_suffix(".GGUF"))
        .unwrap_or(last);
    let stem = if stem.is_empty() { model } else { stem };
    if stem.chars().count() > 28 {
        let head: String = stem.chars().take(27).collect();
        format!("{head}…")
    } else {
        stem.to_string()
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod label_tests {
    use super::short_label;

    #[test]
    fn figure_labels_are_short() {
        assert_eq!(
            short_label("/work/shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "SmolLM2-135M-Instruct.Q4_1"
        );
        assert_eq!(short_label("out/demo/aligned/"), "aligned");
        assert_eq!(short_label("smollm2"), "smollm2");
        let long = short_label("/m/a-very-long-model-directory-name-indeed");
        assert_eq!(long.chars().count(), 28);
        assert!(long.ends_with('…'));
    }
}
