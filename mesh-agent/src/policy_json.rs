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
