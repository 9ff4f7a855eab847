//! swtpm's state-file header: a cheap consistency check before a state is
//! stored or restored. Pure, no I/O.
//!
//! Every swtpm state blob starts with 10 bytes, big-endian:
//! `version u8, min_version u8, hdrsize u16, flags u16, totlen u32`,
//! where `totlen` equals the file length.

/// `BLOB_FLAG_ENCRYPTED` in swtpm's `swtpm_nvstore.c`: the blob is encrypted
/// with the key libvirt passes (`<encryption secret=.../>` in the domain XML).
pub(crate) const FLAG_ENCRYPTED: u16 = 0x1;

pub const HEADER_LEN: usize = 10;

use crate::state::{StateFile, TpmState, TpmVersion};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub(crate) version: u8,
    pub(crate) min_version: u8,
    pub(crate) hdrsize: u16,
    pub(crate) flags: u16,
    pub(crate) totlen: u32,
}

impl Header {
    pub fn is_encrypted(&self) -> bool {
        self.flags & FLAG_ENCRYPTED != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("shorter than swtpm's {HEADER_LEN}-byte header ({0} bytes)")]
    TooShort(usize),
    #[error("swtpm header says {declared} bytes but the file has {actual}")]
    LengthMismatch { declared: u32, actual: usize },
    #[error("swtpm header size {0} is not plausible")]
    BadHeaderSize(u16),
    #[error("swtpm header version {0} is not one swtpm writes")]
    BadVersion(u8),
    #[error("not a DER certificate (one SEQUENCE covering the file)")]
    NotACertificate,
}

/// Checks `data` against its own header and returns the header.
pub fn check_header(data: &[u8]) -> Result<Header, HeaderError> {
    if data.len() < HEADER_LEN {
        return Err(HeaderError::TooShort(data.len()));
    }
    let h = Header {
        version: data[0],
        min_version: data[1],
        hdrsize: u16::from_be_bytes([data[2], data[3]]),
        flags: u16::from_be_bytes([data[4], data[5]]),
        totlen: u32::from_be_bytes([data[6], data[7], data[8], data[9]]),
    };
    if h.version == 0 {
        return Err(HeaderError::BadVersion(h.version));
    }
    if usize::from(h.hdrsize) < HEADER_LEN || usize::from(h.hdrsize) > data.len() {
        return Err(HeaderError::BadHeaderSize(h.hdrsize));
    }
    if usize::try_from(h.totlen).ok() != Some(data.len()) {
        return Err(HeaderError::LengthMismatch {
            declared: h.totlen,
            actual: data.len(),
        });
    }
    Ok(h)
}

/// Checks an EK certificate file: one DER SEQUENCE (an X.509 certificate
/// is one) whose length covers the file exactly, as `swtpm_setup` writes it.
/// A shape check like the swtpm header's, not a certificate verification.
pub(crate) fn check_der_certificate(data: &[u8]) -> Result<(), HeaderError> {
    let bad = HeaderError::NotACertificate;
    let (&tag, rest) = data.split_first().ok_or(bad)?;
    let (&first, rest) = rest.split_first().ok_or(bad)?;
    // A certificate is a constructed SEQUENCE, longer than 127 bytes, so
    // its length is in the long form: 0x8N then N big-endian bytes.
    if tag != 0x30 || !(0x81..=0x84).contains(&first) {
        return Err(bad);
    }
    let n = usize::from(first & 0x7f);
    if rest.len() < n {
        return Err(bad);
    }
    let len = rest[..n]
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    if len != rest.len() - n {
        return Err(bad);
    }
    Ok(())
}

/// The content check of one file of a `<tpm>` section: the swtpm header
/// for the permall, the DER shape for an EK certificate.
pub fn check_tpm_file(version: TpmVersion, file: &StateFile) -> Result<(), HeaderError> {
    if version.ek_cert_files().contains(&file.name.as_str()) {
        check_der_certificate(&file.data)
    } else {
        check_header(&file.data).map(|_| ())
    }
}

