//! Rewrites `fixtures/vectors/` from scratch, deterministically:
//! `cargo run -p tools --bin make-vectors` (add `--release` for speed; the
//! decompression-bomb vector compresses 64 MiB).
//!
//! Each vector is a domain XML whose first line is a comment stating the
//! result a format-1 reader must give (see `fixtures/vectors/README.md`).
//! The payload is a real `tpm2-00.permall` / `tpm-00.permall` when one is
//! found under `fixtures/` (`fixtures/swtpm/...`), else a fixed synthetic
//! swtpm blob of the same size as a fresh one.
//!
//! Encrypted vectors use the fixed TEST keys it also writes to
//! `fixtures/vectors/keys/` (derived from public strings: never use them for
//! anything else) and a deterministic stand-in for the random generator, so
//! their text is as reproducible as the rest.

use age::secrecy::ExposeSecret as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use tools::stream::vector_stream;
use virt_tpm_state::envelope::SecretKey;
use virt_tpm_state::format::{
    digest_of_sums, encode, gzip_deterministic, Protection, Provenance, Style, NAMESPACE_URI,
};
use virt_tpm_state::recipients::{generate_identity, parse_identities, Recipient, RecipientSet};
use virt_tpm_state::state::{
    DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion, VarsKind,
};
use virt_tpm_state::swtpm::{check_header, synthetic_blob};

const UUID: &str = "1b4e28ba-2fa1-41d2-883f-0016d3cca427";
const OTHER_UUID: &str = "9d6a0c21-7f3e-4b5a-a1c2-3d4e5f607182";

/// A real permall from fixtures/, if the e2e helper captured one.
fn find_real(dir: &Path, name: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if p.starts_with(dir.join("vectors")) {
            continue;
        }
        let ft = e.file_type().ok()?;
        if ft.is_dir() {
            if let Some(found) = find_real(&p, name) {
                return Some(found);
            }
        } else if ft.is_file() && e.file_name() == name {
            return Some(p);
        }
    }
    None
}

fn payload(fixtures: &Path, version: TpmVersion) -> (Vec<u8>, String) {
    let name = version.permall_name();
    if let Some(p) = find_real(fixtures, name) {
        let data = std::fs::read(&p).expect("read real permall");
        if check_header(&data).is_ok() {
            return (data, format!("real, from {}", p.display()));
        }
    }
    // Sizes of fresh states seen with swtpm 0.7.1 (tests/e2e/FINDINGS.md).
    let len = match version {
        TpmVersion::V2_0 => 6234,
        TpmVersion::V1_2 => 3700,
    };
    let seed = format!("virt-tpm-state test vector {name}");
    (
        synthetic_blob(0, &vector_stream(&seed, len - 10)),
        "synthetic".into(),
    )
}

fn provenance(uuid: &str) -> Provenance {
    Provenance {
        uuid: DomainUuid::parse(uuid).unwrap(),
        generation: 3,
        parent: Some(Sha256Sum::of(b"virt-tpm-state test vector parent")),
        stored: "2026-01-01T00:00:00Z".into(),
        host: "vector-host".into(),
    }
}

fn state(version: TpmVersion, data: Vec<u8>) -> MachineState {
    MachineState::from(TpmState::new(
        version,
        vec![StateFile {
            name: version.permall_name().into(),
            data,
        }],
    ))
}

/// A synthetic OVMF-like variable store of the 4 MiB build's size (540672
/// bytes): deterministic pseudo-random variable data, then erased flash
/// (0xff), which is what makes real stores compress to a few KiB.
fn vars_payload() -> Vec<u8> {
    let mut v = vector_stream("virt-tpm-state TEST vector nvram", 6000);
    v.resize(540672, 0xff);
    v
}

/// Wraps an element in a minimal domain XML, after the expectation comment.
fn domain(expect: &str, version: TpmVersion, element: &str) -> String {
    domain_with_uuid(expect, version, element, UUID)
}

/// [`domain`] for a domain whose `<uuid>` is `uuid`.
fn domain_with_uuid(expect: &str, version: TpmVersion, element: &str, uuid: &str) -> String {
    let model = match version {
        TpmVersion::V2_0 => "tpm-crb",
        TpmVersion::V1_2 => "tpm-tis",
    };
    let element: String = element
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect::<String>();
    format!(
        "<!-- expect: {expect} -->\n<domain type='kvm'>\n  <name>vector</name>\n  <uuid>{uuid}</uuid>\n  <metadata>\n{element}  </metadata>\n  <devices>\n    <tpm model='{model}'>\n      <backend type='emulator' version='{version}'/>\n    </tpm>\n  </devices>\n</domain>\n"
    )
}

fn ok_expect(s: &MachineState, p: &Provenance) -> String {
    let mut sections = s.sections();
    sections.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let files: Vec<String> = sections
        .iter()
        .map(|(_, f)| format!("{}:{}:{}", f.name, f.data.len(), f.sha256()))
        .collect();
    format!(
        "ok digest={} generation={} uuid={} version={} files={}",
        s.digest(),
        p.generation,
        p.uuid,
        s.tpm
            .as_ref()
            .map_or("none".to_string(), |t| t.version.to_string()),
        files.join(",")
    )
}

