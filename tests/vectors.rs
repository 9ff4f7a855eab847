//! Runs every test vector in `fixtures/vectors/` through the reader
//! (`domain::parse_domain` + `format::decode` + the uuid ownership check) and
//! asserts the result stated in the vector's first line, exactly.
//! Regenerate the vectors with `cargo run --example make-vectors`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use virt_tpm_state::domain::parse_domain;
use virt_tpm_state::format::{decode, DecodeLimits, NAMESPACE_URI};

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

/// What a format-1 reader makes of a vector.
fn actual(xml: &[u8]) -> Expect {
    let info = match parse_domain(xml, NAMESPACE_URI) {
        Ok(i) => i,
        Err(e) => return Expect::Refused(variant(&e)),
    };
    let Some(el) = &info.metadata else {
        return Expect::None;
    };
    let m = match decode(el, DecodeLimits::default()) {
        Ok(m) => m,
        Err(e) => return Expect::Refused(variant(&e)),
    };
    // The reader-level ownership rule (decision::Refusal::Clone).
    if m.provenance.uuid != info.uuid {
        return Expect::Refused("Clone".into());
    }
    let files: Vec<String> = m
        .tpm
        .files()
        .iter()
        .map(|f| format!("{}:{}:{}", f.name, f.data.len(), f.sha256()))
        .collect();
    let mut kv = BTreeMap::new();
    kv.insert("digest".into(), m.digest.hex());
    kv.insert("generation".into(), m.provenance.generation.to_string());
    kv.insert("uuid".into(), m.provenance.uuid.to_string());
    kv.insert("version".into(), m.tpm.version.to_string());
    kv.insert("files".into(), files.join(","));
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
        let got = actual(&bytes);
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
        "only {} vectors in {} (expected at least {MIN_VECTORS}); run `cargo run --example make-vectors`",
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
    if std::process::Command::new("xmllint")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: xmllint not installed");
        return;
    }
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
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(&vector)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), kv["digest"]);
}
