//! Plugin identities (issue 21): a host whose age identity is held by a
//! plugin (`age-plugin-tpm`, `age-plugin-yubikey`: the private key is never
//! in a file). No real plugin here, so `tests/plugin/age-plugin-stub`
//! speaks the real age plugin protocol with a toy "hardware" secret; rage
//! itself accepts it (checked below). The hook binary restores an element
//! sealed for the plugin recipient through the plugin, `host-id` prints
//! the recipient from the identity file's comment, and without the plugin
//! binary the start is refused with one line naming it.

#[macro_use]
mod common;

use common::{env::Env, runner::*, scratch::*, states::*};
use std::path::{Path, PathBuf};
use std::process::Command;
use virt_tpm_state::format::{encode, Protection, Provenance, Style};
use virt_tpm_state::recipients::{Recipient, RecipientSet};
use virt_tpm_state::state::DomainUuid;

fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plugin")
}

/// The plugin's dir first, then the PATH this test started with (where
/// rage is, e.g. ~/.cargo/bin).
fn path_with_plugin() -> String {
    static ORIGINAL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let original = ORIGINAL.get_or_init(|| std::env::var("PATH").unwrap_or_default());
    format!("{}:{original}", plugin_dir().display())
}

#[test]
fn hook_restores_through_a_plugin_identity() {
    let out = Command::new(plugin_dir().join("age-plugin-stub"))
        .arg("--generate")
        .output()
        .expect("python3 runs the stub plugin");
    assert!(out.status.success(), "{out:?}");
    let identity = String::from_utf8(out.stdout).unwrap();
    let recipient = identity
        .lines()
        .find_map(|l| l.strip_prefix("# recipient: "))
        .unwrap()
        .to_string();
    assert!(recipient.starts_with("age1stub1"), "{recipient}");

    // The writer (store, rekey) runs the plugin's recipient side.
    std::env::set_var("PATH", path_with_plugin());
    let set = RecipientSet::new(vec![Recipient::parse(&recipient).unwrap()], "t".into());
    let s = Scratch::new();
    let st = St {
        permall: St::new("plugin").permall,
        vars: Vec::new(),
    };
    let element = encode(
        &st.machine(),
        &Provenance {
            uuid: DomainUuid::parse(&s.uuid).unwrap(),
            generation: 4,
            parent: None,
            stored: "2026-12-07T00:00:00Z".into(),
            host: "plugin-host".into(),
        },
        Style::Standalone,
        Protection::Recipients { set: &set },
    )
    .unwrap();
    assert!(element.contains("encoding=\"gzip+age+base64\""));
    let plain = xml_for(&st, 4, &s.uuid, false);
    let (a, b) = (
        plain.find("<vts:state").unwrap(),
        plain.find("</vts:state>").unwrap() + "</vts:state>".len(),
    );
    let xml = format!("{}{element}{}", &plain[..a], &plain[b..]);

    // The host's identity is the plugin's identity line (0600).
    s.write("etc/virt-tpm-state/host-identity.txt", &identity);
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            s.path("etc/virt-tpm-state/host-identity.txt"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    let cli = Command::new(env!("CARGO_BIN_EXE_virt-tpm-state"))
        .arg("host-id")
        .env("VIRT_TPM_STATE_ROOT", s.root())
        .env("PATH", path_with_plugin())
        .output()
        .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    assert!(
        String::from_utf8_lossy(&cli.stdout).contains(&recipient),
        "host-id: {cli:?}"
    );

    // Without the plugin on the hook's PATH: one line naming it, nothing written.
    let out = s.prepare(&xml, &[("PATH", "/usr/bin:/bin".to_string())]);
    let line = failed(&out, 19, "prepare without the plugin");
    assert!(line.contains("age-plugin-stub"), "{line}");
    assert!(s.live().is_none());

    // With it: restored through the plugin, byte for byte.
    let out = s.prepare(&xml, &[("PATH", path_with_plugin())]);
    ok(&out, "prepare through the plugin identity");
    assert_eq!(s.live(), Some(st.clone()));

    // rage, an independent implementation, opens what we sealed with the same plugin.
    let info =
        virt_tpm_state::domain::parse_domain(xml.as_bytes(), virt_tpm_state::format::NAMESPACE_URI)
            .unwrap();
    let f = &info.metadata.unwrap().children[0].children[0];
    let compact: String = f.text.split_ascii_whitespace().collect();
    use base64::Engine as _;
    let age_file = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .unwrap();
    let id_file = s.tmp.path().join("stub-identity.txt");
    std::fs::write(&id_file, &identity).unwrap();
    if common::env::ready("the rage part", &[Env::Cmd("rage")]) {
        let mut rage = Command::new("rage");
        rage.args(["-d", "-i"])
            .arg(&id_file)
            .env("PATH", path_with_plugin());
        let out = output_with_stdin(&mut rage, &age_file);
        assert!(out.status.success(), "rage -d with the stub plugin");
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&out.stdout[..]), &mut raw)
            .unwrap();
        assert_eq!(raw, st.permall);
    }
}
