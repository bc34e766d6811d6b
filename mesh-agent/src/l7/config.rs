//! The routing objects as written: Gateway API `HTTPRoute` and `GRPCRoute` (translated
//! into an HTTPRoute, see [`parse_grpc_route`]) and Istio `VirtualService` /
//! `DestinationRule`, deserialized into typed structs (unknown fields refused, so a typo is
//! an error, not a silently ignored rule) with the field path of any error
//! (`spec.rules[0].matches[1].path.type: unknown variant ...`). [`validate`] is what the
//! file source calls for each object; [`super::routes::Routes::build`] compiles the same
//! structs into the tables the waypoint looks up.
//!
//! Fields that belong to later work (retries, timeouts, fault injection, mirroring, traffic
//! policies beyond load balancing) are accepted as written and reported as not applied, so
//! an Istio user's YAML loads and says what it does not do yet.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::config::Kind;

/// An invalid routing object: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RouteError {
    pub field: String,
    pub reason: String,
}

impl RouteError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Checks one routing object (`HTTPRoute`, `GRPCRoute`, `VirtualService` or `DestinationRule`).
pub fn validate(kind: Kind, object: &Value) -> Result<(), RouteError> {
    match kind {
        Kind::HttpRoute => HttpRoute::parse(object).map(drop),
        Kind::GrpcRoute => parse_grpc_route(object).map(drop),
        Kind::VirtualService => VirtualService::parse(object).map(drop),
        Kind::DestinationRule => DestinationRule::parse(object).map(drop),
        Kind::IstioGateway => super::gateways::parse_istio_gateway(object).map(drop),
        Kind::Gateway => super::gateways::parse_gateway_api(object).map(drop),
        _ => Ok(()),
    }
}

/// `metadata.namespace` and `metadata.name` (the sources fill the namespace in).
pub(super) fn meta(object: &Value) -> Result<(String, String), RouteError> {
    let text = |key: &str| {
        object["metadata"][key]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let name = text("name").ok_or_else(|| RouteError::new("metadata.name", "missing"))?;
    Ok((text("namespace").unwrap_or_else(|| "default".into()), name))
}

/// Deserializes `object.spec` into `T`, naming the failing field.
pub(super) fn spec<T: serde::de::DeserializeOwned>(object: &Value) -> Result<T, RouteError> {
    let spec = object
        .get("spec")
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            "spec".to_owned()
        } else {
            format!("spec.{path}")
        };
        RouteError::new(field, e.into_inner().to_string())
    })
}

// ---------------------------------------------------------------------------------------
// Gateway API HTTPRoute (standard channel, v1).

/// An HTTPRoute, or a GRPCRoute translated into one (as Istio does: a gRPC method match is a
/// path match, `kind` says which it was).
#[derive(Debug, Clone)]
pub struct HttpRoute {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub spec: HttpRouteSpec,
}

impl HttpRoute {
    pub fn parse(object: &Value) -> Result<Self, RouteError> {
        let (namespace, name) = meta(object)?;
        let spec: HttpRouteSpec = spec(object)?;
        check_rules(&spec)?;
        Ok(Self {
            kind: "HTTPRoute",
            namespace,
            name,
            spec,
        })
    }
}

