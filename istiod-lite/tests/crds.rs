//! The committed CRDs are exactly what `istiod-lite crds` generates from the
//! Rust types, and their schema admits what istiod-lite accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use serde_json::Value;

const REGENERATE: &str = "cargo run -p istiod-lite -- crds --out crds --out deploy/helm/ambit/crds";
/// Every committed copy: the repository's and the Helm chart's.
const COPIES: [&str; 2] = ["crds", "deploy/helm/ambit/crds"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn yaml_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    names.sort();
    names
}

#[test]
fn committed_crds_are_what_the_generator_writes() {
    let out = std::env::temp_dir().join(format!("ambit-crds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_istiod-lite"))
        .args(["crds", "--out"])
        .arg(&out)
        .status()
        .expect("running istiod-lite crds");
    assert!(status.success(), "istiod-lite crds failed: {status}");
    let generated = yaml_files(&out);
    assert!(!generated.is_empty(), "the generator wrote nothing");
    let mut stale = Vec::new();
    for copy in COPIES {
        let dir = workspace().join(copy);
        for name in &generated {
            let want = std::fs::read(out.join(name)).unwrap();
            match std::fs::read(dir.join(name)) {
                Ok(have) if have == want => {}
                Ok(_) => stale.push(format!("{copy}/{name} differs")),
                Err(e) => stale.push(format!("{copy}/{name}: {e}")),
            }
        }
        for name in yaml_files(&dir) {
            if !generated.contains(&name) {
                stale.push(format!(
                    "{copy}/{name} is not generated any more: delete it"
                ));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        stale.is_empty(),
        "the committed CRDs are stale:\n  {}\nregenerate them from the workspace root with:\n  {REGENERATE}",
        stale.join("\n  ")
    );
}

fn traffic_policy_schema() -> JSONSchemaProps {
    let path = workspace().join("crds/trafficpolicies.ambit.dev.yaml");
    let crd: CustomResourceDefinition =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(crd.spec.versions.len(), 1);
    let v = &crd.spec.versions[0];
    assert_eq!(
        (v.name.as_str(), v.served, v.storage),
        ("v1alpha1", true, true)
    );
    v.schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.clone())
        .expect("openAPIV3Schema")
}

/// A validator for the part of OpenAPI v3 the generator emits, as the API
/// server applies it with strict field validation (unknown fields refused).
/// A keyword it does not know fails the test instead of being ignored.
fn validate(schema: &JSONSchemaProps, v: &Value, at: &str) -> Result<(), String> {
    const KNOWN: [&str; 12] = [
        "type",
        "properties",
        "required",
        "enum",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "pattern",
        "nullable",
        "format",
        "description",
    ];
    let as_json = serde_json::to_value(schema).unwrap();
    for key in as_json.as_object().unwrap().keys() {
        assert!(
            KNOWN.contains(&key.as_str()),
            "{at}: the test's validator does not implement `{key}`: extend it"
        );
    }
    if v.is_null() {
        return if schema.nullable == Some(true) {
            Ok(())
        } else {
            Err(format!("{at}: null is not allowed"))
        };
    }
    if let Some(allowed) = &schema.enum_ {
        if !allowed.iter().any(|a| a.0 == *v) {
            return Err(format!("{at}: {v} is not one of the allowed values"));
        }
    }
    match schema.type_.as_deref() {
        Some("object") => {
            let obj = v
                .as_object()
                .ok_or_else(|| format!("{at}: {v} is not an object"))?;
            for r in schema.required.iter().flatten() {
                if !obj.contains_key(r) {
                    return Err(format!("{at}: required field {r} is missing"));
                }
            }
            if let Some(props) = &schema.properties {
                for (k, val) in obj {
                    let p = props
                        .get(k)
                        .ok_or_else(|| format!("{at}: unknown field {k:?}"))?;
                    validate(p, val, &format!("{at}.{k}"))?;
                }
            }
        }
        Some("string") => {
            let s = v
                .as_str()
                .ok_or_else(|| format!("{at}: {v} is not a string"))?;
            let len = s.chars().count() as i64;
            if schema.min_length.is_some_and(|m| len < m)
                || schema.max_length.is_some_and(|m| len > m)
            {
                return Err(format!("{at}: length {len} is out of range"));
            }
            if let Some(p) = &schema.pattern {
                if !regex::Regex::new(p).unwrap().is_match(s) {
                    return Err(format!("{at}: {s:?} does not match {p}"));
                }
            }
        }
        Some("integer") => {
            let n = v
                .as_i64()
                .map(|n| n as f64)
                .or_else(|| v.as_u64().map(|n| n as f64))
                .ok_or_else(|| format!("{at}: {v} is not an integer"))?;
            if schema.minimum.is_some_and(|m| n < m) || schema.maximum.is_some_and(|m| n > m) {
                return Err(format!("{at}: {n} is out of range"));
            }
        }
        other => panic!("{at}: the test's validator does not implement type {other:?}"),
    }
    Ok(())
}

fn check(schema: &JSONSchemaProps, doc: &str) -> Result<(), String> {
    let v: Value = serde_yaml::from_str(doc).map_err(|e| e.to_string())?;
    validate(schema, &v, "")
}

/// Both sides must agree: what the CRD admits, istiod-lite's type parses.
fn parses_in_istiod_lite(doc: &str) {
    let _: istiod_lite::ambit_types::TrafficPolicy =
        serde_yaml::from_str(doc).unwrap_or_else(|e| panic!("istiod-lite refuses {doc}: {e}"));
}

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: ambit.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p, namespace: demo}}\nspec: {spec}\n"
    )
}

