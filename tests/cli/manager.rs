//! The manager contract (issue 19), through the `virt-tpm-state` binary and
//! without libvirt: `verify`/`show --check`/`extract` apply the reader rules
//! with the hook's exit codes on every vector, every input form is read,
//! `pack` builds what the writer vectors say byte for byte and round-trips
//! every source, `--json` failures are one `{"error": …}` object, a closed
//! stdout is quiet, `xmllint --relaxng` agrees with the reader on every
//! vector, and the Python reference reader too.

use crate::common::{runner::output_with_stdin, scratch::Scratch, states::St};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CLI: &str = env!("CARGO_BIN_EXE_virt-tpm-state");

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/vectors")
}

fn vectors() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    v.sort();
    assert!(v.len() >= 60, "vectors missing");
    v
}

/// The vector's first line: `ok …`, `refused VARIANT` or `none`.
fn expectation(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap();
    let first = text.lines().next().unwrap();
    first
        .strip_prefix("<!-- expect: ")
        .and_then(|r| r.strip_suffix(" -->"))
        .unwrap()
        .to_string()
}

/// Every vector with its expectation and the exit code it must give.
fn expected_vectors() -> Vec<(PathBuf, String, u8)> {
    let with_exit = |v: PathBuf| {
        let expect = expectation(&v);
        let want = expected_exit(&expect);
        (v, expect, want)
    };
    vectors().into_iter().map(with_exit).collect()
}

/// The exit code the hook and `verify` give for a vector's expectation.
fn expected_exit(expect: &str) -> u8 {
    let mut w = expect.split_whitespace();
    match (w.next(), w.next()) {
        (Some("ok"), _) => 0,
        (Some("none"), _) => 4,
        (Some("refused"), Some("Clone")) => 5,
        (Some("refused"), Some("Doctype" | "DuplicateMetadata" | "Malformed")) => 3,
        (
            Some("refused"),
            Some(
                "MissingKey" | "UnusableKey" | "Decrypt" | "NotARecipient" | "AgeDecrypt"
                | "BindingMismatch",
            ),
        ) => 19,
        (Some("refused"), Some(_)) => 4,
        _ => panic!("bad expectation {expect:?}"),
    }
}

/// A scratch root (no config, no keys) and the vector keys in a private
/// dir for `--keys`.
struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("root")).unwrap();
        let keys = tmp.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
        for e in std::fs::read_dir(vectors_dir().join("keys")).unwrap() {
            let e = e.unwrap();
            let to = keys.join(e.file_name());
            std::fs::copy(e.path(), &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        // The vectors' TEST host identity, with the mode an identity needs
        // (git keeps no 0600).
        let id = tmp.path().join("identity.txt");
        std::fs::copy(vectors_dir().join("identities/host.txt"), &id).unwrap();
        std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o600)).unwrap();
        Env { tmp }
    }

    fn keys(&self) -> PathBuf {
        self.tmp.path().join("keys")
    }

    fn identity(&self) -> PathBuf {
        self.tmp.path().join("identity.txt")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// The keys dir and the age identity, as `--keys`/`--identity` take them.
    fn key_args(&self) -> (String, String) {
        let arg = |p: PathBuf| p.to_str().unwrap().to_string();
        (arg(self.keys()), arg(self.identity()))
    }

    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        run_in(&self.tmp.path().join("root"), args, stdin)
    }
}

fn run_in(root: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = Command::new(CLI);
    c.args(args)
        .env("VIRT_TPM_STATE_ROOT", root)
        .env_remove("LIBVIRT_DEFAULT_URI");
    output_with_stdin(&mut c, stdin.unwrap_or_default())
}

/// `pack EXTRA ARGS` in a writer vector's dir (`fixtures/vectors/writer/`),
/// ARGS from its `args` file.
fn pack_writer_case(env: &Env, case: &Path, extra: &[&str]) -> Output {
    let args = std::fs::read_to_string(case.join("args")).unwrap();
    Command::new(CLI)
        .arg("pack")
        .args(extra)
        .args(args.split_whitespace())
        .current_dir(case)
        .env("VIRT_TPM_STATE_ROOT", env.path("root"))
        .output()
        .unwrap()
}

