//! Pure translation of Kubernetes [`Objects`] into the agent's [`MeshState`], shared by every
//! configuration source; the Istio ambient opt-in rules live here.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    ConfigError, DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE,
    DNS_CAPTURE_ANNOTATION, FieldError, Kind, NETNS_ANNOTATION, ObjectKey, Objects, Pod,
    SIDECAR_STATUS_ANNOTATION, Settings,
};
use crate::labels::Labels;
use crate::state::{
    GATEWAY_NAME_LABEL, MeshState, RawObjects, Service, ServicePort, TargetPort, Waypoint,
    WaypointFor, WaypointRef, Workload,
};

/// Istio's label binding a namespace, service or pod to a waypoint (`none` opts out).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// On a service or namespace: ingress gateways send its traffic through its waypoint.
pub const INGRESS_USE_WAYPOINT_LABEL: &str = "istio.io/ingress-use-waypoint";
/// The namespace of the waypoint [`USE_WAYPOINT_LABEL`] names, when not the object's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// On a waypoint's Gateway: what traffic it takes.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// How the agent finds the network namespace of a pod it enrolls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsSource {
    /// File mode: from the pod's `mesh-agent.io/netns` annotation, so a captured pod on this
    /// node without it is an error.
    Annotation,
    /// Kubernetes mode: discovered from /proc; the annotation is optional.
    Discovered,
}

