//! Checked reading of Istio policy objects kept as JSON (PeerAuthentication,
//! AuthorizationPolicy): accessors that reject wrong types and unknown fields with an error
//! naming the field's path, and how a policy is named in messages.

use serde_json::{Map, Value};

/// A field error inside one policy, before the policy's name is attached.
pub(crate) struct FieldError {
    pub(crate) field: String,
    pub(crate) reason: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// `namespace/name` for messages, with the position in the input when either is unreadable.
pub(crate) fn describe(object: &Value, index: usize) -> String {
    let meta = &object["metadata"];
    let part = |key: &str| meta[key].as_str().filter(|s| !s.is_empty());
    match (part("namespace"), part("name")) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (ns, name) => format!(
            "{}/{} (item {index})",
            ns.unwrap_or("<no namespace>"),
            name.unwrap_or("<no name>")
        ),
    }
}

pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `value` as an object, `None` when absent or `null`.
pub(crate) fn as_object<'a>(
    value: Option<&'a Value>,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, FieldError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(FieldError::new(
            field,
            format!("expected an object, got {}", kind_of(other)),
        )),
    }
}

/// Rejects keys of `map` outside `allowed` (a misspelt field must not silently change meaning).
pub(crate) fn known_fields(
    map: &Map<String, Value>,
    prefix: &str,
    allowed: &[&str],
) -> Result<(), FieldError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(FieldError::new(
            format!("{prefix}.{key}"),
            format!("unknown field (expected one of: {})", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

/// A required non-empty string.
pub(crate) fn string<'a>(value: Option<&'a Value>, field: &str) -> Result<&'a str, FieldError> {
    match value {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        None | Some(Value::Null) => Err(FieldError::new(field, "missing")),
        Some(Value::String(_)) => Err(FieldError::new(field, "empty")),
        Some(other) => Err(FieldError::new(
            field,
            format!("expected a string, got {}", kind_of(other)),
        )),
    }
}

/// `value` as a list, `None` when absent or `null`.
pub(crate) fn as_list<'a>(
    value: Option<&'a Value>,
    field: &str,
) -> Result<Option<&'a [Value]>, FieldError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(other) => Err(FieldError::new(
            field,
            format!("expected a list, got {}", kind_of(other)),
        )),
    }
}

/// The API versions both Istio security kinds are read from.
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// The checked envelope of a policy object: its top-level fields, its metadata, its name
/// and its namespace.
pub(crate) struct Envelope<'a> {
    pub(crate) top: &'a Map<String, Value>,
    pub(crate) meta: &'a Map<String, Value>,
    pub(crate) name: &'a str,
    pub(crate) namespace: &'a str,
}

/// Checks that `object` is a `kind` of one of [`API_VERSIONS`] with a name and a namespace.
pub(crate) fn envelope<'a>(object: &'a Value, kind: &str) -> Result<Envelope<'a>, FieldError> {
    let Value::Object(top) = object else {
        return Err(FieldError::new(
            "(object)",
            format!("expected an object, got {}", kind_of(object)),
        ));
    };
    let api_version = string(top.get("apiVersion"), "apiVersion")?;
    if !API_VERSIONS.contains(&api_version) {
        return Err(FieldError::new(
            "apiVersion",
            format!(
                "expected one of {}, got {api_version:?}",
                API_VERSIONS.join(", ")
            ),
        ));
    }
    let found = string(top.get("kind"), "kind")?;
    if found != kind {
        return Err(FieldError::new(
            "kind",
            format!("expected {kind}, got {found:?}"),
        ));
    }
    let meta = as_object(top.get("metadata"), "metadata")?
        .ok_or_else(|| FieldError::new("metadata", "missing"))?;
    let name = string(meta.get("name"), "metadata.name")?;
    let namespace = string(meta.get("namespace"), "metadata.namespace")?;
    Ok(Envelope {
        top,
        meta,
        name,
        namespace,
    })
}
