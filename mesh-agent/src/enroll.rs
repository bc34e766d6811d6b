//! Enrollment of this node's ambient pods: for each captured pod, in order, open its network
//! namespace, prepare it (delivery route, `tcp_fwmark_accept`, `fwmark_reflect`), bind the 15001/15006/15008
//! listeners inside it, attach `sk_lookup`, and finally insert its netns cookie into the
//! ENROLLED map. Release runs the same steps backwards. Reconciliation compares the wanted
//! pods with what is enrolled, including what a previous agent left pinned.

pub mod discovery;
pub mod netns;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use mesh_common::{
    DELIVERY_MARK, DELIVERY_ROUTE_TABLE, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK,
};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, task::JoinHandle};

use self::netns::Netns;
use crate::{
    dns::PodResolver,
    ebpf::{Datapath, EbpfError},
    handoff::{ListenerKey, Listeners, Registration},
    identity::{Identity, tls},
    proxy::{PodContext, PodListeners, Proxy},
    state::{MeshState, Workload},
};

const LISTEN_BACKLOG: i32 = 1024;
/// The sysctls (under `net/`) set to 1 in every enrolled pod's namespace.
const POD_SYSCTLS: [(&str, &str); 3] = [
    (
        "ipv4/tcp_fwmark_accept",
        "setting net.ipv4.tcp_fwmark_accept",
    ),
    ("ipv4/fwmark_reflect", "setting net.ipv4.fwmark_reflect"),
    ("ipv6/fwmark_reflect", "setting net.ipv6.fwmark_reflect"),
];
/// Priority of the delivery-mark rule. It must come before the `local` table: the delivery
/// socket's SYN to the pod's own address must be routed by table 133 (`dev lo`), because the
/// `local` table would route it as arriving on `eth0`, and `sk_lookup` would steer it back
/// into the proxy. See docs/adr/001-inbound-delivery-routing.md.
const DELIVERY_RULE_PRIORITY: u32 = 100;
/// Where the `local` table rule moves (from priority 0) inside enrolled pods.
const LOCAL_RULE_PRIORITY: u32 = 1000;
/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u32 = 255;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {pod}: network namespace {path}: {source}")]
    Netns {
        pod: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pod {pod}: network namespace not found (file mode: no `mesh-agent.io/netns` annotation; Kubernetes mode: no process of the pod's sandbox yet)"
    )]
    NoNetns { pod: String },
    #[error("pod {pod}: finding its network namespace: {message}")]
    Discovery { pod: String, message: String },
    #[error("pod {pod}: binding {addr} inside the pod: {source}")]
    Bind {
        pod: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("pod {pod}: {what}: {source}")]
    Setup {
        pod: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("pod {pod}: delivery route: {message}")]
    Netlink { pod: String, message: String },
    #[error("pod {pod}: {source}")]
    Datapath { pod: String, source: Box<EbpfError> },
    #[error("pod {pod}: workload certificate: {source}")]
    Identity {
        pod: String,
        source: crate::identity::IdentityError,
    },
}