/// Translates `objects` into the state of the agent running on `node`.
///
/// Deterministic: workloads and services come out sorted by (namespace, name), whatever the
/// order of `objects`. Errors name the offending object and field.
pub fn translate(
    objects: &Objects,
    node: &str,
    netns: NetnsSource,
    settings: &Settings,
) -> Result<MeshState, ConfigError> {
    let namespace_labels: HashMap<&str, Labels> = objects
        .namespaces
        .iter()
        .filter_map(|ns| {
            let labels = ns.metadata.labels.as_ref()?;
            Some((ns.metadata.name.as_deref()?, Labels::from(labels)))
        })
        .collect();

    let waypoints = waypoints(objects)?;
    let mut workloads = Vec::with_capacity(objects.pods.len());
    for pod in &objects.pods {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let ns_labels = namespace_labels.get(ns);
        let mut w = workload(pod, ns_labels).map_err(|e| ConfigError::Object {
            object: pod_key(pod),
            message: e.to_string(),
        })?;
        // A waypoint's own pods are never sent to a waypoint.
        if !w.labels.contains_key(GATEWAY_NAME_LABEL) {
            w.waypoint = use_waypoint(Some(&pod.labels), ns_labels, &w.namespace);
        }
        if netns == NetnsSource::Annotation
            && w.captured
            && w.netns.is_none()
            && w.node.as_deref() == Some(node)
        {
            return Err(ConfigError::Object {
                object: pod_key(pod),
                message: missing_netns(node).to_string(),
            });
        }
        workloads.push(w);
    }

    let mut services = objects
        .services
        .iter()
        .map(|svc| {
            let mut s = service(svc).map_err(|e| ConfigError::Object {
                object: key(Kind::Service, &svc.metadata),
                message: e.to_string(),
            })?;
            let ns_labels = namespace_labels.get(s.namespace.as_str());
            let labels = svc.metadata.labels.as_ref().map(Labels::from);
            s.waypoint = use_waypoint(labels.as_ref(), ns_labels, &s.namespace);
            s.ingress_use_waypoint = ingress_use_waypoint(labels.as_ref(), ns_labels);
            Ok(s)
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;

    let entries = objects
        .service_entries
        .iter()
        .map(|object| {
            super::service_entry::parse(object).map_err(|e| ConfigError::Object {
                object: raw_key(Kind::ServiceEntry, object),
                message: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    services.extend(super::service_entry::services(
        &entries,
        super::service_entry::DEFAULT_RANGE,
        |entry| {
            let ns_labels = namespace_labels.get(entry.namespace());
            use_waypoint(Some(entry.labels()), ns_labels, entry.namespace())
        },
    ));

    for (kind, list) in [
        (Kind::HttpRoute, &objects.http_routes),
        (Kind::GrpcRoute, &objects.grpc_routes),
        (Kind::VirtualService, &objects.virtual_services),
        (Kind::DestinationRule, &objects.destination_rules),
        (Kind::IstioGateway, &objects.istio_gateways),
        (Kind::Gateway, &objects.gateways),
    ] {
        for object in list {
            crate::l7::config::validate(kind, object).map_err(|e| ConfigError::Object {
                object: raw_key(kind, object),
                message: e.to_string(),
            })?;
        }
    }

    let mut tls_secrets = BTreeMap::new();
    for secret in &objects.secrets {
        let meta = &secret.metadata;
        let tls = tls_secret(secret).map_err(|e| ConfigError::Object {
            object: key(Kind::Secret, meta),
            message: e.to_string(),
        })?;
        if let (Some(tls), Some(name)) = (tls, &meta.name) {
            let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
            tls_secrets.insert((namespace, name.clone()), std::sync::Arc::new(tls));
        }
    }

    Ok(MeshState::build(
        workloads,
        services,
        RawObjects {
            endpoint_slices: objects.endpoint_slices.clone(),
            authorization_policies: objects.authorization_policies.clone(),
            peer_authentications: objects.peer_authentications.clone(),
            http_routes: objects.http_routes.clone(),
            grpc_routes: objects.grpc_routes.clone(),
            virtual_services: objects.virtual_services.clone(),
            destination_rules: objects.destination_rules.clone(),
            gateways: objects.gateways.clone(),
            istio_gateways: objects.istio_gateways.clone(),
            tls_secrets,
        },
        &settings.root_namespace,
    )
    .with_waypoints(waypoints)
    .with_nodes(nodes(&objects.pods)))
}

/// The nodes pods are scheduled on, with the addresses the pods report for them
/// (`status.hostIPs`, else `status.hostIP`; what cannot be parsed is skipped: nothing is
/// routed by it).
fn nodes(pods: &[Arc<Pod>]) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for pod in pods {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
            continue;
        };
        let ips = out.entry(node.to_owned()).or_default();
        let status = pod.status.as_ref();
        let listed = status
            .and_then(|s| s.host_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|h| h.ip.as_str());
        for ip in listed.chain(status.and_then(|s| s.host_ip.as_deref())) {
            if let Ok(ip) = ip.parse::<IpAddr>()
                && !ips.contains(&ip.to_canonical())
            {
                ips.push(ip.to_canonical());
            }
        }
    }
    out
}

/// The key of an object kept as JSON.
fn raw_key(kind: Kind, object: &serde_json::Value) -> ObjectKey {
    let meta = &object["metadata"];
    ObjectKey {
        kind,
        namespace: Some(meta["namespace"].as_str().unwrap_or("default").to_owned()),
        name: meta["name"].as_str().unwrap_or_default().to_owned(),
    }
}

/// The waypoint an object binds to: its own `istio.io/use-waypoint` label, else its
/// namespace's; `none` (on the object) opts out of the namespace's.
fn use_waypoint(
    labels: Option<&Labels>,
    namespace_labels: Option<&Labels>,
    namespace: &str,
) -> Option<WaypointRef> {
    let (carrier, name) = [labels, namespace_labels]
        .into_iter()
        .flatten()
        .find_map(|l| Some((l, l.get(USE_WAYPOINT_LABEL)?)))?;
    if name.is_empty() || name == "none" {
        return None;
    }
    Some(WaypointRef {
        namespace: carrier
            .get(USE_WAYPOINT_NAMESPACE_LABEL)
            .filter(|n| !n.is_empty())
            .unwrap_or(namespace)
            .to_owned(),
        name: name.to_owned(),
    })
}

/// The type of the Secrets that hold a certificate and its key.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// A Secret's certificate and key when it is a `kubernetes.io/tls` one (`None` for other
/// types, which are ignored); an error names the missing field.
pub(crate) fn tls_secret(
    secret: &k8s_openapi::api::core::v1::Secret,
) -> Result<Option<crate::state::TlsSecret>, FieldError> {
    if secret.type_.as_deref() != Some(TLS_SECRET_TYPE) {
        return Ok(None);
    }
    let field = |key: &str| -> Result<Vec<u8>, FieldError> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.clone().into_bytes())
            })
            .filter(|v| !v.is_empty())
            .ok_or_else(|| FieldError::new(format!("data[{key}]"), "missing"))
    };
    Ok(Some(crate::state::TlsSecret {
        cert_pem: field("tls.crt")?,
        key_pem: field("tls.key")?,
    }))
}

