//! The repository's YAML files (compose, OpenAPI, Prometheus rules) as `serde_json::Value`, for
//! the tests that check them. The parser resolves anchors and aliases; merge keys
//! (`<<: *anchor`), which YAML 1.2 dropped but Docker Compose still uses, are applied here: the
//! mapping's own keys win over merged ones, as in YAML 1.1.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

/// A path of the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Loads the single document of the YAML file at `relative` (to the repository root).
pub fn load(relative: &str) -> Value {
    let path = repo_path(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse(&text, relative)
}

/// Parses one YAML document; `what` names it in failure messages.
pub fn parse(text: &str, what: &str) -> Value {
    let docs = YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{what}: bad YAML: {e}"));
    assert_eq!(docs.len(), 1, "{what}: expected one YAML document");
    convert(&docs[0], what)
}

fn key(y: &Yaml, what: &str) -> String {
    match y {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        Yaml::Null => "null".into(),
        other => panic!("{what}: unsupported mapping key {other:?}"),
    }
}

fn convert(y: &Yaml, what: &str) -> Value {
    match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(s.clone())),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(items.iter().map(|i| convert(i, what)).collect()),
        Yaml::Hash(h) => {
            let mut out = Map::new();
            // Merged mappings first, in order, so that the mapping's own keys override them.
            if let Some(merge) = h.get(&Yaml::String("<<".into())) {
                let sources = match merge {
                    Yaml::Array(list) => list.iter().collect::<Vec<_>>(),
                    single => vec![single],
                };
                for source in sources {
                    match convert(source, what) {
                        Value::Object(m) => {
                            for (k, v) in m {
                                out.entry(k).or_insert(v);
                            }
                        }
                        other => panic!("{what}: merge key with a non-mapping {other}"),
                    }
                }
            }
            for (k, v) in h {
                let k = key(k, what);
                if k != "<<" {
                    out.insert(k, convert(v, what));
                }
            }
            Value::Object(out)
        }
        Yaml::Alias(_) | Yaml::BadValue => panic!("{what}: unresolved YAML node {y:?}"),
    }
}
