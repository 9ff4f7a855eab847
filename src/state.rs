//! The TPM state as this tool sees it: a TPM version and its files, and the
//! digest that names one state. Pure data, no I/O.
//!
//! File contents are secrets: `Debug` prints sizes and digest prefixes only.

use sha2::{Digest as _, Sha256};
use std::fmt;

/// The TPM family of a domain's emulated TPM; decides the state sub-directory
/// and the one file that must survive a power cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum TpmVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "2.0")]
    V2_0,
}

impl TpmVersion {
    /// As libvirt writes it in `<backend version=...>` and we in `<tpm version=...>`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TpmVersion::V1_2 => "1.2",
            TpmVersion::V2_0 => "2.0",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "1.2" => Some(TpmVersion::V1_2),
            "2.0" => Some(TpmVersion::V2_0),
            _ => None,
        }
    }

    /// Directory below `/var/lib/libvirt/swtpm/<uuid>/` that libvirt uses.
    pub(crate) fn state_subdir(self) -> &'static str {
        match self {
            TpmVersion::V1_2 => "tpm1.2",
            TpmVersion::V2_0 => "tpm2",
        }
    }

    /// The only file we store and restore: swtpm's permanent state. Volatile
    /// and save states belong to one run and must not be resurrected.
    pub fn permall_name(self) -> &'static str {
        match self {
            TpmVersion::V1_2 => "tpm-00.permall",
            TpmVersion::V2_0 => "tpm2-00.permall",
        }
    }

    /// File names allowed in the `<tpm>` section for this version: the
    /// permall, and for TPM 2.0 the EK certificates.
    pub fn allowed_files(self) -> &'static [&'static str] {
        match self {
            TpmVersion::V1_2 => &["tpm-00.permall"],
            TpmVersion::V2_0 => &[
                "tpm2-00.permall",
                "ek-rsa2048.crt",
                "ek-rsa3072.crt",
                "ek-rsa4096.crt",
                "ek-secp384r1.crt",
            ],
        }
    }

    /// The EK certificate files `swtpm_setup --write-ek-cert-files DIR`
    /// leaves in the state dir when a management layer passes that dir
    /// (`ek-<key>.crt`, DER, public): the VM's identity as its CA signed it,
    /// so they travel with the permall. Everything else swtpm keeps there
    /// (`.lock`, volatile/save states, the `backup` option's
    /// `tpm2-00.permall.bak`) belongs to one run or one host and is left alone.
    pub(crate) fn ek_cert_files(self) -> &'static [&'static str] {
        &self.allowed_files()[1..]
    }
}

impl fmt::Display for TpmVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A SHA-256 value; shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Sum(pub [u8; 32]);

impl Sha256Sum {
    pub fn of(data: &[u8]) -> Self {
        Sha256Sum(Sha256::digest(data).into())
    }

    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        s
    }

    /// The first 12 hex digits: what logs and one-line messages show.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }

    /// Parses exactly 64 lowercase hex digits (the form the format requires).
    pub fn parse_hex(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = lower_hex_value(pair[0])?;
            let lo = lower_hex_value(pair[1])?;
            out[i] = hi << 4 | lo;
        }
        Some(Sha256Sum(out))
    }
}

fn lower_hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Debug for Sha256Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Sum({})", self.short())
    }
}

impl fmt::Display for Sha256Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// One state file: its name (no directories) and its raw bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct StateFile {
    pub name: String,
    pub data: Vec<u8>,
}

impl StateFile {
    pub fn sha256(&self) -> Sha256Sum {
        Sha256Sum::of(&self.data)
    }
}

impl fmt::Debug for StateFile {
    // Never the bytes: they are TPM secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "StateFile {{ name: {:?}, size: {}, sha256: {} }}",
            self.name,
            self.data.len(),
            self.sha256().short()
        )
    }
}

/// One TPM's state: its version and its files, kept sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmState {
    pub version: TpmVersion,
    files: Vec<StateFile>,
}

impl TpmState {
    pub fn new(version: TpmVersion, mut files: Vec<StateFile>) -> Self {
        files.sort_by(|a, b| a.name.cmp(&b.name));
        TpmState { version, files }
    }

    pub fn files(&self) -> &[StateFile] {
        &self.files
    }

    /// The state's name, format v1: sha256 of the sorted lines
    /// `tpm/<name> <sha256-hex>\n`, one per file.
    pub fn digest(&self) -> Sha256Sum {
        state_digest(
            self.files
                .iter()
                .map(|f| (format!("tpm/{}", f.name), f.sha256())),
        )
    }
}

