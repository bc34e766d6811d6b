//! The agent's view of the mesh: workloads (pods) and services translated from the
//! configuration, with the O(1) lookups the data path needs. Built by
//! [`config::translate`](crate::config::translate); immutable once built.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use std::sync::Arc;

use crate::config::EndpointSlice;
use serde::Serialize;

use crate::admission::PolicySet;
use crate::l7::routes::Routes;
use crate::labels::Labels;

/// Everything the agent knows about the mesh at one point in time.
///
/// Build it with [`MeshState::new`] (or the translation), which sorts its contents and builds
/// the lookup indexes; the fields are public for reading, and a changed copy must be rebuilt
/// with `new` to keep the indexes right. Serialized as JSON in `/config_dump` (the indexes are
/// skipped).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshState {
    /// Sorted by (namespace, name).
    pub workloads: Vec<Workload>,
    /// Sorted by (namespace, name).
    pub services: Vec<Service>,
    /// Sorted by (namespace, name).
    pub waypoints: Vec<Waypoint>,
    /// The nodes pods are scheduled on, with the node's addresses as its pods report them
    /// (where `mesh-agent status` finds the node agents).
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
    /// Objects interpreted by later features, sorted by (namespace, name).
    pub raw: RawObjects,
    /// The ready endpoints of every TCP service port, by (service index, port): computed
    /// once, when the state is built.
    #[serde(skip)]
    endpoints: HashMap<(usize, u16), Vec<SocketAddr>>,
    /// Workload IP (canonical: IPv4-mapped IPv6 stored as IPv4) -> index in `workloads`.
    #[serde(skip)]
    workload_ips: HashMap<IpAddr, usize>,
    /// Service VIP (canonical) -> index in `services`.
    #[serde(skip)]
    service_vips: HashMap<IpAddr, usize>,
    /// The PeerAuthentications and AuthorizationPolicies of `raw`, parsed.
    #[serde(skip)]
    policies: Arc<PolicySet>,
    /// The HTTPRoutes, VirtualServices and DestinationRules of `raw`, compiled.
    #[serde(skip)]
    routes: Arc<Routes>,
    /// What an operator must know about this state: bindings to waypoints that do not
    /// exist or have no ready pod (that traffic bypasses L7 policy), routing objects not
    /// applied as written.
    pub warnings: Vec<String>,
    /// The names the pods' resolver answers, built when first asked for.
    #[serde(skip)]
    names: std::sync::OnceLock<Arc<crate::dns::Names>>,
}

/// States are equal when what they were built from is: everything else is derived.
impl PartialEq for MeshState {
    fn eq(&self, other: &Self) -> bool {
        self.workloads == other.workloads
            && self.services == other.services
            && self.waypoints == other.waypoints
            && self.nodes == other.nodes
            && self.raw == other.raw
            && self.policies.root_namespace() == other.policies.root_namespace()
    }
}

/// Kubernetes objects kept as they came until the feature that uses them types them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RawObjects {
    /// `discovery.k8s.io/v1` EndpointSlice (indexed into ready endpoints by `MeshState::new`).
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// `security.istio.io/v1` AuthorizationPolicy.
    pub authorization_policies: Vec<serde_json::Value>,
    /// `security.istio.io/v1` PeerAuthentication.
    pub peer_authentications: Vec<serde_json::Value>,
    /// `gateway.networking.k8s.io/v1` HTTPRoute (typed into [`MeshState::routes`]).
    pub http_routes: Vec<serde_json::Value>,
    /// `gateway.networking.k8s.io/v1` GRPCRoute (typed into [`MeshState::routes`]).
    pub grpc_routes: Vec<serde_json::Value>,
    /// `networking.istio.io/v1` VirtualService (typed into [`MeshState::routes`]).
    pub virtual_services: Vec<serde_json::Value>,
    /// `networking.istio.io/v1` DestinationRule (typed into [`MeshState::routes`]).
    pub destination_rules: Vec<serde_json::Value>,
    /// `gateway.networking.k8s.io/v1` Gateway, every class (ingress gateways of class
    /// `istio` are typed into [`MeshState::routes`]).
    pub gateways: Vec<serde_json::Value>,
    /// `networking.istio.io/v1` Gateway (typed into [`MeshState::routes`]).
    pub istio_gateways: Vec<serde_json::Value>,
    /// The certificates and keys of `kubernetes.io/tls` Secrets, by namespace and name:
    /// what ingress gateways serve HTTPS with. Never serialized (keys).
    #[serde(skip)]
    pub tls_secrets: BTreeMap<(String, String), Arc<TlsSecret>>,
}

