//! Round trips and refusals of format v1, through both entries.

use super::*;
use crate::domain::parse_domain;
use crate::envelope::{os_random, Keyring, SecretKey};
use crate::recipients::RecipientSet;
use crate::state::{StateFile, TpmState, VarsKind};
use crate::swtpm::synthetic_blob;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

const UUID: &str = "6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d";

fn sample() -> (MachineState, Provenance) {
    let tpm = MachineState::from(TpmState::new(
        TpmVersion::V2_0,
        vec![StateFile {
            name: "tpm2-00.permall".into(),
            data: synthetic_blob(0, &[7u8; 300]),
        }],
    ));
    let prov = Provenance {
        uuid: DomainUuid::parse(UUID).unwrap(),
        generation: 3,
        parent: Some(Sha256Sum::of(b"older")),
        stored: "2026-11-23T00:00:00Z".into(),
        host: "host-a & <b>".into(),
    };
    (tpm, prov)
}

fn in_domain(element: &str) -> XmlElement {
    let xml =
        format!("<domain><name>v</name><uuid>{UUID}</uuid><metadata>{element}</metadata></domain>");
    parse_domain(xml.as_bytes(), NAMESPACE_URI)
        .unwrap()
        .metadata
        .expect("element found")
}

/// `state` sealed with host key `key`, standalone.
fn sealed(state: &MachineState, prov: &Provenance, key: &SecretKey) -> String {
    let protection = Protection::Sealed {
        key_id: &key.id(),
        key,
        fill: &mut os_random,
    };
    encode(state, prov, Style::Standalone, protection).unwrap()
}

/// Reads `element` back with no keys (plaintext only).
fn read_back(element: &str) -> Result<MetadataState, FormatError> {
    decode(
        &in_domain(element),
        DecodeLimits::default(),
        &Keyring::default(),
    )
}

#[test]
fn round_trip_standalone() {
    let (tpm, prov) = sample();
    let text = encode(&tpm, &prov, Style::Standalone, Protection::Plain).unwrap();
    let back = read_back(&text).unwrap();
    assert_eq!(back.state, tpm);
    assert_eq!(back.provenance, prov);
    assert_eq!(back.digest, tpm.digest());
}

#[test]
fn round_trip_as_libvirt_namespaces_only_the_root() {
    // libvirt puts the root in the namespace; children may stay unprefixed.
    let (tpm, prov) = sample();
    let text = encode(&tpm, &prov, Style::ForSetMetadata, Protection::Plain)
        .unwrap()
        .replacen(
            "<state ",
            &format!("<vts:state xmlns:vts=\"{NAMESPACE_URI}\" "),
            1,
        );
    let text = text.replace("</state>", "</vts:state>");
    let back = read_back(&text).unwrap();
    assert_eq!(back.state, tpm);
}

#[test]
fn encoding_is_deterministic() {
    let (tpm, prov) = sample();
    assert_eq!(
        encode(&tpm, &prov, Style::Standalone, Protection::Plain).unwrap(),
        encode(&tpm, &prov, Style::Standalone, Protection::Plain).unwrap()
    );
    let gz = gzip_deterministic(b"abc");
    assert_eq!(&gz[4..8], &[0, 0, 0, 0], "mtime must be 0");
    assert_eq!(gz[3] & 0x08, 0, "no file name");
}

#[test]
fn whitespace_in_base64_is_ignored() {
    let (tpm, prov) = sample();
    let text = encode(&tpm, &prov, Style::Standalone, Protection::Plain).unwrap();
    let start = text.find("gzip+base64\">").unwrap() + "gzip+base64\">".len();
    let end = text[start..].find('<').unwrap() + start;
    let b64 = &text[start..end];
    let wrapped: String = b64
        .as_bytes()
        .chunks(10)
        .map(|c| format!("\n      {}", std::str::from_utf8(c).unwrap()))
        .collect();
    let text = format!("{}{}\n    {}", &text[..start], wrapped, &text[end..]);
    read_back(&text).unwrap();
}

fn refused(text: &str) -> FormatError {
    read_back(text).unwrap_err()
}

fn sample_text() -> String {
    let (tpm, prov) = sample();
    encode(&tpm, &prov, Style::Standalone, Protection::Plain).unwrap()
}

#[test]
fn refuses_unknown_format_and_encoding() {
    let t = sample_text().replace("format=\"1\"", "format=\"2\"");
    assert_eq!(refused(&t), FormatError::UnknownFormat("2".into()));
    let t = sample_text().replace("gzip+base64", "zstd+base64");
    assert!(matches!(refused(&t), FormatError::UnknownEncoding(..)));
}

