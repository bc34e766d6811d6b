//! The sockets the proxy opens on a pod's behalf, behind one trait so that the proxy can run
//! without namespaces or privileges in tests. The agent's implementation creates each socket
//! inside the pod's network namespace with the marks and options the kernel programs and
//! routes expect; a test's creates plain loopback sockets.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_common::{DELIVERY_MARK, PROXY_MARK};
use tokio::net::TcpSocket;

use super::PodContext;

/// What a socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Delivering to the pod's application from `client`, the connection's real source.
    Delivery { client: IpAddr },
    /// Connecting from the pod to a destination outside the mesh, as it is.
    Passthrough,
    /// An HBONE connection from the pod to a peer's 15008.
    Hbone,
}

/// Creates the proxy's sockets for pods.
pub trait PodSockets: Send + Sync {
    /// A TCP socket for `purpose`, in the address family of `family`, not yet connected.
    /// Delivery and passthrough sockets reset on close until their connection ended
    /// cleanly (`copy::reset`).
    fn socket(&self, pod: &PodContext, family: IpAddr, purpose: Purpose) -> io::Result<TcpSocket>;
}

/// The agent's sockets: created inside the pod's network namespace; marked so capture skips
/// them; delivery sockets bound transparently to the client's address with the delivery
/// mark, whose route brings the replies back over `lo`.
pub struct NamespaceSockets;

impl PodSockets for NamespaceSockets {
    fn socket(&self, pod: &PodContext, family: IpAddr, purpose: Purpose) -> io::Result<TcpSocket> {
        let socket = pod.netns.run(|| new_socket(family))??;
        match purpose {
            Purpose::Delivery { client } => {
                if client.is_ipv4() {
                    socket.set_ip_transparent_v4(true)?;
                } else {
                    socket.set_ip_transparent_v6(true)?;
                }
                socket.set_mark(DELIVERY_MARK)?;
                socket.set_linger(Some(Duration::ZERO))?;
                socket.bind(&SocketAddr::new(client, 0).into())?;
            }
            Purpose::Passthrough => {
                socket.set_mark(PROXY_MARK)?;
                socket.set_linger(Some(Duration::ZERO))?;
            }
            Purpose::Hbone => socket.set_mark(PROXY_MARK)?,
        }
        Ok(TcpSocket::from_std_stream(socket.into()))
    }
}

/// Sockets in the process's own network namespace, unmarked: for a proxy that runs as a
/// pod of its own (a waypoint), whose traffic is not captured.
pub struct LocalSockets;

impl PodSockets for LocalSockets {
    fn socket(
        &self,
        _pod: &PodContext,
        family: IpAddr,
        _purpose: Purpose,
    ) -> io::Result<TcpSocket> {
        Ok(TcpSocket::from_std_stream(new_socket(family)?.into()))
    }
}

/// A non-blocking TCP socket of `family`'s address family, in the calling thread's namespace.
pub fn new_socket(family: IpAddr) -> io::Result<socket2::Socket> {
    let domain = if family.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    socket2::Socket::new(
        domain,
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )
}