/// [`ok_expect`] for a state sealed with `key`: adds `key=ID`.
fn ok_sealed_expect(s: &MachineState, p: &Provenance, key: &SecretKey) -> String {
    format!("{} key={}", ok_expect(s, p), key.id())
}

/// The text (base64) of the (first) file element.
fn b64_of(element: &str) -> &str {
    let file = element.find("<vts:file ").unwrap();
    let start = element[file..].find('>').unwrap() + file + 1;
    let end = element[start..].find('<').unwrap() + start;
    &element[start..end]
}

/// The value of attribute `name` in the (first) file element.
fn file_attr<'a>(element: &'a str, name: &str) -> &'a str {
    let file = element.find("<vts:file ").unwrap();
    let needle = format!(" {name}=\"");
    let start = element[file..].find(&needle).unwrap() + file + needle.len();
    let end = element[start..].find('"').unwrap() + start;
    &element[start..end]
}

/// Base64 `b64` with byte `at` of its decoded bytes flipped.
fn flip_b64(b64: &str, at: usize) -> String {
    let mut raw = STANDARD.decode(b64).unwrap();
    raw[at] ^= 0x01;
    STANDARD.encode(raw)
}

/// The committed TEST host keys, `fixtures/vectors/keys/<stamp>-<id>.key`:
/// 32 bytes of SHA-256 of a public label. Test vectors only, never a host.
fn test_key(label: &str) -> SecretKey {
    let h = Sha256::digest(format!("virt-tpm-state TEST vector key {label}").as_bytes());
    SecretKey::from_bytes(h.into())
}

/// A deterministic stand-in for the OS random generator: consecutive bytes
/// of [`vector_stream`] for `seed` (one seed per vector, so vectors do not depend
/// on the order they are generated in).
fn counter_fill(seed: &str) -> impl FnMut(&mut [u8]) {
    let seed = format!("virt-tpm-state TEST vector randomness {seed}");
    let mut used = 0usize;
    move |buf: &mut [u8]| {
        let bytes = vector_stream(&seed, used + buf.len());
        buf.copy_from_slice(&bytes[used..]);
        used += buf.len();
    }
}

/// `encode` sealed with `key` (`gzip+chacha20poly1305+base64`), its data
/// keys and nonces drawn from [`counter_fill`]`(seed)`.
fn sealed(s: &MachineState, p: &Provenance, key: &SecretKey, seed: &str) -> String {
    let key_id = key.id();
    let mut fill = counter_fill(seed);
    encode(
        s,
        p,
        Style::Standalone,
        Protection::Sealed {
            key_id: &key_id,
            key,
            fill: &mut fill,
        },
    )
    .unwrap()
}

