//! Service load balancing: the ready endpoints of a service port, from its EndpointSlices
//! (or, when a configuration has none for the service, from the pods its selector picks),
//! and round-robin selection among them. Pure: plain values in, plain values out.

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use crate::state::{MeshState, Service, ServicePort, TargetPort};

/// The label EndpointSlices carry to name their service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Ready endpoints of `service`'s `port`, sorted, IPv4-mapped addresses as IPv4.
///
/// EndpointSlices decide when any exist for the service: an endpoint is ready unless its
/// `conditions.ready` is `false` (Kubernetes: unset means ready), and its port is the slice
/// port named like the service port. Without slices (a file configuration that lists only
/// pods and services), the captured or not pods the selector picks are the endpoints, on
/// the numeric target port; a named target port cannot be resolved without container
/// ports, so such pods are skipped.
pub fn ready_endpoints(
    state: &MeshState,
    service: &Service,
    port: &ServicePort,
) -> Vec<SocketAddr> {
    let slices: Vec<&Value> = state
        .raw
        .endpoint_slices
        .iter()
        .filter(|s| {
            s.pointer("/metadata/namespace").and_then(Value::as_str)
                == Some(service.namespace.as_str())
                && s.pointer(&format!(
                    "/metadata/labels/{}",
                    SERVICE_NAME_LABEL.replace('/', "~1")
                ))
                .and_then(Value::as_str)
                    == Some(service.name.as_str())
        })
        .collect();
    let mut out: Vec<SocketAddr> = if slices.is_empty() {
        from_selector(state, service, port)
    } else {
        slices
            .into_iter()
            .flat_map(|s| from_slice(s, port))
            .collect()
    };
    out.sort();
    out.dedup();
    out
}

fn from_slice(slice: &Value, port: &ServicePort) -> Vec<SocketAddr> {
    let wanted = port.name.as_deref().unwrap_or("");
    let Some(number) = slice
        .get("ports")
        .and_then(Value::as_array)
        .and_then(|ports| {
            ports.iter().find_map(|p| {
                let name = p.get("name").and_then(Value::as_str).unwrap_or("");
                (name == wanted)
                    .then(|| p.get("port").and_then(Value::as_u64))
                    .flatten()
            })
        })
    else {
        return Vec::new();
    };
    let Ok(number) = u16::try_from(number) else {
        return Vec::new();
    };
    let endpoints = slice
        .get("endpoints")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    endpoints
        .iter()
        .filter(|e| e.pointer("/conditions/ready").and_then(Value::as_bool) != Some(false))
        .flat_map(|e| {
            e.get("addresses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|a| a.as_str()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip.to_canonical(), number))
        .collect()
}

fn from_selector(state: &MeshState, service: &Service, port: &ServicePort) -> Vec<SocketAddr> {
    let TargetPort::Number(target) = port.target_port else {
        return Vec::new();
    };
    state
        .workloads
        .iter()
        .filter(|w| {
            w.namespace == service.namespace && !w.host_network && service.selects(&w.labels)
        })
        .flat_map(|w| w.ips.iter().map(move |ip| SocketAddr::new(*ip, target)))
        .collect()
}

/// Picks the `n`-th ready endpoint of the family of `vip` (round robin when `n` counts up),
/// falling back to the other family when the service has none of the caller's.
pub fn pick(endpoints: &[SocketAddr], vip: IpAddr, n: usize) -> Option<SocketAddr> {
    let same: Vec<&SocketAddr> = endpoints
        .iter()
        .filter(|e| e.is_ipv4() == vip.is_ipv4())
        .collect();
    if same.is_empty() {
        return endpoints.get(n % endpoints.len().max(1)).copied();
    }
    Some(*same[n % same.len()])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::{RawObjects, Workload};

    fn workload(name: &str, ip: &str, app: &str) -> Workload {
        Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "shop".into(),
            node: Some("n1".into()),
            service_account: "default".into(),
            ips: vec![ip.parse().unwrap()],
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            workload_name: name.into(),
            netns: None,
            captured: true,
            host_network: false,
        }
    }

    fn service(target: TargetPort) -> (Service, ServicePort) {
        let port = ServicePort {
            name: Some("http".into()),
            port: 80,
            target_port: target,
            protocol: "TCP".into(),
        };
        let svc = Service {
            name: "web".into(),
            namespace: "shop".into(),
            vips: vec!["10.96.0.1".parse().unwrap()],
            ports: vec![port.clone()],
            selector: BTreeMap::from([("app".to_string(), "web".to_string())]),
        };
        (svc, port)
    }

    fn slice(endpoints: &[(&str, Option<bool>)]) -> Value {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|(ip, ready)| match ready {
                Some(r) => serde_json::json!({"addresses": [ip], "conditions": {"ready": r}}),
                None => serde_json::json!({"addresses": [ip]}),
            })
            .collect();
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": eps,
        })
    }

    fn state(slices: Vec<Value>) -> MeshState {
        let workloads = vec![
            workload("a", "10.0.0.1", "web"),
            workload("b", "10.0.0.2", "web"),
            workload("z", "10.0.0.9", "db"),
        ];
        MeshState::new(
            workloads,
            Vec::new(),
            RawObjects {
                endpoint_slices: slices,
                ..RawObjects::default()
            },
        )
    }

    #[test]
    fn endpoint_slices_decide_and_unready_endpoints_are_skipped() {
        let (svc, port) = service(TargetPort::Number(9999));
        let s = state(vec![slice(&[
            ("10.0.0.1", Some(true)),
            ("10.0.0.2", Some(false)),
            ("10.0.0.3", None),
        ])]);
        let got = ready_endpoints(&s, &svc, &port);
        assert_eq!(
            got,
            [
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.3:8080".parse().unwrap()
            ]
        );
    }

    #[test]
    fn slices_of_other_services_are_ignored() {
        let (mut svc, port) = service(TargetPort::Number(8080));
        svc.name = "other".into();
        svc.selector.clear();
        let s = state(vec![slice(&[("10.0.0.1", Some(true))])]);
        assert!(ready_endpoints(&s, &svc, &port).is_empty());
    }

    #[test]
    fn without_slices_selected_pods_on_the_numeric_target_port_are_endpoints() {
        let (svc, port) = service(TargetPort::Number(8080));
        let got = ready_endpoints(&state(Vec::new()), &svc, &port);
        assert_eq!(
            got,
            [
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.2:8080".parse().unwrap()
            ]
        );
    }

    #[test]
    fn without_slices_a_named_target_port_yields_no_endpoint() {
        let (svc, port) = service(TargetPort::Named("http".into()));
        assert!(ready_endpoints(&state(Vec::new()), &svc, &port).is_empty());
    }

    #[test]
    fn round_robin_spreads_over_the_callers_family_first() {
        let eps: Vec<SocketAddr> = ["10.0.0.1:80", "10.0.0.2:80", "[fd00::1]:80"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let v4: IpAddr = "10.96.0.1".parse().unwrap();
        let picks: Vec<_> = (0..4).map(|n| pick(&eps, v4, n).unwrap()).collect();
        assert_eq!(picks, [eps[0], eps[1], eps[0], eps[1]]);
        let v6: IpAddr = "fd00:96::1".parse().unwrap();
        assert_eq!(pick(&eps, v6, 7), Some(eps[2]));
        assert_eq!(pick(&[], v4, 0), None);
    }
}