/// The checks serde cannot make, on the rules of an HTTPRoute (or a GRPCRoute translated
/// into one: the field paths of headers, filters and backends are the same).
fn check_rules(spec: &HttpRouteSpec) -> Result<(), RouteError> {
    for (i, rule) in spec.rules.iter().enumerate() {
        let field = |rest: &str| format!("spec.rules[{i}].{rest}");
        super::resilience::from_http_route(
            rule.timeouts.as_ref(),
            rule.retry.as_ref(),
            &format!("spec.rules[{i}]"),
        )?;
        for (j, m) in rule.matches.iter().enumerate() {
            if let Some(PathMatch {
                kind: PathMatchType::RegularExpression,
                value: Some(re),
            }) = &m.path
            {
                check_regex(re, &field(&format!("matches[{j}].path.value")))?;
            }
            if let Some(PathMatch {
                value: Some(v),
                kind,
            }) = &m.path
                && *kind != PathMatchType::RegularExpression
                && !v.starts_with('/')
            {
                return Err(RouteError::new(
                    field(&format!("matches[{j}].path.value")),
                    format!("{v:?} must start with '/'"),
                ));
            }
            for (k, h) in m.headers.iter().enumerate() {
                check_header_name(&h.name, &field(&format!("matches[{j}].headers[{k}].name")))?;
                if h.kind == ValueMatchType::RegularExpression {
                    check_regex(
                        &h.value,
                        &field(&format!("matches[{j}].headers[{k}].value")),
                    )?;
                }
            }
            for (k, q) in m.query_params.iter().enumerate() {
                if q.kind == ValueMatchType::RegularExpression {
                    check_regex(
                        &q.value,
                        &field(&format!("matches[{j}].queryParams[{k}].value")),
                    )?;
                }
            }
        }
        for (j, f) in rule.filters.iter().enumerate() {
            f.check(&field(&format!("filters[{j}]")))?;
        }
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let kind = b.kind.as_deref().unwrap_or("Service");
            let group = b.group.as_deref().unwrap_or("");
            if kind != "Service" || !group.is_empty() {
                return Err(RouteError::new(
                    field(&format!("backendRefs[{j}].kind")),
                    format!("{group}/{kind}: only core Services are supported as backends"),
                ));
            }
            if b.port.is_none() {
                return Err(RouteError::new(
                    field(&format!("backendRefs[{j}].port")),
                    "required for a Service backend",
                ));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default)]
    pub section_name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Applied by the resilience work; reported as not applied until then.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
    #[serde(default)]
    pub session_persistence: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    #[serde(default)]
    pub method: Option<HttpMethod>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Connect => "CONNECT",
            Self::Options => "OPTIONS",
            Self::Trace => "TRACE",
            Self::Patch => "PATCH",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    #[serde(rename = "type")]
    pub kind: FilterType,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default)]
    pub request_mirror: Option<HttpRequestMirror>,
    #[serde(default)]
    pub extension_ref: Option<Value>,
    #[serde(default)]
    pub cors: Option<Value>,
}

