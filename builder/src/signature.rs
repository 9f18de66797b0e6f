//! Release signatures: an ed25519 signature over the exact bytes of a
//! release manifest, in a small JSON file (`appliance.signature.v1`).
//!
//! ```json
//! {"schema":"appliance.signature.v1","key":"ed25519:<hex public key>","manifest":"sha256:<hex>","signature":"<hex, 64 bytes>"}
//! ```
//! Compact JSON in this field order plus a trailing newline. Ed25519 is
//! deterministic, so the same key and the same manifest give the same bytes;
//! that keeps builds reproducible. The signature cannot be listed in the
//! manifest it signs (like the disk digest, it sits beside it).
//!
//! Public keys are written `ed25519:<hex of 32 bytes>` (the `.pub` file
//! holds that text and a newline); secret keys `ed25519-seed:<hex of the
//! 32-byte seed>`.

use ed25519_dalek::{Signature, Signer, Verifier};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Schema string of a signature file.
pub const SCHEMA: &str = "appliance.signature.v1";
const PUBLIC_PREFIX: &str = "ed25519:";
const SECRET_PREFIX: &str = "ed25519-seed:";

/// A signature file. Field order is the serialisation order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    pub schema: String,
    /// `ed25519:<hex>` of the signing key's public half.
    pub key: String,
    /// `sha256:<hex>` of the signed manifest bytes.
    pub manifest: Digest,
    /// Hex of the 64-byte ed25519 signature over the manifest bytes.
    pub signature: String,
}

/// Why a signature does not check out; every variant says what mismatched.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("signature file is malformed: {0}")]
    Malformed(String),
    #[error("signature file has schema {found:?}, expected {SCHEMA:?}")]
    Schema { found: String },
    #[error("signed by key {found}, but the trusted key is {trusted}")]
    WrongKey { found: String, trusted: String },
    #[error("the signature is for manifest {signed}, but the manifest is {actual}")]
    ManifestMismatch { signed: Digest, actual: Digest },
    #[error("the ed25519 signature over manifest {0} does not verify")]
    BadSignature(Digest),
}

/// A key that cannot be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what}: {why}")]
pub struct KeyError {
    pub what: &'static str,
    pub why: String,
}

/// `ed25519:<hex>` of a public key.
pub fn format_public_key(key: &VerifyingKey) -> String {
    format!("{PUBLIC_PREFIX}{}", hex::encode(key.as_bytes()))
}

/// Parse `ed25519:<hex>` (surrounding whitespace ignored).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bad = |why: String| KeyError {
        what: "public key",
        why,
    };
    let hex_part = text
        .trim()
        .strip_prefix(PUBLIC_PREFIX)
        .ok_or_else(|| bad(format!("expected {PUBLIC_PREFIX}<64 hex digits>")))?;
    let bytes: [u8; 32] = hex::decode(hex_part)
        .map_err(|e| bad(e.to_string()))?
        .try_into()
        .map_err(|v: Vec<u8>| bad(format!("{} bytes, expected 32", v.len())))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| bad(e.to_string()))
}

/// `ed25519-seed:<hex>` of a secret key, with a trailing newline.
pub fn format_secret_key(key: &SigningKey) -> String {
    format!("{SECRET_PREFIX}{}\n", hex::encode(key.to_bytes()))
}

