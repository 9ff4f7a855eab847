//! Format v1 of the metadata element: its names, the shared types, and the
//! header reader; [`encode`](encode::encode) writes an element and
//! [`decode`](decode::decode) reads one back. Pure: no I/O.
//!
//! The normative text is `docs/FORMAT.md`; comments quoting "MUST" point at
//! the rule of that spec each check enforces.

mod decode;
mod encode;
#[cfg(test)]
mod tests;

pub use decode::decode;
pub use encode::{encode, gzip_deterministic, EncodeError, Protection, Style};

use crate::envelope::{KeyId, OpenError};
use crate::recipients::{AgeOpenError, Fingerprint};
use crate::state::{state_digest, DomainUuid, MachineState, Sha256Sum, TpmVersion};
use crate::swtpm::HeaderError;
use crate::xml::XmlElement;

pub const NAMESPACE_URI: &str = "urn:virt-tpm-state:1";
pub(crate) const NAMESPACE_PREFIX: &str = "vts";
pub(crate) const FORMAT_VERSION: &str = "1";
pub(crate) const ENCODING_GZIP_BASE64: &str = "gzip+base64";
/// Envelope-encrypted gzip (docs/FORMAT.md, "Encrypted files").
pub(crate) const ENCODING_SEALED: &str = "gzip+chacha20poly1305+base64";
/// A standard age file of the gzip stream, sealed for a set of recipients
/// (docs/FORMAT.md, "Files sealed for recipients").
pub(crate) const ENCODING_AGE: &str = "gzip+age+base64";
/// Default cap on one decompressed file: far above a real permall (~6 KiB,
/// tens of KiB with many NV indices) and an x86 OVMF VARS store (128 KiB or
/// 528 KiB), far below what hurts the host.
pub(crate) const DEFAULT_MAX_FILE_SIZE: u64 = 1024 * 1024;

/// Who stored a state, when, and over what: everything in the element but
/// the files themselves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Provenance {
    pub uuid: DomainUuid,
    pub generation: u64,
    /// Digest of the state this one was stored over; `None` for the first.
    pub parent: Option<Sha256Sum>,
    /// RFC 3339 UTC time of the store (informational).
    pub stored: String,
    /// Host name of the store (informational).
    pub host: String,
}

impl serde::Serialize for DomainUuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl serde::Serialize for Sha256Sum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

/// A decoded, fully validated element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataState {
    pub provenance: Provenance,
    pub digest: Sha256Sum,
    /// The sections: a TPM state, a UEFI variable store, or both.
    pub state: MachineState,
    /// Host keys the files were sealed with (empty: plaintext).
    pub sealed_with: Vec<KeyId>,
    /// Recipients the files were sealed for (`gzip+age+base64`), by fingerprint.
    pub sealed_for: Vec<Fingerprint>,
    /// The age file of each file sealed for recipients, by `section/name`:
    /// what `rekey` re-wraps without touching its ciphertext.
    pub age_files: Vec<(String, Vec<u8>)>,
}

/// Limits applied while decoding hostile input.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest decompressed size accepted for one file.
    pub max_file_size: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_file_size: DEFAULT_MAX_FILE_SIZE,
        }
    }
}