/// The one file of the `<nvram>` section: the domain's UEFI variable store
/// (libvirt's `<nvram>` file, e.g. `<name>_VARS.fd`). A fixed name: the
/// domain decides where it lives.
pub const NVRAM_FILE: &str = "VARS.fd";

/// The one file of the `<varstore>` section: the domain's `<os><varstore>`
/// file (libvirt >= 12.1, QEMU's `uefi-vars` device), a JSON document of
/// UEFI variables, e.g. `/var/lib/libvirt/qemu/varstore/<name>.json`.
pub(crate) const VARSTORE_FILE: &str = "varstore.json";

/// Which kind of UEFI variable store a domain has: a flash image
/// (`<nvram>`, pflash) or QEMU's uefi-vars JSON (`<varstore>`). libvirt
/// allows one of them per domain; they differ in content, so each has its
/// own section and file name in the element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarsKind {
    Nvram,
    Varstore,
}

impl VarsKind {
    /// The file's name in the element (and in kept copies and backups).
    pub(crate) fn file_name(self) -> &'static str {
        match self {
            VarsKind::Nvram => NVRAM_FILE,
            VarsKind::Varstore => VARSTORE_FILE,
        }
    }

    /// The element's section (and the digest lines' prefix).
    pub(crate) fn section(self) -> &'static str {
        match self {
            VarsKind::Nvram => "nvram",
            VarsKind::Varstore => "varstore",
        }
    }

    /// The kind whose file is called `name`, if any.
    pub fn of_file(name: &str) -> Option<Self> {
        [VarsKind::Nvram, VarsKind::Varstore]
            .into_iter()
            .find(|k| k.file_name() == name)
    }

    /// The XML element that names the store, for messages.
    pub(crate) fn element(self) -> &'static str {
        match self {
            VarsKind::Nvram => "<nvram>",
            VarsKind::Varstore => "<varstore>",
        }
    }
}

/// Everything of one machine that travels in the element: its TPM state,
/// its UEFI variable store, or both. One digest names the whole, so one
/// decision restores both pieces together (never a TPM from one
/// generation and VARS from another).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MachineState {
    pub tpm: Option<TpmState>,
    /// The UEFI variable store; its `name` is [`NVRAM_FILE`] or
    /// `VARSTORE_FILE` (`VarsKind::file_name`), which says its kind.
    pub nvram: Option<StateFile>,
}

impl MachineState {
    /// A state whose variable store (if any) is a `<nvram>` VARS file.
    pub fn new(tpm: Option<TpmState>, nvram: Option<Vec<u8>>) -> Self {
        Self::with_vars(tpm, VarsKind::Nvram, nvram)
    }

    /// A state whose variable store (if any) is of `kind`.
    pub fn with_vars(tpm: Option<TpmState>, kind: VarsKind, vars: Option<Vec<u8>>) -> Self {
        MachineState {
            tpm,
            nvram: vars.map(|data| StateFile {
                name: kind.file_name().to_string(),
                data,
            }),
        }
    }

    /// The kind of the variable store this state holds, if any.
    pub(crate) fn vars_kind(&self) -> Option<VarsKind> {
        self.nvram.as_ref().and_then(|f| VarsKind::of_file(&f.name))
    }

    pub fn is_empty(&self) -> bool {
        self.tpm.is_none() && self.nvram.is_none()
    }