#[test]
fn refuses_bad_names_and_duplicates() {
    for bad in [
        "../../etc/shadow",
        "tpm2-00.volatilestate",
        "tpm-00.permall",
        "",
    ] {
        let t = sample_text().replace("name=\"tpm2-00.permall\"", &format!("name=\"{bad}\""));
        assert!(
            matches!(refused(&t), FormatError::FileNameNotAllowed { .. }),
            "{bad}"
        );
    }
    let t = sample_text();
    let start = t.find("    <vts:file").unwrap();
    let end = t.find("</vts:file>\n").unwrap() + "</vts:file>\n".len();
    let dup = format!("{}{}{}", &t[..end], &t[start..end], &t[end..]);
    assert!(matches!(refused(&dup), FormatError::DuplicateFile(_)));
}

/// An EK certificate travels beside the permall (TPM 2.0 only), is
/// checked for its DER shape, and takes part in the digest.
#[test]
fn ek_certificates_round_trip_and_are_checked() {
    let (_, prov) = sample();
    let mut cert = vec![0x30, 0x82, 0x03, 0x00];
    cert.extend(std::iter::repeat_n(0x5a, 0x300));
    let files = |cert_name: &str, cert: &[u8]| {
        vec![
            StateFile {
                name: "tpm2-00.permall".into(),
                data: synthetic_blob(0, &[7u8; 300]),
            },
            StateFile {
                name: cert_name.into(),
                data: cert.to_vec(),
            },
        ]
    };
    let state = MachineState::from(TpmState::new(
        TpmVersion::V2_0,
        files("ek-rsa2048.crt", &cert),
    ));
    let text = encode(&state, &prov, Style::Standalone, Protection::Plain).unwrap();
    let back = read_back(&text).unwrap();
    assert_eq!(back.state, state);
    let without = MachineState::from(TpmState::new(
        TpmVersion::V2_0,
        files("ek-rsa2048.crt", &cert)[..1].to_vec(),
    ));
    assert_ne!(state.digest(), without.digest());
    // A torn certificate is refused like a torn permall.
    let torn = MachineState::from(TpmState::new(
        TpmVersion::V2_0,
        files("ek-secp384r1.crt", &cert[..cert.len() - 1]),
    ));
    let text = encode(&torn, &prov, Style::Standalone, Protection::Plain).unwrap();
    assert!(matches!(
        refused(&text),
        FormatError::BadSwtpmHeader { ref name, .. } if name == "ek-secp384r1.crt"
    ));
    // Never other names: swtpm's backup, other certificate files, and
    // no certificate beside a TPM 1.2 permall.
    for bad in ["tpm2-00.permall.bak", "iak-rsa2048.crt", "ek.cert"] {
        let text = encode(&state, &prov, Style::Standalone, Protection::Plain)
            .unwrap()
            .replace("name=\"ek-rsa2048.crt\"", &format!("name=\"{bad}\""));
        assert!(
            matches!(refused(&text), FormatError::FileNameNotAllowed { .. }),
            "{bad}"
        );
    }
    assert!(TpmVersion::V1_2.ek_cert_files().is_empty());
}

#[test]
fn refuses_bad_base64_sizes_and_sums() {
    let t = sample_text().replace("gzip+base64\">", "gzip+base64\">!!");
    assert!(matches!(refused(&t), FormatError::BadBase64(_)));
    let t = sample_text().replace("size=\"310\"", "size=\"311\"");
    assert!(matches!(refused(&t), FormatError::SizeMismatch { .. }));
    let t = sample_text().replace("size=\"310\"", "size=\"99999999999\"");
    assert!(matches!(refused(&t), FormatError::DeclaredTooLarge { .. }));
    let (tpm, _) = sample();
    let sha = tpm.tpm.as_ref().unwrap().files()[0].sha256().hex();
    let t = sample_text().replace(&sha, &Sha256Sum::of(b"x").hex());
    assert!(matches!(refused(&t), FormatError::Sha256Mismatch { .. }));
    let t = sample_text().replace(&tpm.digest().hex(), &Sha256Sum::of(b"x").hex());
    assert!(matches!(refused(&t), FormatError::DigestMismatch { .. }));
    let t = sample_text().replace("generation=\"3\"", "generation=\"-3\"");
    assert!(matches!(
        refused(&t),
        FormatError::BadAttribute {
            attribute: "generation",
            ..
        }
    ));
    let t = sample_text().replace(&format!("uuid=\"{UUID}\""), "uuid=\"x\"");
    assert!(matches!(
        refused(&t),
        FormatError::BadAttribute {
            attribute: "uuid",
            ..
        }
    ));
}

