//! Format v1 of the metadata element, both directions. Pure: no I/O.
//!
//! The normative text is `docs/FORMAT.md`; comments quoting "MUST" below
//! point at the rule of that spec each check enforces.

use crate::domain::XmlElement;
use crate::envelope::{
    open, os_random, seal, KeyId, Keyring, OpenError, Sealed, SecretKey, NONCE_LEN,
};
use crate::recipients::{AgeOpenError, Fingerprint, HostIdentity, RecipientSet};
use crate::state::{
    state_digest, DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion, VarsKind,
};
use crate::swtpm::{check_tpm_file, HeaderError};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use flate2::bufread::GzDecoder;
use flate2::{Compression, GzBuilder};
use quick_xml::escape::escape;
use std::io::{Read, Write};

pub const NAMESPACE_URI: &str = "urn:virt-tpm-state:1";
pub const NAMESPACE_PREFIX: &str = "vts";
pub const FORMAT_VERSION: &str = "1";
pub const ENCODING_GZIP_BASE64: &str = "gzip+base64";
/// Envelope-encrypted gzip (docs/FORMAT.md, "Encrypted files").
pub const ENCODING_SEALED: &str = "gzip+chacha20poly1305+base64";
/// A standard age file of the gzip stream, sealed for a set of recipients
/// (docs/FORMAT.md, "Files sealed for recipients").
pub const ENCODING_AGE: &str = "gzip+age+base64";
/// Default cap on one decompressed file: far above a real permall (~6 KiB,
/// tens of KiB with many NV indices) and an x86 OVMF VARS store (128 KiB or
/// 528 KiB), far below what hurts the host.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 1024 * 1024;

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
    /// A key or identity problem is [`Exit::Key`]: the element is
    /// well-formed, but this host cannot open it, or what it opened is not
    /// this domain's. Anything else about the element is
    /// [`Exit::InvalidElement`].
    pub fn exit_code(&self) -> crate::exit::Exit {
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
    pub fn is_key_problem(&self) -> bool {
        self.exit_code() == crate::exit::Exit::Key
    }
}

// ---------------------------------------------------------------- encoding

/// How to print the element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// For `virDomainSetMetadata`: no prefix, no `xmlns`; libvirt puts the
    /// element in the namespace itself.
    ForSetMetadata,
    /// A standalone document: prefixed and with its `xmlns:vts`
    /// declaration, as it appears in a domain's `<metadata>`.
    Standalone,
}

/// Compresses one file deterministically: gzip level 9, mtime 0, no name,
/// OS byte "unknown", so the same bytes always encode to the same text.
pub fn gzip_deterministic(data: &[u8]) -> Vec<u8> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), Compression::best());
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// How files are protected in the element.
pub enum Protection<'a> {
    /// `gzip+base64`: readable by anyone who can read the domain XML.
    Plain,
    /// `gzip+chacha20poly1305+base64` under a host key; `fill` supplies
    /// randomness (the OS generator unless a test needs determinism).
    Sealed {
        key_id: &'a KeyId,
        key: &'a SecretKey,
        fill: &'a mut dyn FnMut(&mut [u8]),
    },
    /// `gzip+age+base64` for every recipient of `set` (a fresh file key each).
    Recipients { set: &'a RecipientSet },
    /// `gzip+age+base64`, re-wrapping the file keys of `from` (an element's
    /// [`MetadataState::age_files`]) for `set`: ciphertexts unchanged.
    Rewrap {
        from: &'a [(String, Vec<u8>)],
        identities: &'a [HostIdentity],
        set: &'a RecipientSet,
    },
}

/// Encodes `state` as a format v1 element, in plaintext.
pub fn encode(state: &MachineState, provenance: &Provenance, style: Style) -> String {
    encode_with(state, provenance, style, Protection::Plain)
}

/// Encodes `state` sealed with host key `key` (random nonces and data keys).
pub fn encode_sealed(
    state: &MachineState,
    provenance: &Provenance,
    style: Style,
    key_id: &KeyId,
    key: &SecretKey,
) -> String {
    encode_with(
        state,
        provenance,
        style,
        Protection::Sealed {
            key_id,
            key,
            fill: &mut os_random,
        },
    )
}

/// Encodes with a plaintext or host-key protection (which cannot fail).
pub fn encode_with(
    state: &MachineState,
    provenance: &Provenance,
    style: Style,
    protection: Protection<'_>,
) -> String {
    try_encode_with(state, provenance, style, protection)
        .expect("only sealing for recipients can fail (a plugin)")
}

