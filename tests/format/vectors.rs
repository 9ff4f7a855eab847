//! Runs every test vector in `fixtures/vectors/` through the reader
//! (`domain::parse_domain` + `format::decode`, with the test keys
//! of `fixtures/vectors/keys/`, + the uuid ownership check) and asserts the
//! result stated in the vector's first line, exactly.
//! Regenerate the vectors with `cargo run -p tools --bin make-vectors`.

use crate::common::env::Env;
use crate::common::runner::{must_run, output_with_stdin};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use virt_tpm_state::envelope::{Keyring, SecretKey, KEY_LEN};
use virt_tpm_state::format::{decode, DecodeLimits, NAMESPACE_URI};
use virt_tpm_state::input::parse_input;
use virt_tpm_state::restore::{reader_check, RestoreError};

/// Fewer vectors than this means the directory lost some: fail.
const MIN_VECTORS: usize = 30;

#[derive(Debug, PartialEq, Eq)]
enum Expect {
    /// `ok key=value ...`
    Ok(BTreeMap<String, String>),
    /// `refused Variant`
    Refused(String),
    /// `none`: the domain holds no element of our namespace.
    None,
}

fn parse_header(text: &str) -> Result<Expect, String> {
    let first = text.lines().next().unwrap_or("");
    let inner = first
        .strip_prefix("<!-- expect: ")
        .and_then(|r| r.strip_suffix(" -->"))
        .ok_or_else(|| format!("first line is not `<!-- expect: ... -->`: {first:?}"))?;
    let mut words = inner.split_whitespace();
    match words.next() {
        Some("ok") => {
            let mut kv = BTreeMap::new();
            for w in words {
                let (k, v) = w
                    .split_once('=')
                    .ok_or_else(|| format!("bad `key=value` {w:?}"))?;
                kv.insert(k.to_string(), v.to_string());
            }
            for k in ["digest", "generation", "uuid", "version", "files"] {
                if !kv.contains_key(k) {
                    return Err(format!("`ok` header lacks {k}="));
                }
            }
            Ok(Expect::Ok(kv))
        }
        Some("refused") => match (words.next(), words.next()) {
            (Some(v), None) => Ok(Expect::Refused(v.to_string())),
            _ => Err("`refused` takes exactly one variant name".into()),
        },
        Some("none") if words.next().is_none() => Ok(Expect::None),
        other => Err(format!("unknown expectation {other:?}")),
    }
}

/// The variant name of an error enum, from its derived `Debug`.
fn variant<E: std::fmt::Debug>(e: &E) -> String {
    format!("{e:?}")
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The `*.key` files of `fixtures/vectors/keys/`, by name (so oldest first),
/// each parsed as `fs::load_keyring` does: one line of standard base64
/// of 32 bytes.
fn key_files() -> Vec<(String, SecretKey)> {
    let dir = vectors_dir().join("keys");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("fixtures/vectors/keys exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".key") && !n.starts_with('.'))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(&n)).unwrap();
            let raw = STANDARD
                .decode(text.trim())
                .unwrap_or_else(|_| panic!("{n}: not base64"));
            let raw = <[u8; KEY_LEN]>::try_from(raw.as_slice())
                .unwrap_or_else(|_| panic!("{n}: not {KEY_LEN} bytes"));
            (n, SecretKey::from_bytes(raw))
        })
        .collect()
}

/// The test keys, and the TEST age identity `identities/host.txt` (the
/// reader's own; `owner.txt` is the escrow identity rage opens them with).
fn test_keyring() -> Keyring {
    let mut ring = Keyring::new(key_files().into_iter().map(|(_, k)| k).collect());
    let text = std::fs::read_to_string(vectors_dir().join("identities/host.txt"))
        .expect("fixtures/vectors/identities/host.txt exists");
    ring.add_identities(virt_tpm_state::recipients::parse_identities(&text, "host.txt").unwrap());
    ring
}

