//! Every system call the agent makes that no safe wrapper offers, and the only module of
//! the crate where `unsafe` is allowed: the `bpf(2)` commands aya does not expose (link
//! create/update/detach on arbitrary targets, pinning by fd, attachment queries,
//! lock-free map operations), socket cookies, pipes and `splice(2)` for the same-node
//! pump, `malloc_trim`, and receiving descriptors over a Unix socket (the hitless
//! restart's handoff). Each `unsafe` block carries its SAFETY argument.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

// Commands and attach types from include/uapi/linux/bpf.h.
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Kernel attach types used by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    Connect4 = 10,
    Connect6 = 11,
    UdpSendmsg4 = 14,
    UdpSendmsg6 = 15,
    UdpRecvmsg4 = 19,
    UdpRecvmsg6 = 20,
    GetPeerName4 = 29,
    GetPeerName6 = 30,
    SkLookup = 36,
}

/// A zeroed `union bpf_attr`, large enough for every command used here.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn put_u32(&mut self, offset: usize, v: u32) {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, offset: usize, v: u64) {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_u32(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.0[offset..offset + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-initialised bpf_attr of sufficient size for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us and nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt as _;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// `BPF_LINK_CREATE`: attaches `prog` to `target` (a cgroup or netns fd).
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    ty: AttachType,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, prog.as_raw_fd() as u32); // prog_fd
    attr.put_u32(4, target.as_raw_fd() as u32); // target_fd
    attr.put_u32(8, ty as u32); // attach_type
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// `BPF_LINK_UPDATE`: swaps the program of a live link in place (no detach window).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    attr.put_u32(4, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `BPF_LINK_DETACH`: detaches a link even while other descriptors still refer to it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// `BPF_OBJ_PIN`: pins a program, map or link at `path` on bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64); // pathname
    attr.put_u32(8, fd.as_raw_fd() as u32); // bpf_fd
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// `BPF_OBJ_GET`: opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// `BPF_PROG_QUERY`: how many programs of `ty` are attached to `target`.
pub fn prog_count(target: BorrowedFd<'_>, ty: AttachType) -> io::Result<u32> {
    let mut attr = Attr::new();
    attr.put_u32(0, target.as_raw_fd() as u32); // target_fd
    attr.put_u32(4, ty as u32); // attach_type
    // query_flags(8), attach_flags(12), prog_ids ptr(16) = NULL, prog_cnt(24) = 0
    bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(attr.get_u32(24))
}

/// The network-namespace cookie of the namespace a socket lives in (`SO_NETNS_COOKIE`).
pub fn netns_cookie(sock: &impl AsFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    socket_u64(sock, SO_NETNS_COOKIE)
}

/// A `SOL_SOCKET` option whose value is a u64.
fn socket_u64(sock: &impl AsFd, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, pointer and length describe `value`.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// `BPF_SK_MSG_VERDICT`: a send verdict program on a socket map.
const ATTACH_SK_MSG_VERDICT: u32 = 7;

/// `BPF_PROG_ATTACH` of an `sk_msg` verdict program to a socket map; it stays attached for
/// the life of the map.
pub fn attach_msg_verdict(prog: BorrowedFd<'_>, map: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32); // target_fd
    attr.put_u32(4, prog.as_raw_fd() as u32); // attach_bpf_fd
    attr.put_u32(8, ATTACH_SK_MSG_VERDICT); // attach_type
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// `BPF_MAP_LOOKUP_ELEM` into `value`; `ENOENT` when the key is missing.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32); // map_fd
    attr.put_u64(8, key.as_ptr() as u64); // key
    attr.put_u64(16, value.as_mut_ptr() as u64); // value
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` into `value`: reads and removes an entry in one
/// operation (hash maps, Linux 5.14+); `ENOENT` when the key is missing.
pub fn map_take(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32); // map_fd
    attr.put_u64(8, key.as_ptr() as u64); // key
    attr.put_u64(16, value.as_mut_ptr() as u64); // value
    bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr).map(drop)
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY`. Thread-safe in the kernel, so callers need no lock.
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32); // map_fd
    attr.put_u64(8, key.as_ptr() as u64); // key
    attr.put_u64(16, value.as_ptr() as u64); // value
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// `BPF_MAP_DELETE_ELEM`; a missing key is not an error.
pub fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32);
    attr.put_u64(8, key.as_ptr() as u64);
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(drop),
    }
}

/// The bytes of a map key or value.
pub fn bytes_of<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: `aya::Pod` types are plain old data without padding.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// The bytes of a map value to read into.
pub fn bytes_of_mut<T: aya::Pod>(v: &mut T) -> &mut [u8] {
    // SAFETY: `aya::Pod` types are plain old data without padding: any bytes are valid.
    unsafe { std::slice::from_raw_parts_mut((v as *mut T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// A non-blocking pipe: (read end, write end). Its capacity is raised to `capacity` bytes
/// when the kernel allows (failing to grow it is harmless).
pub fn pipe(capacity: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these descriptors; we are their only owner.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ takes an int; the descriptor is valid.
    unsafe {
        libc::fcntl(
            write.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            capacity as libc::c_int,
        )
    };
    Ok((read, write))
}

/// `splice(2)` of up to `len` bytes from `from` to `to` (one of them a pipe), non-blocking.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors, no offsets (NULL: both are a socket or a pipe).
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Returns the heap's free pages to the system (glibc); whether any were.
#[cfg(target_env = "gnu")]
pub fn malloc_trim() -> bool {
    // SAFETY: malloc_trim takes no pointer and only walks the allocator's own state,
    // under its locks; any thread may call it at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Takes ownership of a descriptor a system call just returned (`accept(2)`).
pub fn own_fd(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: the caller passes a descriptor it was just given and nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE` of a socket
/// made for the purpose).
pub fn current_netns_cookie() -> io::Result<u64> {
    let probe = std::os::unix::net::UnixDatagram::unbound()?;
    netns_cookie(&probe)
}

/// Receives one record on `sock` into `buf` with at most `max_fds` descriptors, made
/// close-on-exec: the record's length (0: the peer closed) and the descriptors. A record
/// whose descriptors did not all fit is an error (those that came are closed).
pub fn recv_with_fds(
    sock: &impl AsFd,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let fd_bytes = u32::try_from(max_fds * std::mem::size_of::<std::os::fd::RawFd>())
        .map_err(io::Error::other)?;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: SCM_RIGHTS descriptors are new in this process and owned by no one.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other(
            "descriptors were cut off (too many in one record)",
        ));
    }
    Ok((msg.bytes, fds))
}
