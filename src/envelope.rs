//! Envelope encryption of state files in the element (encoding
//! `gzip+chacha20poly1305+base64`, docs/FORMAT.md "Encrypted files").
//!
//! Each file gets a fresh random data key; the gzip stream is sealed with it
//! (ChaCha20-Poly1305, RFC 8439, random 12-byte nonce), and the data key is
//! sealed with the host key named by `key` (random 12-byte nonce: a data key
//! is used once; random nonces under one host key stay far below the 2^32
//! seals where a repeat becomes a concern). The IETF construction was chosen
//! over XChaCha20 because every mainstream crypto library has it, so a
//! manager can decrypt in any language. Both seals carry associated data that
//! binds them to the domain UUID, the file's path and the key id, so a blob
//! pasted into another domain, renamed, or attributed to another key fails
//! to open. No I/O here but the OS random generator, which callers may
//! replace (test vectors).

use crate::state::Sha256Sum;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

pub const KEY_LEN: usize = 32;
pub(crate) const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// `nonce || sealed data key` as stored in `wrapped-key`.
pub(crate) const WRAPPED_KEY_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

/// 32 secret bytes: a host key or a data key. Never printed, wiped on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        SecretKey(b)
    }

    /// A fresh key from `fill` (the OS random generator in production).
    pub(crate) fn generate(fill: &mut dyn FnMut(&mut [u8])) -> Self {
        let mut b = [0u8; KEY_LEN];
        fill(&mut b);
        SecretKey(b)
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key's public name: 16 hex digits of a domain-separated SHA-256,
    /// so the same key has the same id on every host.
    pub fn id(&self) -> KeyId {
        let mut input = b"virt-tpm-state key id\0".to_vec();
        input.extend_from_slice(&self.0);
        let id = KeyId(Sha256Sum::of(&input).hex()[..16].to_string());
        input.zeroize();
        id
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A key id as written in the element: 16 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct KeyId(String);

impl KeyId {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        (s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| KeyId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The host keys this process may use, oldest first; the newest encrypts.
/// Key files that could not be used are listed by name, so that an element
/// sealed with one of them says which file to fix, and no other element
/// suffers from it.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: Vec<(KeyId, SecretKey)>,
    rejected: Vec<RejectedKey>,
    /// age identities that open files sealed for recipients: this host's
    /// (`host-id`) and any named with `--identity`.
    identities: Vec<crate::recipients::HostIdentity>,
    /// Why this host's identity file could not be used, if it exists but
    /// is unusable (never its content).
    identity_problem: Option<String>,
}

/// A key file that was not loaded, and why (never its content).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RejectedKey {
    /// The file's name in the keys dir.
    pub(crate) file: String,
    /// The key id its name carries (`<time>-<id>.key`), if any.
    pub(crate) id: Option<KeyId>,
    pub(crate) why: &'static str,
}

impl Keyring {
    pub fn new(keys: Vec<SecretKey>) -> Self {
        Self::with_rejected(keys, Vec::new())
    }

    pub(crate) fn with_rejected(keys: Vec<SecretKey>, rejected: Vec<RejectedKey>) -> Self {
        Keyring {
            keys: keys.into_iter().map(|k| (k.id(), k)).collect(),
            rejected,
            identities: Vec::new(),
            identity_problem: None,
        }
    }

    /// Adds age identities (tried in order).
    pub fn add_identities(&mut self, ids: Vec<crate::recipients::HostIdentity>) {
        self.identities.extend(ids);
    }

    /// Records why the host identity file could not be used.
    pub(crate) fn set_identity_problem(&mut self, why: String) {
        self.identity_problem = Some(why);
    }

    pub fn identities(&self) -> &[crate::recipients::HostIdentity] {
        &self.identities
    }

    pub(crate) fn identity_problem(&self) -> Option<&str> {
        self.identity_problem.as_deref()
    }

    /// The key file named for `id` that could not be used, if any.
    pub(crate) fn rejected_for(&self, id: &KeyId) -> Option<&RejectedKey> {
        self.rejected.iter().find(|r| r.id.as_ref() == Some(id))
    }

    pub(crate) fn rejected(&self) -> &[RejectedKey] {
        &self.rejected
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn newest(&self) -> Option<(&KeyId, &SecretKey)> {
        self.keys.last().map(|(i, k)| (i, k))
    }

    pub(crate) fn get(&self, id: &KeyId) -> Option<&SecretKey> {
        self.keys.iter().find(|(i, _)| i == id).map(|(_, k)| k)
    }

    pub(crate) fn ids(&self) -> Vec<&KeyId> {
        self.keys.iter().map(|(i, _)| i).collect()
    }
}

/// What a sealed file carries besides its ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sealed {
    pub(crate) key_id: KeyId,
    /// `nonce || sealed data key` (the `wrapped-key` attribute, decoded).
    pub(crate) wrapped_key: Vec<u8>,
    /// Nonce of the data seal (the `nonce` attribute, decoded).
    pub(crate) nonce: [u8; NONCE_LEN],
    pub(crate) ciphertext: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("the wrapped data key has the wrong length")]
    BadWrappedKey,
    #[error("the key does not open the wrapped data key: a wrong key, or the wrapped key, the file name, the key id or the domain uuid was altered")]
    WrongKeyOrTampered,
    #[error("the data does not open with its key: the ciphertext or its nonce was altered")]
    Tampered,
}

/// Associated data: what a seal is bound to. `what` separates the two seals.
fn associated_data(what: &str, uuid: &str, path: &str, key_id: &KeyId) -> Vec<u8> {
    format!("virt-tpm-state/1 {what}\0{uuid}\0{path}\0{key_id}").into_bytes()
}

/// Seals `plain` (the gzip stream of one file) for domain `uuid`, at
/// `path` (`tpm/<name>`), under host key `kek`.
pub(crate) fn seal(
    plain: &[u8],
    uuid: &str,
    path: &str,
    kek_id: &KeyId,
    kek: &SecretKey,
    fill: &mut dyn FnMut(&mut [u8]),
) -> Sealed {
    let dek = SecretKey::generate(fill);
    let mut nonce = [0u8; NONCE_LEN];
    fill(&mut nonce);
    let mut wrap_nonce = [0u8; NONCE_LEN];
    fill(&mut wrap_nonce);

    let ciphertext = ChaCha20Poly1305::new(dek.expose().into())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: &associated_data("file", uuid, path, kek_id),
            },
        )
        .expect("ChaCha20-Poly1305 (RFC 8439) encryption cannot fail for in-memory sizes");
    let sealed_dek = ChaCha20Poly1305::new(kek.expose().into())
        .encrypt(
            Nonce::from_slice(&wrap_nonce),
            Payload {
                msg: dek.expose(),
                aad: &associated_data("key", uuid, path, kek_id),
            },
        )
        .expect("ChaCha20-Poly1305 (RFC 8439) encryption cannot fail for in-memory sizes");
    let mut wrapped_key = wrap_nonce.to_vec();
    wrapped_key.extend_from_slice(&sealed_dek);
    Sealed {
        key_id: kek_id.clone(),
        wrapped_key,
        nonce,
        ciphertext,
    }
}

