//! The agent's side of the kernel programs: loads the embedded eBPF object, pins maps and
//! links under bpffs, adopts what a previous agent pinned (swapping in the new programs in
//! place instead of attaching a second copy), and wraps the maps the agent writes.
//!
//! Pin layout under the pin directory (default `/sys/fs/bpf/mesh-agent`):
//! `maps/<MAP NAME>`, `links/cgroup-<program>`, `links/sk_lookup-<netns cookie>`.

pub mod btf;
pub mod sockmap;

use std::{
    collections::BTreeSet,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::sys;
pub use crate::sys::AttachType;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData, SockHash},
    programs::{CgroupSockAddr, SkLookup, SkMsg, SockOps},
};
use mesh_common::{
    AF_INET, AF_INET6, AddrKey, DnsSlot, EnrolledNetns, OrigDst, OrigKey, maps, programs,
};
pub use sockmap::Sockmap;

/// The eBPF object built by `build.rs` from `mesh-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mesh-agent";
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Cgroup programs and the kernel attach point of each.
pub const CGROUP_PROGRAMS: [(&str, AttachType); 9] = [
    (programs::CONNECT4, AttachType::Connect4),
    (programs::CONNECT6, AttachType::Connect6),
    (programs::GETPEERNAME4, AttachType::GetPeerName4),
    (programs::GETPEERNAME6, AttachType::GetPeerName6),
    (programs::SENDMSG4, AttachType::UdpSendmsg4),
    (programs::SENDMSG6, AttachType::UdpSendmsg6),
    (programs::RECVMSG4, AttachType::UdpRecvmsg4),
    (programs::RECVMSG6, AttachType::UdpRecvmsg6),
    (programs::SOCKOPS, AttachType::SockOps),
];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "the agent was built without its eBPF programs (AYA_BUILD_SKIP); rebuild with bpf-linker installed"
    )]
    NoObject,
    #[error("bpffs: {what} {path}: {source}")]
    Bpffs {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("loading eBPF programs (root or CAP_BPF+CAP_NET_ADMIN needed): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{what} for {name}: {source}")]
    Link {
        what: &'static str,
        name: String,
        source: io::Error,
    },
}

/// Everything the agent holds in the kernel. One owner for the life of the process.
pub struct Datapath {
    pin_dir: PathBuf,
    /// Owns the loaded programs (the maps are taken out of it).
    ebpf: Ebpf,
    enrolled: BpfHashMap<MapData, u64, EnrolledNetns>,
    orig_dst: Arc<OrigDstMap>,
    dns_servers: Arc<DnsServers>,
    listeners: SockHash<MapData, AddrKey>,
    enrolled_addrs: BpfHashMap<MapData, AddrKey, u32>,
    /// cgroup ids of the node's kubelet: its probes to enrolled pods bypass the proxy.
    probers: BpfHashMap<MapData, u64, u32>,
    /// The `sk_msg` redirect of same-node connections, when asked for and accepted.
    sockmap: Option<Arc<Sockmap>>,
    /// Open descriptors of every link, so a crash-free shutdown keeps them pinned only.
    _cgroup_links: Vec<OwnedFd>,
}

