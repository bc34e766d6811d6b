//! Istio's `ServiceEntry` (networking.istio.io) as services of the mesh: one [`Service`] per
//! host, carried like a Kubernetes Service (the same L4 policy, metrics under the host's
//! name, waypoint binding), answered by the pods' resolver, and routed as its resolution
//! says:
//! - `STATIC`: to its `endpoints` (IP addresses, with per-port numbers), or to the pods its
//!   `workloadSelector` selects;
//! - `DNS`: likewise when its endpoints are IP addresses; endpoints named by host name are
//!   not resolved by the agent (ADR 015), so a host without an IP endpoint goes to the
//!   destination the client dialed;
//! - `NONE`: to the destination the client dialed.
//!
//! Its addresses are `spec.addresses` (IPs; CIDR ranges are not service addresses), else
//! those Istio's allocator wrote in `status.addresses`, else one the agent allocates from
//! its range (Istio's `240.240.0.0/16`) for a host that is not a wildcard and whose
//! resolution is not `NONE`: the same objects give every agent the same addresses.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use serde_json::Value;

use super::FieldError;
use crate::{
    labels::Labels,
    state::{Service, ServicePort, StaticEndpoint, TargetPort, WaypointRef},
};

/// Where auto-allocated ServiceEntry addresses come from: Istio's range, fixed there too, so
/// that every proxy of the mesh (agents, waypoints, gateways, and Istio's own) agrees.
pub const DEFAULT_RANGE: AddressRange = AddressRange {
    base: Ipv4Addr::new(240, 240, 0, 0),
    prefix: 16,
};

/// An IPv4 range (`240.240.0.0/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl AddressRange {
    fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    None,
    Static,
    Dns,
}

/// One ServiceEntry, read.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    namespace: String,
    name: String,
    hosts: Vec<String>,
    addresses: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    resolution: Resolution,
    endpoints: Vec<StaticEndpoint>,
    selector: Labels,
    /// `metadata.labels` (`istio.io/use-waypoint` binds it to a waypoint).
    labels: Labels,
}

impl ServiceEntry {
    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    pub(crate) fn labels(&self) -> &Labels {
        &self.labels
    }
}

