//! A Helm chart directory rendered the way `helm template` does, for the
//! parts the Ambit chart uses: `Chart.yaml`, `values.yaml` merged with an
//! override and checked against `values.schema.json`, every file under
//! `templates/` (those starting with `_` only define named templates),
//! `crds/` passed through unrendered, and each output split into YAML
//! documents with empty ones dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::gotmpl::Templates;

pub struct Chart {
    pub dir: PathBuf,
    pub meta: Value,
    pub values: Value,
    /// `values.schema.json`, if the chart has one.
    pub schema: Option<Value>,
    /// File name under `templates/` → source.
    pub templates: BTreeMap<String, String>,
    /// File name under `crds/` → contents.
    pub crds: BTreeMap<String, String>,
}

/// One rendered YAML document and the file it came from.
#[derive(Debug, Clone)]
pub struct Document {
    pub source: String,
    pub yaml: String,
}

fn read_yaml(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn files(dir: &Path) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in entries {
        let path = e.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            return Err(format!(
                "{}: subdirectories are not supported here",
                path.display()
            ));
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        out.insert(name, text);
    }
    Ok(out)
}

/// Helm's values merge: maps merge key by key, anything else replaces.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

impl Chart {
    pub fn load(dir: &Path) -> Result<Chart, String> {
        let meta = read_yaml(&dir.join("Chart.yaml"))?;
        let values = read_yaml(&dir.join("values.yaml"))?;
        let schema_path = dir.join("values.schema.json");
        let schema = if schema_path.exists() {
            Some(read_yaml(&schema_path)?)
        } else {
            None
        };
        let templates = files(&dir.join("templates"))?;
        let crds = files(&dir.join("crds"))?;
        Ok(Chart {
            dir: dir.to_path_buf(),
            meta,
            values,
            schema,
            templates,
            crds,
        })
    }

    /// `helm template <release> <chart> --namespace <namespace> -f override`.
    pub fn render(
        &self,
        release: &str,
        namespace: &str,
        over: &Value,
    ) -> Result<Vec<Document>, String> {
        let mut values = self.values.clone();
        merge(&mut values, over);
        if let Some(schema) = &self.schema {
            crate::values_schema::validate(schema, &values, "")
                .map_err(|e| format!("values.schema.json: {e}"))?;
        }
        let field = |k: &str| self.meta.get(k).cloned().unwrap_or(Value::Null);
        let root = json!({
            "Values": values,
            "Release": {
                "Name": release,
                "Namespace": namespace,
                "Service": "Helm",
                "IsInstall": true,
                "IsUpgrade": false,
                "Revision": 1,
            },
            "Chart": {
                "Name": field("name"),
                "Version": field("version"),
                "AppVersion": field("appVersion"),
                "Description": field("description"),
                "Type": field("type"),
                "KubeVersion": field("kubeVersion"),
            },
        });
        let mut set = Templates::default();
        for (name, src) in &self.templates {
            if !(name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".tpl")) {
                return Err(format!("templates/{name}: not a template Helm renders"));
            }
            set.add(name, src).map_err(|e| format!("templates/{e}"))?;
        }
        let mut docs = Vec::new();
        for name in self.templates.keys() {
            if name.starts_with('_') {
                continue;
            }
            let out = set
                .render(name, &root)
                .map_err(|e| format!("rendering templates/{name}: {e}"))?;
            docs.extend(split_documents(&format!("templates/{name}"), &out));
        }
        for (name, text) in &self.crds {
            docs.extend(split_documents(&format!("crds/{name}"), text));
        }
        Ok(docs)
    }
}

/// YAML documents of one file, dropping those with nothing but comments.
pub fn split_documents(source: &str, text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut flush = |current: &mut String| {
        let has_content = current
            .lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        if has_content {
            docs.push(Document {
                source: source.to_string(),
                yaml: std::mem::take(current),
            });
        }
        current.clear();
    };
    for line in text.lines() {
        if line == "---" || line.starts_with("--- ") {
            flush(&mut current);
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    flush(&mut current);
    docs
}
