//! Equality-based label selectors on list and watch.

use super::*;

/// A label selector's requirements, in the equality-based form
/// (`k=v`, `k==v`, `k!=v`, `k`, `!k`); set-based ones (`in`, `notin`) are
/// refused, so a test never silently matches more than asked.
#[derive(Debug, Clone, Default)]
pub(super) struct LabelSelector {
    requirements: Vec<(String, LabelOp)>,
}

#[derive(Debug, Clone)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    Exists,
    Absent,
}

impl LabelSelector {
    pub(super) fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part.contains(" in ") || part.contains(" notin ") || part.contains('(') {
                return Err(format!(
                    "the fake API server does not implement set-based selectors ({part:?})"
                ));
            }
            let req = if let Some((k, v)) = part.split_once("!=") {
                (k, LabelOp::NotEquals(v.to_string()))
            } else if let Some((k, v)) = part.split_once("==") {
                (k, LabelOp::Equals(v.to_string()))
            } else if let Some((k, v)) = part.split_once('=') {
                (k, LabelOp::Equals(v.to_string()))
            } else if let Some(k) = part.strip_prefix('!') {
                (k, LabelOp::Absent)
            } else {
                (part, LabelOp::Exists)
            };
            requirements.push((req.0.trim().to_string(), req.1));
        }
        Ok(LabelSelector { requirements })
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.requirements.iter().all(|(key, op)| {
            let value = labels.get(key).and_then(Value::as_str);
            match op {
                LabelOp::Equals(v) => value == Some(v.as_str()),
                LabelOp::NotEquals(v) => value != Some(v.as_str()),
                LabelOp::Exists => value.is_some(),
                LabelOp::Absent => value.is_none(),
            }
        })
    }
}