/// Encodes with any protection; sealing for recipients fails when a
/// plugin recipient fails (the message names it, never a secret).
pub fn try_encode_with(
    state: &MachineState,
    provenance: &Provenance,
    style: Style,
    mut protection: Protection<'_>,
) -> Result<String, String> {
    // For libvirt: no whitespace between elements, so libvirt's formatter
    // indents the element like the rest of the domain XML (it leaves
    // elements with text children alone).
    let (nl, i1, i2) = match style {
        Style::ForSetMetadata => ("", "", ""),
        Style::Standalone => ("\n", "  ", "    "),
    };
    let (p, xmlns) = match style {
        Style::ForSetMetadata => (String::new(), String::new()),
        Style::Standalone => (
            format!("{NAMESPACE_PREFIX}:"),
            format!(" xmlns:{NAMESPACE_PREFIX}=\"{NAMESPACE_URI}\""),
        ),
    };
    let parent = provenance.parent.map(|d| d.hex()).unwrap_or_default();
    let mut out = format!(
        "<{p}state{xmlns} format=\"{FORMAT_VERSION}\" uuid=\"{}\" generation=\"{}\" digest=\"{}\" parent=\"{}\" stored=\"{}\" host=\"{}\">{nl}",
        provenance.uuid,
        provenance.generation,
        state.digest().hex(),
        parent,
        attribute_text(&provenance.stored),
        attribute_text(&provenance.host),
    );
    // Sections in a fixed order: <tpm> first, then <nvram> or <varstore>.
    let mut sections: Vec<(&str, String, &[StateFile])> = Vec::new();
    if let Some(tpm) = &state.tpm {
        sections.push(("tpm", format!(" version=\"{}\"", tpm.version), tpm.files()));
    }
    if let (Some(vars), Some(kind)) = (&state.nvram, state.vars_kind()) {
        sections.push((kind.section(), String::new(), std::slice::from_ref(vars)));
    }
    for (section, attrs, files) in sections {
        out.push_str(&format!("{i1}<{p}{section}{attrs}>{nl}"));
        for f in files {
            let path = format!("{section}/{}", f.name);
            let (encoding, extra, payload) = match &mut protection {
                Protection::Recipients { set } => {
                    let gz = gzip_bound(
                        &f.data,
                        &crate::recipients::binding(provenance.uuid.as_str(), &path),
                    );
                    (
                        ENCODING_AGE,
                        recipients_attr(set),
                        crate::recipients::seal(&gz, set)?,
                    )
                }
                Protection::Rewrap {
                    from,
                    identities,
                    set,
                } => {
                    let age_file = from
                        .iter()
                        .find(|(p, _)| *p == path)
                        .map(|(_, a)| a)
                        .ok_or_else(|| format!("file {path} is not sealed for recipients; rekey --rotate seals it afresh"))?;
                    (
                        ENCODING_AGE,
                        recipients_attr(set),
                        crate::recipients::rewrap(age_file, identities, set)
                            .map_err(|e| format!("file {path}: {e}"))?,
                    )
                }
                _ => {
                    let gz = gzip_deterministic(&f.data);
                    match &mut protection {
                        Protection::Plain => (ENCODING_GZIP_BASE64, String::new(), gz),
                        Protection::Sealed { key_id, key, fill } => {
                            let sealed = seal(
                                &gz,
                                provenance.uuid.as_str(),
                                &format!("{section}/{}", f.name),
                                key_id,
                                key,
                                *fill,
                            );
                            (
                                ENCODING_SEALED,
                                format!(
                                    " key=\"{}\" wrapped-key=\"{}\" nonce=\"{}\"",
                                    sealed.key_id,
                                    STANDARD.encode(&sealed.wrapped_key),
                                    STANDARD.encode(sealed.nonce)
                                ),
                                sealed.ciphertext,
                            )
                        }
                        Protection::Recipients { .. } | Protection::Rewrap { .. } => unreachable!(),
                    }
                }
            };
            out.push_str(&format!(
                "{i2}<{p}file name=\"{}\" size=\"{}\" sha256=\"{}\" encoding=\"{encoding}\"{extra}>{}</{p}file>{nl}",
                escape(f.name.as_str()),
                f.data.len(),
                f.sha256().hex(),
                STANDARD.encode(payload),
            ));
        }
        out.push_str(&format!("{i1}</{p}{section}>{nl}"));
    }
    out.push_str(&format!("</{p}state>"));
    Ok(out)
}

/// ` recipients="FP FP …"`: who can open a file, public fingerprints only.
fn recipients_attr(set: &RecipientSet) -> String {
    let fps: Vec<String> = set.fingerprints().iter().map(|f| f.to_string()).collect();
    format!(" recipients=\"{}\"", fps.join(" "))
}

/// Compresses one file like [`gzip_deterministic`], with the binding of a
/// file sealed for recipients as the gzip comment (which gunzip ignores).
pub fn gzip_bound(data: &[u8], binding: &str) -> Vec<u8> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .comment(binding.as_bytes())
        .write(Vec::new(), Compression::best());
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// `s` as an attribute value that any conforming XML parser (libvirt's
/// libxml2 included) reads back as `s`: markup characters escaped, and tab,
/// newline and carriage return as character references, because a parser
/// normalizes them to spaces when they appear literally in an attribute.
/// Characters XML 1.0 cannot carry at all (most C0 controls, U+FFFE, U+FFFF)
/// become U+FFFD: libvirt would refuse the whole element otherwise. Only the
/// informational `stored` and `host` need this; everything else the encoder
/// writes is hex, decimal or a fixed name.
fn attribute_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(xml_char(c)),
        }
    }
    out
}

/// `c` if XML 1.0 allows it in a document, else U+FFFD.
fn xml_char(c: char) -> char {
    match c {
        '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'.. => c,
        _ => char::REPLACEMENT_CHARACTER,
    }
}

// ---------------------------------------------------------------- decoding

/// Decodes and validates our element. Nothing is trusted until every check
/// below has passed; on success the state is exactly what was stored.
pub fn decode(el: &XmlElement, limits: DecodeLimits) -> Result<MetadataState, FormatError> {
    decode_with_keys(el, limits, &Keyring::default())
}

/// Which sections an element holds: a TPM, a UEFI variable store
/// (`<nvram>` or `<varstore>`).
pub fn declared_sections(el: &XmlElement) -> (bool, bool) {
    let has = |n: &str| el.children.iter().any(|c| c.name == n);
    (has("tpm"), has("nvram") || has("varstore"))
}