/// What a format-1 reader holding `keys` makes of a vector.
fn actual(xml: &[u8], keys: &Keyring) -> Expect {
    // Every input form: a domain XML, or the bare element (namespaced or
    // namespace-less), as the CLI reads it.
    let input = match parse_input(xml, NAMESPACE_URI) {
        Ok(i) => i,
        Err(e) => return Expect::Refused(variant(&e)),
    };
    let info = input.info;
    let Some(el) = &info.metadata else {
        return Expect::None;
    };
    let m = match decode(el, DecodeLimits::default(), keys) {
        Ok(m) => m,
        Err(e) => return Expect::Refused(variant(&e)),
    };
    // The reader rules that compare the element with its domain: TPM
    // version, swtpm encryption, ownership (a clone).
    if let Err(e) = reader_check(&info, &m, NAMESPACE_URI, input.domain_bound) {
        // A refusal about the VM names its kind (the name is attached
        // around it, the same for every kind).
        return Expect::Refused(match &e {
            RestoreError::Vm { kind, .. } => variant(kind),
            other => variant(other),
        });
    }
    // Every file of every section, sorted by name.
    let mut sections = m.state.sections();
    sections.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let files: Vec<String> = sections
        .iter()
        .map(|(_, f)| format!("{}:{}:{}", f.name, f.data.len(), f.sha256()))
        .collect();
    let mut kv = BTreeMap::new();
    kv.insert("digest".into(), m.digest.hex());
    kv.insert("generation".into(), m.provenance.generation.to_string());
    kv.insert("uuid".into(), m.provenance.uuid.to_string());
    kv.insert(
        "version".into(),
        m.state
            .tpm
            .as_ref()
            .map_or("none".to_string(), |t| t.version.to_string()),
    );
    kv.insert("files".into(), files.join(","));
    if !m.sealed_with.is_empty() {
        let ids: Vec<&str> = m.sealed_with.iter().map(|k| k.as_str()).collect();
        kv.insert("key".into(), ids.join(","));
    }
    if !m.sealed_for.is_empty() {
        let mut fps: Vec<&str> = m.sealed_for.iter().map(|f| f.as_str()).collect();
        fps.sort_unstable();
        kv.insert("recipients".into(), fps.join(","));
    }
    Expect::Ok(kv)
}

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/vectors")
}

#[test]
fn every_vector_gives_its_stated_result() {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .expect("fixtures/vectors exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    paths.sort();
    let keys = test_keyring();
    let mut failures = Vec::new();
    let (mut ok, mut refused, mut none) = (0, 0, 0);
    for p in &paths {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(p).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let expect = match parse_header(&text) {
            Ok(e) => e,
            Err(why) => {
                failures.push(format!("{name}: no usable header: {why}"));
                continue;
            }
        };
        match &expect {
            Expect::Ok(_) => ok += 1,
            Expect::Refused(_) => refused += 1,
            Expect::None => none += 1,
        }
        // The file name states the class too; keep them in step.
        let class_ok = match &expect {
            Expect::Ok(_) => name.starts_with("ok-"),
            Expect::Refused(_) => name.starts_with("refused-"),
            Expect::None => name.starts_with("none-"),
        };
        if !class_ok {
            failures.push(format!("{name}: file name does not match {expect:?}"));
        }
        let got = actual(&bytes, &keys);
        if got != expect {
            failures.push(format!(
                "{name}:\n  expected {expect:?}\n  got      {got:?}"
            ));
        }
    }
    eprintln!(
        "ran {} vectors: {ok} ok, {refused} refused, {none} none",
        paths.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        paths.len() >= MIN_VECTORS,
        "only {} vectors in {} (expected at least {MIN_VECTORS}); run `cargo run -p tools --bin make-vectors`",
        paths.len(),
        vectors_dir().display()
    );
    assert!(ok >= 5 && refused >= 20, "too few ok/refused vectors");
}

#[test]
fn headers_are_strict() {
    assert!(parse_header("<domain/>").is_err());
    assert!(parse_header("<!-- expect: ok digest=x -->").is_err());
    assert!(parse_header("<!-- expect: refused -->").is_err());
    assert!(parse_header("<!-- expect: maybe -->").is_err());
    assert_eq!(
        parse_header("<!-- expect: refused UnknownFormat -->"),
        Ok(Expect::Refused("UnknownFormat".into()))
    );
}

/// The spec's shell example (docs/FORMAT.md section 7), run for real on a
/// vector when xmllint is installed.
#[test]
fn shell_example_decodes_a_vector() {
    require!(Env::Cmd("xmllint"));
    let vector = vectors_dir().join("ok-as-libvirt-prints.xml");
    let text = std::fs::read_to_string(&vector).unwrap();
    let Expect::Ok(kv) = parse_header(&text).unwrap() else {
        panic!("not an ok vector")
    };
    let dir = tempfile::tempdir().unwrap();
    let script = r#"set -eu
S="/domain/metadata/*[local-name()='state' and namespace-uri()='urn:virt-tpm-state:1']"
F="$S/*[local-name()='tpm']/*[local-name()='file' and @name='tpm2-00.permall']"
test "$(xmllint --xpath "string($S/@format)" "$1")" = 1
test "$(xmllint --xpath "string($F/@encoding)" "$1")" = gzip+base64
xmllint --xpath "string($F)" "$1" | tr -d ' \t\r\n\f' | base64 -d | gzip -dc > tpm2-00.permall
printf 'tpm/tpm2-00.permall %s\n' "$(sha256sum < tpm2-00.permall | cut -d' ' -f1)" | sort | sha256sum | cut -d' ' -f1
"#;
    let out = must_run(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&vector)
            .current_dir(dir.path()),
        "the shell reader",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), kv["digest"]);
}

