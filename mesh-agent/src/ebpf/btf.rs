//! The offsets the redirect verdict reads in this kernel's structures
//! ([`KernelOffsets`]), from the kernel's own type information
//! (`/sys/kernel/btf/vmlinux`): the layout of `struct sock`, `struct tcp_sock` and
//! `struct sk_psock` changes with the kernel version and its configuration, so it is read
//! where the programs run rather than compiled in.
//!
//! Only what that needs is parsed: the header, the type section (every kind's size, to
//! walk it) and the names and byte offsets of top-level struct members.

use std::{collections::HashMap, path::Path};

use mesh_common::KernelOffsets;

/// Where the running kernel describes its types.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Malformed { path: String, what: String },
    #[error("{path}: no member {member} in struct {strukt}")]
    Missing {
        path: String,
        strukt: &'static str,
        member: &'static str,
    },
}

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// Struct name → member name → byte offset, for the structs asked for.
type Members = HashMap<String, HashMap<String, u32>>;

/// The verdict's offsets in the running kernel.
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    let path = Path::new(VMLINUX);
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: VMLINUX.into(),
        source,
    })?;
    offsets_in(&data, VMLINUX)
}

fn offsets_in(data: &[u8], path: &str) -> Result<KernelOffsets, BtfError> {
    let members = struct_members(data, path, &["sock", "tcp_sock", "sk_psock"])?;
    let get = |strukt: &'static str, member: &'static str| {
        members
            .get(strukt)
            .and_then(|m| m.get(member))
            .copied()
            .ok_or(BtfError::Missing {
                path: path.into(),
                strukt,
                member,
            })
    };
    Ok(KernelOffsets {
        sk_user_data: get("sock", "sk_user_data")?,
        sk_rcvbuf: get("sock", "sk_rcvbuf")?,
        copied_seq: get("tcp_sock", "copied_seq")?,
        write_seq: get("tcp_sock", "write_seq")?,
        msg_tot_len: get("sk_psock", "msg_tot_len")?,
        _pad: 0,
    })
}

/// The top-level members of the structs named in `wanted` (the first struct of each name).
fn struct_members(data: &[u8], path: &str, wanted: &[&str]) -> Result<Members, BtfError> {
    let bad = |what: &str| BtfError::Malformed {
        path: path.into(),
        what: what.into(),
    };
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if u16_at(0) != Some(BTF_MAGIC) {
        return Err(bad("not little-endian BTF"));
    }
    let header = |o| u32_at(o).ok_or_else(|| bad("short header"));
    let hdr_len = header(4)? as usize;
    let (type_off, type_len) = (header(8)? as usize, header(12)? as usize);
    let str_off = header(16)? as usize;
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    let name = |off: u32| -> Result<&str, BtfError> {
        let start = strings + off as usize;
        let rest = data.get(start..).ok_or_else(|| bad("name out of range"))?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| bad("unterminated name"))?;
        std::str::from_utf8(&rest[..end]).map_err(|_| bad("name not UTF-8"))
    };
    let mut found = Members::new();
    let mut p = types;
    while p < types + type_len {
        let field = |o| u32_at(p + o).ok_or_else(|| bad("truncated type"));
        let (name_off, info) = (field(0)?, field(4)?);
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let bitfield_offsets = info >> 31 == 1;
        p += 12;
        // The bytes that follow each kind's common part.
        let extra = match kind {
            1 | 14 | 17 => 4,          // int, var, decl tag
            3 => 12,                   // array
            4 | 5 => 12 * vlen,        // struct, union
            6 | 13 => 8 * vlen,        // enum, func proto
            15 | 19 => 12 * vlen,      // datasec, enum64
            2 | 7..=12 | 16 | 18 => 0, // ptr, fwd, typedef, qualifiers, func, float, type tag
            _ => return Err(bad(&format!("unknown kind {kind}"))),
        };
        if kind == KIND_STRUCT {
            let struct_name = name(name_off)?;
            if wanted.contains(&struct_name) && !found.contains_key(struct_name) {
                let mut members = HashMap::new();
                for i in 0..vlen {
                    let m = p + 12 * i;
                    let member = |o| u32_at(m + o).ok_or_else(|| bad("truncated member"));
                    let bits = member(8)?;
                    let bits = if bitfield_offsets {
                        bits & 0xff_ffff
                    } else {
                        bits
                    };
                    members.insert(name(member(0)?)?.to_owned(), bits / 8);
                }
                found.insert(struct_name.to_owned(), members);
            }
        }
        p += extra;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with one struct of two members, `a` at byte 0 and `b` at byte 12.
    fn blob() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0int\0";
        let mut types = Vec::new();
        // [1] int "int", 4 bytes.
        for w in [7u32, 1 << 24, 4, 32] {
            types.extend_from_slice(&w.to_le_bytes());
        }
        // [2] struct "s", 2 members, 16 bytes.
        for w in [1u32, (4 << 24) | 2, 16, 3, 1, 0, 5, 1, 96] {
            types.extend_from_slice(&w.to_le_bytes());
        }
        let mut data = Vec::new();
        data.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(strings);
        data
    }

    #[test]
    fn member_offsets_of_a_struct() {
        let found = struct_members(&blob(), "test", &["s"]).unwrap();
        assert_eq!(found["s"]["a"], 0);
        assert_eq!(found["s"]["b"], 12);
    }

    #[test]
    fn a_missing_member_is_named() {
        let e = offsets_in(&blob(), "test").unwrap_err().to_string();
        assert!(e.contains("struct sock"), "{e}");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(struct_members(b"nope", "test", &["s"]).is_err());
        let mut truncated = blob();
        truncated.truncate(40);
        assert!(struct_members(&truncated, "test", &["s"]).is_err());
    }

    /// The running kernel (every machine this agent runs on has BTF; the verdict needs
    /// these offsets to redirect at all).
    #[test]
    fn this_kernel_has_every_offset() {
        let offsets = kernel_offsets().unwrap();
        assert!(offsets.complete(), "{offsets:?}");
    }
}
