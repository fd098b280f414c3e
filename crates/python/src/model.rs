//! `safety_layers.Model`: a loaded checkpoint with hidden states, hooked runs, greedy generation
//! and the paper's weight scaling as a context manager.

use crate::convert::{array, json_to_py, parse, tensor_f32, PromptsArg};
use crate::{run_detached, to_py_err, Progress};
use anyhow::{bail, Context};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use sl_engine::infer::extract::hidden_last;
use sl_engine::infer::generate::{greedy, GenerateOptions};
use sl_engine::io::loader::WeightDType;
use sl_engine::{LayerRange, Model, Positions, Prompt, Template};
use sl_science::inputs::{self, ModelSource};
use std::path::PathBuf;

#[pyclass(module = "safety_layers._native", name = "Model")]
pub struct PyModel {
    pub(crate) inner: Model,
    /// The model as it was named (path or catalog name), recorded in result files.
    pub(crate) spec: String,
    /// The range and factor of an open `scaled()` context.
    pub(crate) scaled: Option<(LayerRange, f64)>,
}

impl PyModel {
    /// Formats and tokenises prompts as the CLI does (context length checked).
    pub(crate) fn encode(
        &self,
        prompts: &PromptsArg,
        template: &str,
    ) -> anyhow::Result<Vec<Prompt>> {
        let template: Template = parse(template)?;
        let set = prompts.resolve("prompts")?;
        if set.records.is_empty() {
            bail!("no prompts given");
        }
        inputs::encode_prompts(&self.inner, &set.records, template, &set.name)
    }
}

fn positions(s: &str) -> anyhow::Result<Positions> {
    match s {
        "last" => Ok(Positions::Last),
        "all" => Ok(Positions::All),
        _ => bail!("positions `{s}`: expected `last` or `all`"),
    }
}

#[pymethods]
impl PyModel {
    /// Loads a Hugging Face directory, a .gguf file or a catalog name (SAFETY_LAYERS_MODELS and
    /// the cache are searched as by the CLI).
    #[staticmethod]
    #[pyo3(signature = (model, dtype="auto", device=None))]
    fn load(py: Python<'_>, model: PathBuf, dtype: &str, device: Option<&str>) -> PyResult<Self> {
        let src = ModelSource {
            models: sl_catalog::models::ModelOptions::from_env(),
            dtype: Some(parse::<WeightDType>(dtype).map_err(to_py_err)?),
            device: device.map(parse).transpose().map_err(to_py_err)?,
            // The allocator belongs to the Python process, not to us.
            tune_malloc: false,
        };
        let inner = run_detached(py, || inputs::load_model(&model, &src, false))?;
        Ok(PyModel {
            inner,
            spec: model.display().to_string(),
            scaled: None,
        })
    }

