//! Sealing a file for a set of age recipients (encoding `gzip+age+base64`,
//! docs/FORMAT.md "Files sealed for recipients").
//!
//! The payload of such a file is a complete, standard age v1 file (one
//! X25519 or plugin stanza per recipient, then age's own
//! ChaCha20-Poly1305 STREAM payload) whose plaintext is the file's gzip
//! stream. So an owner holding an offline identity recovers a permall with
//! nothing but `base64 -d | rage -d -i owner.txt | gunzip`.
//!
//! The binding (domain UUID and file path) travels inside what age
//! authenticates: as the gzip header's comment (FCOMMENT), which `gunzip`
//! ignores. Only a holder of the file key can change it, so a sealed file
//! pasted into another domain or under another name is refused.
//!
//! Rekeying keeps the payload byte for byte: the file key is unwrapped with
//! this host's identity and wrapped again for the new set, and the header is
//! rebuilt as age's spec defines it (stanzas, then `---` and the header MAC,
//! HMAC-SHA-256 under HKDF(file key, "header")), using age-core's HKDF and
//! stanza parser; the age crate then checks the result on every open.
//!
//! Keys never reach an error or a log: errors carry fingerprints only.

use crate::state::Sha256Sum;
use age::secrecy::ExposeSecret;
use age_core::format::{FileKey, Stanza};
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use std::collections::HashSet;
use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;
use std::sync::Arc;

const AGE_V1_MAGIC: &[u8] = b"age-encryption.org/v1\n";
const MAC_TAG: &[u8] = b"---";

/// A recipient's public name in the element: 16 hex digits of a
/// domain-separated SHA-256 of its `age1…` text, the same on every host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn of(recipient_text: &str) -> Self {
        let mut input = b"virt-tpm-state recipient\0".to_vec();
        input.extend_from_slice(recipient_text.as_bytes());
        Fingerprint(Sha256Sum::of(&input).hex()[..16].to_string())
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        (s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Fingerprint(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Fingerprints joined by ", " (for one-line messages).
pub(crate) fn joined(fps: &[Fingerprint]) -> String {
    fps.iter()
        .map(Fingerprint::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One recipient: its text (`age1…`), fingerprint, and the age wrapper.
#[derive(Clone)]
pub struct Recipient {
    pub(crate) text: String,
    pub(crate) fingerprint: Fingerprint,
    inner: Arc<dyn age::Recipient + Send + Sync>,
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipient({})", self.text)
    }
}

/// A line of a recipients file that is not a recipient this version reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: line {line}: {why}")]
pub struct RecipientsError {
    pub(crate) origin: String,
    pub(crate) line: usize,
    pub(crate) why: String,
}

impl Recipient {
    /// Parses one `age1…` recipient: X25519, or `age1<plugin>1…` for a
    /// plugin (its `age-plugin-<name>` binary must then be on PATH).
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(r) = age::x25519::Recipient::from_str(text) {
            let text = r.to_string();
            return Ok(Recipient {
                fingerprint: Fingerprint::of(&text),
                text,
                inner: Arc::new(r),
            });
        }
        if let Ok(r) = age::plugin::Recipient::from_str(text) {
            let plugin = age::plugin::RecipientPluginV1::new(
                r.plugin(),
                std::slice::from_ref(&r),
                &[],
                age::NoCallbacks,
            )
            .map_err(|_| {
                format!(
                    "recipient needs the plugin binary age-plugin-{} on PATH, which is missing",
                    r.plugin()
                )
            })?;
            let text = r.to_string();
            return Ok(Recipient {
                fingerprint: Fingerprint::of(&text),
                text,
                inner: Arc::new(plugin),
            });
        }
        Err("not an age recipient (age1…); SSH keys and passphrases are not supported here".into())
    }
}

/// Parses a recipients file as `age -R` reads it: one recipient per line,
/// `#` comments and blank lines ignored.
pub(crate) fn parse_recipients(
    text: &str,
    origin: &str,
) -> Result<Vec<Recipient>, RecipientsError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let r = Recipient::parse(line).map_err(|why| RecipientsError {
            origin: origin.to_string(),
            line: i + 1,
            why,
        })?;
        out.push(r);
    }
    Ok(out)
}

