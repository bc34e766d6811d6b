//! Ingress gateways as the objects describe them: Istio's `Gateway` (networking.istio.io,
//! servers selected onto gateway pods by labels) and the Gateway API's `Gateway` of class
//! `istio` (listeners of one named gateway). Both compile into [`IngressGateway`]s: ports,
//! protocols and the hostnames each admits. Which routes a request at a gateway takes is in
//! [`super::routes`] (VirtualServices that name the gateway in `gateways`, HTTPRoutes whose
//! `parentRef` is the Gateway).
//!
//! Served here: HTTP listeners (`HTTP`, `HTTP2`, `GRPC`) and HTTPS listeners that
//! terminate TLS with a certificate from a `kubernetes.io/tls` Secret (Istio's `tls.mode:
//! SIMPLE` with `credentialName`, the Gateway API's `certificateRefs`). Other TLS modes,
//! TLS passthrough and TCP listeners are accepted and reported as not served yet.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::config::RouteError;
use crate::labels::Labels;

/// The GatewayClass of ingress gateways this binary serves.
pub const INGRESS_CLASS: &str = "istio";

/// A gateway object by namespace and name.
pub type GatewayKey = (String, String);

/// One gateway object, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct IngressGateway {
    pub key: GatewayKey,
    /// Istio's `Gateway` (its `selector` picks the pods), else the Gateway API's (its pods
    /// are the named gateway's).
    pub selector: Option<BTreeMap<String, String>>,
    pub listeners: Vec<Listener>,
}

impl IngressGateway {
    /// Whether a gateway pod with `labels`, serving Gateway API gateway `own`, runs this one.
    pub fn runs_on(&self, labels: &Labels, own: &GatewayKey) -> bool {
        match &self.selector {
            Some(selector) => !selector.is_empty() && labels.matches(selector),
            None => &self.key == own,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// The server's `name`, or the listener's (HTTPRoute `sectionName`).
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    /// The hostnames it admits (`*` for any, `*.example.com` for a suffix); a namespace
    /// prefix (`ns/host`) of Istio's server hosts is dropped.
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 in clear text (Istio's `HTTP`, `HTTP2`, `GRPC`).
    Http,
    /// HTTP over TLS terminated here with the certificate of a Secret.
    Https(Credential),
    /// Not served yet (TLS passthrough, mutual TLS, TCP...).
    Other,
}

impl Protocol {
    /// Whether this gateway serves it.
    pub fn is_served(&self) -> bool {
        !matches!(self, Self::Other)
    }
}

/// The Secret a listener's certificate comes from: `namespace` when the object names one
/// (the Gateway API), else the gateway's own namespace (Istio's `credentialName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub namespace: Option<String>,
    pub name: String,
}

impl Listener {
    /// Whether this listener admits requests for `host` (a `Host` header, port dropped).
    pub fn admits(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| host_matches(h, host))
    }
}

/// Whether a hostname pattern (`*`, `*.example.com`, or a name) matches `host`, ignoring
/// case, a trailing dot and a port on `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let host = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => host == pattern,
    }
}

/// `host[:port]` → `host` (IPv6 literals in brackets kept whole).
pub fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => {
            if h.contains(':') && !h.ends_with(']') {
                host
            } else {
                h
            }
        }
        _ => host,
    }
}

// ---------------------------------------------------------------------------------------
// Istio Gateway (networking.istio.io v1 / v1beta1 / v1alpha3).

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioGatewaySpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    pub port: ServerPort,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub tls: Option<Value>,
    #[serde(default)]
    pub bind: Option<String>,
    #[serde(default)]
    pub default_endpoint: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerPort {
    pub number: u32,
    pub protocol: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// Istio's `Gateway`, checked and compiled.
pub fn parse_istio_gateway(object: &Value) -> Result<IngressGateway, RouteError> {
    let (namespace, name) = super::config::meta(object)?;
    let spec: IstioGatewaySpec = super::config::spec(object)?;
    let mut listeners = Vec::new();
    for (i, server) in spec.servers.iter().enumerate() {
        let at = |f: &str| format!("spec.servers[{i}].{f}");
        let port = u16::try_from(server.port.number)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                RouteError::new(
                    at("port.number"),
                    format!("{} is not a port", server.port.number),
                )
            })?;
        if server.hosts.is_empty() {
            return Err(RouteError::new(
                at("hosts"),
                "at least one host is required",
            ));
        }
        let protocol = match server.port.protocol.to_ascii_uppercase().as_str() {
            "HTTP" | "HTTP2" | "GRPC" => Protocol::Http,
            "HTTPS" => {
                let tls = server.tls.as_ref();
                let mode = tls.and_then(|t| t["mode"].as_str()).unwrap_or("SIMPLE");
                match tls.and_then(|t| t["credentialName"].as_str()) {
                    Some(name) if mode == "SIMPLE" && !name.is_empty() => {
                        Protocol::Https(Credential {
                            namespace: None,
                            name: name.to_owned(),
                        })
                    }
                    _ if mode == "SIMPLE" => {
                        return Err(RouteError::new(
                            at("tls.credentialName"),
                            "an HTTPS server needs the Secret of its certificate",
                        ));
                    }
                    _ => Protocol::Other,
                }
            }
            "TLS" | "TCP" | "MONGO" | "REDIS" | "MYSQL" => Protocol::Other,
            other => {
                return Err(RouteError::new(
                    at("port.protocol"),
                    format!("unknown protocol {other:?}"),
                ));
            }
        };
        listeners.push(Listener {
            name: server.name.clone(),
            port,
            protocol,
            hosts: server
                .hosts
                .iter()
                .map(|h| h.split_once('/').map_or(h.as_str(), |(_, h)| h).to_owned())
                .collect(),
        });
    }
    Ok(IngressGateway {
        key: (namespace, name),
        selector: Some(spec.selector),
        listeners,
    })
}