    /// As the CLI's `inspect --json`: family, layers, sizes, parameters, storage, device.
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = inputs::describe_model(&self.inner, &self.spec).map_err(to_py_err)?;
        json_to_py(py, &v)
    }

    /// The model as it was named.
    #[getter]
    fn name(&self) -> &str {
        &self.spec
    }

    /// Number of decoder layers.
    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.cfg().num_layers
    }

    /// The open `scaled()` context's `(first, last, alpha)`, or None.
    #[getter]
    fn scaling(&self) -> Option<(usize, usize, f64)> {
        self.scaled.map(|(r, a)| (r.first, r.last, a))
    }

    #[pyo3(signature = (prompts, template="alpaca", entries=None, batch_size=16, progress=None))]
    fn hidden_states<'py>(
        &self,
        py: Python<'py>,
        prompts: PromptsArg,
        template: &str,
        entries: Option<Vec<i64>>,
        batch_size: usize,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let prompts = self.encode(&prompts, template).map_err(to_py_err)?;
        let n_entries = self.inner.cfg().num_hidden_entries();
        let hsize = self.inner.cfg().hidden_size;
        let picked: Vec<usize> = match entries {
            None => (0..n_entries).collect(),
            Some(list) => list
                .iter()
                .map(|&e| {
                    let i = if e < 0 { e + n_entries as i64 } else { e };
                    if i < 0 || i >= n_entries as i64 {
                        Err(to_py_err(anyhow::anyhow!(
                            "entries: {e} is out of range; this model has {n_entries} hidden-state \
                             entries (0 = embeddings, {} = after the final norm)",
                            n_entries - 1
                        )))
                    } else {
                        Ok(i as usize)
                    }
                })
                .collect::<PyResult<_>>()?,
        };
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let bar = Progress::new(progress);
        let dec = &self.inner.decoder;
        let data = run_detached(py, || {
            let states = hidden_last(dec, &ids, batch_size, &mut |n| bar.tick(n, None))
                .map_err(|e| sl_engine::device::explain_oom(e, "hidden", batch_size))?;
            let mut out = Vec::with_capacity(ids.len() * picked.len() * hsize);
            for s in &states {
                let (_, v) = tensor_f32(s)?;
                for &e in &picked {
                    out.extend_from_slice(&v[e * hsize..(e + 1) * hsize]);
                }
            }
            Ok(out)
        })?;
        array(py, &[ids.len(), picked.len(), hsize], data)
    }

    /// Logits at each prompt's last token and the activations at the named hooks.
    #[pyo3(signature = (prompts, hooks, template="alpaca", positions="last", batch_size=16))]
    fn run_with_cache<'py>(
        &self,
        py: Python<'py>,
        prompts: PromptsArg,
        hooks: Vec<String>,
        template: &str,
        positions: &str,
        batch_size: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let pos = self::positions(positions).map_err(to_py_err)?;
        let prompts = self.encode(&prompts, template).map_err(to_py_err)?;
        let dec = &self.inner.decoder;
        let (logits, acts) = run_detached(py, || {
            let names: Vec<&str> = hooks.iter().map(String::as_str).collect();
            let (logits, cache) = dec.run_with_cache(&prompts, &names, pos, batch_size)?;
            let mut acts = Vec::new();
            for name in &hooks {
                let t = cache
                    .by_name(name)
                    .with_context(|| format!("hook `{name}` was not read"))?;
                acts.push((name.clone(), tensor_f32(t)?));
            }
            Ok((tensor_f32(&logits)?, acts))
        })?;
        let d = PyDict::new(py);
        for (name, (shape, v)) in acts {
            d.set_item(name, array(py, &shape, v)?)?;
        }
        PyTuple::new(py, [array(py, &logits.0, logits.1)?, d.into_any()])
    }

    /// Greedy continuations of the prompts, decoded.
    #[pyo3(signature = (prompts, max_new_tokens=16, template="alpaca", batch_size=16,
                        ignore_eos=false, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompts: PromptsArg,
        max_new_tokens: usize,
        template: &str,
        batch_size: usize,
        ignore_eos: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<String>> {
        let prompts = self.encode(&prompts, template).map_err(to_py_err)?;
        let m = &self.inner;
        let bar = Progress::new(progress);
        run_detached(py, || {
            let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
            let opts = GenerateOptions {
                max_new_tokens,
                batch_size,
                ignore_eos,
                no_cache: false,
                first_mass_of: vec![],
            };
            let outs = greedy(&m.decoder, &ids, &m.eos_token_ids, &opts, &mut |n| {
                bar.tick(n, None)
            })
            .map_err(|e| sl_engine::device::explain_oom(e, "generate", batch_size))?;
            outs.iter().map(|o| m.tokenizer.decode(o, true)).collect()
        })
    }

    /// A context manager scaling layers `range` ("I-J", 0-indexed, inclusive) by `alpha`.
    fn scaled(slf: Bound<'_, Self>, range: &str, alpha: f64) -> PyResult<Scaled> {
        let n = slf.borrow().inner.cfg().num_layers;
        let range = LayerRange::parse(range, n).map_err(to_py_err)?;
        if !alpha.is_finite() || alpha <= 0.0 {
            return Err(to_py_err(anyhow::anyhow!(
                "alpha must be a positive finite number, got {alpha}"
            )));
        }
        Ok(Scaled {
            model: slf.unbind(),
            range,
            alpha,
        })
    }

    fn __repr__(&self) -> String {
        let c = self.inner.cfg();
        format!(
            "Model({:?}, family={:?}, layers={}, hidden_size={})",
            self.spec, c.family, c.num_layers, c.hidden_size
        )
    }
}

/// What `Model.scaled` returns: scales on enter, restores the original weights on exit (the
/// scaling is a factor applied at matmul time, so restoring is exact).
#[pyclass(module = "safety_layers._native")]
pub struct Scaled {
    model: Py<PyModel>,
    range: LayerRange,
    alpha: f64,
}

#[pymethods]
impl Scaled {
    fn __enter__(&self, py: Python<'_>) -> PyResult<Py<PyModel>> {
        let mut m = self.model.borrow_mut(py);
        if let Some((r, a)) = m.scaled {
            return Err(to_py_err(anyhow::anyhow!(
                "the model is already scaled (layers {r} by {a}); scaled() contexts do not nest"
            )));
        }
        m.inner
            .decoder
            .scale_layers(self.range, self.alpha)
            .map_err(to_py_err)?;
        m.scaled = Some((self.range, self.alpha));
        Ok(self.model.clone_ref(py))
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> bool {
        let mut m = self.model.borrow_mut(py);
        m.inner.decoder.restore_scaling();
        m.scaled = None;
        false
    }
}
