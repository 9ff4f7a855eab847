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
