//! `crds/` and the chart's `crds/` are generated from the Rust types (`just crds`); this fails when
//! the committed files are stale, so the API server never gets a schema the code does not match.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let files = crosstrace::api::crd_files().expect("CRDs serialize");
    for dir in ["crds", "helm/crosstrace/crds"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for (name, generated) in &files {
            let committed =
                std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()));
            assert!(
                committed == *generated,
                "{}/{name} is stale: run `just crds` and commit the result",
                dir.display()
            );
        }
        let on_disk = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(on_disk, files.len(), "{} holds files no type generates", dir.display());
    }
}

#[test]
fn every_string_and_list_in_the_schemas_is_bounded() {
    fn walk(path: &str, schema: &serde_json::Value, unbounded: &mut Vec<String>) {
        // LabelSelector and ResourceRequirements are Kubernetes' own types, bounded by the API server.
        if path.ends_with("Selector")
            || path.ends_with("selector")
            || path.ends_with(".resources")
            || path.contains(".conditions[]")
        {
            return;
        }
        match schema.get("type").and_then(|t| t.as_str()) {
            Some("string")
                if schema.get("maxLength").is_none()
                    && schema.get("enum").is_none()
                    && schema.get("format").is_none() =>
            {
                unbounded.push(path.to_string())
            }
            Some("array") if schema.get("maxItems").is_none() => unbounded.push(path.to_string()),
            _ => {}
        }
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                walk(&format!("{path}.{k}"), v, unbounded);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, unbounded);
        }
    }
    let mut unbounded = Vec::new();
    for (name, yaml) in crosstrace::api::crd_files().unwrap() {
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        walk(&name, schema, &mut unbounded);
    }
    assert!(unbounded.is_empty(), "unbounded strings or lists: {unbounded:#?}");
}

/// The range an integer of this OpenAPI format can hold on the wire; `None` for a format this test
/// does not know (it then fails, so a new format is looked at rather than let through).
fn wire_range(format: Option<&str>) -> Option<(f64, f64)> {
    match format {
        Some("int32") => Some((i32::MIN.into(), i32::MAX.into())),
        Some("uint32") => Some((0.0, u32::MAX.into())),
        // The API server holds bounds as float64 and converts them back to int64, so the bound must be a
        // float64 below 2^63 (i64::MAX rounds up to 2^63 and overflows): at most 2^63 - 1024.
        Some("int64") => Some((i64::MIN as f64, 2f64.powi(63) - 1024.0)),
        _ => None,
    }
}

#[test]
fn every_integer_in_the_schemas_is_bounded_to_its_wire_width() {
    fn walk(path: &str, schema: &serde_json::Value, unbounded: &mut Vec<String>) {
        // Conditions and ResourceRequirements are Kubernetes' own types, bounded by the API server.
        if path.ends_with(".resources") || path.contains(".conditions[]") {
            return;
        }
        if schema.get("type").and_then(|t| t.as_str()) == Some("integer") {
            let bound = |key: &str| schema.get(key).and_then(serde_json::Value::as_f64);
            let format = schema.get("format").and_then(|f| f.as_str());
            match (wire_range(format), bound("minimum"), bound("maximum")) {
                (Some((low, high)), Some(min), Some(max)) if low <= min && min <= max && max <= high => {}
                (range, min, max) => unbounded
                    .push(format!("{path}: format {format:?} (range {range:?}), minimum {min:?}, maximum {max:?}")),
            }
        }
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                walk(&format!("{path}.{k}"), v, unbounded);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, unbounded);
        }
    }
    let mut unbounded = Vec::new();
    let mut integers = 0;
    for (name, yaml) in crosstrace::api::crd_files().unwrap() {
        integers += yaml.matches("type: integer").count();
        let crd: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        walk(&name, schema, &mut unbounded);
    }
    assert!(integers > 10, "the schemas have integers to check, found {integers}");
    assert!(unbounded.is_empty(), "integers not bounded within their wire width: {unbounded:#?}");
}