/// A `kubernetes.io/tls` Secret's PEM certificate chain and private key.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSecret {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSecret")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// One pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// `metadata.uid`, or `namespace/name` if absent.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `spec.serviceAccountName`, default `default`.
    pub service_account: String,
    /// `status.podIPs` (all), else `status.podIP`; canonical form.
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
    /// Canonical workload name: label `app.kubernetes.io/name`, else `app`, else the pod name.
    pub workload_name: String,
    /// Annotation `mesh-agent.io/netns` (file mode).
    pub netns: Option<PathBuf>,
    /// Whether the pod is enrolled in the mesh (Istio ambient opt-in rules).
    pub captured: bool,
    pub host_network: bool,
    /// Annotation `ambient.istio.io/dns-capture`: the pod's own choice of DNS capture.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_capture: Option<bool>,
    /// The waypoint its traffic (as a workload) goes through, if it names one.
    pub waypoint: Option<WaypointRef>,
}

/// One Kubernetes service (or a ServiceEntry host).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `spec.clusterIPs`, else `spec.clusterIP`; empty for headless (`None`) services.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Empty: the service selects no pods (endpoints are managed elsewhere).
    pub selector: Labels,
    /// The waypoint its traffic goes through, if it names one.
    pub waypoint: Option<WaypointRef>,
    /// Ingress gateways send its traffic through its waypoint too (label
    /// `istio.io/ingress-use-waypoint: "true"` on it or its namespace), not straight to
    /// its endpoints.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ingress_use_waypoint: bool,
    /// A ServiceEntry's host: the service's name everywhere (DNS, metrics) instead of
    /// `<name>.<namespace>.svc.cluster.local`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// A ServiceEntry's endpoints by address (not pods selected by labels).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub static_endpoints: Vec<StaticEndpoint>,
    /// Connections go where the client dialed when the service has no endpoint (a
    /// ServiceEntry of resolution NONE, or DNS without addresses) instead of failing.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
}

/// An endpoint given by address (a ServiceEntry's `endpoints`): its port numbers by service
/// port name, where they differ from the service port's target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaticEndpoint {
    pub addr: IpAddr,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
}

/// A waypoint a service, workload or namespace names (`istio.io/use-waypoint`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct WaypointRef {
    pub namespace: String,
    pub name: String,
}

/// What traffic a waypoint takes (`istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaypointFor {
    /// Traffic to a service's address (the default).
    Service,
    /// Traffic to a workload's own address.
    Workload,
    All,
    None,
}

/// A waypoint: an L7 proxy for the services or workloads bound to it (a Gateway of class
/// `istio-waypoint`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub traffic: WaypointFor,
    /// The service account of its pods: the identity HBONE to it must present.
    pub service_account: String,
    /// The addresses of its ready pods. Empty: it does not exist for binding.
    pub addresses: Vec<IpAddr>,
}

impl Waypoint {
    /// Whether `w` is one of this waypoint's pods (traffic it sends is never sent back to it).
    pub fn is_pod(&self, w: &Workload) -> bool {
        w.namespace == self.namespace
            && w.labels
                .get(GATEWAY_NAME_LABEL)
                .is_some_and(|n| *n == self.name)
    }
}

/// The label Gateway API puts on a gateway's pods (a waypoint's among them).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// Defaults to `port` when the service leaves it out, as Kubernetes does.
    pub target_port: TargetPort,
    /// `TCP`, `UDP` or `SCTP`; default `TCP`.
    pub protocol: String,
    /// `appProtocol`: what the port speaks above TCP, when the service says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// What a waypoint does with a service port's traffic (Istio's protocol selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 or HTTP/2 (gRPC included): routed per request.
    Http,
    /// Anything else: proxied as bytes.
    Tcp,
}

