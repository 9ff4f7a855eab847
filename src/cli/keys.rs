//! `keygen` and `rekey`: host keys for envelope encryption of the element.

use super::{CliError, Ctx, RekeyArgs};
use crate::domain::parse_domain;
use crate::envelope::{os_random, SecretKey};
use crate::format::{decode_with_keys, encode_sealed, DecodeLimits, Style};
use crate::fs::{create_key, load_keyring};
use crate::libvirt::{DomainHandle, Libvirt, Targets};
use crate::restore::shown_name;

pub fn keygen(ctx: &Ctx) -> Result<(), CliError> {
    let key = SecretKey::generate(&mut os_random);
    let (id, path) = create_key(&ctx.paths, &key)?;
    crate::say!(
        "created key {id} at {} (0600); new stores use it. Copy it (same name, mode 0600) to every host that may run these VMs",
        path.display()
    );
    Ok(())
}

/// Creates a key when the host has none (used by `install`); says so.
pub fn ensure_key(ctx: &Ctx) -> Result<(), CliError> {
    if load_keyring(&ctx.paths)?.is_empty() {
        keygen(ctx)?;
    }
    Ok(())
}

pub fn rekey(ctx: &Ctx, args: &RekeyArgs) -> Result<(), CliError> {
    let keys = load_keyring(&ctx.paths)?;
    let Some((newest_id, newest)) = keys.newest() else {
        return Err(CliError::Key(format!(
            "no key in {}; create one with `virt-tpm-state keygen`",
            crate::fs::keys_dir(&ctx.paths).display()
        )));
    };
    let lv = Libvirt::connect(&ctx.uri, ctx.readonly)?;
    let domains: Vec<DomainHandle> = match &args.domain {
        Some(d) => vec![lv.domain(d)?],
        None => lv.all_domains()?,
    };
    let limits = DecodeLimits {
        max_file_size: ctx.config.max_file_size,
    };
    let mut failures = 0;
    for dom in domains {
        // Each copy of the definition on its own: live and config may differ.
        let mut copies = Vec::new();
        if dom.active {
            copies.push((
                dom.xml()?,
                Targets {
                    live: true,
                    config: false,
                },
            ));
        }
        if dom.persistent {
            copies.push((
                dom.inactive_xml()?,
                Targets {
                    live: false,
                    config: true,
                },
            ));
        }
        for (xml, targets) in copies {
            let which = if targets.live { "live" } else { "config" };
            let info = parse_domain(xml.as_bytes(), &ctx.config.namespace)?;
            let Some(el) = &info.metadata else {
                if args.domain.is_some() {
                    crate::say!(
                        "VM {}: no TPM state in the {which} metadata",
                        shown_name(&dom.name)
                    );
                }
                continue;
            };
            let m = match decode_with_keys(el, limits, &keys) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!(
                        "{}",
                        crate::logging::escaped(&format!(
                            "virt-tpm-state: VM {} ({which}): {e}; left as it is",
                            shown_name(&dom.name)
                        ))
                    );
                    failures += 1;
                    continue;
                }
            };
            if m.sealed_with == [newest_id.clone()] {
                crate::say!(
                    "VM {} ({which}): already encrypted with key {newest_id}",
                    shown_name(&dom.name)
                );
                continue;
            }
            // Same state, same provenance: only the protection changes.
            let element = encode_sealed(
                &m.state,
                &m.provenance,
                Style::ForSetMetadata,
                newest_id,
                newest,
            );
            dom.write_state_element(&element, &ctx.config.namespace, targets)?;
            crate::say!(
                "VM {} ({which}): re-encrypted generation {} with key {newest_id}",
                shown_name(&dom.name),
                m.provenance.generation
            );
        }
    }
    if failures > 0 {
        return Err(CliError::Key(format!(
            "{failures} element(s) could not be re-encrypted (see above)"
        )));
    }
    Ok(())
}