/// The digest of the element's sections `tpm`/`nvram` as its `<file>`
/// attributes declare them (format v1's digest rule over those files).
/// Not verified against the data: for `status` and `watch`, which compare
/// cheaply; everything is verified before anything is restored or stored.
/// `None` when an attribute is missing or malformed.
pub fn declared_digest(el: &XmlElement, tpm: bool, nvram: bool) -> Option<Sha256Sum> {
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
pub fn read_header(el: &XmlElement) -> Result<(Provenance, Sha256Sum), FormatError> {
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

/// [`decode`], opening encrypted files with the host keys in `keys`.
pub fn decode_with_keys(
    el: &XmlElement,
    limits: DecodeLimits,
    keys: &Keyring,
) -> Result<MetadataState, FormatError> {
    let (provenance, declared_digest) = read_header(el)?;
    let uuid = provenance.uuid.clone();
    // MUST: at most one <tpm> section and one variable store section
    // (<nvram> or <varstore>: a domain has one of them), at least one
    // section; unknown sections are refused, because their files take part
    // in `digest` and cannot be skipped.
    let mut tpm_section = None;
    let mut nvram_section: Option<(&XmlElement, VarsKind)> = None;
    for child in &el.children {
        let kind = match child.name.as_str() {
            "tpm" if tpm_section.is_some() => return Err(FormatError::DuplicateTpmSection),
            "tpm" => {
                tpm_section = Some(child);
                continue;
            }
            "nvram" => VarsKind::Nvram,
            "varstore" => VarsKind::Varstore,
            other => return Err(FormatError::UnknownSection(shown(other))),
        };
        if nvram_section.is_some() {
            return Err(FormatError::DuplicateNvramSection);
        }
        nvram_section = Some((child, kind));
    }
    if tpm_section.is_none() && nvram_section.is_none() {
        return Err(FormatError::NoSection);
    }
    let mut seals = Seals::default();
    let mut tpm = None;
    if let Some(section) = tpm_section {
        let version_text = section
            .attr("version")
            .ok_or(FormatError::MissingAttribute("version"))?;
        let version = TpmVersion::parse(version_text)
            .ok_or_else(|| FormatError::BadTpmVersion(shown(version_text)))?;
        let files = decode_section(
            section,
            Section::Tpm(version),
            limits,
            uuid.as_str(),
            keys,
            &mut seals,
        )?;
        tpm = Some(TpmState::new(version, files));
    }
    let mut nvram = None;
    if let Some((section, kind)) = nvram_section {
        let mut files = decode_section(
            section,
            Section::Vars(kind),
            limits,
            uuid.as_str(),
            keys,
            &mut seals,
        )?;
        // The name check allows the kind's one name and duplicates are
        // refused: exactly one file.
        nvram = files.pop();
    }
    let state = MachineState { tpm, nvram };
    // MUST: `digest` equals the sha256 of the sorted `<section>/<name> <sha256>\n` lines.
    let actual = state.digest();
    if actual != declared_digest {
        return Err(FormatError::DigestMismatch {
            declared: declared_digest.short(),
            actual: actual.short(),
        });
    }
    Ok(MetadataState {
        provenance,
        digest: actual,
        state,
        sealed_with: seals.keys,
        sealed_for: seals.recipients,
        age_files: seals.age_files,
    })
}

/// How the files of an element were sealed, collected while decoding.
#[derive(Default)]
struct Seals {
    keys: Vec<KeyId>,
    recipients: Vec<Fingerprint>,
    age_files: Vec<(String, Vec<u8>)>,
}

/// How one file was sealed.
enum FileSeal {
    Plain,
    Key(KeyId),
    Age {
        recipients: Vec<Fingerprint>,
        age_file: Vec<u8>,
    },
}

/// Which section a file belongs to: decides the allowed names, the
/// content check and the path in the seal's associated data.
#[derive(Debug, Clone, Copy)]
enum Section {
    Tpm(TpmVersion),
    Vars(VarsKind),
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Section::Tpm(_) => "tpm",
            Section::Vars(kind) => kind.section(),
        }
    }
}

fn decode_section(
    section: &XmlElement,
    kind: Section,
    limits: DecodeLimits,
    uuid: &str,
    keys: &Keyring,
    seals: &mut Seals,
) -> Result<Vec<StateFile>, FormatError> {
    let mut files: Vec<StateFile> = Vec::new();
    for f in &section.children {
        if f.name != "file" {
            return Err(FormatError::UnexpectedElement(
                shown(&f.name),
                kind.name().into(),
            ));
        }
        let (file, seal) = decode_file(f, kind, limits, uuid, keys)?;
        match seal {
            FileSeal::Plain => {}
            FileSeal::Key(k) => {
                if !seals.keys.contains(&k) {
                    seals.keys.push(k);
                }
            }
            FileSeal::Age {
                recipients,
                age_file,
            } => {
                for r in recipients {
                    if !seals.recipients.contains(&r) {
                        seals.recipients.push(r);
                    }
                }
                seals
                    .age_files
                    .push((format!("{}/{}", kind.name(), file.name), age_file));
            }
        }
        // MUST: file names are unique within a section.
        if files.iter().any(|x| x.name == file.name) {
            return Err(FormatError::DuplicateFile(file.name));
        }
        files.push(file);
    }
    if files.is_empty() {
        return Err(FormatError::NoFiles(kind.name()));
    }
    Ok(files)
}

