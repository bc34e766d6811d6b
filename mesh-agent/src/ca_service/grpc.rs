//! Istio's certificate API on the wire: the two messages of
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` (field numbers as in Istio's
//! `ca.proto`, so istiod's clients, ztunnel among them, and this one interoperate), gRPC's
//! length-prefixed framing and its status codes.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// The one method, as an HTTP/2 path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The metadata key with which a node proxy asks for the identity of one of its pods.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The largest request or response message accepted (a CSR is about 500 bytes, a chain a few
/// kilobytes).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// `IstioCertificateRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct CertificateRequest {
    /// PEM-encoded PKCS#10 request; only its key is used.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; 0 or less: the CA's default.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `IstioCertificateResponse`: the leaf, then each intermediate, then the root(s) as the last
/// element (one PEM string, possibly several roots).
#[derive(Clone, PartialEq, Message)]
pub struct CertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

impl CertificateRequest {
    /// The impersonated identity in the metadata, if any (empty strings count as none).
    pub fn impersonated_identity(&self) -> Option<&str> {
        let value = self.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
        match &value.kind {
            Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s),
            _ => None,
        }
    }

    /// Sets the impersonated identity, as ztunnel does for each of its pods.
    pub fn impersonating(mut self, identity: &str) -> Self {
        self.metadata
            .get_or_insert_with(Default::default)
            .fields
            .insert(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                },
            );
        self
    }
}

/// gRPC status codes this service uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    InvalidArgument = 3,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Internal = 13,
    Unimplemented = 12,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// A gRPC error status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("gRPC status {code:?}: {message}")]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }

    /// The code's name for a status that came over the wire as a number.
    pub fn from_wire(code: &str, message: &str) -> Self {
        let code = match code.trim() {
            "0" => Code::Ok,
            "3" => Code::InvalidArgument,
            "7" => Code::PermissionDenied,
            "8" => Code::ResourceExhausted,
            "12" => Code::Unimplemented,
            "14" => Code::Unavailable,
            "16" => Code::Unauthenticated,
            _ => Code::Internal,
        };
        let message = percent_decode(message);
        Status { code, message }
    }
}

/// One message in gRPC's framing: uncompressed flag, 4-byte big-endian length, the message.
pub fn encode_frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    message
        .encode(&mut buf)
        .expect("a BytesMut with the message's length reserved grows as needed");
    buf.freeze()
}

/// Exactly one uncompressed message of at most [`MAX_MESSAGE`] bytes in `body`.
pub fn decode_frame<M: Message + Default>(body: &[u8]) -> Result<M, Status> {
    let invalid = |reason: String| Status::new(Code::InvalidArgument, reason);
    let Some((header, rest)) = body.split_first_chunk::<5>() else {
        return Err(invalid(format!(
            "expected one gRPC message, got {} bytes",
            body.len()
        )));
    };
    if header[0] != 0 {
        return Err(Status::new(
            Code::Unimplemented,
            "compressed messages are not supported",
        ));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(Status::new(
            Code::ResourceExhausted,
            format!("message of {len} bytes exceeds {MAX_MESSAGE}"),
        ));
    }
    if rest.len() != len {
        return Err(invalid(format!(
            "the frame announces {len} bytes but {} follow (one message per call)",
            rest.len()
        )));
    }
    M::decode(rest).map_err(|e| invalid(format!("message does not decode: {e}")))
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2: bytes outside printable ASCII, and
/// '%').
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(message: &str) -> String {
    let bytes = message.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_with_its_impersonated_identity() {
        let request = CertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----\n...".into(),
            validity_duration: 3600,
            metadata: None,
        }
        .impersonating("spiffe://cluster.local/ns/a/sa/b");
        let frame = encode_frame(&request);
        assert_eq!(frame[0], 0);
        assert_eq!(
            u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize,
            frame.len() - 5
        );
        let back: CertificateRequest = decode_frame(&frame).unwrap();
        assert_eq!(back, request);
        assert_eq!(
            back.impersonated_identity(),
            Some("spiffe://cluster.local/ns/a/sa/b")
        );
    }

    #[test]
    fn field_numbers_are_istios() {
        // csr = 1 (string), validity_duration = 3 (int64): tags 0x0a and 0x18.
        let bytes = CertificateRequest {
            csr: "x".into(),
            validity_duration: 5,
            metadata: None,
        }
        .encode_to_vec();
        assert_eq!(bytes, [0x0a, 1, b'x', 0x18, 5]);
        let bytes = CertificateResponse {
            cert_chain: vec!["a".into()],
        }
        .encode_to_vec();
        assert_eq!(bytes, [0x0a, 1, b'a']);
    }

    #[test]
    fn malformed_frames_are_refused_with_a_reason() {
        let good = encode_frame(&CertificateResponse::default());
        let mut compressed = good.to_vec();
        compressed[0] = 1;
        let mut huge = vec![0u8, 0xff, 0xff, 0xff, 0xff];
        huge.extend_from_slice(b"x");
        let mut two = good.to_vec();
        two.extend_from_slice(&good);
        let cases: [(&str, &[u8], Code); 5] = [
            ("empty", b"", Code::InvalidArgument),
            ("short header", &[0, 0, 0], Code::InvalidArgument),
            ("compressed", &compressed, Code::Unimplemented),
            ("too large", &huge, Code::ResourceExhausted),
            ("two messages", &two, Code::InvalidArgument),
        ];
        for (name, body, code) in cases {
            let err = decode_frame::<CertificateResponse>(body).unwrap_err();
            assert_eq!(err.code, code, "{name}: {err}");
        }
        assert!(decode_frame::<CertificateResponse>(&good).is_ok());
    }

    #[test]
    fn status_messages_are_percent_encoded_both_ways() {
        let message = "node \"n1\": 100% denied\n";
        let wire = percent_encode(message);
        assert!(wire.bytes().all(|b| (0x20..0x7f).contains(&b)), "{wire}");
        assert_eq!(Status::from_wire("7", &wire).message, message);
        assert_eq!(Status::from_wire("7", &wire).code, Code::PermissionDenied);
        assert_eq!(Status::from_wire("99", "").code, Code::Internal);
    }
}
