//! Decide, then execute: what a captured outbound connection will do, computed from the
//! mesh state alone, before any socket is opened. The plan names the *next hop* (the
//! destination pod's HBONE port, a waypoint's, or the destination itself) apart from the
//! *final destination* (what the CONNECT asks for: a service address through a waypoint,
//! else the pod's address), as ztunnel's outbound request does. `outbound` executes it.
//!
//! The rules, in order (Istio ambient's):
//! 1. A service address whose service is bound to a waypoint goes to that waypoint, with
//!    the service address as the CONNECT authority; the waypoint picks the endpoint.
//! 2. Otherwise a service address is load balanced here over the service's ready
//!    endpoints; a pod address is taken as it is.
//! 3. A destination that is one of the agent's own ports on a mesh address is refused.
//! 4. A pod bound to a workload waypoint is reached through it, with the pod's address as
//!    the authority.
//! 5. An enrolled pod of this node is delivered to directly; an enrolled pod of another node
//!    is reached by HBONE to its 15008; anything else is passthrough.
//!
//! Traffic a waypoint sends is never sent back to that waypoint, and a waypoint without a
//! ready pod does not exist for binding (the traffic goes direct, as in Istio).

use std::net::SocketAddr;

use mesh_common::HBONE_PORT;

use crate::{
    identity::Identity,
    lb,
    state::{MeshState, Service, Waypoint, WaypointFor, Workload},
};

/// What a captured connection will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan<'a> {
    /// An enrolled pod of this node: authorized here and delivered into its namespace.
    SameNode {
        target: SocketAddr,
        workload: &'a Workload,
        service: Option<&'a Service>,
    },
    /// Mutual-TLS HTTP/2 `CONNECT` through `hop`.
    Hbone(Hbone<'a>),
    /// Not a mesh destination: connected from the pod as it is.
    Passthrough {
        target: SocketAddr,
        workload: Option<&'a Workload>,
        service: Option<&'a Service>,
    },
}

/// An HBONE hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hbone<'a> {
    /// The next hop: the HBONE port of the destination pod or of a waypoint pod.
    pub hop: SocketAddr,
    /// The identity the next hop must prove.
    pub hop_identity: Identity,
    /// What the `CONNECT` asks for: the service address (through a service's waypoint),
    /// else the destination pod's address.
    pub authority: SocketAddr,
    /// The workload the connection is for, when this agent chose it (not when a waypoint
    /// picks the endpoint).
    pub workload: Option<&'a Workload>,
    /// The waypoint in between, if any.
    pub waypoint: Option<&'a Waypoint>,
    pub service: Option<&'a Service>,
}

/// Why a connection has no plan (it is reset).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "refusing {addr}: an agent port of a mesh address is never a destination (it would loop back into the agent)"
    )]
    SelfCall { addr: SocketAddr },
    #[error("service {service} ({vip}) has no ready endpoint")]
    NoEndpoints { service: String, vip: SocketAddr },
}