/// Why an element was refused. Messages carry names, sizes and digest
/// prefixes, never content.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("the element is <{0}>, expected <state>")]
    WrongElement(String),
    #[error(
        "format {0:?} is not supported by this version (it reads format 1); upgrade virt-tpm-state"
    )]
    UnknownFormat(String),
    #[error("attribute {0:?} is missing")]
    MissingAttribute(&'static str),
    #[error("attribute {attribute:?} is invalid: {why}")]
    BadAttribute {
        attribute: &'static str,
        why: &'static str,
    },
    #[error("unknown section <{0}>; a newer virt-tpm-state wrote it, upgrade to read it")]
    UnknownSection(String),
    #[error("no <tpm>, <nvram> or <varstore> section")]
    NoSection,
    #[error("more than one <tpm> section")]
    DuplicateTpmSection,
    #[error("more than one UEFI variable store section (<nvram>, <varstore>)")]
    DuplicateNvramSection,
    #[error("TPM version {0:?} is not 1.2 or 2.0")]
    BadTpmVersion(String),
    #[error("file name {name:?} is not allowed for a TPM {version} state (allowed: {allowed})")]
    FileNameNotAllowed {
        name: String,
        version: TpmVersion,
        allowed: String,
    },
    #[error("file name {name:?} is not allowed in the <{section}> section (allowed: {allowed})")]
    NvramFileNameNotAllowed {
        name: String,
        section: &'static str,
        allowed: &'static str,
    },
    #[error("file {0:?} appears twice")]
    DuplicateFile(String),
    #[error("the <{0}> section holds no file")]
    NoFiles(&'static str),
    #[error("file {0:?}: encoding {1:?} is not supported (this version reads gzip+base64, gzip+chacha20poly1305+base64 and gzip+age+base64); upgrade virt-tpm-state")]
    UnknownEncoding(String, String),
    #[error("file {0:?}: the base64 text is invalid")]
    BadBase64(String),
    #[error("file {0:?}: the gzip data is invalid or truncated")]
    BadGzip(String),
    #[error("file {name:?}: declared size {size} exceeds the limit of {limit} bytes")]
    DeclaredTooLarge { name: String, size: u64, limit: u64 },
    #[error("file {name:?}: decompresses past the limit of {limit} bytes (decompression bomb?)")]
    DecompressedTooLarge { name: String, limit: u64 },
    #[error("file {name:?}: {actual} bytes, but size says {declared}")]
    SizeMismatch {
        name: String,
        declared: u64,
        actual: u64,
    },
    #[error("file {name:?}: sha256 is {actual}…, but the element says {declared}…")]
    Sha256Mismatch {
        name: String,
        declared: String,
        actual: String,
    },
    #[error("file {name:?}: not a valid swtpm state file or EK certificate: {source}")]
    BadSwtpmHeader { name: String, source: HeaderError },
    #[error("digest is {declared}…, but the files hash to {actual}…")]
    DigestMismatch { declared: String, actual: String },
    #[error("file {name:?} is encrypted with key {key_id}, which this host does not have in its keys directory (/etc/virt-tpm-state/keys/); copy that key from a host that has it")]
    MissingKey { name: String, key_id: KeyId },
    #[error("file {name:?} is encrypted with key {key_id}, whose {problem}")]
    UnusableKey {
        name: String,
        key_id: KeyId,
        /// "key file PATH cannot be used: WHY".
        problem: Box<str>,
    },
    #[error("file {name:?} does not decrypt with key {key_id}: {source}")]
    Decrypt {
        name: String,
        key_id: KeyId,
        source: OpenError,
    },
    #[error("file {name:?} is sealed for recipients {recipients}; {this_host}")]
    NotARecipient {
        name: String,
        /// The fingerprints, joined by ", ".
        recipients: Box<str>,
        /// What this host has and what to do (no secret).
        this_host: Box<str>,
    },
    #[error("file {name:?} does not open with this host's identity: {source}")]
    AgeDecrypt { name: String, source: AgeOpenError },
    #[error("file {name:?} is sealed for another domain or another file name (copied from another VM's metadata?); refusing it")]
    BindingMismatch { name: String },
    #[error("unexpected element <{0}> inside <{1}>")]
    UnexpectedElement(String, String),
}

impl FormatError {
    /// A key or identity problem is [`Exit::Key`](crate::exit::Exit::Key): the element is
    /// well-formed, but this host cannot open it, or what it opened is not
    /// this domain's. Anything else about the element is
    /// [`Exit::InvalidElement`](crate::exit::Exit::InvalidElement).
    pub(crate) fn exit_code(&self) -> crate::exit::Exit {
        match self {
            FormatError::MissingKey { .. }
            | FormatError::UnusableKey { .. }
            | FormatError::Decrypt { .. }
            | FormatError::NotARecipient { .. }
            | FormatError::AgeDecrypt { .. }
            | FormatError::BindingMismatch { .. } => crate::exit::Exit::Key,
            _ => crate::exit::Exit::InvalidElement,
        }
    }

    /// A key or identity problem ([`FormatError::exit_code`] is `Key`).
    pub(crate) fn is_key_problem(&self) -> bool {
        self.exit_code() == crate::exit::Exit::Key
    }
}

// ------------------------------------------------------- the header reader
// What `status`, `watch` and a chain of generations need without opening the
// files; `decode` starts with `read_header` too.

/// The digest of the element's sections `tpm`/`nvram` as its `<file>`
/// attributes declare them (format v1's digest rule over those files).
/// Not verified against the data: for `status` and `watch`, which compare
/// cheaply; everything is verified before anything is restored or stored.
/// `None` when an attribute is missing or malformed.
pub(crate) fn declared_digest(el: &XmlElement, tpm: bool, nvram: bool) -> Option<Sha256Sum> {
    let mut entries = Vec::new();
    // A UEFI variable store is either kind's section (never both).
    for (section, wanted) in [("tpm", tpm), ("nvram", nvram), ("varstore", nvram)] {
        if !wanted {
            continue;
        }
        for sec in el.children.iter().filter(|c| c.name == section) {
            for f in sec.children.iter().filter(|f| f.name == "file") {
                let sha = Sha256Sum::parse_hex(f.attr("sha256")?)?;
                entries.push((format!("{section}/{}", f.attr("name")?), sha));
            }
        }
    }
    Some(crate::state::state_digest(entries))
}

/// Validates and returns the element's own attributes (format, uuid,
/// generation, digest, parent, stored, host) without touching the files:
/// enough to continue a generation chain when the payload cannot be opened.
pub(crate) fn read_header(el: &XmlElement) -> Result<(Provenance, Sha256Sum), FormatError> {
    if el.name != "state" {
        return Err(FormatError::WrongElement(shown(&el.name)));
    }
    // MUST: a reader refuses an element whose `format` it does not know.
    let format = el
        .attr("format")
        .ok_or(FormatError::MissingAttribute("format"))?;
    if format != FORMAT_VERSION {
        return Err(FormatError::UnknownFormat(shown(format)));
    }
    let uuid = DomainUuid::parse_canonical(req(el, "uuid")?).ok_or(FormatError::BadAttribute {
        attribute: "uuid",
        why: "not a UUID",
    })?;
    let generation = parse_decimal(req(el, "generation")?).ok_or(FormatError::BadAttribute {
        attribute: "generation",
        why: "not a non-negative decimal integer",
    })?;
    let declared_digest = hex_attr(el, "digest")?;
    let parent = match el.attr("parent").unwrap_or("") {
        "" => None,
        p => Some(Sha256Sum::parse_hex(p).ok_or(FormatError::BadAttribute {
            attribute: "parent",
            why: "not empty and not 64 lowercase hex digits",
        })?),
    };
    let stored = el.attr("stored").unwrap_or("").to_string();
    let host = el.attr("host").unwrap_or("").to_string();

    Ok((
        Provenance {
            uuid,
            generation,
            parent,
            stored,
            host,
        },
        declared_digest,
    ))
}
/// A value from the hostile element as an error message may show it: at
/// most 40 characters, control characters escaped, so a refusal stays one
/// short line (on the hook's stderr and in syslog) whatever the element holds.
fn shown(s: &str) -> String {
    const MAX: usize = 40;
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn req<'a>(el: &'a XmlElement, name: &'static str) -> Result<&'a str, FormatError> {
    el.attr(name).ok_or(FormatError::MissingAttribute(name))
}

fn hex_attr(el: &XmlElement, name: &'static str) -> Result<Sha256Sum, FormatError> {
    Sha256Sum::parse_hex(req(el, name)?).ok_or(FormatError::BadAttribute {
        attribute: name,
        why: "not 64 lowercase hex digits",
    })
}

/// Plain decimal: digits only, no sign, no leading `+`, fits in u64.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The digest of a state given only `(name, sha256)` pairs (for callers that
/// know sums but not bytes).
pub fn digest_of_sums(version_files: &[(String, Sha256Sum)]) -> Sha256Sum {
    state_digest(version_files.iter().map(|(n, s)| (format!("tpm/{n}"), *s)))
}