fn decode_file(
    f: &XmlElement,
    section: Section,
    limits: DecodeLimits,
    uuid: &str,
    keys: &Keyring,
) -> Result<(StateFile, FileSeal), FormatError> {
    let name = req(f, "name")?.to_string();
    // MUST: a <file> holds text only; an element in it would be skipped
    // silently while its surrounding text is decoded.
    if let Some(child) = f.children.first() {
        return Err(FormatError::UnexpectedElement(
            shown(&child.name),
            "file".into(),
        ));
    }
    // MUST: only the names listed for the section (and the TPM version);
    // never a path.
    match section {
        Section::Tpm(version) if !version.allowed_files().contains(&name.as_str()) => {
            return Err(FormatError::FileNameNotAllowed {
                name: shown(&name),
                version,
                allowed: version.allowed_files().join(", "),
            });
        }
        Section::Vars(kind) if name != kind.file_name() => {
            return Err(FormatError::NvramFileNameNotAllowed {
                name: shown(&name),
                section: kind.section(),
                allowed: kind.file_name(),
            });
        }
        _ => {}
    }
    let encoding = req(f, "encoding")?;
    if ![ENCODING_GZIP_BASE64, ENCODING_SEALED, ENCODING_AGE].contains(&encoding) {
        return Err(FormatError::UnknownEncoding(name, shown(encoding)));
    }
    let size = parse_decimal(req(f, "size")?).ok_or(FormatError::BadAttribute {
        attribute: "size",
        why: "not a non-negative decimal integer",
    })?;
    let declared_sha = hex_attr(f, "sha256")?;
    if size > limits.max_file_size {
        return Err(FormatError::DeclaredTooLarge {
            name,
            size,
            limit: limits.max_file_size,
        });
    }
    // MUST: decoders ignore ASCII whitespace inside the base64 text.
    let compact: Vec<u8> = f
        .text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let payload = STANDARD
        .decode(&compact)
        .map_err(|_| FormatError::BadBase64(name.clone()))?;
    let path = format!("{}/{name}", section.name());
    let (gz, seal) = if encoding == ENCODING_SEALED {
        let (gz, key) = open_sealed(f, section, &name, payload, uuid, keys)?;
        (gz, FileSeal::Key(key))
    } else if encoding == ENCODING_AGE {
        let recipients = recipients_of(f)?;
        let gz = open_age(&name, &payload, &recipients, keys, limits)?;
        (
            gz,
            FileSeal::Age {
                recipients,
                age_file: payload,
            },
        )
    } else {
        (payload, FileSeal::Plain)
    };
    let (data, comment) = gunzip_capped(&gz, limits.max_file_size).map_err(|e| match e {
        GunzipError::TooLarge => FormatError::DecompressedTooLarge {
            name: name.clone(),
            limit: limits.max_file_size,
        },
        GunzipError::Invalid => FormatError::BadGzip(name.clone()),
    })?;
    // MUST: a file sealed for recipients carries its binding (the domain's
    // uuid and the file's path) as the gzip comment, inside what age
    // authenticates: a file pasted into another domain or name is refused.
    if matches!(seal, FileSeal::Age { .. })
        && comment.as_deref() != Some(crate::recipients::binding(uuid, &path).as_bytes())
    {
        return Err(FormatError::BindingMismatch { name });
    }
    if data.len() as u64 != size {
        return Err(FormatError::SizeMismatch {
            name,
            declared: size,
            actual: data.len() as u64,
        });
    }
    let actual_sha = Sha256Sum::of(&data);
    if actual_sha != declared_sha {
        return Err(FormatError::Sha256Mismatch {
            name,
            declared: declared_sha.short(),
            actual: actual_sha.short(),
        });
    }
    let file = StateFile { name, data };
    // The content check applies to TPM files (swtpm header, EK certificate
    // shape); a VARS store is opaque firmware data (size and sha256 above
    // are its checks).
    if let Section::Tpm(version) = section {
        check_tpm_file(version, &file).map_err(|source| FormatError::BadSwtpmHeader {
            name: file.name.clone(),
            source,
        })?;
    }
    Ok((file, seal))
}

/// The `recipients` attribute of a file sealed for recipients: fingerprints,
/// separated by spaces (informational: age itself decides who opens it).
fn recipients_of(f: &XmlElement) -> Result<Vec<Fingerprint>, FormatError> {
    req(f, "recipients")?
        .split_ascii_whitespace()
        .map(|w| {
            Fingerprint::parse(w).ok_or(FormatError::BadAttribute {
                attribute: "recipients",
                why: "not a list of 16-hex-digit fingerprints",
            })
        })
        .collect()
}

/// Opens a `gzip+age+base64` payload with the keyring's age identities.
fn open_age(
    name: &str,
    age_file: &[u8],
    recipients: &[Fingerprint],
    keys: &Keyring,
    limits: DecodeLimits,
) -> Result<Vec<u8>, FormatError> {
    // The gzip stream of a file under the size limit is smaller than the
    // limit plus gzip's worst-case overhead; anything larger is refused.
    let cap = limits.max_file_size + limits.max_file_size / 100 + 1024;
    crate::recipients::open(age_file, keys.identities(), cap).map_err(|source| match source {
        AgeOpenError::NotARecipient => FormatError::NotARecipient {
            name: name.to_string(),
            recipients: crate::recipients::joined(recipients).into(),
            this_host: this_host_clause(keys).into(),
        },
        source => FormatError::AgeDecrypt {
            name: name.to_string(),
            source,
        },
    })
}

/// What this host has, and the command that makes it a recipient: the
/// second half of the one line a refused start shows.
fn this_host_clause(keys: &Keyring) -> String {
    const ADD: &str = "add it to /etc/virt-tpm-state/recipients.d/ on a host that opens this VM and run `virt-tpm-state rekey` there";
    if let Some(problem) = keys.identity_problem() {
        return format!("this host's {problem}");
    }
    let fps: Vec<Fingerprint> = keys
        .identities()
        .iter()
        .filter_map(|i| i.fingerprint.clone())
        .collect();
    match (keys.identities().is_empty(), fps.is_empty()) {
        (true, _) => format!("this host has no identity: run `virt-tpm-state host-id init` here, then {ADD}"),
        (false, true) => format!("this host's identity is not one of them: `virt-tpm-state host-id` prints its recipient; {ADD}"),
        (false, false) => format!(
            "this host (recipient {}) is not one of them: `virt-tpm-state host-id` prints its recipient; {ADD}",
            crate::recipients::joined(&fps)
        ),
    }
}