/// The test keys are named as `fs::create_key` names host keys,
/// `<UTC stamp>-<key id>.key`, with the id derived from the key (FORMAT.md
/// 2.6), and the newest (last by name) is the one `ok-encrypted` uses.
#[test]
fn test_keys_are_named_by_stamp_and_id() {
    let files = key_files();
    assert!(files.len() >= 2, "expected an older and a newer test key");
    for (name, key) in &files {
        let (stamp, rest) = name.split_once('-').unwrap();
        assert!(
            stamp.len() == 16
                && stamp.as_bytes()[8] == b'T'
                && stamp.ends_with('Z')
                && stamp[..8]
                    .bytes()
                    .chain(stamp[9..15].bytes())
                    .all(|b| b.is_ascii_digit()),
            "{name}: stamp is not YYYYMMDDTHHMMSSZ"
        );
        assert_eq!(rest, format!("{}.key", key.id()), "{name}: id");
    }
    let ring = test_keyring();
    let newest = ring.newest().unwrap().0.as_str().to_string();
    assert!(files.last().unwrap().0.ends_with(&format!("-{newest}.key")));
    let text = std::fs::read_to_string(vectors_dir().join("ok-encrypted.xml")).unwrap();
    let Expect::Ok(kv) = parse_header(&text).unwrap() else {
        panic!("not an ok vector")
    };
    assert_eq!(kv["key"], newest);
}

/// The code block under `### Python: encrypted files` in docs/FORMAT.md.
fn python_decrypt_example() -> String {
    let spec =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/FORMAT.md"))
            .unwrap();
    let section = spec
        .split_once("### Python: encrypted files")
        .expect("FORMAT.md has the encrypted-files Python example")
        .1;
    let code = section.split_once("```python\n").unwrap().1;
    code.split_once("```").unwrap().0.to_string()
}