impl ServicePort {
    /// Istio's rule: `appProtocol` when set, else the port name's prefix (`http`,
    /// `http-web`, `grpc-api`...); HTTP for `http`, `http2`, `h2c`, `grpc` and `grpc-web`,
    /// TCP for anything else (TLS, databases, unnamed ports).
    pub fn app_protocol(&self) -> AppProtocol {
        let declared = match &self.app_protocol {
            Some(p) => p.as_str(),
            None => self
                .name
                .as_deref()
                .map_or("", |n| n.split('-').next().unwrap_or(n)),
        };
        let declared = declared.rsplit('/').next().unwrap_or(declared);
        match declared.to_ascii_lowercase().as_str() {
            "http" | "http2" | "h2c" | "grpc" | "grpc-web" => AppProtocol::Http,
            _ => AppProtocol::Tcp,
        }
    }
}

/// Where a service port sends traffic on the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved against the pod's container ports.
    Named(String),
}

impl MeshState {
    /// Sorts workloads, services and raw objects by (namespace, name) and builds the indexes.
    ///
    /// Index rules: an IP maps to one workload. Host-network pods are not indexed (they share
    /// the node's address, so the address does not identify them). When two pods claim an IP
    /// (a finished pod and its successor), a captured pod wins over an uncaptured one, then the
    /// first in (namespace, name) order. A VIP maps to the first service that claims it.
    pub fn new(workloads: Vec<Workload>, services: Vec<Service>, raw: RawObjects) -> Self {
        Self::build(
            workloads,
            services,
            raw,
            &crate::config::Settings::default().root_namespace,
        )
    }