/// Whether ingress gateways go through the service's waypoint: Istio's label on the
/// service, else on its namespace.
fn ingress_use_waypoint(labels: Option<&Labels>, namespace_labels: Option<&Labels>) -> bool {
    [labels, namespace_labels]
        .into_iter()
        .flatten()
        .find_map(|l| l.get(INGRESS_USE_WAYPOINT_LABEL))
        .is_some_and(|v| v == "true")
}

/// The waypoints: Gateways of class `istio-waypoint`, with the addresses of their ready pods
/// (labelled `gateway.networking.k8s.io/gateway-name`) and those pods' service account
/// (default: the Gateway's name, as `istioctl waypoint apply` creates it).
fn waypoints(objects: &Objects) -> Result<Vec<Waypoint>, ConfigError> {
    let mut out = Vec::new();
    for gateway in &objects.gateways {
        if gateway["spec"]["gatewayClassName"].as_str() != Some(WAYPOINT_CLASS) {
            continue;
        }
        let key = raw_key(Kind::Gateway, gateway);
        let bad = |field: &str, message: String| ConfigError::Object {
            object: key.clone(),
            message: format!("{field}: {message}"),
        };
        let label = &gateway["metadata"]["labels"][WAYPOINT_FOR_LABEL];
        let traffic = match label.as_str() {
            None if label.is_null() => WaypointFor::Service,
            Some("service") => WaypointFor::Service,
            Some("workload") => WaypointFor::Workload,
            Some("all") => WaypointFor::All,
            Some("none") => WaypointFor::None,
            _ => {
                return Err(bad(
                    &format!("metadata.labels[{WAYPOINT_FOR_LABEL}]"),
                    format!("{label}: expected service, workload, all or none"),
                ));
            }
        };
        let namespace = key.namespace.clone().unwrap_or_default();
        let pods: Vec<&Pod> = objects
            .pods
            .iter()
            .map(|p| &**p)
            .filter(|p| {
                p.metadata.namespace.as_deref().unwrap_or("default") == namespace
                    && p.labels
                        .get(GATEWAY_NAME_LABEL)
                        .is_some_and(|n| n == key.name)
                    && is_ready(p)
            })
            .collect();
        let mut addresses = Vec::new();
        for pod in &pods {
            addresses.extend(pod_ips(pod).map_err(|e| ConfigError::Object {
                object: pod_key(pod),
                message: e.to_string(),
            })?);
        }
        addresses.sort();
        addresses.dedup();
        let service_account = pods
            .iter()
            .find_map(|p| p.spec.as_ref()?.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| key.name.clone());
        out.push(Waypoint {
            namespace,
            name: key.name.clone(),
            traffic,
            service_account,
            addresses,
        });
    }
    Ok(out)
}

/// Whether a pod can take traffic: not finished, not being deleted, and `Ready` unless its
/// status says nothing about readiness (a file configuration).
fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let finished = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed" | "Pending")
    );
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_none_or(|c| c.status == "True");
    !finished && ready && pod.metadata.deletion_timestamp.is_none()
}

