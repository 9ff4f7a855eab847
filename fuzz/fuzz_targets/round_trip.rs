//! decode(encode(x)) == x for states built from the fuzzer's bytes: TPM 1.2
//! or 2.0 or none, a VARS store or none, any provenance, plaintext or sealed.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virt_tpm_state::domain::parse_domain;
use virt_tpm_state::envelope::{Keyring, SecretKey};
use virt_tpm_state::format::{
    decode, encode, DecodeLimits, Protection, Provenance, Style, NAMESPACE_URI,
};
use virt_tpm_state::state::{DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion};

fn blob(u: &mut Unstructured) -> Result<Vec<u8>> {
    let payload: Vec<u8> = u.arbitrary()?;
    let total = 10 + payload.len();
    let hdrsize = 10 + u.int_in_range(0..=payload.len())?;
    let mut v = vec![u.int_in_range(1..=255)?, u.arbitrary()?];
    v.extend_from_slice(&(hdrsize as u16).to_be_bytes());
    v.extend_from_slice(&u.arbitrary::<u16>()?.to_be_bytes());
    v.extend_from_slice(&(total as u32).to_be_bytes());
    v.extend_from_slice(&payload);
    Ok(v)
}

/// What XML 1.0 can carry (docs/FORMAT.md: others become U+FFFD).
fn xml_text(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\t'
            | '\n'
            | '\r'
            | '\u{20}'..='\u{D7FF}'
            | '\u{E000}'..='\u{FFFD}'
            | '\u{10000}'.. => c,
            _ => char::REPLACEMENT_CHARACTER,
        })
        .collect()
}

fn case(u: &mut Unstructured) -> Result<()> {
    let tpm = match u.int_in_range(0..=2)? {
        0 => None,
        v => {
            let version = if v == 1 {
                TpmVersion::V1_2
            } else {
                TpmVersion::V2_0
            };
            Some(TpmState::new(
                version,
                vec![StateFile {
                    name: version.permall_name().into(),
                    data: blob(u)?,
                }],
            ))
        }
    };
    let nvram: Option<Vec<u8>> = u.arbitrary()?;
    if tpm.is_none() && nvram.is_none() {
        return Ok(());
    }
    let state = MachineState::new(tpm, nvram);
    let uuid_bytes: [u8; 16] = u.arbitrary()?;
    let h: String = uuid_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    );
    let prov = Provenance {
        uuid: DomainUuid::parse(&uuid).unwrap(),
        generation: u.arbitrary()?,
        parent: if u.arbitrary()? {
            Some(Sha256Sum(u.arbitrary()?))
        } else {
            None
        },
        stored: u.arbitrary()?,
        host: u.arbitrary()?,
    };
    let key = SecretKey::from_bytes(u.arbitrary()?);
    let id = key.id();
    let sealed: bool = u.arbitrary()?;
    let mut n = 0u8;
    let mut fill = |b: &mut [u8]| {
        n = n.wrapping_add(1);
        b.fill(n)
    };
    let protection = if sealed {
        Protection::Sealed {
            key_id: &id,
            key: &key,
            fill: &mut fill,
        }
    } else {
        Protection::Plain
    };
    let text = encode(&state, &prov, Style::Standalone, protection).unwrap();
    let xml =
        format!("<domain><name>v</name><uuid>{uuid}</uuid><metadata>{text}</metadata></domain>");
    let el = parse_domain(xml.as_bytes(), NAMESPACE_URI)
        .unwrap()
        .metadata
        .unwrap();
    let back = decode(&el, DecodeLimits::default(), &Keyring::new(vec![key])).unwrap();
    assert_eq!(back.state, state);
    assert_eq!(back.provenance.generation, prov.generation);
    assert_eq!(back.provenance.parent, prov.parent);
    assert_eq!(back.provenance.stored, xml_text(&prov.stored));
    assert_eq!(back.provenance.host, xml_text(&prov.host));
    assert_eq!(back.sealed_with, if sealed { vec![id] } else { vec![] });
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = case(&mut Unstructured::new(data));
});