/// Writes the test keys as `fs::create_key` would: `<stamp>-<id>.key`,
/// one line of standard base64, mode 0600; removes other `*.key` files.
fn write_keys(dir: &Path, keys: &[(&str, &SecretKey)]) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "key") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    for (stamp, key) in keys {
        let path = dir.join(format!("{stamp}-{}.key", key.id()));
        std::fs::write(&path, format!("{}\n", STANDARD.encode(key.expose()))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

fn replace_once(s: &str, from: &str, to: &str) -> String {
    assert!(s.contains(from), "{from:?} not in element");
    s.replacen(from, to, 1)
}

/// The byte range of the first `<vts:TAG…>…</vts:TAG>` child of `el`, from
/// the indentation `opening` starts with through the closing tag's newline.
fn child_span(el: &str, opening: &str, tag: &str) -> std::ops::Range<usize> {
    let start = el.find(opening).unwrap();
    let close = format!("</vts:{tag}>\n");
    let end = el.find(&close).unwrap() + close.len();
    start..end
}

/// `el` with that child written twice in a row.
fn with_child_twice(el: &str, opening: &str, tag: &str) -> String {
    let span = child_span(el, opening, tag);
    format!(
        "{}{}{}",
        &el[..span.end],
        &el[span.clone()],
        &el[span.end..]
    )
}

/// A single-file element with arbitrary (possibly inconsistent) parts.
#[allow(clippy::too_many_arguments)]
fn raw_element(
    version: TpmVersion,
    name: &str,
    size: usize,
    sha: &str,
    digest: &str,
    b64: &str,
) -> String {
    format!(
        "<vts:state xmlns:vts=\"{NAMESPACE_URI}\" format=\"1\" uuid=\"{UUID}\" generation=\"3\" digest=\"{digest}\" parent=\"\" stored=\"2026-01-01T00:00:00Z\" host=\"vector-host\">\n  <vts:tpm version=\"{version}\">\n    <vts:file name=\"{name}\" size=\"{size}\" sha256=\"{sha}\" encoding=\"gzip+base64\">{b64}</vts:file>\n  </vts:tpm>\n</vts:state>"
    )
}

fn main() {
    // The repository's root: this crate is tools/.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tools/ is inside the repository");
    let fixtures = root.join("fixtures");
    let out_dir = fixtures.join("vectors");
    std::fs::create_dir_all(&out_dir).unwrap();
    // age draws its own randomness (file keys, ephemeral shares): its
    // vectors are made once and kept, so a rerun still changes nothing.
    let kept_age: std::collections::BTreeMap<String, String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".xml")?.to_string();
            stem.contains("-age")
                .then(|| (stem, std::fs::read_to_string(e.path()).unwrap()))
        })
        .collect();
    for e in std::fs::read_dir(&out_dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "xml") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }

    let (data2, origin2) = payload(&fixtures, TpmVersion::V2_0);
    let (data12, origin12) = payload(&fixtures, TpmVersion::V1_2);
    eprintln!("TPM 2.0 payload: {} bytes, {origin2}", data2.len());
    eprintln!("TPM 1.2 payload: {} bytes, {origin12}", data12.len());
    let s2 = state(TpmVersion::V2_0, data2.clone());
    let s12 = state(TpmVersion::V1_2, data12);
    let prov = provenance(UUID);
    let el2 = encode(&s2, &prov, Style::Standalone, Protection::Plain).unwrap();
    let el12 = encode(&s12, &prov, Style::Standalone, Protection::Plain).unwrap();
    let ok2 = ok_expect(&s2, &prov);
    let ok12 = ok_expect(&s12, &prov);
    let v2 = TpmVersion::V2_0;
    let b64 = b64_of(&el2).to_string();
    let sha2 = s2.sections()[0].1.sha256().hex();
    let digest2 = s2.digest().hex();

    let mut vectors: Vec<(&str, String)> = Vec::new();
    let mut add = |name: &'static str, text: String| vectors.push((name, text));

    // ------------------------------------------------------------ valid
    add("ok-tpm2", domain(&ok2, v2, &el2));
    add("ok-tpm12", domain(&ok12, TpmVersion::V1_2, &el12));
    {
        let wrapped: String = b64
            .as_bytes()
            .chunks(76)
            .map(|c| format!("\n        {}", std::str::from_utf8(c).unwrap()))
            .collect();
        let e = replace_once(&el2, &b64, &format!("{wrapped}\r\n\t      "));
        add("ok-base64-whitespace", domain(&ok2, v2, &e));
    }
    {
        let e = el2.replace("vts:", "tpmstate:").replace(
            &format!("xmlns:vts=\"{NAMESPACE_URI}\""),
            &format!("xmlns:tpmstate=\"{NAMESPACE_URI}\""),
        );
        add("ok-other-prefix", domain(&ok2, v2, &e));
    }
    {
        let e = el2.replace("vts:", "").replace(
            &format!("xmlns:vts=\"{NAMESPACE_URI}\""),
            &format!("xmlns=\"{NAMESPACE_URI}\""),
        );
        add("ok-default-namespace", domain(&ok2, v2, &e));
    }
    {
        // What virDomainSetMetadata may produce: only the root in the
        // namespace (prefixed), children unprefixed.
        let e = encode(&s2, &prov, Style::ForSetMetadata, Protection::Plain)
            .unwrap()
            .replacen(
                "<state ",
                &format!("<vts:state xmlns:vts=\"{NAMESPACE_URI}\" "),
                1,
            )
            .replace("</state>", "</vts:state>");
        add("ok-unprefixed-children", domain(&ok2, v2, &e));
    }
    {
        // As libvirt 9.0 prints it: inside a captured running domain XML
        // (single quotes elsewhere, double quotes in metadata, re-indented),
        // next to a foreign metadata element.
        let captured = std::fs::read_to_string(fixtures.join("domains/tpm2-crb.xml"))
            .unwrap_or_else(|_| {
                format!(
                    "<domain type='kvm' id='1'>\n  <name>tpm2-crb</name>\n  <uuid>{UUID}</uuid>\n  <devices>\n    <tpm model='tpm-crb'>\n      <backend type='emulator' version='2.0'/>\n    </tpm>\n  </devices>\n</domain>\n"
                )
            });
        let uuid_start = captured.find("<uuid>").unwrap() + "<uuid>".len();
        let uuid_end = captured.find("</uuid>").unwrap();
        let domain_uuid = captured[uuid_start..uuid_end].trim().to_string();
        let p = provenance(&domain_uuid);
        let e = encode(&s2, &p, Style::Standalone, Protection::Plain).unwrap();
        let indented: String = e.lines().map(|l| format!("    {l}\n")).collect();
        let meta = format!(
            "  <metadata>\n    <app:foo xmlns:app=\"http://example.org/app\">x</app:foo>\n{indented}  </metadata>\n"
        );
        let at = captured.find("  <memory").unwrap();
        let xml = format!(
            "<!-- expect: {} -->\n{}{meta}{}",
            ok_expect(&s2, &p),
            &captured[..at],
            &captured[at..]
        );
        add("ok-as-libvirt-prints", xml);
    }
    {
        // A `vts` prefix bound to another URI is not our element.
        let e = el2.replace(NAMESPACE_URI, "urn:not-virt-tpm-state");
        add("none-vts-prefix-other-uri", domain("none", v2, &e));
    }

    // ------------------------------------------------------------ refused
    add(
        "refused-unknown-format",
        domain(
            "refused UnknownFormat",
            v2,
            &replace_once(&el2, "format=\"1\"", "format=\"2\""),
        ),
    );
    add(
        "refused-unknown-encoding",
        domain(
            "refused UnknownEncoding",
            v2,
            &replace_once(&el2, "gzip+base64", "zstd+base64"),
        ),
    );
    {
        let mut bad = b64.clone();
        bad.insert(bad.len() / 2, '!');
        add(
            "refused-bad-base64",
            domain("refused BadBase64", v2, &replace_once(&el2, &b64, &bad)),
        );
        let gz = gzip_deterministic(&data2);
        let url = URL_SAFE.encode(&gz);
        if url != b64 {
            add(
                "refused-base64-url-alphabet",
                domain("refused BadBase64", v2, &replace_once(&el2, &b64, &url)),
            );
        }
        let unpadded = b64.trim_end_matches('=');
        if unpadded.len() != b64.len() {
            add(
                "refused-base64-missing-padding",
                domain("refused BadBase64", v2, &replace_once(&el2, &b64, unpadded)),
            );
        }
    }
    let size_attr = format!("size=\"{}\"", data2.len());
    add(
        "refused-wrong-size",
        domain(
            "refused SizeMismatch",
            v2,
            &replace_once(&el2, &size_attr, &format!("size=\"{}\"", data2.len() + 1)),
        ),
    );
    add(
        "refused-declared-too-large",
        domain(
            "refused DeclaredTooLarge",
            v2,
            &replace_once(&el2, &size_attr, "size=\"1048577\""),
        ),
    );
    let other_sha = Sha256Sum::of(b"not the file").hex();
    add(
        "refused-wrong-sha256",
        domain(
            "refused Sha256Mismatch",
            v2,
            &replace_once(
                &el2,
                &format!("sha256=\"{sha2}\""),
                &format!("sha256=\"{other_sha}\""),
            ),
        ),
    );
    add(
        "refused-wrong-digest",
        domain(
            "refused DigestMismatch",
            v2,
            &replace_once(
                &el2,
                &format!("digest=\"{digest2}\""),
                &format!("digest=\"{other_sha}\""),
            ),
        ),
    );
    add(
        "refused-digest-uppercase-hex",
        domain(
            "refused BadAttribute",
            v2,
            &replace_once(
                &el2,
                &format!("digest=\"{digest2}\""),
                &format!("digest=\"{}\"", digest2.to_uppercase()),
            ),
        ),
    );
    {
        // Consistent size/sha256/digest, but the bytes are no swtpm blob.
        let mut junk = data2.clone();
        junk[6..10].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        let s = state(v2, junk);
        add(
            "refused-not-swtpm-blob",
            domain(
                "refused BadSwtpmHeader",
                v2,
                &encode(&s, &prov, Style::Standalone, Protection::Plain).unwrap(),
            ),
        );
    }
    {
        // The EK certificates swtpm_setup --write-ek-cert-files leaves in
        // the state dir: real ones (fixtures/ek-certs, from swtpm 0.7.1's
        // swtpm_setup with a throwaway local CA) beside the permall.
        let mut files = s2.tpm.as_ref().unwrap().files().to_vec();
        for name in ["ek-rsa2048.crt", "ek-secp384r1.crt"] {
            files.push(StateFile {
                name: name.into(),
                data: std::fs::read(fixtures.join("ek-certs").join(name)).expect("read EK cert"),
            });
        }
        let ek = MachineState::from(TpmState::new(v2, files));
        let el = encode(&ek, &prov, Style::Standalone, Protection::Plain).unwrap();
        add("ok-tpm2-ek-certs", domain(&ok_expect(&ek, &prov), v2, &el));
        // A certificate cut short: its DER length no longer covers it.
        let mut files = ek.tpm.as_ref().unwrap().files().to_vec();
        let cert = files
            .iter_mut()
            .find(|f| f.name == "ek-rsa2048.crt")
            .unwrap();
        cert.data.pop();
        let torn = MachineState::from(TpmState::new(v2, files));
        add(
            "refused-ek-cert-not-der",
            domain(
                "refused BadSwtpmHeader",
                v2,
                &encode(&torn, &prov, Style::Standalone, Protection::Plain).unwrap(),
            ),
        );
    }
    for (vname, bad_name) in [
        ("refused-name-traversal", "../../etc/shadow"),
        ("refused-name-volatilestate", "tpm2-00.volatilestate"),
        ("refused-name-other-version", "tpm-00.permall"),
        // swtpm's backup of the previous permall (`--tpmstate ...,backup`)
        // is never carried: restoring it beside another permall would let
        // swtpm fall back to a state from another generation.
        ("refused-name-permall-bak", "tpm2-00.permall.bak"),
    ] {
        let e = replace_once(
            &el2,
            "name=\"tpm2-00.permall\"",
            &format!("name=\"{bad_name}\""),
        );
        add(vname, domain("refused FileNameNotAllowed", v2, &e));
    }
    {
        let e = with_child_twice(&el2, "    <vts:file", "file");
        add(
            "refused-duplicate-file",
            domain("refused DuplicateFile", v2, &e),
        );
    }
    {
        // 64 MiB of zeros, gzip'ed (~64 KiB), claiming size 100.
        let zeros = vec![0u8; 64 * 1024 * 1024];
        let sha = Sha256Sum::of(&zeros);
        let digest = digest_of_sums(&[("tpm2-00.permall".into(), sha)]);
        let e = raw_element(
            v2,
            "tpm2-00.permall",
            100,
            &sha.hex(),
            &digest.hex(),
            &STANDARD.encode(gzip_deterministic(&zeros)),
        );
        add(
            "refused-decompression-bomb",
            domain("refused DecompressedTooLarge", v2, &e),
        );
    }
    {
        let gz = gzip_deterministic(&data2);
        let truncated = STANDARD.encode(&gz[..gz.len() / 2]);
        add(
            "refused-truncated-gzip",
            domain("refused BadGzip", v2, &replace_once(&el2, &b64, &truncated)),
        );
        let mut trailing = gz.clone();
        trailing.extend_from_slice(b"trailing bytes");
        add(
            "refused-gzip-trailing-data",
            domain(
                "refused BadGzip",
                v2,
                &replace_once(&el2, &b64, &STANDARD.encode(&trailing)),
            ),
        );
        let mut two = gz.clone();
        two.extend_from_slice(&gz);
        add(
            "refused-gzip-two-members",
            domain(
                "refused BadGzip",
                v2,
                &replace_once(&el2, &b64, &STANDARD.encode(&two)),
            ),
        );
        let mut bad_crc = gz.clone();
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 0xff;
        add(
            "refused-gzip-bad-crc",
            domain(
                "refused BadGzip",
                v2,
                &replace_once(&el2, &b64, &STANDARD.encode(&bad_crc)),
            ),
        );
    }
    {
        // An element inside <file>, splitting the base64 text in two.
        let (a, b) = b64.split_at(b64.len() / 2);
        let e = replace_once(&el2, &b64, &format!("{a}<vts:extra/>{b}"));
        add(
            "refused-element-inside-file",
            domain("refused UnexpectedElement", v2, &e),
        );
    }
    add(
        "refused-unknown-section",
        domain(
            "refused UnknownSection",
            v2,
            &replace_once(
                &el2,
                "</vts:tpm>\n",
                "</vts:tpm>\n  <vts:cmos version=\"1\"/>\n",
            ),
        ),
    );
    add(
        "refused-nvram-no-file",
        domain(
            "refused NoFiles",
            v2,
            &replace_once(
                &el2,
                "</vts:tpm>\n",
                "</vts:tpm>\n  <vts:nvram version=\"1\"/>\n",
            ),
        ),
    );

    // ------------------------------------------------------------- nvram
    let vars = vars_payload();
    let s2n = MachineState::new(s2.tpm.clone(), Some(vars.clone()));
    let sn = MachineState::new(None, Some(vars.clone()));
    let el2n = encode(&s2n, &prov, Style::Standalone, Protection::Plain).unwrap();
    add("ok-tpm2-nvram", domain(&ok_expect(&s2n, &prov), v2, &el2n));
    add(
        "ok-nvram-only",
        domain(
            &ok_expect(&sn, &prov),
            v2,
            &encode(&sn, &prov, Style::Standalone, Protection::Plain).unwrap(),
        ),
    );
    add(
        "refused-nvram-name-other",
        domain(
            "refused NvramFileNameNotAllowed",
            v2,
            &replace_once(&el2n, "name=\"VARS.fd\"", "name=\"OVMF_VARS.fd\""),
        ),
    );
    {
        let e = with_child_twice(&el2n, "  <vts:nvram>", "nvram");
        add(
            "refused-two-nvram-sections",
            domain("refused DuplicateNvramSection", v2, &e),
        );
    }
    // ---------------------------------------------------------- varstore
    {
        // QEMU's uefi-vars JSON as libvirt 12.8 + QEMU 11.1 leave it after
        // a first start, plus one variable set by the guest.
        let json = br#"{
    "version": 2,
    "variables": [
        {
            "name": "CustomMode",
            "guid": "c076ec0c-7028-4399-a072-71ee5c448b9f",
            "attr": 3,
            "data": "00"
        },
        {
            "name": "VendorKeysNv",
            "guid": "8be4df61-93ca-11d2-aa0d-00e098032b8c",
            "attr": 35,
            "time": "00000000000000000000000000000000",
            "data": "00"
        },
        {
            "name": "VtsVarstoreTest",
            "guid": "605dab50-e046-4300-abb6-3dd810dd8b23",
            "attr": 7,
            "data": "766972742d74706d2d7374617465"
        }
    ]
}
"#;
        let sv = MachineState::with_vars(s2.tpm.clone(), VarsKind::Varstore, Some(json.to_vec()));
        let el = encode(&sv, &prov, Style::Standalone, Protection::Plain).unwrap();
        add("ok-tpm2-varstore", domain(&ok_expect(&sv, &prov), v2, &el));
        add(
            "refused-varstore-name-other",
            domain(
                "refused NvramFileNameNotAllowed",
                v2,
                &replace_once(&el, "name=\"varstore.json\"", "name=\"VARS.fd\""),
            ),
        );
        // A domain has a <nvram> or a <varstore>, never both.
        let e = format!(
            "{}{}{}",
            &el2n[..el2n.find("</vts:state>").unwrap()],
            &el[child_span(&el, "  <vts:varstore>", "varstore")],
            "</vts:state>\n"
        );
        add(
            "refused-nvram-and-varstore",
            domain("refused DuplicateNvramSection", v2, &e),
        );
    }
    {
        // The VARS file moved into the <tpm> section: refused by name there.
        let e = replace_once(&el2n, "</vts:tpm>\n  <vts:nvram>\n", "");
        let e = replace_once(&e, "</vts:nvram>", "</vts:tpm>");
        add(
            "refused-nvram-file-in-tpm-section",
            domain("refused FileNameNotAllowed", v2, &e),
        );
    }
    {
        let e = with_child_twice(&el2, "  <vts:tpm ", "tpm");
        add(
            "refused-two-tpm-sections",
            domain("refused DuplicateTpmSection", v2, &e),
        );
    }
    add(
        "refused-tpm-version-3.0",
        domain(
            "refused BadTpmVersion",
            v2,
            &replace_once(&el2, "version=\"2.0\"", "version=\"3.0\""),
        ),
    );
    {
        let mut ents = String::from("  <!ENTITY lol0 \"lol\">\n");
        for i in 1..10 {
            let prev = format!("&lol{};", i - 1);
            ents.push_str(&format!("  <!ENTITY lol{i} \"{}\">\n", prev.repeat(10)));
        }
        let body = domain("refused Doctype", v2, &el2);
        let (comment, rest) = body.split_once('\n').unwrap();
        let rest = rest.replacen("<name>vector</name>", "<name>&lol9;</name>", 1);
        add(
            "refused-doctype-billion-laughs",
            format!("{comment}\n<!DOCTYPE domain [\n{ents}]>\n{rest}"),
        );
    }
    {
        let second = el2.replace("xmlns:vts", "xmlns:b").replace("vts:", "b:");
        let e = format!("{el2}\n{second}");
        add(
            "refused-two-elements-our-namespace",
            domain("refused DuplicateMetadata", v2, &e),
        );
    }
    {
        // Valid format, but the state belongs to another domain: a clone.
        let e = encode(
            &s2,
            &provenance(OTHER_UUID),
            Style::Standalone,
            Protection::Plain,
        )
        .unwrap();
        add("refused-clone-other-uuid", domain("refused Clone", v2, &e));
    }

    // ------------------------------------------------------------ encrypted
    // docs/FORMAT.md 2.6. The keyring is fixtures/vectors/keys/: an older and
    // a newer test key; new stores use the newest (last name in sort order).
    let old_key = test_key("old");
    let new_key = test_key("new");
    let absent_key = test_key("absent (not in fixtures/vectors/keys)");
    write_keys(
        &out_dir.join("keys"),
        &[
            ("20250101T000000Z", &old_key),
            ("20260101T000000Z", &new_key),
        ],
    );
    let enc2 = sealed(&s2, &prov, &new_key, "ok-encrypted");
    let s2n = MachineState::new(s2.tpm.clone(), Some(vars_payload()));
    for (name, state, version, key) in [
        ("ok-encrypted-nvram", &s2n, v2, &new_key),
        ("ok-encrypted", &s2, v2, &new_key),
        ("ok-encrypted-tpm12", &s12, TpmVersion::V1_2, &new_key),
        ("ok-encrypted-older-key", &s2, v2, &old_key),
    ] {
        // Deterministic per name: "ok-encrypted" is `enc2` again.
        let element = sealed(state, &prov, key, name);
        add(
            name,
            domain(&ok_sealed_expect(state, &prov, key), version, &element),
        );
    }
    add(
        "refused-encrypted-missing-key",
        domain(
            "refused MissingKey",
            v2,
            &sealed(&s2, &prov, &absent_key, "refused-encrypted-missing-key"),
        ),
    );
    {
        let ct = b64_of(&enc2).to_string();
        let middle = STANDARD.decode(&ct).unwrap().len() / 2;
        add(
            "refused-encrypted-tampered-ciphertext",
            domain(
                "refused Decrypt",
                v2,
                &replace_once(&enc2, &ct, &flip_b64(&ct, middle)),
            ),
        );
        let nonce = file_attr(&enc2, "nonce").to_string();
        add(
            "refused-encrypted-tampered-nonce",
            domain(
                "refused Decrypt",
                v2,
                &replace_once(
                    &enc2,
                    &format!("nonce=\"{nonce}\""),
                    &format!("nonce=\"{}\"", flip_b64(&nonce, 0)),
                ),
            ),
        );
        let wk = file_attr(&enc2, "wrapped-key").to_string();
        // Byte 20: inside the sealed data key (after the 12-byte wrap nonce).
        add(
            "refused-encrypted-tampered-wrapped-key",
            domain(
                "refused Decrypt",
                v2,
                &replace_once(
                    &enc2,
                    &format!("wrapped-key=\"{wk}\""),
                    &format!("wrapped-key=\"{}\"", flip_b64(&wk, 20)),
                ),
            ),
        );
        let mut short = STANDARD.decode(&wk).unwrap();
        short.truncate(short.len() - 1);
        add(
            "refused-encrypted-wrapped-key-truncated",
            domain(
                "refused Decrypt",
                v2,
                &replace_once(
                    &enc2,
                    &format!("wrapped-key=\"{wk}\""),
                    &format!("wrapped-key=\"{}\"", STANDARD.encode(short)),
                ),
            ),
        );
        // 24 bytes (an XChaCha20 nonce) where the IETF construction takes 12.
        let mut long = STANDARD.decode(&nonce).unwrap();
        long.extend_from_slice(&vector_stream("nonce extension", 12));
        add(
            "refused-encrypted-bad-nonce-length",
            domain(
                "refused BadAttribute",
                v2,
                &replace_once(
                    &enc2,
                    &format!("nonce=\"{nonce}\""),
                    &format!("nonce=\"{}\"", STANDARD.encode(long)),
                ),
            ),
        );
        add(
            "refused-encrypted-missing-nonce",
            domain(
                "refused MissingAttribute",
                v2,
                &replace_once(&enc2, &format!(" nonce=\"{nonce}\""), ""),
            ),
        );
        let id = new_key.id().to_string();
        add(
            "refused-encrypted-key-id-uppercase",
            domain(
                "refused BadAttribute",
                v2,
                &replace_once(
                    &enc2,
                    &format!("key=\"{id}\""),
                    &format!("key=\"{}\"", id.to_uppercase()),
                ),
            ),
        );
        // The id of another key the reader has: opens with neither.
        add(
            "refused-encrypted-other-key-id",
            domain(
                "refused Decrypt",
                v2,
                &replace_once(
                    &enc2,
                    &format!("key=\"{id}\""),
                    &format!("key=\"{}\"", old_key.id()),
                ),
            ),
        );
        // Plaintext attributes are still checked after decryption.
        add(
            "refused-encrypted-wrong-sha256",
            domain(
                "refused Sha256Mismatch",
                v2,
                &replace_once(
                    &enc2,
                    &format!("sha256=\"{sha2}\""),
                    &format!("sha256=\"{other_sha}\""),
                ),
            ),
        );
    }
    {
        // Moved to another domain: element uuid and domain uuid agree (no
        // clone), size, sha256 and digest are unchanged (they do not involve
        // the uuid): only the associated data catches it.
        let e = replace_once(
            &enc2,
            &format!("uuid=\"{UUID}\""),
            &format!("uuid=\"{OTHER_UUID}\""),
        );
        add(
            "refused-encrypted-wrong-uuid",
            domain_with_uuid("refused Decrypt", v2, &e, OTHER_UUID),
        );
    }
    {
        // Format 1 allows one file name per TPM version, so no rename stays
        // within the allowed names. The closest: the same bytes sealed for
        // `tpm/tpm-00.permall` (a 1.2 section), relabelled as a consistent
        // 2.0 element (`tpm2-00.permall`, its digest): only the path in the
        // associated data catches it.
        let as12 = state(TpmVersion::V1_2, data2.clone());
        let e = sealed(&as12, &prov, &new_key, "refused-encrypted-renamed");
        let e = replace_once(&e, "version=\"1.2\"", "version=\"2.0\"");
        let e = replace_once(&e, "name=\"tpm-00.permall\"", "name=\"tpm2-00.permall\"");
        let e = replace_once(
            &e,
            &format!("digest=\"{}\"", as12.digest()),
            &format!("digest=\"{digest2}\""),
        );
        add(
            "refused-encrypted-renamed",
            domain("refused Decrypt", v2, &e),
        );
    }

    // ------------------------------------------------------------ age
    // docs/FORMAT.md 2.8: sealed for recipients. The TEST identities are in
    // fixtures/vectors/identities/: `host.txt` (the reader's own), `owner.txt`
    // (an escrow identity: rage opens the vectors with it), `absent.txt`.
    {
        let ids = out_dir.join("identities");
        let recipient = |label: &str| -> Recipient {
            let path = ids.join(format!("{label}.txt"));
            if !path.exists() {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::create_dir_all(&ids).unwrap();
                let (text, _) = generate_identity(&format!(
                    "virt-tpm-state TEST vector identity {label}: never use it for anything else"
                ));
                std::fs::write(&path, text.expose_secret()).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let id = &parse_identities(&text, "vector").unwrap()[0];
            Recipient::parse(id.recipient.as_ref().unwrap()).unwrap()
        };
        let host = recipient("host");
        let owner = recipient("owner");
        let absent = recipient("absent");
        let for_host = RecipientSet::new(vec![host.clone(), owner.clone()], "vectors".into());
        let not_host = RecipientSet::new(vec![owner, absent], "vectors".into());
        let fps = |set: &RecipientSet| {
            set.fingerprints()
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let age = |st: &MachineState, set: &RecipientSet| {
            encode(st, &prov, Style::Standalone, Protection::Recipients { set }).unwrap()
        };
        let mut keep_or = |name: &'static str, make: &dyn Fn() -> String| {
            add(name, kept_age.get(name).cloned().unwrap_or_else(make));
        };
        let s2n = MachineState::new(s2.tpm.clone(), Some(vars_payload()));
        keep_or("ok-age", &|| {
            let expect = format!("{} recipients={}", ok_expect(&s2, &prov), fps(&for_host));
            domain(&expect, v2, &age(&s2, &for_host))
        });
        keep_or("ok-age-nvram", &|| {
            let expect = format!("{} recipients={}", ok_expect(&s2n, &prov), fps(&for_host));
            domain(&expect, v2, &age(&s2n, &for_host))
        });
        keep_or("refused-age-not-a-recipient", &|| {
            domain("refused NotARecipient", v2, &age(&s2, &not_host))
        });
        keep_or("refused-age-wrong-uuid", &|| {
            // Pasted into another domain: the element's uuid (and the
            // domain's) changed; the binding inside the age payload did not.
            let e = replace_once(
                &age(&s2, &for_host),
                &format!("uuid=\"{UUID}\""),
                &format!("uuid=\"{OTHER_UUID}\""),
            );
            domain_with_uuid("refused BindingMismatch", v2, &e, OTHER_UUID)
        });
        keep_or("refused-age-tampered", &|| {
            let e = age(&s2, &for_host);
            let b = b64_of(&e).to_string();
            let last = STANDARD.decode(&b).unwrap().len() - 1;
            domain(
                "refused AgeDecrypt",
                v2,
                &replace_once(&e, &b, &flip_b64(&b, last)),
            )
        });
    }

    // ------------------------------------------------------------ #19
    {
        // The uuid attribute is canonical: no whitespace around it, neither
        // literal nor as a character reference.
        let e = replace_once(
            &el2,
            &format!("uuid=\"{UUID}\""),
            &format!("uuid=\" {UUID} \""),
        );
        add(
            "refused-uuid-padded",
            domain("refused BadAttribute", v2, &e),
        );
        let e = replace_once(
            &el2,
            &format!("uuid=\"{UUID}\""),
            &format!("uuid=\"{UUID}&#10;\""),
        );
        add(
            "refused-uuid-newline-reference",
            domain("refused BadAttribute", v2, &e),
        );
    }
    {
        // Attributes this reader does not know are ignored (a later minor
        // revision may add informational ones); unknown elements are not.
        let e = replace_once(
            &el2,
            " format=\"1\"",
            " format=\"1\" comment=\"added by a manager\"",
        );
        let e = replace_once(&e, "<vts:file ", "<vts:file origin=\"import\" ");
        add("ok-unknown-attributes", domain(&ok2, v2, &e));
    }
    {
        // Base64 whose padding bits are not zero: non-canonical, refused
        // (RFC 4648 §3.5 lets decoders reject it; this format does).
        let raw = STANDARD.decode(&b64).unwrap();
        assert!(raw.len() % 3 != 0, "payload length leaves padding");
        let mut chars: Vec<u8> = b64.trim_end_matches('=').bytes().collect();
        let last = chars.pop().unwrap();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let idx = alphabet.iter().position(|&c| c == last).unwrap();
        chars.push(alphabet[idx | 1]);
        let pad = b64.len() - b64.trim_end_matches('=').len();
        let bad = format!("{}{}", String::from_utf8(chars).unwrap(), "=".repeat(pad));
        assert_ne!(bad, b64);
        let e = replace_once(&el2, &b64, &bad);
        add(
            "refused-base64-nonzero-padding-bits",
            domain("refused BadBase64", v2, &e),
        );
    }
    {
        // A TPM 1.2 state in a domain whose emulated TPM is 2.0: a reader
        // that knows the domain refuses it (restoring it would start a TPM
        // swtpm cannot read).
        let body = domain("refused VersionMismatch", TpmVersion::V1_2, &el12);
        let body = body
            .replace("version='1.2'", "version='2.0'")
            .replace("tpm-tis", "tpm-crb");
        add("refused-tpm-version-mismatch", body);
    }
    {
        // The bare element: what `virDomainGetMetadata` / `virsh metadata`
        // return (no prefix, no namespace), and the namespaced element cut
        // out of a domain. No domain to check the uuid against.
        let bare = encode(&s2, &prov, Style::ForSetMetadata, Protection::Plain).unwrap();
        add(
            "ok-bare-namespace-less",
            format!("<!-- expect: {ok2} -->\n{bare}\n"),
        );
        add(
            "ok-bare-namespaced",
            format!("<!-- expect: {ok2} -->\n{el2}\n"),
        );
    }

    // Writer vectors: given files, uuid, generation, provenance and no key,
    // the exact element (`virt-tpm-state pack --plaintext ...` prints it).
    {
        let wdir = out_dir.join("writer");
        let _ = std::fs::remove_dir_all(&wdir);
        std::fs::create_dir_all(&wdir).unwrap();
        let small_vars: Vec<u8> = vars_payload()[..8192].to_vec();
        let cases: Vec<(&str, MachineState, Provenance)> = vec![
            ("tpm2", s2.clone(), prov.clone()),
            ("tpm12", s12.clone(), provenance(UUID)),
            (
                "tpm2-vars-first",
                MachineState::new(s2.tpm.clone(), Some(small_vars.clone())),
                Provenance {
                    generation: 1,
                    parent: None,
                    ..prov.clone()
                },
            ),
        ];
        for (name, st, p) in cases {
            let d = wdir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            let mut args = format!(
                "--uuid {} --generation {} --stored {} --host {}",
                p.uuid, p.generation, p.stored, p.host
            );
            if let Some(parent) = p.parent {
                args.push_str(&format!(" --parent {parent}"));
            }
            if let Some(t) = &st.tpm {
                for f in t.files() {
                    std::fs::write(d.join(&f.name), &f.data).unwrap();
                    args.push_str(&format!(" --permall {}", f.name));
                }
            }
            if let Some(v) = &st.nvram {
                std::fs::write(d.join("VARS.fd"), &v.data).unwrap();
                args.push_str(" --vars VARS.fd");
            }
            args.push_str(" --plaintext\n");
            std::fs::write(d.join("args"), args).unwrap();
            std::fs::write(
                d.join("element.xml"),
                format!(
                    "{}\n",
                    encode(&st, &p, Style::Standalone, Protection::Plain).unwrap()
                ),
            )
            .unwrap();
        }
    }

    for (name, text) in &vectors {
        std::fs::write(out_dir.join(format!("{name}.xml")), text).unwrap();
    }
    eprintln!("wrote {} vectors to {}", vectors.len(), out_dir.display());
}