/// Opens what [`seal`] made; `kek` must be the key named by `s.key_id`.
pub(crate) fn open(
    s: &Sealed,
    uuid: &str,
    path: &str,
    kek: &SecretKey,
) -> Result<Vec<u8>, OpenError> {
    if s.wrapped_key.len() != WRAPPED_KEY_LEN {
        return Err(OpenError::BadWrappedKey);
    }
    let (wrap_nonce, sealed_dek) = s.wrapped_key.split_at(NONCE_LEN);
    let mut dek_bytes = ChaCha20Poly1305::new(kek.expose().into())
        .decrypt(
            Nonce::from_slice(wrap_nonce),
            Payload {
                msg: sealed_dek,
                aad: &associated_data("key", uuid, path, &s.key_id),
            },
        )
        .map_err(|_| OpenError::WrongKeyOrTampered)?;
    let mut arr = [0u8; KEY_LEN];
    arr.copy_from_slice(&dek_bytes);
    dek_bytes.zeroize();
    let dek = SecretKey(arr);
    arr.zeroize();
    ChaCha20Poly1305::new(dek.expose().into())
        .decrypt(
            Nonce::from_slice(&s.nonce),
            Payload {
                msg: &s.ciphertext,
                aad: &associated_data("file", uuid, path, &s.key_id),
            },
        )
        .map_err(|_| OpenError::Tampered)
}

/// The OS random generator.
pub(crate) fn os_random(buf: &mut [u8]) {
    getrandom::getrandom(buf).expect("the OS random generator failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d";
    const PATH: &str = "tpm/tpm2-00.permall";

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; 32])
    }

    fn sealed() -> (Sealed, SecretKey) {
        let k = key(1);
        let s = seal(b"gzip bytes", UUID, PATH, &k.id(), &k, &mut os_random);
        (s, k)
    }

    #[test]
    fn round_trip() {
        let (s, k) = sealed();
        assert_eq!(open(&s, UUID, PATH, &k).unwrap(), b"gzip bytes");
        assert_eq!(s.wrapped_key.len(), WRAPPED_KEY_LEN);
    }

    #[test]
    fn every_binding_is_checked() {
        let (s, k) = sealed();
        assert_eq!(
            open(&s, UUID, PATH, &key(2)),
            Err(OpenError::WrongKeyOrTampered)
        );
        assert_eq!(
            open(&s, "00000000-0000-0000-0000-000000000000", PATH, &k),
            Err(OpenError::WrongKeyOrTampered)
        );
        assert_eq!(
            open(&s, UUID, "tpm/tpm-00.permall", &k),
            Err(OpenError::WrongKeyOrTampered)
        );
        let mut t = s.clone();
        t.ciphertext[0] ^= 1;
        assert_eq!(open(&t, UUID, PATH, &k), Err(OpenError::Tampered));
        let mut t = s.clone();
        t.nonce[0] ^= 1;
        assert_eq!(open(&t, UUID, PATH, &k), Err(OpenError::Tampered));
        let mut t = s.clone();
        t.wrapped_key[0] ^= 1;
        assert_eq!(open(&t, UUID, PATH, &k), Err(OpenError::WrongKeyOrTampered));
        let mut t = s.clone();
        t.key_id = key(3).id();
        assert_eq!(open(&t, UUID, PATH, &k), Err(OpenError::WrongKeyOrTampered));
    }

    #[test]
    fn key_ids_and_redaction() {
        let k = key(7);
        assert_eq!(k.id(), key(7).id());
        assert_ne!(k.id(), key(8).id());
        assert!(KeyId::parse(k.id().as_str()).is_some());
        assert!(KeyId::parse("../../etc/passwd").is_none());
        assert_eq!(format!("{k:?}"), "SecretKey(<redacted>)");
        let ring = Keyring::new(vec![key(1), key(2)]);
        assert_eq!(ring.newest().unwrap().0, &key(2).id());
        assert!(ring.get(&key(1).id()).is_some());
        assert!(ring.get(&key(3).id()).is_none());
    }
}
