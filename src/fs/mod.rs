//! The filesystem layer: the only code in the crate that opens, creates,
//! renames, chowns, chmods or removes anything.
//!
//! The hook runs as root in every VM start, in directories that are partly
//! owned by less trusted users: on Debian the QEMU user owns
//! `/var/lib/libvirt/qemu` (and so can replace `nvram/` by a link), and
//! swtpm's user (`tss`) owns every `tpm2/` state dir and what is in it. So
//! no path is ever resolved by name. The rule, written once here and
//! implemented once in `walk`:
//!
//! **The trust rule.** Every path is reached from an `Anchor`, a
//! directory of libvirt's or ours, walked component by component from `/`
//! (or `VIRT_TPM_STATE_ROOT`). A directory is *trusted* while every
//! directory on the way to it is root-owned and not group/other-writable
//! (a sticky root-owned dir, like `/tmp`, protects only root's entries):
//! nobody but root can then change what the path names. A symlink is
//! followed only when the directory holding it is trusted (the
//! administrator made it: `/var/lib/libvirt` may be a link to a bigger
//! disk). The anchor's own last component is never followed, and nothing
//! below an anchor or below the first untrusted directory is ever followed:
//! those are opened relative to their parent's fd with
//! `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`,
//! or an `O_NOFOLLOW` walk where the kernel lacks `openat2`.
//!
//! What follows from it, kept by `Dir`:
//! - Only regular, singly-linked files are read.
//! - Files are created `O_EXCL|O_NOFOLLOW` under a fresh name, `fchown`ed
//!   and `fchmod`ed on the fd that created them, fsynced and renamed over
//!   the target: a planted link is replaced, never written through.
//! - Directories are created only with `mkdirat` in a directory that
//!   protects new entries (trusted and root-owned), then opened without
//!   following and checked (`fstat`) before any `fchown`/`fchmod`. The
//!   owner or mode of a directory that existed before is never changed.
//! - A state dir is built aside and swapped in with one `renameat2`:
//!   libvirt never sees an empty or half-written state dir.
//! - Trees are removed iteratively through fds, never following a link,
//!   with no depth limit: subdirectories are first moved up beside the tree
//!   under a recognisable leftover name, so an interrupted removal leaves
//!   only names the next run removes. The work is bounded by an entry count;
//!   past it the removal fails with an error, never silently.
//! - Every process starts with `umask 077` ([`restrict_umask`]) and sets
//!   each mode it needs explicitly.

mod dir;
mod error;
mod host;
mod keys;
mod locations;
mod owner;
mod walk;

pub(crate) use dir::{Dir, EntryKind};
pub use error::FsError;
pub(crate) use host::{
    DomainData, DomainLock, HostData, Intent, RevertIntent, WatchLock, MARKER_TTL,
};
pub(crate) use keys::{
    create_host_identity, create_key, host_identity_path, keys_dir, load_host_identity,
    load_keyring, load_recipients, recipients_dir,
};
pub(crate) use locations::{read_tpm_files, NvramLocation, StateLocation};
pub(crate) use owner::Owner;

use crate::paths::{
    Paths, CONFIG_DIR, DATA_DIR, LIBVIRT_CONFIG_DIR, LIBVIRT_NVRAM_DIR, LIBVIRT_SWTPM_DIR,
    LIBVIRT_VARSTORE_DIR, RUN_DIR,
};
use std::path::{Path, PathBuf};

/// A directory every path of the product is reached from (see the trust
/// rule above). Each is an absolute path, re-rooted by [`Paths`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Anchor {
    /// libvirt's swtpm state base, `/var/lib/libvirt/swtpm`.
    SwtpmBase,
    /// libvirt's UEFI variable stores, `/var/lib/libvirt/qemu/nvram`.
    NvramDir,
    /// libvirt's `<varstore>` files, `/var/lib/libvirt/qemu/varstore`.
    VarstoreDir,
    /// libvirt's config dir, `/etc/libvirt` (qemu.conf, hooks).
    LibvirtConfig,
    /// Our config dir, `/etc/virt-tpm-state` (config, host keys).
    Config,
    /// Our persistent data, `/var/lib/virt-tpm-state`.
    Data,
    /// Our volatile data, `/run/virt-tpm-state`.
    Run,
    /// An admin-configured dir (`state_path_prefixes`) or another absolute
    /// directory named on the command line.
    Other(PathBuf),
}