/// Reads a ServiceEntry; the error names the field.
pub(crate) fn parse(object: &Value) -> Result<ServiceEntry, FieldError> {
    let meta = |key: &str| {
        object["metadata"][key]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let spec = &object["spec"];
    let hosts: Vec<String> = match &spec["hosts"] {
        Value::Array(hosts) if !hosts.is_empty() => hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                h.as_str()
                    .filter(|h| !h.is_empty())
                    .map(str::to_ascii_lowercase)
                    .ok_or_else(|| {
                        FieldError::new(format!("spec.hosts[{i}]"), "must be a host name")
                    })
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(FieldError::new(
                "spec.hosts",
                "at least one host is required",
            ));
        }
    };
    let mut addresses = Vec::new();
    for (i, a) in array(&spec["addresses"], "spec.addresses")?
        .iter()
        .enumerate()
    {
        let text = a
            .as_str()
            .ok_or_else(|| FieldError::new(format!("spec.addresses[{i}]"), "must be a string"))?;
        match text.parse::<IpAddr>() {
            Ok(ip) => addresses.push(ip.to_canonical()),
            // A CIDR range matches traffic by destination; it is not an address to answer.
            Err(_) if text.contains('/') => {}
            Err(e) => {
                return Err(FieldError::new(
                    format!("spec.addresses[{i}]"),
                    format!("{text:?}: {e}"),
                ));
            }
        }
    }
    if addresses.is_empty() {
        // Istio's allocator writes them here.
        for a in array(&object["status"]["addresses"], "status.addresses")? {
            if let Some(ip) = a["value"].as_str().and_then(|v| v.parse::<IpAddr>().ok()) {
                addresses.push(ip.to_canonical());
            }
        }
    }
    let mut ports = Vec::new();
    for (i, p) in array(&spec["ports"], "spec.ports")?.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let number = port_number(&p["number"])
            .ok_or_else(|| FieldError::new(field("number"), "must be a port number (1-65535)"))?;
        let target = match &p["targetPort"] {
            Value::Null => number,
            v => port_number(v).ok_or_else(|| {
                FieldError::new(field("targetPort"), "must be a port number (1-65535)")
            })?,
        };
        let protocol = p["protocol"].as_str().unwrap_or("TCP").to_ascii_uppercase();
        let app_protocol = match protocol.as_str() {
            "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" => Some(protocol.to_ascii_lowercase()),
            "HTTPS" | "TLS" => Some("tls".to_owned()),
            _ => None,
        };
        ports.push(ServicePort {
            name: p["name"]
                .as_str()
                .map(str::to_owned)
                .filter(|n| !n.is_empty()),
            port: number,
            target_port: TargetPort::Number(target),
            protocol: if protocol == "UDP" { "UDP" } else { "TCP" }.to_owned(),
            app_protocol,
        });
    }
    let resolution = match spec["resolution"].as_str().unwrap_or("NONE") {
        "NONE" => Resolution::None,
        "STATIC" => Resolution::Static,
        "DNS" | "DNS_ROUND_ROBIN" => Resolution::Dns,
        other => {
            return Err(FieldError::new(
                "spec.resolution",
                format!("{other:?}: expected NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
            ));
        }
    };
    let mut endpoints = Vec::new();
    for (i, e) in array(&spec["endpoints"], "spec.endpoints")?
        .iter()
        .enumerate()
    {
        let address = e["address"].as_str().unwrap_or_default();
        let addr = match address.parse::<IpAddr>() {
            Ok(ip) => ip.to_canonical(),
            // A host name (resolution DNS) is not resolved by the agent.
            Err(_) if resolution == Resolution::Dns && !address.is_empty() => continue,
            Err(_) => {
                return Err(FieldError::new(
                    format!("spec.endpoints[{i}].address"),
                    format!("{address:?}: must be an IP address"),
                ));
            }
        };
        let mut ports = BTreeMap::new();
        if let Value::Object(map) = &e["ports"] {
            for (name, v) in map {
                let n = port_number(v).ok_or_else(|| {
                    FieldError::new(
                        format!("spec.endpoints[{i}].ports.{name}"),
                        "must be a port number (1-65535)",
                    )
                })?;
                ports.insert(name.clone(), n);
            }
        }
        endpoints.push(StaticEndpoint { addr, ports });
    }
    let selector = match &spec["workloadSelector"]["labels"] {
        Value::Object(map) => Labels::from_iter(
            map.iter()
                .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or_default())),
        ),
        _ => Labels::default(),
    };
    Ok(ServiceEntry {
        namespace: {
            let ns = meta("namespace");
            if ns.is_empty() {
                "default".to_owned()
            } else {
                ns
            }
        },
        name: meta("name"),
        hosts,
        addresses,
        ports,
        resolution,
        endpoints,
        selector,
        labels: match &object["metadata"]["labels"] {
            Value::Object(map) => Labels::from_iter(
                map.iter()
                    .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or_default())),
            ),
            _ => Labels::default(),
        },
    })
}

fn array<'a>(v: &'a Value, field: &str) -> Result<&'a [Value], FieldError> {
    match v {
        Value::Null => Ok(&[]),
        Value::Array(a) => Ok(a),
        _ => Err(FieldError::new(field, "must be a list")),
    }
}

fn port_number(v: &Value) -> Option<u16> {
    v.as_u64()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n > 0)
}

/// The services of `entries` (one per host), addresses allocated from `range` where an entry
/// has none, bound to the waypoint `waypoint` gives an entry. Entries are taken in
/// (namespace, name) order so that allocation is the same wherever it runs.
pub(crate) fn services(
    entries: &[ServiceEntry],
    range: AddressRange,
    waypoint: impl Fn(&ServiceEntry) -> Option<WaypointRef>,
) -> Vec<Service> {
    let mut sorted: Vec<&ServiceEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut taken: BTreeSet<IpAddr> = sorted
        .iter()
        .flat_map(|e| e.addresses.iter().copied())
        .collect();
    let mut out = Vec::new();
    for entry in sorted {
        for host in &entry.hosts {
            let vips = if !entry.addresses.is_empty() {
                entry.addresses.clone()
            } else if entry.resolution != Resolution::None && !host.starts_with('*') {
                allocate(range, &entry.namespace, host, &mut taken)
                    .into_iter()
                    .collect()
            } else {
                Vec::new()
            };
            out.push(Service {
                // The host is the service's name in metrics (Istio's destination_service_name).
                name: host.clone(),
                namespace: entry.namespace.clone(),
                vips,
                ports: entry.ports.clone(),
                selector: entry.selector.clone(),
                waypoint: waypoint(entry),
                ingress_use_waypoint: false,
                host: Some(host.clone()),
                static_endpoints: entry.endpoints.clone(),
                passthrough: entry.resolution == Resolution::None
                    || (entry.resolution == Resolution::Dns
                        && entry.endpoints.is_empty()
                        && entry.selector.is_empty()),
            });
        }
    }
    out
}