    /// [`new`](Self::new), with policies parsed for a mesh whose root namespace (where
    /// policies apply mesh-wide) is `root_namespace`.
    pub fn build(
        mut workloads: Vec<Workload>,
        mut services: Vec<Service>,
        mut raw: RawObjects,
        root_namespace: &str,
    ) -> Self {
        workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for list in [
            &mut raw.authorization_policies,
            &mut raw.peer_authentications,
            &mut raw.http_routes,
            &mut raw.grpc_routes,
            &mut raw.virtual_services,
            &mut raw.destination_rules,
            &mut raw.gateways,
            &mut raw.istio_gateways,
        ] {
            list.sort_by(|a, b| raw_key(a).cmp(&raw_key(b)));
        }
        raw.endpoint_slices.sort_by(|a, b| {
            let key = |s: &EndpointSlice| (s.metadata.namespace.clone(), s.metadata.name.clone());
            key(a).cmp(&key(b))
        });

        let mut workload_ips: HashMap<IpAddr, usize> = HashMap::new();
        for (i, w) in workloads.iter().enumerate() {
            if w.host_network {
                continue;
            }
            for ip in &w.ips {
                workload_ips
                    .entry(ip.to_canonical())
                    .and_modify(|cur| {
                        if w.captured && !workloads[*cur].captured {
                            *cur = i;
                        }
                    })
                    .or_insert(i);
            }
        }
        let mut service_vips = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            for vip in &s.vips {
                service_vips.entry(vip.to_canonical()).or_insert(i);
            }
        }
        let endpoints = crate::lb::index(&services, &workloads, &raw.endpoint_slices);
        let policies = Arc::new(PolicySet::parse(
            &raw.authorization_policies,
            &raw.peer_authentications,
            root_namespace,
        ));
        let routes = Arc::new(Routes::build_with_gateways(
            &services,
            &raw.http_routes,
            &raw.grpc_routes,
            &raw.virtual_services,
            &raw.destination_rules,
            &raw.gateways,
            &raw.istio_gateways,
        ));
        let mut state = Self {
            workloads,
            services,
            waypoints: Vec::new(),
            nodes: BTreeMap::new(),
            raw,
            endpoints,
            workload_ips,
            service_vips,
            policies,
            routes,
            warnings: Vec::new(),
            names: std::sync::OnceLock::new(),
        };
        state.warnings = state.compute_warnings();
        state
    }

    /// The compiled routing objects.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The names the resolver answers from this state (built on first use, then shared).
    pub fn names(&self) -> &crate::dns::Names {
        self.names
            .get_or_init(|| Arc::new(crate::dns::Names::build(self)))
    }

    /// Logs what an operator must know about this state (policies not enforced as written,
    /// missing waypoints, routes not applied). Sources call it when they publish a state.
    pub fn log_problems(&self) {
        self.policies.log_problems();
        for w in &self.warnings {
            tracing::warn!("{w}");
        }
    }

    /// Bindings to absent or unready waypoints (one line per waypoint, with what binds to
    /// it), then the routing objects' problems.
    fn compute_warnings(&self) -> Vec<String> {
        let mut bound: BTreeMap<&WaypointRef, Vec<String>> = BTreeMap::new();
        for s in &self.services {
            if let Some(r) = &s.waypoint {
                bound
                    .entry(r)
                    .or_default()
                    .push(format!("Service {}/{}", s.namespace, s.name));
            }
        }
        for w in &self.workloads {
            if let Some(r) = &w.waypoint
                && w.captured
            {
                bound
                    .entry(r)
                    .or_default()
                    .push(format!("Pod {}/{}", w.namespace, w.name));
            }
        }
        let mut out = Vec::new();
        for (r, objects) in bound {
            let problem = match self.waypoint(r) {
                None => "does not exist",
                Some(w) if w.addresses.is_empty() => "has no ready pod",
                Some(_) => continue,
            };
            let shown: Vec<&str> = objects.iter().take(5).map(String::as_str).collect();
            let more = objects.len().saturating_sub(shown.len());
            out.push(format!(
                "waypoint {}/{} {problem}: traffic to {}{} goes direct, bypassing its L7 policy",
                r.namespace,
                r.name,
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                },
            ));
        }
        out.extend(self.routes.problems().iter().cloned());
        out
    }

    /// The state's PeerAuthentications and AuthorizationPolicies, parsed.
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// The same state with these waypoints (sorted by (namespace, name)).
    pub fn with_waypoints(mut self, mut waypoints: Vec<Waypoint>) -> Self {
        waypoints.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.waypoints = waypoints;
        self.warnings = self.compute_warnings();
        self
    }

    /// The same state with these nodes.
    pub fn with_nodes(mut self, nodes: BTreeMap<String, Vec<IpAddr>>) -> Self {
        self.nodes = nodes;
        self
    }

    /// The services with their ready endpoints (every port's), in order.
    pub fn services_with_endpoints(
        &self,
    ) -> impl Iterator<Item = (&Service, impl Iterator<Item = &SocketAddr>)> {
        self.services.iter().enumerate().map(move |(i, s)| {
            let endpoints = s
                .ports
                .iter()
                .filter_map(move |p| self.endpoints.get(&(i, p.port)))
                .flatten();
            (s, endpoints)
        })
    }

    /// The waypoint `r` names, if it exists.
    pub fn waypoint(&self, r: &WaypointRef) -> Option<&Waypoint> {
        // Looked up by borrowed parts: no allocation on the data path.
        self.waypoints
            .binary_search_by(|w| {
                (w.namespace.as_str(), w.name.as_str())
                    .cmp(&(r.namespace.as_str(), r.name.as_str()))
            })
            .ok()
            .map(|i| &self.waypoints[i])
    }

    /// The ready endpoints of `service`'s `port` (see [`crate::lb`]), sorted. O(1).
    pub fn endpoints(&self, service: &Service, port: &ServicePort) -> &[SocketAddr] {
        self.service_index(service)
            .and_then(|i| self.endpoints.get(&(i, port.port)))
            .map_or(&[], Vec::as_slice)
    }

    /// The service `namespace/name`. O(log n), no allocation.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .binary_search_by(|s| (s.namespace.as_str(), s.name.as_str()).cmp(&(namespace, name)))
            .ok()
            .map(|i| &self.services[i])
    }

    /// The pod `namespace/name`. O(log n), no allocation.
    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .binary_search_by(|w| (w.namespace.as_str(), w.name.as_str()).cmp(&(namespace, name)))
            .ok()
            .map(|i| &self.workloads[i])
    }

    /// Where `service` (by namespace and name) is in `services`. O(log n), no allocation.
    pub fn service_position(&self, service: &Service) -> Option<usize> {
        self.service_index(service)
    }

    fn service_index(&self, service: &Service) -> Option<usize> {
        self.services
            .binary_search_by(|s| {
                (s.namespace.as_str(), s.name.as_str())
                    .cmp(&(service.namespace.as_str(), service.name.as_str()))
            })
            .ok()
    }

    /// The workload that owns `ip` (IPv4-mapped IPv6 addresses are looked up as IPv4). O(1).
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.workload_ips
            .get(&ip.to_canonical())
            .map(|&i| &self.workloads[i])
    }

    /// The captured pods scheduled on `node`: the ones this agent enrolls.
    pub fn local_captured<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .iter()
            .filter(move |w| w.captured && w.node.as_deref() == Some(node))
    }

    /// The service whose VIP is `ip` and its TCP port `port` (the mesh carries TCP only, so UDP
    /// and SCTP ports never match). IPv4-mapped IPv6 addresses are looked up as IPv4. O(1) in the
    /// number of services.
    pub fn service_by_vip(&self, ip: IpAddr, port: u16) -> Option<(&Service, &ServicePort)> {
        let service = &self.services[*self.service_vips.get(&ip.to_canonical())?];
        let port = service
            .ports
            .iter()
            .find(|p| p.port == port && p.protocol == "TCP")?;
        Some((service, port))
    }

    /// The services that select `workload`: same namespace, a non-empty selector, and every
    /// selector label present on the pod with the same value (Kubernetes semantics).
    pub fn services_for_workload<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Service> + 'a {
        self.services
            .iter()
            .filter(move |s| s.namespace == workload.namespace && s.selects(&workload.labels))
    }
}

