//! swtpm's "linear" NVRAM store: the one-file layout swtpm uses for
//! `--tpmstate backend-uri=file://PATH`, which libvirt (>= 10.10) passes for
//! `<backend type='emulator'><source type='file' path=.../>`. Pure, no I/O.
//!
//! Layout (swtpm `src/swtpm/swtpm_nvstore_linear.h`), little-endian:
//! `u64 magic 'swtpmlin'; u8 version (1); u8 pad; u16 hdrsize;` then 15 slots
//! `{u32 offset (0 = unallocated), u32 data_length, u32 section_length}`:
//! 192 bytes. Slot 0 holds `permall`, 1 `volatilestate`, 2 `savestate`
//! (`SWTPM_NVRAM_Linear_GetFileNr`); a slot's bytes are at `offset`, and its
//! section is `data_length` rounded up to a power of two.
//!
//! The bytes in a slot are exactly what the dir backend writes to a file:
//! swtpm's generic layer prepends its own 10-byte header before either
//! backend stores them. So slot 0 is byte for byte a `tpm2-00.permall`, and
//! the element carries it under that name wherever the state lives.
//!
//! The file comes from a path in hostile XML: every offset and length is
//! checked against the file before it is used.

/// `SWTPM_NVSTORE_LINEAR_MAGIC`: "swtpmlin" read as a little-endian u64.
pub(crate) const MAGIC: u64 = 0x7377_7470_6d6c_696e;
/// The only layout version swtpm writes.
pub(crate) const VERSION: u8 = 1;
/// `SWTPM_NVSTORE_LINEAR_MAX_STATES`.
pub(crate) const SLOTS: usize = 15;
/// `sizeof(struct nvram_linear_hdr)`.
pub(crate) const HEADER_LEN: usize = 12 + SLOTS * 12;
/// Slot of the permanent state (`TPM_PERMANENT_ALL_NAME`).
pub(crate) const PERMALL_SLOT: usize = 0;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinearError {
    #[error("shorter than swtpm's {HEADER_LEN}-byte linear header ({0} bytes)")]
    TooShort(usize),
    #[error("not a swtpm linear state file (no 'swtpmlin' magic)")]
    BadMagic,
    #[error("swtpm linear layout version {0} is not one this tool knows (1)")]
    BadVersion(u8),
    #[error("swtpm linear header size {hdrsize} is not plausible for a {len}-byte file")]
    BadHeaderSize { hdrsize: u16, len: usize },
    #[error("swtpm linear slot {slot} ({what}) does not fit the {len}-byte file")]
    BadSlot {
        slot: usize,
        what: &'static str,
        len: usize,
    },
    #[error("swtpm linear slots {0} and {1} overlap")]
    Overlap(usize, usize),
    #[error("a state of {0} bytes does not fit swtpm's linear layout")]
    TooLarge(usize),
    #[error("an empty state cannot be stored")]
    Empty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    offset: u32,
    data_length: u32,
    section_length: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The allocated slots of a linear file, checked: `None` for an unallocated
/// slot, else the slot's data bytes.
pub(crate) fn parse(data: &[u8]) -> Result<[Option<&[u8]>; SLOTS], LinearError> {
    let len = data.len();
    if len < HEADER_LEN {
        return Err(LinearError::TooShort(len));
    }
    let magic = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
    if magic != MAGIC {
        return Err(LinearError::BadMagic);
    }
    if data[8] != VERSION {
        return Err(LinearError::BadVersion(data[8]));
    }
    let hdrsize = u16_at(data, 10);
    if usize::from(hdrsize) < HEADER_LEN || usize::from(hdrsize) > len {
        return Err(LinearError::BadHeaderSize { hdrsize, len });
    }
    let mut slots = [None; SLOTS];
    for (i, slot) in slots.iter_mut().enumerate() {
        let at = 12 + i * 12;
        let s = Slot {
            offset: u32_at(data, at),
            data_length: u32_at(data, at + 4),
            section_length: u32_at(data, at + 8),
        };
        if s.offset == 0 {
            continue;
        }
        let bad = |what| LinearError::BadSlot { slot: i, what, len };
        if s.offset < u32::from(hdrsize) {
            return Err(bad("offset inside the header"));
        }
        if s.data_length > s.section_length {
            return Err(bad("data longer than its section"));
        }
        // u64: offset + length cannot overflow there.
        if u64::from(s.offset) + u64::from(s.data_length) > len as u64 {
            return Err(bad("data past the end"));
        }
        *slot = Some(s);
    }
    // swtpm packs sections without holes or overlap; an overlap means the
    // header was not written by swtpm.
    for i in 0..SLOTS {
        for j in i + 1..SLOTS {
            if let (Some(a), Some(b)) = (slots[i], slots[j]) {
                let (a0, a1) = (
                    u64::from(a.offset),
                    u64::from(a.offset) + u64::from(a.section_length),
                );
                let (b0, b1) = (
                    u64::from(b.offset),
                    u64::from(b.offset) + u64::from(b.section_length),
                );
                if a0 < b1 && b0 < a1 {
                    return Err(LinearError::Overlap(i, j));
                }
            }
        }
    }
    Ok(slots.map(|s| {
        s.map(|s| {
            let start = s.offset as usize;
            &data[start..start + s.data_length as usize]
        })
    }))
}

/// The permanent state (slot 0) of a linear file, if allocated.
pub fn permall(data: &[u8]) -> Result<Option<&[u8]>, LinearError> {
    Ok(parse(data)?[PERMALL_SLOT])
}

/// A linear file holding only `permall`, laid out as swtpm lays out a
/// fresh store: header, then slot 0's section at `HEADER_LEN`, zero-padded
/// to its power-of-two length (what swtpm's allocator would have made).
pub fn build(permall: &[u8]) -> Result<Vec<u8>, LinearError> {
    if permall.is_empty() {
        return Err(LinearError::Empty);
    }
    let data_length =
        u32::try_from(permall.len()).map_err(|_| LinearError::TooLarge(permall.len()))?;
    let section_length = data_length
        .checked_next_power_of_two()
        .ok_or(LinearError::TooLarge(permall.len()))?;
    let offset = HEADER_LEN as u32;
    offset
        .checked_add(section_length)
        .ok_or(LinearError::TooLarge(permall.len()))?;
    let mut out = vec![0u8; HEADER_LEN + section_length as usize];
    out[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8] = VERSION;
    out[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    let at = 12 + PERMALL_SLOT * 12;
    out[at..at + 4].copy_from_slice(&offset.to_le_bytes());
    out[at + 4..at + 8].copy_from_slice(&data_length.to_le_bytes());
    out[at + 8..at + 12].copy_from_slice(&section_length.to_le_bytes());
    out[HEADER_LEN..HEADER_LEN + permall.len()].copy_from_slice(permall);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_slot(file: &mut [u8], slot: usize, offset: u32, data: u32, section: u32) {
        let at = 12 + slot * 12;
        file[at..at + 4].copy_from_slice(&offset.to_le_bytes());
        file[at + 4..at + 8].copy_from_slice(&data.to_le_bytes());
        file[at + 8..at + 12].copy_from_slice(&section.to_le_bytes());
    }

    #[test]
    fn header_is_192_bytes_and_magic_spells_swtpmlin() {
        assert_eq!(HEADER_LEN, 192);
        assert_eq!(&MAGIC.to_be_bytes(), b"swtpmlin");
    }

    #[test]
    fn build_then_parse_round_trips_and_rounds_the_section() {
        let permall: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let file = build(&permall).unwrap();
        assert_eq!(file.len(), 192 + 8192);
        assert_eq!(&file[0..8], b"nilmptws");
        assert_eq!(file[8], 1);
        assert_eq!(u16_at(&file, 10), 192);
        assert_eq!(u32_at(&file, 12), 192);
        assert_eq!(u32_at(&file, 16), 5000);
        assert_eq!(u32_at(&file, 20), 8192);
        let slots = parse(&file).unwrap();
        assert_eq!(slots[0], Some(&permall[..]));
        assert!(slots[1..].iter().all(Option::is_none));
        assert_eq!(permall_of(&file), permall);
        // A power of two stays as it is.
        assert_eq!(build(&[1u8; 4096]).unwrap().len(), 192 + 4096);
    }

    fn permall_of(file: &[u8]) -> Vec<u8> {
        permall(file).unwrap().unwrap().to_vec()
    }

    #[test]
    fn reads_all_three_slots_as_swtpm_packs_them() {
        let mut file = vec![0u8; 192 + 16 + 8 + 4];
        file[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        file[8] = 1;
        file[10..12].copy_from_slice(&192u16.to_le_bytes());
        // savestate first, then permall, then volatile: order in the file
        // follows the order of writes, not the slot number.
        set_slot(&mut file, 2, 192, 3, 4);
        set_slot(&mut file, 0, 196, 9, 16);
        set_slot(&mut file, 1, 212, 8, 8);
        file[196..205].copy_from_slice(b"permanent");
        let slots = parse(&file).unwrap();
        assert_eq!(slots[0], Some(&b"permanent"[..]));
        assert_eq!(slots[1].unwrap().len(), 8);
        assert_eq!(slots[2].unwrap().len(), 3);
    }

    #[test]
    fn unallocated_permall_is_none() {
        let mut file = build(b"x").unwrap();
        set_slot(&mut file, 0, 0, 0, 0);
        assert_eq!(permall(&file).unwrap(), None);
    }

    #[test]
    fn refuses_hostile_headers() {
        let good = build(&[9u8; 100]).unwrap();
        assert_eq!(parse(&good[..191]), Err(LinearError::TooShort(191)));
        assert_eq!(parse(&[]), Err(LinearError::TooShort(0)));

        let mut f = good.clone();
        f[0] ^= 1;
        assert_eq!(parse(&f), Err(LinearError::BadMagic));

        let mut f = good.clone();
        f[8] = 2;
        assert_eq!(parse(&f), Err(LinearError::BadVersion(2)));

        for hdrsize in [0u16, 191, u16::MAX] {
            let mut f = good.clone();
            f[10..12].copy_from_slice(&hdrsize.to_le_bytes());
            assert!(
                matches!(parse(&f), Err(LinearError::BadHeaderSize { .. })),
                "{hdrsize}"
            );
        }

        let len = good.len() as u32;
        let cases: [(u32, u32, u32, &str); 5] = [
            (1, 10, 16, "offset inside the header"),
            (191, 10, 16, "offset inside the header"),
            (192, 200, 128, "data longer than its section"),
            (len - 10, 11, 16, "data past the end"),
            (u32::MAX, u32::MAX, u32::MAX, "data past the end"),
        ];
        for (offset, data, section, what) in cases {
            let mut f = good.clone();
            set_slot(&mut f, 3, offset, data, section);
            assert_eq!(
                parse(&f),
                Err(LinearError::BadSlot {
                    slot: 3,
                    what,
                    len: f.len()
                }),
                "{offset} {data} {section}"
            );
        }

        let mut f = good.clone();
        set_slot(&mut f, 1, 192 + 64, 8, 8);
        assert_eq!(parse(&f), Err(LinearError::Overlap(0, 1)));
    }

    #[test]
    fn build_refuses_empty() {
        assert_eq!(build(&[]), Err(LinearError::Empty));
    }

    /// Every truncation and every single-byte change of a valid file either
    /// parses with in-bounds slices or is refused: never a panic.
    #[test]
    fn never_panics_on_mutations() {
        let good = build(&[5u8; 300]).unwrap();
        for cut in 0..good.len() {
            let _ = parse(&good[..cut]);
        }
        for at in 0..HEADER_LEN {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut f = good.clone();
                f[at] = v;
                if let Ok(slots) = parse(&f) {
                    for s in slots.into_iter().flatten() {
                        assert!(s.len() <= f.len());
                    }
                }
            }
        }
    }
}