#[test]
fn refuses_decompression_bomb() {
    let bomb_data = vec![0u8; 8 * 1024 * 1024];
    let b64 = STANDARD.encode(gzip_deterministic(&bomb_data));
    let sha = Sha256Sum::of(&bomb_data);
    let digest = digest_of_sums(&[("tpm2-00.permall".into(), sha)]);
    // The size attribute lies (small) to get past the declared-size check.
    let t = format!(
        "<vts:state xmlns:vts=\"{NAMESPACE_URI}\" format=\"1\" uuid=\"{UUID}\" generation=\"1\" digest=\"{}\" parent=\"\" stored=\"\" host=\"\"><vts:tpm version=\"2.0\"><vts:file name=\"tpm2-00.permall\" size=\"100\" sha256=\"{}\" encoding=\"gzip+base64\">{b64}</vts:file></vts:tpm></vts:state>",
        digest.hex(),
        sha.hex()
    );
    assert!(matches!(
        refused(&t),
        FormatError::DecompressedTooLarge { .. }
    ));
}

#[test]
fn refuses_non_swtpm_content_and_unknown_sections() {
    let data = b"just some bytes, not a swtpm blob".to_vec();
    let tpm = MachineState::from(TpmState::new(
        TpmVersion::V2_0,
        vec![StateFile {
            name: "tpm2-00.permall".into(),
            data,
        }],
    ));
    let (_, prov) = sample();
    let t = encode(&tpm, &prov, Style::Standalone, Protection::Plain).unwrap();
    assert!(matches!(refused(&t), FormatError::BadSwtpmHeader { .. }));
    let t = sample_text().replace("</vts:tpm>", "</vts:tpm><vts:cmos/>");
    assert_eq!(refused(&t), FormatError::UnknownSection("cmos".into()));
    let t = sample_text().replace("</vts:tpm>", "</vts:tpm><vts:nvram/>");
    assert_eq!(refused(&t), FormatError::NoFiles("nvram"));
    let t = sample_text().replace("version=\"2.0\"", "version=\"3.0\"");
    assert!(matches!(refused(&t), FormatError::BadTpmVersion(_)));
}

fn with_nvram(tpm: bool) -> (MachineState, Provenance) {
    let (m, prov) = sample();
    let mut vars = vec![0xffu8; 540672];
    vars[..16].copy_from_slice(b"not a swtpm blob");
    (
        MachineState::new(if tpm { m.tpm } else { None }, Some(vars)),
        prov,
    )
}

/// `status` and `watch` compare the declared digest over the sections
/// that apply; it must be the digest the state itself has, plain and
/// sealed, over every subset.
#[test]
fn declared_digest_is_the_state_digest_over_each_subset() {
    let (state, prov) = with_nvram(true);
    let key = SecretKey::from_bytes([9; 32]);
    for text in [
        encode(&state, &prov, Style::Standalone, Protection::Plain).unwrap(),
        sealed(&state, &prov, &key),
    ] {
        let el = in_domain(&text);
        for (tpm, nvram) in [(true, true), (true, false), (false, true)] {
            assert_eq!(
                declared_digest(&el, tpm, nvram),
                Some(state.only(tpm, nvram).digest()),
                "tpm {tpm}, nvram {nvram}"
            );
        }
    }
    let (tpm_only, prov) = sample();
    let el = in_domain(&encode(&tpm_only, &prov, Style::Standalone, Protection::Plain).unwrap());
    assert_eq!(declared_digest(&el, true, true), Some(tpm_only.digest()));
}