impl EnrollError {
    /// The pod cannot be captured *yet*: its network namespace does not exist (the sandbox
    /// is still being created). Retried without counting as a failure.
    pub fn is_not_yet(&self) -> bool {
        match self {
            EnrollError::NoNetns { .. } => true,
            EnrollError::Netns { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

/// A pod the agent captures.
struct Enrolled {
    pod: Arc<PodContext>,
    /// Its DNS goes to the resolver in its namespace.
    dns: bool,
    tasks: Vec<JoinHandle<()>>,
    /// Its listeners, offered to a successor while the pod is enrolled.
    _offered: Vec<Registration>,
}

/// What `/config_dump` shows of an enrolled pod.
#[derive(Debug, Serialize)]
pub struct EnrolledDump {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    pub listeners: Vec<String>,
}

/// Where pods' network namespaces come from and how captured pods are marked.
pub struct EnrollOptions {
    /// The host's /proc (`/host/proc` in the DaemonSet): namespace discovery and the
    /// per-namespace sysctl (writable there even when the container's /proc/sys is not).
    pub proc_root: PathBuf,
    /// In Kubernetes mode: annotates captured pods with `ambient.istio.io/redirection`.
    pub kube: Option<::kube::Client>,
    /// Capture pods' DNS unless a pod's annotation says otherwise.
    pub dns_capture: bool,
    /// Serves the DNS of the pods whose DNS is captured.
    pub resolver: Arc<crate::dns::Resolver>,
}

/// Owns every enrollment of this node.
pub struct Enroller {
    node: String,
    options: EnrollOptions,
    datapath: Arc<Mutex<Datapath>>,
    proxy: Arc<Proxy>,
    /// Where pods' listening sockets come from (a predecessor's, else bound) and are
    /// offered to a successor.
    listeners: Arc<Listeners>,
    pods: BTreeMap<String, Enrolled>,
    /// Pods that should be captured but could not be, with the reason.
    failed: BTreeMap<String, String>,
    /// Pods that cannot be captured yet (their network namespace does not exist yet), with
    /// the reason: retried, but not a failure of the agent.
    pending: BTreeMap<String, String>,
    reconciled: bool,
}

impl Enroller {
    pub fn new(
        node: String,
        options: EnrollOptions,
        datapath: Arc<Mutex<Datapath>>,
        proxy: Arc<Proxy>,
        listeners: Arc<Listeners>,
    ) -> Self {
        Enroller {
            node,
            options,
            datapath,
            proxy,
            listeners,
            pods: BTreeMap::new(),
            failed: BTreeMap::new(),
            pending: BTreeMap::new(),
            reconciled: false,
        }
    }

    /// Ready when the state was applied once and every wanted pod that can be captured is:
    /// a pod whose network namespace does not exist yet is pending, not a failure.
    pub fn ready(&self) -> bool {
        self.reconciled && self.failed.is_empty()
    }

    pub fn failures(&self) -> &BTreeMap<String, String> {
        &self.failed
    }

    /// Pods waiting for their network namespace, with the reason.
    pub fn pending(&self) -> &BTreeMap<String, String> {
        &self.pending
    }

    /// Whether some wanted pod is not captured (failed or pending): reconcile again soon.
    pub fn incomplete(&self) -> bool {
        !self.failed.is_empty() || !self.pending.is_empty()
    }

    /// Enrolls the wanted pods that are not, releases the enrolled pods that are no longer
    /// wanted (or changed namespace or addresses), and cleans up leftovers of a previous run.
    pub async fn reconcile(&mut self, state: &MeshState) {
        let wanted: BTreeMap<String, &Workload> = state
            .local_captured(&self.node)
            .map(|w| (w.uid.clone(), w))
            .collect();
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, e)| {
                wanted.get(*uid).is_none_or(|w| {
                    let netns_changed = match &w.netns {
                        Some(p) => p != e.pod.netns.path(),
                        // Discovered: stale once the sandbox process is gone.
                        None => !e.pod.netns.path().exists(),
                    };
                    netns_changed
                        || w.ips != e.pod.workload.ips
                        || w.service_account != e.pod.workload.service_account
                        || self.dns_for(w) != e.dns
                })
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in stale {
            if let Some(e) = self.pods.remove(&uid) {
                self.release(e);
            }
        }
        // Retried every second: a pod's trouble is logged when it starts or changes, not
        // on every attempt.
        let (was_failed, was_pending) = (
            std::mem::take(&mut self.failed),
            std::mem::take(&mut self.pending),
        );
        for (uid, w) in &wanted {
            if self.pods.contains_key(uid) {
                continue;
            }
            let name = format!("{}/{}", w.namespace, w.name);
            match self.enroll(w).await {
                Ok(e) => {
                    tracing::info!(pod = %e.pod.display_name(), netns_cookie = e.pod.netns_cookie, ips = ?w.ips, "pod enrolled");
                    self.annotate(w, true);
                    self.pods.insert(uid.clone(), e);
                }
                Err(err) if err.is_not_yet() => {
                    let why = err.to_string();
                    if was_pending.get(&name) != Some(&why) {
                        tracing::info!(pod = %name, "enrollment waits for the pod's network namespace: {why}");
                    }
                    self.pending.insert(name, why);
                }
                Err(err) => {
                    let why = err.to_string();
                    if was_failed.get(&name) != Some(&why) {
                        tracing::error!(error = %why, "enrollment failed; retrying every second");
                    }
                    self.failed.insert(name, why);
                }
            }
        }
        if !self.reconciled {
            self.release_leftovers();
        }
        self.reconciled = true;
    }

    /// Whether `w`'s DNS is captured: its annotation's choice, else the agent's default.
    fn dns_for(&self, w: &Workload) -> bool {
        w.dns_capture.unwrap_or(self.options.dns_capture)
    }

    async fn enroll(&self, w: &Workload) -> Result<Enrolled, EnrollError> {
        let pod = format!("{}/{}", w.namespace, w.name);
        // The pod's certificate exists before anything of it is captured.
        let identity = self.proxy.identity_of(w);
        let certs = &self.proxy.certs;
        certs
            .acquire(&identity)
            .await
            .map_err(|source| EnrollError::Identity {
                pod: pod.clone(),
                source,
            })?;
        let enrolled = self.enroll_with(w, &pod, identity.clone()).await;
        if enrolled.is_err() {
            certs.release(&identity);
        }
        enrolled
    }

    async fn enroll_with(
        &self,
        w: &Workload,
        pod: &str,
        identity: Identity,
    ) -> Result<Enrolled, EnrollError> {
        let pod = pod.to_owned();
        let dns = self.dns_for(w);
        let hbone_tls = tls::server_config(&self.proxy.certs, &identity);
        // File mode names the namespace; Kubernetes mode finds it from the pod's processes.
        let path = match &w.netns {
            Some(p) => p.clone(),
            None => discovery::find_pod_netns(&self.options.proc_root, &w.uid)
                .map_err(|e| EnrollError::Discovery {
                    pod: pod.clone(),
                    message: e.to_string(),
                })?
                .ok_or_else(|| EnrollError::NoNetns { pod: pod.clone() })?,
        };
        let ns = Netns::open(&path).map_err(|source| EnrollError::Netns {
            pod: pod.clone(),
            path: path.clone(),
            source,
        })?;

        // net sysctls apply to the namespace of the writer, whichever procfs mount is used.
        let sysctl = self.options.proc_root.join("sys/net");
        // Inside the namespace: sysctl, listeners and the netlink socket for the route.
        let inside = ns
            .run(|| -> Result<_, EnrollError> {
                let setup = |what| {
                    let pod = pod.clone();
                    move |source| EnrollError::Setup { pod, what, source }
                };
                // The application's accepted socket inherits the delivery socket's mark, so its
                // replies follow the delivery route back over `lo`; the kernel's own answers
                // (a reset from a port nobody listens on) carry the mark of what they answer,
                // so they come back too instead of leaving by `eth0` towards the client.
                for (name, what) in POD_SYSCTLS {
                    std::fs::write(sysctl.join(name), "1").map_err(setup(what))?;
                }
                let cookie = crate::sys::current_netns_cookie()
                    .map_err(setup("reading the netns cookie"))?;
                let listeners = bind_listeners(&pod, w, dns, &self.listeners, cookie)?;
                let netlink = rtnetlink::new_connection().map_err(setup("opening netlink"))?;
                Ok((listeners, cookie, netlink))
            })
            .map_err(|source| EnrollError::Netns {
                pod: pod.clone(),
                path: path.clone(),
                source,
            })??;
        let (listeners, cookie, (connection, handle, _)) = inside;
        // The netlink connection lives only while the routes are added: left running it
        // would keep its socket (and the task) for the agent's life, one per enrollment.
        let connection = tokio::spawn(connection);
        let routes = add_delivery_routes(&handle, &pod).await;
        connection.abort();
        routes?;

        let (listeners, resolver, offered) = to_tokio(&pod, listeners)?;
        {
            let dp_err = |source| EnrollError::Datapath {
                pod: pod.clone(),
                source: Box::new(source),
            };
            let mut dp = self.datapath.lock().expect("datapath lock");
            for ip in &w.ips {
                let l = listeners
                    .inbound
                    .iter()
                    .find(|l| l.local_addr().is_ok_and(|a| a.is_ipv4() == ip.is_ipv4()));
                if let Some(l) = l {
                    dp.add_inbound(*ip, l).map_err(dp_err)?;
                }
            }
            dp.attach_sk_lookup(&ns, cookie).map_err(dp_err)?;
            dp.enroll(cookie, dns).map_err(dp_err)?;
        }
        let ctx = Arc::new(PodContext {
            workload: w.clone(),
            identity,
            netns: ns,
            netns_cookie: cookie,
            hbone_tls,
        });
        let mut tasks = self.proxy.serve_pod(ctx.clone(), listeners);
        if let Some(sockets) = resolver {
            tasks.extend(self.options.resolver.serve_pod(ctx.clone(), sockets));
        }
        Ok(Enrolled {
            pod: ctx,
            dns,
            tasks,
            _offered: offered,
        })
    }

    fn release(&self, e: Enrolled) {
        let pod = e.pod.display_name();
        let mut dp = self.datapath.lock().expect("datapath lock");
        let result = dp
            .release(e.pod.netns_cookie)
            .and_then(|()| dp.detach_sk_lookup(e.pod.netns_cookie))
            .and_then(|()| {
                e.pod
                    .workload
                    .ips
                    .iter()
                    .try_for_each(|ip| dp.remove_inbound(*ip))
            });
        drop(dp);
        for t in e.tasks {
            t.abort();
        }
        self.proxy.forget_pod(&e.pod);
        self.proxy.certs.release(&e.pod.identity);
        match result {
            Ok(()) => {
                tracing::info!(pod = %pod, "pod released");
                self.annotate(&e.pod.workload, false);
            }
            Err(error) => tracing::error!(pod = %pod, %error, "releasing pod"),
        }
    }

    /// Kubernetes mode: marks the pod captured (or not), as istio-cni does.
    fn annotate(&self, w: &Workload, enabled: bool) {
        let Some(client) = self.options.kube.clone() else {
            return;
        };
        let (namespace, name) = (w.namespace.clone(), w.name.clone());
        tokio::spawn(async move {
            if let Err(error) =
                crate::config::kube::annotate_pod(&client, &namespace, &name, enabled).await
            {
                tracing::warn!(pod = %format!("{namespace}/{name}"), %error, "could not update the redirection annotation");
            }
        });
    }

    /// Releases what a previous agent captured that is not wanted any more.
    fn release_leftovers(&self) {
        let ours: BTreeSet<u64> = self.pods.values().map(|e| e.pod.netns_cookie).collect();
        let our_ips: BTreeSet<IpAddr> = self
            .pods
            .values()
            .flat_map(|e| e.pod.workload.ips.iter().copied())
            .collect();
        let mut dp = self.datapath.lock().expect("datapath lock");
        let cookies: BTreeSet<u64> = dp
            .enrolled_cookies()
            .union(&dp.pinned_sk_lookup_cookies())
            .copied()
            .collect();
        for cookie in cookies.difference(&ours) {
            tracing::info!(
                netns_cookie = cookie,
                "releasing namespace left by a previous run"
            );
            if let Err(error) = dp
                .release(*cookie)
                .and_then(|()| dp.detach_sk_lookup(*cookie))
            {
                tracing::error!(netns_cookie = cookie, %error, "releasing leftover namespace");
            }
        }
        for ip in dp.enrolled_addrs() {
            if !our_ips.contains(&ip)
                && let Err(error) = dp.remove_inbound(ip)
            {
                tracing::error!(%ip, %error, "releasing leftover address");
            }
        }
    }

    pub fn dump(&self) -> Vec<EnrolledDump> {
        self.pods
            .values()
            .map(|e| EnrolledDump {
                uid: e.pod.workload.uid.clone(),
                name: e.pod.workload.name.clone(),
                namespace: e.pod.workload.namespace.clone(),
                netns: e.pod.netns.path().to_owned(),
                netns_cookie: e.pod.netns_cookie,
                ips: e.pod.workload.ips.clone(),
                listeners: listener_addrs(&e.pod.workload, e.dns),
            })
            .collect()
    }

    /// Releases nothing: on shutdown the pinned programs keep the pods captured and failing
    /// closed until an agent comes back. Only stops the accept loops.
    pub fn shutdown(&mut self) {
        for e in std::mem::take(&mut self.pods).into_values() {
            self.proxy.forget_pod(&e.pod);
            for t in e.tasks {
                t.abort();
            }
        }
    }
}

fn listener_addrs(w: &Workload, dns: bool) -> Vec<String> {
    let mut out = vec![
        format!("127.0.0.1:{OUTBOUND_PORT}"),
        format!("[::1]:{OUTBOUND_PORT}"),
    ];
    if dns {
        out.push(format!("{} (DNS, UDP and TCP)", crate::dns::LISTEN));
    }
    for ip in &w.ips {
        out.push(SocketAddr::new(*ip, INBOUND_PORT).to_string());
        out.push(SocketAddr::new(*ip, HBONE_PORT).to_string());
    }
    out
}

/// Listeners as std sockets, in the current (pod) namespace.
struct StdListeners {
    outbound: Vec<Socket>,
    inbound: Vec<Socket>,
    hbone: Vec<Socket>,
    /// The resolver's UDP and TCP sockets, when the pod's DNS is captured.
    dns: Option<(Socket, Socket)>,
    offered: Vec<Registration>,
}

/// The pod's listeners, in its namespace (cookie `netns`), the current one: those a
/// predecessor passed where it passed them, else bound now.
fn bind_listeners(
    pod: &str,
    w: &Workload,
    dns: bool,
    listeners: &Arc<Listeners>,
    netns: u64,
) -> Result<StdListeners, EnrollError> {
    let v4 = w.ips.iter().any(IpAddr::is_ipv4);
    let v6 = w.ips.iter().any(IpAddr::is_ipv6);
    let mut offered = Vec::new();
    let mut listen = |key: ListenerKey, bind: &dyn Fn() -> std::io::Result<Socket>| {
        let listening = listeners
            .listen(key, bind)
            .map_err(|source| EnrollError::Bind {
                pod: pod.to_owned(),
                addr: key.addr,
                source,
            })?;
        offered.push(listening.registration);
        Ok::<_, EnrollError>(listening.socket)
    };
    let mut bind = |addr: SocketAddr| listen(ListenerKey::tcp(netns, addr), &|| bind_one(addr));
    let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let mut l = StdListeners {
        outbound: Vec::new(),
        inbound: Vec::new(),
        hbone: Vec::new(),
        dns: None,
        offered: Vec::new(),
    };
    // Outbound on loopback of both families: connect4/6 rewrite to 127.0.0.1 / ::1.
    l.outbound.push(bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        OUTBOUND_PORT,
    ))?);
    l.outbound.push(bind(SocketAddr::new(
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        OUTBOUND_PORT,
    ))?);
    for (present, any) in [(v4, any4), (v6, any6)] {
        if present {
            l.inbound.push(bind(SocketAddr::new(any, INBOUND_PORT))?);
            l.hbone.push(bind(SocketAddr::new(any, HBONE_PORT))?);
        }
    }
    if dns {
        let at = crate::dns::LISTEN;
        let udp = listen(ListenerKey::udp(netns, at), &crate::dns::bind_udp)?;
        let tcp = listen(ListenerKey::tcp(netns, at), &crate::dns::bind_tcp)?;
        l.dns = Some((udp, tcp));
    }
    l.offered = offered;
    Ok(l)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<Socket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_mark(PROXY_MARK)?;
    s.bind(&addr.into())?;
    s.listen(LISTEN_BACKLOG)?;
    Ok(s)
}

type TokioListeners = (PodListeners, Option<PodResolver>, Vec<Registration>);

fn to_tokio(pod: &str, l: StdListeners) -> Result<TokioListeners, EnrollError> {
    let setup = |source| EnrollError::Setup {
        pod: pod.to_owned(),
        what: "registering listener",
        source,
    };
    let conv = |v: Vec<Socket>| -> Result<Vec<TcpListener>, EnrollError> {
        v.into_iter()
            .map(|s| TcpListener::from_std(s.into()).map_err(setup))
            .collect()
    };
    let listeners = PodListeners {
        outbound: conv(l.outbound)?,
        inbound: conv(l.inbound)?,
        hbone: conv(l.hbone)?,
    };
    let resolver = match l.dns {
        Some((udp, tcp)) => Some(PodResolver {
            udp: tokio::net::UdpSocket::from_std(udp.into()).map_err(setup)?,
            tcp: TcpListener::from_std(tcp.into()).map_err(setup)?,
        }),
        None => None,
    };
    Ok((listeners, resolver, l.offered))
}

/// `ip rule add pref 100 fwmark DELIVERY_MARK lookup 133`, `ip route add local default dev lo
/// table 133`, and the `local` table rule moved from priority 0 to 1000, for both families,
/// idempotently.
async fn add_delivery_routes(handle: &rtnetlink::Handle, pod: &str) -> Result<(), EnrollError> {
    use rtnetlink::{
        RouteMessageBuilder,
        packet_route::{
            route::{RouteScope, RouteType},
            rule::RuleAction,
        },
    };
    let nl = |e: rtnetlink::Error| EnrollError::Netlink {
        pod: pod.to_owned(),
        message: e.to_string(),
    };
    let exists = |r: Result<(), rtnetlink::Error>| match r {
        Err(rtnetlink::Error::NetlinkError(ref m)) if m.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    };
    const LO: u32 = 1;
    let rule = handle
        .rule()
        .add()
        .fw_mark(DELIVERY_MARK)
        .table_id(DELIVERY_ROUTE_TABLE)
        .priority(DELIVERY_RULE_PRIORITY)
        .action(RuleAction::ToTable);
    exists(rule.clone().v4().execute().await).map_err(nl)?;
    exists(rule.v6().execute().await).map_err(nl)?;
    let v4 = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(LO)
        .table_id(DELIVERY_ROUTE_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .build();
    exists(handle.route().add(v4).execute().await).map_err(nl)?;
    let v6 = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
        .output_interface(LO)
        .table_id(DELIVERY_ROUTE_TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .build();
    exists(handle.route().add(v6).execute().await).map_err(nl)?;
    for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
        move_local_rule(handle, version).await.map_err(nl)?;
    }
    Ok(())
}

/// Moves the `local` table lookup from priority 0 to [`LOCAL_RULE_PRIORITY`], adding the new
/// rule before removing the old so local delivery never stops.
async fn move_local_rule(
    handle: &rtnetlink::Handle,
    version: rtnetlink::IpVersion,
) -> Result<(), rtnetlink::Error> {
    use futures::TryStreamExt as _;
    use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
    let rules: Vec<RuleMessage> = handle
        .rule()
        .get(version.clone())
        .execute()
        .try_collect()
        .await?;
    let priority = |r: &RuleMessage| {
        r.attributes
            .iter()
            .find_map(|a| {
                if let RuleAttribute::Priority(p) = a {
                    Some(*p)
                } else {
                    None
                }
            })
            .unwrap_or(0)
    };
    let table = |r: &RuleMessage| {
        r.attributes
            .iter()
            .find_map(|a| {
                if let RuleAttribute::Table(t) = a {
                    Some(*t)
                } else {
                    None
                }
            })
            .unwrap_or(u32::from(r.header.table))
    };
    let Some(at_zero) = rules
        .iter()
        .find(|r| table(r) == RT_TABLE_LOCAL && priority(r) == 0)
    else {
        return Ok(());
    };
    if !rules
        .iter()
        .any(|r| table(r) == RT_TABLE_LOCAL && priority(r) == LOCAL_RULE_PRIORITY)
    {
        let add = handle
            .rule()
            .add()
            .table_id(RT_TABLE_LOCAL)
            .priority(LOCAL_RULE_PRIORITY)
            .action(RuleAction::ToTable);
        match version {
            rtnetlink::IpVersion::V4 => add.v4().execute().await?,
            rtnetlink::IpVersion::V6 => add.v6().execute().await?,
        }
    }
    handle.rule().del(at_zero.clone()).execute().await
}