fn code(o: &Output) -> u8 {
    o.status.code().expect("exited") as u8
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn verify_and_show_check_give_the_hooks_exit_code_on_every_vector() {
    let env = Env::new();
    let (keys, id) = env.key_args();
    let (keys, id) = (keys.as_str(), id.as_str());
    let mut failures = Vec::new();
    for (v, expect, want) in expected_vectors() {
        let path = v.to_str().unwrap();
        for args in [
            vec!["verify", "--keys", keys, "--identity", id, "--xml", path],
            vec![
                "show",
                "--check",
                "--keys",
                keys,
                "--identity",
                id,
                "--xml",
                path,
            ],
        ] {
            let o = env.run(&args, None);
            if code(&o) != want {
                failures.push(format!(
                    "{} {}: exit {} (want {want} for {expect:?}): {}",
                    args[0],
                    v.file_name().unwrap().to_string_lossy(),
                    code(&o),
                    stderr(&o)
                ));
            }
            // A refusal is one line on stderr.
            if want != 0 && stderr(&o).lines().count() != 1 {
                failures.push(format!("{path}: not one line: {:?}", stderr(&o)));
            }
        }
        // The same through stdin.
        let o = env.run(
            &["verify", "--keys", keys, "--identity", id, "--xml", "-"],
            Some(&std::fs::read(&v).unwrap()),
        );
        if code(&o) != want {
            failures.push(format!("{path} via stdin: exit {}", code(&o)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn extract_refuses_what_verify_refuses_unless_forced() {
    let env = Env::new();
    let (keys, id) = env.key_args();
    let (keys, id) = (keys.as_str(), id.as_str());
    for (v, _, want) in expected_vectors() {
        let name = v.file_stem().unwrap().to_string_lossy().into_owned();
        let out = env.path(&format!("out-{name}"));
        let o = env.run(
            &[
                "extract",
                "--keys",
                keys,
                "--identity",
                id,
                "--xml",
                v.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(code(&o), want, "{name}: {}", stderr(&o));
        if want != 0 {
            // Nothing written on refusal: no out dir, or an empty one.
            let n = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
            assert_eq!(n, 0, "{name}: files written on refusal");
        }
    }
    // --force takes a clone's files (and a version mismatch's).
    for name in ["refused-clone-other-uuid", "refused-tpm-version-mismatch"] {
        let out = env.path(&format!("forced-{name}"));
        let o = env.run(
            &[
                "extract",
                "--force",
                "--xml",
                vectors_dir().join(format!("{name}.xml")).to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(code(&o), 0, "{name}: {}", stderr(&o));
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1, "{name}");
    }
}

/// `writer/<case>/args` run in `writer/<case>/` prints `element.xml`.
#[test]
fn pack_prints_the_writer_vectors_byte_for_byte() {
    let env = Env::new();
    let dir = vectors_dir().join("writer");
    let mut n = 0;
    for case in std::fs::read_dir(&dir).unwrap() {
        let case = case.unwrap().path();
        let o = pack_writer_case(&env, &case, &[]);
        assert_eq!(code(&o), 0, "{}: {}", case.display(), stderr(&o));
        let want = std::fs::read(case.join("element.xml")).unwrap();
        assert!(
            o.stdout == want,
            "{}: pack's element differs from the writer vector",
            case.display()
        );
        n += 1;
    }
    assert!(n >= 3, "writer vectors missing");
}

fn tpm2_state(env: &Env) -> (PathBuf, St) {
    let st = St::new("manager");
    let d = env.path("state");
    std::fs::create_dir_all(d.join("tpm2")).unwrap();
    std::fs::write(d.join("tpm2/tpm2-00.permall"), &st.permall).unwrap();
    std::fs::write(d.join("VARS.fd"), &st.vars).unwrap();
    (d, st)
}

/// The digest `show --json` reports for an element (stdin).
fn show_json(env: &Env, xml: &[u8], extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["show", "--json", "--xml", "-"];
    args.extend(extra);
    let o = env.run(&args, Some(xml));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn pack_reads_every_source_and_seals_with_a_named_key() {
    let env = Env::new();
    let (d, st) = tpm2_state(&env);
    let uuid = "6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11";
    let want_tpm = St {
        permall: st.permall.clone(),
        vars: Vec::new(),
    }
    .digest();
    let want_both = st.digest();
    let p = |s: &Path| s.to_str().unwrap().to_string();
    // A linear file holding the permall.
    let linear = env.path("linear.img");
    std::fs::write(&linear, virt_tpm_state::linear::build(&st.permall).unwrap()).unwrap();
    // oVirt: base64 of a tar.xz of the swtpm dir (made by tar and xz).
    let ovirt = env.path("ovirt.b64");
    let sh = format!(
        "tar -C {} -cJf - tpm2-00.permall | base64 > {}",
        p(&d.join("tpm2")),
        p(&ovirt)
    );
    assert!(Command::new("sh")
        .args(["-c", &sh])
        .status()
        .unwrap()
        .success());
    let cases: Vec<(Vec<String>, &String)> = vec![
        (vec!["--state-dir".into(), p(&d)], &want_tpm),
        (vec!["--state-dir".into(), p(&d.join("tpm2"))], &want_tpm),
        (
            vec!["--permall".into(), p(&d.join("tpm2/tpm2-00.permall"))],
            &want_tpm,
        ),
        (vec!["--linear".into(), p(&linear)], &want_tpm),
        (vec!["--ovirt".into(), p(&ovirt)], &want_tpm),
        (
            vec![
                "--state-dir".into(),
                p(&d),
                "--vars".into(),
                p(&d.join("VARS.fd")),
            ],
            &want_both,
        ),
    ];
    for (src, want) in &cases {
        for protect in [
            vec!["--plaintext"],
            vec!["--key", "f01e608db5c1c5c4"],
            vec!["--key", "a969ca0c7ba0a7cb"],
        ] {
            let keys = env.keys();
            let mut args = vec!["pack", "--keys", keys.to_str().unwrap(), "--uuid", uuid];
            args.extend(src.iter().map(String::as_str));
            args.extend(&protect);
            let o = env.run(&args, None);
            assert_eq!(code(&o), 0, "{src:?}: {}", stderr(&o));
            let j = show_json(&env, &o.stdout, &["--keys", keys.to_str().unwrap()]);
            assert_eq!(j["valid"], true, "{src:?} {protect:?}: {j}");
            assert_eq!(j["digest"].as_str().unwrap(), want.as_str(), "{src:?}");
            assert_eq!(j["element_uuid"], uuid);
            let prot = j["protection"].as_str().unwrap();
            match protect[0] {
                "--key" => assert_eq!(prot, format!("virt-tpm-state:{}", protect[1])),
                _ => assert_eq!(prot, "none"),
            }
        }
    }
    // Refusals: one line, a distinct exit code, nothing on stdout.
    let keys = env.keys();
    let keys = keys.to_str().unwrap();
    let perm = p(&d.join("tpm2/tpm2-00.permall"));
    let vars = p(&d.join("VARS.fd"));
    for (args, want) in [
        (vec!["pack", "--uuid", uuid, "--permall", &perm], 2u8),
        (
            vec![
                "pack",
                "--uuid",
                " 6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11",
                "--permall",
                &perm,
                "--plaintext",
            ],
            2,
        ),
        (
            vec![
                "pack",
                "--keys",
                keys,
                "--uuid",
                uuid,
                "--permall",
                &perm,
                "--key",
                "0123456789abcdef",
            ],
            19,
        ),
        // Not a swtpm state.
        (
            vec![
                "pack",
                "--uuid",
                uuid,
                "--permall",
                &vars,
                "--tpm-version",
                "2.0",
                "--plaintext",
            ],
            3,
        ),
        (
            vec!["pack", "--uuid", uuid, "--linear", &vars, "--plaintext"],
            3,
        ),
        (
            vec!["pack", "--uuid", uuid, "--ovirt", &vars, "--plaintext"],
            3,
        ),
        (
            vec!["pack", "--uuid", uuid, "--state-dir", &vars, "--plaintext"],
            // The filesystem layer's rule: not a directory where one is named.
            7,
        ),
    ] {
        let o = env.run(&args, None);
        assert_eq!(code(&o), want, "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}: output on refusal");
        assert_eq!(stderr(&o).lines().count(), 1, "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn pack_into_a_domain_xml_and_bare_elements() {
    let env = Env::new();
    let (d, st) = tpm2_state(&env);
    let fixture = crate::common::states::fixture_xml();
    let uuid = crate::common::states::fixture_uuid(&fixture);
    // The fixture's metadata holds a placeholder element of our namespace:
    // replaced. Without metadata: added.
    let plain = fixture.replace("urn:virt-tpm-state:1", "urn:example:other");
    let no_meta = {
        let a = fixture.find("<metadata").unwrap();
        let b = fixture.find("</metadata>").unwrap() + "</metadata>".len();
        format!("{}{}", &fixture[..a], &fixture[b..])
    };
    // `pack --plaintext` of the state in `d` for `uuid` into the domain XML `f`.
    let pack_into = |uuid: &str, f: &Path| {
        let (d, f) = (d.to_str().unwrap(), f.to_str().unwrap());
        let args = [
            "pack",
            "--uuid",
            uuid,
            "--state-dir",
            d,
            "--plaintext",
            "--into",
            f,
        ];
        env.run(&args, None)
    };
    for base in [fixture.as_str(), plain.as_str(), no_meta.as_str()] {
        let f = env.path("dom.xml");
        std::fs::write(&f, base).unwrap();
        let o = pack_into(&uuid, &f);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let out = String::from_utf8(o.stdout.clone()).unwrap();
        assert!(out.contains("<name>"), "not a domain XML");
        let o2 = env.run(&["verify", "--xml", "-"], Some(out.as_bytes()));
        assert_eq!(code(&o2), 0, "{}", stderr(&o2));
        let j = show_json(&env, out.as_bytes(), &[]);
        assert_eq!(j["uuid"], uuid.as_str());
        assert_eq!(j["files"].as_array().unwrap().len(), 1);
    }
    // Another domain's uuid: refused as a clone, nothing printed.
    let o = pack_into("6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11", &env.path("dom.xml"));
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(o.stdout.is_empty());

    // The bare forms of one element, on stdin and as files.
    let o = env.run(
        &[
            "pack",
            "--uuid",
            &uuid,
            "--permall",
            d.join("tpm2/tpm2-00.permall").to_str().unwrap(),
            "--plaintext",
        ],
        None,
    );
    let namespaced = o.stdout;
    let m = virt_tpm_state::state::MachineState::new(
        St {
            permall: st.permall.clone(),
            vars: Vec::new(),
        }
        .machine()
        .tpm,
        None,
    );
    let bare = virt_tpm_state::format::encode(
        &m,
        &virt_tpm_state::format::Provenance {
            uuid: virt_tpm_state::state::DomainUuid::parse(&uuid).unwrap(),
            generation: 1,
            parent: None,
            stored: "2026-01-01T00:00:00Z".into(),
            host: "h".into(),
        },
        virt_tpm_state::format::Style::ForSetMetadata,
        virt_tpm_state::format::Protection::Plain,
    )
    .unwrap();
    // libvirt re-indents what it returns.
    let bare_indented = bare.replace("><", ">\n  <");
    for xml in [
        namespaced.as_slice(),
        bare.as_bytes(),
        bare_indented.as_bytes(),
    ] {
        let j = show_json(&env, xml, &[]);
        assert_eq!(j["valid"], true, "{j}");
        assert_eq!(j["tpm_version"], "2.0");
        let o = env.run(&["verify", "--xml", "-"], Some(xml));
        assert_eq!(code(&o), 0);
    }
}

#[test]
fn pack_kept_gives_a_transient_domains_final_state() {
    let s = Scratch::new();
    let st = St::new("transient");
    let xml = crate::common::states::xml_for(&st, 1, &s.uuid, false);
    let o = s.prepare(&xml, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = s.hook("stopped", "end", &xml, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(s.kept_dir().exists(), "no kept copy");
    let o = run_in(&s.root(), &["pack", "--kept", &s.uuid, "--plaintext"], None);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let env = Env::new();
    let j = show_json(&env, &o.stdout, &[]);
    let want = St {
        permall: st.permall.clone(),
        vars: Vec::new(),
    }
    .digest();
    assert_eq!(j["digest"].as_str().unwrap(), want);
    // Sealed as store would: with the newest key (none here: refused, 19).
    let o = run_in(&s.root(), &["pack", "--kept", &s.uuid], None);
    assert_eq!(code(&o), 19, "{}", stderr(&o));
    // Another uuid: no kept copy (exit 15).
    let o = run_in(
        &s.root(),
        &[
            "pack",
            "--kept",
            "6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11",
            "--plaintext",
        ],
        None,
    );
    assert_eq!(code(&o), 15, "{}", stderr(&o));
}

#[test]
fn json_failures_are_one_error_object() {
    let env = Env::new();
    let v = vectors_dir();
    for (args, kind, exit) in [
        (
            vec!["pack", "--json", "--uuid", "x", "--plaintext"],
            "usage",
            2u8,
        ),
        (vec!["pack", "--json", "--no-such-flag"], "usage", 2),
        (
            vec![
                "show",
                "--json",
                "--check",
                "--xml",
                v.join("refused-clone-other-uuid.xml").to_str().unwrap(),
            ],
            "clone",
            5,
        ),
        (
            vec![
                "verify",
                "--json",
                "--xml",
                v.join("refused-tpm-version-mismatch.xml").to_str().unwrap(),
            ],
            "tpm-version",
            4,
        ),
        (
            vec![
                "verify",
                "--json",
                "--xml",
                v.join("refused-wrong-digest.xml").to_str().unwrap(),
            ],
            "invalid-element",
            4,
        ),
        (
            vec![
                "verify",
                "--json",
                "--xml",
                v.join("refused-encrypted-missing-key.xml")
                    .to_str()
                    .unwrap(),
            ],
            "key",
            19,
        ),
        (
            vec![
                "verify",
                "--json",
                "--xml",
                v.join("refused-doctype-billion-laughs.xml")
                    .to_str()
                    .unwrap(),
            ],
            "domain-xml",
            3,
        ),
        (
            vec![
                "verify",
                "--json",
                "--xml",
                v.join("none-vts-prefix-other-uri.xml").to_str().unwrap(),
            ],
            "no-element",
            4,
        ),
    ] {
        let o = env.run(&args, None);
        assert_eq!(code(&o), exit, "{args:?}: {}", stderr(&o));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON value ({e})"));
        assert_eq!(j["error"]["kind"], kind, "{args:?}: {j}");
        assert_eq!(j["error"]["exit"], exit as u64);
        assert!(j["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("virt-tpm-state: "));
        schema_check(&j);
    }
}

/// The element's provenance and contents, as `show` and `pack` print them
/// alike (docs/JSON.md).
const PROVENANCE_KEYS: &[&str] = &[
    "generation",
    "digest",
    "parent",
    "stored",
    "host",
    "tpm_version",
    "files",
    "protection",
];

/// The shape docs/JSON.md promises for a `show`/`verify` object, or an
/// error object.
fn schema_check(j: &serde_json::Value) {
    let obj = j.as_object().expect("an object");
    if obj.len() == 1 {
        let e = obj["error"].as_object().expect("error object");
        assert_eq!(e.len(), 3);
        return;
    }
    let about = [
        "domain",
        "uuid",
        "source",
        "present",
        "valid",
        "error",
        "format",
        "element_uuid",
        "belongs_to_domain",
    ];
    let keys = about
        .iter()
        .chain(PROVENANCE_KEYS)
        .chain(&["missing_key", "local"]);
    for k in keys {
        assert!(obj.contains_key(*k), "show object lacks {k}: {j}");
    }
}

#[test]
fn show_json_without_the_key_lists_what_is_readable() {
    let env = Env::new();
    let v = vectors_dir().join("ok-encrypted-nvram.xml");
    let o = env.run(&["show", "--json", "--xml", v.to_str().unwrap()], None);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    schema_check(&j);
    assert_eq!(j["valid"], false);
    assert_eq!(j["error"]["kind"], "key");
    assert_eq!(j["tpm_version"], "2.0");
    assert_eq!(j["files"].as_array().unwrap().len(), 2, "{j}");
    assert!(j["generation"].is_u64());
    assert!(j["missing_key"].is_string());
}

#[test]
fn a_closed_stdout_is_quiet() {
    let v = vectors_dir().join("ok-tpm2-nvram.xml");
    let v = v.to_str().unwrap();
    for cmd in [
        format!("show --xml {v}"),
        format!("show --json --xml {v}"),
        format!("verify --xml {v}"),
    ] {
        // `true` exits at once: every write after that meets EPIPE.
        let sh = format!(
            "set -o pipefail; ( sleep 0.3; VIRT_TPM_STATE_ROOT=/nonexistent {CLI} {cmd} ) | true"
        );
        let o = Command::new("bash").args(["-c", &sh]).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{cmd}: {}", stderr(&o));
        assert!(o.stderr.is_empty(), "{cmd}: {}", stderr(&o));
    }
}

fn python_reader() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/python/virt_tpm_state.py")
}

/// contrib/python/virt_tpm_state.py gives the Rust reader's exit code on
/// every vector (0 exactly when it accepts), with the vector keys.
#[test]
fn python_reference_reader_agrees_on_every_vector() {
    require!(crate::common::env::Env::Runs(&[
        "python3",
        "-c",
        "import cryptography, pyrage"
    ]));
    let mut failures = Vec::new();
    for v in vectors() {
        let want = expected_exit(&expectation(&v));
        let o = Command::new("python3")
            .arg(python_reader())
            .args(["verify", "--keys"])
            .arg(vectors_dir().join("keys"))
            .arg("--identity")
            .arg(vectors_dir().join("identities/host.txt"))
            .arg(&v)
            .output()
            .unwrap();
        if o.status.code() != Some(want as i32) {
            failures.push(format!(
                "{}: python exit {:?}, want {want}: {}",
                v.display(),
                o.status.code(),
                stderr(&o)
            ));
        }
    }
    // And on what `pack` writes, sealed and plain, as a bare element.
    let env = Env::new();
    let (d, _) = tpm2_state(&env);
    let keys = env.keys();
    for protect in [vec!["--plaintext"], vec!["--key", "f01e608db5c1c5c4"]] {
        let mut args = vec![
            "pack",
            "--keys",
            keys.to_str().unwrap(),
            "--uuid",
            "6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11",
            "--state-dir",
            d.to_str().unwrap(),
        ];
        args.extend(&protect);
        let el = env.run(&args, None).stdout;
        let mut py = Command::new("python3");
        py.arg(python_reader())
            .args(["verify", "--keys"])
            .arg(&keys)
            .arg("-");
        let o = output_with_stdin(&mut py, &el);
        if !o.status.success() {
            failures.push(format!("pack {protect:?}: python refuses: {}", stderr(&o)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Vectors whose element is structurally invalid: schema/virt-tpm-state.rng
/// rejects them. Every other element (valid, or refused only for what a
/// schema cannot see: digests, gzip, keys, the domain) validates.
const SCHEMA_INVALID: &[&str] = &[
    "refused-bad-base64",
    "refused-base64-missing-padding",
    "refused-base64-nonzero-padding-bits",
    "refused-base64-url-alphabet",
    "refused-digest-uppercase-hex",
    "refused-duplicate-file",
    "refused-element-inside-file",
    "refused-encrypted-bad-nonce-length",
    "refused-encrypted-key-id-uppercase",
    "refused-encrypted-missing-nonce",
    "refused-encrypted-wrapped-key-truncated",
    "refused-name-other-version",
    "refused-name-permall-bak",
    "refused-name-traversal",
    "refused-name-volatilestate",
    "refused-nvram-and-varstore",
    "refused-nvram-file-in-tpm-section",
    "refused-nvram-name-other",
    "refused-nvram-no-file",
    "refused-tpm-version-3.0",
    "refused-two-nvram-sections",
    "refused-two-tpm-sections",
    "refused-unknown-encoding",
    "refused-unknown-format",
    "refused-unknown-section",
    "refused-uuid-newline-reference",
    "refused-uuid-padded",
    "refused-varstore-name-other",
];

#[test]
fn relaxng_schema_agrees_with_the_reader_on_every_vector() {
    require!(
        crate::common::env::Env::Cmd("xmllint"),
        crate::common::env::Env::Cmd("python3")
    );
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/virt-tpm-state.rng");
    let tmp = tempfile::tempdir().unwrap();
    let validate = |el: &Path| -> bool {
        Command::new("xmllint")
            .args(["--noout", "--relaxng"])
            .arg(&schema)
            .arg(el)
            .output()
            .unwrap()
            .status
            .success()
    };
    let mut failures = Vec::new();
    let (mut valid, mut invalid) = (0, 0);
    for v in vectors() {
        let stem = v.file_stem().unwrap().to_string_lossy().into_owned();
        let expect = expectation(&v);
        // No element, or a domain refused before its element is read.
        if expect == "none" || expect.ends_with("Doctype") || expect.ends_with("DuplicateMetadata")
        {
            continue;
        }
        // The element alone and namespaced, cut out by Python's parser
        // (an implementation independent of the Rust reader).
        let o = Command::new("python3")
            .arg(python_reader())
            .arg("element")
            .arg(&v)
            .output()
            .unwrap();
        assert!(o.status.success(), "{stem}: {}", stderr(&o));
        let el = tmp.path().join(format!("{stem}.xml"));
        std::fs::write(&el, &o.stdout).unwrap();
        let want = !SCHEMA_INVALID.contains(&stem.as_str());
        if want != validate(&el) {
            failures.push(format!("{stem}: schema says {}, want {want}", !want));
        }
        if want {
            valid += 1;
        } else {
            invalid += 1;
        }
    }
    // The writer vectors' elements, as written.
    for case in std::fs::read_dir(vectors_dir().join("writer")).unwrap() {
        let el = case.unwrap().path().join("element.xml");
        if !validate(&el) {
            failures.push(format!("{}: invalid", el.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        valid >= 20 && invalid >= 20,
        "{valid} valid, {invalid} invalid"
    );
}

/// `pack --into` over an element continues its chain as `store` would.
#[test]
fn pack_into_continues_the_generation_chain() {
    let env = Env::new();
    let (d, _) = tpm2_state(&env);
    let fixture =
        crate::common::states::fixture_xml().replace("urn:virt-tpm-state:1", "urn:example:other");
    let uuid = crate::common::states::fixture_uuid(&fixture);
    let f = env.path("dom.xml");
    std::fs::write(&f, &fixture).unwrap();
    let pack = |extra: &[&str]| -> (String, serde_json::Value) {
        let mut args = vec![
            "pack",
            "--uuid",
            &uuid,
            "--state-dir",
            d.to_str().unwrap(),
            "--plaintext",
            "--into",
            f.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = env.run(&args, None);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let xml = String::from_utf8(o.stdout).unwrap();
        let j = show_json(&env, xml.as_bytes(), &[]);
        std::fs::write(&f, &xml).unwrap();
        (xml, j)
    };
    let (_, j1) = pack(&[]);
    assert_eq!(j1["generation"], 1);
    assert!(j1["parent"].is_null());
    // The same state again: unchanged provenance chain.
    let (_, j2) = pack(&[]);
    assert_eq!(j2["generation"], 1);
    // Another state (VARS added): the next generation over the old digest.
    let vars = d.join("VARS.fd");
    let (_, j3) = pack(&["--vars", vars.to_str().unwrap()]);
    assert_eq!(j3["generation"], 2);
    assert_eq!(j3["parent"], j1["digest"]);
    // An explicit --generation wins.
    let (_, j4) = pack(&["--generation", "7"]);
    assert_eq!(j4["generation"], 7);
}

/// `pack --bare` prints exactly what `store` hands to virDomainSetMetadata
/// for the same input (`format::encode`, `Style::ForSetMetadata`).
#[test]
fn pack_bare_is_what_store_passes_to_libvirt() {
    use virt_tpm_state::format::{encode, Protection, Provenance, Style};
    use virt_tpm_state::state::{
        DomainUuid, MachineState, Sha256Sum, StateFile, TpmState, TpmVersion,
    };
    let env = Env::new();
    let case = vectors_dir().join("writer/tpm2-vars-first");
    let args = std::fs::read_to_string(case.join("args")).unwrap();
    let words: Vec<&str> = args.split_whitespace().collect();
    let val = |k: &str| words[words.iter().position(|w| *w == k).unwrap() + 1];
    let o = pack_writer_case(&env, &case, &["--bare"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let state = MachineState::new(
        Some(TpmState::new(
            TpmVersion::V2_0,
            vec![StateFile {
                name: "tpm2-00.permall".into(),
                data: std::fs::read(case.join("tpm2-00.permall")).unwrap(),
            }],
        )),
        Some(std::fs::read(case.join("VARS.fd")).unwrap()),
    );
    let prov = Provenance {
        uuid: DomainUuid::parse(val("--uuid")).unwrap(),
        generation: val("--generation").parse().unwrap(),
        parent: words
            .contains(&"--parent")
            .then(|| Sha256Sum::parse_hex(val("--parent")).unwrap()),
        stored: val("--stored").into(),
        host: val("--host").into(),
    };
    let want = format!(
        "{}\n",
        encode(&state, &prov, Style::ForSetMetadata, Protection::Plain).unwrap()
    );
    assert_eq!(String::from_utf8(o.stdout).unwrap(), want);
    assert!(!want.contains("vts:") && !want.contains("xmlns"));
}

/// `--keys DIR`: a dir others can write is refused (7) before any key is
/// read; commands that neither open nor seal refuse the flag (2); `pack
/// --json` prints the documented object.
#[test]
fn keys_dir_rules_and_pack_json() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = Env::new();
    let v = vectors_dir().join("ok-encrypted.xml");
    let keys = env.keys();
    // `CMD --keys DIR --xml VECTOR EXTRA...`.
    let with_keys = |cmd: &str, dir: &Path, extra: &[&str]| {
        let mut args = vec![cmd, "--keys", dir.to_str().unwrap()];
        args.extend(["--xml", v.to_str().unwrap()]);
        args.extend_from_slice(extra);
        env.run(&args, None)
    };
    let o = with_keys("verify", &keys, &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Without --keys the scratch host has no key: 19.
    let o = env.run(&["verify", "--xml", v.to_str().unwrap()], None);
    assert_eq!(code(&o), 19, "{}", stderr(&o));
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o777)).unwrap();
    for (cmd, extra) in [
        ("verify", &[][..]),
        ("extract", &["--out", "/nonexistent/x"]),
    ] {
        let o = with_keys(cmd, &keys, extra);
        assert_eq!(code(&o), 7, "{cmd}: {}", stderr(&o));
        assert!(stderr(&o).contains("chmod 700"), "{}", stderr(&o));
    }
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
    let o = with_keys("verify", &env.path("no-such-keys"), &[]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    let o = env.run(&["keygen", "--keys", keys.to_str().unwrap()], None);
    assert_eq!(code(&o), 2, "{}", stderr(&o));

    let (d, st) = tpm2_state(&env);
    let o = env.run(
        &[
            "pack",
            "--json",
            "--keys",
            keys.to_str().unwrap(),
            "--key",
            "a969ca0c7ba0a7cb",
            "--uuid",
            "6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11",
            "--state-dir",
            d.to_str().unwrap(),
            "--vars",
            d.join("VARS.fd").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let obj = j.as_object().unwrap();
    for k in ["uuid"]
        .iter()
        .chain(PROVENANCE_KEYS)
        .chain(&["element", "domain_xml"])
    {
        assert!(obj.contains_key(*k), "pack --json lacks {k}");
    }
    assert_eq!(j["digest"].as_str().unwrap(), st.digest());
    assert_eq!(j["protection"], "virt-tpm-state:a969ca0c7ba0a7cb");
    assert_eq!(j["files"].as_array().unwrap().len(), 2);
    assert!(j["parent"].is_null() && j["domain_xml"].is_null());
    // The element it carries is what the reader accepts.
    let shown = show_json(
        &env,
        j["element"].as_str().unwrap().as_bytes(),
        &["--keys", keys.to_str().unwrap()],
    );
    assert_eq!(shown["valid"], true, "{shown}");
    assert_eq!(shown["digest"], j["digest"]);
}

/// The domain fixtures (`fixtures/domains/`): the CLI, the Python reader and
/// (where there is an element) the schema agree on each.
#[test]
fn fixtures_agree_across_the_three_readers() {
    require!(
        crate::common::env::Env::Cmd("xmllint"),
        crate::common::env::Env::Runs(&["python3", "-c", "import cryptography"])
    );
    let env = Env::new();
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/virt-tpm-state.rng");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/domains");
    let mut n = 0;
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        if f.extension().map_or(true, |x| x != "xml") {
            continue;
        }
        let rust = code(&env.run(&["verify", "--xml", f.to_str().unwrap()], None));
        let py = Command::new("python3")
            .arg(python_reader())
            .arg("verify")
            .arg(&f)
            .output()
            .unwrap();
        assert_eq!(
            py.status.code(),
            Some(rust as i32),
            "{}: {}",
            f.display(),
            stderr(&py)
        );
        let el = Command::new("python3")
            .arg(python_reader())
            .arg("element")
            .arg(&f)
            .output()
            .unwrap();
        if el.status.success() {
            let tmp = env.path("fixture-element.xml");
            std::fs::write(&tmp, &el.stdout).unwrap();
            let ok = Command::new("xmllint")
                .args(["--noout", "--relaxng"])
                .arg(&schema)
                .arg(&tmp)
                .output()
                .unwrap()
                .status
                .success();
            assert_eq!(
                ok,
                rust == 0,
                "{}: schema {ok}, CLI exit {rust}",
                f.display()
            );
            n += 1;
        }
    }
    assert!(n >= 1, "no fixture with an element");
}

/// `pack --state-dir` takes what the hook and `store` take from a live
/// dir: the permall and the EK certificates beside it, never swtpm's
/// `.bak` or its lock.
#[test]
fn pack_state_dir_carries_ek_certificates_not_the_backup() {
    let env = Env::new();
    let (d, st) = tpm2_state(&env);
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ek-certs");
    for c in ["ek-rsa2048.crt", "ek-secp384r1.crt"] {
        std::fs::copy(certs.join(c), d.join("tpm2").join(c)).unwrap();
    }
    std::fs::write(d.join("tpm2/tpm2-00.permall.bak"), &st.permall).unwrap();
    std::fs::write(d.join("tpm2/.lock"), b"").unwrap();
    let o = env.run(
        &[
            "pack",
            "--uuid",
            "6f6c1b8e-3c1e-4d44-9a57-1d3e2f0a9b11",
            "--state-dir",
            d.to_str().unwrap(),
            "--plaintext",
        ],
        None,
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let j = show_json(&env, &o.stdout, &[]);
    // Sorted by name, as the element holds them.
    assert_eq!(
        crate::common::runner::json_file_names(&j),
        ["ek-rsa2048.crt", "ek-secp384r1.crt", "tpm2-00.permall"],
        "{j:#}"
    );
}