/// Whether Istio ambient captures `pod`, given its namespace's labels (`None` when the
/// namespace object is unknown).
///
/// Captured iff the pod is not host-network, has no sidecar (annotation
/// `sidecar.istio.io/status`), is not finished (phase Succeeded/Failed) or being deleted, its
/// label `istio.io/dataplane-mode` is not `none`, and that label is `ambient` on the pod or on
/// its namespace.
/// Pods of this namespace are never enrolled, whatever their labels.
pub const SYSTEM_NAMESPACE: &str = "kube-system";

pub fn is_captured(pod: &Pod, namespace_labels: Option<&Labels>) -> bool {
    let pod_mode = pod.labels.get(DATAPLANE_MODE_LABEL);
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let has_sidecar = pod.annotations.contains_key(SIDECAR_STATUS_ANNOTATION);
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let deleting = pod.metadata.deletion_timestamp.is_some();
    // As istio-cni's default exclusion: the cluster's own system pods are never meshed.
    let system = pod.metadata.namespace.as_deref() == Some(SYSTEM_NAMESPACE);

    !host_network
        && !system
        && !has_sidecar
        && !finished
        && !deleting
        && pod_mode != Some(DATAPLANE_MODE_NONE)
        && (pod_mode == Some(DATAPLANE_MODE_AMBIENT)
            || namespace_labels.and_then(|l| l.get(DATAPLANE_MODE_LABEL))
                == Some(DATAPLANE_MODE_AMBIENT))
}

/// Converts one pod; `namespace_labels` decides the ambient opt-in.
pub(crate) fn workload(
    pod: &Pod,
    namespace_labels: Option<&Labels>,
) -> Result<Workload, FieldError> {
    let meta = &pod.metadata;
    let name = required_name(meta)?;
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let spec = pod.spec.as_ref();
    let labels = pod.labels.clone();
    let workload_name = labels
        .get("app.kubernetes.io/name")
        .or_else(|| labels.get("app"))
        .map(str::to_owned)
        .unwrap_or_else(|| name.clone());
    Ok(Workload {
        uid: meta
            .uid
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| format!("{namespace}/{name}")),
        node: spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        ips: pod_ips(pod)?,
        netns: netns(pod)?,
        captured: is_captured(pod, namespace_labels),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        dns_capture: dns_capture(pod),
        waypoint: None,
        workload_name,
        labels,
        name,
        namespace,
    })
}

/// Converts one service, applying Kubernetes defaults (protocol TCP, targetPort = port).
pub(crate) fn service(svc: &k8s::Service) -> Result<Service, FieldError> {
    let name = required_name(&svc.metadata)?;
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let spec = svc.spec.as_ref();

    let mut vips = Vec::new();
    match spec
        .and_then(|s| s.cluster_ips.as_ref())
        .filter(|ips| !ips.is_empty())
    {
        Some(ips) => {
            for (i, ip) in ips.iter().enumerate() {
                vips.extend(cluster_ip(ip, || format!("spec.clusterIPs[{i}]"))?);
            }
        }
        None => {
            if let Some(ip) = spec.and_then(|s| s.cluster_ip.as_ref()) {
                vips.extend(cluster_ip(ip, || "spec.clusterIP".to_owned())?);
            }
        }
    }

    let mut ports = Vec::new();
    for (i, p) in spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let port = port_number(p.port).ok_or_else(|| {
            FieldError::new(
                format!("spec.ports[{i}].port"),
                format!("must be 1-65535, got {}", p.port),
            )
        })?;
        let target_port = match &p.target_port {
            None | Some(IntOrString::Int(0)) => TargetPort::Number(port),
            Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(*n).ok_or_else(|| {
                FieldError::new(
                    format!("spec.ports[{i}].targetPort"),
                    format!("must be 1-65535 or a port name, got {n}"),
                )
            })?),
            Some(IntOrString::String(s)) => TargetPort::Named(s.clone()),
        };
        ports.push(ServicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port,
            target_port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
            app_protocol: p.app_protocol.clone().filter(|a| !a.is_empty()),
        });
    }

    Ok(Service {
        name,
        namespace,
        vips,
        ports,
        selector: spec
            .and_then(|s| s.selector.as_ref())
            .map(Labels::from)
            .unwrap_or_default(),
        waypoint: None,
        ingress_use_waypoint: false,
        host: None,
        static_endpoints: Vec::new(),
        passthrough: false,
    })
}