    /// Every file with its section: `("tpm", file)`, `("nvram", file)` or
    /// `("varstore", file)`.
    pub fn sections(&self) -> Vec<(&'static str, &StateFile)> {
        let mut out: Vec<(&'static str, &StateFile)> = Vec::new();
        if let Some(t) = &self.tpm {
            out.extend(t.files().iter().map(|f| ("tpm", f)));
        }
        if let Some(n) = &self.nvram {
            let kind = VarsKind::of_file(&n.name).unwrap_or(VarsKind::Nvram);
            out.push((kind.section(), n));
        }
        out
    }

    pub(crate) fn total_size(&self) -> usize {
        self.sections().iter().map(|(_, f)| f.data.len()).sum()
    }

    /// Format v1's digest over all sections: sha256 of the sorted lines
    /// `tpm/<name> <sha256>\n` and `nvram/VARS.fd <sha256>\n` (or
    /// `varstore/varstore.json <sha256>\n`). A TPM-only
    /// state has the same digest as its [`TpmState`].
    pub fn digest(&self) -> Sha256Sum {
        state_digest(
            self.sections()
                .into_iter()
                .map(|(s, f)| (format!("{s}/{}", f.name), f.sha256())),
        )
    }

    /// This state restricted to the sections in `keep` (`tpm`, `nvram`).
    pub(crate) fn only(&self, tpm: bool, nvram: bool) -> MachineState {
        MachineState {
            tpm: if tpm { self.tpm.clone() } else { None },
            nvram: if nvram { self.nvram.clone() } else { None },
        }
    }
}

impl From<TpmState> for MachineState {
    fn from(tpm: TpmState) -> Self {
        MachineState {
            tpm: Some(tpm),
            nvram: None,
        }
    }
}

/// The `digest` rule of format v1 over `(section/name, sha256)` pairs.
pub fn state_digest(entries: impl IntoIterator<Item = (String, Sha256Sum)>) -> Sha256Sum {
    let mut lines: Vec<String> = entries
        .into_iter()
        .map(|(path, sum)| format!("{path} {}\n", sum.hex()))
        .collect();
    lines.sort();
    let mut h = Sha256::new();
    for l in &lines {
        h.update(l.as_bytes());
    }
    Sha256Sum(h.finalize().into())
}

/// A domain UUID in libvirt's canonical form (lowercase 8-4-4-4-12 hex).
/// Only a value that passed `parse` ever becomes part of a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainUuid(String);

impl DomainUuid {
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let b = s.as_bytes();
        if b.len() != 36 {
            return None;
        }
        for (i, &c) in b.iter().enumerate() {
            let ok = match i {
                8 | 13 | 18 | 23 => c == b'-',
                _ => c.is_ascii_hexdigit(),
            };
            if !ok {
                return None;
            }
        }
        Some(DomainUuid(s.to_ascii_lowercase()))
    }

    /// The canonical form only (docs/FORMAT.md §2.2): 8-4-4-4-12 hex with
    /// nothing around it (an attribute value, where `parse` would forgive
    /// the whitespace a `<uuid>` element's text may carry).
    pub(crate) fn parse_canonical(s: &str) -> Option<Self> {
        if s.len() != 36 {
            return None;
        }
        Self::parse(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DomainUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sorted_lines() {
        let s = TpmState::new(
            TpmVersion::V2_0,
            vec![StateFile {
                name: "tpm2-00.permall".into(),
                data: b"abc".to_vec(),
            }],
        );
        let expected_line = format!("tpm/tpm2-00.permall {}\n", Sha256Sum::of(b"abc").hex());
        assert_eq!(s.digest(), Sha256Sum::of(expected_line.as_bytes()));
    }

    #[test]
    fn machine_digest_joins_sections() {
        let tpm = TpmState::new(
            TpmVersion::V2_0,
            vec![StateFile {
                name: "tpm2-00.permall".into(),
                data: b"abc".to_vec(),
            }],
        );
        let only_tpm = MachineState::from(tpm.clone());
        assert_eq!(only_tpm.digest(), tpm.digest());
        let both = MachineState::new(Some(tpm.clone()), Some(b"vars".to_vec()));
        let lines = [
            format!("nvram/VARS.fd {}\n", Sha256Sum::of(b"vars").hex()),
            format!("tpm/tpm2-00.permall {}\n", Sha256Sum::of(b"abc").hex()),
        ]
        .concat();
        assert_eq!(both.digest(), Sha256Sum::of(lines.as_bytes()));
        assert_eq!(both.only(true, false), only_tpm);
        assert_eq!(both.total_size(), 7);
    }

    #[test]
    fn uuid_parsing() {
        assert_eq!(
            DomainUuid::parse("1B4E28BA-2FA1-11D2-883F-0016D3CCA427")
                .unwrap()
                .as_str(),
            "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
        );
        for bad in [
            "",
            "../../etc/passwd",
            "1b4e28ba2fa111d2883f0016d3cca427",
            "1b4e28ba-2fa1-11d2-883f-0016d3cca42/",
            "1b4e28ba-2fa1-11d2-883f-0016d3cca4270",
            "1b4e28ba_2fa1-11d2-883f-0016d3cca427",
        ] {
            assert!(DomainUuid::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hex_round_trip_and_strictness() {
        let d = Sha256Sum::of(b"x");
        assert_eq!(Sha256Sum::parse_hex(&d.hex()), Some(d));
        assert_eq!(Sha256Sum::parse_hex(&d.hex().to_uppercase()), None);
        assert_eq!(Sha256Sum::parse_hex("00"), None);
    }

    #[test]
    fn debug_never_shows_bytes() {
        let f = StateFile {
            name: "tpm2-00.permall".into(),
            data: b"SECRET-SEED".to_vec(),
        };
        let s = format!("{f:?}");
        assert!(!s.contains("SECRET"));
        assert!(s.contains("size: 11"));
    }
}
