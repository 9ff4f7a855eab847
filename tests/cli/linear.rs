//! swtpm's linear state file (`<source type='file'>`) against the real
//! swtpm: what `virt_tpm_state::linear` reads out of a file swtpm_setup made
//! is the permall the dir backend uses, and a file it builds is one swtpm
//! runs with the same TPM. Needs swtpm, swtpm_setup and tpm2-tools (no
//! libvirt); run as root like the other end-to-end tests.

use crate::common::{env::Env, world::*};
use std::process::Command;
use virt_tpm_state::{linear, swtpm};

fn tpm_sh_run(args: &[&str]) -> String {
    let out = Command::new(tpm_sh())
        .args(args)
        .output()
        .expect("run tests/e2e/tpm.sh");
    assert!(out.status.success(), "{}", describe(args, &out));
    stdout(&out).trim().to_string()
}

#[test]
fn linear_file_holds_the_dir_backends_permall() {
    require!(Env::Libvirt);
    let tmp = tempfile::tempdir().expect("temp dir");
    let base = tmp.path().canonicalize().unwrap();
    let made = base.join("made.lin");
    let out = Command::new("swtpm_setup")
        .arg("--tpm2")
        .arg("--tpm-state")
        .arg(format!("file://{}", made.display()))
        .args(["--createek", "--vmid", "linear-test", "--overwrite"])
        .arg("--logfile")
        .arg(base.join("setup.log"))
        .output()
        .expect("run swtpm_setup");
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&["swtpm_setup"], &out),
        std::fs::read_to_string(base.join("setup.log")).unwrap_or_default()
    );
    let file = std::fs::read(&made).unwrap();
    let permall = linear::permall(&file)
        .expect("swtpm's file parses")
        .expect("swtpm_setup wrote a permall")
        .to_vec();
    let header = swtpm::check_header(&permall).expect("slot 0 is a whole swtpm state blob");
    assert!(!header.is_encrypted());

    // The same bytes as a dir backend's tpm2-00.permall: the same TPM.
    let dir = base.join("dir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("tpm2-00.permall"), &permall).unwrap();
    let ek_file = tpm_sh_run(&["ek-pub", made.to_str().unwrap()]);
    let ek_dir = tpm_sh_run(&["ek-pub", dir.to_str().unwrap()]);
    assert_eq!(ek_file.len(), 64);
    assert_eq!(ek_file, ek_dir);

    // A file built from that permall alone: swtpm runs it as the same TPM,
    // writes to it, and the secret it took is read back from it.
    let built = base.join("built.lin");
    std::fs::write(&built, linear::build(&permall).unwrap()).unwrap();
    assert_eq!(tpm_sh_run(&["ek-pub", built.to_str().unwrap()]), ek_dir);
    tpm_sh_run(&["write-secret", built.to_str().unwrap(), "in-a-built-file"]);
    let after = std::fs::read(&built).unwrap();
    let new_permall = linear::permall(&after).unwrap().unwrap();
    assert_ne!(
        new_permall,
        &permall[..],
        "the secret did not change permall"
    );
    assert_eq!(
        tpm_sh_run(&["read-secret", built.to_str().unwrap()]),
        "in-a-built-file"
    );
    // And its permall, alone in a dir, is that TPM with the secret.
    std::fs::write(dir.join("tpm2-00.permall"), new_permall).unwrap();
    assert_eq!(
        tpm_sh_run(&["read-secret", dir.to_str().unwrap()]),
        "in-a-built-file"
    );
}