impl Datapath {
    /// Loads the programs, reuses pinned maps, and attaches (or updates in place) the
    /// cgroup programs on `cgroup`. With `sockmap`, the kernel moves the bytes of the
    /// loopback legs of connections, and of same-node connections past the agent (see
    /// [`Sockmap`]; ADR 006, 016).
    pub fn install(pin_dir: &Path, cgroup: &Path, sockmap: bool) -> Result<Self, EbpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(EbpfError::NoObject);
        }
        ensure_bpffs(pin_dir)?;
        let map_dir = pin_dir.join("maps");
        let link_dir = pin_dir.join("links");
        for dir in [&map_dir, &link_dir] {
            fs::create_dir_all(dir).map_err(|source| EbpfError::Bpffs {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
        }
        // The verdict bounds what it queues on a receiver by reading the kernel's own
        // structures: without their layout, no redirect.
        let offsets = if sockmap {
            btf::kernel_offsets()
                .inspect_err(|e| tracing::warn!(error = %e, "sockmap redirect unavailable (the kernel's socket layout is unknown); connections take TCP over loopback"))
                .ok()
        } else {
            None
        };
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&map_dir);
        if let Some(offsets) = &offsets {
            loader.override_global(mesh_common::KERNEL_OFFSETS, offsets, true);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        let cgroup_dir = fs::File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        let mut cgroup_links = Vec::new();
        for (name, ty) in CGROUP_PROGRAMS {
            let program = ebpf.program_mut(name).ok_or(EbpfError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
            let perr = |source| EbpfError::Program { name, source };
            let prog_fd = if ty == AttachType::SockOps {
                let p: &mut SockOps = program.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
                p.fd().map_err(perr)?.as_fd()
            } else {
                let p: &mut CgroupSockAddr = program.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
                p.fd().map_err(perr)?.as_fd()
            };
            let pin = link_dir.join(format!("cgroup-{name}"));
            let link = attach_or_update(&pin, prog_fd, cgroup_dir.as_fd(), ty, name)?;
            cgroup_links.push(link);
        }

        let sk_lookup: &mut SkLookup = program_mut(&mut ebpf, programs::SK_LOOKUP)?;
        sk_lookup.load().map_err(|source| EbpfError::Program {
            name: programs::SK_LOOKUP,
            source,
        })?;

        let enrolled = take_map(&mut ebpf, maps::ENROLLED)?;
        let orig_dst = Arc::new(OrigDstMap(take_map_data(&mut ebpf, maps::ORIG_DST)?));
        let dns_servers = Arc::new(DnsServers(take_map_data(&mut ebpf, maps::DNS_UPSTREAM)?));
        let listeners = take_map(&mut ebpf, maps::INBOUND_LISTENERS)?;
        let enrolled_addrs = take_map(&mut ebpf, maps::ENROLLED_ADDRS)?;
        let probers = take_map(&mut ebpf, maps::PROBERS)?;
        let sockmap = if offsets.is_some() {
            match install_sockmap(&mut ebpf) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    tracing::warn!(error = %e, "sockmap redirect unavailable; connections take TCP over loopback");
                    None
                }
            }
        } else {
            None
        };
        let datapath = Datapath {
            pin_dir: pin_dir.to_owned(),
            ebpf,
            enrolled,
            orig_dst,
            dns_servers,
            listeners,
            enrolled_addrs,
            probers,
            sockmap,
            _cgroup_links: cgroup_links,
        };
        datapath.update_pinned_sk_lookup_links()?;
        Ok(datapath)
    }

    /// The `sk_msg` redirect of same-node connections, when asked for and accepted.
    pub fn sockmap(&self) -> Option<Arc<Sockmap>> {
        self.sockmap.clone()
    }

    fn sk_lookup_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>, EbpfError> {
        let name = programs::SK_LOOKUP;
        let program: &SkLookup = self
            .ebpf
            .program(name)
            .ok_or(EbpfError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| EbpfError::Program { name, source })?;
        Ok(program
            .fd()
            .map_err(|source| EbpfError::Program { name, source })?
            .as_fd())
    }

    fn sk_lookup_pin(&self, netns_cookie: u64) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("sk_lookup-{netns_cookie}"))
    }

    /// A previous agent's per-pod `sk_lookup` links now run this agent's program.
    fn update_pinned_sk_lookup_links(&self) -> Result<(), EbpfError> {
        let prog = self.sk_lookup_fd()?;
        for cookie in self.pinned_sk_lookup_cookies() {
            let pin = self.sk_lookup_pin(cookie);
            let updated = sys::obj_get(&pin).and_then(|link| sys::link_update(link.as_fd(), prog));
            if let Err(e) = updated {
                // The namespace went away while no agent was running: the link is defunct.
                tracing::info!(netns_cookie = cookie, error = %e, "dropping stale sk_lookup link");
                let _ = fs::remove_file(&pin);
            }
        }
        Ok(())
    }

    /// netns cookies of the pods whose `sk_lookup` link is pinned.
    pub fn pinned_sk_lookup_cookies(&self) -> BTreeSet<u64> {
        let Ok(entries) = fs::read_dir(self.pin_dir.join("links")) else {
            return BTreeSet::new();
        };
        entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("sk_lookup-")?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// netns cookies present in the ENROLLED map (captured pods, possibly of a previous run).
    pub fn enrolled_cookies(&self) -> BTreeSet<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Steers inbound connections of the namespace `netns` to its pod's listeners: attaches
    /// the `sk_lookup` program unless a pinned link for it already exists.
    pub fn attach_sk_lookup(&self, netns: &impl AsFd, netns_cookie: u64) -> Result<(), EbpfError> {
        let pin = self.sk_lookup_pin(netns_cookie);
        if pin.exists() {
            return Ok(());
        }
        let name = format!("sk_lookup of netns {netns_cookie}");
        let link = sys::link_create(self.sk_lookup_fd()?, netns.as_fd(), AttachType::SkLookup)
            .map_err(|source| EbpfError::Link {
                what: "attaching",
                name: name.clone(),
                source,
            })?;
        sys::obj_pin(link.as_fd(), &pin).map_err(|source| EbpfError::Link {
            what: "pinning",
            name,
            source,
        })
    }

    /// Removes the `sk_lookup` link of a namespace.
    pub fn detach_sk_lookup(&self, netns_cookie: u64) -> Result<(), EbpfError> {
        detach_pinned_link(&self.sk_lookup_pin(netns_cookie))
    }

    /// Registers the inbound listener serving `addr` and marks the address enrolled, so
    /// that connections to it fail closed whenever the listener is gone.
    pub fn add_inbound(
        &mut self,
        addr: IpAddr,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<(), EbpfError> {
        let key = addr_key(addr);
        let name = maps::INBOUND_LISTENERS;
        self.listeners
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(|source| EbpfError::Map { name, source })?;
        self.enrolled_addrs
            .insert(key, 1, 0)
            .map_err(|source| EbpfError::Map {
                name: maps::ENROLLED_ADDRS,
                source,
            })
    }

    /// Forgets a pod address: inbound traffic to it is no longer steered.
    pub fn remove_inbound(&mut self, addr: IpAddr) -> Result<(), EbpfError> {
        let key = addr_key(addr);
        ignore_missing(self.enrolled_addrs.remove(&key), maps::ENROLLED_ADDRS)?;
        ignore_missing(self.listeners.remove(&key), maps::INBOUND_LISTENERS)
    }

    /// Addresses currently marked enrolled (possibly by a previous run).
    pub fn enrolled_addrs(&self) -> Vec<IpAddr> {
        self.enrolled_addrs
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| key_addr(&k))
            .collect()
    }

    /// Makes the processes of these cgroups the node's probers (the kubelet): their
    /// connections to enrolled pods reach the application without the proxy. Replaces what
    /// a previous agent set.
    pub fn set_probers(&mut self, cgroup_ids: &[u64]) -> Result<(), EbpfError> {
        let name = maps::PROBERS;
        let stale: Vec<u64> = self.probers.keys().filter_map(Result::ok).collect();
        for id in stale.iter().filter(|id| !cgroup_ids.contains(id)) {
            ignore_missing(self.probers.remove(id), name)?;
        }
        for id in cgroup_ids {
            self.probers
                .insert(id, 1, 0)
                .map_err(|source| EbpfError::Map { name, source })?;
        }
        Ok(())
    }

    /// Starts capturing the outbound connections of a namespace, and its DNS if `dns`.
    pub fn enroll(&mut self, netns_cookie: u64, dns: bool) -> Result<(), EbpfError> {
        let flags = EnrolledNetns::CAPTURED | if dns { EnrolledNetns::DNS } else { 0 };
        self.enrolled
            .insert(netns_cookie, EnrolledNetns { flags, _pad: 0 }, 0)
            .map_err(|source| EbpfError::Map {
                name: maps::ENROLLED,
                source,
            })
    }

    /// Stops capturing the outbound connections of a namespace.
    pub fn release(&mut self, netns_cookie: u64) -> Result<(), EbpfError> {
        ignore_missing(self.enrolled.remove(&netns_cookie), maps::ENROLLED)
    }

    /// The map of original destinations, for the proxy to read without this object's lock.
    pub fn orig_dst(&self) -> Arc<OrigDstMap> {
        self.orig_dst.clone()
    }

    /// The DNS servers behind the resolver's slots, for the resolver to read.
    pub fn dns_servers(&self) -> Arc<DnsServers> {
        self.dns_servers.clone()
    }
}