/// Opens a `gzip+chacha20poly1305+base64` payload: the key named by `key`
/// must be in `keys`; the seal is bound to the element's uuid and the file.
fn open_sealed(
    f: &XmlElement,
    section: Section,
    name: &str,
    ciphertext: Vec<u8>,
    uuid: &str,
    keys: &Keyring,
) -> Result<(Vec<u8>, KeyId), FormatError> {
    let key_id = KeyId::parse(req(f, "key")?).ok_or(FormatError::BadAttribute {
        attribute: "key",
        why: "not 16 lowercase hex digits",
    })?;
    let b64 = |attr: &'static str| {
        STANDARD
            .decode(req(f, attr)?)
            .map_err(|_| FormatError::BadAttribute {
                attribute: attr,
                why: "not valid base64",
            })
    };
    let wrapped_key = b64("wrapped-key")?;
    let nonce: [u8; NONCE_LEN] =
        b64("nonce")?
            .try_into()
            .map_err(|_| FormatError::BadAttribute {
                attribute: "nonce",
                why: "not 12 bytes",
            })?;
    let kek = keys
        .get(&key_id)
        .ok_or_else(|| match keys.rejected_for(&key_id) {
            Some(bad) => FormatError::UnusableKey {
                name: name.to_string(),
                key_id: key_id.clone(),
                problem: format!("key file {} cannot be used: {}", bad.file, bad.why).into(),
            },
            None => FormatError::MissingKey {
                name: name.to_string(),
                key_id: key_id.clone(),
            },
        })?;
    let sealed = Sealed {
        key_id: key_id.clone(),
        wrapped_key,
        nonce,
        ciphertext,
    };
    let gz = open(&sealed, uuid, &format!("{}/{name}", section.name()), kek).map_err(|source| {
        FormatError::Decrypt {
            name: name.to_string(),
            key_id: key_id.clone(),
            source,
        }
    })?;
    Ok((gz, key_id))
}

enum GunzipError {
    TooLarge,
    Invalid,
}

