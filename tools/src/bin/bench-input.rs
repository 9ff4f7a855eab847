//! Inputs for `benches/run.sh`, deterministic so a rerun measures the same
//! bytes:
//!
//! ```text
//! cargo run --release -p tools --bin bench-input -- synth-permall SIZE OUT
//!     a valid swtpm TPM 2.0 state file of SIZE bytes (10-byte header, then
//!     incompressible bytes from a SHA-256 stream, like a real permall's keys)
//! cargo run --release -p tools --bin bench-input -- domain TEMPLATE PERMALL [PAD_BYTES]
//!     prints TEMPLATE (a domain XML, e.g. `virsh dumpxml`) with a
//!     <metadata> holding our element for PERMALL (format::encode,
//!     Style::Standalone), plus PAD_BYTES of another application's metadata
//!     (to show the hook's memory does not grow with the XML)
//! cargo run --release -p tools --bin bench-input -- domain-vars TEMPLATE PERMALL VARS
//!     like `domain`, for a UEFI domain (`<os firmware='efi'>`) whose element
//!     also carries VARS (an OVMF variable store) in its <nvram> section
//! cargo run --release -p tools --bin bench-input -- element TEMPLATE PERMALL
//!     prints only the element as `virt-tpm-state store` passes it to
//!     virDomainSetMetadata (Style::ForSetMetadata: no prefix, no xmlns)
//! ```

use std::process::ExitCode;
use tools::stream::stream;
use virt_tpm_state::format::{encode, Protection, Provenance, Style};
use virt_tpm_state::state::{DomainUuid, MachineState, StateFile, TpmState, TpmVersion};
use virt_tpm_state::swtpm::{check_header, synthetic_blob};

fn uuid_of(xml: &str) -> String {
    let s = xml.find("<uuid>").expect("template has no <uuid>") + "<uuid>".len();
    let e = xml.find("</uuid>").expect("template has no </uuid>");
    xml[s..e].trim().to_string()
}

fn element(template: &str, permall: &str, style: Style) -> String {
    element_with(template, permall, None, style)
}

fn element_with(template: &str, permall: &str, vars: Option<&str>, style: Style) -> String {
    let vars = vars.map(|v| std::fs::read(v).unwrap_or_else(|e| panic!("{v}: {e}")));
    let data = std::fs::read(permall).unwrap_or_else(|e| panic!("{permall}: {e}"));
    check_header(&data).unwrap_or_else(|e| panic!("{permall}: not a swtpm state file: {e}"));
    let tpm = TpmState::new(
        TpmVersion::V2_0,
        vec![StateFile {
            name: TpmVersion::V2_0.permall_name().into(),
            data,
        }],
    );
    let provenance = Provenance {
        uuid: DomainUuid::parse(&uuid_of(template)).expect("template uuid"),
        generation: 1,
        parent: None,
        stored: "2026-01-01T00:00:00Z".into(),
        host: "bench-host".into(),
    };
    encode(
        &MachineState::new(Some(tpm), vars),
        &provenance,
        style,
        Protection::Plain,
    )
    .unwrap()
}

/// Another application's metadata, about `bytes` long (compressible text,
/// many small elements, as a manager's own metadata would be).
fn padding(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 128);
    s.push_str("    <pad:blob xmlns:pad=\"http://example.org/bench-padding\">\n");
    let mut i = 0u64;
    while s.len() < bytes {
        s.push_str(&format!(
            "      <pad:entry n=\"{i}\">bench padding, another application's metadata</pad:entry>\n"
        ));
        i += 1;
    }
    s.push_str("    </pad:blob>\n");
    s
}

fn domain(template: &str, permall: &str, pad: usize) -> String {
    domain_with(template, permall, None, pad)
}

fn domain_with(template: &str, permall: &str, vars: Option<&str>, pad: usize) -> String {
    let el: String = element_with(template, permall, vars, Style::Standalone)
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    let pad = if pad > 0 { padding(pad) } else { String::new() };
    let pos = template.find("</uuid>\n").expect("template has no </uuid>") + "</uuid>\n".len();
    assert!(
        !template.contains("<metadata"),
        "template already has <metadata>"
    );
    format!(
        "{}  <metadata>\n{pad}{el}  </metadata>\n{}",
        &template[..pos],
        &template[pos..]
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["synth-permall", size, out] => {
            let size: usize = size.parse().expect("SIZE");
            let blob = synthetic_blob(0, &stream("virt-tpm-state bench permall", size - 10));
            check_header(&blob).expect("synthetic blob");
            std::fs::write(out, blob).unwrap_or_else(|e| panic!("{out}: {e}"));
        }
        ["domain", template, permall] | ["domain", template, permall, _] => {
            let pad = a.get(3).map(|p| p.parse().expect("PAD_BYTES")).unwrap_or(0);
            let t = std::fs::read_to_string(template).unwrap_or_else(|e| panic!("{template}: {e}"));
            print!("{}", domain(&t, permall, pad));
        }
        ["domain-vars", template, permall, vars] => {
            let t = std::fs::read_to_string(template).unwrap_or_else(|e| panic!("{template}: {e}"));
            // A UEFI domain: the hook derives libvirt's default VARS path.
            let t = t.replacen("<os>", "<os firmware='efi'>", 1);
            assert!(
                t.contains("<os firmware='efi'>"),
                "template has no plain <os>"
            );
            print!("{}", domain_with(&t, permall, Some(vars), 0));
        }
        ["element", template, permall] => {
            let t = std::fs::read_to_string(template).unwrap_or_else(|e| panic!("{template}: {e}"));
            print!("{}", element(&t, permall, Style::ForSetMetadata));
        }
        _ => {
            eprintln!("usage: bench-input synth-permall SIZE OUT | domain TEMPLATE PERMALL [PAD_BYTES] | domain-vars TEMPLATE PERMALL VARS | element TEMPLATE PERMALL");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