/// A `<varstore>` JSON travels in its own section, under its own name
/// and digest line, sealed or not; the other kind's name is refused.
#[test]
fn varstore_round_trips_in_its_own_section() {
    let (m, prov) = sample();
    let json = br#"{"version": 2, "variables": []}"#.to_vec();
    let state = MachineState::with_vars(m.tpm, VarsKind::Varstore, Some(json.clone()));
    let text = encode(&state, &prov, Style::Standalone, Protection::Plain).unwrap();
    assert!(
        text.contains("<vts:varstore>") && !text.contains("<vts:nvram>"),
        "{text}"
    );
    let back = read_back(&text).unwrap();
    assert_eq!(back.state, state);
    assert_eq!(back.state.vars_kind(), Some(VarsKind::Varstore));
    // The same bytes as a VARS file are another state.
    let as_nvram = MachineState::new(state.tpm.clone(), Some(json));
    assert_ne!(as_nvram.digest(), state.digest());
    let key = SecretKey::from_bytes([9; 32]);
    let sealed = sealed(&state, &prov, &key);
    let keys = Keyring::new(vec![key.clone()]);
    let back = decode(&in_domain(&sealed), DecodeLimits::default(), &keys).unwrap();
    assert_eq!(back.state, state);
    let t = text.replace("name=\"varstore.json\"", "name=\"VARS.fd\"");
    assert!(matches!(
        refused(&t),
        FormatError::NvramFileNameNotAllowed {
            section: "varstore",
            ..
        }
    ));
}

#[test]
fn nvram_round_trips_alone_and_with_the_tpm() {
    for tpm in [true, false] {
        let (state, prov) = with_nvram(tpm);
        let text = encode(&state, &prov, Style::Standalone, Protection::Plain).unwrap();
        assert!(text.len() < 8000, "{} bytes", text.len());
        let back = read_back(&text).unwrap();
        assert_eq!(back.state, state);
        assert_eq!(back.digest, state.digest());
        // Sealed: the AD path is nvram/VARS.fd.
        let key = SecretKey::from_bytes([9; 32]);
        let id = key.id();
        let text = sealed(&state, &prov, &key);
        let keys = Keyring::new(vec![key.clone()]);
        let back = decode(&in_domain(&text), DecodeLimits::default(), &keys).unwrap();
        assert_eq!(back.state, state);
        assert_eq!(back.sealed_with, vec![id]);
    }
}

