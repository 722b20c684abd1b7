//! The registry's bearer token, as a file: the runner writes a fresh one for every run
//! to [`DEFAULT_TOKEN_FILE`], the config server reads it to check calls, and services
//! read it to send `authorization: Bearer <token>`. So a bare `logging 50051` started
//! next to the runner finds it without a flag.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::{
    metadata::{Ascii, MetadataValue},
    Request,
};

/// Where the runner writes its token, and where services look when not told.
pub const DEFAULT_TOKEN_FILE: &str = "data/registry.token";

/// Reads a token file: the first line, trimmed; it must not be empty, and the file must
/// be readable by its owner only.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    rpc::tls::check_private(path)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    anyhow::ensure!(!token.is_empty(), "token file {} is empty", path.display());
    anyhow::ensure!(
        token.bytes().all(|b| b.is_ascii_graphic()),
        "token file {} holds characters a header cannot carry",
        path.display()
    );
    Ok(token)
}

/// The token file to use: the one given, else the default one if it exists.
pub fn token_file(given: Option<&PathBuf>) -> Option<PathBuf> {
    given.cloned().or_else(|| {
        let default = PathBuf::from(DEFAULT_TOKEN_FILE);
        default.exists().then_some(default)
    })
}

/// Adds `authorization: Bearer <token>` to a request, when there is a token.
pub fn attach<T>(request: &mut Request<T>, token: Option<&MetadataValue<Ascii>>) {
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", token.clone());
    }
}

/// The header value for a token.
pub fn bearer(token: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    format!("Bearer {token}")
        .parse()
        .context("the token cannot be sent as a header")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_trimmed_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        std::fs::write(&file, "  abc123 \nignored\n").expect("write");
        set_mode(&file, 0o600);
        assert_eq!(read_token(&file).expect("token"), "abc123");
        std::fs::write(&file, "\n").expect("write");
        assert!(read_token(&file).is_err());
        assert!(read_token(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(dir).ok();
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn a_token_others_may_read_is_refused() {
        let dir = std::env::temp_dir().join(format!("token-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        std::fs::write(&file, "abc123\n").expect("write");
        for mode in [0o644, 0o640, 0o604] {
            set_mode(&file, mode);
            let error = read_token(&file).expect_err("refused").to_string();
            assert!(error.contains("chmod 600"), "{error}");
        }
        set_mode(&file, 0o400);
        assert_eq!(read_token(&file).expect("token"), "abc123");
        std::fs::remove_dir_all(dir).ok();
    }
}
