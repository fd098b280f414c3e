//! The `safety_layers._native` extension module: the engine and the paper's analyses for Python.
//! The pure-Python package around it (`python/safety_layers`) adds the result dataclasses, tqdm
//! progress bars and the docstrings users read; this crate keeps to three rules:
//!
//! - long work runs with the GIL released (`run_detached`), so other Python threads go on;
//! - every error reaches Python as an exception with the CLI's message (`to_py_err`), a missing
//!   file as `FileNotFoundError`, and no panic ever crosses into the interpreter;
//! - Ctrl-C is honoured between batches: the progress hook checks Python's signals and unwinds
//!   out of the engine with the `KeyboardInterrupt` (`Progress::tick`).

mod convert;
mod model;
mod science;

use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// A Python exception raised inside a progress hook (KeyboardInterrupt from Ctrl-C, or whatever
/// the user's callback raised), carried out of the engine by unwinding.
struct Raised(PyErr);

/// An engine error as the Python exception a user expects, with the CLI's message.
pub(crate) fn to_py_err(e: anyhow::Error) -> PyErr {
    let msg = format!("{e:#}");
    let io_not_found = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    });
    // The catalog and the prompt readers say "no such file" when a named path is absent (a name
    // that is neither a file nor a catalog entry).
    if io_not_found || msg.contains("no such file") {
        PyFileNotFoundError::new_err(msg)
    } else {
        PyValueError::new_err(msg)
    }
}

/// Runs `f` with the GIL released; its error, a Python exception raised by a progress hook, or a
/// panic (a bug) each come back as a Python exception.
pub(crate) fn run_detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> PyResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py_err(e)),
        Err(payload) => match payload.downcast::<Raised>() {
            Ok(raised) => Err(raised.0),
            Err(other) => {
                let what = other
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| other.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(PyRuntimeError::new_err(format!(
                    "internal error in safety_layers (please report it): {what}"
                )))
            }
        },
    }
}

/// The progress hook handed to the engine: checks for Ctrl-C and calls the Python callback
/// (`callback(n_done, info)`, e.g. a tqdm bar's update) with the GIL taken back briefly.
pub(crate) struct Progress {
    callback: Option<Py<PyAny>>,
}

impl Progress {
    pub(crate) fn new(callback: Option<Py<PyAny>>) -> Progress {
        Progress { callback }
    }

    /// Called from inside `run_detached` only: unwinding is how a raised exception stops the
    /// engine, whose progress hooks return nothing.
    pub(crate) fn tick(&self, n: usize, info: Option<String>) {
        Python::attach(|py| {
            if let Err(e) = py.check_signals() {
                resume_unwind(Box::new(Raised(e)));
            }
            if let Some(cb) = &self.callback {
                if let Err(e) = cb.call1(py, (n, info)) {
                    resume_unwind(Box::new(Raised(e)));
                }
            }
        })
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // candle's element-wise thread pool spin-waits at every op (see the CLI's main); the
    // variable is read when the pool starts, so it is set at import, before any model runs.
    // Importing happens with the GIL held and before this module starts threads of its own.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    m.add_class::<model::PyModel>()?;
    m.add_class::<model::Scaled>()?;
    m.add_function(wrap_pyfunction!(science::cosine, m)?)?;
    m.add_function(wrap_pyfunction!(science::locate, m)?)?;
    m.add_function(wrap_pyfunction!(science::finetune, m)?)?;
    m.add_function(wrap_pyfunction!(science::evaluate, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
