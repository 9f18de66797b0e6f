//! Release signatures stock OpenSSH verifies: the same ed25519 release key,
//! written as an SSH signature (OpenSSH's `PROTOCOL.sshsig`, what
//! `ssh-keygen -Y sign` makes) and an `allowed_signers` line, so an operator
//! checks a release by hand with nothing but `ssh-keygen`:
//!
//! ```text
//! ssh-keygen -Y verify -f allowed_signers -I release@appliance \
//!     -n appliance-release -s manifest.json.sshsig < manifest.json
//! ```
//!
//! The format is small and fixed (a handful of length-prefixed strings, one
//! base64 armour), and the only crate that writes it (`ssh-key`) would bring
//! a second copy of the ed25519 and RSA stacks for twenty lines of framing,
//! so it is written here and checked against the real `ssh-keygen` in the
//! tests. Ed25519 is deterministic, so the same key and manifest give the
//! same bytes (reproducible builds).

use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha512};

/// The signature namespace: a signature made for a release cannot be
/// replayed as one for another purpose (git commits, files).
pub const NAMESPACE: &str = "appliance-release";
/// The signer identity the `allowed_signers` file names.
pub const IDENTITY: &str = "release@appliance";

const MAGIC: &[u8] = b"SSHSIG";
const VERSION: u32 = 1;
const KEY_TYPE: &str = "ssh-ed25519";
const HASH: &str = "sha512";

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// The SSH wire form of an ed25519 public key.
fn key_blob(key: &VerifyingKey) -> Vec<u8> {
    let mut b = Vec::new();
    put_string(&mut b, KEY_TYPE.as_bytes());
    put_string(&mut b, key.as_bytes());
    b
}

/// `ssh-ed25519 <base64> <comment>`: an OpenSSH public key line.
pub fn public_key_line(key: &VerifyingKey, comment: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(key_blob(key));
    format!("{KEY_TYPE} {b64} {comment}\n")
}

/// The `allowed_signers` line that trusts `key` for release signatures only.
pub fn allowed_signers_line(key: &VerifyingKey) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(key_blob(key));
    format!("{IDENTITY} namespaces=\"{NAMESPACE}\" {KEY_TYPE} {b64}\n")
}

/// An armoured SSH signature by `key` over `message` in [`NAMESPACE`].
pub fn sign(key: &SigningKey, message: &[u8]) -> String {
    // What is signed: the preamble, namespace, reserved, hash algorithm and
    // the message's hash (never the message itself).
    let mut signed = MAGIC.to_vec();
    put_string(&mut signed, NAMESPACE.as_bytes());
    put_string(&mut signed, b"");
    put_string(&mut signed, HASH.as_bytes());
    put_string(&mut signed, &Sha512::digest(message));
    let sig = key.sign(&signed);
    let mut sig_blob = Vec::new();
    put_string(&mut sig_blob, KEY_TYPE.as_bytes());
    put_string(&mut sig_blob, &sig.to_bytes());

    let mut blob = MAGIC.to_vec();
    blob.extend_from_slice(&VERSION.to_be_bytes());
    put_string(&mut blob, &key_blob(&key.verifying_key()));
    put_string(&mut blob, NAMESPACE.as_bytes());
    put_string(&mut blob, b"");
    put_string(&mut blob, HASH.as_bytes());
    put_string(&mut blob, &sig_blob);

    let b64 = base64::engine::general_purpose::STANDARD.encode(blob);
    let mut out = String::from("-----BEGIN SSH SIGNATURE-----\n");
    for chunk in b64.as_bytes().chunks(70) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END SSH SIGNATURE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    /// Runs stock `ssh-keygen -Y verify`; returns (success, output).
    fn ssh_verify(
        signers: &str,
        identity: &str,
        ns: &str,
        sig: &str,
        msg: &[u8],
    ) -> (bool, String) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("allowed_signers"), signers).unwrap();
        std::fs::write(dir.path().join("m.sshsig"), sig).unwrap();
        let mut child = Command::new("ssh-keygen")
            .args(["-Y", "verify", "-f"])
            .arg(dir.path().join("allowed_signers"))
            .args(["-I", identity, "-n", ns, "-s"])
            .arg(dir.path().join("m.sshsig"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running ssh-keygen (apt-get install -y openssh-client)");
        child.stdin.take().unwrap().write_all(msg).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    #[test]
    fn stock_ssh_keygen_verifies_our_signature_and_refuses_a_changed_one() {
        let k = key(7);
        let manifest = b"{\"schema\":\"appliance.release.v1\"}\n";
        let sig = sign(&k, manifest);
        let signers = allowed_signers_line(&k.verifying_key());
        let (ok, out) = ssh_verify(&signers, IDENTITY, NAMESPACE, &sig, manifest);
        assert!(ok, "ssh-keygen refused our signature: {out}");
        assert!(
            out.contains("Good \"appliance-release\" signature"),
            "{out}"
        );

        // A changed manifest, another key, another namespace: all refused.
        let (ok, out) = ssh_verify(&signers, IDENTITY, NAMESPACE, &sig, b"{}\n");
        assert!(!ok, "a changed manifest verified: {out}");
        let other = allowed_signers_line(&key(8).verifying_key());
        let (ok, out) = ssh_verify(&other, IDENTITY, NAMESPACE, &sig, manifest);
        assert!(!ok, "another key verified: {out}");
        let (ok, out) = ssh_verify(&signers, IDENTITY, "file", &sig, manifest);
        assert!(!ok, "another namespace verified: {out}");
    }

    #[test]
    fn signatures_are_deterministic_and_keys_read_by_ssh_keygen() {
        let k = key(3);
        assert_eq!(sign(&k, b"m"), sign(&k, b"m"));
        assert_ne!(sign(&k, b"m"), sign(&k, b"n"));
        // ssh-keygen reads our public key line and prints its fingerprint.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pub");
        std::fs::write(&p, public_key_line(&k.verifying_key(), "release")).unwrap();
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(&p)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.starts_with("256 SHA256:") && text.contains("(ED25519)"),
            "{text}"
        );
    }
}
