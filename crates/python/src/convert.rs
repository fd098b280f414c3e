//! Values between the engine and Python: JSON documents as dicts, tensors as NumPy arrays,
//! prompt arguments as records.

use anyhow::Result;
use candle_core::{DType, Tensor};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString};
use serde_json::Value;
use sl_engine::PromptRecord;
use sl_science::cosine::report::PromptSet;
use std::path::PathBuf;

/// A JSON document (what the CLI writes) as Python dicts, lists, numbers and strings.
pub fn json_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            let l = PyList::empty(py);
            for x in a {
                l.append(json_to_py(py, x)?)?;
            }
            l.into_any()
        }
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

/// A tensor's values as f32, row-major, with its shape.
pub fn tensor_f32(t: &Tensor) -> Result<(Vec<usize>, Vec<f32>)> {
    let dims = t.dims().to_vec();
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((dims, data))
}

/// Row-major f32 values as a NumPy array of `shape`.
pub fn array<'py>(py: Python<'py>, shape: &[usize], data: Vec<f32>) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, data)
        .reshape(shape.to_vec())?
        .into_any())
}

/// Prompts as a list of strings, or a prompt file / dataset name as the CLI's `--prompts` takes.
#[derive(FromPyObject)]
pub enum PromptsArg {
    Spec(PathBuf),
    List(Vec<String>),
}

impl PromptsArg {
    /// The prompt set, named for provenance (a list is named by `what`, its hash over the lines).
    pub fn resolve(&self, what: &str) -> Result<PromptSet> {
        match self {
            PromptsArg::Spec(p) => sl_science::inputs::prompt_set(
                &p.to_string_lossy(),
                None,
                &sl_catalog::datasets::DataOptions::from_env(),
            ),
            PromptsArg::List(items) => Ok(PromptSet {
                name: what.to_string(),
                records: items.iter().map(|s| PromptRecord::new(s)).collect(),
                sha256: sl_science::sha256_hex(items.join("\n").as_bytes()),
            }),
        }
    }
}

/// `s` parsed as `T`, its error as the engine's.
pub fn parse<T: std::str::FromStr>(s: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(|e| anyhow::anyhow!("{e}"))
}
