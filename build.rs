//! Build script: the git revision this binary is built from, for `crosstrace --version` and the image's
//! `org.opencontainers.image.revision` label (see `src/build.rs`). `CROSSTRACE_REVISION` wins when set (the
//! image build sets it, so that label and binary agree; a build outside a checkout can too); otherwise
//! `git rev-parse --short=12 HEAD` of this package's own checkout; `unknown` without one.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CROSSTRACE_REVISION");
    let revision = match std::env::var("CROSSTRACE_REVISION") {
        Ok(revision) if !revision.is_empty() => {
            // It ends up in a label and in a metric: one plain token, no spaces or quotes.
            let plain = revision.len() <= 64
                && revision.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'+'));
            assert!(plain, "CROSSTRACE_REVISION must be at most 64 of [A-Za-z0-9._+-], got {revision:?}");
            revision
        }
        _ => git_revision().unwrap_or_else(|| "unknown".to_string()),
    };
    println!("cargo:rustc-env=CROSSTRACE_REVISION={revision}");
}

/// The short revision of HEAD, when this package is the top of a git checkout (a package unpacked inside
/// some other repository must not take that one's revision). Reruns when HEAD moves: `HEAD` itself (a
/// checkout of another branch), the branch it points to, and packed-refs (a branch may live there).
fn git_revision() -> Option<String> {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    if !git(&dir, &["rev-parse", "--show-prefix"])?.is_empty() {
        return None;
    }
    let mut watched = vec![git(&dir, &["rev-parse", "--git-path", "HEAD"])?];
    watched.push(git(&dir, &["rev-parse", "--git-path", "packed-refs"])?);
    if let Some(branch) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&dir, &["rev-parse", "--git-path", &branch])?);
    }
    for path in watched {
        let path = dir.join(path);
        // A path that does not exist would make cargo run this script on every build.
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    git(&dir, &["rev-parse", "--short=12", "HEAD"])
}

/// Runs git in `dir`; its trimmed output when it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").current_dir(dir).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