/// The error for a captured pod on this node that file mode cannot enroll.
pub(crate) fn missing_netns(node: &str) -> FieldError {
    FieldError::new(
        format!("metadata.annotations[{NETNS_ANNOTATION}]"),
        format!(
            "missing: the pod is captured and runs on this node ({node}), and in file mode the \
             agent needs this annotation (e.g. /run/netns/NAME) to enter its network namespace"
        ),
    )
}

fn key(kind: Kind, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: kind.is_namespaced().then(|| {
            meta.namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned())
        }),
        name: meta.name.clone().unwrap_or_default(),
    }
}

fn pod_key(pod: &Pod) -> ObjectKey {
    key(Kind::Pod, &pod.metadata)
}

fn required_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<String, FieldError> {
    meta.name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| FieldError::new("metadata.name", "missing"))
}

/// `status.podIPs` (all of them) if present, else `status.podIP`.
fn pod_ips(pod: &Pod) -> Result<Vec<IpAddr>, FieldError> {
    let Some(status) = &pod.status else {
        return Ok(Vec::new());
    };
    match status.pod_ips.as_ref().filter(|ips| !ips.is_empty()) {
        Some(ips) => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| parse_ip(&ip.ip, || format!("status.podIPs[{i}].ip")))
            .collect(),
        None => match status.pod_ip.as_deref() {
            Some(ip) if !ip.is_empty() => Ok(vec![parse_ip(ip, || "status.podIP".to_owned())?]),
            _ => Ok(Vec::new()),
        },
    }
}

/// The `mesh-agent.io/netns` annotation, which must be an absolute path.
fn netns(pod: &Pod) -> Result<Option<PathBuf>, FieldError> {
    let Some(value) = pod.annotations.get(NETNS_ANNOTATION) else {
        return Ok(None);
    };
    if !Path::new(value).is_absolute() {
        return Err(FieldError::new(
            format!("metadata.annotations[{NETNS_ANNOTATION}]"),
            format!("must be an absolute path (e.g. /run/netns/NAME), got {value:?}"),
        ));
    }
    Ok(Some(PathBuf::from(value)))
}

/// The pod's own choice of DNS capture, if it makes one. As istio-cni reads it: `true` or
/// `false` (any case); another value is no choice.
fn dns_capture(pod: &Pod) -> Option<bool> {
    pod.annotations
        .get(DNS_CAPTURE_ANNOTATION)
        .and_then(|v| v.to_ascii_lowercase().parse().ok())
}

/// A cluster IP: `None` (headless) or empty gives no address.
fn cluster_ip(value: &str, field: impl FnOnce() -> String) -> Result<Option<IpAddr>, FieldError> {
    if value.is_empty() || value == "None" {
        return Ok(None);
    }
    parse_ip(value, field).map(Some)
}