impl HttpRouteFilter {
    fn check(&self, field: &str) -> Result<(), RouteError> {
        let missing = |what: &str| {
            RouteError::new(
                format!("{field}.{what}"),
                format!("required when type is {:?}", self.kind),
            )
        };
        match self.kind {
            FilterType::RequestHeaderModifier => {
                let m = self
                    .request_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("requestHeaderModifier"))?;
                m.check(&format!("{field}.requestHeaderModifier"))
            }
            FilterType::ResponseHeaderModifier => {
                let m = self
                    .response_header_modifier
                    .as_ref()
                    .ok_or_else(|| missing("responseHeaderModifier"))?;
                m.check(&format!("{field}.responseHeaderModifier"))
            }
            FilterType::RequestRedirect => {
                let r = self
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| missing("requestRedirect"))?;
                if let Some(code) = r.status_code
                    && ![301, 302, 303, 307, 308].contains(&code)
                {
                    return Err(RouteError::new(
                        format!("{field}.requestRedirect.statusCode"),
                        format!("{code}: expected 301, 302, 303, 307 or 308"),
                    ));
                }
                if let Some(p) = &r.path {
                    p.check(&format!("{field}.requestRedirect.path"))?;
                }
                Ok(())
            }
            FilterType::UrlRewrite => {
                let r = self
                    .url_rewrite
                    .as_ref()
                    .ok_or_else(|| missing("urlRewrite"))?;
                if let Some(p) = &r.path {
                    p.check(&format!("{field}.urlRewrite.path"))?;
                }
                Ok(())
            }
            FilterType::RequestMirror => self
                .request_mirror
                .as_ref()
                .map(drop)
                .ok_or_else(|| missing("requestMirror")),
            FilterType::ExtensionRef | FilterType::Cors => Err(RouteError::new(
                format!("{field}.type"),
                format!("{:?} filters are not supported", self.kind),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
    ExtensionRef,
    #[serde(rename = "CORS")]
    Cors,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<NameValue>,
    #[serde(default)]
    pub add: Vec<NameValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

impl HeaderModifier {
    fn check(&self, field: &str) -> Result<(), RouteError> {
        for (list, key) in [(&self.set, "set"), (&self.add, "add")] {
            for (i, nv) in list.iter().enumerate() {
                check_header_name(&nv.name, &format!("{field}.{key}[{i}].name"))?;
                check_header_value(&nv.value, &format!("{field}.{key}[{i}].value"))?;
            }
        }
        for (i, name) in self.remove.iter().enumerate() {
            check_header_name(name, &format!("{field}.remove[{i}]"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

impl PathModifier {
    fn check(&self, field: &str) -> Result<(), RouteError> {
        let (value, key) = match self.kind {
            PathModifierType::ReplaceFullPath => (&self.replace_full_path, "replaceFullPath"),
            PathModifierType::ReplacePrefixMatch => {
                (&self.replace_prefix_match, "replacePrefixMatch")
            }
        };
        if value.is_none() {
            return Err(RouteError::new(
                format!("{field}.{key}"),
                format!("required when type is {:?}", self.kind),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
}

fn one() -> u32 {
    1
}

// ---------------------------------------------------------------------------------------
// Gateway API GRPCRoute (standard channel, v1), translated into an HTTPRoute.

/// Parses a GRPCRoute into the [`HttpRoute`] it means: a method match is a path match on
/// `/service/method` (both named: exact; the service only: the prefix `/service/`; the
/// method only, or a regular expression: a regular expression), which also gives it the
/// HTTPRoute precedence Istio gives it.
pub fn parse_grpc_route(object: &Value) -> Result<HttpRoute, RouteError> {
    let (namespace, name) = meta(object)?;
    let grpc: GrpcRouteSpec = spec(object)?;
    let mut rules = Vec::with_capacity(grpc.rules.len());
    for (i, rule) in grpc.rules.into_iter().enumerate() {
        let mut matches = Vec::with_capacity(rule.matches.len());
        for (j, m) in rule.matches.into_iter().enumerate() {
            let field = format!("spec.rules[{i}].matches[{j}].method");
            let path = m.method.map(|method| method.path(&field)).transpose()?;
            matches.push(HttpRouteMatch {
                path,
                headers: m.headers,
                ..HttpRouteMatch::default()
            });
        }
        for (j, f) in rule.filters.iter().enumerate() {
            if matches!(f.kind, FilterType::RequestRedirect | FilterType::UrlRewrite) {
                return Err(RouteError::new(
                    format!("spec.rules[{i}].filters[{j}].type"),
                    format!("{:?} is not a GRPCRoute filter", f.kind),
                ));
            }
        }
        rules.push(HttpRouteRule {
            name: rule.name,
            matches,
            filters: rule.filters,
            backend_refs: rule.backend_refs,
            session_persistence: rule.session_persistence,
            ..HttpRouteRule::default()
        });
    }
    let spec = HttpRouteSpec {
        parent_refs: grpc.parent_refs,
        hostnames: grpc.hostnames,
        rules,
    };
    check_rules(&spec)?;
    Ok(HttpRoute {
        kind: "GRPCRoute",
        namespace,
        name,
        spec,
    })
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub session_persistence: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

impl GrpcMethodMatch {
    /// The path match this method match is.
    fn path(&self, field: &str) -> Result<PathMatch, RouteError> {
        let service = self.service.as_deref().filter(|s| !s.is_empty());
        let method = self.method.as_deref().filter(|s| !s.is_empty());
        let (kind, value) = match (self.kind, service, method) {
            (_, None, None) => {
                return Err(RouteError::new(
                    field,
                    "one of service and method must be set",
                ));
            }
            (ValueMatchType::Exact, Some(s), Some(m)) => {
                (PathMatchType::Exact, format!("/{s}/{m}"))
            }
            (ValueMatchType::Exact, Some(s), None) => (PathMatchType::PathPrefix, format!("/{s}/")),
            (ValueMatchType::Exact, None, Some(m)) => (
                PathMatchType::RegularExpression,
                format!("/[^/]+/{}", regex::escape(m)),
            ),
            (ValueMatchType::RegularExpression, s, m) => {
                for (value, key) in [(s, "service"), (m, "method")] {
                    if let Some(re) = value {
                        check_regex(re, &format!("{field}.{key}"))?;
                    }
                }
                (
                    PathMatchType::RegularExpression,
                    format!("/({})/({})", s.unwrap_or("[^/]+"), m.unwrap_or("[^/]+")),
                )
            }
        };
        if self.kind == ValueMatchType::Exact {
            for (value, key) in [(service, "service"), (method, "method")] {
                if value.is_some_and(|v| v.contains('/')) {
                    return Err(RouteError::new(
                        format!("{field}.{key}"),
                        "must not contain '/'",
                    ));
                }
            }
        }
        Ok(PathMatch {
            kind,
            value: Some(value),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Istio VirtualService (networking.istio.io v1 / v1beta1 / v1alpha3).

#[derive(Debug, Clone)]
pub struct VirtualService {
    pub namespace: String,
    pub name: String,
    pub spec: VirtualServiceSpec,
}

impl VirtualService {
    pub fn parse(object: &Value) -> Result<Self, RouteError> {
        let (namespace, name) = meta(object)?;
        let spec: VirtualServiceSpec = spec(object)?;
        if spec.hosts.is_empty() {
            return Err(RouteError::new(
                "spec.hosts",
                "at least one host is required",
            ));
        }
        for (i, route) in spec.http.iter().enumerate() {
            let field = |rest: &str| format!("spec.http[{i}].{rest}");
            super::resilience::from_virtual_service(
                route.timeout.as_deref(),
                route.retries.as_ref(),
                route.fault.as_ref(),
                &format!("spec.http[{i}]"),
            )?;
            for (j, m) in route.matches.iter().enumerate() {
                for (key, sm) in [
                    ("uri", &m.uri),
                    ("scheme", &m.scheme),
                    ("method", &m.method),
                    ("authority", &m.authority),
                ] {
                    if let Some(sm) = sm {
                        sm.check(&field(&format!("match[{j}].{key}")))?;
                    }
                }
                for (key, map) in [
                    ("headers", &m.headers),
                    ("withoutHeaders", &m.without_headers),
                    ("queryParams", &m.query_params),
                ] {
                    for (name, sm) in map {
                        let f = field(&format!("match[{j}].{key}.{name}"));
                        if key != "queryParams" {
                            check_header_name(name, &f)?;
                        }
                        sm.check(&f)?;
                    }
                }
            }
            let actions = [
                !route.route.is_empty(),
                route.redirect.is_some(),
                route.direct_response.is_some(),
            ];
            match actions.iter().filter(|a| **a).count() {
                1 => {}
                0 => {
                    return Err(RouteError::new(
                        field("route"),
                        "one of route, redirect or directResponse is required",
                    ));
                }
                _ => {
                    return Err(RouteError::new(
                        field("route"),
                        "route, redirect and directResponse are mutually exclusive",
                    ));
                }
            }
            for (j, d) in route.route.iter().enumerate() {
                if d.destination.host.is_empty() {
                    return Err(RouteError::new(
                        field(&format!("route[{j}].destination.host")),
                        "required",
                    ));
                }
                if let Some(h) = &d.headers {
                    h.check(&field(&format!("route[{j}].headers")))?;
                }
            }
            if let Some(h) = &route.headers {
                h.check(&field("headers"))?;
            }
            if let Some(r) = &route.redirect
                && let Some(code) = r.redirect_code
                && !(300..400).contains(&code)
            {
                return Err(RouteError::new(
                    field("redirect.redirectCode"),
                    format!("{code} is not a redirect status"),
                ));
            }
            if let Some(d) = &route.direct_response
                && !(200..600).contains(&d.status)
            {
                return Err(RouteError::new(
                    field("directResponse.status"),
                    format!("{} is not an HTTP status", d.status),
                ));
            }
        }
        Ok(Self {
            namespace,
            name,
            spec,
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<VsHttpRoute>,
    /// Not applied by the waypoint (TCP and TLS routes).
    #[serde(default)]
    pub tcp: Option<Value>,
    #[serde(default)]
    pub tls: Option<Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsHttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<VsMatch>,
    #[serde(default)]
    pub route: Vec<VsDestinationWeight>,
    #[serde(default)]
    pub redirect: Option<VsRedirect>,
    #[serde(default)]
    pub direct_response: Option<VsDirectResponse>,
    #[serde(default)]
    pub rewrite: Option<VsRewrite>,
    #[serde(default)]
    pub headers: Option<VsHeaders>,
    // The resilience work applies these; until then they are reported as not applied.
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<VsRetries>,
    #[serde(default)]
    pub fault: Option<VsFault>,
    #[serde(default)]
    pub mirror: Option<VsDestination>,
    #[serde(default)]
    pub mirrors: Vec<VsMirror>,
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    #[serde(default)]
    pub mirror_percent: Option<u32>,
    #[serde(default)]
    pub cors_policy: Option<Value>,
    #[serde(default)]
    pub delegate: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsMatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub authority: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub ignore_uri_case: bool,
}

/// Istio's `StringMatch`: exactly one of `exact`, `prefix`, `regex` (none: present).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

impl StringMatch {
    fn check(&self, field: &str) -> Result<(), RouteError> {
        let set = [&self.exact, &self.prefix, &self.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set > 1 {
            return Err(RouteError::new(
                field,
                "exact, prefix and regex are mutually exclusive",
            ));
        }
        if let Some(re) = &self.regex {
            check_regex(re, &format!("{field}.regex"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsDestinationWeight {
    pub destination: VsDestination,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub headers: Option<VsHeaders>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsDestination {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<VsPort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsPort {
    pub number: u16,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsRedirect {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub derive_port: Option<String>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub redirect_code: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsDirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: Option<VsBody>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsBody {
    #[serde(default)]
    pub string: Option<String>,
    #[serde(default)]
    pub bytes: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsRewrite {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub uri_regex_rewrite: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsHeaders {
    #[serde(default)]
    pub request: Option<VsHeaderOperations>,
    #[serde(default)]
    pub response: Option<VsHeaderOperations>,
}

impl VsHeaders {
    fn check(&self, field: &str) -> Result<(), RouteError> {
        for (key, ops) in [("request", &self.request), ("response", &self.response)] {
            let Some(ops) = ops else { continue };
            for (op, map) in [("set", &ops.set), ("add", &ops.add)] {
                for (name, value) in map {
                    let f = format!("{field}.{key}.{op}.{name}");
                    check_header_name(name, &f)?;
                    check_header_value(value, &f)?;
                }
            }
            for (i, name) in ops.remove.iter().enumerate() {
                check_header_name(name, &format!("{field}.{key}.remove[{i}]"))?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsHeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Istio DestinationRule.

#[derive(Debug, Clone)]
pub struct DestinationRule {
    pub namespace: String,
    pub name: String,
    pub spec: DestinationRuleSpec,
}

impl DestinationRule {
    pub fn parse(object: &Value) -> Result<Self, RouteError> {
        let (namespace, name) = meta(object)?;
        let spec: DestinationRuleSpec = spec(object)?;
        if spec.host.is_empty() {
            return Err(RouteError::new("spec.host", "required"));
        }
        let check = |policy: Option<&TrafficPolicy>, field: &str| -> Result<(), RouteError> {
            let Some(p) = policy else { return Ok(()) };
            if let Some(pool) = &p.connection_pool {
                super::resilience::pool_limits(pool, &format!("{field}.connectionPool"))?;
            }
            if let Some(o) = &p.outlier_detection {
                super::resilience::outlier_policy(o, &format!("{field}.outlierDetection"))?;
            }
            if let Some(b) = &p.retry_budget {
                let mut limits = super::resilience::PoolLimits::default();
                super::resilience::retry_budget(b, &mut limits, &format!("{field}.retryBudget"))?;
            }
            Ok(())
        };
        check(spec.traffic_policy.as_ref(), "spec.trafficPolicy")?;
        for (i, s) in spec.subsets.iter().enumerate() {
            check(
                s.traffic_policy.as_ref(),
                &format!("spec.subsets[{i}].trafficPolicy"),
            )?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in spec.subsets.iter().enumerate() {
            if !seen.insert(&s.name) {
                return Err(RouteError::new(
                    format!("spec.subsets[{i}].name"),
                    format!("duplicate subset {:?}", s.name),
                ));
            }
        }
        Ok(Self {
            namespace,
            name,
            spec,
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub workload_selector: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSettings>,
    // Not applied by the waypoint; reported.
    #[serde(default)]
    pub tls: Option<Value>,
    #[serde(default)]
    pub port_level_settings: Option<Value>,
    #[serde(default)]
    pub tunnel: Option<Value>,
    #[serde(default)]
    pub proxy_protocol: Option<Value>,
    #[serde(default)]
    pub retry_budget: Option<RetryBudgetSettings>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    #[serde(default)]
    pub simple: Option<SimpleLb>,
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    #[serde(default)]
    pub locality_lb_setting: Option<Value>,
    #[serde(default)]
    pub warmup_duration_secs: Option<Value>,
    #[serde(default)]
    pub warmup: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    Unspecified,
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    #[serde(default)]
    pub http_header_name: Option<String>,
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    #[serde(default)]
    pub ring_hash: Option<Value>,
    #[serde(default)]
    pub maglev: Option<Value>,
    #[serde(default)]
    pub minimum_ring_size: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookie {
    pub name: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub ttl: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Resilience: timeouts, retries, fault injection (compiled by `super::resilience`).

/// DestinationRule `trafficPolicy.connectionPool` (circuit breaking).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    #[serde(default)]
    pub tcp: Option<TcpPoolSettings>,
    #[serde(default)]
    pub http: Option<HttpPoolSettings>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpPoolSettings {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub tcp_keepalive: Option<Value>,
    #[serde(default)]
    pub max_connection_duration: Option<String>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPoolSettings {
    #[serde(default)]
    pub http1_max_pending_requests: Option<u32>,
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    #[serde(default)]
    pub max_concurrent_streams: Option<u32>,
}

/// DestinationRule `trafficPolicy.retryBudget`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetSettings {
    #[serde(default)]
    pub percent: Option<Percent>,
    #[serde(default)]
    pub min_retry_concurrency: Option<u32>,
}

/// DestinationRule `trafficPolicy.outlierDetection`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSettings {
    #[serde(default)]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// Deprecated name of `consecutive5xxErrors`.
    #[serde(default)]
    pub consecutive_errors: Option<u32>,
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<u32>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    #[serde(default)]
    pub min_health_percent: Option<u32>,
}

/// VirtualService `mirrors[]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsMirror {
    pub destination: VsDestination,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// HTTPRoute `RequestMirror` filter.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRequestMirror {
    pub backend_ref: BackendRef,
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

/// HTTPRoute `timeouts` (Gateway API durations: `10s`, `500ms`, `1m30s`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// HTTPRoute `retry` (Gateway API, GEP-1731).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRetry {
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub backoff: Option<String>,
}

/// VirtualService `retries` (Istio's HTTPRetry).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsRetries {
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retry_on: Option<String>,
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
    #[serde(default)]
    pub retry_ignore_previous_hosts: Option<bool>,
    #[serde(default)]
    pub backoff: Option<String>,
}

/// VirtualService `fault` (Istio's HTTPFaultInjection).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsFault {
    #[serde(default)]
    pub delay: Option<VsDelay>,
    #[serde(default)]
    pub abort: Option<VsAbort>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsDelay {
    #[serde(default)]
    pub fixed_delay: Option<String>,
    #[serde(default)]
    pub exponential_delay: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage.
    #[serde(default)]
    pub percent: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsAbort {
    #[serde(default)]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub grpc_status: Option<String>,
    #[serde(default)]
    pub http2_error: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

// ---------------------------------------------------------------------------------------

fn check_regex(re: &str, field: &str) -> Result<(), RouteError> {
    regex::Regex::new(re)
        .map(drop)
        .map_err(|e| RouteError::new(field, format!("invalid regular expression: {e}")))
}

fn check_header_name(name: &str, field: &str) -> Result<(), RouteError> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(drop)
        .map_err(|_| RouteError::new(field, format!("{name:?} is not a valid header name")))
}

fn check_header_value(value: &str, field: &str) -> Result<(), RouteError> {
    http::HeaderValue::from_str(value)
        .map(drop)
        .map_err(|_| RouteError::new(field, format!("{value:?} is not a valid header value")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(spec: Value) -> Value {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "r", "namespace": "shop"}, "spec": spec})
    }

    #[test]
    fn grpc_routes_are_checked_and_translated_to_path_matches() {
        let grpc = |rules: Value| {
            json!({"kind": "GRPCRoute", "metadata": {"name": "g", "namespace": "shop"},
                   "spec": {"parentRefs": [{"kind": "Service", "group": "", "name": "echo"}],
                            "rules": rules}})
        };
        let route = parse_grpc_route(&grpc(json!([
            {"matches": [{"method": {"service": "a.B", "method": "C"}},
                         {"method": {"service": "a.B"}},
                         {"method": {"method": "C.d"}}],
             "backendRefs": [{"name": "echo", "port": 80}]}
        ])))
        .unwrap();
        let paths: Vec<_> = route.spec.rules[0]
            .matches
            .iter()
            .map(|m| {
                let p = m.path.as_ref().unwrap();
                (p.kind, p.value.clone().unwrap())
            })
            .collect();
        assert_eq!(
            paths,
            [
                (PathMatchType::Exact, "/a.B/C".to_owned()),
                (PathMatchType::PathPrefix, "/a.B/".to_owned()),
                (PathMatchType::RegularExpression, "/[^/]+/C\\.d".to_owned()),
            ]
        );
        for (rules, field) in [
            (
                json!([{"matches": [{"method": {"type": "Exact"}}]}]),
                "spec.rules[0].matches[0].method",
            ),
            (
                json!([{"matches": [{"method": {"service": "a/b"}}]}]),
                "spec.rules[0].matches[0].method.service",
            ),
            (
                json!([{"matches": [{"method": {"type": "RegularExpression", "method": "("}}]}]),
                "spec.rules[0].matches[0].method.method",
            ),
            (
                json!([{"filters": [{"type": "URLRewrite", "urlRewrite": {}}]}]),
                "spec.rules[0].filters[0].type",
            ),
            (
                json!([{"matches": [{"path": {"value": "/x"}}]}]),
                "spec.rules[0].matches[0]",
            ),
            (
                json!([{"backendRefs": [{"name": "echo"}]}]),
                "spec.rules[0].backendRefs[0].port",
            ),
        ] {
            let err = parse_grpc_route(&grpc(rules.clone())).unwrap_err();
            assert!(err.field.starts_with(field), "{rules}: {err}");
        }
    }

    #[test]
    fn an_http_route_error_names_the_field() {
        let cases = [
            (
                json!({"rules": [{"matches": [{"path": {"type": "Prefix", "value": "/"}}]}]}),
                "spec.rules[0].matches[0].path.type",
            ),
            (
                json!({"rules": [{"matches": [{"path": {"value": "x"}}]}]}),
                "spec.rules[0].matches[0].path.value",
            ),
            (
                json!({"rules": [{"backendRefs": [{"name": "web"}]}]}),
                "spec.rules[0].backendRefs[0].port",
            ),
            (
                json!({"rules": [{"filters": [{"type": "RequestRedirect"}]}]}),
                "spec.rules[0].filters[0].requestRedirect",
            ),
            (json!({"rules": [{"matchs": []}]}), "spec.rules[0]"),
            (
                json!({"rules": [{"matches": [{"headers": [{"type": "RegularExpression", "name": "x", "value": "("}]}]}]}),
                "spec.rules[0].matches[0].headers[0].value",
            ),
        ];
        for (spec, field) in cases {
            let e = HttpRoute::parse(&route(spec.clone())).unwrap_err();
            assert!(e.field.starts_with(field), "{spec}: {e}");
        }
    }

    #[test]
    fn a_virtual_service_error_names_the_field() {
        let vs =
            |spec: Value| json!({"metadata": {"name": "v", "namespace": "shop"}, "spec": spec});
        let cases = [
            (json!({"http": []}), "spec.hosts"),
            (
                json!({"hosts": ["r"], "http": [{"match": [{"uri": {"exact": "/", "prefix": "/"}}], "route": [{"destination": {"host": "r"}}]}]}),
                "spec.http[0].match[0].uri",
            ),
            (
                json!({"hosts": ["r"], "http": [{"match": [{"url": {}}]}]}),
                "spec.http[0].match[0]",
            ),
            (json!({"hosts": ["r"], "http": [{}]}), "spec.http[0].route"),
            (
                json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r", "port": {"number": 99999}}}]}]}),
                "spec.http[0].route[0].destination.port.number",
            ),
        ];
        for (spec, field) in cases {
            let e = VirtualService::parse(&vs(spec.clone())).unwrap_err();
            assert!(e.field.starts_with(field), "{spec}: {e}");
        }
    }

    #[test]
    fn istio_samples_parse() {
        let vs = json!({"metadata": {"name": "reviews", "namespace": "bookinfo"}, "spec": {
        "hosts": ["reviews"],
        "http": [
            {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
             "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
            {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 75},
                       {"destination": {"host": "reviews", "subset": "v3"}, "weight": 25}],
             "timeout": "0.5s"}
        ]}});
        let parsed = VirtualService::parse(&vs).unwrap();
        assert_eq!(parsed.spec.http.len(), 2);
        let dr = json!({"metadata": {"name": "reviews", "namespace": "bookinfo"}, "spec": {
            "host": "reviews",
            "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}},
            "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                        {"name": "v2", "labels": {"version": "v2"}}]}});
        let parsed = DestinationRule::parse(&dr).unwrap();
        assert_eq!(parsed.spec.subsets.len(), 2);
    }
}
