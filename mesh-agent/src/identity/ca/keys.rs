//! A CA's signing key as operators keep it: PEM in PKCS#8, SEC1 (`EC PRIVATE KEY`, as openssl
//! writes) or PKCS#1 (`RSA PRIVATE KEY`, as Istio's sample plug-in CA has it); ECDSA P-256,
//! ECDSA P-384 or RSA. ring loads PKCS#8 only, so the other two encodings are wrapped.

use rcgen::{
    KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, SignatureAlgorithm,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// AlgorithmIdentifier { id-ecPublicKey, prime256v1 }.
const EC_P256: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];
/// AlgorithmIdentifier { id-ecPublicKey, secp384r1 }.
const EC_P384: &[u8] = &[
    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04,
    0x00, 0x22,
];
/// AlgorithmIdentifier { rsaEncryption, NULL }.
const RSA: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

/// What a signing key may be, in the order they are tried; RSA keys sign with SHA-256, as
/// Istio's CA does.
const ALGORITHMS: [&SignatureAlgorithm; 3] = [
    &PKCS_ECDSA_P256_SHA256,
    &PKCS_ECDSA_P384_SHA384,
    &PKCS_RSA_SHA256,
];

/// The one private key in `pem`, ready to sign.
pub(super) fn load_signing_key(pem: &[u8]) -> Result<KeyPair, String> {
    let pkcs8_candidates: Vec<Vec<u8>> = match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(PrivateKeyDer::Pkcs8(k))) => vec![k.secret_pkcs8_der().to_vec()],
        Ok(Some(PrivateKeyDer::Sec1(k))) => [EC_P256, EC_P384]
            .into_iter()
            .map(|curve| wrap_pkcs8(curve, k.secret_sec1_der()))
            .collect(),
        Ok(Some(PrivateKeyDer::Pkcs1(k))) => vec![wrap_pkcs8(RSA, k.secret_pkcs1_der())],
        Ok(Some(_)) => return Err("unsupported private key encoding".into()),
        Ok(None) => return Err("no private key in the file".into()),
        Err(e) => return Err(format!("not PEM: {e}")),
    };
    for der in &pkcs8_candidates {
        for alg in ALGORITHMS {
            if let Ok(key) =
                KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der.clone()), alg)
            {
                return Ok(key);
            }
        }
    }
    Err("not an ECDSA P-256, ECDSA P-384 or RSA private key".into())
}

/// Which of the supported kinds `key` is, for messages.
pub(crate) fn describe(key: &KeyPair) -> &'static str {
    let alg = key.algorithm();
    if alg == &PKCS_ECDSA_P256_SHA256 {
        "ECDSA P-256"
    } else if alg == &PKCS_ECDSA_P384_SHA384 {
        "ECDSA P-384"
    } else if alg == &PKCS_RSA_SHA256 {
        "RSA"
    } else {
        "other"
    }
}

/// PrivateKeyInfo { version 0, `algorithm`, OCTET STRING `key` }. A key of another kind than
/// `algorithm` says fails when ring loads it.
pub(crate) fn wrap_pkcs8(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(algorithm);
    body.extend(tlv(0x04, key));
    tlv(0x30, &body)
}

/// The SEC1 form's AlgorithmIdentifier for P-256, for tests that unwrap keys.
#[cfg(test)]
pub(crate) const P256_ALGORITHM: &[u8] = EC_P256;

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = body.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs8_keys_of_each_kind_load_and_keep_their_algorithm() {
        for (alg, name) in [
            (&PKCS_ECDSA_P256_SHA256, "ECDSA P-256"),
            (&PKCS_ECDSA_P384_SHA384, "ECDSA P-384"),
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let loaded = load_signing_key(key.serialize_pem().as_bytes()).unwrap();
            assert_eq!(describe(&loaded), name);
            assert_eq!(loaded.public_key_raw(), key.public_key_raw());
        }
    }

    #[test]
    fn refusals_say_why() {
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cases = [
            (ed.serialize_pem(), "not an ECDSA P-256, ECDSA P-384 or RSA"),
            (String::new(), "no private key"),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
                "no private key",
            ),
        ];
        for (pem, want) in cases {
            let err = load_signing_key(pem.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }
}
