//! Service load balancing: the ready endpoints of every service port, computed once per
//! configuration state from its EndpointSlices (or, when a configuration has none for the
//! service, from the pods its selector picks), and round-robin selection among them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::EndpointSlice;

use crate::state::{Service, ServicePort, TargetPort, Workload};

/// The label EndpointSlices carry to name their service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The ready endpoints of every TCP port of every service, by (index in `services`, port),
/// each list sorted, IPv4-mapped addresses as IPv4.
///
/// EndpointSlices decide when any exist for the service: an endpoint is ready unless its
/// `conditions.ready` is `false` (Kubernetes: unset means ready), and its port is the slice
/// port named like the service port. Without slices (a file configuration that lists only
/// pods and services), the captured or not pods the selector picks are the endpoints, on
/// the numeric target port; a named target port cannot be resolved without container
/// ports, so such pods are skipped.
pub fn index(
    services: &[Service],
    workloads: &[Workload],
    slices: &[Arc<EndpointSlice>],
) -> HashMap<(usize, u16), Vec<SocketAddr>> {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        if let Some(service) = slice.labels.get(SERVICE_NAME_LABEL) {
            by_service
                .entry((namespace, service))
                .or_default()
                .push(slice);
        }
    }
    let mut index = HashMap::new();
    for (i, service) in services.iter().enumerate() {
        let slices = by_service.get(&(service.namespace.as_str(), service.name.as_str()));
        for port in service.ports.iter().filter(|p| p.protocol == "TCP") {
            let mut ready: Vec<SocketAddr> = match slices {
                Some(slices) => slices.iter().flat_map(|s| from_slice(s, port)).collect(),
                None if !service.static_endpoints.is_empty() => from_static(service, port),
                None => from_selector(workloads, service, port),
            };
            ready.sort();
            ready.dedup();
            index.insert((i, port.port), ready);
        }
    }
    index
}

fn from_slice(slice: &EndpointSlice, port: &ServicePort) -> Vec<SocketAddr> {
    let wanted = port.name.as_deref().unwrap_or("");
    let Some(number) = slice
        .ports
        .iter()
        .flatten()
        .find_map(|p| (p.name.as_deref().unwrap_or("") == wanted).then_some(p.port?))
    else {
        return Vec::new();
    };
    let Ok(number) = u16::try_from(number) else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| &e.addresses)
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip.to_canonical(), number))
        .collect()
}

/// A ServiceEntry's endpoints by address: the endpoint's own number for the port's name,
/// else the port's target.
fn from_static(service: &Service, port: &ServicePort) -> Vec<SocketAddr> {
    let TargetPort::Number(target) = port.target_port else {
        return Vec::new();
    };
    service
        .static_endpoints
        .iter()
        .map(|e| {
            let number = port
                .name
                .as_ref()
                .and_then(|n| e.ports.get(n))
                .copied()
                .unwrap_or(target);
            SocketAddr::new(e.addr, number)
        })
        .collect()
}

fn from_selector(workloads: &[Workload], service: &Service, port: &ServicePort) -> Vec<SocketAddr> {
    let TargetPort::Number(target) = port.target_port else {
        return Vec::new();
    };
    workloads
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
    pick_by(endpoints, vip, n, |e| e.is_ipv4())
}

/// [`pick`] over plain addresses (a waypoint's pods).
pub fn pick_address(addresses: &[IpAddr], dst: IpAddr, n: usize) -> Option<IpAddr> {
    pick_by(addresses, dst, n, |a| a.is_ipv4())
}

fn pick_by<T: Copy>(items: &[T], dst: IpAddr, n: usize, v4: impl Fn(&T) -> bool) -> Option<T> {
    let same = items.iter().filter(|i| v4(i) == dst.is_ipv4()).count();
    if same == 0 {
        return items.get(n % items.len().max(1)).copied();
    }
    items
        .iter()
        .filter(|i| v4(i) == dst.is_ipv4())
        .nth(n % same)
        .copied()
}