/// The DNS servers enrolled namespaces asked, by the slot (`127.<slot>:15053`) the kernel
/// sent their queries to instead ([`DnsSlot`]).
pub struct DnsServers(MapData);

impl DnsServers {
    /// The server a query of namespace `netns_cookie` that arrived on `local` was sent to.
    pub fn server(&self, netns_cookie: u64, local: Ipv4Addr) -> Option<SocketAddr> {
        let slot = DnsSlot::of_ip4(u32::from_ne_bytes(local.octets()))?;
        let key = DnsSlot {
            netns_cookie,
            slot,
            _pad: 0,
        };
        let mut server = OrigDst::default();
        sys::map_lookup(
            self.0.fd().as_fd(),
            sys::bytes_of(&key),
            sys::bytes_of_mut(&mut server),
        )
        .ok()?;
        Some(SocketAddr::new(
            key_addr(&AddrKey {
                addr: server.addr,
                family: u32::from(server.family),
            })?,
            u16::from_be(server.port),
        ))
    }
}

/// The original destinations `sockops` recorded for captured connections, by (pod
/// namespace, client port, family). Read once per connection with one lock-free
/// lookup-and-delete.
pub struct OrigDstMap(MapData);

impl OrigDstMap {
    /// Takes the original destination of a connection from `client` accepted on the
    /// outbound listener of the pod namespace `netns_cookie`.
    pub fn take(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = OrigKey {
            netns_cookie,
            port: client.port(),
            family: if client.is_ipv4() { AF_INET } else { AF_INET6 },
            _pad: 0,
        };
        let mut orig = OrigDst::default();
        sys::map_take(
            self.0.fd().as_fd(),
            sys::bytes_of(&key),
            sys::bytes_of_mut(&mut orig),
        )
        .ok()?;
        Some(SocketAddr::new(
            key_addr(&AddrKey {
                addr: orig.addr,
                family: u32::from(orig.family),
            })?,
            u16::from_be(orig.port),
        ))
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EbpfError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

/// Loads the `sk_msg` verdict and attaches it to this process's socket map.
fn install_sockmap(ebpf: &mut Ebpf) -> Result<Sockmap, EbpfError> {
    let name = programs::REDIRECT;
    let program: &mut SkMsg = program_mut(ebpf, name)?;
    let perr = |source| EbpfError::Program { name, source };
    program.load().map_err(perr)?;
    let prog = program
        .fd()
        .map_err(perr)?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| EbpfError::Link {
            what: "duplicating program fd",
            name: name.to_owned(),
            source,
        })?;
    let sockets = take_map_data(ebpf, maps::REDIRECT_SOCKS)?;
    let state = take_map_data(ebpf, maps::REDIRECT_STATE)?;
    let route = take_map_data(ebpf, maps::REDIRECT_ROUTE)?;
    sys::attach_msg_verdict(prog.as_fd(), sockets.fd().as_fd()).map_err(|source| {
        EbpfError::Link {
            what: "attaching",
            name: name.to_owned(),
            source,
        }
    })?;
    // Only now does `sockops` hand application sockets to the map: a socket in a map
    // without the verdict would only pay for it.
    let on = take_map_data(ebpf, maps::REDIRECT_ON)?;
    sys::map_update(on.fd().as_fd(), &0u32.to_ne_bytes(), &1u32.to_ne_bytes()).map_err(
        |source| EbpfError::Link {
            what: "enabling",
            name: name.to_owned(),
            source,
        },
    )?;
    Ok(Sockmap::new(sockets, state, route))
}

/// A map of any type, for raw `bpf(2)` use.
fn take_map_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, EbpfError> {
    match ebpf.take_map(name) {
        Some(
            Map::HashMap(data) | Map::LruHashMap(data) | Map::SockHash(data) | Map::Array(data),
        ) => Ok(data),
        _ => Err(EbpfError::Map {
            name,
            source: aya::maps::MapError::InvalidName {
                name: name.to_owned(),
            },
        }),
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::Map {
        name,
        source: aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        },
    })?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

fn ignore_missing(r: Result<(), aya::maps::MapError>, name: &'static str) -> Result<(), EbpfError> {
    match r {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(EbpfError::Map { name, source }),
    }
}

/// Reuses the pinned link at `pin` (swapping its program in place) or attaches and pins a
/// new one. Either way exactly one copy of the program stays attached.
fn attach_or_update(
    pin: &Path,
    prog: std::os::fd::BorrowedFd<'_>,
    target: std::os::fd::BorrowedFd<'_>,
    ty: AttachType,
    name: &str,
) -> Result<OwnedFd, EbpfError> {
    let err = |what| {
        move |source| EbpfError::Link {
            what,
            name: name.to_owned(),
            source,
        }
    };
    if pin.exists() {
        let link = sys::obj_get(pin).map_err(err("opening pinned link"))?;
        match sys::link_update(link.as_fd(), prog) {
            Ok(()) => return Ok(link),
            Err(e) => {
                // The cgroup went away: the link is defunct; replace it.
                tracing::warn!(link = %pin.display(), error = %e, "pinned link unusable, attaching anew");
                fs::remove_file(pin).map_err(err("removing stale pin"))?;
            }
        }
    }
    let link = sys::link_create(prog, target, ty).map_err(err("attaching"))?;
    sys::obj_pin(link.as_fd(), pin).map_err(err("pinning"))?;
    Ok(link)
}

fn detach_pinned_link(pin: &Path) -> Result<(), EbpfError> {
    let name = pin.display().to_string();
    match sys::obj_get(pin) {
        Ok(link) => {
            // Detach explicitly: another process may still hold the link open.
            let _ = sys::link_detach(link.as_fd());
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(EbpfError::Link {
                what: "opening pinned link",
                name,
                source,
            });
        }
    }
    fs::remove_file(pin).map_err(|source| EbpfError::Link {
        what: "unpinning",
        name,
        source,
    })
}

/// The key the kernel programs use for a pod address.
pub fn addr_key(addr: IpAddr) -> AddrKey {
    match canonical(addr) {
        IpAddr::V4(v4) => AddrKey {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            family: u32::from(AF_INET),
        },
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            AddrKey {
                addr: [w(0), w(4), w(8), w(12)],
                family: u32::from(AF_INET6),
            }
        }
    }
}