fn parse_ip(value: &str, field: impl FnOnce() -> String) -> Result<IpAddr, FieldError> {
    value
        .parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| FieldError::new(field(), format!("invalid IP address {value:?}")))
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::load_str;

    #[test]
    fn ingress_use_waypoint_is_read_from_the_service_then_its_namespace() {
        let labels = |pairs: &[(&str, &str)]| -> Labels { pairs.iter().copied().collect() };
        let yes = labels(&[(INGRESS_USE_WAYPOINT_LABEL, "true")]);
        let no = labels(&[(INGRESS_USE_WAYPOINT_LABEL, "false")]);
        assert!(ingress_use_waypoint(Some(&yes), None));
        assert!(ingress_use_waypoint(None, Some(&yes)));
        assert!(
            !ingress_use_waypoint(Some(&no), Some(&yes)),
            "the service's own label wins"
        );
        assert!(!ingress_use_waypoint(Some(&labels(&[])), None));
    }

    /// Translates a YAML text with the file-mode rules on node `node-a`.
    fn state(yaml: &str) -> Result<MeshState, ConfigError> {
        translate(
            &load_str(yaml, "test.yaml")?,
            "node-a",
            NetnsSource::Annotation,
            &Settings::default(),
        )
    }

    fn namespace(name: &str, mode: Option<&str>) -> String {
        let labels = mode
            .map(|m| format!("\n  labels:\n    istio.io/dataplane-mode: {m}"))
            .unwrap_or_default();
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n---\n")
    }

    /// A running pod on node-b (so the netns rule does not interfere) with `extra` merged in.
    struct PodSpec<'a> {
        ns: &'a str,
        name: &'a str,
        mode: Option<&'a str>,
        host_network: bool,
        phase: &'a str,
        extra_meta: &'a str,
    }

    impl Default for PodSpec<'_> {
        fn default() -> Self {
            Self {
                ns: "default",
                name: "web-1",
                mode: None,
                host_network: false,
                phase: "Running",
                extra_meta: "",
            }
        }
    }

    fn pod(p: PodSpec<'_>) -> String {
        let labels = p
            .mode
            .map(|m| format!("\n  labels:\n    istio.io/dataplane-mode: {m}"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}{labels}{}\n\
             spec:\n  nodeName: node-b\n  hostNetwork: {}\n  containers: [{{name: app, image: app}}]\n\
             status:\n  phase: {}\n  podIP: 10.0.0.1\n---\n",
            p.name, p.ns, p.extra_meta, p.host_network, p.phase
        )
    }

    fn captured(yaml: &str) -> bool {
        state(yaml).unwrap().workloads[0].captured
    }

    #[test]
    fn namespace_label_ambient_captures_pod() {
        let yaml = namespace("default", Some("ambient")) + &pod(PodSpec::default());
        assert!(captured(&yaml));
    }

    #[test]
    fn pod_label_ambient_captures_in_plain_namespace() {
        let cases = [None, Some("other")];
        for ns_mode in cases {
            let yaml = namespace("default", ns_mode)
                + &pod(PodSpec {
                    mode: Some("ambient"),
                    ..Default::default()
                });
            assert!(captured(&yaml), "namespace mode {ns_mode:?}");
        }
    }

    #[test]
    fn pod_label_ambient_captures_without_namespace_object() {
        let yaml = pod(PodSpec {
            mode: Some("ambient"),
            ..Default::default()
        });
        assert!(captured(&yaml));
    }

    #[test]
    fn pod_label_none_opts_out_of_ambient_namespace() {
        let yaml = namespace("default", Some("ambient"))
            + &pod(PodSpec {
                mode: Some("none"),
                ..Default::default()
            });
        assert!(!captured(&yaml));
    }

    #[test]
    fn host_network_pod_never_captured() {
        let cases = [
            (Some("ambient"), None),
            (None, Some("ambient")),
            (Some("ambient"), Some("ambient")),
        ];
        for (ns_mode, pod_mode) in cases {
            let yaml = namespace("default", ns_mode)
                + &pod(PodSpec {
                    mode: pod_mode,
                    host_network: true,
                    ..Default::default()
                });
            let s = state(&yaml).unwrap();
            assert!(!s.workloads[0].captured, "ns {ns_mode:?} pod {pod_mode:?}");
            assert!(s.workloads[0].host_network);
        }
    }

    #[test]
    fn unlabelled_pod_in_unlabelled_namespace_not_captured() {
        let cases = [None, Some("none"), Some("sidecar")];
        for ns_mode in cases {
            let yaml = namespace("default", ns_mode) + &pod(PodSpec::default());
            assert!(!captured(&yaml), "namespace mode {ns_mode:?}");
        }
    }

    #[test]
    fn missing_namespace_object_uses_no_namespace_labels() {
        // The ambient namespace is "other", not the pod's.
        let yaml = namespace("other", Some("ambient")) + &pod(PodSpec::default());
        assert!(!captured(&yaml));
    }

    #[test]
    fn finished_pods_are_not_captured() {
        let cases = [
            ("Succeeded", false),
            ("Failed", false),
            ("Running", true),
            ("Pending", true),
        ];
        for (phase, want) in cases {
            let yaml = namespace("default", Some("ambient"))
                + &pod(PodSpec {
                    phase,
                    ..Default::default()
                });
            assert_eq!(captured(&yaml), want, "phase {phase}");
        }
    }

    #[test]
    fn terminating_pod_is_not_captured() {
        let yaml = namespace("default", Some("ambient"))
            + &pod(PodSpec {
                extra_meta: "\n  deletionTimestamp: \"2025-01-01T00:00:00Z\"",
                ..Default::default()
            });
        assert!(!captured(&yaml));
    }

    #[test]
    fn sidecar_injected_pod_is_not_captured() {
        let yaml = namespace("default", Some("ambient"))
            + &pod(PodSpec {
                extra_meta: "\n  annotations:\n    sidecar.istio.io/status: '{}'",
                ..Default::default()
            });
        assert!(!captured(&yaml));
    }

    #[test]
    fn captured_local_pod_without_netns_annotation_is_rejected_in_file_mode() {
        let yaml = namespace("default", Some("ambient")) + &pod(PodSpec::default());
        let objects = load_str(&yaml, "test.yaml").unwrap();
        let err = translate(
            &objects,
            "node-b",
            NetnsSource::Annotation,
            &Settings::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("Pod default/web-1: "), "{err}");
        assert!(err.contains("mesh-agent.io/netns"), "{err}");
        // Other nodes' pods, and kube mode, do not need it.
        assert!(
            translate(
                &objects,
                "node-a",
                NetnsSource::Annotation,
                &Settings::default()
            )
            .is_ok()
        );
        assert!(
            translate(
                &objects,
                "node-b",
                NetnsSource::Discovered,
                &Settings::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn uncaptured_local_pod_without_netns_annotation_is_accepted() {
        let yaml = pod(PodSpec::default());
        let objects = load_str(&yaml, "test.yaml").unwrap();
        assert!(
            translate(
                &objects,
                "node-b",
                NetnsSource::Annotation,
                &Settings::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn workload_fields_follow_pod_with_defaults() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  uid: 1234-abcd
  labels: {app: web, app.kubernetes.io/name: storefront, istio.io/dataplane-mode: ambient}
  annotations: {mesh-agent.io/netns: /run/netns/web-1}
spec:
  nodeName: node-a
  serviceAccountName: web-sa
  containers: [{name: app, image: app}]
status:
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: shop}
status: {podIP: "::ffff:10.0.0.2"}
---
apiVersion: v1
kind: Pod
metadata: {name: by-app, namespace: shop, labels: {app: web}}
"#;
        let s = state(yaml).unwrap();
        let by_app = &s.workloads[0];
        assert_eq!(by_app.workload_name, "web");
        let plain = &s.workloads[1];
        assert_eq!(plain.uid, "shop/plain");
        assert_eq!(plain.service_account, "default");
        assert_eq!(plain.workload_name, "plain");
        assert_eq!(plain.ips, ["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(plain.node, None);
        assert!(!plain.captured);
        let web = &s.workloads[2];
        assert_eq!(web.uid, "1234-abcd");
        assert_eq!(web.node.as_deref(), Some("node-a"));
        assert_eq!(web.service_account, "web-sa");
        assert_eq!(web.workload_name, "storefront");
        assert_eq!(
            web.ips,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(web.netns.as_deref(), Some(Path::new("/run/netns/web-1")));
        assert!(web.captured);
        assert_eq!(s.local_captured("node-a").count(), 1);
    }

    #[test]
    fn service_defaults_protocol_tcp_and_target_port_to_port() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  selector: {app: web}
  ports:
  - {port: 80}
  - {name: https, port: 443, targetPort: https, protocol: TCP}
  - {name: metrics, port: 9090, targetPort: 19090}
  - {name: dns, port: 53, protocol: UDP, targetPort: 0}
"#;
        let s = state(yaml).unwrap();
        let svc = &s.services[0];
        assert_eq!(
            svc.vips,
            [
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00:96::10".parse().unwrap()
            ]
        );
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|p| {
                (
                    p.name.as_deref(),
                    p.port,
                    p.target_port.clone(),
                    p.protocol.as_str(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                (None, 80, TargetPort::Number(80), "TCP"),
                (Some("https"), 443, TargetPort::Named("https".into()), "TCP"),
                (Some("metrics"), 9090, TargetPort::Number(19090), "TCP"),
                (Some("dns"), 53, TargetPort::Number(53), "UDP"),
            ]
        );
        assert_eq!(svc.selector.get("app"), Some("web"));
    }

    #[test]
    fn headless_service_has_no_vips() {
        let cases = [
            "clusterIP: None",
            "clusterIP: None\n  clusterIPs: [None]",
            "type: ExternalName\n  externalName: example.com",
        ];
        for spec in cases {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: shop}}\nspec:\n  {spec}\n"
            );
            assert!(state(&yaml).unwrap().services[0].vips.is_empty(), "{spec}");
        }
    }

    #[test]
    fn out_of_range_ports_are_rejected() {
        let cases = [
            ("{port: 70000}", "spec.ports[0].port"),
            ("{port: 80, targetPort: -1}", "spec.ports[0].targetPort"),
        ];
        for (port, field) in cases {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: shop}}\nspec:\n  ports: [{port}]\n"
            );
            let err = state(&yaml).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!(
                    "test.yaml: document 1 (Service shop/db): {field}: "
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn output_is_sorted_whatever_the_input_order() {
        let a = pod(PodSpec {
            ns: "b",
            name: "x",
            ..Default::default()
        }) + &pod(PodSpec {
            ns: "a",
            name: "y",
            ..Default::default()
        });
        let b = pod(PodSpec {
            ns: "a",
            name: "y",
            ..Default::default()
        }) + &pod(PodSpec {
            ns: "b",
            name: "x",
            ..Default::default()
        });
        let (a, b) = (state(&a).unwrap(), state(&b).unwrap());
        assert_eq!(a, b);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        assert_eq!(a.workloads[0].namespace, "a");
    }

    #[test]
    fn translate_reports_invalid_ip_of_unvalidated_objects_by_object() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("web-1".into());
        pod.metadata.namespace = Some("default".into());
        pod.status = Some(crate::config::pod::PodStatus {
            pod_ip: Some("10.0.0.300".into()),
            ..Default::default()
        });
        let objects = Objects {
            pods: vec![pod.into()],
            ..Default::default()
        };
        let err = translate(
            &objects,
            "node-a",
            NetnsSource::Discovered,
            &Settings::default(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "Pod default/web-1: status.podIP: invalid IP address \"10.0.0.300\""
        );
    }

    #[test]
    fn kube_system_pods_are_never_captured() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "coredns", "namespace": "kube-system",
                         "labels": {"istio.io/dataplane-mode": "ambient"}},
            "spec": {"containers": [{"name": "c"}]},
        }))
        .unwrap();
        let ambient = Labels::from([(DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT)]);
        assert!(!is_captured(&pod, Some(&ambient)));
        pod.metadata.namespace = Some("shop".into());
        assert!(is_captured(&pod, Some(&ambient)));
    }
}
