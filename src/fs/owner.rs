//! Who owns what the product writes for libvirt: qemu.conf's users.

use super::error::FsError;
use super::Anchor;
use crate::paths::Paths;
use std::path::Path;

/// qemu.conf is small; a larger file is not libvirt's.
const QEMU_CONF_MAX: u64 = 1024 * 1024;

/// Owner of files the product writes (a uid and gid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl Owner {
    /// The user this process runs as (root for our own private files).
    pub(crate) fn current() -> Self {
        Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    /// The owner libvirt gives swtpm state: `swtpm_user`/`swtpm_group` from
    /// qemu.conf, defaulting to `tss`, or root where `tss` does not exist.
    pub(crate) fn swtpm(paths: &Paths) -> Result<Self, FsError> {
        let conf = qemu_conf(paths)?;
        let uid = match conf_value(&conf, "swtpm_user") {
            Some(u) => resolve_user(&u)?,
            None => resolve_user("tss").unwrap_or(0),
        };
        let gid = match conf_value(&conf, "swtpm_group") {
            Some(g) => resolve_group(&g)?,
            None => resolve_group("tss").unwrap_or(0),
        };
        Ok(Owner { uid, gid })
    }

    /// The owner libvirt gives a UEFI variable store: qemu.conf's
    /// `user`/`group`, defaulting to libvirt's build defaults
    /// (`libvirt-qemu` on Debian, `qemu` elsewhere), or root where neither
    /// exists.
    pub(crate) fn qemu(paths: &Paths) -> Result<Self, FsError> {
        let conf = qemu_conf(paths)?;
        let uid = match conf_value(&conf, "user") {
            Some(u) => resolve_user(&u)?,
            None => resolve_user("libvirt-qemu")
                .or_else(|_| resolve_user("qemu"))
                .unwrap_or(0),
        };
        let gid = match conf_value(&conf, "group") {
            Some(g) => resolve_group(&g)?,
            None => resolve_group("libvirt-qemu")
                .or_else(|_| resolve_group("qemu"))
                .unwrap_or(0),
        };
        Ok(Owner { uid, gid })
    }
}

/// qemu.conf's text; empty when there is none (libvirt's defaults apply).
fn qemu_conf(paths: &Paths) -> Result<String, FsError> {
    let bytes = super::read_file(
        paths,
        &Anchor::LibvirtConfig,
        Path::new("qemu.conf"),
        QEMU_CONF_MAX,
    )?;
    Ok(bytes
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default())
}

/// Reads `key = "value"` from libvirt's qemu.conf syntax (the last one wins,
/// `#` starts a comment).
fn conf_value(text: &str, key: &str) -> Option<String> {
    let mut found = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim() == key {
            found = Some(v.trim().trim_matches('"').to_string());
        }
    }
    found
}

fn resolve_user(name: &str) -> Result<u32, FsError> {
    if let Some(num) = name.strip_prefix('+') {
        return num
            .parse()
            .map_err(|_| FsError::UnknownOwner(name.to_string()));
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => Err(FsError::UnknownOwner(name.to_string())),
    }
}

fn resolve_group(name: &str) -> Result<u32, FsError> {
    if let Some(num) = name.strip_prefix('+') {
        return num
            .parse()
            .map_err(|_| FsError::UnknownOwner(name.to_string()));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(FsError::UnknownOwner(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_conf_values() {
        let conf =
            "# swtpm_user = \"nobody\"\nswtpm_user = \"tss\" # comment\nswtpm_group=\"+0\"\n";
        assert_eq!(conf_value(conf, "swtpm_user").as_deref(), Some("tss"));
        assert_eq!(conf_value(conf, "swtpm_group").as_deref(), Some("+0"));
        assert_eq!(conf_value(conf, "user"), None);
        assert_eq!(resolve_group("+0").unwrap(), 0);
    }
}
