//! The part of the DNS wire format (RFC 1035, EDNS from RFC 6891) the resolver needs: the
//! question of a query, and answers of A and AAAA records, SERVFAIL, and truncation. Queries
//! it does not answer are forwarded as they came and their answers returned as they came, so
//! nothing else is parsed.

use std::net::IpAddr;

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
const HEADER_LEN: usize = 12;
/// The largest UDP answer without EDNS.
pub const CLASSIC_UDP: usize = 512;
/// The largest UDP answer this resolver offers with EDNS (the DNS flag day's size).
pub const EDNS_UDP: usize = 1232;
const MAX_NAME: usize = 255;

const QR: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;
const AA: u16 = 0x0400;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;
pub const RCODE_SERVFAIL: u16 = 2;

/// The question of a standard query with one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Recursion desired, echoed in the answer.
    pub rd: bool,
    /// Lowercase, dot-separated, without the final dot; empty for the root.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section's end in the message (the question is copied into answers).
    question_end: usize,
    /// The requester's EDNS UDP payload size, if it sent an OPT record.
    pub edns: Option<u16>,
}

impl Query {
    /// Whether the resolver may answer this itself (an address query of class IN).
    pub fn asks_address(&self) -> bool {
        self.qclass == CLASS_IN && (self.qtype == TYPE_A || self.qtype == TYPE_AAAA)
    }

    /// The largest answer the requester takes over UDP.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(size) => usize::from(size).clamp(CLASSIC_UDP, EDNS_UDP),
            None => CLASSIC_UDP,
        }
    }
}

/// Parses a query the resolver might answer: a standard query (not a response, opcode
/// QUERY) with exactly one question whose name is uncompressed. `None` for anything else,
/// which is forwarded unread.
pub fn parse_query(msg: &[u8]) -> Option<Query> {
    let header = msg.get(..HEADER_LEN)?;
    let word = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let (id, flags, qdcount, ancount, nscount, arcount) =
        (word(0), word(2), word(4), word(6), word(8), word(10));
    if flags & QR != 0 || flags & OPCODE_MASK != 0 || qdcount != 1 || ancount != 0 || nscount != 0 {
        return None;
    }
    let mut name = String::new();
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*msg.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // 0xc0: a compression pointer; 0x40 and 0x80: reserved label types.
        if len > 63 {
            return None;
        }
        let label = msg.get(at..at + len)?;
        at += len;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            // A dot or a non-ASCII byte inside a label cannot be written as text here.
            if b == b'.' || !b.is_ascii() || b.is_ascii_control() {
                return None;
            }
            name.push(char::from(b.to_ascii_lowercase()));
        }
        if name.len() + 1 > MAX_NAME {
            return None;
        }
    }
    let fixed = msg.get(at..at + 4)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    let question_end = at + 4;
    Some(Query {
        id,
        rd: flags & RD != 0,
        name,
        qtype,
        qclass,
        question_end,
        edns: if arcount > 0 {
            edns_size(&msg[question_end..])
        } else {
            None
        },
    })
}

/// The UDP payload size of an OPT record at the start of `additional`, if it is one.
fn edns_size(additional: &[u8]) -> Option<u16> {
    // Root name (one zero byte), type, class = payload size.
    let rr = additional.get(..5)?;
    (rr[0] == 0 && u16::from_be_bytes([rr[1], rr[2]]) == TYPE_OPT)
        .then(|| u16::from_be_bytes([rr[3], rr[4]]))
}

/// The header and question of an answer to `query` (taken from the query message `msg`).
fn start_answer(msg: &[u8], query: &Query, rcode: u16, authoritative: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(query.question_end + 64);
    let mut flags = QR | RA | rcode;
    if query.rd {
        flags |= RD;
    }
    if authoritative {
        flags |= AA;
    }
    out.extend_from_slice(&query.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&msg[HEADER_LEN..query.question_end]);
    out
}