/// The cluster's DNS domain: services are `<name>.<namespace>.svc.cluster.local`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

impl Service {
    /// The service's host name: `<name>.<namespace>.svc.cluster.local`, or a
    /// ServiceEntry's host.
    pub fn fqdn(&self) -> String {
        match &self.host {
            Some(host) => host.clone(),
            None => format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.name, self.namespace),
        }
    }

    /// Whether this service's selector matches a pod with `labels`; an empty selector matches
    /// nothing (such services get their endpoints from elsewhere).
    pub fn selects(&self, labels: &Labels) -> bool {
        !self.selector.is_empty() && labels.matches(&self.selector)
    }
}

/// (namespace, name) of a raw Kubernetes object, for sorting.
fn raw_key(v: &serde_json::Value) -> (&str, &str) {
    let meta = &v["metadata"];
    (
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().unwrap_or(""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, name: &str, ips: &[&str]) -> Workload {
        Workload {
            uid: format!("{ns}/{name}"),
            name: name.into(),
            namespace: ns.into(),
            node: Some("node-a".into()),
            service_account: "default".into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            labels: Labels::new(),
            workload_name: name.into(),
            netns: None,
            captured: true,
            host_network: false,
            dns_capture: None,
            waypoint: None,
        }
    }

    fn service(ns: &str, name: &str, vips: &[&str], ports: &[(u16, &str)]) -> Service {
        Service {
            name: name.into(),
            namespace: ns.into(),
            vips: vips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ports: ports
                .iter()
                .map(|&(port, protocol)| ServicePort {
                    name: None,
                    port,
                    target_port: TargetPort::Number(port),
                    protocol: protocol.into(),
                    app_protocol: None,
                })
                .collect(),
            selector: Labels::from([("app", name)]),
            waypoint: None,
            ingress_use_waypoint: false,
            host: None,
            static_endpoints: Vec::new(),
            passthrough: false,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn new_sorts_workloads_and_services_by_namespace_then_name() {
        let s = MeshState::new(
            vec![
                workload("b", "a", &[]),
                workload("a", "z", &[]),
                workload("a", "b", &[]),
            ],
            vec![service("b", "x", &[], &[]), service("a", "y", &[], &[])],
            RawObjects::default(),
        );
        let names: Vec<_> = s
            .workloads
            .iter()
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .collect();
        assert_eq!(names, ["a/b", "a/z", "b/a"]);
        assert_eq!(s.services[0].namespace, "a");
    }

    #[test]
    fn workload_by_ip_finds_every_pod_ip() {
        let s = MeshState::new(
            vec![
                workload("default", "web", &["10.0.0.1", "fd00::1"]),
                workload("default", "db", &["10.0.0.2"]),
            ],
            vec![],
            RawObjects::default(),
        );
        let cases = [
            ("10.0.0.1", Some("web")),
            ("fd00::1", Some("web")),
            ("10.0.0.2", Some("db")),
            ("10.0.0.3", None),
        ];
        for (ip, want) in cases {
            let got = s
                .workload_by_ip(ip.parse().unwrap())
                .map(|w| w.name.as_str());
            assert_eq!(got, want, "{ip}");
        }
    }

    #[test]
    fn workload_by_ip_treats_ipv4_mapped_ipv6_as_ipv4() {
        let s = MeshState::new(
            vec![workload("default", "web", &["10.0.0.1"])],
            vec![],
            RawObjects::default(),
        );
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(s.workload_by_ip(mapped).unwrap().name, "web");
    }

    #[test]
    fn host_network_pods_are_not_found_by_ip() {
        let mut host = workload("kube-system", "node-exporter", &["192.168.1.10"]);
        host.host_network = true;
        host.captured = false;
        let s = MeshState::new(vec![host], vec![], RawObjects::default());
        assert!(s.workload_by_ip("192.168.1.10".parse().unwrap()).is_none());
    }

    #[test]
    fn captured_pod_wins_a_shared_ip_over_an_uncaptured_one() {
        let mut done = workload("default", "a-job-done", &["10.0.0.9"]);
        done.captured = false;
        let live = workload("default", "b-live", &["10.0.0.9"]);
        let s = MeshState::new(vec![live, done], vec![], RawObjects::default());
        assert_eq!(
            s.workload_by_ip("10.0.0.9".parse().unwrap()).unwrap().name,
            "b-live"
        );
    }

    #[test]
    fn local_captured_yields_only_captured_pods_on_this_node() {
        let mut other_node = workload("default", "remote", &[]);
        other_node.node = Some("node-b".into());
        let mut uncaptured = workload("default", "plain", &[]);
        uncaptured.captured = false;
        let mut unscheduled = workload("default", "pending", &[]);
        unscheduled.node = None;
        let s = MeshState::new(
            vec![
                workload("default", "local", &[]),
                other_node,
                uncaptured,
                unscheduled,
            ],
            vec![],
            RawObjects::default(),
        );
        let names: Vec<_> = s
            .local_captured("node-a")
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(names, ["local"]);
    }

    #[test]
    fn service_by_vip_matches_vip_and_tcp_port() {
        let s = MeshState::new(
            vec![],
            vec![
                service(
                    "default",
                    "web",
                    &["10.96.0.10", "fd00:96::10"],
                    &[(80, "TCP"), (443, "TCP")],
                ),
                service("default", "dns", &["10.96.0.53"], &[(53, "UDP")]),
            ],
            RawObjects::default(),
        );
        let cases = [
            ("10.96.0.10", 80, Some(("web", 80))),
            ("10.96.0.10", 443, Some(("web", 443))),
            ("fd00:96::10", 80, Some(("web", 80))),
            ("::ffff:10.96.0.10", 80, Some(("web", 80))),
            ("10.96.0.10", 8080, None),
            ("10.96.0.53", 53, None),
            ("10.96.0.99", 80, None),
        ];
        for (ip, port, want) in cases {
            let got = s
                .service_by_vip(ip.parse().unwrap(), port)
                .map(|(s, p)| (s.name.as_str(), p.port));
            assert_eq!(got, want, "{ip}:{port}");
        }
    }

    #[test]
    fn services_for_workload_requires_same_namespace_and_full_selector_match() {
        let mut w = workload("default", "web-1", &[]);
        w.labels = labels(&[("app", "web"), ("version", "v1")]);
        let mut by_version = service("default", "web-v1", &[], &[]);
        by_version.selector = labels(&[("app", "web"), ("version", "v1")]);
        let mut wrong_version = service("default", "web-v2", &[], &[]);
        wrong_version.selector = labels(&[("app", "web"), ("version", "v2")]);
        let mut no_selector = service("default", "manual", &[], &[]);
        no_selector.selector = Labels::new();
        let s = MeshState::new(
            vec![w.clone()],
            vec![
                service("default", "web", &[], &[]),
                service("other", "web", &[], &[]),
                by_version,
                wrong_version,
                no_selector,
            ],
            RawObjects::default(),
        );
        let got: Vec<_> = s
            .services_for_workload(&w)
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        assert_eq!(got, ["default/web", "default/web-v1"]);
    }

    #[test]
    fn state_serializes_without_indexes_and_target_port_untagged() {
        let mut svc = service("default", "web", &["10.96.0.10"], &[(80, "TCP")]);
        svc.ports[0].target_port = TargetPort::Named("http".into());
        let s = MeshState::new(
            vec![workload("default", "web-1", &["10.0.0.1"])],
            vec![svc],
            RawObjects::default(),
        );
        let json = serde_json::to_value(&s).unwrap();
        assert!(json.get("workload_ips").is_none());
        assert_eq!(json["workloads"][0]["ips"][0], "10.0.0.1");
        assert_eq!(json["services"][0]["ports"][0]["target_port"], "http");
        assert_eq!(json["services"][0]["vips"][0], "10.96.0.10");
    }
}
