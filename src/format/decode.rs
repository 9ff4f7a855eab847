//! Reading a format v1 element back (docs/FORMAT.md §4): one entry,
//! [`decode`], which trusts nothing until every check has passed.

use super::{
    hex_attr, parse_decimal, read_header, req, shown, DecodeLimits, FormatError, MetadataState,
    ENCODING_AGE, ENCODING_GZIP_BASE64, ENCODING_SEALED,
};
use crate::envelope::{open, KeyId, Keyring, Sealed, NONCE_LEN};
use crate::recipients::{AgeOpenError, Fingerprint};
use crate::state::{MachineState, Sha256Sum, StateFile, TpmState, TpmVersion, VarsKind};
use crate::swtpm::check_tpm_file;
use crate::xml::XmlElement;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use flate2::bufread::GzDecoder;
use std::io::Read;

/// Decodes and validates our element, opening encrypted files with the
/// host keys and identities in `keys` (an empty [`Keyring`] for plaintext
/// only). Nothing is trusted until every check below has passed; on
/// success the state is exactly what was stored.
pub fn decode(
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
        // MUST: its `version` is `2.0` or `1.2`.
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
    // MUST: an `encoding` this reader does not know is refused, not skipped.
    if ![ENCODING_GZIP_BASE64, ENCODING_SEALED, ENCODING_AGE].contains(&encoding) {
        return Err(FormatError::UnknownEncoding(name, shown(encoding)));
    }
    let size = parse_decimal(req(f, "size")?).ok_or(FormatError::BadAttribute {
        attribute: "size",
        why: "not a non-negative decimal integer",
    })?;
    let declared_sha = hex_attr(f, "sha256")?;
    // MUST: readers bound decompression (`max_file_size`, 1 MiB by
    // default): a declared size past it is refused before any work, and
    // `gunzip_capped` below never inflates past it.
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
    // MUST: check each file's `size` and `sha256` against the decoded bytes.
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
    // MUST: refuse a file whose swtpm header is inconsistent (FORMAT.md 2.5).
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