/// The recipients a domain's files are sealed for, without duplicates,
/// sorted by fingerprint (so the element's `recipients` is stable).
#[derive(Debug, Clone, Default)]
pub struct RecipientSet {
    recipients: Vec<Recipient>,
    /// Where the set came from (the recipients dir, or the domain's file).
    pub(crate) origin: String,
}

impl RecipientSet {
    pub fn new(mut recipients: Vec<Recipient>, origin: String) -> Self {
        recipients.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        recipients.dedup_by(|a, b| a.fingerprint == b.fingerprint);
        RecipientSet { recipients, origin }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.recipients.is_empty()
    }

    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.recipients
            .iter()
            .map(|r| r.fingerprint.clone())
            .collect()
    }

    fn wrappers(&self) -> impl Iterator<Item = &dyn age::Recipient> {
        self.recipients
            .iter()
            .map(|r| r.inner.as_ref() as &dyn age::Recipient)
    }
}

/// An identity that opens files sealed for its recipient: this host's
/// (`host-id`), or one named with `--identity`.
#[derive(Clone)]
pub struct HostIdentity {
    /// Where it was read (a path), for messages.
    pub(crate) origin: String,
    /// Its recipient's fingerprint, when known (always for X25519; for a
    /// plugin identity, from a `# recipient: age1…` comment in its file).
    pub(crate) fingerprint: Option<Fingerprint>,
    /// Its recipient text, when known.
    pub recipient: Option<String>,
    inner: Arc<dyn age::Identity + Send + Sync>,
}

impl fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostIdentity({}, <redacted>)", self.origin)
    }
}

/// A new X25519 identity file's text (`age-keygen` layout) and its recipient.
pub fn generate_identity(comment: &str) -> (age::secrecy::SecretString, String) {
    let id = age::x25519::Identity::generate();
    let recipient = id.to_public().to_string();
    let text = format!(
        "# {comment}\n# public key: {recipient}\n{}\n",
        id.to_string().expose_secret()
    );
    (text.into(), recipient)
}

/// Parses an identity file (`age-keygen` output, or a plugin's identity
/// file with `AGE-PLUGIN-…` lines). Errors never quote the file.
pub fn parse_identities(text: &str, origin: &str) -> Result<Vec<HostIdentity>, String> {
    // A plugin's identity file names its recipient in a comment
    // (age-plugin-tpm: "# Recipient: age1tpm1…", age-keygen: "# public key: age1…").
    let commented_recipient = text.lines().find_map(|l| {
        let l = l.trim().strip_prefix('#')?.trim();
        let (label, value) = l.split_once(':')?;
        matches!(
            label.trim().to_ascii_lowercase().as_str(),
            "recipient" | "public key"
        )
        .then(|| value.trim().to_string())
        .filter(|v| v.starts_with("age1"))
    });
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Ok(id) = age::x25519::Identity::from_str(line) {
            let recipient = id.to_public().to_string();
            out.push(HostIdentity {
                origin: origin.to_string(),
                fingerprint: Some(Fingerprint::of(&recipient)),
                recipient: Some(recipient),
                inner: Arc::new(id),
            });
        } else if let Ok(id) = age::plugin::Identity::from_str(line) {
            let plugin = age::plugin::IdentityPluginV1::new(
                id.plugin(),
                std::slice::from_ref(&id),
                age::NoCallbacks,
            )
            .map_err(|_| {
                format!(
                    "{origin}: line {}: the identity needs the plugin binary age-plugin-{} on PATH, which is missing",
                    i + 1,
                    id.plugin()
                )
            })?;
            out.push(HostIdentity {
                origin: origin.to_string(),
                fingerprint: commented_recipient.as_deref().map(Fingerprint::of),
                recipient: commented_recipient.clone(),
                inner: Arc::new(plugin),
            });
        } else {
            return Err(format!(
                "{origin}: line {}: not an age identity (AGE-SECRET-KEY-1… or AGE-PLUGIN-…)",
                i + 1
            ));
        }
    }
    if out.is_empty() {
        return Err(format!("{origin}: holds no identity"));
    }
    Ok(out)
}

/// Why an age payload did not open. No key material, no plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgeOpenError {
    #[error("none of this host's identities is a recipient")]
    NotARecipient,
    #[error("not a valid age v1 file")]
    Malformed,
    #[error("the age file does not decrypt (tampered or truncated)")]
    Tampered,
    #[error("an identity plugin failed")]
    Plugin,
}

