//! Writing a format v1 element (docs/FORMAT.md): one entry, [`encode`],
//! whatever protects the files.

use super::{
    Provenance, ENCODING_AGE, ENCODING_GZIP_BASE64, ENCODING_SEALED, FORMAT_VERSION,
    NAMESPACE_PREFIX, NAMESPACE_URI,
};
use crate::envelope::{seal, KeyId, SecretKey};
use crate::recipients::{HostIdentity, RecipientSet};
use crate::state::{MachineState, StateFile};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use flate2::{Compression, GzBuilder};
use quick_xml::escape::escape;
use std::io::Write;

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
    /// [`super::MetadataState::age_files`]) for `set`: ciphertexts unchanged.
    Rewrap {
        from: &'a [(String, Vec<u8>)],
        identities: &'a [HostIdentity],
        set: &'a RecipientSet,
    },
}

/// Why an element could not be written: only sealing for recipients can
/// fail (a plugin recipient failing; the message names it, never a secret).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// age refused to seal for the recipient set.
    #[error("{0}")]
    Seal(String),
    /// [`Protection::Rewrap`] has no age file for this `section/name`.
    #[error("file {0} is not sealed for recipients; rekey --rotate seals it afresh")]
    NotSealedForRecipients(String),
    /// Re-wrapping the file key of `section/name` failed.
    #[error("file {path}: {why}")]
    Rewrap { path: String, why: String },
}

/// Encodes `state` as a format v1 element over `provenance`, printed as
/// `style`, each file protected as `protection` says. Plaintext and a host
/// key cannot fail; sealing for recipients can ([`EncodeError`]).
pub fn encode(
    state: &MachineState,
    provenance: &Provenance,
    style: Style,
    mut protection: Protection<'_>,
) -> Result<String, EncodeError> {
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
            let (encoding, extra, payload) = protect(&mut protection, provenance, &path, f)?;
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

/// One file as `protection` says: its `encoding`, the attributes that
/// encoding adds, and the payload to base64.
fn protect(
    protection: &mut Protection<'_>,
    provenance: &Provenance,
    path: &str,
    f: &StateFile,
) -> Result<(&'static str, String, Vec<u8>), EncodeError> {
    Ok(match protection {
        Protection::Plain => (
            ENCODING_GZIP_BASE64,
            String::new(),
            gzip_deterministic(&f.data),
        ),
        Protection::Sealed { key_id, key, fill } => {
            let gz = gzip_deterministic(&f.data);
            let sealed = seal(&gz, provenance.uuid.as_str(), path, key_id, key, *fill);
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
        Protection::Recipients { set } => {
            let gz = gzip_bound(
                &f.data,
                &crate::recipients::binding(provenance.uuid.as_str(), path),
            );
            (
                ENCODING_AGE,
                recipients_attr(set),
                crate::recipients::seal(&gz, set).map_err(EncodeError::Seal)?,
            )
        }
        Protection::Rewrap {
            from,
            identities,
            set,
        } => {
            let age_file = from
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, a)| a)
                .ok_or_else(|| EncodeError::NotSealedForRecipients(path.to_string()))?;
            (
                ENCODING_AGE,
                recipients_attr(set),
                crate::recipients::rewrap(age_file, identities, set).map_err(|why| {
                    EncodeError::Rewrap {
                        path: path.to_string(),
                        why,
                    }
                })?,
            )
        }
    })
}

/// ` recipients="FP FP …"`: who can open a file, public fingerprints only.
fn recipients_attr(set: &RecipientSet) -> String {
    let fps: Vec<String> = set.fingerprints().iter().map(|f| f.to_string()).collect();
    format!(" recipients=\"{}\"", fps.join(" "))
}

/// Compresses one file like [`gzip_deterministic`], with the binding of a
/// file sealed for recipients as the gzip comment (which gunzip ignores).
fn gzip_bound(data: &[u8], binding: &str) -> Vec<u8> {
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