/// Where the agent of `node` sends a connection from `src` to `orig`. `pick` chooses among
/// endpoints and waypoint pods (round robin when it counts up).
pub fn plan<'a>(
    state: &'a MeshState,
    node: &str,
    trust_domain: &str,
    src: &Workload,
    orig: SocketAddr,
    pick: usize,
) -> Result<Plan<'a>, PlanError> {
    let service = state.service_by_vip(orig.ip(), orig.port());
    if let Some((svc, _)) = service
        && let Some(waypoint) =
            bound_waypoint(state, svc.waypoint.as_ref(), WaypointFor::Service, src)
    {
        return Ok(through(waypoint, orig, None, Some(svc), trust_domain, pick));
    }
    let target = match service {
        None => orig,
        Some((svc, port)) => {
            let endpoints = state.endpoints(svc, port);
            match lb::pick(endpoints, orig.ip(), pick) {
                Some(endpoint) => endpoint,
                None if svc.passthrough => orig,
                None => {
                    return Err(PlanError::NoEndpoints {
                        service: format!("{}/{}", svc.namespace, svc.name),
                        vip: orig,
                    });
                }
            }
        }
    };
    let service = service.map(|(svc, _)| svc);
    let workload = state.workload_by_ip(target.ip());
    if mesh_common::is_agent_pod_port(target.port()) && workload.is_some_and(|w| w.captured) {
        return Err(PlanError::SelfCall { addr: target });
    }
    let Some(dst) = workload.filter(|w| w.captured) else {
        return Ok(Plan::Passthrough {
            target,
            workload,
            service,
        });
    };
    if let Some(waypoint) = bound_waypoint(state, dst.waypoint.as_ref(), WaypointFor::Workload, src)
    {
        return Ok(through(
            waypoint,
            target,
            Some(dst),
            service,
            trust_domain,
            pick,
        ));
    }
    match dst.node.as_deref() {
        Some(n) if n == node => Ok(Plan::SameNode {
            target,
            workload: dst,
            service,
        }),
        Some(_) => Ok(Plan::Hbone(Hbone {
            hop: SocketAddr::new(target.ip(), HBONE_PORT),
            hop_identity: Identity::of(trust_domain, dst),
            authority: target,
            workload: Some(dst),
            waypoint: None,
            service,
        })),
        // Not scheduled anywhere: nobody would answer HBONE for it.
        None => Ok(Plan::Passthrough {
            target,
            workload: Some(dst),
            service,
        }),
    }
}

/// The waypoint `binding` names, if it serves `traffic`, has a ready pod, and `src` is not
/// one of its own pods.
fn bound_waypoint<'a>(
    state: &'a MeshState,
    binding: Option<&crate::state::WaypointRef>,
    traffic: WaypointFor,
    src: &Workload,
) -> Option<&'a Waypoint> {
    let waypoint = state.waypoint(binding?)?;
    let serves = match waypoint.traffic {
        WaypointFor::All => true,
        WaypointFor::None => false,
        kind => kind == traffic,
    };
    (serves && !waypoint.addresses.is_empty() && !waypoint.is_pod(src)).then_some(waypoint)
}

/// HBONE to a pod of `waypoint`, asking for `authority`.
fn through<'a>(
    waypoint: &'a Waypoint,
    authority: SocketAddr,
    workload: Option<&'a Workload>,
    service: Option<&'a Service>,
    trust_domain: &str,
    pick: usize,
) -> Plan<'a> {
    let pod = lb::pick_address(&waypoint.addresses, authority.ip(), pick)
        .expect("a bound waypoint has a ready pod");
    Plan::Hbone(Hbone {
        hop: SocketAddr::new(pod, HBONE_PORT),
        hop_identity: Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: waypoint.namespace.clone(),
            service_account: waypoint.service_account.clone(),
        },
        authority,
        workload,
        waypoint: Some(waypoint),
        service,
    })
}

#[cfg(test)]
mod tests {
    use crate::labels::Labels;
    use std::net::IpAddr;

    use super::*;
    use crate::state::{GATEWAY_NAME_LABEL, RawObjects, ServicePort, TargetPort, WaypointRef};

    const TD: &str = "cluster.local";