#[test]
fn sealed_for_recipients_round_trips_rewraps_and_binds() {
    use crate::recipients::{generate_identity, parse_identities, Recipient};
    use age::secrecy::ExposeSecret as _;
    let make = || {
        let (text, r) = generate_identity("t");
        let id = parse_identities(text.expose_secret(), "t").unwrap();
        (id, Recipient::parse(&r).unwrap())
    };
    let ((a, ra), (b, rb)) = (make(), make());
    let (state, prov) = with_nvram(true);
    let set = RecipientSet::new(vec![ra.clone()], "t".into());
    let text = encode(
        &state,
        &prov,
        Style::Standalone,
        Protection::Recipients { set: &set },
    )
    .unwrap();
    assert!(text.contains(&format!("recipients=\"{}\"", ra.fingerprint)));
    let mut ka = Keyring::default();
    ka.add_identities(a);
    let back = decode(&in_domain(&text), DecodeLimits::default(), &ka).unwrap();
    assert_eq!(back.state, state);
    assert_eq!(back.sealed_for, vec![ra.fingerprint.clone()]);
    assert_eq!(back.age_files.len(), 2);
    // Not a recipient: one message naming the recipients and the command.
    let mut kb = Keyring::default();
    kb.add_identities(b);
    let e = decode(&in_domain(&text), DecodeLimits::default(), &kb).unwrap_err();
    assert!(e.is_key_problem());
    let msg = e.to_string();
    assert!(
        msg.contains(ra.fingerprint.as_str()) && msg.contains("virt-tpm-state host-id"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    let none = read_back(&text).unwrap_err();
    assert!(none.to_string().contains("host-id init"), "{none}");
    // Re-wrapped for b: same payloads, b opens it, a no longer does.
    let to_b = RecipientSet::new(vec![rb.clone()], "t".into());
    let re = encode(
        &back.state,
        &back.provenance,
        Style::Standalone,
        Protection::Rewrap {
            from: &back.age_files,
            identities: ka.identities(),
            set: &to_b,
        },
    )
    .unwrap();
    let again = decode(&in_domain(&re), DecodeLimits::default(), &kb).unwrap();
    assert_eq!(again.state, state);
    for ((_, old), (_, new)) in back.age_files.iter().zip(&again.age_files) {
        assert_eq!(
            crate::recipients::payload_of(old),
            crate::recipients::payload_of(new)
        );
    }
    assert!(decode(&in_domain(&re), DecodeLimits::default(), &ka).is_err());
    // Pasted into another domain (the uuid attribute follows it): refused.
    let other = "00000000-0000-4000-8000-000000000001";
    let pasted = text.replace(prov.uuid.as_str(), other);
    assert!(matches!(
        decode(&in_domain(&pasted), DecodeLimits::default(), &ka),
        Err(FormatError::BindingMismatch { .. })
    ));
}

#[test]
fn nvram_refusals() {
    let (state, prov) = with_nvram(true);
    let text = encode(&state, &prov, Style::Standalone, Protection::Plain).unwrap();
    let t = text.replace("name=\"VARS.fd\"", "name=\"../VARS.fd\"");
    assert!(matches!(
        refused(&t),
        FormatError::NvramFileNameNotAllowed { .. }
    ));
    let start = text.find("  <vts:nvram>").unwrap();
    let end = text.find("</vts:nvram>\n").unwrap() + "</vts:nvram>\n".len();
    let dup = format!("{}{}{}", &text[..end], &text[start..end], &text[end..]);
    assert_eq!(refused(&dup), FormatError::DuplicateNvramSection);
    let t = text.replace("<vts:nvram>", "<vts:nvram><vts:x/>");
    assert!(matches!(refused(&t), FormatError::UnexpectedElement(..)));
    // A TPM file name in the nvram section is refused by name.
    let t = text.replace("name=\"VARS.fd\"", "name=\"tpm2-00.permall\"");
    assert_eq!(
        refused(&t),
        FormatError::NvramFileNameNotAllowed {
            name: "tpm2-00.permall".into(),
            section: "nvram",
            allowed: "VARS.fd"
        }
    );
    // Both kinds of variable store in one element: a domain has one.
    let vs = text
        .replace("<vts:nvram>", "<vts:varstore>")
        .replace("</vts:nvram>", "</vts:varstore>");
    let both = format!(
        "{}{}{}",
        &text[..end],
        &vs[start..vs.find("</vts:varstore>\n").unwrap() + "</vts:varstore>\n".len()],
        &text[end..]
    );
    assert_eq!(refused(&both), FormatError::DuplicateNvramSection);
    let e = decode(
        &in_domain(&text),
        DecodeLimits {
            max_file_size: 100_000,
        },
        &Keyring::default(),
    )
    .unwrap_err();
    assert!(matches!(e, FormatError::DeclaredTooLarge { .. }), "{e:?}");
    let none = "<vts:state xmlns:vts=\"urn:virt-tpm-state:1\" format=\"1\" uuid=\"6b3c2a4e-1d2f-4a5b-8c7d-9e0f1a2b3c4d\" generation=\"1\" digest=\"0000000000000000000000000000000000000000000000000000000000000000\"/>";
    assert_eq!(refused(none), FormatError::NoSection);
}

#[test]
fn informational_attributes_survive_any_xml_parser() {
    // Regression: `stored` and `host` were escaped for markup only; a
    // literal tab or newline in an attribute is normalized to a space by
    // libxml2, and a control character made the element unparsable.
    let (tpm, mut prov) = sample();
    prov.host = "a\tb\nc\r\nd \"'<>&".into();
    prov.stored = "x\u{1}y\u{FFFE}".into();
    let text = encode(&tpm, &prov, Style::Standalone, Protection::Plain).unwrap();
    assert!(text.contains("host=\"a&#9;b&#10;c&#13;&#10;d &quot;&apos;&lt;&gt;&amp;\""));
    let back = read_back(&text).unwrap();
    assert_eq!(back.provenance.host, prov.host);
    assert_eq!(back.provenance.stored, "x\u{FFFD}y\u{FFFD}");
}

#[test]
fn refusals_quote_hostile_values_short_and_on_one_line() {
    // Regression (found by fuzzing): a refused `encoding`, `format`,
    // `version` or name was quoted whole, newlines (`&#10;`) included.
    let long = format!("x&#10;y{}", "z".repeat(10_000));
    for t in [
        sample_text().replace("gzip+base64\">", &format!("{long}\">")),
        sample_text().replace("format=\"1\"", &format!("format=\"{long}\"")),
        sample_text().replace("version=\"2.0\"", &format!("version=\"{long}\"")),
        sample_text().replace("name=\"tpm2-00.permall\"", &format!("name=\"{long}\"")),
    ] {
        let msg = refused(&t).to_string();
        assert!(!msg.contains('\n') && msg.len() < 400, "{msg}");
        assert!(msg.contains("x\\") && msg.contains('…'), "{msg}");
    }
}

#[test]
fn errors_never_contain_content() {
    let t = sample_text().replace("gzip+base64\">", "gzip+base64\">!!");
    let msg = refused(&t).to_string();
    assert!(!msg.contains("H4sI"), "{msg}");
}
