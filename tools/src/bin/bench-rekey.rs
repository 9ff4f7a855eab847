//! The element work of `virt-tpm-state rekey` on 100 elements sealed for
//! age recipients (docs/BENCHMARKS.md, "Rekeying 100 elements"):
//!
//! ```text
//! cargo run --release -p tools --bin bench-rekey [-- N]
//! ```
//!
//! Seals N (default 100) elements, each a 6234-byte TPM 2.0 permall plus a
//! 540 KiB OVMF-sized VARS file, for {A, B, owner}; then, as `rekey` does
//! after C is added, decodes each with A's identity and (1) re-wraps it for
//! {A, B, C, owner} (`rekey`) and (2) seals it afresh (`rekey --rotate`).
//! Prints the time of the decoding (shared by both) and of each
//! re-protection, and the proof: how many files kept their age payload
//! (nonce and ciphertext) byte for byte (checked by decoding the result). libvirt's part of a
//! real `rekey` (reading and writing each definition) is not included.

use age::secrecy::ExposeSecret as _;
use std::time::Instant;
use tools::stream::stream;
use virt_tpm_state::domain::parse_domain;
use virt_tpm_state::envelope::Keyring;
use virt_tpm_state::format::{
    decode, encode, DecodeLimits, Protection, Provenance, Style, NAMESPACE_URI,
};
use virt_tpm_state::recipients::{
    generate_identity, parse_identities, payload_of, HostIdentity, Recipient, RecipientSet,
};
use virt_tpm_state::state::{DomainUuid, MachineState, StateFile, TpmState, TpmVersion};
use virt_tpm_state::swtpm::synthetic_blob;

fn host() -> (Vec<HostIdentity>, Recipient) {
    let (text, r) = generate_identity("bench");
    (
        parse_identities(text.expose_secret(), "bench").unwrap(),
        Recipient::parse(&r).unwrap(),
    )
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(100, |a| a.parse().expect("N"));
    let ((a_id, a), (_, b), (_, c), (_, owner)) = (host(), host(), host(), host());
    let before = RecipientSet::new(vec![a.clone(), b.clone(), owner.clone()], "bench".into());
    let after = RecipientSet::new(vec![a, b, c, owner], "bench".into());
    let mut keys = Keyring::default();
    keys.add_identities(a_id);

    // 540 KiB of VARS: mostly erased flash (0xff) with some variables.
    let mut vars = vec![0xffu8; 540_672];
    vars[..8192].copy_from_slice(&stream("vars", 8192));
    let elements: Vec<String> = (0..n)
        .map(|i| {
            let permall = synthetic_blob(0, &stream(&format!("permall {i}"), 6224));
            let state = MachineState::new(
                Some(TpmState::new(
                    TpmVersion::V2_0,
                    vec![StateFile {
                        name: "tpm2-00.permall".into(),
                        data: permall,
                    }],
                )),
                Some(vars.clone()),
            );
            let uuid = format!("00000000-0000-4000-8000-{i:012x}");
            let prov = Provenance {
                uuid: DomainUuid::parse(&uuid).unwrap(),
                generation: 7,
                parent: None,
                stored: "2026-12-07T00:00:00Z".into(),
                host: "bench".into(),
            };
            encode(
                &state,
                &prov,
                Style::Standalone,
                Protection::Recipients { set: &before },
            )
            .unwrap()
        })
        .collect();
    let decode = |text: &str| {
        let xml = format!(
            "<domain><name>b</name><uuid>00000000-0000-4000-8000-000000000000</uuid><metadata>{text}</metadata></domain>"
        );
        let el = parse_domain(xml.as_bytes(), NAMESPACE_URI)
            .unwrap()
            .metadata
            .unwrap();
        decode(&el, DecodeLimits::default(), &keys).unwrap()
    };

    let start = Instant::now();
    let decoded: Vec<_> = elements.iter().map(|t| decode(t)).collect();
    println!(
        "decode (what rekey does first, as every reader): {n} elements in {:.0} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    for (label, rotate) in [("rekey (re-wrap)", false), ("rekey --rotate", true)] {
        let mut secs = 0.0;
        let mut kept = 0;
        let mut files = 0;
        let mut generation_kept = 0;
        for m in &decoded {
            let start = Instant::now();
            let protection = if rotate {
                Protection::Recipients { set: &after }
            } else {
                Protection::Rewrap {
                    from: &m.age_files,
                    identities: keys.identities(),
                    set: &after,
                }
            };
            let out = encode(&m.state, &m.provenance, Style::Standalone, protection).unwrap();
            secs += start.elapsed().as_secs_f64();
            // The proof, by decoding what was written.
            let back = decode(&out);
            generation_kept += usize::from(back.provenance.generation == m.provenance.generation);
            for ((_, old), (_, new)) in m.age_files.iter().zip(&back.age_files) {
                files += 1;
                kept += usize::from(payload_of(old) == payload_of(new));
            }
        }
        println!(
            "{label}: {n} elements ({files} files) re-protected in {:.0} ms ({:.2} ms per element, after decoding); age payload (nonce + ciphertext) unchanged in {kept}/{files} files; generation unchanged in {generation_kept}/{n}",
            secs * 1000.0,
            secs * 1000.0 / n as f64
        );
    }
}