/// The answer to `query` with `addrs` (those of the asked family) as records of `ttl`
/// seconds, at most `limit` bytes long: if they do not all fit, as many as fit and the
/// truncation flag (the requester asks again over TCP). No record of the family is an empty
/// answer (NODATA), not an error: the name exists.
pub fn answer(msg: &[u8], query: &Query, addrs: &[IpAddr], ttl: u32, limit: usize) -> Vec<u8> {
    let mut out = start_answer(msg, query, 0, true);
    let opt = query.edns.is_some();
    // Room for our OPT record (11 bytes) when the requester sent one.
    let room = limit.saturating_sub(if opt { 11 } else { 0 });
    let mut count: u16 = 0;
    let mut truncated = false;
    for addr in addrs {
        let rdata: &[u8] = match (query.qtype, addr) {
            (TYPE_A, IpAddr::V4(a)) => &a.octets(),
            (TYPE_AAAA, IpAddr::V6(a)) => &a.octets(),
            _ => continue,
        };
        // Name (a pointer to the question's), type, class, TTL, length, data.
        let len = 2 + 2 + 2 + 4 + 2 + rdata.len();
        if out.len() + len > room || count == u16::MAX {
            truncated = true;
            break;
        }
        out.extend_from_slice(&[0xc0, HEADER_LEN as u8]);
        out.extend_from_slice(&query.qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
        count += 1;
    }
    out[6..8].copy_from_slice(&count.to_be_bytes());
    if truncated {
        out[2] |= (TC >> 8) as u8;
    }
    if opt {
        push_opt(&mut out);
    }
    out
}

/// A SERVFAIL answer to `query` (the server it was for could not be asked).
pub fn servfail(msg: &[u8], query: &Query) -> Vec<u8> {
    let mut out = start_answer(msg, query, RCODE_SERVFAIL, false);
    if query.edns.is_some() {
        push_opt(&mut out);
    }
    out
}

/// Appends an OPT record offering [`EDNS_UDP`] bytes and counts it.
fn push_opt(out: &mut Vec<u8>) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&(EDNS_UDP as u16).to_be_bytes());
    out.extend_from_slice(&[0; 4]); // extended rcode, version, flags
    out.extend_from_slice(&[0; 2]); // no options
    out[10..12].copy_from_slice(&1u16.to_be_bytes());
}

/// A query for `name` of `qtype` (for tests and benchmarks: what a stub resolver sends).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&RD.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len().min(63) as u8);
        out.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// What an answer says, read back (tests and benchmarks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub id: u16,
    pub rcode: u16,
    pub truncated: bool,
    pub authoritative: bool,
    pub addrs: Vec<IpAddr>,
    /// The TTL of each address record, in order.
    pub ttls: Vec<u32>,
}

/// Reads an answer's header and its A and AAAA records; `None` if it is not a well-formed
/// response.
pub fn parse_answer(msg: &[u8]) -> Option<Answer> {
    let header = msg.get(..HEADER_LEN)?;
    let word = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let flags = word(2);
    if flags & QR == 0 {
        return None;
    }
    let (qdcount, ancount) = (word(4), word(6));
    let mut at = HEADER_LEN;
    for _ in 0..qdcount {
        at = skip_name(msg, at)? + 4;
    }
    let mut addrs = Vec::new();
    let mut ttls = Vec::new();
    for _ in 0..ancount {
        at = skip_name(msg, at)?;
        let fixed = msg.get(at..at + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let data = msg.get(at + 10..at + 10 + len)?;
        match (rtype, len) {
            (TYPE_A, 4) => {
                addrs.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?));
                ttls.push(ttl);
            }
            (TYPE_AAAA, 16) => {
                addrs.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?));
                ttls.push(ttl);
            }
            _ => {}
        }
        at += 10 + len;
    }
    Some(Answer {
        id: word(0),
        rcode: flags & 0x000f,
        truncated: flags & TC != 0,
        authoritative: flags & AA != 0,
        addrs,
        ttls,
    })
}

/// The offset after the name at `at` (labels, ending in a zero or a pointer).
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l if l > 63 => return None,
            l => at += 1 + usize::from(l),
        }
    }
}