/// A free address of `range` for `host` of `namespace`: where its hash lands, else the
/// next free one (the range's first and last addresses are never used).
fn allocate(
    range: AddressRange,
    namespace: &str,
    host: &str,
    taken: &mut BTreeSet<IpAddr>,
) -> Option<IpAddr> {
    let size = range.size();
    let usable = size - 2;
    let mut h: u32 = 0x811c_9dc5;
    for b in namespace.bytes().chain([b'/']).chain(host.bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let base = u32::from(range.base);
    for i in 0..usable {
        let offset = (h.wrapping_add(i)) % usable + 1;
        let ip = IpAddr::V4(Ipv4Addr::from(base + offset));
        if taken.insert(ip) {
            return Some(ip);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(yaml: &str) -> Result<ServiceEntry, FieldError> {
        parse(&serde_yaml_ng::from_str::<Value>(yaml).unwrap())
    }

    #[test]
    fn a_static_entry_is_one_service_per_host_with_its_endpoints() {
        let e = entry(
            "metadata: {name: ext, namespace: shop}\nspec:\n  hosts: [api.example.com, API2.example.com]\n  addresses: [192.0.2.1, 10.0.0.0/24]\n  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]\n  resolution: STATIC\n  endpoints: [{address: 10.1.0.5}, {address: 10.1.0.6, ports: {http: 9090}}]\n",
        )
        .unwrap();
        let services = services(&[e], DEFAULT_RANGE, |_| None);
        assert_eq!(services.len(), 2);
        let s = &services[1];
        assert_eq!(
            (s.name.as_str(), s.fqdn()),
            ("api2.example.com", "api2.example.com".into())
        );
        assert_eq!(s.vips, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ports[0].target_port, TargetPort::Number(8080));
        assert_eq!(s.ports[0].app_protocol.as_deref(), Some("http"));
        assert_eq!(s.static_endpoints.len(), 2);
        assert!(!s.passthrough);
    }

    #[test]
    fn addresses_are_allocated_once_per_host_and_the_same_every_time() {
        let yaml = "metadata: {name: ext, namespace: shop}\nspec:\n  hosts: [a.example.com, b.example.com, '*.wild.com']\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n";
        let first = services(&[entry(yaml).unwrap()], DEFAULT_RANGE, |_| None);
        let again = services(&[entry(yaml).unwrap()], DEFAULT_RANGE, |_| None);
        assert_eq!(first, again);
        for s in &first[..2] {
            let IpAddr::V4(ip) = s.vips[0] else { panic!() };
            assert_eq!(ip.octets()[..2], [240, 240], "{ip}");
        }
        assert_ne!(first[0].vips, first[1].vips);
        assert!(first[2].vips.is_empty(), "a wildcard host gets no address");
        // Istio's allocation, when written, is used.
        let allocated = entry(&format!(
            "{yaml}status: {{addresses: [{{value: 240.240.9.9}}]}}\n"
        ))
        .unwrap();
        let s = services(&[allocated], DEFAULT_RANGE, |_| None);
        assert_eq!(s[0].vips, vec!["240.240.9.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            ("spec: {ports: [{number: 80}]}", "spec.hosts"),
            ("spec: {hosts: [a], addresses: [nope]}", "spec.addresses[0]"),
            (
                "spec: {hosts: [a], ports: [{number: 0}]}",
                "spec.ports[0].number",
            ),
            ("spec: {hosts: [a], resolution: MAGIC}", "spec.resolution"),
            (
                "spec: {hosts: [a], resolution: STATIC, endpoints: [{address: db.local}]}",
                "spec.endpoints[0].address",
            ),
        ];
        for (yaml, field) in cases {
            let e = entry(&format!("metadata: {{name: x}}\n{yaml}")).unwrap_err();
            assert_eq!(e.field, field, "{yaml}");
        }
    }
}