/// Parse `ed25519-seed:<hex>` (surrounding whitespace ignored).
pub fn parse_secret_key(text: &str) -> Result<SigningKey, KeyError> {
    let bad = |why: String| KeyError {
        what: "secret key",
        why,
    };
    let hex_part = text
        .trim()
        .strip_prefix(SECRET_PREFIX)
        .ok_or_else(|| bad(format!("expected {SECRET_PREFIX}<64 hex digits>")))?;
    let seed: [u8; 32] = hex::decode(hex_part)
        .map_err(|e| bad(e.to_string()))?
        .try_into()
        .map_err(|v: Vec<u8>| bad(format!("{} bytes, expected 32", v.len())))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A secret key from 32 bytes of seed (the caller supplies OS randomness).
pub fn secret_key_from_seed(seed: [u8; 32]) -> SigningKey {
    SigningKey::from_bytes(&seed)
}

/// Sign `manifest` and return the signature file's bytes.
pub fn sign(key: &SigningKey, manifest: &[u8]) -> Vec<u8> {
    let sig = key.sign(manifest);
    let file = SignatureFile {
        schema: SCHEMA.into(),
        key: format_public_key(&key.verifying_key()),
        manifest: Digest::of(manifest),
        signature: hex::encode(sig.to_bytes()),
    };
    let mut v = serde_json::to_vec(&file).expect("signature files serialise");
    v.push(b'\n');
    v
}

/// Check that `sig_file` is a signature by `trusted` over exactly `manifest`.
pub fn verify(sig_file: &[u8], manifest: &[u8], trusted: &VerifyingKey) -> Result<(), VerifyError> {
    let f: SignatureFile =
        serde_json::from_slice(sig_file).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if f.schema != SCHEMA {
        return Err(VerifyError::Schema { found: f.schema });
    }
    let trusted_text = format_public_key(trusted);
    if f.key != trusted_text {
        return Err(VerifyError::WrongKey {
            found: f.key,
            trusted: trusted_text,
        });
    }
    let actual = Digest::of(manifest);
    if f.manifest != actual {
        return Err(VerifyError::ManifestMismatch {
            signed: f.manifest,
            actual,
        });
    }
    let bytes: [u8; 64] = hex::decode(&f.signature)
        .map_err(|e| VerifyError::Malformed(format!("signature: {e}")))?
        .try_into()
        .map_err(|v: Vec<u8>| {
            VerifyError::Malformed(format!("signature is {} bytes, expected 64", v.len()))
        })?;
    trusted
        .verify(manifest, &Signature::from_bytes(&bytes))
        .map_err(|_| VerifyError::BadSignature(actual))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        secret_key_from_seed([n; 32])
    }

    #[test]
    fn sign_is_deterministic_and_verifies() {
        let k = key(7);
        let a = sign(&k, b"manifest\n");
        assert_eq!(a, sign(&k, b"manifest\n"));
        assert!(a.ends_with(b"}\n"));
        let text = String::from_utf8(a.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"schema":"appliance.signature.v1","key":"ed25519:"#),
            "{text}"
        );
        let f: SignatureFile = serde_json::from_slice(&a).unwrap();
        assert_eq!(f.manifest, Digest::of(b"manifest\n"));
        assert_eq!(f.signature.len(), 128);
        verify(&a, b"manifest\n", &k.verifying_key()).unwrap();
    }

    #[test]
    fn tampered_manifest_is_refused() {
        let k = key(1);
        let sig = sign(&k, b"manifest A\n");
        let e = verify(&sig, b"manifest B\n", &k.verifying_key()).unwrap_err();
        assert!(matches!(e, VerifyError::ManifestMismatch { .. }), "{e}");
        // Same digest field but the signature bytes were altered.
        let mut f: SignatureFile = serde_json::from_slice(&sig).unwrap();
        let mut raw = hex::decode(&f.signature).unwrap();
        raw[0] ^= 1;
        f.signature = hex::encode(raw);
        let forged = serde_json::to_vec(&f).unwrap();
        let e = verify(&forged, b"manifest A\n", &k.verifying_key()).unwrap_err();
        assert!(matches!(e, VerifyError::BadSignature(_)), "{e}");
    }

    #[test]
    fn wrong_key_is_named() {
        let sig = sign(&key(1), b"m");
        let e = verify(&sig, b"m", &key(2).verifying_key()).unwrap_err();
        assert!(matches!(e, VerifyError::WrongKey { .. }), "{e}");
        assert!(e.to_string().contains("trusted key is ed25519:"), "{e}");
        // A file claiming the trusted key but signed by another one.
        let mut f: SignatureFile = serde_json::from_slice(&sig).unwrap();
        f.key = format_public_key(&key(2).verifying_key());
        let e = verify(
            &serde_json::to_vec(&f).unwrap(),
            b"m",
            &key(2).verifying_key(),
        )
        .unwrap_err();
        assert!(matches!(e, VerifyError::BadSignature(_)), "{e}");
    }

    #[test]
    fn malformed_files_are_refused() {
        let k = key(3).verifying_key();
        for bad in [
            &b""[..],
            b"not json",
            b"{}",
            br#"{"schema":"appliance.signature.v1","key":"x","manifest":"sha256:00","signature":""}"#,
        ] {
            let e = verify(bad, b"m", &k).unwrap_err();
            assert!(matches!(e, VerifyError::Malformed(_)), "{e}");
        }
        let mut f: SignatureFile = serde_json::from_slice(&sign(&key(3), b"m")).unwrap();
        f.schema = "appliance.signature.v0".into();
        let e = verify(&serde_json::to_vec(&f).unwrap(), b"m", &k).unwrap_err();
        assert!(matches!(e, VerifyError::Schema { .. }), "{e}");
        let mut f: SignatureFile = serde_json::from_slice(&sign(&key(3), b"m")).unwrap();
        f.signature.truncate(10);
        let e = verify(&serde_json::to_vec(&f).unwrap(), b"m", &k).unwrap_err();
        assert!(matches!(e, VerifyError::Malformed(_)), "{e}");
    }

    #[test]
    fn keys_round_trip_as_text() {
        let k = key(9);
        let p = format_public_key(&k.verifying_key());
        assert_eq!(
            parse_public_key(&format!("{p}\n")).unwrap(),
            k.verifying_key()
        );
        let s = format_secret_key(&k);
        assert_eq!(parse_secret_key(&s).unwrap().to_bytes(), k.to_bytes());
        assert!(parse_public_key("ed25519:abcd").is_err());
        assert!(parse_public_key("rsa:00").is_err());
        assert!(parse_secret_key(&p).is_err());
    }
}