impl Anchor {
    /// The anchor's absolute path, before re-rooting.
    pub(crate) fn abs(&self) -> &Path {
        match self {
            Anchor::SwtpmBase => Path::new(LIBVIRT_SWTPM_DIR),
            Anchor::NvramDir => Path::new(LIBVIRT_NVRAM_DIR),
            Anchor::VarstoreDir => Path::new(LIBVIRT_VARSTORE_DIR),
            Anchor::LibvirtConfig => Path::new(LIBVIRT_CONFIG_DIR),
            Anchor::Config => Path::new(CONFIG_DIR),
            Anchor::Data => Path::new(DATA_DIR),
            Anchor::Run => Path::new(RUN_DIR),
            Anchor::Other(p) => p,
        }
    }

    /// Opens the anchor by the trust rule. `Ok(None)`: it does not exist.
    /// One of our own dirs must moreover be one nobody but root can change:
    /// what is in it (kept copies, `J`, keys, locks) decides what the hook
    /// restores.
    pub(crate) fn open(&self, paths: &Paths) -> Result<Option<Dir>, FsError> {
        let dir = walk::resolve(paths.root(), self.abs(), walk::Last::Anchor)?;
        if let Some(d) = &dir {
            let ours = matches!(self, Anchor::Config | Anchor::Data | Anchor::Run);
            if ours && !(d.trusted() && d.writable_only_by_us()) {
                return Err(FsError::unsafe_path(
                    d.path().to_path_buf(),
                    "not root's, or writable by group or others (or below such a directory); it must be root's, mode 0700 or 0755",
                ));
            }
        }
        Ok(dir)
    }

    /// Opens the anchor, creating what is missing of it (and of its
    /// parents) with `mkdirat` in directories that protect new entries;
    /// the anchor itself gets `mode`, missing parents 0755. An existing
    /// directory is never changed.
    pub(crate) fn open_or_create(&self, paths: &Paths, mode: u32) -> Result<Dir, FsError> {
        if let Some(dir) = self.open(paths)? {
            return Ok(dir);
        }
        let abs = self.abs();
        let (parent, leaf) = split_rel(abs);
        open_or_create_parent(paths, parent)?.ensure_subdir(&leaf, mode)
    }
}

/// Opens `abs`, a directory above an anchor (links in trusted directories
/// followed, its own last component included), creating what is missing of
/// it (0755) where the directory above protects new entries.
fn open_or_create_parent(paths: &Paths, abs: &Path) -> Result<Dir, FsError> {
    if let Some(dir) = walk::resolve(paths.root(), abs, walk::Last::Parent)? {
        return Ok(dir);
    }
    if abs.parent().is_none() {
        return Err(error::io_err(
            "open",
            &paths.under_root(abs),
            nix::errno::Errno::ENOENT,
        ));
    }
    let (parent, leaf) = split_rel(abs);
    open_or_create_parent(paths, parent)?.ensure_subdir(&leaf, 0o755)
}

/// Sets the process umask to 077: nothing this process creates is ever
/// readable by others by accident, and every mode the product needs is set
/// explicitly on the fd it created. Called first by both binaries.
pub fn restrict_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Reads a small regular file below an anchor (`rel` relative to it, no
/// link followed below the anchor): `Ok(None)` when it or a dir on the way
/// does not exist.
pub(crate) fn read_file(
    paths: &Paths,
    anchor: &Anchor,
    rel: &Path,
    max: u64,
) -> Result<Option<Vec<u8>>, FsError> {
    let Some(dir) = anchor.open(paths)? else {
        return Ok(None);
    };
    let (parent, name) = split_rel(rel);
    let Some(parent) = dir.open_beneath(parent)? else {
        return Ok(None);
    };
    parent.read_file(&name, max)
}

/// `rel` split into its directory and its file name.
fn split_rel(rel: &Path) -> (&Path, String) {
    (
        rel.parent().unwrap_or(Path::new("")),
        rel.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

/// A directory named on the command line (`extract --out`), not re-rooted:
/// opened by the trust rule from `/`; with `create`, made 0700 when missing
/// (its parent must exist).
pub(crate) fn open_user_dir(path: &Path, create: bool) -> Result<Option<Dir>, FsError> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| error::io_err("find the current directory for", path, e))?
            .join(path)
    };
    if let Some(dir) = walk::resolve(Path::new("/"), &abs, walk::Last::Anchor)? {
        return Ok(Some(dir));
    }
    if !create {
        return Ok(None);
    }
    let (parent, leaf) = split_rel(&abs);
    let parent = walk::resolve(Path::new("/"), parent, walk::Last::Parent)?
        .ok_or_else(|| error::io_err("create", &abs, nix::errno::Errno::ENOENT))?;
    parent.ensure_subdir(&leaf, 0o700).map(Some)
}

#[cfg(test)]
mod tests;