/// The TrafficPolicy documents in the docs and examples (YAML code blocks
/// of Markdown files, and YAML files), so the schema is checked against what
/// users are told to write.
fn documented_policies() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut visit = vec![workspace().join("examples"), workspace().join("docs")];
    while let Some(dir) = visit.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            let chunks: Vec<String> = match ext {
                "yaml" | "yml" => vec![text],
                "md" => text
                    .split("```yaml\n")
                    .skip(1)
                    .filter_map(|b| b.split("```").next().map(str::to_string))
                    .collect(),
                _ => continue,
            };
            for chunk in chunks {
                for doc in chunk.split("\n---") {
                    if doc.contains("kind: TrafficPolicy") && doc.contains("ambit.dev/") {
                        out.push((path.display().to_string(), doc.to_string()));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn schema_admits_documented_and_tested_policies() {
    let schema = traffic_policy_schema();
    let documented = documented_policies();
    assert!(
        !documented.is_empty(),
        "no TrafficPolicy found in docs/ or examples/"
    );
    let mut docs: Vec<(String, String)> = documented;
    // The specs istiod-lite's own tests apply and expect to take effect.
    for spec in [
        "{targetRef: {kind: Service, name: reviews}, connectionPool: {maxRequests: 100, maxPendingRequests: 10}, outlierDetection: {consecutive5xx: 5, baseEjectionTime: 30s, maxEjectionPercent: 50}}",
        "{targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: split}, rateLimit: {maxTokens: 10, tokensPerFill: 5, fillInterval: 1s}}",
        "{targetRef: {kind: Service, name: reviews}, connectionPool: {maxRequests: 10}}",
        "{targetRef: {group: '', kind: Service, name: reviews}, outlierDetection: {consecutive5xx: 1, baseEjectionTime: 1m30s}, rateLimit: {maxTokens: 4294967295, tokensPerFill: 1, fillInterval: 250ms}}",
        "{targetRef: {kind: Service, name: reviews}, connectionPool: null}",
    ] {
        docs.push(("test fixture".into(), policy(spec)));
    }
    for (origin, doc) in &docs {
        if let Err(e) = check(&schema, doc) {
            panic!("the CRD refuses a TrafficPolicy from {origin}: {e}\n{doc}");
        }
        parses_in_istiod_lite(doc);
    }
}

#[test]
fn schema_refuses_what_istiod_lite_would_reject() {
    let schema = traffic_policy_schema();
    for (spec, why) in [
        ("{targetRef: {kind: Service, name: reviews}, retries: {attempts: 3}}", "unknown field"),
        ("{targetRef: {kind: Gateway, name: waypoint}}", "Gateway"),
        ("{targetRef: {kind: Service, name: ''}}", "length"),
        ("{targetRef: {kind: Service}}", "required field name"),
        ("{connectionPool: {maxRequests: 1}}", "required field targetRef"),
        ("{targetRef: {kind: Service, name: r}, outlierDetection: {consecutive5xx: 0, baseEjectionTime: 1s}}", "out of range"),
        ("{targetRef: {kind: Service, name: r}, outlierDetection: {consecutive5xx: 1, baseEjectionTime: 1s, maxEjectionPercent: 101}}", "out of range"),
        ("{targetRef: {kind: Service, name: r}, outlierDetection: {consecutive5xx: 1, baseEjectionTime: 30 s}}", "does not match"),
        ("{targetRef: {kind: Service, name: r}, rateLimit: {maxTokens: 1, tokensPerFill: 1, fillInterval: 1d}}", "does not match"),
        ("{targetRef: {kind: Service, name: r}, rateLimit: {maxTokens: 4294967296, tokensPerFill: 1, fillInterval: 1s}}", "out of range"),
        ("{targetRef: {kind: Service, name: r}, connectionPool: {maxRequests: -1}}", "out of range"),
        ("{targetRef: {kind: Service, name: r}, connectionPool: {maxRequests: many}}", "not an integer"),
    ] {
        let doc = policy(spec);
        match check(&schema, &doc) {
            Ok(()) => panic!("the CRD admits {spec} ({why})"),
            Err(e) => assert!(e.contains(why), "{spec}: refused for {e:?}, expected {why:?}"),
        }
    }
    let _ = check(&schema, &policy("{}")).expect_err("spec without targetRef");
}