// ---------------------------------------------------------------------------------------
// Gateway API Gateway of class `istio`.

/// A Gateway API `Gateway` of class [`INGRESS_CLASS`], compiled; `None` for other classes.
pub fn parse_gateway_api(object: &Value) -> Result<Option<IngressGateway>, RouteError> {
    if object["spec"]["gatewayClassName"].as_str() != Some(INGRESS_CLASS) {
        return Ok(None);
    }
    let (namespace, name) = super::config::meta(object)?;
    let mut listeners = Vec::new();
    let empty = Vec::new();
    let items = object["spec"]["listeners"].as_array().unwrap_or(&empty);
    for (i, l) in items.iter().enumerate() {
        let at = |f: &str| format!("spec.listeners[{i}].{f}");
        let port = l["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| RouteError::new(at("port"), "a port from 1 to 65535 is required"))?;
        let protocol = match l["protocol"].as_str() {
            Some("HTTP") => Protocol::Http,
            Some("HTTPS") if l["tls"]["mode"].as_str().is_none_or(|m| m == "Terminate") => {
                let cert = &l["tls"]["certificateRefs"][0];
                let Some(name) = cert["name"].as_str() else {
                    return Err(RouteError::new(
                        at("tls.certificateRefs"),
                        "an HTTPS listener needs the Secret of its certificate",
                    ));
                };
                Protocol::Https(Credential {
                    namespace: Some(
                        cert["namespace"]
                            .as_str()
                            .map_or_else(|| namespace.clone(), str::to_owned),
                    ),
                    name: name.to_owned(),
                })
            }
            Some(_) => Protocol::Other,
            None => return Err(RouteError::new(at("protocol"), "required")),
        };
        listeners.push(Listener {
            name: l["name"].as_str().map(str::to_owned),
            port,
            protocol,
            hosts: l["hostname"]
                .as_str()
                .map(|h| vec![h.to_owned()])
                .unwrap_or_default(),
        });
    }
    Ok(Some(IngressGateway {
        key: (namespace, name),
        selector: None,
        listeners,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_as_istio_and_the_gateway_api_say() {
        assert!(host_matches("*", "bookinfo.example.com:8080"));
        assert!(host_matches("*.example.com", "Bookinfo.Example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(host_matches(
            "bookinfo.example.com",
            "bookinfo.example.com."
        ));
        assert!(!host_matches("bookinfo.example.com", "other.example.com"));
        assert_eq!(strip_port("[fd00::1]:80"), "[fd00::1]");
        assert_eq!(strip_port("fd00::1"), "fd00::1");
        assert_eq!(strip_port("a:80"), "a");
    }

    #[test]
    fn istio_gateways_compile_with_field_paths_in_errors() {
        let gw: Value = serde_json::json!({
            "metadata": {"name": "bookinfo-gateway", "namespace": "bookinfo"},
            "spec": {
                "selector": {"istio": "ingressgateway"},
                "servers": [
                    {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]},
                    {"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["ns/a.example.com"],
                     "tls": {"mode": "SIMPLE", "credentialName": "cert"}}
                ]
            }
        });
        let g = parse_istio_gateway(&gw).unwrap();
        assert_eq!(g.listeners[0].port, 80);
        assert_eq!(g.listeners[0].protocol, Protocol::Http);
        assert_eq!(g.listeners[1].hosts, ["a.example.com"]);
        assert_eq!(
            g.listeners[1].protocol,
            Protocol::Https(Credential {
                namespace: None,
                name: "cert".into()
            })
        );
        let labels = Labels::from([("istio", "ingressgateway"), ("app", "x")]);
        assert!(g.runs_on(&labels, &("x".into(), "y".into())));
        assert!(!g.runs_on(&Labels::new(), &g.key));
        let mut bad = gw.clone();
        bad["spec"]["servers"][0]["port"]["protocol"] = "SPDY".into();
        let e = parse_istio_gateway(&bad).unwrap_err().to_string();
        assert!(e.contains("spec.servers[0].port.protocol"), "{e}");
        let mut bad = gw.clone();
        bad["spec"]["servers"][1]["tls"] = serde_json::json!({"mode": "SIMPLE"});
        let e = parse_istio_gateway(&bad).unwrap_err().to_string();
        assert!(e.contains("spec.servers[1].tls.credentialName"), "{e}");
        let mut bad = gw;
        bad["spec"]["servers"][1]["hosts"] = serde_json::json!([]);
        let e = parse_istio_gateway(&bad).unwrap_err().to_string();
        assert!(e.contains("spec.servers[1].hosts"), "{e}");
    }

    #[test]
    fn gateway_api_gateways_of_class_istio_only() {
        let gw = serde_json::json!({
            "metadata": {"name": "bookinfo-gateway", "namespace": "bookinfo"},
            "spec": {"gatewayClassName": "istio", "listeners": [
                {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"}
            ]}
        });
        let g = parse_gateway_api(&gw).unwrap().unwrap();
        assert!(g.runs_on(&Labels::new(), &g.key));
        assert!(g.listeners[0].admits("bookinfo.example.com"));
        assert!(!g.listeners[0].admits("bookinfo.other"));
        let mut waypoint = gw;
        waypoint["spec"]["gatewayClassName"] = "istio-waypoint".into();
        assert!(parse_gateway_api(&waypoint).unwrap().is_none());
    }
}