/// Decompresses one gzip member, never producing more than `cap` bytes, and
/// refuses trailing garbage after it.
/// Also returns the gzip header's comment, if any.
fn gunzip_capped(gz: &[u8], cap: u64) -> Result<(Vec<u8>, Option<Vec<u8>>), GunzipError> {
    // The bufread decoder consumes exactly one member from the slice, so
    // what is left of it afterwards is whatever followed the member.
    let mut dec = GzDecoder::new(gz);
    let mut out = Vec::new();
    (&mut dec)
        .take(cap + 1)
        .read_to_end(&mut out)
        .map_err(|_| GunzipError::Invalid)?;
    if out.len() as u64 > cap {
        return Err(GunzipError::TooLarge);
    }
    // MUST: exactly one gzip member and nothing after it (a second member or
    // trailing bytes would otherwise be silently ignored).
    if !dec.get_ref().is_empty() {
        return Err(GunzipError::Invalid);
    }
    let comment = dec.header().and_then(|h| h.comment()).map(<[u8]>::to_vec);
    Ok((out, comment))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_domain;
    use crate::swtpm::synthetic_blob;

    const UUID: &str = "6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d";

    fn sample() -> (MachineState, Provenance) {
        let tpm = MachineState::from(TpmState::new(
            TpmVersion::V2_0,
            vec![StateFile {
                name: "tpm2-00.permall".into(),
                data: synthetic_blob(0, &[7u8; 300]),
            }],
        ));
        let prov = Provenance {
            uuid: DomainUuid::parse(UUID).unwrap(),
            generation: 3,
            parent: Some(Sha256Sum::of(b"older")),
            stored: "2026-11-23T00:00:00Z".into(),
            host: "host-a & <b>".into(),
        };
        (tpm, prov)
    }

    fn in_domain(element: &str) -> XmlElement {
        let xml = format!(
            "<domain><name>v</name><uuid>{UUID}</uuid><metadata>{element}</metadata></domain>"
        );
        parse_domain(xml.as_bytes(), NAMESPACE_URI)
            .unwrap()
            .metadata
            .expect("element found")
    }

    #[test]
    fn round_trip_standalone() {
        let (tpm, prov) = sample();
        let text = encode(&tpm, &prov, Style::Standalone);
        let back = decode(&in_domain(&text), DecodeLimits::default()).unwrap();
        assert_eq!(back.state, tpm);
        assert_eq!(back.provenance, prov);
        assert_eq!(back.digest, tpm.digest());
    }

    #[test]
    fn round_trip_as_libvirt_namespaces_only_the_root() {
        // libvirt puts the root in the namespace; children may stay unprefixed.
        let (tpm, prov) = sample();
        let text = encode(&tpm, &prov, Style::ForSetMetadata).replacen(
            "<state ",
            &format!("<vts:state xmlns:vts=\"{NAMESPACE_URI}\" "),
            1,
        );
        let text = text.replace("</state>", "</vts:state>");
        let back = decode(&in_domain(&text), DecodeLimits::default()).unwrap();
        assert_eq!(back.state, tpm);
    }

    #[test]
    fn encoding_is_deterministic() {
        let (tpm, prov) = sample();
        assert_eq!(
            encode(&tpm, &prov, Style::Standalone),
            encode(&tpm, &prov, Style::Standalone)
        );
        let gz = gzip_deterministic(b"abc");
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "mtime must be 0");
        assert_eq!(gz[3] & 0x08, 0, "no file name");
    }

    #[test]
    fn whitespace_in_base64_is_ignored() {
        let (tpm, prov) = sample();
        let text = encode(&tpm, &prov, Style::Standalone);
        let start = text.find("gzip+base64\">").unwrap() + "gzip+base64\">".len();
        let end = text[start..].find('<').unwrap() + start;
        let b64 = &text[start..end];
        let wrapped: String = b64
            .as_bytes()
            .chunks(10)
            .map(|c| format!("\n      {}", std::str::from_utf8(c).unwrap()))
            .collect();
        let text = format!("{}{}\n    {}", &text[..start], wrapped, &text[end..]);
        decode(&in_domain(&text), DecodeLimits::default()).unwrap();
    }

    fn refused(text: &str) -> FormatError {
        decode(&in_domain(text), DecodeLimits::default()).unwrap_err()
    }

    fn sample_text() -> String {
        let (tpm, prov) = sample();
        encode(&tpm, &prov, Style::Standalone)
    }

    #[test]
    fn refuses_unknown_format_and_encoding() {
        let t = sample_text().replace("format=\"1\"", "format=\"2\"");
        assert_eq!(refused(&t), FormatError::UnknownFormat("2".into()));
        let t = sample_text().replace("gzip+base64", "zstd+base64");
        assert!(matches!(refused(&t), FormatError::UnknownEncoding(..)));
    }

    #[test]
    fn refuses_bad_names_and_duplicates() {
        for bad in [
            "../../etc/shadow",
            "tpm2-00.volatilestate",
            "tpm-00.permall",
            "",
        ] {
            let t = sample_text().replace("name=\"tpm2-00.permall\"", &format!("name=\"{bad}\""));
            assert!(
                matches!(refused(&t), FormatError::FileNameNotAllowed { .. }),
                "{bad}"
            );
        }
        let t = sample_text();
        let start = t.find("    <vts:file").unwrap();
        let end = t.find("</vts:file>\n").unwrap() + "</vts:file>\n".len();
        let dup = format!("{}{}{}", &t[..end], &t[start..end], &t[end..]);
        assert!(matches!(refused(&dup), FormatError::DuplicateFile(_)));
    }

    /// An EK certificate travels beside the permall (TPM 2.0 only), is
    /// checked for its DER shape, and takes part in the digest.
    #[test]
    fn ek_certificates_round_trip_and_are_checked() {
        let (_, prov) = sample();
        let mut cert = vec![0x30, 0x82, 0x03, 0x00];
        cert.extend(std::iter::repeat_n(0x5a, 0x300));
        let files = |cert_name: &str, cert: &[u8]| {
            vec![
                StateFile {
                    name: "tpm2-00.permall".into(),
                    data: synthetic_blob(0, &[7u8; 300]),
                },
                StateFile {
                    name: cert_name.into(),
                    data: cert.to_vec(),
                },
            ]
        };
        let state = MachineState::from(TpmState::new(
            TpmVersion::V2_0,
            files("ek-rsa2048.crt", &cert),
        ));
        let text = encode(&state, &prov, Style::Standalone);
        let back = decode(&in_domain(&text), DecodeLimits::default()).unwrap();
        assert_eq!(back.state, state);
        let without = MachineState::from(TpmState::new(
            TpmVersion::V2_0,
            files("ek-rsa2048.crt", &cert)[..1].to_vec(),
        ));
        assert_ne!(state.digest(), without.digest());
        // A torn certificate is refused like a torn permall.
        let torn = MachineState::from(TpmState::new(
            TpmVersion::V2_0,
            files("ek-secp384r1.crt", &cert[..cert.len() - 1]),
        ));
        let text = encode(&torn, &prov, Style::Standalone);
        assert!(matches!(
            refused(&text),
            FormatError::BadSwtpmHeader { ref name, .. } if name == "ek-secp384r1.crt"
        ));
        // Never other names: swtpm's backup, other certificate files, and
        // no certificate beside a TPM 1.2 permall.
        for bad in ["tpm2-00.permall.bak", "iak-rsa2048.crt", "ek.cert"] {
            let text = encode(&state, &prov, Style::Standalone)
                .replace("name=\"ek-rsa2048.crt\"", &format!("name=\"{bad}\""));
            assert!(
                matches!(refused(&text), FormatError::FileNameNotAllowed { .. }),
                "{bad}"
            );
        }
        assert!(TpmVersion::V1_2.ek_cert_files().is_empty());
    }

    #[test]
    fn refuses_bad_base64_sizes_and_sums() {
        let t = sample_text().replace("gzip+base64\">", "gzip+base64\">!!");
        assert!(matches!(refused(&t), FormatError::BadBase64(_)));
        let t = sample_text().replace("size=\"310\"", "size=\"311\"");
        assert!(matches!(refused(&t), FormatError::SizeMismatch { .. }));
        let t = sample_text().replace("size=\"310\"", "size=\"99999999999\"");
        assert!(matches!(refused(&t), FormatError::DeclaredTooLarge { .. }));
        let (tpm, _) = sample();
        let sha = tpm.tpm.as_ref().unwrap().files()[0].sha256().hex();
        let t = sample_text().replace(&sha, &Sha256Sum::of(b"x").hex());
        assert!(matches!(refused(&t), FormatError::Sha256Mismatch { .. }));
        let t = sample_text().replace(&tpm.digest().hex(), &Sha256Sum::of(b"x").hex());
        assert!(matches!(refused(&t), FormatError::DigestMismatch { .. }));
        let t = sample_text().replace("generation=\"3\"", "generation=\"-3\"");
        assert!(matches!(
            refused(&t),
            FormatError::BadAttribute {
                attribute: "generation",
                ..
            }
        ));
        let t = sample_text().replace(&format!("uuid=\"{UUID}\""), "uuid=\"x\"");
        assert!(matches!(
            refused(&t),
            FormatError::BadAttribute {
                attribute: "uuid",
                ..
            }
        ));
    }

    #[test]
    fn refuses_decompression_bomb() {
        let bomb_data = vec![0u8; 8 * 1024 * 1024];
        let b64 = STANDARD.encode(gzip_deterministic(&bomb_data));
        let sha = Sha256Sum::of(&bomb_data);
        let digest = digest_of_sums(&[("tpm2-00.permall".into(), sha)]);
        // The size attribute lies (small) to get past the declared-size check.
        let t = format!(
            "<vts:state xmlns:vts=\"{NAMESPACE_URI}\" format=\"1\" uuid=\"{UUID}\" generation=\"1\" digest=\"{}\" parent=\"\" stored=\"\" host=\"\"><vts:tpm version=\"2.0\"><vts:file name=\"tpm2-00.permall\" size=\"100\" sha256=\"{}\" encoding=\"gzip+base64\">{b64}</vts:file></vts:tpm></vts:state>",
            digest.hex(),
            sha.hex()
        );
        assert!(matches!(
            refused(&t),
            FormatError::DecompressedTooLarge { .. }
        ));
    }

    #[test]
    fn refuses_non_swtpm_content_and_unknown_sections() {
        let data = b"just some bytes, not a swtpm blob".to_vec();
        let tpm = MachineState::from(TpmState::new(
            TpmVersion::V2_0,
            vec![StateFile {
                name: "tpm2-00.permall".into(),
                data,
            }],
        ));
        let (_, prov) = sample();
        let t = encode(&tpm, &prov, Style::Standalone);
        assert!(matches!(refused(&t), FormatError::BadSwtpmHeader { .. }));
        let t = sample_text().replace("</vts:tpm>", "</vts:tpm><vts:cmos/>");
        assert_eq!(refused(&t), FormatError::UnknownSection("cmos".into()));
        let t = sample_text().replace("</vts:tpm>", "</vts:tpm><vts:nvram/>");
        assert_eq!(refused(&t), FormatError::NoFiles("nvram"));
        let t = sample_text().replace("version=\"2.0\"", "version=\"3.0\"");
        assert!(matches!(refused(&t), FormatError::BadTpmVersion(_)));
    }

    fn with_nvram(tpm: bool) -> (MachineState, Provenance) {
        let (m, prov) = sample();
        let mut vars = vec![0xffu8; 540672];
        vars[..16].copy_from_slice(b"not a swtpm blob");
        (
            MachineState::new(if tpm { m.tpm } else { None }, Some(vars)),
            prov,
        )
    }

    /// `status` and `watch` compare the declared digest over the sections
    /// that apply; it must be the digest the state itself has, plain and
    /// sealed, over every subset.
    #[test]
    fn declared_digest_is_the_state_digest_over_each_subset() {
        let (state, prov) = with_nvram(true);
        let key = SecretKey::from_bytes([9; 32]);
        for text in [
            encode(&state, &prov, Style::Standalone),
            encode_sealed(&state, &prov, Style::Standalone, &key.id(), &key),
        ] {
            let el = in_domain(&text);
            assert_eq!(declared_sections(&el), (true, true));
            for (tpm, nvram) in [(true, true), (true, false), (false, true)] {
                assert_eq!(
                    declared_digest(&el, tpm, nvram),
                    Some(state.only(tpm, nvram).digest()),
                    "tpm {tpm}, nvram {nvram}"
                );
            }
        }
        let (tpm_only, prov) = sample();
        let el = in_domain(&encode(&tpm_only, &prov, Style::Standalone));
        assert_eq!(declared_sections(&el), (true, false));
        assert_eq!(declared_digest(&el, true, true), Some(tpm_only.digest()));
    }

    /// A `<varstore>` JSON travels in its own section, under its own name
    /// and digest line, sealed or not; the other kind's name is refused.
    #[test]
    fn varstore_round_trips_in_its_own_section() {
        let (m, prov) = sample();
        let json = br#"{"version": 2, "variables": []}"#.to_vec();
        let state = MachineState::with_vars(m.tpm, VarsKind::Varstore, Some(json.clone()));
        let text = encode(&state, &prov, Style::Standalone);
        assert!(
            text.contains("<vts:varstore>") && !text.contains("<vts:nvram>"),
            "{text}"
        );
        let back = decode(&in_domain(&text), DecodeLimits::default()).unwrap();
        assert_eq!(back.state, state);
        assert_eq!(back.state.vars_kind(), Some(VarsKind::Varstore));
        // The same bytes as a VARS file are another state.
        let as_nvram = MachineState::new(state.tpm.clone(), Some(json));
        assert_ne!(as_nvram.digest(), state.digest());
        let key = SecretKey::from_bytes([9; 32]);
        let sealed = encode_sealed(&state, &prov, Style::Standalone, &key.id(), &key);
        let keys = Keyring::new(vec![key.clone()]);
        let back = decode_with_keys(&in_domain(&sealed), DecodeLimits::default(), &keys).unwrap();
        assert_eq!(back.state, state);
        let t = text.replace("name=\"varstore.json\"", "name=\"VARS.fd\"");
        assert!(matches!(
            refused(&t),
            FormatError::NvramFileNameNotAllowed {
                section: "varstore",
                ..
            }
        ));
    }

    #[test]
    fn nvram_round_trips_alone_and_with_the_tpm() {
        for tpm in [true, false] {
            let (state, prov) = with_nvram(tpm);
            let text = encode(&state, &prov, Style::Standalone);
            assert!(text.len() < 8000, "{} bytes", text.len());
            let back = decode(&in_domain(&text), DecodeLimits::default()).unwrap();
            assert_eq!(back.state, state);
            assert_eq!(back.digest, state.digest());
            // Sealed: the AD path is nvram/VARS.fd.
            let key = SecretKey::from_bytes([9; 32]);
            let id = key.id();
            let text = encode_sealed(&state, &prov, Style::Standalone, &id, &key);
            let keys = Keyring::new(vec![key.clone()]);
            let back = decode_with_keys(&in_domain(&text), DecodeLimits::default(), &keys).unwrap();
            assert_eq!(back.state, state);
            assert_eq!(back.sealed_with, vec![id]);
        }
    }

    #[test]
    fn sealed_for_recipients_round_trips_rewraps_and_binds() {
        use crate::recipients::{generate_identity, parse_identities, Recipient};
        use age::secrecy::ExposeSecret as _;
        let make = || {
            let (text, r) = generate_identity("t");
            let id = parse_identities(text.expose_secret(), "t").unwrap();
            (id, Recipient::parse(&r).unwrap())
        };
        let ((a, ra), (b, rb)) = (make(), make());
        let (state, prov) = with_nvram(true);
        let set = RecipientSet::new(vec![ra.clone()], "t".into());
        let text = try_encode_with(
            &state,
            &prov,
            Style::Standalone,
            Protection::Recipients { set: &set },
        )
        .unwrap();
        assert!(text.contains(&format!("recipients=\"{}\"", ra.fingerprint)));
        let mut ka = Keyring::default();
        ka.add_identities(a);
        let back = decode_with_keys(&in_domain(&text), DecodeLimits::default(), &ka).unwrap();
        assert_eq!(back.state, state);
        assert_eq!(back.sealed_for, vec![ra.fingerprint.clone()]);
        assert_eq!(back.age_files.len(), 2);
        // Not a recipient: one message naming the recipients and the command.
        let mut kb = Keyring::default();
        kb.add_identities(b);
        let e = decode_with_keys(&in_domain(&text), DecodeLimits::default(), &kb).unwrap_err();
        assert!(e.is_key_problem());
        let msg = e.to_string();
        assert!(
            msg.contains(ra.fingerprint.as_str()) && msg.contains("virt-tpm-state host-id"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
        let none = decode_with_keys(
            &in_domain(&text),
            DecodeLimits::default(),
            &Keyring::default(),
        )
        .unwrap_err();
        assert!(none.to_string().contains("host-id init"), "{none}");
        // Re-wrapped for b: same payloads, b opens it, a no longer does.
        let to_b = RecipientSet::new(vec![rb.clone()], "t".into());
        let re = try_encode_with(
            &back.state,
            &back.provenance,
            Style::Standalone,
            Protection::Rewrap {
                from: &back.age_files,
                identities: ka.identities(),
                set: &to_b,
            },
        )
        .unwrap();
        let again = decode_with_keys(&in_domain(&re), DecodeLimits::default(), &kb).unwrap();
        assert_eq!(again.state, state);
        for ((_, old), (_, new)) in back.age_files.iter().zip(&again.age_files) {
            assert_eq!(
                crate::recipients::payload_of(old),
                crate::recipients::payload_of(new)
            );
        }
        assert!(decode_with_keys(&in_domain(&re), DecodeLimits::default(), &ka).is_err());
        // Pasted into another domain (the uuid attribute follows it): refused.
        let other = "00000000-0000-4000-8000-000000000001";
        let pasted = text.replace(prov.uuid.as_str(), other);
        assert!(matches!(
            decode_with_keys(&in_domain(&pasted), DecodeLimits::default(), &ka),
            Err(FormatError::BindingMismatch { .. })
        ));
    }

    #[test]
    fn nvram_refusals() {
        let (state, prov) = with_nvram(true);
        let text = encode(&state, &prov, Style::Standalone);
        let t = text.replace("name=\"VARS.fd\"", "name=\"../VARS.fd\"");
        assert!(matches!(
            refused(&t),
            FormatError::NvramFileNameNotAllowed { .. }
        ));
        let start = text.find("  <vts:nvram>").unwrap();
        let end = text.find("</vts:nvram>\n").unwrap() + "</vts:nvram>\n".len();
        let dup = format!("{}{}{}", &text[..end], &text[start..end], &text[end..]);
        assert_eq!(refused(&dup), FormatError::DuplicateNvramSection);
        let t = text.replace("<vts:nvram>", "<vts:nvram><vts:x/>");
        assert!(matches!(refused(&t), FormatError::UnexpectedElement(..)));
        // A TPM file name in the nvram section is refused by name.
        let t = text.replace("name=\"VARS.fd\"", "name=\"tpm2-00.permall\"");
        assert_eq!(
            refused(&t),
            FormatError::NvramFileNameNotAllowed {
                name: "tpm2-00.permall".into(),
                section: "nvram",
                allowed: "VARS.fd"
            }
        );
        // Both kinds of variable store in one element: a domain has one.
        let vs = text
            .replace("<vts:nvram>", "<vts:varstore>")
            .replace("</vts:nvram>", "</vts:varstore>");
        let both = format!(
            "{}{}{}",
            &text[..end],
            &vs[start..vs.find("</vts:varstore>\n").unwrap() + "</vts:varstore>\n".len()],
            &text[end..]
        );
        assert_eq!(refused(&both), FormatError::DuplicateNvramSection);
        let e = decode(
            &in_domain(&text),
            DecodeLimits {
                max_file_size: 100_000,
            },
        )
        .unwrap_err();
        assert!(matches!(e, FormatError::DeclaredTooLarge { .. }), "{e:?}");
        let none = "<vts:state xmlns:vts=\"urn:virt-tpm-state:1\" format=\"1\" uuid=\"6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d\" generation=\"1\" digest=\"0000000000000000000000000000000000000000000000000000000000000000\"/>";
        assert_eq!(refused(none), FormatError::NoSection);
    }

    #[test]
    fn informational_attributes_survive_any_xml_parser() {
        // Regression: `stored` and `host` were escaped for markup only; a
        // literal tab or newline in an attribute is normalized to a space by
        // libxml2, and a control character made the element unparsable.
        let (tpm, mut prov) = sample();
        prov.host = "a\tb\nc\r\nd \"'<>&".into();
        prov.stored = "x\u{1}y\u{FFFE}".into();
        let text = encode(&tpm, &prov, Style::Standalone);
        assert!(text.contains("host=\"a&#9;b&#10;c&#13;&#10;d &quot;&apos;&lt;&gt;&amp;\""));
        let back = decode(&in_domain(&text), DecodeLimits::default()).unwrap();
        assert_eq!(back.provenance.host, prov.host);
        assert_eq!(back.provenance.stored, "x\u{FFFD}y\u{FFFD}");
    }

    #[test]
    fn refusals_quote_hostile_values_short_and_on_one_line() {
        // Regression (found by fuzzing): a refused `encoding`, `format`,
        // `version` or name was quoted whole, newlines (`&#10;`) included.
        let long = format!("x&#10;y{}", "z".repeat(10_000));
        for t in [
            sample_text().replace("gzip+base64\">", &format!("{long}\">")),
            sample_text().replace("format=\"1\"", &format!("format=\"{long}\"")),
            sample_text().replace("version=\"2.0\"", &format!("version=\"{long}\"")),
            sample_text().replace("name=\"tpm2-00.permall\"", &format!("name=\"{long}\"")),
        ] {
            let msg = refused(&t).to_string();
            assert!(!msg.contains('\n') && msg.len() < 400, "{msg}");
            assert!(msg.contains("x\\") && msg.contains('…'), "{msg}");
        }
    }

    #[test]
    fn errors_never_contain_content() {
        let t = sample_text().replace("gzip+base64\">", "gzip+base64\">!!");
        let msg = refused(&t).to_string();
        assert!(!msg.contains("H4sI"), "{msg}");
    }
}
