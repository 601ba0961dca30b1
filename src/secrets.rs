//! Secrets generated on first start and kept in `data_dir/secrets/` (mode 0600), so a
//! zero-config start is secure and a restart reuses the same keys.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;

/// A new opaque token (refresh, one-time codes): 256 random bits, base64url.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Reads `data_dir/secrets/<name>`, or creates it with `prefix` + 256 random bits.
pub fn load_or_generate(data_dir: &Path, name: &str, prefix: &str) -> std::io::Result<String> {
    let dir = data_dir.join("secrets");
    create_private_dir(&dir)?;
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let value = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes));
    // Write to a temp file and rename, so a crash never leaves a half-written key.
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = open_private(&tmp)?;
        f.write_all(value.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(value)
}

pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}

/// What [`tighten_data_dir`] did: `(path, old mode, new mode)` per change, and a
/// message per file it could not change (not its owner, say).
pub type Tightened = (Vec<(std::path::PathBuf, u32, u32)>, Vec<String>);

/// Makes an existing data dir private: the dir itself 0700 and the database files 0600
/// (a dir made by hand or an older version is often 0755 with a 0644 database, which
/// lets every local user read the password hashes). Failures are reported, not fatal:
/// the caller warns and carries on. `db_file` is the database's file name in `dir`.
pub fn tighten_data_dir(dir: &Path, db_file: &str) -> Tightened {
    let mut changed = Vec::new();
    let mut failed = Vec::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let db = dir.join(db_file);
        let mut targets = vec![(dir.to_path_buf(), 0o700)];
        for suffix in ["", "-wal", "-shm"] {
            let mut name = db.clone().into_os_string();
            name.push(suffix);
            targets.push((name.into(), 0o600));
        }
        for (path, want) in targets {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    failed.push(format!("cannot read the mode of {}: {e}", path.display()));
                    continue;
                }
            };
            let mode = meta.permissions().mode() & 0o777;
            // Only take away access of group and others; never add any.
            let new = mode & want;
            if new != mode {
                match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(new)) {
                    Ok(()) => changed.push((path, mode, new)),
                    Err(e) => failed.push(format!(
                        "{} is mode {mode:o}, open to other users, and cannot be made \
                         {new:o}: {e}; make it private (chmod {new:o})",
                        path.display()
                    )),
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    (changed, failed)
}

/// Empties the scratch dir (`data_dir/tmp`): whatever is there was left by a process that
/// died mid-job (kill -9 during an `analyze`). Only called under the instance lock.
pub fn clear_scratch(dir: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
        n += 1;
    }
    Ok(n)
}

fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_generate(dir.path(), "jwt.key", "").expect("generate");
        let b = load_or_generate(dir.path(), "jwt.key", "").expect("reuse");
        assert_eq!(a, b);
        assert_eq!(a.len(), 43);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("secrets/jwt.key"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let w = load_or_generate(dir.path(), "webhook", "whsec_").expect("generate");
        assert!(w.starts_with("whsec_"));
    }
}