/// The gzip comment that binds a sealed file to its domain and path.
pub(crate) fn binding(uuid: &str, path: &str) -> String {
    format!("virt-tpm-state binding uuid={uuid} file={path}")
}

/// Seals `gz` (a gzip stream whose comment is [`binding`]) for `set`.
pub(crate) fn seal(gz: &[u8], set: &RecipientSet) -> Result<Vec<u8>, String> {
    let enc = age::Encryptor::with_recipients(set.wrappers())
        .map_err(|e| format!("cannot encrypt for recipients from {}: {e}", set.origin))?;
    let mut out = Vec::with_capacity(gz.len() + 300);
    let mut w = enc.wrap_output(&mut out).map_err(|e| format!("age: {e}"))?;
    w.write_all(gz).map_err(|e| format!("age: {e}"))?;
    w.finish().map_err(|e| format!("age: {e}"))?;
    Ok(out)
}

/// Opens an age file with `identities`, reading at most `cap` bytes.
pub(crate) fn open(
    age_file: &[u8],
    identities: &[HostIdentity],
    cap: u64,
) -> Result<Vec<u8>, AgeOpenError> {
    let dec = age::Decryptor::new_buffered(age_file).map_err(|_| AgeOpenError::Malformed)?;
    if dec.is_scrypt() {
        return Err(AgeOpenError::Malformed);
    }
    let mut reader = dec
        .decrypt(
            identities
                .iter()
                .map(|i| i.inner.as_ref() as &dyn age::Identity),
        )
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => AgeOpenError::NotARecipient,
            age::DecryptError::Plugin(_) => AgeOpenError::Plugin,
            _ => AgeOpenError::Tampered,
        })?;
    let mut out = Vec::new();
    (&mut reader)
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|_| AgeOpenError::Tampered)?;
    Ok(out)
}

/// The stanzas and payload of an age v1 file (the header MAC is checked
/// by the age crate when the file is opened, before anything trusts it).
fn split_header(age_file: &[u8]) -> Result<(Vec<Stanza>, &[u8]), AgeOpenError> {
    let mut rest = age_file
        .strip_prefix(AGE_V1_MAGIC)
        .ok_or(AgeOpenError::Malformed)?;
    let mut stanzas = Vec::new();
    while !rest.starts_with(MAC_TAG) {
        let (next, stanza) =
            age_core::format::read::age_stanza(rest).map_err(|_| AgeOpenError::Malformed)?;
        stanzas.push(Stanza::from(stanza));
        rest = next;
    }
    let eol = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(AgeOpenError::Malformed)?;
    Ok((stanzas, &rest[eol + 1..]))
}

/// Re-wraps the file key of `age_file` for `set`, keeping its payload (nonce
/// and ciphertext) byte for byte. `identities` must open it.
pub(crate) fn rewrap(
    age_file: &[u8],
    identities: &[HostIdentity],
    set: &RecipientSet,
) -> Result<Vec<u8>, String> {
    // The age crate checks the header MAC when it hands out the payload
    // reader: that proves the stanzas below belong to this file. The payload
    // itself is kept byte for byte, unread (every reader checks it later).
    let dec =
        age::Decryptor::new_buffered(age_file).map_err(|_| AgeOpenError::Malformed.to_string())?;
    if dec.is_scrypt() {
        return Err(AgeOpenError::Malformed.to_string());
    }
    dec.decrypt(
        identities
            .iter()
            .map(|i| i.inner.as_ref() as &dyn age::Identity),
    )
    .map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => AgeOpenError::NotARecipient.to_string(),
        _ => AgeOpenError::Tampered.to_string(),
    })?;
    let (stanzas, payload) = split_header(age_file).map_err(|e| e.to_string())?;
    let file_key: FileKey = identities
        .iter()
        .find_map(|i| i.inner.unwrap_stanzas(&stanzas))
        .ok_or_else(|| AgeOpenError::NotARecipient.to_string())?
        .map_err(|_| AgeOpenError::Tampered.to_string())?;
    let mut new_stanzas = Vec::new();
    let mut labels: Option<HashSet<String>> = None;
    for r in set.wrappers() {
        let (s, l) = r
            .wrap_file_key(&file_key)
            .map_err(|e| format!("cannot wrap for recipients from {}: {e}", set.origin))?;
        // age's rule: every recipient of a file carries the same labels.
        if labels.get_or_insert_with(|| l.clone()) != &l {
            return Err(format!(
                "recipients from {} cannot be combined in one file (their labels differ)",
                set.origin
            ));
        }
        new_stanzas.extend(s);
    }
    let mut header = AGE_V1_MAGIC.to_vec();
    for s in &new_stanzas {
        header.extend_from_slice(b"-> ");
        header.extend_from_slice(s.tag.as_bytes());
        for a in &s.args {
            header.push(b' ');
            header.extend_from_slice(a.as_bytes());
        }
        header.push(b'\n');
        let body = STANDARD_NO_PAD.encode(&s.body);
        let mut chunks = body.as_bytes().chunks(64).peekable();
        let mut last_full = body.is_empty();
        while let Some(c) = chunks.next() {
            header.extend_from_slice(c);
            header.push(b'\n');
            last_full = chunks.peek().is_none() && c.len() == 64;
        }
        // The last body line is always short: empty when the body fills whole lines.
        if last_full {
            header.push(b'\n');
        }
    }
    header.extend_from_slice(MAC_TAG);
    let mac_key = age_core::primitives::hkdf(&[], b"header", file_key.expose_secret());
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&mac_key).expect("HMAC takes any key size");
    mac.update(&header);
    header.push(b' ');
    header.extend_from_slice(
        STANDARD_NO_PAD
            .encode(mac.finalize().into_bytes())
            .as_bytes(),
    );
    header.push(b'\n');
    header.extend_from_slice(payload);
    Ok(header)
}

