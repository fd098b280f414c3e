//! Versioned JSON result files: one command writes them, another (or the report) reads them back
//! into the same struct. Reading fails, naming the file and the field, on a missing or mistyped
//! field or another schema version, so that a renamed field is an error and not a silent zero.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// Pretty JSON of a result struct: `schema_version` first, then every object's keys sorted (the
/// order the files had when they were built with `json!`, so their bytes did not change).
pub fn to_pretty<T: Serialize>(doc: &T) -> Result<String> {
    let Value::Object(mut rest) = serde_json::to_value(doc)? else {
        bail!("a result file must be a JSON object");
    };
    let schema_version = rest
        .remove("schema_version")
        .ok_or_else(|| anyhow!("a result file must have a schema_version"))?;
    #[derive(Serialize)]
    struct Versioned<'a> {
        schema_version: &'a Value,
        #[serde(flatten)]
        rest: &'a Map<String, Value>,
    }
    Ok(serde_json::to_string_pretty(&Versioned {
        schema_version: &schema_version,
        rest: &rest,
    })?)
}

/// Reads `path` into `T` after checking that its `schema_version` is `version`.
pub fn read<T: DeserializeOwned>(path: &Path, version: u32) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    from_str(&text, version).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// `read` on text already in memory; the error does not name a file.
pub fn from_str<T: DeserializeOwned>(text: &str, version: u32) -> Result<T> {
    #[derive(Deserialize)]
    struct Version {
        schema_version: u32,
    }
    let found = serde_json::from_str::<Version>(text)?.schema_version;
    if found != version {
        bail!("schema_version is {found}, this build reads version {version}");
    }
    Ok(serde_json::from_str(text)?)
}

/// For `#[serde(deserialize_with = "required")]` on an `Option` field: the key must be present
/// (`null` for none). Without it serde reads a missing key as `None`, so a renamed field would
/// silently read as absent.
pub fn required<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::deserialize(d)
}

/// For `#[serde(deserialize_with = "f64_or_infinity")]` on an f64 that may be +∞, which JSON
/// (serde_json) writes as null.
pub fn f64_or_infinity<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

/// How a result was computed, recorded beside the model in every output that names one:
/// `--dtype` as given, the storage the weights were held in (`f32`, `bf16`, `Q4_1+Q8_0`) and the
/// activation precision. Files written before it was recorded read back without it (`None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Precision {
    pub dtype_option: String,
    pub weights: String,
    pub activations: String,
    /// Where it ran (`cpu`, `cuda:0`); absent in files written before GPUs were supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

impl Precision {
    pub fn of(model: &sl_engine::Model) -> Precision {
        Precision {
            dtype_option: model.dtype_choice.as_str().to_string(),
            weights: model.weight_storage.clone(),
            // f32 on the CPU whatever the weights' storage; the compute dtype on a GPU.
            activations: model.decoder.dtype().as_str().to_string(),
            device: Some(sl_engine::device::name(&model.decoder.device)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// Checks a result struct against a sample document of it: the sample reads back and writes
    /// the same JSON; a file without `field` (or with it renamed) fails naming the file and the
    /// field; another schema_version fails naming both versions.
    pub fn check_file<T: Serialize + DeserializeOwned>(sample: Value, version: u32, field: &str) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("doc.json");
        std::fs::write(&p, to_pretty(&sample).unwrap()).unwrap();
        let doc: T = read(&p, version).unwrap();
        assert_eq!(serde_json::to_value(&doc).unwrap(), sample, "round trip");
        assert!(to_pretty(&doc)
            .unwrap()
            .starts_with("{\n  \"schema_version\": "));

        let mut renamed = sample.clone();
        let v = renamed.as_object_mut().unwrap().remove(field).expect(field);
        for (what, doc) in [
            ("removed", renamed.clone()),
            ("renamed", {
                renamed[format!("{field}_old")] = v;
                renamed
            }),
        ] {
            std::fs::write(&p, doc.to_string()).unwrap();
            let e = format!("{:#}", read::<T>(&p, version).err().expect(what));
            assert!(
                e.contains(&p.display().to_string()) && e.contains(&format!("`{field}`")),
                "{what} {field}: {e}"
            );
        }

        let mut other = sample.clone();
        other["schema_version"] = json!(version + 1);
        std::fs::write(&p, other.to_string()).unwrap();
        let e = format!("{:#}", read::<T>(&p, version).err().unwrap());
        assert!(
            e.contains(&p.display().to_string())
                && e.contains(&format!("{}", version + 1))
                && e.contains(&format!("version {version}")),
            "{e}"
        );
    }

    #[test]
    fn schema_version_comes_first_and_keys_stay_sorted() {
        #[derive(Serialize)]
        struct Doc {
            schema_version: u32,
            zeta: u32,
            alpha: Value,
        }
        let s = to_pretty(&Doc {
            schema_version: 1,
            zeta: 2,
            alpha: json!({"b": 1, "a": 2}),
        })
        .unwrap();
        assert_eq!(
            s,
            "{\n  \"schema_version\": 1,\n  \"alpha\": {\n    \"a\": 2,\n    \"b\": 1\n  },\
             \n  \"zeta\": 2\n}"
        );
    }

    #[test]
    fn a_required_option_must_be_present() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Doc {
            #[serde(deserialize_with = "required")]
            x: Option<u32>,
        }
        assert!(serde_json::from_str::<Doc>(r#"{"x": null}"#)
            .unwrap()
            .x
            .is_none());
        let e = serde_json::from_str::<Doc>("{}").unwrap_err().to_string();
        assert!(e.contains("missing field `x`"), "{e}");
    }
}
