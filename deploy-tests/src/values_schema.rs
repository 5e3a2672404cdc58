//! `values.schema.json` applied to the merged values, as Helm does before
//! rendering (install, upgrade, template, lint). Only the JSON Schema
//! keywords the chart's schema uses are implemented; any other is an error
//! rather than a constraint silently not checked.

use serde_json::Value;

const KEYWORDS: [&str; 9] = [
    "$schema",
    "description",
    "type",
    "properties",
    "additionalProperties",
    "items",
    "enum",
    "minLength",
    "minimum",
];

fn type_matches(t: &str, v: &Value) -> Result<bool, String> {
    Ok(match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "number" => v.is_number(),
        "integer" => v.as_i64().is_some() || v.as_u64().is_some(),
        "null" => v.is_null(),
        other => return Err(format!("schema type {other:?} is not implemented")),
    })
}

/// Checks `v` against `schema`; the error names the offending path.
pub fn validate(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let s = schema
        .as_object()
        .ok_or_else(|| format!("{at}: schema is not an object"))?;
    if let Some(k) = s.keys().find(|k| !KEYWORDS.contains(&k.as_str())) {
        return Err(format!("{at}: schema keyword {k:?} is not implemented"));
    }
    let here = if at.is_empty() { "values" } else { at };
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(t) => vec![t.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => return Err(format!("{at}: bad type {t}")),
        };
        let mut ok = false;
        for t in &types {
            ok |= type_matches(t, v)?;
        }
        if !ok {
            return Err(format!("{here}: {v} is not of type {}", types.join(" or ")));
        }
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            return Err(format!("{here}: {v} is not one of {allowed:?}"));
        }
    }
    if let (Some(min), Some(text)) = (s.get("minLength").and_then(Value::as_u64), v.as_str()) {
        if (text.chars().count() as u64) < min {
            return Err(format!("{here}: {text:?} is shorter than {min}"));
        }
    }
    if let (Some(min), Some(n)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if n < min {
            return Err(format!("{here}: {n} is below {min}"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        let closed = s.get("additionalProperties") == Some(&Value::Bool(false));
        for (k, val) in obj {
            let path = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            match props.and_then(|p| p.get(k)) {
                Some(sub) => validate(sub, val, &path)?,
                None if closed => return Err(format!("{path}: not a value of this chart")),
                None => {}
            }
        }
    }
    if let (Some(items), Some(list)) = (s.get("items"), v.as_array()) {
        for (i, item) in list.iter().enumerate() {
            validate(items, item, &format!("{here}[{i}]"))?;
        }
    }
    Ok(())
}