fn key_addr(key: &AddrKey) -> Option<IpAddr> {
    match u16::try_from(key.family).ok()? {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(key.addr[0].to_ne_bytes()))),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in key.addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// Makes sure `pin_dir` is on a bpffs, mounting `/sys/fs/bpf` if nothing is mounted there.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), EbpfError> {
    let is_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    if is_bpffs(parent) || is_bpffs(pin_dir) {
        return Ok(());
    }
    let root = Path::new(BPFFS_ROOT);
    if !pin_dir.starts_with(root) {
        return Err(EbpfError::Bpffs {
            what: "not on a bpffs",
            path: pin_dir.into(),
            source: io::Error::other("choose a directory under a mounted bpffs"),
        });
    }
    match nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => Ok(()),
        // Another agent mounted it meanwhile.
        Err(_) if is_bpffs(root) => Ok(()),
        Err(e) => Err(EbpfError::Bpffs {
            what: "mounting",
            path: root.into(),
            source: e.into(),
        }),
    }
}

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Detaches every link and removes every pin under `pin_dir`, then the directory itself.
/// Pods captured by these programs are released (their traffic flows without the mesh).
pub fn uninstall(pin_dir: &Path) -> Result<Removed, EbpfError> {
    let mut removed = Removed::default();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    let read = |dir: PathBuf| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default()
    };
    for link in read(pin_dir.join("links")) {
        detach_pinned_link(&link)?;
        removed.links += 1;
    }
    for map in read(pin_dir.join("maps")) {
        fs::remove_file(&map).map_err(|source| EbpfError::Bpffs {
            what: "unpinning",
            path: map.clone(),
            source,
        })?;
        removed.maps += 1;
    }
    for dir in [
        pin_dir.join("links"),
        pin_dir.join("maps"),
        pin_dir.to_owned(),
    ] {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(EbpfError::Bpffs {
                    what: "removing",
                    path: dir,
                    source,
                });
            }
        }
    }
    Ok(removed)
}

/// How many programs of a kind are attached to a cgroup or network namespace (for
/// `/config_dump` and tests: exactly one copy per agent is expected).
pub fn attached_count(target: &Path, ty: AttachType) -> io::Result<u32> {
    let f = fs::File::open(target)?;
    sys::prog_count(f.as_fd(), ty)
}