    fn pod(name: &str, ip: &str, node: Option<&str>, captured: bool) -> Workload {
        Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "shop".into(),
            node: node.map(Into::into),
            service_account: format!("sa-{name}"),
            ips: vec![ip.parse().unwrap()],
            labels: [("app", name)].into(),
            workload_name: name.into(),
            netns: None,
            captured,
            host_network: false,
            dns_capture: None,
            waypoint: None,
        }
    }

    fn bound(mut w: Workload, waypoint: &str) -> Workload {
        w.waypoint = Some(WaypointRef {
            namespace: "shop".into(),
            name: waypoint.into(),
        });
        w
    }

    fn waypoint_pod(waypoint: &str, ip: &str) -> Workload {
        let mut w = pod(&format!("{waypoint}-0"), ip, Some("n2"), false);
        w.labels.insert(GATEWAY_NAME_LABEL, waypoint);
        w
    }

    fn service(name: &str, vip: &str, app: &str, waypoint: Option<&str>) -> Service {
        Service {
            name: name.into(),
            namespace: "shop".into(),
            vips: vec![vip.parse().unwrap()],
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: TargetPort::Number(8080),
                protocol: "TCP".into(),
                app_protocol: None,
            }],
            selector: Labels::from([("app", app)]),
            waypoint: waypoint.map(|name| WaypointRef {
                namespace: "shop".into(),
                name: name.into(),
            }),
            ingress_use_waypoint: false,
            host: None,
            static_endpoints: Vec::new(),
            passthrough: false,
        }
    }

    fn waypoint(name: &str, traffic: WaypointFor, addresses: &[&str]) -> Waypoint {
        Waypoint {
            namespace: "shop".into(),
            name: name.into(),
            traffic,
            service_account: name.into(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    /// Node `n1` is this agent's. `client`, `local` on n1; `remote`, `bound-pod` (workload
    /// waypoint `wp-w`), `legacy` (not captured) on n2; `nowhere` unscheduled.
    fn state() -> MeshState {
        MeshState::new(
            vec![
                pod("client", "10.1.0.1", Some("n1"), true),
                pod("local", "10.1.0.2", Some("n1"), true),
                pod("remote", "10.2.0.1", Some("n2"), true),
                bound(pod("bound-pod", "10.2.0.2", Some("n2"), true), "wp-w"),
                bound(pod("svc-only", "10.2.0.3", Some("n2"), true), "wp-svc"),
                pod("legacy", "10.2.0.9", Some("n2"), false),
                pod("nowhere", "10.3.0.1", None, true),
                waypoint_pod("wp-svc", "10.2.0.100"),
                waypoint_pod("wp-w", "10.2.0.101"),
            ],
            vec![
                service("web", "10.96.0.1", "local", None),
                service("via-wp", "10.96.0.2", "remote", Some("wp-svc")),
                service("wp-down", "10.96.0.3", "remote", Some("wp-gone")),
                service("empty", "10.96.0.4", "nobody", None),
                service("wp-for-pods", "10.96.0.5", "remote", Some("wp-w")),
            ],
            RawObjects::default(),
        )
        .with_waypoints(vec![
            waypoint("wp-svc", WaypointFor::Service, &["10.2.0.100"]),
            waypoint("wp-w", WaypointFor::Workload, &["10.2.0.101"]),
            waypoint("wp-gone", WaypointFor::Service, &[]),
        ])
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A plan as a short string: which branch, the next hop, the authority, the identity
    /// and the waypoint.
    fn describe(plan: Result<Plan<'_>, PlanError>) -> String {
        match plan {
            Ok(Plan::SameNode {
                target, workload, ..
            }) => format!("same-node {target} {}", workload.name),
            Ok(Plan::Passthrough {
                target, workload, ..
            }) => format!(
                "passthrough {target}{}",
                workload.map_or(String::new(), |w| format!(" {}", w.name))
            ),
            Ok(Plan::Hbone(h)) => format!(
                "hbone {} as {} for {}{}",
                h.hop,
                h.hop_identity.service_account,
                h.authority,
                h.waypoint
                    .map_or(String::new(), |w| format!(" via {}", w.name))
            ),
            Err(PlanError::SelfCall { addr }) => format!("refused {addr}"),
            Err(PlanError::NoEndpoints { service, .. }) => format!("no endpoints {service}"),
        }
    }

    #[test]
    fn every_branch_of_the_plan() {
        let state = state();
        let by_name = |n: &str| {
            state
                .workloads
                .iter()
                .find(|w| w.name == n)
                .unwrap()
                .clone()
        };
        let client = by_name("client");
        let waypoint_itself = by_name("wp-svc-0");
        let cases: &[(&str, &Workload, &str, &str)] = &[
            (
                "pod of this node",
                &client,
                "10.1.0.2:8080",
                "same-node 10.1.0.2:8080 local",
            ),
            (
                "pod of another node",
                &client,
                "10.2.0.1:8080",
                "hbone 10.2.0.1:15008 as sa-remote for 10.2.0.1:8080",
            ),
            (
                "pod outside the mesh",
                &client,
                "10.2.0.9:80",
                "passthrough 10.2.0.9:80 legacy",
            ),
            (
                "address outside the cluster",
                &client,
                "192.0.2.7:443",
                "passthrough 192.0.2.7:443",
            ),
            (
                "service balanced here",
                &client,
                "10.96.0.1:80",
                "same-node 10.1.0.2:8080 local",
            ),
            (
                "service bound to a waypoint: the VIP is the authority",
                &client,
                "10.96.0.2:80",
                "hbone 10.2.0.100:15008 as wp-svc for 10.96.0.2:80 via wp-svc",
            ),
            (
                "service whose waypoint has no ready pod: direct",
                &client,
                "10.96.0.3:80",
                "hbone 10.2.0.1:15008 as sa-remote for 10.2.0.1:8080",
            ),
            (
                "traffic from the waypoint is not sent back to it",
                &waypoint_itself,
                "10.96.0.2:80",
                "hbone 10.2.0.1:15008 as sa-remote for 10.2.0.1:8080",
            ),
            (
                "service bound to a workload-only waypoint: direct",
                &client,
                "10.96.0.5:80",
                "hbone 10.2.0.1:15008 as sa-remote for 10.2.0.1:8080",
            ),
            (
                "pod bound to a workload waypoint: its address is the authority",
                &client,
                "10.2.0.2:8080",
                "hbone 10.2.0.101:15008 as wp-w for 10.2.0.2:8080 via wp-w",
            ),
            (
                "pod bound to a service-only waypoint: direct",
                &client,
                "10.2.0.3:8080",
                "hbone 10.2.0.3:15008 as sa-svc-only for 10.2.0.3:8080",
            ),
            (
                "service without endpoints",
                &client,
                "10.96.0.4:80",
                "no endpoints shop/empty",
            ),
            (
                "an agent port of a mesh pod",
                &client,
                "10.2.0.1:15006",
                "refused 10.2.0.1:15006",
            ),
            (
                "its own agent port",
                &client,
                "10.1.0.1:15001",
                "refused 10.1.0.1:15001",
            ),
            (
                "an agent port outside the mesh is just a port",
                &client,
                "10.2.0.9:15008",
                "passthrough 10.2.0.9:15008 legacy",
            ),
            (
                "a captured pod not scheduled anywhere",
                &client,
                "10.3.0.1:80",
                "passthrough 10.3.0.1:80 nowhere",
            ),
        ];
        for (what, src, orig, want) in cases {
            let got = describe(plan(&state, "n1", TD, src, addr(orig), 0));
            assert_eq!(&got, want, "{what}");
        }
    }

    #[test]
    fn endpoints_and_waypoint_pods_are_taken_in_turn() {
        let state = state();
        let mut services = state.services.clone();
        for s in services.iter_mut().filter(|s| s.name == "web") {
            s.selector = Labels::from([("tier", "web")]);
        }
        let mut workloads = state.workloads.clone();
        workloads.push(pod("local-2", "10.1.0.3", Some("n1"), true));
        for w in workloads.iter_mut().filter(|w| w.name.starts_with("local")) {
            w.labels.insert("tier", "web");
        }
        let waypoints = vec![waypoint(
            "wp-svc",
            WaypointFor::Service,
            &["10.2.0.100", "10.2.0.110"],
        )];
        let state =
            MeshState::new(workloads, services, RawObjects::default()).with_waypoints(waypoints);
        let client = state.workloads.iter().find(|w| w.name == "client").unwrap();
        let targets: Vec<String> = (0..3)
            .map(|n| describe(plan(&state, "n1", TD, client, addr("10.96.0.1:80"), n)))
            .collect();
        assert_eq!(
            targets,
            [
                "same-node 10.1.0.2:8080 local",
                "same-node 10.1.0.3:8080 local-2",
                "same-node 10.1.0.2:8080 local"
            ]
        );
        let hops: Vec<IpAddr> = (0..2)
            .map(
                |n| match plan(&state, "n1", TD, client, addr("10.96.0.2:80"), n) {
                    Ok(Plan::Hbone(h)) => h.hop.ip(),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(
            hops,
            [
                "10.2.0.100".parse::<IpAddr>().unwrap(),
                "10.2.0.110".parse().unwrap()
            ]
        );
    }
}