/// The spec's decryption example (docs/FORMAT.md section 7), run for real on
/// the encrypted vectors with the test keys when python3 and its
/// `cryptography` package are installed.
#[test]
fn python_example_decrypts_the_vectors() {
    require!(Env::Runs(&[
        "python3",
        "-c",
        "import cryptography.hazmat.primitives.ciphers.aead"
    ]));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("open_state.py");
    std::fs::write(&script, python_decrypt_example()).unwrap();
    let run = |vector: &str| {
        std::process::Command::new("python3")
            .arg(&script)
            .arg(vectors_dir().join(format!("{vector}.xml")))
            .arg(vectors_dir().join("keys"))
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let mut ran = 0;
    let mut names: Vec<String> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".xml").map(str::to_string))
        .filter(|n| {
            // Not the `-age` ones: the example reads host-key seals only
            // (rage_opens_the_age_vectors covers those).
            !n.contains("-age")
                && (n.contains("-encrypted")
                    || n.contains("nvram")
                    || n.contains("varstore")
                    || n == "ok-tpm2-ek-certs"
                    || n == "ok-tpm2"
                    || n == "ok-tpm12")
        })
        .collect();
    names.sort();
    for name in &names {
        let text = std::fs::read_to_string(vectors_dir().join(format!("{name}.xml"))).unwrap();
        let out = run(name);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match parse_header(&text).unwrap() {
            Expect::Ok(kv) => {
                assert!(out.status.success(), "{name}: {stderr}");
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout).trim(),
                    format!("{} {}", kv["version"], kv["digest"]),
                    "{name}"
                );
                for spec in kv["files"].split(',') {
                    let mut parts = spec.split(':');
                    let (file, size, sha) = (
                        parts.next().unwrap(),
                        parts.next().unwrap(),
                        parts.next().unwrap(),
                    );
                    let data = std::fs::read(dir.path().join(file)).unwrap();
                    assert_eq!(data.len().to_string(), size, "{name}: {file}");
                    assert_eq!(
                        virt_tpm_state::state::Sha256Sum::of(&data).hex(),
                        sha,
                        "{name}: {file}"
                    );
                    std::fs::remove_file(dir.path().join(file)).unwrap();
                }
            }
            _ => assert!(
                !out.status.success() && stderr.starts_with("refused: "),
                "{name}: the example did not refuse it: {stderr}"
            ),
        }
        ran += 1;
    }
    assert!(ran >= 12, "only {ran} encrypted vectors");
}

/// An independent age implementation opens the `gzip+age+base64` vectors
/// with the owner's escrow identity: `base64 -d | rage -d -i owner.txt |
/// gunzip` gives each file, byte for byte (docs/FORMAT.md 2.8).
#[test]
fn rage_opens_the_age_vectors() {
    require!(Env::Cmd("rage"), Env::Cmd("gunzip"));
    let owner = vectors_dir().join("identities/owner.txt");
    let pipe = |cmd: &mut std::process::Command, input: &[u8]| -> (bool, Vec<u8>) {
        let out = output_with_stdin(cmd, input);
        (out.status.success(), out.stdout)
    };
    let mut opened = 0;
    for name in ["ok-age", "ok-age-nvram", "refused-age-not-a-recipient"] {
        let text = std::fs::read_to_string(vectors_dir().join(format!("{name}.xml"))).unwrap();
        let Expect::Ok(kv) = parse_header(&text).unwrap() else {
            // Sealed for owner and an absent host: the owner opens it too.
            continue;
        };
        let info = parse_input(text.as_bytes(), NAMESPACE_URI).unwrap().info;
        let el = info.metadata.unwrap();
        for f in el.children.iter().flat_map(|s| s.children.iter()) {
            let compact: String = f.text.split_ascii_whitespace().collect();
            let age_file = STANDARD.decode(compact).unwrap();
            let (ok, gz) = pipe(
                std::process::Command::new("rage")
                    .arg("-d")
                    .arg("-i")
                    .arg(&owner),
                &age_file,
            );
            assert!(ok, "{name}: rage -d failed");
            let (ok, raw) = pipe(std::process::Command::new("gunzip").arg("-c"), &gz);
            assert!(ok, "{name}: gunzip failed");
            let want = format!(
                "{}:{}:{}",
                f.attr("name").unwrap(),
                raw.len(),
                virt_tpm_state::state::Sha256Sum::of(&raw).hex()
            );
            assert!(kv["files"].split(',').any(|x| x == want), "{name}: {want}");
            opened += 1;
        }
    }
    assert_eq!(opened, 3, "ok-age (1 file) and ok-age-nvram (2 files)");
}