/// The message ID of a DNS message (its first two bytes).
pub fn id_of(msg: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.first()?, *msg.get(1)?]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn a_query_is_read_and_answered_with_the_asked_family_only() {
        let q = query(0x1234, "Reviews.Bookinfo.svc.cluster.local.", TYPE_A);
        let parsed = parse_query(&q).unwrap();
        assert_eq!(parsed.name, "reviews.bookinfo.svc.cluster.local");
        assert_eq!((parsed.id, parsed.qtype, parsed.rd), (0x1234, TYPE_A, true));
        assert!(parsed.asks_address());
        let addrs = [
            IpAddr::V4(Ipv4Addr::new(10, 96, 0, 7)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        let a = parse_answer(&answer(&q, &parsed, &addrs, 30, CLASSIC_UDP)).unwrap();
        assert_eq!(a.id, 0x1234);
        assert_eq!((a.rcode, a.truncated, a.authoritative), (0, false, true));
        assert_eq!(a.addrs, vec![addrs[0]]);
        assert_eq!(a.ttls, vec![30]);
        let q6 = query(7, "reviews", TYPE_AAAA);
        let a6 = parse_answer(&answer(&q6, &parse_query(&q6).unwrap(), &addrs, 30, 512)).unwrap();
        assert_eq!(a6.addrs, vec![addrs[1]]);
        // No address of the family: an empty answer, not an error.
        let none = parse_answer(&answer(
            &q6,
            &parse_query(&q6).unwrap(),
            &addrs[..1],
            30,
            512,
        ));
        assert_eq!(none.map(|a| (a.rcode, a.addrs.len())), Some((0, 0)));
    }

    #[test]
    fn answers_that_do_not_fit_are_truncated() {
        let q = query(1, "many.ns.svc.cluster.local", TYPE_A);
        let parsed = parse_query(&q).unwrap();
        let addrs: Vec<IpAddr> = (0..100u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
            .collect();
        let udp = answer(&q, &parsed, &addrs, 30, parsed.udp_limit());
        assert!(udp.len() <= CLASSIC_UDP);
        let a = parse_answer(&udp).unwrap();
        assert!(a.truncated && !a.addrs.is_empty() && a.addrs.len() < 100);
        let tcp = parse_answer(&answer(&q, &parsed, &addrs, 30, usize::from(u16::MAX))).unwrap();
        assert!(!tcp.truncated);
        assert_eq!(tcp.addrs.len(), 100);
    }

    #[test]
    fn edns_raises_the_udp_limit_and_is_echoed() {
        let mut q = query(1, "a.b", TYPE_A);
        q[11] = 1; // one additional record: OPT offering 4096 bytes
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        let parsed = parse_query(&q).unwrap();
        assert_eq!(parsed.edns, Some(4096));
        assert_eq!(parsed.udp_limit(), EDNS_UDP);
        let out = answer(&q, &parsed, &[], 30, parsed.udp_limit());
        assert_eq!(u16::from_be_bytes([out[10], out[11]]), 1);
        assert_eq!(out.len(), q.len());
        let fail = parse_answer(&servfail(&q, &parsed)).unwrap();
        assert_eq!(fail.rcode, RCODE_SERVFAIL);
    }

    #[test]
    fn what_is_not_a_plain_query_is_left_to_the_server() {
        let q = query(1, "a.b", TYPE_A);
        // A response, an UPDATE, two questions, a compressed name, a cut message.
        let mut response = q.clone();
        response[2] |= 0x80;
        let mut update = q.clone();
        update[2] |= 5 << 3;
        let mut two = q.clone();
        two[5] = 2;
        let mut pointer = q.clone();
        pointer[12] = 0xc0;
        for m in [
            &response,
            &update,
            &two,
            &pointer,
            &q[..q.len() - 1].to_vec(),
        ] {
            assert_eq!(parse_query(m), None, "{m:?}");
        }
        assert!(parse_query(&[]).is_none());
    }
}
