//! swtpm's state-file header: a cheap consistency check before a state is
//! stored or restored. Pure, no I/O.
//!
//! Every swtpm state blob starts with 10 bytes, big-endian:
//! `version u8, min_version u8, hdrsize u16, flags u16, totlen u32`,
//! where `totlen` equals the file length.

/// `BLOB_FLAG_ENCRYPTED` in swtpm's `swtpm_nvstore.c`: the blob is encrypted
/// with the key libvirt passes (`<encryption secret=.../>` in the domain XML).
pub const FLAG_ENCRYPTED: u16 = 0x1;

pub const HEADER_LEN: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub min_version: u8,
    pub hdrsize: u16,
    pub flags: u16,
    pub totlen: u32,
}

impl Header {
    pub fn is_encrypted(&self) -> bool {
        self.flags & FLAG_ENCRYPTED != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("shorter than swtpm's {HEADER_LEN}-byte header ({0} bytes)")]
    TooShort(usize),
    #[error("swtpm header says {declared} bytes but the file has {actual}")]
    LengthMismatch { declared: u32, actual: usize },
    #[error("swtpm header size {0} is not plausible")]
    BadHeaderSize(u16),
    #[error("swtpm header version {0} is not one swtpm writes")]
    BadVersion(u8),
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
/// key?). A carried TPM state is one permall, so "every" and "any" agree on
/// real states; for a mixed or empty list "every" answers no, the safe side
/// for all of them (it is then sealed, shown as unprotected by swtpm, and
/// refused for a domain that expects encryption).
pub fn state_is_encrypted(tpm: &crate::state::TpmState) -> bool {
    let files = tpm.files();
    !files.is_empty()
        && files
            .iter()
            .all(|f| check_header(&f.data).is_ok_and(|h| h.is_encrypted()))
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
        use crate::state::{StateFile, TpmState, TpmVersion};
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