/// The payload part (nonce and STREAM ciphertext) of an age file: what
/// `rewrap` keeps unchanged.
pub fn payload_of(age_file: &[u8]) -> Option<&[u8]> {
    split_header(age_file).ok().map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> (HostIdentity, Recipient) {
        let (text, recipient) = generate_identity("test");
        let ids = parse_identities(text.expose_secret(), "test").unwrap();
        (ids[0].clone(), Recipient::parse(&recipient).unwrap())
    }

    #[test]
    fn seal_open_rewrap_keeps_payload() {
        let (a, ra) = identity();
        let (b, rb) = identity();
        let (c, rc) = identity();
        let set = RecipientSet::new(vec![ra.clone(), rb.clone()], "t".into());
        let sealed = seal(b"gzip bytes", &set).unwrap();
        assert_eq!(
            open(&sealed, std::slice::from_ref(&a), 1 << 20).unwrap(),
            b"gzip bytes"
        );
        assert_eq!(
            open(&sealed, std::slice::from_ref(&b), 1 << 20).unwrap(),
            b"gzip bytes"
        );
        assert_eq!(
            open(&sealed, std::slice::from_ref(&c), 1 << 20),
            Err(AgeOpenError::NotARecipient)
        );
        let to = RecipientSet::new(vec![ra, rc], "t".into());
        let re = rewrap(&sealed, std::slice::from_ref(&b), &to).unwrap();
        assert_eq!(payload_of(&re), payload_of(&sealed));
        assert_eq!(open(&re, &[c], 1 << 20).unwrap(), b"gzip bytes");
        assert_eq!(open(&re, &[a], 1 << 20).unwrap(), b"gzip bytes");
        assert_eq!(
            open(&re, std::slice::from_ref(&b), 1 << 20),
            Err(AgeOpenError::NotARecipient)
        );
        // A rewrap by a non-recipient is refused, and a tampered payload too.
        assert!(rewrap(&re, &[b], &to).is_err());
        let mut t = re.clone();
        let n = t.len() - 1;
        t[n] ^= 1;
        assert_eq!(
            open(&t, &[identity().0], 1 << 20),
            Err(AgeOpenError::NotARecipient)
        );
    }

    #[test]
    fn recipients_files_and_fingerprints() {
        let (_, r) = identity();
        let text = format!("# owner\n\n  {}  \n{}\n", r.text, r.text);
        let set = RecipientSet::new(parse_recipients(&text, "f").unwrap(), "f".into());
        assert_eq!(set.fingerprints(), vec![Fingerprint::of(&r.text)]);
        let e = parse_recipients("ssh-ed25519 AAAA\n", "f").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(Fingerprint::parse(Fingerprint::of("x").as_str()).is_some());
        assert!(parse_identities("# nothing\n", "o").is_err());
        assert!(parse_identities("AGE-SECRET-KEY-1NOPE\n", "o")
            .unwrap_err()
            .contains("line 1"));
    }
}