/// A minimal valid blob for tests: a header followed by `payload`.
#[doc(hidden)]
pub fn synthetic_blob(flags: u16, payload: &[u8]) -> Vec<u8> {
    let total = (HEADER_LEN + payload.len()) as u32;
    let mut v = Vec::with_capacity(total as usize);
    v.extend_from_slice(&[2, 1]);
    v.extend_from_slice(&(HEADER_LEN as u16).to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&total.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Whether swtpm itself encrypted this TPM state (the domain's
/// `<encryption secret=…>`): every file's header says so. The one answer to
/// "is swtpm's state encrypted" for every caller: `store`/`pack` (may the
/// blob go into the XML without our own seal?), `show` (which protection
/// applies?) and the restore check (will swtpm read it with, or without, its
/// key?). Only swtpm's own files count (the permall): EK certificates are
/// public and swtpm never encrypts them. A carried TPM state has one
/// permall, so "every" and "any" agree on real states; for a mixed or empty
/// list "every" answers no, the safe side for all of them (it is then
/// sealed, shown as unprotected by swtpm, and refused for a domain that
/// expects encryption).
pub(crate) fn state_is_encrypted(tpm: &TpmState) -> bool {
    let ek = tpm.version.ek_cert_files();
    let mut blobs = tpm
        .files()
        .iter()
        .filter(|f| !ek.contains(&f.name.as_str()))
        .peekable();
    blobs.peek().is_some() && blobs.all(|f| check_header(&f.data).is_ok_and(|h| h.is_encrypted()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_consistent_blob() {
        let b = synthetic_blob(0, b"payload");
        let h = check_header(&b).unwrap();
        assert_eq!(h.totlen as usize, b.len());
        assert!(!h.is_encrypted());
        assert!(check_header(&synthetic_blob(FLAG_ENCRYPTED, b"x"))
            .unwrap()
            .is_encrypted());
    }

    /// One answer for store, show and the restore check: a state is
    /// swtpm-encrypted when every file is, and an empty or mixed list (which
    /// a carried state never is) is not.
    #[test]
    fn state_is_encrypted_when_every_file_is() {
        let file = |name: &str, flags| StateFile {
            name: name.into(),
            data: synthetic_blob(flags, b"x"),
        };
        let state = |files| TpmState::new(TpmVersion::V2_0, files);
        assert!(state_is_encrypted(&state(vec![file(
            "tpm2-00.permall",
            FLAG_ENCRYPTED
        )])));
        assert!(!state_is_encrypted(&state(vec![file(
            "tpm2-00.permall",
            0
        )])));
        assert!(!state_is_encrypted(&state(vec![])));
        assert!(!state_is_encrypted(&state(vec![
            file("a", FLAG_ENCRYPTED),
            file("b", 0)
        ])));
    }

    /// A DER SEQUENCE in the long length form, `len` content bytes.
    fn der(len: usize) -> Vec<u8> {
        let mut v = vec![0x30, 0x82];
        v.extend_from_slice(&(len as u16).to_be_bytes());
        v.extend(std::iter::repeat_n(0xa5, len));
        v
    }

    #[test]
    fn ek_certificates_are_checked_for_their_der_shape() {
        assert_eq!(check_der_certificate(&der(900)), Ok(()));
        let mut one_form = vec![0x30, 0x81, 200];
        one_form.extend(std::iter::repeat_n(0, 200));
        assert_eq!(check_der_certificate(&one_form), Ok(()));
        let bad = Err(HeaderError::NotACertificate);
        let full = der(900);
        assert_eq!(check_der_certificate(&full[..full.len() - 1]), bad);
        let mut longer = full.clone();
        longer.push(0);
        assert_eq!(check_der_certificate(&longer), bad);
        assert_eq!(check_der_certificate(&[]), bad);
        assert_eq!(check_der_certificate(&[0x30]), bad);
        assert_eq!(check_der_certificate(&[0x30, 0x82, 0x01]), bad);
        // Not a SEQUENCE, a short-form length, an absurd length size.
        let mut not_seq = full.clone();
        not_seq[0] = 0x31;
        assert_eq!(check_der_certificate(&not_seq), bad);
        assert_eq!(check_der_certificate(&[0x30, 0x01, 0x00]), bad);
        assert_eq!(check_der_certificate(&[0x30, 0x85, 0, 0, 0, 0, 1, 0]), bad);
        // A swtpm blob is not a certificate, nor a certificate a blob.
        assert_eq!(check_der_certificate(&synthetic_blob(0, b"x")), bad);
        let cert = |name: &str, data: Vec<u8>| StateFile {
            name: name.into(),
            data,
        };
        assert!(check_tpm_file(TpmVersion::V2_0, &cert("ek-rsa2048.crt", der(900))).is_ok());
        assert!(check_tpm_file(TpmVersion::V2_0, &cert("tpm2-00.permall", der(900))).is_err());
        assert!(check_tpm_file(
            TpmVersion::V2_0,
            &cert("ek-secp384r1.crt", synthetic_blob(0, b"x"))
        )
        .is_err());
    }

    /// An EK certificate beside an encrypted permall leaves the state
    /// encrypted: swtpm never encrypts the certificates.
    #[test]
    fn ek_certificates_do_not_count_for_encryption() {
        let files = vec![
            StateFile {
                name: "tpm2-00.permall".into(),
                data: synthetic_blob(FLAG_ENCRYPTED, b"x"),
            },
            StateFile {
                name: "ek-rsa2048.crt".into(),
                data: der(900),
            },
        ];
        assert!(state_is_encrypted(&TpmState::new(
            TpmVersion::V2_0,
            files.clone()
        )));
        let only_cert = TpmState::new(TpmVersion::V2_0, files[1..].to_vec());
        assert!(!state_is_encrypted(&only_cert));
    }

    #[test]
    fn refuses_truncated_and_padded() {
        let b = synthetic_blob(0, b"payload");
        assert!(matches!(
            check_header(&b[..b.len() - 1]),
            Err(HeaderError::LengthMismatch { .. })
        ));
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(
            check_header(&longer),
            Err(HeaderError::LengthMismatch { .. })
        ));
        assert_eq!(check_header(&b[..4]), Err(HeaderError::TooShort(4)));
    }

    #[test]
    fn refuses_bad_version_and_hdrsize() {
        let mut b = synthetic_blob(0, b"payload");
        b[0] = 0;
        assert!(matches!(check_header(&b), Err(HeaderError::BadVersion(0))));
        let mut b = synthetic_blob(0, b"payload");
        b[2] = 0xff;
        assert!(matches!(
            check_header(&b),
            Err(HeaderError::BadHeaderSize(_))
        ));
    }
}
