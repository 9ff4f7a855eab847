//! Machine states and the prepare-begin XML carrying them: a TPM 2.0
//! permall plus a VARS file per seed, injected into the domain XML libvirt
//! 9.0 really hands the hook (fixtures/domains/).

use std::path::Path;
use virt_tpm_state::format::{encode, Protection, Provenance, Style};
use virt_tpm_state::state::{DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion};
use virt_tpm_state::swtpm::synthetic_blob;

pub const NAME: &str = "tpm2-with-metadata";
pub const VARS_REL: &str = "var/lib/libvirt/qemu/nvram/faults_VARS.fd";

pub fn stream(seed: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0u32;
    while out.len() < len {
        out.extend_from_slice(&Sha256Sum::of(format!("{seed}/{i}").as_bytes()).0);
        i += 1;
    }
    out.truncate(len);
    out
}

/// One machine state: a TPM 2.0 permall and a VARS file, distinct per seed.
#[derive(Clone, Debug, PartialEq)]
pub struct St {
    pub permall: Vec<u8>,
    pub vars: Vec<u8>,
}

impl St {
    pub fn new(seed: &str) -> St {
        St {
            permall: synthetic_blob(0, &stream(&format!("{seed}/tpm"), 6224)),
            vars: stream(&format!("{seed}/vars"), 128 * 1024),
        }
    }

    pub fn machine(&self) -> MachineState {
        MachineState::new(
            Some(TpmState::new(
                TpmVersion::V2_0,
                vec![StateFile {
                    name: "tpm2-00.permall".into(),
                    data: self.permall.clone(),
                }],
            )),
            (!self.vars.is_empty()).then(|| self.vars.clone()),
        )
    }

    pub fn digest(&self) -> String {
        self.machine().digest().to_string()
    }
}

pub fn fixture_xml() -> String {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/domains/hook-stdin-prepare-begin.xml");
    std::fs::read_to_string(p).unwrap()
}

pub fn fixture_uuid(xml: &str) -> String {
    let s = xml.find("<uuid>").unwrap() + "<uuid>".len();
    let e = xml.find("</uuid>").unwrap();
    xml[s..e].trim().to_string()
}

/// The prepare-begin XML of a UEFI domain with a TPM 2.0 whose metadata
/// holds `st` (generation `gen`).
pub fn xml_with(st: &St, gen: u64) -> String {
    xml_for(st, gen, &fixture_uuid(&fixture_xml()), true)
}

/// The prepare-begin XML of domain `uuid` whose metadata holds `st`; with
/// `nvram`, a UEFI domain (VARS file at [`VARS_REL`]) and the VARS file in
/// the element too.
pub fn xml_for(st: &St, gen: u64, uuid: &str, nvram: bool) -> String {
    let fixture = fixture_xml();
    let base = fixture.replacen(&fixture_uuid(&fixture), uuid, 1);
    if !nvram {
        let st = St {
            permall: st.permall.clone(),
            vars: Vec::new(),
        };
        return with_element(&base, &st, gen, uuid);
    }
    let base = base.replacen(
        "    <boot dev='hd'/>\n",
        &format!("    <boot dev='hd'/>\n    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\n    <nvram>/{VARS_REL}</nvram>\n"),
        1,
    );
    assert!(base.contains("<nvram>"), "fixture <os> changed");
    with_element(&base, st, gen, uuid)
}

fn with_element(base: &str, st: &St, gen: u64, uuid: &str) -> String {
    let element = encode(
        &st.machine(),
        &Provenance {
            uuid: DomainUuid::parse(uuid).unwrap(),
            generation: gen,
            parent: None,
            stored: "2026-01-01T00:00:00Z".into(),
            host: "test-host".into(),
        },
        Style::Standalone,
        Protection::Plain,
    )
    .unwrap();
    let indented: String = element.lines().map(|l| format!("    {l}\n")).collect();
    let pos = base
        .find("urn:virt-tpm-state:1")
        .expect("placeholder element");
    let line_start = base[..pos].rfind('\n').unwrap() + 1;
    let line_end = base[pos..].find('\n').unwrap() + pos + 1;
    format!("{}{indented}{}", &base[..line_start], &base[line_end..])
}

/// libvirt's default VARS file of [`NAME`] (firmware autoselection).
pub const AUTO_VARS_REL: &str = "var/lib/libvirt/qemu/nvram/tpm2-with-metadata_VARS.fd";

/// The prepare-begin XML of a UEFI domain by firmware autoselection (no
/// `<nvram>` path: libvirt passes none to `prepare`), its metadata holding
/// `st` (generation `gen`), VARS included: restored to [`AUTO_VARS_REL`].
pub fn xml_auto(st: &St, gen: u64) -> String {
    let fixture = fixture_xml();
    let base = fixture.replacen("<os>", "<os firmware='efi'>", 1);
    assert_ne!(base, fixture, "fixture <os> changed");
    with_element(&base, st, gen, &fixture_uuid(&fixture))
}
