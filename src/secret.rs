//! Secrets generated into the data directory: the HS256 secret of the embedded default, and
//! the session-id key of a node that verifies tokens with public keys only.

use anyhow::Context as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

const FILE: &str = "jwt-secret";

/// The session-id key file, for a node with no HS256 secret to derive it from.
pub(crate) const SESSION_FILE: &str = "session-secret";

/// Reads `data_dir/jwt-secret`, creating it (mode 0600, 48 random bytes, hex) on first use.
///
/// # Errors
///
/// When the data directory or the file cannot be created or read.
pub(crate) fn load_or_create(data_dir: &Path) -> anyhow::Result<String> {
    load_or_create_file(data_dir, FILE)
}

/// Reads `data_dir/{file}`, creating it (mode 0600, 48 random bytes, hex) on first use.
///
/// # Errors
///
/// When the data directory or the file cannot be created or read.
pub(crate) fn load_or_create_file(data_dir: &Path, file: &str) -> anyhow::Result<String> {
    let path = data_dir.join(file);
    match fs::read_to_string(&path) {
        Ok(secret) => {
            let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "a secret file is readable by others; chmod 600 it");
            }
            let secret = secret.trim().to_owned();
            anyhow::ensure!(
                secret.len() >= 32,
                "{} holds a secret shorter than 32 bytes",
                path.display()
            );
            Ok(secret)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(data_dir)
                .with_context(|| format!("creating data directory {}", data_dir.display()))?;
            let bytes: [u8; 48] = rand::random();
            let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            // create_new: two processes starting at once must not overwrite each other's secret.
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(secret.as_bytes())?;
                    tracing::info!(path = %path.display(), "generated a secret");
                    Ok(secret)
                }
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_create_file(data_dir, file)
                }
                Err(err) => Err(err).with_context(|| format!("writing {}", path.display())),
            }
        }
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_with_private_mode_and_reuses() {
        let dir = std::env::temp_dir().join(format!("lockstep-secret-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = load_or_create(&dir).unwrap();
        assert_eq!(first.len(), 96);
        let mode = fs::metadata(dir.join(FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&dir).unwrap(), first);
        fs::remove_dir_all(&dir).unwrap();
    }
}