#[cfg(test)]
mod tests {
    use crate::labels::Labels;

    use super::*;

    fn workload(name: &str, ip: &str, app: &str) -> Workload {
        Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "shop".into(),
            node: Some("n1".into()),
            service_account: "default".into(),
            ips: vec![ip.parse().unwrap()],
            labels: [("app", app)].into(),
            workload_name: name.into(),
            netns: None,
            captured: true,
            host_network: false,
            dns_capture: None,
            waypoint: None,
        }
    }

    fn service(name: &str, target: TargetPort) -> Service {
        Service {
            name: name.into(),
            namespace: "shop".into(),
            vips: vec!["10.96.0.1".parse().unwrap()],
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: target,
                protocol: "TCP".into(),
                app_protocol: None,
            }],
            selector: Labels::from([("app", "web")]),
            waypoint: None,
            ingress_use_waypoint: false,
            host: None,
            static_endpoints: Vec::new(),
            passthrough: false,
        }
    }

    fn slice(endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        let eps: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(ip, ready)| match ready {
                Some(r) => serde_json::json!({"addresses": [ip], "conditions": {"ready": r}}),
                None => serde_json::json!({"addresses": [ip]}),
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": eps,
        }))
        .unwrap()
    }

    fn workloads() -> Vec<Workload> {
        vec![
            workload("a", "10.0.0.1", "web"),
            workload("b", "10.0.0.2", "web"),
            workload("z", "10.0.0.9", "db"),
        ]
    }

    fn ready(svc: Service, slices: &[EndpointSlice]) -> Vec<SocketAddr> {
        let slices: Vec<Arc<EndpointSlice>> = slices.iter().cloned().map(Arc::new).collect();
        index(&[svc], &workloads(), &slices)
            .remove(&(0, 80))
            .unwrap_or_default()
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn endpoint_slices_decide_and_unready_endpoints_are_skipped() {
        let got = ready(
            service("web", TargetPort::Number(9999)),
            &[slice(&[
                ("10.0.0.1", Some(true)),
                ("10.0.0.2", Some(false)),
                ("10.0.0.3", None),
            ])],
        );
        assert_eq!(got, addrs(&["10.0.0.1:8080", "10.0.0.3:8080"]));
    }

    #[test]
    fn slices_of_other_services_are_ignored() {
        let mut svc = service("other", TargetPort::Number(8080));
        svc.selector = Labels::new();
        assert!(ready(svc, &[slice(&[("10.0.0.1", Some(true))])]).is_empty());
    }

    #[test]
    fn without_slices_selected_pods_on_the_numeric_target_port_are_endpoints() {
        let got = ready(service("web", TargetPort::Number(8080)), &[]);
        assert_eq!(got, addrs(&["10.0.0.1:8080", "10.0.0.2:8080"]));
    }

    #[test]
    fn without_slices_a_named_target_port_yields_no_endpoint() {
        assert!(ready(service("web", TargetPort::Named("http".into())), &[]).is_empty());
    }

    #[test]
    fn round_robin_spreads_over_the_callers_family_first() {
        let eps = addrs(&["10.0.0.1:80", "10.0.0.2:80", "[fd00::1]:80"]);
        let v4: IpAddr = "10.96.0.1".parse().unwrap();
        let picks: Vec<_> = (0..4).map(|n| pick(&eps, v4, n).unwrap()).collect();
        assert_eq!(picks, [eps[0], eps[1], eps[0], eps[1]]);
        let v6: IpAddr = "fd00:96::1".parse().unwrap();
        assert_eq!(pick(&eps, v6, 7), Some(eps[2]));
        assert_eq!(pick(&[], v4, 0), None);
        let pods: Vec<IpAddr> = vec!["fd00::1".parse().unwrap()];
        assert_eq!(
            pick_address(&pods, v4, 3),
            Some(pods[0]),
            "the other family when alone"
        );
    }
}
