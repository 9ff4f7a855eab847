//! Host keys: `/etc/virt-tpm-state/keys/<time>-<id>.key`, one line of
//! base64 each, root-only.

use super::dir::FileType;
use super::dir::{Dir, FILE_MODE};
use super::error::{io_err, FsError};
use super::Anchor;
use crate::envelope::{KeyId, Keyring, RejectedKey, SecretKey, KEY_LEN};
use crate::paths::Paths;
use nix::fcntl::AtFlags;
use nix::sys::stat::{fstat, fstatat};
use std::path::PathBuf;
use std::time::SystemTime;

const KEYS_DIR: &str = "keys";

/// `<config>/keys`: root-only host keys, one per file.
pub fn keys_dir(paths: &Paths) -> PathBuf {
    match paths.keys_override() {
        Some(dir) => dir.to_path_buf(),
        None => paths.config_dir().join(KEYS_DIR),
    }
}

/// Opens the keys dir, refusing one a user other than root (or this
/// process's user) could write: a file dropped there would be a key.
fn open_keys_dir(paths: &Paths) -> Result<Option<Dir>, FsError> {
    if let Some(path) = paths.keys_override() {
        // A dir the user names (`--keys DIR`): opened by the trust rule; it
        // must exist, and only its owner (root or this user) may write it.
        let dir = super::open_user_dir(path, false)?
            .ok_or_else(|| io_err("open the keys dir", path, nix::errno::Errno::ENOENT))?;
        if !dir.writable_only_by_us() {
            return Err(FsError::UnsafeKeysDir {
                path: dir.path().to_path_buf(),
                what: "it is not root's or yours, or is group/other-writable",
            });
        }
        return Ok(Some(dir));
    }
    let Some(config) = Anchor::Config.open(paths)? else {
        return Ok(None);
    };
    let Some(dir) = config.open_subdir(KEYS_DIR)? else {
        return Ok(None);
    };
    check_keys_dir(&dir)?;
    Ok(Some(dir))
}

fn check_keys_dir(dir: &Dir) -> Result<(), FsError> {
    if !dir.trusted() || !dir.writable_only_by_us() {
        return Err(FsError::UnsafeKeysDir {
            path: dir.path().to_path_buf(),
            what: "it, or a directory above it, is not root's or is group/other-writable",
        });
    }
    Ok(())
}

/// Loads every `*.key` in the keys dir, oldest first (file names start with
/// their creation time, so the newest sorts last). A key file that is a
/// link, not regular, not root's, readable by group or others, or
/// malformed is skipped with a log line naming it (never its content), and
/// listed in the keyring: only an element sealed with that key fails, and
/// its error names the file. A keys dir others can write fails every call.
pub fn load_keyring(paths: &Paths) -> Result<Keyring, FsError> {
    let Some(dir) = open_keys_dir(paths)? else {
        return Ok(Keyring::default());
    };
    let mut names: Vec<String> = dir
        .list()?
        .into_iter()
        .filter(|n| n.ends_with(".key") && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut keys = Vec::new();
    let mut rejected = Vec::new();
    for name in names {
        match load_key(&dir, &name) {
            Ok(key) => keys.push(key),
            Err(why) => {
                // Syslog only (in the hook): the refusal of an element that
                // needs this key names the file itself, in one line.
                log::info!(
                    "key file {} skipped: {why}",
                    dir.path().join(&name).display()
                );
                rejected.push(RejectedKey {
                    id: key_id_of_file(&name),
                    file: dir.path().join(&name).display().to_string(),
                    why,
                });
            }
        }
    }
    Ok(Keyring::with_rejected(keys, rejected))
}

/// `<time>-<id>.key` -> id.
fn key_id_of_file(name: &str) -> Option<KeyId> {
    let stem = name.strip_suffix(".key")?;
    KeyId::parse(stem.rsplit('-').next()?)
}

fn load_key(dir: &Dir, name: &str) -> Result<SecretKey, &'static str> {
    let st = fstatat(dir.fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|_| "it cannot be examined")?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err("it is a symlink or not a regular file");
    }
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != 0 && st.st_uid != me {
        return Err("it is owned by another user (chown root it)");
    }
    if st.st_mode & 0o077 != 0 {
        return Err("it is readable or writable by group or others (chmod 600 it)");
    }
    let text = dir
        .read_file(name, 256)
        .map_err(|_| "it cannot be read (a hard link, or larger than a key)")?
        .unwrap_or_default();
    parse_key_file(&text).ok_or("it is not a virt-tpm-state key (one line of base64, 32 bytes)")
}

fn parse_key_file(text: &[u8]) -> Option<SecretKey> {
    use base64::Engine as _;
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(std::str::from_utf8(text).ok()?.trim())
        .ok()?;
    let key = <[u8; KEY_LEN]>::try_from(raw.as_slice())
        .ok()
        .map(SecretKey::from_bytes);
    zeroize::Zeroize::zeroize(&mut raw);
    key
}

/// Creates a new host key file (0600, `O_EXCL`: never overwrites) and
/// returns its id and path. The keys dir is created 0700 when missing.
pub fn create_key(paths: &Paths, key: &SecretKey) -> Result<(KeyId, PathBuf), FsError> {
    use base64::Engine as _;
    let config = Anchor::Config.open_or_create(paths, 0o755)?;
    let dir = config.ensure_subdir(KEYS_DIR, 0o700)?;
    check_keys_dir(&dir)?;
    let st = fstat(dir.fd()).map_err(|e| io_err("stat", dir.path(), e))?;
    if st.st_mode & 0o077 != 0 {
        log::warn!(
            "{} is readable by group or others: chmod 700 it",
            dir.path().display()
        );
    }
    let id = key.id();
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let name = format!("{stamp}-{id}.key");
    let mut text = base64::engine::general_purpose::STANDARD.encode(key.expose());
    text.push('\n');
    let result = dir.create_new_file(&name, text.as_bytes(), FILE_MODE);
    zeroize::Zeroize::zeroize(&mut text);
    result?;
    Ok((id, dir.path().join(name)))
}
