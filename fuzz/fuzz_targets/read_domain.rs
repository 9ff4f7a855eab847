//! The hook's reader on arbitrary bytes: `domain::parse_domain` and then
//! `format::decode` (with the vector keys, so sealed elements are
//! opened too). Any input must be refused with a typed error or decode to a
//! state that passes every check and re-encodes to itself; a panic, a hang
//! (-timeout) or an allocation over -malloc_limit_mb is a finding.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use virt_tpm_state::domain::parse_domain;
use virt_tpm_state::envelope::{Keyring, SecretKey};
use virt_tpm_state::format::{decode, encode, DecodeLimits, Protection, Style, NAMESPACE_URI};
use virt_tpm_state::swtpm::check_header;

fn keys() -> &'static Keyring {
    static KEYS: OnceLock<Keyring> = OnceLock::new();
    KEYS.get_or_init(|| {
        let texts = [
            include_str!("../../fixtures/vectors/keys/20250101T000000Z-a969ca0c7ba0a7cb.key"),
            include_str!("../../fixtures/vectors/keys/20260101T000000Z-f01e608db5c1c5c4.key"),
        ];
        Keyring::new(
            texts
                .iter()
                .map(|t| {
                    SecretKey::from_bytes(STANDARD.decode(t.trim()).unwrap().try_into().unwrap())
                })
                .collect(),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits::default();
    let Ok(info) = parse_domain(data, NAMESPACE_URI) else {
        return;
    };
    let Some(el) = info.metadata else { return };
    let Ok(m) = decode(&el, limits, keys()) else {
        return;
    };
    assert!(!m.state.is_empty());
    assert_eq!(m.digest, m.state.digest());
    if let Some(t) = &m.state.tpm {
        for f in t.files() {
            assert!(t.version.allowed_files().contains(&f.name.as_str()));
            assert!(check_header(&f.data).is_ok());
            assert!(f.data.len() as u64 <= limits.max_file_size);
        }
    }
    if let Some(n) = &m.state.nvram {
        assert!(n.data.len() as u64 <= limits.max_file_size);
    }
    // What was accepted re-encodes to itself, plaintext and sealed.
    let (id, key) = keys().newest().unwrap();
    let mut counter = 0u8;
    let mut fill = |b: &mut [u8]| {
        counter = counter.wrapping_add(1);
        b.fill(counter)
    };
    for protection in [
        Protection::Plain,
        Protection::Sealed {
            key_id: id,
            key,
            fill: &mut fill,
        },
    ] {
        let text = encode(&m.state, &m.provenance, Style::Standalone, protection).unwrap();
        let xml = format!(
            "<domain><name>v</name><uuid>{}</uuid><metadata>{text}</metadata></domain>",
            m.provenance.uuid
        );
        let el = parse_domain(xml.as_bytes(), NAMESPACE_URI)
            .unwrap()
            .metadata
            .unwrap();
        let back = decode(&el, limits, keys()).unwrap();
        assert_eq!(back.state, m.state);
        assert_eq!(back.provenance, m.provenance);
    }
});
