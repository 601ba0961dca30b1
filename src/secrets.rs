//! Secrets generated on first start and kept in `data_dir/secrets/` (mode 0600), so a
//! zero-config start is secure and a restart reuses the same keys.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;

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
